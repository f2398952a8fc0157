/* The quantized tiles of quants_avx2.c and quants_avx512.c; each includes this file with its
 * own target flags after defining TSR_QX_DPBUSD(acc, u, s): acc (8 x int32) plus the sums of
 * the four u8 x s8 products of each lane (exact: the callers keep u * s pairs below 2^14).
 *
 * Integer parts are computed in whatever way is fastest; the f32 parts are those of quants.h,
 * in the same order, so the results are those of the scalar reference bit for bit. */
#ifndef TSR_KERNELS_CPU_QUANTS_X86_H
#define TSR_KERNELS_CPU_QUANTS_X86_H

#include "quants.h"

#include "x86_common.h"

#include <math.h>

/* ---------------------------------------------------------------------------------------- */
/* Unpacking to int8                                                                         */

/* 16 packed nibbles -> 32 bytes: the low nibbles, then the high ones. */
TSR_INLINE __m256i qx_nibbles(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

/* Bit j of 32 bits -> byte j: 0x10 if set, else 0. */
TSR_INLINE __m256i qx_bit4(const uint8_t qh[4]) {
    uint32_t h;
    memcpy(&h, qh, sizeof h);
    __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int32_t)h),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

TSR_INLINE __m256i qx_iq4_lookup(__m256i nib) {
    __m128i t = _mm_loadu_si128((const __m128i *)tsr_iq4nl_values);
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(t), nib);
}

/* One legacy block as 32 int8 (offsets removed); *d its scale, *m its min (Q4_1, Q5_1), as
 * fp16 bits: eight at a time are converted by vcvtph2ps, exactly as tsr_fp16_to_fp32. */
TSR_INLINE __m256i qx_unpack_legacy(int qm, const void *w, int64_t b, uint16_t *d,
                                    uint16_t *m) {
    switch (qm) {
    case TSR_QM_Q4_0: {
        const tsr_block_q4_0 *p = (const tsr_block_q4_0 *)w + b;
        *d = p->d;
        return _mm256_sub_epi8(qx_nibbles(p->qs), _mm256_set1_epi8(8));
    }
    case TSR_QM_Q4_1: {
        const tsr_block_q4_1 *p = (const tsr_block_q4_1 *)w + b;
        *d = p->d;
        *m = p->m;
        return qx_nibbles(p->qs);
    }
    case TSR_QM_Q5_0: {
        const tsr_block_q5_0 *p = (const tsr_block_q5_0 *)w + b;
        *d = p->d;
        __m256i v = _mm256_or_si256(qx_nibbles(p->qs), qx_bit4(p->qh));
        return _mm256_sub_epi8(v, _mm256_set1_epi8(16));
    }
    case TSR_QM_Q5_1: {
        const tsr_block_q5_1 *p = (const tsr_block_q5_1 *)w + b;
        *d = p->d;
        *m = p->m;
        return _mm256_or_si256(qx_nibbles(p->qs), qx_bit4(p->qh));
    }
    case TSR_QM_IQ4_NL: {
        const tsr_block_iq4_nl *p = (const tsr_block_iq4_nl *)w + b;
        *d = p->d;
        return qx_iq4_lookup(qx_nibbles(p->qs));
    }
    default: {
        const tsr_block_q8_0 *p = (const tsr_block_q8_0 *)w + b;
        *d = p->d;
        return _mm256_loadu_si256((const __m256i *)p->q);
    }
    }
}

/* The 8 int32 partial sums of the dot of signed a (any int8) and b (in [-127, 127]). */
TSR_INLINE __m256i qx_dot_signed(__m256i a, __m256i b) {
    return TSR_QX_DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

/* ---------------------------------------------------------------------------------------- */
/* Legacy tiles: quants.h's rule, one block at a time                                         */

/* Each weight block is unpacked once for the tile's tokens; every (row, token) has its own
 * eight lanes (and min sum), fed block after block. */
TSR_INLINE void qx_tile_legacy(int qm, float *y, int64_t ldy, const void *w, size_t w_stride,
                               const void *x, size_t x_stride, int64_t n_in, int n_r, int n_t) {
    const int xm = tsr_q_legacy_has_min(qm);
    const size_t xbytes = xm ? sizeof(tsr_block_q8_1) : sizeof(tsr_block_q8_0);
    const size_t xq_off = xm ? offsetof(tsr_block_q8_1, qs) : offsetof(tsr_block_q8_0, q);
    const int64_t nb = n_in / TSR_QK;
    __m256 acc[TSR_QM_TILE][TSR_QM_TILE];
    float mins[TSR_QM_TILE][TSR_QM_TILE] = {{0}};
    for (int r = 0; r < n_r; r++)
        for (int t = 0; t < n_t; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wq[TSR_QM_TILE];
        float dw[TSR_QM_TILE], mw[TSR_QM_TILE];
        for (int r = 0; r < n_r; r++) {
            uint16_t d, m = 0;
            wq[r] = qx_unpack_legacy(qm, (const char *)w + r * w_stride, b, &d, &m);
            dw[r] = _cvtsh_ss(d);
            mw[r] = _cvtsh_ss(m);
        }
        for (int t = 0; t < n_t; t++) {
            const char *xb = (const char *)x + t * x_stride + b * xbytes;
            uint16_t hd, hs = 0;
            memcpy(&hd, xb, 2);
            if (xm) memcpy(&hs, xb + 2, 2);
            const float dx = _cvtsh_ss(hd), sx = _cvtsh_ss(hs);
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(xb + xq_off));
            for (int r = 0; r < n_r; r++) {
                __m256i l = xm ? TSR_QX_DPBUSD(_mm256_setzero_si256(), wq[r], xq)
                               : qx_dot_signed(wq[r], xq);
                acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(l),
                                            acc[r][t]);
                if (xm) mins[r][t] = fmaf(mw[r], sx, mins[r][t]);
            }
        }
    }
    for (int r = 0; r < n_r; r++)
        for (int t = 0; t < n_t; t++) {
            float v = tsr_x86_hsum8(acc[r][t]);
            y[t * ldy + r] = xm ? v + mins[r][t] : v;
        }
}

/* ---------------------------------------------------------------------------------------- */
/* K tiles: each super-block unpacked to 256 bytes u (unsigned, or signed for IQ4_XS), a     */
/* scale per 16 elements and an offset: isum = sum_g sc[g] * (dot16(u, x) - off * bsums[g]). */

typedef struct qx_kblock {
    __m256i u[8];
    int32_t sc[16];  /* per group of 16 */
    int32_t mn[16];  /* min per group of 16 (0 for types without) */
    int32_t off;
    int is_signed;
    float d, dmin;
} qx_kblock;

TSR_INLINE void qx_unpack_k(int qm, const void *w, qx_kblock *k) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
    tsr_qk_block_scales(qm, w, &k->d, &k->dmin);
    k->off = 0;
    k->is_signed = 0;
    switch (qm) {
    case TSR_QM_Q2_K:
    case TSR_QM_Q3_K: {
        const uint8_t *qs = qm == TSR_QM_Q2_K ? ((const tsr_block_q2_k *)w)->qs
                                              : ((const tsr_block_q3_k *)w)->qs;
        for (int h = 0; h < 2; h++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
            for (int s = 0; s < 4; s++)
                k->u[4 * h + s] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m3);
        }
        if (qm == TSR_QM_Q2_K) {
            const tsr_block_q2_k *p = w;
            for (int g = 0; g < 16; g++) {
                k->sc[g] = p->scales[g] & 0xf;
                k->mn[g] = p->scales[g] >> 4;
            }
        } else {
            const tsr_block_q3_k *p = w;
            __m256i hm = _mm256_loadu_si256((const __m256i *)p->hmask);
            for (int i = 0; i < 8; i++) { /* element 32 i + l: bit i of hmask[l] -> + 4 */
                __m256i bit = _mm256_set1_epi8((char)(1 << i));
                __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                k->u[i] = _mm256_or_si256(k->u[i], _mm256_and_si256(set, _mm256_set1_epi8(4)));
            }
            tsr_q3k_scales(p->scales, k->sc);
            memset(k->mn, 0, sizeof k->mn);
            k->off = 4;
        }
        break;
    }
    case TSR_QM_Q4_K:
    case TSR_QM_Q5_K: {
        const uint8_t *qs, *sc;
        const uint8_t *qh = NULL;
        if (qm == TSR_QM_Q4_K) {
            qs = ((const tsr_block_q4_k *)w)->qs;
            sc = ((const tsr_block_q4_k *)w)->scales;
        } else {
            qs = ((const tsr_block_q5_k *)w)->qs;
            sc = ((const tsr_block_q5_k *)w)->scales;
            qh = ((const tsr_block_q5_k *)w)->qh;
        }
        __m256i h = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            k->u[2 * c] = _mm256_and_si256(q, m4);
            k->u[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        }
        if (qh)
            for (int g = 0; g < 8; g++) { /* bit g of qh[l] -> + 16 */
                __m256i bit = _mm256_set1_epi8((char)(1 << g));
                __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
                k->u[g] = _mm256_or_si256(k->u[g], _mm256_and_si256(set, _mm256_set1_epi8(16)));
            }
        for (int g = 0; g < 8; g++) {
            int s, m;
            tsr_qk_scale_min(sc, g, &s, &m);
            k->sc[2 * g] = k->sc[2 * g + 1] = s;
            k->mn[2 * g] = k->mn[2 * g + 1] = m;
        }
        break;
    }
    case TSR_QM_Q6_K: {
        const tsr_block_q6_k *p = w;
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(p->ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(p->ql + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(p->qh + 32 * h));
            __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                             _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                             _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
            for (int s = 0; s < 4; s++) {
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m3);
                k->u[4 * h + s] = _mm256_or_si256(lo[s], _mm256_slli_epi16(hi, 4));
            }
        }
        for (int g = 0; g < 16; g++) k->sc[g] = p->scales[g];
        memset(k->mn, 0, sizeof k->mn);
        k->off = 32;
        break;
    }
    default: { /* IQ4_XS */
        const tsr_block_iq4_xs *p = w;
        for (int g = 0; g < 8; g++) {
            k->u[g] = qx_iq4_lookup(qx_nibbles(p->qs + 16 * g));
            k->sc[2 * g] = k->sc[2 * g + 1] = tsr_iq4xs_scale(p, g);
        }
        memset(k->mn, 0, sizeof k->mn);
        k->is_signed = 1;
        break;
    }
    }
}

TSR_INLINE float qx_k_value(const qx_kblock *k, const tsr_block_q8_k *x) {
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * i));
        __m256i p = k->is_signed ? qx_dot_signed(k->u[i], xq)
                                 : TSR_QX_DPBUSD(_mm256_setzero_si256(), k->u[i], xq);
        /* lanes 0-3 are group 2i, lanes 4-7 group 2i + 1 */
        __m256i s = _mm256_setr_epi32(k->sc[2 * i], k->sc[2 * i], k->sc[2 * i], k->sc[2 * i],
                                      k->sc[2 * i + 1], k->sc[2 * i + 1], k->sc[2 * i + 1],
                                      k->sc[2 * i + 1]);
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(p, s));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
    int32_t isum = _mm_cvtsi128_si32(s4), msum = 0, osum = 0;
    for (int g = 0; g < 16; g++) {
        osum += k->sc[g] * x->bsums[g];
        msum += k->mn[g] * x->bsums[g];
    }
    return tsr_qk_value(isum - k->off * osum, msum, k->d, k->dmin, x->d);
}

/* Q4_K, Q6_K: the integer lanes of quants.h's llama.cpp rule (lane k of the vpdpbusd of a
 * 32-quant chunk holds quants 4k..4k+3, which is that rule's lane) and the four min lanes. */
TSR_INLINE __m256i qx_k_lanes(const qx_kblock *k, const tsr_block_q8_k *x, int32_t mins[4]) {
    __m256i acc = _mm256_setzero_si256();
    const __m256i off = _mm256_set1_epi8((char)k->off);
    for (int i = 0; i < 8; i++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * i));
        __m256i p = TSR_QX_DPBUSD(_mm256_setzero_si256(), k->u[i], xq);
        if (k->off) p = _mm256_sub_epi32(p, TSR_QX_DPBUSD(_mm256_setzero_si256(), off, xq));
        __m256i s = _mm256_setr_epi32(k->sc[2 * i], k->sc[2 * i], k->sc[2 * i], k->sc[2 * i],
                                      k->sc[2 * i + 1], k->sc[2 * i + 1], k->sc[2 * i + 1],
                                      k->sc[2 * i + 1]);
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(p, s));
    }
    for (int m = 0; m < 4; m++) {
        mins[m] = 0;
        for (int j = 0; j < 4; j++) mins[m] += k->mn[4 * m + j] * x->bsums[4 * m + j];
    }
    return acc;
}

TSR_INLINE void qx_tile_k_llama(int qm, float *y, int64_t ldy, const void *w, size_t w_stride,
                                const void *x, size_t x_stride, int64_t n_in, int n_r,
                                int n_t) {
    const int64_t nb = n_in / TSR_QK_K;
    const size_t bytes = tsr_qm_block_bytes(qm);
    __m256 acc[TSR_QM_TILE][TSR_QM_TILE];
    __m128 accm[TSR_QM_TILE][TSR_QM_TILE];
    for (int r = 0; r < n_r; r++)
        for (int t = 0; t < n_t; t++) {
            acc[r][t] = _mm256_setzero_ps();
            accm[r][t] = _mm_setzero_ps();
        }
    qx_kblock kb;
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < n_r; r++) {
            qx_unpack_k(qm, (const char *)w + r * w_stride + b * bytes, &kb);
            for (int t = 0; t < n_t; t++) {
                const tsr_block_q8_k *xb =
                    (const tsr_block_q8_k *)((const char *)x + t * x_stride) + b;
                int32_t m[4];
                __m256i l = qx_k_lanes(&kb, xb, m);
                acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * kb.d), _mm256_cvtepi32_ps(l),
                                            acc[r][t]);
                accm[r][t] = _mm_fmadd_ps(_mm_set1_ps(-xb->d * kb.dmin),
                                          _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)m)),
                                          accm[r][t]);
            }
        }
    for (int r = 0; r < n_r; r++)
        for (int t = 0; t < n_t; t++) {
            float l[TSR_Q8_LANES], m[4];
            _mm256_storeu_ps(l, acc[r][t]);
            _mm_storeu_ps(m, accm[r][t]);
            y[t * ldy + r] = tsr_qk_llama_sum(qm, l, m);
        }
}

TSR_INLINE void qx_tile_k(int qm, float *y, int64_t ldy, const void *w, size_t w_stride,
                          const void *x, size_t x_stride, int64_t n_in, int n_r, int n_t) {
    if (tsr_qk_llama_lanes(qm)) {
        qx_tile_k_llama(qm, y, ldy, w, w_stride, x, x_stride, n_in, n_r, n_t);
        return;
    }
    const int64_t nb = n_in / TSR_QK_K;
    const size_t bytes = tsr_qm_block_bytes(qm);
    float lanes[TSR_QM_TILE][TSR_QM_TILE][TSR_Q8_LANES];
    memset(lanes, 0, sizeof lanes);
    qx_kblock kb;
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < n_r; r++) {
            qx_unpack_k(qm, (const char *)w + r * w_stride + b * bytes, &kb);
            for (int t = 0; t < n_t; t++) {
                const char *xr = (const char *)x + t * x_stride;
                lanes[r][t][b % TSR_Q8_LANES] += qx_k_value(&kb, (const tsr_block_q8_k *)xr + b);
            }
        }
    for (int r = 0; r < n_r; r++)
        for (int t = 0; t < n_t; t++) y[t * ldy + r] = tsr_q8_lanes_sum(lanes[r][t]);
}

/* ---------------------------------------------------------------------------------------- */

/* Decode's shape (two rows, one token) gets its own copy, with the accumulators in
 * registers. */
#define QX_TILE(name, qm, kind)                                                                \
    static void name(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,    \
                     size_t x_stride, int64_t n_in, int n_r, int n_t) {                       \
        if (n_r == 2 && n_t == 1)                                                              \
            qx_tile_##kind(qm, y, ldy, w, w_stride, x, x_stride, n_in, 2, 1);                 \
        else                                                                                   \
            qx_tile_##kind(qm, y, ldy, w, w_stride, x, x_stride, n_in, n_r, n_t);             \
    }
QX_TILE(qx_tile_q4_0, TSR_QM_Q4_0, legacy)
QX_TILE(qx_tile_q4_1, TSR_QM_Q4_1, legacy)
QX_TILE(qx_tile_q5_0, TSR_QM_Q5_0, legacy)
QX_TILE(qx_tile_q5_1, TSR_QM_Q5_1, legacy)
QX_TILE(qx_tile_q8_0, TSR_QM_Q8_0, legacy)
QX_TILE(qx_tile_iq4_nl, TSR_QM_IQ4_NL, legacy)
QX_TILE(qx_tile_q2_k, TSR_QM_Q2_K, k)
QX_TILE(qx_tile_q3_k, TSR_QM_Q3_K, k)
QX_TILE(qx_tile_q4_k, TSR_QM_Q4_K, k)
QX_TILE(qx_tile_q5_k, TSR_QM_Q5_K, k)
QX_TILE(qx_tile_q6_k, TSR_QM_Q6_K, k)
QX_TILE(qx_tile_iq4_xs, TSR_QM_IQ4_XS, k)

#define QX_OPS                                                                                 \
    {                                                                                          \
        .tile = {qx_tile_q4_0, qx_tile_q4_1, qx_tile_q5_0, qx_tile_q5_1, qx_tile_q8_0,         \
                 qx_tile_iq4_nl, qx_tile_q2_k, qx_tile_q3_k, qx_tile_q4_k, qx_tile_q5_k,       \
                 qx_tile_q6_k, qx_tile_iq4_xs},                                                \
    }

#endif
