#include "base/error.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

tsr_status tsr_error_set(tsr_error *err, tsr_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return status;
}

const char *tsr_text_excerpt(char *buf, size_t size, const char *text) {
    size_t n = strlen(text);
    bool cut = n >= size;
    if (cut) n = size > 4 ? size - 4 : 0;
    for (size_t i = 0; i < n; i++)
        buf[i] = iscntrl((unsigned char)text[i]) ? '?' : text[i];
    if (cut && size > 4)
        memcpy(buf + n, "...", 4);
    else
        buf[n] = '\0';
    return buf;
}
