/* Opening what the model commands share. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_session.h"
#include "files/gguf.h"

void tsr_session_close(session *s) {
    tsr_pipeline_free(s->pl);
    tsr_tokenizer_free(s->tok);
    tsr_model_free(s->model);
    tsr_registry_free(s->reg);
    tsr_pool_free(s->pool);
    tsr_config_free(s->cfg);
    memset(s, 0, sizeof *s);
}

char *tsr_session_read_file(const char *path, size_t *size, tsr_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0)
        if ((n += got) == cap) buf = realloc(buf, cap *= 2);
    fclose(f);
    if (!buf) tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
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
    /* The pool exists only now: its size comes from the bound backend parameters. */
    s->pool = tsr_pool_create(tsr_config_threads(s->cfg));
    tsr_log(TSR_LOG_INFO, "run", "model %s loaded in %.3f s", model_path, tsr_clock_seconds_since(t0));
    return TSR_OK;
}

/* A progress line on stderr, only once loading has taken more than a second. */
static void show_progress(void *ctx, const char *what, int64_t done, int64_t total) {
    const uint64_t *t0 = ctx;
    if (tsr_clock_seconds_since(*t0) < 1.0) return;
    fprintf(stderr, "\rtessera: %s %lld/%lld%s", what, (long long)done, (long long)total,
            done == total ? "\n" : "");
}

tsr_status tsr_session_pipeline(session *s, int32_t n_ctx, tsr_error *err) {
    uint64_t t0 = tsr_clock_ns();
    tsr_progress_set(show_progress, &t0);
    tsr_status st = tsr_pipeline_create(s->cfg, s->reg, s->model, s->pool, n_ctx, &s->pl, err);
    tsr_progress_set(NULL, NULL);
    if (st < 0) return st;
    tsr_log(TSR_LOG_INFO, "run", "pipeline ready in %.3f s", tsr_clock_seconds_since(t0));
    return tsr_pipeline_run_hooks(s->pl, TSR_HOOK_AFTER_LOAD, err);
}

void tsr_session_set_role(model_opts *o, int32_t stage, int32_t role, const char *value,
                          const char *option) {
    size_t i = 0;
    while (i < o->n_roles && (o->roles[i].stage != stage || o->roles[i].role != role)) i++;
    if (i == o->n_roles) o->n_roles++;
    o->roles[i] = (role_opt){stage, role, value, option};
}

int tsr_session_take_opt(int argc, char **argv, int *i, model_opts *o) {
    int took = tsr_cli_take_plugin_dir(argc, argv, i, &o->plugin_dirs);
    if (took != 0) return took;
    const char *a = argv[*i];
    bool has_value = *i + 1 < argc;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (!has_value) return -1;
        o->model = argv[++*i];
    } else if (!strcmp(a, "--tokenizer")) {
        if (!has_value) return -1;
        o->tokenizer = argv[++*i];
    } else if (!strcmp(a, "--set")) {
        if (!has_value) return -1;
        o->sets[o->n_sets++] = argv[++*i];
    } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        if (!has_value) return -1;
        o->threads = atoi(argv[++*i]);
        if (o->threads <= 0) return -1;
    } else if (a[0] != '-' && !o->config) {
        o->config = a;
    } else {
        return 0;
    }
    return 1;
}
