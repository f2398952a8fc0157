/*
 * quantizer 'rtn': group-wise round-to-nearest weights of 2..8 bits (FineQuant, Kim et al.
 * 2023, with a fixed group size), an fp16 scale per group and, when asymmetric, an fp16
 * minimum. Row layout (n_g = ceil(n_in / group) groups, the last one may be short):
 *   fp16 scale[n_g] | fp16 min[n_g] (asymmetric only) | codes, `bits` each, n_g * group
 * Symmetric: w = d * (c - qmax), qmax = 2^(bits-1) - 1, d = amax / qmax.
 * Asymmetric: w = m + d * c, m = min, d = (max - min) / (2^bits - 1).
 * act_bits 16 (the default): f32 activations, weight-only quantization as FineQuant's
 * fp16-activation kernels; the product runs on the packed codes (tsr_rq_dot_packed_f32: codes
 * converted to f32 in registers, the scale once per group, the zero point or minimum through
 * the group's activation sum): y = sum_g d_g * sum c * x + b_g * sum x, b_g = -qmax * d_g
 * (symmetric) or m_g (asymmetric). act_bits 8: the activations are quantized to int8 once per
 * product with a scale per weight group (d_a[g] = amax / 127 of the group), the matrix is held
 * interleaved by 16 rows (tsr_rq_uniform, tsr_rq_x16_pack) and each group is an exact integer
 * dot on the packed codes of 16 rows at once:
 *   symmetric:  y = sum_g d_a[g] * d_g * (sum c * a - qmax * sum a)
 *   asymmetric: y = sum_g d_a[g] * (d_g * (sum c * a) + m_g * sum a)
 * That is not the paper's arithmetic (it changes the numerics by the activations' rounding),
 * an option for speed.
 */
#include <stdio.h>

#include <tessera/sdk.h>
#include <tessera/sdk_rq.h>

#define RTN_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 100)
#define RTN_GROUP_MAX 256

typedef struct rtn_cfg {
    int32_t bits, group, symmetric, act8;
} rtn_cfg;

static size_t rtn_stat_bytes(const rtn_cfg *c, int64_t n_in) {
    return (size_t)tsr_rq_groups(n_in, c->group) * (c->symmetric ? 2 : 4);
}

static size_t rtn_row_bytes(const void *cfg, int64_t n_in) {
    const rtn_cfg *c = cfg;
    int64_t n_codes = tsr_rq_groups(n_in, c->group) * c->group;
    return rtn_stat_bytes(c, n_in) + tsr_rq_packed_bytes(n_codes, c->bits);
}

static void rtn_quantize_row(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                             int64_t n_in) {
    (void)tail;
    const rtn_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    uint8_t *mins = row + 2 * n_g, *codes = row + rtn_stat_bytes(c, n_in);
    int32_t qmax = (1 << (c->bits - 1)) - 1, levels = (1 << c->bits) - 1;
    uint8_t q[RTN_GROUP_MAX];
    for (int64_t g = 0; g < n_g; g++) {
        const float *x = w + g * c->group;
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        float lo = x[0], hi = x[0], amax = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
            amax = fmaxf(amax, fabsf(x[i]));
        }
        if (c->symmetric) {
            /* Codes are computed from the stored (rounded) scale, so dequantization is exact
             * to what was chosen here. */
            float d = tsr_rq_store_f16(row + 2 * g, amax / (float)qmax);
            float id = d > 0.0f ? 1.0f / d : 0.0f;
            for (int64_t i = 0; i < c->group; i++)
                q[i] = (uint8_t)(i < len ? tsr_rq_round(x[i] * id, -qmax, qmax) + qmax : qmax);
        } else {
            float d = tsr_rq_store_f16(row + 2 * g, (hi - lo) / (float)levels);
            float m = tsr_rq_store_f16(mins + 2 * g, lo);
            float id = d > 0.0f ? 1.0f / d : 0.0f;
            for (int64_t i = 0; i < c->group; i++)
                q[i] = (uint8_t)(i < len ? tsr_rq_round((x[i] - m) * id, 0, levels) : 0);
        }
        tsr_rq_pack(codes + g * c->group * c->bits / 8, q, c->group, c->bits);
    }
}

TSR_VECTOR_CLONES
static void rtn_dequantize_row(const void *cfg, float *y, const uint8_t *row, const uint8_t *tail,
                               size_t tail_bytes, int64_t n_in) {
    (void)tail;
    (void)tail_bytes;
    const rtn_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    const uint8_t *mins = row + 2 * n_g, *codes = row + rtn_stat_bytes(c, n_in);
    int32_t qmax = (1 << (c->bits - 1)) - 1;
    uint8_t buf[TSR_RQ_CHUNK];
    for (int64_t g = 0; g < n_g; g++) {
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        const uint8_t *q = tsr_rq_group_codes(buf, codes, g, n_g, c->group, c->bits);
        float d = tsr_rq_load_f16(row + 2 * g);
        float *out = y + g * c->group;
        if (c->symmetric) {
            for (int64_t i = 0; i < len; i++) out[i] = d * (float)((int32_t)q[i] - qmax);
        } else {
            float m = tsr_rq_load_f16(mins + 2 * g);
            for (int64_t i = 0; i < len; i++) out[i] = m + d * (float)q[i];
        }
    }
}

static int64_t rtn_act_group(const void *cfg) {
    const rtn_cfg *c = cfg;
    return c->act8 ? c->group : 0;
}

/* The row's group scales: fp16 scales, then the minima of an asymmetric row. */
static tsr_rq_gscales rtn_gscales(const rtn_cfg *c, const uint8_t *row, int64_t n_g) {
    return (tsr_rq_gscales){.d16 = row, .m16 = c->symmetric ? NULL : row + 2 * n_g,
                            .zero = c->symmetric ? (1 << (c->bits - 1)) - 1 : 0};
}

static int64_t rtn_f32_group(const void *cfg) {
    return ((const rtn_cfg *)cfg)->group;
}

static void rtn_dot_f32(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                        const uint8_t *tail, size_t tail_bytes, const tsr_rq_act_f32 *x,
                        int64_t n_tok, int64_t n_in, float *scratch) {
    (void)tail;
    (void)tail_bytes;
    (void)scratch;
    const rtn_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    tsr_rq_gscales s = rtn_gscales(c, row, n_g);
    tsr_rq_dot_packed_f32(y, ldy, row + rtn_stat_bytes(c, n_in), c->bits, &s, x, n_tok, n_g);
}

/* With int8 activations the matrix is held interleaved by 16 rows: a group's scale is then
 * one vector operation for 16 rows, and a unit of codes one vpdpbusd. */
static int rtn_uniform(const void *cfg, int64_t n_in, tsr_rq_uniform *u) {
    const rtn_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    *u = (tsr_rq_uniform){.bits = c->bits, .zero = c->symmetric ? (1 << (c->bits - 1)) - 1 : 0,
                          .has_min = !c->symmetric, .group = c->group, .d_at = 0,
                          .m_at = 2 * (size_t)n_g, .codes_at = rtn_stat_bytes(c, n_in)};
    return c->act8;
}

static void rtn_describe(const void *cfg, char *buf, size_t size) {
    const rtn_cfg *c = cfg;
    snprintf(buf, size, "rtn %d-bit %s group %d, %s activations", (int)c->bits,
             c->symmetric ? "sym" : "asym", (int)c->group, c->act8 ? "int8" : "f32");
}

static const tsr_rq_codec rtn_codec = {
    .dtype = RTN_DTYPE,
    .name = "rtn",
    .row_bytes = rtn_row_bytes,
    .quantize_row = rtn_quantize_row,
    .dequantize_row = rtn_dequantize_row,
    .act_group = rtn_act_group,
    .describe = rtn_describe,
    .act_group_scales = 1,
    .dot_f32 = rtn_dot_f32,
    .f32_group = rtn_f32_group,
    .uniform = rtn_uniform,
};

/* ---- plugin ---------------------------------------------------------------------------- */

static tsr_status rtn_create(const tsr_host *host, const tsr_params *params,
                             const tsr_quantizer_init *init, void **out) {
    /* choices {"8", "16"}: index 0 is 8-bit activations. */
    rtn_cfg cfg = {(int32_t)tsr_param_int(params, "bits"), (int32_t)tsr_param_int(params, "group"),
                   tsr_param_bool(params, "symmetric"), tsr_param_int(params, "act_bits") == 0};
    tsr_status st = tsr_rq_check_group(host, cfg.group, 8);
    return st < 0 ? st
                  : tsr_rq_quantizer_create(host, init, &rtn_codec, &cfg, sizeof cfg, out);
}

static const char *const rtn_act_choices[] = {"8", "16", NULL};

static const tsr_param_def rtn_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "bits", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 2, .max = 8, .unit = "bits", .doc = "bits per weight code"},
    {TSR_SIZED(tsr_param_def), .name = "group", .type = TSR_PARAM_INT, .default_value = "64",
     .min = 32, .max = RTN_GROUP_MAX, .unit = "weights",
     .doc = "weights per scale along a row, a multiple of 8 (a row's last group may be short)"},
    {TSR_SIZED(tsr_param_def), .name = "symmetric", .type = TSR_PARAM_BOOL,
     .default_value = "true",
     .doc = "true: scale only, codes around zero; false: scale and minimum per group"},
    {TSR_SIZED(tsr_param_def), .name = "act_bits", .type = TSR_PARAM_ENUM,
     .default_value = "16", .choices = rtn_act_choices, .unit = "bits",
     .doc = "16: f32 activations (the method's); 8: int8 activations with a scale per group "
            "and integer dot products on the packed codes (faster, other numerics)"},
};

static const tsr_quantizer_vtable rtn_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = rtn_create,
    .prepare = tsr_rq_quantizer_prepare,
    TSR_RQ_QUANTIZER_CALLBACKS,
};

static const tsr_plugin_desc rtn_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "rtn",
    .version = "1.0",
    .description = "group-wise round-to-nearest weights (2..8 bits, fp16 scales) converted from "
                   "F32/F16/BF16 at load; f32 activations, or int8 ones per group",
    TSR_PARAMS(rtn_params),
    .vtable = &rtn_vtable,
};

TSR_PLUGIN_EXPORT(&rtn_desc)
