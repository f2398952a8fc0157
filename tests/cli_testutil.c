/* Helpers of the tests that run the `tessera` program. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_testutil.h"
#include "testutil.h"

const char *tmp_path(tmp *t, const char *name) {
    if (!t->dir) t->dir = tsr_test_tmpdir();
    ck_assert(t->dir != NULL && t->n < 16);
    snprintf(t->paths[t->n], sizeof t->paths[0], "%s/%s", t->dir, name);
    return t->paths[t->n++];
}

void tmp_free(tmp *t) {
    for (int i = 0; i < t->n; i++) unlink(t->paths[i]);
    if (t->dir) ck_assert_msg(rmdir(t->dir) == 0, "%s: something was left behind", t->dir);
    free(t->dir);
}

char *run_ok(const char *const *args) {
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "%s: exit %d: %s", args[0], status, err);
    free(err);
    return out;
}

json_t *run_json(const char *const *args) {
    char *out = run_ok(args);
    json_error_t jerr;
    json_t *root = json_loads(out, 0, &jerr);
    ck_assert_msg(root != NULL, "%s --json: line %d: %s\n%s", args[0], jerr.line, jerr.text, out);
    free(out);
    return root;
}

char *run_error(int want, const char *const *args) {
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == want, "%s: exit %d, expected %d: %s", args[0], status, want, err);
    ck_assert_msg(strncmp(err, "tessera: ", 9) == 0 && strchr(err, '\n') == err + strlen(err) - 1,
                  "not one line: %s", err);
    ck_assert_str_eq(out, "");
    free(out);
    return err;
}
