/* `tessera perplexity --ubatch / --prefill / --kl-base` and `tessera compare`, run as a user
 * runs them on stories260K: feeding that lets a cache policy evict inside a chunk, KL
 * divergence and top-1 agreement checked against a computation of their own from the logits
 * `tessera logits` prints, and one error line for bad input. Needs the shared data folder
 * (skips without it). */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_testutil.h"
#include "testutil.h"

#define STORIES "models/stories260K.gguf"
#define VAL_TEXT "data/tinystories_val.txt"
#define N_VOCAB 512

static double number(json_t *root, const char *key) {
    json_t *v = json_object_get(root, key);
    ck_assert_msg(json_is_number(v), "no number '%s'", key);
    return json_number_value(v);
}

/* perplexity --json on stories260K over the TinyStories text, with extra arguments (NULL
 * ended, at most 12). */
static json_t *perplexity(const char *ctx, const char *chunks, const char *const *extra) {
    char *model = tsr_test_data(STORIES), *text = tsr_test_data(VAL_TEXT);
    const char *args[32] = {"perplexity", "-m", model, "-f", text, "--ctx", ctx, "--chunks",
                            chunks, "--json"};
    int n = 10;
    for (; extra && *extra; extra++) args[n++] = *extra;
    args[n] = NULL;
    json_t *r = run_json(args);
    free(model);
    free(text);
    return r;
}

static double ppl_of(const char *ctx, const char *chunks, const char *const *extra) {
    json_t *r = perplexity(ctx, chunks, extra);
    double ppl = number(r, "ppl");
    json_decref(r);
    return ppl;
}

/* At ctx 512 a streaming cache of 4 + 60 entries gives full's perplexity exactly when each
 * chunk is one forward (nothing is evicted before every query has seen every key), and its
 * own once --ubatch 1 feeds a token per forward. */
START_TEST(ubatch_lets_a_cache_policy_evict) {
    const char *streaming[] = {"--set", "cache.plugin=streaming", "--set", "cache.window=60",
                               NULL, NULL, NULL, NULL, NULL};
    double full = ppl_of("512", "2", NULL);
    ck_assert_msg(ppl_of("512", "2", streaming) == full, "streaming in one forward != full");
    const char *full_ub1[] = {"--ubatch", "1", NULL};
    double full_fed = ppl_of("512", "2", full_ub1);
    ck_assert_msg(fabs(full_fed - full) <= 1e-5 * full, "full: %.9g by token, %.9g at once",
                  full_fed, full);
    streaming[4] = "--ubatch";
    streaming[5] = "1";
    json_t *r = perplexity("512", "2", streaming);
    double evicting = number(r, "ppl");
    ck_assert_msg(evicting > full * 1.01, "streaming by token %.9g, full %.9g", evicting, full);
    ck_assert_str_eq(json_string_value(json_object_get(r, "feeding")), "1 token per forward");
    ck_assert_int_eq(number(r, "ubatch"), 1);
    ck_assert_int_eq(number(r, "prefill"), 1);
    ck_assert_int_eq(number(r, "scored_tokens"), 2 * 255);
    json_decref(r);
    /* A prefill of the whole chunk is one forward again; of 300 tokens, the queries past 300
     * come one at a time and see a cache that has evicted. */
    streaming[6] = "--prefill";
    streaming[7] = "512";
    ck_assert_msg(ppl_of("512", "2", streaming) == full, "prefill of the whole chunk != full");
    streaming[7] = "300";
    r = perplexity("512", "2", streaming);
    double later = number(r, "ppl");
    ck_assert_msg(later != full && later != evicting, "prefill 300: %.9g", later);
    ck_assert_str_eq(json_string_value(json_object_get(r, "feeding")),
                     "prefill 300 tokens, then 1 token per forward");
    json_decref(r);
    /* The first forward holds --prefill tokens and each later one --ubatch: three groupings
     * of a chunk, three results. */
    const char *groupings[3][9] = {
        {"--set", "cache.plugin=streaming", "--set", "cache.window=12", "--ubatch", "1", NULL},
        {"--set", "cache.plugin=streaming", "--set", "cache.window=12", "--ubatch", "2", NULL},
        {"--set", "cache.plugin=streaming", "--set", "cache.window=12", "--ubatch", "2",
         "--prefill", "1"}};
    double by[3];
    for (int i = 0; i < 3; i++) by[i] = ppl_of("128", "2", groupings[i]);
    ck_assert_msg(by[0] != by[1] && by[1] != by[2] && by[0] != by[2], "%.9g %.9g %.9g", by[0],
                  by[1], by[2]);
}
END_TEST

/* ---- KL divergence, computed here from `tessera logits` ----------------------------------- */

/* The first `n` token ids of the text as perplexity's first chunk holds them (BOS first). */
static void first_chunk_ids(int n, char *ids, size_t size) {
    char *model = tsr_test_data(STORIES), *text = tsr_test_data(VAL_TEXT);
    const char *args[] = {"tokenize", "-m", model, "-f", text, NULL};
    char *out = run_ok(args);
    char *p = out;
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        long id = strtol(p, &p, 10);
        used += (size_t)snprintf(ids + used, size - used, "%s%ld", i ? " " : "", id);
        ck_assert(used < size);
    }
    free(out);
    free(model);
    free(text);
}

/* The logits of every position of `ids` in one forward, with `set` (may be NULL). */
static float *logits_of(const char *ids, const char *set, size_t *n) {
    tmp t = {0};
    char *model = tsr_test_data(STORIES);
    const char *out = tmp_path(&t, "logits.f32");
    const char *args[] = {"logits", "-m", model, "--tokens", ids, "--out", out,
                          set ? "--set" : NULL, set, NULL};
    free(run_ok(args));
    size_t bytes;
    float *v = (float *)tsr_test_read_file(out, &bytes);
    *n = bytes / sizeof *v;
    tmp_free(&t);
    free(model);
    return v;
}

/* KL(p || q) of two logit rows, summed in long double from log-sum-exp of each. */
static double kl_of_rows(const float *p, const float *q, int n, int *same_top) {
    long double mp = p[0], mq = q[0], sp = 0, sq = 0, kl = 0;
    int tp = 0, tq = 0;
    for (int i = 1; i < n; i++) {
        if (p[i] > p[tp]) tp = i;
        if (q[i] > q[tq]) tq = i;
    }
    mp = p[tp];
    mq = q[tq];
    for (int i = 0; i < n; i++) {
        sp += expl((long double)p[i] - mp);
        sq += expl((long double)q[i] - mq);
    }
    for (int i = 0; i < n; i++) {
        long double lp = (long double)p[i] - mp - logl(sp), lq = (long double)q[i] - mq - logl(sq);
        kl += expl(lp) * (lp - lq);
    }
    *same_top = tp == tq;
    return (double)kl;
}

/* Mean KL and top-1 agreement over the scored positions [ctx/2, ctx - 1) of the text's first
 * chunk: the default pipeline against the same with weights at q8_0. */
static void expected_kl(int ctx, double *kl, double *top1) {
    char ids[8192];
    first_chunk_ids(ctx, ids, sizeof ids);
    size_t na, nb;
    float *a = logits_of(ids, NULL, &na), *b = logits_of(ids, "quantizer.type=q8_0", &nb);
    ck_assert_int_eq(na, (size_t)ctx * N_VOCAB);
    ck_assert_int_eq(nb, na);
    double sum = 0;
    int same = 0, count = 0;
    for (int j = ctx / 2; j < ctx - 1; j++, count++) {
        int top;
        sum += kl_of_rows(a + (size_t)j * N_VOCAB, b + (size_t)j * N_VOCAB, N_VOCAB, &top);
        same += top;
    }
    *kl = sum / count;
    *top1 = (double)same / count;
    free(a);
    free(b);
}

/* `x` reports the KL and top-1 agreement expected_kl computes at ctx 128. */
static void check_q8_0_kl(json_t *x) {
    double kl, top1;
    expected_kl(128, &kl, &top1);
    ck_assert_msg(kl > 1e-5, "q8_0 KL %g", kl);
    ck_assert_msg(fabs(number(x, "kl_mean") - kl) <= 1e-4 * kl, "KL %.9g, computed %.9g",
                  number(x, "kl_mean"), kl);
    ck_assert_msg(number(x, "top1_agreement") == top1, "top-1 %.9g, computed %.9g",
                  number(x, "top1_agreement"), top1);
}

START_TEST(kl_base_against_itself_and_q8_0) {
    tmp t = {0};
    const char *base = tmp_path(&t, "base.kl");
    const char *write[] = {"--kl-base", base, NULL};
    double ppl = ppl_of("128", "1", write);
    size_t size;
    free(tsr_test_read_file(base, &size));
    ck_assert_int_eq(size, 32 + 128 * 4 + 63 * N_VOCAB * 4);
    const char *same[] = {"--kl-base", base, "--kl", NULL};
    json_t *r = perplexity("128", "1", same);
    ck_assert(number(r, "ppl") == ppl);
    ck_assert(number(r, "kl_mean") == 0);
    ck_assert(number(r, "top1_agreement") == 1);
    json_decref(r);
    const char *q8[] = {"--kl-base", base, "--kl-divergence", "--set", "quantizer.type=q8_0",
                        NULL};
    r = perplexity("128", "1", q8);
    check_q8_0_kl(r);
    json_decref(r);
    tmp_free(&t);
}
END_TEST

/* A baseline written for another run is refused with one line naming what differs. */
START_TEST(kl_base_mismatch_is_one_line) {
    tmp t = {0};
    char *model = tsr_test_data(STORIES), *text = tsr_test_data(VAL_TEXT);
    const char *base = tmp_path(&t, "base.kl");
    const char *write[] = {"--kl-base", base, NULL};
    json_decref(perplexity("64", "2", write));
    struct {
        const char *ctx, *chunks, *want;
    } cases[] = {
        {"128", "2", "written with --ctx 64; this run has --ctx 128"},
        {"64", "1", "written for 2 chunks; this run scores 1 (--chunks)"},
    };
    for (size_t i = 0; i < 2; i++) {
        const char *args[] = {"perplexity", "-m", model, "-f", text, "--ctx", cases[i].ctx,
                              "--chunks", cases[i].chunks, "--kl-base", base, "--kl", NULL};
        char *err = run_error(1, args), want[4300];
        snprintf(want, sizeof want, "tessera: %s: %s\n", base, cases[i].want);
        ck_assert_str_eq(err, want);
        free(err);
    }
    /* Another text of as many tokens: "Spot saw the" made "Spot the saw". */
    const char *swapped = tmp_path(&t, "swapped.txt");
    size_t len;
    char *bytes = tsr_test_read_file(text, &len);
    ck_assert(memcmp(bytes, "Spot. Spot saw the ", 19) == 0);
    memcpy(bytes + 11, "the saw", 7);
    ck_assert_int_eq(tsr_test_write_file(swapped, bytes, len), 0);
    free(bytes);
    const char *other[] = {"perplexity", "-m", model, "-f", swapped, "--ctx", "64", "--chunks",
                           "2", "--kl-base", base, "--kl", NULL};
    char *err = run_error(1, other), want[4300];
    snprintf(want, sizeof want, "tessera: %s: token 8 is 394 there and 265 in this text: "
             "written for another text or tokenizer\n", base);
    ck_assert_str_eq(err, want);
    free(err);
    /* Half the text: fewer tokens. */
    bytes = tsr_test_read_file(text, &len);
    ck_assert_int_eq(tsr_test_write_file(swapped, bytes, len / 2), 0);
    free(bytes);
    err = run_error(1, other);
    ck_assert_msg(strstr(err, "base.kl: written for a text of ") && strstr(err, " tokens; this "
                  "text has "), "%s", err);
    free(err);
    /* Cut short, a byte too long, and a file of something else. */
    const char *cut = tmp_path(&t, "cut.kl");
    bytes = tsr_test_read_file(base, &len);
    ck_assert_int_eq(tsr_test_write_file(cut, bytes, len - 4), 0);
    const char *short_args[] = {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--chunks",
                                "2", "--kl-base", cut, "--kl", NULL};
    err = run_error(1, short_args);
    snprintf(want, sizeof want, "tessera: %s: ends early: not a whole --kl-base file\n", cut);
    ck_assert_str_eq(err, want);
    free(err);
    ck_assert_int_eq(tsr_test_write_file(cut, bytes, len), 0);
    FILE *f = fopen(cut, "ab");
    ck_assert(f && fputc(0, f) == 0 && fclose(f) == 0);
    err = run_error(1, short_args);
    snprintf(want, sizeof want, "tessera: %s: longer than its header says: not a whole "
             "--kl-base file\n", cut);
    ck_assert_str_eq(err, want);
    free(err);
    free(bytes);
    const char *not_kl[] = {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--kl-base",
                            text, "--kl", NULL};
    err = run_error(1, not_kl);
    snprintf(want, sizeof want, "tessera: %s: not a file written by tessera perplexity "
             "--kl-base (expected 'TSRKLB01' at offset 0)\n", text);
    ck_assert_str_eq(err, want);
    free(err);
    const char *no_base[] = {"perplexity", "-m", model, "-f", text, "--kl", NULL};
    err = run_error(2, no_base);
    ck_assert_str_eq(err, "tessera: perplexity: --kl needs --kl-base FILE (the baseline) (see "
                          "tessera perplexity --help)\n");
    free(err);
    free(model);
    free(text);
    tmp_free(&t);
}
END_TEST

/* ---- compare ------------------------------------------------------------------------------ */

/* A config of one line of cache (and quantizer) settings, in the test's folder. */
static const char *config(tmp *t, const char *name, const char *body) {
    const char *path = tmp_path(t, name);
    char yaml[512];
    snprintf(yaml, sizeof yaml, "tessera: 1\n%s\n", body);
    ck_assert_int_eq(tsr_test_write_file(path, yaml, strlen(yaml)), 0);
    return path;
}

/* compare --json over the TinyStories text with `extra` (configs and options, NULL ended). */
static json_t *compare(const char *const *extra) {
    char *model = tsr_test_data(STORIES), *text = tsr_test_data(VAL_TEXT);
    const char *args[40] = {"compare", "-m", model, "-f", text, "--json", "-t", "1"};
    int n = 8;
    for (; *extra; extra++) args[n++] = *extra;
    args[n] = NULL;
    json_t *r = run_json(args);
    free(model);
    free(text);
    return r;
}

static json_t *row(json_t *r, size_t i) {
    json_t *rows = json_object_get(r, "rows");
    ck_assert_msg(i < json_array_size(rows), "no row %zu", i);
    return json_array_get(rows, i);
}

/* The same config, the same feeding: compare's perplexity is perplexity's, to the bit. */
START_TEST(compare_equals_perplexity) {
    tmp t = {0};
    const char *full = config(&t, "full.yaml", "cache: { plugin: full }");
    const char *stream = config(&t, "stream.yaml", "cache: { plugin: streaming, window: 12 }");
    const char *args[] = {full, stream, "--ctx", "64", "--chunks", "2", "--prefill", "16",
                          "--ubatch", "1", "--decode", "0", NULL};
    json_t *r = compare(args);
    ck_assert_str_eq(json_string_value(json_object_get(r, "feeding")),
                     "prefill 16 tokens, then 1 token per forward");
    ck_assert_int_eq(number(r, "scored_tokens"), 2 * 31);
    ck_assert_int_eq(json_array_size(json_object_get(r, "rows")), 2);
    ck_assert(json_is_null(json_object_get(row(r, 0), "decode_tps")));
    const char *feeding[] = {"--prefill", "16", "--ubatch", "1", NULL, NULL};
    double full_ppl = ppl_of("64", "2", feeding);
    feeding[4] = stream;
    double stream_ppl = ppl_of("64", "2", feeding);
    ck_assert_msg(number(row(r, 0), "ppl") == full_ppl, "full: %.17g, perplexity %.17g",
                  number(row(r, 0), "ppl"), full_ppl);
    ck_assert_msg(number(row(r, 1), "ppl") == stream_ppl, "streaming: %.17g, perplexity %.17g",
                  number(row(r, 1), "ppl"), stream_ppl);
    ck_assert(stream_ppl != full_ppl);
    /* The baseline against itself. */
    ck_assert(number(row(r, 0), "kl_mean") == 0 && number(row(r, 0), "top1_agreement") == 1);
    ck_assert(number(row(r, 1), "kl_mean") > 0 && number(row(r, 1), "top1_agreement") < 1);
    ck_assert_int_eq(number(row(r, 0), "evicted"), 0);
    ck_assert_msg(number(row(r, 1), "evicted") > 0, "streaming evicted nothing");
    json_decref(r);
    tmp_free(&t);
}
END_TEST

/* KL and top-1 of q8_0 weights against f32, each chunk in one forward, against the test's own
 * computation from `tessera logits`; a config against itself gives exactly 0 and 100%. */
START_TEST(compare_kl_by_hand) {
    tmp t = {0};
    const char *f32 = config(&t, "f32.yaml", "cache: { plugin: full }");
    const char *q8 = config(&t, "q8.yaml", "quantizer: { plugin: gguf, type: q8_0 }");
    const char *args[] = {f32, q8, f32, "--ctx", "128", "--chunks", "1", "--prefill", "128",
                          NULL};
    json_t *r = compare(args);
    check_q8_0_kl(row(r, 1));
    ck_assert(number(row(r, 2), "kl_mean") == 0);
    ck_assert(number(row(r, 2), "top1_agreement") == 1);
    ck_assert(number(row(r, 2), "ppl") == number(row(r, 0), "ppl"));
    json_decref(r);
    tmp_free(&t);
}
END_TEST

/* --budget sets each policy's own parameter; a budget that holds the whole context gives the
 * baseline's distributions exactly (each policy's defining property). */
START_TEST(compare_budget_sweep) {
    tmp t = {0};
    const char *full = config(&t, "full.yaml", "cache: { plugin: full }");
    const char *stream = config(&t, "streaming.yaml", "cache: { plugin: streaming }");
    const char *h2o = config(&t, "h2o.yaml", "cache: { plugin: h2o }");
    const char *tova = config(&t, "tova.yaml", "cache: { plugin: tova }");
    const char *args[] = {full, stream, h2o, tova, "--ctx", "64", "--chunks", "1", "--budget",
                          "17,64", "--decode", "4", NULL};
    json_t *r = compare(args);
    ck_assert_int_eq(json_array_size(json_object_get(r, "rows")), 1 + 3 * 2);
    ck_assert(json_is_null(json_object_get(row(r, 0), "budget")));
    const char *sets[] = {"window=13", "window=60", "heavy=8 recent=9", "heavy=32 recent=32",
                          "budget=17", "budget=64"};
    const char *names[] = {"streaming @ 17", "streaming @ 64", "h2o @ 17", "h2o @ 64",
                           "tova @ 17", "tova @ 64"};
    for (size_t i = 0; i < 6; i++) {
        json_t *x = row(r, 1 + i);
        ck_assert_str_eq(json_string_value(json_object_get(x, "budget_set")), sets[i]);
        ck_assert_str_eq(json_string_value(json_object_get(x, "pipeline")), names[i]);
        ck_assert_int_eq(number(x, "budget"), i % 2 ? 64 : 17);
        ck_assert_msg(number(x, "decode_tps") > 0, "%s: no decode speed", names[i]);
        if (i % 2) {
            ck_assert_msg(number(x, "kl_mean") == 0 && number(x, "evicted") == 0,
                          "%s: KL %g, %g evicted", names[i], number(x, "kl_mean"),
                          number(x, "evicted"));
        } else {
            ck_assert_msg(number(x, "kl_mean") > 0 && number(x, "evicted") > 0 &&
                              number(x, "entries") < number(row(r, 0), "entries"),
                          "%s: KL %g, %g evicted, %g entries", names[i], number(x, "kl_mean"),
                          number(x, "evicted"), number(x, "entries"));
        }
    }
    /* The context's 64 rows in each of stories260K's 5 layers x 4 KV heads, 32-bit. */
    ck_assert_int_eq(number(row(r, 0), "entries"), 64 * 20);
    ck_assert(number(row(r, 0), "bits_per_value") == 32);
    json_decref(r);
    tmp_free(&t);
}
END_TEST

/* The paths of `svg` outside its glyph definitions whose style has `style`. */
static int count_paths(const char *svg, const char *style, const char *d_has, int *segments) {
    const char *p = strstr(svg, "</defs>");
    int n = 0;
    ck_assert_ptr_nonnull(p);
    while ((p = strstr(p, "<path "))) {
        const char *end = strchr(p, '>');
        ck_assert_ptr_nonnull(end);
        char tag[4096];
        size_t len = (size_t)(end - p) < sizeof tag - 1 ? (size_t)(end - p) : sizeof tag - 1;
        memcpy(tag, p, len);
        tag[len] = '\0';
        if (strstr(tag, style) && (!d_has || strstr(tag, d_has))) {
            n++;
            for (const char *l = tag; segments && (l = strstr(l, " L ")); l++) ++*segments;
        }
        p = end;
    }
    return n;
}

/* The chart: a curve per swept config with a point per budget, the baseline's point; SVG
 * and PNG by the extension. */
START_TEST(compare_plots_svg_and_png) {
    tmp t = {0};
    const char *full = config(&t, "full.yaml", "cache: { plugin: full }");
    const char *stream = config(&t, "streaming.yaml", "cache: { plugin: streaming }");
    const char *h2o = config(&t, "h2o.yaml", "cache: { plugin: h2o }");
    const char *svg = tmp_path(&t, "chart.svg"), *png = tmp_path(&t, "chart.PNG");
    const char *args[] = {full, stream, h2o, "--ctx", "64", "--chunks", "1", "--budget",
                          "16,24,32", "--plot", svg, NULL};
    json_decref(compare(args));
    size_t size;
    char *text = tsr_test_read_file(svg, &size);
    ck_assert_msg(text && strncmp(text, "<?xml", 5) == 0 && strstr(text, "</svg>"), "not SVG");
    int segments = 0;
    ck_assert_int_eq(count_paths(text, "stroke-width:2.5;", NULL, &segments), 2);
    ck_assert_int_eq(segments, 2 * 2);
    /* Dots are filled circles (Bézier arcs): 2 x 3 budgets and the baseline. */
    ck_assert_int_eq(count_paths(text, "stroke:none;", " C ", NULL), 2 * 3 + 1);
    free(text);
    args[10] = png;
    json_decref(compare(args));
    unsigned char *bytes = (unsigned char *)tsr_test_read_file(png, &size);
    ck_assert_msg(bytes && size > 33 && memcmp(bytes, "\x89PNG\r\n\x1a\n", 8) == 0, "not PNG");
    ck_assert_msg(memcmp(bytes + 12, "IHDR", 4) == 0 && bytes[16] == 0 && bytes[17] == 0 &&
                      bytes[18] * 256 + bytes[19] == 820 && bytes[22] * 256 + bytes[23] == 500,
                  "not a PNG of 820 x 500");
    free(bytes);
    tmp_free(&t);
}
END_TEST

/* Bad input: one line, exit 2 (usage) or 1, no output file. */
START_TEST(compare_bad_input_is_one_line) {
    tmp t = {0};
    char *model = tsr_test_data(STORIES), *text = tsr_test_data(VAL_TEXT);
    const char *full = config(&t, "full.yaml", "cache: { plugin: full }");
    const char *kivi = config(&t, "kivi.yaml", "cache: { plugin: kivi }");
    const char *stream = config(&t, "streaming.yaml", "cache: { plugin: streaming }");
    const char *pdf = tmp_path(&t, "chart.pdf");
    char want[3][4300];
    snprintf(want[0], sizeof want[0], "tessera: compare: %s: cache 'kivi' has no budget "
             "parameter (budget, heavy and recent, or sink and window); leave it out of a "
             "--budget sweep\n", kivi);
    snprintf(want[1], sizeof want[1], "tessera: compare: --plot: '%s': expected a file name "
             "ending in .png or .svg\n", pdf);
    snprintf(want[2], sizeof want[2], "tessera: compare: %s: --budget 4 leaves no window after "
             "the 4 sinks of cache 'streaming'\n", stream);
    struct {
        int status;
        const char *args[8];
        const char *want;
    } cases[] = {
        {2, {NULL}, "tessera: compare: at least one CONFIG.yaml is required (the first is the "
                    "baseline) (see tessera compare --help)\n"},
        {1, {full, kivi, "--budget", "32"}, want[0]},
        {2, {full, "--plot", pdf}, want[1]},
        {2, {full, stream, "--budget", "32,0"},
         "tessera: compare: --budget: expected an integer in [1, 1048576], got '0'\n"},
        {1, {full, stream, "--budget", "64,4"}, want[2]},
        {2, {full, "--ctx", "64", "--decode", "64"}, "tessera: compare: --decode 64: the timed "
         "tokens must fit in --ctx 64 with at least one token before them\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *args[16] = {"compare", "-m", model, "-f", text};
        int n = 5;
        for (const char *const *a = cases[i].args; *a; a++) args[n++] = *a;
        args[n] = NULL;
        char *err = run_error(cases[i].status, args);
        ck_assert_str_eq(err, cases[i].want);
        free(err);
    }
    ck_assert_msg(access(pdf, F_OK) != 0, "%s was left behind", pdf);
    free(model);
    free(text);
    tmp_free(&t);
}
END_TEST

int main(void) {
    free(tsr_test_require_data(STORIES));
    free(tsr_test_require_data(VAL_TEXT));
    const tsr_test_case cases[] = {
        {"ubatch", ubatch_lets_a_cache_policy_evict},
        {"kl-base", kl_base_against_itself_and_q8_0},
        {"kl-base-errors", kl_base_mismatch_is_one_line},
        {"compare-perplexity", compare_equals_perplexity},
        {"compare-kl", compare_kl_by_hand},
        {"compare-budgets", compare_budget_sweep},
        {"compare-plot", compare_plots_svg_and_png},
        {"compare-errors", compare_bad_input_is_one_line},
    };
    return tsr_test_run_suite(tsr_test_suite("compare", cases, sizeof cases / sizeof cases[0]));
}
