/* The first shipped stage plugins (attention reference/flash, cache full/streaming, decoder
 * greedy/sample), loaded from their built .so files through the host's loader exactly as a
 * pipeline loads them: registry, typed parameters bound from text, stage init from a shape. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

#include "plugin/commands.h"
#include "plugin/loader.h"
#include "config/params.h"
#include "plugin/stage_init.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"

/* ---- fixtures ------------------------------------------------------------------------------ */

static tsr_model_shape attn_shape(const attn_case *c) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_head = c->n_head;
    s.n_kv_head = c->n_kv_head;
    s.head_dim = c->head_dim;
    s.n_ctx = 1 << 16;
    return s;
}

START_TEST(test_half_conversion) {
    /* Known encodings (IEEE 754 binary16). */
    ck_assert_uint_eq(tsr_f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(tsr_f32_to_f16(-2.0f), 0xc000);
    ck_assert_uint_eq(tsr_f32_to_f16(65504.0f), 0x7bff);
    ck_assert_uint_eq(tsr_f32_to_f16(65520.0f), 0x7c00); /* rounds up to infinity */
    ck_assert_uint_eq(tsr_f32_to_f16(0x1p-24f), 0x0001);
    ck_assert_uint_eq(tsr_f32_to_f16(0x1p-25f), 0x0000); /* tie to even */
    ck_assert_uint_eq(tsr_f32_to_f16(0.1f), 0x2e66);
    ck_assert_uint_eq(tsr_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie to even, down */
    ck_assert_uint_eq(tsr_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02); /* tie to even, up */
    ck_assert(tsr_f16_to_f32(0x3555) > 0.33325f && tsr_f16_to_f32(0x3555) < 0.33326f);
    ck_assert(isinf(tsr_f16_to_f32(0xfc00)) && tsr_f16_to_f32(0xfc00) < 0);
    ck_assert(isnan(tsr_f16_to_f32(0x7e00)));
    /* Every half that is a number survives the round trip. */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
        ck_assert_uint_eq(tsr_f32_to_f16(tsr_f16_to_f32((uint16_t)h)), h);
    }
}
END_TEST

START_TEST(test_reference_by_hand) {
    /* 1 query head per KV head, head_dim 4, scale 1/2: q.k = 4 for entry 0, 0 for entry 1,
     * entry 2 is in the future. out = (e^2 v0 + v1) / (e^2 + 1); head 1 reads view 1. */
    attn_case c = {.n_head = 2, .n_kv_head = 2, .head_dim = 4};
    tsr_model_shape s = attn_shape(&c);
    fx f;
    fx_open(&f, 1, TSR_STAGE_ATTENTION, "attention-reference.so", "reference", NULL, &s);
    float q[8] = {2, 0, 0, 0, 0, 2, 0, 0};
    float k0[12] = {2, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5};
    float v0[12] = {1, 0, 0, 0, 0, 1, 0, 0, 9, 9, 9, 9};
    float k1[12] = {0, 2, 0, 0, 1, 0, 0, 0, 5, 5, 5, 5};
    float v1[12] = {0, 0, 3, 0, 0, 0, 0, 3, 9, 9, 9, 9};
    int32_t kpos[3] = {0, 1, 2}, qpos = 1;
    float acc[6] = {0};
    tsr_kv_view views[2] = {
        {TSR_SIZED(tsr_kv_view), .n = 3, .pos = kpos, .dtype = TSR_DTYPE_F32, .k = k0, .v = v0,
         .k_stride = 16, .v_stride = 16, .score_acc = acc, .score_from_pos = 0},
        {TSR_SIZED(tsr_kv_view), .n = 3, .pos = kpos, .dtype = TSR_DTYPE_F32, .k = k1, .v = v1,
         .k_stride = 16, .v_stride = 16, .score_acc = acc + 3, .score_from_pos = 2},
    };
    float out[8];
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 0, .n_q = 1, .q = q,
                               .q_pos = &qpos, .scale = 0.5f, .views = views, .out = out};
    const tsr_attention_vtable *vt = f.vt;
    ck_assert_int_eq(vt->forward(f.inst->self, &call), TSR_OK);
    /* Both heads score 2 on their entry 0 and 0 on entry 1. */
    double e = exp(2.0), p0 = e / (e + 1.0), p1 = 1.0 / (e + 1.0);
    double want[8] = {p0, p1, 0, 0, 0, 0, 3 * p0, 3 * p1};
    for (int i = 0; i < 8; i++) ck_assert_double_eq_tol(out[i], want[i], 1e-6);
    /* score_acc: view 0 observes from position 0, view 1 only from 2 (the query is at 1). */
    ck_assert_double_eq_tol(acc[0], p0, 1e-6);
    ck_assert_double_eq_tol(acc[1], p1, 1e-6);
    ck_assert_float_eq(acc[2], 0.0f);
    for (int i = 3; i < 6; i++) ck_assert_float_eq(acc[i], 0.0f);
    /* Layer out of range: an error with a message. */
    call.layer = 2;
    ck_assert_int_eq(vt->forward(f.inst->self, &call), TSR_E_RANGE);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "layer 2"));
    fx_close(&f);
}
END_TEST

/* (n_head, n_kv_head, head_dim, n_q, n_kv, tile) */
static const int32_t flash_cases[][6] = {
    {4, 2, 16, 1, 300, 64},   {8, 2, 16, 7, 129, 8},   {6, 3, 20, 33, 257, 100},
    {4, 1, 32, 5, 1000, 1024}, {4, 4, 8, 16, 70, 16},  {8, 8, 16, 40, 64, 64},
    {12, 4, 13, 9, 511, 33},
};

START_TEST(test_flash_matches_reference) {
    const int32_t *k = flash_cases[_i];
    attn_case c;
    attn_case_make(&c, 100 + (uint64_t)_i, k[0], k[1], k[2], k[3], k[4]);
    tsr_model_shape s = attn_shape(&c);
    char tile[32];
    snprintf(tile, sizeof tile, "tile=%d", k[5]);
    const char *kv[] = {tile, NULL};
    fx ref, fl;
    fx_open(&ref, 2, TSR_STAGE_ATTENTION, "attention-reference.so", "reference", NULL, &s);
    fx_open(&fl, 2, TSR_STAGE_ATTENTION, "attention-flash.so", "flash", kv, &s);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim);
    float *o_ref = malloc(n_out * sizeof(float)), *o_fl = malloc(n_out * sizeof(float));
    size_t n_acc = (size_t)(c.n_kv_head * c.n_kv);
    float *a_ref = calloc(n_acc, sizeof(float)), *a_fl = calloc(n_acc, sizeof(float));
    int32_t from = c.q_pos[c.n_q / 2];
    for (int kind = VIEW_F32; kind <= VIEW_F16; kind++) {
        memset(a_ref, 0, n_acc * sizeof(float));
        memset(a_fl, 0, n_acc * sizeof(float));
        ck_assert_int_eq(attn_run(&ref, &c, kind, from, o_ref, a_ref), TSR_OK);
        ck_assert_int_eq(attn_run(&fl, &c, kind, from, o_fl, a_fl), TSR_OK);
        assert_rows_close(o_ref, o_fl, c.n_q * c.n_head, c.head_dim, 1e-5,
                          kind == VIEW_F16 ? "flash f16" : "flash f32");
        /* The first query sees nothing: zeros in both. */
        for (int32_t d = 0; d < c.head_dim && c.n_q > 1; d++) {
            ck_assert_float_eq(o_ref[d], 0.0f);
            ck_assert_float_eq(o_fl[d], 0.0f);
        }
        /* score_acc: equal, and each observed (query, head) that sees something adds 1. */
        double total = 0.0;
        for (size_t j = 0; j < n_acc; j++) {
            ck_assert_msg(fabs(a_ref[j] - a_fl[j]) <= 1e-5 * fmax(1.0, fabs(a_ref[j])),
                          "score_acc[%zu]: %g vs %g", j, a_ref[j], a_fl[j]);
            total += a_ref[j];
        }
        int64_t observed = 0;
        int32_t min_pos = c.kv_pos[0];
        for (int64_t j = 0; j < c.n_kv; j++)
            min_pos = c.kv_pos[j] < min_pos ? c.kv_pos[j] : min_pos;
        for (int64_t i = 0; i < c.n_q; i++)
            observed += c.q_pos[i] >= from && c.q_pos[i] >= min_pos;
        ck_assert_double_eq_tol(total, (double)(observed * c.n_head), 1e-3);
    }
    /* F16 views against the F32 reference: the error of half precision, not more. */
    ck_assert_int_eq(attn_run(&ref, &c, VIEW_F32, 0, o_ref, NULL), TSR_OK);
    ck_assert_int_eq(attn_run(&fl, &c, VIEW_F16, 0, o_fl, NULL), TSR_OK);
    assert_rows_close(o_ref, o_fl, c.n_q * c.n_head, c.head_dim, 2e-2, "f16 vs f32");
    free(o_ref);
    free(o_fl);
    free(a_ref);
    free(a_fl);
    fx_close(&ref);
    fx_close(&fl);
    attn_case_free(&c);
}
END_TEST

START_TEST(test_attention_loaded_views) {
    /* A view in a plugin dtype, read through load_k/load_v, gives exactly the F32 result. */
    attn_case c;
    attn_case_make(&c, 7, 4, 2, 16, 6, 150);
    tsr_model_shape s = attn_shape(&c);
    const char *names[2][2] = {{"attention-reference.so", "reference"},
                               {"attention-flash.so", "flash"}};
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim);
    float *a = malloc(n_out * sizeof(float)), *b = malloc(n_out * sizeof(float));
    for (int p = 0; p < 2; p++) {
        fx f;
        fx_open(&f, 1, TSR_STAGE_ATTENTION, names[p][0], names[p][1], NULL, &s);
        ck_assert_int_eq(attn_run(&f, &c, VIEW_F32, 0, a, NULL), TSR_OK);
        ck_assert_int_eq(attn_run(&f, &c, VIEW_LOADED, 0, b, NULL), TSR_OK);
        ck_assert_mem_eq(a, b, n_out * sizeof(float));
        fx_close(&f);
    }
    free(a);
    free(b);
    attn_case_free(&c);
}
END_TEST

START_TEST(test_attention_thread_independent) {
    attn_case c;
    attn_case_make(&c, 11, 8, 2, 16, 21, 333);
    tsr_model_shape s = attn_shape(&c);
    const char *names[2][2] = {{"attention-reference.so", "reference"},
                               {"attention-flash.so", "flash"}};
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim), n_acc = (size_t)(2 * c.n_kv);
    for (int p = 0; p < 2; p++) {
        float *out[2], *acc[2];
        for (int t = 0; t < 2; t++) {
            fx f;
            fx_open(&f, t + 1, TSR_STAGE_ATTENTION, names[p][0], names[p][1], NULL, &s);
            ck_assert_int_eq(tsr_pool_size(f.pool), t + 1);
            out[t] = malloc(n_out * sizeof(float));
            acc[t] = calloc(n_acc, sizeof(float));
            ck_assert_int_eq(attn_run(&f, &c, VIEW_F16, c.q_pos[3], out[t], acc[t]), TSR_OK);
            fx_close(&f);
        }
        ck_assert_mem_eq(out[0], out[1], n_out * sizeof(float));
        ck_assert_mem_eq(acc[0], acc[1], n_acc * sizeof(float));
        for (int t = 0; t < 2; t++) {
            free(out[t]);
            free(acc[t]);
        }
    }
    attn_case_free(&c);
}
END_TEST

/* ---- cache policies ------------------------------------------------------------------------ */

/* K/V rows whose values encode (position, head, element, k or v), so any row read back can be
 * checked. */
static float kv_value(int32_t pos, int32_t head, int32_t d, int is_v) {
    return (float)(pos * 1000 + head * 100 + d) * (is_v ? -1.0f : 1.0f) * 0.125f;
}

static tsr_status cache_store(fx *f, int64_t seq, int32_t layer, int32_t pos0, int64_t n) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    int32_t nkv = s.n_kv_head, hd = s.head_dim;
    float *k = malloc(sizeof(float) * (size_t)(n * nkv * hd));
    float *v = malloc(sizeof(float) * (size_t)(n * nkv * hd));
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
    for (int64_t t = 0; t < n; t++) {
        pos[t] = pos0 + (int32_t)t;
        for (int32_t h = 0; h < nkv; h++)
            for (int32_t d = 0; d < hd; d++) {
                k[(t * nkv + h) * hd + d] = kv_value(pos[t], h, d, 0);
                v[(t * nkv + h) * hd + d] = kv_value(pos[t], h, d, 1);
            }
    }
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = seq, .layer = layer,
                      .phase = n > 1 ? TSR_PHASE_PREFILL : TSR_PHASE_DECODE, .n = n, .pos = pos,
                      .k = k, .v = v};
    const tsr_cache_vtable *vt = f->vt;
    tsr_status st = vt->store(f->inst->self, &w);
    free(k);
    free(v);
    free(pos);
    return st;
}

/* Checks every row of every head of the view against kv_value and returns the positions it
 * holds as a bitmap over [0, n_bits). */
static void cache_check_view(fx *f, int64_t seq, int32_t layer, uint8_t *seen, int32_t n_bits,
                             int64_t *n_out) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    tsr_kv_view views[8];
    const tsr_cache_vtable *vt = f->vt;
    ck_assert_int_eq(vt->view(f->inst->self, seq, layer, TSR_PHASE_DECODE, views), TSR_OK);
    memset(seen, 0, (size_t)n_bits);
    for (int32_t h = 0; h < s.n_kv_head; h++) {
        const tsr_kv_view *v = &views[h];
        ck_assert_int_eq(v->n, views[0].n);
        ck_assert_ptr_null(v->score_acc);
        for (int64_t j = 0; j < v->n; j++) {
            int32_t p = v->pos[j];
            ck_assert(p >= 0 && p < n_bits);
            if (h == 0) {
                ck_assert_msg(!seen[p], "position %d twice", p);
                seen[p] = 1;
            }
            const char *krow = (const char *)v->k + j * v->k_stride;
            const char *vrow = (const char *)v->v + j * v->v_stride;
            for (int32_t d = 0; d < s.head_dim; d++) {
                float kk, vv;
                if (v->dtype == TSR_DTYPE_F32) {
                    kk = ((const float *)krow)[d];
                    vv = ((const float *)vrow)[d];
                } else {
                    ck_assert_int_eq(v->dtype, TSR_DTYPE_F16);
                    kk = tsr_f16_to_f32(((const uint16_t *)krow)[d]);
                    vv = tsr_f16_to_f32(((const uint16_t *)vrow)[d]);
                }
                float wk = kv_value(p, h, d, 0), wv = kv_value(p, h, d, 1);
                if (v->dtype == TSR_DTYPE_F16) {
                    wk = tsr_f16_to_f32(tsr_f32_to_f16(wk));
                    wv = tsr_f16_to_f32(tsr_f32_to_f16(wv));
                }
                ck_assert_float_eq(kk, wk);
                ck_assert_float_eq(vv, wv);
            }
        }
    }
    *n_out = views[0].n;
}

static tsr_cache_stats cache_stats(fx *f) {
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    const tsr_cache_vtable *vt = f->vt;
    vt->stats(f->inst->self, &st);
    return st;
}

START_TEST(test_full_round_trip) {
    const char *kv_f16[] = {"dtype=f16", NULL};
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-full.so", "full", _i ? kv_f16 : NULL, NULL);
    const tsr_cache_vtable *vt = f.vt;
    size_t elem = _i ? 2 : 4;
    uint8_t seen[256];
    int64_t n;
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(cache_store(&f, 0, 0, 0, 5), TSR_OK);
    ck_assert_int_eq(cache_store(&f, 0, 1, 0, 5), TSR_OK);
    for (int32_t p = 5; p < 17; p++) {
        ck_assert_int_eq(cache_store(&f, 0, 0, p, 1), TSR_OK);
        ck_assert_int_eq(cache_store(&f, 0, 1, p, 1), TSR_OK);
    }
    for (int32_t l = 0; l < 2; l++) {
        cache_check_view(&f, 0, l, seen, 256, &n);
        ck_assert_int_eq(n, 17);
        for (int p = 0; p < 17; p++) ck_assert(seen[p]);
    }
    /* 17 rows: capacity 16 doubled to 32, per layer, 2 heads, K and V. */
    tsr_cache_stats st = cache_stats(&f);
    ck_assert_uint_eq(st.bytes_reserved, 2 * (2 * 2 * 32 * 16 * elem));
    ck_assert_int_eq(st.entries, 2 * 2 * 17);
    ck_assert_int_eq(st.evicted, 0);
    vt->seq_end(f.inst->self, 0);
    st = cache_stats(&f);
    ck_assert_uint_eq(st.bytes_reserved, 0);
    ck_assert_int_eq(st.entries, 0);
    ck_assert_uint_eq(st.bytes_peak, 2 * (2 * 2 * 32 * 16 * elem));
    fx_close(&f);
}
END_TEST

START_TEST(test_full_fork_truncate) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_seq_max = 2;
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-full.so", "full", NULL, &s);
    const tsr_cache_vtable *vt = f.vt;
    uint8_t seen[256];
    int64_t n;
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 7), TSR_OK);
    for (int32_t l = 0; l < 2; l++) ck_assert_int_eq(cache_store(&f, 7, l, 0, 10), TSR_OK);
    ck_assert_int_eq(vt->seq_fork(f.inst->self, 7, 9), TSR_OK);
    ck_assert_int_eq(vt->seq_fork(f.inst->self, 7, 9), TSR_E_STATE); /* dst alive */
    ck_assert_int_eq(cache_store(&f, 9, 0, 10, 3), TSR_OK);
    cache_check_view(&f, 9, 0, seen, 256, &n);
    ck_assert_int_eq(n, 13);
    cache_check_view(&f, 7, 0, seen, 256, &n);
    ck_assert_int_eq(n, 10); /* the source did not change */
    ck_assert_int_eq(cache_stats(&f).entries, 2 * (10 + 10 + 10 + 13));

    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 9, 4), TSR_OK);
    for (int32_t l = 0; l < 2; l++) {
        cache_check_view(&f, 9, l, seen, 256, &n);
        ck_assert_int_eq(n, 4);
        for (int p = 0; p < 4; p++) ck_assert(seen[p]);
    }
    ck_assert_int_eq(cache_stats(&f).entries, 2 * (10 + 10 + 4 + 4));
    /* Storing again after the cut continues from it. */
    ck_assert_int_eq(cache_store(&f, 9, 0, 4, 2), TSR_OK);
    cache_check_view(&f, 9, 0, seen, 256, &n);
    ck_assert_int_eq(n, 6);
    vt->seq_end(f.inst->self, 9);
    vt->seq_end(f.inst->self, 7);
    fx_close(&f);
}
END_TEST

START_TEST(test_full_errors) {
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-full.so", "full", NULL, NULL);
    const tsr_cache_vtable *vt = f.vt;
    tsr_kv_view views[2];
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_E_STATE);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "already alive"));
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 1), TSR_E_RANGE); /* n_seq_max is 1 */
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "n_seq_max"));
    ck_assert_int_eq(cache_store(&f, 3, 0, 0, 1), TSR_E_INVALID);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "unknown sequence 3"));
    ck_assert_int_eq(vt->view(f.inst->self, 3, 0, 0, views), TSR_E_INVALID);
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 3, 0), TSR_E_INVALID);
    ck_assert_int_eq(cache_store(&f, 0, 2, 0, 1), TSR_E_RANGE);
    ck_assert_int_eq(cache_store(&f, 0, 0, 256, 1), TSR_E_RANGE); /* n_ctx 256 */
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "position 256"));
    ck_assert_int_eq(cache_store(&f, 0, 0, 250, 6), TSR_OK);
    ck_assert_int_eq(cache_store(&f, 0, 0, 0, 251), TSR_E_RANGE); /* 6 + 251 > n_ctx */
    ck_assert_int_eq(cache_stats(&f).entries, 2 * 6);
    fx_close(&f);
}
END_TEST

START_TEST(test_streaming_constant_memory) {
    const char *kv[] = {"sink=4", "window=16", NULL};
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, NULL);
    const tsr_cache_vtable *vt = f.vt;
    static uint8_t seen[2048];
    int64_t n;
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    uint64_t after_fill = 0;
    for (int32_t p = 0; p < 2000; p++) {
        for (int32_t l = 0; l < 2; l++) ck_assert_int_eq(cache_store(&f, 0, l, p, 1), TSR_OK);
        if (p == 4 + 16) after_fill = cache_stats(&f).bytes_reserved;
        if (p % 97 == 0 || p >= 1995) {
            cache_check_view(&f, 0, p % 2, seen, 2048, &n);
            /* Between calls: the sinks, the window of older entries, this call's token. */
            int32_t lo = p - 16 > 4 ? p - 16 : 4;
            ck_assert_int_eq(n, (p < 4 ? p + 1 : 4 + (p - lo + 1)));
            for (int32_t q = 0; q <= p; q++)
                ck_assert_msg(seen[q] == (q < 4 || q >= lo), "p %d: position %d", p, q);
        }
    }
    tsr_cache_stats st = cache_stats(&f);
    ck_assert_uint_gt(after_fill, 0);
    ck_assert_uint_eq(st.bytes_reserved, after_fill);
    ck_assert_uint_eq(st.bytes_reserved, 2 * (2 * 2 * (4 + 16 + 1) * 16 * 4));
    ck_assert_uint_eq(st.bytes_peak, after_fill);
    ck_assert_int_eq(st.entries, 2 * 2 * (4 + 16 + 1));
    /* Store t evicts one entry once 4 + 16 + 1 are held: t = 21 .. 1999. */
    ck_assert_int_eq(st.evicted, 2 * 2 * (2000 - 21));

    /* Truncation: fine while nothing at or after the cut was evicted (1982 was the last). */
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 1982), TSR_E_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "evicted"));
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 1995), TSR_OK);
    cache_check_view(&f, 0, 1, seen, 2048, &n);
    ck_assert_int_eq(n, 4 + 12);
    for (int32_t q = 0; q < 2000; q++) ck_assert(seen[q] == (q < 4 || (q >= 1983 && q < 1995)));
    ck_assert_int_eq(cache_store(&f, 0, 1, 1995, 1), TSR_OK);
    vt->seq_end(f.inst->self, 0);
    ck_assert_uint_eq(cache_stats(&f).bytes_reserved, 0);
    fx_close(&f);
}
END_TEST

START_TEST(test_streaming_long_chunk) {
    const char *kv[] = {"sink=4", "window=16", "dtype=f16", NULL};
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, NULL);
    const tsr_cache_vtable *vt = f.vt;
    uint8_t seen[256];
    int64_t n;
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    /* Nothing evicted yet: truncation works. */
    ck_assert_int_eq(cache_store(&f, 0, 0, 0, 10), TSR_OK);
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 6), TSR_OK);
    cache_check_view(&f, 0, 0, seen, 256, &n);
    ck_assert_int_eq(n, 6);
    /* A prefill chunk longer than the window attends to all of itself. */
    ck_assert_int_eq(cache_store(&f, 0, 0, 6, 50), TSR_OK);
    cache_check_view(&f, 0, 0, seen, 256, &n);
    ck_assert_int_eq(n, 56);
    uint64_t big = cache_stats(&f).bytes_reserved;
    ck_assert_uint_eq(big, 2 * 2 * (4 + 16 + 50) * 16 * 2);
    /* The next call evicts down to sinks + window, then appends; the store shrinks back. */
    ck_assert_int_eq(cache_store(&f, 0, 0, 56, 1), TSR_OK);
    cache_check_view(&f, 0, 0, seen, 256, &n);
    ck_assert_int_eq(n, 4 + 16 + 1);
    for (int32_t q = 0; q <= 56; q++) ck_assert(seen[q] == (q < 4 || q >= 40));
    ck_assert_uint_eq(cache_stats(&f).bytes_reserved, 2 * 2 * (4 + 16 + 1) * 16 * 2);
    ck_assert_uint_eq(cache_stats(&f).bytes_peak, big);
    ck_assert_int_eq(cache_stats(&f).evicted, 2 * (56 - 20));
    /* 4..39 were evicted: a cut at 39 cannot be honoured, one at 40 can. */
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 39), TSR_E_UNSUPPORTED);
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 40), TSR_OK);
    cache_check_view(&f, 0, 0, seen, 256, &n);
    ck_assert_int_eq(n, 4);
    vt->seq_end(f.inst->self, 0);
    fx_close(&f);
}
END_TEST

START_TEST(test_streaming_commands) {
    const char *kv[] = {"sink=2", "window=8", NULL};
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, NULL);
    const tsr_cache_vtable *vt = f.vt;
    tsr_error err = {{0}};
    char ret[64];
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    for (int32_t p = 0; p < 30; p++) ck_assert_int_eq(cache_store(&f, 0, 0, p, 1), TSR_OK);

    const tsr_command *dump = tsr_command_find(f.inst->ref->desc, "dump_stats");
    const tsr_command *reset = tsr_command_find(f.inst->ref->desc, "reset_counters");
    ck_assert_ptr_nonnull(dump);
    ck_assert_ptr_nonnull(reset);
    char *dir = tsr_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/stats.txt", dir);
    const char *args[] = {path};
    ck_assert_int_eq(tsr_command_call(dump, f.inst->self, args, 1, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "0");
    size_t size;
    char *text = tsr_test_read_file(path, &size);
    ck_assert_ptr_nonnull(text);
    /* 2 sinks + 8 + the last token, 2 heads; 30 - 11 stores evicted one row per head. */
    ck_assert_str_eq(text, "# streaming: sink 2 window 8\n"
                           "layer 0 entries 22 evicted 38\n"
                           "layer 1 entries 0 evicted 0\n"
                           "entries 22\nevicted 38\nbytes_reserved 2816\nbytes_peak 2816\n");
    free(text);

    ck_assert_int_eq(tsr_command_call(reset, f.inst->self, NULL, 0, ret, sizeof ret, &err),
                     TSR_OK);
    ck_assert_int_eq(cache_stats(&f).evicted, 0);
    ck_assert_int_eq(cache_stats(&f).entries, 22);

    /* An unwritable path: a negative status and the plugin's explanation. */
    snprintf(path, sizeof path, "%s/missing/stats.txt", dir);
    ck_assert_int_eq(tsr_command_call(dump, f.inst->self, args, 1, ret, sizeof ret, &err),
                     TSR_E_IO);
    ck_assert_ptr_nonnull(strstr(fx_error(&f), "missing/stats.txt"));
    free(dir);
    vt->seq_end(f.inst->self, 0);
    fx_close(&f);
}
END_TEST

/* ---- decoders ------------------------------------------------------------------------------ */

#define FAKE_VOCAB 512

/* A stand-in for the host's model: logits are a deterministic function of the last token and
 * its position; it checks what the decoder asks for. */
typedef struct fake_model {
    int32_t n_ctx;
    int32_t next_pos;
    int64_t n_forward, n_emitted, limit;
    int32_t emitted[4096];
    int64_t first_batch;
    int tie_mode; /* logits with a tie at the top */
} fake_model;

static uint32_t fake_hash(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static void fake_logits(const fake_model *m, int32_t token, int32_t pos, float *out) {
    for (int32_t v = 0; v < FAKE_VOCAB; v++)
        out[v] = (float)(fake_hash((uint32_t)(token * 7919 + pos * 104729 + v)) % 1000) / 250.0f;
    if (m->tie_mode) {
        out[300] = 10.0f;
        out[(token * 13) % 200 + 1] = 10.0f; /* a lower id with the same logit */
    }
}

static tsr_status fake_forward(void *ctx, const tsr_batch_entry *e, int64_t n, float *logits) {
    fake_model *m = ctx;
    if (m->n_forward++ == 0) m->first_batch = n;
    int64_t w = 0;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_int_eq(e[i].seq_id, 0);
        ck_assert_int_eq(e[i].pos, m->next_pos);
        ck_assert_int_lt(e[i].pos, m->n_ctx);
        ck_assert(e[i].token >= 0 && e[i].token < FAKE_VOCAB);
        /* Only the last entry of a batch is asked for logits. */
        ck_assert_int_eq(e[i].want_logits, i == n - 1);
        m->next_pos++;
        if (e[i].want_logits) fake_logits(m, e[i].token, e[i].pos, logits + FAKE_VOCAB * w++);
    }
    return TSR_OK;
}

static int32_t fake_emit(void *ctx, const int32_t *tokens, int64_t n) {
    fake_model *m = ctx;
    for (int64_t i = 0; i < n; i++) m->emitted[m->n_emitted++] = tokens[i];
    return m->n_emitted >= m->limit;
}

static int32_t fake_is_eog(void *ctx, int32_t token) { return 0; }

static tsr_decode_api fake_api(fake_model *m) {
    return (tsr_decode_api){TSR_SIZED(tsr_decode_api), .ctx = m, .n_vocab = FAKE_VOCAB,
                            .n_ctx = m->n_ctx, .forward = fake_forward, .emit = fake_emit,
                            .is_eog = fake_is_eog};
}

static tsr_model_shape decoder_shape(int32_t n_ctx) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_vocab = FAKE_VOCAB;
    s.n_ctx = n_ctx;
    return s;
}

/* Runs one request; returns the number of tokens emitted into m->emitted. */
static int64_t decode(fx *f, fake_model *m, int64_t limit) {
    static const int32_t prompt[5] = {1, 17, 42, 99, 3};
    m->limit = limit;
    tsr_decode_api api = fake_api(m);
    tsr_generate_request req = {TSR_SIZED(tsr_generate_request), .prompt = prompt,
                                .n_prompt = 5, .max_new_tokens = -1};
    const tsr_decoder_vtable *vt = f->vt;
    ck_assert_int_eq(vt->generate(f->inst->self, &api, &req), TSR_OK);
    return m->n_emitted;
}

/* The greedy answer, computed here from the fake model's logits. */
static int32_t argmax_lowest(const float *l) {
    int32_t best = 0;
    for (int32_t v = 1; v < FAKE_VOCAB; v++)
        if (l[v] > l[best]) best = v;
    return best;
}

START_TEST(test_greedy) {
    tsr_model_shape s = decoder_shape(256);
    fx f;
    fx_open(&f, 1, TSR_STAGE_DECODER, "decoder-greedy.so", "greedy", NULL, &s);
    for (int tie = 0; tie < 2; tie++) {
        fake_model m = {.n_ctx = 256, .tie_mode = tie};
        ck_assert_int_eq(decode(&f, &m, 20), 20);
        ck_assert_int_eq(m.first_batch, 5);      /* the whole prompt in one forward */
        ck_assert_int_eq(m.n_forward, 1 + 19);   /* then one per token but the last */
        float l[FAKE_VOCAB];
        int32_t prev = 3;
        for (int i = 0; i < 20; i++) {
            fake_logits(&m, prev, 4 + i, l);
            ck_assert_int_eq(m.emitted[i], argmax_lowest(l));
            if (tie) ck_assert_int_lt(m.emitted[i], 300); /* the lower id of the tie */
            prev = m.emitted[i];
        }
    }
    /* No position left: n_ctx 8 with a prompt of 5 forwards 3 tokens and emits a 4th. */
    fake_model m = {.n_ctx = 8};
    ck_assert_int_eq(decode(&f, &m, 100), 4);
    ck_assert_int_eq(m.next_pos, 8);
    fx_close(&f);
}
END_TEST

static void sample_open(fx *f, const char *const *kv) {
    tsr_model_shape s = decoder_shape(512);
    fx_open(f, 1, TSR_STAGE_DECODER, "decoder-sample.so", "sample", kv, &s);
}

static int64_t sample_run(const char *const *kv, int32_t *out, int64_t n) {
    fx f;
    sample_open(&f, kv);
    fake_model m = {.n_ctx = 512};
    int64_t got = decode(&f, &m, n);
    memcpy(out, m.emitted, sizeof(int32_t) * (size_t)got);
    fx_close(&f);
    return got;
}

START_TEST(test_sample_seeds) {
    int32_t a[60], b[60], c[60], g[60];
    const char *s42[] = {"seed=42", "temperature=1.5", "top_k=0", "top_p=1", "min_p=0", NULL};
    const char *s43[] = {"seed=43", "temperature=1.5", "top_k=0", "top_p=1", "min_p=0", NULL};
    ck_assert_int_eq(sample_run(s42, a, 60), 60);
    ck_assert_int_eq(sample_run(s42, b, 60), 60);
    ck_assert_int_eq(sample_run(s43, c, 60), 60);
    ck_assert_mem_eq(a, b, sizeof a);
    ck_assert(memcmp(a, c, sizeof a) != 0);
    /* Two live instances with one seed, picking in turns: neither disturbs the other. */
    fx f1, f2;
    sample_open(&f1, s42);
    sample_open(&f2, s42);
    const tsr_decoder_vtable *vt = f1.vt;
    float l[FAKE_VOCAB];
    fake_model m = {0};
    fake_logits(&m, 3, 4, l);
    for (int i = 0; i < 30; i++) {
        int32_t x = vt->pick(f1.inst->self, l, NULL, 0);
        int32_t y = vt->pick(f2.inst->self, l, NULL, 0);
        ck_assert_int_eq(x, y);
    }
    fx_close(&f1);
    fx_close(&f2);
    /* At this temperature, sampling is not greedy. */
    const char *greedy[] = {"temperature=0", NULL};
    ck_assert_int_eq(sample_run(greedy, g, 60), 60);
    ck_assert(memcmp(a, g, sizeof a) != 0);
}
END_TEST

START_TEST(test_sample_greedy_limits) {
    /* top_k = 1 and temperature = 0 both reduce to greedy, whatever the seed. */
    int32_t want[40], got[40];
    fx f;
    tsr_model_shape s = decoder_shape(512);
    fx_open(&f, 1, TSR_STAGE_DECODER, "decoder-greedy.so", "greedy", NULL, &s);
    fake_model m = {.n_ctx = 512};
    ck_assert_int_eq(decode(&f, &m, 40), 40);
    memcpy(want, m.emitted, sizeof want);
    fx_close(&f);
    const char *k1[] = {"top_k=1", "seed=5", NULL};
    const char *t0[] = {"temperature=0", "seed=6", NULL};
    const char *t0_clock[] = {"temperature=0", NULL};
    ck_assert_int_eq(sample_run(k1, got, 40), 40);
    ck_assert_mem_eq(got, want, sizeof want);
    ck_assert_int_eq(sample_run(t0, got, 40), 40);
    ck_assert_mem_eq(got, want, sizeof want);
    ck_assert_int_eq(sample_run(t0_clock, got, 40), 40);
    ck_assert_mem_eq(got, want, sizeof want);
}
END_TEST

/* A temperature far below any logit gap (1e-320, a subnormal double) is greedy through pick:
 * the best of the whole vocabulary, never the NaN of dividing first (inf - inf). */
START_TEST(test_sample_tiny_temperature_is_greedy) {
    const char *tiny[] = {"temperature=1e-320", "top_k=0", "top_p=1", "min_p=0", "seed=3", NULL};
    fx f;
    sample_open(&f, tiny);
    const tsr_decoder_vtable *vt = f.vt;
    uint64_t state = 0x5eed;
    float l[FAKE_VOCAB];
    for (int trial = 0; trial < 200; trial++) {
        int32_t best = 0;
        for (int32_t i = 0; i < FAKE_VOCAB; i++) {
            l[i] = 20.0f * tsr_test_rng_unit(&state);
            if (l[i] > l[best]) best = i;
        }
        ck_assert_int_eq(vt->pick(f.inst->self, l, NULL, 0), best);
    }
    fx_close(&f);
}
END_TEST

START_TEST(test_sample_penalty) {
    float l[FAKE_VOCAB];
    for (int v = 0; v < FAKE_VOCAB; v++) l[v] = -5.0f;
    const char *pen[] = {"temperature=0", "repeat_penalty=2", "repeat_last_n=3", NULL};
    fx f;
    sample_open(&f, pen);
    const tsr_decoder_vtable *vt = f.vt;
    int32_t hist[4] = {5, 9, 11, 12};
    /* Positive logits are divided: 5 (2.0 -> 1.0) falls behind 6 (1.5). */
    l[5] = 2.0f;
    l[6] = 1.5f;
    ck_assert_int_eq(vt->pick(f.inst->self, l, hist, 1), 6);
    /* ... but only within the last repeat_last_n tokens (5 is 4 back here). */
    ck_assert_int_eq(vt->pick(f.inst->self, l, hist, 4), 5);
    /* Negative logits are multiplied: 5 (-1.0 -> -2.0) falls behind 6 (-1.5). */
    l[5] = -1.0f;
    l[6] = -1.5f;
    ck_assert_int_eq(vt->pick(f.inst->self, l, hist, 1), 6);
    /* A token repeated in the window is penalised once: 2.0 -> 1.0 still beats 0.9. */
    int32_t twice[2] = {5, 5};
    l[5] = 2.0f;
    l[6] = 0.9f;
    ck_assert_int_eq(vt->pick(f.inst->self, l, twice, 2), 5);
    fx_close(&f);
    /* Without the penalty the history changes nothing. */
    sample_open(&f, (const char *const[]){"temperature=0", NULL});
    vt = f.vt;
    l[6] = 1.5f;
    ck_assert_int_eq(vt->pick(f.inst->self, l, hist, 1), 5);
    fx_close(&f);
}
END_TEST

/* Frequencies of pick over `n` draws, after `history`, from logits log(p[i]) for tokens 0..3
 * (probabilities at temperature 1; p[i] = 0: the token is not live) and -1e30 elsewhere. */
static void sample_freq(const char *const *kv, const double p[4], const int32_t *history,
                        int64_t n_history, int n, double freq[4]) {
    float l[FAKE_VOCAB];
    for (int v = 0; v < FAKE_VOCAB; v++) l[v] = v < 4 && p[v] > 0 ? (float)log(p[v]) : -1e30f;
    fx f;
    sample_open(&f, kv);
    const tsr_decoder_vtable *vt = f.vt;
    int count[4] = {0};
    for (int i = 0; i < n; i++) {
        int32_t t = vt->pick(f.inst->self, l, history, n_history);
        ck_assert(t >= 0 && t < 4);
        count[t]++;
    }
    for (int i = 0; i < 4; i++) freq[i] = (double)count[i] / n;
    fx_close(&f);
}

START_TEST(test_sample_distribution) {
    /* Probabilities 0.5, 0.3, 0.2 at temperature 1; token 3 is not live. */
    const double three[4] = {0.5, 0.3, 0.2, 0};
    double fr[4];
    const char *plain[] = {"seed=1", "temperature=1", "top_k=0", "top_p=1", "min_p=0", NULL};
    sample_freq(plain, three, NULL, 0, 20000, fr);
    ck_assert_double_eq_tol(fr[0], 0.5, 0.015);
    ck_assert_double_eq_tol(fr[1], 0.3, 0.015);
    ck_assert_double_eq_tol(fr[2], 0.2, 0.015);
    /* top_p 0.7: tokens 0 and 1 (0.8 >= 0.7), renormalised to 5/8 and 3/8. */
    const char *top_p[] = {"seed=2", "temperature=1", "top_k=0", "top_p=0.7", "min_p=0", NULL};
    sample_freq(top_p, three, NULL, 0, 20000, fr);
    ck_assert_double_eq_tol(fr[0], 0.625, 0.015);
    ck_assert_double_eq(fr[2], 0.0);
    /* min_p 0.5: p >= 0.25 keeps 0 and 1. */
    const char *min_p[] = {"seed=3", "temperature=1", "top_k=0", "top_p=1", "min_p=0.5", NULL};
    sample_freq(min_p, three, NULL, 0, 20000, fr);
    ck_assert_double_eq_tol(fr[0], 0.625, 0.015);
    ck_assert_double_eq(fr[2], 0.0);
    /* top_k 2 does the same; temperature 0.5 after it squares the odds: 25:9. */
    const char *top_k[] = {"seed=4", "temperature=0.5", "top_k=2", "top_p=1", "min_p=0", NULL};
    sample_freq(top_k, three, NULL, 0, 20000, fr);
    ck_assert_double_eq_tol(fr[0], 25.0 / 34.0, 0.015);
    ck_assert_double_eq(fr[2], 0.0);
}
END_TEST

/* The chain's order (docs/plugins/decoder.md: penalty, top-k, top-p, min-p, temperature) at
 * temperatures other than 1. In each case the documented order keeps another token set than
 * the swapped order named, so the frequencies tell the two apart; the kept tokens are drawn in
 * proportion to p^(1/T). Probabilities (at temperature 1) of tokens 0..3 in `p`. */
START_TEST(test_sample_chain_order) {
    const double r5 = sqrt(0.5), r4 = sqrt(0.4), r3 = sqrt(0.3), r2 = sqrt(0.2);
    const int32_t saw_0[1] = {0};
    const struct {
        const char *swapped; /* the order this case rules out */
        const char *kv[8];
        double p[4];
        const int32_t *history;
        double want[4];
    } cases[] = {
        /* top-p on p: 0.5 < 0.6 <= 0.8 keeps {0, 1}. On p^2 (0.66, 0.24, 0.10) it would keep
         * {0}. */
        {"temperature 0.5 before top-p",
         {"temperature=0.5", "top_k=0", "top_p=0.6", "min_p=0"},
         {0.5, 0.3, 0.2, 0}, NULL, {25.0 / 34, 9.0 / 34, 0, 0}},
        /* top-p on p: 0.8 >= 0.75 keeps {0, 1}. On p^(1/2) (0.42, 0.32, 0.26) the first two
         * sum to 0.74 < 0.75: it would keep all three. */
        {"temperature 2 before top-p",
         {"temperature=2", "top_k=0", "top_p=0.75", "min_p=0"},
         {0.5, 0.3, 0.2, 0}, NULL, {r5 / (r5 + r3), r3 / (r5 + r3), 0, 0}},
        /* min-p 0.5 on p: >= 0.25 keeps {0, 1}; on p^2 (>= 0.33) it would keep {0}. */
        {"temperature 0.5 before min-p",
         {"temperature=0.5", "top_k=0", "top_p=1", "min_p=0.5"},
         {0.5, 0.3, 0.2, 0}, NULL, {25.0 / 34, 9.0 / 34, 0, 0}},
        /* ... on p^(1/2) (>= 0.21) it would keep all three. */
        {"temperature 2 before min-p",
         {"temperature=2", "top_k=0", "top_p=1", "min_p=0.5"},
         {0.5, 0.3, 0.2, 0}, NULL, {r5 / (r5 + r3), r3 / (r5 + r3), 0, 0}},
        /* top-k 3 first, then top-p on its renormalised (4/9, 3/9, 2/9): 7/9 >= 0.75 keeps
         * {0, 1}. Top-p first (0.4, 0.7, 0.9) would keep {0, 1, 2}, and top-k 3 all of them. */
        {"top-p before top-k",
         {"temperature=0.5", "top_k=3", "top_p=0.75", "min_p=0"},
         {0.4, 0.3, 0.2, 0.1}, NULL, {16.0 / 25, 9.0 / 25, 0, 0}},
        /* top-p first (0.4, 0.7, 0.9) keeps {0, 1, 2}, min-p 0.3 (>= 0.12) all of those.
         * Min-p first keeps {0, 1, 2} too, but top-p on (4/9, 3/9, 2/9) would keep {0, 1}. */
        {"min-p before top-p",
         {"temperature=2", "top_k=0", "top_p=0.75", "min_p=0.3"},
         {0.4, 0.3, 0.2, 0.1}, NULL, {r4 / (r4 + r3 + r2), r3 / (r4 + r3 + r2),
                                      r2 / (r4 + r3 + r2), 0}},
        /* The penalty 3 multiplies token 0's negative logit: p 0.5 -> 0.125, below 0.3 and
         * 0.2, so top-k 2 keeps {1, 2}. Top-k first would keep {0, 1}. */
        {"top-k before the penalty",
         {"temperature=0.5", "top_k=2", "top_p=1", "min_p=0", "repeat_penalty=3"},
         {0.5, 0.3, 0.2, 0}, saw_0, {0, 9.0 / 13, 4.0 / 13, 0}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *kv[10] = {"seed=9"};
        for (int k = 0; cases[c].kv[k]; k++) kv[k + 1] = cases[c].kv[k];
        double fr[4];
        sample_freq(kv, cases[c].p, cases[c].history, cases[c].history ? 1 : 0, 20000, fr);
        for (int t = 0; t < 4; t++) {
            if (cases[c].want[t] == 0)
                ck_assert_msg(fr[t] == 0, "token %d drawn (%.4f): the chain ran as if %s", t,
                              fr[t], cases[c].swapped);
            else
                ck_assert_msg(fabs(fr[t] - cases[c].want[t]) <= 0.015,
                              "token %d drawn %.4f, want %.4f: the chain ran as if %s", t,
                              fr[t], cases[c].want[t], cases[c].swapped);
        }
    }
}
END_TEST

static Suite *stage_plugins_suite(void) {
    Suite *s = suite_create("stage-plugins");
    TCase *tc = tcase_create("attention");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_half_conversion);
    tcase_add_test(tc, test_reference_by_hand);
    tcase_add_loop_test(tc, test_flash_matches_reference, 0,
                        (int)(sizeof flash_cases / sizeof flash_cases[0]));
    tcase_add_test(tc, test_attention_loaded_views);
    tcase_add_test(tc, test_attention_thread_independent);
    suite_add_tcase(s, tc);
    tc = tcase_create("cache");
    tcase_add_loop_test(tc, test_full_round_trip, 0, 2);
    tcase_add_test(tc, test_full_fork_truncate);
    tcase_add_test(tc, test_full_errors);
    tcase_add_test(tc, test_streaming_constant_memory);
    tcase_add_test(tc, test_streaming_long_chunk);
    tcase_add_test(tc, test_streaming_commands);
    suite_add_tcase(s, tc);
    tc = tcase_create("decoder");
    tcase_add_test(tc, test_greedy);
    tcase_add_test(tc, test_sample_seeds);
    tcase_add_test(tc, test_sample_greedy_limits);
    tcase_add_test(tc, test_sample_tiny_temperature_is_greedy);
    tcase_add_test(tc, test_sample_penalty);
    tcase_add_test(tc, test_sample_distribution);
    tcase_add_test(tc, test_sample_chain_order);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return tsr_test_run_suite(stage_plugins_suite());
}
