/*
 * Fixture plugins that each break one rule of abi/CONTRACT.md, for testing that the
 * conformance runner catches it (tests/sdk/expect-failures.sh compares the FAIL lines with
 * bad_plugins.expected). Everything not broken on purpose is done right, so that no other
 * check fails.
 */
#include <tessera/sdk.h>

/* ---- decoders ------------------------------------------------------------------------- */

typedef struct dec {
    const tsr_host *host;
    void *extra; /* bad-leak: a second block it forgets to free */
} dec;

static tsr_status dec_create(const tsr_host *host, const tsr_params *p,
                             const tsr_decoder_init *init, void **out) {
    dec *d = tsr_calloc(host, 1, sizeof *d);
    if (!d) return TSR_E_NOMEM;
    d->host = host;
    *out = d;
    return TSR_OK;
}

static void dec_destroy(void *self) {
    dec *d = self;
    d->host->free(d->host->ctx, d);
}

/* Prefill, then one forward per token as a greedy decoder would, always choosing `token`
 * (which the caller may put out of range), and obeying emit() unless `ignore_stop`. */
static tsr_status dec_run(const tsr_decode_api *api, const tsr_generate_request *req,
                          int32_t token, int ignore_stop) {
    tsr_batch_entry e;
    int32_t pos = 0;
    float row[4096];
    if (api->n_vocab > 4096) return TSR_E_RANGE;
    for (int64_t i = 0; i < req->n_prompt; i++) {
        e = (tsr_batch_entry){0, pos++, req->prompt[i], 1};
        tsr_status st = api->forward(api->ctx, &e, 1, row);
        if (st < 0) return st;
    }
    for (int n = 0; n < 20; n++) {
        if (api->emit(api->ctx, &token, 1) && !ignore_stop) break;
        e = (tsr_batch_entry){0, pos++, token < api->n_vocab ? token : 0, 1};
        tsr_status st = api->forward(api->ctx, &e, 1, row);
        if (st < 0) return st;
    }
    return TSR_OK;
}

static tsr_status vocab_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    return dec_run(api, req, api->n_vocab, 0); /* one past the last token id */
}

static tsr_status runaway_generate(void *self, const tsr_decode_api *api,
                                   const tsr_generate_request *req) {
    return dec_run(api, req, 1, 1);
}

static tsr_status fine_generate(void *self, const tsr_decode_api *api,
                                const tsr_generate_request *req) {
    return dec_run(api, req, 1, 0);
}

static tsr_status leak_create(const tsr_host *host, const tsr_params *p,
                              const tsr_decoder_init *init, void **out) {
    tsr_status st = dec_create(host, p, init, out);
    if (st < 0) return st;
    ((dec *)*out)->extra = host->alloc(host->ctx, 100, 0);
    return TSR_OK;
}

static tsr_status crash_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    volatile int32_t *nowhere = NULL;
    *nowhere = 1;
    return TSR_OK;
}

#define DECODER(id, create_fn, generate_fn, what)                                           \
    static const tsr_decoder_vtable id##_vt = {TSR_SIZED(tsr_decoder_vtable),                \
                                               .create = create_fn, .destroy = dec_destroy,  \
                                               .generate = generate_fn};                     \
    static const tsr_plugin_desc id = {TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),        \
                                       .name = "bad-" #id, .version = "0", .description = what, \
                                       .vtable = &id##_vt};

DECODER(vocab, dec_create, vocab_generate, "emits a token id equal to n_vocab")
DECODER(runaway, dec_create, runaway_generate, "keeps generating after emit() says stop")
DECODER(leak, leak_create, fine_generate, "leaves 100 bytes allocated at destroy")
DECODER(crash, dec_create, crash_generate, "writes through a NULL pointer in generate")

/* A parameter whose default lies outside its own range: the loader refuses this plugin. */
static const tsr_param_def bad_default_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "0",
     .min = 1, .max = 8, .doc = "a window"},
};
static const tsr_plugin_desc param = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-param", .version = "0",
    .description = "default value out of its range", TSR_PARAMS(bad_default_params),
    .vtable = &vocab_vt};

/* ---- cache: exposes one entry more than was stored -------------------------------------- */

enum { CACHE_CAP = 64 };

typedef struct cache {
    const tsr_host *host;
    int32_t n_kv_head, head_dim;
    int64_t n;
    int32_t pos[CACHE_CAP + 1];
    float *zeros; /* (CACHE_CAP + 1, head_dim) */
} cache;

static tsr_status cache_create(const tsr_host *host, const tsr_params *p,
                               const tsr_cache_init *init, void **out) {
    cache *c = tsr_calloc(host, 1, sizeof *c);
    if (!c) return TSR_E_NOMEM;
    c->host = host;
    c->n_kv_head = init->n_kv_head;
    c->head_dim = init->head_dim;
    c->zeros = tsr_calloc(host, (size_t)(CACHE_CAP + 1) * init->head_dim, sizeof(float));
    for (int i = 0; i <= CACHE_CAP; i++) c->pos[i] = i;
    *out = c;
    return TSR_OK;
}

static void cache_destroy(void *self) {
    cache *c = self;
    c->host->free(c->host->ctx, c->zeros);
    c->host->free(c->host->ctx, c);
}

static tsr_status cache_seq_begin(void *self, int64_t seq) {
    ((cache *)self)->n = 0;
    return TSR_OK;
}

static void cache_seq_end(void *self, int64_t seq) { ((cache *)self)->n = 0; }

static tsr_status cache_store(void *self, const tsr_kv_write *w) {
    cache *c = self;
    if (w->layer == 0) c->n += w->n;
    return c->n > CACHE_CAP ? TSR_E_RANGE : TSR_OK;
}

static tsr_status cache_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                             tsr_kv_view *views) {
    cache *c = self;
    for (int32_t h = 0; h < c->n_kv_head; h++) {
        size_t stride = (size_t)c->head_dim * sizeof(float);
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = c->n + 1, .pos = c->pos,
                                 .dtype = TSR_DTYPE_F32, .k = c->zeros, .v = c->zeros,
                                 .k_stride = stride, .v_stride = stride};
    }
    return TSR_OK;
}

static const tsr_cache_vtable cache_vt = {
    TSR_SIZED(tsr_cache_vtable), .create = cache_create, .destroy = cache_destroy,
    .seq_begin = cache_seq_begin, .seq_end = cache_seq_end, .store = cache_store,
    .view = cache_view};
static const tsr_plugin_desc cache_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE), .name = "bad-cache", .version = "0",
    .description = "exposes one entry more than was stored", .vtable = &cache_vt};

/* ---- attention: the plain mean of every value, no softmax, no causal mask ----------------- */

typedef struct attn {
    const tsr_host *host;
    tsr_attention_init init;
} attn;

static tsr_status attn_create(const tsr_host *host, const tsr_params *p,
                              const tsr_attention_init *init, void **out) {
    attn *a = tsr_calloc(host, 1, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->host = host;
    a->init = *init;
    *out = a;
    return TSR_OK;
}

static void attn_destroy(void *self) {
    attn *a = self;
    a->host->free(a->host->ctx, a);
}

static tsr_status attn_forward(void *self, const tsr_attention_call *call) {
    const attn *a = self;
    const int32_t hd = a->init.head_dim, group = a->init.n_head / a->init.n_kv_head;
    for (int64_t t = 0; t < call->n_q; t++)
        for (int32_t h = 0; h < a->init.n_head; h++) {
            const tsr_kv_view *v = &call->views[h / group];
            float *o = call->out + ((size_t)t * a->init.n_head + h) * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = 0;
            for (int64_t j = 0; j < v->n; j++) {
                const float *row = (const float *)((const char *)v->v + (size_t)j * v->v_stride);
                for (int32_t i = 0; i < hd; i++) o[i] += row[i] / (float)v->n;
            }
        }
    return TSR_OK;
}

static const tsr_attention_vtable attn_vt = {
    TSR_SIZED(tsr_attention_vtable), .create = attn_create, .destroy = attn_destroy,
    .forward = attn_forward};
static const tsr_plugin_desc attention_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION), .name = "bad-attention",
    .version = "0", .description = "averages every value, ignoring scores and causality",
    .vtable = &attn_vt};

/* ---- router: picks an expert that does not exist ---------------------------------------- */

typedef struct router {
    const tsr_host *host;
    int32_t n_expert;
} router;

static tsr_status router_create(const tsr_host *host, const tsr_params *p,
                                const tsr_router_init *init, void **out) {
    router *r = tsr_calloc(host, 1, sizeof *r);
    if (!r) return TSR_E_NOMEM;
    r->host = host;
    r->n_expert = init->n_expert;
    *out = r;
    return TSR_OK;
}

static void router_destroy(void *self) {
    router *r = self;
    r->host->free(r->host->ctx, r);
}

static tsr_status router_route(void *self, const tsr_route_call *call) {
    const router *r = self;
    for (int64_t i = 0; i < call->n_tok * call->k; i++) {
        call->experts[i] = i % call->k == 0 ? r->n_expert : -1;
        call->weights[i] = 1.0f;
    }
    return TSR_OK;
}

static const tsr_router_vtable router_vt = {
    TSR_SIZED(tsr_router_vtable), .create = router_create, .destroy = router_destroy,
    .route = router_route};
static const tsr_plugin_desc router_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER), .name = "bad-router", .version = "0",
    .description = "routes to expert n_expert", .vtable = &router_vt};

/* ---- quantizer: keeps F32 in place but dequantizes to zeros -------------------------------- */

typedef struct quant {
    const tsr_host *host;
} quant;

static tsr_status quant_create(const tsr_host *host, const tsr_params *p,
                               const tsr_quantizer_init *init, void **out) {
    quant *q = tsr_calloc(host, 1, sizeof *q);
    if (!q) return TSR_E_NOMEM;
    q->host = host;
    *out = q;
    return TSR_OK;
}

static void quant_destroy(void *self) {
    quant *q = self;
    q->host->free(q->host->ctx, q);
}

static tsr_status quant_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    out->dst = in->src;
    out->bits_per_weight = 32;
    out->rel_rmse = 0;
    out->owns_data = 0;
    return TSR_OK;
}

static void quant_release(void *self, tsr_tensor *w) {}

static tsr_status quant_dequantize(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                   int64_t n_rows) {
    for (int64_t i = 0; i < n_rows * w->ne[0]; i++) y[i] = 0;
    return TSR_OK;
}

static const tsr_quantizer_vtable quant_vt = {
    TSR_SIZED(tsr_quantizer_vtable), .create = quant_create, .destroy = quant_destroy,
    .prepare = quant_prepare, .release = quant_release, .dequantize_rows = quant_dequantize};
static const tsr_plugin_desc quantizer_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_QUANTIZER, QUANTIZER), .name = "bad-quantizer", .version = "0",
    .description = "dequantizes every weight to zero", .vtable = &quant_vt};

TSR_PLUGIN_EXPORT(&vocab, &runaway, &leak, &crash, &param, &cache_desc, &attention_desc,
                  &router_desc, &quantizer_desc)
