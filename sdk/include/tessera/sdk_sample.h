/*
 * <tessera/sdk_sample.h> -- the sampling chain of llama.cpp's common defaults, for every decoder
 * that samples (the `sample` decoder, speculative verification, parallel sampling), so that
 * they all draw from the same distribution:
 *   repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw from the softmax.
 * Temperature 0 keeps only the highest (penalised) logit, lowest id on ties: greedy.
 *
 * The chain is split in two so that a decoder can read the distribution it draws from
 * (speculative sampling accepts a drafted token with probability p/q): tsr_sampler_apply()
 * leaves the surviving candidates with their weights, tsr_sampler_draw() draws one of them.
 * The parameters are a table fragment (TSR_SAMPLE_PARAM_DEFS) a decoder puts in its own table.
 *
 * Randomness is PCG32 (O'Neill 2014, "PCG: A Family of Simple Fast Space-Efficient
 * Statistically Good Algorithms for Random Number Generation") held in the sampler: two
 * samplers never share state, and with a fixed seed tsr_sampler_restart() starts the stream
 * afresh, so the same request gives the same tokens (rule DEC_4). Header-only.
 */
#ifndef TESSERA_SDK_SAMPLE_H
#define TESSERA_SDK_SAMPLE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <tessera/sdk.h>

/* ---- PCG32 ------------------------------------------------------------------------------ */

typedef struct tsr_pcg32 {
    uint64_t state, inc;
} tsr_pcg32;

static inline uint32_t tsr_pcg32_next(tsr_pcg32 *r) {
    uint64_t old = r->state;
    r->state = old * 6364136223846793005ULL + r->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
    uint32_t rot = (uint32_t)(old >> 59);
    return (xorshifted >> rot) | (xorshifted << ((32 - rot) & 31));
}

static inline void tsr_pcg32_seed(tsr_pcg32 *r, uint64_t seed, uint64_t stream) {
    r->state = 0;
    r->inc = (stream << 1) | 1;
    tsr_pcg32_next(r);
    r->state += seed;
    tsr_pcg32_next(r);
}

/* Uniform in [0, 1) with 53 random bits. */
static inline double tsr_pcg32_uniform(tsr_pcg32 *r) {
    uint64_t hi = tsr_pcg32_next(r) >> 5, lo = tsr_pcg32_next(r) >> 6; /* 27 + 26 bits */
    return (double)((hi << 26) | lo) * 0x1p-53;
}

/* ---- parameters ------------------------------------------------------------------------- */

/* The chain's parameters, to be listed in a decoder's own table:
 *   static const tsr_param_def params[] = { TSR_SAMPLE_PARAM_DEFS, { ...its own... } };
 * tsr_sampler_init reads them by these names. */
#define TSR_SAMPLE_PARAM_DEFS                                                                   \
    {TSR_SIZED(tsr_param_def), .name = "temperature", .type = TSR_PARAM_FLOAT,                  \
     .default_value = "0.8", .min = 0, .max = 100, .role = TSR_PARAM_ROLE_TEMPERATURE,          \
     .doc = "divides the logits before the draw; 0 picks the most likely token (greedy)"},      \
    {TSR_SIZED(tsr_param_def), .name = "top_k", .type = TSR_PARAM_INT, .default_value = "40",   \
     .min = 0, .max = 1 << 30, .unit = "tokens", .doc = "keep the k most likely tokens; 0 = off"}, \
    {TSR_SIZED(tsr_param_def), .name = "top_p", .type = TSR_PARAM_FLOAT,                        \
     .default_value = "0.95", .min = 0, .max = 1,                                               \
     .doc = "keep the most likely tokens whose probabilities sum to p; 1 = off"},               \
    {TSR_SIZED(tsr_param_def), .name = "min_p", .type = TSR_PARAM_FLOAT,                        \
     .default_value = "0.05", .min = 0, .max = 1,                                               \
     .doc = "drop tokens less likely than min_p times the best one; 0 = off"},                  \
    {TSR_SIZED(tsr_param_def), .name = "repeat_penalty", .type = TSR_PARAM_FLOAT,               \
     .default_value = "1.0", .min = 0.01, .max = 100,                                           \
     .doc = "divide positive (multiply negative) logits of recent tokens; 1 = off"},            \
    {TSR_SIZED(tsr_param_def), .name = "repeat_last_n", .type = TSR_PARAM_INT,                  \
     .default_value = "64", .min = -1, .max = 1 << 30, .unit = "tokens",                        \
     .doc = "how many recent tokens (prompt included) the penalty sees; 0 = off, -1 = all"},    \
    {TSR_SIZED(tsr_param_def), .name = "seed", .type = TSR_PARAM_INT, .default_value = "-1",    \
     .min = -1, .max = 4294967295.0, .role = TSR_PARAM_ROLE_SEED,                               \
     .doc = "random seed; -1 = from the clock (runs differ)"}

/* ---- the chain -------------------------------------------------------------------------- */

typedef struct tsr_sample_cand {
    float logit;   /* penalised */
    int32_t id;
    double weight; /* after tsr_sampler_apply: the candidate's unnormalised probability */
} tsr_sample_cand;

typedef struct tsr_sampler {
    const tsr_host *host;
    int32_t n_vocab;
    double temperature, top_p, min_p, repeat_penalty;
    int64_t top_k, repeat_last_n;
    tsr_pcg32 rng;
    tsr_pcg32 rng_seeded; /* the generator as the fixed seed left it */
    int seed_fixed;
    tsr_sample_cand *cand; /* (n_vocab); after tsr_sampler_apply the first n_cand, best first */
    int64_t n_cand;
    double sum;            /* of the candidates' weights */
    uint8_t *seen;         /* (n_vocab) tokens already penalised in this pick */
} tsr_sampler;

/* Frees what tsr_sampler_init allocated (safe on a zeroed or half-made sampler). */
static inline void tsr_sampler_free(tsr_sampler *s) {
    if (!s->host) return;
    s->host->free(s->host->ctx, s->cand);
    s->host->free(s->host->ctx, s->seen);
    s->cand = NULL;
    s->seen = NULL;
}

/* Reads the TSR_SAMPLE_PARAM_DEFS values of `params` and allocates for `n_vocab` tokens. On
 * failure: the reason through set_error, a negative status, nothing left allocated. */
static inline tsr_status tsr_sampler_init(tsr_sampler *s, const tsr_host *host,
                                          const tsr_params *params, int32_t n_vocab) {
    memset(s, 0, sizeof *s);
    s->host = host;
    if (n_vocab <= 0) {
        host->set_error(host->ctx, "n_vocab %d: expected a positive vocabulary size",
                        (int)n_vocab);
        return TSR_E_INVALID;
    }
    s->repeat_penalty = tsr_param_float(params, "repeat_penalty");
    if (s->repeat_penalty <= 0.0) {
        host->set_error(host->ctx, "repeat_penalty must be positive");
        return TSR_E_INVALID;
    }
    s->cand = (tsr_sample_cand *)host->alloc(host->ctx,
                                             (size_t)n_vocab * sizeof(tsr_sample_cand), 0);
    s->seen = (uint8_t *)tsr_calloc(host, (size_t)n_vocab, 1);
    if (!s->cand || !s->seen) {
        tsr_sampler_free(s);
        host->set_error(host->ctx, "out of memory for a vocabulary of %d", (int)n_vocab);
        return TSR_E_NOMEM;
    }
    s->n_vocab = n_vocab;
    s->temperature = tsr_param_float(params, "temperature");
    s->top_k = tsr_param_int(params, "top_k");
    s->top_p = tsr_param_float(params, "top_p");
    s->min_p = tsr_param_float(params, "min_p");
    s->repeat_last_n = tsr_param_int(params, "repeat_last_n");
    int64_t seed = tsr_param_int(params, "seed");
    uint64_t stream = (uint64_t)(uintptr_t)s;
    if (seed < 0) {
        /* From the clock, mixed with the sampler's address so two samplers made in the same
         * nanosecond still differ. */
        uint64_t t = TSR_HOST_HAS(host, now_ns) ? host->now_ns(host->ctx) : 0;
        tsr_pcg32_seed(&s->rng, t ^ (stream * 0x9E3779B97F4A7C15ULL), stream);
    } else {
        /* A fixed seed fixes the stream too: the same seed replays the same tokens. */
        tsr_pcg32_seed(&s->rng, (uint64_t)seed, 0x5453u);
        s->rng_seeded = s->rng;
        s->seed_fixed = 1;
    }
    return TSR_OK;
}

/* At the start of a request: a fixed seed starts its stream afresh; a clock seed goes on. */
static inline void tsr_sampler_restart(tsr_sampler *s) {
    if (s->seed_fixed) s->rng = s->rng_seeded;
}

/* Higher logit first, then lower id: a total order, so the result never depends on qsort. */
static inline int tsr_sample_cand_before(const tsr_sample_cand *a, const tsr_sample_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static inline int tsr_sample_cand_cmp(const void *pa, const void *pb) {
    const tsr_sample_cand *a = (const tsr_sample_cand *)pa, *b = (const tsr_sample_cand *)pb;
    return tsr_sample_cand_before(a, b) ? -1 : tsr_sample_cand_before(b, a) ? 1 : 0;
}

/* Min-heap by tsr_sample_cand_before (the root is the candidate that sorts last). */
static inline void tsr_sample_heap_down(tsr_sample_cand *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && tsr_sample_cand_before(&h[m], &h[l])) m = l;
        if (r < n && tsr_sample_cand_before(&h[m], &h[r])) m = r;
        if (m == i) return;
        tsr_sample_cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Moves the k best of c[0..n) to c[0..k), sorted best first. O(n log k). */
static inline void tsr_sample_top_k(tsr_sample_cand *c, int64_t n, int64_t k) {
    for (int64_t i = k / 2; i-- > 0;) tsr_sample_heap_down(c, k, i);
    for (int64_t i = k; i < n; i++) {
        if (!tsr_sample_cand_before(&c[i], &c[0])) continue;
        c[0] = c[i];
        tsr_sample_heap_down(c, k, 0);
    }
    qsort(c, (size_t)k, sizeof *c, tsr_sample_cand_cmp);
}

/* Runs the chain on logits (n_vocab) after `history` (the tokens so far, prompt included):
 * leaves s->cand[0..n_cand) (best first) with weights summing to s->sum, and returns n_cand.
 * At temperature 0 the one candidate is the highest penalised logit (lowest id on ties). */
static inline int64_t tsr_sampler_apply(tsr_sampler *s, const float *logits,
                                        const int32_t *history, int64_t n_history) {
    int64_t n = s->n_vocab;
    for (int32_t i = 0; i < s->n_vocab; i++) s->cand[i] = (tsr_sample_cand){logits[i], i, 0.0};

    /* Repeat penalty, once per distinct token of the last repeat_last_n (-1: all) tokens:
     * a positive logit is divided by the penalty, a negative one multiplied. */
    if (s->repeat_penalty != 1.0 && s->repeat_last_n != 0) {
        int64_t from = s->repeat_last_n < 0 || s->repeat_last_n > n_history
                           ? 0 : n_history - s->repeat_last_n;
        for (int64_t i = from; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= s->n_vocab || s->seen[t]) continue;
            s->seen[t] = 1;
            float *l = &s->cand[t].logit;
            *l = *l <= 0.0f ? *l * (float)s->repeat_penalty : *l / (float)s->repeat_penalty;
        }
        for (int64_t i = from; i < n_history; i++)
            if (history[i] >= 0 && history[i] < s->n_vocab) s->seen[history[i]] = 0;
    }

    if (s->temperature <= 0.0) {
        int64_t best = 0;
        for (int64_t i = 1; i < n; i++)
            if (tsr_sample_cand_before(&s->cand[i], &s->cand[best])) best = i;
        s->cand[0] = s->cand[best];
        s->cand[0].weight = 1.0;
        s->sum = 1.0;
        return s->n_cand = 1;
    }

    if (s->top_k > 0 && s->top_k < n) {
        tsr_sample_top_k(s->cand, n, s->top_k);
        n = s->top_k;
    } else {
        qsort(s->cand, (size_t)n, sizeof *s->cand, tsr_sample_cand_cmp);
    }

    /* From here the candidates are sorted, best first. */
    if (s->top_p < 1.0) {
        double sum = 0.0, cum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += exp((double)s->cand[i].logit - s->cand[0].logit);
        for (int64_t i = 0; i < n; i++) {
            cum += exp((double)s->cand[i].logit - s->cand[0].logit) / sum;
            if (cum >= s->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    if (s->min_p > 0.0) {
        /* p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p) */
        double floor_logit = s->cand[0].logit + log(s->min_p);
        int64_t keep = 1;
        while (keep < n && s->cand[keep].logit >= floor_logit) keep++;
        n = keep;
    }

    /* The maximum is subtracted before dividing: logit / T itself overflows to infinity for a
     * tiny T (1e-320), and inf - inf is NaN. This way the best candidate weighs exp(0) = 1 and
     * every other exp(-huge) = 0: a tiny temperature tends to greedy, as it should. */
    double sum = 0.0, top = s->cand[0].logit;
    for (int64_t i = 0; i < n; i++) {
        s->cand[i].weight = exp((s->cand[i].logit - top) / s->temperature);
        sum += s->cand[i].weight;
    }
    s->sum = sum;
    return s->n_cand = n;
}

/* One candidate of the last tsr_sampler_apply, drawn by weight. Temperature 0 takes the one
 * candidate without using the generator. */
static inline int32_t tsr_sampler_draw(tsr_sampler *s) {
    if (s->temperature <= 0.0) return s->cand[0].id;
    double r = tsr_pcg32_uniform(&s->rng) * s->sum, cum = 0.0;
    for (int64_t i = 0; i < s->n_cand; i++) {
        cum += s->cand[i].weight;
        if (r < cum) return s->cand[i].id;
    }
    return s->cand[s->n_cand - 1].id; /* r within rounding of sum */
}

/* The whole chain: a tsr_pick_fn (<tessera/sdk_decode.h>) when `self` is the sampler. */
static inline int32_t tsr_sampler_pick(void *self, const float *logits, const int32_t *history,
                                       int64_t n_history) {
    tsr_sampler *s = (tsr_sampler *)self;
    tsr_sampler_apply(s, logits, history, n_history);
    return tsr_sampler_draw(s);
}

/* The distribution of the last tsr_sampler_apply over the whole vocabulary: probs (n_vocab),
 * 0 for the tokens the chain dropped. */
static inline void tsr_sampler_probs(const tsr_sampler *s, float *probs) {
    memset(probs, 0, (size_t)s->n_vocab * sizeof *probs);
    for (int64_t i = 0; i < s->n_cand; i++)
        probs[s->cand[i].id] = (float)(s->cand[i].weight / s->sum);
}

/* A token drawn from weights (n, not normalised, >= 0, summing to more than 0), lowest id
 * first: for distributions a decoder makes itself, such as speculative sampling's residual
 * max(0, p - q). */
static inline int32_t tsr_sampler_draw_weights(tsr_sampler *s, const float *weights, int32_t n) {
    double sum = 0.0, cum = 0.0;
    int32_t last = 0;
    for (int32_t i = 0; i < n; i++) sum += weights[i];
    double r = tsr_pcg32_uniform(&s->rng) * sum;
    for (int32_t i = 0; i < n; i++) {
        if (weights[i] <= 0.0f) continue;
        cum += weights[i];
        last = i;
        if (r < cum) return i;
    }
    return last; /* r within rounding of sum */
}

#endif /* TESSERA_SDK_SAMPLE_H */
