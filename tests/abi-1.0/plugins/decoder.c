/* decoder 'abi10-greedy' (frozen 1.0): the most likely token, one forward per token. */
#include <tessera/decoder.h>

#include "frozen.h"

typedef struct fdec {
    const tsr_host *host;
    int32_t n_vocab;
    float *logits; /* (n_vocab) */
} fdec;

static tsr_status fd_create(const tsr_host *host, const tsr_params *params,
                            const tsr_decoder_init *init, void **out) {
    (void)params;
    fdec *d = frozen_zalloc(host, sizeof *d);
    float *logits = d && init->n_vocab > 0
                        ? frozen_zalloc(host, (size_t)init->n_vocab * sizeof *logits)
                        : NULL;
    if (!logits) {
        if (d) host->free(host->ctx, d);
        host->set_error(host->ctx, "n_vocab %d: out of memory or empty", (int)init->n_vocab);
        return TSR_E_INVALID;
    }
    *d = (fdec){host, init->n_vocab, logits};
    *out = d;
    return TSR_OK;
}

static void fd_destroy(void *self) {
    fdec *d = self;
    d->host->free(d->host->ctx, d->logits);
    d->host->free(d->host->ctx, d);
}

/* The lowest id among the largest finite logits. */
static int32_t fd_pick(void *self, const float *logits, const int32_t *history,
                       int64_t n_history) {
    (void)history;
    (void)n_history;
    fdec *d = self;
    int32_t best = 0;
    for (int32_t i = 1; i < d->n_vocab; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

static tsr_status fd_generate(void *self, const tsr_decode_api *api,
                              const tsr_generate_request *req) {
    fdec *d = self;
    tsr_batch_entry e = {.seq_id = 0};
    for (int64_t i = 0; i < req->n_prompt; i++) {
        e = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = req->prompt[i],
                              .want_logits = i + 1 == req->n_prompt};
        tsr_status st = api->forward(api->ctx, &e, 1, e.want_logits ? d->logits : NULL);
        if (st < 0) return st;
    }
    for (int32_t pos = (int32_t)req->n_prompt;; pos++) {
        int32_t token = fd_pick(d, d->logits, NULL, 0);
        if (api->emit(api->ctx, &token, 1) || pos >= api->n_ctx) return TSR_OK;
        e = (tsr_batch_entry){.seq_id = 0, .pos = pos, .token = token, .want_logits = 1};
        tsr_status st = api->forward(api->ctx, &e, 1, d->logits);
        if (st < 0) return st;
    }
}

static const tsr_decoder_vtable fd_vtable = {.struct_size = sizeof(tsr_decoder_vtable),
                                             .create = fd_create, .destroy = fd_destroy,
                                             .generate = fd_generate, .pick = fd_pick};

static const tsr_plugin_desc fd_desc = {
    .struct_size = sizeof(tsr_plugin_desc), .stage = TSR_STAGE_DECODER, .stage_major = 1,
    .stage_minor_needed = 0, .name = "abi10-greedy", .version = "1.0",
    .description = "frozen ABI 1.0 decoder: greedy, one token per forward",
    .vtable = &fd_vtable};

FROZEN_EXPORT(fd_desc)
