#include "plugin/stage_init.h"

#include <string.h>

tsr_model_shape tsr_model_shape_synthetic(void) {
    return (tsr_model_shape){
        .n_layer = 2, .n_head = 4, .n_kv_head = 2, .head_dim = 16, .n_embd = 64, .n_ctx = 256,
        .n_vocab = 512, .n_expert = 4, .n_expert_used = 2, .n_seq_max = 1, .n_threads = 1,
        .backend_name = "cpu"};
}

const void *tsr_stage_init_fill(int32_t stage, const tsr_model_shape *s, tsr_stage_init *out) {
    memset(out, 0, sizeof *out);
    switch (stage) {
    case TSR_STAGE_BACKEND:
        out->backend = (tsr_backend_init){sizeof(tsr_backend_init), s->n_threads};
        return &out->backend;
    case TSR_STAGE_QUANTIZER:
        out->quantizer = (tsr_quantizer_init){sizeof(tsr_quantizer_init), s->backend_name,
                                              s->n_layer};
        return &out->quantizer;
    case TSR_STAGE_ATTENTION:
        out->attention = (tsr_attention_init){sizeof(tsr_attention_init), s->n_layer, s->n_head,
                                              s->n_kv_head, s->head_dim, s->n_ctx,
                                              s->backend_name};
        return &out->attention;
    case TSR_STAGE_CACHE:
        out->cache = (tsr_cache_init){sizeof(tsr_cache_init), s->n_layer, s->n_kv_head,
                                      s->head_dim, s->n_ctx, s->n_seq_max, s->backend_name};
        return &out->cache;
    case TSR_STAGE_DECODER:
        out->decoder = (tsr_decoder_init){sizeof(tsr_decoder_init), s->n_vocab, s->n_ctx};
        return &out->decoder;
    case TSR_STAGE_ROUTER:
        out->router = (tsr_router_init){sizeof(tsr_router_init), s->n_layer, s->n_expert,
                                        s->n_expert_used, s->n_embd};
        return &out->router;
    default:
        return NULL;
    }
}
