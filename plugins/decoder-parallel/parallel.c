/*
 * decoder 'parallel': n samples of one prompt side by side. The prompt runs once on sequence
 * 0, which is then forked into sequences 1 .. n-1 (the cache copies what the prompt stored);
 * every step is one batched forward of the last token of each live sequence. Each sequence
 * draws with the sampling chain of <tessera/sdk_sample.h> from its own history, the draws of
 * one step taken in order of sequence id from one random stream, so that n = 1 is the
 * `sample` decoder token for token. Each sequence is emitted as its own continuation
 * (emit_seq) and stops on its own (end of generation, the token limit).
 *
 * With `ffs` (First Finish Search, Agarwal, Sengupta, Chakraborty 2025, "First Finish Search:
 * Efficient Test-Time Scaling in Large Language Models", arXiv 2505.18149; its synchronous
 * variant, every sample in one batch), the sequences are kept until the first of them
 * finishes (emits an end-of-generation token, or reaches the token limit or the context), and
 * only that one is emitted; the others are dropped. Several finishing at one step: the lowest
 * sequence id wins.
 */
#include <stddef.h>

#include <tessera/sdk.h>
#include <tessera/sdk_sample.h>

#define PARALLEL_MAX 16

typedef struct parallel {
    const tsr_host *host;
    int64_t n;
    int ffs;
    tsr_sampler chain;
} parallel;

/* What a request holds. */
typedef struct seqs {
    int32_t *hist;          /* (n, n_ctx + 1): each sequence's tokens, the prompt first */
    int64_t len[PARALLEL_MAX];
    int live[PARALLEL_MAX];
    tsr_batch_entry *batch; /* (max(n_prompt, n)) */
    float *logits;          /* (n, n_vocab) */
} seqs;

/* Emits sequence i's tokens from `from` on; 1 when the host stops it. */
static int32_t emit_from(const tsr_decode_api *api, const seqs *q, int32_t stride, int64_t i,
                         int64_t from) {
    const int32_t *h = q->hist + i * stride;
    return api->emit_seq(api->ctx, i, h + from, q->len[i] - from);
}

static tsr_status parallel_generate(void *self, const tsr_decode_api *api,
                                    const tsr_generate_request *req) {
    parallel *p = self;
    const tsr_host *host = p->host;
    const int32_t nv = p->chain.n_vocab;
    if (api->n_vocab != nv) {
        host->set_error(host->ctx, "generate: vocabulary of %d tokens, created for %d",
                        (int)api->n_vocab, (int)nv);
        return TSR_E_INVALID;
    }
    if (api->struct_size < offsetof(tsr_decode_api, emit_seq) + sizeof api->emit_seq ||
        !api->emit_seq) {
        host->set_error(host->ctx, "generate: the host has no emit_seq (a host older than "
                        "decoder ABI 1.1)");
        return TSR_E_UNSUPPORTED;
    }
    if (req->n_prompt < 1 || req->n_prompt > api->n_ctx || !req->prompt) {
        host->set_error(host->ctx, "generate: prompt of %lld tokens, expected 1 to n_ctx %d",
                        (long long)req->n_prompt, (int)api->n_ctx);
        return TSR_E_RANGE;
    }
    if (req->max_new_tokens == 0) return TSR_OK;
    tsr_sampler_restart(&p->chain);
    const int64_t n = p->n, n_prompt = req->n_prompt;
    const int32_t stride = api->n_ctx + 1; /* the last token picked is never forwarded */
    const int64_t limit = req->max_new_tokens > 0 ? req->max_new_tokens : api->n_ctx;
    seqs q = {.hist = host->alloc(host->ctx, (size_t)n * (size_t)stride * sizeof(int32_t), 0),
              .batch = host->alloc(host->ctx, (size_t)(n_prompt > n ? n_prompt : n) *
                                                  sizeof(tsr_batch_entry), 0),
              .logits = host->alloc(host->ctx, (size_t)n * (size_t)nv * sizeof(float), 0)};
    tsr_status st = TSR_OK;
    int64_t forked = 0;
    if (!q.hist || !q.batch || !q.logits) {
        host->set_error(host->ctx, "generate: out of memory for %lld sequences", (long long)n);
        st = TSR_E_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < n_prompt; i++)
        q.batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = req->prompt[i],
                                       .want_logits = i == n_prompt - 1};
    if ((st = api->forward(api->ctx, q.batch, n_prompt, q.logits)) < 0) goto done;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t t = 0; t < n_prompt; t++) q.hist[i * stride + t] = req->prompt[t];
        q.len[i] = n_prompt;
        q.live[i] = 1;
        /* Every sequence reads the prompt's logits (row 0) for its first token. */
        if (i > 0 && (st = api->seq_fork(api->ctx, 0, i)) < 0) goto done;
        forked = i;
    }
    int64_t row_of[PARALLEL_MAX] = {0}; /* each live sequence's row of logits */
    for (int64_t n_live = n; n_live > 0;) {
        int64_t finished = -1;
        for (int64_t i = 0; i < n; i++) {
            if (!q.live[i]) continue;
            int32_t *h = q.hist + i * stride;
            h[q.len[i]] = tsr_sampler_pick(&p->chain, q.logits + row_of[i] * nv, h, q.len[i]);
            q.len[i]++;
            int64_t made = q.len[i] - n_prompt;
            /* No position is left for this token, or the limit is reached: it is the last. */
            int last = made >= limit || q.len[i] > api->n_ctx;
            if (p->ffs) {
                if (finished < 0 && (last || api->is_eog(api->ctx, h[q.len[i] - 1])))
                    finished = i;
            } else if (emit_from(api, &q, stride, i, q.len[i] - 1) || last) {
                q.live[i] = 0;
                n_live--;
            }
        }
        if (finished >= 0) {
            emit_from(api, &q, stride, finished, n_prompt);
            break;
        }
        int64_t n_batch = 0;
        for (int64_t i = 0; i < n; i++) {
            if (!q.live[i]) continue;
            row_of[i] = n_batch;
            q.batch[n_batch++] = (tsr_batch_entry){.seq_id = i, .pos = (int32_t)q.len[i] - 1,
                                                   .token = q.hist[i * stride + q.len[i] - 1],
                                                   .want_logits = 1};
        }
        if (n_batch > 0 && (st = api->forward(api->ctx, q.batch, n_batch, q.logits)) < 0) break;
    }
done:
    for (int64_t i = 1; i <= forked; i++) api->seq_end(api->ctx, i);
    host->free(host->ctx, q.hist);
    host->free(host->ctx, q.batch);
    host->free(host->ctx, q.logits);
    return st;
}

static int32_t parallel_pick(void *self, const float *logits, const int32_t *history,
                             int64_t n_history) {
    parallel *p = self;
    return tsr_sampler_pick(&p->chain, logits, history, n_history);
}

static void parallel_destroy(void *self) {
    parallel *p = self;
    tsr_sampler_free(&p->chain);
    p->host->free(p->host->ctx, p);
}

static tsr_status parallel_create(const tsr_host *host, const tsr_params *params,
                                  const tsr_decoder_init *init, void **out) {
    parallel *p = tsr_calloc(host, 1, sizeof *p);
    if (!p) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_sampler_init(&p->chain, host, params, init->n_vocab);
    if (st < 0) {
        host->free(host->ctx, p);
        return st;
    }
    p->host = host;
    p->n = tsr_param_int(params, "n");
    p->ffs = tsr_param_bool(params, "ffs");
    *out = p;
    return TSR_OK;
}

static const tsr_param_def parallel_params[] = {
    TSR_SAMPLE_PARAM_DEFS,
    {TSR_SIZED(tsr_param_def), .name = "n", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 1, .max = PARALLEL_MAX, .unit = "sequences", .role = TSR_PARAM_ROLE_PARALLEL,
     .doc = "continuations sampled side by side from the prompt, one batched forward a step"},
    {TSR_SIZED(tsr_param_def), .name = "ffs", .type = TSR_PARAM_BOOL, .default_value = "false",
     .doc = "First Finish Search: emit only the first sequence to finish"},
};

static const tsr_decoder_vtable parallel_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = parallel_create,
    .destroy = parallel_destroy,
    .generate = parallel_generate,
    .pick = parallel_pick,
};

static const tsr_plugin_desc parallel_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "parallel",
    .version = "1.0",
    .description = "n samples of one prompt in one batch (fork after the prompt); First Finish "
                   "Search as an option",
    TSR_PARAMS(parallel_params),
    .vtable = &parallel_vtable,
};

TSR_PLUGIN_EXPORT(&parallel_desc)
