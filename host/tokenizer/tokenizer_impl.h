/* Inside the tokenizers: shared by tokenizer.c (vocabulary, special tokens, the public
 * entry points), tokenizer_spm.c, tokenizer_bpe.c and tokenizer_llama2c.c. */
#ifndef TSR_HOST_TOKENIZER_IMPL_H
#define TSR_HOST_TOKENIZER_IMPL_H

#include "tokenizer/tokenizer.h"

/* A growable id list. */
typedef struct tsr_ids {
    int32_t *v;
    size_t n, cap;
} tsr_ids;

int tsr_ids_push(tsr_ids *ids, int32_t id);

/* Byte string -> int32 map (open addressing, keys copied into an arena). */
typedef struct tsr_strmap_slot {
    uint64_t hash;
    uint32_t off, len; /* key in the arena */
    int32_t val;
    uint32_t used;
} tsr_strmap_slot;

typedef struct tsr_strmap {
    tsr_strmap_slot *slots;
    size_t mask, count;
    char *arena;
    size_t arena_len, arena_cap;
} tsr_strmap;

int tsr_strmap_init(tsr_strmap *m, size_t expected);
void tsr_strmap_free(tsr_strmap *m);
/* Inserts key -> val unless the key is present; *existing gets the value already there
 * (or -1). Returns TSR_OK or TSR_E_NOMEM. */
int tsr_strmap_put(tsr_strmap *m, const char *key, size_t len, int32_t val, int32_t *existing);
/* -1 when absent. */
int32_t tsr_strmap_get(const tsr_strmap *m, const char *key, size_t len);

typedef struct tsr_bpe_pre tsr_bpe_pre; /* compiled pre-tokenizer regexes (tokenizer_bpe.c) */

struct tsr_tokenizer {
    tsr_tokenizer_kind kind;
    uint32_t n_vocab;
    char *text;           /* all token texts, back to back */
    uint64_t *text_off;   /* [n_vocab + 1] */
    float *scores;        /* [n_vocab] */
    uint8_t *types;       /* [n_vocab] tsr_token_type */
    tsr_strmap vocab;     /* text -> id */
    tsr_strmap merges;    /* BPE: (u32 left length, left, right) -> rank */
    int32_t byte_tokens[256]; /* SPM: <0xNN>; BPE: the byte-encoded character; -1 if none */
    int32_t *specials;    /* ids matched in the text before tokenizing, longest first */
    uint32_t n_specials;
    int32_t bos, eos, unk, pad, eot, eom;
    bool add_bos, add_eos, add_space_prefix, ignore_merges;
    tsr_bpe_pre *pre;
};

static inline tsr_tok_str tsr_tok_text(const tsr_tokenizer *t, int32_t id) {
    tsr_tok_str s = {t->text + t->text_off[id], (size_t)(t->text_off[id + 1] - t->text_off[id])};
    return s;
}

/* Builds the vocabulary arrays and map of `t` from n tokens. A duplicate text is an error
 * unless allow_duplicates (then the lowest id keeps the text). */
int tsr_tokenizer_set_vocab(tsr_tokenizer *t, const char *name, uint32_t n,
                            const tsr_tok_str *tokens, const float *scores,
                            const int32_t *types, bool allow_duplicates, tsr_error *err);

/* Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes). */
static inline size_t tsr_utf8_len(unsigned char c) {
    static const uint8_t lens[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lens[c >> 4];
}

/* Per-kind parts. Each appends to `out` the ids of one raw-text fragment. */
int tsr_spm_tokenize(const tsr_tokenizer *t, const char *text, size_t len, tsr_ids *out);
int tsr_bpe_tokenize(const tsr_tokenizer *t, const char *text, size_t len, tsr_ids *out);
int tsr_llama2c_tokenize(const tsr_tokenizer *t, const char *text, size_t len, tsr_ids *out);

/* BPE setup: the pre-tokenizer for `pre` (NULL/"" = default) and the flags it implies. */
int tsr_bpe_pre_create(tsr_tokenizer *t, const char *name, const char *pre, tsr_error *err);
void tsr_bpe_pre_free(tsr_bpe_pre *p);
int tsr_bpe_set_merges(tsr_tokenizer *t, const char *name, uint32_t n, const tsr_tok_str *merges,
                       tsr_error *err);
/* GPT-2's byte-to-unicode mapping: the UTF-8 (1 or 2 bytes) of byte b, and back. */
size_t tsr_bpe_byte_to_utf8(uint8_t b, char out[2]);
/* Decodes a byte-encoded piece into raw bytes; returns the decoded length (<= len).
 * Characters outside the mapping are copied unchanged. */
size_t tsr_bpe_decode_piece(const char *s, size_t len, char *out);

/* Pieces, written to out (which holds at least the token text length + 1 bytes). */
size_t tsr_spm_piece(const tsr_tokenizer *t, int32_t prev, int32_t id, char *out);
size_t tsr_llama2c_piece(const tsr_tokenizer *t, int32_t prev, int32_t id, char *out);

#endif
