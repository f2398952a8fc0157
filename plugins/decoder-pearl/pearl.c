/*
 * decoder 'pearl': PEARL (Tianyu Liu, Yun Li, Qitan Lv, Kai Liu, Jianchen Zhu, Winston Hu, Xiao
 * Sun, "PEARL: Parallel Speculative Decoding with Adaptive Draft Length", ICLR 2025, arXiv
 * 2408.11850; github.com/smart-lty/ParallelSpeculativeDecoding), with the pipeline's draft
 * model, greedy acceptance.
 *
 * Speculative decoding makes each model wait for the other. PEARL runs a draft round and a
 * target round side by side, switching between two strategies:
 *  - pre-verify: while the draft proposes `window` tokens, the target runs the pending token
 *    alone, which verifies the first proposal in advance. Rejected: the target's own token is
 *    emitted and the draft's other proposals are thrown away. Accepted: the others wait for the
 *    next round, in post-verify;
 *  - post-verify: while the target verifies the waiting proposals, the draft proposes `window`
 *    more after them; the target's logits after the last waiting one verify the first of the
 *    new ones too. All accepted: the next round stays in post-verify with the new ones waiting,
 *    so the draft length grows while the draft agrees with the target and shrinks to one when
 *    it does not. A rejection emits the target's token and returns to pre-verify.
 * Every round is one target forward and `window` draft forwards.
 *
 * The target's forward runs beside the draft's round where the host offers forward_begin
 * (decoder ABI 1.2, a pipeline with a draft model): on the target's share of the pool's
 * threads while the draft drafts on the main thread. Where it does not, the two run one after
 * the other (and with `overlap: false`), which gives the same tokens and forwards. `stats` gives each model's time: the
 * draft's forwards, and the target's from forward_begin to forward_wait's return.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

typedef struct pearl {
    const tsr_host *host;
    int32_t n_vocab;
    int64_t window;
    int overlap;
    tsr_batch_entry *batch; /* (window + 1) */
    float *logits;          /* (window + 1, n_vocab) the target's */
    float *draft_logits;    /* (n_vocab) */
    tsr_decoder_stats stats;
} pearl;

/* One round. The text's tokens after t->n - 1 (the pending one) hold *m proposals waiting for
 * verification (0 in pre-verify); the draft proposes up to `window` more after them, the target
 * verifies the waiting ones and the first new one. */
static tsr_status pearl_round(pearl *P, tsr_draft_text *t, tsr_draft_model *dm, int64_t *m) {
    const tsr_decode_api *d = dm->api;
    int64_t room = tsr_draft_text_room(t);
    if (*m > room) *m = room;
    /* The draft proposes no more than the room can verify, nor beyond its own context. */
    int64_t g = room - *m < P->window ? room - *m : P->window;
    if (g > d->n_ctx + 1 - (t->n + *m)) g = d->n_ctx + 1 - (t->n + *m);
    if (g < 0) g = 0;
    int32_t *waiting = t->tokens + t->n;
    /* The target's batch holds only what waits already: it can start before the draft does. */
    int64_t n = tsr_draft_batch(P->batch, t->seq, t, waiting, *m);
    int overlap = P->overlap && tsr_draft_can_overlap(t->api);
    tsr_status st = overlap ? tsr_draft_forward_begin(t, P->batch, n, P->logits) : TSR_OK;
    if (st < 0) return st;
    for (int64_t j = 0; j < g && st >= 0; j++) {
        st = tsr_draft_model_sync(dm, t->tokens, t->n + *m + j, P->draft_logits);
        waiting[*m + j] = tsr_argmax(P->draft_logits, P->n_vocab);
    }
    tsr_status verified = overlap ? tsr_draft_forward_wait(t)
                                  : st >= 0 ? tsr_draft_forward(t, P->batch, n, P->logits) : st;
    if (st < 0) return st;
    if (verified < 0) return verified;
    int32_t out[TSR_DECODER_MAX_DRAFT + 1];
    int64_t kept = tsr_draft_accept_greedy(P->logits, P->n_vocab, waiting, *m, out);
    /* The target's token after the last waiting proposal verifies the first new one. */
    int post = kept == *m + 1 && g > 0 && out[*m] == waiting[*m];
    tsr_decoder_stats_add(&P->stats, *m + (g > 0), kept - 1 + post);
    st = tsr_draft_text_commit(t, t->seq, out, kept);
    /* In post-verify the draft's other new proposals now follow the text, waiting. */
    *m = post ? g - 1 : 0;
    return st;
}

static tsr_status pearl_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    pearl *P = self;
    const tsr_decode_api *d;
    tsr_status st = tsr_draft_check_api(P->host, api, P->n_vocab, &d);
    if (st < 0) return st;
    P->stats = (tsr_decoder_stats){.struct_size = sizeof P->stats};
    tsr_draft_text t;
    tsr_draft_model dm = {0};
    st = tsr_draft_text_begin(&t, P->host, api, req, &P->stats);
    if (st >= 0) st = tsr_draft_model_begin(&dm, P->host, d, &P->stats);
    int64_t waiting = 0;
    while (st >= 0 && !t.done) st = pearl_round(P, &t, &dm, &waiting);
    if (dm.held) tsr_draft_model_end(&dm);
    tsr_draft_text_end(&t);
    return st;
}

static int32_t pearl_pick(void *self, const float *logits, const int32_t *history,
                          int64_t n_history) {
    return tsr_argmax(logits, ((const pearl *)self)->n_vocab);
}

static void pearl_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const pearl *)self)->stats);
}

static void pearl_destroy(void *self) {
    pearl *P = self;
    P->host->free(P->host->ctx, P->batch);
    P->host->free(P->host->ctx, P->logits);
    P->host->free(P->host->ctx, P->draft_logits);
    P->host->free(P->host->ctx, P);
}

static tsr_status pearl_create(const tsr_host *host, const tsr_params *params,
                               const tsr_decoder_init *init, void **out) {
    tsr_status st = tsr_draft_check_init(host, init, 1);
    if (st < 0) return st;
    pearl *P = tsr_calloc(host, 1, sizeof *P);
    if (!P) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    P->host = host;
    P->n_vocab = init->n_vocab;
    P->window = tsr_param_int(params, "window");
    P->overlap = tsr_param_bool(params, "overlap");
    size_t rows = (size_t)P->window + 1;
    P->batch = tsr_calloc(host, rows, sizeof *P->batch);
    P->logits = tsr_calloc(host, rows * (size_t)P->n_vocab, sizeof(float));
    P->draft_logits = tsr_calloc(host, (size_t)P->n_vocab, sizeof(float));
    if (!P->batch || !P->logits || !P->draft_logits) {
        pearl_destroy(P);
        host->set_error(host->ctx, "out of memory for %lld rows of %d logits",
                        (long long)tsr_param_int(params, "window") + 1, (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    *out = P;
    return TSR_OK;
}

static const tsr_param_def pearl_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "4",
     .min = 1, .max = TSR_DECODER_MAX_DRAFT - 1, .unit = "tokens",
     .doc = "tokens the draft proposes per round (PEARL's gamma)"},
    {TSR_SIZED(tsr_param_def), .name = "overlap", .type = TSR_PARAM_BOOL, .default_value = "true",
     .doc = "run the target's forward beside the draft's where the host can (false: one after "
            "the other, the same tokens)"},
};

static const tsr_decoder_vtable pearl_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = pearl_create,
    .destroy = pearl_destroy,
    .generate = pearl_generate,
    .pick = pearl_pick,
    .stats = pearl_stats,
    .draft_use = TSR_DECODER_DRAFT_REQUIRED,
};

static const tsr_plugin_desc pearl_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "pearl",
    .version = "1.0",
    .description = "PEARL: the draft model drafts while the target pre-verifies the first token "
                   "and post-verifies the last window; greedy's tokens",
    TSR_PARAMS(pearl_params),
    .vtable = &pearl_vtable,
};

TSR_PLUGIN_EXPORT(&pearl_desc)
