/* llama2.c's tok*.bin tokenizer, encoded and decoded exactly as its run.c does.
 *
 * File: int32 max_token_length, then for each token: float32 score, int32 length, bytes.
 * run.c treats pieces as C strings, so a piece ends at its first NUL byte here too.
 * Encoding (run.c's encode): BOS, then a " " token when the text is not empty, then one token
 * per UTF-8 character (or its bytes as tokens byte + 3), then the adjacent pair whose
 * concatenated text is the best-scoring token is merged (leftmost on ties) until none is.
 * Decoding (run.c's decode + safe_printf): a piece after BOS loses its leading space,
 * "<0xNN>" pieces print byte NN, and a one-byte piece that is neither printable nor
 * whitespace prints nothing. */
#include "tokenizer/tokenizer_impl.h"

#include <stdlib.h>
#include <string.h>

#include "base/file.h"

/* Far above any real vocabulary (128k tokens take about 2 MiB), so a wrong file is refused
 * before it is read into memory. */
#define MAX_TOKENIZER_BYTES ((size_t)256 << 20)

static int32_t rd_i32(const unsigned char *p) {
    uint32_t v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                 (uint32_t)p[3] << 24;
    int32_t r;
    memcpy(&r, &v, 4);
    return r;
}

static float rd_f32(const unsigned char *p) {
    int32_t v = rd_i32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

int tsr_tokenizer_from_llama2c_memory(const void *data, size_t size, const char *name,
                                      uint32_t n_vocab, tsr_tokenizer **out, tsr_error *err) {
    const unsigned char *p = data;
    *out = NULL;
    if (size < 4)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: offset 0: expected a 4-byte max_token_length, the file has %zu "
                             "bytes", name, size);
    int32_t max_len = rd_i32(p);
    if (max_len <= 0 || (size_t)max_len > size)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: offset 0: max_token_length %d is not in [1, %zu] (the file size)",
                             name, max_len, size);
    /* first pass: count and check */
    uint32_t n = 0;
    size_t off = 4;
    while (n_vocab ? n < n_vocab : off < size) {
        if (size - off < 8)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: offset %zu: token %u: expected a score and a length "
                                 "(8 bytes), %zu bytes left", name, off, n, size - off);
        int32_t len = rd_i32(p + off + 4);
        if (len < 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s: offset %zu: token %u: length %d is "
                                 "negative", name, off + 4, n, len);
        if (len > max_len)
            return tsr_error_set(err, TSR_E_INVALID, "%s: offset %zu: token %u: length %d "
                                 "exceeds max_token_length %d", name, off + 4, n, len, max_len);
        if ((size_t)len > size - off - 8)
            return tsr_error_set(err, TSR_E_INVALID, "%s: offset %zu: token %u: length %d "
                                 "exceeds the %zu bytes left", name, off + 4, n, len,
                                 size - off - 8);
        off += 8 + (size_t)len;
        n++;
        if (n == INT32_MAX)
            return tsr_error_set(err, TSR_E_RANGE, "%s: offset %zu: too many tokens", name, off);
    }
    if (off < size)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: offset %zu: %zu bytes follow the %u tokens of the model's "
                             "vocabulary", name, off, size - off, n_vocab);
    if (n == 0) return tsr_error_set(err, TSR_E_INVALID, "%s: offset 4: no tokens", name);

    tsr_tok_str *tokens = malloc(n * sizeof *tokens);
    float *scores = malloc(n * sizeof *scores);
    int32_t *types = malloc(n * sizeof *types);
    tsr_tokenizer *t = calloc(1, sizeof *t);
    int rc;
    if (!tokens || !scores || !types || !t) {
        rc = tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %u tokens", name, n);
        goto done;
    }
    off = 4;
    for (uint32_t i = 0; i < n; i++) {
        size_t len = (size_t)rd_i32(p + off + 4);
        const char *s = (const char *)p + off + 8;
        const char *nul = memchr(s, 0, len);
        scores[i] = rd_f32(p + off);
        tokens[i] = (tsr_tok_str){s, nul ? (size_t)(nul - s) : len};
        types[i] = i == 1 || i == 2 ? TSR_TOKEN_TYPE_CONTROL : TSR_TOKEN_TYPE_NORMAL;
        off += 8 + len;
    }
    t->kind = TSR_TOKENIZER_LLAMA2C;
    if ((rc = tsr_tokenizer_set_vocab(t, name, n, tokens, scores, types, true, err))) goto done;
    /* run.c: BOS 1 and EOS 2, whatever the pieces say */
    t->bos = n > 1 ? 1 : -1;
    t->eos = n > 2 ? 2 : -1;
    t->unk = t->pad = t->eot = t->eom = -1;
    t->add_bos = true;
    for (int b = 0; b < 256; b++) t->byte_tokens[b] = (uint32_t)b + 3 < n ? b + 3 : -1;
    *out = t;
    t = NULL;
done:
    tsr_tokenizer_free(t);
    free(tokens);
    free(scores);
    free(types);
    return rc;
}

int tsr_tokenizer_from_llama2c(const char *path, uint32_t n_vocab, tsr_tokenizer **out,
                               tsr_error *err) {
    *out = NULL;
    char *buf;
    size_t len;
    int rc = tsr_file_read(path, MAX_TOKENIZER_BYTES, "llama2.c tokenizer", &buf, &len, err);
    if (rc < 0) return rc;
    rc = tsr_tokenizer_from_llama2c_memory(buf, len, path, n_vocab, out, err);
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Encoding                                                                                  */

typedef struct lsym {
    int32_t id, prev, next;
    uint32_t version; /* bumped on every merge, so queued pairs can tell they are stale */
} lsym;

typedef struct lpair {
    int32_t left, right, id;
    float score;
    uint32_t lver, rver;
} lpair;

static bool lpair_before(const lpair *a, const lpair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct lheap {
    lpair *v;
    size_t n, cap;
} lheap;

static int lheap_push(lheap *h, lpair x) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        lpair *v = realloc(h->v, cap * sizeof *v);
        if (!v) return TSR_E_NOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0 && lpair_before(&x, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = x;
    return TSR_OK;
}

static lpair lheap_pop(lheap *h) {
    lpair top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && lpair_before(&h->v[c + 1], &h->v[c])) c++;
        if (!lpair_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

/* Queues the pair (l, r) when their concatenated text is a token scoring above run.c's
 * floor of -1e10. */
static int try_pair(const tsr_tokenizer *t, const lsym *s, lheap *h, char **buf, size_t *cap,
                    int32_t l, int32_t r) {
    if (l < 0 || r < 0) return TSR_OK;
    tsr_tok_str a = tsr_tok_text(t, s[l].id), b = tsr_tok_text(t, s[r].id);
    if (a.len + b.len > *cap) {
        size_t nc = (a.len + b.len) * 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return TSR_E_NOMEM;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf, a.ptr, a.len);
    memcpy(*buf + a.len, b.ptr, b.len);
    int32_t id = tsr_strmap_get(&t->vocab, *buf, a.len + b.len);
    if (id < 0 || !(t->scores[id] > -1e10f)) return TSR_OK;
    return lheap_push(h, (lpair){l, r, id, t->scores[id], s[l].version, s[r].version});
}

int tsr_llama2c_tokenize(const tsr_tokenizer *t, const char *text, size_t len, tsr_ids *out) {
    const char *nul = memchr(text, 0, len); /* run.c reads a C string */
    if (nul) len = (size_t)(nul - text);
    lsym *s = malloc((len + 1) * sizeof *s);
    lheap h = {0};
    char *buf = NULL;
    size_t cap = 0, n = 0;
    int rc = TSR_E_NOMEM;
    if (!s) goto done;
    if (len) {
        int32_t sp = tsr_strmap_get(&t->vocab, " ", 1);
        if (sp >= 0) s[n++].id = sp;
    }
    for (size_t i = 0; i < len;) {
        /* a character: a lead byte and up to 3 continuation bytes */
        size_t k = 1;
        while (i + k < len && ((unsigned char)text[i + k] & 0xC0) == 0x80 && k < 4) k++;
        int32_t id = tsr_strmap_get(&t->vocab, text + i, k);
        if (id >= 0) {
            s[n++].id = id;
        } else {
            for (size_t j = 0; j < k; j++) s[n++].id = (int32_t)(unsigned char)text[i + j] + 3;
        }
        i += k;
    }
    for (size_t i = 0; i < n; i++) {
        /* a byte token beyond a small vocabulary cannot be merged or printed: run.c would
         * index out of bounds; here it is the unknown token 0 */
        if ((uint32_t)s[i].id >= t->n_vocab) s[i].id = 0;
        s[i].prev = (int32_t)i - 1;
        s[i].next = i + 1 < n ? (int32_t)i + 1 : -1;
        s[i].version = 0;
    }
    rc = TSR_OK;
    for (size_t i = 1; i < n && !rc; i++) rc = try_pair(t, s, &h, &buf, &cap, (int32_t)i - 1,
                                                          (int32_t)i);
    while (h.n && !rc) {
        lpair p = lheap_pop(&h);
        lsym *l = &s[p.left], *r = &s[p.right];
        if (l->version != p.lver || r->version != p.rver || r->id < 0 || l->next != p.right)
            continue;
        l->id = p.id;
        l->version++;
        r->id = -1;
        r->version++;
        l->next = r->next;
        if (r->next >= 0) s[r->next].prev = p.left;
        rc = try_pair(t, s, &h, &buf, &cap, l->prev, p.left);
        if (!rc) rc = try_pair(t, s, &h, &buf, &cap, p.left, l->next);
    }
    for (int32_t i = n ? 0 : -1; i >= 0 && !rc; i = s[i].next) rc = tsr_ids_push(out, s[i].id);
done:
    free(s);
    free(h.v);
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Decoding                                                                                  */

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static bool c_isspace(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

size_t tsr_llama2c_piece(const tsr_tokenizer *t, int32_t prev, int32_t id, char *out) {
    if (id == t->bos) return 0; /* run.c stops at BOS and never prints it */
    tsr_tok_str s = tsr_tok_text(t, id);
    if (prev == t->bos && s.len && s.ptr[0] == ' ') {
        s.ptr++;
        s.len--;
    }
    /* sscanf(piece, "<0x%02hhX>"): "<0x", optional whitespace, then one or two hex digits */
    if (s.len >= 4 && memcmp(s.ptr, "<0x", 3) == 0) {
        size_t i = 3;
        while (i < s.len && c_isspace((unsigned char)s.ptr[i])) i++;
        if (i < s.len && hex_digit(s.ptr[i]) >= 0) {
            int v = hex_digit(s.ptr[i++]);
            if (i < s.len && hex_digit(s.ptr[i]) >= 0) v = v * 16 + hex_digit(s.ptr[i]);
            if (v == 0) return 0; /* the piece is "" */
            s.ptr = NULL;
            out[0] = (char)v;
            s.len = 1;
        }
    }
    if (s.len == 0) return 0;
    if (s.ptr) memcpy(out, s.ptr, s.len);
    if (s.len == 1) {
        unsigned char b = (unsigned char)out[0];
        if (!((b >= 0x20 && b < 0x7F) || c_isspace(b))) return 0;
    }
    return s.len;
}
