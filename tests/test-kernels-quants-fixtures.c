/* GGUF quantizers against llama.cpp's files: the fixture models made by `llama-quantize` from
 * llama-tiny-f32.gguf (shared/fixtures/README.md). Q8_0, Q4_0 (and F16) tensors must come out
 * byte for byte; K-type tensors no less accurate than llama.cpp's. Skips without the data. */
#include <tessera/kernels_cpu.h>

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/error.h"
#include "files/gguf.h"
#include "testutil.h"

static tsr_gguf *open_fixture(const char *rel) {
    char *path = tsr_test_require_data(rel);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    free(path);
    return g;
}

/* Rows of the F32 tensor named like t, quantized to t's type, compared with t's bytes.
 * Returns the number of tensors of that type compared. */
static int compare_bytes(const char *quantized, int32_t dtype) {
    tsr_gguf *f32 = open_fixture("fixtures/models/llama-tiny-f32.gguf");
    tsr_gguf *q = open_fixture(quantized);
    int n_cmp = 0;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(q); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(q, i);
        if (t->dtype != dtype) continue;
        const tsr_gguf_tensor *src = tsr_gguf_find_tensor(f32, t->name);
        ck_assert_ptr_nonnull(src);
        ck_assert_int_eq(src->dtype, TSR_DTYPE_F32);
        int64_t n = t->ne[0], rows = t->ne[1] * t->ne[2] * t->ne[3];
        size_t row = tsr_row_size(dtype, n);
        ck_assert_uint_eq(row * (size_t)rows, t->size);
        unsigned char *buf = malloc(row);
        for (int64_t r = 0; r < rows; r++) {
            ck_assert_int_eq(tsr_quantize_row(dtype, buf, (const float *)src->data + r * n, n),
                             TSR_OK);
            const unsigned char *want = (const unsigned char *)t->data + (size_t)r * row;
            if (memcmp(buf, want, row) != 0) {
                size_t k = 0;
                while (buf[k] == want[k]) k++;
                ck_abort_msg("%s: %s row %lld byte %zu: %02x, llama.cpp %02x", quantized,
                             t->name, (long long)r, k, buf[k], want[k]);
            }
        }
        free(buf);
        n_cmp++;
    }
    tsr_gguf_close(q);
    tsr_gguf_close(f32);
    return n_cmp;
}

START_TEST(test_q8_0_bytes) {
    ck_assert_int_eq(compare_bytes("fixtures/models/llama-tiny-q8_0.gguf", TSR_DTYPE_Q8_0), 16);
}
END_TEST

START_TEST(test_q4_0_bytes) {
    ck_assert_int_eq(compare_bytes("fixtures/models/llama-tiny-q4_0.gguf", TSR_DTYPE_Q4_0), 15);
}
END_TEST

START_TEST(test_f16_bytes) {
    ck_assert_int_eq(compare_bytes("fixtures/models/llama-tiny-f16.gguf", TSR_DTYPE_F16), 16);
}
END_TEST

/* Sum of squared errors of our quantization and of llama.cpp's (dequantized) against the F32
 * weights, over every tensor of `dtype` in `quantized`. */
static void k_errors(const char *quantized, int32_t dtype, double *ours, double *theirs,
                     int *identical_rows, int *rows_total) {
    tsr_gguf *f32 = open_fixture("fixtures/models/llama-tiny-f32.gguf");
    tsr_gguf *q = open_fixture(quantized);
    *ours = *theirs = 0.0;
    *identical_rows = *rows_total = 0;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(q); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(q, i);
        if (t->dtype != dtype) continue;
        const tsr_gguf_tensor *src = tsr_gguf_find_tensor(f32, t->name);
        ck_assert_ptr_nonnull(src);
        int64_t n = t->ne[0], rows = t->ne[1] * t->ne[2] * t->ne[3];
        size_t row = tsr_row_size(dtype, n);
        unsigned char *buf = malloc(row);
        float *a = malloc((size_t)n * sizeof *a), *b = malloc((size_t)n * sizeof *b);
        for (int64_t r = 0; r < rows; r++) {
            const float *x = (const float *)src->data + r * n;
            const unsigned char *theirs_q = (const unsigned char *)t->data + (size_t)r * row;
            ck_assert_int_eq(tsr_quantize_row(dtype, buf, x, n), TSR_OK);
            ck_assert_int_eq(tsr_dequantize_row(dtype, a, buf, n), TSR_OK);
            ck_assert_int_eq(tsr_dequantize_row(dtype, b, theirs_q, n), TSR_OK);
            for (int64_t k = 0; k < n; k++) {
                *ours += ((double)a[k] - x[k]) * ((double)a[k] - x[k]);
                *theirs += ((double)b[k] - x[k]) * ((double)b[k] - x[k]);
            }
            *identical_rows += memcmp(buf, theirs_q, row) == 0;
            ++*rows_total;
        }
        free(a);
        free(b);
        free(buf);
    }
    tsr_gguf_close(q);
    tsr_gguf_close(f32);
}

static void check_k(const char *quantized, int32_t dtype) {
    double ours, theirs;
    int same, total;
    k_errors(quantized, dtype, &ours, &theirs, &same, &total);
    ck_assert_int_gt(total, 0);
    printf("%s type %d: rmse ours %.9g, llama.cpp %.9g, identical rows %d of %d\n", quantized,
           dtype, sqrt(ours), sqrt(theirs), same, total);
    ck_assert_msg(ours <= theirs * (1.0 + 1e-9), "%s: our squared error %.9g > llama.cpp's %.9g",
                  quantized, ours, theirs);
    /* the searches are llama.cpp's, operation for operation: the same bytes */
    ck_assert_int_eq(same, total);
}

START_TEST(test_q4_k_rmse) {
    check_k("fixtures/models/llama-tiny-q4_k_m.gguf", TSR_DTYPE_Q4_K);
}
END_TEST

START_TEST(test_q6_k_rmse) {
    check_k("fixtures/models/llama-tiny-q6_k.gguf", TSR_DTYPE_Q6_K);
    check_k("fixtures/models/llama-tiny-q4_0.gguf", TSR_DTYPE_Q6_K);
    check_k("fixtures/models/llama-tiny-q4_k_m.gguf", TSR_DTYPE_Q6_K);
}
END_TEST

/* llama.cpp's own products use the same activation quantization: our dot of its Q6_K / Q4_K
 * tensors with Q8_K activations must match the dequantized-weight dot of those activations
 * up to f32 rounding, i.e. the reading of llama.cpp's blocks is exact. */
START_TEST(test_k_products_read_llama_blocks) {
    tsr_gguf *q = open_fixture("fixtures/models/llama-tiny-q4_k_m.gguf");
    int checked = 0;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(q); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(q, i);
        if (t->dtype != TSR_DTYPE_Q4_K && t->dtype != TSR_DTYPE_Q6_K) continue;
        int64_t n = t->ne[0];
        float *x = malloc((size_t)n * sizeof *x), *wf = malloc((size_t)n * sizeof *wf);
        float *xq = malloc((size_t)n * sizeof *xq);
        for (int64_t k = 0; k < n; k++) x[k] = sinf(0.37f * (float)k + (float)i);
        void *xp = malloc(tsr_row_size(TSR_DTYPE_Q8_K, n));
        ck_assert_int_eq(tsr_matmul_prepare(xp, TSR_DTYPE_Q8_K, x, 1, n, 0, 1), TSR_OK);
        ck_assert_int_eq(tsr_dequantize_row(TSR_DTYPE_Q8_K, xq, xp, n), TSR_OK);
        ck_assert_int_eq(tsr_dequantize_row(t->dtype, wf, t->data, n), TSR_OK);
        double ref = 0.0, mag = 0.0;
        for (int64_t k = 0; k < n; k++) {
            ref += (double)wf[k] * xq[k];
            mag += fabs((double)wf[k] * xq[k]);
        }
        float got = tsr_row_dot(t->dtype, n, t->data, xp);
        ck_assert_msg(fabs(got - ref) <= 1e-5 * mag + 1e-7, "%s: %g vs %g", t->name, got, ref);
        free(x);
        free(wf);
        free(xq);
        free(xp);
        checked++;
    }
    ck_assert_int_gt(checked, 0);
    tsr_gguf_close(q);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("kernels-quants-fixtures");
    TCase *tc = tcase_create("fixtures");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_q8_0_bytes);
    tcase_add_test(tc, test_q4_0_bytes);
    tcase_add_test(tc, test_f16_bytes);
    tcase_add_test(tc, test_q4_k_rmse);
    tcase_add_test(tc, test_q6_k_rmse);
    tcase_add_test(tc, test_k_products_read_llama_blocks);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    /* skip (77) as a whole when the shared data is absent */
    free(tsr_test_require_data("fixtures/models/llama-tiny-f32.gguf"));
    return tsr_test_run_suite(suite());
}
