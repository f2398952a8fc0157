/* GGUF model files (versions 2 and 3), memory-mapped and checked before use.
 *
 * A tsr_gguf is also the host's in-memory form of any model file: the llama2.c reader
 * (llama2c.h) builds one with GGUF metadata keys and tensor names, so the model graph and the
 * tokenizer read a single interface. There is one struct and two builders: the GGUF parser
 * (tsr_gguf_open*) and the builder functions at the end of this header, which other readers
 * use.
 *
 * Lifetime: everything a tsr_gguf returns (names, strings, tensor descriptors, data pointers)
 * stays valid until tsr_gguf_close. A tsr_gguf is immutable once built and may be read from
 * several threads at once. */
#ifndef TSR_HOST_GGUF_H
#define TSR_HOST_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/error.h"

/* Metadata value types, numbered as in the GGUF file format. */
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
#define TSR_GGUF_TYPE_COUNT 13

/* The GGUF spelling of a value type ("u32", "f32", "str", "arr", ...); "?" if out of range. */
const char *tsr_gguf_type_name(tsr_gguf_type type);

/* Bytes of one value of a fixed-size type in a file; 0 for STRING, ARRAY and unknown types. */
size_t tsr_gguf_type_size(tsr_gguf_type type);

/* A string inside the model (usually inside the mapped file): not NUL-terminated, may hold
 * any bytes. */
typedef struct tsr_gguf_str {
    const char *ptr;
    uint64_t len;
} tsr_gguf_str;

typedef struct tsr_gguf tsr_gguf;

/* One tensor. Its data has been checked to lie inside the model's memory and to hold exactly
 * `size` bytes for its type and shape. */
typedef struct tsr_gguf_tensor {
    const char *name;   /* NUL-terminated copy of the name */
    int32_t dtype;      /* tsr_dtype (GGML type id); always known to dtype.h */
    uint32_t n_dims;    /* 1..4 as stored (0 is read as a scalar of 1 element) */
    int64_t ne[4];      /* ne[0] innermost; unused dimensions are 1 */
    uint64_t offset;    /* from the start of the data section (a multiple of the alignment) */
    size_t size;        /* bytes */
    const void *data;   /* inside the mapping; aligned to the file's alignment */
} tsr_gguf_tensor;

/* ---------------------------------------------------------------------------------------- */
/* Opening                                                                                    */

/* Maps `path` (read-only, private) and validates it: header, every key, the tensor table,
 * each tensor's type, shape, alignment and extent (inside the data section, and no two
 * tensors sharing a byte). On failure returns a negative status,
 * sets *out = NULL, and `err` holds one line naming the file and the offset or key at fault,
 * e.g. "m.gguf: offset 8: tensor count 4294967296 exceeds the file size (120 bytes)". */
int tsr_gguf_open(const char *path, tsr_gguf **out, tsr_error *err);

/* Same, over `size` bytes already in memory (borrowed: they must outlive the tsr_gguf).
 * `name` is used in messages and returned by tsr_gguf_path. For fuzzing and tests. */
int tsr_gguf_open_memory(const void *data, size_t size, const char *name, tsr_gguf **out,
                         tsr_error *err);

/* Releases the model and its mapping. NULL is allowed. */
void tsr_gguf_close(tsr_gguf *g);

/* The file name given at open (or the builder's name). */
const char *tsr_gguf_path(const tsr_gguf *g);

/* The whole file's mapping that tensor data points into (file offset = pointer - mapping),
 * and its size; NULL and 0 for a model read from memory. */
const void *tsr_gguf_mapping(const tsr_gguf *g, size_t *size);

/* GGUF version of the file (2 or 3); 0 for a model built in memory from another format. */
uint32_t tsr_gguf_version(const tsr_gguf *g);

/* The tensor data alignment in bytes (general.alignment, default 32). */
uint64_t tsr_gguf_alignment(const tsr_gguf *g);

/* ---------------------------------------------------------------------------------------- */
/* Metadata                                                                                   */

/* Number of keys; keys are indexed 0..n-1 in file order. */
int64_t tsr_gguf_n_keys(const tsr_gguf *g);

/* Index of the key named exactly `key` (hash lookup), or -1 if absent. */
int64_t tsr_gguf_find_key(const tsr_gguf *g, const char *key);

/* Name (NUL-terminated) and type of key i, 0 <= i < n_keys. */
const char *tsr_gguf_key_name(const tsr_gguf *g, int64_t i);
tsr_gguf_type tsr_gguf_key_type(const tsr_gguf *g, int64_t i);

/* Prints key i's value into buf (always NUL-terminated, truncated to n-1 bytes): numbers in
 * decimal (floats with %.9g), booleans as true/false, strings quoted with C escapes for
 * control and non-ASCII bytes, arrays as "[<elem type> x N]" e.g. "[str x 32000]". Returns
 * the length the full text would have had, as snprintf does. */
int tsr_gguf_key_format(const tsr_gguf *g, int64_t i, char *buf, size_t n);

/* Typed getters by key name, converting between integer widths (range-checked) and from any
 * number to double. They return false and fill `err` (naming the file and key; err may be
 * NULL) when the key is absent or its value does not fit the requested type. */
bool tsr_gguf_get_u64(const tsr_gguf *g, const char *key, uint64_t *out, tsr_error *err);
bool tsr_gguf_get_i64(const tsr_gguf *g, const char *key, int64_t *out, tsr_error *err);
bool tsr_gguf_get_f64(const tsr_gguf *g, const char *key, double *out, tsr_error *err);
bool tsr_gguf_get_bool(const tsr_gguf *g, const char *key, bool *out, tsr_error *err);
bool tsr_gguf_get_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out, tsr_error *err);

/* The value of `key`, or `fallback` when the key is absent or does not convert. */
uint64_t tsr_gguf_u64_or(const tsr_gguf *g, const char *key, uint64_t fallback);
double tsr_gguf_f64_or(const tsr_gguf *g, const char *key, double fallback);
bool tsr_gguf_bool_or(const tsr_gguf *g, const char *key, bool fallback);

/* Arrays. tsr_gguf_get_arr finds an array key and gives its index `k` (for the element
 * accessors below), element type and length; false (err filled) if absent or not an array.
 * Element access is O(1), including strings (their offsets are indexed at open). */
bool tsr_gguf_get_arr(const tsr_gguf *g, const char *key, int64_t *k, tsr_gguf_type *elem_type,
                      uint64_t *n, tsr_error *err);

/* Element type and length of key k's array (the key must be an array). */
tsr_gguf_type tsr_gguf_arr_type(const tsr_gguf *g, int64_t k);
uint64_t tsr_gguf_arr_len(const tsr_gguf *g, int64_t k);

/* Element i of key k's array, i < length. arr_str needs an array of strings; arr_i64 an array
 * of integers or bools (a u64 above INT64_MAX reads as INT64_MAX); arr_f64 any numbers. A
 * wrong element type gives {NULL, 0} or 0. */
tsr_gguf_str tsr_gguf_arr_str(const tsr_gguf *g, int64_t k, uint64_t i);
int64_t tsr_gguf_arr_i64(const tsr_gguf *g, int64_t k, uint64_t i);
double tsr_gguf_arr_f64(const tsr_gguf *g, int64_t k, uint64_t i);

/* The raw little-endian elements of a numeric or bool array (n * tsr_gguf_type_size bytes),
 * for bulk copies; NULL for arrays of strings. May be unaligned: read it with memcpy. */
const void *tsr_gguf_arr_data(const tsr_gguf *g, int64_t k);

/* ---------------------------------------------------------------------------------------- */
/* Tensors                                                                                    */

int64_t tsr_gguf_n_tensors(const tsr_gguf *g);

/* Tensor i in file order, 0 <= i < n_tensors; NULL out of range. */
const tsr_gguf_tensor *tsr_gguf_tensor_at(const tsr_gguf *g, int64_t i);

/* The tensor named exactly `name` (hash lookup), or NULL. */
const tsr_gguf_tensor *tsr_gguf_find_tensor(const tsr_gguf *g, const char *name);

/* ---------------------------------------------------------------------------------------- */
/* Building a tsr_gguf in memory (for readers of other model formats, e.g. llama2c.c)        */
/*                                                                                            */
/* tsr_gguf_new -> tsr_gguf_adopt_mapping (optional) -> tsr_gguf_add_* ... The model is usable */
/* after every successful call; on failure, close it. Key names and strings are copied;       */
/* tensor data is borrowed (keep it inside the adopted mapping).                              */

/* An empty model named `name` (copied), version 0, alignment 32. NULL on out of memory. */
tsr_gguf *tsr_gguf_new(const char *name);

/* Maps a whole regular file read-only (MAP_PRIVATE); anything else (a FIFO, a folder...) is
 * refused without blocking, as tsr_file_open_regular does. An empty file gives *addr = NULL
 * and *size = 0. The caller hands the mapping to tsr_gguf_adopt_mapping or munmaps it. */
int tsr_gguf_map_file(const char *path, void **addr, size_t *size, tsr_error *err);

/* Hands a mapping made with mmap to the model, which munmaps it at close. */
void tsr_gguf_adopt_mapping(tsr_gguf *g, void *addr, size_t size);

/* Add one scalar key. `type` must be an integer type for add_int (the value must fit it), a
 * float type for add_float. Duplicate keys are refused: "<name>: key 'x' appears twice". */
int tsr_gguf_add_int(tsr_gguf *g, const char *key, tsr_gguf_type type, int64_t value,
                     tsr_error *err);
int tsr_gguf_add_float(tsr_gguf *g, const char *key, tsr_gguf_type type, double value,
                       tsr_error *err);
int tsr_gguf_add_bool(tsr_gguf *g, const char *key, bool value, tsr_error *err);
int tsr_gguf_add_str(tsr_gguf *g, const char *key, const char *value, tsr_error *err);

/* Adds a tensor over `data`, which must hold the bytes of a tensor of that type and shape
 * (n_dims 1..4, unused ne ignored); `offset` is recorded as given. Unknown types, a ne[0]
 * that is not a multiple of the block size, negative dimensions, sizes that overflow and
 * duplicate names are refused. */
int tsr_gguf_add_tensor(tsr_gguf *g, const char *name, int32_t dtype, uint32_t n_dims,
                        const int64_t *ne, const void *data, uint64_t offset, tsr_error *err);

#endif
