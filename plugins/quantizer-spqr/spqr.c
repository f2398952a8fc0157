/*
 * quantizer 'spqr': the representation of SpQR (Dettmers et al. 2023). Weights are quantized
 * in small groups of `group` (beta1) along a row, asymmetric min-max with `bits` codes; each
 * group's scale and zero are themselves quantized to `stats_bits` in second-level groups of
 * `stats_group` (beta2) consecutive groups, with fp16 minimum and step per second-level group;
 * weights far from their group are kept apart as fp16 outliers with a 16-bit column index, in
 * CSR (a uint32 offset per row).
 *
 * Outlier rule (a simplification, no calibration data): w is an outlier when
 * |w - mean| > outlier_threshold * std of its group (population std, over the whole group).
 * The paper ranks weights by their GPTQ sensitivity, which needs the inputs' Hessian. Note a
 * group of n values has no value beyond sqrt(n - 1) std, so the threshold must stay below it.
 *
 * Row layout (n_g = ceil(n_in / group), n_s = ceil(n_g / stats_group)):
 *   fp16 (scale min, scale step, zero min, zero step)[n_s] | scale codes[n_g] | zero codes[n_g]
 *   | weight codes[n_g * group]; codes packed, each stream starting on a byte.
 * Tail of a row: (uint16 column, fp16 value)[outliers of the row].
 * w = s * (c - z), s and z decoded from their codes: s = s_min + s_step * code.
 * Product (act_bits 16, f32 activations, the default): the dense codes of every weight
 * through tsr_rq_dot_packed_f32 with w = s c - s z per group (the scale once per group, the
 * offset through the group's activation sum), then the outliers as a separate pass over the
 * row's tail: each adds (value - its dense code's s c - s z) times its activation.
 * act_bits 8: the activations are quantized to int8 once per product with a scale per weight
 * group (d_a[g] = amax / 127 of the group); the matrix is held interleaved by 16 rows
 * (tsr_rq_x16_pack), the dense codes an exact integer dot per group of 16 rows
 * (y = sum_g d_a[g] * (s_g * sum c * a - s_g z_g * sum a), the statistics decoded 16 rows at
 * a time), and the outliers are kept beside it as (column, value - dense value) pairs
 * (tsr_rq_x16_deltas), a pass that takes the same int8 activations (d_a a). Not the paper's
 * arithmetic (it changes the numerics by the activations' rounding), an option for speed.
 */
#include <stdio.h>

#include <tessera/sdk.h>
#include <tessera/sdk_rq.h>

#define SPQR_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 120)
#define SPQR_GROUP_MAX 128
#define SPQR_SGROUP_MAX 64
#define SPQR_OUTLIER_BYTES 4 /* a tail entry: uint16 column, fp16 value */

typedef struct spqr_cfg {
    int32_t bits, group, stats_bits, stats_group;
    float threshold;
    int32_t act8;
} spqr_cfg;

typedef struct spqr_layout {
    int64_t n_g, n_s;
    size_t stats, scodes, zcodes, wcodes; /* byte offsets in the row */
    size_t bytes;
} spqr_layout;

static spqr_layout spqr_layout_of(const spqr_cfg *c, int64_t n_in) {
    spqr_layout l;
    l.n_g = tsr_rq_groups(n_in, c->group);
    l.n_s = tsr_rq_groups(l.n_g, c->stats_group);
    l.stats = 0;
    l.scodes = 8 * (size_t)l.n_s;
    l.zcodes = l.scodes + tsr_rq_packed_bytes(l.n_g, c->stats_bits);
    l.wcodes = l.zcodes + tsr_rq_packed_bytes(l.n_g, c->stats_bits);
    l.bytes = l.wcodes + tsr_rq_packed_bytes(l.n_g * c->group, c->bits);
    return l;
}

static size_t spqr_row_bytes(const void *cfg, int64_t n_in) {
    return spqr_layout_of(cfg, n_in).bytes;
}

/* Marks the outliers of group x (len) in out[] and returns their count. */
static int64_t spqr_outliers(const spqr_cfg *c, const float *x, int64_t len, uint8_t *out) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < len; i++) mean += x[i];
    mean /= (double)len;
    for (int64_t i = 0; i < len; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
    double lim = (double)c->threshold * sqrt(var / (double)len);
    int64_t n = 0;
    for (int64_t i = 0; i < len; i++) {
        out[i] = lim > 0 && fabs((double)x[i] - mean) > lim;
        n += out[i];
    }
    return n;
}

static size_t spqr_tail_bytes(const void *cfg, const float *w, int64_t n_in) {
    const spqr_cfg *c = cfg;
    int64_t n_g = spqr_layout_of(c, n_in).n_g, n = 0;
    uint8_t mask[SPQR_GROUP_MAX];
    for (int64_t g = 0; g < n_g; g++)
        n += spqr_outliers(c, w + g * c->group, tsr_rq_group_len(g, c->group, n_in), mask);
    return SPQR_OUTLIER_BYTES * (size_t)n;
}

/* Quantizes v[0..n) to `bits` over their own range: stores fp16 min and step at st, codes in
 * code[], and returns the decoded values in v. */
static void spqr_stats_quantize(float *v, uint8_t *code, int64_t n, int bits, uint8_t *st) {
    float lo = v[0], hi = v[0];
    for (int64_t i = 1; i < n; i++) {
        lo = fminf(lo, v[i]);
        hi = fmaxf(hi, v[i]);
    }
    int32_t levels = (1 << bits) - 1;
    float m = tsr_rq_store_f16(st, lo), step = tsr_rq_store_f16(st + 2, (hi - lo) / levels);
    for (int64_t i = 0; i < n; i++) {
        code[i] = (uint8_t)(step > 0.0f ? tsr_rq_round((v[i] - m) / step, 0, levels) : 0);
        v[i] = m + step * (float)code[i];
    }
}

static void spqr_quantize_row(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                              int64_t n_in) {
    const spqr_cfg *c = cfg;
    spqr_layout l = spqr_layout_of(c, n_in);
    int32_t levels = (1 << c->bits) - 1;
    uint8_t mask[SPQR_GROUP_MAX], q[SPQR_GROUP_MAX], sc[SPQR_SGROUP_MAX], zc[SPQR_SGROUP_MAX];
    float s[SPQR_SGROUP_MAX], z[SPQR_SGROUP_MAX];
    size_t n_out = 0;
    for (int64_t sg = 0; sg < l.n_s; sg++) {
        int64_t g0 = sg * c->stats_group;
        int64_t n = l.n_g - g0 < c->stats_group ? l.n_g - g0 : c->stats_group;
        /* First level: min-max of the inliers of each group. */
        for (int64_t k = 0; k < n; k++) {
            int64_t g = g0 + k, len = tsr_rq_group_len(g, c->group, n_in);
            const float *x = w + g * c->group;
            spqr_outliers(c, x, len, mask);
            float lo = 0.0f, hi = 0.0f;
            int any = 0;
            for (int64_t i = 0; i < len; i++) {
                if (mask[i]) continue;
                lo = any ? fminf(lo, x[i]) : x[i];
                hi = any ? fmaxf(hi, x[i]) : x[i];
                any = 1;
            }
            s[k] = (hi - lo) / (float)levels;
            /* A constant group keeps its value: code 0 at zero -levels or +levels. */
            if (s[k] == 0.0f) s[k] = fabsf(lo) / (float)levels;
            z[k] = s[k] > 0.0f ? -lo / s[k] : 0.0f;
        }
        /* Second level: the statistics themselves, to stats_bits. */
        uint8_t *st = row + l.stats + 8 * (size_t)sg;
        spqr_stats_quantize(s, sc, n, c->stats_bits, st);
        spqr_stats_quantize(z, zc, n, c->stats_bits, st + 4);
        for (int64_t k = 0; k < n; k++) {
            int64_t g = g0 + k, len = tsr_rq_group_len(g, c->group, n_in);
            const float *x = w + g * c->group;
            spqr_outliers(c, x, len, mask);
            float is = s[k] > 0.0f ? 1.0f / s[k] : 0.0f;
            for (int64_t i = 0; i < c->group; i++) {
                q[i] = (uint8_t)(i < len && s[k] > 0.0f
                                     ? tsr_rq_round(x[i] * is + z[k], 0, levels)
                                     : 0);
                if (i < len && mask[i]) {
                    uint16_t col = (uint16_t)(g * c->group + i);
                    memcpy(tail + SPQR_OUTLIER_BYTES * n_out, &col, 2);
                    tsr_rq_store_f16(tail + SPQR_OUTLIER_BYTES * n_out + 2, x[i]);
                    n_out++;
                }
            }
            tsr_rq_pack(row + l.wcodes + (size_t)(g * c->group * c->bits / 8), q, c->group,
                        c->bits);
        }
        /* Stats codes are bit-packed across second-level groups (the row starts zeroed). */
        for (int64_t k = 0; k < n; k++) {
            int64_t bit = (g0 + k) * c->stats_bits;
            for (int b = 0; b < c->stats_bits; b++, bit++) {
                row[l.scodes + (size_t)(bit >> 3)] |= (uint8_t)(((sc[k] >> b) & 1) << (bit & 7));
                row[l.zcodes + (size_t)(bit >> 3)] |= (uint8_t)(((zc[k] >> b) & 1) << (bit & 7));
            }
        }
    }
}

TSR_VECTOR_CLONES
static void spqr_dequantize_row(const void *cfg, float *y, const uint8_t *row,
                                const uint8_t *tail, size_t tail_bytes, int64_t n_in) {
    const spqr_cfg *c = cfg;
    spqr_layout l = spqr_layout_of(c, n_in);
    uint8_t buf[TSR_RQ_CHUNK], sbuf[TSR_RQ_CHUNK], zbuf[TSR_RQ_CHUNK];
    float s0 = 0, s1 = 0, z0 = 0, z1 = 0;
    for (int64_t g = 0; g < l.n_g; g++) {
        if (g % c->stats_group == 0) { /* the second-level (fp16) min and step of s and z */
            const uint8_t *st = row + l.stats + 8 * (size_t)(g / c->stats_group);
            s0 = tsr_rq_load_f16(st), s1 = tsr_rq_load_f16(st + 2);
            z0 = tsr_rq_load_f16(st + 4), z1 = tsr_rq_load_f16(st + 6);
        }
        uint8_t sc = *tsr_rq_group_codes(sbuf, row + l.scodes, g, l.n_g, 1, c->stats_bits);
        uint8_t zc = *tsr_rq_group_codes(zbuf, row + l.zcodes, g, l.n_g, 1, c->stats_bits);
        float s = s0 + s1 * (float)sc, z = z0 + z1 * (float)zc;
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        const uint8_t *q = tsr_rq_group_codes(buf, row + l.wcodes, g, l.n_g, c->group, c->bits);
        for (int64_t i = 0; i < len; i++) y[g * c->group + i] = s * ((float)q[i] - z);
    }
    for (size_t k = 0; k + SPQR_OUTLIER_BYTES <= tail_bytes; k += SPQR_OUTLIER_BYTES) {
        uint16_t col;
        memcpy(&col, tail + k, 2);
        y[col] = tsr_rq_load_f16(tail + k + 2);
    }
}

/* The scale s_g and offset -s_g z_g of every group of a row (w = s_g c - s_g z_g), the
 * first-level codes decoded with their second-level fp16 minimum and step as
 * spqr_dequantize_row does. */
static void spqr_group_affine(const spqr_cfg *c, const spqr_layout *l, const uint8_t *row,
                              float *d, float *b) {
    tsr_rq_stats_affine(d, b, row + l->scodes, row + l->zcodes, c->stats_bits, row + l->stats,
                        l->n_g, c->stats_group);
}

static int64_t spqr_f32_group(const void *cfg) {
    return ((const spqr_cfg *)cfg)->group;
}

static int64_t spqr_act_group(const void *cfg) {
    const spqr_cfg *c = cfg;
    return c->act8 ? c->group : 0;
}

/* The outliers' pass over a row's tail: each adds (value - what the dense product counted for
 * its column, d_g c + b_g) times its activation, for each of n_tok tokens. */
static void spqr_add_outliers(const spqr_cfg *c, const spqr_layout *l, float *y, int64_t ldy,
                              const uint8_t *row, const uint8_t *tail, size_t tail_bytes,
                              const float *d, const float *b, const tsr_rq_act_f32 *x,
                              int64_t n_tok) {
    for (size_t k = 0; k + SPQR_OUTLIER_BYTES <= tail_bytes; k += SPQR_OUTLIER_BYTES) {
        uint16_t col;
        memcpy(&col, tail + k, 2);
        int64_t g = col / c->group;
        float dense = fmaf(d[g], (float)tsr_rq_code_at(row + l->wcodes, col, c->bits), b[g]);
        float delta = tsr_rq_load_f16(tail + k + 2) - dense;
        for (int64_t t = 0; t < n_tok; t++)
            y[t * ldy] = fmaf(delta, x->x[t * x->n + col], y[t * ldy]);
    }
}

/* scratch: n_in floats, 16 at least, hold the 2 n_g of d and b (group >= 8). */
static void spqr_dot_f32(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                         const uint8_t *tail, size_t tail_bytes, const tsr_rq_act_f32 *x,
                         int64_t n_tok, int64_t n_in, float *scratch) {
    const spqr_cfg *c = cfg;
    spqr_layout l = spqr_layout_of(c, n_in);
    float *d = scratch, *b = scratch + l.n_g;
    spqr_group_affine(c, &l, row, d, b);
    tsr_rq_gscales s = {.d = d, .b = b};
    tsr_rq_dot_packed_f32(y, ldy, row + l.wcodes, c->bits, &s, x, n_tok, l.n_g);
    spqr_add_outliers(c, &l, y, ldy, row, tail, tail_bytes, d, b, x, n_tok);
}

/* With int8 activations the matrix is held interleaved by 16 rows (tsr_rq_x16_pack), the
 * statistics decoded for 16 rows at a time, the outliers kept beside it as deltas. */
static int spqr_uniform(const void *cfg, int64_t n_in, tsr_rq_uniform *u) {
    const spqr_cfg *c = cfg;
    spqr_layout l = spqr_layout_of(c, n_in);
    *u = (tsr_rq_uniform){.bits = c->bits, .group = c->group, .d_at = l.stats,
                          .codes_at = l.wcodes, .stats_bits = c->stats_bits,
                          .stats_run = c->stats_group, .sc_at = l.scodes, .zc_at = l.zcodes};
    return c->act8;
}

static void spqr_describe(const void *cfg, char *buf, size_t size) {
    const spqr_cfg *c = cfg;
    snprintf(buf, size, "spqr %d-bit group %d, stats %d-bit x %d, %s activations", (int)c->bits,
             (int)c->group, (int)c->stats_bits, (int)c->stats_group, c->act8 ? "int8" : "f32");
}

static const tsr_rq_codec spqr_codec = {
    .dtype = SPQR_DTYPE,
    .name = "spqr",
    .row_bytes = spqr_row_bytes,
    .tail_bytes = spqr_tail_bytes,
    .quantize_row = spqr_quantize_row,
    .dequantize_row = spqr_dequantize_row,
    .describe = spqr_describe,
    .act_group = spqr_act_group,
    .act_group_scales = 1,
    .dot_f32 = spqr_dot_f32,
    .f32_group = spqr_f32_group,
    .uniform = spqr_uniform,
};

/* ---- plugin ---------------------------------------------------------------------------- */

static tsr_status spqr_create(const tsr_host *host, const tsr_params *params,
                              const tsr_quantizer_init *init, void **out) {
    /* act_bits choices {"8", "16"}: index 0 is 8-bit activations. */
    spqr_cfg cfg = {(int32_t)tsr_param_int(params, "bits"), (int32_t)tsr_param_int(params, "group"),
                    (int32_t)tsr_param_int(params, "stats_bits"),
                    (int32_t)tsr_param_int(params, "stats_group"),
                    (float)tsr_param_float(params, "outlier_threshold"),
                    tsr_param_int(params, "act_bits") == 0};
    tsr_status st = tsr_rq_check_group(host, cfg.group, 8);
    return st < 0 ? st
                  : tsr_rq_quantizer_create(host, init, &spqr_codec, &cfg, sizeof cfg, out);
}

/* tsr_rq_quantizer_prepare plus SpQR's limits: rows whose outlier columns fit 16 bits, and
 * the outlier count in the log line. */
static tsr_status spqr_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    tsr_rq_quantizer *q = self;
    const char *name = in->src.name ? in->src.name : "?";
    if (in->src.ne[0] > 65536) {
        q->host->set_error(q->host->ctx, "%s: rows of %lld weights: spqr's 16-bit outlier "
                           "columns reach 65536", name, (long long)in->src.ne[0]);
        return TSR_E_UNSUPPORTED;
    }
    tsr_rq_report rep;
    tsr_status st = tsr_rq_quantizer_quantize(q, in, out, &rep);
    if (st < 0) return st;
    uint64_t n = (uint64_t)in->src.ne[0] * (uint64_t)in->src.ne[1];
    uint64_t n_out = rep.tail_bytes / SPQR_OUTLIER_BYTES;
    char what[128];
    spqr_describe(q->cfg, what, sizeof what);
    q->host->log(q->host->ctx, TSR_LOG_INFO,
                 "%s (layer %d, %s): %s: %.3f bits/weight, rel_rmse %.5f, outliers %llu (%.4f%%)",
                 name, (int)in->layer, in->role ? in->role : "?", what, rep.bits_per_weight,
                 rep.rel_rmse, (unsigned long long)n_out, 100.0 * (double)n_out / (double)n);
    return TSR_OK;
}

/* Command `stats`: the totals of every tensor this instance prepared. */
static void spqr_stats(void *self) {
    tsr_rq_quantizer *q = self;
    uint64_t outliers = q->tail_bytes / SPQR_OUTLIER_BYTES;
    q->host->log(q->host->ctx, TSR_LOG_INFO,
                 "spqr: %llu tensors, %llu weights, %llu outliers (%.4f%%)",
                 (unsigned long long)q->tensors, (unsigned long long)q->weights,
                 (unsigned long long)outliers,
                 q->weights ? 100.0 * (double)outliers / (double)q->weights : 0.0);
}

static const tsr_command spqr_commands[] = {
    {TSR_SIZED(tsr_command), .name = "stats", .signature = "v(I)",
     .fn = (void (*)(void))spqr_stats,
     .doc = "logs the tensors, weights and outliers (count and fraction) prepared so far"},
};

static const char *const spqr_act_choices[] = {"8", "16", NULL};
static const tsr_param_def spqr_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "bits", .type = TSR_PARAM_INT, .default_value = "3",
     .min = 2, .max = 8, .unit = "bits", .doc = "bits per weight code"},
    {TSR_SIZED(tsr_param_def), .name = "group", .type = TSR_PARAM_INT, .default_value = "16",
     .min = 8, .max = SPQR_GROUP_MAX, .unit = "weights",
     .doc = "beta1: weights per first-level scale and zero, a multiple of 8"},
    {TSR_SIZED(tsr_param_def), .name = "outlier_threshold", .type = TSR_PARAM_FLOAT,
     .default_value = "3.5", .min = 0.5, .max = 100, .unit = "std",
     .doc = "outlier when |w - group mean| exceeds this many group standard deviations"},
    {TSR_SIZED(tsr_param_def), .name = "stats_bits", .type = TSR_PARAM_INT,
     .default_value = "3", .min = 2, .max = 8, .unit = "bits",
     .doc = "bits of each quantized first-level scale and zero"},
    {TSR_SIZED(tsr_param_def), .name = "stats_group", .type = TSR_PARAM_INT,
     .default_value = "16", .min = 1, .max = SPQR_SGROUP_MAX, .unit = "groups",
     .doc = "beta2: first-level groups per second-level (fp16) min and step"},
    {TSR_SIZED(tsr_param_def), .name = "act_bits", .type = TSR_PARAM_ENUM,
     .default_value = "16", .choices = spqr_act_choices, .unit = "bits",
     .doc = "16: f32 activations (the method's); 8: int8 activations with a scale per group "
            "and integer dot products on the packed codes (faster, other numerics)"},
};

static const tsr_quantizer_vtable spqr_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = spqr_create,
    .prepare = spqr_prepare,
    TSR_RQ_QUANTIZER_CALLBACKS,
};

static const tsr_plugin_desc spqr_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "spqr",
    .version = "1.0",
    .description = "SpQR: small groups with quantized statistics plus fp16 outliers (CSR), "
                   "from F32/F16/BF16; f32 activations, or int8 ones per group (command stats)",
    TSR_PARAMS(spqr_params),
    TSR_COMMANDS(spqr_commands),
    .vtable = &spqr_vtable,
};

TSR_PLUGIN_EXPORT(&spqr_desc)
