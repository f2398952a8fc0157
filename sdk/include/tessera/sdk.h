/*
 * <tessera/sdk.h> -- conveniences for plugin authors, on top of the ABI headers.
 * Header-only: a plugin links nothing of the host.
 *
 *   static const tsr_param_def params[] = {
 *       { TSR_SIZED(tsr_param_def), .name = "window", .type = TSR_PARAM_INT,
 *         .default_value = "128", .min = 1, .max = 1 << 20, .unit = "tokens",
 *         .doc = "recent tokens kept" },
 *   };
 *   static const tsr_cache_vtable vt = { TSR_SIZED(tsr_cache_vtable), .create = ..., ... };
 *   static const tsr_plugin_desc streaming = {
 *       TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE), .name = "streaming", .version = "1.0",
 *       .description = "...", TSR_PARAMS(params), .vtable = &vt };
 *   TSR_PLUGIN_EXPORT(&streaming)
 */
#ifndef TESSERA_SDK_H
#define TESSERA_SDK_H

#include <string.h>

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/common.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>

/* First member of every boundary struct. */
#define TSR_SIZED(type) .struct_size = sizeof(type)

/* Descriptor header: the stage and the stage ABI this plugin was built against. A plugin that
 * only uses an older MINOR's fields may set .stage_minor_needed lower after this macro. */
#define TSR_PLUGIN_HEADER(stage_value, STAGE)                                           \
    TSR_SIZED(tsr_plugin_desc), .stage = (stage_value),                                 \
        .stage_major = TSR_##STAGE##_ABI_MAJOR, .stage_minor_needed = TSR_##STAGE##_ABI_MINOR

#define TSR_COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

/* For a plugin's hot loops: besides the baseline build, clones the compiler vectorises for
 * AVX-512 and AVX2, one picked for the machine when the plugin is loaded (an ifunc). Plugins
 * are built for the baseline ISA, like any third-party object; a 16-lane loop is up to four
 * times as fast as SSE2's. The AVX-512 clone has FMA and the baseline has not: build with
 * -ffp-contract=off (GNU C fuses a*b + c by default; tessera_add_plugin passes it) so that
 * every clone rounds alike. */
#if defined(__x86_64__) && defined(__GNUC__)
#define TSR_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TSR_VECTOR_CLONES
#endif
#define TSR_PARAMS(table) .params = (table), .n_params = (uint32_t)TSR_COUNT_OF(table)
#define TSR_COMMANDS(table) .commands = (table), .n_commands = (uint32_t)TSR_COUNT_OF(table)

/* Defines the entry point returning the listed descriptors (one or more). */
#define TSR_PLUGIN_EXPORT(...)                                                              \
    static const tsr_plugin_desc *const tsr_sdk_plugins_[] = {__VA_ARGS__};                \
    static const tsr_plugin_set tsr_sdk_plugin_set_ = {                                    \
        TSR_SIZED(tsr_plugin_set), .common_major = TSR_COMMON_ABI_MAJOR,                   \
        .common_minor_needed = TSR_COMMON_ABI_MINOR,                                       \
        .n_plugins = (uint32_t)TSR_COUNT_OF(tsr_sdk_plugins_), .plugins = tsr_sdk_plugins_}; \
    TSR_EXPORT const tsr_plugin_set *tessera_plugin_entry(                                 \
        uint32_t host_common_major, uint32_t host_common_minor, const tsr_host *host) {    \
        (void)host_common_major; (void)host_common_minor; (void)host;                      \
        return &tsr_sdk_plugin_set_;                                                       \
    }

/* Typed parameter lookup by name. The host has validated every value against the table, so a
 * name that is in the plugin's own table always resolves; a misspelt name is a plugin bug and
 * yields the zero value. */
static inline const tsr_param_value *tsr_param_find(const tsr_params *p, const char *name) {
    for (uint32_t i = 0; p && i < p->count; i++)
        if (strcmp(p->defs[i].name, name) == 0) return &p->values[i];
    return NULL;
}
static inline int64_t tsr_param_int(const tsr_params *p, const char *name) {
    const tsr_param_value *v = tsr_param_find(p, name);
    return v ? v->u.i : 0;
}
static inline double tsr_param_float(const tsr_params *p, const char *name) {
    const tsr_param_value *v = tsr_param_find(p, name);
    return v ? v->u.f : 0.0;
}
static inline int tsr_param_bool(const tsr_params *p, const char *name) {
    const tsr_param_value *v = tsr_param_find(p, name);
    return v ? v->u.b : 0;
}
/* STRING and ENUM values; ENUM's index is tsr_param_int(). */
static inline const char *tsr_param_str(const tsr_params *p, const char *name) {
    const tsr_param_value *v = tsr_param_find(p, name);
    return v ? v->s : NULL;
}

/* Allocation helpers through the host's accounted allocator. */
static inline void *tsr_calloc(const tsr_host *host, size_t n, size_t size) {
    if (size && n > SIZE_MAX / size) return NULL;
    void *p = host->alloc(host->ctx, n * size, 0);
    if (p) memset(p, 0, n * size);
    return p;
}

#endif /* TESSERA_SDK_H */
