/* Level selection and the public entry points that dispatch to an ISA's table. */
#include "internal.h"
#include "quants.h"

#if defined(TSR_KERNELS_X86)
#include <cpuid.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* The tables with NULL entries filled from the level below, indexed by level; built once. */
static tsr_cpu_ops g_tables[3];
static tsr_cpu_level g_best = TSR_CPU_LEVEL_SCALAR;
static atomic_int g_level;
static int g_vbmi; /* the AVX-512 machine also has VBMI */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

#if defined(TSR_KERNELS_X86)
static void fill_table(tsr_cpu_ops *dst, const tsr_cpu_ops *src, const tsr_cpu_ops *s) {
    *dst = *src;
    for (int i = 0; i < TSR_MM_COUNT; i++)
        if (!dst->mm_tile[i]) dst->mm_tile[i] = s->mm_tile[i];
#define FILL(f) \
    if (!dst->f) dst->f = s->f
    FILL(fp16_to_fp32_row);
    FILL(fp32_to_fp16_row);
    FILL(bf16_to_fp32_row);
    FILL(fp32_to_bf16_row);
    FILL(q8_0_quantize_row);
    FILL(rms_norm_row);
    FILL(softmax_row);
    FILL(silu_row);
    FILL(swiglu_row);
    FILL(dot_f32);
    FILL(dot_f16);
    FILL(axpy_f32);
    FILL(axpy_f16);
#undef FILL
}

/* cpuid and the OS's saved-state mask directly: clang's __builtin_cpu_supports knows neither
 * "f16c" nor "avx512bf16", and a CPU feature is usable only if the OS saves its registers. */
static tsr_cpu_level detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return TSR_CPU_LEVEL_SCALAR;
    const unsigned fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (fma | osxsave | avx | f16c)) != (fma | osxsave | avx | f16c))
        return TSR_CPU_LEVEL_SCALAR;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0x6u) != 0x6u) return TSR_CPU_LEVEL_SCALAR; /* XMM and YMM state */
    /* AVX2, and BMI2 (every AVX2 CPU has it; the research products' pdep) */
    const unsigned avx2_bmi2 = 1u << 5 | 1u << 8;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (b & avx2_bmi2) != avx2_bmi2)
        return TSR_CPU_LEVEL_SCALAR;
    /* AVX-512 F, DQ, BW, VL; VNNI; opmask and ZMM state; BF16 in leaf 7 subleaf 1 */
    const unsigned f_dq_bw_vl = 1u << 16 | 1u << 17 | 1u << 30 | 1u << 31;
    if ((b & f_dq_bw_vl) != f_dq_bw_vl || !(c & (1u << 11)) || (xlo & 0xe0u) != 0xe0u)
        return TSR_CPU_LEVEL_AVX2;
    const int vbmi = (c >> 1) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return TSR_CPU_LEVEL_AVX2;
    g_vbmi = vbmi;
    return TSR_CPU_LEVEL_AVX512;
}
#endif

static int parse_level(const char *s) {
    static const char *const names[] = {"scalar", "avx2", "avx512"};
    for (int i = 0; i < 3; i++)
        if (s && strcmp(s, names[i]) == 0) return i;
    return -1;
}

static void init_once(void) {
    g_tables[TSR_CPU_LEVEL_SCALAR] = tsr_cpu_ops_scalar;
    g_tables[TSR_CPU_LEVEL_AVX2] = g_tables[TSR_CPU_LEVEL_AVX512] = tsr_cpu_ops_scalar;
#if defined(TSR_KERNELS_X86)
    fill_table(&g_tables[TSR_CPU_LEVEL_AVX2], &tsr_cpu_ops_avx2, &g_tables[0]);
    fill_table(&g_tables[TSR_CPU_LEVEL_AVX512], &tsr_cpu_ops_avx512, &g_tables[1]);
    g_best = detect();
#endif
    /* An unknown name or a level above the machine's is not an error worth failing every
     * kernel for: the variable only ever lowers the level. */
    int want = parse_level(getenv("TESSERA_CPU_LEVEL"));
    atomic_store(&g_level, want >= 0 && want < (int)g_best ? want : (int)g_best);
}

static const tsr_cpu_ops *ops(void) {
    pthread_once(&g_once, init_once);
    return &g_tables[atomic_load_explicit(&g_level, memory_order_relaxed)];
}

int tsr_cpu_avx512_vbmi(void) {
    return tsr_cpu_level_get() == TSR_CPU_LEVEL_AVX512 && g_vbmi;
}

tsr_cpu_level tsr_cpu_level_best(void) {
    pthread_once(&g_once, init_once);
    return g_best;
}

tsr_cpu_level tsr_cpu_level_get(void) {
    return ops()->level;
}

tsr_status tsr_cpu_level_set(tsr_cpu_level level) {
    pthread_once(&g_once, init_once);
    if ((int)level < 0 || (int)level > TSR_CPU_LEVEL_AVX512) return TSR_E_INVALID;
    if (level > g_best) return TSR_E_UNSUPPORTED;
    atomic_store(&g_level, (int)level);
    return TSR_OK;
}

const char *tsr_cpu_level_name(tsr_cpu_level level) {
    switch (level) {
    case TSR_CPU_LEVEL_SCALAR: return "scalar";
    case TSR_CPU_LEVEL_AVX2: return "avx2";
    case TSR_CPU_LEVEL_AVX512: return "avx512";
    }
    return "?";
}

void tsr_thread_slice(int64_t *begin, int64_t *end, int64_t n, int64_t align, int ith, int nth) {
    if (align < 1) align = 1;
    if (nth < 1 || ith < 0 || ith >= nth || n <= 0) {
        *begin = *end = n > 0 ? n : 0;
        return;
    }
    int64_t units = (n + align - 1) / align;
    int64_t per = units / nth, extra = units % nth;
    int64_t u0 = ith * per + (ith < extra ? ith : extra);
    int64_t u1 = u0 + per + (ith < extra ? 1 : 0);
    *begin = u0 * align < n ? u0 * align : n;
    *end = u1 * align < n ? u1 * align : n;
}

/* ---------------------------------------------------------------------------------------- */

void tsr_fp16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    ops()->fp16_to_fp32_row(y, x, n);
}

void tsr_fp32_to_fp16_row(uint16_t *y, const float *x, int64_t n) {
    ops()->fp32_to_fp16_row(y, x, n);
}

void tsr_bf16_to_fp32_row(float *y, const uint16_t *x, int64_t n) {
    ops()->bf16_to_fp32_row(y, x, n);
}

void tsr_fp32_to_bf16_row(uint16_t *y, const float *x, int64_t n) {
    ops()->fp32_to_bf16_row(y, x, n);
}

void tsr_q8_0_quantize_row(tsr_block_q8_0 *y, const float *x, int64_t n) {
    ops()->q8_0_quantize_row(y, x, n);
}

tsr_status tsr_row_to_f32(float *y, int32_t dtype, const void *x, int64_t n) {
    return tsr_dequantize_row(dtype, y, x, n);
}

int32_t tsr_matmul_act_type(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_F32:
    case TSR_DTYPE_F16:
    case TSR_DTYPE_BF16: return wtype;
    }
    return tsr_quant_act_type(wtype);
}

static int mm_index(int32_t wtype) {
    switch (wtype) {
    case TSR_DTYPE_F32: return TSR_MM_F32;
    case TSR_DTYPE_F16: return TSR_MM_F16;
    case TSR_DTYPE_BF16: return TSR_MM_BF16;
    }
    return -1;
}

static tsr_status check_types(int32_t type, int64_t n_in) {
    if (mm_index(type) < 0) return TSR_E_UNSUPPORTED;
    if (n_in < 0 || (n_in > 0 && tsr_row_size(type, n_in) == 0)) return TSR_E_INVALID;
    return TSR_OK;
}

tsr_status tsr_matmul_prepare(void *xp, int32_t act_type, const float *x, int64_t n_tok,
                              int64_t n_in, int ith, int nth) {
    if (act_type == TSR_DTYPE_Q8_0 || act_type == TSR_DTYPE_Q8_1 || act_type == TSR_DTYPE_Q8_K) {
        if (n_in < 0 || (n_in > 0 && tsr_row_size(act_type, n_in) == 0)) return TSR_E_INVALID;
        size_t row = tsr_row_size(act_type, n_in);
        int64_t t0, t1;
        tsr_thread_slice(&t0, &t1, n_tok, 1, ith, nth);
        for (int64_t t = t0; t < t1; t++)
            tsr_quant_prepare_row(act_type, (char *)xp + t * row, x + t * n_in, n_in);
        return TSR_OK;
    }
    tsr_status st = check_types(act_type, n_in);
    if (st) return st;
    const tsr_cpu_ops *o = ops();
    size_t row = tsr_row_size(act_type, n_in);
    int64_t t0, t1;
    tsr_thread_slice(&t0, &t1, n_tok, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++) {
        void *dst = (char *)xp + t * row;
        const float *src = x + t * n_in;
        switch (act_type) {
        case TSR_DTYPE_F32:
            if (dst != src) memcpy(dst, src, row);
            break;
        case TSR_DTYPE_F16: o->fp32_to_fp16_row(dst, src, n_in); break;
        case TSR_DTYPE_BF16: o->fp32_to_bf16_row(dst, src, n_in); break;
        }
    }
    return TSR_OK;
}

void tsr_stream_row_pairs(tsr_row_pair_fn pair, void *ctx, float *y, const void *w,
                          size_t w_stride, int64_t r0, int64_t r1) {
    const int64_t h = (r1 - r0 + 1) / 2;
    for (int64_t i = r0; i < r0 + h; i++) {
        float v[2];
        int n_r = i + h < r1 ? 2 : 1;
        pair(ctx, v, (const char *)w + i * w_stride, (size_t)h * w_stride, n_r);
        y[i] = v[0];
        if (n_r == 2) y[i + h] = v[1];
    }
}

typedef struct tile_pair {
    tsr_mm_tile_fn tile;
    const void *x;
    int64_t n_in;
} tile_pair;

static void tile_pair_run(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    const tile_pair *p = ctx;
    p->tile(v, 2, w, partner, p->x, 0, p->n_in, n_r, 1);
}

void tsr_stream_rows(tsr_mm_tile_fn tile, float *y, const void *w, size_t w_stride,
                     const void *x, int64_t n_in, int64_t r0, int64_t r1) {
    tile_pair p = {tile, x, n_in};
    tsr_stream_row_pairs(tile_pair_run, &p, y, w, w_stride, r0, r1);
}

/* Rows outside, tokens inside: a tile's weight rows stay in cache while every token passes. */
tsr_status tsr_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                      int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth) {
    if (tsr_quant_mm_index(wtype) >= 0) /* GGUF block types, Q8_0 included: quants_dot.c */
        return tsr_quant_matmul(y, ldy, w, wtype, xp, n_tok, n_in, n_out, ith, nth);
    tsr_status st = check_types(wtype, n_in);
    if (st) return st;
    if (ldy < n_out) return TSR_E_INVALID;
    const tsr_cpu_ops *o = ops();
    tsr_mm_tile_fn tile = o->mm_tile[mm_index(wtype)];
    size_t w_stride = tsr_row_size(wtype, n_in);
    size_t x_stride = tsr_row_size(tsr_matmul_act_type(wtype), n_in);
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 16, ith, nth);
    if (n_tok == 1) {
        tsr_stream_rows(tile, y, w, w_stride, xp, n_in, r0, r1);
        return TSR_OK;
    }
    for (int64_t r = r0; r < r1; r += o->tile_rows) {
        int n_r = (int)(r1 - r < o->tile_rows ? r1 - r : o->tile_rows);
        for (int64_t t = 0; t < n_tok; t += o->tile_toks) {
            int n_t = (int)(n_tok - t < o->tile_toks ? n_tok - t : o->tile_toks);
            tile(y + t * ldy + r, ldy, (const char *)w + r * w_stride, w_stride,
                 (const char *)xp + t * x_stride, x_stride, n_in, n_r, n_t);
        }
    }
    return TSR_OK;
}

float tsr_row_dot(int32_t wtype, int64_t n, const void *w, const void *xp) {
    if (tsr_quant_mm_index(wtype) >= 0) return tsr_quant_row_dot(wtype, n, w, xp);
    float y = 0.0f;
    if (check_types(wtype, n)) return 0.0f;
    size_t stride = tsr_row_size(wtype, n);
    ops()->mm_tile[mm_index(wtype)](&y, 1, w, stride, xp, stride, n, 1, 1);
    return y;
}

/* ---------------------------------------------------------------------------------------- */

void tsr_rms_norm(float *y, const float *x, const float *w, int64_t n_rows, int64_t n, float eps,
                  int ith, int nth) {
    const tsr_cpu_ops *o = ops();
    int64_t i0, i1;
    tsr_thread_slice(&i0, &i1, n_rows, 1, ith, nth);
    for (int64_t i = i0; i < i1; i++) o->rms_norm_row(y + i * n, x + i * n, w, n, eps);
}

void tsr_softmax(float *y, const float *x, int64_t n_rows, int64_t n, int ith, int nth) {
    const tsr_cpu_ops *o = ops();
    int64_t i0, i1;
    tsr_thread_slice(&i0, &i1, n_rows, 1, ith, nth);
    for (int64_t i = i0; i < i1; i++) o->softmax_row(y + i * n, x + i * n, n);
}

void tsr_silu(float *y, const float *x, int64_t n) {
    ops()->silu_row(y, x, n);
}

void tsr_swiglu(float *y, const float *g, const float *u, int64_t n) {
    ops()->swiglu_row(y, g, u, n);
}

float tsr_dot_f32(const float *x, const float *y, int64_t n) {
    return ops()->dot_f32(x, y, n);
}

float tsr_dot_f16(const uint16_t *x, const uint16_t *y, int64_t n) {
    return ops()->dot_f16(x, y, n);
}

void tsr_axpy_f32(float *y, float a, const float *x, int64_t n) {
    ops()->axpy_f32(y, a, x, n);
}

void tsr_axpy_f16(float *y, float a, const uint16_t *x, int64_t n) {
    ops()->axpy_f16(y, a, x, n);
}
