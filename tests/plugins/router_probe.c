/*
 * router 'probe': a test router that shows the host's side of the router stage. It routes as a
 * plain top-k (softmax over the gate logits, the k largest, renormalised) and, by `mode`:
 *   swap      slot 0 of each token keeps its expert e but hands back, as substitutes, copies of
 *             the matrices of expert f (the lowest expert the token did not choose), made
 *             through tsr_expert_access.matrices: the host must multiply with them;
 *   moved     slot 0 goes to expert f itself: what `swap` must equal, bit for bit;
 *   topk      no substitutes;
 *   offload   as topk, and each call lets every expert go (tsr_expert_access.evict), then
 *             loads the ones its tokens chose (load), as an offloading router would;
 *   prefetch  as topk, and each call lets the previous layer's experts go and asks for every
 *             expert of the next layer ahead (prefetch, read on the host's thread);
 *   outside, twice, nan, partial, misshaped
 *             one output the host must refuse: expert n_expert, one expert in two slots, a NaN
 *             weight, two of the three substitutes, a substitute of the wrong shape.
 * `needs` is what needs() returns. With `trace` set, every call appends a record to that file:
 * int32 {layer, next_layer, n_tok, n_expert, n_embd, k, has_prev, and from its init: gating,
 * normalize, n_ff_expert, whether it had the experts' access; then the KiB its loads read},
 * then float hidden (n_tok,
 * n_embd), float gate logits (n_tok, n_expert), float next gate logits (n_tok, n_expert) when
 * given, int32 prev_experts (n_tok, k) when given, int32 experts chosen.
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <tessera/sdk.h>

enum probe_mode { MODE_SWAP, MODE_MOVED, MODE_TOPK, MODE_OFFLOAD, MODE_PREFETCH, MODE_OUTSIDE,
                  MODE_TWICE, MODE_NAN, MODE_PARTIAL, MODE_MISSHAPED };
static const char *const probe_modes[] = {"swap",    "moved", "topk", "offload", "prefetch",
                                          "outside", "twice", "nan",  "partial", "misshaped",
                                          NULL};

typedef struct probe {
    const tsr_host *host;
    tsr_router_init init;
    int32_t mode, needs;
    const char *trace;
    uint64_t loaded; /* bytes the loads of the last call read */
    /* swap: the copies handed back, (n_tok, 3) tensors and their bytes, kept until the next
     * call as the header asks */
    tsr_tensor *copies;
    void **bytes;
    int64_t n_copies;
} probe;

static void probe_drop_copies(probe *p) {
    for (int64_t i = 0; i < p->n_copies; i++) p->host->free(p->host->ctx, p->bytes[i]);
    p->host->free(p->host->ctx, p->copies);
    p->host->free(p->host->ctx, p->bytes);
    p->copies = NULL;
    p->bytes = NULL;
    p->n_copies = 0;
}

static tsr_status probe_create(const tsr_host *host, const tsr_params *params,
                               const tsr_router_init *init, void **out) {
    probe *p = tsr_calloc(host, 1, sizeof *p);
    if (!p) return TSR_E_NOMEM;
    p->host = host;
    p->init = *init;
    p->mode = (int32_t)tsr_param_int(params, "mode");
    p->needs = (int32_t)tsr_param_int(params, "needs");
    p->trace = tsr_param_str(params, "trace");
    if ((p->mode == MODE_SWAP || p->mode == MODE_PARTIAL || p->mode == MODE_MISSHAPED ||
         p->mode == MODE_OFFLOAD || p->mode == MODE_PREFETCH) &&
        !init->experts) {
        host->set_error(host->ctx, "mode %s needs the experts' matrices (init.experts)",
                        probe_modes[p->mode]);
        host->free(host->ctx, p);
        return TSR_E_UNSUPPORTED;
    }
    *out = p;
    return TSR_OK;
}

static void probe_destroy(void *self) {
    probe *p = self;
    probe_drop_copies(p);
    p->host->free(p->host->ctx, p);
}

static int32_t probe_needs(void *self) {
    const probe *p = self;
    return p->needs;
}

/* A copy of `src` the router owns (the bytes of ne[1] rows). */
static tsr_status probe_copy(probe *p, const tsr_tensor *src, int64_t at) {
    size_t n = src->row_bytes * (size_t)src->ne[1];
    p->bytes[at] = p->host->alloc(p->host->ctx, n, 64);
    if (!p->bytes[at]) return TSR_E_NOMEM;
    memcpy(p->bytes[at], src->data, n);
    p->copies[at] = *src;
    p->copies[at].data = p->bytes[at];
    p->copies[at].name = "probe copy";
    p->n_copies = at + 1;
    return TSR_OK;
}

/* The lowest expert none of the token's k slots chose, or x when it chose them all. */
static int32_t probe_unchosen(const int32_t *ids, int32_t k, int32_t x) {
    for (int32_t f = 0; f < x; f++) {
        bool chosen = false;
        for (int32_t s = 0; s < k; s++) chosen |= ids[s] == f;
        if (!chosen) return f;
    }
    return x;
}

static void probe_write(FILE *f, const void *data, size_t size, int64_t n) {
    if (data && n > 0) fwrite(data, size, (size_t)n, f);
}

static void probe_record(const probe *p, const tsr_route_call *c) {
    if (!p->trace || !*p->trace) return;
    FILE *f = fopen(p->trace, "ab");
    if (!f) return;
    const int64_t n = c->n_tok, x = p->init.n_expert, e = p->init.n_embd;
    int32_t head[12] = {c->layer, c->next_gate_logits ? c->next_layer : -1, (int32_t)n,
                        (int32_t)x, (int32_t)e, c->k, c->prev_experts != NULL, p->init.gating,
                        p->init.normalize, p->init.n_ff_expert, p->init.experts != NULL,
                        (int32_t)(p->loaded >> 10)};
    fwrite(head, sizeof head, 1, f);
    probe_write(f, c->hidden, sizeof(float), n * e);
    probe_write(f, c->gate_logits, sizeof(float), n * x);
    probe_write(f, c->next_gate_logits, sizeof(float), head[1] >= 0 ? n * x : 0);
    probe_write(f, c->prev_experts, sizeof(int32_t), n * c->k);
    probe_write(f, c->experts, sizeof(int32_t), n * c->k);
    fclose(f);
}

/* offload: every expert goes, then this layer's chosen ones are loaded; prefetch: the previous
 * layer's experts go and the next layer's are asked for ahead. */
static void probe_move_experts(probe *p, const tsr_route_call *c) {
    const tsr_expert_access *a = p->init.experts;
    const int32_t n_layer = p->init.n_layer, x = p->init.n_expert;
    p->loaded = 0;
    if (p->mode != MODE_OFFLOAD && p->mode != MODE_PREFETCH) return;
    for (int32_t l = 0; l < n_layer; l++)
        for (int32_t e = 0; e < x; e++)
            if (p->mode == MODE_OFFLOAD || l == (c->layer + n_layer - 1) % n_layer)
                a->evict(a->ctx, l, e);
    for (int32_t e = 0; p->mode == MODE_PREFETCH && c->layer + 1 < n_layer && e < x; e++)
        a->prefetch(a->ctx, c->layer + 1, e);
    for (int32_t e = 0; p->mode == MODE_OFFLOAD && e < x; e++) {
        bool chosen = false;
        for (int64_t i = 0; i < c->n_tok * c->k; i++) chosen |= c->experts[i] == e;
        if (chosen) p->loaded += a->load(a->ctx, c->layer, e);
    }
}

static tsr_status probe_route(void *self, const tsr_route_call *c) {
    probe *p = self;
    const int32_t x = p->init.n_expert, k = c->k;
    probe_drop_copies(p);
    if (p->mode == MODE_SWAP || p->mode == MODE_PARTIAL || p->mode == MODE_MISSHAPED) {
        p->copies = tsr_calloc(p->host, (size_t)c->n_tok * 3, sizeof *p->copies);
        p->bytes = tsr_calloc(p->host, (size_t)c->n_tok * 3, sizeof *p->bytes);
        if (!p->copies || !p->bytes) return TSR_E_NOMEM;
    }
    for (int64_t t = 0; t < c->n_tok; t++) {
        const float *g = c->gate_logits + t * x;
        int32_t *ids = c->experts + t * k;
        float *w = c->weights + t * k;
        double sum = 0;
        for (int32_t s = 0; s < k; s++) {
            int32_t best = -1;
            for (int32_t e = 0; e < x; e++) {
                bool taken = false;
                for (int32_t before = 0; before < s; before++) taken |= ids[before] == e;
                if (!taken && (best < 0 || g[e] > g[best])) best = e;
            }
            ids[s] = best;
            w[s] = (float)exp((double)g[best] - g[ids[0]]);
            sum += w[s];
        }
        for (int32_t s = 0; s < k; s++) w[s] = (float)(w[s] / sum);
        int32_t f = probe_unchosen(ids, k, x);
        if (p->mode == MODE_MOVED && f < x) ids[0] = f;
        if (p->mode == MODE_OUTSIDE) ids[0] = x;
        if (p->mode == MODE_TWICE && k > 1) ids[1] = ids[0];
        if (p->mode == MODE_NAN) w[k - 1] = NAN;
        if (!p->copies || f == x) continue;
        tsr_tensor m[3];
        tsr_status st = p->init.experts->matrices(p->init.experts->ctx, c->layer, f, &m[0],
                                                  &m[1], &m[2]);
        for (int i = 0; st >= 0 && i < 3; i++) st = probe_copy(p, &m[i], t * 3 + i);
        if (st < 0) {
            p->host->set_error(p->host->ctx, "layer %d: cannot copy expert %d", c->layer, f);
            return st;
        }
        if (p->mode == MODE_MISSHAPED) p->copies[t * 3 + 1].ne[1]--;
        for (int i = 0; i < (p->mode == MODE_PARTIAL ? 2 : 3); i++)
            c->substitute[t * k * 3 + i] = &p->copies[t * 3 + i];
    }
    probe_move_experts(p, c);
    probe_record(p, c);
    return TSR_OK;
}

static const tsr_param_def probe_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "mode", .type = TSR_PARAM_ENUM, .default_value = "swap",
     .choices = probe_modes, .doc = "what the router does (see the source)"},
    {TSR_SIZED(tsr_param_def), .name = "needs", .type = TSR_PARAM_INT, .default_value = "0",
     .min = 0, .max = 7, .doc = "what needs() returns"},
    {TSR_SIZED(tsr_param_def), .name = "trace", .type = TSR_PARAM_STRING, .default_value = "",
     .doc = "a file every call appends its record to, or empty"},
};

static const tsr_router_vtable probe_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = probe_create,
    .destroy = probe_destroy,
    .route = probe_route,
    .needs = probe_needs,
};

static const tsr_plugin_desc probe_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = "probe",
    .version = "1.0",
    .description = "test router: top-k, substitutes of another expert's matrices, a trace",
    TSR_PARAMS(probe_params),
    .vtable = &probe_vtable,
};

TSR_PLUGIN_EXPORT(&probe_desc)
