/*
 * decoder 'speculative': speculative decoding with the pipeline's draft model (a second model
 * on the target's vocabulary, or the target's own with some layers skipped).
 *
 * Each round the draft proposes up to k tokens one by one; the target runs the last accepted
 * token and every proposal in one batched forward, which gives its own distribution at each
 * of them; the longest acceptable prefix is kept, the target supplies one more token (the
 * correction at the first rejection, or a bonus token after k acceptances), and both models
 * roll back what was rejected with seq_truncate. Every round costs one target forward and
 * yields between 1 and k + 1 tokens.
 *
 * Acceptance (the target's sampling chain of <tessera/sdk_sample.h>, the draft drafting with
 * the same chain):
 *   - temperature 0: a proposal is kept when it is the target's own greedy choice, so the
 *     tokens are greedy's exactly;
 *   - temperature > 0: speculative sampling (Leviathan, Kalman, Matias 2023, "Fast Inference
 *     from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
 *     Language Model Decoding with Speculative Sampling"): proposal x drawn from the draft's
 *     distribution q is kept with probability min(1, p(x) / q(x)) where p is the target's;
 *     at the first rejection the token is drawn from max(0, p - q) normalised. The tokens are
 *     distributed exactly as the target's chain alone would draw them.
 *
 * Draft length: k fixed, or adaptive (SpecDec++, Huang, Guo, Wang 2024, "SpecDec++: Boosting
 * Speculative Decoding via Adaptive Candidate Lengths"): drafting stops once the probability
 * that at least one proposal of the round is rejected, 1 - prod(a_i), exceeds stop_threshold.
 * The paper predicts each acceptance a_i with a trained head; here a_i is the draft's own
 * confidence, the probability its distribution gives the token it proposed.
 */
#include <math.h>
#include <stddef.h>

#include <tessera/sdk.h>
#include <tessera/sdk_sample.h>

typedef struct spec {
    const tsr_host *host;
    int32_t n_vocab, n_ctx;
    int64_t k;
    int adaptive;
    double stop_threshold;
    tsr_sampler chain;  /* one chain and one random stream for drafting and verifying */
    tsr_decoder_stats stats;
    float *q;           /* (k, n_vocab) the draft's distribution at each proposal */
    float *p;           /* (n_vocab) the target's at the proposal being verified */
} spec;

/* What one request holds: the tokens so far, the batch and the logits of both models. */
typedef struct round_buf {
    int32_t *hist;          /* (n_ctx + k + 1) the tokens at positions 0, 1, ... */
    tsr_batch_entry *batch; /* (max(n_prompt, n_ctx) + 1) */
    float *target;          /* (k + 1, n_vocab) */
    float *draft;           /* (n_vocab) */
} round_buf;

static uint64_t now(const spec *s) {
    return TSR_HOST_HAS(s->host, now_ns) ? s->host->now_ns(s->host->ctx) : 0;
}

/* The softmax probability of `token` under raw logits (n): the draft's confidence in a token
 * it chose greedily. */
static double softmax_at(const float *logits, int32_t n, int32_t token) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) sum += exp((double)logits[i] - logits[token]);
    return 1.0 / sum;
}

/* Runs `n` tokens of `tokens` from position `pos` on sequence 0 of `api`, the logits of every
 * entry (want_all) or of the last only. */
static tsr_status run_tokens(const tsr_decode_api *api, tsr_batch_entry *batch,
                             const int32_t *tokens, int64_t n, int32_t pos, int want_all,
                             float *logits) {
    for (int64_t i = 0; i < n; i++)
        batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = pos + (int32_t)i, .token = tokens[i],
                                     .want_logits = want_all || i == n - 1};
    return api->forward(api->ctx, batch, n, logits);
}

/* Proposes up to `k_round` tokens after hist[0..n] (x = hist[n]) into hist[n + 1...], their
 * draft distributions into s->q when sampling; the draft holds *dn positions before and
 * after. Returns the number proposed in *m. */
static tsr_status draft_round(spec *s, const tsr_decode_api *d, round_buf *b, int32_t n,
                              int64_t k_round, int32_t *dn, int64_t *m) {
    const int sampling = s->chain.temperature > 0.0;
    double all_accepted = 1.0;
    tsr_status st = run_tokens(d, b->batch, b->hist + *dn, n + 1 - *dn, *dn, 0, b->draft);
    *dn = n + 1;
    for (*m = 0; st >= 0 && *m < k_round;) {
        tsr_sampler_apply(&s->chain, b->draft, b->hist, n + 1 + *m);
        int32_t token = tsr_sampler_draw(&s->chain);
        double confidence;
        if (sampling) {
            tsr_sampler_probs(&s->chain, s->q + *m * s->n_vocab);
            confidence = s->q[*m * s->n_vocab + token];
        } else {
            confidence = softmax_at(b->draft, s->n_vocab, token);
        }
        b->hist[n + 1 + *m] = token;
        ++*m;
        all_accepted *= confidence;
        if (*m == k_round || (s->adaptive && 1.0 - all_accepted > s->stop_threshold)) break;
        st = run_tokens(d, b->batch, &token, 1, n + *m, 0, b->draft);
        *dn = n + 1 + (int32_t)*m;
    }
    return st;
}

/* Verifies the m proposals hist[n + 1 .. n + m] against the target's logits (m + 1 rows):
 * *a of them accepted, then hist[n + a + 1] the target's own token. */
static void verify(spec *s, round_buf *b, int32_t n, int64_t m, int64_t *a) {
    const int sampling = s->chain.temperature > 0.0;
    const int32_t nv = s->n_vocab;
    for (*a = 0; *a < m; ++*a) {
        const float *row = b->target + *a * nv;
        int32_t proposed = b->hist[n + 1 + *a];
        tsr_sampler_apply(&s->chain, row, b->hist, n + 1 + *a);
        if (!sampling) {
            int32_t own = tsr_sampler_draw(&s->chain);
            if (own == proposed) continue;
            b->hist[n + 1 + *a] = own;
            return;
        }
        const float *q = s->q + *a * nv;
        tsr_sampler_probs(&s->chain, s->p);
        double ratio = (double)s->p[proposed] / (double)q[proposed];
        if (tsr_pcg32_uniform(&s->chain.rng) < ratio) continue;
        /* Rejected: the residual max(0, p - q) holds what the draft under-proposed. It is
         * empty only when p equals q, where nothing is ever rejected. */
        double residual = 0.0;
        for (int32_t v = 0; v < nv; v++) {
            s->p[v] = s->p[v] > q[v] ? s->p[v] - q[v] : 0.0f;
            residual += s->p[v];
        }
        b->hist[n + 1 + *a] = residual > 0.0 ? tsr_sampler_draw_weights(&s->chain, s->p, nv)
                                             : tsr_sampler_draw(&s->chain);
        return;
    }
    tsr_sampler_apply(&s->chain, b->target + m * nv, b->hist, n + 1 + m);
    b->hist[n + 1 + m] = tsr_sampler_draw(&s->chain);
}

static tsr_status spec_generate(void *self, const tsr_decode_api *api,
                                const tsr_generate_request *req) {
    spec *s = self;
    const tsr_host *host = s->host;
    const tsr_decode_api *d =
        api->struct_size >= offsetof(tsr_decode_api, draft) + sizeof api->draft ? api->draft : NULL;
    s->stats = (tsr_decoder_stats){.struct_size = sizeof s->stats};
    if (!d) {
        host->set_error(host->ctx, "generate: the host gave no draft model (api->draft is NULL)");
        return TSR_E_STATE;
    }
    if (api->n_vocab != s->n_vocab || d->n_vocab != s->n_vocab) {
        host->set_error(host->ctx, "generate: vocabularies of %d (target) and %d (draft) tokens, "
                        "created for %d", (int)api->n_vocab, (int)d->n_vocab, (int)s->n_vocab);
        return TSR_E_INVALID;
    }
    const int32_t n_ctx = api->n_ctx < d->n_ctx ? api->n_ctx : d->n_ctx;
    if (req->n_prompt < 1 || req->n_prompt > n_ctx || !req->prompt) {
        host->set_error(host->ctx, "generate: prompt of %lld tokens, expected 1 to n_ctx %d",
                        (long long)req->n_prompt, (int)n_ctx);
        return TSR_E_RANGE;
    }
    if (req->max_new_tokens == 0) return TSR_OK;
    tsr_sampler_restart(&s->chain);
    const int32_t nv = s->n_vocab;
    round_buf b = {
        .hist = host->alloc(host->ctx, ((size_t)n_ctx + (size_t)s->k + 2) * sizeof(int32_t), 0),
        .batch = host->alloc(host->ctx, ((size_t)n_ctx + 1) * sizeof(tsr_batch_entry), 0),
        .target = host->alloc(host->ctx, ((size_t)s->k + 1) * (size_t)nv * sizeof(float), 0),
        .draft = host->alloc(host->ctx, (size_t)nv * sizeof(float), 0)};
    tsr_status st = TSR_OK;
    if (!b.hist || !b.batch || !b.target || !b.draft) {
        host->set_error(host->ctx, "generate: out of memory for a context of %d", (int)n_ctx);
        st = TSR_E_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < req->n_prompt; i++) b.hist[i] = req->prompt[i];
    /* The prompt on the target alone: its first token needs no draft. The draft reads the
     * prompt with its first round. */
    int32_t n = (int32_t)req->n_prompt - 1, dn = 0;
    if ((st = run_tokens(api, b.batch, b.hist, n + 1, 0, 0, b.target)) < 0) goto done;
    tsr_sampler_apply(&s->chain, b.target, b.hist, n + 1);
    b.hist[++n] = tsr_sampler_draw(&s->chain);
    int64_t left = req->max_new_tokens > 0 ? req->max_new_tokens : INT64_MAX;
    if (api->emit(api->ctx, &b.hist[n], 1) || --left == 0) goto done;
    /* Now hist[n] is the last token, on neither model yet. */
    while (n < n_ctx) {
        int64_t k_round = s->k;
        if (k_round > left - 1) k_round = left - 1;
        if (k_round > n_ctx - 1 - n) k_round = n_ctx - 1 - n;
        int64_t m = 0, a;
        uint64_t t0 = now(s);
        if (k_round > 0 && (st = draft_round(s, d, &b, n, k_round, &dn, &m)) < 0) break;
        uint64_t t1 = now(s);
        if ((st = run_tokens(api, b.batch, b.hist + n, m + 1, n, 1, b.target)) < 0) break;
        s->stats.draft_ns += t1 - t0;
        s->stats.verify_ns += now(s) - t1;
        verify(s, &b, n, m, &a);
        s->stats.drafted += m;
        s->stats.accepted += a;
        for (int64_t i = 0; i < m; i++) {
            s->stats.proposed_at[i]++;
            s->stats.accepted_at[i] += i < a;
        }
        if (api->emit(api->ctx, b.hist + n + 1, a + 1)) break;
        left -= a + 1;
        /* The target holds x and the m proposals; the draft x and the first m - 1. */
        if (a < m && (st = api->seq_truncate(api->ctx, 0, n + 1 + (int32_t)a)) < 0) break;
        if (dn > n + 1 + a && (st = d->seq_truncate(d->ctx, 0, n + 1 + (int32_t)a)) < 0) break;
        if (dn > n + 1 + a) dn = n + 1 + (int32_t)a;
        n += (int32_t)a + 1;
        if (left <= 0) break;
    }
done:
    host->free(host->ctx, b.hist);
    host->free(host->ctx, b.batch);
    host->free(host->ctx, b.target);
    host->free(host->ctx, b.draft);
    return st;
}

static int32_t spec_pick(void *self, const float *logits, const int32_t *history,
                         int64_t n_history) {
    spec *s = self;
    return tsr_sampler_pick(&s->chain, logits, history, n_history);
}

static void spec_stats(void *self, tsr_decoder_stats *out) {
    const spec *s = self;
    uint32_t size = out->struct_size;
    /* A host older than this plugin knows fewer fields: write what it has room for. */
    memcpy(out, &s->stats, size < sizeof s->stats ? size : sizeof s->stats);
    out->struct_size = size;
}

static void spec_destroy(void *self) {
    spec *s = self;
    tsr_sampler_free(&s->chain);
    s->host->free(s->host->ctx, s->q);
    s->host->free(s->host->ctx, s->p);
    s->host->free(s->host->ctx, s);
}

static tsr_status spec_create(const tsr_host *host, const tsr_params *params,
                              const tsr_decoder_init *init, void **out) {
    int has_draft = init->struct_size >= offsetof(tsr_decoder_init, has_draft) +
                                             sizeof init->has_draft && init->has_draft;
    int64_t k = tsr_param_int(params, "k");
    if (!has_draft) {
        host->set_error(host->ctx, "needs a draft model: the pipeline has no draft: section "
                        "(draft.model, or draft.skip_layers for a self-draft)");
        return TSR_E_INVALID;
    }
    if (k >= init->n_ctx) {
        host->set_error(host->ctx, "k %lld: a round verifies k + 1 positions, more than the "
                        "context of %d", (long long)k, (int)init->n_ctx);
        return TSR_E_INVALID;
    }
    spec *s = tsr_calloc(host, 1, sizeof *s);
    if (!s) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_sampler_init(&s->chain, host, params, init->n_vocab);
    if (st < 0) {
        host->free(host->ctx, s);
        return st;
    }
    s->host = host;
    s->n_vocab = init->n_vocab;
    s->n_ctx = init->n_ctx;
    s->k = k;
    s->adaptive = tsr_param_bool(params, "adaptive");
    s->stop_threshold = tsr_param_float(params, "stop_threshold");
    s->stats.struct_size = sizeof s->stats;
    /* The draft's distributions are kept only when sampling: greedy compares tokens. */
    size_t q_floats = s->chain.temperature > 0.0 ? (size_t)k * (size_t)init->n_vocab : 1;
    s->q = host->alloc(host->ctx, q_floats * sizeof(float), 0);
    s->p = host->alloc(host->ctx, (size_t)init->n_vocab * sizeof(float), 0);
    if (!s->q || !s->p) {
        spec_destroy(s);
        host->set_error(host->ctx, "out of memory for %lld draft distributions of %d tokens",
                        (long long)k, (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    *out = s;
    return TSR_OK;
}

static const tsr_param_def spec_params[] = {
    TSR_SAMPLE_PARAM_DEFS,
    {TSR_SIZED(tsr_param_def), .name = "k", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 1, .max = TSR_DECODER_MAX_DRAFT, .unit = "tokens",
     .doc = "tokens the draft proposes per round (at most, when adaptive)"},
    {TSR_SIZED(tsr_param_def), .name = "adaptive", .type = TSR_PARAM_BOOL,
     .default_value = "false",
     .doc = "SpecDec++: stop a round once P(some proposal rejected) > stop_threshold"},
    {TSR_SIZED(tsr_param_def), .name = "stop_threshold", .type = TSR_PARAM_FLOAT,
     .default_value = "0.5", .min = 0, .max = 1,
     .doc = "adaptive: the rejection probability, from the draft's confidence, that ends a round"},
};

static const tsr_decoder_vtable spec_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = spec_create,
    .destroy = spec_destroy,
    .generate = spec_generate,
    .pick = spec_pick,
    .stats = spec_stats,
    .draft_use = TSR_DECODER_DRAFT_REQUIRED,
};

static const tsr_plugin_desc spec_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "speculative",
    .version = "1.0",
    .description = "draft k tokens with the draft model, verify them in one target forward "
                   "(greedy or lossless speculative sampling; SpecDec++ adaptive length)",
    TSR_PARAMS(spec_params),
    .vtable = &spec_vtable,
};

TSR_PLUGIN_EXPORT(&spec_desc)
