/* Plugin parameters: the host validates configured text values against a plugin's declared
 * table (type, range, choices) and hands the plugin typed values. */
#ifndef TSR_HOST_PARAMS_H
#define TSR_HOST_PARAMS_H

#include <stdio.h>

#include <tessera/common.h>

#include "base/error.h"

/* Where a configured value came from, for error lines "file:line:col: ...". line/col are
 * 1-based; 0 means unknown (a value from --set has file "--set" and line 0). */
typedef struct tsr_src_loc {
    const char *file;
    int line, col;
} tsr_src_loc;

/* One configured key = value as text, before validation. */
typedef struct tsr_kv_text {
    char *key;
    char *value;
    tsr_src_loc loc;
} tsr_kv_text;

/* Typed values bound to a plugin's table, as the plugin receives them (`params`). */
typedef struct tsr_bound_params {
    tsr_params params;
    tsr_param_value *values; /* (params.count) */
    char **strings;          /* (params.count) owned copies of STRING/ENUM texts, else NULL */
} tsr_bound_params;

/* Checks a plugin's own table: struct_size equal to the host's (the table is an array, so
 * another element size would misplace every entry), names well-formed and unique, known types,
 * whole-number INT bounds, defaults that parse and lie in range, ENUM choices present, non-empty
 * and unique, each known role on one parameter at most and of the role's type. The loader
 * refuses a plugin that fails.
 * `who` prefixes the message (e.g. "cache-foo.so: plugin 'foo'"). */
tsr_status tsr_param_table_check(const tsr_param_def *defs, uint32_t n, const char *who,
                                 tsr_error *err);

/* Binds `kv` (n entries) to the table of plugin `plugin`: every key must be declared, every
 * value must parse as its type and lie within range/choices; undeclared parameters take their
 * defaults; a required parameter (default NULL) must be given. `section` names the YAML path for
 * messages ("cache" gives "cache.window"); `where` locates the stage (missing-parameter errors).
 * On success `out` owns its arrays (free with tsr_bound_params_free); on failure it is empty.
 * Errors are one line:
 *   "<file>:<line>:<col>: cache.window: expected an integer in [1, 1048576], got 'abc'"
 *   "<file>:<line>:<col>: cache: unknown parameter 'windw' for plugin 'streaming'; known: ..."
 *   "<file>:<line>:<col>: cache.window: required parameter is missing" */
tsr_status tsr_params_bind(const tsr_param_def *defs, uint32_t n, const char *plugin,
                           const char *section, tsr_src_loc where, const tsr_kv_text *kv,
                           size_t n_kv, tsr_bound_params *out, tsr_error *err);
void tsr_bound_params_free(tsr_bound_params *p);

/* The index of the parameter with `role` (tsr_param_role) in a checked table, or -1. */
int32_t tsr_param_find_role(const tsr_param_def *defs, uint32_t n, int32_t role);

/* "threads", "seed", "temperature", "weight type", "parallel": a role as messages name it. */
const char *tsr_param_role_name(int32_t role);

/* Prints the table for `tessera plugins info`: one parameter per line with type, default,
 * range or choices, unit and doc. */
void tsr_param_table_print(FILE *f, const tsr_param_def *defs, uint32_t n);

/* Parses one text value of `def` (BOOL: true/false/yes/no/on/off/1/0, any case; INT: decimal
 * or 0x hex int64; FLOAT: finite strtod number; ENUM: one of the choices, exactly; STRING:
 * anything) and checks the range. out->s borrows `text`. Error:
 *   "<loc>: <section>.<name>: expected <what>, got '<text>'". */
tsr_status tsr_param_parse(const tsr_param_def *def, const char *text, const char *section,
                           tsr_src_loc loc, tsr_param_value *out, tsr_error *err);

/* Writes "file:line:col" (or just "file" when line is 0) into buf. */
void tsr_src_loc_format(char *buf, size_t size, tsr_src_loc loc);

/* tsr_error_set with a "file:line:col: " prefix. */
tsr_status tsr_error_set_at(tsr_error *err, tsr_status status, tsr_src_loc loc,
                            const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
