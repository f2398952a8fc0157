/* The init struct each stage's create() receives, built from a model shape. Without a model
 * (`tessera plugins call`, `tessera validate`, the conformance runner) a small synthetic
 * shape stands in. */
#ifndef TSR_HOST_STAGE_INIT_H
#define TSR_HOST_STAGE_INIT_H

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>

typedef struct tsr_model_shape {
    int32_t n_layer, n_head, n_kv_head, head_dim, n_embd, n_ctx, n_vocab;
    int32_t n_expert, n_expert_used;
    int32_t n_seq_max;
    int32_t n_threads;
    const char *backend_name; /* NULL when no backend runs */
    int32_t memory_space;     /* tsr_memory_space of the backend's buffers */
    int32_t has_draft;        /* 1 when the pipeline has a draft model (the decoder's init) */
} tsr_model_shape;

/* Storage for any stage's init struct. */
typedef union tsr_stage_init {
    tsr_backend_init backend;
    tsr_quantizer_init quantizer;
    tsr_attention_init attention;
    tsr_cache_init cache;
    tsr_decoder_init decoder;
    tsr_router_init router;
} tsr_stage_init;

/* n_layer 2, 4 heads, 2 KV heads, head_dim 16, n_embd 64, n_ctx 256, vocab 512, 4 experts
 * with 2 used, 1 sequence, 1 thread, no backend (host memory). */
tsr_model_shape tsr_model_shape_synthetic(void);

/* Fills `out` for `stage` and returns a pointer to it, for tsr_instance_create. */
const void *tsr_stage_init_fill(int32_t stage, const tsr_model_shape *shape, tsr_stage_init *out);

#endif
