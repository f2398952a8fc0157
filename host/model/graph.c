#include "model/graph.h"

#include <math.h>
#include <stdarg.h>
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

/* Tokens routed to one expert (or to one substitute of a router's), and where their index
 * lists lie in moe_rows: rows to gather at [off, off + m), staging rows to fill at
 * [off + m, off + 2m). */
typedef struct tsr_moe_group {
    int32_t expert;
    const tsr_tensor *const *sub; /* the router's three matrices, or NULL for the expert's */
    int64_t off, m;
} tsr_moe_group;

/* Slots per token of a layer with experts: the k routed ones, and the shared expert. */
static int64_t moe_slots(const tsr_hparams *hp) {
    return hp->n_expert_used + (hp->n_ff_shared > 0);
}

/* Index entries per batch row: the gathered and the staging rows of the k routed slots, and
 * the shared expert's staging row. */
static size_t moe_index_entries(const tsr_hparams *hp) {
    return 2 * (size_t)hp->n_expert_used + 1;
}

/* Rows of the gate and up products: the dense feed-forward's, an expert's, the shared one's. */
static size_t ffn_rows(const tsr_hparams *hp) {
    int32_t ff = hp->n_expert > 0 ? hp->n_ff_expert : hp->n_ff;
    return (size_t)(ff > hp->n_ff_shared ? ff : hp->n_ff_shared);
}

/* Host copies of backend arrays: their own memory when the backend has its own, else the
 * backend's arrays themselves. */
static void *host_copy(const tsr_graph *g, void *dev, size_t bytes) {
    return own_memory(g) ? malloc(bytes ? bytes : 1) : dev;
}

/* Frees a host copy made by host_copy. */
static void free_host_copy(void *host, const void *dev) {
    if (host != dev) free(host);
}

static void moe_free(tsr_graph *g) {
    free_host_copy(g->moe_logits_host, g->moe_logits);
    free_host_copy(g->moe_next_host, g->moe_next);
    free_host_copy(g->moe_hidden_host, g->xn);
    free_host_copy(g->moe_w_host, g->moe_w);
    free_host_copy(g->moe_s_host, g->moe_s);
    free_host_copy(g->moe_rows_host, g->moe_rows);
    float *bufs[] = {g->moe_logits, g->moe_next, g->moe_x, g->moe_y, g->moe_stage, g->moe_w,
                     g->moe_s};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) buf_free(g, bufs[i]);
    buf_free(g, g->moe_rows);
    buf_free(g, g->sub_buf);
    free(g->route_experts);
    free(g->route_prev);
    free(g->route_weights);
    free(g->route_sub);
    free(g->route_done);
    free(g->moe_groups);
    g->moe_logits = g->moe_logits_host = g->moe_next = g->moe_next_host = NULL;
    g->moe_hidden_host = g->moe_x = g->moe_y = g->moe_stage = NULL;
    g->moe_w = g->moe_w_host = g->moe_s = g->moe_s_host = NULL;
    g->moe_rows = g->moe_rows_host = g->route_experts = g->route_prev = NULL;
    g->route_weights = NULL;
    g->route_sub = NULL;
    g->route_done = NULL;
    g->moe_groups = NULL;
    g->sub_buf = NULL;
    g->sub_cap = 0;
}

void tsr_graph_free(tsr_graph *g) {
    moe_free(g);
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

/* The buffers of layers with experts, for `rows` tokens. The staging rows start as zeros:
 * an empty slot's row is weighted by 0 and must be finite. */
static bool moe_alloc(tsr_graph *g, size_t rows) {
    const tsr_hparams *hp = &g->model->hp;
    const size_t f = sizeof(float), e = (size_t)hp->n_embd, x = (size_t)hp->n_expert;
    const size_t k = (size_t)hp->n_expert_used, slots = (size_t)moe_slots(hp);
    const size_t stage = rows * slots * e * f, n_ids = rows * moe_index_entries(hp);
    g->moe_logits = buf_alloc(g, rows * x * f);
    g->moe_next = buf_alloc(g, rows * x * f);
    g->moe_x = buf_alloc(g, rows * e * f);
    g->moe_y = buf_alloc(g, rows * e * f);
    g->moe_stage = buf_alloc(g, stage);
    g->moe_w = buf_alloc(g, rows * slots * f);
    g->moe_s = buf_alloc(g, rows * f);
    g->moe_rows = buf_alloc(g, n_ids * sizeof(int32_t));
    g->moe_logits_host = host_copy(g, g->moe_logits, rows * x * f);
    g->moe_next_host = host_copy(g, g->moe_next, rows * x * f);
    g->moe_hidden_host = host_copy(g, g->xn, rows * e * f);
    g->moe_w_host = host_copy(g, g->moe_w, rows * slots * f);
    g->moe_s_host = host_copy(g, g->moe_s, rows * f);
    g->moe_rows_host = host_copy(g, g->moe_rows, n_ids * sizeof(int32_t));
    g->route_experts = malloc(rows * k * sizeof *g->route_experts);
    g->route_prev = malloc(rows * k * sizeof *g->route_prev);
    g->route_weights = malloc(rows * k * sizeof *g->route_weights);
    g->route_sub = calloc(rows * k * 3, sizeof *g->route_sub);
    g->route_done = malloc(rows * k * sizeof *g->route_done);
    g->moe_groups = malloc(rows * k * sizeof *g->moe_groups);
    if (!g->moe_logits || !g->moe_next || !g->moe_x || !g->moe_y || !g->moe_stage || !g->moe_w ||
        !g->moe_s || !g->moe_rows || !g->moe_logits_host || !g->moe_next_host ||
        !g->moe_hidden_host || !g->moe_w_host || !g->moe_s_host || !g->moe_rows_host ||
        !g->route_experts || !g->route_prev || !g->route_weights || !g->route_sub ||
        !g->route_done || !g->moe_groups)
        return false;
    if (!own_memory(g)) {
        memset(g->moe_stage, 0, stage);
        return true;
    }
    const tsr_backend_vtable *be = g->backend->vtable;
    void *zeros = calloc(1, stage ? stage : 1);
    bool ok = zeros && be->upload(g->backend->self, g->moe_stage, zeros, stage) >= 0;
    free(zeros);
    return ok;
}

static tsr_status ensure_buffers(tsr_graph *g, int64_t n, tsr_error *err) {
    if (n <= g->cap) return TSR_OK;
    tsr_graph_free(g);
    const tsr_hparams *hp = &g->model->hp;
    size_t rows = (size_t)n, f = sizeof(float), ff = ffn_rows(hp);
    size_t qd = (size_t)hp->n_head * (size_t)hp->head_dim, kvd = (size_t)hp->n_kv_head * (size_t)hp->head_dim;
    g->x = buf_alloc(g, rows * (size_t)hp->n_embd * f);
    g->xn = buf_alloc(g, rows * (size_t)hp->n_embd * f);
    g->q = buf_alloc(g, rows * qd * f);
    g->k = buf_alloc(g, rows * kvd * f);
    g->v = buf_alloc(g, rows * kvd * f);
    g->attn = buf_alloc(g, rows * qd * f);
    g->gate = buf_alloc(g, rows * ff * f);
    g->up = buf_alloc(g, rows * ff * f);
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
        !g->views_ext || (hp->n_expert > 0 && !moe_alloc(g, rows))) {
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

/* y = x . W^T with a matrix a layer's router hands back in place of an expert's (host memory,
 * the router's): by the backend when it knows the type, uploaded first when the backend has
 * memory of its own, else by the layer's quantizer. */
static tsr_status matmul_substitute(tsr_graph *g, int32_t l, float *y, const tsr_tensor *w,
                                    const float *x, int64_t n, tsr_error *err) {
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    tsr_status st;
    if (!be->supports(self, w->dtype)) {
        tsr_instance *q = g->quantizer_at[l];
        const tsr_quantizer_vtable *qv = q->vtable;
        TSR_TIMED(g->times.matmul, st, qv->matmul(q->self, y, w, x, n));
        return st < 0 ? tsr_instance_failed(q, st, "matmul of a router's substitute", err)
                      : TSR_OK;
    }
    tsr_tensor t = *w;
    if (own_memory(g)) {
        size_t bytes = w->row_bytes * (size_t)w->ne[1];
        /* the previous product may still read the buffer */
        if (TSR_VT_HAS(be, synchronize)) OP(be->synchronize(self));
        if (bytes > g->sub_cap) {
            buf_free(g, g->sub_buf);
            g->sub_cap = 0;
            if (!(g->sub_buf = buf_alloc(g, bytes)))
                return tsr_error_set(err, TSR_E_NOMEM, "out of memory for a router's "
                                     "substitute matrix of %zu bytes", bytes);
            g->sub_cap = bytes;
        }
        OP(be->upload(self, g->sub_buf, w->data, bytes));
        t.data = g->sub_buf;
    }
    TSR_TIMED(g->times.matmul, st, be->matmul(self, y, &t, x, n));
    return st < 0 ? tsr_instance_failed(g->backend, st, "matmul", err) : TSR_OK;
}

/* A backend product with a matrix placed for it as the file holds it (a router's). */
static tsr_status matmul_placed(tsr_graph *g, float *y, const tsr_tensor *w, const float *x,
                                int64_t n, tsr_error *err) {
    const tsr_backend_vtable *be = g->backend->vtable;
    tsr_status st;
    TSR_TIMED(g->times.matmul, st, be->matmul(g->backend->self, y, w, x, n));
    return st < 0 ? tsr_instance_failed(g->backend, st, "matmul", err) : TSR_OK;
}

/* y (n, n_embd) = down(silu(gate x) * up x) for x (n, n_embd): a dense feed-forward, an
 * expert or the shared expert, with its prepared matrices `own` (gate, up, down) or a
 * router's substitutes `sub`. */
static tsr_status ffn_products(tsr_graph *g, int32_t l, const tsr_weight *own,
                               const tsr_tensor *const *sub, float *y, const float *x,
                               int64_t n, int64_t ff, tsr_error *err) {
    float *out[2] = {g->gate, g->up};
    tsr_status st;
    for (int m = 0; m < 2; m++) {
        st = own ? matmul(g, out[m], &own[m], x, n, err)
                 : matmul_substitute(g, l, out[m], sub[m], x, n, err);
        if (st < 0) return st;
    }
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    OP(be->swiglu(self, g->gate, g->gate, g->up, n, ff));
    return own ? matmul(g, y, &own[2], g->gate, n, err)
               : matmul_substitute(g, l, y, sub[2], g->gate, n, err);
}

/* Copies `bytes` an op wrote at `dev` to `host` (nothing to copy when the backend computes
 * on host memory: they are one array), after the backend's queued work. */
static tsr_status to_host(tsr_graph *g, void *host, const void *dev, size_t bytes,
                          tsr_error *err) {
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    tsr_status st;
    if (TSR_VT_HAS(be, synchronize)) OP(be->synchronize(self));
    if (own_memory(g)) OP(be->download(self, host, dev, bytes));
    return TSR_OK;
}

static tsr_status to_device(tsr_graph *g, void *dev, const void *host, size_t bytes,
                            tsr_error *err) {
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    tsr_status st;
    if (own_memory(g)) OP(be->upload(self, dev, host, bytes));
    return TSR_OK;
}

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

/* ---- layers with experts ----------------------------------------------------------------- */

/* A router's output breaking the rules of <tessera/router.h>, as one line. */
static tsr_status bad_route(const tsr_graph *g, int32_t l, int64_t t, int32_t s, tsr_error *err,
                            const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static tsr_status bad_route(const tsr_graph *g, int32_t l, int64_t t, int32_t s, tsr_error *err,
                            const char *fmt, ...) {
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return tsr_error_set(err, TSR_E_INVALID, "router '%s': layer %d, token %lld, slot %d: %s",
                         g->router_at[l]->ref->desc->name, l, (long long)t, s, why);
}

/* Why `w` cannot stand in for an expert's matrix of ne {n_in, n_out} (written to `why`), or
 * NULL when it can: it has data, that shape, and a type the backend or the layer's quantizer
 * multiplies. */
static const char *substitute_flaw(const tsr_graph *g, int32_t l, const tsr_tensor *w,
                                   int64_t n_in, int64_t n_out, char *why, size_t size) {
    const tsr_backend_vtable *be = g->backend->vtable;
    const tsr_quantizer_vtable *qv = g->quantizer_at[l]->vtable;
    if (!w->data)
        snprintf(why, size, "has no data");
    else if (w->ne[0] != n_in || w->ne[1] != n_out || w->ne[2] != 1 || w->ne[3] != 1)
        snprintf(why, size, "(ne {%lld, %lld}) is not shaped as the expert's matrix (ne {%lld, "
                 "%lld})", (long long)w->ne[0], (long long)w->ne[1], (long long)n_in,
                 (long long)n_out);
    else if (!be->supports(g->backend->self, w->dtype) && !TSR_VT_HAS(qv, matmul))
        snprintf(why, size, "has type %d, which neither the backend nor the layer's quantizer "
                 "multiplies", (int)w->dtype);
    else
        return NULL;
    return why;
}

/* Checks what the router of layer l chose for n tokens. */
static tsr_status check_route(const tsr_graph *g, int32_t l, int64_t n, tsr_error *err) {
    const tsr_hparams *hp = &g->model->hp;
    const int32_t k = hp->n_expert_used, x = hp->n_expert;
    const int64_t e = hp->n_embd, ff = hp->n_ff_expert;
    static const char *const names[3] = {"gate", "up", "down"};
    for (int64_t t = 0; t < n; t++)
        for (int32_t s = 0; s < k; s++) {
            int32_t id = g->route_experts[t * k + s];
            float w = g->route_weights[t * k + s];
            const tsr_tensor *const *sub = g->route_sub + (t * k + s) * 3;
            if (id < -1 || id >= x)
                return bad_route(g, l, t, s, err, "expert %d is outside [-1, %d)", id, x);
            for (int32_t before = 0; id >= 0 && before < s; before++)
                if (g->route_experts[t * k + before] == id)
                    return bad_route(g, l, t, s, err, "expert %d is chosen twice (slots %d and "
                                     "%d)", id, before, s);
            if (id >= 0 && !isfinite(w))
                return bad_route(g, l, t, s, err, "the weight of expert %d is %g", id, (double)w);
            int given = (sub[0] != NULL) + (sub[1] != NULL) + (sub[2] != NULL);
            if (given == 0) continue;
            if (given != 3 || id < 0)
                return bad_route(g, l, t, s, err, "%d substitute matrices for %s; expected all "
                                 "three (gate, up, down) of a chosen expert or none", given,
                                 id < 0 ? "an empty slot" : "its expert");
            for (int m = 0; m < 3; m++) {
                char why[160];
                if (substitute_flaw(g, l, sub[m], m == 2 ? ff : e, m == 2 ? e : ff, why,
                                    sizeof why))
                    return bad_route(g, l, t, s, err, "the substitute %s matrix %s", names[m],
                                     why);
            }
        }
    return TSR_OK;
}

/* Adds the checked choices of layer l for n tokens to g->route_record. */
static void record_route(tsr_graph *g, int32_t l, int64_t n) {
    const tsr_hparams *hp = &g->model->hp;
    tsr_route_record *rec = g->route_record;
    const size_t row = (size_t)l * (size_t)hp->n_expert;
    for (int64_t i = 0; i < n * hp->n_expert_used; i++) {
        int32_t id = g->route_experts[i];
        if (id < 0) continue;
        rec->slots[row + (size_t)id]++;
        rec->weight_sum[row + (size_t)id] += g->route_weights[i];
    }
    rec->tokens[l] += (uint64_t)n;
}

/* Runs the router of layer l on the gate logits (and, when it asked, the next layer's) of the
 * FFN input g->xn, and checks its choices. */
static tsr_status route(tsr_graph *g, int32_t l, int64_t n, tsr_error *err) {
    const tsr_hparams *hp = &g->model->hp;
    const tsr_moe_weights *mw = &g->weights->moe[l];
    const int32_t k = hp->n_expert_used;
    const size_t logits_bytes = (size_t)n * (size_t)hp->n_expert * sizeof(float);
    tsr_status st;
    if ((st = matmul_placed(g, g->moe_logits, &mw->router, g->xn, n, err)) < 0 ||
        (st = to_host(g, g->moe_logits_host, g->moe_logits, logits_bytes, err)) < 0 ||
        (st = to_host(g, g->moe_hidden_host, g->xn,
                      (size_t)n * (size_t)hp->n_embd * sizeof(float), err)) < 0)
        return st;
    /* the next layer this forward runs, when the router asked for its logits */
    int32_t next = -1;
    for (int32_t j = l + 1; (g->router_needs[l] & TSR_ROUTER_NEEDS_NEXT_GATE) && next < 0 &&
                            j < hp->n_layer;
         j++)
        if (!g->skip_layer || !g->skip_layer[j]) next = j;
    if (next >= 0 &&
        ((st = matmul_placed(g, g->moe_next, &g->weights->moe[next].router, g->xn, n, err)) < 0 ||
         (st = to_host(g, g->moe_next_host, g->moe_next, logits_bytes, err)) < 0))
        return st;
    for (int64_t i = 0; i < n * k; i++) {
        g->route_experts[i] = -1;
        g->route_weights[i] = 0.0f;
    }
    memset(g->route_sub, 0, (size_t)n * (size_t)k * 3 * sizeof *g->route_sub);
    tsr_route_call call = {
        .struct_size = sizeof call, .layer = l, .n_tok = n, .gate_logits = g->moe_logits_host,
        .hidden = g->moe_hidden_host, .prev_experts = g->route_prev_valid ? g->route_prev : NULL,
        .k = k, .experts = g->route_experts, .weights = g->route_weights,
        .next_gate_logits = next >= 0 ? g->moe_next_host : NULL, .next_layer = next,
        .substitute = g->route_sub};
    tsr_instance *r = g->router_at[l];
    const tsr_router_vtable *rv = r->vtable;
    TSR_TIMED(g->times.router, st, rv->route(r->self, &call));
    if (st < 0) return tsr_instance_failed(r, st, "route", err);
    if ((st = check_route(g, l, n, err)) < 0) return st;
    if (g->route_record) record_route(g, l, n);
    memcpy(g->route_prev, g->route_experts, (size_t)n * (size_t)k * sizeof *g->route_prev);
    g->route_prev_valid = true;
    return TSR_OK;
}

/* Whether slot i (token i / k) goes to expert `id` through the substitutes `sub` (NULL: the
 * expert's own matrices). */
static bool slot_in(const tsr_graph *g, int64_t i, int32_t id, const tsr_tensor *const *sub) {
    const tsr_tensor *const *mine = g->route_sub + i * 3;
    if (g->route_experts[i] != id) return false;
    return sub ? mine[0] == sub[0] && mine[1] == sub[1] && mine[2] == sub[2] : !mine[0];
}

/* Adds the group of the slots of expert `id` through `sub`, not yet grouped, to the groups and
 * their index lists (the gathered rows, then the staging rows t * slots + s). */
static void add_group(tsr_graph *g, int64_t n, int32_t id, const tsr_tensor *const *sub,
                      size_t *n_groups, int64_t *at) {
    const int32_t k = g->model->hp.n_expert_used;
    const int64_t slots = moe_slots(&g->model->hp);
    /* built aside: the groups hold one per slot, none to spare for an empty one */
    tsr_moe_group grp = {.expert = id, .sub = sub, .off = *at};
    int32_t *rows = g->moe_rows_host + *at;
    for (int64_t i = 0; i < n * k; i++)
        if (!g->route_done[i] && slot_in(g, i, id, sub)) rows[grp.m++] = (int32_t)(i / k);
    for (int64_t j = 0; j < grp.m; j++) {
        int64_t t = rows[j], s = 0;
        while (g->route_experts[t * k + s] != id) s++;
        g->route_done[t * k + s] = true;
        rows[grp.m + j] = (int32_t)(t * slots + s);
    }
    *at += 2 * grp.m;
    if (grp.m > 0) g->moe_groups[(*n_groups)++] = grp;
}

/* Groups the routed slots: per expert, in order, the slots that use its own matrices, then
 * those of each distinct substitute triple. Returns how many groups. */
static size_t group_slots(tsr_graph *g, int64_t n, int64_t *at) {
    const tsr_hparams *hp = &g->model->hp;
    const int32_t k = hp->n_expert_used;
    size_t n_groups = 0;
    memset(g->route_done, 0, (size_t)n * (size_t)k * sizeof *g->route_done);
    for (int32_t id = 0; id < hp->n_expert; id++) {
        add_group(g, n, id, NULL, &n_groups, at);
        for (int64_t i = 0; i < n * k; i++)
            if (!g->route_done[i] && g->route_experts[i] == id)
                add_group(g, n, id, g->route_sub + i * 3, &n_groups, at);
    }
    return n_groups;
}

/* The feed-forward of layer l, which has experts, on the FFN input g->xn (n, n_embd): routed,
 * grouped by expert, mixed; the output replaces the input in g->xn. */
static tsr_status moe_ffn(tsr_graph *g, int32_t l, int64_t n, tsr_error *err) {
    const tsr_hparams *hp = &g->model->hp;
    const tsr_moe_weights *mw = &g->weights->moe[l];
    const tsr_backend_vtable *be = g->backend->vtable;
    void *self = g->backend->self;
    const int64_t e = hp->n_embd, k = hp->n_expert_used, slots = moe_slots(hp);
    const bool shared = mw->shared_gate.data != NULL;
    tsr_status st = route(g, l, n, err);
    if (st < 0) return st;

    /* Mixing weights: the router's, 0 in an empty slot, and the shared expert's gate
     * silu(s) / s, as llama.cpp computes the sigmoid (libm's expf: ggml's scalar silu). */
    if (shared) {
        if ((st = matmul_placed(g, g->moe_s, &mw->shared_gate, g->xn, n, err)) < 0 ||
            (st = to_host(g, g->moe_s_host, g->moe_s, (size_t)n * sizeof(float), err)) < 0)
            return st;
    }
    for (int64_t t = 0; t < n; t++) {
        for (int64_t s = 0; s < k; s++)
            g->moe_w_host[t * slots + s] =
                g->route_experts[t * k + s] >= 0 ? g->route_weights[t * k + s] : 0.0f;
        if (!shared) continue;
        float x = g->moe_s_host[t];
        g->moe_w_host[t * slots + k] = x != 0.0f ? x / (1.0f + expf(-x)) / x : 0.5f;
    }

    int64_t at = 0;
    size_t n_groups = group_slots(g, n, &at);
    int64_t shared_rows = at;
    for (int64_t t = 0; shared && t < n; t++)
        g->moe_rows_host[at++] = (int32_t)(t * slots + k);
    if ((st = to_device(g, g->moe_w, g->moe_w_host, (size_t)(n * slots) * sizeof(float), err)) < 0 ||
        (st = to_device(g, g->moe_rows, g->moe_rows_host, (size_t)at * sizeof(int32_t), err)) < 0)
        return st;

    for (size_t i = 0; i < n_groups; i++) {
        const tsr_moe_group *grp = &g->moe_groups[i];
        const int32_t *gather = g->moe_rows + grp->off, *scatter = gather + grp->m;
        const tsr_weight *own = grp->sub ? NULL : &mw->experts[grp->expert * TSR_EXPERT_MATRICES];
        OP(be->copy_rows(self, g->moe_x, NULL, g->xn, gather, grp->m, e));
        if ((st = ffn_products(g, l, own, grp->sub, g->moe_y, g->moe_x, grp->m, hp->n_ff_expert,
                               err)) < 0)
            return st;
        OP(be->copy_rows(self, g->moe_stage, scatter, g->moe_y, NULL, grp->m, e));
        g->times.expert_bytes +=
            own ? tsr_moe_expert_bytes(g->weights, l, grp->expert)
                : grp->sub[0]->row_bytes * (uint64_t)grp->sub[0]->ne[1] +
                      grp->sub[1]->row_bytes * (uint64_t)grp->sub[1]->ne[1] +
                      grp->sub[2]->row_bytes * (uint64_t)grp->sub[2]->ne[1];
    }
    if (shared) {
        if ((st = ffn_products(g, l, mw->shared, NULL, g->moe_y, g->xn, n, hp->n_ff_shared,
                               err)) < 0)
            return st;
        OP(be->copy_rows(self, g->moe_stage, g->moe_rows + shared_rows, g->moe_y, NULL, n, e));
    }
    OP(be->weighted_sum(self, g->xn, g->moe_stage, g->moe_w, n, slots, e));
    return TSR_OK;
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
    if (vec->q_norm) {
        OP(be->rms_norm(self, g->q, g->q, vec->q_norm, n, qd, hp->rms_eps));
        OP(be->rms_norm(self, g->k, g->k, vec->k_norm, n, kvd, hp->rms_eps));
    }
    OP(be->rope(self, g->q, g->pos_dev, n, hp->n_head, hp->head_dim, &hp->rope));
    OP(be->rope(self, g->k, g->pos_dev, n, hp->n_kv_head, hp->head_dim, &hp->rope));

    if ((st = attend(g, l, runs, n_runs, err)) < 0) return st;

    if ((st = matmul(g, g->xn, &w[TSR_W_O], g->attn, n, err)) < 0) return st;
    OP(be->add(self, g->x, g->x, g->xn, n, e, n));
    OP(be->rms_norm(self, g->xn, g->x, vec->ffn_norm, n, e, hp->rms_eps));
    st = hp->n_expert > 0 ? moe_ffn(g, l, n, err)
                          : ffn_products(g, l, &w[TSR_W_GATE], NULL, g->xn, g->xn, n, hp->n_ff,
                                         err);
    if (st < 0) return st;
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
    g->route_prev_valid = false;
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
