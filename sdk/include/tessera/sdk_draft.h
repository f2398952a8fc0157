/*
 * <tessera/sdk_draft.h> -- what decoders that draft tokens and verify them share: the text of
 * a request as it grows, greedy acceptance of a drafted run, the commit of what was accepted
 * (emit, roll back the rejected positions), sequences forked for extra branches, and the
 * statistics of tsr_decoder_stats. Header-only, like <tessera/sdk.h>.
 *
 * The loop of such a decoder, with these helpers:
 *
 *   tsr_draft_text t;
 *   st = tsr_draft_text_begin(&t, host, api, req, &stats);  // prefills the prompt but its last
 *   while (st >= 0 && !t.done) {
 *       int32_t draft[32]; int64_t k = <propose at most tsr_draft_text_room(&t) tokens>;
 *       int64_t n = tsr_draft_batch(batch, t.seq, &t, draft, k);      // pending + draft
 *       st = tsr_draft_forward(&t, batch, n, logits);                  // timed as verify_ns
 *       int32_t out[33]; int64_t a = tsr_draft_accept_greedy(logits, api->n_vocab, draft, k, out);
 *       tsr_decoder_stats_add(&stats, k, a - 1);
 *       st = tsr_draft_text_commit(&t, t.seq, out, a);                 // emit, truncate
 *   }
 *   tsr_draft_text_end(&t);
 *
 * The sequence holding the text holds every token of it but the last (the "pending" token,
 * emitted and not yet forwarded): a verification forwards the pending token and the draft
 * after it, and the logits after the pending token and after each drafted token decide.
 */
#ifndef TESSERA_SDK_DRAFT_H
#define TESSERA_SDK_DRAFT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tessera/common.h>
#include <tessera/decoder.h>

/* The highest logit; on a tie the lowest id (runs reproduce across machines); NaN never wins.
 * The rule of the `greedy` decoder, which speculative decoders must match token for token. */
static inline int32_t tsr_argmax(const float *logits, int32_t n_vocab) {
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; i++)
        if (logits[i] > logits[best] || logits[best] != logits[best]) best = i;
    return best;
}

/* Counts one token proposed at draft position i (0: the first after the pending token), and
 * whether the target accepted it. Positions from TSR_DECODER_MAX_DRAFT on count in the totals
 * only. */
static inline void tsr_decoder_stats_one(tsr_decoder_stats *s, int64_t i, int accepted) {
    s->drafted++;
    s->accepted += accepted != 0;
    if (i >= TSR_DECODER_MAX_DRAFT) return;
    s->proposed_at[i]++;
    s->accepted_at[i] += accepted != 0;
}

/* Counts one verification of a run: n_drafted tokens proposed at positions 0..n_drafted-1, of
 * which the first n_accepted were accepted. */
static inline void tsr_decoder_stats_add(tsr_decoder_stats *s, int64_t n_drafted,
                                         int64_t n_accepted) {
    for (int64_t i = 0; i < n_drafted; i++) tsr_decoder_stats_one(s, i, i < n_accepted);
}

/* Copies what a decoder keeps into the `out` its stats callback receives (zeroed by the host,
 * struct_size set): only the fields that struct_size covers. */
static inline void tsr_decoder_stats_copy(tsr_decoder_stats *out, const tsr_decoder_stats *kept) {
    uint32_t size = out->struct_size < sizeof *kept ? out->struct_size : (uint32_t)sizeof *kept;
    if (size > sizeof out->struct_size)
        memcpy((char *)out + sizeof out->struct_size, (const char *)kept + sizeof kept->struct_size,
               size - sizeof out->struct_size);
}

/* The longest draft to propose next. Fixed at `max`, or adaptive, for machines where a
 * forward's cost grows with its tokens (CPUs: on 2 cores an 11-token forward of a 1.1B Q4_0
 * model takes 4.4 times a 1-token one), so that drafts the target keeps rejecting cost little:
 * it starts at 1, doubles (up to `max`) after a draft accepted whole, and falls to one more
 * than what was accepted after a rejection. */
typedef struct tsr_draft_len {
    int64_t cap, max;
    int adaptive;
} tsr_draft_len;

static inline tsr_draft_len tsr_draft_len_start(int64_t max, int adaptive) {
    return (tsr_draft_len){.cap = adaptive ? 1 : max, .max = max, .adaptive = adaptive};
}

/* After a verification of `drafted` tokens of which the first `accepted` were kept. */
static inline void tsr_draft_len_update(tsr_draft_len *d, int64_t drafted, int64_t accepted) {
    if (!d->adaptive || drafted == 0) return;
    d->cap = accepted == drafted ? 2 * d->cap : accepted + 1;
    if (d->cap > d->max) d->cap = d->max;
}

/* Greedy acceptance. logits: (n_draft + 1, n_vocab), the rows after the pending token and
 * after each drafted token. Writes to out (n_draft + 1) the drafted tokens the target's argmax
 * agrees with, then the target's own token where it first disagrees (or after the whole
 * draft); returns their count, 1 to n_draft + 1. Exactly the tokens `greedy` would emit. */
static inline int64_t tsr_draft_accept_greedy(const float *logits, int32_t n_vocab,
                                              const int32_t *draft, int64_t n_draft,
                                              int32_t *out) {
    int64_t n = 0;
    for (;;) {
        int32_t t = tsr_argmax(logits + n * (int64_t)n_vocab, n_vocab);
        out[n] = t;
        if (n == n_draft || t != draft[n]) return n + 1;
        n++;
    }
}

/* create's check: a vocabulary, and with `needs_draft` a draft model in the pipeline. */
static inline tsr_status tsr_draft_check_init(const tsr_host *host, const tsr_decoder_init *init,
                                              int needs_draft) {
    int has_draft = init->struct_size >= offsetof(tsr_decoder_init, has_draft) +
                                             sizeof init->has_draft && init->has_draft;
    if (needs_draft && !has_draft) {
        host->set_error(host->ctx, "needs a draft model: the pipeline has no draft: section");
        return TSR_E_INVALID;
    }
    if (init->n_vocab <= 0) {
        host->set_error(host->ctx, "n_vocab %d: expected a positive vocabulary size",
                        (int)init->n_vocab);
        return TSR_E_INVALID;
    }
    return TSR_OK;
}

/* generate's check: the vocabulary the decoder was created for (its buffers are sized by it)
 * and, with `draft` non-NULL, the draft model, on the same vocabulary, into *draft. */
static inline tsr_status tsr_draft_check_api(const tsr_host *host, const tsr_decode_api *api,
                                             int32_t n_vocab, const tsr_decode_api **draft) {
    if (api->n_vocab != n_vocab) {
        host->set_error(host->ctx, "generate: vocabulary of %d tokens, created for %d",
                        (int)api->n_vocab, (int)n_vocab);
        return TSR_E_INVALID;
    }
    if (!draft) return TSR_OK;
    *draft = api->struct_size >= offsetof(tsr_decode_api, draft) + sizeof api->draft ? api->draft
                                                                                     : NULL;
    if (!*draft) {
        host->set_error(host->ctx, "generate: the host gave no draft model (api->draft is NULL)");
        return TSR_E_STATE;
    }
    if ((*draft)->n_vocab != n_vocab) {
        host->set_error(host->ctx, "generate: the draft's vocabulary of %d tokens, created for %d",
                        (int)(*draft)->n_vocab, (int)n_vocab);
        return TSR_E_INVALID;
    }
    return TSR_OK;
}

/* The text of one request: the prompt, then every token emitted. */
typedef struct tsr_draft_text {
    const tsr_host *host;
    const tsr_decode_api *api;
    tsr_decoder_stats *stats; /* the verifying forwards' time accumulates in verify_ns */
    int32_t *tokens;          /* (n_ctx + 1): the last token emitted is never forwarded */
    int64_t n;                /* tokens in `tokens` */
    int64_t n_prompt;
    int64_t n_left;           /* tokens the request may still emit (INT64_MAX: emit() decides) */
    int64_t seq;              /* the sequence that holds tokens[0 .. n-1) */
    int done;                 /* emit() said stop, or no position is left */
    uint64_t begun_ns;        /* when tsr_draft_forward_begin started the target's forward */
} tsr_draft_text;

static inline uint64_t tsr_draft_now(const tsr_host *host) {
    return TSR_HOST_HAS(host, now_ns) ? host->now_ns(host->ctx) : 0;
}

/* A forward of the target, its time added to stats->verify_ns. */
static inline tsr_status tsr_draft_forward(tsr_draft_text *t, const tsr_batch_entry *batch,
                                           int64_t n, float *logits) {
    uint64_t t0 = tsr_draft_now(t->host);
    tsr_status st = t->api->forward(t->api->ctx, batch, n, logits);
    t->stats->verify_ns += tsr_draft_now(t->host) - t0;
    return st;
}

/* Whether the host runs the target's forward beside the decoder's own work (forward_begin and
 * forward_wait, since decoder 1.2: a pipeline with a draft model). */
static inline int tsr_draft_can_overlap(const tsr_decode_api *api) {
    return api->struct_size >= offsetof(tsr_decode_api, forward_wait) + sizeof api->forward_wait &&
           api->forward_begin && api->forward_wait;
}

/* A forward of the target begun beside the draft's (tsr_draft_can_overlap): until
 * tsr_draft_forward_wait, the batch and logits are the host's and only the draft's API may be
 * called. The time from here to the wait's return is added to stats->verify_ns. */
static inline tsr_status tsr_draft_forward_begin(tsr_draft_text *t, const tsr_batch_entry *batch,
                                                 int64_t n, float *logits) {
    t->begun_ns = tsr_draft_now(t->host);
    return t->api->forward_begin(t->api->ctx, batch, n, logits);
}

static inline tsr_status tsr_draft_forward_wait(tsr_draft_text *t) {
    tsr_status st = t->api->forward_wait(t->api->ctx);
    t->stats->verify_ns += tsr_draft_now(t->host) - t->begun_ns;
    return st;
}

/* Checks the request, copies the prompt and forwards all of it but its last token (which
 * becomes the pending token) on sequence 0, without logits. Errors: a prompt that is empty or
 * longer than n_ctx, no memory, a failed forward (its status as is: the host explains it). On
 * error nothing is left to free. With max_new_tokens 0, `done` is set at once. */
static inline tsr_status tsr_draft_text_begin(tsr_draft_text *t, const tsr_host *host,
                                              const tsr_decode_api *api,
                                              const tsr_generate_request *req,
                                              tsr_decoder_stats *stats) {
    *t = (tsr_draft_text){.host = host, .api = api, .stats = stats, .n_prompt = req->n_prompt,
                          .n_left = req->max_new_tokens > 0 ? req->max_new_tokens : INT64_MAX};
    if (req->n_prompt < 1 || req->n_prompt > api->n_ctx || !req->prompt) {
        host->set_error(host->ctx, "generate: prompt of %lld tokens, expected 1 to n_ctx %d",
                        (long long)req->n_prompt, (int)api->n_ctx);
        return TSR_E_RANGE;
    }
    t->done = req->max_new_tokens == 0;
    t->tokens = host->alloc(host->ctx, ((size_t)api->n_ctx + 1) * sizeof(int32_t), 0);
    tsr_batch_entry *batch =
        host->alloc(host->ctx, (size_t)req->n_prompt * sizeof(tsr_batch_entry), 0);
    if (!t->tokens || !batch) {
        host->free(host->ctx, batch);
        host->free(host->ctx, t->tokens);
        t->tokens = NULL;
        host->set_error(host->ctx, "generate: out of memory for a context of %d tokens",
                        (int)api->n_ctx);
        return TSR_E_NOMEM;
    }
    memcpy(t->tokens, req->prompt, (size_t)req->n_prompt * sizeof(int32_t));
    t->n = req->n_prompt;
    tsr_status st = TSR_OK;
    if (!t->done && req->n_prompt > 1) {
        for (int64_t i = 0; i < req->n_prompt - 1; i++)
            batch[i] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = req->prompt[i]};
        st = api->forward(api->ctx, batch, req->n_prompt - 1, NULL);
    }
    host->free(host->ctx, batch);
    if (st < 0) {
        host->free(host->ctx, t->tokens);
        t->tokens = NULL;
    }
    return st;
}

static inline void tsr_draft_text_end(tsr_draft_text *t) {
    t->host->free(t->host->ctx, t->tokens);
    t->tokens = NULL;
}

/* How many drafted tokens may follow the pending token: positions left in the context after
 * it, and no more than the request may still emit after the target's own token. */
static inline int64_t tsr_draft_text_room(const tsr_draft_text *t) {
    int64_t room = t->api->n_ctx - t->n;
    if (room > t->n_left - 1) room = t->n_left - 1;
    return room > 0 ? room : 0;
}

/* Writes to batch the pending token then draft[0..n_draft) on sequence `seq` (which must hold
 * tokens[0 .. n-1)), logits wanted after each; returns the entry count, n_draft + 1. */
static inline int64_t tsr_draft_batch(tsr_batch_entry *batch, int64_t seq,
                                      const tsr_draft_text *t, const int32_t *draft,
                                      int64_t n_draft) {
    int32_t pos = (int32_t)(t->n - 1);
    batch[0] = (tsr_batch_entry){.seq_id = seq, .pos = pos, .token = t->tokens[t->n - 1],
                                 .want_logits = 1};
    for (int64_t i = 0; i < n_draft; i++)
        batch[i + 1] = (tsr_batch_entry){.seq_id = seq, .pos = pos + 1 + (int32_t)i,
                                         .token = draft[i], .want_logits = 1};
    return n_draft + 1;
}

/* After a verification on sequence `seq` (which held tokens[0 .. n-1), then the pending token
 * and a draft of at most tsr_draft_text_room() tokens): emits `accepted` (n of them, at most
 * the room + 1: the accepted drafted tokens, then the target's own), appends them to the text
 * and rolls `seq` back to the positions of the text but its new last token, which becomes the
 * pending one. Sets `done` when emit() says stop, when the request has emitted all it may, or
 * when no position is left for the pending token. */
static inline tsr_status tsr_draft_text_commit(tsr_draft_text *t, int64_t seq,
                                               const int32_t *accepted, int64_t n) {
    memcpy(t->tokens + t->n, accepted, (size_t)n * sizeof(int32_t));
    t->n += n;
    if (t->n_left != INT64_MAX) t->n_left -= n;
    t->seq = seq;
    if (t->api->emit(t->api->ctx, accepted, n) || t->n_left == 0 || t->n > t->api->n_ctx) {
        t->done = 1;
        return TSR_OK;
    }
    return t->api->seq_truncate(t->api->ctx, seq, (int32_t)(t->n - 1));
}

/* The pipeline's draft model (tsr_decode_api.draft) as a drafting decoder drives it: a copy of
 * what its sequence 0 holds, so that bringing it to a new context forwards only what differs
 * (after a rollback of the target, the draft keeps the common prefix). */
typedef struct tsr_draft_model {
    const tsr_host *host;
    const tsr_decode_api *api; /* the draft's */
    int32_t *held;             /* (n_ctx) the tokens its sequence 0 holds */
    int64_t n_held;
    tsr_batch_entry *batch;    /* (n_ctx) */
    tsr_decoder_stats *stats;  /* its forwards' time accumulates in draft_ns */
} tsr_draft_model;

static inline tsr_status tsr_draft_model_begin(tsr_draft_model *m, const tsr_host *host,
                                               const tsr_decode_api *draft,
                                               tsr_decoder_stats *stats) {
    *m = (tsr_draft_model){.host = host, .api = draft, .stats = stats};
    m->held = host->alloc(host->ctx, (size_t)draft->n_ctx * sizeof(int32_t), 0);
    m->batch = host->alloc(host->ctx, (size_t)draft->n_ctx * sizeof(tsr_batch_entry), 0);
    if (m->held && m->batch) return TSR_OK;
    host->free(host->ctx, m->held);
    host->free(host->ctx, m->batch);
    m->held = NULL;
    m->batch = NULL;
    host->set_error(host->ctx, "generate: out of memory for a draft context of %d tokens",
                    (int)draft->n_ctx);
    return TSR_E_NOMEM;
}

static inline void tsr_draft_model_end(tsr_draft_model *m) {
    m->host->free(m->host->ctx, m->held);
    m->host->free(m->host->ctx, m->batch);
    m->held = NULL;
    m->batch = NULL;
}

/* Brings the draft's sequence 0 to hold ctx[0..n) (n >= 1, at most the draft's n_ctx): keeps
 * what it holds of it, rolls back the rest, forwards what is missing (at least the last token,
 * which is forwarded again when already held, since its logits are wanted) and writes the
 * draft's logits after ctx[n - 1] (n_vocab). */
static inline tsr_status tsr_draft_model_sync(tsr_draft_model *m, const int32_t *ctx, int64_t n,
                                              float *logits) {
    int64_t keep = 0;
    while (keep < m->n_held && keep < n - 1 && m->held[keep] == ctx[keep]) keep++;
    tsr_status st = TSR_OK;
    if (keep < m->n_held && (st = m->api->seq_truncate(m->api->ctx, 0, (int32_t)keep)) < 0)
        return st;
    m->n_held = keep;
    for (int64_t i = keep; i < n; i++)
        m->batch[i - keep] = (tsr_batch_entry){.seq_id = 0, .pos = (int32_t)i, .token = ctx[i],
                                               .want_logits = i == n - 1};
    uint64_t t0 = tsr_draft_now(m->host);
    st = m->api->forward(m->api->ctx, m->batch, n - keep, logits);
    m->stats->draft_ns += tsr_draft_now(m->host) - t0;
    if (st < 0) return st;
    memcpy(m->held + keep, ctx + keep, (size_t)(n - keep) * sizeof *ctx);
    m->n_held = n;
    return TSR_OK;
}

/* Sequences a decoder forks for extra branches, by id; ids below 64. */
typedef struct tsr_draft_seqs {
    uint64_t alive; /* bit i: sequence i is alive */
} tsr_draft_seqs;

/* Forks `src` into the lowest id that is not alive; its id in *dst. */
static inline tsr_status tsr_draft_seqs_fork(tsr_draft_seqs *s, const tsr_decode_api *api,
                                             int64_t src, int64_t *dst) {
    int64_t id = 0;
    while (id < 64 && (s->alive >> id & 1)) id++;
    if (id == 64) return TSR_E_RANGE;
    tsr_status st = api->seq_fork(api->ctx, src, id);
    if (st < 0) return st;
    s->alive |= 1ull << id;
    *dst = id;
    return TSR_OK;
}

/* Ends every alive sequence but `keep`. */
static inline void tsr_draft_seqs_keep(tsr_draft_seqs *s, const tsr_decode_api *api,
                                       int64_t keep) {
    for (int64_t id = 0; id < 64; id++)
        if (id != keep && (s->alive >> id & 1)) api->seq_end(api->ctx, id);
    s->alive &= 1ull << keep;
}

#endif /* TESSERA_SDK_DRAFT_H */
