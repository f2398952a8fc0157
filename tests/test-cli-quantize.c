/* `tessera quantize`, `synth`, `bench` and `perplexity`, run as a user runs them: files
 * byte-identical to llama-quantize's, llama.cpp's type recipes and fallbacks, load-time
 * conversion equal to converted files, reports that parse, and one error line each.
 * Needs the shared data folder (skips without it). */
#include <check.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_testutil.h"
#include "testutil.h"

#define LLAMA_TINY "fixtures/models/llama-tiny-f32.gguf"
#define STORIES "models/stories260K.gguf"
#define VAL_TEXT "data/tinystories_val.txt"

static bool files_equal(const char *a, const char *b, size_t *size) {
    size_t na, nb;
    char *x = tsr_test_read_file(a, &na), *y = tsr_test_read_file(b, &nb);
    ck_assert_msg(x && y, "cannot read %s or %s", a, b);
    bool same = na == nb && memcmp(x, y, na) == 0;
    if (size) *size = na;
    free(x);
    free(y);
    return same;
}

/* The quantize report of llama-tiny-f32 to `type` (written to a file that is then removed). */
static json_t *quantize_report(const char *type) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *args[] = {"quantize", in, tmp_path(&t, "out.gguf"), type, "--json", NULL};
    json_t *root = run_json(args);
    free(in);
    tmp_free(&t);
    return root;
}

/* The type the report gives `tensor`. */
static const char *report_type(json_t *root, const char *tensor) {
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(root, "tensors"), i, t)
        if (!strcmp(json_string_value(json_object_get(t, "tensor")), tensor))
            return json_string_value(json_object_get(t, "to"));
    ck_abort_msg("report has no tensor %s", tensor);
    return NULL;
}

static double mean_rel_rmse(json_t *root) {
    size_t i;
    json_t *t;
    double sum = 0;
    json_t *tensors = json_object_get(root, "tensors");
    json_array_foreach(tensors, i, t) sum += json_real_value(json_object_get(t, "rel_rmse"));
    return sum / (double)json_array_size(tensors);
}

/* ---- quantize: llama-quantize's files, byte for byte ------------------------------------ */

/* The stacks of experts of the mixture-of-experts fixtures go to the quantizer one expert at a
 * time and are stacked again (each line counts the expert matrices as the weights they are). */
static const struct {
    const char *model, *type, *line;
} identical[] = {
    {"llama-tiny", "q8_0", "1835008 weights quantized, 8.500 bits per weight"},
    {"llama-tiny", "q4_0", "1835008 weights quantized, 4.647 bits per weight"},
    {"llama-tiny", "q4_k_m", "1835008 weights quantized, 4.905 bits per weight"},
    {"llama-tiny", "q6_k", "1835008 weights quantized, 6.562 bits per weight"},
    {"llama-tiny", "f16", "1835008 weights quantized, 16.000 bits per weight"},
    {"moe-tiny", "q8_0", "1441792 weights quantized, 8.500 bits per weight"},
    {"qwen2moe-tiny", "q8_0", "1736704 weights quantized, 8.500 bits per weight"},
    {"olmoe-tiny", "q8_0", "1572864 weights quantized, 8.500 bits per weight"},
};

START_TEST(quantize_matches_llama_quantize) {
    tmp t = {0};
    char rel[128];
    snprintf(rel, sizeof rel, "fixtures/models/%s-f32.gguf", identical[_i].model);
    char *in = tsr_test_data(rel);
    snprintf(rel, sizeof rel, "fixtures/models/%s-%s.gguf", identical[_i].model,
             identical[_i].type);
    char *want = tsr_test_data(rel);
    const char *out_path = tmp_path(&t, "out.gguf");
    const char *args[] = {"quantize", in, out_path, identical[_i].type, NULL};
    char *out = run_ok(args);
    char line[4300];
    snprintf(line, sizeof line, "%s: %s\n", out_path, identical[_i].line);
    ck_assert_str_eq(out, line);
    size_t size;
    ck_assert_msg(files_equal(out_path, want, &size), "%s differs from llama-quantize's", rel);
    ck_assert_uint_gt(size, 0);
    free(out);
    free(in);
    free(want);
    tmp_free(&t);
}
END_TEST

/* --json: 16 matrices (2 blocks of 7, token_embd, output), each with its exact storage cost. */
START_TEST(quantize_json_bits_per_weight) {
    json_t *q8 = quantize_report("q8_0");
    ck_assert_double_eq(json_real_value(json_object_get(q8, "weights")), 1835008.0);
    ck_assert_double_eq(json_real_value(json_object_get(q8, "bits_per_weight")), 8.5);
    json_t *tensors = json_object_get(q8, "tensors");
    ck_assert_uint_eq(json_array_size(tensors), 16);
    size_t i;
    json_t *x;
    json_array_foreach(tensors, i, x) {
        ck_assert_str_eq(json_string_value(json_object_get(x, "from")), "F32");
        ck_assert_str_eq(json_string_value(json_object_get(x, "to")), "Q8_0");
        ck_assert_double_eq(json_real_value(json_object_get(x, "bits_per_weight")), 8.5);
        double e = json_real_value(json_object_get(x, "rel_rmse"));
        ck_assert_msg(e > 0 && e < 0.01, "%s: rel_rmse %g",
                      json_string_value(json_object_get(x, "tensor")), e);
    }
    json_decref(q8);
    /* Q4_0: 18 bytes per 32 weights; the output matrix gets Q6_K (210 bytes per 256). */
    json_t *q4 = quantize_report("q4_0");
    json_array_foreach(json_object_get(q4, "tensors"), i, x) {
        const char *name = json_string_value(json_object_get(x, "tensor"));
        bool output = !strcmp(name, "output.weight");
        ck_assert_str_eq(json_string_value(json_object_get(x, "to")), output ? "Q6_K" : "Q4_0");
        ck_assert_double_eq(json_real_value(json_object_get(x, "bits_per_weight")),
                            output ? 6.5625 : 4.5);
    }
    json_decref(q4);
}
END_TEST

/* ---- quantize: llama.cpp's recipes and the error they cost ------------------------------ */

/* llama.cpp's llama_tensor_get_type for llama-tiny (2 blocks, 8 heads over 4 KV heads, rows of
 * 256 and 768): the type of each role in block 0 and block 1. */
static const struct {
    const char *type;
    const char *q, *k, *v0, *v1, *o, *gate, *up, *down0, *down1, *embd, *output;
} recipes[] = {
    {"q2_k", "Q2_K", "Q2_K", "Q3_K", "Q3_K", "Q3_K", "Q2_K", "Q2_K",
     "Q3_K", "Q3_K", "Q2_K", "Q6_K"},
    {"q3_k_m", "Q3_K", "Q3_K", "Q5_K", "Q5_K", "Q4_K", "Q3_K", "Q3_K", "Q4_K", "Q4_K", "Q3_K",
     "Q6_K"},
    {"q4_k_s", "Q4_K", "Q4_K", "Q5_K", "Q5_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K",
     "Q6_K"},
    {"q4_k_m", "Q4_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K",
     "Q6_K"},
    {"q5_k_m", "Q5_K", "Q5_K", "Q5_K", "Q6_K", "Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q6_K", "Q5_K",
     "Q6_K"},
    {"iq4_xs", "IQ4_XS", "IQ4_XS", "IQ4_XS", "IQ4_XS", "IQ4_XS", "IQ4_XS", "IQ4_XS", "IQ4_XS",
     "IQ4_XS", "IQ4_XS", "Q6_K"},
    {"q4_1", "Q4_1", "Q4_1", "Q4_1", "Q4_1", "Q4_1", "Q4_1", "Q4_1",
     "Q4_1", "Q4_1", "Q4_1", "Q6_K"},
    {"q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0",
     "Q5_0", "Q5_0", "Q5_0", "Q6_K"},
    {"q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_1",
     "Q5_1", "Q5_1", "Q5_1", "Q6_K"},
};

START_TEST(quantize_follows_llama_cpp_recipes) {
    json_t *r = quantize_report(recipes[_i].type);
    const struct {
        const char *tensor, *want;
    } rows[] = {
        {"blk.0.attn_q.weight", recipes[_i].q},     {"blk.1.attn_q.weight", recipes[_i].q},
        {"blk.0.attn_k.weight", recipes[_i].k},     {"blk.0.attn_v.weight", recipes[_i].v0},
        {"blk.1.attn_v.weight", recipes[_i].v1},    {"blk.0.attn_output.weight", recipes[_i].o},
        {"blk.1.attn_output.weight", recipes[_i].o}, {"blk.0.ffn_gate.weight", recipes[_i].gate},
        {"blk.0.ffn_up.weight", recipes[_i].up},    {"blk.0.ffn_down.weight", recipes[_i].down0},
        {"blk.1.ffn_down.weight", recipes[_i].down1}, {"token_embd.weight", recipes[_i].embd},
        {"output.weight", recipes[_i].output},
    };
    for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++)
        ck_assert_msg(!strcmp(report_type(r, rows[k].tensor), rows[k].want), "%s: %s is %s, "
                      "llama.cpp makes %s", recipes[_i].type, rows[k].tensor,
                      report_type(r, rows[k].tensor), rows[k].want);
    json_decref(r);
}
END_TEST

/* The converted files load and run; their logits are finite. */
static const char *const runnable[] = {"q2_k", "q3_k_m", "q4_k_s", "q5_k_m", "q4_1", "q5_0",
                                       "q5_1", "iq4_nl", "iq4_xs", "bf16"};

START_TEST(quantized_files_run) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *model = tmp_path(&t, "model.gguf"), *logits = tmp_path(&t, "logits.f32");
    const char *q_args[] = {"quantize", in, model, runnable[_i], NULL};
    free(run_ok(q_args));
    const char *l_args[] = {"logits", "-m", model, "--tokens", "1 17 300 42", "--out", logits,
                            NULL};
    free(run_ok(l_args));
    size_t size;
    float *v = (float *)tsr_test_read_file(logits, &size);
    ck_assert_uint_eq(size, 4 * 512 * sizeof(float));
    for (size_t i = 0; i < size / sizeof(float); i++)
        ck_assert_msg(isfinite(v[i]), "%s: logit %zu is %g", runnable[_i], i, v[i]);
    free(v);
    free(in);
    tmp_free(&t);
}
END_TEST

START_TEST(rmse_falls_as_bits_rise) {
    static const char *const ladder[] = {"q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"};
    double prev = INFINITY, prev_bits = 0;
    for (size_t i = 0; i < sizeof ladder / sizeof ladder[0]; i++) {
        json_t *r = quantize_report(ladder[i]);
        double e = mean_rel_rmse(r), bits = json_real_value(json_object_get(r, "bits_per_weight"));
        ck_assert_msg(e > 0 && e < prev, "%s: mean rel_rmse %g, not below %g", ladder[i], e, prev);
        ck_assert_msg(bits > prev_bits, "%s: %g bits per weight", ladder[i], bits);
        prev = e;
        prev_bits = bits;
        json_decref(r);
    }
}
END_TEST

/* stories260K's rows of 64 and 172 hold no 256-element block: llama.cpp's fallbacks apply
 * (Q4_K -> Q5_0, Q6_K -> Q8_0, and 16 bits where even 32-blocks do not fit). */
START_TEST(short_rows_fall_back) {
    tmp t = {0};
    char *in = tsr_test_data(STORIES);
    const char *model = tmp_path(&t, "s.gguf");
    const char *args[] = {"quantize", in, model, "q4_k_m", "--json", NULL};
    json_t *r = run_json(args);
    size_t i;
    json_t *x;
    json_array_foreach(json_object_get(r, "tensors"), i, x) {
        const char *name = json_string_value(json_object_get(x, "tensor"));
        const char *to = json_string_value(json_object_get(x, "to"));
        int layer = -1;
        sscanf(name, "blk.%d.", &layer);
        /* use_more_bits for 5 blocks: layers 2 and 4 (every third after n/8, and the last). */
        bool more = layer == 2 || layer == 4;
        const char *want = !strcmp(name, "output.weight")         ? "Q8_0"
                           : strstr(name, "ffn_down")              ? "F16"
                           : strstr(name, "attn_v") && more        ? "Q8_0"
                                                                   : "Q5_0";
        ck_assert_msg(!strcmp(to, want), "%s: %s, expected %s", name, to, want);
    }
    ck_assert_uint_eq(json_array_size(json_object_get(r, "tensors")), 37);
    json_decref(r);
    const char *run[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "24",
                         "--temperature", "0", NULL};
    char *out = run_ok(run);
    ck_assert_msg(strncmp(out, "Once upon a time", 16) == 0 && strlen(out) > 40, "%s", out);
    free(out);
    free(in);
    tmp_free(&t);
}
END_TEST

/* A pipeline converting at load multiplies exactly the weights llama-quantize wrote. */
static const char *const at_load[] = {"q8_0", "q4_0", "q4_k_m", "q6_k"};

START_TEST(load_time_conversion_equals_file) {
    tmp t = {0};
    char *f32 = tsr_test_data(LLAMA_TINY);
    char rel[128], set[64];
    snprintf(rel, sizeof rel, "fixtures/models/llama-tiny-%s.gguf", at_load[_i]);
    snprintf(set, sizeof set, "quantizer.type=%s", at_load[_i]);
    char *fixture = tsr_test_data(rel);
    const char *a = tmp_path(&t, "converted.f32"), *b = tmp_path(&t, "file.f32");
    const char *tokens = "1 5 9 200 3 77 411";
    const char *conv[] = {"logits", "-m", f32, "--set", set, "--tokens", tokens, "--out", a, NULL};
    const char *file[] = {"logits", "-m", fixture, "--tokens", tokens, "--out", b, NULL};
    free(run_ok(conv));
    free(run_ok(file));
    size_t size;
    ck_assert_msg(files_equal(a, b, &size), "%s at load: logits differ from %s's", at_load[_i],
                  rel);
    ck_assert_uint_eq(size, 7 * 512 * sizeof(float));
    free(f32);
    free(fixture);
    tmp_free(&t);
}
END_TEST

/* ---- quantize: errors ------------------------------------------------------------------- */

START_TEST(quantize_bad_type) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *out = tmp_path(&t, "out.gguf");
    const char *args[] = {"quantize", in, out, "q9_9", NULL};
    char *err = run_error(1, args);
    ck_assert_str_eq(err, "tessera: quantize: TYPE 'q9_9': quantizer 'gguf' expects one of keep, "
                          "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_s, "
                          "q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs\n");
    ck_assert_int_ne(access(out, F_OK), 0);
    free(err);
    free(in);
    tmp_free(&t);
}
END_TEST

START_TEST(quantize_research_quantizer_refused) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *yaml = tmp_path(&t, "rtn.yaml"), *out = tmp_path(&t, "out.gguf");
    const char *text = "tessera: 1\nquantizer: { plugin: rtn }\n";
    ck_assert_int_eq(tsr_test_write_file(yaml, text, strlen(text)), 0);
    const char *args[] = {"quantize", in, out, "q8_0", "--config", yaml, NULL};
    char *err = run_error(1, args);
    ck_assert_msg(strstr(err, "quantizer 'rtn' stores ") && strstr(err, "a GGUF file cannot hold"),
                  "%s", err);
    ck_assert_int_ne(access(out, F_OK), 0);
    free(err);
    free(in);
    tmp_free(&t);
}
END_TEST

START_TEST(quantize_missing_input) {
    tmp t = {0};
    const char *in = tmp_path(&t, "absent.gguf"), *out = tmp_path(&t, "out.gguf");
    const char *args[] = {"quantize", in, out, "q8_0", NULL};
    char *err = run_error(1, args);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: cannot open: No such file or directory\n", in);
    ck_assert_str_eq(err, want);
    ck_assert_int_ne(access(out, F_OK), 0);
    free(err);
    tmp_free(&t);
}
END_TEST

/* The file is written beside OUT and renamed: a folder that cannot be written leaves nothing. */
START_TEST(quantize_output_folder_missing) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *folder = tmp_path(&t, "absent");
    char out[4200];
    snprintf(out, sizeof out, "%s/out.gguf", folder);
    const char *args[] = {"quantize", in, out, "q8_0", NULL};
    char *err = run_error(1, args);
    ck_assert_msg(strstr(err, out) && strstr(err, "No such file or directory"), "%s", err);
    ck_assert_int_ne(access(folder, F_OK), 0);
    free(err);
    free(in);
    tmp_free(&t); /* fails if anything is left in the test folder */
}
END_TEST

START_TEST(quantize_usage) {
    const char *args[] = {"quantize", "in.gguf", "out.gguf", NULL};
    char *err = run_error(2, args);
    ck_assert_str_eq(err,
                     "tessera: quantize: expected IN OUT TYPE (see tessera quantize --help)\n");
    free(err);
}
END_TEST

/* ---- quantize and synth: the output file, written the careful way ------------------------ */

/* Starts tessera with `args`, stdout to /dev/null and stderr to `err_fd` (-1: /dev/null), and
 * returns its pid. */
static pid_t spawn_tessera(const char *const *args, int err_fd) {
    char *argv[64] = {(char *)tsr_test_env("TESSERA_BIN")};
    for (int n = 1; n < 63 && (argv[n] = (char *)args[n - 1]); n++) {}
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        dup2(null, 1);
        dup2(err_fd >= 0 ? err_fd : null, 2);
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static int wait_exit(pid_t pid) {
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status), "tessera died of signal %d", WTERMSIG(status));
    return WEXITSTATUS(status);
}

/* Two runs writing one OUT at once: each writes a file of its own and renames it, so OUT ends
 * up exactly one of the two files, never one type with the other's bytes mixed in. */
START_TEST(concurrent_quantize_runs_leave_one_whole_file) {
    char *in = tsr_test_data(LLAMA_TINY);
    char *q8 = tsr_test_data("fixtures/models/llama-tiny-q8_0.gguf");
    char *q4 = tsr_test_data("fixtures/models/llama-tiny-q4_0.gguf");
    for (int round = 0; round < 3; round++) {
        tmp t = {0};
        const char *out = tmp_path(&t, "out.gguf");
        const char *a[] = {"quantize", in, out, "q8_0", NULL};
        const char *b[] = {"quantize", in, out, "q4_0", NULL};
        pid_t pa = spawn_tessera(a, -1), pb = spawn_tessera(b, -1);
        ck_assert_int_eq(wait_exit(pa), 0);
        ck_assert_int_eq(wait_exit(pb), 0);
        ck_assert_msg(files_equal(out, q8, NULL) || files_equal(out, q4, NULL),
                      "round %d: OUT is neither run's file", round);
        ck_assert_int_eq(tsr_test_count_entries(t.dir), 1);
        tmp_free(&t);
    }
    free(in);
    free(q8);
    free(q4);
}
END_TEST

/* `quantize in in` would lose the input: refused under any name, before any work. */
START_TEST(quantize_refuses_its_input_as_output) {
    tmp t = {0};
    char *shared = tsr_test_data(LLAMA_TINY);
    size_t size;
    char *bytes = tsr_test_read_file(shared, &size);
    const char *in = tmp_path(&t, "in.gguf");
    ck_assert_int_eq(tsr_test_write_file(in, bytes, size), 0);
    const char *sym = tmp_path(&t, "sym.gguf"), *hard = tmp_path(&t, "hard.gguf");
    ck_assert_int_eq(symlink("in.gguf", sym), 0);
    ck_assert_int_eq(link(in, hard), 0);
    const char *outs[] = {in, sym, hard};
    for (size_t i = 0; i < 3; i++) {
        const char *args[] = {"quantize", in, outs[i], "q8_0", NULL};
        char *err = run_error(1, args);
        char want[8500];
        snprintf(want, sizeof want, "tessera: %s: is the input file %s; write the output to "
                 "another file\n", outs[i], in);
        ck_assert_str_eq(err, want);
        free(err);
    }
    ck_assert(files_equal(in, shared, NULL));
    ck_assert_int_eq(tsr_test_count_entries(t.dir), 3);
    /* A folder as OUT is refused too. */
    const char *args[] = {"quantize", in, t.dir, "q8_0", NULL};
    char *err = run_error(1, args);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: is a folder; expected a file name\n", t.dir);
    ck_assert_str_eq(err, want);
    free(err);
    free(bytes);
    free(shared);
    tmp_free(&t);
}
END_TEST

/* Written into standard output (here through a link to /proc/self/fd/1, as /dev/stdout is),
 * the GGUF is the whole of stdout: the report goes to stderr. */
START_TEST(quantize_into_stdout_reports_on_stderr) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    char *q8 = tsr_test_data("fixtures/models/llama-tiny-q8_0.gguf");
    const char *std_out = tmp_path(&t, "stdout");
    ck_assert_int_eq(symlink("/proc/self/fd/1", std_out), 0);
    char tail[4300];
    snprintf(tail, sizeof tail, "| cmp - '%s'", q8);
    const char *args[] = {"quantize", in, std_out, "q8_0", NULL};
    char *out, *err;
    ck_assert_int_eq(tsr_test_tessera_sh(&out, &err, tail, args), 0);
    ck_assert_str_eq(out, "");
    char want[4300];
    snprintf(want, sizeof want, "%s: 1835008 weights quantized, 8.500 bits per weight\n", std_out);
    ck_assert_msg(strstr(err, want), "%s", err);
    free(out);
    free(err);
    free(in);
    free(q8);
    tmp_free(&t);
}
END_TEST

/* Interrupted while its output is being made, synth leaves nothing behind and dies of the
 * signal, as it would have without a file to clean up. */
static const int interrupting[] = {SIGINT, SIGTERM};

START_TEST(interrupted_synth_leaves_no_file) {
    tmp t = {0};
    const char *out = tmp_path(&t, "big.gguf");
    const char *args[] = {"synth", "--shape", "tinyllama-1.1b", "--type", "q8_0", "-o", out,
                          NULL};
    pid_t pid = spawn_tessera(args, -1);
    /* The temporary file appears beside OUT as soon as the work starts. */
    for (int i = 0; i < 6000 && tsr_test_count_entries(t.dir) == 0; i++) usleep(10000);
    ck_assert_int_eq(tsr_test_count_entries(t.dir), 1);
    ck_assert_int_ne(access(out, F_OK), 0);
    ck_assert_int_eq(kill(pid, interrupting[_i]), 0);
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == interrupting[_i],
                  "status 0x%x", status);
    ck_assert_int_eq(tsr_test_count_entries(t.dir), 0);
    tmp_free(&t);
}
END_TEST

/* stderr of `args` when it is a terminal (a pseudo-terminal here). */
static char *stderr_on_terminal(const char *const *args) {
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    ck_assert_int_ge(master, 0);
    ck_assert_int_eq(grantpt(master), 0);
    ck_assert_int_eq(unlockpt(master), 0);
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    ck_assert_int_ge(slave, 0);
    pid_t pid = spawn_tessera(args, slave);
    close(slave);
    char *text = NULL;
    size_t len = 0;
    char chunk[4096];
    ssize_t got;
    /* Read until the terminal hangs up (EIO) once the program has exited. */
    while ((got = read(master, chunk, sizeof chunk)) > 0) {
        text = realloc(text, len + (size_t)got + 1);
        memcpy(text + len, chunk, (size_t)got);
        len += (size_t)got;
    }
    close(master);
    ck_assert_int_eq(wait_exit(pid), 0);
    if (!text) text = calloc(1, 1);
    text[len] = '\0';
    return text;
}

START_TEST(quantize_and_synth_show_progress) {
    tmp t = {0};
    char *in = tsr_test_data(LLAMA_TINY);
    const char *out = tmp_path(&t, "out.gguf");
    /* Not a terminal (a pipe): one final line. */
    const char *args[] = {"quantize", in, out, "q8_0", NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 0);
    double secs = -1;
    int used = 0;
    ck_assert_msg(sscanf(err, "tessera: quantize: 21/21 tensors, %lf s\n%n", &secs, &used) == 1 &&
                      used == (int)strlen(err) && secs >= 0, "%s", err);
    free(err);
    /* A terminal: one line rewritten after each tensor, ended once. */
    const char *synth[] = {"synth", "--shape", "tiny", "-o", out, NULL};
    char *term = stderr_on_terminal(synth);
    for (int k = 1; k <= 21; k++) {
        char want[64];
        snprintf(want, sizeof want, "\rtessera: synth: %d/21 tensors, ", k);
        ck_assert_msg(strstr(term, want), "no '%s' in: %s", want + 1, term);
    }
    /* The terminal turns the final newline into CR LF; that is the only line end. */
    char *end = strstr(term, "\r\n");
    ck_assert_msg(end && end[2] == '\0' && strchr(term, '\n') == end + 1, "%s", term);
    free(term);
    free(in);
    tmp_free(&t);
}
END_TEST

/* ---- synth ------------------------------------------------------------------------------ */

START_TEST(synth_is_deterministic) {
    tmp t = {0};
    const char *a = tmp_path(&t, "a.gguf"), *b = tmp_path(&t, "b.gguf");
    const char *c = tmp_path(&t, "c.gguf");
    const char *files[] = {a, b, c}, *seeds[] = {"1", "1", "2"};
    for (int i = 0; i < 3; i++) {
        const char *args[] = {"synth", "--shape", "tiny", "--type", "q8_0", "--seed", seeds[i],
                              "-o", files[i], NULL};
        char *out = run_ok(args);
        char want[4300];
        snprintf(want, sizeof want, "%s: 114688 weights quantized, 8.500 bits per weight\n",
                 files[i]);
        ck_assert_str_eq(out, want);
        free(out);
    }
    size_t size_a, size_c;
    ck_assert_msg(files_equal(a, b, &size_a), "same seed, different files");
    ck_assert_msg(!files_equal(a, c, &size_c), "different seeds, same file");
    ck_assert_uint_eq(size_a, size_c);
    /* It runs, and its SentencePiece-style vocabulary tokenizes (byte fallback for "▁Hello",
     * then "▁w" as a piece: 259 + 'w' - 'a'). */
    const char *run[] = {"run", "-m", a, "-n", "8", "--temperature", "0", NULL};
    free(run_ok(run));
    const char *tok[] = {"tokenize", "-m", a, "-p", "Hello world", NULL};
    char *out = run_ok(tok);
    ck_assert_str_eq(out, "1 229 153 132 75 104 111 111 114 281 114 117 111 103\n");
    free(out);
    tmp_free(&t);
}
END_TEST

static const char *const synth_types[] = {"f32", "f16", "q8_0", "q4_0", "q4_k_m"};

START_TEST(synth_types_load) {
    tmp t = {0};
    const char *model = tmp_path(&t, "m.gguf"), *logits = tmp_path(&t, "l.f32");
    const char *args[] = {"synth", "--shape", "tiny", "--type", synth_types[_i], "-o", model,
                          "--json", NULL};
    json_t *r = run_json(args);
    ck_assert_double_eq(json_real_value(json_object_get(r, "weights")), 114688.0);
    json_decref(r);
    const char *l_args[] = {"logits", "-m", model, "--tokens", "1 300 4", "--out", logits, NULL};
    free(run_ok(l_args));
    size_t size;
    free(tsr_test_read_file(logits, &size));
    ck_assert_uint_eq(size, 3 * 320 * sizeof(float));
    tmp_free(&t);
}
END_TEST

START_TEST(synth_shapes) {
    const char *help[] = {"synth", "--help", NULL};
    char *out = run_ok(help);
    ck_assert_msg(strstr(out, " tinyllama-1.1b") && strstr(out, " tinyllama-draft") &&
                      strstr(out, " qwen2.5-0.5b") && strstr(out, " llama-7b") &&
                      strstr(out, " tiny"), "%s", out);
    free(out);
    const char *bad[] = {"synth", "--shape", "gpt-5", "-o", "x.gguf", NULL};
    char *err = run_error(2, bad);
    ck_assert_str_eq(err, "tessera: synth: unknown shape 'gpt-5'; shapes: tinyllama-1.1b, "
                          "tinyllama-draft, qwen2.5-0.5b, llama-7b, olmoe-1b-7b, "
                          "qwen1.5-moe-a2.7b, tiny, tiny-moe, tiny-qwen2moe (see tessera synth "
                          "--help)\n");
    free(err);
    ck_assert_int_ne(access("x.gguf", F_OK), 0);
}
END_TEST

/* ---- bench ------------------------------------------------------------------------------ */

START_TEST(bench_reports) {
    char *model = tsr_test_data(STORIES);
    const char *args[] = {"bench", "-m", model, "-p", "16", "-n", "8", "-r", "2", "-t", "1,2",
                          "--bandwidth-mib", "32", "--peak-ms", "50", "--json", NULL};
    json_t *r = run_json(args);
    /* 5 layers of q 64x64, k and v 32x64, o 64x64, gate, up and down 172x64 */
    ck_assert_double_eq(json_real_value(json_object_get(r, "prefill_macs_per_token")),
                        5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64));
    ck_assert_str_eq(json_string_value(json_object_get(r, "peak_kind")), "f32");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "n_layer")), 5);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "n_embd")), 64);
    ck_assert_str_eq(json_string_value(json_object_get(r, "type")), "F32");
    ck_assert_int_gt(json_integer_value(json_object_get(r, "weight_bytes_per_token")), 0);
    json_t *results = json_object_get(r, "results");
    ck_assert_uint_eq(json_array_size(results), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *x = json_array_get(results, i);
        ck_assert_int_eq(json_integer_value(json_object_get(x, "threads")), (json_int_t)i + 1);
        const char *keys[] = {"prefill_tps_mean", "decode_tps_mean", "machine_read_gbs",
                              "peak_rss_mib"};
        for (size_t k = 0; k < 4; k++) {
            double v = json_real_value(json_object_get(x, keys[k]));
            ck_assert_msg(isfinite(v) && v > 0, "%s = %g", keys[k], v);
        }
        double roof = json_real_value(json_object_get(x, "roofline_fraction"));
        ck_assert_msg(roof > 0 && roof < 5, "roofline_fraction %g", roof);
        double gops = json_real_value(json_object_get(x, "prefill_gops"));
        double pp = json_real_value(json_object_get(x, "prefill_tps_mean"));
        ck_assert_double_eq_tol(gops, 2 * 226560 * pp * 1e-9, 1e-12 * gops);
        double peak = json_real_value(json_object_get(x, "peak_gops"));
        double frac = json_real_value(json_object_get(x, "prefill_peak_fraction"));
        ck_assert_msg(peak > 0 ? fabs(frac - gops / peak) <= 1e-12 * frac : frac == 0,
                      "prefill_peak_fraction %g of %g / %g", frac, gops, peak);
        /* Whole positions of 5 layers x (K + V) x 32 floats, at least the 9 decoded. */
        json_int_t kv = json_integer_value(json_object_get(x, "kv_bytes"));
        ck_assert_msg(kv >= 9 * 1280 && kv % 1280 == 0, "kv_bytes %lld", (long long)kv);
        /* The bandwidth buffer of one thread count must not count in the next one's RSS. */
        ck_assert_msg(json_real_value(json_object_get(x, "peak_rss_mib")) < 1024, "peak RSS");
    }
    json_decref(r);
    const char *md[] = {"bench", "-m", model, "-p", "8", "-n", "4", "-r", "1",
                        "--bandwidth-mib", "16", "--peak-ms", "20", NULL};
    char *out = run_ok(md);
    const char *head = "| model | type | weights | threads | test | tokens/s | weights read | "
                       "roofline | products | of the peak |\n";
    ck_assert_msg(strncmp(out, head, strlen(head)) == 0, "%s", out);
    ck_assert_msg(strstr(out, " GOP/s of ") && strstr(out, " f32 | "), "%s", out);
    ck_assert_msg(strstr(out, "| stories260K.gguf | F32 | ") && strstr(out, "| pp8 |") &&
                      strstr(out, "| tg4 |") && strstr(out, "| decoder |"), "%s", out);
    free(out);
    /* -n 0: prefill alone, no decode rows or decode tables */
    const char *prefill_only[] = {"bench", "-m", model, "-p", "8", "-n", "0", "-r", "1",
                                  "--bandwidth-mib", "16", "--peak-ms", "20", NULL};
    out = run_ok(prefill_only);
    ck_assert_msg(strstr(out, "| pp8 |") && !strstr(out, "| tg") && !strstr(out, "| decoder |"),
                  "%s", out);
    free(out);
    const char *bad[] = {"bench", "-m", model, "-t", "0", NULL};
    char *err = run_error(2, bad);
    free(err);
    free(model);
}
END_TEST

/* A model with experts: the roofline counts what every token reads plus the experts a decoded
 * token was routed to, as read: tiny-moe's k = 2 experts of 2 layers, each 3 Q8_0 matrices of
 * 32 rows of 64 (2 blocks of 34 bytes). */
START_TEST(bench_counts_the_experts_read) {
    tmp t = {0};
    const char *model = tmp_path(&t, "moe.gguf");
    const char *synth[] = {"synth", "--shape", "tiny-moe", "--type", "q8_0", "-o", model, NULL};
    free(run_ok(synth));
    const char *args[] = {"bench", "-m", model, "-p", "8", "-n", "4", "-r", "1",
                          "--bandwidth-mib", "16", "--json", NULL};
    json_t *r = run_json(args);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "n_expert")), 4);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "n_expert_used")), 2);
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(r, "weight_bytes_counted")),
                                 "the routed experts' matrices read per decoded token"));
    json_t *x = json_array_get(json_object_get(r, "results"), 0);
    const double expert = 2 * 2 * 3 * 32 * 2 * 34;
    ck_assert_double_eq(json_real_value(json_object_get(x, "expert_bytes_per_token")), expert);
    double every = (double)json_integer_value(json_object_get(r, "weight_bytes_per_token"));
    double tps = json_real_value(json_object_get(x, "decode_tps_mean"));
    ck_assert_double_eq_tol(json_real_value(json_object_get(x, "decode_weight_gbs")),
                            (every + expert) * tps * 1e-9, 1e-9 * (every + expert) * tps * 1e-9);
    json_decref(r);
    tmp_free(&t);
}
END_TEST

/* ---- perplexity ------------------------------------------------------------------------- */

static double ppl_of(const char *model, const char *config, const char *set) {
    char *text = tsr_test_data(VAL_TEXT);
    const char *args[16] = {"perplexity", "-m", model, "-f", text, "--ctx", "128", "--chunks", "8",
                            "--json"};
    int n = 10;
    if (config) args[n++] = config;
    if (set) {
        args[n++] = "--set";
        args[n++] = set;
    }
    args[n] = NULL;
    json_t *r = run_json(args);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "ctx")), 128);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "chunks")), 8);
    /* The second half of each chunk, less its last position: 8 x 63. */
    ck_assert_int_eq(json_integer_value(json_object_get(r, "scored_tokens")), 8 * 63);
    double ppl = json_real_value(json_object_get(r, "ppl"));
    double nll = json_real_value(json_object_get(r, "mean_nll"));
    ck_assert_msg(isfinite(ppl) && ppl > 1 && ppl < 20, "ppl %g", ppl);
    ck_assert_double_eq_tol(ppl, exp(nll), 1e-9 * ppl);
    ck_assert_msg(json_real_value(json_object_get(r, "ppl_stderr")) > 0, "no standard error");
    json_decref(r);
    free(text);
    return ppl;
}

START_TEST(perplexity_stable) {
    tmp t = {0};
    char *model = tsr_test_data(STORIES);
    double a = ppl_of(model, NULL, NULL), b = ppl_of(model, NULL, NULL);
    ck_assert_msg(a == b, "%.17g then %.17g", a, b);
    const char *yaml = tmp_path(&t, "reference.yaml");
    const char *text = "tessera: 1\nattention: { plugin: reference }\n";
    ck_assert_int_eq(tsr_test_write_file(yaml, text, strlen(text)), 0);
    double ref = ppl_of(model, yaml, NULL);
    ck_assert_msg(fabs(ref - a) <= 1e-4 * a, "reference %.9g, flash %.9g", ref, a);
    double q8 = ppl_of(model, NULL, "quantizer.type=q8_0");
    ck_assert_msg(fabs(q8 - a) <= 0.05 * a && q8 != a, "q8_0 %.9g, f32 %.9g", q8, a);
    free(model);
    tmp_free(&t);
}
END_TEST

START_TEST(perplexity_short_text) {
    tmp t = {0};
    char *model = tsr_test_data(STORIES);
    const char *path = tmp_path(&t, "short.txt");
    ck_assert_int_eq(tsr_test_write_file(path, "Once upon a time", 16), 0);
    const char *args[] = {"perplexity", "-m", model, "-f", path, "--ctx", "128", NULL};
    char *err = run_error(1, args);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s: 5 tokens, fewer than one chunk of --ctx 128\n", path);
    ck_assert_str_eq(err, want);
    free(err);
    free(model);
    tmp_free(&t);
}
END_TEST

/* A model whose logits are NaN (synth's output norm, 64 ones, made NaN): perplexity fails
 * with one line, and never prints a NaN perplexity. */
START_TEST(perplexity_refuses_non_finite_results) {
    tmp t = {0};
    const char *model = tmp_path(&t, "nan.gguf");
    const char *args[] = {"synth", "--shape", "tiny", "-o", model, NULL};
    free(run_ok(args));
    size_t size;
    char *bytes = tsr_test_read_file(model, &size);
    float ones[64], nan_run[64];
    for (int i = 0; i < 64; i++) {
        ones[i] = 1.0f;
        nan_run[i] = NAN;
    }
    char *at = memmem(bytes, size, ones, sizeof ones);
    ck_assert_ptr_nonnull(at);
    memcpy(at, nan_run, sizeof nan_run);
    ck_assert_int_eq(tsr_test_write_file(model, bytes, size), 0);
    free(bytes);
    char *text = tsr_test_data(VAL_TEXT);
    const char *ppl[] = {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--chunks", "2",
                         NULL};
    const char *ppl_json[] = {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--chunks",
                              "2", "--json", NULL};
    free(run_error(1, ppl));
    free(run_error(1, ppl_json));
    free(text);
    tmp_free(&t);
}
END_TEST

int main(void) {
    free(tsr_test_require_data(LLAMA_TINY));
    free(tsr_test_require_data("fixtures/models/llama-tiny-q4_k_m.gguf"));
    free(tsr_test_require_data(STORIES));
    free(tsr_test_require_data(VAL_TEXT));
    Suite *s = suite_create("cli-quantize");
    TCase *tc = tcase_create("quantize");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, quantize_matches_llama_quantize, 0,
                        (int)(sizeof identical / sizeof identical[0]));
    tcase_add_test(tc, quantize_json_bits_per_weight);
    tcase_add_loop_test(tc, quantize_follows_llama_cpp_recipes, 0,
                        (int)(sizeof recipes / sizeof recipes[0]));
    tcase_add_loop_test(tc, quantized_files_run, 0, (int)(sizeof runnable / sizeof runnable[0]));
    tcase_add_test(tc, rmse_falls_as_bits_rise);
    tcase_add_test(tc, short_rows_fall_back);
    tcase_add_loop_test(tc, load_time_conversion_equals_file, 0,
                        (int)(sizeof at_load / sizeof at_load[0]));
    tcase_add_test(tc, quantize_bad_type);
    tcase_add_test(tc, quantize_research_quantizer_refused);
    tcase_add_test(tc, quantize_missing_input);
    tcase_add_test(tc, quantize_output_folder_missing);
    tcase_add_test(tc, quantize_usage);
    tcase_add_test(tc, concurrent_quantize_runs_leave_one_whole_file);
    tcase_add_test(tc, quantize_refuses_its_input_as_output);
    tcase_add_test(tc, quantize_into_stdout_reports_on_stderr);
    tcase_add_loop_test(tc, interrupted_synth_leaves_no_file, 0,
                        (int)(sizeof interrupting / sizeof interrupting[0]));
    tcase_add_test(tc, quantize_and_synth_show_progress);
    suite_add_tcase(s, tc);
    TCase *ts = tcase_create("synth");
    tcase_set_timeout(ts, 120);
    tcase_add_test(ts, synth_is_deterministic);
    tcase_add_loop_test(ts, synth_types_load, 0, (int)(sizeof synth_types / sizeof synth_types[0]));
    tcase_add_test(ts, synth_shapes);
    suite_add_tcase(s, ts);
    TCase *tb = tcase_create("bench-perplexity");
    tcase_set_timeout(tb, 120);
    tcase_add_test(tb, bench_reports);
    tcase_add_test(tb, bench_counts_the_experts_read);
    tcase_add_test(tb, perplexity_stable);
    tcase_add_test(tb, perplexity_short_text);
    tcase_add_test(tb, perplexity_refuses_non_finite_results);
    suite_add_tcase(s, tb);
    return tsr_test_run_suite(s);
}
