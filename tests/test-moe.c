/* Mixture-of-experts models on synthetic models of their own (`tessera synth`, no shared data):
 * files with broken expert keys or tensors refused in one line; a batch grouped by expert gives the logits of token-by-token decode bit for bit, reading each
 * chosen expert once per layer (decode: exactly k of them); backends with memory of their own,
 * any quantizer (each expert offered alone) and any thread count give the same bits; the
 * default router runs for models with experts only, and applies the model's rule (softmax or
 * sigmoid, renormalised or not); the router's host side, through the
 * 'probe' test router: the gate logits, the next layer's and the previous choices it is given,
 * the substitutes it hands back multiplied, its broken outputs refused by name, experts it
 * lets go and loads (or has prefetched) changing no logit; and the host's hold on the experts'
 * memory (bytes, residency, load, evict, prefetch, matrices). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "base/clock.h"
#include "files/gguf_write.h"
#include "pipeline/pipeline_impl.h"
#include "pipeline_fixture.h"
#include "testutil.h"

typedef tsr_test_pipeline run;

/* statfs's f_type of tmpfs, whose pages cannot leave memory. */
#define TMPFS_MAGIC_NUMBER 0x01021994

/* The synthetic models, made once by main(). */
enum { TINY_MOE, TINY_MOE_Q8, TINY_QWEN2MOE, TINY_DENSE, N_MODELS };
static char *model_path[N_MODELS];
static const char *const model_name[N_MODELS] = {"tiny-moe f32", "tiny-moe q8_0",
                                                 "tiny-qwen2moe f32", "tiny (dense)"};

static const char *const probe_dir = TSR_TEST_PLUGIN_DIR "/router-probe";

/* A pipeline of `backend`, `quantizer` and the router section `router` ("" for none). */
static const char *yaml_of(char *buf, size_t size, const char *backend, const char *quantizer,
                           const char *router) {
    snprintf(buf, size,
             "tessera: 1\nbackend: { plugin: %s, threads: 2 }\nquantizer: %s\n"
             "attention: { plugin: reference }\ncache: { plugin: full }\n"
             "decoder: { plugin: greedy }\n%s",
             backend, quantizer, router);
    return buf;
}

static void open_ok(run *r, int model, const char *yaml) {
    tsr_error err;
    if (tsr_test_pipeline_open(r, model_path[model], yaml, probe_dir, 64, &err) < 0)
        ck_abort_msg("%s: %s", model_name[model], err.msg);
}

enum { N_TOK = 12 };

static void prompt(int32_t *tokens) {
    for (int i = 0; i < N_TOK; i++) tokens[i] = (int32_t)((i * 37 + 11) % 320);
}

static float *prompt_logits(run *r) {
    int32_t tokens[N_TOK];
    prompt(tokens);
    return tsr_test_pipeline_logits(r, tokens, N_TOK);
}

static void expect_same(const float *want, const float *got, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0)
            ck_abort_msg("%s: logit %zu: %.9g, expected %.9g", what, i, (double)got[i],
                         (double)want[i]);
}

/* ---- refused files ---------------------------------------------------------------------- */

/* A copy of `model` with key `key` set to `value` (-1: left out) and tensor `drop` left out
 * (NULL: none); returns its path (malloc'd). */
static char *edited(int model, const char *key, int64_t value, const char *drop) {
    tsr_gguf *g;
    tsr_error err;
    if (tsr_gguf_open(model_path[model], &g, &err) < 0) ck_abort_msg("%s", err.msg);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    for (int64_t i = 0; i < tsr_gguf_n_keys(g); i++)
        if (strcmp(tsr_gguf_key_name(g, i), key) != 0) tsr_gguf_writer_copy_key(w, g, i);
    if (value >= 0) tsr_gguf_writer_set_uint(w, key, TSR_GGUF_UINT32, (uint64_t)value);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        if (!drop || strcmp(t->name, drop) != 0)
            tsr_gguf_writer_add_tensor(w, t->name, t->dtype, t->n_dims, t->ne, t->data);
    }
    char *path = tsr_test_tmp_path("edited.gguf");
    ck_assert_int_eq(tsr_gguf_writer_write(w, path, &err), 0);
    tsr_gguf_writer_free(w);
    tsr_gguf_close(g);
    return path;
}

static const struct {
    int model;
    const char *key;
    int64_t value;
    const char *drop, *error; /* after "<path>: " */
} refused[] = {
    {TINY_MOE, "llama.expert_used_count", 5, NULL,
     "llama.expert_used_count: 5 is more than llama.expert_count 4"},
    {TINY_MOE, "llama.expert_used_count", -1, NULL, "key 'llama.expert_used_count' is missing"},
    {TINY_MOE, "llama.expert_used_count", 0, NULL,
     "llama.expert_used_count: expected at least 1, got 0"},
    {TINY_QWEN2MOE, "qwen2moe.expert_count", -1, NULL, "key 'qwen2moe.expert_count' is missing"},
    {TINY_MOE, "llama.expert_count", 4, "blk.1.ffn_up_exps.weight",
     "tensor 'blk.1.ffn_up_exps.weight' is missing"},
    {TINY_QWEN2MOE, "qwen2moe.expert_count", 4, "blk.0.ffn_gate_inp_shexp.weight",
     "tensor 'blk.0.ffn_gate_inp_shexp.weight' is missing"},
    {TINY_MOE, "llama.expert_count", 3, NULL,
     "tensor 'blk.0.ffn_gate_inp.weight' has shape [64, 4, 1], expected [64, 3, 1]"},
};

START_TEST(bad_expert_files_are_refused) {
    char *path = edited(refused[_i].model, refused[_i].key, refused[_i].value, refused[_i].drop);
    tsr_model *m = NULL;
    tsr_error err;
    ck_assert_int_lt(tsr_model_load(path, &m, &err), 0);
    ck_assert_ptr_null(m);
    char want[4300];
    snprintf(want, sizeof want, "%s: %s", path, refused[_i].error);
    ck_assert_str_eq(err.msg, want);
    unlink(path);
    free(path);
}
END_TEST

/* ---- grouping ----------------------------------------------------------------------------- */

/* The prompt in one batch against the same tokens one forward each: the same bits. The batch
 * reads each expert at most once per layer; each decode step exactly k per layer. */
START_TEST(grouped_prefill_equals_decode) {
    static const int models[] = {TINY_MOE, TINY_MOE_Q8, TINY_QWEN2MOE};
    int model = models[_i];
    char yaml[512];
    run r;
    open_ok(&r, model, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }", ""));
    const tsr_hparams *hp = &r.model->hp;
    const int32_t nv = hp->n_vocab;
    uint64_t before = tsr_pipeline_times(r.pl)->expert_bytes;
    float *batch = prompt_logits(&r);
    uint64_t batch_bytes = tsr_pipeline_times(r.pl)->expert_bytes - before;
    uint64_t one = tsr_moe_expert_bytes(&r.pl->weights, 0, 0);
    ck_assert_uint_gt(batch_bytes, 0);
    ck_assert_uint_le(batch_bytes, (uint64_t)hp->n_layer * (uint64_t)hp->n_expert * one);

    int32_t tokens[N_TOK];
    prompt(tokens);
    float *step = malloc((size_t)nv * sizeof *step);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    for (int i = 0; i < N_TOK; i++) {
        tsr_batch_entry b = {.seq_id = 0, .pos = i, .token = tokens[i], .want_logits = 1};
        before = tsr_pipeline_times(r.pl)->expert_bytes;
        if (tsr_pipeline_forward(r.pl, &b, 1, step, &err) < 0) ck_abort_msg("%s", err.msg);
        ck_assert_uint_eq(tsr_pipeline_times(r.pl)->expert_bytes - before,
                          (uint64_t)hp->n_layer * (uint64_t)hp->n_expert_used * one);
        char what[96];
        snprintf(what, sizeof what, "%s, position %d", model_name[model], i);
        expect_same(batch + (size_t)i * (size_t)nv, step, (size_t)nv, what);
    }
    tsr_pipeline_seq_end(r.pl, 0);
    free(step);
    free(batch);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* ---- backends, quantizers, threads ---------------------------------------------------------- */

/* cpu-arena refuses any pointer outside its buffers, so equal bits prove the host uploads the
 * routers, the experts (in place, converted, or left to a quantizer that multiplies its own
 * format: rtn takes 2-D matrices only, so it proves each expert offered alone), the row lists
 * and the mixing weights, and downloads the gate logits and the FFN input. The converted
 * experts keep llama.cpp's order (gguf's fast order repacks them on cpu alone). */
static const char *const quantizers[] = {"{ plugin: gguf }",
                                         "{ plugin: gguf, type: q8_0, order: ggml }",
                                         "{ plugin: rtn, bits: 4 }"};

START_TEST(arena_backend_equals_cpu) {
    int model = _i / 3 ? TINY_QWEN2MOE : TINY_MOE;
    const char *quantizer = quantizers[_i % 3];
    char yaml[512];
    run cpu, arena;
    open_ok(&cpu, model, yaml_of(yaml, sizeof yaml, "cpu", quantizer, ""));
    open_ok(&arena, model, yaml_of(yaml, sizeof yaml, "cpu-arena", quantizer, ""));
    float *want = prompt_logits(&cpu), *got = prompt_logits(&arena);
    char what[160];
    snprintf(what, sizeof what, "%s, %s", model_name[model], quantizer);
    expect_same(want, got, (size_t)N_TOK * (size_t)cpu.model->hp.n_vocab, what);
    free(want);
    free(got);
    tsr_test_pipeline_close(&cpu);
    tsr_test_pipeline_close(&arena);
}
END_TEST

START_TEST(thread_count_does_not_change_logits) {
    char one[512], three[512];
    snprintf(one, sizeof one, "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\n"
                              "decoder: { plugin: greedy }\n");
    snprintf(three, sizeof three, "tessera: 1\nbackend: { plugin: cpu, threads: 3 }\n"
                                  "decoder: { plugin: greedy }\n");
    run a, b;
    open_ok(&a, TINY_MOE_Q8, one);
    open_ok(&b, TINY_MOE_Q8, three);
    float *la = prompt_logits(&a), *lb = prompt_logits(&b);
    expect_same(la, lb, (size_t)N_TOK * (size_t)a.model->hp.n_vocab, "1 vs 3 threads");
    free(la);
    free(lb);
    tsr_test_pipeline_close(&a);
    tsr_test_pipeline_close(&b);
}
END_TEST

/* ---- the default router --------------------------------------------------------------------- */

START_TEST(default_router_runs_for_experts_only) {
    const char *yaml = "tessera: 1\ndecoder: { plugin: greedy }\n";
    run dense, moe;
    open_ok(&dense, TINY_DENSE, yaml);
    ck_assert(dense.cfg->stage[TSR_STAGE_ROUTER].by_default);
    ck_assert_ptr_null(dense.pl->stage_main[TSR_STAGE_ROUTER]);
    for (int32_t l = 0; l < dense.model->hp.n_layer; l++) ck_assert_ptr_null(dense.pl->router_at[l]);
    tsr_test_pipeline_close(&dense);
    open_ok(&moe, TINY_MOE, yaml);
    for (int32_t l = 0; l < moe.model->hp.n_layer; l++)
        ck_assert_str_eq(moe.pl->router_at[l]->ref->desc->name, "topk");
    tsr_test_pipeline_close(&moe);
    /* named, on a dense model, it is refused */
    run named;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&named, model_path[TINY_DENSE],
                                            "tessera: 1\nrouter: { plugin: topk }\n", NULL, 64,
                                            &err),
                     TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "test.yaml:2:19: router: 'topk' is configured but the model has no "
                              "mixture-of-experts layers to route; remove the router");
    tsr_test_pipeline_close(&named);
}
END_TEST

/* ---- topk -------------------------------------------------------------------------------- */

typedef struct topk_case {
    int32_t gating, normalize, k;
    float logits[4];
    int32_t experts[3];
} topk_case;

/* 4 experts: softmax with and without renormalising, the sigmoid, k = 1 and k = 3, and equal
 * logits, which keep the experts' order. */
static const topk_case topk_cases[] = {
    {TSR_GATING_SOFTMAX, 1, 2, {0.1f, 2.0f, -1.0f, 1.0f}, {1, 3}},
    {TSR_GATING_SOFTMAX, 0, 2, {0.1f, 2.0f, -1.0f, 1.0f}, {1, 3}},
    {TSR_GATING_SIGMOID, 0, 3, {-3.0f, 0.5f, 4.0f, 0.25f}, {2, 1, 3}},
    {TSR_GATING_SIGMOID, 1, 1, {-3.0f, 0.5f, 4.0f, 0.25f}, {2}},
    {TSR_GATING_SOFTMAX, 1, 3, {0.5f, 0.5f, 0.5f, 0.5f}, {0, 1, 2}},
};

/* The model's rule: the k most probable experts, most probable first, their probabilities
 * (softmax over all experts, or each logit's sigmoid) as weights, renormalised to sum 1 when
 * the model is. */
START_TEST(topk_applies_the_model_rule) {
    const topk_case *c = &topk_cases[_i];
    tsr_error err;
    tsr_registry *reg = tsr_registry_create(NULL);
    ck_assert_int_ge(tsr_registry_scan_dir(reg, tsr_test_env("TESSERA_PLUGIN_DIR"), &err), 1);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_ROUTER, "topk");
    ck_assert_ptr_nonnull(ref);
    tsr_router_init init = {.struct_size = sizeof init, .n_layer = 1, .n_expert = 4,
                            .n_expert_used = c->k, .n_embd = 8, .gating = c->gating,
                            .normalize = c->normalize, .n_ff_expert = 8};
    tsr_params none = {sizeof none, 0, NULL, NULL};
    tsr_instance *inst;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &none, &init, &inst, &err), TSR_OK);
    const tsr_router_vtable *vt = inst->vtable;
    float hidden[8] = {0}, weights[3];
    int32_t experts[3];
    const tsr_tensor *sub[9] = {NULL};
    tsr_route_call call = {.struct_size = sizeof call, .n_tok = 1, .gate_logits = c->logits,
                           .hidden = hidden, .k = c->k, .experts = experts, .weights = weights,
                           .next_layer = -1, .substitute = sub};
    ck_assert_int_eq(vt->route(inst->self, &call), TSR_OK);
    double p[4], sum = 0, chosen = 0;
    for (int e = 0; e < 4; e++) {
        p[e] = c->gating == TSR_GATING_SOFTMAX ? exp((double)c->logits[e])
                                               : 1 / (1 + exp(-(double)c->logits[e]));
        sum += p[e];
    }
    for (int s = 0; s < c->k; s++) chosen += p[c->experts[s]];
    for (int s = 0; s < c->k; s++) {
        ck_assert_int_eq(experts[s], c->experts[s]);
        double want = p[c->experts[s]] / (c->normalize ? chosen
                                          : c->gating == TSR_GATING_SOFTMAX ? sum : 1);
        ck_assert_msg(fabs(weights[s] - want) <= 4e-7 * want, "slot %d: %.9g, expected %.9g",
                      s, (double)weights[s], want);
    }
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);
    tsr_registry_free(reg);
}
END_TEST

/* ---- the router's host side ----------------------------------------------------------------- */

/* One record of the probe's trace. */
typedef struct record {
    int32_t layer, next_layer, n_tok, n_expert, n_embd, k, has_prev;
    int32_t gating, normalize, n_ff_expert, has_experts; /* the router's init */
    int32_t loaded_kib;                                  /* what its loads read */
    const float *hidden, *gate, *next;
    const int32_t *prev, *experts;
} record;

/* Parses the record at *p; false at the end of the trace. */
static bool next_record(const char **p, const char *end, record *r) {
    if (*p >= end) return false;
    int32_t head[12];
    memcpy(head, *p, sizeof head);
    *p += sizeof head;
    *r = (record){.layer = head[0], .next_layer = head[1], .n_tok = head[2],
                  .n_expert = head[3], .n_embd = head[4], .k = head[5], .has_prev = head[6],
                  .gating = head[7], .normalize = head[8], .n_ff_expert = head[9],
                  .has_experts = head[10], .loaded_kib = head[11]};
    size_t n = (size_t)r->n_tok;
    r->hidden = (const float *)*p;
    *p += n * (size_t)r->n_embd * sizeof(float);
    r->gate = (const float *)*p;
    *p += n * (size_t)r->n_expert * sizeof(float);
    if (r->next_layer >= 0) {
        r->next = (const float *)*p;
        *p += n * (size_t)r->n_expert * sizeof(float);
    }
    if (r->has_prev) {
        r->prev = (const int32_t *)*p;
        *p += n * (size_t)r->k * sizeof(int32_t);
    }
    r->experts = (const int32_t *)*p;
    *p += n * (size_t)r->k * sizeof(int32_t);
    ck_assert_msg(*p <= end, "the trace ends inside a record");
    return true;
}

/* logits (n_tok, n_expert) against W_inp of `layer` times the hidden rows, in double. */
static void expect_gate(const run *r, int32_t layer, const record *rec, const float *logits) {
    const tsr_tensor *w = &r->model->layers[layer].gate_inp;
    const float *wd = w->data;
    for (int32_t t = 0; t < rec->n_tok; t++)
        for (int32_t x = 0; x < rec->n_expert; x++) {
            double dot = 0, mag = 0;
            for (int32_t i = 0; i < rec->n_embd; i++) {
                double p = (double)wd[x * rec->n_embd + i] * rec->hidden[t * rec->n_embd + i];
                dot += p;
                mag += fabs(p);
            }
            double got = logits[t * rec->n_expert + x];
            ck_assert_msg(fabs(got - dot) <= 4 * 1.2e-7 * mag + 1e-12,
                          "layer %d token %d expert %d: %.9g, W.hidden %.9g", layer, t, x, got,
                          dot);
        }
}

/* Runs the prompt twice through the probe in `mode` with `needs` on `model` and returns its
 * trace (malloc'd); the second run's logits in *logits (malloc'd) when it is not NULL. */
static char *probe_trace(int model, const char *mode, int needs, size_t *size, float **logits) {
    char *trace = tsr_test_tmp_path("trace.bin"), router[512], yaml[1024];
    snprintf(router, sizeof router, "router: { plugin: probe, mode: %s, needs: %d, trace: %s }\n",
             mode, needs, trace);
    run r;
    open_ok(&r, model, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }", router));
    free(prompt_logits(&r));
    float *second = prompt_logits(&r);
    if (logits) *logits = second;
    else free(second);
    tsr_test_pipeline_close(&r);
    char *bytes = tsr_test_read_file(trace, size);
    ck_assert_ptr_nonnull(bytes);
    unlink(trace);
    free(trace);
    return bytes;
}

/* Each layer's call: the gate logits are its router's product with the hidden rows given; the
 * next layer's, when asked, that layer's product with the same rows, and none at the last
 * layer or unasked; the previous choices are the previous layer's of the same forward, none
 * at a forward's first layer. The router's init holds the model's rule (tiny-moe is
 * Mixtral-style: renormalised; tiny-qwen2moe is not), its experts' size and their access. */
START_TEST(router_gets_what_the_host_computed) {
    int model = _i / 2 ? TINY_QWEN2MOE : TINY_MOE, needs = _i % 2;
    size_t size;
    char *bytes = probe_trace(model, "topk", needs, &size, NULL);
    const char *p = bytes, *end = bytes + size;
    run r; /* the model's weights, to recompute the products */
    open_ok(&r, model, "tessera: 1\n");
    record rec, prev = {0};
    int32_t n = 0;
    while (next_record(&p, end, &rec)) {
        ck_assert_int_eq(rec.gating, TSR_GATING_SOFTMAX);
        ck_assert_int_eq(rec.normalize, model == TINY_MOE);
        ck_assert_int_eq(rec.n_ff_expert, 32);
        ck_assert_int_eq(rec.has_experts, 1);
        ck_assert_int_eq(rec.layer, n % r.model->hp.n_layer);
        ck_assert_int_eq(rec.n_tok, N_TOK);
        ck_assert_int_eq(rec.k, r.model->hp.n_expert_used);
        expect_gate(&r, rec.layer, &rec, rec.gate);
        bool last = rec.layer == r.model->hp.n_layer - 1;
        ck_assert_int_eq(rec.next_layer, needs && !last ? rec.layer + 1 : -1);
        if (rec.next_layer >= 0) expect_gate(&r, rec.next_layer, &rec, rec.next);
        ck_assert_int_eq(rec.has_prev, rec.layer > 0);
        if (rec.has_prev)
            ck_assert_mem_eq(rec.prev, prev.experts, (size_t)N_TOK * (size_t)rec.k * 4);
        prev = rec;
        n++;
    }
    ck_assert_int_eq(n, 2 * r.model->hp.n_layer);
    tsr_test_pipeline_close(&r);
    free(bytes);
}
END_TEST

/* A forward that leaves a layer out (a self-draft's skip_layers) gives the layers before it
 * the gate logits of the next layer it runs: here none, the last one being skipped. */
START_TEST(skipped_layers_give_no_next_gate) {
    char *trace = tsr_test_tmp_path("trace.bin"), router[512], yaml[1024];
    snprintf(router, sizeof router, "router: { plugin: probe, mode: topk, needs: 1, trace: %s }\n",
             trace);
    run r;
    open_ok(&r, TINY_MOE, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }", router));
    const bool skip[2] = {false, true};
    r.pl->graph.skip_layer = skip;
    free(prompt_logits(&r));
    tsr_test_pipeline_close(&r);
    size_t size;
    char *bytes = tsr_test_read_file(trace, &size);
    const char *p = bytes, *end = bytes + size;
    record rec;
    ck_assert(next_record(&p, end, &rec));
    ck_assert_int_eq(rec.layer, 0);
    ck_assert_int_eq(rec.next_layer, -1);
    ck_assert(!next_record(&p, end, &rec)); /* layer 1 never ran */
    free(bytes);
    unlink(trace);
    free(trace);
}
END_TEST

/* A `layers:` entry gives its layers a router of their own, asked its needs on its own. */
START_TEST(routers_vary_per_layer) {
    char yaml[512];
    run r;
    open_ok(&r, TINY_MOE, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }",
                                  "layers:\n  - { range: [1, 1], router: { plugin: probe, "
                                  "mode: topk, needs: 1 } }\n"));
    ck_assert_str_eq(r.pl->router_at[0]->ref->desc->name, "topk");
    ck_assert_str_eq(r.pl->router_at[1]->ref->desc->name, "probe");
    ck_assert_int_eq(r.pl->router_needs[0], 0);
    ck_assert_int_eq(r.pl->router_needs[1], TSR_ROUTER_NEEDS_NEXT_GATE);
    free(prompt_logits(&r));
    tsr_test_pipeline_close(&r);
}
END_TEST

/* A router that lets experts go and loads them back (or has the host read the next layer's
 * ahead, on its own thread, while the forward goes on) changes no logit; each load reads what
 * the call let go just before it. */
START_TEST(experts_moved_in_and_out_change_nothing) {
    size_t size;
    float *plain, *moved;
    free(probe_trace(TINY_MOE, "topk", 0, &size, &plain));
    char *bytes = probe_trace(TINY_MOE, _i ? "prefetch" : "offload", 0, &size, &moved);
    expect_same(plain, moved, (size_t)N_TOK * 320, _i ? "prefetch" : "offload");
    const char *p = bytes, *end = bytes + size;
    record rec;
    int32_t n = 0, loaded = 0;
    struct statfs fs;
    bool page_cache = statfs(model_path[TINY_MOE], &fs) == 0 && fs.f_type != TMPFS_MAGIC_NUMBER;
    while (next_record(&p, end, &rec)) {
        n++;
        loaded += rec.loaded_kib > 0;
    }
    ck_assert_int_eq(n, 4);
    if (!_i && page_cache) ck_assert_int_eq(loaded, 4);
    free(plain);
    free(moved);
    free(bytes);
}
END_TEST

/* 'swap' keeps each token's first expert but hands back copies of another expert's matrices;
 * 'moved' routes to that other expert: the host must multiply with the copies, so the bits
 * agree, on both backends, and differ from plain top-k. */
START_TEST(substitutes_are_multiplied) {
    int model = _i / 2 ? TINY_QWEN2MOE : TINY_MOE;
    const char *backend = _i % 2 ? "cpu-arena" : "cpu";
    char yaml[512];
    float *logits[3];
    static const char *const modes[3] = {"swap", "moved", "topk"};
    size_t n = 0;
    for (int m = 0; m < 3; m++) {
        char router[128];
        snprintf(router, sizeof router, "router: { plugin: probe, mode: %s }\n", modes[m]);
        run r;
        open_ok(&r, model, yaml_of(yaml, sizeof yaml, backend, "{ plugin: gguf }", router));
        logits[m] = prompt_logits(&r);
        n = (size_t)N_TOK * (size_t)r.model->hp.n_vocab;
        tsr_test_pipeline_close(&r);
    }
    expect_same(logits[1], logits[0], n, "substitutes against the expert they copy");
    ck_assert_msg(memcmp(logits[0], logits[2], n * sizeof(float)) != 0,
                  "the substitutes changed nothing");
    for (int m = 0; m < 3; m++) free(logits[m]);
}
END_TEST

static const struct {
    const char *mode, *error;
} bad_routes[] = {
    {"outside", "router 'probe': layer 0, token 0, slot 0: expert 4 is outside [-1, 4)"},
    {"twice", "router 'probe': layer 0, token 0, slot 1: expert "},
    {"nan", "router 'probe': layer 0, token 0, slot 1: the weight of expert "},
    {"partial", "router 'probe': layer 0, token 0, slot 0: 2 substitute matrices for its "
                "expert; expected all three (gate, up, down) of a chosen expert or none"},
    {"misshaped", "router 'probe': layer 0, token 0, slot 0: the substitute up matrix (ne {64, "
                  "31}) is not shaped as the expert's matrix (ne {64, 32})"},
};

START_TEST(broken_routes_are_refused) {
    char router[128], yaml[512];
    snprintf(router, sizeof router, "router: { plugin: probe, mode: %s }\n", bad_routes[_i].mode);
    run r;
    open_ok(&r, TINY_MOE, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }", router));
    tsr_batch_entry b = {.seq_id = 0, .pos = 0, .token = 7, .want_logits = 1};
    float *logits = malloc((size_t)r.model->hp.n_vocab * sizeof *logits);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    ck_assert_int_eq(tsr_pipeline_forward(r.pl, &b, 1, logits, &err), TSR_E_INVALID);
    ck_assert_msg(strncmp(err.msg, bad_routes[_i].error, strlen(bad_routes[_i].error)) == 0,
                  "%s", err.msg);
    if (!strcmp(bad_routes[_i].mode, "twice"))
        ck_assert_ptr_nonnull(strstr(err.msg, " is chosen twice (slots 0 and 1)"));
    if (!strcmp(bad_routes[_i].mode, "nan")) ck_assert_ptr_nonnull(strstr(err.msg, " is nan"));
    free(logits);
    tsr_test_pipeline_close(&r);
}
END_TEST

START_TEST(unknown_needs_are_refused) {
    char yaml[512];
    run r;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&r, model_path[TINY_MOE],
                                            yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }",
                                                    "router: { plugin: probe, needs: 5 }\n"),
                                            probe_dir, 64, &err),
                     TSR_E_UNSUPPORTED);
    ck_assert_str_eq(err.msg, "router 'probe' needs 0x5, which this host does not know (it "
                              "provides TSR_ROUTER_NEEDS_NEXT_GATE, 0x1)");
    tsr_test_pipeline_close(&r);
}
END_TEST

/* ---- the experts' memory -------------------------------------------------------------------- */

/* Waits up to 10 s for the expert to be in memory. */
static uint64_t resident_soon(const tsr_expert_access *a, int32_t l, int32_t e, uint64_t want) {
    uint64_t got = 0;
    for (int i = 0; i < 1000 && (got = a->resident(a->ctx, l, e)) != want; i++)
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    return got;
}

/* On the cpu backend the F32 experts are the file's own bytes: what they report, load and
 * evict is the mapping's pages. */
START_TEST(expert_access_pages) {
    run r;
    open_ok(&r, TINY_MOE, "tessera: 1\ndecoder: { plugin: greedy }\n");
    const tsr_expert_access *a = tsr_experts_access(r.pl->experts);
    const tsr_hparams *hp = &r.model->hp;
    const uint64_t bytes = 3 * (uint64_t)hp->n_embd * (uint64_t)hp->n_ff_expert * sizeof(float);
    ck_assert_uint_eq(a->bytes(a->ctx, 1, 3), bytes);
    ck_assert_uint_eq(a->bytes(a->ctx, 2, 0), 0); /* no layer 2 */
    ck_assert_uint_eq(a->bytes(a->ctx, 0, 4), 0); /* no expert 4 */
    /* its matrices are the stacks' slices, in place */
    tsr_tensor gate, up, down;
    ck_assert_int_eq(a->matrices(a->ctx, 1, 3, &gate, &up, &down), TSR_OK);
    const tsr_layer_weights *lw = &r.model->layers[1];
    size_t slice = (size_t)hp->n_embd * (size_t)hp->n_ff_expert * sizeof(float);
    ck_assert_ptr_eq(gate.data, (char *)lw->gate_exps.data + 3 * slice);
    ck_assert_ptr_eq(up.data, (char *)lw->up_exps.data + 3 * slice);
    ck_assert_ptr_eq(down.data, (char *)lw->down_exps.data + 3 * slice);
    ck_assert(gate.ne[0] == hp->n_embd && gate.ne[1] == hp->n_ff_expert && gate.ne[2] == 1);
    ck_assert(down.ne[0] == hp->n_ff_expert && down.ne[1] == hp->n_embd && down.ne[2] == 1);
    ck_assert_int_eq(a->matrices(a->ctx, 1, 4, &gate, &up, &down), TSR_E_RANGE);

    struct statfs fs;
    bool page_cache = statfs(model_path[TINY_MOE], &fs) == 0 && fs.f_type != TMPFS_MAGIC_NUMBER;
    /* a load reads what was not in memory, and leaves all of it there */
    uint64_t before = a->resident(a->ctx, 1, 3);
    ck_assert_uint_le(before, bytes);
    ck_assert_uint_eq(a->load(a->ctx, 1, 3), bytes - before);
    ck_assert_uint_eq(a->resident(a->ctx, 1, 3), bytes);
    ck_assert_uint_eq(a->load(a->ctx, 1, 3), 0);
    a->evict(a->ctx, 1, 3);
    if (page_cache) {
        /* gone from the page cache too: the next load reads it all from the file */
        ck_assert_uint_eq(a->resident(a->ctx, 1, 3), 0);
        ck_assert_uint_eq(a->load(a->ctx, 1, 3), bytes);
        a->evict(a->ctx, 1, 3);
        ck_assert_uint_eq(a->resident(a->ctx, 1, 3), 0);
    }
    a->prefetch(a->ctx, 1, 3);
    a->prefetch(a->ctx, 1, 3); /* asked twice, read once */
    ck_assert_uint_eq(resident_soon(a, 1, 3, bytes), bytes);
    /* the model still runs after its experts went and came back */
    for (int32_t e = 0; e < hp->n_expert; e++) a->evict(a->ctx, 0, e);
    free(prompt_logits(&r));
    tsr_test_pipeline_close(&r);
}
END_TEST

/* Weights not read from the mapping (converted at load, or uploaded to a backend's own
 * memory) count as in memory: load reads nothing, evict keeps them. */
START_TEST(expert_access_elsewhere) {
    static const char *const yamls[] = {
        "tessera: 1\nquantizer: { plugin: gguf, type: q8_0 }\n",
        "tessera: 1\nbackend: { plugin: cpu-arena }\n"};
    run r;
    open_ok(&r, TINY_MOE, yamls[_i]);
    const tsr_expert_access *a = tsr_experts_access(r.pl->experts);
    uint64_t bytes = a->bytes(a->ctx, 0, 1);
    ck_assert_uint_eq(bytes, tsr_moe_expert_bytes(&r.pl->weights, 0, 1));
    a->evict(a->ctx, 0, 1);
    ck_assert_uint_eq(a->resident(a->ctx, 0, 1), bytes);
    ck_assert_uint_eq(a->load(a->ctx, 0, 1), 0);
    a->prefetch(a->ctx, 0, 1);
    tsr_test_pipeline_close(&r);
}
END_TEST

int main(void) {
    char *dir = tsr_test_tmpdir();
    static const char *const shapes[N_MODELS] = {"tiny-moe", "tiny-moe", "tiny-qwen2moe", "tiny"};
    static const char *const types[N_MODELS] = {"f32", "q8_0", "f32", "f32"};
    for (int m = 0; m < N_MODELS; m++) {
        model_path[m] = malloc(strlen(dir) + 32);
        sprintf(model_path[m], "%s/model%d.gguf", dir, m);
        char *err = NULL;
        const char *args[] = {"synth", "--shape", shapes[m], "--type", types[m], "-o",
                              model_path[m], NULL};
        if (tsr_test_tessera(NULL, &err, args) != 0) {
            fprintf(stderr, "tessera synth --shape %s failed: %s\n", shapes[m], err ? err : "");
            return 1;
        }
        free(err);
    }
    Suite *s = suite_create("moe");
    TCase *tc = tcase_create("files");
    tcase_add_loop_test(tc, bad_expert_files_are_refused, 0,
                        (int)(sizeof refused / sizeof refused[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("grouping");
    tcase_add_loop_test(tc, grouped_prefill_equals_decode, 0, 3);
    tcase_add_loop_test(tc, arena_backend_equals_cpu, 0, 6);
    tcase_add_test(tc, thread_count_does_not_change_logits);
    tcase_add_test(tc, default_router_runs_for_experts_only);
    suite_add_tcase(s, tc);
    tc = tcase_create("router");
    tcase_add_loop_test(tc, topk_applies_the_model_rule, 0,
                        (int)(sizeof topk_cases / sizeof topk_cases[0]));
    tcase_add_loop_test(tc, router_gets_what_the_host_computed, 0, 4);
    tcase_add_test(tc, routers_vary_per_layer);
    tcase_add_test(tc, skipped_layers_give_no_next_gate);
    tcase_add_loop_test(tc, experts_moved_in_and_out_change_nothing, 0, 2);
    tcase_add_loop_test(tc, substitutes_are_multiplied, 0, 4);
    tcase_add_loop_test(tc, broken_routes_are_refused, 0,
                        (int)(sizeof bad_routes / sizeof bad_routes[0]));
    tcase_add_test(tc, unknown_needs_are_refused);
    suite_add_tcase(s, tc);
    tc = tcase_create("experts");
    tcase_add_test(tc, expert_access_pages);
    tcase_add_loop_test(tc, expert_access_elsewhere, 0, 2);
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
