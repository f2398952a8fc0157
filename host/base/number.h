/* Numbers typed by a user (command-line options, config values, plugin command arguments),
 * read strictly: the whole text is the number, or it is refused. */
#ifndef TSR_HOST_NUMBER_H
#define TSR_HOST_NUMBER_H

#include <stdbool.h>
#include <stdint.h>

#include "base/error.h"

/* A decimal integer with an optional sign ("-12", "+5") or 0x hexadecimal ("0x1F"), within
 * int64. Refused: empty text, blanks, anything after the digits ("8x", "1.0", "1e3"), a
 * second sign, overflow. Never octal: "010" is ten. */
bool tsr_text_to_int(const char *text, int64_t *out);

/* A finite decimal number as strtod reads it ("0.5", "-2", "1e-3"; a value below the smallest
 * normal double keeps its tiny value). Refused: empty text, leading blanks, anything after the
 * number, nan, inf and values that overflow. */
bool tsr_text_to_float(const char *text, double *out);

/* tsr_text_to_int within [min, max]. Error, naming `what` (an option such as "--ctx"):
 *   "--ctx: expected an integer in [4, 1048576], got '2'" */
tsr_status tsr_parse_int(const char *what, const char *text, int64_t min, int64_t max,
                         int64_t *out, tsr_error *err);

/* tsr_parse_int on the word at *p, up to the first of `separators` (or the end), for lists
 * such as "1,2,4"; moves *p past the word. */
tsr_status tsr_parse_int_word(const char *what, const char **p, const char *separators,
                              int64_t min, int64_t max, int64_t *out, tsr_error *err);

#endif
