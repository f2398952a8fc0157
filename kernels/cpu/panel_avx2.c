/* F16 / BF16 panels with AVX2 (panel.h): half a panel's column, 16 rows, is two registers (a
 * panel takes two passes), so a tile is 6 tokens (12 accumulators, two weight registers and
 * the broadcast activation: 15 of the 16), two fmas per broadcast. */
#include "panel.h"
#include "x86_common.h"

#define TILE_TOKS 6

/* 8 weights of a panel's column from p, as f32 (exact either way). */
TSR_INLINE __m256 load8(const uint16_t *p, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? tsr_x86_bf16_to_fp32_8(h) : _mm256_cvtph_ps(h);
}

/* Named accumulators rather than an array, which GCC kept in memory as well as in registers
 * (a store of each per element); the T - 1 >= t tests vanish in each instantiation. */
#define PANEL_ACC(t)                                                                            \
    __m256 lo##t = _mm256_setzero_ps(), hi##t = _mm256_setzero_ps();                           \
    if (T > t && !first) {                                                                      \
        lo##t = _mm256_maskload_ps(y + t * ldy, rows_lo);                                       \
        hi##t = _mm256_maskload_ps(y + t * ldy + 8, rows_hi);                                   \
    }
#define PANEL_FMA(t)                                                                            \
    if (T > t) {                                                                                \
        const __m256 xv = _mm256_broadcast_ss(xk + t);                                          \
        lo##t = _mm256_fmadd_ps(w0, xv, lo##t);                                                 \
        hi##t = _mm256_fmadd_ps(w1, xv, hi##t);                                                 \
    }
#define PANEL_STORE(t)                                                                          \
    if (T > t) {                                                                                \
        _mm256_maskstore_ps(y + t * ldy, rows_lo, lo##t);                                       \
        _mm256_maskstore_ps(y + t * ldy + 8, rows_hi, hi##t);                                   \
    }

TSR_INLINE void tile_t(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x,
                       int64_t xs, int64_t kn, __m256i rows_lo, __m256i rows_hi, int first,
                       const int T) {
    PANEL_ACC(0) PANEL_ACC(1) PANEL_ACC(2) PANEL_ACC(3) PANEL_ACC(4) PANEL_ACC(5)
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = load8(p + k * TSR_PANEL_ROWS, bf16);
        const __m256 w1 = load8(p + k * TSR_PANEL_ROWS + 8, bf16);
        const float *xk = x + k * xs;
        PANEL_FMA(0) PANEL_FMA(1) PANEL_FMA(2) PANEL_FMA(3) PANEL_FMA(4) PANEL_FMA(5)
    }
    PANEL_STORE(0) PANEL_STORE(1) PANEL_STORE(2) PANEL_STORE(3) PANEL_STORE(4) PANEL_STORE(5)
}
#undef PANEL_ACC
#undef PANEL_FMA
#undef PANEL_STORE

/* Rows [8 i, 8 i + 8) of n_r as a lane mask: the last panel's others are neither read nor
 * written. */
static __m256i rows_mask(int n_r, int i) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n_r - 8 * i),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Half a panel: n_r of its 16 rows. */
static void tile(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x, int64_t xs,
                 int64_t kn, int n_r, int n_t, int first) {
    const __m256i lo = rows_mask(n_r, 0), hi = rows_mask(n_r, 1);
    switch (n_t) {
    case 1: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 1); break;
    case 2: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 2); break;
    case 3: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 3); break;
    case 4: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 4); break;
    case 5: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 5); break;
    default: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, 6); break;
    }
}

/* Decode: whole panels, four chains per panel and token, where the tiles' half panels gave
 * two (0.70-0.83x the file rows' tiles). One token takes panels a and b side by side (two
 * streams, b's rows y_b columns further), two tokens one panel at a time; eight named
 * accumulators either way (in an array GCC stored them back every k). */
#define DEC_ACC(i) __m256 acc##i = _mm256_setzero_ps();
#define DEC_ONE(i, p, x0) acc##i = _mm256_fmadd_ps(load8((p) + 8 * ((i) % 4), bf16), x0, acc##i);
#define DEC_TWO(i, j)                                                                           \
    {                                                                                           \
        const __m256 w = load8(pa + 8 * (i), bf16);                                             \
        acc##i = _mm256_fmadd_ps(w, x0, acc##i);                                                \
        acc##j = _mm256_fmadd_ps(w, x1, acc##j);                                                \
    }
#define DEC_STORE(i, at, n_r)                                                                   \
    _mm256_maskstore_ps((at) + 8 * ((i) % 4), rows_mask(n_r, (i) % 4), acc##i);

static void decode_one(float *y, int64_t y_b, const uint16_t *pa, const uint16_t *pb, int bf16,
                       const float *x, int64_t n_in, int n_ra, int n_rb) {
    DEC_ACC(0) DEC_ACC(1) DEC_ACC(2) DEC_ACC(3) DEC_ACC(4) DEC_ACC(5) DEC_ACC(6) DEC_ACC(7)
    for (int64_t k = 0; k < n_in; k++, pa += TSR_PANEL_ROWS, pb += TSR_PANEL_ROWS) {
        const __m256 x0 = _mm256_broadcast_ss(x + k);
        DEC_ONE(0, pa, x0) DEC_ONE(1, pa, x0) DEC_ONE(2, pa, x0) DEC_ONE(3, pa, x0)
        DEC_ONE(4, pb, x0) DEC_ONE(5, pb, x0) DEC_ONE(6, pb, x0) DEC_ONE(7, pb, x0)
    }
    DEC_STORE(0, y, n_ra) DEC_STORE(1, y, n_ra) DEC_STORE(2, y, n_ra) DEC_STORE(3, y, n_ra)
    DEC_STORE(4, y + y_b, n_rb) DEC_STORE(5, y + y_b, n_rb) DEC_STORE(6, y + y_b, n_rb)
    DEC_STORE(7, y + y_b, n_rb)
}

static void decode_two(float *y, int64_t ldy, const uint16_t *pa, int bf16, const float *x,
                       int64_t n_in, int n_r) {
    DEC_ACC(0) DEC_ACC(1) DEC_ACC(2) DEC_ACC(3) DEC_ACC(4) DEC_ACC(5) DEC_ACC(6) DEC_ACC(7)
    for (int64_t k = 0; k < n_in; k++, pa += TSR_PANEL_ROWS) {
        const __m256 x0 = _mm256_broadcast_ss(x + 2 * k), x1 = _mm256_broadcast_ss(x + 2 * k + 1);
        DEC_TWO(0, 4) DEC_TWO(1, 5) DEC_TWO(2, 6) DEC_TWO(3, 7)
    }
    DEC_STORE(0, y, n_r) DEC_STORE(1, y, n_r) DEC_STORE(2, y, n_r) DEC_STORE(3, y, n_r)
    DEC_STORE(4, y + ldy, n_r) DEC_STORE(5, y + ldy, n_r) DEC_STORE(6, y + ldy, n_r)
    DEC_STORE(7, y + ldy, n_r)
}
#undef DEC_ACC
#undef DEC_ONE
#undef DEC_TWO
#undef DEC_STORE

static void decode(float *y, int64_t ldy, int64_t y_b, const uint16_t *pa, const uint16_t *pb,
                   int bf16, const float *x, int64_t n_in, int n_ra, int n_rb, int n_t) {
    if (n_t == 1) {
        decode_one(y, y_b, pa, pb, bf16, x, n_in, n_ra, n_rb);
        return;
    }
    decode_two(y, ldy, pa, bf16, x, n_in, n_ra);
    if (n_rb) decode_two(y + y_b, ldy, pb, bf16, x, n_in, n_rb);
}

const tsr_panel_isa tsr_panel_isa_avx2 = {tile, decode, TSR_PANEL_ROWS / 2, TILE_TOKS};
