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
                              const char *role, int32_t expert, tsr_weight *w,
                              tsr_weight_out *report, tsr_error *err) {
    const tsr_quantizer_vtable *qv = q->vtable;
    tsr_weight_in in = {.struct_size = sizeof in, .src = *src, .layer = layer, .role = role,
                        .expert = expert};
    tsr_weight_out out = {.struct_size = sizeof out};
    tsr_status st = qv->prepare(q->self, &in, &out);
    char name[160];
    if (expert >= 0)
        snprintf(name, sizeof name, "expert %d of %s", expert, src->name ? src->name : role);
    else
        snprintf(name, sizeof name, "%s", src->name ? src->name : role);
    if (st < 0) {
        char what[200];
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

tsr_tensor tsr_expert_matrix(const tsr_tensor *stack, int32_t e) {
    tsr_tensor t = *stack;
    t.n_dims = 2;
    t.ne[2] = t.ne[3] = 1;
    t.data = (char *)stack->data + (size_t)e * stack->row_bytes * (size_t)stack->ne[1];
    return t;
}

tsr_tensor tsr_layer_expert(const tsr_layer_weights *w, int m, int32_t e) {
    const tsr_tensor *stacks[TSR_EXPERT_MATRICES] = {&w->gate_exps, &w->up_exps, &w->down_exps};
    return stacks[m]->data ? tsr_expert_matrix(stacks[m], e)
                           : w->split[e * TSR_EXPERT_MATRICES + m];
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
                                 int32_t layer, const char *role, int32_t expert, tsr_weight *w,
                                 tsr_error *err) {
    tsr_weight_out out;
    tsr_status st = tsr_weight_prepare(q, src, layer, role, expert, w, &out, err);
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
            (st = place_vector(mw, &lw->bk, &v->bk, err)) < 0 ||
            (st = place_vector(mw, &lw->q_norm, &v->q_norm, err)) < 0 ||
            (st = place_vector(mw, &lw->k_norm, &v->k_norm, err)) < 0)
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

static const char *const shared_roles[TSR_EXPERT_MATRICES] = {"ffn_gate_shexp", "ffn_up_shexp",
                                                              "ffn_down_shexp"};

/* A matrix the backend multiplies as the file holds it (a router's), placed for it. */
static tsr_status place_router(tsr_model_weights *mw, const tsr_tensor *t, tsr_tensor *out,
                               tsr_error *err) {
    tsr_instance *backend = mw->backend;
    const tsr_backend_vtable *be = backend->vtable;
    if (!be->supports(backend->self, t->dtype))
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: backend '%s' cannot multiply type %s",
                             t->name, backend->ref->desc->name, tsr_dtype_name(t->dtype));
    return place_tensor(mw, t, out, err);
}

/* A layer's experts, each matrix offered to the quantizer on its own, and its router and
 * shared expert. */
static tsr_status prepare_moe(tsr_model_weights *mw, tsr_instance *q, const tsr_layer_weights *lw,
                              int32_t l, tsr_moe_weights *moe, tsr_error *err) {
    moe->experts = calloc((size_t)mw->n_expert * TSR_EXPERT_MATRICES, sizeof *moe->experts);
    if (!moe->experts) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    tsr_status st = TSR_OK;
    for (int32_t e = 0; st >= 0 && e < mw->n_expert; e++)
        for (int m = 0; st >= 0 && m < TSR_EXPERT_MATRICES; m++) {
            tsr_tensor src = tsr_layer_expert(lw, m, e);
            st = prepare_matrix(mw, q, &src, l, tsr_expert_roles[m], e,
                                &moe->experts[e * TSR_EXPERT_MATRICES + m], err);
        }
    if (st >= 0) st = place_router(mw, &lw->gate_inp, &moe->router, err);
    if (st < 0 || !lw->gate_inp_shexp.data) return st;
    const tsr_tensor *shared[TSR_EXPERT_MATRICES] = {&lw->gate_shexp, &lw->up_shexp,
                                                     &lw->down_shexp};
    for (int m = 0; st >= 0 && m < TSR_EXPERT_MATRICES; m++)
        st = prepare_matrix(mw, q, shared[m], l, shared_roles[m], -1, &moe->shared[m], err);
    return st < 0 ? st : place_router(mw, &lw->gate_inp_shexp, &moe->shared_gate, err);
}

tsr_status tsr_model_weights_prepare(tsr_model_weights *mw, const tsr_model *model,
                                     tsr_instance *quantizer, tsr_instance *const *quantizer_at,
                                     tsr_instance *backend, tsr_error *err) {
    int32_t n_layer = model->hp.n_layer;
    *mw = (tsr_model_weights){.n_layer = n_layer, .backend = backend,
                              .n_expert = model->hp.n_expert};
    mw->blocks = calloc((size_t)n_layer * TSR_W_PER_LAYER, sizeof *mw->blocks);
    mw->vectors = calloc((size_t)n_layer, sizeof *mw->vectors);
    if (mw->n_expert > 0) mw->moe = calloc((size_t)n_layer, sizeof *mw->moe);
    if (!mw->blocks || !mw->vectors || (mw->n_expert > 0 && !mw->moe))
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (int32_t l = 0; l < n_layer; l++) {
        const tsr_layer_weights *lw = &model->layers[l];
        const tsr_tensor *src[TSR_W_PER_LAYER] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo,
                                                  &lw->ffn_gate, &lw->ffn_up, &lw->ffn_down};
        for (int i = 0; i < TSR_W_PER_LAYER; i++) {
            if (!src[i]->data) continue; /* the dense feed-forward of a layer with experts */
            tsr_status st = prepare_matrix(mw, quantizer_at[l], src[i], l, block_roles[i], -1,
                                           &mw->blocks[l * TSR_W_PER_LAYER + i], err);
            if (st < 0) return st;
        }
        if (mw->moe) {
            tsr_status st = prepare_moe(mw, quantizer_at[l], lw, l, &mw->moe[l], err);
            if (st < 0) return st;
        }
        tsr_progress_report("preparing weights", l + 1, n_layer);
    }
    tsr_status st =
        prepare_matrix(mw, quantizer, &model->output, -1, "output", -1, &mw->output, err);
    /* The embedding goes through the quantizer too, so a conversion at load gives the rows a
     * converted file would hold; a format the backend cannot read rows of stays the file's. */
    if (st >= 0 && model->output.data != model->tok_embd.data) {
        st = prepare_matrix(mw, quantizer, &model->tok_embd, -1, "token_embd", -1, &mw->tok_embd,
                            err);
        if (st >= 0 && mw->tok_embd.quantizer_matmul) tsr_weight_release(&mw->tok_embd);
    }
    if (st >= 0) st = place_vectors(mw, model, err);
    return st < 0 ? st : place_embeddings(mw, model, err);
}

void tsr_model_weights_release(tsr_model_weights *mw) {
    for (size_t i = 0; mw->blocks && i < (size_t)mw->n_layer * TSR_W_PER_LAYER; i++)
        tsr_weight_release(&mw->blocks[i]);
    for (int32_t l = 0; mw->moe && l < mw->n_layer; l++) {
        tsr_moe_weights *moe = &mw->moe[l];
        for (size_t i = 0; moe->experts && i < (size_t)mw->n_expert * TSR_EXPERT_MATRICES; i++)
            tsr_weight_release(&moe->experts[i]);
        for (int m = 0; m < TSR_EXPERT_MATRICES; m++) tsr_weight_release(&moe->shared[m]);
        free(moe->experts);
    }
    free(mw->moe);
    mw->moe = NULL;
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

uint64_t tsr_weight_bytes(const tsr_weight *w) { return w->prepared ? tensor_bytes(&w->t) : 0; }

uint64_t tsr_model_weights_dense_bytes(const tsr_model_weights *mw) {
    uint64_t total = tsr_weight_bytes(&mw->output);
    for (size_t i = 0; i < (size_t)mw->n_layer * TSR_W_PER_LAYER; i++)
        total += tsr_weight_bytes(&mw->blocks[i]);
    for (int32_t l = 0; mw->moe && l < mw->n_layer; l++) {
        const tsr_moe_weights *moe = &mw->moe[l];
        total += tensor_bytes(&moe->router);
        if (moe->shared_gate.data) total += tensor_bytes(&moe->shared_gate);
        for (int m = 0; m < TSR_EXPERT_MATRICES; m++) total += tsr_weight_bytes(&moe->shared[m]);
    }
    return total;
}

uint64_t tsr_moe_expert_bytes(const tsr_model_weights *mw, int32_t layer, int32_t e) {
    const tsr_weight *x = &mw->moe[layer].experts[e * TSR_EXPERT_MATRICES];
    return tsr_weight_bytes(&x[0]) + tsr_weight_bytes(&x[1]) + tsr_weight_bytes(&x[2]);
}
