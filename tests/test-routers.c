/* The shipped routers beside 'topk': 'pregated' (Pre-gated MoE) and 'dynamic' (MC-MoE's
 * dynamic pruning, top-p routing). Their default parameters give topk's logits bit for bit on
 * every MoE fixture; pregated's compute mode uses the experts predicted one layer early, its
 * prefetches ask for them and its hit rate counts them, by hand; dynamic's sets and weights by
 * hand on made-up gate logits, and the mean experts per token it reports; bad parameters are
 * refused in one line; `tessera run -v` shows what both report. Needs the shared fixtures
 * (skips without them). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/params.h"
#include "pipeline_fixture.h"
#include "plugin/loader.h"
#include "testutil.h"

static const char *const fixtures[] = {"moe-tiny-f32",     "moe-tiny-q8_0",   "qwen2moe-tiny-f32",
                                       "qwen2moe-tiny-q8_0", "olmoe-tiny-f32", "olmoe-tiny-q8_0"};
enum { N_FIXTURES = sizeof fixtures / sizeof fixtures[0], N_TOK = 24 };

static char *fixture_path(const char *name) {
    char rel[128];
    snprintf(rel, sizeof rel, "fixtures/models/%s.gguf", name);
    return tsr_test_data(rel);
}

/* ---- lossless defaults -------------------------------------------------------------------- */

/* The logits of a prompt run as one forward, then of 4 tokens decoded one by one after it (a
 * prediction then covers one token), through the router section `router`; malloc'd,
 * ((N_TOK + 4), n_vocab). */
static float *logits_with(const char *model, const char *router, int64_t *n_vocab) {
    char yaml[512];
    snprintf(yaml, sizeof yaml,
             "tessera: 1\nbackend: { plugin: cpu, threads: 2 }\nattention: { plugin: flash }\n"
             "router: %s\n", router);
    tsr_test_pipeline r;
    tsr_test_pipeline_open_ok(&r, model, yaml, 64);
    *n_vocab = r.model->hp.n_vocab;
    tsr_batch_entry b[N_TOK + 4];
    for (int i = 0; i < N_TOK + 4; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i,
                                 .token = (int32_t)((i * 37 + 11) % *n_vocab), .want_logits = 1};
    float *all = malloc((size_t)(N_TOK + 4) * (size_t)*n_vocab * sizeof *all);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    for (int i = 0; i < N_TOK + 4; i += i < N_TOK ? N_TOK : 1)
        if (tsr_pipeline_forward(r.pl, b + i, i < N_TOK ? N_TOK : 1,
                                 all + (size_t)i * (size_t)*n_vocab, &err) < 0)
            ck_abort_msg("%s: %s", router, err.msg);
    tsr_pipeline_seq_end(r.pl, 0);
    tsr_test_pipeline_close(&r);
    return all;
}

static const char *const lossless[] = {
    "{ plugin: pregated }", "{ plugin: pregated, mode: prefetch }", "{ plugin: dynamic }",
    "{ plugin: dynamic, threshold: 0 }", "{ plugin: dynamic, top_p: 0, max_k: 0 }"};
enum { N_LOSSLESS = sizeof lossless / sizeof lossless[0] };

/* Naming the router with its defaults changes no logit of any MoE fixture. */
START_TEST(defaults_equal_topk) {
    const char *router = lossless[_i % N_LOSSLESS];
    char *model = fixture_path(fixtures[_i / N_LOSSLESS]);
    int64_t n_vocab;
    float *want = logits_with(model, "{ plugin: topk }", &n_vocab);
    float *got = logits_with(model, router, &n_vocab);
    for (size_t i = 0; i < (size_t)(N_TOK + 4) * (size_t)n_vocab; i++)
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0)
            ck_abort_msg("%s, %s: logit %zu: %.9g, topk's %.9g", fixtures[_i / N_LOSSLESS],
                         router, i, (double)got[i], (double)want[i]);
    free(want);
    free(got);
    free(model);
}
END_TEST

/* The lossy settings do change the logits (so the test above can tell). */
START_TEST(lossy_settings_change_logits) {
    static const char *const lossy[] = {"{ plugin: pregated, mode: compute }",
                                        "{ plugin: dynamic, threshold: 0.45 }",
                                        "{ plugin: dynamic, top_p: 0.3 }"};
    char *model = fixture_path("moe-tiny-f32");
    int64_t n_vocab;
    float *want = logits_with(model, "{ plugin: topk }", &n_vocab);
    float *got = logits_with(model, lossy[_i], &n_vocab);
    ck_assert_msg(memcmp(want, got, (size_t)(N_TOK + 4) * (size_t)n_vocab * sizeof *got) != 0,
                  "%s gives topk's logits", lossy[_i]);
    free(want);
    free(got);
    free(model);
}
END_TEST

/* ---- routers driven by hand ------------------------------------------------------------- */

/* The experts' access, recording what was prefetched; expert 1 of every layer is in memory,
 * half of each other one. */
typedef struct prefetches {
    tsr_expert_access access;
    int32_t layer[16], expert[16];
    int n;
} prefetches;

static uint64_t expert_bytes(void *ctx, int32_t layer, int32_t e) {
    (void)ctx, (void)layer, (void)e;
    return 3 * 8 * 8 * 4;
}

static uint64_t expert_resident(void *ctx, int32_t layer, int32_t e) {
    return e == 1 ? expert_bytes(ctx, layer, e) : expert_bytes(ctx, layer, e) / 2;
}

static void record_prefetch(void *ctx, int32_t layer, int32_t e) {
    prefetches *p = ctx;
    ck_assert_int_lt(p->n, 16);
    p->layer[p->n] = layer;
    p->expert[p->n++] = e;
}

typedef struct live_router {
    tsr_registry *reg;
    tsr_bound_params bound;
    tsr_instance *inst;
    const tsr_router_vtable *vt;
    const tsr_plugin_desc *desc;
} live_router;

/* Router `name` with parameters `kv` ("key=value", NULL-terminated) for 3 layers of 4 experts,
 * k used, the gating and normalisation given, prefetches recorded in `pf` (may be NULL).
 * Returns create's status, its message in `why`. */
static tsr_status router_open(live_router *r, const char *name, const char *const *kv,
                              int32_t k, int32_t gating, int32_t normalize, prefetches *pf,
                              char *why, size_t why_size) {
    tsr_error err = {{0}};
    memset(r, 0, sizeof *r);
    r->reg = tsr_registry_create(NULL);
    ck_assert_int_ge(tsr_registry_scan_dir(r->reg, tsr_test_env("TESSERA_PLUGIN_DIR"), &err), 1);
    const tsr_plugin_ref *ref = tsr_registry_find(r->reg, TSR_STAGE_ROUTER, name);
    ck_assert_ptr_nonnull(ref);
    r->desc = ref->desc;
    tsr_kv_text items[8];
    size_t n = 0;
    for (; kv && kv[n]; n++) {
        char *text = strdup(kv[n]), *eq = strchr(text, '=');
        *eq = '\0';
        items[n] = (tsr_kv_text){.key = text, .value = eq + 1, .loc = {"test.yaml", 3, 7}};
    }
    tsr_status st = tsr_params_bind(ref->desc->params, ref->desc->n_params, name, "router",
                                    (tsr_src_loc){"test.yaml", 3, 1}, items, n, &r->bound, &err);
    for (size_t i = 0; i < n; i++) free(items[i].key);
    ck_assert_msg(st >= 0, "%s", err.msg);
    if (pf)
        pf->access = (tsr_expert_access){.struct_size = sizeof pf->access, .ctx = pf,
                                         .bytes = expert_bytes, .prefetch = record_prefetch,
                                         .resident = expert_resident};
    tsr_router_init init = {.struct_size = sizeof init, .n_layer = 3, .n_expert = 4,
                            .n_expert_used = k, .n_embd = 8, .gating = gating,
                            .normalize = normalize, .n_ff_expert = 8,
                            .experts = pf ? &pf->access : NULL};
    st = tsr_instance_create(ref, NULL, &r->bound.params, &init, &r->inst, &err);
    snprintf(why, why_size, "%s", st < 0 ? err.msg : "");
    if (st >= 0) r->vt = r->inst->vtable;
    return st;
}

static void router_close(live_router *r) {
    if (r->inst) ck_assert_uint_eq(tsr_instance_destroy(r->inst), 0);
    tsr_bound_params_free(&r->bound);
    tsr_registry_free(r->reg);
}

/* Runs the router on `n_tok` tokens of `layer`, the next layer's logits when `next` is given. */
static void route_by_hand(live_router *r, int32_t layer, int64_t n_tok, int32_t k,
                          const float *gate, const float *next, int32_t *experts,
                          float *weights) {
    float hidden[2 * 8] = {0};
    const tsr_tensor *sub[2 * 4 * 3] = {NULL};
    for (int64_t i = 0; i < n_tok * k; i++) {
        experts[i] = -2;
        weights[i] = NAN;
    }
    tsr_route_call call = {.struct_size = sizeof call, .layer = layer, .n_tok = n_tok,
                           .gate_logits = gate, .hidden = hidden, .k = k, .experts = experts,
                           .weights = weights, .next_gate_logits = next,
                           .next_layer = next ? layer + 1 : -1, .substitute = sub};
    ck_assert_int_eq(r->vt->route(r->inst->self, &call), TSR_OK);
}

/* A command of the router's, found by name. */
static void (*command(const live_router *r, const char *name))(void) {
    for (uint32_t i = 0; i < r->desc->n_commands; i++)
        if (strcmp(r->desc->commands[i].name, name) == 0) return r->desc->commands[i].fn;
    ck_abort_msg("no command %s", name);
    return NULL;
}

static double rate_command(const live_router *r, const char *name, int32_t layer) {
    double (*fn)(void *, int32_t) = (double (*)(void *, int32_t))command(r, name);
    return fn(r->inst->self, layer);
}

/* softmax(logits)[e] in double. */
static double softmax_at(const float *logits, int n, int e) {
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i]);
    return exp((double)logits[e]) / sum;
}

static void expect_weight(float got, double want, const char *what, int slot) {
    ck_assert_msg(fabs(got - want) <= 1e-6 * want, "%s slot %d: %.9g, expected %.9g", what,
                  slot, (double)got, want);
}

/* Two tokens, 4 experts, k 2, Mixtral's rule. Layer 0's gate ranks {1, 0} and {3, 2}; its
 * next-layer logits predict {2, 3} and {3, 1} for layer 1, whose own gate ranks {0, 2} and
 * {3, 1}: one hit of two, then two of two. Layer 2 gets no prediction (layer 1 passed no next
 * logits). In compute mode layer 1 uses the prediction, weighted as the next gate weights it;
 * in prefetch mode its own choice. Either way the predicted experts not in memory (all but
 * expert 1) were prefetched, each once, for layer 1. */
START_TEST(pregated_by_hand) {
    const bool compute = _i == 1;
    static const float gate0[8] = {1.0f, 2.0f, 0.0f, -1.0f, -1.0f, 0.0f, 1.0f, 2.0f};
    static const float next1[8] = {0.0f, -1.0f, 2.0f, 1.5f, 0.0f, 1.0f, -2.0f, 3.0f};
    static const float gate1[8] = {3.0f, 0.0f, 1.0f, -1.0f, 0.0f, 1.0f, 0.5f, 2.0f};
    static const float gate2[8] = {0.0f, 0.0f, 1.0f, 2.0f, 2.0f, 1.0f, 0.0f, 0.0f};
    const char *const kv[] = {compute ? "mode=compute" : "mode=prefetch", NULL};
    prefetches pf = {0};
    live_router r;
    char why[1024];
    ck_assert_int_eq(router_open(&r, "pregated", kv, 2, TSR_GATING_SOFTMAX, 1, &pf, why,
                                 sizeof why), TSR_OK);
    ck_assert_int_eq(r.vt->needs(r.inst->self), TSR_ROUTER_NEEDS_NEXT_GATE);
    int32_t experts[4];
    float weights[4];
    route_by_hand(&r, 0, 2, 2, gate0, next1, experts, weights);
    ck_assert_mem_eq(experts, ((int32_t[]){1, 0, 3, 2}), sizeof experts);
    ck_assert_int_eq(pf.n, 2);
    ck_assert_mem_eq(pf.layer, ((int32_t[]){1, 1}), 2 * sizeof(int32_t));
    ck_assert_mem_eq(pf.expert, ((int32_t[]){2, 3}), 2 * sizeof(int32_t));

    route_by_hand(&r, 1, 2, 2, gate1, NULL, experts, weights);
    const float *source = compute ? next1 : gate1;
    const int32_t want[4] = {compute ? 2 : 0, compute ? 3 : 2, 3, 1};
    ck_assert_mem_eq(experts, want, sizeof want);
    for (int t = 0; t < 2; t++) {
        double p0 = softmax_at(source + 4 * t, 4, want[2 * t]);
        double p1 = softmax_at(source + 4 * t, 4, want[2 * t + 1]);
        expect_weight(weights[2 * t], p0 / (p0 + p1), "layer 1", 2 * t);
        expect_weight(weights[2 * t + 1], p1 / (p0 + p1), "layer 1", 2 * t + 1);
    }
    ck_assert_int_eq(pf.n, 2); /* no next logits, nothing prefetched */
    ck_assert(rate_command(&r, "hit_rate", 1) == 3.0 / 4.0);
    ck_assert(rate_command(&r, "hit_rate", 0) == 0.0);

    route_by_hand(&r, 2, 2, 2, gate2, NULL, experts, weights);
    ck_assert_mem_eq(experts, ((int32_t[]){3, 2, 0, 1}), sizeof experts);
    ck_assert(rate_command(&r, "hit_rate", 2) == 0.0);
    ck_assert(rate_command(&r, "hit_rate", -1) == 3.0 / 4.0);
    router_close(&r);
}
END_TEST

/* A prediction is for the next layer of the call that made it: a call for another layer (a
 * forward that left one out, another router between) routes by its own gate. */
START_TEST(pregated_stale_prediction_is_unused) {
    static const float gate[4] = {1.0f, 2.0f, 0.0f, -1.0f}, next[4] = {0.0f, -1.0f, 2.0f, 1.5f};
    const char *const kv[] = {"mode=compute", NULL};
    live_router r;
    char why[1024];
    ck_assert_int_eq(router_open(&r, "pregated", kv, 2, TSR_GATING_SOFTMAX, 1, NULL, why,
                                 sizeof why), TSR_OK);
    int32_t experts[2];
    float weights[2];
    route_by_hand(&r, 0, 1, 2, gate, next, experts, weights);
    route_by_hand(&r, 2, 1, 2, gate, NULL, experts, weights);
    ck_assert_mem_eq(experts, ((int32_t[]){1, 0}), sizeof experts);
    ck_assert(rate_command(&r, "hit_rate", -1) == 0.0);
    router_close(&r);
}
END_TEST

/* One token's gate logits [2, 1, 0, -1]: probabilities .644 .237 .087 .032; over the top 3
 * renormalised .665 .245 .090. */
static const float ranked[4] = {2.0f, 1.0f, 0.0f, -1.0f};

typedef struct dynamic_case {
    const char *kv[3];
    int32_t k, normalize;
    int32_t experts[3]; /* -1: empty */
    const float *logits;
} dynamic_case;

/* Four equal probabilities, .25 each exactly: a mass of .5 is reached by two. */
static const float even[4] = {0.0f, 0.0f, 0.0f, 0.0f};

static const dynamic_case dynamic_cases[] = {
    {{"threshold=0", NULL}, 3, 1, {0, 1, 2}, ranked},
    {{"threshold=0.1", NULL}, 3, 1, {0, 1, -1}, ranked},
    {{"threshold=0.08", NULL}, 3, 1, {0, 1, 2}, ranked},
    {{"threshold=0.25", NULL}, 3, 1, {0, -1, -1}, ranked},
    {{"threshold=0.7", NULL}, 3, 1, {0, -1, -1}, ranked}, /* the top expert stays */
    {{"threshold=0.1", NULL}, 3, 0, {0, 1, -1}, ranked},
    {{"threshold=0.1", "max_k=1", NULL}, 3, 1, {0, -1, -1}, ranked},
    {{"top_p=0.6", NULL}, 3, 1, {0, -1, -1}, ranked},
    {{"top_p=0.65", NULL}, 3, 1, {0, 1, -1}, ranked},
    {{"top_p=0.9", NULL}, 3, 1, {0, 1, 2}, ranked},
    {{"top_p=0.99", NULL}, 3, 1, {0, 1, 2}, ranked}, /* no more than the slots */
    {{"top_p=0.9", "max_k=2", NULL}, 3, 1, {0, 1, -1}, ranked},
    {{"top_p=0.8", NULL}, 3, 0, {0, 1, -1}, ranked},
    {{"top_p=1", NULL}, 2, 1, {0, 1}, ranked},
    {{"top_p=0.5", NULL}, 3, 1, {0, 1, -1}, even},
};

/* The kept experts, most probable first, weighted by the model's rule over them alone. */
START_TEST(dynamic_by_hand) {
    const dynamic_case *c = &dynamic_cases[_i];
    live_router r;
    char why[1024];
    ck_assert_int_eq(router_open(&r, "dynamic", c->kv, c->k, TSR_GATING_SOFTMAX, c->normalize,
                                 NULL, why, sizeof why), TSR_OK);
    int32_t experts[3];
    float weights[3];
    const float *logits = c->logits;
    route_by_hand(&r, 1, 1, c->k, logits, NULL, experts, weights);
    double kept = 0;
    int n = 0;
    for (int s = 0; s < c->k; s++) {
        ck_assert_int_eq(experts[s], c->experts[s]);
        if (c->experts[s] < 0) continue;
        kept += softmax_at(logits, 4, c->experts[s]);
        n++;
    }
    for (int s = 0; s < c->k; s++) {
        if (c->experts[s] < 0) {
            ck_assert(weights[s] == 0.0f);
            continue;
        }
        double p = softmax_at(logits, 4, c->experts[s]);
        expect_weight(weights[s], c->normalize ? p / kept : p, c->kv[0], s);
    }
    ck_assert(rate_command(&r, "mean_experts", 1) == n);
    ck_assert(rate_command(&r, "mean_experts", 0) == 0.0);
    router_close(&r);
}
END_TEST

/* The mean counts every token of every call: threshold 0.1 keeps 2 of [2, 1, 0, -1]'s top 3
 * and 1 of a token sure of one expert, then 3 of an even one. */
START_TEST(dynamic_mean_experts) {
    static const float two[8] = {2.0f, 1.0f, 0.0f, -1.0f, 9.0f, 0.0f, 0.0f, 0.0f};
    const char *const kv[] = {"threshold=0.1", NULL};
    live_router r;
    char why[1024];
    ck_assert_int_eq(router_open(&r, "dynamic", kv, 3, TSR_GATING_SOFTMAX, 1, NULL, why,
                                 sizeof why), TSR_OK);
    int32_t experts[6];
    float weights[6];
    route_by_hand(&r, 0, 2, 3, two, NULL, experts, weights);
    ck_assert(rate_command(&r, "mean_experts", 0) == 1.5);
    route_by_hand(&r, 2, 1, 3, even, NULL, experts, weights);
    ck_assert(rate_command(&r, "mean_experts", 2) == 3.0);
    ck_assert(rate_command(&r, "mean_experts", -1) == 2.0);
    router_close(&r);
}
END_TEST

static const struct {
    const char *name, *kv[3];
    int32_t gating;
    const char *error;
} refusals[] = {
    {"dynamic", {"threshold=0.2", "top_p=0.5", NULL}, TSR_GATING_SOFTMAX,
     "router: dynamic: threshold 0.2 and top_p 0.5 are two ways to choose: set one of them "
     "(the other 0)"},
    {"dynamic", {"max_k=3", NULL}, TSR_GATING_SOFTMAX,
     "router: dynamic: max_k 3 is more than the model's 2 experts per token (the slots a token "
     "has)"},
    {"dynamic", {"top_p=0.5", NULL}, TSR_GATING_SIGMOID,
     "router: dynamic: top_p needs softmax gating (a distribution over the experts); this "
     "model's gate is a sigmoid of each logit"},
    {"pregated", {NULL}, 7, "router: pregated: gating 7 is neither softmax (0) nor sigmoid (1)"},
};

START_TEST(bad_parameters_are_refused) {
    live_router r;
    char why[1024];
    ck_assert_int_eq(router_open(&r, refusals[_i].name, refusals[_i].kv, 2, refusals[_i].gating,
                                 1, NULL, why, sizeof why) < 0, 1);
    ck_assert_str_eq(why, refusals[_i].error);
    router_close(&r);
}
END_TEST

/* From the command line: one line, exit 1; a value out of range is the config's refusal. */
START_TEST(bad_parameters_on_the_command_line) {
    static const struct {
        const char *set[2], *error;
    } cases[] = {
        {{"router.threshold=0.2", "router.top_p=0.5"},
         "tessera: router: dynamic: threshold 0.2 and top_p 0.5 are two ways to choose: set one "
         "of them (the other 0)\n"},
        {{"router.threshold=1.5", "router.top_p=0"},
         "tessera: --set: router.threshold: expected a number in [0, 1], got '1.5'\n"},
    };
    char *model = fixture_path("moe-tiny-q8_0");
    const char *const args[] = {"run", "-m", model, "-p", "Once", "-n", "2",
                                "--set", "router.plugin=dynamic", "--set", cases[_i].set[0],
                                "--set", cases[_i].set[1], NULL};
    char *out = NULL, *err = NULL;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
    ck_assert_str_eq(err, cases[_i].error);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
    free(model);
}
END_TEST

/* `tessera run -v` shows pregated's hit rate per layer and dynamic's experts per token. */
START_TEST(run_verbose_shows_the_statistics) {
    char *model = fixture_path("moe-tiny-q8_0");
    const char *router = _i ? "router.plugin=dynamic" : "router.plugin=pregated";
    const char *const args[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "4",
                                "--temperature", "0", "--set", router, "-v", NULL};
    char *out = NULL, *err = NULL;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    if (_i) {
        ck_assert_ptr_nonnull(strstr(err, "tessera: dynamic: info: layer 1: 2.0000 experts per "
                                          "token (of 2) over 8 tokens\n"));
        ck_assert_ptr_nonnull(strstr(err, "tessera: dynamic: info: all layers: 2.0000 experts "
                                          "per token (of 2)\n"));
    } else {
        ck_assert_ptr_nonnull(strstr(err, "tessera: pregated: info: layer 1: the prediction one "
                                          "layer early had "));
        ck_assert_ptr_null(strstr(err, "layer 0: the prediction"));
        ck_assert_ptr_nonnull(strstr(err, "tessera: pregated: info: all layers: hit rate "));
    }
    free(out);
    free(err);
    free(model);
}
END_TEST

int main(void) {
    free(tsr_test_require_data("fixtures/models/moe-tiny-f32.gguf"));
    Suite *s = suite_create("routers");
    TCase *tc = tcase_create("lossless");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, defaults_equal_topk, 0, N_FIXTURES * N_LOSSLESS);
    tcase_add_loop_test(tc, lossy_settings_change_logits, 0, 3);
    suite_add_tcase(s, tc);
    tc = tcase_create("pregated");
    tcase_add_loop_test(tc, pregated_by_hand, 0, 2);
    tcase_add_test(tc, pregated_stale_prediction_is_unused);
    suite_add_tcase(s, tc);
    tc = tcase_create("dynamic");
    tcase_add_loop_test(tc, dynamic_by_hand, 0,
                        (int)(sizeof dynamic_cases / sizeof dynamic_cases[0]));
    tcase_add_test(tc, dynamic_mean_experts);
    suite_add_tcase(s, tc);
    tc = tcase_create("reporting");
    tcase_add_loop_test(tc, bad_parameters_are_refused, 0,
                        (int)(sizeof refusals / sizeof refusals[0]));
    tcase_add_loop_test(tc, bad_parameters_on_the_command_line, 0, 2);
    tcase_add_loop_test(tc, run_verbose_shows_the_statistics, 0, 2);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
