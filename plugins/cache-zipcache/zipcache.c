/*
 * cache 'zipcache': ZipCache (Y. He, L. Zhang, W. Wu, J. Liu, H. Zhou, B. Zhuang, "ZipCache:
 * Accurate and Efficient KV Cache Quantization with Salient Token Identification", NeurIPS
 * 2024, arXiv:2405.14256; code ThisisBillhe/ZipCache). Tokens are quantized with mixed
 * precision by saliency: per KV head, the fraction `salient` of a chunk's tokens with the
 * highest normalized attention score keep `high_bits`, the others `low_bits`.
 *
 * The normalized attention score (the paper's saliency metric) of token i is the attention it
 * received summed over the queries that could see it, divided by their number: in a causal
 * prompt of n tokens, column i of the attention matrix has n - i entries, so the plain sum
 * (H2O's) favours early tokens and this one does not. Here attention reports the sums
 * (score_acc, over the KV head's query heads) and the policy divides by the query count.
 *
 * Chunks (the paper's streaming): the prompt is compressed at prefill_end, from the scores of
 * all its queries (the paper estimates them from probe queries to spare FlashAttention the
 * scores; our attention reports them itself). Later tokens stay in f32 until `gap` have
 * gathered; the step that reaches gap asks attention for its scores (its query is the probe,
 * as in ZipCache's code) and the chunk is compressed at step_end. Each chunk has its own
 * quantization parameters:
 *
 * - keys: channelwise, per set (salient or not) and channel, the set's min/max grid (f16
 *   zero and step rounded outward, <tessera/sdk_cache.h>);
 * - values: channel-separable tokenwise: each channel divided by c_d = sqrt(max_t |v_td|)
 *   over the chunk, then per token a min/max grid over its channels; v = c_d (zero + code step).
 *
 * `high_bits` 16 or 32 keeps salient tokens as IEEE half or f32 rows instead of codes.
 * Views with compressed entries have dtype ZC_DTYPE; their products (tsr_kv_view_ext) work on
 * the codes when some entry is quantized. With nothing compressed the view is the f32 rows.
 */
#include <math.h>
#include <stdlib.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

#define ZC_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 0x2c1)
#define ZC_MIN_ROWS 16
#define ZC_MIN_ENTRIES 64
/* Coefficients gathered per set before its rows are added (floats on axpy_v's stack). */
#define ZC_BLOCK_FLOATS 512

typedef struct zc_cache zc_cache;
typedef struct zc_layer zc_layer;

/* One compressed chunk: entries [start, start + len), every head's data in one block. */
typedef struct zc_chunk {
    int64_t start, len;  /* len: the tokens still held (a truncation may cut the chunk) */
    int64_t n_hi, n_lo;  /* tokens per head compressed in each set */
    char *mem;
    size_t head_bytes, bytes;
    /* Offsets inside one head's part of mem; arrays by set (0 the others, 1 the salient). */
    size_t o_mask, o_vscale, o_k[2], o_v[2], o_kgrid[2], o_vgrid[2];
} zc_chunk;

/* What one view reads. */
typedef struct zc_head {
    const zc_cache *c;
    const zc_layer *L;
    const tsr_kv_rows *rows;
    int32_t head;
} zc_head;

struct zc_layer {
    zc_chunk *chunks;
    int64_t n_chunks, chunk_cap;
    int64_t nc;           /* entries compressed: [0, nc); the rows hold [nc, n) */
    int32_t *pos;         /* (cap) every entry's position */
    float *score;         /* (n_kv_head, cap): attention received (score_acc) */
    int64_t cap;
    int32_t q_first, q_last; /* positions of the last store's queries */
    int fresh, scored;    /* a store since the last view; this step asked for scores */
    zc_head *heads;       /* (n_kv_head) */
};

struct zc_cache {
    tsr_kv_store kv;   /* first: slots, the f32 rows of tokens not compressed yet, counters */
    int32_t bits[2];   /* by set, low then high: 2, 4, 8 (codes) or 16, 32 (rows, high only) */
    tsr_kvq_layout lay[2]; /* of each set's codes */
    double salient;
    int64_t gap;
    zc_layer *layers;  /* (n_seq_max, n_layer) */
};

static zc_layer *zc_layers(const zc_cache *c, const tsr_kv_seq *q) {
    return c->layers + (size_t)tsr_kv_store_slot(&c->kv, q) * (size_t)c->kv.n_layer;
}

static int zc_is_code(int32_t bits) { return bits <= 8; }

/* Bytes of n rows of a set: codes, or IEEE half / f32 rows. */
static size_t zc_set_bytes(const zc_cache *c, int set, int64_t n) {
    return zc_is_code(c->bits[set]) ? tsr_kvq_bytes(&c->lay[set], n)
                                    : (size_t)n * (size_t)c->kv.head_dim * (size_t)c->bits[set] / 8;
}

static size_t zc_align8(size_t x) { return (x + 7) / 8 * 8; }

/* Tokens of a set in the chunk. */
static int64_t zc_set_size(const zc_chunk *ch, int set) { return set ? ch->n_hi : ch->n_lo; }

/* Whether some token of the chunk is held as codes (not as rows). */
static int zc_has_codes(const zc_cache *c, const zc_chunk *ch) {
    return ch->n_lo > 0 || (ch->n_hi > 0 && zc_is_code(c->bits[1]));
}

/* Lays out a chunk of n_hi + n_lo tokens, per head: the mask, both sets' keys and values,
 * the key grids (per set and channel), the value scales and grids (per set and token). */
static void zc_chunk_layout(const zc_cache *c, zc_chunk *ch) {
    const size_t hd = (size_t)c->kv.head_dim;
    size_t o = 0;
    ch->o_mask = o;
    o = zc_align8(o + (size_t)((ch->len + 63) / 64) * 8);
    for (int set = 0; set < 2; set++) {
        const int64_t n = zc_set_size(ch, set);
        const int codes = zc_is_code(c->bits[set]) && n > 0;
        ch->o_k[set] = o;
        o = zc_align8(o + zc_set_bytes(c, set, n));
        ch->o_v[set] = o;
        o = zc_align8(o + zc_set_bytes(c, set, n));
        ch->o_kgrid[set] = o;
        o = zc_align8(o + (codes ? 4 * hd : 0));
        ch->o_vgrid[set] = o;
        o = zc_align8(o + (codes ? 4 * (size_t)n : 0));
    }
    ch->o_vscale = o;
    o = zc_align8(o + (zc_has_codes(c, ch) ? 2 * hd : 0));
    ch->head_bytes = o;
    ch->bytes = o * (size_t)c->kv.n_kv_head;
}

static char *zc_part(const zc_chunk *ch, int32_t h, size_t offset) {
    return ch->mem + (size_t)h * ch->head_bytes + offset;
}

static int zc_is_salient(const zc_chunk *ch, int32_t h, int64_t i) {
    const uint64_t *mask = (const uint64_t *)zc_part(ch, h, ch->o_mask);
    return (int)((mask[i / 64] >> (i % 64)) & 1u);
}

/* Salient tokens among the chunk's first i. */
static int64_t zc_rank(const zc_chunk *ch, int32_t h, int64_t i) {
    const uint64_t *mask = (const uint64_t *)zc_part(ch, h, ch->o_mask);
    int64_t r = 0;
    for (int64_t w = 0; w < i / 64; w++) r += __builtin_popcountll(mask[w]);
    if (i % 64) r += __builtin_popcountll(mask[i / 64] & ((1ull << (i % 64)) - 1));
    return r;
}

static void zc_layer_chunks_free(zc_cache *c, zc_layer *L, int64_t from) {
    for (int64_t k = from; k < L->n_chunks; k++) {
        tsr_kv_store_account(&c->kv, -(int64_t)L->chunks[k].bytes);
        c->kv.host->free(c->kv.host->ctx, L->chunks[k].mem);
    }
    if (from < L->n_chunks) L->n_chunks = from;
}

static void zc_layer_free(zc_cache *c, zc_layer *L) {
    const tsr_host *h = c->kv.host;
    zc_layer_chunks_free(c, L, 0);
    h->free(h->ctx, L->chunks);
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->score);
    h->free(h->ctx, L->heads);
    *L = (zc_layer){0};
}

static tsr_status zc_nomem(const zc_cache *c, const char *what) {
    c->kv.host->set_error(c->kv.host->ctx, "%s: out of memory", what);
    return TSR_E_NOMEM;
}

/* Room for `need` entries' positions and scores. */
static tsr_status zc_reserve(zc_cache *c, zc_layer *L, int64_t need) {
    if (need <= L->cap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    int64_t cap = L->cap ? L->cap : ZC_MIN_ENTRIES;
    while (cap < need) cap *= 2;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof *pos, 0);
    float *score = tsr_calloc(h, (size_t)(cap * c->kv.n_kv_head), sizeof *score);
    if (!pos || !score) {
        h->free(h->ctx, pos);
        h->free(h->ctx, score);
        return zc_nomem(c, "store");
    }
    if (L->cap) {
        memcpy(pos, L->pos, (size_t)L->cap * sizeof *pos);
        for (int32_t hh = 0; hh < c->kv.n_kv_head; hh++)
            memcpy(score + hh * cap, L->score + hh * L->cap, (size_t)L->cap * sizeof *score);
    }
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->score);
    L->pos = pos;
    L->score = score;
    L->cap = cap;
    return TSR_OK;
}

static tsr_status zc_store(void *self, const tsr_kv_write *w) {
    zc_cache *c = self;
    tsr_kv_seq *q;
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &q);
    if (st < 0) return st;
    zc_layer *L = &zc_layers(c, q)[w->layer];
    tsr_kv_rows *rows = &q->layers[w->layer];
    int64_t n = L->nc + rows->n;
    /* After a long prompt has been compressed, the rows give the room back. */
    if ((st = tsr_kv_store_check_ctx(&c->kv, w, n)) < 0 || (st = zc_reserve(c, L, n + w->n)) < 0 ||
        (st = tsr_kv_rows_fit(&c->kv, rows, rows->n + w->n, ZC_MIN_ROWS, 1)) < 0)
        return st;
    tsr_kv_rows_append(&c->kv, q, rows, w);
    memcpy(L->pos + n, w->pos, (size_t)w->n * sizeof(int32_t));
    if (w->n) {
        L->q_first = w->pos[0];
        L->q_last = w->pos[w->n - 1];
        L->fresh = 1;
    }
    return TSR_OK;
}

/* ---- compression ------------------------------------------------------------------------ */

typedef struct zc_rank_item {
    float score;
    int64_t i;
} zc_rank_item;

/* Highest score first; ties to the earlier token. */
static int zc_rank_cmp(const void *a, const void *b) {
    const zc_rank_item *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* Row r of a set of head h: x as codes on the grid (keys: per channel, zero[d] and step[d];
 * values: zero[0] and step[0] for all channels), or as IEEE half / f32. */
static void zc_put_row(const zc_cache *c, const zc_chunk *ch, int32_t h, int values, int set,
                       int64_t r, const float *x, const uint16_t *zero, const uint16_t *step) {
    const int32_t hd = c->kv.head_dim, bits = c->bits[set];
    char *base = zc_part(ch, h, values ? ch->o_v[set] : ch->o_k[set]);
    if (bits == 32) {
        memcpy(base + (size_t)r * (size_t)hd * 4, x, (size_t)hd * sizeof(float));
        return;
    }
    if (bits == 16) {
        for (int32_t d = 0; d < hd; d++) {
            uint16_t v = tsr_f32_to_f16(x[d]);
            memcpy(base + ((size_t)r * (size_t)hd + (size_t)d) * 2, &v, 2);
        }
        return;
    }
    for (int32_t d = 0; d < hd; d++) {
        int32_t g = values ? 0 : d;
        tsr_kvq_set(&c->lay[set], base, r, d,
                    tsr_kvq_code(x[d], tsr_kvq_f16(zero[g]), tsr_kvq_f16(step[g]), bits));
    }
}

/* Compresses head h of chunk ch from the rows (row i is the chunk's token i); the mask is
 * set. `y` is scratch for head_dim floats. */
static void zc_compress_head(const zc_cache *c, zc_chunk *ch, const tsr_kv_rows *rows, int32_t h,
                             float *y) {
    const int32_t hd = c->kv.head_dim;
    const size_t rb = c->kv.row_bytes;
    const char *kbase = rows->k + (size_t)h * (size_t)rows->cap * rb;
    const char *vbase = rows->v + (size_t)h * (size_t)rows->cap * rb;
    uint16_t *vscale = (uint16_t *)zc_part(ch, h, ch->o_vscale);
    /* Keys: per set and channel, the min/max over the set's tokens. */
    for (int set = 0; set < 2; set++) {
        if (!zc_is_code(c->bits[set]) || zc_set_size(ch, set) == 0) continue;
        uint16_t *grid = (uint16_t *)zc_part(ch, h, ch->o_kgrid[set]);
        for (int32_t d = 0; d < hd; d++) {
            float lo = 0.0f, hi = 0.0f;
            int any = 0;
            for (int64_t i = 0; i < ch->len; i++) {
                if (zc_is_salient(ch, h, i) != set) continue;
                float x = ((const float *)(kbase + (size_t)i * rb))[d];
                lo = !any || x < lo ? x : lo;
                hi = !any || x > hi ? x : hi;
                any = 1;
            }
            tsr_kvq_grid(lo, hi, c->bits[set], &grid[d], &grid[hd + d]);
        }
    }
    /* Values: the channel scales over the chunk. */
    for (int32_t d = 0; zc_has_codes(c, ch) && d < hd; d++) {
        float m = 0.0f;
        for (int64_t i = 0; i < ch->len; i++) {
            float x = fabsf(((const float *)(vbase + (size_t)i * rb))[d]);
            m = x > m ? x : m;
        }
        /* A zero channel (or one whose scale rounds to 0 in f16) keeps scale 1. */
        vscale[d] = tsr_f32_to_f16(sqrtf(m));
        if (!(tsr_kvq_f16(vscale[d]) > 0.0f)) vscale[d] = 0x3c00;
    }
    int64_t rank[2] = {0, 0};
    for (int64_t i = 0; i < ch->len; i++) {
        const int set = zc_is_salient(ch, h, i);
        const int64_t r = rank[set]++;
        const uint16_t *kgrid = (const uint16_t *)zc_part(ch, h, ch->o_kgrid[set]);
        zc_put_row(c, ch, h, 0, set, r, (const float *)(kbase + (size_t)i * rb), kgrid,
                   kgrid + hd);
        const float *v = (const float *)(vbase + (size_t)i * rb);
        if (!zc_is_code(c->bits[set])) {
            zc_put_row(c, ch, h, 1, set, r, v, NULL, NULL);
            continue;
        }
        float lo = 0.0f, hi = 0.0f;
        for (int32_t d = 0; d < hd; d++) {
            y[d] = v[d] / tsr_kvq_f16(vscale[d]);
            lo = d == 0 || y[d] < lo ? y[d] : lo;
            hi = d == 0 || y[d] > hi ? y[d] : hi;
        }
        uint16_t *grid = (uint16_t *)zc_part(ch, h, ch->o_vgrid[set]) + 2 * r;
        tsr_kvq_grid(lo, hi, c->bits[set], &grid[0], &grid[1]);
        zc_put_row(c, ch, h, 1, set, r, y, &grid[0], &grid[1]);
    }
}

/* Compresses the rows (the tokens since the last chunk) into a chunk: per head, the salient
 * fraction by normalized score, then both sets' codes. */
static tsr_status zc_compress(zc_cache *c, zc_layer *L, tsr_kv_rows *rows) {
    const tsr_host *host = c->kv.host;
    const int64_t len = rows->n;
    if (!len) return TSR_OK;
    if (L->n_chunks == L->chunk_cap) {
        int64_t cap = L->chunk_cap ? 2 * L->chunk_cap : 8;
        zc_chunk *chunks = host->alloc(host->ctx, (size_t)cap * sizeof *chunks, 0);
        if (!chunks) return zc_nomem(c, "compress");
        if (L->n_chunks) memcpy(chunks, L->chunks, (size_t)L->n_chunks * sizeof *chunks);
        host->free(host->ctx, L->chunks);
        L->chunks = chunks;
        L->chunk_cap = cap;
    }
    zc_chunk ch = {.start = L->nc, .len = len,
                   .n_hi = (int64_t)(c->salient * (double)len + 0.5)};
    ch.n_lo = len - ch.n_hi;
    zc_chunk_layout(c, &ch);
    ch.mem = tsr_calloc(host, 1, ch.bytes);
    zc_rank_item *items = host->alloc(host->ctx, (size_t)len * sizeof *items, 0);
    float *y = host->alloc(host->ctx, (size_t)c->kv.head_dim * sizeof *y, 0);
    if (!ch.mem || !items || !y) {
        host->free(host->ctx, ch.mem);
        host->free(host->ctx, items);
        host->free(host->ctx, y);
        return zc_nomem(c, "compress");
    }
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        const float *score = L->score + (size_t)h * (size_t)L->cap;
        for (int64_t i = 0; i < len; i++) {
            /* The queries of the scored step that could see token i. */
            int32_t p = L->pos[L->nc + i], first = p > L->q_first ? p : L->q_first;
            int64_t seen = (int64_t)L->q_last - first + 1;
            items[i] = (zc_rank_item){L->scored && seen > 0 ? score[L->nc + i] / (float)seen
                                                            : 0.0f, i};
        }
        qsort(items, (size_t)len, sizeof *items, zc_rank_cmp);
        uint64_t *mask = (uint64_t *)zc_part(&ch, h, ch.o_mask);
        for (int64_t r = 0; r < ch.n_hi; r++) mask[items[r].i / 64] |= 1ull << (items[r].i % 64);
        zc_compress_head(c, &ch, rows, h, y);
    }
    host->free(host->ctx, items);
    host->free(host->ctx, y);
    tsr_kv_store_account(&c->kv, (int64_t)ch.bytes);
    L->chunks[L->n_chunks++] = ch;
    L->nc += len;
    tsr_kv_rows_drop_front(&c->kv, rows, len);
    return TSR_OK;
}

/* The hooks: the prompt is compressed at prefill_end, later tokens once `gap` have gathered. */
static tsr_status zc_hook(zc_cache *c, int64_t id, int prefill) {
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kv, id, prefill ? "prefill_end" : "step_end");
    if (!q) return TSR_E_INVALID;
    zc_layer *layers = zc_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        zc_layer *L = &layers[l];
        tsr_kv_rows *rows = &q->layers[l];
        tsr_status st = prefill || rows->n >= c->gap ? zc_compress(c, L, rows) : TSR_OK;
        L->scored = 0;
        if (st < 0) return st;
    }
    return TSR_OK;
}

static tsr_status zc_prefill_end(void *self, int64_t id) { return zc_hook(self, id, 1); }
static tsr_status zc_step_end(void *self, int64_t id) { return zc_hook(self, id, 0); }

/* ---- reading ---------------------------------------------------------------------------- */

/* The chunk holding entry j (j < nc). */
static int64_t zc_find_chunk(const zc_layer *L, int64_t j) {
    int64_t lo = 0, hi = L->n_chunks - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (L->chunks[mid].start <= j) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static const float *zc_pending(const zc_head *zh, int values, int64_t j) {
    const char *base = values ? zh->rows->v : zh->rows->k;
    return (const float *)(base + ((size_t)zh->head * (size_t)zh->rows->cap +
                                   (size_t)(j - zh->L->nc)) * zh->c->kv.row_bytes);
}

/* Row r of a set of head h as f32; keys dequantize on their per-channel grid, values on the
 * row's grid times the channel scales. */
static void zc_dequant(const zc_cache *c, const zc_chunk *ch, int32_t h, int values, int set,
                       int64_t r, float *out) {
    const int32_t hd = c->kv.head_dim, bits = c->bits[set];
    const char *base = zc_part(ch, h, values ? ch->o_v[set] : ch->o_k[set]);
    if (bits == 32) {
        memcpy(out, base + (size_t)r * (size_t)hd * 4, (size_t)hd * sizeof(float));
        return;
    }
    if (bits == 16) {
        tsr_kvq_f16_row(out, (const uint16_t *)(base + (size_t)r * (size_t)hd * 2), hd);
        return;
    }
    const tsr_kvq_layout *lay = &c->lay[set];
    if (!values) {
        const uint16_t *grid = (const uint16_t *)zc_part(ch, h, ch->o_kgrid[set]);
        for (int32_t d = 0; d < hd; d++)
            out[d] = (float)tsr_kvq_get(lay, base, r, d) * tsr_kvq_f16(grid[hd + d]) +
                     tsr_kvq_f16(grid[d]);
        return;
    }
    const uint16_t *grid = (const uint16_t *)zc_part(ch, h, ch->o_vgrid[set]) + 2 * r;
    const uint16_t *scale = (const uint16_t *)zc_part(ch, h, ch->o_vscale);
    const float z = tsr_kvq_f16(grid[0]), s = tsr_kvq_f16(grid[1]);
    for (int32_t d = 0; d < hd; d++)
        out[d] = ((float)tsr_kvq_get(lay, base, r, d) * s + z) * tsr_kvq_f16(scale[d]);
}

static void zc_load(const zc_head *zh, int values, int64_t j0, int64_t n, float *dst) {
    const zc_cache *c = zh->c;
    const zc_layer *L = zh->L;
    const int32_t hd = c->kv.head_dim;
    int64_t j = j0;
    while (j < j0 + n && j < L->nc) {
        const zc_chunk *ch = &L->chunks[zc_find_chunk(L, j)];
        int64_t i = j - ch->start, end = ch->start + ch->len < j0 + n ? ch->start + ch->len : j0 + n;
        int64_t r_hi = zc_rank(ch, zh->head, i);
        for (; j < end; j++, i++) {
            int set = zc_is_salient(ch, zh->head, i);
            zc_dequant(c, ch, zh->head, values, set, set ? r_hi : i - r_hi, dst + (j - j0) * hd);
            r_hi += set;
        }
    }
    for (; j < j0 + n; j++)
        memcpy(dst + (j - j0) * hd, zc_pending(zh, values, j), (size_t)hd * sizeof(float));
}

static void zc_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    zc_load(ctx, 0, j0, n, dst);
}
static void zc_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    zc_load(ctx, 1, j0, n, dst);
}

TSR_VECTOR_CLONES
static void zc_dot_k(const void *ctx, const float *q, int64_t j0, int64_t n, float *scores) {
    const zc_head *zh = ctx;
    const zc_cache *c = zh->c;
    const zc_layer *L = zh->L;
    const int32_t hd = c->kv.head_dim;
    float w[2][TSR_KVQ_MAX_HEAD_DIM + 16], zero[TSR_KVQ_MAX_HEAD_DIM], qz[2] = {0.0f, 0.0f};
    float x[TSR_KVQ_MAX_HEAD_DIM];
    int64_t j = j0;
    while (j < j0 + n && j < L->nc) {
        const zc_chunk *ch = &L->chunks[zc_find_chunk(L, j)];
        int64_t i = j - ch->start, end = ch->start + ch->len < j0 + n ? ch->start + ch->len : j0 + n;
        /* Per set of codes: w = q times the steps, and the constant sum q . zeros. */
        for (int set = 0; set < 2; set++) {
            if (!zc_is_code(c->bits[set]) || zc_set_size(ch, set) == 0) continue;
            const uint16_t *grid = (const uint16_t *)zc_part(ch, zh->head, ch->o_kgrid[set]);
            tsr_kvq_f16_row(zero, grid + hd, hd);
            for (int32_t d = 0; d < hd; d++) w[set][d] = q[d] * zero[d];
            for (int32_t d = hd; d < 16 * c->lay[set].slots; d++) w[set][d] = 0.0f;
            tsr_kvq_f16_row(zero, grid, hd);
            qz[set] = tsr_kvq_dot_f32(q, zero, hd);
        }
        int64_t r[2];
        r[1] = zc_rank(ch, zh->head, i);
        r[0] = i - r[1];
        for (; j < end; j++, i++) {
            const int set = zc_is_salient(ch, zh->head, i);
            const int64_t k = r[set]++;
            if (zc_is_code(c->bits[set])) {
                scores[j - j0] = tsr_kvq_dot(&c->lay[set], w[set],
                                             zc_part(ch, zh->head, ch->o_k[set]), k) + qz[set];
            } else {
                zc_dequant(c, ch, zh->head, 0, set, k, x);
                scores[j - j0] = tsr_kvq_dot_f32(q, x, hd);
            }
        }
    }
    for (; j < j0 + n; j++) scores[j - j0] = tsr_kvq_dot_f32(q, zc_pending(zh, 0, j), hd);
}

/* out += sum p_j v_j. A chunk's quantized values share its channel scales: per set, the codes
 * times p step gather slot by slot in u (tsr_kvq_axpy over the set's consecutive rows) and
 * the zeros times p in one sum; u plus that sum times the scales goes to out once per chunk.
 * Values held as rows add directly. */
TSR_VECTOR_CLONES
static void zc_axpy_v(const void *ctx, const float *p, int64_t j0, int64_t n, float *out) {
    const zc_head *zh = ctx;
    const zc_cache *c = zh->c;
    const zc_layer *L = zh->L;
    const int32_t hd = c->kv.head_dim;
    float u[TSR_KVQ_MAX_HEAD_DIM + 16], x[TSR_KVQ_MAX_HEAD_DIM], a[2][ZC_BLOCK_FLOATS];
    int64_t j = j0;
    while (j < j0 + n && j < L->nc) {
        const zc_chunk *ch = &L->chunks[zc_find_chunk(L, j)];
        int64_t i = j - ch->start, end = ch->start + ch->len < j0 + n ? ch->start + ch->len : j0 + n;
        int64_t r[2], first[2], count[2] = {0, 0};
        r[1] = zc_rank(ch, zh->head, i);
        r[0] = i - r[1];
        float zsum = 0.0f;
        int any_codes = 0;
        for (int32_t d = 0; d < hd + 16; d++) u[d] = 0.0f;
        while (j < end) {
            /* A block of tokens: coefficients per set, then each set's rows at once. */
            first[0] = r[0];
            first[1] = r[1];
            for (; j < end; j++, i++) {
                const int set = zc_is_salient(ch, zh->head, i);
                const int32_t slots = c->lay[set].slots;
                if (zc_is_code(c->bits[set]) && (count[set] + 1) * slots > ZC_BLOCK_FLOATS) break;
                const int64_t k = r[set]++;
                const float pj = p[j - j0];
                if (!zc_is_code(c->bits[set])) {
                    zc_dequant(c, ch, zh->head, 1, set, k, x);
                    for (int32_t d = 0; d < hd; d++) out[d] += pj * x[d];
                    continue;
                }
                const uint16_t *grid = (const uint16_t *)zc_part(ch, zh->head, ch->o_vgrid[set]);
                zsum += pj * tsr_kvq_f16(grid[2 * k]);
                const float step = pj * tsr_kvq_f16(grid[2 * k + 1]);
                for (int32_t s = 0; s < slots; s++) a[set][count[set] * slots + s] = step;
                count[set]++;
            }
            for (int set = 0; set < 2; set++) {
                if (!count[set]) continue;
                tsr_kvq_axpy(&c->lay[set], u, a[set], zc_part(ch, zh->head, ch->o_v[set]),
                             first[set], count[set]);
                count[set] = 0;
                any_codes = 1;
            }
        }
        if (any_codes) {
            tsr_kvq_f16_row(x, (const uint16_t *)zc_part(ch, zh->head, ch->o_vscale), hd);
            for (int32_t d = 0; d < hd; d++) out[d] += (u[d] + zsum) * x[d];
        }
    }
    for (; j < j0 + n; j++) {
        const float pj = p[j - j0], *v = zc_pending(zh, 1, j);
        for (int32_t d = 0; d < hd; d++) out[d] += pj * v[d];
    }
}

/* Whether this step's attention should report scores: the prompt's forward, and the step that
 * completes a chunk; never when the split does not depend on them. */
static int zc_wants_scores(const zc_cache *c, const tsr_kv_rows *rows, int32_t phase) {
    if (c->salient <= 0.0 || c->salient >= 1.0) return 0;
    return phase == TSR_PHASE_PREFILL || rows->n >= c->gap;
}

static tsr_status zc_view_ext(void *self, int64_t id, int32_t layer, int32_t phase,
                              tsr_kv_view *views, tsr_kv_view_ext *ext) {
    zc_cache *c = self;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(&c->kv, id, layer, c->kv.n_layer, "view", &st);
    if (!q) return st;
    zc_layer *L = &zc_layers(c, q)[layer];
    const tsr_kv_rows *rows = &q->layers[layer];
    const int64_t n = L->nc + rows->n;
    int scores = zc_wants_scores(c, rows, phase);
    if (scores && L->fresh) {
        for (int32_t h = 0; h < c->kv.n_kv_head; h++)
            memset(L->score + (size_t)h * (size_t)L->cap + L->nc, 0,
                   (size_t)rows->n * sizeof(float));
        L->scored = 1;
    }
    L->fresh = 0;
    if (L->nc == 0 && (st = tsr_kv_store_view(self, id, layer, phase, views)) < 0) return st;
    /* Codes anywhere: products on them; rows only (16 or 32 bits for all): loaders suffice. */
    int codes = 0;
    for (int64_t k = 0; k < L->n_chunks; k++) codes |= zc_has_codes(c, &L->chunks[k]);
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        if (L->nc) {
            L->heads[h] = (zc_head){c, L, rows, h};
            views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = n, .pos = L->pos,
                                     .dtype = ZC_DTYPE, .load_k = zc_load_k,
                                     .load_v = zc_load_v, .load_ctx = &L->heads[h]};
            if (ext && codes) {
                ext[h].dot_k = zc_dot_k;
                ext[h].axpy_v = zc_axpy_v;
            }
        }
        if (scores) {
            views[h].score_acc = L->score + (size_t)h * (size_t)L->cap;
            views[h].score_from_pos = 0;
        }
    }
    return TSR_OK;
}

static tsr_status zc_view(void *self, int64_t id, int32_t layer, int32_t phase,
                          tsr_kv_view *views) {
    return zc_view_ext(self, id, layer, phase, views, NULL);
}

/* ---- sequences --------------------------------------------------------------------------- */

static void zc_seq_fini(void *self, tsr_kv_seq *q) {
    zc_cache *c = self;
    zc_layer *layers = zc_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        c->kv.entries -= layers[l].nc * c->kv.n_kv_head;
        zc_layer_free(c, &layers[l]);
    }
}

/* The sequence's state besides the store's rows, copied from `from` when not NULL. */
static tsr_status zc_seq_init(void *self, tsr_kv_seq *q, const tsr_kv_seq *from) {
    zc_cache *c = self;
    const tsr_host *h = c->kv.host;
    zc_layer *layers = zc_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) layers[l] = (zc_layer){0};
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        zc_layer *T = &layers[l];
        T->heads = tsr_calloc(h, (size_t)c->kv.n_kv_head, sizeof(zc_head));
        if (!T->heads) return zc_nomem(c, from ? "seq_fork" : "seq_begin");
        if (!from) continue;
        const zc_layer *F = &zc_layers(c, from)[l];
        tsr_status st = zc_reserve(c, T, F->cap);
        if (st < 0) return st;
        if (F->cap) {
            memcpy(T->pos, F->pos, (size_t)F->cap * sizeof(int32_t));
            memcpy(T->score, F->score, (size_t)(F->cap * c->kv.n_kv_head) * sizeof(float));
        }
        T->chunks = F->chunk_cap ? h->alloc(h->ctx, (size_t)F->chunk_cap * sizeof(zc_chunk), 0)
                                 : NULL;
        if (F->chunk_cap && !T->chunks) return zc_nomem(c, "seq_fork");
        T->chunk_cap = F->chunk_cap;
        for (int64_t k = 0; k < F->n_chunks; k++) {
            zc_chunk ch = F->chunks[k];
            if (!(ch.mem = h->alloc(h->ctx, ch.bytes, 0))) return zc_nomem(c, "seq_fork");
            memcpy(ch.mem, F->chunks[k].mem, ch.bytes);
            tsr_kv_store_account(&c->kv, (int64_t)ch.bytes);
            T->chunks[T->n_chunks++] = ch;
        }
        T->nc = F->nc;
        c->kv.entries += T->nc * c->kv.n_kv_head;
        T->q_first = F->q_first;
        T->q_last = F->q_last;
        T->fresh = F->fresh;
        T->scored = F->scored;
    }
    return TSR_OK;
}

static tsr_status zc_seq_begin(void *self, int64_t id) {
    return tsr_kv_store_seq_begin_with(self, id, zc_seq_init, zc_seq_fini);
}
static void zc_seq_end(void *self, int64_t id) { tsr_kv_store_seq_end_with(self, id, zc_seq_fini); }
static tsr_status zc_seq_fork(void *self, int64_t src, int64_t dst) {
    return tsr_kv_store_seq_fork_with(self, src, dst, zc_seq_init, zc_seq_fini);
}

/* A cut keeps the chunks' tokens below it (a chunk cut inside reads its first tokens as
 * before) and the rows below it. */
static tsr_status zc_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    zc_cache *c = self;
    tsr_status st = tsr_kv_store_seq_truncate(self, id, n_pos);
    if (st < 0) return st;
    zc_layer *layers = zc_layers(c, tsr_kv_store_find(&c->kv, id));
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        zc_layer *L = &layers[l];
        int64_t cut = 0;
        while (cut < L->nc && L->pos[cut] < n_pos) cut++;
        if (cut == L->nc) continue;
        int64_t k = zc_find_chunk(L, cut);
        if (L->chunks[k].start < cut) {
            L->chunks[k].len = cut - L->chunks[k].start;
            k++;
        }
        zc_layer_chunks_free(c, L, k);
        c->kv.entries -= (L->nc - cut) * c->kv.n_kv_head;
        L->nc = cut;
    }
    return TSR_OK;
}

/* Bits per value of a layer: its chunks' blocks and its f32 rows, over its K and V elements. */
static void zc_bits_held(const void *self, const tsr_kv_seq *q, int32_t layer, double *bits,
                         double *values) {
    const zc_cache *c = self;
    const zc_layer *L = &zc_layers(c, q)[layer];
    for (int64_t k = 0; k < L->n_chunks; k++) *bits += 8.0 * (double)L->chunks[k].bytes;
    *bits += 8.0 * 2.0 * (double)q->layers[layer].n * (double)c->kv.row_bytes * c->kv.n_kv_head;
    *values += 2.0 * (double)(L->nc + q->layers[layer].n) * c->kv.head_dim * c->kv.n_kv_head;
}

static void zc_stats(void *self, tsr_cache_stats *out) {
    tsr_kv_store_stats_with(self, out, zc_bits_held);
}

static void zc_destroy(void *self) {
    zc_cache *c = self;
    tsr_kv_store_fini_all(self, zc_seq_fini);
    c->kv.host->free(c->kv.host->ctx, c->layers);
    tsr_kv_store_destroy(c);
}

static const char *const zc_high_bits[] = {"2", "4", "8", "16", "32", NULL};
static const char *const zc_low_bits[] = {"2", "4", "8", NULL};

static tsr_status zc_create(const tsr_host *host, const tsr_params *params,
                            const tsr_cache_init *init, void **out) {
    static const int32_t high_values[] = {2, 4, 8, 16, 32}, low_values[] = {2, 4, 8};
    int32_t high = high_values[tsr_param_int(params, "high_bits")];
    int32_t low = low_values[tsr_param_int(params, "low_bits")];
    tsr_status st;
    if ((st = tsr_kv_store_need_ctx(host, init)) < 0 || (st = tsr_kvq_check_head(host, init)) < 0)
        return st;
    if (high < low) {
        host->set_error(host->ctx, "high_bits %d is below low_bits %d: salient tokens get the "
                        "wider codes", (int)high, (int)low);
        return TSR_E_INVALID;
    }
    void *self;
    st = tsr_kv_store_create(host, params, init, sizeof(zc_cache), 0, &self);
    if (st < 0) return st;
    zc_cache *c = self;
    c->bits[0] = low;
    c->bits[1] = high;
    c->lay[0] = tsr_kvq_layout_make(init->head_dim, low);
    c->lay[1] = tsr_kvq_layout_make(init->head_dim, zc_is_code(high) ? high : 8);
    c->salient = tsr_param_float(params, "salient");
    c->gap = tsr_param_int(params, "gap");
    c->layers = tsr_calloc(host, (size_t)init->n_seq_max * (size_t)init->n_layer,
                           sizeof(zc_layer));
    if (!c->layers) {
        tsr_kv_store_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *out = c;
    return TSR_OK;
}

static const tsr_param_def zc_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "high_bits", .type = TSR_PARAM_ENUM, .default_value = "4",
     .choices = zc_high_bits, .unit = "bits",
     .doc = "salient tokens: 2, 4 or 8-bit codes, or 16 (IEEE half) / 32 (f32) rows"},
    {TSR_SIZED(tsr_param_def), .name = "low_bits", .type = TSR_PARAM_ENUM, .default_value = "2",
     .choices = zc_low_bits, .unit = "bits", .doc = "the other tokens: 2, 4 or 8-bit codes"},
    {TSR_SIZED(tsr_param_def), .name = "salient", .type = TSR_PARAM_FLOAT, .default_value = "0.6",
     .min = 0, .max = 1,
     .doc = "fraction of each chunk's tokens (per KV head) kept at high_bits"},
    {TSR_SIZED(tsr_param_def), .name = "gap", .type = TSR_PARAM_INT, .default_value = "100",
     .min = 1, .max = 1 << 20, .unit = "tokens",
     .doc = "generated tokens kept in f32 before they are compressed as one chunk"},
};

static const tsr_cache_vtable zc_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = zc_create,
    .destroy = zc_destroy,
    .seq_begin = zc_seq_begin,
    .seq_end = zc_seq_end,
    .seq_fork = zc_seq_fork,
    .seq_truncate = zc_seq_truncate,
    .store = zc_store,
    .view = zc_view,
    .prefill_end = zc_prefill_end,
    .step_end = zc_step_end,
    .stats = zc_stats,
    .view_ext = zc_view_ext,
};

static const tsr_plugin_desc zc_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "zipcache",
    .version = "1.0",
    .description = "ZipCache: salient tokens (normalized attention) at high bits, the rest at low "
                   "bits, per KV head",
    TSR_PARAMS(zc_params),
    .vtable = &zc_vtable,
};

TSR_PLUGIN_EXPORT(&zc_desc)
