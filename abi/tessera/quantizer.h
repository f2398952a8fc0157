/*
 * <tessera/quantizer.h> -- quantizer stage: the formats of the weights.
 *
 * At load time the host offers every weight matrix of the model to the quantizer of its layer
 * (a pipeline may choose a different quantizer per layer). The quantizer either keeps the
 * file's own format in place (GGUF types, zero copy from the mapping) or converts the weight
 * into a format of its own, and reports what it did (bits per weight, reconstruction error).
 * During inference the host computes y = x . W^T with the quantizer's matmul when it has one
 * for the tensor's dtype on the running backend, and with the backend's otherwise.
 */
#ifndef TESSERA_QUANTIZER_H
#define TESSERA_QUANTIZER_H

#include <tessera/backend.h>
#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_QUANTIZER_ABI_MAJOR 1
#define TSR_QUANTIZER_ABI_MINOR 1

typedef struct tsr_quantizer_init {
    uint32_t struct_size;
    const char *backend_name; /* the running backend plugin's name, e.g. "cpu"; NULL when no
                                 backend runs (validation, conformance runs) */
    int32_t n_layer;          /* blocks in the model, for recipes that vary by depth */
    int32_t memory_space;     /* tsr_memory_space of the buffers `matmul` receives */
} tsr_quantizer_init;

/* One weight offered at load time. Everything here is borrowed for the duration of the call;
 * `src.data` stays mapped for the life of the model, so a quantizer may keep it in place. */
typedef struct tsr_weight_in {
    uint32_t struct_size;
    tsr_tensor src;       /* as stored in the model file */
    int32_t layer;        /* block index, or -1 for tensors outside the blocks */
    const char *role;     /* "attn_q", "ffn_down", "token_embd", "output", ... ; for the experts
                             of a mixture-of-experts layer "ffn_gate_exps", "ffn_up_exps",
                             "ffn_down_exps", and "ffn_*_shexp" for a shared expert */
    /* since 1.1: the expert this matrix belongs to, or -1. The host offers each expert of a
     * stacked tensor (ne {n_in, n_out, n_expert}) as a matrix of its own (ne {n_in, n_out}), so
     * a quantizer prepares 2-D weights only. */
    int32_t expert;
} tsr_weight_in;

/* What the quantizer made of it. */
typedef struct tsr_weight_out {
    uint32_t struct_size;
    tsr_tensor dst;            /* the tensor the graph will use; dst.data may equal src.data */
    double bits_per_weight;    /* storage cost including scales and outliers */
    double rel_rmse;           /* ||W - dequant(Q)|| / ||W||, or 0 when kept exactly */
    int32_t owns_data;         /* 1 when dst.data was allocated by the quantizer (host.alloc) */
} tsr_weight_out;

typedef struct tsr_quantizer_vtable {
    uint32_t struct_size;

    /* [main] */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_quantizer_init *init, void **out);
    void (*destroy)(void *self);

    /* [main] Prepares one weight. May run a long conversion (use parallel_for). Returns
     * TSR_E_UNSUPPORTED when it cannot take this source dtype; the host then reports the
     * tensor's name and type. */
    tsr_status (*prepare)(void *self, const tsr_weight_in *in, tsr_weight_out *out);

    /* [main] Releases what prepare allocated for `w` (when owns_data or w->extra is set). */
    void (*release)(void *self, tsr_tensor *w);

    /* [main] Optional. y (n, w->ne[1]) = x (n, w->ne[0]) . W^T for the dtypes this quantizer
     * defines (or overrides) on the running backend. Returns TSR_E_UNSUPPORTED for a dtype it
     * leaves to the backend. */
    tsr_status (*matmul)(void *self, float *y, const tsr_tensor *w, const float *x, int64_t n);

    /* [main] Optional. Dequantizes rows [row0, row0+n_rows) of w into y (n_rows, w->ne[0]),
     * host memory; used for embeddings lookups and by tests. */
    tsr_status (*dequantize_rows)(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                  int64_t n_rows);
} tsr_quantizer_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_QUANTIZER_H */
