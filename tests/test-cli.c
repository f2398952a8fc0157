/* The `tessera` program without shared model files: versions, help, plugin listing and info,
 * plugin commands through libffi, validation of configs, refusals of incompatible plugins, and
 * the plugin search (--plugin-dir for every command, warnings, what is opened, -vv). */
#include <check.h>
#include <dirent.h>
#include <stdbool.h>
#include <yaml.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/common.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>

#include "testutil.h"

/* A config file in a fresh folder; returns its path (malloc'd). */
static char *write_config(const char *text) {
    char *dir = tsr_test_tmpdir();
    char *path = malloc(strlen(dir) + 16);
    sprintf(path, "%s/p.yaml", dir);
    ck_assert_int_eq(tsr_test_write_file(path, text, strlen(text)), 0);
    free(dir);
    return path;
}

static void remove_config(char *path) {
    unlink(path);
    *strrchr(path, '/') = '\0';
    rmdir(path);
    free(path);
}

START_TEST(version_names_every_abi) {
    char *out;
    const char *args[] = {"--version", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, args), 0);
    char want[512];
    snprintf(want, sizeof want,
             "plugin ABI: common %d.%d, backend %d.%d, quantizer %d.%d, attention %d.%d, "
             "cache %d.%d, decoder %d.%d, router %d.%d\n", TSR_COMMON_ABI_MAJOR,
             TSR_COMMON_ABI_MINOR, TSR_BACKEND_ABI_MAJOR, TSR_BACKEND_ABI_MINOR,
             TSR_QUANTIZER_ABI_MAJOR, TSR_QUANTIZER_ABI_MINOR, TSR_ATTENTION_ABI_MAJOR,
             TSR_ATTENTION_ABI_MINOR, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR,
             TSR_DECODER_ABI_MAJOR, TSR_DECODER_ABI_MINOR, TSR_ROUTER_ABI_MAJOR,
             TSR_ROUTER_ABI_MINOR);
    ck_assert_msg(strncmp(out, "tessera ", 8) == 0 && strstr(out, want), "%s", out);
    free(out);
}
END_TEST

static const char *const subcommands[] = {"run", "logits", "tokenize", "bench", "perplexity",
                                          "compare", "quantize", "synth", "validate", "plugins"};

START_TEST(every_subcommand_has_help) {
    char *out, *err;
    const char *args[] = {subcommands[_i], "--help", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    char want[64];
    snprintf(want, sizeof want, "usage: tessera %s", subcommands[_i]);
    ck_assert_msg(strncmp(out, want, strlen(want)) == 0, "%s --help printed: %s", subcommands[_i], out);
    ck_assert_str_eq(err, "");
    free(out);
    free(err);
}
END_TEST

START_TEST(unknown_command_is_a_usage_error) {
    char *err;
    const char *args[] = {"frobnicate", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 2);
    ck_assert_str_eq(err, "tessera: unknown command 'frobnicate' (see tessera --help)\n");
    free(err);
}
END_TEST

START_TEST(plugins_list_shows_shipped_plugins_and_skips_bad_objects) {
    char *dir = tsr_test_tmpdir();
    char bad[4096], other[4096];
    snprintf(bad, sizeof bad, "%s/cache-broken.so", dir);
    ck_assert_int_eq(tsr_test_write_file(bad, "not elf", 7), 0);
    /* not a plugin file: never opened, so never reported */
    snprintf(other, sizeof other, "%s/libbroken.so", dir);
    ck_assert_int_eq(tsr_test_write_file(other, "not elf", 7), 0);
    char *out, *err;
    const char *args[] = {"plugins", "--plugin-dir", dir, "list", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    const char *shipped[] = {"cpu", "gguf", "flash", "reference", "full", "streaming", "greedy",
                             "sample"};
    for (size_t i = 0; i < sizeof shipped / sizeof shipped[0]; i++) {
        char line[64];
        snprintf(line, sizeof line, "\n%-20s ", shipped[i]);
        ck_assert_msg(strstr(out, line), "'%s' not listed:\n%s", shipped[i], out);
    }
    char want[8192];
    snprintf(want, sizeof want, "tessera: warning: %s: not a shared object (no ELF header); plugin "
             "files are built with tessera_add_plugin() (skipped)\n", bad);
    ck_assert_str_eq(err, want);
    unlink(bad);
    unlink(other);
    rmdir(dir);
    free(dir);
    free(out);
    free(err);
}
END_TEST

START_TEST(plugins_info_prints_parameters) {
    char *out;
    const char *args[] = {"plugins", "info", "sample", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, args), 0);
    ck_assert_msg(strstr(out, "stage:    decoder") && strstr(out, "parameters:") &&
                      strstr(out, "  temperature ") && strstr(out, "  seed "),
                  "%s", out);
    free(out);
    char *err;
    const char *none[] = {"plugins", "info", "nosuch", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, none), 1);
    ck_assert_str_eq(err, "tessera: no plugin named 'nosuch' (see `tessera plugins list`)\n");
    free(err);
}
END_TEST

START_TEST(plugins_call_goes_through_libffi) {
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/stats.txt", dir);
    char *out, *err;
    const char *args[] = {"plugins", "call", "streaming", "dump_stats", path, NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    ck_assert_str_eq(out, "0\n");
    char *stats = tsr_test_read_file(path, NULL);
    ck_assert_msg(stats && strncmp(stats, "# streaming: sink 4 window 252\n", 31) == 0, "%s", stats);
    free(stats);
    free(out);
    free(err);
    const char *missing[] = {"plugins", "call", "streaming", "dump_stats", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, missing), 1);
    ck_assert_str_eq(err, "tessera: command 'dump_stats' takes 1 argument (i(Is)), got 0\n");
    free(err);
    const char *nofunc[] = {"plugins", "call", "streaming", "nosuch", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, nofunc), 1);
    ck_assert_str_eq(err, "tessera: plugin 'streaming' has no command 'nosuch' (see `tessera "
                     "plugins info streaming`)\n");
    free(err);
    unlink(path);
    rmdir(dir);
    free(dir);
}
END_TEST

/* ---- usage errors: one line naming the command, the option and what it expected ----------- */

/* Every option that takes a value, given none (as the last argument). */
static const struct {
    const char *cmd, *option, *what;
} valued[] = {
    {"run", "-m", "MODEL"}, {"run", "--model", "MODEL"}, {"run", "--tokenizer", "FILE"},
    {"run", "--set", "SECTION.KEY=VALUE"}, {"run", "-t", "THREADS"}, {"run", "--threads", "THREADS"},
    {"run", "-p", "PROMPT"}, {"run", "--prompt", "PROMPT"}, {"run", "-n", "NEW_TOKENS"},
    {"run", "--temperature", "T"}, {"run", "--seed", "S"},
    {"logits", "-m", "MODEL"}, {"logits", "--tokenizer", "FILE"},
    {"logits", "--set", "SECTION.KEY=VALUE"}, {"logits", "-t", "THREADS"},
    {"logits", "--tokens", "\"ID ID ...\""}, {"logits", "--out", "FILE"}, {"logits", "-o", "FILE"},
    {"tokenize", "-m", "MODEL"}, {"tokenize", "--model", "MODEL"},
    {"tokenize", "--tokenizer", "FILE"}, {"tokenize", "-p", "TEXT"}, {"tokenize", "-f", "FILE"},
    {"bench", "-m", "MODEL"}, {"bench", "--tokenizer", "FILE"},
    {"bench", "--set", "SECTION.KEY=VALUE"}, {"bench", "-t", "THREADS[,THREADS...]"},
    {"bench", "-p", "PROMPT_TOKENS"}, {"bench", "-n", "NEW_TOKENS"}, {"bench", "-r", "REPETITIONS"},
    {"bench", "--bandwidth-mib", "MIB"},
    {"perplexity", "-m", "MODEL"}, {"perplexity", "--tokenizer", "FILE"},
    {"perplexity", "--set", "SECTION.KEY=VALUE"}, {"perplexity", "-t", "THREADS"},
    {"perplexity", "-f", "TEXT"}, {"perplexity", "--ctx", "TOKENS"}, {"perplexity", "--chunks", "K"},
    {"perplexity", "--ubatch", "TOKENS"}, {"perplexity", "--prefill", "TOKENS"},
    {"perplexity", "--kl-base", "FILE"},
    {"compare", "-m", "MODEL"}, {"compare", "-f", "TEXT"}, {"compare", "--ctx", "TOKENS"},
    {"compare", "--budget", "B[,B...]"}, {"compare", "--plot", "FILE.png|FILE.svg"},
    {"compare", "--prefill", "TOKENS"}, {"compare", "--ubatch", "TOKENS"},
    {"compare", "--decode", "TOKENS"}, {"compare", "--chunks", "K"},
    {"quantize", "--config", "CONFIG.yaml"}, {"quantize", "--set", "SECTION.KEY=VALUE"},
    {"quantize", "-t", "THREADS"},
    {"synth", "--config", "CONFIG.yaml"}, {"synth", "--set", "SECTION.KEY=VALUE"},
    {"synth", "--shape", "NAME"}, {"synth", "--type", "TYPE"}, {"synth", "-o", "FILE.gguf"},
    {"synth", "--seed", "S"},
    {"validate", "--set", "SECTION.KEY=VALUE"},
};

/* Exit 2, nothing on stdout, exactly `want` on stderr. */
static void expect_usage_error(const char *const *args, const char *want) {
    char *out, *err;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 2);
    ck_assert_str_eq(out, "");
    ck_assert_str_eq(err, want);
    free(out);
    free(err);
}

START_TEST(option_without_value_says_what_it_needs) {
    char want[256];
    snprintf(want, sizeof want, "tessera: %s: %s needs a value (%s)\n", valued[_i].cmd,
             valued[_i].option, valued[_i].what);
    const char *args[] = {valued[_i].cmd, valued[_i].option, NULL};
    expect_usage_error(args, want);
}
END_TEST

/* Numbers are read whole, in range, with the range in the message; checked before any file. */
static const struct {
    const char *args[6];
    const char *error;
} bad_numbers[] = {
    {{"run", "-m", "x.gguf", "-n", "99999999999999999999"},
     "run: -n: expected an integer in [0, 2147483647], got '99999999999999999999'"},
    {{"run", "-m", "x.gguf", "-n", "4294967300"},
     "run: -n: expected an integer in [0, 2147483647], got '4294967300'"},
    {{"run", "-n", "-1"}, "run: -n: expected an integer in [0, 2147483647], got '-1'"},
    {{"run", "-n", "12abc"}, "run: -n: expected an integer in [0, 2147483647], got '12abc'"},
    {{"run", "-n", ""}, "run: -n: expected an integer in [0, 2147483647], got ''"},
    {{"run", "-n", " 5"}, "run: -n: expected an integer in [0, 2147483647], got ' 5'"},
    {{"run", "-t", "2x"}, "run: -t: expected an integer in [1, 256], got '2x'"},
    {{"logits", "-t", "0"}, "logits: -t: expected an integer in [1, 256], got '0'"},
    {{"perplexity", "--ctx", "2"}, "perplexity: --ctx: expected an integer in [4, 1048576], got '2'"},
    /* The bounds themselves are taken: the command goes on to its next complaint. */
    {{"perplexity", "--ctx", "4"}, "perplexity: -f TEXT is required (see tessera perplexity --help)"},
    {{"perplexity", "--ctx", "1048576"},
     "perplexity: -f TEXT is required (see tessera perplexity --help)"},
    {{"perplexity", "--ctx", "1048577"},
     "perplexity: --ctx: expected an integer in [4, 1048576], got '1048577'"},
    {{"perplexity", "--ctx", "0x80"},
     "perplexity: -f TEXT is required (see tessera perplexity --help)"},
    {{"perplexity", "--ctx", "128abc"},
     "perplexity: --ctx: expected an integer in [4, 1048576], got '128abc'"},
    {{"perplexity", "--chunks", "0"},
     "perplexity: --chunks: expected an integer in [1, 2147483647], got '0'"},
    {{"perplexity", "--ubatch", "0"},
     "perplexity: --ubatch: expected an integer in [1, 1048576], got '0'"},
    {{"perplexity", "--prefill", "0"},
     "perplexity: --prefill: expected an integer in [1, 1048576], got '0'"},
    {{"synth", "--seed", "abc"},
     "synth: --seed: expected an integer in [0, 9223372036854775807], got 'abc'"},
    {{"bench", "-p", "8x"}, "bench: -p: expected an integer in [1, 2147483647], got '8x'"},
    {{"bench", "-p", "0"}, "bench: -p: expected an integer in [1, 2147483647], got '0'"},
    {{"bench", "-r", "0"}, "bench: -r: expected an integer in [1, 1000], got '0'"},
    {{"bench", "--bandwidth-mib", "1e3"},
     "bench: --bandwidth-mib: expected an integer in [1, 1048576], got '1e3'"},
    {{"bench", "-t", "1,,2"}, "bench: -t: expected an integer in [1, 256], got ''"},
    {{"bench", "-t", "1,257"}, "bench: -t: expected an integer in [1, 256], got '257'"},
    {{"bench", "-t", "1,2,"}, "bench: -t: expected an integer in [1, 256], got ''"},
    {{"bench", "-t", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"},
     "bench: -t: at most 16 thread counts, got '1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1'"},
    {{"quantize", "-t", "abc"}, "quantize: -t: expected an integer in [1, 256], got 'abc'"},
    {{"logits", "--tokens", "1 2x", "--out", "x.f32"},
     "logits: --tokens: expected an integer in [0, 2147483647], got '2x'"},
    {{"logits", "--tokens", "1\t-3", "--out", "x.f32"},
     "logits: --tokens: expected an integer in [0, 2147483647], got '-3'"},
};

START_TEST(bad_numbers_are_refused) {
    char want[512];
    snprintf(want, sizeof want, "tessera: %s\n", bad_numbers[_i].error);
    expect_usage_error(bad_numbers[_i].args, want);
}
END_TEST

START_TEST(unknown_options_and_extra_words) {
    const char *ctx[] = {"run", "--ctx", "128", NULL};
    expect_usage_error(ctx, "tessera: run: unknown option '--ctx' (see tessera run --help)\n");
    const char *words[] = {"run", "a.yaml", "b.yaml", NULL};
    expect_usage_error(words, "tessera: run: unexpected argument 'b.yaml' (see tessera run "
                              "--help)\n");
    const char *tok[] = {"tokenize", "-x", NULL};
    expect_usage_error(tok, "tessera: tokenize: unknown option '-x' (see tessera tokenize "
                            "--help)\n");
    const char *q[] = {"quantize", "a", "b", "c", "d", NULL};
    expect_usage_error(q, "tessera: quantize: unexpected argument 'd' (see tessera quantize "
                          "--help)\n");
    const char *v[] = {"validate", "a.yaml", "--sett", "x=1", NULL};
    expect_usage_error(v, "tessera: validate: unknown option '--sett' (see tessera validate "
                          "--help)\n");
}
END_TEST

/* Output that cannot be written (a full disk) is an error, not a silent exit 0. */
START_TEST(lost_stdout_is_an_error) {
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/default.yaml", tsr_test_env("TESSERA_SOURCE_DIR"));
    const char *const commands[][4] = {
        {"--version", NULL}, {"--help", NULL}, {"run", "--help", NULL},
        {"plugins", "list", NULL}, {"validate", path, NULL},
    };
    for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++) {
        char *out, *err;
        ck_assert_int_eq(tsr_test_tessera_sh(&out, &err, ">/dev/full", commands[c]), 1);
        ck_assert_str_eq(err, "tessera: stdout: cannot write: No space left on device\n");
        free(out);
        free(err);
    }
}
END_TEST

/* ---- scripts/run.sh ----------------------------------------------------------------------- */

/* run.sh in a copy of the tree whose set-up steps are stand-ins that chatter (and fail when
 * told to); returns the status, stdout and stderr of running it. */
static int run_script(const char *fail_step, char **out, char **err) {
    char *top = tsr_test_tmpdir();
    char path[4200], cmd[12000];
    snprintf(cmd, sizeof cmd,
             "set -e; mkdir -p '%s/scripts' '%s/bin'; cp '%s/scripts/run.sh' '%s/scripts/';"
             "printf '#!/bin/sh\\necho apt chatter; [ \"$FAIL\" != deps ]\\n' > "
             "'%s/scripts/install-deps.sh';"
             "printf '#!/bin/sh\\necho cmake chatter \"$@\"; [ \"$FAIL\" != cmake ] || exit 3\\n"
             "if [ \"$1\" = --build ]; then mkdir -p \"$2\"; printf \"#!/bin/sh\\\\necho ran "
             "\\\\\"\\\\$*\\\\\"\\\\n\" > \"$2/tessera\"; chmod +x \"$2/tessera\"; fi\\n' > "
             "'%s/bin/cmake';"
             "chmod +x '%s/scripts/install-deps.sh' '%s/bin/cmake'",
             top, top, tsr_test_env("TESSERA_SOURCE_DIR"), top, top, top, top, top);
    char *setup[] = {"/bin/sh", "-c", cmd, NULL};
    ck_assert_int_eq(tsr_test_run(setup, NULL, NULL), 0);
    char env_path[4400], env_fail[64], script[4400];
    snprintf(env_path, sizeof env_path, "PATH=%s/bin:/usr/bin:/bin", top);
    snprintf(env_fail, sizeof env_fail, "FAIL=%s", fail_step);
    snprintf(script, sizeof script, "%s/scripts/run.sh", top);
    char *argv[] = {"/usr/bin/env", env_path, env_fail, "bash", script, "m.gguf", "-p", "hi",
                    NULL};
    int status = tsr_test_run(argv, out, err);
    snprintf(path, sizeof path, "rm -rf '%s'", top);
    char *cleanup[] = {"/bin/sh", "-c", path, NULL};
    tsr_test_run(cleanup, NULL, NULL);
    free(top);
    return status;
}

START_TEST(run_script_is_quiet_unless_a_step_fails) {
    char *out, *err;
    ck_assert_int_eq(run_script("", &out, &err), 0);
    ck_assert_str_eq(out, "ran run -m m.gguf -p hi\n");
    ck_assert_str_eq(err, "");
    free(out);
    free(err);
    ck_assert_int_eq(run_script("cmake", &out, &err), 3);
    ck_assert_str_eq(out, "");
    ck_assert_msg(strstr(err, " failed (exit 3):\ncmake chatter -S ") != NULL, "%s", err);
    free(out);
    free(err);
    ck_assert_int_eq(run_script("deps", &out, &err), 1);
    ck_assert_msg(strstr(err, "install-deps.sh failed (exit 1):\napt chatter\n") != NULL, "%s",
                  err);
    free(out);
    free(err);
}
END_TEST

/* ---- the YAML examples of the docs and the shipped configs -------------------------------- */

/* Every ```yaml block of README.md, sdk/README.md and the .md files of docs/ and docs/plugins/,
 * and every .yaml file of configs/ and configs/compare/, is a whole pipeline that `tessera validate` accepts; a block opened with
 * ```yaml fragment is deliberately part of one and only has to be YAML. Model files the
 * examples name are the reader's: --set points model.path and model.tokenizer at a file that
 * exists. */
typedef struct doc_checks {
    char *dir; /* where snippets are written */
    int whole, fragments;
} doc_checks;

static bool is_yaml(const char *text, size_t n) {
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, n);
    bool ok = yaml_parser_load(&parser, &doc) && yaml_document_get_root_node(&doc) != NULL;
    if (ok) yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return ok;
}

static void validate_example(doc_checks *c, const char *where, const char *config) {
    char set_model[4200], set_tok[4200];
    snprintf(set_model, sizeof set_model, "model.path=%s", config);
    snprintf(set_tok, sizeof set_tok, "model.tokenizer=%s", config);
    const char *args[] = {"validate", config, "--set", set_model, "--set", set_tok, NULL};
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "%s: the example does not validate (a block that is deliberately "
                  "part of a pipeline opens with ```yaml fragment): %s", where, err);
    c->whole++;
    free(out);
    free(err);
}

static void check_markdown(doc_checks *c, const char *path) {
    char *text = tsr_test_read_file(path, NULL);
    ck_assert_msg(text != NULL, "%s cannot be read", path);
    int line = 1, start = 0;
    const char *block = NULL;
    bool fragment = false;
    for (char *p = text; *p; line++) {
        char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (block && !strncmp(p, "```", 3)) {
            char where[4200];
            snprintf(where, sizeof where, "%s:%d", path, start);
            size_t n = (size_t)(p - block);
            if (fragment) {
                ck_assert_msg(is_yaml(block, n), "%s: the fragment is not YAML", where);
                c->fragments++;
            } else {
                char config[4200];
                snprintf(config, sizeof config, "%s/example.yaml", c->dir);
                ck_assert_int_eq(tsr_test_write_file(config, block, n), 0);
                validate_example(c, where, config);
                unlink(config);
            }
            block = NULL;
        } else if (!block && !strncmp(p, "```yaml", 7)) {
            fragment = !strncmp(p, "```yaml fragment", 16);
            block = eol ? eol + 1 : p + len;
            start = line;
        }
        p = eol ? eol + 1 : p + len;
    }
    ck_assert_msg(!block, "%s:%d: the ```yaml block is not closed", path, start);
    free(text);
}

/* Every file of `folder` (relative to the source tree) whose name ends with `suffix`. */
static void check_folder(doc_checks *c, const char *folder, const char *suffix) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", tsr_test_env("TESSERA_SOURCE_DIR"), folder);
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "%s cannot be read", dir);
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name), k = strlen(suffix);
        if (n <= k || strcmp(e->d_name + n - k, suffix) != 0) continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (!strcmp(suffix, ".md")) check_markdown(c, path);
        else validate_example(c, path, path);
    }
    closedir(d);
}

START_TEST(doc_examples_validate) {
    doc_checks c = {.dir = tsr_test_tmpdir()};
    const char *src = tsr_test_env("TESSERA_SOURCE_DIR");
    const char *readmes[] = {"README.md", "sdk/README.md"};
    for (size_t i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", src, readmes[i]);
        check_markdown(&c, path);
    }
    check_folder(&c, "docs", ".md");
    check_folder(&c, "docs/plugins", ".md");
    check_folder(&c, "configs", ".yaml");
    check_folder(&c, "configs/compare", ".yaml");
    /* The README's pipeline, config.md's four, the quantizers' and the three shipped configs
     * at least; the SDK's plugin of your own is a fragment. */
    ck_assert_int_ge(c.whole, 9);
    ck_assert_int_ge(c.fragments, 1);
    rmdir(c.dir);
    free(c.dir);
}
END_TEST

START_TEST(validate_checks_model_files) {
    char *dir = tsr_test_tmpdir();
    char config[4200], model[4200], yaml[12000];
    snprintf(config, sizeof config, "%s/p.yaml", dir);
    snprintf(model, sizeof model, "%s/m.gguf", dir);
    /* section, key, what else the section needs: the draft's files too (its tokenizer goes with
     * a draft model; the config file itself stands in for one) */
    const char *keys[][3] = {{"model", "path", ""}, {"model", "tokenizer", ""},
                             {"draft", "model", ""}, {"draft", "tokenizer", ", model: p.yaml"}};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        snprintf(yaml, sizeof yaml, "tessera: 1\ndecoder: { plugin: %s }\n%s: { %s: m.gguf%s }\n",
                 keys[k][0][0] == 'd' ? "speculative" : "sample", keys[k][0], keys[k][1],
                 keys[k][2]);
        ck_assert_int_eq(tsr_test_write_file(config, yaml, strlen(yaml)), 0);
        char *out, *err;
        const char *args[] = {"validate", config, NULL};
        /* Relative to the config's folder, where there is no m.gguf yet. */
        ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
        char want[12000];
        snprintf(want, sizeof want, "tessera: %s: %s.%s: %s: No such file or directory\n",
                 config, keys[k][0], keys[k][1], model);
        ck_assert_str_eq(err, want);
        ck_assert_str_eq(out, "");
        free(out);
        free(err);
        /* A folder is no model either. */
        ck_assert_int_eq(mkdir(model, 0700), 0);
        ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
        snprintf(want, sizeof want, "tessera: %s: %s.%s: %s: is a folder; expected a file\n",
                 config, keys[k][0], keys[k][1], model);
        ck_assert_str_eq(err, want);
        free(out);
        free(err);
        rmdir(model);
        ck_assert_int_eq(tsr_test_write_file(model, "x", 1), 0);
        ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
        snprintf(want, sizeof want, "%s: ok\n", config);
        ck_assert_str_eq(out, want);
        free(out);
        free(err);
        unlink(model);
    }
    unlink(config);
    rmdir(dir);
    free(dir);
}
END_TEST

/* Each bad pipeline gets one line naming the file, the line and the column. */
typedef struct bad_config {
    const char *yaml;
    const char *set; /* a --set, or NULL */
    const char *error; /* after "tessera: <path>:" */
} bad_config;

static const bad_config bad_configs[] = {
    {"tessera: 1\ncache: { plugin: nosuch }\n", NULL,
     "2:18: cache: unknown plugin 'nosuch' (see `tessera plugins list`)"},
    {"tessera: 1\ncache: { plugin: streaming, window: 0 }\n", NULL,
     "2:29: cache.window: expected an integer in [1, 1048576], got '0'"},
    {"tessera: 1\ncache: { plugin: streaming, windw: 8 }\n", NULL,
     "2:29: cache: unknown parameter 'windw' for plugin 'streaming'; known: sink, window, dtype, "
     "heads"},
    {"tessera: 1\ndecoder: { plugin: sample, temperature: hot }\n", NULL,
     "2:28: decoder.temperature: expected a number in [0, 100], got 'hot'"},
    {"tessera: 1\ncache: { plugin: streaming }\nhooks:\n  - { on: at_end, stage: cache, call: nosuch }\n",
     NULL, "4:5: hooks: plugin 'streaming' has no command 'nosuch'"},
    {"tessera: 1\ncache: { plugin: cpu }\n", NULL,
     "2:18: cache: 'cpu' is a backend plugin, not a cache plugin"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1], attention: { plugin: greedy } }\n", NULL,
     "3:43: layers[0].attention: 'greedy' is a decoder plugin, not an attention plugin"},
};

START_TEST(bad_configs_name_file_line_column) {
    const bad_config *c = &bad_configs[_i];
    char *path = write_config(c->yaml);
    char *err;
    const char *args[] = {"validate", path, c->set ? "--set" : NULL, c->set, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    char want[4200];
    snprintf(want, sizeof want, "tessera: %s:%s\n", path, c->error);
    ck_assert_str_eq(err, want);
    free(err);
    remove_config(path);
}
END_TEST

START_TEST(set_overrides_are_validated) {
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/streaming-llm.yaml", tsr_test_env("TESSERA_SOURCE_DIR"));
    char *err;
    const char *ok[] = {"validate", path, "--set", "cache.window=256", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, ok), 0);
    const char *bad[] = {"validate", path, "--set", "cache.window=-3", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, bad), 1);
    ck_assert_str_eq(err, "tessera: --set: cache.window: expected an integer in [1, 1048576], "
                          "got '-3'\n");
    free(err);
    const char *wrong_stage[] = {"validate", path, "--set", "cache.plugin=cpu", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, wrong_stage), 1);
    ck_assert_str_eq(err, "tessera: --set: cache: 'cpu' is a backend plugin, not a cache plugin\n");
    free(err);
}
END_TEST

/* Plugins built for another version of their stage are refused by name, file and versions,
 * and the program exits non-zero instead of running them. */
typedef struct refused {
    const char *folder, *file, *name, *why;
} refused;

/* The fixtures are built one MINOR, and one MAJOR, above the host's cache ABI: `why` takes
 * the host's MINOR and the one above it, by position. */
static const refused refusals[] = {
    {"minor-newer", "cache-fx-minor-newer.so", "fx-minor-newer",
     "needs cache ABI 1.%2$d, this host speaks 1.%1$d; update Tessera"},
    {"major-other", "cache-fx-major-other.so", "fx-major-other",
     "built for cache ABI 2.x, this host speaks 1.%1$d; rebuild it against the 1.x SDK"},
};

START_TEST(incompatible_plugin_is_refused_in_a_pipeline) {
    const refused *r = &refusals[_i];
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/test-plugins/%s", tsr_test_env("TESSERA_TEST_BUILD_DIR"), r->folder);
    char yaml[8192];
    snprintf(yaml, sizeof yaml, "tessera: 1\nplugin_dirs: [\"%s\"]\ncache: { plugin: %s }\n", dir,
             r->name);
    char *path = write_config(yaml);
    char *err;
    const char *args[] = {"validate", path, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    char want[16384], why[256];
    snprintf(why, sizeof why, r->why, TSR_CACHE_ABI_MINOR, TSR_CACHE_ABI_MINOR + 1);
    snprintf(want, sizeof want, "tessera: %s:3:18: cache: %s/%s: plugin '%s': %s\n", path, dir,
             r->file, r->name, why);
    ck_assert_str_eq(err, want);
    free(err);
    /* `plugins info` opens the same file by name and says the same */
    const char *info[] = {"plugins", "--plugin-dir", dir, "info", r->name, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, info), 1);
    snprintf(want, sizeof want, "tessera: %s/%s: plugin '%s': %s\n", dir, r->file, r->name, why);
    ck_assert_str_eq(err, want);
    free(err);
    remove_config(path);
}
END_TEST

/* ---- the plugin search ------------------------------------------------------------------- */

/* Every command that loads plugins takes --plugin-dir, searched before the other folders: a
 * link there named cache-full.so is the cache the default pipeline gets. */
START_TEST(plugin_dir_for_every_command) {
    char *dir = tsr_test_tmpdir();
    char link[4096], target[4096], model[4096], quantized[4096], logits[4096], text[4096],
        want[8192];
    snprintf(link, sizeof link, "%s/cache-full.so", dir);
    snprintf(target, sizeof target, "%s/cache-full.so", tsr_test_env("TESSERA_PLUGIN_DIR"));
    ck_assert_int_eq(symlink(target, link), 0);
    snprintf(model, sizeof model, "%s/tiny.gguf", dir);
    snprintf(quantized, sizeof quantized, "%s/tiny-q8_0.gguf", dir);
    snprintf(logits, sizeof logits, "%s/logits.f32", dir);
    snprintf(text, sizeof text, "%s/text.txt", dir);
    char words[2048] = "";
    for (int i = 0; i < 40; i++) strcat(words, "the quick brown fox jumps over the lazy dog. ");
    ck_assert_int_eq(tsr_test_write_file(text, words, strlen(words)), 0);
    char config[4096];
    snprintf(config, sizeof config, "%s/configs/default.yaml", tsr_test_env("TESSERA_SOURCE_DIR"));
    const char *const commands[][16] = {
        {"synth", "--shape", "tiny", "--type", "f32", "-o", model},
        {"quantize", model, quantized, "q8_0"},
        {"run", "-m", model, "-p", "hello", "-n", "2"},
        {"logits", "-m", model, "--tokens", "1 2", "--out", logits},
        {"bench", "-m", model, "-p", "4", "-n", "2", "-r", "1", "--bandwidth-mib", "1"},
        {"perplexity", "-m", model, "-f", text, "--ctx", "16"},
        {"validate", config},
    };
    snprintf(want, sizeof want, "tessera: loader: debug: cache plugin 'full': %s\n", link);
    for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++) {
        const char *args[24] = {"-v", "-v"};
        size_t n = 2;
        for (size_t i = 0; commands[c][i]; i++) args[n++] = commands[c][i];
        args[n++] = "--plugin-dir";
        args[n++] = dir;
        char *err;
        int status = tsr_test_tessera(NULL, &err, args);
        ck_assert_msg(status == 0, "%s: exit %d: %s", commands[c][0], status, err);
        ck_assert_msg(strstr(err, want), "%s: no line '%s' in:\n%s", commands[c][0], want, err);
        free(err);
    }
    char *out;
    const char *info[] = {"plugins", "--plugin-dir", dir, "info", "full", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, info), 0);
    snprintf(want, sizeof want, "\n  file:     %s\n", link);
    ck_assert_msg(strstr(out, want), "%s", out);
    free(out);
    const char *no_dir[] = {"run", "-m", model, "--plugin-dir", NULL};
    char *err;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, no_dir), 2);
    ck_assert_str_eq(err, "tessera: run: --plugin-dir needs a value (DIR)\n");
    free(err);
    /* up to 16 */
    const char *many[40] = {"validate", config};
    for (int i = 0; i < 17; i++) {
        many[2 + 2 * i] = "--plugin-dir";
        many[3 + 2 * i] = dir;
    }
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, many), 2);
    ck_assert_str_eq(err, "tessera: validate: --plugin-dir: at most 16 folders\n");
    free(err);
    many[34] = NULL;
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, many), 0);
    free(err);
    const char *files[] = {link, model, quantized, logits, text};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) unlink(files[i]);
    rmdir(dir);
    free(dir);
}
END_TEST

/* A folder the user names that is missing or holds no plugin file is a warning, and the
 * command goes on. */
START_TEST(named_folders_warn) {
    char *dir = tsr_test_tmpdir();
    char missing[4096], yaml[16384], want[16384];
    snprintf(missing, sizeof missing, "%s/nowhere", dir);
    snprintf(yaml, sizeof yaml, "tessera: 1\nplugin_dirs: [\"%s\", \"%s\"]\n", missing, dir);
    char *path = write_config(yaml);
    char *out, *err;
    const char *args[] = {"validate", path, "--plugin-dir", "/nonexistent-plugin-dir", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    snprintf(want, sizeof want,
             "tessera: warning: /nonexistent-plugin-dir: no such folder (a plugin folder from "
             "--plugin-dir)\n"
             "tessera: warning: %s: no such folder (a plugin folder from plugin_dirs of %s)\n"
             "tessera: warning: %s: holds no plugin file named STAGE-NAME.so (a plugin folder "
             "from plugin_dirs of %s)\n", missing, path, dir, path);
    ck_assert_str_eq(err, want);
    snprintf(want, sizeof want, "%s: ok\n", path);
    ck_assert_str_eq(out, want);
    free(out);
    free(err);
    remove_config(path);
    rmdir(dir);
    free(dir);
}
END_TEST

/* validate loads the plugins its pipeline names and no other file of a plugin folder; a
 * listing opens the plugin files, and still no other shared object. */
START_TEST(only_needed_plugins_are_opened) {
    char *dir = tsr_test_tmpdir();
    char trap[4096], log[4096], yaml[8192];
    snprintf(trap, sizeof trap, "%s/test-plugins/trap", tsr_test_env("TESSERA_TEST_BUILD_DIR"));
    snprintf(log, sizeof log, "%s/opened.log", dir);
    setenv("TSR_FX_TRAP_LOG", log, 1);
    snprintf(yaml, sizeof yaml, "tessera: 1\nplugin_dirs: [\"%s\"]\n", trap);
    char *path = write_config(yaml);
    char *err;
    const char *validate[] = {"validate", path, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, validate), 0);
    ck_assert_str_eq(err, "");
    ck_assert_ptr_null(tsr_test_read_file(log, NULL));
    free(err);
    char *out;
    const char *list[] = {"plugins", "--plugin-dir", trap, "list", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, list), 0);
    ck_assert_ptr_nonnull(strstr(out, "\nfx-trap "));
    char *opened = tsr_test_read_file(log, NULL);
    ck_assert_str_eq(opened ? opened : "(none)", "cache-fx-trap\n");
    free(opened);
    free(out);
    unsetenv("TSR_FX_TRAP_LOG");
    unlink(log);
    remove_config(path);
    rmdir(dir);
    free(dir);
}
END_TEST

/* `plugins info` of a name no file carries opens the plugin files, and says how to make the
 * plugin found by name. */
START_TEST(info_finds_a_plugin_its_file_does_not_name) {
    char *dir = tsr_test_tmpdir();
    char link[4096], target[4096], want[16384];
    snprintf(link, sizeof link, "%s/cache-odd.so", dir);
    snprintf(target, sizeof target, "%s/test-plugins/good/cache-fx-good.so",
             tsr_test_env("TESSERA_TEST_BUILD_DIR"));
    ck_assert_int_eq(symlink(target, link), 0);
    char *real = realpath(target, NULL);
    char *out, *err;
    const char *args[] = {"plugins", "--plugin-dir", dir, "info", "fx-good", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    ck_assert_msg(strncmp(out, "fx-good 1.0: ", 13) == 0, "%s", out);
    snprintf(want, sizeof want,
             "tessera: warning: %s: plugin 'fx-good' cannot be found by name, which looks for "
             "%s/cache-fx-good.so only; rename the file, or add a link: ln -s %s "
             "%s/cache-fx-good.so\n", link, dir, real, dir);
    ck_assert_str_eq(err, want);
    free(out);
    free(err);
    free(real);
    unlink(link);
    rmdir(dir);
    free(dir);
}
END_TEST

/* -vv (and more v) raise the log level like -v -v; the debug lines name each folder. */
START_TEST(verbosity_flags) {
    char want[8192];
    snprintf(want, sizeof want, "tessera: loader: debug: plugin folder %s (from the build tree): "
             "searched, ", tsr_test_env("TESSERA_PLUGIN_DIR"));
    const char *const flags[][2] = {{"-vv", NULL}, {"-vvv", NULL}, {"-v", "-v"},
                                    {"--verbose", "-v"}};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        const char *args[] = {flags[i][0], flags[i][1] ? flags[i][1] : "plugins",
                              flags[i][1] ? "plugins" : "list", flags[i][1] ? "list" : NULL,
                              NULL};
        char *err;
        ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 0);
        ck_assert_msg(strstr(err, want), "%s: %s", flags[i][0], err);
        free(err);
    }
    char *err;
    const char *one[] = {"-v", "plugins", "list", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, one), 0);
    ck_assert_ptr_null(strstr(err, "debug"));
    free(err);
    const char *bad[] = {"-vx", "plugins", "list", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, bad), 2);
    ck_assert_str_eq(err, "tessera: unknown option '-vx' (see tessera --help)\n");
    free(err);
}
END_TEST

/* The environment the host reads is in --help; a TESSERA_LOG it does not know is said. */
START_TEST(environment_is_documented) {
    char *out, *err;
    const char *help[] = {"--help", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, help), 0);
    const char *vars[] = {"TESSERA_PLUGIN_PATH", "TESSERA_LOG", "TESSERA_CPU_LEVEL",
                          "TESSERA_NO_DLCLOSE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        char line[64];
        snprintf(line, sizeof line, "\n  %s ", vars[i]);
        ck_assert_msg(strstr(out, line), "%s is not in --help:\n%s", vars[i], out);
    }
    free(out);
    setenv("TESSERA_LOG", "loud", 1);
    const char *version[] = {"--version", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, version), 0);
    unsetenv("TESSERA_LOG");
    ck_assert_str_eq(err, "tessera: warning: TESSERA_LOG='loud' is not info or debug; ignored\n");
    free(err);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cli");
    TCase *tc = tcase_create("cli");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, version_names_every_abi);
    tcase_add_loop_test(tc, every_subcommand_has_help, 0,
                        (int)(sizeof subcommands / sizeof subcommands[0]));
    tcase_add_test(tc, unknown_command_is_a_usage_error);
    tcase_add_test(tc, plugins_list_shows_shipped_plugins_and_skips_bad_objects);
    tcase_add_test(tc, plugins_info_prints_parameters);
    tcase_add_test(tc, plugins_call_goes_through_libffi);
    tcase_add_loop_test(tc, option_without_value_says_what_it_needs, 0,
                        (int)(sizeof valued / sizeof valued[0]));
    tcase_add_loop_test(tc, bad_numbers_are_refused, 0,
                        (int)(sizeof bad_numbers / sizeof bad_numbers[0]));
    tcase_add_test(tc, unknown_options_and_extra_words);
    tcase_add_test(tc, lost_stdout_is_an_error);
    tcase_add_test(tc, run_script_is_quiet_unless_a_step_fails);
    tcase_add_test(tc, doc_examples_validate);
    tcase_add_test(tc, validate_checks_model_files);
    tcase_add_loop_test(tc, bad_configs_name_file_line_column, 0,
                        (int)(sizeof bad_configs / sizeof bad_configs[0]));
    tcase_add_test(tc, set_overrides_are_validated);
    tcase_add_loop_test(tc, incompatible_plugin_is_refused_in_a_pipeline, 0,
                        (int)(sizeof refusals / sizeof refusals[0]));
    tcase_add_test(tc, plugin_dir_for_every_command);
    tcase_add_test(tc, named_folders_warn);
    tcase_add_test(tc, only_needed_plugins_are_opened);
    tcase_add_test(tc, info_finds_a_plugin_its_file_does_not_name);
    tcase_add_test(tc, verbosity_flags);
    tcase_add_test(tc, environment_is_documented);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
