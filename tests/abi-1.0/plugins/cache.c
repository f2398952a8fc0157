/* cache 'abi10-full' (frozen 1.0): keeps every entry of every sequence, F32, rows of all KV
 * heads side by side, so each head's view is a strided slice. */
#include <tessera/cache.h>

#include "frozen.h"

typedef struct flayer {
    int64_t n, cap;
    int32_t *pos; /* (cap) */
    float *k, *v; /* (cap, n_kv_head, head_dim) */
} flayer;

typedef struct fseq {
    int64_t id;
    int alive;
    flayer *layers; /* (n_layer) */
} fseq;

typedef struct fcache {
    const tsr_host *host;
    int32_t n_layer, n_kv_head, head_dim, n_seq_max;
    fseq *seqs; /* (n_seq_max) */
    uint64_t bytes, peak;
} fcache;

static size_t fc_row(const fcache *c) { return (size_t)c->n_kv_head * (size_t)c->head_dim; }

static uint64_t fc_layer_bytes(const fcache *c, int64_t cap) {
    return (uint64_t)cap * (2 * fc_row(c) * sizeof(float) + sizeof(int32_t));
}

static tsr_status fc_create(const tsr_host *host, const tsr_params *params,
                            const tsr_cache_init *init, void **out) {
    (void)params;
    if (init->n_layer <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_seq_max <= 0 || init->memory_space != TSR_MEMORY_HOST) {
        host->set_error(host->ctx, "needs positive sizes and host memory");
        return TSR_E_INVALID;
    }
    fcache *c = frozen_zalloc(host, sizeof *c);
    fseq *seqs = c ? frozen_zalloc(host, (size_t)init->n_seq_max * sizeof *seqs) : NULL;
    if (!seqs) {
        if (c) host->free(host->ctx, c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *c = (fcache){host, init->n_layer, init->n_kv_head, init->head_dim, init->n_seq_max, seqs, 0, 0};
    *out = c;
    return TSR_OK;
}

static fseq *fc_find(fcache *c, int64_t id) {
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive && c->seqs[i].id == id) return &c->seqs[i];
    return NULL;
}

static void fc_free_layer(fcache *c, flayer *l) {
    c->host->free(c->host->ctx, l->pos);
    c->host->free(c->host->ctx, l->k);
    c->host->free(c->host->ctx, l->v);
    c->bytes -= fc_layer_bytes(c, l->cap);
    *l = (flayer){0};
}

static void fc_seq_end(void *self, int64_t id) {
    fcache *c = self;
    fseq *s = fc_find(c, id);
    if (!s) return;
    for (int32_t l = 0; l < c->n_layer; l++) fc_free_layer(c, &s->layers[l]);
    c->host->free(c->host->ctx, s->layers);
    *s = (fseq){0};
}

static void fc_destroy(void *self) {
    fcache *c = self;
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (c->seqs[i].alive) fc_seq_end(c, c->seqs[i].id);
    c->host->free(c->host->ctx, c->seqs);
    c->host->free(c->host->ctx, c);
}

static tsr_status fc_seq_begin(void *self, int64_t id) {
    fcache *c = self;
    if (fc_find(c, id)) {
        c->host->set_error(c->host->ctx, "sequence %lld is alive", (long long)id);
        return TSR_E_STATE;
    }
    for (int32_t i = 0; i < c->n_seq_max; i++)
        if (!c->seqs[i].alive) {
            flayer *layers = frozen_zalloc(c->host, (size_t)c->n_layer * sizeof *layers);
            if (!layers) {
                c->host->set_error(c->host->ctx, "out of memory");
                return TSR_E_NOMEM;
            }
            c->seqs[i] = (fseq){id, 1, layers};
            return TSR_OK;
        }
    c->host->set_error(c->host->ctx, "more than %d sequences", (int)c->n_seq_max);
    return TSR_E_RANGE;
}

/* Makes room for `cap` entries, keeping the first n. */
static tsr_status fc_reserve(fcache *c, flayer *l, int64_t cap) {
    if (cap <= l->cap) return TSR_OK;
    flayer grown = {.n = l->n, .cap = cap};
    grown.pos = frozen_zalloc(c->host, (size_t)cap * sizeof *grown.pos);
    grown.k = frozen_zalloc(c->host, (size_t)cap * fc_row(c) * sizeof(float));
    grown.v = frozen_zalloc(c->host, (size_t)cap * fc_row(c) * sizeof(float));
    if (!grown.pos || !grown.k || !grown.v) {
        c->host->free(c->host->ctx, grown.pos);
        c->host->free(c->host->ctx, grown.k);
        c->host->free(c->host->ctx, grown.v);
        c->host->set_error(c->host->ctx, "out of memory for %lld entries", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (l->n) {
        memcpy(grown.pos, l->pos, (size_t)l->n * sizeof *l->pos);
        memcpy(grown.k, l->k, (size_t)l->n * fc_row(c) * sizeof(float));
        memcpy(grown.v, l->v, (size_t)l->n * fc_row(c) * sizeof(float));
    }
    fc_free_layer(c, l);
    *l = grown;
    c->bytes += fc_layer_bytes(c, cap);
    if (c->bytes > c->peak) c->peak = c->bytes;
    return TSR_OK;
}

static tsr_status fc_store(void *self, const tsr_kv_write *w) {
    fcache *c = self;
    fseq *s = fc_find(c, w->seq_id);
    if (!s || w->layer < 0 || w->layer >= c->n_layer) {
        c->host->set_error(c->host->ctx, "store: no sequence %lld or layer %d",
                           (long long)w->seq_id, (int)w->layer);
        return TSR_E_STATE;
    }
    if (w->n <= 0) return TSR_OK;
    flayer *l = &s->layers[w->layer];
    int64_t need = l->n + w->n;
    if (need > l->cap) {
        tsr_status st = fc_reserve(c, l, need > 2 * l->cap ? need : 2 * l->cap);
        if (st < 0) return st;
    }
    memcpy(l->pos + l->n, w->pos, (size_t)w->n * sizeof *w->pos);
    memcpy(l->k + (size_t)l->n * fc_row(c), w->k, (size_t)w->n * fc_row(c) * sizeof(float));
    memcpy(l->v + (size_t)l->n * fc_row(c), w->v, (size_t)w->n * fc_row(c) * sizeof(float));
    l->n = need;
    return TSR_OK;
}

static tsr_status fc_view(void *self, int64_t id, int32_t layer, int32_t phase,
                          tsr_kv_view *views) {
    (void)phase;
    fcache *c = self;
    fseq *s = fc_find(c, id);
    if (!s || layer < 0 || layer >= c->n_layer) {
        c->host->set_error(c->host->ctx, "view: no sequence %lld or layer %d", (long long)id,
                           (int)layer);
        return TSR_E_STATE;
    }
    const flayer *l = &s->layers[layer];
    size_t stride = fc_row(c) * sizeof(float);
    for (int32_t h = 0; h < c->n_kv_head; h++) {
        size_t at = (size_t)h * (size_t)c->head_dim;
        views[h].n = l->n;
        views[h].pos = l->pos;
        views[h].dtype = TSR_DTYPE_F32;
        views[h].k = l->k ? l->k + at : NULL;
        views[h].v = l->v ? l->v + at : NULL;
        views[h].k_stride = views[h].v_stride = stride;
    }
    return TSR_OK;
}

static tsr_status fc_seq_fork(void *self, int64_t src, int64_t dst) {
    fcache *c = self;
    fseq *from = fc_find(c, src);
    tsr_status st = from ? fc_seq_begin(c, dst) : TSR_E_STATE;
    if (!from) c->host->set_error(c->host->ctx, "fork: no sequence %lld", (long long)src);
    if (st < 0) return st;
    fseq *to = fc_find(c, dst);
    for (int32_t l = 0; l < c->n_layer; l++) {
        const flayer *a = &from->layers[l];
        if ((st = fc_reserve(c, &to->layers[l], a->cap)) < 0) {
            fc_seq_end(c, dst);
            return st;
        }
        flayer *b = &to->layers[l];
        b->n = a->n;
        if (a->n) {
            memcpy(b->pos, a->pos, (size_t)a->n * sizeof *a->pos);
            memcpy(b->k, a->k, (size_t)a->n * fc_row(c) * sizeof(float));
            memcpy(b->v, a->v, (size_t)a->n * fc_row(c) * sizeof(float));
        }
    }
    return TSR_OK;
}

static tsr_status fc_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    fcache *c = self;
    fseq *s = fc_find(c, id);
    if (!s) {
        c->host->set_error(c->host->ctx, "truncate: no sequence %lld", (long long)id);
        return TSR_E_STATE;
    }
    for (int32_t l = 0; l < c->n_layer; l++) {
        flayer *ly = &s->layers[l];
        int64_t kept = 0;
        for (int64_t j = 0; j < ly->n; j++) {
            if (ly->pos[j] >= n_pos) continue;
            ly->pos[kept] = ly->pos[j];
            memmove(ly->k + (size_t)kept * fc_row(c), ly->k + (size_t)j * fc_row(c),
                    fc_row(c) * sizeof(float));
            memmove(ly->v + (size_t)kept * fc_row(c), ly->v + (size_t)j * fc_row(c),
                    fc_row(c) * sizeof(float));
            kept++;
        }
        ly->n = kept;
    }
    return TSR_OK;
}

static void fc_stats(void *self, tsr_cache_stats *out) {
    fcache *c = self;
    int64_t entries = 0;
    for (int32_t i = 0; i < c->n_seq_max; i++)
        for (int32_t l = 0; c->seqs[i].alive && l < c->n_layer; l++)
            entries += c->seqs[i].layers[l].n * c->n_kv_head;
    out->bytes_reserved = c->bytes;
    out->bytes_peak = c->peak;
    out->entries = entries;
    out->evicted = 0;
}

static const tsr_cache_vtable fc_vtable = {
    .struct_size = sizeof(tsr_cache_vtable), .create = fc_create, .destroy = fc_destroy,
    .seq_begin = fc_seq_begin, .seq_end = fc_seq_end, .seq_fork = fc_seq_fork,
    .seq_truncate = fc_seq_truncate, .store = fc_store, .view = fc_view, .stats = fc_stats};

static const tsr_plugin_desc fc_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_CACHE, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-full", .version = "1.0",
    .description = "frozen ABI 1.0 cache policy: every entry, F32",
    .vtable = &fc_vtable};

FROZEN_EXPORT(fc_desc)
