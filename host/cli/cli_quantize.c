/* `tessera quantize` and `tessera synth`: GGUF files written through the quantizer stage.
 *
 * Both offer every weight matrix to the quantizer configured for its layer (the default
 * pipeline's, unless a config says otherwise), with the quantizer's parameter of role
 * WEIGHT_TYPE set to the TYPE asked for, and write what it returns. A quantizer that makes a format of its own
 * (a plugin dtype) cannot be written to GGUF, and says so. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/number.h"
#include "base/outfile.h"
#include "cli/cli_session.h"
#include "files/dtype.h"
#include "files/gguf_write.h"
#include "model/weights.h"
#include "plugin/instances.h"

/* llama.cpp's file types (general.file_type), by the TYPE names `tessera quantize` accepts. */
static const struct {
    const char *name;
    int32_t file_type;
} file_types[] = {
    {"f32", 0},     {"f16", 1},     {"q4_0", 2},    {"q4_1", 3},     {"q8_0", 7},
    {"q5_0", 8},    {"q5_1", 9},    {"q2_k", 10},   {"q3_k_m", 12},  {"q4_k_s", 14},
    {"q4_k_m", 15}, {"q5_k_s", 16}, {"q5_k_m", 17}, {"q6_k", 18},    {"iq4_nl", 25},
    {"iq4_xs", 30}, {"bf16", 32},
};

typedef struct prepared {
    tsr_weight w; /* not prepared for tensors copied as they are, nor for stacked experts */
    void *owned;  /* bytes to free after writing (synthetic source data, experts stacked
                     again), or NULL */
} prepared;

/* The quantizer instances of one weight type (--expert-types), made from a config of their
 * own with that type. */
typedef struct typed_quantizer {
    const char *type;
    tsr_config *cfg;
    tsr_instance *main;
    tsr_instance **at; /* (n_layer) */
} typed_quantizer;

/* A GGUF being written through the quantizer stage. */
typedef struct quant_job {
    session s; /* config, plugins and pool; no model or pipeline */
    tsr_instance_set set;
    tsr_instance *main;
    tsr_instance **at; /* (n_layer) */
    int32_t n_layer;
    tsr_gguf_writer *w;
    prepared *done;
    size_t n_done;
    tsr_outfile out;      /* opened before the work, so a bad OUT is refused at once */
    tsr_cli_progress progress;
    int64_t n_tensors;    /* that the file will hold, for the progress line */
    bool tied;            /* no output.weight: token_embd is the output matrix too */
    double bits, weights; /* for the average bits per weight */
    json_t *report;       /* one object per tensor */
    /* --expert-types: each expert's type, (n_layer, n_expert), NULL for TYPE; and for each
     * other type named, the quantizer instances made with it */
    const char **expert_type;
    int32_t n_expert;
    typed_quantizer *typed;
    size_t n_typed;
    char *profile; /* the profile's text, which expert_type points into */
} quant_job;

/* TYPE against the choices of the quantizer's weight-type parameter. */
static tsr_status check_type(const tsr_plugin_desc *desc, const tsr_param_def *def,
                             const char *type, const char *where, tsr_error *err) {
    if (!def->choices) return TSR_OK;
    char list[768] = "";
    for (size_t i = 0; def->choices[i]; i++) {
        if (!strcmp(def->choices[i], type)) return TSR_OK;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                 def->choices[i]);
    }
    return tsr_error_set(err, TSR_E_INVALID, "%s '%s': quantizer '%s' expects one of %s", where,
                         type, desc->name, list);
}

/* The config (or the default pipeline) with the --set overrides. */
static tsr_status load_config(const model_opts *o, tsr_config **cfg, tsr_error *err) {
    tsr_status st = o->config ? tsr_config_load(o->config, cfg, err) : tsr_config_default(cfg, err);
    for (size_t i = 0; st >= 0 && i < o->n_sets; i++) st = tsr_config_set(*cfg, o->sets[i], err);
    return st;
}

/* Binds `cfg`'s plugins with TYPE going to the quantizer's parameter of role WEIGHT_TYPE; a
 * quantizer without such a parameter makes its own format (its first weight then says whether
 * a GGUF file can hold it), unless `required`. */
static tsr_status bind_type(tsr_registry *reg, tsr_config *cfg, const char *type,
                            const char *where, bool required, tsr_error *err) {
    tsr_status st = tsr_cli_bind(cfg, reg, err);
    if (st < 0) return st;
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_QUANTIZER,
                                                  cfg->stage[TSR_STAGE_QUANTIZER].plugin);
    int32_t at = ref ? tsr_param_find_role(ref->desc->params, ref->desc->n_params,
                                           TSR_PARAM_ROLE_WEIGHT_TYPE)
                     : -1;
    if (at < 0)
        return required ? tsr_error_set(err, TSR_E_UNSUPPORTED, "quantize: quantizer '%s' has "
                                        "no weight type to set per expert (--expert-types)",
                                        cfg->stage[TSR_STAGE_QUANTIZER].plugin)
                        : TSR_OK;
    if ((st = check_type(ref->desc, &ref->desc->params[at], type, where, err)) < 0 ||
        (st = tsr_config_set_role(cfg, TSR_STAGE_QUANTIZER, TSR_PARAM_ROLE_WEIGHT_TYPE, type,
                                  "TYPE", err)) < 0)
        return st;
    return tsr_cli_bind(cfg, reg, err);
}

/* The quantizer instances of `cfg`, main and per layer, for n_layer layers. */
static tsr_status job_quantizers(quant_job *j, const tsr_config *cfg, tsr_instance **main,
                                 tsr_instance **at, tsr_error *err) {
    tsr_model_shape shape = tsr_model_shape_synthetic();
    shape.n_layer = j->n_layer;
    shape.backend_name = cfg->stage[TSR_STAGE_BACKEND].plugin;
    return tsr_instance_set_per_layer(&j->set, cfg, TSR_STAGE_QUANTIZER, &shape, main, at, err);
}

/* Opens OUT (refusing a folder or the input file), the config and the quantizer instances. */
static tsr_status job_open(quant_job *j, const model_opts *o, const char *type, int32_t n_layer,
                           const char *out_path, const char *input, tsr_error *err) {
    memset(j, 0, sizeof *j);
    session *s = &j->s;
    tsr_status st = tsr_outfile_open(&j->out, out_path, input, err);
    if (st < 0 || (st = load_config(o, &s->cfg, err)) < 0) return st;
    s->reg = tsr_cli_registry(NULL, &o->plugin_dirs, s->cfg);
    if ((st = bind_type(s->reg, s->cfg, type, "quantize: TYPE", false, err)) < 0) return st;
    s->pool = tsr_pool_create(o->threads > 0 ? o->threads : tsr_config_threads(s->cfg));
    j->set = (tsr_instance_set){.reg = s->reg, .pool = s->pool};
    j->n_layer = n_layer;
    j->at = calloc((size_t)(n_layer > 0 ? n_layer : 1), sizeof *j->at);
    if ((st = job_quantizers(j, s->cfg, &j->main, j->at, err)) < 0) return st;
    j->w = tsr_gguf_writer_new();
    j->report = json_array();
    tsr_cli_progress_start(&j->progress, input ? "quantize" : "synth", 0);
    return TSR_OK;
}

static void job_close(quant_job *j) {
    tsr_outfile_discard(&j->out);
    for (size_t i = 0; i < j->n_done; i++) {
        tsr_weight_release(&j->done[i].w);
        free(j->done[i].owned);
    }
    free(j->done);
    tsr_gguf_writer_free(j->w);
    json_decref(j->report);
    tsr_instance_set_free(&j->set);
    free(j->at);
    for (size_t i = 0; i < j->n_typed; i++) {
        tsr_config_free(j->typed[i].cfg);
        free(j->typed[i].at);
    }
    free(j->typed);
    free(j->expert_type);
    free(j->profile);
    tsr_session_close(&j->s);
}

/* blk.N.<role>.weight -> N and role; other names -> -1 and the name without ".weight". */
static int32_t layer_of(const char *name, char *role, size_t cap) {
    int32_t layer = -1;
    int used = 0;
    if (sscanf(name, "blk.%d.%n", &layer, &used) != 1 || used == 0) {
        layer = -1;
        used = 0;
    }
    snprintf(role, cap, "%s", name + used);
    char *dot = strstr(role, ".weight");
    if (dot) *dot = '\0';
    return layer;
}

/* Matrices go through the quantizer; norms, biases and the MoE router stay as they are, as
 * llama.cpp keeps them. */
static bool is_quantized(const char *name, uint32_t n_dims) {
    size_t len = strlen(name);
    return n_dims >= 2 && len > 7 && !strcmp(name + len - 7, ".weight") &&
           !strstr(name, "ffn_gate_inp");
}

/* A GGUF file holds GGUF types only. */
static tsr_status check_writable(const tsr_instance *q, const char *name, int32_t dtype,
                                 tsr_error *err) {
    if (dtype < TSR_DTYPE_PLUGIN_FIRST && tsr_dtype_known(dtype)) return TSR_OK;
    return tsr_error_set(err, TSR_E_UNSUPPORTED,
                         "quantizer '%s' stores %s in a format of its own (type %d), which a GGUF "
                         "file cannot hold; it quantizes at load time instead (use it in a "
                         "pipeline's quantizer: section)", q->ref->desc->name, name, dtype);
}

/* Writes the prepared tensor `name` (type `to`, made from `from`) and reports it: `bits` and
 * `rmse` the quantizer's figures, `n` its number of weights. */
static tsr_status job_add(quant_job *j, const char *name, int32_t from, int32_t to,
                          uint32_t n_dims, const int64_t *ne, const void *data, double bits,
                          double rmse, double n, tsr_error *err) {
    if (tsr_gguf_writer_add_tensor(j->w, name, to, n_dims, ne, data) < 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: cannot add the tensor", name);
    j->bits += bits * n;
    j->weights += n;
    json_array_append_new(j->report, json_pack("{s:s, s:s, s:s, s:f, s:f}", "tensor", name, "from",
                                               tsr_dtype_name(from), "to", tsr_dtype_name(to),
                                               "bits_per_weight", bits, "rel_rmse", rmse));
    tsr_log(TSR_LOG_INFO, "quantize", "%s: %s -> %s, %.3f bits per weight, relative RMSE %.3g",
            name, tsr_dtype_name(from), tsr_dtype_name(to), bits, rmse);
    tsr_cli_progress_show(&j->progress, (int64_t)j->n_done, j->n_tensors, "tensors", NULL);
    return TSR_OK;
}

/* A stack of experts (ne {n_in, n_out, n_expert}): each expert offered to the quantizer on
 * its own, as a pipeline offers them, and the results stacked again, in place while the
 * quantizer keeps the file's bytes, else into one buffer, which then holds one type. */
/* The quantizer of expert e of `layer`: the one of its --expert-types type, else `q`. */
static tsr_instance *expert_quantizer(const quant_job *j, tsr_instance *q, int32_t layer,
                                      int32_t e) {
    if (!j->expert_type || layer < 0 || layer >= j->n_layer || e >= j->n_expert) return q;
    const char *type = j->expert_type[(size_t)layer * (size_t)j->n_expert + (size_t)e];
    for (size_t i = 0; type && i < j->n_typed; i++)
        if (!strcmp(j->typed[i].type, type)) return j->typed[i].at[layer];
    return q;
}

/* A stack of experts whose types differ (--expert-types): each expert written apart as
 * blk.L.<role>.E.weight, a 2-D tensor of its own type, which the loader takes in place of the
 * stack. */
static tsr_status job_experts_apart(quant_job *j, tsr_instance *q, const tsr_tensor *src,
                                    int32_t layer, const char *role, void *owned,
                                    tsr_error *err) {
    const int32_t n_expert = (int32_t)src->ne[2];
    prepared *grown = realloc(j->done, (j->n_done + (size_t)n_expert) * sizeof *j->done);
    if (!grown) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", src->name);
    j->done = grown;
    j->n_tensors += n_expert - 1;
    tsr_status st = TSR_OK;
    for (int32_t e = 0; e < n_expert && st >= 0; e++) {
        tsr_instance *qe = expert_quantizer(j, q, layer, e);
        tsr_tensor m = tsr_expert_matrix(src, e);
        prepared *slot = &j->done[j->n_done++];
        /* the source is freed with the last expert, once every expert was made from it */
        *slot = (prepared){.owned = e == n_expert - 1 ? owned : NULL};
        tsr_weight_out out;
        if ((st = tsr_weight_prepare(qe, &m, layer, role, e, &slot->w, &out, err)) < 0 ||
            (st = check_writable(qe, src->name, out.dst.dtype, err)) < 0)
            break;
        char name[192];
        snprintf(name, sizeof name, "blk.%d.%s.%d.weight", (int)layer, role, (int)e);
        st = job_add(j, name, src->dtype, out.dst.dtype, 2, src->ne, out.dst.data,
                     out.bits_per_weight, out.rel_rmse, (double)src->ne[0] * (double)src->ne[1],
                     err);
    }
    return st;
}

static tsr_status job_experts(quant_job *j, tsr_instance *q, const tsr_tensor *src,
                              int32_t layer, const char *role, void *owned, tsr_error *err) {
    for (int32_t e = 1; e < (int32_t)src->ne[2]; e++)
        if (expert_quantizer(j, q, layer, e) != expert_quantizer(j, q, layer, 0))
            return job_experts_apart(j, q, src, layer, role, owned, err);
    q = expert_quantizer(j, q, layer, 0);
    prepared *slot = &j->done[j->n_done++];
    *slot = (prepared){.owned = owned};
    const int32_t n_expert = (int32_t)src->ne[2];
    char *stacked = NULL;
    size_t bytes = 0; /* of one expert as prepared */
    int32_t type = -1;
    double bits = 0, rmse = 0;
    tsr_status st = TSR_OK;
    for (int32_t e = 0; e < n_expert && st >= 0; e++) {
        tsr_tensor m = tsr_expert_matrix(src, e);
        tsr_weight w;
        tsr_weight_out out;
        if ((st = tsr_weight_prepare(q, &m, layer, role, e, &w, &out, err)) < 0) break;
        if (e == 0) {
            type = out.dst.dtype;
            bytes = out.dst.row_bytes * (size_t)out.dst.ne[1];
        }
        if ((st = check_writable(q, src->name, out.dst.dtype, err)) >= 0 && out.dst.dtype != type)
            st = tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: quantizer '%s' made expert %d %s "
                               "and expert 0 %s; a stack of experts holds one type", src->name,
                               q->ref->desc->name, e, tsr_dtype_name(out.dst.dtype),
                               tsr_dtype_name(type));
        if (st >= 0 && out.dst.data != m.data && !stacked) {
            /* the first expert not kept in place: those before it were, as the file's bytes */
            if (!(stacked = malloc(bytes * (size_t)n_expert)))
                st = tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", src->name);
            else
                memcpy(stacked, src->data, bytes * (size_t)e);
        }
        if (st >= 0 && stacked) memcpy(stacked + bytes * (size_t)e, out.dst.data, bytes);
        bits += out.bits_per_weight;
        rmse += out.rel_rmse;
        tsr_weight_release(&w);
    }
    if (st < 0) {
        free(stacked);
        return st;
    }
    if (stacked) {
        /* a converted copy no longer needs its source */
        free(owned);
        slot->owned = stacked;
    }
    double n = (double)src->ne[0] * (double)src->ne[1] * (double)n_expert;
    return job_add(j, src->name, src->dtype, type, 3, src->ne, stacked ? stacked : src->data,
                   bits / n_expert, rmse / n_expert, n, err);
}

/* Adds one tensor; `owned` (malloc'd, or NULL when borrowed) is kept until written. */
static tsr_status job_tensor(quant_job *j, const char *name, int32_t dtype, uint32_t n_dims,
                             const int64_t *ne, void *data, void *owned, tsr_error *err) {
    prepared *grown = realloc(j->done, (j->n_done + 1) * sizeof *j->done);
    if (!grown) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    j->done = grown;
    if (!is_quantized(name, n_dims)) {
        if (tsr_gguf_writer_add_tensor(j->w, name, dtype, n_dims, ne, data) < 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s: cannot add the tensor", name);
        j->done[j->n_done++] = (prepared){.owned = owned};
        tsr_cli_progress_show(&j->progress, (int64_t)j->n_done, j->n_tensors, "tensors", NULL);
        return TSR_OK;
    }
    char role[128];
    int32_t layer = layer_of(name, role, sizeof role);
    /* llama.cpp quantizes a shared embedding as the output matrix it also is. */
    if (j->tied && !strcmp(role, "token_embd")) snprintf(role, sizeof role, "output");
    tsr_instance *q = layer >= 0 && layer < j->n_layer ? j->at[layer] : j->main;
    /* An expert held apart (blk.L.<stack>.E.weight) is its stack's role, of its own type. */
    int32_t expert = -1;
    char *dot = strrchr(role, '.');
    int used = 0;
    if (layer >= 0 && dot && sscanf(dot + 1, "%d%n", &expert, &used) == 1 && !dot[1 + used]) {
        *dot = '\0';
        q = expert_quantizer(j, q, layer, expert);
    } else {
        expert = -1;
    }
    tsr_tensor src = {.struct_size = sizeof src, .dtype = dtype, .n_dims = n_dims,
                      .ne = {ne[0], n_dims > 1 ? ne[1] : 1, n_dims > 2 ? ne[2] : 1,
                             n_dims > 3 ? ne[3] : 1},
                      .row_bytes = tsr_dtype_row_bytes(dtype, ne[0]), .data = data, .name = name};
    if (n_dims == 3) return job_experts(j, q, &src, layer, role, owned, err);
    tsr_weight_out out;
    tsr_weight *w = &j->done[j->n_done].w;
    tsr_status st = tsr_weight_prepare(q, &src, layer, role, expert, w, &out, err);
    if (st < 0) return st;
    /* A converted copy no longer needs its source: a 7B model need not sit in memory twice. */
    if (owned && out.dst.data != data) {
        free(owned);
        owned = NULL;
    }
    j->done[j->n_done++].owned = owned;
    if ((st = check_writable(q, name, out.dst.dtype, err)) < 0) return st;
    double n = (double)src.ne[0] * (double)src.ne[1] * (double)src.ne[2] * (double)src.ne[3];
    return job_add(j, name, dtype, out.dst.dtype, n_dims, ne, out.dst.data, out.bits_per_weight,
                   out.rel_rmse, n, err);
}

/* llama.cpp's file type for TYPE, or -1 for a name it does not have. */
static int32_t file_type_of(const char *type) {
    for (size_t i = 0; i < sizeof file_types / sizeof file_types[0]; i++)
        if (!strcmp(file_types[i].name, type)) return file_types[i].file_type;
    return -1;
}

/* Copies `in`'s keys in order, then the quantization version and the file type at the end,
 * where llama-quantize puts them (it removes and appends them), so our files and its files
 * are byte-identical. */
static void copy_keys(quant_job *j, const tsr_gguf *in, const char *type) {
    for (int64_t k = 0; in && k < tsr_gguf_n_keys(in); k++) {
        const char *key = tsr_gguf_key_name(in, k);
        if (strcmp(key, "general.file_type") && strcmp(key, "general.quantization_version"))
            tsr_gguf_writer_copy_key(j->w, in, k);
    }
    int32_t ft = file_type_of(type);
    if (ft < 0) return;
    tsr_gguf_writer_set_uint(j->w, "general.quantization_version", TSR_GGUF_UINT32, 2);
    tsr_gguf_writer_set_uint(j->w, "general.file_type", TSR_GGUF_UINT32, (uint64_t)ft);
}

/* Writes and commits OUT, then the report: on stdout, unless OUT is stdout itself. */
static tsr_status job_write(quant_job *j, const char *path, bool json, tsr_error *err) {
    FILE *report = tsr_outfile_is_stdout(&j->out) ? stderr : stdout;
    tsr_status st = tsr_gguf_writer_write_to(j->w, &j->out, err);
    if (st >= 0) st = tsr_outfile_commit(&j->out, err);
    if (st < 0) return st;
    double bpw = j->weights > 0 ? j->bits / j->weights : 0;
    if (json) {
        json_t *root = json_pack("{s:s, s:f, s:f, s:O}", "output", path, "weights", j->weights,
                                 "bits_per_weight", bpw, "tensors", j->report);
        char *text = json_dumps(root, JSON_INDENT(2));
        fprintf(report, "%s\n", text);
        free(text);
        json_decref(root);
    } else {
        fprintf(report, "%s: %.0f weights quantized, %.3f bits per weight\n", path, j->weights,
                bpw);
    }
    return TSR_OK;
}

/* Fails a job: an open progress line is ended before the error. */
static int job_fail(quant_job *j, const tsr_error *err) {
    tsr_cli_progress_end(&j->progress);
    tsr_cli_error("%s", err->msg);
    return TSR_EXIT_FAIL;
}

/* The options quantize and synth share (--config, --set, --json); 1, 0 or -1 as
 * tsr_session_take_opt. */
static int take_job_opt(const char *cmd, int argc, char **argv, int *i, model_opts *o,
                        bool *json) {
    const char *set = NULL;
    const tsr_cli_text_opt texts[] = {{"--config", NULL, "CONFIG.yaml", &o->config},
                                      {"--set", NULL, "SECTION.KEY=VALUE", &set}};
    int took = tsr_cli_take_plugin_dir(cmd, argc, argv, i, &o->plugin_dirs);
    if (took == 0) took = tsr_cli_take_text(cmd, argc, argv, i, texts, 2);
    if (set) o->sets[o->n_sets++] = set;
    return took ? took : tsr_cli_take_flag(argv[*i], "--json", NULL, json);
}

/* ---- quantize -------------------------------------------------------------------------- */

/* llama-quantize writes tensors ordered by block number (tensors outside blocks first), then
 * by name; writing them the same way makes the files comparable byte for byte. */
static int cmp_tensor_order(const void *pa, const void *pb) {
    const tsr_gguf_tensor *a = *(const tsr_gguf_tensor *const *)pa;
    const tsr_gguf_tensor *b = *(const tsr_gguf_tensor *const *)pb;
    char role[128];
    int32_t la = layer_of(a->name, role, sizeof role), lb = layer_of(b->name, role, sizeof role);
    if (la != lb) return la < lb ? -1 : 1;
    return strcmp(a->name, b->name);
}

/* ---- --expert-types --------------------------------------------------------------------- */

/* Where each expert's type comes from. */
typedef struct expert_rule {
    const char *path;       /* --expert-types FILE */
    const char *hot, *cold; /* --expert-hot, --expert-cold (NULL: TYPE), for a JSON profile */
    double hot_fraction;    /* --hot-fraction */
} expert_rule;

/* Adds `type` (named first at `where`, for messages) to the types that need quantizers of
 * their own, unless it is TYPE or already there. */
static tsr_status add_typed(quant_job *j, const model_opts *o, const char *type,
                            const char *main_type, const char *where, tsr_error *err) {
    if (!type || !strcmp(type, main_type)) return TSR_OK;
    for (size_t i = 0; i < j->n_typed; i++)
        if (!strcmp(j->typed[i].type, type)) return TSR_OK;
    typed_quantizer *grown = realloc(j->typed, (j->n_typed + 1) * sizeof *j->typed);
    if (!grown) return tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    j->typed = grown;
    typed_quantizer *t = &j->typed[j->n_typed++];
    *t = (typed_quantizer){.type = type,
                           .at = calloc((size_t)(j->n_layer > 0 ? j->n_layer : 1), sizeof *t->at)};
    char what[512];
    snprintf(what, sizeof what, "%s: type", where);
    tsr_status st = t->at ? load_config(o, &t->cfg, err)
                          : tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    if (st >= 0) st = bind_type(j->s.reg, t->cfg, type, what, true, err);
    return st < 0 ? st : job_quantizers(j, t->cfg, &t->main, t->at, err);
}

/* A text profile: lines "LAYER EXPERT TYPE" ('#' starts a comment). */
static tsr_status read_type_lines(quant_job *j, const model_opts *o, const expert_rule *r,
                                  const char *main_type, tsr_error *err) {
    int32_t *first_line = calloc((size_t)j->n_layer * (size_t)j->n_expert, sizeof *first_line);
    if (!first_line) return tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    tsr_status st = TSR_OK;
    char *next = j->profile;
    for (int32_t line = 1; next && st >= 0; line++) {
        char *text = next, *end = strchr(text, '\n'), quoted[64], where[512];
        next = end ? end + 1 : NULL;
        if (end) *end = '\0';
        char *hash = strchr(text, '#');
        if (hash) *hash = '\0';
        tsr_text_excerpt(quoted, sizeof quoted, text + strspn(text, " \t"));
        char *field[4] = {NULL}, *save = NULL;
        int n = 0;
        for (char *f = strtok_r(text, " \t\r", &save); f; f = strtok_r(NULL, " \t\r", &save))
            if (n < 4) field[n++] = f;
        if (n == 0) continue;
        int64_t layer = 0, e = 0;
        snprintf(where, sizeof where, "%s:%d", r->path, (int)line);
        if (n != 3 || !tsr_text_to_int(field[0], &layer) || !tsr_text_to_int(field[1], &e)) {
            st = tsr_error_set(err, TSR_E_INVALID, "%s: expected 'LAYER EXPERT TYPE', got '%s'",
                               where, quoted);
        } else if (layer < 0 || layer >= j->n_layer) {
            st = tsr_error_set(err, TSR_E_RANGE, "%s: layer %lld: expected 0 to %d (the model's "
                               "layers)", where, (long long)layer, (int)j->n_layer - 1);
        } else if (e < 0 || e >= j->n_expert) {
            st = tsr_error_set(err, TSR_E_RANGE, "%s: expert %lld: expected 0 to %d (the "
                               "model's experts per layer)", where, (long long)e,
                               (int)j->n_expert - 1);
        } else {
            size_t at = (size_t)layer * (size_t)j->n_expert + (size_t)e;
            if (first_line[at])
                st = tsr_error_set(err, TSR_E_INVALID, "%s: layer %lld expert %lld is given a "
                                   "type twice (first on line %d)", where, (long long)layer,
                                   (long long)e, (int)first_line[at]);
            else {
                first_line[at] = line;
                j->expert_type[at] = field[2];
                st = add_typed(j, o, field[2], main_type, where, err);
            }
        }
    }
    free(first_line);
    return st;
}

/* Experts of one layer, by count: most chosen first, then by number. */
static int cmp_count(const void *pa, const void *pb, void *counts) {
    const int64_t *c = counts;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    if (c[a] != c[b]) return c[a] > c[b] ? -1 : 1;
    return (a > b) - (a < b);
}

/* A profile `tessera experts --json` wrote: per layer it names, the round(hot_fraction *
 * n_expert) most chosen experts get the hot type, the others the cold one (TYPE without
 * --expert-cold). */
static tsr_status read_type_profile(quant_job *j, const model_opts *o, const expert_rule *r,
                                    const char *main_type, tsr_error *err) {
    json_error_t jerr;
    json_t *root = json_loads(j->profile, 0, &jerr);
    if (!root)
        return tsr_error_set(err, TSR_E_INVALID, "%s:%d: not JSON: %s", r->path, jerr.line,
                             jerr.text);
    json_int_t n_expert = -1;
    json_t *layers = NULL;
    tsr_status st = TSR_OK;
    int64_t *counts = calloc((size_t)j->n_expert, sizeof *counts);
    int32_t *order = calloc((size_t)j->n_expert, sizeof *order);
    if (!counts || !order)
        st = tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    else if (!r->hot)
        st = tsr_error_set(err, TSR_E_INVALID, "%s: a profile of tessera experts: give "
                           "--expert-hot TYPE (and --expert-cold TYPE, --hot-fraction F) to "
                           "choose the experts' types from it", r->path);
    else if (json_unpack(root, "{s:I, s:o}", "n_expert", &n_expert, "layers", &layers) < 0 ||
             !json_is_array(layers))
        st = tsr_error_set(err, TSR_E_INVALID, "%s: expected the JSON of tessera experts "
                           "(\"n_expert\" and \"layers\")", r->path);
    else if (n_expert != j->n_expert)
        st = tsr_error_set(err, TSR_E_INVALID, "%s: a profile of %lld experts per layer; the "
                           "model has %d", r->path, (long long)n_expert, (int)j->n_expert);
    if (st >= 0 && (st = add_typed(j, o, r->hot, main_type, "--expert-hot", err)) >= 0)
        st = add_typed(j, o, r->cold, main_type, "--expert-cold", err);
    const int64_t n_hot = llround(r->hot_fraction * (double)j->n_expert);
    for (size_t i = 0; st >= 0 && i < json_array_size(layers); i++) {
        json_int_t layer = -1;
        json_t *experts = NULL;
        bool ok = json_unpack(json_array_get(layers, i), "{s:I, s:o}", "layer", &layer,
                              "experts", &experts) == 0 && layer >= 0 && layer < j->n_layer &&
                  json_is_array(experts) && json_array_size(experts) == (size_t)j->n_expert;
        for (int32_t e = 0; ok && e < j->n_expert; e++) {
            json_int_t id = -1, count = -1;
            ok = json_unpack(json_array_get(experts, (size_t)e), "{s:I, s:I}", "expert", &id,
                             "count", &count) == 0 && id == e && count >= 0;
            counts[e] = count;
            order[e] = e;
        }
        if (!ok) {
            st = tsr_error_set(err, TSR_E_INVALID, "%s: layers[%zu]: expected {\"layer\": 0 to "
                               "%d, \"experts\": [{\"expert\": 0, \"count\": N}, ... up to "
                               "expert %d]}", r->path, i, (int)j->n_layer - 1,
                               (int)j->n_expert - 1);
            break;
        }
        qsort_r(order, (size_t)j->n_expert, sizeof *order, cmp_count, counts);
        for (int64_t rank = 0; rank < j->n_expert; rank++)
            j->expert_type[(size_t)layer * (size_t)j->n_expert + (size_t)order[rank]] =
                rank < n_hot ? r->hot : r->cold;
    }
    free(counts);
    free(order);
    json_decref(root);
    return st;
}

/* Each expert's type from the profile, and quantizers for the types other than TYPE. */
static tsr_status read_expert_types(quant_job *j, const model_opts *o, const expert_rule *r,
                                    const char *main_type, int32_t n_expert, tsr_error *err) {
    if (n_expert <= 0)
        return tsr_error_set(err, TSR_E_INVALID, "quantize: --expert-types: the model has no "
                             "experts");
    j->n_expert = n_expert;
    j->expert_type = calloc((size_t)j->n_layer * (size_t)n_expert, sizeof *j->expert_type);
    if (!j->expert_type) return tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    size_t len;
    char *bytes = tsr_session_read_file(r->path, &len, err);
    if (!bytes) return TSR_E_IO;
    /* the lines are cut in place, and JSON text ends at a NUL */
    j->profile = malloc(len + 1);
    if (j->profile) {
        memcpy(j->profile, bytes, len);
        j->profile[len] = '\0';
    }
    free(bytes);
    if (!j->profile) return tsr_error_set(err, TSR_E_NOMEM, "quantize: out of memory");
    const char *first = j->profile + strspn(j->profile, " \t\r\n");
    if (*first == '{') return read_type_profile(j, o, r, main_type, err);
    if (r->hot || r->cold)
        return tsr_error_set(err, TSR_E_INVALID, "%s: --expert-hot and --expert-cold choose "
                             "types from a JSON profile of tessera experts; this file lists "
                             "each expert's type itself", r->path);
    return read_type_lines(j, o, r, main_type, err);
}

int tsr_cli_quantize(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    const char *pos[3] = {NULL, NULL, NULL};
    int n_pos = 0;
    int64_t threads = 0;
    bool json = false;
    expert_rule rule = {.hot_fraction = 0.25};
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera quantize IN.gguf OUT.gguf TYPE [--config CONFIG.yaml]\n"
                   "                        [--set K=V]... [-t THREADS] [--json]\n"
                   "                        [--expert-types FILE [--expert-hot TYPE]\n"
                   "                         [--expert-cold TYPE] [--hot-fraction 0.25]]\n"
                   "                        [--plugin-dir DIR]...\n"
                   "Writes OUT with every weight matrix of IN quantized by the configured\n"
                   "quantizer (default: gguf) with its weight type set to TYPE, per layer as the\n"
                   "config's layers: say. Norms and biases are copied. TYPE is one of the\n"
                   "quantizer's types (see `tessera plugins info gguf`). OUT is replaced only\n"
                   "once complete and may not be IN; progress goes to stderr.\n"
                   "--expert-types FILE gives experts types of their own (a mixture-of-experts\n"
                   "model): FILE is either lines 'LAYER EXPERT TYPE' ('#' comments; experts not\n"
                   "listed get TYPE), or the JSON of `tessera experts --json`, from which each\n"
                   "layer's round(--hot-fraction * n_expert) most chosen experts get\n"
                   "--expert-hot TYPE and the others --expert-cold TYPE (default TYPE). A layer\n"
                   "whose experts then differ in type holds each expert's matrices apart, as\n"
                   "tensors blk.L.ffn_{gate,up,down}_exps.E.weight, which tessera loads\n"
                   "(llama.cpp does not); other layers keep their stacks.\n");
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const tsr_cli_int_opt ints[] = {
            {"-t", "--threads", "THREADS", 1, TSR_CLI_THREADS_MAX, &threads}};
        const char *fraction = NULL;
        const tsr_cli_text_opt texts[] = {{"--expert-types", NULL, "FILE", &rule.path},
                                          {"--expert-hot", NULL, "TYPE", &rule.hot},
                                          {"--expert-cold", NULL, "TYPE", &rule.cold},
                                          {"--hot-fraction", NULL, "FRACTION", &fraction}};
        int took = take_job_opt("quantize", argc, argv, &i, &o, &json);
        if (took == 0) took = tsr_cli_take_int("quantize", argc, argv, &i, ints, 1);
        if (took == 0) took = tsr_cli_take_text("quantize", argc, argv, &i, texts, 4);
        if (took > 0 && fraction &&
            (!tsr_text_to_float(fraction, &rule.hot_fraction) || !(rule.hot_fraction >= 0.0) ||
             rule.hot_fraction > 1.0)) {
            char quoted[64];
            tsr_cli_error("quantize: --hot-fraction: expected a number in [0, 1], got '%s'",
                          tsr_text_excerpt(quoted, sizeof quoted, fraction));
            took = -1;
        }
        if (took == 0 && argv[i][0] != '-' && n_pos < 3) {
            pos[n_pos++] = argv[i];
            took = 1;
        }
        if (took == 0) took = (tsr_cli_bad_arg("quantize", argv[i]), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    o.threads = (int)threads;
    const char *usage = n_pos != 3 ? "expected IN OUT TYPE"
                        : !rule.path && (rule.hot || rule.cold)
                            ? "--expert-hot and --expert-cold need --expert-types FILE"
                            : NULL;
    if (usage) {
        tsr_cli_error("quantize: %s (see tessera quantize --help)", usage);
        free(o.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    tsr_gguf *in = NULL;
    const tsr_gguf_tensor **order = NULL;
    quant_job j;
    memset(&j, 0, sizeof j);
    int status = TSR_EXIT_FAIL;
    tsr_status st = tsr_model_file_open(pos[0], &in, NULL, &err);
    if (st < 0) goto fail;
    tsr_gguf_str arch;
    int32_t n_layer = 0, n_expert = 0;
    if (tsr_gguf_get_str(in, "general.architecture", &arch, NULL)) {
        char key[96];
        snprintf(key, sizeof key, "%.*s.block_count", (int)(arch.len < 64 ? arch.len : 64), arch.ptr);
        n_layer = (int32_t)tsr_gguf_u64_or(in, key, 0);
        snprintf(key, sizeof key, "%.*s.expert_count", (int)(arch.len < 64 ? arch.len : 64),
                 arch.ptr);
        n_expert = (int32_t)tsr_gguf_u64_or(in, key, 0);
    }
    if (job_open(&j, &o, pos[2], n_layer, pos[1], pos[0], &err) < 0) goto fail;
    if (rule.path && read_expert_types(&j, &o, &rule, pos[2], n_expert, &err) < 0) goto fail;
    j.tied = !tsr_gguf_find_tensor(in, "output.weight");
    copy_keys(&j, in, pos[2]);
    int64_t n_tensors = j.n_tensors = tsr_gguf_n_tensors(in);
    order = malloc((size_t)(n_tensors > 0 ? n_tensors : 1) * sizeof *order);
    for (int64_t t = 0; t < n_tensors; t++) order[t] = tsr_gguf_tensor_at(in, t);
    qsort(order, (size_t)n_tensors, sizeof *order, cmp_tensor_order);
    for (int64_t t = 0; t < n_tensors; t++) {
        const tsr_gguf_tensor *x = order[t];
        if (job_tensor(&j, x->name, x->dtype, x->n_dims ? x->n_dims : 1, x->ne, (void *)x->data,
                       NULL, &err) < 0)
            goto fail;
    }
    if (job_write(&j, pos[1], json, &err) < 0) goto fail;
    status = TSR_EXIT_OK;
    goto done;
fail:
    status = job_fail(&j, &err);
done:
    job_close(&j);
    free(order);
    tsr_gguf_close(in);
    free(o.sets);
    return status;
}

/* ---- synth ----------------------------------------------------------------------------- */

typedef struct synth_shape {
    const char *name, *arch;
    int32_t n_embd, n_layer, n_head, n_kv_head, n_ff, n_vocab, n_ctx;
    float rope_base, rms_eps;
    bool qkv_bias, tied;
    /* experts (none when n_expert is 0): how many, how many a token uses, the rows of each
     * one's gate and up matrices, and of the shared expert's (0: none) */
    int32_t n_expert, n_expert_used, n_ff_expert, n_ff_shared;
} synth_shape;

/* Shapes of real models (their published configurations), for benchmarks without weights;
 * tinyllama-draft is a small model on tinyllama's vocabulary (4 layers of 512, its head size),
 * the draft of speculative decoding measurements; the tiny ones are for tests. The experts'
 * sizes are written under the keys llama.cpp reads for the architecture: olmoe's
 * feed_forward_length is its experts' size, qwen2moe's expert_feed_forward_length and
 * expert_shared_feed_forward_length. */
static const synth_shape shapes[] = {
    {"tinyllama-1.1b", "llama", 2048, 22, 32, 4, 5632, 32000, 2048, 10000.0f, 1e-5f, false, false,
     0, 0, 0, 0},
    {"tinyllama-draft", "llama", 512, 4, 8, 4, 1408, 32000, 2048, 10000.0f, 1e-5f, false, false,
     0, 0, 0, 0},
    {"qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, 151936, 32768, 1000000.0f, 1e-6f, true, true,
     0, 0, 0, 0},
    {"llama-7b", "llama", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0f, 1e-5f, false, false,
     0, 0, 0, 0},
    {"olmoe-1b-7b", "olmoe", 2048, 16, 16, 16, 1024, 50304, 4096, 10000.0f, 1e-5f, false, false,
     64, 8, 1024, 0},
    {"qwen1.5-moe-a2.7b", "qwen2moe", 2048, 24, 16, 16, 5632, 151936, 8192, 1000000.0f, 1e-6f,
     true, false, 60, 4, 1408, 5632},
    {"tiny", "llama", 64, 2, 4, 2, 128, 320, 512, 10000.0f, 1e-5f, false, false, 0, 0, 0, 0},
    {"tiny-moe", "llama", 64, 2, 4, 2, 32, 320, 512, 10000.0f, 1e-5f, false, false, 4, 2, 32, 0},
    {"tiny-qwen2moe", "qwen2moe", 64, 2, 4, 2, 96, 320, 512, 10000.0f, 1e-5f, true, false, 4, 2,
     32, 48},
};

/* splitmix64: a tiny, well-mixed generator; each tensor gets its own stream from the seed and
 * its index, so the weights do not depend on the order tensors are made in. */
static uint64_t splitmix(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* n values: mean `mean`, normal with deviation `std` (Box-Muller), or constant when std is 0. */
static float *random_tensor(uint64_t seed, uint64_t index, size_t n, float mean, float std) {
    float *v = malloc(n * sizeof *v);
    if (!v) return NULL;
    uint64_t state = seed * 0x100000001b3ull + index;
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((double)(splitmix(&state) >> 11) + 0.5) * 0x1.0p-53;
        double u2 = (double)(splitmix(&state) >> 11) * 0x1.0p-53;
        double r = sqrt(-2.0 * log(u1));
        v[i] = mean + std * (float)(r * cos(2 * M_PI * u2));
        if (i + 1 < n) v[i + 1] = mean + std * (float)(r * sin(2 * M_PI * u2));
    }
    return v;
}

/* A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then distinct
 * "▁" + letters pieces. Real tokenization with it works (byte fallback covers any text). */
static void synth_vocab(tsr_gguf_writer *w, int32_t n_vocab) {
    tsr_gguf_str *tokens = calloc((size_t)n_vocab, sizeof *tokens);
    char *text = calloc((size_t)n_vocab, 16);
    float *scores = calloc((size_t)n_vocab, sizeof *scores);
    int32_t *types = calloc((size_t)n_vocab, sizeof *types);
    for (int32_t i = 0; i < n_vocab; i++) {
        char *t = text + (size_t)i * 16;
        if (i < 3) {
            snprintf(t, 16, "%s", i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>");
            types[i] = i == 0 ? 2 : 3;
        } else if (i < 259) {
            snprintf(t, 16, "<0x%02X>", i - 3);
            types[i] = 6;
        } else {
            /* U+2581 then the piece number in base 26 letters. */
            int k = snprintf(t, 16, "\xe2\x96\x81");
            for (int32_t v = i - 259; k < 15; v = v / 26 - 1) {
                t[k++] = (char)('a' + v % 26);
                if (v < 26) break;
            }
            t[k] = '\0';
            types[i] = 1;
            scores[i] = -(float)(i - 259);
        }
        tokens[i] = (tsr_gguf_str){t, strlen(t)};
    }
    tsr_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, (uint64_t)n_vocab);
    tsr_gguf_writer_set_arr(w, "tokenizer.ggml.scores", TSR_GGUF_FLOAT32, scores, (uint64_t)n_vocab);
    tsr_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", TSR_GGUF_INT32, types, (uint64_t)n_vocab);
    tsr_gguf_writer_set_uint(w, "tokenizer.ggml.bos_token_id", TSR_GGUF_UINT32, 1);
    tsr_gguf_writer_set_uint(w, "tokenizer.ggml.eos_token_id", TSR_GGUF_UINT32, 2);
    tsr_gguf_writer_set_uint(w, "tokenizer.ggml.unknown_token_id", TSR_GGUF_UINT32, 0);
    tsr_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true);
    free(tokens);
    free(text);
    free(scores);
    free(types);
}

static void synth_metadata(tsr_gguf_writer *w, const synth_shape *sh) {
    char key[128];
#define ARCH_KEY(suffix) (snprintf(key, sizeof key, "%s." suffix, sh->arch), key)
    tsr_gguf_writer_set_str(w, "general.architecture", sh->arch);
    snprintf(key, sizeof key, "synthetic %s", sh->name);
    tsr_gguf_writer_set_str(w, "general.name", key);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("context_length"), TSR_GGUF_UINT32, (uint64_t)sh->n_ctx);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("embedding_length"), TSR_GGUF_UINT32, (uint64_t)sh->n_embd);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("block_count"), TSR_GGUF_UINT32, (uint64_t)sh->n_layer);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("feed_forward_length"), TSR_GGUF_UINT32, (uint64_t)sh->n_ff);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("attention.head_count"), TSR_GGUF_UINT32, (uint64_t)sh->n_head);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("attention.head_count_kv"), TSR_GGUF_UINT32,
                             (uint64_t)sh->n_kv_head);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("rope.dimension_count"), TSR_GGUF_UINT32,
                             (uint64_t)(sh->n_embd / sh->n_head));
    tsr_gguf_writer_set_float(w, ARCH_KEY("rope.freq_base"), TSR_GGUF_FLOAT32, sh->rope_base);
    tsr_gguf_writer_set_float(w, ARCH_KEY("attention.layer_norm_rms_epsilon"), TSR_GGUF_FLOAT32,
                              sh->rms_eps);
    tsr_gguf_writer_set_uint(w, ARCH_KEY("vocab_size"), TSR_GGUF_UINT32, (uint64_t)sh->n_vocab);
    if (sh->n_expert > 0) {
        tsr_gguf_writer_set_uint(w, ARCH_KEY("expert_count"), TSR_GGUF_UINT32,
                                 (uint64_t)sh->n_expert);
        tsr_gguf_writer_set_uint(w, ARCH_KEY("expert_used_count"), TSR_GGUF_UINT32,
                                 (uint64_t)sh->n_expert_used);
    }
    if (sh->n_ff_shared > 0) {
        tsr_gguf_writer_set_uint(w, ARCH_KEY("expert_feed_forward_length"), TSR_GGUF_UINT32,
                                 (uint64_t)sh->n_ff_expert);
        tsr_gguf_writer_set_uint(w, ARCH_KEY("expert_shared_feed_forward_length"),
                                 TSR_GGUF_UINT32, (uint64_t)sh->n_ff_shared);
    }
#undef ARCH_KEY
}

/* Makes one random tensor (ne {ne0, ne1, ne2}; 1 for unused dimensions) and offers it to the
 * job. */
static tsr_status synth_tensor(quant_job *j, uint64_t seed, uint64_t *index, const char *name,
                               const int64_t ne[3], float mean, float std, tsr_error *err) {
    uint32_t n_dims = ne[2] > 1 ? 3 : ne[1] > 1 ? 2 : 1;
    float *data = random_tensor(seed, (*index)++, (size_t)(ne[0] * ne[1] * ne[2]), mean, std);
    if (!data) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    return job_tensor(j, name, TSR_DTYPE_F32, n_dims, ne, data, data, err);
}

/* One tensor of a synthetic block: its name after "blk.N.", shape, mean and deviation. */
typedef struct synth_block_tensor {
    const char *role;
    int64_t ne[3];
    float mean, std;
} synth_block_tensor;

/* The tensors of one block of `sh`, in the order of the fixtures' files; returns how many
 * (at most 22). */
static size_t synth_block(const synth_shape *sh, synth_block_tensor *t) {
    const int64_t e = sh->n_embd, hd = sh->n_embd / sh->n_head, kv = hd * sh->n_kv_head;
    const int64_t x = sh->n_expert, fe = sh->n_ff_expert, fs = sh->n_ff_shared;
    /* weights 0.02 as the dense shapes; the router 0.1, so that routing is decisive */
    const float w = 0.02f, r = 0.1f;
    const bool moe = x > 0, qk_norm = !strcmp(sh->arch, "olmoe");
    const struct {
        synth_block_tensor t;
        bool present;
    } all[] = {
        {{"attn_norm.weight", {e, 1, 1}, 1, 0}, true},
        {{"attn_q.weight", {e, e, 1}, 0, w}, true},
        {{"attn_k.weight", {e, kv, 1}, 0, w}, true},
        {{"attn_v.weight", {e, kv, 1}, 0, w}, true},
        {{"attn_q.bias", {e, 1, 1}, 0, w}, sh->qkv_bias},
        {{"attn_k.bias", {kv, 1, 1}, 0, w}, sh->qkv_bias},
        {{"attn_v.bias", {kv, 1, 1}, 0, w}, sh->qkv_bias},
        {{"attn_q_norm.weight", {e, 1, 1}, 1, 0}, qk_norm},
        {{"attn_k_norm.weight", {kv, 1, 1}, 1, 0}, qk_norm},
        {{"attn_output.weight", {e, e, 1}, 0, w}, true},
        {{"ffn_norm.weight", {e, 1, 1}, 1, 0}, true},
        {{"ffn_gate.weight", {e, sh->n_ff, 1}, 0, w}, !moe},
        {{"ffn_up.weight", {e, sh->n_ff, 1}, 0, w}, !moe},
        {{"ffn_down.weight", {sh->n_ff, e, 1}, 0, w}, !moe},
        {{"ffn_gate_inp.weight", {e, x, 1}, 0, r}, moe},
        {{"ffn_gate_exps.weight", {e, fe, x}, 0, w}, moe},
        {{"ffn_down_exps.weight", {fe, e, x}, 0, w}, moe},
        {{"ffn_up_exps.weight", {e, fe, x}, 0, w}, moe},
        {{"ffn_gate_inp_shexp.weight", {e, 1, 1}, 0, r}, fs > 0},
        {{"ffn_gate_shexp.weight", {e, fs, 1}, 0, w}, fs > 0},
        {{"ffn_down_shexp.weight", {fs, e, 1}, 0, w}, fs > 0},
        {{"ffn_up_shexp.weight", {e, fs, 1}, 0, w}, fs > 0},
    };
    size_t n = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i].present) t[n++] = all[i].t;
    return n;
}

int tsr_cli_synth(int argc, char **argv) {
    model_opts o = {.sets = calloc((size_t)argc + 1, sizeof(char *))};
    const char *shape_name = NULL, *type = "f32", *out = NULL;
    int64_t seed = 42;
    bool json = false;
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera synth --shape NAME [--type TYPE] -o FILE.gguf [--seed S]\n"
                   "                     [--config CONFIG.yaml] [--set K=V]... [--json]\n"
                   "                     [--plugin-dir DIR]...\n"
                   "A model with random weights (normal, deviation 0.02, experts' routers 0.1;\n"
                   "norms 1) of a real shape, with a SentencePiece-style vocabulary, quantized\n"
                   "to TYPE like `tessera quantize` (each expert on its own); progress goes to\n"
                   "stderr. Shapes:");
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) printf(" %s", shapes[s].name);
            printf("\n");
            free(o.sets);
            return TSR_EXIT_OK;
        }
        const tsr_cli_text_opt texts[] = {{"--shape", NULL, "NAME", &shape_name},
                                          {"--type", NULL, "TYPE", &type},
                                          {"-o", "--out", "FILE.gguf", &out}};
        const tsr_cli_int_opt ints[] = {{"--seed", NULL, "S", 0, INT64_MAX, &seed}};
        int took = take_job_opt("synth", argc, argv, &i, &o, &json);
        if (took == 0) took = tsr_cli_take_text("synth", argc, argv, &i, texts, 3);
        if (took == 0) took = tsr_cli_take_int("synth", argc, argv, &i, ints, 1);
        if (took == 0) took = (tsr_cli_bad_arg("synth", argv[i]), -1);
        if (took < 0) {
            free(o.sets);
            return TSR_EXIT_USAGE;
        }
    }
    const synth_shape *sh = NULL;
    for (size_t s = 0; shape_name && s < sizeof shapes / sizeof shapes[0]; s++)
        if (!strcmp(shapes[s].name, shape_name)) sh = &shapes[s];
    if (!sh || !out) {
        char names[256] = "";
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", s ? ", " : "",
                     shapes[s].name);
        if (!shape_name)
            tsr_cli_error("synth: --shape NAME is required; shapes: %s (see tessera synth --help)",
                          names);
        else if (!sh)
            tsr_cli_error("synth: unknown shape '%s'; shapes: %s (see tessera synth --help)",
                          shape_name, names);
        else
            tsr_cli_error("synth: -o FILE is required (see tessera synth --help)");
        free(o.sets);
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    quant_job j;
    int status = TSR_EXIT_FAIL;
    if (job_open(&j, &o, type, sh->n_layer, out, NULL, &err) < 0) goto fail;
    synth_block_tensor block[24];
    size_t n_block = synth_block(sh, block);
    /* token_embd, output_norm, output unless tied; the blocks' tensors */
    j.n_tensors = 3 - sh->tied + (int64_t)sh->n_layer * (int64_t)n_block;
    synth_metadata(j.w, sh);
    synth_vocab(j.w, sh->n_vocab);
    copy_keys(&j, NULL, type);
    const int64_t e = sh->n_embd, v = sh->n_vocab;
    uint64_t index = 0;
    const float w = 0.02f;
    if (synth_tensor(&j, (uint64_t)seed, &index, "token_embd.weight", (int64_t[]){e, v, 1}, 0, w,
                     &err) < 0 ||
        synth_tensor(&j, (uint64_t)seed, &index, "output_norm.weight", (int64_t[]){e, 1, 1}, 1,
                     0, &err) < 0 ||
        (!sh->tied && synth_tensor(&j, (uint64_t)seed, &index, "output.weight",
                                   (int64_t[]){e, v, 1}, 0, w, &err) < 0))
        goto fail;
    for (int32_t l = 0; l < sh->n_layer; l++)
        for (size_t i = 0; i < n_block; i++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s", l, block[i].role);
            if (synth_tensor(&j, (uint64_t)seed, &index, name, block[i].ne, block[i].mean,
                             block[i].std, &err) < 0)
                goto fail;
        }
    if (job_write(&j, out, json, &err) < 0) goto fail;
    status = TSR_EXIT_OK;
    goto done;
fail:
    status = job_fail(&j, &err);
done:
    job_close(&j);
    free(o.sets);
    return status;
}
