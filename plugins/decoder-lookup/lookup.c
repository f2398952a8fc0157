/*
 * decoder 'lookup': prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding",
 * github.com/apoorvumang/prompt-lookup-decoding). No draft model: the last n tokens of the text
 * (prompt and output so far) are searched for earlier in the text, and the tokens that followed
 * that occurrence are proposed as the continuation. The target verifies the pending token and
 * the whole draft in one forward; the drafted tokens its argmax agrees with are accepted, with
 * its own token after them, and the rejected positions are rolled back with seq_truncate. The
 * output is exactly `greedy`'s.
 *
 * Where Saxena's code takes the first occurrence of the n-gram, this takes the latest: in a text
 * that repeats itself (a model looping, a document quoted twice) the latest occurrence is the
 * one the model is copying; and the copy may run into the text it is producing (see
 * lookup_find), so a loop shorter than the draft is drafted whole. With `adaptive` the draft
 * length follows acceptance (tsr_draft_len): on a CPU a long draft that is rejected costs
 * several forwards' time.
 */
#include <tessera/sdk.h>
#include <tessera/sdk_draft.h>

typedef struct lookup {
    const tsr_host *host;
    int32_t n_vocab;
    int64_t ngram_min, ngram_max, draft_max;
    int adaptive;
    tsr_batch_entry *batch; /* (draft_max + 1) */
    float *logits;          /* (draft_max + 1, n_vocab) */
    tsr_decoder_stats stats;
} lookup;

/* Writes to draft `max` tokens copied from after the latest earlier occurrence of the last g
 * tokens of text (n of them), for the longest g in [g_min, g_max] that occurs earlier; returns
 * the count, 0 when no g does. The copy may overlap what it writes, as LZ77's does: in a text
 * that loops with period p, the occurrence is p tokens back and the copy repeats the loop. */
static int64_t lookup_find(const int32_t *text, int64_t n, int64_t g_min, int64_t g_max,
                           int64_t max, int32_t *draft) {
    for (int64_t g = g_max < n - 1 ? g_max : n - 1; g >= g_min; g--) {
        const int32_t *tail = text + n - g;
        for (int64_t i = n - g - 1; i >= 0; i--) {
            if (memcmp(text + i, tail, (size_t)g * sizeof *text) != 0) continue;
            int64_t from = i + g, period = n - from;
            for (int64_t k = 0; k < max; k++)
                draft[k] = k < period ? text[from + k] : draft[k - period];
            return max;
        }
    }
    return 0;
}

static tsr_status lookup_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    lookup *L = self;
    tsr_status st = tsr_draft_check_api(L->host, api, L->n_vocab, NULL);
    if (st < 0) return st;
    L->stats = (tsr_decoder_stats){.struct_size = sizeof L->stats};
    tsr_draft_text t;
    st = tsr_draft_text_begin(&t, L->host, api, req, &L->stats);
    int32_t draft[TSR_DECODER_MAX_DRAFT], out[TSR_DECODER_MAX_DRAFT + 1];
    tsr_draft_len len = tsr_draft_len_start(L->draft_max, L->adaptive);
    while (st >= 0 && !t.done) {
        uint64_t t0 = tsr_draft_now(L->host);
        int64_t room = tsr_draft_text_room(&t);
        int64_t k = lookup_find(t.tokens, t.n, L->ngram_min, L->ngram_max,
                                room < len.cap ? room : len.cap, draft);
        L->stats.draft_ns += tsr_draft_now(L->host) - t0;
        int64_t n = tsr_draft_batch(L->batch, t.seq, &t, draft, k);
        if ((st = tsr_draft_forward(&t, L->batch, n, L->logits)) < 0) break;
        int64_t accepted = tsr_draft_accept_greedy(L->logits, L->n_vocab, draft, k, out);
        tsr_decoder_stats_add(&L->stats, k, accepted - 1);
        tsr_draft_len_update(&len, k, accepted - 1);
        st = tsr_draft_text_commit(&t, t.seq, out, accepted);
    }
    tsr_draft_text_end(&t);
    return st;
}

static int32_t lookup_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    return tsr_argmax(logits, ((const lookup *)self)->n_vocab);
}

static void lookup_stats(void *self, tsr_decoder_stats *out) {
    tsr_decoder_stats_copy(out, &((const lookup *)self)->stats);
}

static void lookup_destroy(void *self) {
    lookup *L = self;
    L->host->free(L->host->ctx, L->batch);
    L->host->free(L->host->ctx, L->logits);
    L->host->free(L->host->ctx, L);
}

static tsr_status lookup_create(const tsr_host *host, const tsr_params *params,
                                const tsr_decoder_init *init, void **out) {
    tsr_status st = tsr_draft_check_init(host, init, 0);
    if (st < 0) return st;
    int64_t g_min = tsr_param_int(params, "ngram_min"), g_max = tsr_param_int(params, "ngram_max");
    if (g_min > g_max) {
        host->set_error(host->ctx, "ngram_min %lld is above ngram_max %lld: no n-gram size "
                        "to search", (long long)g_min, (long long)g_max);
        return TSR_E_INVALID;
    }
    lookup *L = tsr_calloc(host, 1, sizeof *L);
    if (!L) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    L->host = host;
    L->n_vocab = init->n_vocab;
    L->ngram_min = g_min;
    L->ngram_max = g_max;
    L->draft_max = tsr_param_int(params, "draft");
    L->adaptive = tsr_param_bool(params, "adaptive");
    L->batch = tsr_calloc(host, (size_t)L->draft_max + 1, sizeof *L->batch);
    L->logits = tsr_calloc(host, ((size_t)L->draft_max + 1) * (size_t)L->n_vocab, sizeof(float));
    if (!L->batch || !L->logits) {
        lookup_destroy(L);
        host->set_error(host->ctx, "out of memory for %lld drafted tokens of a vocabulary of %d",
                        (long long)(tsr_param_int(params, "draft")), (int)init->n_vocab);
        return TSR_E_NOMEM;
    }
    *out = L;
    return TSR_OK;
}

static const tsr_param_def lookup_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "ngram_max", .type = TSR_PARAM_INT, .default_value = "3",
     .min = 1, .max = 64, .unit = "tokens",
     .doc = "longest tail of the text searched for earlier in it"},
    {TSR_SIZED(tsr_param_def), .name = "ngram_min", .type = TSR_PARAM_INT, .default_value = "1",
     .min = 1, .max = 64, .unit = "tokens",
     .doc = "shortest tail searched before giving up and running one token"},
    {TSR_SIZED(tsr_param_def), .name = "draft", .type = TSR_PARAM_INT, .default_value = "10",
     .min = 1, .max = TSR_DECODER_MAX_DRAFT, .unit = "tokens",
     .doc = "tokens copied after the earlier occurrence and verified in one forward"},
    {TSR_SIZED(tsr_param_def), .name = "adaptive", .type = TSR_PARAM_BOOL,
     .default_value = "true",
     .doc = "draft from 1 token, doubling while drafts are accepted whole (false: always `draft`)"},
};

static const tsr_decoder_vtable lookup_vtable = {
    TSR_SIZED(tsr_decoder_vtable),
    .create = lookup_create,
    .destroy = lookup_destroy,
    .generate = lookup_generate,
    .pick = lookup_pick,
    .stats = lookup_stats,
};

static const tsr_plugin_desc lookup_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),
    .name = "lookup",
    .version = "1.0",
    .description = "prompt lookup decoding: drafts copied from earlier in the text, verified in "
                   "one forward; greedy's tokens",
    TSR_PARAMS(lookup_params),
    .vtable = &lookup_vtable,
};

TSR_PLUGIN_EXPORT(&lookup_desc)
