/* Products of quantized weights with quantized activations: the scalar reference of every
 * type, the level tables and the entry points dispatch.c forwards to. */
#include "quants.h"

#include <math.h>
#include <pthread.h>

/* ---------------------------------------------------------------------------------------- */
/* Integer parts                                                                             */

void tsr_q_legacy_unpack(int qm, const void *w, int64_t b, int8_t q[TSR_QK], uint16_t *d,
                         uint16_t *m) {
    const uint8_t *qs, *qh = NULL;
    int off = 0;
    switch (qm) {
    case TSR_QM_Q4_0: {
        const tsr_block_q4_0 *p = (const tsr_block_q4_0 *)w + b;
        *d = p->d, qs = p->qs, off = 8;
        break;
    }
    case TSR_QM_Q4_1: {
        const tsr_block_q4_1 *p = (const tsr_block_q4_1 *)w + b;
        *d = p->d, *m = p->m, qs = p->qs;
        break;
    }
    case TSR_QM_Q5_0: {
        const tsr_block_q5_0 *p = (const tsr_block_q5_0 *)w + b;
        *d = p->d, qs = p->qs, qh = p->qh, off = 16;
        break;
    }
    case TSR_QM_Q5_1: {
        const tsr_block_q5_1 *p = (const tsr_block_q5_1 *)w + b;
        *d = p->d, *m = p->m, qs = p->qs, qh = p->qh;
        break;
    }
    case TSR_QM_IQ4_NL: {
        const tsr_block_iq4_nl *p = (const tsr_block_iq4_nl *)w + b;
        *d = p->d;
        for (int j = 0; j < TSR_QK / 2; j++) {
            q[j] = tsr_iq4nl_values[p->qs[j] & 0xf];
            q[j + TSR_QK / 2] = tsr_iq4nl_values[p->qs[j] >> 4];
        }
        return;
    }
    default: {
        const tsr_block_q8_0 *p = (const tsr_block_q8_0 *)w + b;
        *d = p->d;
        memcpy(q, p->q, TSR_QK);
        return;
    }
    }
    /* 4-bit quants: low nibbles are elements 0-15, high ones 16-31; the fifth bit of
     * element j is bit j of qh. */
    uint32_t h = 0;
    if (qh) h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 |
                (uint32_t)qh[3] << 24;
    for (int j = 0; j < TSR_QK / 2; j++) {
        q[j] = (int8_t)(((qs[j] & 0xf) | ((h >> j) & 1) << 4) - off);
        q[j + 16] = (int8_t)(((qs[j] >> 4) | ((h >> (j + 16)) & 1) << 4) - off);
    }
}

/* Element e of the 2-bit planes of Q2_K / Q3_K (see quants_ref.c). */
static int q2_at(const uint8_t *qs, int e) {
    return (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

static void idot_q2_k(const tsr_block_q2_k *w, const tsr_block_q8_k *x, int32_t *is, int32_t *ms) {
    int32_t s = 0, m = 0;
    for (int g = 0; g < 16; g++) {
        int32_t d = 0;
        for (int l = 0; l < 16; l++) d += q2_at(w->qs, 16 * g + l) * x->qs[16 * g + l];
        s += (w->scales[g] & 0xf) * d;
        m += (w->scales[g] >> 4) * x->bsums[g];
    }
    *is = s;
    *ms = m;
}

static void idot_q3_k(const tsr_block_q3_k *w, const tsr_block_q8_k *x, int32_t *is) {
    int sc[16];
    tsr_q3k_scales(w->scales, sc);
    int32_t s = 0;
    for (int g = 0; g < 16; g++) {
        int32_t d = 0;
        for (int l = 0; l < 16; l++) {
            int e = 16 * g + l;
            int q = q2_at(w->qs, e) - ((w->hmask[e % 32] >> (e / 32)) & 1 ? 0 : 4);
            d += q * x->qs[e];
        }
        s += sc[g] * d;
    }
    *is = s;
}

static void idot_q45_k(const uint8_t *scales, const uint8_t *qs, const uint8_t *qh,
                       const tsr_block_q8_k *x, int32_t *is, int32_t *ms) {
    int32_t s = 0, m = 0;
    for (int g = 0; g < 8; g++) {
        int sc, mn;
        tsr_qk_scale_min(scales, g, &sc, &mn);
        const uint8_t *q = qs + 32 * (g / 2);
        int32_t d = 0;
        for (int l = 0; l < 32; l++) {
            int v = g % 2 ? q[l] >> 4 : q[l] & 0xf;
            if (qh) v |= ((qh[l] >> g) & 1) << 4;
            d += v * x->qs[32 * g + l];
        }
        s += sc * d;
        m += mn * (x->bsums[2 * g] + x->bsums[2 * g + 1]);
    }
    *is = s;
    *ms = m;
}

static void idot_q6_k(const tsr_block_q6_k *w, const tsr_block_q8_k *x, int32_t *is) {
    int32_t s = 0;
    for (int g = 0; g < 16; g++) {
        int32_t d = 0;
        for (int l = 0; l < 16; l++) {
            int e = 16 * g + l, h = e / 128, p = (e % 128) / 32, i = e % 32;
            int lo = (w->ql[64 * h + 32 * (p % 2) + i] >> (4 * (p / 2))) & 0xf;
            int hi = (w->qh[32 * h + i] >> (2 * p)) & 3;
            d += ((lo | hi << 4) - 32) * x->qs[e];
        }
        s += w->scales[g] * d;
    }
    *is = s;
}

static void idot_iq4_xs(const tsr_block_iq4_xs *w, const tsr_block_q8_k *x, int32_t *is) {
    int32_t s = 0;
    for (int g = 0; g < 8; g++) {
        const uint8_t *q = w->qs + 16 * g;
        int32_t d = 0;
        for (int j = 0; j < 16; j++)
            d += tsr_iq4nl_values[q[j] & 0xf] * x->qs[32 * g + j] +
                 tsr_iq4nl_values[q[j] >> 4] * x->qs[32 * g + j + 16];
        s += tsr_iq4xs_scale(w, g) * d;
    }
    *is = s;
}

void tsr_qk_idot(int qm, const void *w, const tsr_block_q8_k *x, int32_t *isum, int32_t *msum) {
    *isum = *msum = 0;
    switch (qm) {
    case TSR_QM_Q2_K: idot_q2_k(w, x, isum, msum); break;
    case TSR_QM_Q3_K: idot_q3_k(w, x, isum); break;
    case TSR_QM_Q4_K: {
        const tsr_block_q4_k *b = w;
        idot_q45_k(b->scales, b->qs, NULL, x, isum, msum);
        break;
    }
    case TSR_QM_Q5_K: {
        const tsr_block_q5_k *b = w;
        idot_q45_k(b->scales, b->qs, b->qh, x, isum, msum);
        break;
    }
    case TSR_QM_Q6_K: idot_q6_k(w, x, isum); break;
    case TSR_QM_IQ4_XS: idot_iq4_xs(w, x, isum); break;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar tiles                                                                              */

static float dot_legacy(int qm, const void *w, const void *x, int64_t nb) {
    const int xm = tsr_q_legacy_has_min(qm);
    float acc[TSR_Q8_LANES] = {0}, mins = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int8_t q[TSR_QK];
        uint16_t dw, mw = 0;
        tsr_q_legacy_unpack(qm, w, b, q, &dw, &mw);
        const tsr_block_q8_0 *x0 = (const tsr_block_q8_0 *)x + b;
        const tsr_block_q8_1 *x1 = (const tsr_block_q8_1 *)x + b;
        const int8_t *xq = xm ? x1->qs : x0->q;
        float s = tsr_fp16_to_fp32(dw) * tsr_fp16_to_fp32(xm ? x1->d : x0->d);
        for (int k = 0; k < TSR_Q8_LANES; k++) {
            int32_t l = 0;
            for (int j = 4 * k; j < 4 * k + 4; j++) l += q[j] * xq[j];
            acc[k] = fmaf(s, (float)l, acc[k]);
        }
        if (xm) mins = fmaf(tsr_fp16_to_fp32(mw), tsr_fp16_to_fp32(x1->s), mins);
    }
    return xm ? tsr_q8_lanes_sum(acc) + mins : tsr_q8_lanes_sum(acc);
}

void tsr_qk_lane_idot(int qm, const void *w, const tsr_block_q8_k *x, int32_t lanes[8],
                      int32_t mins[4]) {
    memset(lanes, 0, 8 * sizeof *lanes);
    memset(mins, 0, 4 * sizeof *mins);
    if (qm == TSR_QM_Q4_K) {
        const tsr_block_q4_k *p = w;
        int sc[8], mn[8];
        for (int g = 0; g < 8; g++) tsr_qk_scale_min(p->scales, g, &sc[g], &mn[g]);
        for (int e = 0; e < TSR_QK_K; e++) {
            int g = e / 32, q = (p->qs[32 * (g / 2) + e % 32] >> (4 * (g % 2))) & 0xf;
            lanes[e % 32 / 4] += sc[g] * q * x->qs[e];
        }
        for (int m = 0; m < 4; m++)
            for (int j = 0; j < 2; j++)
                mins[m] += mn[2 * m + j] * (x->bsums[4 * m + 2 * j] + x->bsums[4 * m + 2 * j + 1]);
    } else { /* Q6_K */
        const tsr_block_q6_k *p = w;
        for (int e = 0; e < TSR_QK_K; e++) {
            int h = e / 128, c = (e % 128) / 32, i = e % 32;
            int lo = (p->ql[64 * h + 32 * (c % 2) + i] >> (4 * (c / 2))) & 0xf;
            int hi = (p->qh[32 * h + i] >> (2 * c)) & 3;
            lanes[i / 4] += p->scales[e / 16] * ((lo | hi << 4) - 32) * x->qs[e];
        }
    }
}

static float dot_k(int qm, const void *w, const tsr_block_q8_k *x, int64_t nb) {
    if (tsr_qk_llama_lanes(qm)) {
        float acc[TSR_Q8_LANES] = {0}, accm[4] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const void *wb = (const char *)w + b * tsr_qm_block_bytes(qm);
            int32_t l[TSR_Q8_LANES], m[4];
            float d, dmin;
            tsr_qk_lane_idot(qm, wb, &x[b], l, m);
            tsr_qk_block_scales(qm, wb, &d, &dmin);
            float dd = x[b].d * d, dm = -x[b].d * dmin;
            for (int k = 0; k < TSR_Q8_LANES; k++) acc[k] = fmaf(dd, (float)l[k], acc[k]);
            for (int k = 0; k < 4; k++) accm[k] = fmaf(dm, (float)m[k], accm[k]);
        }
        return tsr_qk_llama_sum(qm, acc, accm);
    }
    float lanes[TSR_Q8_LANES] = {0};
    size_t bytes = tsr_qm_block_bytes(qm);
    for (int64_t b = 0; b < nb; b++) {
        const void *wb = (const char *)w + b * bytes;
        int32_t is, ms;
        float d, dmin;
        tsr_qk_idot(qm, wb, &x[b], &is, &ms);
        tsr_qk_block_scales(qm, wb, &d, &dmin);
        lanes[b % TSR_Q8_LANES] += tsr_qk_value(is, ms, d, dmin, x[b].d);
    }
    return tsr_q8_lanes_sum(lanes);
}

#define SCALAR_TILE(name, qm, dot, xtype, blk)                                                 \
    static void name(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,    \
                     size_t x_stride, int64_t n_in, int n_r, int n_t) {                       \
        for (int t = 0; t < n_t; t++)                                                          \
            for (int r = 0; r < n_r; r++)                                                      \
                y[t * ldy + r] = dot(qm, (const char *)w + r * w_stride,                       \
                                     (const xtype *)((const char *)x + t * x_stride),          \
                                     n_in / (blk));                                            \
    }
SCALAR_TILE(tile_q4_0, TSR_QM_Q4_0, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_q4_1, TSR_QM_Q4_1, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_q5_0, TSR_QM_Q5_0, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_q5_1, TSR_QM_Q5_1, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_q8_0, TSR_QM_Q8_0, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_iq4_nl, TSR_QM_IQ4_NL, dot_legacy, void, TSR_QK)
SCALAR_TILE(tile_q2_k, TSR_QM_Q2_K, dot_k, tsr_block_q8_k, TSR_QK_K)
SCALAR_TILE(tile_q3_k, TSR_QM_Q3_K, dot_k, tsr_block_q8_k, TSR_QK_K)
SCALAR_TILE(tile_q4_k, TSR_QM_Q4_K, dot_k, tsr_block_q8_k, TSR_QK_K)
SCALAR_TILE(tile_q5_k, TSR_QM_Q5_K, dot_k, tsr_block_q8_k, TSR_QK_K)
SCALAR_TILE(tile_q6_k, TSR_QM_Q6_K, dot_k, tsr_block_q8_k, TSR_QK_K)
SCALAR_TILE(tile_iq4_xs, TSR_QM_IQ4_XS, dot_k, tsr_block_q8_k, TSR_QK_K)

const tsr_quant_ops tsr_quant_ops_scalar = {
    .tile = {tile_q4_0, tile_q4_1, tile_q5_0, tile_q5_1, tile_q8_0, tile_iq4_nl, tile_q2_k,
             tile_q3_k, tile_q4_k, tile_q5_k, tile_q6_k, tile_iq4_xs},
    .q8_1_quantize_row = tsr_q8_1_quantize_row_ref,
    .q8_k_quantize_row = tsr_q8_k_quantize_row_ref,
};

/* ---------------------------------------------------------------------------------------- */
/* Levels                                                                                    */

static tsr_quant_ops g_qops[3];
static pthread_once_t g_qonce = PTHREAD_ONCE_INIT;

#if defined(TSR_KERNELS_X86)
static void fill(tsr_quant_ops *dst, const tsr_quant_ops *src, const tsr_quant_ops *below) {
    *dst = *src;
    for (int i = 0; i < TSR_QM_COUNT; i++) {
        if (!dst->tile[i]) dst->tile[i] = below->tile[i];
        if (!dst->mm[i]) dst->mm[i] = below->mm[i];
    }
    if (!dst->q8_1_quantize_row) dst->q8_1_quantize_row = below->q8_1_quantize_row;
    if (!dst->q8_k_quantize_row) dst->q8_k_quantize_row = below->q8_k_quantize_row;
}
#endif

static void qinit(void) {
    g_qops[0] = g_qops[1] = g_qops[2] = tsr_quant_ops_scalar;
#if defined(TSR_KERNELS_X86)
    fill(&g_qops[1], &tsr_quant_ops_avx2, &g_qops[0]);
    fill(&g_qops[2], &tsr_quant_ops_avx512, &g_qops[1]);
#endif
}

static const tsr_quant_ops *qops(void) {
    pthread_once(&g_qonce, qinit);
    return &g_qops[tsr_cpu_level_get()];
}

void tsr_q8_1_quantize_row(tsr_block_q8_1 *y, const float *x, int64_t n) {
    qops()->q8_1_quantize_row(y, x, n);
}

void tsr_q8_k_quantize_row(tsr_block_q8_k *y, const float *x, int64_t n) {
    qops()->q8_k_quantize_row(y, x, n);
}

/* ---------------------------------------------------------------------------------------- */
/* Entry points                                                                              */

int tsr_quant_mm_index(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q4_0: return TSR_QM_Q4_0;
    case TSR_DTYPE_Q4_1: return TSR_QM_Q4_1;
    case TSR_DTYPE_Q5_0: return TSR_QM_Q5_0;
    case TSR_DTYPE_Q5_1: return TSR_QM_Q5_1;
    case TSR_DTYPE_Q8_0: return TSR_QM_Q8_0;
    case TSR_DTYPE_IQ4_NL: return TSR_QM_IQ4_NL;
    case TSR_DTYPE_Q2_K: return TSR_QM_Q2_K;
    case TSR_DTYPE_Q3_K: return TSR_QM_Q3_K;
    case TSR_DTYPE_Q4_K: return TSR_QM_Q4_K;
    case TSR_DTYPE_Q5_K: return TSR_QM_Q5_K;
    case TSR_DTYPE_Q6_K: return TSR_QM_Q6_K;
    case TSR_DTYPE_IQ4_XS: return TSR_QM_IQ4_XS;
    }
    return -1;
}

int32_t tsr_quant_act_type(int32_t wtype) {
    int qm = tsr_quant_mm_index(wtype);
    if (qm < 0) return -1;
    if (qm == TSR_QM_Q4_1 || qm == TSR_QM_Q5_1) return TSR_DTYPE_Q8_1;
    return qm >= TSR_QM_Q2_K ? TSR_DTYPE_Q8_K : TSR_DTYPE_Q8_0;
}

tsr_status tsr_quant_prepare_row(int32_t act_type, void *dst, const float *src, int64_t n) {
    const tsr_quant_ops *o = qops();
    if (act_type == TSR_DTYPE_Q8_0)
        tsr_q8_0_quantize_row(dst, src, n);
    else if (act_type == TSR_DTYPE_Q8_1)
        o->q8_1_quantize_row(dst, src, n);
    else if (act_type == TSR_DTYPE_Q8_K)
        o->q8_k_quantize_row(dst, src, n);
    else
        return TSR_E_UNSUPPORTED;
    return TSR_OK;
}

static tsr_status check(int32_t wtype, int64_t n_in) {
    if (tsr_quant_mm_index(wtype) < 0) return TSR_E_UNSUPPORTED;
    if (n_in < 0 || n_in % tsr_dtype_block_elems(wtype)) return TSR_E_INVALID;
    return TSR_OK;
}

/* Rows outside, tokens inside, 4 x 4 tiles: a tile's weight blocks are unpacked once for up
 * to four tokens, and its rows stay in cache while the tokens pass. */
tsr_status tsr_quant_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                            int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth) {
    tsr_status st = check(wtype, n_in);
    if (st) return st;
    if (ldy < n_out) return TSR_E_INVALID;
    const tsr_quant_ops *o = qops();
    int qm = tsr_quant_mm_index(wtype);
    tsr_mm_tile_fn tile = o->tile[qm];
    size_t w_stride = tsr_row_size(wtype, n_in);
    size_t x_stride = tsr_row_size(tsr_quant_act_type(wtype), n_in);
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 16, ith, nth);
    if (r0 < r1 && n_tok > 0 && o->mm[qm] &&
        o->mm[qm](y + r0, ldy, (const char *)w + r0 * w_stride, w_stride, xp, x_stride, n_in,
                  r1 - r0, n_tok) == 0)
        return TSR_OK;
    if (n_tok == 1) {
        tsr_stream_rows(tile, y, w, w_stride, xp, n_in, r0, r1);
        return TSR_OK;
    }
    for (int64_t r = r0; r < r1; r += TSR_QM_TILE) {
        int n_r = (int)(r1 - r < TSR_QM_TILE ? r1 - r : TSR_QM_TILE);
        for (int64_t t = 0; t < n_tok; t += TSR_QM_TILE) {
            int n_t = (int)(n_tok - t < TSR_QM_TILE ? n_tok - t : TSR_QM_TILE);
            tile(y + t * ldy + r, ldy, (const char *)w + r * w_stride, w_stride,
                 (const char *)xp + t * x_stride, x_stride, n_in, n_r, n_t);
        }
    }
    return TSR_OK;
}

float tsr_quant_row_dot(int32_t wtype, int64_t n, const void *w, const void *xp) {
    float y = 0.0f;
    if (check(wtype, n)) return 0.0f;
    qops()->tile[tsr_quant_mm_index(wtype)](&y, 1, w, 0, xp, 0, n, 1, 1);
    return y;
}
