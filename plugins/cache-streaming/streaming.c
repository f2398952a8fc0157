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
#include <tessera/sdk_kv.h>

typedef struct stream_layer {
    int64_t n, cap;          /* entries held, rows reserved per KV head */
    int32_t *pos;            /* (cap) */
    uint64_t *stamp;         /* (cap) arrival number: the oldest entries have the smallest */
    char *k, *v;             /* (n_kv_head, cap, head_dim) in the cache's dtype */
    int32_t evicted_max_pos; /* highest position evicted so far, -1 when none */
} stream_layer;

typedef struct stream_seq {
    int64_t id;
    int alive;
    uint64_t next_stamp;
    stream_layer *layers; /* (n_layer) */
} stream_seq;

typedef struct stream_cache {
    const tsr_host *host;
    int32_t n_layer, n_kv_head, head_dim, n_seq_max;
    int64_t sink, window;
    int32_t dtype;
    size_t row_bytes;
    stream_seq *seqs;        /* (n_seq_max) */
    uint64_t *sort_scratch;  /* (sort_cap) stamps, to find the oldest entries */
    int64_t sort_cap;
    uint64_t bytes_reserved, bytes_peak;
    int64_t entries;
    int64_t evicted;
    int64_t *layer_evicted;  /* (n_layer) rows evicted per layer, all sequences */
} stream_cache;

static uint64_t stream_kv_bytes(const stream_cache *c, int64_t cap) {
    return 2 * (uint64_t)c->n_kv_head * (uint64_t)cap * c->row_bytes;
}

static stream_seq *stream_find(stream_cache *c, int64_t id) {
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive && c->seqs[i].id == id) return &c->seqs[i];
    return NULL;
}

static stream_seq *stream_find_or_fail(stream_cache *c, int64_t id, const char *what) {
    stream_seq *s = stream_find(c, id);
    if (!s) c->host->set_error(c->host->ctx, "%s: unknown sequence %lld", what, (long long)id);
    return s;
}

static void stream_free_arrays(const tsr_host *h, int32_t *pos, uint64_t *stamp, char *k,
                               char *v) {
    h->free(h->ctx, pos);
    h->free(h->ctx, stamp);
    h->free(h->ctx, k);
    h->free(h->ctx, v);
}

/* Moves the layer to `cap` rows per head (cap >= n), keeping its entries. */
static tsr_status stream_layer_resize(stream_cache *c, stream_layer *L, int64_t cap) {
    const tsr_host *h = c->host;
    size_t head_bytes = (size_t)cap * c->row_bytes;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof(int32_t), 0);
    uint64_t *stamp = h->alloc(h->ctx, (size_t)cap * sizeof(uint64_t), 0);
    char *k = h->alloc(h->ctx, (size_t)c->n_kv_head * head_bytes, 0);
    char *v = h->alloc(h->ctx, (size_t)c->n_kv_head * head_bytes, 0);
    if (!pos || !stamp || !k || !v) {
        stream_free_arrays(h, pos, stamp, k, v);
        h->set_error(h->ctx, "out of memory for a store of %lld rows", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (L->n) {
        memcpy(pos, L->pos, (size_t)L->n * sizeof(int32_t));
        memcpy(stamp, L->stamp, (size_t)L->n * sizeof(uint64_t));
        size_t used = (size_t)L->n * c->row_bytes, old_head = (size_t)L->cap * c->row_bytes;
        for (int32_t hd = 0; hd < c->n_kv_head; hd++) {
            memcpy(k + hd * head_bytes, L->k + hd * old_head, used);
            memcpy(v + hd * head_bytes, L->v + hd * old_head, used);
        }
    }
    stream_free_arrays(h, L->pos, L->stamp, L->k, L->v);
    c->bytes_reserved = c->bytes_reserved - stream_kv_bytes(c, L->cap) + stream_kv_bytes(c, cap);
    if (c->bytes_reserved > c->bytes_peak) c->bytes_peak = c->bytes_reserved;
    L->pos = pos;
    L->stamp = stamp;
    L->k = k;
    L->v = v;
    L->cap = cap;
    return TSR_OK;
}

static void stream_layer_free(stream_cache *c, stream_layer *L) {
    stream_free_arrays(c->host, L->pos, L->stamp, L->k, L->v);
    c->bytes_reserved -= stream_kv_bytes(c, L->cap);
    c->entries -= L->n * c->n_kv_head;
    *L = (stream_layer){0};
}

static void stream_copy_entry(const stream_cache *c, stream_layer *L, int64_t to, int64_t from) {
    size_t head_bytes = (size_t)L->cap * c->row_bytes;
    L->pos[to] = L->pos[from];
    L->stamp[to] = L->stamp[from];
    for (int32_t h = 0; h < c->n_kv_head; h++) {
        char *kh = L->k + h * head_bytes, *vh = L->v + h * head_bytes;
        memcpy(kh + (size_t)to * c->row_bytes, kh + (size_t)from * c->row_bytes, c->row_bytes);
        memcpy(vh + (size_t)to * c->row_bytes, vh + (size_t)from * c->row_bytes, c->row_bytes);
    }
}

static int stream_cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Drops the oldest non-sink entries until at most `window` remain. The holes are refilled
 * from the end of the store, so the entries stay in slots [0, n). */
static tsr_status stream_evict(stream_cache *c, stream_layer *L, int32_t layer) {
    int64_t first = L->n < c->sink ? L->n : c->sink;
    int64_t excess = L->n - first - c->window;
    if (excess <= 0) return TSR_OK;
    int64_t m = L->n - first;
    if (m > c->sort_cap) {
        uint64_t *s = c->host->alloc(c->host->ctx, (size_t)m * sizeof(uint64_t), 0);
        if (!s) {
            c->host->set_error(c->host->ctx, "store: out of memory");
            return TSR_E_NOMEM;
        }
        c->host->free(c->host->ctx, c->sort_scratch);
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
        stream_copy_entry(c, L, j, src);
        /* The moved entry now lives at j; mark its old slot as gone for the scan above. */
        L->stamp[src] = 0;
        L->pos[src] = INT32_MIN;
        src--;
    }
    L->n = new_n;
    c->entries -= excess * c->n_kv_head;
    c->evicted += excess * c->n_kv_head;
    c->layer_evicted[layer] += excess * c->n_kv_head;
    return TSR_OK;
}

static void stream_put_row(const stream_cache *c, char *dst, const float *src) {
    if (c->dtype == TSR_DTYPE_F32) {
        memcpy(dst, src, c->row_bytes);
        return;
    }
    for (int32_t d = 0; d < c->head_dim; d++) {
        uint16_t h = tsr_f32_to_f16(src[d]);
        memcpy(dst + 2 * (size_t)d, &h, 2);
    }
}

static tsr_status stream_seq_begin(void *self, int64_t id) {
    stream_cache *c = self;
    if (stream_find(c, id)) {
        c->host->set_error(c->host->ctx, "seq_begin: sequence %lld is already alive",
                           (long long)id);
        return TSR_E_STATE;
    }
    for (int32_t i = 0; i < c->n_seq_max; i++) {
        stream_seq *s = &c->seqs[i];
        if (s->alive) continue;
        s->layers = tsr_calloc(c->host, (size_t)c->n_layer, sizeof(stream_layer));
        if (!s->layers) {
            c->host->set_error(c->host->ctx, "seq_begin: out of memory");
            return TSR_E_NOMEM;
        }
        for (int32_t l = 0; l < c->n_layer; l++) s->layers[l].evicted_max_pos = -1;
        s->id = id;
        s->alive = 1;
        s->next_stamp = 1; /* 0 marks a vacated slot during eviction */
        return TSR_OK;
    }
    c->host->set_error(c->host->ctx, "seq_begin: sequence %lld: all %d sequences (n_seq_max) are "
                       "alive", (long long)id, (int)c->n_seq_max);
    return TSR_E_RANGE;
}

static void stream_seq_free(stream_cache *c, stream_seq *s) {
    for (int32_t l = 0; l < c->n_layer; l++) stream_layer_free(c, &s->layers[l]);
    c->host->free(c->host->ctx, s->layers);
    *s = (stream_seq){0};
}

static void stream_seq_end(void *self, int64_t id) {
    stream_cache *c = self;
    stream_seq *s = stream_find(c, id);
    if (s) stream_seq_free(c, s);
}

static tsr_status stream_seq_fork(void *self, int64_t src, int64_t dst) {
    stream_cache *c = self;
    stream_seq *s = stream_find_or_fail(c, src, "seq_fork");
    if (!s) return TSR_E_INVALID;
    tsr_status st = stream_seq_begin(c, dst);
    if (st < 0) return st;
    stream_seq *d = stream_find(c, dst);
    d->next_stamp = s->next_stamp;
    for (int32_t l = 0; l < c->n_layer; l++) {
        const stream_layer *from = &s->layers[l];
        stream_layer *to = &d->layers[l];
        to->evicted_max_pos = from->evicted_max_pos;
        if (!from->cap) continue;
        st = stream_layer_resize(c, to, from->cap);
        if (st < 0) {
            stream_seq_free(c, d);
            return st;
        }
        memcpy(to->pos, from->pos, (size_t)from->n * sizeof(int32_t));
        memcpy(to->stamp, from->stamp, (size_t)from->n * sizeof(uint64_t));
        size_t bytes = (size_t)c->n_kv_head * (size_t)from->cap * c->row_bytes;
        memcpy(to->k, from->k, bytes);
        memcpy(to->v, from->v, bytes);
        to->n = from->n;
        c->entries += to->n * c->n_kv_head;
    }
    return TSR_OK;
}

static tsr_status stream_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    stream_cache *c = self;
    stream_seq *s = stream_find_or_fail(c, id, "seq_truncate");
    if (!s) return TSR_E_INVALID;
    if (n_pos < 0) {
        c->host->set_error(c->host->ctx, "seq_truncate: sequence %lld: position %d is negative",
                           (long long)id, (int)n_pos);
        return TSR_E_RANGE;
    }
    for (int32_t l = 0; l < c->n_layer; l++) {
        if (s->layers[l].evicted_max_pos >= n_pos) {
            c->host->set_error(c->host->ctx,
                               "seq_truncate: sequence %lld: layer %d already evicted position "
                               "%d >= %d; a streaming cache cannot bring it back",
                               (long long)id, (int)l, (int)s->layers[l].evicted_max_pos,
                               (int)n_pos);
            return TSR_E_UNSUPPORTED;
        }
    }
    for (int32_t l = 0; l < c->n_layer; l++) {
        stream_layer *L = &s->layers[l];
        int64_t kept = 0;
        for (int64_t j = 0; j < L->n; j++) {
            if (L->pos[j] >= n_pos) continue;
            if (kept != j) stream_copy_entry(c, L, kept, j);
            kept++;
        }
        c->entries -= (L->n - kept) * c->n_kv_head;
        L->n = kept;
    }
    return TSR_OK;
}

static tsr_status stream_store(void *self, const tsr_kv_write *w) {
    stream_cache *c = self;
    const tsr_host *h = c->host;
    stream_seq *s = stream_find_or_fail(c, w->seq_id, "store");
    if (!s) return TSR_E_INVALID;
    if (w->layer < 0 || w->layer >= c->n_layer) {
        h->set_error(h->ctx, "store: layer %d outside [0, %d)", (int)w->layer, (int)c->n_layer);
        return TSR_E_RANGE;
    }
    if (w->n < 0 || (w->n > 0 && (!w->pos || !w->k || !w->v))) {
        h->set_error(h->ctx, "store: layer %d: %lld rows without pos, k or v", (int)w->layer,
                     (long long)w->n);
        return TSR_E_INVALID;
    }
    for (int64_t t = 0; t < w->n; t++) {
        if (w->pos[t] < 0) {
            h->set_error(h->ctx, "store: sequence %lld layer %d: negative position %d",
                         (long long)w->seq_id, (int)w->layer, (int)w->pos[t]);
            return TSR_E_RANGE;
        }
    }
    stream_layer *L = &s->layers[w->layer];
    tsr_status st = stream_evict(c, L, w->layer);
    if (st < 0) return st;
    /* The fixed store: sinks + window + this call. A store left larger by a long prefill
     * chunk shrinks back at the next, smaller call. */
    int64_t target = c->sink + c->window + w->n;
    if (L->cap < target || L->cap >= 2 * target) {
        st = stream_layer_resize(c, L, target);
        if (st < 0) return st;
    }
    size_t head_bytes = (size_t)L->cap * c->row_bytes;
    for (int64_t t = 0; t < w->n; t++) {
        L->pos[L->n + t] = w->pos[t];
        L->stamp[L->n + t] = s->next_stamp++;
        for (int32_t hd = 0; hd < c->n_kv_head; hd++) {
            size_t src = ((size_t)t * (size_t)c->n_kv_head + (size_t)hd) * (size_t)c->head_dim;
            size_t dst = hd * head_bytes + (size_t)(L->n + t) * c->row_bytes;
            stream_put_row(c, L->k + dst, w->k + src);
            stream_put_row(c, L->v + dst, w->v + src);
        }
    }
    L->n += w->n;
    c->entries += w->n * c->n_kv_head;
    return TSR_OK;
}

static tsr_status stream_view(void *self, int64_t id, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    stream_cache *c = self;
    stream_seq *s = stream_find_or_fail(c, id, "view");
    if (!s) return TSR_E_INVALID;
    if (layer < 0 || layer >= c->n_layer) {
        c->host->set_error(c->host->ctx, "view: layer %d outside [0, %d)", (int)layer,
                           (int)c->n_layer);
        return TSR_E_RANGE;
    }
    const stream_layer *L = &s->layers[layer];
    size_t head_bytes = (size_t)L->cap * c->row_bytes;
    for (int32_t h = 0; h < c->n_kv_head; h++) {
        views[h] = (tsr_kv_view){
            TSR_SIZED(tsr_kv_view),
            .n = L->n,
            .pos = L->pos,
            .dtype = c->dtype,
            .k = L->k ? L->k + h * head_bytes : NULL,
            .v = L->v ? L->v + h * head_bytes : NULL,
            .k_stride = c->row_bytes,
            .v_stride = c->row_bytes,
        };
    }
    return TSR_OK;
}

static void stream_stats(void *self, tsr_cache_stats *out) {
    const stream_cache *c = self;
    out->bytes_reserved = c->bytes_reserved;
    out->bytes_peak = c->bytes_peak;
    out->entries = c->entries;
    out->evicted = c->evicted;
}

/* Command dump_stats "i(Is)": one line per layer with the rows held (all sequences and KV
 * heads) and evicted since creation or the last reset_counters, then the totals. */
static int32_t stream_dump_stats(void *instance, const char *path) {
    stream_cache *c = instance;
    FILE *f = fopen(path, "w");
    if (!f) {
        c->host->set_error(c->host->ctx, "dump_stats: %s: cannot open for writing", path);
        return TSR_E_IO;
    }
    fprintf(f, "# streaming: sink %lld window %lld\n", (long long)c->sink, (long long)c->window);
    for (int32_t l = 0; l < c->n_layer; l++) {
        int64_t n = 0;
        for (int32_t i = 0; i < c->n_seq_max; i++)
            if (c->seqs[i].alive) n += c->seqs[i].layers[l].n * c->n_kv_head;
        fprintf(f, "layer %d entries %lld evicted %lld\n", (int)l, (long long)n,
                (long long)c->layer_evicted[l]);
    }
    fprintf(f, "entries %lld\nevicted %lld\nbytes_reserved %llu\nbytes_peak %llu\n",
            (long long)c->entries, (long long)c->evicted,
            (unsigned long long)c->bytes_reserved, (unsigned long long)c->bytes_peak);
    if (fclose(f) != 0) {
        c->host->set_error(c->host->ctx, "dump_stats: %s: write failed", path);
        return TSR_E_IO;
    }
    return TSR_OK;
}

/* Command reset_counters "v(I)": evicted counts back to 0, the peak back to what is held. */
static void stream_reset_counters(void *instance) {
    stream_cache *c = instance;
    c->evicted = 0;
    for (int32_t l = 0; l < c->n_layer; l++) c->layer_evicted[l] = 0;
    c->bytes_peak = c->bytes_reserved;
}

static tsr_status stream_create(const tsr_host *host, const tsr_params *params,
                                const tsr_cache_init *init, void **out) {
    if (init->n_layer <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_seq_max <= 0) {
        host->set_error(host->ctx, "shape n_layer %d, n_kv_head %d, head_dim %d, n_seq_max %d: "
                        "expected positive sizes", (int)init->n_layer, (int)init->n_kv_head,
                        (int)init->head_dim, (int)init->n_seq_max);
        return TSR_E_INVALID;
    }
    if (init->backend_name && strcmp(init->backend_name, "cpu") != 0) {
        host->set_error(host->ctx, "backend '%s': this policy keeps K/V in host memory (cpu)",
                        init->backend_name);
        return TSR_E_UNSUPPORTED;
    }
    int64_t sink = tsr_param_int(params, "sink"), window = tsr_param_int(params, "window");
    if (sink < 0 || window < 1) {
        host->set_error(host->ctx, "sink %lld, window %lld: expected sink >= 0 and window >= 1",
                        (long long)sink, (long long)window);
        return TSR_E_INVALID;
    }
    stream_cache *c = tsr_calloc(host, 1, sizeof *c);
    if (c) {
        c->seqs = tsr_calloc(host, (size_t)init->n_seq_max, sizeof(stream_seq));
        c->layer_evicted = tsr_calloc(host, (size_t)init->n_layer, sizeof(int64_t));
    }
    if (!c || !c->seqs || !c->layer_evicted) {
        if (c) {
            host->free(host->ctx, c->seqs);
            host->free(host->ctx, c->layer_evicted);
            host->free(host->ctx, c);
        }
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    c->host = host;
    c->n_layer = init->n_layer;
    c->n_kv_head = init->n_kv_head;
    c->head_dim = init->head_dim;
    c->n_seq_max = init->n_seq_max;
    c->sink = sink;
    c->window = window;
    c->dtype = tsr_param_int(params, "dtype") == 1 ? TSR_DTYPE_F16 : TSR_DTYPE_F32;
    c->row_bytes = (size_t)init->head_dim * (c->dtype == TSR_DTYPE_F16 ? 2 : 4);
    *out = c;
    return TSR_OK;
}

static void stream_destroy(void *self) {
    stream_cache *c = self;
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive) stream_seq_free(c, &c->seqs[i]);
    c->host->free(c->host->ctx, c->sort_scratch);
    c->host->free(c->host->ctx, c->layer_evicted);
    c->host->free(c->host->ctx, c->seqs);
    c->host->free(c->host->ctx, c);
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
    .seq_begin = stream_seq_begin,
    .seq_end = stream_seq_end,
    .seq_fork = stream_seq_fork,
    .seq_truncate = stream_seq_truncate,
    .store = stream_store,
    .view = stream_view,
    .stats = stream_stats,
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
