/* Tokenizers: text <-> token ids.
 *
 * Three kinds, one interface:
 *   - SentencePiece-style (GGUF tokenizer.ggml.model = "llama"): spaces become U+2581, the
 *     best-scoring pair of adjacent pieces is merged until none is in the vocabulary, pieces
 *     outside the vocabulary fall back to <0xNN> byte tokens. Matches llama.cpp.
 *   - byte-level BPE (model "gpt2"): a pre-tokenizer (PCRE2 regexes chosen by
 *     tokenizer.ggml.pre) splits the text into words, each word is mapped through GPT-2's
 *     byte-to-unicode table and merged by rank from tokenizer.ggml.merges. Matches llama.cpp.
 *   - llama2.c tok*.bin: encoded and decoded exactly as llama2.c's run.c does.
 *
 * A tokenizer is built from a plain description (tsr_tokenizer_desc), from the
 * tokenizer.ggml.* keys of a GGUF file, or from a tok*.bin file. Once built it is immutable:
 * every function below may be called from any thread concurrently. */
#ifndef TSR_HOST_TOKENIZER_H
#define TSR_HOST_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/error.h"
#include "files/gguf.h"

typedef struct tsr_tokenizer tsr_tokenizer;

/* Token types, numbered as GGUF's tokenizer.ggml.token_type. */
typedef enum tsr_token_type {
    TSR_TOKEN_TYPE_UNDEFINED = 0,
    TSR_TOKEN_TYPE_NORMAL = 1,
    TSR_TOKEN_TYPE_UNKNOWN = 2,
    TSR_TOKEN_TYPE_CONTROL = 3,
    TSR_TOKEN_TYPE_USER_DEFINED = 4,
    TSR_TOKEN_TYPE_UNUSED = 5,
    TSR_TOKEN_TYPE_BYTE = 6
} tsr_token_type;

typedef enum tsr_tokenizer_kind {
    TSR_TOKENIZER_SPM = 1,     /* "llama" */
    TSR_TOKENIZER_BPE = 2,     /* "gpt2" */
    TSR_TOKENIZER_LLAMA2C = 3  /* tok*.bin */
} tsr_tokenizer_kind;

/* A byte string, not NUL-terminated. */
typedef struct tsr_tok_str {
    const char *ptr;
    size_t len;
} tsr_tok_str;

/* What a tokenizer is built from; mirrors the tokenizer.ggml.* keys. Everything is copied by
 * tsr_tokenizer_create, so the arrays need only live for the call. */
typedef struct tsr_tokenizer_desc {
    const char *name;           /* used in messages (the file path); NULL = "tokenizer" */
    const char *model;          /* "llama" or "gpt2" */
    const char *pre;            /* BPE pre-tokenizer name; NULL or "" = "default" */
    uint32_t n_tokens;
    const tsr_tok_str *tokens;  /* [n_tokens] */
    const float *scores;        /* [n_tokens] or NULL (all 0) */
    const int32_t *types;       /* [n_tokens] tsr_token_type, or NULL (all NORMAL) */
    uint32_t n_merges;          /* BPE only */
    const tsr_tok_str *merges;  /* [n_merges] "left right", rank = index */
    /* Special ids; -1 = none, -2 = the model's default (llama: bos 1, eos 2, unk 0;
     * gpt2: bos = eos = 11, as llama.cpp). Ids outside the vocabulary are an error. */
    int32_t bos_id, eos_id, unk_id, pad_id, eot_id, eom_id;
    /* -1 = the default of the model and pre-tokenizer (as llama.cpp), 0 = no, 1 = yes. */
    int8_t add_bos, add_eos, add_space_prefix;
} tsr_tokenizer_desc;

/* Fills `d` with "use the defaults" (ids -2, flags -1, the rest zero). */
void tsr_tokenizer_desc_init(tsr_tokenizer_desc *d);

/* Builds a tokenizer. On failure returns a negative tsr_status, *out = NULL, and `err` holds
 * one line naming desc->name and the key at fault, e.g.
 * "x.gguf: tokenizer.ggml.pre 'foo' is not supported; known: default, llama3, ...". */
int tsr_tokenizer_create(const tsr_tokenizer_desc *desc, tsr_tokenizer **out, tsr_error *err);

/* Reads tokenizer.ggml.{model,pre,tokens,scores,token_type,merges,bos_token_id,
 * eos_token_id,unknown_token_id,padding_token_id,eot_token_id,eom_token_id,add_bos_token,
 * add_eos_token,add_space_prefix}. The tokenizer does not keep `g`. */
int tsr_tokenizer_from_gguf(const tsr_gguf *g, tsr_tokenizer **out, tsr_error *err);

/* Reads a llama2.c tok*.bin (int32 max_token_length, then per token float32 score, int32
 * length, bytes). n_vocab is the model's vocabulary size (the file does not store it): the
 * file must hold exactly that many tokens. 0 = read tokens until the end of the file. */
int tsr_tokenizer_from_llama2c(const char *path, uint32_t n_vocab, tsr_tokenizer **out,
                               tsr_error *err);
/* Same over bytes in memory (copied); `name` is used in messages. */
int tsr_tokenizer_from_llama2c_memory(const void *data, size_t size, const char *name,
                                      uint32_t n_vocab, tsr_tokenizer **out, tsr_error *err);

void tsr_tokenizer_free(tsr_tokenizer *tok);

tsr_tokenizer_kind tsr_tokenizer_get_kind(const tsr_tokenizer *tok);
uint32_t tsr_tokenizer_n_vocab(const tsr_tokenizer *tok);
int32_t tsr_tokenizer_bos(const tsr_tokenizer *tok); /* -1 if none */
int32_t tsr_tokenizer_eos(const tsr_tokenizer *tok); /* -1 if none */
bool tsr_tokenizer_add_bos(const tsr_tokenizer *tok);
/* True for eos, eot, eom (and the end-of-turn tokens llama.cpp recognises by their text). */
bool tsr_token_is_eog(const tsr_tokenizer *tok, int32_t id);
/* The vocabulary text of `id` (as stored: U+2581 / byte-encoded), or {NULL, 0} if out of
 * range. Valid while the tokenizer lives. */
tsr_tok_str tsr_token_text(const tsr_tokenizer *tok, int32_t id);
tsr_token_type tsr_token_get_type(const tsr_tokenizer *tok, int32_t id);

/* Text -> ids. add_special: add BOS (and EOS) when the tokenizer's metadata asks for it
 * (llama2.c: BOS always, as run.c). parse_special: match the text of CONTROL tokens in
 * `text` (USER_DEFINED tokens are always matched, as llama.cpp does). *ids_out is malloc'd
 * (free() it); `text` need not be valid UTF-8. */
int tsr_tokenize(const tsr_tokenizer *tok, const char *text, size_t len, bool add_special,
                 bool parse_special, int32_t **ids_out, size_t *n_out, tsr_error *err);

/* Same into a caller buffer of `cap` ids. *n_out = the number of ids the text needs; when
 * that exceeds `cap`, returns TSR_E_RANGE and only the first `cap` ids were written. */
int tsr_tokenize_buf(const tsr_tokenizer *tok, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t *ids, size_t cap, size_t *n_out,
                     tsr_error *err);

/* The text of `id` as it appears after `prev_id` (-1 = start of the text), for streaming:
 * U+2581 -> space, byte tokens -> their byte, control tokens -> nothing; SentencePiece drops
 * the prefix space of the first piece (or of the piece after BOS). llama2.c: run.c's
 * decode + safe_printf. Writes at most `cap` bytes (no NUL) and returns the piece length
 * (which may exceed `cap`: then only the first `cap` bytes were written). -1 if `id` is out
 * of range. */
int64_t tsr_token_to_piece(const tsr_tokenizer *tok, int32_t prev_id, int32_t id, char *buf,
                           size_t cap);

/* Ids -> text: the pieces of tsr_token_to_piece chained. *text_out is malloc'd and
 * NUL-terminated (free() it). Fails (TSR_E_RANGE) on an id outside the vocabulary. */
int tsr_detokenize(const tsr_tokenizer *tok, const int32_t *ids, size_t n, char **text_out,
                   size_t *len_out, tsr_error *err);

#endif
