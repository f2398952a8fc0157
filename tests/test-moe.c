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
#include <jansson.h>
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

/* A copy of the file `from` with key `key` set to `value` (-1: left out) and tensor `drop`
 * left out (NULL: none); returns its path (malloc'd). */
static char *edited(const char *from, const char *key, int64_t value, const char *drop) {
    tsr_gguf *g;
    tsr_error err;
    if (tsr_gguf_open(from, &g, &err) < 0) ck_abort_msg("%s", err.msg);
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
    char *path = edited(model_path[refused[_i].model], refused[_i].key, refused[_i].value,
                        refused[_i].drop);
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
 * and the mixing weights, and downloads the gate logits and the FFN input. */
static const char *const quantizers[] = {"{ plugin: gguf }", "{ plugin: gguf, type: q8_0 }",
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
        /* gone from the page cache too, but for the pages it shares with its neighbours: the
         * next load reads the rest from the file */
        const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
        uint64_t shared = 0;
        for (int m = 0; m < 3; m++) {
            const tsr_tensor *t = m == 0 ? &gate : m == 1 ? &up : &down;
            uint64_t lo = (uint64_t)(uintptr_t)t->data, hi = lo + bytes / 3;
            uint64_t own_lo = (lo + page - 1) / page * page, own_hi = hi / page * page;
            shared += own_hi > own_lo ? (own_lo - lo) + (hi - own_hi) : bytes / 3;
        }
        ck_assert_uint_gt(shared, 0); /* the fixture's experts do not start on pages */
        ck_assert_uint_eq(a->resident(a->ctx, 1, 3), shared);
        ck_assert_uint_eq(a->load(a->ctx, 1, 3), bytes - shared);
        a->evict(a->ctx, 1, 3);
        ck_assert_uint_eq(a->resident(a->ctx, 1, 3), shared);
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

/* ---- tessera experts ------------------------------------------------------------------------ */

static const char story[] = "Once upon a time there was a little robot who liked to count the "
                            "stars every night, and every night the stars were more.\n";

/* A text file of `story` (malloc'd path). */
static char *story_file(void) {
    char *path = tsr_test_tmp_path("story.txt");
    ck_assert_int_eq(tsr_test_write_file(path, story, strlen(story)), 0);
    return path;
}

/* `tessera experts` on `model` with `extra` arguments (NULL-terminated, at most 12) over the
 * story, in chunks of 8 tokens, the first 3; its stdout (malloc'd), failing unless it exits 0. */
static char *experts_output(int model, const char *const *extra) {
    char *text = story_file();
    const char *args[32] = {"experts", "-m", model_path[model], "-f", text, "--ctx", "8",
                            "--chunks", "3"};
    size_t n = 9;
    while (*extra) args[n++] = *extra++;
    args[n] = NULL;
    char *out = NULL, *err = NULL;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "tessera experts: %d: %s", status, err);
    free(err);
    unlink(text);
    free(text);
    return out;
}

/* Each layer's counts of the JSON `experts` wrote, (n_layer, n_expert), and count times mean
 * weight in weight_sum (n_layer, n_expert) when it is not NULL; checks its shape. */
static int64_t *json_counts(const char *text, int32_t n_layer, int32_t n_expert, int k,
                            double *weight_sum) {
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    ck_assert_msg(root != NULL, "%s: %s", jerr.text, text);
    json_int_t ne = 0, used = 0, ctx = 0, chunks = 0;
    json_t *layers = NULL;
    const char *model = NULL, *text_path = NULL;
    ck_assert_int_eq(json_unpack(root, "{s:s, s:s, s:I, s:I, s:I, s:I, s:o}", "model", &model,
                                 "text", &text_path, "ctx", &ctx, "chunks", &chunks,
                                 "n_expert", &ne, "n_expert_used", &used, "layers", &layers), 0);
    ck_assert_int_eq(ne, n_expert);
    ck_assert_int_eq(used, k);
    ck_assert_int_eq(ctx, 8);
    ck_assert_int_eq(chunks, 3);
    ck_assert_uint_eq(json_array_size(layers), (size_t)n_layer);
    int64_t *counts = calloc((size_t)n_layer * (size_t)n_expert, sizeof *counts);
    for (int32_t l = 0; l < n_layer; l++) {
        json_int_t layer = -1, tokens = 0;
        json_t *experts = NULL;
        ck_assert_int_eq(json_unpack(json_array_get(layers, (size_t)l), "{s:I, s:I, s:o}",
                                     "layer", &layer, "tokens", &tokens, "experts", &experts), 0);
        ck_assert_int_eq(layer, l);
        ck_assert_int_eq(tokens, 3 * 8);
        ck_assert_uint_eq(json_array_size(experts), (size_t)n_expert);
        int64_t sum = 0;
        for (int32_t e = 0; e < n_expert; e++) {
            json_int_t id = -1, count = -1;
            double frequency = -1, mean = -1;
            ck_assert_int_eq(json_unpack(json_array_get(experts, (size_t)e), "{s:I, s:I, s:F, s:F}",
                                         "expert", &id, "count", &count, "frequency", &frequency,
                                         "mean_weight", &mean), 0);
            ck_assert_int_eq(id, e);
            ck_assert(frequency == (double)count / (double)tokens);
            counts[l * n_expert + e] = count;
            sum += count;
            if (weight_sum) weight_sum[l * n_expert + e] = (double)count * mean;
        }
        ck_assert_int_eq(sum, tokens * k); /* every token fills its k slots */
    }
    json_decref(root);
    return counts;
}

/* The counts are what the routers chose: the probe's trace, counted by hand, and the default
 * router's the same (the probe routes as topk); Mixtral's weights of a token sum to 1, so each
 * layer's weights do to its tokens. */
START_TEST(experts_counts_what_the_routers_chose) {
    char *trace = tsr_test_tmp_path("trace.bin"), set_trace[512];
    snprintf(set_trace, sizeof set_trace, "router.trace=%s", trace);
    const char *probe[] = {"--json", "--plugin-dir", probe_dir, "--set", "router.plugin=probe",
                           "--set", "router.mode=topk", "--set", set_trace, NULL};
    char *json = experts_output(TINY_MOE, probe);
    double weights[8];
    int64_t *counts = json_counts(json, 2, 4, 2, weights);
    size_t size;
    char *bytes = tsr_test_read_file(trace, &size);
    ck_assert_ptr_nonnull(bytes);
    int64_t by_hand[8] = {0};
    double weights_by_hand[8] = {0};
    const char *p = bytes, *end = bytes + size;
    record rec;
    while (next_record(&p, end, &rec))
        for (int32_t t = 0; t < rec.n_tok; t++) {
            const float *gate = rec.gate + t * 4;
            const int32_t *chosen = rec.experts + t * 2;
            /* softmax, then renormalised over the two: p0 / (p0 + p1) */
            double first = 1 / (1 + exp((double)gate[chosen[1]] - (double)gate[chosen[0]]));
            by_hand[rec.layer * 4 + chosen[0]]++;
            by_hand[rec.layer * 4 + chosen[1]]++;
            weights_by_hand[rec.layer * 4 + chosen[0]] += first;
            weights_by_hand[rec.layer * 4 + chosen[1]] += 1 - first;
        }
    ck_assert_mem_eq(counts, by_hand, sizeof by_hand);
    for (int i = 0; i < 8; i++)
        ck_assert_msg(fabs(weights[i] - weights_by_hand[i]) <= 1e-5 * (1 + weights_by_hand[i]),
                      "layer %d expert %d: weights sum to %.9g, by hand %.9g", i / 4, i % 4,
                      weights[i], weights_by_hand[i]);
    const char *plain[] = {"--json", NULL};
    char *json_topk = experts_output(TINY_MOE, plain);
    int64_t *counts_topk = json_counts(json_topk, 2, 4, 2, NULL);
    ck_assert_mem_eq(counts_topk, by_hand, sizeof by_hand);
    free(counts);
    free(counts_topk);
    free(json);
    free(json_topk);
    free(bytes);
    unlink(trace);
    free(trace);
}
END_TEST

/* The table: comment lines, then one line per layer and expert with the JSON's numbers. */
START_TEST(experts_table_matches_the_json) {
    const char *json_args[] = {"--json", NULL}, *none[] = {NULL};
    char *json = experts_output(TINY_QWEN2MOE, json_args);
    char *table = experts_output(TINY_QWEN2MOE, none);
    double weights[8];
    int64_t *counts = json_counts(json, 2, 4, 2, weights);
    char *line = table, *next;
    int rows = 0;
    for (; line && *line; line = next) {
        next = strchr(line, '\n');
        ck_assert_ptr_nonnull(next);
        *next++ = '\0';
        if (line[0] == '#') {
            ck_assert_int_eq(rows, 0);
            continue;
        }
        int layer, e, used;
        long long count;
        double frequency, mean;
        ck_assert_int_eq(sscanf(line, "%d %d %lld %lf %lf%n", &layer, &e, &count, &frequency,
                                &mean, &used), 5);
        ck_assert_int_eq(line[used], '\0');
        ck_assert_int_eq(layer, rows / 4);
        ck_assert_int_eq(e, rows % 4);
        ck_assert_int_eq(count, counts[rows]);
        ck_assert(fabs(frequency - (double)count / 24.0) <= 5e-7);
        ck_assert(fabs(mean - (count ? weights[rows] / (double)count : 0)) <= 5e-7);
        rows++;
    }
    ck_assert_int_eq(rows, 8);
    free(counts);
    free(json);
    free(table);
}
END_TEST

static const struct {
    int model;
    const char *args[4];
    int status;
    const char *error; /* "%s": the model's path */
} bad_experts[] = {
    {TINY_DENSE, {"-f", "TEXT", NULL}, 1,
     "tessera: %s: the model has no mixture-of-experts layers: there is no routing to record\n"},
    {TINY_MOE, {NULL}, 2, "tessera: experts: -f TEXT is required (see tessera experts --help)\n"},
    {TINY_MOE, {"-f", "TEXT", "--ctx", "0"}, 2,
     "tessera: experts: --ctx: expected an integer in [1, 1048576], got '0'\n"},
    {TINY_MOE, {"-f", "/nonexistent/text", NULL}, 1,
     "tessera: /nonexistent/text: cannot open: No such file or directory\n"},
};

START_TEST(experts_bad_inputs) {
    char *text = story_file(), want[1024];
    const char *args[8] = {"experts", "-m", model_path[bad_experts[_i].model]};
    for (int i = 0; i < 4 && bad_experts[_i].args[i]; i++)
        args[3 + i] = strcmp(bad_experts[_i].args[i], "TEXT") ? bad_experts[_i].args[i] : text;
    char *out = NULL, *err = NULL;
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), bad_experts[_i].status);
    snprintf(want, sizeof want, bad_experts[_i].error, model_path[bad_experts[_i].model]);
    ck_assert_str_eq(err, want);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
    unlink(text);
    free(text);
}
END_TEST

/* ---- experts held apart, quantize --expert-types ----------------------------------------- */

static const char *const exps[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};

/* Writes a copy of `base` (path) whose layers' expert stacks are held apart, one tensor per
 * expert: expert e of layer l from the stack of `hot` (a file of the same model) when
 * hot_at(l, e), else of `base`. Returns its path (malloc'd). */
static char *experts_apart(const char *base, const char *hot, bool (*hot_at)(int32_t, int32_t)) {
    tsr_gguf *g, *h = NULL;
    tsr_error err;
    if (tsr_gguf_open(base, &g, &err) < 0) ck_abort_msg("%s", err.msg);
    if (hot && tsr_gguf_open(hot, &h, &err) < 0) ck_abort_msg("%s", err.msg);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    for (int64_t i = 0; i < tsr_gguf_n_keys(g); i++) tsr_gguf_writer_copy_key(w, g, i);
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        int layer = -1, used = 0, m = -1;
        if (sscanf(t->name, "blk.%d.%n", &layer, &used) == 1)
            for (int k = 0; k < 3; k++)
                if (!strncmp(t->name + used, exps[k], strlen(exps[k]))) m = k;
        if (m < 0) {
            tsr_gguf_writer_add_tensor(w, t->name, t->dtype, t->n_dims, t->ne, t->data);
            continue;
        }
        for (int32_t e = 0; e < t->ne[2]; e++) {
            const tsr_gguf_tensor *src = hot && hot_at(layer, e) ? tsr_gguf_find_tensor(h, t->name)
                                                                 : t;
            size_t bytes = src->size / (size_t)src->ne[2];
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s.%d.weight", layer, exps[m], (int)e);
            ck_assert_int_eq(tsr_gguf_writer_add_tensor(w, name, src->dtype, 2, src->ne,
                                                        (const char *)src->data + e * bytes), 0);
        }
    }
    char *path = tsr_test_tmp_path("apart.gguf");
    ck_assert_int_eq(tsr_gguf_writer_write(w, path, &err), 0);
    tsr_gguf_writer_free(w);
    tsr_gguf_close(g);
    tsr_gguf_close(h);
    return path;
}

static float *file_logits(const char *path) {
    run r;
    tsr_error err;
    char yaml[512];
    if (tsr_test_pipeline_open(&r, path, yaml_of(yaml, sizeof yaml, "cpu", "{ plugin: gguf }", ""),
                               NULL, 64, &err) < 0)
        ck_abort_msg("%s: %s", path, err.msg);
    float *logits = prompt_logits(&r);
    tsr_test_pipeline_close(&r);
    return logits;
}

/* A file holding its experts apart, one tensor each, runs as the stacked one, bit for bit. */
START_TEST(experts_apart_load_as_stacked) {
    int model = _i ? TINY_MOE_Q8 : TINY_QWEN2MOE;
    char *apart = experts_apart(model_path[model], NULL, NULL);
    float *want = file_logits(model_path[model]), *got = file_logits(apart);
    expect_same(want, got, (size_t)N_TOK * 320, "experts apart");
    free(want);
    free(got);
    unlink(apart);
    free(apart);
}
END_TEST

/* A file holding its experts apart must hold every one of them. */
START_TEST(experts_apart_all_or_refused) {
    char *apart = experts_apart(model_path[TINY_MOE], NULL, NULL);
    char *path = edited(apart, "llama.expert_count", 4, "blk.1.ffn_up_exps.2.weight");
    tsr_model *m = NULL;
    tsr_error err;
    ck_assert_int_lt(tsr_model_load(path, &m, &err), 0);
    ck_assert_ptr_null(m);
    char want[4300];
    snprintf(want, sizeof want, "%s: tensor 'blk.1.ffn_up_exps.2.weight' is missing", path);
    ck_assert_str_eq(err.msg, want);
    unlink(path);
    free(path);
    unlink(apart);
    free(apart);
}
END_TEST

/* quantize IN OUT TYPE ...; returns its status, stderr in *err (malloc'd) when not NULL. */
static int quantize(const char *in, const char *out, const char *type, const char *const *extra,
                    char **err) {
    const char *args[16] = {"quantize", in, out, type};
    size_t n = 4;
    while (extra && *extra) args[n++] = *extra++;
    args[n] = NULL;
    char *e = NULL;
    int status = tsr_test_tessera(NULL, &e, args);
    if (err) *err = e;
    else free(e);
    return status;
}

static bool listed_hot(int32_t layer, int32_t e) {
    return (layer == 0 && e == 1) || (layer == 1 && (e == 3 || e == 0));
}

/* A profile's listed experts at q8_0, the others at TYPE q4_0: the file equals one built expert
 * by expert from the q8_0 and q4_0 files, tensor for tensor, and runs to the same logits. */
START_TEST(expert_types_from_a_list) {
    char *dir = tsr_test_tmpdir(), q8[512], q4[512], mixed[512], list[512];
    snprintf(q8, sizeof q8, "%s/q8.gguf", dir);
    snprintf(q4, sizeof q4, "%s/q4.gguf", dir);
    snprintf(mixed, sizeof mixed, "%s/mixed.gguf", dir);
    snprintf(list, sizeof list, "%s/types.txt", dir);
    static const char types[] = "# hot experts\n0 1 q8_0\n\n1 3 q8_0   # the busiest\n1 0 q8_0\n";
    ck_assert_int_eq(tsr_test_write_file(list, types, strlen(types)), 0);
    ck_assert_int_eq(quantize(model_path[TINY_MOE], q8, "q8_0", NULL, NULL), 0);
    ck_assert_int_eq(quantize(model_path[TINY_MOE], q4, "q4_0", NULL, NULL), 0);
    const char *opt[] = {"--expert-types", list, NULL};
    ck_assert_int_eq(quantize(model_path[TINY_MOE], mixed, "q4_0", opt, NULL), 0);
    char *reference = experts_apart(q4, q8, listed_hot);
    tsr_gguf *want, *got;
    tsr_error err;
    ck_assert_int_eq(tsr_gguf_open(reference, &want, &err), 0);
    ck_assert_int_eq(tsr_gguf_open(mixed, &got, &err), 0);
    ck_assert_int_eq(tsr_gguf_n_tensors(got), tsr_gguf_n_tensors(want));
    for (int64_t i = 0; i < tsr_gguf_n_tensors(want); i++) {
        const tsr_gguf_tensor *w = tsr_gguf_tensor_at(want, i);
        const tsr_gguf_tensor *g = tsr_gguf_find_tensor(got, w->name);
        ck_assert_msg(g != NULL, "%s is missing", w->name);
        ck_assert_int_eq(g->dtype, w->dtype);
        ck_assert_int_eq(g->n_dims, w->n_dims);
        ck_assert_mem_eq(g->ne, w->ne, sizeof g->ne);
        ck_assert_msg(g->size == w->size && !memcmp(g->data, w->data, w->size), "%s differs",
                      w->name);
    }
    tsr_gguf_close(want);
    tsr_gguf_close(got);
    float *ref = file_logits(reference), *mix = file_logits(mixed), *low = file_logits(q4);
    expect_same(ref, mix, (size_t)N_TOK * 320, "mixed against the reference");
    ck_assert_msg(memcmp(mix, low, (size_t)N_TOK * 320 * sizeof *mix) != 0,
                  "the q8_0 experts changed nothing");
    free(ref);
    free(mix);
    free(low);
    unlink(reference);
    free(reference);
    unlink(q8);
    unlink(q4);
    unlink(mixed);
    unlink(list);
    rmdir(dir);
    free(dir);
}
END_TEST

/* A file whose experts are apart already: each gets its listed type, the others TYPE, and
 * they stay apart. */
START_TEST(expert_types_of_experts_apart) {
    char *apart = experts_apart(model_path[TINY_MOE], NULL, NULL);
    char *dir = tsr_test_tmpdir(), list[512], out[512];
    snprintf(list, sizeof list, "%s/types.txt", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    static const char types[] = "0 1 q8_0\n";
    ck_assert_int_eq(tsr_test_write_file(list, types, strlen(types)), 0);
    const char *opt[] = {"--expert-types", list, NULL};
    ck_assert_int_eq(quantize(apart, out, "q4_0", opt, NULL), 0);
    tsr_gguf *g;
    tsr_error err;
    ck_assert_int_eq(tsr_gguf_open(out, &g, &err), 0);
    for (int32_t l = 0; l < 2; l++)
        for (int32_t e = 0; e < 4; e++)
            for (int m = 0; m < 3; m++) {
                char name[96];
                snprintf(name, sizeof name, "blk.%d.%s.%d.weight", (int)l, exps[m], (int)e);
                const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, name);
                ck_assert_msg(t != NULL, "%s is missing", name);
                ck_assert_int_eq(t->dtype, l == 0 && e == 1 ? TSR_DTYPE_Q8_0 : TSR_DTYPE_Q4_0);
            }
    tsr_gguf_close(g);
    unlink(out);
    unlink(list);
    rmdir(dir);
    free(dir);
    unlink(apart);
    free(apart);
}
END_TEST

/* From `tessera experts --json`: per layer the round(0.5 * 4) = 2 most chosen experts (ties by
 * number) get --expert-hot, the others --expert-cold. */
START_TEST(expert_types_from_a_profile) {
    const char *json_args[] = {"--json", NULL};
    char *json = experts_output(TINY_MOE, json_args);
    int64_t *counts = json_counts(json, 2, 4, 2, NULL);
    char *dir = tsr_test_tmpdir(), profile[512], out[512];
    snprintf(profile, sizeof profile, "%s/profile.json", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    ck_assert_int_eq(tsr_test_write_file(profile, json, strlen(json)), 0);
    const char *opt[] = {"--expert-types", profile, "--expert-hot", "q8_0", "--expert-cold",
                         "q4_1", "--hot-fraction", "0.5", NULL};
    ck_assert_int_eq(quantize(model_path[TINY_MOE], out, "q4_0", opt, NULL), 0);
    tsr_gguf *g;
    tsr_error err;
    ck_assert_int_eq(tsr_gguf_open(out, &g, &err), 0);
    for (int32_t l = 0; l < 2; l++)
        for (int32_t e = 0; e < 4; e++) {
            int above = 0; /* experts ranked before e */
            for (int32_t x = 0; x < 4; x++)
                above += counts[l * 4 + x] > counts[l * 4 + e] ||
                         (counts[l * 4 + x] == counts[l * 4 + e] && x < e);
            for (int m = 0; m < 3; m++) {
                char name[96];
                snprintf(name, sizeof name, "blk.%d.%s.%d.weight", (int)l, exps[m], (int)e);
                const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, name);
                ck_assert_msg(t != NULL, "%s is missing", name);
                ck_assert_int_eq(t->dtype, above < 2 ? TSR_DTYPE_Q8_0 : TSR_DTYPE_Q4_1);
            }
        }
    ck_assert_int_eq(tsr_gguf_find_tensor(g, "blk.0.attn_q.weight")->dtype, TSR_DTYPE_Q4_0);
    tsr_gguf_close(g);
    unlink(out);
    unlink(profile);
    rmdir(dir);
    free(dir);
    free(counts);
    free(json);
}
END_TEST

/* Equal counts rank by expert number; a layer the profile leaves out keeps its stacks at TYPE
 * (and so does one whose experts all get one type). */
START_TEST(expert_types_ties_by_number) {
    static const char profile_text[] =
        "{\"n_expert\": 4, \"layers\": [{\"layer\": 0, \"experts\": [{\"expert\": 0, "
        "\"count\": 7}, {\"expert\": 1, \"count\": 3}, {\"expert\": 2, \"count\": 7}, "
        "{\"expert\": 3, \"count\": 7}]}]}";
    char *dir = tsr_test_tmpdir(), profile[512], out[512];
    snprintf(profile, sizeof profile, "%s/profile.json", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    ck_assert_int_eq(tsr_test_write_file(profile, profile_text, strlen(profile_text)), 0);
    const char *opt[] = {"--expert-types", profile, "--expert-hot", "q8_0", "--hot-fraction",
                         "0.5", NULL};
    ck_assert_int_eq(quantize(model_path[TINY_MOE], out, "q4_0", opt, NULL), 0);
    tsr_gguf *g;
    tsr_error err;
    ck_assert_int_eq(tsr_gguf_open(out, &g, &err), 0);
    static const int32_t want[4] = {TSR_DTYPE_Q8_0, TSR_DTYPE_Q4_0, TSR_DTYPE_Q8_0,
                                    TSR_DTYPE_Q4_0};
    for (int32_t e = 0; e < 4; e++) {
        char name[96];
        snprintf(name, sizeof name, "blk.0.ffn_down_exps.%d.weight", (int)e);
        ck_assert_int_eq(tsr_gguf_find_tensor(g, name)->dtype, want[e]);
    }
    ck_assert_ptr_null(tsr_gguf_find_tensor(g, "blk.0.ffn_down_exps.weight"));
    ck_assert_int_eq(tsr_gguf_find_tensor(g, "blk.1.ffn_down_exps.weight")->dtype, TSR_DTYPE_Q4_0);
    ck_assert_ptr_null(tsr_gguf_find_tensor(g, "blk.1.ffn_down_exps.0.weight"));
    tsr_gguf_close(g);
    unlink(out);
    unlink(profile);
    rmdir(dir);
    free(dir);
}
END_TEST

static const struct {
    const char *text, *hot, *error; /* after "tessera: <file>" */
} bad_profiles[] = {
    {"# two fields\n0 1\n", NULL, ":2: expected 'LAYER EXPERT TYPE', got '0 1'\n"},
    {"0 x q8_0\n", NULL, ":1: expected 'LAYER EXPERT TYPE', got '0 x q8_0'\n"},
    {"0 1 q8_0 more\n", NULL, ":1: expected 'LAYER EXPERT TYPE', got '0 1 q8_0 more'\n"},
    {"2 0 q8_0\n", NULL, ":1: layer 2: expected 0 to 1 (the model's layers)\n"},
    {"0 4 q8_0\n", NULL, ":1: expert 4: expected 0 to 3 (the model's experts per layer)\n"},
    {"0 -1 q8_0\n", NULL, ":1: expert -1: expected 0 to 3 (the model's experts per layer)\n"},
    {"0 1 q8_0\n0 1 q4_0\n", NULL,
     ":2: layer 0 expert 1 is given a type twice (first on line 1)\n"},
    {"1 1 q9_9\n", NULL, ":1: type 'q9_9': quantizer 'gguf' expects one of keep, f32, f16, bf16, "
                         "q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_s, q4_k_m, q5_k_s, "
                         "q5_k_m, q6_k, iq4_nl, iq4_xs\n"},
    {"0 1 q8_0\n", "q8_0", ": --expert-hot and --expert-cold choose types from a JSON profile of "
                           "tessera experts; this file lists each expert's type itself\n"},
    {"{\"n_expert\": 4, \"layers\": []}", NULL, ": a profile of tessera experts: give "
     "--expert-hot TYPE (and --expert-cold TYPE, --hot-fraction F) to choose the experts' types "
     "from it\n"},
    {"{\"n_expert\": 8, \"layers\": []}", "q8_0", ": a profile of 8 experts per layer; the model "
                                                  "has 4\n"},
    {"{\"n_expert\": 4}", "q8_0", ": expected the JSON of tessera experts (\"n_expert\" and "
                                  "\"layers\")\n"},
    {"{\"n_expert\": 4, \"layers\": [{\"layer\": 0, \"experts\": [1, 2, 3, 4]}]}", "q8_0",
     ": layers[0]: expected {\"layer\": 0 to 1, \"experts\": [{\"expert\": 0, \"count\": N}, ... "
     "up to expert 3]}\n"},
    {"{\"n_expert\": 4,", "q8_0", ":1: not JSON: string or '}' expected near end of file\n"},
};

/* Each bad profile: one line naming the file (and line), exit 1, no OUT left behind. */
START_TEST(bad_profiles_are_refused) {
    char *dir = tsr_test_tmpdir(), profile[512], out[512], want[1024];
    snprintf(profile, sizeof profile, "%s/profile", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    ck_assert_int_eq(tsr_test_write_file(profile, bad_profiles[_i].text,
                                         strlen(bad_profiles[_i].text)), 0);
    const char *opt[] = {"--expert-types", profile, bad_profiles[_i].hot ? "--expert-hot" : NULL,
                         bad_profiles[_i].hot, NULL};
    char *err;
    ck_assert_int_eq(quantize(model_path[TINY_MOE], out, "q4_0", opt, &err), 1);
    snprintf(want, sizeof want, "tessera: %s%s", profile, bad_profiles[_i].error);
    ck_assert_str_eq(err, want);
    ck_assert_int_eq(tsr_test_count_entries(dir), 1);
    free(err);
    unlink(profile);
    rmdir(dir);
    free(dir);
}
END_TEST

int main(void) {
    char *dir = tsr_test_tmpdir();
    static const char *const shapes[N_MODELS] = {"tiny-moe", "tiny-moe", "tiny-qwen2moe", "tiny"};
    static const char *const types[N_MODELS] = {"f32", "q8_0", "f32", "f32"};
    for (int m = 0; m < N_MODELS; m++) {
        model_path[m] = malloc(strlen(dir) + 32);
        sprintf(model_path[m], "%s/model%d.gguf", dir, m);
        if (tsr_test_synth(shapes[m], types[m], model_path[m]) != 0) return 1;
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
    tc = tcase_create("statistics");
    tcase_add_test(tc, experts_counts_what_the_routers_chose);
    tcase_add_test(tc, experts_table_matches_the_json);
    tcase_add_loop_test(tc, experts_bad_inputs, 0,
                        (int)(sizeof bad_experts / sizeof bad_experts[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("expert_types");
    tcase_add_loop_test(tc, experts_apart_load_as_stacked, 0, 2);
    tcase_add_test(tc, experts_apart_all_or_refused);
    tcase_add_test(tc, expert_types_from_a_list);
    tcase_add_test(tc, expert_types_from_a_profile);
    tcase_add_test(tc, expert_types_ties_by_number);
    tcase_add_test(tc, expert_types_of_experts_apart);
    tcase_add_loop_test(tc, bad_profiles_are_refused, 0,
                        (int)(sizeof bad_profiles / sizeof bad_profiles[0]));
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
