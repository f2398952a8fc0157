/*
 * <tessera/sdk_attention.h> -- the parts every CPU attention plugin shares with the others:
 * checking the init shape and backend, keeping the shape, checking a forward call, and the
 * messages they leave. Sharing them keeps the plugins' refusals identical word for word, so a
 * pipeline that swaps one attention plugin for another sees the same errors.
 * Header-only, like <tessera/sdk.h>; plugins link nothing of the host or of kernels/.
 */
#ifndef TESSERA_SDK_ATTENTION_H
#define TESSERA_SDK_ATTENTION_H

#include <stdint.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

/* The shape an attention instance keeps from its init. A plugin's instance struct puts it
 * first, so that tsr_attention_new and tsr_attention_destroy can serve any of them. */
typedef struct tsr_attention_shape {
    const tsr_host *host;
    int32_t n_layer, n_head, n_kv_head, head_dim;
} tsr_attention_shape;

/* Checks the init: positive sizes, n_head a multiple of n_kv_head (and a positive n_ctx when
 * `need_ctx`, which the message then names), and host memory for q and out, since they are read
 * from host memory. Leaves the message through host->set_error. */
static inline tsr_status tsr_attention_check_init(const tsr_host *host,
                                                  const tsr_attention_init *init, int need_ctx) {
    if (init->n_layer <= 0 || init->n_head <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_head % init->n_kv_head != 0 || (need_ctx && init->n_ctx <= 0)) {
        if (need_ctx)
            host->set_error(host->ctx,
                            "shape n_layer %d, n_head %d, n_kv_head %d, head_dim %d, n_ctx %d: "
                            "expected positive sizes with n_head a multiple of n_kv_head",
                            (int)init->n_layer, (int)init->n_head, (int)init->n_kv_head,
                            (int)init->head_dim, (int)init->n_ctx);
        else
            host->set_error(host->ctx,
                            "shape n_layer %d, n_head %d, n_kv_head %d, head_dim %d: expected "
                            "positive sizes with n_head a multiple of n_kv_head",
                            (int)init->n_layer, (int)init->n_head, (int)init->n_kv_head,
                            (int)init->head_dim);
        return TSR_E_INVALID;
    }
    if (init->memory_space != TSR_MEMORY_HOST) {
        host->set_error(host->ctx, "backend '%s' computes in device memory: this plugin reads "
                        "host memory only", init->backend_name ? init->backend_name : "?");
        return TSR_E_UNSUPPORTED;
    }
    return TSR_OK;
}

/* A zeroed instance of `size` bytes (>= sizeof(tsr_attention_shape)) whose leading
 * tsr_attention_shape holds host and the init's sizes; NULL with the message left when out of
 * memory. */
static inline void *tsr_attention_new(const tsr_host *host, const tsr_attention_init *init,
                                      size_t size) {
    tsr_attention_shape *a = tsr_calloc(host, 1, size);
    if (!a) {
        host->set_error(host->ctx, "out of memory");
        return NULL;
    }
    a->host = host;
    a->n_layer = init->n_layer;
    a->n_head = init->n_head;
    a->n_kv_head = init->n_kv_head;
    a->head_dim = init->head_dim;
    return a;
}

/* The vtable's destroy for instances made by tsr_attention_new. */
static inline void tsr_attention_destroy(void *self) {
    tsr_attention_shape *a = self;
    a->host->free(a->host->ctx, self);
}

/* Checks a forward call against the shape: layer in range, the arrays present, and one
 * readable view per KV head. */
static inline tsr_status tsr_attention_check_call(const tsr_attention_shape *a,
                                                  const tsr_attention_call *c) {
    const tsr_host *host = a->host;
    if (c->layer < 0 || c->layer >= a->n_layer) {
        host->set_error(host->ctx, "forward: layer %d outside [0, %d)", (int)c->layer,
                        (int)a->n_layer);
        return TSR_E_RANGE;
    }
    if (c->n_q < 0 || (c->n_q > 0 && (!c->q || !c->q_pos || !c->out)) || !c->views) {
        host->set_error(host->ctx, "forward: layer %d: missing q, q_pos, out or views",
                        (int)c->layer);
        return TSR_E_INVALID;
    }
    for (int32_t g = 0; g < a->n_kv_head; g++) {
        const tsr_kv_view *v = &c->views[g];
        if (v->n < 0 || (v->n > 0 && !v->pos) || !tsr_kv_view_readable(v)) {
            host->set_error(host->ctx,
                            "forward: layer %d: view of KV head %d is not readable (n %lld, "
                            "dtype %d: F32/F16 need k, v and pos; others need load_k/load_v)",
                            (int)c->layer, (int)g, (long long)v->n, (int)v->dtype);
            return TSR_E_INVALID;
        }
    }
    return TSR_OK;
}

/* Raises *max_n to the largest view of the call; returns whether any view asks for
 * score_acc. */
static inline int tsr_attention_scan_views(const tsr_attention_shape *a,
                                           const tsr_attention_call *c, int64_t *max_n) {
    int any_scores = 0;
    for (int32_t g = 0; g < a->n_kv_head; g++) {
        if (c->views[g].n > *max_n) *max_n = c->views[g].n;
        any_scores |= c->views[g].score_acc != NULL;
    }
    return any_scores;
}

/* The failure of a forward call whose scratch (`max_n` the largest view) could not be had. */
static inline tsr_status tsr_attention_nomem(const tsr_attention_shape *a,
                                             const tsr_attention_call *c, int64_t max_n) {
    a->host->set_error(a->host->ctx, "forward: layer %d: out of memory for %lld queries over "
                       "%lld entries", (int)c->layer, (long long)c->n_q, (long long)max_n);
    return TSR_E_NOMEM;
}

#endif
