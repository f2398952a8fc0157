/* The cache policies that choose entries by the attention they receive (h2o, a2sf, tova,
 * snapkv with its PyramidKV budgets), loaded from their .so files as the host loads them:
 * - the SDK's selection (tsr_kv_heads_select_) against a sort;
 * - on hand-made cases, exactly which entries each KV head keeps by its paper's rule: a
 *   stand-in for attention adds chosen probabilities to score_acc for the queries at or after
 *   score_from_pos, the hooks run as the host runs them, and the kept sets below are worked
 *   out by hand in the comments;
 * - the refusals of bad parameters, one line each;
 * - on stories260K through the library (`test-cache-policies models`, skipped without the
 *   shared data), a greedy decode with a budget at least the context gives the logits of
 *   'full' bit for bit with each attention plugin that fills score_acc, and a smaller budget
 *   evicts what its stats say. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

#include "pipeline_fixture.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

/* ---- the SDK's selection --------------------------------------------------------------- */

static int rank_cmp_key_pos(const float *key, const int32_t *pos, int64_t a, int64_t b) {
    if (key[a] != key[b]) return key[a] < key[b] ? -1 : 1;
    return pos[a] < pos[b] ? -1 : pos[a] > pos[b];
}

START_TEST(test_select_matches_sort) {
    /* Keys from a few values (many ties, broken by position) and positions shuffled. */
    uint64_t rng = 0x5e1ec7;
    for (int trial = 0; trial < 300; trial++) {
        int64_t m = 2 + (int64_t)(tsr_test_rng_u64(&rng) % 60);
        int64_t k = 1 + (int64_t)(tsr_test_rng_u64(&rng) % (uint64_t)(m - 1));
        float key[64];
        int32_t pos[64];
        int64_t idx[64], sorted[64];
        for (int64_t j = 0; j < m; j++) {
            key[j] = (float)(tsr_test_rng_u64(&rng) % (trial % 2 ? 4 : 1000));
            pos[j] = (int32_t)j * 3;
            idx[j] = j;
        }
        for (int64_t j = m - 1; j > 0; j--) {
            int64_t r = (int64_t)(tsr_test_rng_u64(&rng) % (uint64_t)(j + 1));
            int32_t t = pos[j];
            pos[j] = pos[r];
            pos[r] = t;
        }
        tsr_kv_heads_select_(idx, m, k, key, pos);
        /* sorted: insertion sort of 0..m-1 by (key, pos) */
        for (int64_t j = 0; j < m; j++) {
            int64_t i = j;
            for (; i > 0 && rank_cmp_key_pos(key, pos, j, sorted[i - 1]) < 0; i--)
                sorted[i] = sorted[i - 1];
            sorted[i] = j;
        }
        uint8_t chosen[64] = {0};
        for (int64_t i = 0; i < k; i++) chosen[idx[i]] = 1;
        for (int64_t i = 0; i < m; i++)
            ck_assert_msg(chosen[sorted[i]] == (i < k), "trial %d: m %lld k %lld: rank %lld",
                          trial, (long long)m, (long long)k, (long long)i);
    }
}
END_TEST

/* ---- a policy driven as the host drives it --------------------------------------------- */

/* The attention query position q gives entry position k in (layer, KV head): what the stand-in
 * for attention adds to score_acc (summed over the KV head's query heads already). */
typedef float (*prob_fn)(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k);

typedef struct policy {
    fx f;
    const tsr_cache_vtable *vt;
    tsr_model_shape shape;
} policy;

/* Opens cache-NAME.so with the parameters kv on a model of n_layer layers, 2 KV heads of 2
 * query heads each and head_dim 4, and begins sequence 0. */
static void policy_open(policy *p, const char *name, const char *const *kv, int32_t n_layer) {
    char file[64];
    snprintf(file, sizeof file, "cache-%s.so", name);
    p->shape = tsr_model_shape_synthetic();
    p->shape.n_layer = n_layer;
    p->shape.head_dim = 4;
    p->shape.n_seq_max = 4;
    fx_open(&p->f, 1, TSR_STAGE_CACHE, file, name, kv, &p->shape);
    p->vt = p->f.vt;
    ck_assert_int_eq(p->vt->seq_begin(p->f.inst->self, 0), TSR_OK);
}

static void policy_close(policy *p) { fx_close(&p->f); }

/* K/V rows that encode (position, head, element), so a row read back tells where it came
 * from. */
static float kv_value(int32_t pos, int32_t head, int32_t d, int is_v) {
    return (float)(pos * 100 + head * 10 + d) * (is_v ? -0.5f : 0.25f);
}

/* One forward of positions [pos0, pos0 + n) of `seq`, as the host runs it: per layer the
 * write, then the view, where the stand-in attention adds prob(...) to score_acc for every
 * query at or after score_from_pos and every entry at or before it; then prefill_end after
 * the sequence's first forward, step_end after the others. */
static void policy_forward(policy *p, int64_t seq, int32_t pos0, int32_t n, int first,
                           prob_fn prob, const void *ctx) {
    const int32_t nkv = p->shape.n_kv_head, hd = p->shape.head_dim;
    float *k = malloc(sizeof(float) * (size_t)(n * nkv * hd));
    float *v = malloc(sizeof(float) * (size_t)(n * nkv * hd));
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
    for (int32_t t = 0; t < n; t++) {
        pos[t] = pos0 + t;
        for (int32_t h = 0; h < nkv; h++)
            for (int32_t d = 0; d < hd; d++) {
                k[(t * nkv + h) * hd + d] = kv_value(pos[t], h, d, 0);
                v[(t * nkv + h) * hd + d] = kv_value(pos[t], h, d, 1);
            }
    }
    for (int32_t l = 0; l < p->shape.n_layer; l++) {
        tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = seq, .layer = l,
                          .phase = first ? TSR_PHASE_PREFILL : TSR_PHASE_DECODE, .n = n,
                          .pos = pos, .k = k, .v = v};
        ck_assert_int_eq(p->vt->store(p->f.inst->self, &w), TSR_OK);
        tsr_kv_view views[8] = {{0}};
        ck_assert_int_eq(p->vt->view(p->f.inst->self, seq, l, w.phase, views), TSR_OK);
        for (int32_t h = 0; h < nkv; h++) {
            const tsr_kv_view *view = &views[h];
            if (!view->score_acc) continue;
            for (int32_t q = pos0; q < pos0 + n; q++) {
                if (q < view->score_from_pos) continue;
                for (int64_t j = 0; j < view->n; j++)
                    if (view->pos[j] <= q) view->score_acc[j] += prob(ctx, l, h, q, view->pos[j]);
            }
        }
    }
    tsr_status (*hook)(void *, int64_t) = first ? p->vt->prefill_end : p->vt->step_end;
    if (hook) ck_assert_int_eq(hook(p->f.inst->self, seq), TSR_OK);
    free(k);
    free(v);
    free(pos);
}

/* The positions (< 64) that KV head `head` of `layer` exposes, as a bit set; every row read
 * back must be the one stored at its position. */
static uint64_t policy_kept(policy *p, int64_t seq, int32_t layer, int32_t head) {
    tsr_kv_view views[8] = {{0}};
    ck_assert_int_eq(p->vt->view(p->f.inst->self, seq, layer, TSR_PHASE_DECODE, views), TSR_OK);
    const tsr_kv_view *v = &views[head];
    ck_assert_int_eq(v->dtype, TSR_DTYPE_F32);
    uint64_t set = 0;
    for (int64_t j = 0; j < v->n; j++) {
        int32_t pos = v->pos[j];
        ck_assert(pos >= 0 && pos < 64 && !(set >> pos & 1));
        set |= 1ull << pos;
        const float *kr = (const float *)((const char *)v->k + j * v->k_stride);
        const float *vr = (const float *)((const char *)v->v + j * v->v_stride);
        for (int32_t d = 0; d < p->shape.head_dim; d++) {
            ck_assert_float_eq(kr[d], kv_value(pos, head, d, 0));
            ck_assert_float_eq(vr[d], kv_value(pos, head, d, 1));
        }
    }
    return set;
}

/* "0 2 6 7" as a bit set. */
static uint64_t set_of(const char *positions) {
    uint64_t set = 0;
    char *end;
    for (long p = strtol(positions, &end, 10); end != positions; p = strtol(positions, &end, 10)) {
        set |= 1ull << p;
        positions = end;
    }
    return set;
}

static void set_text(uint64_t set, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = 0;
    for (int p = 0; p < 64 && used < size; p++)
        if (set >> p & 1) used += (size_t)snprintf(buf + used, size - used, "%s%d", used ? " " : "", p);
}

#define ASSERT_KEPT(p, seq, layer, head, want)                                                \
    do {                                                                                      \
        uint64_t got_ = policy_kept((p), (seq), (layer), (head));                             \
        char got_text_[256];                                                                  \
        set_text(got_, got_text_, sizeof got_text_);                                          \
        ck_assert_msg(got_ == set_of(want), "layer %d KV head %d keeps {%s}, want {%s}",       \
                      (int)(layer), (int)(head), got_text_, (want));                          \
    } while (0)

static tsr_cache_stats policy_stats(policy *p) {
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    p->vt->stats(p->f.inst->self, &st);
    return st;
}

/* ---- H2O: heavy hitters and the recent window ------------------------------------------ */

/* Every query gives entry k the weight w[head][k] (not normalised: the policies only compare
 * sums). After a prompt of n tokens entry k has accumulated w[k] * (n - k). */
static const float h2o_w[2][10] = {
    {1.0f, 0.1f, 0.5f, 0.2f, 0.3f, 0.05f, 0.9f, 0.4f, 0.02f, 0.3f},
    {0.1f, 1.0f, 0.2f, 0.6f, 0.1f, 0.7f, 0.1f, 0.1f, 0.5f, 0.3f},
};

static float h2o_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx, (void)layer, (void)q;
    return h2o_w[head][k];
}

START_TEST(test_h2o_heavy_and_recent) {
    const char *kv[] = {"heavy=2", "recent=2", NULL};
    policy p;
    policy_open(&p, "h2o", kv, 2);
    /* Prompt 0..7. Head 0 scores w[k] * (8 - k): 8, .7, 3, 1, 1.2, .15 | 1.8, .4; 6 and 7 are
     * the recent two, 0 and 2 the heaviest of the others. Head 1: .8, 7, 1.2, 3, .4, 2.1 | ...:
     * 1 and 3. */
    policy_forward(&p, 0, 0, 8, 1, h2o_prob, NULL);
    for (int32_t l = 0; l < 2; l++) {
        ASSERT_KEPT(&p, 0, l, 0, "0 2 6 7");
        ASSERT_KEPT(&p, 0, l, 1, "1 3 6 7");
    }
    /* Step 8: head 0 sums 0: 9, 2: 3.5, 6: 2.7, 7: .8, 8: .02; 7 and 8 are recent now, and 6,
     * out of the window, competes with the heavy hitters and loses. Head 1: 1: 8, 3: 3.6,
     * 6: .3 -> 6 goes. */
    policy_forward(&p, 0, 8, 1, 0, h2o_prob, NULL);
    ASSERT_KEPT(&p, 0, 0, 0, "0 2 7 8");
    ASSERT_KEPT(&p, 0, 1, 1, "1 3 7 8");
    /* Step 9: head 0: 0: 10, 2: 4, 7: 1.2 -> 7 goes; head 1: 1: 9, 3: 4.2, 7: .3 -> 7 goes. */
    policy_forward(&p, 0, 9, 1, 0, h2o_prob, NULL);
    ASSERT_KEPT(&p, 0, 1, 0, "0 2 8 9");
    ASSERT_KEPT(&p, 0, 0, 1, "1 3 8 9");
    /* 4 entries per (layer, head) held, 4 + 1 + 1 evicted; rows of 4 f32. */
    tsr_cache_stats st = policy_stats(&p);
    ck_assert_int_eq(st.entries, 2 * 2 * 4);
    ck_assert_int_eq(st.evicted, 2 * 2 * 6);
    ck_assert_double_eq(st.bits_per_value, 32.0);
    /* Rows for heavy + recent and the one token of a step, K and V. */
    ck_assert_uint_eq(st.bytes_reserved, 2 * 2 * (2 * (4 + 1) * 4 * sizeof(float)));
    p.vt->seq_end(p.f.inst->self, 0);
    ck_assert_int_eq(policy_stats(&p).entries, 0);
    ck_assert_uint_eq(policy_stats(&p).bytes_reserved, 0);
    policy_close(&p);
}
END_TEST

/* ---- A2SF: the forgetting factor --------------------------------------------------------- */

/* P[q][k]; the same for every layer and head. */
static const float a2sf_p[5][5] = {
    {1.0f},
    {0.9f, 0.1f},
    {0.2f, 0.5f, 0.3f},
    {0.1f, 0.4f, 0.3f, 0.2f},
    {0.05f, 0.1f, 0.0f, 0.5f, 0.4f},
};

static float a2sf_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx, (void)layer, (void)head;
    return a2sf_p[q][k];
}

/* Runs the prompt 0..3 then the step at 4 with heavy 1 and recent 1; the kept sets of every
 * (layer, head) must be want_prompt, then want_step. */
static void a2sf_case(const char *plugin, const char *factor, const char *want_prompt,
                      const char *want_step) {
    const char *kv[] = {"heavy=1", "recent=1", factor, NULL};
    policy p;
    policy_open(&p, plugin, kv, 1);
    policy_forward(&p, 0, 0, 4, 1, a2sf_prob, NULL);
    for (int32_t h = 0; h < 2; h++) ASSERT_KEPT(&p, 0, 0, h, want_prompt);
    policy_forward(&p, 0, 4, 1, 0, a2sf_prob, NULL);
    for (int32_t h = 0; h < 2; h++) ASSERT_KEPT(&p, 0, 0, h, want_step);
    policy_close(&p);
}

/* The first position whose query scores when a2sf stores a prompt of 5. */
static int32_t a2sf_first_observed(const char *factor) {
    const char *kv[] = {factor, NULL};
    policy p;
    policy_open(&p, "a2sf", kv, 1);
    float k[5 * 2 * 4] = {0}, v[5 * 2 * 4] = {0};
    int32_t pos[5] = {0, 1, 2, 3, 4};
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = 0, .layer = 0,
                      .phase = TSR_PHASE_PREFILL, .n = 5, .pos = pos, .k = k, .v = v};
    ck_assert_int_eq(p.vt->store(p.f.inst->self, &w), TSR_OK);
    tsr_kv_view views[2];
    ck_assert_int_eq(p.vt->view(p.f.inst->self, 0, 0, TSR_PHASE_PREFILL, views), TSR_OK);
    ck_assert_ptr_nonnull(views[0].score_acc);
    ck_assert_int_eq(views[1].score_from_pos, views[0].score_from_pos);
    policy_close(&p);
    return views[0].score_from_pos;
}

START_TEST(test_a2sf_prompt_window) {
    /* The last round(1 / (1 - factor)) queries: 1 / 0.4 = 2.5 -> 3 of them. */
    ck_assert_int_eq(a2sf_first_observed("factor=0.6"), 2);
    ck_assert_int_eq(a2sf_first_observed("factor=0.5"), 3);
    ck_assert_int_eq(a2sf_first_observed("factor=0"), 4);
    ck_assert_int_eq(a2sf_first_observed("factor=0.9"), 0);
    ck_assert_int_eq(a2sf_first_observed("factor=1"), 0);
}
END_TEST

START_TEST(test_a2sf_forgetting_factor) {
    /* factor 0.5: the prompt's last round(1 / (1 - 0.5)) = 2 queries score: 0: .3, 1: .9,
     * 2: .6, 3: .2; 3 is recent, 1 the heaviest other. Then the scores halve (1: .45, 3: .1)
     * and step 4 adds 1: .1, 3: .5: 1 has .55 and 3 .6, so 1 goes (without the halving 1
     * would keep 1.0 against 3's .7). */
    a2sf_case("a2sf", "factor=0.5", "1 3", "3 4");
    /* factor 1 forgets nothing and every prompt query scores, as in H2O: 0: 2.2, 1: 1, 2: .6
     * -> 0 stays; step 4: 0: 2.25, 3: .7 -> 3 goes. */
    a2sf_case("a2sf", "factor=1", "0 3", "0 4");
    a2sf_case("h2o", NULL, "0 3", "0 4");
}
END_TEST

/* ---- TOVA: the current query's attention ------------------------------------------------ */

/* Only the last query's row matters to TOVA; the earlier queries of the prompt all attend to
 * entry 2, which a policy observing them would keep. */
static float tova_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx, (void)layer;
    static const float last_of_prompt[2][5] = {{0.3f, 0.05f, 0.2f, 0.1f, 0.35f},
                                               {0.1f, 0.25f, 0.05f, 0.3f, 0.3f}};
    static const float step5[2][6] = {{0.1f, 0.0f, 0.15f, 0.1f, 0.025f, 0.2f},
                                      {0.1f, 0.15f, 0.0f, 0.2f, 0.025f, 0.2f}};
    if (q < 4) return k == 2 ? 1.0f : 0.0f;
    return q == 4 ? last_of_prompt[head][k] : step5[head][k];
}

START_TEST(test_tova_current_query) {
    const char *layer_kv[] = {"budget=3", NULL}, *head_kv[] = {"budget=3", "scope=head", NULL};
    policy p;
    /* scope layer: the heads' sums .4, .3, .25, .4, .65 -> 2 then 1 go from both heads. */
    policy_open(&p, "tova", layer_kv, 2);
    policy_forward(&p, 0, 0, 5, 1, tova_prob, NULL);
    for (int32_t h = 0; h < 2; h++) ASSERT_KEPT(&p, 0, 1, h, "0 3 4");
    /* Step 5 sums 0: .2, 3: .3, 4: .05, 5: .4: 4 goes, though it led the prompt (summed over
     * both forwards, 0 would have gone). */
    policy_forward(&p, 0, 5, 1, 0, tova_prob, NULL);
    for (int32_t h = 0; h < 2; h++) ASSERT_KEPT(&p, 0, 0, h, "0 3 5");
    ck_assert_int_eq(policy_stats(&p).evicted, 2 * 2 * 3);
    policy_close(&p);

    /* scope head: head 0 drops 1 (.05) and 3 (.1), head 1 drops 2 (.05) and 0 (.1); at step
     * 5 each drops 4 (.025). */
    policy_open(&p, "tova", head_kv, 2);
    policy_forward(&p, 0, 0, 5, 1, tova_prob, NULL);
    ASSERT_KEPT(&p, 0, 0, 0, "0 2 4");
    ASSERT_KEPT(&p, 0, 0, 1, "1 3 4");
    policy_forward(&p, 0, 5, 1, 0, tova_prob, NULL);
    ASSERT_KEPT(&p, 0, 1, 0, "0 2 5");
    ASSERT_KEPT(&p, 0, 1, 1, "1 3 5");
    policy_close(&p);
}
END_TEST

static float equal_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx, (void)layer, (void)head, (void)q, (void)k;
    return 0.5f;
}

START_TEST(test_ties_drop_the_lower_position) {
    const char *kv[] = {"budget=2", "scope=head", NULL};
    policy p;
    policy_open(&p, "tova", kv, 1);
    policy_forward(&p, 0, 0, 3, 1, equal_prob, NULL);
    ASSERT_KEPT(&p, 0, 0, 0, "1 2");
    policy_forward(&p, 0, 3, 1, 0, equal_prob, NULL);
    ASSERT_KEPT(&p, 0, 0, 1, "2 3");
    policy_close(&p);
}
END_TEST

/* ---- SnapKV: the observation window's votes, pooled ------------------------------------ */

/* A prompt of 10: the window's queries 8 and 9 vote .9 for 1, .5 for each of 4, 5, 6 and .8
 * for 7 (as .4 + .5, .25 + .25 and .4 + .4), and 2 for the window's first entry, 8, which
 * must not reach 7 through the pooling; every earlier query attends to entry 0 only. */
static float snap_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx, (void)layer, (void)head;
    static const float votes[2][8] = {{0, 0.4f, 0, 0, 0.25f, 0.25f, 0.25f, 0.4f},
                                      {0, 0.5f, 0, 0, 0.25f, 0.25f, 0.25f, 0.4f}};
    if (q < 8) return k == 0 ? 5.0f : 0.0f;
    return q < 10 && k < 8 ? votes[q - 8][k] : 1.0f;
}

/* The prompt 0..9 through snapkv with budget 5 and window 2, then one step: each head keeps
 * the window (8, 9), the three entries `want` chosen before it, then the new token. */
static void snap_case(const char *kernel, const char *pooling, const char *want,
                      const char *want_after_step) {
    const char *kv[] = {"budget=5", "window=2", kernel, pooling, NULL};
    policy p;
    policy_open(&p, "snapkv", kv, 2);
    policy_forward(&p, 0, 0, 10, 1, snap_prob, NULL);
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++) ASSERT_KEPT(&p, 0, l, h, want);
    /* The rows shrank to the 5 entries kept (2 layers, 2 heads, K and V, 4 floats a row)... */
    ck_assert_uint_eq(policy_stats(&p).bytes_reserved, 2 * 2 * 2 * 5 * 4 * sizeof(float));
    /* ... and generated tokens are all kept, no longer scored, the rows doubling. */
    policy_forward(&p, 0, 10, 1, 0, snap_prob, NULL);
    ck_assert_uint_eq(policy_stats(&p).bytes_reserved, 2 * 2 * 2 * 10 * 4 * sizeof(float));
    tsr_kv_view views[2];
    ck_assert_int_eq(p.vt->view(p.f.inst->self, 0, 0, TSR_PHASE_DECODE, views), TSR_OK);
    ck_assert_ptr_null(views[0].score_acc);
    ASSERT_KEPT(&p, 0, 1, 1, want_after_step);
    ck_assert_int_eq(policy_stats(&p).evicted, 2 * 2 * 5);
    policy_close(&p);
}

START_TEST(test_snapkv_pooled_votes) {
    /* avg, kernel 3 (zero padding, divided by 3): 0, 1, 2: .3; 3: .17; 4: .33; 5: .5; 6: .6;
     * 7: .43 -> 6, 5, 7: the cluster beats the lone peak at 1. */
    snap_case("kernel=3", "pooling=avg", "5 6 7 8 9", "5 6 7 8 9 10");
    /* kernel 1, no pooling: 1 (.9), 7 (.8), then one of the tied 4, 5, 6: the lower positions
     * go. */
    snap_case("kernel=1", "pooling=avg", "1 6 7 8 9", "1 6 7 8 9 10");
    /* max, kernel 3: 0, 1, 2 take the peak's .9, 6 and 7 only .8. */
    snap_case("kernel=3", "pooling=max", "0 1 2 8 9", "0 1 2 8 9 10");
}
END_TEST

START_TEST(test_snapkv_short_prompt_and_window) {
    const char *kv[] = {"budget=5", "window=2", NULL};
    policy p;
    policy_open(&p, "snapkv", kv, 1);
    /* The prompt's views ask for the votes of its last 2 queries. */
    const int32_t nkv = p.shape.n_kv_head, hd = p.shape.head_dim;
    float k[5 * 2 * 4] = {0}, v[5 * 2 * 4] = {0};
    int32_t pos[5] = {0, 1, 2, 3, 4};
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = 0, .layer = 0,
                      .phase = TSR_PHASE_PREFILL, .n = 5, .pos = pos, .k = k, .v = v};
    ck_assert_int_eq(nkv * hd * 5, (int32_t)(sizeof k / sizeof k[0]));
    ck_assert_int_eq(p.vt->store(p.f.inst->self, &w), TSR_OK);
    tsr_kv_view views[2];
    ck_assert_int_eq(p.vt->view(p.f.inst->self, 0, 0, TSR_PHASE_PREFILL, views), TSR_OK);
    ck_assert_ptr_nonnull(views[1].score_acc);
    ck_assert_int_eq(views[1].score_from_pos, 3);
    /* A prompt no longer than the budget is kept whole. */
    ck_assert_int_eq(p.vt->prefill_end(p.f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(policy_stats(&p).entries, 2 * 5);
    ck_assert_int_eq(policy_stats(&p).evicted, 0);
    policy_close(&p);
}
END_TEST

/* ---- PyramidKV: per-layer budgets ------------------------------------------------------- */

static float any_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    (void)ctx;
    return (float)((k * 7 + q * 3 + layer + head * 5) % 11) * 0.1f;
}

/* The entries each layer of a 4-layer model keeps from a prompt of n with budget 12 and
 * window 2 (k = 10 before the window on average), every head alike and the window among them. */
static void pyramid_case(const char *pyramid, const char *beta, int32_t n, const int64_t want[4]) {
    const char *kv[] = {"budget=12", "window=2", pyramid, beta, NULL};
    policy p;
    policy_open(&p, "snapkv", kv, 4);
    policy_forward(&p, 0, 0, n, 1, any_prob, NULL);
    int64_t total = 0;
    for (int32_t l = 0; l < 4; l++)
        for (int32_t h = 0; h < 2; h++) {
            uint64_t set = policy_kept(&p, 0, l, h);
            ck_assert_msg(__builtin_popcountll(set) == want[l], "%s %s n %d: layer %d keeps %d, "
                          "want %lld", pyramid, beta, n, l, __builtin_popcountll(set),
                          (long long)want[l]);
            ck_assert(set >> (n - 2) == 3); /* the window */
            total += want[l];
        }
    ck_assert_int_eq(policy_stats(&p).entries, total);
    policy_close(&p);
}

START_TEST(test_pyramid_budgets) {
    /* beta 5: lo = 10 / 5 = 2, hi = 2 * 10 - 2 = 18, step (18 - 2) / 3 = 5: 18, 13, 8, 3
     * before the window (10.5 on average: the step is whole). */
    pyramid_case("pyramid=true", "beta=5", 24, (const int64_t[]){20, 15, 10, 5});
    /* beta 20: lo 0, hi 20, but the prompt has 19 before the window: hi 19, lo 20 - 19 = 1,
     * step 6: 19, 13, 7, 1 (10 on average). */
    pyramid_case("pyramid=true", "beta=20", 21, (const int64_t[]){21, 15, 9, 3});
    /* ... and with 18 there: hi 18, lo 2, step 5: 18, 13, 8, 3. */
    pyramid_case("pyramid=true", "beta=20", 20, (const int64_t[]){20, 15, 10, 5});
    /* A prompt shorter than 2k = 20 keeps k in every layer, as PyramidKV's code does. */
    pyramid_case("pyramid=true", "beta=5", 19, (const int64_t[]){12, 12, 12, 12});
    /* beta 1: lo = hi = k. Without pyramid: k everywhere. */
    pyramid_case("pyramid=true", "beta=1", 24, (const int64_t[]){12, 12, 12, 12});
    pyramid_case("pyramid=false", "beta=5", 24, (const int64_t[]){12, 12, 12, 12});
}
END_TEST

/* ---- equivalences on random attention ---------------------------------------------------- */

static float hashed_prob(const void *ctx, int32_t layer, int32_t head, int32_t q, int32_t k) {
    uint64_t x = *(const uint64_t *)ctx ^ ((uint64_t)layer << 48 | (uint64_t)head << 40 |
                                            (uint64_t)q << 20 | (uint64_t)k);
    x = tsr_test_rng_u64(&x);
    return (float)(x >> 40) / (float)(1 << 24);
}

/* Runs two policies side by side on the same random attention (a prompt of 20, then 30
 * steps) and requires the same kept sets of every layer and KV head after every forward. */
static void same_choices(const char *name_a, const char *const *kv_a, const char *name_b,
                         const char *const *kv_b) {
    uint64_t seed = 0x1234567;
    policy a, b;
    policy_open(&a, name_a, kv_a, 2);
    policy_open(&b, name_b, kv_b, 2);
    for (int32_t pos = 0; pos < 50; pos = pos ? pos + 1 : 20) {
        int32_t n = pos ? 1 : 20;
        policy_forward(&a, 0, pos, n, pos == 0, hashed_prob, &seed);
        policy_forward(&b, 0, pos, n, pos == 0, hashed_prob, &seed);
        for (int32_t l = 0; l < 2; l++)
            for (int32_t h = 0; h < 2; h++)
                ck_assert_msg(policy_kept(&a, 0, l, h) == policy_kept(&b, 0, l, h),
                              "%s and %s differ after position %d, layer %d KV head %d", name_a,
                              name_b, pos + n - 1, l, h);
    }
    ck_assert_int_eq(policy_stats(&a).evicted, policy_stats(&b).evicted);
    ck_assert_int_gt(policy_stats(&a).evicted, 0);
    policy_close(&a);
    policy_close(&b);
}

START_TEST(test_equivalent_settings) {
    /* A2SF forgetting nothing is H2O. */
    const char *a2sf_1[] = {"heavy=5", "recent=3", "factor=1", NULL};
    const char *h2o[] = {"heavy=5", "recent=3", NULL};
    same_choices("a2sf", a2sf_1, "h2o", h2o);
    /* A2SF forgetting everything, with no recent window, ranks by the last query alone: TOVA
     * per head. */
    const char *a2sf_0[] = {"heavy=8", "recent=0", "factor=0", NULL};
    const char *tova[] = {"budget=8", "scope=head", NULL};
    same_choices("a2sf", a2sf_0, "tova", tova);
}
END_TEST

/* ---- against a plain model of the rules ----------------------------------------------- */

/* The rules of h2o / a2sf and tova written by position, with no slots, moves or selection:
 * held[l][h][p] and score[l][h][p], the scores added in the order the stand-in attention adds
 * them, so that both sides compute the same floats. */
typedef struct plain {
    int tova, tova_layer;    /* else h2o's rule, with a2sf's factor */
    int64_t heavy, recent, budget, observe;
    float factor;
    uint8_t held[2][2][64];
    float score[2][2][64];
    int32_t evicted_max[2][2];
} plain;

static void plain_forward(plain *m, int32_t pos0, int32_t n, prob_fn prob, const void *ctx) {
    int32_t next = pos0 + n;
    int32_t from = m->observe >= n ? pos0 : next - (int32_t)m->observe;
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++) {
            if (m->tova) memset(m->score[l][h], 0, sizeof m->score[l][h]);
            for (int32_t p = pos0; p < next; p++) {
                m->held[l][h][p] = 1;
                m->score[l][h][p] = 0.0f;
            }
            for (int32_t q = from; q < next; q++)
                for (int32_t k = 0; k <= q; k++)
                    if (m->held[l][h][k]) m->score[l][h][k] += prob(ctx, l, h, q, k);
        }
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++) {
            int64_t held = 0;
            for (int32_t p = 0; p < next; p++) held += m->held[l][h][p];
            int64_t keep = m->tova ? m->budget : m->heavy + m->recent;
            int32_t protect = m->tova ? next : next - (int32_t)m->recent;
            for (; held > keep; held--) {
                int32_t worst = -1;
                for (int32_t p = 0; p < protect; p++) {
                    if (!m->held[l][h][p]) continue;
                    float key = m->score[l][h][p], worst_key = worst < 0 ? 0 : m->score[l][h][worst];
                    if (m->tova_layer) {
                        key = m->score[l][0][p] + m->score[l][1][p];
                        if (worst >= 0) worst_key = m->score[l][0][worst] + m->score[l][1][worst];
                    }
                    if (worst < 0 || key < worst_key) worst = p;
                }
                for (int32_t hh = m->tova_layer ? 0 : h; hh <= (m->tova_layer ? 1 : h); hh++) {
                    m->held[l][hh][worst] = 0;
                    if (worst > m->evicted_max[l][hh]) m->evicted_max[l][hh] = worst;
                }
            }
            if (m->tova_layer) break; /* both heads done */
        }
    if (m->tova) return;
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++)
            for (int32_t p = 0; p < next; p++)
                if (m->held[l][h][p]) m->score[l][h][p] *= m->factor;
}

static void assert_same_as_plain(policy *p, int64_t seq, const plain *m, int32_t at) {
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++) {
            uint64_t want = 0;
            for (int32_t q = 0; q < 64; q++) want |= (uint64_t)m->held[l][h][q] << q;
            uint64_t got = policy_kept(p, seq, l, h);
            char got_text[256], want_text[256];
            set_text(got, got_text, sizeof got_text);
            set_text(want, want_text, sizeof want_text);
            ck_assert_msg(got == want, "seq %lld after position %d: layer %d KV head %d keeps "
                          "{%s}, the rule {%s}", (long long)seq, at, l, h, got_text, want_text);
        }
}

/* A fork is a copy: the same entries in the views of both sequences, with the same scores
 * asked for from the same position. */
static void assert_views_equal(policy *p, int64_t a, int64_t b) {
    for (int32_t l = 0; l < 2; l++) {
        tsr_kv_view va[2], vb[2];
        ck_assert_int_eq(p->vt->view(p->f.inst->self, a, l, TSR_PHASE_DECODE, va), TSR_OK);
        ck_assert_int_eq(p->vt->view(p->f.inst->self, b, l, TSR_PHASE_DECODE, vb), TSR_OK);
        for (int32_t h = 0; h < 2; h++) {
            ck_assert_int_eq(va[h].n, vb[h].n);
            ck_assert_mem_eq(va[h].pos, vb[h].pos, sizeof(int32_t) * (size_t)va[h].n);
            ck_assert_int_eq(va[h].score_from_pos, vb[h].score_from_pos);
            ck_assert_int_eq(!va[h].score_acc, !vb[h].score_acc);
            if (va[h].score_acc)
                ck_assert_mem_eq(va[h].score_acc, vb[h].score_acc, sizeof(float) * (size_t)va[h].n);
        }
    }
}

/* The model's refusal of a cut: some head evicted a position at or after it. */
static int plain_cut_refused(const plain *m, int32_t n_pos) {
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++)
            if (m->evicted_max[l][h] >= n_pos) return 1;
    return 0;
}

static void plain_cut(plain *m, int32_t n_pos) {
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++)
            for (int32_t p = n_pos; p < 64; p++) m->held[l][h][p] = 0;
}

static const struct plain_case {
    const char *name;
    const char *kv[4];
    plain rule;
} plain_cases[] = {
    {"h2o", {"heavy=5", "recent=3"}, {.heavy = 5, .recent = 3, .observe = INT64_MAX,
                                      .factor = 1.0f}},
    {"h2o", {"heavy=8", "recent=0"}, {.heavy = 8, .observe = INT64_MAX, .factor = 1.0f}},
    {"a2sf", {"heavy=4", "recent=4", "factor=0.9"}, {.heavy = 4, .recent = 4, .observe = 10,
                                                     .factor = 0.9f}},
    {"a2sf", {"heavy=6", "recent=1", "factor=0.5"}, {.heavy = 6, .recent = 1, .observe = 2,
                                                     .factor = 0.5f}},
    {"tova", {"budget=7", "scope=head"}, {.tova = 1, .budget = 7, .observe = 1}},
    {"tova", {"budget=7", "scope=layer"}, {.tova = 1, .tova_layer = 1, .budget = 7,
                                           .observe = 1}},
};

/* A prompt of 20, 15 steps, a fork whose two sides then see different attention for 10 steps,
 * a cut of the copy (refused when it evicted something at or after it), and 5 more steps:
 * after every forward the plugin keeps what the plain rule keeps, head by head. */
START_TEST(test_same_as_the_plain_rule) {
    const struct plain_case *c = &plain_cases[_i];
    uint64_t seed[2] = {0xabcdef + (uint64_t)_i, 0x777 + (uint64_t)_i};
    plain m[2] = {c->rule, c->rule};
    for (int32_t l = 0; l < 2; l++)
        for (int32_t h = 0; h < 2; h++) m[0].evicted_max[l][h] = -1;
    policy p;
    policy_open(&p, c->name, c->kv, 2);
    policy_forward(&p, 0, 0, 20, 1, hashed_prob, &seed[0]);
    plain_forward(&m[0], 0, 20, hashed_prob, &seed[0]);
    assert_same_as_plain(&p, 0, &m[0], 19);
    for (int32_t pos = 20; pos < 35; pos++) {
        policy_forward(&p, 0, pos, 1, 0, hashed_prob, &seed[0]);
        plain_forward(&m[0], pos, 1, hashed_prob, &seed[0]);
        assert_same_as_plain(&p, 0, &m[0], pos);
    }
    ck_assert_int_eq(p.vt->seq_fork(p.f.inst->self, 0, 1), TSR_OK);
    m[1] = m[0];
    assert_views_equal(&p, 0, 1);
    for (int32_t pos = 35; pos < 45; pos++)
        for (int64_t s = 0; s < 2; s++) {
            policy_forward(&p, s, pos, 1, 0, hashed_prob, &seed[s]);
            plain_forward(&m[s], pos, 1, hashed_prob, &seed[s]);
            assert_same_as_plain(&p, s, &m[s], pos);
        }
    int32_t cut = 42;
    tsr_status st = p.vt->seq_truncate(p.f.inst->self, 1, cut);
    ck_assert_int_eq(st, plain_cut_refused(&m[1], cut) ? TSR_E_UNSUPPORTED : TSR_OK);
    if (st == TSR_OK) plain_cut(&m[1], cut);
    else cut = 45;
    assert_same_as_plain(&p, 1, &m[1], cut - 1);
    for (int32_t pos = cut; pos < cut + 5; pos++) {
        policy_forward(&p, 1, pos, 1, 0, hashed_prob, &seed[1]);
        plain_forward(&m[1], pos, 1, hashed_prob, &seed[1]);
        assert_same_as_plain(&p, 1, &m[1], pos);
    }
    policy_close(&p);
}
END_TEST

/* ---- fork and truncation after an eviction ---------------------------------------------- */

START_TEST(test_fork_and_truncate_after_compression) {
    const char *kv[] = {"budget=5", "window=2", "kernel=3", NULL};
    policy p;
    policy_open(&p, "snapkv", kv, 2);
    policy_forward(&p, 0, 0, 10, 1, snap_prob, NULL);
    policy_forward(&p, 0, 10, 1, 0, snap_prob, NULL);
    /* The fork exposes what its source does; each side then grows on its own. */
    ck_assert_int_eq(p.vt->seq_fork(p.f.inst->self, 0, 1), TSR_OK);
    ASSERT_KEPT(&p, 1, 1, 0, "5 6 7 8 9 10");
    policy_forward(&p, 1, 11, 1, 0, snap_prob, NULL);
    ASSERT_KEPT(&p, 1, 0, 1, "5 6 7 8 9 10 11");
    ASSERT_KEPT(&p, 0, 0, 1, "5 6 7 8 9 10");
    /* 0..4 were evicted: a cut at 4 cannot be honoured, one at 9 can. */
    ck_assert_int_eq(p.vt->seq_truncate(p.f.inst->self, 1, 4), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(fx_error(&p.f), "seq_truncate: sequence 1: layer 0 KV head 0 already "
                                     "evicted position 4 >= 4; this policy cannot bring it back");
    ASSERT_KEPT(&p, 1, 1, 1, "5 6 7 8 9 10 11");
    ck_assert_int_eq(p.vt->seq_truncate(p.f.inst->self, 1, 9), TSR_OK);
    ASSERT_KEPT(&p, 1, 1, 1, "5 6 7 8");
    policy_forward(&p, 1, 9, 1, 0, snap_prob, NULL);
    ASSERT_KEPT(&p, 1, 1, 0, "5 6 7 8 9");
    /* Before any eviction, every cut works. */
    p.vt->seq_end(p.f.inst->self, 0);
    ck_assert_int_eq(p.vt->seq_begin(p.f.inst->self, 0), TSR_OK);
    policy_forward(&p, 0, 0, 4, 1, snap_prob, NULL);
    ck_assert_int_eq(p.vt->seq_truncate(p.f.inst->self, 0, 0), TSR_OK);
    ck_assert_uint_eq(policy_kept(&p, 0, 0, 0), 0);
    policy_close(&p);
}
END_TEST

START_TEST(test_store_errors) {
    policy p;
    policy_open(&p, "h2o", NULL, 2);
    float k[2 * 4] = {0}, v[2 * 4] = {0};
    int32_t neg = -1, zero = 0;
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = 0, .layer = 2, .n = 1, .pos = &zero,
                      .k = k, .v = v};
    ck_assert_int_eq(p.vt->store(p.f.inst->self, &w), TSR_E_RANGE);
    ck_assert_str_eq(fx_error(&p.f), "store: layer 2 outside [0, 2)");
    w.layer = 1;
    w.seq_id = 5;
    ck_assert_int_eq(p.vt->store(p.f.inst->self, &w), TSR_E_INVALID);
    ck_assert_str_eq(fx_error(&p.f), "store: unknown sequence 5");
    w.seq_id = 0;
    w.pos = &neg;
    ck_assert_int_eq(p.vt->store(p.f.inst->self, &w), TSR_E_RANGE);
    ck_assert_str_eq(fx_error(&p.f), "store: sequence 0 layer 1: negative position -1");
    tsr_kv_view views[2];
    ck_assert_int_eq(p.vt->view(p.f.inst->self, 0, -1, 0, views), TSR_E_RANGE);
    ck_assert_str_eq(fx_error(&p.f), "view: layer -1 outside [0, 2)");
    ck_assert_int_eq(p.vt->step_end(p.f.inst->self, 3), TSR_E_INVALID);
    ck_assert_str_eq(fx_error(&p.f), "step_end: unknown sequence 3");
    ck_assert_int_eq(policy_stats(&p).entries, 0);
    policy_close(&p);
}
END_TEST

/* ---- bad parameters ------------------------------------------------------------------------ */

/* Binds `kv` to the plugin's table and creates an instance, expecting a failure: returns the
 * message (static), prefixed "bind: " or "create: " by the step that refused. */
static const char *refusal(const char *name, const char *const *kv) {
    static char why[1100];
    char path[4096];
    snprintf(path, sizeof path, "%s/cache-%s.so", tsr_test_env("TESSERA_PLUGIN_DIR"), name);
    tsr_error err = {{0}};
    tsr_pool *pool = tsr_pool_create(1);
    tsr_registry *reg = tsr_registry_create(pool);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, name);
    tsr_kv_text items[8];
    size_t n = 0;
    for (; kv[n]; n++) {
        char *text = strdup(kv[n]), *eq = strchr(text, '=');
        *eq = '\0';
        items[n] = (tsr_kv_text){.key = text, .value = eq + 1, .loc = {"test.yaml", 3, 7}};
    }
    tsr_bound_params bound;
    if (tsr_params_bind(ref->desc->params, ref->desc->n_params, name, "cache",
                        (tsr_src_loc){"test.yaml", 3, 1}, items, n, &bound, &err) < 0) {
        snprintf(why, sizeof why, "bind: %s", err.msg);
    } else {
        tsr_model_shape s = tsr_model_shape_synthetic();
        tsr_stage_init init;
        const void *initp = tsr_stage_init_fill(TSR_STAGE_CACHE, &s, &init);
        tsr_instance *inst = NULL;
        tsr_status st = tsr_instance_create(ref, pool, &bound.params, initp, &inst, &err);
        ck_assert_int_eq(st, TSR_E_INVALID);
        ck_assert_ptr_null(inst);
        snprintf(why, sizeof why, "create: %s", err.msg);
        tsr_bound_params_free(&bound);
    }
    for (size_t i = 0; i < n; i++) free(items[i].key);
    tsr_registry_free(reg);
    tsr_pool_free(pool);
    ck_assert_ptr_null(strchr(why, '\n'));
    return why;
}

START_TEST(test_bad_parameters) {
    ck_assert_str_eq(refusal("h2o", (const char *[]){"heavy=0", "recent=0", NULL}),
                     "create: cache: h2o: heavy 0, recent 0: the budget heavy + recent must be "
                     "at least 1 entry");
    ck_assert_str_eq(refusal("a2sf", (const char *[]){"heavy=0", "recent=0", NULL}),
                     "create: cache: a2sf: heavy 0, recent 0: the budget heavy + recent must be "
                     "at least 1 entry");
    ck_assert_str_eq(refusal("snapkv", (const char *[]){"budget=64", "window=64", NULL}),
                     "create: cache: snapkv: window 64, budget 64: the window must be smaller "
                     "than the budget, which holds it and the entries chosen before it");
    ck_assert_str_eq(refusal("snapkv", (const char *[]){"kernel=4", NULL}),
                     "create: cache: snapkv: kernel 4: expected an odd size, centred on each "
                     "position");
    ck_assert_str_eq(refusal("tova", (const char *[]){"budget=0", NULL}),
                     "bind: test.yaml:3:7: cache.budget: expected an integer in [1, 1048576], "
                     "got '0'");
    ck_assert_str_eq(refusal("a2sf", (const char *[]){"factor=1.5", NULL}),
                     "bind: test.yaml:3:7: cache.factor: expected a number in [0, 1], got '1.5'");
    ck_assert_str_eq(refusal("h2o", (const char *[]){"recent=-1", NULL}),
                     "bind: test.yaml:3:7: cache.recent: expected an integer in [0, 1048576], "
                     "got '-1'");
    ck_assert_str_eq(refusal("tova", (const char *[]){"scope=token", NULL}),
                     "bind: test.yaml:3:7: cache.scope: expected one of layer, head, got 'token'");
}
END_TEST

/* ---- stories260K through the library ------------------------------------------------------ */

enum { STORY_PROMPT = 6, STORY_STEPS = 58, STORY_CTX = 64 };

/* Greedy decoding of STORY_STEPS tokens after a prompt, with `attention` and the cache
 * `cache` (a flow mapping's inside): the logits of the prompt's last token and of every step
 * (malloc'd, (1 + STORY_STEPS) rows), one forward per token as a decoder runs them (so the
 * policies' hooks run); the cache stats at the end into *stats. */
static float *story_logits(const char *attention, const char *cache, tsr_cache_stats *stats) {
    char yaml[512];
    snprintf(yaml, sizeof yaml, "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\n"
                                "attention: { plugin: %s }\ncache: { %s }\n"
                                "decoder: { plugin: greedy }\n", attention, cache);
    tsr_test_pipeline r;
    char *path = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, path, yaml, STORY_CTX);
    free(path);
    const int32_t nv = r.model->hp.n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)nv * (1 + STORY_STEPS));
    tsr_batch_entry b[STORY_PROMPT];
    static const int32_t prompt[STORY_PROMPT] = {1, 403, 407, 261, 378, 411};
    for (int32_t i = 0; i < STORY_PROMPT; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = prompt[i],
                                 .want_logits = i == STORY_PROMPT - 1};
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    if (tsr_pipeline_forward(r.pl, b, STORY_PROMPT, logits, &err) < 0) ck_abort_msg("%s", err.msg);
    for (int32_t s = 0; s < STORY_STEPS; s++) {
        const float *last = logits + (size_t)s * (size_t)nv;
        int32_t best = 0;
        for (int32_t t = 1; t < nv; t++) best = last[t] > last[best] ? t : best;
        tsr_batch_entry e = {.seq_id = 0, .pos = STORY_PROMPT + s, .token = best,
                             .want_logits = 1};
        if (tsr_pipeline_forward(r.pl, &e, 1, logits + (size_t)(s + 1) * (size_t)nv, &err) < 0)
            ck_abort_msg("%s", err.msg);
    }
    tsr_pipeline_cache_stats(r.pl, stats);
    tsr_pipeline_seq_end(r.pl, 0);
    tsr_test_pipeline_close(&r);
    return logits;
}

/* Every policy with a budget of exactly the context (STORY_PROMPT + STORY_STEPS = 64 positions:
 * nothing is ever evicted) asks attention for its scores and must change no bit. */
static const char *const at_context[] = {
    "plugin: h2o, heavy: 32, recent: 32",
    "plugin: a2sf, heavy: 60, recent: 4, factor: 0.5",
    "plugin: tova, budget: 64",
    "plugin: tova, budget: 64, scope: head",
    "plugin: snapkv, budget: 64, window: 4",
    "plugin: snapkv, budget: 8, window: 4, pyramid: true, dtype: f32",
};
static const char *const score_attention[] = {"flash", "reference", "ggml"};
#define N_AT_CONTEXT (int)(sizeof at_context / sizeof at_context[0])

START_TEST(test_story_budget_at_context_is_full) {
    const char *attention = score_attention[_i / N_AT_CONTEXT];
    const char *cache = at_context[_i % N_AT_CONTEXT];
    tsr_cache_stats full_stats, st;
    float *want = story_logits(attention, "plugin: full", &full_stats);
    float *got = story_logits(attention, cache, &st);
    size_t bytes = sizeof(float) * 512 * (1 + STORY_STEPS);
    ck_assert_msg(memcmp(want, got, bytes) == 0, "%s with attention %s: logits differ from full",
                  cache, attention);
    ck_assert_int_eq(st.evicted, 0);
    ck_assert_int_eq(st.entries, full_stats.entries);
    free(want);
    free(got);
}
END_TEST

START_TEST(test_story_snapkv_prompt_below_budget_is_full) {
    /* The last case above: a prompt of 6 no longer than the budget of 8 is kept whole, and
     * so is everything generated after it. */
    tsr_cache_stats st;
    free(story_logits("flash", "plugin: snapkv, budget: 8, window: 4", &st));
    ck_assert_int_eq(st.evicted, 0);
}
END_TEST

START_TEST(test_story_budget_below_context) {
    /* stories260K has 5 layers of 4 KV heads; 64 positions were stored in each (the prompt's
     * 6, then 58 steps). Each policy holds its budget per (layer, head) at the end and counted
     * the rest evicted; snapkv cut the prompt to 4 and kept every generated token. */
    static const struct {
        const char *cache;
        int64_t per_head;
    } cases[] = {
        {"plugin: h2o, heavy: 8, recent: 8", 16},
        {"plugin: a2sf, heavy: 8, recent: 8, factor: 0.9", 16},
        {"plugin: tova, budget: 16", 16},
        {"plugin: tova, budget: 16, scope: head", 16},
        {"plugin: snapkv, budget: 4, window: 2", 4 + STORY_STEPS},
    };
    tsr_cache_stats full_stats;
    float *full = story_logits("flash", "plugin: full", &full_stats);
    ck_assert_int_eq(full_stats.entries, 5 * 4 * (STORY_PROMPT + STORY_STEPS));
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tsr_cache_stats st;
        float *got = story_logits("flash", cases[c].cache, &st);
        ck_assert_msg(st.entries == 5 * 4 * cases[c].per_head, "%s: %lld entries",
                      cases[c].cache, (long long)st.entries);
        ck_assert_int_eq(st.entries + st.evicted, full_stats.entries);
        ck_assert_msg(memcmp(full, got, sizeof(float) * 512 * (1 + STORY_STEPS)) != 0,
                      "%s: evicting changed no logit", cases[c].cache);
        free(got);
    }
    free(full);
}
END_TEST

START_TEST(test_story_per_layer_policy) {
    /* h2o on layers 1 and 2 only, full elsewhere: the two layers hold 16 entries per KV
     * head, the other three everything. */
    char yaml[512];
    snprintf(yaml, sizeof yaml, "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\n"
                                "decoder: { plugin: greedy }\n"
                                "layers:\n  - { range: [1, 2], cache: { plugin: h2o, heavy: 8, "
                                "recent: 8 } }\n");
    tsr_test_pipeline r;
    char *path = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, path, yaml, STORY_CTX);
    free(path);
    static const int32_t prompt[STORY_PROMPT] = {1, 403, 407, 261, 378, 411};
    tsr_error err;
    tsr_generate_stats made;
    ck_assert_int_ge(tsr_pipeline_generate(r.pl, prompt, STORY_PROMPT, 40, NULL, NULL, NULL,
                                           NULL, &made, &err), 0);
    ck_assert_int_eq(made.new_tokens, 40);
    tsr_cache_stats st;
    ck_assert_int_eq(tsr_pipeline_cache_stats(r.pl, &st), 2);
    ck_assert_int_eq(st.entries, 0); /* generate ended the sequence */
    /* Every position but the last emitted token's was stored: 6 + 39 = 45. */
    ck_assert_int_eq(st.evicted, 2 * 4 * (45 - 16));
    tsr_test_pipeline_close(&r);
}
END_TEST

/* `test-cache-policies` runs the policy cases; `test-cache-policies models` the stories260K
 * ones, skipped (77) without the shared data. */
int main(int argc, char **argv) {
    Suite *s = suite_create("cache-policies");
    if (argc > 1 && strcmp(argv[1], "models") == 0) {
        free(tsr_test_require_data("models/stories260K.gguf"));
        TCase *mc = tcase_create("stories260K");
        tcase_set_timeout(mc, 300);
        tcase_add_loop_test(mc, test_story_budget_at_context_is_full, 0,
                            N_AT_CONTEXT * (int)(sizeof score_attention / sizeof *score_attention));
        tcase_add_test(mc, test_story_snapkv_prompt_below_budget_is_full);
        tcase_add_test(mc, test_story_budget_below_context);
        tcase_add_test(mc, test_story_per_layer_policy);
        suite_add_tcase(s, mc);
        return tsr_test_run_suite(s);
    }
    TCase *tc = tcase_create("policies");
    tcase_add_test(tc, test_select_matches_sort);
    tcase_add_test(tc, test_h2o_heavy_and_recent);
    tcase_add_test(tc, test_a2sf_prompt_window);
    tcase_add_test(tc, test_a2sf_forgetting_factor);
    tcase_add_test(tc, test_tova_current_query);
    tcase_add_test(tc, test_ties_drop_the_lower_position);
    tcase_add_test(tc, test_snapkv_pooled_votes);
    tcase_add_test(tc, test_snapkv_short_prompt_and_window);
    tcase_add_test(tc, test_pyramid_budgets);
    tcase_add_test(tc, test_equivalent_settings);
    tcase_add_loop_test(tc, test_same_as_the_plain_rule, 0,
                        (int)(sizeof plain_cases / sizeof plain_cases[0]));
    tcase_add_test(tc, test_fork_and_truncate_after_compression);
    tcase_add_test(tc, test_store_errors);
    tcase_add_test(tc, test_bad_parameters);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
