/* Quantized products with AVX-512 VNNI. The tiles are quants_x86.h's with 256-bit vpdpbusd
 * (four u8 x s8 products per lane summed in 32 bits, without vpmaddubsw's saturation); Q4_0,
 * Q8_0, Q4_K and Q6_K also have whole-slice kernels, which are what decode and prefill run:
 *
 * - Q4_0, Q8_0: one vpdpbusd gives a block's eight lanes (quants.h's rule) with the weights
 *   made unsigned (Q4_0 nibbles as stored, Q8_0 + 128) and the offset taken back by starting
 *   from the activation block's lane sums times -offset, prepared once per call; the scales
 *   dw * dx of sixteen blocks come from one 16-lane product; each block is one fma into the
 *   (row, token)'s eight lanes. Prefill holds 4 rows x 4 tokens of accumulators.
 * - Q4_K, Q6_K: a super-block in four vectors of 64 quants; vpmaddubsw pairs, vpdpwssd by the
 *   group scales, and the horizontal sums of eight super-blocks done together. Decode takes
 *   a row pair (tsr_stream_row_pairs), the two rows' f32 lanes in one register.
 *
 * Integer parts are exact whatever the order; the f32 parts are those of quants.h in the same
 * order, so the values are the scalar reference's bit for bit. */
#define TSR_QX_DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "quants_x86.h"

#include <stdlib.h>

/* ---------------------------------------------------------------------------------------- */
/* Q4_0, Q8_0                                                                                */

/* Two activation blocks, two cache lines: their quants, then the offset's correction per
 * lane, -off * (the sum of the lane's four quants), which is vpdpbusd's starting value. In
 * pairs so that decode takes two blocks per 512-bit instruction. */
typedef struct qa_xpair {
    int8_t q[2][TSR_QK];
    int32_t nc[2][8];
} qa_xpair;

#define QA_G 16 /* blocks per step: their scales dw * dx are made by one 16-lane product */
#define QA_ROWS 4     /* prefill tiles: QA_ROWS x QA_TOK accumulators */
#define QA_TOK 4
#define QA_DEC_ROWS 2 /* decode: rows read side by side, from the two halves of the slice */
/* Activations prepared at a time (per thread). */
#define QA_CHUNK_BYTES (4 * 1024 * 1024)

/* Weights are made unsigned: Q4_0 nibbles as stored (w + 8), Q8_0 quants + 128. */
TSR_INLINE int qa_offset_shift(int qm) {
    return qm == TSR_QM_Q4_0 ? 3 : 7;
}

TSR_INLINE __m256i qa_unsigned_quants(int qm, const char *block) {
    if (qm == TSR_QM_Q4_0) return qx_nibbles(((const tsr_block_q4_0 *)block)->qs);
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)((const tsr_block_q8_0 *)block)->q),
                            _mm256_set1_epi8((char)0x80));
}

/* The unsigned quants of two consecutive blocks, the first in the low half. */
TSR_INLINE __m512i qa_unsigned_quants2(int qm, const char *block) {
    if (qm == TSR_QM_Q4_0) {
        const tsr_block_q4_0 *p = (const tsr_block_q4_0 *)block;
        __m256i a = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p[0].qs)),
            _mm_loadu_si128((const __m128i *)p[1].qs), 1);
        /* 128-bit lanes: block 0's nibbles twice, block 1's twice; high nibbles from odd ones */
        __m512i z = _mm512_shuffle_i64x2(_mm512_castsi256_si512(a), _mm512_castsi256_si512(a),
                                         _MM_SHUFFLE(1, 1, 0, 0));
        const __m512i shift = _mm512_setr_epi64(0, 0, 0x0004000400040004ll, 0x0004000400040004ll,
                                                0, 0, 0x0004000400040004ll, 0x0004000400040004ll);
        return _mm512_and_si512(_mm512_srlv_epi16(z, shift), _mm512_set1_epi8(0x0f));
    }
    const tsr_block_q8_0 *p = (const tsr_block_q8_0 *)block;
    __m512i q = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p[0].q)),
        _mm256_loadu_si256((const __m256i *)p[1].q), 1);
    return _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
}

/* Both block types start with their fp16 scale. */
TSR_INLINE float qa_scale(const char *block) {
    uint16_t h;
    memcpy(&h, block, sizeof h);
    return _cvtsh_ss(h);
}

/* The fp16 scales of the first n (<= 16) of the blocks at p as f32, zero past n. The scale
 * of block j is 16-bit word 9j (Q4_0) or 17j (Q8_0) from p: whole chunks pick the sixteen
 * words out of the 64-byte lines with word permutes (a gather, or a scalar load per block,
 * costs more than the product it feeds); a short chunk, which may end the tensor, goes
 * block by block. */
TSR_INLINE __m512 qa_scales16(int qm, const char *p, int n) {
    if (n < QA_G) {
        const size_t bytes = tsr_qm_block_bytes(qm);
        float d[QA_G] = {0};
        for (int j = 0; j < n; j++) d[j] = qa_scale(p + j * bytes);
        return _mm512_loadu_ps(d);
    }
    __m512i h = _mm512_setzero_si512();
    if (qm == TSR_QM_Q4_0) { /* blocks 8g..8g+3 within 128 bytes from 144 g */
        static const uint16_t at[32] = {0, 9, 18, 27, 36, 45, 54, 63};
        const __m512i idx = _mm512_loadu_si512(at);
        for (int g = 0; g < 2; g++) {
            const char *q = p + 144 * g;
            __m512i v = _mm512_permutex2var_epi16(_mm512_loadu_si512(q), idx,
                                                  _mm512_loadu_si512(q + 64));
            h = _mm512_mask_expand_epi64(h, (__mmask8)(3 << (2 * g)), v);
        }
    } else { /* blocks 4g..4g+3 at words 68g + 17i, within the 128 bytes from 136 g */
        static const uint16_t at[32] = {0, 17, 34, 51};
        const __m512i idx = _mm512_loadu_si512(at);
        for (int g = 0; g < 4; g++) {
            const char *q = p + 136 * g;
            __m512i v = _mm512_permutex2var_epi16(_mm512_loadu_si512(q), idx,
                                                  _mm512_loadu_si512(q + 64));
            h = _mm512_mask_expand_epi64(h, (__mmask8)(1 << g), v);
        }
    }
    return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
}

/* Tokens [0, n_tok) of x as xp[t * nbp / 2 + b / 2] and their scales dx[t * nbp + b], the
 * scales of blocks nb..nbp-1 zero (nbp is even). */
static void qa_pack_x(qa_xpair *xp, float *dx, const void *x, size_t x_stride, int64_t nb,
                      int64_t nbp, int64_t n_tok, int shift) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_0 *src = (const tsr_block_q8_0 *)((const char *)x + t * x_stride);
        qa_xpair *o = xp + t * nbp / 2;
        for (int64_t b = 0; b < nb; b++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)src[b].q);
            __m256i sum4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, q);
            _mm256_store_si256((__m256i *)o[b / 2].q[b % 2], q);
            _mm256_store_si256((__m256i *)o[b / 2].nc[b % 2],
                               _mm256_sub_epi32(_mm256_setzero_si256(),
                                                _mm256_slli_epi32(sum4, shift)));
            dx[t * nbp + b] = _cvtsh_ss(src[b].d);
        }
        for (int64_t b = nb; b < nbp; b++) dx[t * nbp + b] = 0.0f;
    }
}

/* The 8 lanes of quants.h's rule, as f32, for unsigned weight quants u and activation block
 * b of the pairs xp. */
TSR_INLINE __m256 qa_lanes(__m256i u, const qa_xpair *xp, int64_t b) {
    const qa_xpair *a = &xp[b / 2];
    return _mm256_cvtepi32_ps(
        _mm256_dpbusd_epi32(_mm256_load_si256((const __m256i *)a->nc[b % 2]), u,
                            _mm256_load_si256((const __m256i *)a->q[b % 2])));
}

/* Decode: QA_DEC_ROWS rows of one token, w_stride apart, their weights read once, straight
 * from the file, two blocks per vpdpbusd. The rows' fma chains are independent, which hides
 * the fma latency of each; the caller makes each row the next of a sequential stream. */
static void qa_rows_1tok(int qm, float *y, const char *w, size_t w_stride, int nr,
                         const qa_xpair *xp, const float *dx, int64_t nb) {
    const size_t bytes = tsr_qm_block_bytes(qm);
    const char *row[QA_DEC_ROWS];
    for (int r = 0; r < QA_DEC_ROWS; r++) row[r] = w + (r < nr ? r : nr - 1) * w_stride;
    __m256 acc[QA_DEC_ROWS];
    for (int r = 0; r < QA_DEC_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += QA_G) {
        const int n = nb - b0 < QA_G ? (int)(nb - b0) : QA_G;
        float sc[QA_DEC_ROWS][QA_G] __attribute__((aligned(64)));
        for (int r = 0; r < QA_DEC_ROWS; r++) {
            _mm512_store_ps(sc[r], _mm512_mul_ps(qa_scales16(qm, row[r] + b0 * bytes, n),
                                                 _mm512_loadu_ps(dx + b0)));
        }
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const qa_xpair *a = &xp[(b0 + j) / 2];
            const __m512i nc = _mm512_load_si512(a->nc), q = _mm512_load_si512(a->q);
            for (int r = 0; r < QA_DEC_ROWS; r++) {
                __m512i u = qa_unsigned_quants2(qm, row[r] + (b0 + j) * bytes);
                __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, u, q));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc[r][j]), _mm512_castps512_ps256(f),
                                         acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc[r][j + 1]),
                                         _mm512_extractf32x8_ps(f, 1), acc[r]);
            }
        }
        for (; j < n; j++)
            for (int r = 0; r < QA_DEC_ROWS; r++) {
                __m256i u = qa_unsigned_quants(qm, row[r] + (b0 + j) * bytes);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc[r][j]), qa_lanes(u, xp, b0 + j),
                                         acc[r]);
            }
    }
    for (int r = 0; r < nr; r++) y[r] = tsr_x86_hsum8(acc[r]);
}

/* tsr_row_pair_fn's of the two types, for one token's prepared activations. */
typedef struct qa_token {
    const qa_xpair *xp;
    const float *dx;
    int64_t nb;
} qa_token;

static void qa_pair_q4_0(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    const qa_token *t = ctx;
    qa_rows_1tok(TSR_QM_Q4_0, v, w, partner, n_r, t->xp, t->dx, t->nb);
}

static void qa_pair_q8_0(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    const qa_token *t = ctx;
    qa_rows_1tok(TSR_QM_Q8_0, v, w, partner, n_r, t->xp, t->dx, t->nb);
}

/* Prefill: QA_ROWS rows unpacked once (u, dw), then QA_TOK tokens at a time: each weight
 * vector serves four tokens from a register, each activation block four rows. Missing rows
 * or tokens of a short tile repeat the last one and are not stored. */
static void qa_rows_toks(float *y, int64_t ldy, const __m256i *u, const float *dw, int nr,
                         const qa_xpair *xp, const float *dx, int64_t nb, int64_t nbp,
                         int nt) {
    for (int t0 = 0; t0 < nt; t0 += QA_TOK) {
        const int ntt = nt - t0 < QA_TOK ? nt - t0 : QA_TOK;
        int64_t tok[QA_TOK], rw[QA_ROWS];
        for (int t = 0; t < QA_TOK; t++) tok[t] = t0 + (t < ntt ? t : ntt - 1);
        for (int r = 0; r < QA_ROWS; r++) rw[r] = r < nr ? r : nr - 1;
        __m256 acc[QA_ROWS][QA_TOK];
        for (int r = 0; r < QA_ROWS; r++)
            for (int t = 0; t < QA_TOK; t++) acc[r][t] = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < nb; b0 += QA_G) {
            const int n = nb - b0 < QA_G ? (int)(nb - b0) : QA_G;
            float sc[QA_ROWS][QA_TOK][QA_G] __attribute__((aligned(64)));
            for (int r = 0; r < QA_ROWS; r++)
                for (int t = 0; t < QA_TOK; t++) {
                    __m512 a = _mm512_load_ps(dw + rw[r] * nbp + b0);
                    _mm512_store_ps(sc[r][t],
                                    _mm512_mul_ps(a, _mm512_load_ps(dx + tok[t] * nbp + b0)));
                }
            for (int j = 0; j < n; j++) {
                __m256i uw[QA_ROWS];
                for (int r = 0; r < QA_ROWS; r++) uw[r] = u[rw[r] * nbp + b0 + j];
                for (int t = 0; t < QA_TOK; t++) {
                    const qa_xpair *xt = xp + tok[t] * nbp / 2;
                    for (int r = 0; r < QA_ROWS; r++)
                        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(sc[r][t][j]),
                                                    qa_lanes(uw[r], xt, b0 + j), acc[r][t]);
                }
            }
        }
        for (int t = 0; t < ntt; t++)
            for (int r = 0; r < nr; r++) y[(t0 + t) * ldy + r] = tsr_x86_hsum8(acc[r][t]);
    }
}

static int qa_mm(int qm, float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                 size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    const int64_t nb = n_in / TSR_QK, nbp = (nb + QA_G - 1) / QA_G * QA_G;
    const size_t bytes = tsr_qm_block_bytes(qm);
    const size_t per_tok = (size_t)nbp * (sizeof(qa_xpair) / 2 + sizeof(float));
    int64_t tc = (int64_t)(QA_CHUNK_BYTES / (per_tok ? per_tok : 1));
    tc = tc < QA_TOK ? QA_TOK : tc;
    tc = tc < n_tok ? tc : n_tok;
    const int decode = n_tok < QA_TOK;
    /* xp, dx for tc tokens; for prefill also u, dw of QA_ROWS rows */
    size_t xp_bytes = (size_t)(tc * nbp / 2) * sizeof(qa_xpair);
    size_t dx_bytes = (size_t)(tc * nbp) * sizeof(float);
    size_t u_bytes = decode ? 0 : (size_t)(QA_ROWS * nbp) * sizeof(__m256i);
    size_t dw_bytes = decode ? 0 : (size_t)(QA_ROWS * nbp) * sizeof(float);
    char *mem = aligned_alloc(64, xp_bytes + dx_bytes + u_bytes + dw_bytes + 64);
    if (!mem) return -1;
    qa_xpair *xp = (qa_xpair *)mem;
    float *dx = (float *)(mem + xp_bytes);
    __m256i *u = (__m256i *)(mem + xp_bytes + dx_bytes);
    float *dw = (float *)(mem + xp_bytes + dx_bytes + u_bytes);
    for (int64_t t0 = 0; t0 < n_tok; t0 += tc) {
        const int64_t nt = n_tok - t0 < tc ? n_tok - t0 : tc;
        qa_pack_x(xp, dx, (const char *)x + t0 * x_stride, x_stride, nb, nbp, nt,
                  qa_offset_shift(qm));
        if (decode) {
            for (int64_t t = 0; t < nt; t++) {
                qa_token tok = {xp + t * nbp / 2, dx + t * nbp, nb};
                tsr_stream_row_pairs(qm == TSR_QM_Q4_0 ? qa_pair_q4_0 : qa_pair_q8_0, &tok,
                                     y + (t0 + t) * ldy, w, w_stride, 0, n_rows);
            }
            continue;
        }
        for (int64_t r0 = 0; r0 < n_rows; r0 += QA_ROWS) {
            const int nr = n_rows - r0 < QA_ROWS ? (int)(n_rows - r0) : QA_ROWS;
            const char *wr = (const char *)w + r0 * w_stride;
            for (int r = 0; r < nr; r++) {
                for (int64_t b = 0; b < nb; b++) {
                    const char *blk = wr + r * w_stride + b * bytes;
                    u[r * nbp + b] = qa_unsigned_quants(qm, blk);
                    dw[r * nbp + b] = qa_scale(blk);
                }
                for (int64_t b = nb; b < nbp; b++) dw[r * nbp + b] = 0.0f;
            }
            qa_rows_toks(y + t0 * ldy + r0, ldy, u, dw, nr, xp, dx, nb, nbp, (int)nt);
        }
    }
    free(mem);
    return 0;
}

static int qa_mm_q4_0(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qa_mm(TSR_QM_Q4_0, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

static int qa_mm_q8_0(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qa_mm(TSR_QM_Q8_0, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

/* ---------------------------------------------------------------------------------------- */
/* Q4_K, Q6_K                                                                                */

/* The constants of the super-block loads, built once per call: GCC would otherwise build
 * them again for every super-block. */
typedef struct qb_consts {
    __m512i m4, m30, spread[4], q6_sh[2];
} qb_consts;

/* Word a of the scales to words 0-15, word b to words 16-31. */
static __m512i qb_spread_index(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
}

static void qb_consts_init(int qm, qb_consts *c) {
    c->m4 = _mm512_set1_epi8(0x0f);
    const long long w4 = 0x0001000100010001ll; /* a word in the four words of a qword */
    for (int i = 0; i < 4; i++) {
        if (qm == TSR_QM_Q4_K) /* vector i: groups (0, 2), (1, 3), (4, 6), (5, 7) */
            c->spread[i] = qb_spread_index(i / 2 * 4 + i % 2, i / 2 * 4 + i % 2 + 2);
        else /* Q6_K, vector i: groups 4i .. 4i + 3, eight words each */
            c->spread[i] = _mm512_setr_epi64(4 * i * w4, 4 * i * w4, (4 * i + 1) * w4,
                                             (4 * i + 1) * w4, (4 * i + 2) * w4,
                                             (4 * i + 2) * w4, (4 * i + 3) * w4,
                                             (4 * i + 3) * w4);
    }
    /* Q6_K: quants 64 s .. of a half use qh bits 4s (low 256 bits) and 4s + 2 (high ones),
     * moved to bits 4-5 by shifting words left by 4, 2 (s = 0) or right by 0, 2 (s = 1) */
    c->q6_sh[0] = qb_spread_index(4, 2);
    c->q6_sh[1] = qb_spread_index(0, 2);
    c->m30 = _mm512_set1_epi8(0x30);
}

/* A super-block in registers: u[i] 64 unsigned quants in the order of the activations
 * vector i (see qb_pack_x), sc[i] the scale of each of their 32 pairs, ms (Q4_K) the mins as
 * 16-bit weights of the 16 bsums. */
typedef struct qb_sb {
    __m512i u[4], sc[4];
    __m256i ms;
} qb_sb;

TSR_INLINE void qb_quants_q4_k(const tsr_block_q4_k *p, const qb_consts *c, __m512i u[4]) {
    /* qs[64 h ..]: low nibbles are groups 4h and 4h + 2, high ones 4h + 1 and 4h + 3 */
    for (int h = 0; h < 2; h++) {
        __m512i q = _mm512_loadu_si512(p->qs + 64 * h);
        u[2 * h] = _mm512_and_si512(q, c->m4);
        u[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), c->m4);
    }
}

TSR_INLINE void qb_load_q4_k(const tsr_block_q4_k *p, const qb_consts *c, qb_sb *k) {
    qb_quants_q4_k(p, c, k->u);
    /* the eight 6-bit scales and mins (tsr_qk_scale_min), four bytes at a time */
    uint32_t s0, s1, s2;
    memcpy(&s0, p->scales, 4);
    memcpy(&s1, p->scales + 4, 4);
    memcpy(&s2, p->scales + 8, 4);
    const uint32_t m6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, hi2 = 0x03030303u;
    uint64_t sc = (uint64_t)(s0 & m6) |
                  (uint64_t)((s2 & lo4) | (((s0 >> 6) & hi2) << 4)) << 32;
    uint64_t mn = (uint64_t)(s1 & m6) |
                  (uint64_t)(((s2 >> 4) & lo4) | (((s1 >> 6) & hi2) << 4)) << 32;
    __m512i scw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)sc)));
    for (int i = 0; i < 4; i++) k->sc[i] = _mm512_permutexvar_epi16(c->spread[i], scw);
    __m128i mw = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((int64_t)mn));
    k->ms = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi16(mw, mw)),
                                    _mm_unpackhi_epi16(mw, mw), 1);
}

TSR_INLINE void qb_quants_q6_k(const tsr_block_q6_k *p, const qb_consts *c, __m512i u[4]) {
    for (int h = 0; h < 2; h++) {
        __m512i l = _mm512_loadu_si512(p->ql + 64 * h);
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(p->qh + 32 * h)));
        for (int s = 0; s < 2; s++) { /* quants 128 h + 64 s .. */
            /* the two high bits moved straight to bits 4-5 (left for s = 0, right for s = 1),
             * merged under a mask: (lo & 0x0f) | (hi & 0x30) */
            __m512i hi =
                s ? _mm512_srlv_epi16(qh, c->q6_sh[1]) : _mm512_sllv_epi16(qh, c->q6_sh[0]);
            __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(l, 4) : l, c->m4);
            u[2 * h + s] = _mm512_ternarylogic_epi32(lo, hi, c->m30, 0xf8);
        }
    }
}

TSR_INLINE void qb_load_q6_k(const tsr_block_q6_k *p, const qb_consts *c, qb_sb *k) {
    k->ms = _mm256_setzero_si256(); /* Q6_K has no mins */
    qb_quants_q6_k(p, c, k->u);
    __m256i scw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p->scales));
    for (int i = 0; i < 4; i++) /* vector i: groups 4i .. 4i + 3, eight pairs each */
        k->sc[i] = _mm512_permutexvar_epi16(c->spread[i], _mm512_castsi256_si512(scw));
}

/* Q4_K activations: the quants of each super-block reordered to match qb_load_q4_k's vectors
 * (quants 0-31 and 64-95, 32-63 and 96-127, then the same for the second half); Q6_K's are in
 * order already and are read in place. */
static void qb_pack_x(int8_t *xq, const void *x, size_t x_stride, int64_t nsb, int64_t n_tok) {
    for (int64_t t = 0; t < n_tok; t++) {
        const tsr_block_q8_k *xb = (const tsr_block_q8_k *)((const char *)x + t * x_stride);
        for (int64_t b = 0; b < nsb; b++) {
            int8_t *o = xq + (t * nsb + b) * TSR_QK_K;
            for (int h = 0; h < 2; h++) {
                __m512i a = _mm512_loadu_si512(xb[b].qs + 128 * h);
                __m512i c = _mm512_loadu_si512(xb[b].qs + 128 * h + 64);
                _mm512_storeu_si512(o + 128 * h, _mm512_shuffle_i64x2(a, c, 0x44));
                _mm512_storeu_si512(o + 128 * h + 64, _mm512_shuffle_i64x2(a, c, 0xee));
            }
        }
    }
}

/* The scaled integer dot of a super-block with 256 activation quants, as 16 partial sums:
 * dword j of vector i holds quants whose index within their 32 is in 4(j % 8)..+3 (both
 * layouts, see qb_pack_x), so folding the halves gives quants.h's llama.cpp lanes. Q6_K
 * takes its -32 off the pairs, as llama.cpp does, so each lane is exact: from c32 (32 in
 * every byte) or from q32, the four vectors' 32 x pair sums made beforehand. */
TSR_INLINE __m512i qb_dot(const qb_sb *k, const int8_t *xq, const __m512i *c32,
                          const __m512i *q32) {
    __m512i p[4];
    for (int i = 0; i < 4; i++) {
        __m512i x = _mm512_loadu_si512(xq + 64 * i);
        p[i] = _mm512_maddubs_epi16(k->u[i], x);
        if (c32) p[i] = _mm512_sub_epi16(p[i], _mm512_maddubs_epi16(*c32, x));
        if (q32) p[i] = _mm512_sub_epi16(p[i], q32[i]);
    }
    __m512i acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p[0], k->sc[0]);
    __m512i acc2 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p[1], k->sc[1]);
    acc = _mm512_dpwssd_epi32(acc, p[2], k->sc[2]);
    acc2 = _mm512_dpwssd_epi32(acc2, p[3], k->sc[3]);
    return _mm512_add_epi32(acc, acc2);
}

/* 16 partial sums -> the 8 lanes. */
TSR_INLINE __m256i qb_fold(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* ---- Q4_K, Q6_K decode: two rows side by side ---------------------------------------- */

/* One token's activations for decode (qb_decode), read by every row pair of the slice. */
typedef struct qb_token {
    qb_consts c;
    /* The scales of each vector's pairs come from in-lane byte shuffles of 128-bit
     * broadcasts: Q4_K, vector i: the word of group a = i / 2 * 4 + i % 2 in lanes 0-1, of
     * a + 2 in lanes 2-3, from the row's eight scales; Q6_K, vector i: group 4i + L in lane
     * L, from the row's scales 8(i / 2) .. */
    __m512i pick[4];
    const tsr_block_q8_k *x;
    const int8_t *xq;   /* Q4_K: qb_pack_x's order */
    const __m128i *bs;  /* Q4_K: per super-block, the activation sums of its eight groups */
    const __m512i *q32; /* Q6_K: per super-block, 32 x the pair sums of its four vectors */
    int64_t nsb;
} qb_token;

/* Super-blocks whose Q4_K scales decode reads ahead of their products, for two rows. */
#define QB_SC_CHUNK 8

/* The 6-bit scales and mins of super-blocks s0 .. s0 + n - 1 of the Q4_K rows a and b, as
 * words: w[2j + r] holds row r's eight scales then its eight mins of super-block s0 + j;
 * tsr_qk_scale_min's rule on bytes, four (super-block, row) pairs per 512-bit step, ahead of
 * the products that use them so that their latency is off the products' path. */
TSR_INLINE void qb_q4k_scales(__m256i *w, const char *a, const char *b, int64_t s0, int n) {
    /* per 128-bit lane, the bytes of (scales 0-3, 4-7, mins 0-3, 4-7): their low bits, from
     * bytes 0-3, 8-11, 4-7, 8-11 (the mins 4-7 in the high nibbles), and the top two bits of
     * the entries 4-7, from bits 6-7 of bytes 0-3 and 4-7 */
    const __m512i low_at = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m512i top_at = _mm512_broadcast_i32x4(
        _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m512i keep = _mm512_broadcast_i32x4(
        _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    const size_t at = offsetof(tsr_block_q4_k, scales), bytes = sizeof(tsr_block_q4_k);
    for (int j = 0; j < n; j += 2) {
        const int64_t s1 = s0 + j, s2 = j + 1 < n ? s1 + 1 : s1;
        __m512i s = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(a + s1 * bytes + at)));
        s = _mm512_inserti32x4(s, _mm_loadu_si128((const __m128i *)(b + s1 * bytes + at)), 1);
        s = _mm512_inserti32x4(s, _mm_loadu_si128((const __m128i *)(a + s2 * bytes + at)), 2);
        s = _mm512_inserti32x4(s, _mm_loadu_si128((const __m128i *)(b + s2 * bytes + at)), 3);
        __m512i low = _mm512_shuffle_epi8(s, low_at);
        low = _mm512_mask_blend_epi8(0xf000f000f000f000ull, low, _mm512_srli_epi16(low, 4));
        __m512i top = _mm512_srli_epi16(_mm512_shuffle_epi8(s, top_at), 2);
        /* (low & keep) | (top & 0x30) */
        __m512i v = _mm512_ternarylogic_epi32(_mm512_and_si512(low, keep), top,
                                              _mm512_set1_epi8(0x30), 0xf8);
        _mm512_storeu_si512(w + 2 * j, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(v)));
        if (j + 1 < n)
            _mm512_storeu_si512(w + 2 * j + 2,
                                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(v, 1)));
    }
}

/* Rows w and w + partner (nr = 2) or w alone, one token: each row's super-blocks as qb_mm's
 * decode would take them (the same integer lanes, the same fmas in the same order), with the
 * two rows' scales decoded together and their f32 lanes in one 512-bit register. */
TSR_INLINE void qb_rows_1tok(const int qm, float v[2], const char *w, size_t partner, int nr,
                             const qb_token *tk) {
    const int q4 = qm == TSR_QM_Q4_K;
    const size_t bytes = tsr_qm_block_bytes(qm);
    const char *row[2] = {w, w + (nr == 2 ? partner : 0)};
    const qb_consts *c = &tk->c;
    /* lanes 0-7 the first row's d x dx, 8-15 the second's; mins: 0-3, 4-7 */
    const __m512i d_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m256i dmin_lanes = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    __m256i scm[2 * QB_SC_CHUNK];
    for (int64_t s0 = 0; s0 < tk->nsb; s0 += QB_SC_CHUNK) {
        const int n = (int)(tk->nsb - s0 < QB_SC_CHUNK ? tk->nsb - s0 : QB_SC_CHUNK);
        if (q4) qb_q4k_scales(scm, row[0], row[1], s0, n);
        for (int j = 0; j < n; j++) {
            const int64_t sb = s0 + j;
            const tsr_block_q8_k *xb = tk->x + sb;
            const char *p[2] = {row[0] + sb * bytes, row[1] + sb * bytes};
            qb_sb k[2];
            uint32_t dd[2];
            for (int r = 0; r < 2; r++) {
                for (size_t o = 0; o < bytes; o += 64)
                    _mm_prefetch(p[r] + TSR_STREAM_PREFETCH + o, _MM_HINT_T0);
                if (q4) {
                    const tsr_block_q4_k *b = (const tsr_block_q4_k *)p[r];
                    qb_quants_q4_k(b, c, k[r].u);
                    memcpy(&dd[r], &b->d, 4); /* d, dmin */
                } else {
                    const tsr_block_q6_k *b = (const tsr_block_q6_k *)p[r];
                    qb_quants_q6_k(b, c, k[r].u);
                    dd[r] = b->d;
                }
            }
            __m128i q6w[4]; /* Q6_K: both rows' sixteen scales as words, eight at a time */
            if (!q4) {
                const tsr_block_q6_k *a = (const tsr_block_q6_k *)p[0];
                const tsr_block_q6_k *b = (const tsr_block_q6_k *)p[1];
                const __m128i a16 = _mm_loadu_si128((const __m128i *)a->scales);
                const __m128i b16 = _mm_loadu_si128((const __m128i *)b->scales);
                _mm512_storeu_si512(q6w, _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
                                             _mm256_castsi128_si256(a16), b16, 1)));
            }
            __m512i dot[2];
            const int8_t *xq = q4 ? tk->xq + sb * TSR_QK_K : xb->qs;
            for (int r = 0; r < 2; r++) {
                for (int i = 0; i < 4; i++) {
                    const __m128i from =
                        q4 ? _mm256_castsi256_si128(scm[2 * j + r]) : q6w[2 * r + i / 2];
                    k[r].sc[i] = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(from), tk->pick[i]);
                }
                dot[r] = qb_dot(&k[r], xq, NULL, q4 ? NULL : tk->q32 + 4 * sb);
            }
            /* qb_fold of both rows: row 0's eight lanes, then row 1's */
            const __m512i lanes = _mm512_add_epi32(_mm512_shuffle_i64x2(dot[0], dot[1], 0x44),
                                                   _mm512_shuffle_i64x2(dot[0], dot[1], 0xee));
            /* (d, dmin) of both rows times (dx, -dx): the products qb_mm makes one at a time */
            const __m128 sc =
                _mm_mul_ps(_mm_cvtph_ps(_mm_setr_epi32((int)dd[0], (int)dd[1], 0, 0)),
                           _mm_setr_ps(xb->d, -xb->d, xb->d, -xb->d));
            acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(d_lanes, _mm512_castps128_ps512(sc)),
                                  _mm512_cvtepi32_ps(lanes), acc);
            if (q4) { /* min lane m of a row: its groups 2m, 2m + 1 */
                const __m256i mw = _mm256_permute2x128_si256(scm[2 * j], scm[2 * j + 1], 0x31);
                __m256i m = _mm256_madd_epi16(mw, _mm256_broadcastsi128_si256(tk->bs[sb]));
                accm = _mm256_fmadd_ps(
                    _mm256_permutexvar_ps(dmin_lanes, _mm256_castps128_ps256(sc)),
                    _mm256_cvtepi32_ps(m), accm);
            }
        }
    }
    float l[16], m[8];
    _mm512_storeu_ps(l, acc);
    _mm256_storeu_ps(m, accm);
    v[0] = tsr_qk_llama_sum(qm, l, m);
    v[1] = tsr_qk_llama_sum(qm, l + 8, m + 4); /* the first row again when nr is 1 */
}

static void qb_pair_q4_k(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    qb_rows_1tok(TSR_QM_Q4_K, v, w, partner, n_r, ctx);
}

static void qb_pair_q6_k(void *ctx, float v[2], const char *w, size_t partner, int n_r) {
    qb_rows_1tok(TSR_QM_Q6_K, v, w, partner, n_r, ctx);
}

/* One token over rows [0, n_rows): its activations prepared once (Q4_K: reordered, with the
 * groups' sums; Q6_K: its offset's pair sums), then the rows in pairs from the two halves. */
static int qb_decode(int qm, float *y, const void *w, size_t w_stride, const void *x,
                     int64_t n_in, int64_t n_rows) {
    const int64_t nsb = n_in / TSR_QK_K;
    const int q4 = qm == TSR_QM_Q4_K;
    const size_t per_sb = q4 ? TSR_QK_K + sizeof(__m128i) : 4 * sizeof(__m512i);
    char *mem = aligned_alloc(64, ((size_t)nsb * per_sb + 63) / 64 * 64 + 64);
    if (!mem) return -1;
    qb_token tk = {.x = x, .nsb = nsb};
    qb_consts_init(qm, &tk.c);
    for (int i = 0; i < 4; i++) {
        int16_t byte_pairs[32];
        for (int j = 0; j < 32; j++) {
            const int lane = j / 8;
            const int word = q4 ? i / 2 * 4 + i % 2 + (lane >= 2 ? 2 : 0) : i % 2 * 4 + lane;
            byte_pairs[j] = (int16_t)((2 * word + 1) << 8 | 2 * word);
        }
        tk.pick[i] = _mm512_loadu_si512(byte_pairs);
    }
    if (q4) {
        int8_t *xq = (int8_t *)mem;
        __m128i *bs = (__m128i *)(mem + (size_t)nsb * TSR_QK_K);
        qb_pack_x(xq, x, 0, nsb, 1);
        for (int64_t sb = 0; sb < nsb; sb++) { /* group g: bsums 2g, 2g + 1 (fit in 16 bits) */
            __m256i b = _mm256_loadu_si256((const __m256i *)tk.x[sb].bsums);
            bs[sb] = _mm256_cvtepi32_epi16(_mm256_madd_epi16(b, _mm256_set1_epi16(1)));
        }
        tk.xq = xq;
        tk.bs = bs;
    } else {
        __m512i *q32 = (__m512i *)mem;
        for (int64_t sb = 0; sb < nsb; sb++)
            for (int i = 0; i < 4; i++)
                q32[4 * sb + i] = _mm512_maddubs_epi16(
                    _mm512_set1_epi8(32), _mm512_loadu_si512(tk.x[sb].qs + 64 * i));
        tk.q32 = q32;
    }
    tsr_stream_row_pairs(q4 ? qb_pair_q4_k : qb_pair_q6_k, &tk, y, w, w_stride, 0, n_rows);
    free(mem);
    return 0;
}

/* As for Q4_0: prefill takes blocks of rows per super-block so that the tokens' activations
 * are read from L1 by every row of the block; decode goes row by row. Each (row, token) has
 * quants.h's two accumulators, fed super-block after super-block. */
#define QB_TOK 16 /* tokens packed at a time */
#define QB_ROWS 4

static int qb_mm(int qm, float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                 size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    if (n_tok == 1) return qb_decode(qm, y, w, w_stride, x, n_in, n_rows);
    const int64_t nsb = n_in / TSR_QK_K;
    const size_t bytes = tsr_qm_block_bytes(qm);
    const int q4 = qm == TSR_QM_Q4_K;
    int8_t *xq = NULL;
    if (q4 && nsb) {
        int64_t tc = n_tok < QB_TOK ? n_tok : QB_TOK;
        xq = aligned_alloc(64, (size_t)(tc * nsb) * TSR_QK_K);
        if (!xq) return -1;
    }
    qb_consts c;
    qb_consts_init(qm, &c);
    const __m512i c32 = _mm512_set1_epi8(32);
    __m256 acc[QB_ROWS][QB_TOK];
    __m128 accm[QB_ROWS][QB_TOK];
    for (int64_t t0 = 0; t0 < n_tok; t0 += QB_TOK) {
        const int nt = (int)(n_tok - t0 < QB_TOK ? n_tok - t0 : QB_TOK);
        const char *xt = (const char *)x + t0 * x_stride;
        if (q4) qb_pack_x(xq, xt, x_stride, nsb, nt);
        const int64_t rows = nt >= 4 ? QB_ROWS : 1;
        for (int64_t r0 = 0; r0 < n_rows; r0 += rows) {
            const int nr = (int)(n_rows - r0 < rows ? n_rows - r0 : rows);
            for (int i = 0; i < nr; i++)
                for (int t = 0; t < nt; t++) {
                    acc[i][t] = _mm256_setzero_ps();
                    accm[i][t] = _mm_setzero_ps();
                }
            for (int64_t sb = 0; sb < nsb; sb++)
                for (int i = 0; i < nr; i++) {
                    qb_sb k;
                    float dw, dmin = 0;
                    const char *wb = (const char *)w + (r0 + i) * w_stride + sb * bytes;
                    for (size_t o = 0; o < bytes; o += 64)
                        _mm_prefetch(wb + TSR_STREAM_PREFETCH + o, _MM_HINT_T0);
                    /* The scales by F16C in line: a call would spill the constants' zmm. */
                    if (q4) {
                        const tsr_block_q4_k *p = (const tsr_block_q4_k *)wb;
                        qb_load_q4_k(p, &c, &k);
                        dw = _cvtsh_ss(p->d);
                        dmin = _cvtsh_ss(p->dmin);
                    } else {
                        const tsr_block_q6_k *p = (const tsr_block_q6_k *)wb;
                        qb_load_q6_k(p, &c, &k);
                        dw = _cvtsh_ss(p->d);
                    }
                    for (int t = 0; t < nt; t++) {
                        const tsr_block_q8_k *xb = (const tsr_block_q8_k *)(xt + t * x_stride) + sb;
                        __m256i l = qb_fold(
                            q4 ? qb_dot(&k, xq + ((int64_t)t * nsb + sb) * TSR_QK_K, NULL, NULL)
                               : qb_dot(&k, xb->qs, &c32, NULL));
                        acc[i][t] = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * dw),
                                                    _mm256_cvtepi32_ps(l), acc[i][t]);
                        if (q4) { /* min lane m: groups 2m, 2m + 1 */
                            __m256i m = _mm256_madd_epi16(
                                k.ms, _mm256_loadu_si256((const __m256i *)xb->bsums));
                            __m128i m4 = _mm_hadd_epi32(_mm256_castsi256_si128(m),
                                                        _mm256_extracti128_si256(m, 1));
                            accm[i][t] = _mm_fmadd_ps(_mm_set1_ps(-xb->d * dmin),
                                                      _mm_cvtepi32_ps(m4), accm[i][t]);
                        }
                    }
                }
            for (int i = 0; i < nr; i++)
                for (int t = 0; t < nt; t++) {
                    float l[8], m[4];
                    _mm256_storeu_ps(l, acc[i][t]);
                    _mm_storeu_ps(m, accm[i][t]);
                    y[(t0 + t) * ldy + r0 + i] = tsr_qk_llama_sum(qm, l, m);
                }
        }
    }
    free(xq);
    return 0;
}

static int qb_mm_q4_k(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qb_mm(TSR_QM_Q4_K, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

static int qb_mm_q6_k(float *y, int64_t ldy, const void *w, size_t w_stride, const void *x,
                      size_t x_stride, int64_t n_in, int64_t n_rows, int64_t n_tok) {
    return qb_mm(TSR_QM_Q6_K, y, ldy, w, w_stride, x, x_stride, n_in, n_rows, n_tok);
}

/* ---------------------------------------------------------------------------------------- */
/* Activations                                                                               */

/* tsr_q8_k_quantize_row_ref's bits 16 values a vector: the signed maximum is the first value
 * of the largest magnitude (max_ps passes its second operand on a NaN, so NaNs are skipped as
 * the reference's comparison skips them); vcvtps2dq rounds to nearest even as the reference's
 * 1.5 * 2^23 trick does for these magnitudes, and gives INT_MIN for a NaN, whose low byte is
 * the reference's 0. */
static void qk_q8_k_quantize_row(tsr_block_q8_k *y, const float *x, int64_t n) {
    for (int64_t b = 0; b < n / TSR_QK_K; b++, x += TSR_QK_K) {
        __m512 amax = _mm512_setzero_ps();
        for (int k = 0; k < TSR_QK_K / 16; k++)
            amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * k)), amax);
        const float am = _mm512_reduce_max_ps(amax);
        memset(&y[b], 0, sizeof y[b]);
        if (am == 0.0f) continue;
        float max = 0.0f;
        for (int k = 0; k < TSR_QK_K / 16; k++) {
            __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * k)),
                                              _mm512_set1_ps(am), _CMP_EQ_OQ);
            if (at) {
                max = x[16 * k + __builtin_ctz(at)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        for (int k = 0; k < TSR_QK_K / 16; k++) {
            __m512i v = _mm512_min_epi32(
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_set1_ps(iscale), _mm512_loadu_ps(x + 16 * k))),
                _mm512_set1_epi32(127));
            __m128i q = _mm512_cvtepi32_epi8(v);
            _mm_storeu_si128((__m128i *)(y[b].qs + 16 * k), q);
            y[b].bsums[k] = (int16_t)_mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q));
        }
        y[b].d = 1.0f / iscale;
    }
}

/* ---------------------------------------------------------------------------------------- */

const tsr_quant_ops tsr_quant_ops_avx512 = {
    .tile = {qx_tile_q4_0, qx_tile_q4_1, qx_tile_q5_0, qx_tile_q5_1, qx_tile_q8_0,
             qx_tile_iq4_nl, qx_tile_q2_k, qx_tile_q3_k, qx_tile_q4_k, qx_tile_q5_k,
             qx_tile_q6_k, qx_tile_iq4_xs},
    .mm = {[TSR_QM_Q4_0] = qa_mm_q4_0, [TSR_QM_Q8_0] = qa_mm_q8_0, [TSR_QM_Q4_K] = qb_mm_q4_k,
           [TSR_QM_Q6_K] = qb_mm_q6_k},
    .q8_k_quantize_row = qk_q8_k_quantize_row,
};
