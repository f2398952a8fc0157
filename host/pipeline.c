#include "pipeline.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commands.h"
#include "dtype.h"
#include "instances.h"
#include "stage_init.h"

/* The seven matrices of a block, in the order the graph uses them. */
enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, W_PER_LAYER };
static const char *const weight_roles[W_PER_LAYER] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down"};

/* A weight as the graph uses it: the quantizer's tensor, and who multiplies it. */
typedef struct weight {
    tsr_tensor t;
    tsr_instance *quantizer; /* prepared it; releases it */
    bool quantizer_matmul;   /* the backend does not know t.dtype: the quantizer multiplies */
    bool prepared;
} weight;

typedef struct seq_state {
    int64_t id;
    bool prefilled; /* prefill_end has run: later forwards are decode steps */
} seq_state;

struct tsr_pipeline {
    const tsr_config *cfg;
    const tsr_model *model;
    tsr_hparams hp;
    int32_t n_ctx;

    tsr_instance *stage_main[TSR_STAGE_COUNT + 1]; /* the top-level instance of each stage */
    tsr_instance_set instances; /* every instance, for lifecycle calls and destruction */
    tsr_instance **quantizer_at, **attention_at, **cache_at; /* (n_layer) */

    const tsr_backend_vtable *be;
    void *be_self;

    weight *weights; /* (n_layer, W_PER_LAYER) */
    weight output;
    weight tok_embd; /* prepared == false: the file's own rows */
    double n_weights, bits_sum, rmse_sum; /* over the prepared matrices, weighted by size */

    /* Activations in the backend's memory, sized for `cap` rows. */
    int64_t cap;
    float *x, *xn, *q, *k, *v, *attn, *gate, *up, *logits;
    int32_t *ids, *pos; /* host memory */
    tsr_kv_view *views; /* (n_kv_head) */

    seq_state *seqs;
    size_t n_seqs, cap_seqs;

    tsr_stage_times times;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The message a plugin left for a failed call, with the plugin's name. */
static tsr_status plugin_failed(tsr_instance *inst, tsr_status st, const char *what, tsr_error *err) {
    return tsr_error_set(err, st, "%s '%s': %s failed: %s", tsr_stage_name(inst->ref->desc->stage),
                         inst->ref->desc->name, what,
                         tsr_services_take_error(&inst->services, "no reason given"));
}

int tsr_config_threads(const tsr_config *cfg) {
    const tsr_bound_params *b = &cfg->stage[TSR_STAGE_BACKEND].bound;
    for (uint32_t i = 0; i < b->params.count; i++)
        if (!strcmp(b->params.defs[i].name, "threads") && b->params.defs[i].type == TSR_PARAM_INT)
            return b->values[i].u.i > 0 ? (int)b->values[i].u.i : 1;
    return 1;
}

/* ---- weights --------------------------------------------------------------------------- */

static tsr_status prepare_weight(tsr_pipeline *pl, tsr_instance *qi, const tsr_tensor *src,
                                 int32_t layer, const char *role, weight *w, tsr_error *err) {
    const tsr_quantizer_vtable *qv = qi->vtable;
    tsr_weight_in in = {.struct_size = sizeof in, .src = *src, .layer = layer, .role = role};
    tsr_weight_out out = {.struct_size = sizeof out};
    tsr_status st = qv->prepare(qi->self, &in, &out);
    if (st < 0) {
        char what[160];
        snprintf(what, sizeof what, "preparing %s (%s)", src->name ? src->name : role,
                 tsr_dtype_name(src->dtype));
        return plugin_failed(qi, st, what, err);
    }
    w->t = out.dst;
    w->quantizer = qi;
    w->prepared = true;
    double n = (double)src->ne[0] * (double)src->ne[1] * (double)src->ne[2] * (double)src->ne[3];
    pl->n_weights += n;
    pl->bits_sum += out.bits_per_weight * n;
    pl->rmse_sum += out.rel_rmse * n;
    tsr_log(TSR_LOG_DEBUG, qi->ref->desc->name, "%s: %s -> %s, %.3f bits per weight, relative "
            "RMSE %.4g", src->name ? src->name : role, tsr_dtype_name(src->dtype),
            out.dst.dtype < TSR_DTYPE_PLUGIN_FIRST ? tsr_dtype_name(out.dst.dtype) : "own format",
            out.bits_per_weight, out.rel_rmse);
    w->quantizer_matmul = !pl->be->supports(pl->be_self, w->t.dtype);
    if (w->quantizer_matmul && !qv->matmul)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: type %s: neither backend '%s' nor quantizer '%s' can multiply it",
                             src->name ? src->name : role, tsr_dtype_name(w->t.dtype),
                             pl->stage_main[TSR_STAGE_BACKEND]->ref->desc->name,
                             qi->ref->desc->name);
    return TSR_OK;
}

static void release_weight(weight *w) {
    if (!w->prepared) return;
    const tsr_quantizer_vtable *qv = w->quantizer->vtable;
    qv->release(w->quantizer->self, &w->t);
    w->prepared = false;
}

static tsr_status prepare_weights(tsr_pipeline *pl, tsr_error *err) {
    int32_t n_layer = pl->hp.n_layer;
    pl->weights = calloc((size_t)n_layer * W_PER_LAYER, sizeof *pl->weights);
    if (!pl->weights) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (int32_t l = 0; l < n_layer; l++) {
        const tsr_layer_weights *lw = &pl->model->layers[l];
        const tsr_tensor *src[W_PER_LAYER] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo,
                                              &lw->ffn_gate, &lw->ffn_up, &lw->ffn_down};
        for (int i = 0; i < W_PER_LAYER; i++) {
            tsr_status st = prepare_weight(pl, pl->quantizer_at[l], src[i], l, weight_roles[i],
                                           &pl->weights[l * W_PER_LAYER + i], err);
            if (st < 0) return st;
        }
        tsr_progress_report("preparing weights", l + 1, n_layer);
    }
    tsr_instance *qi = pl->stage_main[TSR_STAGE_QUANTIZER];
    tsr_status st = prepare_weight(pl, qi, &pl->model->output, -1, "output", &pl->output, err);
    if (st < 0 || pl->model->output.data == pl->model->tok_embd.data) return st;
    /* The embedding goes through the quantizer too, so a conversion at load gives the rows a
     * converted file would hold; a format the backend cannot read rows of stays the file's. */
    weight *w = &pl->tok_embd;
    st = prepare_weight(pl, qi, &pl->model->tok_embd, -1, "token_embd", w, err);
    if (st >= 0 && !pl->be->supports(pl->be_self, w->t.dtype)) release_weight(w);
    return st;
}

/* The rows the forward pass reads the embeddings from. */
static const tsr_tensor *embeddings(const tsr_pipeline *pl) {
    if (pl->tok_embd.prepared) return &pl->tok_embd.t;
    if (pl->model->output.data == pl->model->tok_embd.data && pl->output.prepared &&
        !pl->output.quantizer_matmul)
        return &pl->output.t;
    return &pl->model->tok_embd;
}

/* ---- buffers --------------------------------------------------------------------------- */

static void *buf_alloc(tsr_pipeline *pl, size_t bytes) {
    if (pl->be->buffer_alloc) {
        void *p = NULL;
        return pl->be->buffer_alloc(pl->be_self, bytes, &p) < 0 ? NULL : p;
    }
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static void buf_free(tsr_pipeline *pl, void *p) {
    if (!p) return;
    if (pl->be->buffer_free) pl->be->buffer_free(pl->be_self, p);
    else free(p);
}

static void free_buffers(tsr_pipeline *pl) {
    float **bufs[] = {&pl->x, &pl->xn, &pl->q, &pl->k, &pl->v, &pl->attn, &pl->gate, &pl->up, &pl->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        buf_free(pl, *bufs[i]);
        *bufs[i] = NULL;
    }
    free(pl->ids);
    free(pl->pos);
    pl->ids = pl->pos = NULL;
    pl->cap = 0;
}

static tsr_status ensure_buffers(tsr_pipeline *pl, int64_t n, tsr_error *err) {
    if (n <= pl->cap) return TSR_OK;
    free_buffers(pl);
    const tsr_hparams *hp = &pl->hp;
    size_t rows = (size_t)n, f = sizeof(float);
    size_t qd = (size_t)hp->n_head * (size_t)hp->head_dim, kvd = (size_t)hp->n_kv_head * (size_t)hp->head_dim;
    pl->x = buf_alloc(pl, rows * (size_t)hp->n_embd * f);
    pl->xn = buf_alloc(pl, rows * (size_t)hp->n_embd * f);
    pl->q = buf_alloc(pl, rows * qd * f);
    pl->k = buf_alloc(pl, rows * kvd * f);
    pl->v = buf_alloc(pl, rows * kvd * f);
    pl->attn = buf_alloc(pl, rows * qd * f);
    pl->gate = buf_alloc(pl, rows * (size_t)hp->n_ff * f);
    pl->up = buf_alloc(pl, rows * (size_t)hp->n_ff * f);
    pl->logits = buf_alloc(pl, rows * (size_t)hp->n_vocab * f);
    pl->ids = malloc(rows * sizeof *pl->ids);
    pl->pos = malloc(rows * sizeof *pl->pos);
    if (!pl->x || !pl->xn || !pl->q || !pl->k || !pl->v || !pl->attn || !pl->gate || !pl->up ||
        !pl->logits || !pl->ids || !pl->pos) {
        free_buffers(pl);
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory for a batch of %lld tokens",
                             (long long)n);
    }
    pl->cap = n;
    return TSR_OK;
}

/* ---- creation -------------------------------------------------------------------------- */

tsr_status tsr_pipeline_create(const tsr_config *cfg, const tsr_registry *reg,
                               const tsr_model *model, tsr_pool *pool, int32_t n_ctx,
                               tsr_pipeline **out, tsr_error *err) {
    *out = NULL;
    tsr_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    pl->cfg = cfg;
    pl->instances = (tsr_instance_set){.reg = reg, .pool = pool};
    pl->model = model;
    pl->hp = model->hp;
    pl->n_ctx = n_ctx;
    int32_t n_layer = pl->hp.n_layer;
    pl->quantizer_at = calloc((size_t)n_layer, sizeof *pl->quantizer_at);
    pl->attention_at = calloc((size_t)n_layer, sizeof *pl->attention_at);
    pl->cache_at = calloc((size_t)n_layer, sizeof *pl->cache_at);
    pl->views = calloc((size_t)pl->hp.n_kv_head, sizeof *pl->views);

    tsr_model_shape shape = {
        .n_layer = n_layer, .n_head = pl->hp.n_head, .n_kv_head = pl->hp.n_kv_head,
        .head_dim = pl->hp.head_dim, .n_embd = pl->hp.n_embd, .n_ctx = n_ctx,
        .n_vocab = pl->hp.n_vocab, .n_seq_max = 16, .n_threads = tsr_pool_size(pool),
        .backend_name = cfg->stage[TSR_STAGE_BACKEND].plugin};
    tsr_status st;
    for (size_t i = 0; i < cfg->n_layers; i++)
        if (cfg->layers[i].last >= n_layer) {
            const tsr_src_loc *at = &cfg->layers[i].loc;
            st = tsr_error_set(err, TSR_E_RANGE, "%s:%d:%d: layers: range [%d, %d] is beyond "
                               "the model's %d layers (0 to %d)", at->file, at->line, at->col,
                               cfg->layers[i].first, cfg->layers[i].last, n_layer, n_layer - 1);
            goto fail;
        }
    tsr_instance_set *set = &pl->instances;
    if ((st = tsr_instance_set_add(set, TSR_STAGE_BACKEND, &cfg->stage[TSR_STAGE_BACKEND], &shape,
                                   &pl->stage_main[TSR_STAGE_BACKEND], err)) < 0)
        goto fail;
    pl->be = pl->stage_main[TSR_STAGE_BACKEND]->vtable;
    pl->be_self = pl->stage_main[TSR_STAGE_BACKEND]->self;
    tsr_instance **main = pl->stage_main;
    if ((st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_QUANTIZER, &shape,
                                         &main[TSR_STAGE_QUANTIZER], pl->quantizer_at, err)) < 0 ||
        (st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_ATTENTION, &shape,
                                         &main[TSR_STAGE_ATTENTION], pl->attention_at, err)) < 0 ||
        (st = tsr_instance_set_per_layer(set, cfg, TSR_STAGE_CACHE, &shape,
                                         &main[TSR_STAGE_CACHE], pl->cache_at, err)) < 0 ||
        (st = tsr_instance_set_add(set, TSR_STAGE_DECODER, &cfg->stage[TSR_STAGE_DECODER], &shape,
                                   &main[TSR_STAGE_DECODER], err)) < 0)
        goto fail;
    if (!pl->be->supports(pl->be_self, model->tok_embd.dtype)) {
        st = tsr_error_set(err, TSR_E_UNSUPPORTED,
                           "token_embd.weight: backend '%s' cannot read rows of type %s",
                           cfg->stage[TSR_STAGE_BACKEND].plugin,
                           tsr_dtype_name(model->tok_embd.dtype));
        goto fail;
    }
    if ((st = prepare_weights(pl, err)) < 0) goto fail;
    *out = pl;
    return TSR_OK;
fail:
    tsr_pipeline_free(pl);
    return st;
}

void tsr_pipeline_free(tsr_pipeline *pl) {
    if (!pl) return;
    for (size_t i = 0; pl->weights && i < (size_t)pl->hp.n_layer * W_PER_LAYER; i++)
        release_weight(&pl->weights[i]);
    release_weight(&pl->output);
    release_weight(&pl->tok_embd);
    while (pl->n_seqs) tsr_pipeline_seq_end(pl, pl->seqs[pl->n_seqs - 1].id);
    if (pl->be) free_buffers(pl);
    tsr_instance_set_free(&pl->instances);
    free(pl->weights);
    free(pl->quantizer_at);
    free(pl->attention_at);
    free(pl->cache_at);
    free(pl->views);
    free(pl->seqs);
    free(pl);
}

/* ---- sequences ------------------------------------------------------------------------- */

static seq_state *find_seq(tsr_pipeline *pl, int64_t id) {
    for (size_t i = 0; i < pl->n_seqs; i++)
        if (pl->seqs[i].id == id) return &pl->seqs[i];
    return NULL;
}

/* Each distinct instance of `stage` once, for lifecycle calls. */
#define FOR_EACH_INSTANCE(pl, stage_value, var)                                         \
    for (size_t var##_i = 0; var##_i < (pl)->instances.n_owned; var##_i++)              \
        for (tsr_instance *var = (pl)->instances.owned[var##_i];                         \
             var && var->ref->desc->stage == (stage_value); var = NULL)

static void add_seq(tsr_pipeline *pl, int64_t id, bool prefilled) {
    if (pl->n_seqs == pl->cap_seqs) {
        pl->cap_seqs = pl->cap_seqs ? pl->cap_seqs * 2 : 4;
        pl->seqs = realloc(pl->seqs, pl->cap_seqs * sizeof *pl->seqs);
    }
    pl->seqs[pl->n_seqs++] = (seq_state){.id = id, .prefilled = prefilled};
}

tsr_status tsr_pipeline_seq_begin(tsr_pipeline *pl, int64_t seq_id, tsr_error *err) {
    if (find_seq(pl, seq_id))
        return tsr_error_set(err, TSR_E_STATE, "sequence %lld is already running", (long long)seq_id);
    FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = cv->seq_begin(c->self, seq_id);
        if (st < 0) return plugin_failed(c, st, "seq_begin", err);
    }
    FOR_EACH_INSTANCE(pl, TSR_STAGE_ATTENTION, a) {
        const tsr_attention_vtable *av = a->vtable;
        tsr_status st = av->seq_begin ? av->seq_begin(a->self, seq_id) : TSR_OK;
        if (st < 0) return plugin_failed(a, st, "seq_begin", err);
    }
    add_seq(pl, seq_id, false);
    return TSR_OK;
}

void tsr_pipeline_seq_end(tsr_pipeline *pl, int64_t seq_id) {
    seq_state *s = find_seq(pl, seq_id);
    if (!s) return;
    *s = pl->seqs[--pl->n_seqs];
    FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) ((const tsr_cache_vtable *)c->vtable)->seq_end(c->self, seq_id);
    FOR_EACH_INSTANCE(pl, TSR_STAGE_ATTENTION, a) {
        const tsr_attention_vtable *av = a->vtable;
        if (av->seq_end) av->seq_end(a->self, seq_id);
    }
}

/* ---- forward --------------------------------------------------------------------------- */

#define TIMED(slot, call)                  \
    do {                                   \
        uint64_t t0_ = now_ns();           \
        st = (call);                       \
        pl->times.slot += now_ns() - t0_;  \
    } while (0)

static tsr_status matmul(tsr_pipeline *pl, float *y, const weight *w, const float *x, int64_t n,
                         tsr_error *err) {
    tsr_status st;
    if (w->quantizer_matmul) {
        const tsr_quantizer_vtable *qv = w->quantizer->vtable;
        TIMED(matmul, qv->matmul(w->quantizer->self, y, &w->t, x, n));
        return st < 0 ? plugin_failed(w->quantizer, st, "matmul", err) : TSR_OK;
    }
    TIMED(matmul, pl->be->matmul(pl->be_self, y, &w->t, x, n));
    return st < 0 ? plugin_failed(pl->stage_main[TSR_STAGE_BACKEND], st, "matmul", err) : TSR_OK;
}

/* Backend element-wise ops share one failure path. */
#define OP(call)                                                                              \
    do {                                                                                      \
        TIMED(other_ops, (call));                                                             \
        if (st < 0) return plugin_failed(pl->stage_main[TSR_STAGE_BACKEND], st, #call, err);  \
    } while (0)

/* Stores one sequence's new K/V of layer l and runs its attention, rows [a, b). */
static tsr_status attend(tsr_pipeline *pl, int32_t l, int64_t seq_id, int32_t phase, int64_t a,
                         int64_t b, tsr_error *err) {
    const tsr_hparams *hp = &pl->hp;
    const int64_t qd = (int64_t)hp->n_head * hp->head_dim, kvd = (int64_t)hp->n_kv_head * hp->head_dim;
    tsr_instance *c = pl->cache_at[l], *at = pl->attention_at[l];
    const tsr_cache_vtable *cv = c->vtable;
    const tsr_attention_vtable *av = at->vtable;
    tsr_status st;
    tsr_kv_write w = {.struct_size = sizeof w, .seq_id = seq_id, .layer = l, .phase = phase,
                      .n = b - a, .pos = pl->pos + a, .k = pl->k + a * kvd, .v = pl->v + a * kvd};
    TIMED(cache, cv->store(c->self, &w));
    if (st < 0) return plugin_failed(c, st, "store", err);
    for (int32_t h = 0; h < hp->n_kv_head; h++)
        pl->views[h] = (tsr_kv_view){.struct_size = sizeof(tsr_kv_view)};
    TIMED(cache, cv->view(c->self, seq_id, l, phase, pl->views));
    if (st < 0) return plugin_failed(c, st, "view", err);
    tsr_attention_call call = {.struct_size = sizeof call, .seq_id = seq_id, .layer = l,
                               .phase = phase, .n_q = b - a, .q = pl->q + a * qd,
                               .q_pos = pl->pos + a, .scale = 1.0f / sqrtf((float)hp->head_dim),
                               .views = pl->views, .out = pl->attn + a * qd};
    TIMED(attention, av->forward(at->self, &call));
    return st < 0 ? plugin_failed(at, st, "forward", err) : TSR_OK;
}

static tsr_status layer_forward(tsr_pipeline *pl, int32_t l, const tsr_batch_entry *entries,
                                int64_t n, tsr_error *err) {
    const tsr_hparams *hp = &pl->hp;
    const tsr_layer_weights *lw = &pl->model->layers[l];
    const weight *w = &pl->weights[l * W_PER_LAYER];
    const int64_t e = hp->n_embd, qd = (int64_t)hp->n_head * hp->head_dim,
                  kvd = (int64_t)hp->n_kv_head * hp->head_dim;
    tsr_status st;

    OP(pl->be->rms_norm(pl->be_self, pl->xn, pl->x, lw->attn_norm.data, n, e, hp->rms_eps));
    if ((st = matmul(pl, pl->q, &w[W_Q], pl->xn, n, err)) < 0) return st;
    if ((st = matmul(pl, pl->k, &w[W_K], pl->xn, n, err)) < 0) return st;
    if ((st = matmul(pl, pl->v, &w[W_V], pl->xn, n, err)) < 0) return st;
    if (lw->bq.data) {
        OP(pl->be->add(pl->be_self, pl->q, pl->q, lw->bq.data, n, qd, 1));
        OP(pl->be->add(pl->be_self, pl->k, pl->k, lw->bk.data, n, kvd, 1));
        OP(pl->be->add(pl->be_self, pl->v, pl->v, lw->bv.data, n, kvd, 1));
    }
    OP(pl->be->rope(pl->be_self, pl->q, pl->pos, n, hp->n_head, hp->head_dim, &hp->rope));
    OP(pl->be->rope(pl->be_self, pl->k, pl->pos, n, hp->n_kv_head, hp->head_dim, &hp->rope));

    for (int64_t a = 0; a < n;) {
        int64_t b = a + 1;
        while (b < n && entries[b].seq_id == entries[a].seq_id) b++;
        seq_state *s = find_seq(pl, entries[a].seq_id);
        int32_t phase = s->prefilled ? TSR_PHASE_DECODE : TSR_PHASE_PREFILL;
        if ((st = attend(pl, l, entries[a].seq_id, phase, a, b, err)) < 0) return st;
        a = b;
    }

    if ((st = matmul(pl, pl->xn, &w[W_O], pl->attn, n, err)) < 0) return st;
    OP(pl->be->add(pl->be_self, pl->x, pl->x, pl->xn, n, e, n));
    OP(pl->be->rms_norm(pl->be_self, pl->xn, pl->x, lw->ffn_norm.data, n, e, hp->rms_eps));
    if ((st = matmul(pl, pl->gate, &w[W_GATE], pl->xn, n, err)) < 0) return st;
    if ((st = matmul(pl, pl->up, &w[W_UP], pl->xn, n, err)) < 0) return st;
    OP(pl->be->swiglu(pl->be_self, pl->gate, pl->gate, pl->up, n, hp->n_ff));
    if ((st = matmul(pl, pl->xn, &w[W_DOWN], pl->gate, n, err)) < 0) return st;
    OP(pl->be->add(pl->be_self, pl->x, pl->x, pl->xn, n, e, n));
    return TSR_OK;
}

/* The end-of-call hooks: the first forward of a sequence is its prefill; later ones are
 * decode steps. */
static tsr_status end_of_forward(tsr_pipeline *pl, const tsr_batch_entry *entries, int64_t n,
                                 tsr_error *err) {
    tsr_status st = TSR_OK;
    for (int64_t a = 0; a < n;) {
        int64_t b = a + 1;
        while (b < n && entries[b].seq_id == entries[a].seq_id) b++;
        seq_state *s = find_seq(pl, entries[a].seq_id);
        FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
            const tsr_cache_vtable *cv = c->vtable;
            tsr_status (*hook)(void *, int64_t) = s->prefilled ? cv->step_end : cv->prefill_end;
            if (!hook) continue;
            TIMED(cache, hook(c->self, s->id));
            if (st < 0) return plugin_failed(c, st, s->prefilled ? "step_end" : "prefill_end", err);
        }
        s->prefilled = true;
        a = b;
    }
    return st;
}

tsr_status tsr_pipeline_forward(tsr_pipeline *pl, const tsr_batch_entry *entries, int64_t n,
                                float *logits, tsr_error *err) {
    if (n <= 0) return tsr_error_set(err, TSR_E_INVALID, "forward: empty batch");
    tsr_status st = ensure_buffers(pl, n, err);
    if (st < 0) return st;
    const tsr_hparams *hp = &pl->hp;
    int64_t runs[64];
    size_t n_runs = 0;
    for (int64_t i = 0; i < n; i++) {
        const tsr_batch_entry *b = &entries[i];
        if (b->token < 0 || b->token >= hp->n_vocab)
            return tsr_error_set(err, TSR_E_RANGE, "forward: token %d is outside the vocabulary "
                                 "(%d tokens)", b->token, hp->n_vocab);
        if (b->pos < 0 || b->pos >= pl->n_ctx)
            return tsr_error_set(err, TSR_E_RANGE, "forward: position %d is outside the context "
                                 "(%d positions)", b->pos, pl->n_ctx);
        if (!find_seq(pl, b->seq_id))
            return tsr_error_set(err, TSR_E_STATE, "forward: sequence %lld was not begun",
                                 (long long)b->seq_id);
        if (i == 0 || entries[i - 1].seq_id != b->seq_id) {
            for (size_t r = 0; r < n_runs; r++)
                if (runs[r] == b->seq_id)
                    return tsr_error_set(err, TSR_E_INVALID, "forward: the entries of sequence "
                                         "%lld are not contiguous in the batch", (long long)b->seq_id);
            if (n_runs == sizeof runs / sizeof runs[0])
                return tsr_error_set(err, TSR_E_RANGE, "forward: more than %zu sequences in one "
                                     "batch", sizeof runs / sizeof runs[0]);
            runs[n_runs++] = b->seq_id;
        }
        pl->ids[i] = b->token;
        pl->pos[i] = b->pos;
    }
    const int64_t e = hp->n_embd, nv = hp->n_vocab;
    OP(pl->be->get_rows(pl->be_self, pl->x, embeddings(pl), pl->ids, n));
    for (int32_t l = 0; l < hp->n_layer; l++)
        if ((st = layer_forward(pl, l, entries, n, err)) < 0) return st;
    if ((st = end_of_forward(pl, entries, n, err)) < 0) return st;

    /* Only the rows that want logits go through the output head: runs of consecutive rows. */
    int64_t n_out = 0;
    for (int64_t a = 0; a < n;) {
        if (!entries[a].want_logits) {
            a++;
            continue;
        }
        int64_t b = a + 1;
        while (b < n && entries[b].want_logits) b++;
        float *xn = pl->xn + a * e, *out = pl->logits + n_out * nv;
        OP(pl->be->rms_norm(pl->be_self, xn, pl->x + a * e, pl->model->output_norm.data, b - a,
                            e, hp->rms_eps));
        if ((st = matmul(pl, out, &pl->output, xn, b - a, err)) < 0) return st;
        n_out += b - a;
        a = b;
    }
    if (n_out > 0) {
        size_t bytes = (size_t)n_out * (size_t)nv * sizeof(float);
        if (pl->be->download) OP(pl->be->download(pl->be_self, logits, pl->logits, bytes));
        else memcpy(logits, pl->logits, bytes);
    }
    pl->times.forward_calls++;
    pl->times.tokens += (uint64_t)n;
    return TSR_OK;
}

/* ---- hooks ----------------------------------------------------------------------------- */

tsr_status tsr_pipeline_run_hooks(tsr_pipeline *pl, int32_t event, tsr_error *err) {
    for (size_t i = 0; i < pl->cfg->n_hooks; i++) {
        const tsr_hook_conf *h = &pl->cfg->hooks[i];
        if (h->event != event) continue;
        tsr_instance *inst = pl->stage_main[h->stage];
        const tsr_command *cmd = inst ? tsr_command_find(inst->ref->desc, h->command) : NULL;
        if (!cmd)
            return tsr_error_set(err, TSR_E_INVALID, "%s:%d:%d: hooks: the %s plugin has no "
                                 "command '%s'", h->loc.file, h->loc.line, h->loc.col,
                                 tsr_stage_name(h->stage), h->command);
        char ret[1024];
        tsr_error why;
        if (tsr_command_call(cmd, inst->self, (const char *const *)h->args, h->n_args, ret,
                             sizeof ret, &why) < 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s:%d:%d: hooks: %s%s%s", h->loc.file,
                                 h->loc.line, h->loc.col, why.msg,
                                 inst->services.has_error ? ": " : "",
                                 tsr_services_take_error(&inst->services, ""));
        if (*ret) tsr_log(TSR_LOG_INFO, inst->ref->desc->name, "%s -> %s", h->command, ret);
    }
    return TSR_OK;
}

/* ---- generation ------------------------------------------------------------------------ */

typedef struct gen_state {
    tsr_pipeline *pl;
    int64_t max_new, n_emitted;
    tsr_eog_fn eog;
    void *eog_ctx;
    tsr_token_sink sink;
    void *sink_ctx;
    tsr_error host_err; /* why a host service failed, shown instead of the decoder's words */
    bool host_failed;
} gen_state;

static tsr_status api_forward(void *ctx, const tsr_batch_entry *entries, int64_t n, float *logits) {
    gen_state *g = ctx;
    tsr_status st = tsr_pipeline_forward(g->pl, entries, n, logits, &g->host_err);
    if (st < 0) g->host_failed = true;
    return st;
}

static tsr_status api_seq_fork(void *ctx, int64_t src, int64_t dst) {
    gen_state *g = ctx;
    tsr_pipeline *pl = g->pl;
    seq_state *s = find_seq(pl, src);
    if (!s || find_seq(pl, dst)) {
        g->host_failed = true;
        return tsr_error_set(&g->host_err, TSR_E_STATE, "seq_fork: sequence %lld %s", (long long)(s ? dst : src),
                             s ? "is already running" : "does not exist");
    }
    bool prefilled = s->prefilled;
    FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = cv->seq_fork ? cv->seq_fork(c->self, src, dst) : TSR_E_UNSUPPORTED;
        if (st < 0) {
            g->host_failed = true;
            return plugin_failed(c, st, "seq_fork", &g->host_err);
        }
    }
    add_seq(pl, dst, prefilled);
    return TSR_OK;
}

static tsr_status api_seq_truncate(void *ctx, int64_t seq_id, int32_t n_pos) {
    gen_state *g = ctx;
    FOR_EACH_INSTANCE(g->pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        tsr_status st = cv->seq_truncate ? cv->seq_truncate(c->self, seq_id, n_pos) : TSR_E_UNSUPPORTED;
        if (st < 0) {
            g->host_failed = true;
            return plugin_failed(c, st, "seq_truncate", &g->host_err);
        }
    }
    return TSR_OK;
}

static tsr_status api_seq_end(void *ctx, int64_t seq_id) {
    gen_state *g = ctx;
    tsr_pipeline_seq_end(g->pl, seq_id);
    return TSR_OK;
}

static int32_t api_is_eog(void *ctx, int32_t token) {
    gen_state *g = ctx;
    return g->eog ? g->eog(g->eog_ctx, token) : 0;
}

static int32_t api_emit(void *ctx, const int32_t *tokens, int64_t n) {
    gen_state *g = ctx;
    int64_t take = 0;
    bool stop = false;
    while (take < n && g->n_emitted + take < g->max_new) {
        if (api_is_eog(g, tokens[take])) {
            stop = true;
            break;
        }
        take++;
    }
    if (take > 0) g->sink(g->sink_ctx, tokens, take);
    g->n_emitted += take;
    if (g->n_emitted >= g->max_new) stop = true;
    if (tsr_pipeline_run_hooks(g->pl, TSR_HOOK_AFTER_STEP, &g->host_err) < 0) {
        g->host_failed = true;
        stop = true;
    }
    return stop ? 1 : 0;
}

static uint64_t host_time(const tsr_pipeline *pl) {
    return pl->times.matmul + pl->times.attention + pl->times.cache + pl->times.other_ops;
}

tsr_status tsr_pipeline_generate(tsr_pipeline *pl, const int32_t *prompt, int64_t n_prompt,
                                 int64_t max_new_tokens, tsr_eog_fn eog, void *eog_ctx,
                                 tsr_token_sink sink, void *sink_ctx, int64_t *n_generated,
                                 tsr_error *err) {
    *n_generated = 0;
    if (n_prompt <= 0) return tsr_error_set(err, TSR_E_INVALID, "generate: the prompt is empty");
    if (n_prompt + max_new_tokens > pl->n_ctx)
        return tsr_error_set(err, TSR_E_RANGE, "generate: %lld prompt tokens + %lld new tokens "
                             "exceed the context of %d positions", (long long)n_prompt,
                             (long long)max_new_tokens, pl->n_ctx);
    tsr_status st = tsr_pipeline_seq_begin(pl, 0, err);
    if (st < 0) return st;
    gen_state g = {.pl = pl, .max_new = max_new_tokens, .eog = eog, .eog_ctx = eog_ctx,
                   .sink = sink, .sink_ctx = sink_ctx};
    tsr_decode_api api = {.struct_size = sizeof api, .ctx = &g, .n_vocab = pl->hp.n_vocab,
                          .n_ctx = pl->n_ctx, .forward = api_forward, .seq_fork = api_seq_fork,
                          .seq_truncate = api_seq_truncate, .seq_end = api_seq_end,
                          .emit = api_emit, .is_eog = api_is_eog};
    tsr_generate_request req = {.struct_size = sizeof req, .prompt = prompt,
                                .n_prompt = n_prompt, .max_new_tokens = max_new_tokens};
    tsr_instance *dec = pl->stage_main[TSR_STAGE_DECODER];
    const tsr_decoder_vtable *dv = dec->vtable;
    /* Decoder time is what generate() took outside the host's own work. */
    uint64_t host0 = host_time(pl), t0 = now_ns();
    if (max_new_tokens > 0) st = dv->generate(dec->self, &api, &req);
    uint64_t spent = now_ns() - t0, host = host_time(pl) - host0;
    pl->times.decoder += spent > host ? spent - host : 0;
    /* at_end hooks see the request's state (its cache, its counters) before it is freed. */
    if (st >= 0 && !g.host_failed && tsr_pipeline_run_hooks(pl, TSR_HOOK_AT_END, &g.host_err) < 0)
        g.host_failed = true;
    while (pl->n_seqs) tsr_pipeline_seq_end(pl, pl->seqs[pl->n_seqs - 1].id);
    *n_generated = g.n_emitted;
    if (g.host_failed) {
        *err = g.host_err;
        return st < 0 ? st : TSR_E_INTERNAL;
    }
    if (st < 0) return plugin_failed(dec, st, "generate", err);
    return TSR_OK;
}

const tsr_stage_times *tsr_pipeline_times(const tsr_pipeline *pl) { return &pl->times; }

void tsr_pipeline_weight_quality(const tsr_pipeline *pl, double *bits_per_weight,
                                 double *rel_rmse) {
    *bits_per_weight = pl->n_weights > 0 ? pl->bits_sum / pl->n_weights : 0;
    *rel_rmse = pl->n_weights > 0 ? pl->rmse_sum / pl->n_weights : 0;
}

static uint64_t weight_bytes(const weight *w) {
    return (uint64_t)w->t.row_bytes * (uint64_t)(w->t.ne[1] * w->t.ne[2] * w->t.ne[3]);
}

uint64_t tsr_pipeline_weight_bytes(const tsr_pipeline *pl) {
    uint64_t total = weight_bytes(&pl->output);
    for (size_t i = 0; i < (size_t)pl->hp.n_layer * W_PER_LAYER; i++) total += weight_bytes(&pl->weights[i]);
    return total;
}

uint64_t tsr_pipeline_kv_bytes(const tsr_pipeline *pl) {
    uint64_t total = 0;
    FOR_EACH_INSTANCE(pl, TSR_STAGE_CACHE, c) {
        const tsr_cache_vtable *cv = c->vtable;
        if (!cv->stats) continue;
        tsr_cache_stats s = {.struct_size = sizeof s};
        cv->stats(c->self, &s);
        total += s.bytes_reserved;
    }
    return total;
}
