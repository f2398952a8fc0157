/* What the model-reading commands (run, logits, bench, perplexity, quantize) share: the
 * options that pick a pipeline and a model, and opening them in dependency order. */
#ifndef TSR_HOST_CLI_SESSION_H
#define TSR_HOST_CLI_SESSION_H

#include "base/clock.h"
#include "cli/cli.h"
#include "model/model.h"
#include "pipeline/pipeline.h"
#include "tokenizer/tokenizer.h"

/* Everything a model command needs, opened in dependency order and closed in reverse. */
typedef struct session {
    tsr_config *cfg;
    tsr_pool *pool;
    tsr_registry *reg;
    tsr_model *model;
    tsr_tokenizer *tok;
    tsr_model *draft_model; /* draft.model's, or NULL (no draft, or a self-draft) */
    tsr_pipeline *pl;
} session;

/* An option that sets a stage's parameter by its role (-t, --temperature, --seed). */
typedef struct role_opt {
    int32_t stage, role;
    const char *value;
    const char *option; /* as typed, for messages */
} role_opt;

/* Options shared by the model commands. */
typedef struct model_opts {
    const char *config;
    const char *model;
    const char *tokenizer;
    const char **sets; /* room for argc entries */
    size_t n_sets;
    int threads;     /* 0: from the config */
    role_opt roles[TSR_STAGE_COUNT * TSR_PARAM_ROLE_COUNT];
    size_t n_roles;
    tsr_cli_plugin_dirs plugin_dirs; /* --plugin-dir */
} model_opts;

/* The cache policies' statistics (tsr_pipeline_cache_stats: `s`, summed over `n_policies`
 * reporting) as the JSON of run and bench: policies, entries, evicted, kv_bytes,
 * kv_bytes_peak and bits_per_value (null when a policy does not say); JSON null when no policy
 * reports. */
struct json_t;
struct json_t *tsr_session_cache_json(const tsr_cache_stats *s, int n_policies);

/* Records an option that sets `stage`'s parameter of `role`; a later one replaces it. */
void tsr_session_set_role(model_opts *o, int32_t stage, int32_t role, const char *value,
                          const char *option);

/* The most threads -t takes (the cpu backend's own limit). */
#define TSR_CLI_THREADS_MAX 256

/* Parses one shared option of command `cmd` at argv[*i] (CONFIG, -m, --tokenizer, --set, -t,
 * --plugin-dir);
 * returns 1 when it was one, 0 when not, -1 on a usage error (printed). */
int tsr_session_take_opt(const char *cmd, int argc, char **argv, int *i, model_opts *o);

/* Config (or the default pipeline), --set overrides, the plugins, the model, its tokenizer,
 * the draft model (draft.model) checked against the target's vocabulary, and the thread pool.
 * The pipeline comes later, once the caller knows its context. */
tsr_status tsr_session_open(session *s, const model_opts *o, tsr_error *err);
/* A tokenizer file given with --tokenizer is a llama2.c tok*.bin or a GGUF holding a
 * vocabulary; without one, the model file's own vocabulary (`model_file`). */
tsr_status tsr_session_open_tokenizer(const char *model_path, const char *tok_path,
                                      const tsr_gguf *model_file, bool model_is_gguf,
                                      uint32_t n_vocab, tsr_tokenizer **out, tsr_error *err);

/* The pipeline for n_ctx positions (the longest sequence the command runs: prompt and new
 * tokens), then the after_load hooks. More positions than a context can hold (int32) are
 * refused; more than the model (or the draft model) was trained on (n_ctx_train) get a
 * one-line warning, since a streaming cache may go beyond them. */
tsr_status tsr_session_pipeline(session *s, int64_t n_ctx, tsr_error *err);
void tsr_session_close(session *s);

/* How many whole chunks of `len` tokens n_ids tokens hold, at most max_chunks (negative: no
 * limit): the text commands' --ctx and --chunks. */
int64_t tsr_session_chunk_count(size_t n_ids, int64_t len, int64_t max_chunks);

/* Runs the first n_chunks * len tokens of `ids` as chunks of `len`, each one forward from an
 * empty cache whose first token is BOS when the tokenizer adds one (how the text commands cut
 * a text), with progress shown as `what`. The pipeline must hold `len` positions. */
tsr_status tsr_session_run_chunks(session *s, const int32_t *ids, int64_t len, int64_t n_chunks,
                                  const char *what, tsr_error *err);

/* A whole file's bytes as they are (malloc'd; *size its length), for -f arguments; NULL with
 * err filled when it cannot be read or is a folder. FIFOs and devices (/dev/stdin) are read
 * to their end. */
char *tsr_session_read_file(const char *path, size_t *size, tsr_error *err);

#endif
