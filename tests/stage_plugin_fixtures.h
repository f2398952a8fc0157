/* Shared by the tests that load stage plugins from their .so files: an instance opened through
 * the host's loader (registry, parameters bound from text, stage init from a shape), and
 * attention test data: a deterministic random problem (queries, K/V in F32 and F16, positions
 * with holes in any order), the views that expose it as F32, F16 or loaded ("plugin dtype")
 * storage, a run of it, and the row-wise comparison. */
#ifndef TESSERA_TESTS_STAGE_PLUGIN_FIXTURES_H
#define TESSERA_TESTS_STAGE_PLUGIN_FIXTURES_H

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

#include "plugin/loader.h"
#include "config/params.h"
#include "plugin/stage_init.h"
#include "testutil.h"

/* Deterministic data (tsr_test_rng_unit). */
static uint64_t rng_state;
static inline void rng_seed(uint64_t s) { rng_state = s * 2654435761u + 1; }

/* One attention problem: n_kv entries per KV head with positions (holes, any order), stored
 * with a row stride larger than head_dim, and n_q queries. */
typedef struct attn_case {
    int32_t n_head, n_kv_head, head_dim;
    int64_t n_q, n_kv;
    float *q, *k, *v;      /* q (n_q, n_head, hd); k, v (n_kv_head, n_kv, stride) */
    uint16_t *k16, *v16;   /* the same in F16 */
    int32_t *q_pos, *kv_pos;
    int32_t stride;        /* elements between rows */
} attn_case;

static inline void attn_case_make(attn_case *c, uint64_t seed, int32_t n_head, int32_t n_kv_head,
                                  int32_t hd, int64_t n_q, int64_t n_kv) {
    rng_seed(seed);
    *c = (attn_case){.n_head = n_head, .n_kv_head = n_kv_head, .head_dim = hd, .n_q = n_q,
                     .n_kv = n_kv, .stride = hd + 3};
    size_t kv_elems = (size_t)(n_kv_head * n_kv * c->stride);
    c->q = malloc(sizeof(float) * (size_t)(n_q * n_head * hd));
    c->k = malloc(sizeof(float) * kv_elems);
    c->v = malloc(sizeof(float) * kv_elems);
    c->k16 = malloc(2 * kv_elems);
    c->v16 = malloc(2 * kv_elems);
    c->q_pos = malloc(sizeof(int32_t) * (size_t)n_q);
    c->kv_pos = malloc(sizeof(int32_t) * (size_t)(n_kv ? n_kv : 1));
    for (int64_t i = 0; i < n_q * n_head * hd; i++) c->q[i] = 2.0f * tsr_test_rng_unit(&rng_state);
    for (size_t i = 0; i < kv_elems; i++) {
        c->k[i] = 2.0f * tsr_test_rng_unit(&rng_state);
        c->v[i] = tsr_test_rng_unit(&rng_state);
        c->k16[i] = tsr_f32_to_f16(c->k[i]);
        c->v16[i] = tsr_f32_to_f16(c->v[i]);
    }
    /* Positions with holes (as after eviction): every entry skips 0..2 positions; then the
     * order is shuffled, which views allow. */
    int32_t p = 0;
    for (int64_t j = 0; j < n_kv; j++) {
        p += 1 + (int32_t)((tsr_test_rng_unit(&rng_state) + 1.0f) * 1.5f);
        c->kv_pos[j] = p;
    }
    for (int64_t j = n_kv - 1; j > 0; j--) {
        int64_t r = (int64_t)((tsr_test_rng_unit(&rng_state) + 1.0f) * 0.5f * (float)(j + 1)) % (j + 1);
        int32_t t = c->kv_pos[j];
        c->kv_pos[j] = c->kv_pos[r];
        c->kv_pos[r] = t;
    }
    /* Queries spread over the whole range; with several, the first one sees nothing. */
    for (int64_t i = 0; i < n_q; i++)
        c->q_pos[i] = (int32_t)(p * (i + 1) / n_q) - (i == 0 && n_q > 1) * p;
}

static inline void attn_case_free(attn_case *c) {
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->k16);
    free(c->v16);
    free(c->q_pos);
    free(c->kv_pos);
}

/* Loaders for a "plugin dtype" view: rows of f32 arrays described by load_ctx. */
typedef struct load_src {
    const float *k, *v;
    int32_t stride, hd;
} load_src;

static inline void load_rows(const float *base, const load_src *s, int64_t j0, int64_t n,
                             float *dst) {
    for (int64_t r = 0; r < n; r++)
        memcpy(dst + r * s->hd, base + (j0 + r) * s->stride, sizeof(float) * (size_t)s->hd);
}
static inline void load_k_rows(const void *ctx, int64_t j0, int64_t n, float *dst) {
    load_rows(((const load_src *)ctx)->k, ctx, j0, n, dst);
}
static inline void load_v_rows(const void *ctx, int64_t j0, int64_t n, float *dst) {
    load_rows(((const load_src *)ctx)->v, ctx, j0, n, dst);
}

enum { VIEW_F32, VIEW_F16, VIEW_LOADED };

/* One view per KV head of `c` in storage `kind` (loaded views get dtype `loaded_dtype`, their
 * loaders reading srcs[g]); score_acc (n_kv_head, n_kv) or NULL. views and srcs hold
 * c->n_kv_head entries. */
static inline void attn_case_views(const attn_case *c, int kind, int32_t loaded_dtype,
                                   int32_t score_from, float *score_acc, tsr_kv_view *views,
                                   load_src *srcs) {
    for (int32_t g = 0; g < c->n_kv_head; g++) {
        size_t off = (size_t)(g * c->n_kv * c->stride);
        views[g] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = c->n_kv, .pos = c->kv_pos};
        if (kind == VIEW_F16) {
            views[g].dtype = TSR_DTYPE_F16;
            views[g].k = c->k16 + off;
            views[g].v = c->v16 + off;
            views[g].k_stride = views[g].v_stride = 2 * (size_t)c->stride;
        } else if (kind == VIEW_F32) {
            views[g].dtype = TSR_DTYPE_F32;
            views[g].k = c->k + off;
            views[g].v = c->v + off;
            views[g].k_stride = views[g].v_stride = 4 * (size_t)c->stride;
        } else {
            views[g].dtype = loaded_dtype;
            srcs[g] = (load_src){c->k + off, c->v + off, c->stride, c->head_dim};
            views[g].load_k = load_k_rows;
            views[g].load_v = load_v_rows;
            views[g].load_ctx = &srcs[g];
        }
        if (score_acc) {
            views[g].score_acc = score_acc + g * c->n_kv;
            views[g].score_from_pos = score_from;
        }
    }
}

/* max |ref - got| over each (query, head) row <= tol * max |ref| of that row. */
static inline void assert_rows_close(const float *ref, const float *got, int64_t n_rows,
                                     int32_t hd, double tol, const char *what) {
    for (int64_t r = 0; r < n_rows; r++) {
        double scale = 0.0, diff = 0.0;
        for (int32_t d = 0; d < hd; d++) {
            scale = fmax(scale, fabs(ref[r * hd + d]));
            diff = fmax(diff, fabs((double)ref[r * hd + d] - got[r * hd + d]));
        }
        ck_assert_msg(diff <= tol * scale, "%s: row %lld: max diff %g, row scale %g", what,
                      (long long)r, diff, scale);
    }
}

/* ---- plugin instances ---------------------------------------------------------------------- */

/* One plugin instance with everything it borrows. */
typedef struct fx {
    tsr_pool *pool;
    tsr_registry *reg;
    tsr_bound_params bound;
    tsr_instance *inst;
    const void *vt;
} fx;

/* `kv`: NULL-terminated "key=value" texts, as a config would give them. */
static inline void fx_open(fx *f, int n_threads, int32_t stage, const char *file, const char *name,
                    const char *const *kv, const tsr_model_shape *shape) {
    tsr_error err = {{0}};
    memset(f, 0, sizeof *f);
    f->pool = tsr_pool_create(n_threads);
    ck_assert_ptr_nonnull(f->pool);
    f->reg = tsr_registry_create(f->pool);
    ck_assert_ptr_nonnull(f->reg);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", tsr_test_env("TESSERA_PLUGIN_DIR"), file);
    tsr_status st = tsr_registry_load_file(f->reg, path, &err);
    ck_assert_msg(st == TSR_OK, "%s", err.msg);
    const tsr_plugin_ref *ref = tsr_registry_find(f->reg, stage, name);
    ck_assert_msg(ref != NULL, "plugin %s not registered from %s", name, path);

    tsr_kv_text items[16];
    size_t n = 0;
    for (; kv && kv[n]; n++) {
        ck_assert_uint_lt(n, 16);
        char *text = strdup(kv[n]);
        char *eq = strchr(text, '=');
        ck_assert_ptr_nonnull(eq);
        *eq = '\0';
        items[n] = (tsr_kv_text){.key = text, .value = eq + 1, .loc = {"test", 0, 0}};
    }
    st = tsr_params_bind(ref->desc->params, ref->desc->n_params, name, "stage",
                         (tsr_src_loc){"test", 0, 0}, items, n, &f->bound, &err);
    for (size_t i = 0; i < n; i++) free(items[i].key);
    ck_assert_msg(st == TSR_OK, "%s", err.msg);

    tsr_model_shape synthetic = tsr_model_shape_synthetic();
    tsr_stage_init init;
    const void *initp = tsr_stage_init_fill(stage, shape ? shape : &synthetic, &init);
    st = tsr_instance_create(ref, f->pool, &f->bound.params, initp, &f->inst, &err);
    ck_assert_msg(st == TSR_OK, "%s", err.msg);
    f->vt = f->inst->vtable;
}

static inline void fx_close(fx *f) {
    ck_assert_uint_eq(tsr_instance_destroy(f->inst), 0); /* no leak through host->alloc */
    tsr_bound_params_free(&f->bound);
    tsr_registry_free(f->reg);
    tsr_pool_free(f->pool);
}

static inline const char *fx_error(fx *f) {
    return tsr_services_take_error(&f->inst->services, "");
}

/* An attention instance's forward. */
static inline tsr_status fx_attention_forward(fx *f, const tsr_attention_call *call) {
    const tsr_attention_vtable *vt = f->vt;
    return vt->forward(f->inst->self, call);
}

/* Runs `f` (an attention instance) on the case; out (n_q, n_head, hd); score_acc
 * (n_kv_head, n_kv) or NULL. */
static inline tsr_status attn_run(fx *f, const attn_case *c, int kind, int32_t score_from,
                                  float *out, float *score_acc) {
    tsr_kv_view views[16];
    load_src srcs[16];
    int32_t hd = c->head_dim;
    attn_case_views(c, kind, TSR_DTYPE_PLUGIN_FIRST + 7, score_from, score_acc, views, srcs);
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .seq_id = 0, .layer = 1,
                               .phase = TSR_PHASE_PREFILL, .n_q = c->n_q, .q = c->q,
                               .q_pos = c->q_pos, .scale = 1.0f / sqrtf((float)hd),
                               .views = views, .out = out};
    return fx_attention_forward(f, &call);
}

#endif
