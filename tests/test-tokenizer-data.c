/* Tokenizers against outside references in the shared test data (skipped without it):
 *   - llama.cpp's tokenizer test vectors (fixtures/vocab/X.gguf.inp/.out) for its five vocab
 *     GGUFs, every vector, no BOS, no special parsing;
 *   - the fixture models' GGUF tokenizer: "Once upon a time" with BOS = prompt-once.txt;
 *   - llama2.c's tok512.bin: run.c's encodings from models/SOURCES.md, and decoding each
 *     greedy .ids.txt reproduces run.c's .txt output byte for byte. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "tokenizer/tokenizer.h"

static tsr_tokenizer *open_gguf_tokenizer(const char *rel) {
    char *path = tsr_test_require_data(rel);
    tsr_gguf *g;
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_gguf_open(path, &g, &err) == TSR_OK, "%s", err.msg);
    ck_assert_msg(tsr_tokenizer_from_gguf(g, &tok, &err) == TSR_OK, "%s", err.msg);
    tsr_gguf_close(g);
    free(path);
    return tok;
}

/* Space-separated ids (one line) into `ids`; returns the count. */
static size_t parse_ids(const char *s, const char *end, int32_t *ids, size_t cap) {
    size_t n = 0;
    while (s < end) {
        char *next;
        long v = strtol(s, &next, 10);
        if (next == s) break;
        ck_assert_uint_lt(n, cap);
        ids[n++] = (int32_t)v;
        s = next;
    }
    return n;
}

static void check_vocab_vectors(const char *name) {
    char rel[256];
    snprintf(rel, sizeof rel, "fixtures/vocab/ggml-vocab-%s.gguf", name);
    tsr_tokenizer *tok = open_gguf_tokenizer(rel);
    char *inp_path, *out_path;
    snprintf(rel, sizeof rel, "fixtures/vocab/ggml-vocab-%s.gguf.inp", name);
    inp_path = tsr_test_require_data(rel);
    snprintf(rel, sizeof rel, "fixtures/vocab/ggml-vocab-%s.gguf.out", name);
    out_path = tsr_test_require_data(rel);
    size_t inp_len, out_len;
    char *inp = tsr_test_read_file(inp_path, &inp_len);
    char *out = tsr_test_read_file(out_path, &out_len);
    ck_assert(inp && out);
    static const char sep[] = "\n__ggml_vocab_test__\n";
    const char *c = inp, *line = out;
    int n_vectors = 0;
    for (const char *e; (e = strstr(c, sep)) != NULL; c = e + strlen(sep)) {
        const char *eol = strchr(line, '\n');
        ck_assert_msg(eol, "%s: fewer .out lines than inputs", name);
        int32_t want[4096];
        size_t n_want = parse_ids(line, eol, want, 4096);
        int32_t *ids;
        size_t n;
        tsr_error err = {{0}};
        ck_assert_int_eq(tsr_tokenize(tok, c, (size_t)(e - c), false, false, &ids, &n, &err),
                         TSR_OK);
        bool same = n == n_want && memcmp(ids, want, n * sizeof *ids) == 0;
        ck_assert_msg(same, "%s: vector %d '%.*s': got %zu ids, want %zu (first %d vs %d)", name,
                      n_vectors, (int)(e - c), c, n, n_want, n ? ids[0] : -1,
                      n_want ? want[0] : -1);
        free(ids);
        line = eol + 1;
        n_vectors++;
    }
    ck_assert_int_eq(n_vectors, 46);
    free(inp);
    free(out);
    free(inp_path);
    free(out_path);
    tsr_tokenizer_free(tok);
}

START_TEST(vocab_llama_spm) { check_vocab_vectors("llama-spm"); }
END_TEST
START_TEST(vocab_gpt2) { check_vocab_vectors("gpt-2"); }
END_TEST
START_TEST(vocab_deepseek_coder) { check_vocab_vectors("deepseek-coder"); }
END_TEST
START_TEST(vocab_falcon) { check_vocab_vectors("falcon"); }
END_TEST
START_TEST(vocab_starcoder) { check_vocab_vectors("starcoder"); }
END_TEST

static const char *const fixture_models[] = {
    "fixtures/models/llama-tiny-f32.gguf", "fixtures/models/llama-tiny-q4_k_m.gguf",
    "fixtures/models/qwen2-tiny-f32.gguf", "fixtures/models/moe-tiny-q8_0.gguf",
    "models/stories260K.gguf",
};

START_TEST(gguf_models_prompt_once) {
    char *p = tsr_test_require_data("fixtures/inputs/prompt-once.txt");
    size_t len;
    char *ref = tsr_test_read_file(p, &len);
    int32_t want[16];
    size_t n_want = parse_ids(ref, ref + len, want, 16);
    ck_assert_uint_eq(n_want, 5);
    for (size_t m = 0; m < sizeof fixture_models / sizeof fixture_models[0]; m++) {
        tsr_tokenizer *tok = open_gguf_tokenizer(fixture_models[m]);
        int32_t *ids;
        size_t n;
        tsr_error err = {{0}};
        const char *text = "Once upon a time";
        ck_assert_int_eq(tsr_tokenize(tok, text, strlen(text), true, false, &ids, &n, &err),
                         TSR_OK);
        ck_assert_msg(n == n_want && memcmp(ids, want, n * sizeof *ids) == 0, "%s",
                      fixture_models[m]);
        char *s;
        ck_assert_int_eq(tsr_detokenize(tok, ids, n, &s, &len, &err), TSR_OK);
        ck_assert_str_eq(s, text);
        ck_assert(tsr_token_is_eog(tok, 2));
        free(s);
        free(ids);
        tsr_tokenizer_free(tok);
    }
    free(ref);
    free(p);
}
END_TEST

static tsr_tokenizer *open_tok512(void) {
    char *path = tsr_test_require_data("models/tok512.bin");
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_tokenizer_from_llama2c(path, 512, &tok, &err) == TSR_OK, "%s", err.msg);
    free(path);
    return tok;
}

START_TEST(llama2c_encode) {
    tsr_tokenizer *tok = open_tok512();
    static const struct {
        const char *text;
        int32_t ids[8];
        size_t n;
    } cases[] = {
        {"Lily and Tom", {1, 317, 269, 274, 287}, 5},
        {"Once upon a time", {1, 403, 407, 261, 378}, 5},
        {"", {1}, 1},
    };
    for (size_t i = 0; i < 3; i++) {
        int32_t *ids;
        size_t n;
        tsr_error err = {{0}};
        ck_assert_int_eq(tsr_tokenize(tok, cases[i].text, strlen(cases[i].text), true, false,
                                      &ids, &n, &err), TSR_OK);
        ck_assert_msg(n == cases[i].n && memcmp(ids, cases[i].ids, n * sizeof *ids) == 0,
                      "'%s'", cases[i].text);
        free(ids);
    }
    /* the file's pieces for BOS and EOS */
    tsr_tok_str bos = tsr_token_text(tok, 1);
    ck_assert(bos.len == 5 && memcmp(bos.ptr, "\n<s>\n", 5) == 0);
    tsr_tokenizer_free(tok);
}
END_TEST

START_TEST(llama2c_decode_run_c_outputs) {
    tsr_tokenizer *tok = open_tok512();
    static const char *const runs[] = {"greedy", "greedy.once", "greedy.lily"};
    for (size_t r = 0; r < 3; r++) {
        char rel[128];
        snprintf(rel, sizeof rel, "models/stories260K.%s.ids.txt", runs[r]);
        char *ids_path = tsr_test_require_data(rel);
        snprintf(rel, sizeof rel, "models/stories260K.%s.txt", runs[r]);
        char *txt_path = tsr_test_require_data(rel);
        size_t il, tl;
        char *ids_text = tsr_test_read_file(ids_path, &il);
        char *txt = tsr_test_read_file(txt_path, &tl);
        int32_t ids[512];
        size_t n = parse_ids(ids_text, ids_text + il, ids, 512);
        ck_assert_uint_eq(n, 201);
        char *s;
        size_t len;
        tsr_error err = {{0}};
        ck_assert_int_eq(tsr_detokenize(tok, ids, n, &s, &len, &err), TSR_OK);
        /* run.c prints a final newline after the text */
        ck_assert_uint_eq(len + 1, tl);
        ck_assert_msg(memcmp(s, txt, len) == 0 && txt[len] == '\n', "%s", runs[r]);
        free(s);
        free(ids_text);
        free(txt);
        free(ids_path);
        free(txt_path);
    }
    tsr_tokenizer_free(tok);
}
END_TEST

int main(void) {
    /* skip (77) here, not inside a forked test, when the shared data is absent */
    free(tsr_test_require_data("fixtures/vocab/README.md"));
    free(tsr_test_require_data("models/tok512.bin"));
    Suite *s = suite_create("tokenizer-data");
    TCase *tc = tcase_create("vocab");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, vocab_llama_spm);
    tcase_add_test(tc, vocab_gpt2);
    tcase_add_test(tc, vocab_deepseek_coder);
    tcase_add_test(tc, vocab_falcon);
    tcase_add_test(tc, vocab_starcoder);
    suite_add_tcase(s, tc);
    tc = tcase_create("models");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, gguf_models_prompt_once);
    tcase_add_test(tc, llama2c_encode);
    tcase_add_test(tc, llama2c_decode_run_c_outputs);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
