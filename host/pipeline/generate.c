/* The generation API a pipeline hands to its decoder (tsr_decode_api): forward, sequence
 * management and emit, each checked and reported as the host's own failure when it fails, so
 * the user reads why rather than the decoder's paraphrase. */
#include "pipeline/pipeline_impl.h"
#include "plugin/vtable.h"

static tsr_status api_forward(void *ctx, const tsr_batch_entry *entries, int64_t n, float *logits) {
    tsr_request *g = ctx;
    tsr_status st = tsr_pipeline_forward(g->pl, entries, n, logits, &g->host_err);
    if (st < 0) g->host_failed = true;
    return st;
}

static tsr_status api_seq_fork(void *ctx, int64_t src, int64_t dst) {
    tsr_request *g = ctx;
    tsr_pipeline *pl = g->pl;
    tsr_seq_state *s = tsr_pipeline_find_seq(pl, src);
    if (!s || tsr_pipeline_find_seq(pl, dst)) {
        g->host_failed = true;
        return tsr_error_set(&g->host_err, TSR_E_STATE, "seq_fork: sequence %lld %s", (long long)(s ? dst : src),
                             s ? "is already running" : "does not exist");
    }
    tsr_seq_state copy = *s;
    copy.id = dst;
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = TSR_VT_HAS(cv, seq_fork) ? cv->seq_fork(c->self, src, dst) : TSR_E_UNSUPPORTED;
        if (st < 0) {
            g->host_failed = true;
            return tsr_instance_failed(c, st, "seq_fork", &g->host_err);
        }
    }
    if (!tsr_pipeline_add_seq(pl, copy)) {
        g->host_failed = true;
        return tsr_error_set(&g->host_err, TSR_E_NOMEM, "seq_fork: out of memory");
    }
    return TSR_OK;
}

static tsr_status api_seq_truncate(void *ctx, int64_t seq_id, int32_t n_pos) {
    tsr_request *g = ctx;
    tsr_seq_state *s = tsr_pipeline_find_seq(g->pl, seq_id);
    if (!s || n_pos < 0) {
        g->host_failed = true;
        return tsr_error_set(&g->host_err, s ? TSR_E_RANGE : TSR_E_STATE,
                             "seq_truncate: sequence %lld %s", (long long)seq_id,
                             s ? "cannot keep a negative number of positions" : "does not exist");
    }
    TSR_FOR_EACH_INSTANCE(g->pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = TSR_VT_HAS(cv, seq_truncate) ? cv->seq_truncate(c->self, seq_id, n_pos)
                                                      : TSR_E_UNSUPPORTED;
        if (st < 0) {
            g->host_failed = true;
            return tsr_instance_failed(c, st, "seq_truncate", &g->host_err);
        }
    }
    if (n_pos < s->n_pos) s->n_pos = n_pos;
    return TSR_OK;
}

static tsr_status api_seq_end(void *ctx, int64_t seq_id) {
    tsr_request *g = ctx;
    tsr_pipeline_seq_end(g->pl, seq_id);
    return TSR_OK;
}

static int32_t api_is_eog(void *ctx, int32_t token) {
    tsr_request *g = ctx;
    return g->eog ? g->eog(g->eog_ctx, token) : 0;
}

static int32_t api_emit(void *ctx, const int32_t *tokens, int64_t n) {
    tsr_request *g = ctx;
    int64_t take = 0;
    bool stop = false;
    while (take < n && g->n_emitted + take < g->max_new) {
        if (api_is_eog(g, tokens[take])) {
            stop = true;
            break;
        }
        take++;
    }
    if (take > 0 && g->sink) g->sink(g->sink_ctx, tokens, take);
    g->n_emitted += take;
    if (g->n_emitted >= g->max_new) stop = true;
    if (tsr_pipeline_run_hooks(g->pl, TSR_HOOK_AFTER_STEP, &g->host_err) < 0) {
        g->host_failed = true;
        stop = true;
    }
    return stop ? 1 : 0;
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
                              .emit = api_emit, .is_eog = api_is_eog};
    return tsr_pipeline_seq_begin(pl, 0, err);
}

void tsr_request_end(tsr_request *r) {
    tsr_pipeline *pl = r->pl;
    while (pl->n_seqs) tsr_pipeline_seq_end(pl, pl->seqs[pl->n_seqs - 1].id);
}

tsr_status tsr_pipeline_generate(tsr_pipeline *pl, const int32_t *prompt, int64_t n_prompt,
                                 int64_t max_new_tokens, tsr_eog_fn eog, void *eog_ctx,
                                 tsr_token_sink sink, void *sink_ctx, int64_t *n_generated,
                                 tsr_error *err) {
    *n_generated = 0;
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
    /* Decoder time is what generate() took outside the host's own work. */
    tsr_stage_times *times = &pl->graph.times;
    uint64_t host0 = host_time(times), t0 = tsr_clock_ns();
    if (max_new_tokens > 0) st = dv->generate(dec->self, &g.api, &req);
    uint64_t spent = tsr_clock_ns() - t0, host = host_time(times) - host0;
    times->decoder += spent > host ? spent - host : 0;
    /* at_end hooks see the request's state (its cache, its counters) before it is freed. */
    if (st >= 0 && !g.host_failed && tsr_pipeline_run_hooks(pl, TSR_HOOK_AT_END, &g.host_err) < 0)
        g.host_failed = true;
    tsr_request_end(&g);
    *n_generated = g.n_emitted;
    if (g.host_failed) {
        *err = g.host_err;
        return st < 0 ? st : TSR_E_INTERNAL;
    }
    if (st < 0) return tsr_instance_failed(dec, st, "generate", err);
    return TSR_OK;
}
