/* Weights as the graph uses them: each matrix offered to the quantizer of its layer, which
 * keeps it in place or converts it, and multiplied by the backend when it knows the type, else
 * by the quantizer. Everything a backend op reads (the matrices it multiplies, the embedding
 * rows, norm weights, biases) is placed in the backend's memory: in place (mapped from the
 * file) for a backend that computes on host memory, else uploaded into buffers of its own.
 * `tessera quantize` prepares weights the same way and writes them. */
#ifndef TSR_HOST_WEIGHTS_H
#define TSR_HOST_WEIGHTS_H

#include <stdbool.h>

#include <tessera/quantizer.h>

#include "base/error.h"
#include "model/model.h"
#include "plugin/loader.h"

/* The matrices of a block, in the order the graph uses them. */
enum { TSR_W_Q, TSR_W_K, TSR_W_V, TSR_W_O, TSR_W_GATE, TSR_W_UP, TSR_W_DOWN, TSR_W_PER_LAYER };

typedef struct tsr_weight {
    tsr_tensor t;            /* what the quantizer made, in host memory */
    tsr_tensor on_backend;   /* what backend ops receive: t, or t uploaded to the backend */
    tsr_instance *quantizer; /* prepared it; releases it */
    bool quantizer_matmul;   /* the backend does not know t.dtype: the quantizer multiplies */
    bool prepared;
} tsr_weight;

/* Offers `src` (of block `layer`, or -1; `role` and `expert` as tsr_weight_in says) to
 * quantizer `q` and keeps the result in `w`; `report` (may be NULL) receives the quantizer's
 * own report. A failure names the tensor (and the expert), its type and the quantizer's
 * reason. */
tsr_status tsr_weight_prepare(tsr_instance *q, const tsr_tensor *src, int32_t layer,
                              const char *role, int32_t expert, tsr_weight *w,
                              tsr_weight_out *report, tsr_error *err);

/* Expert `e` of a stacked tensor (ne {n_in, n_out, n_expert}) as a matrix of its own
 * (ne {n_in, n_out}): a view of its rows, named as the stack. */
tsr_tensor tsr_expert_matrix(const tsr_tensor *stack, int32_t e);

/* Expert e's matrix m (0 gate, 1 up, 2 down) of a layer with experts, from its stack or, in a
 * file that holds them apart, its own tensor (tsr_layer_weights.split). */
tsr_tensor tsr_layer_expert(const tsr_layer_weights *w, int m, int32_t e);

/* Releases what the quantizer made (nothing when `w` was not prepared). */
void tsr_weight_release(tsr_weight *w);

/* Bytes of the prepared tensor (0 when not prepared). */
uint64_t tsr_weight_bytes(const tsr_weight *w);


/* The vectors of a block that backend ops read, in the backend's memory; NULL when absent. */
typedef struct tsr_block_vectors {
    const float *attn_norm, *ffn_norm;
    const float *bq, *bk, *bv;
    const float *q_norm, *k_norm;
} tsr_block_vectors;

/* The matrices of an expert, in the order the graph uses them. */
enum { TSR_EXPERT_GATE, TSR_EXPERT_UP, TSR_EXPERT_DOWN, TSR_EXPERT_MATRICES };

/* A layer with experts: its router's matrix, each expert's matrices prepared one by one by
 * the layer's quantizer (in place when it keeps the file's type), and the shared expert. */
typedef struct tsr_moe_weights {
    tsr_tensor router;      /* ffn_gate_inp (ne {n_embd, n_expert}) in the backend's memory */
    tsr_weight *experts;    /* (n_expert, TSR_EXPERT_MATRICES) */
    tsr_tensor shared_gate; /* ffn_gate_inp_shexp (ne {n_embd, 1}) in the backend's memory;
                               data NULL without a shared expert */
    tsr_weight shared[TSR_EXPERT_MATRICES]; /* the shared expert's; not prepared without one */
} tsr_moe_weights;

/* Every weight of a model, prepared for one backend. */
typedef struct tsr_model_weights {
    int32_t n_layer;
    tsr_instance *backend;
    tsr_weight *blocks;          /* (n_layer, TSR_W_PER_LAYER); a layer with experts has no
                                    dense ffn_gate, ffn_up, ffn_down (not prepared) */
    tsr_moe_weights *moe;        /* (n_layer) for a model with experts, else NULL */
    int32_t n_expert;
    tsr_weight output;
    tsr_weight tok_embd;         /* prepared == false: the embeddings are the file's own rows */
    tsr_block_vectors *vectors;  /* (n_layer) */
    const float *output_norm;
    tsr_tensor embeddings;       /* the rows get_rows reads, in the backend's memory */
    void **buffers;              /* the backend buffers holding uploaded copies */
    size_t n_buffers;
    double n_weights, bits_sum, rmse_sum; /* over the prepared matrices, weighted by size */
} tsr_model_weights;

/* Prepares the blocks' matrices (each expert's on its own) with quantizer_at[layer], the
 * output head and the embeddings with `quantizer`, decides who multiplies each (`backend` when
 * it supports the type, else the quantizer; an error when neither can), and places what
 * backend ops read in the backend's memory. The routers' matrices are the file's, multiplied
 * by the backend. Reports progress per layer. */
tsr_status tsr_model_weights_prepare(tsr_model_weights *mw, const tsr_model *model,
                                     tsr_instance *quantizer, tsr_instance *const *quantizer_at,
                                     tsr_instance *backend, tsr_error *err);
void tsr_model_weights_release(tsr_model_weights *mw);

/* Bytes of the matrices every token of a forward reads: the blocks' attention and dense
 * feed-forward, the routers and shared experts, and the output head (not the routed experts,
 * which tsr_moe_expert_bytes counts). */
uint64_t tsr_model_weights_dense_bytes(const tsr_model_weights *mw);

/* Bytes of expert e of `layer` as prepared: its gate, up and down matrices. */
uint64_t tsr_moe_expert_bytes(const tsr_model_weights *mw, int32_t layer, int32_t e);

#endif
