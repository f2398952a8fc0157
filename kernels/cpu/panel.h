/* F16 / BF16 panels (kernels_cpu.h "panels"): what panel.c and its ISA files share. Not
 * installed. */
#ifndef TSR_KERNELS_CPU_PANEL_H
#define TSR_KERNELS_CPU_PANEL_H

#include "internal.h"

/* Rows per panel: one 512-bit register of f32, two 256-bit ones. AVX-512 takes two such
 * panels side by side (`rows` 32), so that each broadcast activation feeds two fmas. */
#define TSR_PANEL_ROWS 16

/* One level's two steps. `build` converts k in [k0, k0 + kn) of the n_r (<= rows) rows at w
 * (w_stride bytes apart) into p[(k - k0) * rows + r], zeros for r >= n_r. `tile` runs one
 * chain per pair over those kn elements for the n_r rows and the n_t (<= tile_toks) tokens
 * at x (x[k * TSR_PANEL_TOK + t], k from k0): from 0 when `first`, else from the values y
 * holds (the chains of the previous chunk of n_in), into y[t * ldy + r]. */
typedef struct tsr_panel_isa {
    void (*build)(float *p, const char *w, size_t w_stride, int32_t wtype, int n_r, int64_t k0,
                  int64_t kn);
    void (*tile)(float *y, int64_t ldy, const float *p, const float *x, int64_t kn, int n_r,
                 int n_t, int first);
    int rows, tile_toks;
} tsr_panel_isa;

/* `build` one element at a time, for k in [k_begin, k_end) of the chunk, into a panel of
 * `rows`: the scalar level's build, and the ISA files' tail of a chunk that is not a whole
 * number of vectors. */
void tsr_panel_build_range(float *p, int rows, const char *w, size_t w_stride, int32_t wtype,
                           int n_r, int64_t k0, int64_t k_begin, int64_t k_end);

#if defined(TSR_KERNELS_X86)
extern const tsr_panel_isa tsr_panel_isa_avx2;   /* panel_avx2.c */
extern const tsr_panel_isa tsr_panel_isa_avx512; /* panel_avx512.c */
#endif

#endif
