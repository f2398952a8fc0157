/* Kernels with only the scalar version: RoPE, the simple elementwise ops and the rows of
 * mixture-of-experts layers (whose weighted sum runs on tsr_axpy_f32's SIMD paths). They
 * are cheap next to the products, and gcc vectorises the simple loops on its own. */
#include "internal.h"

#include <math.h>
#include <string.h>

/* theta_i = pos * freq_scale * base^(-2i/n_rot), the power by repeated f32 multiplication as
 * llama.cpp computes it (its logits are the reference); the rotation is the same in both
 * modes, only the pairing differs. The rotation rounds as GCC compiles llama.cpp's
 * `x0*cos - x1*sin` and `x0*sin + x1*cos` (contracted: the first product fused, the second
 * rounded): with that, llama-tiny's F32, F16, Q4_K_M and Q6_K logits equal llama.cpp's bit
 * for bit under the 'ggml' attention plugin; with two plain roundings they left it at
 * positions 11 (F16), 34 (Q6_K) and 41 (Q4_K_M). */
static inline void rope_pair(float *x, int64_t i, int64_t half, tsr_cpu_rope_mode mode, float c,
                             float s) {
    int64_t a = mode == TSR_ROPE_MODE_NEOX ? i : 2 * i;
    int64_t b = mode == TSR_ROPE_MODE_NEOX ? i + half : 2 * i + 1;
    float x0 = x[a], x1 = x[b];
    x[a] = fmaf(x0, c, -(x1 * s));
    x[b] = fmaf(x0, s, x1 * c);
}

static void rope_cache_row(float *cs, int32_t pos, int64_t n_rot, float base, float freq_scale) {
    float theta_scale = powf(base, -2.0f / (float)n_rot);
    float theta = (float)pos;
    for (int64_t i = 0; i < n_rot / 2; i++) {
        float th = theta * freq_scale;
        cs[2 * i] = cosf(th);
        cs[2 * i + 1] = sinf(th);
        theta *= theta_scale;
    }
}

void tsr_rope_cache(float *cs, const int32_t *pos, int64_t n_tok, int64_t n_rot, float base,
                    float freq_scale, int ith, int nth) {
    int64_t t0, t1;
    tsr_thread_slice(&t0, &t1, n_tok, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++)
        rope_cache_row(cs + t * n_rot, pos[t], n_rot, base, freq_scale);
}

void tsr_rope_apply(float *x, const float *cs, int64_t n_tok, int64_t n_head, int64_t head_dim,
                    int64_t n_rot, tsr_cpu_rope_mode mode, int ith, int nth) {
    int64_t i0, i1;
    tsr_thread_slice(&i0, &i1, n_tok * n_head, 1, ith, nth);
    for (int64_t i = i0; i < i1; i++) {
        const float *c = cs + (i / n_head) * n_rot;
        for (int64_t j = 0; j < n_rot / 2; j++)
            rope_pair(x + i * head_dim, j, n_rot / 2, mode, c[2 * j], c[2 * j + 1]);
    }
}

/* cos and sin are recomputed for every head, which is what the two-step form avoids. */
void tsr_rope(float *x, const int32_t *pos, int64_t n_tok, int64_t n_head, int64_t head_dim,
              int64_t n_rot, tsr_cpu_rope_mode mode, float base, float freq_scale, int ith,
              int nth) {
    int64_t i0, i1;
    tsr_thread_slice(&i0, &i1, n_tok * n_head, 1, ith, nth);
    float theta_scale = powf(base, -2.0f / (float)n_rot);
    int64_t half = n_rot / 2;
    for (int64_t i = i0; i < i1; i++) {
        float *row = x + i * head_dim;
        float theta = (float)pos[i / n_head];
        for (int64_t j = 0; j < half; j++) {
            float th = theta * freq_scale;
            rope_pair(row, j, half, mode, cosf(th), sinf(th));
            theta *= theta_scale;
        }
    }
}

void tsr_add(float *y, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

int64_t tsr_argmax(const float *x, int64_t n) {
    if (n <= 0) return -1;
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

void tsr_copy_rows(float *y, const int32_t *y_ids, const float *x, const int32_t *x_ids,
                   int64_t n, int64_t dim, int ith, int nth) {
    int64_t i0, i1;
    tsr_thread_slice(&i0, &i1, n, 1, ith, nth);
    for (int64_t i = i0; i < i1; i++) {
        int64_t to = y_ids ? y_ids[i] : i, from = x_ids ? x_ids[i] : i;
        memcpy(y + to * dim, x + from * dim, (size_t)dim * sizeof *y);
    }
}

void tsr_weighted_sum(float *y, const float *x, const float *w, int64_t n, int64_t k,
                      int64_t dim, int ith, int nth) {
    int64_t t0, t1;
    tsr_thread_slice(&t0, &t1, n, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++) {
        float *yt = y + t * dim;
        const float *xt = x + t * k * dim, *wt = w + t * k;
        for (int64_t i = 0; i < dim; i++) yt[i] = k > 0 ? wt[0] * xt[i] : 0.0f;
        for (int64_t s = 1; s < k; s++) tsr_axpy_f32(yt, wt[s], xt + s * dim, dim);
    }
}
