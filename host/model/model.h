/* Llama-family models (Llama, Mistral, TinyLlama, SmolLM, Qwen2) and their mixture-of-experts
 * kin (Mixtral as GGUF "llama" with experts, Qwen-MoE, OLMoE) read from a model file:
 * hyperparameters from the metadata, weights as tensors in the mapping. */
#ifndef TSR_HOST_MODEL_H
#define TSR_HOST_MODEL_H

#include <stdbool.h>

#include <tessera/backend.h>
#include <tessera/common.h>
#include <tessera/router.h>

#include "base/error.h"
#include "files/gguf.h"

typedef enum tsr_arch {
    TSR_ARCH_LLAMA = 0,    /* also Mistral, TinyLlama, SmolLM, and Mixtral with experts */
    TSR_ARCH_QWEN2 = 1,
    TSR_ARCH_QWEN2MOE = 2, /* Qwen1.5-MoE, Qwen2-MoE: experts and a gated shared expert */
    TSR_ARCH_OLMOE = 3     /* OLMoE: RMSNorm on the whole Q and K projections */
} tsr_arch;

typedef struct tsr_hparams {
    int32_t arch;          /* tsr_arch */
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_kv_head;
    int32_t head_dim;
    int32_t n_ff;
    int32_t n_ctx_train;
    /* Mixture of experts (every layer, when n_expert > 0). The model's rule, as llama.cpp
     * applies it per architecture (llm_build_moe_ffn): gating and whether the k chosen weights
     * are renormalised. */
    int32_t n_expert;      /* experts per layer; 0 for a dense model */
    int32_t n_expert_used; /* k: the experts each token goes through */
    int32_t n_ff_expert;   /* rows of each expert's gate and up matrices */
    int32_t n_ff_shared;   /* the shared expert's (qwen2moe), else 0 */
    int32_t gating;        /* tsr_gating */
    int32_t normalize;     /* 1: renormalise the chosen weights to sum 1 (Mixtral) */
    bool qk_norm;          /* RMSNorm on the whole Q and K projections before RoPE (OLMoE) */
    float rms_eps;
    tsr_rope_params rope;
} tsr_hparams;

/* Weights of one block, as stored in the file. Absent tensors have data == NULL. A layer has
 * either the dense feed-forward (ffn_gate, ffn_up, ffn_down) or experts. */
typedef struct tsr_layer_weights {
    tsr_tensor attn_norm, wq, wk, wv, wo, bq, bk, bv;
    tsr_tensor q_norm, k_norm; /* (q) and (kv) values, OLMoE */
    tsr_tensor ffn_norm, ffn_gate, ffn_up, ffn_down;
    /* experts: the router (ne {n_embd, n_expert}) and the stacked matrices, gate and up
     * ne {n_embd, n_ff_expert, n_expert}, down ne {n_ff_expert, n_embd, n_expert} */
    tsr_tensor gate_inp, gate_exps, up_exps, down_exps;
    /* a file that holds a matrix's experts apart, as tensors blk.L.ffn_{gate,up,down}_exps.E
     * of their own, each of its own type (tessera quantize --expert-types): the stack's data
     * is NULL and expert e's matrix m (gate, up, down) is split[e * 3 + m]; NULL when every
     * matrix is stacked */
    tsr_tensor *split;
    /* the shared expert: its gate vector (ne {n_embd, 1}, one value per token) and matrices */
    tsr_tensor gate_inp_shexp, gate_shexp, up_shexp, down_shexp;
} tsr_layer_weights;

/* The names of the experts' gate, up and down matrices in a block: the stacks'
 * (blk.L.<name>.weight) and, held apart, each expert's (blk.L.<name>.E.weight). */
extern const char *const tsr_expert_roles[3];

typedef struct tsr_model {
    tsr_gguf *file;       /* owns the mapping the tensors point into */
    bool from_llama2c;    /* a llama2.c checkpoint, which holds no vocabulary */
    tsr_hparams hp;
    tsr_tensor tok_embd, output_norm, output;
    tsr_layer_weights *layers; /* (n_layer) */
} tsr_model;

/* Opens a GGUF file or a llama2.c checkpoint (told apart by their first bytes; anything else,
 * an empty file or one that is not a regular file is refused) and checks what is cheap to
 * check, so a bad file fails here rather than running into garbage: every count at least 1
 * and consistent with the others (k experts used of at most n_expert), the RMS epsilon and
 * RoPE base finite and above 0, every tensor the architecture needs there with the right
 * shape, and the norm weights and biases (F32) finite. Errors name the file and the key or
 * tensor, e.g.
 * "m.gguf: llama.block_count: expected at least 1, got 0". */
tsr_status tsr_model_load(const char *path, tsr_model **out, tsr_error *err);
void tsr_model_free(tsr_model *m);

/* Opens a model file of either format without reading it as a model: what tsr_model_load
 * does first, with the same refusals of empty, unknown and non-regular files. *from_llama2c
 * (when not NULL) says which format it was. For commands that need the file only (tokenize,
 * quantize). */
tsr_status tsr_model_file_open(const char *path, tsr_gguf **out, bool *from_llama2c,
                               tsr_error *err);

/* True when `path` is a regular file that starts with the GGUF magic (false for a FIFO or a
 * folder, without blocking on it). */
bool tsr_file_is_gguf(const char *path);

#endif
