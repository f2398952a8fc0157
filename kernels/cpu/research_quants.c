/* Kernels of the research quantizers (<tessera/kernels_research.h>). */
#include <tessera/kernels_research.h>

#include <math.h>
#include <pthread.h>
#include <string.h>

#include <tessera/kernels_cpu.h>

#include "internal.h"

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

/* Eight codes fill exactly `bits` bytes: one 64-bit word, shifted. */
static void unpack_words(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
    const uint64_t mask = (1u << bits) - 1;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const uint8_t *p = src + i / 8 * bits;
        uint64_t v = 0;
        for (int j = 0; j < bits; j++) v |= (uint64_t)p[j] << (8 * j);
        for (int k = 0; k < 8; k++) codes[i + k] = (uint8_t)((v >> (k * bits)) & mask);
    }
    for (; i < n; i++) {
        int64_t bit = i * bits;
        uint32_t v = src[bit >> 3];
        if ((bit & 7) + bits > 8) v |= (uint32_t)src[(bit >> 3) + 1] << 8;
        codes[i] = (uint8_t)((v >> (bit & 7)) & mask);
    }
}

#ifdef RQ_X86
/* 64 codes per step: vpermb puts each group of eight codes' `bits` bytes in a 64-bit lane of
 * its own, vpmultishiftqb takes code k from bit k * bits of the lane. The loads and stores are
 * masked to the stream, so nothing past it is touched. */
static uint8_t g_vbmi_perm[9][64], g_vbmi_shift[9][64];
static pthread_once_t g_vbmi_once = PTHREAD_ONCE_INIT;

static void vbmi_tables(void) {
    for (int bits = 1; bits <= 8; bits++)
        for (int g = 0; g < 8; g++)
            for (int j = 0; j < 8; j++) {
                g_vbmi_perm[bits][8 * g + j] = (uint8_t)(g * bits + (j < bits ? j : 0));
                g_vbmi_shift[bits][8 * g + j] = (uint8_t)(j * bits);
            }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void
unpack_vbmi(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
    pthread_once(&g_vbmi_once, vbmi_tables);
    const __m512i idx = _mm512_loadu_si512(g_vbmi_perm[bits]);
    const __m512i ctl = _mm512_loadu_si512(g_vbmi_shift[bits]);
    const __m512i mask = _mm512_set1_epi8((char)((1u << bits) - 1));
    for (int64_t i = 0; i < n; i += 64) {
        int64_t m = n - i < 64 ? n - i : 64;
        int64_t nbytes = (m * bits + 7) / 8;
        __mmask64 lm = nbytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << nbytes) - 1;
        __mmask64 sm = m == 64 ? ~(__mmask64)0 : ((__mmask64)1 << m) - 1;
        __m512i in = _mm512_maskz_loadu_epi8(lm, src + i / 8 * bits);
        __m512i v = _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(idx, in));
        _mm512_mask_storeu_epi8(codes + i, sm, _mm512_and_si512(v, mask));
    }
}
#endif

void tsr_rq_unpack(uint8_t *codes, const uint8_t *src, int64_t n, int bits) {
#ifdef RQ_X86
    if (tsr_cpu_avx512_vbmi()) {
        unpack_vbmi(codes, src, n, bits);
        return;
    }
#endif
    unpack_words(codes, src, n, bits);
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

void tsr_rq_act_quantize(int8_t *q, int32_t *gsum, float *d, const float *x, int64_t n_tok,
                         int64_t n, int64_t n_pad, int64_t group, int ith, int nth) {
    int64_t t0, t1;
    tsr_thread_slice(&t0, &t1, n_tok, 1, ith, nth);
    for (int64_t t = t0; t < t1; t++)
        tsr_rq_act_quantize_row(q + t * n_pad, gsum + t * (n_pad / group), d + t, x + t * n,
                                n, n_pad, group);
}

/* ---- matrices of a row codec ------------------------------------------------------------ */

typedef struct rq_row {
    uint8_t *row, *tail;
    size_t tail_bytes;
} rq_row;

static rq_row row_at(const tsr_rq_matrix *m, int64_t r) {
    rq_row out = {m->rows + (size_t)r * m->row_bytes, NULL, 0};
    if (m->tail_off) {
        out.tail = m->tails + m->tail_off[r];
        out.tail_bytes = m->tail_off[r + 1] - m->tail_off[r];
    }
    return out;
}

static const uint8_t *src_row(const void *src, size_t src_row_bytes, int64_t r) {
    return (const uint8_t *)src + (size_t)r * src_row_bytes;
}

void tsr_rq_matrix_tail_sizes(uint32_t *tail_len, const tsr_rq_matrix *m, const void *src,
                              int32_t src_dtype, size_t src_row_bytes, float *scratch, int ith,
                              int nth) {
    int64_t r0, r1;
    tsr_thread_slice(&r0, &r1, m->n_out, 1, ith, nth);
    for (int64_t r = r0; r < r1; r++) {
        tsr_row_to_f32(scratch, src_dtype, src_row(src, src_row_bytes, r), m->n_in);
        tail_len[r] = (uint32_t)m->codec->tail_bytes(m->cfg, scratch, m->n_in);
    }
}

void tsr_rq_matrix_quantize(const tsr_rq_matrix *m, double *err, double *norm, const void *src,
                            int32_t src_dtype, size_t src_row_bytes, float *scratch, int ith,
                            int nth) {
    int64_t n_in = m->n_in, r0, r1;
    tsr_thread_slice(&r0, &r1, m->n_out, 1, ith, nth);
    float *w = scratch, *back = scratch + n_in;
    for (int64_t r = r0; r < r1; r++) {
        tsr_row_to_f32(w, src_dtype, src_row(src, src_row_bytes, r), n_in);
        rq_row q = row_at(m, r);
        m->codec->quantize_row(m->cfg, q.row, q.tail, w, n_in);
        m->codec->dequantize_row(m->cfg, back, q.row, q.tail, q.tail_bytes, n_in);
        double e = 0, s = 0;
        for (int64_t i = 0; i < n_in; i++) {
            double dv = (double)w[i] - (double)back[i];
            e += dv * dv;
            s += (double)w[i] * (double)w[i];
        }
        err[r] = e;
        norm[r] = s;
    }
}

void tsr_rq_matrix_dequantize(float *y, const tsr_rq_matrix *m, int64_t row0, int64_t n_rows) {
    for (int64_t r = 0; r < n_rows; r++) {
        rq_row q = row_at(m, row0 + r);
        m->codec->dequantize_row(m->cfg, y + r * m->n_in, q.row, q.tail, q.tail_bytes, m->n_in);
    }
}

void tsr_rq_matrix_mul(float *y, const tsr_rq_matrix *m, const float *x, const tsr_rq_act *act,
                       int64_t n_tok, uint8_t *scratch, int ith, int nth) {
    int64_t n_in = m->n_in, n_out = m->n_out, r0, r1;
    tsr_thread_slice(&r0, &r1, n_out, 16, ith, nth);
    float *row = (float *)scratch;
    for (int64_t r = r0; r < r1; r++) {
        rq_row q = row_at(m, r);
        if (act) {
            m->codec->dot_q8(m->cfg, y + r, n_out, q.row, act, n_tok, n_in, scratch);
            continue;
        }
        m->codec->dequantize_row(m->cfg, row, q.row, q.tail, q.tail_bytes, n_in);
        for (int64_t t = 0; t < n_tok; t++)
            y[t * n_out + r] = tsr_dot_f32(row, x + t * n_in, n_in);
    }
}
