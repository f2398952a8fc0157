/*
 * <tessera/attention.h> -- attention stage: how a layer's queries read the KV cache.
 *
 * For each layer and each sequence in a forward batch, the host stores the new K/V in the
 * cache policy, asks it for one tsr_kv_view per KV head, and calls `forward` with the
 * queries. Attention must honour causality by position (an entry is visible to a query when
 * entry pos <= query pos), may read only what the views expose, and reports attention
 * probabilities into views[h].score_acc when the policy asked for them.
 */
#ifndef TESSERA_ATTENTION_H
#define TESSERA_ATTENTION_H

#include <tessera/cache.h>
#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_ATTENTION_ABI_MAJOR 1
#define TSR_ATTENTION_ABI_MINOR 1

typedef struct tsr_attention_init {
    uint32_t struct_size;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_kv_head;
    int32_t head_dim;
    int32_t n_ctx;
    const char *backend_name; /* the running backend's name; NULL when none runs */
    int32_t memory_space;     /* tsr_memory_space of q and out (the backend's buffers) */
} tsr_attention_init;

typedef struct tsr_attention_call {
    uint32_t struct_size;
    int64_t seq_id;
    int32_t layer;
    int32_t phase;             /* tsr_phase */
    int64_t n_q;               /* queries (tokens) */
    const float *q;            /* (n_q, n_head, head_dim), RoPE applied; the backend's memory */
    const int32_t *q_pos;      /* (n_q), host memory */
    float scale;               /* usually 1/sqrt(head_dim) */
    const tsr_kv_view *views;  /* (n_kv_head); query head h reads views[h / (n_head/n_kv_head)] */
    float *out;                /* (n_q, n_head, head_dim), the backend's memory, written
                                  entirely; zeros for a query that sees no entry */
    /* since 1.1, optional (NULL: none asked): per query head statistics, host memory, for
     * profiling heads (tessera profile-heads). head_mass[h] += the attention probability query
     * head h puts on entries outside the sinks and the window, summed over the call's queries:
     * an entry at position p is inside when p < stats_sink or p > q_pos - stats_window. */
    float *head_mass;            /* (n_head) */
    int32_t stats_sink, stats_window;
    /* since 1.1: the views' extensions (n_kv_head, parallel to views), or NULL when the
     * policy gave none (it has no view_ext). */
    const tsr_kv_view_ext *views_ext;
} tsr_attention_call;

typedef struct tsr_attention_vtable {
    uint32_t struct_size;

    /* [main] */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_attention_init *init, void **out);
    void (*destroy)(void *self);

    /* [main] Computes one layer's attention for one sequence. May use parallel_for. */
    tsr_status (*forward)(void *self, const tsr_attention_call *call);

    /* [main] Optional: per-request state (page statistics for Quest-like selection). */
    tsr_status (*seq_begin)(void *self, int64_t seq_id);
    void (*seq_end)(void *self, int64_t seq_id);

    /* [main] Optional (since 1.1; NULL: the host calls forward once per sequence). One
     * layer's attention for every sequence of a batch at once, calls[i] for the i-th (same
     * layer, each with its own views): for a plugin that shares work between sequences, such
     * as a prefix they hold in common (shared blocks of tsr_kv_view_ext). An array of
     * pointers, since tsr_attention_call may grow. */
    tsr_status (*forward_batch)(void *self, const tsr_attention_call *const *calls,
                                int64_t n_calls);
} tsr_attention_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_ATTENTION_H */
