/* AVX2 + FMA + F16C kernels. Compiled with -mavx2 -mfma -mf16c; called only when cpuid says
 * the machine has them. */
#include "x86_common.h"

#include <math.h>

/* Float tiles: one 8-lane accumulator per (row, token), fed in the same order whatever the
 * tile's shape; the n_in % 8 tail goes through zero-padded copies, one more step. */
#define TILE_ROWS 4
#define TILE_TOKS 2

static __m256 load_f32(const void *p) {
    return _mm256_loadu_ps(p);
}
static __m256 load_f16(const void *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(p));
}
static __m256 load_bf16(const void *p) {
    return tsr_x86_bf16_to_fp32_8(_mm_loadu_si128(p));
}

#define DEFINE_TILE(name, esize, load)                                                         \
    TSR_INLINE void name##_rt(float *y, int64_t ldy, const char *w, size_t ws, const char *x, \
                              size_t xs, int64_t n_in, const int R, const int T) {             \
        __m256 acc[TILE_ROWS][TILE_TOKS];                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();                       \
        int64_t nv = n_in / 8 * 8;                                                             \
        for (int64_t k = 0; k < nv; k += 8) {                                                  \
            __m256 wv[TILE_ROWS];                                                              \
            for (int r = 0; r < R; r++) wv[r] = load(w + r * ws + k * (esize));                \
            for (int t = 0; t < T; t++) {                                                      \
                __m256 xv = load(x + t * xs + k * (esize));                                    \
                for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]); \
            }                                                                                  \
        }                                                                                      \
        if (nv < n_in) {                                                                       \
            size_t tail = (size_t)(n_in - nv) * (esize);                                       \
            char wp[TILE_ROWS][8 * (esize)], xp[8 * (esize)];                                  \
            memset(wp, 0, sizeof wp);                                                          \
            memset(xp, 0, sizeof xp);                                                          \
            for (int r = 0; r < R; r++) memcpy(wp[r], w + r * ws + nv * (esize), tail);        \
            for (int t = 0; t < T; t++) {                                                      \
                memcpy(xp, x + t * xs + nv * (esize), tail);                                   \
                __m256 xv = load(xp);                                                          \
                for (int r = 0; r < R; r++)                                                    \
                    acc[r][t] = _mm256_fmadd_ps(load(wp[r]), xv, acc[r][t]);                   \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int t = 0; t < T; t++) y[t * ldy + r] = tsr_x86_hsum8(acc[r][t]);             \
    }                                                                                          \
    static void name(float *y, int64_t ldy, const void *w, size_t ws, const void *x,          \
                     size_t xs, int64_t n_in, int n_r, int n_t) {                             \
        const char *wc = w, *xc = x;                                                           \
        switch (n_r * 8 + n_t) {                                                               \
        case 1 * 8 + 1: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 1, 1); break;                  \
        case 1 * 8 + 2: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 1, 2); break;                  \
        case 2 * 8 + 1: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 2, 1); break;                  \
        case 2 * 8 + 2: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 2, 2); break;                  \
        case 3 * 8 + 1: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 3, 1); break;                  \
        case 3 * 8 + 2: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 3, 2); break;                  \
        case 4 * 8 + 1: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 1); break;                  \
        default: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 2); break;                         \
        }                                                                                      \
    }

DEFINE_TILE(mm_tile_f32, 4, load_f32)
DEFINE_TILE(mm_tile_f16, 2, load_f16)
DEFINE_TILE(mm_tile_bf16, 2, load_bf16)

static void fp16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load_f16(x + i));
    for (; i < n; i++) y[i] = tsr_fp16_to_fp32(x[i]);
}

static void fp32_to_fp16_row(uint16_t *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = tsr_fp32_to_fp16(x[i]);
}

static void bf16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load_bf16(x + i));
    for (; i < n; i++) y[i] = tsr_bf16_to_fp32(x[i]);
}

static void fp32_to_bf16_row(uint16_t *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), tsr_x86_fp32_to_bf16_8(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = tsr_fp32_to_bf16(x[i]);
}

static void q8_0_quantize_row(tsr_block_q8_0 *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_Q8_0_BLOCK; b++)
        tsr_x86_q8_quantize_block(y + b, x + b * TSR_Q8_0_BLOCK);
}

/* Squares rounded to f32 then summed in double, as the reference; x * scale * w as two
 * roundings, as the reference, so only the scale may differ (by the sum's order). */
static void rms_norm_row(float *y, const float *x, const float *w, int64_t n, float eps) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 q = _mm256_mul_ps(v, v);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    double sum = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
    for (int64_t j = i; j < n; j++) sum += (double)(x[j] * x[j]);
    float scale = 1.0f / sqrtf((float)(sum / (double)n) + eps);
    __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vs);
        if (w) v = _mm256_mul_ps(v, _mm256_loadu_ps(w + i));
        _mm256_storeu_ps(y + i, v);
    }
    for (; i < n; i++) y[i] = w ? x[i] * scale * w[i] : x[i] * scale;
}

static float dot_f32(const float *x, const float *y, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
    float s = tsr_x86_hsum8(acc);
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

static float dot_f16(const uint16_t *x, const uint16_t *y, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load_f16(x + i), load_f16(y + i), acc);
    float s = tsr_x86_hsum8(acc);
    for (; i < n; i++) s += tsr_fp16_to_fp32(x[i]) * tsr_fp16_to_fp32(y[i]);
    return s;
}

/* Multiply then add, two roundings as the reference: the same bits. */
static void axpy_f32(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i),
                                              _mm256_mul_ps(va, _mm256_loadu_ps(x + i))));
    for (; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16(float *y, float a, const uint16_t *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i),
                                              _mm256_mul_ps(va, load_f16(x + i))));
    for (; i < n; i++) y[i] += a * tsr_fp16_to_fp32(x[i]);
}

/* tsr_expf on 8 lanes. 2^n is applied as 2^h * 2^(n-h) with h = n >> 1: both factors are
 * normal for |n| <= 192, the first product is exact, so the second rounds once, as
 * AVX-512's vscalefps does (that matters only for subnormal results). */
static __m256 expf8(__m256 x) {
    const __m256 shift = _mm256_set1_ps(TSR_EXP_SHIFT);
    __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(TSR_EXP_LOG2E), shift), shift);
    __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(TSR_EXP_LN2_LO),
                                _mm256_fnmadd_ps(n, _mm256_set1_ps(TSR_EXP_LN2_HI), x));
    __m256 u = _mm256_mul_ps(b, b);
    __m256 p = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(TSR_EXP_C5), b,
                                        _mm256_set1_ps(TSR_EXP_C4)),
                        u,
                        _mm256_fmadd_ps(_mm256_set1_ps(TSR_EXP_C3), b,
                                        _mm256_set1_ps(TSR_EXP_C2))),
        u, _mm256_fmadd_ps(_mm256_set1_ps(TSR_EXP_C1), b, _mm256_set1_ps(1.0f)));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
    __m256 r = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    __m256 absn = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), n);
    __m256 big = _mm256_cmp_ps(absn, _mm256_set1_ps(TSR_EXP_LIMIT), _CMP_GT_OQ);
    __m256 pos = _mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_GT_OQ);
    return _mm256_blendv_ps(r, _mm256_and_ps(pos, _mm256_set1_ps(INFINITY)), big);
}

/* ggml's 16-value chunks as two halves: tsr_softmax_chunk_sum's order. */
static float chunk_sum(__m256 lo, __m256 hi) {
    __m256 a = _mm256_add_ps(lo, hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

static void softmax_row(float *y, const float *x, int64_t n) {
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++) max = fmaxf(max, x[i]);
    __m256 vmax = _mm256_set1_ps(max);
    double sum = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 lo = expf8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
        __m256 hi = expf8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vmax));
        _mm256_storeu_ps(y + i, lo);
        _mm256_storeu_ps(y + i + 8, hi);
        sum += chunk_sum(lo, hi);
    }
    sum = tsr_softmax_tail(y, x, i, n, max, sum);
    float inv = (float)(1.0 / sum);
    __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), vinv));
    for (; i < n; i++) y[i] *= inv;
}

static __m256 silu8(__m256 x) {
    __m256 e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* Tails through zero-padded copies: the lanes are independent, so the bits are the same. */
static void silu_row(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, silu8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float t[8] = {0};
        memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(t, silu8(_mm256_loadu_ps(t)));
        memcpy(y + i, t, (size_t)(n - i) * sizeof(float));
    }
}

static void swiglu_row(float *y, const float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)),
                                              _mm256_loadu_ps(u + i)));
    if (i < n) {
        float tg[8] = {0}, tu[8] = {0};
        memcpy(tg, g + i, (size_t)(n - i) * sizeof(float));
        memcpy(tu, u + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(tg, _mm256_mul_ps(silu8(_mm256_loadu_ps(tg)), _mm256_loadu_ps(tu)));
        memcpy(y + i, tg, (size_t)(n - i) * sizeof(float));
    }
}

const tsr_cpu_ops tsr_cpu_ops_avx2 = {
    .level = TSR_CPU_LEVEL_AVX2,
    .tile_rows = TILE_ROWS,
    .tile_toks = TILE_TOKS,
    .mm_tile = {mm_tile_f32, mm_tile_f16, mm_tile_bf16},
    .fp16_to_fp32_row = fp16_to_fp32_row,
    .fp32_to_fp16_row = fp32_to_fp16_row,
    .bf16_to_fp32_row = bf16_to_fp32_row,
    .fp32_to_bf16_row = fp32_to_bf16_row,
    .q8_0_quantize_row = q8_0_quantize_row,
    .rms_norm_row = rms_norm_row,
    .softmax_row = softmax_row,
    .silu_row = silu_row,
    .swiglu_row = swiglu_row,
    .dot_f32 = dot_f32,
    .dot_f16 = dot_f16,
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
};
