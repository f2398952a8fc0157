/*
 * quantizer 'gguf': the model file's own formats. Every weight stays where the file mapping
 * put it (zero copy, nothing allocated) and the backend multiplies it natively. It keeps the
 * types the CPU kernels multiply (tsr_matmul_act_type: F32, F16, BF16, Q8_0 at least) and
 * refuses the others by name, so a model with a type nobody can multiply fails at load time
 * with one clear line instead of at the first product.
 */
#include <tessera/kernels_cpu.h>
#include <tessera/sdk.h>

typedef struct gguf_quantizer {
    const tsr_host *host;
} gguf_quantizer;

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
    (void)params;
    (void)init;
    gguf_quantizer *q = tsr_calloc(host, 1, sizeof *q);
    if (!q) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    q->host = host;
    *out = q;
    return TSR_OK;
}

static void gguf_destroy(void *self) {
    gguf_quantizer *q = self;
    if (q) q->host->free(q->host->ctx, q);
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

static tsr_status gguf_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    gguf_quantizer *q = self;
    tsr_status st = gguf_check(q, "prepare", &in->src);
    if (st < 0) return st;
    out->dst = in->src;
    out->dst.extra = NULL;
    out->bits_per_weight = 8.0 * (double)in->src.row_bytes / (double)in->src.ne[0];
    out->rel_rmse = 0.0;
    out->owns_data = 0;
    return TSR_OK;
}

/* In-place tensors own nothing. */
static void gguf_release(void *self, tsr_tensor *w) {
    (void)self;
    (void)w;
}

static tsr_status gguf_dequantize_rows(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                       int64_t n_rows) {
    gguf_quantizer *q = self;
    tsr_status st = gguf_check(q, "dequantize_rows", w);
    if (st < 0) return st;
    int64_t total = 1;
    for (uint32_t d = 1; d < TSR_MAX_DIMS; d++) total *= w->ne[d];
    if (row0 < 0 || n_rows < 0 || row0 > total || n_rows > total - row0) {
        q->host->set_error(q->host->ctx, "dequantize_rows: %s: rows [%lld, %lld) are outside "
                           "[0, %lld)", w->name ? w->name : "tensor", (long long)row0,
                           (long long)(row0 + n_rows), (long long)total);
        return TSR_E_RANGE;
    }
    for (int64_t r = 0; r < n_rows; r++)
        (void)tsr_row_to_f32(y + r * w->ne[0], w->dtype,
                             (const char *)w->data + (size_t)(row0 + r) * w->row_bytes, w->ne[0]);
    return TSR_OK;
}

static const tsr_quantizer_vtable gguf_vtable = {
    TSR_SIZED(tsr_quantizer_vtable),
    .create = gguf_create,
    .destroy = gguf_destroy,
    .prepare = gguf_prepare,
    .release = gguf_release,
    .dequantize_rows = gguf_dequantize_rows,
};

static const tsr_plugin_desc gguf_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER),
    .name = "gguf",
    .version = "1.0",
    .description = "the file's own formats, kept in place (F32, F16, BF16, Q8_0...)",
    .vtable = &gguf_vtable,
};

TSR_PLUGIN_EXPORT(&gguf_desc)
