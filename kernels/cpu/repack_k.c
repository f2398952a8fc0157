/* Row-interleaved K types (kernels_cpu.h "x16": Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS):
 * repacking, the fast order's reference on file rows, and the scalar product over the packed
 * layout (repack_k_avx512.c gives the same bits with VNNI). repack.c routes them here. */
#include "quants.h"
#include "repack.h"

#include <math.h>
#include <string.h>

/* Where a field of a file super-block goes in its 16-row chunk: `lane` bytes of each row side
 * by side (row r at lane r), so that a `lane`-byte run of the field for the 16 rows is one
 * vector (4: a vpdpbusd operand; 2: the fp16 scales; 1: byte planes of the group scales). A
 * type's fields cover its block, so the chunk is 16 blocks' bytes. */
typedef struct xk_field {
    size_t file, bytes, lane, chunk;
} xk_field;

#define XK_FIELDS 5 /* at most; a table ends at a field of no bytes */
static const xk_field xk_q4_k_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_q4_k, qs), TSR_QK_K / 2, 4, 0},
    {offsetof(tsr_block_q4_k, d), 2, 2, TSR_XK16_Q4_K_D},
    {offsetof(tsr_block_q4_k, dmin), 2, 2, TSR_XK16_Q4_K_DMIN},
    {offsetof(tsr_block_q4_k, scales), 12, 1, TSR_XK16_Q4_K_SCALES},
};
static const xk_field xk_q5_k_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_q5_k, qs), TSR_QK_K / 2, 4, 0},
    {offsetof(tsr_block_q5_k, d), 2, 2, TSR_XK16_Q4_K_D},
    {offsetof(tsr_block_q5_k, dmin), 2, 2, TSR_XK16_Q4_K_DMIN},
    {offsetof(tsr_block_q5_k, scales), 12, 1, TSR_XK16_Q4_K_SCALES},
    {offsetof(tsr_block_q5_k, qh), TSR_QK_K / 8, 4, TSR_XK16_Q5_K_QH},
};
static const xk_field xk_q6_k_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_q6_k, ql), TSR_QK_K / 2, 4, 0},
    {offsetof(tsr_block_q6_k, qh), TSR_QK_K / 4, 4, TSR_XK16_Q6_K_QH},
    {offsetof(tsr_block_q6_k, scales), TSR_QK_K / 16, 1, TSR_XK16_Q6_K_SCALES},
    {offsetof(tsr_block_q6_k, d), 2, 2, TSR_XK16_Q6_K_D},
};
static const xk_field xk_q3_k_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_q3_k, hmask), TSR_QK_K / 8, 4, 0},
    {offsetof(tsr_block_q3_k, qs), TSR_QK_K / 4, 4, TSR_XK16_Q3_K_QS},
    {offsetof(tsr_block_q3_k, scales), 12, 1, TSR_XK16_Q3_K_SCALES},
    {offsetof(tsr_block_q3_k, d), 2, 2, TSR_XK16_Q3_K_D},
};
static const xk_field xk_q2_k_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_q2_k, qs), TSR_QK_K / 4, 4, 0},
    {offsetof(tsr_block_q2_k, scales), TSR_QK_K / 16, 1, TSR_XK16_Q2_K_SCALES},
    {offsetof(tsr_block_q2_k, d), 2, 2, TSR_XK16_Q2_K_D},
    {offsetof(tsr_block_q2_k, dmin), 2, 2, TSR_XK16_Q2_K_DMIN},
};
static const xk_field xk_iq4_xs_fields[XK_FIELDS + 1] = {
    {offsetof(tsr_block_iq4_xs, qs), TSR_QK_K / 2, 4, 0},
    {offsetof(tsr_block_iq4_xs, d), 2, 2, TSR_XK16_IQ4_XS_D},
    {offsetof(tsr_block_iq4_xs, scales_h), 2, 2, TSR_XK16_IQ4_XS_SCALES_H},
    {offsetof(tsr_block_iq4_xs, scales_l), TSR_QK_K / 64, 1, TSR_XK16_IQ4_XS_SCALES_L},
};

static const xk_field *xk_fields(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q2_K: return xk_q2_k_fields;
    case TSR_DTYPE_Q3_K: return xk_q3_k_fields;
    case TSR_DTYPE_Q4_K: return xk_q4_k_fields;
    case TSR_DTYPE_Q5_K: return xk_q5_k_fields;
    case TSR_DTYPE_IQ4_XS: return xk_iq4_xs_fields;
    }
    return xk_q6_k_fields;
}

/* Byte i of field f of row r in its chunk. */
static size_t xk_at(const xk_field *f, int r, size_t i) {
    return f->chunk + TSR_X16_ROWS * f->lane * (i / f->lane) + f->lane * (size_t)r + i % f->lane;
}

/* Chunk sb of group g. */
static const uint8_t *xk_chunk(const void *w, int32_t wtype, int64_t n_in, int64_t g,
                               int64_t sb) {
    return (const uint8_t *)w + (size_t)g * TSR_X16_ROWS * tsr_row_size(wtype, n_in) +
           (size_t)sb * TSR_X16_ROWS * tsr_dtype_block_bytes(wtype);
}

void tsr_xk16_pack(void *dst, const void *src, int32_t wtype, int64_t n_in, int64_t g0,
                   int64_t g1) {
    const xk_field *fields = xk_fields(wtype);
    const size_t row_bytes = tsr_row_size(wtype, n_in), bb = tsr_dtype_block_bytes(wtype);
    for (int64_t g = g0; g < g1; g++)
        for (int64_t sb = 0; sb < n_in / TSR_QK_K; sb++) {
            uint8_t *c = (uint8_t *)xk_chunk(dst, wtype, n_in, g, sb);
            for (int r = 0; r < TSR_X16_ROWS; r++) {
                const uint8_t *blk = (const uint8_t *)src +
                                     (size_t)(g * TSR_X16_ROWS + r) * row_bytes + (size_t)sb * bb;
                for (const xk_field *f = fields; f->bytes; f++)
                    for (size_t i = 0; i < f->bytes; i++) c[xk_at(f, r, i)] = blk[f->file + i];
            }
        }
}

/* Row r's super-block sb of group g as the file holds it. */
static void xk_block(void *blk, const void *w, int32_t wtype, int64_t n_in, int64_t g, int r,
                     int64_t sb) {
    const uint8_t *c = xk_chunk(w, wtype, n_in, g, sb);
    const xk_field *fields = xk_fields(wtype);
    for (const xk_field *f = fields; f->bytes; f++)
        for (size_t i = 0; i < f->bytes; i++) ((uint8_t *)blk)[f->file + i] = c[xk_at(f, r, i)];
}

void tsr_xk16_unpack_row(void *dst, const void *w, int32_t wtype, int64_t n_in, int64_t row) {
    const size_t bb = tsr_dtype_block_bytes(wtype);
    for (int64_t sb = 0; sb < n_in / TSR_QK_K; sb++)
        xk_block((uint8_t *)dst + (size_t)sb * bb, w, wtype, n_in, row / TSR_X16_ROWS,
                 (int)(row % TSR_X16_ROWS), sb);
}

/* One step of the fast order: super-block w times activation block x, into acc. The integer
 * parts are quants_dot.c's (exact); the types with mins (Q2_K, Q4_K, Q5_K) take a second fma. */
static float xk_fast_step(int32_t wtype, const void *w, const tsr_block_q8_k *x, float acc) {
    const int qm = tsr_quant_mm_index(wtype);
    int32_t isum, msum;
    float d, dmin;
    tsr_qk_idot(qm, w, x, &isum, &msum);
    tsr_qk_block_scales(qm, w, &d, &dmin);
    acc = fmaf((float)isum, d * x->d, acc);
    return qm == TSR_QM_Q2_K || qm == TSR_QM_Q4_K || qm == TSR_QM_Q5_K
               ? fmaf(-(float)msum, dmin * x->d, acc)
               : acc;
}

float tsr_xk16_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const void *xp) {
    const size_t bb = tsr_dtype_block_bytes(wtype);
    float acc = 0.0f;
    for (int64_t sb = 0; sb < n_in / TSR_QK_K; sb++)
        acc = xk_fast_step(wtype, (const uint8_t *)w + (size_t)sb * bb,
                           (const tsr_block_q8_k *)xp + sb, acc);
    return acc;
}

void tsr_xk16_matmul_scalar(float *y, int64_t ldy, const void *w, int32_t wtype,
                            const void *xp, int64_t n_tok, int64_t n_in, int64_t g0,
                            int64_t g1) {
    const size_t x_stride = tsr_row_size(TSR_DTYPE_Q8_K, n_in);
    union {
        tsr_block_q2_k q2;
        tsr_block_q3_k q3;
        tsr_block_q4_k q4;
        tsr_block_q5_k q5;
        tsr_block_q6_k q6;
        tsr_block_iq4_xs iq4;
    } blk;
    for (int64_t g = g0; g < g1; g++)
        for (int r = 0; r < TSR_X16_ROWS; r++)
            for (int64_t t = 0; t < n_tok; t++) {
                const tsr_block_q8_k *x =
                    (const tsr_block_q8_k *)((const char *)xp + (size_t)t * x_stride);
                float acc = 0.0f;
                for (int64_t sb = 0; sb < n_in / TSR_QK_K; sb++) {
                    xk_block(&blk, w, wtype, n_in, g, r, sb);
                    acc = xk_fast_step(wtype, &blk, &x[sb], acc);
                }
                y[t * ldy + g * TSR_X16_ROWS + r] = acc;
            }
}

static int32_t xk_pair16(int lo, int hi) {
    return (int32_t)((uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16);
}

int32_t tsr_xk16_aux(int qm, const int16_t *bs, int g) {
    switch (qm) {
    case TSR_QM_Q2_K: return g < 8 ? xk_pair16(bs[2 * g], bs[2 * g + 1]) : 0;
    case TSR_QM_Q3_K: return -4 * bs[g];
    case TSR_QM_Q6_K: return -32 * bs[g];
    case TSR_QM_IQ4_XS: return g < 8 ? -128 * (bs[2 * g] + bs[2 * g + 1]) : 0;
    }
    return g < 4 ? xk_pair16(bs[4 * g] + bs[4 * g + 1], bs[4 * g + 2] + bs[4 * g + 3]) : 0;
}
