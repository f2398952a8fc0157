/* Byte-level BPE (GGUF model "gpt2"), as llama.cpp's llm_tokenizer_bpe.
 *
 * Pre-tokenizer. Each tokenizer.ggml.pre value names a list of regexes; each regex splits
 * every piece left by the previous one into its matches and the gaps between them. The
 * regexes are llama.cpp's; so are the three ways it runs them, which this file reproduces
 * with PCRE2 so that the splits are the same:
 *   - REAL: the GPT-2 and LLaMA-3 style patterns, which llama.cpp runs with hand-written code
 *     over true Unicode categories: PCRE2 in UTF + UCP mode.
 *   - COLLAPSED: any other pattern using \p{..}: llama.cpp maps each non-ASCII code point to
 *     one byte standing for its category (whitespace 0x0B, number 0xD1, letter 0xD2,
 *     punctuation 0xD3, mark 0xD4, symbol 0xD5, other 0xD0), rewrites \p{X} in the pattern
 *     as [that byte + the ASCII members of X] and matches bytes; so do we.
 *   - PLAIN: patterns without \p{..}: matched over code points, with non-ASCII whitespace
 *     turned into 0x0B first (llama.cpp's std::wregex path): PCRE2 UTF mode without UCP.
 * Invalid UTF-8 becomes U+FFFD, as in llama.cpp.
 *
 * Words are then mapped byte by byte through GPT-2's byte-to-unicode table and merged by the
 * rank of tokenizer.ggml.merges (lowest first, leftmost on ties). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer/tokenizer_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* The pre-tokenizers                                                                        */

#define RX_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RX_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RX_LLAMA3                                                                              \
    RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_QWEN2                                                                               \
    RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"      \
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_PORO " ?[^(\\s|.,!?…。，、।۔،)]+"

typedef struct pre_def {
    const char *const *names; /* NULL-terminated */
    const char *const *regexes;
    bool ignore_merges, add_bos, no_bos;
} pre_def;

#define LIST(...) (const char *const[]){__VA_ARGS__, NULL}

static const pre_def pre_defs[] = {
    {LIST("default"),
     LIST("[\\p{P}\\$\\+<=>\\^~\\|]+", RX_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"), false, false,
     false},
    {LIST("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"),
     LIST(RX_LLAMA3), true, true, false},
    {LIST("dbrx", "smaug-bpe"), LIST(RX_LLAMA3), false, false, false},
    {LIST("glm4", "chatglm-bpe"), LIST(RX_LLAMA3), false, false, true},
    {LIST("deepseek-llm"),
     LIST("[\r\n]",
          "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ"
          "-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\\x{1F7D}ᾀ-ᾴᾶ-ᾼ"
          "\\x{1FBE}ῂ-ῄῆ-ῌῐ-\\x{1FD3}ῖ-\\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ"
          "\\x{2126}ℨ\\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎ"
          "ꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
          "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+",
          "\\p{N}+"),
     false, false, false},
    {LIST("deepseek-coder"),
     LIST("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"), false,
     false, false},
    {LIST("deepseek-v3", "hunyuan-dense"),
     LIST("\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
          "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
          "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
     false, false, false},
    {LIST("falcon"), LIST("[\\p{P}\\$\\+<=>\\^~\\|`]+", RX_GPT2, "[0-9][0-9][0-9]"), false,
     false, false},
    {LIST("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
     LIST("\\p{N}", RX_GPT2), false, false, false},
    {LIST("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "jina-es", "jina-de",
          "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "gigachat",
          "exaone4", "a.x-4.0", "mellum"),
     LIST(RX_GPT2), false, false, false},
    {LIST("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), LIST(RX_QWEN2),
     false, false, false},
    {LIST("poro-chat", "bloom", "gpt3-finnish"), LIST(RX_PORO), false, false, false},
    {LIST("viking"), LIST(RX_PORO, "\\p{N}"), false, false, false},
    {LIST("tekken"),
     LIST("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|"
          "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}|"
          " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
     true, true, false},
    {LIST("chameleon"),
     LIST("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\\t\\n]|    |  )",
          "\\p{N}", "[\\p{P}!-/:-@\\[-`{-~]", RX_GPT2),
     false, true, false},
    {LIST("gpt-4o", "llama4"),
     LIST("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
          RX_CONTRACTIONS "?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+"
          "((?=[\\p{L}])([^A-Z]))*" RX_CONTRACTIONS "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
          "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
     false, false, false},
    {LIST("superbpe"), LIST("\\p{N}+", "(?=(\\d{3})+(?!\\d))"), false, false, false},
    {LIST("bailingmoe", "bailingmoe2", "llada-moe"),
     LIST("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
          " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"),
     false, false, false},
    {LIST("seed-coder"),
     LIST(RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|"
                          "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
     false, false, false},
};

enum rx_mode { RX_REAL, RX_COLLAPSED, RX_PLAIN };

typedef struct rx {
    pcre2_code *code;
    enum rx_mode mode;
} rx;

struct tsr_bpe_pre {
    rx *rx;
    size_t n_rx;
    pcre2_code *classify; /* non-ASCII code point -> category group */
};

/* Categories as llama.cpp collapses them, with the ASCII members of each. */
static const struct {
    const char *name;
    unsigned char byte;
    const char *ascii;
} ucats[] = {
    {"\\p{N}", 0xD1, "0-9"},
    {"\\p{L}", 0xD2, "A-Za-z"},
    {"\\p{P}", 0xD3, "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"},
    {"\\p{M}", 0xD4, ""},
    {"\\p{S}", 0xD5, "\\$\\+<->\\^`\\|"},
    {"\\p{Lu}", 0xD2, "A-Za-z"},
    {"\\p{Ll}", 0xD2, "A-Za-z"},
    {"\\p{Lt}", 0xD2, "A-Za-z"},
    {"\\p{Lm}", 0xD2, "A-Za-z"},
    {"\\p{Lo}", 0xD2, "A-Za-z"},
};
#define N_UCATS (sizeof ucats / sizeof ucats[0])

static bool uses_categories(const char *re) {
    for (size_t i = 0; i < N_UCATS; i++)
        if (strstr(re, ucats[i].name)) return true;
    return false;
}

/* llama.cpp's whitespace code points (its is_whitespace flag). */
static bool is_space_cp(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* The pattern with \p{X} replaced by its collapsed class. Returns malloc'd text. */
static char *collapse_pattern(const char *re) {
    size_t len = strlen(re);
    char *out = malloc(len * 8 + 1);
    if (!out) return NULL;
    size_t o = 0;
    bool inside = false;
    for (size_t i = 0; i < len; i++) {
        if (re[i] == '[' && (i == 0 || re[i - 1] != '\\')) {
            inside = true;
        } else if (inside && re[i] == ']' && re[i - 1] != '\\') {
            inside = false;
        } else if (re[i] == '\\' && i + 3 < len && re[i + 1] == 'p' && re[i + 2] == '{') {
            size_t k;
            for (k = 0; k < N_UCATS; k++)
                if (strncmp(re + i, ucats[k].name, strlen(ucats[k].name)) == 0) break;
            if (k < N_UCATS) {
                if (!inside) out[o++] = '[';
                o += (size_t)sprintf(out + o, "\\x%02X%s", ucats[k].byte, ucats[k].ascii);
                if (!inside) out[o++] = ']';
                i += strlen(ucats[k].name) - 1;
                continue;
            }
        }
        out[o++] = re[i];
    }
    out[o] = 0;
    return out;
}

void tsr_bpe_pre_free(tsr_bpe_pre *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n_rx; i++) pcre2_code_free(p->rx[i].code);
    pcre2_code_free(p->classify);
    free(p->rx);
    free(p);
}

static pcre2_code *compile(const char *name, const char *pattern, uint32_t opts,
                           tsr_error *err) {
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *c = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, opts, &ec, &eo, NULL);
    if (!c) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        tsr_error_set(err, TSR_E_INTERNAL, "%s: pre-tokenizer regex '%s': offset %zu: %s", name,
                      pattern, (size_t)eo, (const char *)msg);
    }
    return c;
}

static int append_known(char *buf, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < sizeof pre_defs / sizeof pre_defs[0]; i++)
        for (const char *const *n = pre_defs[i].names; *n; n++)
            o += (size_t)snprintf(buf + o, o < cap ? cap - o : 0, "%s%s", o ? ", " : "", *n);
    return (int)o;
}

int tsr_bpe_pre_create(tsr_tokenizer *t, const char *name, const char *pre, tsr_error *err) {
    if (!pre || !*pre) pre = "default";
    const pre_def *def = NULL;
    for (size_t i = 0; i < sizeof pre_defs / sizeof pre_defs[0] && !def; i++)
        for (const char *const *n = pre_defs[i].names; *n; n++)
            if (strcmp(*n, pre) == 0) def = &pre_defs[i];
    if (!def) {
        char known[768];
        append_known(known, sizeof known);
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: tokenizer.ggml.pre '%s' is not supported; known: %s", name, pre,
                             known);
    }
    t->ignore_merges = def->ignore_merges;
    t->add_bos = def->add_bos;
    if (def->no_bos) t->bos = -1;
    tsr_bpe_pre *p = calloc(1, sizeof *p);
    if (!p) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    t->pre = p;
    size_t n = 0;
    while (def->regexes[n]) n++;
    p->rx = calloc(n, sizeof *p->rx);
    if (!p->rx) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    for (size_t i = 0; i < n; i++) {
        const char *re = def->regexes[i];
        rx *r = &p->rx[p->n_rx];
        if (strcmp(re, RX_GPT2) == 0 || strcmp(re, RX_LLAMA3) == 0 || strcmp(re, RX_QWEN2) == 0) {
            r->mode = RX_REAL;
            r->code = compile(name, re, PCRE2_UTF | PCRE2_UCP, err);
        } else if (uses_categories(re)) {
            r->mode = RX_COLLAPSED;
            char *c = collapse_pattern(re);
            if (!c) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
            r->code = compile(name, c, 0, err);
            free(c);
        } else {
            r->mode = RX_PLAIN;
            r->code = compile(name, re, PCRE2_UTF, err);
        }
        if (!r->code) return TSR_E_INTERNAL;
        p->n_rx++;
    }
    p->classify = compile(name, "(\\p{N})|(\\p{L})|(\\p{P})|(\\p{M})|(\\p{S})",
                          PCRE2_UTF | PCRE2_UCP | PCRE2_ANCHORED, err);
    return p->classify ? TSR_OK : TSR_E_INTERNAL;
}

/* ---------------------------------------------------------------------------------------- */
/* Byte-to-unicode                                                                           */

static uint32_t byte_to_cp(uint8_t b) {
    if (b <= 32) return 256u + b;
    if (b >= 127 && b <= 160) return 256u + 33 + (b - 127u);
    if (b == 173) return 256u + 67;
    return b;
}

static int cp_to_byte(uint32_t c) {
    if (c >= 256 && c <= 288) return (int)(c - 256);
    if (c >= 289 && c <= 322) return (int)(c - 289 + 127);
    if (c == 323) return 173;
    if ((c >= 33 && c <= 126) || (c >= 161 && c <= 255 && c != 173)) return (int)c;
    return -1;
}

static size_t put_utf8(uint32_t c, char *o) {
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (char)(0xC0 | (c >> 6));
        o[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | (c >> 12));
        o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (c >> 18));
    o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* Decodes one code point at s (len > 0); invalid or truncated sequences give U+FFFD for one
 * byte. Returns the bytes consumed. */
static size_t get_utf8(const unsigned char *s, size_t len, uint32_t *cp) {
    unsigned char c = s[0];
    size_t n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xE0) == 0xC0) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        *cp = 0xFFFD;
        return 1;
    }
    if (n > len) {
        *cp = 0xFFFD;
        return 1;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *cp = 0xFFFD;
            return 1;
        }
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) ? 0xFFFD : v;
    return *cp == 0xFFFD && v != 0xFFFD ? 1 : n;
}

size_t tsr_bpe_byte_to_utf8(uint8_t b, char out[2]) {
    char tmp[4];
    size_t n = put_utf8(byte_to_cp(b), tmp);
    memcpy(out, tmp, n);
    return n;
}

size_t tsr_bpe_decode_piece(const char *s, size_t len, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t n = get_utf8((const unsigned char *)s + i, len - i, &cp);
        int b = cp_to_byte(cp);
        if (b >= 0) {
            out[o++] = (char)b;
        } else {
            memcpy(out + o, s + i, n);
            o += n;
        }
        i += n;
    }
    return o;
}

/* ---------------------------------------------------------------------------------------- */
/* Merges                                                                                    */

/* Key of a merge: the left part's length (4 bytes), then both parts. */
static size_t merge_key(const char *l, size_t ll, const char *r, size_t rl, char *key) {
    uint32_t n = (uint32_t)ll;
    memcpy(key, &n, 4);
    memcpy(key + 4, l, ll);
    memcpy(key + 4 + ll, r, rl);
    return 4 + ll + rl;
}

int tsr_bpe_set_merges(tsr_tokenizer *t, const char *name, uint32_t n, const tsr_tok_str *m,
                       tsr_error *err) {
    if (tsr_strmap_init(&t->merges, n) != TSR_OK)
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %u merges", name, n);
    char small[256];
    for (uint32_t i = 0; i < n; i++) {
        const char *sp = m[i].len > 1 ? memchr(m[i].ptr + 1, ' ', m[i].len - 1) : NULL;
        if (!sp || (size_t)(sp - m[i].ptr) + 1 == m[i].len)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: tokenizer.ggml.merges[%u] '%.*s' is not two tokens "
                                 "separated by a space", name, i,
                                 (int)(m[i].len > 64 ? 64 : m[i].len), m[i].ptr);
        size_t ll = (size_t)(sp - m[i].ptr), rl = m[i].len - ll - 1;
        char *key = m[i].len + 4 <= sizeof small ? small : malloc(m[i].len + 4);
        if (!key) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
        size_t kl = merge_key(m[i].ptr, ll, sp + 1, rl, key);
        int rc = tsr_strmap_put(&t->merges, key, kl, (int32_t)i, NULL);
        if (key != small) free(key);
        if (rc) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    }
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Splitting                                                                                 */

/* The text decoded into code points, in the forms the three regex modes match. */
typedef struct subject {
    size_t n_cp;
    char *real;        /* UTF-8 of the code points (invalid bytes -> U+FFFD) */
    size_t *real_off;  /* [n_cp + 1] byte offset of each code point in `real` */
    char *alt;         /* the same with non-ASCII whitespace replaced (per mode) */
    size_t *alt_off;   /* [n_cp + 1] */
    size_t *alt_cp;    /* byte offset in `alt` -> code point index */
    char *collapsed;   /* one byte per code point */
} subject;

static void subject_free(subject *s) {
    free(s->real);
    free(s->real_off);
    free(s->alt);
    free(s->alt_off);
    free(s->alt_cp);
    free(s->collapsed);
}

static unsigned char classify_cp(const tsr_bpe_pre *p, uint32_t cp, pcre2_match_data *md) {
    if (cp < 0x80) return (unsigned char)cp;
    if (is_space_cp(cp)) return 0x0B;
    char u[4];
    size_t n = put_utf8(cp, u);
    if (pcre2_match(p->classify, (PCRE2_SPTR)u, n, 0, 0, md, NULL) < 0) return 0xD0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    uint32_t count = pcre2_get_ovector_count(md);
    for (uint32_t g = 1; g < count && g <= 5; g++)
        if (ov[2 * g] != PCRE2_UNSET) return (unsigned char)(0xD0 + g);
    return 0xD0;
}

/* Builds `alt` for a mode (REAL: non-ASCII spaces -> U+2000, which PCRE2 sees as \s as
 * llama.cpp's code does; PLAIN: -> 0x0B, as llama.cpp's wregex path). */
static int build_alt(subject *s, const uint32_t *cps, enum rx_mode mode) {
    size_t cap = s->real_off[s->n_cp] * 2 + 1;
    free(s->alt);
    free(s->alt_cp);
    s->alt = malloc(cap);
    s->alt_cp = malloc((cap + 1) * sizeof *s->alt_cp);
    if (!s->alt || !s->alt_cp) return TSR_E_NOMEM;
    size_t o = 0;
    for (size_t i = 0; i < s->n_cp; i++) {
        uint32_t c = cps[i];
        if (c >= 0x80 && is_space_cp(c)) c = mode == RX_REAL ? 0x2000 : 0x0B;
        s->alt_off[i] = o;
        size_t n = put_utf8(c, s->alt + o);
        for (size_t k = 0; k < n; k++) s->alt_cp[o + k] = i;
        o += n;
    }
    s->alt_off[s->n_cp] = o;
    s->alt_cp[o] = s->n_cp;
    return TSR_OK;
}

/* Splits the pieces `in` (code point lengths, summing to n_cp) with one regex into `out`. */
static int split_pieces(const rx *r, const subject *s, const size_t *in, size_t n_in,
                        size_t **out, size_t *n_out, pcre2_match_data *md) {
    size_t cap = n_in * 2 + 16, n = 0;
    size_t *v = malloc(cap * sizeof *v);
    if (!v) return TSR_E_NOMEM;
#define PUSH(x)                                                                                \
    do {                                                                                       \
        if (n == cap) {                                                                        \
            size_t *nv = realloc(v, (cap *= 2) * sizeof *v);                                   \
            if (!nv) {                                                                         \
                free(v);                                                                       \
                return TSR_E_NOMEM;                                                            \
            }                                                                                  \
            v = nv;                                                                            \
        }                                                                                      \
        v[n++] = (x);                                                                          \
    } while (0)
    size_t start = 0;
    for (size_t p = 0; p < n_in; start += in[p], p++) {
        size_t len = in[p];
        if (len == 0) continue;
        const char *subj;
        size_t blen;
        if (r->mode == RX_COLLAPSED) {
            subj = s->collapsed + start;
            blen = len;
        } else {
            subj = s->alt + s->alt_off[start];
            blen = s->alt_off[start + len] - s->alt_off[start];
        }
        /* positions below are in code points relative to `start` */
        size_t done = 0, pos = 0;
        uint32_t opts = 0;
        while (pos <= blen) {
            int rc = pcre2_match(r->code, (PCRE2_SPTR)subj, blen, pos, opts, md, NULL);
            if (rc < 0) {
                if (opts == 0 || pos >= blen) break;
                /* an empty match was found here before: move one character on */
                opts = 0;
                pos += r->mode == RX_COLLAPSED ? 1 : tsr_utf8_len((unsigned char)subj[pos]);
                continue;
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t mb = ov[0], me = ov[1], ms, mend;
            if (r->mode == RX_COLLAPSED) {
                ms = mb;
                mend = me;
            } else {
                size_t base = s->alt_off[start];
                ms = s->alt_cp[base + mb] - start;
                mend = s->alt_cp[base + me] - start;
            }
            if (ms > done) PUSH(ms - done);
            if (mend > ms) PUSH(mend - ms);
            done = mend;
            pos = me;
            opts = me == mb ? PCRE2_NOTEMPTY_ATSTART | PCRE2_ANCHORED : 0;
        }
        if (done < len) PUSH(len - done);
    }
#undef PUSH
    *out = v;
    *n_out = n;
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Merging one word                                                                          */

typedef struct bsym {
    int32_t prev, next;
    size_t off, n;
} bsym;

typedef struct bbigram {
    int32_t left, right;
    int32_t rank;
    size_t ln, rn;
} bbigram;

static bool bb_before(const bbigram *a, const bbigram *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

typedef struct bheap {
    bbigram *v;
    size_t n, cap;
} bheap;

static int bheap_push(bheap *h, bbigram b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bbigram *v = realloc(h->v, cap * sizeof *v);
        if (!v) return TSR_E_NOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0 && bb_before(&b, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = b;
    return TSR_OK;
}

static bbigram bheap_pop(bheap *h) {
    bbigram top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && bb_before(&h->v[c + 1], &h->v[c])) c++;
        if (!bb_before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

typedef struct word_ctx {
    const tsr_tokenizer *t;
    bsym *sym;
    size_t sym_cap;
    bheap heap;
    char *key;
    size_t key_cap;
} word_ctx;

static int add_bigram(word_ctx *w, const char *text, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return TSR_OK;
    size_t ln = w->sym[l].n, rn = w->sym[r].n;
    if (ln + rn + 4 > w->key_cap) {
        size_t cap = (ln + rn + 4) * 2;
        char *k = realloc(w->key, cap);
        if (!k) return TSR_E_NOMEM;
        w->key = k;
        w->key_cap = cap;
    }
    size_t kl = merge_key(text + w->sym[l].off, ln, text + w->sym[r].off, rn, w->key);
    int32_t rank = tsr_strmap_get(&w->t->merges, w->key, kl);
    if (rank < 0) return TSR_OK;
    return bheap_push(&w->heap, (bbigram){l, r, rank, ln, rn});
}

/* Tokenizes one byte-encoded word. */
static int bpe_word(word_ctx *w, const char *text, size_t len, tsr_ids *out) {
    const tsr_tokenizer *t = w->t;
    if (len == 0) return TSR_OK;
    if (t->ignore_merges) {
        int32_t id = tsr_strmap_get(&t->vocab, text, len);
        if (id >= 0) return tsr_ids_push(out, id);
    }
    if (len > w->sym_cap) {
        bsym *s = realloc(w->sym, len * sizeof *s);
        if (!s) return TSR_E_NOMEM;
        w->sym = s;
        w->sym_cap = len;
    }
    size_t n_sym = 0;
    for (size_t off = 0; off < len;) {
        size_t n = tsr_utf8_len((unsigned char)text[off]);
        if (n > len - off) n = len - off;
        int32_t next = off + n == len ? -1 : (int32_t)n_sym + 1;
        w->sym[n_sym] = (bsym){(int32_t)n_sym - 1, next, off, n};
        n_sym++;
        off += n;
    }
    w->heap.n = 0;
    int rc = TSR_OK;
    for (size_t i = 1; i < n_sym && !rc; i++)
        rc = add_bigram(w, text, (int32_t)i - 1, (int32_t)i);
    while (w->heap.n && !rc) {
        bbigram b = bheap_pop(&w->heap);
        bsym *l = &w->sym[b.left], *r = &w->sym[b.right];
        if (l->n != b.ln || r->n != b.rn || l->n == 0 || r->n == 0) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) w->sym[r->next].prev = b.left;
        rc = add_bigram(w, text, l->prev, b.left);
        if (!rc) rc = add_bigram(w, text, b.left, l->next);
    }
    for (int32_t i = 0; i >= 0 && !rc; i = w->sym[i].next) {
        int32_t id = tsr_strmap_get(&t->vocab, text + w->sym[i].off, w->sym[i].n);
        if (id >= 0) {
            rc = tsr_ids_push(out, id);
            continue;
        }
        /* as llama.cpp: each byte of the encoded text alone, when it is a token */
        for (size_t j = 0; j < w->sym[i].n && !rc; j++) {
            id = tsr_strmap_get(&t->vocab, text + w->sym[i].off + j, 1);
            if (id >= 0) rc = tsr_ids_push(out, id);
        }
    }
    return rc;
}

int tsr_bpe_tokenize(const tsr_tokenizer *t, const char *text, size_t len, tsr_ids *out) {
    const tsr_bpe_pre *p = t->pre;
    subject s = {0};
    uint32_t *cps = malloc((len ? len : 1) * sizeof *cps);
    size_t *pieces = malloc(sizeof *pieces), n_pieces = 1;
    pcre2_match_data *md = pcre2_match_data_create(16, NULL);
    word_ctx w = {.t = t};
    char *enc = NULL;
    int rc = TSR_E_NOMEM;
    if (!cps || !pieces || !md) goto done;
    for (size_t i = 0; i < len;)
        i += get_utf8((const unsigned char *)text + i, len - i, &cps[s.n_cp++]);
    s.real = malloc(s.n_cp * 4 + 1);
    s.real_off = malloc((s.n_cp + 1) * sizeof *s.real_off);
    s.alt_off = malloc((s.n_cp + 1) * sizeof *s.alt_off);
    s.collapsed = malloc(s.n_cp + 1);
    if (!s.real || !s.real_off || !s.alt_off || !s.collapsed) goto done;
    size_t o = 0;
    for (size_t i = 0; i < s.n_cp; i++) {
        s.real_off[i] = o;
        o += put_utf8(cps[i], s.real + o);
        s.collapsed[i] = (char)classify_cp(p, cps[i], md);
    }
    s.real_off[s.n_cp] = o;
    pieces[0] = s.n_cp;
    enum rx_mode alt_mode = RX_COLLAPSED; /* = `alt` not built yet */
    for (size_t k = 0; k < p->n_rx; k++) {
        const rx *r = &p->rx[k];
        if (r->mode != RX_COLLAPSED && r->mode != alt_mode) {
            if ((rc = build_alt(&s, cps, r->mode))) goto done;
            alt_mode = r->mode;
        }
        size_t *next, n_next;
        if ((rc = split_pieces(r, &s, pieces, n_pieces, &next, &n_next, md))) goto done;
        free(pieces);
        pieces = next;
        n_pieces = n_next;
    }
    enc = malloc(o * 2 + 1);
    rc = enc ? TSR_OK : TSR_E_NOMEM;
    size_t start = 0;
    for (size_t i = 0; i < n_pieces && !rc; start += pieces[i], i++) {
        size_t b0 = s.real_off[start], b1 = s.real_off[start + pieces[i]], el = 0;
        for (size_t b = b0; b < b1; b++) {
            char u[2];
            size_t n = tsr_bpe_byte_to_utf8((uint8_t)s.real[b], u);
            memcpy(enc + el, u, n);
            el += n;
        }
        rc = bpe_word(&w, enc, el, out);
    }
done:
    subject_free(&s);
    free(cps);
    free(pieces);
    free(enc);
    free(w.sym);
    free(w.heap.v);
    free(w.key);
    if (md) pcre2_match_data_free(md);
    return rc;
}
