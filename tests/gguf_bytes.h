/* Hand-built GGUF bytes for the model-file tests: lets a test place every field itself (and
 * break exactly one), and know the offset of each field for the expected error line. */
#ifndef TSR_TEST_GGUF_BYTES_H
#define TSR_TEST_GGUF_BYTES_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct gguf_bytes {
    uint8_t *p;
    size_t len, cap;
} gguf_bytes;

static inline void gb_put(gguf_bytes *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static inline void gb_u32(gguf_bytes *b, uint32_t v) { gb_put(b, &v, 4); }
static inline void gb_u64(gguf_bytes *b, uint64_t v) { gb_put(b, &v, 8); }

static inline void gb_str(gguf_bytes *b, const char *s) {
    gb_u64(b, strlen(s));
    gb_put(b, s, strlen(s));
}

static inline void gb_header(gguf_bytes *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    gb_put(b, "GGUF", 4);
    gb_u32(b, version);
    gb_u64(b, n_tensors);
    gb_u64(b, n_kv);
}

/* Zero bytes up to a multiple of `align`. */
static inline void gb_pad(gguf_bytes *b, size_t align) {
    static const uint8_t zero[256];
    gb_put(b, zero, (align - b->len % align) % align);
}

#endif
