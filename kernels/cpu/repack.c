/* Row-interleaved Q4_0 / Q8_0 (kernels_cpu.h "x16"): repacking, the fast order's reference on
 * file rows, and the product over the packed layout (scalar here, AVX-512 VNNI in
 * repack_avx512.c, which gives the same bits). The K types are repack_k.c's. */
#include "repack.h"

#include <math.h>
#include <string.h>

int tsr_x16_supported(int32_t wtype, int64_t n_in, int64_t n_out) {
    const int64_t block = tsr_x16_is_k(wtype) ? TSR_QK_K
                          : wtype == TSR_DTYPE_Q4_0 || wtype == TSR_DTYPE_Q8_0 ? TSR_QK
                                                                               : 0;
    return block && n_in > 0 && n_in % block == 0 && n_out > 0 && n_out % TSR_X16_ROWS == 0;
}

int tsr_x16_repack_pays(int32_t wtype) {
    return !tsr_x16_is_k(wtype) || tsr_cpu_level_get() == TSR_CPU_LEVEL_AVX512;
}

/* Where group g's tiles and scales start. */
static const uint8_t *x16_group(const void *w, int32_t wtype, int64_t n_in, int64_t g) {
    return (const uint8_t *)w + (size_t)g * TSR_X16_ROWS * tsr_row_size(wtype, n_in);
}

static size_t x16_scales_at(int32_t wtype, int64_t nb) {
    return (size_t)nb * tsr_x16_tile_bytes(wtype);
}

/* Byte i (0..3) of the four quants of row r that lane r of vector v of a tile holds. */
static size_t x16_lane_byte(int v, int r, int i) {
    return (size_t)v * 64 + (size_t)r * 4 + (size_t)i;
}

tsr_status tsr_x16_pack(void *dst, const void *src, int32_t wtype, int64_t n_in, int64_t n_out,
                        int64_t g0, int64_t g1) {
    if (!tsr_x16_supported(wtype, n_in, n_out)) return TSR_E_INVALID;
    if (tsr_x16_is_k(wtype)) {
        tsr_xk16_pack(dst, src, wtype, n_in, g0, g1);
        return TSR_OK;
    }
    const int64_t nb = n_in / TSR_QK;
    const size_t row_bytes = tsr_row_size(wtype, n_in), tile = tsr_x16_tile_bytes(wtype);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *out = (uint8_t *)x16_group(dst, wtype, n_in, g);
        uint16_t *scales = (uint16_t *)(out + x16_scales_at(wtype, nb));
        for (int r = 0; r < TSR_X16_ROWS; r++) {
            const uint8_t *row = (const uint8_t *)src + (size_t)(g * TSR_X16_ROWS + r) * row_bytes;
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *t = out + (size_t)b * tile;
                if (wtype == TSR_DTYPE_Q4_0) {
                    const tsr_block_q4_0 *blk = (const tsr_block_q4_0 *)row + b;
                    for (int j = 0; j < 4; j++)
                        for (int i = 0; i < 4; i++) t[x16_lane_byte(j, r, i)] = blk->qs[4 * j + i];
                    memcpy(&scales[b * TSR_X16_ROWS + r], &blk->d, sizeof blk->d);
                } else {
                    const tsr_block_q8_0 *blk = (const tsr_block_q8_0 *)row + b;
                    for (int k = 0; k < 8; k++)
                        for (int i = 0; i < 4; i++)
                            t[x16_lane_byte(k, r, i)] = (uint8_t)(blk->q[4 * k + i] ^ 0x80);
                    memcpy(&scales[b * TSR_X16_ROWS + r], &blk->d, sizeof blk->d);
                }
            }
        }
    }
    return TSR_OK;
}

/* The 32 signed quants of row r (of its group) in block b, and its scale's bits. */
static void x16_block(const uint8_t *group, int32_t wtype, int64_t nb, int r, int64_t b,
                      int8_t q[TSR_QK], uint16_t *d) {
    const uint8_t *t = group + (size_t)b * tsr_x16_tile_bytes(wtype);
    const int off = tsr_x16_offset(wtype);
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < 4; i++) {
            int u = wtype == TSR_DTYPE_Q4_0
                        ? (t[x16_lane_byte(k % 4, r, i)] >> (4 * (k / 4))) & 0xf
                        : t[x16_lane_byte(k, r, i)];
            q[4 * k + i] = (int8_t)(u - off);
        }
    const uint16_t *scales = (const uint16_t *)(group + x16_scales_at(wtype, nb));
    memcpy(d, &scales[b * TSR_X16_ROWS + r], sizeof *d);
}

void tsr_x16_unpack_row(void *dst, const void *w, int32_t wtype, int64_t n_in, int64_t row) {
    if (tsr_x16_is_k(wtype)) {
        tsr_xk16_unpack_row(dst, w, wtype, n_in, row);
        return;
    }
    const int64_t nb = n_in / TSR_QK;
    const uint8_t *group = x16_group(w, wtype, n_in, row / TSR_X16_ROWS);
    for (int64_t b = 0; b < nb; b++) {
        int8_t q[TSR_QK];
        uint16_t d;
        x16_block(group, wtype, nb, (int)(row % TSR_X16_ROWS), b, q, &d);
        if (wtype == TSR_DTYPE_Q4_0) {
            tsr_block_q4_0 *o = (tsr_block_q4_0 *)dst + b;
            o->d = d;
            for (int i = 0; i < TSR_QK / 2; i++)
                o->qs[i] = (uint8_t)((q[i] + 8) | (q[i + TSR_QK / 2] + 8) << 4);
        } else {
            tsr_block_q8_0 *o = (tsr_block_q8_0 *)dst + b;
            o->d = d;
            memcpy(o->q, q, TSR_QK);
        }
    }
}

/* One step of the fast order: block (q, dw) times activation block x, into acc. */
static float x16_fast_step(const int8_t q[TSR_QK], uint16_t dw, const tsr_block_q8_0 *x,
                           float acc) {
    int32_t isum = 0;
    for (int i = 0; i < TSR_QK; i++) isum += q[i] * x->q[i];
    return fmaf((float)isum, tsr_fp16_to_fp32(dw) * tsr_fp16_to_fp32(x->d), acc);
}

float tsr_x16_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const void *xp) {
    if (!tsr_x16_supported(wtype, n_in, TSR_X16_ROWS)) return 0.0f;
    if (tsr_x16_is_k(wtype)) return tsr_xk16_row_dot_ref(wtype, n_in, w, xp);
    const tsr_block_q8_0 *x = xp;
    float acc = 0.0f;
    for (int64_t b = 0; b < n_in / TSR_QK; b++) {
        int8_t q[TSR_QK];
        if (wtype == TSR_DTYPE_Q4_0) {
            const tsr_block_q4_0 *blk = (const tsr_block_q4_0 *)w + b;
            for (int i = 0; i < TSR_QK / 2; i++) {
                q[i] = (int8_t)((blk->qs[i] & 0xf) - 8);
                q[i + TSR_QK / 2] = (int8_t)((blk->qs[i] >> 4) - 8);
            }
            acc = x16_fast_step(q, blk->d, &x[b], acc);
        } else {
            const tsr_block_q8_0 *blk = (const tsr_block_q8_0 *)w + b;
            acc = x16_fast_step(blk->q, blk->d, &x[b], acc);
        }
    }
    return acc;
}

/* The scalar product over the packed layout, groups [g0, g1). */
static void x16_matmul_scalar(float *y, int64_t ldy, const void *w, int32_t wtype,
                              const void *xp, int64_t n_tok, int64_t n_in, int64_t g0,
                              int64_t g1) {
    const int64_t nb = n_in / TSR_QK;
    const size_t x_stride = tsr_row_size(TSR_DTYPE_Q8_0, n_in);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *group = x16_group(w, wtype, n_in, g);
        for (int r = 0; r < TSR_X16_ROWS; r++)
            for (int64_t t = 0; t < n_tok; t++) {
                const tsr_block_q8_0 *x =
                    (const tsr_block_q8_0 *)((const char *)xp + (size_t)t * x_stride);
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    int8_t q[TSR_QK];
                    uint16_t d;
                    x16_block(group, wtype, nb, r, b, q, &d);
                    acc = x16_fast_step(q, d, &x[b], acc);
                }
                y[t * ldy + g * TSR_X16_ROWS + r] = acc;
            }
    }
}

tsr_status tsr_x16_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                          int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth) {
    if (!tsr_x16_supported(wtype, n_in, n_out) || ldy < n_out || n_tok < 0) return TSR_E_INVALID;
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, TSR_X16_ROWS, ith, nth);
    const int64_t g0 = r0 / TSR_X16_ROWS, g1 = r1 / TSR_X16_ROWS;
    if (g0 >= g1 || n_tok == 0) return TSR_OK;
#if defined(TSR_KERNELS_X86)
    switch (tsr_cpu_level_get()) {
    case TSR_CPU_LEVEL_AVX512:
        return (tsr_x16_is_k(wtype)
                    ? tsr_xk16_matmul_avx512(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1)
                    : tsr_x16_matmul_avx512(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1)) < 0
                   ? TSR_E_NOMEM
                   : TSR_OK;
    case TSR_CPU_LEVEL_AVX2:
        if (tsr_x16_is_k(wtype)) break; /* no AVX2 kernel for the K types: the scalar loop */
        return tsr_x16_matmul_avx2(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1) < 0 ? TSR_E_NOMEM
                                                                                  : TSR_OK;
    default: break;
    }
#endif
    if (tsr_x16_is_k(wtype)) tsr_xk16_matmul_scalar(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1);
    else x16_matmul_scalar(y, ldy, w, wtype, xp, n_tok, n_in, g0, g1);
    return TSR_OK;
}
