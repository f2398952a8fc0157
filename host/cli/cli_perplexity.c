/* `tessera perplexity`: quality on a text, and the KL divergence against a baseline's
 * next-token distributions saved to a file (llama.cpp's --kl-divergence-base). */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/outfile.h"
#include "cli/cli_score.h"
#include "cli/cli_session.h"

/* The baseline file (--kl-base): a header, the chunks' token ids as the text gave them, then
 * for each chunk the log-probabilities of its scored positions, all little-endian:
 *   "TSRKLB01"  u32 n_vocab  u32 ctx  u32 chunks  u32 0  u64 text_tokens
 *   i32 ids[chunks * ctx]   f32 log_probs[chunks][ctx - ctx/2 - 1][n_vocab]
 * A run that reads it must have the same vocabulary size, ctx, chunks and text. */
#define KL_MAGIC "TSRKLB01"

typedef struct kl_header {
    char magic[8];
    uint32_t n_vocab, ctx, chunks, zero;
    uint64_t text_tokens;
} kl_header;

typedef struct kl_file {
    const char *path;
    bool reading;
    tsr_outfile out; /* writing */
    FILE *in;        /* reading */
} kl_file;

static tsr_status kl_open_write(kl_file *k, const char *text_path, const kl_header *h,
                                const int32_t *ids, tsr_error *err) {
    tsr_status st = tsr_outfile_open(&k->out, k->path, text_path, err);
    if (st < 0) return st;
    tsr_outfile_write(&k->out, h, sizeof *h);
    tsr_outfile_write(&k->out, ids, (size_t)h->chunks * h->ctx * sizeof *ids);
    return TSR_OK;
}

static tsr_status kl_short(const kl_file *k, tsr_error *err) {
    if (ferror(k->in))
        return tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", k->path, strerror(errno));
    return tsr_error_set(err, TSR_E_INVALID, "%s: ends early: not a whole --kl-base file",
                         k->path);
}

static tsr_status kl_open_read(kl_file *k, const kl_header *want, const int32_t *ids,
                               tsr_error *err) {
    if (!(k->in = fopen(k->path, "rb")))
        return tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", k->path, strerror(errno));
    kl_header h;
    if (fread(&h, sizeof h, 1, k->in) != 1 || memcmp(h.magic, KL_MAGIC, 8) != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: not a file written by tessera perplexity "
                             "--kl-base (expected '%s' at offset 0)", k->path, KL_MAGIC);
    if (h.n_vocab != want->n_vocab)
        return tsr_error_set(err, TSR_E_INVALID, "%s: written for a vocabulary of %u tokens; "
                             "this model has %u", k->path, h.n_vocab, want->n_vocab);
    if (h.ctx != want->ctx)
        return tsr_error_set(err, TSR_E_INVALID, "%s: written with --ctx %u; this run has --ctx "
                             "%u", k->path, h.ctx, want->ctx);
    if (h.text_tokens != want->text_tokens)
        return tsr_error_set(err, TSR_E_INVALID, "%s: written for a text of %llu tokens; this "
                             "text has %llu", k->path, (unsigned long long)h.text_tokens,
                             (unsigned long long)want->text_tokens);
    if (h.chunks != want->chunks)
        return tsr_error_set(err, TSR_E_INVALID, "%s: written for %u chunks; this run scores %u "
                             "(--chunks)", k->path, h.chunks, want->chunks);
    /* The length is known before any work for a regular file; a pipe can only end early. */
    struct stat st;
    uint64_t size = sizeof h + ((uint64_t)h.chunks * h.ctx +
                                (uint64_t)h.chunks * (h.ctx - h.ctx / 2 - 1) * h.n_vocab) * 4;
    if (fstat(fileno(k->in), &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size != size)
        return (uint64_t)st.st_size < size
                   ? kl_short(k, err)
                   : tsr_error_set(err, TSR_E_INVALID, "%s: longer than its header says: not "
                                   "a whole --kl-base file", k->path);
    for (size_t i = 0; i < (size_t)h.chunks * h.ctx; i++) {
        int32_t id;
        if (fread(&id, sizeof id, 1, k->in) != 1) return kl_short(k, err);
        if (id != ids[i])
            return tsr_error_set(err, TSR_E_INVALID, "%s: token %zu is %d there and %d in this "
                                 "text: written for another text or tokenizer", k->path, i, id,
                                 ids[i]);
    }
    return TSR_OK;
}

static void kl_close(kl_file *k) {
    tsr_outfile_discard(&k->out);
    if (k->in) fclose(k->in);
    k->in = NULL;
}

int tsr_cli_perplexity(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    const char *text_path = NULL, *kl_path = NULL;
    int64_t ctx = 512, max_chunks = -1, ubatch = -1, prefill = -1;
    bool json = false, kl = false;
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera perplexity -m MODEL [CONFIG.yaml] -f TEXT [--ctx 512]\n"
                   "                          [--chunks K] [--ubatch N] [--prefill N]\n"
                   "                          [--kl-base FILE [--kl]] [--json] [-t T]\n"
                   "                          [--set K=V]... [--plugin-dir DIR]...\n"
                   "llama.cpp's definition: the tokenized text is cut into chunks of --ctx tokens\n"
                   "(each starting with BOS), each chunk runs from an empty cache, and the second\n"
                   "half of each chunk is scored. Prints the perplexity and its standard error.\n"
                   "Each chunk is one forward, unless --ubatch N feeds it N tokens per forward\n"
                   "(so that a cache policy evicts inside it) after a first forward of --prefill\n"
                   "tokens (default N), the prompt a policy such as snapkv compresses.\n"
                   "--kl-base FILE writes the next-token log-probabilities of the scored positions\n"
                   "(a baseline); --kl-base FILE --kl reads them back and also prints the mean\n"
                   "KL divergence KL(baseline || this) and how often both put the same token on\n"
                   "top (llama.cpp's --kl-divergence-base and --kl-divergence). The file records\n"
                   "the vocabulary size, --ctx, the chunks and the text's tokens, which must\n"
                   "match (see docs/kv-cache.md).\n");
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const char *a = argv[i];
        const tsr_cli_text_opt texts[] = {{"-f", "--file", "TEXT", &text_path},
                                          {"--kl-base", NULL, "FILE", &kl_path}};
        /* Half of each chunk is scored, less its last position: 4 tokens score one. */
        const tsr_cli_int_opt ints[] = {{"--ctx", NULL, "TOKENS", 4, 1 << 20, &ctx},
                                        {"--chunks", NULL, "K", 1, INT32_MAX, &max_chunks},
                                        {"--ubatch", NULL, "TOKENS", 1, 1 << 20, &ubatch},
                                        {"--prefill", NULL, "TOKENS", 1, 1 << 20, &prefill}};
        int took = tsr_session_take_opt("perplexity", argc, argv, &i, &o);
        if (took == 0) took = tsr_cli_take_text("perplexity", argc, argv, &i, texts, 2);
        if (took == 0) took = tsr_cli_take_int("perplexity", argc, argv, &i, ints, 4);
        if (took == 0) took = tsr_cli_take_flag(a, "--json", NULL, &json);
        if (took == 0) took = tsr_cli_take_flag(a, "--kl", "--kl-divergence", &kl);
        if (took == 0) took = (tsr_cli_bad_arg("perplexity", a), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    const char *usage_error = !text_path ? "-f TEXT is required"
                              : kl && !kl_path ? "--kl needs --kl-base FILE (the baseline)"
                                               : NULL;
    if (usage_error) {
        tsr_cli_error("perplexity: %s (see tessera perplexity --help)", usage_error);
        free(o.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_feed feed = {.ctx = ctx, .ubatch = ubatch > 0 ? ubatch : ctx};
    feed.prefill = prefill > 0 ? prefill : feed.ubatch;
    tsr_error err;
    session s = {0};
    char *text = NULL;
    int32_t *ids = NULL;
    tsr_batch_entry *batch = NULL;
    float *logits = NULL, *base_lp = NULL, *scratch = NULL;
    size_t len = 0, n_ids = 0;
    kl_file klf = {.path = kl_path, .reading = kl};
    tsr_cli_progress progress = {0};
    int status = TSR_EXIT_FAIL;
    if (!(text = tsr_session_read_file(text_path, &len, &err))) goto fail;
    if (tsr_session_open(&s, &o, &err) < 0) goto fail;
    if (tsr_tokenize(s.tok, text, len, true, false, &ids, &n_ids, &err) < 0) goto fail;
    int64_t n_chunks = tsr_session_chunk_count(n_ids, ctx, max_chunks);
    if (n_chunks < 1) {
        tsr_error_set(&err, TSR_E_INVALID, "%s: %zu tokens, fewer than one chunk of --ctx %lld",
                      text_path, n_ids, (long long)ctx);
        goto fail;
    }
    if (tsr_session_pipeline(&s, ctx, &err) < 0) goto fail;
    const int32_t nv = s.model->hp.n_vocab, bos = tsr_tokenizer_bos(s.tok);
    const int32_t first_bos = tsr_tokenizer_add_bos(s.tok) && bos >= 0 ? bos : -1;
    const int64_t first = tsr_feed_first_scored(&feed), rows = ctx - 1 - first;
    batch = calloc((size_t)ctx, sizeof *batch);
    logits = malloc((size_t)(ctx - first) * (size_t)nv * sizeof *logits);
    base_lp = malloc((size_t)(rows > 0 ? rows : 1) * (size_t)nv * sizeof *base_lp);
    scratch = malloc((size_t)nv * sizeof *scratch);
    if (!batch || !logits || !base_lp || !scratch) {
        tsr_error_set(&err, TSR_E_NOMEM, "perplexity: out of memory for chunks of %lld tokens",
                      (long long)ctx);
        goto fail;
    }
    if (kl_path) {
        kl_header h = {.magic = KL_MAGIC, .n_vocab = (uint32_t)nv, .ctx = (uint32_t)ctx,
                       .chunks = (uint32_t)n_chunks, .text_tokens = n_ids};
        if ((kl ? kl_open_read(&klf, &h, ids, &err)
                : kl_open_write(&klf, text_path, &h, ids, &err)) < 0)
            goto fail;
    }
    tsr_score_sum sum = {0};
    const size_t chunk_lp = (size_t)rows * (size_t)nv;
    tsr_cli_progress_start(&progress, "perplexity", 0);
    for (int64_t c = 0; c < n_chunks; c++) {
        const int32_t *chunk = ids + c * ctx;
        if (tsr_score_chunk(s.pl, chunk, first_bos, &feed, nv, batch, logits, NULL, &err) < 0)
            goto fail;
        if (kl && fread(base_lp, sizeof *base_lp, chunk_lp, klf.in) != chunk_lp) {
            kl_short(&klf, &err);
            goto fail;
        }
        for (int64_t j = first; j < ctx - 1; j++) {
            const float *row = logits + (size_t)(j - first) * (size_t)nv;
            /* NaN or infinite logits give no perplexity at all, not "nan". */
            if (!tsr_score_add(&sum, row, kl ? base_lp + (size_t)(j - first) * (size_t)nv : NULL,
                               nv, chunk[j + 1], scratch)) {
                tsr_error_set(&err, TSR_E_INVALID, "perplexity: chunk %lld, position %lld: the "
                              "log-likelihood is not finite; the model's logits are not finite "
                              "numbers", (long long)c + 1, (long long)j);
                goto fail;
            }
            if (kl_path && !kl) {
                tsr_log_softmax(row, nv, scratch);
                tsr_outfile_write(&klf.out, scratch, (size_t)nv * sizeof *scratch);
            }
        }
        char ppl_so_far[48];
        snprintf(ppl_so_far, sizeof ppl_so_far, "ppl %.4f", exp(sum.nll / (double)sum.count));
        tsr_cli_progress_show(&progress, c + 1, n_chunks, "chunks", ppl_so_far);
    }
    /* As llama.cpp: the standard error of the mean NLL, carried to the perplexity. */
    double mean, se, kl_mean, kl_se;
    tsr_score_mean(sum.nll, sum.nll2, sum.count, &mean, &se);
    tsr_score_mean(sum.kl, sum.kl2, sum.kl_count, &kl_mean, &kl_se);
    double ppl = exp(mean);
    if (!isfinite(ppl)) {
        tsr_error_set(&err, TSR_E_RANGE, "perplexity: exp(%g), the perplexity, overflows a "
                      "double", mean);
        goto fail;
    }
    if (kl_path && !kl && tsr_outfile_commit(&klf.out, &err) < 0) goto fail;
    double top1 = sum.kl_count > 0 ? (double)sum.same_top / (double)sum.kl_count : 0;
    char feeding[96];
    tsr_feed_describe(&feed, feeding, sizeof feeding);
    if (json) {
        double bits, rmse;
        tsr_pipeline_weight_quality(s.pl, &bits, &rmse);
        json_t *root = json_pack("{s:s, s:s, s:i, s:i, s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:s, "
                                 "s:I, s:I}",
                                 "model", o.model ? o.model : s.cfg->model_path, "text",
                                 text_path, "ctx", (int)ctx, "chunks", (int)n_chunks,
                                 "scored_tokens", (json_int_t)sum.count, "mean_nll", mean,
                                 "mean_nll_stderr", se, "ppl", ppl, "ppl_stderr", ppl * se,
                                 "bits_per_weight", bits, "mean_rel_rmse", rmse, "feeding",
                                 feeding, "prefill", (json_int_t)(feed.prefill < ctx ? feed.prefill : ctx),
                                 "ubatch", (json_int_t)(feed.ubatch < ctx ? feed.ubatch : ctx));
        if (kl)
            json_object_update_new(root, json_pack("{s:s, s:f, s:f, s:f}", "kl_base", kl_path,
                                                   "kl_mean", kl_mean, "kl_stderr", kl_se,
                                                   "top1_agreement", top1));
        char *out = json_dumps(root, JSON_INDENT(2));
        printf("%s\n", out);
        free(out);
        json_decref(root);
    } else {
        printf("PPL = %.4f +/- %.4f (%lld chunks of %lld tokens, %lld scored; %s)\n", ppl,
               ppl * se, (long long)n_chunks, (long long)ctx, (long long)sum.count, feeding);
        if (kl)
            printf("KL divergence from %s = %.6f +/- %.6f, same top token %.2f%%\n", kl_path,
                   kl_mean, kl_se, 100.0 * top1);
    }
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_progress_end(&progress);
    tsr_cli_error("%s", err.msg);
done:
    kl_close(&klf);
    free(text);
    free(ids);
    free(batch);
    free(logits);
    free(base_lp);
    free(scratch);
    tsr_session_close(&s);
    free(o.sets);
    return status;
}
