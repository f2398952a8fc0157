/* GGUF quantized formats in the CPU kernels: dequantization of hand-made blocks, quantization
 * accuracy, the quantized products against exact sums of the dequantized operands, every
 * SIMD level against the scalar reference (bit for bit), and results independent of threads,
 * tiles and shapes. The byte identity with llama.cpp's files: test-kernels-quants-fixtures. */
#include <tessera/kernels_cpu.h>

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_levels.h"
#include "testutil.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t g_rng;

static void rng_seed(uint64_t s) {
    g_rng = s * 0x9e3779b97f4a7c15ull + 1;
}


static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = tsr_test_rng_unit(&g_rng) * scale;
}

static void fill_bytes(void *p, size_t n) {
    for (size_t i = 0; i < n; i++) ((unsigned char *)p)[i] = (unsigned char)tsr_test_rng_u64(&g_rng);
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* The weight types of the quantized products. */
static const int32_t k_types[] = {
    TSR_DTYPE_Q4_0, TSR_DTYPE_Q4_1, TSR_DTYPE_Q5_0, TSR_DTYPE_Q5_1, TSR_DTYPE_Q8_0,
    TSR_DTYPE_IQ4_NL, TSR_DTYPE_Q2_K, TSR_DTYPE_Q3_K, TSR_DTYPE_Q4_K, TSR_DTYPE_Q5_K,
    TSR_DTYPE_Q6_K, TSR_DTYPE_IQ4_XS};
#define N_TYPES ((int)(sizeof k_types / sizeof k_types[0]))

/* Random blocks with sane scales: random bytes, then every fp16 scale field set to a small
 * random value (random bits could be NaN or huge). */
static void set_scales(int32_t t, void *w, size_t bytes) {
    size_t bb = tsr_dtype_block_bytes(t);
    for (size_t off = 0; off < bytes; off += bb) {
        unsigned char *b = (unsigned char *)w + off;
        uint16_t d = tsr_fp32_to_fp16(tsr_test_rng_unit(&g_rng) * 0.01f);
        uint16_t m = tsr_fp32_to_fp16(tsr_test_rng_unit(&g_rng) * 0.01f);
        switch (t) {
        case TSR_DTYPE_Q4_0:
        case TSR_DTYPE_Q5_0:
        case TSR_DTYPE_Q8_0:
        case TSR_DTYPE_IQ4_NL:
        case TSR_DTYPE_IQ4_XS: memcpy(b, &d, 2); break;
        case TSR_DTYPE_Q4_1:
        case TSR_DTYPE_Q5_1:
        case TSR_DTYPE_Q4_K:
        case TSR_DTYPE_Q5_K:
            memcpy(b, &d, 2);
            memcpy(b + 2, &m, 2);
            break;
        case TSR_DTYPE_Q2_K:
            memcpy(b + offsetof(tsr_block_q2_k, d), &d, 2);
            memcpy(b + offsetof(tsr_block_q2_k, dmin), &m, 2);
            break;
        case TSR_DTYPE_Q3_K: memcpy(b + offsetof(tsr_block_q3_k, d), &d, 2); break;
        case TSR_DTYPE_Q6_K: memcpy(b + offsetof(tsr_block_q6_k, d), &d, 2); break;
        }
    }
}

static void random_weights(int32_t t, void *w, int64_t n_rows, int64_t n) {
    size_t bytes = tsr_row_size(t, n) * (size_t)n_rows;
    fill_bytes(w, bytes);
    set_scales(t, w, bytes);
}

static void use_level(tsr_cpu_level l) {
    ck_assert_int_eq(tsr_cpu_level_set(l), TSR_OK);
}

/* ---- formats ---------------------------------------------------------------------------- */

START_TEST(test_sizes) {
    /* GGUF block sizes */
    const struct { int32_t t; int64_t elems; size_t bytes; } want[] = {
        {TSR_DTYPE_Q4_0, 32, 18},    {TSR_DTYPE_Q4_1, 32, 20},   {TSR_DTYPE_Q5_0, 32, 22},
        {TSR_DTYPE_Q5_1, 32, 24},    {TSR_DTYPE_Q8_0, 32, 34},   {TSR_DTYPE_Q8_1, 32, 36},
        {TSR_DTYPE_Q2_K, 256, 84},   {TSR_DTYPE_Q3_K, 256, 110}, {TSR_DTYPE_Q4_K, 256, 144},
        {TSR_DTYPE_Q5_K, 256, 176},  {TSR_DTYPE_Q6_K, 256, 210}, {TSR_DTYPE_Q8_K, 256, 292},
        {TSR_DTYPE_IQ4_NL, 32, 18},  {TSR_DTYPE_IQ4_XS, 256, 136}, {TSR_DTYPE_F16, 1, 2},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        ck_assert_int_eq(tsr_dtype_block_elems(want[i].t), want[i].elems);
        ck_assert_uint_eq(tsr_dtype_block_bytes(want[i].t), want[i].bytes);
        ck_assert_uint_eq(tsr_row_size(want[i].t, 4 * want[i].elems), 4 * want[i].bytes);
    }
    ck_assert_uint_eq(tsr_row_size(TSR_DTYPE_Q4_K, 128), 0);
    ck_assert_uint_eq(tsr_row_size(TSR_DTYPE_I32, 256), 0);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q4_0), TSR_DTYPE_Q8_0);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q4_1), TSR_DTYPE_Q8_1);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q5_1), TSR_DTYPE_Q8_1);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_IQ4_NL), TSR_DTYPE_Q8_0);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q6_K), TSR_DTYPE_Q8_K);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_IQ4_XS), TSR_DTYPE_Q8_K);
    ck_assert_int_eq(tsr_matmul_act_type(TSR_DTYPE_Q8_K), -1);
    float x[32] = {0};
    unsigned char buf[64];
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_Q4_0, buf, x, 31), TSR_E_INVALID);
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_I8, buf, x, 32), TSR_E_UNSUPPORTED);
    ck_assert_int_eq(tsr_dequantize_row(TSR_DTYPE_Q4_K, x, buf, 32), TSR_E_INVALID);
    float y[4];
    ck_assert_int_eq(tsr_matmul(y, 1, buf, TSR_DTYPE_Q4_K, buf, 1, 32, 1, 0, 1), TSR_E_INVALID);
}
END_TEST

#define H_ONE 0x3c00  /* fp16 1.0 */
#define H_HALF 0x3800 /* 0.5 */
#define H_TWO 0x4000  /* 2.0 */
#define H_MONE 0xbc00 /* -1.0 */

static float deq_at(int32_t t, const void *blk, int e) {
    float y[256];
    ck_assert_int_eq(tsr_dequantize_row(t, y, blk, tsr_dtype_block_elems(t)), TSR_OK);
    return y[e];
}

/* Values worked out by hand from the GGUF block definitions. */
START_TEST(test_dequant_legacy_blocks) {
    tsr_block_q4_0 a = {.d = H_ONE};
    a.qs[0] = 0x3a;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_0, &a, 0), 2.0f);   /* 0xa - 8 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_0, &a, 16), -5.0f); /* 0x3 - 8 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_0, &a, 1), -8.0f);
    tsr_block_q4_1 b = {.d = H_HALF, .m = H_MONE};
    b.qs[1] = 0xf0;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_1, &b, 1), -1.0f);  /* 0 * 0.5 - 1 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_1, &b, 17), 6.5f);  /* 15 * 0.5 - 1 */
    tsr_block_q5_0 c = {.d = H_ONE, .qh = {0x01, 0, 0, 0}};
    c.qs[0] = 0x21;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q5_0, &c, 0), 1.0f);   /* (1 | 16) - 16 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q5_0, &c, 16), -14.0f); /* 2 - 16 */
    tsr_block_q5_1 d = {.d = H_TWO, .m = H_ONE, .qh = {0, 0, 0, 0x80}};
    d.qs[15] = 0xf0;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q5_1, &d, 15), 1.0f);  /* 0 * 2 + 1 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q5_1, &d, 31), 63.0f); /* (15 | 16) * 2 + 1 */
    tsr_block_iq4_nl e = {.d = H_HALF};
    e.qs[0] = 0xf0;
    ck_assert_float_eq(deq_at(TSR_DTYPE_IQ4_NL, &e, 0), -63.5f); /* 0.5 * -127 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_IQ4_NL, &e, 16), 56.5f); /* 0.5 * 113 */
    tsr_block_q8_1 f = {.d = H_HALF, .s = 0};
    f.qs[5] = -7;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q8_1, &f, 5), -3.5f);
}
END_TEST

START_TEST(test_dequant_k_blocks) {
    tsr_block_q2_k a = {.d = H_ONE, .dmin = H_ONE};
    a.scales[0] = 0x12; /* scale 2, min 1 */
    a.scales[6] = 0x31; /* scale 1, min 3 */
    a.qs[0] = 0x03;
    a.qs[4] = 0x80; /* element 100 = 3 * 32 + 4: bits 6..7 of qs[4] */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q2_K, &a, 0), 5.0f);    /* 2 * 3 - 1 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q2_K, &a, 100), -1.0f); /* 1 * 2 - 3 */

    tsr_block_q3_k b = {.d = H_ONE};
    b.scales[0] = 0x05;
    b.scales[8] = 0x02; /* group 0: 5 | 2 << 4 = 37 -> 5 */
    b.scales[2] = 0x0f;
    b.scales[10] = 0x03; /* group 2: 15 | 3 << 4 = 63 -> 31 */
    b.qs[0] = 0x01;
    b.qs[1] = 0x0c;    /* element 33: bits 2..3 of qs[1] = 3 */
    b.hmask[1] = 0x02; /* element 33: bit 1 of hmask[1] set: no -4 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q3_K, &b, 0), -15.0f); /* 5 * (1 - 4) */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q3_K, &b, 33), 93.0f); /* 31 * 3 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q3_K, &b, 16), 128.0f); /* -32 * (0 - 4) */

    tsr_block_q4_k c = {.d = H_ONE, .dmin = H_HALF};
    c.scales[0] = 3;    /* group 0 scale */
    c.scales[4] = 2;    /* group 0 min */
    c.scales[9] = 0x21; /* group 5: scale low 1, min low 2 */
    c.scales[1] = 0x40; /* group 5 scale high bits 1 (group 1 scale 0) */
    c.scales[5] = 0xc0; /* group 5 min high bits 3 (group 1 min 0) */
    c.qs[0] = 0x07;
    c.qs[64] = 0x90; /* group 5 = high nibbles of qs[64..95] */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_K, &c, 0), 20.0f);    /* 3 * 7 - 0.5 * 2 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q4_K, &c, 160), 128.0f); /* 17 * 9 - 0.5 * 50 */

    tsr_block_q5_k d = {.d = H_ONE, .dmin = H_HALF};
    memcpy(d.scales, c.scales, 12);
    d.qs[64] = 0x90;
    d.qh[0] = 1u << 5; /* element 160: bit 5 of qh[0] */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q5_K, &d, 160), 400.0f); /* 17 * 25 - 25 */

    tsr_block_q6_k e = {.d = H_ONE};
    e.ql[0] = 0x05;
    e.qh[0] = 0x02;
    e.scales[0] = -3;
    e.ql[72] = 0xa0; /* element 200 = 128 + 2 * 32 + 8: high nibble of ql[64 + 8] */
    e.qh[40] = 0x30; /* and bits 4..5 of qh[32 + 8] */
    e.scales[12] = 2;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q6_K, &e, 0), -15.0f);  /* -3 * ((5 | 32) - 32) */
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q6_K, &e, 200), 52.0f); /* 2 * ((10 | 48) - 32) */

    tsr_block_iq4_xs f = {.d = H_ONE, .scales_h = 0x0080};
    f.scales_l[1] = 0x50; /* group 3: 5 | 2 << 4 = 37 -> 5 */
    f.qs[50] = 0xe0;      /* element 3 * 32 + 16 + 2 */
    ck_assert_float_eq(deq_at(TSR_DTYPE_IQ4_XS, &f, 114), 445.0f); /* 5 * 89 */

    tsr_block_q8_k g = {.d = 0.25f};
    g.qs[7] = -3;
    ck_assert_float_eq(deq_at(TSR_DTYPE_Q8_K, &g, 7), -0.75f);
}
END_TEST

/* Relative RMSE of quantize -> dequantize on uniform values, and the exact round trip of
 * dequantized values for the linear formats with a max-based scale. */
START_TEST(test_quantize_rmse) {
    const struct { int32_t t; double bound; } cases[] = {
        /* A uniform quantizer of step s has RMSE s / sqrt(12); on U(-1, 1) (rms 0.577) and
         * steps of about amax / 127, amax / 32 (Q6_K), amax / 16 or range / 31 (5 bits),
         * amax / 8 or range / 15 (4 bits), amax / 4 (Q3_K), range / 3 (Q2_K) that is 0.004,
         * 0.015, 0.031, 0.062, 0.125, 0.31: the bounds add 10%; the searches only help. */
        {TSR_DTYPE_Q8_0, 0.0044}, {TSR_DTYPE_Q8_1, 0.0044}, {TSR_DTYPE_Q8_K, 0.0044},
        {TSR_DTYPE_Q6_K, 0.0165}, {TSR_DTYPE_Q5_0, 0.0340}, {TSR_DTYPE_Q5_1, 0.0340},
        {TSR_DTYPE_Q5_K, 0.0340}, {TSR_DTYPE_Q4_0, 0.0680}, {TSR_DTYPE_Q4_1, 0.0680},
        {TSR_DTYPE_Q4_K, 0.0680}, {TSR_DTYPE_IQ4_NL, 0.0680}, {TSR_DTYPE_IQ4_XS, 0.0680},
        {TSR_DTYPE_Q3_K, 0.1380}, {TSR_DTYPE_Q2_K, 0.3400}, {TSR_DTYPE_F16, 0.0003},
    };
    enum { N = 8192 };
    static float x[N], y[N];
    static unsigned char q[N * 4];
    rng_seed(7);
    fill(x, N, 1.0f);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ck_assert_int_eq(tsr_quantize_row(cases[i].t, q, x, N), TSR_OK);
        ck_assert_int_eq(tsr_dequantize_row(cases[i].t, y, q, N), TSR_OK);
        double e = 0.0, s = 0.0;
        for (int k = 0; k < N; k++) {
            e += ((double)y[k] - x[k]) * ((double)y[k] - x[k]);
            s += (double)x[k] * x[k];
        }
        double rel = sqrt(e / s);
        printf("type %d: relative rmse %.5f\n", cases[i].t, rel);
        ck_assert_msg(rel < cases[i].bound, "type %d: relative rmse %.5f >= %.5f", cases[i].t,
                      rel, cases[i].bound);
        /* a lot worse than the bound's neighbourhood would mean a broken search */
        ck_assert_msg(rel > cases[i].bound * 0.3, "type %d: rmse %.5f implausibly small",
                      cases[i].t, rel);
    }
}
END_TEST

/* Reference quantizer rules llama.cpp's files depend on (see the fixtures test for files). */
START_TEST(test_quantize_rules) {
    float x[32] = {0};
    x[3] = -2.0f;  /* the first largest magnitude: d = -2 / -8 = 0.25, q = 0 */
    x[4] = 2.0f;   /* 2 / 0.25 + 8.5 = 16.5 -> clamped to 15 */
    x[5] = 0.375f; /* 1.5 + 8.5 = 10 exactly */
    x[6] = 0.374f; /* truncation: 9.996 -> 9 */
    tsr_block_q4_0 b;
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_Q4_0, &b, x, 32), TSR_OK);
    ck_assert_uint_eq(b.d, tsr_fp32_to_fp16(0.25f));
    ck_assert_int_eq(b.qs[3] & 0xf, 0);
    ck_assert_int_eq(b.qs[4] & 0xf, 15);
    ck_assert_int_eq(b.qs[5] & 0xf, 10);
    ck_assert_int_eq(b.qs[6] & 0xf, 9);
    /* Q8_0 weights round half away from zero; activations to nearest even */
    float z[32] = {0};
    z[0] = 127.0f;
    z[1] = 2.5f;
    z[2] = -2.5f;
    tsr_block_q8_0 w, a;
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_Q8_0, &w, z, 32), TSR_OK);
    tsr_q8_0_quantize_row(&a, z, 32);
    ck_assert_int_eq(w.q[1], 3);
    ck_assert_int_eq(w.q[2], -3);
    ck_assert_int_eq(a.q[1], 2);
    ck_assert_int_eq(a.q[2], -2);
    /* all-zero blocks */
    tsr_block_q6_k k6;
    tsr_block_q4_k k4;
    float zero[256] = {0}, back[256];
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_Q6_K, &k6, zero, 256), TSR_OK);
    ck_assert_int_eq(tsr_quantize_row(TSR_DTYPE_Q4_K, &k4, zero, 256), TSR_OK);
    ck_assert_int_eq(tsr_dequantize_row(TSR_DTYPE_Q6_K, back, &k6, 256), TSR_OK);
    for (int i = 0; i < 256; i++) ck_assert_float_eq(back[i], 0.0f);
    ck_assert_int_eq(tsr_dequantize_row(TSR_DTYPE_Q4_K, back, &k4, 256), TSR_OK);
    for (int i = 0; i < 256; i++) ck_assert_float_eq(back[i], 0.0f);
}
END_TEST

START_TEST(test_activation_quantizers) {
    enum { N = 1024 };
    static float x[N];
    static tsr_block_q8_1 a[N / 32];
    static tsr_block_q8_0 b[N / 32];
    static tsr_block_q8_k k[N / 256];
    rng_seed(11);
    fill(x, N, 3.0f);
    x[300] = 0.0f;
    tsr_q8_1_quantize_row(a, x, N);
    tsr_q8_0_quantize_row(b, x, N);
    for (int i = 0; i < N / 32; i++) { /* Q8_1 = Q8_0 activations plus s */
        ck_assert_uint_eq(a[i].d, b[i].d);
        ck_assert_mem_eq(a[i].qs, b[i].q, 32);
        int sum = 0;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            sum += a[i].qs[j];
            amax = fmaxf(amax, fabsf(x[32 * i + j]));
        }
        ck_assert_uint_eq(a[i].s, tsr_fp32_to_fp16(amax / 127.0f * (float)sum));
    }
    tsr_q8_k_quantize_row(k, x, N);
    for (int i = 0; i < N / 256; i++) {
        int at = 0;
        for (int j = 1; j < 256; j++)
            if (fabsf(x[256 * i + j]) > fabsf(x[256 * i + at])) at = j;
        ck_assert_int_eq(k[i].qs[at], -127); /* d has the opposite sign of that value */
        ck_assert(f32_bits(k[i].d) == f32_bits(1.0f / (-127.0f / x[256 * i + at])));
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += k[i].qs[16 * g + l];
            ck_assert_int_eq(k[i].bsums[g], s);
        }
        for (int j = 0; j < 256; j++) /* nearest-even of x / d: within half a step */
            ck_assert(fabsf(x[256 * i + j] - k[i].d * (float)k[i].qs[j]) <=
                      fabsf(k[i].d) * 0.5f * 1.0001f);
    }
}
END_TEST

/* Q8_K activations give the scalar reference's bytes at every level: the first value of the
 * largest magnitude sets the sign when the block holds it with both signs, ties at half a step
 * round to even, NaNs are skipped for the maximum and quantize to 0, an infinite maximum, an
 * all-zero block and an all-NaN one, and random blocks. */
START_TEST(test_q8_k_levels) {
    enum { NB = 8, N = NB * 256 };
    static float x[N];
    static tsr_block_q8_k want[NB], got[NB];
    rng_seed(23);
    fill(x, N, 3.0f);
    x[10] = 40.0f, x[11] = -40.0f;                 /* block 0: -40 after 40: 40 wins */
    for (int j = 0; j < 256; j++) x[256 + j] = (float)((j % 11) - 5) * 0.5f; /* ties */
    x[256 + 3] = -127.0f;                          /* iscale 1: x.5 values round to even */
    x[512 + 7] = NAN, x[512 + 200] = -NAN;         /* block 2: NaNs among values */
    for (int j = 0; j < 256; j++) x[768 + j] = 0.0f; /* block 3: zeros */
    x[1024 + 5] = INFINITY;                        /* block 4: an infinite maximum */
    for (int j = 0; j < 256; j++) x[1280 + j] = NAN; /* block 5: NaNs only */
    x[1536 + 255] = -50.0f, x[1536 + 254] = 50.0f; /* block 6: the tie at the end */
    use_level(TSR_CPU_LEVEL_SCALAR);
    tsr_q8_k_quantize_row(want, x, N);
    for (int l = TSR_CPU_LEVEL_AVX2; l <= (int)tsr_cpu_level_best(); l++) {
        use_level(l);
        memset(got, 0x5a, sizeof got);
        tsr_q8_k_quantize_row(got, x, N);
        for (int b = 0; b < NB; b++)
            ck_assert_msg(memcmp(&want[b], &got[b], sizeof want[b]) == 0, "block %d at %s", b,
                          tsr_cpu_level_name((tsr_cpu_level)l));
    }
    ck_assert_int_eq(want[0].qs[10], -127);
    ck_assert_int_eq(want[1].qs[5], 0);            /* (5 % 11 - 5) * 0.5 = 0 */
    ck_assert_int_eq(want[1].qs[8], 2);            /* 1.5 -> 2 */
    ck_assert_int_eq(want[1].qs[10], 2);           /* 2.5 -> 2 */
    ck_assert_int_eq(want[6].qs[254], -127);
}
END_TEST

/* ---- products --------------------------------------------------------------------------- */

/* y = W x for random weights of type t (rows n_out, n_in), activations prepared at the
 * current level. */
typedef struct product {
    int32_t t;
    int64_t n_in, n_out, n_tok;
    void *w, *xp;
    float *x;
} product;

static void product_init(product *p, int32_t t, int64_t n_in, int64_t n_out, int64_t n_tok,
                         uint64_t seed) {
    rng_seed(seed);
    p->t = t;
    p->n_in = n_in;
    p->n_out = n_out;
    p->n_tok = n_tok;
    p->w = malloc(tsr_row_size(t, n_in) * (size_t)n_out);
    random_weights(t, p->w, n_out, n_in);
    p->x = malloc(sizeof(float) * (size_t)(n_in * n_tok));
    fill(p->x, n_in * n_tok, 2.0f);
    int32_t at = tsr_matmul_act_type(t);
    p->xp = malloc(tsr_row_size(at, n_in) * (size_t)n_tok);
    ck_assert_int_eq(tsr_matmul_prepare(p->xp, at, p->x, n_tok, n_in, 0, 1), TSR_OK);
}

static void product_free(product *p) {
    free(p->w);
    free(p->x);
    free(p->xp);
}

static float *product_run(const product *p, int nth) {
    float *y = malloc(sizeof(float) * (size_t)(p->n_out * p->n_tok));
    for (int i = 0; i < nth; i++)
        ck_assert_int_eq(tsr_matmul(y, p->n_out, p->w, p->t, p->xp, p->n_tok, p->n_in, p->n_out,
                                    i, nth),
                         TSR_OK);
    return y;
}

/* The scalar reference is the exact sum of the dequantized operands up to f32 rounding. */
START_TEST(test_products_exact) {
    use_level(TSR_CPU_LEVEL_SCALAR);
    for (int i = 0; i < N_TYPES; i++) {
        product p;
        product_init(&p, k_types[i], 2048, 5, 3, 100 + (uint64_t)i);
        float *y = product_run(&p, 1);
        int32_t at = tsr_matmul_act_type(p.t);
        float *wf = malloc(sizeof(float) * (size_t)p.n_in);
        float *xf = malloc(sizeof(float) * (size_t)p.n_in);
        size_t wrow = tsr_row_size(p.t, p.n_in), xrow = tsr_row_size(at, p.n_in);
        for (int64_t t = 0; t < p.n_tok; t++) {
            ck_assert_int_eq(tsr_dequantize_row(at, xf, (char *)p.xp + t * xrow, p.n_in), 0);
            for (int64_t r = 0; r < p.n_out; r++) {
                ck_assert_int_eq(tsr_dequantize_row(p.t, wf, (char *)p.w + r * wrow, p.n_in), 0);
                double ref = 0.0, mag = 0.0;
                for (int64_t k = 0; k < p.n_in; k++) {
                    ref += (double)wf[k] * xf[k];
                    mag += fabs((double)wf[k] * xf[k]);
                }
                float got = y[t * p.n_out + r];
                ck_assert_msg(fabs(got - ref) <= 2e-6 * mag, "type %d (%lld, %lld): %.9g vs %.9g",
                              p.t, (long long)t, (long long)r, got, ref);
                ck_assert(f32_bits(got) == f32_bits(tsr_row_dot(p.t, p.n_in,
                                                                (char *)p.w + r * wrow,
                                                                (char *)p.xp + t * xrow)));
            }
        }
        free(wf);
        free(xf);
        free(y);
        product_free(&p);
    }
}
END_TEST

/* Every SIMD level gives the scalar reference's bits, for prepared activations and products,
 * on shapes that leave partial tiles and partial 16-block groups, and for one or two tokens
 * (decode's row pairs, odd row counts). */
START_TEST(test_products_levels) {
    const int64_t shapes[][3] = {{256, 1, 1},    {512 + 256, 7, 5}, {2048 + 512, 13, 9},
                                 {256 * 9, 4, 4}, {256 * 3, 3, 70},  {1024, 13, 1},
                                 {512, 6, 2},     {256 * 5, 10, 1}};
    tsr_cpu_level best = tsr_cpu_level_best();
    for (int i = 0; i < N_TYPES; i++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int64_t n_in = shapes[s][0], n_out = shapes[s][1], n_tok = shapes[s][2];
            if (tsr_dtype_block_elems(k_types[i]) == 32) n_in += 96; /* 3 tail blocks */
            use_level(TSR_CPU_LEVEL_SCALAR);
            product p;
            product_init(&p, k_types[i], n_in, n_out, n_tok, 1000 + 17 * (uint64_t)i + s);
            float *ref = product_run(&p, 1);
            size_t xbytes = tsr_row_size(tsr_matmul_act_type(p.t), n_in) * (size_t)n_tok;
            void *xp_ref = malloc(xbytes);
            memcpy(xp_ref, p.xp, xbytes);
            for (int l = TSR_CPU_LEVEL_AVX2; l <= (int)best; l++) {
                use_level(l);
                ck_assert_int_eq(tsr_matmul_prepare(p.xp, tsr_matmul_act_type(p.t), p.x, n_tok,
                                                    n_in, 0, 1),
                                 TSR_OK);
                ck_assert_mem_eq(p.xp, xp_ref, xbytes);
                float *y = product_run(&p, 1);
                for (int64_t k = 0; k < n_out * n_tok; k++)
                    ck_assert_msg(f32_bits(y[k]) == f32_bits(ref[k]),
                                  "type %d level %s shape %zu [%lld]: %.9g vs scalar %.9g",
                                  p.t, tsr_cpu_level_name(l), s, (long long)k, y[k], ref[k]);
                free(y);
            }
            free(xp_ref);
            free(ref);
            product_free(&p);
        }
    use_level(best);
}
END_TEST

/* Values do not depend on the thread split, on n_tok (tiling) or on n_out. */
START_TEST(test_products_threads_tiles) {
    use_level(tsr_cpu_level_best());
    for (int i = 0; i < N_TYPES; i++) {
        product p;
        product_init(&p, k_types[i], 1024, 37, 6, 5000 + (uint64_t)i);
        float *one = product_run(&p, 1);
        for (int nth = 2; nth <= 5; nth += 3) {
            float *y = product_run(&p, nth);
            ck_assert_mem_eq(y, one, sizeof(float) * 37 * 6);
            free(y);
        }
        size_t xrow = tsr_row_size(tsr_matmul_act_type(p.t), p.n_in);
        size_t wrow = tsr_row_size(p.t, p.n_in);
        for (int64_t t = 0; t < p.n_tok; t++) { /* one token, one row at a time */
            float y1[37];
            ck_assert_int_eq(tsr_matmul(y1, 37, p.w, p.t, (char *)p.xp + t * xrow, 1, p.n_in, 37,
                                        0, 1),
                             TSR_OK);
            ck_assert_mem_eq(y1, one + t * 37, sizeof y1);
            float y2;
            ck_assert_int_eq(tsr_matmul(&y2, 1, (char *)p.w + 36 * wrow, p.t,
                                        (char *)p.xp + t * xrow, 1, p.n_in, 1, 0, 1),
                             TSR_OK);
            ck_assert(f32_bits(y2) == f32_bits(one[t * 37 + 36]));
        }
        free(one);
        product_free(&p);
    }
}
END_TEST

/* Extreme quants: Q8_0 weights of -128 and activations of +-127 (the sign trick and 16-bit
 * pair sums), Q6_K / IQ4 extremes; all levels equal the scalar bits. */
START_TEST(test_products_extremes) {
    tsr_cpu_level best = tsr_cpu_level_best();
    for (int i = 0; i < N_TYPES; i++) {
        int32_t t = k_types[i];
        int64_t n = 512;
        size_t row = tsr_row_size(t, n);
        unsigned char *w = malloc(row * 2);
        for (size_t k = 0; k < row * 2; k++) w[k] = k % 2 ? 0x80 : 0xff; /* extreme quants */
        set_scales(t, w, row * 2);
        float x[512];
        for (int k = 0; k < n; k++) x[k] = k % 3 ? 1.0f : -1.0f;
        int32_t at = tsr_matmul_act_type(t);
        void *xp = malloc(tsr_row_size(at, n));
        use_level(TSR_CPU_LEVEL_SCALAR);
        ck_assert_int_eq(tsr_matmul_prepare(xp, at, x, 1, n, 0, 1), TSR_OK);
        float ref[2], y[2];
        ck_assert_int_eq(tsr_matmul(ref, 2, w, t, xp, 1, n, 2, 0, 1), TSR_OK);
        for (int l = TSR_CPU_LEVEL_AVX2; l <= (int)best; l++) {
            use_level(l);
            ck_assert_int_eq(tsr_matmul(y, 2, w, t, xp, 1, n, 2, 0, 1), TSR_OK);
            ck_assert_mem_eq(y, ref, sizeof y);
        }
        free(w);
        free(xp);
    }
    use_level(best);
}
END_TEST

/* ---- x16: row-interleaved types in the fast order ---------------------------------------- */

static const int32_t x16_types[] = {TSR_DTYPE_Q4_0, TSR_DTYPE_Q4_1, TSR_DTYPE_Q5_0,
                                    TSR_DTYPE_Q5_1, TSR_DTYPE_Q8_0, TSR_DTYPE_IQ4_NL,
                                    TSR_DTYPE_Q4_K, TSR_DTYPE_Q6_K, TSR_DTYPE_Q5_K,
                                    TSR_DTYPE_IQ4_XS, TSR_DTYPE_Q3_K, TSR_DTYPE_Q2_K};
#define X16_TYPES (int)(sizeof x16_types / sizeof *x16_types)

/* The layout keeps every row: unpacking gives the file's blocks back, byte for byte. */
START_TEST(test_x16_pack_round_trip) {
    const int32_t *types = x16_types;
    for (int i = 0; i < X16_TYPES; i++) {
        rng_seed(300 + (uint64_t)i);
        int64_t n_in = tsr_dtype_block_elems(types[i]) * 3, n_out = 48;
        size_t row = tsr_row_size(types[i], n_in);
        unsigned char *w = malloc(row * (size_t)n_out), *packed = malloc(row * (size_t)n_out);
        unsigned char *back = malloc(row);
        random_weights(types[i], w, n_out, n_in);
        ck_assert_int_eq(tsr_x16_pack(packed, w, types[i], n_in, n_out, 0, 1), TSR_OK);
        ck_assert_int_eq(tsr_x16_pack(packed, w, types[i], n_in, n_out, 1, 3), TSR_OK);
        for (int64_t r = 0; r < n_out; r++) {
            tsr_x16_unpack_row(back, packed, types[i], n_in, r);
            ck_assert_msg(memcmp(back, w + (size_t)r * row, row) == 0, "type %d row %lld",
                          types[i], (long long)r);
        }
        free(w);
        free(packed);
        free(back);
    }
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q4_0, 64, 32), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q5_1, 96, 16), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_IQ4_NL, 48, 16), 0); /* half a block */
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q8_0, 64, 24), 0);  /* rows not 16 x k */
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q4_0, 48, 32), 0);  /* half a block */
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q4_K, 256, 32), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q6_K, 512, 16), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q6_K, 512, 40), 0);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q4_K, 288, 32), 0); /* part of a super-block */
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q5_K, 512, 48), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_IQ4_XS, 256, 16), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q3_K, 768, 64), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q2_K, 1024, 32), 1);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q2_K, 1024, 8), 0);
    ck_assert_int_eq(tsr_x16_supported(TSR_DTYPE_Q8_K, 256, 32), 0); /* another type */
    unsigned char buf[64];
    ck_assert_int_eq(tsr_x16_pack(buf, buf, TSR_DTYPE_Q8_0, 32, 8, 0, 1), TSR_E_INVALID);
    float y[16];
    ck_assert_int_eq(tsr_x16_matmul(y, 16, buf, TSR_DTYPE_Q8_0, buf, 1, 32, 8, 0, 1),
                     TSR_E_INVALID);
}
END_TEST

/* The fast order's definition on file rows: a chain of fmaf((float)isum, dw * dx, acc) over
 * the blocks (Q4_1, Q5_1: then fmaf(m, s, acc); Q4_K: then fmaf(-(float)msum, dmin * dx,
 * acc)), checked here against a sum in double of the dequantized operands, and its order for
 * the 32-element types. */
START_TEST(test_x16_reference_is_the_sum) {
    const int32_t *types = x16_types;
    for (int i = 0; i < X16_TYPES; i++) {
        product p;
        product_init(&p, types[i], 1024, 3, 2, 310 + (uint64_t)i);
        int32_t at = tsr_matmul_act_type(p.t);
        size_t wrow = tsr_row_size(p.t, p.n_in), xrow = tsr_row_size(at, p.n_in);
        float wf[1024], xf[1024];
        for (int64_t t = 0; t < p.n_tok; t++)
            for (int64_t r = 0; r < p.n_out; r++) {
                const char *wr = (char *)p.w + r * wrow, *xr = (char *)p.xp + t * xrow;
                ck_assert_int_eq(tsr_dequantize_row(p.t, wf, wr, p.n_in), 0);
                ck_assert_int_eq(tsr_dequantize_row(at, xf, xr, p.n_in), 0);
                double ref = 0, mag = 0;
                for (int64_t k = 0; k < p.n_in; k++) {
                    ref += (double)wf[k] * xf[k];
                    mag += fabs((double)wf[k] * xf[k]);
                }
                float got = tsr_x16_row_dot_ref(p.t, p.n_in, wr, xr);
                /* Q8_1's s is fp16(f32 d x sum(q)), where the dequantized row has fp16(d) x q:
                 * each minimum's term m x s is off by up to 2^-10 of itself */
                double min_mag = 0;
                for (int64_t b = 0; at == TSR_DTYPE_Q8_1 && b < p.n_in / 32; b++) {
                    const tsr_block_q8_1 *xb = (const tsr_block_q8_1 *)xr + b;
                    uint16_t hm;
                    memcpy(&hm, wr + b * tsr_dtype_block_bytes(p.t) + 2, sizeof hm);
                    min_mag += fabs((double)tsr_fp16_to_fp32(hm) * tsr_fp16_to_fp32(xb->s));
                }
                ck_assert_msg(fabs(got - ref) <= 2e-6 * mag + 0x1p-10 * min_mag,
                              "type %d: %.9g vs %.9g", p.t, got, ref);
                if (at == TSR_DTYPE_Q8_K) continue;
                /* the order: one chain from block 0 (a dequantized weight is q * dw exactly, or
                 * q * dw + m rounded once: q comes back by rounding) */
                size_t bb = tsr_dtype_block_bytes(p.t), xb = tsr_dtype_block_bytes(at);
                const int xoff = at == TSR_DTYPE_Q8_1 ? 4 : 2; /* where the quants start */
                float acc = 0;
                for (int64_t b = 0; b < p.n_in / 32; b++) {
                    uint16_t h, hm, hx, hs;
                    memcpy(&h, wr + b * bb, sizeof h); /* every type starts with its scale */
                    memcpy(&hm, wr + b * bb + 2, sizeof hm); /* and Q4_1, Q5_1 with m next */
                    memcpy(&hx, xr + b * xb, sizeof hx);
                    memcpy(&hs, xr + b * xb + 2, sizeof hs);
                    float dw = tsr_fp16_to_fp32(h), mw = tsr_fp16_to_fp32(hm);
                    const int8_t *xq = (const int8_t *)(xr + b * xb + xoff);
                    int32_t isum = 0;
                    for (int k = 0; k < 32; k++) {
                        float v = at == TSR_DTYPE_Q8_1 ? wf[32 * b + k] - mw : wf[32 * b + k];
                        isum += (int32_t)lrintf(v / dw) * xq[k];
                    }
                    acc = fmaf((float)isum, dw * tsr_fp16_to_fp32(hx), acc);
                    if (at == TSR_DTYPE_Q8_1) acc = fmaf(mw, tsr_fp16_to_fp32(hs), acc);
                }
                ck_assert(f32_bits(got) == f32_bits(acc));
            }
        product_free(&p);
    }
}
END_TEST

/* Every level's product over the packed layout gives the reference's bits on the file rows,
 * whatever the token count (partial tiles of 16, more than one block of 64 tokens), the thread
 * slice and the groups per slice; extreme quants included (Q8_0 -128, Q5 31, Q6_K scales -128,
 * activations +-127, whole blocks of +127). */
START_TEST(test_x16_levels_equal_reference) {
    const int32_t *types = x16_types;
    const int64_t toks[] = {1, 2, 3, 4, 5, 9, 16, 17, 70};
    tsr_cpu_level best = tsr_cpu_level_best();
    for (int i = 0; i < X16_TYPES; i++)
        for (int e = 0; e < 2; e++) {
            product p;
            product_init(&p, types[i], tsr_dtype_block_elems(types[i]) == 256 ? 768 : 320, 48,
                         70, 320 + (uint64_t)(2 * i + e));
            int32_t at = tsr_matmul_act_type(p.t);
            size_t wrow = tsr_row_size(p.t, p.n_in), xrow = tsr_row_size(at, p.n_in);
            if (e) { /* extremes: weights at the ends of their range, activations +-127 */
                unsigned char *w = p.w;
                for (size_t k = 0; k < wrow * (size_t)p.n_out; k++) w[k] = k % 2 ? 0x80 : 0xff;
                set_scales(p.t, p.w, wrow * (size_t)p.n_out);
                /* odd blocks all +127: int16 sums of unsigned quants at their largest */
                for (int64_t k = 0; k < p.n_in * p.n_tok; k++)
                    p.x[k] = k / 32 % 2 || k % 3 ? 1.0f : -1.0f;
                ck_assert_int_eq(tsr_matmul_prepare(p.xp, at, p.x, p.n_tok, p.n_in, 0, 1), TSR_OK);
            }
            void *packed = malloc(wrow * (size_t)p.n_out);
            ck_assert_int_eq(tsr_x16_pack(packed, p.w, p.t, p.n_in, p.n_out, 0, p.n_out / 16),
                             TSR_OK);
            float *want = malloc(sizeof(float) * (size_t)(p.n_out * p.n_tok));
            float *y = malloc(sizeof(float) * (size_t)(p.n_out * p.n_tok));
            for (int64_t t = 0; t < p.n_tok; t++)
                for (int64_t r = 0; r < p.n_out; r++)
                    want[t * p.n_out + r] = tsr_x16_row_dot_ref(
                        p.t, p.n_in, (char *)p.w + r * wrow, (char *)p.xp + t * xrow);
            for (int l = TSR_CPU_LEVEL_SCALAR; l <= (int)best; l++) {
                use_level(l);
                for (size_t k = 0; k < sizeof toks / sizeof *toks; k++)
                    for (int nth = 1; nth <= 3; nth += 2) {
                        memset(y, 0xff, sizeof(float) * (size_t)(p.n_out * p.n_tok));
                        for (int ith = 0; ith < nth; ith++)
                            ck_assert_int_eq(tsr_x16_matmul(y, p.n_out, packed, p.t, p.xp,
                                                            toks[k], p.n_in, p.n_out, ith, nth),
                                             TSR_OK);
                        for (int64_t v = 0; v < toks[k] * p.n_out; v++)
                            ck_assert_msg(f32_bits(y[v]) == f32_bits(want[v]),
                                          "type %d level %s n_tok %lld nth %d [%lld]: %.9g vs "
                                          "%.9g", p.t, tsr_cpu_level_name(l),
                                          (long long)toks[k], nth, (long long)v, y[v], want[v]);
                    }
            }
            use_level(best);
            free(packed);
            free(want);
            free(y);
            product_free(&p);
        }
}
END_TEST

/* Decode (up to four tokens) reads group g beside group g + h of each thread's slice (h half
 * its groups, rounded up): slices of every group count from one to seven, odd ones leaving a
 * group alone, give the reference's bits for one to five tokens, and the padding after each
 * token's rows (ldy > n_out) stays untouched. */
START_TEST(test_x16_slices_of_odd_groups) {
    const int32_t types[] = {TSR_DTYPE_Q4_0, TSR_DTYPE_Q4_1, TSR_DTYPE_Q5_0,
                             TSR_DTYPE_Q5_1, TSR_DTYPE_Q8_0, TSR_DTYPE_IQ4_NL};
    tsr_cpu_level best = tsr_cpu_level_best();
    for (int i = 0; i < (int)(sizeof types / sizeof *types); i++)
        for (int64_t groups = 1; groups <= 7; groups++) {
            product p;
            product_init(&p, types[i], 96, 16 * groups, 5, 340 + (uint64_t)(8 * i + groups));
            size_t wrow = tsr_row_size(p.t, p.n_in);
            size_t xrow = tsr_row_size(tsr_matmul_act_type(p.t), p.n_in);
            const int64_t ldy = p.n_out + 16;
            /* room for two groups past the matrix: a pairing beyond the slice reads there */
            void *packed = calloc((size_t)(p.n_out + 32), wrow);
            ck_assert_int_eq(tsr_x16_pack(packed, p.w, p.t, p.n_in, p.n_out, 0, groups), TSR_OK);
            float *y = malloc(sizeof(float) * (size_t)(ldy * p.n_tok));
            for (int l = TSR_CPU_LEVEL_SCALAR; l <= (int)best; l++) {
                use_level(l);
                for (int64_t n_tok = 1; n_tok <= p.n_tok; n_tok++)
                    for (int nth = 1; nth <= 3; nth++) {
                        memset(y, 0xff, sizeof(float) * (size_t)(ldy * p.n_tok));
                        for (int ith = 0; ith < nth; ith++)
                            ck_assert_int_eq(tsr_x16_matmul(y, ldy, packed, p.t, p.xp, n_tok,
                                                            p.n_in, p.n_out, ith, nth),
                                             TSR_OK);
                        for (int64_t t = 0; t < p.n_tok; t++)
                            for (int64_t r = 0; r < ldy; r++) {
                                uint32_t want = t < n_tok && r < p.n_out
                                                    ? f32_bits(tsr_x16_row_dot_ref(
                                                          p.t, p.n_in, (char *)p.w + r * wrow,
                                                          (char *)p.xp + t * xrow))
                                                    : 0xffffffffu;
                                ck_assert_msg(f32_bits(y[t * ldy + r]) == want,
                                              "type %d level %s groups %lld n_tok %lld nth %d "
                                              "(%lld, %lld)", p.t, tsr_cpu_level_name(l),
                                              (long long)groups, (long long)n_tok, nth,
                                              (long long)t, (long long)r);
                            }
                    }
            }
            use_level(best);
            free(packed);
            free(y);
            product_free(&p);
        }
}
END_TEST

/* The 256-element types' AVX2 and AVX-512 kernels equal the scalar product over the packed
 * layout and the reference on the file rows, bit for bit, on every shape of 1 to 20 tokens
 * (decode's row pairs, partial tiles of 16), 16 to 64 rows (one to four groups, alone or
 * paired, on one thread or two) and 256 to 1024 inputs (one to four super-blocks). */
START_TEST(test_xk16_shapes) {
    const int32_t types[] = {TSR_DTYPE_Q4_K, TSR_DTYPE_Q6_K, TSR_DTYPE_Q5_K,
                             TSR_DTYPE_IQ4_XS, TSR_DTYPE_Q3_K, TSR_DTYPE_Q2_K};
    const int64_t max_tok = 20;
    tsr_cpu_level best = tsr_cpu_level_best();
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        for (int64_t n_in = 256; n_in <= 1024; n_in += 256)
            for (int64_t n_out = 16; n_out <= 64; n_out += 16) {
                product p;
                product_init(&p, types[i], n_in, n_out, max_tok,
                             400 + (uint64_t)(100 * i + n_in / 16 + n_out));
                size_t wrow = tsr_row_size(p.t, n_in), xrow = tsr_row_size(TSR_DTYPE_Q8_K, n_in);
                void *packed = malloc(wrow * (size_t)n_out);
                ck_assert_int_eq(tsr_x16_pack(packed, p.w, p.t, n_in, n_out, 0, n_out / 16),
                                 TSR_OK);
                const size_t ybytes = sizeof(float) * (size_t)(n_out * max_tok);
                float *want = malloc(ybytes), *scalar = malloc(ybytes), *y = malloc(ybytes);
                for (int64_t t = 0; t < max_tok; t++)
                    for (int64_t r = 0; r < n_out; r++)
                        want[t * n_out + r] = tsr_x16_row_dot_ref(
                            p.t, n_in, (char *)p.w + r * wrow, (char *)p.xp + t * xrow);
                use_level(TSR_CPU_LEVEL_SCALAR);
                ck_assert_int_eq(tsr_x16_matmul(scalar, n_out, packed, p.t, p.xp, max_tok, n_in,
                                                n_out, 0, 1),
                                 TSR_OK);
                ck_assert_mem_eq(scalar, want, ybytes);
                for (int l = TSR_CPU_LEVEL_SCALAR + 1; l <= (int)best; l++) {
                    use_level(l);
                    for (int64_t n_tok = 1; n_tok <= max_tok; n_tok++)
                        for (int nth = 1; nth <= 2; nth++) {
                            memset(y, 0xff, ybytes);
                            for (int ith = 0; ith < nth; ith++)
                                ck_assert_int_eq(tsr_x16_matmul(y, n_out, packed, p.t, p.xp,
                                                                n_tok, n_in, n_out, ith, nth),
                                                 TSR_OK);
                            for (int64_t v = 0; v < n_tok * n_out; v++)
                                ck_assert_msg(f32_bits(y[v]) == f32_bits(scalar[v]),
                                              "type %d level %s n_in %lld n_out %lld n_tok %lld "
                                              "nth %d [%lld]: %.9g vs %.9g", p.t,
                                              tsr_cpu_level_name(l), (long long)n_in,
                                              (long long)n_out, (long long)n_tok, nth,
                                              (long long)v, y[v], scalar[v]);
                        }
                }
                free(packed);
                free(want);
                free(scalar);
                free(y);
                product_free(&p);
            }
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("kernels-quants");
    TCase *tc = tcase_create("quants");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_sizes);
    tcase_add_test(tc, test_dequant_legacy_blocks);
    tcase_add_test(tc, test_dequant_k_blocks);
    tcase_add_test(tc, test_quantize_rmse);
    tcase_add_test(tc, test_quantize_rules);
    tcase_add_test(tc, test_activation_quantizers);
    tcase_add_test(tc, test_products_exact);
    tcase_add_test(tc, test_q8_k_levels);
    tcase_add_test(tc, test_products_levels);
    tcase_add_test(tc, test_products_threads_tiles);
    tcase_add_test(tc, test_products_extremes);
    tcase_add_test(tc, test_x16_pack_round_trip);
    tcase_add_test(tc, test_x16_reference_is_the_sum);
    tcase_add_test(tc, test_x16_levels_equal_reference);
    tcase_add_test(tc, test_x16_slices_of_odd_groups);
    tcase_add_test(tc, test_xk16_shapes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    int status = tsr_test_run_suite(suite());
    tsr_test_print_levels("test-kernels-quants");
    return status;
}
