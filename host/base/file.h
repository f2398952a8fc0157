/* Opening the files the host reads: models, tokenizers, configs. A FIFO, a device or a folder
 * given where a file is expected would block the open (a FIFO waits for a writer) or be read
 * as a stream of unknown length, so these files are opened through here and must be regular
 * files. */
#ifndef TSR_HOST_FILE_H
#define TSR_HOST_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "base/error.h"

/* Opens `path` read-only (close-on-exec) when it is a regular file, without blocking on
 * anything else, and gives its size in *size (size may be NULL). Returns the descriptor, or a
 * negative status with one line in err: "<path>: cannot open: <reason>" or
 * "<path>: a FIFO, not a regular file" (a folder, a character device, ...). */
int tsr_file_open_regular(const char *path, uint64_t *size, tsr_error *err);

/* Reads the whole regular file `path` into *out (malloc'd, with a NUL after the last byte;
 * the caller frees it) and its length into *size. A file of more than max_bytes is refused
 * before it is read: "<path>: 20000000 bytes; a <what> has at most 16777216". On failure
 * *out is NULL and err holds one line naming the file. */
tsr_status tsr_file_read(const char *path, size_t max_bytes, const char *what, char **out,
                         size_t *size, tsr_error *err);

#endif
