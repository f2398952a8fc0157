/*
 * <tessera/kernels_cpu.h> -- CPU compute kernels shared by the backend, quantizer and attention
 * plugins. Plain functions, no plugin ABI.
 *
 * Conventions. The output pointer comes first, sizes are explicit, and every buffer carries a
 * shape comment, innermost dimension last: `// (n_tok, n_out)`. Kernels that are worth running
 * on several threads take a thread slice (ith, nth): thread ith of nth handles a contiguous
 * chunk of rows (tsr_thread_slice). Rows are split, never reductions, so every result is
 * bit-identical for every nth.
 *
 * Dispatch. Each kernel has a scalar reference and, for the hot ones, AVX2 (+FMA, F16C) and
 * AVX-512 (F, BW, VL, DQ, VNNI, BF16) versions. The level is chosen once from cpuid; the
 * environment variable TESSERA_CPU_LEVEL=scalar|avx2|avx512 or tsr_cpu_level_set() lowers it
 * (tests use this to compare every path with the reference). Results of different levels agree
 * within the tolerances stated in kernels/README.md; Q8_0 products agree bit for bit.
 *
 * Thread safety. All kernels are [any]: they keep no state besides the dispatch level, which
 * tsr_cpu_level_set changes for the whole process (call it before starting work).
 */
#ifndef TESSERA_KERNELS_CPU_H
#define TESSERA_KERNELS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include <tessera/common.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* Dispatch level                                                                            */

typedef enum tsr_cpu_level {
    TSR_CPU_LEVEL_SCALAR = 0,
    TSR_CPU_LEVEL_AVX2 = 1,   /* AVX2 + FMA + F16C */
    TSR_CPU_LEVEL_AVX512 = 2  /* AVX-512 F/BW/VL/DQ/VNNI/BF16 */
} tsr_cpu_level;

/* The best level this machine and this build support (ignores TESSERA_CPU_LEVEL). */
tsr_cpu_level tsr_cpu_level_best(void);

/* The level in use: the best one, lowered by TESSERA_CPU_LEVEL when set to a known name. */
tsr_cpu_level tsr_cpu_level_get(void);

/* Selects `level` for the whole process. TSR_E_UNSUPPORTED when the machine or the build
 * cannot run it (the level in use is then unchanged), TSR_E_INVALID for an unknown value. */
tsr_status tsr_cpu_level_set(tsr_cpu_level level);

/* "scalar", "avx2", "avx512"; "?" for other values. */
const char *tsr_cpu_level_name(tsr_cpu_level level);

/* The chunk [*begin, *end) of n items that thread ith of nth handles: contiguous, boundaries
 * on multiples of `align` (except n itself), as even as that allows; empty when ith >= nth. */
void tsr_thread_slice(int64_t *begin, int64_t *end, int64_t n, int64_t align, int ith, int nth);

/* ---------------------------------------------------------------------------------------- */
/* Number formats                                                                            */

/* GGUF Q8_0: 32 weights per block, value = fp16(d) * q. */
#define TSR_Q8_0_BLOCK 32
typedef struct tsr_block_q8_0 {
    uint16_t d;       /* scale, IEEE binary16 bits */
    int8_t q[TSR_Q8_0_BLOCK];
} tsr_block_q8_0;

/* Exact IEEE conversions: subnormals, infinities and signs are kept; a NaN stays a NaN with
 * its sign and the top of its payload, made quiet. fp32 -> fp16/bf16 rounds to nearest even. */
float tsr_fp16_to_fp32(uint16_t h);
uint16_t tsr_fp32_to_fp16(float f);
float tsr_bf16_to_fp32(uint16_t b);
uint16_t tsr_fp32_to_bf16(float f);

void tsr_fp16_to_fp32_row(float *y, const uint16_t *x, int64_t n);  // y: (n), x: (n)
void tsr_fp32_to_fp16_row(uint16_t *y, const float *x, int64_t n);  // y: (n), x: (n)
void tsr_bf16_to_fp32_row(float *y, const uint16_t *x, int64_t n);  // y: (n), x: (n)
void tsr_fp32_to_bf16_row(uint16_t *y, const float *x, int64_t n);  // y: (n), x: (n)

/* Quantizes n values (a multiple of 32) to Q8_0 as llama.cpp does on x86: per block
 * amax = max|x|, d = fp16(amax / 127), q = round_to_nearest_even(x * (127 / amax)),
 * all zero when amax is 0. */
void tsr_q8_0_quantize_row(tsr_block_q8_0 *y, const float *x, int64_t n);  // y: (n/32)
void tsr_q8_0_dequantize_row(float *y, const tsr_block_q8_0 *x, int64_t n); // y: (n)

/* Bytes of a row of n elements of `dtype` (any type the kernels convert: tsr_dtype_block_elems
 * below is not 0); 0 for another type or when n is not a whole number of its blocks. */
size_t tsr_row_size(int32_t dtype, int64_t n);

/* Converts one row of n elements of `dtype` to f32, exactly: tsr_dequantize_row (below, every
 * type the kernels know) with the output first, as the other row functions here. */
tsr_status tsr_row_to_f32(float *y,       // (n)
                          int32_t dtype,
                          const void *x,  // tsr_row_size(dtype, n) bytes
                          int64_t n);

/* ---------------------------------------------------------------------------------------- */
/* Matrix products: y[t][r] = sum_k W[r][k] * x[t][k]                                        */
/*                                                                                           */
/* Numerics follow llama.cpp, so logits match its references: the activations are first     */
/* converted to the weights' "activation type" (F32 -> F32, F16 -> F16, BF16 -> BF16,        */
/* Q8_0 -> Q8_0 blocks of 32), once per product with tsr_matmul_prepare; each row dot then   */
/* multiplies exactly and accumulates in f32 lanes (the scalar reference: in double). Q8_0:  */
/* an exact integer dot per block, scaled by d_w * d_x and summed in f32 in a fixed order.   */
/* Prepared Q8_0 activations must hold quants in [-127, 127], as tsr_q8_0_quantize_row makes */
/* them; weight quants may be anything in [-128, 127].                                        */

/* The activation type for weights of `wtype`, or -1 when the kernels cannot multiply it. */
int32_t tsr_matmul_act_type(int32_t wtype);

/* Converts the activation rows to `act_type`. Slices tokens. TSR_E_UNSUPPORTED for another
 * type, TSR_E_INVALID when n_in is not a whole number of blocks. */
tsr_status tsr_matmul_prepare(void *xp,         // (n_tok, tsr_row_size(act_type, n_in)) bytes
                              int32_t act_type,
                              const float *x,   // (n_tok, n_in)
                              int64_t n_tok, int64_t n_in, int ith, int nth);

/* The product for the output rows of slice ith of nth (rows split in multiples of 16). Each
 * y value is the same whatever n_tok, n_out and the slice: tokens and rows are tiled
 * (up to 4 rows x 4 tokens on AVX-512) only to reuse loads. Errors as tsr_matmul_prepare. */
tsr_status tsr_matmul(float *y,           // (n_tok, ldy), columns [0, n_out) written
                      int64_t ldy,        // >= n_out
                      const void *w,      // (n_out, tsr_row_size(wtype, n_in)) bytes
                      int32_t wtype,
                      const void *xp,     // (n_tok, tsr_row_size(act_type, n_in)), prepared
                      int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth);

/* One row dot, the same value tsr_matmul computes: w is one weight row of `wtype`, xp one
 * prepared activation row. Returns 0 for a type tsr_matmul_act_type refuses. */
float tsr_row_dot(int32_t wtype, int64_t n, const void *w, const void *xp);

/* ---------------------------------------------------------------------------------------- */
/* Row-interleaved Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and the K types ("x16"), fast order */
/*                                                                                           */
/* A layout for prefill's GEMM: each group of 16 rows holds, for block column b, its quants   */
/* as 512-bit vectors whose 32-bit lane r is four quants of row r (the 4-bit types: vector j  */
/* <- bytes 4j..4j+3 of each row's qs, low nibbles elements 4j.., high ones 16 + 4j..; Q5_0,  */
/* Q5_1: then one vector of the rows' fifth bits, reordered so that bit k of byte i is the    */
/* fifth bit of element 4k + i; Q8_0: vector k <- quants 4k..4k+3 + 128, as unsigned bytes),  */
/* the nb tiles of a group first and then per block its 16 fp16 scales (Q4_1, Q5_1: and 16    */
/* fp16 minimums). Q2_K..Q6_K, IQ4_XS: one chunk per super-block column, each field of the 16 */
/* file blocks with the rows side by side (qs, ql, qh, hmask: vector v lane r <- bytes        */
/* 4v..4v+3 of row r; d, dmin: 16 fp16; the group scales as byte planes, plane p byte r <-    */
/* byte p of row r's scales), kernels/README.md. A group takes 16 file rows' bytes, so the    */
/* matrix keeps its size.                                                                    */
/*                                                                                           */
/* The fast order: a (row, token) value is acc = fmaf((float)isum_b, dw_b * dx_b, acc) over   */
/* blocks b = 0.. in order, from 0, with isum_b the block's exact integer dot and dw_b, dx_b  */
/* the scales as f32; Q4_1 and Q5_1 blocks then add acc = fmaf(m_b, s_b, acc), m_b the        */
/* block's minimum and s_b its Q8_1 activation block's s; Q2_K's, Q4_K's and Q5_K's add      */
/* acc = fmaf(-(float)msum_b, dmin_b * dx_b, acc), msum_b the exact sum of group mins times   */
/* activation group sums. One f32 chain per pair, so a value never depends on the tile, the   */
/* thread slice or n_tok; it is not llama.cpp's order (kernels/README.md).                   */

#define TSR_X16_ROWS 16

/* 1 when a (n_out, n_in) matrix of `wtype` can be repacked: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * IQ4_NL, Q2_K..Q6_K or IQ4_XS, whole blocks, rows a multiple of 16. */
int tsr_x16_supported(int32_t wtype, int64_t n_in, int64_t n_out);

/* 1 when repacking `wtype` pays at the running level: the 32-element types at every level
 * (their x16 product is never slower than the file rows'), the 256-element types only where
 * their AVX-512 kernel runs (below it the file rows' tiles beat the x16 scalar loop). */
int tsr_x16_repack_pays(int32_t wtype);

/* Repacks the file rows of groups [g0, g1) (16 rows each) of src into dst, both
 * (n_out, tsr_row_size(wtype, n_in)) bytes. TSR_E_INVALID when tsr_x16_supported refuses. */
tsr_status tsr_x16_pack(void *dst, const void *src, int32_t wtype, int64_t n_in, int64_t n_out,
                        int64_t g0, int64_t g1);

/* Row `row` of a repacked matrix back in the file's blocks: dst holds
 * tsr_row_size(wtype, n_in) bytes. */
void tsr_x16_unpack_row(void *dst, const void *w, int32_t wtype, int64_t n_in, int64_t row);

/* tsr_matmul for a repacked matrix (activations of tsr_matmul_act_type(wtype) from
 * tsr_matmul_prepare: Q8_0, Q8_1 for Q4_1 and Q5_1, or Q8_K for the K types), in the fast
 * order; slices rows in groups of 16. TSR_E_INVALID as tsr_x16_supported, TSR_E_NOMEM when
 * the kernel could not get its scratch memory. */
tsr_status tsr_x16_matmul(float *y, int64_t ldy, const void *w, int32_t wtype, const void *xp,
                          int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth);

/* The fast order's reference: one file row of a type tsr_x16_supported takes (not repacked)
 * with one prepared activation row; 0 for another type. */
float tsr_x16_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const void *xp);

/* ---------------------------------------------------------------------------------------- */
/* F16 and BF16 products in the fast order ("panels")                                        */
/*                                                                                           */
/* The weights are repacked at load (tsr_panel_pack) into k-major panels of TSR_PANEL_ROWS   */
/* rows in their own type: panel b holds rows [32 b, 32 b + 32), element k of its row r at   */
/* p[(b * n_in + k) * TSR_PANEL_ROWS + r], zeros for the rows past n_out. A tile reads one   */
/* 64-byte line per k for 32 rows, converting it to f32 as it multiplies: one sequential     */
/* stream, where the file's rows were 32 pages read a half line at a time. The activations   */
/* are rounded to the weights' type (F16 or BF16, as tsr_matmul_prepare does) and laid out   */
/* k-major in blocks of TSR_PANEL_TOK tokens by tsr_panel_prepare.                           */
/*                                                                                           */
/* The fast order: a (row, token) value is acc = fmaf(w_k, x_k, acc) over k = 0..n_in-1 in   */
/* order, from 0, with w_k the weight and x_k the rounded activation as f32. One chain per    */
/* pair: a value never depends on the tile, the thread slice or n_tok (decode's one token    */
/* gives the bits of the same token in a batch), and every level gives the same bits. It is  */
/* not llama.cpp's order (kernels/README.md).                                                */

#define TSR_PANEL_ROWS 32
#define TSR_PANEL_TOK 16
#define TSR_PANEL_K 2048

/* 1 when the panels beat tsr_matmul's tiles for `wtype` at the running level: F16 at every
 * level, BF16 below AVX-512 (whose tiles multiply with vdpbf16ps, two multiply-adds per f32
 * lane and instruction: the panels ran at 0.72-0.83x of them). */
int tsr_panel_pays(int32_t wtype);

/* Bytes of the panels of an (n_out, n_in) F16 or BF16 matrix: n_out rounded up to
 * TSR_PANEL_ROWS, times n_in, times 2. */
size_t tsr_panel_bytes(int64_t n_in, int64_t n_out);

/* Panels [b0, b1) of the (n_out, n_in) F16 or BF16 file rows at w into p (tsr_panel_bytes),
 * so that threads can take slices. */
void tsr_panel_pack(void *p, const void *w, int64_t n_in, int64_t n_out, int64_t b0,
                    int64_t b1);

/* Row r of the panels at p, as the file held it (n_in elements of 2 bytes). */
void tsr_panel_unpack_row(void *row, const void *p, int64_t n_in, int64_t r);

/* Bytes tsr_panel_prepare writes for n_tok tokens: n_tok rounded up to TSR_PANEL_TOK, times
 * n_in floats. */
size_t tsr_panel_act_bytes(int64_t n_tok, int64_t n_in);

/* Rounds the activations to `wtype` (F16 or BF16) and back, and lays them out for
 * tsr_panel_matmul: block b of n_b tokens (TSR_PANEL_TOK, the last block what is left of
 * n_tok), element k of its token t at xp[b * TSR_PANEL_TOK * n_in + k * n_b + t]: decode's
 * one token reads its activations as one row. Slices the blocks.
 * TSR_E_UNSUPPORTED for another type, TSR_E_INVALID for n_in < 1 or n_tok < 0. */
tsr_status tsr_panel_prepare(float *xp,        // tsr_panel_act_bytes(n_tok, n_in)
                             int32_t wtype,
                             const float *x,   // (n_tok, n_in)
                             int64_t n_tok, int64_t n_in, int ith, int nth);

/* The product of F16 or BF16 panels with prepared activations, in the fast order, for the
 * output rows of slice ith of nth (whole panels). Errors as tsr_panel_prepare, and
 * TSR_E_INVALID for ldy < n_out. */
tsr_status tsr_panel_matmul(float *y,          // (n_tok, ldy), columns [0, n_out) written
                            int64_t ldy,
                            const void *p,     // tsr_panel_pack's panels
                            int32_t wtype,
                            const float *xp,   // from tsr_panel_prepare
                            int64_t n_tok, int64_t n_in, int64_t n_out, int ith, int nth);

/* The fast order's reference: one file row with one activation row (not prepared: rounded
 * here, as tsr_panel_prepare rounds it); 0 for another type. */
float tsr_panel_row_dot_ref(int32_t wtype, int64_t n_in, const void *w, const float *x);

/* ---------------------------------------------------------------------------------------- */
/* Row and elementwise ops (f32). In-place use (y == x) is allowed where y and x have the     */
/* same shape. Elementwise ops have no thread slice: split them by offsetting the pointers.  */

/* y = x / sqrt(mean(x^2) + eps) * w per row, the sum of squares in double (as llama.cpp);
 * w may be NULL (no weight). Slices rows. */
void tsr_rms_norm(float *y,        // (n_rows, n)
                  const float *x,  // (n_rows, n)
                  const float *w,  // (n) or NULL
                  int64_t n_rows, int64_t n, float eps, int ith, int nth);

/* e^x computed as llama.cpp's CPU backend does (ggml's vectorised exp, its AVX-512 form):
 * n = round(x * log2 e), e^(x - n ln 2) by a degree-5 polynomial, scaled by 2^n with one
 * rounding; within 2 ulp of e^x for normal results, infinity from x ~ 88.73 (overflow), 0
 * when |n| > 192 and x < 0, NaN for NaN.
 * Every level gives these bits; tsr_silu, tsr_swiglu and tsr_softmax use it, so activations
 * and attention weights round as llama.cpp's do. [any] */
float tsr_expf(float x);

/* Max-subtracted softmax per row, as ggml's soft_max: tsr_expf on whole chunks of 16 values,
 * each chunk summed in f32 (a fixed tree) and added to a double; the C library's expf on the
 * last n % 16 values (ggml's scalar tail), added in double; then multiplied by
 * (float)(1 / sum). Slices rows. */
void tsr_softmax(float *y, const float *x, int64_t n_rows, int64_t n, int ith, int nth);

/* The values of <tessera/backend.h>'s tsr_rope_mode, under a name of its own so that a
 * backend plugin can include both headers. */
typedef enum tsr_cpu_rope_mode {
    TSR_ROPE_MODE_NORMAL = 0, /* rotates pairs (2i, 2i+1) (llama) */
    TSR_ROPE_MODE_NEOX = 2    /* rotates pairs (i, i + n_rot/2) (NeoX, Qwen2); ggml's value */
} tsr_cpu_rope_mode;

/* Rotary embedding, in place, of the first n_rot (even, <= head_dim) dims of each head:
 * theta_i = pos * freq_scale * base^(-2i/n_rot), computed as llama.cpp does (f32, the power
 * by repeated multiplication). Slices the n_tok * n_head rows. */
void tsr_rope(float *x,             // (n_tok, n_head, head_dim)
              const int32_t *pos,   // (n_tok)
              int64_t n_tok, int64_t n_head, int64_t head_dim, int64_t n_rot,
              tsr_cpu_rope_mode mode, float base, float freq_scale, int ith, int nth);

/* The same in two steps, to compute the cos/sin table once for every layer of a batch.
 * tsr_rope_cache slices tokens; tsr_rope_apply gives results identical to tsr_rope. */
void tsr_rope_cache(float *cs,            // (n_tok, n_rot/2, 2): cos, sin of theta_i
                    const int32_t *pos,   // (n_tok)
                    int64_t n_tok, int64_t n_rot, float base, float freq_scale,
                    int ith, int nth);
void tsr_rope_apply(float *x,             // (n_tok, n_head, head_dim)
                    const float *cs,      // (n_tok, n_rot/2, 2)
                    int64_t n_tok, int64_t n_head, int64_t head_dim, int64_t n_rot,
                    tsr_cpu_rope_mode mode, int ith, int nth);

/* silu(x) = x / (1 + tsr_expf(0 - x)), three roundings as ggml's vector silu. */
void tsr_silu(float *y, const float *x, int64_t n);                    // y = silu(x)
void tsr_swiglu(float *y, const float *g, const float *u, int64_t n);  // y = silu(g) * u
void tsr_add(float *y, const float *a, const float *b, int64_t n);     // y = a + b

/* Rows of a mixture-of-experts layer, gathered and scattered: for i < n,
 * y[y_ids ? y_ids[i] : i] = x[x_ids ? x_ids[i] : i], rows of dim values, copied as they are.
 * Slices i; the rows written must be distinct (each is written by one thread). */
void tsr_copy_rows(float *y,              // (rows, dim), rows > every y_ids[i]
                   const int32_t *y_ids,  // (n) or NULL
                   const float *x,        // (rows, dim), rows > every x_ids[i]
                   const int32_t *x_ids,  // (n) or NULL
                   int64_t n, int64_t dim, int ith, int nth);

/* Each token's k expert rows combined with their weights, as llama.cpp adds them:
 * y[t] = w[t*k] * x[t*k], then + w[t*k+s] * x[t*k+s] for s = 1..k-1, every product rounded
 * to f32 before it is added (tsr_axpy_f32's two roundings); k = 0 gives zeros. The same bits
 * at every level. Slices t. */
void tsr_weighted_sum(float *y,        // (n, dim)
                      const float *x,  // (n * k, dim)
                      const float *w,  // (n * k)
                      int64_t n, int64_t k, int64_t dim, int ith, int nth);

/* Index of the largest value, the lowest index among equals; NaNs never win (0 when all are
 * NaN); -1 if n <= 0. */
int64_t tsr_argmax(const float *x, int64_t n);

/* Attention helpers. dot: sum x[i]*y[i] accumulated in f32 (f16 inputs: exact products).
 * axpy: y += a * x. */
float tsr_dot_f32(const float *x, const float *y, int64_t n);       // x, y: (n)
float tsr_dot_f16(const uint16_t *x, const uint16_t *y, int64_t n); // x, y: (n) fp16
void tsr_axpy_f32(float *y, float a, const float *x, int64_t n);    // y, x: (n)
void tsr_axpy_f16(float *y, float a, const uint16_t *x, int64_t n); // y: (n), x: (n) fp16

/* ---------------------------------------------------------------------------------------- */
/* GGUF quantized formats (kernels/cpu/quants_*.c)                                           */
/*                                                                                           */
/* The block layouts of the GGUF (ggml) format, little-endian, no padding; scales are IEEE    */
/* binary16 bits unless stated. tsr_matmul, tsr_matmul_prepare, tsr_row_dot, tsr_row_size and */
/* tsr_matmul_act_type accept every type below. Activations are quantized as llama.cpp does   */
/* on x86: Q4_0, Q5_0, Q8_0, IQ4_NL weights -> Q8_0; Q4_1, Q5_1 -> Q8_1; Q2_K..Q6_K, IQ4_XS  */
/* -> Q8_K. Each block's integer dot is exact; the f32 sum of blocks has a fixed order        */
/* (block b into lane b % 8, lanes added as for Q8_0), so every ISA gives the same bits.      */

#define TSR_QK 32   /* elements of a Q4_0, Q4_1, Q5_0, Q5_1, Q8_1, IQ4_NL block */
#define TSR_QK_K 256 /* elements of a K-quant, Q8_K or IQ4_XS super-block */

typedef struct tsr_block_q4_0 { /* value = d * (q - 8); q[j] low nibble, q[j+16] high */
    uint16_t d;
    uint8_t qs[TSR_QK / 2];
} tsr_block_q4_0;

typedef struct tsr_block_q4_1 { /* value = d * q + m */
    uint16_t d, m;
    uint8_t qs[TSR_QK / 2];
} tsr_block_q4_1;

typedef struct tsr_block_q5_0 { /* value = d * (q - 16); bit 4 of q[j] is bit j of qh */
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[TSR_QK / 2];
} tsr_block_q5_0;

typedef struct tsr_block_q5_1 { /* value = d * q + m */
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[TSR_QK / 2];
} tsr_block_q5_1;

typedef struct tsr_block_q8_1 { /* value = d * q; s = fp16(d * sum(q)) */
    uint16_t d, s;
    int8_t qs[TSR_QK];
} tsr_block_q8_1;

typedef struct tsr_block_q2_k { /* 16 groups of 16: d * (scales & 15) * q - dmin * (scales >> 4) */
    uint8_t scales[TSR_QK_K / 16];
    uint8_t qs[TSR_QK_K / 4];
    uint16_t d, dmin;
} tsr_block_q2_k;

typedef struct tsr_block_q3_k { /* 16 groups of 16: d * (scale6 - 32) * (q2 - 4 * !hbit) */
    uint8_t hmask[TSR_QK_K / 8];
    uint8_t qs[TSR_QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} tsr_block_q3_k;

typedef struct tsr_block_q4_k { /* 8 groups of 32: d * scale6 * q - dmin * min6 */
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[TSR_QK_K / 2];
} tsr_block_q4_k;

typedef struct tsr_block_q5_k { /* as Q4_K with a fifth bit in qh */
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[TSR_QK_K / 8];
    uint8_t qs[TSR_QK_K / 2];
} tsr_block_q5_k;

typedef struct tsr_block_q6_k { /* 16 groups of 16: d * scales * (q6 - 32) */
    uint8_t ql[TSR_QK_K / 2];
    uint8_t qh[TSR_QK_K / 4];
    int8_t scales[TSR_QK_K / 16];
    uint16_t d;
} tsr_block_q6_k;

typedef struct tsr_block_q8_k { /* value = d * q (d is f32); bsums: sums of 16 quants */
    float d;
    int8_t qs[TSR_QK_K];
    int16_t bsums[TSR_QK_K / 16];
} tsr_block_q8_k;

typedef struct tsr_block_iq4_nl { /* value = d * kvalues[q], the 16 non-linear levels */
    uint16_t d;
    uint8_t qs[TSR_QK / 2];
} tsr_block_iq4_nl;

typedef struct tsr_block_iq4_xs { /* 8 groups of 32: d * (scale6 - 32) * kvalues[q] */
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[TSR_QK_K / 64];
    uint8_t qs[TSR_QK_K / 2];
} tsr_block_iq4_xs;

/* The layout of an element type: GGML's name, elements per block (1 for plain types), bytes
 * per block, and whether the kernels convert it (`kernels`: the integer and F64 types a GGUF
 * file may hold are known but not converted). One table for the kernels, plugins and host. */
typedef struct tsr_dtype_layout {
    const char *name;
    int64_t block;
    size_t block_bytes;
    int kernels;
} tsr_dtype_layout;

/* NULL for a type not in the table (plugin types >= TSR_DTYPE_PLUGIN_FIRST included). */
const tsr_dtype_layout *tsr_dtype_layout_of(int32_t dtype);

/* Elements per block of `dtype` and bytes per block for a type the kernels convert; 0 for
 * another. tsr_row_size(dtype, n) = n / block elements * block bytes. */
int64_t tsr_dtype_block_elems(int32_t dtype);
size_t tsr_dtype_block_bytes(int32_t dtype);

/* Quantizes n values (a whole number of blocks) to `dtype` with the reference quantizer of
 * llama.cpp's `llama-quantize` (no importance matrix): F32, F16, BF16, Q4_0, Q4_1, Q5_0,
 * Q5_1, Q8_0, Q8_1, Q8_K give byte-identical output; Q2_K..Q6_K use the same searches of
 * scale and min; IQ4_NL and IQ4_XS search the block scale over the same candidates.
 * Note: Q8_0 here is the weight quantizer (q = round-half-away(x / d)), not the activation
 * one of tsr_q8_0_quantize_row. TSR_E_UNSUPPORTED for another type, TSR_E_INVALID when n
 * is not a whole number of blocks. Single-threaded; split rows to parallelize. */
tsr_status tsr_quantize_row(int32_t dtype, void *dst, const float *src, int64_t n);

/* The exact values of n elements of `dtype` (any type above, F32, F16, BF16). Errors as
 * tsr_quantize_row. */
tsr_status tsr_dequantize_row(int32_t dtype, float *dst, const void *src, int64_t n);

/* Activation quantizers, as llama.cpp on x86. Q8_1: the Q8_0 blocks of
 * tsr_q8_0_quantize_row plus s = fp16(d * sum(q)) with d = amax / 127 in f32. Q8_K:
 * iscale = -127 / x[argmax |x|], q = min(127, rne(iscale * x)), d = 1 / iscale; all zero
 * for a zero block. n: a multiple of 32 (Q8_1) or 256 (Q8_K). */
void tsr_q8_1_quantize_row(tsr_block_q8_1 *y, const float *x, int64_t n); // y: (n/32)
void tsr_q8_k_quantize_row(tsr_block_q8_k *y, const float *x, int64_t n); // y: (n/256)

#ifdef __cplusplus
}
#endif

#endif
