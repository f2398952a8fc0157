/* The forward pass of a llama-family model over the stage plugins: the backend's ops, the
 * prepared weights' products, and at each layer the cache policy and attention of that layer.
 * What to compute lives here; how is the plugins'. */
#ifndef TSR_HOST_GRAPH_H
#define TSR_HOST_GRAPH_H

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/decoder.h>

#include "base/clock.h"
#include "base/error.h"
#include "model/model.h"
#include "model/weights.h"
#include "plugin/loader.h"

/* Time spent in each stage's calls, in nanoseconds, since creation. */
typedef struct tsr_stage_times {
    uint64_t matmul, attention, cache, decoder, other_ops;
    uint64_t forward_calls, tokens;
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

typedef struct tsr_graph {
    const tsr_model *model;
    const tsr_model_weights *weights;
    tsr_instance *backend;
    int32_t memory_space;              /* the backend's (tsr_memory_space) */
    tsr_instance *const *attention_at; /* (n_layer) */
    tsr_instance *const *cache_at;     /* (n_layer) */
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

    /* Per query head attention statistics (tessera profile-heads): when head_mass is set,
     * attention adds to head_mass[l * n_head + h] the probability head h of layer l puts
     * outside the first stats_sink positions and the last stats_window (attention.h). */
    float *head_mass;
    int32_t stats_sink, stats_window;
} tsr_graph;

/* Runs the model on `n` entries, grouped in `runs` (checked by the caller: tokens in the
 * vocabulary, positions in the context, each sequence's entries contiguous), and writes the
 * logits of the entries with want_logits, in order, to `logits` (n_want, n_vocab) in host
 * memory. Stops with an error naming the layer when the hidden state turns NaN or infinite
 * (checked after every layer when the backend computes in host memory; in the logits
 * otherwise): a broken model must not print garbage. */
tsr_status tsr_graph_forward(tsr_graph *g, const tsr_batch_entry *entries, int64_t n,
                             const tsr_seq_run *runs, size_t n_runs, float *logits,
                             tsr_error *err);

/* Frees the activation buffers (the graph borrows everything else). */
void tsr_graph_free(tsr_graph *g);

#endif
