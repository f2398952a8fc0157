/*
 * <tessera/cache.h> -- cache policy stage: what the KV cache keeps, in what form, and what it
 * exposes to attention.
 *
 * A policy owns the K/V storage of every sequence. It may keep a different set of tokens per
 * layer and per KV head (H2O, SnapKV), store them quantized (KIVI), share prefixes or page
 * them: attention sees only the tsr_kv_view it is given, one per KV head.
 *
 * Lifecycle of one request (sequence), in the order the host calls it, all [main]:
 *   seq_begin -> { store(layer) -> view(layer) -> attention reads -> ... for every layer }
 *             -> prefill_end -> { store -> view ... -> step_end } per decode step -> seq_end
 * A decoder may also call seq_fork (beam search) and seq_truncate (speculative rollback).
 * Keys arrive after RoPE, at their original positions (see docs/plugins/cache.md for what a
 * policy that evicts should do about positions).
 */
#ifndef TESSERA_CACHE_H
#define TESSERA_CACHE_H

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_CACHE_ABI_MAJOR 1
#define TSR_CACHE_ABI_MINOR 1

typedef enum tsr_phase {
    TSR_PHASE_PREFILL = 0, /* the prompt (or a chunk of it) */
    TSR_PHASE_DECODE = 1   /* generated tokens, usually one per step (more when speculating) */
} tsr_phase;

typedef struct tsr_cache_init {
    uint32_t struct_size;
    int32_t n_layer;
    int32_t n_kv_head;
    int32_t head_dim;
    int32_t n_ctx;            /* the longest sequence the host will ask for (positions) */
    int32_t n_seq_max;        /* sequences alive at once */
    const char *backend_name; /* the running backend's name; NULL when none runs */
    int32_t memory_space;     /* tsr_memory_space of the k and v a write hands over */
    int32_t n_head;           /* query heads: n_head / n_kv_head of them read each KV head, and
                                 score_acc sums over them */
} tsr_cache_init;

/* New K/V rows for one sequence and one layer. Borrowed for the call. */
typedef struct tsr_kv_write {
    uint32_t struct_size;
    int64_t seq_id;
    int32_t layer;
    int32_t phase;      /* tsr_phase */
    int64_t n;          /* tokens */
    const int32_t *pos; /* (n) their positions, host memory: ascending, consecutive, continuing
                           what the sequence holds (CONTRACT.md) */
    const float *k;     /* (n, n_kv_head, head_dim), RoPE applied; the backend's memory */
    const float *v;     /* (n, n_kv_head, head_dim), the backend's memory */
} tsr_kv_write;

/* Loads rows [j0, j0+n) of a view into f32 (n, head_dim): for storage formats attention
 * cannot read directly. [worker] */
typedef void (*tsr_kv_load_fn)(const void *load_ctx, int64_t j0, int64_t n, float *dst);

/* since 1.1. Products on a policy's own storage, so attention need not copy entries to f32:
 * scores[i] = q . k_{j0+i} for i < n (q: head_dim values, no scale applied). [worker] */
typedef void (*tsr_kv_dot_fn)(const void *load_ctx, const float *q, int64_t j0, int64_t n,
                              float *scores);
/* since 1.1. out (head_dim) += sum over i < n of p[i] * v_{j0+i}. [worker] */
typedef void (*tsr_kv_axpy_fn)(const void *load_ctx, const float *p, int64_t j0, int64_t n,
                               float *out);

/* since 1.1: the dtype of a view whose entries lie in blocks (a paged layout, see
 * tsr_kv_view_ext); as for any dtype attention does not know, load_k and load_v read it, so an
 * attention plugin built for 1.0 still does. */
#define TSR_KV_DTYPE_BLOCKS (-2)

/* What one KV head of one layer exposes to attention. Filled by the policy; valid until the
 * next call into the policy for that sequence. The host passes views as an array (one per KV
 * head), so this struct never grows: what later MINORs add to a view goes into a parallel
 * array (tsr_kv_view_ext, since 1.1). */
typedef struct tsr_kv_view {
    uint32_t struct_size;
    int64_t n;            /* visible entries */
    const int32_t *pos;   /* (n) position of each entry, for causal masking; ascending not
                             required */
    int32_t dtype;        /* TSR_DTYPE_F32 or TSR_DTYPE_F16: k and v are readable directly;
                             anything else: use load_k / load_v */
    const void *k;        /* entry j at (char*)k + j*k_stride, head_dim elements */
    const void *v;
    size_t k_stride, v_stride;
    tsr_kv_load_fn load_k, load_v; /* required when dtype is not F32/F16 */
    const void *load_ctx;
    /* When non-NULL, attention adds to score_acc[j] the attention probability of entry j summed
     * over the query heads of this KV head and over the queries whose position is >=
     * score_from_pos (SnapKV's observation window; H2O's accumulated attention). */
    float *score_acc;
    int32_t score_from_pos;
} tsr_kv_view;

/* since 1.1: more of a view, in an array parallel to the views (element h extends view h),
 * zeroed by the host and filled by a policy's view_ext. Like tsr_kv_view it never grows. */
typedef struct tsr_kv_view_ext {
    uint32_t struct_size;
    /* Entries in blocks of block_size (0: not blocked; the view's k and v hold them). Entry j
     * lies at (const char *)k_blocks[j / block_size] + (j % block_size) * k_stride (v alike),
     * in element type block_dtype (F32 or F16); the view's dtype is then TSR_KV_DTYPE_BLOCKS.
     * Sequences that share a prefix (a fork without a copy) show the same blocks for it. */
    int32_t block_size;
    int32_t block_dtype;
    const void *const *k_blocks;
    const void *const *v_blocks;
    /* Optional: products on the storage itself (quantized keys and values), which an attention
     * plugin that knows them uses in place of load_k / load_v (same load_ctx). */
    tsr_kv_dot_fn dot_k;
    tsr_kv_axpy_fn axpy_v;
} tsr_kv_view_ext;

typedef struct tsr_cache_stats {
    uint32_t struct_size;
    uint64_t bytes_reserved; /* K/V storage held now, all sequences */
    uint64_t bytes_peak;
    int64_t entries;         /* K/V rows held now, all layers and heads */
    int64_t evicted;         /* rows dropped since creation */
    double bits_per_value;   /* since 1.1: storage bits per K or V element held, scales and
                                full-precision residuals included (32 for F32, 16 for F16);
                                0 when the policy does not say */
} tsr_cache_stats;

typedef struct tsr_cache_vtable {
    uint32_t struct_size;

    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_cache_init *init, void **out);
    void (*destroy)(void *self);

    /* A request starts / ends. seq_end frees the sequence's storage. */
    tsr_status (*seq_begin)(void *self, int64_t seq_id);
    void (*seq_end)(void *self, int64_t seq_id);

    /* Optional. dst becomes a copy of src (beam search); dst must not be alive. */
    tsr_status (*seq_fork)(void *self, int64_t src, int64_t dst);
    /* Optional. Forget every entry at position >= n_pos (speculative rollback). A policy that
     * already evicted or merged such entries returns TSR_E_UNSUPPORTED. */
    tsr_status (*seq_truncate)(void *self, int64_t seq_id, int32_t n_pos);

    /* Appends new K/V rows (before the layer's attention reads them). */
    tsr_status (*store)(void *self, const tsr_kv_write *w);
    /* Fills views[0..n_kv_head) for attention of `layer` over sequence `seq_id`. */
    tsr_status (*view)(void *self, int64_t seq_id, int32_t layer, int32_t phase,
                       tsr_kv_view *views);

    /* Optional hooks. prefill_end: after the prompt's last layer (SnapKV compresses here).
     * step_end: after each decode step's last layer (H2O evicts here). */
    tsr_status (*prefill_end)(void *self, int64_t seq_id);
    tsr_status (*step_end)(void *self, int64_t seq_id);

    /* Optional. Memory and eviction counters. */
    void (*stats)(void *self, tsr_cache_stats *out);

    /* Optional (since 1.1; NULL: the host calls view). view, filling also ext[0..n_kv_head)
     * (zeroed by the host) for the views that use what tsr_kv_view_ext describes. */
    tsr_status (*view_ext)(void *self, int64_t seq_id, int32_t layer, int32_t phase,
                           tsr_kv_view *views, tsr_kv_view_ext *ext);
} tsr_cache_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_CACHE_H */
