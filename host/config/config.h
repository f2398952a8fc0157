/* Pipeline configuration (YAML, read with libyaml): which plugin runs each stage, with what
 * parameters, per-layer overrides, the generate: section and hooks. See docs/config.md. */
#ifndef TSR_HOST_CONFIG_H
#define TSR_HOST_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include <tessera/common.h>

#include "base/error.h"
#include "config/params.h"

#define TSR_CONFIG_SCHEMA 1

/* One stage's choice: `plugin:` plus its parameters as text. plugin == NULL: not configured
 * (the default pipeline's choice applies). */
typedef struct tsr_stage_conf {
    char *plugin;
    tsr_src_loc loc;       /* of the plugin: value (unknown-plugin and missing-parameter
                              errors point there) */
    tsr_kv_text *params;
    size_t n_params;
    tsr_bound_params bound; /* filled by tsr_config_bind */
} tsr_stage_conf;

typedef struct tsr_layer_override {
    int32_t first, last;    /* inclusive layer range */
    tsr_src_loc loc;
    tsr_stage_conf stage[TSR_STAGE_COUNT + 1]; /* indexed by tsr_stage; only some stages may
                                                   vary per layer: quantizer, attention, cache */
} tsr_layer_override;

typedef enum tsr_hook_event {
    TSR_HOOK_AFTER_LOAD = 0,
    TSR_HOOK_AFTER_STEP = 1,
    TSR_HOOK_AT_END = 2
} tsr_hook_event;

/* hooks: - { on: after_step, stage: cache, call: dump_stats, args: ["/tmp/x"] } */
typedef struct tsr_hook_conf {
    int32_t event;       /* tsr_hook_event */
    int32_t stage;       /* tsr_stage of the plugin whose command is called */
    char *command;
    char **args;
    size_t n_args;
    tsr_src_loc loc;
} tsr_hook_conf;

typedef struct tsr_generate_conf {
    char *prompt;          /* NULL: none */
    int64_t max_tokens;    /* -1: not set */
} tsr_generate_conf;

#define TSR_PARAM_ROLE_COUNT (TSR_PARAM_ROLE_PARALLEL + 1)

/* A value for a stage's parameter given by its role (tsr_param_role) rather than its name:
 * by a command-line option (-t, --temperature, --seed, quantize's TYPE) or the generate:
 * section. Binding gives it to the parameter of that role of the stage's top-level plugin, or
 * fails naming `origin` when the plugin has none. */
typedef struct tsr_role_value {
    char *text;   /* NULL: not given */
    char *origin; /* as the user wrote it: "--temperature", "generate.seed" */
    tsr_src_loc loc;
} tsr_role_value;

typedef struct tsr_config {
    char *path;             /* the file, or "<default>" (a draft: the file it is written in) */
    int64_t schema;         /* tessera: */
    char *model_path;       /* model: { path: } relative paths resolved against the file */
    char *tokenizer_path;   /* model: { tokenizer: } */
    char **plugin_dirs;     /* plugin_dirs: [...] resolved against the file's folder */
    size_t n_plugin_dirs;
    tsr_stage_conf stage[TSR_STAGE_COUNT + 1]; /* indexed by tsr_stage; [0] unused */
    tsr_layer_override *layers;
    size_t n_layers;
    tsr_hook_conf *hooks;
    size_t n_hooks;
    tsr_generate_conf generate;
    tsr_role_value role_value[TSR_STAGE_COUNT + 1][TSR_PARAM_ROLE_COUNT];

    /* draft: the pipeline's draft model, a configuration of its own, or NULL. Its model_path
     * is NULL for a self-draft (the target's model); its stages are backend, quantizer,
     * attention, cache (and router), each the target's where the section names none (the
     * router only for a self-draft) once bound; it has no decoder, layers, hooks or generate. */
    struct tsr_config *draft;
    tsr_src_loc loc;          /* a draft's: where its section (or the --set that made it) is */
    int32_t *skip_layers;     /* a draft's: the layers its forward leaves out, as written */
    size_t n_skip_layers;
    tsr_src_loc skip_loc;     /* of the skip_layers value */
} tsr_config;

/* Stage names as used in YAML and --set: "backend", "quantizer", ... ; NULL if out of range. */
const char *tsr_stage_name(int32_t stage);
/* The inverse; 0 when unknown. */
int32_t tsr_stage_from_name(const char *name);

/* Reads and checks the shape of a YAML file (keys, types, ranges of the host's own fields).
 * Parameter values stay text until tsr_config_bind. Errors: "<file>:<line>:<col>: ...". */
tsr_status tsr_config_load(const char *path, tsr_config **out, tsr_error *err);
/* Same from a string (`name` used in messages). Relative paths are kept as written (relative
 * to the current folder). */
tsr_status tsr_config_load_string(const char *yaml, const char *name, tsr_config **out,
                                  tsr_error *err);
/* The built-in default pipeline: cpu + gguf + flash + full + sample. */
tsr_status tsr_config_default(tsr_config **out, tsr_error *err);

/* Applies "section.key=value" (e.g. "cache.window=256", "cache.plugin=streaming",
 * "generate.max_tokens=64", "model.path=x.gguf", "draft.model=d.bin", "draft.skip_layers=2,3",
 * "draft.cache.plugin=full"), as if written in the file; a draft.* key makes the draft section
 * when there is none. */
tsr_status tsr_config_set(tsr_config *cfg, const char *assignment, tsr_error *err);

/* Gives `value` to the parameter of `role` of `stage`'s top-level plugin, replacing what the
 * file or --set gave that parameter; `origin` names the option in messages. Checked when the
 * config is bound. */
tsr_status tsr_config_set_role(tsr_config *cfg, int32_t stage, int32_t role, const char *value,
                               const char *origin, tsr_error *err);

/* Looks up each configured plugin with `find` (the registry) and binds its parameters against
 * the plugin's table, for every stage, every layer override and the draft's stages (a draft
 * stage left unconfigured first gets a copy of the target's). A draft the decoder does not use
 * (tsr_decoder_vtable.draft_use) is refused, and so is a decoder that needs one without it. `find` returns NULL for an
 * unknown plugin of that stage, and may then say why in `why` (a plugin file refused, a plugin
 * of another stage), which the error line gives after the plugin's place in the config;
 * left empty, the line says "unknown plugin". A stage left unconfigured first gets the default pipeline's
 * plugin (a stage without a default, the router, stays unconfigured and unbound). Values given
 * by role (tsr_config_set_role) go to the parameter of that role. Binding again (after
 * tsr_config_set) replaces earlier bindings. */
typedef const tsr_plugin_desc *(*tsr_plugin_find_fn)(void *ctx, int32_t stage, const char *name,
                                                     tsr_error *why);
tsr_status tsr_config_bind(tsr_config *cfg, tsr_plugin_find_fn find, void *find_ctx,
                           tsr_error *err);

/* The configuration that applies to `stage` at `layer`: the last `layers:` entry whose range
 * holds the layer and which names that stage, else the top-level one. NULL for a bad stage. */
const tsr_stage_conf *tsr_config_stage_at(const tsr_config *cfg, int32_t stage, int32_t layer);

void tsr_config_free(tsr_config *cfg);

#endif
