#include "base/number.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool tsr_text_to_int(const char *text, int64_t *out) {
    const char *digits = text + (*text == '+' || *text == '-');
    bool hex = digits[0] == '0' && (digits[1] == 'x' || digits[1] == 'X');
    /* strtoll alone would take leading blanks, a second sign and an empty "0x" */
    if (hex ? !isxdigit((unsigned char)digits[2]) : !isdigit((unsigned char)digits[0]))
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, hex ? 16 : 10);
    if (errno == ERANGE || *end != '\0') return false;
    *out = v;
    return true;
}

bool tsr_text_to_float(const char *text, double *out) {
    if (*text == '\0' || isspace((unsigned char)*text)) return false;
    char *end;
    double v = strtod(text, &end);
    if (*end != '\0' || !isfinite(v)) return false;
    *out = v;
    return true;
}

tsr_status tsr_parse_int(const char *what, const char *text, int64_t min, int64_t max,
                         int64_t *out, tsr_error *err) {
    int64_t v;
    if (tsr_text_to_int(text, &v) && v >= min && v <= max) {
        *out = v;
        return TSR_OK;
    }
    char got[64];
    return tsr_error_set(err, TSR_E_INVALID,
                         "%s: expected an integer in [%" PRId64 ", %" PRId64 "], got '%s'", what,
                         min, max, tsr_text_excerpt(got, sizeof got, text));
}

tsr_status tsr_parse_int_word(const char *what, const char **p, const char *separators,
                              int64_t min, int64_t max, int64_t *out, tsr_error *err) {
    size_t len = strcspn(*p, separators);
    char word[64];
    /* A longer word is no number in range: cut, it still reads as none ("..." sees to that). */
    if (len < sizeof word) snprintf(word, sizeof word, "%.*s", (int)len, *p);
    else snprintf(word, sizeof word, "%.*s...", (int)sizeof word - 4, *p);
    *p += len;
    return tsr_parse_int(what, word, min, max, out, err);
}
