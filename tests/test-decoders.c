/* The drafting and search decoders (lookup, aded, lookahead, beam) through the library on
 * stories260K: those that accept drafted tokens greedily emit exactly `greedy`'s tokens for many
 * prompts and lengths, in fewer forwards where the text repeats; beam search of width 1 is
 * greedy. Needs the shared data folder; skips without it. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_impl.h"
#include "pipeline_fixture.h"
#include "testutil.h"

typedef tsr_test_pipeline run;

enum { CTX = 256, MAX_IDS = CTX };

static void run_open(run *r, const char *decoder) {
    char yaml[512];
    snprintf(yaml, sizeof yaml,
             "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\nattention: { plugin: flash }\n"
             "cache: { plugin: full }\ndecoder: %s\n", decoder);
    char *path = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(r, path, yaml, CTX);
    free(path);
}

typedef struct ids {
    int32_t v[MAX_IDS];
    int64_t n;
} ids;

static void collect(void *ctx, const int32_t *tokens, int64_t n) {
    ids *s = ctx;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_int_lt(s->n, MAX_IDS);
        s->v[s->n++] = tokens[i];
    }
}

/* The tokens the pipeline's decoder emits for `prompt`, at most n_new of them. */
static void generate(run *r, const ids *prompt, int64_t n_new, ids *out) {
    tsr_error err = {{0}};
    int64_t n_gen = 0;
    out->n = 0;
    if (tsr_pipeline_generate(r->pl, prompt->v, prompt->n, n_new, NULL, NULL, collect, out,
                              &n_gen, &err) < 0)
        ck_abort_msg("%s", err.msg);
    ck_assert_int_eq(n_gen, out->n);
}

static tsr_decoder_stats decoder_stats(run *r) {
    tsr_instance *dec = r->pl->stage_main[TSR_STAGE_DECODER];
    const tsr_decoder_vtable *vt = dec->vtable;
    tsr_decoder_stats s = {.struct_size = sizeof s};
    ck_assert_ptr_nonnull(vt->stats);
    vt->stats(dec->self, &s);
    return s;
}

/* The test prompts: pseudo-random ids of several lengths (the model soon repeats itself after
 * most of them), and a phrase repeated, which the continuation copies. */
enum { N_PROMPTS = 6 };
static void make_prompt(int which, ids *p) {
    static const int64_t lengths[N_PROMPTS] = {1, 2, 9, 40, 120, 48};
    uint64_t rng = 0x5eed + (uint64_t)which;
    p->n = lengths[which];
    p->v[0] = 1; /* BOS */
    for (int64_t i = 1; i < p->n; i++)
        p->v[i] = which == N_PROMPTS - 1 && i > 12 ? p->v[1 + (i - 1) % 12]
                                                    : (int32_t)(tsr_test_rng_u64(&rng) % 511) + 1;
}

/* Lengths asked for; the last one fills the context to its last position. */
static const int64_t lengths[] = {1, 3, 17, 90, -1};

/* Greedy-acceptance decoders, as configured. */
static const char *const exact_decoders[] = {
    "{ plugin: lookup }",
    "{ plugin: lookup, ngram_max: 1, draft: 1 }",
    "{ plugin: lookup, ngram_min: 2, ngram_max: 5, draft: 32 }",
};
enum { N_EXACT = sizeof exact_decoders / sizeof exact_decoders[0] };

START_TEST(drafting_decoders_emit_greedy_tokens) {
    run greedy, other;
    run_open(&greedy, "{ plugin: greedy }");
    run_open(&other, exact_decoders[_i]);
    for (int p = 0; p < N_PROMPTS; p++) {
        ids prompt, want, got;
        make_prompt(p, &prompt);
        for (size_t l = 0; l < sizeof lengths / sizeof lengths[0]; l++) {
            int64_t n_new = lengths[l] > 0 ? lengths[l] : CTX - prompt.n;
            generate(&greedy, &prompt, n_new, &want);
            generate(&other, &prompt, n_new, &got);
            ck_assert_int_eq(want.n, n_new);
            ck_assert_msg(got.n == want.n, "%s, prompt %d, %lld new: %lld tokens, greedy %lld",
                          exact_decoders[_i], p, (long long)n_new, (long long)got.n,
                          (long long)want.n);
            for (int64_t i = 0; i < want.n; i++)
                ck_assert_msg(got.v[i] == want.v[i], "%s, prompt %d, %lld new: token %lld is %d, "
                              "greedy's %d", exact_decoders[_i], p, (long long)n_new,
                              (long long)i, got.v[i], want.v[i]);
        }
    }
    tsr_test_pipeline_close(&greedy);
    tsr_test_pipeline_close(&other);
}
END_TEST

/* On the repeated phrase the drafts are accepted: fewer forwards than tokens, and statistics
 * that add up (per position, and accepted within drafted). */
START_TEST(drafting_decoders_save_forwards_on_repeated_text) {
    run r;
    run_open(&r, exact_decoders[_i]);
    ids prompt, got;
    make_prompt(N_PROMPTS - 1, &prompt);
    uint64_t calls0 = tsr_pipeline_times(r.pl)->forward_calls;
    generate(&r, &prompt, 100, &got);
    uint64_t calls = tsr_pipeline_times(r.pl)->forward_calls - calls0;
    tsr_decoder_stats s = decoder_stats(&r);
    fprintf(stderr, "%-55s 100 tokens in %llu forwards, %lld of %lld drafted accepted\n",
            exact_decoders[_i], (unsigned long long)calls, (long long)s.accepted,
            (long long)s.drafted);
    ck_assert_int_gt(s.accepted, 0);
    ck_assert_int_le(s.accepted, s.drafted);
    /* The prompt's prefill, then one verification per run of accepted tokens and the
     * target's own token after it. */
    ck_assert_uint_eq(calls, 1 + 100 - (uint64_t)s.accepted);
    int64_t proposed = 0, accepted = 0;
    for (int i = 0; i < TSR_DECODER_MAX_DRAFT; i++) {
        proposed += s.proposed_at[i];
        accepted += s.accepted_at[i];
        if (i > 0) ck_assert_int_le(s.accepted_at[i], s.accepted_at[i - 1]);
    }
    ck_assert_int_eq(proposed, s.drafted);
    ck_assert_int_eq(accepted, s.accepted);
    ck_assert_uint_gt(s.verify_ns, 0);
    tsr_test_pipeline_close(&r);
}
END_TEST

int main(void) {
    free(tsr_test_require_data("models/stories260K.gguf"));
    Suite *s = suite_create("decoders");
    TCase *tc = tcase_create("greedy-acceptance");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, drafting_decoders_emit_greedy_tokens, 0, N_EXACT);
    tcase_add_loop_test(tc, drafting_decoders_save_forwards_on_repeated_text, 0, N_EXACT);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
