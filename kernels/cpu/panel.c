/* F16 / BF16 panels (kernels_cpu.h "panels"): the panels' and the activations' layouts, the
 * fast order's reference on file rows, and the blocking every level shares; each level brings
 * its tile (tsr_panel_isa: scalar here, panel_avx2.c, panel_avx512.c), all giving the
 * reference's bits. */
#include "panel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int panel_type(int32_t wtype) {
    return wtype == TSR_DTYPE_F16 || wtype == TSR_DTYPE_BF16;
}

static float weight_of(int bf16, uint16_t h) {
    return bf16 ? tsr_bf16_to_fp32(h) : tsr_fp16_to_fp32(h);
}

static float weight_at(int32_t wtype, const char *row, int64_t k) {
    uint16_t h;
    memcpy(&h, row + 2 * k, sizeof h);
    return weight_of(wtype == TSR_DTYPE_BF16, h);
}

static float rounded(int32_t wtype, float x) {
    return wtype == TSR_DTYPE_F16 ? tsr_fp16_to_fp32(tsr_fp32_to_fp16(x))
                                  : tsr_bf16_to_fp32(tsr_fp32_to_bf16(x));
}

int tsr_panel_pays(int32_t wtype) {
    return wtype == TSR_DTYPE_F16 ||
           (wtype == TSR_DTYPE_BF16 && tsr_cpu_level_get() != TSR_CPU_LEVEL_AVX512);
}

/* Row r's column in the panels at p: element k at [k * TSR_PANEL_ROWS]. */
static const uint16_t *panel_at(const void *p, int64_t n_in, int64_t r) {
    return (const uint16_t *)p + (size_t)(r / TSR_PANEL_ROWS) * TSR_PANEL_ROWS * (size_t)n_in +
           r % TSR_PANEL_ROWS;
}

size_t tsr_panel_bytes(int64_t n_in, int64_t n_out) {
    const int64_t panels = (n_out + TSR_PANEL_ROWS - 1) / TSR_PANEL_ROWS;
    return (size_t)panels * TSR_PANEL_ROWS * (size_t)n_in * sizeof(uint16_t);
}

void tsr_panel_pack(void *p, const void *w, int64_t n_in, int64_t n_out, int64_t b0,
                    int64_t b1) {
    const uint16_t *src = w;
    for (int64_t b = b0; b < b1; b++) {
        uint16_t *dst = (uint16_t *)p + (size_t)b * TSR_PANEL_ROWS * (size_t)n_in;
        const int64_t r0 = b * TSR_PANEL_ROWS;
        const int n_r = (int)(n_out - r0 < TSR_PANEL_ROWS ? n_out - r0 : TSR_PANEL_ROWS);
        for (int64_t k = 0; k < n_in; k++)
            for (int r = 0; r < TSR_PANEL_ROWS; r++)
                dst[k * TSR_PANEL_ROWS + r] = r < n_r ? src[(r0 + r) * n_in + k] : 0;
    }
}

void tsr_panel_unpack_row(void *row, const void *p, int64_t n_in, int64_t r) {
    const uint16_t *src = panel_at(p, n_in, r);
    uint16_t *dst = row;
    for (int64_t k = 0; k < n_in; k++) dst[k] = src[k * TSR_PANEL_ROWS];
}

size_t tsr_panel_act_bytes(int64_t n_tok, int64_t n_in) {
    int64_t blocks = (n_tok + TSR_PANEL_TOK - 1) / TSR_PANEL_TOK;
    return (size_t)blocks * TSR_PANEL_TOK * (size_t)n_in * sizeof(float);
}

/* The tokens of the prepared block from token tb: TSR_PANEL_TOK but in the last block. */
static int64_t panel_block_toks(int64_t n_tok, int64_t tb) {
    return n_tok - tb < TSR_PANEL_TOK ? n_tok - tb : TSR_PANEL_TOK;
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
        const int64_t nb = panel_block_toks(n_tok, b * TSR_PANEL_TOK);
        for (int64_t k0 = 0; k0 < n_in; k0 += PREPARE_STRETCH) {
            const int64_t kn = n_in - k0 < PREPARE_STRETCH ? n_in - k0 : PREPARE_STRETCH;
            for (int64_t t = 0; t < nb; t++) {
                const int64_t tok = b * TSR_PANEL_TOK + t;
                if (wtype == TSR_DTYPE_F16) {
                    tsr_fp32_to_fp16_row(half, x + tok * n_in + k0, kn);
                    tsr_fp16_to_fp32_row(back, half, kn);
                } else {
                    tsr_fp32_to_bf16_row(half, x + tok * n_in + k0, kn);
                    tsr_bf16_to_fp32_row(back, half, kn);
                }
                for (int64_t k = 0; k < kn; k++) xb[(k0 + k) * nb + t] = back[k];
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

static void tile_scalar(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x,
                        int64_t xs, int64_t kn, int n_r, int n_t, int first) {
    for (int t = 0; t < n_t; t++)
        for (int r = 0; r < n_r; r++) {
            float acc = first ? 0.0f : y[t * ldy + r];
            for (int64_t k = 0; k < kn; k++)
                acc = fmaf(weight_of(bf16, p[k * TSR_PANEL_ROWS + r]), x[k * xs + t], acc);
            y[t * ldy + r] = acc;
        }
}

static const tsr_panel_isa panel_isa_scalar = {tile_scalar, NULL, TSR_PANEL_ROWS, TSR_PANEL_TOK};

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

/* Tokens in runs of PANEL_TOK_RUN, then panels, then chunks of n_in: a panel's chunk (64
 * bytes per k, 128 KiB for a chunk of 2048) stays in L2 while the run's tokens pass over it,
 * TSR_PANEL_TOK at a time (their prepared blocks, 4 MiB for a chunk of 2048, stream from L3).
 * A pair's chain crosses the chunks in order, held in y between them. Without the runs, a
 * prompt of 2048 tokens streamed 16-46 MiB of activations from memory per block of rows: two
 * threads prefilled 2048 tokens at 0.6x the speed of 512. */
#define PANEL_TOK_RUN 512
tsr_status tsr_panel_matmul(float *y, int64_t ldy, const void *p, int32_t wtype,
                            const float *xp, int64_t n_tok, int64_t n_in, int64_t n_out,
                            int ith, int nth) {
    if (!panel_type(wtype)) return TSR_E_UNSUPPORTED;
    if (n_in < 1 || n_tok < 0 || n_out < 0 || ldy < n_out) return TSR_E_INVALID;
    int64_t r0, r1;
    const tsr_panel_isa *isa = panel_isa();
    tsr_thread_slice(&r0, &r1, n_out, TSR_PANEL_ROWS, ith, nth);
    if (r0 >= r1 || n_tok == 0) return TSR_OK;
    const int bf16 = wtype == TSR_DTYPE_BF16;
    if (n_tok <= TSR_PANEL_DEC_TOK && isa->decode) {
        /* panel i of the slice's first half beside panel i of its second */
        const int64_t half = ((r1 - r0 + TSR_PANEL_ROWS - 1) / TSR_PANEL_ROWS + 1) / 2;
        for (int64_t i = 0; i < half; i++) {
            const int64_t ra = r0 + i * TSR_PANEL_ROWS, rb = ra + half * TSR_PANEL_ROWS;
            const int n_ra = (int)(r1 - ra < TSR_PANEL_ROWS ? r1 - ra : TSR_PANEL_ROWS);
            const int n_rb =
                rb >= r1 ? 0 : (int)(r1 - rb < TSR_PANEL_ROWS ? r1 - rb : TSR_PANEL_ROWS);
            isa->decode(y + ra, ldy, rb - ra, panel_at(p, n_in, ra),
                        panel_at(p, n_in, n_rb ? rb : ra), bf16, xp, n_in, n_ra, n_rb,
                        (int)n_tok);
        }
        return TSR_OK;
    }
    const int64_t kc = n_in < TSR_PANEL_K ? n_in : TSR_PANEL_K;
    for (int64_t run = 0; run < n_tok; run += PANEL_TOK_RUN) {
        const int64_t run_end = n_tok - run < PANEL_TOK_RUN ? n_tok : run + PANEL_TOK_RUN;
        for (int64_t r = r0; r < r1; r += isa->rows) {
            const int n_r = (int)(r1 - r < isa->rows ? r1 - r : isa->rows);
            const uint16_t *panel = panel_at(p, n_in, r);
            for (int64_t k0 = 0; k0 < n_in; k0 += kc) {
                const int64_t kn = n_in - k0 < kc ? n_in - k0 : kc;
                for (int64_t tb = run; tb < run_end; tb += TSR_PANEL_TOK) {
                    const int64_t nb = panel_block_toks(n_tok, tb);
                    const float *xb = xp + (size_t)tb * (size_t)n_in + (size_t)(k0 * nb);
                    for (int64_t t = 0; t < nb; t += isa->tile_toks) {
                        const int n_t = (int)(nb - t < isa->tile_toks ? nb - t : isa->tile_toks);
                        isa->tile(y + (tb + t) * ldy + r, ldy, panel + k0 * TSR_PANEL_ROWS, bf16,
                                  xb + t, nb, kn, n_r, n_t, k0 == 0);
                    }
                }
            }
        }
    }
    return TSR_OK;
}
