/* Opening what the model commands share. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cli/cli_session.h"
#include "files/gguf.h"

void tsr_session_close(session *s) {
    tsr_pipeline_free(s->pl);
    tsr_tokenizer_free(s->tok);
    tsr_model_free(s->draft_model);
    tsr_model_free(s->model);
    tsr_registry_free(s->reg);
    tsr_pool_free(s->pool);
    tsr_config_free(s->cfg);
    memset(s, 0, sizeof *s);
}

char *tsr_session_read_file(const char *path, size_t *size, tsr_error *err) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f) {
        tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        tsr_error_set(err, TSR_E_INVALID, "%s: is a folder; expected a text file", path);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        if ((n += got) < cap) continue;
        char *grown = realloc(buf, cap *= 2);
        if (!grown) free(buf);
        buf = grown;
    }
    int read_errno = ferror(f) ? errno : 0;
    fclose(f);
    if (!buf) {
        tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    } else if (read_errno) {
        tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", path, strerror(read_errno));
        free(buf);
        buf = NULL;
    }
    *size = n;
    return buf;
}

tsr_status tsr_session_open_tokenizer(const char *model_path, const char *tok_path,
                                      const tsr_gguf *model_file, bool model_is_gguf,
                                      uint32_t n_vocab, tsr_tokenizer **out, tsr_error *err) {
    if (tok_path && tsr_file_is_gguf(tok_path)) {
        tsr_gguf *g = NULL;
        tsr_status st = tsr_gguf_open(tok_path, &g, err);
        if (st >= 0) st = tsr_tokenizer_from_gguf(g, out, err);
        tsr_gguf_close(g);
        return st;
    }
    if (tok_path) return tsr_tokenizer_from_llama2c(tok_path, n_vocab, out, err);
    if (!model_is_gguf)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: a llama2.c checkpoint holds no vocabulary; pass its tokenizer "
                             "with --tokenizer (e.g. tok512.bin)", model_path);
    return tsr_tokenizer_from_gguf(model_file, out, err);
}

/* A token's vocabulary text with SentencePiece's U+2581 read as the space a llama2.c
 * tok*.bin stores, into buf; its length. */
static size_t plain_token_text(const tsr_tokenizer *tok, int32_t id, char *buf, size_t cap) {
    tsr_tok_str t = tsr_token_text(tok, id);
    size_t n = 0;
    for (size_t i = 0; i < t.len && n + 1 < cap; i++) {
        if (i + 2 < t.len && !memcmp(t.ptr + i, "\xe2\x96\x81", 3)) {
            buf[n++] = ' ';
            i += 2;
        } else {
            buf[n++] = t.ptr[i];
        }
    }
    buf[n] = '\0';
    return n;
}

/* The first token whose text differs between two vocabularies of one size, or -1. Control
 * tokens (BOS, EOS) are compared by kind only: files decorate their texts differently. */
static int32_t first_vocab_difference(const tsr_tokenizer *a, const tsr_tokenizer *b,
                                      char *text_a, char *text_b, size_t cap) {
    for (int32_t id = 0; id < (int32_t)tsr_tokenizer_n_vocab(a); id++) {
        bool ca = tsr_token_get_type(a, id) == TSR_TOKEN_TYPE_CONTROL;
        bool cb = tsr_token_get_type(b, id) == TSR_TOKEN_TYPE_CONTROL;
        if (ca && cb) continue;
        size_t na = plain_token_text(a, id, text_a, cap), nb = plain_token_text(b, id, text_b, cap);
        if (ca != cb || na != nb || memcmp(text_a, text_b, na) != 0) return id;
    }
    return -1;
}

/* draft.model, which must share the target's vocabulary: its size, and the token texts when
 * the draft has a vocabulary of its own (a GGUF's, or draft.tokenizer); a llama2.c draft
 * without draft.tokenizer reads with the target's tokenizer. */
static tsr_status open_draft(session *s, tsr_error *err) {
    const tsr_config *d = s->cfg->draft;
    tsr_status st = tsr_model_load(d->model_path, &s->draft_model, err);
    if (st < 0) return st;
    const tsr_model *dm = s->draft_model;
    if (dm->hp.n_vocab != s->model->hp.n_vocab)
        return tsr_error_set(err, TSR_E_INVALID, "draft.model: %s has %d tokens and the target "
                             "model %d: a draft must share the target's vocabulary",
                             d->model_path, dm->hp.n_vocab, s->model->hp.n_vocab);
    if (dm->from_llama2c && !d->tokenizer_path) return TSR_OK;
    tsr_tokenizer *dtok = NULL;
    if ((st = tsr_session_open_tokenizer(d->model_path, d->tokenizer_path, dm->file,
                                         !dm->from_llama2c, (uint32_t)dm->hp.n_vocab, &dtok,
                                         err)) < 0)
        return st;
    const char *vocab_file = d->tokenizer_path ? d->tokenizer_path : d->model_path;
    char mine[256], theirs[256], ex_mine[96], ex_theirs[96];
    int32_t id;
    if (tsr_tokenizer_n_vocab(dtok) != tsr_tokenizer_n_vocab(s->tok))
        st = tsr_error_set(err, TSR_E_INVALID, "draft.tokenizer: %s has %u tokens and the draft "
                           "model %d", vocab_file, tsr_tokenizer_n_vocab(dtok), dm->hp.n_vocab);
    else if ((id = first_vocab_difference(dtok, s->tok, mine, theirs, sizeof mine)) >= 0)
        st = tsr_error_set(err, TSR_E_INVALID, "draft.model: %s: token %d is '%s' there and '%s' "
                           "in the target's vocabulary: a draft must share the target's "
                           "vocabulary", vocab_file, id,
                           tsr_text_excerpt(ex_mine, sizeof ex_mine, mine),
                           tsr_text_excerpt(ex_theirs, sizeof ex_theirs, theirs));
    tsr_tokenizer_free(dtok);
    return st;
}

tsr_status tsr_session_open(session *s, const model_opts *o, tsr_error *err) {
    memset(s, 0, sizeof *s);
    tsr_status st = o->config ? tsr_config_load(o->config, &s->cfg, err)
                              : tsr_config_default(&s->cfg, err);
    if (st < 0) return st;
    for (size_t i = 0; i < o->n_sets; i++)
        if ((st = tsr_config_set(s->cfg, o->sets[i], err)) < 0) return st;
    if (o->threads > 0) {
        char threads[32];
        snprintf(threads, sizeof threads, "%d", o->threads);
        if ((st = tsr_config_set_role(s->cfg, TSR_STAGE_BACKEND, TSR_PARAM_ROLE_THREADS, threads,
                                      "-t", err)) < 0)
            return st;
    }
    for (size_t i = 0; i < o->n_roles; i++)
        if ((st = tsr_config_set_role(s->cfg, o->roles[i].stage, o->roles[i].role,
                                      o->roles[i].value, o->roles[i].option, err)) < 0)
            return st;
    s->reg = tsr_cli_registry(NULL, &o->plugin_dirs, s->cfg);
    if ((st = tsr_cli_bind(s->cfg, s->reg, err)) < 0) return st;

    const char *model_path = o->model ? o->model : s->cfg->model_path;
    if (!model_path)
        return tsr_error_set(err, TSR_E_INVALID, "no model given: pass -m MODEL or set model.path "
                             "in the config");
    uint64_t t0 = tsr_clock_ns();
    if ((st = tsr_model_load(model_path, &s->model, err)) < 0) return st;
    const char *tok_path = o->tokenizer ? o->tokenizer : s->cfg->tokenizer_path;
    if ((st = tsr_session_open_tokenizer(model_path, tok_path, s->model->file, !s->model->from_llama2c,
                             (uint32_t)s->model->hp.n_vocab, &s->tok, err)) < 0)
        return st;
    if (tsr_tokenizer_n_vocab(s->tok) != (uint32_t)s->model->hp.n_vocab)
        return tsr_error_set(err, TSR_E_INVALID, "%s: the tokenizer has %u tokens but the model "
                             "%d", tok_path ? tok_path : model_path, tsr_tokenizer_n_vocab(s->tok),
                             s->model->hp.n_vocab);
    if (s->cfg->draft && s->cfg->draft->model_path && (st = open_draft(s, err)) < 0) return st;
    /* The pool exists only now: its size comes from the bound backend parameters. */
    s->pool = tsr_pool_create(tsr_config_threads(s->cfg));
    tsr_log(TSR_LOG_INFO, "run", "model %s loaded in %.3f s", model_path, tsr_clock_seconds_since(t0));
    return TSR_OK;
}

static void show_progress(void *ctx, const char *what, int64_t done, int64_t total) {
    tsr_cli_progress *p = ctx;
    p->what = what;
    tsr_cli_progress_show(p, done, total, NULL, NULL);
}

tsr_status tsr_session_pipeline(session *s, int64_t n_ctx, tsr_error *err) {
    if (n_ctx > INT32_MAX)
        return tsr_error_set(err, TSR_E_RANGE, "%lld positions (prompt and new tokens) are more "
                             "than a context can hold (%d)", (long long)n_ctx, INT32_MAX);
    if (n_ctx > s->model->hp.n_ctx_train)
        fprintf(stderr, "tessera: warning: %lld positions (prompt and new tokens) are more than "
                "the model was trained on (%d); quality may fall beyond them\n",
                (long long)n_ctx, s->model->hp.n_ctx_train);
    if (s->draft_model && n_ctx > s->draft_model->hp.n_ctx_train)
        fprintf(stderr, "tessera: warning: %lld positions (prompt and new tokens) are more than "
                "the draft model was trained on (%d); its drafts may be accepted less beyond "
                "them\n", (long long)n_ctx, s->draft_model->hp.n_ctx_train);
    /* Preparing weights takes a while only for large models: quiet for the first second. */
    tsr_cli_progress progress;
    tsr_cli_progress_start(&progress, "", 1.0);
    tsr_progress_set(show_progress, &progress);
    tsr_status st = tsr_pipeline_create(s->cfg, s->reg, s->model, s->draft_model, s->pool,
                                        (int32_t)n_ctx, &s->pl, err);
    tsr_progress_set(NULL, NULL);
    tsr_cli_progress_end(&progress);
    if (st < 0) return st;
    tsr_log(TSR_LOG_INFO, "run", "pipeline ready in %.3f s", tsr_clock_seconds_since(progress.t0));
    return tsr_pipeline_run_hooks(s->pl, TSR_HOOK_AFTER_LOAD, err);
}

int64_t tsr_session_chunk_count(size_t n_ids, int64_t len, int64_t max_chunks) {
    int64_t n_chunks = (int64_t)n_ids / len;
    return max_chunks >= 0 && max_chunks < n_chunks ? max_chunks : n_chunks;
}

tsr_status tsr_session_run_chunks(session *s, const int32_t *ids, int64_t len, int64_t n_chunks,
                                  const char *what, tsr_error *err) {
    const int32_t bos = tsr_tokenizer_bos(s->tok);
    const bool add_bos = tsr_tokenizer_add_bos(s->tok) && bos >= 0;
    tsr_batch_entry *batch = calloc((size_t)len, sizeof *batch);
    float *logits = malloc((size_t)s->model->hp.n_vocab * sizeof *logits);
    if (!batch || !logits) {
        free(batch);
        free(logits);
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for chunks of %lld tokens",
                             what, (long long)len);
    }
    tsr_status st = TSR_OK;
    tsr_cli_progress progress;
    tsr_cli_progress_start(&progress, what, 0);
    for (int64_t c = 0; c < n_chunks && st >= 0; c++) {
        const int32_t *chunk = ids + c * len;
        for (int64_t j = 0; j < len; j++)
            batch[j] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)j,
                                         .token = j == 0 && add_bos ? bos : chunk[j],
                                         .want_logits = j == len - 1};
        if ((st = tsr_pipeline_seq_begin(s->pl, 0, err)) < 0) break;
        st = tsr_pipeline_forward(s->pl, batch, len, logits, err);
        tsr_pipeline_seq_end(s->pl, 0);
        tsr_cli_progress_show(&progress, c + 1, n_chunks, "chunks", NULL);
    }
    tsr_cli_progress_end(&progress);
    free(batch);
    free(logits);
    return st;
}

void tsr_session_set_role(model_opts *o, int32_t stage, int32_t role, const char *value,
                          const char *option) {
    size_t i = 0;
    while (i < o->n_roles && (o->roles[i].stage != stage || o->roles[i].role != role)) i++;
    if (i == o->n_roles) o->n_roles++;
    o->roles[i] = (role_opt){stage, role, value, option};
}

int tsr_session_take_opt(const char *cmd, int argc, char **argv, int *i, model_opts *o) {
    const char *set = NULL;
    int64_t threads = 0;
    const tsr_cli_text_opt texts[] = {{"-m", "--model", "MODEL", &o->model},
                                      {"--tokenizer", NULL, "FILE", &o->tokenizer},
                                      {"--set", NULL, "SECTION.KEY=VALUE", &set}};
    const tsr_cli_int_opt ints[] = {
        {"-t", "--threads", "THREADS", 1, TSR_CLI_THREADS_MAX, &threads}};
    int took = tsr_cli_take_plugin_dir(cmd, argc, argv, i, &o->plugin_dirs);
    if (took == 0) took = tsr_cli_take_text(cmd, argc, argv, i, texts, 3);
    if (took == 0) took = tsr_cli_take_int(cmd, argc, argv, i, ints, 1);
    if (set) o->sets[o->n_sets++] = set;
    if (threads) o->threads = (int)threads;
    if (took == 0 && argv[*i][0] != '-' && !o->config) {
        o->config = argv[*i];
        took = 1;
    }
    return took;
}

json_t *tsr_session_cache_json(const tsr_cache_stats *s, int n_policies) {
    if (n_policies <= 0) return json_null();
    return json_pack("{s:i, s:I, s:I, s:I, s:I, s:o}", "policies", n_policies, "entries",
                     (json_int_t)s->entries, "evicted", (json_int_t)s->evicted, "kv_bytes",
                     (json_int_t)s->bytes_reserved, "kv_bytes_peak", (json_int_t)s->bytes_peak,
                     "bits_per_value",
                     s->bits_per_value > 0 ? json_real(s->bits_per_value) : json_null());
}
