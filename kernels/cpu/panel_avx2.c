/* F16 / BF16 panels with AVX2 (panel.h): a panel column of 16 rows is two registers, so a tile
 * is 6 tokens (12 accumulators, two weight registers and the broadcast activation: 15 of the
 * 16), two fmas per broadcast. */
#include "panel.h"
#include "x86_common.h"

#define TILE_TOKS 6

/* 8 weights of one row from element k, as f32 (exact either way). */
TSR_INLINE __m256 load_row8(const char *row, int64_t k, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * k));
    return bf16 ? tsr_x86_bf16_to_fp32_8(h) : _mm256_cvtph_ps(h);
}

/* v[r] (row r, 8 elements) becomes v[j] (element j, 8 rows). */
TSR_INLINE void transpose8(__m256 v[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    /* s[4h + c], 128-bit half L: rows 4h..4h+3 of element 4L + c */
    for (int h = 0; h < 2; h++) {
        s[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xee);
        s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xee);
    }
    for (int c = 0; c < 4; c++) {
        v[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
        v[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
}

static void build(float *p, const char *w, size_t w_stride, int32_t wtype, int n_r, int64_t k0,
                  int64_t kn) {
    const int bf16 = wtype == TSR_DTYPE_BF16;
    int64_t k = 0;
    for (; k + 8 <= kn; k += 8)
        for (int half = 0; half < 2; half++) {
            __m256 v[8];
            for (int i = 0; i < 8; i++) {
                const int r = 8 * half + i;
                v[i] = r < n_r ? load_row8(w + (size_t)r * w_stride, k0 + k, bf16)
                               : _mm256_setzero_ps();
            }
            transpose8(v);
            for (int j = 0; j < 8; j++)
                _mm256_store_ps(p + (k + j) * TSR_PANEL_ROWS + 8 * half, v[j]);
        }
    tsr_panel_build_range(p, TSR_PANEL_ROWS, w, w_stride, wtype, n_r, k0, k, kn);
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

TSR_INLINE void tile_t(float *y, int64_t ldy, const float *p, const float *x, int64_t kn,
                       __m256i rows_lo, __m256i rows_hi, int first, const int T) {
    PANEL_ACC(0) PANEL_ACC(1) PANEL_ACC(2) PANEL_ACC(3) PANEL_ACC(4) PANEL_ACC(5)
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = _mm256_load_ps(p + k * TSR_PANEL_ROWS);
        const __m256 w1 = _mm256_load_ps(p + k * TSR_PANEL_ROWS + 8);
        const float *xk = x + k * TSR_PANEL_TOK;
        PANEL_FMA(0) PANEL_FMA(1) PANEL_FMA(2) PANEL_FMA(3) PANEL_FMA(4) PANEL_FMA(5)
    }
    PANEL_STORE(0) PANEL_STORE(1) PANEL_STORE(2) PANEL_STORE(3) PANEL_STORE(4) PANEL_STORE(5)
}
#undef PANEL_ACC
#undef PANEL_FMA
#undef PANEL_STORE

/* The rows of the block (n_r of 16) as two lane masks: the last block's others are neither
 * read nor written. */
static void tile(float *y, int64_t ldy, const float *p, const float *x, int64_t kn, int n_r,
                 int n_t, int first) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_r), lane);
    const __m256i hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_r - 8), lane);
    switch (n_t) {
    case 1: tile_t(y, ldy, p, x, kn, lo, hi, first, 1); break;
    case 2: tile_t(y, ldy, p, x, kn, lo, hi, first, 2); break;
    case 3: tile_t(y, ldy, p, x, kn, lo, hi, first, 3); break;
    case 4: tile_t(y, ldy, p, x, kn, lo, hi, first, 4); break;
    case 5: tile_t(y, ldy, p, x, kn, lo, hi, first, 5); break;
    default: tile_t(y, ldy, p, x, kn, lo, hi, first, 6); break;
    }
}

const tsr_panel_isa tsr_panel_isa_avx2 = {build, tile, TSR_PANEL_ROWS, TILE_TOKS};
