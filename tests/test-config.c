/* Pipeline configs: valid files parse into the right fields, every malformed file gives its
 * exact error line, --set overrides, binding to (fake) plugins, the default pipeline. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tessera/decoder.h>

#include "base/clock.h"
#include "config/config.h"
#include "testutil.h"

#define DEF(...) {.struct_size = sizeof(tsr_param_def), __VA_ARGS__}
#define DESC(stage_, name_, params_, n_)                                                      \
    {.struct_size = sizeof(tsr_plugin_desc), .stage = (stage_), .name = (name_),              \
     .params = (params_), .n_params = (n_)}

/* Fake plugins: a registry of descriptors with parameter tables, no code. */
static const tsr_param_def cpu_params[] = {
    DEF(.name = "threads", .type = TSR_PARAM_INT, .default_value = "1", .min = 1, .max = 256,
        .role = TSR_PARAM_ROLE_THREADS),
};
static const tsr_param_def flash_params[] = {
    DEF(.name = "block", .type = TSR_PARAM_INT, .default_value = "64", .min = 16, .max = 256),
};
static const tsr_param_def streaming_params[] = {
    DEF(.name = "sink", .type = TSR_PARAM_INT, .default_value = "4", .min = 0, .max = 64),
    DEF(.name = "window", .type = TSR_PARAM_INT, .default_value = "128", .min = 1,
        .max = 1048576),
};
static const tsr_param_def sample_params[] = {
    DEF(.name = "temperature", .type = TSR_PARAM_FLOAT, .default_value = "1", .min = 0, .max = 10,
        .role = TSR_PARAM_ROLE_TEMPERATURE),
    DEF(.name = "top_p", .type = TSR_PARAM_FLOAT, .default_value = "1", .min = 0, .max = 1),
    DEF(.name = "seed", .type = TSR_PARAM_INT, .default_value = "0", .min = 1, .max = 0,
        .role = TSR_PARAM_ROLE_SEED),
};
static const tsr_param_def topk_params[] = {
    DEF(.name = "k", .type = TSR_PARAM_INT, .min = 1, .max = 8),
};
/* Decoders that draft (a vtable with draft_use), one that needs a draft and one that takes one
 * when there is one, and one that declares what no host knows. */
static const tsr_decoder_vtable needs_draft = {.struct_size = sizeof(tsr_decoder_vtable),
                                               .draft_use = TSR_DECODER_DRAFT_REQUIRED};
static const tsr_decoder_vtable takes_draft = {.struct_size = sizeof(tsr_decoder_vtable),
                                               .draft_use = TSR_DECODER_DRAFT_OPTIONAL};
static const tsr_decoder_vtable odd_draft = {.struct_size = sizeof(tsr_decoder_vtable),
                                             .draft_use = 7};
/* A 1.0 table ends before draft_use: whatever lies beyond it is not the plugin's. */
static const struct {
    tsr_decoder_vtable vt;
} short_table = {{.struct_size = offsetof(tsr_decoder_vtable, stats),
                  .draft_use = TSR_DECODER_DRAFT_REQUIRED}};

static const tsr_plugin_desc fake_plugins[] = {
    {.struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_DECODER, .name = "spec",
     .vtable = &needs_draft},
    {.struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_DECODER, .name = "either",
     .vtable = &takes_draft},
    {.struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_DECODER, .name = "odd",
     .vtable = &odd_draft},
    {.struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_DECODER, .name = "old",
     .vtable = &short_table.vt},
    DESC(TSR_STAGE_BACKEND, "cpu", cpu_params, 1),
    DESC(TSR_STAGE_QUANTIZER, "gguf", NULL, 0),
    DESC(TSR_STAGE_ATTENTION, "flash", flash_params, 1),
    DESC(TSR_STAGE_ATTENTION, "naive", NULL, 0),
    DESC(TSR_STAGE_CACHE, "full", NULL, 0),
    DESC(TSR_STAGE_CACHE, "streaming", streaming_params, 2),
    DESC(TSR_STAGE_DECODER, "sample", sample_params, 3),
    DESC(TSR_STAGE_DECODER, "greedy", NULL, 0),
    DESC(TSR_STAGE_ROUTER, "topk", topk_params, 1),
};

static const tsr_plugin_desc *fake_find(void *ctx, int32_t stage, const char *name,
                                        tsr_error *why) {
    int *calls = ctx;
    (*calls)++;
    for (size_t i = 0; i < sizeof fake_plugins / sizeof *fake_plugins; i++)
        if (fake_plugins[i].stage == stage && strcmp(fake_plugins[i].name, name) == 0)
            return &fake_plugins[i];
    return NULL;
}

static tsr_config *load_ok(const char *yaml) {
    tsr_config *cfg = NULL;
    tsr_error err = {""};
    tsr_status st = tsr_config_load_string(yaml, "ok.yaml", &cfg, &err);
    ck_assert_msg(st == TSR_OK, "refused: %s", err.msg);
    return cfg;
}

/* Loads (and if that succeeds, binds) `yaml`; returns the error line. */
static const char *first_error(const char *yaml) {
    static tsr_error err;
    tsr_config *cfg = NULL;
    int calls = 0;
    err.msg[0] = '\0';
    tsr_status st = tsr_config_load_string(yaml, "bad.yaml", &cfg, &err);
    if (st == TSR_OK) {
        st = tsr_config_bind(cfg, fake_find, &calls, &err);
        tsr_config_free(cfg);
    } else {
        ck_assert_ptr_null(cfg);
    }
    ck_assert_msg(st < 0, "accepted:\n%s", yaml);
    return err.msg;
}

static const char full_yaml[] =
    "tessera: 1                      # schema\n"
    "model: { path: stories260K.gguf, tokenizer: /abs/tok512.bin }\n"
    "plugin_dirs: [ ./my-plugins, /opt/p ]\n"
    "backend:   { plugin: cpu, threads: 2 }\n"
    "quantizer: { plugin: gguf }\n"
    "attention: { plugin: flash }\n"
    "cache:     { plugin: streaming, sink: 4, window: 128 }\n"
    "decoder:   { plugin: sample, temperature: 0.8, top_p: 0.95, seed: 42 }\n"
    "router:    { plugin: topk, k: 2 }\n"
    "layers:\n"
    "  - { range: [0, 1], cache: { plugin: full } }\n"
    "  - range: [1, 3]\n"
    "    attention:\n"
    "      plugin: naive\n"
    "    cache: { plugin: streaming, window: 16 }\n"
    "generate: { prompt: \"Once upon a time\", max_tokens: 64, temperature: 0.0, seed: 42 }\n"
    "hooks:\n"
    "  - { on: after_step, stage: cache, call: dump_stats, args: [\"/tmp/stats.txt\", 3] }\n"
    "  - on: at_end\n"
    "    stage: decoder\n"
    "    call: report\n";

START_TEST(valid_full) {
    tsr_config *cfg = load_ok(full_yaml);
    ck_assert_str_eq(cfg->path, "ok.yaml");
    ck_assert_int_eq(cfg->schema, 1);
    ck_assert_str_eq(cfg->model_path, "stories260K.gguf");
    ck_assert_str_eq(cfg->tokenizer_path, "/abs/tok512.bin");
    ck_assert_uint_eq(cfg->n_plugin_dirs, 2);
    ck_assert_str_eq(cfg->plugin_dirs[0], "./my-plugins");
    ck_assert_str_eq(cfg->plugin_dirs[1], "/opt/p");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_BACKEND].plugin, "cpu");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_QUANTIZER].plugin, "gguf");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_ATTENTION].plugin, "flash");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_ROUTER].plugin, "topk");
    const tsr_stage_conf *cache = &cfg->stage[TSR_STAGE_CACHE];
    ck_assert_str_eq(cache->plugin, "streaming");
    ck_assert_int_eq(cache->loc.line, 7);
    ck_assert_int_eq(cache->loc.col, 22);
    ck_assert_uint_eq(cache->n_params, 2);
    ck_assert_str_eq(cache->params[0].key, "sink");
    ck_assert_str_eq(cache->params[0].value, "4");
    ck_assert_str_eq(cache->params[1].key, "window");
    ck_assert_str_eq(cache->params[1].value, "128");
    ck_assert_str_eq(cache->params[1].loc.file, "ok.yaml");
    ck_assert_int_eq(cache->params[1].loc.line, 7);
    ck_assert_int_eq(cache->params[1].loc.col, 42);
    const tsr_stage_conf *dec = &cfg->stage[TSR_STAGE_DECODER];
    ck_assert_uint_eq(dec->n_params, 3);
    ck_assert_str_eq(dec->params[1].key, "top_p");
    ck_assert_str_eq(dec->params[1].value, "0.95");

    ck_assert_uint_eq(cfg->n_layers, 2);
    ck_assert_int_eq(cfg->layers[0].first, 0);
    ck_assert_int_eq(cfg->layers[0].last, 1);
    ck_assert_str_eq(cfg->layers[0].stage[TSR_STAGE_CACHE].plugin, "full");
    ck_assert_ptr_null(cfg->layers[0].stage[TSR_STAGE_ATTENTION].plugin);
    ck_assert_int_eq(cfg->layers[1].first, 1);
    ck_assert_int_eq(cfg->layers[1].last, 3);
    ck_assert_int_eq(cfg->layers[1].loc.line, 12);
    ck_assert_int_eq(cfg->layers[1].loc.col, 5);
    ck_assert_str_eq(cfg->layers[1].stage[TSR_STAGE_ATTENTION].plugin, "naive");
    ck_assert_int_eq(cfg->layers[1].stage[TSR_STAGE_ATTENTION].loc.line, 14);
    ck_assert_str_eq(cfg->layers[1].stage[TSR_STAGE_CACHE].params[0].value, "16");

    ck_assert_str_eq(cfg->generate.prompt, "Once upon a time");
    ck_assert_int_eq(cfg->generate.max_tokens, 64);
    ck_assert_str_eq(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_TEMPERATURE].text, "0.0");
    ck_assert_str_eq(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_SEED].text, "42");

    ck_assert_uint_eq(cfg->n_hooks, 2);
    ck_assert_int_eq(cfg->hooks[0].event, TSR_HOOK_AFTER_STEP);
    ck_assert_int_eq(cfg->hooks[0].stage, TSR_STAGE_CACHE);
    ck_assert_str_eq(cfg->hooks[0].command, "dump_stats");
    ck_assert_uint_eq(cfg->hooks[0].n_args, 2);
    ck_assert_str_eq(cfg->hooks[0].args[0], "/tmp/stats.txt");
    ck_assert_str_eq(cfg->hooks[0].args[1], "3");
    ck_assert_int_eq(cfg->hooks[1].event, TSR_HOOK_AT_END);
    ck_assert_int_eq(cfg->hooks[1].stage, TSR_STAGE_DECODER);
    ck_assert_str_eq(cfg->hooks[1].command, "report");
    ck_assert_uint_eq(cfg->hooks[1].n_args, 0);
    ck_assert_int_eq(cfg->hooks[1].loc.line, 19);
    tsr_config_free(cfg);
}
END_TEST

START_TEST(valid_minimal) {
    tsr_config *cfg = load_ok("tessera: 1\n");
    ck_assert_int_eq(cfg->schema, 1);
    ck_assert_ptr_null(cfg->model_path);
    ck_assert_ptr_null(cfg->tokenizer_path);
    ck_assert_uint_eq(cfg->n_plugin_dirs, 0);
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) ck_assert_ptr_null(cfg->stage[s].plugin);
    ck_assert_uint_eq(cfg->n_layers, 0);
    ck_assert_uint_eq(cfg->n_hooks, 0);
    ck_assert_ptr_null(cfg->generate.prompt);
    ck_assert_int_eq(cfg->generate.max_tokens, -1);
    ck_assert_ptr_null(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_TEMPERATURE].text);
    ck_assert_ptr_null(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_SEED].text);
    tsr_config_free(cfg);
    /* JSON is YAML too, and comments and a leading --- are fine */
    cfg = load_ok("{\"tessera\": 1, \"cache\": {\"plugin\": \"full\"}}");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].plugin, "full");
    tsr_config_free(cfg);
    cfg = load_ok("# pipeline\n---\ntessera: 1\nplugin_dirs: []\n...\n");
    ck_assert_uint_eq(cfg->n_plugin_dirs, 0);
    tsr_config_free(cfg);
}
END_TEST

START_TEST(file_paths_resolve) {
    char *dir = tsr_test_tmpdir();
    ck_assert_ptr_nonnull(dir);
    char path[2048], want[4096];
    snprintf(path, sizeof path, "%s/pipe.yaml", dir);
    const char yaml[] = "tessera: 1\n"
                        "model: { path: m.gguf, tokenizer: /abs/t.bin }\n"
                        "plugin_dirs: [ ./plugins, /opt/x ]\n"
                        "cache: { plugin: nope }\n";
    ck_assert_int_eq(tsr_test_write_file(path, yaml, strlen(yaml)), 0);
    tsr_config *cfg;
    tsr_error err;
    ck_assert_int_eq(tsr_config_load(path, &cfg, &err), TSR_OK);
    ck_assert_str_eq(cfg->path, path);
    snprintf(want, sizeof want, "%s/m.gguf", dir);
    ck_assert_str_eq(cfg->model_path, want);
    ck_assert_str_eq(cfg->tokenizer_path, "/abs/t.bin");
    snprintf(want, sizeof want, "%s/./plugins", dir);
    ck_assert_str_eq(cfg->plugin_dirs[0], want);
    ck_assert_str_eq(cfg->plugin_dirs[1], "/opt/x");
    /* errors name the file as given */
    int calls = 0;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    snprintf(want, sizeof want,
             "%s:4:18: cache: unknown plugin 'nope' (see `tessera plugins list`)", path);
    ck_assert_str_eq(err.msg, want);
    tsr_config_free(cfg);
    unlink(path);

    /* a file that does not exist, a folder */
    snprintf(path, sizeof path, "%s/missing.yaml", dir);
    cfg = (tsr_config *)1;
    ck_assert_int_eq(tsr_config_load(path, &cfg, &err), TSR_E_IO);
    ck_assert_ptr_null(cfg);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    ck_assert_str_eq(err.msg, want);
    ck_assert_int_eq(tsr_config_load(dir, &cfg, &err), TSR_E_IO);
    snprintf(want, sizeof want, "%s: a folder, not a regular file", dir);
    ck_assert_str_eq(err.msg, want);
    /* a FIFO is refused at once, not waited on */
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    ck_assert_int_eq(tsr_config_load(fifo, &cfg, &err), TSR_E_IO);
    snprintf(want, sizeof want, "%s: a FIFO, not a regular file", fifo);
    ck_assert_str_eq(err.msg, want);
    unlink(fifo);
    free(fifo);
    /* a file one byte over the limit is refused before it is read (a sparse file: no disk) */
    snprintf(path, sizeof path, "%s/huge.yaml", dir);
    ck_assert_int_eq(tsr_test_write_file(path, "tessera: 1\n", 11), 0);
    ck_assert_int_eq(truncate(path, (16 << 20) + 1), 0);
    ck_assert_int_eq(tsr_config_load(path, &cfg, &err), TSR_E_INVALID);
    snprintf(want, sizeof want, "%s: 16777217 bytes; a config file has at most 16777216", path);
    ck_assert_str_eq(err.msg, want);
    ck_assert_int_eq(truncate(path, 16 << 20), 0);
    ck_assert_int_eq(tsr_config_load(path, &cfg, &err), TSR_E_INVALID);
    ck_assert_msg(strstr(err.msg, "not readable as YAML text") != NULL, "%s", err.msg);
    unlink(path);

    /* an empty file */
    snprintf(path, sizeof path, "%s/empty.yaml", dir);
    ck_assert_int_eq(tsr_test_write_file(path, "", 0), 0);
    ck_assert_int_eq(tsr_config_load(path, &cfg, &err), TSR_E_INVALID);
    snprintf(want, sizeof want, "%s:1:1: the configuration is empty; it needs at least "
                                "`tessera: 1`", path);
    ck_assert_str_eq(err.msg, want);
    unlink(path);
    rmdir(dir);
    free(dir);
}
END_TEST

static const struct {
    const char *yaml;
    const char *error;
} malformed[] = {
    {"", "bad.yaml:1:1: the configuration is empty; it needs at least `tessera: 1`"},
    {"# only a comment\n---\n",
     "bad.yaml:1:1: the configuration is empty; it needs at least `tessera: 1`"},
    {"model: { path: x }\n", "bad.yaml:1:1: missing `tessera: 1` (the config schema version)"},
    {"tessera: 2\n", "bad.yaml:1:10: tessera: expected schema version 1, got '2'"},
    {"tessera: [1]\n", "bad.yaml:1:10: tessera: expected schema version 1, got a sequence"},
    {"- tessera: 1\n", "bad.yaml:1:1: the top level: expected a mapping, got a sequence"},
    {"tessera: 1\nmodle: {}\n",
     "bad.yaml:2:1: unknown key 'modle'; known: tessera, model, plugin_dirs, backend, quantizer, "
     "attention, cache, decoder, router, layers, generate, hooks, draft"},
    {"tessera: 1\nmodel: { file: x }\n",
     "bad.yaml:2:10: model: unknown key 'file'; known: path, tokenizer"},
    {"tessera: 1\nmodel: x.gguf\n", "bad.yaml:2:8: model: expected a mapping, got 'x.gguf'"},
    {"tessera: 1\nmodel: { path: [a] }\n",
     "bad.yaml:2:16: model.path: expected a file path, got a sequence"},
    {"tessera: 1\nplugin_dirs: ./p\n",
     "bad.yaml:2:14: plugin_dirs: expected a sequence, got './p'"},
    {"tessera: 1\nplugin_dirs: [ a, {} ]\n",
     "bad.yaml:2:19: plugin_dirs[1]: expected a folder path, got a mapping"},
    {"tessera: 1\ncache: [full]\n", "bad.yaml:2:8: cache: expected a mapping, got a sequence"},
    {"tessera: 1\ncache: full\n", "bad.yaml:2:8: cache: expected a mapping, got 'full'"},
    {"tessera: 1\ncache:\n", "bad.yaml:2:7: cache: expected a mapping, got ''"},
    {"tessera: 1\ncache: { window: 3 }\n",
     "bad.yaml:2:8: cache: missing `plugin:` (which cache plugin to use)"},
    {"tessera: 1\ncache: { plugin: '' }\n",
     "bad.yaml:2:18: cache.plugin: expected a plugin name, got ''"},
    {"tessera: 1\ncache: { plugin: streaming, window: [1] }\n",
     "bad.yaml:2:37: cache.window: expected a scalar value, got a sequence"},
    {"tessera: 1\ncache: { plugin: full }\ncache: { plugin: full }\n",
     "bad.yaml:3:1: duplicate key 'cache' (first at 2:1)"},
    {"tessera: 1\ncache: { plugin: full, plugin: streaming }\n",
     "bad.yaml:2:24: duplicate key 'plugin' (first at 2:10)"},
    /* the repeat that comes first in the file is named, with its own first occurrence */
    {"tessera: 1\nx: { a: 1, b: 2, c: 3, b: 4, a: 5 }\n",
     "bad.yaml:2:24: duplicate key 'b' (first at 2:12)"},
    {"tessera: 1\nx: { a: 1, a: 2, a: 3 }\n", "bad.yaml:2:12: duplicate key 'a' (first at 2:6)"},
    /* a NUL would cut the text short; named where its string starts */
    {"tessera: 1\nmodel: { path: \"m\\0.gguf\" }\n",
     "bad.yaml:2:16: a NUL byte (\\0) in the text; config values and keys cannot hold one"},
    {"tessera: 1\n\"cache\\x00\": { plugin: full }\n",
     "bad.yaml:2:1: a NUL byte (\\0) in the text; config values and keys cannot hold one"},
    {"tessera: 1\ncache: { plugin: streaming, window: \"1\\u00002\" }\n",
     "bad.yaml:2:37: a NUL byte (\\0) in the text; config values and keys cannot hold one"},
    {"tessera: 1\nlayers: { range: [0, 1] }\n",
     "bad.yaml:2:9: layers: expected a sequence, got a mapping"},
    {"tessera: 1\nlayers:\n  - { range: [a, 1], cache: { plugin: full } }\n",
     "bad.yaml:3:15: layers[0].range: expected an integer in [0, 2147483647], got 'a'"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1, 2], cache: { plugin: full } }\n",
     "bad.yaml:3:14: layers[0].range: expected [first, last] (two layer numbers), got 3 items"},
    {"tessera: 1\nlayers:\n  - { range: 3, cache: { plugin: full } }\n",
     "bad.yaml:3:14: layers[0].range: expected [first, last] (two layer numbers), got '3'"},
    {"tessera: 1\nlayers:\n  - { range: [3, 1], cache: { plugin: full } }\n",
     "bad.yaml:3:14: layers[0].range: first layer 3 is after last layer 1"},
    {"tessera: 1\nlayers:\n  - { range: [-1, 2], cache: { plugin: full } }\n",
     "bad.yaml:3:15: layers[0].range: expected an integer in [0, 2147483647], got '-1'"},
    {"tessera: 1\nlayers:\n  - { range: [0, [1]], cache: { plugin: full } }\n",
     "bad.yaml:3:18: layers[0].range[1]: expected a scalar value, got a sequence"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1], cache: { plugin: full } }\n"
     "  - { range: [0, 1], backend: { plugin: cpu } }\n",
     "bad.yaml:4:22: layers[1]: backend cannot vary per layer; only quantizer, attention, "
     "cache and router can"},
    {"tessera: 1\nlayers:\n  - range: [0, 1]\n    decoder: { plugin: sample }\n",
     "bad.yaml:4:5: layers[0]: decoder cannot vary per layer; only quantizer, attention, "
     "cache and router can"},
    {"tessera: 1\nlayers:\n  - { cache: { plugin: full } }\n",
     "bad.yaml:3:5: layers[0]: missing `range: [first, last]`"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1] }\n",
     "bad.yaml:3:5: layers[0]: nothing to override; give quantizer, attention, cache or "
     "router"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1], cache: { plugin: full }, size: 2 }\n",
     "bad.yaml:3:47: layers[0]: unknown key 'size'; known: range, quantizer, attention, cache, "
     "router"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1], cache: { size: 2 } }\n",
     "bad.yaml:3:29: layers[0].cache: missing `plugin:` (which cache plugin to use)"},
    {"tessera: 1\nhooks: { on: at_end }\n",
     "bad.yaml:2:8: hooks: expected a sequence, got a mapping"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: cache }\n",
     "bad.yaml:3:5: hooks[0]: missing `call:` (the command's name)"},
    {"tessera: 1\nhooks:\n  - { stage: cache, call: x }\n",
     "bad.yaml:3:5: hooks[0]: missing `on:` (after_load, after_step or at_end)"},
    {"tessera: 1\nhooks:\n  - { on: at_end, call: x }\n",
     "bad.yaml:3:5: hooks[0]: missing `stage:` (the stage whose plugin has the command)"},
    {"tessera: 1\nhooks:\n  - { on: before_load, stage: cache, call: x }\n",
     "bad.yaml:3:11: hooks[0].on: expected one of after_load, after_step, at_end, "
     "got 'before_load'"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: kv, call: x }\n",
     "bad.yaml:3:26: hooks[0].stage: expected one of backend, quantizer, attention, cache, "
     "decoder, router, got 'kv'"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: cache, call: x, when: now }\n",
     "bad.yaml:3:42: hooks[0]: unknown key 'when'; known: on, stage, call, args"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: cache, call: x, args: /tmp/a }\n",
     "bad.yaml:3:48: hooks[0].args: expected a sequence, got '/tmp/a'"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: cache, call: x, args: [a, [b]] }\n",
     "bad.yaml:3:52: hooks[0].args[1]: expected a scalar value, got a sequence"},
    {"tessera: 1\nhooks:\n  - { on: at_end, stage: cache, call: '' }\n",
     "bad.yaml:3:39: hooks[0].call: expected a command name, got ''"},
    {"tessera: 1\ngenerate: { tokens: 5 }\n",
     "bad.yaml:2:13: generate: unknown key 'tokens'; known: prompt, max_tokens, temperature, "
     "seed"},
    {"tessera: 1\ngenerate: { max_tokens: many }\n",
     "bad.yaml:2:25: generate.max_tokens: expected an integer in [0, 1073741824], got 'many'"},
    {"tessera: 1\ngenerate: { temperature: -1 }\n",
     "bad.yaml:2:26: generate.temperature: expected a number in [0, 100], got '-1'"},
    {"tessera: 1\ngenerate: { prompt: [a] }\n",
     "bad.yaml:2:21: generate.prompt: expected a scalar value, got a sequence"},
    {"tessera: 1\ngenerate: [1]\n", "bad.yaml:2:11: generate: expected a mapping, got a sequence"},
    {"tessera: 1\n---\ntessera: 1\n",
     "bad.yaml:2:1: a second YAML document; a config file holds one"},
    {"tessera: 1\nmodel: &m { path: x }\n",
     "bad.yaml:2:8: YAML anchors (&m) are not supported; write the value out"},
    {"tessera: 1\ncache: *c\n",
     "bad.yaml:2:8: YAML aliases (*c) are not supported; write the value out"},
    {"tessera: 1\n? [a]\n: 1\n", "bad.yaml:2:3: a mapping key must be plain text, not a sequence"},
    {"tessera: 1\ncache: { plugin: full\n",
     "bad.yaml:3:1: YAML syntax error: did not find expected ',' or '}' (while parsing a flow "
     "mapping at 2:8)"},
    {"tessera: 1\n  bad: indent\n",
     "bad.yaml:2:6: YAML syntax error: mapping values are not allowed in this context"},
    {"tessera: 1\n\tcache: x\n",
     "bad.yaml:2:1: YAML syntax error: found a tab character that violates indentation (while "
     "scanning a plain scalar at 1:10)"},
    {"tessera: 1\nmodel: { path: \"a\xff\" }\n",
     "bad.yaml:2:18: not readable as YAML text: invalid leading UTF-8 octet"},
    /* binding */
    {"tessera: 1\ncache: { plugin: foo }\n",
     "bad.yaml:2:18: cache: unknown plugin 'foo' (see `tessera plugins list`)"},
    {"tessera: 1\ncache: { plugin: cpu }\n",
     "bad.yaml:2:18: cache: unknown plugin 'cpu' (see `tessera plugins list`)"},
    {"tessera: 1\nlayers:\n  - { range: [0, 1], attention: { plugin: fast } }\n",
     "bad.yaml:3:43: layers[0].attention: unknown plugin 'fast' (see `tessera plugins list`)"},
    {"tessera: 1\ncache: { plugin: streaming, windw: 3 }\n",
     "bad.yaml:2:29: cache: unknown parameter 'windw' for plugin 'streaming'; known: sink, "
     "window"},
    {"tessera: 1\ncache: { plugin: streaming, window: 0 }\n",
     "bad.yaml:2:29: cache.window: expected an integer in [1, 1048576], got '0'"},
    {"tessera: 1\ncache: { plugin: full, window: 8 }\n",
     "bad.yaml:2:24: cache: unknown parameter 'window' for plugin 'full'; it takes none"},
    {"tessera: 1\nrouter: { plugin: topk }\n",
     "bad.yaml:2:19: router.k: required parameter is missing"},
    {"tessera: 1\nbackend: { threads: 0, plugin: cpu }\n",
     "bad.yaml:2:12: backend.threads: expected an integer in [1, 256], got '0'"},
    {"tessera: 1\nlayers:\n  - { range: [0, 9], cache: { plugin: streaming, sink: x } }\n",
     "bad.yaml:3:50: layers[0].cache.sink: expected an integer in [0, 64], got 'x'"},
    /* draft: */
    {"tessera: 1\ndraft: x\n", "bad.yaml:2:8: draft: expected a mapping, got 'x'"},
    {"tessera: 1\ndraft: { modle: x }\n",
     "bad.yaml:2:10: draft: unknown key 'modle'; known: model, tokenizer, skip_layers, backend, "
     "quantizer, attention, cache, router"},
    {"tessera: 1\ndraft: { decoder: { plugin: greedy } }\n",
     "bad.yaml:2:10: draft: a draft has no decoder of its own: the pipeline's decoder drives "
     "both models"},
    {"tessera: 1\ndraft: { model: [a] }\n",
     "bad.yaml:2:17: draft.model: expected a file path, got a sequence"},
    {"tessera: 1\ndraft: { tokenizer: \"\" }\n",
     "bad.yaml:2:21: draft.tokenizer: expected a file path, got ''"},
    {"tessera: 1\ndraft: { skip_layers: 3 }\n",
     "bad.yaml:2:23: draft.skip_layers: expected a sequence, got '3'"},
    {"tessera: 1\ndraft: { skip_layers: [1, x] }\n",
     "bad.yaml:2:27: draft.skip_layers: expected an integer in [0, 2147483647], got 'x'"},
    {"tessera: 1\ndraft: { skip_layers: [-1] }\n",
     "bad.yaml:2:24: draft.skip_layers: expected an integer in [0, 2147483647], got '-1'"},
    {"tessera: 1\ndraft: { skip_layers: [2, 0, 2] }\n",
     "bad.yaml:2:30: draft.skip_layers: layer 2 is listed twice"},
    {"tessera: 1\ndraft: { skip_layers: [[1]] }\n",
     "bad.yaml:2:24: draft.skip_layers: expected a scalar value, got a sequence"},
    {"tessera: 1\ndraft: { cache: { window: 3 } }\n",
     "bad.yaml:2:17: draft.cache: missing `plugin:` (which cache plugin to use)"},
    {"tessera: 1\ndecoder: { plugin: spec }\ndraft: { cache: { plugin: nope } }\n",
     "bad.yaml:3:27: draft.cache: unknown plugin 'nope' (see `tessera plugins list`)"},
    {"tessera: 1\ndecoder: { plugin: spec }\ndraft: { cache: { plugin: streaming, sink: -1 } }\n",
     "bad.yaml:3:38: draft.cache.sink: expected an integer in [0, 64], got '-1'"},
    {"tessera: 1\ndecoder: { plugin: greedy }\ndraft: { skip_layers: [1] }\n",
     "bad.yaml:3:8: draft: the decoder 'greedy' does not use a draft model; choose a decoder "
     "that drafts, or remove the draft"},
    {"tessera: 1\ndecoder: { plugin: old }\ndraft: { skip_layers: [1] }\n",
     "bad.yaml:3:8: draft: the decoder 'old' does not use a draft model; choose a decoder "
     "that drafts, or remove the draft"},
    {"tessera: 1\ndecoder: { plugin: spec }\n",
     "bad.yaml:2:20: decoder: 'spec' needs a draft model: add a draft: section (draft.model: "
     "FILE, or draft.skip_layers: [...] to draft with the target's own layers)"},
    {"tessera: 1\ndecoder: { plugin: spec }\ndraft: { tokenizer: t.bin, skip_layers: [1] }\n",
     "bad.yaml:3:8: draft.tokenizer: a self-draft reads with the target's vocabulary; give "
     "draft.model too, or remove draft.tokenizer"},
    {"tessera: 1\ndecoder: { plugin: odd }\n",
     "bad.yaml:2:20: decoder: 'odd' declares draft_use 7, which is not a tsr_decoder_draft_use "
     "(0, 1 or 2)"},
};

START_TEST(malformed_configs) {
    size_t n = sizeof malformed / sizeof *malformed;
    ck_assert_uint_ge(n, 25);
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) {
        const char *got = first_error(malformed[i].yaml);
        if (strcmp(got, malformed[i].error) == 0) continue;
        fprintf(stderr, "case %zu:\n%swant: %s\ngot:  %s\n", i, malformed[i].yaml,
                malformed[i].error, got);
        wrong++;
    }
    ck_assert_msg(wrong == 0, "%zu of %zu malformed configs gave another error", wrong, n);
}
END_TEST

START_TEST(deep_nesting) {
    char yaml[256] = "tessera: 1\nx: ";
    size_t len = strlen(yaml);
    for (int i = 0; i < 100; i++) yaml[len++] = '[';
    yaml[len] = '\0';
    ck_assert_str_eq(first_error(yaml), "bad.yaml:2:67: nested deeper than 64 levels");
}
END_TEST

/* 100,000 keys in one mapping: the duplicate check and the parameters of a stage stay near
 * linear (pairwise, this took tens of seconds). */
START_TEST(long_mappings_are_fast) {
    enum { N = 100000 };
    size_t cap = (size_t)N * 16 + 256, len = 0;
    char *yaml = malloc(cap);
    len += (size_t)snprintf(yaml + len, cap - len, "tessera: 1\ncache: { plugin: streaming");
    for (int i = 0; i < N; i++) len += (size_t)snprintf(yaml + len, cap - len, ", p%d: 1", i);
    snprintf(yaml + len, cap - len, " }\n");
    uint64_t t0 = tsr_clock_ns();
    tsr_config *cfg = load_ok(yaml);
    ck_assert_uint_eq(cfg->stage[TSR_STAGE_CACHE].n_params, N);
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].params[N - 1].key, "p99999");
    tsr_config_free(cfg);
    /* the last key repeats the sixth */
    snprintf(yaml + len, cap - len, ", p5: 2 }\n");
    const char *msg = first_error(yaml);
    ck_assert_msg(strstr(msg, ": duplicate key 'p5' (first at 2:64)") != NULL, "%s", msg);
    /* a few seconds at most, more on slow (sanitizer) builds, which scale Check's timeouts */
    const char *multiplier = getenv("CK_TIMEOUT_MULTIPLIER");
    double limit = 5.0 * (multiplier && atof(multiplier) > 0 ? atof(multiplier) : 1.0);
    double seconds = tsr_clock_seconds_since(t0);
    ck_assert_msg(seconds < limit, "%.1f s for two configs of %d keys", seconds, N);
    free(yaml);
}
END_TEST

START_TEST(bind_values) {
    tsr_config *cfg = load_ok(full_yaml);
    int calls = 0;
    tsr_error err;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_int_eq(calls, 6 + 3); /* every stage, then layers[0].cache, layers[1] x2 */
    const tsr_params *p = &cfg->stage[TSR_STAGE_CACHE].bound.params;
    ck_assert_uint_eq(p->count, 2);
    ck_assert_ptr_eq(p->defs, streaming_params);
    ck_assert_int_eq(p->values[0].u.i, 4);
    ck_assert_int_eq(p->values[1].u.i, 128);
    p = &cfg->stage[TSR_STAGE_DECODER].bound.params;
    ck_assert_double_eq(p->values[0].u.f, 0.0); /* generate.temperature, over decoder's 0.8 */
    ck_assert_double_eq(p->values[1].u.f, 0.95);
    ck_assert_int_eq(p->values[2].u.i, 42);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 2);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_ATTENTION].bound.params.values[0].u.i, 64); /* default */
    ck_assert_int_eq(cfg->stage[TSR_STAGE_ROUTER].bound.params.values[0].u.i, 2);
    /* a per-layer stage takes the plugin's defaults, not the top-level values */
    p = &cfg->layers[1].stage[TSR_STAGE_CACHE].bound.params;
    ck_assert_int_eq(p->values[0].u.i, 4);
    ck_assert_int_eq(p->values[1].u.i, 16);
    ck_assert_uint_eq(cfg->layers[0].stage[TSR_STAGE_CACHE].bound.params.count, 0);
    /* binding twice replaces, without leaks */
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    tsr_config_free(cfg);
}
END_TEST

START_TEST(bind_fills_defaults) {
    tsr_config *cfg = load_ok("tessera: 1\ncache: { plugin: streaming }\n");
    int calls = 0;
    tsr_error err;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_str_eq(cfg->stage[TSR_STAGE_BACKEND].plugin, "cpu");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_QUANTIZER].plugin, "gguf");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_ATTENTION].plugin, "flash");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].plugin, "streaming");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_DECODER].plugin, "sample");
    ck_assert_ptr_null(cfg->stage[TSR_STAGE_ROUTER].plugin);
    ck_assert_int_eq(calls, 5);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 1);
    ck_assert_double_eq(cfg->stage[TSR_STAGE_DECODER].bound.params.values[0].u.f, 1.0);
    tsr_config_free(cfg);
}
END_TEST

START_TEST(default_pipeline) {
    tsr_config *cfg;
    tsr_error err;
    ck_assert_int_eq(tsr_config_default(&cfg, &err), TSR_OK);
    ck_assert_str_eq(cfg->path, "<default>");
    ck_assert_int_eq(cfg->schema, TSR_CONFIG_SCHEMA);
    ck_assert_str_eq(cfg->stage[TSR_STAGE_BACKEND].plugin, "cpu");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_QUANTIZER].plugin, "gguf");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_ATTENTION].plugin, "flash");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].plugin, "full");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_DECODER].plugin, "sample");
    ck_assert_ptr_null(cfg->stage[TSR_STAGE_ROUTER].plugin);
    ck_assert_int_eq(cfg->generate.max_tokens, -1);
    /* --set applies to it as to a file */
    ck_assert_int_eq(tsr_config_set(cfg, "cache.plugin=nope", &err), TSR_OK);
    int calls = 0;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--set: cache: unknown plugin 'nope' (see `tessera plugins list`)");
    tsr_config_free(cfg);
}
END_TEST

/* Options that name a role (-t, --temperature, --seed, generate.temperature/seed) reach the
 * parameter of that role whatever its name, win over the file, and fail naming the option when
 * the plugin has no such parameter. */
START_TEST(values_by_role) {
    tsr_config *cfg = load_ok("tessera: 1\ndecoder: { plugin: sample, temperature: 0.7 }\n");
    int calls = 0;
    tsr_error err;
    ck_assert_int_eq(tsr_config_set_role(cfg, TSR_STAGE_DECODER, TSR_PARAM_ROLE_TEMPERATURE,
                                         "0.25", "--temperature", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set_role(cfg, TSR_STAGE_BACKEND, TSR_PARAM_ROLE_THREADS, "3",
                                         "-t", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_double_eq(cfg->stage[TSR_STAGE_DECODER].bound.params.values[0].u.f, 0.25);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 3);
    ck_assert_int_eq(tsr_config_set_role(cfg, TSR_STAGE_DECODER, TSR_PARAM_ROLE_TEMPERATURE,
                                         "abc", "--temperature", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--temperature: decoder.temperature: expected a number in [0, 10], "
                              "got 'abc'");
    tsr_config_free(cfg);

    cfg = load_ok("tessera: 1\ndecoder: { plugin: greedy }\n");
    ck_assert_int_eq(tsr_config_set_role(cfg, TSR_STAGE_DECODER, TSR_PARAM_ROLE_TEMPERATURE,
                                         "0.5", "--temperature", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--temperature: the decoder plugin 'greedy' has no temperature "
                              "parameter");
    tsr_config_free(cfg);

    cfg = load_ok("tessera: 1\ndecoder: { plugin: greedy }\ngenerate: { seed: 3 }\n");
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "ok.yaml:3:19: generate.seed: the decoder plugin 'greedy' has no "
                              "seed parameter");
    tsr_config_free(cfg);
}
END_TEST

START_TEST(set_overrides) {
    tsr_config *cfg = load_ok(full_yaml);
    tsr_error err;
    ck_assert_int_eq(tsr_config_set(cfg, "cache.window=256", &err), TSR_OK);
    ck_assert_uint_eq(cfg->stage[TSR_STAGE_CACHE].n_params, 2);
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].params[1].value, "256");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].params[1].loc.file, "--set");
    ck_assert_int_eq(tsr_config_set(cfg, "backend.threads=4", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set(cfg, "attention.block=128", &err), TSR_OK);
    ck_assert_uint_eq(cfg->stage[TSR_STAGE_ATTENTION].n_params, 1);
    ck_assert_int_eq(tsr_config_set(cfg, "decoder.plugin=sample", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set(cfg, "model.path=other.gguf", &err), TSR_OK);
    ck_assert_str_eq(cfg->model_path, "other.gguf");
    ck_assert_int_eq(tsr_config_set(cfg, "model.tokenizer=t.bin", &err), TSR_OK);
    ck_assert_str_eq(cfg->tokenizer_path, "t.bin");
    ck_assert_int_eq(tsr_config_set(cfg, "generate.max_tokens=8", &err), TSR_OK);
    ck_assert_int_eq(cfg->generate.max_tokens, 8);
    ck_assert_int_eq(tsr_config_set(cfg, "generate.temperature=1.5", &err), TSR_OK);
    ck_assert_str_eq(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_TEMPERATURE].text, "1.5");
    ck_assert_int_eq(tsr_config_set(cfg, "generate.seed=0x10", &err), TSR_OK);
    ck_assert_str_eq(cfg->role_value[TSR_STAGE_DECODER][TSR_PARAM_ROLE_SEED].text, "0x10");
    ck_assert_int_eq(tsr_config_set(cfg, "generate.prompt=a=b c", &err), TSR_OK);
    ck_assert_str_eq(cfg->generate.prompt, "a=b c");
    int calls = 0;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_CACHE].bound.params.values[1].u.i, 256);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 4);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_ATTENTION].bound.params.values[0].u.i, 128);
    ck_assert_double_eq(cfg->stage[TSR_STAGE_DECODER].bound.params.values[0].u.f, 1.5);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_DECODER].bound.params.values[2].u.i, 16);
    /* switching plugin keeps the given parameters: they must suit the new one */
    ck_assert_int_eq(tsr_config_set(cfg, "cache.plugin=full", &err), TSR_OK);
    ck_assert_ptr_null(cfg->stage[TSR_STAGE_CACHE].bound.values);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "ok.yaml:7:33: cache: unknown parameter 'sink' for plugin 'full'; "
                              "it takes none");
    /* a bad value given with --set is reported at bind time, as from the file */
    tsr_config_free(cfg);
    cfg = load_ok("tessera: 1\n");
    ck_assert_int_eq(tsr_config_set(cfg, "cache.plugin=streaming", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set(cfg, "cache.window=abc", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "--set: cache.window: expected an integer in [1, 1048576], got 'abc'");
    tsr_config_free(cfg);
    /* a parameter for a stage that has no plugin and no default */
    cfg = load_ok("tessera: 1\n");
    ck_assert_int_eq(tsr_config_set(cfg, "router.k=2", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "--set: router.k: parameter given but no router plugin chosen; set "
                     "router.plugin");
    tsr_config_free(cfg);
}
END_TEST

/* The draft's own model, tokenizer, skipped layers and stages; the stages it does not name are
 * the target's once bound, the router only for a self-draft. */
START_TEST(draft_section) {
    tsr_config *cfg = load_ok("tessera: 1\n"
                              "backend: { plugin: cpu, threads: 2 }\n"
                              "attention: { plugin: flash, block: 32 }\n"
                              "decoder: { plugin: spec }\n"
                              "router: { plugin: topk, k: 2 }\n"
                              "draft:\n"
                              "  model: d.bin\n"
                              "  tokenizer: tok.bin\n"
                              "  skip_layers: [3, 1]\n"
                              "  cache: { plugin: streaming, window: 64 }\n");
    const tsr_config *d = cfg->draft;
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(d->model_path, "d.bin");
    ck_assert_str_eq(d->tokenizer_path, "tok.bin");
    ck_assert_uint_eq(d->n_skip_layers, 2);
    ck_assert_int_eq(d->skip_layers[0], 3);
    ck_assert_int_eq(d->skip_layers[1], 1);
    ck_assert_int_eq(d->skip_loc.line, 9);
    ck_assert_int_eq(d->skip_loc.col, 16);
    ck_assert_int_eq(d->loc.line, 7);
    ck_assert_int_eq(d->loc.col, 3);
    ck_assert_ptr_null(d->stage[TSR_STAGE_BACKEND].plugin);
    int calls = 0;
    tsr_error err;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_int_eq(calls, 6 + 4); /* the target's stages, then the draft's but the router */
    ck_assert_str_eq(d->stage[TSR_STAGE_BACKEND].plugin, "cpu");
    ck_assert_int_eq(d->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 2);
    ck_assert_str_eq(d->stage[TSR_STAGE_QUANTIZER].plugin, "gguf");
    ck_assert_int_eq(d->stage[TSR_STAGE_ATTENTION].bound.params.values[0].u.i, 32);
    ck_assert_str_eq(d->stage[TSR_STAGE_CACHE].plugin, "streaming");
    ck_assert_int_eq(d->stage[TSR_STAGE_CACHE].bound.params.values[0].u.i, 4);
    ck_assert_int_eq(d->stage[TSR_STAGE_CACHE].bound.params.values[1].u.i, 64);
    ck_assert_str_eq(cfg->stage[TSR_STAGE_CACHE].plugin, "full");
    ck_assert_ptr_null(d->stage[TSR_STAGE_DECODER].plugin);
    ck_assert_ptr_null(d->stage[TSR_STAGE_ROUTER].plugin);
    tsr_config_free(cfg);

    /* a self-draft runs the target's experts: it keeps the router */
    cfg = load_ok("tessera: 1\ndecoder: { plugin: either }\nrouter: { plugin: topk, k: 2 }\n"
                  "draft: { skip_layers: [0] }\n");
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    ck_assert_ptr_null(cfg->draft->model_path);
    ck_assert_str_eq(cfg->draft->stage[TSR_STAGE_ROUTER].plugin, "topk");
    ck_assert_int_eq(cfg->draft->stage[TSR_STAGE_ROUTER].bound.params.values[0].u.i, 2);
    tsr_config_free(cfg);
    /* a decoder that takes a draft runs without one too */
    cfg = load_ok("tessera: 1\ndecoder: { plugin: either }\n");
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    tsr_config_free(cfg);
}
END_TEST

/* --set makes the draft section; a parameter given for a stage the draft does not name changes
 * the draft's copy of the target's stage only; values given by role reach the draft too. */
START_TEST(draft_set) {
    tsr_config *cfg = load_ok("tessera: 1\ncache: { plugin: streaming, window: 32 }\n"
                              "decoder: { plugin: either }\n");
    tsr_error err;
    ck_assert_ptr_null(cfg->draft);
    ck_assert_int_eq(tsr_config_set(cfg, "draft.model=x.bin", &err), TSR_OK);
    ck_assert_ptr_nonnull(cfg->draft);
    ck_assert_str_eq(cfg->draft->model_path, "x.bin");
    ck_assert_str_eq(cfg->draft->loc.file, "--set");
    ck_assert_int_eq(tsr_config_set(cfg, "draft.tokenizer=t.bin", &err), TSR_OK);
    ck_assert_str_eq(cfg->draft->tokenizer_path, "t.bin");
    ck_assert_int_eq(tsr_config_set(cfg, "draft.skip_layers=2,0", &err), TSR_OK);
    ck_assert_uint_eq(cfg->draft->n_skip_layers, 2);
    ck_assert_int_eq(cfg->draft->skip_layers[0], 2);
    ck_assert_int_eq(cfg->draft->skip_layers[1], 0);
    ck_assert_int_eq(tsr_config_set(cfg, "draft.cache.window=8", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set(cfg, "draft.attention.plugin=naive", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_set_role(cfg, TSR_STAGE_BACKEND, TSR_PARAM_ROLE_THREADS, "5",
                                         "-t", &err), TSR_OK);
    int calls = 0;
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_OK);
    const tsr_config *d = cfg->draft;
    ck_assert_str_eq(d->stage[TSR_STAGE_CACHE].plugin, "streaming");
    ck_assert_int_eq(d->stage[TSR_STAGE_CACHE].bound.params.values[1].u.i, 8);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_CACHE].bound.params.values[1].u.i, 32);
    ck_assert_str_eq(d->stage[TSR_STAGE_ATTENTION].plugin, "naive");
    ck_assert_str_eq(cfg->stage[TSR_STAGE_ATTENTION].plugin, "flash");
    ck_assert_int_eq(d->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 5);
    ck_assert_int_eq(cfg->stage[TSR_STAGE_BACKEND].bound.params.values[0].u.i, 5);
    ck_assert_int_eq(tsr_config_set(cfg, "draft.skip_layers=", &err), TSR_OK);
    ck_assert_uint_eq(cfg->draft->n_skip_layers, 0);
    tsr_config_free(cfg);

    /* a parameter for a draft stage neither the draft nor the target has */
    cfg = load_ok("tessera: 1\ndecoder: { plugin: spec }\n");
    ck_assert_int_eq(tsr_config_set(cfg, "draft.router.k=2", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--set: draft.router.k: parameter given but no router plugin "
                              "chosen; set draft.router.plugin");
    tsr_config_free(cfg);
    /* a draft made by --set, refused by the decoder, is located at --set */
    cfg = load_ok("tessera: 1\ndecoder: { plugin: greedy }\n");
    ck_assert_int_eq(tsr_config_set(cfg, "draft.skip_layers=1", &err), TSR_OK);
    ck_assert_int_eq(tsr_config_bind(cfg, fake_find, &calls, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--set: draft: the decoder 'greedy' does not use a draft model; "
                              "choose a decoder that drafts, or remove the draft");
    tsr_config_free(cfg);
}
END_TEST

START_TEST(set_invalid) {
    static const struct {
        const char *assignment, *error;
    } bad[] = {
        {"cache", "--set 'cache': expected section.key=value"},
        {"cache=full", "--set 'cache=full': expected section.key=value"},
        {"=x", "--set '=x': expected section.key=value"},
        {".window=1", "--set '.window=1': expected section.key=value"},
        {"cache.=1", "--set 'cache.=1': expected section.key=value"},
        {"cache.window", "--set 'cache.window': expected section.key=value"},
        {"", "--set '': expected section.key=value"},
        {"cache.plugin=", "--set 'cache.plugin=': expected a plugin name after '='"},
        {"layers.range=1", "--set 'layers.range=1': layers cannot be set from the command line; "
                           "edit the config file"},
        {"hooks.on=x", "--set 'hooks.on=x': hooks cannot be set from the command line; edit the "
                       "config file"},
        {"foo.x=1", "--set 'foo.x=1': unknown section 'foo'; settable: backend, quantizer, "
                    "attention, cache, decoder, router, model, generate, draft"},
        {"model.file=x", "--set 'model.file=x': expected model.path=FILE or model.tokenizer=FILE"},
        {"model.path=", "--set 'model.path=': expected model.path=FILE or model.tokenizer=FILE"},
        {"generate.tokens=5", "--set 'generate.tokens=5': unknown key 'tokens' in generate; known: "
                              "prompt, max_tokens, temperature, seed"},
        {"generate.max_tokens=abc",
         "--set: generate.max_tokens: expected an integer in [0, 1073741824], got 'abc'"},
        {"generate.temperature=nan",
         "--set: generate.temperature: expected a number in [0, 100], got 'nan'"},
        {"draft.modle=x", "--set 'draft.modle=x': expected draft.model=FILE, draft.tokenizer=FILE, "
                          "draft.skip_layers=N,N... or draft.STAGE.KEY=VALUE (STAGE: backend, "
                          "quantizer, attention, cache, router)"},
        {"draft.model=", "--set 'draft.model=': expected draft.model=FILE, draft.tokenizer=FILE, "
                         "draft.skip_layers=N,N... or draft.STAGE.KEY=VALUE (STAGE: backend, "
                         "quantizer, attention, cache, router)"},
        {"draft.decoder.plugin=greedy",
         "--set 'draft.decoder.plugin=greedy': expected draft.model=FILE, draft.tokenizer=FILE, "
         "draft.skip_layers=N,N... or draft.STAGE.KEY=VALUE (STAGE: backend, quantizer, "
         "attention, cache, router)"},
        {"draft.cache.=1", "--set 'draft.cache.=1': expected draft.model=FILE, "
                           "draft.tokenizer=FILE, draft.skip_layers=N,N... or "
                           "draft.STAGE.KEY=VALUE (STAGE: backend, quantizer, attention, cache, "
                           "router)"},
        {"draft.cache.plugin=", "--set 'draft.cache.plugin=': expected a plugin name after '='"},
        {"draft.skip_layers=1,,2",
         "--set: draft.skip_layers: expected an integer in [0, 2147483647], got ''"},
        {"draft.skip_layers=4,4", "--set: draft.skip_layers: layer 4 is listed twice"},
    };
    tsr_config *cfg = load_ok("tessera: 1\ngenerate: { max_tokens: 3 }\n");
    tsr_error err;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ck_assert_msg(tsr_config_set(cfg, bad[i].assignment, &err) == TSR_E_INVALID,
                      "accepted '%s'", bad[i].assignment);
        ck_assert_str_eq(err.msg, bad[i].error);
    }
    ck_assert_int_eq(cfg->generate.max_tokens, 3); /* unchanged by the failures */
    ck_assert_ptr_nonnull(cfg->draft); /* made by the first well-formed draft key */
    tsr_config_free(cfg);
    /* a malformed draft key makes no draft section */
    cfg = load_ok("tessera: 1\n");
    ck_assert_int_eq(tsr_config_set(cfg, "draft.modle=x", &err), TSR_E_INVALID);
    ck_assert_ptr_null(cfg->draft);
    tsr_config_free(cfg);
}
END_TEST

START_TEST(stage_at_layer) {
    tsr_config *cfg = load_ok(full_yaml);
    const tsr_stage_conf *sc = tsr_config_stage_at(cfg, TSR_STAGE_CACHE, 0);
    ck_assert_str_eq(sc->plugin, "full");
    sc = tsr_config_stage_at(cfg, TSR_STAGE_CACHE, 1); /* both entries hold 1: the later wins */
    ck_assert_str_eq(sc->plugin, "streaming");
    ck_assert_ptr_eq(sc, &cfg->layers[1].stage[TSR_STAGE_CACHE]);
    ck_assert_ptr_eq(tsr_config_stage_at(cfg, TSR_STAGE_CACHE, 4), &cfg->stage[TSR_STAGE_CACHE]);
    ck_assert_str_eq(tsr_config_stage_at(cfg, TSR_STAGE_ATTENTION, 0)->plugin, "flash");
    ck_assert_str_eq(tsr_config_stage_at(cfg, TSR_STAGE_ATTENTION, 3)->plugin, "naive");
    ck_assert_ptr_eq(tsr_config_stage_at(cfg, TSR_STAGE_BACKEND, 1),
                     &cfg->stage[TSR_STAGE_BACKEND]);
    ck_assert_ptr_null(tsr_config_stage_at(cfg, 0, 1));
    ck_assert_ptr_null(tsr_config_stage_at(cfg, TSR_STAGE_COUNT + 1, 1));
    tsr_config_free(cfg);
}
END_TEST

START_TEST(stage_names) {
    static const char *const names[] = {NULL,    "backend", "quantizer", "attention",
                                        "cache", "decoder", "router"};
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
        ck_assert_str_eq(tsr_stage_name(s), names[s]);
        ck_assert_int_eq(tsr_stage_from_name(names[s]), s);
    }
    ck_assert_ptr_null(tsr_stage_name(0));
    ck_assert_ptr_null(tsr_stage_name(TSR_STAGE_COUNT + 1));
    ck_assert_int_eq(tsr_stage_from_name("Cache"), 0);
    ck_assert_int_eq(tsr_stage_from_name(""), 0);
    ck_assert_int_eq(tsr_stage_from_name(NULL), 0);
}
END_TEST

START_TEST(fuzz_seeds_load) {
    /* the checked-in fuzz seeds that are valid configs stay valid */
    const char *src = tsr_test_env("TESSERA_SOURCE_DIR");
    static const char *const valid[] = {"full.yaml", "block.yaml"};
    for (size_t i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/tests/fuzz/seeds/config/%s", src, valid[i]);
        tsr_config *cfg;
        tsr_error err;
        ck_assert_msg(tsr_config_load(path, &cfg, &err) == TSR_OK, "%s", err.msg);
        tsr_config_free(cfg);
    }
}
END_TEST

static Suite *config_suite(void) {
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, valid_full);
    tcase_add_test(tc, valid_minimal);
    tcase_add_test(tc, file_paths_resolve);
    tcase_add_test(tc, malformed_configs);
    tcase_add_test(tc, deep_nesting);
    tcase_add_test(tc, long_mappings_are_fast);
    tcase_add_test(tc, bind_values);
    tcase_add_test(tc, bind_fills_defaults);
    tcase_add_test(tc, default_pipeline);
    tcase_add_test(tc, set_overrides);
    tcase_add_test(tc, values_by_role);
    tcase_add_test(tc, set_invalid);
    tcase_add_test(tc, draft_section);
    tcase_add_test(tc, draft_set);
    tcase_add_test(tc, stage_at_layer);
    tcase_add_test(tc, stage_names);
    tcase_add_test(tc, fuzz_seeds_load);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return tsr_test_run_suite(config_suite());
}
