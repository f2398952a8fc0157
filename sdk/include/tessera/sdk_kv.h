/*
 * <tessera/sdk_kv.h> -- helpers for plugins that store or read K/V rows: IEEE 754 half
 * precision conversion and reading rows of a tsr_kv_view as f32 whatever its storage.
 * Header-only, like <tessera/sdk.h>; plugins link nothing of the host or of kernels/.
 */
#ifndef TESSERA_SDK_KV_H
#define TESSERA_SDK_KV_H

#include <stdint.h>
#include <string.h>

#include <tessera/cache.h>

/* IEEE binary16 -> binary32, exact (subnormals, infinities and NaN included). */
static inline float tsr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalise the mantissa into a binary32 normal. */
        uint32_t e = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* binary32 -> binary16, rounding to nearest even; overflow gives infinity, NaN stays NaN. */
static inline uint16_t tsr_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t man = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        /* Subnormal or zero half: shift the full mantissa (implicit 1 included) right. */
        if (e < -10) return sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    /* A carry out of the mantissa correctly bumps the exponent (up to infinity). */
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
    return (uint16_t)(sign | half);
}

/* Rows [j0, j0+n) of a view's keys (`values` = 0) or values (`values` = 1) as f32 rows of
 * head_dim elements. Returns a pointer to row j0 and sets *stride to the distance between rows
 * in floats: F32 views with a float-aligned stride are read in place, F16 views are converted
 * and other dtypes loaded through load_k / load_v into `scratch` (n * head_dim floats). */
static inline const float *tsr_kv_view_rows(const tsr_kv_view *view, int values, int64_t j0,
                                            int64_t n, int32_t head_dim, float *scratch,
                                            size_t *stride) {
    const char *base = (const char *)(values ? view->v : view->k);
    size_t bstride = values ? view->v_stride : view->k_stride;
    if (view->dtype == TSR_DTYPE_F32 && bstride % sizeof(float) == 0 &&
        (uintptr_t)base % sizeof(float) == 0) {
        *stride = bstride / sizeof(float);
        return (const float *)(base + (size_t)j0 * bstride);
    }
    *stride = (size_t)head_dim;
    if (view->dtype == TSR_DTYPE_F32) {
        for (int64_t r = 0; r < n; r++)
            memcpy(scratch + r * head_dim, base + (size_t)(j0 + r) * bstride,
                   (size_t)head_dim * sizeof(float));
    } else if (view->dtype == TSR_DTYPE_F16) {
        for (int64_t r = 0; r < n; r++) {
            const char *row = base + (size_t)(j0 + r) * bstride;
            for (int32_t d = 0; d < head_dim; d++) {
                uint16_t h;
                memcpy(&h, row + (size_t)d * 2, 2);
                scratch[r * head_dim + d] = tsr_f16_to_f32(h);
            }
        }
    } else {
        (values ? view->load_v : view->load_k)(view->load_ctx, j0, n, scratch);
    }
    return scratch;
}

/* Whether attention can read `view`: F32 / F16 directly, anything else through both loaders. */
static inline int tsr_kv_view_readable(const tsr_kv_view *view) {
    if (view->dtype == TSR_DTYPE_F32 || view->dtype == TSR_DTYPE_F16)
        return view->n == 0 || (view->k && view->v);
    return view->load_k && view->load_v;
}

#endif /* TESSERA_SDK_KV_H */
