/* F16 / BF16 panels with AVX-512 (panel.h): a panel column of 32 rows is two registers, so a
 * tile is up to 8 tokens of two accumulators each, both fed by the token's activation
 * broadcast once: 16 fmas for two 64-byte loads of the panel and eight broadcasts. One
 * broadcast per fma (16 rows by 16 tokens) measured 0.90x the fmas' rate with the
 * activations streaming from L3, two per broadcast 0.99x. */
#include "panel.h"
#include "x86_common.h"

#define PANEL_ROWS (2 * TSR_PANEL_ROWS)
#define TILE_TOKS 8

/* 16 weights of one row from element k, as f32 (exact either way). */
TSR_INLINE __m512 load_row16(const char *row, int64_t k, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)(row + 2 * k));
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                : _mm512_cvtph_ps(h);
}

/* v[r] (row r, 16 elements) becomes v[j] (element j, 16 rows): within 128-bit lanes by
 * unpacking pairs of rows then pairs of pairs, then across lanes by two rounds of 128-bit
 * shuffles. */
TSR_INLINE void transpose16(__m512 v[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    /* u[4i + c], lane L: rows 4i..4i+3 of element 4L + c */
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int c = 0; c < 4; c++) {
        __m512 even_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);   /* lanes 0, 2 */
        __m512 odd_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);    /* lanes 1, 3 */
        __m512 even_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        __m512 odd_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
        v[c] = _mm512_shuffle_f32x4(even_lo, even_hi, 0x88);
        v[8 + c] = _mm512_shuffle_f32x4(even_lo, even_hi, 0xdd);
        v[4 + c] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88);
        v[12 + c] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xdd);
    }
}

/* The two 16-row panels of a 32-row one side by side: p[k * 32 + 16 * half + r]. */
static void build(float *p, const char *w, size_t w_stride, int32_t wtype, int n_r, int64_t k0,
                  int64_t kn) {
    const int bf16 = wtype == TSR_DTYPE_BF16;
    int64_t k = 0;
    for (; k + 16 <= kn; k += 16)
        for (int half = 0; half < 2; half++) {
            __m512 v[16];
            for (int i = 0; i < 16; i++) {
                const int r = 16 * half + i;
                v[i] = r < n_r ? load_row16(w + (size_t)r * w_stride, k0 + k, bf16)
                               : _mm512_setzero_ps();
            }
            transpose16(v);
            for (int j = 0; j < 16; j++)
                _mm512_store_ps(p + (k + j) * PANEL_ROWS + 16 * half, v[j]);
        }
    tsr_panel_build_range(p, PANEL_ROWS, w, w_stride, wtype, n_r, k0, k, kn);
}

/* H halves of 16 rows (a block's last panel may fill only its first) by T tokens. */
TSR_INLINE void tile_t(float *y, int64_t ldy, const float *p, const float *x, int64_t kn,
                       __mmask16 rows_lo, __mmask16 rows_hi, int first, const int H,
                       const int T) {
    __m512 lo[TILE_TOKS], hi[TILE_TOKS];
    for (int t = 0; t < T; t++) {
        lo[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows_lo, y + t * ldy);
        if (H == 2)
            hi[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows_hi, y + t * ldy + 16);
    }
    for (int64_t k = 0; k < kn; k++) {
        const __m512 w0 = _mm512_load_ps(p + k * PANEL_ROWS);
        const __m512 w1 = H == 2 ? _mm512_load_ps(p + k * PANEL_ROWS + 16) : w0;
        const float *xk = x + k * TSR_PANEL_TOK;
        for (int t = 0; t < T; t++) {
            const __m512 xv = _mm512_set1_ps(xk[t]);
            lo[t] = _mm512_fmadd_ps(w0, xv, lo[t]);
            if (H == 2) hi[t] = _mm512_fmadd_ps(w1, xv, hi[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        _mm512_mask_storeu_ps(y + t * ldy, rows_lo, lo[t]);
        if (H == 2) _mm512_mask_storeu_ps(y + t * ldy + 16, rows_hi, hi[t]);
    }
}

#define TILE_CASE(H, T)                                                                         \
    case T: tile_t(y, ldy, p, x, kn, lo, hi, first, H, T); break;
#define TILE_SWITCH(H)                                                                          \
    switch (n_t) {                                                                              \
    TILE_CASE(H, 1) TILE_CASE(H, 2) TILE_CASE(H, 3) TILE_CASE(H, 4) TILE_CASE(H, 5)             \
    TILE_CASE(H, 6) TILE_CASE(H, 7)                                                             \
    default: tile_t(y, ldy, p, x, kn, lo, hi, first, H, TILE_TOKS); break;                      \
    }

static void tile(float *y, int64_t ldy, const float *p, const float *x, int64_t kn, int n_r,
                 int n_t, int first) {
    const __mmask16 lo = (__mmask16)((1u << (n_r < 16 ? n_r : 16)) - 1);
    const __mmask16 hi = (__mmask16)((1u << (n_r > 16 ? n_r - 16 : 0)) - 1);
    if (n_r > 16) {
        TILE_SWITCH(2)
    } else {
        TILE_SWITCH(1)
    }
}
#undef TILE_SWITCH
#undef TILE_CASE

const tsr_panel_isa tsr_panel_isa_avx512 = {build, tile, PANEL_ROWS, TILE_TOKS};
