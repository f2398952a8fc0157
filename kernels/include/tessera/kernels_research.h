/*
 * <tessera/kernels_research.h> -- the compute kernels of the research quantizer plugins (rtn,
 * int6, spqr, w4a8): bit packing, group helpers, per-token int8 activations, an exact
 * u8 x s8 integer dot, and the row loops that quantize, dequantize and multiply a matrix of a
 * row codec's format. docs/quantizers.md describes the formats.
 *
 * Plain functions, no plugin ABI: pointers and sizes in, a thread slice (ith, nth) where the
 * work is worth splitting, scratch memory from the caller. The plugin glue over them (tensors,
 * host allocation and threads, the quantizer vtable) is <tessera/sdk_rq.h>.
 *
 * Results never depend on the thread count: threads split rows (or tokens), never a sum.
 * Integer dots are exact, so every dispatch level (scalar, AVX2, AVX-512 VNNI) gives the same
 * bits; the level follows tsr_cpu_level_get(). All functions are [any].
 */
#ifndef TESSERA_KERNELS_RESEARCH_H
#define TESSERA_KERNELS_RESEARCH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tessera/common.h>
#include <tessera/kernels_cpu.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* Bit streams: code i occupies bits [i*bits, (i+1)*bits) of a little-endian stream.          */

/* Bytes of n codes of `bits` (1..8) bits. */
size_t tsr_rq_packed_bytes(int64_t n, int bits);
/* Packs the low `bits` bits of each code. dst: tsr_rq_packed_bytes(n, bits) bytes. */
void tsr_rq_pack(uint8_t *dst, const uint8_t *codes, int64_t n, int bits);
void tsr_rq_unpack(uint8_t *codes,        // (n)
                   const uint8_t *src,    // tsr_rq_packed_bytes(n, bits) bytes
                   int64_t n, int bits);

/* Code i of such a stream, alone. */
static inline uint8_t tsr_rq_code_at(const uint8_t *src, int64_t i, int bits) {
    int64_t bit = i * bits;
    uint32_t v = src[bit >> 3];
    if ((bit & 7) + bits > 8) v |= (uint32_t)src[(bit >> 3) + 1] << 8;
    return (uint8_t)((v >> (bit & 7)) & ((1u << bits) - 1));
}

/* fp16 fields of the row formats, at any alignment. Store returns the value as stored. */
static inline float tsr_rq_load_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return tsr_fp16_to_fp32(h);
}
static inline float tsr_rq_store_f16(uint8_t *p, float v) {
    uint16_t h = tsr_fp32_to_fp16(v);
    memcpy(p, &h, sizeof h);
    return tsr_fp16_to_fp32(h);
}

/* Groups of `group` weights along a row of n_in (the last one may be short), and the length
 * of group g. */
static inline int64_t tsr_rq_groups(int64_t n_in, int64_t group) {
    return (n_in + group - 1) / group;
}
static inline int64_t tsr_rq_group_len(int64_t g, int64_t group, int64_t n_in) {
    return n_in - g * group < group ? n_in - g * group : group;
}

/* Round to nearest (ties to even) and clamp to [lo, hi]; NaN gives lo. */
static inline int32_t tsr_rq_round(float v, int32_t lo, int32_t hi) {
    float r = nearbyintf(v);
    return r >= (float)hi ? hi : r > (float)lo ? (int32_t)r : lo;
}

/* ---------------------------------------------------------------------------------------- */
/* Integer products                                                                          */

/* sum u[i] * s[i], exactly, for u in [0, 127] and s in [-127, 127] (the bounds keep AVX2's
 * 16-bit pair sums from saturating); any n. */
int32_t tsr_rq_dot_u8s8(const uint8_t *u, const int8_t *s, int64_t n);

/* Per-token symmetric int8 activations: d = amax / 127, q = rne(x * 127 / amax) (all zero
 * when amax is 0), zeros from n to n_pad, and the sum of the quants of each group of `group`
 * (the codecs need it to subtract zero points after the product). */
void tsr_rq_act_quantize_row(int8_t *q,        // (n_pad)
                             int32_t *gsum,    // (n_pad / group)
                             float *d,         // (1)
                             const float *x,   // (n)
                             int64_t n, int64_t n_pad, int64_t group);

/* The same with one scale per group: d[g] = amax / 127 of group g's values, each group
 * quantized with its own (the zero padding is not part of the last group's amax). For the
 * weight-only codecs, whose papers multiply in floating point: a scale per group follows the
 * activations' outliers as Q8_0's blocks do, where one per token would flatten the rest. */
void tsr_rq_act_quantize_groups_row(int8_t *q,        // (n_pad)
                                    int32_t *gsum,    // (n_pad / group)
                                    float *d,         // (n_pad / group)
                                    const float *x,   // (n)
                                    int64_t n, int64_t n_pad, int64_t group);

/* The second order of a token's int8 activations that a fused product reads besides q
 * (tsr_rq_act: q_ord, order): none; 4-bit nibble pairs (tsr_rq_act_nibble_order); or the
 * group steps of codes of `bits` (tsr_rq_act_steps_order). */
#define TSR_RQ_ORDER_NONE 0
#define TSR_RQ_ORDER_NIBBLES 1
#define TSR_RQ_ORDER_STEPS(bits) (16 + (bits))

/* The order tsr_rq_dot_packed_scaled reads for codes of `bits` in groups of `group`:
 * TSR_RQ_ORDER_NIBBLES for 4-bit codes whose groups are whole 128-code steps or divide them,
 * TSR_RQ_ORDER_STEPS(bits) for the other widths in groups of 8, 16 or 32, else none. */
int32_t tsr_rq_scaled_order(int bits, int64_t group);

/* Group steps, for the products of narrow codes in groups of 8, 16 or 32: the groups go by
 * chunks of C (8, 4 or 2: the most whose codes fit 64 bytes, C * group * bits <= 512; the
 * row's last chunk may have fewer), and a chunk by steps of 64 / C codes of each of its
 * groups, so that a 64-byte step holds codes of the same C groups at the same place in every
 * step of the chunk: byte 8 q + j of step k of a chunk of m groups from group c0 (at
 * c0 * group + k * 64 m / C) is position (c0 + i) * group + k * 64 / C + 8 s + j, with
 * i = q / (8 / C) and s = q % (8 / C). n_pad: a multiple of group; the rest of dst is q's. */
void tsr_rq_act_steps_order(int8_t *dst,       // (n_pad)
                            const int8_t *q,   // (n_pad)
                            int64_t n_pad, int64_t group, int bits);

/* dst = q in the second order `order`: tsr_rq_act_nibble_order's or tsr_rq_act_steps_order's
 * (none: dst is not written). */
void tsr_rq_act_reorder(int8_t *dst,       // (n_pad)
                        const int8_t *q,   // (n_pad)
                        int64_t n_pad, int64_t group, int32_t order);

/* tsr_rq_act_quantize_row (group_scales 0) or tsr_rq_act_quantize_groups_row (1) on each of
 * n_tok tokens, and with q_ord each token's q in the second order `order` (n_pad even for
 * nibbles). Slices tokens. */
void tsr_rq_act_quantize(int8_t *q,        // (n_tok, n_pad)
                         int8_t *q_ord,    // (n_tok, n_pad) or NULL (order: none)
                         int32_t order,    // TSR_RQ_ORDER_*
                         int32_t *gsum,    // (n_tok, n_pad / group)
                         float *d,         // (n_tok) or (n_tok, n_pad / group)
                         const float *x,   // (n_tok, n)
                         int64_t n_tok, int64_t n, int64_t n_pad, int64_t group,
                         int group_scales, int ith, int nth);

/* Quantized activations of n_tok tokens, as tsr_rq_matrix_mul hands them to a codec. */
typedef struct tsr_rq_act {
    const int8_t *q;      // (n_tok, n_pad)
    const int32_t *gsum;  // (n_tok, n_pad / group)
    const float *d;       // (n_tok, n_scales)
    int64_t n_pad, group;
    int64_t n_scales;     // 1 (a scale per token) or n_pad / group (codec->act_group_scales)
    const int8_t *q_ord;  // (n_tok, n_pad): q in the second order (codec->act_order) or NULL
    int32_t order;        // TSR_RQ_ORDER_*: q_ord's order
} tsr_rq_act;

/* dots[g] = sum_i c_i * a_i over group g of one row, exactly, for g < n_g: the codes c
 * (`bits` 1..8 each, any value) packed from `codes` as tsr_rq_pack does, groups of `group`
 * codes (a multiple of 8, so each starts on a byte) one after another, a the activations
 * (n_g * group) in [-127, 127]. AVX-512 with VBMI unpacks 64 codes per step in registers
 * (vpermb, vpmultishiftqb) and multiplies them with vpdpbusd, nothing written but dots;
 * other levels unpack 64 codes at a time to the stack and use tsr_rq_dot_u8s8. */
void tsr_rq_dot_packed_groups(int32_t *dots,          // (n_g)
                              const uint8_t *codes,   // tsr_rq_packed_bytes(n_g * group, bits)
                              int bits,
                              const int8_t *a,        // (n_g * group)
                              int64_t group, int64_t n_g);

/* Activations in nibble order, for 4-bit codes multiplied as nibble pairs: each 128 values of
 * q (the last run may be shorter, of an even length L) become their even positions, then their
 * odd ones: dst[b + k] = q[b + 2k] and dst[b + L/2 + k] = q[b + 2k + 1] for k < L/2. A row's
 * byte k holds codes 2k (low nibble) and 2k + 1 (high), so the low nibbles of 64 bytes meet
 * the first half of a run and the high nibbles the second. n: even. */
void tsr_rq_act_nibble_order(int8_t *dst,       // (n)
                             const int8_t *q,   // (n)
                             int64_t n);

/* out[t] = sum_g s_g * sum_i (c_i - z_g) * a_i over one row's groups for each of n_tok
 * tokens, exactly, for codes with an integer scale s_g and zero z_g per group (uint8 pairs
 * (s_g, z_g) in sz; QServe's level 2): codes as tsr_rq_dot_packed_groups, a token t's
 * activations act->q + t * act->n_pad (groups of act->group, one scale per token), its group
 * sums act->gsum. With AVX-512, 4-bit codes and act->q_ord in nibble order, 128 codes a step
 * as nibble pairs for up to four tokens at once: one load, two masks, two vpdpbusd per token,
 * their 32-bit lanes (eight codes of one group each) scaled by vpmaddwd, the zeros once per
 * group through the group sums. Otherwise AVX-512 with VBMI fuses each token's sum in registers (32-bit
 * lanes moved to 64 bits every 16 groups); the other levels take the group dots into scratch
 * (n_g) and sum in 64 bits. */
void tsr_rq_dot_packed_int_scaled(int64_t *out,            // (n_tok)
                                  const uint8_t *codes, int bits,
                                  const uint8_t *sz,       // (n_g, 2)
                                  const tsr_rq_act *act, int64_t n_tok, int64_t n_g,
                                  int32_t *scratch);       // (n_g)

/* The per-group affine map of codes to weights. Either fp16 fields of the row (d16 non-NULL):
 * a scale d_g = d16[g], a zero point and optionally a minimum m_g = m16[g]; or f32 arrays
 * (d16 NULL): d_g = d[g] and an offset b_g = b[g] (b NULL: none; zero is then 0).
 * tsr_rq_dot_packed_f32 multiplies with w = d_g * c + b_g, where for fp16 fields
 * b_g = fma(-zero, d_g, m16[g]) with a minimum, -zero * d_g without (no b_g at all when zero
 * is 0 too). tsr_rq_dot_packed_scaled multiplies with w = d_g * (c - zero) + m_g, the zero
 * subtracted from the codes exactly and m_g the minimum or, for f32 arrays, b_g. */
typedef struct tsr_rq_gscales {
    const uint8_t *d16, *m16;  // (n_g) fp16 each, at any alignment
    int32_t zero;              // 0..255
    const float *d, *b;        // (n_g) each
} tsr_rq_gscales;

/* One row times n_tok tokens' int8 activations (act, whose group is the codes' group), for
 * codes with a scale d_g and optionally a minimum m_g per group (s, as tsr_rq_gscales gives
 * them to this product; zero in [0, 127]):
 *   y[t * ldy] = sum_g da_g * (d_g * sum_i (c_i - zero) * a_i + m_g * sum_i a_i)
 * for t < n_tok, da_g token t's scale of group g (or its one scale). Codes as
 * tsr_rq_dot_packed_groups. The integer sums are exact and the float arithmetic has one fixed
 * order (research_quants.c), so every level gives the same bits and a token's value does not
 * depend on n_tok. The order of activations that makes each level fastest is
 * tsr_rq_scaled_order(bits, group) (act->q_ord, act->order; without it the product is the
 * same, slower). 4-bit codes (with act->q_ord in nibble order at avx512) are taken as nibble
 * pairs at avx512, 128 a step for up to four tokens, where the groups are whole steps or the
 * steps whole groups; the scalar reference takes them elsewhere. Other widths: AVX-512 with
 * VBMI unpacks each 64 codes once in registers for up to four tokens (groups of 8, 16 and 32,
 * with act->q_ord in group steps: the steps of a chunk add into one vector of 32-bit lanes,
 * 16 / C lanes per group, whose chunks are added into one lane per group by pairs of lanes,
 * and each 16 groups take one fma); AVX2 (and AVX-512 without VBMI) unpacks 64 codes at a
 * time to the stack and keeps the 16 lanes in two ymm (codes of 7 bits or fewer); the scalar
 * reference does the rest. */
void tsr_rq_dot_packed_scaled(float *y, int64_t ldy, const uint8_t *codes, int bits,
                              const tsr_rq_gscales *s, const tsr_rq_act *act, int64_t n_tok,
                              int64_t n_g);

/* f32 activations of n_tok tokens as the fused f32 products take them: the values and the sum
 * of each group of them (tsr_rq_act_f32_sums), through which a group's zero point or minimum
 * is applied once per group. */
typedef struct tsr_rq_act_f32 {
    const float *x;     // (n_tok, n)
    const float *xsum;  // (n_tok, ceil(n / group))
    int64_t n, group;   // n: values per token (the row's weights); group: the codes' group
} tsr_rq_act_f32;

/* xsum[t * n_g + g] = the sum of token t's values in group g (the last one may be short), in
 * one fixed order: 16 lanes (lane p % 16 of position p in the group), then the lanes added as
 * tsr_rq_dot_packed_f32 adds its own. */
void tsr_rq_act_f32_sums(float *xsum,        // (n_tok, ceil(n / group))
                         const float *x,     // (n_tok, n)
                         int64_t n_tok, int64_t n, int64_t group);

/* One row times n_tok tokens' f32 activations x (x->group is the codes' group), codes packed
 * as for tsr_rq_dot_packed_groups, any width 1..8, with the group scales s:
 *   y[t * ldy] = sum_g (d_g * sum_i c_i * x_i + b_g * sum_i x_i)
 * for t < n_tok; positions past x->n (the short last group's padding) count as x = 0. No row
 * is dequantized: the codes are converted to f32 in registers and multiplied with the
 * activations, the scale applied once per group and the offset through the group's sum. The
 * float order is fixed (research_quants.c: 16 lanes, one fma per group), so every level gives
 * the reference's bits and a token's value does not depend on n_tok: AVX-512 with VBMI
 * unpacks each 64 codes once in registers for up to four tokens; AVX2 (and AVX-512 without
 * VBMI) unpacks 64 codes at a time to the stack and keeps the 16 lanes in two ymm; the scalar
 * reference does the rest. */
void tsr_rq_dot_packed_f32(float *y, int64_t ldy, const uint8_t *codes, int bits,
                           const tsr_rq_gscales *s, const tsr_rq_act_f32 *x, int64_t n_tok,
                           int64_t n_g);

/* The per-group affine maps of a row whose scales and zeros are quantized themselves (SpQR's
 * second level), for g < n_g, with r = g / run the group's run and sc_g, zc_g its codes
 * (`bits` each, packed from sc and zc as tsr_rq_pack does):
 *   s = lo_step[4r] + lo_step[4r + 1] * sc_g,  z = lo_step[4r + 2] + lo_step[4r + 3] * zc_g,
 *   d[g] = s,  b[g] = -(s * z)
 * each product and sum rounded on its own (no fma), so every level gives the same bits.
 * lo_step: fp16, four per run, at any alignment. AVX-512 with VBMI takes 16 groups a vector
 * where the runs are whole 16-group blocks. */
void tsr_rq_stats_affine(float *d, float *b,           // (n_g) each
                         const uint8_t *sc, const uint8_t *zc, int bits,
                         const uint8_t *lo_step16,     // (ceil(n_g / run), 4) fp16
                         int64_t n_g, int64_t run);

/* ---------------------------------------------------------------------------------------- */
/* Row codecs                                                                                */
/*                                                                                           */
/* A research format is a row codec: each row of n_in weights becomes `row_bytes` fixed      */
/* bytes plus, for codecs with a variable part (SpQR's outliers), a tail of its own length.  */
/* `cfg` is the codec's configuration (bits, group...), opaque to the kernels.               */

/* A row of uniform groups: n_g = ceil(n_in / group) groups of `group` codes of `bits`, packed
 * from codes_at as tsr_rq_pack does (n_g * group), and per group an affine map of the codes:
 * - stats_bits 0: an fp16 scale d_g at d_at + 2 g and, with has_min, an fp16 minimum m_g at
 *   m_at + 2 g; code c is worth has_min ? m_g + d_g * (float)(c - zero) : d_g * (float)(c - zero);
 * - stats_bits > 0 (SpQR's statistics): the group's scale and zero as codes sc_g and zc_g of
 *   stats_bits, packed from sc_at and zc_at, decoded with the fp16 (s_min, s_step, z_min,
 *   z_step) of run r = g / stats_run at d_at + 8 r: s = s_min + s_step * sc_g and
 *   z = z_min + z_step * zc_g; code c is worth s * ((float)c - z).
 * Each product and sum rounded on its own. group: a multiple of 4; zero: 0..255. */
typedef struct tsr_rq_uniform {
    int32_t bits, zero, has_min;
    int64_t group;
    size_t d_at, m_at, codes_at;
    int32_t stats_bits;
    int64_t stats_run;
    size_t sc_at, zc_at;
} tsr_rq_uniform;

typedef struct tsr_rq_codec {
    int32_t dtype;         /* the plugin dtype (>= TSR_DTYPE_PLUGIN_FIRST) of the tensors */
    const char *name;      /* for messages */
    /* Fixed bytes of one row of n_in weights. */
    size_t (*row_bytes)(const void *cfg, int64_t n_in);
    /* Optional: bytes of the variable tail of row w (n_in). NULL: no tails. */
    size_t (*tail_bytes)(const void *cfg, const float *w, int64_t n_in);
    /* Quantizes row w (n_in) into row (row_bytes, zeroed) and tail (tail_bytes, NULL
     * without). */
    void (*quantize_row)(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                         int64_t n_in);
    /* y (n_in) = the row's values. */
    void (*dequantize_row)(const void *cfg, float *y, const uint8_t *row, const uint8_t *tail,
                           size_t tail_bytes, int64_t n_in);
    /* Optional: group of int8 activations that dot_q8 wants (returns 0 for f32 activations,
     * and tsr_rq_matrix_mul then multiplies dequantized rows with tsr_dot_f32). */
    int64_t (*act_group)(const void *cfg);
    /* With int8 activations (of a matrix of rows; optional for a uniform codec, see
     * `uniform`): y[t * ldy] (t < n_tok) = the product of the row and its tail
     * (NULL, 0 without) with token t. scratch: act->n_pad bytes of the calling thread, 64-byte
     * aligned (room for the per-group dots of tsr_rq_dot_packed_groups when groups are 4
     * codes or more). */
    void (*dot_q8)(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                   const uint8_t *tail, size_t tail_bytes, const tsr_rq_act *act, int64_t n_tok,
                   int64_t n_in, uint8_t *scratch);
    /* Writes cfg as a log names it, e.g. "rtn 4-bit sym group 64" (NUL-terminated, cut to
     * size). */
    void (*describe)(const void *cfg, char *buf, size_t size);
    /* With int8 activations: 1 for a scale per activation group
     * (tsr_rq_act_quantize_groups_row), 0 for one per token. */
    int act_group_scales;
    /* Optional, with int8 activations: the second order of the activations dot_q8 reads
     * (act->q_ord: TSR_RQ_ORDER_NIBBLES for 4-bit codes multiplied as nibble pairs by
     * tsr_rq_dot_packed_int_scaled or tsr_rq_dot_packed_scaled, tsr_rq_scaled_order's for
     * tsr_rq_dot_packed_scaled), TSR_RQ_ORDER_NONE (or NULL) when it needs none. */
    int32_t (*act_order)(const void *cfg);
    /* Optional, with f32 activations (act_group 0): y[t * ldy] (t < n_tok) = the product of
     * the row and its tail with token t of x, whose sums are over groups of f32_group(cfg).
     * scratch: n_in floats of the calling thread, 64-byte aligned (so 16 at least). NULL:
     * tsr_rq_matrix_mul multiplies dequantized rows with tsr_dot_f32. */
    void (*dot_f32)(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                    const uint8_t *tail, size_t tail_bytes, const tsr_rq_act_f32 *x,
                    int64_t n_tok, int64_t n_in, float *scratch);
    int64_t (*f32_group)(const void *cfg);
    /* Optional (added after the first release of this header): 1 when the rows of n_in
     * weights are uniform groups (*u filled) and the matrix should be held interleaved by 16
     * rows for its int8 products (tsr_rq_x16_pack); 0 to keep the rows. dot_q8 is then not
     * called, and the codec's dequantize_row must give what tsr_rq_uniform states wherever
     * its tail (if it has tails) adds nothing: the values a tail sets are kept beside the
     * interleaved matrix (tsr_rq_x16_deltas). */
    int (*uniform)(const void *cfg, int64_t n_in, tsr_rq_uniform *u);
} tsr_rq_codec;

/* A matrix in a codec's format: n_out rows of row_bytes, and for a codec with tails the
 * offsets of each row's tail (CSR) and the tails themselves. Where the memory comes from is
 * the caller's business (<tessera/sdk_rq.h> keeps all of it in one block per tensor). */
typedef struct tsr_rq_matrix {
    const tsr_rq_codec *codec;
    const void *cfg;
    int64_t n_in, n_out;
    size_t row_bytes;          /* codec->row_bytes(cfg, n_in) */
    uint8_t *rows;             // (n_out, row_bytes)
    const uint32_t *tail_off;  // (n_out + 1): row r's tail is tails[tail_off[r], tail_off[r+1]);
                               // NULL when the codec has no tails
    uint8_t *tails;            // (tail_off[n_out]) bytes
    /* Added with tsr_rq_codec.uniform: the matrix interleaved by 16 rows (tsr_rq_x16_pack),
     * which the loops below read instead of rows; NULL for a matrix of rows. With tails, the
     * columns the tails set (tsr_rq_x16_deltas): row r's are deltas[delta_off[r] ..
     * delta_off[r + 1]). */
    uint8_t *x16;
    const uint32_t *delta_off;        // (n_out + 1), or NULL
    const struct tsr_rq_delta *deltas;
} tsr_rq_matrix;

/* A column of a row where the codec's value (its tail's) differs from the interleaved form's:
 * the value, and the value minus the interleaved form's, which the product adds times the
 * column's activation. */
typedef struct tsr_rq_delta {
    uint32_t col;
    float value, delta;
} tsr_rq_delta;

/* The interleaved form of a uniform codec's matrix ("x16", as the gguf quantizer's tiles):
 * ceil(n_out / 16) blocks of 16 rows (rows past n_out are zero), a block its n_g groups by
 * runs (stats_run groups with SpQR's statistics, else one; the last run may be short). A run
 * starts with its head: the 16 rows' fp16 d (32 bytes) and with a minimum their 16 fp16 m;
 * with statistics the 16 rows' fp16 s_min, then s_step, z_min, z_step (128 bytes). Then each
 * group of the run: with statistics the 16 rows' sc then their zc, 32 codes of stats_bits
 * packed as tsr_rq_pack does; then group / 4 units of 64 codes: unit k holds codes 4k..4k+3
 * of the group for each of the 16 rows, code i of row r as code 4 r + i of a stream of
 * `bits` (8 * bits bytes), so that once unpacked a unit is the 16 rows' 32-bit lanes that one
 * vpdpbusd multiplies with four broadcast activations. A block is one sequential stream.
 * The size counts 8 bytes past the last block, which a kernel may read (never use). */
size_t tsr_rq_x16_bytes(const tsr_rq_uniform *u, int64_t n_in, int64_t n_out);

/* Packs the rows of m (m->rows, the codec uniform as u says) into dst
 * (tsr_rq_x16_bytes). Slices blocks. */
void tsr_rq_x16_pack(uint8_t *dst, const tsr_rq_matrix *m, const tsr_rq_uniform *u, int ith,
                     int nth);

/* The columns where a row's value (the codec's dequantize_row, its tail included) differs
 * from the interleaved form's, for m with its rows, tails and x16 (u its uniform): with
 * deltas NULL, count[r] = how many of row r; else row r's are written from
 * deltas + delta_off[r], by column. scratch: 2 n_in floats of the calling thread. Slices
 * rows. */
void tsr_rq_x16_deltas(uint32_t *count,                 // (n_out), or NULL
                       tsr_rq_delta *deltas,            // or NULL
                       const uint32_t *delta_off,       // (n_out + 1), with deltas
                       const tsr_rq_matrix *m, const tsr_rq_uniform *u, float *scratch,
                       int ith, int nth);

/* Tail bytes of each row of src (n_out, n_in) as codec->tail_bytes counts them, the sizing
 * pass before the tails can be laid out: only m->codec, cfg, n_in and n_out are read, and
 * the codec must have tail_bytes. src holds rows of src_dtype (F32, F16 or BF16) every
 * src_row_bytes. scratch: n_in floats of the calling thread. Slices rows. */
void tsr_rq_matrix_tail_sizes(uint32_t *tail_len,          // (n_out)
                              const tsr_rq_matrix *m,
                              const void *src, int32_t src_dtype, size_t src_row_bytes,
                              float *scratch,              // (n_in)
                              int ith, int nth);

/* Quantizes the rows of src (as tsr_rq_matrix_tail_sizes) into m's rows and tails, which
 * must be zeroed and, with tails, laid out from the sizing pass. err[r] and norm[r] get
 * sum (w - dequant(q))^2 and sum w^2 of row r, in double. scratch: 2 * n_in floats of the
 * calling thread. Slices rows. */
void tsr_rq_matrix_quantize(const tsr_rq_matrix *m,
                            double *err,                 // (n_out)
                            double *norm,                // (n_out)
                            const void *src, int32_t src_dtype, size_t src_row_bytes,
                            float *scratch,              // (2, n_in)
                            int ith, int nth);

/* Rows [row0, row0 + n_rows) of m as f32 (of its rows, or of x16 by tsr_rq_uniform's
 * formula); the caller checks the range. */
void tsr_rq_matrix_dequantize(float *y,                  // (n_rows, n_in)
                              const tsr_rq_matrix *m, int64_t row0, int64_t n_rows);

/* y = x . W^T for the output rows of slice ith of nth (rows split in multiples of 16).
 * m->x16 with act: per token t, block row r and group g (da the token's scale of the group,
 * S = sum c a over the group's codes and activations, A = the group's activation sum, both
 * exact in 32 bits)
 *   y = sum_g fma(da, inner, y),  inner = d_g * (float)(S - zero * A) [then fma(m_g, A, inner)]
 * in the order of g (with statistics d_g = s and m_g = -(s * z), zero 0), then for each
 * delta of the row in turn y = fma(delta, da * (float)a, y): for any n_tok the same bits.
 * AVX-512 with VBMI unpacks each unit once in registers for up to eight tokens, AVX2 to the
 * stack by pdep (then 16-bit products); the scalar reference does the rest. act NULL:
 * with the codec's dot_f32, the sums of x's groups (tsr_rq_act_f32_sums, each
 * thread its own) and codec->dot_f32 on each row; without it, each value is
 * tsr_dot_f32(dequantized row, x row). act non-NULL (x quantized by tsr_rq_act_quantize with
 * the codec's act_group): codec->dot_q8 multiplies, x is not read. scratch:
 * tsr_rq_matrix_mul_scratch bytes of the calling thread, 64-byte aligned. With one token and
 * a fused product the slice's rows are read as two sequential streams, as tsr_matmul's
 * decode does (which changes the order of the reads, not a value). */
void tsr_rq_matrix_mul(float *y,                         // (n_tok, n_out)
                       const tsr_rq_matrix *m,
                       const float *x,                   // (n_tok, n_in)
                       const tsr_rq_act *act, int64_t n_tok, uint8_t *scratch, int ith,
                       int nth);

/* Bytes of tsr_rq_matrix_mul's scratch per thread for n_tok tokens: act_n_pad > 0, the int8
 * activations' padded length; 0 for f32 activations. A multiple of 64. */
size_t tsr_rq_matrix_mul_scratch(const tsr_rq_matrix *m, int64_t n_tok, int64_t act_n_pad);

#ifdef __cplusplus
}
#endif

#endif
