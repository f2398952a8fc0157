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
    tsr_panel_build_range(p, w, w_stride, wtype, n_r, k0, k, kn);
}

/* Rows past n_r (the matrix's last block) go through a copy: AVX2 has no masked 32-bit
 * loads and stores that would be simpler. */
TSR_INLINE void tile_t(float *y, int64_t ldy, const float *p, const float *x, int64_t kn,
                       int n_r, int first, const int T) {
    float part[TILE_TOKS][TSR_PANEL_ROWS];
    float *out[TILE_TOKS];
    __m256 lo[TILE_TOKS], hi[TILE_TOKS];
    for (int t = 0; t < T; t++) {
        out[t] = y + t * ldy;
        if (n_r < TSR_PANEL_ROWS) {
            memset(part[t], 0, sizeof part[t]);
            if (!first) memcpy(part[t], out[t], (size_t)n_r * sizeof(float));
            out[t] = part[t];
        }
        lo[t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out[t]);
        hi[t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out[t] + 8);
    }
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = _mm256_load_ps(p + k * TSR_PANEL_ROWS);
        const __m256 w1 = _mm256_load_ps(p + k * TSR_PANEL_ROWS + 8);
        const float *xk = x + k * TSR_PANEL_TOK;
        for (int t = 0; t < T; t++) {
            const __m256 xv = _mm256_broadcast_ss(xk + t);
            lo[t] = _mm256_fmadd_ps(w0, xv, lo[t]);
            hi[t] = _mm256_fmadd_ps(w1, xv, hi[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        _mm256_storeu_ps(out[t], lo[t]);
        _mm256_storeu_ps(out[t] + 8, hi[t]);
        if (n_r < TSR_PANEL_ROWS) memcpy(y + t * ldy, part[t], (size_t)n_r * sizeof(float));
    }
}

static void tile(float *y, int64_t ldy, const float *p, const float *x, int64_t kn, int n_r,
                 int n_t, int first) {
    switch (n_t) {
    case 1: tile_t(y, ldy, p, x, kn, n_r, first, 1); break;
    case 2: tile_t(y, ldy, p, x, kn, n_r, first, 2); break;
    case 3: tile_t(y, ldy, p, x, kn, n_r, first, 3); break;
    case 4: tile_t(y, ldy, p, x, kn, n_r, first, 4); break;
    case 5: tile_t(y, ldy, p, x, kn, n_r, first, 5); break;
    default: tile_t(y, ldy, p, x, kn, n_r, first, 6); break;
    }
}

const tsr_panel_isa tsr_panel_isa_avx2 = {build, tile, TILE_TOKS};
