/*
 * cache 'tova': Token Omission Via Attention (M. Oren, M. Hassid, N. Yarden, Y. Adi,
 * R. Schwartz, "Transformers are Multi-State RNNs", arXiv:2401.06104 (2024); code:
 * schwartz-lab-NLP/TOVA). A transformer with a bounded cache is a multi-state RNN; TOVA keeps
 * its `budget` states by the attention of the current query alone: after each forward, when a
 * layer holds more than `budget` entries, the ones the forward's last query attended to least
 * are dropped (one per decode step once the cache is full; the whole excess after a prompt).
 *
 * The paper (and its code) ranks by the attention averaged over all the heads of the layer,
 * and so drops the same tokens from every head: `scope: layer`, the default (the sum over the
 * KV heads' score_acc, each already summed over its query heads, ranks as that mean). `scope:
 * head` ranks each KV head by its own query heads' attention and keeps different tokens per
 * head. The newest entry competes like any other. Ties drop the lower position first.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

typedef struct tova_cache {
    tsr_kv_heads kh; /* first: sequences, per-head rows with scores, counters */
    int64_t budget;
    int per_head;    /* scope head: each KV head ranks by its own attention */
} tova_cache;

/* The scores are this forward's: only its last query is observed, the earlier sums cleared. */
static tsr_status tova_store(void *self, const tsr_kv_write *w) {
    tova_cache *c = self;
    tsr_kv_seq *seq;
    tsr_status st = tsr_kv_heads_store(&c->kh, w, c->budget, 1, &seq);
    if (st < 0 || w->n == 0) return st;
    for (int32_t h = 0; h < c->kh.n_kv_head; h++) {
        tsr_kv_rows *L = tsr_kv_heads_rows(&c->kh, seq, w->layer, h);
        memset(L->score, 0, (size_t)L->n * sizeof(float));
    }
    return TSR_OK;
}

/* One decision for the whole layer: the heads hold the same positions in the same slots (every
 * store, drop and truncation treats them alike), so the marks made on head 0 fit them all. */
static tsr_status tova_evict_layer(tova_cache *c, tsr_kv_seq *q, int32_t layer, int64_t excess) {
    tsr_kv_heads *kh = &c->kh;
    tsr_kv_rows *first = tsr_kv_heads_rows(kh, q, layer, 0);
    tsr_status st = tsr_kv_heads_scratch(kh, first->n);
    if (st < 0) return st;
    memcpy(kh->key, first->score, (size_t)first->n * sizeof(float));
    for (int32_t h = 1; h < kh->n_kv_head; h++) {
        const float *score = tsr_kv_heads_rows(kh, q, layer, h)->score;
        for (int64_t j = 0; j < first->n; j++) kh->key[j] += score[j];
    }
    int64_t marked = tsr_kv_heads_pick(kh, first, kh->key, INT32_MAX, excess);
    if (marked < 0) return (tsr_status)marked;
    for (int32_t h = 0; h < kh->n_kv_head; h++)
        tsr_kv_heads_drop(kh, tsr_kv_heads_rows(kh, q, layer, h));
    return TSR_OK;
}

static tsr_status tova_evict(tova_cache *c, int64_t seq_id, const char *hook) {
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kh.kv, seq_id, hook);
    if (!q) return TSR_E_INVALID;
    for (int32_t l = 0; l < c->kh.n_layer; l++) {
        /* With scope layer the first head's excess trims them all: the others have none. */
        for (int32_t h = 0; h < c->kh.n_kv_head; h++) {
            tsr_kv_rows *L = tsr_kv_heads_rows(&c->kh, q, l, h);
            int64_t excess = L->n - c->budget;
            if (excess <= 0) continue;
            tsr_status st = c->per_head ? tsr_kv_heads_evict(&c->kh, L, L->score, INT32_MAX, excess)
                                        : tova_evict_layer(c, q, l, excess);
            if (st < 0) return st;
        }
    }
    return TSR_OK;
}

static tsr_status tova_prefill_end(void *self, int64_t seq_id) {
    return tova_evict(self, seq_id, "prefill_end");
}

static tsr_status tova_step_end(void *self, int64_t seq_id) {
    return tova_evict(self, seq_id, "step_end");
}

static tsr_status tova_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    void *self;
    tsr_status st = tsr_kv_heads_create(host, params, init, sizeof(tova_cache), &self);
    if (st < 0) return st;
    tova_cache *c = self;
    c->budget = tsr_param_int(params, "budget");
    c->per_head = tsr_param_int(params, "scope") == 1;
    *out = c;
    return TSR_OK;
}

static const char *const tova_scopes[] = {"layer", "head", NULL};
static const char *const tova_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def tova_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "budget", .type = TSR_PARAM_INT, .default_value = "256",
     .min = 1, .max = 1 << 20, .unit = "entries",
     .doc = "entries each KV head keeps between forwards (the multi-state size)"},
    {TSR_SIZED(tsr_param_def), .name = "scope", .type = TSR_PARAM_ENUM, .default_value = "layer",
     .choices = tova_scopes,
     .doc = "layer: drop the same tokens from every head by their mean attention (the paper); "
            "head: each KV head by its own"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = tova_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_cache_vtable tova_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = tova_create,
    .destroy = tsr_kv_heads_destroy,
    .store = tova_store,
    .prefill_end = tova_prefill_end,
    .step_end = tova_step_end,
    TSR_KV_HEADS_CALLBACKS,
};

static const tsr_plugin_desc tova_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "tova",
    .version = "1.0",
    .description = "TOVA: a fixed budget, dropping the entries the last query attends to least",
    TSR_PARAMS(tova_params),
    .vtable = &tova_vtable,
};

TSR_PLUGIN_EXPORT(&tova_desc)
