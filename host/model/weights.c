#include "model/weights.h"

#include <stdio.h>
#include <stdlib.h>

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
    *w = (tsr_weight){.t = out.dst, .quantizer = q, .prepared = true};
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

uint64_t tsr_weight_bytes(const tsr_weight *w) {
    return (uint64_t)w->t.row_bytes * (uint64_t)(w->t.ne[1] * w->t.ne[2] * w->t.ne[3]);
}

/* Prepares one model matrix and decides who multiplies it. */
static tsr_status prepare_matrix(tsr_model_weights *mw, tsr_instance *q, tsr_instance *backend,
                                 const tsr_tensor *src, int32_t layer, const char *role,
                                 tsr_weight *w, tsr_error *err) {
    tsr_weight_out out;
    tsr_status st = tsr_weight_prepare(q, src, layer, role, w, &out, err);
    if (st < 0) return st;
    double n = n_elements(src);
    mw->n_weights += n;
    mw->bits_sum += out.bits_per_weight * n;
    mw->rmse_sum += out.rel_rmse * n;
    const tsr_backend_vtable *be = backend->vtable;
    const tsr_quantizer_vtable *qv = q->vtable;
    w->quantizer_matmul = !be->supports(backend->self, w->t.dtype);
    if (w->quantizer_matmul && !TSR_VT_HAS(qv, matmul))
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: type %s: neither backend '%s' nor quantizer '%s' can multiply it",
                             src->name ? src->name : role, tsr_dtype_name(w->t.dtype),
                             backend->ref->desc->name, q->ref->desc->name);
    return TSR_OK;
}

tsr_status tsr_model_weights_prepare(tsr_model_weights *mw, const tsr_model *model,
                                     tsr_instance *quantizer, tsr_instance *const *quantizer_at,
                                     tsr_instance *backend, tsr_error *err) {
    int32_t n_layer = model->hp.n_layer;
    *mw = (tsr_model_weights){.n_layer = n_layer};
    mw->blocks = calloc((size_t)n_layer * TSR_W_PER_LAYER, sizeof *mw->blocks);
    if (!mw->blocks) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (int32_t l = 0; l < n_layer; l++) {
        const tsr_layer_weights *lw = &model->layers[l];
        const tsr_tensor *src[TSR_W_PER_LAYER] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo,
                                                  &lw->ffn_gate, &lw->ffn_up, &lw->ffn_down};
        for (int i = 0; i < TSR_W_PER_LAYER; i++) {
            tsr_status st = prepare_matrix(mw, quantizer_at[l], backend, src[i], l, block_roles[i],
                                           &mw->blocks[l * TSR_W_PER_LAYER + i], err);
            if (st < 0) return st;
        }
        tsr_progress_report("preparing weights", l + 1, n_layer);
    }
    tsr_status st = prepare_matrix(mw, quantizer, backend, &model->output, -1, "output",
                                   &mw->output, err);
    if (st < 0 || model->output.data == model->tok_embd.data) return st;
    /* The embedding goes through the quantizer too, so a conversion at load gives the rows a
     * converted file would hold; a format the backend cannot read rows of stays the file's. */
    st = prepare_matrix(mw, quantizer, backend, &model->tok_embd, -1, "token_embd", &mw->tok_embd,
                        err);
    if (st >= 0 && mw->tok_embd.quantizer_matmul) tsr_weight_release(&mw->tok_embd);
    return st;
}

void tsr_model_weights_release(tsr_model_weights *mw) {
    for (size_t i = 0; mw->blocks && i < (size_t)mw->n_layer * TSR_W_PER_LAYER; i++)
        tsr_weight_release(&mw->blocks[i]);
    tsr_weight_release(&mw->output);
    tsr_weight_release(&mw->tok_embd);
    free(mw->blocks);
    mw->blocks = NULL;
}

const tsr_tensor *tsr_model_weights_embeddings(const tsr_model_weights *mw,
                                               const tsr_model *model) {
    if (mw->tok_embd.prepared) return &mw->tok_embd.t;
    if (model->output.data == model->tok_embd.data && mw->output.prepared &&
        !mw->output.quantizer_matmul)
        return &mw->output.t;
    return &model->tok_embd;
}
