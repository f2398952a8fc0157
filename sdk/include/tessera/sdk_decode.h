/*
 * <tessera/sdk_decode.h> -- the generation loop of decoders that emit one token per forward
 * pass (greedy, sampling chains, a custom logits processor): the decoder supplies only its
 * `pick` rule. Header-only, like <tessera/sdk.h>.
 */
#ifndef TESSERA_SDK_DECODE_H
#define TESSERA_SDK_DECODE_H

#include <tessera/common.h>
#include <tessera/decoder.h>

/* The decoder's rule: a token from logits (n_vocab) and the tokens so far (prompt included).
 * The same signature as tsr_decoder_vtable.pick. */
typedef int32_t (*tsr_pick_fn)(void *self, const float *logits, const int32_t *history,
                               int64_t n_history);

/* Runs sequence 0: forwards the whole prompt in one batch (logits of its last entry only),
 * then repeats pick -> emit -> forward of the picked token at the next position. Stops when
 * emit() returns 1, when max_new_tokens tokens were emitted (a negative limit leaves it to
 * emit(); 0 emits nothing) or when the next position would reach n_ctx. Errors: a prompt that
 * is empty or longer than n_ctx, a pick outside the vocabulary, a failed forward (its status
 * is returned as is: the host already holds its explanation). */
static inline tsr_status tsr_generate_one_by_one(const tsr_host *host, const tsr_decode_api *api,
                                                 const tsr_generate_request *req,
                                                 tsr_pick_fn pick, void *self) {
    if (req->n_prompt < 1 || req->n_prompt > api->n_ctx || !req->prompt) {
        host->set_error(host->ctx, "generate: prompt of %lld tokens, expected 1 to n_ctx %d",
                        (long long)req->n_prompt, (int)api->n_ctx);
        return TSR_E_RANGE;
    }
    if (req->max_new_tokens == 0) return TSR_OK;
    /* history (n_ctx + 1): the last token picked is never forwarded */
    int32_t *history = host->alloc(host->ctx, ((size_t)api->n_ctx + 1) * sizeof(int32_t), 0);
    float *logits = host->alloc(host->ctx, (size_t)api->n_vocab * sizeof(float), 0);
    tsr_batch_entry *batch =
        host->alloc(host->ctx, (size_t)req->n_prompt * sizeof(tsr_batch_entry), 0);
    tsr_status st = TSR_OK;
    if (!history || !logits || !batch) {
        host->set_error(host->ctx, "generate: out of memory for a prompt of %lld tokens",
                        (long long)req->n_prompt);
        st = TSR_E_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < req->n_prompt; i++) {
        batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = req->prompt[i],
                                     .want_logits = i == req->n_prompt - 1};
        history[i] = req->prompt[i];
    }
    int64_t n_history = req->n_prompt, n_new = 0;
    st = api->forward(api->ctx, batch, req->n_prompt, logits);
    while (st >= 0) {
        int32_t token = pick(self, logits, history, n_history);
        if (token < 0 || token >= api->n_vocab) {
            host->set_error(host->ctx, "generate: picked token %d outside the vocabulary [0, %d)",
                            (int)token, (int)api->n_vocab);
            st = TSR_E_INTERNAL;
            break;
        }
        history[n_history++] = token;
        n_new++;
        if (api->emit(api->ctx, &token, 1)) break;
        if (req->max_new_tokens > 0 && n_new >= req->max_new_tokens) break;
        if (n_history - 1 >= api->n_ctx) break; /* no position left for this token */
        tsr_batch_entry next = {.seq_id = 0, .pos = (int32_t)(n_history - 1), .token = token,
                                .want_logits = 1};
        st = api->forward(api->ctx, &next, 1, logits);
    }
done:
    host->free(host->ctx, batch);
    host->free(host->ctx, logits);
    host->free(host->ctx, history);
    return st;
}

#endif /* TESSERA_SDK_DECODE_H */
