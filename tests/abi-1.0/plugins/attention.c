/* attention 'abi10-naive' (frozen 1.0): softmax attention over whatever the views expose,
 * entry by entry, in double. */
#include <tessera/attention.h>

#include "frozen.h"

#define FA_MAX_HEAD_DIM 512

typedef struct fattn {
    const tsr_host *host;
    int32_t n_head, n_kv_head, head_dim;
    float *row; /* (head_dim) one loaded K or V row */
} fattn;

static tsr_status fa_create(const tsr_host *host, const tsr_params *params,
                            const tsr_attention_init *init, void **out) {
    (void)params;
    if (init->n_head <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_head % init->n_kv_head || init->head_dim > FA_MAX_HEAD_DIM) {
        host->set_error(host->ctx, "n_head %d, n_kv_head %d, head_dim %d: expected positive "
                        "sizes, n_head a multiple of n_kv_head, head_dim at most 512",
                        (int)init->n_head, (int)init->n_kv_head, (int)init->head_dim);
        return TSR_E_INVALID;
    }
    if (init->memory_space != TSR_MEMORY_HOST) {
        host->set_error(host->ctx, "reads host memory only");
        return TSR_E_UNSUPPORTED;
    }
    fattn *a = frozen_zalloc(host, sizeof *a);
    float *row = a ? frozen_zalloc(host, (size_t)init->head_dim * sizeof *row) : NULL;
    if (!row) {
        if (a) host->free(host->ctx, a);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *a = (fattn){host, init->n_head, init->n_kv_head, init->head_dim, row};
    *out = a;
    return TSR_OK;
}

static void fa_destroy(void *self) {
    fattn *a = self;
    a->host->free(a->host->ctx, a->row);
    a->host->free(a->host->ctx, a);
}

/* Entry j of K (which == 0) or V of a view, as f32 in a->row. */
static const float *fa_entry(fattn *a, const tsr_kv_view *v, int which, int64_t j) {
    const void *base = which ? v->v : v->k;
    size_t stride = which ? v->v_stride : v->k_stride;
    if (v->dtype == TSR_DTYPE_F32) return (const float *)((const char *)base + (size_t)j * stride);
    if (v->dtype == TSR_DTYPE_F16) {
        const uint16_t *h = (const uint16_t *)((const char *)base + (size_t)j * stride);
        for (int32_t d = 0; d < a->head_dim; d++) a->row[d] = frozen_half(h[d]);
    } else {
        (which ? v->load_v : v->load_k)(v->load_ctx, j, 1, a->row);
    }
    return a->row;
}

static tsr_status fa_forward(void *self, const tsr_attention_call *c) {
    fattn *a = self;
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head;
    for (int64_t t = 0; t < c->n_q; t++)
        for (int32_t h = 0; h < a->n_head; h++) {
            const tsr_kv_view *v = &c->views[h / group];
            const float *q = c->q + (t * a->n_head + h) * hd;
            float *out = c->out + (t * a->n_head + h) * hd;
            double mx = -INFINITY, sum = 0, acc[FA_MAX_HEAD_DIM] = {0};
            for (int64_t j = 0; j < v->n; j++) {
                if (v->pos[j] > c->q_pos[t]) continue;
                const float *k = fa_entry(a, v, 0, j);
                double s = 0;
                for (int32_t d = 0; d < hd; d++) s += (double)q[d] * k[d];
                s *= c->scale;
                if (s > mx) mx = s;
            }
            for (int pass = 0; pass < 2; pass++)
                for (int64_t j = 0; j < v->n; j++) {
                    if (v->pos[j] > c->q_pos[t]) continue;
                    const float *k = fa_entry(a, v, 0, j);
                    double s = 0;
                    for (int32_t d = 0; d < hd; d++) s += (double)q[d] * k[d];
                    double p = exp(s * c->scale - mx);
                    if (pass == 0) {
                        sum += p;
                        continue;
                    }
                    const float *val = fa_entry(a, v, 1, j);
                    for (int32_t d = 0; d < hd; d++) acc[d] += p / sum * val[d];
                    if (v->score_acc && c->q_pos[t] >= v->score_from_pos)
                        v->score_acc[j] += (float)(p / sum);
                }
            for (int32_t d = 0; d < hd; d++) out[d] = (float)acc[d];
        }
    return TSR_OK;
}

static const tsr_attention_vtable fa_vtable = {.struct_size = sizeof(tsr_attention_vtable),
                                               .create = fa_create, .destroy = fa_destroy,
                                               .forward = fa_forward};

static const tsr_plugin_desc fa_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_ATTENTION, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-naive", .version = "1.0",
    .description = "frozen ABI 1.0 attention: softmax over the views, in double",
    .vtable = &fa_vtable};

FROZEN_EXPORT(fa_desc)
