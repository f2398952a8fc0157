/* `tessera bench`: speed, measured. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "base/number.h"
#include "cli/cli_session.h"
#include "files/dtype.h"
#include "cli/membw.h"
#include "cli/peak.h"

/* Mean and sample deviation of n values. */
static void mean_std(const double *v, int n, double *mean, double *std) {
    double s = 0, s2 = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = n ? s / n : 0;
    for (int i = 0; i < n; i++) s2 += (v[i] - *mean) * (v[i] - *mean);
    *std = n > 1 ? sqrt(s2 / (n - 1)) : 0;
}

/* The weight type that holds most of the model's bytes, as the model's "type". */
static int32_t main_dtype_id(const tsr_model *m) {
    uint64_t bytes[64] = {0};
    for (int32_t l = 0; l < m->hp.n_layer; l++) {
        const tsr_tensor *t[] = {&m->layers[l].wq, &m->layers[l].wk, &m->layers[l].wv,
                                 &m->layers[l].wo, &m->layers[l].ffn_gate, &m->layers[l].ffn_up,
                                 &m->layers[l].ffn_down};
        for (size_t i = 0; i < 7; i++)
            if (t[i]->dtype >= 0 && t[i]->dtype < 64)
                bytes[t[i]->dtype] += t[i]->row_bytes * (uint64_t)t[i]->ne[1];
    }
    int best = 0;
    for (int d = 1; d < 64; d++)
        if (bytes[d] > bytes[best]) best = d;
    return best;
}

static const char *main_dtype(const tsr_model *m) {
    return tsr_dtype_name(main_dtype_id(m));
}

/* Float weights are multiplied in f32 (F16 and BF16 converted or by vdpbf16ps), quantized
 * ones in int8 products: the peak each prefill is measured against. */
static tsr_peak_kind prefill_peak_kind(const tsr_model *m) {
    int32_t t = main_dtype_id(m);
    return t == TSR_DTYPE_F32 || t == TSR_DTYPE_F16 || t == TSR_DTYPE_BF16 ? TSR_PEAK_F32
                                                                            : TSR_PEAK_INT8;
}

static double matrix_elements(const tsr_tensor *t) {
    return t->data ? (double)t->ne[0] * (double)t->ne[1] : 0;
}

/* Multiply-adds of the weight matrices per prompt token: every matrix of the blocks, of a
 * layer with experts its router, shared expert and the k experts a token is routed to. The
 * output head, which prefill runs for the last token only, and attention are left out. */
static double prefill_macs_per_token(const tsr_model *m) {
    double macs = 0;
    for (int32_t l = 0; l < m->hp.n_layer; l++) {
        const tsr_layer_weights *w = &m->layers[l];
        const tsr_tensor *dense[] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->ffn_gate, &w->ffn_up,
                                     &w->ffn_down, &w->gate_inp, &w->gate_inp_shexp,
                                     &w->gate_shexp, &w->up_shexp, &w->down_shexp};
        for (size_t i = 0; i < sizeof dense / sizeof *dense; i++) macs += matrix_elements(dense[i]);
        const tsr_tensor *experts[] = {&w->gate_exps, &w->up_exps, &w->down_exps};
        for (size_t i = 0; i < 3; i++) macs += matrix_elements(experts[i]) * m->hp.n_expert_used;
    }
    return macs;
}

static const char *peak_kind_name(tsr_peak_kind kind) {
    return kind == TSR_PEAK_INT8 ? "int8" : "f32";
}

/* Linux's resident high-water mark (VmHWM) can be reset, so each thread count reports its
 * own peak rather than an earlier one's bandwidth buffer; elsewhere, the lifetime peak. */
static void reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return;
    fputs("5", f);
    fclose(f);
}

static double peak_rss_mib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && kib < 0 && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kib) != 1) kib = -1;
    if (f) fclose(f);
    if (kib >= 0) return (double)kib / 1024.0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;
}

/* ---- bench ----------------------------------------------------------------------------- */

typedef struct bench_opts {
    int n_prompt, n_gen, reps;
    int depth; /* tokens in the context before the timed decode steps */
    int threads[16];
    int n_threads;
    int bandwidth_mib; /* the buffer the bandwidth measurement reads */
    int peak_ms;       /* how long the arithmetic peak is measured */
    bool json;
} bench_opts;

typedef struct kv_probe {
    tsr_pipeline *pl;
    int64_t emitted, at;
    /* The policies' counters at the last token, while the sequences live (read again at
     * every token from the at-th on), with `evicted` counting this request's evictions alone
     * (the policies count since their creation). */
    tsr_cache_stats cache;
    int n_cache_reporting;
    int64_t evicted_before;
    uint64_t t_first;         /* the clock when the first token came: the prompt is done */
    tsr_stage_times first;    /* the stage times then */
} kv_probe;

static void probe_tokens(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n) {
    kv_probe *p = ctx;
    (void)tokens;
    if (p->emitted == 0) {
        p->t_first = tsr_clock_ns();
        p->first = *tsr_pipeline_times(p->pl);
    }
    p->emitted += n;
    if (p->emitted >= p->at) {
        p->n_cache_reporting = tsr_pipeline_cache_stats(p->pl, &p->cache);
        p->cache.evicted -= p->evicted_before;
    }
}

/* One prefill of n tokens from an empty cache; returns seconds. */
static tsr_status time_prefill(session *s, const tsr_batch_entry *batch, int n, float *logits,
                               double *secs, tsr_error *err) {
    tsr_status st = tsr_pipeline_seq_begin(s->pl, 0, err);
    if (st < 0) return st;
    uint64_t t0 = tsr_clock_ns();
    st = tsr_pipeline_forward(s->pl, batch, n, logits, err);
    *secs = tsr_clock_seconds_since(t0);
    tsr_pipeline_seq_end(s->pl, 0);
    return st;
}

/* Adds the stage times from `a` to `b` to *acc. */
static void add_times_between(tsr_stage_times *acc, const tsr_stage_times *a,
                              const tsr_stage_times *b) {
    acc->matmul += b->matmul - a->matmul;
    acc->attention += b->attention - a->attention;
    acc->cache += b->cache - a->cache;
    acc->decoder += b->decoder - a->decoder;
    acc->other_ops += b->other_ops - a->other_ops;
    acc->router += b->router - a->router;
    acc->expert_bytes += b->expert_bytes - a->expert_bytes;
}

/* n new tokens (per sequence) through the configured decoder, as `run` makes them, after the
 * prompt, which is not timed: the first token marks its end (the decoder then makes n more).
 * The seconds from the first token to the last, the stage times over them added to *times, and
 * the request's counts. */
static tsr_status time_decode(session *s, const int32_t *prompt, int n_prompt, int n,
                              kv_probe *probe, tsr_generate_stats *gen, double *secs,
                              tsr_stage_times *times, tsr_error *err) {
    tsr_cache_stats before;
    tsr_pipeline_cache_stats(s->pl, &before);
    probe->evicted_before = before.evicted;
    tsr_status st = tsr_pipeline_generate(s->pl, prompt, n_prompt, n + 1, NULL, NULL,
                                          probe_tokens, probe, gen, err);
    *secs = tsr_clock_seconds_since(probe->t_first);
    add_times_between(times, &probe->first, tsr_pipeline_times(s->pl));
    /* A decoder of several continuations (parallel) makes n + 1 tokens for each. */
    int64_t n_seq = gen->n_sequences > 1 ? gen->n_sequences : 1;
    if (st >= 0 && gen->new_tokens != (n + 1) * n_seq)
        st = tsr_error_set(err, TSR_E_STATE, "bench: the decoder stopped after %lld of %lld tokens",
                           (long long)gen->new_tokens, (long long)((n + 1) * n_seq));
    return st;
}

typedef struct bench_row {
    int threads;
    double pp_mean, pp_std, tg_mean, tg_std;
    double read_gbs, weight_gb_per_s, roofline;
    /* prefill's weight products in GOP/s (a multiply-add is 2), the machine's peak of the
     * kind they run on measured in the same run, and their ratio */
    double prefill_gops, peak_gops, peak_fraction;
    double expert_bytes_per_token; /* the routed experts' matrices a decoded token read */
    tsr_stage_times times; /* over the decode runs */
    double decode_secs;
    tsr_cache_stats cache; /* at the last token of the last decode run */
    int n_cache_reporting;
    double peak_rss_mib; /* before the bandwidth measurement allocates its buffer */
    double bits_per_weight, rel_rmse; /* what the quantizers made of the weights */
    /* over the decode runs: tokens per target forward, and of a decoder that drafts the
     * accepted fraction of its drafted tokens (-1 when it reports none) */
    double tokens_per_forward, acceptance;
} bench_row;

static tsr_status bench_threads(const model_opts *base, const bench_opts *b, int threads,
                                bench_row *row, uint64_t *weight_bytes, session *keep,
                                tsr_error *err) {
    model_opts o = *base;
    o.threads = threads;
    reset_peak_rss();
    session s;
    tsr_status st = tsr_session_open(&s, &o, err);
    if (st < 0) goto done;
    int64_t n_ctx = (int64_t)b->n_prompt > (int64_t)b->depth + 1 + b->n_gen + 1
                        ? b->n_prompt : (int64_t)b->depth + 1 + b->n_gen + 1;
    if ((st = tsr_session_pipeline(&s, n_ctx, err)) < 0) goto done;
    *weight_bytes = tsr_pipeline_weight_bytes(s.pl);
    tsr_pipeline_weight_quality(s.pl, &row->bits_per_weight, &row->rel_rmse);
    int32_t nv = s.model->hp.n_vocab, bos = tsr_tokenizer_bos(s.tok);
    if (bos < 0) bos = 0;
    int n = b->n_prompt;
    tsr_batch_entry *batch = calloc((size_t)n, sizeof *batch);
    int32_t *prompt = malloc(((size_t)b->depth + 1) * sizeof *prompt);
    float *logits = malloc((size_t)nv * sizeof *logits);
    double *pp = calloc((size_t)b->reps, sizeof *pp), *tg = calloc((size_t)b->reps, sizeof *tg);
    if (!batch || !prompt || !logits || !pp || !tg) {
        st = tsr_error_set(err, TSR_E_NOMEM, "bench: out of memory for a prompt of %d tokens and "
                           "a depth of %d", n, b->depth);
        goto out;
    }
    /* Fixed pseudo-random prompt ids: every run reads the same rows of the embedding. The
     * decode steps follow BOS and `depth` more of them. */
    uint32_t rng = 12345;
    for (int i = 0; i < n || i < b->depth; i++) {
        rng = rng * 1664525u + 1013904223u;
        int32_t id = (int32_t)(rng % (uint32_t)nv);
        if (i < n)
            batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = id,
                                         .want_logits = i == n - 1};
        if (i < b->depth) prompt[i + 1] = id;
    }
    prompt[0] = bos;
    double secs, warm;
    kv_probe probe = {.pl = s.pl, .at = b->n_gen + 1};
    tsr_stage_times warm_times = {0};
    /* Warm-up: page in the weights and settle the caches before timing. */
    if ((st = time_prefill(&s, batch, n < 32 ? n : 32, logits, &warm, err)) < 0) goto out;
    tsr_generate_stats gen;
    if ((st = time_decode(&s, prompt, 1, b->n_gen < 4 ? b->n_gen : 4, &probe, &gen, &warm,
                          &warm_times, err)) < 0)
        goto out;
    for (int r = 0; r < b->reps && n > 0; r++) {
        if ((st = time_prefill(&s, batch, n, logits, &secs, err)) < 0) goto out;
        pp[r] = n / secs;
    }
    row->times = (tsr_stage_times){0};
    double decode_secs = 0;
    int64_t tokens = 0, timed_tokens = 0, drafted = 0, accepted = 0;
    uint64_t forwards = 0;
    for (int r = 0; r < b->reps && b->n_gen > 0; r++) {
        probe = (kv_probe){.pl = s.pl, .at = b->n_gen + 1};
        if ((st = time_decode(&s, prompt, b->depth + 1, b->n_gen, &probe, &gen, &secs, &row->times,
                              err)) < 0)
            goto out;
        /* Each sequence's first token comes from the prompt's logits, before the timed steps. */
        int64_t untimed = gen.n_sequences > 1 ? gen.n_sequences : 1;
        tg[r] = (double)(gen.new_tokens - untimed) / secs;
        decode_secs += secs;
        tokens += gen.new_tokens;
        timed_tokens += gen.new_tokens - untimed;
        forwards += gen.target_forwards;
        drafted += gen.decoder.drafted;
        accepted += gen.decoder.accepted;
    }
    row->tokens_per_forward = forwards > 0 ? (double)tokens / (double)forwards : 0;
    row->acceptance = drafted > 0 ? (double)accepted / (double)drafted : -1;
    row->expert_bytes_per_token =
        timed_tokens > 0 ? (double)row->times.expert_bytes / (double)timed_tokens : 0;
    row->decode_secs = decode_secs;
    row->threads = threads;
    row->cache = probe.cache;
    row->n_cache_reporting = probe.n_cache_reporting;
    mean_std(pp, b->reps, &row->pp_mean, &row->pp_std);
    mean_std(tg, b->reps, &row->tg_mean, &row->tg_std);
    row->peak_rss_mib = peak_rss_mib();
    /* The machine's read bandwidth with the same threads, measured right after the runs so
     * both see the same neighbours on this shared machine. */
    row->read_gbs = tsr_measure_read_bandwidth(s.pool, (size_t)b->bandwidth_mib << 20, 5);
    /* Each target forward reads what every token reads once, whatever number of tokens it
     * yields; the experts as the graph read them. */
    row->weight_gb_per_s = row->tokens_per_forward > 0
                               ? ((double)*weight_bytes / row->tokens_per_forward +
                                  row->expert_bytes_per_token) *
                                     row->tg_mean * 1e-9
                               : 0;
    row->roofline = row->read_gbs > 0 ? row->weight_gb_per_s / row->read_gbs : 0;
    row->peak_gops =
        tsr_measure_peak_gops(s.pool, prefill_peak_kind(s.model), b->peak_ms * 1e-3);
    row->prefill_gops = 2 * prefill_macs_per_token(s.model) * row->pp_mean * 1e-9;
    row->peak_fraction = row->peak_gops > 0 ? row->prefill_gops / row->peak_gops : 0;
out:
    free(pp);
    free(tg);
    free(batch);
    free(prompt);
    free(logits);
done:
    if (st >= 0 && keep && !keep->model) *keep = s;
    else tsr_session_close(&s);
    return st;
}

/* What decode spent its time on, and what the decoder yielded per forward of the target. */
static void print_decode_tables(const char *decoder, const bench_opts *b, const bench_row *rows) {
    printf("\n| threads | decoder | tokens per target forward | drafts accepted |\n");
    printf("| ---: | --- | ---: | ---: |\n");
    for (int i = 0; i < b->n_threads; i++) {
        char acceptance[32] = "-";
        if (rows[i].acceptance >= 0)
            snprintf(acceptance, sizeof acceptance, "%.1f%%", 100.0 * rows[i].acceptance);
        printf("| %d | %s | %.3f | %s |\n", rows[i].threads, decoder, rows[i].tokens_per_forward,
               acceptance);
    }
    printf("\n| threads | decode time in: matmul | attention | cache | decoder | other ops | router |"
           " host | KV bytes | peak RSS |\n");
    printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < b->n_threads; i++) {
        const bench_row *r = &rows[i];
        double total = r->decode_secs * 1e9;
        const tsr_stage_times *t = &r->times;
        double staged = (double)(t->matmul + t->attention + t->cache + t->decoder + t->other_ops +
                                 t->router);
        double pct = total > 0 ? 100.0 / total : 0;
        printf("| %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %llu | "
               "%.1f MiB |\n",
               r->threads, (double)t->matmul * pct, (double)t->attention * pct,
               (double)t->cache * pct, (double)t->decoder * pct, (double)t->other_ops * pct,
               (double)t->router * pct, (total - staged) * pct, (unsigned long long)r->cache.bytes_reserved,
               r->peak_rss_mib);
    }
}

static void print_markdown(const char *model_path, const char *type, const char *decoder,
                           const tsr_model *m, uint64_t weight_bytes, const bench_opts *b,
                           const bench_row *rows) {
    printf("| model | type | weights | threads | test | tokens/s | weights read | roofline | "
           "products | of the peak |\n");
    printf("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    const char *name = strrchr(model_path, '/') ? strrchr(model_path, '/') + 1 : model_path;
    const char *kind = peak_kind_name(prefill_peak_kind(m));
    for (int i = 0; i < b->n_threads; i++) {
        const bench_row *r = &rows[i];
        printf("| %s | %s | %.1f MiB | %d | pp%d | %.2f ± %.2f | | | %.1f GOP/s of %.1f %s | "
               "%.0f%% |\n", name, type, (double)weight_bytes / 1048576.0, r->threads,
               b->n_prompt, r->pp_mean, r->pp_std, r->prefill_gops, r->peak_gops, kind,
               100.0 * r->peak_fraction);
        if (b->n_gen == 0) continue; /* -n 0: prefill alone */
        char depth[32] = "";
        if (b->depth) snprintf(depth, sizeof depth, " @ d%d", b->depth);
        printf("| %s | %s | %.1f MiB | %d | tg%d%s | %.2f ± %.2f | %.2f GB/s of %.2f | %.0f%% | "
               "| |\n",
               name, type, (double)weight_bytes / 1048576.0, r->threads, b->n_gen, depth,
               r->tg_mean, r->tg_std, r->weight_gb_per_s, r->read_gbs, 100.0 * r->roofline);
    }
    if (m->hp.n_expert > 0)
        printf("\nweights: %.1f MiB every target forward reads, plus the experts routed to (%d of "
               "%d per layer): %.1f MiB per decoded token, measured\n",
               (double)weight_bytes / 1048576.0, m->hp.n_expert_used, m->hp.n_expert,
               rows[0].expert_bytes_per_token / 1048576.0);
    if (b->n_gen > 0) print_decode_tables(decoder, b, rows);
    if (rows[0].n_cache_reporting == 0) return;
    printf("\n| threads | KV entries held | evicted | KV bytes | peak | bits per stored value |\n");
    printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < b->n_threads; i++) {
        const tsr_cache_stats *c = &rows[i].cache;
        char bits[32] = "-";
        if (c->bits_per_value > 0) snprintf(bits, sizeof bits, "%.2f", c->bits_per_value);
        printf("| %d | %lld | %lld | %llu | %llu | %s |\n", rows[i].threads, (long long)c->entries,
               (long long)c->evicted, (unsigned long long)c->bytes_reserved,
               (unsigned long long)c->bytes_peak, bits);
    }
}

static void print_json(const char *model_path, const char *type, const char *decoder,
                       const tsr_model *m, uint64_t weight_bytes, const bench_opts *b,
                       const bench_row *rows) {
    json_t *results = json_array();
    for (int i = 0; i < b->n_threads; i++) {
        const bench_row *r = &rows[i];
        const tsr_stage_times *t = &r->times;
        json_array_append_new(results, json_pack(
            "{s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:f, "
            "s:o, s:f, s:f, s:f, s:{s:f, s:f, s:f, s:f, s:f, s:f, s:f}, s:o}",
            "threads", r->threads, "n_prompt", b->n_prompt, "n_gen", b->n_gen, "n_depth",
            b->depth, "peak_rss_mib",
            r->peak_rss_mib, "bits_per_weight", r->bits_per_weight, "mean_rel_rmse", r->rel_rmse,
            "prefill_tps_mean", r->pp_mean, "prefill_tps_std", r->pp_std,
            "decode_tps_mean", r->tg_mean, "decode_tps_std", r->tg_std,
            "expert_bytes_per_token", r->expert_bytes_per_token,
            "decode_weight_gbs", r->weight_gb_per_s, "machine_read_gbs", r->read_gbs,
            "roofline_fraction", r->roofline, "kv_bytes", (json_int_t)r->cache.bytes_reserved,
            "decode_tokens_per_forward", r->tokens_per_forward, "decode_acceptance_rate",
            r->acceptance >= 0 ? json_real(r->acceptance) : json_null(), "prefill_gops",
            r->prefill_gops, "peak_gops", r->peak_gops, "prefill_peak_fraction",
            r->peak_fraction, "decode_seconds",
            "matmul", (double)t->matmul * 1e-9, "attention",
            (double)t->attention * 1e-9, "cache", (double)t->cache * 1e-9, "decoder",
            (double)t->decoder * 1e-9, "other_ops", (double)t->other_ops * 1e-9, "router",
            (double)t->router * 1e-9, "total", r->decode_secs, "cache",
            tsr_session_cache_json(&r->cache, r->n_cache_reporting)));
    }
    /* What the roofline counts: the bytes every target forward reads, and for a model with
     * experts the routed experts' bytes each decoded token read, measured
     * (expert_bytes_per_token of each result). */
    json_t *root = json_pack(
        "{s:s, s:s, s:s, s:i, s:i, s:i, s:i, s:I, s:s, s:s, s:f, s:i, s:o}", "model", model_path,
        "type", type, "decoder", decoder, "n_layer", m->hp.n_layer, "n_embd", m->hp.n_embd,
        "n_expert", m->hp.n_expert, "n_expert_used", m->hp.n_expert_used, "weight_bytes_per_token",
        (json_int_t)weight_bytes, "weight_bytes_counted",
        m->hp.n_expert > 0 ? "every matrix each target forward reads (attention, routers, shared "
                             "experts, output head), plus the routed experts' matrices read per "
                             "decoded token, measured: expert_bytes_per_token of each result"
                           : "every weight matrix of the blocks and the output head, once per "
                             "target forward",
        "peak_kind", peak_kind_name(prefill_peak_kind(m)), "prefill_macs_per_token",
        prefill_macs_per_token(m), "repetitions", b->reps, "results", results);
    char *text = json_dumps(root, JSON_INDENT(2));
    printf("%s\n", text);
    free(text);
    json_decref(root);
}

/* "1,2,4": the thread counts to measure, one run each. */
static bool parse_thread_list(const char *text, bench_opts *b) {
    int64_t threads[16];
    if (!tsr_cli_int_list("bench", "-t", text, 1, TSR_CLI_THREADS_MAX, "thread counts", threads,
                          16, &b->n_threads))
        return false;
    for (int i = 0; i < b->n_threads; i++) b->threads[i] = (int)threads[i];
    return true;
}

int tsr_cli_bench(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    bench_opts b = {.threads = {1}, .n_threads = 1};
    int64_t n_prompt = 512, n_gen = 128, reps = 5, bandwidth_mib = 1024, depth = 0;
    int64_t peak_ms = 1000;
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera bench -m MODEL [CONFIG.yaml] [-p 512] [-n 128] [-d 0] [-t 1,2]\n"
                   "                     [-r 5] [--bandwidth-mib 1024] [--peak-ms 1000] [--json]\n"
                   "                     [--set K=V]...\n"
                   "                     [--plugin-dir DIR]...\n"
                   "Prefill (-p tokens in one batch) and decode (-n new tokens through the\n"
                   "configured decoder, as `run` makes them, after a prompt of -d tokens that is\n"
                   "not timed) speed for each thread count, mean and deviation over -r repetitions\n"
                   "after a warm-up (-n 0: prefill alone); a decoder of several continuations\n"
                   "(parallel) makes -n for each, and all are counted. Then the tokens each target\n"
                   "forward yields and, for a decoder that drafts, the fraction of drafts accepted;\n"
                   "the weights read per decoded token (of a model with experts: what every target\n"
                   "forward reads plus the experts each token was routed to, as read), the\n"
                   "machine's own read bandwidth measured in the same run, and the fraction of that\n"
                   "roofline decode reaches; where the decode time goes, stage by stage; what the\n"
                   "cache policies hold at the last decode step (entries, the request's evictions,\n"
                   "KV bytes and bits per stored value). --bandwidth-mib sizes the buffer the\n"
                   "bandwidth measurement reads; keep it well above the last-level cache. Prefill's\n"
                   "weight products (2 operations a multiply-add) against the machine's peak\n"
                   "measured in the same run for --peak-ms: int8 (VNNI vpdpbusd) for quantized\n"
                   "weights, f32 (FMA) for F32, F16, BF16; 0 where the CPU has no such\n"
                   "instruction.\n");
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const char *a = argv[i], *thread_list = NULL;
        const tsr_cli_int_opt ints[] = {
            {"-p", NULL, "PROMPT_TOKENS", 1, INT32_MAX, &n_prompt},
            {"-n", NULL, "NEW_TOKENS", 0, INT32_MAX, &n_gen},
            {"-r", NULL, "REPETITIONS", 1, 1000, &reps},
            {"--bandwidth-mib", NULL, "MIB", 1, 1 << 20, &bandwidth_mib},
            {"-d", "--depth", "DEPTH_TOKENS", 0, INT32_MAX - 2, &depth},
            {"--peak-ms", NULL, "MILLISECONDS", 1, 60000, &peak_ms}};
        const tsr_cli_text_opt threads[] = {{"-t", "--threads", "THREADS[,THREADS...]",
                                             &thread_list}};
        /* -t here is a list, read before the shared options take it as one count. */
        int took = tsr_cli_take_text("bench", argc, argv, &i, threads, 1);
        if (took > 0 && !parse_thread_list(thread_list, &b)) took = -1;
        if (took == 0) took = tsr_session_take_opt("bench", argc, argv, &i, &o);
        if (took == 0) took = tsr_cli_take_int("bench", argc, argv, &i, ints, 6);
        if (took == 0) took = tsr_cli_take_flag(a, "--json", NULL, &b.json);
        if (took == 0) took = (tsr_cli_bad_arg("bench", a), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    b.n_prompt = (int)n_prompt;
    b.n_gen = (int)n_gen;
    b.reps = (int)reps;
    b.depth = (int)depth;
    b.bandwidth_mib = (int)bandwidth_mib;
    b.peak_ms = (int)peak_ms;
    bench_row rows[16];
    memset(rows, 0, sizeof rows);
    tsr_error err;
    session first = {0};
    uint64_t weight_bytes = 0;
    int status = TSR_EXIT_FAIL;
    for (int i = 0; i < b.n_threads; i++) {
        fprintf(stderr, "tessera: bench: %d thread%s...\n", b.threads[i], b.threads[i] > 1 ? "s" : "");
        if (bench_threads(&o, &b, b.threads[i], &rows[i], &weight_bytes, &first, &err) < 0)
            goto fail;
    }
    const char *path = o.model ? o.model : first.cfg->model_path;
    const char *decoder = first.cfg->stage[TSR_STAGE_DECODER].plugin;
    if (b.json)
        print_json(path, main_dtype(first.model), decoder, first.model, weight_bytes, &b, rows);
    else
        print_markdown(path, main_dtype(first.model), decoder, first.model, weight_bytes, &b,
                       rows);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    tsr_session_close(&first);
    free(o.sets);
    return status;
}
