/* What the tests that run the `tessera` program as a user would share: a private folder for
 * the files a test makes, and commands that must succeed (printing JSON) or fail with one
 * line. */
#ifndef TSR_CLI_TESTUTIL_H
#define TSR_CLI_TESTUTIL_H

#include <jansson.h>

/* A private folder for one test; files made in it are removed by tmp_free. */
typedef struct tmp {
    char *dir;
    char paths[16][4096];
    int n;
} tmp;

/* The path of `name` in the test's folder (made on first use). */
const char *tmp_path(tmp *t, const char *name);
/* Removes the files named by tmp_path and the folder, failing the test when something else
 * was left behind in it. */
void tmp_free(tmp *t);

/* A command that must succeed; returns its stdout. */
char *run_ok(const char *const *args);
/* Runs a command that must succeed and print one JSON document; returns it parsed. */
json_t *run_json(const char *const *args);
/* A command that must fail with exit `want`, exactly one line on stderr and nothing on
 * stdout; returns that line. */
char *run_error(int want, const char *const *args);

#endif
