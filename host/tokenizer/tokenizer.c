/* Tokenizer core: the vocabulary, special tokens, and the entry points that dispatch to the
 * SentencePiece (tokenizer_spm.c), byte-level BPE (tokenizer_bpe.c) and llama2.c
 * (tokenizer_llama2c.c) parts. */
#include "tokenizer/tokenizer_impl.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Small containers                                                                          */

int tsr_ids_push(tsr_ids *ids, int32_t id) {
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof *v);
        if (!v) return TSR_E_NOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return TSR_OK;
}

static uint64_t strmap_hash(const char *s, size_t len) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

int tsr_strmap_init(tsr_strmap *m, size_t expected) {
    memset(m, 0, sizeof *m);
    size_t n = 16;
    while (n < expected * 2) n *= 2;
    m->slots = calloc(n, sizeof *m->slots);
    if (!m->slots) return TSR_E_NOMEM;
    m->mask = n - 1;
    return TSR_OK;
}

void tsr_strmap_free(tsr_strmap *m) {
    free(m->slots);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static int strmap_grow(tsr_strmap *m) {
    size_t n = (m->mask + 1) * 2;
    tsr_strmap_slot *slots = calloc(n, sizeof *slots);
    if (!slots) return TSR_E_NOMEM;
    for (size_t i = 0; i <= m->mask; i++) {
        if (!m->slots[i].used) continue;
        size_t j = m->slots[i].hash & (n - 1);
        while (slots[j].used) j = (j + 1) & (n - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->mask = n - 1;
    return TSR_OK;
}

int tsr_strmap_put(tsr_strmap *m, const char *key, size_t len, int32_t val, int32_t *existing) {
    if (existing) *existing = -1;
    if ((m->count + 1) * 2 > m->mask + 1 && strmap_grow(m) != TSR_OK) return TSR_E_NOMEM;
    uint64_t h = strmap_hash(key, len);
    size_t j = h & m->mask;
    for (; m->slots[j].used; j = (j + 1) & m->mask) {
        const tsr_strmap_slot *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(m->arena + s->off, key, len) == 0) {
            if (existing) *existing = s->val;
            return TSR_OK;
        }
    }
    if (len > UINT32_MAX || m->arena_len + len > UINT32_MAX) return TSR_E_NOMEM;
    if (m->arena_len + len > m->arena_cap) {
        size_t cap = m->arena_cap ? m->arena_cap : 4096;
        while (cap < m->arena_len + len) cap *= 2;
        char *a = realloc(m->arena, cap);
        if (!a) return TSR_E_NOMEM;
        m->arena = a;
        m->arena_cap = cap;
    }
    if (len) memcpy(m->arena + m->arena_len, key, len);
    m->slots[j] = (tsr_strmap_slot){h, (uint32_t)m->arena_len, (uint32_t)len, val, 1};
    m->arena_len += len;
    m->count++;
    return TSR_OK;
}

int32_t tsr_strmap_get(const tsr_strmap *m, const char *key, size_t len) {
    if (!m->slots) return -1;
    uint64_t h = strmap_hash(key, len);
    for (size_t j = h & m->mask; m->slots[j].used; j = (j + 1) & m->mask) {
        const tsr_strmap_slot *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(m->arena + s->off, key, len) == 0)
            return s->val;
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------- */
/* Building                                                                                  */

void tsr_tokenizer_desc_init(tsr_tokenizer_desc *d) {
    memset(d, 0, sizeof *d);
    d->bos_id = d->eos_id = d->unk_id = d->pad_id = d->eot_id = d->eom_id = -2;
    d->add_bos = d->add_eos = d->add_space_prefix = -1;
}

int tsr_tokenizer_set_vocab(tsr_tokenizer *t, const char *name, uint32_t n,
                            const tsr_tok_str *tokens, const float *scores,
                            const int32_t *types, bool allow_duplicates, tsr_error *err) {
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++) total += tokens[i].len;
    t->n_vocab = n;
    t->text = malloc(total ? total : 1);
    t->text_off = malloc((n + (size_t)1) * sizeof *t->text_off);
    t->scores = calloc(n ? n : 1, sizeof *t->scores);
    t->types = malloc(n ? n : 1);
    if (!t->text || !t->text_off || !t->scores || !t->types ||
        tsr_strmap_init(&t->vocab, n) != TSR_OK)
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %u tokens", name, n);
    uint64_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        t->text_off[i] = off;
        if (tokens[i].len) memcpy(t->text + off, tokens[i].ptr, tokens[i].len);
        off += tokens[i].len;
        if (scores) t->scores[i] = scores[i];
        int32_t ty = types ? types[i] : TSR_TOKEN_TYPE_NORMAL;
        if (ty < TSR_TOKEN_TYPE_UNDEFINED || ty > TSR_TOKEN_TYPE_BYTE) ty = 0;
        t->types[i] = (uint8_t)ty;
        int32_t prev;
        if (tsr_strmap_put(&t->vocab, tokens[i].ptr, tokens[i].len, (int32_t)i, &prev) != TSR_OK)
            return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %u tokens", name, n);
        if (prev >= 0 && !allow_duplicates)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: tokenizer.ggml.tokens[%u] '%.*s' duplicates token %d",
                                 name, i, (int)(tokens[i].len > 64 ? 64 : tokens[i].len),
                                 tokens[i].ptr, prev);
    }
    t->text_off[n] = off;
    return TSR_OK;
}

static int cmp_special_len(const void *a, const void *b, void *ctx) {
    const tsr_tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    size_t lx = tsr_tok_text(t, x).len, ly = tsr_tok_text(t, y).len;
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* Tokens that end a generation besides eos/eot/eom, recognised by text as llama.cpp does. */
static const char *const eog_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
};

static int check_id(const char *name, const char *key, int32_t id, int32_t dflt, uint32_t n,
                    int32_t *out, tsr_error *err) {
    if (id == -2) {
        *out = dflt >= 0 && (uint32_t)dflt < n ? dflt : -1;
        return TSR_OK;
    }
    if (id < -1 || (id >= 0 && (uint32_t)id >= n))
        return tsr_error_set(err, TSR_E_RANGE, "%s: %s %d is outside the vocabulary of %u tokens",
                             name, key, id, n);
    *out = id;
    return TSR_OK;
}

int tsr_tokenizer_create(const tsr_tokenizer_desc *d, tsr_tokenizer **out, tsr_error *err) {
    *out = NULL;
    const char *name = d->name ? d->name : "tokenizer";
    tsr_tokenizer_kind kind;
    if (d->model && strcmp(d->model, "llama") == 0) {
        kind = TSR_TOKENIZER_SPM;
    } else if (d->model && strcmp(d->model, "gpt2") == 0) {
        kind = TSR_TOKENIZER_BPE;
    } else {
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: tokenizer.ggml.model '%s' is not supported; known: llama, gpt2",
                             name, d->model ? d->model : "");
    }
    if (d->n_tokens == 0 || !d->tokens)
        return tsr_error_set(err, TSR_E_INVALID, "%s: tokenizer.ggml.tokens is empty", name);
    if (d->n_tokens > INT32_MAX)
        return tsr_error_set(err, TSR_E_RANGE, "%s: tokenizer.ggml.tokens has %u entries (max %d)",
                             name, d->n_tokens, INT32_MAX);
    tsr_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    t->kind = kind;
    int rc = tsr_tokenizer_set_vocab(t, name, d->n_tokens, d->tokens, d->scores, d->types, false,
                                     err);
    if (rc != TSR_OK) goto fail;

    bool spm = kind == TSR_TOKENIZER_SPM;
    uint32_t n = d->n_tokens;
    if ((rc = check_id(name, "tokenizer.ggml.bos_token_id", d->bos_id, spm ? 1 : 11, n, &t->bos,
                       err)) ||
        (rc = check_id(name, "tokenizer.ggml.eos_token_id", d->eos_id, spm ? 2 : 11, n, &t->eos,
                       err)) ||
        (rc = check_id(name, "tokenizer.ggml.unknown_token_id", d->unk_id, spm ? 0 : -1, n,
                       &t->unk, err)) ||
        (rc = check_id(name, "tokenizer.ggml.padding_token_id", d->pad_id, -1, n, &t->pad,
                       err)) ||
        (rc = check_id(name, "tokenizer.ggml.eot_token_id", d->eot_id, -1, n, &t->eot, err)) ||
        (rc = check_id(name, "tokenizer.ggml.eom_token_id", d->eom_id, -1, n, &t->eom, err)))
        goto fail;

    t->add_bos = spm;
    t->add_eos = false;
    t->add_space_prefix = spm;
    for (int b = 0; b < 256; b++) t->byte_tokens[b] = -1;
    if (spm) {
        for (int b = 0; b < 256; b++) {
            char buf[8];
            static const char hex[] = "0123456789ABCDEF";
            buf[0] = '<', buf[1] = '0', buf[2] = 'x', buf[3] = hex[b >> 4], buf[4] = hex[b & 15];
            buf[5] = '>';
            t->byte_tokens[b] = tsr_strmap_get(&t->vocab, buf, 6);
        }
    } else {
        if ((rc = tsr_bpe_pre_create(t, name, d->pre, err)) != TSR_OK) goto fail;
        if ((rc = tsr_bpe_set_merges(t, name, d->n_merges, d->merges, err)) != TSR_OK) goto fail;
        for (int b = 0; b < 256; b++) {
            char buf[2];
            size_t l = tsr_bpe_byte_to_utf8((uint8_t)b, buf);
            t->byte_tokens[b] = tsr_strmap_get(&t->vocab, buf, l);
        }
    }
    if (d->add_bos >= 0) t->add_bos = d->add_bos;
    if (d->add_eos >= 0) t->add_eos = d->add_eos;
    if (d->add_space_prefix >= 0) t->add_space_prefix = d->add_space_prefix;
    if (t->add_bos && t->bos < 0) {
        rc = tsr_error_set(err, TSR_E_INVALID,
                           "%s: tokenizer.ggml.add_bos_token is true but there is no BOS token",
                           name);
        goto fail;
    }
    if (t->add_eos && t->eos < 0) {
        rc = tsr_error_set(err, TSR_E_INVALID,
                           "%s: tokenizer.ggml.add_eos_token is true but there is no EOS token",
                           name);
        goto fail;
    }

    uint32_t ns = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t ty = t->types[i];
        if (ty == TSR_TOKEN_TYPE_CONTROL || ty == TSR_TOKEN_TYPE_USER_DEFINED ||
            ty == TSR_TOKEN_TYPE_UNKNOWN)
            ns += tsr_tok_text(t, (int32_t)i).len > 0;
    }
    t->specials = malloc((ns ? ns : 1) * sizeof *t->specials);
    if (!t->specials) {
        rc = tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
        goto fail;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint8_t ty = t->types[i];
        if ((ty == TSR_TOKEN_TYPE_CONTROL || ty == TSR_TOKEN_TYPE_USER_DEFINED ||
             ty == TSR_TOKEN_TYPE_UNKNOWN) && tsr_tok_text(t, (int32_t)i).len > 0)
            t->specials[t->n_specials++] = (int32_t)i;
    }
    qsort_r(t->specials, t->n_specials, sizeof *t->specials, cmp_special_len, t);
    *out = t;
    return TSR_OK;
fail:
    tsr_tokenizer_free(t);
    return rc;
}

void tsr_tokenizer_free(tsr_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->scores);
    free(t->types);
    free(t->specials);
    tsr_strmap_free(&t->vocab);
    tsr_strmap_free(&t->merges);
    tsr_bpe_pre_free(t->pre);
    free(t);
}

/* ---------------------------------------------------------------------------------------- */
/* GGUF adapter                                                                              */

static int gguf_str_array(const tsr_gguf *g, const char *key, bool required, uint64_t *n,
                          tsr_tok_str **out, tsr_error *err) {
    const char *path = tsr_gguf_path(g);
    *out = NULL;
    *n = 0;
    if (tsr_gguf_find_key(g, key) < 0) {
        if (!required) return TSR_OK;
        return tsr_error_set(err, TSR_E_INVALID, "%s: key %s is missing", path, key);
    }
    tsr_gguf_type et;
    int64_t k;
    if (!tsr_gguf_get_arr(g, key, &k, &et, n, err)) return TSR_E_INVALID;
    if (et != TSR_GGUF_STRING)
        return tsr_error_set(err, TSR_E_INVALID, "%s: key %s: expected an array of strings",
                             path, key);
    if (*n > UINT32_MAX)
        return tsr_error_set(err, TSR_E_RANGE, "%s: key %s has %llu entries", path, key,
                             (unsigned long long)*n);
    *out = malloc((*n ? *n : 1) * sizeof **out);
    if (!*out) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    for (uint64_t i = 0; i < *n; i++) {
        tsr_gguf_str s = tsr_gguf_arr_str(g, k, i);
        (*out)[i] = (tsr_tok_str){s.ptr, (size_t)s.len};
    }
    return TSR_OK;
}

/* Reads a numeric array of exactly n entries (or none when absent). */
static int gguf_num_array(const tsr_gguf *g, const char *key, uint64_t n, bool as_float,
                          void **out, tsr_error *err) {
    const char *path = tsr_gguf_path(g);
    *out = NULL;
    if (tsr_gguf_find_key(g, key) < 0) return TSR_OK;
    tsr_gguf_type et;
    uint64_t m;
    int64_t k;
    if (!tsr_gguf_get_arr(g, key, &k, &et, &m, err)) return TSR_E_INVALID;
    if (et == TSR_GGUF_STRING || et == TSR_GGUF_ARRAY || et == TSR_GGUF_BOOL)
        return tsr_error_set(err, TSR_E_INVALID, "%s: key %s: expected an array of numbers",
                             path, key);
    if (m != n)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: key %s has %llu entries, tokenizer.ggml.tokens has %llu", path,
                             key, (unsigned long long)m, (unsigned long long)n);
    *out = malloc((n ? n : 1) * 4);
    if (!*out) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    for (uint64_t i = 0; i < n; i++) {
        if (as_float) {
            ((float *)*out)[i] = (float)tsr_gguf_arr_f64(g, k, i);
        } else {
            int64_t v = tsr_gguf_arr_i64(g, k, i);
            ((int32_t *)*out)[i] = v < INT32_MIN || v > INT32_MAX ? 0 : (int32_t)v;
        }
    }
    return TSR_OK;
}

static int gguf_cstr(const tsr_gguf *g, const char *key, char *buf, size_t cap, bool *present,
                     tsr_error *err) {
    *present = false;
    buf[0] = 0;
    if (tsr_gguf_find_key(g, key) < 0) return TSR_OK;
    tsr_gguf_str s;
    if (!tsr_gguf_get_str(g, key, &s, err)) return TSR_E_INVALID;
    size_t l = s.len < cap - 1 ? (size_t)s.len : cap - 1;
    memcpy(buf, s.ptr, l);
    buf[l] = 0;
    if (memchr(buf, 0, l)) buf[strlen(buf)] = 0;
    *present = true;
    return TSR_OK;
}

/* A special id: absent or outside the vocabulary keeps the default, as llama.cpp does (files
 * in the wild store 4294967295 for "none"). */
static int32_t gguf_special_id(const tsr_gguf *g, const char *key, uint64_t n) {
    uint64_t v = tsr_gguf_u64_or(g, key, UINT64_MAX);
    return v < n ? (int32_t)v : -2;
}

static int8_t gguf_flag(const tsr_gguf *g, const char *key) {
    if (tsr_gguf_find_key(g, key) < 0) return -1;
    return tsr_gguf_bool_or(g, key, false) ? 1 : 0;
}

int tsr_tokenizer_from_gguf(const tsr_gguf *g, tsr_tokenizer **out, tsr_error *err) {
    *out = NULL;
    const char *path = tsr_gguf_path(g);
    char model[64], pre[64];
    bool has_model, has_pre;
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    tsr_tok_str *tokens = NULL, *merges = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    uint64_t n = 0, n_merges = 0;
    int rc;
    if ((rc = gguf_cstr(g, "tokenizer.ggml.model", model, sizeof model, &has_model, err)))
        return rc;
    if (!has_model)
        return tsr_error_set(err, TSR_E_INVALID, "%s: key tokenizer.ggml.model is missing",
                             path);
    if ((rc = gguf_cstr(g, "tokenizer.ggml.pre", pre, sizeof pre, &has_pre, err))) return rc;
    if ((rc = gguf_str_array(g, "tokenizer.ggml.tokens", true, &n, &tokens, err))) goto done;
    if ((rc = gguf_num_array(g, "tokenizer.ggml.scores", n, true, (void **)&scores, err)))
        goto done;
    if ((rc = gguf_num_array(g, "tokenizer.ggml.token_type", n, false, (void **)&types, err)))
        goto done;
    if (strcmp(model, "gpt2") == 0) {
        if ((rc = gguf_str_array(g, "tokenizer.ggml.merges", true, &n_merges, &merges, err)))
            goto done;
    }
    d.name = path;
    d.model = model;
    d.pre = has_pre ? pre : NULL;
    d.n_tokens = (uint32_t)n;
    d.tokens = tokens;
    d.scores = scores;
    d.types = types;
    d.n_merges = (uint32_t)n_merges;
    d.merges = merges;
    d.bos_id = gguf_special_id(g, "tokenizer.ggml.bos_token_id", n);
    d.eos_id = gguf_special_id(g, "tokenizer.ggml.eos_token_id", n);
    d.unk_id = gguf_special_id(g, "tokenizer.ggml.unknown_token_id", n);
    d.pad_id = gguf_special_id(g, "tokenizer.ggml.padding_token_id", n);
    d.eot_id = gguf_special_id(g, "tokenizer.ggml.eot_token_id", n);
    d.eom_id = gguf_special_id(g, "tokenizer.ggml.eom_token_id", n);
    d.add_bos = gguf_flag(g, "tokenizer.ggml.add_bos_token");
    d.add_eos = gguf_flag(g, "tokenizer.ggml.add_eos_token");
    d.add_space_prefix = gguf_flag(g, "tokenizer.ggml.add_space_prefix");
    rc = tsr_tokenizer_create(&d, out, err);
done:
    free(tokens);
    free(merges);
    free(scores);
    free(types);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Getters                                                                                   */

tsr_tokenizer_kind tsr_tokenizer_get_kind(const tsr_tokenizer *t) { return t->kind; }
uint32_t tsr_tokenizer_n_vocab(const tsr_tokenizer *t) { return t->n_vocab; }
int32_t tsr_tokenizer_bos(const tsr_tokenizer *t) { return t->bos; }
int32_t tsr_tokenizer_eos(const tsr_tokenizer *t) { return t->eos; }
bool tsr_tokenizer_add_bos(const tsr_tokenizer *t) { return t->add_bos; }

static bool in_vocab(const tsr_tokenizer *t, int32_t id) {
    return id >= 0 && (uint32_t)id < t->n_vocab;
}

bool tsr_token_is_eog(const tsr_tokenizer *t, int32_t id) {
    if (!in_vocab(t, id)) return false;
    if (id == t->eos || id == t->eot || id == t->eom) return true;
    if (t->kind == TSR_TOKENIZER_LLAMA2C) return false;
    tsr_tok_str s = tsr_tok_text(t, id);
    for (size_t i = 0; i < sizeof eog_texts / sizeof eog_texts[0]; i++)
        if (strlen(eog_texts[i]) == s.len && memcmp(eog_texts[i], s.ptr, s.len) == 0) return true;
    return false;
}

tsr_tok_str tsr_token_text(const tsr_tokenizer *t, int32_t id) {
    if (!in_vocab(t, id)) return (tsr_tok_str){NULL, 0};
    return tsr_tok_text(t, id);
}

tsr_token_type tsr_token_get_type(const tsr_tokenizer *t, int32_t id) {
    return in_vocab(t, id) ? (tsr_token_type)t->types[id] : TSR_TOKEN_TYPE_UNDEFINED;
}

/* ---------------------------------------------------------------------------------------- */
/* Tokenizing                                                                                */

/* A part of the input: raw text (id < 0) or a special token matched in it. */
typedef struct fragment {
    size_t off, len;
    int32_t id;
} fragment;

typedef struct fragments {
    fragment *v;
    size_t n, cap;
} fragments;

static int frag_push(fragments *f, size_t off, size_t len, int32_t id) {
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        fragment *v = realloc(f->v, cap * sizeof *v);
        if (!v) return TSR_E_NOMEM;
        f->v = v;
        f->cap = cap;
    }
    f->v[f->n++] = (fragment){off, len, id};
    return TSR_OK;
}

/* Splits the raw fragments on every occurrence of the special tokens, longest first, as
 * llama.cpp's tokenizer_st_partition does. */
static int partition(const tsr_tokenizer *t, const char *text, size_t len, bool parse_special,
                     fragments *out) {
    fragments cur = {0}, next = {0};
    int rc = TSR_OK;
    if (len && (rc = frag_push(&cur, 0, len, -1))) goto done;
    for (uint32_t s = 0; s < t->n_specials && cur.n; s++) {
        int32_t id = t->specials[s];
        uint8_t ty = t->types[id];
        if (!parse_special && ty != TSR_TOKEN_TYPE_USER_DEFINED) continue;
        tsr_tok_str st = tsr_tok_text(t, id);
        next.n = 0;
        for (size_t i = 0; i < cur.n; i++) {
            fragment f = cur.v[i];
            if (f.id >= 0 || f.len < st.len) {
                if ((rc = frag_push(&next, f.off, f.len, f.id))) goto done;
                continue;
            }
            size_t pos = f.off, end = f.off + f.len;
            for (;;) {
                const char *hit = memmem(text + pos, end - pos, st.ptr, st.len);
                if (!hit) break;
                size_t h = (size_t)(hit - text);
                if (h > pos && (rc = frag_push(&next, pos, h - pos, -1))) goto done;
                if ((rc = frag_push(&next, h, st.len, id))) goto done;
                pos = h + st.len;
            }
            if (pos < end && (rc = frag_push(&next, pos, end - pos, -1))) goto done;
        }
        fragments tmp = cur;
        cur = next;
        next = tmp;
    }
    *out = cur;
    cur.v = NULL;
done:
    free(cur.v);
    free(next.v);
    return rc;
}

static int tokenize_ids(const tsr_tokenizer *t, const char *text, size_t len, bool add_special,
                        bool parse_special, tsr_ids *ids) {
    int rc = TSR_OK;
    if (t->kind == TSR_TOKENIZER_LLAMA2C) {
        if (add_special && t->bos >= 0 && (rc = tsr_ids_push(ids, t->bos))) return rc;
        return tsr_llama2c_tokenize(t, text, len, ids);
    }
    fragments fr = {0};
    if ((rc = partition(t, text, len, parse_special, &fr))) return rc;
    if (add_special && t->add_bos && (rc = tsr_ids_push(ids, t->bos))) goto done;
    bool prev_special = true;
    for (size_t i = 0; i < fr.n; i++) {
        fragment f = fr.v[i];
        if (f.id >= 0) {
            if ((rc = tsr_ids_push(ids, f.id))) goto done;
            prev_special = true;
            continue;
        }
        if (t->kind == TSR_TOKENIZER_SPM) {
            /* SentencePiece's dummy prefix goes before the text and after each special token */
            char *buf = malloc(f.len + 1);
            if (!buf) {
                rc = TSR_E_NOMEM;
                goto done;
            }
            size_t bl = 0;
            if (t->add_space_prefix && prev_special) buf[bl++] = ' ';
            memcpy(buf + bl, text + f.off, f.len);
            rc = tsr_spm_tokenize(t, buf, bl + f.len, ids);
            free(buf);
        } else {
            rc = tsr_bpe_tokenize(t, text + f.off, f.len, ids);
        }
        if (rc) goto done;
        prev_special = false;
    }
    if (add_special && t->add_eos && (rc = tsr_ids_push(ids, t->eos))) goto done;
done:
    free(fr.v);
    return rc;
}

int tsr_tokenize(const tsr_tokenizer *t, const char *text, size_t len, bool add_special,
                 bool parse_special, int32_t **ids_out, size_t *n_out, tsr_error *err) {
    tsr_ids ids = {0};
    *ids_out = NULL;
    *n_out = 0;
    int rc = tokenize_ids(t, text, len, add_special, parse_special, &ids);
    if (rc) {
        free(ids.v);
        return tsr_error_set(err, rc, "tokenize: out of memory for %zu bytes of text", len);
    }
    if (!ids.v && !(ids.v = malloc(sizeof *ids.v)))
        return tsr_error_set(err, TSR_E_NOMEM, "tokenize: out of memory");
    *ids_out = ids.v;
    *n_out = ids.n;
    return TSR_OK;
}

int tsr_tokenize_buf(const tsr_tokenizer *t, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t *out, size_t cap, size_t *n_out,
                     tsr_error *err) {
    int32_t *ids;
    int rc = tsr_tokenize(t, text, len, add_special, parse_special, &ids, n_out, err);
    if (rc) return rc;
    memcpy(out, ids, (*n_out < cap ? *n_out : cap) * sizeof *ids);
    free(ids);
    if (*n_out > cap)
        return tsr_error_set(err, TSR_E_RANGE, "tokenize: %zu tokens do not fit in %zu", *n_out,
                             cap);
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Detokenizing                                                                              */

/* The piece of a byte-level BPE token: NORMAL text is byte-decoded, USER_DEFINED is copied
 * as is, the others (control, unknown, unused) print nothing, as in llama.cpp. */
static size_t bpe_piece(const tsr_tokenizer *t, int32_t id, char *out) {
    tsr_tok_str s = tsr_tok_text(t, id);
    switch (t->types[id]) {
    case TSR_TOKEN_TYPE_NORMAL:
        return tsr_bpe_decode_piece(s.ptr, s.len, out);
    case TSR_TOKEN_TYPE_USER_DEFINED:
        memcpy(out, s.ptr, s.len);
        return s.len;
    default:
        return 0;
    }
}

int64_t tsr_token_to_piece(const tsr_tokenizer *t, int32_t prev_id, int32_t id, char *buf,
                           size_t cap) {
    if (!in_vocab(t, id)) return -1;
    char small[64];
    size_t need = tsr_tok_text(t, id).len + 4;
    char *tmp = need <= sizeof small ? small : malloc(need);
    if (!tmp) return -1;
    size_t n;
    switch (t->kind) {
    case TSR_TOKENIZER_SPM: n = tsr_spm_piece(t, prev_id, id, tmp); break;
    case TSR_TOKENIZER_BPE: n = bpe_piece(t, id, tmp); break;
    default: n = tsr_llama2c_piece(t, prev_id, id, tmp); break;
    }
    if (buf && cap) memcpy(buf, tmp, n < cap ? n : cap);
    if (tmp != small) free(tmp);
    return (int64_t)n;
}

int tsr_detokenize(const tsr_tokenizer *t, const int32_t *ids, size_t n, char **text_out,
                   size_t *len_out, tsr_error *err) {
    *text_out = NULL;
    *len_out = 0;
    size_t cap = 0;
    for (size_t i = 0; i < n; i++) {
        if (!in_vocab(t, ids[i]))
            return tsr_error_set(err, TSR_E_RANGE,
                                 "detokenize: id %d at position %zu is outside the vocabulary "
                                 "of %u tokens", ids[i], i, t->n_vocab);
        cap += tsr_tok_text(t, ids[i]).len + 4;
    }
    char *s = malloc(cap + 1);
    if (!s) return tsr_error_set(err, TSR_E_NOMEM, "detokenize: out of memory");
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        len += (size_t)tsr_token_to_piece(t, i ? ids[i - 1] : -1, ids[i], s + len, cap - len);
    s[len] = 0;
    *text_out = s;
    *len_out = len;
    return TSR_OK;
}
