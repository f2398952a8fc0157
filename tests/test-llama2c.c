/* llama2.c checkpoints read as a tsr_gguf, on small checkpoints the test writes itself:
 * each float holds its own index in the file, so every tensor's position can be checked. The
 * comparison with the real stories260K is in test-gguf-fixtures. */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "files/dtype.h"
#include "files/gguf.h"
#include "files/llama2c.h"
#include "testutil.h"

enum { DIM = 8, HIDDEN = 12, LAYERS = 2, HEADS = 4, KV_HEADS = 2, VOCAB = 10, SEQ = 3 };
enum { HS = DIM / HEADS, KV_DIM = KV_HEADS * HS };

/* Float index of each section in the checkpoint, in llama2.c order. */
enum {
    AT_EMBD = 0,
    AT_RMS_ATT = AT_EMBD + VOCAB * DIM,
    AT_WQ = AT_RMS_ATT + LAYERS * DIM,
    AT_WK = AT_WQ + LAYERS * DIM * DIM,
    AT_WV = AT_WK + LAYERS * KV_DIM * DIM,
    AT_WO = AT_WV + LAYERS * KV_DIM * DIM,
    AT_RMS_FFN = AT_WO + LAYERS * DIM * DIM,
    AT_W1 = AT_RMS_FFN + LAYERS * DIM,
    AT_W2 = AT_W1 + LAYERS * HIDDEN * DIM,
    AT_W3 = AT_W2 + LAYERS * DIM * HIDDEN,
    AT_RMS_FINAL = AT_W3 + LAYERS * HIDDEN * DIM,
    AT_FREQ = AT_RMS_FINAL + DIM,
    AT_WCLS = AT_FREQ + SEQ * HS, /* real + imag, HS/2 each */
    N_TIED = AT_WCLS,
    N_UNTIED = AT_WCLS + VOCAB * DIM
};

/* A checkpoint of n_floats floats after the header; float i = i. Returns the byte size. */
static uint8_t *checkpoint(const int32_t header[7], size_t n_floats, size_t *size) {
    *size = 28 + 4 * n_floats;
    uint8_t *p = malloc(*size);
    memcpy(p, header, 28);
    for (size_t i = 0; i < n_floats; i++) {
        float f = (float)i;
        memcpy(p + 28 + 4 * i, &f, 4);
    }
    return p;
}

static const int32_t tied_header[7] = {DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ};

static tsr_gguf *open_ok(const uint8_t *p, size_t size) {
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_llama2c_open_memory(p, size, "m.bin", &g, &err) == 0, "%s", err.msg);
    return g;
}

/* Asserts tensor `name` has the shape and starts at float `at` of the file. */
static void check_tensor(const tsr_gguf *g, const uint8_t *file, const char *name, uint32_t n_dims,
                         int64_t ne0, int64_t ne1, size_t at) {
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, name);
    ck_assert_msg(t != NULL, "%s missing", name);
    ck_assert_int_eq(t->dtype, TSR_DTYPE_F32);
    ck_assert_uint_eq(t->n_dims, n_dims);
    ck_assert(t->ne[0] == ne0 && t->ne[1] == ne1 && t->ne[2] == 1 && t->ne[3] == 1);
    ck_assert_uint_eq(t->size, (size_t)(ne0 * ne1 * 4));
    ck_assert_msg(t->data == file + 28 + 4 * at, "%s at float %td, expected %zu", name,
                  ((const uint8_t *)t->data - file - 28) / 4, at);
    ck_assert_uint_eq(t->offset, 4 * at);
}

START_TEST(tied_checkpoint) {
    size_t size;
    uint8_t *p = checkpoint(tied_header, N_TIED, &size);
    tsr_gguf *g = open_ok(p, size);
    ck_assert_int_eq(tsr_gguf_n_tensors(g), 3 + 9 * LAYERS);
    check_tensor(g, p, "token_embd.weight", 2, DIM, VOCAB, AT_EMBD);
    check_tensor(g, p, "output.weight", 2, DIM, VOCAB, AT_EMBD);
    check_tensor(g, p, "output_norm.weight", 1, DIM, 1, AT_RMS_FINAL);
    for (int l = 0; l < LAYERS; l++) {
        char name[64];
#define CHECK(suffix, n_dims, ne0, ne1, at)                                                 \
    snprintf(name, sizeof name, "blk.%d." suffix ".weight", l);                             \
    check_tensor(g, p, name, n_dims, ne0, ne1, at)
        CHECK("attn_norm", 1, DIM, 1, AT_RMS_ATT + l * DIM);
        CHECK("attn_q", 2, DIM, DIM, AT_WQ + l * DIM * DIM);
        CHECK("attn_k", 2, DIM, KV_DIM, AT_WK + l * KV_DIM * DIM);
        CHECK("attn_v", 2, DIM, KV_DIM, AT_WV + l * KV_DIM * DIM);
        CHECK("attn_output", 2, DIM, DIM, AT_WO + l * DIM * DIM);
        CHECK("ffn_norm", 1, DIM, 1, AT_RMS_FFN + l * DIM);
        CHECK("ffn_gate", 2, DIM, HIDDEN, AT_W1 + l * HIDDEN * DIM);
        CHECK("ffn_down", 2, HIDDEN, DIM, AT_W2 + l * DIM * HIDDEN);
        CHECK("ffn_up", 2, DIM, HIDDEN, AT_W3 + l * HIDDEN * DIM);
#undef CHECK
    }
    ck_assert_ptr_null(tsr_gguf_find_tensor(g, "blk.2.attn_q.weight"));
    tsr_gguf_close(g);
    free(p);
}
END_TEST

START_TEST(metadata) {
    size_t size;
    uint8_t *p = checkpoint(tied_header, N_TIED, &size);
    tsr_gguf *g = open_ok(p, size);
    static const struct {
        const char *key;
        const char *text;
    } expected[] = {
        {"general.architecture", "\"llama\""},
        {"llama.context_length", "3"},
        {"llama.embedding_length", "8"},
        {"llama.block_count", "2"},
        {"llama.feed_forward_length", "12"},
        {"llama.attention.head_count", "4"},
        {"llama.attention.head_count_kv", "2"},
        {"llama.rope.dimension_count", "2"},
        {"llama.vocab_size", "10"},
        {"llama.attention.layer_norm_rms_epsilon", "9.99999975e-06"},
        {"llama.rope.freq_base", "10000"},
    };
    ck_assert_int_eq(tsr_gguf_n_keys(g), sizeof expected / sizeof expected[0]);
    for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++) {
        int64_t k = tsr_gguf_find_key(g, expected[i].key);
        ck_assert_msg(k >= 0, "%s missing", expected[i].key);
        char buf[64];
        tsr_gguf_key_format(g, k, buf, sizeof buf);
        ck_assert_str_eq(buf, expected[i].text);
    }
    ck_assert_int_eq(tsr_gguf_key_type(g, tsr_gguf_find_key(g, "llama.block_count")),
                     TSR_GGUF_UINT32);
    ck_assert_uint_eq(tsr_gguf_version(g), 0);
    ck_assert_str_eq(tsr_gguf_path(g), "m.bin");
    tsr_gguf_close(g);
    free(p);
}
END_TEST

START_TEST(untied_checkpoint) {
    int32_t header[7];
    memcpy(header, tied_header, sizeof header);
    header[5] = -VOCAB;
    size_t size;
    uint8_t *p = checkpoint(header, N_UNTIED, &size);
    tsr_gguf *g = open_ok(p, size);
    check_tensor(g, p, "token_embd.weight", 2, DIM, VOCAB, AT_EMBD);
    check_tensor(g, p, "output.weight", 2, DIM, VOCAB, AT_WCLS);
    ck_assert_uint_eq(tsr_gguf_u64_or(g, "llama.vocab_size", 0), VOCAB);
    tsr_gguf_close(g);
    free(p);
    /* The tied size is one classifier short for an untied header. */
    p = checkpoint(header, N_TIED, &size);
    tsr_gguf *bad = (tsr_gguf *)1;
    tsr_error err = {{0}};
    ck_assert_int_lt(tsr_llama2c_open_memory(p, size, "m.bin", &bad, &err), 0);
    ck_assert_str_eq(err.msg, "m.bin: file size 4372 does not match its llama2.c header (dim 8, "
                              "hidden_dim 12, n_layers 2, n_heads 4, n_kv_heads 2, vocab_size "
                              "-10, seq_len 3): expected 4692 bytes");
    free(p);
}
END_TEST

/* Builds a checkpoint of the tied size plus `delta` bytes and asserts the error. */
static void expect_size_error(int delta, const char *expected) {
    size_t size;
    uint8_t *p = checkpoint(tied_header, N_TIED + 1, &size); /* room for +4 */
    size -= 4;
    tsr_gguf *g = (tsr_gguf *)1;
    tsr_error err = {{0}};
    ck_assert_int_lt(tsr_llama2c_open_memory(p, (size_t)((int64_t)size + delta), "m.bin", &g,
                                             &err), 0);
    ck_assert_ptr_null(g);
    ck_assert_str_eq(err.msg, expected);
    free(p);
}

START_TEST(truncated_and_oversized) {
    expect_size_error(-4, "m.bin: file size 4368 does not match its llama2.c header (dim 8, "
                          "hidden_dim 12, n_layers 2, n_heads 4, n_kv_heads 2, vocab_size 10, "
                          "seq_len 3): expected 4372 bytes");
    expect_size_error(+4, "m.bin: file size 4376 does not match its llama2.c header (dim 8, "
                          "hidden_dim 12, n_layers 2, n_heads 4, n_kv_heads 2, vocab_size 10, "
                          "seq_len 3): expected 4372 bytes");
    /* one byte either way: the size must be exact */
    expect_size_error(-1, "m.bin: file size 4371 does not match its llama2.c header (dim 8, "
                          "hidden_dim 12, n_layers 2, n_heads 4, n_kv_heads 2, vocab_size 10, "
                          "seq_len 3): expected 4372 bytes");
    expect_size_error(+1, "m.bin: file size 4373 does not match its llama2.c header (dim 8, "
                          "hidden_dim 12, n_layers 2, n_heads 4, n_kv_heads 2, vocab_size 10, "
                          "seq_len 3): expected 4372 bytes");
    expect_size_error(-4360, "m.bin: offset 0: file ends in the llama2.c header (28 bytes "
                             "needed, 12 left)");
    expect_size_error(-4345, "m.bin: offset 0: file ends in the llama2.c header (28 bytes "
                             "needed, 27 left)");
}
END_TEST

static void expect_header_error(int field, int32_t value, const char *expected) {
    int32_t header[7];
    memcpy(header, tied_header, sizeof header);
    header[field] = value;
    size_t size;
    uint8_t *p = checkpoint(header, N_TIED, &size);
    tsr_gguf *g = (tsr_gguf *)1;
    tsr_error err = {{0}};
    ck_assert_int_lt(tsr_llama2c_open_memory(p, size, "m.bin", &g, &err), 0);
    ck_assert_ptr_null(g);
    ck_assert_str_eq(err.msg, expected);
    free(p);
}

START_TEST(bad_headers) {
    expect_header_error(0, -8, "m.bin: offset 0: dim = -8, expected a positive number");
    expect_header_error(1, 0, "m.bin: offset 4: hidden_dim = 0, expected a positive number");
    expect_header_error(2, -1, "m.bin: offset 8: n_layers = -1, expected a positive number");
    expect_header_error(4, 0, "m.bin: offset 16: n_kv_heads = 0, expected a positive number");
    expect_header_error(5, 0, "m.bin: offset 20: vocab_size = 0, expected a positive number "
                              "(negative: untied classifier)");
    expect_header_error(5, INT32_MIN, "m.bin: offset 20: vocab_size = -2147483648, expected a "
                                      "positive number (negative: untied classifier)");
    expect_header_error(6, -512, "m.bin: offset 24: seq_len = -512, expected a positive number");
    expect_header_error(3, 3, "m.bin: offset 12: dim 8 is not a multiple of n_heads 3");
    expect_header_error(4, 3, "m.bin: offset 16: n_kv_heads 3 does not divide n_heads 4");
    expect_header_error(4, 8, "m.bin: offset 16: n_kv_heads 8 does not divide n_heads 4");
    expect_header_error(3, 8, "m.bin: offset 12: head size 1 (dim / n_heads) is odd, RoPE needs "
                              "pairs");
    /* Dimensions whose sizes overflow 64 bits are refused before any arithmetic wraps. */
    int32_t big[7] = {INT32_MAX - 3, INT32_MAX, INT32_MAX, 2, 1, INT32_MAX, INT32_MAX};
    size_t size;
    uint8_t *p = checkpoint(big, 0, &size);
    tsr_gguf *g = (tsr_gguf *)1;
    tsr_error err = {{0}};
    ck_assert_int_lt(tsr_llama2c_open_memory(p, size, "m.bin", &g, &err), 0);
    ck_assert_str_eq(err.msg, "m.bin: offset 0: the llama2.c header (dim 2147483644, hidden_dim "
                              "2147483647, n_layers 2147483647, n_heads 2, n_kv_heads 1, "
                              "vocab_size 2147483647, seq_len 2147483647) describes more than "
                              "2^64 bytes");
    free(p);
    /* A header cut short. */
    ck_assert_int_lt(tsr_llama2c_open_memory(tied_header, 20, "m.bin", &g, &err), 0);
    ck_assert_str_eq(err.msg, "m.bin: offset 0: file ends in the llama2.c header (28 bytes "
                              "needed, 20 left)");
}
END_TEST

START_TEST(open_from_file) {
    size_t size;
    uint8_t *p = checkpoint(tied_header, N_TIED, &size);
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/m.bin", dir);
    ck_assert_int_eq(tsr_test_write_file(path, p, size), 0);
    tsr_gguf *g = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_llama2c_open(path, &g, &err) == 0, "%s", err.msg);
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, "blk.1.ffn_up.weight");
    float first;
    memcpy(&first, t->data, 4);
    ck_assert(first == (float)(AT_W3 + HIDDEN * DIM));
    ck_assert_str_eq(tsr_gguf_path(g), path);
    tsr_gguf_close(g);
    ck_assert_int_lt(tsr_llama2c_open("/nonexistent/m.bin", &g, &err), 0);
    ck_assert_str_eq(err.msg, "/nonexistent/m.bin: cannot open: No such file or directory");
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    ck_assert_int_eq(tsr_llama2c_open(fifo, &g, &err), TSR_E_IO);
    char want[4200];
    snprintf(want, sizeof want, "%s: a FIFO, not a regular file", fifo);
    ck_assert_str_eq(err.msg, want);
    unlink(fifo);
    free(fifo);
    free(dir);
    free(p);
}
END_TEST

int main(void) {
    const tsr_test_case cases[] = {
        {"tied", tied_checkpoint},
        {"metadata", metadata},
        {"untied", untied_checkpoint},
        {"sizes", truncated_and_oversized},
        {"bad_headers", bad_headers},
        {"open_from_file", open_from_file},
    };
    return tsr_test_run_suite(tsr_test_suite("llama2c", cases, sizeof cases / sizeof cases[0]));
}
