/* `tessera run`, `tessera logits` and `tessera tokenize`: the commands that read a model. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli_session.h"
#include "files/gguf.h"
#include "files/llama2c.h"
#include "model/model.h"
#include "pipeline/pipeline.h"
#include "tokenizer/tokenizer.h"

/* ---- run ------------------------------------------------------------------------------- */

typedef struct printer {
    const tsr_tokenizer *tok;
    int32_t prev;
} printer;

static void print_tokens(void *ctx, const int32_t *tokens, int64_t n) {
    printer *p = ctx;
    char buf[256];
    for (int64_t i = 0; i < n; i++) {
        int64_t len = tsr_token_to_piece(p->tok, p->prev, tokens[i], buf, sizeof buf);
        if (len > (int64_t)sizeof buf) len = (int64_t)sizeof buf;
        if (len > 0) fwrite(buf, 1, (size_t)len, stdout);
        p->prev = tokens[i];
    }
    fflush(stdout);
}

typedef struct eog_ctx {
    const tsr_tokenizer *tok;
    bool llama2c; /* run.c stops at BOS (id 1), its end-of-text marker */
} eog_ctx;

static int32_t is_eog(void *ctx, int32_t token) {
    eog_ctx *e = ctx;
    if (e->llama2c) return token == 1;
    return tsr_token_is_eog(e->tok, token) ? 1 : 0;
}

static void run_usage(FILE *f) {
    fprintf(f,
            "usage: tessera run [CONFIG.yaml] -m MODEL [--tokenizer FILE] [-p PROMPT]\n"
            "                   [-n NEW_TOKENS] [--temperature T] [--seed S] [-t THREADS]\n"
            "                   [--set SECTION.KEY=VALUE]... [--plugin-dir DIR]...\n"
            "Prints the prompt, then each new token as it is made, to stdout; timings go to\n"
            "stderr. Without CONFIG the built-in pipeline runs (cpu, gguf, flash, full,\n"
            "sample). --temperature 0 is greedy. Generation stops after NEW_TOKENS (default\n"
            "the config's generate.max_tokens, else 256) or at the model's end token.\n"
            "--plugin-dir DIR is searched for plugins before the other folders (see\n"
            "`tessera plugins --help`).\n");
}

int tsr_cli_run(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 2, sizeof(char *))};
    const char *prompt = NULL;
    long long n_new = -1;
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            run_usage(stdout);
            free(o.sets);
            return TSR_EXIT_OK;
        }
        int took = tsr_session_take_opt(argc, argv, &i, &o);
        if (took == 1) continue;
        bool has_value = i + 1 < argc;
        if (took == 0 && has_value && !strcmp(argv[i], "-p")) prompt = argv[++i];
        else if (took == 0 && has_value && !strcmp(argv[i], "-n")) {
            char *end;
            n_new = strtoll(argv[++i], &end, 10);
            if (*end || n_new < 0) took = -1;
        } else if (took == 0 && has_value &&
                   (!strcmp(argv[i], "--temperature") || !strcmp(argv[i], "--seed"))) {
            bool temp = !strcmp(argv[i], "--temperature");
            tsr_session_set_role(&o, TSR_STAGE_DECODER,
                                 temp ? TSR_PARAM_ROLE_TEMPERATURE : TSR_PARAM_ROLE_SEED,
                                 argv[i + 1], argv[i]);
            i++;
        } else {
            took = -1;
        }
        if (took < 0) {
            tsr_cli_error("run: bad argument '%s' (see tessera run --help)", argv[i]);
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }

    session s;
    tsr_error err;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int status = TSR_EXIT_FAIL;
    if (tsr_session_open(&s, &o, &err) < 0) goto fail;
    if (!prompt) prompt = s.cfg->generate.prompt ? s.cfg->generate.prompt : "";
    if (n_new < 0) n_new = s.cfg->generate.max_tokens >= 0 ? s.cfg->generate.max_tokens : 256;
    if (tsr_tokenize(s.tok, prompt, strlen(prompt), true, false, &ids, &n_ids, &err) < 0) goto fail;
    if (n_ids == 0) {
        tsr_error_set(&err, TSR_E_INVALID, "the prompt is empty and the model adds no BOS token: "
                      "give a prompt with -p");
        goto fail;
    }
    if (tsr_session_pipeline(&s, (int32_t)(n_ids + (size_t)n_new), &err) < 0) goto fail;

    printer p = {.tok = s.tok, .prev = -1};
    print_tokens(&p, ids, (int64_t)n_ids);
    eog_ctx e = {.tok = s.tok, .llama2c = tsr_tokenizer_get_kind(s.tok) == TSR_TOKENIZER_LLAMA2C};
    uint64_t t0 = tsr_clock_ns();
    int64_t n_gen = 0;
    tsr_status st = tsr_pipeline_generate(s.pl, ids, (int64_t)n_ids, n_new, is_eog, &e,
                                          print_tokens, &p, &n_gen, &err);
    double secs = tsr_clock_seconds_since(t0);
    fputc('\n', stdout);
    fflush(stdout);
    if (st < 0) goto fail;
    const tsr_stage_times *t = tsr_pipeline_times(s.pl);
    fprintf(stderr,
            "tessera: %zu prompt + %lld new tokens in %.3f s (%.1f tokens/s); matmul %.1f ms, "
            "attention %.1f ms, cache %.1f ms, decoder %.1f ms, other %.1f ms\n",
            n_ids, (long long)n_gen, secs, secs > 0 ? (double)(n_ids + (size_t)n_gen) / secs : 0.0,
            (double)t->matmul * 1e-6, (double)t->attention * 1e-6, (double)t->cache * 1e-6,
            (double)t->decoder * 1e-6, (double)t->other_ops * 1e-6);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    free(ids);
    tsr_session_close(&s);
    free(o.sets);
    return status;
}

/* ---- logits ---------------------------------------------------------------------------- */

/* Parses "1 2 3" (spaces, tabs or commas between ids). */
static tsr_status parse_ids(const char *text, int32_t **out, size_t *n, tsr_error *err) {
    size_t cap = 16;
    int32_t *ids = malloc(cap * sizeof *ids);
    *n = 0;
    const char *p = text;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            free(ids);
            return tsr_error_set(err, TSR_E_INVALID, "--tokens: '%.20s' is not a token id", p);
        }
        if (*n == cap) ids = realloc(ids, (cap *= 2) * sizeof *ids);
        ids[(*n)++] = (int32_t)v;
        p = end;
    }
    if (*n == 0) {
        free(ids);
        return tsr_error_set(err, TSR_E_INVALID, "--tokens: no token ids given");
    }
    *out = ids;
    return TSR_OK;
}

/* Writes through a temporary file renamed into place, so a failure leaves no partial file. */
static tsr_status write_atomic(const char *path, const void *data, size_t size, tsr_error *err) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return tsr_error_set(err, TSR_E_IO, "%s: cannot create: %s", path, strerror(errno));
    bool ok = fwrite(data, 1, size, f) == size;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return tsr_error_set(err, TSR_E_IO, "%s: cannot write: %s", path, strerror(e));
    }
    return TSR_OK;
}

int tsr_cli_logits(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    const char *tokens = NULL, *out_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera logits -m MODEL [CONFIG.yaml] --tokens \"ID ID ...\" --out FILE\n"
                   "              [--tokenizer FILE] [-t THREADS] [--set K=V]...\n"
                   "              [--plugin-dir DIR]...\n"
                   "Runs the ids as one batch from an empty cache and writes the logits of every\n"
                   "position as raw little-endian float32 [n_tokens][n_vocab].\n");
            free(o.sets);
            return TSR_EXIT_OK;
        }
        int took = tsr_session_take_opt(argc, argv, &i, &o);
        if (took == 1) continue;
        if (took == 0 && i + 1 < argc && !strcmp(argv[i], "--tokens")) tokens = argv[++i];
        else if (took == 0 && i + 1 < argc && !strcmp(argv[i], "--out")) out_path = argv[++i];
        else {
            tsr_cli_error("logits: bad argument '%s' (see tessera logits --help)", argv[i]);
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    if (!tokens || !out_path) {
        tsr_cli_error("logits: --tokens and --out are required (see tessera logits --help)");
        free(o.sets);
        return TSR_EXIT_USAGE;
    }
    session s;
    tsr_error err;
    int32_t *ids = NULL;
    size_t n = 0;
    tsr_batch_entry *batch = NULL;
    float *logits = NULL;
    int status = TSR_EXIT_FAIL;
    if (parse_ids(tokens, &ids, &n, &err) < 0) {
        memset(&s, 0, sizeof s);
        goto fail;
    }
    if (tsr_session_open(&s, &o, &err) < 0) goto fail;
    if (tsr_session_pipeline(&s, (int32_t)n, &err) < 0) goto fail;
    int32_t nv = s.model->hp.n_vocab;
    batch = calloc(n, sizeof *batch);
    logits = malloc(n * (size_t)nv * sizeof *logits);
    for (size_t i = 0; i < n; i++)
        batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = ids[i], .want_logits = 1};
    if (tsr_pipeline_seq_begin(s.pl, 0, &err) < 0) goto fail;
    if (tsr_pipeline_forward(s.pl, batch, (int64_t)n, logits, &err) < 0) goto fail;
    if (write_atomic(out_path, logits, n * (size_t)nv * sizeof *logits, &err) < 0) goto fail;
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    free(batch);
    free(logits);
    free(ids);
    tsr_session_close(&s);
    free(o.sets);
    return status;
}

/* ---- tokenize -------------------------------------------------------------------------- */

int tsr_cli_tokenize(int argc, char **argv) {
    const char *model_path = NULL, *tok_path = NULL, *text = NULL, *file = NULL;
    bool bos = true;
    for (int i = 1; i < argc; i++) {
        bool has_value = i + 1 < argc;
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera tokenize -m MODEL [--tokenizer FILE] (-p TEXT | -f FILE) "
                   "[--no-bos]\n"
                   "Prints the token ids of the text, space-separated, on one line. -f reads the\n"
                   "file's bytes exactly as they are. MODEL may be a vocabulary-only GGUF.\n");
            return TSR_EXIT_OK;
        }
        if (has_value && (!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model"))) model_path = argv[++i];
        else if (has_value && !strcmp(argv[i], "--tokenizer")) tok_path = argv[++i];
        else if (has_value && !strcmp(argv[i], "-p")) text = argv[++i];
        else if (has_value && !strcmp(argv[i], "-f")) file = argv[++i];
        else if (!strcmp(argv[i], "--no-bos")) bos = false;
        else {
            tsr_cli_error("tokenize: bad argument '%s' (see tessera tokenize --help)", argv[i]);
            return TSR_EXIT_USAGE;
        }
    }
    if (!model_path || (!text) == (!file)) {
        tsr_cli_error("tokenize: give -m MODEL and exactly one of -p TEXT or -f FILE");
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    tsr_gguf *g = NULL;
    tsr_tokenizer *tok = NULL;
    char *buf = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0, len = 0;
    int status = TSR_EXIT_FAIL;
    bool is_gguf = tsr_file_is_gguf(model_path);
    uint32_t n_vocab = 0;
    /* A vocabulary-only GGUF has no tensors, so only the file is opened, not a model. */
    if (is_gguf && tsr_gguf_open(model_path, &g, &err) < 0) goto fail;
    if (!is_gguf) {
        if (tsr_llama2c_open(model_path, &g, &err) < 0) goto fail;
        n_vocab = (uint32_t)tsr_gguf_u64_or(g, "llama.vocab_size", 0);
    }
    if (tsr_session_open_tokenizer(model_path, tok_path, g, is_gguf, n_vocab, &tok, &err) < 0) goto fail;
    if (file) {
        if (!(buf = tsr_session_read_file(file, &len, &err))) goto fail;
        text = buf;
    } else {
        len = strlen(text);
    }
    if (tsr_tokenize(tok, text, len, bos, false, &ids, &n_ids, &err) < 0) goto fail;
    for (size_t i = 0; i < n_ids; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    free(ids);
    free(buf);
    tsr_tokenizer_free(tok);
    tsr_gguf_close(g);
    return status;
}
