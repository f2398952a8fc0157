/* The generation API a pipeline hands to its decoder (tsr_decode_api): forward, sequence
 * management and emit, each checked and reported as the host's own failure when it fails, so
 * the user reads why rather than the decoder's paraphrase. A pipeline with a draft model hands
 * a second API (api.draft) whose calls act on the draft's pipeline, and a decoder that
 * generates several continuations emits each through emit_seq. */
#include <stdlib.h>

#include "pipeline/pipeline_impl.h"
#include "plugin/vtable.h"

static tsr_status failed(tsr_request *g, tsr_status st) {
    if (st < 0) g->host_failed = true;
    return st;
}

static tsr_status forward_on(tsr_request *g, tsr_pipeline *pl, const tsr_batch_entry *entries,
                             int64_t n, float *logits) {
    return failed(g, tsr_pipeline_forward(pl, entries, n, logits, &g->host_err));
}

/* While the decoder's forward_begin runs, the target's API takes no other call (DEC_8). */
static bool target_busy(tsr_request *g, const char *call) {
    if (!g->side.running) return false;
    failed(g, tsr_error_set(&g->host_err, TSR_E_STATE, "%s: the target's forward begun by "
                            "forward_begin is still running: forward_wait comes first", call));
    return true;
}

static tsr_status seq_fork_on(tsr_request *g, tsr_pipeline *pl, int64_t src, int64_t dst) {
    tsr_seq_state *s = tsr_pipeline_find_seq(pl, src);
    if (!s || tsr_pipeline_find_seq(pl, dst))
        return failed(g, tsr_error_set(&g->host_err, TSR_E_STATE, "seq_fork: sequence %lld %s",
                                       (long long)(s ? dst : src),
                                       s ? "is already running" : "does not exist"));
    tsr_seq_state copy = *s;
    copy.id = dst;
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = TSR_VT_HAS(cv, seq_fork) ? cv->seq_fork(c->self, src, dst) : TSR_E_UNSUPPORTED;
        if (st < 0) return failed(g, tsr_instance_failed(c, st, "seq_fork", &g->host_err));
    }
    if (!tsr_pipeline_add_seq(pl, copy))
        return failed(g, tsr_error_set(&g->host_err, TSR_E_NOMEM, "seq_fork: out of memory"));
    return TSR_OK;
}

static tsr_status seq_truncate_on(tsr_request *g, tsr_pipeline *pl, int64_t seq_id,
                                  int32_t n_pos) {
    tsr_seq_state *s = tsr_pipeline_find_seq(pl, seq_id);
    if (!s || n_pos < 0)
        return failed(g, tsr_error_set(&g->host_err, s ? TSR_E_RANGE : TSR_E_STATE,
                                       "seq_truncate: sequence %lld %s", (long long)seq_id,
                                       s ? "cannot keep a negative number of positions"
                                         : "does not exist"));
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = TSR_VT_HAS(cv, seq_truncate) ? cv->seq_truncate(c->self, seq_id, n_pos)
                                                      : TSR_E_UNSUPPORTED;
        if (st < 0) return failed(g, tsr_instance_failed(c, st, "seq_truncate", &g->host_err));
    }
    if (n_pos < s->n_pos) s->n_pos = n_pos;
    return TSR_OK;
}

static tsr_status api_forward(void *ctx, const tsr_batch_entry *entries, int64_t n, float *logits) {
    tsr_request *g = ctx;
    if (target_busy(g, "forward")) return TSR_E_STATE;
    return forward_on(g, g->pl, entries, n, logits);
}

static tsr_status api_seq_fork(void *ctx, int64_t src, int64_t dst) {
    tsr_request *g = ctx;
    if (target_busy(g, "seq_fork")) return TSR_E_STATE;
    return seq_fork_on(g, g->pl, src, dst);
}

static tsr_status api_seq_truncate(void *ctx, int64_t seq_id, int32_t n_pos) {
    tsr_request *g = ctx;
    if (target_busy(g, "seq_truncate")) return TSR_E_STATE;
    return seq_truncate_on(g, g->pl, seq_id, n_pos);
}

static tsr_status api_seq_end(void *ctx, int64_t seq_id) {
    tsr_request *g = ctx;
    if (target_busy(g, "seq_end")) return TSR_E_STATE;
    tsr_pipeline_seq_end(g->pl, seq_id);
    return TSR_OK;
}

/* The side thread of forward_begin: the target's forward on the target's share of the pool,
 * its failure kept apart from what the draft's calls on the main thread may record. */
static void *side_forward_main(void *ctx) {
    tsr_request *g = ctx;
    tsr_pool_bind_thread(g->pl->target_share);
    g->side.status = tsr_pipeline_forward(g->pl, g->side.entries, g->side.n, g->side.logits,
                                          &g->side.err);
    return NULL;
}

static tsr_status api_forward_begin(void *ctx, const tsr_batch_entry *entries, int64_t n,
                                    float *logits) {
    tsr_request *g = ctx;
    if (target_busy(g, "forward_begin")) return TSR_E_STATE;
    g->side.running = true;
    g->side.entries = entries;
    g->side.n = n;
    g->side.logits = logits;
    if (g->pl->target_share) {
        tsr_pool_bind_thread(g->pl->draft_share);
        g->side.threaded = pthread_create(&g->side.thread, NULL, side_forward_main, g) == 0;
        if (g->side.threaded) return TSR_OK;
        tsr_pool_bind_thread(NULL);
    }
    g->side.status = tsr_pipeline_forward(g->pl, entries, n, logits, &g->side.err);
    return TSR_OK;
}

/* Ends the forward begun, if any: joins its thread and gives the main thread the whole pool
 * again. */
static void side_forward_join(tsr_request *g) {
    if (g->side.threaded) {
        pthread_join(g->side.thread, NULL);
        tsr_pool_bind_thread(NULL);
    }
    g->side.running = g->side.threaded = false;
}

static tsr_status api_forward_wait(void *ctx) {
    tsr_request *g = ctx;
    if (!g->side.running)
        return failed(g, tsr_error_set(&g->host_err, TSR_E_STATE,
                                       "forward_wait: no forward was begun (forward_begin)"));
    side_forward_join(g);
    if (g->side.status < 0) {
        g->host_err = g->side.err;
        g->host_failed = true;
    }
    return g->side.status;
}

static tsr_status draft_forward(void *ctx, const tsr_batch_entry *entries, int64_t n,
                                float *logits) {
    tsr_request *g = ctx;
    return forward_on(g, g->pl->draft, entries, n, logits);
}

static tsr_status draft_seq_fork(void *ctx, int64_t src, int64_t dst) {
    tsr_request *g = ctx;
    return seq_fork_on(g, g->pl->draft, src, dst);
}

static tsr_status draft_seq_truncate(void *ctx, int64_t seq_id, int32_t n_pos) {
    tsr_request *g = ctx;
    return seq_truncate_on(g, g->pl->draft, seq_id, n_pos);
}

static tsr_status draft_seq_end(void *ctx, int64_t seq_id) {
    tsr_request *g = ctx;
    tsr_pipeline_seq_end(g->pl->draft, seq_id);
    return TSR_OK;
}

static int32_t api_is_eog(void *ctx, int32_t token) {
    tsr_request *g = ctx;
    return g->eog ? g->eog(g->eog_ctx, token) : 0;
}

/* The record of sequence `seq_id`'s output, made at its first emission; NULL when out of
 * memory. */
static tsr_seq_output *output_of(tsr_request *g, int64_t seq_id) {
    for (size_t i = 0; i < g->n_outputs; i++)
        if (g->outputs[i].seq_id == seq_id) return &g->outputs[i];
    if (g->n_outputs == g->cap_outputs) {
        size_t cap = g->cap_outputs ? 2 * g->cap_outputs : 4;
        tsr_seq_output *grown = realloc(g->outputs, cap * sizeof *grown);
        if (!grown) return NULL;
        g->outputs = grown;
        g->cap_outputs = cap;
    }
    g->outputs[g->n_outputs] = (tsr_seq_output){.seq_id = seq_id};
    return &g->outputs[g->n_outputs++];
}

static int32_t api_emit_seq(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n) {
    tsr_request *g = ctx;
    if (target_busy(g, "emit")) return 1;
    tsr_seq_output *out = seq_id >= 0 ? output_of(g, seq_id) : NULL;
    if (!out) {
        failed(g, seq_id < 0 ? tsr_error_set(&g->host_err, TSR_E_INVALID, "emit_seq: sequence "
                                             "%lld is not a sequence id", (long long)seq_id)
                             : tsr_error_set(&g->host_err, TSR_E_NOMEM, "emit: out of memory"));
        return 1;
    }
    if (out->stopped) return 1;
    int64_t take = 0;
    while (take < n && out->n_emitted + take < g->max_new) {
        if (api_is_eog(g, tokens[take])) {
            out->stopped = true;
            break;
        }
        take++;
    }
    if (take > 0 && g->sink) g->sink(g->sink_ctx, seq_id, tokens, take);
    out->n_emitted += take;
    g->n_emitted += take;
    if (out->n_emitted >= g->max_new) out->stopped = true;
    if (tsr_pipeline_run_hooks(g->pl, TSR_HOOK_AFTER_STEP, &g->host_err) < 0) {
        g->host_failed = true;
        out->stopped = true;
    }
    return out->stopped ? 1 : 0;
}

static int32_t api_emit(void *ctx, const int32_t *tokens, int64_t n) {
    return api_emit_seq(ctx, 0, tokens, n);
}

static uint64_t host_time(const tsr_stage_times *t) {
    return t->matmul + t->attention + t->cache + t->other_ops + t->router;
}

tsr_status tsr_request_begin(tsr_request *r, tsr_pipeline *pl, int64_t max_new_tokens,
                             tsr_eog_fn eog, void *eog_ctx, tsr_token_sink sink, void *sink_ctx,
                             tsr_error *err) {
    *r = (tsr_request){.pl = pl, .max_new = max_new_tokens, .eog = eog, .eog_ctx = eog_ctx,
                       .sink = sink, .sink_ctx = sink_ctx};
    r->api = (tsr_decode_api){.struct_size = sizeof r->api, .ctx = r,
                              .n_vocab = pl->model->hp.n_vocab, .n_ctx = pl->n_ctx,
                              .forward = api_forward, .seq_fork = api_seq_fork,
                              .seq_truncate = api_seq_truncate, .seq_end = api_seq_end,
                              .emit = api_emit, .is_eog = api_is_eog, .emit_seq = api_emit_seq};
    tsr_status st = tsr_pipeline_seq_begin(pl, 0, err);
    if (st < 0 || !pl->draft) return st;
    r->draft_api = (tsr_decode_api){.struct_size = sizeof r->draft_api, .ctx = r,
                                    .n_vocab = pl->draft->model->hp.n_vocab,
                                    .n_ctx = pl->draft->n_ctx, .forward = draft_forward,
                                    .seq_fork = draft_seq_fork,
                                    .seq_truncate = draft_seq_truncate,
                                    .seq_end = draft_seq_end};
    r->api.draft = &r->draft_api;
    r->api.forward_begin = api_forward_begin;
    r->api.forward_wait = api_forward_wait;
    if ((st = tsr_pipeline_seq_begin(pl->draft, 0, err)) < 0) tsr_request_end(r);
    return st;
}

static void end_all(tsr_pipeline *pl) {
    while (pl->n_seqs) tsr_pipeline_seq_end(pl, pl->seqs[pl->n_seqs - 1].id);
}

void tsr_request_end(tsr_request *r) {
    side_forward_join(r);
    end_all(r->pl);
    if (r->pl->draft) end_all(r->pl->draft);
    free(r->outputs);
    r->outputs = NULL;
    r->n_outputs = r->cap_outputs = 0;
}

tsr_status tsr_pipeline_generate(tsr_pipeline *pl, const int32_t *prompt, int64_t n_prompt,
                                 int64_t max_new_tokens, tsr_eog_fn eog, void *eog_ctx,
                                 tsr_token_sink sink, void *sink_ctx, tsr_generate_stats *stats,
                                 tsr_error *err) {
    *stats = (tsr_generate_stats){.decoder = {.struct_size = sizeof stats->decoder}};
    if (n_prompt <= 0) return tsr_error_set(err, TSR_E_INVALID, "generate: the prompt is empty");
    if (n_prompt + max_new_tokens > pl->n_ctx)
        return tsr_error_set(err, TSR_E_RANGE, "generate: %lld prompt tokens + %lld new tokens "
                             "exceed the context of %d positions", (long long)n_prompt,
                             (long long)max_new_tokens, pl->n_ctx);
    tsr_request g;
    tsr_status st = tsr_request_begin(&g, pl, max_new_tokens, eog, eog_ctx, sink, sink_ctx, err);
    if (st < 0) return st;
    tsr_generate_request req = {.struct_size = sizeof req, .prompt = prompt,
                                .n_prompt = n_prompt, .max_new_tokens = max_new_tokens};
    tsr_instance *dec = pl->stage_main[TSR_STAGE_DECODER];
    const tsr_decoder_vtable *dv = dec->vtable;
    /* Decoder time is what generate() took outside the host's own work, the draft's forwards
     * included (the decoder's choice to run them). */
    tsr_stage_times *times = &pl->graph.times;
    uint64_t host0 = host_time(times), t0 = tsr_clock_ns(), forwards0 = times->forward_calls;
    uint64_t draft0 = pl->draft ? pl->draft->graph.times.forward_calls : 0;
    if (max_new_tokens > 0) st = dv->generate(dec->self, &g.api, &req);
    if (g.side.running) {
        side_forward_join(&g);
        failed(&g, tsr_error_set(&g.host_err, TSR_E_STATE, "decoder '%s': generate returned with "
                                 "the target's forward begun and not waited for (forward_wait)",
                                 dec->ref->desc->name));
    }
    uint64_t spent = tsr_clock_ns() - t0, host = host_time(times) - host0;
    times->decoder += spent > host ? spent - host : 0;
    stats->target_forwards = times->forward_calls - forwards0;
    stats->draft_forwards = pl->draft ? pl->draft->graph.times.forward_calls - draft0 : 0;
    stats->new_tokens = g.n_emitted;
    for (size_t i = 0; i < g.n_outputs; i++) stats->n_sequences += g.outputs[i].n_emitted > 0;
    if (st >= 0 && TSR_VT_HAS(dv, stats)) {
        stats->has_decoder_stats = true;
        dv->stats(dec->self, &stats->decoder);
    }
    /* at_end hooks see the request's state (its cache, its counters) before it is freed. */
    if (st >= 0 && !g.host_failed && tsr_pipeline_run_hooks(pl, TSR_HOOK_AT_END, &g.host_err) < 0)
        g.host_failed = true;
    tsr_request_end(&g);
    if (g.host_failed) {
        *err = g.host_err;
        return st < 0 ? st : TSR_E_INTERNAL;
    }
    if (st < 0) return tsr_instance_failed(dec, st, "generate", err);
    return TSR_OK;
}
