/* Model files against the shared data (TESSERA_TEST_DATA): llama.cpp's fixture GGUFs and
 * vocab files open with the documented contents, stories260K.bin read through the llama2.c
 * reader equals stories260K.gguf tensor by tensor, and a fixture copied through the writer
 * reads back identical. Exits 77 (skipped) when the data is absent. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files/dtype.h"
#include "files/gguf.h"
#include "files/gguf_write.h"
#include "files/llama2c.h"
#include "testutil.h"

static tsr_gguf *open_data(const char *rel) {
    char *path = tsr_test_require_data(rel);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    free(path);
    return g;
}

static void assert_str_key(const tsr_gguf *g, const char *key, const char *expected) {
    tsr_gguf_str s;
    tsr_error err;
    ck_assert_msg(tsr_gguf_get_str(g, key, &s, &err), "%s", err.msg);
    ck_assert_uint_eq(s.len, strlen(expected));
    ck_assert(memcmp(s.ptr, expected, s.len) == 0);
}

static void assert_type(const tsr_gguf *g, const char *tensor, int32_t dtype) {
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, tensor);
    ck_assert_msg(t != NULL, "%s missing", tensor);
    ck_assert_msg(t->dtype == dtype, "%s is %s", tensor, tsr_dtype_name(t->dtype));
}

static const struct {
    const char *file;
    const char *arch;
    int64_t n_tensors;
    int32_t matrix_type; /* of blk.0.attn_q.weight */
    int32_t output_type;
} models[] = {
    {"fixtures/models/llama-tiny-f32.gguf", "llama", 21, TSR_DTYPE_F32, TSR_DTYPE_F32},
    {"fixtures/models/llama-tiny-f16.gguf", "llama", 21, TSR_DTYPE_F16, TSR_DTYPE_F16},
    {"fixtures/models/llama-tiny-q8_0.gguf", "llama", 21, TSR_DTYPE_Q8_0, TSR_DTYPE_Q8_0},
    {"fixtures/models/llama-tiny-q4_0.gguf", "llama", 21, TSR_DTYPE_Q4_0, TSR_DTYPE_Q6_K},
    {"fixtures/models/llama-tiny-q4_k_m.gguf", "llama", 21, TSR_DTYPE_Q4_K, TSR_DTYPE_Q6_K},
    {"fixtures/models/llama-tiny-q6_k.gguf", "llama", 21, TSR_DTYPE_Q6_K, TSR_DTYPE_Q6_K},
    {"fixtures/models/qwen2-tiny-f32.gguf", "qwen2", 27, TSR_DTYPE_F32, TSR_DTYPE_F32},
    {"fixtures/models/qwen2-tiny-q8_0.gguf", "qwen2", 27, TSR_DTYPE_Q8_0, TSR_DTYPE_Q8_0},
    {"fixtures/models/moe-tiny-f32.gguf", "llama", 23, TSR_DTYPE_F32, TSR_DTYPE_F32},
    {"fixtures/models/moe-tiny-q8_0.gguf", "llama", 23, TSR_DTYPE_Q8_0, TSR_DTYPE_Q8_0},
};

START_TEST(fixture_models) {
    tsr_gguf *g = open_data(models[_i].file);
    char key[128];
    ck_assert_uint_eq(tsr_gguf_version(g), 3);
    ck_assert_uint_eq(tsr_gguf_alignment(g), 32);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), models[_i].n_tensors);
    assert_str_key(g, "general.architecture", models[_i].arch);
    assert_str_key(g, "tokenizer.ggml.model", "llama");
    snprintf(key, sizeof key, "%s.embedding_length", models[_i].arch);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, key, 0), 256);
    snprintf(key, sizeof key, "%s.block_count", models[_i].arch);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, key, 0), 2);
    snprintf(key, sizeof key, "%s.attention.head_count_kv", models[_i].arch);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, key, 0), 4);
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", models[_i].arch);
    ck_assert(tsr_gguf_f64_or(g, key, 0) == (double)1e-5f);

    int64_t k;
    tsr_gguf_type t;
    uint64_t n;
    ck_assert(tsr_gguf_get_arr(g, "tokenizer.ggml.tokens", &k, &t, &n, NULL));
    ck_assert_int_eq(t, TSR_GGUF_STRING);
    ck_assert_uint_eq(n, 512);
    tsr_gguf_str s = tsr_gguf_arr_str(g, k, 1);
    ck_assert(s.len == 3 && memcmp(s.ptr, "<s>", 3) == 0);
    s = tsr_gguf_arr_str(g, k, 3);
    ck_assert(s.len == 6 && memcmp(s.ptr, "<0x00>", 6) == 0);
    ck_assert(tsr_gguf_get_arr(g, "tokenizer.ggml.token_type", &k, &t, &n, NULL));
    ck_assert_uint_eq(n, 512);
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 0), 2); /* unknown */
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 1), 3); /* control */
    ck_assert_int_eq(tsr_gguf_arr_i64(g, k, 3), 6); /* byte */
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "tokenizer.ggml.bos_token_id", 0), 1);

    assert_type(g, "blk.0.attn_q.weight", models[_i].matrix_type);
    assert_type(g, "output.weight", models[_i].output_type);
    assert_type(g, "output_norm.weight", TSR_DTYPE_F32);
    const tsr_gguf_tensor *embd = tsr_gguf_find_tensor(g, "token_embd.weight");
    ck_assert(embd->n_dims == 2 && embd->ne[0] == 256 && embd->ne[1] == 512);
    const tsr_gguf_tensor *q = tsr_gguf_find_tensor(g, "blk.1.attn_k.weight");
    ck_assert(q->ne[0] == 256 && q->ne[1] == 128);
    ck_assert_uint_eq(q->size, tsr_dtype_row_bytes(q->dtype, 256) * 128);
    if (strncmp(models[_i].file, "fixtures/models/moe", 19) == 0) {
        const tsr_gguf_tensor *e = tsr_gguf_find_tensor(g, "blk.0.ffn_down_exps.weight");
        ck_assert(e->n_dims == 3 && e->ne[0] == 128 && e->ne[1] == 256 && e->ne[2] == 4);
        assert_type(g, "blk.0.ffn_gate_inp.weight", TSR_DTYPE_F32);
        ck_assert_uint_eq(tsr_gguf_u64_or(g, "llama.expert_count", 0), 4);
    }
    if (strcmp(models[_i].arch, "qwen2") == 0) assert_type(g, "blk.1.attn_v.bias", TSR_DTYPE_F32);
    tsr_gguf_close(g);
}
END_TEST

START_TEST(q4_k_m_mixed_types) {
    tsr_gguf *g = open_data("fixtures/models/llama-tiny-q4_k_m.gguf");
    assert_type(g, "blk.0.attn_v.weight", TSR_DTYPE_Q4_K);
    assert_type(g, "blk.1.attn_v.weight", TSR_DTYPE_Q6_K);
    assert_type(g, "blk.1.ffn_down.weight", TSR_DTYPE_Q6_K);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "general.file_type", 0), 15);
    tsr_gguf_close(g);
}
END_TEST

START_TEST(vocab_files) {
    static const struct {
        const char *file, *model;
        uint64_t n_tokens; /* 0: only check it is a non-empty array */
    } vocabs[] = {
        {"fixtures/vocab/ggml-vocab-llama-spm.gguf", "llama", 32000},
        {"fixtures/vocab/ggml-vocab-gpt-2.gguf", "gpt2", 50257},
        {"fixtures/vocab/ggml-vocab-deepseek-coder.gguf", "gpt2", 0},
        {"fixtures/vocab/ggml-vocab-falcon.gguf", "gpt2", 0},
        {"fixtures/vocab/ggml-vocab-starcoder.gguf", "gpt2", 0},
    };
    for (size_t i = 0; i < sizeof vocabs / sizeof vocabs[0]; i++) {
        tsr_gguf *g = open_data(vocabs[i].file);
        assert_str_key(g, "tokenizer.ggml.model", vocabs[i].model);
        int64_t k;
        uint64_t n;
        ck_assert(tsr_gguf_get_arr(g, "tokenizer.ggml.tokens", &k, NULL, &n, NULL));
        if (vocabs[i].n_tokens) ck_assert_uint_eq(n, vocabs[i].n_tokens);
        ck_assert_uint_gt(n, 1000);
        ck_assert_int_eq(tsr_gguf_n_tensors(g), 0);
        if (strcmp(vocabs[i].model, "gpt2") == 0) {
            uint64_t n_merges;
            ck_assert(tsr_gguf_get_arr(g, "tokenizer.ggml.merges", &k, NULL, &n_merges, NULL));
            ck_assert_uint_gt(n_merges, 1000);
            ck_assert_uint_gt(tsr_gguf_arr_str(g, k, n_merges - 1).len, 2);
        }
        tsr_gguf_close(g);
    }
}
END_TEST

START_TEST(stories260k_bin_equals_gguf) {
    char *bin_path = tsr_test_require_data("models/stories260K.bin");
    tsr_gguf *gg = open_data("models/stories260K.gguf");
    tsr_gguf *bin = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_llama2c_open(bin_path, &bin, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(tsr_gguf_n_tensors(gg), 48);
    ck_assert_int_eq(tsr_gguf_n_tensors(bin), 48);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(bin); i++) {
        const tsr_gguf_tensor *a = tsr_gguf_tensor_at(bin, i);
        const tsr_gguf_tensor *b = tsr_gguf_find_tensor(gg, a->name);
        ck_assert_msg(b != NULL, "%s is not in the GGUF", a->name);
        ck_assert_int_eq(a->dtype, b->dtype);
        ck_assert_uint_eq(a->n_dims, b->n_dims);
        for (int d = 0; d < 4; d++) ck_assert_int_eq(a->ne[d], b->ne[d]);
        ck_assert_uint_eq(a->size, b->size);
        ck_assert_msg(memcmp(a->data, b->data, a->size) == 0, "%s differs", a->name);
    }
    /* Tied classifier: output.weight is the embedding itself, not a copy. */
    ck_assert_ptr_eq(tsr_gguf_find_tensor(bin, "output.weight")->data,
                     tsr_gguf_find_tensor(bin, "token_embd.weight")->data);
    static const char *const same[] = {
        "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
        "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.dimension_count"};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++)
        ck_assert_uint_eq(tsr_gguf_u64_or(bin, same[i], 0), tsr_gguf_u64_or(gg, same[i], 1));
    ck_assert(tsr_gguf_f64_or(bin, "llama.attention.layer_norm_rms_epsilon", 0) ==
              tsr_gguf_f64_or(gg, "llama.attention.layer_norm_rms_epsilon", 1));
    ck_assert_uint_eq(tsr_gguf_u64_or(bin, "llama.context_length", 0), 512);
    tsr_gguf_close(bin);
    tsr_gguf_close(gg);
    free(bin_path);
}
END_TEST

START_TEST(writer_copies_a_fixture) {
    tsr_gguf *g = open_data("fixtures/models/llama-tiny-q4_k_m.gguf");
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    for (int64_t k = 0; k < tsr_gguf_n_keys(g); k++)
        ck_assert_int_eq(tsr_gguf_writer_copy_key(w, g, k), 0);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, t->name, t->dtype, t->n_dims, t->ne,
                                                    t->data), 0);
    }
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/copy.gguf", dir);
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_writer_write(w, path, &err) == 0, "%s", err.msg);
    tsr_gguf_writer_free(w);

    /* llama.cpp wrote the original with the same layout rules, so the bytes are the same. */
    size_t n_orig, n_copy;
    char *orig_path = tsr_test_require_data("fixtures/models/llama-tiny-q4_k_m.gguf");
    char *orig = tsr_test_read_file(orig_path, &n_orig);
    char *copy = tsr_test_read_file(path, &n_copy);
    ck_assert_uint_eq(n_copy, n_orig);
    ck_assert(memcmp(orig, copy, n_orig) == 0);
    free(orig);
    free(copy);
    free(orig_path);
    free(dir);
    tsr_gguf_close(g);
}
END_TEST

int main(void) {
    Suite *s = suite_create("gguf-fixtures");
    TCase *tc = tcase_create("fixture_models");
    tcase_add_loop_test(tc, fixture_models, 0, (int)(sizeof models / sizeof models[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("q4_k_m_mixed_types");
    tcase_add_test(tc, q4_k_m_mixed_types);
    suite_add_tcase(s, tc);
    tc = tcase_create("vocab_files");
    tcase_add_test(tc, vocab_files);
    suite_add_tcase(s, tc);
    tc = tcase_create("stories260k");
    tcase_add_test(tc, stories260k_bin_equals_gguf);
    suite_add_tcase(s, tc);
    tc = tcase_create("writer_copy");
    tcase_add_test(tc, writer_copies_a_fixture);
    suite_add_tcase(s, tc);
    /* Skip as a whole, before forking, when the shared data is absent. */
    free(tsr_test_require_data("fixtures/models/llama-tiny-f32.gguf"));
    free(tsr_test_require_data("models/stories260K.gguf"));
    return tsr_test_run_suite(s);
}
