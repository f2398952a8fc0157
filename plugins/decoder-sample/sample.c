/*
 * decoder 'sample': the sampling chain of llama.cpp's common defaults, applied in its order:
 *   repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw from the softmax.
 * Temperature 0 keeps only the highest (penalised) logit, lowest id on ties: greedy.
 *
 * The random generator is PCG32 (O'Neill 2014, "PCG: A Family of Simple Fast Space-Efficient
 * Statistically Good Algorithms for Random Number Generation") and lives in the instance:
 * two instances never share state, and with a fixed seed every request starts the stream
 * afresh, so the same request gives the same tokens (rule DEC_4).
 */
#include <math.h>
#include <stdlib.h>

#include <tessera/sdk.h>
#include <tessera/sdk_decode.h>

typedef struct sample_cand {
    float logit;
    int32_t id;
} sample_cand;

typedef struct pcg32 {
    uint64_t state, inc;
} pcg32;

typedef struct sampler {
    const tsr_host *host;
    int32_t n_vocab;
    double temperature, top_p, min_p, repeat_penalty;
    int64_t top_k, repeat_last_n;
    pcg32 rng;
    pcg32 rng_seeded;    /* the generator as the fixed seed left it */
    int seed_fixed;
    sample_cand *cand;   /* (n_vocab) */
    uint8_t *seen;       /* (n_vocab) tokens already penalised in this pick */
} sampler;

static uint32_t pcg32_next(pcg32 *r) {
    uint64_t old = r->state;
    r->state = old * 6364136223846793005ULL + r->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
    uint32_t rot = (uint32_t)(old >> 59);
    return (xorshifted >> rot) | (xorshifted << ((32 - rot) & 31));
}

static void pcg32_seed(pcg32 *r, uint64_t seed, uint64_t stream) {
    r->state = 0;
    r->inc = (stream << 1) | 1;
    pcg32_next(r);
    r->state += seed;
    pcg32_next(r);
}

/* Uniform in [0, 1) with 53 random bits. */
static double pcg32_uniform(pcg32 *r) {
    uint64_t hi = pcg32_next(r) >> 5, lo = pcg32_next(r) >> 6; /* 27 + 26 bits */
    return (double)((hi << 26) | lo) * 0x1p-53;
}

/* Higher logit first, then lower id: a total order, so the result never depends on qsort. */
static int sample_cand_before(const sample_cand *a, const sample_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int sample_cand_cmp(const void *pa, const void *pb) {
    const sample_cand *a = pa, *b = pb;
    return sample_cand_before(a, b) ? -1 : sample_cand_before(b, a) ? 1 : 0;
}

/* Min-heap by sample_cand_before (the root is the candidate that sorts last). */
static void sample_heap_down(sample_cand *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && sample_cand_before(&h[m], &h[l])) m = l;
        if (r < n && sample_cand_before(&h[m], &h[r])) m = r;
        if (m == i) return;
        sample_cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Moves the k best of c[0..n) to c[0..k), sorted best first. O(n log k). */
static void sample_top_k(sample_cand *c, int64_t n, int64_t k) {
    for (int64_t i = k / 2; i-- > 0;) sample_heap_down(c, k, i);
    for (int64_t i = k; i < n; i++) {
        if (!sample_cand_before(&c[i], &c[0])) continue;
        c[0] = c[i];
        sample_heap_down(c, k, 0);
    }
    qsort(c, (size_t)k, sizeof *c, sample_cand_cmp);
}

static int32_t sample_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    sampler *s = self;
    int64_t n = s->n_vocab;
    for (int32_t i = 0; i < s->n_vocab; i++) s->cand[i] = (sample_cand){logits[i], i};

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
            if (sample_cand_before(&s->cand[i], &s->cand[best])) best = i;
        return s->cand[best].id;
    }

    if (s->top_k > 0 && s->top_k < n) {
        sample_top_k(s->cand, n, s->top_k);
        n = s->top_k;
    } else {
        qsort(s->cand, (size_t)n, sizeof *s->cand, sample_cand_cmp);
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
    for (int64_t i = 0; i < n; i++) sum += exp((s->cand[i].logit - top) / s->temperature);
    double r = pcg32_uniform(&s->rng) * sum, cum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        cum += exp((s->cand[i].logit - top) / s->temperature);
        if (r < cum) return s->cand[i].id;
    }
    return s->cand[n - 1].id; /* r within rounding of sum */
}

static tsr_status sample_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    sampler *s = self;
    if (api->n_vocab != s->n_vocab) {
        s->host->set_error(s->host->ctx, "generate: vocabulary of %d tokens, created for %d",
                           (int)api->n_vocab, (int)s->n_vocab);
        return TSR_E_INVALID;
    }
    if (s->seed_fixed) s->rng = s->rng_seeded;
    return tsr_generate_one_by_one(s->host, api, req, sample_pick, s);
}

static void sample_destroy(void *self) {
    sampler *s = self;
    s->host->free(s->host->ctx, s->cand);
    s->host->free(s->host->ctx, s->seen);
    s->host->free(s->host->ctx, s);
}

static tsr_status sample_create(const tsr_host *host, const tsr_params *params,
                                const tsr_decoder_init *init, void **out) {
    if (init->n_vocab <= 0) {
        host->set_error(host->ctx, "n_vocab %d: expected a positive vocabulary size",
                        (int)init->n_vocab);
        return TSR_E_INVALID;
    }
    sampler *s = tsr_calloc(host, 1, sizeof *s);
    if (s) {
        s->host = host;
        s->cand = host->alloc(host->ctx, (size_t)init->n_vocab * sizeof(sample_cand), 0);
        s->seen = tsr_calloc(host, (size_t)init->n_vocab, 1);
    }
    if (!s || !s->cand || !s->seen) {
        if (s) sample_destroy(s);
        host->set_error(host->ctx, "out of memory for a vocabulary of %d", (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    s->n_vocab = init->n_vocab;
    s->temperature = tsr_param_float(params, "temperature");
    s->top_k = tsr_param_int(params, "top_k");
    s->top_p = tsr_param_float(params, "top_p");
    s->min_p = tsr_param_float(params, "min_p");
    s->repeat_penalty = tsr_param_float(params, "repeat_penalty");
    s->repeat_last_n = tsr_param_int(params, "repeat_last_n");
    if (s->repeat_penalty <= 0.0) {
        sample_destroy(s);
        host->set_error(host->ctx, "repeat_penalty must be positive");
        return TSR_E_INVALID;
    }
    int64_t seed = tsr_param_int(params, "seed");
    uint64_t stream = (uint64_t)(uintptr_t)s;
    if (seed < 0) {
        /* From the clock, mixed with the instance address so two instances created in the same
         * nanosecond still differ. */
        uint64_t t = TSR_HOST_HAS(host, now_ns) ? host->now_ns(host->ctx) : 0;
        pcg32_seed(&s->rng, t ^ (stream * 0x9E3779B97F4A7C15ULL), stream);
    } else {
        /* A fixed seed fixes the stream too: the same seed replays the same tokens. */
        pcg32_seed(&s->rng, (uint64_t)seed, 0x5453u);
        s->rng_seeded = s->rng;
        s->seed_fixed = 1;
    }
    *out = s;
    return TSR_OK;
}

static const tsr_param_def sample_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "temperature", .type = TSR_PARAM_FLOAT,
     .default_value = "0.8", .min = 0, .max = 100, .role = TSR_PARAM_ROLE_TEMPERATURE,
     .doc = "divides the logits before the draw; 0 picks the most likely token (greedy)"},
    {TSR_SIZED(tsr_param_def), .name = "top_k", .type = TSR_PARAM_INT, .default_value = "40",
     .min = 0, .max = 1 << 30, .unit = "tokens", .doc = "keep the k most likely tokens; 0 = off"},
    {TSR_SIZED(tsr_param_def), .name = "top_p", .type = TSR_PARAM_FLOAT, .default_value = "0.95",
     .min = 0, .max = 1,
     .doc = "keep the most likely tokens whose probabilities sum to p; 1 = off"},
    {TSR_SIZED(tsr_param_def), .name = "min_p", .type = TSR_PARAM_FLOAT, .default_value = "0.05",
     .min = 0, .max = 1, .doc = "drop tokens less likely than min_p times the best one; 0 = off"},
    {TSR_SIZED(tsr_param_def), .name = "repeat_penalty", .type = TSR_PARAM_FLOAT,
     .default_value = "1.0", .min = 0.01, .max = 100,
     .doc = "divide positive (multiply negative) logits of recent tokens; 1 = off"},
    {TSR_SIZED(tsr_param_def), .name = "repeat_last_n", .type = TSR_PARAM_INT,
     .default_value = "64", .min = -1, .max = 1 << 30, .unit = "tokens",
     .doc = "how many recent tokens (prompt included) the penalty sees; 0 = off, -1 = all"},
    {TSR_SIZED(tsr_param_def), .name = "seed", .type = TSR_PARAM_INT, .default_value = "-1",
     .min = -1, .max = 4294967295.0, .role = TSR_PARAM_ROLE_SEED,
     .doc = "random seed; -1 = from the clock (runs differ)"},
};

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
    .version = "1.0",
    .description = "sampling chain: repeat penalty, top-k, top-p, min-p, temperature (llama.cpp's "
                   "order)",
    TSR_PARAMS(sample_params),
    .vtable = &sample_vtable,
};

TSR_PLUGIN_EXPORT(&sample_desc)
