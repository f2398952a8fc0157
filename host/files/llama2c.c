#include "files/llama2c.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define LLAMA2C_HEADER_BYTES 28

enum { H_DIM, H_HIDDEN, H_LAYERS, H_HEADS, H_KV_HEADS, H_VOCAB, H_SEQ, H_COUNT };

static const char *const header_names[H_COUNT] = {
    "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};

typedef struct llama2c_shape {
    uint64_t dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len;
    uint64_t head_size, kv_dim;
    bool tied;
} llama2c_shape;

/* Reads and checks the seven header fields. */
static int read_header(const uint8_t *base, size_t size, const char *name, llama2c_shape *s,
                       tsr_error *err) {
    if (size < LLAMA2C_HEADER_BYTES)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 0: file ends in the llama2.c header"
                             " (%d bytes needed, %zu left)", name, LLAMA2C_HEADER_BYTES, size);
    int32_t h[H_COUNT];
    memcpy(h, base, sizeof h);
    for (int i = 0; i < H_COUNT; i++) {
        int32_t v = i == H_VOCAB && h[i] != INT32_MIN ? (h[i] < 0 ? -h[i] : h[i]) : h[i];
        if (v <= 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s: offset %d: %s = %" PRId32 ", expected "
                                 "a positive number%s", name, 4 * i, header_names[i], h[i],
                                 i == H_VOCAB ? " (negative: untied classifier)" : "");
    }
    *s = (llama2c_shape){.dim = (uint64_t)h[H_DIM], .hidden = (uint64_t)h[H_HIDDEN],
                         .n_layers = (uint64_t)h[H_LAYERS], .n_heads = (uint64_t)h[H_HEADS],
                         .n_kv_heads = (uint64_t)h[H_KV_HEADS],
                         .vocab = (uint64_t)(h[H_VOCAB] < 0 ? -(int64_t)h[H_VOCAB] : h[H_VOCAB]),
                         .seq_len = (uint64_t)h[H_SEQ], .tied = h[H_VOCAB] > 0};
    if (s->dim % s->n_heads != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 12: dim %" PRIu64 " is not a "
                             "multiple of n_heads %" PRIu64, name, s->dim, s->n_heads);
    if (s->n_kv_heads > s->n_heads || s->n_heads % s->n_kv_heads != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 16: n_kv_heads %" PRIu64 " does not "
                             "divide n_heads %" PRIu64, name, s->n_kv_heads, s->n_heads);
    s->head_size = s->dim / s->n_heads;
    if (s->head_size % 2 != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 12: head size %" PRIu64 " (dim / "
                             "n_heads) is odd, RoPE needs pairs", name, s->head_size);
    s->kv_dim = s->head_size * s->n_kv_heads;
    return TSR_OK;
}

/* acc += a * b * c, false on overflow. */
static bool add_product(uint64_t *acc, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t p;
    return !__builtin_mul_overflow(a, b, &p) && !__builtin_mul_overflow(p, c, &p) &&
           !__builtin_add_overflow(*acc, p, acc);
}

/* Bytes the file must have: header, weights, freq_cis tables, wcls when untied. */
static bool expected_size(const llama2c_shape *s, uint64_t *bytes) {
    uint64_t n = 0, L = s->n_layers;
    bool ok = add_product(&n, s->tied ? 1 : 2, s->vocab, s->dim) /* embedding (+ wcls) */
              && add_product(&n, L, 2, s->dim)                   /* rms_att, rms_ffn */
              && add_product(&n, L, 2 * s->dim, s->dim)          /* wq, wo */
              && add_product(&n, L, 2 * s->kv_dim, s->dim)       /* wk, wv */
              && add_product(&n, L, 3 * s->hidden, s->dim)       /* w1, w2, w3 */
              && add_product(&n, 1, 1, s->dim)                   /* rms_final */
              && add_product(&n, 2, s->seq_len, s->head_size / 2) /* freq_cis real, imag */
              && !__builtin_mul_overflow(n, 4, bytes)
              && !__builtin_add_overflow(*bytes, LLAMA2C_HEADER_BYTES, bytes);
    return ok;
}

static int add_weight(tsr_gguf *g, const char *name, uint32_t n_dims, int64_t ne0, int64_t ne1,
                      const float *data, const uint8_t *base, tsr_error *err) {
    int64_t ne[2] = {ne0, ne1};
    uint64_t offset = (uint64_t)((const uint8_t *)data - base) - LLAMA2C_HEADER_BYTES;
    return tsr_gguf_add_tensor(g, name, TSR_DTYPE_F32, n_dims, ne, data, offset, err);
}

static int add_metadata(tsr_gguf *g, const llama2c_shape *s, tsr_error *err) {
    const struct {
        const char *key;
        uint64_t value;
    } ints[] = {
        {"llama.context_length", s->seq_len},
        {"llama.embedding_length", s->dim},
        {"llama.block_count", s->n_layers},
        {"llama.feed_forward_length", s->hidden},
        {"llama.attention.head_count", s->n_heads},
        {"llama.attention.head_count_kv", s->n_kv_heads},
        {"llama.rope.dimension_count", s->head_size},
        {"llama.vocab_size", s->vocab},
    };
    int rc = tsr_gguf_add_str(g, "general.architecture", "llama", err);
    for (size_t i = 0; rc == TSR_OK && i < sizeof ints / sizeof ints[0]; i++)
        rc = tsr_gguf_add_int(g, ints[i].key, TSR_GGUF_UINT32, (int64_t)ints[i].value, err);
    if (rc == TSR_OK)
        rc = tsr_gguf_add_float(g, "llama.attention.layer_norm_rms_epsilon", TSR_GGUF_FLOAT32,
                                1e-5, err);
    if (rc == TSR_OK)
        rc = tsr_gguf_add_float(g, "llama.rope.freq_base", TSR_GGUF_FLOAT32, 10000.0, err);
    return rc;
}

static int add_tensors(tsr_gguf *g, const llama2c_shape *s, const uint8_t *base,
                       tsr_error *err) {
    const int64_t dim = (int64_t)s->dim, hidden = (int64_t)s->hidden, kv_dim = (int64_t)s->kv_dim;
    const uint64_t L = s->n_layers;
    /* Sections in file order; each [L][rows][cols] block holds one matrix per layer. */
    const float *p = (const float *)(base + LLAMA2C_HEADER_BYTES);
    const float *embd = p;          p += s->vocab * s->dim;
    const float *rms_att = p;       p += L * s->dim;
    const float *wq = p;            p += L * s->dim * s->dim;
    const float *wk = p;            p += L * s->kv_dim * s->dim;
    const float *wv = p;            p += L * s->kv_dim * s->dim;
    const float *wo = p;            p += L * s->dim * s->dim;
    const float *rms_ffn = p;       p += L * s->dim;
    const float *w1 = p;            p += L * s->hidden * s->dim;
    const float *w2 = p;            p += L * s->dim * s->hidden;
    const float *w3 = p;            p += L * s->hidden * s->dim;
    const float *rms_final = p;     p += s->dim;
    p += s->seq_len * s->head_size; /* freq_cis_real, freq_cis_imag: recomputed, not read */
    const float *wcls = s->tied ? embd : p;

    int rc = add_weight(g, "token_embd.weight", 2, dim, (int64_t)s->vocab, embd, base, err);
    if (rc == TSR_OK) rc = add_weight(g, "output_norm.weight", 1, dim, 1, rms_final, base, err);
    if (rc == TSR_OK)
        rc = add_weight(g, "output.weight", 2, dim, (int64_t)s->vocab, wcls, base, err);
    for (uint64_t l = 0; rc == TSR_OK && l < L; l++) {
        const struct {
            const char *suffix;
            uint32_t n_dims;
            int64_t ne0, ne1;
            const float *data;
        } w[] = {
            {"attn_norm", 1, dim, 1, rms_att + l * s->dim},
            {"attn_q", 2, dim, dim, wq + l * s->dim * s->dim},
            {"attn_k", 2, dim, kv_dim, wk + l * s->kv_dim * s->dim},
            {"attn_v", 2, dim, kv_dim, wv + l * s->kv_dim * s->dim},
            {"attn_output", 2, dim, dim, wo + l * s->dim * s->dim},
            {"ffn_norm", 1, dim, 1, rms_ffn + l * s->dim},
            {"ffn_gate", 2, dim, hidden, w1 + l * s->hidden * s->dim},
            {"ffn_down", 2, hidden, dim, w2 + l * s->dim * s->hidden},
            {"ffn_up", 2, dim, hidden, w3 + l * s->hidden * s->dim},
        };
        for (size_t i = 0; rc == TSR_OK && i < sizeof w / sizeof w[0]; i++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%" PRIu64 ".%s.weight", l, w[i].suffix);
            rc = add_weight(g, name, w[i].n_dims, w[i].ne0, w[i].ne1, w[i].data, base, err);
        }
    }
    return rc;
}

/* Builds the model over base[0..size), which `g` does not own. */
static int build(tsr_gguf *g, const uint8_t *base, size_t size, tsr_error *err) {
    const char *name = tsr_gguf_path(g);
    llama2c_shape s = {0};
    int rc = read_header(base, size, name, &s, err);
    if (rc < 0) return rc;
    char shape[256];
    snprintf(shape, sizeof shape, "dim %" PRIu64 ", hidden_dim %" PRIu64 ", n_layers %" PRIu64
             ", n_heads %" PRIu64 ", n_kv_heads %" PRIu64 ", vocab_size %s%" PRIu64 ", seq_len %"
             PRIu64, s.dim, s.hidden, s.n_layers, s.n_heads, s.n_kv_heads, s.tied ? "" : "-",
             s.vocab, s.seq_len);
    uint64_t expected;
    if (!expected_size(&s, &expected))
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 0: the llama2.c header (%s) "
                             "describes more than 2^64 bytes", name, shape);
    if (expected != size)
        return tsr_error_set(err, TSR_E_INVALID, "%s: file size %zu does not match its llama2.c "
                             "header (%s): expected %" PRIu64 " bytes", name, size, shape,
                             expected);
    rc = add_metadata(g, &s, err);
    if (rc == TSR_OK) rc = add_tensors(g, &s, base, err);
    return rc;
}

int tsr_llama2c_open_memory(const void *data, size_t size, const char *name, tsr_gguf **out,
                            tsr_error *err) {
    *out = NULL;
    tsr_gguf *g = tsr_gguf_new(name);
    if (!g) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    int rc = build(g, data, size, err);
    if (rc < 0) {
        tsr_gguf_close(g);
        return rc;
    }
    *out = g;
    return TSR_OK;
}

int tsr_llama2c_open(const char *path, tsr_gguf **out, tsr_error *err) {
    *out = NULL;
    void *map;
    size_t size;
    int rc = tsr_gguf_map_file(path, &map, &size, err);
    if (rc < 0) return rc;
    tsr_gguf *g = tsr_gguf_new(path);
    if (!g) {
        if (map) munmap(map, size);
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    }
    if (map) tsr_gguf_adopt_mapping(g, map, size);
    rc = build(g, map, size, err);
    if (rc < 0) {
        tsr_gguf_close(g);
        return rc;
    }
    *out = g;
    return TSR_OK;
}
