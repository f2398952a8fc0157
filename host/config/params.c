/* Plugin parameters: text values from a config checked against a plugin's declared table. */
#include "config/params.h"

#include "base/number.h"

#include <ctype.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void tsr_src_loc_format(char *buf, size_t size, tsr_src_loc loc) {
    const char *file = loc.file ? loc.file : "<unknown>";
    if (loc.line > 0)
        snprintf(buf, size, "%s:%d:%d", file, loc.line, loc.col);
    else
        snprintf(buf, size, "%s", file);
}

tsr_status tsr_error_set_at(tsr_error *err, tsr_status status, tsr_src_loc loc,
                            const char *fmt, ...) {
    char where[512], msg[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tsr_src_loc_format(where, sizeof where, loc);
    return tsr_error_set(err, status, "%s: %s", where, msg);
}

static bool param_bounded(const tsr_param_def *d) {
    return (d->type == TSR_PARAM_INT || d->type == TSR_PARAM_FLOAT) && d->min <= d->max;
}

/* INT bounds are doubles in the table; print them as the integers they stand for. FLOAT bounds
 * get the shortest text that reads back as the same double. */
static void format_bound(char *buf, size_t size, int32_t type, double v) {
    if (type == TSR_PARAM_INT) {
        int64_t i = v >= 0x1p63 ? INT64_MAX : v <= -0x1p63 ? INT64_MIN : (int64_t)v;
        snprintf(buf, size, "%" PRId64, i);
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, size, "%.0f", v); /* %g would write 100 as 1e+02 */
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

static void format_range(char *buf, size_t size, const tsr_param_def *d) {
    char lo[32], hi[32];
    format_bound(lo, sizeof lo, d->type, d->min);
    format_bound(hi, sizeof hi, d->type, d->max);
    snprintf(buf, size, "[%s, %s]", lo, hi);
}

static void join_choices(char *buf, size_t size, const char *const *choices, const char *sep) {
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; choices && choices[i] && used < size; i++) {
        int k = snprintf(buf + used, size - used, "%s%s", i ? sep : "", choices[i]);
        if (k < 0) break;
        used += (size_t)k;
    }
}

/* What a value of `d` must look like, for "expected <what>". */
static void describe(char *buf, size_t size, const tsr_param_def *d) {
    char range[96] = "", bounds[72];
    if (param_bounded(d)) {
        format_range(bounds, sizeof bounds, d);
        snprintf(range, sizeof range, " in %s", bounds);
    }
    switch (d->type) {
    case TSR_PARAM_BOOL: snprintf(buf, size, "a boolean (true/false, yes/no, on/off, 1/0)"); break;
    case TSR_PARAM_INT: snprintf(buf, size, "an integer%s", range); break;
    case TSR_PARAM_FLOAT: snprintf(buf, size, "a number%s", range); break;
    case TSR_PARAM_STRING: snprintf(buf, size, "text"); break;
    case TSR_PARAM_ENUM: {
        char list[400];
        join_choices(list, sizeof list, d->choices, ", ");
        snprintf(buf, size, "one of %s", list);
        break;
    }
    default: snprintf(buf, size, "a value of unknown type %d", (int)d->type); break;
    }
}

static bool parse_bool(const char *s, int *out) {
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) return (*out = 1), true;
        if (strcasecmp(s, no[i]) == 0) return (*out = 0), true;
    }
    return false;
}

/* Parses and range-checks without composing a message. */
static bool parse_value(const tsr_param_def *d, const char *text, tsr_param_value *out) {
    memset(out, 0, sizeof *out);
    out->type = d->type;
    switch (d->type) {
    case TSR_PARAM_BOOL: return parse_bool(text, &out->u.b);
    case TSR_PARAM_INT:
        if (!tsr_text_to_int(text, &out->u.i)) return false;
        return !param_bounded(d) || ((double)out->u.i >= d->min && (double)out->u.i <= d->max);
    case TSR_PARAM_FLOAT:
        if (!tsr_text_to_float(text, &out->u.f)) return false;
        return !param_bounded(d) || (out->u.f >= d->min && out->u.f <= d->max);
    case TSR_PARAM_STRING: out->s = text; return true;
    case TSR_PARAM_ENUM:
        for (int64_t i = 0; d->choices && d->choices[i]; i++) {
            if (strcmp(d->choices[i], text) == 0) {
                out->u.i = i;
                out->s = text;
                return true;
            }
        }
        return false;
    default: return false;
    }
}

tsr_status tsr_param_parse(const tsr_param_def *def, const char *text, const char *section,
                           tsr_src_loc loc, tsr_param_value *out, tsr_error *err) {
    if (parse_value(def, text, out)) return TSR_OK;
    char what[512], got[128];
    describe(what, sizeof what, def);
    return tsr_error_set_at(err, TSR_E_INVALID, loc, "%s.%s: expected %s, got '%s'", section,
                            def->name, what, tsr_text_excerpt(got, sizeof got, text));
}

static bool name_ok(const char *name) {
    if (!name || !*name) return false;
    for (const char *c = name; *c; c++)
        if (!(islower((unsigned char)*c) || isdigit((unsigned char)*c) || *c == '_')) return false;
    return true;
}

static const char *type_name(int32_t type) {
    switch (type) {
    case TSR_PARAM_BOOL: return "bool";
    case TSR_PARAM_INT: return "int";
    case TSR_PARAM_FLOAT: return "float";
    case TSR_PARAM_STRING: return "string";
    case TSR_PARAM_ENUM: return "enum";
    default: return "?";
    }
}

/* Indexed by tsr_param_role. */
static const char *const role_names[] = {
    [TSR_PARAM_ROLE_THREADS] = "threads", [TSR_PARAM_ROLE_SEED] = "seed",
    [TSR_PARAM_ROLE_TEMPERATURE] = "temperature", [TSR_PARAM_ROLE_WEIGHT_TYPE] = "weight type",
    [TSR_PARAM_ROLE_PARALLEL] = "parallel"};
static const int32_t role_types[] = {
    [TSR_PARAM_ROLE_THREADS] = TSR_PARAM_INT, [TSR_PARAM_ROLE_SEED] = TSR_PARAM_INT,
    [TSR_PARAM_ROLE_TEMPERATURE] = TSR_PARAM_FLOAT, [TSR_PARAM_ROLE_WEIGHT_TYPE] = TSR_PARAM_ENUM,
    [TSR_PARAM_ROLE_PARALLEL] = TSR_PARAM_INT};

const char *tsr_param_role_name(int32_t role) {
    return role > 0 && (size_t)role < sizeof role_names / sizeof role_names[0] ? role_names[role]
                                                                              : NULL;
}

int32_t tsr_param_find_role(const tsr_param_def *defs, uint32_t n, int32_t role) {
    for (uint32_t i = 0; tsr_param_role_name(role) && i < n; i++)
        if (defs[i].role == role) return (int32_t)i;
    return -1;
}

tsr_status tsr_param_table_check(const tsr_param_def *defs, uint32_t n, const char *who,
                                 tsr_error *err) {
    if (n > 0 && !defs)
        return tsr_error_set(err, TSR_E_INVALID, "%s: n_params is %u but params is NULL", who, n);
    for (uint32_t i = 0; i < n; i++) {
        const tsr_param_def *d = &defs[i];
        char text[128];
        /* the table is an array: a different element size would misplace every later entry */
        if (d->struct_size != sizeof *d)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: parameter %u: struct_size %u, expected %zu (use TSR_SIZED)",
                                 who, i, d->struct_size, sizeof *d);
        if (!name_ok(d->name))
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: parameter %u: name '%s' is not [a-z0-9_]+", who, i,
                                 d->name ? tsr_text_excerpt(text, sizeof text, d->name) : "(null)");
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(defs[j].name, d->name) == 0)
                return tsr_error_set(err, TSR_E_INVALID, "%s: parameter '%s' is declared twice",
                                     who, d->name);
        if (d->type < TSR_PARAM_BOOL || d->type > TSR_PARAM_ENUM)
            return tsr_error_set(err, TSR_E_INVALID, "%s: parameter '%s': unknown type %d", who,
                                 d->name, (int)d->type);
        if ((d->type == TSR_PARAM_INT || d->type == TSR_PARAM_FLOAT) &&
            (isnan(d->min) || isnan(d->max)))
            return tsr_error_set(err, TSR_E_INVALID, "%s: parameter '%s': min or max is NaN", who,
                                 d->name);
        if (d->type == TSR_PARAM_INT && param_bounded(d) &&
            (d->min != floor(d->min) || d->max != floor(d->max)))
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: parameter '%s': integer bounds [%g, %g] are not whole "
                                 "numbers",
                                 who, d->name, d->min, d->max);
        if (d->type == TSR_PARAM_ENUM) {
            if (!d->choices || !d->choices[0])
                return tsr_error_set(err, TSR_E_INVALID, "%s: parameter '%s': enum without choices",
                                     who, d->name);
            for (size_t c = 0; d->choices[c]; c++) {
                if (!*d->choices[c])
                    return tsr_error_set(err, TSR_E_INVALID,
                                         "%s: parameter '%s': choice %zu is empty", who, d->name,
                                         c);
                for (size_t e = 0; e < c; e++)
                    if (strcmp(d->choices[e], d->choices[c]) == 0)
                        return tsr_error_set(err, TSR_E_INVALID,
                                             "%s: parameter '%s': choice '%s' is listed twice", who,
                                             d->name, d->choices[c]);
            }
        }
        const char *role = tsr_param_role_name(d->role);
        if (role && d->type != role_types[d->role])
            return tsr_error_set(err, TSR_E_INVALID, "%s: parameter '%s': role %s needs a "
                                 "parameter of type %s", who, d->name, role,
                                 type_name(role_types[d->role]));
        for (uint32_t j = 0; role && j < i; j++)
            if (defs[j].role == d->role)
                return tsr_error_set(err, TSR_E_INVALID, "%s: parameters '%s' and '%s' both have "
                                     "role %s", who, defs[j].name, d->name, role);
        tsr_param_value v;
        if (d->default_value && !parse_value(d, d->default_value, &v)) {
            char what[512];
            describe(what, sizeof what, d);
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: parameter '%s': default: expected %s, got '%s'", who,
                                 d->name, what,
                                 tsr_text_excerpt(text, sizeof text, d->default_value));
        }
    }
    return TSR_OK;
}

static tsr_status unknown_param(const tsr_param_def *defs, uint32_t n, const char *plugin,
                                const char *section, const tsr_kv_text *kv, tsr_error *err) {
    char known[600] = "", key[128];
    size_t used = 0;
    for (uint32_t i = 0; i < n && used < sizeof known; i++) {
        int k = snprintf(known + used, sizeof known - used, "%s%s", i ? ", " : "", defs[i].name);
        if (k < 0) break;
        used += (size_t)k;
    }
    tsr_text_excerpt(key, sizeof key, kv->key);
    if (n == 0)
        return tsr_error_set_at(err, TSR_E_INVALID, kv->loc,
                                "%s: unknown parameter '%s' for plugin '%s'; it takes none",
                                section, key, plugin);
    return tsr_error_set_at(err, TSR_E_INVALID, kv->loc,
                            "%s: unknown parameter '%s' for plugin '%s'; known: %s", section, key,
                            plugin, known);
}

static tsr_status bind_fail(tsr_bound_params *out, tsr_status status) {
    tsr_bound_params_free(out);
    return status;
}

tsr_status tsr_params_bind(const tsr_param_def *defs, uint32_t n, const char *plugin,
                           const char *section, tsr_src_loc where, const tsr_kv_text *kv,
                           size_t n_kv, tsr_bound_params *out, tsr_error *err) {
    memset(out, 0, sizeof *out);
    for (size_t k = 0; k < n_kv; k++) {
        uint32_t i = 0;
        while (i < n && strcmp(defs[i].name, kv[k].key) != 0) i++;
        if (i == n) return unknown_param(defs, n, plugin, section, &kv[k], err);
        for (size_t j = 0; j < k; j++) {
            if (strcmp(kv[j].key, kv[k].key) == 0) {
                char first[512], key[128];
                tsr_src_loc_format(first, sizeof first, kv[j].loc);
                return tsr_error_set_at(err, TSR_E_INVALID, kv[k].loc,
                                        "%s.%s: given twice (first at %s)", section,
                                        tsr_text_excerpt(key, sizeof key, kv[k].key), first);
            }
        }
    }
    out->values = calloc(n ? n : 1, sizeof *out->values);
    out->strings = calloc(n ? n : 1, sizeof *out->strings);
    if (!out->values || !out->strings)
        return bind_fail(out, tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", section));
    out->params = (tsr_params){
        .struct_size = sizeof out->params, .count = n, .defs = defs, .values = out->values};
    for (uint32_t i = 0; i < n; i++) {
        const tsr_param_def *d = &defs[i];
        const tsr_kv_text *given = NULL;
        for (size_t k = 0; k < n_kv && !given; k++)
            if (strcmp(kv[k].key, d->name) == 0) given = &kv[k];
        const char *text = given ? given->value : d->default_value;
        if (!text)
            return bind_fail(out, tsr_error_set_at(err, TSR_E_INVALID, where,
                                                   "%s.%s: required parameter is missing",
                                                   section, d->name));
        char default_of[256];
        snprintf(default_of, sizeof default_of, "plugin '%s' default", plugin);
        tsr_src_loc loc = given ? given->loc : (tsr_src_loc){default_of, 0, 0};
        tsr_status st = tsr_param_parse(d, text, section, loc, &out->values[i], err);
        if (st < 0) return bind_fail(out, st);
        if (d->type == TSR_PARAM_STRING || d->type == TSR_PARAM_ENUM) {
            out->strings[i] = strdup(text);
            if (!out->strings[i])
                return bind_fail(out,
                                 tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", section));
            out->values[i].s = out->strings[i];
        }
    }
    return TSR_OK;
}

void tsr_bound_params_free(tsr_bound_params *p) {
    if (!p) return;
    for (uint32_t i = 0; p->strings && i < p->params.count; i++) free(p->strings[i]);
    free(p->strings);
    free(p->values);
    memset(p, 0, sizeof *p);
}

/* Columns: name, type, default, constraint (range or choices, then unit), doc. */
static void format_columns(const tsr_param_def *d, char *dflt, size_t n_dflt, char *cons,
                           size_t n_cons) {
    if (!d->default_value)
        snprintf(dflt, n_dflt, "required");
    else
        snprintf(dflt, n_dflt, "default %s", *d->default_value ? d->default_value : "''");
    cons[0] = '\0';
    if (param_bounded(d))
        format_range(cons, n_cons, d);
    else if (d->type == TSR_PARAM_ENUM)
        join_choices(cons, n_cons, d->choices, "|");
    if (d->unit && *d->unit) {
        size_t used = strlen(cons);
        snprintf(cons + used, n_cons - used, "%s%s", used ? " " : "", d->unit);
    }
}

void tsr_param_table_print(FILE *f, const tsr_param_def *defs, uint32_t n) {
    int w_name = 0, w_type = 0, w_dflt = 0, w_cons = 0;
    char dflt[128], cons[256];
    for (uint32_t i = 0; i < n; i++) {
        format_columns(&defs[i], dflt, sizeof dflt, cons, sizeof cons);
        int l_name = (int)strlen(defs[i].name), l_type = (int)strlen(type_name(defs[i].type));
        int l_dflt = (int)strlen(dflt), l_cons = (int)strlen(cons);
        w_name = l_name > w_name ? l_name : w_name;
        w_type = l_type > w_type ? l_type : w_type;
        w_dflt = l_dflt > w_dflt ? l_dflt : w_dflt;
        w_cons = l_cons > w_cons ? l_cons : w_cons;
    }
    for (uint32_t i = 0; i < n; i++) {
        char line[1024];
        format_columns(&defs[i], dflt, sizeof dflt, cons, sizeof cons);
        const char *role = tsr_param_role_name(defs[i].role);
        snprintf(line, sizeof line, "  %-*s  %-*s  %-*s  %-*s  %s%s%s%s", w_name, defs[i].name,
                 w_type, type_name(defs[i].type), w_dflt, dflt, w_cons, cons,
                 defs[i].doc ? defs[i].doc : "", role ? " (role: " : "", role ? role : "",
                 role ? ")" : "");
        size_t len = strlen(line);
        while (len > 0 && line[len - 1] == ' ') line[--len] = '\0';
        fprintf(f, "%s\n", line);
    }
}
