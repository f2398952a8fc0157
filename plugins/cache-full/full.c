/*
 * cache 'full': keeps every K/V row. Per sequence, per layer, per KV head the rows are
 * contiguous in the chosen dtype (f32, or f16 to halve the memory); the rows of a layer grow
 * by doubling, from FULL_MIN_ROWS up to n_ctx, so memory follows the sequence's length rather
 * than n_ctx. The positions are kept once per layer (every head holds the same entries).
 */
#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

#define FULL_MIN_ROWS 16

typedef struct full_layer {
    int64_t n, cap;  /* entries held, rows reserved per KV head */
    int32_t *pos;    /* (cap) */
    char *k, *v;     /* (n_kv_head, cap, head_dim) in the cache's dtype */
} full_layer;

typedef struct full_seq {
    int64_t id;
    int alive;
    full_layer *layers; /* (n_layer) */
} full_seq;

typedef struct full_cache {
    const tsr_host *host;
    int32_t n_layer, n_kv_head, head_dim, n_ctx, n_seq_max;
    int32_t dtype;    /* TSR_DTYPE_F32 or TSR_DTYPE_F16 */
    size_t row_bytes; /* one head's row of head_dim elements */
    full_seq *seqs;   /* (n_seq_max) slots */
    uint64_t bytes_reserved, bytes_peak;
    int64_t entries;  /* rows held, all sequences, layers and heads */
} full_cache;

static uint64_t full_kv_bytes(const full_cache *c, int64_t cap) {
    return 2 * (uint64_t)c->n_kv_head * (uint64_t)cap * c->row_bytes;
}

static void full_account(full_cache *c, int64_t old_cap, int64_t new_cap) {
    c->bytes_reserved = c->bytes_reserved - full_kv_bytes(c, old_cap) + full_kv_bytes(c, new_cap);
    if (c->bytes_reserved > c->bytes_peak) c->bytes_peak = c->bytes_reserved;
}

static full_seq *full_find(full_cache *c, int64_t id) {
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive && c->seqs[i].id == id) return &c->seqs[i];
    return NULL;
}

static full_seq *full_find_or_fail(full_cache *c, int64_t id, const char *what) {
    full_seq *s = full_find(c, id);
    if (!s) c->host->set_error(c->host->ctx, "%s: unknown sequence %lld", what, (long long)id);
    return s;
}

static void full_layer_free(full_cache *c, full_layer *L) {
    const tsr_host *h = c->host;
    full_account(c, L->cap, 0);
    c->entries -= L->n * c->n_kv_head;
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->k);
    h->free(h->ctx, L->v);
    *L = (full_layer){0};
}

/* Moves the layer to `cap` rows per head, keeping its n entries. */
static tsr_status full_layer_resize(full_cache *c, full_layer *L, int64_t cap) {
    const tsr_host *h = c->host;
    size_t head_bytes = (size_t)cap * c->row_bytes;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof(int32_t), 0);
    char *k = h->alloc(h->ctx, (size_t)c->n_kv_head * head_bytes, 0);
    char *v = h->alloc(h->ctx, (size_t)c->n_kv_head * head_bytes, 0);
    if (!pos || !k || !v) {
        h->free(h->ctx, pos);
        h->free(h->ctx, k);
        h->free(h->ctx, v);
        h->set_error(h->ctx, "out of memory growing a layer to %lld rows", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (L->n) {
        memcpy(pos, L->pos, (size_t)L->n * sizeof(int32_t));
        size_t used = (size_t)L->n * c->row_bytes, old_head = (size_t)L->cap * c->row_bytes;
        for (int32_t hd = 0; hd < c->n_kv_head; hd++) {
            memcpy(k + hd * head_bytes, L->k + hd * old_head, used);
            memcpy(v + hd * head_bytes, L->v + hd * old_head, used);
        }
    }
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->k);
    h->free(h->ctx, L->v);
    full_account(c, L->cap, cap);
    L->pos = pos;
    L->k = k;
    L->v = v;
    L->cap = cap;
    return TSR_OK;
}

static void full_put_row(const full_cache *c, char *dst, const float *src) {
    if (c->dtype == TSR_DTYPE_F32) {
        memcpy(dst, src, c->row_bytes);
        return;
    }
    for (int32_t d = 0; d < c->head_dim; d++) {
        uint16_t h = tsr_f32_to_f16(src[d]);
        memcpy(dst + 2 * (size_t)d, &h, 2);
    }
}

static tsr_status full_seq_begin(void *self, int64_t id) {
    full_cache *c = self;
    if (full_find(c, id)) {
        c->host->set_error(c->host->ctx, "seq_begin: sequence %lld is already alive",
                           (long long)id);
        return TSR_E_STATE;
    }
    for (int32_t i = 0; i < c->n_seq_max; i++) {
        full_seq *s = &c->seqs[i];
        if (s->alive) continue;
        s->layers = tsr_calloc(c->host, (size_t)c->n_layer, sizeof(full_layer));
        if (!s->layers) {
            c->host->set_error(c->host->ctx, "seq_begin: out of memory");
            return TSR_E_NOMEM;
        }
        s->id = id;
        s->alive = 1;
        return TSR_OK;
    }
    c->host->set_error(c->host->ctx, "seq_begin: sequence %lld: all %d sequences (n_seq_max) are "
                       "alive", (long long)id, (int)c->n_seq_max);
    return TSR_E_RANGE;
}

static void full_seq_free(full_cache *c, full_seq *s) {
    for (int32_t l = 0; l < c->n_layer; l++) full_layer_free(c, &s->layers[l]);
    c->host->free(c->host->ctx, s->layers);
    *s = (full_seq){0};
}

static void full_seq_end(void *self, int64_t id) {
    full_cache *c = self;
    full_seq *s = full_find(c, id);
    if (s) full_seq_free(c, s);
}

static tsr_status full_seq_fork(void *self, int64_t src, int64_t dst) {
    full_cache *c = self;
    full_seq *s = full_find_or_fail(c, src, "seq_fork");
    if (!s) return TSR_E_INVALID;
    tsr_status st = full_seq_begin(c, dst);
    if (st < 0) return st;
    full_seq *d = full_find(c, dst);
    for (int32_t l = 0; l < c->n_layer; l++) {
        const full_layer *from = &s->layers[l];
        full_layer *to = &d->layers[l];
        if (!from->cap) continue;
        st = full_layer_resize(c, to, from->cap);
        if (st < 0) {
            full_seq_free(c, d);
            return st;
        }
        memcpy(to->pos, from->pos, (size_t)from->n * sizeof(int32_t));
        size_t bytes = (size_t)c->n_kv_head * (size_t)from->cap * c->row_bytes;
        memcpy(to->k, from->k, bytes);
        memcpy(to->v, from->v, bytes);
        to->n = from->n;
        c->entries += to->n * c->n_kv_head;
    }
    return TSR_OK;
}

static tsr_status full_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    full_cache *c = self;
    full_seq *s = full_find_or_fail(c, id, "seq_truncate");
    if (!s) return TSR_E_INVALID;
    if (n_pos < 0) {
        c->host->set_error(c->host->ctx, "seq_truncate: sequence %lld: position %d is negative",
                           (long long)id, (int)n_pos);
        return TSR_E_RANGE;
    }
    for (int32_t l = 0; l < c->n_layer; l++) {
        full_layer *L = &s->layers[l];
        size_t head_bytes = (size_t)L->cap * c->row_bytes;
        int64_t kept = 0;
        for (int64_t j = 0; j < L->n; j++) {
            if (L->pos[j] >= n_pos) continue;
            if (kept != j) {
                L->pos[kept] = L->pos[j];
                for (int32_t h = 0; h < c->n_kv_head; h++) {
                    char *kh = L->k + h * head_bytes, *vh = L->v + h * head_bytes;
                    memcpy(kh + kept * c->row_bytes, kh + j * c->row_bytes, c->row_bytes);
                    memcpy(vh + kept * c->row_bytes, vh + j * c->row_bytes, c->row_bytes);
                }
            }
            kept++;
        }
        c->entries -= (L->n - kept) * c->n_kv_head;
        L->n = kept;
    }
    return TSR_OK;
}

static tsr_status full_store(void *self, const tsr_kv_write *w) {
    full_cache *c = self;
    const tsr_host *h = c->host;
    full_seq *s = full_find_or_fail(c, w->seq_id, "store");
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
    full_layer *L = &s->layers[w->layer];
    for (int64_t t = 0; t < w->n; t++) {
        if (w->pos[t] < 0 || w->pos[t] >= c->n_ctx) {
            h->set_error(h->ctx, "store: sequence %lld layer %d: position %d outside [0, %d) "
                         "(n_ctx)", (long long)w->seq_id, (int)w->layer, (int)w->pos[t],
                         (int)c->n_ctx);
            return TSR_E_RANGE;
        }
    }
    if (L->n + w->n > c->n_ctx) {
        h->set_error(h->ctx, "store: sequence %lld layer %d: %lld + %lld entries exceed n_ctx %d",
                     (long long)w->seq_id, (int)w->layer, (long long)L->n, (long long)w->n,
                     (int)c->n_ctx);
        return TSR_E_RANGE;
    }
    if (L->n + w->n > L->cap) {
        int64_t cap = L->cap ? L->cap : FULL_MIN_ROWS;
        while (cap < L->n + w->n) cap *= 2;
        if (cap > c->n_ctx) cap = c->n_ctx;
        tsr_status st = full_layer_resize(c, L, cap);
        if (st < 0) return st;
    }
    size_t head_bytes = (size_t)L->cap * c->row_bytes;
    for (int64_t t = 0; t < w->n; t++) {
        L->pos[L->n + t] = w->pos[t];
        for (int32_t hd = 0; hd < c->n_kv_head; hd++) {
            size_t src = ((size_t)t * (size_t)c->n_kv_head + (size_t)hd) * (size_t)c->head_dim;
            size_t dst = hd * head_bytes + (size_t)(L->n + t) * c->row_bytes;
            full_put_row(c, L->k + dst, w->k + src);
            full_put_row(c, L->v + dst, w->v + src);
        }
    }
    L->n += w->n;
    c->entries += w->n * c->n_kv_head;
    return TSR_OK;
}

static tsr_status full_view(void *self, int64_t id, int32_t layer, int32_t phase,
                            tsr_kv_view *views) {
    full_cache *c = self;
    full_seq *s = full_find_or_fail(c, id, "view");
    if (!s) return TSR_E_INVALID;
    if (layer < 0 || layer >= c->n_layer) {
        c->host->set_error(c->host->ctx, "view: layer %d outside [0, %d)", (int)layer,
                           (int)c->n_layer);
        return TSR_E_RANGE;
    }
    const full_layer *L = &s->layers[layer];
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

static void full_stats(void *self, tsr_cache_stats *out) {
    const full_cache *c = self;
    out->bytes_reserved = c->bytes_reserved;
    out->bytes_peak = c->bytes_peak;
    out->entries = c->entries;
    out->evicted = 0;
}

static tsr_status full_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    if (init->n_layer <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 || init->n_ctx <= 0 ||
        init->n_seq_max <= 0) {
        host->set_error(host->ctx, "shape n_layer %d, n_kv_head %d, head_dim %d, n_ctx %d, "
                        "n_seq_max %d: expected positive sizes", (int)init->n_layer,
                        (int)init->n_kv_head, (int)init->head_dim, (int)init->n_ctx,
                        (int)init->n_seq_max);
        return TSR_E_INVALID;
    }
    if (init->backend_name && strcmp(init->backend_name, "cpu") != 0) {
        host->set_error(host->ctx, "backend '%s': this policy keeps K/V in host memory (cpu)",
                        init->backend_name);
        return TSR_E_UNSUPPORTED;
    }
    full_cache *c = tsr_calloc(host, 1, sizeof *c);
    if (c) c->seqs = tsr_calloc(host, (size_t)init->n_seq_max, sizeof(full_seq));
    if (!c || !c->seqs) {
        if (c) host->free(host->ctx, c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    c->host = host;
    c->n_layer = init->n_layer;
    c->n_kv_head = init->n_kv_head;
    c->head_dim = init->head_dim;
    c->n_ctx = init->n_ctx;
    c->n_seq_max = init->n_seq_max;
    c->dtype = tsr_param_int(params, "dtype") == 1 ? TSR_DTYPE_F16 : TSR_DTYPE_F32;
    c->row_bytes = (size_t)init->head_dim * (c->dtype == TSR_DTYPE_F16 ? 2 : 4);
    *out = c;
    return TSR_OK;
}

static void full_destroy(void *self) {
    full_cache *c = self;
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive) full_seq_free(c, &c->seqs[i]);
    c->host->free(c->host->ctx, c->seqs);
    c->host->free(c->host->ctx, c);
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
    .destroy = full_destroy,
    .seq_begin = full_seq_begin,
    .seq_end = full_seq_end,
    .seq_fork = full_seq_fork,
    .seq_truncate = full_seq_truncate,
    .store = full_store,
    .view = full_view,
    .stats = full_stats,
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
