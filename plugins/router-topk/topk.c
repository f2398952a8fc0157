/*
 * router 'topk': every token goes to the k experts its gate ranks highest, weighted as the
 * model was trained to weight them. This is the top-k gating of GShard (Lepikhin et al. 2020,
 * arXiv:2006.16668) and the Switch Transformer (Fedus et al. 2021, arXiv:2101.03961; k = 1),
 * as Mixtral (Jiang et al. 2024, arXiv:2401.04088) and its successors use it: probabilities
 * from the gate logits (a softmax over the experts, or a sigmoid of each logit), the k most
 * probable experts, their probabilities as weights, renormalised to sum 1 when the model does
 * so (Mixtral) and kept as they are otherwise (Qwen-MoE, OLMoE). The rule comes from the model
 * (tsr_router_init.gating, .normalize), k from the host's call (the model's n_expert_used).
 *
 * The rule and its arithmetic (llama.cpp's, so that logits match its bit for bit) are
 * <tessera/sdk_router.h>'s, which routers that start from the model's choice share.
 */
#include <tessera/sdk_router.h>

static tsr_status topk_create(const tsr_host *host, const tsr_params *params,
                              const tsr_router_init *init, void **out) {
    (void)params;
    tsr_topk_rule *r = tsr_calloc(host, 1, sizeof *r);
    if (!r) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_topk_rule_init(r, host, init);
    if (st < 0) {
        host->free(host->ctx, r);
        return st;
    }
    *out = r;
    return TSR_OK;
}

static void topk_destroy(void *self) {
    tsr_topk_rule *r = self;
    const tsr_host *host = r->host;
    tsr_topk_rule_free(r);
    host->free(host->ctx, r);
}

static tsr_status topk_route(void *self, const tsr_route_call *call) {
    tsr_topk_rule *r = self;
    for (int64_t t = 0; t < call->n_tok; t++) {
        tsr_topk_rank(r, call->gate_logits + t * r->n_expert);
        tsr_topk_choose(r, call->k, call->k, call->experts + t * call->k,
                        call->weights + t * call->k);
    }
    return TSR_OK;
}

static const tsr_router_vtable topk_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = topk_create,
    .destroy = topk_destroy,
    .route = topk_route,
};

static const tsr_plugin_desc topk_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = "topk",
    .version = "1.0",
    .description = "the model's own routing: the k most probable experts (softmax or sigmoid "
                   "gating, renormalised when the model is), as llama.cpp computes it",
    .vtable = &topk_vtable,
};

TSR_PLUGIN_EXPORT(&topk_desc)
