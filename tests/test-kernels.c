/* CPU kernels: every SIMD level against the scalar reference, the reference against exact
 * (double) formulas, and results independent of threads and tiling. */
#include <tessera/kernels_cpu.h>

#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_levels.h"
#include "testutil.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t g_rng;

static void rng_seed(uint64_t s) {
    g_rng = s * 0x9e3779b97f4a7c15ull + 1;
}


static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = tsr_test_rng_unit(&g_rng) * scale;
}

/* The SIMD levels this machine runs; the scalar one is the reference. */
static int simd_levels(tsr_cpu_level out[2]) {
    int n = 0;
    for (int l = TSR_CPU_LEVEL_AVX2; l <= (int)tsr_cpu_level_best(); l++) out[n++] = l;
    return n;
}

static void use_level(tsr_cpu_level l) {
    ck_assert_int_eq(tsr_cpu_level_set(l), TSR_OK);
    ck_assert_int_eq(tsr_cpu_level_get(), l);
}

/* ---- dispatch --------------------------------------------------------------------------- */

START_TEST(test_level) {
    tsr_cpu_level best = tsr_cpu_level_best();
#if defined(__x86_64__)
    /* the compiler's view of cpuid, as far as it knows the features */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        ck_assert_int_ge(best, TSR_CPU_LEVEL_AVX2);
    else
        ck_assert_int_eq(best, TSR_CPU_LEVEL_SCALAR);
    if (best == TSR_CPU_LEVEL_AVX512)
        ck_assert(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"));
    else if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        ck_assert_int_eq(best, TSR_CPU_LEVEL_AVX2); /* only BF16 can be missing */
#endif
    ck_assert_str_eq(tsr_cpu_level_name(TSR_CPU_LEVEL_SCALAR), "scalar");
    ck_assert_str_eq(tsr_cpu_level_name(TSR_CPU_LEVEL_AVX2), "avx2");
    ck_assert_str_eq(tsr_cpu_level_name(TSR_CPU_LEVEL_AVX512), "avx512");
    ck_assert_str_eq(tsr_cpu_level_name((tsr_cpu_level)7), "?");
    ck_assert_int_eq(tsr_cpu_level_set((tsr_cpu_level)3), TSR_E_INVALID);
    ck_assert_int_eq(tsr_cpu_level_set((tsr_cpu_level)-1), TSR_E_INVALID);
    use_level(TSR_CPU_LEVEL_SCALAR);
    if (best < TSR_CPU_LEVEL_AVX512) {
        ck_assert_int_eq(tsr_cpu_level_set(TSR_CPU_LEVEL_AVX512), TSR_E_UNSUPPORTED);
        ck_assert_int_eq(tsr_cpu_level_get(), TSR_CPU_LEVEL_SCALAR);
    }
    use_level(best);
}
END_TEST

/* Check forks each test, so the level is still unset when this one starts. */
START_TEST(test_level_env) {
    const char *fork = getenv("CK_FORK");
    if (fork && strcmp(fork, "no") == 0) return;
    setenv("TESSERA_CPU_LEVEL", "scalar", 1);
    ck_assert_int_eq(tsr_cpu_level_get(), TSR_CPU_LEVEL_SCALAR);
}
END_TEST

START_TEST(test_level_env_unknown) {
    const char *fork = getenv("CK_FORK");
    if (fork && strcmp(fork, "no") == 0) return;
    setenv("TESSERA_CPU_LEVEL", "sse9", 1);
    ck_assert_int_eq(tsr_cpu_level_get(), tsr_cpu_level_best());
}
END_TEST

START_TEST(test_thread_slice) {
    const int64_t ns[] = {0, 1, 5, 16, 17, 100, 1000};
    const int64_t aligns[] = {1, 4, 16};
    for (size_t a = 0; a < 3; a++)
        for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
            for (int nth = 1; nth <= 5; nth++) {
                int64_t next = 0;
                for (int ith = 0; ith < nth; ith++) {
                    int64_t b, e;
                    tsr_thread_slice(&b, &e, ns[i], aligns[a], ith, nth);
                    ck_assert_int_eq(b, next);
                    ck_assert_int_le(b, e);
                    ck_assert(b % aligns[a] == 0 || b == ns[i]);
                    next = e;
                }
                ck_assert_int_eq(next, ns[i]);
            }
    int64_t b, e;
    tsr_thread_slice(&b, &e, 10, 1, 3, 3);
    ck_assert_int_eq(b, e);
}
END_TEST

/* ---- conversions ------------------------------------------------------------------------ */

/* fp16 -> fp32 of every value against the definition, the round trip, and every SIMD row
 * conversion (both directions) bit-identical to the scalar one. */
START_TEST(test_fp16_exhaustive) {
    static uint16_t h[65536], h2[65536];
    static float f[65536];
    for (uint32_t i = 0; i < 65536; i++) {
        h[i] = (uint16_t)i;
        uint32_t e = (i >> 10) & 31, m = i & 1023;
        float v = tsr_fp16_to_fp32(h[i]);
        ck_assert_int_eq(signbit(v) != 0, (i & 0x8000) != 0);
        if (e == 31 && m) {
            ck_assert(isnan(v));
            ck_assert_uint_eq(f32_bits(v), ((i & 0x8000u) << 16) | 0x7fc00000u | (m << 13));
            ck_assert_uint_eq(tsr_fp32_to_fp16(v), i | 0x200);
            continue;
        }
        double want = e == 31 ? INFINITY : e ? ldexp(1024 + m, (int)e - 25) : ldexp(m, -24);
        ck_assert(fabs((double)v) == want);
        ck_assert_uint_eq(tsr_fp32_to_fp16(v), i);
    }
    use_level(TSR_CPU_LEVEL_SCALAR);
    tsr_fp16_to_fp32_row(f, h, 65536);
    tsr_fp32_to_fp16_row(h2, f, 65536);
    tsr_cpu_level lv[2];
    for (int l = 0; l < simd_levels(lv); l++) {
        use_level(lv[l]);
        static float g[65536];
        static uint16_t g2[65536];
        tsr_fp16_to_fp32_row(g, h, 65536);
        ck_assert_int_eq(memcmp(g, f, sizeof g), 0);
        tsr_fp32_to_fp16_row(g2, f, 65536);
        ck_assert_int_eq(memcmp(g2, h2, sizeof g2), 0);
    }
}
END_TEST

/* Ties between neighbouring halves go to the even one; overflow and underflow edges. */
START_TEST(test_fp32_to_fp16_rounding) {
    for (uint32_t a = 0; a < 0x7bff; a++) {
        double lo = tsr_fp16_to_fp32((uint16_t)a), hi = tsr_fp16_to_fp32((uint16_t)(a + 1));
        float mid = (float)((lo + hi) / 2); /* exact: 12 significant bits */
        uint16_t even = (a & 1) ? (uint16_t)(a + 1) : (uint16_t)a;
        ck_assert_uint_eq(tsr_fp32_to_fp16(mid), even);
        ck_assert_uint_eq(tsr_fp32_to_fp16(-mid), even | 0x8000);
        ck_assert_uint_eq(tsr_fp32_to_fp16(nextafterf(mid, 0)), a);
        ck_assert_uint_eq(tsr_fp32_to_fp16(nextafterf(mid, INFINITY)), a + 1);
    }
    ck_assert_uint_eq(tsr_fp32_to_fp16(65520.0f), 0x7c00);
    ck_assert_uint_eq(tsr_fp32_to_fp16(nextafterf(65520.0f, 0)), 0x7bff);
    ck_assert_uint_eq(tsr_fp32_to_fp16(1e30f), 0x7c00);
    ck_assert_uint_eq(tsr_fp32_to_fp16(-INFINITY), 0xfc00);
    ck_assert_uint_eq(tsr_fp32_to_fp16(0x1p-25f), 0x0000);            /* tie with 0: even */
    ck_assert_uint_eq(tsr_fp32_to_fp16(nextafterf(0x1p-25f, 1)), 1);
    ck_assert_uint_eq(tsr_fp32_to_fp16(-0.0f), 0x8000);
    ck_assert_uint_eq(tsr_fp32_to_fp16(bits_f32(1)), 0);              /* smallest fp32 */
}
END_TEST

/* Random bit patterns (NaNs, subnormals, everything): SIMD rows equal scalar. */
START_TEST(test_conversions_simd) {
    enum { N = 1 << 20 };
    float *x = malloc(N * sizeof *x), *a = malloc(N * sizeof *a), *b = malloc(N * sizeof *b);
    uint16_t *h = malloc(N * sizeof *h), *g = malloc(N * sizeof *g), *s = malloc(N * 2);
    rng_seed(1);
    for (int i = 0; i < N; i++) {
        x[i] = bits_f32((uint32_t)tsr_test_rng_u64(&g_rng));
        s[i] = (uint16_t)tsr_test_rng_u64(&g_rng);
    }
    int64_t n = N - 5; /* a ragged tail */
    use_level(TSR_CPU_LEVEL_SCALAR);
    tsr_fp32_to_fp16_row(h, x, n);
    uint16_t *hb = malloc(N * 2);
    tsr_fp32_to_bf16_row(hb, x, n);
    tsr_bf16_to_fp32_row(a, s, n);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_uint_eq(f32_bits(a[i]), (uint32_t)s[i] << 16);
        ck_assert_uint_eq(hb[i], tsr_fp32_to_bf16(x[i]));
        if (isnan(x[i])) ck_assert_uint_eq(hb[i] & 0x7fc0u, 0x7fc0u);
    }
    tsr_cpu_level lv[2];
    for (int l = 0; l < simd_levels(lv); l++) {
        use_level(lv[l]);
        tsr_fp32_to_fp16_row(g, x, n);
        ck_assert_int_eq(memcmp(g, h, n * 2), 0);
        tsr_fp32_to_bf16_row(g, x, n);
        ck_assert_int_eq(memcmp(g, hb, n * 2), 0);
        tsr_bf16_to_fp32_row(b, s, n);
        ck_assert_int_eq(memcmp(b, a, n * 4), 0);
    }
    free(x), free(a), free(b), free(h), free(g), free(s), free(hb);
}
END_TEST

START_TEST(test_bf16_rounding) {
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x3f808000)), 0x3f80); /* tie, even below */
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x3f818000)), 0x3f82); /* tie, even above */
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x3f808001)), 0x3f81);
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x7f7fffff)), 0x7f80); /* max -> inf */
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x00008000)), 0x0000); /* subnormal tie */
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0x00018000)), 0x0002);
    ck_assert_uint_eq(tsr_fp32_to_bf16(bits_f32(0xff800001)), 0xffc0); /* sNaN -> qNaN */
    ck_assert_uint_eq(tsr_fp32_to_bf16(-INFINITY), 0xff80);
    ck_assert(tsr_bf16_to_fp32(0x3fc0) == 1.5f);
}
END_TEST

/* ---- Q8_0 ------------------------------------------------------------------------------- */

START_TEST(test_q8_0_quantize) {
    enum { NB = 67, N = NB * 32 };
    float *x = malloc(N * sizeof *x), *dq = malloc(N * sizeof *dq);
    tsr_block_q8_0 *ref = malloc(NB * sizeof *ref), *got = malloc(NB * sizeof *got);
    rng_seed(2);
    for (int b = 0; b < NB; b++) {
        float scale = b == 5 ? 0.0f : ldexpf(1.0f, (int)(tsr_test_rng_u64(&g_rng) % 40) - 20);
        fill(x + b * 32, 32, scale);
    }
    for (int i = 0; i < 32; i++) x[7 * 32 + i] = (float)(i - 16) * 0.5f; /* exact ties */
    use_level(TSR_CPU_LEVEL_SCALAR);
    tsr_q8_0_quantize_row(ref, x, N);
    for (int b = 0; b < NB; b++) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
        ck_assert_uint_eq(ref[b].d, tsr_fp32_to_fp16(amax / 127.0f));
        for (int i = 0; i < 32; i++) {
            float want = amax == 0.0f ? 0.0f : rintf(x[b * 32 + i] * (127.0f / amax));
            ck_assert_int_eq(ref[b].q[i], (int)want);
            ck_assert_int_le(abs(ref[b].q[i]), 127);
        }
    }
    ck_assert_uint_eq(ref[5].d, 0);
    /* 16/127*-0.5*... : x = 0.5*(i-16), amax = 8; q = rint((i-16)*0.5*127/8) */
    ck_assert_int_eq(ref[7].q[0], -127);
    tsr_q8_0_dequantize_row(dq, ref, N);
    for (int i = 0; i < N; i++)
        ck_assert(dq[i] == tsr_fp16_to_fp32(ref[i / 32].d) * ref[i / 32].q[i % 32]);
    tsr_cpu_level lv[2];
    for (int l = 0; l < simd_levels(lv); l++) {
        use_level(lv[l]);
        memset(got, 0x55, NB * sizeof *got);
        tsr_q8_0_quantize_row(got, x, N);
        ck_assert_int_eq(memcmp(got, ref, NB * sizeof *ref), 0);
    }
    free(x), free(dq), free(ref), free(got);
}
END_TEST

/* ---- matrix products -------------------------------------------------------------------- */

static const int32_t k_types[] = {TSR_DTYPE_F32, TSR_DTYPE_F16, TSR_DTYPE_BF16, TSR_DTYPE_Q8_0};

/* Weights of `type` for an (n_out, n_in) matrix. Q8_0 quants cover [-128, 127]. */
static void *make_weights(int32_t type, int64_t n_out, int64_t n_in) {
    size_t row = tsr_row_size(type, n_in);
    char *w = malloc(row * n_out + 1);
    for (int64_t r = 0; r < n_out; r++) {
        void *dst = w + r * row;
        if (type == TSR_DTYPE_Q8_0) {
            tsr_block_q8_0 *b = dst;
            for (int64_t i = 0; i < n_in / 32; i++) {
                b[i].d = tsr_fp32_to_fp16(ldexpf(1.0f + tsr_test_rng_unit(&g_rng) * 0.5f, -9));
                for (int j = 0; j < 32; j++) b[i].q[j] = (int8_t)(tsr_test_rng_u64(&g_rng) & 0xff);
            }
            continue;
        }
        for (int64_t i = 0; i < n_in; i++) {
            float v = tsr_test_rng_unit(&g_rng);
            if (type == TSR_DTYPE_F32) ((float *)dst)[i] = v;
            if (type == TSR_DTYPE_F16) ((uint16_t *)dst)[i] = tsr_fp32_to_fp16(v);
            if (type == TSR_DTYPE_BF16) ((uint16_t *)dst)[i] = tsr_fp32_to_bf16(v);
        }
    }
    return w;
}

/* Element k of a row of `type` as a double, and the exact terms of a dot. */
static double elem(int32_t type, const void *row, int64_t k) {
    switch (type) {
    case TSR_DTYPE_F32: return ((const float *)row)[k];
    case TSR_DTYPE_F16: return tsr_fp16_to_fp32(((const uint16_t *)row)[k]);
    case TSR_DTYPE_BF16: return tsr_bf16_to_fp32(((const uint16_t *)row)[k]);
    default: {
        const tsr_block_q8_0 *b = (const tsr_block_q8_0 *)row + k / 32;
        return b->q[k % 32];
    }
    }
}

/* sum and sum of |terms| in double: for Q8_0, per block d_w*d_x (in f32, as the format
 * defines it) times the exact integer dot. */
static void dot_exact(int32_t type, const void *w, const void *x, int64_t n, double *sum,
                      double *abs_sum) {
    *sum = *abs_sum = 0.0;
    for (int64_t k = 0; k < n; k++) {
        double t = elem(type, w, k) * elem(type, x, k);
        if (type == TSR_DTYPE_Q8_0) {
            const tsr_block_q8_0 *bw = (const tsr_block_q8_0 *)w + k / 32;
            const tsr_block_q8_0 *bx = (const tsr_block_q8_0 *)x + k / 32;
            t *= tsr_fp16_to_fp32(bw->d) * tsr_fp16_to_fp32(bx->d);
        }
        *sum += t;
        *abs_sum += fabs(t);
    }
}

typedef struct shape {
    int64_t n_in, n_out, n_tok;
} shape;

static const shape k_shapes[] = {{32, 1, 1},   {7, 3, 2},    {64, 7, 3},   {96, 13, 5},
                                 {33, 9, 3},   {100, 17, 7}, {288, 17, 4}, {257, 6, 9},
                                 {512, 40, 1}, {1000, 12, 6}, {1024, 5, 2}, {64, 13, 1}};

/* y for one (type, shape) at the current level; xp is returned for the reference. */
static float *run_matmul(int32_t type, const void *w, const float *x, shape s, void **xp_out,
                         int nth) {
    int32_t at = tsr_matmul_act_type(type);
    void *xp = malloc(tsr_row_size(at, s.n_in) * s.n_tok + 1);
    for (int ith = 0; ith < nth; ith++)
        ck_assert_int_eq(tsr_matmul_prepare(xp, at, x, s.n_tok, s.n_in, ith, nth), TSR_OK);
    float *y = malloc(s.n_tok * (s.n_out + 3) * sizeof *y);
    for (int64_t i = 0; i < s.n_tok * (s.n_out + 3); i++) y[i] = -7.0f;
    for (int ith = 0; ith < nth; ith++)
        ck_assert_int_eq(tsr_matmul(y, s.n_out + 3, w, type, xp, s.n_tok, s.n_in, s.n_out, ith,
                                    nth),
                         TSR_OK);
    for (int64_t t = 0; t < s.n_tok; t++) /* the columns past n_out are untouched */
        for (int64_t c = s.n_out; c < s.n_out + 3; c++)
            ck_assert(y[t * (s.n_out + 3) + c] == -7.0f);
    if (xp_out)
        *xp_out = xp;
    else
        free(xp);
    return y;
}

/* Every level against exact sums: the reference within 1 ulp of the exact value (double
 * sum; Q8_0 within 1e-6 of sum|terms| for its f32 block scaling), SIMD within 4 * FLT_EPSILON
 * * sum|terms| (f32 lanes), and Q8_0 SIMD bit-identical to the reference. */
START_TEST(test_matmul_levels) {
    int32_t type = k_types[_i];
    rng_seed(10 + (uint64_t)_i);
    tsr_cpu_level lv[2];
    int n_lv = simd_levels(lv);
    for (size_t si = 0; si < sizeof k_shapes / sizeof k_shapes[0]; si++) {
        shape s = k_shapes[si];
        if (tsr_row_size(type, s.n_in) == 0) continue;
        void *w = make_weights(type, s.n_out, s.n_in);
        float *x = malloc(s.n_in * s.n_tok * sizeof *x);
        fill(x, s.n_in * s.n_tok, 2.0f);
        size_t wrow = tsr_row_size(type, s.n_in);
        use_level(TSR_CPU_LEVEL_SCALAR);
        void *xp;
        float *ref = run_matmul(type, w, x, s, &xp, 1);
        for (int64_t t = 0; t < s.n_tok; t++)
            for (int64_t r = 0; r < s.n_out; r++) {
                double sum, abs_sum;
                const char *xr = (const char *)xp + t * wrow;
                dot_exact(type, (const char *)w + r * wrow, xr, s.n_in, &sum, &abs_sum);
                float y = ref[t * (s.n_out + 3) + r];
                double tol = type == TSR_DTYPE_Q8_0
                                 ? 1e-6 * abs_sum
                                 : fabs(sum) * FLT_EPSILON * 0.5 + 1e-12 * abs_sum;
                ck_assert_msg(fabs(y - sum) <= tol, "ref type %d shape %zu: %g vs %g", type,
                              si, y, sum);
                ck_assert(y == tsr_row_dot(type, s.n_in, (const char *)w + r * wrow, xr));
                for (int l = 0; l < n_lv; l++) {
                    use_level(lv[l]);
                    float ys = tsr_row_dot(type, s.n_in, (const char *)w + r * wrow, xr);
                    if (type == TSR_DTYPE_Q8_0)
                        ck_assert(f32_bits(ys) == f32_bits(y));
                    else
                        ck_assert_msg(fabs(ys - sum) <= 4 * FLT_EPSILON * abs_sum,
                                      "%s type %d shape %zu: %g vs %g",
                                      tsr_cpu_level_name(lv[l]), type, si, ys, sum);
                    use_level(TSR_CPU_LEVEL_SCALAR);
                }
            }
        for (int l = 0; l < n_lv; l++) {
            use_level(lv[l]);
            void *xps;
            float *y = run_matmul(type, w, x, s, &xps, 1);
            /* prepared activations are the same bits at every level */
            ck_assert_int_eq(memcmp(xps, xp, wrow * s.n_tok), 0);
            for (int64_t t = 0; t < s.n_tok; t++)
                for (int64_t r = 0; r < s.n_out; r++) {
                    float got = y[t * (s.n_out + 3) + r];
                    /* the tiled product equals the single row dot bit for bit */
                    ck_assert(f32_bits(got) == f32_bits(tsr_row_dot(
                                                   type, s.n_in, (const char *)w + r * wrow,
                                                   (const char *)xp + t * wrow)));
                    if (type == TSR_DTYPE_Q8_0)
                        ck_assert(f32_bits(got) == f32_bits(ref[t * (s.n_out + 3) + r]));
                }
            free(y), free(xps);
        }
        free(ref), free(xp), free(w), free(x);
    }
}
END_TEST

/* nth = 1, 2, 3, 5: bit-identical products at every level, for a batch and for one token
 * (decode's two-stream order; 70 rows make slices of odd length). */
START_TEST(test_matmul_threads) {
    int32_t type = k_types[_i];
    rng_seed(20 + (uint64_t)_i);
    for (int64_t n_tok = 7; n_tok >= 1; n_tok -= 6) {
        shape s = {type == TSR_DTYPE_Q8_0 ? 96 : 100, 70, n_tok};
        void *w = make_weights(type, s.n_out, s.n_in);
        float *x = malloc(s.n_in * s.n_tok * sizeof *x);
        fill(x, s.n_in * s.n_tok, 1.0f);
        for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
            use_level(l);
            float *y1 = run_matmul(type, w, x, s, NULL, 1);
            const int nths[] = {2, 3, 5};
            for (int i = 0; i < 3; i++) {
                float *yn = run_matmul(type, w, x, s, NULL, nths[i]);
                ck_assert_int_eq(memcmp(yn, y1, s.n_tok * (s.n_out + 3) * sizeof *y1), 0);
                free(yn);
            }
            free(y1);
        }
        free(w), free(x);
    }
}
END_TEST

START_TEST(test_matmul_errors) {
    float y[4], x[4] = {0};
    char w[64] = {0};
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_I8), -1);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q8_0), TSR_DTYPE_Q8_0);
    ck_assert_int_eq(tsr_matmul_prepare(w, TSR_DTYPE_Q4_0, x, 1, 32, 0, 1), TSR_E_UNSUPPORTED);
    ck_assert_int_eq(tsr_matmul_prepare(w, TSR_DTYPE_Q8_0, x, 1, 31, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_matmul(y, 1, w, TSR_DTYPE_Q8_0, w, 1, 33, 1, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_matmul(y, 1, w, TSR_DTYPE_F32, w, 1, 4, 2, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_matmul(y, 1, w, TSR_DTYPE_I8, w, 1, 4, 1, 0, 1), TSR_E_UNSUPPORTED);
    ck_assert_uint_eq(tsr_row_size(TSR_DTYPE_Q8_0, 64), 68);
    ck_assert_uint_eq(tsr_row_size(TSR_DTYPE_BF16, 5), 10);
    ck_assert_uint_eq(tsr_row_size(TSR_DTYPE_I32, 256), 0);
    ck_assert(tsr_row_dot(TSR_DTYPE_Q4_0, 32, w, w) == 0.0f);
}
END_TEST

/* ---- F16 / BF16 panels: the fast order ----------------------------------------------------- */

static const int32_t panel_types[] = {TSR_DTYPE_F16, TSR_DTYPE_BF16};

/* Rows not a multiple of 16 or 32, tokens not a multiple of a tile (8 at avx512, 6 at avx2) nor of
 * a prepared block, odd n_in, n_in over TSR_PANEL_K (the chain crosses chunks), more tokens
 * than one run of the panels (512), and decode's one and two tokens over pairs of panels (an
 * odd count: the last alone, part of a panel; an even one). */
static const shape panel_shapes[] = {{1, 16, 1},   {7, 3, 2},     {33, 17, 5},  {100, 40, 17},
                                     {257, 13, 23}, {64, 32, 16}, {1000, 70, 9}, {15, 5, 33},
                                     {TSR_PANEL_K + 37, 20, 7}, {70, 40, 530}, {300, 70, 1},
                                     {130, 200, 2}, {TSR_PANEL_K + 5, 128, 1}};

/* tsr_panel_pack, tsr_panel_prepare then tsr_panel_matmul at the current level, nth slices
 * each; y has 3 columns past n_out, which must stay untouched. */
static float *run_panel(int32_t type, const void *w, const float *x, shape s, int nth) {
    void *p = malloc(tsr_panel_bytes(s.n_in, s.n_out));
    const int64_t panels = (s.n_out + TSR_PANEL_ROWS - 1) / TSR_PANEL_ROWS;
    for (int ith = 0; ith < nth; ith++)
        tsr_panel_pack(p, w, s.n_in, s.n_out, panels * ith / nth, panels * (ith + 1) / nth);
    float *xp = malloc(tsr_panel_act_bytes(s.n_tok, s.n_in));
    for (int ith = 0; ith < nth; ith++)
        ck_assert_int_eq(tsr_panel_prepare(xp, type, x, s.n_tok, s.n_in, ith, nth), TSR_OK);
    const int64_t ldy = s.n_out + 3;
    float *y = malloc((size_t)(s.n_tok * ldy) * sizeof *y);
    for (int64_t i = 0; i < s.n_tok * ldy; i++) y[i] = -7.0f;
    for (int ith = 0; ith < nth; ith++)
        ck_assert_int_eq(
            tsr_panel_matmul(y, ldy, p, type, xp, s.n_tok, s.n_in, s.n_out, ith, nth), TSR_OK);
    for (int64_t t = 0; t < s.n_tok; t++)
        for (int64_t c = s.n_out; c < ldy; c++) ck_assert(y[t * ldy + c] == -7.0f);
    free(xp);
    free(p);
    return y;
}

/* The reference is one fmaf chain in k order over the rounded activations: with x = 1 + 2^-12
 * (1 in F16 and BF16), [1, 2^-24, 2^-24] gives 1 (each 2^-24 is half an ulp, a tie to even)
 * where another order gives 1 + 2^-23; and it is the exact sum within n ulps. */
START_TEST(test_panel_reference) {
    for (int i = 0; i < 2; i++) {
        const int32_t type = panel_types[i];
        uint16_t (*enc)(float) = type == TSR_DTYPE_F16 ? tsr_fp32_to_fp16 : tsr_fp32_to_bf16;
        const float x[3] = {1.0f + 0x1p-12f, 1.0f + 0x1p-12f, 1.0f + 0x1p-12f};
        uint16_t w[3] = {enc(1.0f), enc(0x1p-24f), enc(0x1p-24f)};
        ck_assert(tsr_panel_row_dot_ref(type, 3, w, x) == 1.0f);
        uint16_t back[3] = {enc(0x1p-24f), enc(0x1p-24f), enc(1.0f)};
        ck_assert(tsr_panel_row_dot_ref(type, 3, back, x) == 1.0f + 0x1p-23f);
        ck_assert(tsr_panel_row_dot_ref(TSR_DTYPE_F32, 3, w, x) == 0.0f);
        rng_seed(40 + (uint64_t)i);
        const int64_t n = 1000;
        void *wr = make_weights(type, 1, n);
        float xr[1000], wf[1000];
        fill(xr, n, 2.0f);
        ck_assert_int_eq(tsr_row_to_f32(wf, type, wr, n), TSR_OK);
        double sum = 0, abs_sum = 0;
        for (int64_t k = 0; k < n; k++) {
            uint16_t xh = enc(xr[k]);
            double term = (double)wf[k] * (type == TSR_DTYPE_F16 ? tsr_fp16_to_fp32(xh)
                                                                 : tsr_bf16_to_fp32(xh));
            sum += term;
            abs_sum += fabs(term);
        }
        ck_assert(fabs(tsr_panel_row_dot_ref(type, n, wr, xr) - sum) <= n * FLT_EPSILON * abs_sum);
        free(wr);
    }
}
END_TEST

/* The prepared layout: block b, element k, token t at b * 16 * n_in + k * n_b + t, n_b 16 but
 * in the last block (5 of 21 tokens), rounded to the weights' type; nothing written past the
 * last token; the same bits at every level and in any slicing. */
START_TEST(test_panel_prepare_layout) {
    const int64_t n_tok = 21, n_in = 300;
    float x[21 * 300];
    rng_seed(41);
    fill(x, n_tok * n_in, 3.0f);
    const size_t bytes = tsr_panel_act_bytes(n_tok, n_in);
    ck_assert_uint_eq(bytes, 32 * 300 * sizeof(float));
    ck_assert_uint_eq(tsr_panel_act_bytes(16, 5), 16 * 5 * sizeof(float));
    float *ref = malloc(bytes), *got = malloc(bytes);
    for (int i = 0; i < 2; i++) {
        const int32_t type = panel_types[i];
        use_level(TSR_CPU_LEVEL_SCALAR);
        memset(ref, 0xff, bytes);
        ck_assert_int_eq(tsr_panel_prepare(ref, type, x, n_tok, n_in, 0, 1), TSR_OK);
        for (int64_t b = 0; b < 2; b++) {
            const int64_t n_b = b ? n_tok - 16 : 16;
            for (int64_t k = 0; k < n_in; k++)
                for (int64_t t = 0; t < n_b; t++) {
                    const int64_t tok = b * 16 + t;
                    const float v = ref[b * 16 * n_in + k * n_b + t];
                    const float xv = x[tok * n_in + k];
                    const float want = type == TSR_DTYPE_F16
                                           ? tsr_fp16_to_fp32(tsr_fp32_to_fp16(xv))
                                           : tsr_bf16_to_fp32(tsr_fp32_to_bf16(xv));
                    ck_assert(f32_bits(v) == f32_bits(want));
                }
        }
        for (int64_t at = 21 * n_in; at < 32 * n_in; at++)
            ck_assert_uint_eq(f32_bits(ref[at]), 0xffffffffu);
        for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
            use_level(l);
            for (int nth = 1; nth <= 3; nth++) {
                memset(got, 0xff, bytes);
                for (int ith = 0; ith < nth; ith++)
                    ck_assert_int_eq(tsr_panel_prepare(got, type, x, n_tok, n_in, ith, nth),
                                     TSR_OK);
                ck_assert_int_eq(memcmp(got, ref, bytes), 0);
            }
        }
    }
    free(ref), free(got);
}
END_TEST

/* Every level (the scalar one too, which runs the blocking with its own build and tile) gives
 * the reference's bits for every (row, token). */
START_TEST(test_panel_levels_equal_reference) {
    const int32_t type = panel_types[_i];
    rng_seed(42 + (uint64_t)_i);
    for (size_t si = 0; si < sizeof panel_shapes / sizeof *panel_shapes; si++) {
        const shape s = panel_shapes[si];
        void *w = make_weights(type, s.n_out, s.n_in);
        float *x = malloc((size_t)(s.n_in * s.n_tok) * sizeof *x);
        fill(x, s.n_in * s.n_tok, 2.0f);
        const size_t wrow = tsr_row_size(type, s.n_in);
        for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
            use_level(l);
            float *y = run_panel(type, w, x, s, 1);
            for (int64_t t = 0; t < s.n_tok; t++)
                for (int64_t r = 0; r < s.n_out; r++) {
                    float ref = tsr_panel_row_dot_ref(type, s.n_in, (const char *)w + r * wrow,
                                                      x + t * s.n_in);
                    float got = y[t * (s.n_out + 3) + r];
                    ck_assert_msg(f32_bits(got) == f32_bits(ref),
                                  "%s type %d shape %zu (t %lld, r %lld): %.9g vs %.9g",
                                  tsr_cpu_level_name(l), type, si, (long long)t, (long long)r,
                                  got, ref);
                }
            free(y);
        }
        free(w), free(x);
    }
}
END_TEST

/* A (row, token) value is the same whatever the thread slice and the batch it comes in: nth 1,
 * 2, 3, 5 over 70 rows (odd slices, a partial last block), and tokens [5, 5 + m) run alone. */
START_TEST(test_panel_slices_and_batches) {
    const int32_t type = panel_types[_i];
    rng_seed(50 + (uint64_t)_i);
    const shape s = {TSR_PANEL_K + 100, 70, 29};
    void *w = make_weights(type, s.n_out, s.n_in);
    float *x = malloc((size_t)(s.n_in * s.n_tok) * sizeof *x);
    fill(x, s.n_in * s.n_tok, 1.0f);
    const int64_t ldy = s.n_out + 3;
    for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
        use_level(l);
        float *y1 = run_panel(type, w, x, s, 1);
        const int nths[] = {2, 3, 5};
        for (int i = 0; i < 3; i++) {
            float *yn = run_panel(type, w, x, s, nths[i]);
            ck_assert_int_eq(memcmp(yn, y1, (size_t)(s.n_tok * ldy) * sizeof *y1), 0);
            free(yn);
        }
        const int64_t sub[] = {1, 6, 17};
        for (int i = 0; i < 3; i++) {
            shape part = {s.n_in, s.n_out, sub[i]};
            float *yp = run_panel(type, w, x + 5 * s.n_in, part, 2);
            for (int64_t t = 0; t < sub[i]; t++)
                ck_assert_int_eq(memcmp(yp + t * ldy, y1 + (5 + t) * ldy,
                                        (size_t)s.n_out * sizeof *yp), 0);
            free(yp);
        }
        free(y1);
    }
    free(w), free(x);
}
END_TEST

/* The panels' layout: panel b, element k, row r at (b * n_in + k) * 32 + r, zeros for the rows
 * past n_out (40: a partial second panel); packed in slices the same; each row unpacks to the
 * file's. */
START_TEST(test_panel_pack_layout) {
    const int64_t n_in = 5, n_out = 40;
    ck_assert_uint_eq(tsr_panel_bytes(n_in, n_out), 2 * 32 * 5 * sizeof(uint16_t));
    ck_assert_uint_eq(tsr_panel_bytes(n_in, 32), 32 * 5 * sizeof(uint16_t));
    uint16_t w[40 * 5], p[64 * 5], q[64 * 5], row[5];
    for (int i = 0; i < 40 * 5; i++) w[i] = (uint16_t)(1000 + i);
    memset(p, 0xff, sizeof p);
    tsr_panel_pack(p, w, n_in, n_out, 0, 2);
    for (int64_t b = 0; b < 2; b++)
        for (int64_t k = 0; k < n_in; k++)
            for (int64_t r = 0; r < 32; r++) {
                const int64_t row_at = 32 * b + r;
                ck_assert_uint_eq(p[(b * n_in + k) * 32 + r],
                                  row_at < n_out ? w[row_at * n_in + k] : 0);
            }
    memset(q, 0xff, sizeof q);
    tsr_panel_pack(q, w, n_in, n_out, 1, 2);
    tsr_panel_pack(q, w, n_in, n_out, 0, 1);
    ck_assert_int_eq(memcmp(p, q, sizeof p), 0);
    for (int64_t r = 0; r < n_out; r++) {
        tsr_panel_unpack_row(row, p, n_in, r);
        ck_assert_int_eq(memcmp(row, w + r * n_in, sizeof row), 0);
    }
}
END_TEST

/* F16 through the panels at every level; BF16 only where the tiles lack vdpbf16ps. */
START_TEST(test_panel_pays) {
    for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
        use_level(l);
        ck_assert_int_eq(tsr_panel_pays(TSR_DTYPE_F16), 1);
        ck_assert_int_eq(tsr_panel_pays(TSR_DTYPE_BF16), l != TSR_CPU_LEVEL_AVX512);
        ck_assert_int_eq(tsr_panel_pays(TSR_DTYPE_F32), 0);
        ck_assert_int_eq(tsr_panel_pays(TSR_DTYPE_Q8_0), 0);
    }
}
END_TEST

START_TEST(test_panel_errors) {
    float y[32] = {0}, xp[64] = {0};
    uint16_t w[64] = {0};
    ck_assert_int_eq(tsr_panel_prepare(xp, TSR_DTYPE_F32, y, 1, 4, 0, 1), TSR_E_UNSUPPORTED);
    ck_assert_int_eq(tsr_panel_prepare(xp, TSR_DTYPE_F16, y, 1, 0, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_panel_prepare(xp, TSR_DTYPE_F16, y, -1, 4, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_panel_matmul(y, 2, w, TSR_DTYPE_Q8_0, xp, 1, 4, 2, 0, 1),
                     TSR_E_UNSUPPORTED);
    ck_assert_int_eq(tsr_panel_matmul(y, 1, w, TSR_DTYPE_F16, xp, 1, 4, 2, 0, 1), TSR_E_INVALID);
    ck_assert_int_eq(tsr_panel_matmul(y, 2, w, TSR_DTYPE_BF16, xp, 1, 0, 2, 0, 1), TSR_E_INVALID);
    /* no tokens, or a thread past the rows: nothing written */
    y[0] = -7.0f;
    ck_assert_int_eq(tsr_panel_matmul(y, 2, w, TSR_DTYPE_F16, xp, 0, 4, 2, 0, 1), TSR_OK);
    ck_assert_int_eq(tsr_panel_matmul(y, 2, w, TSR_DTYPE_F16, xp, 1, 4, 2, 1, 2), TSR_OK);
    ck_assert(y[0] == -7.0f);
}
END_TEST

/* ---- row ops ---------------------------------------------------------------------------- */

/* The reference within 2 ulp of the double formula; SIMD within 2 ulp of the reference (only
 * the order of the sum of squares differs); the weightless form too; rows sliced over threads. */
START_TEST(test_rms_norm) {
    const int64_t ns[] = {1, 7, 16, 64, 100, 4097};
    rng_seed(30);
    tsr_cpu_level lv[2];
    int n_lv = simd_levels(lv);
    for (size_t i = 0; i < 6; i++) {
        int64_t n = ns[i], rows = 3;
        float *x = malloc(rows * n * 4), *w = malloc(n * 4), *ref = malloc(rows * n * 4),
              *y = malloc(rows * n * 4);
        fill(x, rows * n, 3.0f);
        fill(w, n, 1.0f);
        for (int withw = 0; withw < 2; withw++) {
            const float *wp = withw ? w : NULL;
            use_level(TSR_CPU_LEVEL_SCALAR);
            tsr_rms_norm(ref, x, wp, rows, n, 1e-5f, 0, 1);
            for (int64_t r = 0; r < rows; r++) {
                double ss = 0;
                for (int64_t k = 0; k < n; k++) ss += (double)x[r * n + k] * x[r * n + k];
                double sc = 1.0 / sqrt(ss / n + 1e-5);
                for (int64_t k = 0; k < n; k++) {
                    double want = x[r * n + k] * sc * (wp ? wp[k] : 1.0);
                    ck_assert(fabs(ref[r * n + k] - want) <= 2.5 * FLT_EPSILON * fabs(want));
                }
            }
            for (int l = 0; l < n_lv; l++) {
                use_level(lv[l]);
                for (int ith = 0; ith < 2; ith++) tsr_rms_norm(y, x, wp, rows, n, 1e-5f, ith, 2);
                for (int64_t k = 0; k < rows * n; k++)
                    ck_assert(fabsf(y[k] - ref[k]) <= 2 * FLT_EPSILON * fabsf(ref[k]));
            }
        }
        free(x), free(w), free(ref), free(y);
    }
}
END_TEST

START_TEST(test_softmax) {
    rng_seed(31);
    const int64_t n = 37, rows = 4;
    float x[4 * 37], y[4 * 37];
    fill(x, rows * n, 20.0f);
    x[3] = 1e30f; /* the max subtraction keeps this finite */
    for (int l = 0; l <= (int)tsr_cpu_level_best(); l++) {
        use_level(l);
        for (int ith = 0; ith < 3; ith++) tsr_softmax(y, x, rows, n, ith, 3);
        for (int64_t r = 0; r < rows; r++) {
            double mx = -INFINITY, sum = 0;
            for (int64_t k = 0; k < n; k++) mx = fmax(mx, x[r * n + k]);
            for (int64_t k = 0; k < n; k++) sum += exp((double)x[r * n + k] - mx);
            for (int64_t k = 0; k < n; k++) {
                /* x - max is rounded to f32 first: relative error |x - max| * eps / 2 */
                double want = exp((double)x[r * n + k] - mx) / sum;
                double tol = (fabs(x[r * n + k] - mx) / 2 + 4) * FLT_EPSILON * want + 1e-38;
                ck_assert(fabs(y[r * n + k] - want) <= tol);
            }
        }
    }
    memcpy(y, x, sizeof y); /* in place */
    tsr_softmax(y, y, rows, n, 0, 1);
    ck_assert(y[3] == 1.0f);
}
END_TEST

/* ggml's exp: within 2 ulp of exp() over the whole range (absolute 2^-149 for subnormal
 * results), its cut-offs and special values. */
START_TEST(test_expf) {
    for (int64_t k = 0; k <= 400000; k++) {
        float x = -104.0f + (float)k * (193.0f / 400000.0f);
        double want = exp((double)x);
        float got = tsr_expf(x);
        if (want > FLT_MAX) {
            ck_assert_msg(isinf(got), "x %a: %a, want overflow", x, got);
            continue;
        }
        ck_assert_msg(fabs(got - want) <= 2 * FLT_EPSILON * want + 0x1p-149, "x %a: %a vs %a",
                      x, got, want);
    }
    ck_assert(tsr_expf(0.0f) == 1.0f && tsr_expf(-0.0f) == 1.0f);
    ck_assert(tsr_expf(-INFINITY) == 0.0f && tsr_expf(-134.0f) == 0.0f);
    ck_assert(isinf(tsr_expf(INFINITY)) && isinf(tsr_expf(89.0f)) && isinf(tsr_expf(1e30f)));
    ck_assert(isnan(tsr_expf(NAN)));
}
END_TEST

/* Softmax, silu and swiglu: every SIMD level gives the scalar bits, for row lengths with and
 * without a tail, values down to the subnormal range of exp and special values. */
static int same_bits_or_nan(float a, float b) {
    return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof a) == 0;
}

START_TEST(test_exp_ops_levels) {
    tsr_cpu_level lv[2];
    int n_lv = simd_levels(lv);
    const int64_t ns[] = {1, 5, 16, 37, 64, 100};
    float x[100], g[100], u[100], ref[100], y[100];
    rng_seed(34);
    for (size_t c = 0; c < sizeof ns / sizeof ns[0]; c++) {
        int64_t n = ns[c];
        for (int64_t i = 0; i < n; i++) x[i] = -115.0f * (float)i / (float)n; /* to max - 115 */
        fill(g, n, 100.0f);
        fill(u, n, 3.0f);
        if (n > 5) {
            g[0] = 0.0f, g[1] = -0.0f, g[2] = INFINITY, g[3] = -INFINITY, g[4] = NAN;
            x[n - 1] = -INFINITY; /* a masked entry */
        }
        for (int op = 0; op < 3; op++) {
            use_level(TSR_CPU_LEVEL_SCALAR);
            if (op == 0) tsr_softmax(ref, x, 1, n, 0, 1);
            if (op == 1) tsr_silu(ref, g, n);
            if (op == 2) tsr_swiglu(ref, g, u, n);
            for (int l = 0; l < n_lv; l++) {
                use_level(lv[l]);
                if (op == 0) tsr_softmax(y, x, 1, n, 0, 1);
                if (op == 1) tsr_silu(y, g, n);
                if (op == 2) tsr_swiglu(y, g, u, n);
                for (int64_t i = 0; i < n; i++)
                    ck_assert_msg(same_bits_or_nan(y[i], ref[i]), "op %d level %d n %ld [%ld]: "
                                  "%a vs scalar %a", op, (int)lv[l], (long)n, (long)i, y[i],
                                  ref[i]);
            }
        }
    }
}
END_TEST

/* Both modes against a double formula; tolerance: f32 theta carries a relative error of at
 * most (2i + 3) ulp after i multiplications by an inexact scale; cos/sin add a few ulp. */
START_TEST(test_rope) {
    const int64_t n_tok = 5, n_head = 3, head_dim = 20, n_rot = 16;
    const int32_t pos[5] = {0, 1, 7, 300, 4095};
    const float base = 10000.0f, fs = 0.5f;
    float x[5 * 3 * 20], y[5 * 3 * 20], z[5 * 3 * 20], cs[5 * 16];
    rng_seed(32);
    fill(x, n_tok * n_head * head_dim, 1.0f);
    for (int mode = 0; mode <= 2; mode += 2) {
        memcpy(y, x, sizeof x);
        for (int ith = 0; ith < 4; ith++)
            tsr_rope(y, pos, n_tok, n_head, head_dim, n_rot, mode, base, fs, ith, 4);
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t h = 0; h < n_head; h++) {
                const float *xr = x + (t * n_head + h) * head_dim;
                const float *yr = y + (t * n_head + h) * head_dim;
                for (int64_t i = 0; i < n_rot / 2; i++) {
                    double th = pos[t] * fs * pow(base, -2.0 * i / n_rot);
                    int64_t a = mode ? i : 2 * i, b = mode ? i + n_rot / 2 : 2 * i + 1;
                    double ya = xr[a] * cos(th) - xr[b] * sin(th);
                    double yb = xr[a] * sin(th) + xr[b] * cos(th);
                    double tol = ((2 * i + 3) * th + 4) * FLT_EPSILON * (fabs(xr[a]) + fabs(xr[b]));
                    ck_assert_msg(fabs(yr[a] - ya) <= tol && fabs(yr[b] - yb) <= tol,
                                  "mode %d t %ld i %ld: %g %g vs %g %g", mode, (long)t, (long)i,
                                  yr[a], yr[b], ya, yb);
                }
                for (int64_t k = n_rot; k < head_dim; k++) ck_assert(yr[k] == xr[k]);
            }
        /* the two-step form is bit-identical, in any slicing */
        memcpy(z, x, sizeof x);
        for (int ith = 0; ith < 2; ith++) tsr_rope_cache(cs, pos, n_tok, n_rot, base, fs, ith, 2);
        for (int ith = 0; ith < 3; ith++)
            tsr_rope_apply(z, cs, n_tok, n_head, head_dim, n_rot, mode, ith, 3);
        ck_assert_int_eq(memcmp(z, y, sizeof y), 0);
    }
    /* position 0 is the identity */
    ck_assert_int_eq(memcmp(y, x, n_head * head_dim * sizeof *x), 0);
}
END_TEST

START_TEST(test_elementwise) {
    float a[9] = {-20, -3, -1, -0.5f, 0, 0.5f, 1, 3, 20}, b[9], y[9];
    rng_seed(33);
    fill(b, 9, 4.0f);
    tsr_silu(y, a, 9);
    for (int i = 0; i < 9; i++) {
        double want = a[i] / (1.0 + exp(-(double)a[i]));
        ck_assert(fabs(y[i] - want) <= 2 * FLT_EPSILON * fabs(want) + 1e-30);
    }
    tsr_swiglu(y, a, b, 9);
    for (int i = 0; i < 9; i++) {
        double want = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
        ck_assert(fabs(y[i] - want) <= 3 * FLT_EPSILON * fabs(want) + 1e-30);
    }
    tsr_add(y, a, b, 9);
    for (int i = 0; i < 9; i++) ck_assert(y[i] == a[i] + b[i]);
    float m[6] = {1, 5, NAN, 5, -2, 3};
    ck_assert_int_eq(tsr_argmax(m, 6), 1);
    float m2[3] = {NAN, -1, -1};
    ck_assert_int_eq(tsr_argmax(m2, 3), 1);
    ck_assert_int_eq(tsr_argmax(m2, 0), -1);
    float m3[2] = {NAN, NAN};
    ck_assert_int_eq(tsr_argmax(m3, 2), 0);
}
END_TEST

/* dot: SIMD within 4 * FLT_EPSILON * sum|terms| of the exact sum; axpy bit-identical. */
START_TEST(test_dot_axpy) {
    const int64_t ns[] = {1, 5, 16, 31, 64, 128, 1001};
    rng_seed(34);
    tsr_cpu_level lv[2];
    int n_lv = simd_levels(lv);
    for (size_t i = 0; i < 7; i++) {
        int64_t n = ns[i];
        float *x = malloc(n * 4), *y = malloc(n * 4), *r0 = malloc(n * 4), *r1 = malloc(n * 4);
        uint16_t *hx = malloc(n * 2), *hy = malloc(n * 2);
        fill(x, n, 1.0f);
        fill(y, n, 1.0f);
        tsr_fp32_to_fp16_row(hx, x, n);
        tsr_fp32_to_fp16_row(hy, y, n);
        double s32 = 0, a32 = 0, s16 = 0, a16 = 0;
        for (int64_t k = 0; k < n; k++) {
            double t = (double)x[k] * y[k];
            double u = (double)tsr_fp16_to_fp32(hx[k]) * tsr_fp16_to_fp32(hy[k]);
            s32 += t, a32 += fabs(t), s16 += u, a16 += fabs(u);
        }
        use_level(TSR_CPU_LEVEL_SCALAR);
        ck_assert(fabs(tsr_dot_f32(x, y, n) - s32) <= FLT_EPSILON * fabs(s32));
        ck_assert(fabs(tsr_dot_f16(hx, hy, n) - s16) <= FLT_EPSILON * fabs(s16));
        memcpy(r0, y, n * 4);
        tsr_axpy_f32(r0, 0.3f, x, n);
        memcpy(r1, y, n * 4);
        tsr_axpy_f16(r1, -1.7f, hx, n);
        for (int64_t k = 0; k < n; k++) {
            ck_assert(r0[k] == y[k] + 0.3f * x[k]);
            ck_assert(r1[k] == y[k] + -1.7f * tsr_fp16_to_fp32(hx[k]));
        }
        for (int l = 0; l < n_lv; l++) {
            use_level(lv[l]);
            ck_assert(fabs(tsr_dot_f32(x, y, n) - s32) <= 4 * FLT_EPSILON * a32);
            ck_assert(fabs(tsr_dot_f16(hx, hy, n) - s16) <= 4 * FLT_EPSILON * a16);
            float *z = malloc(n * 4);
            memcpy(z, y, n * 4);
            tsr_axpy_f32(z, 0.3f, x, n);
            ck_assert_int_eq(memcmp(z, r0, n * 4), 0);
            memcpy(z, y, n * 4);
            tsr_axpy_f16(z, -1.7f, hx, n);
            ck_assert_int_eq(memcmp(z, r1, n * 4), 0);
            free(z);
        }
        free(x), free(y), free(r0), free(r1), free(hx), free(hy);
    }
}
END_TEST

/* Rows of an expert layer: gathered and scattered exactly, in any slicing; the weighted sum
 * is the first product then each later one added, two roundings per slot (llama.cpp's order,
 * not a fused or reordered sum), the same bits at every level and for every slicing. */
START_TEST(test_expert_rows) {
    enum { N = 5, K = 3, DIM = 37 };
    float x[N * K * DIM], w[N * K], y[N * DIM], z[N * DIM], g[N * K * DIM];
    rng_seed(35);
    fill(x, N * K * DIM, 2.0f);
    fill(w, N * K, 1.0f);
    /* gather rows 4, 0, 2 of x, then scatter them back to rows 1, 6, 3 of g */
    const int32_t from[3] = {4, 0, 2}, to[3] = {1, 6, 3};
    memset(g, 0, sizeof g);
    for (int ith = 0; ith < 2; ith++) tsr_copy_rows(y, NULL, x, from, 3, DIM, ith, 2);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(memcmp(y + i * DIM, x + from[i] * DIM, DIM * 4), 0);
    for (int ith = 0; ith < 3; ith++) tsr_copy_rows(g, to, y, NULL, 3, DIM, ith, 3);
    for (int r = 0; r < 8; r++) {
        int src = r == 1 ? 4 : r == 6 ? 0 : r == 3 ? 2 : -1;
        for (int i = 0; i < DIM; i++)
            ck_assert(src < 0 ? g[r * DIM + i] == 0 : g[r * DIM + i] == x[src * DIM + i]);
    }
    /* the sum, written out one rounding at a time */
    for (int t = 0; t < N; t++)
        for (int i = 0; i < DIM; i++) {
            volatile float acc = w[t * K] * x[(t * K) * DIM + i];
            for (int s = 1; s < K; s++) {
                volatile float p = w[t * K + s] * x[(t * K + s) * DIM + i];
                acc = acc + p;
            }
            z[t * DIM + i] = acc;
        }
    tsr_cpu_level lv[3] = {TSR_CPU_LEVEL_SCALAR};
    int n_lv = 1 + simd_levels(lv + 1);
    for (int l = 0; l < n_lv; l++) {
        use_level(lv[l]);
        for (int nth = 1; nth <= 3; nth++) {
            memset(y, 0xff, sizeof y);
            for (int ith = 0; ith < nth; ith++) tsr_weighted_sum(y, x, w, N, K, DIM, ith, nth);
            ck_assert_msg(memcmp(y, z, sizeof z) == 0, "level %s, %d threads",
                          tsr_cpu_level_name(lv[l]), nth);
        }
    }
    /* no slot: zeros */
    tsr_weighted_sum(y, x, w, N, 0, DIM, 0, 1);
    for (int i = 0; i < N * DIM; i++) ck_assert(f32_bits(y[i]) == 0);
}
END_TEST

static Suite *kernels_suite(void) {
    Suite *s = suite_create("kernels");
    TCase *tc;
#define ADD(name)                            \
    tc = tcase_create(#name);                \
    tcase_set_timeout(tc, 60);               \
    tcase_add_test(tc, name);                \
    suite_add_tcase(s, tc)
    ADD(test_level);
    ADD(test_level_env);
    ADD(test_level_env_unknown);
    ADD(test_thread_slice);
    ADD(test_fp16_exhaustive);
    ADD(test_fp32_to_fp16_rounding);
    ADD(test_conversions_simd);
    ADD(test_bf16_rounding);
    ADD(test_q8_0_quantize);
    ADD(test_matmul_errors);
    ADD(test_panel_reference);
    ADD(test_panel_prepare_layout);
    ADD(test_panel_errors);
    ADD(test_panel_pack_layout);
    ADD(test_panel_pays);
    ADD(test_rms_norm);
    ADD(test_softmax);
    ADD(test_expf);
    ADD(test_exp_ops_levels);
    ADD(test_rope);
    ADD(test_elementwise);
    ADD(test_dot_axpy);
    ADD(test_expert_rows);
#undef ADD
    tc = tcase_create("test_matmul_levels");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_matmul_levels, 0, 4);
    suite_add_tcase(s, tc);
    tc = tcase_create("test_matmul_threads");
    tcase_add_loop_test(tc, test_matmul_threads, 0, 4);
    suite_add_tcase(s, tc);
    tc = tcase_create("test_panel_levels_equal_reference");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_panel_levels_equal_reference, 0, 2);
    tcase_add_loop_test(tc, test_panel_slices_and_batches, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    int status = tsr_test_run_suite(kernels_suite());
    tsr_test_print_levels("test-kernels");
    return status;
}
