/*
 * attention 'quest': Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
 * Long-Context LLM Inference", arXiv:2406.10774). The entries of each view are cut into pages
 * of `page` consecutive entries; for each page the instance keeps the elementwise minimum and
 * maximum of its keys. A decode query bounds q.k over a page by sum_d max(q_d min_d, q_d max_d)
 * without reading it, and each query head reads only the `k` pages of highest bound: the last
 * page (the newest entries, the query's own among them) always, and the k - 1 best others,
 * as the paper's kernels do. The attention itself runs through <tessera/sdk_sparse.h>.
 *
 * As in the paper, prefill (and any call of several queries: chunked prefill, speculative
 * verification) and the first `dense_layers` layers read every entry, and so does a view of at
 * most k pages: with every page chosen the result is flash's, bit for bit.
 *
 * Page statistics are kept per (sequence, layer, KV head) and extended as entries arrive: each
 * decode call summarises only the entries it has not seen. They are right for policies that
 * append (full, paged, quantized stores): an entry keeps its slot and its keys. The instance
 * keeps the positions it summarised and starts again from the first slot whose position
 * changed, or that holds a position the call itself stores (after a truncation); a policy that
 * evicts and refills slots (streaming, h2o...) is served, but makes it summarise much of the
 * view again at each step, and one that changes keys in place (merging) leaves bounds that are
 * only estimates.
 */
#include <tessera/sdk_attention.h>
#include <tessera/sdk_sparse.h>

/* The page statistics of one (layer, KV head) of a sequence. */
typedef struct quest_stats {
    int64_t n_done;     /* entries summarised */
    int64_t cap;        /* entries the arrays have room for */
    int32_t *pos;       /* (cap) the position of each summarised entry */
    float *kmin, *kmax; /* (cap / page rounded up, head_dim) per page */
} quest_stats;

typedef struct quest_seq {
    quest_stats *stats; /* (n_layer, n_kv_head) */
} quest_seq;

typedef struct quest_attn {
    tsr_sparse_base base; /* first: shape and counts */
    int32_t page, k, dense_layers;
    tsr_seq_table seqs;
    float *rows;          /* (page, head_dim) keys of one page being summarised */
    /* The current call: its layer's statistics (n_kv_head), and each head's pages, chosen
     * when the core first asks for the head (chosen_for[h]). */
    const quest_stats *stats;
    tsr_sparse_chosen chosen;
    unsigned char *every;      /* (n_head) of chosen: the head's view has at most k pages */
    unsigned char *chosen_for; /* (n_head) */
    float *bound;              /* (n_head, bound_cap) each page's bound */
    int64_t *best;             /* (n_head, bound_cap) the best pages */
    int64_t bound_cap;
} quest_attn;

static void quest_seq_free(quest_attn *a, quest_seq *s) {
    const tsr_host *host = a->base.sh.host;
    if (!s) return;
    for (int32_t i = 0; i < a->base.sh.n_layer * a->base.sh.n_kv_head; i++) {
        host->free(host->ctx, s->stats[i].pos);
        host->free(host->ctx, s->stats[i].kmin);
        host->free(host->ctx, s->stats[i].kmax);
    }
    host->free(host->ctx, s->stats);
    host->free(host->ctx, s);
}

/* Sequence id's state, made on first sight (a forked sequence has had no seq_begin). */
static quest_seq *quest_seq_get(quest_attn *a, int64_t id) {
    const tsr_host *host = a->base.sh.host;
    void **slot = tsr_seq_table_get(host, &a->seqs, id);
    if (slot && !*slot) {
        quest_seq *s = tsr_calloc(host, 1, sizeof *s);
        if (s) s->stats = tsr_calloc(host, (size_t)(a->base.sh.n_layer * a->base.sh.n_kv_head),
                                     sizeof *s->stats);
        if (!s || !s->stats) {
            host->free(host->ctx, s);
            tsr_seq_table_take(&a->seqs, id);
            return NULL;
        }
        *slot = s;
    }
    return slot ? *slot : NULL;
}

static tsr_status quest_seq_begin(void *self, int64_t seq_id) {
    quest_attn *a = self;
    /* A reused id starts afresh. */
    quest_seq_free(a, tsr_seq_table_take(&a->seqs, seq_id));
    if (quest_seq_get(a, seq_id)) return TSR_OK;
    a->base.sh.host->set_error(a->base.sh.host->ctx, "seq_begin: sequence %lld: out of memory",
                               (long long)seq_id);
    return TSR_E_NOMEM;
}

static void quest_seq_end(void *self, int64_t seq_id) {
    quest_attn *a = self;
    quest_seq_free(a, tsr_seq_table_take(&a->seqs, seq_id));
}

/* Room for n entries in st, keeping what it holds. */
static int quest_stats_reserve(quest_attn *a, quest_stats *st, int64_t n) {
    if (n <= st->cap) return 1;
    const tsr_host *host = a->base.sh.host;
    const int32_t hd = a->base.sh.head_dim;
    int64_t cap = st->cap * 2 > n ? st->cap * 2 : n;
    int64_t pages = (cap + a->page - 1) / a->page, kept = (st->n_done + a->page - 1) / a->page;
    int32_t *pos = host->alloc(host->ctx, (size_t)cap * sizeof *pos, 0);
    float *kmin = host->alloc(host->ctx, (size_t)(pages * hd) * sizeof *kmin, 0);
    float *kmax = host->alloc(host->ctx, (size_t)(pages * hd) * sizeof *kmax, 0);
    if (!pos || !kmin || !kmax) {
        host->free(host->ctx, pos);
        host->free(host->ctx, kmin);
        host->free(host->ctx, kmax);
        return 0;
    }
    if (st->n_done) {
        memcpy(pos, st->pos, (size_t)st->n_done * sizeof *pos);
        memcpy(kmin, st->kmin, (size_t)(kept * hd) * sizeof *kmin);
        memcpy(kmax, st->kmax, (size_t)(kept * hd) * sizeof *kmax);
    }
    host->free(host->ctx, st->pos);
    host->free(host->ctx, st->kmin);
    host->free(host->ctx, st->kmax);
    *st = (quest_stats){.n_done = st->n_done, .cap = cap, .pos = pos, .kmin = kmin, .kmax = kmax};
    return 1;
}

/* Brings st up to the view: keeps the summarised entries whose slot still holds the position it
 * held and that this call did not store (positions >= first_new), then summarises the pages
 * from the first one that changed. */
static int quest_stats_update(quest_attn *a, quest_stats *st, const tsr_kv_view *v,
                              int32_t first_new) {
    const int32_t hd = a->base.sh.head_dim;
    int64_t valid = st->n_done < v->n ? st->n_done : v->n, j = 0;
    while (j < valid && st->pos[j] == v->pos[j] && v->pos[j] < first_new) j++;
    valid = j;
    if (!quest_stats_reserve(a, st, v->n)) return 0;
    for (int64_t p = valid / a->page; p * a->page < v->n; p++) {
        int64_t j0 = p * a->page, nb = v->n - j0 < a->page ? v->n - j0 : a->page;
        size_t stride;
        const float *k = tsr_kv_view_rows(v, 0, j0, nb, hd, a->rows, &stride);
        float *mn = st->kmin + p * hd, *mx = st->kmax + p * hd;
        for (int32_t d = 0; d < hd; d++) mn[d] = mx[d] = k[d];
        for (int64_t r = 1; r < nb; r++) {
            const float *kr = k + (size_t)r * stride;
            for (int32_t d = 0; d < hd; d++) {
                mn[d] = kr[d] < mn[d] ? kr[d] : mn[d];
                mx[d] = kr[d] > mx[d] ? kr[d] : mx[d];
            }
        }
    }
    if (v->n > valid) memcpy(st->pos + valid, v->pos + valid, (size_t)(v->n - valid) * sizeof *st->pos);
    st->n_done = v->n;
    return 1;
}

/* Head h's pages for the call: the upper bound of q.k over each page but the last, the best
 * k - 1 of them, and the last. Runs on the worker that attends for h's KV head, when the core
 * first asks for h, so the choice costs no parallel step of its own. */
static void quest_choose(quest_attn *a, const tsr_attention_call *call, int32_t h) {
    const int32_t hd = a->base.sh.head_dim, group = a->base.sh.n_head / a->base.sh.n_kv_head;
    const tsr_kv_view *v = &call->views[h / group];
    const quest_stats *st = &a->stats[h / group];
    int64_t n_pages = (v->n + a->page - 1) / a->page;
    a->every[h] = n_pages <= a->k;
    if (a->every[h]) return;
    float *bound = a->bound + (size_t)h * (size_t)a->bound_cap;
    int64_t *best = a->best + (size_t)h * (size_t)a->bound_cap;
    const float *q = call->q + (size_t)h * hd;
    for (int64_t p = 0; p < n_pages - 1; p++) {
        const float *mn = st->kmin + p * hd, *mx = st->kmax + p * hd;
        float ub = 0.0f;
        for (int32_t d = 0; d < hd; d++) {
            float lo = q[d] * mn[d], up = q[d] * mx[d];
            ub += lo > up ? lo : up;
        }
        bound[p] = ub;
    }
    uint64_t *words = tsr_sparse_chosen_row(&a->chosen, h, v->n);
    tsr_sparse_top_k(bound, n_pages - 1, a->k - 1, best);
    for (int64_t i = 0; i < a->k - 1; i++)
        tsr_sparse_set_range(words, best[i] * a->page, (best[i] + 1) * a->page);
    tsr_sparse_set_range(words, (n_pages - 1) * a->page, v->n);
}

/* The core asks for each head of a KV head on the worker that owns that KV head (and again in
 * a later pass for score_acc): the first ask chooses. */
static int quest_select(void *ctx, const tsr_sparse_choice *c) {
    quest_attn *a = ctx;
    if (!a->chosen_for[c->h]) {
        quest_choose(a, c->call, c->h);
        a->chosen_for[c->h] = 1;
    }
    return tsr_sparse_select_chosen(&a->chosen, c);
}

static tsr_status quest_nomem(quest_attn *a, const tsr_attention_call *call) {
    a->base.sh.host->set_error(a->base.sh.host->ctx, "forward: layer %d: out of memory for the "
                               "page statistics of sequence %lld", (int)call->layer,
                               (long long)call->seq_id);
    return TSR_E_NOMEM;
}

static tsr_status quest_forward(void *self, const tsr_attention_call *call) {
    quest_attn *a = self;
    const tsr_host *host = a->base.sh.host;
    tsr_status st = tsr_attention_check_call(&a->base.sh, call);
    if (st < 0) return st;
    tsr_sparse_counts *counts = tsr_sparse_counts_of(&a->base, call);
    if (call->phase != TSR_PHASE_DECODE || call->n_q != 1 || call->layer < a->dense_layers)
        return tsr_sparse_forward(&a->base.sh, call, NULL, NULL, counts, NULL);
    quest_seq *s = quest_seq_get(a, call->seq_id);
    if (!s) return quest_nomem(a, call);
    quest_stats *stats = s->stats + (size_t)call->layer * (size_t)a->base.sh.n_kv_head;
    for (int32_t g = 0; g < a->base.sh.n_kv_head; g++)
        if (!quest_stats_update(a, &stats[g], &call->views[g], call->q_pos[0]))
            return quest_nomem(a, call);
    int64_t most = 0;
    tsr_attention_scan_views(&a->base.sh, call, &most);
    if (!tsr_sparse_chosen_reserve(host, &a->chosen, a->base.sh.n_head, most))
        return quest_nomem(a, call);
    int64_t pages = (most + a->page - 1) / a->page;
    if (pages > a->bound_cap) {
        size_t rows = (size_t)pages * (size_t)a->base.sh.n_head;
        float *bound = host->alloc(host->ctx, rows * sizeof *bound, 0);
        int64_t *best = host->alloc(host->ctx, rows * sizeof *best, 0);
        if (!bound || !best) {
            host->free(host->ctx, bound);
            host->free(host->ctx, best);
            return quest_nomem(a, call);
        }
        host->free(host->ctx, a->bound);
        host->free(host->ctx, a->best);
        a->bound = bound;
        a->best = best;
        a->bound_cap = pages;
    }
    a->stats = stats;
    memset(a->chosen_for, 0, (size_t)a->base.sh.n_head);
    return tsr_sparse_forward(&a->base.sh, call, quest_select, a, counts, NULL);
}

static void quest_destroy(void *self) {
    quest_attn *a = self;
    const tsr_host *host = a->base.sh.host;
    tsr_sparse_log_reads(&a->base);
    while (a->seqs.n) quest_seq_free(a, tsr_seq_table_take(&a->seqs, a->seqs.ids[0]));
    tsr_seq_table_free(host, &a->seqs);
    host->free(host->ctx, a->rows);
    host->free(host->ctx, a->chosen.words);
    host->free(host->ctx, a->every);
    host->free(host->ctx, a->chosen_for);
    host->free(host->ctx, a->bound);
    host->free(host->ctx, a->best);
    tsr_attention_destroy(a);
}

static tsr_status quest_create(const tsr_host *host, const tsr_params *params,
                               const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    int64_t dense_layers = tsr_param_int(params, "dense_layers");
    if (dense_layers >= init->n_layer)
        host->log(host->ctx, TSR_LOG_WARN, "dense_layers %lld: the model has %d layers, so every "
                  "layer reads every entry", (long long)dense_layers, (int)init->n_layer);
    quest_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->page = (int32_t)tsr_param_int(params, "page");
    a->k = (int32_t)tsr_param_int(params, "k");
    a->dense_layers = (int32_t)dense_layers;
    a->rows = host->alloc(host->ctx, (size_t)a->page * (size_t)init->head_dim * sizeof(float), 0);
    a->every = host->alloc(host->ctx, (size_t)init->n_head, 0);
    a->chosen_for = host->alloc(host->ctx, (size_t)init->n_head, 0);
    a->chosen.every = a->every;
    if (!a->rows || !a->every || !a->chosen_for) {
        quest_destroy(a);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *out = a;
    return TSR_OK;
}

static const tsr_param_def quest_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "page", .type = TSR_PARAM_INT, .default_value = "16",
     .min = 1, .max = 1024, .unit = "entries", .doc = "entries per page (the paper's 16)"},
    {TSR_SIZED(tsr_param_def), .name = "k", .type = TSR_PARAM_INT, .default_value = "64",
     .min = 3, .max = 1 << 20, .unit = "pages",
     .doc = "pages each query head reads in decode, the newest included (Quest reads 3 or more)"},
    {TSR_SIZED(tsr_param_def), .name = "dense_layers", .type = TSR_PARAM_INT,
     .default_value = "2", .min = 0, .max = 1 << 16, .unit = "layers",
     .doc = "first layers that read every entry (the paper's 2)"},
};

static const tsr_command quest_commands[] = {TSR_SPARSE_READ_COMMANDS};

static const tsr_attention_vtable quest_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = quest_create,
    .destroy = quest_destroy,
    .forward = quest_forward,
    .seq_begin = quest_seq_begin,
    .seq_end = quest_seq_end,
};

static const tsr_plugin_desc quest_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "quest",
    .version = "1.0",
    .description = "Quest: each decode query head reads the k pages of highest q.k bound",
    TSR_PARAMS(quest_params),
    TSR_COMMANDS(quest_commands),
    .vtable = &quest_vtable,
};

TSR_PLUGIN_EXPORT(&quest_desc)
