/*
 * cache 'a2sf': H2O with a forgetting factor (H. Jo, D. Shin, "A2SF: Accumulative Attention
 * Scoring with Forgetting Factor for Token Pruning in Transformer Decoder", arXiv:2407.20485;
 * code: Dirac-Notation/A2SF). Under the causal mask an early token is scored by more queries
 * than a late one, so H2O's plain sums favour age; A2SF scores entry k after query n as
 *
 *   A(n, k) = sum over q <= n of factor^(n - q) * S(q, k)
 *
 * (S: the attention query q gives k), that is A <- factor * A + S at each step, and keeps, as
 * H2O does, the `recent` latest entries and the `heavy` other ones of highest score per KV head.
 *
 * After every forward the scores are multiplied by `factor`, so a decode step of one token
 * follows the recurrence exactly. Attention adds a forward's probabilities with weight 1 for
 * every query it observes, so a forward of several tokens (the prompt) cannot weigh its queries
 * by factor^(n - q): its last w = round(1 / (1 - factor)) queries count, with weight 1 (the
 * weights factor^0 + factor^1 + ... sum to the same 1 / (1 - factor)), and the earlier ones not.
 * factor 1 is H2O (every query counts, nothing is forgotten); factor 0 scores by the last
 * query alone, as TOVA does (per KV head, recent entries protected).
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

typedef struct a2sf_cache {
    tsr_kv_heads kh; /* first: sequences, per-head rows with scores, counters */
    int64_t heavy, recent;
    int64_t observe; /* the last queries of a forward that score (INT64_MAX: all) */
    float factor;
} a2sf_cache;

static tsr_status a2sf_store(void *self, const tsr_kv_write *w) {
    a2sf_cache *c = self;
    tsr_kv_seq *seq;
    return tsr_kv_heads_store(&c->kh, w, c->heavy + c->recent, c->observe, &seq);
}

/* Evicts by the scores of this forward, then forgets: what the next forward adds counts once,
 * what was there before it `factor` times less. */
static tsr_status a2sf_evict(a2sf_cache *c, int64_t seq_id, const char *hook) {
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kh.kv, seq_id, hook);
    if (!q) return TSR_E_INVALID;
    tsr_status st = tsr_kv_heads_keep_heavy(&c->kh, q, c->heavy, c->recent);
    if (st < 0 || c->factor == 1.0f) return st;
    for (int32_t i = 0; i < c->kh.kv.n_layer; i++) {
        tsr_kv_rows *L = &q->layers[i];
        for (int64_t j = 0; j < L->n; j++) L->score[j] *= c->factor;
    }
    return TSR_OK;
}

static tsr_status a2sf_prefill_end(void *self, int64_t seq_id) {
    return a2sf_evict(self, seq_id, "prefill_end");
}

static tsr_status a2sf_step_end(void *self, int64_t seq_id) {
    return a2sf_evict(self, seq_id, "step_end");
}

static tsr_status a2sf_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    int64_t heavy = tsr_param_int(params, "heavy"), recent = tsr_param_int(params, "recent");
    double factor = tsr_param_float(params, "factor");
    if (heavy + recent < 1) {
        host->set_error(host->ctx, "heavy %lld, recent %lld: the budget heavy + recent must be "
                        "at least 1 entry", (long long)heavy, (long long)recent);
        return TSR_E_INVALID;
    }
    void *self;
    tsr_status st = tsr_kv_heads_create(host, params, init, sizeof(a2sf_cache), &self);
    if (st < 0) return st;
    a2sf_cache *c = self;
    c->heavy = heavy;
    c->recent = recent;
    c->factor = (float)factor;
    c->observe = c->factor >= 1.0f ? INT64_MAX
                                   : (int64_t)(1.0 / (1.0 - (double)c->factor) + 0.5);
    *out = c;
    return TSR_OK;
}

static const char *const a2sf_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def a2sf_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "heavy", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 0, .max = 1 << 20, .unit = "entries",
     .doc = "entries of each KV head kept for their score (attention with forgetting)"},
    {TSR_SIZED(tsr_param_def), .name = "recent", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 0, .max = 1 << 20, .unit = "entries",
     .doc = "latest entries of each KV head kept whatever their score"},
    {TSR_SIZED(tsr_param_def), .name = "factor", .type = TSR_PARAM_FLOAT, .default_value = "0.99",
     .min = 0, .max = 1,
     .doc = "forgetting factor: scores are multiplied by it after each forward (1: H2O)"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = a2sf_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_cache_vtable a2sf_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = a2sf_create,
    .destroy = tsr_kv_heads_destroy,
    .store = a2sf_store,
    .prefill_end = a2sf_prefill_end,
    .step_end = a2sf_step_end,
    TSR_KV_HEADS_CALLBACKS,
};

static const tsr_plugin_desc a2sf_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "a2sf",
    .version = "1.0",
    .description = "A2SF: H2O whose accumulated attention is multiplied by a forgetting factor "
                   "each step",
    TSR_PARAMS(a2sf_params),
    .vtable = &a2sf_vtable,
};

TSR_PLUGIN_EXPORT(&a2sf_desc)
