/* The host's pipeline on a synthetic model of its own (`tessera synth --shape tiny`, no shared
 * data): weights and buffers kept in the backend's memory (the cpu-arena backend, which checks
 * every pointer an op receives, gives the cpu backend's logits bit for bit), the sequence rules
 * of a forward (positions continue each sequence), fork and truncate through the decode API,
 * a batch of several sequences equal to each sequence run alone, one output per sequence
 * (emit_seq), a self-draft's layer mask, and a model that turns NaN stopped at its layer. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files/gguf.h"
#include "pipeline_fixture.h"
#include "config/params.h"
#include "plugin/stage_init.h"
#include "testutil.h"

/* The synthetic model, made once by main(). */
static char *tiny_path;

typedef tsr_test_pipeline run;

static void run_open_ok(run *r, const char *yaml, int32_t n_ctx) {
    tsr_test_pipeline_open_ok(r, tiny_path, yaml, n_ctx);
}

/* A pipeline on `backend` with the quantizer section `quantizer`. */
static const char *pipeline_yaml(char *buf, size_t size, const char *backend,
                                 const char *quantizer) {
    snprintf(buf, size,
             "tessera: 1\nbackend: { plugin: %s, threads: 2 }\nquantizer: %s\n"
             "attention: { plugin: flash }\ncache: { plugin: full }\ndecoder: { plugin: greedy }\n",
             backend, quantizer);
    return buf;
}

static const char *const default_yaml =
    "tessera: 1\nbackend: { plugin: cpu, threads: 1 }\nattention: { plugin: flash }\n"
    "cache: { plugin: full }\ndecoder: { plugin: greedy }\n";

enum { N_TOK = 12 };

/* The logits of every position of the test prompt (N_TOK x n_vocab, malloc'd). */
static float *prompt_logits(run *r) {
    int32_t tokens[N_TOK];
    for (int i = 0; i < N_TOK; i++) tokens[i] = (int32_t)((i * 37 + 11) % 320);
    return tsr_test_pipeline_logits(r, tokens, N_TOK);
}

/* ---- device memory ------------------------------------------------------------------------ */

/* The same quantizer settings on cpu and on cpu-arena: the arena backend refuses any pointer
 * the host did not place in its memory, so a run that completes proves the host uploads
 * weights (in place or converted), norms, biases, ids and positions, and downloads the logits;
 * equal bits prove it uploads the right bytes. */
static const char *const arena_quantizers[] = {
    "{ plugin: gguf }",                 /* the file's F32 rows, in place on cpu */
    /* converted at load, multiplied by the backend (the default order, fast, would repack it
     * on cpu alone: the arena backend keeps llama.cpp's order) */
    "{ plugin: gguf, type: q8_0, order: ggml }",
    "{ plugin: rtn, bits: 4 }",         /* a format the quantizer multiplies itself */
};

START_TEST(arena_backend_equals_cpu) {
    char yaml[512];
    run cpu, arena;
    run_open_ok(&cpu, pipeline_yaml(yaml, sizeof yaml, "cpu", arena_quantizers[_i]), 64);
    run_open_ok(&arena, pipeline_yaml(yaml, sizeof yaml, "cpu-arena", arena_quantizers[_i]), 64);
    float *want = prompt_logits(&cpu), *got = prompt_logits(&arena);
    size_t n = (size_t)N_TOK * (size_t)cpu.model->hp.n_vocab;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0)
            ck_abort_msg("%s: logit %zu: %.9g on cpu-arena, %.9g on cpu", arena_quantizers[_i], i,
                         (double)got[i], (double)want[i]);
    free(want);
    free(got);
    tsr_test_pipeline_close(&cpu);
    tsr_test_pipeline_close(&arena);
}
END_TEST

/* The arena backend is a real check: host memory handed to an op is refused by name. */
START_TEST(arena_backend_refuses_host_memory) {
    tsr_error err;
    tsr_registry *reg = tsr_registry_create(NULL);
    ck_assert_int_ge(tsr_registry_scan_dir(reg, tsr_test_env("TESSERA_PLUGIN_DIR"), &err), 1);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_BACKEND, "cpu-arena");
    ck_assert_ptr_nonnull(ref);
    tsr_params params = {.struct_size = sizeof params};
    tsr_model_shape shape = tsr_model_shape_synthetic();
    tsr_stage_init init;
    tsr_instance *inst;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &params,
                                         tsr_stage_init_fill(TSR_STAGE_BACKEND, &shape, &init),
                                         &inst, &err), TSR_OK);
    const tsr_backend_vtable *be = inst->vtable;
    float host_x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, host_w[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    void *x, *w;
    ck_assert_int_eq(be->buffer_alloc(inst->self, sizeof host_x, &x), TSR_OK);
    ck_assert_int_eq(be->buffer_alloc(inst->self, sizeof host_w, &w), TSR_OK);
    ck_assert_int_eq(be->upload(inst->self, x, host_x, sizeof host_x), TSR_OK);
    ck_assert_int_eq(be->rms_norm(inst->self, x, x, host_w, 1, 8, 1e-5f), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(tsr_services_take_error(&inst->services, ""),
                                 "rms_norm: the norm weight"));
    /* one float past the end of a buffer is outside it too */
    ck_assert_int_eq(be->rms_norm(inst->self, x, (float *)x + 1, w, 1, 8, 1e-5f), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(tsr_services_take_error(&inst->services, ""), "rms_norm: x"));
    ck_assert_int_eq(be->upload(inst->self, w, host_w, sizeof host_w), TSR_OK);
    ck_assert_int_eq(be->rms_norm(inst->self, x, x, w, 1, 8, 1e-5f), TSR_OK);
    float back[8];
    ck_assert_int_eq(be->download(inst->self, back, x, sizeof back), TSR_OK);
    ck_assert_float_eq_tol(back[7], 8.0f / sqrtf(204.0f / 8.0f + 1e-5f), 1e-6f);
    ck_assert_int_eq(be->download(inst->self, back, host_x, sizeof back), TSR_E_INVALID);
    be->buffer_free(inst->self, x);
    be->buffer_free(inst->self, w);
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);
    tsr_registry_free(reg);
}
END_TEST

/* Plugins that compute on the CPU refuse a backend whose buffers are device memory, in create
 * and by name (CONTRACT.md MEM_1). */
static const struct {
    int32_t stage;
    const char *plugin, *why;
} cpu_only[] = {
    {TSR_STAGE_QUANTIZER, "rtn", "backend 'gpu' computes in device memory: the rtn products run "
                                 "on the CPU"},
    {TSR_STAGE_ATTENTION, "flash", "backend 'gpu' computes in device memory: this plugin reads "
                                   "host memory only"},
    {TSR_STAGE_CACHE, "full", "backend 'gpu' computes in device memory: this policy reads and "
                              "keeps K/V in host memory"},
};

START_TEST(cpu_plugins_refuse_device_memory) {
    tsr_error err;
    tsr_registry *reg = tsr_registry_create(NULL);
    ck_assert_int_ge(tsr_registry_scan_dir(reg, tsr_test_env("TESSERA_PLUGIN_DIR"), &err), 1);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, cpu_only[_i].stage, cpu_only[_i].plugin);
    ck_assert_ptr_nonnull(ref);
    tsr_bound_params bound;
    ck_assert_int_eq(tsr_params_bind(ref->desc->params, ref->desc->n_params, ref->desc->name,
                                     "test", (tsr_src_loc){"test", 0, 0}, NULL, 0, &bound, &err),
                     TSR_OK);
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.backend_name = "gpu";
    shape.memory_space = TSR_MEMORY_DEVICE;
    tsr_stage_init init;
    tsr_instance *inst = NULL;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &bound.params,
                                         tsr_stage_init_fill(cpu_only[_i].stage, &shape, &init),
                                         &inst, &err), TSR_E_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(err.msg, cpu_only[_i].why));
    shape.memory_space = TSR_MEMORY_HOST;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &bound.params,
                                         tsr_stage_init_fill(cpu_only[_i].stage, &shape, &init),
                                         &inst, &err), TSR_OK);
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);
    tsr_bound_params_free(&bound);
    tsr_registry_free(reg);
}
END_TEST

/* ---- sequences ------------------------------------------------------------------------------ */

/* Runs one forward of `n` entries of sequence 0 at `pos`; returns its status, message in err. */
static tsr_status forward_at(run *r, const int32_t *pos, int n, tsr_error *err) {
    tsr_batch_entry b[8];
    for (int i = 0; i < n; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = pos[i], .token = 5, .want_logits = 0};
    return tsr_pipeline_forward(r->pl, b, n, NULL, err);
}

START_TEST(positions_continue_each_sequence) {
    run r;
    run_open_ok(&r, default_yaml, 64);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    ck_assert_int_eq(forward_at(&r, (int32_t[]){1}, 1, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "forward: sequence 0 holds 0 positions: its entry 0 must be at "
                              "position 0, not 1");
    ck_assert_int_eq(forward_at(&r, (int32_t[]){0, 1, 3}, 3, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "forward: sequence 0 holds 0 positions: its entry 2 must be at "
                              "position 2, not 3");
    ck_assert_int_eq(forward_at(&r, (int32_t[]){0, 1, 1}, 3, &err), TSR_E_INVALID);
    ck_assert_int_eq(forward_at(&r, (int32_t[]){0, 1, 2, 3}, 4, &err), TSR_OK);
    ck_assert_int_eq(forward_at(&r, (int32_t[]){3}, 1, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "forward: sequence 0 holds 4 positions: its entry 0 must be at "
                              "position 4, not 3");
    ck_assert_int_eq(forward_at(&r, (int32_t[]){4, 5}, 2, &err), TSR_OK);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* A two-sequence batch against each sequence alone, and truncation through the decode API:
 * sequence 1 forks the prompt and takes token A at the prompt's end while sequence 0 takes B;
 * then sequence 0 is cut back to the prompt and takes A, and must give sequence 1's logits. */
START_TEST(fork_truncate_and_batches) {
    const int n_prompt = 6;
    const int32_t tok_a = 7, tok_b = 300;
    run r;
    run_open_ok(&r, default_yaml, 64);
    int32_t nv = r.model->hp.n_vocab;
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
    const tsr_decode_api *api = &req.api;
    tsr_batch_entry b[8];
    for (int i = 0; i < n_prompt; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = 3 + i, .want_logits = 0};
    ck_assert_int_eq(api->forward(api->ctx, b, n_prompt, NULL), TSR_OK);
    ck_assert_int_eq(api->seq_fork(api->ctx, 0, 1), TSR_OK);
    ck_assert_int_eq(api->seq_fork(api->ctx, 0, 1), TSR_E_STATE); /* 1 is alive */
    b[0] = (tsr_batch_entry){.seq_id = 1, .pos = n_prompt, .token = tok_a, .want_logits = 1};
    b[1] = (tsr_batch_entry){.seq_id = 0, .pos = n_prompt, .token = tok_b, .want_logits = 1};
    float *batched = malloc(2 * (size_t)nv * sizeof *batched);
    float *again = malloc((size_t)nv * sizeof *again);
    ck_assert_int_eq(api->forward(api->ctx, b, 2, batched), TSR_OK);
    ck_assert_int_eq(api->seq_truncate(api->ctx, 0, n_prompt), TSR_OK);
    b[0] = (tsr_batch_entry){.seq_id = 0, .pos = n_prompt, .token = tok_a, .want_logits = 1};
    ck_assert_int_eq(api->forward(api->ctx, b, 1, again), TSR_OK);
    ck_assert_mem_eq(again, batched, (size_t)nv * sizeof *again);
    ck_assert_int_eq(api->seq_truncate(api->ctx, 0, -1), TSR_E_RANGE);
    ck_assert_int_eq(api->seq_truncate(api->ctx, 5, 0), TSR_E_STATE);
    ck_assert_str_eq(req.host_err.msg, "seq_truncate: sequence 5 does not exist");
    tsr_request_end(&req);

    /* each sequence alone, from a fresh pipeline state */
    for (int s = 0; s < 2; s++) {
        ck_assert_int_eq(tsr_request_begin(&req, r.pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
        for (int i = 0; i < n_prompt; i++)
            b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = 3 + i, .want_logits = 0};
        b[n_prompt] = (tsr_batch_entry){.seq_id = 0, .pos = n_prompt,
                                        .token = s == 0 ? tok_a : tok_b, .want_logits = 1};
        ck_assert_int_eq(api->forward(api->ctx, b, n_prompt + 1, again), TSR_OK);
        if (memcmp(again, batched + (size_t)s * (size_t)nv, (size_t)nv * sizeof *again) != 0)
            ck_abort_msg("sequence %d of the batch differs from the same sequence alone", s);
        tsr_request_end(&req);
    }
    free(batched);
    free(again);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* What `parallel` asks of the host: sequences forked after one prompt, each taking its own
 * token every step, one batch a step, some ending before the others; every sequence's logits
 * must be those it gives decoded alone. */
START_TEST(forked_batches_equal_each_alone) {
    enum { N_SEQ = 4, STEPS = 6, PROMPT = 5, ENDS_AT = 3 };
    run r;
    run_open_ok(&r, default_yaml, 64);
    const size_t nv = (size_t)r.model->hp.n_vocab;
    int32_t tokens[N_SEQ][STEPS];
    for (int s = 0; s < N_SEQ; s++)
        for (int t = 0; t < STEPS; t++) tokens[s][t] = (int32_t)((s * 53 + t * 17 + 5) % 320);
    float *batched = malloc((size_t)STEPS * N_SEQ * nv * sizeof *batched);
    float *alone = malloc(nv * sizeof *alone);
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
    const tsr_decode_api *api = &req.api;
    tsr_batch_entry b[PROMPT > N_SEQ ? PROMPT : N_SEQ];
    for (int i = 0; i < PROMPT; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = 3 + i, .want_logits = 0};
    ck_assert_int_eq(api->forward(api->ctx, b, PROMPT, NULL), TSR_OK);
    for (int s = 1; s < N_SEQ; s++) ck_assert_int_eq(api->seq_fork(api->ctx, 0, s), TSR_OK);
    for (int t = 0; t < STEPS; t++) {
        /* sequence 1 ends after ENDS_AT steps: later batches leave it out */
        if (t == ENDS_AT) ck_assert_int_eq(api->seq_end(api->ctx, 1), TSR_OK);
        int n = 0;
        for (int s = 0; s < N_SEQ; s++)
            if (s != 1 || t < ENDS_AT)
                b[n++] = (tsr_batch_entry){.seq_id = s, .pos = PROMPT + t, .token = tokens[s][t],
                                           .want_logits = 1};
        float *out = batched + (size_t)t * N_SEQ * nv;
        ck_assert_int_eq(api->forward(api->ctx, b, n, out), TSR_OK);
        /* rows in batch order: move sequences after 1 to their own slot once it has ended */
        if (t >= ENDS_AT)
            for (int s = N_SEQ - 1; s >= 2; s--)
                memmove(out + (size_t)s * nv, out + (size_t)(s - 1) * nv, nv * sizeof *out);
    }
    tsr_request_end(&req);
    for (int s = 0; s < N_SEQ; s++) {
        ck_assert_int_eq(tsr_request_begin(&req, r.pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
        for (int i = 0; i < PROMPT; i++)
            b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = 3 + i, .want_logits = 0};
        ck_assert_int_eq(api->forward(api->ctx, b, PROMPT, NULL), TSR_OK);
        for (int t = 0; t < (s == 1 ? ENDS_AT : STEPS); t++) {
            b[0] = (tsr_batch_entry){.seq_id = 0, .pos = PROMPT + t, .token = tokens[s][t],
                                     .want_logits = 1};
            ck_assert_int_eq(api->forward(api->ctx, b, 1, alone), TSR_OK);
            const float *want = batched + ((size_t)t * N_SEQ + (size_t)s) * nv;
            if (memcmp(alone, want, nv * sizeof *alone) != 0)
                ck_abort_msg("sequence %d, step %d: the batch's logits differ from the sequence "
                             "decoded alone", s, t);
        }
        tsr_request_end(&req);
    }
    free(batched);
    free(alone);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* A copy of the tiny model, `name` in a fresh folder, whose F32 tensors `tensors` (n) hold
 * `value` from element `from` to element `to` (exclusive; -1: the tensor's end). */
static char *tiny_model_with(const char *name, const char *const *tensors, size_t n, size_t from,
                             ptrdiff_t to, float value) {
    size_t size;
    char *bytes = tsr_test_read_file(tiny_path, &size);
    ck_assert_ptr_nonnull(bytes);
    tsr_gguf *g;
    tsr_error err;
    ck_assert_int_eq(tsr_gguf_open_memory(bytes, size, "tiny", &g, &err), 0);
    for (size_t i = 0; i < n; i++) {
        const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, tensors[i]);
        ck_assert_ptr_nonnull(t);
        size_t at = (size_t)((const char *)t->data - bytes);
        size_t end = to < 0 ? t->size / sizeof(float) : (size_t)to;
        for (size_t e = from; e < end; e++) memcpy(bytes + at + e * sizeof value, &value, sizeof value);
    }
    tsr_gguf_close(g);
    char *dir = tsr_test_tmpdir(), *path = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(path, "%s/%s", dir, name);
    ck_assert_int_eq(tsr_test_write_file(path, bytes, size), 0);
    free(bytes);
    free(dir);
    return path;
}

/* ---- draft models, outputs per sequence ----------------------------------------------------- */

/* The tiny model as its own draft, with `draft` as its draft: section, on `threads`. */
static const char *draft_yaml_on(char *buf, size_t size, const char *draft, int threads) {
    snprintf(buf, size, "tessera: 1\nbackend: { plugin: cpu, threads: %d }\n"
             "attention: { plugin: flash }\ncache: { plugin: full }\n"
             "decoder: { plugin: speculative, temperature: 0 }\ndraft: %s\n", threads, draft);
    return buf;
}

static const char *draft_yaml(char *buf, size_t size, const char *draft) {
    return draft_yaml_on(buf, size, draft, 1);
}

/* The draft's logits (N_TOK x n_vocab, malloc'd) of the test prompt, through api.draft. */
static float *draft_prompt_logits(run *r) {
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r->pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
    const tsr_decode_api *d = req.api.draft;
    ck_assert_ptr_nonnull(d);
    ck_assert_int_eq(d->n_vocab, r->model->hp.n_vocab);
    tsr_batch_entry b[N_TOK];
    for (int i = 0; i < N_TOK; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = (int32_t)((i * 37 + 11) % 320),
                                 .want_logits = 1};
    float *logits = malloc((size_t)N_TOK * (size_t)r->model->hp.n_vocab * sizeof *logits);
    ck_assert_int_eq(d->forward(d->ctx, b, N_TOK, logits), TSR_OK);
    tsr_request_end(&req);
    return logits;
}

/* A self-draft skipping no layer is the target; skipping layer 1 is the model whose layer 1
 * adds nothing to the residual stream (its output projections zero), bit for bit. */
START_TEST(self_draft_skips_its_layers) {
    char yaml[512];
    size_t bytes = (size_t)N_TOK * 320 * sizeof(float);
    run r;
    run_open_ok(&r, draft_yaml(yaml, sizeof yaml, "{ skip_layers: [] }"), 64);
    float *target = prompt_logits(&r), *draft = draft_prompt_logits(&r);
    ck_assert_mem_eq(draft, target, bytes);
    free(draft);
    tsr_test_pipeline_close(&r);

    const char *outputs[] = {"blk.1.attn_output.weight", "blk.1.ffn_down.weight"};
    char *path = tiny_model_with("no-layer-1.gguf", outputs, 2, 0, -1, 0.0f);
    tsr_test_pipeline_open_ok(&r, path, default_yaml, 64);
    float *want = prompt_logits(&r);
    tsr_test_pipeline_close(&r);
    run_open_ok(&r, draft_yaml(yaml, sizeof yaml, "{ skip_layers: [1] }"), 64);
    draft = draft_prompt_logits(&r);
    ck_assert_mem_eq(draft, want, bytes);
    ck_assert(memcmp(target, want, bytes) != 0); /* layer 1 does change the logits */
    free(draft);
    free(want);
    free(target);
    tsr_test_pipeline_close(&r);
    free(path);
}
END_TEST

/* forward_begin on two threads: the target's forward runs on its own thread while the draft
 * forwards on the caller's, each giving the logits it gives alone; in between the target's API
 * refuses every other call (DEC_8), and a wait with nothing begun is refused too. */
START_TEST(forward_begin_runs_beside_the_draft) {
    char yaml[512];
    run r;
    run_open_ok(&r, draft_yaml_on(yaml, sizeof yaml, "{ skip_layers: [1] }", 2), 64);
    float *target_alone = prompt_logits(&r), *draft_alone = draft_prompt_logits(&r);
    size_t nv = (size_t)r.model->hp.n_vocab, bytes = N_TOK * nv * sizeof(float);
    tsr_batch_entry b[N_TOK];
    for (int i = 0; i < N_TOK; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = (int32_t)((i * 37 + 11) % 320),
                                 .want_logits = 1};
    float *target = malloc(bytes), *draft = malloc(bytes);
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, 8, NULL, NULL, NULL, NULL, &err), TSR_OK);
    const tsr_decode_api *api = &req.api, *d = req.api.draft;
    ck_assert_int_eq(api->forward_wait(api->ctx), TSR_E_STATE);
    ck_assert_str_eq(req.host_err.msg, "forward_wait: no forward was begun (forward_begin)");
    ck_assert_int_eq(api->forward_begin(api->ctx, b, N_TOK, target), TSR_OK);
    ck_assert_int_eq(d->forward(d->ctx, b, N_TOK, draft), TSR_OK);
    ck_assert_int_eq(api->forward(api->ctx, b, 1, NULL), TSR_E_STATE);
    ck_assert_str_eq(req.host_err.msg, "forward: the target's forward begun by forward_begin is "
                                       "still running: forward_wait comes first");
    ck_assert_int_eq(api->forward_begin(api->ctx, b, 1, NULL), TSR_E_STATE);
    ck_assert_int_eq(api->seq_fork(api->ctx, 0, 1), TSR_E_STATE);
    ck_assert_int_eq(api->seq_truncate(api->ctx, 0, 0), TSR_E_STATE);
    ck_assert_int_eq(api->seq_end(api->ctx, 0), TSR_E_STATE);
    ck_assert_int_eq(api->emit(api->ctx, &b[0].token, 1), 1);
    ck_assert_str_eq(req.host_err.msg, "emit: the target's forward begun by forward_begin is "
                                       "still running: forward_wait comes first");
    ck_assert_int_eq(api->forward_wait(api->ctx), TSR_OK);
    ck_assert_mem_eq(target, target_alone, bytes);
    ck_assert_mem_eq(draft, draft_alone, bytes);
    /* After the wait the target takes calls again, on the whole pool. */
    ck_assert_int_eq(api->seq_truncate(api->ctx, 0, 0), TSR_OK);
    ck_assert_int_eq(api->forward(api->ctx, b, N_TOK, target), TSR_OK);
    ck_assert_mem_eq(target, target_alone, bytes);
    tsr_request_end(&req);
    free(target);
    free(draft);
    free(target_alone);
    free(draft_alone);
    tsr_test_pipeline_close(&r);
}
END_TEST

START_TEST(draft_layers_must_exist) {
    static const struct {
        const char *draft, *error;
    } bad[] = {
        {"{ skip_layers: [2] }", "test.yaml:6:23: draft.skip_layers: layer 2 is beyond the draft "
                                 "model's 2 layers (0 to 1)"},
        {"{ skip_layers: [1, 0] }", "test.yaml:6:23: draft.skip_layers: all 2 layers of the "
                                    "model are skipped; a draft must run one at least"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char yaml[512];
        run r;
        tsr_error err;
        ck_assert_int_lt(tsr_test_pipeline_open(&r, tiny_path,
                                                draft_yaml(yaml, sizeof yaml, bad[i].draft), NULL,
                                                64, &err), 0);
        ck_assert_str_eq(err.msg, bad[i].error);
        ck_assert_ptr_null(r.pl);
        tsr_test_pipeline_close(&r);
    }
}
END_TEST

/* What the sink received, by sequence. */
typedef struct seq_sink {
    int32_t tokens[4][8];
    int n[4];
} seq_sink;

static void sink_by_seq(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n) {
    seq_sink *s = ctx;
    ck_assert(seq_id >= 0 && seq_id < 4);
    for (int64_t i = 0; i < n; i++) s->tokens[seq_id][s->n[seq_id]++] = tokens[i];
}

static int32_t eog_is_7(void *ctx, int32_t token) { return token == 7; }

/* emit_seq keeps one output per sequence: its own limit, its own stop, an end of generation
 * ending that sequence only; emit() is sequence 0's. */
START_TEST(emit_seq_keeps_one_output_per_sequence) {
    run r;
    run_open_ok(&r, default_yaml, 64);
    seq_sink got = {0};
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, 2, eog_is_7, NULL, sink_by_seq, &got, &err),
                     TSR_OK);
    const tsr_decode_api *api = &req.api;
    ck_assert_ptr_null(api->draft);
    ck_assert_int_eq(api->emit_seq(api->ctx, 1, (int32_t[]){5, 6, 8}, 3), 1);
    ck_assert_int_eq(api->emit_seq(api->ctx, 0, (int32_t[]){9}, 1), 0);
    ck_assert_int_eq(api->emit(api->ctx, (int32_t[]){10}, 1), 1);
    ck_assert_int_eq(api->emit_seq(api->ctx, 1, (int32_t[]){11}, 1), 1);
    ck_assert_int_eq(api->emit_seq(api->ctx, 2, (int32_t[]){4, 7, 5}, 3), 1);
    ck_assert_int_eq(api->emit_seq(api->ctx, 3, (int32_t[]){12}, 1), 0);
    ck_assert_int_eq(got.n[0], 2);
    ck_assert_int_eq(got.tokens[0][0], 9);
    ck_assert_int_eq(got.tokens[0][1], 10);
    ck_assert_int_eq(got.n[1], 2);
    ck_assert_int_eq(got.tokens[1][0], 5);
    ck_assert_int_eq(got.tokens[1][1], 6);
    ck_assert_int_eq(got.n[2], 1);
    ck_assert_int_eq(got.tokens[2][0], 4);
    ck_assert_int_eq(got.n[3], 1);
    ck_assert_int_eq(req.n_emitted, 6);
    ck_assert(!req.host_failed);
    ck_assert_int_eq(api->emit_seq(api->ctx, -1, (int32_t[]){3}, 1), 1);
    ck_assert(req.host_failed);
    ck_assert_str_eq(req.host_err.msg, "emit_seq: sequence -1 is not a sequence id");
    tsr_request_end(&req);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* ---- broken models ----------------------------------------------------------------------- */

START_TEST(nan_stops_at_its_layer) {
    const char *ffn_down = "blk.1.ffn_down.weight";
    char *path = tiny_model_with("nan.gguf", &ffn_down, 1, 5, 6, NAN);
    run r;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&r, path, default_yaml, NULL, 64, &err), TSR_OK);
    tsr_batch_entry b = {.seq_id = 0, .pos = 0, .token = 3, .want_logits = 1};
    float *logits = malloc((size_t)r.model->hp.n_vocab * sizeof *logits);
    ck_assert_int_ge(tsr_pipeline_seq_begin(r.pl, 0, &err), 0);
    ck_assert_int_eq(tsr_pipeline_forward(r.pl, &b, 1, logits, &err), TSR_E_RANGE);
    ck_assert_ptr_nonnull(strstr(err.msg, "layer 1: the values turned NaN or infinite"));
    free(logits);
    tsr_test_pipeline_close(&r);
    free(path);
}
END_TEST

int main(void) {
    char *dir = tsr_test_tmpdir();
    tiny_path = malloc(strlen(dir) + 16);
    sprintf(tiny_path, "%s/tiny.gguf", dir);
    char *err = NULL;
    const char *args[] = {"synth", "--shape", "tiny", "--type", "f32", "-o", tiny_path, NULL};
    if (tsr_test_tessera(NULL, &err, args) != 0) {
        fprintf(stderr, "tessera synth failed: %s\n", err ? err : "");
        return 1;
    }
    free(err);
    Suite *s = suite_create("pipeline");
    TCase *tc = tcase_create("device memory");
    tcase_add_loop_test(tc, arena_backend_equals_cpu, 0,
                        (int)(sizeof arena_quantizers / sizeof arena_quantizers[0]));
    tcase_add_test(tc, arena_backend_refuses_host_memory);
    tcase_add_loop_test(tc, cpu_plugins_refuse_device_memory, 0,
                        (int)(sizeof cpu_only / sizeof cpu_only[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("sequences");
    tcase_add_test(tc, positions_continue_each_sequence);
    tcase_add_test(tc, fork_truncate_and_batches);
    tcase_add_test(tc, forked_batches_equal_each_alone);
    tcase_add_test(tc, emit_seq_keeps_one_output_per_sequence);
    suite_add_tcase(s, tc);
    tc = tcase_create("draft");
    tcase_add_test(tc, self_draft_skips_its_layers);
    tcase_add_test(tc, draft_layers_must_exist);
    tcase_add_test(tc, forward_begin_runs_beside_the_draft);
    suite_add_tcase(s, tc);
    tc = tcase_create("broken models");
    tcase_add_test(tc, nan_stops_at_its_layer);
    suite_add_tcase(s, tc);
    int status = tsr_test_run_suite(s);
    free(tiny_path);
    free(dir);
    return status;
}
