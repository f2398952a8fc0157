/*
 * attention 'duo': DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM
 * Inference with Retrieval and Streaming Heads", arXiv:2410.10819). Only some heads need the
 * whole context: retrieval heads read every entry, streaming heads only the attention sinks and
 * a window of recent entries, in prefill and in decode alike (the paper's Lambda-shaped mask).
 *
 * The split is per KV head, as in the paper's released patterns (one gate per layer and KV
 * head). The paper learns it by optimisation on synthetic passkey data; here it comes from a
 * head file (`heads`, <tessera/sdk_heads.h>) that `tessera profile-heads` writes from the
 * attention each head puts outside the sinks and the window on a text. Without a head file
 * every head is a retrieval head: nothing is known to be safe to skip, and the result is
 * flash's.
 *
 * A streaming head of a query at position q reads the entries at positions p < sink and
 * q - window <= p <= q: the window counts the positions before the query, as the 'streaming'
 * cache's does, so that in decode this reads exactly what a streaming cache of the same sink
 * and window keeps (that cache, given the same head file, stores only that for streaming
 * heads). The attention runs through <tessera/sdk_sparse.h>: flash's arithmetic, bit for bit
 * for the heads that read everything.
 */
#include <tessera/sdk_attention.h>
#include <tessera/sdk_heads.h>
#include <tessera/sdk_sparse.h>

typedef struct duo_attn {
    tsr_sparse_base base; /* first: shape and counts */
    int32_t sink, window;
    uint8_t *retrieval;   /* (n_layer, n_kv_head) from the head file; NULL: every head */
} duo_attn;

/* A streaming head reads the sinks and the window (causality is applied on top). */
static int duo_select(void *ctx, const tsr_sparse_choice *c) {
    const duo_attn *a = ctx;
    int32_t g = c->h / (a->base.sh.n_head / a->base.sh.n_kv_head);
    if (a->retrieval[c->call->layer * a->base.sh.n_kv_head + g]) return 1;
    const int64_t sink = a->sink, recent = (int64_t)c->call->q_pos[c->i] - a->window;
    for (int64_t w = 0; w < c->n_words; w++) {
        uint64_t exist = tsr_sparse_exist(c->view->n, w);
        if (c->tile_hi[w] < sink || c->tile_lo[w] >= recent) {
            c->words[w] = exist;
        } else if (c->tile_lo[w] < sink || c->tile_hi[w] >= recent) {
            const int32_t *pos = c->view->pos + w * TSR_SPARSE_TILE;
            uint64_t word = 0;
            for (int r = 0; r < TSR_SPARSE_TILE && ((exist >> r) & 1); r++)
                word |= (uint64_t)(pos[r] < sink || pos[r] >= recent) << r;
            c->words[w] = word;
        }
    }
    return 0;
}

static tsr_status duo_forward(void *self, const tsr_attention_call *call) {
    duo_attn *a = self;
    tsr_status st = tsr_attention_check_call(&a->base.sh, call);
    if (st < 0) return st;
    /* A layer whose KV heads are all retrieval heads reads everything. */
    int sparse = 0;
    for (int32_t g = 0; a->retrieval && g < a->base.sh.n_kv_head; g++)
        sparse |= !a->retrieval[call->layer * a->base.sh.n_kv_head + g];
    return tsr_sparse_forward(&a->base.sh, call, sparse ? duo_select : NULL, a,
                              tsr_sparse_counts_of(&a->base, call), NULL);
}

static void duo_destroy(void *self) {
    duo_attn *a = self;
    tsr_sparse_log_reads(&a->base);
    a->base.sh.host->free(a->base.sh.host->ctx, a->retrieval);
    tsr_attention_destroy(a);
}

static tsr_status duo_create(const tsr_host *host, const tsr_params *params,
                             const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    const char *path = tsr_param_str(params, "heads");
    tsr_heads heads = {0};
    if (path && *path &&
        (st = tsr_heads_load(host, path, init->n_layer, init->n_head, init->n_kv_head, &heads)) < 0)
        return st;
    duo_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) {
        tsr_heads_free(host, &heads);
        return TSR_E_NOMEM;
    }
    a->sink = (int32_t)tsr_param_int(params, "sink");
    a->window = (int32_t)tsr_param_int(params, "window");
    a->retrieval = heads.retrieval;
    if (a->retrieval && (heads.sink != a->sink || heads.window != a->window))
        host->log(host->ctx, TSR_LOG_WARN,
                  "heads: %s was profiled with sink %d and window %d; streaming heads read sink "
                  "%d and window %d", path, (int)heads.sink, (int)heads.window, (int)a->sink,
                  (int)a->window);
    *out = a;
    return TSR_OK;
}

static const tsr_param_def duo_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "heads", .type = TSR_PARAM_STRING, .default_value = "",
     .doc = "head file of tessera profile-heads (relative to the current folder); empty: every "
            "head is a retrieval head"},
    {TSR_SIZED(tsr_param_def), .name = "sink", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 0, .max = 1 << 20, .unit = "positions",
     .doc = "first positions a streaming head reads (attention sinks)"},
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "252",
     .min = 1, .max = 1 << 20, .unit = "positions",
     .doc = "positions before the query a streaming head reads, besides the sinks and its own"},
};

static const tsr_command duo_commands[] = {TSR_SPARSE_READ_COMMANDS};

static const tsr_attention_vtable duo_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = duo_create,
    .destroy = duo_destroy,
    .forward = duo_forward,
};

static const tsr_plugin_desc duo_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "duo",
    .version = "1.0",
    .description = "DuoAttention: retrieval heads read everything, streaming heads sinks + window",
    TSR_PARAMS(duo_params),
    TSR_COMMANDS(duo_commands),
    .vtable = &duo_vtable,
};

TSR_PLUGIN_EXPORT(&duo_desc)
