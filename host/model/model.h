/* Llama-family models (Llama, Mistral, TinyLlama, SmolLM, Qwen2) read from a model file: hyperparameters from the metadata, weights as tensors in the mapping. */
#ifndef TSR_HOST_MODEL_H
#define TSR_HOST_MODEL_H

#include <stdbool.h>

#include <tessera/backend.h>
#include <tessera/common.h>

#include "base/error.h"
#include "files/gguf.h"

typedef enum tsr_arch {
    TSR_ARCH_LLAMA = 0, /* also Mistral, TinyLlama, SmolLM: GGUF "llama" */
    TSR_ARCH_QWEN2 = 1
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
    int32_t n_expert;      /* read only to refuse mixture-of-experts models for now */
    float rms_eps;
    tsr_rope_params rope;
} tsr_hparams;

/* Weights of one block, as stored in the file. Absent tensors have data == NULL. */
typedef struct tsr_layer_weights {
    tsr_tensor attn_norm, wq, wk, wv, wo, bq, bk, bv;
    tsr_tensor ffn_norm, ffn_gate, ffn_up, ffn_down;
} tsr_layer_weights;

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
 * and consistent with the others, the RMS epsilon and RoPE base finite and above 0, every
 * tensor the architecture needs there with the right shape, and the norm weights and biases
 * (F32) finite. Errors name the file and the key or tensor, e.g.
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
