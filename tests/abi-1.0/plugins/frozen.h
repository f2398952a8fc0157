/* What the frozen 1.0 plugins share, written against the 1.0 headers alone (no SDK), as the
 * oldest third-party plugin a host must keep loading would be. */
#ifndef FROZEN_H
#define FROZEN_H

#include <math.h>
#include <stdarg.h>
#include <string.h>

#include <tessera/common.h>

/* The set an object returns, for its one plugin. */
#define FROZEN_EXPORT(desc)                                                                      \
    static const tsr_plugin_desc *const frozen_plugins[] = {&(desc)};                          \
    static const tsr_plugin_set frozen_set = {.struct_size = sizeof(tsr_plugin_set),           \
                                              .common_major = 1, .common_minor_needed = 0,      \
                                              .n_plugins = 1, .plugins = frozen_plugins};      \
    TSR_EXPORT const tsr_plugin_set *tessera_plugin_entry(uint32_t major, uint32_t minor,      \
                                                          const tsr_host *host) {             \
        (void)major;                                                                            \
        (void)minor;                                                                            \
        (void)host;                                                                             \
        return &frozen_set;                                                                     \
    }

static inline void *frozen_zalloc(const tsr_host *host, size_t bytes) {
    void *p = host->alloc(host->ctx, bytes ? bytes : 1, 0);
    if (p) memset(p, 0, bytes ? bytes : 1);
    return p;
}

/* IEEE half to float, for F16 views. */
static inline float frozen_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v;
    if (exp == 0) v = ldexpf((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = ldexpf((float)(man | 0x400), (int)exp - 25);
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits |= sign;
    memcpy(&v, &bits, sizeof v);
    return v;
}

#endif
