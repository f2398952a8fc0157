#include "model/weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/backend.h>

#include "config/config.h"
#include "files/dtype.h"
#include "plugin/host_services.h"
#include "plugin/instances.h"
#include "plugin/vtable.h"

static const char *const block_roles[TSR_W_PER_LAYER] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

static double n_elements(const tsr_tensor *t) {
    return (double)t->ne[0] * (double)t->ne[1] * (double)t->ne[2] * (double)t->ne[3];
}

tsr_status tsr_weight_prepare(tsr_instance *q, const tsr_tensor *src, int32_t layer,
                              const char *role, tsr_weight *w, tsr_weight_out *report,
                              tsr_error *err) {
    const tsr_quantizer_vtable *qv = q->vtable;
    tsr_weight_in in = {.struct_size = sizeof in, .src = *src, .layer = layer, .role = role};
    tsr_weight_out out = {.struct_size = sizeof out};
    tsr_status st = qv->prepare(q->self, &in, &out);
    const char *name = src->name ? src->name : role;
    if (st < 0) {
        char what[160];
        snprintf(what, sizeof what, "preparing %s (%s)", name, tsr_dtype_name(src->dtype));
        return tsr_instance_failed(q, st, what, err);
    }
    *w = (tsr_weight){.t = out.dst, .on_backend = out.dst, .quantizer = q, .prepared = true};
    if (report) *report = out;
    tsr_log(TSR_LOG_DEBUG, q->ref->desc->name, "%s: %s -> %s, %.3f bits per weight, relative "
            "RMSE %.4g", name, tsr_dtype_name(src->dtype),
            out.dst.dtype < TSR_DTYPE_PLUGIN_FIRST ? tsr_dtype_name(out.dst.dtype) : "own format",
            out.bits_per_weight, out.rel_rmse);
    return TSR_OK;
}

void tsr_weight_release(tsr_weight *w) {
    if (!w->prepared) return;
    const tsr_quantizer_vtable *qv = w->quantizer->vtable;
    qv->release(w->quantizer->self, &w->t);
    w->prepared = false;
}

/* Where backend ops can read `bytes` at `src`: in place for a backend computing on host memory
 * (no buffer_alloc), else a copy uploaded into a buffer of its own, freed with the weights. */
static tsr_status place(tsr_model_weights *mw, const void *src, size_t bytes, const char *what,
                        const void **out, tsr_error *err) {
    tsr_instance *backend = mw->backend;
    const tsr_backend_vtable *be = backend->vtable;
    if (!src || !TSR_VT_HAS(be, buffer_alloc)) {
        *out = src;
        return TSR_OK;
    }
    void **grown = realloc(mw->buffers, (mw->n_buffers + 1) * sizeof *grown);
    if (!grown) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    mw->buffers = grown;
    void *buf = NULL;
    tsr_status st = be->buffer_alloc(backend->self, bytes, &buf);
    if (st < 0) return tsr_instance_failed(backend, st, "buffer_alloc", err);
    mw->buffers[mw->n_buffers++] = buf;
    if ((st = be->upload(backend->self, buf, src, bytes)) < 0) {
        char call[160];
        snprintf(call, sizeof call, "upload of %s", what);
        return tsr_instance_failed(backend, st, call, err);
    }
    *out = buf;
    return TSR_OK;
}

static uint64_t tensor_bytes(const tsr_tensor *t) {
    return (uint64_t)t->row_bytes * (uint64_t)(t->ne[1] * t->ne[2] * t->ne[3]);
}

/* A copy of `t` whose data lies in the backend's memory. */
static tsr_status place_tensor(tsr_model_weights *mw, const tsr_tensor *t, tsr_tensor *out,
                               tsr_error *err) {
    *out = *t;
    const void *data = NULL;
    tsr_status st = place(mw, t->data, (size_t)tensor_bytes(t), t->name ? t->name : "a weight",
                          &data, err);
    out->data = (void *)data;
    return st;
}

/* A norm weight or bias of n floats (absent when its data is NULL) in the backend's memory. */
static tsr_status place_vector(tsr_model_weights *mw, const tsr_tensor *t, const float **out,
                               tsr_error *err) {
    const void *data = NULL;
    tsr_status st = place(mw, t->data, (size_t)t->ne[0] * sizeof(float),
                          t->name ? t->name : "a vector", &data, err);
    *out = data;
    return st;
}

/* Prepares one model matrix, decides who multiplies it, and places it for the backend when
 * the backend does. */
static tsr_status prepare_matrix(tsr_model_weights *mw, tsr_instance *q, const tsr_tensor *src,
                                 int32_t layer, const char *role, tsr_weight *w,
                                 tsr_error *err) {
    tsr_weight_out out;
    tsr_status st = tsr_weight_prepare(q, src, layer, role, w, &out, err);
    if (st < 0) return st;
    double n = n_elements(src);
    mw->n_weights += n;
    mw->bits_sum += out.bits_per_weight * n;
    mw->rmse_sum += out.rel_rmse * n;
    tsr_instance *backend = mw->backend;
    const tsr_backend_vtable *be = backend->vtable;
    const tsr_quantizer_vtable *qv = q->vtable;
    w->quantizer_matmul = !be->supports(backend->self, w->t.dtype);
    if (w->quantizer_matmul && !TSR_VT_HAS(qv, matmul))
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: type %s: neither backend '%s' nor quantizer '%s' can multiply it",
                             src->name ? src->name : role, tsr_dtype_name(w->t.dtype),
                             backend->ref->desc->name, q->ref->desc->name);
    return w->quantizer_matmul ? TSR_OK : place_tensor(mw, &w->t, &w->on_backend, err);
}

static tsr_status place_vectors(tsr_model_weights *mw, const tsr_model *model, tsr_error *err) {
    tsr_status st = TSR_OK;
    for (int32_t l = 0; st >= 0 && l < mw->n_layer; l++) {
        const tsr_layer_weights *lw = &model->layers[l];
        tsr_block_vectors *v = &mw->vectors[l];
        if ((st = place_vector(mw, &lw->attn_norm, &v->attn_norm, err)) < 0 ||
            (st = place_vector(mw, &lw->ffn_norm, &v->ffn_norm, err)) < 0 ||
            (st = place_vector(mw, &lw->bq, &v->bq, err)) < 0 ||
            (st = place_vector(mw, &lw->bk, &v->bk, err)) < 0)
            break;
        st = place_vector(mw, &lw->bv, &v->bv, err);
    }
    return st < 0 ? st : place_vector(mw, &model->output_norm, &mw->output_norm, err);
}

/* The rows get_rows reads: the prepared embeddings, the output head when it is the same tensor
 * and the backend multiplies it, else the file's own rows placed for the backend. */
static tsr_status place_embeddings(tsr_model_weights *mw, const tsr_model *model,
                                   tsr_error *err) {
    if (mw->tok_embd.prepared) {
        mw->embeddings = mw->tok_embd.on_backend;
        return TSR_OK;
    }
    if (model->output.data == model->tok_embd.data && !mw->output.quantizer_matmul) {
        mw->embeddings = mw->output.on_backend;
        return TSR_OK;
    }
    return place_tensor(mw, &model->tok_embd, &mw->embeddings, err);
}

tsr_status tsr_model_weights_prepare(tsr_model_weights *mw, const tsr_model *model,
                                     tsr_instance *quantizer, tsr_instance *const *quantizer_at,
                                     tsr_instance *backend, tsr_error *err) {
    int32_t n_layer = model->hp.n_layer;
    *mw = (tsr_model_weights){.n_layer = n_layer, .backend = backend};
    mw->blocks = calloc((size_t)n_layer * TSR_W_PER_LAYER, sizeof *mw->blocks);
    mw->vectors = calloc((size_t)n_layer, sizeof *mw->vectors);
    if (!mw->blocks || !mw->vectors) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (int32_t l = 0; l < n_layer; l++) {
        const tsr_layer_weights *lw = &model->layers[l];
        const tsr_tensor *src[TSR_W_PER_LAYER] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo,
                                                  &lw->ffn_gate, &lw->ffn_up, &lw->ffn_down};
        for (int i = 0; i < TSR_W_PER_LAYER; i++) {
            tsr_status st = prepare_matrix(mw, quantizer_at[l], src[i], l, block_roles[i],
                                           &mw->blocks[l * TSR_W_PER_LAYER + i], err);
            if (st < 0) return st;
        }
        tsr_progress_report("preparing weights", l + 1, n_layer);
    }
    tsr_status st = prepare_matrix(mw, quantizer, &model->output, -1, "output", &mw->output, err);
    /* The embedding goes through the quantizer too, so a conversion at load gives the rows a
     * converted file would hold; a format the backend cannot read rows of stays the file's. */
    if (st >= 0 && model->output.data != model->tok_embd.data) {
        st = prepare_matrix(mw, quantizer, &model->tok_embd, -1, "token_embd", &mw->tok_embd,
                            err);
        if (st >= 0 && mw->tok_embd.quantizer_matmul) tsr_weight_release(&mw->tok_embd);
    }
    if (st >= 0) st = place_vectors(mw, model, err);
    return st < 0 ? st : place_embeddings(mw, model, err);
}

void tsr_model_weights_release(tsr_model_weights *mw) {
    for (size_t i = 0; mw->blocks && i < (size_t)mw->n_layer * TSR_W_PER_LAYER; i++)
        tsr_weight_release(&mw->blocks[i]);
    tsr_weight_release(&mw->output);
    tsr_weight_release(&mw->tok_embd);
    const tsr_backend_vtable *be = mw->backend ? mw->backend->vtable : NULL;
    for (size_t i = 0; i < mw->n_buffers; i++) be->buffer_free(mw->backend->self, mw->buffers[i]);
    free(mw->buffers);
    free(mw->blocks);
    free(mw->vectors);
    mw->buffers = NULL;
    mw->blocks = NULL;
    mw->vectors = NULL;
    mw->n_buffers = 0;
}

uint64_t tsr_weight_bytes(const tsr_weight *w) { return tensor_bytes(&w->t); }
