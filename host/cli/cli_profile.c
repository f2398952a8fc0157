/* `tessera profile-heads`: which KV heads attend beyond the sinks and a recent window, measured
 * on a text, written as the head file DuoAttention's plugins read (<tessera/sdk_heads.h>). */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/number.h"
#include "base/outfile.h"
#include "cli/cli_session.h"

typedef struct profile_opts {
    const char *text_path, *out_path;
    int64_t sink, window, ctx, max_chunks;
    double retrieval; /* fraction of KV heads made retrieval heads */
    bool json;
} profile_opts;

/* What the run measured, and the split made from it. */
typedef struct profile {
    int32_t n_layer, n_head, n_kv_head;
    int64_t n_chunks, queries; /* queries that had positions outside the sinks and window */
    float *mass;               /* (n_layer, n_head) summed over those queries */
    double *kv_score;          /* (n_layer, n_kv_head) its query heads' largest mean */
    bool *retrieval;           /* (n_layer, n_kv_head) */
    int64_t n_retrieval;
} profile;

static void profile_usage(void) {
    printf("usage: tessera profile-heads -m MODEL [CONFIG.yaml] -f TEXT [--sink 4] [--window 252]\n"
           "                             [--ctx 512] [--chunks K] [--retrieval 0.5] [--out FILE]\n"
           "                             [--json] [-t T] [--set K=V]... [--plugin-dir DIR]...\n"
           "Runs the model over TEXT (cut into chunks of --ctx tokens, each from an empty\n"
           "cache and starting with BOS) with the attention plugin's per-head statistics on,\n"
           "and scores each query head by the attention probability it puts outside the first\n"
           "--sink positions and the --window positions before each query, averaged over the\n"
           "queries that have positions there; a KV head scores its query heads' largest. The\n"
           "--retrieval fraction of KV heads with the highest scores become retrieval heads\n"
           "(they read every entry), the others streaming heads (sinks and window only).\n"
           "Writes the head file that the duo attention and the streaming cache's heads\n"
           "parameter read (docs/plugins/attention.md) to --out FILE, else to stdout; --json\n"
           "prints the profile as JSON on stdout instead. The attention plugin must measure the\n"
           "statistics (reference and flash do).\n");
}

/* Highest score first; ties by (layer, KV head). */
static int kv_rank_cmp(const void *a, const void *b, void *scores) {
    const double *s = scores;
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    if (s[x] != s[y]) return s[x] > s[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* Runs every chunk with the statistics on; fills p->mass, p->queries and p->n_chunks. */
static tsr_status profile_run(session *s, const profile_opts *o, const int32_t *ids, size_t n_ids,
                              profile *p, tsr_error *err) {
    const int64_t len = (int64_t)n_ids < o->ctx ? (int64_t)n_ids : o->ctx;
    p->n_chunks = tsr_session_chunk_count(n_ids, len, o->max_chunks);
    /* A query at q has positions outside once q - window - 1 >= sink. */
    const int64_t per_chunk = len - (o->sink + o->window + 1);
    if (per_chunk <= 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: chunks of %lld tokens leave no query "
                             "positions beyond the %lld sinks and the %lld-position window; give "
                             "a longer text, a larger --ctx or a smaller --window", o->text_path,
                             (long long)len, (long long)o->sink, (long long)o->window);
    tsr_status st = tsr_session_pipeline(s, len, err);
    if (st < 0) return st;
    /* The ABI's window includes the query's own position: inside when p > q - stats_window. */
    tsr_pipeline_profile_heads(s->pl, p->mass, (int32_t)o->sink, (int32_t)o->window + 1);
    st = tsr_session_run_chunks(s, ids, len, p->n_chunks, "profile-heads", err);
    p->queries = p->n_chunks * per_chunk;
    tsr_pipeline_profile_heads(s->pl, NULL, 0, 0);
    return st;
}

/* Scores and split; refuses when the attention plugin measured nothing. */
static tsr_status profile_split(const session *s, const profile_opts *o, profile *p,
                                tsr_error *err) {
    const int32_t group = p->n_head / p->n_kv_head;
    const int64_t n_kv = (int64_t)p->n_layer * p->n_kv_head;
    bool any = false;
    for (int64_t i = 0; i < (int64_t)p->n_layer * p->n_head; i++) any |= p->mass[i] != 0.0f;
    if (!any)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "attention plugin '%s' added nothing to the "
                             "per-head statistics (tsr_attention_call.head_mass): it does not "
                             "measure them; profile with reference or flash (--set "
                             "attention.plugin=flash)", s->cfg->stage[TSR_STAGE_ATTENTION].plugin);
    int64_t *order = malloc((size_t)n_kv * sizeof *order);
    if (!order) return tsr_error_set(err, TSR_E_NOMEM, "profile-heads: out of memory");
    for (int64_t u = 0; u < n_kv; u++) {
        double best = 0.0;
        for (int32_t hg = 0; hg < group; hg++)
            best = fmax(best, (double)p->mass[u * group + hg] / (double)p->queries);
        p->kv_score[u] = best;
        order[u] = u;
    }
    qsort_r(order, (size_t)n_kv, sizeof *order, kv_rank_cmp, p->kv_score);
    p->n_retrieval = llround(o->retrieval * (double)n_kv);
    for (int64_t r = 0; r < n_kv; r++) p->retrieval[order[r]] = r < p->n_retrieval;
    free(order);
    return TSR_OK;
}

/* The head file (<tessera/sdk_heads.h>). */
static void profile_write(FILE *f, const char *model, const profile_opts *o, const profile *p) {
    const int32_t group = p->n_head / p->n_kv_head;
    fprintf(f, "# tessera profile-heads: model %s, text %s (%lld chunks of up to %lld tokens).\n"
            "# Score: the attention probability a query head puts outside the first %lld\n"
            "# positions and the %lld before each query, averaged over %lld queries; a KV head's\n"
            "# is its query heads' largest. The %lld KV heads of highest score (--retrieval %g)\n"
            "# are retrieval heads.\n",
            model, o->text_path, (long long)p->n_chunks, (long long)o->ctx, (long long)o->sink,
            (long long)o->window, (long long)p->queries, (long long)p->n_retrieval, o->retrieval);
    fprintf(f, "tessera-heads 1\nlayers %d heads %d kv_heads %d\nsink %lld\nwindow %lld\n",
            (int)p->n_layer, (int)p->n_head, (int)p->n_kv_head, (long long)o->sink,
            (long long)o->window);
    fprintf(f, "# layer kv_head role score query_head_scores...\n");
    for (int32_t l = 0; l < p->n_layer; l++) {
        for (int32_t g = 0; g < p->n_kv_head; g++) {
            int64_t u = (int64_t)l * p->n_kv_head + g;
            fprintf(f, "%d %d %s %.6f", (int)l, (int)g, p->retrieval[u] ? "retrieval" : "streaming",
                    p->kv_score[u]);
            for (int32_t hg = 0; hg < group; hg++)
                fprintf(f, " %.6f", (double)p->mass[u * group + hg] / (double)p->queries);
            fputc('\n', f);
        }
    }
}

static json_t *profile_json(const char *model, const profile_opts *o, const profile *p) {
    const int32_t group = p->n_head / p->n_kv_head;
    json_t *heads = json_array();
    for (int64_t u = 0; u < (int64_t)p->n_layer * p->n_kv_head; u++) {
        json_t *q = json_array();
        for (int32_t hg = 0; hg < group; hg++)
            json_array_append_new(q, json_real((double)p->mass[u * group + hg] / (double)p->queries));
        json_array_append_new(heads, json_pack("{s:i, s:i, s:s, s:f, s:o}", "layer",
                                               (int)(u / p->n_kv_head), "kv_head",
                                               (int)(u % p->n_kv_head), "role",
                                               p->retrieval[u] ? "retrieval" : "streaming",
                                               "score", p->kv_score[u], "query_heads", q));
    }
    return json_pack("{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:f, s:I, s:o}", "model", model,
                     "text", o->text_path, "ctx", (json_int_t)o->ctx, "chunks",
                     (json_int_t)p->n_chunks, "sink", (json_int_t)o->sink, "window",
                     (json_int_t)o->window, "queries", (json_int_t)p->queries,
                     "retrieval_fraction", o->retrieval, "retrieval_heads",
                     (json_int_t)p->n_retrieval, "heads", heads);
}

/* --retrieval F: a number in [0, 1]. */
static bool take_fraction(const char *text, double *out) {
    char quoted[64];
    if (tsr_text_to_float(text, out) && *out >= 0.0 && *out <= 1.0) return true;
    tsr_cli_error("profile-heads: --retrieval: expected a number in [0, 1], got '%s'",
                  tsr_text_excerpt(quoted, sizeof quoted, text));
    return false;
}

int tsr_cli_profile_heads(int argc, char **argv) {
    model_opts mo = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    profile_opts o = {.sink = 4, .window = 252, .ctx = 512, .max_chunks = -1, .retrieval = 0.5};
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            profile_usage();
            free(mo.sets);
            return TSR_EXIT_OK;
        }
        const char *a = argv[i], *fraction = NULL;
        const tsr_cli_text_opt texts[] = {{"-f", "--file", "TEXT", &o.text_path},
                                          {"--out", "-o", "FILE", &o.out_path},
                                          {"--retrieval", NULL, "FRACTION", &fraction}};
        const tsr_cli_int_opt ints[] = {{"--sink", NULL, "POSITIONS", 0, 1 << 20, &o.sink},
                                        {"--window", NULL, "POSITIONS", 1, 1 << 20, &o.window},
                                        {"--ctx", NULL, "TOKENS", 2, 1 << 20, &o.ctx},
                                        {"--chunks", NULL, "K", 1, INT32_MAX, &o.max_chunks}};
        int took = tsr_session_take_opt("profile-heads", argc, argv, &i, &mo);
        if (took == 0) took = tsr_cli_take_text("profile-heads", argc, argv, &i, texts, 3);
        if (took > 0 && fraction && !take_fraction(fraction, &o.retrieval)) took = -1;
        if (took == 0) took = tsr_cli_take_int("profile-heads", argc, argv, &i, ints, 4);
        if (took == 0) took = tsr_cli_take_flag(a, "--json", NULL, &o.json);
        if (took == 0) took = (tsr_cli_bad_arg("profile-heads", a), -1);
        if (took < 0) {
            free(mo.sets);
            return TSR_EXIT_USAGE;
        }
    }
    if (!o.text_path) {
        tsr_cli_error("profile-heads: -f TEXT is required (see tessera profile-heads --help)");
        free(mo.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    session s = {0};
    char *text = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n_ids = 0;
    profile p = {0};
    tsr_outfile out = {0};
    int status = TSR_EXIT_FAIL;
    if (!(text = tsr_session_read_file(o.text_path, &len, &err))) goto fail;
    if (tsr_session_open(&s, &mo, &err) < 0) goto fail;
    const char *model = mo.model ? mo.model : s.cfg->model_path;
    /* A bad output path is refused before the work. */
    if (o.out_path && tsr_outfile_open(&out, o.out_path, model, &err) < 0) goto fail;
    if (tsr_tokenize(s.tok, text, len, true, false, &ids, &n_ids, &err) < 0) goto fail;
    if (n_ids == 0) {
        tsr_error_set(&err, TSR_E_INVALID, "%s: no tokens to profile", o.text_path);
        goto fail;
    }
    const tsr_hparams *hp = &s.model->hp;
    p = (profile){.n_layer = hp->n_layer, .n_head = hp->n_head, .n_kv_head = hp->n_kv_head};
    p.mass = calloc((size_t)hp->n_layer * (size_t)hp->n_head, sizeof *p.mass);
    p.kv_score = calloc((size_t)hp->n_layer * (size_t)hp->n_kv_head, sizeof *p.kv_score);
    p.retrieval = calloc((size_t)hp->n_layer * (size_t)hp->n_kv_head, sizeof *p.retrieval);
    if (!p.mass || !p.kv_score || !p.retrieval) {
        tsr_error_set(&err, TSR_E_NOMEM, "profile-heads: out of memory");
        goto fail;
    }
    if (profile_run(&s, &o, ids, n_ids, &p, &err) < 0) goto fail;
    if (profile_split(&s, &o, &p, &err) < 0) goto fail;
    if (o.out_path) {
        char *body = NULL;
        size_t size = 0;
        FILE *mem = open_memstream(&body, &size);
        if (!mem) {
            tsr_error_set(&err, TSR_E_NOMEM, "profile-heads: out of memory");
            goto fail;
        }
        profile_write(mem, model, &o, &p);
        fclose(mem);
        tsr_outfile_write(&out, body, size);
        free(body);
        if (tsr_outfile_commit(&out, &err) < 0) goto fail;
    }
    if (o.json) {
        json_t *root = profile_json(model, &o, &p);
        char *dump = root ? json_dumps(root, JSON_INDENT(2)) : NULL;
        json_decref(root);
        if (!dump) {
            tsr_error_set(&err, TSR_E_NOMEM, "profile-heads --json: out of memory");
            goto fail;
        }
        printf("%s\n", dump);
        free(dump);
    } else if (!o.out_path) {
        profile_write(stdout, model, &o, &p);
    }
    fprintf(stderr, "tessera: profile-heads: %d layers x %d KV heads over %lld queries: %lld "
            "retrieval heads\n", (int)p.n_layer, (int)p.n_kv_head, (long long)p.queries,
            (long long)p.n_retrieval);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    tsr_outfile_discard(&out);
    free(p.mass);
    free(p.kv_score);
    free(p.retrieval);
    free(text);
    free(ids);
    tsr_session_close(&s);
    free(mo.sets);
    return status;
}
