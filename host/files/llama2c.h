/* llama2.c checkpoints (karpathy/llama2.c "legacy" .bin, e.g. stories260K.bin) read as a
 * tsr_gguf: GGUF llama metadata keys and GGUF tensor names over the mapped float32 weights.
 *
 * File layout: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
 * seq_len; a negative vocab_size means the classifier is not tied to the embedding), then
 * float32 weights: token_embedding [vocab][dim], rms_att [L][dim], wq [L][dim][dim],
 * wk [L][kv_dim][dim], wv [L][kv_dim][dim], wo [L][dim][dim], rms_ffn [L][dim],
 * w1 [L][hidden][dim], w2 [L][dim][hidden], w3 [L][hidden][dim], rms_final [dim],
 * freq_cis_real and freq_cis_imag [seq_len][head_size/2] (skipped), then wcls [vocab][dim]
 * when untied. kv_dim = n_kv_heads * dim / n_heads. */
#ifndef TSR_HOST_LLAMA2C_H
#define TSR_HOST_LLAMA2C_H

#include "base/error.h"
#include "files/gguf.h"

/* Maps `path` and builds the model. The file size must be exactly what the header implies.
 * Metadata: general.architecture "llama", llama.context_length (seq_len),
 * llama.embedding_length, llama.feed_forward_length, llama.block_count,
 * llama.attention.head_count, llama.attention.head_count_kv, llama.rope.dimension_count
 * (head size), llama.vocab_size, llama.attention.layer_norm_rms_epsilon 1e-5,
 * llama.rope.freq_base 10000. Tensors (all F32, data inside the mapping, no copy):
 * token_embd, output_norm, output (the token_embd data when tied), and blk.N.{attn_norm,
 * attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate (w1), ffn_down (w2), ffn_up (w3)},
 * each ".weight". Close with tsr_gguf_close. On failure *out = NULL and err names the file
 * and what was wrong. */
int tsr_llama2c_open(const char *path, tsr_gguf **out, tsr_error *err);

/* Same over `size` bytes in memory (borrowed; they must outlive the model). `name` is used in
 * messages. */
int tsr_llama2c_open_memory(const void *data, size_t size, const char *name, tsr_gguf **out,
                            tsr_error *err);

#endif
