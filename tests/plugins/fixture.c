/*
 * One fixture plugin object, compiled once per loader test case with compile definitions that
 * select what is wrong with it (tests/CMakeLists.txt lists the cases). Without any definition
 * it is a well-formed cache plugin with parameters and commands.
 *
 * Value switches (defaults in brackets):
 *   FX_NAME                 plugin name ["fx-good"]
 *   FX_STAGE_MAJOR          stage_major [TSR_CACHE_ABI_MAJOR]
 *   FX_STAGE_MINOR_NEEDED   stage_minor_needed [TSR_CACHE_ABI_MINOR]
 *   FX_COMMON_MAJOR         the set's common_major [TSR_COMMON_ABI_MAJOR]
 *   FX_COMMON_MINOR_NEEDED  the set's common_minor_needed [TSR_COMMON_ABI_MINOR]
 *   FX_VTABLE_DELTA         slots added to today's table's struct_size, or removed from the
 *                           end of the 1.0 table [0]
 *   FX_N_PLUGINS            how many descriptors the set lists (0 = empty set) [1]
 * Flag switches:
 *   FX_NO_ENTRY       exports no entry symbol
 *   FX_ENTRY_NULL     the entry refuses this host (returns NULL after set_error)
 *   FX_NO_OPTIONAL    every optional cache slot is NULL
 *   FX_NULL_VIEW      the mandatory 'view' slot is NULL
 *   FX_TWO_PLUGINS    the object also provides a router plugin, FX_NAME "-router"
 *   FX_DUP_IN_OBJECT  the object lists the cache descriptor twice
 *   FX_PROBE_ZERO     the probe says the plugin cannot run here
 *   FX_PARAMS_DUP     two parameters share a name
 *   FX_PARAMS_RANGE   a parameter's default lies outside its range
 *   FX_BAD_SIGNATURE  a command declares the instance after another argument
 *   FX_TRAP           a text: the object's constructor appends it as a line to the file
 *                     named by $TSR_FX_TRAP_LOG, to show whether the host opened it at all
 */
#include <tessera/sdk.h>

#ifndef FX_NAME
#define FX_NAME "fx-good"
#endif
#ifndef FX_STAGE_MAJOR
#define FX_STAGE_MAJOR TSR_CACHE_ABI_MAJOR
#endif
#ifndef FX_STAGE_MINOR_NEEDED
#define FX_STAGE_MINOR_NEEDED TSR_CACHE_ABI_MINOR
#endif
#ifndef FX_COMMON_MAJOR
#define FX_COMMON_MAJOR TSR_COMMON_ABI_MAJOR
#endif
#ifndef FX_COMMON_MINOR_NEEDED
#define FX_COMMON_MINOR_NEEDED TSR_COMMON_ABI_MINOR
#endif
#ifndef FX_VTABLE_DELTA
#define FX_VTABLE_DELTA 0
#endif
#ifndef FX_N_PLUGINS
#define FX_N_PLUGINS 1
#endif

/* ---- the cache plugin ------------------------------------------------------------------- */

typedef struct fx_cache {
    const tsr_host *host;
    int64_t window;
    void *leaked; /* allocated through the host and deliberately never freed */
} fx_cache;

static tsr_status fx_create(const tsr_host *host, const tsr_params *params,
                            const tsr_cache_init *init, void **out) {
    (void)init;
    if (tsr_param_bool(params, "fail_create")) {
        host->set_error(host->ctx, "fail_create is set, window %lld",
                        (long long)tsr_param_int(params, "window"));
        return TSR_E_INVALID;
    }
    fx_cache *c = tsr_calloc(host, 1, sizeof *c);
    if (!c) return TSR_E_NOMEM;
    c->host = host;
    c->window = tsr_param_int(params, "window");
    int64_t leak = tsr_param_int(params, "leak_bytes");
    if (leak > 0) c->leaked = host->alloc(host->ctx, (size_t)leak, 0);
    *out = c;
    return TSR_OK;
}

static void fx_destroy(void *self) {
    fx_cache *c = self;
    c->host->free(c->host->ctx, c);
}

static tsr_status fx_seq_begin(void *self, int64_t seq_id) {
    (void)self;
    return seq_id >= 0 ? TSR_OK : TSR_E_RANGE;
}
static void fx_seq_end(void *self, int64_t seq_id) { (void)self, (void)seq_id; }
static tsr_status fx_store(void *self, const tsr_kv_write *w) {
    (void)self;
    return w ? TSR_OK : TSR_E_INVALID;
}
#ifndef FX_NULL_VIEW
static tsr_status fx_view(void *self, int64_t seq_id, int32_t layer, int32_t phase,
                          tsr_kv_view *views) {
    (void)self, (void)seq_id, (void)layer, (void)phase, (void)views;
    return TSR_E_UNSUPPORTED;
}
#endif
#ifndef FX_NO_OPTIONAL
static tsr_status fx_seq_fork(void *self, int64_t src, int64_t dst) {
    (void)self;
    return src != dst ? TSR_OK : TSR_E_INVALID;
}
static tsr_status fx_seq_hook(void *self, int64_t seq_id) {
    (void)self, (void)seq_id;
    return TSR_OK;
}
static void fx_stats(void *self, tsr_cache_stats *out) {
    (void)self;
    *out = (tsr_cache_stats){TSR_SIZED(tsr_cache_stats)};
}
#endif

/* Slots a newer cache MINOR might append: the host must ignore what it does not know. */
static void fx_appended(void) {}

typedef struct fx_cache_table {
    tsr_cache_vtable base;
    void (*appended[2])(void);
} fx_cache_table;

static const fx_cache_table fx_vtable = {
    .base = {
        /* A short table is measured from the end of the 1.0 table (its last slot, stats), the
         * least a host accepts; a longer one from today's. */
        .struct_size = (uint32_t)((FX_VTABLE_DELTA < 0
                                       ? offsetof(tsr_cache_vtable, stats) + sizeof(void *)
                                       : sizeof(tsr_cache_vtable)) +
                                  (FX_VTABLE_DELTA) * (int)sizeof(void (*)(void))),
        .create = fx_create,
        .destroy = fx_destroy,
        .seq_begin = fx_seq_begin,
        .seq_end = fx_seq_end,
        .store = fx_store,
#ifndef FX_NULL_VIEW
        .view = fx_view,
#endif
#ifndef FX_NO_OPTIONAL
        .seq_fork = fx_seq_fork,
        .seq_truncate = NULL,
        .prefill_end = fx_seq_hook,
        .step_end = fx_seq_hook,
        .stats = fx_stats,
#endif
    },
    .appended = {fx_appended, fx_appended},
};

static const char *const fx_modes[] = {"fast", "exact", NULL};

static const tsr_param_def fx_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "128",
     .min = 1, .max = 4096, .unit = "tokens", .doc = "recent tokens kept"},
    {TSR_SIZED(tsr_param_def), .name = "fail_create", .type = TSR_PARAM_BOOL,
     .default_value = "false", .doc = "create fails with a message"},
    {TSR_SIZED(tsr_param_def), .name = "leak_bytes", .type = TSR_PARAM_INT, .default_value = "0",
     .min = 0, .max = 1 << 20, .unit = "bytes", .doc = "host memory create never frees"},
#if defined(FX_PARAMS_DUP)
    {TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT, .default_value = "64",
     .min = 1, .max = 4096, .doc = "declared twice"},
#elif defined(FX_PARAMS_RANGE)
    {TSR_SIZED(tsr_param_def), .name = "sink", .type = TSR_PARAM_INT, .default_value = "9000",
     .min = 0, .max = 64, .unit = "tokens", .doc = "default outside its range"},
#endif
    {TSR_SIZED(tsr_param_def), .name = "mode", .type = TSR_PARAM_ENUM, .default_value = "fast",
     .choices = fx_modes, .doc = "how to keep tokens"},
};

/* Commands: the instance's window, where its leaked block is (so a test can keep it
 * reachable for LeakSanitizer), and a text echo. */
static int64_t fx_cmd_window(void *self) { return ((const fx_cache *)self)->window; }
static int64_t fx_cmd_leaked_at(void *self) {
    return (int64_t)(intptr_t)((const fx_cache *)self)->leaked;
}
static const char *fx_cmd_echo(const char *text) { return text; }

static const tsr_command fx_commands[] = {
    {TSR_SIZED(tsr_command), .name = "window", .signature = "l(I)",
     .fn = (void (*)(void))fx_cmd_window, .doc = "window(): the configured window"},
    {TSR_SIZED(tsr_command), .name = "leaked_at", .signature = "l(I)",
     .fn = (void (*)(void))fx_cmd_leaked_at, .doc = "leaked_at(): address of the leaked block"},
#ifdef FX_BAD_SIGNATURE
    {TSR_SIZED(tsr_command), .name = "echo", .signature = "s(sI)",
     .fn = (void (*)(void))fx_cmd_echo, .doc = "echo(text): returns text"},
#else
    {TSR_SIZED(tsr_command), .name = "echo", .signature = "s(s)",
     .fn = (void (*)(void))fx_cmd_echo, .doc = "echo(text): returns text"},
#endif
};

#ifdef FX_PROBE_ZERO
static int32_t fx_probe(const tsr_host *host) {
    host->set_error(host->ctx, "needs the fx accelerator, found none");
    return 0;
}
#else
static int32_t fx_probe(const tsr_host *host) { return host->n_threads(host->ctx) + 1; }
#endif

static const tsr_plugin_desc fx_cache_desc = {
    TSR_SIZED(tsr_plugin_desc),
    .stage = TSR_STAGE_CACHE,
    .stage_major = FX_STAGE_MAJOR,
    .stage_minor_needed = FX_STAGE_MINOR_NEEDED,
    .name = FX_NAME,
    .version = "1.0",
    .description = "loader test fixture",
    TSR_PARAMS(fx_params),
    TSR_COMMANDS(fx_commands),
    .probe = fx_probe,
    .vtable = &fx_vtable,
};

/* ---- the router plugin (FX_TWO_PLUGINS) ------------------------------------------------- */

#ifdef FX_TWO_PLUGINS
typedef struct fx_router {
    const tsr_host *host;
    int32_t k;
} fx_router;

static tsr_status fx_router_create(const tsr_host *host, const tsr_params *params,
                                   const tsr_router_init *init, void **out) {
    (void)params;
    fx_router *r = tsr_calloc(host, 1, sizeof *r);
    if (!r) return TSR_E_NOMEM;
    r->host = host;
    r->k = init ? init->n_expert_used : 0;
    *out = r;
    return TSR_OK;
}
static void fx_router_destroy(void *self) {
    fx_router *r = self;
    r->host->free(r->host->ctx, r);
}
static tsr_status fx_router_route(void *self, const tsr_route_call *call) {
    (void)self;
    return call ? TSR_OK : TSR_E_INVALID;
}
static const tsr_router_vtable fx_router_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = fx_router_create,
    .destroy = fx_router_destroy,
    .route = fx_router_route,
};
static const tsr_plugin_desc fx_router_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = FX_NAME "-router",
    .version = "1.0",
    .description = "loader test fixture (router)",
    .vtable = &fx_router_vtable,
};
#define FX_SECOND &fx_router_desc
#elif defined(FX_DUP_IN_OBJECT)
#define FX_SECOND &fx_cache_desc
#endif

/* ---- the trap (FX_TRAP) ------------------------------------------------------------------ */

#ifdef FX_TRAP
#include <stdio.h>
#include <stdlib.h>
/* A constructor runs at dlopen, before the host can look at the object: the one way to tell
 * that a file was opened at all. */
__attribute__((constructor)) static void fx_trap(void) {
    const char *log = getenv("TSR_FX_TRAP_LOG");
    FILE *f = log ? fopen(log, "a") : NULL;
    if (!f) return;
    fputs(FX_TRAP "\n", f);
    fclose(f);
}
#endif

/* ---- the entry point -------------------------------------------------------------------- */

#ifdef FX_SECOND
static const tsr_plugin_desc *const fx_plugins[] = {&fx_cache_desc, FX_SECOND};
#else
static const tsr_plugin_desc *const fx_plugins[] = {&fx_cache_desc};
#endif

static const tsr_plugin_set fx_set = {
    TSR_SIZED(tsr_plugin_set),
    .common_major = FX_COMMON_MAJOR,
    .common_minor_needed = FX_COMMON_MINOR_NEEDED,
    .n_plugins = FX_N_PLUGINS ? (uint32_t)TSR_COUNT_OF(fx_plugins) : 0,
    .plugins = fx_plugins,
};

#ifndef FX_NO_ENTRY
TSR_EXPORT const tsr_plugin_set *tessera_plugin_entry(uint32_t host_common_major,
                                                      uint32_t host_common_minor,
                                                      const tsr_host *host) {
#ifdef FX_ENTRY_NULL
    /* A plugin may refuse a host it cannot use, explaining why. */
    if (host_common_major < 99) {
        host->set_error(host->ctx, "fixture needs a host speaking common ABI 99, got %u.%u",
                        (unsigned)host_common_major, (unsigned)host_common_minor);
        return NULL;
    }
#endif
    (void)host_common_major, (void)host_common_minor, (void)host;
    return &fx_set;
}
#else
/* Exported under a wrong name: the object is a valid shared library without the entry. */
TSR_EXPORT const tsr_plugin_set *tessera_plugin_entry_v0(void) { return &fx_set; }
#endif
