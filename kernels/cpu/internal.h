/* The table each ISA file fills, and what the ISA files share. Not installed. */
#ifndef TSR_KERNELS_CPU_INTERNAL_H
#define TSR_KERNELS_CPU_INTERNAL_H

#include <tessera/kernels_cpu.h>

/* The float weight formats tsr_matmul multiplies, as indices into tsr_cpu_ops.mm_tile; the
 * block formats (Q8_0 among them) are quants_dot.c's. */
enum { TSR_MM_F32, TSR_MM_F16, TSR_MM_BF16, TSR_MM_COUNT };

/* A tile of a matrix product: y[t * ldy + r] = dot(row r of w, row t of x) for r < n_r,
 * t < n_t, with n_r <= tile_rows and n_t <= tile_toks of the table. Each value must not
 * depend on n_r, n_t or on where the tile lies, so tiling never changes a result. */
typedef void (*tsr_mm_tile_fn)(float *y, int64_t ldy,           // (n_t, ldy)
                               const void *w, size_t w_stride,  // (n_r, w_stride) bytes
                               const void *x, size_t x_stride,  // (n_t, x_stride) bytes
                               int64_t n_in, int n_r, int n_t);

/* One ISA's kernels. A NULL entry falls back to the level below (AVX-512 -> AVX2 -> scalar),
 * so an ISA file only fills what it speeds up; the scalar table is complete. Row functions
 * take one row; the public wrappers loop and slice. */
typedef struct tsr_cpu_ops {
    tsr_cpu_level level;
    int tile_rows, tile_toks;
    tsr_mm_tile_fn mm_tile[TSR_MM_COUNT];
    void (*fp16_to_fp32_row)(float *y, const uint16_t *x, int64_t n);
    void (*fp32_to_fp16_row)(uint16_t *y, const float *x, int64_t n);
    void (*bf16_to_fp32_row)(float *y, const uint16_t *x, int64_t n);
    void (*fp32_to_bf16_row)(uint16_t *y, const float *x, int64_t n);
    void (*q8_0_quantize_row)(tsr_block_q8_0 *y, const float *x, int64_t n);
    void (*rms_norm_row)(float *y, const float *x, const float *w, int64_t n, float eps);
    void (*softmax_row)(float *y, const float *x, int64_t n);
    void (*silu_row)(float *y, const float *x, int64_t n);
    void (*swiglu_row)(float *y, const float *g, const float *u, int64_t n);
    float (*dot_f32)(const float *x, const float *y, int64_t n);
    float (*dot_f16)(const uint16_t *x, const uint16_t *y, int64_t n);
    void (*axpy_f32)(float *y, float a, const float *x, int64_t n);
    void (*axpy_f16)(float *y, float a, const uint16_t *x, int64_t n);
} tsr_cpu_ops;

extern const tsr_cpu_ops tsr_cpu_ops_scalar;
#if defined(TSR_KERNELS_X86)
extern const tsr_cpu_ops tsr_cpu_ops_avx2;
extern const tsr_cpu_ops tsr_cpu_ops_avx512;
#endif

/* Whether the running level is AVX-512 on a CPU that also has VBMI (byte permutes and
 * multishifts), which the level itself does not require. */
int tsr_cpu_avx512_vbmi(void);

/* Decode reads every weight row once. Its kernels read two rows side by side, one from each
 * half of the thread's slice, so that each is the next row of a long sequential stream: two
 * such streams read at the full bandwidth of a core, where neighbouring rows read side by side
 * (a zig-zag the prefetchers follow badly) lose up to a third of it. The kernels whose streams
 * come in faster with a software prefetch (x16 Q4_0, Q4_K, Q6_K: measured per kernel,
 * docs/benchmarks.md "Decode kernels") issue it this many bytes ahead; the fast ones (F16, Q8_0)
 * read faster with the hardware's prefetch alone. */
#define TSR_STREAM_PREFETCH 4096

/* One token's values of row i and of row i + h (n_r = 2), or of row i alone (n_r = 1), into
 * v; w is row i, and row i + h lies `partner` bytes further. */
typedef void (*tsr_row_pair_fn)(void *ctx, float v[2], const char *w, size_t partner, int n_r);

/* One token's product over rows [r0, r1) of w (w_stride apart) into y[r0, r1): `pair` on rows
 * i and i + h, h half the rows, so that each of the two is a sequential stream. */
void tsr_stream_row_pairs(tsr_row_pair_fn pair, void *ctx, float *y, const void *w,
                          size_t w_stride, int64_t r0, int64_t r1);

/* tsr_stream_row_pairs with a tile of two rows and one token as the pair. */
void tsr_stream_rows(tsr_mm_tile_fn tile, float *y, const void *w, size_t w_stride,
                     const void *x, int64_t n_in, int64_t r0, int64_t r1);

/* The quantized products (quants.h) keep eight f32 lanes per dot and add them in this order,
 * llama.cpp's hsum_float_8. */
#define TSR_Q8_LANES 8
static inline float tsr_q8_lanes_sum(const float a[TSR_Q8_LANES]) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* tsr_expf's constants (ggml's ggml_v_expf, AVX-512 form): n = rne(x * log2 e) by the
 * 1.5 * 2^23 shift, b = x - n * ln 2 in two parts, e^b by a degree-5 polynomial, 2^n by
 * scaling; |n| > 192 gives 0 or infinity. */
#define TSR_EXP_SHIFT 0x1.8p23f
#define TSR_EXP_LOG2E 0x1.715476p+0f
#define TSR_EXP_LN2_HI 0x1.62e4p-1f
#define TSR_EXP_LN2_LO 0x1.7f7d1cp-20f
#define TSR_EXP_C1 0x1.ffffecp-1f
#define TSR_EXP_C2 0x1.fffdb6p-2f
#define TSR_EXP_C3 0x1.555e66p-3f
#define TSR_EXP_C4 0x1.573e2ep-5f
#define TSR_EXP_C5 0x1.0e4020p-7f
#define TSR_EXP_LIMIT 192.0f

/* Softmax rows follow ggml's soft_max: the vector exp on whole chunks of TSR_SOFTMAX_CHUNK
 * values, each chunk's sum taken in f32 in tsr_softmax_chunk_sum's order then added to a
 * double; the C library's expf on the rest (ggml's scalar tail). */
#define TSR_SOFTMAX_CHUNK 16
static inline float tsr_softmax_chunk_sum(const float v[TSR_SOFTMAX_CHUNK]) {
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = v[i] + v[i + 8];
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* The tail of a softmax row from index i: libm's expf, as ggml; returns the updated sum. */
double tsr_softmax_tail(float *y, const float *x, int64_t i, int64_t n, float max, double sum);

#endif
