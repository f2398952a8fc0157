/* The x16 product of the K types with AVX-512 VNNI (kernels_cpu.h): 16 rows x up to 16
 * tokens. A group's chunk of one super-block is unpacked a scale group at a time into
 * vectors of unsigned quants (Q4_K: 32 quants, eight vectors of nibbles; Q5_K the same with
 * their fifth bit; IQ4_XS: eight vectors of its levels plus 128; Q6_K, Q3_K, Q2_K: 16
 * quants, four vectors of 6-, 3- or 2-bit values), then each token runs one vpdpbusd chain
 * per scale group against four-byte broadcasts of its activation quants, giving the 16 rows'
 * group dots in one register; one vpmulld by the rows' group scales adds it to the token's
 * exact integer sum of the super-block. An offset the quants carry (Q6_K 32, Q3_K 4, IQ4_XS
 * 128) is taken back by starting each chain from -offset x the group's activation sum; the
 * mins (Q4_K, Q5_K, Q2_K) are vpdpwssd of the rows' min pairs with the token's group sums.
 * Per super-block and token: one fma (and for the mins one fnmadd) in f32, the fast order of
 * repack_k.c, so the values are its bits. The type is a compile-time constant of every
 * inlined step (qm, quants.h). */
#include "quants.h"
#include "repack.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define XK_TOK 16        /* tokens per tile: their integer sums stay in registers */
#define XK_TOK_BLOCK 64  /* tokens whose activations are prepared at a time */

#define XK_INLINE static inline __attribute__((always_inline))

/* A tile's activations for one super-block, read by every group: the quants of its tokens,
 * their scales, and per token the words the kernel broadcasts (tsr_xk16_aux): the chains'
 * starts, or the activation group sums as int16 pairs against the min pairs. */
typedef struct xk_xblock {
    int8_t q[XK_TOK][TSR_QK_K];
    float d[XK_TOK];
    int32_t aux[XK_TOK][16];
} xk_xblock;

/* The K types' x16 kernels, each instantiated with its type as a constant. */
#define XK_TYPES(X)                                                                        \
    X(TSR_QM_Q2_K) X(TSR_QM_Q3_K) X(TSR_QM_Q4_K) X(TSR_QM_Q5_K) X(TSR_QM_Q6_K) X(TSR_QM_IQ4_XS)

XK_INLINE size_t xk_chunk_bytes(const int qm) {
    return TSR_X16_ROWS * tsr_qm_block_bytes(qm);
}

XK_INLINE __m512i xk_bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm512_set1_epi32(v);
}

/* Decode (up to XK_PF_NT tokens) reads the weights once: part `part` of eight of the chunk at
 * c (`bytes` long) is prefetched XK_PF bytes ahead, a few lines between the chains (the whole
 * chunk's lines in one burst made Q6_K's decode 0.4-0.6x of the file rows' kernel; 8 KiB ahead
 * was the best of 1-32 KiB). */
#define XK_PF_NT 2
#define XK_PF (2 * TSR_STREAM_PREFETCH)
XK_INLINE void xk_prefetch(const uint8_t *c, size_t bytes, int part) {
    for (size_t o = bytes * (size_t)part / 8 / 64 * 64; o < bytes * (size_t)(part + 1) / 8; o += 64)
        _mm_prefetch((const char *)c + XK_PF + o, _MM_HINT_T0);
}

/* For each token, isum[t] += scales x (the chain of n vpdpbusd of wv with its quants at
 * q[t] + at, from aux[t][start] or, for start < 0, 0). */
XK_INLINE void xk_group(const int nt, const int n, __m512i *isum, const __m512i *wv,
                        __m512i scales, const xk_xblock *xb, int at, int start) {
    for (int t = 0; t < nt; t++) {
        __m512i i = start >= 0 ? _mm512_set1_epi32(xb->aux[t][start]) : _mm512_setzero_si512();
        for (int k = 0; k < n; k++)
            i = _mm512_dpbusd_epi32(i, wv[k], xk_bcast4(xb->q[t] + at + 4 * k));
        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(i, scales));
    }
}

/* The int16 pairs (group 2m, group 2m + 1) of 16 rows' mins for vpdpwssd, from byte planes. */
XK_INLINE __m512i xk_min_pair(const uint8_t *even, const uint8_t *odd) {
    return _mm512_or_si512(
        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)even)),
        _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)odd)), 16));
}

/* Q4_K and Q5_K: a chunk's group scales and mins, decoded from the planes of the twelve packed
 * bytes (tsr_qk_scale_min's rule on 16 rows at once). */
XK_INLINE void xk_q45_k_scales(const uint8_t *c, uint8_t sc[8][TSR_X16_ROWS],
                               uint8_t mn[8][TSR_X16_ROWS]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m6 = _mm512_set1_epi8(0x3f),
                  m30 = _mm512_set1_epi8(0x30);
    const __m512i a = _mm512_loadu_si512(c + TSR_XK16_Q4_K_SCALES),       /* planes 0-3 */
        b = _mm512_loadu_si512(c + TSR_XK16_Q4_K_SCALES + 64),             /* 4-7 */
        p8 = _mm512_loadu_si512(c + TSR_XK16_Q4_K_SCALES + 128);           /* 8-11 */
    _mm512_storeu_si512(sc[0], _mm512_and_si512(a, m6));
    _mm512_storeu_si512(sc[4], _mm512_or_si512(_mm512_and_si512(p8, m4),
                                               _mm512_and_si512(_mm512_srli_epi16(a, 2), m30)));
    _mm512_storeu_si512(mn[0], _mm512_and_si512(b, m6));
    _mm512_storeu_si512(mn[4], _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(p8, 4), m4),
                                               _mm512_and_si512(_mm512_srli_epi16(b, 2), m30)));
}

/* Q4_K and Q5_K (qm): vector j of group g's unsigned quants. Group g takes the qs vectors
 * 8 (g / 2)..+7, low nibbles for even g; Q5_K's fifth bit of group g is bit g of its qh
 * vectors' bytes. */
XK_INLINE __m512i xk_q45_k_quants(const int qm, const uint8_t *c, int g, int j) {
    const __m512i v = _mm512_loadu_si512(c + 64 * (8 * (g / 2) + j));
    __m512i w = _mm512_and_si512(g % 2 ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0f));
    if (qm == TSR_QM_Q5_K) {
        __m512i hb = _mm512_loadu_si512(c + TSR_XK16_Q5_K_QH + 64 * j);
        hb = g < 4 ? _mm512_slli_epi16(hb, 4 - g) : _mm512_srli_epi16(hb, g - 4);
        w = _mm512_ternarylogic_epi32(w, hb, _mm512_set1_epi8(0x10), 0xf8); /* | (hb & 0x10) */
    }
    return w;
}

/* Q6_K: vector j of the eight for (hf, q) (xk_k16's loop): its low four bits from ql vector
 * 8 (2 hf + q % 2) + j (high nibbles for q >= 2), its top two from bits 2q of qh vector
 * 8 hf + j. */
XK_INLINE __m512i xk_q6_k_quants(const uint8_t *c, int hf, int q, int j) {
    __m512i l = _mm512_loadu_si512(c + 64 * (8 * (2 * hf + q % 2) + j));
    __m512i h = _mm512_loadu_si512(c + TSR_XK16_Q6_K_QH + 64 * (8 * hf + j));
    l = _mm512_and_si512(q >= 2 ? _mm512_srli_epi16(l, 4) : l, _mm512_set1_epi8(0x0f));
    h = q == 3 ? _mm512_srli_epi16(h, 2) : q < 2 ? _mm512_slli_epi16(h, 4 - 2 * q) : h;
    return _mm512_ternarylogic_epi32(l, h, _mm512_set1_epi8(0x30), 0xf8); /* l | (h & 0x30) */
}

/* Q4_K and Q5_K (qm): a chunk's integer sums and min pairs. */
XK_INLINE void xk_q45_k(const int qm, const int nt, __m512i *isum, __m512i *mins,
                        const uint8_t *c, const xk_xblock *xb) {
    uint8_t sc[8][TSR_X16_ROWS], mn[8][TSR_X16_ROWS];
    xk_q45_k_scales(c, sc, mn);
    for (int k = 0; k < 4; k++) /* qs vectors 8k..8k+7: groups 2k (low nibbles), 2k + 1 */
        for (int h = 0; h < 2; h++) {
            const int g = 2 * k + h;
            if (nt <= XK_PF_NT) xk_prefetch(c, xk_chunk_bytes(qm), g);
            __m512i wv[8];
            for (int j = 0; j < 8; j++) wv[j] = xk_q45_k_quants(qm, c, g, j);
            xk_group(nt, 8, isum, wv, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc[g])),
                     xb, 32 * g, -1);
        }
    /* after the groups, so that the pairs do not hold registers the chains need */
    for (int m = 0; m < 4; m++) mins[m] = xk_min_pair(mn[2 * m], mn[2 * m + 1]);
}

/* Q3_K: the sixteen signed group scales of 16 rows (tsr_q3k_scales' rule) as int8 planes:
 * groups 0-7 take the low nibbles of planes 0-7, groups 8-15 their high nibbles, and group
 * j's top two bits are bits 2 (j / 4) of plane 8 + j % 4. */
XK_INLINE void xk_q3_k_scales(const uint8_t *c, uint8_t sc[16][TSR_X16_ROWS]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30),
                  m32 = _mm512_set1_epi8(32);
    const __m512i a = _mm512_loadu_si512(c + TSR_XK16_Q3_K_SCALES),       /* planes 0-3 */
        b = _mm512_loadu_si512(c + TSR_XK16_Q3_K_SCALES + 64),             /* 4-7 */
        p8 = _mm512_loadu_si512(c + TSR_XK16_Q3_K_SCALES + 128);           /* 8-11 */
    const __m512i lo[4] = {_mm512_and_si512(a, m4), _mm512_and_si512(b, m4),
                           _mm512_and_si512(_mm512_srli_epi16(a, 4), m4),
                           _mm512_and_si512(_mm512_srli_epi16(b, 4), m4)};
    const __m512i hi[4] = {_mm512_slli_epi16(p8, 4), _mm512_slli_epi16(p8, 2), p8,
                           _mm512_srli_epi16(p8, 2)};
    for (int i = 0; i < 4; i++) /* lo | (hi & 0x30), less 32 */
        _mm512_storeu_si512(sc[4 * i],
                            _mm512_sub_epi8(_mm512_ternarylogic_epi32(lo[i], hi[i], m30, 0xf8),
                                            m32));
}

/* Q6_K, Q3_K and Q2_K (qm), sixteen groups of 16: a chunk's integer sums. Quants
 * 128 hf + 32 c + i: Q6_K's low four bits from ql vector 8 (2 hf + c % 2) + i / 4 (high
 * nibbles for c >= 2), its top two from bits 2c of qh vector 8 hf + i / 4; Q3_K's and Q2_K's
 * two bits from bits 2c of qs vector 8 hf + i / 4, and Q3_K's third (its high bit, so the
 * quant plus 4) from bit 4 hf + c of hmask vector i / 4. The offsets (Q6_K 32, Q3_K 4) are
 * taken back by starting each chain from -offset x the group's activation sum; Q2_K's mins
 * are eight vpdpwssd of the rows' min pairs with the token's 16-quant sums. */
XK_INLINE void xk_k16(const int qm, const int nt, __m512i *isum, __m512i *mins,
                      const uint8_t *c, const xk_xblock *xb) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(3),
                  m04 = _mm512_set1_epi8(4);
    uint8_t sc[16][TSR_X16_ROWS], mn[16][TSR_X16_ROWS];
    if (qm == TSR_QM_Q3_K) xk_q3_k_scales(c, sc);
    if (qm == TSR_QM_Q2_K)
        for (int i = 0; i < 4; i++) { /* scale: low nibble, min: high nibble */
            const __m512i p = _mm512_loadu_si512(c + TSR_XK16_Q2_K_SCALES + 64 * i);
            _mm512_storeu_si512(sc[4 * i], _mm512_and_si512(p, m4));
            _mm512_storeu_si512(mn[4 * i], _mm512_and_si512(_mm512_srli_epi16(p, 4), m4));
        }
    for (int hf = 0; hf < 2; hf++)
        for (int q = 0; q < 4; q++) {
            if (nt <= XK_PF_NT) xk_prefetch(c, xk_chunk_bytes(qm), 4 * hf + q);
            __m512i wv[8];
            for (int j = 0; j < 8; j++) {
                if (qm == TSR_QM_Q6_K) {
                    wv[j] = xk_q6_k_quants(c, hf, q, j);
                    continue;
                }
                const int qs_at = qm == TSR_QM_Q3_K ? TSR_XK16_Q3_K_QS : 0;
                __m512i l = _mm512_loadu_si512(c + qs_at + 64 * (8 * hf + j));
                l = _mm512_and_si512(_mm512_srli_epi16(l, 2 * q), m3);
                if (qm == TSR_QM_Q3_K) {
                    const int bit = 4 * hf + q;
                    __m512i h = _mm512_loadu_si512(c + 64 * j);
                    h = bit < 2 ? _mm512_slli_epi16(h, 2 - bit) : _mm512_srli_epi16(h, bit - 2);
                    l = _mm512_ternarylogic_epi32(l, h, m04, 0xf8); /* l | (h & 4) */
                }
                wv[j] = l;
            }
            for (int s = 0; s < 2; s++) {
                const int g = 8 * hf + 2 * q + s;
                const __m128i sc8 = _mm_loadu_si128(
                    (const __m128i *)(qm == TSR_QM_Q6_K ? c + TSR_XK16_Q6_K_SCALES + 16 * g
                                                        : sc[g]));
                const __m512i scales = qm == TSR_QM_Q2_K ? _mm512_cvtepu8_epi32(sc8)
                                                         : _mm512_cvtepi8_epi32(sc8);
                xk_group(nt, 4, isum, wv + 4 * s, scales, xb, 16 * g, qm == TSR_QM_Q2_K ? -1 : g);
            }
        }
    if (qm == TSR_QM_Q2_K)
        for (int m = 0; m < 8; m++) mins[m] = xk_min_pair(mn[2 * m], mn[2 * m + 1]);
}

/* IQ4_XS: a chunk's integer sums. Group g's quants are the nibbles of qs vectors 4g..4g+3
 * (low ones its elements 0-15, high ones 16-31), looked up by vpshufb among the sixteen
 * levels plus 128 (unsigned); each chain starts from -128 x the group's activation sum. The
 * group scales of 16 rows: a nibble of the scales_l planes and two bits of scales_h. */
XK_INLINE void xk_iq4_xs(const int nt, __m512i *isum, const uint8_t *c, const xk_xblock *xb) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi32(0x30),
                  m32 = _mm512_set1_epi32(32);
    const __m512i levels = _mm512_broadcast_i32x4(_mm_xor_si128(
        _mm_loadu_si128((const __m128i *)tsr_iq4nl_values), _mm_set1_epi8((char)0x80)));
    const __m512i planes = _mm512_loadu_si512(c + TSR_XK16_IQ4_XS_SCALES_L),
                  high = _mm512_cvtepu16_epi32(
                      _mm256_loadu_si256((const __m256i *)(c + TSR_XK16_IQ4_XS_SCALES_H)));
    uint8_t lo[2][4][TSR_X16_ROWS]; /* [g % 2][g / 2]: group g's low four bits */
    _mm512_storeu_si512(lo[0], _mm512_and_si512(planes, m4));
    _mm512_storeu_si512(lo[1], _mm512_and_si512(_mm512_srli_epi16(planes, 4), m4));
    for (int g = 0; g < 8; g++) {
        if (nt <= XK_PF_NT) xk_prefetch(c, xk_chunk_bytes(TSR_QM_IQ4_XS), g);
        const __m512i h = g < 2 ? _mm512_slli_epi32(high, 4 - 2 * g)
                                : _mm512_srli_epi32(high, 2 * g - 4); /* bits 2g, 2g+1 at 4 */
        const __m512i scales = _mm512_sub_epi32(
            _mm512_ternarylogic_epi32(
                _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)lo[g % 2][g / 2])), h,
                m30, 0xf8),
            m32);
        __m512i wv[8];
        for (int k = 0; k < 4; k++) {
            const __m512i v = _mm512_loadu_si512(c + 64 * (4 * g + k));
            wv[k] = _mm512_shuffle_epi8(levels, _mm512_and_si512(v, m4));
            wv[k + 4] = _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        }
        xk_group(nt, 8, isum, wv, scales, xb, 32 * g, g);
    }
}

/* acc[t] (16 rows, in an L1 buffer) += the chunk at c with the nt tokens of xb, one
 * super-block's step of the fast order. */
/* The end of a chunk's super-block step for tokens [t_off, t_off + nt) of xb: the 16 rows'
 * f32 sums at acc (token t's `stride` floats after token t - 1's) take the fma of the integer
 * sums and, for the types with mins, the fnmadd of their vpdpwssd. */
XK_INLINE void xk_finish(const int qm, const int nt, float *acc, int stride, const __m512i *isum,
                         const __m512i *mins, const uint8_t *c, const xk_xblock *xb, int t_off) {
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c + tsr_xk16_d_at(qm))));
    const __m512 dmin =
        tsr_xk16_min_pairs(qm)
            ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c + tsr_xk16_dmin_at(qm))))
            : _mm512_setzero_ps();
    for (int t = 0; t < nt; t++) {
        const __m512 dx = _mm512_set1_ps(xb->d[t_off + t]);
        float *at = acc + t * stride;
        __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, dx),
                                   _mm512_load_ps(at));
        if (tsr_xk16_min_pairs(qm)) {
            __m512i m = _mm512_setzero_si512();
            for (int k = 0; k < tsr_xk16_min_pairs(qm); k++)
                m = _mm512_dpwssd_epi32(m, mins[k], _mm512_set1_epi32(xb->aux[t_off + t][k]));
            a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dmin, dx), a);
        }
        _mm512_store_ps(at, a);
    }
}

XK_INLINE void xk_chunk(const int qm, const int nt, float (*acc)[TSR_X16_ROWS], const uint8_t *c,
                        const xk_xblock *xb) {
    __m512i isum[XK_TOK], mins[8];
    for (int t = 0; t < nt; t++) isum[t] = _mm512_setzero_si512();
    if (qm == TSR_QM_Q4_K || qm == TSR_QM_Q5_K) xk_q45_k(qm, nt, isum, mins, c, xb);
    else if (qm == TSR_QM_IQ4_XS) xk_iq4_xs(nt, isum, c, xb);
    else xk_k16(qm, nt, isum, mins, c, xb);
    xk_finish(qm, nt, acc[0], TSR_X16_ROWS, isum, mins, c, xb, 0);
}

/* y[t * ldy + r] for the 16 rows of one group (chunks of `chunk` bytes from w) and the nt
 * tokens of xb (nsb super-blocks). */
XK_INLINE void xk_tile(const int qm, const int nt, float *y, int64_t ldy, const uint8_t *w,
                       size_t chunk, int64_t nsb, const xk_xblock *xb) {
    float acc[XK_TOK][TSR_X16_ROWS] __attribute__((aligned(64)));
    for (int t = 0; t < nt; t++) _mm512_store_ps(acc[t], _mm512_setzero_ps());
    for (int64_t sb = 0; sb < nsb; sb++) xk_chunk(qm, nt, acc, w + (size_t)sb * chunk, xb + sb);
    for (int t = 0; t < nt; t++) _mm512_storeu_ps(y + t * ldy, _mm512_load_ps(acc[t]));
}

/* Q4_K on two neighbouring groups (chunks ca, cb) by tokens [t_off, t_off + nt) of xb's tile,
 * nt <= XK_PAIR_TOK: each four-byte broadcast of a token's quants feeds one vpdpbusd per
 * group (x16_tile_pair's reason, repack_avx512.c), each vector of nibbles unpacked where it is
 * used; per token two chains, two super-block sums. One super-block's step of xk_chunk for
 * both groups, the same bits. */
#define XK_PAIR_TOK 6
XK_INLINE int xk_pair_pays(const int qm) {
    return qm == TSR_QM_Q4_K || qm == TSR_QM_Q6_K;
}

XK_INLINE void xk_q4_k_pair(const int nt, float (*acc)[2][TSR_X16_ROWS], const uint8_t *ca,
                            const uint8_t *cb, const xk_xblock *xb, int t_off) {
    const uint8_t *const c[2] = {ca, cb};
    uint8_t sc[2][8][TSR_X16_ROWS], mn[2][8][TSR_X16_ROWS];
    xk_q45_k_scales(ca, sc[0], mn[0]);
    xk_q45_k_scales(cb, sc[1], mn[1]);
    __m512i isum[2][XK_PAIR_TOK];
    for (int t = 0; t < nt; t++) isum[0][t] = isum[1][t] = _mm512_setzero_si512();
    for (int g = 0; g < 8; g++) { /* qs vectors 8 (g / 2)..: low nibbles for even g */
        __m512i i[2][XK_PAIR_TOK];
        for (int t = 0; t < nt; t++) i[0][t] = i[1][t] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            const __m512i wv[2] = {xk_q45_k_quants(TSR_QM_Q4_K, ca, g, j),
                                   xk_q45_k_quants(TSR_QM_Q4_K, cb, g, j)};
            for (int t = 0; t < nt; t++) {
                const __m512i q = xk_bcast4(xb->q[t_off + t] + 32 * g + 4 * j);
                i[0][t] = _mm512_dpbusd_epi32(i[0][t], wv[0], q);
                i[1][t] = _mm512_dpbusd_epi32(i[1][t], wv[1], q);
            }
        }
        for (int p = 0; p < 2; p++) {
            const __m512i scales = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc[p][g]));
            for (int t = 0; t < nt; t++)
                isum[p][t] = _mm512_add_epi32(isum[p][t], _mm512_mullo_epi32(i[p][t], scales));
        }
    }
    for (int p = 0; p < 2; p++) {
        __m512i mins[4];
        for (int m = 0; m < 4; m++) mins[m] = xk_min_pair(mn[p][2 * m], mn[p][2 * m + 1]);
        xk_finish(TSR_QM_Q4_K, nt, acc[0][p], 2 * TSR_X16_ROWS, isum[p], mins, c[p], xb, t_off);
    }
}

/* Q6_K on two neighbouring groups, as xk_q4_k_pair: group g = 8 hf + 2 q + s takes vectors
 * 4 s..4 s + 3 of xk_k16's eight for (hf, q), each unpacked where it is used. */
XK_INLINE void xk_q6_k_pair(const int nt, float (*acc)[2][TSR_X16_ROWS], const uint8_t *ca,
                            const uint8_t *cb, const xk_xblock *xb, int t_off) {
    const uint8_t *const c[2] = {ca, cb};
    __m512i isum[2][XK_PAIR_TOK];
    for (int t = 0; t < nt; t++) isum[0][t] = isum[1][t] = _mm512_setzero_si512();
    for (int g = 0; g < 16; g++) {
        const int hf = g / 8, q = g % 8 / 2, s = g % 2;
        __m512i i[2][XK_PAIR_TOK];
        for (int t = 0; t < nt; t++)
            i[0][t] = i[1][t] = _mm512_set1_epi32(xb->aux[t_off + t][g]);
        for (int k = 0; k < 4; k++) {
            const int j = 4 * s + k;
            const __m512i wv[2] = {xk_q6_k_quants(ca, hf, q, j), xk_q6_k_quants(cb, hf, q, j)};
            for (int t = 0; t < nt; t++) {
                const __m512i x = xk_bcast4(xb->q[t_off + t] + 16 * g + 4 * k);
                i[0][t] = _mm512_dpbusd_epi32(i[0][t], wv[0], x);
                i[1][t] = _mm512_dpbusd_epi32(i[1][t], wv[1], x);
            }
        }
        for (int p = 0; p < 2; p++) {
            const __m512i scales = _mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(c[p] + TSR_XK16_Q6_K_SCALES + 16 * g)));
            for (int t = 0; t < nt; t++)
                isum[p][t] = _mm512_add_epi32(isum[p][t], _mm512_mullo_epi32(i[p][t], scales));
        }
    }
    for (int p = 0; p < 2; p++)
        xk_finish(TSR_QM_Q6_K, nt, acc[0][p], 2 * TSR_X16_ROWS, isum[p], NULL, c[p], xb, t_off);
}

/* y[t * ldy + r] for the 32 rows of the groups at w and w + group_bytes and the nt tokens
 * from t_off of xb's tile (nsb super-blocks). */
XK_INLINE void xk_tile_pair(const int qm, const int nt, float *y, int64_t ldy, const uint8_t *w,
                            size_t group_bytes, size_t chunk, int64_t nsb, const xk_xblock *xb,
                            int t_off) {
    float acc[XK_PAIR_TOK][2][TSR_X16_ROWS] __attribute__((aligned(64)));
    for (int t = 0; t < nt; t++) {
        _mm512_store_ps(acc[t][0], _mm512_setzero_ps());
        _mm512_store_ps(acc[t][1], _mm512_setzero_ps());
    }
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *ca = w + (size_t)sb * chunk, *cb = ca + group_bytes;
        if (qm == TSR_QM_Q4_K) xk_q4_k_pair(nt, acc, ca, cb, xb + sb, t_off);
        else xk_q6_k_pair(nt, acc, ca, cb, xb + sb, t_off);
    }
    for (int t = 0; t < nt; t++) {
        _mm512_storeu_ps(y + t * ldy, _mm512_load_ps(acc[t][0]));
        _mm512_storeu_ps(y + t * ldy + TSR_X16_ROWS, _mm512_load_ps(acc[t][1]));
    }
}

/* xk_tile_pair with its type (one xk_pair_pays takes) and token count as constants. */
static void xk_tile_pair_any(int qm, int nt, float *y, int64_t ldy, const uint8_t *w,
                             size_t group_bytes, size_t chunk, int64_t nsb, const xk_xblock *xb,
                             int t_off) {
#define XK_PAIR_CASE(Q, N)                                                                 \
    case (Q) * XK_PAIR_TOK + (N) - 1:                                                      \
        xk_tile_pair((Q), (N), y, ldy, w, group_bytes, chunk, nsb, xb, t_off);             \
        break;
#define XK_PAIR_CASES(Q)                                                                   \
    XK_PAIR_CASE(Q, 1) XK_PAIR_CASE(Q, 2) XK_PAIR_CASE(Q, 3) XK_PAIR_CASE(Q, 4)             \
    XK_PAIR_CASE(Q, 5) XK_PAIR_CASE(Q, 6)
    switch (qm * XK_PAIR_TOK + nt - 1) { XK_PAIR_CASES(TSR_QM_Q4_K) XK_PAIR_CASES(TSR_QM_Q6_K) }
#undef XK_PAIR_CASES
#undef XK_PAIR_CASE
}

/* Decode: one token on groups w0 and w1 (from the two halves of the slice) chunk by chunk, so
 * that the thread reads two streams, which one core reads faster than one (Q6_K's decode from
 * one stream: 0.70-0.75x of the file rows' paired kernel). */
XK_INLINE void xk_decode_pair(const int qm, float *y0, float *y1, const uint8_t *w0,
                              const uint8_t *w1, size_t chunk, int64_t nsb, const xk_xblock *xb) {
    float acc[2][1][TSR_X16_ROWS] __attribute__((aligned(64)));
    _mm512_store_ps(acc[0][0], _mm512_setzero_ps());
    _mm512_store_ps(acc[1][0], _mm512_setzero_ps());
    for (int64_t sb = 0; sb < nsb; sb++) {
        xk_chunk(qm, 1, acc[0], w0 + (size_t)sb * chunk, xb + sb);
        xk_chunk(qm, 1, acc[1], w1 + (size_t)sb * chunk, xb + sb);
    }
    _mm512_storeu_ps(y0, _mm512_load_ps(acc[0][0]));
    _mm512_storeu_ps(y1, _mm512_load_ps(acc[1][0]));
}

static void xk_decode_pair_any(int qm, float *y0, float *y1, const uint8_t *w0,
                               const uint8_t *w1, size_t chunk, int64_t nsb, const xk_xblock *xb) {
#define XK_PAIR(Q)                                                                         \
    case Q: xk_decode_pair(Q, y0, y1, w0, w1, chunk, nsb, xb); break;
    switch (qm) { XK_TYPES(XK_PAIR) }
#undef XK_PAIR
}

/* xk_tile with its type and token count as constants, so each copy keeps its sums in
 * registers. */
static void xk_tile_any(int qm, int nt, float *y, int64_t ldy, const uint8_t *w, size_t chunk,
                        int64_t nsb, const xk_xblock *xb) {
#define XK_CASE(Q, N)                                                                      \
    case (Q) * XK_TOK + (N) - 1: xk_tile((Q), (N), y, ldy, w, chunk, nsb, xb); break;
#define XK_CASES(Q)                                                                        \
    XK_CASE(Q, 1) XK_CASE(Q, 2) XK_CASE(Q, 3) XK_CASE(Q, 4) XK_CASE(Q, 5) XK_CASE(Q, 6)       \
    XK_CASE(Q, 7) XK_CASE(Q, 8) XK_CASE(Q, 9) XK_CASE(Q, 10) XK_CASE(Q, 11) XK_CASE(Q, 12)    \
    XK_CASE(Q, 13) XK_CASE(Q, 14) XK_CASE(Q, 15) XK_CASE(Q, 16)
    switch (qm * XK_TOK + nt - 1) { XK_TYPES(XK_CASES) }
#undef XK_CASES
#undef XK_CASE
}

/* Tokens [0, n_tok) of xp (Q8_K rows) as tiles of XK_TOK (xb[tile * nsb + sb]); the last
 * tile's missing tokens are left unset (never read). */
static void xk_prepare_x(xk_xblock *xb, const void *xp, size_t x_stride, int64_t nsb,
                         int64_t n_tok, int qm) {
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_k *x = (const tsr_block_q8_k *)((const char *)xp + t * x_stride);
        xk_xblock *o = xb + t / XK_TOK * nsb;
        const int i = (int)(t % XK_TOK);
        for (int64_t sb = 0; sb < nsb; sb++) {
            memcpy(o[sb].q[i], x[sb].qs, TSR_QK_K);
            o[sb].d[i] = x[sb].d;
            for (int g = 0; g < 16; g++) o[sb].aux[i][g] = tsr_xk16_aux(qm, x[sb].bsums, g);
        }
    }
}

/* As tsr_x16_matmul_avx512: tokens in blocks of XK_TOK_BLOCK, each group of the slice through
 * them XK_TOK at a time. */
int tsr_xk16_matmul_avx512(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                           int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    const tsr_xk16_dims d = tsr_xk16_dims_of(wtype, n_in);
    const int64_t tb = n_tok < XK_TOK_BLOCK ? n_tok : XK_TOK_BLOCK;
    const int64_t n_tiles = (tb + XK_TOK - 1) / XK_TOK;
    xk_xblock *xb = aligned_alloc(64, (size_t)(n_tiles * d.nsb) * sizeof *xb);
    if (!xb) return -1;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tb) {
        const int64_t ntb = n_tok - t0 < tb ? n_tok - t0 : tb;
        xk_prepare_x(xb, (const char *)xp + (size_t)t0 * d.x_stride, d.x_stride, d.nsb, ntb, d.qm);
        const int64_t h = n_tok == 1 ? (g1 - g0) / 2 : 0; /* decode: g with g + h */
        for (int64_t g = g0; g < g0 + h; g++)
            xk_decode_pair_any(d.qm, y + g * TSR_X16_ROWS, y + (g + h) * TSR_X16_ROWS,
                               (const uint8_t *)w + (size_t)g * d.group_bytes,
                               (const uint8_t *)w + (size_t)(g + h) * d.group_bytes, d.chunk, d.nsb,
                               xb);
        int64_t g = g0 + 2 * h;
        for (; xk_pair_pays(d.qm) && g + 1 < g1; g += 2)
            for (int64_t t = 0; t < ntb; t += XK_TOK) {
                const int in_tile = (int)(ntb - t < XK_TOK ? ntb - t : XK_TOK);
                for (int u = 0; u < in_tile; u += XK_PAIR_TOK) {
                    const int nt = in_tile - u < XK_PAIR_TOK ? in_tile - u : XK_PAIR_TOK;
                    xk_tile_pair_any(d.qm, nt, y + (t0 + t + u) * ldy + g * TSR_X16_ROWS, ldy,
                                     (const uint8_t *)w + (size_t)g * d.group_bytes, d.group_bytes,
                                     d.chunk, d.nsb, xb + t / XK_TOK * d.nsb, u);
                }
            }
        for (; g < g1; g++)
            for (int64_t t = 0; t < ntb; t += XK_TOK)
                xk_tile_any(d.qm, (int)(ntb - t < XK_TOK ? ntb - t : XK_TOK),
                            y + (t0 + t) * ldy + g * TSR_X16_ROWS, ldy,
                            (const uint8_t *)w + (size_t)g * d.group_bytes, d.chunk, d.nsb,
                            xb + t / XK_TOK * d.nsb);
    }
    free(xb);
    return 0;
}
