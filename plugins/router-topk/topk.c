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
 * The arithmetic is llama.cpp's (llm_build_moe_ffn at c392e5094), so that logits match its
 * bit for bit: the softmax is tsr_softmax (ggml's soft_max: its vector exp on chunks of 16,
 * libm's expf on the rest), the sigmoid 1 / (1 + expf(-x)); the experts are ranked by ggml's
 * argsort (descending): for each position in turn the later entries are scanned and swapped in
 * when strictly more probable, so equal probabilities keep the order that scan leaves; the
 * renormalising sum is taken in double and rounded to f32, each weight divided by it.
 */
#include <math.h>

#include <tessera/kernels_cpu.h>
#include <tessera/sdk.h>

typedef struct topk {
    const tsr_host *host;
    int32_t n_expert, gating, normalize;
    float *probs;   /* (n_expert) one token's probabilities */
    int32_t *order; /* (n_expert) experts, most probable first */
} topk;

static tsr_status topk_create(const tsr_host *host, const tsr_params *params,
                              const tsr_router_init *init, void **out) {
    (void)params;
    if (init->n_expert < 1 || init->n_expert_used < 1 || init->n_expert_used > init->n_expert) {
        host->set_error(host->ctx, "%d experts, %d used: expected at least one expert and 1 to "
                        "n_expert used", (int)init->n_expert, (int)init->n_expert_used);
        return TSR_E_INVALID;
    }
    if (init->gating != TSR_GATING_SOFTMAX && init->gating != TSR_GATING_SIGMOID) {
        host->set_error(host->ctx, "gating %d is neither softmax (%d) nor sigmoid (%d)",
                        (int)init->gating, TSR_GATING_SOFTMAX, TSR_GATING_SIGMOID);
        return TSR_E_UNSUPPORTED;
    }
    topk *r = tsr_calloc(host, 1, sizeof *r);
    if (r) r->probs = tsr_calloc(host, (size_t)init->n_expert, sizeof *r->probs);
    if (r && r->probs) r->order = tsr_calloc(host, (size_t)init->n_expert, sizeof *r->order);
    if (!r || !r->order) {
        if (r) host->free(host->ctx, r->probs);
        host->free(host->ctx, r);
        host->set_error(host->ctx, "out of memory for %d experts", (int)init->n_expert);
        return TSR_E_NOMEM;
    }
    r->host = host;
    r->n_expert = init->n_expert;
    r->gating = init->gating;
    r->normalize = init->normalize != 0;
    *out = r;
    return TSR_OK;
}

static void topk_destroy(void *self) {
    topk *r = self;
    r->host->free(r->host->ctx, r->order);
    r->host->free(r->host->ctx, r->probs);
    r->host->free(r->host->ctx, r);
}

/* ggml's argsort, descending, as its CPU backend sorts (compute_forward_argsort_f32). */
static void rank_experts(int32_t *order, const float *p, int32_t n) {
    for (int32_t i = 0; i < n; i++) order[i] = i;
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = i + 1; j < n; j++)
            if (p[order[i]] < p[order[j]]) {
                int32_t t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
}

static tsr_status topk_route(void *self, const tsr_route_call *call) {
    topk *r = self;
    const int32_t n = r->n_expert, k = call->k, taken = k < n ? k : n;
    for (int64_t t = 0; t < call->n_tok; t++) {
        const float *logits = call->gate_logits + t * n;
        int32_t *experts = call->experts + t * k;
        float *w = call->weights + t * k;
        if (r->gating == TSR_GATING_SOFTMAX)
            tsr_softmax(r->probs, logits, 1, n, 0, 1);
        else
            for (int32_t e = 0; e < n; e++) r->probs[e] = 1.0f / (1.0f + expf(-logits[e]));
        rank_experts(r->order, r->probs, n);
        double sum = 0;
        for (int32_t s = 0; s < k; s++) {
            experts[s] = s < taken ? r->order[s] : -1;
            w[s] = s < taken ? r->probs[r->order[s]] : 0.0f;
            sum += w[s];
        }
        if (!r->normalize) continue;
        float total = (float)sum;
        for (int32_t s = 0; s < taken; s++) w[s] /= total;
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
