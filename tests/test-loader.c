/* Plugin loader: version negotiation, descriptor checks, refusals of bad files, the files and
 * folders it does not trust, the search path and lookups by file name, folder scans, and
 * instances. Each fixture object is tests/plugins/fixture.c built with the definitions of
 * its case (tests/CMakeLists.txt) into TSR_TEST_PLUGIN_DIR/<case>/. */
#include <check.h>
#include <dirent.h>
#include <grp.h>
#include <pwd.h>
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

/* Removes `path` and, for a folder, everything in it (made writable first). */
static void remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        chmod(path, 0700);
        DIR *d = opendir(path);
        ck_assert_ptr_nonnull(d);
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char child[PATH_CAP];
            snprintf(child, sizeof child, "%s/%s", path, e->d_name);
            remove_tree(child);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Removes a temporary folder made by real_tmpdir or tsr_test_tmpdir and what is in it. */
static void remove_tmpdir(char *dir) {
    remove_tree(dir);
    free(dir);
}

/* A fresh private temporary folder, resolved: its path as the loader reports it. */
static char *real_tmpdir(void) {
    char *tmp = tsr_test_tmpdir();
    char *real = realpath(tmp, NULL);
    ck_assert_ptr_nonnull(real);
    free(tmp);
    return real;
}

/* dir/name into `out` (PATH_CAP bytes). */
static void join(char *out, const char *dir, const char *name) {
    ck_assert_int_lt(snprintf(out, PATH_CAP, "%s/%s", dir, name), PATH_CAP);
}

/* Makes the folder parent/name with `mode` (whatever the umask); its path goes to `out`. */
static void make_dir(char *out, const char *parent, const char *name, mode_t mode) {
    join(out, parent, name);
    ck_assert_int_eq(mkdir(out, 0700), 0);
    ck_assert_int_eq(chmod(out, mode), 0);
}

/* Copies the fixture of `case_dir` to dir/name; its path goes to `out`. */
static void copy_fixture(char *out, const char *case_dir, const char *file, const char *dir,
                         const char *name) {
    char src[PATH_CAP];
    fixture_path(src, case_dir, file);
    join(out, dir, name);
    copy_file(src, out);
}

/* Copies the good fixture to tmp/<name>, patched by `patch` (may be NULL), and loads it. */
static tsr_status load_patched_copy(const char *tmp, const char *name,
                                    void (*patch)(char *data, size_t *size), char *path,
                                    tsr_error *err) {
    char src[PATH_CAP];
    fixture_path(src, "good", "cache-fx-good");
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
    fixture_path(path, "good", "cache-fx-good");
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
    tsr_registry *reg = load_fixture("same-minor", "cache-fx-same-minor", path, &st, &err);
    ck_assert_int_eq(st, TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-same-minor");
    ck_assert_ptr_nonnull(ref);
    ck_assert_uint_eq(ref->desc->stage_minor_needed, 0);
    tsr_registry_free(reg);

    reg = load_fixture("newer-table", "cache-fx-newer-table", path, &st, &err);
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
    assert_refused("minor-newer", "cache-fx-minor-newer", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_other_stage_major_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: plugin 'fx-major-other': built for cache ABI %d.x, this host speaks %d.%d; "
             "rebuild it against the %d.x SDK",
             TSR_CACHE_ABI_MAJOR + 1, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR,
             TSR_CACHE_ABI_MAJOR);
    assert_refused("major-other", "cache-fx-major-other", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_common_major_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt,
             "%%s: built for common ABI %d.x, this host speaks %d.%d; rebuild it against the "
             "%d.x SDK",
             TSR_COMMON_ABI_MAJOR + 1, TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR,
             TSR_COMMON_ABI_MAJOR);
    assert_refused("common-major", "cache-fx-common-major", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_common_minor_refused) {
    char fmt[256];
    snprintf(fmt, sizeof fmt, "%%s: needs common ABI %d.%d, this host speaks %d.%d; update Tessera",
             TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR + 1, TSR_COMMON_ABI_MAJOR,
             TSR_COMMON_ABI_MINOR);
    assert_refused("common-minor", "cache-fx-common-minor", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

/* ---- the entry point --------------------------------------------------------------------- */

START_TEST(test_no_entry_symbol) {
    assert_refused("no-entry", "cache-fx-no-entry", TSR_E_INVALID,
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
    assert_refused("entry-null", "cache-fx-entry-null", TSR_E_UNSUPPORTED, fmt);
}
END_TEST

START_TEST(test_empty_set) {
    assert_refused("empty-set", "cache-fx-empty-set", TSR_E_INVALID,
                   "%s: the object provides no plugins");
}
END_TEST

/* ---- descriptor and table checks --------------------------------------------------------- */

START_TEST(test_null_optional_slots_load) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("no-optional", "cache-fx-no-optional", path, &st, &err);
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
    assert_refused("null-view", "cache-fx-null-view", TSR_E_INVALID,
                   "%s: plugin 'fx-null-view': mandatory cache callback 'view' is NULL");
}
END_TEST

/* The least a host accepts is the 1.0 table, up to its last slot (stats): not today's size. */
START_TEST(test_short_vtable) {
    char fmt[256];
    size_t end_1_0 = offsetof(tsr_cache_vtable, stats) + sizeof(void (*)(void));
    snprintf(fmt, sizeof fmt,
             "%%s: plugin 'fx-short-table': cache vtable struct_size %zu is smaller than the "
             "%d.0 table (%zu bytes)",
             end_1_0 - sizeof(void (*)(void)), TSR_CACHE_ABI_MAJOR, end_1_0);
    assert_refused("short-table", "cache-fx-short-table", TSR_E_INVALID, fmt);
}
END_TEST

START_TEST(test_two_plugins_in_one_object) {
    char path[PATH_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("two-plugins", "cache-fx-two", path, &st, &err);
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
    assert_refused("params-dup", "cache-fx-params-dup", TSR_E_INVALID,
                   "%s: plugin 'fx-params-dup': parameter 'window' is declared twice");
    assert_refused("params-range", "cache-fx-params-range", TSR_E_INVALID,
                   "%s: plugin 'fx-params-range': parameter 'sink': default: expected an "
                   "integer in [0, 64], got '9000'");
}
END_TEST

START_TEST(test_invalid_command_signature) {
    assert_refused("bad-signature", "cache-fx-bad-signature", TSR_E_INVALID,
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
    tsr_registry *reg = load_fixture("dup-in-object", "cache-fx-dup", path, &st, &err);
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
    join(dir, TSR_TEST_PLUGIN_DIR, "dup-folder");
    fixture_path(a, "dup-folder", "cache-fx-dup-folder");
    fixture_path(b, "dup-folder", "cache-fx-dup-later");
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

/* The same name in two folders: a lookup opens the first folder's file and never the other; a
 * listing opens both and reports the later one as shadowed. */
static void check_shadowing(const char *first, const char *second) {
    char dirs[2][PATH_CAP], *real[2], expected[2 * PATH_CAP + 128];
    snprintf(dirs[0], PATH_CAP, "%s/%s", TSR_TEST_PLUGIN_DIR, first);
    snprintf(dirs[1], PATH_CAP, "%s/%s", TSR_TEST_PLUGIN_DIR, second);
    tsr_registry *reg = tsr_registry_create(NULL);
    for (int i = 0; i < 2; i++) {
        real[i] = realpath(dirs[i], NULL);
        tsr_registry_add_dir(reg, dirs[i], "test", true);
    }
    ck_assert_uint_eq(tsr_registry_n_warnings(reg), 0);
    tsr_error err;
    const tsr_plugin_ref *ref = tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-shadow", &err);
    ck_assert_ptr_nonnull(ref);
    snprintf(expected, sizeof expected, "%s/cache-fx-shadow.so", real[0]);
    ck_assert_str_eq(ref->path, expected);
    /* the second file, had it been opened, would have been reported as shadowed */
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 0);
    ck_assert_ptr_eq(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-shadow", &err), ref);

    tsr_registry_load_all(reg);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    ck_assert_ptr_eq(tsr_registry_find(reg, 0, "fx-shadow"), ref);
    snprintf(expected, sizeof expected,
             "%s/cache-fx-shadow.so: plugin 'fx-shadow' is shadowed by %s/cache-fx-shadow.so, "
             "which comes first in the search path (skipped)", real[1], real[0]);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 1);
    ck_assert_str_eq(tsr_registry_diagnostic(reg, 0), expected);
    tsr_registry_free(reg);
    free(real[0]);
    free(real[1]);
}

START_TEST(test_shadowed_across_folders) {
    check_shadowing("shadow-1", "shadow-2");
    check_shadowing("shadow-2", "shadow-1");
}
END_TEST

/* ---- probe ------------------------------------------------------------------------------- */

START_TEST(test_probe_zero) {
    char path[PATH_CAP], expected[MSG_CAP];
    tsr_error err;
    tsr_status st;
    tsr_registry *reg = load_fixture("probe-zero", "cache-fx-probe-zero", path, &st, &err);
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
    join(path, tmp, "x.so");
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

/* ---- trust: files and folders the host refuses to open ----------------------------------- */

START_TEST(test_file_writable_by_others) {
    char *tmp = real_tmpdir(), path[PATH_CAP], expected[MSG_CAP];
    copy_fixture(path, "good", "cache-fx-good", tmp, "cache-fx-good.so");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(chmod(path, 0757), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: file %s is writable by others; fix with: chmod o-w %s", path,
             path, path);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    ck_assert_int_eq(chmod(path, 0755), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* Others who can write the folder could replace the file: nothing in it loads. With the
 * sticky bit they cannot, so the file itself loads; but a search of the folder stays refused,
 * since they could still add files (or links) of their own. */
START_TEST(test_folder_writable_by_others) {
    char *tmp = real_tmpdir(), path[PATH_CAP], expected[MSG_CAP];
    copy_fixture(path, "good", "cache-fx-good", tmp, "cache-fx-good.so");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(chmod(tmp, 0777), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: folder %s is writable by others; fix with: chmod o-w %s",
             path, tmp, tmp);
    ck_assert_str_eq(err.msg, expected);

    snprintf(expected, sizeof expected,
             "%s: refusing to search it for plugins: folder %s is writable by others; fix with: "
             "chmod o-w %s", tmp, tmp, tmp);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_int_eq(chmod(tmp, 01777), 0);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, expected);
    /* on the search path: skipped with a warning, even when not named by the user */
    tsr_registry_add_dir(reg, tmp, "TESSERA_PLUGIN_PATH", false);
    ck_assert_uint_eq(tsr_registry_n_warnings(reg), 1);
    ck_assert_str_eq(tsr_registry_warning(reg, 0), expected);
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err));
    ck_assert_str_eq(err.msg, "");
    ck_assert_uint_eq(tsr_registry_count(reg), 0);

    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    tsr_registry_free(reg);
    ck_assert_int_eq(chmod(tmp, 0700), 0);
    reg = tsr_registry_create(NULL);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), 1);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* A link in a safe folder to a file in an unsafe one: the resolved file's folders decide. */
START_TEST(test_link_into_unsafe_folder) {
    char *tmp = real_tmpdir(), safe[PATH_CAP], open[PATH_CAP], target[PATH_CAP],
         link[PATH_CAP], expected[MSG_CAP];
    make_dir(safe, tmp, "safe", 0755);
    make_dir(open, tmp, "open", 0777);
    copy_fixture(target, "good", "cache-fx-good", open, "anything.so");
    join(link, safe, "cache-fx-good.so");
    ck_assert_int_eq(symlink(target, link), 0);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, safe, "--plugin-dir", true);
    ck_assert_uint_eq(tsr_registry_n_warnings(reg), 0);
    tsr_error err;
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err));
    snprintf(expected, sizeof expected,
             "%s: refusing to load: folder %s is writable by others; fix with: chmod o-w %s",
             link, open, open);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_int_eq(tsr_registry_load_file(reg, link, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, expected);

    ck_assert_int_eq(chmod(open, 0755), 0);
    const tsr_plugin_ref *ref = tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err);
    ck_assert_msg(ref != NULL, "%s", err.msg);
    ck_assert_str_eq(ref->path, link);
    tsr_registry_free(reg);

    /* the other way round: whoever can replace the link chooses what is loaded */
    char unsafe_link[PATH_CAP];
    ck_assert_int_eq(chmod(open, 0777), 0);
    copy_fixture(target, "good", "cache-fx-good", safe, "real.so");
    join(unsafe_link, open, "cache-fx-good.so");
    ck_assert_int_eq(symlink(target, unsafe_link), 0);
    reg = tsr_registry_create(NULL);
    ck_assert_int_eq(tsr_registry_load_file(reg, unsafe_link, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: folder %s is writable by others; fix with: chmod o-w %s",
             unsafe_link, open, open);
    ck_assert_str_eq(err.msg, expected);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* A safe folder inside one that others can write (so could rename, and replace): refused. A
 * sticky folder above is fine (/tmp is one). */
START_TEST(test_safe_folder_in_unsafe_parent) {
    char *tmp = real_tmpdir(), open[PATH_CAP], inner[PATH_CAP], path[PATH_CAP],
         expected[MSG_CAP];
    make_dir(open, tmp, "open", 0777);
    make_dir(inner, open, "inner", 0755);
    copy_fixture(path, "good", "cache-fx-good", inner, "cache-fx-good.so");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: folder %s is writable by others; fix with: chmod o-w %s",
             path, open, open);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, inner, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to search it for plugins: folder %s is writable by others; fix "
             "with: chmod o-w %s", inner, open, open);
    ck_assert_str_eq(err.msg, expected);

    ck_assert_int_eq(chmod(open, 01777), 0);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, inner, &err), 1);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* A uid, and a gid, that no account or group has. */
static uid_t stranger_uid(void) {
    uid_t uid = 54321;
    while (getpwuid(uid)) uid++;
    return uid;
}

static gid_t unknown_gid(void) {
    gid_t gid = 54321;
    while (getgrgid(gid)) gid++;
    return gid;
}

/* The primary group of some other account: a group the caller is not alone in; 0 when there
 * is no such account. */
static gid_t shared_gid(void) {
    gid_t gid = 0;
    struct passwd *pw;
    setpwent();
    while (!gid && (pw = getpwent()))
        if (pw->pw_uid != geteuid() && pw->pw_gid != getegid()) gid = pw->pw_gid;
    endpwent();
    return gid;
}

/* Files and folders owned by someone else (not root, not the caller) are refused. Only root
 * can give a file away, so the test runs as root only. */
START_TEST(test_owned_by_another_user) {
    if (geteuid() != 0) {
        fprintf(stderr, "test-loader: owned_by_another_user needs root to chown; not run\n");
        return;
    }
    char *tmp = real_tmpdir(), dir[PATH_CAP], path[PATH_CAP], expected[MSG_CAP];
    make_dir(dir, tmp, "plugins", 0755);
    copy_fixture(path, "good", "cache-fx-good", dir, "cache-fx-good.so");
    uid_t stranger = stranger_uid();
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;

    ck_assert_int_eq(chown(path, stranger, (gid_t)-1), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: file %s is owned by uid %u, not by root or you; fix with: "
             "chown root %s (if you trust it)", path, path, (unsigned)stranger, path);
    ck_assert_str_eq(err.msg, expected);

    ck_assert_int_eq(chown(path, 0, (gid_t)-1), 0);
    ck_assert_int_eq(chown(dir, stranger, (gid_t)-1), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
    snprintf(expected, sizeof expected,
             "%s: refusing to load: folder %s is owned by uid %u, not by root or you; fix "
             "with: chown root %s (if you trust it)", path, dir, (unsigned)stranger, dir);
    ck_assert_str_eq(err.msg, expected);
    tsr_registry_add_dir(reg, dir, "--plugin-dir", true);
    snprintf(expected, sizeof expected,
             "%s: refusing to search it for plugins: folder %s is owned by uid %u, not by root "
             "or you; fix with: chown root %s (if you trust it)", dir, dir, (unsigned)stranger,
             dir);
    ck_assert_str_eq(tsr_registry_warning(reg, 0), expected);

    ck_assert_int_eq(chown(dir, 0, (gid_t)-1), 0);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* Whether the caller is the only member of its primary group, read from /etc/passwd and
 * /etc/group themselves (the host asks through NSS). */
static bool caller_alone_in_group(void) {
    FILE *f = fopen("/etc/passwd", "r");
    if (!f) return false;
    char me[256] = "";
    bool others = false;
    struct passwd *pw;
    while ((pw = fgetpwent(f)))
        if (pw->pw_gid == getegid()) {
            if (pw->pw_uid == geteuid()) snprintf(me, sizeof me, "%s", pw->pw_name);
            else others = true;
        }
    fclose(f);
    f = fopen("/etc/group", "r");
    if (!f) return false;
    bool alone = !others && *me;
    struct group *gr;
    while ((gr = fgetgrent(f)))
        for (char **m = gr->gr_gid == getegid() ? gr->gr_mem : NULL; m && *m; m++)
            alone = alone && strcmp(*m, me) == 0;
    fclose(f);
    return alone;
}

/* A group-writable file is accepted when its group is its owner's alone, refused otherwise. */
START_TEST(test_group_writable) {
    char *tmp = real_tmpdir(), path[PATH_CAP], expected[MSG_CAP];
    copy_fixture(path, "good", "cache-fx-good", tmp, "cache-fx-good.so");
    ck_assert_int_eq(chmod(path, 0775), 0);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    if (caller_alone_in_group()) {
        ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
        tsr_registry_free(reg);
        reg = tsr_registry_create(NULL);
    }
    gid_t shared = shared_gid();
    struct group *gr = shared ? getgrgid(shared) : NULL;
    if (geteuid() == 0 && gr) {
        ck_assert_int_eq(chown(path, (uid_t)-1, shared), 0);
        ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
        snprintf(expected, sizeof expected,
                 "%s: refusing to load: file %s is writable by group '%s' (gid %u), which is not "
                 "its owner's alone; fix with: chmod g-w %s", path, path, gr->gr_name,
                 (unsigned)shared, path);
        ck_assert_str_eq(err.msg, expected);
    }
    if (geteuid() == 0) {
        gid_t gid = unknown_gid();
        ck_assert_int_eq(chown(path, (uid_t)-1, gid), 0);
        ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_E_INVALID);
        snprintf(expected, sizeof expected,
                 "%s: refusing to load: file %s is writable by gid %u, which is not its owner's "
                 "alone; fix with: chmod g-w %s", path, path, (unsigned)gid, path);
        ck_assert_str_eq(err.msg, expected);
        ck_assert_int_eq(chmod(path, 0755), 0);
        ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    }
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* ---- the search path and lookups by name -------------------------------------------------- */

START_TEST(test_plugin_file_names) {
    static const char *const yes[] = {"cache-full.so", "backend-cpu.so", "router-a.so",
                                      "decoder-template-greedy.so", "quantizer-q_4.so"};
    static const char *const no[] = {"full.so", "cache-.so", "cache-full", "cache-full.so.1",
                                     "cache-Full.so", "libcache-full.so", ".cache-full.so",
                                     "caches-full.so", "cache_full.so", "cache-a.b.so",
                                     "cache-x.sox", "cache-fulL.so"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++)
        ck_assert_msg(tsr_plugin_file_name_ok(yes[i]), "%s", yes[i]);
    for (size_t i = 0; i < sizeof no / sizeof *no; i++)
        ck_assert_msg(!tsr_plugin_file_name_ok(no[i]), "%s", no[i]);
    char longest[128];
    snprintf(longest, sizeof longest, "cache-%.64s.so",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    ck_assert(tsr_plugin_file_name_ok(longest));
    snprintf(longest, sizeof longest, "cache-%.65s.so",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    ck_assert(!tsr_plugin_file_name_ok(longest));
}
END_TEST

/* Folders the user named warn when missing, not folders, or without plugin files; the others
 * are skipped quietly. */
START_TEST(test_search_folder_warnings) {
    char *tmp = real_tmpdir(), missing[PATH_CAP], empty[PATH_CAP], empty_too[PATH_CAP],
         file[PATH_CAP], expected[MSG_CAP];
    join(missing, tmp, "nowhere");
    make_dir(empty, tmp, "empty", 0755);
    make_dir(empty_too, tmp, "empty-too", 0755);
    join(file, tmp, "cache-x.so");
    ck_assert_int_eq(tsr_test_write_file(file, "x", 1), 0);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, missing, "--plugin-dir", true);
    tsr_registry_add_dir(reg, missing, "TESSERA_PLUGIN_PATH", false);
    tsr_registry_add_dir(reg, empty, "plugin_dirs of p.yaml", true);
    tsr_registry_add_dir(reg, empty_too, "TESSERA_PLUGIN_PATH", false);
    tsr_registry_add_dir(reg, file, "--plugin-dir", true);
    tsr_registry_add_dir(reg, file, "TESSERA_PLUGIN_PATH", false);
    ck_assert_uint_eq(tsr_registry_n_warnings(reg), 3);
    snprintf(expected, sizeof expected, "%s: no such folder (a plugin folder from --plugin-dir)",
             missing);
    ck_assert_str_eq(tsr_registry_warning(reg, 0), expected);
    snprintf(expected, sizeof expected, "%s: holds no plugin file named STAGE-NAME.so (a plugin "
             "folder from plugin_dirs of p.yaml)", empty);
    ck_assert_str_eq(tsr_registry_warning(reg, 1), expected);
    snprintf(expected, sizeof expected, "%s: not a folder (a plugin folder from --plugin-dir)",
             file);
    ck_assert_str_eq(tsr_registry_warning(reg, 2), expected);
    ck_assert_ptr_null(tsr_registry_warning(reg, 3));
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* A lookup opens the one file its name gives and nothing else; a listing opens every plugin
 * file, and still no other shared object. */
START_TEST(test_lookup_opens_only_its_file) {
    char *tmp = real_tmpdir(), path[PATH_CAP], log[PATH_CAP];
    copy_fixture(path, "good", "cache-fx-good", tmp, "cache-fx-good.so");
    copy_fixture(path, "trap", "cache-fx-trap", tmp, "cache-fx-trap.so");
    copy_fixture(path, "trap", "libfx-trap", tmp, "libfx-trap.so");
    join(log, tmp, "opened.log");
    setenv("TSR_FX_TRAP_LOG", log, 1);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, tmp, "--plugin-dir", true);
    tsr_error err;
    ck_assert_ptr_nonnull(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err));
    ck_assert_ptr_null(tsr_test_read_file(log, NULL));
    tsr_registry_load_all(reg);
    char *opened = tsr_test_read_file(log, NULL);
    ck_assert_str_eq(opened ? opened : "(none)", "cache-fx-trap\n");
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-trap"));
    ck_assert_ptr_null(tsr_registry_find(reg, 0, "fx-trap-lib"));
    free(opened);
    unsetenv("TSR_FX_TRAP_LOG");
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

START_TEST(test_lookup_by_name) {
    char good[PATH_CAP], two[PATH_CAP];
    join(good, TSR_TEST_PLUGIN_DIR, "good");
    join(two, TSR_TEST_PLUGIN_DIR, "two-plugins");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, good, "--plugin-dir", true);
    tsr_registry_add_dir(reg, two, "--plugin-dir", true);
    tsr_error err;
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "nosuch", &err));
    ck_assert_str_eq(err.msg, "");
    /* a name is never a path */
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "../good/cache-fx-good", &err));
    ck_assert_str_eq(err.msg, "");
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_COUNT + 1, "fx-good", &err));
    ck_assert_str_eq(err.msg, "");
    /* the stage is told by the file name alone, before anything is opened... */
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_ROUTER, "fx-good", &err));
    ck_assert_str_eq(err.msg, "'fx-good' is a cache plugin, not a router plugin");
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    const tsr_plugin_ref *ref = tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err);
    ck_assert_ptr_nonnull(ref);
    ck_assert_uint_eq(tsr_registry_count(reg), 1);
    ck_assert_ptr_eq(tsr_registry_lookup(reg, 0, "fx-good", &err), ref);
    /* ...and by the registry once it is loaded */
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_DECODER, "fx-good", &err));
    ck_assert_str_eq(err.msg, "'fx-good' is a cache plugin, not a decoder plugin");
    /* any stage: the second folder's cache-fx-two.so */
    ref = tsr_registry_lookup(reg, 0, "fx-two", &err);
    ck_assert_ptr_nonnull(ref);
    ck_assert_int_eq(ref->desc->stage, TSR_STAGE_CACHE);
    ck_assert_uint_eq(tsr_registry_count(reg), 3);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 0);
    tsr_registry_free(reg);
}
END_TEST

/* The first file of the name decides: refused, or holding other plugins, the lookup fails
 * with its reason and does not go on to a later folder. */
START_TEST(test_lookup_file_decides) {
    char *tmp = real_tmpdir(), refused[PATH_CAP], other[PATH_CAP], partly[PATH_CAP],
         good[PATH_CAP], path[PATH_CAP], expected[MSG_CAP];
    make_dir(refused, tmp, "refused", 0755);
    copy_fixture(path, "minor-newer", "cache-fx-minor-newer", refused, "cache-fx-good.so");
    join(good, TSR_TEST_PLUGIN_DIR, "good");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, refused, "--plugin-dir", true);
    tsr_registry_add_dir(reg, good, "--plugin-dir", true);
    tsr_error err;
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err));
    snprintf(expected, sizeof expected,
             "%s: plugin 'fx-minor-newer': needs cache ABI %d.%d, this host speaks %d.%d; "
             "update Tessera", path, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR + 1,
             TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_uint_eq(tsr_registry_count(reg), 0);
    tsr_registry_free(reg);

    make_dir(other, tmp, "other", 0755);
    copy_fixture(path, "two-plugins", "cache-fx-two", other, "cache-fx-good.so");
    reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, other, "--plugin-dir", true);
    tsr_registry_add_dir(reg, good, "--plugin-dir", true);
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-good", &err));
    snprintf(expected, sizeof expected,
             "%s: holds no cache plugin 'fx-good' but cache 'fx-two', router 'fx-two-router'; a "
             "plugin file is named after the plugin it holds (STAGE-NAME.so)", path);
    ck_assert_str_eq(err.msg, expected);
    tsr_registry_free(reg);

    /* an object whose other plugin loads: the refusal of the one asked for */
    make_dir(partly, tmp, "partly", 0755);
    copy_fixture(path, "two-refused", "cache-fx-two-refused", partly,
                 "cache-fx-two-refused.so");
    reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, partly, "--plugin-dir", true);
    ck_assert_ptr_null(tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-two-refused", &err));
    snprintf(expected, sizeof expected,
             "%s: plugin 'fx-two-refused': built for cache ABI %d.x, this host speaks %d.%d; "
             "rebuild it against the %d.x SDK", path, TSR_CACHE_ABI_MAJOR + 1,
             TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR, TSR_CACHE_ABI_MAJOR);
    ck_assert_str_eq(err.msg, expected);
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_ROUTER, "fx-two-refused-router"));
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* An object of two plugins is found by the second name through a link, and loads once. */
START_TEST(test_two_plugins_through_a_link) {
    char *tmp = real_tmpdir(), path[PATH_CAP], link[PATH_CAP];
    copy_fixture(path, "two-plugins", "cache-fx-two", tmp, "cache-fx-two.so");
    join(link, tmp, "router-fx-two-router.so");
    ck_assert_int_eq(symlink("cache-fx-two.so", link), 0);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_registry_add_dir(reg, tmp, "--plugin-dir", true);
    tsr_error err;
    const tsr_plugin_ref *router = tsr_registry_lookup(reg, TSR_STAGE_ROUTER, "fx-two-router",
                                                       &err);
    ck_assert_msg(router != NULL, "%s", err.msg);
    ck_assert_str_eq(router->path, link);
    const tsr_plugin_ref *cache = tsr_registry_lookup(reg, TSR_STAGE_CACHE, "fx-two", &err);
    ck_assert_ptr_nonnull(cache);
    ck_assert_ptr_eq(cache->object, router->object);
    tsr_registry_load_all(reg);
    ck_assert_uint_eq(tsr_registry_count(reg), 2);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 0);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* A scan says when a plugin it loaded cannot be found by name, with the link that fixes it. */
START_TEST(test_plugin_not_found_by_name) {
    char *tmp = real_tmpdir(), two[PATH_CAP], odd[PATH_CAP], expected[2][MSG_CAP];
    copy_fixture(two, "two-plugins", "cache-fx-two", tmp, "cache-fx-two.so");
    copy_fixture(odd, "good", "cache-fx-good", tmp, "cache-odd.so");
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), 2);
    snprintf(expected[0], sizeof expected[0],
             "%s: plugin 'fx-two-router' cannot be found by name, which looks for "
             "%s/router-fx-two-router.so only; rename the file, or add a link: ln -s %s "
             "%s/router-fx-two-router.so", two, tmp, two, tmp);
    snprintf(expected[1], sizeof expected[1],
             "%s: plugin 'fx-good' cannot be found by name, which looks for %s/cache-fx-good.so "
             "only; rename the file, or add a link: ln -s %s %s/cache-fx-good.so", odd, tmp,
             odd, tmp);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 2);
    /* the scan goes in name order: cache-fx-two.so, then cache-odd.so */
    ck_assert_str_eq(tsr_registry_diagnostic(reg, 0), expected[0]);
    ck_assert_str_eq(tsr_registry_diagnostic(reg, 1), expected[1]);
    tsr_registry_free(reg);
    remove_tmpdir(tmp);
}
END_TEST

/* ---- a folder of good and bad objects ---------------------------------------------------- */

START_TEST(test_scan_mixed_folder) {
    char *tmp = real_tmpdir(), path[PATH_CAP];
    static const char *const copies[][3] = {
        /* case, fixture, name in the folder (the scan goes in name order) */
        {"good", "cache-fx-good", "cache-fx-good.so"},
        {"minor-newer", "cache-fx-minor-newer", "cache-fx-minor-newer.so"},
        {"two-plugins", "cache-fx-two", "cache-fx-two.so"},
        {"no-entry", "cache-fx-no-entry", "cache-no-entry.so"},
        /* never opened: hidden, not ending in .so, or not named as a plugin */
        {"good", "cache-fx-good", ".cache-hidden.so"},
        {"good", "cache-fx-good", "cache-fx-good.so.bak"},
        {"good", "cache-fx-good", "libgood.so"},
    };
    for (size_t i = 0; i < sizeof copies / sizeof copies[0]; i++)
        copy_fixture(path, copies[i][0], copies[i][1], tmp, copies[i][2]);
    join(path, tmp, "cache-text.so");
    ck_assert_int_eq(tsr_test_write_file(path, "text", 4), 0);
    char link[PATH_CAP];
    join(link, tmp, "router-fx-two-router.so");
    ck_assert_int_eq(symlink("cache-fx-two.so", link), 0);

    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    ck_assert_int_eq(tsr_registry_scan_dir(reg, tmp, &err), 2);
    ck_assert_uint_eq(tsr_registry_count(reg), 3);
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-good"));
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_CACHE, "fx-two"));
    ck_assert_ptr_nonnull(tsr_registry_find(reg, TSR_STAGE_ROUTER, "fx-two-router"));

    char expected[3][MSG_CAP];
    snprintf(expected[0], sizeof expected[0],
             "%s/cache-fx-minor-newer.so: plugin 'fx-minor-newer': needs cache ABI %d.%d, this "
             "host speaks %d.%d; update Tessera (skipped)",
             tmp, TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR + 1, TSR_CACHE_ABI_MAJOR,
             TSR_CACHE_ABI_MINOR);
    snprintf(expected[1], sizeof expected[1],
             "%s/cache-no-entry.so: no entry symbol 'tessera_plugin_entry': not a Tessera "
             "plugin, or built without TSR_PLUGIN_EXPORT() (skipped)", tmp);
    snprintf(expected[2], sizeof expected[2],
             "%s/cache-text.so: not a shared object (no ELF header); plugin files are built "
             "with tessera_add_plugin() (skipped)", tmp);
    ck_assert_uint_eq(tsr_registry_n_diagnostics(reg), 3);
    for (size_t i = 0; i < 3; i++) ck_assert_str_eq(tsr_registry_diagnostic(reg, i), expected[i]);
    tsr_registry_free(reg);

    char missing[PATH_CAP + 16];
    join(missing, tmp, "nowhere");
    reg = tsr_registry_create(NULL);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, missing, &err), TSR_E_IO);
    snprintf(expected[0], sizeof expected[0], "%s: no such folder", missing);
    ck_assert_str_eq(err.msg, expected[0]);
    ck_assert_int_eq(tsr_registry_scan_dir(reg, path, &err), TSR_E_IO);
    snprintf(expected[0], sizeof expected[0], "%s: not a folder", path);
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
    tsr_registry *reg = load_fixture("good", "cache-fx-good", path, &st, &err);
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
    tsr_registry *reg = load_fixture("good", "cache-fx-good", path, &st, &err);
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
        {"file_writable", test_file_writable_by_others},
        {"folder_writable", test_folder_writable_by_others},
        {"link_unsafe", test_link_into_unsafe_folder},
        {"unsafe_parent", test_safe_folder_in_unsafe_parent},
        {"other_owner", test_owned_by_another_user},
        {"group_writable", test_group_writable},
        {"file_names", test_plugin_file_names},
        {"folder_warnings", test_search_folder_warnings},
        {"lookup_only_file", test_lookup_opens_only_its_file},
        {"lookup", test_lookup_by_name},
        {"lookup_file_decides", test_lookup_file_decides},
        {"two_through_link", test_two_plugins_through_a_link},
        {"not_found_by_name", test_plugin_not_found_by_name},
        {"scan_mixed", test_scan_mixed_folder},
        {"create_fails", test_instance_create_fails},
        {"leak", test_instance_leak_reported},
    };
    return tsr_test_suite("loader", cases, sizeof cases / sizeof cases[0]);
}

int main(void) {
    return tsr_test_run_suite(loader_suite());
}
