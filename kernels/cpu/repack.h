/* Row-interleaved Q4_0 / Q8_0 and the K types ("x16", kernels_cpu.h): what repack.c,
 * repack_k.c and their AVX-512 files share. Not installed. */
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

/* The K types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (repack_k.c). A group's super-block
 * column sb is one chunk of 16 file blocks' bytes; each field lies in it as lanes of every row
 * side by side: the quants (qs, ql, qh, hmask) four bytes per row and lane (vector v, lane r:
 * bytes 4v..4v+3 of row r), the fp16 scales (and IQ4_XS's scales_h) two bytes per row, the
 * group scales (Q2_K's sixteen bytes, Q3_K's, Q4_K's and Q5_K's twelve packed bytes, Q6_K's
 * sixteen int8, IQ4_XS's four scales_l) as planes of one byte per row. Chunk offsets of the
 * fields: */
#define TSR_XK16_Q4_K_D 2048      /* after the 32 vectors of qs; Q5_K's too */
#define TSR_XK16_Q4_K_DMIN 2080
#define TSR_XK16_Q4_K_SCALES 2112 /* 12 planes */
#define TSR_XK16_Q5_K_QH 2304     /* Q5_K: Q4_K's fields, then qh as 8 vectors */
#define TSR_XK16_Q6_K_QH 2048     /* after the 32 vectors of ql; 16 vectors */
#define TSR_XK16_Q6_K_SCALES 3072 /* 16 planes */
#define TSR_XK16_Q6_K_D 3328
#define TSR_XK16_Q3_K_QS 512      /* after the 8 vectors of hmask; 16 vectors */
#define TSR_XK16_Q3_K_SCALES 1536 /* 12 planes */
#define TSR_XK16_Q3_K_D 1728
#define TSR_XK16_Q2_K_SCALES 1024 /* after the 16 vectors of qs; 16 planes */
#define TSR_XK16_Q2_K_D 1280
#define TSR_XK16_Q2_K_DMIN 1312
#define TSR_XK16_IQ4_XS_D 2048    /* after the 32 vectors of qs */
#define TSR_XK16_IQ4_XS_SCALES_H 2080
#define TSR_XK16_IQ4_XS_SCALES_L 2112 /* 4 planes */

static inline int tsr_x16_is_k(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q2_K:
    case TSR_DTYPE_Q3_K:
    case TSR_DTYPE_Q4_K:
    case TSR_DTYPE_Q5_K:
    case TSR_DTYPE_Q6_K:
    case TSR_DTYPE_IQ4_XS: return 1;
    }
    return 0;
}

void tsr_xk16_pack(void *dst, const void *src, int32_t wtype, int64_t n_in, int64_t g0,
                   int64_t g1);
void tsr_xk16_unpack_row(void *dst, const void *w, int32_t wtype, int64_t n_in, int64_t row);
float tsr_xk16_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const void *xp);
void tsr_xk16_matmul_scalar(float *y, int64_t ldy, const void *w, int32_t wtype,
                            const void *xp, int64_t n_tok, int64_t n_in, int64_t g0,
                            int64_t g1);
#if defined(TSR_KERNELS_X86)
/* As tsr_x16_matmul_avx512, for the K types (repack_k_avx512.c). */
int tsr_xk16_matmul_avx512(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                           int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1);
#endif

#endif
