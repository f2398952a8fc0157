/*
 * quantizer 'int6': 6-bit weights with an fp16 scale per group, after FlexQ (Zhang et al.
 * 2025), which keeps every layer's weights in INT6 and its activations in 6 or 8 bits.
 * Row layout (n_g = ceil(n_in / group), the last group may be short):
 *   fp16 scale[n_g] | codes, 6 bits each, n_g * group
 * w = d * (c - 32), c in [1, 63], d = amax / 31 (symmetric).
 * act_bits 16: the product dequantizes each row and multiplies it with the f32 activations.
 * act_bits 8: activations are quantized per token to int8 (d_a = amax / 127) and each group
 * is an exact integer dot: y = d_a * sum_g d_g * (sum c * a - 32 * sum a).
 */
#include <tessera/kernels_research.h>
#include <tessera/sdk.h>

#define INT6_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 110)
#define INT6_GROUP_MAX 256

typedef struct int6_cfg {
    int32_t group, act8;
} int6_cfg;

typedef struct int6 {
    const tsr_host *host;
    int6_cfg cfg;
} int6;

static int64_t int6_groups(const int6_cfg *c, int64_t n_in) {
    return (n_in + c->group - 1) / c->group;
}

static size_t int6_row_bytes(const void *cfg, int64_t n_in) {
    const int6_cfg *c = cfg;
    int64_t n_g = int6_groups(c, n_in);
    return 2 * (size_t)n_g + tsr_rq_packed_bytes(n_g * c->group, 6);
}

static void int6_quantize_row(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                              int64_t n_in) {
    (void)tail;
    const int6_cfg *c = cfg;
    int64_t n_g = int6_groups(c, n_in);
    uint8_t *codes = row + 2 * n_g, q[INT6_GROUP_MAX];
    for (int64_t g = 0; g < n_g; g++) {
        const float *x = w + g * c->group;
        int64_t len = n_in - g * c->group < c->group ? n_in - g * c->group : c->group;
        float amax = 0.0f;
        for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = tsr_rq_store_f16(row + 2 * g, amax / 31.0f);
        float id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int64_t i = 0; i < c->group; i++)
            q[i] = (uint8_t)(i < len ? tsr_rq_round(x[i] * id, -31, 31) + 32 : 32);
        tsr_rq_pack(codes + g * c->group * 6 / 8, q, c->group, 6);
    }
}

static void int6_dequantize_row(const void *cfg, float *y, const uint8_t *row,
                                const uint8_t *tail, size_t tail_bytes, int64_t n_in) {
    (void)tail;
    (void)tail_bytes;
    const int6_cfg *c = cfg;
    int64_t n_g = int6_groups(c, n_in);
    const uint8_t *codes = row + 2 * n_g;
    uint8_t q[INT6_GROUP_MAX];
    for (int64_t g = 0; g < n_g; g++) {
        int64_t len = n_in - g * c->group < c->group ? n_in - g * c->group : c->group;
        tsr_rq_unpack(q, codes + g * c->group * 6 / 8, len, 6);
        float d = tsr_rq_load_f16(row + 2 * g);
        for (int64_t i = 0; i < len; i++) y[g * c->group + i] = d * (float)((int32_t)q[i] - 32);
    }
}

static int64_t int6_act_group(const void *cfg) {
    const int6_cfg *c = cfg;
    return c->act8 ? c->group : 0;
}

static void int6_dot_q8(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                        const tsr_rq_act *act, int64_t n_tok, int64_t n_in, uint8_t *codes) {
    const int6_cfg *c = cfg;
    int64_t n_g = int6_groups(c, n_in), n_pad = n_g * c->group;
    tsr_rq_unpack(codes, row + 2 * n_g, n_pad, 6);
    for (int64_t t = 0; t < n_tok; t++) {
        const int8_t *a = act->q + t * act->n_pad;
        const int32_t *asum = act->gsum + t * n_g;
        float acc = 0.0f;
        for (int64_t g = 0; g < n_g; g++) {
            int32_t dot = tsr_rq_dot_u8s8(codes + g * c->group, a + g * c->group, c->group);
            acc += tsr_rq_load_f16(row + 2 * g) * (float)(dot - 32 * asum[g]);
        }
        y[t * ldy] = acc * act->d[t];
    }
}

static const tsr_rq_codec int6_codec = {
    .dtype = INT6_DTYPE,
    .name = "int6",
    .row_bytes = int6_row_bytes,
    .quantize_row = int6_quantize_row,
    .dequantize_row = int6_dequantize_row,
    .act_group = int6_act_group,
    .dot_q8 = int6_dot_q8,
};

/* ---- plugin ---------------------------------------------------------------------------- */

static tsr_status int6_create(const tsr_host *host, const tsr_params *params,
                              const tsr_quantizer_init *init, void **out) {
    (void)init;
    /* choices {"8", "16"}: index 0 is 8-bit activations. */
    int6_cfg cfg = {(int32_t)tsr_param_int(params, "group"),
                    tsr_param_int(params, "act_bits") == 0};
    if (cfg.group % 32) {
        host->set_error(host->ctx, "group: %d is not a multiple of 32", (int)cfg.group);
        return TSR_E_INVALID;
    }
    int6 *q = tsr_calloc(host, 1, sizeof *q);
    if (!q) return TSR_E_NOMEM;
    q->host = host;
    q->cfg = cfg;
    *out = q;
    return TSR_OK;
}

static void int6_destroy(void *self) {
    int6 *q = self;
    q->host->free(q->host->ctx, q);
}

static tsr_status int6_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    int6 *q = self;
    tsr_rq_report rep;
    tsr_status st = tsr_rq_quantize(q->host, &int6_codec, &q->cfg, sizeof q->cfg, &in->src,
                                    &out->dst, &rep);
    if (st < 0) return st;
    out->bits_per_weight = rep.bits_per_weight;
    out->rel_rmse = rep.rel_rmse;
    out->owns_data = 1;
    q->host->log(q->host->ctx, TSR_LOG_INFO,
                 "%s (layer %d, %s): int6 group %d, %s activations: %.3f bits/weight, "
                 "rel_rmse %.5f",
                 in->src.name ? in->src.name : "?", (int)in->layer, in->role ? in->role : "?",
                 (int)q->cfg.group, q->cfg.act8 ? "int8" : "f32", rep.bits_per_weight,
                 rep.rel_rmse);
    return TSR_OK;
}

static void int6_release(void *self, tsr_tensor *w) {
    int6 *q = self;
    tsr_rq_release(q->host, w);
}

static tsr_status int6_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                              int64_t n) {
    int6 *q = self;
    return tsr_rq_matmul(q->host, &int6_codec, y, w, x, n);
}

static tsr_status int6_dequantize_rows(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                       int64_t n_rows) {
    int6 *q = self;
    return tsr_rq_dequantize_rows(q->host, &int6_codec, y, w, row0, n_rows);
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
    .destroy = int6_destroy,
    .prepare = int6_prepare,
    .release = int6_release,
    .matmul = int6_matmul,
    .dequantize_rows = int6_dequantize_rows,
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
