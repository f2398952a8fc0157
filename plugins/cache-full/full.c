/*
 * cache 'full': keeps every K/V row. Per sequence, per layer, per KV head the rows are
 * contiguous in the chosen dtype (f32, or f16 to halve the memory); the rows of a layer grow
 * by doubling, from FULL_MIN_ROWS up to n_ctx, so memory follows the sequence's length rather
 * than n_ctx. The positions are kept once per layer (every head holds the same entries).
 * Sequences, row storage and counters are <tessera/sdk_cache.h>'s; this file is the policy.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

#define FULL_MIN_ROWS 16

static tsr_status full_store(void *self, const tsr_kv_write *w) {
    tsr_kv_store *c = self;
    tsr_kv_seq *s;
    tsr_status st = tsr_kv_store_check_write(c, w, &s);
    if (st < 0) return st;
    tsr_kv_rows *L = &s->layers[w->layer];
    if ((st = tsr_kv_store_check_ctx(c, w, L->n)) < 0 ||
        (st = tsr_kv_rows_fit(c, L, L->n + w->n, FULL_MIN_ROWS, 0)) < 0)
        return st;
    tsr_kv_rows_append(c, s, L, w);
    return TSR_OK;
}

static tsr_status full_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    tsr_status st = tsr_kv_store_need_ctx(host, init);
    return st < 0 ? st : tsr_kv_store_create(host, params, init, sizeof(tsr_kv_store), 0, out);
}

static const char *const full_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def full_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = full_dtypes,
     .doc = "storage of K/V rows: f32, or f16 (IEEE half, half the memory)"},
};

static const tsr_cache_vtable full_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = full_create,
    .destroy = tsr_kv_store_destroy,
    .store = full_store,
    TSR_KV_STORE_CALLBACKS,
};

static const tsr_plugin_desc full_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "full",
    .version = "1.0",
    .description = "keeps every K/V row, per sequence, layer and KV head, growing by doubling",
    TSR_PARAMS(full_params),
    .vtable = &full_vtable,
};

TSR_PLUGIN_EXPORT(&full_desc)
