/* Helpers shared by the Check tests. */
#ifndef TSR_TESTUTIL_H
#define TSR_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include <check.h>

/* The shared test data folder: $TESSERA_TEST_DATA, else the one the build was configured with
 * (ctest passes it as $TESSERA_TEST_DATA_CONFIGURED), else ../shared. */
const char *tsr_test_data_dir(void);

/* Path of `rel` inside the shared data folder (malloc'd), or NULL when the file is missing. */
char *tsr_test_data_path(const char *rel);

/* Exits with the ctest skip code (77) after printing "skipped: <reason>" when `rel` is missing
 * from the shared data folder; returns its path (malloc'd) otherwise. */
char *tsr_test_require_data(const char *rel);

/* Path of `rel` inside the shared data folder (malloc'd); fails the running test when the file
 * is missing (for tests whose main() already skipped without the shared folder). */
char *tsr_test_data(const char *rel);

/* Reads a whole file (malloc'd, NUL-terminated beyond *size). NULL when unreadable. */
char *tsr_test_read_file(const char *path, size_t *size);

/* A raw little-endian float32 file of the shared data folder (malloc'd), its count in *n; fails
 * the running test when the file is missing. */
float *tsr_test_read_f32(const char *rel, size_t *n);

/* Writes `size` bytes to `path`; returns 0 on success. */
int tsr_test_write_file(const char *path, const void *data, size_t size);

/* A fresh private temporary folder (malloc'd path, mode 0700). */
char *tsr_test_tmpdir(void);

/* The path of `name` in a fresh private temporary folder (malloc'd); fails the running test
 * when the folder cannot be made. */
char *tsr_test_tmp_path(const char *name);

/* A FIFO in a fresh private temporary folder (malloc'd path): opening it for reading blocks
 * until a writer comes, which is what a reader of files must not do. */
char *tsr_test_fifo(void);

/* The number of entries in a folder (not counting . and ..), or -1 when it cannot be read:
 * for checking that a failed or interrupted write left nothing behind. */
int tsr_test_count_entries(const char *dir);

/* Runs `argv` (argv[0] is a path) with stdout and stderr captured into malloc'd strings
 * (either pointer may be NULL to discard). Returns the exit status, or -1 if it did not exit
 * normally (a crash). */
int tsr_test_run(char *const argv[], char **out, char **err);

/* Runs the tessera program ($TESSERA_BIN) with `args` (NULL-terminated, at most 62) like
 * tsr_test_run. */
int tsr_test_tessera(char **out, char **err, const char *const *args);

/* `tessera synth --shape SHAPE --type TYPE -o PATH`, for tests on models of their own; on a
 * failure says so on stderr and returns non-zero. */
int tsr_test_synth(const char *shape, const char *type, const char *path);

/* Runs the tessera program with `args` through /bin/sh followed by `shell_tail` (a
 * redirection or pipe such as ">/dev/full" or "| cmp - FILE"), captured like tsr_test_run:
 * the status is the shell's (the last command of a pipe). */
int tsr_test_tessera_sh(char **out, char **err, const char *shell_tail, const char *const *args);

/* One feature's test and the name of the test case that holds it alone. */
typedef struct tsr_test_case {
    const char *name;
    const TTest *test;
} tsr_test_case;

/* A suite `name` with one test case per entry of cases (n). */
Suite *tsr_test_suite(const char *name, const tsr_test_case *cases, size_t n);

/* Runs every test of `s` (fork mode unless CK_FORK=no), prints Check's summary and returns
 * the process exit status: 0 when every test passed, 1 otherwise. Frees the suite. */
int tsr_test_run_suite(Suite *s);

/* Deterministic test data, so that failures reproduce: the next value of the xorshift64*
 * generator whose state is *state (not 0), and that value as a float uniform in [-1, 1). */
uint64_t tsr_test_rng_u64(uint64_t *state);
float tsr_test_rng_unit(uint64_t *state);

/* Environment values set by ctest; abort with a message when absent. */
const char *tsr_test_env(const char *name);

#endif
