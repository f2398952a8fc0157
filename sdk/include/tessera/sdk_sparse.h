/*
 * <tessera/sdk_sparse.h> -- sparse attention for CPU attention plugins: each query head reads
 * only the entries of its view that the plugin chooses for it (DuoAttention's sinks and window,
 * Quest's pages, TidalDecode's tokens), and its softmax runs over those alone. The plugin says
 * which entries with one bit per entry, or "every entry"; the SDK does the rest:
 *
 *   - the attention itself, as 'flash' computes it: entries in tiles of TSR_SPARSE_TILE (flash's
 *     default tile), an online softmax per (query, head) rescaled when a tile raises the
 *     maximum. A tile a head reads whole goes through flash's transposed scores, so a choice
 *     of every entry gives flash's output bit for bit; the chosen entries of a tile it reads in
 *     part are scored one by one (tsr_sparse_dot16). Causality by position applies on top of
 *     the choice.
 *   - score_acc (ATTN_3) over the entries each head read, in flash's order;
 *   - counts of the entries read and of those a full attention would have read.
 *
 * Work items are (block of TSR_SPARSE_QB queries, KV head), taken in turn by the workers as
 * flash's are, each computed whole by one task: results do not depend on the thread count.
 * The choice callback runs on the workers, for every (query, head) of the item, and again in
 * the score pass: it must be a pure function of what the plugin prepared before calling
 * tsr_sparse_forward.
 *
 * Also here: per-sequence state for attention plugins (tsr_seq_table) and the top k of a list
 * of scores (tsr_sparse_top_k), which page and token selection share.
 * Header-only, like <tessera/sdk.h>; plugins link nothing of the host or of kernels/.
 */
#ifndef TESSERA_SDK_SPARSE_H
#define TESSERA_SDK_SPARSE_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_attention.h>
#include <tessera/sdk_kv.h>

/* Entries per tile, and per word of a choice: bit r of word w stands for entry 64 w + r. */
#define TSR_SPARSE_TILE 64
/* Queries per work item, as in 'flash'. */
#define TSR_SPARSE_QB 16

static inline int64_t tsr_sparse_n_words(int64_t n) { return (n + TSR_SPARSE_TILE - 1) / TSR_SPARSE_TILE; }

/* The bits of word w that stand for entries of a view of n entries. */
static inline uint64_t tsr_sparse_exist(int64_t n, int64_t w) {
    int64_t left = n - w * TSR_SPARSE_TILE;
    return left >= TSR_SPARSE_TILE ? ~UINT64_C(0) : (UINT64_C(1) << left) - 1;
}

/* Sets the bits of entries [a, b). */
static inline void tsr_sparse_set_range(uint64_t *words, int64_t a, int64_t b) {
    for (int64_t j = a; j < b;) {
        int64_t w = j / TSR_SPARSE_TILE, r = j % TSR_SPARSE_TILE;
        int64_t span = TSR_SPARSE_TILE - r < b - j ? TSR_SPARSE_TILE - r : b - j;
        uint64_t bits = span == TSR_SPARSE_TILE ? ~UINT64_C(0) : ((UINT64_C(1) << span) - 1) << r;
        words[w] |= bits;
        j += span;
    }
}

/* ---- products ---------------------------------------------------------------------------- */

/* flash's score: four partial sums (terms i % 4) added as (0 + 1) + (2 + 3). */
static inline __attribute__((always_inline)) float tsr_sparse_dot4(const float *a, const float *b,
                                                                   int32_t d) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int32_t i = 0;
    for (; i + 4 <= d; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < d; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* Keys scored together by tsr_sparse_scores: one vector register per partial sum. */
#define TSR_SPARSE_KB 16

/* Sixteen floats as one value (GNU C vector extension), lowered to the registers of each
 * clone: one zmm, two ymm or four xmm; read and written in memory through the unaligned,
 * aliasing form (as the intrinsics' __m512_u is). With -ffp-contract=off each lane rounds as
 * the scalar expression would. */
typedef float tsr_sparse_v16_ __attribute__((vector_size(64)));
typedef float tsr_sparse_v16u_ __attribute__((vector_size(64), aligned(4), may_alias));
#define TSR_SPARSE_LD16_(p) (*(const tsr_sparse_v16u_ *)(const void *)(p))
#define TSR_SPARSE_ST16_(p, v) (*(tsr_sparse_v16u_ *)(void *)(p) = (v))

/* Sixteen partial sums added pairwise (halves of 8, 4, 2, 1: loops of fixed length, each one
 * vector add); s is overwritten. */
static inline __attribute__((always_inline)) float tsr_sparse_sum16_(float s[16]) {
    for (int j = 0; j < 8; j++) s[j] += s[j + 8];
    for (int j = 0; j < 4; j++) s[j] += s[j + 4];
    for (int j = 0; j < 2; j++) s[j] += s[j + 2];
    return s[0] + s[1];
}

/* tsr_sparse_dot4 of q with each of nb keys, the same bits, from the keys transposed (kT: hd
 * rows of kstride >= nb rounded up to TSR_SPARSE_KB, zero past nb): each vector lane is a key,
 * whose four partial sums (terms d % 4) are four vectors, so no key's terms are reordered.
 * Two blocks of sixteen keys at a time where there are two: eight chains of additions, which
 * hide each addition's latency, in registers (the vector type keeps them there, where arrays
 * were spilled). */
static inline __attribute__((always_inline)) void tsr_sparse_scores(float *s, const float *q,
                                                                    const float *kT, int64_t nb,
                                                                    int32_t hd, int64_t kstride) {
    int64_t r0 = 0;
    for (; r0 + 2 * TSR_SPARSE_KB <= nb; r0 += 2 * TSR_SPARSE_KB) {
        tsr_sparse_v16_ a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        tsr_sparse_v16_ b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        const float *k = kT + r0;
        int32_t d = 0;
        for (; d + 4 <= hd; d += 4) {
            const float *k0 = k + (size_t)d * kstride, *k1 = k0 + kstride, *k2 = k1 + kstride,
                        *k3 = k2 + kstride;
            a0 += TSR_SPARSE_LD16_(k0) * q[d];
            b0 += TSR_SPARSE_LD16_(k0 + TSR_SPARSE_KB) * q[d];
            a1 += TSR_SPARSE_LD16_(k1) * q[d + 1];
            b1 += TSR_SPARSE_LD16_(k1 + TSR_SPARSE_KB) * q[d + 1];
            a2 += TSR_SPARSE_LD16_(k2) * q[d + 2];
            b2 += TSR_SPARSE_LD16_(k2 + TSR_SPARSE_KB) * q[d + 2];
            a3 += TSR_SPARSE_LD16_(k3) * q[d + 3];
            b3 += TSR_SPARSE_LD16_(k3 + TSR_SPARSE_KB) * q[d + 3];
        }
        for (; d < hd; d++) {
            a0 += TSR_SPARSE_LD16_(k + (size_t)d * kstride) * q[d];
            b0 += TSR_SPARSE_LD16_(k + (size_t)d * kstride + TSR_SPARSE_KB) * q[d];
        }
        TSR_SPARSE_ST16_(s + r0, (a0 + a1) + (a2 + a3));
        TSR_SPARSE_ST16_(s + r0 + TSR_SPARSE_KB, (b0 + b1) + (b2 + b3));
    }
    for (; r0 < nb; r0 += TSR_SPARSE_KB) {
        tsr_sparse_v16_ a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float *k = kT + r0;
        int32_t d = 0;
        for (; d + 4 <= hd; d += 4) {
            const float *k0 = k + (size_t)d * kstride;
            a0 += TSR_SPARSE_LD16_(k0) * q[d];
            a1 += TSR_SPARSE_LD16_(k0 + kstride) * q[d + 1];
            a2 += TSR_SPARSE_LD16_(k0 + 2 * kstride) * q[d + 2];
            a3 += TSR_SPARSE_LD16_(k0 + 3 * kstride) * q[d + 3];
        }
        for (; d < hd; d++) a0 += TSR_SPARSE_LD16_(k + (size_t)d * kstride) * q[d];
        float out[TSR_SPARSE_KB];
        TSR_SPARSE_ST16_(out, (a0 + a1) + (a2 + a3));
        int64_t n = nb - r0 < TSR_SPARSE_KB ? nb - r0 : TSR_SPARSE_KB;
        memcpy(s + r0, out, (size_t)n * sizeof *out);
    }
}

/* exp(x) from IEEE additions and multiplications alone, so that a loop of it vectorises (libm's
 * expf is a call per element) and every clone and lane rounds alike: x = n ln2 + r with |r| <=
 * ln2 / 2 (n by adding and subtracting 1.5 * 2^23; ln2 in two parts), e^r by Cephes' degree-7
 * expf polynomial, then 2^n applied as 2^h * 2^(n-h) with h = n / 2, both normal, so that
 * results in the subnormal range are rounded once, as expf's are (a cut to 0 there would make
 * the probability of an entry with huge values jump). Within 2 ulp of expf over its whole
 * range; 0 below -103.9721 (and for -inf, so that an entry masked to -inf gets probability 0),
 * +inf above 88.7228, NaN for NaN. The softmax of flash and of this file takes its
 * exponentials here. */
static inline __attribute__((always_inline)) float tsr_sparse_expf(float x) {
    const float lo = -103.972076416015625f, hi = 88.72283172607421875f, shift = 0x1.8p23f;
    float xc = x < lo ? lo : x > hi ? hi : x;
    float t = xc * 1.44269502162933349609375f + shift;
    float n = t - shift;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * (r * r) + r) + 1.0f;
    /* n from t's low mantissa bits, not a float-to-int conversion (undefined for NaN). */
    union { float f; uint32_t u; } tb = {.f = t}, s1, s2;
    int32_t ni = (int32_t)(tb.u - 0x4B400000u), h = ni / 2;
    s1.u = (uint32_t)(h + 127) << 23;
    s2.u = (uint32_t)(ni - h + 127) << 23;
    float y = (p * s1.f) * s2.f;
    return x < lo ? 0.0f : x > hi ? INFINITY : y;
}

/* o[d] += p[r] * rows[r][d] over the n rows (vst apart), in row order for every d; a row whose
 * p is 0 (masked, or its exponential below float's range) adds nothing. o is held in
 * registers over the rows, 64 and then 16 floats at a time. */
static inline __attribute__((always_inline)) void
tsr_sparse_softmax_values(float *o, const float *p, int64_t n, const float *rows, size_t vst,
                          int32_t hd) {
    int32_t d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        tsr_sparse_v16_ o0 = TSR_SPARSE_LD16_(o + d0), o1 = TSR_SPARSE_LD16_(o + d0 + 16),
                        o2 = TSR_SPARSE_LD16_(o + d0 + 32), o3 = TSR_SPARSE_LD16_(o + d0 + 48);
        for (int64_t r = 0; r < n; r++) {
            const float pr = p[r];
            if (pr == 0.0f) continue;
            const float *vr = rows + (size_t)r * vst + d0;
            o0 += TSR_SPARSE_LD16_(vr) * pr;
            o1 += TSR_SPARSE_LD16_(vr + 16) * pr;
            o2 += TSR_SPARSE_LD16_(vr + 32) * pr;
            o3 += TSR_SPARSE_LD16_(vr + 48) * pr;
        }
        TSR_SPARSE_ST16_(o + d0, o0);
        TSR_SPARSE_ST16_(o + d0 + 16, o1);
        TSR_SPARSE_ST16_(o + d0 + 32, o2);
        TSR_SPARSE_ST16_(o + d0 + 48, o3);
    }
    for (; d0 + 16 <= hd; d0 += 16) {
        tsr_sparse_v16_ o0 = TSR_SPARSE_LD16_(o + d0);
        for (int64_t r = 0; r < n; r++)
            if (p[r] != 0.0f) o0 += TSR_SPARSE_LD16_(rows + (size_t)r * vst + d0) * p[r];
        TSR_SPARSE_ST16_(o + d0, o0);
    }
    for (; d0 < hd; d0++)
        for (int64_t r = 0; r < n; r++)
            if (p[r] != 0.0f) o[d0] += p[r] * rows[(size_t)r * vst + d0];
}

/* One (query, head)'s online-softmax step over n scores s (-INFINITY: an entry it does not
 * see), with ml its running max and normaliser and o its unnormalised output: when the tile
 * raises the max, o and the normaliser are rescaled by exp(m_old - m_new) (0 on the first tile
 * that shows anything); s is overwritten by each entry's exp(s - m) (0 where masked), the
 * normaliser adds their sum (sixteen partial sums, entry r in r % 16, added pairwise: the
 * loops vectorise where one running sum would wait on each addition), and the values, when
 * rows is not NULL, are added by tsr_sparse_softmax_values (else the caller adds them from s).
 * Returns 0, changing nothing, when the tile shows no entry. */
static inline __attribute__((always_inline)) int
tsr_sparse_softmax_step(float *s, int64_t n, float *ml, float *o, const float *rows, size_t vst,
                        int32_t hd) {
    float lane[16];
    for (int j = 0; j < 16; j++) lane[j] = -INFINITY;
    int64_t r = 0;
    for (; r + 16 <= n; r += 16)
        for (int j = 0; j < 16; j++) lane[j] = s[r + j] > lane[j] ? s[r + j] : lane[j];
    for (; r < n; r++) lane[r % 16] = s[r] > lane[r % 16] ? s[r] : lane[r % 16];
    float mt = -INFINITY;
    for (int j = 0; j < 16; j++) mt = lane[j] > mt ? lane[j] : mt;
    if (mt == -INFINITY) return 0;
    float m_old = ml[0];
    float m_new = mt > m_old ? mt : m_old;
    if (m_new > m_old) {
        float alpha = tsr_sparse_expf(m_old - m_new);
        ml[1] *= alpha;
        for (int32_t d = 0; d < hd; d++) o[d] *= alpha;
        ml[0] = m_new;
    }
    for (r = 0; r < n; r++) s[r] = tsr_sparse_expf(s[r] - m_new);
    for (int j = 0; j < 16; j++) lane[j] = 0.0f;
    for (r = 0; r + 16 <= n; r += 16)
        for (int j = 0; j < 16; j++) lane[j] += s[r + j];
    for (; r < n; r++) lane[r % 16] += s[r];
    ml[1] += tsr_sparse_sum16_(lane);
    if (rows) tsr_sparse_softmax_values(o, s, n, rows, vst, hd);
    return 1;
}

/* The product of a key read alone: sixteen partial sums (terms i % 16), which vectorise across
 * the terms, added pairwise (tsr_sparse_sum16_). Another rounding than tsr_sparse_dot4's, used for the entries of a tile that a head
 * reads in part. */
static inline __attribute__((always_inline)) float tsr_sparse_dot16(const float *a, const float *b,
                                                                    int32_t d) {
    float acc[16] = {0};
    int32_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < d; i++) acc[i % 16] += a[i] * b[i];
    return tsr_sparse_sum16_(acc);
}

/* ---- the choice ---------------------------------------------------------------------------- */

/* What the SDK asks a plugin about one (query, query head). */
typedef struct tsr_sparse_choice {
    const tsr_attention_call *call;
    int64_t i;                    /* the query (0 .. call->n_q) */
    int32_t h;                    /* the query head; it reads call->views[h / group] */
    const tsr_kv_view *view;
    const int32_t *tile_lo, *tile_hi; /* (n_words) lowest and highest position in each tile */
    uint64_t *words;              /* (n_words) zeroed: set the bits of the entries to read */
    int64_t n_words;
} tsr_sparse_choice;

/* Returns 1 when the head reads every entry (words untouched), 0 when it set its choice in
 * words. [worker] */
typedef int (*tsr_sparse_select_fn)(void *ctx, const tsr_sparse_choice *c);

/* A choice made before a call, one per query head: every[h] (read every entry), or the bits
 * of row h of words (n_head rows of cap words). tsr_sparse_select_chosen serves it to
 * tsr_sparse_forward. */
typedef struct tsr_sparse_chosen {
    uint64_t *words;
    int64_t cap;
    const unsigned char *every; /* (n_head), the plugin's */
} tsr_sparse_chosen;

/* Room in ch->words for n_head rows over views of up to max_n entries; kept (and grown)
 * across calls. 0 when out of memory. */
static inline int tsr_sparse_chosen_reserve(const tsr_host *host, tsr_sparse_chosen *ch,
                                            int32_t n_head, int64_t max_n) {
    if (tsr_sparse_n_words(max_n) <= ch->cap) return 1;
    int64_t cap = 2 * tsr_sparse_n_words(max_n);
    uint64_t *words = host->alloc(host->ctx, (size_t)(cap * n_head) * sizeof *words, 0);
    if (!words) return 0;
    host->free(host->ctx, ch->words);
    ch->words = words;
    ch->cap = cap;
    return 1;
}

/* Row h of the choice, zeroed for a view of n entries. */
static inline uint64_t *tsr_sparse_chosen_row(tsr_sparse_chosen *ch, int32_t h, int64_t n) {
    uint64_t *row = ch->words + (size_t)h * (size_t)ch->cap;
    memset(row, 0, (size_t)tsr_sparse_n_words(n) * sizeof *row);
    return row;
}

/* Entry reads of (query, head) pairs: `read` the entries they read, `visible` those a full
 * attention would have (pos <= query pos). */
typedef struct tsr_sparse_counts {
    int64_t read, visible;
} tsr_sparse_counts;

/* The tsr_sparse_select_fn of a tsr_sparse_chosen (ctx). */
static inline int tsr_sparse_select_chosen(void *ctx, const tsr_sparse_choice *c) {
    const tsr_sparse_chosen *ch = ctx;
    if (ch->every[c->h]) return 1;
    memcpy(c->words, ch->words + (size_t)c->h * (size_t)ch->cap,
           (size_t)c->n_words * sizeof *c->words);
    return 0;
}

/* ---- the forward pass ---------------------------------------------------------------------- */

typedef struct tsr_sparse_job_ {
    const tsr_attention_shape *a;
    const tsr_attention_call *call;
    tsr_sparse_select_fn select;
    void *ctx;
    int64_t max_n, n_words;
    const int32_t *bounds; /* (n_kv_head, n_words, 2) lowest and highest position per tile */
    float *stat;           /* (n_q, n_head, 2): final running max and normaliser */
    float *scores;         /* (n_q, n_head, max_n) or NULL: every entry's score, for the plugin */
    int64_t n_items;
    atomic_llong read, visible;
    atomic_int failed;
} tsr_sparse_job_;

/* Asks the plugin for the choice of (query i, head h) into words; 1 for every entry. */
static inline int tsr_sparse_ask_(const tsr_sparse_job_ *job, int64_t i, int32_t h,
                                  uint64_t *words) {
    if (!job->select) return 1;
    const tsr_attention_call *c = job->call;
    int32_t g = h / (job->a->n_head / job->a->n_kv_head);
    const tsr_kv_view *v = &c->views[g];
    int64_t nw = tsr_sparse_n_words(v->n);
    memset(words, 0, (size_t)nw * sizeof *words);
    const int32_t *b = job->bounds + (size_t)g * (size_t)job->n_words * 2;
    tsr_sparse_choice ch = {.call = c, .i = i, .h = h, .view = v, .tile_lo = b,
                            .tile_hi = b + job->n_words, .words = words, .n_words = nw};
    return job->select(job->ctx, &ch);
}

/* The entries of tile w of view v (bounds b) that a query at qpos sees. */
static inline uint64_t tsr_sparse_visible_(const tsr_kv_view *v, const int32_t *lo,
                                           const int32_t *hi, int64_t w, int32_t qpos) {
    uint64_t exist = tsr_sparse_exist(v->n, w);
    if (hi[w] <= qpos) return exist;
    if (lo[w] > qpos) return 0;
    uint64_t vis = 0;
    const int32_t *pos = v->pos + w * TSR_SPARSE_TILE;
    for (int r = 0; (exist >> r) & 1; r++) {
        vis |= (uint64_t)(pos[r] <= qpos) << r;
        if (r == TSR_SPARSE_TILE - 1) break;
    }
    return vis;
}

/* The entries of tile w some state chose (every[st], or its words); *whole when one of them
 * reads the whole tile. */
static inline uint64_t tsr_sparse_union_(const uint64_t *words, const unsigned char *every,
                                         int64_t n_state, int64_t n_words, int64_t n, int64_t w,
                                         int *whole) {
    const uint64_t exist = tsr_sparse_exist(n, w);
    uint64_t any = 0;
    for (int64_t st = 0; st < n_state; st++) {
        uint64_t word = every[st] ? exist : words[st * n_words + w] & exist;
        any |= word;
        *whole |= word == exist;
    }
    return any;
}

/* Prefetches the K and V rows of the entries `bits` of the tile starting at entry j0 (F32
 * views; others are converted through scratch anyway). */
static inline void tsr_sparse_prefetch_(const tsr_kv_view *v, int64_t j0, uint64_t bits,
                                        int32_t hd) {
    if (v->dtype != TSR_DTYPE_F32) return;
    for (; bits; bits &= bits - 1) {
        int64_t j = j0 + __builtin_ctzll(bits);
        const char *k = (const char *)v->k + (size_t)j * v->k_stride;
        const char *vv = (const char *)v->v + (size_t)j * v->v_stride;
        for (size_t b = 0; b < (size_t)hd * sizeof(float); b += 64) {
            __builtin_prefetch(k + b);
            __builtin_prefetch(vv + b);
        }
    }
}

TSR_VECTOR_CLONES __attribute__((unused))
static void tsr_sparse_task_(void *arg, int ith, int nth) {
    tsr_sparse_job_ *job = arg;
    const tsr_attention_shape *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head, T = TSR_SPARSE_TILE;
    /* Items strided over the workers: a causal prefill's later queries see more entries. */
    if (ith >= job->n_items) return;

    /* kt, vt (T, hd) | kT (hd, T) | s (T) | per (query, group head): q*scale (hd), acc (hd),
     * m, l | the choices (n_state, n_words) | whether each reads every entry */
    const int32_t n_state = TSR_SPARSE_QB * group;
    size_t n_floats = 3 * (size_t)T * (size_t)hd + (size_t)T + (size_t)n_state * (2 * (size_t)hd + 2);
    size_t bytes = n_floats * sizeof(float) + (size_t)n_state * (size_t)job->n_words * 8 +
                   (size_t)n_state + 8;
    char *mem = a->host->alloc(a->host->ctx, bytes, 64);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    uint64_t *words = (uint64_t *)mem;
    float *kt = (float *)(words + (size_t)n_state * (size_t)job->n_words);
    float *vt = kt + (size_t)T * hd, *kT = vt + (size_t)T * hd, *s = kT + (size_t)T * hd;
    float *qs = s + T, *acc = qs + (size_t)n_state * hd, *ml = acc + (size_t)n_state * hd;
    unsigned char *every = (unsigned char *)(ml + 2 * (size_t)n_state);
    int64_t n_read = 0, n_visible = 0;

    for (int64_t it = ith; it < job->n_items; it += nth) {
        int32_t g = (int32_t)(it % a->n_kv_head);
        int64_t i0 = (it / a->n_kv_head) * TSR_SPARSE_QB;
        int64_t nq = c->n_q - i0 < TSR_SPARSE_QB ? c->n_q - i0 : TSR_SPARSE_QB;
        const tsr_kv_view *v = &c->views[g];
        const int32_t *lo = job->bounds + (size_t)g * (size_t)job->n_words * 2;
        const int32_t *hi = lo + job->n_words;
        const int64_t nw = tsr_sparse_n_words(v->n);
        int32_t qpos_max = INT32_MIN;
        for (int64_t qi = 0; qi < nq; qi++) {
            if (c->q_pos[i0 + qi] > qpos_max) qpos_max = c->q_pos[i0 + qi];
            for (int32_t hg = 0; hg < group; hg++) {
                int64_t st = qi * group + hg;
                const float *q = c->q + ((i0 + qi) * a->n_head + g * group + hg) * hd;
                for (int32_t d = 0; d < hd; d++) {
                    qs[st * hd + d] = q[d] * c->scale;
                    acc[st * hd + d] = 0.0f;
                }
                ml[2 * st] = -INFINITY;
                ml[2 * st + 1] = 0.0f;
                every[st] = (unsigned char)tsr_sparse_ask_(job, i0 + qi, g * group + hg,
                                                           words + st * job->n_words);
            }
        }
        if (job->scores)
            for (int64_t qi = 0; qi < nq; qi++)
                for (int32_t hg = 0; hg < group; hg++)
                    for (int64_t j = 0; j < job->max_n; j++)
                        job->scores[((i0 + qi) * a->n_head + g * group + hg) * job->max_n + j] =
                            -INFINITY;
        int whole = 0;
        uint64_t any = tsr_sparse_union_(words, every, nq * group, job->n_words, v->n, 0, &whole);
        for (int64_t w = 0; w < nw; w++) {
            const int64_t j0 = w * T, nb = v->n - j0 < T ? v->n - j0 : T;
            const uint64_t exist = tsr_sparse_exist(v->n, w);
            int whole_next = 0;
            uint64_t next = w + 1 < nw ? tsr_sparse_union_(words, every, nq * group,
                                                           job->n_words, v->n, w + 1,
                                                           &whole_next)
                                       : 0;
            /* Scattered rows defeat the hardware prefetcher: ask for the next tile's now. */
            if (!whole_next) tsr_sparse_prefetch_(v, (w + 1) * T, next, hd);
            uint64_t this_any = any;
            int this_whole = whole;
            any = next;
            whole = whole_next;
            if (!this_any || lo[w] > qpos_max) continue; /* nothing chosen, or all in the future */
            /* Rows [r0, r1] of the tile are read: the whole tile when a head reads it whole
             * (its scores come from the transposed tile, as flash's do), else the span of the
             * chosen ones. Every head's scores and updates run over the same span. */
            int64_t r0 = this_whole ? 0 : __builtin_ctzll(this_any);
            int64_t r1 = this_whole ? nb - 1 : 63 - __builtin_clzll(this_any);
            size_t kst, vst;
            const float *k = tsr_kv_view_rows(v, 0, j0 + r0, r1 - r0 + 1, hd, kt, &kst);
            const float *vv = tsr_kv_view_rows(v, 1, j0 + r0, r1 - r0 + 1, hd, vt, &vst);
            if (this_whole) {
                for (int32_t d = 0; d < hd; d++)
                    for (int64_t r = 0; r < T; r++)
                        kT[(size_t)d * T + r] = r < nb ? k[(size_t)r * kst + d] : 0.0f;
            }
            for (int64_t qi = 0; qi < nq; qi++) {
                int32_t qpos = c->q_pos[i0 + qi];
                uint64_t vis = tsr_sparse_visible_(v, lo, hi, w, qpos);
                for (int32_t hg = 0; hg < group; hg++) {
                    int64_t st = qi * group + hg;
                    uint64_t word = every[st] ? exist : words[st * job->n_words + w] & exist;
                    uint64_t eff = word & vis;
                    if (!eff) continue;
                    n_read += __builtin_popcountll(eff);
                    const float *qh = qs + st * hd;
                    if (word == exist) {
                        tsr_sparse_scores(s, qh, kT, nb, hd, T);
                        for (int64_t r = 0; r < nb; r++)
                            if (!((eff >> r) & 1)) s[r] = -INFINITY;
                    } else {
                        for (int64_t r = r0; r <= r1; r++)
                            s[r] = (eff >> r) & 1
                                       ? tsr_sparse_dot16(qh, k + (size_t)(r - r0) * kst, hd)
                                       : -INFINITY;
                    }
                    if (job->scores)
                        memcpy(job->scores + ((i0 + qi) * a->n_head + g * group + hg) * job->max_n +
                                   j0 + r0,
                               s + r0, (size_t)(r1 - r0 + 1) * sizeof *s);
                    tsr_sparse_softmax_step(s + r0, r1 - r0 + 1, ml + 2 * st, acc + st * hd, vv,
                                            vst, hd);
                }
            }
        }
        for (int64_t qi = 0; qi < nq; qi++) {
            int32_t qpos = c->q_pos[i0 + qi];
            int64_t seen = 0;
            for (int64_t w = 0; w < nw; w++)
                seen += __builtin_popcountll(tsr_sparse_visible_(v, lo, hi, w, qpos));
            n_visible += seen * group;
            for (int32_t hg = 0; hg < group; hg++) {
                int64_t st = qi * group + hg;
                int64_t pair = (i0 + qi) * a->n_head + g * group + hg;
                float l = ml[2 * st + 1];
                float *out = c->out + pair * hd;
                for (int32_t d = 0; d < hd; d++) out[d] = l > 0.0f ? acc[st * hd + d] / l : 0.0f;
                job->stat[2 * pair] = ml[2 * st];
                job->stat[2 * pair + 1] = l;
            }
        }
    }
    atomic_fetch_add(&job->read, n_read);
    atomic_fetch_add(&job->visible, n_visible);
    a->host->free(a->host->ctx, mem);
}

/* score_acc of KV head g (item g): each entry sums the probabilities of the group's heads, then
 * the queries, in that order, over the entries each (query, head) read, with the products the
 * attention pass used. */
TSR_VECTOR_CLONES __attribute__((unused))
static void tsr_sparse_score_task_(void *arg, int ith, int nth) {
    tsr_sparse_job_ *job = arg;
    const tsr_attention_shape *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head;
    int64_t first = job->n_items * ith / nth, last = job->n_items * (ith + 1) / nth;
    if (first == last) return;
    size_t bytes = (size_t)job->n_words * 8 + ((size_t)job->max_n + 2 * (size_t)hd) * sizeof(float);
    char *mem = a->host->alloc(a->host->ctx, bytes, 64);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    uint64_t *words = (uint64_t *)mem;
    float *sum = (float *)(words + job->n_words), *qs = sum + job->max_n, *row = qs + hd;
    for (int64_t g = first; g < last; g++) {
        const tsr_kv_view *v = &c->views[g];
        if (!v->score_acc || v->n == 0) continue;
        const int32_t *lo = job->bounds + (size_t)g * (size_t)job->n_words * 2;
        const int32_t *hi = lo + job->n_words;
        const int64_t nw = tsr_sparse_n_words(v->n);
        for (int64_t j = 0; j < v->n; j++) sum[j] = 0.0f;
        for (int32_t h = (int32_t)g * group; h < ((int32_t)g + 1) * group; h++) {
            for (int64_t i = 0; i < c->n_q; i++) {
                int32_t qpos = c->q_pos[i];
                int64_t pair = i * a->n_head + h;
                float m = job->stat[2 * pair], l = job->stat[2 * pair + 1];
                if (qpos < v->score_from_pos || l <= 0.0f) continue;
                int every = tsr_sparse_ask_(job, i, h, words);
                const float *q = c->q + pair * hd;
                for (int32_t d = 0; d < hd; d++) qs[d] = q[d] * c->scale;
                for (int64_t w = 0; w < nw; w++) {
                    uint64_t exist = tsr_sparse_exist(v->n, w);
                    uint64_t word = every ? exist : words[w] & exist;
                    uint64_t eff = word & tsr_sparse_visible_(v, lo, hi, w, qpos);
                    for (; eff; eff &= eff - 1) {
                        int64_t j = w * TSR_SPARSE_TILE + __builtin_ctzll(eff);
                        size_t st;
                        const float *k = tsr_kv_view_rows(v, 0, j, 1, hd, row, &st);
                        float sc = word == exist ? tsr_sparse_dot4(qs, k, hd)
                                                 : tsr_sparse_dot16(qs, k, hd);
                        sum[j] += tsr_sparse_expf(sc - m) / l;
                    }
                }
            }
        }
        for (int64_t j = 0; j < v->n; j++) v->score_acc[j] += sum[j];
    }
    a->host->free(a->host->ctx, mem);
}

/* One forward call (checked by tsr_attention_check_call) over the entries `select` chooses
 * (NULL: every entry), adding what was read to *counts. `scores` (NULL, or room for n_q x
 * n_head x the largest view's n) receives the score (scale * q.k) of each entry each (query,
 * head) read, as the softmax used it, and -inf for the others: a plugin that chooses from a
 * full attention's scores (TidalDecode) need not compute them again. */
static inline tsr_status tsr_sparse_forward(const tsr_attention_shape *a,
                                            const tsr_attention_call *call,
                                            tsr_sparse_select_fn select, void *ctx,
                                            tsr_sparse_counts *counts, float *scores) {
    if (call->n_q == 0) return TSR_OK;
    const tsr_host *host = a->host;
    tsr_sparse_job_ job = {.a = a, .call = call, .select = select, .ctx = ctx, .scores = scores};
    int any_scores = tsr_attention_scan_views(a, call, &job.max_n);
    job.n_words = tsr_sparse_n_words(job.max_n);
    atomic_init(&job.read, 0);
    atomic_init(&job.visible, 0);
    atomic_init(&job.failed, 0);
    size_t n_bounds = (size_t)a->n_kv_head * (size_t)(job.n_words ? job.n_words : 1) * 2;
    int32_t *bounds = host->alloc(host->ctx, n_bounds * sizeof(int32_t), 0);
    job.stat = host->alloc(host->ctx, (size_t)(call->n_q * a->n_head) * 2 * sizeof(float), 0);
    if (!bounds || !job.stat) {
        host->free(host->ctx, bounds);
        host->free(host->ctx, job.stat);
        return tsr_attention_nomem(a, call, job.max_n);
    }
    for (int32_t g = 0; g < a->n_kv_head; g++) {
        const tsr_kv_view *v = &call->views[g];
        int32_t *lo = bounds + (size_t)g * (size_t)job.n_words * 2, *hi = lo + job.n_words;
        for (int64_t w = 0; w < tsr_sparse_n_words(v->n); w++) {
            lo[w] = INT32_MAX;
            hi[w] = INT32_MIN;
            for (int64_t j = w * TSR_SPARSE_TILE; j < v->n && j < (w + 1) * TSR_SPARSE_TILE; j++) {
                if (v->pos[j] < lo[w]) lo[w] = v->pos[j];
                if (v->pos[j] > hi[w]) hi[w] = v->pos[j];
            }
        }
    }
    job.bounds = bounds;
    job.n_items = (call->n_q + TSR_SPARSE_QB - 1) / TSR_SPARSE_QB * a->n_kv_head;
    host->parallel_for(host->ctx, tsr_sparse_task_, &job);
    if (!atomic_load(&job.failed) && any_scores) {
        job.n_items = a->n_kv_head;
        host->parallel_for(host->ctx, tsr_sparse_score_task_, &job);
    }
    host->free(host->ctx, bounds);
    host->free(host->ctx, job.stat);
    if (atomic_load(&job.failed)) return tsr_attention_nomem(a, call, job.max_n);
    counts->read += atomic_load(&job.read);
    counts->visible += atomic_load(&job.visible);
    return TSR_OK;
}

/* ---- what a plugin read ------------------------------------------------------------------- */

/* The start of a sparse attention plugin's instance (its first member): the shape, and the
 * entries read by phase (tsr_phase: counts[0] prefill, counts[1] decode). */
typedef struct tsr_sparse_base {
    tsr_attention_shape sh; /* first: tsr_attention_new and tsr_attention_destroy rely on it */
    tsr_sparse_counts counts[2];
} tsr_sparse_base;

/* The counts of a call's phase. */
static inline tsr_sparse_counts *tsr_sparse_counts_of(tsr_sparse_base *b,
                                                      const tsr_attention_call *call) {
    return &b->counts[call->phase == TSR_PHASE_DECODE];
}

static inline double tsr_sparse_fraction_(const tsr_sparse_counts *c) {
    return c->visible > 0 ? (double)c->read / (double)c->visible : 0.0;
}

/* Commands "d(I)": the fraction of the visible entries read since create, in prefill or in
 * decode (0 before any). */
static inline double tsr_sparse_prefill_read(void *instance) {
    return tsr_sparse_fraction_(&((tsr_sparse_base *)instance)->counts[0]);
}
static inline double tsr_sparse_decode_read(void *instance) {
    return tsr_sparse_fraction_(&((tsr_sparse_base *)instance)->counts[1]);
}

/* The two commands, for a plugin's command table. */
#define TSR_SPARSE_READ_COMMANDS                                                              \
    {TSR_SIZED(tsr_command), .name = "prefill_read", .signature = "d(I)",                    \
     .fn = (void (*)(void))tsr_sparse_prefill_read,                                          \
     .doc = "prefill_read(): fraction of the entries visible to prefill queries they read"}, \
    {TSR_SIZED(tsr_command), .name = "decode_read", .signature = "d(I)",                     \
     .fn = (void (*)(void))tsr_sparse_decode_read,                                           \
     .doc = "decode_read(): fraction of the entries visible to decode queries they read"}

/* Logs (info) what the instance read, per phase; for destroy. */
static inline void tsr_sparse_log_reads(const tsr_sparse_base *b) {
    const char *names[2] = {"prefill", "decode"};
    for (int p = 0; p < 2; p++) {
        const tsr_sparse_counts *c = &b->counts[p];
        if (c->visible == 0) continue;
        b->sh.host->log(b->sh.host->ctx, TSR_LOG_INFO,
                        "%s: read %lld of the %lld entries visible to its (query, head) pairs "
                        "(%.1f%%)", names[p], (long long)c->read, (long long)c->visible,
                        100.0 * tsr_sparse_fraction_(c));
    }
}

/* ---- top k --------------------------------------------------------------------------------- */

/* Whether score a at index ia ranks before score b at ib: higher first, ties by index. */
static inline int tsr_sparse_before_(float a, int64_t ia, float b, int64_t ib) {
    return a > b || (a == b && ia < ib);
}

/* The k highest of score[0..n) (k <= n): their indices into idx (k), in no order. A min-heap of
 * the best k so far, so O(n log k); ties go to the lower index. */
static inline void tsr_sparse_top_k(const float *score, int64_t n, int64_t k, int64_t *idx) {
    if (k <= 0) return;
    int64_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        if (m == k) {
            /* idx[0] is the worst kept: replace it when j ranks before it. */
            if (!tsr_sparse_before_(score[j], j, score[idx[0]], idx[0])) continue;
            idx[0] = j;
        } else {
            idx[m++] = j;
            for (int64_t c = m - 1; c > 0;) { /* sift the newcomer up */
                int64_t p = (c - 1) / 2;
                if (!tsr_sparse_before_(score[idx[p]], idx[p], score[idx[c]], idx[c])) break;
                int64_t t = idx[p];
                idx[p] = idx[c];
                idx[c] = t;
                c = p;
            }
            continue;
        }
        for (int64_t p = 0;;) { /* sift the root down */
            int64_t c = 2 * p + 1, worst = p;
            if (c < m && tsr_sparse_before_(score[idx[worst]], idx[worst], score[idx[c]], idx[c]))
                worst = c;
            if (c + 1 < m &&
                tsr_sparse_before_(score[idx[worst]], idx[worst], score[idx[c + 1]], idx[c + 1]))
                worst = c + 1;
            if (worst == p) break;
            int64_t t = idx[p];
            idx[p] = idx[worst];
            idx[worst] = t;
            p = worst;
        }
    }
}

/* ---- per-sequence state -------------------------------------------------------------------- */

/* States of a plugin's live sequences, by id. A sequence forked by a decoder reaches attention
 * without a seq_begin, so a plugin makes its state on first sight too (tsr_seq_table_get). */
typedef struct tsr_seq_table {
    int64_t *ids;
    void **states;
    int32_t n, cap;
} tsr_seq_table;

/* The slot of sequence id's state, or NULL when it has none. */
static inline void **tsr_seq_table_find(tsr_seq_table *t, int64_t id) {
    for (int32_t i = 0; i < t->n; i++)
        if (t->ids[i] == id) return &t->states[i];
    return NULL;
}

/* The slot of sequence id's state, a new one holding NULL when it had none; NULL when out of
 * memory. */
static inline void **tsr_seq_table_get(const tsr_host *host, tsr_seq_table *t, int64_t id) {
    void **slot = tsr_seq_table_find(t, id);
    if (slot) return slot;
    if (t->n == t->cap) {
        int32_t cap = t->cap ? 2 * t->cap : 4;
        int64_t *ids = host->alloc(host->ctx, (size_t)cap * sizeof *ids, 0);
        void **states = host->alloc(host->ctx, (size_t)cap * sizeof *states, 0);
        if (!ids || !states) {
            host->free(host->ctx, ids);
            host->free(host->ctx, states);
            return NULL;
        }
        if (t->n) {
            memcpy(ids, t->ids, (size_t)t->n * sizeof *ids);
            memcpy(states, t->states, (size_t)t->n * sizeof *states);
        }
        host->free(host->ctx, t->ids);
        host->free(host->ctx, t->states);
        t->ids = ids;
        t->states = states;
        t->cap = cap;
    }
    t->ids[t->n] = id;
    t->states[t->n] = NULL;
    return &t->states[t->n++];
}

/* Takes sequence id out of the table; returns its state (the caller frees it), NULL if none. */
static inline void *tsr_seq_table_take(tsr_seq_table *t, int64_t id) {
    void **slot = tsr_seq_table_find(t, id);
    if (!slot) return NULL;
    void *state = *slot;
    int32_t i = (int32_t)(slot - t->states);
    t->ids[i] = t->ids[t->n - 1];
    t->states[i] = t->states[t->n - 1];
    t->n--;
    return state;
}

/* Frees the table's arrays (not the states: take them first). */
static inline void tsr_seq_table_free(const tsr_host *host, tsr_seq_table *t) {
    host->free(host->ctx, t->ids);
    host->free(host->ctx, t->states);
    *t = (tsr_seq_table){0};
}

#endif /* TESSERA_SDK_SPARSE_H */
