/*
 * <tessera/kernels_research.h> -- what the research quantizer plugins (rtn, int6, spqr, w4a8)
 * share: bit packing, per-token int8 activations, an exact u8 x s8 integer dot, and one
 * driver that turns a row codec into a quantized tensor, its dequantization and its product.
 * docs/quantizers.md describes the formats.
 *
 * The driver is the only part of the kernels that sees host services: it takes the
 * tsr_host of <tessera/common.h> for allocation (host->alloc), threads (host->parallel_for)
 * and errors (host->set_error), so each plugin keeps only its format and its ABI glue.
 *
 * Results never depend on the thread count: threads split rows (or tokens), never a sum.
 * Integer dots are exact, so every dispatch level (scalar, AVX2, AVX-512 VNNI) gives the same
 * bits; the level follows tsr_cpu_level_get().
 */
#ifndef TESSERA_KERNELS_RESEARCH_H
#define TESSERA_KERNELS_RESEARCH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tessera/common.h>
#include <tessera/kernels_cpu.h>
#include <tessera/quantizer.h>

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

/* Quantized activations of n_tok tokens, as the driver hands them to a codec. */
typedef struct tsr_rq_act {
    const int8_t *q;      // (n_tok, n_pad)
    const int32_t *gsum;  // (n_tok, n_pad / group)
    const float *d;       // (n_tok)
    int64_t n_pad, group;
} tsr_rq_act;

/* ---------------------------------------------------------------------------------------- */
/* Row codecs and the tensor driver                                                          */
/*                                                                                           */
/* A quantized tensor is one host->alloc block: a header, the codec's configuration, n_out   */
/* rows of `row_bytes` each, and for codecs with a variable part (SpQR's outliers) the      */
/* uint32 offsets (n_out + 1) of each row's tail followed by the tails.                      */

typedef struct tsr_rq_codec {
    int32_t dtype;         /* the plugin dtype (>= TSR_DTYPE_PLUGIN_FIRST) of the tensors */
    const char *name;      /* for messages */
    /* Fixed bytes of one row of n_in weights. */
    size_t (*row_bytes)(const void *cfg, int64_t n_in);
    /* Optional: bytes of the variable tail of row w (n_in). NULL: no tails. */
    size_t (*tail_bytes)(const void *cfg, const float *w, int64_t n_in);
    /* Quantizes row w (n_in) into row (row_bytes) and tail (tail_bytes, NULL without). */
    void (*quantize_row)(const void *cfg, uint8_t *row, uint8_t *tail, const float *w,
                         int64_t n_in);
    /* y (n_in) = the row's values. */
    void (*dequantize_row)(const void *cfg, float *y, const uint8_t *row, const uint8_t *tail,
                           size_t tail_bytes, int64_t n_in);
    /* Optional: group of int8 activations that dot_q8 wants (returns 0 for f32 activations,
     * and the driver then multiplies dequantized rows with tsr_dot_f32). */
    int64_t (*act_group)(const void *cfg);
    /* With int8 activations: y[t * ldy] (t < n_tok) = the product of the row with token t.
     * scratch: act->n_pad bytes of the calling thread, for the unpacked codes. */
    void (*dot_q8)(const void *cfg, float *y, int64_t ldy, const uint8_t *row,
                   const tsr_rq_act *act, int64_t n_tok, int64_t n_in, uint8_t *scratch);
    /* Writes cfg as the log names it, e.g. "rtn 4-bit sym group 64" (NUL-terminated, cut to
     * size). */
    void (*describe)(const void *cfg, char *buf, size_t size);
} tsr_rq_codec;

/* What tsr_rq_quantize reports. */
typedef struct tsr_rq_report {
    double bits_per_weight; /* every byte but the fixed header, per weight */
    double rel_rmse;        /* ||W - dequant(Q)|| / ||W|| (0 for an all-zero W) */
    uint64_t tail_bytes;    /* total bytes of the tails */
} tsr_rq_report;

/* [main] Quantizes the 2-D F32/F16/BF16 tensor `src` (ne = {n_in, n_out}) with `codec` and
 * its configuration `cfg` (cfg_bytes, copied into the tensor) into *dst, whose data is
 * allocated with host->alloc (free it with tsr_rq_release). Rows are quantized on
 * host->parallel_for. TSR_E_UNSUPPORTED (with a message through host->set_error naming the
 * tensor and its type) for other types or shapes, TSR_E_NOMEM when allocation fails. */
tsr_status tsr_rq_quantize(const tsr_host *host, const tsr_rq_codec *codec, const void *cfg,
                           size_t cfg_bytes, const tsr_tensor *src, tsr_tensor *dst,
                           tsr_rq_report *report);

/* [main] Frees what tsr_rq_quantize allocated for w and clears w->data. */
void tsr_rq_release(const tsr_host *host, tsr_tensor *w);

/* The configuration a tensor was quantized with (the copy inside its block), or NULL when w
 * is not a tensor of `codec`. */
const void *tsr_rq_config(const tsr_rq_codec *codec, const tsr_tensor *w);

/* [main] Rows [row0, row0 + n_rows) of w as f32 into y (n_rows, n_in). TSR_E_RANGE for rows
 * outside the tensor, TSR_E_UNSUPPORTED for a tensor of another codec. */
tsr_status tsr_rq_dequantize_rows(const tsr_host *host, const tsr_rq_codec *codec, float *y,
                                  const tsr_tensor *w, int64_t row0, int64_t n_rows);

/* [main] y (n, n_out) = x (n, n_in) . W^T on host->parallel_for. With f32 activations each
 * value is tsr_dot_f32(dequantized row, x row); with int8 activations (codec->act_group > 0)
 * x is quantized per token by tsr_rq_act_quantize_row and the codec's dot_q8 multiplies. */
tsr_status tsr_rq_matmul(const tsr_host *host, const tsr_rq_codec *codec, float *y,
                         const tsr_tensor *w, const float *x, int64_t n);

/* ---------------------------------------------------------------------------------------- */
/* A quantizer plugin over one codec                                                         */
/*                                                                                           */
/* The tsr_quantizer_vtable of a research quantizer is its codec and configuration plus the  */
/* same glue in every plugin; these are that glue. The plugin's create reads its parameters  */
/* into a configuration and calls tsr_rq_quantizer_create; `self` of the callbacks below is  */
/* the instance it made.                                                                     */

typedef struct tsr_rq_quantizer {
    const tsr_host *host;
    const tsr_rq_codec *codec;
    uint64_t tensors, weights, tail_bytes; /* totals of every tensor prepared, for commands */
    const void *cfg;                       /* the configuration, in the instance's block */
    size_t cfg_bytes;
} tsr_rq_quantizer;

/* [main] TSR_E_INVALID, with "group: <group> is not a multiple of <multiple>", unless it is. */
tsr_status tsr_rq_check_group(const tsr_host *host, int64_t group, int64_t multiple);

/* [main] An instance quantizing with `codec` and a copy of cfg (cfg_bytes) into *out. */
tsr_status tsr_rq_quantizer_create(const tsr_host *host, const tsr_rq_codec *codec,
                                   const void *cfg, size_t cfg_bytes, void **out);

/* [main] Quantizes in->src into out (owns_data, bits_per_weight, rel_rmse set) and adds it to
 * the instance's totals; *report gets what tsr_rq_quantize reported. Logs nothing. */
tsr_status tsr_rq_quantizer_quantize(tsr_rq_quantizer *q, const tsr_weight_in *in,
                                     tsr_weight_out *out, tsr_rq_report *report);

/* The vtable callbacks. prepare is tsr_rq_quantizer_quantize plus one INFO log line:
 * "<tensor> (layer <l>, <role>): <codec->describe>: <b> bits/weight, rel_rmse <e>". */
void tsr_rq_quantizer_destroy(void *self);
tsr_status tsr_rq_quantizer_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out);
void tsr_rq_quantizer_release(void *self, tsr_tensor *w);
tsr_status tsr_rq_quantizer_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                                   int64_t n);
tsr_status tsr_rq_quantizer_dequantize_rows(void *self, float *y, const tsr_tensor *w,
                                            int64_t row0, int64_t n_rows);

/* The vtable entries but create and prepare, for a plugin that adds nothing to them. */
#define TSR_RQ_QUANTIZER_CALLBACKS                                                         \
    .destroy = tsr_rq_quantizer_destroy, .release = tsr_rq_quantizer_release,             \
    .matmul = tsr_rq_quantizer_matmul, .dequantize_rows = tsr_rq_quantizer_dequantize_rows

#ifdef __cplusplus
}
#endif

#endif
