/* Kernels and the tensor driver of the research quantizers (<tessera/kernels_research.h>). */
#include <tessera/kernels_research.h>

#include <math.h>
#include <string.h>

#include <tessera/kernels_cpu.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RQ_X86 1
#endif

/* ---- bit streams ----------------------------------------------------------------------- */

size_t tsr_rq_packed_bytes(int64_t n, int bits) {
    return (size_t)((n * bits + 7) / 8);
}

void tsr_rq_pack(uint8_t *dst, const uint8_t *codes, int64_t n, int bits) {
    memset(dst, 0, tsr_rq_packed_bytes(n, bits));
    uint32_t mask = (1u << bits) - 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t bit = i * bits;
        uint32_t v = (codes[i] & mask) << (bit & 7);
        dst[bit >> 3] |= (uint8_t)v;
        if ((bit & 7) + bits > 8) dst[(bit >> 3) + 1] |= (uint8_t)(v >> 8);
    }
}

void tsr_rq_unpack(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
    uint32_t mask = (1u << bits) - 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t bit = i * bits;
        uint32_t v = src[bit >> 3];
        if ((bit & 7) + bits > 8) v |= (uint32_t)src[(bit >> 3) + 1] << 8;
        codes[i] = (uint8_t)((v >> (bit & 7)) & mask);
    }
}

/* ---- integer dot ----------------------------------------------------------------------- */

static int32_t dot_u8s8_scalar(const uint8_t *u, const int8_t *s, int64_t n) {
    int32_t sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (int32_t)u[i] * (int32_t)s[i];
    return sum;
}

#ifdef RQ_X86
__attribute__((target("avx2"))) static int32_t dot_u8s8_avx2(const uint8_t *u, const int8_t *s,
                                                               int64_t n) {
    __m256i acc = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(u + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i));
        /* u <= 127 and |s| <= 127 keep each 16-bit pair sum below 2^15. */
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h) + dot_u8s8_scalar(u + i, s + i, n - i);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni"))) static int32_t
dot_u8s8_vnni(const uint8_t *u, const int8_t *s, int64_t n) {
    __m512i acc = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(u + i), _mm512_loadu_si512(s + i));
    __m256i acc8 = _mm256_add_epi32(_mm512_castsi512_si256(acc),
                                    _mm512_extracti64x4_epi64(acc, 1));
    for (; i + 32 <= n; i += 32)
        acc8 = _mm256_dpbusd_epi32(acc8, _mm256_loadu_si256((const __m256i *)(u + i)),
                                   _mm256_loadu_si256((const __m256i *)(s + i)));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc8), _mm256_extracti128_si256(acc8, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h) + dot_u8s8_scalar(u + i, s + i, n - i);
}
#endif

int32_t tsr_rq_dot_u8s8(const uint8_t *u, const int8_t *s, int64_t n) {
#ifdef RQ_X86
    switch (tsr_cpu_level_get()) {
    case TSR_CPU_LEVEL_AVX512: return dot_u8s8_vnni(u, s, n);
    case TSR_CPU_LEVEL_AVX2: return dot_u8s8_avx2(u, s, n);
    default: break;
    }
#endif
    return dot_u8s8_scalar(u, s, n);
}

void tsr_rq_act_quantize_row(int8_t *q, int32_t *gsum, float *d, const float *x, int64_t n,
                             int64_t n_pad, int64_t group) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = nearbyintf(x[i] * id);
        q[i] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : (int)v);
    }
    memset(q + n, 0, (size_t)(n_pad - n));
    for (int64_t g = 0; g < n_pad / group; g++) {
        int32_t s = 0;
        for (int64_t i = 0; i < group; i++) s += q[g * group + i];
        gsum[g] = s;
    }
}

/* ---- the tensor block ------------------------------------------------------------------ */

#define RQ_MAGIC 0x51525354u /* "TSRQ" */
#define RQ_ALIGN 64

typedef struct rq_header {
    uint32_t magic;
    int32_t dtype;
    int64_t n_in, n_out;
    uint64_t row_bytes;
    uint64_t cfg_off, rows_off, ptr_off, tail_off, total; /* ptr_off = 0: no tails */
} rq_header;

static uint64_t align_up(uint64_t x) {
    return (x + RQ_ALIGN - 1) & ~(uint64_t)(RQ_ALIGN - 1);
}

static const rq_header *header_of(const tsr_rq_codec *codec, const tsr_tensor *w) {
    const rq_header *h = w->data;
    if (!h || w->dtype != codec->dtype || h->magic != RQ_MAGIC || h->dtype != codec->dtype)
        return NULL;
    return h;
}

const void *tsr_rq_config(const tsr_rq_codec *codec, const tsr_tensor *w) {
    const rq_header *h = header_of(codec, w);
    return h ? (const uint8_t *)h + h->cfg_off : NULL;
}

typedef struct rq_row {
    const uint8_t *row, *tail;
    size_t tail_bytes;
} rq_row;

static rq_row row_at(const rq_header *h, int64_t r) {
    const uint8_t *base = (const uint8_t *)h;
    rq_row out = {base + h->rows_off + (uint64_t)r * h->row_bytes, NULL, 0};
    if (h->ptr_off) {
        const uint32_t *ptr = (const uint32_t *)(base + h->ptr_off);
        out.tail = base + h->tail_off + ptr[r];
        out.tail_bytes = ptr[r + 1] - ptr[r];
    }
    return out;
}

static const char *src_type_name(int32_t dtype) {
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

/* ---- quantization ---------------------------------------------------------------------- */

typedef struct quant_job {
    const tsr_rq_codec *codec;
    const void *cfg;
    const tsr_tensor *src;
    float *scratch;     /* (nth, 2, n_in) */
    uint8_t *block;     /* NULL in the sizing pass */
    const rq_header *h;
    uint32_t *tail_len; /* (n_out): sizing pass output */
    double *err, *norm; /* (n_out) */
} quant_job;

static void quant_task(void *arg, int ith, int nth) {
    quant_job *j = arg;
    int64_t n_in = j->src->ne[0], n_out = j->src->ne[1], r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 1, ith, nth);
    float *w = j->scratch + (size_t)ith * 2 * (size_t)n_in, *back = w + n_in;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *src_row = (const uint8_t *)j->src->data + (size_t)r * j->src->row_bytes;
        tsr_row_to_f32(w, j->src->dtype, src_row, n_in);
        if (!j->block) {
            j->tail_len[r] = (uint32_t)j->codec->tail_bytes(j->cfg, w, n_in);
            continue;
        }
        rq_row q = row_at(j->h, r);
        j->codec->quantize_row(j->cfg, (uint8_t *)q.row, (uint8_t *)q.tail, w, n_in);
        j->codec->dequantize_row(j->cfg, back, q.row, q.tail, q.tail_bytes, n_in);
        double e = 0, s = 0;
        for (int64_t i = 0; i < n_in; i++) {
            double dv = (double)w[i] - (double)back[i];
            e += dv * dv;
            s += (double)w[i] * (double)w[i];
        }
        j->err[r] = e;
        j->norm[r] = s;
    }
}

static void *alloc_or_fail(const tsr_host *host, size_t bytes, const char *what) {
    void *p = host->alloc(host->ctx, bytes ? bytes : 1, RQ_ALIGN);
    if (!p) host->set_error(host->ctx, "%s: out of memory for %zu bytes", what, bytes);
    return p;
}

tsr_status tsr_rq_quantize(const tsr_host *host, const tsr_rq_codec *codec, const void *cfg,
                           size_t cfg_bytes, const tsr_tensor *src, tsr_tensor *dst,
                           tsr_rq_report *report) {
    const char *name = src->name ? src->name : "(unnamed tensor)";
    if (src->dtype != TSR_DTYPE_F32 && src->dtype != TSR_DTYPE_F16 &&
        src->dtype != TSR_DTYPE_BF16) {
        host->set_error(host->ctx,
                        "%s: type %s (%d): quantizer '%s' converts F32, F16 and BF16 weights "
                        "only; use quantizer 'gguf' for a file that is already quantized",
                        name, src_type_name(src->dtype), (int)src->dtype, codec->name);
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
    quant_job j = {codec, cfg, src, NULL, NULL, NULL, NULL, NULL, NULL};
    size_t n_rows = (size_t)n_out;
    tsr_status st = TSR_E_NOMEM;
    uint8_t *block = NULL;
    j.scratch = alloc_or_fail(host, (size_t)nth * 2 * (size_t)n_in * sizeof(float), name);
    j.tail_len = alloc_or_fail(host, n_rows * sizeof(uint32_t), name);
    j.err = alloc_or_fail(host, n_rows * sizeof(double), name);
    j.norm = alloc_or_fail(host, n_rows * sizeof(double), name);
    if (!j.scratch || !j.tail_len || !j.err || !j.norm) goto done;

    uint64_t tail_total = 0;
    if (codec->tail_bytes) {
        host->parallel_for(host->ctx, quant_task, &j);
        for (int64_t r = 0; r < n_out; r++) tail_total += j.tail_len[r];
        if (tail_total > UINT32_MAX) {
            host->set_error(host->ctx, "%s: quantizer '%s': %llu bytes of outliers exceed 4 GiB",
                            name, codec->name, (unsigned long long)tail_total);
            st = TSR_E_RANGE;
            goto done;
        }
    }
    rq_header h = {.magic = RQ_MAGIC, .dtype = codec->dtype, .n_in = n_in, .n_out = n_out,
                   .row_bytes = codec->row_bytes(cfg, n_in)};
    h.cfg_off = align_up(sizeof h);
    h.rows_off = align_up(h.cfg_off + cfg_bytes);
    uint64_t end = h.rows_off + h.row_bytes * n_rows;
    if (codec->tail_bytes) {
        h.ptr_off = align_up(end);
        h.tail_off = h.ptr_off + (n_rows + 1) * sizeof(uint32_t);
        end = h.tail_off + tail_total;
    }
    h.total = end;
    if (!(block = alloc_or_fail(host, (size_t)h.total, name))) goto done;
    memset(block, 0, (size_t)h.total);
    memcpy(block, &h, sizeof h);
    memcpy(block + h.cfg_off, cfg, cfg_bytes);
    if (codec->tail_bytes) {
        uint32_t *ptr = (uint32_t *)(block + h.ptr_off);
        ptr[0] = 0;
        for (int64_t r = 0; r < n_out; r++) ptr[r + 1] = ptr[r] + j.tail_len[r];
    }
    j.block = block;
    j.h = (const rq_header *)block;
    host->parallel_for(host->ctx, quant_task, &j);

    double e = 0, s = 0;
    for (int64_t r = 0; r < n_out; r++) {
        e += j.err[r];
        s += j.norm[r];
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

void tsr_rq_release(const tsr_host *host, tsr_tensor *w) {
    host->free(host->ctx, w->data);
    w->data = NULL;
}

tsr_status tsr_rq_dequantize_rows(const tsr_host *host, const tsr_rq_codec *codec, float *y,
                                  const tsr_tensor *w, int64_t row0, int64_t n_rows) {
    const rq_header *h = header_of(codec, w);
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
    const void *cfg = (const uint8_t *)h + h->cfg_off;
    for (int64_t r = 0; r < n_rows; r++) {
        rq_row q = row_at(h, row0 + r);
        codec->dequantize_row(cfg, y + r * h->n_in, q.row, q.tail, q.tail_bytes, h->n_in);
    }
    return TSR_OK;
}

/* ---- products -------------------------------------------------------------------------- */

typedef struct mm_job {
    const tsr_rq_codec *codec;
    const rq_header *h;
    const void *cfg;
    float *y;          // (n_tok, n_out)
    const float *x;    // (n_tok, n_in)
    int64_t n_tok;
    uint8_t *scratch;  // (nth, scratch_bytes): a dequantized row, or the unpacked codes
    size_t scratch_bytes;
    int8_t *q;         // int8 path: (n_tok, n_pad)
    int32_t *gsum;     // (n_tok, n_pad / group)
    float *d;          // (n_tok)
    int64_t n_pad, group;
} mm_job;

static void act_task(void *arg, int ith, int nth) {
    mm_job *j = arg;
    int64_t t0, t1;
    tsr_thread_slice(&t0, &t1, j->n_tok, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++)
        tsr_rq_act_quantize_row(j->q + t * j->n_pad, j->gsum + t * (j->n_pad / j->group),
                                j->d + t, j->x + t * j->h->n_in, j->h->n_in, j->n_pad,
                                j->group);
}

static void mm_task(void *arg, int ith, int nth) {
    mm_job *j = arg;
    int64_t n_in = j->h->n_in, n_out = j->h->n_out, r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 16, ith, nth);
    tsr_rq_act act = {j->q, j->gsum, j->d, j->n_pad, j->group};
    uint8_t *scratch = j->scratch + (size_t)ith * j->scratch_bytes;
    float *row = (float *)scratch;
    for (int64_t r = r0; r < r1; r++) {
        rq_row q = row_at(j->h, r);
        if (j->group > 0) {
            j->codec->dot_q8(j->cfg, j->y + r, n_out, q.row, &act, j->n_tok, n_in, scratch);
            continue;
        }
        j->codec->dequantize_row(j->cfg, row, q.row, q.tail, q.tail_bytes, n_in);
        for (int64_t t = 0; t < j->n_tok; t++)
            j->y[t * n_out + r] = tsr_dot_f32(row, j->x + t * n_in, n_in);
    }
}

tsr_status tsr_rq_matmul(const tsr_host *host, const tsr_rq_codec *codec, float *y,
                         const tsr_tensor *w, const float *x, int64_t n) {
    const rq_header *h = header_of(codec, w);
    if (!h) {
        host->set_error(host->ctx, "quantizer '%s' cannot multiply tensors of dtype %d",
                        codec->name, (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    if (n <= 0) return TSR_OK;
    mm_job j = {.codec = codec, .h = h, .cfg = (const uint8_t *)h + h->cfg_off, .y = y, .x = x,
                .n_tok = n};
    const char *name = w->name ? w->name : codec->name;
    j.group = codec->act_group ? codec->act_group(j.cfg) : 0;
    int nth = host->n_threads(host->ctx);
    size_t nq = 0, ng = 0;
    if (j.group > 0) {
        j.n_pad = (h->n_in + j.group - 1) / j.group * j.group;
        nq = (size_t)(n * j.n_pad);
        ng = (size_t)(n * (j.n_pad / j.group));
    }
    j.scratch_bytes = (size_t)align_up(j.group > 0 ? (uint64_t)j.n_pad
                                                   : (uint64_t)h->n_in * sizeof(float));
    /* One block: per-thread scratch, then the int8 activations, group sums and scales. */
    size_t off_q = j.scratch_bytes * (size_t)nth, off_g = off_q + (size_t)align_up(nq);
    size_t off_d = off_g + ng * sizeof(int32_t);
    uint8_t *buf = alloc_or_fail(host, off_d + (size_t)n * sizeof(float), name);
    if (!buf) return TSR_E_NOMEM;
    j.scratch = buf;
    if (j.group > 0) {
        j.q = (int8_t *)(buf + off_q);
        j.gsum = (int32_t *)(buf + off_g);
        j.d = (float *)(buf + off_d);
        host->parallel_for(host->ctx, act_task, &j);
    }
    host->parallel_for(host->ctx, mm_task, &j);
    host->free(host->ctx, buf);
    return TSR_OK;
}

/* ---- the quantizer plugin glue --------------------------------------------------------- */

tsr_status tsr_rq_check_group(const tsr_host *host, int64_t group, int64_t multiple) {
    if (group % multiple == 0) return TSR_OK;
    host->set_error(host->ctx, "group: %lld is not a multiple of %lld", (long long)group,
                    (long long)multiple);
    return TSR_E_INVALID;
}

tsr_status tsr_rq_quantizer_create(const tsr_host *host, const tsr_rq_codec *codec,
                                   const void *cfg, size_t cfg_bytes, void **out) {
    /* One block: the instance, then its copy of the configuration. */
    size_t cfg_off = (size_t)align_up(sizeof(tsr_rq_quantizer));
    tsr_rq_quantizer *q = alloc_or_fail(host, cfg_off + cfg_bytes, codec->name);
    if (!q) return TSR_E_NOMEM;
    memcpy((uint8_t *)q + cfg_off, cfg, cfg_bytes);
    *q = (tsr_rq_quantizer){.host = host, .codec = codec, .cfg = (uint8_t *)q + cfg_off,
                            .cfg_bytes = cfg_bytes};
    *out = q;
    return TSR_OK;
}

void tsr_rq_quantizer_destroy(void *self) {
    tsr_rq_quantizer *q = self;
    q->host->free(q->host->ctx, q);
}

tsr_status tsr_rq_quantizer_quantize(tsr_rq_quantizer *q, const tsr_weight_in *in,
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

tsr_status tsr_rq_quantizer_prepare(void *self, const tsr_weight_in *in, tsr_weight_out *out) {
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

void tsr_rq_quantizer_release(void *self, tsr_tensor *w) {
    tsr_rq_quantizer *q = self;
    tsr_rq_release(q->host, w);
}

tsr_status tsr_rq_quantizer_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                                   int64_t n) {
    tsr_rq_quantizer *q = self;
    return tsr_rq_matmul(q->host, q->codec, y, w, x, n);
}

tsr_status tsr_rq_quantizer_dequantize_rows(void *self, float *y, const tsr_tensor *w,
                                            int64_t row0, int64_t n_rows) {
    tsr_rq_quantizer *q = self;
    return tsr_rq_dequantize_rows(q->host, q->codec, y, w, row0, n_rows);
}
