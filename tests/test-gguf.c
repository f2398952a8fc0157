/* GGUF reader and writer, self-contained: round trips through the writer, malformed files
 * built byte by byte with their exact error lines, and random corruption. */
#include <check.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "files/dtype.h"
#include "files/gguf.h"
#include "files/gguf_write.h"
#include "gguf_bytes.h"
#include "testutil.h"

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                    */

static char *tmp_path(const char *name) {
    char *dir = tsr_test_tmpdir();
    ck_assert_ptr_nonnull(dir);
    char *path = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(path, "%s/%s", dir, name);
    free(dir);
    return path;
}

/* Opens b as "t.gguf" and asserts the exact error line. */
static void expect_error(const gguf_bytes *b, const char *expected) {
    tsr_gguf *g = (tsr_gguf *)1;
    tsr_error err = {{0}};
    int rc = tsr_gguf_open_memory(b->p, b->len, "t.gguf", &g, &err);
    ck_assert_int_lt(rc, 0);
    ck_assert_ptr_null(g);
    ck_assert_str_eq(err.msg, expected);
}

/* Asserts b opens and returns the model. */
static tsr_gguf *open_ok(const gguf_bytes *b) {
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    int rc = tsr_gguf_open_memory(b->p, b->len, "t.gguf", &g, &err);
    ck_assert_msg(rc == 0, "open failed: %s", err.msg);
    return g;
}

/* A valid file: one key, one F32 tensor "a" of 8 elements with data 0..7. `at_offset`
 * receives the offset of the tensor's offset field. */
static gguf_bytes valid_file(size_t *at_offset) {
    gguf_bytes b = {0};
    gb_header(&b, 3, 1, 1);
    gb_str(&b, "general.architecture");
    gb_u32(&b, TSR_GGUF_STRING);
    gb_str(&b, "llama");
    gb_str(&b, "a");
    gb_u32(&b, 1);
    gb_u64(&b, 8);
    gb_u32(&b, TSR_DTYPE_F32);
    if (at_offset) *at_offset = b.len;
    gb_u64(&b, 0);
    gb_pad(&b, 32);
    for (int i = 0; i < 8; i++) {
        float f = (float)i;
        gb_put(&b, &f, 4);
    }
    return b;
}

/* A file (no tensors) whose one key is `name` of `type`: its value is the caller's to write. */
static gguf_bytes one_key(const char *name, uint32_t type) {
    gguf_bytes b = {0};
    gb_header(&b, 3, 0, 1);
    gb_str(&b, name);
    gb_u32(&b, type);
    return b;
}

/* A header with no keys and one tensor info written by the caller; returns offsets. */
static void tensor_file(gguf_bytes *b, uint32_t n_tensors) {
    gb_header(b, 3, n_tensors, 0);
}

/* Fills in a tensor info: name, dims, type, offset; *at_type gets the type field offset. */
static void tensor_info(gguf_bytes *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                        uint32_t type, uint64_t offset, size_t *at_type) {
    gb_str(b, name);
    gb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) gb_u64(b, ne[d]);
    if (at_type) *at_type = b->len;
    gb_u32(b, type);
    gb_u64(b, offset);
}

static void data_bytes(gguf_bytes *b, size_t n) {
    gb_pad(b, 32);
    for (size_t i = 0; i < n; i++) {
        uint8_t x = (uint8_t)i;
        gb_put(b, &x, 1);
    }
}

/* A file (no keys) of F32 tensors (name, element count, offset) over `data` bytes of data. */
typedef struct placed {
    const char *name;
    uint64_t n;
    uint64_t offset;
} placed;

static gguf_bytes placed_file(const placed *t, size_t n_tensors, size_t data) {
    gguf_bytes b = {0};
    tensor_file(&b, (uint32_t)n_tensors);
    for (size_t i = 0; i < n_tensors; i++)
        tensor_info(&b, t[i].name, 1, &t[i].n, TSR_DTYPE_F32, t[i].offset, NULL);
    data_bytes(&b, data);
    return b;
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    static char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

/* ---------------------------------------------------------------------------------------- */
/* dtype table                                                                                */

START_TEST(dtype_sizes) {
    ck_assert_str_eq(tsr_dtype_name(TSR_DTYPE_Q8_0), "Q8_0");
    ck_assert_str_eq(tsr_dtype_name(TSR_DTYPE_IQ4_XS), "IQ4_XS");
    ck_assert_ptr_null(tsr_dtype_name(4)); /* Q4_2: removed from GGML */
    ck_assert_ptr_null(tsr_dtype_name(-1));
    ck_assert_ptr_null(tsr_dtype_name(TSR_DTYPE_PLUGIN_FIRST));
    ck_assert_uint_eq(tsr_dtype_block(TSR_DTYPE_Q4_K), 256);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_F32, 10), 40);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_BF16, 10), 20);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q4_0, 64), 36);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q8_0, 256), 8 * 34);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q2_K, 256), 84);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q3_K, 256), 110);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q4_K, 512), 288);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q5_K, 256), 176);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q6_K, 256), 210);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q8_K, 256), 292);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_IQ4_NL, 32), 18);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q5_1, 32), 24);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q8_1, 32), 36);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_Q8_0, 33), 0);
    ck_assert_uint_eq(tsr_dtype_row_bytes(TSR_DTYPE_F64, INT64_MAX), 0); /* overflow */
    int64_t ne[4] = {INT64_MAX / 2, 3, 1, 1};
    size_t bytes;
    ck_assert(!tsr_dtype_tensor_bytes(TSR_DTYPE_F32, ne, &bytes));
    int64_t ok[4] = {64, 3, 2, 1};
    ck_assert(tsr_dtype_tensor_bytes(TSR_DTYPE_Q8_0, ok, &bytes));
    ck_assert_uint_eq(bytes, 2 * 34 * 6);
}
END_TEST

/* ---------------------------------------------------------------------------------------- */
/* Writer -> reader                                                                           */

static const float f32_data[6] = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e30f};

/* Writes a file with every metadata type and several tensor types. */
static char *write_everything(uint8_t *q8, size_t q8_size, uint8_t *q4k, size_t q4k_size) {
    for (size_t i = 0; i < q8_size; i++) q8[i] = (uint8_t)(i * 7);
    for (size_t i = 0; i < q4k_size; i++) q4k[i] = (uint8_t)(i * 13 + 1);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    ck_assert_int_eq(tsr_gguf_writer_set_uint(w, "t.u8", TSR_GGUF_UINT8, 255), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_int(w, "t.i8", TSR_GGUF_INT8, -128), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_uint(w, "t.u16", TSR_GGUF_UINT16, 65535), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_int(w, "t.i16", TSR_GGUF_INT16, -32768), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_uint(w, "t.u32", TSR_GGUF_UINT32, UINT32_MAX), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_int(w, "t.i32", TSR_GGUF_INT32, INT32_MIN), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_uint(w, "t.u64", TSR_GGUF_UINT64, UINT64_MAX), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_int(w, "t.i64", TSR_GGUF_INT64, INT64_MIN), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_float(w, "t.f32", TSR_GGUF_FLOAT32, 1e-5), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_float(w, "t.f64", TSR_GGUF_FLOAT64, M_PI), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_bool(w, "t.yes", true), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_bool(w, "t.no", false), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_str(w, "t.str", "h\xc3\xa9llo \"q\"\n"), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_str(w, "t.empty", ""), 0);
    const int32_t i32s[4] = {-1, 0, 7, INT32_MAX};
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_i32", TSR_GGUF_INT32, i32s, 4), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_f32", TSR_GGUF_FLOAT32, f32_data, 6), 0);
    const uint8_t bools[3] = {1, 0, 1};
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_bool", TSR_GGUF_BOOL, bools, 3), 0);
    const uint64_t u64s[2] = {UINT64_MAX, 5};
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_u64", TSR_GGUF_UINT64, u64s, 2), 0);
    const double f64s[2] = {0.1, -1e300};
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_f64", TSR_GGUF_FLOAT64, f64s, 2), 0);
    const int8_t i8s[3] = {-128, 0, 127};
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_i8", TSR_GGUF_INT8, i8s, 3), 0);
    ck_assert_int_eq(tsr_gguf_writer_set_arr(w, "t.arr_empty", TSR_GGUF_UINT16, NULL, 0), 0);
    const tsr_gguf_str strs[4] = {{"<s>", 3}, {"", 0}, {"a\0b", 3}, {"\xe2\x96\x81the", 6}};
    ck_assert_int_eq(tsr_gguf_writer_set_arr_str(w, "t.arr_str", strs, 4), 0);

    ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, "f32", TSR_DTYPE_F32, 2,
                                                (int64_t[]){3, 2}, f32_data), 0);
    const uint16_t f16[5] = {0x3c00, 0xc000, 0, 1, 0x7bff};
    ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, "f16", TSR_DTYPE_F16, 1, (int64_t[]){5}, f16),
                     0);
    ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, "q8", TSR_DTYPE_Q8_0, 3,
                                                (int64_t[]){64, 2, 3}, q8), 0);
    ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, "q4k", TSR_DTYPE_Q4_K, 4,
                                                (int64_t[]){256, 1, 1, 2}, q4k), 0);
    char *path = tmp_path("all.gguf");
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_writer_write(w, path, &err) == 0, "%s", err.msg);
    tsr_gguf_writer_free(w);
    return path;
}

static void check_key(const tsr_gguf *g, const char *key, tsr_gguf_type type, const char *text) {
    int64_t k = tsr_gguf_find_key(g, key);
    ck_assert_msg(k >= 0, "missing %s", key);
    ck_assert_str_eq(tsr_gguf_key_name(g, k), key);
    ck_assert_int_eq(tsr_gguf_key_type(g, k), type);
    char buf[256];
    int n = tsr_gguf_key_format(g, k, buf, sizeof buf);
    ck_assert_str_eq(buf, text);
    ck_assert_int_eq(n, (int)strlen(text));
}

START_TEST(round_trip_metadata) {
    uint8_t q8[12 * 34], q4k[2 * 144];
    char *path = write_everything(q8, sizeof q8, q4k, sizeof q4k);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    ck_assert_uint_eq(tsr_gguf_version(g), 3);
    ck_assert_uint_eq(tsr_gguf_alignment(g), 32);
    ck_assert_str_eq(tsr_gguf_path(g), path);
    ck_assert_int_eq(tsr_gguf_n_keys(g), 22);
    ck_assert_str_eq(tsr_gguf_key_name(g, 0), "t.u8");
    check_key(g, "t.u8", TSR_GGUF_UINT8, "255");
    check_key(g, "t.i8", TSR_GGUF_INT8, "-128");
    check_key(g, "t.u16", TSR_GGUF_UINT16, "65535");
    check_key(g, "t.i16", TSR_GGUF_INT16, "-32768");
    check_key(g, "t.u32", TSR_GGUF_UINT32, "4294967295");
    check_key(g, "t.i32", TSR_GGUF_INT32, "-2147483648");
    check_key(g, "t.u64", TSR_GGUF_UINT64, "18446744073709551615");
    check_key(g, "t.i64", TSR_GGUF_INT64, "-9223372036854775808");
    check_key(g, "t.f32", TSR_GGUF_FLOAT32, "9.99999975e-06");
    check_key(g, "t.f64", TSR_GGUF_FLOAT64, "3.14159265");
    check_key(g, "t.yes", TSR_GGUF_BOOL, "true");
    check_key(g, "t.no", TSR_GGUF_BOOL, "false");
    check_key(g, "t.str", TSR_GGUF_STRING, "\"h\\xc3\\xa9llo \\\"q\\\"\\n\"");
    check_key(g, "t.empty", TSR_GGUF_STRING, "\"\"");
    check_key(g, "t.arr_i32", TSR_GGUF_ARRAY, "[i32 x 4]");
    check_key(g, "t.arr_str", TSR_GGUF_ARRAY, "[str x 4]");
    check_key(g, "t.arr_empty", TSR_GGUF_ARRAY, "[u16 x 0]");

    uint64_t u;
    int64_t i;
    double d;
    bool b;
    tsr_gguf_str s;
    ck_assert(tsr_gguf_get_u64(g, "t.u64", &u, &err) && u == UINT64_MAX);
    ck_assert(tsr_gguf_get_u64(g, "t.u8", &u, &err) && u == 255);
    ck_assert(tsr_gguf_get_i64(g, "t.i64", &i, &err) && i == INT64_MIN);
    ck_assert(tsr_gguf_get_i64(g, "t.u32", &i, &err) && i == UINT32_MAX);
    ck_assert(tsr_gguf_get_f64(g, "t.f32", &d, &err) && d == (double)1e-5f);
    ck_assert(tsr_gguf_get_f64(g, "t.f64", &d, &err) && d == M_PI);
    ck_assert(tsr_gguf_get_f64(g, "t.i16", &d, &err) && d == -32768.0);
    ck_assert(tsr_gguf_get_bool(g, "t.yes", &b, &err) && b);
    ck_assert(tsr_gguf_get_str(g, "t.str", &s, &err));
    ck_assert_uint_eq(s.len, 11);
    ck_assert(memcmp(s.ptr, "h\xc3\xa9llo \"q\"\n", 11) == 0);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "t.absent", 7), 7);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "t.u16", 7), 65535);
    ck_assert(tsr_gguf_f64_or(g, "t.absent", 0.5) == 0.5);
    ck_assert(!tsr_gguf_bool_or(g, "t.no", true));
    ck_assert_int_eq(tsr_gguf_find_key(g, "t.u"), -1);
    ck_assert_int_eq(tsr_gguf_find_key(g, "t.u88"), -1);
    tsr_gguf_close(g);
    free(path);
}
END_TEST

START_TEST(round_trip_arrays) {
    uint8_t q8[12 * 34], q4k[2 * 144];
    char *path = write_everything(q8, sizeof q8, q4k, sizeof q4k);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    int64_t k;
    tsr_gguf_type t;
    uint64_t n;
    ck_assert(tsr_gguf_get_arr(g, "t.arr_i32", &k, &t, &n, &err));
    ck_assert_int_eq(t, TSR_GGUF_INT32);
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 0), -1);
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 3), INT32_MAX);
    ck_assert(tsr_gguf_arr_f64(g, k, 2) == 7.0);
    ck_assert_ptr_null(tsr_gguf_arr_str(g, k, 0).ptr);
    int32_t raw[4];
    memcpy(raw, tsr_gguf_arr_data(g, k), sizeof raw);
    ck_assert_int_eq(raw[2], 7);

    ck_assert(tsr_gguf_get_arr(g, "t.arr_f32", &k, &t, &n, &err));
    ck_assert_int_eq(t, TSR_GGUF_FLOAT32);
    for (uint64_t j = 0; j < 6; j++) ck_assert(tsr_gguf_arr_f64(g, k, j) == f32_data[j]);
    ck_assert(tsr_gguf_arr_f64(g, k, 6) == 0); /* out of range */

    ck_assert(tsr_gguf_get_arr(g, "t.arr_bool", &k, &t, &n, &err));
    ck_assert_int_eq(t, TSR_GGUF_BOOL);
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 0), 1);
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 1), 0);
    ck_assert(tsr_gguf_get_arr(g, "t.arr_u64", &k, &t, &n, &err));
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 0), INT64_MAX); /* saturates */
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 1), 5);
    ck_assert(tsr_gguf_get_arr(g, "t.arr_f64", &k, &t, &n, &err));
    ck_assert(tsr_gguf_arr_f64(g, k, 1) == -1e300);
    ck_assert(tsr_gguf_get_arr(g, "t.arr_i8", &k, &t, &n, &err));
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 0), -128);
    ck_assert(tsr_gguf_get_arr(g, "t.arr_empty", &k, &t, &n, &err));
    ck_assert_uint_eq(n, 0);

    ck_assert(tsr_gguf_get_arr(g, "t.arr_str", &k, &t, &n, &err));
    ck_assert_int_eq(t, TSR_GGUF_STRING);
    ck_assert_uint_eq(tsr_gguf_arr_len(g, k), 4);
    ck_assert_int_eq(tsr_gguf_arr_type(g, k), TSR_GGUF_STRING);
    ck_assert_ptr_null(tsr_gguf_arr_data(g, k));
    tsr_gguf_str s = tsr_gguf_arr_str(g, k, 0);
    ck_assert(s.len == 3 && memcmp(s.ptr, "<s>", 3) == 0);
    ck_assert_uint_eq(tsr_gguf_arr_str(g, k, 1).len, 0);
    s = tsr_gguf_arr_str(g, k, 2);
    ck_assert(s.len == 3 && memcmp(s.ptr, "a\0b", 3) == 0);
    s = tsr_gguf_arr_str(g, k, 3);
    ck_assert(s.len == 6 && memcmp(s.ptr, "\xe2\x96\x81the", 6) == 0);
    ck_assert_ptr_null(tsr_gguf_arr_str(g, k, 4).ptr);
    tsr_gguf_close(g);
    free(path);
}
END_TEST

START_TEST(round_trip_tensors) {
    uint8_t q8[12 * 34], q4k[2 * 144];
    char *path = write_everything(q8, sizeof q8, q4k, sizeof q4k);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), 4);
    const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, 0);
    ck_assert_str_eq(t->name, "f32");
    ck_assert_int_eq(t->dtype, TSR_DTYPE_F32);
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert(t->ne[0] == 3 && t->ne[1] == 2 && t->ne[2] == 1 && t->ne[3] == 1);
    ck_assert_uint_eq(t->size, 24);
    ck_assert_uint_eq(t->offset, 0);
    ck_assert(memcmp(t->data, f32_data, 24) == 0);
    const uint8_t *base = t->data;
    t = tsr_gguf_find_tensor(g, "f16");
    ck_assert_uint_eq(t->offset, 32);
    ck_assert_uint_eq(t->size, 10);
    ck_assert_ptr_eq(t->data, base + 32);
    t = tsr_gguf_find_tensor(g, "q8");
    ck_assert_int_eq(t->dtype, TSR_DTYPE_Q8_0);
    ck_assert(t->n_dims == 3 && t->ne[0] == 64 && t->ne[1] == 2 && t->ne[2] == 3);
    ck_assert_uint_eq(t->offset, 64);
    ck_assert_uint_eq(t->size, sizeof q8);
    ck_assert(memcmp(t->data, q8, sizeof q8) == 0);
    t = tsr_gguf_find_tensor(g, "q4k");
    ck_assert_int_eq(t->dtype, TSR_DTYPE_Q4_K);
    ck_assert(t->n_dims == 4 && t->ne[3] == 2);
    ck_assert_uint_eq(t->offset, 64 + 416);
    ck_assert(memcmp(t->data, q4k, sizeof q4k) == 0);
    ck_assert_ptr_eq(tsr_gguf_tensor_at(g, 3), t);
    ck_assert_ptr_null(tsr_gguf_tensor_at(g, 4));
    ck_assert_ptr_null(tsr_gguf_tensor_at(g, -1));
    ck_assert_ptr_null(tsr_gguf_find_tensor(g, "q4"));
    /* The data section starts aligned in the file, so every tensor is aligned in memory. */
    for (int64_t j = 0; j < 4; j++)
        ck_assert_uint_eq((uintptr_t)tsr_gguf_tensor_at(g, j)->data % 32, 0);
    tsr_gguf_close(g);
    free(path);
}
END_TEST

START_TEST(custom_alignment) {
    float data[3] = {1, 2, 3};
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    ck_assert_int_eq(tsr_gguf_writer_set_uint(w, "general.alignment", TSR_GGUF_UINT32, 256), 0);
    tsr_gguf_writer_add_tensor(w, "a", TSR_DTYPE_F32, 1, (int64_t[]){3}, data);
    tsr_gguf_writer_add_tensor(w, "b", TSR_DTYPE_F32, 1, (int64_t[]){1}, data + 2);
    char *path = tmp_path("aligned.gguf");
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_writer_write(w, path, &err) == 0, "%s", err.msg);
    tsr_gguf_writer_free(w);
    tsr_gguf *g = NULL;
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    ck_assert_uint_eq(tsr_gguf_alignment(g), 256);
    const tsr_gguf_tensor *b = tsr_gguf_find_tensor(g, "b");
    ck_assert_uint_eq(b->offset, 256);
    ck_assert_uint_eq((uintptr_t)b->data % 256, 0);
    ck_assert(*(const float *)b->data == 3.0f);
    tsr_gguf_close(g);

    w = tsr_gguf_writer_new();
    ck_assert_int_lt(tsr_gguf_writer_set_uint(w, "general.alignment", TSR_GGUF_UINT32, 48), 0);
    ck_assert_int_lt(tsr_gguf_writer_write(w, path, &err), 0);
    ck_assert_str_eq(err.msg, fmt("%s: key 'general.alignment': expected a u32 power of two, "
                                  "got u32 48", path));
    tsr_gguf_writer_free(w);
    free(path);
}
END_TEST

START_TEST(getter_errors) {
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    tsr_gguf_writer_set_int(w, "neg", TSR_GGUF_INT8, -3);
    tsr_gguf_writer_set_uint(w, "big", TSR_GGUF_UINT64, UINT64_MAX);
    tsr_gguf_writer_set_uint(w, "n", TSR_GGUF_UINT32, 3);
    tsr_gguf_writer_set_str(w, "s", "x");
    char *path = tmp_path("getters.gguf");
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_gguf_writer_write(w, path, &err), 0);
    tsr_gguf_writer_free(w);
    tsr_gguf *g = NULL;
    ck_assert_int_eq(tsr_gguf_open(path, &g, &err), 0);
    uint64_t u;
    int64_t i;
    bool b;
    tsr_gguf_str s;
    ck_assert(!tsr_gguf_get_u64(g, "neg", &u, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 'neg': -3 is negative, expected an unsigned integer",
                                  path));
    ck_assert(!tsr_gguf_get_i64(g, "big", &i, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 'big': 18446744073709551615 does not fit an int64",
                                  path));
    ck_assert(!tsr_gguf_get_str(g, "n", &s, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 'n': expected str, found u32", path));
    ck_assert(!tsr_gguf_get_bool(g, "s", &b, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 's': expected bool, found str", path));
    ck_assert(!tsr_gguf_get_u64(g, "s", &u, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 's': expected an unsigned integer, found str", path));
    ck_assert(!tsr_gguf_get_arr(g, "n", NULL, NULL, NULL, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 'n': expected an array, found u32", path));
    ck_assert(!tsr_gguf_get_u64(g, "absent", &u, &err));
    ck_assert_str_eq(err.msg, fmt("%s: key 'absent' is missing", path));
    ck_assert(!tsr_gguf_get_u64(g, "absent", &u, NULL));
    tsr_gguf_close(g);
    free(path);
}
END_TEST

START_TEST(writer_refusals_leave_no_file) {
    char *path = tmp_path("refused.gguf");
    char *dir = strdup(path);
    *strrchr(dir, '/') = '\0';
    float x = 0;
    struct {
        void (*build)(tsr_gguf_writer *w, const float *x);
        const char *msg;
    } cases[] = {
        {NULL, "key 'k' is set twice"},
        {NULL, "tensor 't' is added twice"},
        {NULL, "tensor 't': unknown type 4"},
        {NULL, "tensor 't': shape 33 x 1 x 1 x 1 is not valid for Q8_0 (negative, not whole "
               "blocks of 32, or too large)"},
        {NULL, "key 'k': 256 does not fit u8"},
        {NULL, "tensor 't': 5 dimensions, expected 1 to 4"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tsr_gguf_writer *w = tsr_gguf_writer_new();
        switch (c) {
        case 0:
            tsr_gguf_writer_set_str(w, "k", "a");
            ck_assert_int_lt(tsr_gguf_writer_set_bool(w, "k", true), 0);
            break;
        case 1:
            tsr_gguf_writer_add_tensor(w, "t", TSR_DTYPE_F32, 1, (int64_t[]){1}, &x);
            ck_assert_int_lt(tsr_gguf_writer_add_tensor(w, "t", TSR_DTYPE_F32, 1,
                                                        (int64_t[]){1}, &x), 0);
            break;
        case 2: tsr_gguf_writer_add_tensor(w, "t", 4, 1, (int64_t[]){1}, &x); break;
        case 3: tsr_gguf_writer_add_tensor(w, "t", TSR_DTYPE_Q8_0, 1, (int64_t[]){33}, &x); break;
        case 4: tsr_gguf_writer_set_uint(w, "k", TSR_GGUF_UINT8, 256); break;
        default:
            tsr_gguf_writer_add_tensor(w, "t", TSR_DTYPE_F32, 5, (int64_t[]){1, 1, 1, 1, 1}, &x);
            break;
        }
        tsr_gguf_writer_set_str(w, "later", "ok"); /* the first error is the one kept */
        tsr_error err = {{0}};
        ck_assert_int_lt(tsr_gguf_writer_write(w, path, &err), 0);
        ck_assert_str_eq(err.msg, fmt("%s: %s", path, cases[c].msg));
        ck_assert_int_eq(tsr_test_count_entries(dir), 0);
        tsr_gguf_writer_free(w);
    }
    free(dir);
    free(path);
}
END_TEST

START_TEST(writer_is_atomic) {
    char *path = tmp_path("atomic.gguf");
    char *dir = strdup(path);
    *strrchr(dir, '/') = '\0';
    ck_assert_int_eq(tsr_test_write_file(path, "old", 3), 0);
    ck_assert_int_eq(chmod(path, 0640), 0);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    tsr_gguf_writer_set_str(w, "a", "b");
    tsr_error err = {{0}};
    /* A folder that does not exist: the temporary file cannot be created. */
    ck_assert_int_lt(tsr_gguf_writer_write(w, "/nonexistent-dir/x.gguf", &err), 0);
    ck_assert_str_eq(err.msg, "/nonexistent-dir/x.gguf: cannot create: No such file or "
                              "directory");
    /* Replacing an existing file happens in one rename, and the file keeps its mode. */
    ck_assert_int_eq(tsr_gguf_writer_write(w, path, &err), 0);
    ck_assert_int_eq(tsr_test_count_entries(dir), 1);
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_uint_eq(st.st_mode & 0777, 0640);
    tsr_gguf *g = NULL;
    ck_assert_int_eq(tsr_gguf_open(path, &g, &err), 0);
    ck_assert_int_eq(tsr_gguf_n_keys(g), 1);
    tsr_gguf_close(g);
    /* A folder is refused before anything is written. */
    char *folder = tmp_path("a-folder");
    ck_assert_int_eq(mkdir(folder, 0700), 0);
    ck_assert_int_lt(tsr_gguf_writer_write(w, folder, &err), 0);
    ck_assert_str_eq(err.msg, fmt("%s: is a folder; expected a file name", folder));
    ck_assert_int_eq(tsr_test_count_entries(folder), 0);
    tsr_gguf_writer_free(w);
    free(folder);
    free(dir);
    free(path);
}
END_TEST

START_TEST(builder) {
    tsr_gguf *g = tsr_gguf_new("mem");
    tsr_error err = {{0}};
    float data[4] = {1, 2, 3, 4};
    ck_assert_int_eq(tsr_gguf_add_str(g, "general.architecture", "llama", &err), 0);
    ck_assert_int_eq(tsr_gguf_add_int(g, "n", TSR_GGUF_UINT32, 7, &err), 0);
    ck_assert_int_eq(tsr_gguf_add_float(g, "f", TSR_GGUF_FLOAT32, 0.1, &err), 0);
    ck_assert_int_eq(tsr_gguf_add_bool(g, "b", true, &err), 0);
    ck_assert_int_lt(tsr_gguf_add_int(g, "n", TSR_GGUF_UINT32, 8, &err), 0);
    ck_assert_str_eq(err.msg, "mem: key 'n' appears twice (keys 1 and 4)");
    ck_assert_int_lt(tsr_gguf_add_int(g, "m", TSR_GGUF_UINT8, 300, &err), 0);
    ck_assert_str_eq(err.msg, "mem: key 'm': 300 is not a valid u8");
    ck_assert_int_lt(tsr_gguf_add_float(g, "m", TSR_GGUF_INT32, 1, &err), 0);
    ck_assert_str_eq(err.msg, "mem: key 'm': i32 is not a float type");
    ck_assert_int_eq(tsr_gguf_add_tensor(g, "w", TSR_DTYPE_F32, 2, (int64_t[]){2, 2}, data, 0,
                                         &err), 0);
    ck_assert_int_lt(tsr_gguf_add_tensor(g, "w", TSR_DTYPE_F32, 1, (int64_t[]){1}, data, 0,
                                         &err), 0);
    ck_assert_str_eq(err.msg, "mem: tensor 'w' appears twice (tensors 0 and 1)");
    ck_assert_int_lt(tsr_gguf_add_tensor(g, "x", TSR_DTYPE_F32, 1, (int64_t[]){-1}, data, 0,
                                         &err), 0);
    ck_assert_str_eq(err.msg, "mem: tensor 'x': ne[0] = -1 is negative");
    ck_assert_int_lt(tsr_gguf_add_tensor(g, "x", TSR_DTYPE_Q4_0, 1, (int64_t[]){16}, data, 0,
                                         &err), 0);
    ck_assert_str_eq(err.msg, "mem: tensor 'x': ne[0] = 16 is not a multiple of the Q4_0 block "
                              "size 32");
    /* Failed additions leave the model as it was. */
    ck_assert_int_eq(tsr_gguf_n_keys(g), 4);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), 1);
    ck_assert_uint_eq(tsr_gguf_version(g), 0);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "n", 0), 7);
    ck_assert(tsr_gguf_f64_or(g, "f", 0) == (double)0.1f);
    ck_assert(tsr_gguf_bool_or(g, "b", false));
    ck_assert_ptr_eq(tsr_gguf_find_tensor(g, "w")->data, data);
    ck_assert_uint_eq(tsr_gguf_find_tensor(g, "w")->size, 16);
    tsr_gguf_close(g);
}
END_TEST

/* ---------------------------------------------------------------------------------------- */
/* Malformed files                                                                            */

START_TEST(valid_reference_opens) {
    gguf_bytes b = valid_file(NULL);
    tsr_gguf *g = open_ok(&b);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), 1);
    ck_assert(((const float *)tsr_gguf_tensor_at(g, 0)->data)[7] == 7.0f);
    tsr_gguf_close(g);
    /* Version 2 has the same layout. */
    b.p[4] = 2;
    g = open_ok(&b);
    ck_assert_uint_eq(tsr_gguf_version(g), 2);
    tsr_gguf_close(g);
    free(b.p);
}
END_TEST

START_TEST(bad_magic_and_version) {
    gguf_bytes b = valid_file(NULL);
    b.p[0] = 'X';
    expect_error(&b, "t.gguf: offset 0: bad magic 0x46554758, expected 0x46554747 (\"GGUF\")");
    b.p[0] = 'G';
    b.p[4] = 1;
    expect_error(&b, "t.gguf: offset 4: GGUF version 1 is not supported (only 2 and 3); convert "
                     "the file again with a current llama.cpp");
    b.p[4] = 4;
    expect_error(&b, "t.gguf: offset 4: GGUF version 4 is not supported (only 2 and 3)");
    uint32_t be = 0x03000000u;
    memcpy(b.p + 4, &be, 4);
    expect_error(&b, "t.gguf: offset 4: big-endian GGUF files are not supported");
    free(b.p);
}
END_TEST

START_TEST(truncated) {
    gguf_bytes b = valid_file(NULL);
    gguf_bytes cut = {.p = b.p, .len = 0};
    expect_error(&cut, "t.gguf: offset 0: file ends in the magic (4 bytes needed, 0 left)");
    cut.len = 10;
    expect_error(&cut, "t.gguf: offset 8: file ends in the tensor count (8 bytes needed, 2 left)");
    cut.len = 20;
    expect_error(&cut, "t.gguf: offset 16: file ends in the key count (8 bytes needed, 4 left)");
    /* In the middle of the key's name (header 24 bytes + 8 length + 20 name). */
    cut.len = 40;
    expect_error(&cut, "t.gguf: offset 24: the name of key 0: length 20 exceeds the rest of "
                       "the file (8 bytes)");
    cut.len = 54;
    expect_error(&cut, "t.gguf: offset 52: file ends in the type of key 'general.architecture' "
                       "(4 bytes needed, 2 left)");
    cut.len = 66;
    expect_error(&cut, "t.gguf: offset 56: the value of key 'general.architecture': length 5 "
                       "exceeds the rest of the file (2 bytes)");
    cut.len = 95;
    expect_error(&cut, "t.gguf: offset 94: file ends in the offset of tensor 'a' (8 bytes "
                       "needed, 1 left)");
    /* The tensor table needs 24 bytes per tensor at least. */
    cut.len = 88;
    expect_error(&cut, "t.gguf: offset 8: tensor count 1 exceeds the file size (88 bytes)");
    /* Tensor data cut short: the table ends at 102, the data section starts at 128. */
    cut.len = b.len - 4;
    expect_error(&cut, "t.gguf: offset 128: tensor 'a': 32 bytes of data run past the end of the "
                       "file (156 bytes)");
    cut.len = b.len - 1; /* the tensor ends exactly at the end of the whole file */
    expect_error(&cut, "t.gguf: offset 128: tensor 'a': 32 bytes of data run past the end of the "
                       "file (159 bytes)");
    cut.len = 120;
    expect_error(&cut, "t.gguf: tensor 'a': data offset 0 is past the end of the file (120 bytes, "
                       "data section at 128)");
    free(b.p);
}
END_TEST

/* Every byte of a file whose last tensor ends at its last byte is needed: each shorter
 * prefix (held in a buffer of exactly that size, so ASan sees any read past it) is refused
 * with one line, and the whole file opens. */
static void expect_every_prefix_refused(const uint8_t *file, size_t size) {
    for (size_t n = 0; n < size; n++) {
        uint8_t *exact = malloc(n ? n : 1);
        memcpy(exact, file, n);
        tsr_gguf *g = (tsr_gguf *)1;
        tsr_error err = {{0}};
        int rc = tsr_gguf_open_memory(exact, n, "t.gguf", &g, &err);
        ck_assert_msg(rc < 0, "a prefix of %zu of %zu bytes opened", n, size);
        ck_assert_ptr_null(g);
        ck_assert_msg(strncmp(err.msg, "t.gguf: ", 8) == 0 && !strchr(err.msg, '\n'),
                      "prefix of %zu bytes: %s", n, err.msg);
        free(exact);
    }
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open_memory(file, size, "t.gguf", &g, &err) == 0, "%s", err.msg);
    tsr_gguf_close(g);
}

START_TEST(every_prefix_refused) {
    gguf_bytes b = valid_file(NULL);
    expect_every_prefix_refused(b.p, b.len);
    free(b.p);
    uint8_t q8[12 * 34], q4k[2 * 144];
    char *path = write_everything(q8, sizeof q8, q4k, sizeof q4k);
    size_t size;
    uint8_t *file = (uint8_t *)tsr_test_read_file(path, &size);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open_memory(file, size, "t.gguf", &g, &err) == 0, "%s", err.msg);
    const tsr_gguf_tensor *last = tsr_gguf_find_tensor(g, "q4k");
    ck_assert_ptr_eq((const uint8_t *)last->data + last->size, file + size);
    tsr_gguf_close(g);
    expect_every_prefix_refused(file, size);
    free(file);
    free(path);
}
END_TEST

START_TEST(empty_tensor_at_the_end) {
    /* A tensor of 0 elements may sit exactly at the end of the file: it holds no bytes. */
    gguf_bytes b = placed_file((placed[]){{"a", 8, 0}, {"none", 0, 32}}, 2, 32);
    tsr_gguf *g = open_ok(&b);
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, "none");
    ck_assert_uint_eq(t->size, 0);
    ck_assert_ptr_eq(t->data, b.p + b.len);
    tsr_gguf_close(g);
    /* One alignment step further is past the end. */
    free(b.p);
    b = placed_file((placed[]){{"a", 8, 0}, {"none", 0, 64}}, 2, 32);
    expect_error(&b, "t.gguf: tensor 'none': data offset 64 is past the end of the file (128 "
                     "bytes, data section at 96)");
    free(b.p);
}
END_TEST

START_TEST(truncated_scalar_value) {
    gguf_bytes b = one_key("a.b", TSR_GGUF_UINT64);
    gb_u32(&b, 7); /* half of the u64 */
    gb_u32(&b, 7); /* padding so the key count check passes (13 bytes at least) */
    b.len -= 4;
    expect_error(&b, "t.gguf: offset 39: file ends in the value of key 'a.b' (8 bytes needed, "
                     "4 left)");
    free(b.p);
}
END_TEST

START_TEST(huge_counts) {
    gguf_bytes b = valid_file(NULL);
    uint64_t huge = 1ull << 40;
    memcpy(b.p + 16, &huge, 8);
    expect_error(&b, "t.gguf: offset 16: key count 1099511627776 exceeds the file size (160 "
                     "bytes)");
    uint64_t one = 1;
    memcpy(b.p + 16, &one, 8);
    uint64_t max = UINT64_MAX;
    memcpy(b.p + 8, &max, 8);
    expect_error(&b, "t.gguf: offset 8: tensor count 18446744073709551615 exceeds the file size "
                     "(160 bytes)");
    /* Each key needs 13 bytes at least: 11 keys do not fit in the 132 bytes after the header. */
    uint64_t eleven = 11;
    memcpy(b.p + 8, &one, 8);
    memcpy(b.p + 16, &eleven, 8);
    expect_error(&b, "t.gguf: offset 16: key count 11 exceeds the file size (160 bytes)");
    free(b.p);
}
END_TEST

START_TEST(huge_array_and_string_lengths) {
    gguf_bytes b = one_key("arr", TSR_GGUF_ARRAY);
    gb_u32(&b, TSR_GGUF_UINT32);
    gb_u64(&b, 1ull << 61); /* times 4 bytes wraps to 0 in 64 bits */
    gb_u64(&b, 0);
    expect_error(&b, "t.gguf: offset 43: key 'arr': array length 2305843009213693952 exceeds "
                     "the rest of the file (8 bytes)");
    free(b.p);

    b = one_key("tokens", TSR_GGUF_ARRAY);
    gb_u32(&b, TSR_GGUF_STRING);
    gb_u64(&b, 3);
    gb_str(&b, "a");
    gb_u64(&b, UINT64_MAX); /* second string's length */
    gb_str(&b, "c");
    expect_error(&b, "t.gguf: offset 63: element 1 of key 'tokens': length 18446744073709551615 "
                     "exceeds the rest of the file (9 bytes)");
    free(b.p);

    b = (gguf_bytes){0};
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, 1ull << 62); /* key name length */
    gb_u64(&b, 0);
    expect_error(&b, "t.gguf: offset 24: the name of key 0: length 4611686018427387904 exceeds "
                     "the rest of the file (8 bytes)");
    free(b.p);
}
END_TEST

START_TEST(bad_metadata_types) {
    gguf_bytes b = one_key("k", 13);
    gb_u64(&b, 0);
    expect_error(&b, "t.gguf: offset 33: key 'k': unknown value type 13, expected 0 to 12");
    free(b.p);

    b = one_key("k", TSR_GGUF_ARRAY);
    gb_u32(&b, 99);
    gb_u64(&b, 0);
    expect_error(&b, "t.gguf: offset 37: key 'k': unknown array element type 99, expected 0 to "
                     "12");
    free(b.p);

    b = one_key("k", TSR_GGUF_ARRAY);
    gb_u32(&b, TSR_GGUF_ARRAY);
    gb_u64(&b, 0);
    expect_error(&b, "t.gguf: offset 37: key 'k': arrays of arrays are not supported");
    free(b.p);

    b = (gguf_bytes){0};
    gb_header(&b, 3, 0, 1);
    gb_u64(&b, 3);
    gb_put(&b, "a\0b", 3);
    gb_u32(&b, TSR_GGUF_BOOL);
    gb_put(&b, "\1", 1);
    expect_error(&b, "t.gguf: offset 24: the name of key 0 contains the control byte 0x00");
    free(b.p);
}
END_TEST

START_TEST(duplicate_keys) {
    gguf_bytes b = {0};
    gb_header(&b, 3, 0, 3);
    gb_str(&b, "a.b");
    gb_u32(&b, TSR_GGUF_UINT8);
    gb_put(&b, "\1", 1);
    gb_str(&b, "a.c");
    gb_u32(&b, TSR_GGUF_UINT8);
    gb_put(&b, "\1", 1);
    size_t at = b.len;
    gb_str(&b, "a.b");
    gb_u32(&b, TSR_GGUF_STRING);
    gb_str(&b, "x");
    ck_assert_uint_eq(at, 56);
    expect_error(&b, "t.gguf: offset 56: key 'a.b' appears twice (keys 0 and 2)");
    free(b.p);
}
END_TEST

START_TEST(bad_alignment) {
    for (uint32_t a = 0; a < 4; a += 3) {
        gguf_bytes b = one_key("general.alignment", TSR_GGUF_UINT32);
        gb_u32(&b, a);
        expect_error(&b, fmt("t.gguf: key 'general.alignment': %u is not a power of two", a));
        free(b.p);
    }
    gguf_bytes b = one_key("general.alignment", TSR_GGUF_STRING);
    gb_str(&b, "32");
    expect_error(&b, "t.gguf: key 'general.alignment': expected an unsigned integer, found str");
    free(b.p);
    /* A huge power of two is legal but leaves no room for the data section. */
    b = (gguf_bytes){0};
    gb_header(&b, 3, 1, 1);
    gb_str(&b, "general.alignment");
    gb_u32(&b, TSR_GGUF_UINT64);
    gb_u64(&b, 1ull << 63);
    tensor_info(&b, "a", 1, (uint64_t[]){1}, TSR_DTYPE_F32, 0, NULL);
    expect_error(&b, "t.gguf: tensor 'a': data offset 0 is past the end of the file (94 bytes, "
                     "data section at 9223372036854775808)");
    free(b.p);
}
END_TEST

START_TEST(bad_tensor_offsets) {
    size_t at_offset;
    gguf_bytes b = valid_file(&at_offset);
    uint64_t off = 4096;
    memcpy(b.p + at_offset, &off, 8);
    expect_error(&b, "t.gguf: tensor 'a': data offset 4096 is past the end of the file (160 "
                     "bytes, data section at 128)");
    off = 4;
    memcpy(b.p + at_offset, &off, 8);
    expect_error(&b, fmt("t.gguf: offset %zu: tensor 'a': data offset 4 is not a multiple of "
                         "the alignment 32", at_offset));
    off = UINT64_MAX - 31;
    memcpy(b.p + at_offset, &off, 8);
    expect_error(&b, "t.gguf: tensor 'a': data offset 18446744073709551584 is past the end of "
                     "the file (160 bytes, data section at 128)");
    off = 32; /* inside the file, but the 32 bytes of data would end 32 bytes past it */
    memcpy(b.p + at_offset, &off, 8);
    expect_error(&b, "t.gguf: offset 160: tensor 'a': 32 bytes of data run past the end of the "
                     "file (160 bytes)");
    free(b.p);
}
END_TEST

/* Files with one bad tensor info (and no keys) followed by `data` bytes, and the error each
 * must give at the offset of the info's field `at`. */
typedef enum info_field { AT_N_DIMS, AT_NE0, AT_TYPE } info_field;

static const struct bad_tensor {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[5];
    uint32_t type;
    size_t data;
    info_field at;
    const char *error; /* %zu: the offset */
} bad_tensors[] = {
    {"a", 1, {8}, 99, 64, AT_TYPE, "t.gguf: offset %zu: tensor 'a': unknown type 99"},
    {"a", 1, {8}, 4 /* Q4_2, removed */, 64, AT_TYPE,
     "t.gguf: offset %zu: tensor 'a': unknown type 4"},
    {"w", 2, {33, 2}, TSR_DTYPE_Q8_0, 128, AT_TYPE,
     "t.gguf: offset %zu: tensor 'w': ne[0] = 33 is not a multiple of the Q8_0 block size 32"},
    {"w", 5, {1, 1, 1, 1, 1}, TSR_DTYPE_F32, 32, AT_N_DIMS,
     "t.gguf: offset %zu: tensor 'w': 5 dimensions, at most 4 are supported"},
    {"w", 2, {1ull << 40, 1ull << 40}, TSR_DTYPE_F32, 32, AT_TYPE,
     "t.gguf: offset %zu: tensor 'w': 1099511627776 x 1099511627776 x 1 x 1 elements of F32 "
     "overflow the size"},
    {"w", 1, {UINT64_MAX}, TSR_DTYPE_F32, 32, AT_NE0,
     "t.gguf: offset %zu: tensor 'w': ne[0] = 18446744073709551615 is too large"},
};

START_TEST(bad_tensor_types_and_shapes) {
    for (size_t i = 0; i < sizeof bad_tensors / sizeof bad_tensors[0]; i++) {
        const struct bad_tensor *c = &bad_tensors[i];
        gguf_bytes b = {0};
        tensor_file(&b, 1);
        size_t at[3];
        at[AT_N_DIMS] = b.len + 8 + strlen(c->name); /* after the name's length and bytes */
        at[AT_NE0] = at[AT_N_DIMS] + 4;
        tensor_info(&b, c->name, c->n_dims, c->ne, c->type, 0, &at[AT_TYPE]);
        data_bytes(&b, c->data);
        expect_error(&b, fmt(c->error, at[c->at]));
        free(b.p);
    }
}
END_TEST

START_TEST(duplicate_tensors) {
    gguf_bytes b = {0};
    tensor_file(&b, 3);
    tensor_info(&b, "x", 1, (uint64_t[]){8}, TSR_DTYPE_F32, 0, NULL);
    tensor_info(&b, "y", 1, (uint64_t[]){8}, TSR_DTYPE_F32, 32, NULL);
    size_t at = b.len;
    tensor_info(&b, "x", 1, (uint64_t[]){8}, TSR_DTYPE_F32, 64, NULL);
    data_bytes(&b, 96);
    expect_error(&b, fmt("t.gguf: offset %zu: tensor 'x' appears twice (tensors 0 and 2)", at));
    free(b.p);
}
END_TEST

START_TEST(overlapping_tensors) {
    static const struct {
        placed t[3];
        size_t n, data;
        const char *error; /* NULL: opens */
    } cases[] = {
        /* the second starts inside the first */
        {{{"a", 16, 0}, {"b", 8, 32}}, 2, 64,
         "t.gguf: tensor 'b': data at offset 32 (32 bytes) overlaps tensor 'a' at offset 0 (64 "
         "bytes)"},
        /* the same bytes twice: named in table order */
        {{{"a", 8, 0}, {"b", 8, 0}}, 2, 32,
         "t.gguf: tensor 'b': data at offset 0 (32 bytes) overlaps tensor 'a' at offset 0 (32 "
         "bytes)"},
        /* listed out of order: the later-listed tensor covers the earlier one */
        {{{"x", 8, 64}, {"y", 24, 0}}, 2, 96,
         "t.gguf: tensor 'x': data at offset 64 (32 bytes) overlaps tensor 'y' at offset 0 (96 "
         "bytes)"},
        /* one byte of overlap is enough: 9 floats end 4 bytes into the next slot */
        {{{"a", 9, 0}, {"b", 8, 64}, {"c", 8, 32}}, 3, 96,
         "t.gguf: tensor 'c': data at offset 32 (32 bytes) overlaps tensor 'a' at offset 0 (36 "
         "bytes)"},
        /* back to back, in any order, and an empty tensor anywhere: no overlap */
        {{{"b", 8, 32}, {"a", 8, 0}, {"c", 8, 64}}, 3, 96, NULL},
        {{{"a", 8, 0}, {"none", 0, 0}, {"b", 8, 32}}, 3, 64, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gguf_bytes b = placed_file(cases[i].t, cases[i].n, cases[i].data);
        if (cases[i].error) {
            expect_error(&b, cases[i].error);
        } else {
            tsr_gguf *g = open_ok(&b);
            ck_assert_int_eq(tsr_gguf_n_tensors(g), (int64_t)cases[i].n);
            tsr_gguf_close(g);
        }
        free(b.p);
    }
}
END_TEST

START_TEST(vocab_only_file) {
    /* No tensors and no padding after the table: valid (llama.cpp's vocab files). */
    gguf_bytes b = one_key("tokenizer.ggml.tokens", TSR_GGUF_ARRAY);
    gb_u32(&b, TSR_GGUF_STRING);
    gb_u64(&b, 2);
    gb_str(&b, "<unk>");
    gb_str(&b, "hi");
    tsr_gguf *g = open_ok(&b);
    int64_t k;
    uint64_t n;
    tsr_gguf_type t;
    ck_assert(tsr_gguf_get_arr(g, "tokenizer.ggml.tokens", &k, &t, &n, NULL));
    ck_assert_uint_eq(n, 2);
    ck_assert_uint_eq(tsr_gguf_arr_str(g, k, 1).len, 2);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), 0);
    tsr_gguf_close(g);
    free(b.p);
}
END_TEST

START_TEST(open_errors) {
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_gguf_open("/nonexistent/m.gguf", &g, &err), TSR_E_IO);
    ck_assert_str_eq(err.msg, "/nonexistent/m.gguf: cannot open: No such file or directory");
    ck_assert_int_eq(tsr_gguf_open("/tmp", &g, &err), TSR_E_IO);
    ck_assert_str_eq(err.msg, "/tmp: a folder, not a regular file");
    /* Refused at once: opening a FIFO to read it would wait for a writer forever. */
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    ck_assert_int_eq(tsr_gguf_open(fifo, &g, &err), TSR_E_IO);
    ck_assert_str_eq(err.msg, fmt("%s: a FIFO, not a regular file", fifo));
    ck_assert_ptr_null(g);
    unlink(fifo);
    free(fifo);
    char *path = tmp_path("empty.gguf");
    ck_assert_int_eq(tsr_test_write_file(path, "", 0), 0);
    ck_assert_int_lt(tsr_gguf_open(path, &g, &err), 0);
    ck_assert_str_eq(err.msg, fmt("%s: offset 0: file ends in the magic (4 bytes needed, 0 left)",
                                  path));
    ck_assert_ptr_null(g);
    free(path);
}
END_TEST

/* Reads everything a model exposes, so the sanitizers see every access. */
static void walk(const tsr_gguf *g) {
    char buf[64];
    for (int64_t k = 0; k < tsr_gguf_n_keys(g); k++) {
        tsr_gguf_key_format(g, k, buf, sizeof buf);
        ck_assert_int_eq(tsr_gguf_find_key(g, tsr_gguf_key_name(g, k)), k);
        if (tsr_gguf_key_type(g, k) != TSR_GGUF_ARRAY) continue;
        for (uint64_t i = 0; i < tsr_gguf_arr_len(g, k); i++) {
            tsr_gguf_str s = tsr_gguf_arr_str(g, k, i);
            if (s.len) ck_assert(s.ptr[0] == s.ptr[0] && s.ptr[s.len - 1] == s.ptr[s.len - 1]);
            (void)tsr_gguf_arr_f64(g, k, i);
        }
    }
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        ck_assert_ptr_eq(tsr_gguf_find_tensor(g, t->name), t);
        unsigned sum = 0;
        for (size_t j = 0; j < t->size; j++) sum += ((const uint8_t *)t->data)[j];
        (void)sum;
    }
}

START_TEST(random_corruption) {
    uint8_t q8[12 * 34], q4k[2 * 144];
    char *path = write_everything(q8, sizeof q8, q4k, sizeof q4k);
    size_t size;
    uint8_t *orig = (uint8_t *)tsr_test_read_file(path, &size);
    uint8_t *buf = malloc(size);
    uint64_t state = 42;
    int opened = 0, refused = 0;
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, size);
        int flips = 1 + iter % 4;
        for (int f = 0; f < flips; f++) {
            state = state * 6364136223846793005u + 1442695040888963407u;
            /* Most flips land in the header and tables, where the parser works. */
            size_t limit = iter % 2 ? size : 700;
            buf[(state >> 33) % limit] ^= (uint8_t)(1u << ((state >> 20) % 8));
        }
        size_t n = iter % 3 == 0 ? (size_t)((state >> 13) % size) : size;
        /* A private copy of exactly n bytes, so reads past the end are caught by ASan. */
        uint8_t *exact = malloc(n ? n : 1);
        memcpy(exact, buf, n);
        tsr_gguf *g = NULL;
        tsr_error err = {{0}};
        if (tsr_gguf_open_memory(exact, n, "t.gguf", &g, &err) == 0) {
            walk(g);
            tsr_gguf_close(g);
            opened++;
        } else {
            ck_assert_msg(strncmp(err.msg, "t.gguf: ", 8) == 0 && !strchr(err.msg, '\n'),
                          "bad message: %s", err.msg);
            refused++;
        }
        free(exact);
    }
    ck_assert_int_gt(opened, 0);
    ck_assert_int_gt(refused, 0);
    free(buf);
    free(orig);
    free(path);
}
END_TEST

static Suite *gguf_suite(void) {
    const tsr_test_case cases[] = {
        {"dtype", dtype_sizes},
        {"round_trip_metadata", round_trip_metadata},
        {"round_trip_arrays", round_trip_arrays},
        {"round_trip_tensors", round_trip_tensors},
        {"custom_alignment", custom_alignment},
        {"getter_errors", getter_errors},
        {"writer_refusals", writer_refusals_leave_no_file},
        {"writer_atomic", writer_is_atomic},
        {"builder", builder},
        {"valid_reference", valid_reference_opens},
        {"bad_magic_version", bad_magic_and_version},
        {"truncated", truncated},
        {"every_prefix_refused", every_prefix_refused},
        {"empty_tensor_at_the_end", empty_tensor_at_the_end},
        {"truncated_scalar", truncated_scalar_value},
        {"huge_counts", huge_counts},
        {"huge_lengths", huge_array_and_string_lengths},
        {"bad_metadata_types", bad_metadata_types},
        {"duplicate_keys", duplicate_keys},
        {"bad_alignment", bad_alignment},
        {"bad_tensor_offsets", bad_tensor_offsets},
        {"bad_tensor_types", bad_tensor_types_and_shapes},
        {"duplicate_tensors", duplicate_tensors},
        {"overlapping_tensors", overlapping_tensors},
        {"vocab_only", vocab_only_file},
        {"open_errors", open_errors},
        {"random_corruption", random_corruption},
    };
    return tsr_test_suite("gguf", cases, sizeof cases / sizeof cases[0]);
}

int main(void) {
    return tsr_test_run_suite(gguf_suite());
}
