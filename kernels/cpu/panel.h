/* F16 / BF16 panels (kernels_cpu.h "panels"): what panel.c and its ISA files share. Not
 * installed. */
#ifndef TSR_KERNELS_CPU_PANEL_H
#define TSR_KERNELS_CPU_PANEL_H

#include "internal.h"

/* One level's tile: one chain per pair over kn elements of the panel at p (its element k at
 * p[k * TSR_PANEL_ROWS], `rows` of them from there, of which the first n_r are written) and
 * the n_t (<= tile_toks) tokens at x (x[k * xs + t]): from 0 when `first`, else
 * from the values y holds (the chains of the previous chunk of n_in), into y[t * ldy + r].
 * A level whose `rows` is 16 takes a panel's two halves in turn. */
typedef struct tsr_panel_isa {
    void (*tile)(float *y, int64_t ldy, const uint16_t *p, int bf16, const float *x, int64_t xs,
                 int64_t kn, int n_r, int n_t, int first);
    /* n_t (<= TSR_PANEL_DEC_TOK) tokens at x (x[k * n_t + t], the prepared block of a batch
     * this small) over the whole n_in, two panels at a time: the n_ra rows of panel a into y,
     * the n_rb of panel b (0: none, pb then a's again) y_b columns further, each (row, token)
     * in the tile's order. NULL: the tiles take decode too. */
    void (*decode)(float *y, int64_t ldy, int64_t y_b, const uint16_t *pa, const uint16_t *pb,
                   int bf16, const float *x, int64_t n_in, int n_ra, int n_rb, int n_t);
    int rows, tile_toks;
} tsr_panel_isa;

/* Decode's token counts, which tsr_panel_isa.decode takes. */
#define TSR_PANEL_DEC_TOK 2

#if defined(TSR_KERNELS_X86)
extern const tsr_panel_isa tsr_panel_isa_avx2;   /* panel_avx2.c */
extern const tsr_panel_isa tsr_panel_isa_avx512; /* panel_avx512.c */
#endif

#endif
