/* `tessera run`, `tessera logits` and `tessera tokenize`: the commands that read a model. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/number.h"
#include "cli/cli_session.h"
#include "plugin/host_services.h"
#include "base/outfile.h"
#include "files/gguf.h"
#include "model/model.h"
#include "pipeline/pipeline.h"
#include "tokenizer/tokenizer.h"

/* ---- run ------------------------------------------------------------------------------- */

/* One continuation's text, kept for --json or for printing several side by side: the
 * prompt's text, then the sequence's tokens. */
typedef struct seq_text {
    int64_t seq_id;
    int32_t prev;    /* the last token, for the next piece */
    char *text;      /* malloc'd */
    size_t len, cap;
    int64_t n_new;
} seq_text;

/* Where the tokens go: printed as they come, or kept (--json, several continuations) and
 * printed at the end. */
typedef struct printer {
    const tsr_tokenizer *tok;
    bool keep;
    seq_text prompt;  /* the prompt's text and last token, every kept text's start */
    seq_text *seqs;   /* keep: one per sequence, in order of first emission */
    size_t n_seqs, cap_seqs;
    bool oom;
    tsr_pipeline *pl; /* set once generation starts: the cache is read after each step */
    tsr_cache_stats cache;
    int n_cache_reporting;
} printer;

static void keep_bytes(printer *p, seq_text *t, const char *bytes, size_t n) {
    if (t->len + n > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->len + n) cap *= 2;
        char *grown = realloc(t->text, cap);
        if (!grown) {
            p->oom = true;
            return;
        }
        t->text = grown;
        t->cap = cap;
    }
    if (n) memcpy(t->text + t->len, bytes, n);
    t->len += n;
}

/* The kept text of sequence `seq_id`, begun with the prompt's at its first token. */
static seq_text *text_of(printer *p, int64_t seq_id) {
    for (size_t i = 0; i < p->n_seqs; i++)
        if (p->seqs[i].seq_id == seq_id) return &p->seqs[i];
    if (p->n_seqs == p->cap_seqs) {
        size_t cap = p->cap_seqs ? 2 * p->cap_seqs : 4;
        seq_text *grown = realloc(p->seqs, cap * sizeof *grown);
        if (!grown) return NULL;
        p->seqs = grown;
        p->cap_seqs = cap;
    }
    seq_text *t = &p->seqs[p->n_seqs++];
    *t = (seq_text){.seq_id = seq_id, .prev = p->prompt.prev};
    keep_bytes(p, t, p->prompt.text, p->prompt.len);
    return t;
}

/* Appends the pieces of `tokens` to `t`, or prints them when `t` is NULL (streaming). */
static void put_tokens(printer *p, seq_text *t, const int32_t *tokens, int64_t n) {
    char buf[256];
    for (int64_t i = 0; i < n; i++) {
        int64_t len = tsr_token_to_piece(p->tok, t->prev, tokens[i], buf, sizeof buf);
        if (len > (int64_t)sizeof buf) len = (int64_t)sizeof buf;
        if (len > 0 && p->keep) keep_bytes(p, t, buf, (size_t)len);
        else if (len > 0) fwrite(buf, 1, (size_t)len, stdout);
        t->prev = tokens[i];
    }
}

static void print_tokens(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n) {
    printer *p = ctx;
    seq_text *t = p->keep ? text_of(p, seq_id) : &p->prompt;
    if (!t) {
        p->oom = true;
        return;
    }
    put_tokens(p, t, tokens, n);
    t->n_new += n;
    if (!p->keep) tsr_cli_flush_stdout();
    /* After the last step the sequence is freed: what the cache held is read while it lives. */
    if (p->pl) p->n_cache_reporting = tsr_pipeline_cache_stats(p->pl, &p->cache);
}

static int seq_text_order(const void *a, const void *b) {
    int64_t x = ((const seq_text *)a)->seq_id, y = ((const seq_text *)b)->seq_id;
    return (x > y) - (x < y);
}

/* The kept texts in order of sequence id; the prompt alone when nothing was emitted. */
static void finish_texts(printer *p) {
    if (p->n_seqs == 0 && !text_of(p, 0)) p->oom = true;
    qsort(p->seqs, p->n_seqs, sizeof *p->seqs, seq_text_order);
}

static void printer_free(printer *p) {
    for (size_t i = 0; i < p->n_seqs; i++) free(p->seqs[i].text);
    free(p->seqs);
    free(p->prompt.text);
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

/* Bytes of one valid UTF-8 sequence at s (n bytes left), or 0 when s starts none. */
static size_t utf8_sequence(const unsigned char *s, size_t n) {
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t len;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0; /* overlong */
        if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90; /* overlong */
        if (c == 0xF4) hi = 0x8F; /* beyond U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return len;
}

/* A JSON string of the text: tokens may end inside a character or be bytes that are no text
 * at all; each byte that does not start valid UTF-8 becomes U+FFFD, as a terminal shows it. */
static json_t *json_text(const char *text, size_t n) {
    char *clean = malloc(3 * n + 1);
    if (!clean) return NULL;
    size_t out = 0;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_sequence((const unsigned char *)text + i, n - i);
        if (len == 0) {
            memcpy(clean + out, "\xEF\xBF\xBD", 3);
            out += 3;
            i++;
        } else {
            memcpy(clean + out, text + i, len);
            out += len;
            i += len;
        }
    }
    json_t *s = json_stringn(clean, out);
    free(clean);
    return s;
}

/* Bits per K or V element the policies store (their own figure, tsr_cache_stats); unknown
 * (negative) when one of them does not say. */
static double bits_per_value(const printer *p) {
    return p->cache.bits_per_value > 0 ? p->cache.bits_per_value : -1;
}

static void log_cache(const printer *p) {
    if (p->n_cache_reporting == 0) {
        tsr_log(TSR_LOG_INFO, "run", "cache: the policies report no statistics");
        return;
    }
    double bits = bits_per_value(p);
    char bits_text[64] = "";
    if (bits >= 0) snprintf(bits_text, sizeof bits_text, ", %.2f bits per stored value", bits);
    tsr_log(TSR_LOG_INFO, "run", "cache: %lld entries, %lld evicted, %llu KV bytes (peak %llu)%s",
            (long long)p->cache.entries, (long long)p->cache.evicted,
            (unsigned long long)p->cache.bytes_reserved, (unsigned long long)p->cache.bytes_peak,
            bits_text);
}

/* Acceptance at draft position i (0: the first drafted token), or -1 when none was proposed
 * there. */
static double acceptance_at(const tsr_decoder_stats *d, int i) {
    return d->proposed_at[i] > 0 ? (double)d->accepted_at[i] / (double)d->proposed_at[i] : -1;
}

/* The last draft position anything was proposed at, plus one. */
static int draft_positions(const tsr_decoder_stats *d) {
    int n = 0;
    for (int i = 0; i < TSR_DECODER_MAX_DRAFT; i++)
        if (d->proposed_at[i] > 0) n = i + 1;
    return n;
}

static double per_forward(const tsr_generate_stats *g) {
    return g->target_forwards > 0 ? (double)g->new_tokens / (double)g->target_forwards : 0;
}

/* -v: how many target forwards the tokens took, and what the decoder says of its drafts. */
static void log_decoding(const tsr_generate_stats *g) {
    tsr_log(TSR_LOG_INFO, "run", "decoding: %lld tokens in %llu target forwards (%.3f tokens per "
            "forward), %llu draft forwards, %lld sequences", (long long)g->new_tokens,
            (unsigned long long)g->target_forwards, per_forward(g),
            (unsigned long long)g->draft_forwards, (long long)g->n_sequences);
    if (!g->has_decoder_stats) return;
    const tsr_decoder_stats *d = &g->decoder;
    char by_position[TSR_DECODER_MAX_DRAFT * 16] = "";
    size_t used = 0;
    for (int i = 0; i < draft_positions(d) && used < sizeof by_position; i++) {
        int k = snprintf(by_position + used, sizeof by_position - used, " %.3f",
                         acceptance_at(d, i) < 0 ? 0 : acceptance_at(d, i));
        used += k > 0 ? (size_t)k : 0;
    }
    tsr_log(TSR_LOG_INFO, "run", "decoder: %lld drafted, %lld accepted (%.3f); acceptance by "
            "draft position:%s; draft %.1f ms, verify %.1f ms", (long long)d->drafted,
            (long long)d->accepted, d->drafted > 0 ? (double)d->accepted / (double)d->drafted : 0,
            used ? by_position : " none", (double)d->draft_ns * 1e-6,
            (double)d->verify_ns * 1e-6);
}

static json_t *decoding_json(const tsr_generate_stats *g) {
    json_t *decoder = json_null();
    if (g->has_decoder_stats) {
        const tsr_decoder_stats *d = &g->decoder;
        json_t *by_position = json_array();
        for (int i = 0; i < draft_positions(d); i++)
            json_array_append_new(by_position, json_pack(
                "{s:I, s:I, s:o}", "proposed", (json_int_t)d->proposed_at[i], "accepted",
                (json_int_t)d->accepted_at[i], "rate",
                acceptance_at(d, i) >= 0 ? json_real(acceptance_at(d, i)) : json_null()));
        decoder = json_pack("{s:I, s:I, s:o, s:o, s:f, s:f}", "drafted", (json_int_t)d->drafted,
                            "accepted", (json_int_t)d->accepted, "acceptance_rate",
                            d->drafted > 0 ? json_real((double)d->accepted / (double)d->drafted)
                                           : json_null(),
                            "by_position", by_position, "draft_seconds",
                            (double)d->draft_ns * 1e-9, "verify_seconds",
                            (double)d->verify_ns * 1e-9);
    }
    return json_pack("{s:I, s:I, s:f, s:I, s:o}", "target_forwards",
                     (json_int_t)g->target_forwards, "draft_forwards",
                     (json_int_t)g->draft_forwards, "tokens_per_target_forward", per_forward(g),
                     "sequences", (json_int_t)g->n_sequences, "decoder", decoder);
}

static tsr_status print_json(const printer *p, size_t n_prompt, const tsr_generate_stats *g,
                             double secs, const tsr_stage_times *t, tsr_error *err) {
    json_t *cache = tsr_session_cache_json(&p->cache, p->n_cache_reporting);
    json_t *sequences = json_array();
    for (size_t i = 0; i < p->n_seqs; i++)
        json_array_append_new(sequences, json_pack(
            "{s:I, s:o?, s:I}", "seq", (json_int_t)p->seqs[i].seq_id, "text",
            json_text(p->seqs[i].text ? p->seqs[i].text : "", p->seqs[i].len), "new_tokens",
            (json_int_t)p->seqs[i].n_new));
    const seq_text *first = &p->seqs[0];
    json_t *root = json_pack(
        "{s:o?, s:o, s:I, s:I, s:f, s:f, s:{s:f, s:f, s:f, s:f, s:f}, s:o?, s:o?}", "text",
        json_text(first->text ? first->text : "", first->len), "sequences", sequences,
        "prompt_tokens", (json_int_t)n_prompt, "new_tokens", (json_int_t)g->new_tokens,
        "seconds", secs, "tokens_per_second",
        secs > 0 ? (double)((int64_t)n_prompt + g->new_tokens) / secs : 0.0, "stage_seconds",
        "matmul", (double)t->matmul * 1e-9, "attention", (double)t->attention * 1e-9, "cache",
        (double)t->cache * 1e-9, "decoder", (double)t->decoder * 1e-9, "other_ops",
        (double)t->other_ops * 1e-9, "cache", cache, "decoding", decoding_json(g));
    char *text = root ? json_dumps(root, JSON_INDENT(2)) : NULL;
    json_decref(root);
    if (!text) return tsr_error_set(err, TSR_E_NOMEM, "run --json: out of memory");
    printf("%s\n", text);
    free(text);
    return TSR_OK;
}

/* Several continuations, each under a line naming its sequence. */
static void print_texts(const printer *p) {
    for (size_t i = 0; i < p->n_seqs; i++) {
        printf("--- sequence %lld ---\n", (long long)p->seqs[i].seq_id);
        fwrite(p->seqs[i].text, 1, p->seqs[i].len, stdout);
        fputc('\n', stdout);
    }
}

static void run_usage(FILE *f) {
    fprintf(f,
            "usage: tessera run [CONFIG.yaml] -m MODEL [--tokenizer FILE] [-p PROMPT]\n"
            "                   [-n NEW_TOKENS] [--temperature T] [--seed S] [-t THREADS]\n"
            "                   [--parallel N] [--set SECTION.KEY=VALUE]... [--plugin-dir DIR]...\n"
            "                   [--json] [-v]\n"
            "Prints the prompt, then each new token as it is made, to stdout; timings go to\n"
            "stderr. Without CONFIG the built-in pipeline runs (cpu, gguf, flash, full,\n"
            "sample). --temperature 0 is greedy. Generation stops after NEW_TOKENS (default\n"
            "the config's generate.max_tokens, else 256) or at the model's end token.\n"
            "--parallel N sets the decoder's parameter of role parallel: N continuations of\n"
            "the prompt side by side (a decoder such as parallel), printed at the end, each\n"
            "under a line '--- sequence ID ---'.\n"
            "--json prints one JSON object instead: the text, every sequence's text, token\n"
            "counts, seconds per stage, the cache policies' statistics (entries, evicted, KV\n"
            "bytes, bits of memory per stored value) and the decoding's (target and draft\n"
            "forwards, tokens per target forward, and from a decoder that reports them the\n"
            "tokens drafted and accepted, acceptance by draft position, draft and verify\n"
            "time). -v logs those statistics on stderr. --plugin-dir DIR is searched for\n"
            "plugins before the other folders (see tessera plugins --help).\n");
}

int tsr_cli_run(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 2, sizeof(char *))};
    const char *prompt = NULL, *temperature = NULL, *seed = NULL, *parallel = NULL;
    int64_t n_new = -1;
    bool json = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (tsr_cli_is_help(a)) {
            run_usage(stdout);
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const tsr_cli_text_opt texts[] = {{"-p", "--prompt", "PROMPT", &prompt},
                                          {"--temperature", NULL, "T", &temperature},
                                          {"--seed", NULL, "S", &seed},
                                          {"--parallel", NULL, "N", &parallel}};
        const tsr_cli_int_opt ints[] = {{"-n", NULL, "NEW_TOKENS", 0, INT32_MAX, &n_new}};
        bool verbose = false;
        int took = tsr_session_take_opt("run", argc, argv, &i, &o);
        if (took == 0) took = tsr_cli_take_text("run", argc, argv, &i, texts, 4);
        if (took == 0) took = tsr_cli_take_int("run", argc, argv, &i, ints, 1);
        if (took == 0) took = tsr_cli_take_flag(a, "--json", NULL, &json);
        if (took == 0) took = tsr_cli_take_flag(a, "-v", "--verbose", &verbose);
        if (took == 0) took = (tsr_cli_bad_arg("run", a), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
        if (verbose) tsr_log_set_level(tsr_log_get_level() + 1);
    }
    /* The decoder's parameters of these roles, whatever the plugin calls them. */
    if (temperature)
        tsr_session_set_role(&o, TSR_STAGE_DECODER, TSR_PARAM_ROLE_TEMPERATURE, temperature,
                             "--temperature");
    if (seed) tsr_session_set_role(&o, TSR_STAGE_DECODER, TSR_PARAM_ROLE_SEED, seed, "--seed");
    if (parallel)
        tsr_session_set_role(&o, TSR_STAGE_DECODER, TSR_PARAM_ROLE_PARALLEL, parallel,
                             "--parallel");

    session s;
    tsr_error err;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    printer p = {.prompt = {.prev = -1}};
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
    if (tsr_session_pipeline(&s, (int64_t)n_ids + n_new, &err) < 0) goto fail;

    /* Several continuations cannot stream into one stdout: they are printed at the end. */
    bool several = tsr_pipeline_parallel(s.pl) > 1;
    p.tok = s.tok;
    p.keep = json || several;
    put_tokens(&p, &p.prompt, ids, (int64_t)n_ids);
    if (!p.keep) tsr_cli_flush_stdout();
    p.pl = s.pl;
    eog_ctx e = {.tok = s.tok, .llama2c = tsr_tokenizer_get_kind(s.tok) == TSR_TOKENIZER_LLAMA2C};
    uint64_t t0 = tsr_clock_ns();
    tsr_generate_stats gen;
    tsr_status st = tsr_pipeline_generate(s.pl, ids, (int64_t)n_ids, n_new, is_eog, &e,
                                          print_tokens, &p, &gen, &err);
    double secs = tsr_clock_seconds_since(t0);
    if (p.keep) finish_texts(&p);
    if (!p.keep) fputc('\n', stdout);
    if (st < 0) goto fail;
    if (p.oom) {
        tsr_error_set(&err, TSR_E_NOMEM, "run: out of memory for the text");
        goto fail;
    }
    const tsr_stage_times *t = tsr_pipeline_times(s.pl);
    if (json && print_json(&p, n_ids, &gen, secs, t, &err) < 0) goto fail;
    if (!json && several) print_texts(&p);
    /* Lost output is an error before any summary is printed. */
    if (!tsr_cli_stdout_ok()) goto done;
    fprintf(stderr,
            "tessera: %zu prompt + %lld new tokens in %.3f s (%.1f tokens/s); matmul %.1f ms, "
            "attention %.1f ms, cache %.1f ms, decoder %.1f ms, other %.1f ms\n",
            n_ids, (long long)gen.new_tokens, secs,
            secs > 0 ? (double)((int64_t)n_ids + gen.new_tokens) / secs : 0.0,
            (double)t->matmul * 1e-6, (double)t->attention * 1e-6, (double)t->cache * 1e-6,
            (double)t->decoder * 1e-6, (double)t->other_ops * 1e-6);
    log_cache(&p);
    log_decoding(&gen);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_flush_stdout();
    tsr_cli_error("%s", err.msg);
done:
    printer_free(&p);
    free(ids);
    tsr_session_close(&s);
    free(o.sets);
    return status;
}

/* ---- logits ---------------------------------------------------------------------------- */

/* Parses "1 2 3" (spaces, tabs, newlines or commas between ids), each id read strictly. */
static tsr_status parse_ids(const char *text, int32_t **out, size_t *n, tsr_error *err) {
    static const char separators[] = " \t\n,";
    size_t cap = 0;
    int32_t *ids = NULL;
    *n = 0;
    for (const char *p = text + strspn(text, separators); *p; p += strspn(p, separators)) {
        int64_t id;
        tsr_status st = tsr_parse_int_word("--tokens", &p, separators, 0, INT32_MAX, &id, err);
        if (st == TSR_OK && *n == cap) {
            int32_t *grown = realloc(ids, (cap = cap ? 2 * cap : 64) * sizeof *ids);
            if (grown) ids = grown;
            else st = tsr_error_set(err, TSR_E_NOMEM, "--tokens: out of memory");
        }
        if (st < 0) {
            free(ids);
            return st;
        }
        ids[(*n)++] = (int32_t)id;
    }
    if (*n == 0) return tsr_error_set(err, TSR_E_INVALID, "--tokens: no token ids given");
    *out = ids;
    return TSR_OK;
}

static void logits_usage(void) {
    printf("usage: tessera logits -m MODEL [CONFIG.yaml] --tokens \"ID ID ...\" --out FILE\n"
           "              [--tokenizer FILE] [-t THREADS] [--set K=V]... [--plugin-dir DIR]...\n"
           "Runs the ids as one batch from an empty cache and writes the logits of every\n"
           "position as raw little-endian float32 [n_tokens][n_vocab]. FILE is replaced\n"
           "only once it is complete; a device or FIFO (/dev/stdout) is written directly.\n");
}

int tsr_cli_logits(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    const char *tokens = NULL, *out_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (tsr_cli_is_help(a)) {
            logits_usage();
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const tsr_cli_text_opt opts[] = {{"--tokens", NULL, "\"ID ID ...\"", &tokens},
                                         {"--out", "-o", "FILE", &out_path}};
        int took = tsr_session_take_opt("logits", argc, argv, &i, &o);
        if (took == 0) took = tsr_cli_take_text("logits", argc, argv, &i, opts, 2);
        if (took == 0) took = (tsr_cli_bad_arg("logits", a), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    session s = {0};
    tsr_error err;
    int32_t *ids = NULL;
    size_t n = 0;
    if (!tokens || !out_path || parse_ids(tokens, &ids, &n, &err) < 0) {
        if (!tokens || !out_path)
            tsr_cli_error("logits: --tokens and --out are required (see tessera logits --help)");
        else
            tsr_cli_error("logits: %s", err.msg);
        free(o.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_outfile out = {0};
    tsr_batch_entry *batch = NULL;
    float *logits = NULL;
    int status = TSR_EXIT_FAIL;
    if (tsr_session_open(&s, &o, &err) < 0) goto fail;
    if (tsr_outfile_open(&out, out_path, o.model ? o.model : s.cfg->model_path, &err) < 0)
        goto fail;
    if (tsr_session_pipeline(&s, (int64_t)n, &err) < 0) goto fail;
    int32_t nv = s.model->hp.n_vocab;
    batch = calloc(n, sizeof *batch);
    logits = malloc(n * (size_t)nv * sizeof *logits);
    if (!batch || !logits) {
        tsr_error_set(&err, TSR_E_NOMEM, "logits: out of memory for %zu x %d logits", n, nv);
        goto fail;
    }
    for (size_t i = 0; i < n; i++)
        batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = ids[i], .want_logits = 1};
    if (tsr_pipeline_seq_begin(s.pl, 0, &err) < 0) goto fail;
    if (tsr_pipeline_forward(s.pl, batch, (int64_t)n, logits, &err) < 0) goto fail;
    tsr_outfile_write(&out, logits, n * (size_t)nv * sizeof *logits);
    if (tsr_outfile_commit(&out, &err) < 0) goto fail;
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    tsr_outfile_discard(&out);
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
        const char *a = argv[i];
        if (tsr_cli_is_help(a)) {
            printf("usage: tessera tokenize -m MODEL [--tokenizer FILE] (-p TEXT | -f FILE) "
                   "[--no-bos]\n"
                   "Prints the token ids of the text, space-separated, on one line. -f reads the\n"
                   "file's bytes exactly as they are. MODEL may be a vocabulary-only GGUF.\n");
            return TSR_EXIT_OK;
        }
        const tsr_cli_text_opt opts[] = {{"-m", "--model", "MODEL", &model_path},
                                         {"--tokenizer", NULL, "FILE", &tok_path},
                                         {"-p", "--prompt", "TEXT", &text},
                                         {"-f", "--file", "FILE", &file}};
        int took = tsr_cli_take_text("tokenize", argc, argv, &i, opts, 4);
        if (took < 0) return TSR_EXIT_USAGE;
        if (took > 0) continue;
        if (!strcmp(a, "--no-bos")) bos = false;
        else return tsr_cli_bad_arg("tokenize", a);
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
    bool from_llama2c = false;
    uint32_t n_vocab = 0;
    /* A vocabulary-only GGUF has no tensors, so only the file is opened, not a model. */
    if (tsr_model_file_open(model_path, &g, &from_llama2c, &err) < 0) goto fail;
    if (from_llama2c) n_vocab = (uint32_t)tsr_gguf_u64_or(g, "llama.vocab_size", 0);
    if (tsr_session_open_tokenizer(model_path, tok_path, g, !from_llama2c, n_vocab, &tok, &err) < 0) goto fail;
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
