/* The scalar reference of every kernel: what the SIMD paths are tested against, and the path
 * used on machines (or builds) without them. Dots accumulate in double so the reference is
 * more accurate than any SIMD path, except Q8_0, whose f32 accumulation order is part of the
 * format's contract with the SIMD paths (internal.h). */
#include "internal.h"

#include <math.h>
#include <string.h>

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float tsr_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* inf, or NaN made quiet as F16C does */
        return f32_from_bits(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
    if (exp == 0) /* zero or subnormal: man * 2^-24, exact in f32 */
        return f32_from_bits(sign | f32_bits((float)man * 0x1p-24f));
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t tsr_fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: quiet, top of the payload */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) /* from halfway above 65504 up: rounds to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) /* below 2^-14: a multiple of 2^-24, the scaling is exact */
        return (uint16_t)(sign | (uint16_t)rintf(f32_from_bits(ax) * 0x1p24f));
    uint32_t h = ((ax >> 23) - 112) << 10 | ((ax >> 13) & 0x3ffu);
    uint32_t rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++; /* a carry makes the exponent */
    return (uint16_t)(sign | h);
}

float tsr_bf16_to_fp32(uint16_t b) {
    return f32_from_bits((uint32_t)b << 16);
}

uint16_t tsr_fp32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static void fp16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = tsr_fp16_to_fp32(x[i]);
}

static void fp32_to_fp16_row(uint16_t *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = tsr_fp32_to_fp16(x[i]);
}

static void bf16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = tsr_bf16_to_fp32(x[i]);
}

static void fp32_to_bf16_row(uint16_t *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = tsr_fp32_to_bf16(x[i]);
}

static void q8_0_quantize_row(tsr_block_q8_0 *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_Q8_0_BLOCK; b++) {
        const float *xb = x + b * TSR_Q8_0_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < TSR_Q8_0_BLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[b].d = tsr_fp32_to_fp16(amax / 127.0f);
        for (int i = 0; i < TSR_Q8_0_BLOCK; i++) y[b].q[i] = (int8_t)rintf(xb[i] * id);
    }
}

void tsr_q8_0_dequantize_row(float *y, const tsr_block_q8_0 *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_Q8_0_BLOCK; b++) {
        float d = tsr_fp16_to_fp32(x[b].d);
        for (int i = 0; i < TSR_Q8_0_BLOCK; i++) y[b * TSR_Q8_0_BLOCK + i] = d * x[b].q[i];
    }
}

/* Row dots of the reference: exact products, double sums. */

static float dot_f32_ref(const float *w, const float *x, int64_t n) {
    double s = 0.0;
    for (int64_t k = 0; k < n; k++) s += (double)w[k] * x[k];
    return (float)s;
}

static float dot_f16_ref(const uint16_t *w, const uint16_t *x, int64_t n) {
    double s = 0.0;
    for (int64_t k = 0; k < n; k++) s += (double)tsr_fp16_to_fp32(w[k]) * tsr_fp16_to_fp32(x[k]);
    return (float)s;
}

static float dot_bf16_ref(const uint16_t *w, const uint16_t *x, int64_t n) {
    double s = 0.0;
    for (int64_t k = 0; k < n; k++) s += (double)tsr_bf16_to_fp32(w[k]) * tsr_bf16_to_fp32(x[k]);
    return (float)s;
}

#define REF_TILE(name, dot, type)                                                              \
    static void name(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,    \
                     size_t x_stride, int64_t n_in, int n_r, int n_t) {                       \
        for (int t = 0; t < n_t; t++)                                                          \
            for (int r = 0; r < n_r; r++)                                                      \
                y[t * ldy + r] = dot((const type *)((const char *)w + r * w_stride),           \
                                     (const type *)((const char *)x + t * x_stride), n_in);    \
    }
REF_TILE(mm_tile_f32, dot_f32_ref, float)
REF_TILE(mm_tile_f16, dot_f16_ref, uint16_t)
REF_TILE(mm_tile_bf16, dot_bf16_ref, uint16_t)

static void rms_norm_row(float *y, const float *x, const float *w, int64_t n, float eps) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    float scale = 1.0f / sqrtf((float)(sum / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w ? x[i] * scale * w[i] : x[i] * scale;
}

/* ggml's vector exp emulated one value at a time: each fmaf is one of its fused steps and
 * ldexpf rounds once, as vscalefps does, so the SIMD paths give these bits. */
float tsr_expf(float x) {
    float n = fmaf(x, TSR_EXP_LOG2E, TSR_EXP_SHIFT) - TSR_EXP_SHIFT;
    float b = fmaf(-n, TSR_EXP_LN2_LO, fmaf(-n, TSR_EXP_LN2_HI, x));
    float u = b * b;
    float j = fmaf(fmaf(fmaf(TSR_EXP_C5, b, TSR_EXP_C4), u, fmaf(TSR_EXP_C3, b, TSR_EXP_C2)), u,
                   fmaf(TSR_EXP_C1, b, 1.0f));
    if (isnan(n)) return j;
    if (fabsf(n) > TSR_EXP_LIMIT) return n > 0.0f ? INFINITY : 0.0f;
    return ldexpf(j, (int)n);
}

double tsr_softmax_tail(float *y, const float *x, int64_t i, int64_t n, float max, double sum) {
    for (; i < n; i++) {
        y[i] = expf(x[i] - max);
        sum += y[i];
    }
    return sum;
}

static void softmax_row(float *y, const float *x, int64_t n) {
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++) max = fmaxf(max, x[i]);
    double sum = 0.0;
    int64_t i = 0;
    for (; i + TSR_SOFTMAX_CHUNK <= n; i += TSR_SOFTMAX_CHUNK) {
        for (int k = 0; k < TSR_SOFTMAX_CHUNK; k++) y[i + k] = tsr_expf(x[i + k] - max);
        sum += tsr_softmax_chunk_sum(y + i);
    }
    sum = tsr_softmax_tail(y, x, i, n, max, sum);
    float inv = (float)(1.0 / sum);
    for (i = 0; i < n; i++) y[i] *= inv;
}

/* 0 - x rather than -x, as ggml: exp(+0) and exp(-0) agree anyway, the form is kept exact. */
static float silu(float x) {
    return x / (1.0f + tsr_expf(0.0f - x));
}

static void silu_row(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = silu(x[i]);
}

static void swiglu_row(float *y, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = silu(g[i]) * u[i];
}

static void axpy_f32(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16(float *y, float a, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * tsr_fp16_to_fp32(x[i]);
}

const tsr_cpu_ops tsr_cpu_ops_scalar = {
    .level = TSR_CPU_LEVEL_SCALAR,
    .tile_rows = 1,
    .tile_toks = 1,
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
    .dot_f32 = dot_f32_ref,
    .dot_f16 = dot_f16_ref,
    .axpy_f32 = axpy_f32,
    .axpy_f16 = axpy_f16,
};
