/*
 * cache 'snapkv': SnapKV (Y. Li, Y. Huang, B. Yang, B. Venkitesh, A. Locatelli, H. Ye, T. Cai,
 * P. Lewis, D. Chen, "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS
 * 2024, arXiv:2404.14469; code: FasterDecoding/SnapKV), with PyramidKV's per-layer budgets as
 * an option (Z. Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
 * Information Funneling", arXiv:2406.02069; code: Zefan-Cai/PyramidKV).
 *
 * Each head attends to a stable set of prompt positions, which the prompt's last queries (the
 * observation window) already show. Once, at the end of the prompt, a KV head of a prompt
 * longer than `budget` keeps its last `window` entries and the budget - window before them
 * with the most pooled votes, where an entry's vote is the attention the window's queries gave
 * it (score_acc, summed over the KV head's query heads), pooled along the positions with a
 * `kernel` wide average or maximum so that neighbours of a voted entry come along. Generated
 * tokens are then all kept.
 *
 * With `pyramid: true`, layer l keeps hi - l * step entries before the window instead of
 * budget - window, the PyramidKV schedule as its code computes it (snap_prefix_keep).
 *
 * The compression happens in prefill_end, after the sequence's first forward: a prompt fed in
 * several chunks is judged on its first. Keys keep their original positions.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

typedef struct snap_cache {
    tsr_kv_heads kh; /* first: sequences, per-head rows with scores, counters */
    int64_t budget, window, kernel, beta;
    int max_pool, pyramid;
} snap_cache;

/* The prompt's views ask attention for the votes of its last `window` queries. */
static tsr_status snap_store(void *self, const tsr_kv_write *w) {
    snap_cache *c = self;
    tsr_kv_seq *seq;
    return tsr_kv_heads_store(&c->kh, w, 0, w->phase == TSR_PHASE_PREFILL ? c->window : 0, &seq);
}

/* Entries a layer keeps before the window when the prompt holds n > budget. Uniformly
 * k = budget - window; with pyramid, PyramidKV's arithmetic schedule from hi in layer 0 down
 * by a whole step per layer towards lo = k / beta in the last, hi = 2k - lo, so that the layers
 * keep k on average (more by ((hi - lo) mod (n_layer - 1)) / 2, the step being whole). hi is
 * capped at the n - window entries there are, lo raised to match; as in its code, a prompt
 * shorter than 2k keeps k in every layer. */
static int64_t snap_prefix_keep(const snap_cache *c, int64_t n, int32_t layer) {
    int64_t k = c->budget - c->window, n_layer = c->kh.n_layer;
    if (!c->pyramid || n < 2 * k || n_layer == 1) return k;
    int64_t lo = k / c->beta, hi = 2 * k - lo;
    if (hi >= n - c->window) {
        hi = n - c->window;
        lo = 2 * k - hi;
    }
    return hi - layer * ((hi - lo) / (n_layer - 1));
}

/* Each entry's pooled vote into kh->key, for the entries before `prefix` (the window's first
 * position): the mean of the votes at positions p - kernel/2 .. p + kernel/2, those outside
 * [0, prefix) counting as 0 and the sum always divided by the kernel (avg_pool1d with zero
 * padding), or their maximum (max_pool1d: outside does not count). The window's own votes
 * never count: SnapKV pools the prefix alone. At the end of the prompt the rows hold positions
 * 0..n-1, one entry each. */
static tsr_status snap_pool(snap_cache *c, const tsr_kv_rows *L, int32_t prefix) {
    tsr_kv_heads *kh = &c->kh;
    tsr_status st = tsr_kv_heads_scratch(kh, L->next_pos);
    if (st < 0) return st;
    float *vote = kh->aux; /* (next_pos) by position */
    memset(vote, 0, (size_t)L->next_pos * sizeof(float));
    for (int64_t j = 0; j < L->n; j++) vote[L->pos[j]] = L->score[j];
    int32_t half = (int32_t)(c->kernel / 2);
    for (int64_t j = 0; j < L->n; j++) {
        int32_t p = L->pos[j];
        if (p >= prefix) continue;
        int32_t lo = p - half > 0 ? p - half : 0, hi = p + half < prefix ? p + half : prefix - 1;
        float pooled = vote[lo];
        for (int32_t i = lo + 1; i <= hi; i++) {
            if (c->max_pool) pooled = vote[i] > pooled ? vote[i] : pooled;
            else pooled += vote[i];
        }
        kh->key[j] = c->max_pool ? pooled : pooled / (float)c->kernel;
    }
    return TSR_OK;
}

static tsr_status snap_prefill_end(void *self, int64_t seq_id) {
    snap_cache *c = self;
    tsr_kv_heads *kh = &c->kh;
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&kh->kv, seq_id, "prefill_end");
    if (!q) return TSR_E_INVALID;
    for (int32_t i = 0; i < kh->kv.n_layer; i++) {
        tsr_kv_rows *L = &q->layers[i];
        if (L->n <= c->budget) continue;
        int32_t prefix = L->next_pos - (int32_t)c->window;
        int64_t keep = snap_prefix_keep(c, L->n, i / kh->n_kv_head);
        tsr_status st = snap_pool(c, L, prefix);
        if (st < 0 || (st = tsr_kv_heads_evict(kh, L, kh->key, prefix,
                                               L->n - c->window - keep)) < 0)
            return st;
        /* Generated tokens grow the rows again from what the prompt left, by doubling. */
        if ((st = tsr_kv_rows_resize(&kh->kv, L, L->n)) < 0) return st;
    }
    return TSR_OK;
}

static tsr_status snap_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    int64_t budget = tsr_param_int(params, "budget"), window = tsr_param_int(params, "window");
    int64_t kernel = tsr_param_int(params, "kernel");
    if (window >= budget) {
        host->set_error(host->ctx, "window %lld, budget %lld: the window must be smaller than "
                        "the budget, which holds it and the entries chosen before it",
                        (long long)window, (long long)budget);
        return TSR_E_INVALID;
    }
    if (kernel % 2 == 0) {
        host->set_error(host->ctx, "kernel %lld: expected an odd size, centred on each position",
                        (long long)kernel);
        return TSR_E_INVALID;
    }
    void *self;
    tsr_status st = tsr_kv_heads_create(host, params, init, sizeof(snap_cache), &self);
    if (st < 0) return st;
    snap_cache *c = self;
    c->budget = budget;
    c->window = window;
    c->kernel = kernel;
    c->beta = tsr_param_int(params, "beta");
    c->max_pool = tsr_param_int(params, "pooling") == 1;
    c->pyramid = tsr_param_bool(params, "pyramid");
    *out = c;
    return TSR_OK;
}

static const char *const snap_poolings[] = {"avg", "max", NULL};
static const char *const snap_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def snap_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "budget", .type = TSR_PARAM_INT, .default_value = "1024",
     .min = 2, .max = 1 << 20, .unit = "entries",
     .doc = "entries each KV head keeps of a longer prompt: the window and the most voted "
            "before it"},
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "32",
     .min = 1, .max = 1 << 20, .unit = "tokens",
     .doc = "the prompt's last tokens, whose queries vote and which are kept (below budget)"},
    {TSR_SIZED(tsr_param_def), .name = "kernel", .type = TSR_PARAM_INT, .default_value = "5",
     .min = 1, .max = 255, .unit = "positions",
     .doc = "width of the pooling of the votes along the positions (odd; 1: no pooling)"},
    {TSR_SIZED(tsr_param_def), .name = "pooling", .type = TSR_PARAM_ENUM, .default_value = "avg",
     .choices = snap_poolings, .doc = "pooling of the votes: avg (the mean) or max"},
    {TSR_SIZED(tsr_param_def), .name = "pyramid", .type = TSR_PARAM_BOOL, .default_value = "false",
     .doc = "PyramidKV: more entries in lower layers, fewer in upper ones, about the same on "
            "average"},
    {TSR_SIZED(tsr_param_def), .name = "beta", .type = TSR_PARAM_INT, .default_value = "20",
     .min = 1, .max = 1 << 20,
     .doc = "with pyramid: the last layer keeps (budget - window) / beta entries before the "
            "window"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = snap_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_cache_vtable snap_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = snap_create,
    .destroy = tsr_kv_heads_destroy,
    .store = snap_store,
    .prefill_end = snap_prefill_end,
    TSR_KV_HEADS_CALLBACKS,
};

static const tsr_plugin_desc snap_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "snapkv",
    .version = "1.0",
    .description = "SnapKV: at the end of the prompt, per KV head the window plus the entries "
                   "its queries voted for (PyramidKV budgets optional)",
    TSR_PARAMS(snap_params),
    .vtable = &snap_vtable,
};

TSR_PLUGIN_EXPORT(&snap_desc)
