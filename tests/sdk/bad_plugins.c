/*
 * Fixture plugins that each break one rule of abi/CONTRACT.md, for testing that the
 * conformance runner catches it (tests/sdk/expect-failures.sh compares the FAIL lines with
 * bad_plugins.expected, and each failure's reason). Everything not broken on purpose is done
 * right, so that no other check fails. Plugins named ok-* break nothing: they check the
 * runner itself (ok-cache-scores fails when the runner does not fill score_acc as attention
 * would, ok-cache-baseline when it does not measure stats from what they were at create,
 * ok-cache-load when it misreads a view of a policy's own format, ok-cache-per-head when it
 * assumes every KV head's view holds as many entries, ok-optional when it fails a decoder that
 * drafts optionally for running without a draft).
 */
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

/* The descriptor of fixture `id`, a plugin of stage TSR_STAGE_<STAGE> over the vtable id_vt. */
#define FIXTURE(id, STAGE, name_text, what)                                                  \
    static const tsr_plugin_desc id = {TSR_PLUGIN_HEADER(TSR_STAGE_##STAGE, STAGE),          \
                                       .name = name_text, .version = "0", .description = what, \
                                       .vtable = &id##_vt};

/* A create callback `fn` that makes the instance as `base` does, with the flaw `value`. */
#define FLAWED_CREATE(fn, base, init_type, self_type, value)                                 \
    static tsr_status fn(const tsr_host *host, const tsr_params *p, const init_type *init,   \
                         void **out) {                                                       \
        tsr_status st = base(host, p, init, out);                                            \
        if (st >= 0) ((self_type *)*out)->flaw = value;                                      \
        return st;                                                                           \
    }

/* ---- decoders ------------------------------------------------------------------------- */

typedef struct dec {
    const tsr_host *host;
    void *extra;      /* bad-leak: a second block it forgets to free */
    int32_t requests; /* bad-memory: requests served */
    int32_t n_vocab;
} dec;

static tsr_status dec_create(const tsr_host *host, const tsr_params *p,
                             const tsr_decoder_init *init, void **out) {
    dec *d = tsr_calloc(host, 1, sizeof *d);
    if (!d) return TSR_E_NOMEM;
    d->host = host;
    d->n_vocab = init->n_vocab;
    *out = d;
    return TSR_OK;
}

static void dec_destroy(void *self) {
    dec *d = self;
    d->host->free(d->host->ctx, d);
}

/* What a fixture decoder does wrong while it generates. */
enum dec_flaw {
    DEC_FINE,
    DEC_IGNORE_STOP,      /* keeps forwarding and emitting after emit() returned 1 */
    DEC_UNBEGUN,          /* forwards sequence 1, which it never forked */
    DEC_GAP,              /* its first generated token skips a position */
    DEC_FORK_LIVE,        /* forks into sequence 1 twice */
    DEC_FORK_LEAK,        /* forks sequence 1 and never ends it */
    DEC_SCATTER,          /* puts sequence 1 between two entries of sequence 0 in a batch */
    DEC_DRAFT,            /* forwards two draft tokens after each one, unbounded by n_ctx */
    DEC_PAD,              /* puts a padding entry of token -1 before the prompt */
    DEC_ONE_BASED,        /* forwards every token id plus one */
    DEC_END_TWICE,        /* forks sequence 1, then ends it twice */
    DEC_EMPTY_BATCH,      /* forwards a batch of no entries before the prompt */
    DEC_SILENT,           /* returns after the prompt without emitting */
    DEC_NO_ROLLBACK,      /* rejects two drafted tokens a step and forwards on without truncating */
    DEC_FORK_RESTART,     /* forwards the sequence it forked from position 0, as if it were empty */
    DEC_TRUNCATE_ENDED,   /* truncates the sequence it forked after ending it */
    DEC_DRAFT_LEAK,       /* forks the draft model's sequence 0 and never ends the fork */
    DEC_DRAFT_NO_ROLLBACK, /* drafts two tokens a step on the draft model, never truncating */
    DEC_UNWAITED,         /* begins a forward of the target (forward_begin) and returns */
    DEC_BUSY              /* emits between forward_begin and forward_wait */
};

/* Prefill, then one forward per token as a greedy decoder would, always choosing `token`
 * (which the caller may put out of range), breaking the rule `flaw` names. */
static tsr_status dec_run(const tsr_decode_api *api, const tsr_generate_request *req,
                          int32_t token, enum dec_flaw flaw) {
    const tsr_batch_entry pad = {0, 0, -1, 0};
    tsr_batch_entry e;
    int32_t pos = 0, id_shift = flaw == DEC_ONE_BASED;
    float row[4096];
    tsr_status st = TSR_OK;
    if (api->n_vocab > 4096) return TSR_E_RANGE;
    if (flaw == DEC_EMPTY_BATCH) st = api->forward(api->ctx, &pad, 0, row);
    if (flaw == DEC_PAD) {
        st = api->forward(api->ctx, &pad, 1, row);
        pos++;
    }
    for (int64_t i = 0; st >= 0 && i < req->n_prompt; i++) {
        e = (tsr_batch_entry){0, pos++, req->prompt[i] + id_shift, 1};
        st = api->forward(api->ctx, &e, 1, row);
    }
    if (st < 0) return st;
    if (flaw == DEC_SILENT) return TSR_OK;
    const tsr_decode_api *draft = flaw == DEC_DRAFT_LEAK || flaw == DEC_DRAFT_NO_ROLLBACK
                                      ? api->draft
                                      : NULL;
    for (int64_t i = 0; draft && st >= 0 && i < req->n_prompt; i++) {
        e = (tsr_batch_entry){0, (int32_t)i, req->prompt[i], 0};
        st = draft->forward(draft->ctx, &e, 1, row);
    }
    if (st >= 0 && flaw == DEC_DRAFT_LEAK) st = draft->seq_fork(draft->ctx, 0, 1);
    if (flaw == DEC_FORK_LIVE || flaw == DEC_FORK_LEAK || flaw == DEC_SCATTER ||
        flaw == DEC_END_TWICE || flaw == DEC_FORK_RESTART || flaw == DEC_TRUNCATE_ENDED) {
        st = api->seq_fork(api->ctx, 0, 1);
        if (st >= 0 && flaw == DEC_FORK_LIVE) st = api->seq_fork(api->ctx, 0, 1);
        for (int ends = 0; st >= 0 && flaw == DEC_END_TWICE && ends < 2; ends++)
            st = api->seq_end(api->ctx, 1);
        if (st >= 0 && flaw == DEC_TRUNCATE_ENDED && (st = api->seq_end(api->ctx, 1)) >= 0)
            st = api->seq_truncate(api->ctx, 1, pos);
        if (st < 0) return st;
    }
    if (flaw == DEC_FORK_RESTART) {
        tsr_batch_entry batch[2] = {{0, pos, token, 0}, {1, 0, token, 0}};
        st = api->forward(api->ctx, batch, 2, row);
        if (st >= 0) st = api->seq_end(api->ctx, 1);
        if (st < 0) return st;
        pos++;
    }
    if (flaw == DEC_SCATTER) {
        tsr_batch_entry batch[3] = {{0, pos, token, 0}, {1, pos, token, 0}, {0, pos + 1, token, 1}};
        st = api->forward(api->ctx, batch, 3, row);
        if (st >= 0) st = api->seq_end(api->ctx, 1);
        if (st < 0) return st;
        pos += 2;
    }
    if (flaw == DEC_GAP) pos++;
    for (int n = 0; n < 20; n++) {
        if (api->emit(api->ctx, &token, 1) && flaw != DEC_IGNORE_STOP) break;
        e = (tsr_batch_entry){flaw == DEC_UNBEGUN ? 1 : 0, pos++,
                              (token < api->n_vocab ? token : 0) + id_shift, 1};
        if (flaw == DEC_DRAFT || flaw == DEC_NO_ROLLBACK) {
            /* Drafts that it then rejects all: the sequence goes back to one new position. */
            tsr_batch_entry batch[3] = {e, {0, pos, token, 0}, {0, pos + 1, token, 0}};
            st = api->forward(api->ctx, batch, 3, row);
            if (st >= 0 && flaw == DEC_DRAFT) st = api->seq_truncate(api->ctx, 0, pos);
        } else if (flaw == DEC_UNWAITED || flaw == DEC_BUSY) {
            st = api->forward_begin(api->ctx, &e, 1, row);
            if (flaw == DEC_UNWAITED) return st;
            api->emit(api->ctx, &token, 1);
            if (st >= 0) st = api->forward_wait(api->ctx);
        } else {
            st = api->forward(api->ctx, &e, 1, row);
        }
        if (st >= 0 && flaw == DEC_DRAFT_NO_ROLLBACK) {
            /* The draft proposes one token after the target's; nothing rolls it back. */
            tsr_batch_entry batch[2] = {{0, e.pos, e.token, 0}, {0, e.pos + 1, token, 1}};
            st = draft->forward(draft->ctx, batch, 2, row);
        }
        if (st < 0) return st;
    }
    return TSR_OK;
}

static tsr_status vocab_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    return dec_run(api, req, api->n_vocab, DEC_FINE); /* one past the last token id */
}

/* Emits the last token id, and forwards it as one past the last. */
static tsr_status one_based_generate(void *self, const tsr_decode_api *api,
                                     const tsr_generate_request *req) {
    return dec_run(api, req, api->n_vocab - 1, DEC_ONE_BASED);
}

/* A generate callback that emits token 1 and breaks the rule `flaw` names. */
#define FLAWED_GENERATE(fn, flaw)                                                           \
    static tsr_status fn(void *self, const tsr_decode_api *api,                             \
                         const tsr_generate_request *req) {                                 \
        return dec_run(api, req, 1, flaw);                                                  \
    }

FLAWED_GENERATE(runaway_generate, DEC_IGNORE_STOP)
FLAWED_GENERATE(fine_generate, DEC_FINE)
FLAWED_GENERATE(unbegun_generate, DEC_UNBEGUN)
FLAWED_GENERATE(gap_generate, DEC_GAP)
FLAWED_GENERATE(fork_live_generate, DEC_FORK_LIVE)
FLAWED_GENERATE(fork_leak_generate, DEC_FORK_LEAK)
FLAWED_GENERATE(scatter_generate, DEC_SCATTER)
FLAWED_GENERATE(draft_generate, DEC_DRAFT)
FLAWED_GENERATE(pad_generate, DEC_PAD)
FLAWED_GENERATE(end_twice_generate, DEC_END_TWICE)
FLAWED_GENERATE(empty_batch_generate, DEC_EMPTY_BATCH)
FLAWED_GENERATE(silent_generate, DEC_SILENT)
FLAWED_GENERATE(no_rollback_generate, DEC_NO_ROLLBACK)
FLAWED_GENERATE(fork_restart_generate, DEC_FORK_RESTART)
FLAWED_GENERATE(truncate_ended_generate, DEC_TRUNCATE_ENDED)
FLAWED_GENERATE(draft_leak_generate, DEC_DRAFT_LEAK)
FLAWED_GENERATE(draft_no_rollback_generate, DEC_DRAFT_NO_ROLLBACK)
FLAWED_GENERATE(unwaited_generate, DEC_UNWAITED)
FLAWED_GENERATE(busy_generate, DEC_BUSY)

/* Two continuations from one prompt, both forwarded in every batch: sequence 1 emits two
 * tokens a step and sequence 0 one, and it stops when sequence 0 does, ignoring that emit_seq
 * stopped sequence 1 halfway. */
static tsr_status runon_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    float row[4096];
    tsr_status st = TSR_OK;
    if (api->n_vocab > 4096) return TSR_E_RANGE;
    for (int64_t i = 0; st >= 0 && i < req->n_prompt; i++) {
        tsr_batch_entry e = {0, (int32_t)i, req->prompt[i], i == req->n_prompt - 1};
        st = api->forward(api->ctx, &e, 1, row);
    }
    if (st >= 0) st = api->seq_fork(api->ctx, 0, 1);
    const int32_t token[2] = {1, 1};
    int32_t pos0 = (int32_t)req->n_prompt, pos1 = pos0;
    while (st >= 0 && pos1 + 2 <= api->n_ctx) {
        int32_t stop0 = api->emit_seq(api->ctx, 0, token, 1);
        api->emit_seq(api->ctx, 1, token, 2);
        if (stop0) break;
        tsr_batch_entry batch[3] = {{0, pos0++, 1, 1}, {1, pos1, 1, 0}, {1, pos1 + 1, 1, 0}};
        pos1 += 2;
        st = api->forward(api->ctx, batch, 3, row);
    }
    tsr_status end = api->seq_end(api->ctx, 1);
    return st < 0 ? st : end;
}

/* Drafts only when given a draft model (OPTIONAL), but reads it unconditionally. */
static tsr_status optional_generate(void *self, const tsr_decode_api *api,
                                    const tsr_generate_request *req) {
    if (api->draft->n_vocab != api->n_vocab) return TSR_E_INVALID;
    return dec_run(api, req, 1, DEC_FINE);
}

/* The same, reading the draft model only when there is one. */
static tsr_status optional_checked_generate(void *self, const tsr_decode_api *api,
                                            const tsr_generate_request *req) {
    if (api->draft && api->draft->n_vocab != api->n_vocab) return TSR_E_INVALID;
    return dec_run(api, req, 1, DEC_FINE);
}

/* Refuses a request that fills the context, though the last token emitted is never forwarded:
 * n_prompt + max_new_tokens == n_ctx fits. */
static tsr_status cramped_generate(void *self, const tsr_decode_api *api,
                                   const tsr_generate_request *req) {
    dec *d = self;
    if (req->n_prompt + req->max_new_tokens >= api->n_ctx) {
        d->host->set_error(d->host->ctx, "%lld prompt tokens and %lld new ones do not fit "
                           "n_ctx %d", (long long)req->n_prompt, (long long)req->max_new_tokens,
                           (int)api->n_ctx);
        return TSR_E_RANGE;
    }
    return dec_run(api, req, 1, DEC_FINE);
}

static tsr_status exit_generate(void *self, const tsr_decode_api *api,
                                const tsr_generate_request *req) {
    exit(0);
}

/* Emits the number of requests it served: the second request differs from the first. */
static tsr_status memory_generate(void *self, const tsr_decode_api *api,
                                  const tsr_generate_request *req) {
    dec *d = self;
    return dec_run(api, req, ++d->requests % api->n_vocab, DEC_FINE);
}

/* An argmax that starts below every finite logit but -FLT_MAX: -1 when all are -FLT_MAX. */
static int32_t strict_pick(void *self, const float *logits, const int32_t *history,
                           int64_t n_history) {
    const dec *d = self;
    int32_t best = -1;
    float top = -FLT_MAX;
    for (int32_t i = 0; i < d->n_vocab; i++)
        if (logits[i] > top) {
            top = logits[i];
            best = i;
        }
    return best;
}

static tsr_status leak_create(const tsr_host *host, const tsr_params *p,
                              const tsr_decoder_init *init, void **out) {
    tsr_status st = dec_create(host, p, init, out);
    if (st < 0) return st;
    ((dec *)*out)->extra = host->alloc(host->ctx, 100, 0);
    return TSR_OK;
}

static tsr_status crash_generate(void *self, const tsr_decode_api *api,
                                 const tsr_generate_request *req) {
    volatile int32_t *nowhere = NULL;
    *nowhere = 1;
    return TSR_OK;
}

#define DECODER_VT_DRAFT(id, create_fn, generate_fn, pick_fn, use)                             \
    static const tsr_decoder_vtable id##_vt = {TSR_SIZED(tsr_decoder_vtable),                \
                                               .create = create_fn, .destroy = dec_destroy,  \
                                               .generate = generate_fn, .pick = pick_fn,     \
                                               .draft_use = use};

#define DECODER_VT(id, create_fn, generate_fn, pick_fn) \
    DECODER_VT_DRAFT(id, create_fn, generate_fn, pick_fn, TSR_DECODER_DRAFT_NONE)

#define DECODER_PICK(id, name_text, create_fn, generate_fn, pick_fn, what)                   \
    DECODER_VT(id, create_fn, generate_fn, pick_fn)                                          \
    FIXTURE(id, DECODER, name_text, what)

#define DECODER(id, create_fn, generate_fn, what) \
    DECODER_PICK(id, "bad-" #id, create_fn, generate_fn, NULL, what)

DECODER(vocab, dec_create, vocab_generate, "emits a token id equal to n_vocab")
DECODER(runaway, dec_create, runaway_generate, "keeps generating after emit() says stop")
DECODER(leak, leak_create, fine_generate, "leaves 100 bytes allocated at destroy")
DECODER(crash, dec_create, crash_generate, "writes through a NULL pointer in generate")
DECODER(unbegun, dec_create, unbegun_generate, "forwards sequence 1, which it never forked")
DECODER(gap, dec_create, gap_generate, "skips a position after the prompt")
DECODER_PICK(fork_live, "bad-fork-live", dec_create, fork_live_generate, NULL,
             "forks into a sequence that is alive")
DECODER_PICK(fork_leak, "bad-fork-leak", dec_create, fork_leak_generate, NULL,
             "never ends the sequence it forked")
DECODER(scatter, dec_create, scatter_generate,
        "splits the entries of one sequence in a batch around another's")
DECODER(draft, dec_create, draft_generate,
        "drafts two tokens past each one it forwards, beyond n_ctx at the end")
DECODER(pad, dec_create, pad_generate, "pads the prompt with token -1")
DECODER_PICK(one_based, "bad-one-based", dec_create, one_based_generate, NULL,
             "forwards every token id plus one")
DECODER_PICK(end_twice, "bad-end-twice", dec_create, end_twice_generate, NULL,
             "ends the sequence it forked twice")
DECODER_PICK(empty_batch, "bad-empty-batch", dec_create, empty_batch_generate, NULL,
             "forwards an empty batch")
DECODER(silent, dec_create, silent_generate, "reads the prompt and emits nothing")
DECODER(cramped, dec_create, cramped_generate,
        "refuses a request whose prompt and new tokens fill the context")
DECODER_PICK(exits, "bad-exit", dec_create, exit_generate, NULL, "calls exit(0) in generate")
DECODER(memory, dec_create, memory_generate, "emits a token that counts the requests served")
DECODER_PICK(pick, "bad-pick", dec_create, fine_generate, strict_pick,
             "pick returns -1 when every logit is -FLT_MAX")
DECODER_PICK(no_rollback, "bad-no-rollback", dec_create, no_rollback_generate, NULL,
             "forwards on after rejected drafts without truncating them")
DECODER_PICK(fork_restart, "bad-fork-restart", dec_create, fork_restart_generate, NULL,
             "forwards a forked sequence from position 0 in a batch with its source")
DECODER_PICK(truncate_ended, "bad-truncate-ended", dec_create, truncate_ended_generate, NULL,
             "truncates a sequence it has ended")
DECODER_PICK(runon, "bad-runon-seq", dec_create, runon_generate, NULL,
             "forwards a continuation after emit_seq stopped it")

/* Decoders that draft with the pipeline's draft model, and break its rules. */
#define DRAFTER(id, name_text, generate_fn, use, what)                 \
    DECODER_VT_DRAFT(id, dec_create, generate_fn, NULL, use)           \
    FIXTURE(id, DECODER, name_text, what)

DRAFTER(draft_leak, "bad-draft-leak", draft_leak_generate, TSR_DECODER_DRAFT_REQUIRED,
        "never ends the sequence it forked on the draft model")
DRAFTER(draft_rollback, "bad-draft-rollback", draft_no_rollback_generate,
        TSR_DECODER_DRAFT_REQUIRED, "drafts on after rejections without truncating the draft")
DRAFTER(unwaited, "bad-unwaited", unwaited_generate, TSR_DECODER_DRAFT_REQUIRED,
        "begins the target's forward (forward_begin) and returns without forward_wait")
DRAFTER(busy, "bad-busy", busy_generate, TSR_DECODER_DRAFT_REQUIRED,
        "emits between forward_begin and forward_wait")
DRAFTER(optional, "bad-optional", optional_generate, TSR_DECODER_DRAFT_OPTIONAL,
        "drafts optionally but reads api->draft when the pipeline has none")
DRAFTER(ok_optional, "ok-optional", optional_checked_generate, TSR_DECODER_DRAFT_OPTIONAL,
        "drafts optionally and reads api->draft only when the pipeline has one")

/* ---- decoders whose flaw is in their descriptor or parameters ------------------------------ */

DECODER_VT(fine, dec_create, fine_generate, NULL)

static const tsr_plugin_desc no_version = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-version", .version = "",
    .description = "an empty version", .vtable = &fine_vt};

static const tsr_plugin_desc two_lines = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-description", .version = "0",
    .description = "a description\nof two lines", .vtable = &fine_vt};

static int32_t never_probe(const tsr_host *host) {
    host->set_error(host->ctx, "needs a CPU feature the probe tests the wrong way round");
    return 0;
}

static const tsr_plugin_desc unusable = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-probe", .version = "0",
    .description = "its probe says it cannot run anywhere", .probe = never_probe,
    .vtable = &fine_vt};

static const tsr_param_def undocumented_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "1",
     .min = 1, .max = 8},
};
static const tsr_plugin_desc param_doc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-param-doc", .version = "0",
    .description = "a parameter without doc", TSR_PARAMS(undocumented_params),
    .vtable = &fine_vt};

static int32_t requests_served(void *self) { return ((dec *)self)->requests; }

/* Fails until a request was served. */
static int32_t last_request(void *self) {
    dec *d = self;
    if (d->requests) return d->requests;
    d->host->set_error(d->host->ctx, "no request served yet");
    return TSR_E_STATE;
}

static const tsr_command undocumented_commands[] = {
    {TSR_SIZED(tsr_command), .name = "served", .signature = "i(I)",
     .fn = (void (*)(void))requests_served},
};
static const tsr_plugin_desc command_doc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-command-doc", .version = "0",
    .description = "a command without doc", TSR_COMMANDS(undocumented_commands),
    .vtable = &fine_vt};

static const tsr_command fresh_commands[] = {
    {TSR_SIZED(tsr_command), .name = "last_request", .signature = "i(I)",
     .fn = (void (*)(void))last_request, .doc = "the number of the last request served",
     .returns_status = 1},
};
static const tsr_plugin_desc command_fresh = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-command-fresh", .version = "0",
    .description = "a command that fails on a fresh instance", TSR_COMMANDS(fresh_commands),
    .vtable = &fine_vt};

/* The parameter "window" of the fixtures below, in the range each declares. */
#define WINDOW_PARAMS(table, min_value, max_value, default_text)                             \
    static const tsr_param_def table[] = {                                                   \
        {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT,                  \
         .default_value = default_text, .min = min_value, .max = max_value,                  \
         .doc = "entries per window"},                                                       \
    };

#define DECODER_WINDOW(id, name_text, create_fn, table, what)                                \
    DECODER_VT(id, create_fn, fine_generate, NULL)                                           \
    static const tsr_plugin_desc id = {TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER),        \
                                       .name = name_text, .version = "0", .description = what, \
                                       TSR_PARAMS(table), .vtable = &id##_vt};

/* Its table allows window 0, its create does not. */
static tsr_status no_zero_create(const tsr_host *host, const tsr_params *p,
                                 const tsr_decoder_init *init, void **out) {
    if (tsr_param_int(p, "window") < 1) {
        host->set_error(host->ctx, "window %lld: expected at least 1",
                        (long long)tsr_param_int(p, "window"));
        return TSR_E_INVALID;
    }
    return dec_create(host, p, init, out);
}

/* Refuses its largest window without saying why. */
static tsr_status quiet_create(const tsr_host *host, const tsr_params *p,
                               const tsr_decoder_init *init, void **out) {
    if (tsr_param_int(p, "window") == 8) return TSR_E_INVALID;
    return dec_create(host, p, init, out);
}

/* Windows beyond 4096 get a table it forgets to free. */
static tsr_status big_window_create(const tsr_host *host, const tsr_params *p,
                                    const tsr_decoder_init *init, void **out) {
    tsr_status st = dec_create(host, p, init, out);
    if (st >= 0 && tsr_param_int(p, "window") > 4096)
        ((dec *)*out)->extra = host->alloc(host->ctx, 100, 0);
    return st;
}

WINDOW_PARAMS(zero_window_params, 0, 8, "0")
WINDOW_PARAMS(small_window_params, 1, 8, "1")
WINDOW_PARAMS(big_window_params, 1, 65536, "64")
DECODER_WINDOW(default_refused, "bad-default-refused", no_zero_create, zero_window_params,
               "refuses the default its table declares")
DECODER_WINDOW(quiet, "bad-quiet-refusal", quiet_create, small_window_params,
               "refuses window 8 without a message")
DECODER_WINDOW(big_window_leak, "bad-big-window-leak", big_window_create, big_window_params,
               "leaks 100 bytes with a window beyond 4096")

/* A parameter whose default lies outside its own range: the loader refuses this plugin. */
static const tsr_param_def bad_default_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "0",
     .min = 1, .max = 8, .doc = "a window"},
};
static const tsr_plugin_desc param = {
    TSR_PLUGIN_HEADER(TSR_STAGE_DECODER, DECODER), .name = "bad-param", .version = "0",
    .description = "default value out of its range", TSR_PARAMS(bad_default_params),
    .vtable = &vocab_vt};

/* ---- caches on the SDK's store, each breaking one rule ---------------------------------- */

/* One KV head's rows as the store's F32 view has them, shown to the runner in a format of the
 * policy's own (a plugin dtype) and read back through the view's loaders. */
typedef struct own_rows {
    tsr_kv_view f32;
    int32_t head_dim;
} own_rows;

typedef struct kvc {
    tsr_kv_store kv;   /* first: the SDK's callbacks take the instance as their store */
    int32_t n_head;
    int32_t *pos_copy; /* (n_ctx + 1): positions a view shows instead of the store's */
    int64_t alias_src, alias_dst; /* bad-cache-fork-share: dst is src under another id */
    float *acc;        /* ok-scores: (n_seq_max, n_layer, n_kv_head, n_ctx) */
    int64_t *last_n;   /* ok-scores: (n_seq_max) rows of the last write */
    own_rows *own;     /* views of an own format: (n_kv_head) */
} kvc;

static void kvc_destroy(void *self) {
    kvc *c = self;
    c->kv.host->free(c->kv.host->ctx, c->pos_copy);
    c->kv.host->free(c->kv.host->ctx, c->acc);
    c->kv.host->free(c->kv.host->ctx, c->last_n);
    c->kv.host->free(c->kv.host->ctx, c->own);
    tsr_kv_store_destroy(c);
}

static tsr_status kvc_create(const tsr_host *host, const tsr_params *p,
                             const tsr_cache_init *init, void **out) {
    void *self;
    tsr_status st = tsr_kv_store_create(host, p, init, sizeof(kvc), 0, &self);
    if (st < 0) return st;
    kvc *c = self;
    c->n_head = init->n_head;
    c->alias_dst = -1;
    c->pos_copy = tsr_calloc(host, (size_t)init->n_ctx + 1, sizeof(int32_t));
    c->acc = tsr_calloc(host, (size_t)init->n_seq_max * init->n_layer * init->n_kv_head *
                                  init->n_ctx, sizeof(float));
    c->last_n = tsr_calloc(host, (size_t)init->n_seq_max, sizeof(int64_t));
    c->own = tsr_calloc(host, (size_t)init->n_kv_head, sizeof *c->own);
    if (!c->pos_copy || !c->acc || !c->last_n || !c->own) {
        kvc_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    for (int32_t h = 0; h < init->n_kv_head; h++) c->own[h].head_dim = init->head_dim;
    *out = c;
    return TSR_OK;
}

/* Counters that start above zero, as those of a policy that reserves a block of its own at
 * create: the runner must measure what the sequences add from there. */
static tsr_status baseline_create(const tsr_host *host, const tsr_params *p,
                                  const tsr_cache_init *init, void **out) {
    tsr_status st = kvc_create(host, p, init, out);
    if (st < 0) return st;
    kvc *c = *out;
    c->kv.bytes_reserved = c->kv.bytes_peak = 4096;
    c->kv.entries = 7;
    c->kv.evicted = 3;
    return TSR_OK;
}

/* Refuses to serve several sequences. */
static tsr_status single_seq_create(const tsr_host *host, const tsr_params *p,
                                    const tsr_cache_init *init, void **out) {
    if (init->n_seq_max > 1) {
        host->set_error(host->ctx, "n_seq_max %d: this policy serves one sequence",
                        (int)init->n_seq_max);
        return TSR_E_UNSUPPORTED;
    }
    return kvc_create(host, p, init, out);
}

/* Keeps one sequence slot whatever n_seq_max says. */
static tsr_status one_slot_create(const tsr_host *host, const tsr_params *p,
                                  const tsr_cache_init *init, void **out) {
    tsr_status st = kvc_create(host, p, init, out);
    if (st >= 0) ((kvc *)*out)->kv.n_seq_max = 1;
    return st;
}

static int64_t kvc_resolve(const kvc *c, int64_t id) {
    return id == c->alias_dst ? c->alias_src : id;
}

/* Appends every write, growing by doubling. */
static tsr_status kvc_store(void *self, const tsr_kv_write *w) {
    kvc *c = self;
    tsr_kv_write own = *w;
    own.seq_id = kvc_resolve(c, w->seq_id);
    tsr_kv_seq *s;
    tsr_status st = tsr_kv_store_check_write(&c->kv, &own, &s);
    if (st < 0) return st;
    tsr_kv_rows *L = &s->layers[w->layer];
    if (L->n + w->n > L->cap) {
        int64_t cap = L->cap ? 2 * L->cap : 16;
        while (cap < L->n + w->n) cap *= 2;
        if ((st = tsr_kv_rows_resize(&c->kv, L, cap)) < 0) return st;
    }
    tsr_kv_rows_append(&c->kv, s, L, &own);
    c->last_n[s - c->kv.seqs] = w->n;
    return TSR_OK;
}

static tsr_status kvc_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                           tsr_kv_view *views) {
    kvc *c = self;
    return tsr_kv_store_view(self, kvc_resolve(c, seq), layer, phase, views);
}

static tsr_status layer2_store(void *self, const tsr_kv_write *w) {
    kvc *c = self;
    if (w->layer >= 2) {
        c->kv.host->set_error(c->kv.host->ctx, "store: layer %d: no room", (int)w->layer);
        return TSR_E_RANGE;
    }
    return kvc_store(self, w);
}

/* The last entry of every view claims the position after the last one stored. */
static tsr_status unstored_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    if (st < 0 || views[0].n < 1) return st;
    memcpy(c->pos_copy, views[0].pos, (size_t)views[0].n * sizeof(int32_t));
    c->pos_copy[views[0].n - 1] = c->pos_copy[views[0].n - 1] + 1;
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) views[h].pos = c->pos_copy;
    return TSR_OK;
}

/* Keeps F16 rows, then drops the last bit of each: one unit in the last place of error where
 * rounding allows half of one. */
static tsr_status coarse_f16_store(void *self, const tsr_kv_write *w) {
    kvc *c = self;
    c->kv.dtype = TSR_DTYPE_F16;
    c->kv.row_bytes = (size_t)c->kv.head_dim * sizeof(uint16_t);
    tsr_status st = kvc_store(self, w);
    if (st < 0) return st;
    tsr_kv_rows *L = &tsr_kv_store_find(&c->kv, kvc_resolve(c, w->seq_id))->layers[w->layer];
    for (int32_t h = 0; h < c->kv.n_kv_head; h++)
        for (int64_t j = L->n - w->n; j < L->n; j++) {
            size_t at = (size_t)h * (size_t)L->cap * c->kv.row_bytes + (size_t)j * c->kv.row_bytes;
            uint16_t *k = (uint16_t *)(L->k + at), *v = (uint16_t *)(L->v + at);
            for (int32_t i = 0; i < c->kv.head_dim; i++) {
                k[i] &= (uint16_t)~1u;
                v[i] &= (uint16_t)~1u;
            }
        }
    return TSR_OK;
}

/* The last entry of every view claims the first entry's position. */
static tsr_status twice_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                             tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    if (st < 0 || views[0].n < 2) return st;
    memcpy(c->pos_copy, views[0].pos, (size_t)views[0].n * sizeof(int32_t));
    c->pos_copy[views[0].n - 1] = c->pos_copy[0];
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) views[h].pos = c->pos_copy;
    return TSR_OK;
}

/* Every sequence sees the rows of the oldest live one. */
static tsr_status other_seq_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                 tsr_kv_view *views) {
    kvc *c = self;
    for (int32_t i = 0; i < c->kv.n_seq_max; i++)
        if (c->kv.seqs[i].alive) return kvc_view(self, c->kv.seqs[i].id, layer, phase, views);
    return kvc_view(self, seq, layer, phase, views);
}

/* The last KV head shows the first one's keys. */
static tsr_status head_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                            tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    if (st >= 0) views[c->kv.n_kv_head - 1].k = views[0].k;
    return st;
}

/* A "fork" that makes dst another name for src's storage. */
static tsr_status share_fork(void *self, int64_t src, int64_t dst) {
    kvc *c = self;
    if (!tsr_kv_store_find_or_fail(&c->kv, src, "seq_fork")) return TSR_E_INVALID;
    c->alias_src = src;
    c->alias_dst = dst;
    return TSR_OK;
}

static void share_seq_end(void *self, int64_t seq) {
    kvc *c = self;
    if (seq == c->alias_dst) c->alias_dst = -1;
    else tsr_kv_store_seq_end(self, seq);
}

/* Says it truncated and keeps everything. */
static tsr_status keep_truncate(void *self, int64_t seq, int32_t n_pos) {
    kvc *c = self;
    return tsr_kv_store_find_or_fail(&c->kv, seq, "seq_truncate") ? TSR_OK : TSR_E_INVALID;
}

/* Frees the rows but forgets to take them out of the entry count. */
static void stats_seq_end(void *self, int64_t seq) {
    kvc *c = self;
    int64_t entries = c->kv.entries;
    tsr_kv_store_seq_end(self, seq);
    c->kv.entries = entries;
}

/* Refuses every truncation, though it never evicts. */
static tsr_status refuse_truncate(void *self, int64_t seq, int32_t n_pos) {
    kvc *c = self;
    c->kv.host->set_error(c->kv.host->ctx, "seq_truncate: not supported");
    return TSR_E_UNSUPPORTED;
}

/* Counts rows once per layer instead of once per layer and KV head. */
static void per_layer_stats(void *self, tsr_cache_stats *out) {
    kvc *c = self;
    tsr_kv_store_stats(self, out);
    out->entries /= c->kv.n_kv_head;
}

/* Rows half a row apart. */
static tsr_status stride_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++) views[h].k_stride /= 2;
    return st;
}

/* Entries per layer of the fixtures that evict or hide the older ones. */
#define KV_WINDOW 64

/* Keeps the last KV_WINDOW entries of each layer, dropping (and counting) the oldest. */
static tsr_status window_store(void *self, const tsr_kv_write *w) {
    kvc *c = self;
    tsr_status st = kvc_store(self, w);
    if (st < 0) return st;
    tsr_kv_rows *L = &tsr_kv_store_find(&c->kv, kvc_resolve(c, w->seq_id))->layers[w->layer];
    int64_t drop = L->n - KV_WINDOW;
    if (drop <= 0) return TSR_OK;
    L->evicted_max_pos = L->pos[drop - 1];
    for (int64_t j = drop; j < L->n; j++) tsr_kv_rows_move(&c->kv, L, j - drop, j);
    L->n = KV_WINDOW;
    c->kv.entries -= drop * c->kv.n_kv_head;
    c->kv.evicted += drop * c->kv.n_kv_head;
    return TSR_OK;
}

/* Counts as evicted what the live sequences no longer hold of the positions they reached, so
 * the rows an ended sequence had evicted leave the count. */
static void live_evicted_stats(void *self, tsr_cache_stats *out) {
    kvc *c = self;
    tsr_kv_store_stats(self, out);
    out->evicted = 0;
    for (int32_t i = 0; i < c->kv.n_seq_max; i++)
        for (int32_t l = 0; c->kv.seqs[i].alive && l < c->kv.n_layer; l++) {
            const tsr_kv_rows *L = &c->kv.seqs[i].layers[l];
            if (L->n) out->evicted += (L->pos[L->n - 1] + 1 - L->n) * c->kv.n_kv_head;
        }
}

/* Reports what it holds now as its peak. */
static void current_peak_stats(void *self, tsr_cache_stats *out) {
    tsr_kv_store_stats(self, out);
    out->bytes_peak = out->bytes_reserved;
}

/* A fork whose copy stops one entry short of the source's. */
static tsr_status short_fork(void *self, int64_t src, int64_t dst) {
    kvc *c = self;
    tsr_status st = tsr_kv_store_seq_fork(self, src, dst);
    if (st < 0) return st;
    tsr_kv_seq *s = tsr_kv_store_find(&c->kv, dst);
    for (int32_t l = 0; l < c->kv.n_layer; l++)
        if (s->layers[l].n > 0) {
            s->layers[l].n--;
            c->kv.entries -= c->kv.n_kv_head;
        }
    return TSR_OK;
}

/* Rows [j0, j0 + n) of the keys or values behind an own-format view. */
static void own_copy(const own_rows *o, int values, int64_t j0, int64_t n, float *dst) {
    const char *base = values ? o->f32.v : o->f32.k;
    size_t stride = values ? o->f32.v_stride : o->f32.k_stride;
    for (int64_t r = 0; r < n; r++)
        memcpy(dst + r * o->head_dim, base + (size_t)(j0 + r) * stride,
               (size_t)o->head_dim * sizeof(float));
}

static void own_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    own_copy(ctx, 0, j0, n, dst);
}

static void own_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    own_copy(ctx, 1, j0, n, dst);
}

/* Loaders that forget j0: every read starts at the first row. */
static void first_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    own_copy(ctx, 0, 0, n, dst);
}

static void first_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    own_copy(ctx, 1, 0, n, dst);
}

/* The store's views, each shown as a plugin dtype read through `load_k` and `load_v`. */
static tsr_status own_view(kvc *c, int64_t seq, int32_t layer, int32_t phase,
                           tsr_kv_view *views, tsr_kv_load_fn load_k, tsr_kv_load_fn load_v) {
    tsr_status st = kvc_view(c, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++) {
        c->own[h].f32 = views[h];
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = views[h].n, .pos = views[h].pos,
                                 .dtype = TSR_DTYPE_PLUGIN_FIRST, .load_k = load_k,
                                 .load_v = load_v, .load_ctx = &c->own[h]};
    }
    return st;
}

#define OWN_VIEW(fn, load_k, load_v)                                                         \
    static tsr_status fn(void *self, int64_t seq, int32_t layer, int32_t phase,              \
                         tsr_kv_view *views) {                                               \
        return own_view(self, seq, layer, phase, views, load_k, load_v);                     \
    }

OWN_VIEW(loaded_view, own_load_k, own_load_v)
OWN_VIEW(first_row_view, first_load_k, first_load_v)
OWN_VIEW(unloadable_view, own_load_k, NULL)

/* Leaves pos NULL. */
static tsr_status no_pos_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++) views[h].pos = NULL;
    return st;
}

/* Its bound on the layer is one too tight. */
static tsr_status last_layer_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                  tsr_kv_view *views) {
    kvc *c = self;
    if (layer >= c->kv.n_layer - 1) {
        c->kv.host->set_error(c->kv.host->ctx, "view: layer %d outside [0, %d)", (int)layer,
                              (int)c->kv.n_layer - 1);
        return TSR_E_RANGE;
    }
    return kvc_view(self, seq, layer, phase, views);
}

/* Leaves the last `keep` entries of a view in it. */
static void view_keep_last(tsr_kv_view *v, int64_t keep) {
    int64_t hidden = v->n - keep;
    if (hidden <= 0) return;
    v->pos += hidden;
    v->k = (const char *)v->k + (size_t)hidden * v->k_stride;
    v->v = (const char *)v->v + (size_t)hidden * v->v_stride;
    v->n = keep;
}

/* Shows the last KV_WINDOW entries of each layer and keeps the others hidden in the store. */
static tsr_status hiding_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++) view_keep_last(&views[h], KV_WINDOW);
    return st;
}

/* Shows the last KV_WINDOW - 8 h entries of KV head h, a length per head; with `own_pos`
 * false every head is given head 0's positions. */
static tsr_status per_head_window(kvc *c, int64_t seq, int32_t layer, int32_t phase,
                                  tsr_kv_view *views, bool own_pos) {
    tsr_status st = kvc_view(c, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++)
        view_keep_last(&views[h], KV_WINDOW - 8 * h);
    for (int32_t h = 1; st >= 0 && !own_pos && h < c->kv.n_kv_head; h++)
        views[h].pos = views[0].pos;
    return st;
}

static tsr_status per_head_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                tsr_kv_view *views) {
    return per_head_window(self, seq, layer, phase, views, true);
}

static tsr_status head0_pos_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                 tsr_kv_view *views) {
    return per_head_window(self, seq, layer, phase, views, false);
}

/* Shows the last KV_WINDOW entries of each layer, but everything it keeps whenever it keeps a
 * multiple of 50: evicted entries come back. */
static tsr_status flicker_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                               tsr_kv_view *views) {
    kvc *c = self;
    const tsr_kv_seq *s = tsr_kv_store_find(&c->kv, kvc_resolve(c, seq));
    if (s && s->layers[layer].n % 50 == 0) return kvc_view(self, seq, layer, phase, views);
    return hiding_view(self, seq, layer, phase, views);
}

/* Offers seq_fork and refuses every fork: an offered callback must work. */
static tsr_status refusing_fork(void *self, int64_t src, int64_t dst) {
    kvc *c = self;
    c->kv.host->set_error(c->kv.host->ctx, "seq_fork: this policy refuses every fork");
    return TSR_E_UNSUPPORTED;
}

/* Cuts one position more than asked. */
static tsr_status deep_truncate(void *self, int64_t seq, int32_t n_pos) {
    return tsr_kv_store_seq_truncate(self, seq, n_pos - 1);
}

/* Refuses a cut below what it evicted with TSR_E_INVALID instead of TSR_E_UNSUPPORTED. */
static tsr_status invalid_truncate(void *self, int64_t seq, int32_t n_pos) {
    tsr_status st = tsr_kv_store_seq_truncate(self, seq, n_pos);
    return st == TSR_E_UNSUPPORTED ? TSR_E_INVALID : st;
}

/* Expects one token per decode step: a step of several (chunked prefill, verified drafts)
 * is refused. */
static tsr_status single_token_step_end(void *self, int64_t seq) {
    kvc *c = self;
    const tsr_kv_seq *s = tsr_kv_store_find(&c->kv, seq);
    int64_t n = c->last_n[s - c->kv.seqs];
    if (n == 1) return TSR_OK;
    c->kv.host->set_error(c->kv.host->ctx, "step_end: seq %lld stored %lld rows in one step; "
                          "expected 1", (long long)seq, (long long)n);
    return TSR_E_STATE;
}

/* Never fills bytes_peak. */
static void no_peak_stats(void *self, tsr_cache_stats *out) {
    tsr_kv_store_stats(self, out);
    out->bytes_peak = 0;
}

/* ok-scores: asks for scores from position 0 on every view. */
static float *scores_of(kvc *c, int64_t seq, int32_t layer, int32_t head) {
    tsr_kv_seq *s = tsr_kv_store_find(&c->kv, seq);
    size_t slot = (size_t)(s - c->kv.seqs);
    return c->acc + ((slot * c->kv.n_layer + (size_t)layer) * c->kv.n_kv_head + head) *
                        (size_t)c->kv.n_ctx;
}

static tsr_status scores_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                              tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++)
        views[h].score_acc = scores_of(c, seq, layer, h);
    return st;
}

/* Every KV head adds its scores to head 0's buffer. */
static tsr_status shared_scores_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                     tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++)
        views[h].score_acc = scores_of(c, seq, layer, 0);
    return st;
}

/* Hands over score buffers it never zeroed; all-ones bytes (NaN) stand for what uninitialised
 * memory may hold. */
static tsr_status unzeroed_scores_view(void *self, int64_t seq, int32_t layer, int32_t phase,
                                       tsr_kv_view *views) {
    kvc *c = self;
    tsr_status st = kvc_view(self, seq, layer, phase, views);
    for (int32_t h = 0; st >= 0 && h < c->kv.n_kv_head; h++) {
        float *acc = scores_of(c, seq, layer, h);
        if (views[h].n > 0 && acc[0] == 0)
            memset(acc, 0xff, (size_t)c->kv.n_ctx * sizeof *acc);
        views[h].score_acc = acc;
    }
    return st;
}

/* Every query sees its own entry at least, so each KV head's scores sum to its query heads
 * times the queries of the step: the runner plays attention as the contract says, or this
 * fixture fails. */
static tsr_status scores_step_end(void *self, int64_t seq) {
    kvc *c = self;
    const tsr_kv_seq *s = tsr_kv_store_find(&c->kv, seq);
    double want = (double)(c->n_head / c->kv.n_kv_head) * (double)c->last_n[s - c->kv.seqs];
    for (int32_t l = 0; l < c->kv.n_layer; l++)
        for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
            float *acc = scores_of(c, seq, l, h);
            double sum = 0;
            for (int64_t j = 0; j < s->layers[l].n; j++) sum += acc[j];
            if (fabs(sum - want) > 1e-3 * want) {
                c->kv.host->set_error(c->kv.host->ctx, "layer %d head %d: scores sum to %g, "
                                      "expected %g", (int)l, (int)h, sum, want);
                return TSR_E_INTERNAL;
            }
            memset(acc, 0, (size_t)c->kv.n_ctx * sizeof *acc);
        }
    return TSR_OK;
}

#define KV_CACHE_FULL(id, name_text, create_fn, store_fn, view_fn, fork_fn, truncate_fn,      \
                      seq_end_fn, prefill_end_fn, step_end_fn, stats_fn, what)             \
    static const tsr_cache_vtable id##_vt = {                                               \
        TSR_SIZED(tsr_cache_vtable), .create = create_fn, .destroy = kvc_destroy,           \
        .seq_begin = tsr_kv_store_seq_begin, .seq_end = seq_end_fn, .seq_fork = fork_fn,    \
        .seq_truncate = truncate_fn, .store = store_fn, .view = view_fn,                    \
        .prefill_end = prefill_end_fn, .step_end = step_end_fn, .stats = stats_fn};         \
    FIXTURE(id, CACHE, name_text, what)

#define KV_CACHE_STATS(id, name_text, store_fn, view_fn, fork_fn, truncate_fn, seq_end_fn,     \
                       hook_fn, stats_fn, what)                                             \
    KV_CACHE_FULL(id, name_text, kvc_create, store_fn, view_fn, fork_fn, truncate_fn,        \
                  seq_end_fn, hook_fn, hook_fn, stats_fn, what)

#define KV_CACHE(id, name_text, store_fn, view_fn, fork_fn, truncate_fn, seq_end_fn, hook_fn,  \
                 what)                                                                      \
    KV_CACHE_STATS(id, name_text, store_fn, view_fn, fork_fn, truncate_fn, seq_end_fn,      \
                   hook_fn, tsr_kv_store_stats, what)

#define KV_CACHE_PLAIN(id, name_text, store_fn, view_fn, seq_end_fn, what) \
    KV_CACHE(id, name_text, store_fn, view_fn, NULL, NULL, seq_end_fn, NULL, what)

KV_CACHE_PLAIN(cache_desc, "bad-cache", kvc_store, unstored_view, tsr_kv_store_seq_end,
               "exposes a position it never stored")
KV_CACHE_PLAIN(cache_f16, "bad-cache-f16", coarse_f16_store, kvc_view, tsr_kv_store_seq_end,
               "keeps F16 rows with a bit of precision less than F16")
KV_CACHE_PLAIN(cache_layer2, "bad-cache-layer2", layer2_store, kvc_view, tsr_kv_store_seq_end,
               "store fails from layer 2 on")
KV_CACHE_PLAIN(cache_twice, "bad-cache-twice", kvc_store, twice_view, tsr_kv_store_seq_end,
               "exposes one position twice")
KV_CACHE_PLAIN(cache_other_seq, "bad-cache-other-seq", kvc_store, other_seq_view,
               tsr_kv_store_seq_end,
               "shows every sequence the rows of the oldest one")
KV_CACHE_PLAIN(cache_head, "bad-cache-head", kvc_store, head_view, tsr_kv_store_seq_end,
               "gives the last KV head the first one's keys")
KV_CACHE(cache_fork_share, "bad-cache-fork-share", kvc_store, kvc_view, share_fork, NULL,
         share_seq_end, NULL,
         "forks by sharing the source's storage")
KV_CACHE(cache_truncate, "bad-cache-truncate", kvc_store, kvc_view, NULL, keep_truncate,
         tsr_kv_store_seq_end, NULL,
         "truncates nothing")
KV_CACHE_PLAIN(cache_stats, "bad-cache-stats", kvc_store, kvc_view, stats_seq_end,
               "keeps counting the entries of an ended sequence")
KV_CACHE(cache_refuse, "bad-cache-refuse-truncate", kvc_store, kvc_view, NULL, refuse_truncate,
         tsr_kv_store_seq_end, NULL, "refuses to truncate though it evicted nothing")
KV_CACHE_STATS(cache_count, "bad-cache-count", kvc_store, kvc_view, NULL, NULL,
               tsr_kv_store_seq_end, NULL, per_layer_stats,
               "counts entries once per layer, not per layer and KV head")
KV_CACHE_PLAIN(cache_stride, "bad-cache-stride", kvc_store, stride_view, tsr_kv_store_seq_end,
               "gives key rows a stride of half a row")
KV_CACHE(cache_fork_short, "bad-cache-fork-short", kvc_store, kvc_view, short_fork, NULL,
         tsr_kv_store_seq_end, NULL, "forks all but the source's last entry")
KV_CACHE_STATS(cache_peak, "bad-cache-peak", kvc_store, kvc_view, tsr_kv_store_seq_fork, NULL,
               tsr_kv_store_seq_end, NULL, current_peak_stats,
               "reports the bytes it holds now as its peak")
KV_CACHE_STATS(cache_evicted, "bad-cache-evicted", window_store, kvc_view,
               tsr_kv_store_seq_fork, NULL, tsr_kv_store_seq_end, NULL, live_evicted_stats,
               "counts as evicted only what the live sequences no longer hold")
KV_CACHE_PLAIN(cache_load, "bad-cache-load", kvc_store, first_row_view, tsr_kv_store_seq_end,
               "shows rows of its own format whose loaders ignore j0")
KV_CACHE_PLAIN(ok_load, "ok-cache-load", kvc_store, loaded_view, tsr_kv_store_seq_end,
               "passes: shows rows of its own format through exact loaders")
KV_CACHE_PLAIN(cache_unreadable, "bad-cache-unreadable", kvc_store, unloadable_view,
               tsr_kv_store_seq_end, "shows rows of its own format without load_v")
KV_CACHE_PLAIN(cache_no_pos, "bad-cache-no-pos", kvc_store, no_pos_view, tsr_kv_store_seq_end,
               "leaves the positions of its views NULL")
KV_CACHE_PLAIN(cache_last_layer, "bad-cache-last-layer", kvc_store, last_layer_view,
               tsr_kv_store_seq_end, "view refuses the last layer")
KV_CACHE_FULL(cache_one_seq, "bad-cache-one-seq", one_slot_create, kvc_store, kvc_view, NULL,
              NULL, tsr_kv_store_seq_end, NULL, NULL, tsr_kv_store_stats,
              "keeps one sequence whatever n_seq_max says")
KV_CACHE_FULL(cache_single, "bad-cache-single", single_seq_create, kvc_store, kvc_view, NULL,
              NULL, tsr_kv_store_seq_end, NULL, NULL, tsr_kv_store_stats,
              "refuses n_seq_max above 1")
KV_CACHE_FULL(cache_step, "bad-cache-step", kvc_create, kvc_store, kvc_view, NULL, NULL,
              tsr_kv_store_seq_end, NULL, single_token_step_end, tsr_kv_store_stats,
              "refuses a decode step of several tokens")
KV_CACHE(cache_fork_refused, "bad-cache-fork-refused", kvc_store, kvc_view, refusing_fork,
         NULL, tsr_kv_store_seq_end, NULL, "provides seq_fork but refuses every fork")
KV_CACHE(cache_deep_truncate, "bad-cache-deep-truncate", kvc_store, kvc_view, NULL,
         deep_truncate, tsr_kv_store_seq_end, NULL, "truncates one position more than asked")
KV_CACHE(cache_truncate_status, "bad-cache-truncate-status", window_store, kvc_view, NULL,
         invalid_truncate, tsr_kv_store_seq_end, NULL,
         "refuses a cut into what it evicted with TSR_E_INVALID")
KV_CACHE(cache_unhide, "bad-cache-unhide", kvc_store, hiding_view, NULL,
         tsr_kv_store_seq_truncate, tsr_kv_store_seq_end, NULL,
         "shows a window of what it keeps, and older entries again after a truncation")
KV_CACHE_STATS(cache_no_peak, "bad-cache-no-peak", kvc_store, kvc_view, NULL, NULL,
               tsr_kv_store_seq_end, NULL, no_peak_stats, "never fills bytes_peak")
KV_CACHE_FULL(ok_baseline, "ok-cache-baseline", baseline_create, kvc_store, kvc_view,
              tsr_kv_store_seq_fork, tsr_kv_store_seq_truncate, tsr_kv_store_seq_end, NULL,
              NULL, tsr_kv_store_stats, "passes: its stats start above zero before any sequence")
KV_CACHE_PLAIN(ok_per_head, "ok-cache-per-head", kvc_store, per_head_view, tsr_kv_store_seq_end,
               "passes: shows each KV head a window of its own length")
KV_CACHE_PLAIN(cache_head_pos, "bad-cache-head-pos", kvc_store, head0_pos_view,
               tsr_kv_store_seq_end,
               "shows each KV head a window of its own length, with head 0's positions")
KV_CACHE_PLAIN(cache_flicker, "bad-cache-flicker", kvc_store, flicker_view, tsr_kv_store_seq_end,
               "shows a window of what it keeps, and all of it at every 50th entry")
KV_CACHE_PLAIN(cache_shared_scores, "bad-cache-shared-scores", kvc_store, shared_scores_view,
               tsr_kv_store_seq_end, "gives every KV head the same score_acc")
KV_CACHE_PLAIN(cache_unzeroed_scores, "bad-cache-unzeroed-scores", kvc_store,
               unzeroed_scores_view, tsr_kv_store_seq_end,
               "hands over a score_acc it never zeroed")
KV_CACHE(ok_scores, "ok-cache-scores", kvc_store, scores_view, NULL, NULL, tsr_kv_store_seq_end,
         scores_step_end,
         "passes: checks that the runner fills score_acc as attention would")

/* ---- attention: the plain mean of every value, no softmax, no causal mask ----------------- */

typedef struct attn {
    const tsr_host *host;
    tsr_attention_init init;
} attn;

static tsr_status attn_create(const tsr_host *host, const tsr_params *p,
                              const tsr_attention_init *init, void **out) {
    attn *a = tsr_calloc(host, 1, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->host = host;
    a->init = *init;
    *out = a;
    return TSR_OK;
}

static void attn_destroy(void *self) {
    attn *a = self;
    a->host->free(a->host->ctx, a);
}

static tsr_status attn_forward(void *self, const tsr_attention_call *call) {
    const attn *a = self;
    const int32_t hd = a->init.head_dim, group = a->init.n_head / a->init.n_kv_head;
    for (int64_t t = 0; t < call->n_q; t++)
        for (int32_t h = 0; h < a->init.n_head; h++) {
            const tsr_kv_view *v = &call->views[h / group];
            float *o = call->out + ((size_t)t * a->init.n_head + h) * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = 0;
            for (int64_t j = 0; j < v->n; j++) {
                const float *row = (const float *)((const char *)v->v + (size_t)j * v->v_stride);
                for (int32_t i = 0; i < hd; i++) o[i] += row[i] / (float)v->n;
            }
        }
    return TSR_OK;
}

/* Softmax attention as the contract says, but for the one flaw `flaw` names. */
enum attn_flaw {
    ATTN_FINE,
    ATTN_NO_MASK,
    ATTN_GQA_MODULO,
    ATTN_NO_SCORES,
    ATTN_SKIP_BLIND_ROWS,
    ATTN_F32_ONLY /* refuses views of any other storage */
};

static tsr_status attn_flawed(const attn *a, const tsr_attention_call *call,
                              enum attn_flaw flaw) {
    const tsr_host *host = a->host;
    const int32_t hd = a->init.head_dim, nh = a->init.n_head, nkv = a->init.n_kv_head;
    int64_t n_max = 0;
    for (int32_t g = 0; g < nkv; g++) {
        if (flaw == ATTN_F32_ONLY && call->views[g].dtype != TSR_DTYPE_F32) {
            host->set_error(host->ctx, "views[%d]: dtype %d; only F32 views are supported",
                            (int)g, (int)call->views[g].dtype);
            return TSR_E_UNSUPPORTED;
        }
        if (call->views[g].n > n_max) n_max = call->views[g].n;
    }
    double *p = host->alloc(host->ctx, ((size_t)n_max + 1) * sizeof *p, 0);
    float *row = host->alloc(host->ctx, (size_t)hd * sizeof *row, 0);
    if (!p || !row) {
        host->free(host->ctx, p);
        host->free(host->ctx, row);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    for (int64_t t = 0; t < call->n_q; t++)
        for (int32_t h = 0; h < nh; h++) {
            const tsr_kv_view *v = &call->views[flaw == ATTN_GQA_MODULO ? h % nkv : h / (nh / nkv)];
            const float *q = call->q + ((size_t)t * nh + h) * hd;
            float *o = call->out + ((size_t)t * nh + h) * hd;
            double mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < v->n; j++) {
                p[j] = -INFINITY;
                if (flaw != ATTN_NO_MASK && v->pos[j] > call->q_pos[t]) continue;
                size_t stride;
                const float *k = tsr_kv_view_rows(v, 0, j, 1, hd, row, &stride);
                double s = 0;
                for (int32_t i = 0; i < hd; i++) s += (double)q[i] * k[i];
                p[j] = s * call->scale;
                mx = fmax(mx, p[j]);
            }
            if (mx == -INFINITY && flaw == ATTN_SKIP_BLIND_ROWS) continue;
            for (int32_t i = 0; i < hd; i++) o[i] = 0;
            if (mx == -INFINITY) continue;
            for (int64_t j = 0; j < v->n; j++) sum += p[j] = exp(p[j] - mx);
            for (int64_t j = 0; j < v->n; j++) {
                size_t stride;
                const float *val = tsr_kv_view_rows(v, 1, j, 1, hd, row, &stride);
                for (int32_t i = 0; i < hd; i++) o[i] += (float)(p[j] / sum * val[i]);
                if (v->score_acc && flaw != ATTN_NO_SCORES && call->q_pos[t] >= v->score_from_pos)
                    v->score_acc[j] += (float)(p[j] / sum);
            }
        }
    host->free(host->ctx, p);
    host->free(host->ctx, row);
    return TSR_OK;
}

/* Refuses grouped-query shapes. */
static tsr_status mha_create(const tsr_host *host, const tsr_params *p,
                             const tsr_attention_init *init, void **out) {
    if (init->n_kv_head != init->n_head) {
        host->set_error(host->ctx, "n_kv_head %d differs from n_head %d: grouped-query "
                        "attention is not supported", (int)init->n_kv_head, (int)init->n_head);
        return TSR_E_UNSUPPORTED;
    }
    return attn_create(host, p, init, out);
}

#define ATTENTION_CREATE(id, name_text, create_fn, flaw, what)                              \
    static tsr_status id##_forward(void *self, const tsr_attention_call *call) {            \
        return attn_flawed(self, call, flaw);                                               \
    }                                                                                       \
    static const tsr_attention_vtable id##_vt = {TSR_SIZED(tsr_attention_vtable),           \
                                                 .create = create_fn,                       \
                                                 .destroy = attn_destroy,                   \
                                                 .forward = id##_forward};                  \
    FIXTURE(id, ATTENTION, name_text, what)

#define ATTENTION(id, name_text, flaw, what) \
    ATTENTION_CREATE(id, name_text, attn_create, flaw, what)

ATTENTION(attn_causal, "bad-attention-causal", ATTN_NO_MASK, "ignores the causal mask")
ATTENTION(attn_gqa, "bad-attention-gqa", ATTN_GQA_MODULO,
          "query head h reads KV head h % n_kv_head")
ATTENTION(attn_scores, "bad-attention-scores", ATTN_NO_SCORES, "never adds to score_acc")
ATTENTION(attn_blind, "bad-attention-blind", ATTN_SKIP_BLIND_ROWS,
          "leaves the rows of queries that see no entry unwritten")
ATTENTION(attn_f32, "bad-attention-f32", ATTN_F32_ONLY, "refuses views that are not F32")
ATTENTION_CREATE(attn_mha, "bad-attention-mha", mha_create, ATTN_FINE,
                 "refuses n_kv_head < n_head")

static const tsr_attention_vtable attn_vt = {
    TSR_SIZED(tsr_attention_vtable), .create = attn_create, .destroy = attn_destroy,
    .forward = attn_forward};
static const tsr_plugin_desc attention_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION), .name = "bad-attention",
    .version = "0", .description = "averages every value, ignoring scores and causality",
    .vtable = &attn_vt};

/* ---- routers: top-k of the gate logits, each breaking one rule ----------------------------- */

typedef struct router {
    const tsr_host *host;
    int32_t n_expert;
    const tsr_expert_access *experts;
    tsr_tensor sub[3]; /* substitutes handed back: expert 0's matrices, as the host lends them */
} router;

static tsr_status router_create(const tsr_host *host, const tsr_params *p,
                                const tsr_router_init *init, void **out) {
    router *r = tsr_calloc(host, 1, sizeof *r);
    if (!r) return TSR_E_NOMEM;
    r->host = host;
    r->n_expert = init->n_expert;
    r->experts = init->experts;
    *out = r;
    return TSR_OK;
}

/* Refuses to use every expert, an off-by-one in its check of n_expert_used. */
static tsr_status some_experts_create(const tsr_host *host, const tsr_params *p,
                                      const tsr_router_init *init, void **out) {
    if (init->n_expert_used >= init->n_expert) {
        host->set_error(host->ctx, "n_expert_used %d: expected fewer than the %d experts",
                        (int)init->n_expert_used, (int)init->n_expert);
        return TSR_E_INVALID;
    }
    return router_create(host, p, init, out);
}

static void router_destroy(void *self) {
    router *r = self;
    r->host->free(r->host->ctx, r);
}

/* What a fixture router does wrong. */
enum router_flaw {
    ROUTER_FINE,
    ROUTER_PAST_END,    /* puts expert n_expert in the first slot of each token */
    ROUTER_REPEAT,      /* takes the argmax k times, never excluding what it chose */
    ROUTER_FIRST_WEIGHT, /* writes the weight of the first slot only */
    ROUTER_NEEDS_PREV,   /* refuses a layer without the previous layer's choices */
    ROUTER_PARTIAL,      /* hands back substitutes for gate and up but not down */
    ROUTER_MISSHAPED     /* hands back an up matrix shaped as the down one */
};

/* Hands back expert 0's matrices as the substitutes of slot 0 of every token, with `flaw`. */
static tsr_status router_substitute(router *r, const tsr_route_call *call,
                                    enum router_flaw flaw) {
    tsr_status st = r->experts->matrices(r->experts->ctx, call->layer, 0, &r->sub[0],
                                         &r->sub[1], &r->sub[2]);
    if (st < 0) {
        r->host->set_error(r->host->ctx, "layer %d: no matrices for expert 0", (int)call->layer);
        return st;
    }
    if (flaw == ROUTER_MISSHAPED) {
        int64_t ne0 = r->sub[1].ne[0];
        r->sub[1].ne[0] = r->sub[1].ne[1];
        r->sub[1].ne[1] = ne0;
    }
    for (int64_t t = 0; t < call->n_tok; t++)
        for (int m = 0; m < (flaw == ROUTER_PARTIAL ? 2 : 3); m++)
            call->substitute[t * call->k * 3 + m] = &r->sub[m];
    return TSR_OK;
}

/* The k largest gate logits with equal weights, but for the flaw `flaw` names. */
static tsr_status router_topk(router *r, const tsr_route_call *call, enum router_flaw flaw) {
    if (flaw == ROUTER_NEEDS_PREV && !call->prev_experts) {
        r->host->set_error(r->host->ctx, "layer %d: no previous layer's experts",
                           (int)call->layer);
        return TSR_E_INVALID;
    }
    for (int64_t t = 0; t < call->n_tok; t++) {
        const float *g = call->gate_logits + t * r->n_expert;
        int32_t *chosen = call->experts + t * call->k;
        for (int32_t s = 0; s < call->k; s++) {
            int32_t best = -1;
            for (int32_t e = 0; e < r->n_expert; e++) {
                int taken = 0;
                for (int32_t before = 0; flaw != ROUTER_REPEAT && before < s; before++)
                    taken |= chosen[before] == e;
                if (!taken && (best < 0 || g[e] > g[best])) best = e;
            }
            chosen[s] = flaw == ROUTER_PAST_END && s == 0 ? r->n_expert : best;
            if (flaw != ROUTER_FIRST_WEIGHT || s == 0)
                call->weights[t * call->k + s] = 1.0f / (float)call->k;
        }
    }
    return flaw == ROUTER_PARTIAL || flaw == ROUTER_MISSHAPED ? router_substitute(r, call, flaw)
                                                               : TSR_OK;
}

#define ROUTER(id, name_text, create_fn, flaw, what)                                        \
    static tsr_status id##_route(void *self, const tsr_route_call *call) {                  \
        return router_topk(self, call, flaw);                                               \
    }                                                                                       \
    static const tsr_router_vtable id##_vt = {TSR_SIZED(tsr_router_vtable),                 \
                                              .create = create_fn,                          \
                                              .destroy = router_destroy,                    \
                                              .route = id##_route};                         \
    FIXTURE(id, ROUTER, name_text, what)

ROUTER(router_desc, "bad-router", router_create, ROUTER_PAST_END, "routes to expert n_expert")
ROUTER(router_twice_desc, "bad-router-twice", router_create, ROUTER_REPEAT,
       "picks one expert for every slot")
ROUTER(router_weight, "bad-router-weight", router_create, ROUTER_FIRST_WEIGHT,
       "leaves the weights of all slots but the first unwritten")
ROUTER(router_prev, "bad-router-prev", router_create, ROUTER_NEEDS_PREV,
       "refuses the first layer, which has no previous layer's choices")
ROUTER(router_all, "bad-router-all", some_experts_create, ROUTER_FINE,
       "refuses to use every expert")
ROUTER(router_partial, "bad-router-partial", router_create, ROUTER_PARTIAL,
       "hands back two of an expert's three matrices")
ROUTER(router_misshaped, "bad-router-misshaped", router_create, ROUTER_MISSHAPED,
       "hands back an up matrix of the down matrix's shape")

/* Asks for something no host provides. */
static int32_t router_needs_more(void *self) {
    (void)self;
    return TSR_ROUTER_NEEDS_NEXT_GATE | 4;
}

static tsr_status router_needs_route(void *self, const tsr_route_call *call) {
    return router_topk(self, call, ROUTER_FINE);
}

static const tsr_router_vtable router_needs_vt = {
    TSR_SIZED(tsr_router_vtable), .create = router_create, .destroy = router_destroy,
    .route = router_needs_route, .needs = router_needs_more};
FIXTURE(router_needs, ROUTER, "bad-router-needs", "needs a flag TSR_ROUTER_NEEDS_* lacks")

/* ---- backends: the header's formulas on host memory, each breaking one rule ---------------- */

/* y (n, ne[1]) = x (n, ne[0]) . W^T for F32 weights; `transposed` reads W as (ne[0], ne[1]). */
static void f32_matmul(float *y, const tsr_tensor *w, const float *x, int64_t n,
                       int transposed) {
    const float *wd = w->data;
    for (int64_t t = 0; t < n; t++)
        for (int64_t o = 0; o < w->ne[1]; o++) {
            double s = 0;
            for (int64_t i = 0; i < w->ne[0]; i++)
                s += (double)x[t * w->ne[0] + i] *
                     wd[transposed ? i * w->ne[1] + o : o * w->ne[0] + i];
            y[t * w->ne[1] + o] = (float)s;
        }
}

/* What a fixture backend does wrong. */
enum be_flaw {
    BE_FINE,
    BE_NORM_NO_WEIGHT, /* rms_norm forgets the weight */
    BE_SWAPPED_GLU,    /* swiglu applies SiLU to up instead of gate */
    BE_NO_BROADCAST,   /* add reads b row by row even when b_rows is 1 */
    BE_ADD_ZEROED,     /* add clears y, then sums a and b into it: wrong in place */
    BE_NEOX_AS_NORMAL, /* rope rotates adjacent pairs in NeoX mode too */
    BE_NO_NEOX,        /* rope refuses NeoX mode */
    BE_TRANSPOSED,     /* matmul reads W as (ne[0], ne[1]) */
    BE_ROW_LENGTH,     /* get_rows steps through W by ne[1] elements a row */
    BE_NO_F32,         /* supports() says 0 for F32 */
    BE_DEVICE,         /* says its memory is device memory and offers no way to reach it */
    BE_MIX_REVERSED    /* weighted_sum adds a token's slots from the last to the first */
};

typedef struct backend {
    const tsr_host *host;
    enum be_flaw flaw;
} backend;

static tsr_status be_create(const tsr_host *host, const tsr_params *p,
                            const tsr_backend_init *init, void **out) {
    backend *b = tsr_calloc(host, 1, sizeof *b);
    if (!b) return TSR_E_NOMEM;
    b->host = host;
    *out = b;
    return TSR_OK;
}

static void be_destroy(void *self) {
    backend *b = self;
    b->host->free(b->host->ctx, b);
}

static tsr_status be_buffer_alloc(void *self, size_t bytes, void **out) {
    backend *b = self;
    *out = b->host->alloc(b->host->ctx, bytes, 64);
    return *out ? TSR_OK : TSR_E_NOMEM;
}

static void be_buffer_free(void *self, void *buf) {
    backend *b = self;
    b->host->free(b->host->ctx, buf);
}

static int32_t be_supports(void *self, int32_t dtype) {
    const backend *b = self;
    return dtype == TSR_DTYPE_F32 && b->flaw != BE_NO_F32;
}

static int32_t be_memory_space(void *self) {
    const backend *b = self;
    return b->flaw == BE_DEVICE ? TSR_MEMORY_DEVICE : TSR_MEMORY_HOST;
}

static tsr_status be_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                            int64_t n) {
    const backend *b = self;
    f32_matmul(y, w, x, n, b->flaw == BE_TRANSPOSED);
    return TSR_OK;
}

static tsr_status be_get_rows(void *self, float *y, const tsr_tensor *w, const int32_t *ids,
                              int64_t n) {
    const backend *b = self;
    int64_t row_length = b->flaw == BE_ROW_LENGTH ? w->ne[1] : w->ne[0];
    for (int64_t t = 0; t < n; t++)
        memcpy(y + t * w->ne[0], (const float *)w->data + ids[t] * row_length,
               (size_t)w->ne[0] * sizeof(float));
    return TSR_OK;
}

static tsr_status be_rms_norm(void *self, float *y, const float *x, const float *weight,
                              int64_t n, int64_t dim, float eps) {
    const backend *b = self;
    for (int64_t t = 0; t < n; t++) {
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double)x[t * dim + i] * x[t * dim + i];
        double inv = 1.0 / sqrt(ss / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            y[t * dim + i] =
                (float)(x[t * dim + i] * inv * (b->flaw == BE_NORM_NO_WEIGHT ? 1.0f : weight[i]));
    }
    return TSR_OK;
}

static tsr_status be_rope(void *self, float *x, const int32_t *pos, int64_t n, int32_t n_head,
                          int32_t head_dim, const tsr_rope_params *rope) {
    const backend *b = self;
    if (b->flaw == BE_NO_NEOX && rope->mode == TSR_ROPE_NEOX) {
        b->host->set_error(b->host->ctx, "rope: NeoX mode is not supported");
        return TSR_E_UNSUPPORTED;
    }
    int neox = rope->mode == TSR_ROPE_NEOX && b->flaw != BE_NEOX_AS_NORMAL;
    for (int64_t t = 0; t < n; t++)
        for (int32_t h = 0; h < n_head; h++) {
            float *xi = x + (t * n_head + h) * head_dim;
            for (int32_t i = 0; i < rope->n_rot / 2; i++) {
                double theta = pos[t] * (double)rope->freq_scale *
                               pow(rope->freq_base, -2.0 * i / rope->n_rot);
                int32_t i0 = neox ? i : 2 * i;
                int32_t i1 = neox ? i + rope->n_rot / 2 : 2 * i + 1;
                double a = xi[i0], c = xi[i1];
                xi[i0] = (float)(a * cos(theta) - c * sin(theta));
                xi[i1] = (float)(a * sin(theta) + c * cos(theta));
            }
        }
    return TSR_OK;
}

static tsr_status be_swiglu(void *self, float *y, const float *gate, const float *up,
                            int64_t n, int64_t dim) {
    const backend *b = self;
    if (b->flaw == BE_SWAPPED_GLU) {
        const float *t = gate;
        gate = up;
        up = t;
    }
    for (int64_t i = 0; i < n * dim; i++)
        y[i] = (float)(gate[i] / (1.0 + exp(-(double)gate[i])) * up[i]);
    return TSR_OK;
}

static tsr_status be_add(void *self, float *y, const float *a, const float *bias, int64_t n,
                         int64_t dim, int64_t b_rows) {
    const backend *b = self;
    int broadcast = b_rows == 1 && b->flaw != BE_NO_BROADCAST;
    if (b->flaw == BE_ADD_ZEROED) memset(y, 0, (size_t)(n * dim) * sizeof *y);
    for (int64_t i = 0; i < n * dim; i++) y[i] = a[i] + bias[broadcast ? i % dim : i];
    return TSR_OK;
}

#define BE_OPS                                                                              \
    .supports = be_supports, .matmul = be_matmul, .get_rows = be_get_rows,                  \
    .rms_norm = be_rms_norm, .rope = be_rope, .swiglu = be_swiglu, .add = be_add

/* Allocates buffers but offers no upload or download. */
static const tsr_backend_vtable backend_vt = {
    TSR_SIZED(tsr_backend_vtable), .create = be_create, .destroy = be_destroy,
    .buffer_alloc = be_buffer_alloc, .buffer_free = be_buffer_free, BE_OPS};
static const tsr_plugin_desc backend_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_BACKEND, BACKEND), .name = "bad-backend-memory", .version = "0",
    .description = "allocates buffers but offers no upload or download", .vtable = &backend_vt};

#define BACKEND(id, name_text, flaw_value, what)                                            \
    FLAWED_CREATE(id##_create, be_create, tsr_backend_init, backend, flaw_value)            \
    static const tsr_backend_vtable id##_vt = {TSR_SIZED(tsr_backend_vtable),               \
                                               .create = id##_create, .destroy = be_destroy, \
                                               BE_OPS, .memory_space = be_memory_space};    \
    FIXTURE(id, BACKEND, name_text, what)

BACKEND(be_norm, "bad-backend-norm", BE_NORM_NO_WEIGHT, "rms_norm forgets the weight")
BACKEND(be_glu, "bad-backend-swiglu", BE_SWAPPED_GLU, "swiglu applies SiLU to up, not gate")
BACKEND(be_broadcast, "bad-backend-broadcast", BE_NO_BROADCAST,
        "add ignores b_rows = 1 and reads b row by row")
BACKEND(be_in_place, "bad-backend-in-place", BE_ADD_ZEROED,
        "add clears y before summing into it, losing a when y == a")
BACKEND(be_neox, "bad-backend-neox", BE_NEOX_AS_NORMAL, "rope rotates adjacent pairs in NeoX mode")
BACKEND(be_no_neox, "bad-backend-no-neox", BE_NO_NEOX, "rope refuses NeoX mode")
BACKEND(be_transposed, "bad-backend-transposed", BE_TRANSPOSED, "matmul reads W transposed")
BACKEND(be_rows, "bad-backend-rows", BE_ROW_LENGTH, "get_rows takes ne[1] as the row length")
BACKEND(be_no_f32, "bad-backend-no-f32", BE_NO_F32, "supports no F32 weights")
BACKEND(be_device, "bad-backend-device", BE_DEVICE,
        "says device memory without buffer_alloc, buffer_free, upload and download")

static tsr_status be_copy_rows(void *self, float *y, const int32_t *y_ids, const float *x,
                               const int32_t *x_ids, int64_t n, int64_t dim) {
    (void)self;
    for (int64_t i = 0; i < n; i++)
        memcpy(y + (y_ids ? y_ids[i] : i) * dim, x + (x_ids ? x_ids[i] : i) * dim,
               (size_t)dim * sizeof *y);
    return TSR_OK;
}

static tsr_status be_weighted_sum(void *self, float *y, const float *x, const float *w,
                                  int64_t n, int64_t k, int64_t dim) {
    const backend *b = self;
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < dim; i++) {
            float sum = 0;
            for (int64_t j = 0; j < k; j++) {
                int64_t s = b->flaw == BE_MIX_REVERSED ? k - 1 - j : j;
                float p = w[t * k + s] * x[(t * k + s) * dim + i];
                sum = j ? sum + p : p;
            }
            y[t * dim + i] = sum;
        }
    return TSR_OK;
}

/* Gathers and scatters rows, but cannot mix them. */
static const tsr_backend_vtable be_half_rows_vt = {
    TSR_SIZED(tsr_backend_vtable), .create = be_create, .destroy = be_destroy, BE_OPS,
    .copy_rows = be_copy_rows};
FIXTURE(be_half_rows, BACKEND, "bad-backend-half-rows", "copy_rows without weighted_sum")

FLAWED_CREATE(be_mix_create, be_create, tsr_backend_init, backend, BE_MIX_REVERSED)
static const tsr_backend_vtable be_mix_vt = {
    TSR_SIZED(tsr_backend_vtable), .create = be_mix_create, .destroy = be_destroy, BE_OPS,
    .copy_rows = be_copy_rows, .weighted_sum = be_weighted_sum};
FIXTURE(be_mix, BACKEND, "bad-backend-mix", "weighted_sum adds the slots from the last")

/* ---- quantizers: keep F32 weights in place, each breaking one rule ------------------------- */

/* What a fixture quantizer does wrong. */
enum quant_flaw {
    QUANT_ZEROS,          /* dequantizes every weight to zero */
    QUANT_WRONG_STATUS,   /* refuses F32 sources with TSR_E_INVALID, not TSR_E_UNSUPPORTED */
    QUANT_HALF_SHAPE,     /* reports ne[0] halved, as if it packed two weights an element */
    QUANT_NO_BITS,        /* leaves bits_per_weight 0 */
    QUANT_UNMEASURED,     /* reports rel_rmse -1 for "not measured" */
    QUANT_ROWS_FROM_ZERO, /* dequantize_rows ignores row0 */
    QUANT_WHOLE_ONLY,     /* dequantize_rows refuses a range that does not start at row 0 */
    QUANT_OWN_TYPES_ONLY, /* dequantize_rows refuses the F32 it kept */
    QUANT_TRANSPOSED,     /* matmul reads W transposed */
    QUANT_MATMUL_INVALID  /* matmul leaves F32 to the backend with TSR_E_INVALID */
};

typedef struct quant {
    const tsr_host *host;
    enum quant_flaw flaw;
} quant;

static tsr_status quant_create(const tsr_host *host, const tsr_params *p,
                               const tsr_quantizer_init *init, void **out) {
    quant *q = tsr_calloc(host, 1, sizeof *q);
    if (!q) return TSR_E_NOMEM;
    q->host = host;
    *out = q;
    return TSR_OK;
}

static void quant_destroy(void *self) {
    quant *q = self;
    q->host->free(q->host->ctx, q);
}

static tsr_status quant_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
    const quant *q = self;
    if (q->flaw == QUANT_WRONG_STATUS) {
        q->host->set_error(q->host->ctx, "%s: F32 sources are not taken", in->src.name);
        return TSR_E_INVALID;
    }
    out->dst = in->src;
    if (q->flaw == QUANT_HALF_SHAPE) out->dst.ne[0] /= 2;
    out->bits_per_weight = q->flaw == QUANT_NO_BITS ? 0 : 32;
    out->rel_rmse = q->flaw == QUANT_UNMEASURED ? -1 : 0;
    out->owns_data = 0;
    return TSR_OK;
}

static void quant_release(void *self, tsr_tensor *w) {}

static tsr_status quant_dequantize(void *self, float *y, const tsr_tensor *w, int64_t row0,
                                   int64_t n_rows) {
    const quant *q = self;
    if (q->flaw == QUANT_OWN_TYPES_ONLY) {
        q->host->set_error(q->host->ctx, "dequantize_rows: %s: dtype %d is not one of mine",
                           w->name, (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    if (q->flaw == QUANT_WHOLE_ONLY && row0 != 0) {
        q->host->set_error(q->host->ctx, "dequantize_rows: rows from %lld: only whole tensors",
                           (long long)row0);
        return TSR_E_UNSUPPORTED;
    }
    if (q->flaw == QUANT_ROWS_FROM_ZERO) row0 = 0;
    const float *src = (const float *)w->data + row0 * w->ne[0];
    for (int64_t i = 0; i < n_rows * w->ne[0]; i++) y[i] = q->flaw == QUANT_ZEROS ? 0 : src[i];
    return TSR_OK;
}

static tsr_status quant_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                               int64_t n) {
    const quant *q = self;
    if (q->flaw == QUANT_MATMUL_INVALID) {
        q->host->set_error(q->host->ctx, "matmul: %s: dtype %d is the backend's", w->name,
                           (int)w->dtype);
        return TSR_E_INVALID;
    }
    f32_matmul(y, w, x, n, q->flaw == QUANT_TRANSPOSED);
    return TSR_OK;
}

#define QUANTIZER(id, name_text, flaw_value, what)                                          \
    FLAWED_CREATE(id##_create, quant_create, tsr_quantizer_init, quant, flaw_value)         \
    static const tsr_quantizer_vtable id##_vt = {                                           \
        TSR_SIZED(tsr_quantizer_vtable), .create = id##_create, .destroy = quant_destroy,   \
        .prepare = quant_prepare, .release = quant_release, .matmul = quant_matmul,         \
        .dequantize_rows = quant_dequantize};                                               \
    FIXTURE(id, QUANTIZER, name_text, what)

QUANTIZER(quantizer_desc, "bad-quantizer", QUANT_ZEROS, "dequantizes every weight to zero")
QUANTIZER(quant_status, "bad-quantizer-status", QUANT_WRONG_STATUS,
          "refuses F32 sources with TSR_E_INVALID")
QUANTIZER(quant_shape, "bad-quantizer-shape", QUANT_HALF_SHAPE, "halves ne[0]")
QUANTIZER(quant_bits, "bad-quantizer-bits", QUANT_NO_BITS, "reports 0 bits per weight")
QUANTIZER(quant_rmse, "bad-quantizer-rmse", QUANT_UNMEASURED, "reports rel_rmse -1")
QUANTIZER(quant_rows, "bad-quantizer-rows", QUANT_ROWS_FROM_ZERO,
          "dequantize_rows starts at row 0 whatever row0 says")
QUANTIZER(quant_whole, "bad-quantizer-whole", QUANT_WHOLE_ONLY,
          "dequantize_rows refuses a range that does not start at row 0")
QUANTIZER(quant_own_types, "bad-quantizer-own-types", QUANT_OWN_TYPES_ONLY,
          "dequantize_rows refuses the F32 weights it kept")
QUANTIZER(quant_matmul_status, "bad-quantizer-matmul-status", QUANT_MATMUL_INVALID,
          "matmul refuses F32 with TSR_E_INVALID")
QUANTIZER(quant_transposed, "bad-quantizer-transposed", QUANT_TRANSPOSED,
          "matmul reads W transposed")

TSR_PLUGIN_EXPORT(&vocab, &runaway, &leak, &crash, &unbegun, &gap, &fork_live, &fork_leak, &scatter,
                  &draft, &pad, &one_based, &end_twice, &empty_batch, &silent, &cramped, &exits,
                  &memory, &no_version, &two_lines, &unusable, &param_doc, &command_doc,
                  &command_fresh, &default_refused, &quiet, &big_window_leak, &pick, &param,
                  &cache_desc, &cache_f16, &cache_layer2, &cache_twice, &cache_other_seq,
                  &cache_head, &cache_fork_share, &cache_truncate, &cache_stats, &cache_refuse,
                  &cache_count, &cache_stride, &ok_scores, &cache_fork_short, &cache_peak,
                  &cache_evicted, &cache_load, &ok_load, &ok_baseline, &cache_unreadable,
                  &cache_no_pos, &cache_last_layer, &cache_one_seq, &cache_step,
                  &cache_fork_refused, &cache_deep_truncate, &cache_truncate_status, &cache_unhide, &cache_no_peak,
                  &ok_per_head, &cache_head_pos, &cache_flicker, &cache_shared_scores,
                  &cache_unzeroed_scores,
                  &attention_desc, &attn_causal, &attn_gqa, &attn_scores, &attn_blind, &attn_f32,
                  &attn_mha, &router_desc, &router_twice_desc, &router_weight, &router_all,
                  &backend_desc, &be_norm, &be_glu, &be_broadcast, &be_in_place, &be_neox,
                  &be_no_neox, &be_transposed, &be_rows, &be_no_f32, &be_device, &quantizer_desc,
                  &quant_status, &quant_shape, &quant_bits, &quant_rmse, &quant_rows, &quant_whole,
                  &quant_transposed, &cache_single, &router_prev, &quant_own_types,
                  &quant_matmul_status, &router_partial, &router_misshaped, &router_needs,
                  &be_half_rows, &be_mix, &no_rollback, &fork_restart, &truncate_ended,
                  &runon, &draft_leak, &draft_rollback, &unwaited, &busy, &optional, &ok_optional)
