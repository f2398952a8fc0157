/*
 * decoder 'aded': adaptive draft-verification (ADED: Liu, Lei, Zhang and Xu, "Adaptive
 * Draft-Verification for Efficient Large Language Model Decoding", AAAI 2025, arXiv
 * 2407.12021). No draft model: a tri-gram table stands for the model. It maps the last two
 * tokens to the tokens that followed them, with counts, keeping the `top` most frequent
 * followers of each pair (the paper prunes its corpus matrix to the top 12), and it adapts as
 * it decodes: every token the target accepts counts at once, so the drafts move toward what
 * this model says in this text. The paper starts from a corpus; here the table starts from the
 * prompt and, with `persist`, keeps what earlier requests taught it (ADED's "the more it is
 * used").
 *
 * Drafts come from a search in the spirit of the paper's MCTS draft maker: a tree rooted at
 * the pending token whose children are a node's followers in the table, grown by `sims`
 * simulations that descend by PUCT (AlphaZero / MuZero's rule, the paper's choice: the mean
 * value plus the prior times sqrt(parent visits) / (1 + visits) times c1 + log((parent visits +
 * c2 + 1) / c2), c1 = `explore`, c2 = 19652), expand the node they reach and back up its value:
 * the product of the priors along its path, the table's estimate that the target accepts all
 * of it. The `branches` most probable ends of the visited tree, each continued by the table's
 * most frequent follower up to `draft` tokens, are verified in one forward, each branch on a
 * sequence of its own (the paper uses a tree mask; this ABI has forked sequences). The branch
 * whose tokens the target's argmax accepts furthest is kept, the others are ended; the output
 * is exactly `greedy`'s. With `adaptive` the draft length follows acceptance (tsr_draft_len).
 */
#include <math.h>

#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

#define ADED_C2 19652.0
#define ADED_MAX_BRANCHES 8
/* Counts are halved when one reaches this, so old evidence fades and new evidence counts. */
#define ADED_COUNT_CAP 1024

/* One context of the table: the pair (a, b) and its followers, most frequent first. */
typedef struct aded_ctx {
    uint64_t key; /* (a << 32 | b) + 1; 0 marks an empty slot */
    int32_t n;    /* followers held */
} aded_ctx;

typedef struct aded_node {
    int32_t token, parent, first_child, n_children, depth;
    int32_t expanded;
    double prior, prob; /* prior: the table's P(token | parent's context); prob: along the path */
    double visits, value_sum;
} aded_node;

typedef struct aded {
    const tsr_host *host;
    int32_t n_vocab;
    int64_t draft_max, n_branches, n_sims, top, capacity;
    double explore;
    int persist, adaptive;

    /* The table: open addressing over `slots` (a power of two, at least twice capacity). */
    aded_ctx *ctx;      /* (slots) */
    int32_t *follower;  /* (slots, top) token ids */
    uint32_t *count;    /* (slots, top) */
    int64_t slots, used;

    aded_node *nodes;   /* (n_sims * top + 1) the search tree */
    int32_t n_nodes;

    tsr_batch_entry *batch; /* (n_branches * (draft_max + 1)) */
    float *logits;          /* (n_branches * (draft_max + 1), n_vocab) */
    tsr_decoder_stats stats;
} aded;

/* ---- the tri-gram table ------------------------------------------------------------------- */

static uint64_t aded_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
}

/* The slot of context (a, b), or the empty slot where it would go. */
static int64_t aded_slot(const aded *A, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    for (int64_t i = (int64_t)(h >> 20 & (uint64_t)(A->slots - 1));; i = (i + 1) & (A->slots - 1))
        if (A->ctx[i].key == key || A->ctx[i].key == 0) return i;
}

static void aded_clear(aded *A) {
    memset(A->ctx, 0, (size_t)A->slots * sizeof *A->ctx);
    A->used = 0;
}

/* Counts `next` after (a, b). A new pair takes a slot while fewer than `capacity` are used; a
 * new follower of a full pair replaces its least frequent one. */
static void aded_observe(aded *A, int32_t a, int32_t b, int32_t next) {
    uint64_t key = aded_key(a, b);
    int64_t s = aded_slot(A, key);
    aded_ctx *c = &A->ctx[s];
    if (c->key == 0) {
        if (A->used >= A->capacity) return;
        *c = (aded_ctx){.key = key};
        A->used++;
    }
    int32_t *tok = A->follower + s * A->top;
    uint32_t *cnt = A->count + s * A->top;
    int32_t i = 0;
    while (i < c->n && tok[i] != next) i++;
    if (i == c->n) {
        if (c->n < A->top) c->n++;
        i = c->n - 1;
        tok[i] = next;
        cnt[i] = 0;
    }
    if (++cnt[i] >= ADED_COUNT_CAP)
        for (int32_t j = 0; j < c->n; j++) cnt[j] = (cnt[j] + 1) / 2;
    /* Keep the most frequent first; among equals the latest seen first. */
    for (; i > 0 && cnt[i] >= cnt[i - 1]; i--) {
        int32_t t = tok[i];
        uint32_t n = cnt[i];
        tok[i] = tok[i - 1];
        cnt[i] = cnt[i - 1];
        tok[i - 1] = t;
        cnt[i - 1] = n;
    }
}

/* The followers of (a, b): their count, ids in *tok and counts in *cnt. */
static int32_t aded_followers(const aded *A, int32_t a, int32_t b, const int32_t **tok,
                              const uint32_t **cnt) {
    int64_t s = aded_slot(A, aded_key(a, b));
    if (A->ctx[s].key == 0) return 0;
    *tok = A->follower + s * A->top;
    *cnt = A->count + s * A->top;
    return A->ctx[s].n;
}

/* ---- the draft search --------------------------------------------------------------------- */

/* The token before node i on its path (the text's tokens before the root). */
static int32_t aded_before(const aded *A, int32_t i, const int32_t *text, int64_t n) {
    int32_t p = A->nodes[i].parent;
    return p >= 0 ? A->nodes[p].token : n >= 2 ? text[n - 2] : -1;
}

static void aded_expand(aded *A, int32_t i, const int32_t *text, int64_t n) {
    aded_node *node = &A->nodes[i];
    node->expanded = 1;
    const int32_t *tok;
    const uint32_t *cnt;
    int32_t k = aded_followers(A, aded_before(A, i, text, n), node->token, &tok, &cnt);
    double total = 0;
    for (int32_t j = 0; j < k; j++) total += cnt[j];
    node->first_child = A->n_nodes;
    node->n_children = k;
    for (int32_t j = 0; j < k; j++)
        A->nodes[A->n_nodes++] = (aded_node){
            .token = tok[j], .parent = i, .first_child = -1, .depth = node->depth + 1,
            .prior = cnt[j] / total, .prob = node->prob * cnt[j] / total};
}

/* The child of node i that PUCT selects (ties: the more frequent follower, listed first). */
static int32_t aded_select(const aded *A, int32_t i) {
    const aded_node *node = &A->nodes[i];
    double scale = sqrt(node->visits) * (A->explore + log((node->visits + ADED_C2 + 1) / ADED_C2));
    int32_t best = node->first_child;
    double best_score = -1;
    for (int32_t c = node->first_child; c < node->first_child + node->n_children; c++) {
        const aded_node *ch = &A->nodes[c];
        double q = ch->visits > 0 ? ch->value_sum / ch->visits : 0;
        double score = q + ch->prior * scale / (1 + ch->visits);
        if (score > best_score) {
            best_score = score;
            best = c;
        }
    }
    return best;
}

/* Grows the tree from the pending token (the text's last) with n_sims simulations. */
static void aded_search(aded *A, const int32_t *text, int64_t n, int64_t depth_max) {
    A->nodes[0] = (aded_node){.token = text[n - 1], .parent = -1, .first_child = -1, .prob = 1};
    A->n_nodes = 1;
    for (int64_t s = 0; s < A->n_sims; s++) {
        int32_t i = 0;
        while (A->nodes[i].expanded && A->nodes[i].n_children > 0 &&
               A->nodes[i].depth < depth_max)
            i = aded_select(A, i);
        if (!A->nodes[i].expanded && A->nodes[i].depth < depth_max) aded_expand(A, i, text, n);
        double value = A->nodes[i].prob;
        for (int32_t j = i; j >= 0; j = A->nodes[j].parent) {
            A->nodes[j].visits += 1;
            A->nodes[j].value_sum += value;
        }
    }
}

/* Whether node i ends the visited tree: visited, and none of its children is (the root, when
 * the search never went below it). */
static int aded_is_end(const aded *A, int32_t i) {
    const aded_node *node = &A->nodes[i];
    if (node->visits == 0) return 0;
    for (int32_t c = node->first_child; c < node->first_child + node->n_children; c++)
        if (A->nodes[c].visits > 0) return 0;
    return 1;
}

/* Writes the path to node i (root excluded), continued by the table's most frequent follower,
 * into draft; returns its length, at most depth_max. */
static int64_t aded_path(const aded *A, int32_t i, const int32_t *text, int64_t n,
                         int64_t depth_max, int32_t *draft) {
    int64_t len = A->nodes[i].depth;
    for (int32_t j = i; j > 0; j = A->nodes[j].parent) draft[A->nodes[j].depth - 1] = A->nodes[j].token;
    while (len < depth_max) {
        int32_t a = len >= 2 ? draft[len - 2] : len == 1 ? text[n - 1] : (n >= 2 ? text[n - 2] : -1);
        int32_t b = len >= 1 ? draft[len - 1] : text[n - 1];
        const int32_t *tok;
        const uint32_t *cnt;
        if (aded_followers(A, a, b, &tok, &cnt) == 0) break;
        draft[len++] = tok[0];
    }
    return len;
}

/* Up to n_branches drafts of at most depth_max tokens (draft + b * draft_max holds branch b,
 * len[b] its length): the ends of the visited tree with the highest path probability. Returns
 * the branch count, at least 1 (an empty draft when the table knows nothing after the pending
 * token). */
static int64_t aded_drafts(aded *A, const int32_t *text, int64_t n, int64_t depth_max,
                           int32_t *draft, int64_t *len) {
    len[0] = 0;
    if (depth_max == 0) return 1;
    aded_search(A, text, n, depth_max);
    int32_t chosen[ADED_MAX_BRANCHES];
    int64_t n_chosen = 0;
    while (n_chosen < A->n_branches) {
        int32_t best = -1;
        for (int32_t i = 0; i < A->n_nodes; i++) {
            if (!aded_is_end(A, i)) continue;
            int taken = 0;
            for (int64_t c = 0; c < n_chosen; c++) taken |= chosen[c] == i;
            if (!taken && (best < 0 || A->nodes[i].prob > A->nodes[best].prob)) best = i;
        }
        if (best < 0) break;
        chosen[n_chosen] = best;
        len[n_chosen] = aded_path(A, best, text, n, depth_max, draft + n_chosen * A->draft_max);
        n_chosen++;
    }
    return n_chosen;
}

/* ---- generation --------------------------------------------------------------------------- */

static void aded_observe_text(aded *A, const int32_t *text, int64_t from, int64_t n) {
    for (int64_t j = from < 2 ? 2 : from; j < n; j++) aded_observe(A, text[j - 2], text[j - 1], text[j]);
}

static tsr_status aded_generate(void *self, const tsr_decode_api *api,
                                const tsr_generate_request *req) {
    aded *A = self;
    tsr_status st = tsr_draft_check_api(A->host, api, A->n_vocab, NULL);
    if (st < 0) return st;
    A->stats = (tsr_decoder_stats){.struct_size = sizeof A->stats};
    if (!A->persist || A->used + api->n_ctx > A->capacity) aded_clear(A);
    tsr_draft_text t;
    st = tsr_draft_text_begin(&t, A->host, api, req, &A->stats);
    if (st >= 0) aded_observe_text(A, t.tokens, 0, t.n);
    tsr_draft_seqs seqs = {.alive = 1};
    const int64_t stride = A->draft_max;
    int32_t draft[ADED_MAX_BRANCHES * TSR_DECODER_MAX_DRAFT];
    int32_t out[ADED_MAX_BRANCHES * (TSR_DECODER_MAX_DRAFT + 1)];
    int64_t len[ADED_MAX_BRANCHES], seq[ADED_MAX_BRANCHES], accepted[ADED_MAX_BRANCHES];
    tsr_draft_len cap = tsr_draft_len_start(A->draft_max, A->adaptive);
    while (st >= 0 && !t.done) {
        uint64_t t0 = tsr_draft_now(A->host);
        int64_t room = tsr_draft_text_room(&t);
        int64_t nb = aded_drafts(A, t.tokens, t.n, room < cap.cap ? room : cap.cap, draft, len);
        A->stats.draft_ns += tsr_draft_now(A->host) - t0;
        seq[0] = t.seq;
        for (int64_t b = 1; b < nb && st >= 0; b++)
            st = tsr_draft_seqs_fork(&seqs, api, t.seq, &seq[b]);
        int64_t n = 0;
        for (int64_t b = 0; b < nb; b++)
            n += tsr_draft_batch(A->batch + n, seq[b], &t, draft + b * stride, len[b]);
        if (st < 0 || (st = tsr_draft_forward(&t, A->batch, n, A->logits)) < 0) break;
        int64_t win = 0, row = 0;
        for (int64_t b = 0; b < nb; b++) {
            accepted[b] = tsr_draft_accept_greedy(A->logits + row * A->n_vocab, A->n_vocab,
                                                  draft + b * stride, len[b],
                                                  out + b * (stride + 1));
            if (accepted[b] > accepted[win]) win = b;
            row += len[b] + 1;
        }
        /* Every branch's tokens were proposed; only the kept branch's count as accepted. */
        for (int64_t b = 0; b < nb; b++)
            tsr_decoder_stats_add(&A->stats, len[b], b == win ? accepted[b] - 1 : 0);
        tsr_draft_len_update(&cap, len[win], accepted[win] - 1);
        tsr_draft_seqs_keep(&seqs, api, seq[win]);
        int64_t before = t.n;
        st = tsr_draft_text_commit(&t, seq[win], out + win * (stride + 1), accepted[win]);
        aded_observe_text(A, t.tokens, before, t.n);
    }
    /* Every forked sequence ends; so does the text's when a forked branch won last. */
    tsr_draft_seqs_keep(&seqs, api, 0);
    tsr_draft_text_end(&t);
    return st;
}

static int32_t aded_pick(void *self, const float *logits, const int32_t *history,
                         int64_t n_history) {
    return tsr_argmax(logits, ((const aded *)self)->n_vocab);
}

static void aded_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const aded *)self)->stats);
}

static void aded_destroy(void *self) {
    aded *A = self;
    const tsr_host *h = A->host;
    h->free(h->ctx, A->ctx);
    h->free(h->ctx, A->follower);
    h->free(h->ctx, A->count);
    h->free(h->ctx, A->nodes);
    h->free(h->ctx, A->batch);
    h->free(h->ctx, A->logits);
    h->free(h->ctx, A);
}

static tsr_status aded_create(const tsr_host *host, const tsr_params *params,
                              const tsr_decoder_init *init, void **out) {
    tsr_status st = tsr_draft_check_init(host, init, 0);
    if (st < 0) return st;
    aded *A = tsr_calloc(host, 1, sizeof *A);
    if (!A) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    A->host = host;
    A->n_vocab = init->n_vocab;
    A->draft_max = tsr_param_int(params, "draft");
    A->n_branches = tsr_param_int(params, "branches");
    A->n_sims = tsr_param_int(params, "sims");
    A->top = tsr_param_int(params, "top");
    A->capacity = tsr_param_int(params, "contexts");
    A->explore = tsr_param_float(params, "explore");
    A->persist = tsr_param_bool(params, "persist");
    A->adaptive = tsr_param_bool(params, "adaptive");
    for (A->slots = 2; A->slots < 2 * A->capacity;) A->slots *= 2;
    size_t rows = (size_t)(A->n_branches * (A->draft_max + 1));
    A->ctx = tsr_calloc(host, (size_t)A->slots, sizeof *A->ctx);
    A->follower = tsr_calloc(host, (size_t)(A->slots * A->top), sizeof *A->follower);
    A->count = tsr_calloc(host, (size_t)(A->slots * A->top), sizeof *A->count);
    A->nodes = tsr_calloc(host, (size_t)(A->n_sims * A->top + 1), sizeof *A->nodes);
    A->batch = tsr_calloc(host, rows, sizeof *A->batch);
    A->logits = tsr_calloc(host, rows * (size_t)A->n_vocab, sizeof(float));
    if (!A->ctx || !A->follower || !A->count || !A->nodes || !A->batch || !A->logits) {
        aded_destroy(A);
        host->set_error(host->ctx, "out of memory for a table of %lld contexts of %lld "
                        "followers", (long long)tsr_param_int(params, "contexts"),
                        (long long)tsr_param_int(params, "top"));
        return TSR_E_NOMEM;
    }
    *out = A;
    return TSR_OK;
}

static const tsr_param_def aded_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "draft", .type = TSR_PARAM_INT, .default_value = "8",
     .min = 1, .max = TSR_DECODER_MAX_DRAFT, .unit = "tokens",
     .doc = "longest draft of a branch, verified in one forward"},
    {TSR_SIZED(tsr_param_def), .name = "branches", .type = TSR_PARAM_INT, .default_value = "1",
     .min = 1, .max = ADED_MAX_BRANCHES,
     .doc = "drafts verified side by side, each on a forked sequence"},
    {TSR_SIZED(tsr_param_def), .name = "sims", .type = TSR_PARAM_INT, .default_value = "16",
     .min = 1, .max = 4096, .doc = "simulations of the draft search per forward"},
    {TSR_SIZED(tsr_param_def), .name = "top", .type = TSR_PARAM_INT, .default_value = "12",
     .min = 1, .max = 64, .unit = "tokens",
     .doc = "followers kept per pair of tokens (the most frequent)"},
    {TSR_SIZED(tsr_param_def), .name = "contexts", .type = TSR_PARAM_INT,
     .default_value = "65536", .min = 16, .max = 1 << 24,
     .doc = "pairs of tokens the table holds at most"},
    {TSR_SIZED(tsr_param_def), .name = "explore", .type = TSR_PARAM_FLOAT, .default_value = "1.25",
     .min = 0, .max = 100, .doc = "PUCT's c1: how far the search strays from the likeliest"},
    {TSR_SIZED(tsr_param_def), .name = "persist", .type = TSR_PARAM_BOOL, .default_value = "true",
     .doc = "keep the table across requests (false: each starts from its prompt alone)"},
    {TSR_SIZED(tsr_param_def), .name = "adaptive", .type = TSR_PARAM_BOOL,
     .default_value = "true",
     .doc = "drafts from 1 token, doubling while the kept branch is accepted whole"},
};

static const tsr_decoder_vtable aded_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = aded_create,
    .destroy = aded_destroy,
    .generate = aded_generate,
    .pick = aded_pick,
    .stats = aded_stats,
};

static const tsr_plugin_desc aded_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "aded",
    .version = "1.0",
    .description = "ADED: drafts searched in a tri-gram table that adapts as it decodes, "
                   "verified in one forward; greedy's tokens",
    TSR_PARAMS(aded_params),
    .vtable = &aded_vtable,
};

TSR_PLUGIN_EXPORT(&aded_desc)
