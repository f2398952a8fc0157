/*
 * cache 'h2o': Heavy-Hitter Oracle (Z. Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
 * Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048; code:
 * FMInference/H2O). A few tokens, the heavy hitters, receive most of the attention; H2O keeps,
 * for each layer and KV head, the `recent` latest entries and the `heavy` others that
 * accumulated the most attention, and evicts the rest.
 *
 * An entry's score is the attention it received since it was stored, summed over the query
 * heads of its KV head and over every query (the prompt's too): attention adds it to the
 * views' score_acc. prefill_end and step_end evict down to heavy + recent entries per KV head
 * (tsr_kv_heads_keep_heavy), so a forward's queries see those plus the forward's own tokens,
 * as in the paper's code, which evicts after each step's attention. Keys keep their original
 * positions (docs/plugins/cache.md).
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

typedef struct h2o_cache {
    tsr_kv_heads kh; /* first: sequences, per-head rows with scores, counters */
    int64_t heavy, recent;
} h2o_cache;

static tsr_status h2o_store(void *self, const tsr_kv_write *w) {
    h2o_cache *c = self;
    tsr_kv_seq *seq;
    return tsr_kv_heads_store(&c->kh, w, c->heavy + c->recent, INT64_MAX, &seq);
}

static tsr_status h2o_evict(h2o_cache *c, int64_t seq_id, const char *hook) {
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kh.kv, seq_id, hook);
    if (!q) return TSR_E_INVALID;
    return tsr_kv_heads_keep_heavy(&c->kh, q, c->heavy, c->recent);
}

static tsr_status h2o_prefill_end(void *self, int64_t seq_id) {
    return h2o_evict(self, seq_id, "prefill_end");
}

static tsr_status h2o_step_end(void *self, int64_t seq_id) {
    return h2o_evict(self, seq_id, "step_end");
}

static tsr_status h2o_create(const tsr_host *host, const tsr_params *params,
                             const tsr_cache_init *init, void **out) {
    int64_t heavy = tsr_param_int(params, "heavy"), recent = tsr_param_int(params, "recent");
    if (heavy + recent < 1) {
        host->set_error(host->ctx, "heavy %lld, recent %lld: the budget heavy + recent must be "
                        "at least 1 entry", (long long)heavy, (long long)recent);
        return TSR_E_INVALID;
    }
    void *self;
    tsr_status st = tsr_kv_heads_create(host, params, init, sizeof(h2o_cache), &self);
    if (st < 0) return st;
    h2o_cache *c = self;
    c->heavy = heavy;
    c->recent = recent;
    *out = c;
    return TSR_OK;
}

static const char *const h2o_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def h2o_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "heavy", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 0, .max = 1 << 20, .unit = "entries",
     .doc = "entries of each KV head kept for the attention they accumulated (heavy hitters)"},
    {TSR_SIZED(tsr_param_def), .name = "recent", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 0, .max = 1 << 20, .unit = "entries",
     .doc = "latest entries of each KV head kept whatever their attention"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = h2o_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_cache_vtable h2o_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = h2o_create,
    .destroy = tsr_kv_heads_destroy,
    .store = h2o_store,
    .prefill_end = h2o_prefill_end,
    .step_end = h2o_step_end,
    TSR_KV_HEADS_CALLBACKS,
};

static const tsr_plugin_desc h2o_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "h2o",
    .version = "1.0",
    .description = "H2O: per KV head, the recent entries plus the heavy hitters of accumulated "
                   "attention",
    TSR_PARAMS(h2o_params),
    .vtable = &h2o_vtable,
};

TSR_PLUGIN_EXPORT(&h2o_desc)
