/*
 * <tessera/router.h> -- router stage: which experts (or layers) a token goes through.
 *
 * At each mixture-of-experts layer the host computes the gate logits (the model's
 * ffn_gate_inp product) and calls `route`, which chooses up to k experts per token and their
 * mixing weights. A router sees the hidden state and the previous layer's choices, so
 * pre-gating, expert pruning and offloading fit here. Since 1.1 it also learns the model's own
 * rule (gating, normalisation), may ask for the next layer's gate logits one layer early, may
 * move experts' weights in and out of memory through the host (tsr_expert_access), and may
 * have a token use a copy of an expert's weights of its own (a low-bit one) instead.
 */
#ifndef TESSERA_ROUTER_H
#define TESSERA_ROUTER_H

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_ROUTER_ABI_MAJOR 1
#define TSR_ROUTER_ABI_MINOR 1

/* since 1.1: how the model turns gate logits into probabilities. */
typedef enum tsr_gating {
    TSR_GATING_SOFTMAX = 0, /* softmax over the experts (Mixtral, Qwen-MoE, OLMoE) */
    TSR_GATING_SIGMOID = 1  /* sigmoid of each logit (DeepSeek V3) */
} tsr_gating;

/* since 1.1: the host's hold on the experts' weights, for routers that prefetch, keep a budget
 * of experts in memory, or make copies of their own. Experts are those of layers with experts;
 * `layer` is the block index. Meaningful for weights kept in place in a file mapping (a backend
 * computing on host memory); for others `resident` is every byte and `load`/`evict` do
 * nothing. Valid for the router's life. */
typedef struct tsr_expert_access {
    uint32_t struct_size;
    void *ctx;
    /* [any] Bytes of expert `e` of `layer`: its gate, up and down matrices as prepared. */
    uint64_t (*bytes)(void *ctx, int32_t layer, int32_t e);
    /* [any] Starts reading the expert into memory and returns at once (the pages are read on a
     * thread of the host's, not the pool's). */
    void (*prefetch)(void *ctx, int32_t layer, int32_t e);
    /* [main] Bytes of the expert in memory now (page residency). */
    uint64_t (*resident)(void *ctx, int32_t layer, int32_t e);
    /* [main] Reads the expert into memory, waiting; returns the bytes that had to be read from
     * storage (0 when it was resident). */
    uint64_t (*load)(void *ctx, int32_t layer, int32_t e);
    /* [main] Lets its memory go: a later use reads it from the file again. */
    void (*evict)(void *ctx, int32_t layer, int32_t e);
    /* [main] Its three matrices as prepared, host memory, borrowed for the router's life: gate
     * and up (ne {n_embd, n_ff_expert}), down (ne {n_ff_expert, n_embd}). For a router that
     * makes copies of its own (a low-bit one it hands back through tsr_route_call.substitute). */
    tsr_status (*matrices)(void *ctx, int32_t layer, int32_t e, tsr_tensor *gate,
                           tsr_tensor *up, tsr_tensor *down);
} tsr_expert_access;

typedef struct tsr_router_init {
    uint32_t struct_size;
    int32_t n_layer;
    int32_t n_expert;
    int32_t n_expert_used; /* k the model was trained with */
    int32_t n_embd;
    int32_t gating;        /* since 1.1: tsr_gating, the model's */
    int32_t normalize;     /* since 1.1: 1 when the model renormalises the k chosen weights to sum
                              1 (Mixtral), 0 when it uses the probabilities as they are */
    int32_t n_ff_expert;   /* since 1.1: rows of each expert's gate and up matrices */
    const tsr_expert_access *experts; /* since 1.1; NULL when no model is loaded (validation,
                                         conformance runs) */
} tsr_router_init;

/* since 1.1: what a router asks of the host, from tsr_router_vtable.needs. */
enum {
    TSR_ROUTER_NEEDS_NEXT_GATE = 1 /* tsr_route_call.next_gate_logits */
};

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
    /* since 1.1: the next layer with experts' gate logits for the same `hidden` (n_tok,
     * n_expert), when needs() asked for them and such a layer follows, else NULL: what
     * pre-gating predicts from one layer early. */
    const float *next_gate_logits;
    int32_t next_layer;           /* since 1.1: that layer, or -1 */
    /* out (n_tok, k, 3), since 1.1, cleared to NULL by the host: for slot s of token t,
     * substitute[(t*k + s)*3 + m] for m = 0, 1, 2 (gate, up, down, shaped as
     * tsr_expert_access.matrices gives them) are NULL to use the expert's own weights, or
     * matrices the router owns and keeps valid until its next call, to use instead (a low-bit
     * copy of the expert). All three or none. */
    const tsr_tensor **substitute;
} tsr_route_call;

typedef struct tsr_router_vtable {
    uint32_t struct_size;

    /* [main] */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_router_init *init, void **out);
    void (*destroy)(void *self);

    /* [main] */
    tsr_status (*route)(void *self, const tsr_route_call *call);

    /* [main] Optional (since 1.1; NULL: nothing). TSR_ROUTER_NEEDS_* flags, asked once after
     * create. */
    int32_t (*needs)(void *self);
} tsr_router_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_ROUTER_H */
