#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files/dtype.h"
#include "files/llama2c.h"

bool tsr_file_is_gguf(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

/* Reads "<arch>.<suffix>" as a positive int32. */
static tsr_status arch_int(const tsr_gguf *g, const char *arch, const char *suffix, bool required,
                           int32_t fallback, int32_t *out, tsr_error *err) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (tsr_gguf_find_key(g, key) < 0) {
        if (required)
            return tsr_error_set(err, TSR_E_INVALID, "%s: key '%s' is missing",
                                 tsr_gguf_path(g), key);
        *out = fallback;
        return TSR_OK;
    }
    uint64_t v;
    if (!tsr_gguf_get_u64(g, key, &v, err)) return TSR_E_INVALID;
    if (v > INT32_MAX)
        return tsr_error_set(err, TSR_E_RANGE, "%s: key '%s': %llu is too large",
                             tsr_gguf_path(g), key, (unsigned long long)v);
    *out = (int32_t)v;
    return TSR_OK;
}

static double arch_f64_or(const tsr_gguf *g, const char *arch, const char *suffix, double fallback) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    return tsr_gguf_f64_or(g, key, fallback);
}

static tsr_status read_hparams(const tsr_gguf *g, tsr_hparams *hp, tsr_error *err) {
    const char *path = tsr_gguf_path(g);
    tsr_gguf_str arch_str;
    if (!tsr_gguf_get_str(g, "general.architecture", &arch_str, err)) return TSR_E_INVALID;
    char arch[64];
    snprintf(arch, sizeof arch, "%.*s", (int)(arch_str.len < 63 ? arch_str.len : 63), arch_str.ptr);
    if (!strcmp(arch, "llama")) hp->arch = TSR_ARCH_LLAMA;
    else if (!strcmp(arch, "qwen2")) hp->arch = TSR_ARCH_QWEN2;
    else
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: general.architecture '%s' is not supported (supported: llama, "
                             "qwen2)", path, arch);

    tsr_status st;
    if ((st = arch_int(g, arch, "embedding_length", true, 0, &hp->n_embd, err)) < 0) return st;
    if ((st = arch_int(g, arch, "block_count", true, 0, &hp->n_layer, err)) < 0) return st;
    if ((st = arch_int(g, arch, "feed_forward_length", true, 0, &hp->n_ff, err)) < 0) return st;
    if ((st = arch_int(g, arch, "attention.head_count", true, 0, &hp->n_head, err)) < 0) return st;
    if ((st = arch_int(g, arch, "attention.head_count_kv", false, hp->n_head, &hp->n_kv_head,
                       err)) < 0)
        return st;
    if ((st = arch_int(g, arch, "context_length", false, 2048, &hp->n_ctx_train, err)) < 0)
        return st;
    if ((st = arch_int(g, arch, "expert_count", false, 0, &hp->n_expert, err)) < 0) return st;
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 || hp->n_kv_head <= 0 ||
        hp->n_head % hp->n_kv_head != 0 || hp->n_embd % hp->n_head != 0)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: inconsistent shape: embedding_length %d, head_count %d, "
                             "head_count_kv %d (heads must divide the embedding and KV heads "
                             "the heads)", path, hp->n_embd, hp->n_head, hp->n_kv_head);
    if ((st = arch_int(g, arch, "attention.key_length", false, hp->n_embd / hp->n_head,
                       &hp->head_dim, err)) < 0)
        return st;
    int32_t n_rot;
    if ((st = arch_int(g, arch, "rope.dimension_count", false, hp->head_dim, &n_rot, err)) < 0)
        return st;
    if (n_rot <= 0 || n_rot > hp->head_dim || n_rot % 2)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: %s.rope.dimension_count %d must be even and at most the head "
                             "size %d", path, arch, n_rot, hp->head_dim);
    if (hp->n_expert > 0)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: mixture-of-experts models (%s.expert_count %d) need the router "
                             "stage, which this version does not run yet", path, arch,
                             hp->n_expert);
    hp->rms_eps = (float)arch_f64_or(g, arch, "attention.layer_norm_rms_epsilon", 1e-5);
    double scale = arch_f64_or(g, arch, "rope.scaling.factor", 1.0);
    hp->rope = (tsr_rope_params){
        .struct_size = sizeof(tsr_rope_params),
        .mode = hp->arch == TSR_ARCH_QWEN2 ? TSR_ROPE_NEOX : TSR_ROPE_NORMAL,
        .n_rot = n_rot,
        .freq_base = (float)arch_f64_or(g, arch, "rope.freq_base", 10000.0),
        .freq_scale = scale > 0 ? (float)(1.0 / scale) : 1.0f,
    };
    return TSR_OK;
}

/* Looks up `name` and checks its shape: ne[0..n_dims) must equal `want` (n entries). */
static tsr_status bind_tensor(const tsr_gguf *g, const char *name, const int64_t *want, int n,
                              bool required, tsr_tensor *out, tsr_error *err) {
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, name);
    memset(out, 0, sizeof *out);
    if (!t) {
        if (!required) return TSR_OK;
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s' is missing", tsr_gguf_path(g),
                             name);
    }
    bool ok = true;
    for (int i = 0; i < 4; i++) ok = ok && t->ne[i] == (i < n ? want[i] : 1);
    if (!ok)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: tensor '%s' has shape [%lld, %lld, %lld], expected [%lld, %lld, "
                             "%lld]", tsr_gguf_path(g), name, (long long)t->ne[0],
                             (long long)t->ne[1], (long long)t->ne[2], (long long)want[0],
                             (long long)(n > 1 ? want[1] : 1), (long long)(n > 2 ? want[2] : 1));
    *out = (tsr_tensor){
        .struct_size = sizeof(tsr_tensor),
        .dtype = t->dtype,
        .n_dims = (uint32_t)n,
        .ne = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]},
        .row_bytes = tsr_dtype_row_bytes(t->dtype, t->ne[0]),
        .data = (void *)t->data,
        .name = t->name,
    };
    return TSR_OK;
}

/* Norms and biases are read by the host directly: they must be F32. */
static tsr_status require_f32(const tsr_gguf *g, const tsr_tensor *t, tsr_error *err) {
    if (!t->data || t->dtype == TSR_DTYPE_F32) return TSR_OK;
    return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: tensor '%s' is %s; norms and biases must be F32",
                         tsr_gguf_path(g), t->name, tsr_dtype_name(t->dtype));
}

static tsr_status bind_layer(const tsr_gguf *g, const tsr_hparams *hp, int il,
                             tsr_layer_weights *w, tsr_error *err) {
    const int64_t e = hp->n_embd, q = (int64_t)hp->n_head * hp->head_dim,
                  kv = (int64_t)hp->n_kv_head * hp->head_dim, ff = hp->n_ff;
    const bool bias = hp->arch == TSR_ARCH_QWEN2;
    struct {
        const char *name;
        tsr_tensor *dst;
        int64_t ne[3];
        int n;
        bool required;
        bool is_f32;
    } want[] = {
        {"attn_norm.weight", &w->attn_norm, {e}, 1, true, true},
        {"attn_q.weight", &w->wq, {e, q}, 2, true, false},
        {"attn_k.weight", &w->wk, {e, kv}, 2, true, false},
        {"attn_v.weight", &w->wv, {e, kv}, 2, true, false},
        {"attn_output.weight", &w->wo, {q, e}, 2, true, false},
        {"attn_q.bias", &w->bq, {q}, 1, bias, true},
        {"attn_k.bias", &w->bk, {kv}, 1, bias, true},
        {"attn_v.bias", &w->bv, {kv}, 1, bias, true},
        {"ffn_norm.weight", &w->ffn_norm, {e}, 1, true, true},
        {"ffn_gate.weight", &w->ffn_gate, {e, ff}, 2, true, false},
        {"ffn_up.weight", &w->ffn_up, {e, ff}, 2, true, false},
        {"ffn_down.weight", &w->ffn_down, {ff, e}, 2, true, false},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s", il, want[i].name);
        tsr_status st = bind_tensor(g, name, want[i].ne, want[i].n, want[i].required, want[i].dst, err);
        if (st < 0) return st;
        if (want[i].is_f32 && (st = require_f32(g, want[i].dst, err)) < 0) return st;
    }
    return TSR_OK;
}

tsr_status tsr_model_load(const char *path, tsr_model **out, tsr_error *err) {
    *out = NULL;
    tsr_model *m = calloc(1, sizeof *m);
    if (!m) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    tsr_status st;
    m->from_llama2c = !tsr_file_is_gguf(path);
    st = m->from_llama2c ? tsr_llama2c_open(path, &m->file, err) : tsr_gguf_open(path, &m->file, err);
    if (st < 0) goto fail;
    const tsr_gguf *g = m->file;
    if ((st = read_hparams(g, &m->hp, err)) < 0) goto fail;

    const tsr_gguf_tensor *embd = tsr_gguf_find_tensor(g, "token_embd.weight");
    if (!embd) {
        st = tsr_error_set(err, TSR_E_INVALID, "%s: tensor 'token_embd.weight' is missing", path);
        goto fail;
    }
    m->hp.n_vocab = (int32_t)embd->ne[1];
    const int64_t e = m->hp.n_embd, v = m->hp.n_vocab;
    if ((st = bind_tensor(g, "token_embd.weight", (int64_t[]){e, v}, 2, true, &m->tok_embd, err)) < 0)
        goto fail;
    if ((st = bind_tensor(g, "output_norm.weight", (int64_t[]){e}, 1, true, &m->output_norm, err)) < 0 ||
        (st = require_f32(g, &m->output_norm, err)) < 0)
        goto fail;
    if ((st = bind_tensor(g, "output.weight", (int64_t[]){e, v}, 2, false, &m->output, err)) < 0)
        goto fail;
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */

    m->layers = calloc((size_t)m->hp.n_layer, sizeof *m->layers);
    if (!m->layers) {
        st = tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (int il = 0; il < m->hp.n_layer; il++)
        if ((st = bind_layer(g, &m->hp, il, &m->layers[il], err)) < 0) goto fail;
    *out = m;
    return TSR_OK;
fail:
    tsr_model_free(m);
    return st;
}

void tsr_model_free(tsr_model *m) {
    if (!m) return;
    tsr_gguf_close(m->file);
    free(m->layers);
    free(m);
}
