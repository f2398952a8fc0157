/* Row-interleaved Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (kernels_cpu.h "x16"): repacking, the
 * fast order's reference on file rows, and the product over the packed layout (scalar here,
 * AVX2 and AVX-512 VNNI in repack_avx2.c and repack_avx512.c, which give the same bits).
 * The K types (Q2_K..Q6_K, IQ4_XS) are repack_k.c's. */
#include "quants.h"
#include "repack.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

int tsr_x16_supported(int32_t wtype, int64_t n_in, int64_t n_out) {
    const int64_t block = tsr_x16_is_k(wtype)        ? TSR_QK_K
                          : tsr_x16_is_legacy(wtype) ? TSR_QK
                                                     : 0;
    return block && n_in > 0 && n_in % block == 0 && n_out > 0 && n_out % TSR_X16_ROWS == 0;
}

int tsr_x16_repack_pays(int32_t wtype) {
    return !tsr_x16_is_k(wtype) || tsr_cpu_level_get() >= TSR_CPU_LEVEL_AVX2;
}

/* Where group g's tiles and scales start. */
static size_t x16_group_at(int32_t wtype, int64_t n_in, int64_t g) {
    return (size_t)g * TSR_X16_ROWS * tsr_row_size(wtype, n_in);
}

/* Where a 32-element type's fields lie in its file block (0: none); d comes first in all. */
typedef struct x16_fields {
    size_t m, qh, qs;
} x16_fields;

static x16_fields x16_fields_of(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_Q4_1:
        return (x16_fields){offsetof(tsr_block_q4_1, m), 0, offsetof(tsr_block_q4_1, qs)};
    case TSR_DTYPE_Q5_0:
        return (x16_fields){0, offsetof(tsr_block_q5_0, qh), offsetof(tsr_block_q5_0, qs)};
    case TSR_DTYPE_Q5_1:
        return (x16_fields){offsetof(tsr_block_q5_1, m), offsetof(tsr_block_q5_1, qh),
                            offsetof(tsr_block_q5_1, qs)};
    }
    return (x16_fields){0, 0, offsetof(tsr_block_q4_0, qs)}; /* Q4_0, IQ4_NL, Q8_0 alike */
}

/* Offsets in its group of row r's block b: quant byte e (Q8_0 quants, else qs bytes: lane r
 * of vector e / 4), the fifth bits' lane, the scale d (m: 16 fp16 further). */
static size_t x16_quant_at(int32_t wtype, int r, int64_t b, int e) {
    return tsr_x16_pair_at(wtype, (size_t)b) + (size_t)(b % 2) * tsr_x16_tile_bytes(wtype) +
           (size_t)(e / 4) * 64 + (size_t)r * 4 + (size_t)(e % 4);
}

static size_t x16_qh_at(int32_t wtype, int r, int64_t b) {
    return x16_quant_at(wtype, r, b, TSR_QK / 2);
}

static size_t x16_d_at(int32_t wtype, int64_t nb, int r, int64_t b) {
    const size_t first = (size_t)(b / 2 * 2);
    return tsr_x16_pair_at(wtype, first) +
           tsr_x16_pair_scales_at(wtype, tsr_x16_pair_blocks((size_t)nb, first), (int)(b % 2)) +
           (size_t)r * sizeof(uint16_t);
}

#define X16_M_AFTER_D (TSR_X16_ROWS * sizeof(uint16_t))

static uint32_t x16_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void x16_put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

tsr_status tsr_x16_pack(void *dst, const void *src, int32_t wtype, int64_t n_in, int64_t n_out,
                        int64_t g0, int64_t g1) {
    if (!tsr_x16_supported(wtype, n_in, n_out)) return TSR_E_INVALID;
    if (tsr_x16_is_k(wtype)) {
        tsr_xk16_pack(dst, src, wtype, n_in, g0, g1);
        return TSR_OK;
    }
    const int64_t nb = n_in / TSR_QK;
    const size_t row_bytes = tsr_row_size(wtype, n_in), bb = tsr_dtype_block_bytes(wtype);
    const x16_fields f = x16_fields_of(wtype);
    const int n_q = wtype == TSR_DTYPE_Q8_0 ? TSR_QK : TSR_QK / 2;
    const uint8_t flip = wtype == TSR_DTYPE_Q8_0 ? 0x80 : 0; /* Q8_0 quants made unsigned */
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *out = (uint8_t *)dst + x16_group_at(wtype, n_in, g);
        for (int r = 0; r < TSR_X16_ROWS; r++)
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk =
                    (const uint8_t *)src + (size_t)(g * TSR_X16_ROWS + r) * row_bytes + b * bb;
                for (int e = 0; e < n_q; e++)
                    out[x16_quant_at(wtype, r, b, e)] = blk[f.qs + e] ^ flip;
                if (f.qh)
                    x16_put_le32(out + x16_qh_at(wtype, r, b),
                                 tsr_x16_qh_pack(x16_le32(blk + f.qh)));
                const size_t d = x16_d_at(wtype, nb, r, b);
                memcpy(out + d, blk, sizeof(uint16_t));
                if (f.m) memcpy(out + d + X16_M_AFTER_D, blk + f.m, sizeof(uint16_t));
            }
    }
    return TSR_OK;
}

void tsr_x16_unpack_row(void *dst, const void *w, int32_t wtype, int64_t n_in, int64_t row) {
    if (tsr_x16_is_k(wtype)) {
        tsr_xk16_unpack_row(dst, w, wtype, n_in, row);
        return;
    }
    const int64_t nb = n_in / TSR_QK;
    const uint8_t *group = (const uint8_t *)w + x16_group_at(wtype, n_in, row / TSR_X16_ROWS);
    const int r = (int)(row % TSR_X16_ROWS);
    const size_t bb = tsr_dtype_block_bytes(wtype);
    const x16_fields f = x16_fields_of(wtype);
    const int n_q = wtype == TSR_DTYPE_Q8_0 ? TSR_QK : TSR_QK / 2;
    const uint8_t flip = wtype == TSR_DTYPE_Q8_0 ? 0x80 : 0;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = (uint8_t *)dst + b * bb;
        for (int e = 0; e < n_q; e++) blk[f.qs + e] = group[x16_quant_at(wtype, r, b, e)] ^ flip;
        if (f.qh)
            x16_put_le32(blk + f.qh, tsr_x16_qh_unpack(x16_le32(group + x16_qh_at(wtype, r, b))));
        const size_t d = x16_d_at(wtype, nb, r, b);
        memcpy(blk, group + d, sizeof(uint16_t));
        if (f.m) memcpy(blk + f.m, group + d + X16_M_AFTER_D, sizeof(uint16_t));
    }
}

float tsr_x16_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const void *xp) {
    if (!tsr_x16_supported(wtype, n_in, TSR_X16_ROWS)) return 0.0f;
    if (tsr_x16_is_k(wtype)) return tsr_xk16_row_dot_ref(wtype, n_in, w, xp);
    const int qm = tsr_quant_mm_index(wtype);
    float acc = 0.0f;
    for (int64_t b = 0; b < n_in / TSR_QK; b++) {
        int8_t q[TSR_QK];
        uint16_t dw, mw = 0, dx, sx;
        tsr_q_legacy_unpack(qm, w, b, q, &dw, &mw);
        const int8_t *xq = tsr_x16_act(wtype, xp, b, &dx, &sx);
        int32_t isum = 0;
        for (int i = 0; i < TSR_QK; i++) isum += q[i] * xq[i];
        acc = fmaf((float)isum, tsr_fp16_to_fp32(dw) * tsr_fp16_to_fp32(dx), acc);
        if (tsr_x16_has_min(wtype))
            acc = fmaf(tsr_fp16_to_fp32(mw), tsr_fp16_to_fp32(sx), acc);
    }
    return acc;
}

/* The scalar product over the packed layout, groups [g0, g1): each row back in the file's
 * blocks, then the reference; -1 when it could not get the row's memory. */
static int x16_matmul_scalar(float *y, int64_t ldy, const void *w, int32_t wtype,
                             const void *xp, int64_t n_tok, int64_t n_in, int64_t g0,
                             int64_t g1) {
    const size_t x_stride = tsr_row_size(tsr_matmul_act_type(wtype), n_in);
    void *row = malloc(tsr_row_size(wtype, n_in));
    if (!row) return -1;
    for (int64_t r = g0 * TSR_X16_ROWS; r < g1 * TSR_X16_ROWS; r++) {
        tsr_x16_unpack_row(row, w, wtype, n_in, r);
        for (int64_t t = 0; t < n_tok; t++)
            y[t * ldy + r] =
                tsr_x16_row_dot_ref(wtype, n_in, row, (const char *)xp + (size_t)t * x_stride);
    }
    free(row);
    return 0;
}

tsr_status tsr_x16_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                          int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth) {
    if (!tsr_x16_supported(wtype, n_in, n_out) || ldy < n_out || n_tok < 0) return TSR_E_INVALID;
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, TSR_X16_ROWS, ith, nth);
    const int64_t g0 = r0 / TSR_X16_ROWS, g1 = r1 / TSR_X16_ROWS;
    if (g0 >= g1 || n_tok == 0) return TSR_OK;
#if defined(TSR_KERNELS_X86)
    int (*simd)(float *, int64_t, const void *, int32_t, const void *, int64_t, int64_t, int64_t,
                int64_t) = NULL;
    switch (tsr_cpu_level_get()) {
    case TSR_CPU_LEVEL_AVX512:
        simd = tsr_x16_is_k(wtype) ? tsr_xk16_matmul_avx512 : tsr_x16_matmul_avx512;
        break;
    case TSR_CPU_LEVEL_AVX2:
        simd = tsr_x16_is_k(wtype) ? tsr_xk16_matmul_avx2 : tsr_x16_matmul_avx2;
        break;
    default: break;
    }
    if (simd) return simd(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1) < 0 ? TSR_E_NOMEM : TSR_OK;
#endif
    if (tsr_x16_is_k(wtype)) {
        tsr_xk16_matmul_scalar(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1);
        return TSR_OK;
    }
    return x16_matmul_scalar(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1) < 0 ? TSR_E_NOMEM
                                                                          : TSR_OK;
}
