/*
 * decoder 'lookahead': lookahead decoding (Fu, Bailis, Stoica and Zhang, "Break the Sequential
 * Dependency of LLM Inference Using Lookahead Decoding", ICML 2024, arXiv 2402.02057). No draft
 * model: the target itself guesses, by Jacobi iteration, and remembers the n-grams its guesses
 * trace.
 *
 * Each forward holds two branches beside the pending token I (at position p):
 *  - the lookahead branch: a window of `window` (W) columns and `ngram` - 1 (N - 1) levels of
 *    guessed tokens, level j of column i standing at position p + i + j (level 0 of column 0
 *    is I itself). Column i's chain reads I, level 0 of columns 1..i, then levels 1..N-2 of
 *    column i, so its last token sees the diagonal the paper's attention mask gives it; its
 *    logits' argmax is the new guess for level N-2 of column i once the levels shift up. The
 *    tokens each column held over the last N - 1 steps and its new guess form an n-gram
 *    (positions p + i .. p + i + N - 1), which goes into the pool under its first token;
 *  - the verification branch: up to `guess` (G) n-grams of the pool that start with I, each
 *    verified greedily after I. The one accepted furthest is kept, with the target's own token
 *    after it; the output is exactly `greedy`'s.
 * The pool keeps the G latest distinct n-grams per first token, and also takes those of the
 * prompt and of the accepted text (with `text_pool`, as the authors' and TensorRT-LLM's
 * implementations do).
 *
 * This ABI has no attention mask: every chain and every candidate runs on a sequence forked
 * from the text's (1 + W + G - 1 sequences; the host keeps 16), all in one forward. The forks
 * repeat I and the shared level-0 tokens that the paper's mask computes once.
 *
 * The guessing has no forward of its own: the Jacobi branch runs inside the verifying forward
 * (verify_ns). draft_ns is the time spent around it: choosing the pool's candidates, forking
 * and laying out the window, then taking the new guesses into the window and the pool.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

#define LA_MAX_W 8
#define LA_MAX_N 8
#define LA_MAX_G 8
/* Entries of one forward at most: G candidates of N tokens, W chains of up to W + N - 2. */
#define LA_MAX_ENTRIES (LA_MAX_G * LA_MAX_N + LA_MAX_W * (LA_MAX_W + LA_MAX_N))

typedef struct lookahead {
    const tsr_host *host;
    int32_t n_vocab;
    int32_t W, N, G;
    int text_pool;
    /* The pool: per first token, a ring of G n-grams of N - 1 tokens after it. */
    int32_t *pool;      /* (n_vocab, G, N - 1) */
    uint8_t *pool_n;    /* (n_vocab) n-grams held */
    uint8_t *pool_head; /* (n_vocab) where the next one goes */
    int32_t level[LA_MAX_N - 1][LA_MAX_W];
    tsr_batch_entry batch[LA_MAX_ENTRIES];
    float *logits; /* (G * N + W, n_vocab) */
    tsr_decoder_stats stats;
} lookahead;

/* Adds the n-gram first, rest[0..N-1) to the pool unless it holds it already. */
static void la_pool_add(lookahead *L, int32_t first, const int32_t *rest) {
    const int32_t n = L->N - 1;
    int32_t *ring = L->pool + (size_t)first * (size_t)(L->G * n);
    for (int32_t g = 0; g < L->pool_n[first]; g++)
        if (!memcmp(ring + g * n, rest, (size_t)n * sizeof *rest)) return;
    memcpy(ring + L->pool_head[first] * n, rest, (size_t)n * sizeof *rest);
    L->pool_head[first] = (uint8_t)((L->pool_head[first] + 1) % L->G);
    if (L->pool_n[first] < L->G) L->pool_n[first]++;
}

/* The pool's n-grams after `first`, the latest first: the g-th one's N - 1 tokens. */
static const int32_t *la_pool_get(const lookahead *L, int32_t first, int32_t g) {
    int32_t at = (L->pool_head[first] + L->G - 1 - g) % L->G;
    return L->pool + ((size_t)first * (size_t)L->G + (size_t)at) * (size_t)(L->N - 1);
}

/* The n-grams of text[0..n) ending at indices from..n-1. */
static void la_pool_add_text(lookahead *L, const int32_t *text, int64_t from, int64_t n) {
    for (int64_t j = from > L->N - 1 ? from : L->N - 1; L->text_pool && j < n; j++)
        la_pool_add(L, text[j - (L->N - 1)], text + j - (L->N - 2));
}

/* Appends chain `c` of the lookahead branch (column c, 0-based) to the batch on `seq`. */
static int64_t la_chain(const lookahead *L, tsr_batch_entry *b, int64_t seq, int32_t p,
                        int32_t pending, int32_t c) {
    int64_t n = 0;
    b[n++] = (tsr_batch_entry){.seq_id = seq, .pos = p, .token = pending};
    for (int32_t i = 1; i <= c; i++)
        b[n++] = (tsr_batch_entry){.seq_id = seq, .pos = p + i, .token = L->level[0][i]};
    for (int32_t j = 1; j < L->N - 1; j++)
        b[n++] = (tsr_batch_entry){.seq_id = seq, .pos = p + c + j, .token = L->level[j][c]};
    b[n - 1].want_logits = 1;
    return n;
}

/* After the step that emitted `accepted` (n tokens): the levels shift up once per token; after
 * the first the new top level is the chains' guesses (rows `guess`, one per column) and the
 * columns' n-grams enter the pool; after later ones it repeats level 0. */
static void la_shift(lookahead *L, int32_t pending, const float *guess, int32_t n_chains,
                     int64_t n) {
    const int32_t top = L->N - 2;
    for (int64_t v = 0; v < n; v++) {
        int32_t first[LA_MAX_W];
        memcpy(first, L->level[0], sizeof first);
        first[0] = pending;
        for (int32_t j = 0; j < top; j++) memcpy(L->level[j], L->level[j + 1], sizeof L->level[j]);
        for (int32_t i = 0; i < L->W; i++) {
            if (v > 0 || i >= n_chains) {
                L->level[top][i] = L->level[0][i];
                continue;
            }
            L->level[top][i] = tsr_argmax(guess + (size_t)i * (size_t)L->n_vocab, L->n_vocab);
            int32_t rest[LA_MAX_N - 1];
            for (int32_t j = 0; j <= top; j++) rest[j] = L->level[j][i];
            la_pool_add(L, first[i], rest);
        }
    }
}

static tsr_status lookahead_generate(void *self, const tsr_decode_api *api,
                                     const tsr_generate_request *req) {
    lookahead *L = self;
    tsr_status st = tsr_draft_check_api(L->host, api, L->n_vocab, NULL);
    if (st < 0) return st;
    L->stats = (tsr_decoder_stats){.struct_size = sizeof L->stats};
    memset(L->pool_n, 0, (size_t)L->n_vocab);
    memset(L->pool_head, 0, (size_t)L->n_vocab);
    tsr_draft_text t;
    st = tsr_draft_text_begin(&t, L->host, api, req, &L->stats);
    if (st >= 0) {
        la_pool_add_text(L, t.tokens, 0, t.n);
        /* The window starts as guesses from the prompt. */
        for (int32_t j = 0; j < L->N - 1; j++)
            for (int32_t i = 0; i < L->W; i++) L->level[j][i] = t.tokens[(i + j) % t.n];
    }
    tsr_draft_seqs seqs = {.alive = 1};
    const int32_t n_rest = L->N - 1;
    int32_t out[LA_MAX_G * LA_MAX_N];
    int64_t len[LA_MAX_G], seq[LA_MAX_G + LA_MAX_W], accepted[LA_MAX_G];
    while (st >= 0 && !t.done) {
        const int32_t p = (int32_t)(t.n - 1), pending = t.tokens[t.n - 1];
        uint64_t t0 = tsr_draft_now(L->host);
        int64_t room = tsr_draft_text_room(&t);
        int32_t n_cand = room > 0 ? L->pool_n[pending] : 0;
        if (n_cand == 0) n_cand = 1; /* the pending token alone on the text's sequence */
        /* Chains whose last token still has a position, while a later step may use them. */
        int32_t n_chains = 0;
        while (room > 0 && n_chains < L->W && p + n_chains + L->N - 2 < api->n_ctx) n_chains++;
        seq[0] = t.seq;
        for (int32_t b = 1; b < n_cand + n_chains && st >= 0; b++)
            st = tsr_draft_seqs_fork(&seqs, api, t.seq, &seq[b]);
        if (st < 0) break;
        int64_t n = 0;
        for (int32_t g = 0; g < n_cand; g++) {
            len[g] = L->pool_n[pending] && room > 0 ? (room < n_rest ? room : n_rest) : 0;
            const int32_t *draft = len[g] ? la_pool_get(L, pending, g) : NULL;
            n += tsr_draft_batch(L->batch + n, seq[g], &t, draft, len[g]);
        }
        for (int32_t c = 0; c < n_chains; c++)
            n += la_chain(L, L->batch + n, seq[n_cand + c], p, pending, c);
        L->stats.draft_ns += tsr_draft_now(L->host) - t0;
        if ((st = tsr_draft_forward(&t, L->batch, n, L->logits)) < 0) break;
        t0 = tsr_draft_now(L->host);
        int32_t win = 0;
        int64_t row = 0;
        for (int32_t g = 0; g < n_cand; g++) {
            const int32_t *draft = len[g] ? la_pool_get(L, pending, g) : NULL;
            accepted[g] = tsr_draft_accept_greedy(L->logits + row * L->n_vocab, L->n_vocab,
                                                  draft, len[g], out + g * LA_MAX_N);
            if (accepted[g] > accepted[win]) win = g;
            row += len[g] + 1;
        }
        for (int32_t g = 0; g < n_cand; g++)
            tsr_decoder_stats_add(&L->stats, len[g], g == win ? accepted[g] - 1 : 0);
        la_shift(L, pending, L->logits + row * L->n_vocab, n_chains, accepted[win]);
        L->stats.draft_ns += tsr_draft_now(L->host) - t0;
        tsr_draft_seqs_keep(&seqs, api, seq[win]);
        int64_t before = t.n;
        st = tsr_draft_text_commit(&t, seq[win], out + win * LA_MAX_N, accepted[win]);
        la_pool_add_text(L, t.tokens, before, t.n);
    }
    tsr_draft_seqs_keep(&seqs, api, 0);
    tsr_draft_text_end(&t);
    return st;
}

static int32_t lookahead_pick(void *self, const float *logits, const int32_t *history,
                              int64_t n_history) {
    return tsr_argmax(logits, ((const lookahead *)self)->n_vocab);
}

static void lookahead_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const lookahead *)self)->stats);
}

static void lookahead_destroy(void *self) {
    lookahead *L = self;
    const tsr_host *h = L->host;
    h->free(h->ctx, L->pool);
    h->free(h->ctx, L->pool_n);
    h->free(h->ctx, L->pool_head);
    h->free(h->ctx, L->logits);
    h->free(h->ctx, L);
}

static tsr_status lookahead_create(const tsr_host *host, const tsr_params *params,
                                   const tsr_decoder_init *init, void **out) {
    tsr_status st = tsr_draft_check_init(host, init, 0);
    if (st < 0) return st;
    lookahead *L = tsr_calloc(host, 1, sizeof *L);
    if (!L) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    L->host = host;
    L->n_vocab = init->n_vocab;
    L->W = (int32_t)tsr_param_int(params, "window");
    L->N = (int32_t)tsr_param_int(params, "ngram");
    L->G = (int32_t)tsr_param_int(params, "guess");
    L->text_pool = tsr_param_bool(params, "text_pool");
    size_t nv = (size_t)L->n_vocab;
    L->pool = tsr_calloc(host, nv * (size_t)(L->G * (L->N - 1)), sizeof *L->pool);
    L->pool_n = tsr_calloc(host, nv, 1);
    L->pool_head = tsr_calloc(host, nv, 1);
    L->logits = tsr_calloc(host, (size_t)(L->G * L->N + L->W) * nv, sizeof(float));
    if (!L->pool || !L->pool_n || !L->pool_head || !L->logits) {
        lookahead_destroy(L);
        host->set_error(host->ctx, "out of memory for a pool of %lld n-grams per token over a "
                        "vocabulary of %d", (long long)tsr_param_int(params, "guess"),
                        (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    *out = L;
    return TSR_OK;
}

static const tsr_param_def lookahead_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "3",
     .min = 1, .max = LA_MAX_W, .unit = "tokens",
     .doc = "W: columns of the Jacobi window, each a forked sequence"},
    {TSR_SIZED(tsr_param_def), .name = "ngram", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 2, .max = LA_MAX_N, .unit = "tokens",
     .doc = "N: length of the n-grams guessed and verified (N - 1 levels in the window)"},
    {TSR_SIZED(tsr_param_def), .name = "guess", .type = TSR_PARAM_INT, .default_value = "3",
     .min = 1, .max = LA_MAX_G,
     .doc = "G: n-grams of the pool verified per forward, each on a forked sequence"},
    {TSR_SIZED(tsr_param_def), .name = "text_pool", .type = TSR_PARAM_BOOL,
     .default_value = "true",
     .doc = "also pool the n-grams of the prompt and of the accepted text"},
};

static const tsr_decoder_vtable lookahead_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = lookahead_create,
    .destroy = lookahead_destroy,
    .generate = lookahead_generate,
    .pick = lookahead_pick,
    .stats = lookahead_stats,
};

static const tsr_plugin_desc lookahead_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "lookahead",
    .version = "1.0",
    .description = "lookahead decoding: Jacobi guesses and an n-gram pool, verified in the same "
                   "forward; greedy's tokens",
    TSR_PARAMS(lookahead_params),
    .vtable = &lookahead_vtable,
};

TSR_PLUGIN_EXPORT(&lookahead_desc)
