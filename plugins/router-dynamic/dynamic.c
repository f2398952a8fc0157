/*
 * router 'dynamic': a token uses fewer (or, up to the slots the model has, as many) experts
 * as its gate is sure of them, so that easy tokens read fewer experts' weights.
 *
 * threshold (MC-MoE's online dynamic pruning: Huang et al. 2024, "Mixture Compressor for
 *   Mixture-of-Experts LLMs Gains More", arXiv:2410.06270): of the k experts the model's rule
 *   chooses, the ones whose weight renormalised over those k (p_i / sum of the k
 *   probabilities) is below the threshold are dropped; the most probable expert always stays.
 *   Threshold 0 drops nothing: the model's own choice, bit for bit (the default).
 * top_p (top-p routing: Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
 *   in MoE Models", arXiv:2403.07652): the smallest set of the most probable experts whose
 *   probability mass (over all the experts) reaches p, at most max_k of them and never more
 *   than the k slots the host gives a token (max_k 0: k). It needs a softmax gate: a sigmoid
 *   model's probabilities are no distribution, and are refused.
 * max_k caps either rule. The experts kept are weighted by the model's own rule as if they
 * were the only ones chosen: their probabilities, renormalised to sum 1 when the model
 * renormalises (Mixtral), kept as they are otherwise (Qwen-MoE, OLMoE). Empty slots are -1:
 * the host runs nothing for them.
 *
 * The router counts the experts it gives each token, per layer; destroy logs the mean (info,
 * shown by `tessera run -v`), and the commands `mean_experts(layer)` and `stats()` give it.
 */
#include <tessera/sdk_router.h>

typedef struct dynamic {
    const tsr_host *host;
    tsr_topk_rule rule;
    double threshold, top_p;
    int32_t max_k, k;
    tsr_layer_ratio per_token; /* experts given of tokens routed */
} dynamic;

static tsr_status dynamic_create(const tsr_host *host, const tsr_params *params,
                                 const tsr_router_init *init, void **out) {
    const double threshold = tsr_param_float(params, "threshold");
    const double top_p = tsr_param_float(params, "top_p");
    const int64_t max_k = tsr_param_int(params, "max_k");
    if (threshold > 0 && top_p > 0) {
        host->set_error(host->ctx, "threshold %g and top_p %g are two ways to choose: set one "
                        "of them (the other 0)", threshold, top_p);
        return TSR_E_INVALID;
    }
    if (max_k > init->n_expert_used) {
        host->set_error(host->ctx, "max_k %lld is more than the model's %d experts per token "
                        "(the slots a token has)", (long long)max_k, (int)init->n_expert_used);
        return TSR_E_INVALID;
    }
    if (top_p > 0 && init->gating != TSR_GATING_SOFTMAX) {
        host->set_error(host->ctx, "top_p needs softmax gating (a distribution over the "
                        "experts); this model's gate is a sigmoid of each logit");
        return TSR_E_UNSUPPORTED;
    }
    dynamic *d = tsr_calloc(host, 1, sizeof *d);
    if (!d) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_topk_rule_init(&d->rule, host, init);
    if (st < 0) {
        host->free(host->ctx, d);
        return st;
    }
    d->host = host;
    d->threshold = threshold;
    d->top_p = top_p;
    d->k = init->n_expert_used;
    d->max_k = max_k > 0 ? (int32_t)max_k : init->n_expert_used;
    if ((st = tsr_layer_ratio_init(&d->per_token, host, init->n_layer)) < 0) {
        tsr_topk_rule_free(&d->rule);
        host->free(host->ctx, d);
        return st;
    }
    *out = d;
    return TSR_OK;
}

/* Mean experts per token the router gave at `layer` (all layers for -1); 0 before any. */
static double dynamic_mean_experts(void *self, int32_t layer) {
    const dynamic *d = self;
    return tsr_layer_ratio_at(&d->per_token, layer, NULL);
}

static void dynamic_stats(void *self) {
    const dynamic *d = self;
    uint64_t tokens;
    for (int32_t l = 0; l < d->per_token.n_layer; l++)
        if (d->per_token.den[l])
            d->host->log(d->host->ctx, TSR_LOG_INFO,
                         "layer %d: %.4f experts per token (of %d) over %llu tokens", (int)l,
                         dynamic_mean_experts(self, l), (int)d->k,
                         (unsigned long long)d->per_token.den[l]);
    double mean = tsr_layer_ratio_at(&d->per_token, -1, &tokens);
    if (tokens)
        d->host->log(d->host->ctx, TSR_LOG_INFO, "all layers: %.4f experts per token (of %d)",
                     mean, (int)d->k);
}

static void dynamic_destroy(void *self) {
    dynamic *d = self;
    const tsr_host *host = d->host;
    dynamic_stats(d);
    tsr_topk_rule_free(&d->rule);
    tsr_layer_ratio_free(&d->per_token);
    host->free(host->ctx, d);
}

/* How many of the ranked experts the token keeps, of `k` slots. */
static int32_t experts_kept(const dynamic *d, int32_t k) {
    const float *p = d->rule.probs;
    const int32_t *order = d->rule.order;
    const int32_t n = d->rule.n_expert < k ? d->rule.n_expert : k;
    if (d->top_p > 0) {
        const int32_t most = d->max_k < n ? d->max_k : n;
        double mass = 0;
        int32_t kept = 0;
        while (kept < most && mass < d->top_p) mass += p[order[kept++]];
        return kept;
    }
    double sum = 0;
    for (int32_t s = 0; s < n; s++) sum += p[order[s]];
    int32_t kept = 1;
    while (kept < n && p[order[kept]] / sum >= d->threshold) kept++;
    return kept < d->max_k ? kept : d->max_k;
}

static tsr_status dynamic_route(void *self, const tsr_route_call *call) {
    dynamic *d = self;
    const int32_t k = call->k;
    for (int64_t t = 0; t < call->n_tok; t++) {
        tsr_topk_rank(&d->rule, call->gate_logits + t * d->rule.n_expert);
        int32_t kept = experts_kept(d, k);
        tsr_topk_choose(&d->rule, kept, k, call->experts + t * k, call->weights + t * k);
        tsr_layer_ratio_add(&d->per_token, call->layer, (uint64_t)kept, 1);
    }
    return TSR_OK;
}

static const tsr_param_def dynamic_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "threshold", .type = TSR_PARAM_FLOAT,
     .default_value = "0", .min = 0, .max = 1,
     .doc = "drop chosen experts whose weight renormalised over the k chosen is below it "
            "(MC-MoE; the top expert stays; 0: the model's choice)"},
    {TSR_SIZED(tsr_param_def), .name = "top_p", .type = TSR_PARAM_FLOAT, .default_value = "0",
     .min = 0, .max = 1,
     .doc = "instead: the fewest most probable experts whose probability mass reaches it "
            "(top-p routing; 0: off)"},
    {TSR_SIZED(tsr_param_def), .name = "max_k", .type = TSR_PARAM_INT, .default_value = "0",
     .min = 0, .max = 1 << 16, .unit = "experts",
     .doc = "at most this many experts per token (0: the model's k, its slots)"},
};

static const tsr_command dynamic_commands[] = {
    {TSR_SIZED(tsr_command), .name = "mean_experts", .signature = "d(Ii)",
     .fn = (void (*)(void))dynamic_mean_experts,
     .doc = "mean_experts(layer): experts per token given at the layer (-1: all layers)"},
    {TSR_SIZED(tsr_command), .name = "stats", .signature = "v(I)",
     .fn = (void (*)(void))dynamic_stats,
     .doc = "stats(): logs each layer's mean experts per token (info)"},
};

static const tsr_router_vtable dynamic_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = dynamic_create,
    .destroy = dynamic_destroy,
    .route = dynamic_route,
};

static const tsr_plugin_desc dynamic_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = "dynamic",
    .version = "1.0",
    .description = "fewer experts for tokens the gate is sure of: MC-MoE's dynamic pruning "
                   "(threshold) or top-p routing; threshold 0 is the model's choice",
    TSR_PARAMS(dynamic_params),
    TSR_COMMANDS(dynamic_commands),
    .vtable = &dynamic_vtable,
};

TSR_PLUGIN_EXPORT(&dynamic_desc)
