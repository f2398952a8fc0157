/* A pipeline: one instance of each configured stage plugin (more where layers override them),
 * the model's weights as the quantizers prepared them, the graph that runs them, the live
 * sequences, and the generation API handed to the decoder. */
#ifndef TSR_HOST_PIPELINE_H
#define TSR_HOST_PIPELINE_H

#include <pthread.h>
#include <stdbool.h>

#include <tessera/cache.h>
#include <tessera/decoder.h>

#include "base/error.h"
#include "config/config.h"
#include "model/graph.h"
#include "model/model.h"
#include "plugin/loader.h"
#include "plugin/pool.h"

typedef struct tsr_pipeline tsr_pipeline;

/* Called with each batch of tokens the decoder accepts for sequence `seq_id` (the CLI prints
 * them): 0 for a decoder that generates one continuation, any id it chose for each of several
 * (tsr_decode_api.emit_seq). */
typedef void (*tsr_token_sink)(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n);
/* 1 when `token` ends generation. */
typedef int32_t (*tsr_eog_fn)(void *ctx, int32_t token);

/* Instantiates every stage of `cfg` (bound against `reg`) for `model`, and prepares the
 * weights. With a draft: section (cfg->draft), also the draft's pipeline: its own stages on
 * `draft_model`, the model of draft.model (NULL for a self-draft: `model` itself), whose
 * forward leaves out the layers of draft.skip_layers; the draft must have the target's
 * vocabulary size. `n_ctx` is the longest sequence to be run (positions), on both models. The
 * pipeline borrows cfg, reg, the models and pool: they must outlive it. */
tsr_status tsr_pipeline_create(const tsr_config *cfg, const tsr_registry *reg,
                               const tsr_model *model, const tsr_model *draft_model,
                               tsr_pool *pool, int32_t n_ctx, tsr_pipeline **out, tsr_error *err);
void tsr_pipeline_free(tsr_pipeline *pl);

/* The number of threads the bound backend asks for (its parameter of role THREADS, when it
 * declares one), else 1. The host sizes its pool with it. */
int tsr_config_threads(const tsr_config *cfg);

/* Runs the model on a batch (entries of one sequence must be contiguous and continue what the
 * sequence holds); logits (n_want, n_vocab) for the entries with want_logits. */
tsr_status tsr_pipeline_forward(tsr_pipeline *pl, const tsr_batch_entry *entries, int64_t n,
                                float *logits, tsr_error *err);

/* Sequence lifecycle, forwarded to every cache policy and attention instance. */
tsr_status tsr_pipeline_seq_begin(tsr_pipeline *pl, int64_t seq_id, tsr_error *err);
void tsr_pipeline_seq_end(tsr_pipeline *pl, int64_t seq_id);

/* What one request cost and what the decoder reports of it. */
typedef struct tsr_generate_stats {
    int64_t new_tokens;       /* emitted, over every sequence */
    int64_t n_sequences;      /* sequences that emitted at least one token */
    uint64_t target_forwards; /* forwards of the target model, the prompt's included */
    uint64_t draft_forwards;  /* forwards of the draft model */
    bool has_decoder_stats;   /* the decoder has the stats slot: `decoder` is its report */
    tsr_decoder_stats decoder;
} tsr_generate_stats;

/* Generates from `prompt` with the decoder stage: sequence 0 is begun (on the draft too), the
 * decoder drives, accepted tokens go to `sink`, and each sequence stops after
 * `max_new_tokens`, at an end of generation token when `eog` says so, or when the decoder
 * stops. Hooks run after each step and at the end. *stats receives the counts. */
tsr_status tsr_pipeline_generate(tsr_pipeline *pl, const int32_t *prompt, int64_t n_prompt,
                                 int64_t max_new_tokens, tsr_eog_fn eog, void *eog_ctx,
                                 tsr_token_sink sink, void *sink_ctx, tsr_generate_stats *stats,
                                 tsr_error *err);

/* One request being generated: the tsr_decode_api handed to the decoder (forward, sequence
 * management, emit). A failing call is recorded as the host's own failure (host_err), which is
 * what the user then reads rather than the decoder's paraphrase. tsr_pipeline_generate runs a
 * request through the decoder stage; tests drive `api` directly. */
/* What the request emitted for one sequence (tsr_decode_api.emit_seq). */
typedef struct tsr_seq_output {
    int64_t seq_id;
    int64_t n_emitted;
    bool stopped; /* emit_seq returned 1 for it: later tokens are dropped */
} tsr_seq_output;

typedef struct tsr_request {
    tsr_pipeline *pl;
    int64_t max_new, n_emitted; /* the limit per sequence; the count over all of them */
    tsr_eog_fn eog;
    void *eog_ctx;
    tsr_token_sink sink;
    void *sink_ctx;
    tsr_error host_err;
    bool host_failed;
    tsr_seq_output *outputs; /* (n_outputs) in order of first emission */
    size_t n_outputs, cap_outputs;
    tsr_decode_api api;       /* api.ctx is the request */
    tsr_decode_api draft_api; /* api.draft when the pipeline has a draft; acts on pl->draft */
    /* The target's forward a decoder began (api.forward_begin) and has not waited for. */
    struct {
        bool running;  /* begun, not yet waited for */
        bool threaded; /* runs on `thread`, else it ran inside forward_begin */
        pthread_t thread;
        const tsr_batch_entry *entries;
        int64_t n;
        float *logits;
        tsr_status status;
        tsr_error err;
    } side;
} tsr_request;

/* Fills `r` and begins sequence 0 (of the draft too). */
tsr_status tsr_request_begin(tsr_request *r, tsr_pipeline *pl, int64_t max_new_tokens,
                             tsr_eog_fn eog, void *eog_ctx, tsr_token_sink sink, void *sink_ctx,
                             tsr_error *err);
/* Ends every live sequence (of the draft too) and frees the request's records. */
void tsr_request_end(tsr_request *r);

/* Runs the hooks configured for `event` (tsr_hook_event). */
tsr_status tsr_pipeline_run_hooks(tsr_pipeline *pl, int32_t event, tsr_error *err);

const tsr_stage_times *tsr_pipeline_times(const tsr_pipeline *pl);

/* The draft's pipeline (its times, its cache), or NULL without a draft: section. */
const tsr_pipeline *tsr_pipeline_draft(const tsr_pipeline *pl);

/* The value of the decoder's parameter of role PARALLEL (the continuations it generates side by
 * side), or 1 when it has none. */
int64_t tsr_pipeline_parallel(const tsr_pipeline *pl);

/* From now on, attention adds to head_mass[layer * n_head + h] (host memory, the caller's) the
 * probability query head h puts outside the first `sink` positions and the last `window`
 * (tsr_attention_call.head_mass); NULL stops it. Plugins that do not report leave it as is. */
void tsr_pipeline_profile_heads(tsr_pipeline *pl, float *head_mass, int32_t sink,
                                int32_t window);

/* From now on, every layer with experts adds its final choice to `rec` (the caller's, sized
 * for the model: tsr_route_record); NULL stops it. */
void tsr_pipeline_record_routes(tsr_pipeline *pl, tsr_route_record *rec);
/* What the quantizers made of the weight matrices: bits per weight and relative RMSE, both
 * averaged over all weights (each matrix weighted by its size). */
void tsr_pipeline_weight_quality(const tsr_pipeline *pl, double *bits_per_weight,
                                 double *rel_rmse);

/* Bytes of the prepared weights every token reads: the blocks' attention and dense
 * feed-forward matrices, the routers and shared experts of a model with experts, and the output
 * head. The experts a token is routed to come on top: the graph counts them as it reads them
 * (tsr_stage_times.expert_bytes). */
uint64_t tsr_pipeline_weight_bytes(const tsr_pipeline *pl);

/* The statistics of every cache policy instance that reports them (stats), summed into *sum
 * (struct_size set, all counts 0 when none does), bits_per_value their mean weighted by
 * entries (0 when one of them does not say); returns how many reported. */
int tsr_pipeline_cache_stats(const tsr_pipeline *pl, tsr_cache_stats *sum);

/* Sum of the cache policies' bytes_reserved now (0 when none reports stats). */
uint64_t tsr_pipeline_kv_bytes(const tsr_pipeline *pl);

#endif
