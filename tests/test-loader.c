/* Plugin loader: version negotiation, descriptor checks, refusals of bad files, folder scans,
 * and instances. Each fixture object is tests/plugins/fixture.c built with the definitions of
 * its case (tests/CMakeLists.txt) into TSR_TEST_PLUGIN_DIR/<case>/. */
#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tessera/cache.h>
#include <tessera/router.h>

#include "plugin/commands.h"
#include "plugin/loader.h"
#include "testutil.h"

#define PATH_CAP 512
#define MSG_CAP 2048

/* ---- helpers ----------------------------------------------------------------------------- */

static void fixture_path(char *out, const char *case_dir, const char *file) {
    snprintf(out, PATH_CAP, "%s/%s/%s.so", TSR_TEST_PLUGIN_DIR, case_dir, file);
}

/* Loads one fixture into a fresh registry and returns the registry; the status goes to *st. */
static tsr_registry *load_fixture(const char *case_dir, const char *file, char *path,
                                  tsr_status *st, tsr_error *err) {
    fixture_path(path, case_dir, file);
    tsr_registry *reg = tsr_registry_create(NULL);
    ck_assert_ptr_nonnull(reg);
    *st = tsr_registry_load_file(reg, path, err);
    return reg;
}

/* A fixture that must be refused alone: nothing registers, no diagnostic repeats the error,
 * and the error is exactly `expected`. */
static void assert_refused(const char *case_dir, const char *file, tsr_status want_status,
                           const char *expected_fmt) {
    char path[PATH_CAP], expected[MSG_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture(case_dir, file, path, &st, &err);
    /* every expected message names the path first, and some of them twice */
    snprintf(expected, sizeof expected, expected_fmt, path, path);
    ck_assert_int_eq(st, want_status);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 0);
    tsr_registry_free(reg);
}

/* Values for the fixture cache's table: window, fail_create, leak_bytes, mode. */
typedef struct fx_values {
    tsr_param_value v[4];
    tsr_params params;
} fx_values;

static void fx_values_init(fx_values *fv, const tsr_plugin_desc *d, int64_t window, int fail,
                           int64_t leak) {
    ck_assert_uint_eq(d->n_params, 4);
    ck_assert_str_eq(d->params[0].name, "window");
    ck_assert_str_eq(d->params[1].name, "fail_create");
    ck_assert_str_eq(d->params[2].name, "leak_bytes");
    ck_assert_str_eq(d->params[3].name, "mode");
    fv->v[0] = (tsr_param_value){.type = TSR_PARAM_INT, .u.i = window};
    fv->v[1] = (tsr_param_value){.type = TSR_PARAM_BOOL, .u.b = fail};
    fv->v[2] = (tsr_param_value){.type = TSR_PARAM_INT, .u.i = leak};
    fv->v[3] = (tsr_param_value){.type = TSR_PARAM_ENUM, .u.i = 0, .s = "fast"};
    fv->params = (tsr_params){sizeof(tsr_params), 4, d->params, fv->v};
}

static const tsr_cache_init cache_init = {sizeof(tsr_cache_init), .n_layer = 2, .n_kv_head = 1,
                                          .head_dim = 8, .n_ctx = 64, .n_seq_max = 1,
                                          .backend_name = "cpu"};

static void copy_file(const char *src, const char *dst) {
    size_t size;
    char *data = tsr_test_read_file(src, &size);
    ck_assert_msg(data != NULL, "cannot read %s", src);
    ck_assert_int_eq(tsr_test_write_file(dst, data, size), 0);
    ck_assert_int_eq(chmod(dst, 0755), 0);
    free(data);
}

/* Removes a temporary folder made by tsr_test_tmpdir and the files in it. */
static void remove_tmpdir(char *dir) {
    chmod(dir, 0700);
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char path[PATH_CAP];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
    free(dir);
}

/* Copies the good fixture to tmp/<name>, patched by `patch` (may be NULL), and loads it. */
static tsr_status load_patched_copy(const char *tmp, const char *name,
                                    void (*patch)(char *data, size_t *size), char *path,
                                    tsr_error *err) {
    char src[PATH_CAP];
    fixture_path(src, "good", "fx_good");
    size_t size;
    char *data = tsr_test_read_file(src, &size);
    ck_assert_ptr_nonnull(data);
    if (patch) patch(data, &size);
    snprintf(path, PATH_CAP, "%s/%s", tmp, name);
    ck_assert_int_eq(tsr_test_write_file(path, data, size), 0);
    free(data);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_status st = tsr_registry_load_file(reg, path, err);
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    tsr_registry_free(reg);
    return st;
}

/* ---- loading and finding ----------------------------------------------------------------- */

START_TEST(test_good_plugin) {
    char path[PATH_CAP];
    fixture_path(path, "good", "fx_good");
    tsr_pool *pool = tsr_pool_create(3);
    tsr_registry *reg = tsr_registry_create(pool);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 0);

    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-good");
    ck_assert_ptr_nonnull(ref);
    ck_assert_ptr_eq(ref, tsr_registry_at(reg, 0));
    ck_assert_ptr_eq(ref, tsr_registry_find(reg, 0, "fx-good"));
    ck_assert_ptr_null(tsr_registry_find(reg, TSR_STAGE_ROUTER, "fx-good"));
    ck_assert_ptr_null(tsr_registry_find(reg, 0, "fx-goo"));
    ck_assert_ptr_null(tsr_registry_at(reg, 1));
    ck_assert_str_eq(ref->path, path);
    ck_assert_str_eq(ref->desc->name, "fx-good");
    ck_assert_uint_eq(ref->desc->n_commands, 3);
    /* the probe answers n_threads + 1 through the object's host table */
    ck_assert_int_eq(ref->score, 4);
    ck_assert_ptr_null(ref->unusable);

    /* an instance, and a command called on it */
    fx_values fv;
    fx_values_init(&fv, ref->desc, 300, 0, 0);
    tsr_instance *inst = NULL;
    ck_assert_int_eq(tsr_instance_create(ref, pool, &fv.params, &cache_init, &inst, &err), TSR_OK);
    ck_assert_ptr_nonnull(inst);
    ck_assert_ptr_eq(inst->vtable, ref->desc->vtable);
    char ret[64];
    const tsr_command *window = tsr_command_find(ref->desc, "window");
    ck_assert_ptr_nonnull(window);
    ck_assert_int_eq(tsr_command_call(window, inst->self, NULL, 0, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "300");
    const char *args[] = {"hello there"};
    const tsr_command *echo = tsr_command_find(ref->desc, "echo");
    ck_assert_int_eq(tsr_command_call(echo, NULL, args, 1, ret, sizeof ret, &err), TSR_OK);
    ck_assert_str_eq(ret, "hello there");
    ck_assert_ptr_null(tsr_command_find(ref->desc, "nope"));
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);

    tsr_registry_free(reg);
    tsr_pool_free(pool);
}
END_TEST

START_TEST(test_host_versions) {
    ck_assert_uint_eq(tsr_stage_abi_major(TSR_STAGE_CACHE), TSR_CACHE_ABI_MAJOR);
    ck_assert_uint_eq(tsr_stage_abi_minor(TSR_STAGE_CACHE), TSR_CACHE_ABI_MINOR);
    ck_assert_uint_eq(tsr_stage_abi_major(TSR_STAGE_ROUTER), TSR_ROUTER_ABI_MAJOR);
    ck_assert_uint_eq(tsr_stage_abi_major(0), 0);
    ck_assert_uint_eq(tsr_stage_abi_major(TSR_STAGE_COUNT + 1), 0);
}
END_TEST

/* A plugin needing the host's own MINOR loads; so does a newer plugin whose table has slots
 * appended after the ones this host knows, as long as it needs only this host's MINOR. */
START_TEST(test_older_or_equal_minor_loads) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("same-minor", "fx_same_minor", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-same-minor");
    ck_assert_ptr_nonnull(ref);
    ck_assert_uint_eq(ref->desc->stage_minor_needed, 0);
    tsr_registry_free(reg);

    reg = load_fixture("newer-table", "fx_newer_table", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-newer-table");
    ck_assert_ptr_nonnull(ref);
    ck_assert_uint_eq(*(const uint32_t *)ref->desc->vtable,
                      sizeof(tsr_cache_vtable) + 2 * sizeof(void (*)(void)));
    fx_values fv;
    fx_values_init(&fv, ref->desc, 16, 0, 0);
    tsr_instance *inst;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &fv.params, &cache_init, &inst, &err), TSR_OK);
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);
    tsr_registry_free(reg);
}
END_TEST

/* ---- version refusals -------------------------------------------------------------------- */

START_TEST(test_newer_stage_minor_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: plugin 'fx-minor-newer': needs cache ABI %d.%d, this host speaks %d.%d; "
             "update Tessera",
             TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR + 1, TSR_CACHE_ABI_MAJOR,
             TSR_CACHE_ABI_MINOR);
    assert_refused("minor-newer", "fx_minor_newer", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_other_stage_major_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: plugin 'fx-major-other': built for cache ABI %d.x, this host speaks %d.%d; "
             "rebuild it against the %d.x SDK",
             TSR_CACHE_ABI_MAJOR + 1, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR,
             TSR_CACHE_ABI_MAJOR);
    assert_refused("major-other", "fx_major_other", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_common_major_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: built for common ABI %d.x, this host speaks %d.%d; rebuild it against the "
             "%d.x SDK",
             TSR_COMMON_ABI_MAJOR + 1, TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR,
             TSR_COMMON_ABI_MAJOR);
    assert_refused("common-major", "fx_common_major", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_common_minor_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt, "%%s: needs common ABI %d.%d, this host speaks %d.%d; update Tessera",
             TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR + 1, TSR_COMMON_ABI_MAJOR,
             TSR_COMMON_ABI_MINOR);
    assert_refused("common-minor", "fx_common_minor", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

/* ---- the entry point --------------------------------------------------------------------- */

START_TEST(test_no_entry_symbol) {
    assert_refused("no-entry", "fx_no_entry", TSR_E_INVALID,
                   "%s: no entry symbol 'tessera_plugin_entry': not a Tessera plugin, or built "
                   "without TSR_PLUGIN_EXPORT()");
}
END_TEST

START_TEST(test_entry_returns_null) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: the plugin refused to load: fixture needs a host speaking common ABI 99, "
             "got %d.%d",
             TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR);
    assert_refused("entry-null", "fx_entry_null", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_empty_set) {
    assert_refused("empty-set", "fx_empty_set", TSR_E_INVALID,
                   "%s: the object provides no plugins");
}
END_TEST

/* ---- descriptor and table checks --------------------------------------------------------- */

START_TEST(test_null_optional_slots_load) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("no-optional", "fx_no_optional", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-no-optional");
    ck_assert_ptr_nonnull(ref);
    const tsr_cache_vtable *vt = ref->desc->vtable;
    ck_assert_ptr_null(vt->seq_fork);
    ck_assert_ptr_null(vt->stats);
    ck_assert_ptr_null(vt->prefill_end);
    tsr_registry_free(reg);
}
END_TEST

START_TEST(test_null_mandatory_callback) {
    assert_refused("null-view", "fx_null_view", TSR_E_INVALID,
                   "%s: plugin 'fx-null-view': mandatory cache callback 'view' is NULL");
}
END_TEST

START_TEST(test_short_vtable) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: plugin 'fx-short-table': cache vtable struct_size %zu is smaller than the "
             "%d.0 table (%zu bytes)",
             sizeof(tsr_cache_vtable) - sizeof(void (*)(void)), TSR_CACHE_ABI_MAJOR,
             sizeof(tsr_cache_vtable));
    assert_refused("short-table", "fx_short_table", TSR_E_INVALID, fmt);
}
END_TEST

START_TEST(test_two_plugins_in_one_object) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("two-plugins", "fx_two", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    ck_assert_uint_eq(tsr_registry_count(reg), 2);
    const tsr_plugin_ref *cache = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-two");
    const tsr_plugin_ref *router = tsr_registry_find(reg, TSR_STAGE_ROUTER, "fx-two-router");
    ck_assert_ptr_nonnull(cache);
    ck_assert_ptr_nonnull(router);
    ck_assert_ptr_eq(cache->object, router->object);
    ck_assert_str_eq(router->path, path);
    ck_assert_int_eq(router->score, 1); /* no probe: 1 */

    tsr_router_init init = {sizeof init, .n_layer = 1, .n_expert = 8, .n_expert_used = 2,
                            .n_embd = 16};
    tsr_params none = {sizeof none, 0, NULL, NULL};
    tsr_instance *inst;
    ck_assert_int_eq(tsr_instance_create(router, NULL, &none, &init, &inst, &err), TSR_OK);
    ck_assert_int_eq(*(const int32_t *)((const char *)inst->self + sizeof(void *)), 2);
    ck_assert_uint_eq(tsr_instance_destroy(inst), 0);
    tsr_registry_free(reg);
}
END_TEST

START_TEST(test_invalid_param_tables) {
    assert_refused("params-dup", "fx_params_dup", TSR_E_INVALID,
                   "%s: plugin 'fx-params-dup': parameter 'window' is declared twice");
    assert_refused("params-range", "fx_params_range", TSR_E_INVALID,
                   "%s: plugin 'fx-params-range': parameter 'sink': default: expected an "
                   "integer in [0, 64], got '9000'");
}
END_TEST

START_TEST(test_invalid_command_signature) {
    assert_refused("bad-signature", "fx_bad_signature", TSR_E_INVALID,
                   "%s: plugin 'fx-bad-signature': command 'echo': signature 's(sI)' is not "
                   "valid; expected R(A...) with R in v,i,l,d,s,b and A in i,l,d,s,b (I first "
                   "for the instance)");
}
END_TEST

/* ---- duplicate names and the search order ------------------------------------------------- */

START_TEST(test_duplicate_in_one_object) {
    char path[PATH_CAP], expected[MSG_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("dup-in-object", "fx_dup", path, &st, &err);
    /* the first descriptor registers, the second is refused alone */
    ck_assert_int_eq(st, TSR_OK);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 1);
    snprintf(expected, sizeof expected,
             "%s: plugin 'fx-dup': duplicate plugin name, provided twice by this object; "
             "refused", path);
    ck_assert_str_eq(tsr_registry_diagnostic(reg, 0), expected);
    ck_assert_ptr_null(tsr_registry_diagnostic(reg, 1));
    tsr_registry_free(reg);
}
END_TEST

START_TEST(test_duplicate_in_one_folder) {
    char dir[PATH_CAP], a[PATH_CAP], b[PATH_CAP], expected[MSG_CAP];
    snprintf(dir, sizeof dir, "%s/dup-folder", TSR_TEST_PLUGIN_DIR);
    fixture_path(a, "dup-folder", "fx_dup_a");
    fixture_path(b, "dup-folder", "fx_dup_b");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_scan_dir(reg, dir, &err), 1);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    ck_assert_str_eq(tsr_registry_find(reg, 0, "fx-dup-folder")->path, a);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 1);
    snprintf(expected, sizeof expected,
             "%s: plugin 'fx-dup-folder': duplicate plugin name, already provided by %s; "
             "refused (skipped)", b, a);
    ck_assert_str_eq(tsr_registry_diagnostic(reg, 0), expected);
    tsr_registry_free(reg);
}
END_TEST

static bool has_diagnostic(const tsr_registry *reg, const char *line) {
    for (size_t i = 0; i < tsr_registry_n_diagnostics(reg); i++)
        if (strcmp(tsr_registry_diagnostic(reg, i), line) == 0) return true;
    return false;
}

/* The same name in two folders: the folder searched first wins, the other is shadowed. */
static void check_shadowing(const char *first, const char *second) {
    char dirs[2][PATH_CAP], *real[2], expected[2 * PATH_CAP + 128];
    snprintf(dirs[0], PATH_CAP, "%s/%s", TSR_TEST_PLUGIN_DIR, first);
    snprintf(dirs[1], PATH_CAP, "%s/%s", TSR_TEST_PLUGIN_DIR, second);
    for (int i = 0; i < 2; i++) real[i] = realpath(dirs[i], NULL);
    char *const list[] = {dirs[0], dirs[1]};
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_scan_default(reg, list, 2);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-shadow");
    ck_assert_ptr_nonnull(ref);
    snprintf(expected, sizeof expected, "%s/fx_shadow.so", real[0]);
    ck_assert_str_eq(ref->path, expected);
    snprintf(expected, sizeof expected,
             "%s/fx_shadow.so: plugin 'fx-shadow' is shadowed by %s/fx_shadow.so, which comes "
             "first in the search path (skipped)", real[1], real[0]);
    ck_assert_msg(has_diagnostic(reg, expected), "missing diagnostic: %s", expected);
    tsr_registry_free(reg);
    free(real[0]);
    free(real[1]);
}

START_TEST(test_shadowed_across_folders) {
    unsetenv("TESSERA_PLUGIN_PATH");
    check_shadowing("shadow-1", "shadow-2");
    check_shadowing("shadow-2", "shadow-1");
}
END_TEST

/* ---- probe ------------------------------------------------------------------------------- */

START_TEST(test_probe_zero) {
    char path[PATH_CAP], expected[MSG_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("probe-zero", "fx_probe_zero", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-probe-zero");
    ck_assert_ptr_nonnull(ref);
    ck_assert_int_eq(ref->score, 0);
    ck_assert_str_eq(ref->unusable, "needs the fx accelerator, found none");

    fx_values fv;
    fx_values_init(&fv, ref->desc, 128, 0, 0);
    tsr_instance *inst = NULL;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &fv.params, &cache_init, &inst, &err),
                     TSR_E_UNSUPPORTED);
    ck_assert_ptr_null(inst);
    snprintf(expected, sizeof expected,
             "%s: plugin 'fx-probe-zero' cannot run here: needs the fx accelerator, found none",
             path);
    ck_assert_str_eq(err.msg, expected);
    tsr_registry_free(reg);
}
END_TEST

/* ---- files that are not plugins ---------------------------------------------------------- */

START_TEST(test_not_a_shared_object) {
    char *tmp = tsr_test_tmpdir(), path[PATH_CAP], expected[MSG_CAP];
    snprintf(path, sizeof path, "%s/x.so", tmp);
    const char text[] = "this is not a plugin\n";
    ck_assert_int_eq(tsr_test_write_file(path, text, sizeof text - 1), 0);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: not a shared object (no ELF header); plugin files are built with "
             "tessera_add_plugin()", path);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

static void patch_aarch64(char *data, size_t *size) {
    ck_assert_uint_ge(*size, 20);
    data[18] = (char)183; /* EM_AARCH64, little-endian */
    data[19] = 0;
}

START_TEST(test_wrong_architecture) {
    char *tmp = tsr_test_tmpdir(), path[PATH_CAP], expected[MSG_CAP];
    tsr_error err;
    ck_assert_int_eq(load_patched_copy(tmp, "fx_arm.so", patch_aarch64, path, &err),
                     TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: built for another architecture (ELF machine 183, AArch64), this host runs "
             "x86-64; rebuild the plugin on this machine", path);
    ck_assert_str_eq(err.msg, expected);
    remove_tmpdir(tmp);
}
END_TEST

static void patch_truncate(char *data, size_t *size) {
    (void)data;
    *size = 100;
}

START_TEST(test_truncated_elf) {
    char *tmp = tsr_test_tmpdir(), path[PATH_CAP];
    tsr_error err;
    ck_assert_int_eq(load_patched_copy(tmp, "fx_cut.so", patch_truncate, path, &err),
                     TSR_E_INVALID);
    char prefix[PATH_CAP + 64];
    snprintf(prefix, sizeof prefix, "%s: truncated ELF file: 100 bytes, its headers need ", path);
    ck_assert_msg(strncmp(err.msg, prefix, strlen(prefix)) == 0, "got: %s", err.msg);
    ck_assert_ptr_nonnull(strstr(err.msg, " bytes; copy or build it again"));
    remove_tmpdir(tmp);
}
END_TEST

/* ---- permissions ------------------------------------------------------------------------- */

START_TEST(test_writable_by_others) {
    char *tmp = tsr_test_tmpdir(), src[PATH_CAP], path[PATH_CAP], expected[MSG_CAP];
    fixture_path(src, "good", "fx_good");
    snprintf(path, sizeof path, "%s/fx_good.so", tmp);
    copy_file(src, path);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;

    /* the file */
    ck_assert_int_eq(chmod(path, 0757), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load a plugin file writable by others; fix with: chmod o-w %s",
             path, path);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_int_eq(chmod(path, 0755), 0);

    /* the folder holding it, loaded by file and scanned */
    ck_assert_int_eq(chmod(tmp, 0777), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load from folder %s, which is writable by others; fix with: "
             "chmod o-w %s", path, tmp, tmp);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load plugins from a folder writable by others; fix with: "
             "chmod o-w %s", tmp, tmp);
    ck_assert_str_eq(err.msg, expected);
    /* the sticky bit stops others replacing the file, but not adding their own: a scan of
     * such a folder is still refused */
    ck_assert_int_eq(chmod(tmp, 01777), 0);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, expected);

    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    ck_assert_int_eq(chmod(tmp, 0700), 0);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), 1);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* ---- a folder of good and bad objects ---------------------------------------------------- */

START_TEST(test_scan_mixed_folder) {
    char *tmp = tsr_test_tmpdir(), src[PATH_CAP], path[PATH_CAP];
    static const char *const copies[][3] = {
        /* case, fixture, name in the folder (the scan goes in name order) */
        {"good", "fx_good", "a_good.so"},
        {"minor-newer", "fx_minor_newer", "b_minor.so"},
        {"two-plugins", "fx_two", "c_two.so"},
        {"no-entry", "fx_no_entry", "d_no_entry.so"},
        {"good", "fx_good", ".hidden.so"},
        {"good", "fx_good", "e_good.so.bak"},
    };
    for (size_t i = 0; i < sizeof copies / sizeof copies[0]; i++) {
        fixture_path(src, copies[i][0], copies[i][1]);
        snprintf(path, sizeof path, "%s/%s", tmp, copies[i][2]);
        copy_file(src, path);
    }
    snprintf(path, sizeof path, "%s/f_text.so", tmp);
    ck_assert_int_eq(tsr_test_write_file(path, "text", 4), 0);

    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), 2);
    ck_assert_uint_eq(tsr_registry_count(reg), 3);
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-good"));
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-two"));
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_ROUTER, "fx-two-router"));

    char expected[3][MSG_CAP];
    snprintf(expected[0], sizeof expected[0],
             "%s/b_minor.so: plugin 'fx-minor-newer': needs cache ABI %d.%d, this host speaks "
             "%d.%d; update Tessera (skipped)",
             tmp, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR + 1, TSR_CACHE_ABI_MAJOR,
             TSR_CACHE_ABI_MINOR);
    snprintf(expected[1], sizeof expected[1],
             "%s/d_no_entry.so: no entry symbol 'tessera_plugin_entry': not a Tessera plugin, "
             "or built without TSR_PLUGIN_EXPORT() (skipped)", tmp);
    snprintf(expected[2], sizeof expected[2],
             "%s/f_text.so: not a shared object (no ELF header); plugin files are built with "
             "tessera_add_plugin() (skipped)", tmp);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 3);
    for (size_t i = 0; i < 3; i++) ck_assert_str_eq(tsr_registry_diagnostic(reg, i), expected[i]);
    tsr_registry_free(reg);

    char missing[PATH_CAP + 16];
    snprintf(missing, sizeof missing, "%s/nowhere", tmp);
    reg = tsr_registry_create(NULL);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, missing, &err), TSR_E_IO);
    snprintf(expected[0], sizeof expected[0], "%s: not a folder", missing);
    ck_assert_str_eq(err.msg, expected[0]);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* ---- instances --------------------------------------------------------------------------- */

START_TEST(test_instance_create_fails) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("good", "fx_good", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-good");
    fx_values fv;
    fx_values_init(&fv, ref->desc, 77, 1, 0);
    tsr_instance *inst = NULL;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &fv.params, &cache_init, &inst, &err),
                     TSR_E_INVALID);
    ck_assert_ptr_null(inst);
    ck_assert_str_eq(err.msg, "cache: fx-good: fail_create is set, window 77");
    tsr_registry_free(reg);
}
END_TEST

/* The block the fixture leaks on purpose, kept reachable so LeakSanitizer reports only leaks
 * nobody meant (volatile: an optimising build would drop a store that is never read). */
static void *volatile leaked_block;

START_TEST(test_instance_leak_reported) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("good", "fx_good", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-good");
    fx_values fv;
    fx_values_init(&fv, ref->desc, 128, 0, 1000);
    tsr_instance *inst;
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &fv.params, &cache_init, &inst, &err), TSR_OK);
    /* the instance's own state and the leaked block are both live */
    ck_assert_uint_gt(atomic_load(&inst->services.bytes_live), 1000);
    ck_assert_uint_eq(atomic_load(&inst->services.n_allocs_live), 2);
    char ret[32];
    const tsr_command *leaked_at = tsr_command_find(ref->desc, "leaked_at");
    ck_assert_int_eq(tsr_command_call(leaked_at, inst->self, NULL, 0, ret, sizeof ret, &err),
                     TSR_OK);
    leaked_block = (void *)(intptr_t)strtoll(ret, NULL, 10);
    ck_assert_ptr_nonnull(leaked_block);
    /* two instances of one plugin account separately */
    tsr_instance *clean;
    fx_values_init(&fv, ref->desc, 128, 0, 0);
    ck_assert_int_eq(tsr_instance_create(ref, NULL, &fv.params, &cache_init, &clean, &err),
                     TSR_OK);
    ck_assert_uint_eq(tsr_instance_destroy(clean), 0);
    ck_assert_uint_eq(tsr_instance_destroy(inst), 1000);
    ck_assert_uint_eq(tsr_instance_destroy(NULL), 0);
    tsr_registry_free(reg);
}
END_TEST

static Suite *loader_suite(void) {
    const tsr_test_case cases[] = {
        {"good", test_good_plugin},
        {"host_versions", test_host_versions},
        {"older_minor", test_older_or_equal_minor_loads},
        {"newer_minor", test_newer_stage_minor_refused},
        {"other_major", test_other_stage_major_refused},
        {"common_major", test_common_major_refused},
        {"common_minor", test_common_minor_refused},
        {"no_entry", test_no_entry_symbol},
        {"entry_null", test_entry_returns_null},
        {"empty_set", test_empty_set},
        {"optional_slots", test_null_optional_slots_load},
        {"mandatory_slot", test_null_mandatory_callback},
        {"short_vtable", test_short_vtable},
        {"two_plugins", test_two_plugins_in_one_object},
        {"param_tables", test_invalid_param_tables},
        {"command_signature", test_invalid_command_signature},
        {"dup_object", test_duplicate_in_one_object},
        {"dup_folder", test_duplicate_in_one_folder},
        {"shadowed", test_shadowed_across_folders},
        {"probe_zero", test_probe_zero},
        {"not_elf", test_not_a_shared_object},
        {"wrong_arch", test_wrong_architecture},
        {"truncated", test_truncated_elf},
        {"permissions", test_writable_by_others},
        {"scan_mixed", test_scan_mixed_folder},
        {"create_fails", test_instance_create_fails},
        {"leak", test_instance_leak_reported},
    };
    return tsr_test_suite("loader", cases, sizeof cases / sizeof cases[0]);
}

int main(void) {
    return tsr_test_run_suite(loader_suite());
}
