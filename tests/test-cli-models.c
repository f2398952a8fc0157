/* The `tessera` program on real model files: text byte-identical to llama2.c's run.c, logits
 * files, tokenize, perplexity equal to llama.cpp's, and one clear error line for bad input.
 * Needs the shared data folder. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* run.c's -n counts positions after BOS including the prompt; ours counts new tokens. */
typedef struct greedy_case {
    const char *prompt;
    const char *reference;
    int n_prompt_tokens;
} greedy_case;

static const greedy_case cases[] = {
    {"Once upon a time", "models/stories260K.greedy.once.txt", 4},
    {"Lily and Tom", "models/stories260K.greedy.lily.txt", 4},
    {"", "models/stories260K.greedy.txt", 0},
};

static void check_greedy_text(const char *model, const char *tokenizer, const greedy_case *c) {
    char *ref = tsr_test_data(c->reference);
    char *want = tsr_test_read_file(ref, NULL);
    free(ref);
    char n[16];
    snprintf(n, sizeof n, "%d", 200 - c->n_prompt_tokens);
    char *out, *err;
    const char *with_tok[] = {"run", "-m", model, "--tokenizer", tokenizer, "-p", c->prompt, "-n", n,
                              "--temperature", "0", NULL};
    const char *without_tok[] = {"run", "-m", model, "-p", c->prompt, "-n", n, "--temperature", "0",
                                 NULL};
    int status = tsr_test_tessera(&out, &err, tokenizer ? with_tok : without_tok);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    ck_assert_msg(strcmp(out, want) == 0, "prompt '%s':\n--- got\n%s\n--- llama2.c\n%s", c->prompt,
                  out, want);
    free(out);
    free(err);
    free(want);
}

START_TEST(run_bin_matches_llama2c_text) {
    char *model = tsr_test_data("models/stories260K.bin");
    char *tok = tsr_test_data("models/tok512.bin");
    check_greedy_text(model, tok, &cases[_i]);
    free(model);
    free(tok);
}
END_TEST

START_TEST(run_gguf_matches_llama2c_text) {
    char *model = tsr_test_data("models/stories260K.gguf");
    check_greedy_text(model, NULL, &cases[_i]);
    free(model);
}
END_TEST

START_TEST(logits_file_matches_llama2c) {
    char *ids_path = tsr_test_data("models/stories260K.greedy.lily.ids.txt");
    char *ids_text = tsr_test_read_file(ids_path, NULL);
    free(ids_path);
    /* The first 200 ids: the file has 201 (BOS + 200), and run.c dumped 200 rows. */
    char *p = ids_text;
    for (int i = 0; i < 200; i++) p = strchr(p + 1, ' ');
    *p = '\0';
    char *dir = tsr_test_tmpdir();
    char out_path[4096];
    snprintf(out_path, sizeof out_path, "%s/lily.f32", dir);
    char *model = tsr_test_data("models/stories260K.bin");
    char *tok = tsr_test_data("models/tok512.bin");
    const char *args[] = {"logits", "-m", model, "--tokenizer", tok, "--tokens", ids_text, "--out",
                          out_path, NULL};
    char *err;
    int status = tsr_test_tessera(NULL, &err, args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    size_t got_size, want_size;
    float *got = (float *)tsr_test_read_file(out_path, &got_size);
    char *ref = tsr_test_data("models/stories260K.greedy.lily.logits.f32");
    float *want = (float *)tsr_test_read_file(ref, &want_size);
    free(ref);
    ck_assert_uint_eq(got_size, want_size);
    double worst = 0;
    for (size_t i = 0; i < want_size / 4; i++) worst = fmax(worst, fabs(got[i] - want[i]));
    ck_assert_msg(worst <= 1e-4, "max |diff| %g", worst);
    unlink(out_path);
    rmdir(dir);
    free(got);
    free(want);
    free(err);
    free(dir);
    free(ids_text);
    free(model);
    free(tok);
}
END_TEST

START_TEST(logits_failure_leaves_no_file) {
    char *dir = tsr_test_tmpdir();
    char out_path[4096];
    snprintf(out_path, sizeof out_path, "%s/out.f32", dir);
    char *model = tsr_test_data("models/stories260K.gguf");
    const char *args[] = {"logits", "-m", model, "--tokens", "1 99999", "--out", out_path, NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    ck_assert_str_eq(err, "tessera: forward: token 99999 is outside the vocabulary (512 tokens)\n");
    ck_assert_int_ne(access(out_path, F_OK), 0);
    rmdir(dir);
    free(dir);
    free(err);
    free(model);
}
END_TEST

START_TEST(tokenize_prints_ids) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *out;
    const char *args[] = {"tokenize", "-m", model, "-p", "Once upon a time", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, args), 0);
    ck_assert_str_eq(out, "1 403 407 261 378\n");
    free(out);
    const char *no_bos[] = {"tokenize", "-m", model, "-p", "Once upon a time", "--no-bos", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, no_bos), 0);
    ck_assert_str_eq(out, "403 407 261 378\n");
    free(out);
    free(model);
}
END_TEST

/* -f takes the bytes as they are, trailing newline included; vocab-only GGUFs work. */
START_TEST(tokenize_file_with_vocab_only_gguf) {
    char *vocab = tsr_test_data("fixtures/vocab/ggml-vocab-llama-spm.gguf");
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/in.txt", dir);
    ck_assert_int_eq(tsr_test_write_file(path, "Hello world\n", 12), 0);
    char *a, *b;
    const char *file_args[] = {"tokenize", "-m", vocab, "-f", path, "--no-bos", NULL};
    const char *text_args[] = {"tokenize", "-m", vocab, "-p", "Hello world", "--no-bos", NULL};
    ck_assert_int_eq(tsr_test_tessera(&a, NULL, file_args), 0);
    ck_assert_int_eq(tsr_test_tessera(&b, NULL, text_args), 0);
    /* llama.cpp's SentencePiece vocabulary: "Hello world" -> 15043 3186; the newline is
     * <0x0A> = 13. */
    ck_assert_str_eq(b, "15043 3186\n");
    ck_assert_str_eq(a, "15043 3186 13\n");
    unlink(path);
    rmdir(dir);
    free(dir);
    free(a);
    free(b);
    free(vocab);
}
END_TEST

START_TEST(bad_model_file_is_one_line) {
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    ck_assert_int_eq(tsr_test_write_file(path, "GGUF\x03\x00\x00\x00", 8), 0);
    char *err;
    const char *args[] = {"run", "-m", path, "-p", "x", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    ck_assert_msg(strncmp(err, "tessera: ", 9) == 0 && strstr(err, path) &&
                      strchr(err, '\n') == err + strlen(err) - 1,
                  "not one line naming the file: %s", err);
    unlink(path);
    rmdir(dir);
    free(dir);
    free(err);
}
END_TEST

START_TEST(llama2c_model_needs_tokenizer) {
    char *model = tsr_test_data("models/stories260K.bin");
    char *err;
    const char *args[] = {"run", "-m", model, "-p", "x", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: a llama2.c checkpoint holds no vocabulary; pass its "
             "tokenizer with --tokenizer (e.g. tok512.bin)\n", model);
    ck_assert_str_eq(err, want);
    free(err);
    free(model);
}
END_TEST

/* hooks: call plugin commands through libffi on the live instances of a running pipeline. */
START_TEST(hooks_run_on_live_instances) {
    char *dir = tsr_test_tmpdir();
    char yaml_path[4096], stats[4096], yaml[12288];
    snprintf(yaml_path, sizeof yaml_path, "%s/p.yaml", dir);
    snprintf(stats, sizeof stats, "%s/stats.txt", dir);
    snprintf(yaml, sizeof yaml,
             "tessera: 1\ncache: { plugin: streaming, sink: 4, window: 28 }\n"
             "decoder: { plugin: greedy }\nhooks:\n"
             "  - { on: after_step, stage: cache, call: reset_counters }\n"
             "  - { on: at_end, stage: cache, call: dump_stats, args: [\"%s\"] }\n", stats);
    ck_assert_int_eq(tsr_test_write_file(yaml_path, yaml, strlen(yaml)), 0);
    char *model = tsr_test_data("models/stories260K.gguf");
    const char *args[] = {"run", yaml_path, "-m", model, "-p", "Once upon a time", "-n", "100", NULL};
    char *err;
    int status = tsr_test_tessera(NULL, &err, args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    char *text = tsr_test_read_file(stats, NULL);
    /* Eviction happens at a store; after_step reset the counters after the last one, so the
     * end-of-run dump counts none (without the reset it would count thousands). */
    ck_assert_msg(text && strstr(text, "# streaming: sink 4 window 28\n"), "%s", text);
    ck_assert_msg(strstr(text, "\nevicted 0\n"), "%s", text);
    free(text);
    free(err);
    free(model);
    unlink(stats);
    unlink(yaml_path);
    rmdir(dir);
    free(dir);
}
END_TEST

/* A number of `tessera ... --json`'s output: the value after "key": (the keys are unique). */
static double json_number(const char *json, const char *key) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\":", key);
    const char *at = strstr(json, quoted);
    ck_assert_msg(at != NULL, "no %s in %s", quoted, json);
    return strtod(at + strlen(quoted), NULL);
}

/* `tessera perplexity` against llama.cpp's llama-perplexity on the same model, text and chunks.
 * The reference, llama.cpp commit c392e5094 (the fixtures' one) built outside this tree with
 * `cmake -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON`, target llama-perplexity,
 * run on an AVX-512 machine:
 *   llama-perplexity -m models/stories260K.gguf -f data/tinystories_val.txt -c 128 -b 128
 *     --chunks 100 -t 1 -ctk f32 -ctv f32 --ppl-output-type 1
 * (-b 128: one sequence per batch; F32 KV cache, flash attention off: its defaults) prints for
 * the last chunk "12672  3.9403  1.371247  0.022611" (position, perplexity, mean NLL and its
 * standard error, to six decimals) and "Final estimate: PPL = 3.9403 +/- 0.08909". Both tools
 * tokenize with BOS, cut 100 chunks of 128 tokens, put BOS first in each and score positions
 * 64..126 against the next token: 63 tokens a chunk.
 * Tolerance on the mean NLL, 6e-7 (the perplexity's relative difference is the same): the
 * reference's rounding to six decimals (5e-7) plus about 3x the spread of this build's own
 * float noise (2.4e-8 between the scalar, avx2 and avx512 levels with the flash, ggml and
 * reference attention plugins, all within 1.4e-7 of 1.371247). */
START_TEST(perplexity_matches_llama_cpp) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *text = tsr_test_data("data/tinystories_val.txt");
    const char *args[] = {"perplexity", "-m", model, "-f", text, "--ctx", "128", "--chunks",
                          "100", "-t", "1", "--json", NULL};
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    ck_assert_double_eq(json_number(out, "chunks"), 100);
    ck_assert_double_eq(json_number(out, "scored_tokens"), 100 * 63);
    double nll = json_number(out, "mean_nll"), se = json_number(out, "mean_nll_stderr");
    ck_assert_msg(fabs(nll - 1.371247) <= 6e-7, "mean NLL %.9f, llama.cpp 1.371247", nll);
    ck_assert_msg(fabs(se - 0.022611) <= 6e-7, "its standard error %.9f, llama.cpp 0.022611", se);
    ck_assert_double_eq_tol(json_number(out, "ppl"), 3.9403, 5e-5);
    ck_assert_double_eq_tol(json_number(out, "ppl_stderr"), 0.08909, 5e-6);
    free(out);
    free(err);
    free(text);
    free(model);
}
END_TEST

int main(void) {
    free(tsr_test_require_data("models/stories260K.bin"));
    free(tsr_test_require_data("data/tinystories_val.txt"));
    Suite *s = suite_create("cli-models");
    TCase *tc = tcase_create("run");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, run_bin_matches_llama2c_text, 0, 3);
    tcase_add_loop_test(tc, run_gguf_matches_llama2c_text, 0, 3);
    tcase_add_test(tc, logits_file_matches_llama2c);
    tcase_add_test(tc, logits_failure_leaves_no_file);
    tcase_add_test(tc, tokenize_prints_ids);
    tcase_add_test(tc, tokenize_file_with_vocab_only_gguf);
    tcase_add_test(tc, bad_model_file_is_one_line);
    tcase_add_test(tc, llama2c_model_needs_tokenizer);
    tcase_add_test(tc, hooks_run_on_live_instances);
    tcase_add_test(tc, perplexity_matches_llama_cpp);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
