/*
 * decoder 'beam': beam search with a length penalty, each beam a sequence of its own
 * (seq_fork when a beam has several continuations worth keeping, seq_end when it has none).
 *
 * Every step forwards the pending token of each of the `width` beams in one batch; a
 * continuation scores its beam's sum of log-probabilities plus its own. The candidates are
 * ranked (score, then beam, then token id) and the best `width` that do not end generation
 * become the next beams. A candidate that ends generation (is_eog) and ranks within the first
 * `width` finishes a hypothesis: its tokens, without the end token, scored sum / length^alpha
 * (alpha = `length_penalty`; the length counts the generated tokens, at least 1), as Hugging
 * Face's BeamSearchScorer does. Beams still running when the request's token limit or the
 * context's end is reached finish there. The search stops once `width` hypotheses have
 * finished (Hugging Face's early_stopping=True), and the best finished one is emitted in one
 * call: beam search streams nothing before it ends. With width 1 it is `greedy`, token for
 * token (the lowest id on ties). `stats` reports the time spent in forwards (verify_ns) and no
 * drafts: beam search proposes nothing for verification.
 */
#include <math.h>

#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

#define BEAM_MAX_WIDTH 16

typedef struct beam_cand {
    double score; /* the beam's sum of log-probabilities with this token's */
    int32_t beam, token;
} beam_cand;

typedef struct beam_state {
    int64_t seq;
    double score;
    int32_t *tokens; /* (n_ctx) generated so far; the last one is pending */
    int64_t len;
} beam_state;

typedef struct beam_hyp {
    double norm; /* score / length^alpha */
    int32_t *tokens;
    int64_t len;
} beam_hyp;

typedef struct beam {
    const tsr_host *host;
    int32_t n_vocab, n_ctx;
    int32_t width;
    double alpha;
    /* Per request, sized for n_ctx tokens. */
    int32_t *store;               /* (3 * width, n_ctx): beams, next beams, hypotheses */
    beam_state beams[BEAM_MAX_WIDTH], next[BEAM_MAX_WIDTH];
    beam_hyp hyps[BEAM_MAX_WIDTH];
    int32_t n_beams, n_hyps;
    beam_cand *cands;             /* (width * 2 * width) */
    tsr_batch_entry batch[BEAM_MAX_WIDTH];
    float *logits;                /* (width, n_vocab) */
    double last_score;            /* the emitted hypothesis's, for the `score` command */
    tsr_decoder_stats stats;
} beam;

static int beam_cand_before(const beam_cand *a, const beam_cand *b) {
    if (a->score != b->score) return a->score > b->score;
    if (a->beam != b->beam) return a->beam < b->beam;
    return a->token < b->token;
}

/* Inserts c into the sorted list (n of at most cap), dropping the last when full. */
static void beam_cand_insert(beam_cand *list, int32_t *n, int32_t cap, beam_cand c) {
    if (*n == cap && !beam_cand_before(&c, &list[cap - 1])) return;
    int32_t i = *n < cap ? (*n)++ : cap - 1;
    for (; i > 0 && beam_cand_before(&c, &list[i - 1]); i--) list[i] = list[i - 1];
    list[i] = c;
}

/* Adds a finished hypothesis, keeping the `width` best (the earlier one first among equals). */
static void beam_finish(beam *B, const beam_state *s, double score) {
    double len = s->len > 1 ? (double)s->len : 1.0;
    double norm = score / pow(len, B->alpha);
    int32_t at = B->n_hyps;
    while (at > 0 && norm > B->hyps[at - 1].norm) at--;
    if (at == B->width) return;
    int32_t last = B->n_hyps < B->width ? B->n_hyps++ : B->width - 1;
    int32_t *spare = B->hyps[last].tokens;
    for (int32_t i = last; i > at; i--) B->hyps[i] = B->hyps[i - 1];
    B->hyps[at] = (beam_hyp){.norm = norm, .tokens = spare, .len = s->len};
    memcpy(spare, s->tokens, (size_t)s->len * sizeof(int32_t));
}

/* The best `2 * width` continuations of each beam, merged into one ranking; returns how many. */
static int32_t beam_rank(beam *B) {
    int32_t per = 2 * B->width, n_all = 0;
    beam_cand *all = B->cands;
    for (int32_t b = 0; b < B->n_beams; b++) {
        const float *l = B->logits + (size_t)b * (size_t)B->n_vocab;
        double top = l[tsr_argmax(l, B->n_vocab)], sum = 0;
        for (int32_t v = 0; v < B->n_vocab; v++) sum += exp((double)l[v] - top);
        double lse = top + log(sum);
        beam_cand own[2 * BEAM_MAX_WIDTH];
        int32_t n_own = 0;
        for (int32_t v = 0; v < B->n_vocab; v++)
            beam_cand_insert(own, &n_own, per,
                             (beam_cand){B->beams[b].score + ((double)l[v] - lse), b, v});
        for (int32_t i = 0; i < n_own; i++) beam_cand_insert(all, &n_all, per * B->width, own[i]);
    }
    return n_all;
}

/* Moves the beams to the chosen continuations: ends the sequences of beams left with none,
 * forks those with several, appends each token. */
static tsr_status beam_advance(beam *B, const tsr_decode_api *api, tsr_draft_seqs *seqs,
                               const beam_cand *chosen, int32_t n_chosen) {
    int32_t children[BEAM_MAX_WIDTH] = {0};
    for (int32_t i = 0; i < n_chosen; i++) children[chosen[i].beam]++;
    for (int32_t b = 0; b < B->n_beams; b++)
        if (!children[b]) {
            api->seq_end(api->ctx, B->beams[b].seq);
            seqs->alive &= ~(1ull << B->beams[b].seq);
        }
    tsr_status st = TSR_OK;
    int32_t used[BEAM_MAX_WIDTH] = {0};
    for (int32_t i = 0; i < n_chosen && st >= 0; i++) {
        const beam_state *src = &B->beams[chosen[i].beam];
        beam_state *dst = &B->next[i];
        dst->seq = src->seq;
        if (used[chosen[i].beam]++) st = tsr_draft_seqs_fork(seqs, api, src->seq, &dst->seq);
        memcpy(dst->tokens, src->tokens, (size_t)src->len * sizeof(int32_t));
        dst->tokens[src->len] = chosen[i].token;
        dst->len = src->len + 1;
        dst->score = chosen[i].score;
    }
    for (int32_t i = 0; i < n_chosen; i++) {
        beam_state t = B->beams[i];
        B->beams[i] = B->next[i];
        B->next[i] = t;
    }
    B->n_beams = n_chosen;
    return st;
}

static tsr_status beam_search(beam *B, const tsr_decode_api *api, tsr_draft_text *t,
                              int64_t max_new) {
    tsr_draft_seqs seqs = {.alive = 1};
    tsr_status st = TSR_OK;
    /* The root: sequence 0 with the prompt's last token pending. */
    B->beams[0].seq = 0;
    B->beams[0].score = 0;
    B->beams[0].len = 0;
    B->n_beams = 1;
    B->n_hyps = 0;
    int32_t pending = t->tokens[t->n - 1];
    for (;;) {
        for (int32_t b = 0; b < B->n_beams; b++)
            B->batch[b] = (tsr_batch_entry){
                .seq_id = B->beams[b].seq, .pos = (int32_t)(t->n - 1 + B->beams[b].len),
                .token = B->beams[b].len ? B->beams[b].tokens[B->beams[b].len - 1] : pending,
                .want_logits = 1};
        if ((st = tsr_draft_forward(t, B->batch, B->n_beams, B->logits)) < 0) break;
        int32_t n_all = beam_rank(B), n_chosen = 0;
        beam_cand chosen[BEAM_MAX_WIDTH];
        for (int32_t r = 0; r < n_all && n_chosen < B->width; r++) {
            const beam_cand *c = &B->cands[r];
            if (!api->is_eog(api->ctx, c->token)) chosen[n_chosen++] = *c;
            else if (r < B->width) beam_finish(B, &B->beams[c->beam], c->score);
        }
        if (B->n_hyps >= B->width || n_chosen == 0) break;
        if ((st = beam_advance(B, api, &seqs, chosen, n_chosen)) < 0) break;
        /* The token limit, or no position left for the pending tokens: every beam finishes. */
        if (B->beams[0].len >= max_new || t->n - 1 + B->beams[0].len >= api->n_ctx) {
            for (int32_t b = 0; b < B->n_beams; b++) beam_finish(B, &B->beams[b], B->beams[b].score);
            break;
        }
    }
    tsr_draft_seqs_keep(&seqs, api, 0);
    return st;
}

static tsr_status beam_generate(void *self, const tsr_decode_api *api,
                                const tsr_generate_request *req) {
    beam *B = self;
    if (api->n_vocab != B->n_vocab || api->n_ctx > B->n_ctx) {
        B->host->set_error(B->host->ctx, "generate: vocabulary of %d tokens and context of %d, "
                           "created for %d and %d", (int)api->n_vocab, (int)api->n_ctx,
                           (int)B->n_vocab, (int)B->n_ctx);
        return TSR_E_INVALID;
    }
    B->stats = (tsr_decoder_stats){.struct_size = sizeof B->stats};
    tsr_draft_text t;
    tsr_status st = tsr_draft_text_begin(&t, B->host, api, req, &B->stats);
    if (st >= 0 && !t.done) {
        st = beam_search(B, api, &t, req->max_new_tokens);
        if (st >= 0 && B->n_hyps > 0) {
            B->last_score = B->hyps[0].norm;
            if (B->hyps[0].len > 0) api->emit(api->ctx, B->hyps[0].tokens, B->hyps[0].len);
        }
    }
    tsr_draft_text_end(&t);
    return st;
}

static int32_t beam_pick(void *self, const float *logits, const int32_t *history,
                         int64_t n_history) {
    return tsr_argmax(logits, ((const beam *)self)->n_vocab);
}

static void beam_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const beam *)self)->stats);
}

static double beam_score(void *self) { return ((const beam *)self)->last_score; }

static void beam_destroy(void *self) {
    beam *B = self;
    B->host->free(B->host->ctx, B->store);
    B->host->free(B->host->ctx, B->cands);
    B->host->free(B->host->ctx, B->logits);
    B->host->free(B->host->ctx, B);
}

static tsr_status beam_create(const tsr_host *host, const tsr_params *params,
                              const tsr_decoder_init *init, void **out) {
    if (init->n_vocab <= 0 || init->n_ctx <= 0) {
        host->set_error(host->ctx, "n_vocab %d, n_ctx %d: expected positive sizes",
                        (int)init->n_vocab, (int)init->n_ctx);
        return TSR_E_INVALID;
    }
    beam *B = tsr_calloc(host, 1, sizeof *B);
    if (!B) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    B->host = host;
    B->n_vocab = init->n_vocab;
    B->n_ctx = init->n_ctx;
    B->width = (int32_t)tsr_param_int(params, "width");
    B->alpha = tsr_param_float(params, "length_penalty");
    size_t w = (size_t)B->width;
    B->store = tsr_calloc(host, 3 * w * (size_t)B->n_ctx, sizeof(int32_t));
    B->cands = tsr_calloc(host, 2 * w * w, sizeof *B->cands);
    B->logits = tsr_calloc(host, w * (size_t)B->n_vocab, sizeof(float));
    if (!B->store || !B->cands || !B->logits) {
        beam_destroy(B);
        host->set_error(host->ctx, "out of memory for %d beams of %d tokens",
                        (int)tsr_param_int(params, "width"), (int)init->n_ctx);
        return TSR_E_NOMEM;
    }
    for (size_t i = 0; i < w; i++) {
        B->beams[i].tokens = B->store + i * (size_t)B->n_ctx;
        B->next[i].tokens = B->store + (w + i) * (size_t)B->n_ctx;
        B->hyps[i].tokens = B->store + (2 * w + i) * (size_t)B->n_ctx;
    }
    *out = B;
    return TSR_OK;
}

static const tsr_param_def beam_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "width", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 1, .max = BEAM_MAX_WIDTH,
     .doc = "beams kept, each a sequence (the host keeps 16 at most)"},
    {TSR_SIZED(tsr_param_def), .name = "length_penalty", .type = TSR_PARAM_FLOAT,
     .default_value = "1.0", .min = -10, .max = 10,
     .doc = "alpha of score / length^alpha: above 0 favours longer outputs, 0 = sum of log-probs"},
};

static const tsr_command beam_commands[] = {
    {TSR_SIZED(tsr_command), .name = "score", .signature = "d(I)", .fn = (void (*)(void))beam_score,
     .doc = "score of the last emitted output: sum of log-probabilities / length^length_penalty"},
};

static const tsr_decoder_vtable beam_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = beam_create,
    .destroy = beam_destroy,
    .generate = beam_generate,
    .pick = beam_pick,
    .stats = beam_stats,
};

static const tsr_plugin_desc beam_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "beam",
    .version = "1.0",
    .description = "beam search with a length penalty, one forked sequence per beam",
    TSR_PARAMS(beam_params),
    TSR_COMMANDS(beam_commands),
    .vtable = &beam_vtable,
};

TSR_PLUGIN_EXPORT(&beam_desc)
