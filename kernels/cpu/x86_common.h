/* Helpers shared by avx2.c and avx512.c; each compiles them with its own target flags. They
 * need AVX2, FMA and F16C. Before including, define TSR_Q8_BLOCK_DOT(a, b): the 8 int32
 * partial sums of one Q8_0 block pair, a from the weights, b from the activations. */
#ifndef TSR_KERNELS_X86_COMMON_H
#define TSR_KERNELS_X86_COMMON_H

#include "internal.h"

#include <immintrin.h>
#include <string.h>

#define TSR_INLINE static inline __attribute__((always_inline))

/* The lanes added in the order of tsr_q8_lanes_sum. */
TSR_INLINE float tsr_x86_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* |a| (as unsigned) and b with the sign of a: their u8 x s8 products are a*b, also for
 * a = -128. b must lie in [-127, 127], which tsr_q8_0_quantize_row guarantees. */
TSR_INLINE __m256i tsr_x86_abs_a(__m256i a) {
    return _mm256_sign_epi8(a, a);
}
TSR_INLINE __m256i tsr_x86_sign_b(__m256i b, __m256i a) {
    return _mm256_sign_epi8(b, a);
}

/* Eight vectors of partial sums -> one vector of their eight totals, in order. */
TSR_INLINE __m256i tsr_x86_reduce8(const __m256i v[8]) {
    __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                            _mm256_permute2x128_si256(a, b, 0x31));
}

/* A Q8_0 row dot, bit-identical to the scalar reference: integer block dots (exact), eight
 * blocks at a time scaled and added into lane b % 8, the lanes summed in the shared order. */
TSR_INLINE float tsr_x86_q8_dot(const tsr_block_q8_0 *w, const tsr_block_q8_0 *x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256i v[8];
        uint16_t dw[8], dx[8];
        for (int i = 0; i < 8; i++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)w[b + i].q);
            __m256i c = _mm256_loadu_si256((const __m256i *)x[b + i].q);
            v[i] = TSR_Q8_BLOCK_DOT(a, c);
            dw[i] = w[b + i].d;
            dx[i] = x[b + i].d;
        }
        __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dw)),
                                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dx)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(tsr_x86_reduce8(v)), d));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (; b < nb; b++) {
        float d = tsr_fp16_to_fp32(w[b].d) * tsr_fp16_to_fp32(x[b].d);
        lanes[b % 8] += (float)tsr_q8_block_idot(w[b].q, x[b].q) * d;
    }
    return tsr_q8_lanes_sum(lanes);
}

/* The weights of a tile stay in L1 while its tokens pass, so pairs are simply looped. */
static void tsr_x86_mm_tile_q8_0(float *y, int64_t ldy, const void *w, size_t w_stride,
                                 const void *x, size_t x_stride, int64_t n_in, int n_r, int n_t) {
    for (int t = 0; t < n_t; t++)
        for (int r = 0; r < n_r; r++)
            y[t * ldy + r] = tsr_x86_q8_dot(
                (const tsr_block_q8_0 *)((const char *)w + r * w_stride),
                (const tsr_block_q8_0 *)((const char *)x + t * x_stride), n_in / TSR_Q8_0_BLOCK);
}

/* Round to nearest even, NaN made quiet: as tsr_fp32_to_bf16, 8 at a time. */
TSR_INLINE __m128i tsr_x86_fp32_to_bf16_8(__m256 v) {
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, q, nan);
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    return _mm256_castsi256_si128(p);
}

TSR_INLINE __m256 tsr_x86_bf16_to_fp32_8(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Quantizes one block: the same operations as the scalar reference, so the same bits. */
TSR_INLINE void tsr_x86_q8_quantize_block(tsr_block_q8_0 *y, const float *x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    y->d = tsr_fp32_to_fp16(amax / 127.0f);
    __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)y->q, p);
}

#endif
