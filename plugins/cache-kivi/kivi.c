/*
 * cache 'kivi': KIVI (Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu,
 * "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
 * arXiv:2402.02750; code jy-yuan/KIVI). Keys are quantized per channel, values per token, both
 * to 2 or 4 bits on an asymmetric min/max grid, and the most recent tokens stay in full
 * precision:
 *
 * - keys: a group of `group` consecutive tokens shares, per channel, a zero and a step (the
 *   channel's min and (max - min) / (2^bits - 1) over the group). The residual of keys grows to
 *   `residual` tokens (a multiple of group) and is then quantized whole, as KIVI's decode does;
 *   a prefill of n tokens quantizes the first n - n % residual at once.
 * - values: each token's channels are cut into groups of `group` channels with their own zero
 *   and step; the residual holds the latest `residual` values, and each value that leaves it is
 *   quantized alone.
 *
 * KIVI quantizes after the attention of the step that filled the residual; here that work
 * happens at the start of the next store of the layer, which is the same moment as far as
 * attention can tell: every query reads its own step's K/V in full precision.
 *
 * Zeros and steps are f16, rounded outward (<tessera/sdk_cache.h>'s tsr_kvq_grid) so that
 * every value lies within step / 2 of the grid. Views with quantized entries have dtype
 * KIVI_DTYPE: load_k / load_v dequantize rows, and dot_k / axpy_v (tsr_kv_view_ext) compute on
 * the codes: q.k = sum_d (q_d step_d) code_d + sum_d q_d zero_d per key group, and the values'
 * zeros are summed per channel group once per call. A layer with nothing quantized yet shows
 * its f32 rows as a plain F32 view, read exactly as 'full' is.
 *
 * Storage: the store's f32 rows (<tessera/sdk_cache.h>) hold entries [r0, n) with
 * r0 = min(keys quantized, values quantized): their keys below the key boundary (or values
 * below the value boundary) are already quantized and no longer read.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

/* The dtype of views that hold quantized entries. */
#define KIVI_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 0x4b1)
/* Quantized entries are reserved in steps that double from this many. */
#define KIVI_MIN_QUANT 64
#define KIVI_MIN_ROWS 16
/* Value grids converted, and coefficients made, for this many floats at a time (each on the
 * stack of axpy_v). */
#define KIVI_BLOCK_FLOATS 1024

typedef struct kivi_cache kivi_cache;
typedef struct kivi_layer kivi_layer;

/* What the loaders and products of one view read: one KV head of one (sequence, layer). */
typedef struct kivi_head {
    const kivi_cache *c;
    const kivi_layer *L;
    const tsr_kv_rows *rows;
    int32_t head;
} kivi_head;

struct kivi_layer {
    int64_t n;        /* entries held: positions 0..n-1 */
    int64_t r0;       /* the rows hold entries [r0, n): row i is entry r0 + i */
    int64_t nqk, nqv; /* keys of entries [0, nqk) and values of [0, nqv) are quantized */
    int64_t qcap;     /* entries the quantized arrays have room for, a multiple of group */
    char *kcode;      /* (n_kv_head) codes of qcap rows in c->lay */
    uint16_t *kgrid;  /* (n_kv_head, qcap / group, 2, head_dim): per channel zero, then step */
    char *vcode;      /* (n_kv_head) codes of qcap rows */
    uint16_t *vgrid;  /* (n_kv_head, qcap, vgroups, 2): per channel group zero, step */
    int32_t *pos;     /* (pcap) position of every entry */
    int64_t pcap;
    kivi_head *heads; /* (n_kv_head) the views' load_ctx */
};

struct kivi_cache {
    tsr_kv_store kv;       /* first: slots, the f32 residual rows, counters */
    int32_t bits, group, residual;
    tsr_kvq_layout lay;    /* of key and value codes */
    int32_t vgroups;       /* channel groups of a value */
    int32_t *slot_group;   /* (lay.slots) the value group of each slot's 16 channels, or NULL
                              when a group boundary falls inside a slot */
    kivi_layer *layers;    /* (n_seq_max, n_layer) */
};

static kivi_layer *kivi_layers(const kivi_cache *c, const tsr_kv_seq *q) {
    return c->layers + (size_t)tsr_kv_store_slot(&c->kv, q) * (size_t)c->kv.n_layer;
}

/* Bytes of the quantized arrays for qcap entries, all heads. */
static int64_t kivi_quant_bytes(const kivi_cache *c, int64_t qcap) {
    int64_t per_head = 2 * (int64_t)tsr_kvq_bytes(&c->lay, qcap) +
                       qcap / c->group * 2 * c->kv.head_dim * 2 + qcap * c->vgroups * 2 * 2;
    return per_head * c->kv.n_kv_head;
}

/* Head h's key codes (values = 0) or value codes. */
static char *kivi_codes(const kivi_cache *c, const kivi_layer *L, int32_t h, int values) {
    return (values ? L->vcode : L->kcode) + (size_t)h * tsr_kvq_bytes(&c->lay, L->qcap);
}
static uint16_t *kivi_kgrid(const kivi_cache *c, const kivi_layer *L, int32_t h, int64_t g) {
    return L->kgrid + ((size_t)h * (size_t)(L->qcap / c->group) + (size_t)g) * 2 *
                          (size_t)c->kv.head_dim;
}
static uint16_t *kivi_vgrid(const kivi_cache *c, const kivi_layer *L, int32_t h, int64_t j) {
    return L->vgrid + ((size_t)h * (size_t)L->qcap + (size_t)j) * 2 * (size_t)c->vgroups;
}
/* Entry j's f32 key (values = 0) or value row of head h, j in [r0, n). */
static const float *kivi_row(const kivi_cache *c, const kivi_layer *L, const tsr_kv_rows *rows,
                             int32_t h, int64_t j, int values) {
    const char *base = values ? rows->v : rows->k;
    return (const float *)(base + ((size_t)h * (size_t)rows->cap + (size_t)(j - L->r0)) *
                                      c->kv.row_bytes);
}

static void kivi_layer_free(kivi_cache *c, kivi_layer *L) {
    const tsr_host *h = c->kv.host;
    tsr_kv_store_account(&c->kv, -kivi_quant_bytes(c, L->qcap));
    h->free(h->ctx, L->kcode);
    h->free(h->ctx, L->kgrid);
    h->free(h->ctx, L->vcode);
    h->free(h->ctx, L->vgrid);
    h->free(h->ctx, L->pos);
    h->free(h->ctx, L->heads);
    *L = (kivi_layer){0};
}

/* Head h's quantized keys and values of `from` into `to` (room enough). */
static void kivi_copy_quant(const kivi_cache *c, kivi_layer *to, const kivi_layer *from,
                            int32_t h) {
    memcpy(kivi_codes(c, to, h, 0), kivi_codes(c, from, h, 0), tsr_kvq_bytes(&c->lay, from->nqk));
    memcpy(kivi_kgrid(c, to, h, 0), kivi_kgrid(c, from, h, 0),
           (size_t)(from->nqk / c->group * 2 * c->kv.head_dim) * sizeof(uint16_t));
    memcpy(kivi_codes(c, to, h, 1), kivi_codes(c, from, h, 1), tsr_kvq_bytes(&c->lay, from->nqv));
    memcpy(kivi_vgrid(c, to, h, 0), kivi_vgrid(c, from, h, 0),
           (size_t)(from->nqv * 2 * c->vgroups) * sizeof(uint16_t));
}

/* Gives the quantized arrays room for `need` entries, keeping what they hold. */
static tsr_status kivi_reserve_quant(kivi_cache *c, kivi_layer *L, int64_t need) {
    if (need <= L->qcap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    const int32_t nkv = c->kv.n_kv_head, hd = c->kv.head_dim;
    int64_t cap = L->qcap ? L->qcap : KIVI_MIN_QUANT;
    while (cap < need) cap *= 2;
    cap = (cap + c->group - 1) / c->group * c->group;
    kivi_layer to = {.qcap = cap};
    to.kcode = tsr_calloc(h, (size_t)nkv, tsr_kvq_bytes(&c->lay, cap));
    to.kgrid = tsr_calloc(h, (size_t)(nkv * (cap / c->group) * 2 * hd), sizeof(uint16_t));
    to.vcode = tsr_calloc(h, (size_t)nkv, tsr_kvq_bytes(&c->lay, cap));
    to.vgrid = tsr_calloc(h, (size_t)(nkv * cap * 2 * c->vgroups), sizeof(uint16_t));
    if (!to.kcode || !to.kgrid || !to.vcode || !to.vgrid) {
        h->free(h->ctx, to.kcode);
        h->free(h->ctx, to.kgrid);
        h->free(h->ctx, to.vcode);
        h->free(h->ctx, to.vgrid);
        h->set_error(h->ctx, "out of memory for %lld quantized entries", (long long)cap);
        return TSR_E_NOMEM;
    }
    for (int32_t hh = 0; hh < nkv && L->qcap; hh++) kivi_copy_quant(c, &to, L, hh);
    h->free(h->ctx, L->kcode);
    h->free(h->ctx, L->kgrid);
    h->free(h->ctx, L->vcode);
    h->free(h->ctx, L->vgrid);
    tsr_kv_store_account(&c->kv, kivi_quant_bytes(c, cap) - kivi_quant_bytes(c, L->qcap));
    L->kcode = to.kcode;
    L->kgrid = to.kgrid;
    L->vcode = to.vcode;
    L->vgrid = to.vgrid;
    L->qcap = cap;
    return TSR_OK;
}

/* Room for `need` positions. */
static tsr_status kivi_reserve_pos(kivi_cache *c, kivi_layer *L, int64_t need) {
    if (need <= L->pcap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    int64_t cap = L->pcap ? L->pcap : KIVI_MIN_QUANT;
    while (cap < need) cap *= 2;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof(int32_t), 0);
    if (!pos) {
        h->set_error(h->ctx, "out of memory for %lld positions", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (L->pcap) memcpy(pos, L->pos, (size_t)L->n * sizeof(int32_t));
    h->free(h->ctx, L->pos);
    L->pos = pos;
    L->pcap = cap;
    return TSR_OK;
}

/* Keys of entries [from, from + count) (whole groups) from the rows into codes: per group and
 * channel, the grid of the group's values in that channel. */
static void kivi_quantize_keys(kivi_cache *c, kivi_layer *L, const tsr_kv_rows *rows,
                               int64_t from, int64_t count) {
    const int32_t hd = c->kv.head_dim, G = c->group, bits = c->bits;
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        char *codes = kivi_codes(c, L, h, 0);
        for (int64_t j0 = from; j0 < from + count; j0 += G) {
            uint16_t *grid = kivi_kgrid(c, L, h, j0 / G);
            for (int32_t d = 0; d < hd; d++) {
                float lo = kivi_row(c, L, rows, h, j0, 0)[d], hi = lo;
                for (int64_t j = j0 + 1; j < j0 + G; j++) {
                    float x = kivi_row(c, L, rows, h, j, 0)[d];
                    lo = x < lo ? x : lo;
                    hi = x > hi ? x : hi;
                }
                tsr_kvq_grid(lo, hi, bits, &grid[d], &grid[hd + d]);
            }
            for (int64_t j = j0; j < j0 + G; j++) {
                const float *x = kivi_row(c, L, rows, h, j, 0);
                for (int32_t d = 0; d < hd; d++)
                    tsr_kvq_set(&c->lay, codes, j, d,
                                tsr_kvq_code(x[d], tsr_kvq_f16(grid[d]), tsr_kvq_f16(grid[hd + d]),
                                             bits));
            }
        }
    }
}

/* Values of entries [from, from + count) into codes: per token and group of channels. */
static void kivi_quantize_values(kivi_cache *c, kivi_layer *L, const tsr_kv_rows *rows,
                                 int64_t from, int64_t count) {
    const int32_t hd = c->kv.head_dim, G = c->group, bits = c->bits;
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        char *codes = kivi_codes(c, L, h, 1);
        for (int64_t j = from; j < from + count; j++) {
            const float *x = kivi_row(c, L, rows, h, j, 1);
            uint16_t *grid = kivi_vgrid(c, L, h, j);
            for (int32_t g = 0; g < c->vgroups; g++) {
                int32_t d0 = g * G, d1 = d0 + G < hd ? d0 + G : hd;
                float lo = x[d0], hi = lo;
                for (int32_t d = d0 + 1; d < d1; d++) {
                    lo = x[d] < lo ? x[d] : lo;
                    hi = x[d] > hi ? x[d] : hi;
                }
                tsr_kvq_grid(lo, hi, bits, &grid[2 * g], &grid[2 * g + 1]);
                float z = tsr_kvq_f16(grid[2 * g]), s = tsr_kvq_f16(grid[2 * g + 1]);
                for (int32_t d = d0; d < d1; d++)
                    tsr_kvq_set(&c->lay, codes, j, d, tsr_kvq_code(x[d], z, s, bits));
            }
        }
    }
}

/* KIVI's rule, before a store appends: keys once `residual` have gathered (whole multiples of
 * it), values beyond the latest `residual`; then the rows below both boundaries go. */
static tsr_status kivi_flush(kivi_cache *c, kivi_layer *L, tsr_kv_rows *rows) {
    int64_t resid_k = L->n - L->nqk, resid_v = L->n - L->nqv;
    int64_t kf = resid_k >= c->residual ? resid_k / c->residual * c->residual : 0;
    int64_t vf = resid_v > c->residual ? resid_v - c->residual : 0;
    if (!kf && !vf) return TSR_OK;
    tsr_status st = kivi_reserve_quant(c, L, L->nqk + kf > L->nqv + vf ? L->nqk + kf : L->nqv + vf);
    if (st < 0) return st;
    kivi_quantize_keys(c, L, rows, L->nqk, kf);
    kivi_quantize_values(c, L, rows, L->nqv, vf);
    L->nqk += kf;
    L->nqv += vf;
    int64_t r0 = L->nqk < L->nqv ? L->nqk : L->nqv;
    tsr_kv_rows_drop_front(&c->kv, rows, r0 - L->r0);
    L->r0 = r0;
    return TSR_OK;
}

static tsr_status kivi_store(void *self, const tsr_kv_write *w) {
    kivi_cache *c = self;
    tsr_kv_seq *q;
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &q);
    if (st < 0) return st;
    kivi_layer *L = &kivi_layers(c, q)[w->layer];
    tsr_kv_rows *rows = &q->layers[w->layer];
    /* After a long prompt has been quantized, the rows give the room back. */
    if ((st = tsr_kv_store_check_ctx(&c->kv, w, L->n)) < 0 || (st = kivi_flush(c, L, rows)) < 0 ||
        (st = kivi_reserve_pos(c, L, L->n + w->n)) < 0 ||
        (st = tsr_kv_rows_fit(&c->kv, rows, rows->n + w->n, KIVI_MIN_ROWS, 1)) < 0)
        return st;
    tsr_kv_rows_append(&c->kv, q, rows, w);
    memcpy(L->pos + L->n, w->pos, (size_t)w->n * sizeof(int32_t));
    L->n += w->n;
    return TSR_OK;
}

/* ---- reading: loaders and products on the codes ----------------------------------------- */

/* Rows dequantized slot by slot: keys on their group's per-channel grid, values on their own
 * per-group grid spread over the channels. */
TSR_VECTOR_CLONES
static void kivi_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    const kivi_head *kh = ctx;
    const kivi_cache *c = kh->c;
    const kivi_layer *L = kh->L;
    const int32_t hd = c->kv.head_dim, G = c->group;
    const char *codes = kivi_codes(c, L, kh->head, 0);
    float zero[TSR_KVQ_MAX_HEAD_DIM + 16] = {0}, step[TSR_KVQ_MAX_HEAD_DIM + 16] = {0};
    int64_t group = -1;
    for (int64_t j = j0; j < j0 + n; j++) {
        float *out = dst + (j - j0) * hd;
        if (j >= L->nqk) {
            memcpy(out, kivi_row(c, L, kh->rows, kh->head, j, 0), (size_t)hd * sizeof(float));
            continue;
        }
        if (j / G != group) {
            group = j / G;
            const uint16_t *grid = kivi_kgrid(c, L, kh->head, group);
            tsr_kvq_f16_row(zero, grid, hd);
            tsr_kvq_f16_row(step, grid + hd, hd);
        }
        tsr_kvq_dequant(&c->lay, out, hd, step, zero, codes, j);
    }
}

TSR_VECTOR_CLONES
static void kivi_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    const kivi_head *kh = ctx;
    const kivi_cache *c = kh->c;
    const kivi_layer *L = kh->L;
    const int32_t hd = c->kv.head_dim, G = c->group;
    const char *codes = kivi_codes(c, L, kh->head, 1);
    float zero[TSR_KVQ_MAX_HEAD_DIM + 16] = {0}, step[TSR_KVQ_MAX_HEAD_DIM + 16] = {0};
    for (int64_t j = j0; j < j0 + n; j++) {
        float *out = dst + (j - j0) * hd;
        if (j >= L->nqv) {
            memcpy(out, kivi_row(c, L, kh->rows, kh->head, j, 1), (size_t)hd * sizeof(float));
            continue;
        }
        const uint16_t *grid = kivi_vgrid(c, L, kh->head, j);
        if (c->slot_group) {
            for (int32_t s = 0; s < c->lay.slots; s++) {
                const float z = tsr_kvq_f16(grid[2 * c->slot_group[s]]);
                const float st = tsr_kvq_f16(grid[2 * c->slot_group[s] + 1]);
                for (int l = 0; l < 16; l++) {
                    zero[16 * s + l] = z;
                    step[16 * s + l] = st;
                }
            }
        } else {
            for (int32_t d = 0; d < hd; d++) {
                zero[d] = tsr_kvq_f16(grid[2 * (d / G)]);
                step[d] = tsr_kvq_f16(grid[2 * (d / G) + 1]);
            }
        }
        tsr_kvq_dequant(&c->lay, out, hd, step, zero, codes, j);
    }
}

/* scores[i] = q . k_{j0+i}: per key group, w_d = q_d * step_d and the constant sum q_d zero_d,
 * then one product of w with each key's codes. */
TSR_VECTOR_CLONES
static void kivi_dot_k(const void *ctx, const float *q, int64_t j0, int64_t n, float *scores) {
    const kivi_head *kh = ctx;
    const kivi_cache *c = kh->c;
    const kivi_layer *L = kh->L;
    const int32_t hd = c->kv.head_dim, G = c->group;
    const char *codes = kivi_codes(c, L, kh->head, 0);
    float w[TSR_KVQ_MAX_HEAD_DIM + 16], zero[TSR_KVQ_MAX_HEAD_DIM], step[TSR_KVQ_MAX_HEAD_DIM];
    for (int32_t d = hd; d < 16 * c->lay.slots; d++) w[d] = 0.0f;
    int64_t j = j0;
    const int64_t end = j0 + n, qend = end < L->nqk ? end : L->nqk;
    while (j < qend) {
        const int64_t g = j / G, gend = (g + 1) * G < qend ? (g + 1) * G : qend;
        const uint16_t *grid = kivi_kgrid(c, L, kh->head, g);
        tsr_kvq_f16_row(zero, grid, hd);
        tsr_kvq_f16_row(step, grid + hd, hd);
        for (int32_t d = 0; d < hd; d++) w[d] = q[d] * step[d];
        const float qz = tsr_kvq_dot_f32(q, zero, hd);
        for (; j < gend; j++) scores[j - j0] = tsr_kvq_dot(&c->lay, w, codes, j) + qz;
    }
    for (; j < end; j++)
        scores[j - j0] = tsr_kvq_dot_f32(q, kivi_row(c, L, kh->rows, kh->head, j, 0), hd);
}

/* out += sum_i p[i] v_{j0+i}. When every slot of 16 channels lies in one value group, the
 * values' codes times p * step of the slot's group add up slot by slot (tsr_kvq_axpy) and their
 * zeros times p per group, both added to out at the end; otherwise values are dequantized row
 * by row. Grids convert a block of values at a time. */
TSR_VECTOR_CLONES
static void kivi_axpy_v(const void *ctx, const float *p, int64_t j0, int64_t n, float *out) {
    const kivi_head *kh = ctx;
    const kivi_cache *c = kh->c;
    const kivi_layer *L = kh->L;
    const int32_t hd = c->kv.head_dim, ng = c->vgroups, slots = c->lay.slots;
    const int32_t block = KIVI_BLOCK_FLOATS / (2 * ng + slots);
    const char *codes = kivi_codes(c, L, kh->head, 1);
    float u[TSR_KVQ_MAX_HEAD_DIM + 16], zsum[TSR_KVQ_MAX_HEAD_DIM];
    float grid[KIVI_BLOCK_FLOATS], a[KIVI_BLOCK_FLOATS];
    const int64_t end = j0 + n, qend = end < L->nqv ? end : L->nqv;
    int64_t j = j0;
    if (j < qend && c->slot_group) {
        for (int32_t d = 0; d < 16 * slots; d++) u[d] = 0.0f;
        for (int32_t g = 0; g < ng; g++) zsum[g] = 0.0f;
        while (j < qend) {
            const int64_t m = qend - j < block ? qend - j : block;
            tsr_kvq_f16_row(grid, kivi_vgrid(c, L, kh->head, j), m * 2 * ng);
            for (int64_t t = 0; t < m; t++) {
                const float pj = p[j + t - j0], *gt = grid + t * 2 * ng;
                for (int32_t g = 0; g < ng; g++) zsum[g] += pj * gt[2 * g];
                for (int32_t s = 0; s < slots; s++)
                    a[t * slots + s] = pj * gt[2 * c->slot_group[s] + 1];
            }
            tsr_kvq_axpy(&c->lay, u, a, codes, j, m);
            j += m;
        }
        for (int32_t s = 0; s < slots; s++)
            for (int32_t l = 0; l < 16 && 16 * s + l < hd; l++)
                out[16 * s + l] += u[16 * s + l] + zsum[c->slot_group[s]];
    }
    for (; j < qend; j++) {
        kivi_load_v(kh, j, 1, u);
        for (int32_t d = 0; d < hd; d++) out[d] += p[j - j0] * u[d];
    }
    for (; j < end; j++) {
        const float pj = p[j - j0], *v = kivi_row(c, L, kh->rows, kh->head, j, 1);
        for (int32_t d = 0; d < hd; d++) out[d] += pj * v[d];
    }
}

static tsr_status kivi_view_ext(void *self, int64_t id, int32_t layer, int32_t phase,
                                tsr_kv_view *views, tsr_kv_view_ext *ext) {
    kivi_cache *c = self;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(&c->kv, id, layer, c->kv.n_layer, "view", &st);
    if (!q) return st;
    kivi_layer *L = &kivi_layers(c, q)[layer];
    if (L->nqk == 0 && L->nqv == 0) return tsr_kv_store_view(self, id, layer, phase, views);
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        L->heads[h] = (kivi_head){c, L, &q->layers[layer], h};
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = L->n, .pos = L->pos,
                                 .dtype = KIVI_DTYPE, .load_k = kivi_load_k,
                                 .load_v = kivi_load_v, .load_ctx = &L->heads[h]};
        if (ext) {
            ext[h].dot_k = kivi_dot_k;
            ext[h].axpy_v = kivi_axpy_v;
        }
    }
    return TSR_OK;
}

static tsr_status kivi_view(void *self, int64_t id, int32_t layer, int32_t phase,
                            tsr_kv_view *views) {
    return kivi_view_ext(self, id, layer, phase, views, NULL);
}

/* ---- sequences --------------------------------------------------------------------------- */

/* Frees the sequence's quantized entries (the store frees its rows). */
static void kivi_seq_fini(void *self, tsr_kv_seq *q) {
    kivi_cache *c = self;
    kivi_layer *layers = kivi_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        c->kv.entries -= (layers[l].n - q->layers[l].n) * c->kv.n_kv_head;
        kivi_layer_free(c, &layers[l]);
    }
}

/* A new sequence's layers, or a copy of `from`'s. Until a layer is copied it holds what the
 * store copied (its rows), so that fini frees exactly that. */
static tsr_status kivi_seq_init(void *self, tsr_kv_seq *q, const tsr_kv_seq *from) {
    kivi_cache *c = self;
    kivi_layer *to = kivi_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) to[l] = (kivi_layer){.n = q->layers[l].n};
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        kivi_layer *T = &to[l];
        T->heads = tsr_calloc(c->kv.host, (size_t)c->kv.n_kv_head, sizeof(kivi_head));
        if (!T->heads) {
            c->kv.host->set_error(c->kv.host->ctx, "%s: out of memory", from ? "seq_fork" : "seq_begin");
            return TSR_E_NOMEM;
        }
        if (!from) continue;
        const kivi_layer *F = &kivi_layers(c, from)[l];
        tsr_status st;
        if ((st = kivi_reserve_quant(c, T, F->qcap)) < 0 || (st = kivi_reserve_pos(c, T, F->n)) < 0)
            return st;
        for (int32_t h = 0; h < c->kv.n_kv_head && F->qcap; h++) kivi_copy_quant(c, T, F, h);
        if (F->n) memcpy(T->pos, F->pos, (size_t)F->n * sizeof(int32_t));
        c->kv.entries += (F->n - T->n) * c->kv.n_kv_head;
        T->n = F->n;
        T->r0 = F->r0;
        T->nqk = F->nqk;
        T->nqv = F->nqv;
    }
    return TSR_OK;
}

static tsr_status kivi_seq_begin(void *self, int64_t id) {
    return tsr_kv_store_seq_begin_with(self, id, kivi_seq_init, kivi_seq_fini);
}
static void kivi_seq_end(void *self, int64_t id) { tsr_kv_store_seq_end_with(self, id, kivi_seq_fini); }
static tsr_status kivi_seq_fork(void *self, int64_t src, int64_t dst) {
    return tsr_kv_store_seq_fork_with(self, src, dst, kivi_seq_init, kivi_seq_fini);
}

/* Forgets the entries at positions >= n_pos. A cut inside a quantized key group gives the
 * group's surviving keys back to the rows as they read (dequantized), since groups are whole;
 * what survives reads back as before. */
static tsr_status kivi_truncate_layer(kivi_cache *c, kivi_layer *L, tsr_kv_rows *rows,
                                      int64_t cut) {
    const tsr_host *host = c->kv.host;
    const int32_t nkv = c->kv.n_kv_head, hd = c->kv.head_dim;
    const size_t rb = c->kv.row_bytes;
    int64_t nqk = (cut < L->nqk ? cut : L->nqk) / c->group * c->group;
    int64_t nqv = cut < L->nqv ? cut : L->nqv, r0 = nqk < nqv ? nqk : nqv, m = cut - r0;
    /* The rows of [r0, cut) as they will be: (n_kv_head, m, head_dim) keys, then values. */
    float *tmp = m ? tsr_calloc(host, (size_t)(2 * nkv * m * hd), sizeof(float)) : NULL;
    if (m && !tmp) {
        host->set_error(host->ctx, "seq_truncate: out of memory");
        return TSR_E_NOMEM;
    }
    kivi_head kh = {c, L, rows, 0};
    for (int32_t h = 0; h < nkv; h++) {
        kh.head = h;
        for (int64_t j = r0; j < cut; j++) {
            float *k = tmp + ((size_t)h * (size_t)m + (size_t)(j - r0)) * (size_t)hd;
            float *v = k + (size_t)nkv * (size_t)m * (size_t)hd;
            if (j >= L->nqk) memcpy(k, kivi_row(c, L, rows, h, j, 0), rb);
            else if (j >= nqk) kivi_load_k(&kh, j, 1, k);
            if (j >= L->nqv) memcpy(v, kivi_row(c, L, rows, h, j, 1), rb);
        }
    }
    tsr_status st = m > rows->cap ? tsr_kv_rows_resize(&c->kv, rows, m) : TSR_OK;
    if (st >= 0) {
        for (int32_t h = 0; h < nkv; h++)
            for (int64_t i = 0; i < m; i++) {
                size_t at = ((size_t)h * (size_t)rows->cap + (size_t)i) * rb;
                const float *k = tmp + ((size_t)h * (size_t)m + (size_t)i) * (size_t)hd;
                memcpy(rows->k + at, k, rb);
                memcpy(rows->v + at, k + (size_t)nkv * (size_t)m * (size_t)hd, rb);
            }
        memcpy(rows->pos, L->pos + r0, (size_t)m * sizeof(int32_t));
        c->kv.entries -= (L->n - cut) * nkv;
        rows->n = m;
        L->n = cut;
        L->r0 = r0;
        L->nqk = nqk;
        L->nqv = nqv;
    }
    host->free(host->ctx, tmp);
    return st;
}

static tsr_status kivi_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    kivi_cache *c = self;
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kv, id, "seq_truncate");
    if (!q) return TSR_E_INVALID;
    if (n_pos < 0) {
        c->kv.host->set_error(c->kv.host->ctx, "seq_truncate: sequence %lld: position %d is "
                              "negative", (long long)id, (int)n_pos);
        return TSR_E_RANGE;
    }
    kivi_layer *layers = kivi_layers(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        kivi_layer *L = &layers[l];
        /* Entries are in position order, one per position. */
        int64_t cut = 0;
        while (cut < L->n && L->pos[cut] < n_pos) cut++;
        if (cut == L->n) continue;
        tsr_status st = kivi_truncate_layer(c, L, &q->layers[l], cut);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* Bits per stored value: codes, grids and the f32 rows a layer holds, over its K and V
 * elements. */
static void kivi_bits_held(const void *self, const tsr_kv_seq *q, int32_t layer, double *bits,
                           double *values) {
    const kivi_cache *c = self;
    const kivi_layer *L = &kivi_layers(c, q)[layer];
    *bits += 8.0 * (double)(tsr_kvq_bytes(&c->lay, L->nqk) + tsr_kvq_bytes(&c->lay, L->nqv) +
                            L->nqk / c->group * 2 * c->kv.head_dim * 2 + L->nqv * 2 * 2 * c->vgroups +
                            q->layers[layer].n * 2 * (int64_t)c->kv.row_bytes);
    *values += 2.0 * (double)L->n * c->kv.head_dim;
}

static void kivi_stats(void *self, tsr_cache_stats *out) {
    tsr_kv_store_stats_with(self, out, kivi_bits_held);
}

static void kivi_destroy(void *self) {
    kivi_cache *c = self;
    tsr_kv_store_fini_all(self, kivi_seq_fini);
    c->kv.host->free(c->kv.host->ctx, c->layers);
    c->kv.host->free(c->kv.host->ctx, c->slot_group);
    tsr_kv_store_destroy(c);
}

static const char *const kivi_bits[] = {"2", "4", NULL};

static tsr_status kivi_create(const tsr_host *host, const tsr_params *params,
                              const tsr_cache_init *init, void **out) {
    int64_t group = tsr_param_int(params, "group"), residual = tsr_param_int(params, "residual");
    tsr_status st;
    if ((st = tsr_kv_store_need_ctx(host, init)) < 0 || (st = tsr_kvq_check_head(host, init)) < 0)
        return st;
    if (residual % group != 0) {
        host->set_error(host->ctx, "residual %lld is not a multiple of group %lld: keys leave "
                        "the residual in whole groups", (long long)residual, (long long)group);
        return TSR_E_INVALID;
    }
    void *self;
    st = tsr_kv_store_create(host, params, init, sizeof(kivi_cache), 0, &self);
    if (st < 0) return st;
    kivi_cache *c = self;
    c->bits = tsr_param_int(params, "bits") == 0 ? 2 : 4;
    c->group = (int32_t)group;
    c->residual = (int32_t)residual;
    c->lay = tsr_kvq_layout_make(init->head_dim, c->bits);
    c->vgroups = (init->head_dim + c->group - 1) / c->group;
    c->layers = tsr_calloc(host, (size_t)init->n_seq_max * (size_t)init->n_layer,
                           sizeof(kivi_layer));
    /* Slots map to one group each when groups are whole slots, or one group spans the head. */
    int whole = c->group % 16 == 0 || c->vgroups == 1;
    c->slot_group = whole ? tsr_calloc(host, (size_t)c->lay.slots, sizeof(int32_t)) : NULL;
    for (int32_t s = 0; c->slot_group && s < c->lay.slots; s++)
        c->slot_group[s] = c->vgroups == 1 ? 0 : 16 * s / c->group;
    if (!c->layers || (whole && !c->slot_group)) {
        kivi_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *out = c;
    return TSR_OK;
}

static const tsr_param_def kivi_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "bits", .type = TSR_PARAM_ENUM, .default_value = "2",
     .choices = kivi_bits, .unit = "bits",
     .doc = "code width of quantized keys and values: 2 or 4"},
    {TSR_SIZED(tsr_param_def), .name = "group", .type = TSR_PARAM_INT, .default_value = "32",
     .min = 1, .max = 4096,
     .doc = "tokens per key group (per channel) and channels per value group (per token)"},
    {TSR_SIZED(tsr_param_def), .name = "residual", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 1, .max = 1 << 20, .unit = "tokens",
     .doc = "most recent tokens kept in f32, a multiple of group"},
};

static const tsr_cache_vtable kivi_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = kivi_create,
    .destroy = kivi_destroy,
    .seq_begin = kivi_seq_begin,
    .seq_end = kivi_seq_end,
    .seq_fork = kivi_seq_fork,
    .seq_truncate = kivi_seq_truncate,
    .store = kivi_store,
    .view = kivi_view,
    .stats = kivi_stats,
    .view_ext = kivi_view_ext,
};

static const tsr_plugin_desc kivi_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "kivi",
    .version = "1.0",
    .description = "KIVI: keys per channel, values per token in 2 or 4 bits, recent tokens in f32",
    TSR_PARAMS(kivi_params),
    .vtable = &kivi_vtable,
};

TSR_PLUGIN_EXPORT(&kivi_desc)
