#include "model/model.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/file.h"
#include "files/dtype.h"
#include "files/llama2c.h"

/* llama2.c checkpoints have no magic: they start with their dim, a small positive int32. A
 * first int32 in this range is taken for one, so that other files (a GGUF with a damaged
 * magic, text) are named for what they are rather than as a llama2.c header with a huge dim. */
#define LLAMA2C_MAX_DIM (1 << 20)
/* llama2.c's export.py --version 1 and 2 files: "ak42" as a little-endian uint32, then the
 * version. */
#define LLAMA2C_EXPORT_MAGIC 0x616b3432u

/* Reads up to n bytes from the start of regular file `path`; returns how many, or a negative
 * status (err filled). */
static int read_head(const char *path, uint8_t *buf, size_t n, tsr_error *err) {
    int fd = tsr_file_open_regular(path, NULL, err);
    if (fd < 0) return fd;
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", path, strerror(e));
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    close(fd);
    return (int)got;
}

bool tsr_file_is_gguf(const char *path) {
    uint8_t magic[4];
    return read_head(path, magic, sizeof magic, NULL) == 4 && memcmp(magic, "GGUF", 4) == 0;
}

/* Which reader `path` needs: *llama2c false for GGUF, true for a llama2.c checkpoint. */
static tsr_status detect_format(const char *path, bool *llama2c, tsr_error *err) {
    uint8_t head[8];
    int n = read_head(path, head, sizeof head, err);
    if (n < 0) return n;
    if (n == 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: empty file; expected a GGUF model or a "
                             "llama2.c checkpoint", path);
    uint32_t first = 0, version = 0; /* 0 when the file is too short to hold them */
    if (n >= 4) memcpy(&first, head, 4);
    if (n >= 8) memcpy(&version, head + 4, 4);
    if (n >= 4 && memcmp(head, "GGUF", 4) == 0) {
        *llama2c = false;
        return TSR_OK;
    }
    if (first >= 1 && first <= LLAMA2C_MAX_DIM) {
        *llama2c = true;
        return TSR_OK;
    }
    if (n >= 8 && first == LLAMA2C_EXPORT_MAGIC)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: a llama2.c export of version %" PRIu32
                             "; only legacy checkpoints are read (export.py --version 0)", path,
                             version);
    char hex[3 * 4 + 1] = "", text[4 + 1] = "";
    int shown = n < 4 ? n : 4;
    for (int i = 0; i < shown; i++) {
        snprintf(hex + strlen(hex), sizeof hex - strlen(hex), "%s%02x", i ? " " : "", head[i]);
        text[i] = head[i] >= 0x20 && head[i] < 0x7f ? (char)head[i] : '.';
    }
    text[shown] = '\0';
    return tsr_error_set(err, TSR_E_INVALID, "%s: not a model file: it starts with %s (\"%s\"), "
                         "neither the GGUF magic \"GGUF\" nor a llama2.c header (dim from 1 to "
                         "%d)", path, hex, text, LLAMA2C_MAX_DIM);
}

tsr_status tsr_model_file_open(const char *path, tsr_gguf **out, bool *from_llama2c,
                               tsr_error *err) {
    *out = NULL;
    bool llama2c = false;
    tsr_status st = detect_format(path, &llama2c, err);
    if (st < 0) return st;
    st = llama2c ? tsr_llama2c_open(path, out, err) : tsr_gguf_open(path, out, err);
    if (st == TSR_OK && from_llama2c) *from_llama2c = llama2c;
    return st;
}

/* Reads "<arch>.<suffix>" as an int32 of at least `min`: `fallback` when absent and not
 * required. */
static tsr_status arch_int(const tsr_gguf *g, const char *arch, const char *suffix, bool required,
                           int32_t fallback, int32_t min, int32_t *out, tsr_error *err) {
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
    if ((int32_t)v < min)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s: expected at least %d, got %d",
                             tsr_gguf_path(g), key, min, (int32_t)v);
    *out = (int32_t)v;
    return TSR_OK;
}

/* Reads "<arch>.<suffix>" as a float32 that is finite and above 0 (or exactly 0 when
 * `zero_ok`); `fallback` when absent. */
static tsr_status arch_float(const tsr_gguf *g, const char *arch, const char *suffix,
                             float fallback, bool zero_ok, float *out, tsr_error *err) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (tsr_gguf_find_key(g, key) < 0) {
        *out = fallback;
        return TSR_OK;
    }
    double v;
    if (!tsr_gguf_get_f64(g, key, &v, err)) return TSR_E_INVALID;
    /* Checked as the float32 the graph uses: a tiny or huge f64 can round to 0 or inf. */
    float f = (float)v;
    if (!isfinite(f) || f < 0 || (f == 0 && !zero_ok))
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s: expected %sa finite float32 above 0, "
                             "got %g", tsr_gguf_path(g), key, zero_ok ? "0 or " : "", v);
    *out = f;
    return TSR_OK;
}

/* What each architecture is, as llama.cpp builds it at c392e5094 (llama_model_rope_type, the
 * build_* function of each, the arguments it gives llm_build_moe_ffn). */
typedef enum arch_experts { EXPERTS_NONE, EXPERTS_OPTIONAL, EXPERTS_REQUIRED } arch_experts;

typedef struct arch_info {
    const char *name;
    int32_t arch, rope_mode;
    bool qkv_bias, qk_norm, shared_expert;
    arch_experts experts;
    int32_t normalize; /* renormalises the chosen experts' weights (norm_w) */
} arch_info;

static const arch_info archs[] = {
    {"llama", TSR_ARCH_LLAMA, TSR_ROPE_NORMAL, false, false, false, EXPERTS_OPTIONAL, 1},
    {"qwen2", TSR_ARCH_QWEN2, TSR_ROPE_NEOX, true, false, false, EXPERTS_NONE, 0},
    {"qwen2moe", TSR_ARCH_QWEN2MOE, TSR_ROPE_NEOX, true, false, true, EXPERTS_REQUIRED, 0},
    {"olmoe", TSR_ARCH_OLMOE, TSR_ROPE_NEOX, false, true, false, EXPERTS_REQUIRED, 0},
};

static const arch_info *arch_of(int32_t arch) {
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (archs[i].arch == arch) return &archs[i];
    return &archs[0];
}

/* The experts' counts and sizes, for an architecture that may have them. */
static tsr_status read_experts(const tsr_gguf *g, const char *arch, const arch_info *info,
                               tsr_hparams *hp, tsr_error *err) {
    const char *path = tsr_gguf_path(g);
    bool required = info->experts == EXPERTS_REQUIRED;
    tsr_status st = arch_int(g, arch, "expert_count", required, 0, required ? 1 : 0,
                             &hp->n_expert, err);
    if (st < 0) return st;
    if (info->experts == EXPERTS_NONE && hp->n_expert > 0)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: %s.expert_count %d: the %s "
                             "architecture has no experts", path, arch, hp->n_expert, arch);
    if (hp->n_expert == 0) return TSR_OK;
    if ((st = arch_int(g, arch, "expert_used_count", true, 0, 1, &hp->n_expert_used, err)) < 0)
        return st;
    if (hp->n_expert_used > hp->n_expert)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s.expert_used_count: %d is more than "
                             "%s.expert_count %d", path, arch, hp->n_expert_used, arch,
                             hp->n_expert);
    hp->n_ff_expert = hp->n_ff;
    if (info->shared_expert &&
        ((st = arch_int(g, arch, "expert_feed_forward_length", false,
                        hp->n_ff / hp->n_expert_used, 1, &hp->n_ff_expert, err)) < 0 ||
         (st = arch_int(g, arch, "expert_shared_feed_forward_length", false, hp->n_ff, 1,
                        &hp->n_ff_shared, err)) < 0))
        return st;
    if (hp->n_ff_expert < 1)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s.feed_forward_length %d over %d experts "
                             "used leaves no rows per expert; add "
                             "%s.expert_feed_forward_length", path, arch, hp->n_ff,
                             hp->n_expert_used, arch);
    hp->gating = TSR_GATING_SOFTMAX;
    hp->normalize = info->normalize;
    return TSR_OK;
}

static tsr_status read_hparams(const tsr_gguf *g, tsr_hparams *hp, tsr_error *err) {
    const char *path = tsr_gguf_path(g);
    tsr_gguf_str arch_str;
    if (!tsr_gguf_get_str(g, "general.architecture", &arch_str, err)) return TSR_E_INVALID;
    char arch[64];
    snprintf(arch, sizeof arch, "%.*s", (int)(arch_str.len < 63 ? arch_str.len : 63), arch_str.ptr);
    const arch_info *info = NULL;
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (!strcmp(arch, archs[i].name)) info = &archs[i];
    if (!info)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: general.architecture '%s' is not supported (supported: llama, "
                             "qwen2, qwen2moe, olmoe)", path, arch);
    hp->arch = info->arch;
    hp->qk_norm = info->qk_norm;

    /* Each count on its own first, then how they relate, so a message names one key. */
    tsr_status st;
    if ((st = arch_int(g, arch, "embedding_length", true, 0, 1, &hp->n_embd, err)) < 0 ||
        (st = arch_int(g, arch, "block_count", true, 0, 1, &hp->n_layer, err)) < 0 ||
        (st = arch_int(g, arch, "feed_forward_length", true, 0, 1, &hp->n_ff, err)) < 0 ||
        (st = arch_int(g, arch, "attention.head_count", true, 0, 1, &hp->n_head, err)) < 0 ||
        (st = arch_int(g, arch, "attention.head_count_kv", false, hp->n_head, 1, &hp->n_kv_head,
                       err)) < 0 ||
        (st = arch_int(g, arch, "context_length", false, 2048, 1, &hp->n_ctx_train, err)) < 0 ||
        (st = read_experts(g, arch, info, hp, err)) < 0)
        return st;
    if (hp->n_head % hp->n_kv_head != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s.attention.head_count_kv: %d does not "
                             "divide %s.attention.head_count %d", path, arch, hp->n_kv_head, arch,
                             hp->n_head);
    if (hp->n_embd % hp->n_head != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s.embedding_length: %d is not a multiple of "
                             "%s.attention.head_count %d", path, arch, hp->n_embd, arch,
                             hp->n_head);
    if ((st = arch_int(g, arch, "attention.key_length", false, hp->n_embd / hp->n_head, 1,
                       &hp->head_dim, err)) < 0)
        return st;
    int32_t n_rot;
    if ((st = arch_int(g, arch, "rope.dimension_count", false, hp->head_dim, 1, &n_rot, err)) < 0)
        return st;
    if (n_rot > hp->head_dim || n_rot % 2)
        return tsr_error_set(err, TSR_E_INVALID, "%s: %s.rope.dimension_count: %d must be even "
                             "and at most the head size %d", path, arch, n_rot, hp->head_dim);
    float freq_base, scale;
    if ((st = arch_float(g, arch, "attention.layer_norm_rms_epsilon", 1e-5f, false, &hp->rms_eps,
                         err)) < 0 ||
        (st = arch_float(g, arch, "rope.freq_base", 10000.0f, false, &freq_base, err)) < 0 ||
        /* 0 means no scaling, as in llama.cpp */
        (st = arch_float(g, arch, "rope.scaling.factor", 1.0f, true, &scale, err)) < 0)
        return st;
    hp->rope = (tsr_rope_params){
        .struct_size = sizeof(tsr_rope_params),
        .mode = info->rope_mode,
        .n_rot = n_rot,
        .freq_base = freq_base,
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

/* Norms and biases are read by the host directly: they must be F32. They are few, and one
 * NaN or infinity among them turns every later activation into NaN, so their values are
 * checked here rather than noticed as garbage output. */
static tsr_status require_finite_f32(const tsr_gguf *g, const tsr_tensor *t, tsr_error *err) {
    if (!t->data) return TSR_OK;
    if (t->dtype != TSR_DTYPE_F32)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: tensor '%s' is %s; norms and biases "
                             "must be F32", tsr_gguf_path(g), t->name, tsr_dtype_name(t->dtype));
    int64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    for (int64_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, (const float *)t->data + i, sizeof v);
        if (!isfinite(v))
            return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': element %" PRId64 " is "
                                 "%g; norm weights and biases must be finite", tsr_gguf_path(g),
                                 t->name, i, (double)v);
    }
    return TSR_OK;
}

/* One tensor a block may hold: where it goes, its shape, whether this model needs it or may
 * have it (biases), and whether the host reads it directly (F32, finite: norms and biases).
 * Tensors of other architectures are not looked up. */
typedef struct layer_tensor {
    const char *name;
    tsr_tensor *dst;
    int64_t ne[3];
    int n;
    bool required, optional;
    bool is_f32;
} layer_tensor;

const char *const tsr_expert_roles[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};

/* A layer's expert matrices: each one stacked (blk.L.ffn_gate_exps.weight), or, when the file
 * has no stack but has blk.L.ffn_gate_exps.0.weight, apart, one tensor per expert. */
static tsr_status bind_experts(const tsr_gguf *g, const tsr_hparams *hp, int il,
                               tsr_layer_weights *w, tsr_error *err) {
    const int64_t e = hp->n_embd, fe = hp->n_ff_expert, ne = hp->n_expert;
    tsr_tensor *stacks[3] = {&w->gate_exps, &w->up_exps, &w->down_exps};
    for (int m = 0; m < 3; m++) {
        const int64_t in = m == 2 ? fe : e, out = m == 2 ? e : fe;
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s.0.weight", il, tsr_expert_roles[m]);
        if (!tsr_gguf_find_tensor(g, name)) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", il, tsr_expert_roles[m]);
            tsr_status st = bind_tensor(g, name, (int64_t[]){in, out, ne}, 3, true, stacks[m], err);
            if (st < 0) return st;
            continue;
        }
        if (!w->split && !(w->split = calloc((size_t)ne * 3, sizeof *w->split)))
            return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", tsr_gguf_path(g));
        for (int32_t x = 0; x < ne; x++) {
            snprintf(name, sizeof name, "blk.%d.%s.%d.weight", il, tsr_expert_roles[m], (int)x);
            tsr_status st = bind_tensor(g, name, (int64_t[]){in, out}, 2, true,
                                        &w->split[x * 3 + m], err);
            if (st < 0) return st;
        }
    }
    return TSR_OK;
}

static tsr_status bind_layer(const tsr_gguf *g, const tsr_hparams *hp, int il,
                             tsr_layer_weights *w, tsr_error *err) {
    const int64_t e = hp->n_embd, q = (int64_t)hp->n_head * hp->head_dim,
                  kv = (int64_t)hp->n_kv_head * hp->head_dim, ff = hp->n_ff,
                  fs = hp->n_ff_shared, ne = hp->n_expert;
    const arch_info *info = arch_of(hp->arch);
    const bool bias = info->qkv_bias, moe = ne > 0, shared = moe && info->shared_expert;
    const layer_tensor want[] = {
        {"attn_norm.weight", &w->attn_norm, {e}, 1, true, false, true},
        {"attn_q.weight", &w->wq, {e, q}, 2, true, false, false},
        {"attn_k.weight", &w->wk, {e, kv}, 2, true, false, false},
        {"attn_v.weight", &w->wv, {e, kv}, 2, true, false, false},
        {"attn_output.weight", &w->wo, {q, e}, 2, true, false, false},
        {"attn_q.bias", &w->bq, {q}, 1, bias, true, true},
        {"attn_k.bias", &w->bk, {kv}, 1, bias, true, true},
        {"attn_v.bias", &w->bv, {kv}, 1, bias, true, true},
        {"attn_q_norm.weight", &w->q_norm, {q}, 1, hp->qk_norm, false, true},
        {"attn_k_norm.weight", &w->k_norm, {kv}, 1, hp->qk_norm, false, true},
        {"ffn_norm.weight", &w->ffn_norm, {e}, 1, true, false, true},
        {"ffn_gate.weight", &w->ffn_gate, {e, ff}, 2, !moe, false, false},
        {"ffn_up.weight", &w->ffn_up, {e, ff}, 2, !moe, false, false},
        {"ffn_down.weight", &w->ffn_down, {ff, e}, 2, !moe, false, false},
        {"ffn_gate_inp.weight", &w->gate_inp, {e, ne}, 2, moe, false, false},
        {"ffn_gate_inp_shexp.weight", &w->gate_inp_shexp, {e}, 1, shared, false, false},
        {"ffn_gate_shexp.weight", &w->gate_shexp, {e, fs}, 2, shared, false, false},
        {"ffn_up_shexp.weight", &w->up_shexp, {e, fs}, 2, shared, false, false},
        {"ffn_down_shexp.weight", &w->down_shexp, {fs, e}, 2, shared, false, false},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!want[i].required && !want[i].optional) continue;
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s", il, want[i].name);
        tsr_status st = bind_tensor(g, name, want[i].ne, want[i].n, want[i].required, want[i].dst, err);
        if (st < 0) return st;
        if (want[i].is_f32 && (st = require_finite_f32(g, want[i].dst, err)) < 0) return st;
    }
    tsr_status st = moe ? bind_experts(g, hp, il, w, err) : TSR_OK;
    if (st < 0) return st;
    /* The shared expert's gate is a one-row matrix to multiply. */
    if (w->gate_inp_shexp.data) {
        w->gate_inp_shexp.n_dims = 2;
        w->gate_inp_shexp.ne[1] = 1;
    }
    return TSR_OK;
}

tsr_status tsr_model_load(const char *path, tsr_model **out, tsr_error *err) {
    *out = NULL;
    tsr_model *m = calloc(1, sizeof *m);
    if (!m) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    tsr_status st = tsr_model_file_open(path, &m->file, &m->from_llama2c, err);
    if (st < 0) goto fail;
    const tsr_gguf *g = m->file;
    if ((st = read_hparams(g, &m->hp, err)) < 0) goto fail;

    const tsr_gguf_tensor *embd = tsr_gguf_find_tensor(g, "token_embd.weight");
    if (!embd) {
        st = tsr_error_set(err, TSR_E_INVALID, "%s: tensor 'token_embd.weight' is missing", path);
        goto fail;
    }
    if (embd->ne[1] < 1 || embd->ne[1] > INT32_MAX) {
        st = tsr_error_set(err, TSR_E_INVALID, "%s: tensor 'token_embd.weight': %" PRId64 " rows "
                           "(the vocabulary), expected 1 to %d", path, embd->ne[1], INT32_MAX);
        goto fail;
    }
    m->hp.n_vocab = (int32_t)embd->ne[1];
    const int64_t e = m->hp.n_embd, v = m->hp.n_vocab;
    if ((st = bind_tensor(g, "token_embd.weight", (int64_t[]){e, v}, 2, true, &m->tok_embd, err)) < 0)
        goto fail;
    if ((st = bind_tensor(g, "output_norm.weight", (int64_t[]){e}, 1, true, &m->output_norm, err)) < 0 ||
        (st = require_finite_f32(g, &m->output_norm, err)) < 0)
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
    for (int il = 0; m->layers && il < m->hp.n_layer; il++) free(m->layers[il].split);
    free(m->layers);
    free(m);
}
