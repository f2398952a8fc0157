/* Output files (logits, quantized and synthetic models) written the way careful Unix tools
 * write them, so that a failure, an interruption or a second run writing the same file never
 * leaves a partial or mixed file, and a device is never replaced by a file:
 *
 *   - a regular file, or a name that does not exist yet, is written into a new temporary file
 *     (mkstemp) beside it, which is flushed to disk and then renamed over it: readers see the
 *     old file or the whole new one. A symbolic link is followed: the file it names is
 *     replaced and the link stays. A new file gets the mode 0666 less the umask, a replaced
 *     one keeps its mode.
 *   - anything else that exists (a character device such as /dev/stdout or /dev/null, a FIFO)
 *     is opened and written directly, never replaced.
 *   - a folder, an empty name and a link to nothing are refused, and so is the file a command
 *     reads (its input) under any name.
 *
 * SIGINT, SIGTERM and SIGHUP while a temporary file exists remove it before the process dies
 * of the signal as it would have (handlers are installed only where the signal's action is
 * the default one).
 *
 * Usage: tsr_outfile_open(&o, path, input, err); tsr_outfile_write(&o, ...)...;
 * tsr_outfile_commit(&o, err), or tsr_outfile_discard(&o) to give up. Not thread-safe: one
 * thread writes one outfile. */
#ifndef TSR_HOST_OUTFILE_H
#define TSR_HOST_OUTFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "base/error.h"

typedef struct tsr_outfile {
    char *path;      /* as given, for messages */
    char *target;    /* the regular file the rename replaces; NULL when written directly */
    char *tmp;       /* the temporary file beside target, until commit or discard */
    FILE *f;
    int write_errno; /* of the first write that failed, 0 while none has */
    int slot;        /* 1 + its entry in the table the signal handler reads; 0 for none */
} tsr_outfile;

/* Opens `path` for writing as described above. `input` (may be NULL) is a file the caller
 * reads, which the output must not be. Errors, one line naming the path:
 *   "out.gguf: is a folder; expected a file name"
 *   "in.gguf: is the input file in.gguf; write the output to another file"
 *   "dir/out.gguf: cannot create: No such file or directory" */
tsr_status tsr_outfile_open(tsr_outfile *o, const char *path, const char *input, tsr_error *err);

/* Appends bytes; false once a write has failed (the error is reported by commit). */
bool tsr_outfile_write(tsr_outfile *o, const void *data, size_t size);

/* Finishes the file: flush, fsync and rename for a temporary file, close for a direct one.
 * On failure the temporary file is removed, the destination is untouched and err says why
 * ("out.gguf: cannot write: No space left on device"). `o` is closed either way. */
tsr_status tsr_outfile_commit(tsr_outfile *o, tsr_error *err);

/* Closes without finishing: the temporary file is removed. A zeroed or closed `o` is allowed. */
void tsr_outfile_discard(tsr_outfile *o);

/* True when the output is written directly into this process's standard output (OUT is
 * /dev/stdout or the same pipe or device), so that reports belong on stderr instead. */
bool tsr_outfile_is_stdout(const tsr_outfile *o);

#endif
