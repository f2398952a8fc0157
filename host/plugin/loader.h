/* Plugin loading: finding plugin objects, dlopen, version negotiation, descriptor checks,
 * and creating instances of a stage. */
#ifndef TSR_HOST_LOADER_H
#define TSR_HOST_LOADER_H

#include <stdbool.h>
#include <stddef.h>

#include <tessera/common.h>

#include "base/error.h"
#include "plugin/host_services.h"
#include "plugin/pool.h"

typedef struct tsr_registry tsr_registry;
typedef struct tsr_plugin_object tsr_plugin_object;

/* A plugin the registry knows: usable, or listed with the reason it cannot run here. */
typedef struct tsr_plugin_ref {
    const tsr_plugin_desc *desc;
    const char *path;        /* the object it came from */
    int32_t score;           /* the probe's answer; 0 = cannot run here */
    const char *unusable;    /* why score is 0, else NULL */
    tsr_plugin_object *object;
} tsr_plugin_ref;

/* The host's own version of each stage interface, and the stage's name. */
uint16_t tsr_stage_abi_major(int32_t stage);
uint16_t tsr_stage_abi_minor(int32_t stage);

tsr_registry *tsr_registry_create(tsr_pool *pool);
void tsr_registry_free(tsr_registry *reg);

/* Loads one object file and registers its plugins. On failure nothing is registered and
 * `err` holds one line: "<path>: <reason>[; <fix>]". A plugin of the object that fails its own
 * checks (stage version, NULL callbacks, duplicate name) is refused alone: its line goes to
 * the registry's diagnostics and the others still register. The file must pass
 * tsr_trust_file (plugin/trust.h) before it is opened. An object already loaded (the same
 * resolved file, reached through another name or link) is not loaded again. */
tsr_status tsr_registry_load_file(tsr_registry *reg, const char *path, tsr_error *err);

/* True when `file_name` is the name of a plugin file: STAGE-NAME.so, with STAGE a stage name
 * and NAME a valid plugin name ([a-z0-9_-], 1 to 64). Only such files are ever opened by a
 * search or a scan. */
bool tsr_plugin_file_name_ok(const char *file_name);

/* Loads every plugin file of `dir` (sorted by name). Objects that fail are recorded in the
 * diagnostics and skipped, and so is a plugin that its file name does not find (a lookup of
 * NAME opens STAGE-NAME.so only). A folder that fails tsr_trust_folder is refused whole.
 * Returns the number of objects that loaded, or a negative status when the folder cannot be
 * used. */
int tsr_registry_scan_dir(tsr_registry *reg, const char *dir, tsr_error *err);

/* ---- the search path ---------------------------------------------------------------------
 * Plugins are looked up by file name in an ordered list of folders, and only the file that
 * a lookup needs is opened. Each folder is checked once when added; a line at debug level says
 * what became of it (searched, with how many plugin files; or skipped, and why). */

/* Appends `dir` to the folders searched. `origin` says in messages where it came from
 * ("--plugin-dir", "plugin_dirs of p.yaml"). `named`: the user named it, so a folder that does
 * not exist, is not a folder, or holds no plugin file is a warning (else only a debug line).
 * A folder that fails tsr_trust_folder is skipped with a warning whatever its origin, and a
 * folder already in the list is not added twice. */
void tsr_registry_add_dir(tsr_registry *reg, const char *dir, const char *origin, bool named);

/* Appends the standard folders: those of TESSERA_PLUGIN_PATH (colon-separated), then, for a
 * program run from its build tree, the build's plugin folder, else the install folder found
 * from the program's own path (<bindir>/../<libdir>/tessera/plugins, so any install prefix
 * works). */
void tsr_registry_add_default_dirs(tsr_registry *reg);

/* The plugin `name` of `stage` (0: any stage): one already registered, else the one in the
 * file STAGE-NAME.so of the first search folder holding such a file, loaded now; the file
 * decides, even when it is refused. NULL when there is none: `err` then says why (the
 * file's refusal; the file providing other plugins; "'cpu' is a backend plugin, not a cache
 * plugin") or is empty (err->msg[0] == 0) when no folder has the plugin at all. */
const tsr_plugin_ref *tsr_registry_lookup(tsr_registry *reg, int32_t stage, const char *name,
                                          tsr_error *err);

/* Loads every plugin file of every search folder (tsr_registry_scan_dir), for listings. An
 * earlier folder's plugin shadows a later one of the same name (a diagnostic). */
void tsr_registry_load_all(tsr_registry *reg);

/* Lines to show whatever the command: a named folder missing or holding no plugin file, a
 * folder refused as unsafe. */
size_t tsr_registry_n_warnings(const tsr_registry *reg);
const char *tsr_registry_warning(const tsr_registry *reg, size_t i);

size_t tsr_registry_count(const tsr_registry *reg);
const tsr_plugin_ref *tsr_registry_at(const tsr_registry *reg, size_t i);
/* Among the registered plugins, by name, optionally restricted to a stage (0 = any). Loads
 * nothing: see tsr_registry_lookup. */
const tsr_plugin_ref *tsr_registry_find(const tsr_registry *reg, int32_t stage, const char *name);

/* Load-time diagnostics (one line each): refused objects and plugins, shadowed names, plugins
 * their file name does not find. */
size_t tsr_registry_n_diagnostics(const tsr_registry *reg);
const char *tsr_registry_diagnostic(const tsr_registry *reg, size_t i);

/* A live plugin instance. */
typedef struct tsr_instance {
    const tsr_plugin_ref *ref;
    const void *vtable;      /* ref->desc->vtable, typed by the stage */
    void *self;              /* what create returned */
    tsr_services services;   /* its host table, accounting its memory */
} tsr_instance;

/* Creates an instance: `init` is the stage's init struct (tsr_cache_init for a cache ...),
 * `params` the bound values. Refuses a plugin whose probe said it cannot run here. */
tsr_status tsr_instance_create(const tsr_plugin_ref *ref, tsr_pool *pool, const tsr_params *params,
                               const void *init, tsr_instance **out, tsr_error *err);
/* Destroys it; returns the bytes it still held through tsr_host.alloc (a leak) -- 0 when
 * clean. */
size_t tsr_instance_destroy(tsr_instance *inst);

#endif
