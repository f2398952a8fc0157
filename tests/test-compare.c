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
    double kl, top1;
    expected_kl(128, &kl, &top1);
    ck_assert_msg(kl > 1e-5, "q8_0 KL %g", kl);
    ck_assert_msg(fabs(number(r, "kl_mean") - kl) <= 1e-4 * kl, "KL %.9g, computed %.9g",
                  number(r, "kl_mean"), kl);
    ck_assert_msg(number(r, "top1_agreement") == top1, "top-1 %.9g, computed %.9g",
                  number(r, "top1_agreement"), top1);
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
    /* Cut short, and a file of something else. */
    const char *cut = tmp_path(&t, "cut.kl");
    bytes = tsr_test_read_file(base, &len);
    ck_assert_int_eq(tsr_test_write_file(cut, bytes, len - 4), 0);
    const char *short_args[] = {"perplexity", "-m", model, "-f", text, "--ctx", "64", "--chunks",
                                "2", "--kl-base", cut, "--kl", NULL};
    err = run_error(1, short_args);
    snprintf(want, sizeof want, "tessera: %s: ends early: not a whole --kl-base file\n", cut);
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

int main(void) {
    free(tsr_test_require_data(STORIES));
    free(tsr_test_require_data(VAL_TEXT));
    const tsr_test_case cases[] = {
        {"ubatch", ubatch_lets_a_cache_policy_evict},
        {"kl-base", kl_base_against_itself_and_q8_0},
        {"kl-base-errors", kl_base_mismatch_is_one_line},
    };
    return tsr_test_run_suite(tsr_test_suite("compare", cases, sizeof cases / sizeof cases[0]));
}
