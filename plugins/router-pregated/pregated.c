/*
 * router 'pregated': predicts each token's experts one layer early. Pre-gated MoE (Hwang et
 * al., ISCA 2024, arXiv:2308.12066) trains a pre-gate in block l that selects block l+1's
 * experts from block l's input, so that those experts' weights can be moved while block l
 * computes; the training-free form that expert-prefetching systems use applies layer l+1's
 * own gate to layer l's hidden state instead. The host gives that product
 * (TSR_ROUTER_NEEDS_NEXT_GATE: next_gate_logits, the next layer's router matrix times this
 * layer's FFN input), and the prediction is the model's top-k rule applied to it.
 *
 * mode prefetch (the default, lossless): every layer routes by its own gate exactly as 'topk'
 *   (<tessera/sdk_router.h>); the prediction only asks the host to start reading the
 *   predicted experts of the next layer that are not wholly in memory
 *   (tsr_expert_access.resident, then .prefetch, read on a thread of the host's), so that
 *   their pages are in memory when that layer needs them.
 * mode compute (the paper's): the predicted experts, weighted as the next gate weights them,
 *   ARE the ones the next layer uses; a layer routes by its own gate only when nothing
 *   predicted it (the first layer with experts, or the next layer of a forward that left
 *   layers out). The predicted experts are prefetched too.
 *
 * Either way the router counts, per layer, how many of the slots the model's own rule fills
 * the prediction made one layer early had chosen (the hit rate); destroy logs them (info,
 * shown by `tessera run -v`) and the commands `hit_rate(layer)` and `stats()` give them.
 */
#include <stdbool.h>

#include <tessera/sdk_router.h>

enum pregated_mode { MODE_PREFETCH, MODE_COMPUTE };
static const char *const pregated_modes[] = {"prefetch", "compute", NULL};

typedef struct pregated {
    const tsr_host *host;
    const tsr_expert_access *experts; /* NULL without a model */
    tsr_topk_rule rule;
    int32_t mode;
    /* The prediction made by the last call for layer pred_layer (-1: none), (pred_tok, k). */
    int32_t pred_layer, pred_k;
    int64_t pred_tok, cap;
    int32_t *pred_experts, *own;
    float *pred_weights, *own_weights;
    bool *asked; /* (n_expert) experts of the next layer already prefetched by this call */
    tsr_layer_ratio hits; /* chosen experts predicted, of those chosen */
} pregated;

static void pregated_destroy(void *self);

static tsr_status pregated_create(const tsr_host *host, const tsr_params *params,
                                  const tsr_router_init *init, void **out) {
    pregated *p = tsr_calloc(host, 1, sizeof *p);
    if (!p) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_topk_rule_init(&p->rule, host, init);
    if (st < 0) {
        host->free(host->ctx, p);
        return st;
    }
    p->host = host;
    p->experts = init->experts;
    p->mode = (int32_t)tsr_param_int(params, "mode");
    p->pred_layer = -1;
    if ((st = tsr_layer_ratio_init(&p->hits, host, init->n_layer)) < 0) {
        tsr_topk_rule_free(&p->rule);
        host->free(host->ctx, p);
        return st;
    }
    p->asked = tsr_calloc(host, (size_t)init->n_expert, sizeof *p->asked);
    if (!p->asked) {
        pregated_destroy(p);
        host->set_error(host->ctx, "out of memory for %d experts", (int)init->n_expert);
        return TSR_E_NOMEM;
    }
    *out = p;
    return TSR_OK;
}

/* The fraction of layer's chosen experts (all layers' for -1) its prediction had chosen; 0
 * before any prediction was checked. */
static double pregated_hit_rate(void *self, int32_t layer) {
    const pregated *p = self;
    return tsr_layer_ratio_at(&p->hits, layer, NULL);
}

static void pregated_stats(void *self) {
    const pregated *p = self;
    uint64_t chosen;
    for (int32_t l = 0; l < p->hits.n_layer; l++)
        if (p->hits.den[l])
            p->host->log(p->host->ctx, TSR_LOG_INFO,
                         "layer %d: the prediction one layer early had %llu of the %llu "
                         "experts chosen (hit rate %.4f)",
                         (int)l, (unsigned long long)p->hits.num[l],
                         (unsigned long long)p->hits.den[l], pregated_hit_rate(self, l));
    double rate = tsr_layer_ratio_at(&p->hits, -1, &chosen);
    if (chosen) p->host->log(p->host->ctx, TSR_LOG_INFO, "all layers: hit rate %.4f", rate);
}

static void pregated_destroy(void *self) {
    pregated *p = self;
    const tsr_host *host = p->host;
    pregated_stats(p);
    tsr_topk_rule_free(&p->rule);
    tsr_layer_ratio_free(&p->hits);
    host->free(host->ctx, p->pred_experts);
    host->free(host->ctx, p->pred_weights);
    host->free(host->ctx, p->own);
    host->free(host->ctx, p->own_weights);
    host->free(host->ctx, p->asked);
    host->free(host->ctx, p);
}

static int32_t pregated_needs(void *self) {
    (void)self;
    return TSR_ROUTER_NEEDS_NEXT_GATE;
}

/* Room for n slots in each of the per-slot arrays. */
static tsr_status reserve(pregated *p, int64_t n) {
    if (n <= p->cap) return TSR_OK;
    const tsr_host *h = p->host;
    int32_t *pe = tsr_calloc(h, (size_t)n, sizeof *pe);
    int32_t *own = tsr_calloc(h, (size_t)n, sizeof *own);
    float *pw = tsr_calloc(h, (size_t)n, sizeof *pw), *ow = tsr_calloc(h, (size_t)n, sizeof *ow);
    if (!pe || !own || !pw || !ow) {
        h->free(h->ctx, pe);
        h->free(h->ctx, own);
        h->free(h->ctx, pw);
        h->free(h->ctx, ow);
        h->set_error(h->ctx, "out of memory for %lld expert slots", (long long)n);
        return TSR_E_NOMEM;
    }
    h->free(h->ctx, p->pred_experts);
    h->free(h->ctx, p->own);
    h->free(h->ctx, p->pred_weights);
    h->free(h->ctx, p->own_weights);
    p->pred_experts = pe;
    p->own = own;
    p->pred_weights = pw;
    p->own_weights = ow;
    p->cap = n;
    p->pred_layer = -1;
    return TSR_OK;
}

/* Slots of `chosen` (k) whose expert `predicted` (k) also holds. */
static uint64_t overlap(const int32_t *chosen, const int32_t *predicted, int32_t k) {
    uint64_t n = 0;
    for (int32_t s = 0; s < k; s++)
        for (int32_t j = 0; chosen[s] >= 0 && j < k; j++) n += predicted[j] == chosen[s];
    return n;
}

/* Has the host start reading an expert that is not wholly in memory: reading one that is
 * would only take memory bandwidth from the products (a prefill predicts most experts). */
static void prefetch_missing(const tsr_expert_access *x, int32_t layer, int32_t e) {
    if (x->resident(x->ctx, layer, e) < x->bytes(x->ctx, layer, e)) x->prefetch(x->ctx, layer, e);
}

static tsr_status pregated_route(void *self, const tsr_route_call *call) {
    pregated *p = self;
    const int32_t k = call->k, n_expert = p->rule.n_expert;
    const int64_t n_slots = call->n_tok * k;
    tsr_status st = reserve(p, n_slots);
    if (st < 0) return st;
    const bool predicted = p->pred_layer == call->layer && p->pred_tok == call->n_tok &&
                           p->pred_k == k;
    for (int64_t t = 0; t < call->n_tok; t++) {
        tsr_topk_rank(&p->rule, call->gate_logits + t * n_expert);
        tsr_topk_choose(&p->rule, k, k, p->own + t * k, p->own_weights + t * k);
        if (!predicted) continue;
        uint64_t chosen = 0;
        for (int32_t s = 0; s < k; s++) chosen += p->own[t * k + s] >= 0;
        tsr_layer_ratio_add(&p->hits, call->layer,
                            overlap(p->own + t * k, p->pred_experts + t * k, k), chosen);
    }
    const bool use_prediction = predicted && p->mode == MODE_COMPUTE;
    memcpy(call->experts, use_prediction ? p->pred_experts : p->own,
           (size_t)n_slots * sizeof *call->experts);
    memcpy(call->weights, use_prediction ? p->pred_weights : p->own_weights,
           (size_t)n_slots * sizeof *call->weights);

    p->pred_layer = -1;
    if (!call->next_gate_logits || call->next_layer < 0) return TSR_OK;
    memset(p->asked, 0, (size_t)n_expert * sizeof *p->asked);
    for (int64_t t = 0; t < call->n_tok; t++) {
        int32_t *pe = p->pred_experts + t * k;
        tsr_topk_rank(&p->rule, call->next_gate_logits + t * n_expert);
        tsr_topk_choose(&p->rule, k, k, pe, p->pred_weights + t * k);
        for (int32_t s = 0; s < k && p->experts; s++)
            if (pe[s] >= 0 && !p->asked[pe[s]]) {
                p->asked[pe[s]] = true;
                prefetch_missing(p->experts, call->next_layer, pe[s]);
            }
    }
    p->pred_layer = call->next_layer;
    p->pred_tok = call->n_tok;
    p->pred_k = k;
    return TSR_OK;
}

static const tsr_param_def pregated_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "mode", .type = TSR_PARAM_ENUM,
     .default_value = "prefetch", .choices = pregated_modes,
     .doc = "prefetch: route as topk and read the predicted experts of the next layer ahead "
            "(lossless); compute: the next layer uses the predicted experts (Pre-gated MoE)"},
};

static const tsr_command pregated_commands[] = {
    {TSR_SIZED(tsr_command), .name = "hit_rate", .signature = "d(Ii)",
     .fn = (void (*)(void))pregated_hit_rate,
     .doc = "hit_rate(layer): fraction of the layer's chosen experts predicted one layer "
            "early (-1: all layers)"},
    {TSR_SIZED(tsr_command), .name = "stats", .signature = "v(I)",
     .fn = (void (*)(void))pregated_stats,
     .doc = "stats(): logs each layer's prediction hit rate (info)"},
};

static const tsr_router_vtable pregated_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = pregated_create,
    .destroy = pregated_destroy,
    .route = pregated_route,
    .needs = pregated_needs,
};

static const tsr_plugin_desc pregated_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = "pregated",
    .version = "1.0",
    .description = "Pre-gated MoE: the next layer's gate on this layer's hidden state predicts "
                   "its experts one layer early, to prefetch them (lossless) or to use them",
    TSR_PARAMS(pregated_params),
    TSR_COMMANDS(pregated_commands),
    .vtable = &pregated_vtable,
};

TSR_PLUGIN_EXPORT(&pregated_desc)
