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
 * the registry's diagnostics and the others still register. */
tsr_status tsr_registry_load_file(tsr_registry *reg, const char *path, tsr_error *err);

/* Loads every "*.so" in `dir` (sorted by name). Objects that fail are recorded in the
 * diagnostics and skipped. A folder writable by others is refused whole. Returns the number
 * of objects that loaded, or a negative status when the folder cannot be read. */
int tsr_registry_scan_dir(tsr_registry *reg, const char *dir, tsr_error *err);

/* The standard search: `dirs` (from the config), then TESSERA_PLUGIN_PATH (colon-separated),
 * then the install folder (and, for a program run from its build tree, the build's plugin
 * folder). Missing folders are skipped silently; earlier folders shadow later ones. */
void tsr_registry_scan_default(tsr_registry *reg, char *const *dirs, size_t n_dirs);

size_t tsr_registry_count(const tsr_registry *reg);
const tsr_plugin_ref *tsr_registry_at(const tsr_registry *reg, size_t i);
/* By name, optionally restricted to a stage (0 = any). */
const tsr_plugin_ref *tsr_registry_find(const tsr_registry *reg, int32_t stage, const char *name);

/* Load-time diagnostics (one line each): refused objects and plugins, shadowed names. */
size_t tsr_registry_n_diagnostics(const tsr_registry *reg);
const char *tsr_registry_diagnostic(const tsr_registry *reg, size_t i);

/* The diagnostic that explains why a plugin named `name` was refused at load (version,
 * callbacks, duplicate...), or NULL when no object offered such a plugin. */
const char *tsr_registry_refusal(const tsr_registry *reg, const char *name);

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
