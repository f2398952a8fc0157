/* GGUF model files (versions 2 and 3), memory-mapped and checked before use.
 *
 * A tsr_gguf is also the host's in-memory form of any model file: the llama2.c reader
 * (llama2c.h) builds one with GGUF metadata keys and tensor names, so the model graph and the
 * tokenizer read a single interface. */
#ifndef TSR_HOST_GGUF_H
#define TSR_HOST_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef enum tsr_gguf_type {
    TSR_GGUF_UINT8 = 0,
    TSR_GGUF_INT8 = 1,
    TSR_GGUF_UINT16 = 2,
    TSR_GGUF_INT16 = 3,
    TSR_GGUF_UINT32 = 4,
    TSR_GGUF_INT32 = 5,
    TSR_GGUF_FLOAT32 = 6,
    TSR_GGUF_BOOL = 7,
    TSR_GGUF_STRING = 8,
    TSR_GGUF_ARRAY = 9,
    TSR_GGUF_UINT64 = 10,
    TSR_GGUF_INT64 = 11,
    TSR_GGUF_FLOAT64 = 12
} tsr_gguf_type;

/* A string inside the mapped file: not NUL-terminated. */
typedef struct tsr_gguf_str {
    const char *ptr;
    uint64_t len;
} tsr_gguf_str;

typedef struct tsr_gguf tsr_gguf;

typedef struct tsr_gguf_tensor {
    tsr_gguf_str name;
    int32_t dtype;      /* tsr_dtype (GGML type id) */
    uint32_t n_dims;
    int64_t ne[4];      /* unused dimensions are 1 */
    uint64_t offset;    /* from the start of the data section */
    size_t size;        /* bytes */
    const void *data;   /* inside the mapping */
} tsr_gguf_tensor;

/* Opens and validates `path`. On failure returns a negative status, *out = NULL, and `err`
 * holds one line naming the file and the offset or key at fault. */
int tsr_gguf_open(const char *path, tsr_gguf **out, tsr_error *err);
/* Same, over bytes already in memory (borrowed; must outlive the tsr_gguf). `name` is used in
 * messages. For fuzzing and for tests. */
int tsr_gguf_open_memory(const void *data, size_t size, const char *name, tsr_gguf **out,
                         tsr_error *err);
void tsr_gguf_close(tsr_gguf *g);

const char *tsr_gguf_path(const tsr_gguf *g);
uint32_t tsr_gguf_version(const tsr_gguf *g);

/* Metadata. Keys are looked up by exact name; -1 if absent. */
int64_t tsr_gguf_find_key(const tsr_gguf *g, const char *key);
int64_t tsr_gguf_n_keys(const tsr_gguf *g);
tsr_gguf_str tsr_gguf_key_name(const tsr_gguf *g, int64_t i);
tsr_gguf_type tsr_gguf_key_type(const tsr_gguf *g, int64_t i);

/* Typed getters with conversion between integer widths (range-checked) and from float32 to
 * float64. They return false (and fill err, naming the file and key) when the key is absent
 * or of an incompatible type; the *_or variants return `fallback` when absent. */
bool tsr_gguf_get_u64(const tsr_gguf *g, const char *key, uint64_t *out, tsr_error *err);
bool tsr_gguf_get_i64(const tsr_gguf *g, const char *key, int64_t *out, tsr_error *err);
bool tsr_gguf_get_f64(const tsr_gguf *g, const char *key, double *out, tsr_error *err);
bool tsr_gguf_get_bool(const tsr_gguf *g, const char *key, bool *out, tsr_error *err);
bool tsr_gguf_get_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out, tsr_error *err);
uint64_t tsr_gguf_u64_or(const tsr_gguf *g, const char *key, uint64_t fallback);
double tsr_gguf_f64_or(const tsr_gguf *g, const char *key, double fallback);
bool tsr_gguf_bool_or(const tsr_gguf *g, const char *key, bool fallback);

/* Arrays: element type, length, and element access. Strings of an array of strings come back
 * as tsr_gguf_str; numbers through the converting getters. */
bool tsr_gguf_get_arr(const tsr_gguf *g, const char *key, tsr_gguf_type *elem_type, uint64_t *n,
                      tsr_error *err);
tsr_gguf_str tsr_gguf_arr_str(const tsr_gguf *g, const char *key, uint64_t i);
double tsr_gguf_arr_f64(const tsr_gguf *g, const char *key, uint64_t i);
int64_t tsr_gguf_arr_i64(const tsr_gguf *g, const char *key, uint64_t i);

/* Tensors. */
int64_t tsr_gguf_n_tensors(const tsr_gguf *g);
const tsr_gguf_tensor *tsr_gguf_tensor_at(const tsr_gguf *g, int64_t i);
const tsr_gguf_tensor *tsr_gguf_find_tensor(const tsr_gguf *g, const char *name);

#endif
