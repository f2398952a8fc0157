/* The x16 product with AVX-512 VNNI (kernels_cpu.h) for the 32-element types: 16 rows x up
 * to 16 tokens of f32 accumulators, one 512-bit register each. A block's tile is unpacked once
 * into eight vectors of unsigned quants (lane r: four quants of row r; the 4-bit types' nibbles
 * masked or shifted out, Q5's fifth bits merged from their vector by a shift and a
 * vpternlogd, IQ4_NL's nibbles looked up by vpshufb in its table lifted by 128), then each
 * token adds its block with eight vpdpbusd against four-byte broadcasts of its activation
 * quants, starting from -offset x (the block's activation sum), which makes the lanes the
 * exact signed dots; one fma per block and token ((float)isum x (dw x dx) into the lane's
 * accumulator), and for Q4_1 / Q5_1 a second one (m x the Q8_1 block's s), is the fast order
 * of repack.c, so the values are its bits. */
#include "quants.h"
#include "repack.h"
#include "x86_common.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

/* tokens per tile: 16 accumulators and 8 weight vectors in registers; a Q4_0 tile's unpacking
 * and a block's scales are shared by 16 tokens */
#define X16_TOK 16
#define X16_TOK_BLOCK 64 /* tokens whose activation scales and sums are prepared at a time */

#define X16_INLINE static inline __attribute__((always_inline))

X16_INLINE __m512i x16_bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return _mm512_set1_epi32(v);
}

/* A tile's activations, prepared once per call and read by every group: for block b, the
 * quants of its X16_TOK tokens side by side, then their scales, offset corrections and (Q8_1)
 * sums s, so that the tile addresses all of them from one pointer. */
typedef struct x16_xblock {
    int8_t q[X16_TOK][TSR_QK];
    float d[X16_TOK];
    int32_t corr[X16_TOK];
    float s[X16_TOK];
} x16_xblock;

/* Vector k of the eight of unsigned quants of the tile at p (wtype and k constants). */
X16_INLINE __m512i x16_weight(const int32_t wtype, const uint8_t *p, const int k) {
    if (wtype == TSR_DTYPE_Q8_0) return _mm512_loadu_si512(p + 64 * k);
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i v = _mm512_loadu_si512(p + 64 * (k % 4));
    __m512i w = _mm512_and_si512(k < 4 ? v : _mm512_srli_epi16(v, 4), m4);
    if (tsr_x16_has_qh(wtype)) {
        /* bit k of each byte is vector k's fifth bit (tsr_x16_qh_pack): moved to bit 4 */
        const __m512i h = _mm512_loadu_si512(p + 256);
        const __m512i hk = k < 4 ? _mm512_slli_epi32(h, 4 - k) : _mm512_srli_epi32(h, k - 4);
        w = _mm512_ternarylogic_epi32(w, hk, _mm512_set1_epi8(0x10), 0xf8); /* a | (b & c) */
    }
    if (wtype == TSR_DTYPE_IQ4_NL)
        w = _mm512_shuffle_epi8(
            _mm512_broadcast_i32x4(_mm_xor_si128(
                _mm_loadu_si128((const __m128i *)tsr_iq4nl_values), _mm_set1_epi8((char)0x80))),
            w);
    return w;
}

/* The eight vectors of unsigned quants of the tile at p (a constant wtype). */
X16_INLINE void x16_weights(const int32_t wtype, const uint8_t *p, __m512i wv[8]) {
    for (int k = 0; k < 8; k++) wv[k] = x16_weight(wtype, p, k);
}

/* A block's 16 row scales (k 0) or minimums (k 1, Q4_1 and Q5_1) at sc, as f32. */
X16_INLINE __m512 x16_scales(const uint8_t *sc, int k) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc + k));
}

/* acc plus one block of one token in the fast order: its 16 rows' exact dots i times
 * dw x dx, then for Q4_1 / Q5_1 the minimums at sc times the activation block's s (the same
 * load for every token, which the compiler takes out of the token loops). */
X16_INLINE __m512 x16_add_block(const int32_t wtype, __m512 acc, __m512i i, __m512 dw,
                                const uint8_t *sc, float dx, float s) {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    if (tsr_x16_has_min(wtype)) acc = _mm512_fmadd_ps(x16_scales(sc, 1), _mm512_set1_ps(s), acc);
    return acc;
}

/* y[t * ldy + r] for the 16 rows of the group at grp and the nt tokens of xb (nb blocks). */
X16_INLINE void x16_tile(const int32_t wtype, const int nt, float *y, int64_t ldy,
                         const uint8_t *grp, int64_t nb, const x16_xblock *xb) {
    __m512 acc[X16_TOK];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    const size_t tile = tsr_x16_tile_bytes(wtype);
    for (size_t b0 = 0; b0 < (size_t)nb; b0 += 2) {
        const uint8_t *pair = grp + tsr_x16_pair_at(wtype, b0);
        const int n = tsr_x16_pair_blocks((size_t)nb, b0);
        for (int j = 0; j < n; j++, xb++) {
            __m512i wv[8];
            x16_weights(wtype, pair + j * tile, wv);
            const uint8_t *sc = pair + tsr_x16_pair_scales_at(wtype, n, j);
            const __m512 dw = x16_scales(sc, 0);
            for (int t = 0; t < nt; t++) {
                /* one chain per token: the tokens' chains are independent, which covers the
                 * latency of each */
                __m512i i = _mm512_set1_epi32(xb->corr[t]);
                for (int k = 0; k < 8; k++)
                    i = _mm512_dpbusd_epi32(i, wv[k], x16_bcast4(xb->q[t] + 4 * k));
                acc[t] = x16_add_block(wtype, acc[t], i, dw, sc, xb->d[t], xb->s[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

/* The types as the small indices of the copies' switches. */
#define X16_TYPE_INDEX(wtype)                                                                \
    ((wtype) == TSR_DTYPE_Q8_0   ? 0                                                          \
     : (wtype) == TSR_DTYPE_Q4_0 ? 1                                                          \
     : (wtype) == TSR_DTYPE_Q4_1 ? 2                                                          \
     : (wtype) == TSR_DTYPE_Q5_0 ? 3                                                          \
     : (wtype) == TSR_DTYPE_Q5_1 ? 4                                                          \
                                 : 5)
#define X16_FOR_TYPES(F, ...)                                                                 \
    F(TSR_DTYPE_Q8_0, __VA_ARGS__) F(TSR_DTYPE_Q4_0, __VA_ARGS__)                             \
    F(TSR_DTYPE_Q4_1, __VA_ARGS__) F(TSR_DTYPE_Q5_0, __VA_ARGS__)                             \
    F(TSR_DTYPE_Q5_1, __VA_ARGS__) F(TSR_DTYPE_IQ4_NL, __VA_ARGS__)

/* x16_tile with its type and token count as constants, so each copy keeps its accumulators
 * in registers. */
static void x16_tile_any(int32_t wtype, int nt, float *y, int64_t ldy, const uint8_t *grp,
                         int64_t nb, const x16_xblock *xb) {
#define X16_CASE(T, N)                                                                        \
    case X16_TYPE_INDEX(T) * X16_TOK + (N) - 1:                                               \
        x16_tile((T), (N), y, ldy, grp, nb, xb);                                              \
        break;
#define X16_CASES(T, _)                                                                       \
    X16_CASE(T, 1) X16_CASE(T, 2) X16_CASE(T, 3) X16_CASE(T, 4) X16_CASE(T, 5) X16_CASE(T, 6) \
    X16_CASE(T, 7) X16_CASE(T, 8) X16_CASE(T, 9) X16_CASE(T, 10) X16_CASE(T, 11)              \
    X16_CASE(T, 12) X16_CASE(T, 13) X16_CASE(T, 14) X16_CASE(T, 15) X16_CASE(T, 16)
    switch (X16_TYPE_INDEX(wtype) * X16_TOK + nt - 1) { X16_FOR_TYPES(X16_CASES, 0) }
#undef X16_CASES
#undef X16_CASE
}

/* Two neighbouring groups (at grp and `group_bytes` further) by tokens
 * [t_off, t_off + nt) of xb's tile, nt <= X16_PAIR_TOK: each four-byte broadcast of a token's
 * quants feeds one vpdpbusd per group, where the one-group tile spends one per vpdpbusd (a
 * vpdpbusd fed by its own broadcast ran at 0.65x its rate in a microbenchmark, two per
 * broadcast at 0.8x). The eight weight vectors are unpacked one at a time, each by its use,
 * as both groups' would not fit in registers beside four accumulators per token (two int
 * chains, two f32 sums); the values are x16_tile's, bit for bit. Only where the unpacking
 * is a mask or less (Q8_0, Q4_0, Q4_1: 1.13-1.2x the one-group tile alone): Q5's fifth bits
 * and IQ4_NL's table, unpacked per six tokens rather than per sixteen, ran at 0.86-0.88x. */
#define X16_PAIR_TOK 6
static int x16_pair_pays(int32_t wtype) {
    return wtype == TSR_DTYPE_Q8_0 || wtype == TSR_DTYPE_Q4_0 || wtype == TSR_DTYPE_Q4_1;
}
X16_INLINE void x16_tile_pair(const int32_t wtype, const int nt, float *y, int64_t ldy,
                              const uint8_t *grp, size_t group_bytes, int64_t nb,
                              const x16_xblock *xb, int t_off) {
    __m512 acc[2][X16_PAIR_TOK];
    for (int t = 0; t < nt; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    const size_t tile = tsr_x16_tile_bytes(wtype);
    for (size_t b0 = 0; b0 < (size_t)nb; b0 += 2) {
        const uint8_t *pair = grp + tsr_x16_pair_at(wtype, b0);
        const int n = tsr_x16_pair_blocks((size_t)nb, b0);
        for (int j = 0; j < n; j++, xb++) {
            const uint8_t *pa = pair + j * tile, *pb = pa + group_bytes;
            __m512i ia[X16_PAIR_TOK], ib[X16_PAIR_TOK];
            for (int t = 0; t < nt; t++) ia[t] = ib[t] = _mm512_set1_epi32(xb->corr[t_off + t]);
            for (int k = 0; k < 8; k++) {
                const __m512i wa = x16_weight(wtype, pa, k), wb = x16_weight(wtype, pb, k);
                for (int t = 0; t < nt; t++) {
                    const __m512i q = x16_bcast4(xb->q[t_off + t] + 4 * k);
                    ia[t] = _mm512_dpbusd_epi32(ia[t], wa, q);
                    ib[t] = _mm512_dpbusd_epi32(ib[t], wb, q);
                }
            }
            const uint8_t *sa = pair + tsr_x16_pair_scales_at(wtype, n, j), *sbp = sa + group_bytes;
            const __m512 dwa = x16_scales(sa, 0), dwb = x16_scales(sbp, 0);
            for (int t = 0; t < nt; t++) {
                const float dx = xb->d[t_off + t], s = xb->s[t_off + t];
                acc[0][t] = x16_add_block(wtype, acc[0][t], ia[t], dwa, sa, dx, s);
                acc[1][t] = x16_add_block(wtype, acc[1][t], ib[t], dwb, sbp, dx, s);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm512_storeu_ps(y + t * ldy, acc[0][t]);
        _mm512_storeu_ps(y + t * ldy + TSR_X16_ROWS, acc[1][t]);
    }
}

/* x16_tile_pair with its type (one x16_pair_pays takes) and token count as constants. */
static void x16_tile_pair_any(int32_t wtype, int nt, float *y, int64_t ldy, const uint8_t *grp,
                              size_t group_bytes, int64_t nb, const x16_xblock *xb, int t_off) {
#define X16_PAIR_CASE(T, N)                                                                   \
    case X16_TYPE_INDEX(T) * X16_PAIR_TOK + (N) - 1:                                          \
        x16_tile_pair((T), (N), y, ldy, grp, group_bytes, nb, xb, t_off);                     \
        break;
#define X16_PAIR_CASES(T, _)                                                                  \
    X16_PAIR_CASE(T, 1) X16_PAIR_CASE(T, 2) X16_PAIR_CASE(T, 3) X16_PAIR_CASE(T, 4)           \
    X16_PAIR_CASE(T, 5) X16_PAIR_CASE(T, 6)
    switch (X16_TYPE_INDEX(wtype) * X16_PAIR_TOK + nt - 1) {
        X16_PAIR_CASES(TSR_DTYPE_Q8_0, 0) X16_PAIR_CASES(TSR_DTYPE_Q4_0, 0)
        X16_PAIR_CASES(TSR_DTYPE_Q4_1, 0)
    }
#undef X16_PAIR_CASES
#undef X16_PAIR_CASE
}

/* Tokens [0, n_tok) of xp as tiles of X16_TOK (xb[tile * nb + b]); the last tile's missing
 * tokens are left unset (never read). */
static void x16_prepare_x(x16_xblock *xb, int32_t wtype, const void *xp, size_t x_stride,
                          int64_t nb, int64_t n_tok) {
    const int off = tsr_x16_offset(wtype);
    for (int64_t t = 0; t < n_tok; t++) {
        const void *x = (const char *)xp + t * x_stride;
        x16_xblock *o = xb + t / X16_TOK * nb;
        const int i = (int)(t % X16_TOK);
        for (int64_t b = 0; b < nb; b++) {
            uint16_t d, s;
            __m256i q = _mm256_loadu_si256((const __m256i *)tsr_x16_act(wtype, x, b, &d, &s));
            _mm256_storeu_si256((__m256i *)o[b].q[i], q);
            o[b].corr[i] = -off * tsr_x86_q8_quants_sum(q);
            o[b].d[i] = _cvtsh_ss(d);
            o[b].s[i] = _cvtsh_ss(s);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Decode (up to X16_DEC_TOK tokens): the weights are read once, and what limits the product
 * is how fast they stream in. Two groups are read side by side, group g with group g + h of
 * the slice (h half its groups, rounded up; with an odd count the first half's last group
 * goes alone), so that each is the next group of a sequential stream, as tsr_stream_row_pairs
 * does for file rows. The streams of the types with fewer than 8 bits per quant are
 * prefetched TSR_STREAM_PREFETCH bytes ahead into L1, a pair of blocks (tsr_x16_pair_at) at a
 * time (Q4_0: 1.06-1.18x the same into L2, 0.84-0.96x one line in two); Q8_0's are not (the
 * hardware's prefetch alone read 1.07-1.20x faster than with T0 or T1). Per block and group
 * the tile's eight vectors feed two chains of four vpdpbusd (Q4_0 and Q4_1: the low nibbles
 * as stored masked, the high ones masked in place, 16 x their value, their chain shifted back
 * once per block; the other types unpacked as the tile does), so that no product waits on a
 * long chain; the values are the tile's, bit for bit. */
#define X16_DEC_TOK 4

/* One token's activation block for decode, packed tight: the blocks' quants, scales,
 * corrections and (Q8_1) sums stay in L1 for every group of the slice. */
typedef struct x16_xdec {
    int8_t q[TSR_QK];
    float d;
    int32_t corr;
    float s;
} x16_xdec;

/* xd[b * n_tok + t]: block b of token t. */
static void x16_prepare_dec(x16_xdec *xd, int32_t wtype, const void *xp, size_t x_stride,
                            int64_t nb, int64_t n_tok) {
    const int off = tsr_x16_offset(wtype);
    for (int64_t t = 0; t < n_tok; t++) {
        const void *x = (const char *)xp + t * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            x16_xdec *o = xd + b * n_tok + t;
            uint16_t d, s;
            __m256i q = _mm256_loadu_si256((const __m256i *)tsr_x16_act(wtype, x, b, &d, &s));
            _mm256_storeu_si256((__m256i *)o->q, q);
            o->corr = -off * tsr_x86_q8_quants_sum(q);
            o->d = _cvtsh_ss(d);
            o->s = _cvtsh_ss(s);
        }
    }
}

/* y[t * ldy + r] for the 16 rows of group a (at ga) and, when n_g is 2, of the group
 * `partner` bytes further (its rows at y + `y_partner`), for nt tokens. */
X16_INLINE void x16_decode_pair(const int32_t wtype, const int nt, float *y, int64_t ldy,
                                int64_t y_partner, const uint8_t *ga, size_t partner, int n_g,
                                int64_t nb, const x16_xdec *xd) {
    /* plain nibbles: the high ones read in place */
    const int in_place = wtype == TSR_DTYPE_Q4_0 || wtype == TSR_DTYPE_Q4_1;
    const size_t tile = tsr_x16_tile_bytes(wtype);
    const uint8_t *grps[2] = {ga, ga + (n_g == 2 ? partner : 0)};
    __m512 acc[2][X16_DEC_TOK];
    for (int s = 0; s < 2; s++)
        for (int t = 0; t < nt; t++) acc[s][t] = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi8(0x0f), hi = _mm512_set1_epi8((char)0xf0);
    for (size_t b0 = 0; b0 < (size_t)nb; b0 += 2) {
        const size_t at = tsr_x16_pair_at(wtype, b0);
        const int n = tsr_x16_pair_blocks((size_t)nb, b0);
        if (wtype != TSR_DTYPE_Q8_0)
            for (int s = 0; s < 2; s++)
                tsr_x16_prefetch_pair(wtype, grps[s] + at, TSR_STREAM_PREFETCH);
        for (int j = 0; j < n; j++, xd += nt)
            for (int s = 0; s < 2; s++) {
                const uint8_t *p = grps[s] + at + j * tile,
                              *sc = grps[s] + at + tsr_x16_pair_scales_at(wtype, n, j);
                __m512i wv[8];
                if (in_place)
                    for (int k = 0; k < 4; k++) {
                        __m512i v = _mm512_loadu_si512(p + 64 * k);
                        wv[k] = _mm512_and_si512(v, lo);
                        wv[k + 4] = _mm512_and_si512(v, hi);
                    }
                else
                    x16_weights(wtype, p, wv);
                const __m512 dw = x16_scales(sc, 0);
                for (int t = 0; t < nt; t++) {
                    __m512i i0 = _mm512_set1_epi32(xd[t].corr), i1 = _mm512_setzero_si512();
                    for (int k = 0; k < 4; k++) {
                        i0 = _mm512_dpbusd_epi32(i0, wv[k], x16_bcast4(xd[t].q + 4 * k));
                        i1 = _mm512_dpbusd_epi32(i1, wv[k + 4], x16_bcast4(xd[t].q + 16 + 4 * k));
                    }
                    const __m512i i =
                        _mm512_add_epi32(i0, in_place ? _mm512_srai_epi32(i1, 4) : i1);
                    acc[s][t] = x16_add_block(wtype, acc[s][t], i, dw, sc, xd[t].d, xd[t].s);
                }
            }
    }
    for (int t = 0; t < nt; t++) {
        _mm512_storeu_ps(y + t * ldy, acc[0][t]);
        if (n_g == 2) _mm512_storeu_ps(y + t * ldy + y_partner, acc[1][t]);
    }
}

/* x16_decode_pair with its type and token count as constants. */
static void x16_decode_pair_any(int32_t wtype, int nt, float *y, int64_t ldy,
                                int64_t y_partner, const uint8_t *ga, size_t partner, int n_g,
                                int64_t nb, const x16_xdec *xd) {
#define X16_DEC_CASE(T, N)                                                                    \
    case X16_TYPE_INDEX(T) * X16_DEC_TOK + (N) - 1:                                           \
        x16_decode_pair((T), (N), y, ldy, y_partner, ga, partner, n_g, nb, xd);               \
        break;
#define X16_DEC_CASES(T, _)                                                                   \
    X16_DEC_CASE(T, 1) X16_DEC_CASE(T, 2) X16_DEC_CASE(T, 3) X16_DEC_CASE(T, 4)
    switch (X16_TYPE_INDEX(wtype) * X16_DEC_TOK + nt - 1) { X16_FOR_TYPES(X16_DEC_CASES, 0) }
#undef X16_DEC_CASES
#undef X16_DEC_CASE
}

static int x16_decode(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                      int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    const int64_t nb = n_in / TSR_QK;
    const size_t group_bytes = TSR_X16_ROWS * tsr_row_size(wtype, n_in);
    const size_t bytes = ((size_t)(nb * n_tok) * sizeof(x16_xdec) + 63) / 64 * 64;
    x16_xdec *xd = aligned_alloc(64, bytes);
    if (!xd) return -1;
    x16_prepare_dec(xd, wtype, xp, tsr_row_size(tsr_matmul_act_type(wtype), n_in), nb, n_tok);
    const int64_t h = (g1 - g0 + 1) / 2;
    for (int64_t g = g0; g < g0 + h; g++)
        x16_decode_pair_any(wtype, (int)n_tok, y + g * TSR_X16_ROWS, ldy, h * TSR_X16_ROWS,
                            (const uint8_t *)w + (size_t)g * group_bytes,
                            (size_t)h * group_bytes, g + h < g1 ? 2 : 1, nb, xd);
    free(xd);
    return 0;
}

/* Decode's token counts: x16_decode. Otherwise tokens in blocks of X16_TOK_BLOCK (their
 * prepared tiles stay in cache), then each group of the slice, whose tiles stay in cache while
 * the block's tokens pass X16_TOK at a time. */
int tsr_x16_matmul_avx512(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                          int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1) {
    if (n_tok <= X16_DEC_TOK) return x16_decode(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1);
    const int64_t nb = n_in / TSR_QK;
    const size_t x_stride = tsr_row_size(tsr_matmul_act_type(wtype), n_in);
    const size_t group_bytes = TSR_X16_ROWS * tsr_row_size(wtype, n_in);
    const int64_t tb = n_tok < X16_TOK_BLOCK ? n_tok : X16_TOK_BLOCK;
    const int64_t n_tiles = (tb + X16_TOK - 1) / X16_TOK;
    x16_xblock *xb = aligned_alloc(64, (size_t)(n_tiles * nb) * sizeof *xb);
    if (!xb) return -1;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tb) {
        const int64_t ntb = n_tok - t0 < tb ? n_tok - t0 : tb;
        x16_prepare_x(xb, wtype, (const char *)xp + (size_t)t0 * x_stride, x_stride, nb, ntb);
        int64_t g = g0;
        for (; x16_pair_pays(wtype) && g + 1 < g1; g += 2) {
            const uint8_t *grp = (const uint8_t *)w + (size_t)g * group_bytes;
            for (int64_t t = 0; t < ntb; t += X16_TOK) {
                const int in_tile = (int)(ntb - t < X16_TOK ? ntb - t : X16_TOK);
                for (int u = 0; u < in_tile; u += X16_PAIR_TOK) {
                    const int nt = in_tile - u < X16_PAIR_TOK ? in_tile - u : X16_PAIR_TOK;
                    x16_tile_pair_any(wtype, nt, y + (t0 + t + u) * ldy + g * TSR_X16_ROWS, ldy,
                                      grp, group_bytes, nb, xb + t / X16_TOK * nb, u);
                }
            }
        }
        for (; g < g1; g++) {
            const uint8_t *grp = (const uint8_t *)w + (size_t)g * group_bytes;
            for (int64_t t = 0; t < ntb; t += X16_TOK) {
                const int nt = (int)(ntb - t < X16_TOK ? ntb - t : X16_TOK);
                x16_tile_any(wtype, nt, y + (t0 + t) * ldy + g * TSR_X16_ROWS, ldy, grp, nb,
                             xb + t / X16_TOK * nb);
            }
        }
    }
    free(xb);
    return 0;
}
