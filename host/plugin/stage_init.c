#include "plugin/stage_init.h"

#include <string.h>

tsr_model_shape tsr_model_shape_synthetic(void) {
    return (tsr_model_shape){
        .n_layer = 2, .n_head = 4, .n_kv_head = 2, .head_dim = 16, .n_embd = 64, .n_ctx = 256,
        .n_vocab = 512, .n_expert = 4, .n_expert_used = 2, .n_seq_max = 1, .n_threads = 1,
        .backend_name = NULL, .memory_space = TSR_MEMORY_HOST};
}

const void *tsr_stage_init_fill(int32_t stage, const tsr_model_shape *s, tsr_stage_init *out) {
    memset(out, 0, sizeof *out);
    switch (stage) {
    case TSR_STAGE_BACKEND:
        out->backend = (tsr_backend_init){.struct_size = sizeof(tsr_backend_init),
                                          .n_threads = s->n_threads};
        return &out->backend;
    case TSR_STAGE_QUANTIZER:
        out->quantizer = (tsr_quantizer_init){.struct_size = sizeof(tsr_quantizer_init),
                                              .backend_name = s->backend_name,
                                              .n_layer = s->n_layer,
                                              .memory_space = s->memory_space};
        return &out->quantizer;
    case TSR_STAGE_ATTENTION:
        out->attention = (tsr_attention_init){.struct_size = sizeof(tsr_attention_init),
                                              .n_layer = s->n_layer, .n_head = s->n_head,
                                              .n_kv_head = s->n_kv_head, .head_dim = s->head_dim,
                                              .n_ctx = s->n_ctx, .backend_name = s->backend_name,
                                              .memory_space = s->memory_space};
        return &out->attention;
    case TSR_STAGE_CACHE:
        out->cache = (tsr_cache_init){.struct_size = sizeof(tsr_cache_init),
                                      .n_layer = s->n_layer, .n_kv_head = s->n_kv_head,
                                      .head_dim = s->head_dim, .n_ctx = s->n_ctx,
                                      .n_seq_max = s->n_seq_max, .backend_name = s->backend_name,
                                      .memory_space = s->memory_space, .n_head = s->n_head};
        return &out->cache;
    case TSR_STAGE_DECODER:
        out->decoder = (tsr_decoder_init){.struct_size = sizeof(tsr_decoder_init),
                                          .n_vocab = s->n_vocab, .n_ctx = s->n_ctx,
                                          .has_draft = s->has_draft};
        return &out->decoder;
    case TSR_STAGE_ROUTER:
        out->router = (tsr_router_init){.struct_size = sizeof(tsr_router_init),
                                        .n_layer = s->n_layer, .n_expert = s->n_expert,
                                        .n_expert_used = s->n_expert_used, .n_embd = s->n_embd};
        return &out->router;
    default:
        return NULL;
    }
}
