/* The KV-cache storage policies kivi, zipcache, minicache and paged, loaded from their .so
 * files as a pipeline loads them, and flash reading their views' extensions (blocks, dot_k,
 * axpy_v). Each policy's defining property on hand-made cases: quantized keys and values
 * within the error bound their grids allow, products on the codes equal to the products of the
 * rows they read back, MiniCache's merge formula and retention, paged blocks shared by forks.
 *
 * `test-kv-policies models` runs the model-level cases on stories260K (shared data; skips
 * without it): every policy in a setting that keeps everything at full precision gives the
 * logits of 'full' bit for bit, through forks and truncations; bad parameters get one line. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

#include "files/gguf.h"
#include "pipeline/pipeline.h"
#include "tokenizer/tokenizer.h"
#include "pipeline_fixture.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

/* ---- cache instances and hand-made K/V ------------------------------------------------------ */

static tsr_model_shape kv_shape(int32_t n_layer, int32_t n_kv_head, int32_t head_dim,
                                int32_t n_seq_max) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_layer = n_layer;
    s.n_kv_head = n_kv_head;
    s.n_head = 2 * n_kv_head;
    s.head_dim = head_dim;
    s.n_seq_max = n_seq_max;
    s.n_ctx = 4096;
    return s;
}

static void cache_open(fx *f, const char *plugin, const char *const *kv,
                       const tsr_model_shape *s) {
    char file[64];
    snprintf(file, sizeof file, "cache-%s.so", plugin);
    fx_open(f, 1, TSR_STAGE_CACHE, file, plugin, kv, s);
}

static const tsr_cache_vtable *cvt(const fx *f) { return f->vt; }

/* K/V of one write: (n, n_kv_head, head_dim), filled by the test. */
typedef struct kv_rows {
    int64_t n;
    int32_t nkv, hd;
    float *k, *v;
} kv_rows;

static kv_rows rows_new(int64_t n, int32_t nkv, int32_t hd) {
    kv_rows r = {n, nkv, hd, calloc((size_t)(n * nkv * hd), sizeof(float)),
                 calloc((size_t)(n * nkv * hd), sizeof(float))};
    return r;
}
static void rows_free(kv_rows *r) {
    free(r->k);
    free(r->v);
}
static float *row_k(const kv_rows *r, int64_t t, int32_t h) {
    return r->k + (t * r->nkv + h) * r->hd;
}
static float *row_v(const kv_rows *r, int64_t t, int32_t h) {
    return r->v + (t * r->nkv + h) * r->hd;
}

/* Stores rows [t0, t0 + n) of r at positions t0... of (seq, layer). */
static tsr_status put(fx *f, int64_t seq, int32_t layer, const kv_rows *r, int64_t t0, int64_t n) {
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    for (int64_t i = 0; i < n; i++) pos[i] = (int32_t)(t0 + i);
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = seq, .layer = layer,
                      .phase = t0 == 0 ? TSR_PHASE_PREFILL : TSR_PHASE_DECODE, .n = n,
                      .pos = pos, .k = row_k(r, t0, 0), .v = row_v(r, t0, 0)};
    tsr_status st = cvt(f)->store(f->inst->self, &w);
    free(pos);
    return st;
}

/* The views (and extensions) of (seq, layer); nkv of each. */
static void view_ext(fx *f, int64_t seq, int32_t layer, int32_t nkv, tsr_kv_view *views,
                     tsr_kv_view_ext *ext) {
    for (int32_t h = 0; h < nkv; h++) {
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view)};
        ext[h] = (tsr_kv_view_ext){TSR_SIZED(tsr_kv_view_ext)};
    }
    ck_assert_int_eq(cvt(f)->view_ext(f->inst->self, seq, layer, TSR_PHASE_DECODE, views, ext),
                     TSR_OK);
}

/* Every entry of a view as f32, keys (values = 0) or values: (n, head_dim), malloc'd. */
static float *read_all(const tsr_kv_view *v, int values, int32_t hd) {
    float *dst = malloc((size_t)(v->n * hd + 1) * sizeof(float));
    float *scratch = malloc((size_t)(v->n * hd + 1) * sizeof(float));
    size_t stride;
    const float *rows = tsr_kv_view_rows(v, values, 0, v->n, hd, scratch, &stride);
    for (int64_t j = 0; j < v->n; j++)
        memcpy(dst + j * hd, rows + (size_t)j * stride, (size_t)hd * sizeof(float));
    free(scratch);
    return dst;
}

/* The largest error the quantization rule allows a value of a group whose values lie in
 * [lo, hi] at `bits`: half a step, the step (hi - lo) / (2^bits - 1) grown by the f16 rounding
 * of the zero (down, one unit of |lo| at 2^-10 or a subnormal's 2^-24) and of the step (up,
 * 2^-10), plus the f32 arithmetic of dequantizing. */
static double quant_bound(double lo, double hi, int bits) {
    double step = ((hi - lo) + fabs(lo) * 0x1p-10 + 0x1p-24) / ((1 << bits) - 1) * (1 + 0x1p-10);
    return step / 2 + 1e-6 * (fabs(lo) + fabs(hi));
}

/* ---- the SDK's quantization grid ------------------------------------------------------------ */

/* tsr_kvq_grid's promise: the f16 zero at or below lo, the grid's top at or above hi, and no
 * wider than the f16 rounding of both requires. */
START_TEST(kvq_grid_covers_its_range) {
    uint64_t rng = 99;
    for (int i = 0; i < 20000; i++) {
        const int bits = i % 3 == 0 ? 2 : i % 3 == 1 ? 4 : 8;
        double mid = ldexp(tsr_test_rng_unit(&rng), (int)(i % 23) - 8);
        double width = ldexp(fabs(tsr_test_rng_unit(&rng)), (int)(i % 31) - 24);
        float lo = (float)mid, hi = (float)(mid + width);
        uint16_t z, st;
        tsr_kvq_grid(lo, hi, bits, &z, &st);
        const double zf = tsr_f16_to_f32(z), sf = tsr_f16_to_f32(st), top = (1 << bits) - 1;
        ck_assert_msg(zf <= lo && zf + top * sf >= hi, "[%g, %g] at %d bits: zero %g, step %g",
                      lo, hi, bits, zf, sf);
        ck_assert_msg(sf <= (hi - zf) / top * (1 + 0x1p-10) + 0x1p-24,
                      "[%g, %g] at %d bits: step %g wider than needed", lo, hi, bits, sf);
        ck_assert(zf >= lo - fabs(lo) * 0x1p-10 - 0x1p-24);
        /* The same value as the exact conversion, for the halves the grids hold. */
        ck_assert_float_eq(tsr_kvq_f16(z), tsr_f16_to_f32(z));
    }
}
END_TEST

/* ---- kivi ------------------------------------------------------------------------------------ */

/* (bits, group, head_dim): a group that cuts slots of 16 channels (the row-by-row value path),
 * one that does not, and a head that fills its slots. */
static const int kivi_cases[][3] = {{2, 8, 40}, {4, 16, 40}, {2, 32, 64}};

/* Keys with outlier channels (KIVI's reason to quantize them per channel), a channel of nearly
 * equal large values (whose grid's f16 zero must not round above them), and values with
 * outlier tokens (KIVI's reason for values per token). */
static kv_rows kivi_data(int64_t n, int32_t nkv, int32_t hd, uint64_t seed, int large) {
    kv_rows r = rows_new(n, nkv, hd);
    uint64_t rng = seed;
    for (int64_t t = 0; t < n; t++)
        for (int32_t h = 0; h < nkv; h++)
            for (int32_t d = 0; d < hd; d++) {
                row_k(&r, t, h)[d] = large && d % 7 == 3 ? 1000.3f + 1e-3f * tsr_test_rng_unit(&rng)
                                                 : (d % 7 == 0 ? 40.0f : 1.0f) *
                                                           tsr_test_rng_unit(&rng) +
                                                       (float)(d % 5) * 3.0f;
                row_v(&r, t, h)[d] = (t % 5 == 0 ? 30.0f : 1.0f) * tsr_test_rng_unit(&rng);
            }
    return r;
}

/* A kivi instance holding 6 groups of tokens and one more: the keys of the first 6 groups are
 * quantized, the values of the first 4 (the residual of 2 groups holds the rest). */
static void kivi_setup(fx *f, const int *cs, int32_t nkv, int32_t n_seq, int large,
                       kv_rows *data) {
    char bits[32], group[32], residual[32];
    snprintf(bits, sizeof bits, "bits=%d", cs[0]);
    snprintf(group, sizeof group, "group=%d", cs[1]);
    snprintf(residual, sizeof residual, "residual=%d", 2 * cs[1]);
    const char *kv[] = {bits, group, residual, NULL};
    tsr_model_shape s = kv_shape(1, nkv, cs[2], n_seq);
    cache_open(f, "kivi", kv, &s);
    *data = kivi_data(8 * cs[1] + 8, nkv, cs[2], 7 + (uint64_t)cs[0], large);
    ck_assert_int_eq(cvt(f)->seq_begin(f->inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(f, 0, 0, data, 0, 6 * cs[1]), TSR_OK);
    ck_assert_int_eq(put(f, 0, 0, data, 6 * cs[1], 1), TSR_OK);
}

START_TEST(kivi_reads_within_the_bound) {
    const int *cs = kivi_cases[_i];
    const int bits = cs[0], G = cs[1], hd = cs[2], nkv = 2;
    fx f;
    kv_rows data;
    kivi_setup(&f, cs, nkv, 1, 1, &data);
    tsr_kv_view views[2];
    tsr_kv_view_ext ext[2];
    view_ext(&f, 0, 0, nkv, views, ext);
    int changed = 0;
    for (int32_t h = 0; h < nkv; h++) {
        ck_assert_int_eq(views[h].n, 6 * G + 1);
        ck_assert_int_ge(views[h].dtype, TSR_DTYPE_PLUGIN_FIRST);
        ck_assert_ptr_nonnull(ext[h].dot_k);
        ck_assert_ptr_nonnull(ext[h].axpy_v);
        float *k = read_all(&views[h], 0, hd), *v = read_all(&views[h], 1, hd);
        for (int64_t j = 0; j < views[h].n; j++) {
            ck_assert_int_eq(views[h].pos[j], j);
            for (int32_t d = 0; d < hd; d++) {
                const float x = row_k(&data, j, h)[d], got = k[j * hd + d];
                if (j == 6 * G) {
                    ck_assert_float_eq(got, x); /* the residual: f32 */
                    continue;
                }
                /* Keys: per channel over the group of G tokens. */
                double lo = INFINITY, hi = -INFINITY;
                for (int64_t t = j / G * G; t < j / G * G + G; t++) {
                    lo = fmin(lo, row_k(&data, t, h)[d]);
                    hi = fmax(hi, row_k(&data, t, h)[d]);
                }
                ck_assert_msg(fabs(got - x) <= quant_bound(lo, hi, bits),
                              "key %lld channel %d: %g for %g, bound %g", (long long)j, d, got, x,
                              quant_bound(lo, hi, bits));
                changed |= got != x;
            }
            for (int32_t d = 0; d < hd; d++) {
                const float x = row_v(&data, j, h)[d], got = v[j * hd + d];
                if (j >= 4 * G) {
                    ck_assert_float_eq(got, x);
                    continue;
                }
                /* Values: per token over the group of G channels. */
                double lo = INFINITY, hi = -INFINITY;
                for (int32_t e = d / G * G; e < d / G * G + G && e < hd; e++) {
                    lo = fmin(lo, row_v(&data, j, h)[e]);
                    hi = fmax(hi, row_v(&data, j, h)[e]);
                }
                ck_assert_msg(fabs(got - x) <= quant_bound(lo, hi, bits),
                              "value %lld channel %d: %g for %g, bound %g", (long long)j, d, got,
                              x, quant_bound(lo, hi, bits));
                changed |= got != x;
            }
        }
        free(k);
        free(v);
    }
    ck_assert_msg(changed, "nothing was quantized");
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* dot_k and axpy_v against the products of the rows load_k and load_v give, over windows that
 * start and end inside groups, across the quantized / f32 boundaries. */
static void check_products(const tsr_kv_view *view, const tsr_kv_view_ext *ext, int32_t hd,
                           uint64_t seed) {
    float *k = read_all(view, 0, hd), *v = read_all(view, 1, hd);
    uint64_t rng = seed;
    float q[512], out[512], p[4096], scores[4096];
    for (int32_t d = 0; d < hd; d++) q[d] = tsr_test_rng_unit(&rng);
    const int64_t n = view->n;
    const int64_t windows[][2] = {{0, n}, {3, n - 5}, {n / 2, n - n / 2}, {n - 9, 9}, {1, 1}};
    for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++) {
        const int64_t j0 = windows[w][0], m = windows[w][1];
        if (j0 < 0 || m <= 0 || j0 + m > n) continue; /* a view too short for it */
        ext->dot_k(view->load_ctx, q, j0, m, scores);
        for (int64_t i = 0; i < m; i++) {
            double want = 0.0, mag = 0.0;
            for (int32_t d = 0; d < hd; d++) {
                want += (double)q[d] * k[(j0 + i) * hd + d];
                mag += fabs((double)q[d] * k[(j0 + i) * hd + d]);
            }
            ck_assert_msg(fabs(scores[i] - want) <= 2e-6 * mag + 1e-6,
                          "dot_k window %zu entry %lld: %.9g, rows give %.9g", w,
                          (long long)(j0 + i), scores[i], want);
            p[i] = (tsr_test_rng_unit(&rng) + 1.0f) * 0.5f;
        }
        double want[512], mag[512];
        for (int32_t d = 0; d < hd; d++) {
            out[d] = tsr_test_rng_unit(&rng);
            want[d] = out[d];
            mag[d] = fabs(out[d]);
        }
        for (int64_t i = 0; i < m; i++)
            for (int32_t d = 0; d < hd; d++) {
                want[d] += (double)p[i] * v[(j0 + i) * hd + d];
                mag[d] += fabs((double)p[i] * v[(j0 + i) * hd + d]);
            }
        ext->axpy_v(view->load_ctx, p, j0, m, out);
        for (int32_t d = 0; d < hd; d++)
            ck_assert_msg(fabs(out[d] - want[d]) <= 2e-6 * mag[d] + 1e-6,
                          "axpy_v window %zu channel %d: %.9g, rows give %.9g", w, d, out[d],
                          want[d]);
    }
    free(k);
    free(v);
}

START_TEST(kivi_products_equal_the_rows) {
    const int *cs = kivi_cases[_i];
    fx f;
    kv_rows data;
    kivi_setup(&f, cs, 2, 1, 1, &data);
    tsr_kv_view views[2];
    tsr_kv_view_ext ext[2];
    view_ext(&f, 0, 0, 2, views, ext);
    for (int32_t h = 0; h < 2; h++) check_products(&views[h], &ext[h], cs[2], 50 + (uint64_t)h);
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* A cut inside a quantized key group keeps what survives reading as before (the group's keys
 * go back to the f32 rows as they read); a fork reads as its source and stays apart from it. */
START_TEST(kivi_truncate_and_fork) {
    const int cs[3] = {2, 8, 40}, G = 8, hd = 40;
    fx f;
    kv_rows data;
    kivi_setup(&f, cs, 2, 2, 1, &data);
    tsr_kv_view views[2], forked[2];
    tsr_kv_view_ext ext[2];
    view_ext(&f, 0, 0, 2, views, ext);
    float *before_k = read_all(&views[1], 0, hd), *before_v = read_all(&views[1], 1, hd);
    const int64_t n = views[1].n;
    ck_assert_int_eq(cvt(&f)->seq_fork(f.inst->self, 0, 1), TSR_OK);
    const int64_t cut = 5 * G + 3;
    ck_assert_int_eq(cvt(&f)->seq_truncate(f.inst->self, 0, (int32_t)cut), TSR_OK);
    view_ext(&f, 0, 0, 2, views, ext);
    view_ext(&f, 1, 0, 2, forked, ext);
    ck_assert_int_eq(views[1].n, cut);
    ck_assert_int_eq(forked[1].n, n);
    float *k = read_all(&views[1], 0, hd), *v = read_all(&views[1], 1, hd);
    ck_assert_mem_eq(k, before_k, (size_t)(cut * hd) * sizeof(float));
    ck_assert_mem_eq(v, before_v, (size_t)(cut * hd) * sizeof(float));
    free(k);
    free(v);
    k = read_all(&forked[1], 0, hd);
    v = read_all(&forked[1], 1, hd);
    ck_assert_mem_eq(k, before_k, (size_t)(n * hd) * sizeof(float));
    ck_assert_mem_eq(v, before_v, (size_t)(n * hd) * sizeof(float));
    free(k);
    free(v);
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    cvt(&f)->stats(f.inst->self, &st);
    ck_assert_int_eq(st.entries, 2 * (cut + n));
    /* Writing on after the cut: the dequantized keys are quantized again with their group. */
    ck_assert_int_eq(put(&f, 0, 0, &data, cut, 2 * G), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &data, cut + 2 * G, 1), TSR_OK);
    view_ext(&f, 0, 0, 2, views, ext);
    ck_assert_int_eq(views[1].n, cut + 2 * G + 1);
    k = read_all(&views[1], 0, hd);
    for (int64_t j = 0; j < views[1].n; j++)
        for (int32_t d = 0; d < hd; d++) {
            double lo = INFINITY, hi = -INFINITY;
            for (int64_t t = j / G * G; t < j / G * G + G; t++) {
                lo = fmin(lo, row_k(&data, t, 1)[d]);
                hi = fmax(hi, row_k(&data, t, 1)[d]);
            }
            /* A group quantized again from dequantized keys: the first error, then the bound of
             * a range grown by it (a third more). */
            ck_assert(fabs(k[j * hd + d] - row_k(&data, j, 1)[d]) <= 2.5 * quant_bound(lo, hi, 2));
        }
    free(k);
    free(before_k);
    free(before_v);
    cvt(&f)->seq_end(f.inst->self, 0);
    cvt(&f)->seq_end(f.inst->self, 1);
    cvt(&f)->stats(f.inst->self, &st);
    ck_assert_int_eq(st.entries, 0);
    ck_assert_uint_eq(st.bytes_reserved, 0);
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* KIVI's moments: keys leave the residual when `residual` of them have gathered (at the next
 * store, KIVI's "after the step that filled it"), values one by one beyond the latest
 * `residual`. Group 8, residual 16. */
START_TEST(kivi_residual_boundaries) {
    const char *kv[] = {"group=8", "residual=16", NULL};
    tsr_model_shape s = kv_shape(1, 1, 40, 1);
    fx f;
    cache_open(&f, "kivi", kv, &s);
    kv_rows data = kivi_data(20, 1, 40, 5, 0);
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &data, 0, 15), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &data, 15, 1), TSR_OK);
    /* 16 held, none quantized yet: the plain f32 view. */
    tsr_kv_view views[1];
    tsr_kv_view_ext ext[1];
    view_ext(&f, 0, 0, 1, views, ext);
    ck_assert_int_eq(views[0].dtype, TSR_DTYPE_F32);
    ck_assert_ptr_null(ext[0].dot_k);
    /* The 17th store quantizes the 16 keys; the 16 values stay (the latest 16 of 17). */
    ck_assert_int_eq(put(&f, 0, 0, &data, 16, 1), TSR_OK);
    view_ext(&f, 0, 0, 1, views, ext);
    float *k = read_all(&views[0], 0, 40), *v = read_all(&views[0], 1, 40);
    ck_assert(memcmp(k, row_k(&data, 0, 0), 16 * 40 * sizeof(float)) != 0);
    ck_assert_mem_eq(k + 16 * 40, row_k(&data, 16, 0), 40 * sizeof(float));
    ck_assert_mem_eq(v, row_v(&data, 0, 0), 17 * 40 * sizeof(float));
    free(k);
    free(v);
    /* The 18th quantizes the oldest value alone. */
    ck_assert_int_eq(put(&f, 0, 0, &data, 17, 1), TSR_OK);
    view_ext(&f, 0, 0, 1, views, ext);
    v = read_all(&views[0], 1, 40);
    ck_assert(memcmp(v, row_v(&data, 0, 0), 40 * sizeof(float)) != 0);
    ck_assert_mem_eq(v + 40, row_v(&data, 1, 0), 17 * 40 * sizeof(float));
    free(v);
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* bits_per_value counts the codes, the f16 grids and the f32 rows held: head_dim 64 at 2 bits
 * is 16 bytes of codes a row, a key group of 32 has 64 zeros and steps, a value 2 groups. */
START_TEST(kivi_bits_per_value) {
    const int cs[3] = {2, 32, 64};
    fx f;
    kv_rows data;
    kivi_setup(&f, cs, 2, 1, 1, &data);
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    cvt(&f)->stats(f.inst->self, &st);
    /* 193 entries: 192 keys and 128 values quantized; rows hold entries 128..192. */
    const double bytes = 192 * 16 + 192 / 32 * 2 * 64 * 2 + 128 * (16 + 2 * 2 * 2) + 65 * 2 * 64 * 4;
    ck_assert_double_eq_tol(st.bits_per_value, 8 * bytes / (2.0 * 193 * 64), 1e-9);
    ck_assert_int_eq(st.entries, 2 * 193);
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* ---- paged ----------------------------------------------------------------------------------- */

static tsr_cache_stats stats_of(fx *f) {
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    cvt(f)->stats(f->inst->self, &st);
    return st;
}

/* Each head's view of (seq, layer) reads back data's rows [0, n) bit for bit, through its
 * blocks and through load_k / load_v. */
static void paged_check(fx *f, int64_t seq, int32_t layer, const kv_rows *data, int64_t n,
                        tsr_kv_view_ext *ext_out) {
    tsr_kv_view views[2];
    tsr_kv_view_ext ext[2];
    view_ext(f, seq, layer, 2, views, ext);
    for (int32_t h = 0; h < 2; h++) {
        ck_assert_int_eq(views[h].n, n);
        ck_assert_int_eq(views[h].dtype, TSR_KV_DTYPE_BLOCKS);
        ck_assert_int_eq(ext[h].block_dtype, TSR_DTYPE_F32);
        float *k = read_all(&views[h], 0, 16), *v = read_all(&views[h], 1, 16);
        for (int64_t j = 0; j < n; j++) {
            const char *kb = (const char *)ext[h].k_blocks[j / ext[h].block_size] +
                             (size_t)(j % ext[h].block_size) * views[h].k_stride;
            const char *vb = (const char *)ext[h].v_blocks[j / ext[h].block_size] +
                             (size_t)(j % ext[h].block_size) * views[h].v_stride;
            ck_assert_mem_eq(kb, row_k(data, j, h), 16 * sizeof(float));
            ck_assert_mem_eq(vb, row_v(data, j, h), 16 * sizeof(float));
            ck_assert_mem_eq(k + j * 16, row_k(data, j, h), 16 * sizeof(float));
            ck_assert_mem_eq(v + j * 16, row_v(data, j, h), 16 * sizeof(float));
        }
        free(k);
        free(v);
    }
    if (ext_out) memcpy(ext_out, ext, sizeof ext);
}

/* A fork shares every block (no byte more); the first write of a side copies only the block it
 * writes into; a cut drops references; the sequences end with nothing held. */
START_TEST(paged_forks_share_blocks) {
    const char *kv[] = {"block_size=4", NULL};
    tsr_model_shape s = kv_shape(2, 2, 16, 2);
    fx f;
    cache_open(&f, "paged", kv, &s);
    kv_rows a = kivi_data(12, 2, 16, 3, 0), b = kivi_data(12, 2, 16, 4, 0);
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    for (int32_t l = 0; l < 2; l++) ck_assert_int_eq(put(&f, 0, l, &a, 0, 10), TSR_OK);
    const uint64_t block = stats_of(&f).bytes_reserved / 6; /* 3 blocks a layer */
    ck_assert_uint_eq(block, 64 + 2 * 2 * 4 * 16 * 4);
    ck_assert_int_eq(cvt(&f)->seq_fork(f.inst->self, 0, 1), TSR_OK);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 6 * block);
    ck_assert_int_eq(stats_of(&f).entries, 2 * 2 * 2 * 10);
    tsr_kv_view_ext e0[2], e1[2];
    paged_check(&f, 0, 0, &a, 10, e0);
    paged_check(&f, 1, 0, &a, 10, e1);
    for (int32_t h = 0; h < 2; h++)
        for (int b0 = 0; b0 < 3; b0++) ck_assert_ptr_eq(e0[h].k_blocks[b0], e1[h].k_blocks[b0]);
    /* seq 1 writes position 10 with other data: its third block becomes its own. */
    memcpy(row_k(&b, 0, 0), row_k(&a, 0, 0), 10 * 2 * 16 * sizeof(float));
    memcpy(row_v(&b, 0, 0), row_v(&a, 0, 0), 10 * 2 * 16 * sizeof(float));
    ck_assert_int_eq(put(&f, 1, 0, &b, 10, 1), TSR_OK);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 7 * block);
    paged_check(&f, 1, 0, &b, 11, e1);
    paged_check(&f, 0, 0, &a, 10, e0);
    for (int32_t h = 0; h < 2; h++) {
        ck_assert_ptr_eq(e0[h].k_blocks[1], e1[h].k_blocks[1]);
        ck_assert(e0[h].k_blocks[2] != e1[h].k_blocks[2]);
    }
    /* seq 0 is now alone on its third block: writing copies nothing. */
    ck_assert_int_eq(put(&f, 0, 0, &a, 10, 1), TSR_OK);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 7 * block);
    paged_check(&f, 0, 0, &a, 11, NULL);
    /* A cut at 6: seq 1 drops its own third block in layer 0 and its reference in layer 1. */
    ck_assert_int_eq(cvt(&f)->seq_truncate(f.inst->self, 1, 6), TSR_OK);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 6 * block);
    paged_check(&f, 1, 0, &b, 6, NULL);
    paged_check(&f, 1, 1, &a, 6, NULL);
    paged_check(&f, 0, 1, &a, 10, NULL);
    /* Writing after the cut copies the shared second block (positions 4..7). */
    ck_assert_int_eq(put(&f, 1, 1, &b, 6, 1), TSR_OK);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 7 * block);
    paged_check(&f, 0, 1, &a, 10, NULL);
    paged_check(&f, 1, 1, &b, 7, NULL);
    ck_assert_int_eq(stats_of(&f).entries, 2 * (11 + 10 + 6 + 7));
    cvt(&f)->seq_end(f.inst->self, 0);
    cvt(&f)->seq_end(f.inst->self, 1);
    ck_assert_uint_eq(stats_of(&f).bytes_reserved, 0);
    ck_assert_int_eq(stats_of(&f).entries, 0);
    rows_free(&a);
    rows_free(&b);
    fx_close(&f);
}
END_TEST

/* ---- minicache ------------------------------------------------------------------------------- */

/* x_a, x_b of head_dim 8 at a chosen angle: both in the plane of e0 and e1, x_b rotated by
 * `degrees` from x_a, with norms na and nb. */
static void pair_at(float *a, float *b, double degrees, double na, double nb) {
    memset(a, 0, 8 * sizeof(float));
    memset(b, 0, 8 * sizeof(float));
    double r = degrees * 3.14159265358979323846 / 180.0;
    a[0] = (float)na;
    b[0] = (float)(nb * cos(r));
    b[1] = (float)(nb * sin(r));
    a[5] = b[5] = 0.0f;
}

/* The paper's merge of one pair: |x| e with e the SLERP at t of the two directions. */
static void merge_formula(const float *a, const float *b, double t, double *ra, double *rb) {
    double na = 0, nb = 0, ab = 0;
    for (int d = 0; d < 8; d++) {
        na += (double)a[d] * a[d];
        nb += (double)b[d] * b[d];
        ab += (double)a[d] * b[d];
    }
    na = sqrt(na);
    nb = sqrt(nb);
    double om = acos(fmin(1.0, fmax(-1.0, ab / (na * nb)))), wa, wb;
    if (sin(om) < 1e-6) {
        wa = 1 - t;
        wb = t;
    } else {
        wa = sin((1 - t) * om) / sin(om);
        wb = sin(t * om) / sin(om);
    }
    for (int d = 0; d < 8; d++) {
        double e = wa * a[d] / na + wb * b[d] / nb;
        ra[d] = na * e;
        rb[d] = nb * e;
    }
}

/* Layers 0 and 1 merged (start 0), t 0.6, gamma 0.3: pairs at 0, 30, 60, 90, 120 and 15
 * degrees (the last key pair with a zero lower row). Distances Omega / pi are 0, 1/6, 1/3,
 * 1/2, 2/3 and 1/12 (keys: 0): the threshold is 0 + 0.3 * 2/3 = 0.2, so the pairs at 60, 90 and
 * 120 degrees are kept as they came, the others read back as the formula gives. */
START_TEST(minicache_merge_and_retention) {
    const char *kv[] = {"start=0", "t=0.6", "gamma=0.3", NULL};
    tsr_model_shape s = kv_shape(2, 1, 8, 1);
    fx f;
    cache_open(&f, "minicache", kv, &s);
    const double angles[6] = {0, 30, 60, 90, 120, 15};
    const int kept[6] = {0, 0, 1, 1, 1, 0};
    kv_rows lower = rows_new(6, 1, 8), upper = rows_new(6, 1, 8);
    for (int t = 0; t < 6; t++) {
        pair_at(row_k(&lower, t, 0), row_k(&upper, t, 0), angles[t], 1.0 + t, 2.0 + 0.5 * t);
        /* Values: the same angles, other norms, turned to other axes. */
        pair_at(row_v(&lower, t, 0), row_v(&upper, t, 0), angles[t], 3.0 - 0.25 * t, 0.5 + t);
        row_v(&lower, t, 0)[7] = row_v(&lower, t, 0)[0];
        row_v(&lower, t, 0)[0] = 0.0f;
        row_v(&upper, t, 0)[7] = row_v(&upper, t, 0)[0];
        row_v(&upper, t, 0)[0] = 0.0f;
    }
    memset(row_k(&lower, 5, 0), 0, 8 * sizeof(float)); /* a zero row: distance 0 */
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &lower, 0, 6), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 1, &upper, 0, 6), TSR_OK);
    ck_assert_int_eq(cvt(&f)->prefill_end(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(stats_of(&f).entries, 2 * 6);
    for (int32_t layer = 0; layer < 2; layer++) {
        const kv_rows *mine = layer ? &upper : &lower;
        tsr_kv_view views[1];
        tsr_kv_view_ext ext[1];
        view_ext(&f, 0, layer, 1, views, ext);
        ck_assert_int_eq(views[0].n, 6);
        ck_assert_ptr_nonnull(ext[0].dot_k);
        for (int values = 0; values < 2; values++) {
            float *got = read_all(&views[0], values, 8);
            for (int t = 0; t < 6; t++) {
                const float *a = values ? row_v(&lower, t, 0) : row_k(&lower, t, 0);
                const float *b = values ? row_v(&upper, t, 0) : row_k(&upper, t, 0);
                const float *x = values ? row_v(mine, t, 0) : row_k(mine, t, 0);
                if (kept[t]) {
                    ck_assert_mem_eq(got + t * 8, x, 8 * sizeof(float));
                    continue;
                }
                double want[2][8];
                if (t == 5 && !values) {
                    /* The zero row takes the other's direction: each layer reads itself. */
                    for (int d = 0; d < 8; d++) want[0][d] = a[d], want[1][d] = b[d];
                } else {
                    merge_formula(a, b, 0.6, want[0], want[1]);
                }
                for (int d = 0; d < 8; d++)
                    ck_assert_msg(fabs(got[t * 8 + d] - want[layer][d]) <= 1e-6 * (1 + t),
                                  "layer %d %s token %d channel %d: %.9g, the formula gives %.9g",
                                  layer, values ? "V" : "K", t, d, got[t * 8 + d],
                                  want[layer][d]);
            }
            free(got);
        }
        check_products(&views[0], &ext[0], 8, 90 + (uint64_t)layer);
    }
    fx_close(&f);
    /* gamma 0: the threshold is d_min itself, and only tokens strictly beyond it stay: of pairs
     * at 0, 0 and 30 degrees, one token per tensor. Per merged token a direction, two norms and
     * an index (8 + 3 floats), plus the upper row of each kept one, for 2 x 8 values a token. */
    const char *kv0[] = {"start=0", "gamma=0", NULL};
    cache_open(&f, "minicache", kv0, &s);
    for (int t = 0; t < 3; t++) {
        pair_at(row_k(&lower, t, 0), row_k(&upper, t, 0), t == 2 ? 30 : 0, 1.0 + t, 2.0);
        pair_at(row_v(&lower, t, 0), row_v(&upper, t, 0), t == 2 ? 30 : 0, 2.0, 1.0 + t);
    }
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &lower, 0, 3), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 1, &upper, 0, 3), TSR_OK);
    ck_assert_int_eq(cvt(&f)->prefill_end(f.inst->self, 0), TSR_OK);
    ck_assert_double_eq_tol(stats_of(&f).bits_per_value, 32.0 * 2 * (3 * 11 + 8) / (2 * 2 * 3 * 8),
                            1e-9);
    rows_free(&lower);
    rows_free(&upper);
    fx_close(&f);
}
END_TEST

/* ---- zipcache ------------------------------------------------------------------------------- */

/* A prompt of 12 tokens whose attention (what score_acc received, per KV head) makes tokens
 * salient by the normalized score, not the plain sum: token i received acc[i] from the n - i
 * queries of the prompt that see it. */
START_TEST(zipcache_saliency_bounds_and_products) {
    const char *kv[] = {"high_bits=4", "low_bits=2", "salient=0.5", "gap=4", NULL};
    const int n = 12, hd = 32;
    tsr_model_shape s = kv_shape(1, 2, hd, 1);
    fx f;
    cache_open(&f, "zipcache", kv, &s);
    kv_rows data = kivi_data(n + 4, 2, hd, 11, 1);
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &data, 0, n), TSR_OK);
    tsr_kv_view views[2];
    tsr_kv_view_ext ext[2];
    for (int32_t h = 0; h < 2; h++) {
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view)};
        ext[h] = (tsr_kv_view_ext){TSR_SIZED(tsr_kv_view_ext)};
    }
    ck_assert_int_eq(cvt(&f)->view_ext(f.inst->self, 0, 0, TSR_PHASE_PREFILL, views, ext), TSR_OK);
    /* acc = (n - i) * norm: by normalized score the even tokens are salient for head 0 (the
     * odd ones for head 1), while the plain sums favour the early tokens of both. */
    int salient[2][12];
    for (int32_t h = 0; h < 2; h++) {
        ck_assert_ptr_nonnull(views[h].score_acc);
        ck_assert_int_eq(views[h].score_from_pos, 0);
        for (int i = 0; i < n; i++) {
            double norm = ((i % 2) == h ? 1.0 : 0.5) + 0.001 * i;
            views[h].score_acc[i] += (float)((n - i) * norm);
            salient[h][i] = (i % 2) == h;
        }
    }
    ck_assert_int_eq(cvt(&f)->prefill_end(f.inst->self, 0), TSR_OK);
    view_ext(&f, 0, 0, 2, views, ext);
    for (int32_t h = 0; h < 2; h++) {
        ck_assert_int_eq(views[h].n, n);
        float *k = read_all(&views[h], 0, hd), *v = read_all(&views[h], 1, hd);
        for (int i = 0; i < n; i++) {
            const int bits = salient[h][i] ? 4 : 2;
            for (int32_t d = 0; d < hd; d++) {
                /* Keys: per channel over the token's set. */
                double lo = INFINITY, hi = -INFINITY;
                for (int t = 0; t < n; t++)
                    if (salient[h][t] == salient[h][i]) {
                        lo = fmin(lo, row_k(&data, t, h)[d]);
                        hi = fmax(hi, row_k(&data, t, h)[d]);
                    }
                ck_assert_msg(fabs(k[i * hd + d] - row_k(&data, i, h)[d]) <= quant_bound(lo, hi, bits),
                              "head %d key %d channel %d (%d bits): %g for %g", h, i, d, bits,
                              k[i * hd + d], row_k(&data, i, h)[d]);
            }
            /* Values: each channel divided by sqrt(max |v|) over the chunk, then per token. */
            double scale[64], lo = INFINITY, hi = -INFINITY;
            for (int32_t d = 0; d < hd; d++) {
                double m = 0;
                for (int t = 0; t < n; t++) m = fmax(m, fabs(row_v(&data, t, h)[d]));
                scale[d] = sqrt(m) * (1 + 0x1p-10);
                lo = fmin(lo, row_v(&data, i, h)[d] / sqrt(m));
                hi = fmax(hi, row_v(&data, i, h)[d] / sqrt(m));
            }
            for (int32_t d = 0; d < hd; d++)
                ck_assert_msg(fabs(v[i * hd + d] - row_v(&data, i, h)[d]) <=
                                  scale[d] * quant_bound(lo * (1 + 0x1p-10), hi * (1 + 0x1p-10), bits),
                              "head %d value %d channel %d (%d bits): %g for %g", h, i, d, bits,
                              v[i * hd + d], row_v(&data, i, h)[d]);
        }
        free(k);
        free(v);
        check_products(&views[h], &ext[h], hd, 70 + (uint64_t)h);
    }
    /* Generated tokens stay f32 until gap (4) have gathered. */
    for (int t = n; t < n + 3; t++) {
        ck_assert_int_eq(put(&f, 0, 0, &data, t, 1), TSR_OK);
        ck_assert_int_eq(cvt(&f)->step_end(f.inst->self, 0), TSR_OK);
    }
    view_ext(&f, 0, 0, 2, views, ext);
    float *k = read_all(&views[0], 0, hd);
    ck_assert_mem_eq(k + n * hd, row_k(&data, n, 0), hd * sizeof(float));
    ck_assert_mem_eq(k + (n + 2) * hd, row_k(&data, n + 2, 0), hd * sizeof(float));
    free(k);
    ck_assert_int_eq(put(&f, 0, 0, &data, n + 3, 1), TSR_OK);
    ck_assert_int_eq(cvt(&f)->step_end(f.inst->self, 0), TSR_OK);
    view_ext(&f, 0, 0, 2, views, ext);
    k = read_all(&views[0], 0, hd);
    ck_assert(memcmp(k + n * hd, row_k(&data, n, 0), hd * sizeof(float)) != 0);
    free(k);
    rows_free(&data);
    fx_close(&f);
}
END_TEST

/* ---- flash reading views_ext ----------------------------------------------------------------- */

/* The rows of a load_src (as attn_case_views makes them) copied into blocks of `bs` entries,
 * allocated apart in reverse order, with per-head block tables. */
typedef struct block_copy {
    void **blocks;      /* (n_kv_head, 2, n_blocks) */
    const void **table; /* (n_kv_head, 2, n_blocks) */
    int64_t n_blocks;
} block_copy;

static void blocks_make(block_copy *b, const attn_case *c, int32_t bs, int f16) {
    b->n_blocks = (c->n_kv + bs - 1) / bs;
    size_t n = (size_t)(c->n_kv_head * 2 * b->n_blocks), elt = f16 ? 2 : 4;
    b->blocks = calloc(n, sizeof *b->blocks);
    b->table = calloc(n, sizeof *b->table);
    for (size_t i = n; i-- > 0;) {
        b->blocks[i] = calloc((size_t)bs * (size_t)c->head_dim, elt);
        b->table[i] = b->blocks[i];
    }
    for (int32_t g = 0; g < c->n_kv_head; g++)
        for (int values = 0; values < 2; values++)
            for (int64_t j = 0; j < c->n_kv; j++) {
                size_t src = (size_t)((g * c->n_kv + j) * c->stride);
                char *dst = (char *)b->blocks[(g * 2 + values) * b->n_blocks + j / bs] +
                            (size_t)(j % bs) * (size_t)c->head_dim * elt;
                if (f16) memcpy(dst, (values ? c->v16 : c->k16) + src, (size_t)c->head_dim * 2);
                else memcpy(dst, (values ? c->v : c->k) + src, (size_t)c->head_dim * 4);
            }
}

static void blocks_free(block_copy *b, const attn_case *c) {
    for (size_t i = 0; i < (size_t)(c->n_kv_head * 2 * b->n_blocks); i++) free(b->blocks[i]);
    free(b->blocks);
    free(b->table);
}

/* flash_dot's order (4 partial sums, added as (0 + 1) + (2 + 3)) and flash's order of adding
 * p v: a policy whose products round like flash's own reading, so the two paths must agree
 * bit for bit. */
static void fixture_dot_k(const void *ctx, const float *q, int64_t j0, int64_t n, float *scores) {
    const load_src *s = ctx;
    for (int64_t i = 0; i < n; i++) {
        const float *k = s->k + (j0 + i) * s->stride;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        int32_t d = 0;
        for (; d + 4 <= s->hd; d += 4) {
            s0 += q[d] * k[d];
            s1 += q[d + 1] * k[d + 1];
            s2 += q[d + 2] * k[d + 2];
            s3 += q[d + 3] * k[d + 3];
        }
        for (; d < s->hd; d++) s0 += q[d] * k[d];
        scores[i] = (s0 + s1) + (s2 + s3);
    }
}
static void fixture_axpy_v(const void *ctx, const float *p, int64_t j0, int64_t n, float *out) {
    const load_src *s = ctx;
    for (int64_t i = 0; i < n; i++)
        for (int32_t d = 0; d < s->hd; d++) out[d] += p[i] * s->v[(j0 + i) * s->stride + d];
}

enum { EXT_BLOCKS_F32, EXT_BLOCKS_F16, EXT_PRODUCTS };

/* Runs flash on the case with views read through loaders (or F16 views, for F16 blocks), then
 * through the extension of `kind`; outputs and score_acc must be the same bits. */
static void flash_ext_case(fx *fl, const attn_case *c, int kind, int32_t bs) {
    const size_t n_out = (size_t)(c->n_q * c->n_head * c->head_dim);
    const size_t n_acc = (size_t)(c->n_kv_head * c->n_kv);
    float *o_load = malloc(n_out * sizeof(float)), *o_ext = malloc(n_out * sizeof(float));
    float *a_load = calloc(n_acc, sizeof(float)), *a_ext = calloc(n_acc, sizeof(float));
    const int32_t from = c->q_pos[c->n_q / 2];
    tsr_kv_view views[16];
    tsr_kv_view_ext ext[16];
    load_src srcs[16];
    block_copy b = {0};
    ck_assert_int_eq(attn_run(fl, c, kind == EXT_BLOCKS_F16 ? VIEW_F16 : VIEW_LOADED, from,
                              o_load, a_load), TSR_OK);
    attn_case_views(c, VIEW_LOADED, TSR_KV_DTYPE_BLOCKS, from, a_ext, views, srcs);
    if (kind != EXT_PRODUCTS) blocks_make(&b, c, bs, kind == EXT_BLOCKS_F16);
    for (int32_t g = 0; g < c->n_kv_head; g++) {
        ext[g] = (tsr_kv_view_ext){TSR_SIZED(tsr_kv_view_ext)};
        if (kind == EXT_PRODUCTS) {
            ext[g].dot_k = fixture_dot_k;
            ext[g].axpy_v = fixture_axpy_v;
            continue;
        }
        const size_t elt = kind == EXT_BLOCKS_F16 ? 2 : 4;
        ext[g].block_size = bs;
        ext[g].block_dtype = kind == EXT_BLOCKS_F16 ? TSR_DTYPE_F16 : TSR_DTYPE_F32;
        ext[g].k_blocks = b.table + (size_t)(g * 2) * (size_t)b.n_blocks;
        ext[g].v_blocks = b.table + (size_t)(g * 2 + 1) * (size_t)b.n_blocks;
        views[g].k_stride = views[g].v_stride = (size_t)c->head_dim * elt;
    }
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 1,
                               .phase = TSR_PHASE_PREFILL, .n_q = c->n_q, .q = c->q,
                               .q_pos = c->q_pos, .scale = 1.0f / sqrtf((float)c->head_dim),
                               .views = views, .out = o_ext, .views_ext = ext};
    ck_assert_int_eq(fx_attention_forward(fl, &call), TSR_OK);
    ck_assert_mem_eq(o_ext, o_load, n_out * sizeof(float));
    ck_assert_mem_eq(a_ext, a_load, n_acc * sizeof(float));
    if (kind != EXT_PRODUCTS) blocks_free(&b, c);
    free(o_load);
    free(o_ext);
    free(a_load);
    free(a_ext);
}

/* (n_head, n_kv_head, head_dim, n_q, n_kv, tile, block_size) */
static const int32_t ext_cases[][7] = {
    {4, 2, 16, 1, 300, 64, 16}, {8, 2, 16, 7, 129, 8, 5}, {6, 3, 20, 33, 257, 100, 100},
    {12, 4, 13, 9, 511, 33, 64},
};

START_TEST(flash_extensions_read_as_loads) {
    const int32_t *k = ext_cases[_i];
    attn_case c;
    attn_case_make(&c, 200 + (uint64_t)_i, k[0], k[1], k[2], k[3], k[4]);
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_head = c.n_head;
    s.n_kv_head = c.n_kv_head;
    s.head_dim = c.head_dim;
    s.n_ctx = 1 << 16;
    char tile[32];
    snprintf(tile, sizeof tile, "tile=%d", k[5]);
    const char *kv[] = {tile, NULL};
    fx fl;
    fx_open(&fl, 2, TSR_STAGE_ATTENTION, "attention-flash.so", "flash", kv, &s);
    for (int kind = EXT_BLOCKS_F32; kind <= EXT_PRODUCTS; kind++) flash_ext_case(&fl, &c, kind, k[6]);
    fx_close(&fl);
    attn_case_free(&c);
}
END_TEST

/* Calls of the counting products below (flash's workers call them concurrently). */
static int64_t product_calls;

static void counting_dot_k(const void *ctx, const float *q, int64_t j0, int64_t n,
                           float *scores) {
    __atomic_fetch_add(&product_calls, 1, __ATOMIC_RELAXED);
    fixture_dot_k(ctx, q, j0, n, scores);
}
static void counting_axpy_v(const void *ctx, const float *p, int64_t j0, int64_t n,
                            float *out) {
    __atomic_fetch_add(&product_calls, 1, __ATOMIC_RELAXED);
    fixture_axpy_v(ctx, p, j0, n, out);
}

/* flash computes through a view's products while a KV head serves at most 4 query heads, and
 * through its loaders (a tile converted once for all of them) beyond. */
START_TEST(flash_products_or_loads_by_group) {
    for (int32_t n_head = 8; n_head <= 10; n_head += 2) {
        attn_case c;
        attn_case_make(&c, 300, n_head, 2, 16, 3, 100);
        tsr_model_shape s = tsr_model_shape_synthetic();
        s.n_head = n_head;
        s.head_dim = 16;
        fx fl;
        fx_open(&fl, 2, TSR_STAGE_ATTENTION, "attention-flash.so", "flash", NULL, &s);
        tsr_kv_view views[2];
        tsr_kv_view_ext ext[2];
        load_src srcs[2];
        float out[10 * 3 * 16];
        attn_case_views(&c, VIEW_LOADED, TSR_DTYPE_PLUGIN_FIRST, 0, NULL, views, srcs);
        for (int32_t g = 0; g < 2; g++)
            ext[g] = (tsr_kv_view_ext){TSR_SIZED(tsr_kv_view_ext), .dot_k = counting_dot_k,
                                       .axpy_v = counting_axpy_v};
        tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 1, .n_q = c.n_q,
                                   .q = c.q, .q_pos = c.q_pos, .scale = 0.25f, .views = views,
                                   .out = out, .views_ext = ext};
        product_calls = 0;
        ck_assert_int_eq(fx_attention_forward(&fl, &call), TSR_OK);
        if (n_head / 2 <= 4) ck_assert_int_gt(product_calls, 0);
        else ck_assert_int_eq(product_calls, 0);
        fx_close(&fl);
        attn_case_free(&c);
    }
}
END_TEST

/* flash over kivi's views: through dot_k / axpy_v, and through the loaders (the same entries
 * dequantized), the same attention within f32 rounding. */
START_TEST(flash_on_kivi_products_matches_loads) {
    const int cs[3] = {2, 32, 64};
    fx f, fl;
    kv_rows data;
    kivi_setup(&f, cs, 2, 1, 0, &data);
    tsr_model_shape s = kv_shape(1, 2, 64, 1);
    s.n_head = 8;
    fx_open(&fl, 2, TSR_STAGE_ATTENTION, "attention-flash.so", "flash", NULL, &s);
    tsr_kv_view views[2];
    tsr_kv_view_ext ext[2];
    view_ext(&f, 0, 0, 2, views, ext);
    const int64_t n_q = 3;
    float q[3 * 8 * 64], out_ext[3 * 8 * 64], out_load[3 * 8 * 64];
    int32_t q_pos[3] = {100, 150, (int32_t)views[0].n - 1};
    uint64_t rng = 5;
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) q[i] = tsr_test_rng_unit(&rng);
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 0,
                               .phase = TSR_PHASE_DECODE, .n_q = n_q, .q = q, .q_pos = q_pos,
                               .scale = 0.125f, .views = views, .out = out_ext, .views_ext = ext};
    ck_assert_int_eq(fx_attention_forward(&fl, &call), TSR_OK);
    call.views_ext = NULL;
    call.out = out_load;
    ck_assert_int_eq(fx_attention_forward(&fl, &call), TSR_OK);
    assert_rows_close(out_load, out_ext, n_q * 8, 64, 1e-5, "flash on kivi: products vs loads");
    rows_free(&data);
    fx_close(&fl);
    fx_close(&f);
}
END_TEST

/* ---- hydragen -------------------------------------------------------------------------------- */

/* (n_head, n_kv_head, head_dim, tile, block_size, f16 blocks) */
static const int32_t hyd_cases[][6] = {
    {8, 2, 16, 64, 16, 0}, {4, 2, 20, 8, 5, 1}, {12, 4, 13, 33, 64, 0}, {8, 1, 32, 16, 7, 0},
};

/* The value of an instance's command of signature d(I). */
static double command_d(const fx *f, const char *name) {
    const tsr_plugin_desc *d = f->inst->ref->desc;
    for (uint32_t i = 0; i < d->n_commands; i++)
        if (strcmp(d->commands[i].name, name) == 0)
            return ((double (*)(void *))d->commands[i].fn)(f->inst->self);
    ck_abort_msg("no command %s", name);
    return 0;
}

/* Four sequences in a paged cache: 0 with a 150-entry prompt, 1 and 2 forked from it, each
 * then with entries of its own (2, 3 and 1), and 3 apart (90 entries). One batch of their
 * decode queries (2, 3, 1 and 1, the last positions each holds) through hydragen's
 * forward_batch gives the outputs of flash run on each sequence alone, bit for bit, with
 * score_acc (sequence 1) and head_mass (sequence 2) too; and the prefix was shared. */
START_TEST(hydragen_equals_flash_on_forks) {
    const int32_t *k = hyd_cases[_i];
    const int32_t n_head = k[0], nkv = k[1], hd = k[2];
    tsr_model_shape s = kv_shape(1, nkv, hd, 4);
    s.n_head = n_head;
    char block[32], tile[32];
    snprintf(block, sizeof block, "block_size=%d", k[4]);
    snprintf(tile, sizeof tile, "tile=%d", k[3]);
    const char *cache_kv[] = {block, k[5] ? "dtype=f16" : "dtype=f32", NULL};
    const char *attn_kv[] = {tile, NULL};
    fx f, fl, hy;
    cache_open(&f, "paged", cache_kv, &s);
    fx_open(&fl, 2, TSR_STAGE_ATTENTION, "attention-flash.so", "flash", attn_kv, &s);
    fx_open(&hy, 2, TSR_STAGE_ATTENTION, "attention-hydragen.so", "hydragen", attn_kv, &s);
    enum { N_SEQ = 4, PROMPT = 150 };
    const int64_t own[N_SEQ] = {2, 3, 1, 90}, n_q[N_SEQ] = {2, 3, 1, 1};
    kv_rows data[N_SEQ];
    for (int i = 0; i < N_SEQ; i++) data[i] = kivi_data(PROMPT + 8, nkv, hd, 40 + (uint64_t)i, 0);
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(put(&f, 0, 0, &data[0], 0, PROMPT), TSR_OK);
    ck_assert_int_eq(cvt(&f)->seq_fork(f.inst->self, 0, 1), TSR_OK);
    ck_assert_int_eq(cvt(&f)->seq_fork(f.inst->self, 0, 2), TSR_OK);
    ck_assert_int_eq(cvt(&f)->seq_begin(f.inst->self, 3), TSR_OK);
    for (int i = 0; i < N_SEQ; i++)
        ck_assert_int_eq(put(&f, i, 0, &data[i], i == 3 ? 0 : PROMPT, own[i]), TSR_OK);
    tsr_kv_view views[N_SEQ][4];
    tsr_kv_view_ext ext[N_SEQ][4];
    tsr_attention_call calls[2][N_SEQ];
    float *q[N_SEQ], *out[2][N_SEQ], *acc[2][4], mass[2][12] = {{0}};
    int32_t q_pos[N_SEQ][3];
    uint64_t rng = 11 + (uint64_t)_i;
    for (int i = 0; i < N_SEQ; i++) {
        view_ext(&f, i, 0, nkv, views[i], ext[i]);
        size_t n = (size_t)(n_q[i] * n_head * hd);
        q[i] = malloc(n * sizeof(float));
        for (size_t j = 0; j < n; j++) q[i][j] = 2.0f * tsr_test_rng_unit(&rng);
        for (int64_t t = 0; t < n_q[i]; t++)
            q_pos[i][t] = (int32_t)(views[i][0].n - n_q[i] + t);
    }
    for (int32_t g = 0; g < nkv; g++) views[1][g].score_from_pos = PROMPT + 1;
    for (int run = 0; run < 2; run++) {
        for (int32_t g = 0; g < nkv; g++) acc[run][g] = calloc((size_t)views[1][g].n, sizeof(float));
        for (int i = 0; i < N_SEQ; i++) {
            out[run][i] = malloc((size_t)(n_q[i] * n_head * hd) * sizeof(float));
            calls[run][i] = (tsr_attention_call){
                TSR_SIZED(tsr_attention_call), .seq_id = i, .layer = 0,
                .phase = TSR_PHASE_DECODE, .n_q = n_q[i], .q = q[i], .q_pos = q_pos[i],
                .scale = 1.0f / sqrtf((float)hd), .views = views[i], .out = out[run][i],
                .head_mass = i == 2 ? mass[run] : NULL, .stats_sink = 4, .stats_window = 16,
                .views_ext = ext[i]};
        }
    }
    /* run 0: flash, each sequence alone; run 1: hydragen, the batch at once */
    const tsr_attention_call *batch[N_SEQ];
    for (int32_t g = 0; g < nkv; g++) views[1][g].score_acc = acc[0][g];
    for (int i = 0; i < N_SEQ; i++) {
        ck_assert_int_eq(fx_attention_forward(&fl, &calls[0][i]), TSR_OK);
        batch[i] = &calls[1][i];
    }
    for (int32_t g = 0; g < nkv; g++) views[1][g].score_acc = acc[1][g];
    const tsr_attention_vtable *hvt = hy.vt;
    ck_assert_int_eq(hvt->forward_batch(hy.inst->self, batch, N_SEQ), TSR_OK);
    for (int i = 0; i < N_SEQ; i++)
        ck_assert_msg(memcmp(out[0][i], out[1][i], (size_t)(n_q[i] * n_head * hd) *
                                                       sizeof(float)) == 0,
                      "sequence %d: hydragen's output differs from flash's", i);
    for (int32_t g = 0; g < nkv; g++)
        ck_assert(memcmp(acc[0][g], acc[1][g], (size_t)views[1][g].n * sizeof(float)) == 0);
    ck_assert(memcmp(mass[0], mass[1], sizeof mass[0]) == 0);
    ck_assert_float_gt(mass[0][0] + mass[0][n_head - 1], 0.0f);
    /* Sequences 0, 1 and 2 share the prompt's whole blocks (each copied the one it wrote into),
     * cut to whole tiles, for their 6 queries; 3 shares nothing. */
    int64_t shared = PROMPT / k[4] * k[4] / k[3] * k[3] * (2 + 3 + 1), visible = 0;
    for (int i = 0; i < N_SEQ; i++) visible += n_q[i] * views[i][0].n;
    ck_assert_double_eq_tol(command_d(&hy, "shared_fraction"), (double)shared / visible, 1e-12);
    for (int run = 0; run < 2; run++) {
        for (int i = 0; i < N_SEQ; i++) free(out[run][i]);
        for (int32_t g = 0; g < nkv; g++) free(acc[run][g]);
    }
    for (int i = 0; i < N_SEQ; i++) {
        free(q[i]);
        rows_free(&data[i]);
        cvt(&f)->seq_end(f.inst->self, i);
    }
    fx_close(&hy);
    fx_close(&fl);
    fx_close(&f);
}
END_TEST

/* ---- model level (stories260K) --------------------------------------------------------------- */

static const char *pipeline_yaml(char *buf, size_t size, const char *cache) {
    snprintf(buf, size,
             "tessera: 1\nbackend: { plugin: cpu, threads: 2 }\nattention: { plugin: flash }\n"
             "cache: { %s }\ndecoder: { plugin: greedy }\n", cache);
    return buf;
}

/* A request driven by hand: a prompt, a fork whose two sides take different tokens in one
 * batch for 12 steps, a cut of sequence 0 back into its generated part, 6 more steps; the
 * logits of every forward, in order (malloc'd, *n_floats). */
static float *scripted_logits(const char *cache, size_t *n_floats) {
    char yaml[512];
    tsr_test_pipeline r;
    char *path = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, path, pipeline_yaml(yaml, sizeof yaml, cache), 256);
    free(path);
    const int32_t nv = r.model->hp.n_vocab;
    float *logits = malloc((size_t)(1 + 2 * 12 + 6) * (size_t)nv * sizeof(float)), *at = logits;
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, 64, NULL, NULL, NULL, NULL, &err), TSR_OK);
    const tsr_decode_api *api = &req.api;
    tsr_batch_entry b[40];
    for (int i = 0; i < 40; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = 1 + (i * 37) % 500,
                                 .want_logits = i == 39};
    ck_assert_int_eq(api->forward(api->ctx, b, 40, at), TSR_OK);
    at += nv;
    ck_assert_int_eq(api->seq_fork(api->ctx, 0, 1), TSR_OK);
    for (int step = 0; step < 12; step++) {
        b[0] = (tsr_batch_entry){.seq_id = 0, .pos = 40 + step, .token = 3 + step * 11,
                                 .want_logits = 1};
        b[1] = (tsr_batch_entry){.seq_id = 1, .pos = 40 + step, .token = 200 + step * 7,
                                 .want_logits = 1};
        ck_assert_int_eq(api->forward(api->ctx, b, 2, at), TSR_OK);
        at += 2 * nv;
    }
    ck_assert_int_eq(api->seq_truncate(api->ctx, 0, 45), TSR_OK);
    for (int step = 0; step < 6; step++) {
        b[0] = (tsr_batch_entry){.seq_id = 0, .pos = 45 + step, .token = 400 - step * 13,
                                 .want_logits = 1};
        ck_assert_int_eq(api->forward(api->ctx, b, 1, at), TSR_OK);
        at += nv;
    }
    tsr_request_end(&req);
    tsr_test_pipeline_close(&r);
    *n_floats = (size_t)(at - logits);
    return logits;
}

/* Settings that keep everything at full precision: kivi's residual beyond the context, every
 * token salient at 32 bits for zipcache (chunks made every 8 tokens), minicache merging from a
 * layer past the last; paged as it is. */
static const char *const exact_caches[] = {
    "plugin: kivi, residual: 256",
    "plugin: zipcache, salient: 1, high_bits: 32, gap: 8",
    "plugin: minicache, start: 99",
    "plugin: paged, block_size: 5",
    "plugin: paged, block_size: 64",
};

START_TEST(full_precision_settings_equal_full) {
    size_t n_full, n_got;
    float *full = scripted_logits("plugin: full", &n_full);
    float *got = scripted_logits(exact_caches[_i], &n_got);
    ck_assert_uint_eq(n_got, n_full);
    ck_assert_msg(memcmp(got, full, n_full * sizeof(float)) == 0, "%s: logits differ from full's",
                  exact_caches[_i]);
    free(full);
    free(got);
}
END_TEST

/* Under the settings that do compress, the logits stay near full's: the script above, max
 * |logit - full| measured (printed) and bounded loosely (stories260K's logits span ~30). */
static const char *const lossy_caches[] = {
    "plugin: kivi, bits: 4, residual: 32",
    "plugin: kivi, bits: 2, residual: 32",
    "plugin: zipcache, gap: 8",
    "plugin: minicache",
};

START_TEST(compressing_settings_stay_near_full) {
    size_t n_full, n_got;
    float *full = scripted_logits("plugin: full", &n_full);
    float *got = scripted_logits(lossy_caches[_i], &n_got);
    ck_assert_uint_eq(n_got, n_full);
    double diff = 0;
    for (size_t i = 0; i < n_full; i++) diff = fmax(diff, fabs((double)got[i] - full[i]));
    fprintf(stderr, "%-40s max |logit - full| %.3g\n", lossy_caches[_i], diff);
    ck_assert_msg(diff > 0 && diff < 8, "%s: max |logit - full| %g", lossy_caches[_i], diff);
    free(full);
    free(got);
}
END_TEST

/* The first tokens of tinystories_val.txt as stories260K's tokenizer cuts them (malloc'd). */
static int32_t *story_ids(int n) {
    char *model = tsr_test_data("models/stories260K.gguf"), *text_path =
                                                                  tsr_test_data("data/tinystories_val.txt");
    tsr_gguf *g;
    tsr_tokenizer *tok;
    tsr_error err;
    ck_assert_msg(tsr_gguf_open(model, &g, &err) == 0, "%s", err.msg);
    ck_assert_msg(tsr_tokenizer_from_gguf(g, &tok, &err) == 0, "%s", err.msg);
    size_t size, n_ids;
    char *text = tsr_test_read_file(text_path, &size);
    int32_t *ids;
    ck_assert_msg(tsr_tokenize(tok, text, size < 20000 ? size : 20000, true, false, &ids, &n_ids,
                               &err) == 0, "%s", err.msg);
    ck_assert_uint_ge(n_ids, (size_t)n);
    free(text);
    tsr_tokenizer_free(tok);
    tsr_gguf_close(g);
    free(text_path);
    free(model);
    return ids;
}

/* Teacher-forced generation: a prompt of `prompt` tokens in one forward, then every next token
 * forwarded alone, as generation stores them; returns the perplexity of the tokens after the
 * prompt, with the cache statistics at the end. */
static double decode_perplexity(const char *cache, const int32_t *ids, int n, int prompt,
                                tsr_cache_stats *st) {
    char yaml[512];
    tsr_test_pipeline r;
    char *path = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, path, pipeline_yaml(yaml, sizeof yaml, cache), n);
    free(path);
    const int32_t nv = r.model->hp.n_vocab;
    float *logits = malloc((size_t)nv * sizeof(float));
    tsr_error err;
    tsr_request req;
    ck_assert_int_eq(tsr_request_begin(&req, r.pl, n, NULL, NULL, NULL, NULL, &err), TSR_OK);
    tsr_batch_entry *b = calloc((size_t)n, sizeof *b);
    for (int i = 0; i < n; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = ids[i], .want_logits = 1};
    double nll = 0.0;
    for (int i = prompt; i < n; i++) {
        /* The forward that ends at i - 1 predicts token i. */
        int first = i == prompt ? 0 : i - 1, count = i == prompt ? prompt : 1;
        for (int j = first; j < first + count; j++) b[j].want_logits = j == i - 1;
        ck_assert_int_eq(req.api.forward(req.api.ctx, b + first, count, logits), TSR_OK);
        double m = logits[0], sum = 0.0;
        for (int32_t v = 1; v < nv; v++) m = fmax(m, logits[v]);
        for (int32_t v = 0; v < nv; v++) sum += exp(logits[v] - m);
        nll += m + log(sum) - logits[ids[i]];
    }
    *st = (tsr_cache_stats){TSR_SIZED(tsr_cache_stats)};
    tsr_pipeline_cache_stats(r.pl, st);
    tsr_request_end(&req);
    tsr_test_pipeline_close(&r);
    free(b);
    free(logits);
    return exp(nll / (n - prompt));
}

/* What each policy costs in quality on stories260K (a run of this test prints the table the
 * docs quote): perplexity of 448 teacher-forced generated tokens after a 64-token prompt, KV
 * bits per value and bytes at the end, against 'full'. Bounds well above what was measured,
 * so that a policy that stops working fails. */
static const struct {
    const char *cache;
    double max_ratio;
} quality_cases[] = {
    {"plugin: kivi, bits: 4", 1.02},    {"plugin: kivi, bits: 2", 1.3},
    {"plugin: kivi, bits: 2, residual: 32", 1.6},
    {"plugin: zipcache", 1.3},          {"plugin: zipcache, high_bits: 8, low_bits: 4", 1.02},
    {"plugin: minicache", 1.5},         {"plugin: minicache, gamma: 0", 1.5},
    {"plugin: paged", 1.0},
};

START_TEST(decode_quality_against_full) {
    const int n = 512, prompt = 64;
    int32_t *ids = story_ids(n);
    tsr_cache_stats st_full, st;
    double full = decode_perplexity("plugin: full", ids, n, prompt, &st_full);
    double ppl = decode_perplexity(quality_cases[_i].cache, ids, n, prompt, &st);
    fprintf(stderr, "%-45s ppl %.4f (full %.4f, x%.4f), %.2f bits/value, %llu KV bytes (full %llu)\n",
            quality_cases[_i].cache, ppl, full, ppl / full, st.bits_per_value,
            (unsigned long long)st.bytes_reserved, (unsigned long long)st_full.bytes_reserved);
    ck_assert_msg(ppl <= full * quality_cases[_i].max_ratio, "%s: perplexity %g, full's %g",
                  quality_cases[_i].cache, ppl, full);
    ck_assert(st.bits_per_value > 0);
    free(ids);
}
END_TEST

/* Parameters out of range or inconsistent, for every cache policy and attention plugin: one
 * line naming the plugin (or the key) and the value, exit 1, nothing on stdout. */
static const struct {
    const char *set[3];
    const char *want;
} bad_parameter_cases[] = {
    {{"cache.plugin=full", "cache.dtype=f8"},
     "tessera: --set: cache.dtype: expected one of f32, f16, got 'f8'\n"},
    {{"cache.plugin=streaming", "cache.window=0"},
     "tessera: --set: cache.window: expected an integer in [1, 1048576], got '0'\n"},
    {{"cache.plugin=streaming", "cache.heads={DIR}/missing.heads"},
     "tessera: cache: streaming: heads: {DIR}/missing.heads: cannot open: No such file or "
     "directory\n"},
    {{"cache.plugin=streaming", "cache.heads={DIR}/other.heads"},
     "tessera: cache: streaming: heads: {DIR}/other.heads: profiled on a model of 22 layers, "
     "32 query heads and 4 KV heads; this one has 5, 8 and 4: profile it with tessera "
     "profile-heads\n"},
    {{"cache.plugin=h2o", "cache.heavy=0", "cache.recent=0"},
     "tessera: cache: h2o: heavy 0, recent 0: the budget heavy + recent must be at least 1 "
     "entry\n"},
    {{"cache.plugin=a2sf", "cache.heavy=0", "cache.recent=0"},
     "tessera: cache: a2sf: heavy 0, recent 0: the budget heavy + recent must be at least 1 "
     "entry\n"},
    {{"cache.plugin=a2sf", "cache.factor=1.5"},
     "tessera: --set: cache.factor: expected a number in [0, 1], got '1.5'\n"},
    {{"cache.plugin=tova", "cache.budget=0"},
     "tessera: --set: cache.budget: expected an integer in [1, 1048576], got '0'\n"},
    {{"cache.plugin=snapkv", "cache.budget=0"},
     "tessera: --set: cache.budget: expected an integer in [2, 1048576], got '0'\n"},
    {{"cache.plugin=snapkv", "cache.budget=64", "cache.window=64"},
     "tessera: cache: snapkv: window 64, budget 64: the window must be smaller than the budget, "
     "which holds it and the entries chosen before it\n"},
    {{"cache.plugin=snapkv", "cache.kernel=4"},
     "tessera: cache: snapkv: kernel 4: expected an odd size, centred on each position\n"},
    {{"cache.plugin=kivi", "cache.residual=100"},
     "tessera: cache: kivi: residual 100 is not a multiple of group 32: keys leave the residual "
     "in whole groups\n"},
    {{"cache.plugin=kivi", "cache.group=0"},
     "tessera: --set: cache.group: expected an integer in [1, 4096], got '0'\n"},
    {{"cache.plugin=zipcache", "cache.high_bits=2", "cache.low_bits=4"},
     "tessera: cache: zipcache: high_bits 2 is below low_bits 4: salient tokens get the wider "
     "codes\n"},
    {{"cache.plugin=zipcache", "cache.gap=0"},
     "tessera: --set: cache.gap: expected an integer in [1, 1048576], got '0'\n"},
    {{"cache.plugin=minicache", "cache.gamma=0.5"},
     "tessera: --set: cache.gamma: expected a number in [0, 0.3], got '0.5'\n"},
    {{"cache.plugin=paged", "cache.block_size=0"},
     "tessera: --set: cache.block_size: expected an integer in [1, 4096], got '0'\n"},
    {{"attention.plugin=flash", "attention.tile=4"},
     "tessera: --set: attention.tile: expected an integer in [8, 1024], got '4'\n"},
    {{"attention.plugin=ggml", "attention.kv_pad=0"},
     "tessera: --set: attention.kv_pad: expected an integer in [1, 4096], got '0'\n"},
    {{"attention.plugin=duo", "attention.heads={DIR}/missing.heads"},
     "tessera: attention: duo: heads: {DIR}/missing.heads: cannot open: No such file or "
     "directory\n"},
    {{"attention.plugin=duo", "attention.heads={DIR}/other.heads"},
     "tessera: attention: duo: heads: {DIR}/other.heads: profiled on a model of 22 layers, "
     "32 query heads and 4 KV heads; this one has 5, 8 and 4: profile it with tessera "
     "profile-heads\n"},
    {{"attention.plugin=duo", "attention.window=0"},
     "tessera: --set: attention.window: expected an integer in [1, 1048576], got '0'\n"},
    {{"attention.plugin=quest", "attention.k=2"},
     "tessera: --set: attention.k: expected an integer in [3, 1048576], got '2'\n"},
    {{"attention.plugin=quest", "attention.page=0"},
     "tessera: --set: attention.page: expected an integer in [1, 1024], got '0'\n"},
    {{"attention.plugin=tidal", "attention.k=0"},
     "tessera: --set: attention.k: expected an integer in [1, 1048576], got '0'\n"},
    {{"attention.plugin=tidal", "attention.reselect_layer=1"},
     "tessera: attention: tidal: reselect_layer 1 is before select_layer 2: the re-selection "
     "comes after the selection (or -1: 13/32 of the layers)\n"},
};

/* `text` with each "{DIR}" replaced by dir; the caller frees it. */
static char *with_dir(const char *text, const char *dir) {
    size_t n = strlen(text) + 1;
    for (const char *p = text; (p = strstr(p, "{DIR}")); p += 5) n += strlen(dir);
    char *out = malloc(n), *o = out;
    for (const char *p = text; *p;) {
        if (strncmp(p, "{DIR}", 5) == 0) {
            o = stpcpy(o, dir);
            p += 5;
        } else {
            *o++ = *p++;
        }
    }
    *o = '\0';
    return out;
}

START_TEST(bad_parameters_get_one_line) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *dir = tsr_test_tmpdir();
    char *other = with_dir("{DIR}/other.heads", dir);
    static const char other_model[] = "tessera-heads 1\nlayers 22 heads 32 kv_heads 4\n";
    ck_assert_int_eq(tsr_test_write_file(other, other_model, strlen(other_model)), 0);
    const char *const *set = bad_parameter_cases[_i].set;
    const char *args[16] = {"run", "-m", model, "-p", "hi", "-n", "2"};
    char *sets[3] = {NULL, NULL, NULL};
    size_t n = 7;
    for (int i = 0; i < 3 && set[i]; i++) {
        args[n++] = "--set";
        args[n++] = sets[i] = with_dir(set[i], dir);
    }
    char *out, *err, *want = with_dir(bad_parameter_cases[_i].want, dir);
    ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 1);
    ck_assert_str_eq(out, "");
    ck_assert_str_eq(err, want);
    for (int i = 0; i < 3; i++) free(sets[i]);
    free(want);
    free(out);
    free(err);
    free(other);
    free(dir);
    free(model);
}
END_TEST

/* A value that makes a sparse plugin read everything, or minicache merge nothing, runs (the
 * exact tests use it) with one warning saying so. */
START_TEST(degenerate_layers_warn) {
    static const char *const cases[][2] = {
        {"attention.plugin=tidal", "attention.select_layer=5"},
        {"attention.plugin=quest", "attention.dense_layers=5"},
        {"cache.plugin=minicache", "cache.start=4"},
    };
    static const char *const want[] = {
        "tessera: tidal: warning: select_layer 5: the model has 5 layers, so no layer selects "
        "and every layer reads every entry\n",
        "tessera: quest: warning: dense_layers 5: the model has 5 layers, so every layer reads "
        "every entry\n",
        "tessera: minicache: warning: start 4: the model has 5 layers, so no pair (start, "
        "start+1) merges and every layer keeps every row, as 'full' does\n",
    };
    char *model = tsr_test_data("models/stories260K.gguf");
    for (size_t i = 0; i < 3; i++) {
        const char *args[] = {"run", "-m", model, "-p", "hi", "-n", "2", "--set", cases[i][0],
                              "--set", cases[i][1], NULL};
        char *out, *err;
        ck_assert_int_eq(tsr_test_tessera(&out, &err, args), 0);
        ck_assert_msg(strncmp(err, want[i], strlen(want[i])) == 0, "%s", err);
        free(out);
        free(err);
    }
    free(model);
}
END_TEST

/* `run --parallel 8` over a paged cache, 8 sampled continuations of a 70-token prompt decoded
 * in one batch: hydragen prints flash's text, having attended to the forks' shared prompt
 * once for all of them (two thirds of the pairs, its -v line says). */
START_TEST(hydragen_parallel_run_equals_flash) {
    char *model = tsr_test_data("models/stories260K.gguf");
    const char *prompt = "Once upon a time, there was a little girl named Lily. She loved to play "
                         "outside in the sun. One day, she saw a big red ball in the park. She "
                         "wanted to play with it, but it was too high. Lily asked her mom for help.";
    char *text[2], *err[2];
    const char *attention[2] = {"attention.plugin=flash", "attention.plugin=hydragen"};
    for (int i = 0; i < 2; i++) {
        const char *args[] = {"run", "-m", model, "-p", prompt, "-n", "40", "--parallel", "8",
                              "--seed", "7", "-v", "--set", "decoder.plugin=parallel", "--set",
                              "cache.plugin=paged", "--set", attention[i], NULL};
        ck_assert_int_eq(tsr_test_tessera(&text[i], &err[i], args), 0);
    }
    ck_assert_str_eq(text[1], text[0]);
    ck_assert_ptr_nonnull(strstr(text[1], "--- sequence 7 ---"));
    ck_assert_msg(strstr(err[1], "tessera: hydragen: info: batched forwards: 798720 of 1198080 "
                                 "(query, head) x entry pairs in shared prefix passes (66.7%)\n"),
                  "%s", err[1]);
    for (int i = 0; i < 2; i++) {
        free(text[i]);
        free(err[i]);
    }
    free(model);
}
END_TEST

static Suite *suite(int models) {
    Suite *s = suite_create("kv-policies");
    TCase *tc = tcase_create(models ? "models" : "policies");
    tcase_set_timeout(tc, 300);
    if (models) {
        tcase_add_loop_test(tc, full_precision_settings_equal_full, 0,
                            (int)(sizeof exact_caches / sizeof exact_caches[0]));
        tcase_add_loop_test(tc, compressing_settings_stay_near_full, 0,
                            (int)(sizeof lossy_caches / sizeof lossy_caches[0]));
        tcase_add_loop_test(tc, decode_quality_against_full, 0,
                            (int)(sizeof quality_cases / sizeof quality_cases[0]));
        tcase_add_loop_test(tc, bad_parameters_get_one_line, 0,
                            (int)(sizeof bad_parameter_cases / sizeof bad_parameter_cases[0]));
        tcase_add_test(tc, degenerate_layers_warn);
        tcase_add_test(tc, hydragen_parallel_run_equals_flash);
    } else {
        const int n_kivi = (int)(sizeof kivi_cases / sizeof kivi_cases[0]);
        tcase_add_test(tc, kvq_grid_covers_its_range);
        tcase_add_loop_test(tc, kivi_reads_within_the_bound, 0, n_kivi);
        tcase_add_loop_test(tc, kivi_products_equal_the_rows, 0, n_kivi);
        tcase_add_test(tc, kivi_truncate_and_fork);
        tcase_add_test(tc, kivi_residual_boundaries);
        tcase_add_test(tc, kivi_bits_per_value);
        tcase_add_test(tc, paged_forks_share_blocks);
        tcase_add_test(tc, minicache_merge_and_retention);
        tcase_add_test(tc, zipcache_saliency_bounds_and_products);
        tcase_add_loop_test(tc, flash_extensions_read_as_loads, 0,
                            (int)(sizeof ext_cases / sizeof ext_cases[0]));
        tcase_add_test(tc, flash_products_or_loads_by_group);
        tcase_add_test(tc, flash_on_kivi_products_matches_loads);
        tcase_add_loop_test(tc, hydragen_equals_flash_on_forks, 0,
                            (int)(sizeof hyd_cases / sizeof hyd_cases[0]));
    }
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) {
    int models = argc > 1 && strcmp(argv[1], "models") == 0;
    if (models) free(tsr_test_require_data("models/stories260K.gguf"));
    return tsr_test_run_suite(suite(models));
}
