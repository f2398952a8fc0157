/* Inside a pipeline: shared by its wiring (pipeline.c) and the generation API it hands to
 * decoders (generate.c). */
#ifndef TSR_HOST_PIPELINE_IMPL_H
#define TSR_HOST_PIPELINE_IMPL_H

#include <stdbool.h>

#include "model/experts.h"
#include "model/graph.h"
#include "model/weights.h"
#include "pipeline/pipeline.h"
#include "plugin/instances.h"

typedef struct tsr_seq_state {
    int64_t id;
    int32_t n_pos;  /* positions held: the next forward of the sequence starts there */
    bool prefilled; /* prefill_end has run: later forwards are decode steps */
} tsr_seq_state;

struct tsr_pipeline {
    const tsr_config *cfg;
    const tsr_model *model;
    int32_t n_ctx;

    tsr_instance *stage_main[TSR_STAGE_COUNT + 1]; /* the top-level instance of each stage */
    tsr_instance_set instances; /* every instance, for lifecycle calls and destruction */
    tsr_instance **quantizer_at, **attention_at, **cache_at; /* (n_layer) */
    tsr_instance **router_at; /* (n_layer): for models with experts */
    int32_t *router_needs;    /* (n_layer): what the router of each layer asked for */
    /* Routers live apart from the other instances: they hold the experts' access, which holds
     * the weights, so they go first when the pipeline is freed. */
    tsr_instance_set routers;
    tsr_experts *experts;

    int32_t memory_space; /* the backend's (tsr_memory_space) */
    tsr_model_weights weights;
    tsr_graph graph;

    tsr_seq_state *seqs;
    size_t n_seqs, cap_seqs;

    tsr_pipeline *draft; /* the draft: section's pipeline, or NULL */
    bool *skip_layer;    /* (n_layer) a draft's draft.skip_layers, or NULL */
    /* With a draft and a pool of two threads or more: the shares of the pool that the target's
     * forward (a decoder's forward_begin) and the draft's calls run on while they overlap, the
     * draft one thread and the target the others. */
    tsr_pool *target_share, *draft_share;
};

/* The state of a live sequence, or NULL. */
tsr_seq_state *tsr_pipeline_find_seq(tsr_pipeline *pl, int64_t id);
/* Records a live sequence; false when out of memory. */
bool tsr_pipeline_add_seq(tsr_pipeline *pl, tsr_seq_state s);

/* Each distinct instance of `stage` once, for lifecycle calls. */
#define TSR_FOR_EACH_INSTANCE(pl, stage_value, var)                                      \
    for (size_t var##_i = 0; var##_i < (pl)->instances.n_owned; var##_i++)              \
        for (tsr_instance *var = (pl)->instances.owned[var##_i];                         \
             var && var->ref->desc->stage == (stage_value); var = NULL)

#endif
