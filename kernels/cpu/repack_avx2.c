/* The x16 product with AVX2 (kernels_cpu.h), for machines without AVX-512 VNNI: eight int32
 * lanes per register, so each group's 16 rows go as two halves of 8 (the low and high 32 bytes
 * of each 64-byte quad-column of a tile), four tokens at a time, eight weight registers and
 * four accumulators of a half in registers. AVX2 has no vpdpbusd:
 *  - Q4_0, Q4_1, Q5_0, Q5_1: vpmaddubsw multiplies the unsigned quants by the signed
 *    activation quants into int16 pair sums, which runs of quad-columns add in int16 before a
 *    vpmaddwd makes the lane's int32 (x8_dots); Q4_0's and Q5_0's offsets (8, 16) come back as
 *    -offset x (the block's activation sum), the lane's start;
 *  - Q8_0 and IQ4_NL: the stored quants (q + 128) made signed again, or the nibbles looked up
 *    in IQ4_NL's table by vpshufb, are multiplied with the sign trick (|w| x sign(x, w), pair
 *    sums <= 2 x 128 x 127 < 2^15), one vpmaddwd per quad-column.
 * Either way a lane holds the exact integer dot of its row and token, and one fma per block
 * ((float)isum x (dw x dx)), for Q4_1 / Q5_1 then one more (m x the Q8_1 block's s), makes the
 * fast order of repack.c: the scalar kernel's bits. */
#include "quants.h"
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
    int32_t corr; /* the lane's start: -offset x the block's quant sum, 0 for signed weights */
    float s;      /* Q8_1's sum (the types with a minimum) */
} x8_xinfo;

/* The weights these kernels multiply signed (the sign trick): Q8_0, and IQ4_NL through its
 * table, whose levels lifted by 128 would overflow vpmaddubsw's int16 pair sums. */
X8_INLINE int x8_signed(int32_t wtype) {
    return wtype == TSR_DTYPE_Q8_0 || wtype == TSR_DTYPE_IQ4_NL;
}

X8_INLINE __m256i x8_bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm256_set1_epi32(v);
}

/* The eight quad-columns of half h of block b's tile: the nibble types unsigned (Q5 with their
 * fifth bits), Q8_0 and IQ4_NL signed. */
X8_INLINE void x8_weights(const int32_t wtype, const uint8_t *tile, int h, __m256i wv[8]) {
    if (wtype == TSR_DTYPE_Q8_0) {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int k = 0; k < 8; k++)
            wv[k] = _mm256_xor_si256(
                _mm256_loadu_si256((const __m256i *)(tile + 64 * k + 32 * h)), flip);
        return;
    }
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int j = 0; j < 4; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(tile + 64 * j + 32 * h));
        wv[j] = _mm256_and_si256(v, m4);
        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    if (tsr_x16_has_qh(wtype)) {
        /* bit k of each byte is quad-column k's fifth bit (tsr_x16_qh_pack): moved to bit 4 */
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(tile + 256 + 32 * h));
        const __m256i bit4 = _mm256_set1_epi8(0x10);
        for (int k = 0; k < 8; k++) {
            __m256i hk = k < 4 ? _mm256_slli_epi32(hb, 4 - k) : _mm256_srli_epi32(hb, k - 4);
            wv[k] = _mm256_or_si256(wv[k], _mm256_and_si256(hk, bit4));
        }
    }
    if (wtype == TSR_DTYPE_IQ4_NL) {
        const __m256i table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tsr_iq4nl_values));
        for (int k = 0; k < 8; k++) wv[k] = _mm256_shuffle_epi8(table, wv[k]);
    }
}

/* The int32 dots of the half's 8 rows with one token's block, from the lane's start. Unsigned
 * weights: vpmaddubsw pair sums added in int16 over 8 quad-columns (4-bit: |sum| <= 8 x 2 x
 * 15 x 127 < 2^15) or 4 (5-bit: 4 x 2 x 31 x 127 < 2^15) before each vpmaddwd. Signed ones:
 * the sign trick, one vpmaddwd per quad-column. */
X8_INLINE __m256i x8_dots(const int32_t wtype, const __m256i wv[8], const int8_t *xq,
                          int32_t start) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i i = _mm256_set1_epi32(start);
    if (x8_signed(wtype)) {
        for (int k = 0; k < 8; k++) {
            __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv[k]),
                                             _mm256_sign_epi8(x8_bcast4(xq + 4 * k), wv[k]));
            i = _mm256_add_epi32(i, _mm256_madd_epi16(p, ones16));
        }
        return i;
    }
    const int run = tsr_x16_has_qh(wtype) ? 4 : 8;
    for (int k0 = 0; k0 < 8; k0 += run) {
        __m256i s = _mm256_maddubs_epi16(wv[k0], x8_bcast4(xq + 4 * k0));
        for (int k = k0 + 1; k < k0 + run; k++)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[k], x8_bcast4(xq + 4 * k)));
        i = _mm256_add_epi32(i, _mm256_madd_epi16(s, ones16));
    }
    return i;
}

/* Decode (up to X8_DEC_TOK tokens) reads the weights once: a tile takes both halves of each
 * block in turn and prefetches each pair of blocks TSR_STREAM_PREFETCH bytes ahead, as
 * repack_avx512.c's decode does (1.12-1.32x two passes without the prefetch); more tokens go
 * half by half, their accumulators and a half's weights in registers (both halves at once
 * prefilled at 0.75-0.83x). */
#define X8_DEC_TOK 2
#define X8_HALVES(nt) ((nt) <= X8_DEC_TOK ? 2 : 1)

/* y[t * ldy + r] for the rows of halves [h, h + X8_HALVES(nt)) of one group (8 each, y at the
 * first) and nt tokens from x (each token's prepared row; its infos info_stride apart). */
X8_INLINE void x8_tile(const int32_t wtype, const int nt, float *y, int64_t ldy,
                       const uint8_t *grp, int64_t nb, int h_first, const void *const *x,
                       const x8_xinfo *const *info) {
    __m256 acc[2][X8_TOK];
    for (int t = 0; t < nt; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    const size_t tile = tsr_x16_tile_bytes(wtype);
    for (size_t b0 = 0; b0 < (size_t)nb; b0 += 2) {
        const uint8_t *pair = grp + tsr_x16_pair_at(wtype, b0);
        const int n = tsr_x16_pair_blocks((size_t)nb, b0);
        if (nt <= X8_DEC_TOK) tsr_x16_prefetch_pair(wtype, pair, TSR_STREAM_PREFETCH);
        for (int j = 0; j < n; j++) {
            const size_t b = b0 + (size_t)j;
            for (int u = 0; u < X8_HALVES(nt); u++) {
                const int h = h_first + u;
                __m256i wv[8];
                x8_weights(wtype, pair + j * tile, h, wv);
                const uint8_t *sc = pair + tsr_x16_pair_scales_at(wtype, n, j) + 16 * h;
                const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
                const __m256 mw =
                    tsr_x16_has_min(wtype)
                        ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 32)))
                        : _mm256_setzero_ps();
                for (int t = 0; t < nt; t++) {
                    uint16_t d, s;
                    __m256i i = x8_dots(wtype, wv,
                                        tsr_x16_act(wtype, x[t], (int64_t)b, &d, &s),
                                        info[t][b].corr);
                    const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(info[t][b].d));
                    acc[u][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dd, acc[u][t]);
                    if (tsr_x16_has_min(wtype))
                        acc[u][t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(info[t][b].s), acc[u][t]);
                }
            }
        }
    }
    for (int u = 0; u < X8_HALVES(nt); u++)
        for (int t = 0; t < nt; t++) _mm256_storeu_ps(y + t * ldy + 8 * u, acc[u][t]);
}

/* x8_tile with its type and token count as constants, so each copy keeps its accumulators in
 * registers. */
static void x8_tile_any(int32_t wtype, int nt, float *y, int64_t ldy, const uint8_t *grp,
                        int64_t nb, int h_first, const void *const *x,
                        const x8_xinfo *const *info) {
#define X8_CASE(T, I, N)                                                                      \
    case (I) * X8_TOK + (N) - 1: x8_tile((T), (N), y, ldy, grp, nb, h_first, x, info); break;
#define X8_CASES(T, I) X8_CASE(T, I, 1) X8_CASE(T, I, 2) X8_CASE(T, I, 3) X8_CASE(T, I, 4)
    const int index = wtype == TSR_DTYPE_Q8_0   ? 0
                      : wtype == TSR_DTYPE_Q4_0 ? 1
                      : wtype == TSR_DTYPE_Q4_1 ? 2
                      : wtype == TSR_DTYPE_Q5_0 ? 3
                      : wtype == TSR_DTYPE_Q5_1 ? 4
                                                : 5;
    switch (index * X8_TOK + nt - 1) {
        X8_CASES(TSR_DTYPE_Q8_0, 0) X8_CASES(TSR_DTYPE_Q4_0, 1) X8_CASES(TSR_DTYPE_Q4_1, 2)
        X8_CASES(TSR_DTYPE_Q5_0, 3) X8_CASES(TSR_DTYPE_Q5_1, 4) X8_CASES(TSR_DTYPE_IQ4_NL, 5)
    }
#undef X8_CASES
#undef X8_CASE
}

/* Each (token, block)'s scales as f32 and the lane's start. */
static void x8_prepare(x8_xinfo *info, int32_t wtype, const void *xp, size_t x_stride,
                       int64_t nb, int64_t n_tok) {
    const int off = x8_signed(wtype) ? 0 : tsr_x16_offset(wtype);
    for (int64_t t = 0; t < n_tok; t++) {
        const void *x = (const char *)xp + t * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            uint16_t d, s;
            const int8_t *q = tsr_x16_act(wtype, x, b, &d, &s);
            int32_t sum = off ? tsr_x86_q8_quants_sum(_mm256_loadu_si256((const __m256i *)q)) : 0;
            info[t * nb + b] = (x8_xinfo){.d = _cvtsh_ss(d), .corr = -off * sum, .s = _cvtsh_ss(s)};
        }
    }
}

int tsr_x16_matmul_avx2(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                        int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    const int64_t nb = n_in / TSR_QK;
    const size_t x_stride = tsr_row_size(tsr_matmul_act_type(wtype), n_in);
    const size_t group_bytes = TSR_X16_ROWS * tsr_row_size(wtype, n_in);
    x8_xinfo *info = malloc((size_t)(n_tok * nb) * sizeof *info);
    if (!info) return -1;
    x8_prepare(info, wtype, xp, x_stride, nb, n_tok);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = (const uint8_t *)w + (size_t)g * group_bytes;
        for (int64_t t0 = 0; t0 < n_tok; t0 += X8_TOK) {
            const int nt = (int)(n_tok - t0 < X8_TOK ? n_tok - t0 : X8_TOK);
            const void *x[X8_TOK];
            const x8_xinfo *xi[X8_TOK];
            for (int t = 0; t < nt; t++) {
                x[t] = (const char *)xp + (size_t)(t0 + t) * x_stride;
                xi[t] = info + (t0 + t) * nb;
            }
            for (int h = 0; h < 2; h += X8_HALVES(nt))
                x8_tile_any(wtype, nt, y + t0 * ldy + g * TSR_X16_ROWS + 8 * h, ldy, grp, nb, h,
                            x, xi);
        }
    }
    free(info);
    return 0;
}
