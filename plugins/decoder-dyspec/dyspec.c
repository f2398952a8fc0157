/*
 * decoder 'dyspec': DySpec (Yunfan Xiong, Ruoyu Zhang, Yanzeng Li, Tianhao Wu, Lei Zou, "DySpec:
 * Faster Speculative Decoding with Dynamic Token Tree Structure", arXiv 2410.11744), with the
 * pipeline's draft model, greedy acceptance.
 *
 * The draft grows a token tree whose shape follows its own confidence: the paper finds the
 * draft's probability of a token strongly correlated with the target accepting it, so a node's
 * value is the product of the draft's probabilities along its path (its estimated chance of
 * being accepted), and the tree grows greedily: the candidate of highest value joins the tree,
 * the draft runs on it, and its `branch` most likely continuations become candidates, until the
 * tree holds `budget` tokens. Where the paper expands one node per draft call (and batches them
 * by layers in its implementation), this expands the `expand` best candidates per draft
 * forward, each on a draft sequence of its own (forked from its parent's).
 *
 * The target verifies the whole tree in one forward. This ABI has no tree attention mask: each
 * root-to-leaf path runs on a target sequence of its own, forked from the text's, so a prefix
 * shared by several paths is computed once per path. The path accepted furthest is kept (the
 * most valuable one on ties), the others end; the output is exactly `greedy`'s.
 */
#include <math.h>

#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

#define DYSPEC_MAX_BUDGET 15
#define DYSPEC_MAX_BRANCH 4
/* The tree's nodes, the candidates around them and the root. */
#define DYSPEC_MAX_NODES (1 + DYSPEC_MAX_BUDGET * (1 + DYSPEC_MAX_BRANCH) + DYSPEC_MAX_BRANCH)

typedef struct dy_node {
    int32_t token, parent, depth;
    double value;  /* the product of the draft's probabilities along the path */
    int in_tree;   /* 0: a candidate */
    int has_child; /* a tree node below it */
    int64_t dseq;  /* the draft sequence that held its path when the draft ran on it, or -1 */
} dy_node;

typedef struct dyspec {
    const tsr_host *host;
    int32_t n_vocab;
    int32_t budget, branch, expand;
    dy_node nodes[DYSPEC_MAX_NODES];
    int32_t n_nodes;
    int32_t dlen[64]; /* positions each draft sequence holds */
    tsr_batch_entry batch[(DYSPEC_MAX_BUDGET + 1) * (DYSPEC_MAX_BUDGET + 1)];
    float *logits;       /* (budget * (budget + 1), n_vocab) the target's, one row per entry */
    float *draft_logits; /* (max(expand, 1), n_vocab) */
    tsr_decoder_stats stats;
} dyspec;

/* Adds the `branch` most likely continuations of node p, from the draft's logits after it, as
 * candidates. */
static void dy_candidates(dyspec *D, int32_t p, const float *logits) {
    double top = logits[tsr_argmax(logits, D->n_vocab)], sum = 0;
    for (int32_t v = 0; v < D->n_vocab; v++) sum += exp((double)logits[v] - top);
    int32_t chosen[DYSPEC_MAX_BRANCH];
    for (int32_t c = 0; c < D->branch; c++) {
        int32_t best = -1;
        for (int32_t v = 0; v < D->n_vocab; v++) {
            int taken = 0;
            for (int32_t k = 0; k < c; k++) taken |= chosen[k] == v;
            if (!taken && (best < 0 || logits[v] > logits[best])) best = v;
        }
        chosen[c] = best;
        D->nodes[D->n_nodes++] = (dy_node){
            .token = best, .parent = p, .depth = D->nodes[p].depth + 1, .dseq = -1,
            .value = D->nodes[p].value * exp((double)logits[best] - top) / sum};
    }
}

/* Moves the best candidate into the tree; -1 when there is none. */
static int32_t dy_take_best(dyspec *D) {
    int32_t best = -1;
    for (int32_t i = 1; i < D->n_nodes; i++)
        if (!D->nodes[i].in_tree && (best < 0 || D->nodes[i].value > D->nodes[best].value))
            best = i;
    if (best >= 0) {
        D->nodes[best].in_tree = 1;
        D->nodes[D->nodes[best].parent].has_child = 1;
    }
    return best;
}

/* Runs the draft on nodes[ids[0..n)] (each just taken into the tree) in one forward, each on
 * its parent's sequence when that still ends at the parent, else on a fork of it cut back to
 * the parent, and adds their candidates. */
static tsr_status dy_draft_expand(dyspec *D, const tsr_decode_api *d, tsr_draft_seqs *dseqs,
                                  const int32_t *ids, int32_t n, int32_t root_pos) {
    tsr_status st = TSR_OK;
    tsr_batch_entry entries[DYSPEC_MAX_BUDGET];
    for (int32_t i = 0; i < n && st >= 0; i++) {
        dy_node *v = &D->nodes[ids[i]];
        const dy_node *p = &D->nodes[v->parent];
        int32_t end = root_pos + p->depth + 1; /* positions of the path to the parent */
        v->dseq = p->dseq;
        int shared = 0;
        for (int32_t k = 0; k < i; k++) shared |= D->nodes[ids[k]].dseq == p->dseq;
        if (shared || D->dlen[p->dseq] != end) {
            if ((st = tsr_draft_seqs_fork(dseqs, d, p->dseq, &v->dseq)) < 0) break;
            if (D->dlen[p->dseq] > end && (st = d->seq_truncate(d->ctx, v->dseq, end)) < 0) break;
            D->dlen[v->dseq] = end;
        }
        entries[i] = (tsr_batch_entry){.seq_id = v->dseq, .pos = end, .token = v->token,
                                       .want_logits = 1};
    }
    if (st < 0) return st;
    uint64_t t0 = tsr_draft_now(D->host);
    st = d->forward(d->ctx, entries, n, D->draft_logits);
    D->stats.draft_ns += tsr_draft_now(D->host) - t0;
    for (int32_t i = 0; i < n && st >= 0; i++) {
        D->dlen[D->nodes[ids[i]].dseq]++;
        dy_candidates(D, ids[i], D->draft_logits + (size_t)i * (size_t)D->n_vocab);
    }
    return st;
}

/* Grows the tree after the text's pending token on the draft, whose sequence 0 the model
 * `dm` brings to the text first. */
static tsr_status dy_grow(dyspec *D, tsr_draft_text *t, tsr_draft_model *dm,
                          tsr_draft_seqs *dseqs, int64_t max_depth) {
    const tsr_decode_api *d = dm->api;
    D->nodes[0] = (dy_node){.token = t->tokens[t->n - 1], .parent = -1, .in_tree = 1,
                            .value = 1, .dseq = 0};
    D->n_nodes = 1;
    if (max_depth == 0) return TSR_OK;
    tsr_status st = tsr_draft_model_sync(dm, t->tokens, t->n, D->draft_logits);
    if (st < 0) return st;
    D->dlen[0] = (int32_t)t->n;
    dy_candidates(D, 0, D->draft_logits);
    const int32_t root_pos = (int32_t)t->n - 1;
    for (int32_t size = 0; size < D->budget && st >= 0;) {
        int32_t ids[DYSPEC_MAX_BUDGET], n = 0, taken = -1;
        while (n < D->expand && size < D->budget && (taken = dy_take_best(D)) >= 0) {
            size++;
            /* A node at the deepest level has no continuation to find. */
            if (D->nodes[taken].depth < max_depth) ids[n++] = taken;
        }
        if (size == D->budget || taken < 0) break;
        if (n > 0) st = dy_draft_expand(D, d, dseqs, ids, n, root_pos);
    }
    /* The draft's sequence 0 ran on the nodes of one path, which it now holds. */
    for (int32_t i = 1; i < D->n_nodes; i++)
        if (D->nodes[i].dseq == 0) dm->held[root_pos + D->nodes[i].depth] = D->nodes[i].token;
    dm->n_held = D->dlen[0];
    return st;
}

static tsr_status dyspec_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    dyspec *D = self;
    const tsr_decode_api *d;
    tsr_status st = tsr_draft_check_api(D->host, api, D->n_vocab, &d);
    if (st < 0) return st;
    D->stats = (tsr_decoder_stats){.struct_size = sizeof D->stats};
    tsr_draft_text t;
    tsr_draft_model dm = {0};
    st = tsr_draft_text_begin(&t, D->host, api, req, &D->stats);
    if (st >= 0) st = tsr_draft_model_begin(&dm, D->host, d, &D->stats);
    tsr_draft_seqs seqs = {.alive = 1}, dseqs = {.alive = 1};
    while (st >= 0 && !t.done) {
        /* No path deeper than the room, nor than the draft's context. */
        int64_t depth = tsr_draft_text_room(&t);
        if (depth > d->n_ctx - t.n) depth = d->n_ctx - t.n;
        if (depth < 0) depth = 0;
        if ((st = dy_grow(D, &t, &dm, &dseqs, depth)) < 0) break;
        tsr_draft_seqs_keep(&dseqs, d, 0);
        /* The leaves' paths, most valuable first: the first on the text's sequence. */
        int32_t leaves[DYSPEC_MAX_BUDGET + 1], n_leaves = 0;
        for (int32_t i = 0; i < D->n_nodes; i++)
            if (D->nodes[i].in_tree && !D->nodes[i].has_child) {
                int32_t at = n_leaves++;
                while (at > 0 && D->nodes[i].value > D->nodes[leaves[at - 1]].value) {
                    leaves[at] = leaves[at - 1];
                    at--;
                }
                leaves[at] = i;
            }
        int32_t path[DYSPEC_MAX_BUDGET + 1][DYSPEC_MAX_BUDGET];
        int64_t len[DYSPEC_MAX_BUDGET + 1], seq[DYSPEC_MAX_BUDGET + 1], n = 0;
        seq[0] = t.seq;
        for (int32_t l = 0; l < n_leaves && st >= 0; l++) {
            len[l] = D->nodes[leaves[l]].depth;
            for (int32_t j = leaves[l]; j > 0; j = D->nodes[j].parent)
                path[l][D->nodes[j].depth - 1] = D->nodes[j].token;
            if (l > 0) st = tsr_draft_seqs_fork(&seqs, api, t.seq, &seq[l]);
        }
        for (int32_t l = 0; l < n_leaves && st >= 0; l++)
            n += tsr_draft_batch(D->batch + n, seq[l], &t, path[l], len[l]);
        if (st < 0 || (st = tsr_draft_forward(&t, D->batch, n, D->logits)) < 0) break;
        int32_t out[DYSPEC_MAX_BUDGET + 1][DYSPEC_MAX_BUDGET + 1];
        int64_t kept[DYSPEC_MAX_BUDGET + 1], win = 0, row = 0;
        for (int32_t l = 0; l < n_leaves; l++) {
            kept[l] = tsr_draft_accept_greedy(D->logits + row * D->n_vocab, D->n_vocab, path[l],
                                              len[l], out[l]);
            if (kept[l] > kept[win]) win = l;
            row += len[l] + 1;
        }
        /* Every tree node was proposed once, at its depth; the kept path's first kept - 1. */
        int accepted[DYSPEC_MAX_NODES] = {0};
        for (int32_t j = leaves[win]; j > 0; j = D->nodes[j].parent)
            accepted[j] = D->nodes[j].depth < kept[win];
        for (int32_t i = 1; i < D->n_nodes; i++)
            if (D->nodes[i].in_tree)
                tsr_decoder_stats_one(&D->stats, D->nodes[i].depth - 1, accepted[i]);
        tsr_draft_seqs_keep(&seqs, api, seq[win]);
        st = tsr_draft_text_commit(&t, seq[win], out[win], kept[win]);
    }
    tsr_draft_seqs_keep(&seqs, api, 0);
    tsr_draft_seqs_keep(&dseqs, d, 0);
    if (dm.held) tsr_draft_model_end(&dm);
    tsr_draft_text_end(&t);
    return st;
}

static int32_t dyspec_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    return tsr_argmax(logits, ((const dyspec *)self)->n_vocab);
}

static void dyspec_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const dyspec *)self)->stats);
}

static void dyspec_destroy(void *self) {
    dyspec *D = self;
    D->host->free(D->host->ctx, D->logits);
    D->host->free(D->host->ctx, D->draft_logits);
    D->host->free(D->host->ctx, D);
}

static tsr_status dyspec_create(const tsr_host *host, const tsr_params *params,
                                const tsr_decoder_init *init, void **out) {
    tsr_status st = tsr_draft_check_init(host, init, 1);
    if (st < 0) return st;
    dyspec *D = tsr_calloc(host, 1, sizeof *D);
    if (!D) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    D->host = host;
    D->n_vocab = init->n_vocab;
    D->budget = (int32_t)tsr_param_int(params, "budget");
    D->branch = (int32_t)tsr_param_int(params, "branch");
    D->expand = (int32_t)tsr_param_int(params, "expand");
    size_t rows = (size_t)D->budget * (size_t)(D->budget + 1);
    D->logits = tsr_calloc(host, rows * (size_t)D->n_vocab, sizeof(float));
    D->draft_logits = tsr_calloc(host, (size_t)D->expand * (size_t)D->n_vocab, sizeof(float));
    if (!D->logits || !D->draft_logits) {
        dyspec_destroy(D);
        host->set_error(host->ctx, "out of memory for a tree of %lld tokens over a vocabulary "
                        "of %d", (long long)tsr_param_int(params, "budget"), (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    *out = D;
    return TSR_OK;
}

static const tsr_param_def dyspec_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "budget", .type = TSR_PARAM_INT, .default_value = "8",
     .min = 1, .max = DYSPEC_MAX_BUDGET, .unit = "tokens",
     .doc = "tokens of the draft tree verified per target forward (each leaf a sequence)"},
    {TSR_SIZED(tsr_param_def), .name = "branch", .type = TSR_PARAM_INT, .default_value = "2",
     .min = 1, .max = DYSPEC_MAX_BRANCH,
     .doc = "continuations of a tree node that become candidates"},
    {TSR_SIZED(tsr_param_def), .name = "expand", .type = TSR_PARAM_INT, .default_value = "1",
     .min = 1, .max = DYSPEC_MAX_BUDGET,
     .doc = "candidates that join the tree per draft forward (1: the paper's one by one)"},
};

static const tsr_decoder_vtable dyspec_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = dyspec_create,
    .destroy = dyspec_destroy,
    .generate = dyspec_generate,
    .pick = dyspec_pick,
    .stats = dyspec_stats,
    .draft_use = TSR_DECODER_DRAFT_REQUIRED,
};

static const tsr_plugin_desc dyspec_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "dyspec",
    .version = "1.0",
    .description = "DySpec: a token tree grown by the draft's confidence, verified in one "
                   "forward; greedy's tokens",
    TSR_PARAMS(dyspec_params),
    .vtable = &dyspec_vtable,
};

TSR_PLUGIN_EXPORT(&dyspec_desc)
