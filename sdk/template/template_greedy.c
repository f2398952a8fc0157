/*
 * template-greedy: a complete decoder-strategy plugin, as the starting point for your own.
 *
 * It decodes greedily: the next token is the argmax of the logits, ties going to the lowest
 * token id, and the token given as `ban_token` is never chosen. It shows every part a plugin
 * has: a parameter table, an instance created through the host's allocator, the stage
 * callbacks, a diagnostic command, and the descriptor exported with TSR_PLUGIN_EXPORT.
 *
 * To start a plugin of another stage, keep the shape of this file and swap the decoder
 * vtable for that stage's (see <tessera/cache.h>, <tessera/attention.h> ...); abi/CONTRACT.md
 * lists the rules every plugin follows, and tessera-plugin-test checks most of them.
 */
#include <math.h>

#include <tessera/sdk.h>

/* ---- parameters --------------------------------------------------------------------------
 * The host validates configured values against this table (type, range) before create()
 * sees them, prints it in `tessera plugins info template-greedy`, and passes typed values.
 * In a pipeline: decoder: { plugin: template-greedy, ban_token: 13 } */
static const tsr_param_def params[] = {
    {TSR_SIZED(tsr_param_def), .name = "ban_token", .type = TSR_PARAM_INT,
     .default_value = "-1", .min = -1, .max = 2147483647, .unit = "token id",
     .doc = "a token id that is never chosen; -1 bans nothing"},
};

/* ---- instance ----------------------------------------------------------------------------
 * Everything mutable lives in the instance, never in globals: two pipelines in one process
 * may each run their own template-greedy. */
typedef struct greedy {
    const tsr_host *host; /* valid until destroy */
    int32_t n_vocab;
    int32_t ban_token;
    int32_t n_emitted;    /* tokens emitted over the instance's life, for the command below */
    float *logits;        /* (n_vocab): the last position's logits */
} greedy;

static tsr_status greedy_create(const tsr_host *host, const tsr_params *p,
                                const tsr_decoder_init *init, void **out) {
    if (init->n_vocab <= 0) {
        host->set_error(host->ctx, "n_vocab is %d; a decoder needs at least one token",
                        init->n_vocab);
        return TSR_E_INVALID;
    }
    /* Allocate through the host: it accounts the memory of each plugin and reports what an
     * instance still holds when it is destroyed. */
    greedy *g = tsr_calloc(host, 1, sizeof *g);
    if (!g) return TSR_E_NOMEM;
    g->host = host;
    g->n_vocab = init->n_vocab;
    g->ban_token = (int32_t)tsr_param_int(p, "ban_token");
    g->logits = tsr_calloc(host, (size_t)init->n_vocab, sizeof *g->logits);
    if (!g->logits) {
        host->free(host->ctx, g);
        return TSR_E_NOMEM;
    }
    *out = g;
    return TSR_OK;
}

static void greedy_destroy(void *self) {
    greedy *g = self;
    g->host->free(g->host->ctx, g->logits);
    g->host->free(g->host->ctx, g);
}

/* The sampling rule alone, also offered to the host as the vtable's `pick` so that other
 * decoders (speculative verification) can reuse it. NaN logits are never chosen. */
static int32_t greedy_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    const greedy *g = self;
    (void)history; /* greedy ignores what came before; a sampler with penalties reads it */
    (void)n_history;
    int32_t best = -1;
    for (int32_t v = 0; v < g->n_vocab; v++) {
        if (v == g->ban_token || isnan(logits[v])) continue;
        /* Strictly greater: on a tie the lower id, seen first, stays. */
        if (best < 0 || logits[v] > logits[best]) best = v;
    }
    /* Everything banned or NaN (a one-token vocabulary that is banned): token 0 is the only
     * answer that still lies in the vocabulary. */
    return best < 0 ? 0 : best;
}

static tsr_status greedy_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    greedy *g = self;
    const tsr_host *host = g->host;
    if (api->n_vocab != g->n_vocab) {
        host->set_error(host->ctx, "the model has %d tokens, the instance was created for %d",
                        api->n_vocab, g->n_vocab);
        return TSR_E_INVALID;
    }
    if (req->n_prompt < 1 || req->n_prompt > api->n_ctx) {
        host->set_error(host->ctx, "prompt of %lld tokens; expected 1 to n_ctx = %d",
                        (long long)req->n_prompt, api->n_ctx);
        return TSR_E_RANGE;
    }

    /* Prefill: the whole prompt in one forward on sequence 0, logits of the last entry only. */
    tsr_batch_entry *batch = host->alloc(host->ctx, (size_t)req->n_prompt * sizeof *batch, 0);
    if (!batch) return TSR_E_NOMEM;
    for (int64_t i = 0; i < req->n_prompt; i++)
        batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = req->prompt[i],
                                     .want_logits = i == req->n_prompt - 1};
    tsr_status st = api->forward(api->ctx, batch, req->n_prompt, g->logits);
    host->free(host->ctx, batch);
    if (st < 0) return st; /* the host already knows why its own forward failed */

    /* Decode: pick, emit, and feed the token back, one forward per token. emit() returns 1
     * when the host wants generation to stop (token limit, end-of-generation token, user);
     * the decoder must then return without another forward. */
    int32_t pos = (int32_t)req->n_prompt;
    for (int64_t n = 0; req->max_new_tokens <= 0 || n < req->max_new_tokens; n++) {
        int32_t token = greedy_pick(g, g->logits, NULL, 0);
        g->n_emitted++;
        if (api->emit(api->ctx, &token, 1)) break;
        if (pos >= api->n_ctx) break; /* the context is full: stop, it is not an error */
        tsr_batch_entry e = {.seq_id = 0, .pos = pos++, .token = token, .want_logits = 1};
        st = api->forward(api->ctx, &e, 1, g->logits);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* ---- diagnostic command ------------------------------------------------------------------
 * Commands are extra functions the host calls through libffi, by name, from
 * `tessera plugins call template-greedy emitted` or from a pipeline's hooks:. Signature
 * "i(I)": returns an int32_t, takes the live instance. */
static int32_t greedy_cmd_emitted(void *self) {
    const greedy *g = self;
    g->host->log(g->host->ctx, TSR_LOG_INFO, "%d tokens emitted", g->n_emitted);
    return g->n_emitted;
}

static const tsr_command commands[] = {
    {TSR_SIZED(tsr_command), .name = "emitted", .signature = "i(I)",
     .fn = (void (*)(void))greedy_cmd_emitted,
     .doc = "number of tokens this instance has emitted", .returns_status = 0},
};

/* ---- descriptor --------------------------------------------------------------------------
 * TSR_PLUGIN_HEADER records the stage and the decoder ABI version these headers define; the
 * host refuses the plugin, with a clear message, if it speaks another MAJOR. */
static const tsr_decoder_vtable vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = greedy_create,
    .destroy = greedy_destroy,
    .generate = greedy_generate,
    .pick = greedy_pick,
};

static const tsr_plugin_desc template_greedy = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "template-greedy",
    .version = "1.0.0",
    .description = "greedy decoding (argmax, ties to the lowest id) with one banned token",
    TSR_PARAMS(params),
    TSR_COMMANDS(commands),
    .vtable = &vtable,
};

/* The object's one exported symbol, tessera_plugin_entry; list several descriptors to ship
 * several plugins in one object. */
TSR_PLUGIN_EXPORT(&template_greedy)
