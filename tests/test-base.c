/* host/base: the strict number reader and output files written the careful way. */
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "base/number.h"
#include "base/outfile.h"
#include "testutil.h"

/* ---- numbers ------------------------------------------------------------------------------ */

static const struct {
    const char *text;
    int64_t value;
} ints_taken[] = {
    {"0", 0}, {"-12", -12}, {"+5", 5}, {"010", 10}, {"0x1F", 31}, {"0X1f", 31}, {"-0x10", -16},
    {"9223372036854775807", INT64_MAX}, {"-9223372036854775808", INT64_MIN},
};

static const char *const ints_refused[] = {
    "", " 5", "5 ", "1.0", "1e3", "8x", "--5", "+-5", "- 5", "0x", "0xg", "1_000",
    "9223372036854775808", "-9223372036854775809", "99999999999999999999", "\n1",
};

START_TEST(int_taken) {
    int64_t v = 7;
    ck_assert_msg(tsr_text_to_int(ints_taken[_i].text, &v), "'%s' refused", ints_taken[_i].text);
    ck_assert_int_eq(v, ints_taken[_i].value);
}
END_TEST

START_TEST(int_refused) {
    int64_t v = 7;
    ck_assert_msg(!tsr_text_to_int(ints_refused[_i], &v), "'%s' taken", ints_refused[_i]);
    ck_assert_int_eq(v, 7);
}
END_TEST

START_TEST(float_strict) {
    double v = 0;
    ck_assert(tsr_text_to_float("0.5", &v) && v == 0.5);
    ck_assert(tsr_text_to_float("-2", &v) && v == -2);
    ck_assert(tsr_text_to_float("1e-3", &v) && v == 1e-3);
    /* Below the smallest normal double: kept, tiny, not refused and not zero. */
    ck_assert(tsr_text_to_float("1e-320", &v) && v > 0 && v < 1e-310);
    const char *refused[] = {"", " 1", "1 ", "1x", "nan", "inf", "-inf", "1e999", "0x"};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        v = 3;
        ck_assert_msg(!tsr_text_to_float(refused[i], &v), "'%s' taken", refused[i]);
        ck_assert(v == 3);
    }
}
END_TEST

START_TEST(parse_int_range_and_message) {
    tsr_error err = {{0}};
    int64_t v = 0;
    ck_assert_int_eq(tsr_parse_int("--ctx", "4", 4, 1048576, &v, &err), TSR_OK);
    ck_assert_int_eq(v, 4);
    ck_assert_int_eq(tsr_parse_int("--ctx", "1048576", 4, 1048576, &v, &err), TSR_OK);
    ck_assert_int_eq(v, 1048576);
    ck_assert_int_eq(tsr_parse_int("--ctx", "3", 4, 1048576, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--ctx: expected an integer in [4, 1048576], got '3'");
    ck_assert_int_eq(tsr_parse_int("--ctx", "1048577", 4, 1048576, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--ctx: expected an integer in [4, 1048576], got '1048577'");
    /* The text quoted stays on one line. */
    ck_assert_int_eq(tsr_parse_int("-n", "1\n2", 0, 9, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "-n: expected an integer in [0, 9], got '1?2'");
    ck_assert_int_eq(v, 1048576);
}
END_TEST

START_TEST(parse_int_words) {
    tsr_error err = {{0}};
    const char *p = "1,22,x";
    int64_t v;
    ck_assert_int_eq(tsr_parse_int_word("-t", &p, ",", 1, 256, &v, &err), TSR_OK);
    ck_assert_int_eq(v, 1);
    ck_assert_str_eq(p, ",22,x");
    p++;
    ck_assert_int_eq(tsr_parse_int_word("-t", &p, ",", 1, 256, &v, &err), TSR_OK);
    ck_assert_int_eq(v, 22);
    p++;
    ck_assert_int_eq(tsr_parse_int_word("-t", &p, ",", 1, 256, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "-t: expected an integer in [1, 256], got 'x'");
    ck_assert_str_eq(p, "");
    /* A word too long to quote whole is cut, and never read as the number it starts with. */
    char text[128];
    memset(text, '0', 100);
    strcpy(text + 100, "1 2");
    p = text;
    ck_assert_int_eq(tsr_parse_int_word("--tokens", &p, " ", 0, 9, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(p, " 2");
    char want[128];
    snprintf(want, sizeof want, "--tokens: expected an integer in [0, 9], got '%.60s...'", text);
    ck_assert_str_eq(err.msg, want);
}
END_TEST

/* ---- output files ------------------------------------------------------------------------- */

typedef struct place {
    char *dir;
    char path[4200];
} place;

static void place_open(place *p, const char *name) {
    p->dir = tsr_test_tmpdir();
    snprintf(p->path, sizeof p->path, "%s/%s", p->dir, name);
}

static void place_close(place *p) {
    ck_assert_msg(rmdir(p->dir) == 0, "%s: something was left behind", p->dir);
    free(p->dir);
}

START_TEST(outfile_new_file) {
    place p;
    place_open(&p, "new.bin");
    tsr_error err = {{0}};
    tsr_outfile o;
    ck_assert_int_eq(tsr_outfile_open(&o, p.path, NULL, &err), TSR_OK);
    /* Until the commit only the temporary file exists, beside the destination. */
    ck_assert_int_ne(access(p.path, F_OK), 0);
    ck_assert_int_eq(tsr_test_count_entries(p.dir), 1);
    ck_assert(tsr_outfile_write(&o, "abc", 3));
    ck_assert(tsr_outfile_write(&o, "de", 2));
    ck_assert(!tsr_outfile_is_stdout(&o));
    ck_assert_int_eq(tsr_outfile_commit(&o, &err), TSR_OK);
    size_t size;
    char *got = tsr_test_read_file(p.path, &size);
    ck_assert_uint_eq(size, 5);
    ck_assert_str_eq(got, "abcde");
    free(got);
    ck_assert_int_eq(tsr_test_count_entries(p.dir), 1);
    unlink(p.path);
    place_close(&p);
}
END_TEST

START_TEST(outfile_discard_keeps_the_old_file) {
    place p;
    place_open(&p, "old.bin");
    ck_assert_int_eq(tsr_test_write_file(p.path, "old", 3), 0);
    tsr_error err = {{0}};
    tsr_outfile o;
    ck_assert_int_eq(tsr_outfile_open(&o, p.path, NULL, &err), TSR_OK);
    ck_assert(tsr_outfile_write(&o, "new", 3));
    tsr_outfile_discard(&o);
    tsr_outfile_discard(&o); /* twice is harmless */
    char *got = tsr_test_read_file(p.path, NULL);
    ck_assert_str_eq(got, "old");
    free(got);
    ck_assert_int_eq(tsr_test_count_entries(p.dir), 1);
    /* A zeroed outfile may be discarded too (error paths do). */
    tsr_outfile zero = {0};
    tsr_outfile_discard(&zero);
    unlink(p.path);
    place_close(&p);
}
END_TEST

START_TEST(outfile_refusals) {
    place p;
    place_open(&p, "in.bin");
    tsr_error err = {{0}};
    tsr_outfile o;
    ck_assert_int_eq(tsr_outfile_open(&o, p.dir, NULL, &err), TSR_E_INVALID);
    char want[8600];
    snprintf(want, sizeof want, "%s: is a folder; expected a file name", p.dir);
    ck_assert_str_eq(err.msg, want);
    ck_assert_int_eq(tsr_test_write_file(p.path, "in", 2), 0);
    char dotted[4300];
    snprintf(dotted, sizeof dotted, "%s/./in.bin", p.dir);
    ck_assert_int_eq(tsr_outfile_open(&o, dotted, p.path, &err), TSR_E_INVALID);
    snprintf(want, sizeof want, "%s: is the input file %s; write the output to another file",
             dotted, p.path);
    ck_assert_str_eq(err.msg, want);
    /* Another file is fine, and so is an input that does not exist. */
    char other[4300];
    snprintf(other, sizeof other, "%s/out.bin", p.dir);
    ck_assert_int_eq(tsr_outfile_open(&o, other, p.path, &err), TSR_OK);
    tsr_outfile_discard(&o);
    ck_assert_int_eq(tsr_outfile_open(&o, p.path, other, &err), TSR_OK);
    tsr_outfile_discard(&o);
    ck_assert_int_eq(tsr_outfile_open(&o, "", NULL, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "the output file name is empty");
    char dangling[4300];
    snprintf(dangling, sizeof dangling, "%s/dangling", p.dir);
    ck_assert_int_eq(symlink("nowhere/x.bin", dangling), 0);
    ck_assert_int_eq(tsr_outfile_open(&o, dangling, NULL, &err), TSR_E_INVALID);
    snprintf(want, sizeof want, "%s: is a link to a file that does not exist; give the file's "
             "own name", dangling);
    ck_assert_str_eq(err.msg, want);
    unlink(dangling);
    char missing[4300];
    snprintf(missing, sizeof missing, "%s/no/such.bin", p.dir);
    ck_assert_int_eq(tsr_outfile_open(&o, missing, NULL, &err), TSR_E_IO);
    snprintf(want, sizeof want, "%s: cannot create: No such file or directory", missing);
    ck_assert_str_eq(err.msg, want);
    ck_assert_int_eq(tsr_test_count_entries(p.dir), 1);
    unlink(p.path);
    place_close(&p);
}
END_TEST

/* A full device (a node of the test's own where it may make one, so that a wrong rename could
 * not replace the machine's /dev/full): written directly, and the error is the commit's. */
START_TEST(outfile_write_error_is_reported) {
    place p;
    place_open(&p, "full");
    const char *full = p.path;
    if (mknod(p.path, S_IFCHR | 0666, makedev(1, 7)) != 0 || access(p.path, W_OK) != 0) {
        unlink(p.path);
        if (geteuid() == 0) {
            place_close(&p);
            return; /* root without a node of its own: /dev/full is not worth the risk */
        }
        full = "/dev/full";
    }
    tsr_error err = {{0}};
    tsr_outfile o;
    ck_assert_int_eq(tsr_outfile_open(&o, full, NULL, &err), TSR_OK);
    static char block[1 << 16];
    bool ok = true;
    for (int i = 0; i < 4 && ok; i++) ok = tsr_outfile_write(&o, block, sizeof block);
    ck_assert(!ok);
    ck_assert(!tsr_outfile_write(&o, "x", 1)); /* the first error sticks */
    ck_assert_int_eq(tsr_outfile_commit(&o, &err), TSR_E_IO);
    char want[4300];
    snprintf(want, sizeof want, "%s: cannot write: No space left on device", full);
    ck_assert_str_eq(err.msg, want);
    struct stat st;
    ck_assert_int_eq(stat(full, &st), 0);
    ck_assert(S_ISCHR(st.st_mode));
    if (full == p.path) unlink(p.path);
    place_close(&p);
}
END_TEST

int main(void) {
    Suite *s = suite_create("base");
    TCase *tn = tcase_create("numbers");
    tcase_add_loop_test(tn, int_taken, 0, (int)(sizeof ints_taken / sizeof ints_taken[0]));
    tcase_add_loop_test(tn, int_refused, 0, (int)(sizeof ints_refused / sizeof ints_refused[0]));
    tcase_add_test(tn, float_strict);
    tcase_add_test(tn, parse_int_range_and_message);
    tcase_add_test(tn, parse_int_words);
    suite_add_tcase(s, tn);
    TCase *to = tcase_create("outfile");
    tcase_add_test(to, outfile_new_file);
    tcase_add_test(to, outfile_discard_keeps_the_old_file);
    tcase_add_test(to, outfile_refusals);
    tcase_add_test(to, outfile_write_error_is_reported);
    suite_add_tcase(s, to);
    return tsr_test_run_suite(s);
}
