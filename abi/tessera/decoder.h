/*
 * <tessera/decoder.h> -- decoder strategy stage: which tokens come next and how many forward
 * passes that costs.
 *
 * The decoder drives generation. The host calls `generate` once per request with a
 * tsr_decode_api: the decoder runs the model on batches of (sequence, position, token)
 * entries, reads the logits it asked for, forks or rolls back sequences, and emits the tokens
 * it accepts. Greedy and sampling emit one token per forward; speculative decoders verify
 * several drafted tokens in one forward and roll back the rejected ones; beam search forks.
 * The request's sequence is seq_id 0, already begun, with nothing stored yet.
 */
#ifndef TESSERA_DECODER_H
#define TESSERA_DECODER_H

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_DECODER_ABI_MAJOR 1
#define TSR_DECODER_ABI_MINOR 2

typedef struct tsr_decoder_init {
    uint32_t struct_size;
    int32_t n_vocab;
    int32_t n_ctx;
    int32_t has_draft; /* since 1.1: 1 when the pipeline has a draft model (tsr_decode_api.draft) */
} tsr_decoder_init;

typedef struct tsr_batch_entry {
    int64_t seq_id;
    int32_t pos;
    int32_t token;
    int32_t want_logits; /* 1: the logits after this entry are returned */
} tsr_batch_entry;

/* What the host offers a running decoder. Valid for the duration of `generate`. All [main]. */
typedef struct tsr_decode_api {
    uint32_t struct_size;
    void *ctx;
    int32_t n_vocab;
    int32_t n_ctx;

    /* Runs the model on `n` entries (any mix of sequences; positions of one sequence must
     * continue what it holds). Writes the logits of the entries with want_logits, in order,
     * to logits (n_want, n_vocab), host memory owned by the caller. */
    tsr_status (*forward)(void *ctx, const tsr_batch_entry *entries, int64_t n, float *logits);

    /* Sequence management; forwarded to the cache policy (and attention). */
    tsr_status (*seq_fork)(void *ctx, int64_t src, int64_t dst);
    tsr_status (*seq_truncate)(void *ctx, int64_t seq_id, int32_t n_pos);
    tsr_status (*seq_end)(void *ctx, int64_t seq_id);

    /* Hands accepted tokens of the request to the host (streamed to the user). Returns 1 when
     * generation must stop (token limit reached, end-of-generation token, user stop), else 0.
     * Tokens are checked for end-of-generation by the host. */
    int32_t (*emit)(void *ctx, const int32_t *tokens, int64_t n);

    /* 1 when `token` ends generation (EOS, EOT...). */
    int32_t (*is_eog)(void *ctx, int32_t token);

    /* since 1.1: the pipeline's draft model (its `draft:` section), or NULL: a second model on
     * the same vocabulary (n_vocab equal) with sequences and a cache of its own; as for the
     * target, its sequence 0 is begun and empty when generate starts, and its sequence ids are
     * independent of the target's. Its forward, seq_fork, seq_truncate and seq_end act on the
     * draft; its emit, is_eog, draft and emit_seq are NULL. */
    const struct tsr_decode_api *draft;
    /* since 1.1: emit for sequence `seq_id` of a request that generates several continuations
     * at once (a decoder with a parameter of role PARALLEL): the host keeps one text per
     * sequence, and emit() is emit_seq(0, ...). Returns 1 when that sequence must stop. */
    int32_t (*emit_seq)(void *ctx, int64_t seq_id, const int32_t *tokens, int64_t n);

    /* since 1.2: the target's forward beside the draft's, for decoders that draft while the
     * target verifies (PEARL). forward_begin starts forward(entries, n, logits) on threads of
     * the target's own and returns at once; forward_wait waits for it and returns its status.
     * In between, the entries and logits stay the host's (neither read nor written by the
     * decoder), no other call of this API may be made (the host refuses it: TSR_E_STATE), and
     * the draft's API may be used: its calls run beside the target's forward, the pool's
     * threads shared between the two (with one thread, forward_begin runs the forward itself).
     * generate calls forward_wait before it returns. Present on the target's API of a pipeline
     * with a draft model, NULL otherwise. */
    tsr_status (*forward_begin)(void *ctx, const tsr_batch_entry *entries, int64_t n,
                                float *logits);
    tsr_status (*forward_wait)(void *ctx);
} tsr_decode_api;

typedef struct tsr_generate_request {
    uint32_t struct_size;
    const int32_t *prompt;    /* (n_prompt) token ids, BOS included when the model wants it */
    int64_t n_prompt;         /* >= 1 */
    int64_t max_new_tokens;   /* >= 0; 0 emits nothing. The host's emit() also enforces it */
} tsr_generate_request;

/* since 1.1: what a decoder that proposes tokens reports of the last request. */
#define TSR_DECODER_MAX_DRAFT 32
typedef struct tsr_decoder_stats {
    uint32_t struct_size;
    int64_t drafted;                            /* tokens proposed for verification */
    int64_t accepted;                           /* of them, accepted */
    int64_t proposed_at[TSR_DECODER_MAX_DRAFT]; /* proposed at draft position i (0: first) */
    int64_t accepted_at[TSR_DECODER_MAX_DRAFT]; /* accepted at draft position i */
    uint64_t draft_ns;                          /* time spent proposing (draft forwards) */
    uint64_t verify_ns;                         /* time spent in verifying forwards */
} tsr_decoder_stats;

/* since 1.1: whether a decoder drafts with the pipeline's draft model (tsr_decode_api.draft),
 * as tsr_decoder_vtable.draft_use says. The host refuses, in one line, a pipeline whose draft:
 * section the decoder would never use, and one without a draft for a decoder that needs it. */
typedef enum tsr_decoder_draft_use {
    TSR_DECODER_DRAFT_NONE = 0,     /* never uses one (every 1.0 decoder) */
    TSR_DECODER_DRAFT_OPTIONAL = 1, /* uses one when the pipeline has one */
    TSR_DECODER_DRAFT_REQUIRED = 2  /* cannot run without one: api->draft is never NULL */
} tsr_decoder_draft_use;

typedef struct tsr_decoder_vtable {
    uint32_t struct_size;

    /* [main] */
    tsr_status (*create)(const tsr_host *host, const tsr_params *params,
                         const tsr_decoder_init *init, void **out);
    void (*destroy)(void *self);

    /* [main] Generates until emit() returns 1 or the decoder decides to stop. */
    tsr_status (*generate)(void *self, const tsr_decode_api *api,
                           const tsr_generate_request *req);

    /* [main] Optional. Picks one token from logits (n_vocab) given the tokens so far: the
     * decoder's sampling rule alone, so a host or another decoder (speculative verification)
     * can reuse it. */
    int32_t (*pick)(void *self, const float *logits, const int32_t *history, int64_t n_history);

    /* [main] Optional (since 1.1). Fills `out` (zeroed by the host, struct_size set) with what
     * the last generate proposed and accepted. */
    void (*stats)(void *self, tsr_decoder_stats *out);

    /* since 1.1. Not a callback: tsr_decoder_draft_use, read by the host before any instance
     * is made. 0 (NONE) when absent. */
    int32_t draft_use;
} tsr_decoder_vtable;

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_DECODER_H */
