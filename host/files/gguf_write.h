/* GGUF writer: collects metadata and tensors, then writes a version 3 file.
 *
 * Usage: w = tsr_gguf_writer_new(); tsr_gguf_writer_set_*(w, ...) and
 * tsr_gguf_writer_add_tensor(w, ...) in the order the file should list them;
 * tsr_gguf_writer_write(w, path, err); tsr_gguf_writer_free(w).
 *
 * Keys and strings are copied at once; tensor data is borrowed until write returns. The
 * set/add functions return a negative status on a bad argument (duplicate key or tensor name,
 * value out of range for its type, unknown tensor type, ...) and the writer remembers the
 * first such error: tsr_gguf_writer_write then refuses with that message, so callers may check
 * only the final write. Not thread-safe: one writer per thread. */
#ifndef TSR_HOST_GGUF_WRITE_H
#define TSR_HOST_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/error.h"
#include "base/outfile.h"
#include "files/gguf.h"

typedef struct tsr_gguf_writer tsr_gguf_writer;

/* An empty writer (alignment 32). NULL on out of memory. */
tsr_gguf_writer *tsr_gguf_writer_new(void);

/* Frees the writer and its copies; NULL is allowed. */
void tsr_gguf_writer_free(tsr_gguf_writer *w);

/* Scalar keys. set_uint takes UINT8..UINT64, set_int INT8..INT64, set_float FLOAT32/FLOAT64;
 * the value must fit the type. "general.alignment" must be a UINT32 power of two and sets the
 * alignment the file is written with. */
int tsr_gguf_writer_set_uint(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                             uint64_t value);
int tsr_gguf_writer_set_int(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                            int64_t value);
int tsr_gguf_writer_set_float(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                              double value);
int tsr_gguf_writer_set_bool(tsr_gguf_writer *w, const char *key, bool value);
int tsr_gguf_writer_set_str(tsr_gguf_writer *w, const char *key, const char *value);

/* An array of n numbers or bools of `elem_type`, given as n packed values of that type in
 * host (little-endian) order, e.g. a float[] for FLOAT32 or a uint8_t[] of 0/1 for BOOL. */
int tsr_gguf_writer_set_arr(tsr_gguf_writer *w, const char *key, tsr_gguf_type elem_type,
                            const void *data, uint64_t n);

/* An array of n strings (any bytes). */
int tsr_gguf_writer_set_arr_str(tsr_gguf_writer *w, const char *key, const tsr_gguf_str *strs,
                                uint64_t n);

/* Copies key k of `g` (any type, arrays included) under the same name. */
int tsr_gguf_writer_copy_key(tsr_gguf_writer *w, const tsr_gguf *g, int64_t k);

/* A tensor of n_dims (1..4) dimensions ne[0..n_dims-1] of `dtype`; `data` holds its bytes
 * (tsr_dtype_row_bytes(dtype, ne[0]) * ne[1] * ... ) and must stay valid until write. */
int tsr_gguf_writer_add_tensor(tsr_gguf_writer *w, const char *name, int32_t dtype,
                               uint32_t n_dims, const int64_t *ne, const void *data);

/* Writes the file at `path` through base/outfile.h: into a temporary file beside it, renamed
 * over it when complete (a device or FIFO is written directly; a folder is refused). On any
 * failure (including an earlier set/add error, which is reported before any file is made)
 * no temporary file remains, `path` is untouched, and err holds one line naming the file. */
int tsr_gguf_writer_write(const tsr_gguf_writer *w, const char *path, tsr_error *err);

/* Writes the file into `out`, which the caller opened (tsr_outfile_open) and commits or
 * discards: for commands that open their output before long work, so that a bad OUT is
 * refused at once. An earlier set/add error is returned first. */
int tsr_gguf_writer_write_to(const tsr_gguf_writer *w, tsr_outfile *out, tsr_error *err);

#endif
