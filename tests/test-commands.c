/* Plugin commands: declarations checked by tsr_command_check, and calls through libffi with
 * arguments converted from text (tsr_command_call), on functions defined here. */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin/commands.h"
#include "testutil.h"

/* ---- functions called through libffi ------------------------------------------------------ */

static int32_t f_neg(int32_t x) { return -x; }
static int64_t f_twice(int64_t x) { return 2 * x; }
static double f_half(double x) { return x / 2; }
static const char *f_echo(const char *s) { return s; }
static const char *f_null(void) { return NULL; }
static int f_not(int b) { return !b; }
static int32_t f_status(int32_t x) { return x; }

/* Every argument type in one call, more than fit in registers: the values land here. */
static struct {
    int32_t i;
    int64_t l;
    double d;
    const char *s;
    int b;
    int calls;
} got;
static void f_record(int32_t i, int64_t l, double d, const char *s, int b) {
    got.i = i, got.l = l, got.d = d, got.s = s, got.b = b;
    got.calls++;
}
static int64_t f_sum10(int32_t a, int32_t b, int32_t c, int32_t d, int32_t e, int32_t f,
                       int32_t g, int32_t h, int32_t i, int64_t j) {
    return (int64_t)a + b + c + d + e + f + g + h + i + j;
}
static double f_wsum10(double a, double b, double c, double d, double e, double f, double g,
                       double h, double i, double j) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j;
}
/* The instance: a counter. */
static int64_t f_bump(void *self, int64_t by) { return *(int64_t *)self += by; }

#define CMD(nm, sig, f) {sizeof(tsr_command), .name = nm, .signature = sig, \
                         .fn = (void (*)(void))(f), .doc = nm "()"}

static const tsr_command c_neg = CMD("neg", "i(i)", f_neg);
static const tsr_command c_twice = CMD("twice", "l(l)", f_twice);
static const tsr_command c_half = CMD("half", "d(d)", f_half);
static const tsr_command c_echo = CMD("echo", "s(s)", f_echo);
static const tsr_command c_null = CMD("null", "s()", f_null);
static const tsr_command c_not = CMD("not", "b(b)", f_not);
static const tsr_command c_record = CMD("record", "v(ildsb)", f_record);
static const tsr_command c_sum10 = CMD("sum10", "l(iiiiiiiiil)", f_sum10);
static const tsr_command c_wsum10 = CMD("wsum10", "d(dddddddddd)", f_wsum10);
static const tsr_command c_bump = CMD("bump", "l(Il)", f_bump);
static const tsr_command c_ident = CMD("ident", "i(i)", f_status);
static const tsr_command c_status = {sizeof(tsr_command), .name = "status", .signature = "i(i)",
                                     .fn = (void (*)(void))f_status, .returns_status = 1};

/* Calls `cmd` with n (0..2) text arguments; returns the status, the result in `ret`. */
static char ret[64];
static tsr_error err;
static tsr_status call(const tsr_command *cmd, void *instance, size_t n, const char *a0,
                       const char *a1) {
    const char *args[] = {a0, a1};
    memset(ret, 'X', sizeof ret);
    ret[sizeof ret - 1] = '\0';
    err.msg[0] = '\0';
    return tsr_command_call(cmd, instance, args, n, ret, sizeof ret, &err);
}

/* Expects `cmd(text)` to succeed with result `want`. */
static void expect_ret(const tsr_command *cmd, const char *text, const char *want) {
    ck_assert_msg(call(cmd, NULL, 1, text, NULL) == TSR_OK, "%s('%s'): %s", cmd->name, text,
                  err.msg);
    ck_assert_msg(strcmp(ret, want) == 0, "%s('%s') gave '%s', want '%s'", cmd->name, text,
                  ret, want);
}

/* Expects `cmd(text)` to be refused as argument 1 not parsing as `what`. */
static void expect_bad_arg(const tsr_command *cmd, const char *text, const char *what) {
    char want[256];
    snprintf(want, sizeof want, "command '%s': argument 1: expected %s, got '%s'", cmd->name,
             what, text);
    ck_assert_int_eq(call(cmd, NULL, 1, text, NULL), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, want);
}

/* ---- types --------------------------------------------------------------------------------- */

START_TEST(test_int32) {
    expect_ret(&c_neg, "5", "-5");
    expect_ret(&c_neg, "-2147483647", "2147483647");
    expect_ret(&c_neg, "2147483647", "-2147483647");
    expect_ret(&c_neg, "0x10", "-16");
    expect_ret(&c_neg, "-0x10", "16");
    expect_ret(&c_neg, "010", "-10"); /* decimal, never octal */
    expect_ret(&c_neg, "+7", "-7");
}
END_TEST

START_TEST(test_int64) {
    expect_ret(&c_twice, "4611686018427387903", "9223372036854775806");
    expect_ret(&c_twice, "-4611686018427387904", "-9223372036854775808");
    expect_ret(&c_twice, "0x100000000", "8589934592");
    expect_ret(&c_twice, "2147483648", "4294967296");
}
END_TEST

START_TEST(test_double) {
    expect_ret(&c_half, "5", "2.5");
    expect_ret(&c_half, "-1e300", "-5.0000000000000003e+299");
    expect_ret(&c_half, "0.2", "0.10000000000000001"); /* %.17g round-trips */
}
END_TEST

START_TEST(test_string) {
    expect_ret(&c_echo, "hello, world", "hello, world");
    expect_ret(&c_echo, "", "");
    ck_assert_int_eq(call(&c_null, NULL, 0, NULL, NULL), TSR_OK);
    ck_assert_str_eq(ret, "(null)");
    /* the result is cut to the caller's buffer */
    const char *args[] = {"abcdef"};
    char small[4];
    ck_assert_int_eq(tsr_command_call(&c_echo, NULL, args, 1, small, sizeof small, &err), TSR_OK);
    ck_assert_str_eq(small, "abc");
}
END_TEST

START_TEST(test_bool) {
    expect_ret(&c_not, "true", "false");
    expect_ret(&c_not, "false", "true");
    expect_ret(&c_not, "1", "false");
    expect_ret(&c_not, "0", "true");
}
END_TEST

START_TEST(test_void_and_all_arguments) {
    const char *args[] = {"-7", "-9000000000", "0.25", "text", "true"};
    got.calls = 0;
    ck_assert_int_eq(tsr_command_call(&c_record, NULL, args, 5, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "");
    ck_assert_int_eq(got.calls, 1);
    ck_assert_int_eq(got.i, -7);
    ck_assert_int_eq(got.l, -9000000000LL);
    ck_assert_double_eq(got.d, 0.25);
    ck_assert_ptr_eq(got.s, args[3]);
    ck_assert_int_eq(got.b, 1);
}
END_TEST

/* Ten arguments: some go on the stack on every ABI libffi supports. */
START_TEST(test_many_arguments) {
    const char *ints[] = {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10000000000"};
    ck_assert_int_eq(tsr_command_call(&c_sum10, NULL, ints, 10, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "10000000045");
    const char *dbls[] = {"1", "1", "1", "1", "1", "1", "1", "1", "1", "0.5"};
    ck_assert_int_eq(tsr_command_call(&c_wsum10, NULL, dbls, 10, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "50");
}
END_TEST

/* ---- the instance ------------------------------------------------------------------------- */

START_TEST(test_instance_argument) {
    int64_t counter = 40;
    ck_assert_int_eq(call(&c_bump, &counter, 1, "2", NULL), TSR_OK);
    ck_assert_str_eq(ret, "42");
    ck_assert_int_eq(counter, 42);
    /* the instance is not one of the text arguments */
    ck_assert_int_eq(call(&c_bump, &counter, 2, "2", "3"), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'bump' takes 1 argument (l(Il)), got 2");
    ck_assert_int_eq(call(&c_bump, NULL, 1, "2", NULL), TSR_E_STATE);
    ck_assert_str_eq(err.msg, "command 'bump' acts on a live instance; call it from a "
                              "pipeline's hooks: or with a config");
    ck_assert_int_eq(counter, 42);
}
END_TEST

/* ---- refused calls ------------------------------------------------------------------------ */

START_TEST(test_wrong_argument_count) {
    ck_assert_int_eq(call(&c_neg, NULL, 0, NULL, NULL), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'neg' takes 1 argument (i(i)), got 0");
    ck_assert_int_eq(call(&c_neg, NULL, 2, "1", "2"), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'neg' takes 1 argument (i(i)), got 2");
    ck_assert_int_eq(call(&c_null, NULL, 1, "1", NULL), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'null' takes 0 arguments (s()), got 1");
    ck_assert_int_eq(call(&c_record, NULL, 2, "1", "2"), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'record' takes 5 arguments (v(ildsb)), got 2");
}
END_TEST

START_TEST(test_unparsable_arguments) {
    static const char *const bad_ints[] = {"", "abc", "12x", "1.5", " 1", "0x", "--1", "1 "};
    for (size_t i = 0; i < sizeof bad_ints / sizeof bad_ints[0]; i++) {
        expect_bad_arg(&c_neg, bad_ints[i], "a 32-bit integer");
        expect_bad_arg(&c_twice, bad_ints[i], "a 64-bit integer");
    }
    static const char *const bad_doubles[] = {"", "x", "1.5.2", "nan", "inf", "-inf", "1e400",
                                              " 1"};
    for (size_t i = 0; i < sizeof bad_doubles / sizeof bad_doubles[0]; i++)
        expect_bad_arg(&c_half, bad_doubles[i], "a number");
    static const char *const bad_bools[] = {"", "yes", "TRUE", "2", "truex"};
    for (size_t i = 0; i < sizeof bad_bools / sizeof bad_bools[0]; i++)
        expect_bad_arg(&c_not, bad_bools[i], "true or false");
    /* the failing argument is numbered among the text arguments */
    const char *args[] = {"1", "2", "x", "s", "true"};
    ck_assert_int_eq(tsr_command_call(&c_record, NULL, args, 5, ret, sizeof ret, &err),
                     TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'record': argument 3: expected a number, got 'x'");
}
END_TEST

START_TEST(test_integer_overflow) {
    expect_bad_arg(&c_neg, "2147483648", "a 32-bit integer");
    expect_bad_arg(&c_neg, "-2147483649", "a 32-bit integer");
    expect_bad_arg(&c_neg, "0x80000000", "a 32-bit integer");
    expect_bad_arg(&c_neg, "99999999999999999999", "a 32-bit integer");
    expect_bad_arg(&c_twice, "9223372036854775808", "a 64-bit integer");
    expect_bad_arg(&c_twice, "-9223372036854775809", "a 64-bit integer");
    /* the extremes themselves are fine */
    expect_ret(&c_ident, "-2147483648", "-2147483648");
}
END_TEST

START_TEST(test_status_return) {
    expect_ret(&c_status, "0", "0");
    expect_ret(&c_status, "3", "3");
    ck_assert_int_eq(call(&c_status, NULL, 1, "-5", NULL), TSR_E_RANGE);
    ck_assert_str_eq(err.msg, "command 'status' failed (status -5)");
    /* without returns_status a negative int is just a value */
    expect_ret(&c_ident, "-5", "-5");
}
END_TEST

/* ---- declarations ------------------------------------------------------------------------- */

static tsr_status check_sig(const char *sig) {
    tsr_command c = CMD("cmd", "v()", f_null);
    c.signature = sig;
    return tsr_command_check(&c, "p.so: plugin 'p'", &err);
}

START_TEST(test_check_good) {
    static const char *const good[] = {"v()", "i(i)", "l(Il)", "d(ildsb)", "s(I)", "b()",
                                       "v(iiiiiiiiiiiiiiii)"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        ck_assert_msg(check_sig(good[i]) == TSR_OK, "'%s' refused: %s", good[i], err.msg);
    const tsr_command *all[] = {&c_neg, &c_twice, &c_half, &c_echo, &c_null, &c_not, &c_record,
                                &c_sum10, &c_wsum10, &c_bump, &c_ident, &c_status};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_assert_int_eq(tsr_command_check(all[i], "x", &err), TSR_OK);
}
END_TEST

START_TEST(test_check_bad_signatures) {
    static const char *const bad[] = {
        "i(sI)",  /* the instance after another argument */
        "i(II)",  /* the instance twice */
        "x(i)",   /* unknown return letter */
        "I(i)",   /* the instance is no return type */
        "i(q)",   /* unknown argument letter */
        "i(v)",   /* void is no argument */
        "i(i",    /* missing ')' */
        "ii)",    /* missing '(' */
        "i",      /* no argument list */
        "",       /* empty */
        "i(i))",  /* text after ')' */
        "i()x",
        "v(iiiiiiiiiiiiiiiii)", /* 17 arguments: more than the host passes */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char want[512];
        snprintf(want, sizeof want,
                 "p.so: plugin 'p': command 'cmd': signature '%s' is not valid; expected R(A...) "
                 "with R in v,i,l,d,s,b and A in i,l,d,s,b (I first for the instance)", bad[i]);
        ck_assert_msg(check_sig(bad[i]) == TSR_E_INVALID, "'%s' accepted", bad[i]);
        ck_assert_str_eq(err.msg, want);
    }
    ck_assert_int_eq(check_sig(NULL), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.so: plugin 'p': command 'cmd': signature '(null)' is not valid; "
                              "expected R(A...) with R in v,i,l,d,s,b and A in i,l,d,s,b (I "
                              "first for the instance)");
    /* a call through a bad declaration is refused too, never attempted */
    tsr_command c = CMD("cmd", "i(sI)", f_neg);
    ck_assert_int_eq(tsr_command_call(&c, NULL, NULL, 0, ret, sizeof ret, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "command 'cmd': bad signature 'i(sI)'");
}
END_TEST

START_TEST(test_check_bad_names) {
    static const char *const bad[] = {"", "Dump", "dump-stats", "dump stats", "dümp"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tsr_command c = CMD("x", "v()", f_null);
        c.name = bad[i];
        char want[256];
        snprintf(want, sizeof want, "w: command name '%s' is not valid ([a-z0-9_]+)", bad[i]);
        ck_assert_int_eq(tsr_command_check(&c, "w", &err), TSR_E_INVALID);
        ck_assert_str_eq(err.msg, want);
    }
    tsr_command c = CMD("x", "v()", f_null);
    c.name = NULL;
    ck_assert_int_eq(tsr_command_check(&c, "w", &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "w: command name '(null)' is not valid ([a-z0-9_]+)");
}
END_TEST

START_TEST(test_check_null_fn_and_size) {
    tsr_command c = CMD("dump", "v()", NULL);
    ck_assert_int_eq(tsr_command_check(&c, "w", &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "w: command 'dump': function is NULL");
    c = (tsr_command)CMD("dump", "v()", f_null);
    c.struct_size = 8;
    ck_assert_int_eq(tsr_command_check(&c, "w", &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "w: command struct_size 8 is too small");
}
END_TEST

START_TEST(test_find) {
    static const tsr_command cmds[] = {CMD("a", "v()", f_null), CMD("b", "v()", f_null)};
    tsr_plugin_desc d = {sizeof d, .name = "p", .commands = cmds, .n_commands = 2};
    ck_assert_ptr_eq(tsr_command_find(&d, "b"), &cmds[1]);
    ck_assert_ptr_eq(tsr_command_find(&d, "a"), &cmds[0]);
    ck_assert_ptr_null(tsr_command_find(&d, "c"));
    d.n_commands = 0;
    ck_assert_ptr_null(tsr_command_find(&d, "a"));
}
END_TEST

static Suite *commands_suite(void) {
    const tsr_test_case cases[] = {
        {"int32", test_int32},
        {"int64", test_int64},
        {"double", test_double},
        {"string", test_string},
        {"bool", test_bool},
        {"void_all_args", test_void_and_all_arguments},
        {"many_args", test_many_arguments},
        {"instance", test_instance_argument},
        {"arg_count", test_wrong_argument_count},
        {"unparsable", test_unparsable_arguments},
        {"overflow", test_integer_overflow},
        {"status", test_status_return},
        {"check_good", test_check_good},
        {"check_signatures", test_check_bad_signatures},
        {"check_names", test_check_bad_names},
        {"check_fn_size", test_check_null_fn_and_size},
        {"find", test_find},
    };
    return tsr_test_suite("commands", cases, sizeof cases / sizeof cases[0]);
}

int main(void) {
    return tsr_test_run_suite(commands_suite());
}
