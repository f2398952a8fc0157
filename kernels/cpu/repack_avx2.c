/* The x16 product with AVX2 (kernels_cpu.h), for machines without AVX-512 VNNI: eight int32
 * lanes per register, so each group's 16 rows go as two halves of 8 (the low and high 32 bytes
 * of each 64-byte quad-column of a tile), four tokens at a time, eight weight registers and
 * four accumulators of a half in registers. AVX2 has no vpdpbusd:
 *  - Q4_0: vpmaddubsw multiplies the unsigned nibbles by the signed activation quants into
 *    int16 pair sums, which the eight quad-columns add in int16 (|sum| <= 8 x 2 x 15 x 128 <
 *    2^15) before one vpmaddwd makes the lane's int32; the stored offset 8 comes back as
 *    -8 x (the block's activation sum), the lane's start;
 *  - Q8_0: the stored quants (q + 128) are made signed again and multiplied with the sign
 *    trick (|w| x sign(x, w), pair sums <= 2 x 128 x 127 < 2^15), one vpmaddwd per
 *    quad-column.
 * Either way a lane holds the exact integer dot of its row and token, and one fma per block
 * ((float)isum x (dw x dx)) makes the fast order of repack.c: the scalar kernel's bits. */
#include "repack.h"
#include "x86_common.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define X8_TOK 4 /* tokens per tile: 4 accumulators beside 8 weight registers */
#define X8_INLINE static inline __attribute__((always_inline))

/* What each (token, block) of the activations brings besides its quants. */
typedef struct x8_xinfo {
    float d;
    int32_t corr; /* the lane's start: -offset x the block's quant sum (Q4_0), 0 (Q8_0) */
} x8_xinfo;

X8_INLINE __m256i x8_bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm256_set1_epi32(v);
}

/* The eight quad-columns of half h of block b's tile: Q4_0 as unsigned nibbles, Q8_0 signed. */
X8_INLINE void x8_weights(int q4, const uint8_t *tile, int h, __m256i wv[8]) {
    if (q4) {
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        for (int j = 0; j < 4; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(tile + 64 * j + 32 * h));
            wv[j] = _mm256_and_si256(v, m4);
            wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
    } else {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int k = 0; k < 8; k++)
            wv[k] = _mm256_xor_si256(
                _mm256_loadu_si256((const __m256i *)(tile + 64 * k + 32 * h)), flip);
    }
}

/* The int32 dots of the half's 8 rows with one token's block, from the lane's start. */
X8_INLINE __m256i x8_dots(int q4, const __m256i wv[8], const int8_t *xq, int32_t start) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    if (q4) {
        __m256i s = _mm256_maddubs_epi16(wv[0], x8_bcast4(xq));
        for (int k = 1; k < 8; k++)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[k], x8_bcast4(xq + 4 * k)));
        return _mm256_add_epi32(_mm256_madd_epi16(s, ones16), _mm256_set1_epi32(start));
    }
    __m256i i = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv[k]),
                                         _mm256_sign_epi8(x8_bcast4(xq + 4 * k), wv[k]));
        i = _mm256_add_epi32(i, _mm256_madd_epi16(p, ones16));
    }
    return i;
}

/* y[t * ldy + r] for the 8 rows of half h of one group and nt tokens from x (each token's
 * blocks x_stride apart, its infos info_stride apart). */
X8_INLINE void x8_tile(const int q4, const int nt, float *y, int64_t ldy, const uint8_t *tiles,
                       const uint16_t *scales, int64_t nb, int h,
                       const tsr_block_q8_0 *const *x, const x8_xinfo *const *info) {
    __m256 acc[X8_TOK];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    const size_t tile_bytes = tsr_x16_tile_bytes(q4 ? TSR_DTYPE_Q4_0 : TSR_DTYPE_Q8_0);
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[8];
        x8_weights(q4, tiles + (size_t)b * tile_bytes, h, wv);
        const __m256 dw = _mm256_cvtph_ps(
            _mm_loadu_si128((const __m128i *)(scales + TSR_X16_ROWS * b + 8 * h)));
        for (int t = 0; t < nt; t++) {
            __m256i i = x8_dots(q4, wv, x[t][b].q, info[t][b].corr);
            const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(info[t][b].d));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(y + t * ldy, acc[t]);
}

/* x8_tile with its type and token count as constants, so each copy keeps its accumulators in
 * registers. */
static void x8_tile_any(int q4, int nt, float *y, int64_t ldy, const uint8_t *tiles,
                        const uint16_t *scales, int64_t nb, int h,
                        const tsr_block_q8_0 *const *x, const x8_xinfo *const *info) {
#define X8_CASE(Q, N)                                                                      \
    case (Q) * X8_TOK + (N) - 1: x8_tile((Q), (N), y, ldy, tiles, scales, nb, h, x, info); break;
    switch (q4 * X8_TOK + nt - 1) {
        X8_CASE(0, 1) X8_CASE(0, 2) X8_CASE(0, 3) X8_CASE(0, 4)
        X8_CASE(1, 1) X8_CASE(1, 2) X8_CASE(1, 3) X8_CASE(1, 4)
    }
#undef X8_CASE
}

/* Each (token, block)'s scale as f32 and, for Q4_0, its quant sum times -8. */
static void x8_prepare(x8_xinfo *info, const void *xp, size_t x_stride, int64_t nb,
                       int64_t n_tok, int q4) {
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_0 *x = (const tsr_block_q8_0 *)((const char *)xp + t * x_stride);
        for (int64_t b = 0; b < nb; b++) {
            int32_t sum = q4 ? tsr_x86_q8_quants_sum(_mm256_loadu_si256((const __m256i *)x[b].q))
                             : 0;
            info[t * nb + b] = (x8_xinfo){.d = _cvtsh_ss(x[b].d),
                                          .corr = -tsr_x16_offset(TSR_DTYPE_Q4_0) * sum};
        }
    }
}

int tsr_x16_matmul_avx2(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                        int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    const int64_t nb = n_in / TSR_QK;
    const int q4 = wtype == TSR_DTYPE_Q4_0;
    const size_t x_stride = tsr_row_size(TSR_DTYPE_Q8_0, n_in);
    const size_t group_bytes = TSR_X16_ROWS * tsr_row_size(wtype, n_in);
    const size_t scales_at = (size_t)nb * tsr_x16_tile_bytes(wtype);
    x8_xinfo *info = malloc((size_t)(n_tok * nb) * sizeof *info);
    if (!info) return -1;
    x8_prepare(info, xp, x_stride, nb, n_tok, q4);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *tiles = (const uint8_t *)w + (size_t)g * group_bytes;
        const uint16_t *scales = (const uint16_t *)(tiles + scales_at);
        for (int64_t t0 = 0; t0 < n_tok; t0 += X8_TOK) {
            const int nt = (int)(n_tok - t0 < X8_TOK ? n_tok - t0 : X8_TOK);
            const tsr_block_q8_0 *x[X8_TOK];
            const x8_xinfo *xi[X8_TOK];
            for (int t = 0; t < nt; t++) {
                x[t] = (const tsr_block_q8_0 *)((const char *)xp + (size_t)(t0 + t) * x_stride);
                xi[t] = info + (t0 + t) * nb;
            }
            for (int h = 0; h < 2; h++)
                x8_tile_any(q4, nt, y + t0 * ldy + g * TSR_X16_ROWS + 8 * h, ldy, tiles, scales,
                            nb, h, x, xi);
        }
    }
    free(info);
    return 0;
}
