/* The speculative and parallel decoders on stories260K, through the library (needs the shared
 * data folder; skipped without it):
 *   - speculative decoding with greedy acceptance gives greedy's tokens exactly, with a draft
 *     model (llama2xs-279K) and with self-drafts skipping layers, for many prompts, lengths,
 *     draft lengths k and with the adaptive (SpecDec++) length;
 *   - under sampling, the tokens it makes are distributed as the target's own: a chi-square
 *     test of homogeneity against `sample` with the same chain, over a fixed set of seeds;
 *   - parallel with n = 1 is `sample` token for token; at temperature 0 each of its sequences
 *     is greedy's; with First Finish Search it returns the sequence that finishes first. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline_fixture.h"
#include "testutil.h"

static char *stories, *xs; /* the target and the draft model */

enum { MAX_SEQ = 16, MAX_NEW = 512, N_CTX = 256 };

/* Every pipeline computes on one thread: the batches of this model are small, and a pool of
 * two waits on each other for every op when the machine is busy. */
#define HEAD "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\n"

typedef struct collected {
    int32_t ids[MAX_SEQ][MAX_NEW];
    int64_t n[MAX_SEQ];
} collected;

static void collect(void *ctx, int64_t seq, const int32_t *tokens, int64_t n) {
    collected *c = ctx;
    ck_assert(seq >= 0 && seq < MAX_SEQ);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_int_lt(c->n[seq], MAX_NEW);
        c->ids[seq][c->n[seq]++] = tokens[i];
    }
}

/* run.c's end of text: a llama2.c model stops at BOS. */
static int32_t stops_at_bos(void *ctx, int32_t token) { return token == 1; }

static tsr_generate_stats generate_eog(tsr_test_pipeline *r, const int32_t *prompt, int n_prompt,
                                       int n_new, tsr_eog_fn eog, collected *out) {
    memset(out, 0, sizeof *out);
    tsr_generate_stats stats;
    tsr_error err;
    if (tsr_pipeline_generate(r->pl, prompt, n_prompt, n_new, eog, NULL, collect, out, &stats,
                              &err) < 0)
        ck_abort_msg("%s", err.msg);
    return stats;
}

static tsr_generate_stats generate(tsr_test_pipeline *r, const int32_t *prompt, int n_prompt,
                                   int n_new, collected *out) {
    return generate_eog(r, prompt, n_prompt, n_new, NULL, out);
}

/* ---- speculative with greedy acceptance ----------------------------------------------------- */

enum { N_PROMPTS = 8, MAX_PROMPT = 24, LONGEST = 200 };
static const int lengths[] = {1, 2, 9, 60, LONGEST};

typedef struct prompt {
    int32_t ids[MAX_PROMPT];
    int n;
} prompt;

/* The story openings of shared/models (BOS first), then BOS and random ids of random lengths. */
static void make_prompts(prompt *p) {
    static const int32_t once[] = {1, 403, 407, 261, 378}, lily[] = {1, 317, 269, 274, 287};
    memcpy(p[0].ids, once, sizeof once);
    p[0].n = 5;
    memcpy(p[1].ids, lily, sizeof lily);
    p[1].n = 5;
    p[2] = (prompt){.ids = {1}, .n = 1};
    uint64_t state = 0x5eed5;
    for (int i = 3; i < N_PROMPTS; i++) {
        p[i].n = 2 + (int)(tsr_test_rng_u64(&state) % (MAX_PROMPT - 2));
        p[i].ids[0] = 1;
        for (int t = 1; t < p[i].n; t++)
            p[i].ids[t] = 3 + (int32_t)(tsr_test_rng_u64(&state) % 509);
    }
}

static const char *const drafts[] = {
    "draft: { model: %s }\n",        /* a second model on the same vocabulary */
    "draft: { skip_layers: [2] }\n", /* the middle layer left out: 40% of drafts accepted */
    "draft: { skip_layers: [4] }\n", /* the last: 30% */
};

/* Draft lengths, fixed or adaptive (SpecDec++) up to k. Long fixed drafts of a draft that is
 * often wrong cost many draft forwards: the longest is adaptive. */
static const struct {
    int k, adaptive;
} lengths_k[] = {{1, 0}, {2, 0}, {5, 0}, {12, 0}, {5, 1}, {32, 1}};

/* Every k (1 to the most), adaptive or not, against greedy: the same tokens for every prompt
 * and length. Stops on the first difference, naming the case. */
START_TEST(speculative_greedy_equals_greedy) {
    prompt prompts[N_PROMPTS];
    make_prompts(prompts);
    tsr_test_pipeline g;
    tsr_test_pipeline_open_ok(&g, stories,
                              HEAD
                              "decoder: { plugin: greedy }\n", N_CTX);
    static collected want[N_PROMPTS], got;
    for (int p = 0; p < N_PROMPTS; p++) generate(&g, prompts[p].ids, prompts[p].n, LONGEST, &want[p]);
    tsr_test_pipeline_close(&g);

    int64_t accepted = 0, drafted = 0;
    for (size_t ki = 0; ki < sizeof lengths_k / sizeof lengths_k[0]; ki++) {
        int k = lengths_k[ki].k, adaptive = lengths_k[ki].adaptive;
        char draft[4200], yaml[8400];
        snprintf(draft, sizeof draft, drafts[_i], xs);
        snprintf(yaml, sizeof yaml,
                 HEAD "decoder: { plugin: speculative, temperature: 0, k: %d, adaptive: %s }\n%s",
                 k, adaptive ? "true" : "false", draft);
        tsr_test_pipeline s;
        tsr_test_pipeline_open_ok(&s, stories, yaml, N_CTX);
        for (int p = 0; p < N_PROMPTS; p++) {
            for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
                int n = lengths[li];
                tsr_generate_stats st = generate(&s, prompts[p].ids, prompts[p].n, n, &got);
                ck_assert_int_eq(got.n[0], n);
                for (int t = 0; t < n; t++)
                    if (got.ids[0][t] != want[p].ids[0][t])
                        ck_abort_msg("%s k %d adaptive %d, prompt %d, %d tokens: token %d is %d, "
                                     "greedy's %d", drafts[_i], k, adaptive, p, n, t,
                                     got.ids[0][t], want[p].ids[0][t]);
                ck_assert(st.has_decoder_stats);
                ck_assert_int_le(st.decoder.accepted, st.decoder.drafted);
                /* every round costs one target forward and yields accepted + 1 tokens */
                ck_assert_int_eq(st.decoder.accepted + (int64_t)st.target_forwards, n);
                accepted += st.decoder.accepted;
                drafted += st.decoder.drafted;
            }
        }
        tsr_test_pipeline_close(&s);
    }
    /* The draft is right often enough for the comparison to mean something. */
    ck_assert_msg(accepted > drafted / 10, "%lld of %lld drafts accepted", (long long)accepted,
                  (long long)drafted);
}
END_TEST

/* ---- speculative sampling ------------------------------------------------------------------- */

enum { N_SEEDS = 3000, N_NEW = 4 };

/* The chi-square quantile of probability 0.999 for `df` degrees of freedom: tabulated to 10,
 * beyond that Wilson and Hilferty's cube approximation (within 1% there). */
static double chi2_999(int df) {
    static const double table[] = {10.828, 13.816, 16.266, 18.467, 20.515,
                                   22.458, 24.322, 26.124, 27.877, 29.588};
    if (df <= 10) return table[df - 1];
    const double z = 3.0902, a = 2.0 / (9.0 * df);
    double c = 1.0 - a + z * sqrt(a);
    return df * c * c * c;
}

/* Counts of the token at each new position over N_SEEDS runs of `yaml` (its decoder seeded
 * 1, 2, ... by --set), from the prompt "One day, a", whose next words vary. */
static void token_counts(const char *yaml, int32_t counts[N_NEW][512]) {
    static const int32_t one_day[] = {1, 385, 328, 432, 261};
    tsr_test_pipeline r;
    tsr_test_pipeline_open_ok(&r, stories, yaml, 64);
    memset(counts, 0, sizeof(int32_t) * N_NEW * 512);
    static collected got;
    for (int seed = 1; seed <= N_SEEDS; seed++) {
        char set[64];
        tsr_error err;
        snprintf(set, sizeof set, "decoder.seed=%d", seed);
        ck_assert_int_eq(tsr_config_set(r.cfg, set, &err), TSR_OK);
        if (tsr_test_pipeline_rebind(&r, 64, &err) < 0) ck_abort_msg("%s", err.msg);
        generate(&r, one_day, 5, N_NEW, &got);
        ck_assert_int_eq(got.n[0], N_NEW);
        for (int t = 0; t < N_NEW; t++) counts[t][got.ids[0][t]]++;
    }
    tsr_test_pipeline_close(&r);
}

/* Two samples of one distribution or not: the chi-square statistic of homogeneity over the
 * tokens seen (those seen fewer than 10 times in both together share one bin), against the
 * 0.999 quantile. */
static void same_distribution(const int32_t *a, const int32_t *b, const char *what) {
    double stat = 0, rare_a = 0, rare_b = 0;
    int bins = 0;
    for (int v = 0; v < 512; v++) {
        double n = a[v] + b[v];
        if (n == 0) continue;
        if (n < 10) {
            rare_a += a[v];
            rare_b += b[v];
            continue;
        }
        stat += (a[v] - b[v]) * (double)(a[v] - b[v]) / n;
        bins++;
    }
    if (rare_a + rare_b > 0) {
        stat += (rare_a - rare_b) * (rare_a - rare_b) / (rare_a + rare_b);
        bins++;
    }
    ck_assert_msg(bins >= 5, "%s: only %d bins: too few tokens to tell distributions apart",
                  what, bins);
    ck_assert_msg(stat < chi2_999(bins - 1), "%s: chi-square %.1f over %d bins, above the 0.999 "
                  "quantile %.1f: speculative sampling does not draw the target's distribution",
                  what, stat, bins, chi2_999(bins - 1));
}

/* The chains compared: plain softmax (every token possible), and a truncated one, where the
 * draft proposes tokens the target's chain gives no probability at all. */
static const char *const chains[] = {"temperature: 1, top_k: 0, top_p: 1, min_p: 0",
                                     "temperature: 0.7, top_k: 20, top_p: 0.9, min_p: 0.05"};

/* Leviathan et al.'s rule keeps the target's distribution whatever the draft: the first N_NEW
 * tokens (the first from the prompt's forward, the next from verified proposals) of
 * speculative sampling against `sample` with the same chain. The seed sets are fixed, so the
 * outcome is too. At the 0.999 quantile a correct implementation would fail a fresh seed set
 * once in a thousand per position; accepting every proposal without the ratio test gives
 * statistics three to five times the quantile (the draft's distribution shows), and drawing
 * the rejected tokens from p instead of max(0, p - q) exceeds it on the truncated chain. */
START_TEST(speculative_sampling_keeps_the_distribution) {
    char yaml[4400];
    static int32_t want[N_NEW][512], got[N_NEW][512];
    snprintf(yaml, sizeof yaml, HEAD "decoder: { plugin: sample, %s }\n", chains[_i]);
    token_counts(yaml, want);
    snprintf(yaml, sizeof yaml,
             HEAD "decoder: { plugin: speculative, k: 4, %s }\ndraft: { model: %s }\n",
             chains[_i], xs);
    token_counts(yaml, got);
    for (int t = 0; t < N_NEW; t++) {
        char what[64];
        snprintf(what, sizeof what, "chain %d, new token %d", _i, t + 1);
        same_distribution(want[t], got[t], what);
    }
}
END_TEST

/* ---- parallel -------------------------------------------------------------------------------- */

static const int32_t once[] = {1, 403, 407, 261, 378};

START_TEST(parallel_one_is_sample) {
    static collected want, got;
    tsr_test_pipeline r;
    tsr_test_pipeline_open_ok(&r, stories, HEAD "decoder: { plugin: sample, seed: 7 }\n",
                              N_CTX);
    generate(&r, once, 5, 150, &want);
    tsr_test_pipeline_close(&r);
    tsr_test_pipeline_open_ok(&r, stories,
                              HEAD "decoder: { plugin: parallel, n: 1, seed: 7 }\n", N_CTX);
    tsr_generate_stats st = generate(&r, once, 5, 150, &got);
    tsr_test_pipeline_close(&r);
    ck_assert_int_eq(got.n[0], 150);
    ck_assert_int_eq(st.n_sequences, 1);
    ck_assert_mem_eq(got.ids[0], want.ids[0], 150 * sizeof(int32_t));
}
END_TEST

/* n continuations in one batch a step, each greedy's at temperature 0. */
START_TEST(parallel_greedy_sequences) {
    static collected want, got;
    tsr_test_pipeline r;
    tsr_test_pipeline_open_ok(&r, stories, HEAD "decoder: { plugin: greedy }\n", N_CTX);
    generate(&r, once, 5, 100, &want);
    tsr_test_pipeline_close(&r);
    tsr_test_pipeline_open_ok(&r, stories,
                              HEAD "decoder: { plugin: parallel, n: 5, temperature: 0 }\n",
                              N_CTX);
    tsr_generate_stats st = generate(&r, once, 5, 100, &got);
    tsr_test_pipeline_close(&r);
    ck_assert_int_eq(st.n_sequences, 5);
    ck_assert_int_eq(st.new_tokens, 5 * 100);
    ck_assert_int_eq(st.target_forwards, 100); /* the prompt, then 99 batched steps */
    for (int s = 0; s < 5; s++) {
        ck_assert_int_eq(got.n[s], 100);
        ck_assert_mem_eq(got.ids[s], want.ids[0], 100 * sizeof(int32_t));
    }
}
END_TEST

/* First Finish Search returns the sequence that ends first, as it was without the search: the
 * draws of every step are taken in the same order until then. */
START_TEST(parallel_first_finish) {
    static collected all, first;
    tsr_test_pipeline r;
    tsr_test_pipeline_open_ok(&r, stories, HEAD "decoder: { plugin: parallel, n: 4, "
                              "temperature: 1, seed: 5 }\n", 512);
    generate_eog(&r, once, 5, 400, stops_at_bos, &all);
    tsr_test_pipeline_close(&r);
    int shortest = 0;
    for (int s = 1; s < 4; s++)
        if (all.n[s] < all.n[shortest]) shortest = s;
    ck_assert_msg(all.n[shortest] < 400, "no sequence ended within 400 tokens");
    tsr_test_pipeline_open_ok(&r, stories, HEAD "decoder: { plugin: parallel, n: 4, "
                              "temperature: 1, seed: 5, ffs: true }\n", 512);
    tsr_generate_stats st = generate_eog(&r, once, 5, 400, stops_at_bos, &first);
    ck_assert_int_eq(st.n_sequences, 1);
    for (int s = 0; s < 4; s++) ck_assert_int_eq(first.n[s], s == shortest ? all.n[s] : 0);
    ck_assert_mem_eq(first.ids[shortest], all.ids[shortest],
                     (size_t)all.n[shortest] * sizeof(int32_t));
    /* Without an end token every sequence reaches the limit at one step: the lowest id wins. */
    st = generate(&r, once, 5, 20, &first);
    ck_assert_int_eq(st.n_sequences, 1);
    ck_assert_int_eq(first.n[0], 20);
    ck_assert_mem_eq(first.ids[0], all.ids[0], 20 * sizeof(int32_t));
    tsr_test_pipeline_close(&r);
}
END_TEST

/* The host refuses a draft on another vocabulary when it builds the pipeline. */
START_TEST(draft_on_another_vocabulary) {
    char *dir = tsr_test_tmpdir(), tiny[4200], yaml[8400];
    snprintf(tiny, sizeof tiny, "%s/tiny.gguf", dir);
    const char *synth[] = {"synth", "--shape", "tiny", "-o", tiny, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, synth), 0);
    snprintf(yaml, sizeof yaml, HEAD "decoder: { plugin: speculative }\ndraft: { model: %s }\n",
             tiny);
    tsr_test_pipeline r;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&r, stories, yaml, NULL, 64, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "test.yaml:4:8: draft: the draft model has 320 tokens and the "
                              "target 512: a draft must share the target's vocabulary");
    ck_assert_ptr_null(r.pl);
    tsr_test_pipeline_close(&r);
    unlink(tiny);
    rmdir(dir);
    free(dir);
}
END_TEST

int main(void) {
    stories = tsr_test_require_data("models/stories260K.bin");
    xs = tsr_test_require_data("models/llama2xs-279K.bin");
    Suite *s = suite_create("decoders");
    TCase *tc = tcase_create("speculative");
    /* Whole decodes of two models per case: seconds each in a release build. */
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, speculative_greedy_equals_greedy, 0,
                        (int)(sizeof drafts / sizeof drafts[0]));
    tcase_add_loop_test(tc, speculative_sampling_keeps_the_distribution, 0,
                        (int)(sizeof chains / sizeof chains[0]));
    tcase_add_test(tc, draft_on_another_vocabulary);
    suite_add_tcase(s, tc);
    tc = tcase_create("parallel");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, parallel_one_is_sample);
    tcase_add_test(tc, parallel_greedy_sequences);
    tcase_add_test(tc, parallel_first_finish);
    suite_add_tcase(s, tc);
    int status = tsr_test_run_suite(s);
    free(stories);
    free(xs);
    return status;
}
