/* Row-interleaved 32-element types and the K types ("x16", kernels_cpu.h): what repack.c,
 * repack_k.c and their AVX-512 files share. Not installed. */
#ifndef TSR_KERNELS_CPU_REPACK_H
#define TSR_KERNELS_CPU_REPACK_H

#include "internal.h"

/* The 32-element types x16 takes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL). Their group's block
 * column is a tile: the quants as 512-bit vectors (lane r: four quants of row r; the 4-bit
 * types' 16 bytes of qs as 4 vectors, Q8_0's quants + 128 as 8), for Q5_0 / Q5_1 then one
 * vector of fifth bits (tsr_x16_qh_pack); a block's scales are the 16 rows' fp16 d and, for
 * Q4_1 / Q5_1, their 16 fp16 m, after the pair of tiles they belong to (tsr_x16_pair_at). */
static inline int tsr_x16_is_legacy(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q4_0:
    case TSR_DTYPE_Q4_1:
    case TSR_DTYPE_Q5_0:
    case TSR_DTYPE_Q5_1:
    case TSR_DTYPE_Q8_0:
    case TSR_DTYPE_IQ4_NL: return 1;
    }
    return 0;
}

static inline int tsr_x16_has_qh(int32_t wtype) {
    return wtype == TSR_DTYPE_Q5_0 || wtype == TSR_DTYPE_Q5_1;
}

/* The types with a minimum (value = d * q + m), whose activations are Q8_1. */
static inline int tsr_x16_has_min(int32_t wtype) {
    return wtype == TSR_DTYPE_Q4_1 || wtype == TSR_DTYPE_Q5_1;
}

/* Bytes of one tile (a block column of a group's quants). */
static inline size_t tsr_x16_tile_bytes(int32_t wtype) {
    if (wtype == TSR_DTYPE_Q8_0) return TSR_X16_ROWS * TSR_QK;
    return TSR_X16_ROWS * (TSR_QK / 2 + (tsr_x16_has_qh(wtype) ? 4 : 0));
}

/* Bytes of one block's scales (16 d, and 16 m for the types with a minimum). */
static inline size_t tsr_x16_scale_bytes(int32_t wtype) {
    return TSR_X16_ROWS * sizeof(uint16_t) * (tsr_x16_has_min(wtype) ? 2 : 1);
}

/* A group's blocks go by pairs, each pair's two tiles followed by their two blocks' scales (a
 * lone last block: its tile, then its scales), so that a group is one sequential stream and
 * every pair starts on a 64-byte line. The pair of blocks first, first + 1 starts
 * tsr_x16_pair_at bytes into the group and holds tsr_x16_pair_blocks of its nb blocks; block j
 * of a pair of n has its tile j tiles in and its scales tsr_x16_pair_scales_at in. */
static inline size_t tsr_x16_pair_bytes(int32_t wtype) {
    return 2 * (tsr_x16_tile_bytes(wtype) + tsr_x16_scale_bytes(wtype));
}

static inline size_t tsr_x16_pair_at(int32_t wtype, size_t first) {
    return first / 2 * tsr_x16_pair_bytes(wtype);
}

static inline int tsr_x16_pair_blocks(size_t nb, size_t first) {
    return first + 1 < nb ? 2 : 1;
}

static inline size_t tsr_x16_pair_scales_at(int32_t wtype, int n, int j) {
    return (size_t)n * tsr_x16_tile_bytes(wtype) + (size_t)j * tsr_x16_scale_bytes(wtype);
}

/* Decode's prefetch of the pair of blocks `ahead` bytes past `pair`, every line into L1. */
static inline void tsr_x16_prefetch_pair(int32_t wtype, const uint8_t *pair, size_t ahead) {
    for (size_t o = 0; o < tsr_x16_pair_bytes(wtype); o += 64)
        __builtin_prefetch(pair + ahead + o, 0, 3);
}

/* The offset of the unsigned quants the SIMD kernels multiply: the value of a quant is
 * (u - offset) for Q4_0 (8), Q5_0 (16), Q8_0 (stored + 128) and IQ4_NL (its table lifted by
 * 128 into unsigned bytes); 0 for Q4_1 and Q5_1, whose minimum takes the place of one. */
static inline int tsr_x16_offset(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q4_0: return 8;
    case TSR_DTYPE_Q5_0: return 16;
    case TSR_DTYPE_Q4_1:
    case TSR_DTYPE_Q5_1: return 0;
    }
    return 128;
}

/* The fifth bits of a Q5 block as the tile holds them: vector k (0..7) of the unpacked quants
 * holds elements 4k..4k+3 of each row (k < 4: low nibbles of qs[4k..], k >= 4: high nibbles
 * of qs[4k - 16..]), so bit k of byte i of the row's lane is the fifth bit of element 4k + i
 * (bit 4k + i of the file's qh): one shift and one mask put vector k's bits in place. */
static inline uint32_t tsr_x16_qh_pack(uint32_t h) {
    uint32_t p = 0;
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < 4; i++) p |= ((h >> (4 * k + i)) & 1u) << (8 * i + k);
    return p;
}

static inline uint32_t tsr_x16_qh_unpack(uint32_t p) {
    uint32_t h = 0;
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < 4; i++) h |= ((p >> (8 * i + k)) & 1u) << (4 * k + i);
    return h;
}

/* Activation block b of a prepared row: Q8_1 (its quants, d and s) for the types with a
 * minimum, Q8_0 (s left 0) for the others. */
static inline const int8_t *tsr_x16_act(int32_t wtype, const void *xp, int64_t b, uint16_t *d,
                                        uint16_t *s) {
    if (tsr_x16_has_min(wtype)) {
        const tsr_block_q8_1 *x = (const tsr_block_q8_1 *)xp + b;
        *d = x->d, *s = x->s;
        return x->qs;
    }
    const tsr_block_q8_0 *x = (const tsr_block_q8_0 *)xp + b;
    *d = x->d, *s = 0;
    return x->q;
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
/* Word g of a token's words for a super-block of type qm (a tsr_quant_mm_index), from its
 * sixteen 16-quant sums bs: the integer chains' starts (Q3_K -4 and Q6_K -32 x group g's sum,
 * IQ4_XS -128 x the 32-quant group g's), or the int16 pair of sums that the min pair g
 * multiplies (Q2_K groups 2g, 2g + 1; Q4_K, Q5_K their 32-quant groups); 0 past the last. */
int32_t tsr_xk16_aux(int qm, const int16_t *bs, int g);

/* What a product of a K type's packed matrix with rows of n_in walks: super-blocks per row,
 * the type's tsr_quant_mm_index, bytes of an activation row (Q8_K), of a group, of a chunk. */
typedef struct tsr_xk16_dims {
    int64_t nsb;
    int qm;
    size_t x_stride, group_bytes, chunk;
} tsr_xk16_dims;

static inline tsr_xk16_dims tsr_xk16_dims_of(int32_t wtype, int64_t n_in) {
    return (tsr_xk16_dims){n_in / TSR_QK_K, tsr_quant_mm_index(wtype),
                           tsr_row_size(TSR_DTYPE_Q8_K, n_in),
                           TSR_X16_ROWS * tsr_row_size(wtype, n_in),
                           TSR_X16_ROWS * tsr_dtype_block_bytes(wtype)};
}

/* Where a chunk of type qm holds its 16 fp16 dmin (Q2_K, Q4_K, Q5_K). */
static inline size_t tsr_xk16_dmin_at(int qm) {
    return qm == TSR_QM_Q2_K ? TSR_XK16_Q2_K_DMIN : TSR_XK16_Q4_K_DMIN;
}

/* Where a chunk of type qm holds its 16 fp16 d. */
static inline size_t tsr_xk16_d_at(int qm) {
    switch (qm) {
    case TSR_QM_Q2_K: return TSR_XK16_Q2_K_D;
    case TSR_QM_Q3_K: return TSR_XK16_Q3_K_D;
    case TSR_QM_Q6_K: return TSR_XK16_Q6_K_D;
    case TSR_QM_IQ4_XS: return TSR_XK16_IQ4_XS_D;
    }
    return TSR_XK16_Q4_K_D; /* Q4_K, Q5_K */
}

/* The pairs of groups whose mins a token's super-block takes (0: a type without mins). */
static inline int tsr_xk16_min_pairs(int qm) {
    return qm == TSR_QM_Q2_K ? 8 : qm == TSR_QM_Q4_K || qm == TSR_QM_Q5_K ? 4 : 0;
}
#if defined(TSR_KERNELS_X86)
/* As tsr_x16_matmul_avx512, for the K types (repack_k_avx512.c). */
int tsr_xk16_matmul_avx512(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                           int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1);
/* The same with AVX2 (repack_k_avx2.c). */
int tsr_xk16_matmul_avx2(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                         int64_t n_tok, int64_t n_in, int64_t g0, int64_t g1);
#endif

#endif
