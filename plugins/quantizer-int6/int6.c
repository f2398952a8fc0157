/*
 * quantizer 'int6': 6-bit weights with an fp16 scale per group, after FlexQ (Zhang et al.
 * 2025), which keeps every layer's weights in INT6 and its activations in 6 or 8 bits.
 * Row layout (n_g = ceil(n_in / group), the last group may be short):
 *   fp16 scale[n_g] | codes, 6 bits each, n_g * group
 * w = d * (c - 32), c in [1, 63], d = amax / 31 (symmetric).
 * act_bits 16: f32 activations, the product on the packed codes (tsr_rq_dot_packed_f32):
 * y = sum_g d_g * (sum c * x - 32 * sum x), the scale once per group.
 * act_bits 8: activations are quantized per token to int8 (d_a = amax / 127), the matrix is
 * held interleaved by 16 rows (tsr_rq_x16_pack) and each group is an exact integer dot on the
 * packed codes of 16 rows at once:
 * y = sum_g d_a * d_g * (sum c * a - 32 * sum a).
 */
#include <stdio.h>

#include <tessera/sdk.h>
#include <tessera/sdk_rq.h>

#define INT6_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 110)
#define INT6_GROUP_MAX 256

typedef struct int6_cfg {
    int32_t group, act8;
} int6_cfg;

static size_t int6_row_bytes(const void *cfg, int64_t n_in) {
    const int6_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    return 2 * (size_t)n_g + tsr_rq_packed_bytes(n_g * c->group, 6);
}

static void int6_quantize_row(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                              int64_t n_in) {
    (void)tail;
    const int6_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    uint8_t *codes = row + 2 * n_g, q[INT6_GROUP_MAX];
    for (int64_t g = 0; g < n_g; g++) {
        const float *x = w + g * c->group;
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        float amax = 0.0f;
        for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = tsr_rq_store_f16(row + 2 * g, amax / 31.0f);
        float id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int64_t i = 0; i < c->group; i++)
            q[i] = (uint8_t)(i < len ? tsr_rq_round(x[i] * id, -31, 31) + 32 : 32);
        tsr_rq_pack(codes + g * c->group * 6 / 8, q, c->group, 6);
    }
}

TSR_VECTOR_CLONES
static void int6_dequantize_row(const void *cfg, float *y, const uint8_t *row,
                                const uint8_t *tail, size_t tail_bytes, int64_t n_in) {
    (void)tail;
    (void)tail_bytes;
    const int6_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    const uint8_t *codes = row + 2 * n_g;
    uint8_t buf[TSR_RQ_CHUNK];
    for (int64_t g = 0; g < n_g; g++) {
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        const uint8_t *q = tsr_rq_group_codes(buf, codes, g, n_g, c->group, 6);
        float d = tsr_rq_load_f16(row + 2 * g);
        for (int64_t i = 0; i < len; i++) y[g * c->group + i] = d * (float)((int32_t)q[i] - 32);
    }
}

static int64_t int6_act_group(const void *cfg) {
    const int6_cfg *c = cfg;
    return c->act8 ? c->group : 0;
}

static int64_t int6_f32_group(const void *cfg) {
    return ((const int6_cfg *)cfg)->group;
}

static void int6_dot_f32(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                         const uint8_t *tail, size_t tail_bytes, const tsr_rq_act_f32 *x,
                         int64_t n_tok, int64_t n_in, float *scratch) {
    (void)tail;
    (void)tail_bytes;
    (void)scratch;
    const int6_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    tsr_rq_gscales s = {.d16 = row, .zero = 32};
    tsr_rq_dot_packed_f32(y, ldy, row + 2 * n_g, 6, &s, x, n_tok, n_g);
}

/* With int8 activations the matrix is held interleaved by 16 rows (tsr_rq_x16_pack). */
static int int6_uniform(const void *cfg, int64_t n_in, tsr_rq_uniform *u) {
    const int6_cfg *c = cfg;
    *u = (tsr_rq_uniform){.bits = 6, .zero = 32, .group = c->group,
                          .codes_at = 2 * (size_t)tsr_rq_groups(n_in, c->group)};
    return c->act8;
}

static void int6_describe(const void *cfg, char *buf, size_t size) {
    const int6_cfg *c = cfg;
    snprintf(buf, size, "int6 group %d, %s activations", (int)c->group,
             c->act8 ? "int8" : "f32");
}

static const tsr_rq_codec int6_codec = {
    .dtype = INT6_DTYPE,
    .name = "int6",
    .row_bytes = int6_row_bytes,
    .quantize_row = int6_quantize_row,
    .dequantize_row = int6_dequantize_row,
    .act_group = int6_act_group,
    .describe = int6_describe,
    .dot_f32 = int6_dot_f32,
    .f32_group = int6_f32_group,
    .uniform = int6_uniform,
};

/* ---- plugin ---------------------------------------------------------------------------- */

static tsr_status int6_create(const tsr_host *host, const tsr_params *params,
                              const tsr_quantizer_init *init, void **out) {
    /* choices {"8", "16"}: index 0 is 8-bit activations. */
    int6_cfg cfg = {(int32_t)tsr_param_int(params, "group"),
                    tsr_param_int(params, "act_bits") == 0};
    tsr_status st = tsr_rq_check_group(host, cfg.group, 32);
    return st < 0 ? st
                  : tsr_rq_quantizer_create(host, init, &int6_codec, &cfg, sizeof cfg, out);
}

static const char *const int6_act_choices[] = {"8", "16", NULL};

static const tsr_param_def int6_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "act_bits", .type = TSR_PARAM_ENUM,
     .default_value = "16", .choices = int6_act_choices, .unit = "bits",
     .doc = "16: f32 activations; 8: per-token int8 activations and integer dot products"},
    {TSR_SIZED(tsr_param_def), .name = "group", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 32, .max = INT6_GROUP_MAX, .unit = "weights",
     .doc = "weights per scale along a row, a multiple of 32 (a row's last group may be short)"},
};

static const tsr_quantizer_vtable int6_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = int6_create,
    .prepare = tsr_rq_quantizer_prepare,
    TSR_RQ_QUANTIZER_CALLBACKS,
};

static const tsr_plugin_desc int6_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "int6",
    .version = "1.0",
    .description = "FlexQ-style 6-bit group-wise weights from F32/F16/BF16, with f32 or "
                   "per-token int8 activations",
    TSR_PARAMS(int6_params),
    .vtable = &int6_vtable,
};

TSR_PLUGIN_EXPORT(&int6_desc)
