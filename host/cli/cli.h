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

/* A registry scanned with the standard search order plus `extra_dirs`; load problems are
 * printed as warnings when `report` is set. */
tsr_registry *tsr_cli_registry(tsr_pool *pool, char *const *extra_dirs, size_t n_extra,
                               bool report);

/* Binds the config's plugins against the registry. When a configured plugin is missing
 * because its object was refused at load, the error is that refusal (which names the file,
 * the stage and both versions) rather than "unknown plugin". */
tsr_status tsr_cli_bind(tsr_config *cfg, tsr_registry *reg, tsr_error *err);

#endif
