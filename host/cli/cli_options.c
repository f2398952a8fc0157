/* Option values on the command line: one message form for every command. */
#include <stdio.h>
#include <string.h>

#include "base/number.h"
#include "cli/cli.h"

const char *tsr_cli_value(const char *cmd, int argc, char **argv, int *i, const char *what) {
    if (*i + 1 >= argc) {
        tsr_cli_error("%s: %s needs a value (%s)", cmd, argv[*i], what);
        return NULL;
    }
    return argv[++*i];
}

static bool named(const char *arg, const char *name, const char *alias) {
    return !strcmp(arg, name) || (alias && !strcmp(arg, alias));
}

int tsr_cli_take_text(const char *cmd, int argc, char **argv, int *i,
                      const tsr_cli_text_opt *opts, size_t n) {
    const char *a = argv[*i];
    for (size_t k = 0; k < n; k++) {
        if (!named(a, opts[k].name, opts[k].alias)) continue;
        *opts[k].value = tsr_cli_value(cmd, argc, argv, i, opts[k].what);
        return *opts[k].value ? 1 : -1;
    }
    return 0;
}

static bool take_int_value(const char *cmd, int argc, char **argv, int *i, const char *what,
                           int64_t min, int64_t max, int64_t *out) {
    const char *option = argv[*i], *text = tsr_cli_value(cmd, argc, argv, i, what);
    tsr_error err;
    if (!text) return false;
    if (tsr_parse_int(option, text, min, max, out, &err) == TSR_OK) return true;
    tsr_cli_error("%s: %s", cmd, err.msg);
    return false;
}

int tsr_cli_take_int(const char *cmd, int argc, char **argv, int *i, const tsr_cli_int_opt *opts,
                     size_t n) {
    const char *a = argv[*i];
    for (size_t k = 0; k < n; k++) {
        if (!named(a, opts[k].name, opts[k].alias)) continue;
        return take_int_value(cmd, argc, argv, i, opts[k].what, opts[k].min, opts[k].max,
                              opts[k].value) ? 1 : -1;
    }
    return 0;
}

bool tsr_cli_int_list(const char *cmd, const char *option, const char *text, int64_t min,
                      int64_t max, const char *noun, int64_t *out, int max_n, int *n) {
    tsr_error err;
    *n = 0;
    for (const char *p = text; *n == 0 || *p++ == ',';) {
        if (*n == max_n) {
            char quoted[64];
            tsr_cli_error("%s: %s: at most %d %s, got '%s'", cmd, option, max_n, noun,
                          tsr_text_excerpt(quoted, sizeof quoted, text));
            return false;
        }
        if (tsr_parse_int_word(option, &p, ",", min, max, &out[*n], &err) < 0) {
            tsr_cli_error("%s: %s", cmd, err.msg);
            return false;
        }
        ++*n;
    }
    return true;
}

int tsr_cli_take_flag(const char *arg, const char *name, const char *alias, bool *flag) {
    if (!named(arg, name, alias)) return 0;
    *flag = true;
    return 1;
}

int tsr_cli_bad_arg(const char *cmd, const char *arg) {
    char quoted[64];
    tsr_text_excerpt(quoted, sizeof quoted, arg);
    if (arg[0] == '-' && arg[1])
        tsr_cli_error("%s: unknown option '%s' (see tessera %s --help)", cmd, quoted, cmd);
    else
        tsr_cli_error("%s: unexpected argument '%s' (see tessera %s --help)", cmd, quoted, cmd);
    return TSR_EXIT_USAGE;
}
