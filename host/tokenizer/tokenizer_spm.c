/* SentencePiece-style tokenizer (GGUF model "llama"), as llama.cpp's llm_tokenizer_spm:
 * the text is split into UTF-8 characters, then the adjacent pair whose concatenation is the
 * best-scoring vocabulary entry is merged (leftmost on ties) until no pair is in the
 * vocabulary; characters that never became a token fall back to <0xNN> byte tokens. */
#include "tokenizer/tokenizer_impl.h"

#include <stdlib.h>
#include <string.h>

typedef struct symbol {
    int32_t prev, next;
    size_t off, n; /* bytes of the (escaped) text; n = 0 once merged into its left neighbour */
} symbol;

typedef struct bigram {
    int32_t left, right;
    float score;
    size_t size;
} bigram;

/* Max-heap on score, then on the leftmost position. */
static bool bigram_before(const bigram *a, const bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct heap {
    bigram *v;
    size_t n, cap;
} heap;

static int heap_push(heap *h, bigram b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bigram *v = realloc(h->v, cap * sizeof *v);
        if (!v) return TSR_E_NOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_before(&b, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = b;
    return TSR_OK;
}

static bigram heap_pop(heap *h) {
    bigram top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && bigram_before(&h->v[c + 1], &h->v[c])) c++;
        if (!bigram_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

static int try_bigram(const tsr_tokenizer *t, const char *text, const symbol *sym, heap *h,
                      int32_t left, int32_t right) {
    if (left < 0 || right < 0) return TSR_OK;
    size_t size = sym[left].n + sym[right].n;
    int32_t id = tsr_strmap_get(&t->vocab, text + sym[left].off, size);
    if (id < 0) return TSR_OK;
    return heap_push(h, (bigram){left, right, t->scores[id], size});
}

/* One symbol that is not a token: its bytes as byte tokens (or the unknown token). */
static int byte_fallback(const tsr_tokenizer *t, const char *s, size_t n, tsr_ids *out) {
    for (size_t j = 0; j < n; j++) {
        unsigned char b = (unsigned char)s[j];
        int32_t id = t->byte_tokens[b];
        if (id < 0) id = tsr_strmap_get(&t->vocab, s + j, 1);
        if (id < 0) id = t->unk;
        if (id >= 0) {
            int rc = tsr_ids_push(out, id);
            if (rc) return rc;
        }
    }
    return TSR_OK;
}

int tsr_spm_tokenize(const tsr_tokenizer *t, const char *raw, size_t raw_len, tsr_ids *out) {
    /* spaces are written as U+2581 in the vocabulary */
    size_t n_spaces = 0;
    for (size_t i = 0; i < raw_len; i++) n_spaces += raw[i] == ' ';
    size_t len = raw_len + 2 * n_spaces;
    char *text = malloc(len ? len : 1);
    size_t n_sym = 0;
    /* one symbol per byte at most: a lead byte before a U+2581 may swallow part of it */
    symbol *sym = malloc((len ? len : 1) * sizeof *sym);
    heap h = {0};
    int rc = TSR_E_NOMEM;
    if (!text || !sym) goto done;
    for (size_t i = 0, o = 0; i < raw_len; i++) {
        if (raw[i] == ' ') {
            memcpy(text + o, "\xe2\x96\x81", 3);
            o += 3;
        } else {
            text[o++] = raw[i];
        }
    }
    for (size_t off = 0; off < len;) {
        size_t n = tsr_utf8_len((unsigned char)text[off]);
        if (n > len - off) n = len - off;
        sym[n_sym] = (symbol){(int32_t)n_sym - 1, off + n == len ? -1 : (int32_t)n_sym + 1, off, n};
        n_sym++;
        off += n;
    }
    rc = TSR_OK;
    for (size_t i = 1; i < n_sym && !rc; i++)
        rc = try_bigram(t, text, sym, &h, (int32_t)i - 1, (int32_t)i);
    while (h.n && !rc) {
        bigram b = heap_pop(&h);
        symbol *l = &sym[b.left], *r = &sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = b.left;
        rc = try_bigram(t, text, sym, &h, l->prev, b.left);
        if (!rc) rc = try_bigram(t, text, sym, &h, b.left, l->next);
    }
    for (int32_t i = n_sym ? 0 : -1; i >= 0 && !rc; i = sym[i].next) {
        int32_t id = tsr_strmap_get(&t->vocab, text + sym[i].off, sym[i].n);
        rc = id >= 0 ? tsr_ids_push(out, id) : byte_fallback(t, text + sym[i].off, sym[i].n, out);
    }
done:
    free(text);
    free(sym);
    free(h.v);
    return rc;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

size_t tsr_spm_piece(const tsr_tokenizer *t, int32_t prev, int32_t id, char *out) {
    tsr_tok_str s = tsr_tok_text(t, id);
    switch (t->types[id]) {
    case TSR_TOKEN_TYPE_NORMAL: {
        size_t n = 0;
        for (size_t i = 0; i < s.len; i++) {
            if (i + 3 <= s.len && memcmp(s.ptr + i, "\xe2\x96\x81", 3) == 0) {
                out[n++] = ' ';
                i += 2;
            } else {
                out[n++] = s.ptr[i];
            }
        }
        /* the dummy prefix added when tokenizing is not part of the text */
        if (t->add_space_prefix && (prev < 0 || prev == t->bos) && n && out[0] == ' ') {
            memmove(out, out + 1, n - 1);
            n--;
        }
        return n;
    }
    case TSR_TOKEN_TYPE_USER_DEFINED:
        memcpy(out, s.ptr, s.len);
        return s.len;
    case TSR_TOKEN_TYPE_UNKNOWN:
        memcpy(out, "\xe2\x96\x85", 3); /* U+2585, llama.cpp's mark for an unknown piece */
        return 3;
    case TSR_TOKEN_TYPE_BYTE:
        if (s.len == 6 && memcmp(s.ptr, "<0x", 3) == 0 && s.ptr[5] == '>' &&
            hexval(s.ptr[3]) >= 0 && hexval(s.ptr[4]) >= 0) {
            out[0] = (char)(hexval(s.ptr[3]) * 16 + hexval(s.ptr[4]));
            return 1;
        }
        return 0;
    default:
        return 0;
    }
}
