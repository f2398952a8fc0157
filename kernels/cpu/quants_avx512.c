/* Quantized products with AVX-512 VNNI. The tiles are quants_x86.h's with 256-bit vpdpbusd
 * (four u8 x s8 products per lane summed in 32 bits, without vpmaddubsw's saturation); Q4_0,
 * Q8_0, Q4_K and Q6_K also have whole-slice kernels at 512 bits, which are what decode and
 * prefill run:
 *
 * - Q4_0, Q8_0: sixteen blocks at a time, transposed so that lane j of every vector belongs to
 *   block j. vpdpbusd then leaves each block's integer dot in its own lane with no horizontal
 *   sum, and the scales, the f32 products and the lane adds of quants.h run sixteen blocks per
 *   instruction. The activations are transposed once per call (a few KiB a token), the weights
 *   as they are loaded. Weights are made unsigned (Q4_0 nibbles as stored, Q8_0 + 128) and the
 *   offset is taken back with the activation block sums.
 * - Q4_K, Q6_K: a super-block in four vectors of 64 quants; vpmaddubsw pairs, vpdpwssd by the
 *   group scales, and the horizontal sums of eight super-blocks done together.
 *
 * Integer parts are exact whatever the order; the f32 parts are those of quants.h in the same
 * order, so the values are the scalar reference's bit for bit. */
#define TSR_QX_DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "quants_x86.h"

#include <stdlib.h>

/* ---------------------------------------------------------------------------------------- */
/* Q4_0, Q8_0                                                                                */

#define QA_G 16 /* blocks per group: one per lane */

/* Sixteen activation blocks of one token, transposed: q[k] holds dword k (quants 4k..4k+3)
 * of block j at bytes 4j..4j+3; d the scales as f32, s the sums of the quants. */
typedef struct qa_xgroup {
    int8_t q[8][64];
    float d[QA_G];
    int32_t s[QA_G];
} qa_xgroup;

/* Tokens [0, n_tok) of x, groups [0, ng): xg[g * n_tok + t]. */
static void qa_pack_x(qa_xgroup *xg, const void *x, size_t x_stride, int64_t ng,
                      int64_t n_tok) {
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_0 *xb = (const tsr_block_q8_0 *)((const char *)x + t * x_stride);
        for (int64_t g = 0; g < ng; g++) {
            qa_xgroup *o = &xg[g * n_tok + t];
            for (int j = 0; j < QA_G; j++) {
                const tsr_block_q8_0 *b = &xb[g * QA_G + j];
                o->d[j] = _cvtsh_ss(b->d);
                __m256i q = _mm256_loadu_si256((const __m256i *)b->q);
                __m256i s = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s),
                                           _mm256_extracti128_si256(s, 1));
                s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
                o->s[j] = _mm_cvtsi128_si32(s4);
                for (int k = 0; k < 8; k++) memcpy(&o->q[k][4 * j], b->q + 4 * k, 4);
            }
        }
    }
}

/* Four vectors whose 128-bit lane i holds 16 bytes of block 4i + g (g = 0..3) -> four
 * vectors t[m] whose lane p = 4i + g holds dword m of those 16 bytes: blocks in order. */
TSR_INLINE void qa_transpose4(__m512i t[4], const __m512i q[4]) {
    __m512i a = _mm512_unpacklo_epi32(q[0], q[1]), b = _mm512_unpackhi_epi32(q[0], q[1]);
    __m512i c = _mm512_unpacklo_epi32(q[2], q[3]), d = _mm512_unpackhi_epi32(q[2], q[3]);
    t[0] = _mm512_unpacklo_epi64(a, c);
    t[1] = _mm512_unpackhi_epi64(a, c);
    t[2] = _mm512_unpacklo_epi64(b, d);
    t[3] = _mm512_unpackhi_epi64(b, d);
}

/* 16 bytes at p + off of blocks g, g + 4, g + 8, g + 12 (stride bytes apart). */
TSR_INLINE __m512i qa_load4(const char *p, size_t stride, int g, size_t off) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + g * stride + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (g + 4) * stride + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (g + 8) * stride + off)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (g + 12) * stride + off)),
                              3);
}

/* The scales (fp16 bits) of sixteen Q4_0 blocks: d of block j is word 9 j, so blocks 0-7
 * lie in the first 128 bytes and blocks 8-15 in the 128 from block 8. */
TSR_INLINE __m256i qa_d_q4_0(const char *p) {
    static const uint16_t at[32] = {0, 9, 18, 27, 36, 45, 54, 63};
    const __m512i idx = _mm512_loadu_si512(at);
    const char *q = p + 8 * sizeof(tsr_block_q4_0);
    __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx,
                                           _mm512_loadu_si512(p + 64));
    __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(q), idx,
                                           _mm512_loadu_si512(q + 64));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_castsi512_si128(lo)),
                                   _mm512_castsi512_si128(hi), 1);
}

TSR_INLINE __m256i qa_d_q8_0(const char *p) {
    uint16_t h[QA_G];
    for (int j = 0; j < QA_G; j++) memcpy(&h[j], p + j * sizeof(tsr_block_q8_0), 2);
    return _mm256_loadu_si256((const __m256i *)h);
}

/* Sixteen weight blocks from p as unsigned transposed quants w[8] and their scales. */
TSR_INLINE __m512 qa_load_w(int qm, const char *p, __m512i w[8]) {
    const size_t stride = qm == TSR_QM_Q4_0 ? sizeof(tsr_block_q4_0) : sizeof(tsr_block_q8_0);
    __m512i q[4], t[4];
    if (qm == TSR_QM_Q4_0) {
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        for (int g = 0; g < 4; g++) q[g] = qa_load4(p, stride, g, offsetof(tsr_block_q4_0, qs));
        qa_transpose4(t, q);
        for (int m = 0; m < 4; m++) {
            w[m] = _mm512_and_si512(t[m], m4);
            w[4 + m] = _mm512_and_si512(_mm512_srli_epi16(t[m], 4), m4);
        }
    } else {
        const __m512i bias = _mm512_set1_epi8((char)0x80);
        for (int h = 0; h < 2; h++) {
            for (int g = 0; g < 4; g++)
                q[g] = qa_load4(p, stride, g, offsetof(tsr_block_q8_0, q) + 16 * h);
            qa_transpose4(t, q);
            for (int m = 0; m < 4; m++) w[4 * h + m] = _mm512_xor_si512(t[m], bias);
        }
    }
    return _mm512_cvtph_ps(qm == TSR_QM_Q4_0 ? qa_d_q4_0(p) : qa_d_q8_0(p));
}

/* Lane b % 8 of acc += value of block b, for the sixteen blocks of one token. */
TSR_INLINE __m256 qa_group(__m256 acc, const __m512i w[8], __m512 dw, const qa_xgroup *x,
                           int shift) {
    __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_load_si512(x->q[0]));
    __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], _mm512_load_si512(x->q[4]));
    for (int k = 1; k < 4; k++) {
        a0 = _mm512_dpbusd_epi32(a0, w[k], _mm512_load_si512(x->q[k]));
        a1 = _mm512_dpbusd_epi32(a1, w[4 + k], _mm512_load_si512(x->q[4 + k]));
    }
    __m512i is = _mm512_sub_epi32(_mm512_add_epi32(a0, a1),
                                  _mm512_slli_epi32(_mm512_load_si512(x->s), shift));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_load_ps(x->d)));
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(v));
    return _mm256_add_ps(acc, _mm512_extractf32x8_ps(v, 1));
}

/* Prefill: a chunk of tokens is transposed once; then blocks of rows take each group of
 * sixteen weight blocks in turn, so that group's activations (QA_TOK_MAX x 640 bytes) are
 * read from L1 by all the rows of the block instead of from L2 by each row. Decode (few
 * tokens) goes row by row: one sequential stream the prefetcher can follow. */
#define QA_CHUNK_BYTES (512 * 1024)
#define QA_TOK_MAX 32
#define QA_ROWS 16
/* The hardware prefetcher alone leaves decode ~20% under the bandwidth: ask this far ahead. */
#define QA_PREFETCH 8192

static int qa_mm(int qm, float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                 size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    const int64_t nb = n_in / TSR_QK, ng = nb / QA_G;
    const int shift = qm == TSR_QM_Q4_0 ? 3 : 7; /* the offsets: 8 and 128 */
    int64_t tc = ng ? QA_CHUNK_BYTES / (ng * (int64_t)sizeof(qa_xgroup)) : QA_TOK_MAX;
    tc = tc < 1 ? 1 : tc > QA_TOK_MAX ? QA_TOK_MAX : tc;
    tc = tc < n_tok ? tc : n_tok;
    qa_xgroup *xg = NULL;
    if (ng) {
        xg = aligned_alloc(64, (size_t)(ng * tc) * sizeof *xg);
        if (!xg) return -1;
    }
    const size_t bytes = tsr_qm_block_bytes(qm);
    __m256 lanes[QA_ROWS][QA_TOK_MAX];
    for (int64_t t0 = 0; t0 < n_tok; t0 += tc) {
        const int64_t nt = n_tok - t0 < tc ? n_tok - t0 : tc;
        const char *xt = (const char *)x + t0 * x_stride;
        qa_pack_x(xg, xt, x_stride, ng, nt);
        const int64_t rows = nt >= 8 ? QA_ROWS : 1;
        for (int64_t r0 = 0; r0 < n_rows; r0 += rows) {
            const int64_t nr = n_rows - r0 < rows ? n_rows - r0 : rows;
            for (int64_t i = 0; i < nr; i++)
                for (int64_t t = 0; t < nt; t++) lanes[i][t] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++)
                for (int64_t i = 0; i < nr; i++) {
                    const char *wg = (const char *)w + (r0 + i) * w_stride + g * QA_G * bytes;
                    for (size_t o = 0; o < QA_G * bytes; o += 64) /* rows follow each other */
                        _mm_prefetch(wg + QA_PREFETCH + o, _MM_HINT_T0);
                    __m512i wq[8];
                    __m512 dw = qa_load_w(qm, wg, wq);
                    for (int64_t t = 0; t < nt; t++)
                        lanes[i][t] = qa_group(lanes[i][t], wq, dw, &xg[g * nt + t], shift);
                }
            for (int64_t i = 0; i < nr; i++) {
                const char *wr = (const char *)w + (r0 + i) * w_stride;
                for (int64_t t = 0; t < nt; t++) {
                    float l[8];
                    _mm256_storeu_ps(l, lanes[i][t]);
                    const tsr_block_q8_0 *xb = (const tsr_block_q8_0 *)(xt + t * x_stride);
                    for (int64_t b = ng * QA_G; b < nb; b++) {
                        uint16_t d, m;
                        int8_t q[TSR_QK];
                        _mm256_storeu_si256((__m256i *)q, qx_unpack_legacy(qm, wr, b, &d, &m));
                        l[b % 8] += tsr_q_legacy_value(tsr_q8_block_idot(q, xb[b].q),
                                                       tsr_fp16_to_fp32(d),
                                                       tsr_fp16_to_fp32(xb[b].d));
                    }
                    y[(t0 + t) * ldy + r0 + i] = tsr_q8_lanes_sum(l);
                }
            }
        }
    }
    free(xg);
    return 0;
}

static int qa_mm_q4_0(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qa_mm(TSR_QM_Q4_0, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

static int qa_mm_q8_0(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qa_mm(TSR_QM_Q8_0, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

/* ---------------------------------------------------------------------------------------- */
/* Q4_K, Q6_K                                                                                */

/* The constants of the super-block loads, built once per call: GCC would otherwise build
 * them again for every super-block. */
typedef struct qb_consts {
    __m512i m4, m3, spread[4], q6_sh[2];
} qb_consts;

/* Word a of the scales to words 0-15, word b to words 16-31. */
static __m512i qb_spread_index(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
}

static void qb_consts_init(int qm, qb_consts *c) {
    c->m4 = _mm512_set1_epi8(0x0f);
    c->m3 = _mm512_set1_epi8(3);
    const long long w4 = 0x0001000100010001ll; /* a word in the four words of a qword */
    for (int i = 0; i < 4; i++) {
        if (qm == TSR_QM_Q4_K) /* vector i: groups (0, 2), (1, 3), (4, 6), (5, 7) */
            c->spread[i] = qb_spread_index(i / 2 * 4 + i % 2, i / 2 * 4 + i % 2 + 2);
        else /* Q6_K, vector i: groups 4i .. 4i + 3, eight words each */
            c->spread[i] = _mm512_setr_epi64(4 * i * w4, 4 * i * w4, (4 * i + 1) * w4,
                                             (4 * i + 1) * w4, (4 * i + 2) * w4,
                                             (4 * i + 2) * w4, (4 * i + 3) * w4,
                                             (4 * i + 3) * w4);
    }
    for (int s = 0; s < 2; s++) /* Q6_K: quants 64 s .. of a half use qh bits 4s, 4s + 2 */
        c->q6_sh[s] = qb_spread_index(4 * s, 4 * s + 2);
}

/* A super-block in registers: u[i] 64 unsigned quants in the order of the activations
 * vector i (see qb_pack_x), sc[i] the scale of each of their 32 pairs, ms (Q4_K) the mins as
 * 16-bit weights of the 16 bsums. */
typedef struct qb_sb {
    __m512i u[4], sc[4];
    __m256i ms;
} qb_sb;

TSR_INLINE void qb_load_q4_k(const tsr_block_q4_k *p, const qb_consts *c, qb_sb *k) {
    /* qs[64 h ..]: low nibbles are groups 4h and 4h + 2, high ones 4h + 1 and 4h + 3 */
    for (int h = 0; h < 2; h++) {
        __m512i q = _mm512_loadu_si512(p->qs + 64 * h);
        k->u[2 * h] = _mm512_and_si512(q, c->m4);
        k->u[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), c->m4);
    }
    /* the eight 6-bit scales and mins (tsr_qk_scale_min), four bytes at a time */
    uint32_t s0, s1, s2;
    memcpy(&s0, p->scales, 4);
    memcpy(&s1, p->scales + 4, 4);
    memcpy(&s2, p->scales + 8, 4);
    const uint32_t m6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, hi2 = 0x03030303u;
    uint64_t sc = (uint64_t)(s0 & m6) |
                  (uint64_t)((s2 & lo4) | (((s0 >> 6) & hi2) << 4)) << 32;
    uint64_t mn = (uint64_t)(s1 & m6) |
                  (uint64_t)(((s2 >> 4) & lo4) | (((s1 >> 6) & hi2) << 4)) << 32;
    __m512i scw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)sc)));
    for (int i = 0; i < 4; i++) k->sc[i] = _mm512_permutexvar_epi16(c->spread[i], scw);
    __m128i mw = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)mn));
    k->ms = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi16(mw, mw)),
                                    _mm_unpackhi_epi16(mw, mw), 1);
}

TSR_INLINE void qb_load_q6_k(const tsr_block_q6_k *p, const qb_consts *c, qb_sb *k) {
    k->ms = _mm256_setzero_si256(); /* Q6_K has no mins */
    for (int h = 0; h < 2; h++) {
        __m512i l = _mm512_loadu_si512(p->ql + 64 * h);
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(p->qh + 32 * h)));
        for (int s = 0; s < 2; s++) { /* quants 128 h + 64 s .. */
            __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(qh, c->q6_sh[s]), c->m3);
            __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(l, 4) : l, c->m4);
            k->u[2 * h + s] = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
        }
    }
    __m256i scw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p->scales));
    for (int i = 0; i < 4; i++) /* vector i: groups 4i .. 4i + 3, eight pairs each */
        k->sc[i] = _mm512_permutexvar_epi16(c->spread[i], _mm512_castsi256_si512(scw));
}

/* Q4_K activations: the quants of each super-block reordered to match qb_load_q4_k's vectors
 * (quants 0-31 and 64-95, 32-63 and 96-127, then the same for the second half); Q6_K's are in
 * order already and are read in place. */
static void qb_pack_x(int8_t *xq, const void *x, size_t x_stride, int64_t nsb, int64_t n_tok) {
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_k *xb = (const tsr_block_q8_k *)((const char *)x + t * x_stride);
        for (int64_t b = 0; b < nsb; b++) {
            int8_t *o = xq + (t * nsb + b) * TSR_QK_K;
            for (int h = 0; h < 2; h++) {
                __m512i a = _mm512_loadu_si512(xb[b].qs + 128 * h);
                __m512i c = _mm512_loadu_si512(xb[b].qs + 128 * h + 64);
                _mm512_storeu_si512(o + 128 * h, _mm512_shuffle_i64x2(a, c, 0x44));
                _mm512_storeu_si512(o + 128 * h + 64, _mm512_shuffle_i64x2(a, c, 0xee));
            }
        }
    }
}

/* The scaled integer dot of a super-block with 256 activation quants, as 16 partial sums:
 * dword j of vector i holds quants whose index within their 32 is in 4(j % 8)..+3 (both
 * layouts, see qb_pack_x), so folding the halves gives quants.h's llama.cpp lanes. Q6_K
 * (c32 not NULL) takes its -32 off the pairs, as llama.cpp does, so each lane is exact. */
TSR_INLINE __m512i qb_dot(const qb_sb *k, const int8_t *xq, const __m512i *c32) {
    __m512i p[4];
    for (int i = 0; i < 4; i++) {
        __m512i x = _mm512_loadu_si512(xq + 64 * i);
        p[i] = _mm512_maddubs_epi16(k->u[i], x);
        if (c32) p[i] = _mm512_sub_epi16(p[i], _mm512_maddubs_epi16(*c32, x));
    }
    __m512i acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p[0], k->sc[0]);
    __m512i acc2 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p[1], k->sc[1]);
    acc = _mm512_dpwssd_epi32(acc, p[2], k->sc[2]);
    acc2 = _mm512_dpwssd_epi32(acc2, p[3], k->sc[3]);
    return _mm512_add_epi32(acc, acc2);
}

/* 16 partial sums -> the 8 lanes. */
TSR_INLINE __m256i qb_fold(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* As for Q4_0: prefill takes blocks of rows per super-block so that the tokens' activations
 * are read from L1 by every row of the block; decode goes row by row. Each (row, token) has
 * quants.h's two accumulators, fed super-block after super-block. */
#define QB_TOK 16 /* tokens packed at a time */
#define QB_ROWS 4

static int qb_mm(int qm, float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                 size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    const int64_t nsb = n_in / TSR_QK_K;
    const size_t bytes = tsr_qm_block_bytes(qm);
    const int q4 = qm == TSR_QM_Q4_K;
    int8_t *xq = NULL;
    if (q4 && nsb) {
        int64_t tc = n_tok < QB_TOK ? n_tok : QB_TOK;
        xq = aligned_alloc(64, (size_t)(tc * nsb) * TSR_QK_K);
        if (!xq) return -1;
    }
    qb_consts c;
    qb_consts_init(qm, &c);
    const __m512i c32 = _mm512_set1_epi8(32);
    __m256 acc[QB_ROWS][QB_TOK];
    __m128 accm[QB_ROWS][QB_TOK];
    for (int64_t t0 = 0; t0 < n_tok; t0 += QB_TOK) {
        const int nt = (int)(n_tok - t0 < QB_TOK ? n_tok - t0 : QB_TOK);
        const char *xt = (const char *)x + t0 * x_stride;
        if (q4) qb_pack_x(xq, xt, x_stride, nsb, nt);
        const int64_t rows = nt >= 4 ? QB_ROWS : 1;
        for (int64_t r0 = 0; r0 < n_rows; r0 += rows) {
            const int nr = (int)(n_rows - r0 < rows ? n_rows - r0 : rows);
            for (int i = 0; i < nr; i++)
                for (int t = 0; t < nt; t++) {
                    acc[i][t] = _mm256_setzero_ps();
                    accm[i][t] = _mm_setzero_ps();
                }
            for (int64_t sb = 0; sb < nsb; sb++)
                for (int i = 0; i < nr; i++) {
                    qb_sb k;
                    float dw, dmin = 0;
                    const char *wb = (const char *)w + (r0 + i) * w_stride + sb * bytes;
                    for (size_t o = 0; o < bytes; o += 64)
                        _mm_prefetch(wb + QA_PREFETCH + o, _MM_HINT_T0);
                    /* The scales by F16C in line: a call would spill the constants' zmm. */
                    if (q4) {
                        const tsr_block_q4_k *p = (const tsr_block_q4_k *)wb;
                        qb_load_q4_k(p, &c, &k);
                        dw = _cvtsh_ss(p->d);
                        dmin = _cvtsh_ss(p->dmin);
                    } else {
                        const tsr_block_q6_k *p = (const tsr_block_q6_k *)wb;
                        qb_load_q6_k(p, &c, &k);
                        dw = _cvtsh_ss(p->d);
                    }
                    for (int t = 0; t < nt; t++) {
                        const tsr_block_q8_k *xb = (const tsr_block_q8_k *)(xt + t * x_stride) + sb;
                        __m256i l = qb_fold(
                            q4 ? qb_dot(&k, xq + ((int64_t)t * nsb + sb) * TSR_QK_K, NULL)
                               : qb_dot(&k, xb->qs, &c32));
                        acc[i][t] = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * dw),
                                                    _mm256_cvtepi32_ps(l), acc[i][t]);
                        if (q4) { /* min lane m: groups 2m, 2m + 1 */
                            __m256i m = _mm256_madd_epi16(
                                k.ms, _mm256_loadu_si256((const __m256i *)xb->bsums));
                            __m128i m4 = _mm_hadd_epi32(_mm256_castsi256_si128(m),
                                                        _mm256_extracti128_si256(m, 1));
                            accm[i][t] = _mm_fmadd_ps(_mm_set1_ps(-xb->d * dmin),
                                                      _mm_cvtepi32_ps(m4), accm[i][t]);
                        }
                    }
                }
            for (int i = 0; i < nr; i++)
                for (int t = 0; t < nt; t++) {
                    float l[8], m[4];
                    _mm256_storeu_ps(l, acc[i][t]);
                    _mm_storeu_ps(m, accm[i][t]);
                    y[(t0 + t) * ldy + r0 + i] = tsr_qk_llama_sum(qm, l, m);
                }
        }
    }
    free(xq);
    return 0;
}

static int qb_mm_q4_k(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qb_mm(TSR_QM_Q4_K, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

static int qb_mm_q6_k(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qb_mm(TSR_QM_Q6_K, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

/* ---------------------------------------------------------------------------------------- */

const tsr_quant_ops tsr_quant_ops_avx512 = {
    .tile = {qx_tile_q4_0, qx_tile_q4_1, qx_tile_q5_0, qx_tile_q5_1, qx_tile_q8_0,
             qx_tile_iq4_nl, qx_tile_q2_k, qx_tile_q3_k, qx_tile_q4_k, qx_tile_q5_k,
             qx_tile_q6_k, qx_tile_iq4_xs},
    .mm = {[TSR_QM_Q4_0] = qa_mm_q4_0, [TSR_QM_Q8_0] = qa_mm_q8_0, [TSR_QM_Q4_K] = qb_mm_q4_k,
           [TSR_QM_Q6_K] = qb_mm_q6_k},
};
