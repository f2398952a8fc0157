/*
 * decoder 'greedy': always the most likely next token (the highest logit; on a tie the lowest
 * token id, so runs are reproducible across machines). One forward per token.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_decode.h>
#include <tessera/sdk_draft.h>

typedef struct greedy {
    const tsr_host *host;
    int32_t n_vocab;
} greedy;

static int32_t greedy_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    return tsr_argmax(logits, ((const greedy *)self)->n_vocab);
}

static tsr_status greedy_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    greedy *g = self;
    if (api->n_vocab != g->n_vocab) {
        g->host->set_error(g->host->ctx, "generate: vocabulary of %d tokens, created for %d",
                           (int)api->n_vocab, (int)g->n_vocab);
        return TSR_E_INVALID;
    }
    return tsr_generate_one_by_one(g->host, api, req, greedy_pick, g);
}

static tsr_status greedy_create(const tsr_host *host, const tsr_params *params,
                                const tsr_decoder_init *init, void **out) {
    if (init->n_vocab <= 0) {
        host->set_error(host->ctx, "n_vocab %d: expected a positive vocabulary size",
                        (int)init->n_vocab);
        return TSR_E_INVALID;
    }
    greedy *g = tsr_calloc(host, 1, sizeof *g);
    if (!g) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    g->host = host;
    g->n_vocab = init->n_vocab;
    *out = g;
    return TSR_OK;
}

static void greedy_destroy(void *self) {
    greedy *g = self;
    g->host->free(g->host->ctx, g);
}

static const tsr_decoder_vtable greedy_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = greedy_create,
    .destroy = greedy_destroy,
    .generate = greedy_generate,
    .pick = greedy_pick,
};

static const tsr_plugin_desc greedy_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "greedy",
    .version = "1.0",
    .description = "argmax of the logits (lowest id on ties), one token per forward",
    .vtable = &greedy_vtable,
};

TSR_PLUGIN_EXPORT(&greedy_desc)
