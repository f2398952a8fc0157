/* The GGUF quantized formats: what quants_ref.c, quants_dot.c and the ISA files share, and
 * the entry points dispatch.c forwards to. Not installed.
 *
 * Every product of a quantized weight row with a prepared activation row is a sum over
 * blocks. A block's integer part is exact, so any ISA may compute it any way it likes; the
 * f32 part is fixed here (the legacy and llama.cpp lane rules, tsr_qk_value), which is why
 * every ISA gives the same bits. */
#ifndef TSR_KERNELS_CPU_QUANTS_H
#define TSR_KERNELS_CPU_QUANTS_H

#include "internal.h"

#include <string.h>

/* The weight formats the quantized products handle, as indices into tsr_quant_ops.tile. */
enum {
    TSR_QM_Q4_0, TSR_QM_Q4_1, TSR_QM_Q5_0, TSR_QM_Q5_1, TSR_QM_Q8_0, TSR_QM_IQ4_NL,
    TSR_QM_Q2_K, TSR_QM_Q3_K, TSR_QM_Q4_K, TSR_QM_Q5_K, TSR_QM_Q6_K, TSR_QM_IQ4_XS,
    TSR_QM_COUNT
};

/* Tiles of the quantized products are at most this many rows by tokens, at every level. */
#define TSR_QM_TILE 4

/* A whole thread slice: y[t * ldy + r] for the n_rows rows of w and the n_tok prepared rows
 * of x, with the values of the tiles bit for bit. Returns 0, or -1 when it could not get its
 * scratch memory (the caller then runs the tiles). */
typedef int (*tsr_quant_mm_fn)(float *y, int64_t ldy, const void *w, size_t w_stride,
                               const void *x, size_t x_stride, int64_t n_in, int64_t n_rows,
                               int64_t n_tok);

/* One ISA's quantized kernels; NULL entries fall back to the level below. */
typedef struct tsr_quant_ops {
    tsr_mm_tile_fn tile[TSR_QM_COUNT];
    tsr_quant_mm_fn mm[TSR_QM_COUNT]; /* optional: faster than looping the tiles */
    void (*q8_1_quantize_row)(tsr_block_q8_1 *y, const float *x, int64_t n);
    void (*q8_k_quantize_row)(tsr_block_q8_k *y, const float *x, int64_t n);
} tsr_quant_ops;

extern const tsr_quant_ops tsr_quant_ops_scalar;
#if defined(TSR_KERNELS_X86)
extern const tsr_quant_ops tsr_quant_ops_avx2;
extern const tsr_quant_ops tsr_quant_ops_avx512;
#endif

/* The scalar activation quantizers (quants_ref.c). */
void tsr_q8_1_quantize_row_ref(tsr_block_q8_1 *y, const float *x, int64_t n);
void tsr_q8_k_quantize_row_ref(tsr_block_q8_k *y, const float *x, int64_t n);

/* The 16 levels of IQ4_NL and IQ4_XS. */
extern const int8_t tsr_iq4nl_values[16];

/* Hooks of dispatch.c's public functions: -1 / 0 / TSR_E_UNSUPPORTED for other types. */
int tsr_quant_mm_index(int32_t wtype);
int32_t tsr_quant_act_type(int32_t wtype);
tsr_status tsr_quant_prepare_row(int32_t act_type, void *dst, const float *src, int64_t n);
tsr_status tsr_quant_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                            int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth);
float tsr_quant_row_dot(int32_t wtype, int64_t n, const void *w, const void *xp);

/* Bytes of a weight block of index qm. */
static inline size_t tsr_qm_block_bytes(int qm) {
    static const size_t bytes[TSR_QM_COUNT] = {
        sizeof(tsr_block_q4_0), sizeof(tsr_block_q4_1), sizeof(tsr_block_q5_0),
        sizeof(tsr_block_q5_1), sizeof(tsr_block_q8_0), sizeof(tsr_block_iq4_nl),
        sizeof(tsr_block_q2_k), sizeof(tsr_block_q3_k), sizeof(tsr_block_q4_k),
        sizeof(tsr_block_q5_k), sizeof(tsr_block_q6_k), sizeof(tsr_block_iq4_xs)};
    return bytes[qm];
}

/* ---------------------------------------------------------------------------------------- */
/* Scale fields                                                                              */

/* Q4_K / Q5_K: the 6-bit scale and min of group j (0..7) from the 12 packed bytes. */
static inline void tsr_qk_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q3_K: the 16 signed 6-bit group scales (stored + 32). */
static inline void tsr_q3k_scales(const uint8_t *s, int sc[16]) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? s[j] & 0xf : s[j - 8] >> 4;
        sc[j] = (lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    }
}

/* IQ4_XS: the signed 6-bit scale of group j (0..7). */
static inline int tsr_iq4xs_scale(const tsr_block_iq4_xs *b, int j) {
    return (((b->scales_l[j / 2] >> (4 * (j % 2))) & 0xf) | (((b->scales_h >> (2 * j)) & 3) << 4))
           - 32;
}

/* ---------------------------------------------------------------------------------------- */
/* The f32 part of the products                                                              */

/* Legacy (32-element) blocks follow llama.cpp's x86 kernels (ggml_vec_dot_q4_0_q8_0 and its
 * kin, and llamafile's tinyBLAS, which round alike), so that they round as its logits do:
 * int32 lane k (0..7) of a block is the dot of its quants 4k..4k+3 with the activation's;
 * each block adds lane k times dw * dx (one f32 product) into f32 lane k with one fma; the
 * value is tsr_q8_lanes_sum of the eight lanes. Q4_1 and Q5_1 (Q8_1 activations) also add
 * mw * sx into one f32 with an fma per block (GCC contracts llama.cpp's `summs += m * s`),
 * added to the lanes' sum at the end. */
static inline int tsr_q_legacy_has_min(int qm) {
    return qm == TSR_QM_Q4_1 || qm == TSR_QM_Q5_1;
}

/* The quants of legacy block b as int8, offsets removed (Q4_1, Q5_1 keep theirs: their mins
 * carry them); *d and *m its scale and min as fp16 bits (m: Q4_1, Q5_1 only). The scalar
 * reference's (quants_dot.c), which the x16 one (repack.c) shares. */
void tsr_q_legacy_unpack(int qm, const void *w, int64_t b, int8_t q[TSR_QK], uint16_t *d,
                         uint16_t *m);

/* Q4_K and Q6_K follow llama.cpp's x86 kernels (ggml_vec_dot_q4_K_q8_K, _q6_K_q8_K), so that
 * they round as its logits do: int32 lane k of a super-block is the sum of scale * quant *
 * activation over the quants whose index within their 32 lies in 4k..4k+3 (Q6_K quants with
 * their -32); each super-block adds lane k times dx * dw into f32 lane k with one fma, and
 * Q4_K adds min lane m (mins of groups 2m, 2m + 1 times their activation sums) times
 * -dx * dmin into a second, four-lane accumulator. The result is tsr_q8_lanes_sum of the
 * eight lanes plus, for Q4_K, the four min lanes added as (0 + 2) + (1 + 3). */
static inline int tsr_qk_llama_lanes(int qm) {
    return qm == TSR_QM_Q4_K || qm == TSR_QM_Q6_K;
}
static inline float tsr_qk_llama_sum(int qm, const float acc[TSR_Q8_LANES], const float m[4]) {
    float s = tsr_q8_lanes_sum(acc);
    return qm == TSR_QM_Q4_K ? s + ((m[0] + m[2]) + (m[1] + m[3])) : s;
}

/* The integer lanes of one Q4_K / Q6_K super-block (mins: 0 for Q6_K): the scalar reference
 * (quants_dot.c). */
void tsr_qk_lane_idot(int qm, const void *w, const tsr_block_q8_k *x, int32_t lanes[8],
                      int32_t mins[4]);

/* The other K super-blocks (256 elements, Q8_K activations): isum = sum over groups of
 * scale * integer dot, msum = sum over groups of min * activation group sum. Super-block b's
 * value goes into lane b % TSR_Q8_LANES as well. */
static inline float tsr_qk_value(int32_t isum, int32_t msum, float dw, float dmin, float dx) {
    return (dx * dw) * (float)isum - (dx * dmin) * (float)msum;
}

/* The integer parts of one super-block: the scalar reference (quants_dot.c). */
void tsr_qk_idot(int qm, const void *w, const tsr_block_q8_k *x, int32_t *isum, int32_t *msum);

/* d and dmin (0 for types without) of a K-type weight block, as f32. */
static inline void tsr_qk_block_scales(int qm, const void *w, float *d, float *dmin) {
    uint16_t h = 0, hm = 0;
    switch (qm) {
    case TSR_QM_Q2_K:
        h = ((const tsr_block_q2_k *)w)->d;
        hm = ((const tsr_block_q2_k *)w)->dmin;
        break;
    case TSR_QM_Q3_K: h = ((const tsr_block_q3_k *)w)->d; break;
    case TSR_QM_Q4_K:
        h = ((const tsr_block_q4_k *)w)->d;
        hm = ((const tsr_block_q4_k *)w)->dmin;
        break;
    case TSR_QM_Q5_K:
        h = ((const tsr_block_q5_k *)w)->d;
        hm = ((const tsr_block_q5_k *)w)->dmin;
        break;
    case TSR_QM_Q6_K: h = ((const tsr_block_q6_k *)w)->d; break;
    case TSR_QM_IQ4_XS: h = ((const tsr_block_iq4_xs *)w)->d; break;
    }
    *d = tsr_fp16_to_fp32(h);
    *dmin = tsr_fp16_to_fp32(hm);
}

#endif
