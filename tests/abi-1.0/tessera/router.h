/*
 * <tessera/router.h> -- router stage: which experts (or layers) a token goes through.
 *
 * At each mixture-of-experts layer the host computes the gate logits (the model's
 * ffn_gate_inp product) and calls `route`, which chooses up to k experts per token and their
 * mixing weights. A router sees the hidden state and the previous layer's choices, so
 * pre-gating, expert pruning and offloading fit here.
 */
#ifndef TESSERA_ROUTER_H
#define TESSERA_ROUTER_H

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_ROUTER_ABI_MAJOR 1
#define TSR_ROUTER_ABI_MINOR 0

typedef struct tsr_router_init {
    uint32_t struct_size;
    int32_t n_layer;
    int32_t n_expert;
    int32_t n_expert_used; /* k the model was trained with */
    int32_t n_embd;
} tsr_router_init;

typedef struct tsr_route_call {
    uint32_t struct_size;
    int32_t layer;
    int64_t n_tok;
    const float *gate_logits;     /* (n_tok, n_expert), host memory */
    const float *hidden;          /* (n_tok, n_embd), the FFN input, host memory */
    const int32_t *prev_experts;  /* (n_tok, k) the previous MoE layer's choices, or NULL */
    int32_t k;                    /* slots per token in experts/weights */
    int32_t *experts;             /* out (n_tok, k): expert ids; -1 leaves a slot empty */
    float *weights;               /* out (n_tok, k): mixing weights */
} tsr_route_call;

typedef struct tsr_router_vtable {
    uint32_t struct_size;

    /* [main] */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_router_init *init, void **out);
    void (*destroy)(void *self);

    /* [main] */
    tsr_status (*route)(void *self, const tsr_route_call *call);
} tsr_router_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_ROUTER_H */
