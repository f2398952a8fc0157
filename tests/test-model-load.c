/* Loading a model file (tsr_model_load) when the file is malformed or hostile: hyper-parameters
 * that would run and print garbage (a NaN epsilon, a zero block count...), norm weights that
 * are not finite, files that are neither GGUF nor llama2.c, and files that are not regular
 * files (a FIFO must be refused at once); then the same refusals from the `tessera` program's
 * commands. Each case asserts the exact error line. The models are tiny GGUF files this test
 * writes itself. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "files/dtype.h"
#include "files/gguf_write.h"
#include "model/model.h"
#include "testutil.h"

/* The tiny model: one block, 2 heads sharing 1 KV head of size 4, a vocabulary of 5. */
enum { EMBD = 8, FF = 16, HEADS = 2, KV_HEADS = 1, HEAD = EMBD / HEADS, VOCAB = 5 };

/* A metadata key as a test wants it: a number of `type`, a string, or left out. */
typedef struct key_val {
    const char *key;
    tsr_gguf_type type;
    double num;
    const char *str;
    bool absent;
} key_val;

#define NUM(key, type, value) {(key), (type), (value), NULL, false}
#define U32(key, value) NUM(key, TSR_GGUF_UINT32, value)
#define F32(key, value) NUM(key, TSR_GGUF_FLOAT32, value)
#define STR(key, value) {(key), TSR_GGUF_STRING, 0, (value), false}
#define ABSENT(key) {(key), TSR_GGUF_UINT8, 0, NULL, true}

static const key_val default_keys[] = {
    STR("general.architecture", "llama"),
    U32("llama.embedding_length", EMBD),
    U32("llama.block_count", 1),
    U32("llama.feed_forward_length", FF),
    U32("llama.attention.head_count", HEADS),
    U32("llama.attention.head_count_kv", KV_HEADS),
    U32("llama.context_length", 64),
    U32("llama.rope.dimension_count", HEAD),
    F32("llama.attention.layer_norm_rms_epsilon", 1e-5),
    F32("llama.rope.freq_base", 10000),
};

/* What a test changes in the tiny model: keys replaced (or added, or left out), one float of
 * one tensor, an empty vocabulary. */
typedef struct model_edit {
    key_val key;
    const char *tensor;
    int64_t element;
    float value;
    bool empty_vocab;
} model_edit;

static void set_key(tsr_gguf_writer *w, const key_val *kv) {
    if (kv->absent) return;
    switch (kv->type) {
    case TSR_GGUF_STRING: tsr_gguf_writer_set_str(w, kv->key, kv->str); break;
    case TSR_GGUF_FLOAT32:
    case TSR_GGUF_FLOAT64: tsr_gguf_writer_set_float(w, kv->key, kv->type, kv->num); break;
    case TSR_GGUF_INT32: tsr_gguf_writer_set_int(w, kv->key, kv->type, (int64_t)kv->num); break;
    default: tsr_gguf_writer_set_uint(w, kv->key, kv->type, (uint64_t)kv->num); break;
    }
}

/* Writes the tiny model, changed by `edit` (may be NULL), to a fresh temporary file; returns
 * its path (malloc'd). Every weight is 0.5, so norms are finite unless the edit says not. */
static char *write_model(const model_edit *edit) {
    static const model_edit none = {.key = ABSENT(NULL)};
    if (!edit) edit = &none;
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    bool replaced = false;
    for (size_t i = 0; i < sizeof default_keys / sizeof default_keys[0]; i++) {
        bool this_one = edit->key.key && strcmp(edit->key.key, default_keys[i].key) == 0;
        set_key(w, this_one ? &edit->key : &default_keys[i]);
        replaced |= this_one;
    }
    if (edit->key.key && !replaced) set_key(w, &edit->key);

    const struct {
        const char *name;
        int64_t ne0, ne1;
    } tensors[] = {
        {"token_embd.weight", EMBD, edit->empty_vocab ? 0 : VOCAB},
        {"output_norm.weight", EMBD, 1},
        {"blk.0.attn_norm.weight", EMBD, 1},
        {"blk.0.attn_q.weight", EMBD, HEADS * HEAD},
        {"blk.0.attn_k.weight", EMBD, KV_HEADS * HEAD},
        {"blk.0.attn_v.weight", EMBD, KV_HEADS * HEAD},
        {"blk.0.attn_output.weight", HEADS * HEAD, EMBD},
        {"blk.0.ffn_norm.weight", EMBD, 1},
        {"blk.0.ffn_gate.weight", EMBD, FF},
        {"blk.0.ffn_up.weight", EMBD, FF},
        {"blk.0.ffn_down.weight", FF, EMBD},
    };
    enum { N_TENSORS = sizeof tensors / sizeof tensors[0] };
    float *data[N_TENSORS];
    for (size_t i = 0; i < N_TENSORS; i++) {
        int64_t n = tensors[i].ne0 * tensors[i].ne1;
        data[i] = malloc((size_t)(n ? n : 1) * sizeof(float));
        for (int64_t j = 0; j < n; j++) data[i][j] = 0.5f;
        if (edit->tensor && strcmp(edit->tensor, tensors[i].name) == 0)
            data[i][edit->element] = edit->value;
        uint32_t n_dims = tensors[i].ne1 == 1 ? 1 : 2;
        tsr_gguf_writer_add_tensor(w, tensors[i].name, TSR_DTYPE_F32, n_dims,
                                   (int64_t[]){tensors[i].ne0, tensors[i].ne1}, data[i]);
    }
    char *path = tsr_test_tmp_path("m.gguf");
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_writer_write(w, path, &err) == 0, "%s", err.msg);
    tsr_gguf_writer_free(w);
    for (size_t i = 0; i < N_TENSORS; i++) free(data[i]);
    return path;
}

/* Writes `size` bytes to a fresh temporary file; returns its path (malloc'd). */
static char *write_bytes(const void *bytes, size_t size) {
    char *path = tsr_test_tmp_path("m.bin");
    ck_assert_int_eq(tsr_test_write_file(path, bytes, size), 0);
    return path;
}

/* Asserts that loading `path` fails with "<path>: <expected>". */
static void expect_load_error(const char *path, const char *expected) {
    tsr_model *m = (tsr_model *)1;
    tsr_error err = {{0}};
    ck_assert_int_lt(tsr_model_load(path, &m, &err), 0);
    ck_assert_ptr_null(m);
    char want[4200];
    snprintf(want, sizeof want, "%s: %s", path, expected);
    ck_assert_str_eq(err.msg, want);
}

static tsr_model *load_ok(const char *path) {
    tsr_model *m = NULL;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_model_load(path, &m, &err) == 0, "%s", err.msg);
    return m;
}

START_TEST(tiny_model_loads) {
    char *path = write_model(NULL);
    tsr_model *m = load_ok(path);
    ck_assert(!m->from_llama2c);
    ck_assert_int_eq(m->hp.n_embd, EMBD);
    ck_assert_int_eq(m->hp.n_layer, 1);
    ck_assert_int_eq(m->hp.n_ff, FF);
    ck_assert_int_eq(m->hp.n_head, HEADS);
    ck_assert_int_eq(m->hp.n_kv_head, KV_HEADS);
    ck_assert_int_eq(m->hp.head_dim, HEAD);
    ck_assert_int_eq(m->hp.n_vocab, VOCAB);
    ck_assert_int_eq(m->hp.n_ctx_train, 64);
    ck_assert(m->hp.rms_eps == 1e-5f);
    ck_assert(m->hp.rope.freq_base == 10000.0f);
    ck_assert(m->hp.rope.freq_scale == 1.0f);
    ck_assert_int_eq(m->hp.rope.n_rot, HEAD);
    tsr_model_free(m);
    unlink(path);
    free(path);
}
END_TEST

/* Hyper-parameters that are accepted, and what they give. */
START_TEST(rope_scaling) {
    static const struct {
        double factor;
        float freq_scale;
    } cases[] = {{4, 0.25f}, {0, 1.0f} /* 0: no scaling, as llama.cpp reads it */};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        model_edit e = {.key = F32("llama.rope.scaling.factor", cases[i].factor)};
        char *path = write_model(&e);
        tsr_model *m = load_ok(path);
        ck_assert(m->hp.rope.freq_scale == cases[i].freq_scale);
        tsr_model_free(m);
        unlink(path);
        free(path);
    }
}
END_TEST

static const struct bad_key {
    key_val key;
    const char *error; /* after "<path>: " */
} bad_keys[] = {
    /* each count on its own, naming its key */
    {U32("llama.block_count", 0), "llama.block_count: expected at least 1, got 0"},
    {U32("llama.embedding_length", 0),
     "llama.embedding_length: expected at least 1, got 0"},
    {U32("llama.feed_forward_length", 0),
     "llama.feed_forward_length: expected at least 1, got 0"},
    {U32("llama.attention.head_count", 0),
     "llama.attention.head_count: expected at least 1, got 0"},
    {U32("llama.attention.head_count_kv", 0),
     "llama.attention.head_count_kv: expected at least 1, got 0"},
    {U32("llama.context_length", 0), "llama.context_length: expected at least 1, got 0"},
    {U32("llama.attention.key_length", 0),
     "llama.attention.key_length: expected at least 1, got 0"},
    {U32("llama.rope.dimension_count", 0),
     "llama.rope.dimension_count: expected at least 1, got 0"},
    {NUM("llama.block_count", TSR_GGUF_INT32, -1),
     "key 'llama.block_count': -1 is negative, expected an unsigned integer"},
    {U32("llama.block_count", 2147483648.0),
     "key 'llama.block_count': 2147483648 is too large"},
    {ABSENT("llama.block_count"), "key 'llama.block_count' is missing"},
    /* then how they relate */
    {U32("llama.attention.head_count_kv", 3),
     "llama.attention.head_count_kv: 3 does not divide llama.attention.head_count 2"},
    {U32("llama.embedding_length", 9),
     "llama.embedding_length: 9 is not a multiple of llama.attention.head_count 2"},
    {U32("llama.rope.dimension_count", 3),
     "llama.rope.dimension_count: 3 must be even and at most the head size 4"},
    {U32("llama.rope.dimension_count", 6),
     "llama.rope.dimension_count: 6 must be even and at most the head size 4"},
    /* floats the graph divides by or raises to a power */
    {F32("llama.attention.layer_norm_rms_epsilon", NAN),
     "llama.attention.layer_norm_rms_epsilon: expected a finite float32 above 0, got nan"},
    {F32("llama.attention.layer_norm_rms_epsilon", -1e-5),
     "llama.attention.layer_norm_rms_epsilon: expected a finite float32 above 0, got "
     "-1e-05"},
    {F32("llama.attention.layer_norm_rms_epsilon", 0),
     "llama.attention.layer_norm_rms_epsilon: expected a finite float32 above 0, got 0"},
    {F32("llama.attention.layer_norm_rms_epsilon", INFINITY),
     "llama.attention.layer_norm_rms_epsilon: expected a finite float32 above 0, got inf"},
    /* finite as f64, but 0 or infinite as the float32 the graph uses */
    {NUM("llama.attention.layer_norm_rms_epsilon", TSR_GGUF_FLOAT64, 1e-60),
     "llama.attention.layer_norm_rms_epsilon: expected a finite float32 above 0, got 1e-60"},
    {NUM("llama.rope.freq_base", TSR_GGUF_FLOAT64, 1e60),
     "llama.rope.freq_base: expected a finite float32 above 0, got 1e+60"},
    {STR("llama.attention.layer_norm_rms_epsilon", "1e-5"),
     "key 'llama.attention.layer_norm_rms_epsilon': expected a number, found str"},
    {F32("llama.rope.freq_base", NAN),
     "llama.rope.freq_base: expected a finite float32 above 0, got nan"},
    {F32("llama.rope.freq_base", -10000),
     "llama.rope.freq_base: expected a finite float32 above 0, got -10000"},
    {F32("llama.rope.scaling.factor", -2),
     "llama.rope.scaling.factor: expected 0 or a finite float32 above 0, got -2"},
    {F32("llama.rope.scaling.factor", NAN),
     "llama.rope.scaling.factor: expected 0 or a finite float32 above 0, got nan"},
};

START_TEST(bad_hyperparameters) {
    const struct bad_key *c = &bad_keys[_i];
    model_edit e = {.key = c->key};
    char *path = write_model(&e);
    expect_load_error(path, c->error);
    unlink(path);
    free(path);
}
END_TEST

static const struct bad_weight {
    const char *tensor;
    int64_t element;
    float value;
    const char *error;
} bad_weights[] = {
    {"blk.0.ffn_norm.weight", 3, NAN,
     "tensor 'blk.0.ffn_norm.weight': element 3 is nan; norm weights and biases must be finite"},
    {"blk.0.attn_norm.weight", EMBD - 1, -INFINITY,
     "tensor 'blk.0.attn_norm.weight': element 7 is -inf; norm weights and biases must be "
     "finite"},
    {"output_norm.weight", 0, INFINITY,
     "tensor 'output_norm.weight': element 0 is inf; norm weights and biases must be finite"},
};

START_TEST(non_finite_norms) {
    const struct bad_weight *c = &bad_weights[_i];
    model_edit e = {.key = ABSENT(NULL), .tensor = c->tensor, .element = c->element,
                    .value = c->value};
    char *path = write_model(&e);
    expect_load_error(path, c->error);
    unlink(path);
    free(path);
}
END_TEST

START_TEST(empty_vocabulary) {
    model_edit e = {.key = ABSENT(NULL), .empty_vocab = true};
    char *path = write_model(&e);
    expect_load_error(path, "tensor 'token_embd.weight': 0 rows (the vocabulary), expected 1 to "
                            "2147483647");
    unlink(path);
    free(path);
}
END_TEST

/* The loader tells GGUF from llama2.c by the first bytes, and names what anything else looks
 * like instead of reading it as a llama2.c header. */
static const struct head_case {
    const char *bytes;
    size_t size;
    const char *error;
} head_cases[] = {
    {"", 0, "empty file; expected a GGUF model or a llama2.c checkpoint"},
    {"GGUX\3\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 24,
     "not a model file: it starts with 47 47 55 58 (\"GGUX\"), neither the GGUF magic \"GGUF\" "
     "nor a llama2.c header (dim from 1 to 1048576)"},
    {"GG", 2,
     "not a model file: it starts with 47 47 (\"GG\"), neither the GGUF magic \"GGUF\" nor a "
     "llama2.c header (dim from 1 to 1048576)"},
    {"\0\0\0\0\0\0\0\0", 8,
     "not a model file: it starts with 00 00 00 00 (\"....\"), neither the GGUF magic \"GGUF\" "
     "nor a llama2.c header (dim from 1 to 1048576)"},
    {"\1\0\x10\0", 4, /* dim 1048577 */
     "not a model file: it starts with 01 00 10 00 (\"....\"), neither the GGUF magic \"GGUF\" "
     "nor a llama2.c header (dim from 1 to 1048576)"},
    /* dim 1048576 and dim 1 are llama2.c headers, here cut short */
    {"\0\0\x10\0", 4, "offset 0: file ends in the llama2.c header (28 bytes needed, 4 left)"},
    {"\1\0\0\0", 4, "offset 0: file ends in the llama2.c header (28 bytes needed, 4 left)"},
    /* the GGUF magic: the GGUF reader's own message */
    {"GGUF", 4, "offset 4: file ends in the version (4 bytes needed, 0 left)"},
    /* llama2.c's export.py --version 1: magic "ak42", then the version */
    {"24ka\1\0\0\0", 8,
     "a llama2.c export of version 1; only legacy checkpoints are read (export.py --version 0)"},
};

START_TEST(file_formats) {
    const struct head_case *c = &head_cases[_i];
    char *path = write_bytes(c->bytes, c->size);
    expect_load_error(path, c->error);
    unlink(path);
    free(path);
}
END_TEST

START_TEST(llama2c_checkpoint_loads) {
    /* dim 8, hidden 16, 1 layer, 2 heads, 1 KV head, vocab 5, seq_len 4; weights 0.5 */
    const int32_t header[7] = {EMBD, FF, 1, HEADS, KV_HEADS, VOCAB, 4};
    size_t floats = VOCAB * EMBD + 2 * EMBD + 2 * EMBD * EMBD + 2 * KV_HEADS * HEAD * EMBD +
                    3 * FF * EMBD + EMBD + 4 * HEAD;
    size_t size = sizeof header + floats * sizeof(float);
    uint8_t *bytes = malloc(size);
    memcpy(bytes, header, sizeof header);
    for (size_t i = 0; i < floats; i++) memcpy(bytes + sizeof header + 4 * i, &(float){0.5f}, 4);
    char *path = write_bytes(bytes, size);
    tsr_model *m = load_ok(path);
    ck_assert(m->from_llama2c);
    ck_assert_int_eq(m->hp.n_vocab, VOCAB);
    tsr_model_free(m);
    unlink(path);
    free(path);
    free(bytes);
}
END_TEST

START_TEST(fifo_is_refused) {
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    expect_load_error(fifo, "a FIFO, not a regular file");
    ck_assert(!tsr_file_is_gguf(fifo));
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", fifo);
    *strrchr(dir, '/') = '\0';
    expect_load_error(dir, "a folder, not a regular file");
    unlink(fifo);
    free(fifo);
}
END_TEST

/* Each of the n command lines must fail (exit 1) printing nothing but the line `want`. */
static void expect_cli_errors(const char *const *const *runs, size_t n, const char *want) {
    for (size_t i = 0; i < n; i++) {
        char *out, *err;
        ck_assert_int_eq(tsr_test_tessera(&out, &err, runs[i]), 1);
        ck_assert_str_eq(out, "");
        ck_assert_str_eq(err, want);
        free(out);
        free(err);
    }
}

/* The program: a FIFO given as the model, the tokenizer or the config ends it at once with one
 * line (a blocking open would hang it until the test's timeout). */
START_TEST(cli_refuses_fifos) {
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    char *model = write_model(NULL);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: a FIFO, not a regular file\n", fifo);
    const char *as_model[] = {"run", "-m", fifo, "-p", "x", "-n", "1", NULL};
    const char *as_tokenizer[] = {"run", "-m", model, "--tokenizer", fifo, "-p", "x", "-n", "1",
                                  NULL};
    const char *as_config[] = {"validate", fifo, NULL};
    const char *const *runs[] = {as_model, as_tokenizer, as_config};
    expect_cli_errors(runs, sizeof runs / sizeof runs[0], want);
    unlink(model);
    free(model);
    unlink(fifo);
    free(fifo);
}
END_TEST

/* The commands that open a model file without loading a model name it the same way. */
START_TEST(cli_names_unknown_files) {
    char *path = write_bytes("", 0);
    char *out_path = tsr_test_tmp_path("out.gguf");
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: empty file; expected a GGUF model or a llama2.c "
             "checkpoint\n", path);
    const char *tokenize[] = {"tokenize", "-m", path, "-p", "x", NULL};
    const char *quantize[] = {"quantize", path, out_path, "q8_0", NULL};
    const char *run[] = {"run", "-m", path, "-p", "x", "-n", "1", NULL};
    const char *const *runs[] = {tokenize, quantize, run};
    expect_cli_errors(runs, sizeof runs / sizeof runs[0], want);
    ck_assert_int_ne(access(out_path, F_OK), 0);
    unlink(path);
    free(path);
    free(out_path);
}
END_TEST

static Suite *model_load_suite(void) {
    Suite *s = suite_create("model-load");
    TCase *tc = tcase_create("model-load");
    tcase_add_test(tc, tiny_model_loads);
    tcase_add_test(tc, rope_scaling);
    tcase_add_loop_test(tc, bad_hyperparameters, 0, sizeof bad_keys / sizeof bad_keys[0]);
    tcase_add_loop_test(tc, non_finite_norms, 0, sizeof bad_weights / sizeof bad_weights[0]);
    tcase_add_test(tc, empty_vocabulary);
    tcase_add_loop_test(tc, file_formats, 0, sizeof head_cases / sizeof head_cases[0]);
    tcase_add_test(tc, llama2c_checkpoint_loads);
    tcase_add_test(tc, fifo_is_refused);
    tcase_add_test(tc, cli_refuses_fifos);
    tcase_add_test(tc, cli_names_unknown_files);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return tsr_test_run_suite(model_load_suite());
}
