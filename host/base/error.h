/* Error reporting inside the host: a function that fails fills a tsr_error with one line
 * (which file, which key or offset, what was expected) and returns a negative tsr_status. */
#ifndef TSR_HOST_ERROR_H
#define TSR_HOST_ERROR_H

#include <stddef.h>

#include <tessera/common.h>

typedef struct tsr_error {
    char msg[1024];
} tsr_error;

/* Sets the message (printf-style) and returns `status`, so callers can write
 * `return tsr_error_set(err, TSR_E_INVALID, "%s: ...", path);`. `err` may be NULL. */
tsr_status tsr_error_set(tsr_error *err, tsr_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Copies user text for quoting in a one-line message: control characters become '?', and text
 * longer than the buffer is cut with "...". Returns buf. */
const char *tsr_text_excerpt(char *buf, size_t size, const char *text);

#endif
