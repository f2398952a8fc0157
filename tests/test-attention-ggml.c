/* Attention 'ggml' (plugins/attention-ggml), loaded from its .so as a pipeline loads it: the
 * same semantics as 'reference' (causality by position, GQA, F32 / F16 / loaded views,
 * score_acc), results independent of the thread count, and the summation orders of
 * llama.cpp's non-flash CPU path, pinned by inputs whose result depends on which terms share
 * an f32 lane (a large term and its negation that cancel only when they meet first). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

#include "plugin/commands.h"
#include "plugin/loader.h"
#include "config/params.h"
#include "plugin/stage_init.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

/* The attention plugin `name` for a shape; `kv_pad`: the parameter's text, or NULL for its
 * default. */
static void attn_open(fx *f, int n_threads, const char *name, const char *kv_pad, int32_t n_head,
                      int32_t n_kv_head, int32_t head_dim, int32_t n_ctx) {
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.n_head = n_head;
    shape.n_kv_head = n_kv_head;
    shape.head_dim = head_dim;
    shape.n_ctx = n_ctx;
    char file[64], pad[64];
    snprintf(file, sizeof file, "attention-%s.so", name);
    snprintf(pad, sizeof pad, "kv_pad=%s", kv_pad ? kv_pad : "");
    const char *const kv[] = {pad, NULL};
    fx_open(f, n_threads, TSR_STAGE_ATTENTION, file, name, kv_pad ? kv : NULL, &shape);
}

/* attn_case_make's problem, whose first query (of several) lies one position further back. */
static void problem_make(attn_case *c, uint64_t seed, int32_t n_head, int32_t n_kv_head,
                         int32_t hd, int64_t n_q, int64_t n_kv) {
    attn_case_make(c, seed, n_head, n_kv_head, hd, n_q, n_kv);
    if (n_q > 1) c->q_pos[0]--;
}

/* (n_head, n_kv_head, head_dim, n_q, n_kv): decode (n_q 1) and prompt shapes, head_dim
 * below, at and above ggml's 64-wide step, GQA groups of 1, 2, 3 and 4. */
static const int32_t cases[][5] = {
    {8, 4, 32, 64, 64}, {8, 4, 32, 1, 300}, {4, 1, 80, 9, 130}, {6, 3, 13, 17, 257},
    {8, 8, 8, 5, 33},   {4, 2, 64, 1, 700}, {3, 3, 16, 40, 100},
};
#define N_CASES (int)(sizeof cases / sizeof cases[0])

START_TEST(test_matches_reference) {
    const int32_t *s = cases[_i];
    attn_case c;
    problem_make(&c, 500 + (uint64_t)_i, s[0], s[1], s[2], s[3], s[4]);
    fx ref, gg;
    attn_open(&ref, 2, "reference", NULL, c.n_head, c.n_kv_head, c.head_dim, 4096);
    attn_open(&gg, 2, "ggml", NULL, c.n_head, c.n_kv_head, c.head_dim, 4096);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim);
    float *o_ref = malloc(n_out * sizeof(float)), *o_gg = malloc(n_out * sizeof(float));
    float *o_loaded = malloc(n_out * sizeof(float));
    const char *names[] = {"f32", "f16", "loaded"};
    for (int kind = VIEW_F32; kind <= VIEW_LOADED; kind++) {
        ck_assert_int_eq(attn_run(&ref, &c, kind, 0, o_ref, NULL), TSR_OK);
        ck_assert_int_eq(attn_run(&gg, &c, kind, 0, o_gg, NULL), TSR_OK);
        assert_rows_close(o_ref, o_gg, c.n_q * c.n_head, c.head_dim, 1e-5, names[kind]);
        /* The first of several queries sees nothing: zeros. */
        for (int32_t d = 0; d < c.n_head * c.head_dim && c.n_q > 1; d++)
            ck_assert_float_eq(o_gg[d], 0.0f);
        if (kind == VIEW_F32) memcpy(o_loaded, o_gg, n_out * sizeof(float));
    }
    /* Loaded views hold the F32 rows: the same bits. */
    ck_assert_mem_eq(o_loaded, o_gg, n_out * sizeof(float));
    free(o_ref);
    free(o_gg);
    free(o_loaded);
    fx_close(&ref);
    fx_close(&gg);
    attn_case_free(&c);
}
END_TEST

START_TEST(test_score_acc_matches_reference) {
    attn_case c;
    problem_make(&c, 77, 8, 2, 32, 23, 190);
    fx ref, gg;
    attn_open(&ref, 2, "reference", NULL, c.n_head, c.n_kv_head, c.head_dim, 4096);
    attn_open(&gg, 2, "ggml", NULL, c.n_head, c.n_kv_head, c.head_dim, 4096);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim), n_acc = (size_t)(c.n_kv_head * c.n_kv);
    float *o_ref = malloc(n_out * sizeof(float)), *o_gg = malloc(n_out * sizeof(float));
    float *o_plain = malloc(n_out * sizeof(float));
    float *a_ref = calloc(n_acc, sizeof(float)), *a_gg = calloc(n_acc, sizeof(float));
    int32_t from = c.q_pos[c.n_q / 2];
    ck_assert_int_eq(attn_run(&ref, &c, VIEW_F32, from, o_ref, a_ref), TSR_OK);
    ck_assert_int_eq(attn_run(&gg, &c, VIEW_F32, from, o_gg, a_gg), TSR_OK);
    double total = 0.0;
    for (size_t j = 0; j < n_acc; j++) {
        ck_assert_msg(fabs(a_ref[j] - a_gg[j]) <= 1e-5 * fmax(1.0, fabs(a_ref[j])),
                      "score_acc[%zu]: %g vs reference %g", j, a_gg[j], a_ref[j]);
        total += a_gg[j];
    }
    /* Each observed query adds 1 per query head (every observed query sees something). */
    int64_t observed = 0;
    for (int64_t i = 0; i < c.n_q; i++) observed += c.q_pos[i] >= from;
    ck_assert_double_eq_tol(total, (double)(observed * c.n_head), 1e-4);
    /* Asking for scores changes the work split, not the output. */
    ck_assert_int_eq(attn_run(&gg, &c, VIEW_F32, from, o_plain, NULL), TSR_OK);
    ck_assert_mem_eq(o_plain, o_gg, n_out * sizeof(float));
    /* score_acc is added to, not overwritten. */
    ck_assert_int_eq(attn_run(&gg, &c, VIEW_F32, from, o_gg, a_gg), TSR_OK);
    double twice = 0.0;
    for (size_t j = 0; j < n_acc; j++) twice += a_gg[j];
    ck_assert_double_eq_tol(twice, 2.0 * total, 1e-3);
    free(o_ref);
    free(o_gg);
    free(o_plain);
    free(a_ref);
    free(a_gg);
    fx_close(&ref);
    fx_close(&gg);
    attn_case_free(&c);
}
END_TEST

START_TEST(test_thread_independent) {
    attn_case c;
    problem_make(&c, 11, 8, 2, 16, 21, 333);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim), n_acc = (size_t)(c.n_kv_head * c.n_kv);
    float *out[3], *acc[3], *plain[3];
    for (int t = 0; t < 3; t++) {
        fx f;
        attn_open(&f, t + 1, "ggml", NULL, c.n_head, c.n_kv_head, c.head_dim, 4096);
        ck_assert_int_eq(tsr_pool_size(f.pool), t + 1);
        out[t] = malloc(n_out * sizeof(float));
        plain[t] = malloc(n_out * sizeof(float));
        acc[t] = calloc(n_acc, sizeof(float));
        ck_assert_int_eq(attn_run(&f, &c, VIEW_F16, c.q_pos[3], out[t], acc[t]), TSR_OK);
        ck_assert_int_eq(attn_run(&f, &c, VIEW_F32, 0, plain[t], NULL), TSR_OK);
        fx_close(&f);
    }
    for (int t = 1; t < 3; t++) {
        ck_assert_mem_eq(out[0], out[t], n_out * sizeof(float));
        ck_assert_mem_eq(acc[0], acc[t], n_acc * sizeof(float));
        ck_assert_mem_eq(plain[0], plain[t], n_out * sizeof(float));
    }
    for (int t = 0; t < 3; t++) {
        free(out[t]);
        free(plain[t]);
        free(acc[t]);
    }
    attn_case_free(&c);
}
END_TEST

/* One KV head and one query head; n entries at positions 0..n-1 with keys `k` and values `v`
 * (n, hd), n_q queries at position n - 1. Returns out[0] of the last query. */
static float run_small(const char *kv_pad, int32_t hd, int64_t n, const float *k,
                       const float *v, int64_t n_q, const float *q) {
    fx f;
    attn_open(&f, 1, "ggml", kv_pad, 1, 1, hd, 512);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n), qpos[4];
    for (int64_t j = 0; j < n; j++) pos[j] = (int32_t)j;
    float *qq = malloc(sizeof(float) * (size_t)(n_q * hd)), out[4 * 80];
    for (int64_t i = 0; i < n_q; i++) {
        qpos[i] = (int32_t)(n - 1);
        memcpy(qq + i * hd, q, sizeof(float) * (size_t)hd);
    }
    tsr_kv_view view = {TSR_SIZED(tsr_kv_view), .n = n, .pos = pos, .dtype = TSR_DTYPE_F32,
                        .k = k, .v = v, .k_stride = 4 * (size_t)hd, .v_stride = 4 * (size_t)hd};
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 0, .n_q = n_q, .q = qq,
                               .q_pos = qpos, .scale = 1.0f / sqrtf((float)hd), .views = &view,
                               .out = out};
    ck_assert_int_eq(fx_attention_forward(&f, &call), TSR_OK);
    fx_close(&f);
    free(pos);
    free(qq);
    return out[(n_q - 1) * hd];
}

/* Uniform attention over n entries (keys 0) whose values in dimension 0 are 2^32 at entry 0,
 * -2^32 at entry `neg` and 1 elsewhere: the 1s survive only in f32 sums that do not also
 * hold 2^32 * p (whose ulp, 8 or 16, is far above their total). */
static float run_cancel(const char *kv_pad, int64_t n, int64_t neg, int64_t n_q) {
    const int32_t hd = 32;
    float *k = calloc((size_t)(n * hd), sizeof(float));
    float *v = calloc((size_t)(n * hd), sizeof(float));
    float q[32] = {1.0f};
    for (int64_t j = 0; j < n; j++) v[j * hd] = j == 0 ? 0x1p32f : j == neg ? -0x1p32f : 1.0f;
    float r = run_small(kv_pad, hd, n, k, v, n_q, q);
    free(k);
    free(v);
    return r;
}

START_TEST(test_value_product_lanes) {
    /* From 2 queries on, mul_mat(V^T, KQ) is tinyBLAS: entry j into f32 lane j % 16, so
     * entries 0 and 16 cancel in lane 0 and the 15 others keep their 15/17. */
    ck_assert_double_eq_tol(run_cancel(NULL, 17, 16, 2), 15.0 / 17.0, 1e-6);
    /* One query (decode): ggml_vec_dot_f32 over n_kv = 32 cells, all past its 64-wide
     * vector part: one sequential sum, where 2^32 * p swallows every 1 before it cancels. */
    ck_assert_float_eq(run_cancel(NULL, 17, 16, 1), 0.0f);
    /* 65 entries, one query: with kv_pad 32, n_kv = 96, so entries 0..63 fill the 64 lanes
     * (each 1 is lost against entry 0's lane in the final additions) and entry 64 comes in
     * the sequential rest: 0. With kv_pad 256, n_kv = 256: entry 64 shares lane 0 with entry
     * 0 and the 63 ones survive. */
    ck_assert_float_eq(run_cancel(NULL, 65, 64, 1), 0.0f);
    ck_assert_float_eq(run_cancel("32", 65, 64, 1), 0.0f);
    ck_assert_double_eq_tol(run_cancel("256", 65, 64, 1), 63.0 / 65.0, 1e-6);
}
END_TEST

START_TEST(test_score_dot_lanes) {
    /* head_dim 80: q = 1; key 0 is 2^32 in dim 0, -2^32 in dim 64, 0.25 elsewhere; key 1 is
     * 0; values e_0 and e_1, so out[0] = softmax weight of entry 0. One query:
     * ggml_vec_dot_f32 takes dims 0..63 in 64 lanes and dims 64..79 one by one: the 63
     * quarters of the vector part vanish against 2^32, 2^32 - 2^32 = 0, then 15 quarters: the
     * score is 3.75 * scale. Two queries of a single head: Q is contiguous, so tinyBLAS takes
     * the dots: dims 0, 16, 32, 48, 64 share lane 0, where 2^32 swallows the three quarters
     * between it and its negation; the other lanes keep theirs: 18.75 * scale. (The exact
     * dot, 19.5, would give a third weight.) */
    const int32_t hd = 80;
    float k[2 * 80] = {0}, v[2 * 80] = {0}, q[80];
    for (int32_t d = 0; d < hd; d++) {
        q[d] = 1.0f;
        k[d] = d == 0 ? 0x1p32f : d == 64 ? -0x1p32f : 0.25f;
    }
    v[0] = 1.0f;
    v[hd + 1] = 1.0f;
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t n_q = 1; n_q <= 2; n_q++) {
        double s = (double)((n_q == 1 ? 3.75f : 18.75f) * scale);
        ck_assert_double_eq_tol(run_small(NULL, hd, 2, k, v, n_q, q), exp(s) / (exp(s) + 1.0),
                                1e-6);
    }
}
END_TEST

START_TEST(test_errors) {
    fx f;
    attn_open(&f, 1, "ggml", NULL, 2, 1, 8, 64);
    float q[16] = {0}, out[16];
    int32_t qpos = 0;
    tsr_kv_view view = {TSR_SIZED(tsr_kv_view), .n = 1, .dtype = TSR_DTYPE_F32};
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 2, .n_q = 1, .q = q,
                               .q_pos = &qpos, .scale = 1.0f, .views = &view, .out = out};
    ck_assert_int_eq(fx_attention_forward(&f, &call), TSR_E_RANGE);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "layer 2"));
    call.layer = 0; /* a view without pos, k or v */
    ck_assert_int_eq(fx_attention_forward(&f, &call), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "KV head 0"));
    fx_close(&f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("attention-ggml");
    TCase *tc = tcase_create("ggml");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_matches_reference, 0, N_CASES);
    tcase_add_test(tc, test_score_acc_matches_reference);
    tcase_add_test(tc, test_thread_independent);
    tcase_add_test(tc, test_value_product_lanes);
    tcase_add_test(tc, test_score_dot_lanes);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
