/* `tessera experts`: how often each expert of each layer is chosen over a text, and with what
 * weight: the calibration input of mixed-precision experts (MC-MoE), expert pruning (HEAPr)
 * and expert analysis, and of `tessera quantize --expert-types`. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli/cli_session.h"

typedef struct experts_opts {
    const char *text_path;
    int64_t ctx, max_chunks;
    bool json;
} experts_opts;

static void experts_usage(void) {
    printf("usage: tessera experts -m MODEL [CONFIG.yaml] -f TEXT [--ctx 512] [--chunks K]\n"
           "                       [--json] [-t T] [--set K=V]... [--plugin-dir DIR]...\n"
           "Runs the model over TEXT (cut into chunks of --ctx tokens, each from an empty\n"
           "cache and starting with BOS; --chunks K runs the first K) and records what the\n"
           "routers chose at every layer with experts. Prints, per layer and expert, how many\n"
           "tokens chose it (count), that count over the tokens routed (frequency: the\n"
           "frequencies of a layer sum to the experts per token, k) and its mean routing\n"
           "weight over those tokens, one line each:\n"
           "  LAYER EXPERT COUNT FREQUENCY MEAN_WEIGHT\n"
           "after '#' comment lines; --json prints the same as a JSON object instead. The\n"
           "routers are the pipeline's (the model's own top-k by default; --set\n"
           "router.plugin=dynamic profiles that one). The JSON is what tessera quantize\n"
           "--expert-types reads (docs/plugins/router.md).\n");
}

static void experts_write(FILE *f, const char *model, const experts_opts *o, int64_t n_chunks,
                          const tsr_hparams *hp, const tsr_route_record *rec) {
    fprintf(f, "# tessera experts: model %s, text %s (%lld chunks of %lld tokens); %d experts, "
            "%d per token\n# layer expert count frequency mean_weight\n",
            model, o->text_path, (long long)n_chunks, (long long)o->ctx, (int)hp->n_expert,
            (int)hp->n_expert_used);
    for (int32_t l = 0; l < hp->n_layer; l++)
        for (int32_t e = 0; rec->tokens[l] && e < hp->n_expert; e++) {
            size_t i = (size_t)l * (size_t)hp->n_expert + (size_t)e;
            uint64_t n = rec->slots[i];
            fprintf(f, "%d %d %llu %.6f %.6f\n", (int)l, (int)e, (unsigned long long)n,
                    (double)n / (double)rec->tokens[l], n ? rec->weight_sum[i] / (double)n : 0.0);
        }
}

static json_t *experts_json(const char *model, const experts_opts *o, int64_t n_chunks,
                            const tsr_hparams *hp, const tsr_route_record *rec) {
    json_t *layers = json_array();
    for (int32_t l = 0; l < hp->n_layer; l++) {
        if (!rec->tokens[l]) continue;
        json_t *experts = json_array();
        for (int32_t e = 0; e < hp->n_expert; e++) {
            size_t i = (size_t)l * (size_t)hp->n_expert + (size_t)e;
            uint64_t n = rec->slots[i];
            json_array_append_new(
                experts, json_pack("{s:i, s:I, s:f, s:f}", "expert", (int)e, "count",
                                   (json_int_t)n, "frequency",
                                   (double)n / (double)rec->tokens[l], "mean_weight",
                                   n ? rec->weight_sum[i] / (double)n : 0.0));
        }
        json_array_append_new(layers, json_pack("{s:i, s:I, s:o}", "layer", (int)l, "tokens",
                                                (json_int_t)rec->tokens[l], "experts", experts));
    }
    return json_pack("{s:s, s:s, s:I, s:I, s:i, s:i, s:o}", "model", model, "text",
                     o->text_path, "ctx", (json_int_t)o->ctx, "chunks", (json_int_t)n_chunks,
                     "n_expert", (int)hp->n_expert, "n_expert_used", (int)hp->n_expert_used,
                     "layers", layers);
}

int tsr_cli_experts(int argc, char **argv) {
    model_opts mo = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    experts_opts o = {.ctx = 512, .max_chunks = -1};
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            experts_usage();
            free(mo.sets);
            return TSR_EXIT_OK;
        }
        const tsr_cli_text_opt texts[] = {{"-f", "--file", "TEXT", &o.text_path}};
        const tsr_cli_int_opt ints[] = {{"--ctx", NULL, "TOKENS", 1, 1 << 20, &o.ctx},
                                        {"--chunks", NULL, "K", 1, INT32_MAX, &o.max_chunks}};
        int took = tsr_session_take_opt("experts", argc, argv, &i, &mo);
        if (took == 0) took = tsr_cli_take_text("experts", argc, argv, &i, texts, 1);
        if (took == 0) took = tsr_cli_take_int("experts", argc, argv, &i, ints, 2);
        if (took == 0) took = tsr_cli_take_flag(argv[i], "--json", NULL, &o.json);
        if (took == 0) took = (tsr_cli_bad_arg("experts", argv[i]), -1);
        if (took < 0) {
            free(mo.sets);
            return TSR_EXIT_USAGE;
        }
    }
    if (!o.text_path) {
        tsr_cli_error("experts: -f TEXT is required (see tessera experts --help)");
        free(mo.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    session s = {0};
    char *text = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n_ids = 0;
    tsr_route_record rec = {0};
    int status = TSR_EXIT_FAIL;
    if (!(text = tsr_session_read_file(o.text_path, &len, &err))) goto fail;
    if (tsr_session_open(&s, &mo, &err) < 0) goto fail;
    const char *model = mo.model ? mo.model : s.cfg->model_path;
    const tsr_hparams *hp = &s.model->hp;
    if (hp->n_expert == 0) {
        tsr_error_set(&err, TSR_E_INVALID, "%s: the model has no mixture-of-experts layers: "
                      "there is no routing to record", model);
        goto fail;
    }
    if (tsr_tokenize(s.tok, text, len, true, false, &ids, &n_ids, &err) < 0) goto fail;
    if (n_ids == 0) {
        tsr_error_set(&err, TSR_E_INVALID, "%s: no tokens to run", o.text_path);
        goto fail;
    }
    if ((int64_t)n_ids < o.ctx) o.ctx = (int64_t)n_ids;
    int64_t n_chunks = tsr_session_chunk_count(n_ids, o.ctx, o.max_chunks);
    const size_t cells = (size_t)hp->n_layer * (size_t)hp->n_expert;
    rec.slots = calloc(cells, sizeof *rec.slots);
    rec.weight_sum = calloc(cells, sizeof *rec.weight_sum);
    rec.tokens = calloc((size_t)hp->n_layer, sizeof *rec.tokens);
    if (!rec.slots || !rec.weight_sum || !rec.tokens) {
        tsr_error_set(&err, TSR_E_NOMEM, "experts: out of memory");
        goto fail;
    }
    if (tsr_session_pipeline(&s, o.ctx, &err) < 0) goto fail;
    tsr_pipeline_record_routes(s.pl, &rec);
    tsr_status st = tsr_session_run_chunks(&s, ids, o.ctx, n_chunks, "experts", &err);
    tsr_pipeline_record_routes(s.pl, NULL);
    if (st < 0) goto fail;
    if (o.json) {
        json_t *root = experts_json(model, &o, n_chunks, hp, &rec);
        char *dump = root ? json_dumps(root, JSON_INDENT(2)) : NULL;
        json_decref(root);
        if (!dump) {
            tsr_error_set(&err, TSR_E_NOMEM, "experts --json: out of memory");
            goto fail;
        }
        printf("%s\n", dump);
        free(dump);
    } else {
        experts_write(stdout, model, &o, n_chunks, hp, &rec);
    }
    status = tsr_cli_stdout_ok() ? TSR_EXIT_OK : TSR_EXIT_FAIL;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    free(rec.slots);
    free(rec.weight_sum);
    free(rec.tokens);
    free(text);
    free(ids);
    tsr_session_close(&s);
    free(mo.sets);
    return status;
}
