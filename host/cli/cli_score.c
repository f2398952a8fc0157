/* Chunks fed to a pipeline and the sums perplexity and KL divergence are made of. */
#include <math.h>
#include <stdio.h>

#include "cli/cli_score.h"

void tsr_feed_describe(const tsr_feed *f, char *buf, size_t size) {
    if (f->prefill >= f->ctx)
        snprintf(buf, size, "one forward per chunk");
    else if (f->prefill == f->ubatch)
        snprintf(buf, size, "%lld token%s per forward", (long long)f->ubatch,
                 f->ubatch == 1 ? "" : "s");
    else
        snprintf(buf, size, "prefill %lld tokens, then %lld token%s per forward",
                 (long long)f->prefill, (long long)f->ubatch, f->ubatch == 1 ? "" : "s");
}

tsr_status tsr_score_chunk(tsr_pipeline *pl, const int32_t *chunk, int32_t bos, const tsr_feed *f,
                           int32_t n_vocab, tsr_batch_entry *batch, float *logits,
                           tsr_cache_stats *stats, tsr_error *err) {
    const int64_t first = tsr_feed_first_scored(f);
    for (int64_t j = 0; j < f->ctx; j++)
        batch[j] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)j,
                                     .token = j == 0 && bos >= 0 ? bos : chunk[j],
                                     .want_logits = j >= first};
    tsr_status st = tsr_pipeline_seq_begin(pl, 0, err);
    if (st < 0) return st;
    float *out = logits;
    for (int64_t at = 0, n; st >= 0 && at < f->ctx; at += n) {
        n = at == 0 ? f->prefill : f->ubatch;
        if (n > f->ctx - at) n = f->ctx - at;
        st = tsr_pipeline_forward(pl, batch + at, n, out, err);
        for (int64_t j = at; j < at + n; j++)
            if (j >= first) out += n_vocab;
    }
    if (st >= 0 && stats) tsr_pipeline_cache_stats(pl, stats);
    tsr_pipeline_seq_end(pl, 0);
    return st;
}

void tsr_log_softmax(const float *logits, int32_t n, float *out) {
    double max = logits[0], sum = 0;
    for (int32_t i = 1; i < n; i++) max = fmax(max, logits[i]);
    for (int32_t i = 0; i < n; i++) sum += exp((double)logits[i] - max);
    double log_sum = log(sum);
    for (int32_t i = 0; i < n; i++) out[i] = (float)((double)logits[i] - max - log_sum);
}

static int32_t argmax(const float *v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

bool tsr_score_add(tsr_score_sum *s, const float *logits, const float *base_lp, int32_t n_vocab,
                   int32_t next, float *scratch) {
    /* The log-likelihood in double straight from the logits, as llama.cpp computes it. */
    double max = logits[0], sum = 0;
    for (int32_t i = 1; i < n_vocab; i++) max = fmax(max, logits[i]);
    for (int32_t i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - max);
    double nll = log(sum) - ((double)logits[next] - max);
    if (!isfinite(nll)) return false;
    s->nll += nll;
    s->nll2 += nll * nll;
    s->count++;
    if (!base_lp) return true;
    tsr_log_softmax(logits, n_vocab, scratch);
    double kl = 0;
    for (int32_t i = 0; i < n_vocab; i++)
        kl += exp((double)base_lp[i]) * ((double)base_lp[i] - (double)scratch[i]);
    s->kl += kl;
    s->kl2 += kl * kl;
    s->same_top += argmax(base_lp, n_vocab) == argmax(scratch, n_vocab);
    s->kl_count++;
    return true;
}

void tsr_score_mean(double sum, double sum2, int64_t count, double *mean, double *stderr_mean) {
    *mean = count > 0 ? sum / (double)count : 0;
    double var = count > 0 ? sum2 / (double)count - *mean * *mean : 0;
    *stderr_mean = count > 1 && var > 0 ? sqrt(var / (double)(count - 1)) : 0;
}
