/*
 * quantizer 'gguf': GGUF's own formats. With `type: keep` (the default) every weight stays
 * where the file mapping put it (zero copy, nothing allocated) and the backend multiplies it
 * natively; types the CPU kernels cannot multiply are refused by name at load time. With any
 * other `type`, each weight matrix is converted to that GGUF type when the model loads (or
 * when `tessera quantize` writes a file), following llama.cpp's recipes: which tensors of a
 * "_m"/"_s" mix get more bits, and which fallback a row too short for 256-element blocks gets.
 *
 * `order`: with `fast` (the default) and the `cpu` backend running, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0, IQ4_NL and (at the avx512 level) Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS matrices (kept
 * or converted) are repacked at load into the kernels' row-interleaved x16 layout, a type of
 * this plugin's own that it multiplies itself (tsr_x16_matmul: activations quantized to Q8_0,
 * Q8_1 for Q4_1 and Q5_1, or Q8_K for the K types, once per product, the fast order); the
 * file's bytes are then no longer read. F16 (and below the avx512 level BF16) matrices are
 * repacked the same way into k-major panels of 32 rows (tsr_panel_pack), a type of this
 * plugin's own too, which tsr_panel_matmul multiplies for any number of tokens (the fast
 * order). With `ggml` every type stays the backend's to
 * multiply in llama.cpp's order, which the parity tests against llama.cpp's logits need.
 */
#include <tessera/kernels_cpu.h>
#include <tessera/sdk.h>

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* The values of `type`, in the order of the recipe enum below. */
static const char *const type_choices[] = {
    "keep", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m",
    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", NULL};
typedef enum recipe {
    KEEP, F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_S,
    Q5_K_M, Q6_K, IQ4_NL, IQ4_XS
} recipe;
static const int32_t recipe_base[] = {
    -1, TSR_DTYPE_F32, TSR_DTYPE_F16, TSR_DTYPE_BF16, TSR_DTYPE_Q8_0, TSR_DTYPE_Q4_0,
    TSR_DTYPE_Q4_1, TSR_DTYPE_Q5_0, TSR_DTYPE_Q5_1, TSR_DTYPE_Q2_K, TSR_DTYPE_Q3_K,
    TSR_DTYPE_Q4_K, TSR_DTYPE_Q4_K, TSR_DTYPE_Q5_K, TSR_DTYPE_Q5_K, TSR_DTYPE_Q6_K,
    TSR_DTYPE_IQ4_NL, TSR_DTYPE_IQ4_XS};

static const char *const order_choices[] = {"fast", "ggml", NULL};
enum { ORDER_FAST, ORDER_GGML };

static const tsr_param_def gguf_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "type", .type = TSR_PARAM_ENUM, .default_value = "keep",
     .min = 1, .max = 0, .choices = type_choices, .role = TSR_PARAM_ROLE_WEIGHT_TYPE,
     .doc = "keep the file's types, or convert every weight matrix to this GGUF type at load "
            "(llama.cpp's recipes for the _s/_m mixes)"},
    {TSR_SIZED(tsr_param_def), .name = "order", .type = TSR_PARAM_ENUM, .default_value = "fast",
     .min = 1, .max = 0, .choices = order_choices,
     .doc = "fast: on the cpu backend, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K..Q6_K and IQ4_XS "
            "matrices repacked at load into 16-row interleaved tiles and multiplied here in the "
            "fast order, F16 (below avx512 BF16 too) repacked at load into 32-row panels and "
            "multiplied here; ggml: every matrix left to the backend, in llama.cpp's order "
            "(bit-exact parity)"},
};

/* The x16 layouts of the repacked types, as types of this plugin. */
#define GGUF_DTYPE_Q4_0_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x160)
#define GGUF_DTYPE_Q8_0_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x161)
#define GGUF_DTYPE_Q4_K_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x162)
#define GGUF_DTYPE_Q6_K_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x163)
/* F16 and BF16 matrices repacked into panels (tsr_panel_pack), which tsr_panel_matmul
 * multiplies. */
#define GGUF_DTYPE_F16_PANEL (TSR_DTYPE_PLUGIN_FIRST + 0x164)
#define GGUF_DTYPE_BF16_PANEL (TSR_DTYPE_PLUGIN_FIRST + 0x165)
#define GGUF_DTYPE_Q4_1_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x168)
#define GGUF_DTYPE_Q5_0_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x169)
#define GGUF_DTYPE_Q5_1_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x16a)
#define GGUF_DTYPE_IQ4_NL_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x16b)
#define GGUF_DTYPE_Q5_K_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x170)
#define GGUF_DTYPE_IQ4_XS_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x171)
#define GGUF_DTYPE_Q3_K_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x172)
#define GGUF_DTYPE_Q2_K_X16 (TSR_DTYPE_PLUGIN_FIRST + 0x173)

typedef struct gguf_quantizer {
    const tsr_host *host;
    recipe recipe;
    int32_t n_layer;
    bool fast;     /* order fast on the cpu backend */
    void *scratch; /* the prepared activations of the current product */
    size_t scratch_bytes;
} gguf_quantizer;

/* The GGUF type one of this plugin's own types holds, or -1. */
static int32_t own_base(int32_t dtype) {
    switch (dtype) {
    case GGUF_DTYPE_Q4_0_X16: return TSR_DTYPE_Q4_0;
    case GGUF_DTYPE_Q8_0_X16: return TSR_DTYPE_Q8_0;
    case GGUF_DTYPE_Q4_K_X16: return TSR_DTYPE_Q4_K;
    case GGUF_DTYPE_Q6_K_X16: return TSR_DTYPE_Q6_K;
    case GGUF_DTYPE_F16_PANEL: return TSR_DTYPE_F16;
    case GGUF_DTYPE_BF16_PANEL: return TSR_DTYPE_BF16;
    case GGUF_DTYPE_Q4_1_X16: return TSR_DTYPE_Q4_1;
    case GGUF_DTYPE_Q5_0_X16: return TSR_DTYPE_Q5_0;
    case GGUF_DTYPE_Q5_1_X16: return TSR_DTYPE_Q5_1;
    case GGUF_DTYPE_IQ4_NL_X16: return TSR_DTYPE_IQ4_NL;
    case GGUF_DTYPE_Q5_K_X16: return TSR_DTYPE_Q5_K;
    case GGUF_DTYPE_IQ4_XS_X16: return TSR_DTYPE_IQ4_XS;
    case GGUF_DTYPE_Q3_K_X16: return TSR_DTYPE_Q3_K;
    case GGUF_DTYPE_Q2_K_X16: return TSR_DTYPE_Q2_K;
    }
    return -1;
}

static bool is_panel(int32_t dtype) {
    return dtype == GGUF_DTYPE_F16_PANEL || dtype == GGUF_DTYPE_BF16_PANEL;
}

/* The repacked type of a GGUF type tsr_x16_supported takes. */
static int32_t x16_type(int32_t base) {
    switch (base) {
    case TSR_DTYPE_Q4_0: return GGUF_DTYPE_Q4_0_X16;
    case TSR_DTYPE_Q8_0: return GGUF_DTYPE_Q8_0_X16;
    case TSR_DTYPE_Q4_K: return GGUF_DTYPE_Q4_K_X16;
    case TSR_DTYPE_Q4_1: return GGUF_DTYPE_Q4_1_X16;
    case TSR_DTYPE_Q5_0: return GGUF_DTYPE_Q5_0_X16;
    case TSR_DTYPE_Q5_1: return GGUF_DTYPE_Q5_1_X16;
    case TSR_DTYPE_IQ4_NL: return GGUF_DTYPE_IQ4_NL_X16;
    case TSR_DTYPE_Q5_K: return GGUF_DTYPE_Q5_K_X16;
    case TSR_DTYPE_IQ4_XS: return GGUF_DTYPE_IQ4_XS_X16;
    case TSR_DTYPE_Q3_K: return GGUF_DTYPE_Q3_K_X16;
    case TSR_DTYPE_Q2_K: return GGUF_DTYPE_Q2_K_X16;
    }
    return GGUF_DTYPE_Q6_K_X16;
}

/* GGUF's own names (ggml_type_name) for the types a file may hold. */
static const char *gguf_type_name(int32_t dtype) {
    switch (dtype) {
    case TSR_DTYPE_F32: return "F32";
    case TSR_DTYPE_F16: return "F16";
    case TSR_DTYPE_Q4_0: return "Q4_0";
    case TSR_DTYPE_Q4_1: return "Q4_1";
    case TSR_DTYPE_Q5_0: return "Q5_0";
    case TSR_DTYPE_Q5_1: return "Q5_1";
    case TSR_DTYPE_Q8_0: return "Q8_0";
    case TSR_DTYPE_Q8_1: return "Q8_1";
    case TSR_DTYPE_Q2_K: return "Q2_K";
    case TSR_DTYPE_Q3_K: return "Q3_K";
    case TSR_DTYPE_Q4_K: return "Q4_K";
    case TSR_DTYPE_Q5_K: return "Q5_K";
    case TSR_DTYPE_Q6_K: return "Q6_K";
    case TSR_DTYPE_Q8_K: return "Q8_K";
    case TSR_DTYPE_IQ4_NL: return "IQ4_NL";
    case TSR_DTYPE_IQ4_XS: return "IQ4_XS";
    case TSR_DTYPE_I8: return "I8";
    case TSR_DTYPE_I16: return "I16";
    case TSR_DTYPE_I32: return "I32";
    case TSR_DTYPE_I64: return "I64";
    case TSR_DTYPE_F64: return "F64";
    case TSR_DTYPE_BF16: return "BF16";
    }
    return NULL;
}

static tsr_status gguf_create(const tsr_host *host, const tsr_params *params,
                              const tsr_quantizer_init *init, void **out) {
    gguf_quantizer *q = tsr_calloc(host, 1, sizeof *q);
    if (!q) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    q->host = host;
    q->recipe = (recipe)tsr_param_int(params, "type");
    q->n_layer = init->n_layer;
    q->fast = tsr_param_int(params, "order") == ORDER_FAST && init->backend_name &&
              !strcmp(init->backend_name, "cpu");
    *out = q;
    return TSR_OK;
}

static void gguf_destroy(void *self) {
    gguf_quantizer *q = self;
    if (!q) return;
    q->host->free(q->host->ctx, q->scratch);
    q->host->free(q->host->ctx, q);
}

/* Checks that `t` is rows of ne[0] elements of a type this version keeps, packed as GGUF
 * stores them. `what` names the call for the message. */
static tsr_status gguf_check(const gguf_quantizer *q, const char *what, const tsr_tensor *t) {
    const char *name = t->name ? t->name : "tensor";
    if (tsr_matmul_act_type(t->dtype) < 0) {
        const char *type = gguf_type_name(t->dtype);
        if (type)
            q->host->set_error(q->host->ctx, "%s: %s: type %s has no matrix product in the "
                               "CPU kernels", what, name, type);
        else
            q->host->set_error(q->host->ctx, "%s: %s: type %d is not a GGUF type", what, name,
                               (int)t->dtype);
        return TSR_E_UNSUPPORTED;
    }
    size_t need = tsr_row_size(t->dtype, t->ne[0]);
    if (t->ne[0] <= 0 || need == 0 || t->row_bytes != need) {
        q->host->set_error(q->host->ctx, "%s: %s: %lld elements of %s per row take %zu bytes, "
                           "the tensor says %zu", what, name, (long long)t->ne[0],
                           gguf_type_name(t->dtype), need, t->row_bytes);
        return TSR_E_INVALID;
    }
    return TSR_OK;
}

/* llama.cpp gives these layers of attn_v and ffn_down more bits in its _M mixes: the first
 * and last eighth, and every third one between. */
static bool use_more_bits(int32_t layer, int32_t n_layer) {
    return layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer - n_layer / 8) % 3 == 2;
}

/* The type `role` of `layer` gets under the recipe (llama.cpp's llama_tensor_get_type), before
 * the row-length fallback. */
static int32_t recipe_type(const gguf_quantizer *q, const tsr_tensor *src, const char *role,
                           int32_t layer) {
    recipe r = q->recipe;
    int32_t base = recipe_base[r], n = q->n_layer;
    bool k_mix = r >= Q2_K && r <= IQ4_XS;
    bool low_bits = r >= Q4_0; /* everything below 8 bits */
    if (!strcmp(role, "output")) return low_bits ? TSR_DTYPE_Q6_K : base;
    if (!k_mix || layer < 0) return base;
    if (!strcmp(role, "attn_v")) {
        /* Four or more query heads per KV head: attn_v is (n_kv_head * head_dim) rows of n_embd,
         * at most a quarter of attn_q's n_head * head_dim = n_embd rows. */
        bool gqa4 = src->ne[1] > 0 && src->ne[0] >= 4 * src->ne[1];
        if (r == Q2_K) return gqa4 ? TSR_DTYPE_Q4_K : TSR_DTYPE_Q3_K;
        if (r == Q3_K_M) return layer < 2 ? TSR_DTYPE_Q5_K : TSR_DTYPE_Q4_K;
        if ((r == IQ4_NL || r == IQ4_XS) && gqa4) return TSR_DTYPE_Q5_K;
        if ((r == Q4_K_M || r == Q5_K_M) && use_more_bits(layer, n)) return TSR_DTYPE_Q6_K;
        if (r == Q4_K_S && layer < 4) return TSR_DTYPE_Q5_K;
    } else if (!strncmp(role, "ffn_down", 8)) { /* experts' ffn_down_exps too */
        if (r == Q2_K) return TSR_DTYPE_Q3_K;
        if (r == Q3_K_M) return layer < n / 16 ? TSR_DTYPE_Q5_K : TSR_DTYPE_Q4_K;
        if ((r == Q4_K_M || r == Q5_K_M) && use_more_bits(layer, n)) return TSR_DTYPE_Q6_K;
        if ((r == Q4_K_S || r == IQ4_NL || r == IQ4_XS) && layer < n / 8) return TSR_DTYPE_Q5_K;
    } else if (!strcmp(role, "attn_output")) {
        if (r == Q2_K) return TSR_DTYPE_Q3_K;
        if (r == Q3_K_M) return TSR_DTYPE_Q4_K;
    }
    return base;
}

/* Rows that do not hold whole 256-element blocks fall back as llama.cpp does; rows that do not
 * hold whole 32-element blocks keep 16 bits. */
static int32_t fit_row(int32_t type, int64_t n) {
    if (n % tsr_dtype_block_elems(type) == 0) return type;
    switch (type) {
    case TSR_DTYPE_Q2_K: case TSR_DTYPE_Q3_K: case TSR_DTYPE_IQ4_XS: type = TSR_DTYPE_IQ4_NL; break;
    case TSR_DTYPE_Q4_K: type = TSR_DTYPE_Q5_0; break;
    case TSR_DTYPE_Q5_K: type = TSR_DTYPE_Q5_1; break;
    case TSR_DTYPE_Q6_K: type = TSR_DTYPE_Q8_0; break;
    default: break;
    }
    return n % tsr_dtype_block_elems(type) == 0 ? type : TSR_DTYPE_F16;
}

typedef struct convert_job {
    const tsr_tensor *src;
    void *dst;
    int32_t type;
    size_t dst_row_bytes;
    int64_t rows;
    float *scratch;     /* (nth, 2, ne[0]) */
    double *err2, *ref2; /* (nth) */
    tsr_status status;
} convert_job;

/* Each thread converts a contiguous range of rows: decode to f32, encode to the new type, and
 * decode again to measure what the conversion lost. */
static void convert_rows(void *arg, int ith, int nth) {
    convert_job *j = arg;
    int64_t n = j->src->ne[0], begin = j->rows * ith / nth, end = j->rows * (ith + 1) / nth;
    float *row = j->scratch + (size_t)ith * 2 * (size_t)n, *back = row + n;
    double err2 = 0, ref2 = 0;
    for (int64_t r = begin; r < end; r++) {
        const void *in = (const char *)j->src->data + (size_t)r * j->src->row_bytes;
        void *out = (char *)j->dst + (size_t)r * j->dst_row_bytes;
        if (tsr_dequantize_row(j->src->dtype, row, in, n) < 0 ||
            tsr_quantize_row(j->type, out, row, n) < 0 || tsr_dequantize_row(j->type, back, out, n) < 0) {
            j->status = TSR_E_INVALID;
            return;
        }
        for (int64_t i = 0; i < n; i++) {
            double d = (double)back[i] - (double)row[i];
            err2 += d * d;
            ref2 += (double)row[i] * (double)row[i];
        }
    }
    j->err2[ith] = err2;
    j->ref2[ith] = ref2;
}

static tsr_status prepare_gguf(gguf_quantizer *q, const tsr_weight_in *in,
                               tsr_weight_out *out) {
    const tsr_host *h = q->host;
    const tsr_tensor *src = &in->src;
    int32_t type = q->recipe == KEEP
                       ? src->dtype
                       : fit_row(recipe_type(q, src, in->role, in->layer), src->ne[0]);
    if (type == src->dtype) {
        tsr_status st = gguf_check(q, "prepare", src);
        if (st < 0) return st;
        out->dst = *src;
        out->dst.extra = NULL;
        out->bits_per_weight = 8.0 * (double)src->row_bytes / (double)src->ne[0];
        out->rel_rmse = 0.0;
        out->owns_data = 0;
        return TSR_OK;
    }
    const char *name = src->name ? src->name : in->role;
    if (tsr_dtype_block_elems(src->dtype) <= 0 || src->ne[0] % tsr_dtype_block_elems(src->dtype)) {
        h->set_error(h->ctx, "prepare: %s: cannot read type %s to convert it", name,
                     gguf_type_name(src->dtype) ? gguf_type_name(src->dtype) : "?");
        return TSR_E_UNSUPPORTED;
    }
    int64_t rows = src->ne[1] * src->ne[2] * src->ne[3];
    int nth = h->n_threads(h->ctx);
    convert_job j = {.src = src, .type = type, .rows = rows,
                     .dst_row_bytes = tsr_row_size(type, src->ne[0])};
    j.dst = h->alloc(h->ctx, j.dst_row_bytes * (size_t)rows, 0);
    j.scratch = tsr_calloc(h, (size_t)nth * 2, (size_t)src->ne[0] * sizeof(float));
    j.err2 = tsr_calloc(h, (size_t)nth, sizeof(double));
    j.ref2 = tsr_calloc(h, (size_t)nth, sizeof(double));
    if (!j.dst || !j.scratch || !j.err2 || !j.ref2) {
        h->free(h->ctx, j.dst);
        h->free(h->ctx, j.scratch);
        h->free(h->ctx, j.err2);
        h->free(h->ctx, j.ref2);
        h->set_error(h->ctx, "prepare: %s: out of memory converting to %s", name, gguf_type_name(type));
        return TSR_E_NOMEM;
    }
    h->parallel_for(h->ctx, convert_rows, &j);
    double err2 = 0, ref2 = 0;
    for (int t = 0; t < nth; t++) {
        err2 += j.err2[t];
        ref2 += j.ref2[t];
    }
    h->free(h->ctx, j.scratch);
    h->free(h->ctx, j.err2);
    h->free(h->ctx, j.ref2);
    if (j.status < 0) {
        h->free(h->ctx, j.dst);
        h->set_error(h->ctx, "prepare: %s: converting %s to %s failed", name,
                     gguf_type_name(src->dtype), gguf_type_name(type));
        return j.status;
    }
    out->dst = *src;
    out->dst.dtype = type;
    out->dst.row_bytes = j.dst_row_bytes;
    out->dst.data = j.dst;
    out->dst.extra = j.dst; /* marks memory this quantizer allocated */
    out->bits_per_weight = 8.0 * (double)j.dst_row_bytes / (double)src->ne[0];
    out->rel_rmse = ref2 > 0 ? sqrt(err2 / ref2) : 0.0;
    out->owns_data = 1;
    return TSR_OK;
}

/* Tensors kept in place own nothing; converted ones carry their allocation in `extra`. */
static void gguf_release(void *self, tsr_tensor *w) {
    gguf_quantizer *q = self;
    q->host->free(q->host->ctx, w->extra);
    w->extra = NULL;
}

typedef struct repack_job {
    void *dst;
    const tsr_tensor *src;
} repack_job;

static void repack_groups(void *arg, int ith, int nth) {
    repack_job *j = arg;
    int64_t n_groups = j->src->ne[1] / TSR_X16_ROWS;
    (void)tsr_x16_pack(j->dst, j->src->data, j->src->dtype, j->src->ne[0], j->src->ne[1],
                       n_groups * ith / nth, n_groups * (ith + 1) / nth);
}

static void repack_panels(void *arg, int ith, int nth) {
    repack_job *j = arg;
    int64_t n_panels = (j->src->ne[1] + TSR_PANEL_ROWS - 1) / TSR_PANEL_ROWS;
    tsr_panel_pack(j->dst, j->src->data, j->src->ne[0], j->src->ne[1], n_panels * ith / nth,
                   n_panels * (ith + 1) / nth);
}

/* The fast order's layout for a prepared matrix the products read. A matrix of a type
 * tsr_x16_supported takes is replaced by a copy in x16 tiles, an F16 (or below AVX-512 a
 * BF16, tsr_panel_pays) one by a copy in panels (a converted matrix is freed; a kept one stays
 * in the file's mapping, unread). The embeddings' rows are read by get_rows in the
 * file's layout: left alone. So are a mixture's routed experts: a router may read them from
 * the file on demand and let their pages go (expert offloading), which a resident copy would
 * defeat. And types whose x16 product would be slower at the running level
 * (tsr_x16_repack_pays). */
static tsr_status fast_layout(gguf_quantizer *q, const tsr_weight_in *in, tsr_weight_out *out) {
    tsr_tensor *t = &out->dst;
    bool routed_expert = in->struct_size >= offsetof(tsr_weight_in, expert) + sizeof in->expert &&
                         in->expert >= 0;
    if (!q->fast || routed_expert || !strcmp(in->role, "token_embd") || t->ne[2] * t->ne[3] != 1)
        return TSR_OK;
    const bool panel = tsr_panel_pays(t->dtype);
    if (!panel && (!tsr_x16_repack_pays(t->dtype) ||
                   !tsr_x16_supported(t->dtype, t->ne[0], t->ne[1])))
        return TSR_OK;
    const tsr_host *h = q->host;
    repack_job j = {.src = t};
    j.dst = h->alloc(h->ctx,
                     panel ? tsr_panel_bytes(t->ne[0], t->ne[1])
                           : t->row_bytes * (size_t)t->ne[1],
                     64);
    if (!j.dst) {
        h->set_error(h->ctx, "prepare: %s: out of memory repacking %s", t->name ? t->name : in->role,
                     gguf_type_name(t->dtype));
        return TSR_E_NOMEM;
    }
    h->parallel_for(h->ctx, panel ? repack_panels : repack_groups, &j);
    h->free(h->ctx, t->extra);
    t->dtype = !panel                       ? x16_type(t->dtype)
               : t->dtype == TSR_DTYPE_F16 ? GGUF_DTYPE_F16_PANEL
                                           : GGUF_DTYPE_BF16_PANEL;
    t->data = t->extra = j.dst;
    out->owns_data = 1;
    return TSR_OK;
}

static tsr_status gguf_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    gguf_quantizer *q = self;
    tsr_status st = prepare_gguf(q, in, out);
    if (st < 0) return st;
    if ((st = fast_layout(q, in, out)) < 0 && out->owns_data) gguf_release(q, &out->dst);
    return st;
}

/* How this plugin multiplies one of its own types. */
typedef enum product {
    PRODUCT_X16,  /* tsr_x16_matmul on the repacked tiles */
    PRODUCT_PANEL /* tsr_panel_matmul on the F16 / BF16 panels */
} product;

typedef struct product_job {
    float *y;
    const tsr_tensor *w;
    int32_t wtype; /* the GGUF type the weight holds */
    product kind;
    void *xp;      /* the prepared activations */
    const float *x;
    int64_t n;
    atomic_int failed;
} product_job;

static void product_prepare_task(void *arg, int ith, int nth) {
    product_job *j = arg;
    tsr_status st = j->kind == PRODUCT_PANEL
                        ? tsr_panel_prepare(j->xp, j->wtype, j->x, j->n, j->w->ne[0], ith, nth)
                        : tsr_matmul_prepare(j->xp, tsr_matmul_act_type(j->wtype), j->x, j->n,
                                             j->w->ne[0], ith, nth);
    if (st < 0) atomic_store(&j->failed, 1);
}

static void product_task(void *arg, int ith, int nth) {
    product_job *j = arg;
    const tsr_tensor *w = j->w;
    tsr_status st =
        j->kind == PRODUCT_PANEL
            ? tsr_panel_matmul(j->y, w->ne[1], w->data, j->wtype, j->xp, j->n, w->ne[0],
                               w->ne[1], ith, nth)
            : tsr_x16_matmul(j->y, w->ne[1], w->data, j->wtype, j->xp, j->n, w->ne[0],
                             w->ne[1], ith, nth);
    if (st < 0) atomic_store(&j->failed, 1);
}

/* The prepared activations' bytes for n tokens, 0 on overflow. */
static size_t prepared_bytes(const product_job *j) {
    const int64_t n_in = j->w->ne[0];
    if (j->kind == PRODUCT_PANEL)
        return (uint64_t)j->n > (SIZE_MAX / sizeof(float) - TSR_PANEL_TOK) / (uint64_t)n_in
                   ? 0
                   : tsr_panel_act_bytes(j->n, n_in);
    size_t row = tsr_row_size(tsr_matmul_act_type(j->wtype), n_in);
    return (size_t)j->n > SIZE_MAX / row ? 0 : (size_t)j->n * row;
}

/* This plugin's own types: the activations prepared once (by tokens over the pool, one token
 * on the calling thread), then the rows over the pool. */
static tsr_status gguf_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                              int64_t n) {
    gguf_quantizer *q = self;
    const tsr_host *h = q->host;
    product_job j = {.y = y, .w = w, .wtype = own_base(w->dtype), .x = x, .n = n};
    if (j.wtype < 0) {
        h->set_error(h->ctx, "matmul: %s: type %d is not one this quantizer multiplies",
                     w->name ? w->name : "weight", (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    if (n <= 0) return TSR_OK;
    j.kind = is_panel(w->dtype) ? PRODUCT_PANEL : PRODUCT_X16;
    size_t bytes = prepared_bytes(&j);
    if (!bytes) {
        h->set_error(h->ctx, "matmul: %lld prepared rows of %lld elements overflow",
                     (long long)n, (long long)w->ne[0]);
        return TSR_E_NOMEM;
    }
    if (bytes > q->scratch_bytes) {
        void *p = h->alloc(h->ctx, bytes, 64);
        if (!p) {
            h->set_error(h->ctx, "matmul: out of memory for %lld prepared rows", (long long)n);
            return TSR_E_NOMEM;
        }
        h->free(h->ctx, q->scratch);
        q->scratch = p;
        q->scratch_bytes = bytes;
    }
    j.xp = q->scratch;
    if (n > 1) h->parallel_for(h->ctx, product_prepare_task, &j);
    else product_prepare_task(&j, 0, 1);
    h->parallel_for(h->ctx, product_task, &j);
    if (atomic_load(&j.failed)) {
        static const char *const names[] = {"x16", "panel"};
        h->set_error(h->ctx, "matmul: %s: the %s product failed (%lld x %lld, out of memory for "
                     "its scratch)", w->name ? w->name : "weight", names[j.kind],
                     (long long)w->ne[1], (long long)w->ne[0]);
        return TSR_E_NOMEM;
    }
    return TSR_OK;
}

static tsr_status gguf_dequantize_rows(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                       int64_t n_rows) {
    gguf_quantizer *q = self;
    const int32_t base = own_base(w->dtype);
    const bool repacked = base >= 0;
    tsr_status st = repacked ? TSR_OK : gguf_check(q, "dequantize_rows", w);
    if (st < 0) return st;
    int64_t total = 1;
    for (uint32_t d = 1; d < TSR_MAX_DIMS; d++) total *= w->ne[d];
    if (row0 < 0 || n_rows < 0 || row0 > total || n_rows > total - row0) {
        q->host->set_error(q->host->ctx, "dequantize_rows: %s: rows [%lld, %lld) are outside "
                           "[0, %lld)", w->name ? w->name : "tensor", (long long)row0,
                           (long long)(row0 + n_rows), (long long)total);
        return TSR_E_RANGE;
    }
    void *file_row = NULL;
    if (repacked && n_rows > 0 && !(file_row = tsr_calloc(q->host, 1, w->row_bytes))) {
        q->host->set_error(q->host->ctx, "dequantize_rows: out of memory");
        return TSR_E_NOMEM;
    }
    for (int64_t r = 0; r < n_rows; r++) {
        const void *src = (const char *)w->data + (size_t)(row0 + r) * w->row_bytes;
        if (repacked) {
            if (is_panel(w->dtype))
                tsr_panel_unpack_row(file_row, w->data, w->ne[0], row0 + r);
            else
                tsr_x16_unpack_row(file_row, w->data, base, w->ne[0], row0 + r);
            src = file_row;
        }
        (void)tsr_row_to_f32(y + r * w->ne[0], repacked ? base : w->dtype, src, w->ne[0]);
    }
    q->host->free(q->host->ctx, file_row);
    return TSR_OK;
}

static const tsr_quantizer_vtable gguf_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = gguf_create,
    .destroy = gguf_destroy,
    .prepare = gguf_prepare,
    .release = gguf_release,
    .matmul = gguf_matmul,
    .dequantize_rows = gguf_dequantize_rows,
};

static const tsr_plugin_desc gguf_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "gguf",
    .version = "1.0",
    .description = "GGUF formats: the file's own kept in place, or converted at load (q8_0, "
                   "q4_0, q4_k_m...)",
    TSR_PARAMS(gguf_params),
    .vtable = &gguf_vtable,
};

TSR_PLUGIN_EXPORT(&gguf_desc)
