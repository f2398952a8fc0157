/* Plugin parameters: parsing of each type, ranges, binding to a plugin table, table checks and
 * the `plugins info` table. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/params.h"
#include "testutil.h"

#define DEF(...) {.struct_size = sizeof(tsr_param_def), __VA_ARGS__}

static const char *const modes[] = {"full", "streaming", "h2o", NULL};

/* A fake cache plugin's table: one parameter of each type, one required. */
static const tsr_param_def cache_params[] = {
    DEF(.name = "window", .type = TSR_PARAM_INT, .default_value = "128", .min = 1,
        .max = 1048576, .unit = "tokens", .doc = "recent tokens kept"),
    DEF(.name = "sink", .type = TSR_PARAM_INT, .default_value = "4", .min = 0, .max = 64,
        .unit = "tokens", .doc = "first tokens always kept"),
    DEF(.name = "ratio", .type = TSR_PARAM_FLOAT, .default_value = "0.5", .min = 0, .max = 1,
        .doc = "fraction kept"),
    DEF(.name = "verbose", .type = TSR_PARAM_BOOL, .default_value = "false",
        .doc = "log evictions"),
    DEF(.name = "mode", .type = TSR_PARAM_ENUM, .default_value = "streaming", .choices = modes,
        .doc = "eviction rule"),
    DEF(.name = "tag", .type = TSR_PARAM_STRING, .default_value = "", .doc = "label in logs"),
    DEF(.name = "budget", .type = TSR_PARAM_INT, .min = 1, .max = 0, .unit = "bytes",
        .doc = "memory budget"),
};
#define N_CACHE ((uint32_t)(sizeof cache_params / sizeof cache_params[0]))

static const tsr_src_loc at = {"p.yaml", 3, 9};

/* Parses `text` as parameter `i` of the table; returns the status, message in *err. */
static tsr_status parse(uint32_t i, const char *text, tsr_param_value *v, tsr_error *err) {
    return tsr_param_parse(&cache_params[i], text, "cache", at, v, err);
}

START_TEST(bool_values) {
    static const char *const yes[] = {"true", "TRUE", "True", "yes", "Yes", "on", "ON", "1"};
    static const char *const no[] = {"false", "FALSE", "no", "NO", "off", "Off", "0"};
    static const char *const bad[] = {"", "maybe", "2", "tru", "y", "n", " true", "true ", "01"};
    tsr_param_value v;
    tsr_error err;
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
        ck_assert_int_eq(parse(3, yes[i], &v, &err), TSR_OK);
        ck_assert_int_eq(v.type, TSR_PARAM_BOOL);
        ck_assert_int_eq(v.u.b, 1);
    }
    for (size_t i = 0; i < sizeof no / sizeof *no; i++) {
        ck_assert_int_eq(parse(3, no[i], &v, &err), TSR_OK);
        ck_assert_int_eq(v.u.b, 0);
    }
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(parse(3, bad[i], &v, &err) == TSR_E_INVALID, "accepted '%s'", bad[i]);
    parse(3, "maybe", &v, &err);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: cache.verbose: expected a boolean (true/false, "
                              "yes/no, on/off, 1/0), got 'maybe'");
}
END_TEST

START_TEST(int_values) {
    static const tsr_param_def wide = DEF(.name = "n", .type = TSR_PARAM_INT, .min = 1, .max = 0);
    static const struct {
        const char *text;
        int64_t value;
    } good[] = {{"0", 0},         {"42", 42},   {"-7", -7},  {"+5", 5},
                {"0x10", 16},     {"0XfF", 255}, {"-0x10", -16}, {"007", 7},
                {"9223372036854775807", INT64_MAX}, {"-9223372036854775808", INT64_MIN}};
    static const char *const bad[] = {"",    "abc",  "1.5",  "12abc", " 5",   "5 ",   "0x",
                                      "- 5", "--5",  "+-5",  "1e3",   "0x1g", "1_000",
                                      "9223372036854775808", "-9223372036854775809",
                                      "0x8000000000000000"};
    tsr_param_value v;
    tsr_error err;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        ck_assert_msg(tsr_param_parse(&wide, good[i].text, "s", at, &v, &err) == TSR_OK,
                      "rejected '%s'", good[i].text);
        ck_assert_int_eq(v.type, TSR_PARAM_INT);
        ck_assert_msg(v.u.i == good[i].value, "'%s' gave %lld", good[i].text,
                      (long long)v.u.i);
    }
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(tsr_param_parse(&wide, bad[i], "s", at, &v, &err) == TSR_E_INVALID,
                      "accepted '%s'", bad[i]);
    tsr_param_parse(&wide, "9223372036854775808", "s", at, &v, &err);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: s.n: expected an integer, got '9223372036854775808'");
}
END_TEST

START_TEST(int_range) {
    tsr_param_value v;
    tsr_error err;
    ck_assert_int_eq(parse(0, "1", &v, &err), TSR_OK);
    ck_assert_int_eq(parse(0, "1048576", &v, &err), TSR_OK);
    ck_assert_int_eq(v.u.i, 1048576);
    ck_assert_int_eq(parse(0, "1048577", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: cache.window: expected an integer in [1, 1048576], "
                              "got '1048577'");
    ck_assert_int_eq(parse(0, "0", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "p.yaml:3:9: cache.window: expected an integer in [1, 1048576], got '0'");
    ck_assert_int_eq(parse(0, "abc", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "p.yaml:3:9: cache.window: expected an integer in [1, 1048576], got 'abc'");
    /* an upper bound of 2^63 prints as INT64_MAX */
    static const tsr_param_def seed =
        DEF(.name = "seed", .type = TSR_PARAM_INT, .min = 0, .max = 0x1p63);
    ck_assert_int_eq(tsr_param_parse(&seed, "9223372036854775807", "d", at, &v, &err), TSR_OK);
    ck_assert_int_eq(tsr_param_parse(&seed, "-1", "d", at, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: d.seed: expected an integer in "
                              "[0, 9223372036854775807], got '-1'");
}
END_TEST

START_TEST(float_values) {
    static const tsr_param_def any = DEF(.name = "x", .type = TSR_PARAM_FLOAT, .min = 1, .max = 0);
    static const struct {
        const char *text;
        double value;
    } good[] = {{"0", 0}, {"0.5", 0.5}, {"-2", -2}, {"1e-3", 1e-3}, {"+.25", 0.25},
                {"1E2", 100}, {"0x1p-2", 0.25}};
    static const char *const bad[] = {"",    "abc",  "nan", "NaN", "inf", "-inf", "infinity",
                                      "1e999", "0.5x", " 1", "1 ", ".", "1,5"};
    tsr_param_value v;
    tsr_error err;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        ck_assert_msg(tsr_param_parse(&any, good[i].text, "s", at, &v, &err) == TSR_OK,
                      "rejected '%s'", good[i].text);
        ck_assert_int_eq(v.type, TSR_PARAM_FLOAT);
        ck_assert_double_eq(v.u.f, good[i].value);
    }
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(tsr_param_parse(&any, bad[i], "s", at, &v, &err) == TSR_E_INVALID,
                      "accepted '%s'", bad[i]);
    ck_assert_int_eq(parse(2, "1", &v, &err), TSR_OK);
    ck_assert_int_eq(parse(2, "1.0001", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: cache.ratio: expected a number in [0, 1], got '1.0001'");
    static const tsr_param_def temp =
        DEF(.name = "t", .type = TSR_PARAM_FLOAT, .min = 0.1, .max = 2.5);
    ck_assert_int_eq(tsr_param_parse(&temp, "0.05", "d", at, &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: d.t: expected a number in [0.1, 2.5], got '0.05'");
}
END_TEST

START_TEST(enum_and_string_values) {
    tsr_param_value v;
    tsr_error err;
    ck_assert_int_eq(parse(4, "h2o", &v, &err), TSR_OK);
    ck_assert_int_eq(v.type, TSR_PARAM_ENUM);
    ck_assert_int_eq(v.u.i, 2);
    ck_assert_str_eq(v.s, "h2o");
    ck_assert_int_eq(parse(4, "Full", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "p.yaml:3:9: cache.mode: expected one of full, streaming, h2o, got 'Full'");
    ck_assert_int_eq(parse(5, "", &v, &err), TSR_OK);
    ck_assert_str_eq(v.s, "");
    ck_assert_int_eq(parse(5, " any text: [x] ", &v, &err), TSR_OK);
    ck_assert_str_eq(v.s, " any text: [x] ");
    /* user text in a message stays on one line */
    ck_assert_int_eq(parse(0, "1\n2", &v, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg,
                     "p.yaml:3:9: cache.window: expected an integer in [1, 1048576], got '1?2'");
}
END_TEST

START_TEST(bind_defaults_and_values) {
    tsr_kv_text kv[] = {{"window", "256", {"p.yaml", 4, 3}},
                        {"verbose", "on", {"p.yaml", 5, 3}},
                        {"mode", "h2o", {"p.yaml", 6, 3}},
                        {"tag", "run-1", {"p.yaml", 7, 3}},
                        {"budget", "0x100000", {"p.yaml", 8, 3}}};
    tsr_bound_params b;
    tsr_error err;
    ck_assert_int_eq(tsr_params_bind(cache_params, N_CACHE, "streaming", "cache", at, kv, 5, &b,
                                     &err),
                     TSR_OK);
    ck_assert_uint_eq(b.params.struct_size, sizeof(tsr_params));
    ck_assert_uint_eq(b.params.count, N_CACHE);
    ck_assert_ptr_eq(b.params.defs, cache_params);
    ck_assert_ptr_eq(b.params.values, b.values);
    ck_assert_int_eq(b.values[0].u.i, 256);
    ck_assert_int_eq(b.values[1].u.i, 4);      /* default */
    ck_assert_double_eq(b.values[2].u.f, 0.5); /* default */
    ck_assert_int_eq(b.values[3].u.b, 1);
    ck_assert_int_eq(b.values[4].type, TSR_PARAM_ENUM);
    ck_assert_int_eq(b.values[4].u.i, 2);
    ck_assert_str_eq(b.values[4].s, "h2o");
    ck_assert_str_eq(b.values[5].s, "run-1");
    ck_assert_int_eq(b.values[6].u.i, 1 << 20);
    for (uint32_t i = 0; i < N_CACHE; i++) ck_assert_int_eq(b.values[i].type, cache_params[i].type);
    /* texts are the host's own copies */
    ck_assert_ptr_ne(b.values[5].s, kv[3].value);
    ck_assert_ptr_null(b.values[0].s);
    tsr_bound_params_free(&b);
    ck_assert_ptr_null(b.values);
    tsr_bound_params_free(&b); /* twice is harmless */
}
END_TEST

START_TEST(bind_required_missing) {
    tsr_bound_params b;
    tsr_error err;
    ck_assert_int_eq(
        tsr_params_bind(cache_params, N_CACHE, "streaming", "cache", at, NULL, 0, &b, &err),
        TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:3:9: cache.budget: required parameter is missing");
    ck_assert_ptr_null(b.values);
}
END_TEST

START_TEST(bind_unknown_key) {
    tsr_kv_text kv[] = {{"budget", "1", {"p.yaml", 4, 3}}, {"windw", "1", {"p.yaml", 5, 3}}};
    tsr_bound_params b;
    tsr_error err;
    ck_assert_int_eq(
        tsr_params_bind(cache_params, N_CACHE, "streaming", "layers[1].cache", at, kv, 2, &b, &err),
        TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:5:3: layers[1].cache: unknown parameter 'windw' for plugin "
                              "'streaming'; known: window, sink, ratio, verbose, mode, tag, "
                              "budget");
    ck_assert_int_eq(tsr_params_bind(NULL, 0, "full", "cache", at, kv, 1, &b, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:4:3: cache: unknown parameter 'budget' for plugin 'full'; "
                              "it takes none");
    ck_assert_int_eq(tsr_params_bind(NULL, 0, "full", "cache", at, NULL, 0, &b, &err), TSR_OK);
    ck_assert_uint_eq(b.params.count, 0);
    tsr_bound_params_free(&b);
}
END_TEST

START_TEST(bind_bad_value) {
    tsr_kv_text kv[] = {{"budget", "1", {"p.yaml", 4, 3}}, {"sink", "65", {"p.yaml", 5, 9}}};
    tsr_bound_params b;
    tsr_error err;
    ck_assert_int_eq(
        tsr_params_bind(cache_params, N_CACHE, "streaming", "cache", at, kv, 2, &b, &err),
        TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "p.yaml:5:9: cache.sink: expected an integer in [0, 64], got '65'");
    ck_assert_ptr_null(b.values);
    tsr_kv_text twice[] = {{"budget", "1", {"p.yaml", 4, 3}}, {"budget", "2", {"--set", 0, 0}}};
    ck_assert_int_eq(
        tsr_params_bind(cache_params, N_CACHE, "streaming", "cache", at, twice, 2, &b, &err),
        TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "--set: cache.budget: given twice (first at p.yaml:4:3)");
}
END_TEST

/* Checks that `def` alone fails the table check with `msg`. */
static void check_table_fails(tsr_param_def def, const char *msg) {
    tsr_param_def defs[2] = {cache_params[0], def};
    tsr_error err;
    ck_assert_int_eq(tsr_param_table_check(defs, 2, "cache-x.so: plugin 'x'", &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, msg);
}

START_TEST(table_check) {
    tsr_error err;
    ck_assert_int_eq(tsr_param_table_check(cache_params, N_CACHE, "x", &err), TSR_OK);
    ck_assert_int_eq(tsr_param_table_check(NULL, 0, "x", &err), TSR_OK);
    ck_assert_int_eq(tsr_param_table_check(NULL, 2, "x", &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "x: n_params is 2 but params is NULL");
    static const char *const none[] = {NULL};
    static const char *const dup[] = {"a", "b", "a", NULL};
    static const char *const empty[] = {"a", "", NULL};
    check_table_fails((tsr_param_def)DEF(.name = "Window", .type = TSR_PARAM_INT),
                      "cache-x.so: plugin 'x': parameter 1: name 'Window' is not [a-z0-9_]+");
    check_table_fails((tsr_param_def)DEF(.name = NULL, .type = TSR_PARAM_INT),
                      "cache-x.so: plugin 'x': parameter 1: name '(null)' is not [a-z0-9_]+");
    check_table_fails((tsr_param_def)DEF(.name = "", .type = TSR_PARAM_INT),
                      "cache-x.so: plugin 'x': parameter 1: name '' is not [a-z0-9_]+");
    check_table_fails((tsr_param_def)DEF(.name = "window", .type = TSR_PARAM_INT),
                      "cache-x.so: plugin 'x': parameter 'window' is declared twice");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = 9),
                      "cache-x.so: plugin 'x': parameter 'k': unknown type 9");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = 0),
                      "cache-x.so: plugin 'x': parameter 'k': unknown type 0");
    char msg[128];
    snprintf(msg, sizeof msg,
             "cache-x.so: plugin 'x': parameter 1: struct_size 8, expected %zu (use TSR_SIZED)",
             sizeof(tsr_param_def));
    check_table_fails((tsr_param_def){.struct_size = 8, .name = "k", .type = TSR_PARAM_INT}, msg);
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_ENUM),
                      "cache-x.so: plugin 'x': parameter 'k': enum without choices");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_ENUM, .choices = none),
                      "cache-x.so: plugin 'x': parameter 'k': enum without choices");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_ENUM, .choices = dup),
                      "cache-x.so: plugin 'x': parameter 'k': choice 'a' is listed twice");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_ENUM, .choices = empty),
                      "cache-x.so: plugin 'x': parameter 'k': choice 1 is empty");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_ENUM, .choices = dup + 1,
                                         .default_value = "c"),
                      "cache-x.so: plugin 'x': parameter 'k': default: expected one of b, a, "
                      "got 'c'");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_INT, .default_value = "x",
                                         .min = 1, .max = 0),
                      "cache-x.so: plugin 'x': parameter 'k': default: expected an integer, "
                      "got 'x'");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_INT, .default_value = "0",
                                         .min = 1, .max = 8),
                      "cache-x.so: plugin 'x': parameter 'k': default: expected an integer in "
                      "[1, 8], got '0'");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_FLOAT,
                                         .default_value = "2.5", .min = 0, .max = 2),
                      "cache-x.so: plugin 'x': parameter 'k': default: expected a number in "
                      "[0, 2], got '2.5'");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_BOOL,
                                         .default_value = "maybe"),
                      "cache-x.so: plugin 'x': parameter 'k': default: expected a boolean "
                      "(true/false, yes/no, on/off, 1/0), got 'maybe'");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_INT, .min = 0.5, .max = 4),
                      "cache-x.so: plugin 'x': parameter 'k': integer bounds [0.5, 4] are not "
                      "whole numbers");
    check_table_fails((tsr_param_def)DEF(.name = "k", .type = TSR_PARAM_FLOAT, .min = NAN,
                                         .max = 4),
                      "cache-x.so: plugin 'x': parameter 'k': min or max is NaN");
}
END_TEST

START_TEST(table_print) {
    char *text = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&text, &size);
    tsr_param_table_print(f, cache_params, N_CACHE);
    fclose(f);
    ck_assert_str_eq(text,
                     "  window   int     default 128        [1, 1048576] tokens  "
                     "recent tokens kept\n"
                     "  sink     int     default 4          [0, 64] tokens       "
                     "first tokens always kept\n"
                     "  ratio    float   default 0.5        [0, 1]               fraction kept\n"
                     "  verbose  bool    default false                           log evictions\n"
                     "  mode     enum    default streaming  full|streaming|h2o   eviction rule\n"
                     "  tag      string  default ''                              label in logs\n"
                     "  budget   int     required           bytes                memory budget\n");
    free(text);
}
END_TEST

START_TEST(locations_and_excerpts) {
    char buf[64];
    tsr_src_loc_format(buf, sizeof buf, (tsr_src_loc){"a.yaml", 2, 7});
    ck_assert_str_eq(buf, "a.yaml:2:7");
    tsr_src_loc_format(buf, sizeof buf, (tsr_src_loc){"--set", 0, 0});
    ck_assert_str_eq(buf, "--set");
    char small[8];
    ck_assert_str_eq(tsr_text_excerpt(small, sizeof small, "abcdefg"), "abcdefg");
    ck_assert_str_eq(tsr_text_excerpt(small, sizeof small, "abcdefgh"), "abcd...");
    ck_assert_str_eq(tsr_text_excerpt(small, sizeof small, "a\tb\r\n"), "a?b??");
    tsr_error err;
    ck_assert_int_eq(tsr_error_set_at(&err, TSR_E_RANGE, (tsr_src_loc){"f", 1, 2}, "x=%d", 5),
                     TSR_E_RANGE);
    ck_assert_str_eq(err.msg, "f:1:2: x=5");
}
END_TEST

static Suite *params_suite(void) {
    Suite *s = suite_create("params");
    TCase *tc = tcase_create("params");
    tcase_add_test(tc, bool_values);
    tcase_add_test(tc, int_values);
    tcase_add_test(tc, int_range);
    tcase_add_test(tc, float_values);
    tcase_add_test(tc, enum_and_string_values);
    tcase_add_test(tc, bind_defaults_and_values);
    tcase_add_test(tc, bind_required_missing);
    tcase_add_test(tc, bind_unknown_key);
    tcase_add_test(tc, bind_bad_value);
    tcase_add_test(tc, table_check);
    tcase_add_test(tc, table_print);
    tcase_add_test(tc, locations_and_excerpts);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return tsr_test_run_suite(params_suite());
}
