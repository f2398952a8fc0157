/* GPT-2's byte-to-unicode map, for tests that build byte-level BPE vocabularies themselves:
 * printable Latin-1 bytes stand for themselves, every other byte for U+0100 + its rank among
 * the others (the table of GPT-2's encoder.py, which llama.cpp's BPE vocabularies use). */
#ifndef TSR_TEST_GPT2_BYTES_H
#define TSR_TEST_GPT2_BYTES_H

#include <stdbool.h>
#include <stddef.h>

static inline bool gpt2_byte_is_self(int b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
}

/* Writes the UTF-8 of byte b's character to out (2 bytes at most); returns its length. */
static inline size_t gpt2_char(int b, char *out) {
    int rank = 0;
    for (int i = 0; i < b; i++) rank += !gpt2_byte_is_self(i);
    unsigned cp = gpt2_byte_is_self(b) ? (unsigned)b : 256u + (unsigned)rank;
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

#endif
