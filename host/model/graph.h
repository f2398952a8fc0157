/* The forward pass of a llama-family model over the stage plugins: the backend's ops, the
 * prepared weights' products, at each layer the cache policy and attention of that layer, and
 * at each layer with experts its router. What to compute lives here; how is the plugins'. */
#ifndef TSR_HOST_GRAPH_H
#define TSR_HOST_GRAPH_H

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/decoder.h>
#include <tessera/router.h>

#include "base/clock.h"
#include "base/error.h"
#include "model/model.h"
#include "model/weights.h"
#include "plugin/loader.h"

/* Time spent in each stage's calls, in nanoseconds, since creation; and the bytes of the
 * experts' matrices the products read (each expert once per forward that routes a token to
 * it; a router's substitute matrices in its stead). */
typedef struct tsr_stage_times {
    uint64_t matmul, attention, cache, decoder, other_ops, router;
    uint64_t forward_calls, tokens;
    uint64_t expert_bytes;
} tsr_stage_times;

/* Runs `call`, storing its status in `st` and adding its time to `acc`. */
#define TSR_TIMED(acc, st, call)              \
    do {                                      \
        uint64_t tsr_t0_ = tsr_clock_ns();    \
        (st) = (call);                        \
        (acc) += tsr_clock_ns() - tsr_t0_;    \
    } while (0)

/* Sequences one forward holds at most. */
#define TSR_GRAPH_MAX_RUNS 64

/* Consecutive entries of one sequence in a batch, and the phase they run in. */
typedef struct tsr_seq_run {
    int64_t seq_id;
    int64_t first, n; /* entries [first, first + n) */
    int32_t phase;    /* tsr_phase */
} tsr_seq_run;

/* What the routers chose, for `tessera experts`: per layer with experts, how many slots each
 * expert filled and the sum of their weights, over how many tokens. Host memory, the caller's;
 * the graph adds to it. */
typedef struct tsr_route_record {
    uint64_t *slots;    /* (n_layer, n_expert) */
    double *weight_sum; /* (n_layer, n_expert) */
    uint64_t *tokens;   /* (n_layer) tokens routed */
} tsr_route_record;

typedef struct tsr_graph {
    const tsr_model *model;
    const tsr_model_weights *weights;
    tsr_instance *backend;
    int32_t memory_space;              /* the backend's (tsr_memory_space) */
    tsr_instance *const *attention_at; /* (n_layer) */
    tsr_instance *const *cache_at;     /* (n_layer) */
    tsr_instance *const *quantizer_at; /* (n_layer): multiplies a router's substitutes it owns */
    tsr_instance *const *router_at;    /* (n_layer) for a model with experts */
    const int32_t *router_needs;       /* (n_layer): what each asked for (TSR_ROUTER_NEEDS_*) */
    const bool *skip_layer;            /* (n_layer) blocks the forward leaves out (a self-draft
                                          skipping layers), or NULL: none */
    tsr_stage_times times;

    /* Activations in the backend's memory, sized for `cap` rows; grown on demand. */
    int64_t cap;
    float *x, *xn, *q, *k, *v, *attn, *gate, *up, *logits;
    int32_t *ids, *pos;               /* host memory: the cache and attention read positions */
    int32_t *ids_dev, *pos_dev;       /* their copies in the backend's memory, or the same */
    tsr_kv_view *views;        /* (TSR_GRAPH_MAX_RUNS, n_kv_head) */
    tsr_kv_view_ext *views_ext; /* (TSR_GRAPH_MAX_RUNS, n_kv_head) */

    /* Layers with experts, K = k + 1 slots per token with a shared expert, else k. Arrays the
     * host fills or reads have a host copy (`_host`), the same pointer when the backend
     * computes on host memory. */
    float *moe_logits, *moe_logits_host; /* (cap, n_expert) gate logits */
    float *moe_next, *moe_next_host;     /* (cap, n_expert) the next layer's, for the router */
    float *moe_hidden_host;              /* (cap, n_embd) the FFN input, for the router */
    float *moe_x, *moe_y;                /* (cap, n_embd) an expert's rows in and out */
    float *moe_stage;                    /* (cap, K, n_embd) each token's rows, slot by slot */
    float *moe_w, *moe_w_host;           /* (cap, K) mixing weights */
    float *moe_s, *moe_s_host;           /* (cap) the shared expert's gate input */
    int32_t *moe_rows, *moe_rows_host;   /* (2 * cap * k + cap) copy_rows index lists */
    int32_t *route_experts, *route_prev; /* (cap, k) this layer's choices, the previous one's */
    float *route_weights;                /* (cap, k) */
    const tsr_tensor **route_sub;        /* (cap, k, 3) */
    bool *route_done;                    /* (cap, k) slots grouped */
    bool route_prev_valid;               /* route_prev holds this forward's previous layer's */
    struct tsr_moe_group *moe_groups;    /* (cap * k) tokens grouped by expert */
    void *sub_buf;                       /* a substitute matrix uploaded, for own memory */
    size_t sub_cap;

    /* Per query head attention statistics (tessera profile-heads): when head_mass is set,
     * attention adds to head_mass[l * n_head + h] the probability head h of layer l puts
     * outside the first stats_sink positions and the last stats_window (attention.h). */
    float *head_mass;
    int32_t stats_sink, stats_window;

    /* When set, every layer's final choice (after the router and the host's checks) is added
     * to it. */
    tsr_route_record *route_record;
} tsr_graph;

/* Runs the model on `n` entries, grouped in `runs` (checked by the caller: tokens in the
 * vocabulary, positions in the context, each sequence's entries contiguous), and writes the
 * logits of the entries with want_logits, in order, to `logits` (n_want, n_vocab) in host
 * memory. Stops with an error naming the layer when the hidden state turns NaN or infinite
 * (checked after every layer when the backend computes in host memory; in the logits
 * otherwise): a broken model must not print garbage.
 *
 * A layer with experts: the router's gate logits (ffn_gate_inp's product) and the FFN input
 * go to host memory, the layer's router chooses (its output checked: experts in range and
 * distinct per token, finite weights, substitutes whole and shaped as the expert's), then the
 * tokens are grouped by expert so that each chosen expert's matrices are read once: its rows
 * gathered (copy_rows), multiplied, scattered into the staging rows of their token and slot
 * (copy_rows), and each token's rows mixed with its weights in slot order (weighted_sum).
 * The shared expert, when the model has one, is one more slot of every token, weighted by
 * its gate (silu(s) / s, as llama.cpp computes the sigmoid). */
tsr_status tsr_graph_forward(tsr_graph *g, const tsr_batch_entry *entries, int64_t n,
                             const tsr_seq_run *runs, size_t n_runs, float *logits,
                             tsr_error *err);

/* Frees the activation buffers (the graph borrows everything else). */
void tsr_graph_free(tsr_graph *g);

#endif
