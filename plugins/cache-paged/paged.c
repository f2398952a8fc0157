/*
 * cache 'paged': the serving layout of vLLM's PagedAttention (W. Kwon, Z. Li, S. Zhuang,
 * Y. Sheng, L. Zheng, C. H. Yu, J. E. Gonzalez, H. Zhang, I. Stoica, "Efficient Memory
 * Management for Large Language Model Serving with PagedAttention", SOSP 2023,
 * arXiv:2309.06180). Every (sequence, layer) keeps its entries in fixed-size blocks of
 * `block_size` entries listed in a block table; a block is allocated when the first entry
 * lands in it, so memory follows the sequence by at most one partly filled block.
 *
 * Blocks are shared: seq_fork copies the source's block tables and counts one more reference
 * to each block, so forking costs no K/V copy. A write into a block that another sequence
 * also references first copies that block (copy on write); since only the last block of a
 * sequence is ever written, a fork copies at most one block per layer, and only when a side
 * writes. seq_truncate drops the references to the blocks past the cut.
 *
 * Views have dtype TSR_KV_DTYPE_BLOCKS: view_ext gives each KV head's block pointers (forked
 * sequences show the same pointers for their common prefix), and load_k / load_v read the same
 * rows for attention plugins that do not know blocks. Entries are exactly what was stored (f32,
 * or IEEE half with dtype f16), so attention over them equals attention over 'full'.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

/* A block: its reference count, then (2, n_kv_head, block_size, row) K then V rows. */
#define PAGED_HEADER 64
#define PAGED_MIN_TABLE 8

typedef struct paged_cache paged_cache;
typedef struct paged_layer paged_layer;

/* What the loaders of one view read. */
typedef struct paged_head {
    const paged_cache *c;
    const paged_layer *L;
    int32_t head;
} paged_head;

struct paged_layer {
    int64_t n;               /* entries, positions 0..n-1 */
    int64_t n_blocks, bcap;  /* blocks in the table, room in the table */
    char **blocks;           /* (bcap) */
    int32_t *pos;            /* (bcap * block_size) */
    const void **kptr, **vptr; /* (n_kv_head, bcap) the views' per-head block tables */
    paged_head *heads;       /* (n_kv_head) */
};

struct paged_cache {
    tsr_kv_store kv;      /* first: slots, counters, element size */
    int32_t block_size;
    size_t block_bytes;   /* one block with its header */
    paged_layer *layers;  /* (n_seq_max, n_layer) */
};

static paged_layer *paged_layers(const paged_cache *c, const tsr_kv_seq *q) {
    return c->layers + (size_t)tsr_kv_store_slot(&c->kv, q) * (size_t)c->kv.n_layer;
}

static int32_t *paged_refs(char *block) { return (int32_t *)block; }

/* Row `slot` of head h in a block: keys (values = 0) or values. */
static char *paged_row(const paged_cache *c, char *block, int values, int32_t h, int64_t slot) {
    size_t per_head = (size_t)c->block_size * c->kv.row_bytes;
    return block + PAGED_HEADER + ((size_t)values * (size_t)c->kv.n_kv_head + (size_t)h) * per_head +
           (size_t)slot * c->kv.row_bytes;
}

static char *paged_block_new(paged_cache *c) {
    const tsr_host *h = c->kv.host;
    char *b = h->alloc(h->ctx, c->block_bytes, 0);
    if (!b) {
        h->set_error(h->ctx, "out of memory for a block of %d entries", (int)c->block_size);
        return NULL;
    }
    *paged_refs(b) = 1;
    tsr_kv_store_account(&c->kv, (int64_t)c->block_bytes);
    return b;
}

static void paged_block_release(paged_cache *c, char *b) {
    if (--*paged_refs(b) > 0) return;
    c->kv.host->free(c->kv.host->ctx, b);
    tsr_kv_store_account(&c->kv, -(int64_t)c->block_bytes);
}

/* Room for `need` blocks in the table (and their positions). */
static tsr_status paged_reserve(paged_cache *c, paged_layer *L, int64_t need) {
    if (need <= L->bcap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    int64_t cap = L->bcap ? L->bcap : PAGED_MIN_TABLE;
    while (cap < need) cap *= 2;
    char **blocks = h->alloc(h->ctx, (size_t)cap * sizeof *blocks, 0);
    int32_t *pos = h->alloc(h->ctx, (size_t)(cap * c->block_size) * sizeof *pos, 0);
    const void **kptr = h->alloc(h->ctx, (size_t)(cap * c->kv.n_kv_head) * sizeof *kptr, 0);
    const void **vptr = h->alloc(h->ctx, (size_t)(cap * c->kv.n_kv_head) * sizeof *vptr, 0);
    if (!blocks || !pos || !kptr || !vptr) {
        h->free(h->ctx, blocks);
        h->free(h->ctx, pos);
        h->free(h->ctx, kptr);
        h->free(h->ctx, vptr);
        h->set_error(h->ctx, "out of memory for a table of %lld blocks", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (L->bcap) {
        memcpy(blocks, L->blocks, (size_t)L->n_blocks * sizeof *blocks);
        memcpy(pos, L->pos, (size_t)L->n * sizeof *pos);
    }
    h->free(h->ctx, L->blocks);
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->kptr);
    h->free(h->ctx, L->vptr);
    L->blocks = blocks;
    L->pos = pos;
    L->kptr = kptr;
    L->vptr = vptr;
    L->bcap = cap;
    return TSR_OK;
}

/* Drops the blocks past the first `keep`. */
static void paged_keep_blocks(paged_cache *c, paged_layer *L, int64_t keep) {
    for (int64_t b = keep; b < L->n_blocks; b++) paged_block_release(c, L->blocks[b]);
    if (keep < L->n_blocks) L->n_blocks = keep;
}

static void paged_layer_free(paged_cache *c, paged_layer *L) {
    const tsr_host *h = c->kv.host;
    paged_keep_blocks(c, L, 0);
    c->kv.entries -= L->n * c->kv.n_kv_head;
    h->free(h->ctx, L->blocks);
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->kptr);
    h->free(h->ctx, L->vptr);
    h->free(h->ctx, L->heads);
    *L = (paged_layer){0};
}

/* Block b made this sequence's own before a write: a copy when another sequence shares it. */
static tsr_status paged_own(paged_cache *c, paged_layer *L, int64_t b) {
    char *shared = L->blocks[b];
    if (*paged_refs(shared) == 1) return TSR_OK;
    char *own = paged_block_new(c);
    if (!own) return TSR_E_NOMEM;
    memcpy(own + PAGED_HEADER, shared + PAGED_HEADER, c->block_bytes - PAGED_HEADER);
    paged_block_release(c, shared);
    L->blocks[b] = own;
    return TSR_OK;
}

static tsr_status paged_store(void *self, const tsr_kv_write *w) {
    paged_cache *c = self;
    tsr_kv_seq *q;
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &q);
    if (st < 0) return st;
    paged_layer *L = &paged_layers(c, q)[w->layer];
    const int64_t bs = c->block_size;
    if ((st = tsr_kv_store_check_ctx(&c->kv, w, L->n)) < 0 ||
        (st = paged_reserve(c, L, (L->n + w->n + bs - 1) / bs)) < 0)
        return st;
    for (int64_t t = 0; t < w->n; t++) {
        const int64_t j = L->n, b = j / bs;
        if (b == L->n_blocks) {
            if (!(L->blocks[b] = paged_block_new(c))) return TSR_E_NOMEM;
            L->n_blocks++;
        } else if (t == 0 && (st = paged_own(c, L, b)) < 0) {
            return st;
        }
        for (int32_t hd = 0; hd < c->kv.n_kv_head; hd++) {
            size_t src = ((size_t)t * (size_t)c->kv.n_kv_head + (size_t)hd) * (size_t)c->kv.head_dim;
            tsr_kv_store_put_row_(&c->kv, paged_row(c, L->blocks[b], 0, hd, j % bs), w->k + src);
            tsr_kv_store_put_row_(&c->kv, paged_row(c, L->blocks[b], 1, hd, j % bs), w->v + src);
        }
        L->pos[j] = w->pos[t];
        L->n++;
        c->kv.entries += c->kv.n_kv_head;
    }
    return TSR_OK;
}

/* Rows [j0, j0+n) of one head as f32. */
static void paged_load(const paged_head *ph, int values, int64_t j0, int64_t n, float *dst) {
    const paged_cache *c = ph->c;
    const int32_t hd = c->kv.head_dim;
    for (int64_t j = j0; j < j0 + n; j++) {
        const char *row = paged_row(c, ph->L->blocks[j / c->block_size], values, ph->head,
                                    j % c->block_size);
        float *out = dst + (j - j0) * hd;
        if (c->kv.dtype == TSR_DTYPE_F32) {
            memcpy(out, row, (size_t)hd * sizeof(float));
            continue;
        }
        for (int32_t d = 0; d < hd; d++) {
            uint16_t x;
            memcpy(&x, row + 2 * (size_t)d, 2);
            out[d] = tsr_f16_to_f32(x);
        }
    }
}

static void paged_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    paged_load(ctx, 0, j0, n, dst);
}
static void paged_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    paged_load(ctx, 1, j0, n, dst);
}

static tsr_status paged_view_ext(void *self, int64_t id, int32_t layer, int32_t phase,
                                 tsr_kv_view *views, tsr_kv_view_ext *ext) {
    (void)phase;
    paged_cache *c = self;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(&c->kv, id, layer, c->kv.n_layer, "view", &st);
    if (!q) return st;
    paged_layer *L = &paged_layers(c, q)[layer];
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        const void **kp = L->kptr ? L->kptr + (size_t)h * (size_t)L->bcap : NULL;
        const void **vp = L->vptr ? L->vptr + (size_t)h * (size_t)L->bcap : NULL;
        for (int64_t b = 0; b < L->n_blocks; b++) {
            kp[b] = paged_row(c, L->blocks[b], 0, h, 0);
            vp[b] = paged_row(c, L->blocks[b], 1, h, 0);
        }
        L->heads[h] = (paged_head){c, L, h};
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = L->n, .pos = L->pos,
                                 .dtype = TSR_KV_DTYPE_BLOCKS, .k_stride = c->kv.row_bytes,
                                 .v_stride = c->kv.row_bytes, .load_k = paged_load_k,
                                 .load_v = paged_load_v, .load_ctx = &L->heads[h]};
        if (ext) {
            ext[h].block_size = c->block_size;
            ext[h].block_dtype = c->kv.dtype;
            ext[h].k_blocks = kp;
            ext[h].v_blocks = vp;
        }
    }
    return TSR_OK;
}

static tsr_status paged_view(void *self, int64_t id, int32_t layer, int32_t phase,
                             tsr_kv_view *views) {
    return paged_view_ext(self, id, layer, phase, views, NULL);
}

static void paged_seq_fini(void *self, tsr_kv_seq *q) {
    paged_cache *c = self;
    paged_layer *layers = paged_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) paged_layer_free(c, &layers[l]);
}

/* A new sequence's block tables, or `from`'s shared: one more reference to each of its blocks,
 * no K/V copied. */
static tsr_status paged_seq_init(void *self, tsr_kv_seq *q, const tsr_kv_seq *from) {
    paged_cache *c = self;
    paged_layer *to = paged_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) to[l] = (paged_layer){0};
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        to[l].heads = tsr_calloc(c->kv.host, (size_t)c->kv.n_kv_head, sizeof(paged_head));
        if (!to[l].heads) {
            c->kv.host->set_error(c->kv.host->ctx, "%s: out of memory",
                                  from ? "seq_fork" : "seq_begin");
            return TSR_E_NOMEM;
        }
        if (!from) continue;
        const paged_layer *F = &paged_layers(c, from)[l];
        tsr_status st = paged_reserve(c, &to[l], F->n_blocks);
        if (st < 0) return st;
        for (int64_t b = 0; b < F->n_blocks; b++) {
            to[l].blocks[b] = F->blocks[b];
            ++*paged_refs(F->blocks[b]);
        }
        if (F->n) memcpy(to[l].pos, F->pos, (size_t)F->n * sizeof(int32_t));
        to[l].n_blocks = F->n_blocks;
        to[l].n = F->n;
        c->kv.entries += F->n * c->kv.n_kv_head;
    }
    return TSR_OK;
}

static tsr_status paged_seq_begin(void *self, int64_t id) {
    return tsr_kv_store_seq_begin_with(self, id, paged_seq_init, paged_seq_fini);
}
static void paged_seq_end(void *self, int64_t id) {
    tsr_kv_store_seq_end_with(self, id, paged_seq_fini);
}
static tsr_status paged_seq_fork(void *self, int64_t src, int64_t dst) {
    return tsr_kv_store_seq_fork_with(self, src, dst, paged_seq_init, paged_seq_fini);
}

static tsr_status paged_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    paged_cache *c = self;
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kv, id, "seq_truncate");
    if (!q) return TSR_E_INVALID;
    if (n_pos < 0) {
        c->kv.host->set_error(c->kv.host->ctx, "seq_truncate: sequence %lld: position %d is "
                              "negative", (long long)id, (int)n_pos);
        return TSR_E_RANGE;
    }
    paged_layer *layers = paged_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        paged_layer *L = &layers[l];
        /* Entries are in position order, one per position. */
        int64_t cut = 0;
        while (cut < L->n && L->pos[cut] < n_pos) cut++;
        paged_keep_blocks(c, L, (cut + c->block_size - 1) / c->block_size);
        c->kv.entries -= (L->n - cut) * c->kv.n_kv_head;
        L->n = cut;
    }
    return TSR_OK;
}

static void paged_destroy(void *self) {
    paged_cache *c = self;
    tsr_kv_store_fini_all(self, paged_seq_fini);
    c->kv.host->free(c->kv.host->ctx, c->layers);
    tsr_kv_store_destroy(c);
}

static tsr_status paged_create(const tsr_host *host, const tsr_params *params,
                               const tsr_cache_init *init, void **out) {
    void *self;
    tsr_status st = tsr_kv_store_need_ctx(host, init);
    if (st < 0 || (st = tsr_kv_store_create(host, params, init, sizeof(paged_cache), 0, &self)) < 0)
        return st;
    paged_cache *c = self;
    c->block_size = (int32_t)tsr_param_int(params, "block_size");
    c->block_bytes = PAGED_HEADER + 2 * (size_t)init->n_kv_head * (size_t)c->block_size *
                                        c->kv.row_bytes;
    c->layers = tsr_calloc(host, (size_t)init->n_seq_max * (size_t)init->n_layer,
                           sizeof(paged_layer));
    if (!c->layers) {
        tsr_kv_store_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *out = c;
    return TSR_OK;
}

static const char *const paged_dtypes[] = {"f32", "f16", NULL};

static const tsr_param_def paged_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "block_size", .type = TSR_PARAM_INT,
     .default_value = "16", .min = 1, .max = 4096, .unit = "entries",
     .doc = "entries per block, the unit of allocation and of sharing between sequences"},
    {TSR_SIZED(tsr_param_def), .name = "dtype", .type = TSR_PARAM_ENUM, .default_value = "f32",
     .choices = paged_dtypes, .doc = "storage of K/V rows: f32, or f16 (IEEE half)"},
};

static const tsr_cache_vtable paged_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = paged_create,
    .destroy = paged_destroy,
    .seq_begin = paged_seq_begin,
    .seq_end = paged_seq_end,
    .seq_fork = paged_seq_fork,
    .seq_truncate = paged_seq_truncate,
    .store = paged_store,
    .view = paged_view,
    .stats = tsr_kv_store_stats,
    .view_ext = paged_view_ext,
};

static const tsr_plugin_desc paged_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "paged",
    .version = "1.0",
    .description = "PagedAttention's layout: blocks in a block table, prefixes shared by forks, "
                   "copy on write",
    TSR_PARAMS(paged_params),
    .vtable = &paged_vtable,
};

TSR_PLUGIN_EXPORT(&paged_desc)
