/* The wiring of a pipeline: its stage instances, the prepared weights and the graph over them,
 * the routers of a model with experts and their hold on the experts, sequences, the
 * end-of-forward hooks of the cache policies, and the pipeline's `hooks:`. */
#include "pipeline/pipeline_impl.h"

#include <stdlib.h>
#include <string.h>

#include "files/dtype.h"
#include "plugin/commands.h"
#include "plugin/stage_init.h"
#include "plugin/vtable.h"

int tsr_config_threads(const tsr_config *cfg) {
    const tsr_bound_params *b = &cfg->stage[TSR_STAGE_BACKEND].bound;
    int32_t i = tsr_param_find_role(b->params.defs, b->params.count, TSR_PARAM_ROLE_THREADS);
    return i >= 0 && b->values[i].u.i > 0 ? (int)b->values[i].u.i : 1;
}

/* ---- creation -------------------------------------------------------------------------- */

static tsr_status check_layer_ranges(const tsr_config *cfg, int32_t n_layer, tsr_error *err) {
    for (size_t i = 0; i < cfg->n_layers; i++)
        if (cfg->layers[i].last >= n_layer) {
            const tsr_src_loc *at = &cfg->layers[i].loc;
            return tsr_error_set(err, TSR_E_RANGE, "%s:%d:%d: layers: range [%d, %d] is beyond "
                                 "the model's %d layers (0 to %d)", at->file, at->line, at->col,
                                 cfg->layers[i].first, cfg->layers[i].last, n_layer, n_layer - 1);
        }
    return TSR_OK;
}

/* The router stage runs at mixture-of-experts layers: a router configured for a model without
 * experts would never be called, which deserves one clear line rather than silence. The
 * default pipeline's router is not the user's choice: a dense model simply runs without. */
static tsr_status check_router(const tsr_config *cfg, const tsr_hparams *hp, tsr_error *err) {
    for (int32_t l = 0; hp->n_expert == 0 && l < hp->n_layer; l++) {
        const tsr_stage_conf *sc = tsr_config_stage_at(cfg, TSR_STAGE_ROUTER, l);
        if (sc->plugin && !sc->by_default)
            return tsr_error_set_at(err, TSR_E_INVALID, sc->loc, "router: '%s' is configured but "
                                    "the model has no mixture-of-experts layers to route; remove "
                                    "the router", sc->plugin);
    }
    return TSR_OK;
}

/* What every stage's init is made from. */
static tsr_model_shape pipeline_shape(const tsr_pipeline *pl, tsr_pool *pool) {
    const tsr_hparams *hp = &pl->model->hp;
    return (tsr_model_shape){
        .n_layer = hp->n_layer, .n_head = hp->n_head, .n_kv_head = hp->n_kv_head,
        .head_dim = hp->head_dim, .n_embd = hp->n_embd, .n_ctx = pl->n_ctx,
        .n_vocab = hp->n_vocab, .n_expert = hp->n_expert, .n_expert_used = hp->n_expert_used,
        .n_ff_expert = hp->n_ff_expert, .gating = hp->gating, .normalize = hp->normalize,
        .n_seq_max = 16, .n_threads = tsr_pool_size(pool),
        .backend_name = pl->cfg->stage[TSR_STAGE_BACKEND].plugin,
        .memory_space = pl->memory_space, .has_draft = pl->cfg->draft != NULL};
}

/* A model with experts needs the backend's rows (backend 1.1). */
static tsr_status check_backend_rows(const tsr_pipeline *pl, tsr_error *err) {
    const tsr_instance *backend = pl->stage_main[TSR_STAGE_BACKEND];
    const tsr_backend_vtable *be = backend->vtable;
    if (pl->model->hp.n_expert == 0 || (TSR_VT_HAS(be, copy_rows) && TSR_VT_HAS(be, weighted_sum)))
        return TSR_OK;
    return tsr_error_set(err, TSR_E_UNSUPPORTED, "backend '%s' has no copy_rows and weighted_sum "
                         "(backend ABI 1.1), which a mixture-of-experts model (%d experts per "
                         "layer) needs; use a backend that has them (cpu)",
                         backend->ref->desc->name, pl->model->hp.n_expert);
}

/* Every stage's instances but the routers, the backend first (the others are told where it
 * computes). */
static tsr_status create_instances(tsr_pipeline *pl, tsr_pool *pool, tsr_error *err) {
    const tsr_config *cfg = pl->cfg;
    tsr_model_shape shape = pipeline_shape(pl, pool);
    tsr_instance_set *set = &pl->instances;
    tsr_instance **main = pl->stage_main;
    tsr_status st = tsr_instance_set_add(set, TSR_STAGE_BACKEND, &cfg->stage[TSR_STAGE_BACKEND],
                                         &shape, &main[TSR_STAGE_BACKEND], err);
    if (st < 0) return st;
    const tsr_backend_vtable *be = main[TSR_STAGE_BACKEND]->vtable;
    pl->memory_space = TSR_VT_HAS(be, memory_space) ? be->memory_space(main[TSR_STAGE_BACKEND]->self)
                                                    : TSR_MEMORY_HOST;
    shape.memory_space = pl->memory_space;
    if ((st = check_backend_rows(pl, err)) < 0 ||
        (st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_QUANTIZER, &shape,
                                         &main[TSR_STAGE_QUANTIZER], pl->quantizer_at, err)) < 0 ||
        (st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_ATTENTION, &shape,
                                         &main[TSR_STAGE_ATTENTION], pl->attention_at, err)) < 0 ||
        (st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_CACHE, &shape,
                                         &main[TSR_STAGE_CACHE], pl->cache_at, err)) < 0)
        return st;
    /* A draft's pipeline has no decoder: the target's drives both. */
    if (cfg->stage[TSR_STAGE_DECODER].plugin)
        st = tsr_instance_set_add(set, TSR_STAGE_DECODER, &cfg->stage[TSR_STAGE_DECODER], &shape,
                                  &main[TSR_STAGE_DECODER], err);
    return st;
}

/* The routers of a model with experts, once the weights are prepared: each gets the model's
 * rule and the host's hold on the experts, and says once what it needs. */
static tsr_status create_routers(tsr_pipeline *pl, tsr_pool *pool, tsr_error *err) {
    const tsr_hparams *hp = &pl->model->hp;
    const tsr_backend_vtable *be = pl->stage_main[TSR_STAGE_BACKEND]->vtable;
    tsr_status st = tsr_experts_create(pl->model, &pl->weights, !TSR_VT_HAS(be, buffer_alloc),
                                       &pl->experts, err);
    if (st < 0) return st;
    tsr_model_shape shape = pipeline_shape(pl, pool);
    shape.experts = tsr_experts_access(pl->experts);
    if ((st = tsr_instance_set_per_layer(&pl->routers, pl->cfg, TSR_STAGE_ROUTER, &shape,
                                         &pl->stage_main[TSR_STAGE_ROUTER], pl->router_at,
                                         err)) < 0)
        return st;
    for (size_t i = 0; i < pl->routers.n_owned; i++) {
        tsr_instance *r = pl->routers.owned[i];
        const tsr_router_vtable *rv = r->vtable;
        int32_t needs = TSR_VT_HAS(rv, needs) ? rv->needs(r->self) : 0;
        if (needs & ~TSR_ROUTER_NEEDS_NEXT_GATE)
            return tsr_error_set(err, TSR_E_UNSUPPORTED, "router '%s' needs 0x%x, which this host "
                                 "does not know (it provides TSR_ROUTER_NEEDS_NEXT_GATE, 0x%x)",
                                 r->ref->desc->name, (unsigned)needs,
                                 (unsigned)TSR_ROUTER_NEEDS_NEXT_GATE);
        for (int32_t l = 0; l < hp->n_layer; l++)
            if (pl->router_at[l] == r) pl->router_needs[l] = needs;
    }
    return TSR_OK;
}

static tsr_status pipeline_new(const tsr_config *cfg, const tsr_registry *reg,
                               const tsr_model *model, tsr_pool *pool, int32_t n_ctx,
                               tsr_pipeline **out, tsr_error *err) {
    *out = NULL;
    tsr_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    pl->cfg = cfg;
    pl->instances = (tsr_instance_set){.reg = reg, .pool = pool};
    pl->routers = (tsr_instance_set){.reg = reg, .pool = pool};
    pl->model = model;
    pl->n_ctx = n_ctx;
    int32_t n_layer = model->hp.n_layer;
    pl->quantizer_at = calloc((size_t)n_layer, sizeof *pl->quantizer_at);
    pl->attention_at = calloc((size_t)n_layer, sizeof *pl->attention_at);
    pl->cache_at = calloc((size_t)n_layer, sizeof *pl->cache_at);
    pl->router_at = calloc((size_t)n_layer, sizeof *pl->router_at);
    pl->router_needs = calloc((size_t)n_layer, sizeof *pl->router_needs);
    tsr_status st;
    if (!pl->quantizer_at || !pl->attention_at || !pl->cache_at || !pl->router_at ||
        !pl->router_needs) {
        st = tsr_error_set(err, TSR_E_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = check_layer_ranges(cfg, n_layer, err)) < 0 ||
        (st = check_router(cfg, &model->hp, err)) < 0 ||
        (st = create_instances(pl, pool, err)) < 0)
        goto fail;
    tsr_instance *backend = pl->stage_main[TSR_STAGE_BACKEND];
    const tsr_backend_vtable *be = backend->vtable;
    if (!be->supports(backend->self, model->tok_embd.dtype)) {
        st = tsr_error_set(err, TSR_E_UNSUPPORTED,
                           "token_embd.weight: backend '%s' cannot read rows of type %s",
                           backend->ref->desc->name, tsr_dtype_name(model->tok_embd.dtype));
        goto fail;
    }
    if ((st = tsr_model_weights_prepare(&pl->weights, model, pl->stage_main[TSR_STAGE_QUANTIZER],
                                        pl->quantizer_at, backend, err)) < 0)
        goto fail;
    if (model->hp.n_expert > 0 && (st = create_routers(pl, pool, err)) < 0) goto fail;
    pl->graph = (tsr_graph){.model = model, .weights = &pl->weights, .backend = backend,
                            .memory_space = pl->memory_space,
                            .attention_at = pl->attention_at, .cache_at = pl->cache_at,
                            .quantizer_at = pl->quantizer_at, .router_at = pl->router_at,
                            .router_needs = pl->router_needs};
    *out = pl;
    return TSR_OK;
fail:
    tsr_pipeline_free(pl);
    return st;
}

/* The draft's pipeline on `model`, its forward leaving out the layers of draft.skip_layers. */
static tsr_status add_draft(tsr_pipeline *pl, const tsr_registry *reg, const tsr_model *model,
                            tsr_pool *pool, tsr_error *err) {
    const tsr_config *d = pl->cfg->draft;
    const tsr_hparams *hp = &model->hp;
    if (hp->n_vocab != pl->model->hp.n_vocab)
        return tsr_error_set_at(err, TSR_E_INVALID, d->loc, "draft: the draft model has %d tokens "
                                "and the target %d: a draft must share the target's vocabulary",
                                hp->n_vocab, pl->model->hp.n_vocab);
    for (size_t i = 0; i < d->n_skip_layers; i++)
        if (d->skip_layers[i] >= hp->n_layer)
            return tsr_error_set_at(err, TSR_E_RANGE, d->skip_loc, "draft.skip_layers: layer %d is "
                                    "beyond the draft model's %d layers (0 to %d)",
                                    d->skip_layers[i], hp->n_layer, hp->n_layer - 1);
    if (d->n_skip_layers >= (size_t)hp->n_layer)
        return tsr_error_set_at(err, TSR_E_INVALID, d->skip_loc, "draft.skip_layers: all %d "
                                "layers of the model are skipped; a draft must run one at least",
                                hp->n_layer);
    tsr_status st = pipeline_new(d, reg, model, pool, pl->n_ctx, &pl->draft, err);
    if (st < 0) return st;
    int n_threads = tsr_pool_size(pool);
    if (n_threads >= 2 && (!(pl->target_share = tsr_pool_create(n_threads - 1)) ||
                           !(pl->draft_share = tsr_pool_create(1))))
        return tsr_error_set(err, TSR_E_NOMEM, "draft: out of memory for the threads the target "
                             "and the draft share");
    if (d->n_skip_layers == 0) return TSR_OK;
    tsr_pipeline *draft = pl->draft;
    if (!(draft->skip_layer = calloc((size_t)hp->n_layer, sizeof *draft->skip_layer)))
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (size_t i = 0; i < d->n_skip_layers; i++) draft->skip_layer[d->skip_layers[i]] = true;
    draft->graph.skip_layer = draft->skip_layer;
    return TSR_OK;
}

tsr_status tsr_pipeline_create(const tsr_config *cfg, const tsr_registry *reg,
                               const tsr_model *model, const tsr_model *draft_model,
                               tsr_pool *pool, int32_t n_ctx, tsr_pipeline **out,
                               tsr_error *err) {
    tsr_status st = pipeline_new(cfg, reg, model, pool, n_ctx, out, err);
    if (st < 0 || !cfg->draft) return st;
    if ((st = add_draft(*out, reg, draft_model ? draft_model : model, pool, err)) < 0) {
        tsr_pipeline_free(*out);
        *out = NULL;
    }
    return st;
}

void tsr_pipeline_free(tsr_pipeline *pl) {
    if (!pl) return;
    tsr_pipeline_free(pl->draft);
    tsr_pool_free(pl->target_share);
    tsr_pool_free(pl->draft_share);
    free(pl->skip_layer);
    tsr_instance_set_free(&pl->routers);
    tsr_experts_free(pl->experts);
    tsr_model_weights_release(&pl->weights);
    while (pl->n_seqs) tsr_pipeline_seq_end(pl, pl->seqs[pl->n_seqs - 1].id);
    if (pl->graph.backend) tsr_graph_free(&pl->graph);
    tsr_instance_set_free(&pl->instances);
    free(pl->quantizer_at);
    free(pl->attention_at);
    free(pl->cache_at);
    free(pl->router_at);
    free(pl->router_needs);
    free(pl->seqs);
    free(pl);
}

/* ---- sequences ------------------------------------------------------------------------- */

tsr_seq_state *tsr_pipeline_find_seq(tsr_pipeline *pl, int64_t id) {
    for (size_t i = 0; i < pl->n_seqs; i++)
        if (pl->seqs[i].id == id) return &pl->seqs[i];
    return NULL;
}

bool tsr_pipeline_add_seq(tsr_pipeline *pl, tsr_seq_state s) {
    if (pl->n_seqs == pl->cap_seqs) {
        size_t cap = pl->cap_seqs ? pl->cap_seqs * 2 : 4;
        tsr_seq_state *grown = realloc(pl->seqs, cap * sizeof *grown);
        if (!grown) return false;
        pl->seqs = grown;
        pl->cap_seqs = cap;
    }
    pl->seqs[pl->n_seqs++] = s;
    return true;
}

tsr_status tsr_pipeline_seq_begin(tsr_pipeline *pl, int64_t seq_id, tsr_error *err) {
    if (tsr_pipeline_find_seq(pl, seq_id))
        return tsr_error_set(err, TSR_E_STATE, "sequence %lld is already running", (long long)seq_id);
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = cv->seq_begin(c->self, seq_id);
        if (st < 0) return tsr_instance_failed(c, st, "seq_begin", err);
    }
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_ATTENTION, a) {
        const tsr_attention_vtable *av = a->vtable;
        tsr_status st = TSR_VT_HAS(av, seq_begin) ? av->seq_begin(a->self, seq_id) : TSR_OK;
        if (st < 0) return tsr_instance_failed(a, st, "seq_begin", err);
    }
    if (!tsr_pipeline_add_seq(pl, (tsr_seq_state){.id = seq_id}))
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    return TSR_OK;
}

void tsr_pipeline_seq_end(tsr_pipeline *pl, int64_t seq_id) {
    tsr_seq_state *s = tsr_pipeline_find_seq(pl, seq_id);
    if (!s) return;
    *s = pl->seqs[--pl->n_seqs];
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) ((const tsr_cache_vtable *)c->vtable)->seq_end(c->self, seq_id);
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_ATTENTION, a) {
        const tsr_attention_vtable *av = a->vtable;
        if (TSR_VT_HAS(av, seq_end)) av->seq_end(a->self, seq_id);
    }
}

/* ---- forward --------------------------------------------------------------------------- */

/* Splits the batch into runs of one sequence each, checking every entry: a sequence's
 * positions continue what it holds, one by one (caches rely on it: CONTRACT.md CACHE_7). The
 * first forward of a sequence is its prefill, later ones are decode steps. */
static tsr_status batch_runs(tsr_pipeline *pl, const tsr_batch_entry *entries, int64_t n,
                             tsr_seq_run *runs, size_t cap, size_t *n_runs, tsr_error *err) {
    const tsr_hparams *hp = &pl->model->hp;
    *n_runs = 0;
    for (int64_t i = 0; i < n; i++) {
        const tsr_batch_entry *b = &entries[i];
        if (b->token < 0 || b->token >= hp->n_vocab)
            return tsr_error_set(err, TSR_E_RANGE, "forward: token %d is outside the vocabulary "
                                 "(%d tokens)", b->token, hp->n_vocab);
        if (b->pos < 0 || b->pos >= pl->n_ctx)
            return tsr_error_set(err, TSR_E_RANGE, "forward: position %d is outside the context "
                                 "(%d positions)", b->pos, pl->n_ctx);
        const tsr_seq_state *s = tsr_pipeline_find_seq(pl, b->seq_id);
        if (!s)
            return tsr_error_set(err, TSR_E_STATE, "forward: sequence %lld was not begun",
                                 (long long)b->seq_id);
        bool continues = i > 0 && entries[i - 1].seq_id == b->seq_id;
        int32_t want = continues ? entries[i - 1].pos + 1 : s->n_pos;
        if (b->pos != want)
            return tsr_error_set(err, TSR_E_INVALID, "forward: sequence %lld holds %d positions: "
                                 "its entry %lld must be at position %d, not %d",
                                 (long long)b->seq_id, s->n_pos, (long long)i, want, b->pos);
        if (continues) {
            runs[*n_runs - 1].n++;
            continue;
        }
        for (size_t r = 0; r < *n_runs; r++)
            if (runs[r].seq_id == b->seq_id)
                return tsr_error_set(err, TSR_E_INVALID, "forward: the entries of sequence %lld "
                                     "are not contiguous in the batch", (long long)b->seq_id);
        if (*n_runs == cap)
            return tsr_error_set(err, TSR_E_RANGE, "forward: more than %zu sequences in one "
                                 "batch", cap);
        runs[(*n_runs)++] = (tsr_seq_run){.seq_id = b->seq_id, .first = i, .n = 1,
                                          .phase = s->prefilled ? TSR_PHASE_DECODE
                                                                : TSR_PHASE_PREFILL};
    }
    return TSR_OK;
}

/* The cache policies' end-of-forward hooks: prefill_end after a sequence's first forward,
 * step_end after each later one. */
static tsr_status end_of_forward(tsr_pipeline *pl, const tsr_seq_run *runs, size_t n_runs,
                                 tsr_error *err) {
    tsr_status st = TSR_OK;
    for (size_t r = 0; r < n_runs; r++) {
        tsr_seq_state *s = tsr_pipeline_find_seq(pl, runs[r].seq_id);
        TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
            const tsr_cache_vtable *cv = c->vtable;
            tsr_status (*hook)(void *, int64_t) =
                s->prefilled ? (TSR_VT_HAS(cv, step_end) ? cv->step_end : NULL)
                             : (TSR_VT_HAS(cv, prefill_end) ? cv->prefill_end : NULL);
            if (!hook) continue;
            TSR_TIMED(pl->graph.times.cache, st, hook(c->self, s->id));
            if (st < 0)
                return tsr_instance_failed(c, st, s->prefilled ? "step_end" : "prefill_end", err);
        }
        s->prefilled = true;
        s->n_pos += (int32_t)runs[r].n;
    }
    return st;
}

tsr_status tsr_pipeline_forward(tsr_pipeline *pl, const tsr_batch_entry *entries, int64_t n,
                                float *logits, tsr_error *err) {
    if (n <= 0) return tsr_error_set(err, TSR_E_INVALID, "forward: empty batch");
    tsr_seq_run runs[TSR_GRAPH_MAX_RUNS];
    size_t n_runs;
    tsr_status st = batch_runs(pl, entries, n, runs, sizeof runs / sizeof runs[0], &n_runs, err);
    if (st < 0) return st;
    if ((st = tsr_graph_forward(&pl->graph, entries, n, runs, n_runs, logits, err)) < 0) return st;
    return end_of_forward(pl, runs, n_runs, err);
}

/* ---- hooks ----------------------------------------------------------------------------- */

tsr_status tsr_pipeline_run_hooks(tsr_pipeline *pl, int32_t event, tsr_error *err) {
    for (size_t i = 0; i < pl->cfg->n_hooks; i++) {
        const tsr_hook_conf *h = &pl->cfg->hooks[i];
        if (h->event != event) continue;
        tsr_instance *inst = pl->stage_main[h->stage];
        const tsr_command *cmd = inst ? tsr_command_find(inst->ref->desc, h->command) : NULL;
        if (!cmd)
            return tsr_error_set(err, TSR_E_INVALID, "%s:%d:%d: hooks: the %s plugin has no "
                                 "command '%s'", h->loc.file, h->loc.line, h->loc.col,
                                 tsr_stage_name(h->stage), h->command);
        char ret[1024];
        tsr_error why;
        if (tsr_command_call(cmd, inst->self, (const char *const *)h->args, h->n_args, ret,
                             sizeof ret, &why) < 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s:%d:%d: hooks: %s%s%s", h->loc.file,
                                 h->loc.line, h->loc.col, why.msg,
                                 inst->services.has_error ? ": " : "",
                                 tsr_services_take_error(&inst->services, ""));
        if (*ret) tsr_log(TSR_LOG_INFO, inst->ref->desc->name, "%s -> %s", h->command, ret);
    }
    return TSR_OK;
}

/* ---- statistics ------------------------------------------------------------------------ */

void tsr_pipeline_profile_heads(tsr_pipeline *pl, float *head_mass, int32_t sink,
                                int32_t window) {
    pl->graph.head_mass = head_mass;
    pl->graph.stats_sink = sink;
    pl->graph.stats_window = window;
}

void tsr_pipeline_record_routes(tsr_pipeline *pl, tsr_route_record *rec) {
    pl->graph.route_record = rec;
}

const tsr_stage_times *tsr_pipeline_times(const tsr_pipeline *pl) { return &pl->graph.times; }

const tsr_pipeline *tsr_pipeline_draft(const tsr_pipeline *pl) { return pl->draft; }

int64_t tsr_pipeline_parallel(const tsr_pipeline *pl) {
    const tsr_bound_params *b = &pl->cfg->stage[TSR_STAGE_DECODER].bound;
    int32_t i = tsr_param_find_role(b->params.defs, b->params.count, TSR_PARAM_ROLE_PARALLEL);
    return i >= 0 ? b->values[i].u.i : 1;
}

void tsr_pipeline_weight_quality(const tsr_pipeline *pl, double *bits_per_weight,
                                 double *rel_rmse) {
    const tsr_model_weights *w = &pl->weights;
    *bits_per_weight = w->n_weights > 0 ? w->bits_sum / w->n_weights : 0;
    *rel_rmse = w->n_weights > 0 ? w->rmse_sum / w->n_weights : 0;
}

uint64_t tsr_pipeline_weight_bytes(const tsr_pipeline *pl) {
    return tsr_model_weights_dense_bytes(&pl->weights);
}

int tsr_pipeline_cache_stats(const tsr_pipeline *pl, tsr_cache_stats *sum) {
    *sum = (tsr_cache_stats){.struct_size = sizeof *sum};
    int n = 0, n_silent = 0;
    double bits_entries = 0;
    TSR_FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        if (!TSR_VT_HAS(cv, stats)) continue;
        tsr_cache_stats s = {.struct_size = sizeof s};
        cv->stats(c->self, &s);
        sum->bytes_reserved += s.bytes_reserved;
        sum->bytes_peak += s.bytes_peak;
        sum->entries += s.entries;
        sum->evicted += s.evicted;
        bits_entries += s.bits_per_value * (double)s.entries;
        n_silent += s.bits_per_value <= 0;
        n++;
    }
    /* A policy that does not say (a 1.0 one) makes the mean unknown. */
    if (n > 0 && n_silent == 0 && sum->entries > 0)
        sum->bits_per_value = bits_entries / (double)sum->entries;
    return n;
}

uint64_t tsr_pipeline_kv_bytes(const tsr_pipeline *pl) {
    tsr_cache_stats s;
    tsr_pipeline_cache_stats(pl, &s);
    return s.bytes_reserved;
}
