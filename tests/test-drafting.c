/* The drafting and search decoders (lookup, aded, lookahead, beam). Through the library on
 * stories260K (skipped without the shared data): those that accept drafted tokens greedily,
 * and beam search of width 1, emit exactly `greedy`'s tokens for many prompts and lengths, the
 * drafting ones in fewer forwards where the text repeats. On scripted models behind a decode
 * API of this file, which tracks every sequence: a draft search that needs its second branch,
 * and beam search's scores and length penalty, checked by hand. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline_fixture.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

typedef tsr_test_pipeline run;

enum { CTX = 256, MAX_IDS = CTX };

/* `decoder`: the decoder section's value, then any other section (a draft:), where %s stands
 * for the path of the shared llama2xs-279K, a draft model on stories260K's vocabulary. */
static void run_open_on(run *r, const char *decoder, int threads) {
    char *xs = tsr_test_data("models/llama2xs-279K.bin"), *path = tsr_test_data("models/stories260K.gguf");
    char sections[4608], yaml[8192];
    snprintf(sections, sizeof sections, decoder, xs);
    snprintf(yaml, sizeof yaml,
             "tessera: 1\nbackend: { plugin: cpu, threads: %d }\nattention: { plugin: flash }\n"
             "cache: { plugin: full }\ndecoder: %s\n", threads, sections);
    tsr_test_pipeline_open_ok(r, path, yaml, CTX);
    free(path);
    free(xs);
}

static void run_open(run *r, const char *decoder) { run_open_on(r, decoder, 1); }

typedef struct ids {
    int32_t v[MAX_IDS];
    int64_t n;
} ids;

static void push(ids *s, int32_t token) {
    ck_assert_int_lt(s->n, MAX_IDS);
    s->v[s->n++] = token;
}

static void collect(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n) {
    ck_assert_int_eq(seq_id, 0);
    for (int64_t i = 0; i < n; i++) push(ctx, tokens[i]);
}

/* The tokens the pipeline's decoder emits for `prompt`, at most n_new of them; the request's
 * counts. */
static tsr_generate_stats generate(run *r, const ids *prompt, int64_t n_new, ids *out) {
    tsr_error err = {{0}};
    tsr_generate_stats stats;
    out->n = 0;
    if (tsr_pipeline_generate(r->pl, prompt->v, prompt->n, n_new, NULL, NULL, collect, out,
                              &stats, &err) < 0)
        ck_abort_msg("%s", err.msg);
    ck_assert_int_eq(stats.new_tokens, out->n);
    return stats;
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

/* Decoders that must give greedy's tokens, as configured: the drafting ones first. */
static const char *const exact_decoders[] = {
    "{ plugin: lookup }",
    "{ plugin: lookup, ngram_max: 1, draft: 1 }",
    "{ plugin: lookup, ngram_min: 2, ngram_max: 5, draft: 32 }",
    "{ plugin: aded }",
    "{ plugin: aded, branches: 4, draft: 5, sims: 64 }",
    "{ plugin: aded, persist: false, top: 1, sims: 1, draft: 32 }",
    "{ plugin: lookahead }",
    "{ plugin: lookahead, window: 8, ngram: 2, guess: 7 }",
    "{ plugin: lookahead, window: 1, ngram: 8, guess: 1, text_pool: false }",
    "{ plugin: dyspec }\ndraft: { model: %s }",
    "{ plugin: dyspec, budget: 15, branch: 4, expand: 1 }\ndraft: { skip_layers: [2] }",
    "{ plugin: dyspec, budget: 3, branch: 1, expand: 15 }\ndraft: { skip_layers: [4] }",
    /* PEARL emits one verification per round, but not always a token of its own: */
    "{ plugin: pearl }\ndraft: { model: %s }",
    "{ plugin: pearl, window: 2 }\ndraft: { skip_layers: [2] }",
    "{ plugin: pearl, window: 31 }\ndraft: { skip_layers: [4] }",
    /* not drafting: */
    "{ plugin: beam, width: 1 }",
    "{ plugin: beam, width: 1, length_penalty: -2 }",
};
enum {
    N_EXACT = sizeof exact_decoders / sizeof exact_decoders[0],
    N_DRAFTING = N_EXACT - 2,
    FIRST_PEARL = N_DRAFTING - 3
};

/* The first PEARL case runs on two threads: each round's target forward on a thread of its own
 * beside the draft's forwards (forward_begin). */
START_TEST(drafting_decoders_emit_greedy_tokens) {
    run greedy, other;
    run_open(&greedy, "{ plugin: greedy }");
    run_open_on(&other, exact_decoders[_i], _i == FIRST_PEARL ? 2 : 1);
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
 * that add up (per position, and accepted within drafted), with the time spent drafting and
 * verifying. */
START_TEST(drafting_decoders_save_forwards_on_repeated_text) {
    run r;
    run_open(&r, exact_decoders[_i]);
    ids prompt, got;
    make_prompt(N_PROMPTS - 1, &prompt);
    tsr_generate_stats gen = generate(&r, &prompt, 100, &got);
    uint64_t calls = gen.target_forwards;
    ck_assert(gen.has_decoder_stats);
    const tsr_decoder_stats s = gen.decoder;
    fprintf(stderr, "%-55s 100 tokens in %llu forwards, %lld of %lld drafted accepted\n",
            exact_decoders[_i], (unsigned long long)calls, (long long)s.accepted,
            (long long)s.drafted);
    ck_assert_int_gt(s.accepted, 0);
    ck_assert_int_le(s.accepted, s.drafted);
    /* The prompt's prefill, then one verification per run of accepted tokens and the
     * target's own token after it; PEARL's rounds that end in post-verify emit no token of
     * the target's own, so it takes more. */
    if (_i < FIRST_PEARL) ck_assert_uint_eq(calls, 1 + 100 - (uint64_t)s.accepted);
    else ck_assert_uint_ge(calls, 1 + 100 - (uint64_t)s.accepted);
    ck_assert_uint_lt(calls, 1 + 100);
    int64_t proposed = 0, accepted = 0;
    for (int i = 0; i < TSR_DECODER_MAX_DRAFT; i++) {
        proposed += s.proposed_at[i];
        accepted += s.accepted_at[i];
        if (i > 0) ck_assert_int_le(s.accepted_at[i], s.accepted_at[i - 1]);
    }
    ck_assert_int_eq(proposed, s.drafted);
    ck_assert_int_eq(accepted, s.accepted);
    ck_assert_uint_gt(s.verify_ns, 0);
    ck_assert_uint_gt(s.draft_ns, 0);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* Bad parameters: one line naming the key and what was expected (the host's range check, or
 * the plugin's own refusal), exit 1, nothing on stdout. */
START_TEST(bad_parameters_get_one_line) {
    static const struct {
        const char *plugin, *set, *line;
    } cases[] = {
        {"lookup", "decoder.draft=0", "--set: decoder.draft: expected an integer in [1, 32], got '0'"},
        {"lookup", "decoder.ngram_min=4",
         "decoder: lookup: ngram_min 4 is above ngram_max 3: no n-gram size to search"},
        {"aded", "decoder.branches=9",
         "--set: decoder.branches: expected an integer in [1, 8], got '9'"},
        {"lookahead", "decoder.ngram=1",
         "--set: decoder.ngram: expected an integer in [2, 8], got '1'"},
        {"beam", "decoder.width=0", "--set: decoder.width: expected an integer in [1, 16], got '0'"},
    };
    char *model = tsr_test_data("models/stories260K.gguf");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char plugin[64], want[256];
        snprintf(plugin, sizeof plugin, "decoder.plugin=%s", cases[i].plugin);
        snprintf(want, sizeof want, "tessera: %s\n", cases[i].line);
        const char *args[] = {"run", "-m", model, "-p", "Once", "-n", "4", "--set", plugin,
                              "--set", cases[i].set, NULL};
        char *out, *err;
        ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
        ck_assert_str_eq(out, "");
        ck_assert_str_eq(err, want);
        free(out);
        free(err);
    }
    free(model);
}
END_TEST

/* ---- scripted models ------------------------------------------------------------------- */

enum { SCRIPT_VOCAB = 16, SCRIPT_CTX = 128, SCRIPT_SEQS = 64 };

/* A model whose logits after a sequence's text are script(text, n, logits): the decode API
 * keeps each sequence's text (a fork copies it, a truncation cuts it) and checks every call as
 * the host does. */
typedef struct script_model {
    void (*script)(const int32_t *text, int64_t n, float *logits);
    struct script_model *draft; /* the draft model handed to the decoder, or NULL */
    struct script_model *target; /* the draft's: the target it drafts for */
    int32_t eog; /* the token that ends generation, or -1 */
    int32_t text[SCRIPT_SEQS][SCRIPT_CTX];
    int64_t len[SCRIPT_SEQS];
    bool alive[SCRIPT_SEQS];
    ids emitted;
    int64_t limit, forwards;
    bool stopped;
    /* A forward begun (forward_begin) runs at forward_wait, on the entries as they are then: a
     * decoder that touched them, or read the logits, in between would go wrong. */
    const tsr_batch_entry *begun;
    int64_t n_begun;
    float *begun_logits;
    int64_t overlapped; /* the draft's: its forwards made while one of the target's was begun */
} script_model;

static tsr_status script_forward(void *ctx, const tsr_batch_entry *e, int64_t n, float *logits) {
    script_model *m = ctx;
    ck_assert(!m->stopped);
    ck_assert_msg(!m->begun, "a call of the target's API between forward_begin and forward_wait");
    if (m->target && m->target->begun) m->overlapped++;
    ck_assert_int_gt(n, 0);
    m->forwards++;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = e[i].seq_id;
        ck_assert(s >= 0 && s < SCRIPT_SEQS && m->alive[s]);
        ck_assert_int_eq(e[i].pos, m->len[s]);
        ck_assert_int_lt(e[i].pos, SCRIPT_CTX);
        ck_assert(e[i].token >= 0 && e[i].token < SCRIPT_VOCAB);
        m->text[s][m->len[s]++] = e[i].token;
        if (e[i].want_logits) {
            m->script(m->text[s], m->len[s], logits);
            logits += SCRIPT_VOCAB;
        }
    }
    return TSR_OK;
}

static tsr_status script_fork(void *ctx, int64_t src, int64_t dst) {
    script_model *m = ctx;
    ck_assert_msg(!m->begun, "a call of the target's API between forward_begin and forward_wait");
    ck_assert(src >= 0 && src < SCRIPT_SEQS && m->alive[src]);
    ck_assert(dst >= 0 && dst < SCRIPT_SEQS && !m->alive[dst]);
    m->alive[dst] = true;
    m->len[dst] = m->len[src];
    memcpy(m->text[dst], m->text[src], sizeof m->text[src]);
    return TSR_OK;
}

static tsr_status script_truncate(void *ctx, int64_t seq, int32_t n_pos) {
    script_model *m = ctx;
    ck_assert_msg(!m->begun, "a call of the target's API between forward_begin and forward_wait");
    ck_assert(seq >= 0 && seq < SCRIPT_SEQS && m->alive[seq]);
    ck_assert_int_ge(n_pos, 0);
    if (n_pos < m->len[seq]) m->len[seq] = n_pos;
    return TSR_OK;
}

static tsr_status script_seq_end(void *ctx, int64_t seq) {
    script_model *m = ctx;
    ck_assert_msg(!m->begun, "a call of the target's API between forward_begin and forward_wait");
    ck_assert(seq >= 0 && seq < SCRIPT_SEQS && m->alive[seq]);
    m->alive[seq] = false;
    return TSR_OK;
}

static int32_t script_is_eog(void *ctx, int32_t token) {
    return token == ((script_model *)ctx)->eog;
}

/* The host's emit: stops before an end-of-generation token and at the limit. */
static int32_t script_emit(void *ctx, const int32_t *tokens, int64_t n) {
    script_model *m = ctx;
    ck_assert_msg(!m->begun, "a call of the target's API between forward_begin and forward_wait");
    ck_assert(!m->stopped);
    for (int64_t i = 0; i < n && !m->stopped; i++) {
        if (tokens[i] == m->eog) m->stopped = true;
        else push(&m->emitted, tokens[i]);
        if (m->emitted.n == m->limit) m->stopped = true;
    }
    return m->stopped;
}

static tsr_status script_forward_begin(void *ctx, const tsr_batch_entry *e, int64_t n,
                                       float *logits) {
    script_model *m = ctx;
    ck_assert_msg(!m->begun, "forward_begin twice without forward_wait");
    m->begun = e;
    m->n_begun = n;
    m->begun_logits = logits;
    return TSR_OK;
}

static tsr_status script_forward_wait(void *ctx) {
    script_model *m = ctx;
    ck_assert_msg(m->begun, "forward_wait without forward_begin");
    const tsr_batch_entry *e = m->begun;
    m->begun = NULL;
    return script_forward(m, e, m->n_begun, m->begun_logits);
}

static tsr_decode_api script_api(script_model *m) {
    m->alive[0] = true;
    return (tsr_decode_api){TSR_SIZED(tsr_decode_api), .ctx = m, .n_vocab = SCRIPT_VOCAB,
                            .n_ctx = SCRIPT_CTX, .forward = script_forward,
                            .seq_fork = script_fork, .seq_truncate = script_truncate,
                            .seq_end = script_seq_end, .emit = script_emit,
                            .is_eog = script_is_eog};
}

/* Runs one request of `prompt` (n tokens), at most `limit` new ones, on the decoder of f (with
 * m->draft as its draft model when set). */
static void script_run(fx *f, script_model *m, const int32_t *prompt, int64_t n, int64_t limit) {
    m->limit = limit;
    tsr_decode_api api = script_api(m), draft_api;
    if (m->draft) {
        draft_api = script_api(m->draft);
        draft_api.emit = NULL;
        draft_api.is_eog = NULL;
        api.draft = &draft_api;
        api.forward_begin = script_forward_begin;
        api.forward_wait = script_forward_wait;
        m->draft->target = m;
    }
    tsr_generate_request req = {TSR_SIZED(tsr_generate_request), .prompt = prompt, .n_prompt = n,
                                .max_new_tokens = limit};
    const tsr_decoder_vtable *vt = f->vt;
    ck_assert_msg(vt->generate(f->inst->self, &api, &req) == TSR_OK, "%s", fx_error(f));
    ck_assert_msg(!m->begun, "generate returned before forward_wait");
    for (int s = 1; s < SCRIPT_SEQS; s++) {
        ck_assert_msg(!m->alive[s], "sequence %d left alive", s);
        ck_assert_msg(!m->draft || !m->draft->alive[s], "draft sequence %d left alive", s);
    }
}

static void script_open(fx *f, const char *decoder, const char *const *kv) {
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.n_vocab = SCRIPT_VOCAB;
    shape.n_ctx = SCRIPT_CTX;
    shape.has_draft = !strcmp(decoder, "pearl") || !strcmp(decoder, "dyspec");
    char file[64];
    snprintf(file, sizeof file, "decoder-%s.so", decoder);
    fx_open(f, 1, TSR_STAGE_DECODER, file, decoder, kv, &shape);
}

/* The next token is a function of the last three: after (1, 2) comes 3 when 7 came before
 * them and 4 when 8 did, so the pair (1, 2) alone has two followers, as often as each other:
 * the text cycles 7 1 2 3 8 1 2 4. One-hot logits. */
static int32_t cycle_next(const int32_t *text, int64_t n) {
    int32_t z = text[n - 1];
    if (z == 2 && n >= 3) return text[n - 3] == 7 ? 3 : 4;
    return z == 3 ? 8 : z == 4 ? 7 : z == 1 ? 2 : 1;
}

static void cycle_script(const int32_t *text, int64_t n, float *logits) {
    for (int v = 0; v < SCRIPT_VOCAB; v++) logits[v] = 0.0f;
    logits[cycle_next(text, n)] = 1.0f;
}

/* The model emitted the cycle's continuation of `prompt`, n_want tokens. */
static void assert_cycle(const script_model *m, const int32_t *prompt, int64_t n_prompt,
                         int64_t n_want) {
    ck_assert_int_eq(m->emitted.n, n_want);
    int32_t text[SCRIPT_CTX + 1];
    memcpy(text, prompt, (size_t)n_prompt * sizeof *prompt);
    for (int64_t i = 0; i < n_want; i++) {
        text[n_prompt + i] = cycle_next(text, n_prompt + i);
        ck_assert_int_eq(m->emitted.v[i], text[n_prompt + i]);
    }
}

/* Drafts of the cycle (8 on the tokens they propose, 0 elsewhere): one that knows it, one that
 * cannot tell what follows (1, 2) and leans to 4 (8 against 7.9 for 3), one always wrong. */
static void draft_script(const int32_t *text, int64_t n, float *logits, int kind) {
    for (int v = 0; v < SCRIPT_VOCAB; v++) logits[v] = 0.0f;
    int32_t next = cycle_next(text, n);
    if (kind == 2) next = (next + 1) % SCRIPT_VOCAB;
    logits[next] = 8.0f;
    if (kind == 1 && (next == 3 || next == 4)) {
        logits[4] = 8.0f;
        logits[3] = 7.9f;
    }
}
static void draft_sure(const int32_t *text, int64_t n, float *logits) {
    draft_script(text, n, logits, 0);
}
static void draft_split(const int32_t *text, int64_t n, float *logits) {
    draft_script(text, n, logits, 1);
}
static void draft_wrong(const int32_t *text, int64_t n, float *logits) {
    draft_script(text, n, logits, 2);
}

static tsr_decoder_stats stats_of(fx *f) {
    const tsr_decoder_vtable *vt = f->vt;
    tsr_decoder_stats s = {.struct_size = sizeof s};
    vt->stats(f->inst->self, &s);
    return s;
}

/* PEARL, window 4, 60 tokens after 10 of the cycle, by hand:
 *  - a draft that knows the cycle: the first round pre-verifies its first proposal and keeps
 *    the three others waiting; then each round verifies the three waiting and the first of
 *    four new ones: 1 + 13 x 4 tokens, then 4 with 3 new (the room is 6), then the 2 waiting
 *    and the target's own: 16 rounds, every one of the 59 proposals verified accepted;
 *  - a draft always wrong: every round's pre-verify fails: 60 rounds of one token, 59
 *    proposals (none in the last, which has no room), none accepted; the draft drafts 4 in
 *    each of the first 56 rounds, then 3, 2, 1 and 0 as the room shrinks: 230 forwards.
 * The target's forward of each round is begun before the draft's forwards and waited for after
 * them (forward_begin, forward_wait). */
START_TEST(pearl_rounds_by_hand) {
    static const int32_t prompt[] = {7, 1, 2, 3, 8, 1, 2, 4, 7, 1};
    static const struct {
        void (*draft)(const int32_t *, int64_t, float *);
        int64_t forwards, draft_forwards, drafted, accepted;
    } cases[] = {{draft_sure, 17, 59, 59, 59}, {draft_wrong, 61, 230, 59, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *kv[] = {"window=4", NULL};
        fx f;
        script_open(&f, "pearl", kv);
        script_model draft = {.script = cases[c].draft, .eog = -1};
        script_model m = {.script = cycle_script, .eog = -1, .draft = &draft};
        script_run(&f, &m, prompt, 10, 60);
        assert_cycle(&m, prompt, 10, 60);
        tsr_decoder_stats s = stats_of(&f);
        ck_assert_int_eq(m.forwards, cases[c].forwards);
        ck_assert_int_eq(draft.forwards, cases[c].draft_forwards);
        ck_assert_int_eq(s.drafted, cases[c].drafted);
        ck_assert_int_eq(s.accepted, cases[c].accepted);
        /* Every draft forward ran while a target's forward was begun (beside it, on a host). */
        ck_assert_int_eq(draft.overlapped, cases[c].draft_forwards);
        fx_close(&f);
    }
}
END_TEST

/* DySpec's tree, by hand: after 7 1 2 the draft gives 4 probability .524 and 3 .474, and is
 * sure (.995) of what follows either. With a budget of 3 and paths of at most 2 (the request
 * wants 3 tokens) the tree takes 4, the draft runs on it, then its follower 7 (.521, at the
 * deepest level: the draft does not run on it), then 3 (.474): the paths [4 7] on the text's
 * sequence and [3] on a fork. The target says 3 8 1: the fork wins with 3 and the target's 8;
 * a second verification, with no room for a draft, gives 1. */
START_TEST(dyspec_tree_by_hand) {
    static const int32_t prompt[] = {7, 1, 2};
    const char *kv[] = {"budget=3", "branch=2", "expand=1", NULL};
    fx f;
    script_open(&f, "dyspec", kv);
    script_model draft = {.script = draft_split, .eog = -1};
    script_model m = {.script = cycle_script, .eog = -1, .draft = &draft};
    script_run(&f, &m, prompt, 3, 3);
    assert_cycle(&m, prompt, 3, 3);
    ck_assert_int_eq(m.forwards, 3);
    ck_assert_int_eq(draft.forwards, 2);
    tsr_decoder_stats s = stats_of(&f);
    ck_assert_int_eq(s.drafted, 3);
    ck_assert_int_eq(s.accepted, 1);
    ck_assert_int_eq(s.proposed_at[0], 2);
    ck_assert_int_eq(s.proposed_at[1], 1);
    ck_assert_int_eq(s.accepted_at[0], 1);
    ck_assert_int_eq(s.accepted_at[1], 0);
    fx_close(&f);
}
END_TEST

/* ADED's second branch drafts the follower of (1, 2) that its first one does not: with two
 * branches the search keeps up with the cycle, with one it is wrong at every other (1, 2). */
START_TEST(aded_second_branch_wins_where_the_table_is_ambiguous) {
    static const int32_t prompt[] = {7, 1, 2, 3, 8, 1, 2, 4, 7, 1};
    int64_t forwards[2];
    for (int branches = 1; branches <= 2; branches++) {
        char kv_branches[32];
        snprintf(kv_branches, sizeof kv_branches, "branches=%d", branches);
        const char *kv[] = {kv_branches, "draft=8", "persist=false", NULL};
        fx f;
        script_open(&f, "aded", kv);
        script_model m = {.script = cycle_script, .eog = -1};
        script_run(&f, &m, prompt, 10, 60);
        assert_cycle(&m, prompt, 10, 60);
        forwards[branches - 1] = m.forwards;
        fx_close(&f);
    }
    fprintf(stderr, "aded on the cycle: 60 tokens in %lld forwards with one branch, %lld with "
            "two\n", (long long)forwards[0], (long long)forwards[1]);
    ck_assert_int_lt(forwards[1], forwards[0]);
}
END_TEST

/* Lookup on the cycle: the text's last bigram (then trigram) occurred one period earlier, and
 * the tokens copied from there, running on into the copy itself, are all right. Asked for more
 * than the context holds, it stops when the text fills the context and one token more (the
 * last is never forwarded): 119 tokens after the 10 of the prompt.
 *  - draft 10 fixed: each forward emits 11 tokens, 10 times, then the 8 the room allows and one
 *    own: 11 verifications;
 *  - adaptive: drafts of 1, 2, 4, 8 (2 + 3 + 5 + 9 tokens), then 10 for 88 tokens, then 10
 *    (the room's 11 less the target's own), then none at the context's last position: 14. */
START_TEST(lookup_copies_the_cycle_until_the_context_ends) {
    static const int32_t prompt[] = {7, 1, 2, 3, 8, 1, 2, 4, 7, 1};
    static const struct {
        const char *adaptive;
        int64_t verifications;
    } cases[] = {{"adaptive=false", 11}, {"adaptive=true", 14}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *kv[] = {cases[c].adaptive, NULL};
        fx f;
        script_open(&f, "lookup", kv);
        script_model m = {.script = cycle_script, .eog = -1};
        script_run(&f, &m, prompt, 10, 1000);
        assert_cycle(&m, prompt, 10, SCRIPT_CTX + 1 - 10);
        ck_assert_msg(m.forwards == 1 + cases[c].verifications, "%s: %lld forwards",
                      cases[c].adaptive, (long long)m.forwards);
        fx_close(&f);
    }
}
END_TEST

/* Lookahead's Jacobi iteration alone (no n-grams from the text) finds the cycle: its guesses
 * converge, and the n-grams they trace give more than a third of the tokens. */
START_TEST(lookahead_guesses_converge_on_the_cycle) {
    static const int32_t prompt[] = {7, 1};
    const char *kv[] = {"window=4", "ngram=4", "guess=2", "text_pool=false", NULL};
    fx f;
    script_open(&f, "lookahead", kv);
    script_model m = {.script = cycle_script, .eog = -1};
    script_run(&f, &m, prompt, 2, 80);
    assert_cycle(&m, prompt, 2, 80);
    const tsr_decoder_vtable *vt = f.vt;
    tsr_decoder_stats s = {.struct_size = sizeof s};
    vt->stats(f.inst->self, &s);
    fprintf(stderr, "lookahead on the cycle: 80 tokens in %lld forwards, %lld of %lld drafted "
            "accepted\n", (long long)m.forwards, (long long)s.accepted, (long long)s.drafted);
    ck_assert_int_eq(m.forwards, 1 + 80 - s.accepted);
    ck_assert_int_gt(s.accepted, 80 / 3);
    fx_close(&f);
}
END_TEST

/* Beam search's script (tokens A 1, B 2, C 3, D 4, end 7), by the text after the prompt 0:
 *   ""  -> A .6, B .4          "A" -> end .7, C .3       "B" -> C .9, D .1
 *   "AC", "ACC" -> C .8, D .2  "BC" -> D .95, C .05      "BCD" -> end .95, A .05
 * Greedy says "A" then ends. Width 2 finishes "A" at step 2 and "B C D" at step 4 (the second
 * hypothesis ends the search): with length penalty 0 "A" wins on its sum of log-probabilities,
 * with 1 "B C D" wins on its mean. */
enum { A_ = 1, B_, C_, D_, END_ = 7 };
static void beam_script(const int32_t *text, int64_t n, float *logits) {
    static const struct {
        const char *after;
        int32_t t0, t1;
        double p0;
    } rules[] = {{"", A_, B_, .6},  {"1", END_, C_, .7}, {"2", C_, D_, .9}, {"13", C_, D_, .8},
                 {"133", C_, D_, .8}, {"23", D_, C_, .95}, {"234", END_, A_, .95}};
    char after[SCRIPT_CTX + 1];
    for (int64_t i = 1; i < n; i++) after[i - 1] = (char)('0' + text[i]);
    after[n - 1] = '\0';
    for (int v = 0; v < SCRIPT_VOCAB; v++) logits[v] = -1e4f;
    for (size_t r = 0; r < sizeof rules / sizeof rules[0]; r++)
        if (!strcmp(rules[r].after, after)) {
            logits[rules[r].t0] = (float)log(rules[r].p0);
            logits[rules[r].t1] = (float)log(1 - rules[r].p0);
            return;
        }
    ck_abort_msg("the beam script has no rule after '%s'", after);
}

static double beam_last_score(fx *f) {
    const tsr_command *cmd = &f->inst->ref->desc->commands[0];
    ck_assert_str_eq(cmd->name, "score");
    return ((double (*)(void *))cmd->fn)(f->inst->self);
}

START_TEST(beam_scores_and_length_penalty_by_hand) {
    static const struct {
        const char *width, *penalty;
        int64_t n;
        int32_t want[3];
        double score;
    } cases[] = {
        {"width=1", "length_penalty=1", 1, {A_}, 0},
        {"width=2", "length_penalty=0", 1, {A_}, 0},
        {"width=2", "length_penalty=1", 3, {B_, C_, D_}, 0},
    };
    const double a_end = log(.6) + log(.7), bcd_end = log(.4) + log(.9) + log(.95) + log(.95);
    const double scores[] = {a_end, a_end, bcd_end / 3};
    static const int32_t prompt[] = {0};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *kv[] = {cases[c].width, cases[c].penalty, NULL};
        fx f;
        script_open(&f, "beam", kv);
        script_model m = {.script = beam_script, .eog = END_};
        script_run(&f, &m, prompt, 1, 10);
        ck_assert_msg(m.emitted.n == cases[c].n, "%s %s: %lld tokens", cases[c].width,
                      cases[c].penalty, (long long)m.emitted.n);
        for (int64_t i = 0; i < cases[c].n; i++) ck_assert_int_eq(m.emitted.v[i], cases[c].want[i]);
        ck_assert_double_eq_tol(beam_last_score(&f), scores[c], 1e-6);
        fx_close(&f);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("decoders");
    TCase *sc = tcase_create("scripted");
    tcase_add_test(sc, aded_second_branch_wins_where_the_table_is_ambiguous);
    tcase_add_test(sc, lookup_copies_the_cycle_until_the_context_ends);
    tcase_add_test(sc, lookahead_guesses_converge_on_the_cycle);
    tcase_add_test(sc, pearl_rounds_by_hand);
    tcase_add_test(sc, dyspec_tree_by_hand);
    tcase_add_test(sc, beam_scores_and_length_penalty_by_hand);
    suite_add_tcase(s, sc);
    char *model = tsr_test_data_path("models/stories260K.gguf");
    if (model) {
        TCase *tc = tcase_create("greedy-acceptance");
        tcase_set_timeout(tc, 300);
        tcase_add_loop_test(tc, drafting_decoders_emit_greedy_tokens, 0, N_EXACT);
        tcase_add_loop_test(tc, drafting_decoders_save_forwards_on_repeated_text, 0, N_DRAFTING);
        tcase_add_test(tc, bad_parameters_get_one_line);
        suite_add_tcase(s, tc);
    } else {
        fprintf(stderr, "skipped: the stories260K cases (models/stories260K.gguf is missing)\n");
    }
    free(model);
    return tsr_test_run_suite(s);
}
