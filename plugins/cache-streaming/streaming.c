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
 *
 * With a head file (`heads`, <tessera/sdk_heads.h>, written by `tessera profile-heads`), the
 * DuoAttention split: each KV head of a layer is stored apart, retrieval heads keep every entry
 * and streaming heads the sinks and the window as above, so the memory of streaming heads stays
 * constant while retrieval heads grow with the context. The store then holds one unit of rows
 * per (layer, KV head) instead of one per layer.
 */
#include <stdio.h>
#include <stdlib.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>
#include <tessera/sdk_heads.h>

typedef struct stream_cache {
    tsr_kv_store kv;        /* first: sequences, rows (with arrival stamps), counters. Its
                               layers are units: (layer, unit) is kv layer layer * units + unit */
    int64_t sink, window;
    int32_t n_layer;        /* the model's layers */
    int32_t units;          /* units per layer: 1, or each KV head apart with a head file */
    uint8_t *keep_all;      /* (n_layer, units) 1 for a retrieval head; NULL without a head file */
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

/* A unit that keeps everything grows by doubling; a streaming one is the fixed store of sinks +
 * window + this call, which a long prefill chunk leaves larger and the next, smaller call
 * shrinks back. */
static tsr_status stream_make_room(stream_cache *c, tsr_kv_rows *L, int keep_all, int64_t n) {
    int64_t target = c->sink + c->window + n;
    if (keep_all && L->cap < L->n + n)
        return tsr_kv_rows_resize(&c->kv, L, L->n + n > 2 * L->cap ? L->n + n : 2 * L->cap);
    if (!keep_all && (L->cap < target || L->cap >= 2 * target))
        return tsr_kv_rows_resize(&c->kv, L, target);
    return TSR_OK;
}

static tsr_status stream_store(void *self, const tsr_kv_write *w) {
    stream_cache *c = self;
    const tsr_host *h = c->kv.host;
    tsr_kv_seq *s;
    /* The store's own check knows units, not layers. */
    if (w->layer < 0 || w->layer >= c->n_layer) {
        h->set_error(h->ctx, "store: layer %d outside [0, %d)", (int)w->layer, (int)c->n_layer);
        return TSR_E_RANGE;
    }
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &s);
    if (st < 0) return st;
    for (int64_t t = 0; t < w->n; t++) {
        if (w->pos[t] < 0) {
            h->set_error(h->ctx, "store: sequence %lld layer %d: negative position %d",
                         (long long)w->seq_id, (int)w->layer, (int)w->pos[t]);
            return TSR_E_RANGE;
        }
    }
    for (int32_t u = 0; u < c->units; u++) {
        int32_t unit = w->layer * c->units + u;
        int keep_all = c->keep_all && c->keep_all[unit];
        tsr_kv_rows *L = &s->layers[unit];
        if (!keep_all && (st = stream_evict(c, L, w->layer)) < 0) return st;
        if ((st = stream_make_room(c, L, keep_all, w->n)) < 0) return st;
        if (c->units == 1) {
            tsr_kv_rows_append(&c->kv, s, L, w);
            continue;
        }
        /* One KV head's rows: a write of one token at a time reads them at its start. */
        const size_t hd = (size_t)c->kv.head_dim, row = (size_t)c->units * hd;
        for (int64_t t = 0; t < w->n; t++) {
            tsr_kv_write one = *w;
            one.n = 1;
            one.pos = w->pos + t;
            one.k = w->k + (size_t)t * row + (size_t)u * hd;
            one.v = w->v + (size_t)t * row + (size_t)u * hd;
            tsr_kv_rows_append(&c->kv, s, L, &one);
        }
    }
    return TSR_OK;
}

/* Each KV head's view from its own unit when they are stored apart. */
static tsr_status stream_view(void *self, int64_t id, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    stream_cache *c = self;
    if (layer < 0 || layer >= c->n_layer) {
        c->kv.host->set_error(c->kv.host->ctx, "view: layer %d outside [0, %d)", (int)layer,
                              (int)c->n_layer);
        return TSR_E_RANGE;
    }
    for (int32_t u = 0; u < c->units; u++) {
        tsr_status st = tsr_kv_store_view(self, id, layer * c->units + u, phase,
                                          views + u * c->kv.n_kv_head);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* The store's truncation, whose refusal names a unit; with units apart, named here first. */
static tsr_status stream_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    stream_cache *c = self;
    tsr_kv_seq *q = c->units > 1 ? tsr_kv_store_find(&c->kv, id) : NULL;
    for (int32_t unit = 0; q && n_pos >= 0 && unit < c->kv.n_layer; unit++) {
        if (q->layers[unit].evicted_max_pos < n_pos) continue;
        c->kv.host->set_error(c->kv.host->ctx,
                              "seq_truncate: sequence %lld: layer %d KV head %d already evicted "
                              "position %d >= %d; this policy cannot bring it back",
                              (long long)id, (int)(unit / c->units), (int)(unit % c->units),
                              (int)q->layers[unit].evicted_max_pos, (int)n_pos);
        return TSR_E_UNSUPPORTED;
    }
    return tsr_kv_store_seq_truncate(self, id, n_pos);
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
    for (int32_t l = 0; l < c->n_layer; l++) {
        int64_t n = 0;
        for (int32_t i = 0; i < kv->n_seq_max; i++)
            for (int32_t u = 0; kv->seqs[i].alive && u < c->units; u++)
                n += kv->seqs[i].layers[l * c->units + u].n * kv->n_kv_head;
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
    for (int32_t l = 0; l < c->n_layer; l++) c->layer_evicted[l] = 0;
    c->kv.bytes_peak = c->kv.bytes_reserved;
}

static void stream_destroy(void *self) {
    stream_cache *c = self;
    c->kv.host->free(c->kv.host->ctx, c->sort_scratch);
    c->kv.host->free(c->kv.host->ctx, c->layer_evicted);
    c->kv.host->free(c->kv.host->ctx, c->keep_all);
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
    const char *path = tsr_param_str(params, "heads");
    tsr_heads heads = {0};
    tsr_cache_init units = *init;
    if (path && *path) {
        int has_n_head = init->struct_size >= offsetof(tsr_cache_init, n_head) + sizeof(int32_t);
        if (!has_n_head || init->n_head <= 0 || init->n_kv_head <= 0 ||
            init->n_head % init->n_kv_head != 0) {
            host->set_error(host->ctx, "heads: the host gives no valid query head count "
                            "(n_head), which a head file needs");
            return TSR_E_INVALID;
        }
        tsr_status st = tsr_heads_load(host, path, init->n_layer, init->n_head,
                                       init->n_kv_head, &heads);
        if (st < 0) return st;
        units.n_layer = init->n_layer * init->n_kv_head;
        units.n_kv_head = 1;
    }
    void *self;
    tsr_status st = tsr_kv_store_create(host, params, &units, sizeof(stream_cache), 1, &self);
    if (st < 0) {
        tsr_heads_free(host, &heads);
        return st;
    }
    stream_cache *c = self;
    c->n_layer = init->n_layer;
    c->units = heads.retrieval ? init->n_kv_head : 1;
    c->keep_all = heads.retrieval;
    c->layer_evicted = tsr_calloc(host, (size_t)init->n_layer, sizeof(int64_t));
    if (!c->layer_evicted) {
        stream_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    c->sink = sink;
    c->window = window;
    if (c->keep_all && (heads.sink != sink || heads.window != window))
        host->log(host->ctx, TSR_LOG_WARN,
                  "heads: %s was profiled with sink %d and window %d; streaming heads keep sink "
                  "%lld and window %lld", path, (int)heads.sink, (int)heads.window,
                  (long long)sink, (long long)window);
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
    {TSR_SIZED(tsr_param_def), .name = "heads", .type = TSR_PARAM_STRING, .default_value = "",
     .doc = "head file of tessera profile-heads: its retrieval heads keep every entry; empty: "
            "none does"},
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
    .seq_begin = tsr_kv_store_seq_begin,
    .seq_end = tsr_kv_store_seq_end,
    .seq_fork = tsr_kv_store_seq_fork,
    .seq_truncate = stream_seq_truncate,
    .view = stream_view,
    .stats = tsr_kv_store_stats,
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
