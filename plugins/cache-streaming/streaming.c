/*
 * cache 'streaming': StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
 * Attention Sinks", arXiv:2309.17453). Keeps the first `sink` entries of a sequence (the
 * attention sinks) and the most recent `window` ones; memory stays constant however long the
 * generation runs.
 *
 * Each (sequence, layer) owns one fixed store of sink + window + room rows per KV head, where
 * room is the size of the current store call. A store first evicts the oldest non-sink entries
 * beyond the window, then appends: between two calls the store holds the sinks, `window` older
 * entries and the entries of the last call, so every query of a call sees at least `window`
 * recent entries and a prefill chunk longer than the window still attends to all of itself.
 *
 * Slots [0, sink) hold the sinks for good; an evicted slot is refilled with the entry from the
 * end of the store, so an eviction copies one row instead of shifting the window. Views are
 * therefore not in position order, which the ABI allows. Keys keep their original positions
 * (RoPE applied by the host); see docs/plugins/cache.md for what that implies.
 */
#include <stdio.h>
#include <stdlib.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

typedef struct stream_cache {
    tsr_kv_store kv;        /* first: sequences, rows (with arrival stamps), counters */
    int64_t sink, window;
    uint64_t *sort_scratch; /* (sort_cap) stamps, to find the oldest entries */
    int64_t sort_cap;
    int64_t *layer_evicted; /* (n_layer) rows evicted per layer, all sequences */
} stream_cache;

static int stream_cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Drops the oldest non-sink entries until at most `window` remain. The holes are refilled
 * from the end of the store, so the entries stay in slots [0, n). */
static tsr_status stream_evict(stream_cache *c, tsr_kv_rows *L, int32_t layer) {
    tsr_kv_store *kv = &c->kv;
    int64_t first = L->n < c->sink ? L->n : c->sink;
    int64_t excess = L->n - first - c->window;
    if (excess <= 0) return TSR_OK;
    int64_t m = L->n - first;
    if (m > c->sort_cap) {
        uint64_t *s = kv->host->alloc(kv->host->ctx, (size_t)m * sizeof(uint64_t), 0);
        if (!s) {
            kv->host->set_error(kv->host->ctx, "store: out of memory");
            return TSR_E_NOMEM;
        }
        kv->host->free(kv->host->ctx, c->sort_scratch);
        c->sort_scratch = s;
        c->sort_cap = m;
    }
    memcpy(c->sort_scratch, L->stamp + first, (size_t)m * sizeof(uint64_t));
    qsort(c->sort_scratch, (size_t)m, sizeof(uint64_t), stream_cmp_u64);
    uint64_t newest_evicted = c->sort_scratch[excess - 1]; /* stamps are unique */

    int64_t new_n = L->n - excess;
    int64_t src = L->n - 1;
    for (int64_t j = first; j < L->n; j++) {
        if (L->stamp[j] > newest_evicted) continue;
        if (L->pos[j] > L->evicted_max_pos) L->evicted_max_pos = L->pos[j];
        if (j >= new_n) continue; /* beyond the new end: nothing to refill */
        while (L->stamp[src] <= newest_evicted) src--;
        tsr_kv_rows_move(kv, L, j, src);
        /* The moved entry now lives at j; mark its old slot as gone for the scan above. */
        L->stamp[src] = 0;
        L->pos[src] = INT32_MIN;
        src--;
    }
    L->n = new_n;
    kv->entries -= excess * kv->n_kv_head;
    kv->evicted += excess * kv->n_kv_head;
    c->layer_evicted[layer] += excess * kv->n_kv_head;
    return TSR_OK;
}

static tsr_status stream_store(void *self, const tsr_kv_write *w) {
    stream_cache *c = self;
    const tsr_host *h = c->kv.host;
    tsr_kv_seq *s;
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &s);
    if (st < 0) return st;
    for (int64_t t = 0; t < w->n; t++) {
        if (w->pos[t] < 0) {
            h->set_error(h->ctx, "store: sequence %lld layer %d: negative position %d",
                         (long long)w->seq_id, (int)w->layer, (int)w->pos[t]);
            return TSR_E_RANGE;
        }
    }
    tsr_kv_rows *L = &s->layers[w->layer];
    st = stream_evict(c, L, w->layer);
    if (st < 0) return st;
    /* The fixed store: sinks + window + this call. A store left larger by a long prefill
     * chunk shrinks back at the next, smaller call. */
    int64_t target = c->sink + c->window + w->n;
    if (L->cap < target || L->cap >= 2 * target) {
        st = tsr_kv_rows_resize(&c->kv, L, target);
        if (st < 0) return st;
    }
    tsr_kv_rows_append(&c->kv, s, L, w);
    return TSR_OK;
}

/* Command dump_stats "i(Is)": one line per layer with the rows held (all sequences and KV
 * heads) and evicted since creation or the last reset_counters, then the totals. */
static int32_t stream_dump_stats(void *instance, const char *path) {
    stream_cache *c = instance;
    const tsr_kv_store *kv = &c->kv;
    FILE *f = fopen(path, "w");
    if (!f) {
        kv->host->set_error(kv->host->ctx, "dump_stats: %s: cannot open for writing", path);
        return TSR_E_IO;
    }
    fprintf(f, "# streaming: sink %lld window %lld\n", (long long)c->sink, (long long)c->window);
    for (int32_t l = 0; l < kv->n_layer; l++) {
        int64_t n = 0;
        for (int32_t i = 0; i < kv->n_seq_max; i++)
            if (kv->seqs[i].alive) n += kv->seqs[i].layers[l].n * kv->n_kv_head;
        fprintf(f, "layer %d entries %lld evicted %lld\n", (int)l, (long long)n,
                (long long)c->layer_evicted[l]);
    }
    fprintf(f, "entries %lld\nevicted %lld\nbytes_reserved %llu\nbytes_peak %llu\n",
            (long long)kv->entries, (long long)kv->evicted,
            (unsigned long long)kv->bytes_reserved, (unsigned long long)kv->bytes_peak);
    if (fclose(f) != 0) {
        kv->host->set_error(kv->host->ctx, "dump_stats: %s: write failed", path);
        return TSR_E_IO;
    }
    return TSR_OK;
}

/* Command reset_counters "v(I)": evicted counts back to 0, the peak back to what is held. */
static void stream_reset_counters(void *instance) {
    stream_cache *c = instance;
    c->kv.evicted = 0;
    for (int32_t l = 0; l < c->kv.n_layer; l++) c->layer_evicted[l] = 0;
    c->kv.bytes_peak = c->kv.bytes_reserved;
}

static void stream_destroy(void *self) {
    stream_cache *c = self;
    c->kv.host->free(c->kv.host->ctx, c->sort_scratch);
    c->kv.host->free(c->kv.host->ctx, c->layer_evicted);
    tsr_kv_store_destroy(c);
}

static tsr_status stream_create(const tsr_host *host, const tsr_params *params,
                                const tsr_cache_init *init, void **out) {
    int64_t sink = tsr_param_int(params, "sink"), window = tsr_param_int(params, "window");
    if (sink < 0 || window < 1) {
        host->set_error(host->ctx, "sink %lld, window %lld: expected sink >= 0 and window >= 1",
                        (long long)sink, (long long)window);
        return TSR_E_INVALID;
    }
    void *self;
    tsr_status st = tsr_kv_store_create(host, params, init, sizeof(stream_cache), 1, &self);
    if (st < 0) return st;
    stream_cache *c = self;
    c->layer_evicted = tsr_calloc(host, (size_t)init->n_layer, sizeof(int64_t));
    if (!c->layer_evicted) {
        stream_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    c->sink = sink;
    c->window = window;
    *out = c;
    return TSR_OK;
}

static const char *const stream_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def stream_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "sink", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 0, .max = 1 << 20, .unit = "tokens",
     .doc = "first entries of a sequence kept for good (attention sinks)"},
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "252",
     .min = 1, .max = 1 << 20, .unit = "tokens",
     .doc = "most recent entries kept besides the sinks"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = stream_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_command stream_commands[] = {
    {TSR_SIZED(tsr_command), .name = "dump_stats", .signature = "i(Is)",
     .fn = (void (*)(void))stream_dump_stats, .returns_status = 1,
     .doc = "dump_stats(path): writes per-layer entries and evicted rows, then totals, to path"},
    {TSR_SIZED(tsr_command), .name = "reset_counters", .signature = "v(I)",
     .fn = (void (*)(void))stream_reset_counters,
     .doc = "reset_counters(): evicted counts to 0 and the memory peak to the current size"},
};

static const tsr_cache_vtable stream_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = stream_create,
    .destroy = stream_destroy,
    .store = stream_store,
    TSR_KV_STORE_CALLBACKS,
};

static const tsr_plugin_desc stream_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "streaming",
    .version = "1.0",
    .description = "StreamingLLM: attention sinks plus a window of recent entries, constant memory",
    TSR_PARAMS(stream_params),
    TSR_COMMANDS(stream_commands),
    .vtable = &stream_vtable,
};

TSR_PLUGIN_EXPORT(&stream_desc)
