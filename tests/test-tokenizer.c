/* Tokenizers on data built here: small SentencePiece and byte-level BPE vocabularies whose
 * expected ids follow by hand from the algorithms (see each test), every pre-tokenizer
 * name, special tokens, malformed tok*.bin and GGUF tokenizer metadata with their exact
 * error lines, and the load time of a 150k-token BPE vocabulary. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gguf_bytes.h"
#include "gpt2_bytes.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                   */

static void expect_ids(const tsr_tokenizer *tok, const char *text, bool add_special,
                       bool parse_special, const int32_t *want, size_t n_want) {
    int32_t *ids;
    size_t n;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_tokenize(tok, text, strlen(text), add_special, parse_special, &ids, &n,
                                  &err), TSR_OK);
    char got[1024] = "", exp[1024] = "";
    for (size_t i = 0; i < n; i++) snprintf(got + strlen(got), 16, " %d", ids[i]);
    for (size_t i = 0; i < n_want; i++) snprintf(exp + strlen(exp), 16, " %d", want[i]);
    ck_assert_msg(strcmp(got, exp) == 0, "'%s': got%s, want%s", text, got, exp);
    free(ids);
}

#define EXPECT(tok, text, add, parse, ...)                                                    \
    do {                                                                                      \
        const int32_t w_[] = {__VA_ARGS__};                                                   \
        expect_ids(tok, text, add, parse, w_, sizeof w_ / sizeof w_[0]);                      \
    } while (0)

static char *detok(const tsr_tokenizer *tok, const int32_t *ids, size_t n) {
    char *s;
    size_t len;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_detokenize(tok, ids, n, &s, &len, &err), TSR_OK);
    ck_assert_uint_eq(strlen(s), len);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* SentencePiece                                                                             */

/* ids 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF>, then the pieces below. */
static const struct {
    const char *text;
    float score;
} spm_pieces[] = {
    {"\xe2\x96\x81", -1}, {"h", -2},     {"e", -2},       {"l", -2},     {"o", -2},
    {"ll", -3},           {"he", -4},    {"llo", -5},     {"hello", -6}, {"\xe2\x96\x81hello", -7},
};
#define SPM_N (259 + sizeof spm_pieces / sizeof spm_pieces[0])

static tsr_tokenizer *make_spm(void) {
    static char bytes[256][7];
    tsr_tok_str toks[SPM_N];
    float scores[SPM_N] = {0};
    int32_t types[SPM_N];
    toks[0] = (tsr_tok_str){"<unk>", 5};
    toks[1] = (tsr_tok_str){"<s>", 3};
    toks[2] = (tsr_tok_str){"</s>", 4};
    types[0] = TSR_TOKEN_TYPE_UNKNOWN;
    types[1] = types[2] = TSR_TOKEN_TYPE_CONTROL;
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof bytes[b], "<0x%02X>", b);
        toks[3 + b] = (tsr_tok_str){bytes[b], 6};
        types[3 + b] = TSR_TOKEN_TYPE_BYTE;
    }
    for (size_t i = 0; i < sizeof spm_pieces / sizeof spm_pieces[0]; i++) {
        toks[259 + i] = (tsr_tok_str){spm_pieces[i].text, strlen(spm_pieces[i].text)};
        scores[259 + i] = spm_pieces[i].score;
        types[259 + i] = TSR_TOKEN_TYPE_NORMAL;
    }
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    d.name = "spm";
    d.model = "llama";
    d.n_tokens = SPM_N;
    d.tokens = toks;
    d.scores = scores;
    d.types = types;
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_tokenizer_create(&d, &tok, &err) == TSR_OK, "%s", err.msg);
    return tok;
}

/* "hello" -> "▁hello": ll (-3) first, then he (-4), llo (-5), hello (-6), ▁hello (-7). */
START_TEST(spm_merges_by_score) {
    tsr_tokenizer *tok = make_spm();
    ck_assert_int_eq(tsr_tokenizer_get_kind(tok), TSR_TOKENIZER_SPM);
    ck_assert_uint_eq(tsr_tokenizer_n_vocab(tok), SPM_N);
    EXPECT(tok, "hello", false, false, 268);
    EXPECT(tok, "hello", true, false, 1, 268);
    /* "▁hello▁hello": the second word merges the same way */
    EXPECT(tok, "hello hello", false, false, 268, 268);
    /* no pair of "▁ll" or "l▁" exists; "lo" is not a piece */
    EXPECT(tok, "lo", false, false, 259, 262, 263);
    EXPECT(tok, "", true, false, 1);
    /* caller buffer: too small gives the count needed and the ids that fit */
    int32_t buf[2] = {-7, -7};
    size_t n;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_tokenize_buf(tok, "lo", 2, true, false, buf, 2, &n, &err), TSR_E_RANGE);
    ck_assert_uint_eq(n, 4);
    ck_assert(buf[0] == 1 && buf[1] == 259);
    ck_assert_int_eq(tsr_tokenize_buf(tok, "hello", 5, true, false, buf, 2, &n, &err), TSR_OK);
    ck_assert(n == 2 && buf[0] == 1 && buf[1] == 268);
    ck_assert_int_eq(tsr_tokenizer_bos(tok), 1);
    ck_assert_int_eq(tsr_tokenizer_eos(tok), 2);
    ck_assert(tsr_token_is_eog(tok, 2));
    ck_assert(!tsr_token_is_eog(tok, 1));
    tsr_tokenizer_free(tok);
}
END_TEST

/* Characters outside the vocabulary become their UTF-8 bytes as <0xNN> tokens (id 3 + byte). */
START_TEST(spm_byte_fallback) {
    tsr_tokenizer *tok = make_spm();
    EXPECT(tok, "hi", false, false, 259, 260, 3 + 'i');
    EXPECT(tok, "\xc3\xa9", false, false, 259, 3 + 0xC3, 3 + 0xA9);
    tsr_tokenizer_free(tok);
}
END_TEST

START_TEST(spm_special_tokens) {
    tsr_tokenizer *tok = make_spm();
    /* parsed: <s> is a token and the text after it gets the space prefix again */
    EXPECT(tok, "<s>hello", false, true, 1, 268);
    /* not parsed: "▁<s>hello" is text; "<", "s", ">" fall back to bytes */
    EXPECT(tok, "<s>hello", false, false, 259, 3 + '<', 3 + 's', 3 + '>', 267);
    tsr_tokenizer_free(tok);
}
END_TEST

START_TEST(spm_detokenize) {
    tsr_tokenizer *tok = make_spm();
    const int32_t ids[] = {1, 268, 259, 260, 3 + 'i', 2, 0};
    char *s = detok(tok, ids, 7);
    /* BOS and EOS print nothing, the prefix space after BOS is dropped, <unk> is U+2585 */
    ck_assert_str_eq(s, "hello hi\xe2\x96\x85");
    free(s);
    /* streaming: the same piece with and without a previous token */
    char buf[16];
    ck_assert_int_eq(tsr_token_to_piece(tok, -1, 268, buf, sizeof buf), 5);
    ck_assert_int_eq(tsr_token_to_piece(tok, 268, 268, buf, sizeof buf), 6);
    ck_assert_int_eq(memcmp(buf, " hello", 6), 0);
    /* a short buffer gets the first bytes and the full length back */
    ck_assert_int_eq(tsr_token_to_piece(tok, 268, 268, buf, 2), 6);
    ck_assert_int_eq(memcmp(buf, " h", 2), 0);
    ck_assert_int_eq(tsr_token_to_piece(tok, -1, (int32_t)SPM_N, buf, sizeof buf), -1);
    tsr_error err = {{0}};
    size_t len;
    const int32_t bad[] = {5, 9999};
    ck_assert_int_eq(tsr_detokenize(tok, bad, 2, &s, &len, &err), TSR_E_RANGE);
    ck_assert_str_eq(err.msg, "detokenize: id 9999 at position 1 is outside the vocabulary of "
                              "269 tokens");
    tsr_tokenizer_free(tok);
}
END_TEST

/* ---------------------------------------------------------------------------------------- */
/* Byte-level BPE                                                                            */

/* ids 0..255: the byte characters in byte order; then the merges below in rank order; then
 * 265 "<|endoftext|>" (control) and 266 "<tool>" (user-defined). */
static const char *const bpe_merges[] = {"h e",    "l l",    "he ll", "hell o",
                                         "Ġ w",    "o r",    "Ġw or", "l d",
                                         "Ġwor ld"};
#define BPE_N 267

static tsr_tokenizer *make_bpe(const char *pre, tsr_error *err) {
    static char chars[256][2];
    static char merged[9][16];
    tsr_tok_str toks[BPE_N], merges[9];
    int32_t types[BPE_N];
    for (int b = 0; b < 256; b++) {
        toks[b] = (tsr_tok_str){chars[b], gpt2_char(b, chars[b])};
        types[b] = TSR_TOKEN_TYPE_NORMAL;
    }
    for (int i = 0; i < 9; i++) {
        merges[i] = (tsr_tok_str){bpe_merges[i], strlen(bpe_merges[i])};
        size_t o = 0;
        for (const char *c = bpe_merges[i]; *c; c++)
            if (*c != ' ') merged[i][o++] = *c;
        merged[i][o] = 0;
        toks[256 + i] = (tsr_tok_str){merged[i], o};
        types[256 + i] = TSR_TOKEN_TYPE_NORMAL;
    }
    toks[265] = (tsr_tok_str){"<|endoftext|>", 13};
    types[265] = TSR_TOKEN_TYPE_CONTROL;
    toks[266] = (tsr_tok_str){"<tool>", 6};
    types[266] = TSR_TOKEN_TYPE_USER_DEFINED;
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    d.name = "bpe";
    d.model = "gpt2";
    d.pre = pre;
    d.n_tokens = BPE_N;
    d.tokens = toks;
    d.types = types;
    d.n_merges = 9;
    d.merges = merges;
    d.bos_id = d.eos_id = 265;
    tsr_tokenizer *tok = NULL;
    tsr_tokenizer_create(&d, &tok, err);
    return tok;
}

/* "hello" merges he, ll, he+ll, hell+o; " world" merges Ġw, or, Ġw+or, ld, Ġwor+ld. */
START_TEST(bpe_merges_by_rank) {
    tsr_error err = {{0}};
    tsr_tokenizer *tok = make_bpe("gpt-2", &err);
    ck_assert_msg(tok, "%s", err.msg);
    ck_assert_int_eq(tsr_tokenizer_get_kind(tok), TSR_TOKENIZER_BPE);
    EXPECT(tok, "hello world", false, false, 259, 264);
    EXPECT(tok, "hello world", true, false, 259, 264); /* gpt-2 adds no BOS */
    /* "hellow": "hello" then "w" alone */
    EXPECT(tok, "hellow", false, false, 259, 'w');
    /* GPT-2 splitting: "'s" is its own word, digits apart from letters */
    EXPECT(tok, "he's 42", false, false, 256, '\'', 's', ' ', '4', '2');
    int32_t ids[] = {259, 264, 265, 0xC3, 0xA9};
    char *s = detok(tok, ids, 5);
    ck_assert_str_eq(s, "hello world\xc3\xa9");
    free(s);
    ck_assert(tsr_token_is_eog(tok, 265));
    tsr_tokenizer_free(tok);
}
END_TEST

START_TEST(bpe_special_tokens) {
    tsr_error err = {{0}};
    tsr_tokenizer *tok = make_bpe("gpt-2", &err);
    ck_assert_msg(tok, "%s", err.msg);
    EXPECT(tok, "a<|endoftext|>b", false, true, 'a', 265, 'b');
    /* not parsed: the GPT-2 regex splits "<|", "endoftext", "|>", "b" */
    EXPECT(tok, "a<|endoftext|>b", false, false, 'a', '<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e',
           'x', 't', '|', '>', 'b');
    /* user-defined tokens are matched either way, as llama.cpp does */
    EXPECT(tok, "x<tool>y", false, false, 'x', 266, 'y');
    tsr_tokenizer_free(tok);
}
END_TEST

/* Every pre-tokenizer compiles, and byte-level BPE gives back any text, whatever the split. */
START_TEST(bpe_every_pre_tokenizer) {
    static const char *const names[] = {
        "default", "llama3", "llama-v3", "llama-bpe", "falcon3", "qwen2", "stablelm2",
        "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "mpt", "starcoder", "refact",
        "gpt-2", "command-r", "olmo", "dbrx", "smaug-bpe", "jais", "tekken", "smollm",
        "codeshell", "bloom", "exaone", "chameleon", "minerva-7b", "poro-chat", "viking",
        "gpt-4o", "superbpe", "trillion", "bailingmoe", "seed-coder", "chatglm-bpe", "llama4"};
    const char *text = "Hello, World! it's 1234567 \xc3\xbcn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 "
                       "\xe4\xbd\xa0\xe5\xa5\xbd\t\n\n  x\xe2\x80\x83y \xf0\x9f\x98\x80 "
                       "<sentinel:12> IMGIMGABZ \xff\xfe" " end   ";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        tsr_error err = {{0}};
        tsr_tokenizer *tok = make_bpe(names[i], &err);
        ck_assert_msg(tok, "%s: %s", names[i], err.msg);
        int32_t *ids;
        size_t n;
        ck_assert_int_eq(tsr_tokenize(tok, text, strlen(text), false, false, &ids, &n, &err),
                         TSR_OK);
        char *s = detok(tok, ids, n);
        /* invalid UTF-8 reads as U+FFFD, as in llama.cpp */
        ck_assert_msg(strstr(s, "\xef\xbf\xbd\xef\xbf\xbd end   ") != NULL, "%s: '%s'", names[i],
                      s);
        ck_assert_msg(strncmp(s, text, strlen(text) - 9) == 0, "%s: '%s'", names[i], s);
        free(s);
        free(ids);
        tsr_tokenizer_free(tok);
    }
}
END_TEST

START_TEST(bpe_known_splits) {
    tsr_error err = {{0}};
    /* llama3 keeps digits in groups of up to three; starcoder splits every digit */
    tsr_tokenizer *tok = make_bpe("llama3", &err);
    ck_assert_msg(tok, "%s", err.msg);
    ck_assert(tsr_tokenizer_add_bos(tok)); /* llama3 adds BOS */
    EXPECT(tok, "1234", false, false, '1', '2', '3', '4');
    tsr_tokenizer_free(tok);
    /* default: "[0-9][0-9][0-9]" splits digit runs after \p{N}+ */
    tok = make_bpe(NULL, &err);
    ck_assert_msg(tok, "%s", err.msg);
    ck_assert(!tsr_tokenizer_add_bos(tok));
    tsr_tokenizer_free(tok);
}
END_TEST

START_TEST(bpe_unknown_pre) {
    tsr_error err = {{0}};
    ck_assert_ptr_null(make_bpe("foo", &err));
    const char *want = "bpe: tokenizer.ggml.pre 'foo' is not supported; known: default, llama3, "
                       "llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, dbrx, smaug-bpe, glm4, ";
    ck_assert_msg(strncmp(err.msg, want, strlen(want)) == 0, "%s", err.msg);
    ck_assert_msg(strstr(err.msg, ", seed-coder") && !strchr(err.msg, '\n'), "%s", err.msg);
}
END_TEST

START_TEST(bpe_bad_merge) {
    tsr_tok_str toks[] = {{"a", 1}, {"b", 1}};
    tsr_tok_str merges[] = {{"a b", 3}, {"ab", 2}};
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    d.name = "m.gguf";
    d.model = "gpt2";
    d.n_tokens = 2;
    d.tokens = toks;
    d.n_merges = 2;
    d.merges = merges;
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_tokenizer_create(&d, &tok, &err), TSR_E_INVALID);
    ck_assert_ptr_null(tok);
    ck_assert_str_eq(err.msg, "m.gguf: tokenizer.ggml.merges[1] 'ab' is not two tokens "
                              "separated by a space");
    d.model = "bert";
    ck_assert_int_eq(tsr_tokenizer_create(&d, &tok, &err), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(err.msg, "m.gguf: tokenizer.ggml.model 'bert' is not supported; known: "
                              "llama, gpt2");
    d.model = "llama";
    toks[1] = toks[0];
    ck_assert_int_eq(tsr_tokenizer_create(&d, &tok, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "m.gguf: tokenizer.ggml.tokens[1] 'a' duplicates token 0");
}
END_TEST

/* A 150k-token vocabulary with 150k merges loads in well under a second. */
START_TEST(bpe_large_vocab_load_time) {
    enum { N = 150000 };
    tsr_tok_str *toks = malloc(N * sizeof *toks), *merges = malloc(N * sizeof *merges);
    char *text = malloc((size_t)N * 16), *mtext = malloc((size_t)N * 24);
    for (int i = 0; i < N; i++) {
        char *t = text + (size_t)i * 16, *m = mtext + (size_t)i * 24;
        toks[i] = (tsr_tok_str){t, (size_t)snprintf(t, 16, "t%dx", i)};
        merges[i] = (tsr_tok_str){m, (size_t)snprintf(m, 24, "t%d x%d", i, i)};
    }
    tsr_tokenizer_desc d;
    tsr_tokenizer_desc_init(&d);
    d.model = "gpt2";
    d.pre = "llama3";
    d.n_tokens = N;
    d.tokens = toks;
    d.n_merges = N;
    d.merges = merges;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_tokenizer_create(&d, &tok, &err) == TSR_OK, "%s", err.msg);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    ck_assert_msg(s < 1.0, "loading took %.3f s", s);
    ck_assert_int_eq(tsr_token_text(tok, 123456).len, 8);
    tsr_tokenizer_free(tok);
    free(toks);
    free(merges);
    free(text);
    free(mtext);
}
END_TEST

/* ---------------------------------------------------------------------------------------- */
/* llama2.c tok*.bin                                                                         */

typedef struct tokbin {
    unsigned char *p;
    size_t len;
} tokbin;

static void tb_put(tokbin *b, const void *src, size_t n) {
    b->p = realloc(b->p, b->len + n);
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void tb_i32(tokbin *b, int32_t v) { tb_put(b, &v, 4); }

static void tb_tok(tokbin *b, float score, const char *s) {
    tb_put(b, &score, 4);
    tb_i32(b, (int32_t)strlen(s));
    tb_put(b, s, strlen(s));
}

/* <unk>, BOS, EOS, the 256 byte pieces, then " ", "a", "b", " a", "ab", " ab". */
static tokbin make_tokbin(void) {
    tokbin b = {0};
    tb_i32(&b, 6);
    tb_tok(&b, 0, "<unk>");
    tb_tok(&b, 0, "\n<s>\n");
    tb_tok(&b, 0, "\n</s>\n");
    for (int i = 0; i < 256; i++) {
        char s[8];
        snprintf(s, sizeof s, "<0x%02X>", i);
        tb_tok(&b, 0, s);
    }
    tb_tok(&b, -1, " ");  /* 259 */
    tb_tok(&b, -2, "a");  /* 260 */
    tb_tok(&b, -2, "b");  /* 261 */
    tb_tok(&b, -3, " a"); /* 262 */
    tb_tok(&b, -1, "ab"); /* 263 */
    tb_tok(&b, -4, " ab"); /* 264 */
    return b;
}

/* run.c: BOS, " " (dummy prefix), then merges: "ab" (-1) before " a" (-3), then " ab". */
START_TEST(llama2c_encode_decode) {
    tokbin b = make_tokbin();
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(tsr_tokenizer_from_llama2c_memory(b.p, b.len, "tok.bin", 265, &tok, &err) ==
                  TSR_OK, "%s", err.msg);
    ck_assert_int_eq(tsr_tokenizer_get_kind(tok), TSR_TOKENIZER_LLAMA2C);
    EXPECT(tok, "ab", true, false, 1, 264);
    EXPECT(tok, "", true, false, 1);
    EXPECT(tok, "ba", false, false, 259, 261, 260);
    /* a character outside the vocabulary: its bytes + 3 */
    EXPECT(tok, "a\xc3\xa9", true, false, 1, 262, 3 + 0xC3, 3 + 0xA9);
    /* decode: the space after BOS goes, <0x41> prints "A", <0x07> (not printable) nothing */
    const int32_t ids[] = {1, 264, 262, 3 + 'A', 3 + 7, 3 + 0xC3, 3 + 0xA9, 2};
    char *s = detok(tok, ids, 8);
    ck_assert_str_eq(s, "ab aA\n</s>\n");
    free(s);
    ck_assert(tsr_token_is_eog(tok, 2));
    tsr_tokenizer_free(tok);
    free(b.p);
}
END_TEST

static void expect_tokbin_error(tokbin b, uint32_t n_vocab, const char *want) {
    tsr_tokenizer *tok = (tsr_tokenizer *)1;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_tokenizer_from_llama2c_memory(b.p, b.len, "tok.bin", n_vocab, &tok,
                                                       &err), TSR_E_INVALID);
    ck_assert_ptr_null(tok);
    ck_assert_str_eq(err.msg, want);
}

START_TEST(llama2c_malformed) {
    tokbin b = make_tokbin();
    size_t full = b.len;
    /* truncated inside the last piece's bytes (" ab" at offset full - 3 .. full) */
    b.len = full - 1;
    char want[256];
    snprintf(want, sizeof want, "tok.bin: offset %zu: token 264: length 3 exceeds the 2 bytes left",
             full - 7);
    expect_tokbin_error(b, 0, want);
    /* truncated inside a score */
    b.len = 4 + 2;
    expect_tokbin_error(b, 0, "tok.bin: offset 4: token 0: expected a score and a length "
                              "(8 bytes), 2 bytes left");
    b.len = 2;
    expect_tokbin_error(b, 0, "tok.bin: offset 0: expected a 4-byte max_token_length, the file "
                              "has 2 bytes");
    /* the model says 300 tokens, the file has 265 */
    b.len = full;
    snprintf(want, sizeof want, "tok.bin: offset %zu: token 265: expected a score and a length "
             "(8 bytes), 0 bytes left", full);
    expect_tokbin_error(b, 300, want);
    /* the model says 3 tokens, the file has more */
    snprintf(want, sizeof want, "tok.bin: offset 44: %zu bytes follow the 3 tokens of the "
             "model's vocabulary", full - 44);
    expect_tokbin_error(b, 3, want);
    /* negative length of token 1 (4 + 13 bytes of token 0, then its 4-byte score) */
    int32_t neg = -5;
    memcpy(b.p + 21, &neg, 4);
    expect_tokbin_error(b, 0, "tok.bin: offset 21: token 1: length -5 is negative");
    /* longer than max_token_length */
    int32_t big = 7;
    memcpy(b.p + 21, &big, 4);
    expect_tokbin_error(b, 0, "tok.bin: offset 21: token 1: length 7 exceeds max_token_length 6");
    /* a huge max_token_length */
    int32_t huge = 2000000000;
    memcpy(b.p, &huge, 4);
    snprintf(want, sizeof want, "tok.bin: offset 0: max_token_length 2000000000 is not in "
             "[1, %zu] (the file size)", full);
    expect_tokbin_error(b, 0, want);
    free(b.p);
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_int_eq(tsr_tokenizer_from_llama2c("/nonexistent/tok.bin", 0, &tok, &err), TSR_E_IO);
    ck_assert_str_eq(err.msg, "/nonexistent/tok.bin: cannot open: No such file or directory");
    char *fifo = tsr_test_fifo();
    ck_assert_ptr_nonnull(fifo);
    ck_assert_int_eq(tsr_tokenizer_from_llama2c(fifo, 0, &tok, &err), TSR_E_IO);
    char fifo_msg[4200];
    snprintf(fifo_msg, sizeof fifo_msg, "%s: a FIFO, not a regular file", fifo);
    ck_assert_str_eq(err.msg, fifo_msg);
    unlink(fifo);
    free(fifo);
}
END_TEST

/* ---------------------------------------------------------------------------------------- */
/* GGUF metadata                                                                             */

static void kv_key(gguf_bytes *b, const char *key, uint32_t type) {
    gb_str(b, key);
    gb_u32(b, type);
}

static void kv_str(gguf_bytes *b, const char *key, const char *v) {
    kv_key(b, key, TSR_GGUF_STRING);
    gb_str(b, v);
}

static void kv_strs(gguf_bytes *b, const char *key, const char *const *v, size_t n) {
    kv_key(b, key, TSR_GGUF_ARRAY);
    gb_u32(b, TSR_GGUF_STRING);
    gb_u64(b, n);
    for (size_t i = 0; i < n; i++) gb_str(b, v[i]);
}

static void kv_nums(gguf_bytes *b, const char *key, uint32_t type, const void *v, size_t n) {
    kv_key(b, key, TSR_GGUF_ARRAY);
    gb_u32(b, type);
    gb_u64(b, n);
    gb_put(b, v, 4 * n);
}

static void kv_u32(gguf_bytes *b, const char *key, uint32_t v) {
    kv_key(b, key, TSR_GGUF_UINT32);
    gb_u32(b, v);
}

/* What to break in the GGUF made by gguf_tokenizer. */
enum gguf_fault { OK, NO_TOKENS, SHORT_SCORES, BAD_MERGE, BAD_MODEL, BAD_PRE, SCORES_TYPE };

static gguf_bytes gguf_tokenizer(const char *model, enum gguf_fault fault) {
    static const char *const toks[] = {"<unk>", "<s>", "</s>", "a", "b", "ab", "\xe2\x96\x81" "ab"};
    static const float scores[] = {0, 0, 0, -1, -1, -2, -3};
    static const int32_t types[] = {2, 3, 3, 1, 1, 1, 1};
    static const char *const merges[] = {"a b", "\xe2\x96\x81 ab"};
    static const char *const bad_merges[] = {"a b", "ab"};
    bool bpe = strcmp(model, "gpt2") == 0;
    gguf_bytes b = {0};
    gb_header(&b, 3, 0, 6 + bpe + (fault != NO_TOKENS));
    kv_str(&b, "general.architecture", "llama");
    kv_str(&b, "tokenizer.ggml.model", fault == BAD_MODEL ? "wordpiece" : model);
    if (bpe) {
        kv_str(&b, "tokenizer.ggml.pre", fault == BAD_PRE ? "foo" : "gpt-2");
        kv_strs(&b, "tokenizer.ggml.merges", fault == BAD_MERGE ? bad_merges : merges, 2);
    } else {
        kv_u32(&b, "tokenizer.ggml.padding_token_id", 4294967295u);
    }
    if (fault != NO_TOKENS) kv_strs(&b, "tokenizer.ggml.tokens", toks, 7);
    if (fault == SCORES_TYPE)
        kv_strs(&b, "tokenizer.ggml.scores", toks, 7);
    else
        kv_nums(&b, "tokenizer.ggml.scores", TSR_GGUF_FLOAT32, scores,
                fault == SHORT_SCORES ? 6 : 7);
    kv_nums(&b, "tokenizer.ggml.token_type", TSR_GGUF_INT32, types, 7);
    kv_u32(&b, "tokenizer.ggml.bos_token_id", 1);
    gb_pad(&b, 32);
    return b;
}

static int load_gguf(gguf_bytes b, tsr_tokenizer **tok, tsr_error *err) {
    tsr_gguf *g;
    int rc = tsr_gguf_open_memory(b.p, b.len, "t.gguf", &g, err);
    ck_assert_msg(rc == TSR_OK, "%s", err->msg);
    rc = tsr_tokenizer_from_gguf(g, tok, err);
    tsr_gguf_close(g);
    free(b.p);
    return rc;
}

START_TEST(gguf_tokenizer_ok) {
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_msg(load_gguf(gguf_tokenizer("llama", OK), &tok, &err) == TSR_OK, "%s", err.msg);
    /* "▁ab": a+b (-1) then ▁+ab (-3) */
    EXPECT(tok, "ab", true, false, 1, 6);
    ck_assert_int_eq(tsr_tokenizer_eos(tok), 2);
    tsr_tokenizer_free(tok);
    ck_assert_msg(load_gguf(gguf_tokenizer("gpt2", OK), &tok, &err) == TSR_OK, "%s", err.msg);
    EXPECT(tok, "ab", true, false, 5);
    tsr_tokenizer_free(tok);
}
END_TEST

static void expect_gguf_error(const char *model, enum gguf_fault f, int status, const char *want) {
    tsr_tokenizer *tok = (tsr_tokenizer *)1;
    tsr_error err = {{0}};
    ck_assert_int_eq(load_gguf(gguf_tokenizer(model, f), &tok, &err), status);
    ck_assert_ptr_null(tok);
    ck_assert_str_eq(err.msg, want);
}

START_TEST(gguf_tokenizer_malformed) {
    expect_gguf_error("llama", NO_TOKENS, TSR_E_INVALID, "t.gguf: key tokenizer.ggml.tokens is "
                                                         "missing");
    expect_gguf_error("llama", SHORT_SCORES, TSR_E_INVALID,
                      "t.gguf: key tokenizer.ggml.scores has 6 entries, tokenizer.ggml.tokens "
                      "has 7");
    expect_gguf_error("llama", SCORES_TYPE, TSR_E_INVALID,
                      "t.gguf: key tokenizer.ggml.scores: expected an array of numbers");
    expect_gguf_error("gpt2", BAD_MERGE, TSR_E_INVALID,
                      "t.gguf: tokenizer.ggml.merges[1] 'ab' is not two tokens separated by a "
                      "space");
    expect_gguf_error("llama", BAD_MODEL, TSR_E_UNSUPPORTED,
                      "t.gguf: tokenizer.ggml.model 'wordpiece' is not supported; known: llama, "
                      "gpt2");
    tsr_tokenizer *tok;
    tsr_error err = {{0}};
    ck_assert_int_eq(load_gguf(gguf_tokenizer("gpt2", BAD_PRE), &tok, &err), TSR_E_UNSUPPORTED);
    const char *want = "t.gguf: tokenizer.ggml.pre 'foo' is not supported; known: default, "
                       "llama3, ";
    ck_assert_msg(strncmp(err.msg, want, strlen(want)) == 0, "%s", err.msg);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("spm");
    tcase_add_test(tc, spm_merges_by_score);
    tcase_add_test(tc, spm_byte_fallback);
    tcase_add_test(tc, spm_special_tokens);
    tcase_add_test(tc, spm_detokenize);
    suite_add_tcase(s, tc);
    tc = tcase_create("bpe");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, bpe_merges_by_rank);
    tcase_add_test(tc, bpe_special_tokens);
    tcase_add_test(tc, bpe_every_pre_tokenizer);
    tcase_add_test(tc, bpe_known_splits);
    tcase_add_test(tc, bpe_unknown_pre);
    tcase_add_test(tc, bpe_bad_merge);
    tcase_add_test(tc, bpe_large_vocab_load_time);
    suite_add_tcase(s, tc);
    tc = tcase_create("llama2c");
    tcase_add_test(tc, llama2c_encode_decode);
    tcase_add_test(tc, llama2c_malformed);
    suite_add_tcase(s, tc);
    tc = tcase_create("gguf");
    tcase_add_test(tc, gguf_tokenizer_ok);
    tcase_add_test(tc, gguf_tokenizer_malformed);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
