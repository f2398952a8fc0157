/* GGUF quantized formats: exact dequantization and the reference quantizers.
 *
 * The quantizers reproduce llama.cpp's reference ones (those `llama-quantize` runs without an
 * importance matrix) operation by operation in f32, so that files we write are the files it
 * writes: the same maxima, divisions, roundings (round-half-away for Q8_0, truncation of
 * x + 0.5 for Q4_x/Q5_x, nearest-even for the K-types) and scale searches. The library is
 * built with -ffp-contract=off, as llama.cpp's reference file is compiled for baseline
 * x86-64 (no FMA), so no product is fused behind our back. */
#include "quants.h"

#include <float.h>
#include <math.h>
#include <string.h>

const int8_t tsr_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                     1,    13,   25,  38,  53,  69,  89,  113};

/* Round to nearest even for |x| < 2^22 through the f32 adder, as the K-quant searches do;
 * defined (if meaningless) for any input. */
static int nearest_int(float x) {
    float v = x + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static int clampi(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

static float h2f(uint16_t h) {
    return tsr_fp16_to_fp32(h);
}

static uint16_t f2h(float f) {
    return tsr_fp32_to_fp16(f);
}

/* ---------------------------------------------------------------------------------------- */
/* Dequantization                                                                            */

static void dequant_q4_0(float *y, const tsr_block_q4_0 *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d);
        for (int j = 0; j < TSR_QK / 2; j++) {
            y[j] = (float)((x[b].qs[j] & 0xf) - 8) * d;
            y[j + TSR_QK / 2] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(float *y, const tsr_block_q4_1 *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d), m = h2f(x[b].m);
        for (int j = 0; j < TSR_QK / 2; j++) {
            y[j] = (float)(x[b].qs[j] & 0xf) * d + m;
            y[j + TSR_QK / 2] = (float)(x[b].qs[j] >> 4) * d + m;
        }
    }
}

static uint32_t load_qh(const uint8_t qh[4]) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 |
           (uint32_t)qh[3] << 24;
}

static void dequant_q5_0(float *y, const tsr_block_q5_0 *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d);
        uint32_t qh = load_qh(x[b].qh);
        for (int j = 0; j < TSR_QK / 2; j++) {
            int lo = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
            int hi = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (float)(lo - 16) * d;
            y[j + TSR_QK / 2] = (float)(hi - 16) * d;
        }
    }
}

static void dequant_q5_1(float *y, const tsr_block_q5_1 *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d), m = h2f(x[b].m);
        uint32_t qh = load_qh(x[b].qh);
        for (int j = 0; j < TSR_QK / 2; j++) {
            int lo = (x[b].qs[j] & 0xf) | (int)((qh >> j) & 1) << 4;
            int hi = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (float)lo * d + m;
            y[j + TSR_QK / 2] = (float)hi * d + m;
        }
    }
}

static void dequant_q8_1(float *y, const tsr_block_q8_1 *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d);
        for (int j = 0; j < TSR_QK; j++) y[j] = (float)x[b].qs[j] * d;
    }
}

static void dequant_iq4_nl(float *y, const tsr_block_iq4_nl *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK) {
        float d = h2f(x[b].d);
        for (int j = 0; j < TSR_QK / 2; j++) {
            y[j] = d * (float)tsr_iq4nl_values[x[b].qs[j] & 0xf];
            y[j + TSR_QK / 2] = d * (float)tsr_iq4nl_values[x[b].qs[j] >> 4];
        }
    }
}

/* Q2_K and Q3_K share the 2-bit layout: element 128*h + 32*s + l is bits 2s..2s+1 of
 * qs[32*h + l]; group = element / 16. */
static int q2_at(const uint8_t *qs, int e) {
    return (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

static void dequant_q2_k(float *y, const tsr_block_q2_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d), dmin = h2f(x[b].dmin);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)(x[b].scales[g] & 0xf), ml = dmin * (float)(x[b].scales[g] >> 4);
            for (int l = 0; l < 16; l++)
                y[16 * g + l] = dl * (float)q2_at(x[b].qs, 16 * g + l) - ml;
        }
    }
}

static void dequant_q3_k(float *y, const tsr_block_q3_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d);
        int sc[16];
        tsr_q3k_scales(x[b].scales, sc);
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)sc[g];
            for (int l = 0; l < 16; l++) {
                int e = 16 * g + l;
                int q = q2_at(x[b].qs, e) - ((x[b].hmask[e % 32] >> (e / 32)) & 1 ? 0 : 4);
                y[e] = dl * (float)q;
            }
        }
    }
}

/* Q4_K and Q5_K: element 64*c + l (l < 32) is the low nibble of qs[32*c + l], 64*c + 32 + l
 * the high one; the fifth bit of element e is bit e / 32 of qh[e % 32]. */
static void dequant_q4_k(float *y, const tsr_block_q4_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d), dmin = h2f(x[b].dmin);
        for (int g = 0; g < 8; g++) {
            int sc, mn;
            tsr_qk_scale_min(x[b].scales, g, &sc, &mn);
            float dl = d * (float)sc, ml = dmin * (float)mn;
            const uint8_t *q = x[b].qs + 32 * (g / 2);
            for (int l = 0; l < 32; l++)
                y[32 * g + l] = dl * (float)(g % 2 ? q[l] >> 4 : q[l] & 0xf) - ml;
        }
    }
}

static void dequant_q5_k(float *y, const tsr_block_q5_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d), dmin = h2f(x[b].dmin);
        for (int g = 0; g < 8; g++) {
            int sc, mn;
            tsr_qk_scale_min(x[b].scales, g, &sc, &mn);
            float dl = d * (float)sc, ml = dmin * (float)mn;
            const uint8_t *q = x[b].qs + 32 * (g / 2);
            for (int l = 0; l < 32; l++) {
                int v = (g % 2 ? q[l] >> 4 : q[l] & 0xf) | ((x[b].qh[l] >> g) & 1) << 4;
                y[32 * g + l] = dl * (float)v - ml;
            }
        }
    }
}

/* Q6_K: element 128*h + 32*s + l: low 4 bits from ql[64*h + 32*(s%2) + l] (nibble s/2),
 * high 2 bits from bits 2s..2s+1 of qh[32*h + l]; group = element / 16. */
static int q6_at(const tsr_block_q6_k *x, int e) {
    int h = e / 128, s = (e % 128) / 32, l = e % 32;
    int lo = (x->ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0xf;
    int hi = (x->qh[32 * h + l] >> (2 * s)) & 3;
    return (lo | hi << 4) - 32;
}

static void dequant_q6_k(float *y, const tsr_block_q6_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d);
        for (int e = 0; e < TSR_QK_K; e++)
            y[e] = d * (float)x[b].scales[e / 16] * (float)q6_at(&x[b], e);
    }
}

static void dequant_q8_k(float *y, const tsr_block_q8_k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K)
        for (int j = 0; j < TSR_QK_K; j++) y[j] = x[b].d * (float)x[b].qs[j];
}

static void dequant_iq4_xs(float *y, const tsr_block_iq4_xs *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += TSR_QK_K) {
        float d = h2f(x[b].d);
        for (int g = 0; g < 8; g++) {
            float dl = d * (float)tsr_iq4xs_scale(&x[b], g);
            const uint8_t *q = x[b].qs + 16 * g;
            for (int j = 0; j < 16; j++) {
                y[32 * g + j] = dl * (float)tsr_iq4nl_values[q[j] & 0xf];
                y[32 * g + j + 16] = dl * (float)tsr_iq4nl_values[q[j] >> 4];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Legacy reference quantizers                                                               */

/* The value of largest magnitude, the first one among equals (its sign sets the scale). */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    return max;
}

static void quant_q4_0(tsr_block_q4_0 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float d = signed_absmax(x, TSR_QK) / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        for (int j = 0; j < TSR_QK / 2; j++) {
            int lo = (int)(x[j] * id + 8.5f), hi = (int)(x[j + TSR_QK / 2] * id + 8.5f);
            y[b].qs[j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
        }
    }
}

static void minmax(const float *x, int n, float *mn, float *mx) {
    *mn = FLT_MAX;
    *mx = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        if (x[j] < *mn) *mn = x[j];
        if (x[j] > *mx) *mx = x[j];
    }
}

static void quant_q4_1(tsr_block_q4_1 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float mn, mx;
        minmax(x, TSR_QK, &mn, &mx);
        float d = (mx - mn) / 15.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        y[b].m = f2h(mn);
        for (int j = 0; j < TSR_QK / 2; j++) {
            int lo = (int)((x[j] - mn) * id + 0.5f);
            int hi = (int)((x[j + TSR_QK / 2] - mn) * id + 0.5f);
            y[b].qs[j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
        }
    }
}

static void store_qh(uint8_t qh[4], uint32_t v) {
    for (int i = 0; i < 4; i++) qh[i] = (uint8_t)(v >> (8 * i));
}

static void quant_q5_0(tsr_block_q5_0 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float d = signed_absmax(x, TSR_QK) / -16.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        uint32_t qh = 0;
        for (int j = 0; j < TSR_QK / 2; j++) {
            int lo = (int)(x[j] * id + 16.5f), hi = (int)(x[j + TSR_QK / 2] * id + 16.5f);
            lo = lo < 31 ? lo : 31;
            hi = hi < 31 ? hi : 31;
            y[b].qs[j] = (uint8_t)((lo & 0xf) | (hi & 0xf) << 4);
            qh |= (uint32_t)(lo >> 4 & 1) << j | (uint32_t)(hi >> 4 & 1) << (j + 16);
        }
        store_qh(y[b].qh, qh);
    }
}

static void quant_q5_1(tsr_block_q5_1 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float mn, mx;
        minmax(x, TSR_QK, &mn, &mx);
        float d = (mx - mn) / 31.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        y[b].m = f2h(mn);
        uint32_t qh = 0;
        for (int j = 0; j < TSR_QK / 2; j++) {
            /* No clamp here in the reference: a 32 would keep its low 5 bits (0). */
            int lo = (uint8_t)(int)((x[j] - mn) * id + 0.5f);
            int hi = (uint8_t)(int)((x[j + TSR_QK / 2] - mn) * id + 0.5f);
            y[b].qs[j] = (uint8_t)((lo & 0xf) | (hi & 0xf) << 4);
            qh |= (uint32_t)(lo >> 4 & 1) << j | (uint32_t)(hi >> 4 & 1) << (j + 16);
        }
        store_qh(y[b].qh, qh);
    }
}

static float absmax(const float *x, int n) {
    float amax = 0.0f;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

static void quant_q8_0_ref(tsr_block_q8_0 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float d = absmax(x, TSR_QK) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        for (int j = 0; j < TSR_QK; j++) y[b].q[j] = (int8_t)roundf(x[j] * id);
    }
}

static void quant_q8_1_ref(tsr_block_q8_1 *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        float d = absmax(x, TSR_QK) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = f2h(d);
        int sum = 0;
        for (int j = 0; j < TSR_QK; j++) {
            y[b].qs[j] = (int8_t)roundf(x[j] * id);
            sum += y[b].qs[j];
        }
        y[b].s = f2h((float)sum * d);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Activation quantizers (scalar references of the dispatched ones)                          */

void tsr_q8_1_quantize_row_ref(tsr_block_q8_1 *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_QK; b++, x += TSR_QK) {
        float amax = absmax(x, TSR_QK);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[b].d = f2h(d);
        int32_t sum = 0;
        for (int j = 0; j < TSR_QK; j++) {
            y[b].qs[j] = (int8_t)rintf(x[j] * id);
            sum += y[b].qs[j];
        }
        y[b].s = f2h(d * (float)sum);
    }
}

void tsr_q8_k_quantize_row_ref(tsr_block_q8_k *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_QK_K; b++, x += TSR_QK_K) {
        float max = signed_absmax(x, TSR_QK_K);
        memset(&y[b], 0, sizeof y[b]);
        if (max == 0.0f) continue;
        float iscale = -127.0f / max;
        for (int j = 0; j < TSR_QK_K; j++) {
            int v = nearest_int(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < TSR_QK_K / 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[b].qs[16 * g + l];
            y[b].bsums[g] = (int16_t)s;
        }
        y[b].d = 1.0f / iscale;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* K-quant scale searches (llama.cpp's make_qx_quants, make_q3_quants, make_qkx2_quants)     */

/* Symmetric quants in [-nmax, nmax-1] weighted by x^2: the best of 19 trial scales around
 * nmax / max by weighted least squares. L gets q + nmax. */
static float search_sym(int n, int nmax, const float *x, int8_t *L) {
    float max = signed_absmax(x, n);
    if (fabsf(max) < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = -(float)nmax / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (int8_t)(nmax + clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's variant: start from nmax / max, then move single quants while the weighted fit
 * improves (up to 5 passes). L gets q + nmax. */
static float search_q3(int n, int nmax, const float *x, int8_t *L) {
    float max = signed_absmax(x, n);
    if (fabsf(max) < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = -(float)nmax / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0.0f) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int nl = clampi(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (nl != L[i]) {
                    slx += w * x[i] * (float)nl;
                    sl2 += w * (float)nl * (float)nl;
                    if (sl2 > 0.0f && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return sumlx / suml2;
}

/* Asymmetric quants in [0, nmax]: value = scale * L + min with min <= 0. Tries nstep + 1
 * scales (rmin + rdelta * is + nmax) / (max - min), each with its weighted least-squares
 * scale and min, and keeps the one of least weighted error (absolute if use_mad). Returns
 * the scale, *neg_min = -min. */
static float search_asym(int n, int nmax, const float *x, const float *w, uint8_t *L,
                         float *neg_min, float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t aux[32];
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0.0f) min = 0.0f;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)clampi(nearest_int(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * (float)L[i] + min - x[i];
        best += w[i] * (use_mad ? fabsf(diff) : diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = clampi(nearest_int(iscale * (x[i] - min)), 0, nmax);
            aux[i] = (uint8_t)l;
            sum_l += w[i] * (float)l;
            sum_l2 += w[i] * (float)l * (float)l;
            sum_xl += w[i] * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0.0f) {
            float s = (sum_w * sum_xl - sum_x * sum_l) / D;
            float m = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (m > 0.0f) {
                m = 0.0f;
                s = sum_xl / sum_l2;
            }
            float err = 0.0f;
            for (int i = 0; i < n; i++) {
                float diff = s * (float)aux[i] + m - x[i];
                err += w[i] * (use_mad ? fabsf(diff) : diff * diff);
            }
            if (err < best) {
                memcpy(L, aux, (size_t)n);
                best = err;
                scale = s;
                min = m;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

/* ---------------------------------------------------------------------------------------- */
/* K-quant reference quantizers                                                              */

/* Packs 2-bit quants (Q2_K, Q3_K layout). */
static void pack_q2(uint8_t qs[64], const uint8_t *L) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *p = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)(p[0] | p[32] << 2 | p[64] << 4 | p[96] << 6);
        }
}

static void quant_q2_k(tsr_block_q2_k *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        uint8_t L[TSR_QK_K];
        float scales[16], mins[16], w[16];
        float max_scale = 0.0f, max_min = 0.0f;
        for (int g = 0; g < 16; g++) {
            for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * g + l]);
            scales[g] = search_asym(16, 3, x + 16 * g, w, L + 16 * g, &mins[g], -0.5f, 0.1f, 15,
                                    1);
            if (scales[g] > max_scale) max_scale = scales[g];
            if (mins[g] > max_min) max_min = mins[g];
        }
        memset(y[b].scales, 0, sizeof y[b].scales);
        y[b].d = f2h(0.0f);
        y[b].dmin = f2h(0.0f);
        if (max_scale > 0.0f) {
            float iscale = 15.0f / max_scale;
            for (int g = 0; g < 16; g++) y[b].scales[g] = (uint8_t)nearest_int(iscale * scales[g]);
            y[b].d = f2h(max_scale / 15.0f);
        }
        if (max_min > 0.0f) {
            float iscale = 15.0f / max_min;
            for (int g = 0; g < 16; g++)
                y[b].scales[g] |= (uint8_t)(nearest_int(iscale * mins[g]) << 4);
            y[b].dmin = f2h(max_min / 15.0f);
        }
        for (int g = 0; g < 16; g++) {
            float d = h2f(y[b].d) * (float)(y[b].scales[g] & 0xf);
            if (d == 0.0f) continue;
            float dm = h2f(y[b].dmin) * (float)(y[b].scales[g] >> 4);
            for (int l = 0; l < 16; l++)
                L[16 * g + l] = (uint8_t)clampi(nearest_int((x[16 * g + l] + dm) / d), 0, 3);
        }
        pack_q2(y[b].qs, L);
    }
}

static void quant_q3_k(tsr_block_q3_k *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        int8_t L[TSR_QK_K];
        float scales[16];
        float max_scale = 0.0f, amax = 0.0f;
        for (int g = 0; g < 16; g++) {
            scales[g] = search_q3(16, 4, x + 16 * g, L + 16 * g);
            if (fabsf(scales[g]) > amax) {
                amax = fabsf(scales[g]);
                max_scale = scales[g];
            }
        }
        memset(y[b].scales, 0, sizeof y[b].scales);
        if (max_scale != 0.0f) {
            float iscale = -32.0f / max_scale;
            for (int g = 0; g < 16; g++) {
                /* The reference rounds into an int8 before clamping. */
                int l = clampi((int8_t)nearest_int(iscale * scales[g]), -32, 31) + 32;
                if (g < 8)
                    y[b].scales[g] = (uint8_t)(l & 0xf);
                else
                    y[b].scales[g - 8] |= (uint8_t)((l & 0xf) << 4);
                y[b].scales[g % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (g / 4)));
            }
            y[b].d = f2h(1.0f / iscale);
        } else {
            y[b].d = f2h(0.0f);
        }
        int sc[16];
        tsr_q3k_scales(y[b].scales, sc);
        for (int g = 0; g < 16; g++) {
            float d = h2f(y[b].d) * (float)sc[g];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++)
                L[16 * g + l] = (int8_t)(clampi(nearest_int(x[16 * g + l] / d), -4, 3) + 4);
        }
        memset(y[b].hmask, 0, sizeof y[b].hmask);
        uint8_t u[TSR_QK_K];
        for (int e = 0; e < TSR_QK_K; e++) {
            int l = L[e];
            if (l > 3) {
                y[b].hmask[e % 32] |= (uint8_t)(1u << (e / 32));
                l -= 4;
            }
            u[e] = (uint8_t)l;
        }
        pack_q2(y[b].qs, u);
    }
}

/* Q4_K and Q5_K share the search and the 12-byte scale packing. */
static void pack_scales_k(uint8_t s[12], int g, int ls, int lm) {
    if (g < 4) {
        s[g] = (uint8_t)ls;
        s[g + 4] = (uint8_t)lm;
    } else {
        s[g + 4] = (uint8_t)((ls & 0xf) | (lm & 0xf) << 4);
        s[g - 4] |= (uint8_t)((ls >> 4) << 6);
        s[g] |= (uint8_t)((lm >> 4) << 6);
    }
}

static void quant_qk_asym(uint16_t *dd, uint16_t *dmin, uint8_t scales[12], uint8_t *L,
                          const float *x, int nmax, float rmin, int nstep) {
    float sc[8], mn[8], w[32];
    float max_scale = 0.0f, max_min = 0.0f;
    for (int g = 0; g < 8; g++) {
        const float *xg = x + 32 * g;
        float sum_x2 = 0.0f;
        for (int l = 0; l < 32; l++) sum_x2 += xg[l] * xg[l];
        float av_x = sqrtf(sum_x2 / 32.0f);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xg[l]);
        sc[g] = search_asym(32, nmax, xg, w, L + 32 * g, &mn[g], rmin, 0.1f, nstep, 0);
        if (sc[g] > max_scale) max_scale = sc[g];
        if (mn[g] > max_min) max_min = mn[g];
    }
    float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    memset(scales, 0, 12);
    for (int g = 0; g < 8; g++) {
        /* uint8_t before the clamp, as the reference */
        int ls = (uint8_t)nearest_int(inv_scale * sc[g]);
        int lm = (uint8_t)nearest_int(inv_min * mn[g]);
        pack_scales_k(scales, g, ls < 63 ? ls : 63, lm < 63 ? lm : 63);
    }
    *dd = f2h(max_scale / 63.0f);
    *dmin = f2h(max_min / 63.0f);
    for (int g = 0; g < 8; g++) {
        int s, m;
        tsr_qk_scale_min(scales, g, &s, &m);
        float d = h2f(*dd) * (float)s;
        if (d == 0.0f) continue;
        float dm = h2f(*dmin) * (float)m;
        for (int l = 0; l < 32; l++)
            L[32 * g + l] = (uint8_t)clampi(nearest_int((x[32 * g + l] + dm) / d), 0, nmax);
    }
}

static void quant_q4_k(tsr_block_q4_k *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        uint8_t L[TSR_QK_K];
        quant_qk_asym(&y[b].d, &y[b].dmin, y[b].scales, L, x, 15, -1.0f, 20);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[b].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
    }
}

static void quant_q5_k(tsr_block_q5_k *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        uint8_t L[TSR_QK_K];
        quant_qk_asym(&y[b].d, &y[b].dmin, y[b].scales, L, x, 31, -0.5f, 15);
        memset(y[b].qh, 0, sizeof y[b].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                y[b].qh[l] |= (uint8_t)((lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1));
                y[b].qs[32 * c + l] = (uint8_t)((lo & 0xf) | (hi & 0xf) << 4);
            }
    }
}

static void quant_q6_k(tsr_block_q6_k *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        int8_t L[TSR_QK_K];
        float scales[16];
        float max_scale = 0.0f, amax = 0.0f;
        for (int g = 0; g < 16; g++) {
            scales[g] = search_sym(16, 32, x + 16 * g, L + 16 * g);
            if (fabsf(scales[g]) > amax) {
                amax = fabsf(scales[g]);
                max_scale = scales[g];
            }
        }
        memset(&y[b], 0, sizeof y[b]);
        if (amax < 1e-15f) continue;
        float iscale = -128.0f / max_scale;
        y[b].d = f2h(1.0f / iscale);
        for (int g = 0; g < 16; g++) {
            int s = nearest_int(iscale * scales[g]);
            y[b].scales[g] = (int8_t)(s < 127 ? s : 127);
        }
        for (int g = 0; g < 16; g++) {
            float d = h2f(y[b].d) * (float)y[b].scales[g];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++)
                L[16 * g + l] = (int8_t)(clampi(nearest_int(x[16 * g + l] / d), -32, 31) + 32);
        }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const int8_t *p = L + 128 * h + l;
                y[b].ql[64 * h + l] = (uint8_t)((p[0] & 0xf) | (p[64] & 0xf) << 4);
                y[b].ql[64 * h + 32 + l] = (uint8_t)((p[32] & 0xf) | (p[96] & 0xf) << 4);
                y[b].qh[32 * h + l] = (uint8_t)(p[0] >> 4 | (p[32] >> 4) << 2 |
                                                (p[64] >> 4) << 4 | (p[96] >> 4) << 6);
            }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* IQ4_NL / IQ4_XS: non-linear levels, the block scale searched over the candidates          */
/* (itry + kvalues[0]) / max for itry in [-7, 7] by weighted least squares (weights x^2).    */

static int iq4_nearest(float v) {
    if (v <= tsr_iq4nl_values[0]) return 0;
    if (v >= tsr_iq4nl_values[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (v < tsr_iq4nl_values[mid]) hi = mid; else lo = mid;
    }
    return v - (float)tsr_iq4nl_values[lo] < (float)tsr_iq4nl_values[hi] - v ? lo : hi;
}

/* The scale of n values and their level indices L (weights x^2); 0 for a zero group. */
static float iq4_search(int n, const float *x, uint8_t *L) {
    float max = signed_absmax(x, n);
    if (fabsf(max) < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float best_d = 0.0f, best = -1.0f;
    for (int itry = -8; itry <= 7; itry++) {
        /* itry = -8 is the plain amax scale; the others move the largest value's level */
        float id = itry == -8 ? -(float)tsr_iq4nl_values[0] / max
                              : ((float)itry + (float)tsr_iq4nl_values[0]) / max;
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int j = 0; j < n; j++) {
            float q = (float)tsr_iq4nl_values[iq4_nearest(id * x[j])];
            float w = x[j] * x[j];
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
        if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
            best_d = sumqx / sumq2;
            best = best_d * sumqx;
        }
    }
    float inv = best_d != 0.0f ? 1.0f / best_d : 0.0f;
    for (int j = 0; j < n; j++) L[j] = (uint8_t)iq4_nearest(inv * x[j]);
    return best_d;
}

static void quant_iq4_nl(tsr_block_iq4_nl *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK) {
        uint8_t L[TSR_QK];
        float d = iq4_search(TSR_QK, x, L);
        y[b].d = f2h(d);
        for (int j = 0; j < TSR_QK / 2; j++) y[b].qs[j] = (uint8_t)(L[j] | L[j + 16] << 4);
    }
}

static void quant_iq4_xs(tsr_block_iq4_xs *y, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += TSR_QK_K) {
        float sc[8], amax = 0.0f, max = 0.0f;
        uint8_t L[32];
        for (int g = 0; g < 8; g++) {
            sc[g] = iq4_search(32, x + 32 * g, L);
            if (fabsf(sc[g]) > amax) {
                amax = fabsf(sc[g]);
                max = sc[g];
            }
        }
        memset(&y[b], 0, sizeof y[b]);
        if (amax == 0.0f) continue;
        float d = -max / 32.0f, id = 1.0f / d;
        y[b].d = f2h(d);
        float dh = h2f(y[b].d);
        for (int g = 0; g < 8; g++) {
            int l = clampi(nearest_int(id * sc[g]), -32, 31) + 32;
            y[b].scales_l[g / 2] |= (uint8_t)((l & 0xf) << (4 * (g % 2)));
            y[b].scales_h |= (uint16_t)((l >> 4) << (2 * g));
            float dl = dh * (float)(l - 32);
            float idl = dl != 0.0f ? 1.0f / dl : 0.0f;
            for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_nearest(idl * x[32 * g + j]);
            for (int j = 0; j < 16; j++)
                y[b].qs[16 * g + j] = (uint8_t)(L[j] | L[j + 16] << 4);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */

static tsr_status check_row(int32_t dtype, int64_t n) {
    int64_t be = tsr_dtype_block_elems(dtype);
    if (be == 0) return TSR_E_UNSUPPORTED;
    if (n < 0 || n % be) return TSR_E_INVALID;
    return TSR_OK;
}

tsr_status tsr_quantize_row(int32_t dtype, void *dst, const float *src, int64_t n) {
    tsr_status st = check_row(dtype, n);
    if (st) return st;
    int64_t nb = n / tsr_dtype_block_elems(dtype);
    switch (dtype) {
    case TSR_DTYPE_F32: memmove(dst, src, (size_t)n * sizeof(float)); break;
    case TSR_DTYPE_F16: tsr_fp32_to_fp16_row(dst, src, n); break;
    case TSR_DTYPE_BF16: tsr_fp32_to_bf16_row(dst, src, n); break;
    case TSR_DTYPE_Q4_0: quant_q4_0(dst, src, nb); break;
    case TSR_DTYPE_Q4_1: quant_q4_1(dst, src, nb); break;
    case TSR_DTYPE_Q5_0: quant_q5_0(dst, src, nb); break;
    case TSR_DTYPE_Q5_1: quant_q5_1(dst, src, nb); break;
    case TSR_DTYPE_Q8_0: quant_q8_0_ref(dst, src, nb); break;
    case TSR_DTYPE_Q8_1: quant_q8_1_ref(dst, src, nb); break;
    case TSR_DTYPE_IQ4_NL: quant_iq4_nl(dst, src, nb); break;
    case TSR_DTYPE_Q2_K: quant_q2_k(dst, src, nb); break;
    case TSR_DTYPE_Q3_K: quant_q3_k(dst, src, nb); break;
    case TSR_DTYPE_Q4_K: quant_q4_k(dst, src, nb); break;
    case TSR_DTYPE_Q5_K: quant_q5_k(dst, src, nb); break;
    case TSR_DTYPE_Q6_K: quant_q6_k(dst, src, nb); break;
    case TSR_DTYPE_Q8_K: tsr_q8_k_quantize_row_ref(dst, src, n); break;
    case TSR_DTYPE_IQ4_XS: quant_iq4_xs(dst, src, nb); break;
    }
    return TSR_OK;
}

tsr_status tsr_dequantize_row(int32_t dtype, float *dst, const void *src, int64_t n) {
    tsr_status st = check_row(dtype, n);
    if (st) return st;
    int64_t nb = n / tsr_dtype_block_elems(dtype);
    switch (dtype) {
    case TSR_DTYPE_F32: memmove(dst, src, (size_t)n * sizeof(float)); break;
    case TSR_DTYPE_F16: tsr_fp16_to_fp32_row(dst, src, n); break;
    case TSR_DTYPE_BF16: tsr_bf16_to_fp32_row(dst, src, n); break;
    case TSR_DTYPE_Q4_0: dequant_q4_0(dst, src, nb); break;
    case TSR_DTYPE_Q4_1: dequant_q4_1(dst, src, nb); break;
    case TSR_DTYPE_Q5_0: dequant_q5_0(dst, src, nb); break;
    case TSR_DTYPE_Q5_1: dequant_q5_1(dst, src, nb); break;
    case TSR_DTYPE_Q8_0: tsr_q8_0_dequantize_row(dst, src, n); break;
    case TSR_DTYPE_Q8_1: dequant_q8_1(dst, src, nb); break;
    case TSR_DTYPE_IQ4_NL: dequant_iq4_nl(dst, src, nb); break;
    case TSR_DTYPE_Q2_K: dequant_q2_k(dst, src, nb); break;
    case TSR_DTYPE_Q3_K: dequant_q3_k(dst, src, nb); break;
    case TSR_DTYPE_Q4_K: dequant_q4_k(dst, src, nb); break;
    case TSR_DTYPE_Q5_K: dequant_q5_k(dst, src, nb); break;
    case TSR_DTYPE_Q6_K: dequant_q6_k(dst, src, nb); break;
    case TSR_DTYPE_Q8_K: dequant_q8_k(dst, src, nb); break;
    case TSR_DTYPE_IQ4_XS: dequant_iq4_xs(dst, src, nb); break;
    }
    return TSR_OK;
}
