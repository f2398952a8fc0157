/*
 * decoder 'sample': the sampling chain of <tessera/sdk_sample.h> (llama.cpp's common defaults,
 * applied in its order: repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw from
 * the softmax), one token per forward. Temperature 0 keeps only the highest (penalised) logit,
 * lowest id on ties: greedy.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_decode.h>
#include <tessera/sdk_sample.h>

typedef struct sample {
    tsr_sampler chain;
} sample;

static int32_t sample_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    sample *s = self;
    return tsr_sampler_pick(&s->chain, logits, history, n_history);
}

static tsr_status sample_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    sample *s = self;
    const tsr_host *host = s->chain.host;
    if (api->n_vocab != s->chain.n_vocab) {
        host->set_error(host->ctx, "generate: vocabulary of %d tokens, created for %d",
                        (int)api->n_vocab, (int)s->chain.n_vocab);
        return TSR_E_INVALID;
    }
    tsr_sampler_restart(&s->chain);
    return tsr_generate_one_by_one(host, api, req, tsr_sampler_pick, &s->chain);
}

static void sample_destroy(void *self) {
    sample *s = self;
    const tsr_host *host = s->chain.host;
    tsr_sampler_free(&s->chain);
    host->free(host->ctx, s);
}

static tsr_status sample_create(const tsr_host *host, const tsr_params *params,
                                const tsr_decoder_init *init, void **out) {
    sample *s = host->alloc(host->ctx, sizeof *s, 0);
    if (!s) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_sampler_init(&s->chain, host, params, init->n_vocab);
    if (st < 0) {
        host->free(host->ctx, s);
        return st;
    }
    *out = s;
    return TSR_OK;
}

static const tsr_param_def sample_params[] = {TSR_SAMPLE_PARAM_DEFS};

static const tsr_decoder_vtable sample_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = sample_create,
    .destroy = sample_destroy,
    .generate = sample_generate,
    .pick = sample_pick,
};

static const tsr_plugin_desc sample_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "sample",
    .version = "1.1",
    .description = "sampling chain: repeat penalty, top-k, top-p, min-p, temperature (llama.cpp's "
                   "order)",
    TSR_PARAMS(sample_params),
    .vtable = &sample_vtable,
};

TSR_PLUGIN_EXPORT(&sample_desc)
