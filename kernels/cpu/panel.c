/* F16 / BF16 panels (kernels_cpu.h "panels"): the activations' layout, the fast order's
 * reference on file rows, and the blocking every level shares; each level brings its panel
 * build and its tile (tsr_panel_isa: scalar here, panel_avx2.c, panel_avx512.c), all giving the
 * reference's bits. */
#include "panel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int panel_type(int32_t wtype) {
    return wtype == TSR_DTYPE_F16 || wtype == TSR_DTYPE_BF16;
}

static float weight_at(int32_t wtype, const char *row, int64_t k) {
    uint16_t h;
    memcpy(&h, row + 2 * k, sizeof h);
    return wtype == TSR_DTYPE_F16 ? tsr_fp16_to_fp32(h) : tsr_bf16_to_fp32(h);
}

static float rounded(int32_t wtype, float x) {
    return wtype == TSR_DTYPE_F16 ? tsr_fp16_to_fp32(tsr_fp32_to_fp16(x))
                                  : tsr_bf16_to_fp32(tsr_fp32_to_bf16(x));
}

int tsr_panel_pays(int32_t wtype) {
    return wtype == TSR_DTYPE_F16 ||
           (wtype == TSR_DTYPE_BF16 && tsr_cpu_level_get() != TSR_CPU_LEVEL_AVX512);
}

size_t tsr_panel_act_bytes(int64_t n_tok, int64_t n_in) {
    int64_t blocks = (n_tok + TSR_PANEL_TOK - 1) / TSR_PANEL_TOK;
    return (size_t)blocks * TSR_PANEL_TOK * (size_t)n_in * sizeof(float);
}

/* Rounded through the rows' SIMD conversions, a stretch at a time, then set out k-major. */
#define PREPARE_STRETCH 256

tsr_status tsr_panel_prepare(float *xp, int32_t wtype, const float *x, int64_t n_tok,
                             int64_t n_in, int ith, int nth) {
    if (!panel_type(wtype)) return TSR_E_UNSUPPORTED;
    if (n_in < 1 || n_tok < 0) return TSR_E_INVALID;
    int64_t b0, b1;
    tsr_thread_slice(&b0, &b1, (n_tok + TSR_PANEL_TOK - 1) / TSR_PANEL_TOK, 1, ith, nth);
    uint16_t half[PREPARE_STRETCH];
    float back[PREPARE_STRETCH];
    for (int64_t b = b0; b < b1; b++) {
        float *xb = xp + (size_t)b * (size_t)n_in * TSR_PANEL_TOK;
        for (int64_t k0 = 0; k0 < n_in; k0 += PREPARE_STRETCH) {
            const int64_t kn = n_in - k0 < PREPARE_STRETCH ? n_in - k0 : PREPARE_STRETCH;
            for (int64_t t = 0; t < TSR_PANEL_TOK; t++) {
                const int64_t tok = b * TSR_PANEL_TOK + t;
                if (tok >= n_tok) {
                    memset(back, 0, sizeof back);
                } else if (wtype == TSR_DTYPE_F16) {
                    tsr_fp32_to_fp16_row(half, x + tok * n_in + k0, kn);
                    tsr_fp16_to_fp32_row(back, half, kn);
                } else {
                    tsr_fp32_to_bf16_row(half, x + tok * n_in + k0, kn);
                    tsr_bf16_to_fp32_row(back, half, kn);
                }
                for (int64_t k = 0; k < kn; k++) xb[(k0 + k) * TSR_PANEL_TOK + t] = back[k];
            }
        }
    }
    return TSR_OK;
}

float tsr_panel_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const float *x) {
    if (!panel_type(wtype)) return 0.0f;
    float acc = 0.0f;
    for (int64_t k = 0; k < n_in; k++)
        acc = fmaf(weight_at(wtype, w, k), rounded(wtype, x[k]), acc);
    return acc;
}

void tsr_panel_build_range(float *p, int rows, const char *w, size_t w_stride, int32_t wtype,
                           int n_r, int64_t k0, int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; k++)
        for (int r = 0; r < rows; r++)
            p[k * rows + r] =
                r < n_r ? weight_at(wtype, w + (size_t)r * w_stride, k0 + k) : 0.0f;
}

static void build_scalar(float *p, const char *w, size_t w_stride, int32_t wtype, int n_r,
                         int64_t k0, int64_t kn) {
    tsr_panel_build_range(p, TSR_PANEL_ROWS, w, w_stride, wtype, n_r, k0, 0, kn);
}

static void tile_scalar(float *y, int64_t ldy, const float *p, const float *x, int64_t kn,
                        int n_r, int n_t, int first) {
    for (int t = 0; t < n_t; t++)
        for (int r = 0; r < n_r; r++) {
            float acc = first ? 0.0f : y[t * ldy + r];
            for (int64_t k = 0; k < kn; k++)
                acc = fmaf(p[k * TSR_PANEL_ROWS + r], x[k * TSR_PANEL_TOK + t], acc);
            y[t * ldy + r] = acc;
        }
}

static const tsr_panel_isa panel_isa_scalar = {build_scalar, tile_scalar, TSR_PANEL_ROWS,
                                                TSR_PANEL_TOK};

static const tsr_panel_isa *panel_isa(void) {
#if defined(TSR_KERNELS_X86)
    switch (tsr_cpu_level_get()) {
    case TSR_CPU_LEVEL_AVX512: return &tsr_panel_isa_avx512;
    case TSR_CPU_LEVEL_AVX2: return &tsr_panel_isa_avx2;
    default: break;
    }
#endif
    return &panel_isa_scalar;
}

/* Tokens in runs of PANEL_TOK_RUN, then rows: a block's panel (one chunk of n_in, in L2) is
 * built once per run and the run's tokens pass over it, TSR_PANEL_TOK at a time (their
 * prepared blocks, 4 MiB for a chunk of 2048, stream from L3). A pair's chain crosses the
 * chunks in order, held in y between them. Without the runs, a prompt of 2048 tokens
 * streamed 16-46 MiB of activations from memory per block of rows: two threads prefilled
 * 2048 tokens at 0.6x the speed of 512. */
#define PANEL_TOK_RUN 512
tsr_status tsr_panel_matmul(float *y, int64_t ldy, const void *w, int32_t wtype,
                            const float *xp, int64_t n_tok, int64_t n_in, int64_t n_out,
                            int ith, int nth) {
    if (!panel_type(wtype)) return TSR_E_UNSUPPORTED;
    if (n_in < 1 || n_tok < 0 || n_out < 0 || ldy < n_out) return TSR_E_INVALID;
    int64_t r0, r1;
    const tsr_panel_isa *isa = panel_isa();
    tsr_thread_slice(&r0, &r1, n_out, isa->rows, ith, nth);
    if (r0 >= r1 || n_tok == 0) return TSR_OK;
    const int64_t kc = n_in < TSR_PANEL_K ? n_in : TSR_PANEL_K;
    float *panel = aligned_alloc(64, (size_t)kc * (size_t)isa->rows * sizeof *panel);
    if (!panel) return TSR_E_NOMEM;
    const size_t w_stride = (size_t)n_in * 2;
    for (int64_t run = 0; run < n_tok; run += PANEL_TOK_RUN) {
        const int64_t run_end = n_tok - run < PANEL_TOK_RUN ? n_tok : run + PANEL_TOK_RUN;
        for (int64_t r = r0; r < r1; r += isa->rows) {
            const int n_r = (int)(r1 - r < isa->rows ? r1 - r : isa->rows);
            for (int64_t k0 = 0; k0 < n_in; k0 += kc) {
                const int64_t kn = n_in - k0 < kc ? n_in - k0 : kc;
                isa->build(panel, (const char *)w + (size_t)r * w_stride, w_stride, wtype, n_r, k0,
                           kn);
                for (int64_t tb = run; tb < run_end; tb += TSR_PANEL_TOK) {
                    const float *xb =
                        xp + ((size_t)(tb / TSR_PANEL_TOK) * (size_t)n_in + (size_t)k0) *
                                 TSR_PANEL_TOK;
                    const int64_t nb = n_tok - tb < TSR_PANEL_TOK ? n_tok - tb : TSR_PANEL_TOK;
                    for (int64_t t = 0; t < nb; t += isa->tile_toks) {
                        const int n_t = (int)(nb - t < isa->tile_toks ? nb - t : isa->tile_toks);
                        isa->tile(y + (tb + t) * ldy + r, ldy, panel, xb + t, kn, n_r, n_t,
                                  k0 == 0);
                    }
                }
            }
        }
    }
    free(panel);
    return TSR_OK;
}
