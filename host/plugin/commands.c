#include "plugin/commands.h"

#include "base/number.h"

#include <ffi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ARGS 16

typedef struct signature {
    char ret;
    char args[MAX_ARGS];
    size_t n_args;
} signature;

static bool parse_signature(const char *text, signature *sig) {
    if (!text || !strchr("vildsb", text[0]) || text[0] == '\0' || text[1] != '(') return false;
    sig->ret = text[0];
    sig->n_args = 0;
    const char *p = text + 2;
    for (; *p && *p != ')'; p++) {
        if (!strchr("ildsbI", *p) || sig->n_args == MAX_ARGS) return false;
        /* The instance can only come first: it is the object the command acts on. */
        if (*p == 'I' && sig->n_args != 0) return false;
        sig->args[sig->n_args++] = *p;
    }
    return *p == ')' && p[1] == '\0';
}

static bool command_name_ok(const char *name) {
    if (!name || !*name) return false;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return false;
    return true;
}

tsr_status tsr_command_check(const tsr_command *cmd, const char *who, tsr_error *err) {
    signature sig;
    if (cmd->struct_size < offsetof(tsr_command, returns_status) + sizeof(cmd->returns_status))
        return tsr_error_set(err, TSR_E_INVALID, "%s: command struct_size %u is too small", who,
                             cmd->struct_size);
    if (!command_name_ok(cmd->name))
        return tsr_error_set(err, TSR_E_INVALID, "%s: command name '%s' is not valid ([a-z0-9_]+)",
                             who, cmd->name ? cmd->name : "(null)");
    if (!parse_signature(cmd->signature, &sig))
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: command '%s': signature '%s' is not valid; expected R(A...) with "
                             "R in v,i,l,d,s,b and A in i,l,d,s,b (I first for the instance)",
                             who, cmd->name, cmd->signature ? cmd->signature : "(null)");
    if (!cmd->fn)
        return tsr_error_set(err, TSR_E_INVALID, "%s: command '%s': function is NULL", who,
                             cmd->name);
    return TSR_OK;
}

const tsr_command *tsr_command_find(const tsr_plugin_desc *desc, const char *name) {
    for (uint32_t i = 0; i < desc->n_commands; i++)
        if (strcmp(desc->commands[i].name, name) == 0) return &desc->commands[i];
    return NULL;
}

static const char *type_word(char t) {
    switch (t) {
    case 'i': return "a 32-bit integer";
    case 'l': return "a 64-bit integer";
    case 'd': return "a number";
    case 'b': return "true or false";
    default: return "text";
    }
}

static ffi_type *ffi_type_of(char t) {
    switch (t) {
    case 'i': case 'b': return &ffi_type_sint32;
    case 'l': return &ffi_type_sint64;
    case 'd': return &ffi_type_double;
    case 's': case 'I': return &ffi_type_pointer;
    default: return &ffi_type_void;
    }
}

/* One argument's storage, whatever its type. */
typedef union arg_value {
    int32_t i;
    int64_t l;
    double d;
    const char *s;
    void *p;
} arg_value;

/* Numbers as parameters take them (base/number.h). */
static bool convert(char t, const char *text, arg_value *v) {
    int64_t x;
    switch (t) {
    case 'i':
        if (!tsr_text_to_int(text, &x) || x < INT32_MIN || x > INT32_MAX) return false;
        v->i = (int32_t)x;
        return true;
    case 'l':
        if (!tsr_text_to_int(text, &x)) return false;
        v->l = x;
        return true;
    case 'd': return tsr_text_to_float(text, &v->d);
    case 'b':
        if (!strcmp(text, "true") || !strcmp(text, "1")) v->i = 1;
        else if (!strcmp(text, "false") || !strcmp(text, "0")) v->i = 0;
        else return false;
        return true;
    default:
        v->s = text;
        return true;
    }
}

tsr_status tsr_command_call(const tsr_command *cmd, void *instance, const char *const *args,
                            size_t n_args, char *ret, size_t ret_cap, tsr_error *err) {
    signature sig;
    if (!parse_signature(cmd->signature, &sig))
        return tsr_error_set(err, TSR_E_INVALID, "command '%s': bad signature '%s'", cmd->name,
                             cmd->signature);
    bool wants_instance = sig.n_args > 0 && sig.args[0] == 'I';
    size_t n_text = sig.n_args - (wants_instance ? 1 : 0);
    if (n_args != n_text)
        return tsr_error_set(err, TSR_E_INVALID, "command '%s' takes %zu argument%s (%s), got %zu",
                             cmd->name, n_text, n_text == 1 ? "" : "s", cmd->signature, n_args);
    if (wants_instance && !instance)
        return tsr_error_set(err, TSR_E_STATE,
                             "command '%s' acts on a live instance; call it from a pipeline's "
                             "hooks: or with a config", cmd->name);

    ffi_type *types[MAX_ARGS];
    arg_value values[MAX_ARGS];
    void *ptrs[MAX_ARGS];
    for (size_t i = 0; i < sig.n_args; i++) {
        types[i] = ffi_type_of(sig.args[i]);
        ptrs[i] = &values[i];
        if (sig.args[i] == 'I') {
            values[i].p = instance;
            continue;
        }
        const char *text = args[i - (wants_instance ? 1 : 0)];
        if (!convert(sig.args[i], text, &values[i]))
            return tsr_error_set(err, TSR_E_INVALID,
                                 "command '%s': argument %zu: expected %s, got '%s'", cmd->name,
                                 i - (wants_instance ? 1 : 0) + 1, type_word(sig.args[i]), text);
    }

    ffi_cif cif;
    if (ffi_prep_cif(&cif, FFI_DEFAULT_ABI, (unsigned)sig.n_args, ffi_type_of(sig.ret), types) !=
        FFI_OK)
        return tsr_error_set(err, TSR_E_INTERNAL, "command '%s': libffi cannot prepare the call",
                             cmd->name);
    /* libffi widens integral returns to a full register (ffi_arg). */
    union {
        ffi_arg integral;
        int64_t l;
        double d;
        const char *s;
    } result = {0};
    ffi_call(&cif, cmd->fn, &result, ptrs);

    switch (sig.ret) {
    case 'v': snprintf(ret, ret_cap, "%s", ""); break;
    case 'i': case 'b': {
        int32_t v = (int32_t)result.integral;
        if (cmd->returns_status && v < 0)
            return tsr_error_set(err, v, "command '%s' failed (status %d)", cmd->name, v);
        if (sig.ret == 'b') snprintf(ret, ret_cap, "%s", v ? "true" : "false");
        else snprintf(ret, ret_cap, "%d", v);
        break;
    }
    case 'l': snprintf(ret, ret_cap, "%lld", (long long)result.l); break;
    case 'd': snprintf(ret, ret_cap, "%.17g", result.d); break;
    case 's': snprintf(ret, ret_cap, "%s", result.s ? result.s : "(null)"); break;
    }
    return TSR_OK;
}
