/* Fuzz target: tokenizes arbitrary bytes with small built-in vocabularies (SentencePiece and
 * byte-level BPE, the first input byte picking the mode and the pre-tokenizer), with and
 * without special-token parsing, then detokenizes. Byte-level BPE must give the text back
 * whenever it is valid UTF-8 and holds no special token. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../gpt2_bytes.h"
#include "tokenizer/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const pres[] = {"default", "llama3", "qwen2", "deepseek-llm",
                                   "deepseek-coder", "deepseek-v3", "falcon", "starcoder",
                                   "gpt-2", "tekken", "chameleon", "gpt-4o", "superbpe",
                                   "bailingmoe", "seed-coder", "viking"};
#define N_PRES (sizeof pres / sizeof pres[0])

static tsr_tokenizer *make(int mode, const char *pre) {
    static char chars[256][8];
    static const char *const extra[] = {"\xe2\x96\x81", "\xe2\x96\x81t", "he", "the", "<s>",
                                        "</s>", "<|im_end|>", "ll", "\xc4\xa0t"};
    static const char *const merges[] = {"h e", "t he", "l l", "\xc4\xa0 t"};
    tsr_tok_str toks[256 + 9];
    float scores[256 + 9];
    int32_t types[256 + 9];
    for (int b = 0; b < 256; b++) {
        size_t n = mode ? gpt2_char(b, chars[b]) : (size_t)snprintf(chars[b], 8, "<0x%02X>", b);
        toks[b] = (tsr_tok_str){chars[b], n};
        scores[b] = 0;
        types[b] = mode ? TSR_TOKEN_TYPE_NORMAL : TSR_TOKEN_TYPE_BYTE;
    }
    for (int i = 0; i < 9; i++) {
        toks[256 + i] = (tsr_tok_str){extra[i], strlen(extra[i])};
        scores[256 + i] = -(float)i;
        types[256 + i] = i >= 4 && i <= 6 ? TSR_TOKEN_TYPE_CONTROL : TSR_TOKEN_TYPE_NORMAL;
    }
    tsr_tok_str m[4];
    for (int i = 0; i < 4; i++) m[i] = (tsr_tok_str){merges[i], strlen(merges[i])};
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    d.model = mode ? "gpt2" : "llama";
    d.pre = pre;
    d.n_tokens = 256 + 9;
    d.tokens = toks;
    d.scores = scores;
    d.types = types;
    d.n_merges = mode ? 4 : 0;
    d.merges = m;
    d.bos_id = 260;
    d.eos_id = 261;
    d.unk_id = -1;
    tsr_tokenizer *tok = NULL;
    tsr_error err;
    if (tsr_tokenizer_create(&d, &tok, &err) != TSR_OK) abort();
    return tok;
}

static bool valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t k = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
                 : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (!k || i + k > n) return false;
        uint32_t v = k == 1 ? c : c & (0x7F >> k);
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return false;
            v = v << 6 | (s[i + j] & 0x3F);
        }
        static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (v < min[k] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return false;
        i += k;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 4096) return 0;
    int mode = data[0] & 1;
    tsr_tokenizer *tok = make(mode, pres[(data[0] >> 1) % N_PRES]);
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    for (int parse = 0; parse < 2; parse++) {
        int32_t *ids;
        size_t n;
        tsr_error err;
        if (tsr_tokenize(tok, text, len, parse, parse, &ids, &n, &err) != TSR_OK) abort();
        char *s;
        size_t sl;
        if (tsr_detokenize(tok, ids, n, &s, &sl, &err) != TSR_OK) abort();
        if (mode && !parse && valid_utf8(data + 1, len) && (sl != len || memcmp(s, text, len)))
            abort();
        for (size_t i = 0; i < n; i++) {
            char piece[64];
            if (tsr_token_to_piece(tok, i ? ids[i - 1] : -1, ids[i], piece, sizeof piece) < 0)
                abort();
        }
        free(s);
        free(ids);
    }
    tsr_tokenizer_free(tok);
    return 0;
}
