/* The `tessera` program on real model files: text byte-identical to llama2.c's run.c, logits
 * files, tokenize, perplexity equal to llama.cpp's, and one clear error line for bad input.
 * Needs the shared data folder. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
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

/* ---- output files: written the careful way ---------------------------------------------- */

#define STORIES_GGUF "models/stories260K.gguf"
#define FEW_IDS "1 403 407 261 378"

/* A private folder holding a copy of the model (so that nothing can harm the shared one). */
typedef struct out_dir {
    char *dir;
    char model[4200], ref[4200];
} out_dir;

static void out_dir_open(out_dir *d) {
    d->dir = tsr_test_tmpdir();
    char *shared = tsr_test_data(STORIES_GGUF);
    size_t size;
    char *bytes = tsr_test_read_file(shared, &size);
    snprintf(d->model, sizeof d->model, "%s/model.gguf", d->dir);
    ck_assert_int_eq(tsr_test_write_file(d->model, bytes, size), 0);
    free(bytes);
    free(shared);
    /* The logits of FEW_IDS written to a new regular file: what every destination must get. */
    snprintf(d->ref, sizeof d->ref, "%s/ref.f32", d->dir);
    const char *args[] = {"logits", "-m", d->model, "--tokens", FEW_IDS, "--out", d->ref, NULL};
    char *err;
    ck_assert_msg(tsr_test_tessera(NULL, &err, args) == 0, "%s", err);
    free(err);
}

static void out_dir_close(out_dir *d) {
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d->dir);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    tsr_test_run(argv, NULL, NULL);
    free(d->dir);
}

static bool same_bytes(const char *a, const char *b) {
    size_t na, nb;
    char *x = tsr_test_read_file(a, &na), *y = tsr_test_read_file(b, &nb);
    bool same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* One error line on stderr, exit 1, and returns it. */
static char *logits_error(const char *model, const char *out_path) {
    const char *args[] = {"logits", "-m", model, "--tokens", FEW_IDS, "--out", out_path, NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    return err;
}

START_TEST(logits_replaces_a_regular_file_whole) {
    out_dir d;
    out_dir_open(&d);
    size_t size;
    free(tsr_test_read_file(d.ref, &size));
    ck_assert_uint_eq(size, 5 * 512 * sizeof(float));
    /* The new file has the usual mode; the temporary file is gone. */
    struct stat st;
    ck_assert_int_eq(stat(d.ref, &st), 0);
    mode_t mask = umask(0);
    umask(mask);
    ck_assert_uint_eq(st.st_mode & 0777, 0666 & ~mask);
    ck_assert_int_eq(tsr_test_count_entries(d.dir), 2);
    /* An existing file is replaced and keeps its mode; through a link, the file it names is
     * replaced and the link stays a link. */
    char old[4300], link[4300];
    snprintf(old, sizeof old, "%s/old.f32", d.dir);
    snprintf(link, sizeof link, "%s/link.f32", d.dir);
    ck_assert_int_eq(tsr_test_write_file(old, "stale", 5), 0);
    ck_assert_int_eq(chmod(old, 0604), 0);
    ck_assert_int_eq(symlink("old.f32", link), 0);
    const char *args[] = {"logits", "-m", d.model, "--tokens", FEW_IDS, "--out", link, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, args), 0);
    ck_assert(same_bytes(old, d.ref));
    ck_assert_int_eq(lstat(link, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_int_eq(stat(old, &st), 0);
    ck_assert_uint_eq(st.st_mode & 0777, 0604);
    ck_assert_int_eq(tsr_test_count_entries(d.dir), 4);
    out_dir_close(&d);
}
END_TEST

/* A character device for the test to write to: a null device node of its own in `dir`, so that
 * a wrong rename could only ever replace that one. Without the right to make one (not root, or
 * a nodev mount), /dev/null itself, which only root could replace. NULL: none usable. */
static const char *null_device(const char *dir, char *buf, size_t size) {
    snprintf(buf, size, "%s/null", dir);
    if (mknod(buf, S_IFCHR | 0666, makedev(1, 3)) == 0) {
        int fd = open(buf, O_WRONLY);
        if (fd >= 0) {
            close(fd);
            return buf;
        }
        unlink(buf);
    }
    return geteuid() != 0 ? "/dev/null" : NULL;
}

/* A device, a FIFO or standard output is written into, never replaced by a file. Standard
 * output is reached as /dev/stdout reaches it, through a link to /proc/self/fd/1, but a link
 * of the test's own: a wrong rename must not replace the machine's /dev/stdout. */
START_TEST(logits_write_devices_and_fifos_directly) {
    out_dir d;
    out_dir_open(&d);
    char buf[4300], *err;
    struct stat st;
    const char *device = null_device(d.dir, buf, sizeof buf);
    if (device) {
        const char *args[] = {"logits", "-m", d.model, "--tokens", FEW_IDS, "--out", device, NULL};
        ck_assert_msg(tsr_test_tessera(NULL, &err, args) == 0, "%s", err);
        free(err);
        ck_assert_int_eq(stat(device, &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
    }
    /* Standard output into a pipe, and into a regular file: the same bytes. */
    char std_out[4300];
    snprintf(std_out, sizeof std_out, "%s/stdout", d.dir);
    ck_assert_int_eq(symlink("/proc/self/fd/1", std_out), 0);
    char tail[8700];
    snprintf(tail, sizeof tail, "| cmp - '%s'", d.ref);
    const char *to_stdout[] = {"logits", "-m", d.model, "--tokens", FEW_IDS, "--out", std_out,
                               NULL};
    char *out;
    ck_assert_int_eq(tsr_test_tessera_sh(&out, &err, tail, to_stdout), 0);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
    char copy[4300];
    snprintf(copy, sizeof copy, "%s/stdout.f32", d.dir);
    snprintf(tail, sizeof tail, "> '%s'", copy);
    ck_assert_int_eq(tsr_test_tessera_sh(NULL, NULL, tail, to_stdout), 0);
    ck_assert(same_bytes(copy, d.ref));
    ck_assert_int_eq(lstat(std_out, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    /* A FIFO: a reader copies what comes through to a file; the FIFO stays a FIFO. */
    char fifo[4300];
    snprintf(fifo, sizeof fifo, "%s/fifo", d.dir);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    snprintf(copy, sizeof copy, "%s/fifo.f32", d.dir);
    pid_t reader = fork();
    if (reader == 0) {
        char cmd[8800];
        snprintf(cmd, sizeof cmd, "cat '%s' > '%s'", fifo, copy);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    const char *to_fifo[] = {"logits", "-m", d.model, "--tokens", FEW_IDS, "--out", fifo, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, to_fifo), 0);
    int status;
    ck_assert_int_eq(waitpid(reader, &status, 0), reader);
    ck_assert(same_bytes(copy, d.ref));
    ck_assert_int_eq(lstat(fifo, &st), 0);
    ck_assert(S_ISFIFO(st.st_mode));
    out_dir_close(&d);
}
END_TEST

START_TEST(logits_refuses_a_folder_and_the_model) {
    out_dir d;
    out_dir_open(&d);
    char *err = logits_error(d.model, d.dir);
    char want[8800];
    snprintf(want, sizeof want, "tessera: %s: is a folder; expected a file name\n", d.dir);
    ck_assert_str_eq(err, want);
    free(err);
    /* The model under another name (a link, a path through ".") is still the model. */
    char link[4300], dotted[4300];
    snprintf(link, sizeof link, "%s/link.gguf", d.dir);
    snprintf(dotted, sizeof dotted, "%s/./model.gguf", d.dir);
    ck_assert_int_eq(symlink("model.gguf", link), 0);
    const char *names[] = {d.model, link, dotted};
    for (size_t i = 0; i < 3; i++) {
        err = logits_error(d.model, names[i]);
        snprintf(want, sizeof want, "tessera: %s: is the input file %s; write the output to "
                 "another file\n", names[i], d.model);
        ck_assert_str_eq(err, want);
        free(err);
    }
    char *shared = tsr_test_data(STORIES_GGUF);
    ck_assert(same_bytes(d.model, shared));
    free(shared);
    ck_assert_int_eq(tsr_test_count_entries(d.dir), 3);
    out_dir_close(&d);
}
END_TEST

/* ---- text in and out ---------------------------------------------------------------------- */

START_TEST(tokenize_refuses_a_folder) {
    char *model = tsr_test_data(STORIES_GGUF);
    char *dir = tsr_test_tmpdir();
    const char *args[] = {"tokenize", "-m", model, "-f", dir, NULL};
    char *out, *err;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
    char want[4300];
    snprintf(want, sizeof want, "tessera: %s: is a folder; expected a text file\n", dir);
    ck_assert_str_eq(err, want);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
    rmdir(dir);
    free(dir);
    free(model);
}
END_TEST

START_TEST(lost_stdout_fails_model_commands) {
    char *model = tsr_test_data(STORIES_GGUF);
    char *text = tsr_test_data("data/tinystories_val.txt");
    const char *const commands[][12] = {
        {"run", "-m", model, "-p", "Once upon a time", "-n", "8", NULL},
        {"run", "-m", model, "-p", "Once upon a time", "-n", "8", "--json", NULL},
        {"tokenize", "-m", model, "-p", "Once upon a time", NULL},
        {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--chunks", "1", "--json", NULL},
    };
    for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++) {
        char *err;
        ck_assert_int_eq(tsr_test_tessera_sh(NULL, &err, ">/dev/full", commands[c]), 1);
        const char *want = "tessera: stdout: cannot write: No space left on device\n";
        size_t n = strlen(err), k = strlen(want);
        ck_assert_msg(n >= k && !strcmp(err + n - k, want), "%s: %s", commands[c][0], err);
        /* run says nothing of timings when its text was lost. */
        ck_assert_msg(!strstr(err, "tokens/s"), "%s", err);
        free(err);
    }
    free(text);
    free(model);
}
END_TEST

/* ---- run --json and -v: the text, counts, timings and what the cache held ---------------- */

static json_t *run_json(const char *const *args) {
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    json_error_t jerr;
    json_t *root = json_loads(out, 0, &jerr);
    ck_assert_msg(root != NULL, "line %d: %s\n%s", jerr.line, jerr.text, out);
    free(out);
    free(err);
    return root;
}

static json_int_t int_at(json_t *o, const char *a, const char *b) {
    json_t *v = json_object_get(o, a);
    if (b) v = json_object_get(v, b);
    ck_assert_msg(json_is_integer(v), "%s.%s is not an integer", a, b ? b : "");
    return json_integer_value(v);
}

START_TEST(run_json_reports_text_timings_and_cache) {
    char *model = tsr_test_data(STORIES_GGUF);
    const char *plain[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "10",
                           "--temperature", "0", NULL};
    const char *json[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "10",
                          "--temperature", "0", "--json", NULL};
    char *text;
    ck_assert_int_eq(tsr_test_tessera(&text, NULL, plain), 0);
    json_t *r = run_json(json);
    /* The plain output is the text and a newline. */
    text[strlen(text) - 1] = '\0';
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")), text);
    ck_assert_int_eq(int_at(r, "prompt_tokens", NULL), 5);
    ck_assert_int_eq(int_at(r, "new_tokens", NULL), 10);
    const char *stages[] = {"matmul", "attention", "cache", "decoder", "other_ops"};
    for (size_t i = 0; i < 5; i++) {
        json_t *v = json_object_get(json_object_get(r, "stage_seconds"), stages[i]);
        ck_assert_msg(json_is_real(v) && json_real_value(v) > 0, "%s", stages[i]);
    }
    /* The full cache after the last step: 14 positions (the last token is never stored) x 5
     * layers x 4 KV heads; room for the 15 positions asked for, K and V rows of 8 floats. */
    ck_assert_int_eq(int_at(r, "cache", "policies"), 1);
    ck_assert_int_eq(int_at(r, "cache", "entries"), 14 * 5 * 4);
    ck_assert_int_eq(int_at(r, "cache", "evicted"), 0);
    ck_assert_int_eq(int_at(r, "cache", "kv_bytes"), 15 * 5 * 4 * 2 * 8 * 4);
    ck_assert_int_eq(int_at(r, "cache", "kv_bytes_peak"), 15 * 5 * 4 * 2 * 8 * 4);
    /* the policy's storage: f32 values */
    ck_assert_double_eq(json_real_value(json_object_get(json_object_get(r, "cache"),
                                                        "bits_per_value")), 32.0);
    json_decref(r);
    free(text);
    /* -v: the same statistics, one line on stderr. */
    const char *verbose[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "10",
                             "--temperature", "0", "-v", NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, verbose), 0);
    ck_assert_msg(strstr(err, "\ntessera: run: info: cache: 280 entries, 0 evicted, 19200 KV "
                              "bytes (peak 19200), 32.00 bits per stored value\n"), "%s", err);
    free(err);
    free(model);
}
END_TEST

START_TEST(run_json_counts_evictions) {
    char *model = tsr_test_data(STORIES_GGUF);
    char config[4096];
    snprintf(config, sizeof config, "%s/configs/streaming-llm.yaml",
             tsr_test_env("TESSERA_SOURCE_DIR"));
    const char *args[] = {"run", config, "-m", model, "-p", "Once upon a time", "-n", "120",
                          "--temperature", "0", "--set", "cache.window=28", "--json", NULL};
    json_t *r = run_json(args);
    json_int_t stored = int_at(r, "prompt_tokens", NULL) + int_at(r, "new_tokens", NULL) - 1;
    json_int_t entries = int_at(r, "cache", "entries"), evicted = int_at(r, "cache", "evicted");
    /* Every row stored is held or was evicted; the window bounds what is held. */
    ck_assert_int_eq(entries + evicted, stored * 5 * 4);
    ck_assert_int_gt(evicted, 0);
    ck_assert_int_le(entries, (4 + 28 + 1) * 5 * 4);
    json_decref(r);
    /* Text that is not UTF-8 (a prompt of raw bytes) still makes valid JSON: U+FFFD. */
    const char *bytes[] = {"run", "-m", model, "-p", "\xff\xfeOnce", "-n", "0", "--json", NULL};
    r = run_json(bytes);
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")), "\xEF\xBF\xBD\xEF\xBF\xBDOnce");
    json_decref(r);
    free(model);
}
END_TEST

/* Every cache policy's statistics after `run -n 10` on a 5-token prompt: 14 positions stored
 * (the last token never is) x 5 layers x 4 KV heads, each row held or evicted; the rows its
 * budget leaves; and the bits it says it stores per value (scales and residuals included). */
static const struct {
    const char *set[3];
    json_int_t entries;
    double bits_min, bits_max;
} policy_stats[] = {
    {{"cache.plugin=full"}, 14 * 20, 32, 32},
    {{"cache.plugin=streaming", "cache.sink=2", "cache.window=4"}, (2 + 4 + 1) * 20, 32, 32},
    {{"cache.plugin=h2o", "cache.heavy=2", "cache.recent=4"}, 6 * 20, 32, 32},
    {{"cache.plugin=a2sf", "cache.heavy=2", "cache.recent=4"}, 6 * 20, 32, 32},
    {{"cache.plugin=tova", "cache.budget=6"}, 6 * 20, 32, 32},
    /* the 5-token prompt compressed to 4, then every decoded row kept */
    {{"cache.plugin=snapkv", "cache.budget=4", "cache.window=2"}, 13 * 20, 32, 32},
    {{"cache.plugin=kivi", "cache.residual=4", "cache.group=4"}, 14 * 20, 2, 31},
    {{"cache.plugin=zipcache"}, 14 * 20, 2, 40},
    {{"cache.plugin=minicache"}, 14 * 20, 32, 40},
    {{"cache.plugin=paged", "cache.dtype=f16"}, 14 * 20, 16, 16},
};

START_TEST(every_policy_reports_its_cache) {
    char *model = tsr_test_data(STORIES_GGUF);
    const char *args[20] = {"run", "-m", model, "-p", "Once upon a time", "-n", "10",
                            "--temperature", "0", "--json"};
    size_t n = 10;
    for (int i = 0; i < 3 && policy_stats[_i].set[i]; i++) {
        args[n++] = "--set";
        args[n++] = policy_stats[_i].set[i];
    }
    json_t *r = run_json(args);
    json_int_t entries = int_at(r, "cache", "entries"), evicted = int_at(r, "cache", "evicted");
    ck_assert_int_eq(entries, policy_stats[_i].entries);
    ck_assert_int_eq(entries + evicted, 14 * 20);
    ck_assert_int_gt(int_at(r, "cache", "kv_bytes"), 0);
    double bits = json_real_value(json_object_get(json_object_get(r, "cache"), "bits_per_value"));
    ck_assert_msg(bits >= policy_stats[_i].bits_min && bits <= policy_stats[_i].bits_max,
                  "%s: %g bits per value", policy_stats[_i].set[0], bits);
    json_decref(r);
    free(model);
}
END_TEST

/* bench reports the cache at its last decode step, evictions counted for that request alone
 * (and measures decoders of several continuations):
 * h2o keeps 8 + 8 of the 41 prompt positions (BOS and a depth of 40) and 16 stored decode
 * positions, in 5 layers x 4 KV heads; -v of run gives the same counters in one line. */
START_TEST(bench_json_reports_the_cache) {
    char *model = tsr_test_data(STORIES_GGUF);
    const char *args[] = {"bench", "-m", model, "-p", "4", "-n", "16", "-d", "40", "-r", "2",
                          "--bandwidth-mib", "1", "--json", "--set", "cache.plugin=h2o", "--set",
                          "cache.heavy=8", "--set", "cache.recent=8", NULL};
    json_t *root = run_json(args);
    json_t *r = json_array_get(json_object_get(root, "results"), 0);
    ck_assert_int_eq(int_at(r, "cache", "policies"), 1);
    ck_assert_int_eq(int_at(r, "cache", "entries"), 16 * 20);
    ck_assert_int_eq(int_at(r, "cache", "evicted"), (41 + 16 - 16) * 20);
    ck_assert_int_eq(int_at(r, "cache", "kv_bytes"), int_at(r, "kv_bytes", NULL));
    ck_assert_int_ge(int_at(r, "cache", "kv_bytes_peak"), int_at(r, "cache", "kv_bytes"));
    ck_assert_double_eq(json_real_value(json_object_get(json_object_get(r, "cache"),
                                                        "bits_per_value")), 32.0);
    json_decref(root);
    /* A decoder of 4 continuations: 4 tokens a forward, each sequence's rows held at the end
     * (paged counts a shared block's rows in every sequence that shows them). */
    const char *parallel[] = {"bench", "-m", model, "-p", "4", "-n", "16", "-d", "40", "-r", "1",
                              "--bandwidth-mib", "1", "--json", "--set", "decoder.plugin=parallel",
                              "--set", "decoder.n=4", "--set", "cache.plugin=paged", NULL};
    root = run_json(parallel);
    r = json_array_get(json_object_get(root, "results"), 0);
    ck_assert_double_eq(json_real_value(json_object_get(r, "decode_tokens_per_forward")), 4.0);
    ck_assert_int_eq(int_at(r, "cache", "entries"), 4 * (41 + 16) * 20);
    json_decref(root);
    const char *verbose[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "10",
                             "--temperature", "0", "-v", "--set", "cache.plugin=h2o", "--set",
                             "cache.heavy=2", "--set", "cache.recent=4", NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, verbose), 0);
    ck_assert_msg(strstr(err, "\ntessera: run: info: cache: 120 entries, 160 evicted, 14080 KV "
                              "bytes (peak 14080), 32.00 bits per stored value\n"), "%s", err);
    free(err);
    free(model);
}
END_TEST

/* ---- the training context ---------------------------------------------------------------- */

START_TEST(warns_beyond_the_training_context) {
    char *model = tsr_test_data("models/stories260K.bin");
    char *tok = tsr_test_data("models/tok512.bin");
    /* 5 prompt positions; stories260K was trained on 512. Generation stops at its end token. */
    const char *n[] = {"507", "508"};
    for (int i = 0; i < 2; i++) {
        const char *args[] = {"run", "-m", model, "--tokenizer", tok, "-p", "Once upon a time",
                              "-n", n[i], "--temperature", "0", NULL};
        char *err;
        ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 0);
        const char *warning = "tessera: warning: 513 positions (prompt and new tokens) are more "
                              "than the model was trained on (512); quality may fall beyond them\n";
        if (i == 0) ck_assert_msg(!strstr(err, "warning"), "%s", err);
        else ck_assert_msg(!strncmp(err, warning, strlen(warning)), "%s", err);
        free(err);
    }
    free(model);
    free(tok);
}
END_TEST

/* ---- draft models, speculative and parallel decoding ---------------------------------------- */

#define XS "models/llama2xs-279K.bin"

/* The files of the draft tests: stories260K.bin with its tokenizer, and llama2xs-279K as its
 * draft (`set_xs` is the --set that names it). */
typedef struct draft_files {
    char *model, *tok, *xs;
    char set_xs[4300];
} draft_files;

static void draft_files_open(draft_files *f) {
    f->model = tsr_test_data("models/stories260K.bin");
    f->tok = tsr_test_data("models/tok512.bin");
    f->xs = tsr_test_data(XS);
    snprintf(f->set_xs, sizeof f->set_xs, "draft.model=%s", f->xs);
}

static void draft_files_close(draft_files *f) {
    free(f->model);
    free(f->tok);
    free(f->xs);
}

/* `args` must fail with exit 1 and exactly the line `want` on stderr, nothing on stdout. */
static void fails_with(const char *const *args, const char *want) {
    char *out, *err;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
    ck_assert_str_eq(err, want);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
}

/* A copy of tok512.bin in `dir` with the text of token `id` changed in its first byte. */
static char *tokenizer_with_changed_token(const char *dir, int32_t id) {
    char *src = tsr_test_data("models/tok512.bin");
    size_t size;
    char *bytes = tsr_test_read_file(src, &size);
    free(src);
    size_t at = 4; /* max_token_length, then per token: score, length, bytes */
    for (int32_t i = 0; i < id; i++) {
        int32_t len;
        memcpy(&len, bytes + at + 4, 4);
        at += 8 + (size_t)len;
    }
    bytes[at + 8] = bytes[at + 8] == 'q' ? 'z' : 'q';
    char *path = malloc(strlen(dir) + 16);
    sprintf(path, "%s/tok-x.bin", dir);
    ck_assert_int_eq(tsr_test_write_file(path, bytes, size), 0);
    free(bytes);
    return path;
}

/* Every refusal around a draft is one line naming what is wrong: a draft on another
 * vocabulary (its size, or a token's text), a decoder that does not draft given a draft and
 * the reverse, k 0 (and pearl's window, dyspec's budget), k beyond the context, a skipped
 * layer the model lacks, --parallel for a decoder without that parameter or out of its
 * range. */
START_TEST(draft_errors_are_one_line) {
    draft_files f;
    draft_files_open(&f);
    const char *set_xs = f.set_xs;
    char *gguf = tsr_test_data(STORIES_GGUF);
    char *dir = tsr_test_tmpdir(), tiny[4200], set_tiny[4300], want[9000];
    snprintf(tiny, sizeof tiny, "%s/tiny.gguf", dir);
    const char *synth[] = {"synth", "--shape", "tiny", "-o", tiny, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, synth), 0);
    snprintf(set_tiny, sizeof set_tiny, "draft.model=%s", tiny);
#define RUN(...) {"run", "-m", f.model, "--tokenizer", f.tok, "-p", "Once", "-n", "4", __VA_ARGS__, \
                  NULL}
    const char *vocab_size[] = RUN("--set", "decoder.plugin=speculative", "--set", set_tiny);
    snprintf(want, sizeof want, "tessera: draft.model: %s has 320 tokens and the target model "
             "512: a draft must share the target's vocabulary\n", tiny);
    fails_with(vocab_size, want);
    /* the GGUF's vocabulary against tok512.bin: the same tokens, but for one changed here */
    char *changed = tokenizer_with_changed_token(dir, 300);
    char set_tok[4300];
    snprintf(set_tok, sizeof set_tok, "draft.tokenizer=%s", changed);
    const char *texts[] = {"run", "-m", gguf, "-p", "Once", "-n", "4", "--set",
                           "decoder.plugin=speculative", "--set", set_xs, "--set", set_tok, NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, texts), 1);
    snprintf(want, sizeof want, "tessera: draft.model: %s: token 300 is '", changed);
    ck_assert_msg(!strncmp(err, want, strlen(want)) &&
                      strstr(err, "in the target's vocabulary: a draft must share the target's "
                                  "vocabulary\n") &&
                      strchr(err, '\n') == err + strlen(err) - 1, "%s", err);
    free(err);
    snprintf(set_tok, sizeof set_tok, "draft.tokenizer=%s", f.tok);
    texts[12] = set_tok;
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, texts), 0);

    const char *no_draft[] = RUN("--set", "decoder.plugin=speculative");
    fails_with(no_draft, "tessera: --set: decoder: 'speculative' needs a draft model: add a "
                         "draft: section (draft.model: FILE, or draft.skip_layers: [...] to draft "
                         "with the target's own layers)\n");
    const char *unused[] = RUN("--set", "decoder.plugin=greedy", "--set", set_xs);
    fails_with(unused, "tessera: --set: draft: the decoder 'greedy' does not use a draft model; "
                       "choose a decoder that drafts, or remove the draft\n");
    const char *k0[] = RUN("--set", "decoder.plugin=speculative", "--set", set_xs, "--set",
                           "decoder.k=0");
    fails_with(k0, "tessera: --set: decoder.k: expected an integer in [1, 32], got '0'\n");
    const char *window0[] = RUN("--set", "decoder.plugin=pearl", "--set", set_xs, "--set",
                                "decoder.window=0");
    fails_with(window0, "tessera: --set: decoder.window: expected an integer in [1, 31], got "
                        "'0'\n");
    const char *budget0[] = RUN("--set", "decoder.plugin=dyspec", "--set", set_xs, "--set",
                                "decoder.budget=0");
    fails_with(budget0, "tessera: --set: decoder.budget: expected an integer in [1, 15], got "
                        "'0'\n");
    /* "Once" is BOS and one token: 2 + 4 positions, fewer than a round of k 8 verifies */
    const char *long_k[] = RUN("--set", "decoder.plugin=speculative", "--set", set_xs, "--set",
                               "decoder.k=8");
    fails_with(long_k, "tessera: decoder: speculative: k 8: a round verifies k + 1 positions, "
                       "more than the context of 6\n");
    const char *layer[] = RUN("--set", "decoder.plugin=speculative", "--set",
                              "draft.skip_layers=1,9");
    fails_with(layer, "tessera: --set: draft.skip_layers: layer 9 is beyond the draft model's 5 "
                      "layers (0 to 4)\n");
    const char *no_parallel[] = RUN("--set", "decoder.plugin=greedy", "--parallel", "2");
    fails_with(no_parallel, "tessera: --parallel: the decoder plugin 'greedy' has no parallel "
                            "parameter\n");
    const char *zero[] = RUN("--set", "decoder.plugin=parallel", "--parallel", "0");
    fails_with(zero, "tessera: --parallel: decoder.n: expected an integer in [1, 16], got '0'\n");
#undef RUN
    unlink(changed);
    unlink(tiny);
    rmdir(dir);
    free(changed);
    free(dir);
    free(gguf);
    draft_files_close(&f);
}
END_TEST

/* A llama2.c draft without a tokenizer of its own reads with the target's; drafting, the text
 * is greedy's; --json and -v report the decoding: target and draft forwards, tokens per target
 * forward, drafts accepted by position, draft and verify time. */
START_TEST(run_reports_speculative_decoding) {
    draft_files f;
    draft_files_open(&f);
    const char *greedy[] = {"run", "-m", f.model, "--tokenizer", f.tok, "-p", "Once upon a time",
                            "-n", "40", "--set", "decoder.plugin=greedy", "--json", NULL};
    json_t *g = run_json(greedy);
    json_t *gd = json_object_get(g, "decoding");
    ck_assert_int_eq(int_at(gd, "target_forwards", NULL), 40);
    ck_assert_int_eq(int_at(gd, "draft_forwards", NULL), 0);
    ck_assert_double_eq(json_real_value(json_object_get(gd, "tokens_per_target_forward")), 1.0);
    ck_assert(json_is_null(json_object_get(gd, "decoder")));
    const char *spec[] = {"run", "-m", f.model, "--tokenizer", f.tok, "-p", "Once upon a time",
                          "-n", "40", "--set", "decoder.plugin=speculative", "--temperature", "0",
                          "--set", f.set_xs, "--json", NULL};
    json_t *r = run_json(spec);
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")),
                     json_string_value(json_object_get(g, "text")));
    json_t *d = json_object_get(r, "decoding"), *dec = json_object_get(d, "decoder");
    json_int_t forwards = int_at(d, "target_forwards", NULL);
    json_int_t drafted = int_at(dec, "drafted", NULL), accepted = int_at(dec, "accepted", NULL);
    /* a round is one target forward and yields its accepted drafts and one token more */
    ck_assert_int_eq(forwards + accepted, 40);
    ck_assert_int_gt(accepted, 0);
    ck_assert_int_gt(int_at(d, "draft_forwards", NULL), 0);
    ck_assert_double_eq_tol(json_real_value(json_object_get(d, "tokens_per_target_forward")),
                            40.0 / (double)forwards, 1e-12);
    ck_assert_double_eq_tol(json_real_value(json_object_get(dec, "acceptance_rate")),
                            (double)accepted / (double)drafted, 1e-12);
    json_t *by = json_object_get(dec, "by_position");
    ck_assert_uint_eq(json_array_size(by), 4); /* k 4 */
    json_int_t proposed_sum = 0, accepted_sum = 0;
    for (size_t i = 0; i < json_array_size(by); i++) {
        json_t *at = json_array_get(by, i);
        json_int_t p = int_at(at, "proposed", NULL), a = int_at(at, "accepted", NULL);
        ck_assert_int_le(a, p);
        ck_assert_double_eq_tol(json_real_value(json_object_get(at, "rate")),
                                (double)a / (double)p, 1e-12);
        proposed_sum += p;
        accepted_sum += a;
    }
    ck_assert_int_eq(proposed_sum, drafted);
    ck_assert_int_eq(accepted_sum, accepted);
    ck_assert(json_real_value(json_object_get(dec, "draft_seconds")) > 0);
    ck_assert(json_real_value(json_object_get(dec, "verify_seconds")) > 0);
    char *err, line[256];
    spec[15] = "-v";
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, spec), 0);
    snprintf(line, sizeof line, "tessera: run: info: decoding: 40 tokens in %lld target forwards "
             "(%.3f tokens per forward), ", (long long)forwards, 40.0 / (double)forwards);
    ck_assert_msg(strstr(err, line), "%s", err);
    snprintf(line, sizeof line, "tessera: run: info: decoder: %lld drafted, %lld accepted (%.3f); "
             "acceptance by draft position: ", (long long)drafted, (long long)accepted,
             (double)accepted / (double)drafted);
    ck_assert_msg(strstr(err, line), "%s", err);
    free(err);
    json_decref(r);
    json_decref(g);
    draft_files_close(&f);
}
END_TEST

/* --parallel N: N continuations, each under its label on stdout and in --json's sequences; at
 * temperature 0 each is greedy's text. */
START_TEST(run_parallel_prints_each_sequence) {
    char *model = tsr_test_data(STORIES_GGUF);
    const char *greedy[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "12",
                            "--temperature", "0", NULL};
    char *text, *out;
    ck_assert_int_eq(tsr_test_tessera(&text, NULL, greedy), 0);
    const char *par[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "12",
                         "--temperature", "0", "--set", "decoder.plugin=parallel", "--parallel",
                         "3", NULL, NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, par), 0);
    char want[4096];
    snprintf(want, sizeof want, "--- sequence 0 ---\n%s--- sequence 1 ---\n%s--- sequence 2 ---\n%s",
             text, text, text);
    ck_assert_str_eq(out, want);
    free(out);
    par[13] = "--json";
    json_t *r = run_json(par);
    json_t *seqs = json_object_get(r, "sequences");
    ck_assert_uint_eq(json_array_size(seqs), 3);
    text[strlen(text) - 1] = '\0';
    for (size_t i = 0; i < 3; i++) {
        json_t *x = json_array_get(seqs, i);
        ck_assert_int_eq(int_at(x, "seq", NULL), (json_int_t)i);
        ck_assert_int_eq(int_at(x, "new_tokens", NULL), 12);
        ck_assert_str_eq(json_string_value(json_object_get(x, "text")), text);
    }
    ck_assert_int_eq(int_at(r, "new_tokens", NULL), 36);
    ck_assert_int_eq(int_at(r, "decoding", "sequences"), 3);
    ck_assert_double_eq(json_real_value(json_object_get(json_object_get(r, "decoding"),
                                                        "tokens_per_target_forward")), 3.0);
    json_decref(r);
    free(text);
    free(model);
}
END_TEST

/* bench through the configured decoder: tokens per target forward and drafts accepted. */
START_TEST(bench_reports_tokens_per_forward) {
    char *model = tsr_test_data("models/stories260K.bin"), *tok = tsr_test_data("models/tok512.bin");
    const char *spec[] = {"bench", "-m", model, "--tokenizer", tok, "-p", "8", "-n", "24", "-r",
                          "1", "--bandwidth-mib", "16", "--set", "decoder.plugin=speculative",
                          "--set", "decoder.temperature=0", "--set", "draft.skip_layers=2",
                          "--json", NULL};
    json_t *r = run_json(spec);
    ck_assert_str_eq(json_string_value(json_object_get(r, "decoder")), "speculative");
    json_t *x = json_array_get(json_object_get(r, "results"), 0);
    double per_forward = json_real_value(json_object_get(x, "decode_tokens_per_forward"));
    double acceptance = json_real_value(json_object_get(x, "decode_acceptance_rate"));
    ck_assert_msg(per_forward > 1.0 && per_forward <= 5.0, "%g tokens per forward", per_forward);
    ck_assert_msg(acceptance > 0.0 && acceptance <= 1.0, "acceptance %g", acceptance);
    json_decref(r);
    const char *greedy[] = {"bench", "-m", model, "--tokenizer", tok, "-p", "8", "-n", "24", "-r",
                            "1", "--bandwidth-mib", "16", "--set", "decoder.plugin=greedy", NULL};
    char *out;
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, greedy), 0);
    ck_assert_msg(strstr(out, "| 1 | greedy | 1.000 | - |\n"), "%s", out);
    free(out);
    free(model);
    free(tok);
}
END_TEST

/* The draft's training context is its own: beyond it, one warning line. */
START_TEST(warns_beyond_the_draft_context) {
    draft_files f;
    draft_files_open(&f);
    const char *args[] = {"run", "-m", f.model, "--tokenizer", f.tok, "-p", "Once upon a time",
                          "-n", "251", "--set", "decoder.plugin=speculative", "--set", f.set_xs,
                          NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 0);
    ck_assert_msg(!strstr(err, "warning"), "%s", err);
    free(err);
    args[8] = "252";
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 0);
    const char *warning = "tessera: warning: 257 positions (prompt and new tokens) are more than "
                          "the draft model was trained on (256); its drafts may be accepted less "
                          "beyond them\n";
    ck_assert_msg(!strncmp(err, warning, strlen(warning)), "%s", err);
    free(err);
    draft_files_close(&f);
}
END_TEST

int main(void) {
    free(tsr_test_require_data("models/stories260K.bin"));
    free(tsr_test_require_data(XS));
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
    tcase_add_test(tc, logits_replaces_a_regular_file_whole);
    tcase_add_test(tc, logits_write_devices_and_fifos_directly);
    tcase_add_test(tc, logits_refuses_a_folder_and_the_model);
    tcase_add_test(tc, tokenize_refuses_a_folder);
    tcase_add_test(tc, lost_stdout_fails_model_commands);
    tcase_add_test(tc, run_json_reports_text_timings_and_cache);
    tcase_add_test(tc, run_json_counts_evictions);
    tcase_add_loop_test(tc, every_policy_reports_its_cache, 0,
                        (int)(sizeof policy_stats / sizeof policy_stats[0]));
    tcase_add_test(tc, bench_json_reports_the_cache);
    tcase_add_test(tc, warns_beyond_the_training_context);
    suite_add_tcase(s, tc);
    tc = tcase_create("decoding");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, draft_errors_are_one_line);
    tcase_add_test(tc, run_reports_speculative_decoding);
    tcase_add_test(tc, run_parallel_prints_each_sequence);
    tcase_add_test(tc, bench_reports_tokens_per_forward);
    tcase_add_test(tc, warns_beyond_the_draft_context);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
