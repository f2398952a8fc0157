/* The 'cache' router (HOBBIT-style expert offloading). With the low-bit rule off it gives topk's
 * logits bit for bit at any budget, on synthetic models and every MoE fixture of the shared data
 * (when present). On a stand-in for the host's hold on the experts (it records loads and
 * evictions): hits, misses and what stays in memory follow LRU and LFU by hand and a plain LRU
 * model on a longer scripted routing, never above the budget; a batch keeps the experts it
 * chose until its next call; a missed expert of low weight is served from a low-bit copy of its
 * own matrices. On a model file whose experts have pages of their own, with their pages dropped
 * from the page cache: every miss reads the whole expert from the file, a hit nothing, and the
 * experts' resident bytes never exceed the budget. With every expert below the threshold, the
 * logits are those of the model whose experts are the low-bit type. Bad parameters get one line;
 * `run -v` logs the counters. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <tessera/kernels_cpu.h>

#include "files/gguf_write.h"
#include "model/experts.h"
#include "pipeline/pipeline_impl.h"
#include "pipeline_fixture.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

#define MIB 1048576u
#define PROBE_DIR TSR_TEST_PLUGIN_DIR "/router-probe"

/* statfs's f_type of tmpfs, whose pages cannot leave memory. */
#define TMPFS_MAGIC_NUMBER 0x01021994

typedef tsr_test_pipeline run;

/* The synthetic models, made once by main(); ALIGNED is tiny-moe F32 rewritten with tensors on
 * page boundaries, so that no two experts share a page. */
enum { TINY_MOE, TINY_MOE_Q8, TINY_QWEN2MOE, ALIGNED, N_MODELS };
static char *model_path[N_MODELS];

typedef struct counters {
    unsigned long long tokens, hits, misses, lowbit, bytes_read, held_bytes, budget;
} counters;

/* The router's counters through its dump_stats command. */
static counters stats_of(const tsr_instance *inst) {
    const tsr_plugin_desc *d = inst->ref->desc;
    const tsr_command *cmd = NULL;
    for (uint32_t i = 0; i < d->n_commands; i++)
        if (!strcmp(d->commands[i].name, "dump_stats")) cmd = &d->commands[i];
    ck_assert_ptr_nonnull(cmd);
    char *path = tsr_test_tmp_path("stats.txt");
    ck_assert_int_eq(((int32_t(*)(void *, const char *))cmd->fn)(inst->self, path), TSR_OK);
    counters c;
    FILE *f = fopen(path, "r");
    ck_assert_int_eq(fscanf(f, "tokens %llu hits %llu misses %llu lowbit %llu bytes_read %llu "
                               "held_bytes %llu budget %llu",
                            &c.tokens, &c.hits, &c.misses, &c.lowbit, &c.bytes_read,
                            &c.held_bytes, &c.budget),
                     7);
    fclose(f);
    unlink(path);
    free(path);
    return c;
}

/* ---- a stand-in for the host's hold on the experts ---------------------------------------- */

/* Layers 0 and 1 have 6 experts of 1 MiB each; layer 2 none. Each expert's matrices are F32
 * (gate and up ne {64, 32}, down ne {32, 64}) of values that differ per expert. */
enum { F_LAYERS = 3, F_EXPERTS = 6, F_EMBD = 64, F_FF = 32, F_K = 2 };

typedef struct fake {
    tsr_expert_access access;
    bool resident[F_LAYERS][F_EXPERTS];
    float values[2][F_EXPERTS][3][F_EMBD * F_FF];
} fake;

static bool fake_valid(int32_t l, int32_t e) { return l >= 0 && l < 2 && e >= 0 && e < F_EXPERTS; }
static uint64_t fake_bytes(void *ctx, int32_t l, int32_t e) {
    (void)ctx;
    return fake_valid(l, e) ? MIB : 0;
}
static void fake_prefetch(void *ctx, int32_t l, int32_t e) {
    (void)ctx;
    (void)l;
    (void)e;
}
static uint64_t fake_resident(void *ctx, int32_t l, int32_t e) {
    const fake *f = ctx;
    return fake_valid(l, e) && f->resident[l][e] ? MIB : 0;
}
static uint64_t fake_load(void *ctx, int32_t l, int32_t e) {
    fake *f = ctx;
    if (!fake_valid(l, e) || f->resident[l][e]) return 0;
    f->resident[l][e] = true;
    return MIB;
}
static void fake_evict(void *ctx, int32_t l, int32_t e) {
    fake *f = ctx;
    if (fake_valid(l, e)) f->resident[l][e] = false;
}
static tsr_status fake_matrices(void *ctx, int32_t l, int32_t e, tsr_tensor *gate, tsr_tensor *up,
                                tsr_tensor *down) {
    fake *f = ctx;
    if (!fake_valid(l, e)) return TSR_E_RANGE;
    tsr_tensor *m[3] = {gate, up, down};
    for (int i = 0; i < 3; i++) {
        int64_t cols = i == 2 ? F_FF : F_EMBD, rows = i == 2 ? F_EMBD : F_FF;
        *m[i] = (tsr_tensor){TSR_SIZED(tsr_tensor), .dtype = TSR_DTYPE_F32, .n_dims = 2,
                             .ne = {cols, rows, 1, 1}, .row_bytes = (size_t)cols * sizeof(float),
                             .data = f->values[l][e][i], .name = "fake expert"};
    }
    return TSR_OK;
}

static fake *fake_new(void) {
    fake *f = calloc(1, sizeof *f);
    f->access = (tsr_expert_access){sizeof f->access, f, fake_bytes, fake_prefetch, fake_resident,
                                    fake_load, fake_evict, fake_matrices};
    uint64_t rng = 7;
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < F_EXPERTS; e++)
            for (int m = 0; m < 3; m++)
                for (int i = 0; i < F_EMBD * F_FF; i++)
                    f->values[l][e][m][i] = tsr_test_rng_unit(&rng);
    return f;
}

/* The cache router with parameters `kv` on the stand-in. */
static void open_cache(fx *r, fake *f, const char *const *kv) {
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.n_layer = F_LAYERS;
    shape.n_expert = F_EXPERTS;
    shape.n_expert_used = F_K;
    shape.n_embd = F_EMBD;
    shape.n_ff_expert = F_FF;
    shape.experts = &f->access;
    fx_open(r, 1, TSR_STAGE_ROUTER, "router-cache.so", "cache", kv, &shape);
}

/* One call at `layer` for n_tok tokens, token t preferring experts pick[t][0], then
 * pick[t][1] (gate logits 4 and 3, the rest 0). The routing must be the picks. */
static void route(fx *r, int32_t layer, int n_tok, const int32_t (*pick)[F_K],
                  const tsr_tensor **subst, float *weights) {
    float logits[8 * F_EXPERTS] = {0};
    int32_t experts[8 * F_K];
    for (int t = 0; t < n_tok; t++) {
        logits[t * F_EXPERTS + pick[t][0]] = 4.0f;
        logits[t * F_EXPERTS + pick[t][1]] = 3.0f;
    }
    memset(subst, 0, sizeof(tsr_tensor *) * 3 * F_K * (size_t)n_tok);
    float hidden[8 * F_EMBD] = {0};
    tsr_route_call call = {TSR_SIZED(tsr_route_call), .layer = layer, .n_tok = n_tok,
                           .gate_logits = logits, .hidden = hidden, .k = F_K,
                           .experts = experts, .weights = weights, .next_layer = -1,
                           .substitute = subst};
    const tsr_router_vtable *vt = r->vt;
    ck_assert_int_eq(vt->route(r->inst->self, &call), TSR_OK);
    for (int t = 0; t < n_tok; t++)
        for (int s = 0; s < F_K; s++) ck_assert_int_eq(experts[t * F_K + s], pick[t][s]);
}

static void route1(fx *r, int32_t layer, int32_t a, int32_t b) {
    const tsr_tensor *subst[3 * F_K];
    float weights[F_K];
    route(r, layer, 1, (const int32_t[][F_K]){{a, b}}, subst, weights);
}

/* The experts of `layer` in memory as a bit set. */
static unsigned resident_set(const fake *f, int32_t layer) {
    unsigned set = 0;
    for (int e = 0; e < F_EXPERTS; e++) set |= (unsigned)f->resident[layer][e] << e;
    return set;
}

/* Budget 3 MiB (3 experts), one token a call at layer 0, by hand:
 *   call   chosen   LRU: hit/miss, then held        LFU: hit/miss, then held (uses)
 *   1      0 1      M M   {0,1}                     M M   {0,1}     0:1 1:1
 *   2      0 2      H M   {0,1,2}                   H M   {0,1,2}   0:2 1:1 2:1
 *   3      1 3      H M   {1,2,3} (0 least recent)  H M   {0,1,3}   (2 least used)
 *   4      0 2      M H   {0,2,3} (1 least recent)  H M   {0,1,2}   (3 least used)
 *   5      3 5      H M   {2,3,5} (0 least recent)  M M   3 out 1 (uses 2, 2 too: 1 less
 *                                                          recent); 5 out 2: {0,3,5}
 * LRU: 4 hits, 6 misses; LFU: 3 hits, 7 misses. */
static const int32_t hand_calls[5][2] = {{0, 1}, {0, 2}, {1, 3}, {0, 2}, {3, 5}};
static const unsigned hand_held[2][5] = {{0x3, 0x7, 0xe, 0xd, 0x2c}, {0x3, 0x7, 0xb, 0x7, 0x29}};
static const unsigned long long hand_hits[2] = {4, 3}, hand_misses[2] = {6, 7};

START_TEST(lru_and_lfu_by_hand) {
    static const char *const rules[2] = {"evict=lru", "evict=lfu"};
    fake *f = fake_new();
    fx r;
    open_cache(&r, f, (const char *[]){"budget_mib=3", rules[_i], NULL});
    for (int c = 0; c < 5; c++) {
        route1(&r, 0, hand_calls[c][0], hand_calls[c][1]);
        ck_assert_msg(resident_set(f, 0) == hand_held[_i][c], "%s, call %d: held 0x%x, expected 0x%x",
                      rules[_i], c + 1, resident_set(f, 0), hand_held[_i][c]);
    }
    counters n = stats_of(r.inst);
    ck_assert_uint_eq(n.hits, hand_hits[_i]);
    ck_assert_uint_eq(n.misses, hand_misses[_i]);
    ck_assert_uint_eq(n.bytes_read, hand_misses[_i] * MIB);
    ck_assert_uint_eq(n.held_bytes, 3 * MIB);
    ck_assert_uint_eq(n.tokens, 5);
    fx_close(&r);
    free(f);
}
END_TEST

/* A plain LRU of `cap` experts over (layer, expert) keys, used in call order; the keys a call
 * chose are not let go during it. */
typedef struct lru_model {
    int keys[16], n, cap;
    unsigned long long hits, misses;
} lru_model;

static void lru_call(lru_model *m, const int *keys, int n_keys) {
    for (int i = 0; i < n_keys; i++) {
        int at = -1;
        for (int j = 0; j < m->n; j++)
            if (m->keys[j] == keys[i]) at = j;
        if (at >= 0) {
            m->hits++;
            memmove(m->keys + at, m->keys + at + 1, sizeof(int) * (size_t)(m->n - at - 1));
            m->n--;
        } else {
            m->misses++;
            for (int j = 0; m->n == m->cap && j < m->n; j++) {
                bool in_call = false;
                for (int q = 0; q < n_keys; q++) in_call |= keys[q] == m->keys[j];
                if (in_call) continue;
                memmove(m->keys + j, m->keys + j + 1, sizeof(int) * (size_t)(m->n - j - 1));
                m->n--;
            }
        }
        m->keys[m->n++] = keys[i];
    }
}

/* 200 calls alternating layers 0 and 1, each choosing two of the layer's first experts more
 * often than the last: hits and misses are the LRU model's, the experts in memory its keys,
 * never more than the budget. */
START_TEST(lru_follows_a_plain_lru) {
    static const char *const budgets[] = {"budget_mib=2", "budget_mib=3", "budget_mib=5.5",
                                          "budget_mib=12"};
    const int cap[] = {2, 3, 5, 12};
    fake *f = fake_new();
    fx r;
    open_cache(&r, f, (const char *[]){budgets[_i], NULL});
    lru_model m = {.cap = cap[_i]};
    uint64_t rng = 99;
    for (int c = 0; c < 200; c++) {
        int32_t layer = c % 2, a, b;
        a = (int32_t)((tsr_test_rng_unit(&rng) + 1.0f) * 0.5f * 4.0f) % 4;
        b = (int32_t)((tsr_test_rng_unit(&rng) + 1.0f) * 0.5f * 6.0f) % 6;
        if (b == a) b = (a + 1) % F_EXPERTS;
        route1(&r, layer, a, b);
        int keys[2] = {layer * F_EXPERTS + a, layer * F_EXPERTS + b};
        lru_call(&m, keys, 2);
        int held = 0;
        for (int l = 0; l < 2; l++)
            for (int e = 0; e < F_EXPERTS; e++) {
                bool want = false;
                for (int j = 0; j < m.n; j++) want |= m.keys[j] == l * F_EXPERTS + e;
                ck_assert_msg(f->resident[l][e] == want, "call %d: layer %d expert %d", c, l, e);
                held += f->resident[l][e];
            }
        ck_assert_int_le(held, cap[_i]);
    }
    counters n = stats_of(r.inst);
    ck_assert_uint_eq(n.hits, m.hits);
    ck_assert_uint_eq(n.misses, m.misses);
    ck_assert_uint_eq(n.bytes_read, m.misses * MIB);
    ck_assert_uint_eq(n.tokens, 100); /* a forward starts at layer 0 */
    fx_close(&r);
    free(f);
}
END_TEST

/* A batch of three tokens choosing four experts at a layer keeps them all through its call,
 * beyond a budget of 2; the next call, all hits, lets the two it did not choose go. */
START_TEST(a_batch_keeps_its_experts) {
    fake *f = fake_new();
    fx r;
    open_cache(&r, f, (const char *[]){"budget_mib=2", NULL});
    const tsr_tensor *subst[3 * 3 * F_K];
    float weights[3 * F_K];
    route(&r, 0, 3, (const int32_t[][F_K]){{0, 1}, {2, 3}, {1, 2}}, subst, weights);
    ck_assert_uint_eq(resident_set(f, 0), 0xf);
    route1(&r, 0, 2, 1); /* two hits; 0 and 3 go, back within the budget */
    ck_assert_uint_eq(resident_set(f, 0), 0x6);
    route1(&r, 1, 4, 5); /* 1 and 2 go */
    ck_assert_uint_eq(resident_set(f, 0), 0);
    ck_assert_uint_eq(resident_set(f, 1), 0x30);
    counters n = stats_of(r.inst);
    ck_assert_uint_eq(n.hits, 4);
    ck_assert_uint_eq(n.misses, 6);
    fx_close(&r);
    free(f);
}
END_TEST

/* Threshold 0.5: the first expert (weight e/(e+1) = 0.73) is loaded, the second (0.27) served
 * from its low-bit copy: the expert's matrices quantized to q4_0 row by row, as substitutes of
 * its slot only. Once held (chosen first), an expert is a hit at any weight. */
START_TEST(low_weight_misses_get_the_lowbit_copy) {
    fake *f = fake_new();
    fx r;
    open_cache(&r, f, (const char *[]){"lowbit_threshold=0.5", "lowbit_type=q4_0", NULL});
    const tsr_tensor *subst[3 * F_K];
    float weights[F_K];
    route(&r, 1, 1, (const int32_t[][F_K]){{2, 4}}, subst, weights);
    ck_assert_float_ge(weights[0], 0.5f);
    ck_assert_float_lt(weights[1], 0.5f);
    ck_assert(subst[0] == NULL && subst[1] == NULL && subst[2] == NULL);
    ck_assert(f->resident[1][2] && !f->resident[1][4]);
    tsr_tensor own[3];
    ck_assert_int_eq(fake_matrices(f, 1, 4, &own[0], &own[1], &own[2]), TSR_OK);
    for (int m = 0; m < 3; m++) {
        const tsr_tensor *s = subst[3 + m];
        ck_assert_ptr_nonnull(s);
        ck_assert_int_eq(s->dtype, TSR_DTYPE_Q4_0);
        ck_assert(s->ne[0] == own[m].ne[0] && s->ne[1] == own[m].ne[1]);
        size_t row = tsr_row_size(TSR_DTYPE_Q4_0, own[m].ne[0]);
        ck_assert_uint_eq(s->row_bytes, row);
        unsigned char want[F_EMBD / 32 * 18];
        for (int64_t i = 0; i < own[m].ne[1]; i++) {
            tsr_quantize_row(TSR_DTYPE_Q4_0, want, (const float *)own[m].data + i * own[m].ne[0],
                             own[m].ne[0]);
            ck_assert_mem_eq((const char *)s->data + i * row, want, row);
        }
    }
    route(&r, 1, 1, (const int32_t[][F_K]){{4, 2}}, subst, weights); /* 4 weighs 0.73 now */
    ck_assert(subst[0] == NULL && subst[3] == NULL);
    route(&r, 1, 1, (const int32_t[][F_K]){{3, 4}}, subst, weights); /* 4 is held: a hit */
    ck_assert(subst[0] == NULL && subst[3] == NULL);
    counters n = stats_of(r.inst);
    ck_assert_uint_eq(n.misses, 3);
    ck_assert_uint_eq(n.lowbit, 1);
    ck_assert_uint_eq(n.hits, 2);
    fx_close(&r);
    free(f);
}
END_TEST

/* ---- on models ------------------------------------------------------------------------------ */

static const char *yaml_of(char *buf, size_t size, const char *router) {
    snprintf(buf, size,
             "tessera: 1\nbackend: { plugin: cpu, threads: 2 }\nquantizer: { plugin: gguf }\n"
             "attention: { plugin: reference }\ncache: { plugin: full }\n"
             "decoder: { plugin: greedy }\nrouter: %s\n",
             router);
    return buf;
}

enum { N_TOK = 12 };

static void prompt(int32_t *tokens, int32_t n_vocab) {
    for (int i = 0; i < N_TOK; i++) tokens[i] = (int32_t)((i * 37 + 11) % n_vocab);
}

/* The prompt's logits, one forward per token (n_tok > 1: all in one batch first), (N_TOK,
 * n_vocab); `after` runs after each forward. */
static float *decode(run *r, bool batch_first, void (*after)(run *, void *), void *ctx) {
    const int32_t nv = r->model->hp.n_vocab;
    int32_t tokens[N_TOK];
    prompt(tokens, nv);
    float *logits = malloc(sizeof(float) * (size_t)nv * N_TOK);
    if (batch_first) free(tsr_test_pipeline_logits(r, tokens, N_TOK));
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r->pl, 0, &err), 0);
    for (int i = 0; i < N_TOK; i++) {
        tsr_batch_entry b = {.seq_id = 0, .pos = i, .token = tokens[i], .want_logits = 1};
        if (tsr_pipeline_forward(r->pl, &b, 1, logits + (size_t)i * (size_t)nv, &err) < 0)
            ck_abort_msg("%s", err.msg);
        if (after) after(r, ctx);
    }
    tsr_pipeline_seq_end(r->pl, 0);
    return logits;
}

static void open_ok(run *r, const char *path, const char *yaml) {
    tsr_error err;
    if (tsr_test_pipeline_open(r, path, yaml, NULL, 64, &err) < 0)
        ck_abort_msg("%s: %s", path, err.msg);
}

/* The bytes of one expert of the model (all are the same size). */
static uint64_t expert_bytes(run *r) {
    const tsr_expert_access *a = tsr_experts_access(r->pl->experts);
    return a->bytes(a->ctx, 0, 0);
}

/* topk's logits against cache's at budgets of k experts, half the experts, all of them and
 * none (no limit), batch then token by token. */
static void expect_topk_at_any_budget(const char *path) {
    char yaml[1024], router[256];
    run r;
    open_ok(&r, path, yaml_of(yaml, sizeof yaml, "{ plugin: topk }"));
    const tsr_hparams hp = r.model->hp;
    const size_t n = (size_t)N_TOK * (size_t)hp.n_vocab;
    const double one = (double)expert_bytes(&r) / MIB;
    const int n_moe = hp.n_layer; /* every layer of these models has experts */
    float *want = decode(&r, true, NULL, NULL);
    tsr_test_pipeline_close(&r);
    const double budgets[] = {one * hp.n_expert_used, one * hp.n_expert * n_moe / 2,
                              one * hp.n_expert * n_moe, 0};
    for (int b = 0; b < 4; b++) {
        for (int rule = 0; rule < 2; rule++) {
            snprintf(router, sizeof router, "{ plugin: cache, budget_mib: %.17g, evict: %s }",
                     budgets[b], rule ? "lfu" : "lru");
            open_ok(&r, path, yaml_of(yaml, sizeof yaml, router));
            float *got = decode(&r, true, NULL, NULL);
            for (size_t i = 0; i < n; i++)
                if (memcmp(&want[i], &got[i], sizeof(float)) != 0)
                    ck_abort_msg("%s, %s: logit %zu: %.9g, expected topk's %.9g", path, router, i,
                                 (double)got[i], (double)want[i]);
            counters c = stats_of(r.pl->router_at[0]);
            ck_assert_uint_eq(c.hits + c.misses,
                              (unsigned long long)(2 * N_TOK * hp.n_expert_used * n_moe));
            ck_assert_uint_eq(c.lowbit, 0);
            free(got);
            tsr_test_pipeline_close(&r);
        }
    }
    free(want);
}

START_TEST(lossless_on_synthetic_models) { expect_topk_at_any_budget(model_path[_i]); }
END_TEST

static const char *const fixtures[] = {
    "fixtures/models/moe-tiny-f32.gguf",     "fixtures/models/moe-tiny-q8_0.gguf",
    "fixtures/models/qwen2moe-tiny-f32.gguf", "fixtures/models/qwen2moe-tiny-q8_0.gguf",
    "fixtures/models/olmoe-tiny-f32.gguf",    "fixtures/models/olmoe-tiny-q8_0.gguf"};

START_TEST(lossless_on_fixtures) {
    char *path = tsr_test_data_path(fixtures[_i]);
    expect_topk_at_any_budget(path);
    free(path);
}
END_TEST

/* After each decode step: the experts' resident bytes (the host's mincore) never exceed the
 * budget, and are what the router says it holds. */
typedef struct budget_check {
    uint64_t budget;
    int steps;
} budget_check;

static void check_resident(run *r, void *ctx) {
    budget_check *b = ctx;
    const tsr_expert_access *a = tsr_experts_access(r->pl->experts);
    uint64_t resident = 0;
    for (int32_t l = 0; l < r->model->hp.n_layer; l++)
        for (int32_t e = 0; e < r->model->hp.n_expert; e++) resident += a->resident(a->ctx, l, e);
    ck_assert_msg(resident <= b->budget, "step %d: %llu resident", b->steps, (unsigned long long)resident);
    ck_assert_uint_eq(resident, stats_of(r->pl->router_at[0]).held_bytes);
    b->steps++;
}

/* The experts the probe router (a plain top-k) chooses in the decode of the prompt on `path`,
 * one token per forward: (calls, k) keys layer * n_expert + e, malloc'd. */
static int *probe_choices(const char *path, int *n_calls) {
    char *trace = tsr_test_tmp_path("trace.bin"), router[512], yaml[1024];
    unlink(trace);
    snprintf(router, sizeof router, "{ plugin: probe, mode: topk, trace: %s }", trace);
    run r;
    tsr_error err;
    if (tsr_test_pipeline_open(&r, path, yaml_of(yaml, sizeof yaml, router), PROBE_DIR, 64,
                               &err) < 0)
        ck_abort_msg("%s", err.msg);
    free(decode(&r, false, NULL, NULL));
    tsr_test_pipeline_close(&r);
    size_t size;
    char *bytes = tsr_test_read_file(trace, &size);
    ck_assert_ptr_nonnull(bytes);
    int *keys = malloc(size), n = 0;
    for (const char *p = bytes; p < bytes + size;) {
        int32_t head[12];
        memcpy(head, p, sizeof head);
        const int64_t n_tok = head[2], x = head[3], embd = head[4], k = head[5];
        ck_assert_int_eq(n_tok, 1);
        p += sizeof head + 4 * (n_tok * embd + n_tok * x + (head[6] ? n_tok * k : 0));
        for (int64_t s = 0; s < k; s++) {
            int32_t e;
            memcpy(&e, p + 4 * s, 4);
            keys[n * k + s] = (int)(head[0] * x + e);
        }
        p += 4 * n_tok * k;
        n++;
    }
    free(bytes);
    unlink(trace);
    free(trace);
    *n_calls = n;
    return keys;
}

/* A budget of the k experts a token uses, then of 3 experts, on the page-aligned model, the
 * file cold, then warm, one token per forward: the hits and misses are those of a plain LRU on the routing the probe
 * router records; every miss reads the expert's bytes from the file (its pages were dropped),
 * a hit nothing. */
START_TEST(pages_dropped_and_read_back) {
    struct statfs fs;
    if (statfs(model_path[ALIGNED], &fs) != 0 || fs.f_type == TMPFS_MAGIC_NUMBER) return;
    char yaml[1024], router[256];
    run r;
    open_ok(&r, model_path[ALIGNED], yaml_of(yaml, sizeof yaml, "{ plugin: topk }"));
    const uint64_t one = expert_bytes(&r);
    const int k = r.model->hp.n_expert_used;
    tsr_test_pipeline_close(&r);
    const uint64_t budget = one * (uint64_t)(_i % 2 ? 3 : k);
    snprintf(router, sizeof router, "{ plugin: cache, budget_mib: %.17g }",
             (double)budget / MIB);
    /* cold: the whole file out of the page cache (the forward's first reads of the other
     * weights must not bring experts in); warm: all of it read (in the page cache's large
     * folios, which the router's first evictions must split) */
    int fd = open(model_path[ALIGNED], O_RDONLY);
    if (_i / 2) {
        char buf[65536];
        while (read(fd, buf, sizeof buf) > 0) continue;
    } else {
        ck_assert_int_eq(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    }
    close(fd);
    open_ok(&r, model_path[ALIGNED], yaml_of(yaml, sizeof yaml, router));
    budget_check b = {.budget = budget, .steps = -1};
    check_resident(&r, &b); /* none: the cache starts empty */
    free(decode(&r, false, check_resident, &b));
    ck_assert_int_eq(b.steps, N_TOK);
    counters c = stats_of(r.pl->router_at[0]);
    int n_calls;
    int *keys = probe_choices(model_path[ALIGNED], &n_calls);
    ck_assert_int_eq(n_calls, N_TOK * r.model->hp.n_layer);
    lru_model m = {.cap = _i % 2 ? 3 : k};
    for (int i = 0; i < n_calls; i++) lru_call(&m, keys + i * k, k);
    free(keys);
    ck_assert_uint_eq(c.hits, m.hits);
    ck_assert_uint_eq(c.misses, m.misses);
    if (_i % 2) ck_assert_uint_gt(c.hits, 0); /* at k, each layer lets the other's go */
    ck_assert_uint_eq(c.bytes_read, c.misses * one);
    ck_assert_uint_eq(c.tokens, N_TOK);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* A copy of `model` with its experts' matrices quantized to `dtype` row by row, the other
 * tensors as they are. Returns its path (malloc'd). */
static char *experts_as(const char *model, int32_t dtype) {
    tsr_gguf *g;
    tsr_error err;
    if (tsr_gguf_open(model, &g, &err) < 0) ck_abort_msg("%s", err.msg);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    for (int64_t i = 0; i < tsr_gguf_n_keys(g); i++) tsr_gguf_writer_copy_key(w, g, i);
    void **owned = calloc((size_t)tsr_gguf_n_tensors(g), sizeof *owned);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        if (!strstr(t->name, "_exps.")) {
            tsr_gguf_writer_add_tensor(w, t->name, t->dtype, t->n_dims, t->ne, t->data);
            continue;
        }
        int64_t rows = t->ne[1] * t->ne[2], n = t->ne[0];
        size_t in = tsr_row_size(t->dtype, n), out = tsr_row_size(dtype, n);
        float *row = malloc(sizeof(float) * (size_t)n);
        owned[i] = malloc(out * (size_t)rows);
        for (int64_t j = 0; j < rows; j++) {
            ck_assert_int_eq(tsr_row_to_f32(row, t->dtype, (const char *)t->data + j * in, n), 0);
            ck_assert_int_eq(tsr_quantize_row(dtype, (char *)owned[i] + j * out, row, n), 0);
        }
        free(row);
        tsr_gguf_writer_add_tensor(w, t->name, dtype, t->n_dims, t->ne, owned[i]);
    }
    char *path = tsr_test_tmp_path("lowbit.gguf");
    ck_assert_int_eq(tsr_gguf_writer_write(w, path, &err), 0);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) free(owned[i]);
    free(owned);
    tsr_gguf_writer_free(w);
    tsr_gguf_close(g);
    return path;
}

/* Threshold 1: no expert is ever loaded, every one is its low-bit copy: the logits of topk on
 * the model whose experts are of that type, bit for bit. */
START_TEST(all_lowbit_equals_lowbit_experts) {
    static const char *const types[] = {"q4_0", "q8_0"};
    static const int32_t dtypes[] = {TSR_DTYPE_Q4_0, TSR_DTYPE_Q8_0};
    const int model = _i / 2 ? TINY_QWEN2MOE : TINY_MOE;
    char *low = experts_as(model_path[model], dtypes[_i % 2]);
    char yaml[1024], router[256];
    run r;
    open_ok(&r, low, yaml_of(yaml, sizeof yaml, "{ plugin: topk }"));
    float *want = decode(&r, true, NULL, NULL);
    const size_t n = (size_t)N_TOK * (size_t)r.model->hp.n_vocab;
    tsr_test_pipeline_close(&r);
    snprintf(router, sizeof router, "{ plugin: cache, lowbit_threshold: 1, lowbit_type: %s }",
             types[_i % 2]);
    open_ok(&r, model_path[model], yaml_of(yaml, sizeof yaml, router));
    float *got = decode(&r, true, NULL, NULL);
    for (size_t i = 0; i < n; i++)
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0)
            ck_abort_msg("%s: logit %zu: %.9g, expected %.9g", router, i, (double)got[i],
                         (double)want[i]);
    counters c = stats_of(r.pl->router_at[0]);
    ck_assert_uint_eq(c.misses + c.hits, 0);
    ck_assert_uint_eq(c.lowbit,
                      (unsigned long long)(2 * N_TOK * r.model->hp.n_expert_used *
                                           r.model->hp.n_layer));
    tsr_test_pipeline_close(&r);
    free(want);
    free(got);
    unlink(low);
    free(low);
}
END_TEST

/* ---- bad parameters, and the counters' line -------------------------------------------------- */

static const struct {
    const char *set, *error;
} refusals[] = {
    {"router.budget_mib=0.04",
     "tessera: router: cache: budget_mib 0.04 (41943 bytes) cannot hold the 2 experts a token "
     "uses at a layer: 2 x 24576 bytes at layer 0 (0.04688 MiB)\n"},
    {"router.evict=fifo", "tessera: --set: router.evict: expected one of lru, lfu, got 'fifo'\n"},
    {"router.lowbit_type=q3",
     "tessera: --set: router.lowbit_type: expected one of q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, "
     "q5_1, q5_k, q6_k, q8_0, iq4_nl, iq4_xs, got 'q3'\n"},
    {"router.lowbit_type=q2_k",
     "tessera: router: cache: lowbit_type q2_k: the experts' gate rows hold 64 values, not a "
     "whole number of its blocks of 256\n"},
    {"quantizer.plugin=rtn", /* experts in rtn's own format */
     "tessera: router: cache: layer 0 expert 0: cannot make its low-bit copy (the kernels "
     "cannot read its type)\n"},
};

START_TEST(bad_parameters_get_one_line) {
    char *out = NULL, *err = NULL;
    const char *args[] = {"run", "-m", model_path[TINY_MOE], "-p", "ab", "-n", "1", "--set",
                          "router.plugin=cache", "--set", "router.lowbit_threshold=0.3", "--set",
                          refusals[_i].set, NULL};
    ck_assert_int_ne(tsr_test_tessera(&out, &err, args), 0);
    ck_assert_str_eq(err, refusals[_i].error);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
}
END_TEST

START_TEST(run_v_logs_the_counters) {
    char *out = NULL, *err = NULL;
    const char *args[] = {"run", "-m", model_path[TINY_MOE], "-p", "ab", "-n", "4",
                          "--temperature", "0", "--set", "router.plugin=cache", "-v", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
    ck_assert_msg(strstr(err, "cache: info: experts: 5 tokens: ") != NULL, "%s", err);
    free(out);
    free(err);
}
END_TEST

/* `from` with every tensor on a page boundary, on disk. */
static int write_aligned(const char *from, const char *to) {
    tsr_gguf *g;
    tsr_error err;
    if (tsr_gguf_open(from, &g, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    for (int64_t i = 0; i < tsr_gguf_n_keys(g); i++) tsr_gguf_writer_copy_key(w, g, i);
    tsr_gguf_writer_set_uint(w, "general.alignment", TSR_GGUF_UINT32, 4096);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        tsr_gguf_writer_add_tensor(w, t->name, t->dtype, t->n_dims, t->ne, t->data);
    }
    int st = tsr_gguf_writer_write(w, to, &err);
    if (st != 0) fprintf(stderr, "%s\n", err.msg);
    tsr_gguf_writer_free(w);
    tsr_gguf_close(g);
    /* written back, so that its pages can leave the page cache (dirty ones cannot) */
    int fd = open(to, O_RDONLY);
    if (st == 0 && (fd < 0 || fsync(fd) != 0)) st = -1;
    if (fd >= 0) close(fd);
    return st;
}

int main(void) {
    char *dir = tsr_test_tmpdir();
    static const char *const shapes[] = {"tiny-moe", "tiny-moe", "tiny-qwen2moe"};
    static const char *const types[] = {"f32", "q8_0", "f32"};
    for (int m = 0; m < N_MODELS; m++) {
        model_path[m] = malloc(strlen(dir) + 32);
        sprintf(model_path[m], "%s/model%d.gguf", dir, m);
        if (m == ALIGNED) {
            if (write_aligned(model_path[TINY_MOE], model_path[m]) != 0) return 1;
            continue;
        }
        if (tsr_test_synth(shapes[m], types[m], model_path[m]) != 0) return 1;
    }
    Suite *s = suite_create("router-cache");
    TCase *tc = tcase_create("rule");
    tcase_add_loop_test(tc, lru_and_lfu_by_hand, 0, 2);
    tcase_add_loop_test(tc, lru_follows_a_plain_lru, 0, 4);
    tcase_add_test(tc, a_batch_keeps_its_experts);
    tcase_add_test(tc, low_weight_misses_get_the_lowbit_copy);
    suite_add_tcase(s, tc);
    tc = tcase_create("models");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, lossless_on_synthetic_models, 0, 3);
    tcase_add_loop_test(tc, pages_dropped_and_read_back, 0, 4);
    tcase_add_loop_test(tc, all_lowbit_equals_lowbit_experts, 0, 4);
    tcase_add_loop_test(tc, bad_parameters_get_one_line, 0,
                        (int)(sizeof refusals / sizeof refusals[0]));
    tcase_add_test(tc, run_v_logs_the_counters);
    char *fixture = tsr_test_data_path(fixtures[0]);
    if (fixture)
        tcase_add_loop_test(tc, lossless_on_fixtures, 0,
                            (int)(sizeof fixtures / sizeof fixtures[0]));
    else
        fprintf(stderr, "test-router-cache: no shared data in %s: the fixtures are left out\n",
                tsr_test_data_dir());
    free(fixture);
    suite_add_tcase(s, tc);
    int status = tsr_test_run_suite(s);
    for (int m = 0; m < N_MODELS; m++) {
        unlink(model_path[m]);
        free(model_path[m]);
    }
    rmdir(dir);
    free(dir);
    return status;
}
