/*
 * <tessera/sdk_rq.h> -- a quantizer plugin over one row codec of <tessera/kernels_research.h>
 * (the research quantizers rtn, int6, spqr, w4a8 are built this way). The plugin writes its
 * format as a tsr_rq_codec, a create that reads its parameters into a configuration, and
 * takes the rest of its tsr_quantizer_vtable from here:
 *
 *   static tsr_status my_create(const tsr_host *host, const tsr_params *params,
 *                               const tsr_quantizer_init *init, void **out) {
 *       my_cfg cfg = {(int32_t)tsr_param_int(params, "bits")};
 *       return tsr_rq_quantizer_create(host, init, &my_codec, &cfg, sizeof cfg, out);
 *   }
 *   static const tsr_quantizer_vtable vt = { TSR_SIZED(tsr_quantizer_vtable),
 *       .create = my_create, .prepare = tsr_rq_quantizer_prepare, TSR_RQ_QUANTIZER_CALLBACKS };
 *
 * A quantized tensor is one host->alloc block: a header, a copy of the codec's configuration,
 * the n_out rows of row_bytes each, and for codecs with a variable part (SpQR's outliers) the
 * uint32 offsets (n_out + 1) of each row's tail followed by the tails; or, for a codec whose
 * `uniform` asks for it, the rows interleaved by 16 (tsr_rq_x16_pack) in place of the rows
 * and tails, with tails followed by the offsets and the deltas (tsr_rq_x16_deltas) of each
 * row's values that the tails set. Memory goes through the host's allocator, threads through
 * host->parallel_for, errors through host->set_error; the row loops are the kernels'
 * (tsr_rq_matrix_*).
 *
 * Header-only, like <tessera/sdk.h>, but it calls the kernels: link Tessera::kernels
 * (`pkg-config --libs tessera`). Every function runs on the thread that called into the
 * plugin ([main]); only the kernels run on the pool's workers.
 */
#ifndef TESSERA_SDK_RQ_H
#define TESSERA_SDK_RQ_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <tessera/kernels_research.h>
#include <tessera/quantizer.h>
#include <tessera/sdk.h>

/* [any] The codes of group g of a row whose groups (`group` codes of `bits` each) follow one
 * another from `codes`, for a loop that visits g = 0, 1, ... n_g - 1 in order: when g starts a
 * chunk, the chunk's groups are unpacked into buf (TSR_RQ_CHUNK bytes) by one call, which is
 * most of the cost of a group of 64 when done per group. group: 1, or a multiple of 8 up to
 * TSR_RQ_CHUNK (so that every chunk starts on a byte). */
#define TSR_RQ_CHUNK 4096
static inline const uint8_t *tsr_rq_group_codes(uint8_t *buf, const uint8_t *codes, int64_t g,
                                                int64_t n_g, int64_t group, int bits) {
    int64_t per = TSR_RQ_CHUNK / group;
    if (g % per == 0) {
        int64_t n = n_g - g < per ? n_g - g : per;
        tsr_rq_unpack(buf, codes + g * group * bits / 8, n * group, bits);
    }
    return buf + g % per * group;
}

/* ---------------------------------------------------------------------------------------- */
/* Tensors of a codec                                                                        */

/* What tsr_rq_quantize reports. */
typedef struct tsr_rq_report {
    double bits_per_weight; /* every byte but the fixed header, per weight */
    double rel_rmse;        /* ||W - dequant(Q)|| / ||W|| (0 for an all-zero W) */
    uint64_t tail_bytes;    /* total bytes of the tails */
} tsr_rq_report;

#define TSR_RQ_MAGIC_ 0x51525354u /* "TSRQ" */
#define TSR_RQ_ALIGN_ 64

/* The start of a tensor's block; offsets are from the block's start. */
typedef struct tsr_rq_header_ {
    uint32_t magic;
    int32_t dtype;
    int64_t n_in, n_out;
    uint64_t row_bytes;
    uint64_t cfg_off, rows_off, ptr_off, tail_off, total; /* ptr_off = 0: no tails */
    uint64_t x16_off; /* not 0: the matrix interleaved (tsr_rq_x16_pack), rows_off 0 */
    uint64_t delta_off_off, deltas_off; /* with x16 and tails: tsr_rq_x16_deltas' */
} tsr_rq_header_;

static inline uint64_t tsr_rq_align_up_(uint64_t x) {
    return (x + TSR_RQ_ALIGN_ - 1) & ~(uint64_t)(TSR_RQ_ALIGN_ - 1);
}

/* The header of w's block, or NULL when w is not a tensor of `codec`. */
static inline const tsr_rq_header_ *tsr_rq_header_of_(const tsr_rq_codec *codec,
                                                      const tsr_tensor *w) {
    const tsr_rq_header_ *h = w->data;
    if (!h || w->dtype != codec->dtype || h->magic != TSR_RQ_MAGIC_ || h->dtype != codec->dtype)
        return NULL;
    return h;
}

/* The kernels' view of a block. */
static inline tsr_rq_matrix tsr_rq_matrix_of_(const tsr_rq_codec *codec, uint8_t *block) {
    const tsr_rq_header_ *h = (const tsr_rq_header_ *)block;
    tsr_rq_matrix m = {codec, block + h->cfg_off, h->n_in, h->n_out, (size_t)h->row_bytes,
                       h->rows_off ? block + h->rows_off : NULL, NULL, NULL,
                       h->x16_off ? block + h->x16_off : NULL, NULL, NULL};
    if (h->delta_off_off) {
        m.delta_off = (const uint32_t *)(block + h->delta_off_off);
        m.deltas = (const tsr_rq_delta *)(block + h->deltas_off);
    }
    if (h->ptr_off) {
        m.tail_off = (const uint32_t *)(block + h->ptr_off);
        m.tails = block + h->tail_off;
    }
    return m;
}

/* The configuration a tensor was quantized with (the copy inside its block), or NULL when w
 * is not a tensor of `codec`. */
static inline const void *tsr_rq_config(const tsr_rq_codec *codec, const tsr_tensor *w) {
    const tsr_rq_header_ *h = tsr_rq_header_of_(codec, w);
    return h ? (const uint8_t *)h + h->cfg_off : NULL;
}

static inline const char *tsr_rq_src_type_name_(int32_t dtype) {
    switch (dtype) {
    case TSR_DTYPE_Q4_0: return "Q4_0";
    case TSR_DTYPE_Q4_1: return "Q4_1";
    case TSR_DTYPE_Q5_0: return "Q5_0";
    case TSR_DTYPE_Q5_1: return "Q5_1";
    case TSR_DTYPE_Q8_0: return "Q8_0";
    case TSR_DTYPE_Q2_K: return "Q2_K";
    case TSR_DTYPE_Q3_K: return "Q3_K";
    case TSR_DTYPE_Q4_K: return "Q4_K";
    case TSR_DTYPE_Q5_K: return "Q5_K";
    case TSR_DTYPE_Q6_K: return "Q6_K";
    case TSR_DTYPE_IQ4_NL: return "IQ4_NL";
    case TSR_DTYPE_IQ4_XS: return "IQ4_XS";
    case TSR_DTYPE_F64: return "F64";
    default: return dtype >= TSR_DTYPE_PLUGIN_FIRST ? "plugin-defined" : "non-float";
    }
}

/* host->alloc of `bytes` (at least 1), 64-byte aligned, or NULL with "<what>: out of memory
 * for <bytes> bytes" set. */
static inline void *tsr_rq_alloc_or_fail_(const tsr_host *host, size_t bytes, const char *what) {
    void *p = host->alloc(host->ctx, bytes ? bytes : 1, TSR_RQ_ALIGN_);
    if (!p) host->set_error(host->ctx, "%s: out of memory for %zu bytes", what, bytes);
    return p;
}

/* The passes of tsr_rq_quantize, each one parallel_for. */
enum { TSR_RQ_PASS_SIZE_, TSR_RQ_PASS_QUANTIZE_, TSR_RQ_PASS_PACK_, TSR_RQ_PASS_DELTAS_ };

typedef struct tsr_rq_quant_job_ {
    int pass;
    tsr_rq_matrix m;
    const tsr_tensor *src;
    float *scratch;     // (nth, 2, n_in)
    uint32_t *tail_len; // (n_out): the tails' sizes, then the deltas' counts
    double *err, *norm; // (n_out)
    uint8_t *x16;       // PACK's destination
    tsr_rq_uniform uniform;
    tsr_rq_delta *deltas; // DELTAS: NULL to count them into tail_len
    const uint32_t *delta_off;
} tsr_rq_quant_job_;

static inline void tsr_rq_quant_task_(void *arg, int ith, int nth) {
    tsr_rq_quant_job_ *j = arg;
    const tsr_tensor *src = j->src;
    float *scratch = j->scratch + (size_t)ith * 2 * (size_t)j->m.n_in;
    if (j->pass == TSR_RQ_PASS_PACK_)
        tsr_rq_x16_pack(j->x16, &j->m, &j->uniform, ith, nth);
    else if (j->pass == TSR_RQ_PASS_DELTAS_)
        tsr_rq_x16_deltas(j->deltas ? NULL : j->tail_len, j->deltas, j->delta_off, &j->m,
                          &j->uniform, scratch, ith, nth);
    else if (j->pass == TSR_RQ_PASS_SIZE_)
        tsr_rq_matrix_tail_sizes(j->tail_len, &j->m, src->data, src->dtype, src->row_bytes,
                                 scratch, ith, nth);
    else
        tsr_rq_matrix_quantize(&j->m, j->err, j->norm, src->data, src->dtype, src->row_bytes,
                               scratch, ith, nth);
}

/* [main] Replaces the quantized rows in *block (header *h, j->m their matrix) by a block of
 * their interleaved form (j->uniform) and, for a codec with tails, the deltas the tails set.
 * The deltas are counted on an interleaved copy before the block that holds them is sized. */
static inline tsr_status tsr_rq_interleave_(const tsr_host *host, tsr_rq_quant_job_ *j,
                                            const tsr_rq_header_ *h, uint8_t **block,
                                            size_t cfg_bytes, const char *name) {
    const int64_t n_out = h->n_out;
    const size_t x16_bytes = tsr_rq_x16_bytes(&j->uniform, h->n_in, n_out);
    const int tails = j->m.tail_off != NULL;
    uint64_t n_deltas = 0;
    uint8_t *copy = NULL;
    if (tails) {
        if (!(copy = tsr_rq_alloc_or_fail_(host, x16_bytes, name))) return TSR_E_NOMEM;
        j->x16 = copy;
        j->pass = TSR_RQ_PASS_PACK_;
        host->parallel_for(host->ctx, tsr_rq_quant_task_, j);
        j->m.x16 = copy;
        j->pass = TSR_RQ_PASS_DELTAS_;
        host->parallel_for(host->ctx, tsr_rq_quant_task_, j);
        for (int64_t r = 0; r < n_out; r++) n_deltas += j->tail_len[r];
        if (n_deltas > UINT32_MAX) {
            host->set_error(host->ctx, "%s: %llu values beside the interleaved rows exceed "
                            "2^32", name, (unsigned long long)n_deltas);
            host->free(host->ctx, copy);
            return TSR_E_RANGE;
        }
    }
    tsr_rq_header_ hx = *h;
    hx.rows_off = hx.ptr_off = hx.tail_off = 0;
    hx.x16_off = h->rows_off;
    hx.total = hx.x16_off + x16_bytes;
    if (tails) {
        hx.delta_off_off = tsr_rq_align_up_(hx.total);
        hx.deltas_off = tsr_rq_align_up_(hx.delta_off_off + ((uint64_t)n_out + 1) * 4);
        hx.total = hx.deltas_off + n_deltas * sizeof(tsr_rq_delta);
    }
    uint8_t *out = tsr_rq_alloc_or_fail_(host, (size_t)hx.total, name);
    if (!out) {
        host->free(host->ctx, copy);
        return TSR_E_NOMEM;
    }
    memset(out, 0, (size_t)hx.x16_off);
    memcpy(out, &hx, sizeof hx);
    memcpy(out + hx.cfg_off, j->m.cfg, cfg_bytes);
    j->x16 = out + hx.x16_off;
    if (copy) {
        memcpy(j->x16, copy, x16_bytes);
        host->free(host->ctx, copy);
        uint32_t *off = (uint32_t *)(out + hx.delta_off_off);
        off[0] = 0;
        for (int64_t r = 0; r < n_out; r++) off[r + 1] = off[r] + j->tail_len[r];
        j->m.x16 = j->x16;
        j->deltas = (tsr_rq_delta *)(out + hx.deltas_off);
        j->delta_off = off;
        host->parallel_for(host->ctx, tsr_rq_quant_task_, j);
    } else {
        j->pass = TSR_RQ_PASS_PACK_;
        host->parallel_for(host->ctx, tsr_rq_quant_task_, j);
    }
    host->free(host->ctx, *block);
    *block = out;
    return TSR_OK;
}

/* [main] Quantizes the 2-D F32/F16/BF16 tensor `src` (ne = {n_in, n_out}) with `codec` and
 * its configuration `cfg` (cfg_bytes, copied into the tensor) into *dst, whose data is
 * allocated with host->alloc (free it with tsr_rq_release). Rows are quantized on
 * host->parallel_for. TSR_E_UNSUPPORTED (with a message through host->set_error naming the
 * tensor and its type) for other types or shapes, TSR_E_RANGE when the tails pass 4 GiB,
 * TSR_E_NOMEM when allocation fails; *report is zero after an error. */
static inline tsr_status tsr_rq_quantize(const tsr_host *host, const tsr_rq_codec *codec,
                                         const void *cfg, size_t cfg_bytes,
                                         const tsr_tensor *src, tsr_tensor *dst,
                                         tsr_rq_report *report) {
    *report = (tsr_rq_report){0, 0, 0};
    const char *name = src->name ? src->name : "(unnamed tensor)";
    if (src->dtype != TSR_DTYPE_F32 && src->dtype != TSR_DTYPE_F16 &&
        src->dtype != TSR_DTYPE_BF16) {
        host->set_error(host->ctx,
                        "%s: type %s (%d): quantizer '%s' converts F32, F16 and BF16 weights "
                        "only; use quantizer 'gguf' for a file that is already quantized",
                        name, tsr_rq_src_type_name_(src->dtype), (int)src->dtype, codec->name);
        return TSR_E_UNSUPPORTED;
    }
    int64_t n_in = src->ne[0], n_out = src->ne[1];
    if (src->ne[2] != 1 || src->ne[3] != 1 || n_in <= 0 || n_out <= 0 ||
        src->row_bytes < tsr_row_size(src->dtype, n_in)) {
        host->set_error(host->ctx, "%s: quantizer '%s' takes 2-D weight matrices only", name,
                        codec->name);
        return TSR_E_UNSUPPORTED;
    }
    int nth = host->n_threads(host->ctx);
    tsr_rq_quant_job_ j = {.m = {codec, cfg, n_in, n_out, 0, NULL, NULL, NULL, NULL, NULL,
                                 NULL},
                           .src = src};
    size_t n_rows = (size_t)n_out;
    tsr_status st = TSR_E_NOMEM;
    uint8_t *block = NULL;
    j.scratch = tsr_rq_alloc_or_fail_(host, (size_t)nth * 2 * (size_t)n_in * sizeof(float),
                                      name);
    j.tail_len = tsr_rq_alloc_or_fail_(host, n_rows * sizeof(uint32_t), name);
    j.err = tsr_rq_alloc_or_fail_(host, n_rows * sizeof(double), name);
    j.norm = tsr_rq_alloc_or_fail_(host, n_rows * sizeof(double), name);
    if (!j.scratch || !j.tail_len || !j.err || !j.norm) goto done;

    uint64_t tail_total = 0;
    if (codec->tail_bytes) {
        j.pass = TSR_RQ_PASS_SIZE_;
        host->parallel_for(host->ctx, tsr_rq_quant_task_, &j);
        for (int64_t r = 0; r < n_out; r++) tail_total += j.tail_len[r];
        if (tail_total > UINT32_MAX) {
            host->set_error(host->ctx, "%s: quantizer '%s': %llu bytes of outliers exceed 4 GiB",
                            name, codec->name, (unsigned long long)tail_total);
            st = TSR_E_RANGE;
            goto done;
        }
    }
    tsr_rq_header_ h = {.magic = TSR_RQ_MAGIC_, .dtype = codec->dtype, .n_in = n_in,
                        .n_out = n_out, .row_bytes = codec->row_bytes(cfg, n_in)};
    h.cfg_off = tsr_rq_align_up_(sizeof h);
    h.rows_off = tsr_rq_align_up_(h.cfg_off + cfg_bytes);
    uint64_t end = h.rows_off + h.row_bytes * n_rows;
    if (codec->tail_bytes) {
        h.ptr_off = tsr_rq_align_up_(end);
        h.tail_off = h.ptr_off + (n_rows + 1) * sizeof(uint32_t);
        end = h.tail_off + tail_total;
    }
    h.total = end;
    if (!(block = tsr_rq_alloc_or_fail_(host, (size_t)h.total, name))) goto done;
    memset(block, 0, (size_t)h.total);
    memcpy(block, &h, sizeof h);
    memcpy(block + h.cfg_off, cfg, cfg_bytes);
    if (codec->tail_bytes) {
        uint32_t *ptr = (uint32_t *)(block + h.ptr_off);
        ptr[0] = 0;
        for (int64_t r = 0; r < n_out; r++) ptr[r + 1] = ptr[r] + j.tail_len[r];
    }
    j.m = tsr_rq_matrix_of_(codec, block);
    j.pass = TSR_RQ_PASS_QUANTIZE_;
    host->parallel_for(host->ctx, tsr_rq_quant_task_, &j);

    double e = 0, s = 0;
    for (int64_t r = 0; r < n_out; r++) {
        e += j.err[r];
        s += j.norm[r];
    }
    if (codec->uniform && codec->uniform(cfg, n_in, &j.uniform)) {
        st = tsr_rq_interleave_(host, &j, &h, &block, cfg_bytes, name);
        if (st < 0) goto done;
        st = TSR_E_NOMEM;
    }
    report->rel_rmse = s > 0 ? sqrt(e / s) : 0.0;
    report->bits_per_weight = 8.0 * (double)(h.total - h.rows_off) / ((double)n_in * n_rows);
    report->tail_bytes = tail_total;
    *dst = (tsr_tensor){.struct_size = sizeof(tsr_tensor), .dtype = codec->dtype, .n_dims = 2,
                        .ne = {n_in, n_out, 1, 1}, .row_bytes = (size_t)h.row_bytes,
                        .data = block, .name = src->name, .extra = NULL};
    block = NULL;
    st = TSR_OK;
done:
    host->free(host->ctx, block);
    host->free(host->ctx, j.scratch);
    host->free(host->ctx, j.tail_len);
    host->free(host->ctx, j.err);
    host->free(host->ctx, j.norm);
    return st;
}

/* [main] Frees what tsr_rq_quantize allocated for w and clears w->data. */
static inline void tsr_rq_release(const tsr_host *host, tsr_tensor *w) {
    host->free(host->ctx, w->data);
    w->data = NULL;
}

/* [main] Rows [row0, row0 + n_rows) of w as f32 into y (n_rows, n_in). TSR_E_RANGE for rows
 * outside the tensor, TSR_E_UNSUPPORTED for a tensor of another codec. */
static inline tsr_status tsr_rq_dequantize_rows(const tsr_host *host, const tsr_rq_codec *codec,
                                                float *y, const tsr_tensor *w, int64_t row0,
                                                int64_t n_rows) {
    const tsr_rq_header_ *h = tsr_rq_header_of_(codec, w);
    if (!h) {
        host->set_error(host->ctx, "quantizer '%s': tensor %s is not in its format (dtype %d)",
                        codec->name, w->name ? w->name : "(unnamed)", (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    if (row0 < 0 || n_rows < 0 || row0 + n_rows > h->n_out) {
        host->set_error(host->ctx, "%s: rows [%lld, %lld) outside its %lld rows",
                        w->name ? w->name : "(unnamed)", (long long)row0,
                        (long long)(row0 + n_rows), (long long)h->n_out);
        return TSR_E_RANGE;
    }
    tsr_rq_matrix m = tsr_rq_matrix_of_(codec, w->data);
    tsr_rq_matrix_dequantize(y, &m, row0, n_rows);
    return TSR_OK;
}

/* One product of tsr_rq_matmul: the int8 activations when act.group > 0. */
typedef struct tsr_rq_mm_job_ {
    tsr_rq_matrix m;
    float *y;          // (n_tok, n_out)
    const float *x;    // (n_tok, n_in)
    int64_t n_tok;
    uint8_t *scratch;  // (nth, scratch_bytes): tsr_rq_matrix_mul's
    size_t scratch_bytes;
    int8_t *q;         // int8 path: (n_tok, n_pad)
    int8_t *q_ord;     // (n_tok, n_pad) in codec->act_order's order, or NULL
    int32_t *gsum;     // (n_tok, n_pad / group)
    float *d;          // (n_tok)
    tsr_rq_act act;
} tsr_rq_mm_job_;

static inline void tsr_rq_act_task_(void *arg, int ith, int nth) {
    tsr_rq_mm_job_ *j = arg;
    tsr_rq_act_quantize(j->q, j->q_ord, j->act.order, j->gsum, j->d, j->x, j->n_tok, j->m.n_in,
                        j->act.n_pad, j->act.group, j->act.n_scales > 1, ith, nth);
}

static inline void tsr_rq_mm_task_(void *arg, int ith, int nth) {
    tsr_rq_mm_job_ *j = arg;
    tsr_rq_matrix_mul(j->y, &j->m, j->x, j->act.group > 0 ? &j->act : NULL, j->n_tok,
                      j->scratch + (size_t)ith * j->scratch_bytes, ith, nth);
}

/* [main] y (n, n_out) = x (n, n_in) . W^T on host->parallel_for. With f32 activations the
 * codec's dot_f32 multiplies the packed rows (each value tsr_dot_f32(dequantized row, x row)
 * for a codec without one); with int8 activations (codec->act_group > 0) x is quantized per
 * token (or per group: codec->act_group_scales) by tsr_rq_act_quantize and the codec's dot_q8
 * multiplies, or for an interleaved matrix the kernels' product of 16 rows at a time.
 * TSR_E_UNSUPPORTED for a tensor of another codec, TSR_E_NOMEM. */
static inline tsr_status tsr_rq_matmul(const tsr_host *host, const tsr_rq_codec *codec, float *y,
                                       const tsr_tensor *w, const float *x, int64_t n) {
    const tsr_rq_header_ *h = tsr_rq_header_of_(codec, w);
    if (!h) {
        host->set_error(host->ctx, "quantizer '%s' cannot multiply tensors of dtype %d",
                        codec->name, (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    if (n <= 0) return TSR_OK;
    tsr_rq_mm_job_ j = {.m = tsr_rq_matrix_of_(codec, w->data), .y = y, .x = x, .n_tok = n};
    const char *name = w->name ? w->name : codec->name;
    int64_t group = codec->act_group ? codec->act_group(j.m.cfg) : 0, n_pad = 0;
    int nth = host->n_threads(host->ctx);
    size_t nq = 0, ng = 0, n_scales = 1;
    if (group > 0) {
        n_pad = (h->n_in + group - 1) / group * group;
        nq = (size_t)(n * n_pad);
        ng = (size_t)(n * (n_pad / group));
        if (codec->act_group_scales) n_scales = (size_t)(n_pad / group);
    }
    j.scratch_bytes = tsr_rq_matrix_mul_scratch(&j.m, n, n_pad);
    /* One block: per-thread scratch, then the int8 activations (twice for act_order: as
     * they are and in the codec's order), group sums and scales. */
    int32_t order = group > 0 && codec->act_order && !j.m.x16 ? codec->act_order(j.m.cfg)
                                                              : TSR_RQ_ORDER_NONE;
    size_t nq_ord = order != TSR_RQ_ORDER_NONE ? (size_t)tsr_rq_align_up_(nq) : 0;
    size_t off_q = j.scratch_bytes * (size_t)nth;
    size_t off_g = off_q + (size_t)tsr_rq_align_up_(nq) + nq_ord;
    size_t off_d = off_g + ng * sizeof(int32_t);
    uint8_t *buf = tsr_rq_alloc_or_fail_(host, off_d + (size_t)n * n_scales * sizeof(float),
                                         name);
    if (!buf) return TSR_E_NOMEM;
    j.scratch = buf;
    if (group > 0) {
        j.q = (int8_t *)(buf + off_q);
        j.q_ord = nq_ord ? j.q + tsr_rq_align_up_(nq) : NULL;
        j.gsum = (int32_t *)(buf + off_g);
        j.d = (float *)(buf + off_d);
        j.act = (tsr_rq_act){j.q, j.gsum, j.d, n_pad, group, (int64_t)n_scales, j.q_ord, order};
        host->parallel_for(host->ctx, tsr_rq_act_task_, &j);
    }
    host->parallel_for(host->ctx, tsr_rq_mm_task_, &j);
    host->free(host->ctx, buf);
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The quantizer instance and its vtable callbacks                                           */

typedef struct tsr_rq_quantizer {
    const tsr_host *host;
    const tsr_rq_codec *codec;
    uint64_t tensors, weights, tail_bytes; /* totals of every tensor prepared, for commands */
    const void *cfg;                       /* the configuration, in the instance's block */
    size_t cfg_bytes;
} tsr_rq_quantizer;

/* [main] TSR_E_INVALID, with "group: <group> is not a multiple of <multiple>", unless it is. */
static inline tsr_status tsr_rq_check_group(const tsr_host *host, int64_t group,
                                            int64_t multiple) {
    if (group % multiple == 0) return TSR_OK;
    host->set_error(host->ctx, "group: %lld is not a multiple of %lld", (long long)group,
                    (long long)multiple);
    return TSR_E_INVALID;
}

/* [main] An instance quantizing with `codec` and a copy of cfg (cfg_bytes) into *out, one
 * host->alloc block (tsr_rq_quantizer_destroy frees it). Refuses a backend whose buffers are
 * device memory: the codecs' products read x and write y on the CPU (CONTRACT.md MEM_1). */
static inline tsr_status tsr_rq_quantizer_create(const tsr_host *host,
                                                 const tsr_quantizer_init *init,
                                                 const tsr_rq_codec *codec, const void *cfg,
                                                 size_t cfg_bytes, void **out) {
    if (init->memory_space != TSR_MEMORY_HOST) {
        host->set_error(host->ctx, "backend '%s' computes in device memory: the %s products run "
                        "on the CPU", init->backend_name ? init->backend_name : "?", codec->name);
        return TSR_E_UNSUPPORTED;
    }
    size_t cfg_off = (size_t)tsr_rq_align_up_(sizeof(tsr_rq_quantizer));
    tsr_rq_quantizer *q = tsr_rq_alloc_or_fail_(host, cfg_off + cfg_bytes, codec->name);
    if (!q) return TSR_E_NOMEM;
    memcpy((uint8_t *)q + cfg_off, cfg, cfg_bytes);
    *q = (tsr_rq_quantizer){.host = host, .codec = codec, .cfg = (uint8_t *)q + cfg_off,
                            .cfg_bytes = cfg_bytes};
    *out = q;
    return TSR_OK;
}

/* [main] Quantizes in->src into out (owns_data, bits_per_weight, rel_rmse set) and adds it to
 * the instance's totals; *report gets what tsr_rq_quantize reported. Logs nothing: for a
 * prepare that writes its own log line. */
static inline tsr_status tsr_rq_quantizer_quantize(tsr_rq_quantizer *q, const tsr_weight_in *in,
                                                   tsr_weight_out *out, tsr_rq_report *report) {
    tsr_status st = tsr_rq_quantize(q->host, q->codec, q->cfg, q->cfg_bytes, &in->src,
                                    &out->dst, report);
    if (st < 0) return st;
    out->bits_per_weight = report->bits_per_weight;
    out->rel_rmse = report->rel_rmse;
    out->owns_data = 1;
    q->tensors++;
    q->weights += (uint64_t)in->src.ne[0] * (uint64_t)in->src.ne[1];
    q->tail_bytes += report->tail_bytes;
    return TSR_OK;
}

/* The vtable callbacks; `self` is the instance of tsr_rq_quantizer_create. */

static inline void tsr_rq_quantizer_destroy(void *self) {
    tsr_rq_quantizer *q = self;
    q->host->free(q->host->ctx, q);
}

/* tsr_rq_quantizer_quantize plus one INFO log line:
 * "<tensor> (layer <l>, <role>): <codec->describe>: <b> bits/weight, rel_rmse <e>". */
static inline tsr_status tsr_rq_quantizer_prepare(void *self, const tsr_weight_in *in,
                                                  tsr_weight_out *out) {
    tsr_rq_quantizer *q = self;
    tsr_rq_report rep;
    tsr_status st = tsr_rq_quantizer_quantize(q, in, out, &rep);
    if (st < 0) return st;
    char what[128];
    q->codec->describe(q->cfg, what, sizeof what);
    q->host->log(q->host->ctx, TSR_LOG_INFO, "%s (layer %d, %s): %s: %.3f bits/weight, "
                 "rel_rmse %.5f", in->src.name ? in->src.name : "?", (int)in->layer,
                 in->role ? in->role : "?", what, rep.bits_per_weight, rep.rel_rmse);
    return TSR_OK;
}

static inline void tsr_rq_quantizer_release(void *self, tsr_tensor *w) {
    tsr_rq_quantizer *q = self;
    tsr_rq_release(q->host, w);
}

static inline tsr_status tsr_rq_quantizer_matmul(void *self, float *y, const tsr_tensor *w,
                                                 const float *x, int64_t n) {
    tsr_rq_quantizer *q = self;
    return tsr_rq_matmul(q->host, q->codec, y, w, x, n);
}

static inline tsr_status tsr_rq_quantizer_dequantize_rows(void *self, float *y,
                                                          const tsr_tensor *w, int64_t row0,
                                                          int64_t n_rows) {
    tsr_rq_quantizer *q = self;
    return tsr_rq_dequantize_rows(q->host, q->codec, y, w, row0, n_rows);
}

/* The vtable entries but create and prepare, for a plugin that adds nothing to them. */
#define TSR_RQ_QUANTIZER_CALLBACKS                                                         \
    .destroy = tsr_rq_quantizer_destroy, .release = tsr_rq_quantizer_release,             \
    .matmul = tsr_rq_quantizer_matmul, .dequantize_rows = tsr_rq_quantizer_dequantize_rows

#endif /* TESSERA_SDK_RQ_H */
