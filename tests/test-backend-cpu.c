/* The 'cpu' backend and the 'gguf' quantizer, loaded as the host loads them: every backend op
 * (the rows of expert layers too) against its formula computed here (double precision, stated
 * tolerances, exact where the header fixes the roundings), every weight type's
 * product and row lookup, results bit-identical for pools of 1, 2 and 3 threads, and the
 * quantizer's in-place preparation, row dequantization and refusal of unknown types. */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/kernels_cpu.h>

#include "plugin/commands.h"
#include "plugin/loader.h"
#include "config/params.h"
#include "plugin/stage_init.h"
#include "testutil.h"

/* ---- instances -------------------------------------------------------------------------- */

typedef struct plugin {
    tsr_pool *pool;
    tsr_registry *reg;
    tsr_bound_params bound;
    tsr_instance *inst;
} plugin;

static void plugin_open(plugin *p, const char *file, int32_t stage, const char *name,
                        int n_threads) {
    memset(p, 0, sizeof *p);
    tsr_error err = {{0}};
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", tsr_test_env("TESSERA_PLUGIN_DIR"), file);
    p->pool = tsr_pool_create(n_threads);
    ck_assert_ptr_nonnull(p->pool);
    p->reg = tsr_registry_create(p->pool);
    if (tsr_registry_load_file(p->reg, path, &err) < 0) ck_abort_msg("%s", err.msg);
    const tsr_plugin_ref *ref = tsr_registry_find(p->reg, stage, name);
    ck_assert_ptr_nonnull(ref);
    tsr_src_loc loc = {.file = "test"};
    ck_assert_int_eq(tsr_params_bind(ref->desc->params, ref->desc->n_params, name, "stage", loc,
                                     NULL, 0, &p->bound, &err), TSR_OK);
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.n_threads = n_threads;
    tsr_stage_init init;
    if (tsr_instance_create(ref, p->pool, &p->bound.params,
                            tsr_stage_init_fill(stage, &shape, &init), &p->inst, &err) < 0)
        ck_abort_msg("%s", err.msg);
}

static void plugin_close(plugin *p) {
    ck_assert_uint_eq(tsr_instance_destroy(p->inst), 0); /* nothing leaked */
    tsr_bound_params_free(&p->bound);
    tsr_registry_free(p->reg);
    tsr_pool_free(p->pool);
}

static void backend_open(plugin *p, int n_threads) {
    plugin_open(p, "backend-cpu.so", TSR_STAGE_BACKEND, "cpu", n_threads);
}

static void quantizer_open(plugin *p) {
    plugin_open(p, "quantizer-gguf.so", TSR_STAGE_QUANTIZER, "gguf", 1);
}

static const tsr_backend_vtable *be(const plugin *p) { return p->inst->vtable; }
static const tsr_quantizer_vtable *qz(const plugin *p) { return p->inst->vtable; }

/* The message the plugin left with its last error. */
static const char *last_error(plugin *p) {
    return tsr_services_take_error(&p->inst->services, "(none)");
}

/* ---- data ------------------------------------------------------------------------------- */

/* Deterministic values in [-1, 1) (xorshift), so failures reproduce. */
static float rnd(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (float)((double)(*s >> 11) / 4503599627370496.0 - 1.0);
}

static float *rnd_vec(size_t n, uint64_t seed, float scale) {
    float *v = malloc(n * sizeof *v);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) v[i] = rnd(&s) * scale;
    return v;
}

/* IEEE binary16 decoded by its definition, independently of the kernels. */
static double half_value(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return h & 0x8000 ? -v : v;
}

static double bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static const int32_t weight_types[] = {TSR_DTYPE_F32, TSR_DTYPE_F16, TSR_DTYPE_BF16,
                                       TSR_DTYPE_Q8_0};
#define N_WEIGHT_TYPES 4

/* A weight of `type` holding `v` (n_out, n_in) rounded to that type (the kernels' encoders,
 * which test-kernels checks bit for bit), and the rounded values as doubles. */
typedef struct weight {
    tsr_tensor t;
    double *val; /* (n_out, n_in) */
} weight;

static void weight_make(weight *w, int32_t type, const float *v, int64_t n_out, int64_t n_in) {
    size_t row = tsr_row_size(type, n_in);
    ck_assert_uint_gt(row, 0);
    char *data = malloc(row * (size_t)n_out);
    w->val = malloc((size_t)(n_out * n_in) * sizeof *w->val);
    for (int64_t r = 0; r < n_out; r++) {
        const float *src = v + r * n_in;
        char *dst = data + (size_t)r * row;
        double *val = w->val + r * n_in;
        if (type == TSR_DTYPE_F32) {
            memcpy(dst, src, row);
            for (int64_t k = 0; k < n_in; k++) val[k] = src[k];
        } else if (type == TSR_DTYPE_F16 || type == TSR_DTYPE_BF16) {
            uint16_t *h = (uint16_t *)dst;
            if (type == TSR_DTYPE_F16) tsr_fp32_to_fp16_row(h, src, n_in);
            else tsr_fp32_to_bf16_row(h, src, n_in);
            for (int64_t k = 0; k < n_in; k++)
                val[k] = type == TSR_DTYPE_F16 ? half_value(h[k]) : bf16_value(h[k]);
        } else {
            tsr_block_q8_0 *b = (tsr_block_q8_0 *)dst;
            tsr_q8_0_quantize_row(b, src, n_in);
            for (int64_t k = 0; k < n_in; k++)
                val[k] = half_value(b[k / 32].d) * b[k / 32].q[k % 32];
        }
    }
    w->t = (tsr_tensor){.struct_size = sizeof(tsr_tensor), .dtype = type, .n_dims = 2,
                        .ne = {n_in, n_out, 1, 1}, .row_bytes = row, .data = data,
                        .name = "blk.0.test.weight"};
}

static void weight_free(weight *w) {
    free(w->t.data);
    free(w->val);
}

/* Activations as the product sees them, written from the formats' definitions: F16/BF16
 * round to nearest even (the encoders), Q8_0 per block of 32 with d = fp16(amax/127) and
 * q = round-half-even(x * 127/amax); xq and xd receive Q8_0's quants and block scales. */
static void act_reference(double *xa, int8_t *xq, double *xd, int32_t type, const float *x,
                          int64_t n) {
    if (type == TSR_DTYPE_Q8_0) {
        for (int64_t b = 0; b < n / 32; b++) {
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
            float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            xd[b] = half_value(tsr_fp32_to_fp16(amax / 127.0f));
            for (int i = 0; i < 32; i++) {
                xq[b * 32 + i] = (int8_t)nearbyintf(x[b * 32 + i] * id);
                xa[b * 32 + i] = xd[b] * xq[b * 32 + i];
            }
        }
        return;
    }
    for (int64_t k = 0; k < n; k++)
        xa[k] = type == TSR_DTYPE_F32    ? x[k]
                : type == TSR_DTYPE_F16  ? half_value(tsr_fp32_to_fp16(x[k]))
                                         : bf16_value(tsr_fp32_to_bf16(x[k]));
}

/* ---- descriptor --------------------------------------------------------------------------- */

START_TEST(backend_descriptor) {
    plugin p;
    backend_open(&p, 1);
    const tsr_plugin_desc *d = p.inst->ref->desc;
    ck_assert_str_eq(d->name, "cpu");
    ck_assert_uint_eq(d->n_params, 1);
    ck_assert_str_eq(d->params[0].name, "threads");
    ck_assert_int_eq(d->params[0].type, TSR_PARAM_INT);
    ck_assert_str_eq(d->params[0].default_value, "2");
    ck_assert(d->params[0].min == 1 && d->params[0].max == 256);
    /* the isa command names the kernels' level in use */
    tsr_error err = {{0}};
    char ret[64];
    const tsr_command *isa = tsr_command_find(d, "isa");
    ck_assert_ptr_nonnull(isa);
    ck_assert_int_eq(tsr_command_call(isa, p.inst->self, NULL, 0, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, tsr_cpu_level_name(tsr_cpu_level_get()));
    /* the types the kernels multiply: the four of this test at least, no integer type, no
     * plugin type */
    for (int i = 0; i < N_WEIGHT_TYPES; i++)
        ck_assert_int_eq(be(&p)->supports(p.inst->self, weight_types[i]), 1);
    for (int32_t t = 0; t < 40; t++)
        ck_assert_int_eq(be(&p)->supports(p.inst->self, t), tsr_matmul_act_type(t) >= 0);
    ck_assert_int_eq(be(&p)->supports(p.inst->self, TSR_DTYPE_I32), 0);
    ck_assert_int_eq(be(&p)->supports(p.inst->self, TSR_DTYPE_PLUGIN_FIRST), 0);
    plugin_close(&p);
}
END_TEST

/* ---- products --------------------------------------------------------------------------- */

/* y = x . W^T for each type against the double sum of the exact products of the rounded
 * operands. F32/F16/BF16 dots accumulate in f32: |error| <= 4 * FLT_EPSILON * sum|terms|
 * (kernels/README.md). Q8_0: each block's integer dot is exact, d_w*d_x*isum is summed in f32
 * over 8 blocks: |error| <= 16 * FLT_EPSILON * sum|block terms|. */
START_TEST(matmul_matches_double_reference) {
    int32_t type = weight_types[_i];
    const int64_t n_out = 37, n_in = 320, n_tok = 5; /* ragged rows and tokens, 10 blocks */
    float *wv = rnd_vec((size_t)(n_out * n_in), 1 + (uint64_t)_i, 0.5f);
    float *x = rnd_vec((size_t)(n_tok * n_in), 100 + (uint64_t)_i, 2.0f);
    x[7] = 0.0f; /* a zero, and a block of zeros (Q8_0: amax 0) */
    for (int k = 64; k < 96; k++) x[k] = 0.0f;
    weight w;
    weight_make(&w, type, wv, n_out, n_in);
    plugin p;
    backend_open(&p, 2);
    float *y = calloc((size_t)(n_tok * n_out), sizeof *y);
    ck_assert_int_eq(be(&p)->matmul(p.inst->self, y, &w.t, x, n_tok), TSR_OK);

    double *xa = malloc((size_t)n_in * sizeof *xa), xd[16];
    int8_t *xq = malloc((size_t)n_in);
    for (int64_t t = 0; t < n_tok; t++) {
        act_reference(xa, xq, xd, type, x + t * n_in, n_in);
        for (int64_t r = 0; r < n_out; r++) {
            const double *wr = w.val + r * n_in;
            double ref = 0.0, mag = 0.0;
            for (int64_t k = 0; k < n_in; k++) {
                ref += wr[k] * xa[k];
                mag += fabs(wr[k] * xa[k]);
            }
            double tol = (type == TSR_DTYPE_Q8_0 ? 16 : 4) * FLT_EPSILON * mag + 1e-30;
            double got = y[t * n_out + r];
            ck_assert_msg(fabs(got - ref) <= tol, "type %d token %lld row %lld: %.9g vs %.9g "
                          "(tolerance %.3g)", type, (long long)t, (long long)r, got, ref, tol);
        }
    }
    /* one token alone gives the same bits as inside the batch (and the scratch shrinks to it
     * without harm) */
    float *y1 = malloc((size_t)n_out * sizeof *y1);
    ck_assert_int_eq(be(&p)->matmul(p.inst->self, y1, &w.t, x + 3 * n_in, 1), TSR_OK);
    ck_assert_mem_eq(y1, y + 3 * n_out, (size_t)n_out * sizeof *y1);

    free(y1);
    free(xa);
    free(xq);
    free(y);
    free(x);
    free(wv);
    weight_free(&w);
    plugin_close(&p);
}
END_TEST

START_TEST(matmul_refuses_bad_weights) {
    plugin p;
    backend_open(&p, 1);
    float x[256] = {0}, y[4];
    uint8_t data[1024] = {0};
    tsr_tensor w = {.struct_size = sizeof w, .dtype = TSR_DTYPE_I32, .n_dims = 2,
                    .ne = {256, 1, 1, 1}, .row_bytes = 1024, .data = data, .name = "w.i32"};
    ck_assert_int_eq(be(&p)->matmul(p.inst->self, y, &w, x, 1), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(last_error(&p), "matmul: w.i32: the CPU kernels have no product for type 26");
    /* Q8_0 rows must be whole blocks; row_bytes must be the packed size */
    w = (tsr_tensor){.struct_size = sizeof w, .dtype = TSR_DTYPE_Q8_0, .n_dims = 2,
                     .ne = {48, 1, 1, 1}, .row_bytes = 51, .data = data, .name = "w.q8"};
    ck_assert_int_eq(be(&p)->matmul(p.inst->self, y, &w, x, 1), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(last_error(&p), "48 elements"));
    w.ne[0] = 64;
    w.row_bytes = 70;
    ck_assert_int_eq(be(&p)->matmul(p.inst->self, y, &w, x, 1), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(last_error(&p), "row_bytes 70, expected 68"));
    plugin_close(&p);
}
END_TEST

/* ---- row lookups ------------------------------------------------------------------------ */

START_TEST(get_rows_dequantizes_exactly) {
    int32_t type = weight_types[_i];
    const int64_t n_rows = 20, dim = 96;
    float *v = rnd_vec((size_t)(n_rows * dim), 7 + (uint64_t)_i, 3.0f);
    weight w;
    weight_make(&w, type, v, n_rows, dim);
    plugin p;
    backend_open(&p, 3);
    const int32_t ids[] = {19, 0, 5, 5, 12};
    float y[5 * 96];
    ck_assert_int_eq(be(&p)->get_rows(p.inst->self, y, &w.t, ids, 5), TSR_OK);
    for (int i = 0; i < 5; i++)
        for (int64_t k = 0; k < dim; k++)
            ck_assert_msg((double)y[i * dim + k] == w.val[ids[i] * dim + k],
                          "type %d id %d [%lld]: %.9g vs %.9g", type, ids[i], (long long)k,
                          (double)y[i * dim + k], w.val[ids[i] * dim + k]);
    const int32_t bad[] = {3, 20};
    ck_assert_int_eq(be(&p)->get_rows(p.inst->self, y, &w.t, bad, 2), TSR_E_RANGE);
    ck_assert_str_eq(last_error(&p), "get_rows: blk.0.test.weight: id 20 at index 1 is outside "
                                     "[0, 20)");
    weight_free(&w);
    free(v);
    plugin_close(&p);
}
END_TEST

/* ---- activations ------------------------------------------------------------------------ */

#define ROWS 3
#define DIM 50

START_TEST(rms_norm_matches_formula) {
    plugin p;
    backend_open(&p, 2);
    float *x = rnd_vec(ROWS * DIM, 11, 4.0f), *wt = rnd_vec(DIM, 12, 1.0f);
    float y[ROWS * DIM], y2[ROWS * DIM];
    ck_assert_int_eq(be(&p)->rms_norm(p.inst->self, y, x, wt, ROWS, DIM, 1e-5f), TSR_OK);
    for (int r = 0; r < ROWS; r++) {
        double ss = 0.0;
        for (int k = 0; k < DIM; k++) ss += (double)x[r * DIM + k] * x[r * DIM + k];
        double s = 1.0 / sqrt(ss / DIM + 1e-5);
        for (int k = 0; k < DIM; k++) {
            double ref = x[r * DIM + k] * s * wt[k];
            ck_assert_double_eq_tol(y[r * DIM + k], ref, 4 * FLT_EPSILON * fabs(ref) + 1e-30);
        }
    }
    /* in place gives the same values */
    memcpy(y2, x, sizeof y2);
    ck_assert_int_eq(be(&p)->rms_norm(p.inst->self, y2, y2, wt, ROWS, DIM, 1e-5f), TSR_OK);
    ck_assert_mem_eq(y, y2, sizeof y);
    free(x);
    free(wt);
    plugin_close(&p);
}
END_TEST

/* theta_i = pos * scale * base^(-2i/n_rot) in double; the backend's f32 repeated product
 * drifts by a few ulp of theta per step: positions stay below 40, so 2e-4 absolute. */
START_TEST(rope_matches_formula) {
    const int32_t modes[] = {TSR_ROPE_NORMAL, TSR_ROPE_NEOX};
    const int64_t n = 3, n_head = 2, hd = 12;
    const int32_t n_rot = 8, pos[] = {0, 7, 39};
    plugin p;
    backend_open(&p, 2);
    tsr_rope_params rp = {.struct_size = sizeof rp, .mode = modes[_i], .n_rot = n_rot,
                          .freq_base = 10000.0f, .freq_scale = 0.5f};
    float *x = rnd_vec((size_t)(n * n_head * hd), 13, 1.0f);
    float y[3 * 2 * 12];
    memcpy(y, x, sizeof y);
    ck_assert_int_eq(be(&p)->rope(p.inst->self, y, pos, n, (int32_t)n_head, (int32_t)hd, &rp),
                     TSR_OK);
    for (int64_t t = 0; t < n; t++) {
        for (int64_t h = 0; h < n_head; h++) {
            const float *xr = x + (t * n_head + h) * hd;
            const float *yr = y + (t * n_head + h) * hd;
            for (int32_t i = 0; i < n_rot / 2; i++) {
                double th = pos[t] * 0.5 * pow(10000.0, -2.0 * i / n_rot);
                int a = modes[_i] == TSR_ROPE_NEOX ? i : 2 * i;
                int b = modes[_i] == TSR_ROPE_NEOX ? i + n_rot / 2 : 2 * i + 1;
                ck_assert_double_eq_tol(yr[a], xr[a] * cos(th) - xr[b] * sin(th), 2e-4);
                ck_assert_double_eq_tol(yr[b], xr[a] * sin(th) + xr[b] * cos(th), 2e-4);
            }
            /* dimensions past n_rot are left alone */
            ck_assert_mem_eq(yr + n_rot, xr + n_rot, (size_t)(hd - n_rot) * sizeof(float));
        }
    }
    /* position 0 is the identity */
    ck_assert_mem_eq(y, x, (size_t)(n_head * hd) * sizeof(float));
    free(x);
    plugin_close(&p);
}
END_TEST

START_TEST(rope_refuses_bad_params) {
    plugin p;
    backend_open(&p, 1);
    float x[16] = {0};
    int32_t pos[1] = {0};
    tsr_rope_params rp = {.struct_size = sizeof rp, .mode = 1, .n_rot = 16,
                          .freq_base = 10000.0f, .freq_scale = 1.0f};
    ck_assert_int_eq(be(&p)->rope(p.inst->self, x, pos, 1, 1, 16, &rp), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(last_error(&p), "rope: mode 1 is neither NORMAL (0) nor NEOX (2)");
    rp.mode = TSR_ROPE_NORMAL;
    rp.n_rot = 18;
    ck_assert_int_eq(be(&p)->rope(p.inst->self, x, pos, 1, 1, 16, &rp), TSR_E_INVALID);
    rp.n_rot = 7;
    ck_assert_int_eq(be(&p)->rope(p.inst->self, x, pos, 1, 1, 16, &rp), TSR_E_INVALID);
    plugin_close(&p);
}
END_TEST

START_TEST(elementwise_ops_match_formulas) {
    plugin p;
    backend_open(&p, 2);
    void *s = p.inst->self;
    float *a = rnd_vec(ROWS * DIM, 21, 6.0f), *b = rnd_vec(ROWS * DIM, 22, 3.0f);
    float y[ROWS * DIM];
    /* swiglu: silu(g) * u */
    ck_assert_int_eq(be(&p)->swiglu(s, y, a, b, ROWS, DIM), TSR_OK);
    for (int i = 0; i < ROWS * DIM; i++) {
        double ref = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
        ck_assert_double_eq_tol(y[i], ref, 8 * FLT_EPSILON * fabs(ref) + 1e-30);
    }
    /* add: full, then b broadcast over rows; both exact */
    ck_assert_int_eq(be(&p)->add(s, y, a, b, ROWS, DIM, ROWS), TSR_OK);
    for (int i = 0; i < ROWS * DIM; i++) ck_assert_float_eq(y[i], a[i] + b[i]);
    ck_assert_int_eq(be(&p)->add(s, y, a, b, ROWS, DIM, 1), TSR_OK);
    for (int i = 0; i < ROWS * DIM; i++) ck_assert_float_eq(y[i], a[i] + b[i % DIM]);
    ck_assert_int_eq(be(&p)->add(s, y, a, b, ROWS, DIM, 2), TSR_E_INVALID);
    ck_assert_str_eq(last_error(&p), "add: b has 2 rows; expected 1 (broadcast) or 3");
    /* in place, as the graph calls them */
    memcpy(y, a, sizeof y);
    ck_assert_int_eq(be(&p)->add(s, y, y, b, ROWS, DIM, ROWS), TSR_OK);
    for (int i = 0; i < ROWS * DIM; i++) ck_assert_float_eq(y[i], a[i] + b[i]);
    memcpy(y, a, sizeof y);
    ck_assert_int_eq(be(&p)->swiglu(s, y, y, b, ROWS, DIM), TSR_OK);
    for (int i = 0; i < ROWS * DIM; i++) {
        double ref = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
        ck_assert_double_eq_tol(y[i], ref, 8 * FLT_EPSILON * fabs(ref) + 1e-30);
    }
    free(a);
    free(b);
    plugin_close(&p);
}
END_TEST

/* ---- rows (backend 1.1) ----------------------------------------------------------------- */

/* copy_rows gathers and scatters whole rows exactly and refuses negative indices; weighted_sum
 * is each token's first weighted row plus each later one, rounded product by product in slot
 * order (the header's formula, written out here one rounding at a time). */
START_TEST(expert_rows_match_formulas) {
    plugin p;
    backend_open(&p, 2);
    void *s = p.inst->self;
    enum { N = 3, K = 2 };
    float *x = rnd_vec(N * K * DIM, 23, 4.0f), *w = rnd_vec(N * K, 24, 1.0f);
    float g[N * DIM], y[N * K * DIM];
    const int32_t from[N] = {5, 0, 2}, to[N] = {1, 4, 3};
    ck_assert_int_eq(be(&p)->copy_rows(s, g, NULL, x, from, N, DIM), TSR_OK);
    for (int i = 0; i < N; i++) ck_assert_mem_eq(g + i * DIM, x + from[i] * DIM, DIM * 4);
    memset(y, 0, sizeof y);
    ck_assert_int_eq(be(&p)->copy_rows(s, y, to, g, NULL, N, DIM), TSR_OK);
    for (int r = 0; r < N * K; r++) {
        int src = r == 1 ? 0 : r == 4 ? 1 : r == 3 ? 2 : -1;
        for (int i = 0; i < DIM; i++)
            ck_assert(src < 0 ? y[r * DIM + i] == 0 : y[r * DIM + i] == g[src * DIM + i]);
    }
    const int32_t bad[N] = {0, -1, 2};
    ck_assert_int_eq(be(&p)->copy_rows(s, y, bad, g, NULL, N, DIM), TSR_E_RANGE);
    ck_assert_str_eq(last_error(&p), "copy_rows: y_ids[1] is -1; row indices are not negative");
    ck_assert_int_eq(be(&p)->copy_rows(s, y, NULL, g, bad, N, DIM), TSR_E_RANGE);
    ck_assert_str_eq(last_error(&p), "copy_rows: x_ids[1] is -1; row indices are not negative");
    ck_assert_int_eq(be(&p)->weighted_sum(s, g, x, w, N, K, DIM), TSR_OK);
    for (int t = 0; t < N; t++)
        for (int i = 0; i < DIM; i++) {
            volatile float first = w[t * K] * x[t * K * DIM + i];
            volatile float second = w[t * K + 1] * x[(t * K + 1) * DIM + i];
            volatile float sum = first + second;
            ck_assert(g[t * DIM + i] == sum);
        }
    ck_assert_int_eq(be(&p)->weighted_sum(s, g, x, w, N, -1, DIM), TSR_E_INVALID);
    ck_assert_str_eq(last_error(&p), "weighted_sum: negative shape (3 rows of -1 slots of 50)");
    free(x);
    free(w);
    plugin_close(&p);
}
END_TEST

/* ---- thread count ----------------------------------------------------------------------- */

/* Every op on inputs large enough to be split, for a pool of `nt` threads; the outputs go one
 * after the other into `out`. */
#define TI_ROWS 9
#define TI_OUT 300
#define TI_IN 2048 /* TI_ROWS * TI_IN: the activations' conversion is split too */
#define TI_FF 4608 /* TI_ROWS * TI_FF > the backend's serial threshold */

static size_t thread_run(float *out, int nt) {
    plugin p;
    backend_open(&p, nt);
    void *s = p.inst->self;
    size_t at = 0;
    float *x = rnd_vec(TI_ROWS * TI_FF, 31, 2.0f), *u = rnd_vec(TI_ROWS * TI_FF, 32, 2.0f);
    float *wv = rnd_vec(TI_OUT * TI_IN, 33, 0.3f);
    for (int i = 0; i < N_WEIGHT_TYPES; i++) {
        weight w;
        weight_make(&w, weight_types[i], wv, TI_OUT, TI_IN);
        ck_assert_int_eq(be(&p)->matmul(s, out + at, &w.t, x, TI_ROWS), TSR_OK);
        at += TI_ROWS * TI_OUT;
        int32_t ids[TI_ROWS];
        for (int r = 0; r < TI_ROWS; r++) ids[r] = (r * 37) % TI_OUT;
        ck_assert_int_eq(be(&p)->get_rows(s, out + at, &w.t, ids, TI_ROWS), TSR_OK);
        at += TI_ROWS * TI_IN;
        weight_free(&w);
    }
    const size_t nf = TI_ROWS * TI_FF;
    ck_assert_int_eq(be(&p)->rms_norm(s, out + at, x, u, TI_ROWS, TI_FF, 1e-6f), TSR_OK);
    at += nf;
    ck_assert_int_eq(be(&p)->swiglu(s, out + at, x, u, TI_ROWS, TI_FF), TSR_OK);
    at += nf;
    ck_assert_int_eq(be(&p)->add(s, out + at, x, u, TI_ROWS, TI_FF, 1), TSR_OK);
    at += nf;
    /* 9 tokens x 64 heads x 64 dims */
    int32_t pos[TI_ROWS];
    for (int r = 0; r < TI_ROWS; r++) pos[r] = 100 * r + 3;
    tsr_rope_params rp = {.struct_size = sizeof rp, .mode = TSR_ROPE_NEOX, .n_rot = 64,
                          .freq_base = 10000.0f, .freq_scale = 1.0f};
    memcpy(out + at, x, nf * sizeof(float));
    ck_assert_int_eq(be(&p)->rope(s, out + at, pos, TI_ROWS, 72, 64, &rp), TSR_OK);
    at += nf;
    /* the rows of 3 tokens routed to 3 slots each, reversed, then mixed */
    int32_t rev[TI_ROWS];
    for (int r = 0; r < TI_ROWS; r++) rev[r] = TI_ROWS - 1 - r;
    ck_assert_int_eq(be(&p)->copy_rows(s, out + at, rev, x, NULL, TI_ROWS, TI_FF), TSR_OK);
    ck_assert_int_eq(be(&p)->weighted_sum(s, out + at + nf, out + at, u, TI_ROWS / 3, 3, TI_FF),
                     TSR_OK);
    at += nf + nf / 3;
    free(x);
    free(u);
    free(wv);
    plugin_close(&p);
    return at;
}

START_TEST(results_do_not_depend_on_thread_count) {
    size_t cap = N_WEIGHT_TYPES * TI_ROWS * (TI_OUT + TI_IN) + 5 * TI_ROWS * TI_FF +
                 TI_ROWS / 3 * TI_FF;
    float *one = malloc(cap * sizeof(float)), *many = malloc(cap * sizeof(float));
    size_t n = thread_run(one, 1);
    ck_assert_uint_eq(n, cap);
    for (int nt = 2; nt <= 3; nt++) {
        ck_assert_uint_eq(thread_run(many, nt), n);
        for (size_t i = 0; i < n; i++)
            if (memcmp(&one[i], &many[i], sizeof(float)) != 0)
                ck_abort_msg("%d threads: value %zu differs: %.9g vs %.9g", nt, i,
                             (double)many[i], (double)one[i]);
    }
    free(one);
    free(many);
}
END_TEST

/* ---- quantizer 'gguf' ------------------------------------------------------------------- */

START_TEST(quantizer_keeps_types_in_place) {
    static const double bits[N_WEIGHT_TYPES] = {32.0, 16.0, 16.0, 8.5};
    int32_t type = weight_types[_i];
    float *v = rnd_vec(8 * 64, 41, 1.0f);
    weight w;
    weight_make(&w, type, v, 8, 64);
    plugin q;
    quantizer_open(&q);
    tsr_weight_in in = {.struct_size = sizeof in, .src = w.t, .layer = 0, .role = "attn_q"};
    tsr_weight_out out = {.struct_size = sizeof out, .owns_data = 7, .rel_rmse = 9.0};
    ck_assert_int_eq(qz(&q)->prepare(q.inst->self, &in, &out), TSR_OK);
    ck_assert_ptr_eq(out.dst.data, w.t.data);
    ck_assert_int_eq(out.dst.dtype, type);
    ck_assert_mem_eq(out.dst.ne, w.t.ne, sizeof w.t.ne);
    ck_assert_uint_eq(out.dst.row_bytes, w.t.row_bytes);
    ck_assert_ptr_null(out.dst.extra);
    ck_assert_int_eq(out.owns_data, 0);
    ck_assert_double_eq(out.rel_rmse, 0.0);
    ck_assert_double_eq(out.bits_per_weight, bits[_i]);
    qz(&q)->release(q.inst->self, &out.dst);

    /* rows 3..5 dequantized exactly */
    float y[3 * 64];
    ck_assert_int_eq(qz(&q)->dequantize_rows(q.inst->self, y, &w.t, 3, 3), TSR_OK);
    for (int i = 0; i < 3 * 64; i++) ck_assert((double)y[i] == w.val[3 * 64 + i]);
    ck_assert_int_eq(qz(&q)->dequantize_rows(q.inst->self, y, &w.t, 6, 3), TSR_E_RANGE);
    ck_assert_str_eq(last_error(&q), "dequantize_rows: blk.0.test.weight: rows [6, 9) are "
                                     "outside [0, 8)");
    weight_free(&w);
    free(v);
    plugin_close(&q);
}
END_TEST

START_TEST(quantizer_refuses_other_types) {
    plugin q;
    quantizer_open(&q);
    uint8_t data[512] = {0};
    tsr_weight_in in = {.struct_size = sizeof in, .layer = 1, .role = "ffn_down",
                        .src = {.struct_size = sizeof(tsr_tensor), .dtype = TSR_DTYPE_I16,
                                .n_dims = 2, .ne = {256, 1, 1, 1}, .row_bytes = 210,
                                .data = data, .name = "blk.1.ffn_down.weight"}};
    tsr_weight_out out = {.struct_size = sizeof out};
    ck_assert_int_eq(qz(&q)->prepare(q.inst->self, &in, &out), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(last_error(&q), "prepare: blk.1.ffn_down.weight: type I16 has no matrix "
                                     "product in the CPU kernels");
    in.src.dtype = 1234;
    ck_assert_int_eq(qz(&q)->prepare(q.inst->self, &in, &out), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(last_error(&q), "prepare: blk.1.ffn_down.weight: type 1234 is not a GGUF "
                                     "type");
    /* a known type with a row size that is not its own */
    in.src.dtype = TSR_DTYPE_F16;
    ck_assert_int_eq(qz(&q)->prepare(q.inst->self, &in, &out), TSR_E_INVALID);
    ck_assert_str_eq(last_error(&q), "prepare: blk.1.ffn_down.weight: 256 elements of F16 per "
                                     "row take 512 bytes, the tensor says 210");
    plugin_close(&q);
}
END_TEST

int main(void) {
    Suite *s = suite_create("backend-cpu");
    TCase *b = tcase_create("backend");
    tcase_add_test(b, backend_descriptor);
    tcase_add_loop_test(b, matmul_matches_double_reference, 0, N_WEIGHT_TYPES);
    tcase_add_test(b, matmul_refuses_bad_weights);
    tcase_add_loop_test(b, get_rows_dequantizes_exactly, 0, N_WEIGHT_TYPES);
    tcase_add_test(b, rms_norm_matches_formula);
    tcase_add_loop_test(b, rope_matches_formula, 0, 2);
    tcase_add_test(b, rope_refuses_bad_params);
    tcase_add_test(b, elementwise_ops_match_formulas);
    tcase_add_test(b, expert_rows_match_formulas);
    tcase_add_test(b, results_do_not_depend_on_thread_count);
    suite_add_tcase(s, b);
    TCase *q = tcase_create("quantizer");
    tcase_add_loop_test(q, quantizer_keeps_types_in_place, 0, N_WEIGHT_TYPES);
    tcase_add_test(q, quantizer_refuses_other_types);
    suite_add_tcase(s, q);
    return tsr_test_run_suite(s);
}
