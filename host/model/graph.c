#include "model/graph.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin/instances.h"
#include "plugin/vtable.h"

/* ---- buffers --------------------------------------------------------------------------- */

static void *buf_alloc(tsr_graph *g, size_t bytes) {
    const tsr_backend_vtable *be = g->backend->vtable;
    void *p = NULL;
    if (TSR_VT_HAS(be, buffer_alloc)) return be->buffer_alloc(g->backend->self, bytes, &p) < 0 ? NULL : p;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static void buf_free(tsr_graph *g, void *p) {
    const tsr_backend_vtable *be = g->backend->vtable;
    if (!p) return;
    if (TSR_VT_HAS(be, buffer_free)) be->buffer_free(g->backend->self, p);
    else free(p);
}

static bool own_memory(const tsr_graph *g) {
    const tsr_backend_vtable *be = g->backend->vtable;
    return TSR_VT_HAS(be, buffer_alloc);
}

void tsr_graph_free(tsr_graph *g) {
    void **bufs[] = {(void **)&g->x,    (void **)&g->xn,     (void **)&g->q,
                     (void **)&g->k,    (void **)&g->v,      (void **)&g->attn,
                     (void **)&g->gate, (void **)&g->up,     (void **)&g->logits,
                     (void **)&g->ids_dev, (void **)&g->pos_dev};
    size_t n_bufs = sizeof bufs / sizeof bufs[0] - (own_memory(g) ? 0 : 2);
    for (size_t i = 0; i < n_bufs; i++) buf_free(g, *bufs[i]);
    free(g->ids);
    free(g->pos);
    free(g->views);
    free(g->views_ext);
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) *bufs[i] = NULL;
    g->ids = g->pos = NULL;
    g->views = NULL;
    g->views_ext = NULL;
    g->cap = 0;
}

static tsr_status ensure_buffers(tsr_graph *g, int64_t n, tsr_error *err) {
    if (n <= g->cap) return TSR_OK;
    tsr_graph_free(g);
    const tsr_hparams *hp = &g->model->hp;
    size_t rows = (size_t)n, f = sizeof(float);
    size_t qd = (size_t)hp->n_head * (size_t)hp->head_dim, kvd = (size_t)hp->n_kv_head * (size_t)hp->head_dim;
    g->x = buf_alloc(g, rows * (size_t)hp->n_embd * f);
    g->xn = buf_alloc(g, rows * (size_t)hp->n_embd * f);
    g->q = buf_alloc(g, rows * qd * f);
    g->k = buf_alloc(g, rows * kvd * f);
    g->v = buf_alloc(g, rows * kvd * f);
    g->attn = buf_alloc(g, rows * qd * f);
    g->gate = buf_alloc(g, rows * (size_t)hp->n_ff * f);
    g->up = buf_alloc(g, rows * (size_t)hp->n_ff * f);
    g->logits = buf_alloc(g, rows * (size_t)hp->n_vocab * f);
    g->ids = malloc(rows * sizeof *g->ids);
    g->pos = malloc(rows * sizeof *g->pos);
    g->ids_dev = own_memory(g) ? buf_alloc(g, rows * sizeof *g->ids) : g->ids;
    g->pos_dev = own_memory(g) ? buf_alloc(g, rows * sizeof *g->pos) : g->pos;
    g->views = calloc((size_t)TSR_GRAPH_MAX_RUNS * (size_t)hp->n_kv_head, sizeof *g->views);
    g->views_ext = calloc((size_t)TSR_GRAPH_MAX_RUNS * (size_t)hp->n_kv_head,
                          sizeof *g->views_ext);
    if (!g->x || !g->xn || !g->q || !g->k || !g->v || !g->attn || !g->gate || !g->up ||
        !g->logits || !g->ids || !g->pos || !g->ids_dev || !g->pos_dev || !g->views ||
        !g->views_ext) {
        tsr_graph_free(g);
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory for a batch of %lld tokens",
                             (long long)n);
    }
    g->cap = n;
    return TSR_OK;
}

/* ---- ops ------------------------------------------------------------------------------- */

static tsr_status matmul(tsr_graph *g, float *y, const tsr_weight *w, const float *x, int64_t n,
                         tsr_error *err) {
    tsr_status st;
    if (w->quantizer_matmul) {
        const tsr_quantizer_vtable *qv = w->quantizer->vtable;
        TSR_TIMED(g->times.matmul, st, qv->matmul(w->quantizer->self, y, &w->t, x, n));
        return st < 0 ? tsr_instance_failed(w->quantizer, st, "matmul", err) : TSR_OK;
    }
    const tsr_backend_vtable *be = g->backend->vtable;
    TSR_TIMED(g->times.matmul, st, be->matmul(g->backend->self, y, &w->on_backend, x, n));
    return st < 0 ? tsr_instance_failed(g->backend, st, "matmul", err) : TSR_OK;
}

/* A backend op of the graph (`be`, `self` in scope), timed as `other_ops`, with one failure
 * path. */
#define OP(call)                                                                 \
    do {                                                                         \
        TSR_TIMED(g->times.other_ops, st, (call));                               \
        if (st < 0) return tsr_instance_failed(g->backend, st, #call, err);     \
    } while (0)

/* Stores the new K/V of run `ri` (one sequence) of layer l, gets its views (in slot ri of the
 * view arrays) and fills its attention call. */
static tsr_status store_and_view(tsr_graph *g, int32_t l, const tsr_seq_run *r, size_t ri,
                                 tsr_attention_call *call, tsr_error *err) {
    const tsr_hparams *hp = &g->model->hp;
    const int64_t qd = (int64_t)hp->n_head * hp->head_dim, kvd = (int64_t)hp->n_kv_head * hp->head_dim;
    const int64_t a = r->first;
    tsr_instance *c = g->cache_at[l];
    const tsr_cache_vtable *cv = c->vtable;
    tsr_status st;
    tsr_kv_write w = {.struct_size = sizeof w, .seq_id = r->seq_id, .layer = l, .phase = r->phase,
                      .n = r->n, .pos = g->pos + a, .k = g->k + a * kvd, .v = g->v + a * kvd};
    TSR_TIMED(g->times.cache, st, cv->store(c->self, &w));
    if (st < 0) return tsr_instance_failed(c, st, "store", err);
    tsr_kv_view *views = g->views + ri * (size_t)hp->n_kv_head;
    tsr_kv_view_ext *ext = g->views_ext + ri * (size_t)hp->n_kv_head;
    for (int32_t h = 0; h < hp->n_kv_head; h++) {
        views[h] = (tsr_kv_view){.struct_size = sizeof(tsr_kv_view)};
        ext[h] = (tsr_kv_view_ext){.struct_size = sizeof(tsr_kv_view_ext)};
    }
    bool has_ext = TSR_VT_HAS(cv, view_ext);
    if (has_ext)
        TSR_TIMED(g->times.cache, st, cv->view_ext(c->self, r->seq_id, l, r->phase, views, ext));
    else
        TSR_TIMED(g->times.cache, st, cv->view(c->self, r->seq_id, l, r->phase, views));
    if (st < 0) return tsr_instance_failed(c, st, has_ext ? "view_ext" : "view", err);
    *call = (tsr_attention_call){
        .struct_size = sizeof *call, .seq_id = r->seq_id, .layer = l, .phase = r->phase,
        .n_q = r->n, .q = g->q + a * qd, .q_pos = g->pos + a,
        .scale = 1.0f / sqrtf((float)hp->head_dim), .views = views, .out = g->attn + a * qd,
        .head_mass = g->head_mass ? g->head_mass + (size_t)l * (size_t)hp->n_head : NULL,
        .stats_sink = g->stats_sink, .stats_window = g->stats_window,
        .views_ext = has_ext ? ext : NULL};
    return TSR_OK;
}

/* Layer l's attention for every sequence of the batch: one forward_batch when the plugin
 * has it and the batch holds several sequences, else one forward per sequence. */
static tsr_status attend(tsr_graph *g, int32_t l, const tsr_seq_run *runs, size_t n_runs,
                         tsr_error *err) {
    tsr_instance *at = g->attention_at[l];
    const tsr_attention_vtable *av = at->vtable;
    tsr_status st;
    if (n_runs > 1 && TSR_VT_HAS(av, forward_batch)) {
        tsr_attention_call calls[TSR_GRAPH_MAX_RUNS];
        const tsr_attention_call *ptrs[TSR_GRAPH_MAX_RUNS];
        for (size_t r = 0; r < n_runs; r++) {
            if ((st = store_and_view(g, l, &runs[r], r, &calls[r], err)) < 0) return st;
            ptrs[r] = &calls[r];
        }
        TSR_TIMED(g->times.attention, st, av->forward_batch(at->self, ptrs, (int64_t)n_runs));
        return st < 0 ? tsr_instance_failed(at, st, "forward_batch", err) : TSR_OK;
    }
    for (size_t r = 0; r < n_runs; r++) {
        tsr_attention_call call;
        if ((st = store_and_view(g, l, &runs[r], 0, &call, err)) < 0) return st;
        TSR_TIMED(g->times.attention, st, av->forward(at->self, &call));
        if (st < 0) return tsr_instance_failed(at, st, "forward", err);
    }
    return TSR_OK;
}

/* The index of the first NaN or infinite value of x (n), or -1. The bit test keeps the loop
 * free of branches so that checking every layer costs little. */
static int64_t first_non_finite(const float *x, int64_t n) {
    uint32_t any = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], sizeof bits);
        any |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    for (int64_t i = 0; any && i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

static tsr_status non_finite(const tsr_graph *g, const char *where, int64_t at, int64_t dim,
                             tsr_error *err) {
    return tsr_error_set(err, TSR_E_RANGE, "%s: the values turned NaN or infinite (token %lld of "
                         "the batch, element %lld): the model's weights are broken",
                         where, (long long)(at / dim), (long long)(at % dim));
}

static tsr_status layer_forward(tsr_graph *g, int32_t l, int64_t n, const tsr_seq_run *runs,
                                size_t n_runs, tsr_error *err) {
    const tsr_hparams *hp = &g->model->hp;
    const tsr_block_vectors *vec = &g->weights->vectors[l];
    const tsr_weight *w = &g->weights->blocks[l * TSR_W_PER_LAYER];
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    const int64_t e = hp->n_embd, qd = (int64_t)hp->n_head * hp->head_dim,
                  kvd = (int64_t)hp->n_kv_head * hp->head_dim;
    tsr_status st;

    OP(be->rms_norm(self, g->xn, g->x, vec->attn_norm, n, e, hp->rms_eps));
    if ((st = matmul(g, g->q, &w[TSR_W_Q], g->xn, n, err)) < 0) return st;
    if ((st = matmul(g, g->k, &w[TSR_W_K], g->xn, n, err)) < 0) return st;
    if ((st = matmul(g, g->v, &w[TSR_W_V], g->xn, n, err)) < 0) return st;
    if (vec->bq) {
        OP(be->add(self, g->q, g->q, vec->bq, n, qd, 1));
        OP(be->add(self, g->k, g->k, vec->bk, n, kvd, 1));
        OP(be->add(self, g->v, g->v, vec->bv, n, kvd, 1));
    }
    OP(be->rope(self, g->q, g->pos_dev, n, hp->n_head, hp->head_dim, &hp->rope));
    OP(be->rope(self, g->k, g->pos_dev, n, hp->n_kv_head, hp->head_dim, &hp->rope));

    if ((st = attend(g, l, runs, n_runs, err)) < 0) return st;

    if ((st = matmul(g, g->xn, &w[TSR_W_O], g->attn, n, err)) < 0) return st;
    OP(be->add(self, g->x, g->x, g->xn, n, e, n));
    OP(be->rms_norm(self, g->xn, g->x, vec->ffn_norm, n, e, hp->rms_eps));
    if ((st = matmul(g, g->gate, &w[TSR_W_GATE], g->xn, n, err)) < 0) return st;
    if ((st = matmul(g, g->up, &w[TSR_W_UP], g->xn, n, err)) < 0) return st;
    OP(be->swiglu(self, g->gate, g->gate, g->up, n, hp->n_ff));
    if ((st = matmul(g, g->xn, &w[TSR_W_DOWN], g->gate, n, err)) < 0) return st;
    OP(be->add(self, g->x, g->x, g->xn, n, e, n));
    return TSR_OK;
}

tsr_status tsr_graph_forward(tsr_graph *g, const tsr_batch_entry *entries, int64_t n,
                             const tsr_seq_run *runs, size_t n_runs, float *logits,
                             tsr_error *err) {
    tsr_status st = ensure_buffers(g, n, err);
    if (st < 0) return st;
    const tsr_hparams *hp = &g->model->hp;
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    for (int64_t i = 0; i < n; i++) {
        g->ids[i] = entries[i].token;
        g->pos[i] = entries[i].pos;
    }
    const int64_t e = hp->n_embd, nv = hp->n_vocab;
    if (own_memory(g)) {
        OP(be->upload(self, g->ids_dev, g->ids, (size_t)n * sizeof *g->ids));
        OP(be->upload(self, g->pos_dev, g->pos, (size_t)n * sizeof *g->pos));
    }
    OP(be->get_rows(self, g->x, &g->weights->embeddings, g->ids_dev, n));
    for (int32_t l = 0; l < hp->n_layer; l++) {
        if (g->skip_layer && g->skip_layer[l]) continue;
        if ((st = layer_forward(g, l, n, runs, n_runs, err)) < 0) return st;
        int64_t bad = g->memory_space == TSR_MEMORY_HOST ? first_non_finite(g->x, n * e) : -1;
        if (bad >= 0) {
            char where[32];
            snprintf(where, sizeof where, "layer %d", l);
            return non_finite(g, where, bad, e, err);
        }
    }

    /* Only the rows that want logits go through the output head: runs of consecutive rows. */
    int64_t n_out = 0;
    for (int64_t a = 0; a < n;) {
        if (!entries[a].want_logits) {
            a++;
            continue;
        }
        int64_t b = a + 1;
        while (b < n && entries[b].want_logits) b++;
        float *xn = g->xn + a * e, *out = g->logits + n_out * nv;
        OP(be->rms_norm(self, xn, g->x + a * e, g->weights->output_norm, b - a, e, hp->rms_eps));
        if ((st = matmul(g, out, &g->weights->output, xn, b - a, err)) < 0) return st;
        n_out += b - a;
        a = b;
    }
    if (n_out > 0) {
        size_t bytes = (size_t)n_out * (size_t)nv * sizeof(float);
        if (TSR_VT_HAS(be, synchronize)) OP(be->synchronize(self));
        if (own_memory(g)) OP(be->download(self, logits, g->logits, bytes));
        else memcpy(logits, g->logits, bytes);
        int64_t bad = first_non_finite(logits, n_out * nv);
        if (bad >= 0) return non_finite(g, "output", bad, nv, err);
    }
    g->times.forward_calls++;
    g->times.tokens += (uint64_t)n;
    return TSR_OK;
}
