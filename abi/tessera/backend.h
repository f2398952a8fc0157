/*
 * <tessera/backend.h> -- device backend stage: where tensors live and how the ops run.
 *
 * The host's model graph calls these ops in order, one at a time, from the main thread
 * ([main]); a backend parallelises inside an op (the CPU backend through
 * tsr_host.parallel_for, a GPU backend with its own streams).
 *
 * Memory. Every pointer an op receives lies in the backend's memory space: activations (f32)
 * in buffers from buffer_alloc, and weights, norm weights, biases, token ids and positions,
 * which the host copies there with `upload` once (weights, at load) or per call (ids,
 * positions). A backend without buffer_alloc computes on host memory: the host then allocates
 * its buffers itself and hands it weights in place (mapped from the file). What other stages
 * may do with the backend's buffers (attention reads q and writes out, a cache policy reads the
 * new k and v) is told by `memory_space`.
 *
 * Shapes are given explicitly; `n` is a number of rows (tokens), rows are contiguous.
 */
#ifndef TESSERA_BACKEND_H
#define TESSERA_BACKEND_H

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_BACKEND_ABI_MAJOR 1
#define TSR_BACKEND_ABI_MINOR 1

typedef enum tsr_rope_mode {
    TSR_ROPE_NORMAL = 0, /* rotate adjacent pairs (2i, 2i+1): llama */
    TSR_ROPE_NEOX = 2    /* rotate pairs (i, i + n_rot/2): qwen2, neox */
} tsr_rope_mode;

typedef struct tsr_rope_params {
    uint32_t struct_size;
    int32_t mode;      /* tsr_rope_mode */
    int32_t n_rot;     /* dimensions rotated at the start of each head (= head_dim usually) */
    float freq_base;   /* theta_i = pos * freq_scale * freq_base^(-2i/n_rot) */
    float freq_scale;
} tsr_rope_params;

/* What the host tells a backend at creation. */
typedef struct tsr_backend_init {
    uint32_t struct_size;
    int32_t n_threads; /* the host pool size */
} tsr_backend_init;

typedef struct tsr_backend_vtable {
    uint32_t struct_size;

    /* [main] Creates an instance. `host` is valid until destroy. On error: set_error, return
     * a negative status, leave *out untouched. */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_backend_init *init, void **out);
    /* [main] Frees everything the instance allocated. NULL-safe on the host side. */
    void (*destroy)(void *self);

    /* ---- memory ----------------------------------------------------------------------- */
    /* [main] Optional, all four together (NULL: the backend computes on host memory; the host
     * allocates its buffers and passes weights in place). Allocates `bytes` in the backend's
     * memory space, 64-byte aligned; buffer_free releases such a buffer (NULL does nothing). */
    tsr_status (*buffer_alloc)(void *self, size_t bytes, void **out);
    void (*buffer_free)(void *self, void *buf);
    /* [main] Copies host memory to a backend buffer (upload; `dst` may point inside a buffer)
     * or a backend buffer to host memory (download). Returns when the copy is complete. */
    tsr_status (*upload)(void *self, void *dst, const void *src, size_t bytes);
    tsr_status (*download)(void *self, void *dst, const void *src, size_t bytes);
    /* [main] Optional (NULL: ops are synchronous). Waits for queued work; the host calls it
     * before it reads what an op wrote (logits) through download. */
    tsr_status (*synchronize)(void *self);

    /* ---- weights ---------------------------------------------------------------------- */
    /* [main] Whether `matmul` accepts weights of `dtype` natively (without a quantizer kernel).
     * Returns 0 or 1. */
    int32_t (*supports)(void *self, int32_t dtype);

    /* [main] y (n, w->ne[1]) = x (n, w->ne[0]) . W^T. */
    tsr_status (*matmul)(void *self, float *y, const tsr_tensor *w, const float *x, int64_t n);

    /* [main] y (n, dim) = rows `ids` (n) of the table `w` (n_rows, dim), converted to f32. */
    tsr_status (*get_rows)(void *self, float *y, const tsr_tensor *w, const int32_t *ids,
                           int64_t n);

    /* ---- activations (f32) ------------------------------------------------------------- */
    /* y (n, dim) = x / sqrt(mean(x^2) + eps) * weight (dim); y may equal x. */
    tsr_status (*rms_norm)(void *self, float *y, const float *x, const float *weight,
                           int64_t n, int64_t dim, float eps);
    /* x (n, n_head, head_dim) rotated in place by position pos[t] of each row. */
    tsr_status (*rope)(void *self, float *x, const int32_t *pos, int64_t n, int32_t n_head,
                       int32_t head_dim, const tsr_rope_params *rope);
    /* y (n, dim) = silu(gate) * up; y may equal gate. */
    tsr_status (*swiglu)(void *self, float *y, const float *gate, const float *up, int64_t n,
                         int64_t dim);
    /* y (n, dim) = a + b (b broadcast over rows when b_rows == 1); y may equal a. */
    tsr_status (*add)(void *self, float *y, const float *a, const float *b, int64_t n,
                      int64_t dim, int64_t b_rows);

    /* [main] Optional (NULL: TSR_MEMORY_HOST). Where this instance's buffers live: the host
     * tells the quantizer, attention and cache stages (their init's memory_space). */
    int32_t (*memory_space)(void *self);

    /* ---- rows (since 1.1): what a mixture-of-experts layer needs ----------------------- */
    /* The host runs an expert on the tokens routed to it: it gathers their rows, multiplies,
     * scatters the results into a (n_tok, k, dim) staging buffer, one row per token and slot,
     * and combines each token's k rows with its routing weights. A backend without these two
     * slots cannot run mixture-of-experts models (the host says so at load). */

    /* [main] Optional (since 1.1). For i < n: y[y_ids ? y_ids[i] : i] = x[x_ids ? x_ids[i] : i],
     * rows of dim values; y_ids, x_ids (n) in the backend's memory, or NULL for 0..n-1. The
     * rows of y written are distinct; y and x do not overlap. */
    tsr_status (*copy_rows)(void *self, float *y, const int32_t *y_ids, const float *x,
                            const int32_t *x_ids, int64_t n, int64_t dim);
    /* [main] Optional (since 1.1). y (n, dim): y[t] = sum over s = 0..k-1 of w[t*k+s] *
     * x[t*k+s], x (n*k, dim), w (n*k): each product rounded to f32, then added in slot order
     * starting from the first product (llama.cpp's order for the experts of a token). */
    tsr_status (*weighted_sum)(void *self, float *y, const float *x, const float *w, int64_t n,
                               int64_t k, int64_t dim);
} tsr_backend_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_BACKEND_H */
