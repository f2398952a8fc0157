/* The `tessera` command line: one function per subcommand, each returning the exit status. */
#ifndef TSR_HOST_CLI_H
#define TSR_HOST_CLI_H

#include <stdbool.h>

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
int tsr_cli_quantize(int argc, char **argv);
int tsr_cli_synth(int argc, char **argv);
int tsr_cli_validate(int argc, char **argv);

/* Prints "tessera: <message>" on stderr. */
void tsr_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* True when argv[i] is -h or --help. */
bool tsr_cli_is_help(const char *arg);

/* The folders given with --plugin-dir, searched before all others. */
#define TSR_CLI_MAX_PLUGIN_DIRS 16
typedef struct tsr_cli_plugin_dirs {
    const char *dir[TSR_CLI_MAX_PLUGIN_DIRS];
    size_t n;
} tsr_cli_plugin_dirs;

/* Takes "--plugin-dir DIR" at argv[*i] (moving *i to DIR): 1 when taken, 0 when argv[*i] is
 * another argument, -1 (a usage error) when DIR is missing or more than
 * TSR_CLI_MAX_PLUGIN_DIRS were given. */
int tsr_cli_take_plugin_dir(int argc, char **argv, int *i, tsr_cli_plugin_dirs *dirs);

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
