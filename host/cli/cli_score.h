/* Scoring a text the way `perplexity` and `compare` do (llama.cpp's definition): the tokens cut
 * into chunks of ctx, each run from an empty cache with BOS first, the second half of each
 * chunk scored. How a chunk is fed (one forward, or a prefill then small forwards) is what
 * lets a cache policy evict inside it. */
#ifndef TSR_HOST_CLI_SCORE_H
#define TSR_HOST_CLI_SCORE_H

#include <stdbool.h>
#include <stdint.h>

#include "pipeline/pipeline.h"

/* How one chunk goes through the pipeline: its first `prefill` tokens in one forward (which
 * ends the prompt: a policy such as SnapKV compresses there), then `ubatch` tokens per forward.
 * prefill == ctx (or ubatch == ctx) is one forward for the whole chunk. */
typedef struct tsr_feed {
    int64_t ctx, prefill, ubatch;
} tsr_feed;

/* The first scored position of a chunk; positions [first, ctx - 1) are scored (the last has
 * no next token in the chunk). */
static inline int64_t tsr_feed_first_scored(const tsr_feed *f) { return f->ctx / 2; }

/* "one forward per chunk" or "prefill 128 tokens, then 1 token per forward": what the
 * output says of the feeding. */
void tsr_feed_describe(const tsr_feed *f, char *buf, size_t size);

/* Runs `chunk` (ctx token ids, the first replaced by `bos` when bos >= 0) as sequence 0 from
 * an empty cache, fed as `f` says; the logits of positions [first scored, ctx) go to `logits`
 * (ctx - first rows of n_vocab). `batch` has room for ctx entries. When `stats` is not NULL it
 * receives the cache statistics at the chunk's end, before the sequence is freed. */
tsr_status tsr_score_chunk(tsr_pipeline *pl, const int32_t *chunk, int32_t bos, const tsr_feed *f,
                           int32_t n_vocab, tsr_batch_entry *batch, float *logits,
                           tsr_cache_stats *stats, tsr_error *err);

/* log softmax(logits) into out (n floats), computed in double. */
void tsr_log_softmax(const float *logits, int32_t n, float *out);

/* Sums over scored positions: the negative log-likelihood of the next token and, against a
 * baseline's log-probabilities, KL(baseline || this) and whether both put the same token on
 * top. */
typedef struct tsr_score_sum {
    double nll, nll2;
    int64_t count;
    double kl, kl2;
    int64_t same_top, kl_count;
} tsr_score_sum;

/* Adds one position: its logits (n_vocab) and the token that came next; with `base_lp` (may
 * be NULL) the baseline's log-probabilities for the same position, compared with this
 * position's own as tsr_log_softmax makes them (in `scratch`, n_vocab floats), so that equal
 * logits give a KL of exactly 0. false when the log-likelihood is not a finite number (NaN or
 * infinite logits). */
bool tsr_score_add(tsr_score_sum *s, const float *logits, const float *base_lp, int32_t n_vocab,
                   int32_t next, float *scratch);

/* Mean and the standard error of the mean of a sum, sum of squares and count (as llama.cpp). */
void tsr_score_mean(double sum, double sum2, int64_t count, double *mean, double *stderr_mean);

#endif
