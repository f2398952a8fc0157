/*
 * quantizer 'w4a8': the weights of QServe's QoQ (Lin et al. 2024, W4A8KV4), progressive group
 * quantization. Level 1: per output channel, symmetric int8 with an fp16 scale s1 and the
 * protective range [-119, 119]. Level 2: per group of the int8 values, unsigned 4-bit codes
 * with an integer (uint8) scale s2 and a 4-bit zero z, so that w = s1 * s2 * (c - z).
 * Row layout (n_g = ceil(n_in / group), the last group may be short):
 *   fp16 s1 | (uint8 s2, uint8 z)[n_g] | codes, 4 bits each, n_g * group
 * Activations are quantized per token to int8 (d_a = amax / 127); the product is one exact
 * integer sum per row, scales applied after the multiplication as QServe does:
 *   y = s1 * d_a * sum_g s2_g * (sum_i c_i * a_i - z_g * sum_i a_i).
 */
#include <stdio.h>

#include <tessera/sdk.h>
#include <tessera/sdk_rq.h>

#define W4A8_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 130)
#define W4A8_PROTECT 119

typedef struct w4a8_cfg {
    int32_t group;
} w4a8_cfg;

static size_t w4a8_row_bytes(const void *cfg, int64_t n_in) {
    const w4a8_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    return 2 + 2 * (size_t)n_g + tsr_rq_packed_bytes(n_g * c->group, 4);
}

static void w4a8_quantize_row(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                              int64_t n_in) {
    (void)tail;
    const w4a8_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    uint8_t *gs = row + 2, *codes = row + 2 + 2 * n_g, q[256];
    float amax = 0.0f;
    for (int64_t i = 0; i < n_in; i++) amax = fmaxf(amax, fabsf(w[i]));
    float s1 = tsr_rq_store_f16(row, amax / (float)W4A8_PROTECT);
    float is1 = s1 > 0.0f ? 1.0f / s1 : 0.0f;
    for (int64_t g = 0; g < n_g; g++) {
        const float *x = w + g * c->group;
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        int32_t q8[256], lo = 0, hi = 0;
        for (int64_t i = 0; i < len; i++) {
            q8[i] = tsr_rq_round(x[i] * is1, -W4A8_PROTECT, W4A8_PROTECT);
            lo = i ? (q8[i] < lo ? q8[i] : lo) : q8[i];
            hi = i ? (q8[i] > hi ? q8[i] : hi) : q8[i];
        }
        int32_t s2 = tsr_rq_round((float)(hi - lo) / 15.0f, 1, 255);
        int32_t z = tsr_rq_round((float)-lo / (float)s2, 0, 15);
        gs[2 * g] = (uint8_t)s2;
        gs[2 * g + 1] = (uint8_t)z;
        for (int64_t i = 0; i < c->group; i++)
            q[i] = (uint8_t)(i < len ? tsr_rq_round((float)q8[i] / (float)s2 + (float)z, 0, 15)
                                     : z);
        tsr_rq_pack(codes + g * c->group / 2, q, c->group, 4);
    }
}

TSR_VECTOR_CLONES
static void w4a8_dequantize_row(const void *cfg, float *y, const uint8_t *row,
                                const uint8_t *tail, size_t tail_bytes, int64_t n_in) {
    (void)tail;
    (void)tail_bytes;
    const w4a8_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    const uint8_t *gs = row + 2, *codes = row + 2 + 2 * n_g;
    float s1 = tsr_rq_load_f16(row);
    uint8_t buf[TSR_RQ_CHUNK];
    for (int64_t g = 0; g < n_g; g++) {
        int64_t len = tsr_rq_group_len(g, c->group, n_in);
        int32_t s2 = gs[2 * g], z = gs[2 * g + 1];
        const uint8_t *q = tsr_rq_group_codes(buf, codes, g, n_g, c->group, 4);
        for (int64_t i = 0; i < len; i++)
            y[g * c->group + i] = s1 * (float)(s2 * ((int32_t)q[i] - z));
    }
}

static int64_t w4a8_act_group(const void *cfg) {
    return ((const w4a8_cfg *)cfg)->group;
}

static int32_t w4a8_act_order(const void *cfg) {
    (void)cfg;
    return TSR_RQ_ORDER_NIBBLES;
}

static void w4a8_dot_q8(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                        const uint8_t *tail, size_t tail_bytes, const tsr_rq_act *act,
                        int64_t n_tok, int64_t n_in, uint8_t *scratch) {
    (void)tail;
    (void)tail_bytes;
    const w4a8_cfg *c = cfg;
    int64_t n_g = tsr_rq_groups(n_in, c->group);
    float s1 = tsr_rq_load_f16(row);
    int64_t acc[64]; /* exact: neither the order of the groups nor the level can change it */
    for (int64_t t0 = 0; t0 < n_tok; t0 += 64) {
        int64_t nt = n_tok - t0 < 64 ? n_tok - t0 : 64;
        tsr_rq_act part = *act;
        part.q += t0 * act->n_pad;
        part.q_ord = act->q_ord ? act->q_ord + t0 * act->n_pad : NULL;
        part.gsum += t0 * (act->n_pad / act->group);
        part.d += t0;
        tsr_rq_dot_packed_int_scaled(acc, row + 2 + 2 * n_g, 4, row + 2, &part, nt, n_g,
                                     (int32_t *)scratch);
        for (int64_t t = 0; t < nt; t++) y[(t0 + t) * ldy] = (float)acc[t] * (s1 * part.d[t]);
    }
}

static void w4a8_describe(const void *cfg, char *buf, size_t size) {
    snprintf(buf, size, "w4a8 group %d", (int)((const w4a8_cfg *)cfg)->group);
}

static const tsr_rq_codec w4a8_codec = {
    .dtype = W4A8_DTYPE,
    .name = "w4a8",
    .row_bytes = w4a8_row_bytes,
    .quantize_row = w4a8_quantize_row,
    .dequantize_row = w4a8_dequantize_row,
    .act_group = w4a8_act_group,
    .dot_q8 = w4a8_dot_q8,
    .act_order = w4a8_act_order,
    .describe = w4a8_describe,
};

/* ---- plugin ---------------------------------------------------------------------------- */

static tsr_status w4a8_create(const tsr_host *host, const tsr_params *params,
                              const tsr_quantizer_init *init, void **out) {
    w4a8_cfg cfg = {(int32_t)tsr_param_int(params, "group")};
    tsr_status st = tsr_rq_check_group(host, cfg.group, 32);
    return st < 0 ? st
                  : tsr_rq_quantizer_create(host, init, &w4a8_codec, &cfg, sizeof cfg, out);
}

static const tsr_param_def w4a8_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "group", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 32, .max = 256, .unit = "weights",
     .doc = "weights per 4-bit group (integer scale and zero), a multiple of 32"},
};

static const tsr_quantizer_vtable w4a8_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = w4a8_create,
    .prepare = tsr_rq_quantizer_prepare,
    TSR_RQ_QUANTIZER_CALLBACKS,
};

static const tsr_plugin_desc w4a8_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "w4a8",
    .version = "1.0",
    .description = "QServe progressive weights (int8 per channel, then 4-bit groups with integer "
                   "scales) from F32/F16/BF16; int8 activations, integer dot products",
    TSR_PARAMS(w4a8_params),
    .vtable = &w4a8_vtable,
};

TSR_PLUGIN_EXPORT(&w4a8_desc)
