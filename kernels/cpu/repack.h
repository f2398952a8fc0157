/* Row-interleaved Q4_0 / Q8_0 ("x16", kernels_cpu.h): what repack.c and repack_avx512.c
 * share. Not installed. */
#ifndef TSR_KERNELS_CPU_REPACK_H
#define TSR_KERNELS_CPU_REPACK_H

#include "internal.h"

/* Bytes of one block column of a group's quants: 16 rows x 16 (Q4_0) or 32 (Q8_0). */
static inline size_t tsr_x16_tile_bytes(int32_t wtype) {
    return wtype == TSR_DTYPE_Q4_0 ? TSR_X16_ROWS * TSR_QK / 2 : TSR_X16_ROWS * TSR_QK;
}

/* The offset the packed quants carry (Q4_0 nibbles as stored, Q8_0 quants + 128): the value
 * of quant q is (stored - offset). */
static inline int tsr_x16_offset(int32_t wtype) {
    return wtype == TSR_DTYPE_Q4_0 ? 8 : 128;
}

#if defined(TSR_KERNELS_X86)
/* The AVX-512 VNNI product over groups [g0, g1) (repack_avx512.c); -1 when it could not get
 * its scratch memory. */
int tsr_x16_matmul_avx512(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                          int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1);
/* The same with AVX2 (repack_avx2.c). */
int tsr_x16_matmul_avx2(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                        int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1);
#endif

#endif
