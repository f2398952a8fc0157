/* AVX-512 kernels (F, BW, VL, DQ, VNNI, BF16). Compiled with those -m flags; called only when
 * cpuid says the machine has all of them. */
#include "x86_common.h"

#include <math.h>

/* Float tiles as in avx2.c, 16 lanes and up to 4 rows x 4 tokens (16 accumulators, 4 weight
 * vectors: 21 of the 32 registers). BF16 uses vdpbf16ps, 32 elements a step. */
#define TILE_ROWS 4
#define TILE_TOKS 4

static __m512 load_f32(const void *p) {
    return _mm512_loadu_ps(p);
}
static __m512 load_f16(const void *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(p));
}
static __m512bh load_bf16(const void *p) {
    return (__m512bh)_mm512_loadu_si512(p);
}
static __m512 mac_fma(__m512 acc, __m512 w, __m512 x) {
    return _mm512_fmadd_ps(w, x, acc);
}
static __m512 mac_bf16(__m512 acc, __m512bh w, __m512bh x) {
    return _mm512_dpbf16_ps(acc, w, x);
}

#define DEFINE_TILE(name, VT, esize, step, load, mac)                                          \
    TSR_INLINE void name##_rt(float *y, int64_t ldy, const char *w, size_t ws, const char *x, \
                              size_t xs, int64_t n_in, const int R, const int T) {             \
        __m512 acc[TILE_ROWS][TILE_TOKS];                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();                       \
        int64_t nv = n_in / (step) * (step);                                                   \
        for (int64_t k = 0; k < nv; k += (step)) {                                             \
            VT wv[TILE_ROWS];                                                                  \
            for (int r = 0; r < R; r++) {                                                      \
                wv[r] = load(w + r * ws + k * (esize));                                        \
            }                                                                                  \
            for (int t = 0; t < T; t++) {                                                      \
                VT xv = load(x + t * xs + k * (esize));                                        \
                for (int r = 0; r < R; r++) acc[r][t] = mac(acc[r][t], wv[r], xv);             \
            }                                                                                  \
        }                                                                                      \
        if (nv < n_in) {                                                                       \
            size_t tail = (size_t)(n_in - nv) * (esize);                                       \
            char wp[TILE_ROWS][(step) * (esize)], xp[(step) * (esize)];                        \
            memset(wp, 0, sizeof wp);                                                          \
            memset(xp, 0, sizeof xp);                                                          \
            for (int r = 0; r < R; r++) memcpy(wp[r], w + r * ws + nv * (esize), tail);        \
            for (int t = 0; t < T; t++) {                                                      \
                memcpy(xp, x + t * xs + nv * (esize), tail);                                   \
                VT xv = load(xp);                                                              \
                for (int r = 0; r < R; r++) acc[r][t] = mac(acc[r][t], load(wp[r]), xv);       \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int t = 0; t < T; t++) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);      \
    }                                                                                          \
    static void name(float *y, int64_t ldy, const void *w, size_t ws, const void *x,          \
                     size_t xs, int64_t n_in, int n_r, int n_t) {                             \
        const char *wc = w, *xc = x;                                                           \
        switch (n_r * 8 + n_t) {                                                               \
        TILE_CASES(name##_rt, 1)                                                               \
        TILE_CASES(name##_rt, 2)                                                               \
        TILE_CASES(name##_rt, 3)                                                               \
        case 4 * 8 + 1: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 1); break;                  \
        case 4 * 8 + 2: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 2); break;                  \
        case 4 * 8 + 3: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 3); break;                  \
        default: name##_rt(y, ldy, wc, ws, xc, xs, n_in, 4, 4); break;                         \
        }                                                                                      \
    }
#define TILE_CASES(fn, R)                                                                      \
    case (R) * 8 + 1: fn(y, ldy, wc, ws, xc, xs, n_in, R, 1); break;                           \
    case (R) * 8 + 2: fn(y, ldy, wc, ws, xc, xs, n_in, R, 2); break;                           \
    case (R) * 8 + 3: fn(y, ldy, wc, ws, xc, xs, n_in, R, 3); break;                           \
    case (R) * 8 + 4: fn(y, ldy, wc, ws, xc, xs, n_in, R, 4); break;

DEFINE_TILE(mm_tile_f32, __m512, 4, 16, load_f32, mac_fma)
DEFINE_TILE(mm_tile_f16, __m512, 2, 16, load_f16, mac_fma)
DEFINE_TILE(mm_tile_bf16, __m512bh, 2, 32, load_bf16, mac_bf16)

static void fp16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, load_f16(x + i));
    for (; i < n; i++) y[i] = tsr_fp16_to_fp32(x[i]);
}

static void fp32_to_fp16_row(uint16_t *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = tsr_fp32_to_fp16(x[i]);
}

/* Not vcvtneps2bf16: it flushes subnormals, and this conversion must be exact. */
static void fp32_to_bf16_row(uint16_t *y, const float *x, int64_t n) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_loadu_si512(x + i);
        __m512i hi = _mm512_srli_epi32(v, 16);
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(v, _mm512_add_epi32(bias, _mm512_and_si512(hi, one))), 16);
        __mmask16 nan = _mm512_cmpgt_epi32_mask(
            _mm512_and_si512(v, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; i++) y[i] = tsr_fp32_to_bf16(x[i]);
}

static void q8_0_quantize_row(tsr_block_q8_0 *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_Q8_0_BLOCK; b++) {
        const float *xb = x + b * TSR_Q8_0_BLOCK;
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        y[b].d = tsr_fp32_to_fp16(amax / 127.0f);
        __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
#define RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, id), RN);
        __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, id), RN);
#undef RN
        _mm_storeu_si128((__m128i *)y[b].q, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y[b].q + 16), _mm512_cvtsepi32_epi8(q1));
    }
}

/* As avx2.c: squares in f32, summed in double; two roundings for x * scale * w. */
static void rms_norm_row(float *y, const float *x, const float *w, int64_t n, float eps) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512 q = _mm512_mul_ps(v, v);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(q)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(q, 1)));
    }
    double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    for (int64_t j = i; j < n; j++) sum += (double)(x[j] * x[j]);
    float scale = 1.0f / sqrtf((float)(sum / (double)n) + eps);
    __m512 vs = _mm512_set1_ps(scale);
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vs);
        if (w) v = _mm512_mul_ps(v, _mm512_loadu_ps(w + i));
        _mm512_storeu_ps(y + i, v);
    }
    for (; i < n; i++) y[i] = w ? x[i] * scale * w[i] : x[i] * scale;
}

/* Attention rows are short (head_dim 64..128): masked tails instead of scalar ones. */
static float dot_f32(const float *x, const float *y, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i),
                              acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static float dot_f16(const uint16_t *x, const uint16_t *y, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(load_f16(x + i), load_f16(y + i), acc);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x + i)),
                              _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, y + i)), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Multiply then add, two roundings as the reference: the same bits. */
static void axpy_f32(float *y, float a, const float *x, int64_t n) {
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i),
                                              _mm512_mul_ps(va, _mm512_loadu_ps(x + i))));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i),
                                 _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, x + i)));
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}

static void axpy_f16(float *y, float a, const uint16_t *x, int64_t n) {
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i),
                                              _mm512_mul_ps(va, load_f16(x + i))));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x + i));
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_mul_ps(va, xv));
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}

/* tsr_expf on 16 lanes: ggml's AVX-512 exp itself, vscalefps included. */
static __m512 expf16(__m512 x) {
    const __m512 shift = _mm512_set1_ps(TSR_EXP_SHIFT);
    __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(TSR_EXP_LOG2E), shift), shift);
    __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(TSR_EXP_LN2_LO),
                                _mm512_fnmadd_ps(n, _mm512_set1_ps(TSR_EXP_LN2_HI), x));
    __m512 u = _mm512_mul_ps(b, b);
    __m512 p = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(TSR_EXP_C5), b,
                                        _mm512_set1_ps(TSR_EXP_C4)),
                        u,
                        _mm512_fmadd_ps(_mm512_set1_ps(TSR_EXP_C3), b,
                                        _mm512_set1_ps(TSR_EXP_C2))),
        u, _mm512_fmadd_ps(_mm512_set1_ps(TSR_EXP_C1), b, _mm512_set1_ps(1.0f)));
    __m512 r = _mm512_scalef_ps(p, n);
    __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(TSR_EXP_LIMIT),
                                       _CMP_GT_OQ);
    __mmask16 pos = _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(big, r, _mm512_maskz_mov_ps(pos, _mm512_set1_ps(INFINITY)));
}

/* tsr_softmax_chunk_sum's order. */
static float chunk_sum(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

static void softmax_row(float *y, const float *x, int64_t n) {
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++) max = fmaxf(max, x[i]);
    double sum = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = expf16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(max)));
        _mm512_storeu_ps(y + i, e);
        sum += chunk_sum(e);
    }
    sum = tsr_softmax_tail(y, x, i, n, max, sum);
    float inv = (float)(1.0 / sum);
    __m512 vinv = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), vinv));
    for (; i < n; i++) y[i] *= inv;
}

static __m512 silu16(__m512 x) {
    __m512 e = expf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* Tails through masked lanes: the lanes are independent, so the bits are the same. */
static void silu_row(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, silu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static void swiglu_row(float *y, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_mul_ps(silu16(_mm512_maskz_loadu_ps(m, g + i)),
                                 _mm512_maskz_loadu_ps(m, u + i));
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}

/* bf16 -> fp32 is a shift: the AVX2 version is already load-bound. */
const tsr_cpu_ops tsr_cpu_ops_avx512 = {
    .level = TSR_CPU_LEVEL_AVX512,
    .tile_rows = TILE_ROWS,
    .tile_toks = TILE_TOKS,
    .mm_tile = {mm_tile_f32, mm_tile_f16, mm_tile_bf16},
    .fp16_to_fp32_row = fp16_to_fp32_row,
    .fp32_to_fp16_row = fp32_to_fp16_row,
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
