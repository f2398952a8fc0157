/* The x16 product of the K types with AVX2 (kernels_cpu.h), for machines without AVX-512
 * VNNI: each group's 16 rows go as two halves of 8 (the low and high 32 bytes of each 64-byte
 * vector of a chunk), four tokens at a time. A chunk's group scales (and mins) of the 16 rows
 * are decoded from their planes once per tile and super-block with 128-bit operations, as
 * repack_k_avx512.c does with 512-bit ones; a scale group's quants of a half are unpacked into
 * eight or four registers (lane r: four quants of row r), and per token vpmaddubsw multiplies
 * them by four-byte broadcasts of its activation quants into int16 pair sums, which runs of
 * vectors add in int16 before a vpmaddwd makes the lanes' int32 (Q4_K: 8 x 2 x 15 x 128,
 * Q5_K: 4 x 2 x 31 x 128, Q6_K: 2 x 2 x 63 x 128, all below 2^15). IQ4_XS's levels lifted by
 * 128 would overflow a pair sum, so its signed levels go against the activations by the sign
 * trick (|x| x sign(w, x): pair sums at most 2 x 128 x 127) and its chains start from 0; the
 * offsets of Q6_K (32) and Q3_K (4) come back by starting each chain from -offset x the
 * group's activation sum (tsr_xk16_aux), and the mins (Q4_K, Q5_K, Q2_K) are vpmaddwd of the
 * rows' int16 min pairs with the token's pairs of group sums. One vpmulld by the rows' group
 * scales adds a chain to the token's exact integer sum of the super-block, and one fma (the
 * mins: one fnmadd) per super-block and token makes the fast order of repack_k.c, so the
 * values are its bits. A tile takes both halves of each chunk in turn, so that decode reads
 * the chunk once (with a prefetch ahead: 1.8-1.9x two passes without one). */
#include "quants.h"
#include "repack.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define YK_TOK 4 /* tokens per tile: their integer sums beside eight weight registers */
#define YK_INLINE static inline __attribute__((always_inline))

/* What each (token, super-block) of the activations brings besides its quants: the words of
 * tsr_xk16_aux. */
typedef struct yk_xinfo {
    int32_t aux[16];
} yk_xinfo;

/* A chunk's group scales and mins of its 16 rows, one byte a row; signed types as int8. */
typedef struct yk_scales {
    uint8_t sc[16][TSR_X16_ROWS], mn[16][TSR_X16_ROWS];
} yk_scales;

YK_INLINE __m128i yk_plane(const uint8_t *c, size_t at, int p) {
    return _mm_loadu_si128((const __m128i *)(c + at + 16 * (size_t)p));
}

YK_INLINE void yk_store(uint8_t *dst, __m128i v) {
    _mm_storeu_si128((__m128i *)dst, v);
}

/* The rules of tsr_qk_scale_min, tsr_q3k_scales and tsr_iq4xs_scale on 16 rows at once, for
 * the planes of a chunk (Q6_K's int8 scales are read in place). */
YK_INLINE void yk_decode_scales(const int qm, const uint8_t *c, yk_scales *s) {
    const __m128i m4 = _mm_set1_epi8(0x0f), m6 = _mm_set1_epi8(0x3f), m30 = _mm_set1_epi8(0x30);
    if (qm == TSR_QM_Q4_K || qm == TSR_QM_Q5_K)
        for (int j = 0; j < 4; j++) {
            const __m128i lo = yk_plane(c, TSR_XK16_Q4_K_SCALES, j),
                          mid = yk_plane(c, TSR_XK16_Q4_K_SCALES, j + 4),
                          hi = yk_plane(c, TSR_XK16_Q4_K_SCALES, j + 8);
            yk_store(s->sc[j], _mm_and_si128(lo, m6));
            yk_store(s->mn[j], _mm_and_si128(mid, m6));
            yk_store(s->sc[j + 4], _mm_or_si128(_mm_and_si128(hi, m4),
                                                _mm_and_si128(_mm_srli_epi16(lo, 2), m30)));
            yk_store(s->mn[j + 4],
                     _mm_or_si128(_mm_and_si128(_mm_srli_epi16(hi, 4), m4),
                                  _mm_and_si128(_mm_srli_epi16(mid, 2), m30)));
        }
    if (qm == TSR_QM_Q3_K)
        for (int j = 0; j < 16; j++) {
            __m128i lo = yk_plane(c, TSR_XK16_Q3_K_SCALES, j % 8);
            lo = _mm_and_si128(j < 8 ? lo : _mm_srli_epi16(lo, 4), m4);
            const __m128i hi = yk_plane(c, TSR_XK16_Q3_K_SCALES, 8 + j % 4);
            const int shift = 2 * (j / 4); /* its two bits to bits 4, 5 */
            const __m128i h = shift < 4 ? _mm_slli_epi16(hi, 4 - shift)
                                        : _mm_srli_epi16(hi, shift - 4);
            yk_store(s->sc[j], _mm_sub_epi8(_mm_or_si128(lo, _mm_and_si128(h, m30)),
                                            _mm_set1_epi8(32)));
        }
    if (qm == TSR_QM_Q2_K)
        for (int j = 0; j < 16; j++) {
            const __m128i p = yk_plane(c, TSR_XK16_Q2_K_SCALES, j);
            yk_store(s->sc[j], _mm_and_si128(p, m4));
            yk_store(s->mn[j], _mm_and_si128(_mm_srli_epi16(p, 4), m4));
        }
    if (qm == TSR_QM_IQ4_XS) { /* scales_h: rows 0-7, then 8-15, two bytes a row */
        const __m128i high[2] = {yk_plane(c, TSR_XK16_IQ4_XS_SCALES_H, 0),
                                 yk_plane(c, TSR_XK16_IQ4_XS_SCALES_H, 1)};
        const __m128i m3 = _mm_set1_epi16(3);
        for (int j = 0; j < 8; j++) {
            __m128i lo = yk_plane(c, TSR_XK16_IQ4_XS_SCALES_L, j / 2);
            lo = _mm_and_si128(j % 2 ? _mm_srli_epi16(lo, 4) : lo, m4);
            const __m128i h = _mm_packus_epi16( /* bits 2j, 2j + 1 of each row's word at 4, 5 */
                _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(high[0], 2 * j), m3), 4),
                _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(high[1], 2 * j), m3), 4));
            yk_store(s->sc[j], _mm_sub_epi8(_mm_or_si128(lo, h), _mm_set1_epi8(32)));
        }
    }
}

/* 8 lanes of int32 from the bytes of half h of 16 rows (signed or not). */
YK_INLINE __m256i yk_lanes(const uint8_t *rows, int h, int is_signed) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)(rows + 8 * h));
    return is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v);
}

YK_INLINE __m256i yk_bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm256_set1_epi32(v);
}

YK_INLINE __m256i yk_load(const uint8_t *c, size_t at, int h) {
    return _mm256_loadu_si256((const __m256i *)(c + at + 32 * (size_t)h));
}

/* The vectors whose int16 pair sums may be added before vpmaddwd (the header's bounds). */
YK_INLINE int yk_run(const int qm) {
    return qm == TSR_QM_Q6_K ? 2 : qm == TSR_QM_IQ4_XS ? 1 : qm == TSR_QM_Q4_K ? 8 : 4;
}

YK_INLINE __m256i yk_mul(const int qm, __m256i w, __m256i x) {
    if (qm == TSR_QM_IQ4_XS)
        return _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
    return _mm256_maddubs_epi16(w, x);
}

/* For each token, isum[t] += scales x (start[t] + the exact dot of the n vectors wv with the
 * token's quants at x[t]). */
YK_INLINE void yk_group(const int qm, const int nt, const int n, __m256i *isum, const __m256i *wv,
                        __m256i scales, const int8_t *const *x, const int32_t *start) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int t = 0; t < nt; t++) {
        __m256i i = _mm256_set1_epi32(start[t]);
        for (int k0 = 0; k0 < n; k0 += yk_run(qm)) {
            __m256i s = yk_mul(qm, wv[k0], yk_bcast4(x[t] + 4 * k0));
            for (int k = k0 + 1; k < k0 + yk_run(qm) && k < n; k++)
                s = _mm256_add_epi16(s, yk_mul(qm, wv[k], yk_bcast4(x[t] + 4 * k)));
            i = _mm256_add_epi32(i, _mm256_madd_epi16(s, ones));
        }
        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(i, scales));
    }
}

/* Half h of a chunk's integer sums for the nt tokens (x[t]: the super-block's quants,
 * info[t]: its words). */
YK_INLINE void yk_sums(const int qm, const int nt, __m256i *isum, const uint8_t *c, int h,
                       const yk_scales *s, const int8_t *const *x, const yk_xinfo *const *info) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
    const int32_t zero[YK_TOK] = {0};
    int32_t start[YK_TOK];
    const int8_t *xg[YK_TOK];
    __m256i wv[8];
    if (qm == TSR_QM_Q4_K || qm == TSR_QM_Q5_K || qm == TSR_QM_IQ4_XS) {
        const __m128i lv = _mm_loadu_si128((const __m128i *)tsr_iq4nl_values);
        const __m256i levels = _mm256_broadcastsi128_si256(lv);
        for (int g = 0; g < 8; g++) {
            for (int j = 0; j < 8; j++) {
                if (qm == TSR_QM_IQ4_XS) { /* nibbles of qs vectors 4g..: low ones first */
                    const __m256i v = yk_load(c, 64 * (size_t)(4 * g + j % 4), h);
                    wv[j] = _mm256_shuffle_epi8(
                        levels, _mm256_and_si256(j < 4 ? v : _mm256_srli_epi16(v, 4), m4));
                    continue;
                }
                const __m256i v = yk_load(c, 64 * (size_t)(8 * (g / 2) + j), h);
                wv[j] = _mm256_and_si256(g % 2 ? _mm256_srli_epi16(v, 4) : v, m4);
                if (qm == TSR_QM_Q5_K) { /* bit g of the qh bytes, moved to bit 4 */
                    __m256i hb = yk_load(c, TSR_XK16_Q5_K_QH + 64 * (size_t)j, h);
                    hb = g < 4 ? _mm256_slli_epi16(hb, 4 - g) : _mm256_srli_epi16(hb, g - 4);
                    wv[j] = _mm256_or_si256(wv[j], _mm256_and_si256(hb, _mm256_set1_epi8(0x10)));
                }
            }
            for (int t = 0; t < nt; t++) xg[t] = x[t] + 32 * g;
            yk_group(qm, nt, 8, isum, wv, yk_lanes(s->sc[g], h, qm == TSR_QM_IQ4_XS), xg, zero);
        }
        return;
    }
    for (int hf = 0; hf < 2; hf++) /* Q6_K, Q3_K, Q2_K: repack_k_avx512.c's xk_k16 */
        for (int q = 0; q < 4; q++) {
            for (int j = 0; j < 8; j++) {
                if (qm == TSR_QM_Q6_K) {
                    __m256i l = yk_load(c, 64 * (size_t)(8 * (2 * hf + q % 2) + j), h);
                    __m256i hi = yk_load(c, TSR_XK16_Q6_K_QH + 64 * (size_t)(8 * hf + j), h);
                    l = _mm256_and_si256(q >= 2 ? _mm256_srli_epi16(l, 4) : l, m4);
                    hi = q == 3  ? _mm256_srli_epi16(hi, 2)
                         : q < 2 ? _mm256_slli_epi16(hi, 4 - 2 * q)
                                 : hi;
                    wv[j] = _mm256_or_si256(l, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
                    continue;
                }
                const size_t qs_at = qm == TSR_QM_Q3_K ? TSR_XK16_Q3_K_QS : 0;
                __m256i l = yk_load(c, qs_at + 64 * (size_t)(8 * hf + j), h);
                l = _mm256_and_si256(_mm256_srli_epi16(l, 2 * q), m3);
                if (qm == TSR_QM_Q3_K) { /* the high bit (hmask bit 4 hf + q) as bit 2 */
                    const int bit = 4 * hf + q;
                    __m256i hm = yk_load(c, 64 * (size_t)j, h);
                    hm = bit < 2 ? _mm256_slli_epi16(hm, 2 - bit) : _mm256_srli_epi16(hm, bit - 2);
                    l = _mm256_or_si256(l, _mm256_and_si256(hm, _mm256_set1_epi8(4)));
                }
                wv[j] = l;
            }
            for (int sg = 0; sg < 2; sg++) {
                const int g = 8 * hf + 2 * q + sg;
                for (int t = 0; t < nt; t++) {
                    xg[t] = x[t] + 16 * g;
                    start[t] = qm == TSR_QM_Q2_K ? 0 : info[t]->aux[g];
                }
                const __m256i scales =
                    qm == TSR_QM_Q6_K
                        ? yk_lanes(c + TSR_XK16_Q6_K_SCALES + 16 * (size_t)g, h, 1)
                        : yk_lanes(s->sc[g], h, qm == TSR_QM_Q3_K);
                yk_group(qm, nt, 4, isum, wv + 4 * sg, scales, xg, start);
            }
        }
}

YK_INLINE __m256 yk_halves(const uint8_t *c, size_t at, int h) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + at + 16 * (size_t)h)));
}

/* Decode (up to YK_PF_NT tokens) reads the weights once: each chunk is prefetched YK_PF bytes
 * ahead, as repack_k_avx512.c's decode does. */
#define YK_PF_NT 2
#define YK_PF (2 * TSR_STREAM_PREFETCH)

/* y[t * ldy + r] for the 16 rows of one group (chunks of `chunk` bytes from w) and nt tokens
 * (x[t]: their Q8_K rows, info[t]: their words, per super-block): each chunk's scales decoded
 * once and its two halves taken in turn, the f32 sums in an L1 buffer. */
YK_INLINE void yk_tile(const int qm, const int nt, float *y, int64_t ldy, const uint8_t *w,
                       size_t chunk, int64_t nsb, const tsr_block_q8_k *const *x,
                       const yk_xinfo *const *info) {
    float acc[YK_TOK][TSR_X16_ROWS] __attribute__((aligned(32)));
    memset(acc, 0, sizeof acc);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *c = w + (size_t)sb * chunk;
        if (nt <= YK_PF_NT)
            for (size_t o = 0; o < chunk; o += 64)
                _mm_prefetch((const char *)c + YK_PF + o, _MM_HINT_T0);
        yk_scales s;
        yk_decode_scales(qm, c, &s);
        const int8_t *xq[YK_TOK];
        const yk_xinfo *xi[YK_TOK];
        for (int t = 0; t < nt; t++) {
            xq[t] = x[t][sb].qs;
            xi[t] = info[t] + sb;
        }
        for (int h = 0; h < 2; h++) {
            __m256i isum[YK_TOK];
            for (int t = 0; t < nt; t++) isum[t] = _mm256_setzero_si256();
            yk_sums(qm, nt, isum, c, h, &s, xq, xi);
            const __m256 dw = yk_halves(c, tsr_xk16_d_at(qm), h),
                         dmin = tsr_xk16_min_pairs(qm) ? yk_halves(c, tsr_xk16_dmin_at(qm), h)
                                                       : _mm256_setzero_ps();
            __m256i mins[8];
            for (int m = 0; m < tsr_xk16_min_pairs(qm); m++) /* groups 2m, 2m + 1: int16 pairs */
                mins[m] = _mm256_or_si256(yk_lanes(s.mn[2 * m], h, 0),
                                          _mm256_slli_epi32(yk_lanes(s.mn[2 * m + 1], h, 0), 16));
            for (int t = 0; t < nt; t++) {
                float *at = acc[t] + 8 * h;
                const __m256 dx = _mm256_set1_ps(x[t][sb].d);
                __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dw, dx),
                                           _mm256_load_ps(at));
                if (tsr_xk16_min_pairs(qm)) {
                    __m256i m = _mm256_setzero_si256();
                    for (int k = 0; k < tsr_xk16_min_pairs(qm); k++)
                        m = _mm256_add_epi32(
                            m, _mm256_madd_epi16(mins[k], _mm256_set1_epi32(xi[t]->aux[k])));
                    a = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, dx), a);
                }
                _mm256_store_ps(at, a);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm256_storeu_ps(y + t * ldy, _mm256_load_ps(acc[t]));
        _mm256_storeu_ps(y + t * ldy + 8, _mm256_load_ps(acc[t] + 8));
    }
}

/* yk_tile with its type and token count as constants. */
static void yk_tile_any(int qm, int nt, float *y, int64_t ldy, const uint8_t *w, size_t chunk,
                        int64_t nsb, const tsr_block_q8_k *const *x, const yk_xinfo *const *info) {
#define YK_CASE(Q, N)                                                                      \
    case (Q) * YK_TOK + (N) - 1: yk_tile((Q), (N), y, ldy, w, chunk, nsb, x, info); break;
#define YK_CASES(Q) YK_CASE(Q, 1) YK_CASE(Q, 2) YK_CASE(Q, 3) YK_CASE(Q, 4)
    switch (qm * YK_TOK + nt - 1) {
        YK_CASES(TSR_QM_Q2_K) YK_CASES(TSR_QM_Q3_K) YK_CASES(TSR_QM_Q4_K)
        YK_CASES(TSR_QM_Q5_K) YK_CASES(TSR_QM_Q6_K) YK_CASES(TSR_QM_IQ4_XS)
    }
#undef YK_CASES
#undef YK_CASE
}

int tsr_xk16_matmul_avx2(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                         int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    const tsr_xk16_dims d = tsr_xk16_dims_of(wtype, n_in);
    yk_xinfo *info = malloc((size_t)(n_tok * d.nsb) * sizeof *info);
    if (!info) return -1;
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_k *x = (const tsr_block_q8_k *)((const char *)xp + t * d.x_stride);
        for (int64_t sb = 0; sb < d.nsb; sb++)
            for (int g = 0; g < 16; g++)
                info[t * d.nsb + sb].aux[g] = tsr_xk16_aux(d.qm, x[sb].bsums, g);
    }
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t0 = 0; t0 < n_tok; t0 += YK_TOK) {
            const int nt = (int)(n_tok - t0 < YK_TOK ? n_tok - t0 : YK_TOK);
            const tsr_block_q8_k *x[YK_TOK];
            const yk_xinfo *xi[YK_TOK];
            for (int t = 0; t < nt; t++) {
                x[t] = (const tsr_block_q8_k *)((const char *)xp + (size_t)(t0 + t) * d.x_stride);
                xi[t] = info + (t0 + t) * d.nsb;
            }
            yk_tile_any(d.qm, nt, y + t0 * ldy + g * TSR_X16_ROWS, ldy,
                        (const uint8_t *)w + (size_t)g * d.group_bytes, d.chunk, d.nsb, x, xi);
        }
    free(info);
    return 0;
}
