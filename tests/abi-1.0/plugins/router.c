/* router 'abi10-topk' (frozen 1.0): the k largest gate logits, their softmax as weights. */
#include <tessera/router.h>

#include "frozen.h"

typedef struct frouter {
    const tsr_host *host;
    int32_t n_expert;
} frouter;

static tsr_status fr_create(const tsr_host *host, const tsr_params *params,
                            const tsr_router_init *init, void **out) {
    (void)params;
    if (init->n_expert <= 0) {
        host->set_error(host->ctx, "n_expert %d: expected experts", (int)init->n_expert);
        return TSR_E_INVALID;
    }
    frouter *r = frozen_zalloc(host, sizeof *r);
    if (!r) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *r = (frouter){host, init->n_expert};
    *out = r;
    return TSR_OK;
}

static void fr_destroy(void *self) {
    frouter *r = self;
    r->host->free(r->host->ctx, r);
}

static tsr_status fr_route(void *self, const tsr_route_call *c) {
    frouter *r = self;
    for (int64_t t = 0; t < c->n_tok; t++) {
        const float *g = c->gate_logits + t * r->n_expert;
        int32_t *ids = c->experts + t * c->k;
        float *w = c->weights + t * c->k;
        double sum = 0;
        for (int32_t s = 0; s < c->k; s++) {
            int32_t best = -1;
            for (int32_t e = 0; e < r->n_expert; e++) {
                int taken = 0;
                for (int32_t p = 0; p < s; p++) taken |= ids[p] == e;
                if (!taken && (best < 0 || g[e] > g[best])) best = e;
            }
            ids[s] = best;
            w[s] = best < 0 ? 0.0f : (float)exp((double)g[best] - g[ids[0]]);
            sum += w[s];
        }
        for (int32_t s = 0; s < c->k; s++) w[s] = (float)(w[s] / sum);
    }
    return TSR_OK;
}

static const tsr_router_vtable fr_vtable = {.struct_size = sizeof(tsr_router_vtable),
                                            .create = fr_create, .destroy = fr_destroy,
                                            .route = fr_route};

static const tsr_plugin_desc fr_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_ROUTER, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-topk", .version = "1.0",
    .description = "frozen ABI 1.0 router: top-k gate logits, softmax over the chosen",
    .vtable = &fr_vtable};

FROZEN_EXPORT(fr_desc)
