/*
 * <tessera/sdk_flash.h> -- the computation of the 'flash' attention plugin, for plugins that
 * compute as it does: the same bits from the same views. Keys are read in tiles of `tile`
 * entries and the softmax is computed online (Dao et al. 2022), with a running maximum m and
 * normaliser l per (query, head); when a tile raises the maximum the accumulator and l are
 * rescaled by exp(m_old - m_new). No (queries x entries) score matrix is ever held, and each
 * K/V tile is read (converted, for F16 or loaded views) once for all the query heads of its KV
 * head and a block of queries. The K tile is also transposed once, so that a query's scores
 * against sixteen keys are sixteen-lane products (tsr_sparse_scores), with every key's terms in
 * tsr_sparse_dot4's order (both of <tessera/sdk_sparse.h>).
 *
 * Parallel work items are (block of TSR_FLASH_QB queries, KV head), taken in turn by the
 * workers (item i by worker i mod n, so that a causal prefill's costlier later queries are
 * shared); each item is computed whole by one task, so results do not depend on the thread
 * count. score_acc needs the final
 * m and l of every (query, head), so it is a second pass over scores only (no V), run only when
 * a view asks for it and split over (KV head, key tile) so each entry's sum has a fixed order.
 *
 * A view's extension (views_ext, cache ABI 1.1) changes only how entries are read: entries in
 * blocks are read from their blocks (in place when a tile lies in one F32 block), and a policy's
 * own products replace the loaded rows: dot_k gives a tile's scores for the scaled query,
 * axpy_v adds the probability-weighted values, called on each run of visible entries so that
 * an entry the query must not see adds nothing at all.
 *
 * head_mass (profiling) is a pass of its own too, run only when the call asks for it: it
 * scores again the entries outside the sinks and the window, so the passes above stay as they
 * are and cost nothing more.
 *
 * tsr_flash_run computes a call; tsr_flash_start lets it resume after entries attended to
 * elsewhere ('hydragen' does a shared prefix for several sequences at once, with
 * tsr_sparse_scores and tsr_flash_update on the same tiles). Plugins built with it get the
 * vector clones of <tessera/sdk.h> and must build with -ffp-contract=off (tessera_add_plugin
 * does) to keep the bits.
 * Header-only, like <tessera/sdk.h>.
 */
#ifndef TESSERA_SDK_FLASH_H
#define TESSERA_SDK_FLASH_H

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>

#include <tessera/sdk_attention.h>
#include <tessera/sdk_sparse.h>

/* Queries per work item: enough to reuse a K/V tile from cache and to spread the K tile's
 * transposition over many queries (8 left it a tenth of a long prefill's attention), few
 * enough to keep parallelism for short prefills. */
#define TSR_FLASH_QB 16

/* The shape and tile of an instance that computes as 'flash' does; first in its instance. */
typedef struct tsr_flash {
    tsr_attention_shape sh; /* first: tsr_attention_new / _destroy rely on it */
    int32_t tile;
} tsr_flash;

/* Where each (query, head) of a call starts, for a call whose first entries were attended to
 * elsewhere (a shared prefix): for KV head g with j0[g] > 0, the online softmax resumes at
 * entry j0[g] (a multiple of the tile, so the tiles are flash's) from the running max and
 * normaliser ml (n_q, n_head, 2) and the unnormalised output acc (n_q, n_head, head_dim) of
 * entries [0, j0[g]); the KV heads with j0[g] == 0 start afresh. */
typedef struct tsr_flash_start {
    const int64_t *j0;  /* (n_kv_head) */
    const float *ml;    /* (n_q, n_head, 2) */
    const float *acc;   /* (n_q, n_head, head_dim) */
} tsr_flash_start;

typedef struct tsr_flash_job {
    const tsr_flash *a;
    const tsr_attention_call *call;
    const tsr_flash_start *start; /* NULL: every (query, head) from entry 0 */
    int64_t max_view_n;
    float *stat;            /* (n_q, n_head, 2): final running max and normaliser */
    float *outside;         /* (n_q, n_head): probability outside sinks + window (head_mass) */
    int64_t n_items;
    atomic_int failed;
} tsr_flash_job;

/* Keys scored together: one vector register per partial sum in the widest clone. The score
 * products are <tessera/sdk_sparse.h>'s (tsr_sparse_dot4, tsr_sparse_scores), which the sparse
 * attention plugins share, so that choosing every entry gives flash's bits. */
#define TSR_FLASH_KB TSR_SPARSE_KB
/* A policy's products (dot_k, axpy_v) are used while a KV head serves at most this many query
 * heads: each query head pays them over again, where a tile read through load_k / load_v is
 * converted once for all of them. Measured on kivi's 2-bit codes (4096 entries, 4 KV heads,
 * CPU time of one layer's decode attention): 2 query heads a KV head 0.75 ms through the
 * products, 1.5 through the loaders; 4: 1.46 and 1.76; 8 (tinyllama): 2.93 and 2.35. */
#define TSR_FLASH_PRODUCT_HEADS 4

/* The extension of view g when the call carries views_ext (since 1.1), else NULL. */
static inline const tsr_kv_view_ext *tsr_flash_view_ext(const tsr_attention_call *c, int32_t g) {
    if (c->struct_size < offsetof(tsr_attention_call, views_ext) + sizeof c->views_ext ||
        !c->views_ext)
        return NULL;
    const tsr_kv_view_ext *e = &c->views_ext[g];
    return e->struct_size >= sizeof *e ? e : NULL;
}

/* Whether to compute through the policy's products rather than its loaders (see
 * TSR_FLASH_PRODUCT_HEADS). */
static inline int tsr_flash_products(const tsr_flash *a) {
    return a->sh.n_head / a->sh.n_kv_head <= TSR_FLASH_PRODUCT_HEADS;
}

/* tsr_kv_view_rows for views whose entries lie in blocks (F32 or F16): in place when the rows
 * lie in one F32 block, else copied (converted) into scratch. Other views go to
 * tsr_kv_view_rows, which also serves block dtypes this plugin does not know (their loaders). */
static inline const float *tsr_flash_rows(const tsr_kv_view *v, const tsr_kv_view_ext *e, int values,
                               int64_t j0, int64_t n, int32_t hd, float *scratch, size_t *stride) {
    if (!e || e->block_size <= 0 ||
        (e->block_dtype != TSR_DTYPE_F32 && e->block_dtype != TSR_DTYPE_F16))
        return tsr_kv_view_rows(v, values, j0, n, hd, scratch, stride);
    const void *const *blocks = values ? e->v_blocks : e->k_blocks;
    const size_t bst = values ? v->v_stride : v->k_stride;
    const int64_t bs = e->block_size;
    const char *first = (const char *)blocks[j0 / bs] + (size_t)(j0 % bs) * bst;
    if (e->block_dtype == TSR_DTYPE_F32 && j0 / bs == (j0 + n - 1) / bs &&
        bst % sizeof(float) == 0 && (uintptr_t)first % sizeof(float) == 0) {
        *stride = bst / sizeof(float);
        return (const float *)first;
    }
    *stride = (size_t)hd;
    for (int64_t r = 0; r < n; r++) {
        const char *row = (const char *)blocks[(j0 + r) / bs] + (size_t)((j0 + r) % bs) * bst;
        float *dst = scratch + r * hd;
        if (e->block_dtype == TSR_DTYPE_F32) {
            memcpy(dst, row, (size_t)hd * sizeof(float));
        } else {
            for (int32_t d = 0; d < hd; d++) {
                uint16_t h;
                memcpy(&h, row + 2 * (size_t)d, 2);
                dst[d] = tsr_f16_to_f32(h);
            }
        }
    }
    return scratch;
}

/* The policy's axpy_v over each run of entries of the tile whose probability p is not 0 (masked,
 * or below float's range). */
static inline void tsr_flash_axpy_runs(const tsr_kv_view_ext *e, const void *ctx, const float *p,
                            int64_t j0, int64_t nb, float *o) {
    for (int64_t r = 0; r < nb;) {
        if (p[r] == 0.0f) {
            r++;
            continue;
        }
        int64_t r1 = r + 1;
        while (r1 < nb && p[r1] != 0.0f) r1++;
        e->axpy_v(ctx, p + r, j0 + r, r1 - r, o);
        r = r1;
    }
}

/* kT (hd, kstride): the nb keys of k (rows kst apart) transposed, zero up to nb rounded to
 * TSR_FLASH_KB, for tsr_sparse_scores. */
static inline __attribute__((always_inline)) void tsr_flash_transpose(float *kT, const float *k,
                                                                      size_t kst, int64_t nb,
                                                                      int32_t hd,
                                                                      int64_t kstride) {
    const int64_t nbk = (nb + TSR_FLASH_KB - 1) / TSR_FLASH_KB * TSR_FLASH_KB;
    for (int32_t d = 0; d < hd; d++)
        for (int64_t r = 0; r < nbk; r++)
            kT[(size_t)d * kstride + r] = r < nb ? k[(size_t)r * kst + d] : 0.0f;
}

/* One (query, head)'s online-softmax step over a tile of nb entries from j0: s holds their
 * scores (overwritten), pos their positions; entries after qpos are masked. ml is its running
 * max and normaliser, o its unnormalised output; the values are the rows vv (vst apart), or,
 * with `axpy` (an extension with axpy_v), the policy's axpy_v on load_ctx. The step itself is
 * tsr_sparse_softmax_step's, which the sparse attention of <tessera/sdk_sparse.h> shares. */
static inline __attribute__((always_inline)) void tsr_flash_update(
    float *s, const int32_t *pos, int64_t j0, int64_t nb, int32_t qpos, float *ml, float *o,
    const float *vv, size_t vst, int32_t hd, const tsr_kv_view_ext *axpy, const void *load_ctx) {
    for (int64_t r = 0; r < nb; r++)
        if (pos[j0 + r] > qpos) s[r] = -INFINITY;
    if (tsr_sparse_softmax_step(s, nb, ml, o, axpy ? NULL : vv, vst, hd) && axpy)
        tsr_flash_axpy_runs(axpy, load_ctx, s, j0, nb, o);
}

/* n_floats of scratch for one worker's items, from the host; NULL when out of memory, with the
 * job marked failed. */
static inline float *tsr_flash_scratch(tsr_flash_job *job, size_t n_floats) {
    const tsr_host *h = job->a->sh.host;
    float *mem = h->alloc(h->ctx, n_floats * sizeof(float), 0);
    if (!mem) atomic_store(&job->failed, 1);
    return mem;
}

TSR_VECTOR_CLONES
static inline void tsr_flash_task(void *arg, int ith, int nth) {
    tsr_flash_job *job = arg;
    const tsr_flash *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head, tile = a->tile;
    /* Items strided over the workers: a causal prefill's later queries see more entries. */
    if (ith >= job->n_items) return;

    /* kt, vt (tile, hd) | kT (hd, kstride) | s (tile) | per (query, group head): q*scale (hd),
     * acc (hd), m, l */
    int32_t n_state = TSR_FLASH_QB * group;
    const int64_t kstride = (tile + TSR_FLASH_KB - 1) / TSR_FLASH_KB * TSR_FLASH_KB;
    size_t n_floats = (2 * (size_t)tile + (size_t)kstride) * (size_t)hd + (size_t)tile +
                      (size_t)n_state * (2 * (size_t)hd + 2);
    float *mem = tsr_flash_scratch(job, n_floats);
    if (!mem) return;
    float *kt = mem, *vt = kt + (size_t)tile * hd, *kT = vt + (size_t)tile * hd;
    float *s = kT + (size_t)kstride * hd;
    float *qs = s + tile, *acc = qs + (size_t)n_state * hd, *ml = acc + (size_t)n_state * hd;

    for (int64_t it = ith; it < job->n_items; it += nth) {
        int32_t g = (int32_t)(it % a->sh.n_kv_head);
        int64_t i0 = (it / a->sh.n_kv_head) * TSR_FLASH_QB;
        int64_t nq = c->n_q - i0 < TSR_FLASH_QB ? c->n_q - i0 : TSR_FLASH_QB;
        const tsr_kv_view *v = &c->views[g];
        const tsr_kv_view_ext *e = tsr_flash_view_ext(c, g);
        const int dot_k = e && e->dot_k && tsr_flash_products(a);
        const int axpy_v = e && e->axpy_v && tsr_flash_products(a);
        const tsr_flash_start *from = job->start && job->start->j0[g] > 0 ? job->start : NULL;
        int32_t qpos_max = INT32_MIN;
        for (int64_t qi = 0; qi < nq; qi++) {
            if (c->q_pos[i0 + qi] > qpos_max) qpos_max = c->q_pos[i0 + qi];
            for (int32_t hg = 0; hg < group; hg++) {
                int64_t st = qi * group + hg;
                int64_t pair = (i0 + qi) * a->sh.n_head + g * group + hg;
                const float *q = c->q + pair * hd;
                for (int32_t d = 0; d < hd; d++) {
                    qs[st * hd + d] = q[d] * c->scale;
                    acc[st * hd + d] = from ? from->acc[pair * hd + d] : 0.0f;
                }
                ml[2 * st] = from ? from->ml[2 * pair] : -INFINITY;
                ml[2 * st + 1] = from ? from->ml[2 * pair + 1] : 0.0f;
            }
        }
        for (int64_t j0 = from ? from->j0[g] : 0; j0 < v->n; j0 += tile) {
            int64_t nb = v->n - j0 < tile ? v->n - j0 : tile;
            int any = 0;
            for (int64_t r = 0; r < nb && !any; r++) any = v->pos[j0 + r] <= qpos_max;
            if (!any) continue; /* the whole tile lies in every query's future */
            size_t kst, vst = 0;
            const float *vv = axpy_v ? NULL : tsr_flash_rows(v, e, 1, j0, nb, hd, vt, &vst);
            if (!dot_k) {
                const float *k = tsr_flash_rows(v, e, 0, j0, nb, hd, kt, &kst);
                tsr_flash_transpose(kT, k, kst, nb, hd, kstride);
            }
            for (int64_t qi = 0; qi < nq; qi++) {
                int32_t qpos = c->q_pos[i0 + qi];
                for (int32_t hg = 0; hg < group; hg++) {
                    int64_t st = qi * group + hg;
                    if (dot_k)
                        e->dot_k(v->load_ctx, qs + st * hd, j0, nb, s);
                    else
                        tsr_sparse_scores(s, qs + st * hd, kT, nb, hd, kstride);
                    tsr_flash_update(s, v->pos, j0, nb, qpos, ml + 2 * st, acc + st * hd, vv, vst,
                                     hd, axpy_v ? e : NULL, v->load_ctx);
                }
            }
        }
        for (int64_t qi = 0; qi < nq; qi++) {
            for (int32_t hg = 0; hg < group; hg++) {
                int64_t st = qi * group + hg;
                int64_t pair = (i0 + qi) * a->sh.n_head + g * group + hg;
                float l = ml[2 * st + 1];
                float *out = c->out + pair * hd;
                /* No visible entry: zeros, as in 'reference'. */
                for (int32_t d = 0; d < hd; d++) out[d] = l > 0.0f ? acc[st * hd + d] / l : 0.0f;
                job->stat[2 * pair] = ml[2 * st];
                job->stat[2 * pair + 1] = l;
            }
        }
    }
    a->sh.host->free(a->sh.host->ctx, mem);
}

/* Scores only: item (g, key tile); each entry sums its probabilities over the group's heads,
 * then the queries, in that order. Scores are recomputed exactly as tsr_flash_task computed them
 * (same scaled query, same dot product), so p <= 1 and they sum to 1 per query. */
TSR_VECTOR_CLONES
static inline void tsr_flash_score_task(void *arg, int ith, int nth) {
    tsr_flash_job *job = arg;
    const tsr_flash *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head, tile = a->tile;
    int64_t tiles = (job->max_view_n + tile - 1) / tile;
    int64_t first = job->n_items * ith / nth, last = job->n_items * (ith + 1) / nth;
    if (first == last) return;

    size_t n_floats = (size_t)tile * (size_t)hd + (size_t)hd + (size_t)tile;
    float *mem = tsr_flash_scratch(job, n_floats);
    if (!mem) return;
    float *kt = mem, *qs = kt + (size_t)tile * hd, *sum = qs + hd;

    for (int64_t it = first; it < last; it++) {
        int32_t g = (int32_t)(it / tiles);
        int64_t j0 = (it % tiles) * tile;
        const tsr_kv_view *v = &c->views[g];
        if (!v->score_acc || j0 >= v->n) continue;
        int64_t nb = v->n - j0 < tile ? v->n - j0 : tile;
        const tsr_kv_view_ext *e = tsr_flash_view_ext(c, g);
        const int dot_k = e && e->dot_k && tsr_flash_products(a);
        size_t kst = 0;
        /* With dot_k the tile's scores for one query go where the keys would have been read. */
        const float *k = dot_k ? NULL : tsr_flash_rows(v, e, 0, j0, nb, hd, kt, &kst);
        for (int64_t r = 0; r < nb; r++) sum[r] = 0.0f;
        for (int32_t h = g * group; h < (g + 1) * group; h++) {
            for (int64_t i = 0; i < c->n_q; i++) {
                int32_t qpos = c->q_pos[i];
                int64_t pair = i * a->sh.n_head + h;
                float m = job->stat[2 * pair], l = job->stat[2 * pair + 1];
                if (qpos < v->score_from_pos || l <= 0.0f) continue;
                const float *q = c->q + pair * hd;
                for (int32_t d = 0; d < hd; d++) qs[d] = q[d] * c->scale;
                if (dot_k) e->dot_k(v->load_ctx, qs, j0, nb, kt);
                for (int64_t r = 0; r < nb; r++) {
                    if (v->pos[j0 + r] > qpos) continue;
                    float score = dot_k ? kt[r] : tsr_sparse_dot4(qs, k + (size_t)r * kst, hd);
                    sum[r] += tsr_sparse_expf(score - m) / l;
                }
            }
        }
        for (int64_t r = 0; r < nb; r++) v->score_acc[j0 + r] += sum[r];
    }
    a->sh.host->free(a->sh.host->ctx, mem);
}

/* head_mass: item (block of TSR_FLASH_QB queries, KV head), as tsr_flash_task's; each (query, head)
 * sums, in entry order, the probabilities of the entries it sees outside the sinks and the
 * window, scored as tsr_flash_task scored them. */
TSR_VECTOR_CLONES
static inline void tsr_flash_mass_task(void *arg, int ith, int nth) {
    tsr_flash_job *job = arg;
    const tsr_flash *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head, tile = a->tile;
    /* Items strided over the workers: a causal prefill's later queries see more entries. */
    if (ith >= job->n_items) return;
    float *mem = tsr_flash_scratch(job, ((size_t)tile + 1) * (size_t)hd);
    if (!mem) return;
    float *kt = mem, *qs = kt + (size_t)tile * hd;
    for (int64_t it = ith; it < job->n_items; it += nth) {
        int32_t g = (int32_t)(it % a->sh.n_kv_head);
        int64_t i0 = (it / a->sh.n_kv_head) * TSR_FLASH_QB;
        int64_t nq = c->n_q - i0 < TSR_FLASH_QB ? c->n_q - i0 : TSR_FLASH_QB;
        const tsr_kv_view *v = &c->views[g];
        for (int64_t qi = 0; qi < nq; qi++)
            for (int32_t hg = 0; hg < group; hg++)
                job->outside[(i0 + qi) * a->sh.n_head + g * group + hg] = 0.0f;
        for (int64_t j0 = 0; j0 < v->n; j0 += tile) {
            int64_t nb = v->n - j0 < tile ? v->n - j0 : tile;
            size_t kst;
            const float *k = NULL;
            for (int64_t qi = 0; qi < nq; qi++) {
                int32_t qpos = c->q_pos[i0 + qi];
                int64_t last_outside = (int64_t)qpos - c->stats_window;
                for (int32_t hg = 0; hg < group; hg++) {
                    int64_t pair = (i0 + qi) * a->sh.n_head + g * group + hg;
                    float m = job->stat[2 * pair], l = job->stat[2 * pair + 1];
                    if (l <= 0.0f) continue;
                    const float *q = c->q + pair * hd;
                    for (int32_t d = 0; d < hd; d++) qs[d] = q[d] * c->scale;
                    for (int64_t r = 0; r < nb; r++) {
                        int32_t p = v->pos[j0 + r];
                        if (p > qpos || p < c->stats_sink || p > last_outside) continue;
                        if (!k) k = tsr_kv_view_rows(v, 0, j0, nb, hd, kt, &kst);
                        float sc = tsr_sparse_dot4(qs, k + (size_t)r * kst, hd);
                        job->outside[pair] += tsr_sparse_expf(sc - m) / l;
                    }
                }
            }
        }
    }
    a->sh.host->free(a->sh.host->ctx, mem);
}

/* A call's attention computed as 'flash' computes it, resuming from `start` (NULL: from the
 * first entry): the output, then score_acc and head_mass when the call asks for them, over
 * every entry. The call is checked first. */
static inline tsr_status tsr_flash_run(const tsr_flash *a, const tsr_attention_call *call,
                                       const tsr_flash_start *start) {
    tsr_status st = tsr_attention_check_call(&a->sh, call);
    if (st < 0) return st;
    if (call->n_q == 0) return TSR_OK;

    tsr_flash_job job = {.a = a, .call = call, .start = start};
    int any_scores = tsr_attention_scan_views(&a->sh, call, &job.max_view_n);
    atomic_init(&job.failed, 0);
    const tsr_host *host = a->sh.host;
    job.stat = host->alloc(host->ctx, (size_t)(call->n_q * a->sh.n_head) * 2 * sizeof(float), 0);
    if (!job.stat) goto nomem;
    job.n_items = (call->n_q + TSR_FLASH_QB - 1) / TSR_FLASH_QB * a->sh.n_kv_head;
    host->parallel_for(host->ctx, tsr_flash_task, &job);
    if (!atomic_load(&job.failed) && call->head_mass) {
        job.outside = host->alloc(host->ctx, (size_t)(call->n_q * a->sh.n_head) * sizeof(float), 0);
        if (job.outside) host->parallel_for(host->ctx, tsr_flash_mass_task, &job);
        else atomic_store(&job.failed, 1);
        for (int32_t h = 0; !atomic_load(&job.failed) && h < a->sh.n_head; h++) {
            float mass = 0.0f;
            for (int64_t i = 0; i < call->n_q; i++) mass += job.outside[i * a->sh.n_head + h];
            call->head_mass[h] += mass;
        }
        host->free(host->ctx, job.outside);
    }
    if (!atomic_load(&job.failed) && any_scores) {
        job.n_items = a->sh.n_kv_head * ((job.max_view_n + a->tile - 1) / a->tile);
        host->parallel_for(host->ctx, tsr_flash_score_task, &job);
    }
    host->free(host->ctx, job.stat);
    if (atomic_load(&job.failed)) goto nomem;
    return TSR_OK;
nomem:
    return tsr_attention_nomem(&a->sh, call, job.max_view_n);
}

#endif
