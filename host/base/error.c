#include "base/error.h"

#include <stdarg.h>
#include <stdio.h>

tsr_status tsr_error_set(tsr_error *err, tsr_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return status;
}
