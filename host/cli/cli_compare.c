/* `tessera compare`: pipelines side by side on one text. Quality (perplexity, and KL
 * divergence and top-1 agreement of the next-token distributions against the first pipeline),
 * the cache's memory and statistics, and decode speed, over a sweep of cache budgets. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/number.h"
#include "cli/cli_plot.h"
#include "cli/cli_score.h"
#include "cli/cli_session.h"

#define MAX_CONFIGS 16
#define MAX_BUDGETS 16

typedef struct compare_opts {
    const char *text_path, *plot_path;
    const char *configs[MAX_CONFIGS];
    int n_configs;
    int64_t budgets[MAX_BUDGETS];
    int n_budgets;
    int64_t chunks, decode;
    tsr_feed feed;
    bool json;
} compare_opts;

/* One pipeline measured: a config, at one budget (0: as configured). */
typedef struct compare_row {
    int config;
    int64_t budget;
    char cache[64];       /* the cache plugin */
    char budget_set[96];  /* the parameters the budget set, "window=60" */
    tsr_score_sum sum;
    double ppl, ppl_se, kl, kl_se, top1;
    tsr_cache_stats stats;   /* at the last chunk's end: evicted counts every chunk's */
    double decode_tps;
} compare_row;

static const char *plain_name(const char *path, char *buf, size_t size) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    snprintf(buf, size, "%s", base);
    char *dot = strrchr(buf, '.');
    if (dot && (!strcmp(dot, ".yaml") || !strcmp(dot, ".yml"))) *dot = '\0';
    return buf;
}

static int64_t param_int(const tsr_bound_params *b, const char *name, bool *found) {
    for (uint32_t i = 0; i < b->params.count; i++)
        if (!strcmp(b->params.defs[i].name, name) && b->params.defs[i].type == TSR_PARAM_INT) {
            *found = true;
            return b->values[i].u.i;
        }
    *found = false;
    return 0;
}

/* The assignments that give the configured cache plugin a budget of `budget` entries per KV
 * head, by the parameters it declares (never by its name): `budget` itself; else `heavy` and
 * `recent`, half each; else `window` after `sink` (sink + window = budget). */
static tsr_status budget_assignments(const tsr_config *cfg, const char *config, int64_t budget,
                                     char sets[2][96], int *n_sets, tsr_error *err) {
    const tsr_stage_conf *c = &cfg->stage[TSR_STAGE_CACHE];
    bool has_budget, has_heavy, has_recent, has_sink, has_window;
    param_int(&c->bound, "budget", &has_budget);
    param_int(&c->bound, "heavy", &has_heavy);
    param_int(&c->bound, "recent", &has_recent);
    param_int(&c->bound, "window", &has_window);
    int64_t sink = param_int(&c->bound, "sink", &has_sink);
    *n_sets = 0;
    if (has_budget) {
        snprintf(sets[(*n_sets)++], 96, "cache.budget=%lld", (long long)budget);
    } else if (has_heavy && has_recent) {
        if (budget < 2)
            return tsr_error_set(err, TSR_E_INVALID, "compare: %s: --budget %lld: cache '%s' "
                                 "splits its budget into heavy and recent halves; give at "
                                 "least 2", config, (long long)budget, c->plugin);
        snprintf(sets[(*n_sets)++], 96, "cache.heavy=%lld", (long long)(budget / 2));
        snprintf(sets[(*n_sets)++], 96, "cache.recent=%lld", (long long)(budget - budget / 2));
    } else if (has_window && has_sink) {
        if (budget <= sink)
            return tsr_error_set(err, TSR_E_INVALID, "compare: %s: --budget %lld leaves no "
                                 "window after the %lld sinks of cache '%s'", config,
                                 (long long)budget, (long long)sink, c->plugin);
        snprintf(sets[(*n_sets)++], 96, "cache.window=%lld", (long long)(budget - sink));
    } else {
        return tsr_error_set(err, TSR_E_INVALID, "compare: %s: cache '%s' has no budget "
                             "parameter (budget, heavy and recent, or sink and window); leave "
                             "it out of a --budget sweep", config, c->plugin);
    }
    return TSR_OK;
}

/* Rebinds the session's config with the budget's assignments and makes its pipeline (the
 * session has none). */
static tsr_status budget_pipeline(session *s, const char *config, int64_t budget, int64_t n_ctx,
                                  compare_row *row, tsr_error *err) {
    if (budget > 0) {
        char sets[2][96];
        int n;
        tsr_status st = budget_assignments(s->cfg, config, budget, sets, &n, err);
        for (int i = 0; st >= 0 && i < n; i++) {
            st = tsr_config_set(s->cfg, sets[i], err);
            size_t used = strlen(row->budget_set);
            snprintf(row->budget_set + used, sizeof row->budget_set - used, "%s%s",
                     used ? " " : "", sets[i] + strlen("cache."));
        }
        if (st >= 0) st = tsr_cli_bind(s->cfg, s->reg, err);
        if (st < 0) return st;
    }
    snprintf(row->cache, sizeof row->cache, "%s", s->cfg->stage[TSR_STAGE_CACHE].plugin);
    return tsr_session_pipeline(s, n_ctx, err);
}

/* Decode speed near the end of the context: the first ctx - decode tokens of the text in
 * one forward, then `decode` tokens one per forward, each the previous forward's most likely
 * one; tokens per second over those forwards. */
static tsr_status time_decode(tsr_pipeline *pl, const int32_t *ids, int32_t bos,
                              const compare_opts *c, int32_t n_vocab, tsr_batch_entry *batch,
                              float *logits, double *tps, tsr_error *err) {
    int64_t n_prompt = c->feed.ctx - c->decode;
    for (int64_t j = 0; j < n_prompt; j++)
        batch[j] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)j,
                                     .token = j == 0 && bos >= 0 ? bos : ids[j],
                                     .want_logits = j == n_prompt - 1};
    tsr_status st = tsr_pipeline_seq_begin(pl, 0, err);
    if (st < 0) return st;
    st = tsr_pipeline_forward(pl, batch, n_prompt, logits, err);
    uint64_t t0 = tsr_clock_ns();
    for (int64_t i = 0; st >= 0 && i < c->decode; i++) {
        int32_t next = 0;
        for (int32_t v = 1; v < n_vocab; v++)
            if (logits[v] > logits[next]) next = v;
        tsr_batch_entry e = {.seq_id = 0, .pos = (int32_t)(n_prompt + i), .token = next,
                             .want_logits = 1};
        st = tsr_pipeline_forward(pl, &e, 1, logits, err);
    }
    double secs = tsr_clock_seconds_since(t0);
    tsr_pipeline_seq_end(pl, 0);
    *tps = secs > 0 ? (double)c->decode / secs : 0;
    return st;
}

/* Scores every chunk with the row's pipeline. The baseline (base_write) leaves its
 * log-probabilities in `base`, a scratch file, which the later rows read back. */
static tsr_status run_row(session *s, const compare_opts *c, const int32_t *ids,
                          int64_t n_chunks, FILE *base, bool base_write, compare_row *row,
                          tsr_cli_progress *progress, tsr_error *err) {
    const int32_t nv = s->model->hp.n_vocab, bos = tsr_tokenizer_bos(s->tok);
    const int32_t first_bos = tsr_tokenizer_add_bos(s->tok) && bos >= 0 ? bos : -1;
    const int64_t ctx = c->feed.ctx, first = tsr_feed_first_scored(&c->feed);
    const size_t rows = (size_t)(ctx - 1 - first), row_floats = (size_t)nv;
    tsr_batch_entry *batch = calloc((size_t)ctx, sizeof *batch);
    float *logits = malloc((size_t)(ctx - first) * row_floats * sizeof *logits);
    float *base_lp = malloc(row_floats * sizeof *base_lp);
    float *scratch = malloc(row_floats * sizeof *scratch);
    tsr_status st = TSR_OK;
    if (!batch || !logits || !base_lp || !scratch) {
        st = tsr_error_set(err, TSR_E_NOMEM, "compare: out of memory for chunks of %lld tokens",
                           (long long)ctx);
        goto done;
    }
    rewind(base);
    for (int64_t k = 0; k < n_chunks && st >= 0; k++) {
        const int32_t *chunk = ids + k * ctx;
        tsr_cache_stats stats = {0};
        if ((st = tsr_score_chunk(s->pl, chunk, first_bos, &c->feed, nv, batch, logits, &stats,
                                  err)) < 0)
            break;
        row->stats = stats;
        for (size_t j = 0; j < rows && st >= 0; j++) {
            const float *lg = logits + j * row_floats;
            if (base_write) {
                tsr_log_softmax(lg, nv, base_lp);
                if (fwrite(base_lp, sizeof *base_lp, row_floats, base) != row_floats)
                    st = tsr_error_set(err, TSR_E_IO, "compare: cannot write the baseline's "
                                       "log-probabilities to a temporary file: %s",
                                       strerror(errno));
            } else if (fread(base_lp, sizeof *base_lp, row_floats, base) != row_floats) {
                st = tsr_error_set(err, TSR_E_IO, "compare: cannot read the baseline's "
                                   "log-probabilities back from their temporary file");
            }
            if (st >= 0 && !tsr_score_add(&row->sum, lg, base_lp, nv,
                                          chunk[first + (int64_t)j + 1], scratch))
                st = tsr_error_set(err, TSR_E_INVALID, "compare: chunk %lld, position %lld: "
                                   "the logits are not finite numbers", (long long)k + 1,
                                   (long long)(first + (int64_t)j));
        }
        tsr_cli_progress_show(progress, k + 1, n_chunks, "chunks", NULL);
    }
    if (st >= 0 && c->decode > 0)
        st = time_decode(s->pl, ids, first_bos, c, nv, batch, logits, &row->decode_tps, err);
    double mean;
    tsr_score_mean(row->sum.nll, row->sum.nll2, row->sum.count, &mean, &row->ppl_se);
    row->ppl = exp(mean);
    row->ppl_se *= row->ppl;
    if (st >= 0 && !isfinite(row->ppl))
        st = tsr_error_set(err, TSR_E_RANGE, "compare: exp(%g), the perplexity, overflows a "
                           "double", mean);
    tsr_score_mean(row->sum.kl, row->sum.kl2, row->sum.kl_count, &row->kl, &row->kl_se);
    row->top1 = row->sum.kl_count ? (double)row->sum.same_top / (double)row->sum.kl_count : 0;
done:
    free(batch);
    free(logits);
    free(base_lp);
    free(scratch);
    return st;
}

static void row_label(const compare_opts *c, const compare_row *r, char *buf, size_t size) {
    char name[64];
    plain_name(c->configs[r->config], name, sizeof name);
    if (r->budget > 0) snprintf(buf, size, "%s @ %lld", name, (long long)r->budget);
    else snprintf(buf, size, "%s", name);
}

static void print_table(const compare_opts *c, const compare_row *rows, int n_rows,
                        int64_t n_chunks, const char *feeding) {
    const int64_t first = tsr_feed_first_scored(&c->feed);
    printf("feeding: %s; scored: positions %lld..%lld of each of %lld chunks of %lld tokens "
           "(%lld tokens); KL and top-1 against %s\n",
           feeding, (long long)first, (long long)c->feed.ctx - 2, (long long)n_chunks,
           (long long)c->feed.ctx, (long long)rows[0].sum.count, c->configs[0]);
    if (c->decode > 0)
        printf("decode: %lld tokens, one per forward, from context %lld to %lld\n",
               (long long)c->decode, (long long)(c->feed.ctx - c->decode),
               (long long)c->feed.ctx);
    printf("\n| pipeline | cache | budget | perplexity | KL | top-1 | peak KV | bits/value | "
           "entries | evicted | decode tok/s |\n");
    printf("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < n_rows; i++) {
        const compare_row *r = &rows[i];
        char label[96], kv[32], bits[16] = "-", tps[32] = "-";
        row_label(c, r, label, sizeof label);
        snprintf(kv, sizeof kv, "%.1f KiB", (double)r->stats.bytes_peak / 1024.0);
        if (r->stats.bits_per_value > 0) snprintf(bits, sizeof bits, "%.2f", r->stats.bits_per_value);
        if (c->decode > 0) snprintf(tps, sizeof tps, "%.1f", r->decode_tps);
        printf("| %s | %s | %s | %.4f ± %.4f | %.6f | %.2f%% | %s | %s | %lld | %lld | %s |\n",
               label, r->cache, r->budget_set[0] ? r->budget_set : "-", r->ppl, r->ppl_se, r->kl,
               100.0 * r->top1, kv, bits, (long long)r->stats.entries, (long long)r->stats.evicted,
               tps);
    }
}

static void print_json(const compare_opts *c, const char *model, const compare_row *rows,
                       int n_rows, int64_t n_chunks, const char *feeding) {
    json_t *list = json_array();
    for (int i = 0; i < n_rows; i++) {
        const compare_row *r = &rows[i];
        char label[96];
        row_label(c, r, label, sizeof label);
        json_array_append_new(list, json_pack(
            "{s:s, s:s, s:s, s:o, s:s, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:o, s:I, s:I, "
            "s:o}",
            "pipeline", label, "config", c->configs[r->config], "cache", r->cache, "budget",
            r->budget > 0 ? json_integer(r->budget) : json_null(), "budget_set", r->budget_set,
            "ppl", r->ppl, "ppl_stderr", r->ppl_se, "mean_nll", r->sum.nll / (double)r->sum.count,
            "kl_mean", r->kl, "kl_stderr", r->kl_se, "top1_agreement", r->top1, "kv_bytes_peak",
            (json_int_t)r->stats.bytes_peak, "kv_bytes_end", (json_int_t)r->stats.bytes_reserved,
            "bits_per_value", r->stats.bits_per_value > 0 ? json_real(r->stats.bits_per_value)
                                                          : json_null(),
            "entries", (json_int_t)r->stats.entries, "evicted", (json_int_t)r->stats.evicted,
            "decode_tps", c->decode > 0 ? json_real(r->decode_tps) : json_null()));
    }
    json_t *root = json_pack(
        "{s:s, s:s, s:s, s:i, s:I, s:I, s:s, s:I, s:I, s:I, s:I, s:I, s:o}", "model", model,
        "text", c->text_path, "baseline", c->configs[0], "ctx", (int)c->feed.ctx, "chunks",
        (json_int_t)n_chunks, "scored_tokens", (json_int_t)rows[0].sum.count, "feeding", feeding,
        "prefill", (json_int_t)c->feed.prefill, "ubatch", (json_int_t)c->feed.ubatch,
        "first_scored", (json_int_t)tsr_feed_first_scored(&c->feed), "decode_tokens",
        (json_int_t)c->decode, "decode_from_context", (json_int_t)(c->feed.ctx - c->decode),
        "rows", list);
    char *text = json_dumps(root, JSON_INDENT(2));
    printf("%s\n", text);
    free(text);
    json_decref(root);
}

/* Perplexity against peak KV bytes, a curve per config over its budgets, the baseline as a
 * dashed level. */
static tsr_status plot(const compare_opts *c, const compare_row *rows, int n_rows,
                       tsr_error *err) {
    double x[MAX_CONFIGS * MAX_BUDGETS], y[MAX_CONFIGS * MAX_BUDGETS];
    tsr_plot_series series[MAX_CONFIGS];
    char names[MAX_CONFIGS][64], reference[96], title[160];
    int n_series = 0, n = 0;
    for (int cfg = 1; cfg < c->n_configs; cfg++) {
        tsr_plot_series *s = &series[n_series++];
        *s = (tsr_plot_series){.label = plain_name(c->configs[cfg], names[cfg], 64), .x = x + n,
                               .y = y + n};
        for (int i = 0; i < n_rows; i++)
            if (rows[i].config == cfg) {
                x[n] = (double)(rows[i].stats.bytes_peak > 0 ? rows[i].stats.bytes_peak : 1);
                y[n++] = rows[i].ppl;
                s->n++;
            }
    }
    char base_name[64];
    snprintf(reference, sizeof reference, "%s (baseline), %.4f",
             plain_name(c->configs[0], base_name, sizeof base_name), rows[0].ppl);
    snprintf(title, sizeof title, "perplexity against KV cache memory, ctx %lld",
             (long long)c->feed.ctx);
    tsr_plot p = {.title = title, .x_label = "peak KV cache bytes", .y_label = "perplexity",
                  .x_log2 = true, .x_bytes = true, .series = series, .n_series = n_series,
                  .has_reference = true, .reference_y = rows[0].ppl,
                  .reference_x = (double)rows[0].stats.bytes_peak,
                  .reference_label = reference};
    return tsr_plot_write(&p, c->plot_path, c->text_path, err);
}

static void usage(void) {
    printf("usage: tessera compare -m MODEL CONFIG.yaml... -f TEXT [--ctx 512] [--chunks K]\n"
           "                       [--budget B,B...] [--prefill N] [--ubatch 1] [--decode 32]\n"
           "                       [--json] [--plot FILE.png|FILE.svg] [-t T] [--set K=V]...\n"
           "                       [--plugin-dir DIR]...\n"
           "Runs each pipeline on the same text, scored as `tessera perplexity` scores it (the\n"
           "second half of each chunk of --ctx tokens), and prints per pipeline: perplexity,\n"
           "the mean KL divergence KL(first || this) of the next-token distributions and how\n"
           "often both put the same token on top, against the first CONFIG (the baseline);\n"
           "the cache's peak bytes, bits per stored value, entries held at a chunk's end and\n"
           "entries evicted; and decode tokens/s over the last --decode positions of a\n"
           "context (one token per forward after a prefill of the rest; 0: not timed).\n"
           "Each chunk is fed as a prefill of --prefill tokens (default ctx/4), which a policy\n"
           "such as snapkv compresses, then --ubatch tokens per forward, so that evictions act\n"
           "on the tokens that follow. --budget sweeps each CONFIG after the first over cache\n"
           "budgets B (entries per KV head): the cache plugin's `budget` parameter, else\n"
           "`heavy` and `recent` at B/2 each, else `window` = B - `sink`; a cache with none of\n"
           "them is refused. --plot draws perplexity against peak KV bytes, one curve per\n"
           "CONFIG over its budgets, as PNG or SVG by the extension. Progress on stderr.\n");
}

static bool parse_args(int argc, char **argv, model_opts *o, compare_opts *c, int *status) {
    int64_t ctx = 512, prefill = -1, ubatch = 1, decode = -1;
    c->chunks = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *budget_list = NULL;
        if (tsr_cli_is_help(a)) {
            usage();
            *status = TSR_EXIT_OK;
            return false;
        }
        const tsr_cli_text_opt texts[] = {{"-f", "--file", "TEXT", &c->text_path},
                                          {"--plot", NULL, "FILE.png|FILE.svg", &c->plot_path},
                                          {"--budget", NULL, "B[,B...]", &budget_list}};
        const tsr_cli_int_opt ints[] = {{"--ctx", NULL, "TOKENS", 4, 1 << 20, &ctx},
                                        {"--chunks", NULL, "K", 1, INT32_MAX, &c->chunks},
                                        {"--prefill", NULL, "TOKENS", 1, 1 << 20, &prefill},
                                        {"--ubatch", NULL, "TOKENS", 1, 1 << 20, &ubatch},
                                        {"--decode", NULL, "TOKENS", 0, 1 << 20, &decode}};
        int took = tsr_cli_take_text("compare", argc, argv, &i, texts, 3);
        if (took > 0 && budget_list &&
            !tsr_cli_int_list("compare", "--budget", budget_list, 1, 1 << 20, "budgets",
                              c->budgets, MAX_BUDGETS, &c->n_budgets))
            took = -1;
        if (took == 0) took = tsr_cli_take_int("compare", argc, argv, &i, ints, 5);
        if (took == 0) took = tsr_cli_take_flag(a, "--json", NULL, &c->json);
        if (took == 0 && a[0] != '-') {
            if (c->n_configs == MAX_CONFIGS) {
                tsr_cli_error("compare: at most %d configs", MAX_CONFIGS);
                took = -1;
            } else {
                c->configs[c->n_configs++] = a;
                took = 1;
            }
        }
        if (took == 0) took = tsr_session_take_opt("compare", argc, argv, &i, o);
        if (took == 0) took = (tsr_cli_bad_arg("compare", a), -1);
        if (took < 0) return false;
    }
    c->feed = (tsr_feed){.ctx = ctx, .ubatch = ubatch, .prefill = prefill > 0 ? prefill : ctx / 4};
    c->decode = decode >= 0 ? decode : (ctx / 4 < 32 ? ctx / 4 : 32);
    const char *missing = !c->n_configs ? "at least one CONFIG.yaml is required (the first is "
                                          "the baseline)"
                          : !c->text_path ? "-f TEXT is required" : NULL;
    if (missing) {
        tsr_cli_error("compare: %s (see tessera compare --help)", missing);
        return false;
    }
    if (c->decode >= ctx) {
        tsr_cli_error("compare: --decode %lld: the timed tokens must fit in --ctx %lld with at "
                      "least one token before them", (long long)c->decode, (long long)ctx);
        return false;
    }
    if (c->plot_path && !tsr_plot_format_known(c->plot_path)) {
        char quoted[64];
        tsr_cli_error("compare: --plot: '%s': expected a file name ending in .png or .svg",
                      tsr_text_excerpt(quoted, sizeof quoted, c->plot_path));
        return false;
    }
    return true;
}

int tsr_cli_compare(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    compare_opts c = {0};
    int status = TSR_EXIT_USAGE;
    if (!parse_args(argc, argv, &o, &c, &status)) {
        free(o.sets);
        return status;
    }
    status = TSR_EXIT_FAIL;
    tsr_error err;
    session sessions[MAX_CONFIGS] = {{0}};
    compare_row rows[MAX_CONFIGS * MAX_BUDGETS];
    memset(rows, 0, sizeof rows);
    int n_rows = 0;
    char *text = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n_ids = 0;
    FILE *base = NULL;
    tsr_cli_progress progress = {0};
    if (!(text = tsr_session_read_file(c.text_path, &len, &err))) goto fail;
    /* Every config opens (and a swept one shows its budget parameter) before any work. */
    for (int i = 0; i < c.n_configs; i++) {
        model_opts oi = o;
        oi.config = c.configs[i];
        if (tsr_session_open(&sessions[i], &oi, &err) < 0) goto fail;
        if (sessions[i].model->hp.n_vocab != sessions[0].model->hp.n_vocab) {
            tsr_error_set(&err, TSR_E_INVALID, "compare: %s: a model of %d tokens; the baseline "
                          "%s has %d", c.configs[i], sessions[i].model->hp.n_vocab,
                          c.configs[0], sessions[0].model->hp.n_vocab);
            goto fail;
        }
        char sets[2][96];
        int n_sets;
        for (int b = 0; i > 0 && b < c.n_budgets; b++)
            if (budget_assignments(sessions[i].cfg, c.configs[i], c.budgets[b], sets, &n_sets,
                                   &err) < 0)
                goto fail;
        int n_budgets = i > 0 && c.n_budgets > 0 ? c.n_budgets : 1;
        for (int b = 0; b < n_budgets; b++)
            rows[n_rows++] = (compare_row){.config = i, .budget = i > 0 && c.n_budgets > 0
                                                                     ? c.budgets[b] : 0};
    }
    if (tsr_tokenize(sessions[0].tok, text, len, true, false, &ids, &n_ids, &err) < 0) goto fail;
    int64_t n_chunks = tsr_session_chunk_count(n_ids, c.feed.ctx, c.chunks);
    if (n_chunks < 1) {
        tsr_error_set(&err, TSR_E_INVALID, "%s: %zu tokens, fewer than one chunk of --ctx %lld",
                      c.text_path, n_ids, (long long)c.feed.ctx);
        goto fail;
    }
    if (!(base = tmpfile())) {
        tsr_error_set(&err, TSR_E_IO, "compare: cannot make a temporary file for the baseline's "
                      "log-probabilities: %s", strerror(errno));
        goto fail;
    }
    for (int r = 0; r < n_rows; r++) {
        compare_row *row = &rows[r];
        session *s = &sessions[row->config];
        char label[96], what[160];
        row_label(&c, row, label, sizeof label);
        snprintf(what, sizeof what, "compare: %s (%d/%d)", label, r + 1, n_rows);
        tsr_cli_progress_start(&progress, what, 0);
        if (budget_pipeline(s, c.configs[row->config], row->budget, c.feed.ctx, row, &err) < 0 ||
            run_row(s, &c, ids, n_chunks, base, r == 0, row, &progress, &err) < 0) {
            /* A plugin's own refusal (a window too large for the budget) names no row. */
            tsr_error inner = err;
            tsr_error_set(&err, TSR_E_INVALID, "compare: %s: %s", label, inner.msg);
            goto fail;
        }
        tsr_cli_progress_end(&progress);
        /* One pipeline at a time: the sessions keep only their models. */
        tsr_pipeline_free(s->pl);
        s->pl = NULL;
    }
    char feeding[96];
    tsr_feed_describe(&c.feed, feeding, sizeof feeding);
    if (c.plot_path && plot(&c, rows, n_rows, &err) < 0) goto fail;
    const char *model = o.model ? o.model : sessions[0].cfg->model_path;
    if (c.json) print_json(&c, model, rows, n_rows, n_chunks, feeding);
    else print_table(&c, rows, n_rows, n_chunks, feeding);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_progress_end(&progress);
    tsr_cli_error("%s", err.msg);
done:
    if (base) fclose(base);
    for (int i = 0; i < c.n_configs; i++) tsr_session_close(&sessions[i]);
    free(text);
    free(ids);
    free(o.sets);
    return status;
}
