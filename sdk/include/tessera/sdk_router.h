/*
 * <tessera/sdk_router.h> -- the model's own routing rule, for routers that start from it.
 *
 * A model with experts turns each token's gate logits into probabilities (a softmax over the
 * experts, or a sigmoid of each logit: tsr_router_init.gating), ranks the experts and weights
 * the chosen ones by their probabilities, renormalised to sum 1 when the model is
 * (tsr_router_init.normalize). The arithmetic is llama.cpp's (llm_build_moe_ffn at c392e5094),
 * so that a router choosing the model's k experts through these helpers gives its logits bit
 * for bit: the softmax is tsr_softmax (ggml's soft_max), the sigmoid 1 / (1 + expf(-x)); the
 * experts are ranked by ggml's descending argsort (for each position in turn the later entries
 * are swapped in when strictly more probable, so equal probabilities keep the order that scan
 * leaves); the renormalising sum is taken in double, rounded to f32, each weight divided by it.
 *
 *   tsr_topk_rule rule;
 *   if ((st = tsr_topk_rule_init(&rule, host, init)) < 0) return st;   // in create
 *   tsr_topk_rank(&rule, call->gate_logits + t * n_expert);              // per token
 *   tsr_topk_choose(&rule, call->k, call->k, experts, weights);          // the model's choice
 *
 * Needs the CPU kernels (link Tessera::kernels).
 */
#ifndef TESSERA_SDK_ROUTER_H
#define TESSERA_SDK_ROUTER_H

#include <math.h>

#include <tessera/kernels_cpu.h>
#include <tessera/sdk.h>

typedef struct tsr_topk_rule {
    const tsr_host *host;
    int32_t n_expert, gating, normalize;
    float *probs;   /* (n_expert) the last ranked token's probabilities */
    int32_t *order; /* (n_expert) its experts, most probable first */
} tsr_topk_rule;

/* The model's rule from `init`, with room for one token; refuses (through set_error) what it
 * cannot apply. */
static inline tsr_status tsr_topk_rule_init(tsr_topk_rule *r, const tsr_host *host,
                                            const tsr_router_init *init) {
    *r = (tsr_topk_rule){.host = host, .n_expert = init->n_expert, .gating = init->gating,
                         .normalize = init->normalize != 0};
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
    r->probs = (float *)tsr_calloc(host, (size_t)init->n_expert, sizeof *r->probs);
    r->order = (int32_t *)tsr_calloc(host, (size_t)init->n_expert, sizeof *r->order);
    if (!r->probs || !r->order) {
        host->free(host->ctx, r->probs);
        host->free(host->ctx, r->order);
        host->set_error(host->ctx, "out of memory for %d experts", (int)init->n_expert);
        return TSR_E_NOMEM;
    }
    return TSR_OK;
}

static inline void tsr_topk_rule_free(tsr_topk_rule *r) {
    r->host->free(r->host->ctx, r->order);
    r->host->free(r->host->ctx, r->probs);
}

/* One token's probabilities (r->probs) and its experts ranked, most probable first
 * (r->order), from its gate logits (n_expert). */
static inline void tsr_topk_rank(tsr_topk_rule *r, const float *logits) {
    const int32_t n = r->n_expert;
    if (r->gating == TSR_GATING_SOFTMAX)
        tsr_softmax(r->probs, logits, 1, n, 0, 1);
    else
        for (int32_t e = 0; e < n; e++) r->probs[e] = 1.0f / (1.0f + expf(-logits[e]));
    int32_t *order = r->order;
    for (int32_t i = 0; i < n; i++) order[i] = i;
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = i + 1; j < n; j++)
            if (r->probs[order[i]] < r->probs[order[j]]) {
                int32_t t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
}

/* Fills a token's k slots with the `n_take` most probable experts of the last ranked token
 * (at most n_expert, at most k) weighted by the model's rule as if they were the only ones
 * chosen: their probabilities, renormalised to sum 1 when the model is; -1 and 0 in the rest. */
static inline void tsr_topk_choose(const tsr_topk_rule *r, int32_t n_take, int32_t k,
                                   int32_t *experts, float *weights) {
    const int32_t taken = n_take < r->n_expert ? (n_take < k ? n_take : k) : r->n_expert;
    double sum = 0;
    for (int32_t s = 0; s < k; s++) {
        experts[s] = s < taken ? r->order[s] : -1;
        weights[s] = s < taken ? r->probs[r->order[s]] : 0.0f;
        sum += weights[s];
    }
    if (!r->normalize) return;
    float total = (float)sum;
    for (int32_t s = 0; s < taken; s++) weights[s] /= total;
}

/* What a router reports per layer as a ratio of two counts (experts predicted of those
 * chosen, experts given of tokens routed). */
typedef struct tsr_layer_ratio {
    const tsr_host *host;
    int32_t n_layer;
    uint64_t *num, *den; /* (n_layer) */
} tsr_layer_ratio;

static inline tsr_status tsr_layer_ratio_init(tsr_layer_ratio *r, const tsr_host *host,
                                              int32_t n_layer) {
    *r = (tsr_layer_ratio){.host = host, .n_layer = n_layer};
    r->num = (uint64_t *)tsr_calloc(host, (size_t)n_layer, sizeof *r->num);
    r->den = (uint64_t *)tsr_calloc(host, (size_t)n_layer, sizeof *r->den);
    if (r->num && r->den) return TSR_OK;
    host->free(host->ctx, r->num);
    host->free(host->ctx, r->den);
    host->set_error(host->ctx, "out of memory for %d layers", (int)n_layer);
    return TSR_E_NOMEM;
}

static inline void tsr_layer_ratio_free(tsr_layer_ratio *r) {
    r->host->free(r->host->ctx, r->num);
    r->host->free(r->host->ctx, r->den);
}

/* Adds to `layer`'s counts; a layer outside the model's is not counted. */
static inline void tsr_layer_ratio_add(tsr_layer_ratio *r, int32_t layer, uint64_t num,
                                       uint64_t den) {
    if (layer < 0 || layer >= r->n_layer) return;
    r->num[layer] += num;
    r->den[layer] += den;
}

/* num / den of `layer`, of all layers for -1; 0 while den is 0. The denominator in *den. */
static inline double tsr_layer_ratio_at(const tsr_layer_ratio *r, int32_t layer, uint64_t *den) {
    uint64_t n = 0, d = 0;
    for (int32_t l = 0; l < r->n_layer; l++)
        if (layer < 0 || l == layer) {
            n += r->num[l];
            d += r->den[l];
        }
    if (den) *den = d;
    return d ? (double)n / (double)d : 0.0;
}

#endif /* TESSERA_SDK_ROUTER_H */
