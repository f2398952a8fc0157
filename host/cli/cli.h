/* The `tessera` command line: one function per subcommand, each returning the exit status. */
#ifndef TSR_HOST_CLI_H
#define TSR_HOST_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "config/config.h"
#include "plugin/loader.h"

/* Exit statuses: 0 success, 1 the work failed (bad input, refused plugin...), 2 bad usage. */
enum { TSR_EXIT_OK = 0, TSR_EXIT_FAIL = 1, TSR_EXIT_USAGE = 2 };

int tsr_cli_plugins(int argc, char **argv);
int tsr_cli_run(int argc, char **argv);
int tsr_cli_logits(int argc, char **argv);
int tsr_cli_tokenize(int argc, char **argv);
int tsr_cli_bench(int argc, char **argv);
int tsr_cli_perplexity(int argc, char **argv);
int tsr_cli_compare(int argc, char **argv);
int tsr_cli_profile_heads(int argc, char **argv);
int tsr_cli_experts(int argc, char **argv);
int tsr_cli_quantize(int argc, char **argv);
int tsr_cli_synth(int argc, char **argv);
int tsr_cli_validate(int argc, char **argv);

/* Prints "tessera: <message>" on stderr. */
void tsr_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* True when argv[i] is -h or --help. */
bool tsr_cli_is_help(const char *arg);

/* ---- options (cli_options.c) ------------------------------------------------------------
 * Every usage error is one line naming the command and the option, and exits with
 * TSR_EXIT_USAGE. */

/* argv[*i] is an option that takes a value (shown as `what`, e.g. "MODEL"): returns the value
 * and moves *i onto it, or NULL after printing "tessera: CMD: OPT needs a value (WHAT)". */
const char *tsr_cli_value(const char *cmd, int argc, char **argv, int *i, const char *what);

/* An option that takes a text value, for tsr_cli_take_text. */
typedef struct tsr_cli_text_opt {
    const char *name, *alias; /* "-m", "--model"; alias may be NULL */
    const char *what;         /* the value as the usage text shows it: "MODEL" */
    const char **value;       /* where it goes */
} tsr_cli_text_opt;

/* When argv[*i] is one of `opts` (n): stores its value, moves *i onto it and returns 1; -1
 * after printing the line of tsr_cli_value; 0 when it is none of them. */
int tsr_cli_take_text(const char *cmd, int argc, char **argv, int *i,
                      const tsr_cli_text_opt *opts, size_t n);

/* An option that takes an integer in [min, max], for tsr_cli_take_int. */
typedef struct tsr_cli_int_opt {
    const char *name, *alias;
    const char *what;
    int64_t min, max;
    int64_t *value;
} tsr_cli_int_opt;

/* tsr_cli_take_text for integer options (base/number.h), whose other error line is
 * "tessera: CMD: OPT: expected an integer in [MIN, MAX], got 'TEXT'". */
int tsr_cli_take_int(const char *cmd, int argc, char **argv, int *i, const tsr_cli_int_opt *opts,
                     size_t n);

/* "1,2,4", the value of `option`: at most max_n integers in [min, max] into out, *n their
 * count. false after printing the line of tsr_cli_take_int for a bad one, or
 * "tessera: CMD: OPT: at most MAX_N NOUN, got 'TEXT'". */
bool tsr_cli_int_list(const char *cmd, const char *option, const char *text, int64_t min,
                      int64_t max, const char *noun, int64_t *out, int max_n, int *n);

/* 1 after setting *flag when `arg` is the option `name` or `alias` (may be NULL), else 0. */
int tsr_cli_take_flag(const char *arg, const char *name, const char *alias, bool *flag);

/* Prints "tessera: CMD: unknown option '-x'" (or "unexpected argument 'x'" for a word)
 * "(see tessera CMD --help)"; returns TSR_EXIT_USAGE. */
int tsr_cli_bad_arg(const char *cmd, const char *arg);

/* ---- output (cli_output.c) ------------------------------------------------------------- */

/* fflush(stdout) for text that streams (run), remembering why it failed. */
void tsr_cli_flush_stdout(void);

/* Flushes stdout; false after printing "tessera: stdout: cannot write: <reason>" when this or
 * an earlier write to it failed (a full disk, /dev/full), so a command never exits 0 having
 * lost its output. */
bool tsr_cli_stdout_ok(void);

/* Progress of long work on stderr: on a terminal one line rewritten in place, elsewhere (a
 * log file, a pipe) only the final line. */
typedef struct tsr_cli_progress {
    const char *what; /* "quantize", "perplexity" */
    uint64_t t0;
    double quiet_s;   /* nothing is shown before this many seconds have passed */
    bool tty;
    bool open;        /* a line without its newline is on the terminal */
} tsr_cli_progress;

void tsr_cli_progress_start(tsr_cli_progress *p, const char *what, double quiet_s);
/* "tessera: WHAT: DONE/TOTAL UNIT[, EXTRA], S.S s"; `unit` and `extra` may be NULL. */
void tsr_cli_progress_show(tsr_cli_progress *p, int64_t done, int64_t total, const char *unit,
                           const char *extra);
/* Ends a line left open, so that an error line starts on a line of its own. */
void tsr_cli_progress_end(tsr_cli_progress *p);

/* The folders given with --plugin-dir, searched before all others. */
#define TSR_CLI_MAX_PLUGIN_DIRS 16
typedef struct tsr_cli_plugin_dirs {
    const char *dir[TSR_CLI_MAX_PLUGIN_DIRS];
    size_t n;
} tsr_cli_plugin_dirs;

/* Takes "--plugin-dir DIR" at argv[*i] (moving *i to DIR): 1 when taken, 0 when argv[*i] is
 * another argument, -1 after printing the usage error when DIR is missing or more than
 * TSR_CLI_MAX_PLUGIN_DIRS were given. */
int tsr_cli_take_plugin_dir(const char *cmd, int argc, char **argv, int *i,
                            tsr_cli_plugin_dirs *dirs);

/* A registry searching, in order: `dirs`, the config's plugin_dirs (`cfg` may be NULL), then
 * the standard folders (tsr_registry_add_default_dirs). Its warnings (a named folder missing
 * or without plugins, an unsafe folder) are printed at once. Loads nothing. */
tsr_registry *tsr_cli_registry(tsr_pool *pool, const tsr_cli_plugin_dirs *dirs,
                               const tsr_config *cfg);

/* Binds the config's plugins, loading each from the registry's search path as it is named.
 * A configured plugin whose file was refused fails with that refusal (which names the file and
 * the reason) after the place in the config that names it. */
tsr_status tsr_cli_bind(tsr_config *cfg, tsr_registry *reg, tsr_error *err);

#endif
