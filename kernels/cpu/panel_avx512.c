/* F16 / BF16 panels with AVX-512 (panel.h): a panel column of 32 rows is two registers, so a
 * tile is up to 8 tokens of two accumulators each, both fed by the token's activation
 * broadcast once: 16 fmas for one 64-byte load of the panel (two conversions) and eight
 * broadcasts. One broadcast per fma (16 rows by 16 tokens) measured 0.90x the fmas' rate with
 * the activations streaming from L3, two per broadcast 0.99x. */
#include "panel.h"
#include "x86_common.h"

#define TILE_TOKS 8

/* 16 weights of a panel's column from p, as f32 (exact either way). */
TSR_INLINE __m512 load16(const uint16_t *p, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                : _mm512_cvtph_ps(h);
}

/* H halves of 16 rows (a block's last panel may fill only its first) by T tokens. */
TSR_INLINE void tile_t(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x,
                       int64_t xs, int64_t kn, __mmask16 rows_lo, __mmask16 rows_hi, int first,
                       const int H, const int T) {
    __m512 lo[TILE_TOKS], hi[TILE_TOKS];
    for (int t = 0; t < T; t++) {
        lo[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows_lo, y + t * ldy);
        if (H == 2)
            hi[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows_hi, y + t * ldy + 16);
    }
    for (int64_t k = 0; k < kn; k++) {
        const __m512 w0 = load16(p + k * TSR_PANEL_ROWS, bf16);
        const __m512 w1 = H == 2 ? load16(p + k * TSR_PANEL_ROWS + 16, bf16) : w0;
        const float *xk = x + k * xs;
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
    case T: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, H, T); break;
#define TILE_SWITCH(H)                                                                          \
    switch (n_t) {                                                                              \
    TILE_CASE(H, 1) TILE_CASE(H, 2) TILE_CASE(H, 3) TILE_CASE(H, 4) TILE_CASE(H, 5)             \
    TILE_CASE(H, 6) TILE_CASE(H, 7)                                                             \
    default: tile_t(y, ldy, p, bf16, x, xs, kn, lo, hi, first, H, TILE_TOKS); break;            \
    }

/* Rows [16 i, 16 i + 16) of a panel's n_r as a lane mask: the last panel's others are neither
 * read nor written. */
TSR_INLINE __mmask16 rows_mask(int n_r, int i) {
    const int n = n_r - 16 * i;
    return (__mmask16)((1u << (n < 0 ? 0 : n > 16 ? 16 : n)) - 1);
}

static void tile(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x, int64_t xs,
                 int64_t kn, int n_r, int n_t, int first) {
    const __mmask16 lo = rows_mask(n_r, 0), hi = rows_mask(n_r, 1);
    if (n_r > 16) {
        TILE_SWITCH(2)
    } else {
        TILE_SWITCH(1)
    }
}
#undef TILE_SWITCH
#undef TILE_CASE

/* Decode: panels a and b side by side (b's rows y_b columns further; none when n_rb is 0, b
 * then a again, its stores masked off), two sequential streams and four chains per token,
 * where one panel's two chains waited on the fmas' latency (one panel at a time decoded at
 * 0.87-0.91x the file rows' tiles). No software prefetch: the hardware's alone read 1.07-1.2x
 * faster than with one into L1 TSR_STREAM_PREFETCH ahead, as for Q8_0's x16 streams. */
TSR_INLINE void decode_t(float *y, int64_t ldy, int64_t y_b, const uint16_t *pa,
                         const uint16_t *pb, int bf16, const float *x, int64_t n_in,
                         const __mmask16 rows[4], const int T) {
    __m512 acc[4][TSR_PANEL_DEC_TOK];
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n_in; k++, pa += TSR_PANEL_ROWS, pb += TSR_PANEL_ROWS) {
        const __m512 w[4] = {load16(pa, bf16), load16(pa + 16, bf16), load16(pb, bf16),
                             load16(pb + 16, bf16)};
        for (int t = 0; t < T; t++) {
            const __m512 xv = _mm512_set1_ps(x[k * T + t]);
            for (int i = 0; i < 4; i++) acc[i][t] = _mm512_fmadd_ps(w[i], xv, acc[i][t]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++)
            _mm512_mask_storeu_ps(y + t * ldy + (i / 2) * y_b + (i % 2) * 16, rows[i], acc[i][t]);
}

static void decode(float *y, int64_t ldy, int64_t y_b, const uint16_t *pa, const uint16_t *pb,
                   int bf16, const float *x, int64_t n_in, int n_ra, int n_rb, int n_t) {
    const __mmask16 rows[4] = {rows_mask(n_ra, 0), rows_mask(n_ra, 1), rows_mask(n_rb, 0),
                               rows_mask(n_rb, 1)};
    if (n_t == 1)
        decode_t(y, ldy, y_b, pa, pb, bf16, x, n_in, rows, 1);
    else
        decode_t(y, ldy, y_b, pa, pb, bf16, x, n_in, rows, TSR_PANEL_DEC_TOK);
}

const tsr_panel_isa tsr_panel_isa_avx512 = {tile, decode, TSR_PANEL_ROWS, TILE_TOKS};
