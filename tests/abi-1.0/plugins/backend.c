/* backend 'abi10-cpu' (frozen 1.0): F32 weights, host memory, one thread, double sums. */
#include <tessera/backend.h>

#include "frozen.h"

typedef struct fbackend {
    const tsr_host *host;
} fbackend;

static tsr_status fb_create(const tsr_host *host, const tsr_params *params,
                            const tsr_backend_init *init, void **out) {
    (void)params;
    (void)init;
    fbackend *b = frozen_zalloc(host, sizeof *b);
    if (!b) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    b->host = host;
    *out = b;
    return TSR_OK;
}

static void fb_destroy(void *self) {
    fbackend *b = self;
    b->host->free(b->host->ctx, b);
}

static int32_t fb_supports(void *self, int32_t dtype) {
    (void)self;
    return dtype == TSR_DTYPE_F32;
}

static tsr_status fb_check(fbackend *b, const tsr_tensor *w) {
    if (w->dtype == TSR_DTYPE_F32 && w->row_bytes >= (size_t)w->ne[0] * sizeof(float)) return TSR_OK;
    b->host->set_error(b->host->ctx, "%s: only F32 rows", w->name ? w->name : "weight");
    return TSR_E_UNSUPPORTED;
}

static tsr_status fb_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                            int64_t n) {
    tsr_status st = fb_check(self, w);
    if (st < 0) return st;
    for (int64_t t = 0; t < n; t++)
        for (int64_t o = 0; o < w->ne[1]; o++) {
            const float *row = (const float *)((const char *)w->data + (size_t)o * w->row_bytes);
            double sum = 0;
            for (int64_t i = 0; i < w->ne[0]; i++) sum += (double)row[i] * x[t * w->ne[0] + i];
            y[t * w->ne[1] + o] = (float)sum;
        }
    return TSR_OK;
}

static tsr_status fb_get_rows(void *self, float *y, const tsr_tensor *w, const int32_t *ids,
                              int64_t n) {
    fbackend *b = self;
    tsr_status st = fb_check(b, w);
    if (st < 0) return st;
    for (int64_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= w->ne[1]) {
            b->host->set_error(b->host->ctx, "get_rows: id %d out of range", (int)ids[t]);
            return TSR_E_RANGE;
        }
        memcpy(y + t * w->ne[0], (const char *)w->data + (size_t)ids[t] * w->row_bytes,
               (size_t)w->ne[0] * sizeof(float));
    }
    return TSR_OK;
}

static tsr_status fb_rms_norm(void *self, float *y, const float *x, const float *weight,
                              int64_t n, int64_t dim, float eps) {
    (void)self;
    for (int64_t t = 0; t < n; t++) {
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double)x[t * dim + i] * x[t * dim + i];
        double scale = 1.0 / sqrt(ss / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            y[t * dim + i] = (float)(x[t * dim + i] * scale * weight[i]);
    }
    return TSR_OK;
}

static tsr_status fb_rope(void *self, float *x, const int32_t *pos, int64_t n, int32_t n_head,
                          int32_t head_dim, const tsr_rope_params *rope) {
    (void)self;
    int32_t half = rope->n_rot / 2;
    for (int64_t t = 0; t < n; t++)
        for (int32_t h = 0; h < n_head; h++) {
            float *row = x + (t * n_head + h) * head_dim;
            for (int32_t i = 0; i < half; i++) {
                double theta = pos[t] * (double)rope->freq_scale *
                               pow((double)rope->freq_base, -2.0 * i / rope->n_rot);
                int32_t a = rope->mode == TSR_ROPE_NEOX ? i : 2 * i;
                int32_t b = rope->mode == TSR_ROPE_NEOX ? i + half : 2 * i + 1;
                double x0 = row[a], x1 = row[b];
                row[a] = (float)(x0 * cos(theta) - x1 * sin(theta));
                row[b] = (float)(x0 * sin(theta) + x1 * cos(theta));
            }
        }
    return TSR_OK;
}

static tsr_status fb_swiglu(void *self, float *y, const float *gate, const float *up,
                            int64_t n, int64_t dim) {
    (void)self;
    for (int64_t i = 0; i < n * dim; i++) {
        double g = gate[i];
        y[i] = (float)(g / (1.0 + exp(-g)) * up[i]);
    }
    return TSR_OK;
}

static tsr_status fb_add(void *self, float *y, const float *a, const float *b, int64_t n,
                         int64_t dim, int64_t b_rows) {
    (void)self;
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < dim; i++)
            y[t * dim + i] = a[t * dim + i] + b[(b_rows == 1 ? 0 : t) * dim + i];
    return TSR_OK;
}

static const tsr_backend_vtable fb_vtable = {
    .struct_size = sizeof(tsr_backend_vtable), .create = fb_create, .destroy = fb_destroy,
    .supports = fb_supports, .matmul = fb_matmul, .get_rows = fb_get_rows,
    .rms_norm = fb_rms_norm, .rope = fb_rope, .swiglu = fb_swiglu, .add = fb_add};

static const tsr_plugin_desc fb_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_BACKEND, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-cpu", .version = "1.0",
    .description = "frozen ABI 1.0 backend: F32 weights in host memory, one thread",
    .vtable = &fb_vtable};

FROZEN_EXPORT(fb_desc)
