/* quantizer 'abi10-keep' (frozen 1.0): keeps every weight as the file stores it. */
#include <tessera/quantizer.h>

#include "frozen.h"

typedef struct fquant {
    const tsr_host *host;
} fquant;

static tsr_status fq_create(const tsr_host *host, const tsr_params *params,
                            const tsr_quantizer_init *init, void **out) {
    (void)params;
    (void)init;
    fquant *q = frozen_zalloc(host, sizeof *q);
    if (!q) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    q->host = host;
    *out = q;
    return TSR_OK;
}

static void fq_destroy(void *self) {
    fquant *q = self;
    q->host->free(q->host->ctx, q);
}

static tsr_status fq_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    (void)self;
    out->dst = in->src;
    out->bits_per_weight = in->src.ne[0] > 0 ? 8.0 * (double)in->src.row_bytes / (double)in->src.ne[0]
                                             : 32.0;
    out->rel_rmse = 0;
    out->owns_data = 0;
    return TSR_OK;
}

static void fq_release(void *self, tsr_tensor *w) {
    (void)self;
    (void)w;
}

static const tsr_quantizer_vtable fq_vtable = {.struct_size = sizeof(tsr_quantizer_vtable),
                                               .create = fq_create, .destroy = fq_destroy,
                                               .prepare = fq_prepare, .release = fq_release};

static const tsr_plugin_desc fq_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_QUANTIZER, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-keep", .version = "1.0",
    .description = "frozen ABI 1.0 quantizer: keeps the file's weights in place",
    .vtable = &fq_vtable};

FROZEN_EXPORT(fq_desc)
