/*
 * <tessera/sdk_cache.h> -- the bookkeeping of a cache policy that keeps K/V rows in host
 * memory: sequence slots, the rows of each (sequence, layer) per KV head in f32 or f16, the
 * memory and entry counters, and the vtable callbacks that hold no policy of their own
 * (seq_begin, seq_end, seq_fork, seq_truncate, view, stats, destroy).
 *
 * A policy's instance starts with a tsr_kv_store (its FIRST member, so the instance pointer
 * is the store's and these callbacks go straight into its tsr_cache_vtable); the policy keeps
 * only its rules: when a layer grows (tsr_kv_rows_resize), what it evicts (tsr_kv_rows_move,
 * evicted_max_pos, the `evicted` counter), and its store callback, which checks the write
 * (tsr_kv_store_check_write) and appends it (tsr_kv_rows_append).
 *
 *   typedef struct my_cache { tsr_kv_store kv; int64_t window; } my_cache;
 *   create:  tsr_kv_store_create(host, params, init, sizeof(my_cache), 0, out)
 *   static const tsr_cache_vtable vt = { TSR_SIZED(tsr_cache_vtable), .create = my_create,
 *       .destroy = tsr_kv_store_destroy, .store = my_store, TSR_KV_STORE_CALLBACKS };
 *
 * A policy that keeps different entries for each KV head, chosen by the attention they receive
 * (H2O, TOVA, SnapKV), starts with a tsr_kv_heads instead ("per-head stores" below).
 *
 * A policy with storage of its own (quantized codes, merged states, blocks) keeps per-sequence
 * state beside the slots and runs it around the store's callbacks (tsr_kv_store_seq_begin_with
 * and the rest), accounts its bytes (tsr_kv_store_account) and counts its bits per value per
 * layer (tsr_kv_store_stats_with). The last section, tsr_kvq_*, is the toolkit of policies that
 * quantize K/V: grids, codes in lanes and products on them, for dot_k / axpy_v
 * (tsr_kv_view_ext) called from attention's workers ([worker]: they only read).
 *
 * Header-only, like <tessera/sdk.h>: all memory goes through the host's allocator, and every
 * function runs on the thread that called into the policy ([main]). GNU C (vector
 * extensions in the tsr_kvq_* products).
 */
#ifndef TESSERA_SDK_CACHE_H
#define TESSERA_SDK_CACHE_H

#include <stdint.h>
#include <string.h>

#include <tessera/cache.h>
#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

/* tsr_kv_rows.score_from_pos when the policy wants no scores: the views get no score_acc. */
#define TSR_KV_NO_SCORES INT32_MAX

/* The entries of one (sequence, layer): the same entries, in the same slots, for every head. */
typedef struct tsr_kv_rows {
    int64_t n, cap;          /* entries held, rows reserved per KV head */
    int32_t *pos;            /* (cap) position of each entry */
    uint64_t *stamp;         /* (cap) arrival number, oldest smallest; NULL without stamps */
    char *k, *v;             /* (n_kv_head, cap, head_dim) in the store's dtype */
    int32_t evicted_max_pos; /* highest position the policy evicted, -1 when none: what
                                seq_truncate can no longer honour */
    float *score;            /* (cap) attention each entry received (the views' score_acc),
                                moved with its entry; NULL in a store without scores */
    int32_t next_pos;        /* one past the last position stored, set by every store of a
                                tsr_kv_heads (the hooks that read it follow one) */
    int32_t score_from_pos;  /* the views' score_from_pos, or TSR_KV_NO_SCORES: no score_acc */
} tsr_kv_rows;

typedef struct tsr_kv_seq {
    int64_t id;
    int alive;
    uint64_t next_stamp;  /* stamp of the next entry stored (from 1: 0 can mark a free slot) */
    tsr_kv_rows *layers;  /* (n_layer) */
} tsr_kv_seq;

typedef struct tsr_kv_store {
    const tsr_host *host;
    int32_t n_layer, n_kv_head, head_dim, n_ctx, n_seq_max;
    int32_t dtype;          /* TSR_DTYPE_F32 or TSR_DTYPE_F16 */
    size_t row_bytes;       /* one head's row of head_dim elements */
    int stamps;             /* rows keep arrival stamps (policies that evict the oldest) */
    int scores;             /* rows keep a score per entry (tsr_kv_heads) */
    tsr_kv_seq *seqs;       /* (n_seq_max) slots */
    uint64_t bytes_reserved, bytes_peak; /* K/V rows reserved now, and at most */
    int64_t entries;        /* rows held, all sequences, layers and heads */
    int64_t evicted;        /* rows the policy dropped (it counts them), for stats */
} tsr_kv_store;

static inline uint64_t tsr_kv_store_bytes_(const tsr_kv_store *s, int64_t cap) {
    return 2 * (uint64_t)s->n_kv_head * (uint64_t)cap * s->row_bytes;
}

/* Allocates the policy's instance (self_bytes, zeroed, a tsr_kv_store first) into *out and
 * sets the store up from init and the policy's ENUM parameter "dtype" (index 0 "f32", 1 "f16").
 * Refuses a shape with a non-positive size (n_ctx is the policy's to check, if it uses it) and
 * a backend whose buffers are device memory. Free the instance with tsr_kv_store_destroy. */
static inline tsr_status tsr_kv_store_create(const tsr_host *host, const tsr_params *params,
                                             const tsr_cache_init *init, size_t self_bytes,
                                             int stamps, void **out) {
    if (init->n_layer <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_seq_max <= 0) {
        host->set_error(host->ctx, "shape n_layer %d, n_kv_head %d, head_dim %d, n_seq_max %d: "
                        "expected positive sizes", (int)init->n_layer, (int)init->n_kv_head,
                        (int)init->head_dim, (int)init->n_seq_max);
        return TSR_E_INVALID;
    }
    if (init->memory_space != TSR_MEMORY_HOST) {
        host->set_error(host->ctx, "backend '%s' computes in device memory: this policy reads "
                        "and keeps K/V in host memory", init->backend_name ? init->backend_name : "?");
        return TSR_E_UNSUPPORTED;
    }
    tsr_kv_store *s = tsr_calloc(host, 1, self_bytes);
    if (s) s->seqs = tsr_calloc(host, (size_t)init->n_seq_max, sizeof(tsr_kv_seq));
    if (!s || !s->seqs) {
        if (s) host->free(host->ctx, s);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    s->host = host;
    s->n_layer = init->n_layer;
    s->n_kv_head = init->n_kv_head;
    s->head_dim = init->head_dim;
    s->n_ctx = init->n_ctx;
    s->n_seq_max = init->n_seq_max;
    s->dtype = tsr_param_int(params, "dtype") == 1 ? TSR_DTYPE_F16 : TSR_DTYPE_F32;
    s->row_bytes = (size_t)init->head_dim * (s->dtype == TSR_DTYPE_F16 ? 2 : 4);
    s->stamps = stamps;
    *out = s;
    return TSR_OK;
}

static inline tsr_kv_seq *tsr_kv_store_find(tsr_kv_store *s, int64_t id) {
    for (int32_t i = 0; i < s->n_seq_max; i++)
        if (s->seqs[i].alive && s->seqs[i].id == id) return &s->seqs[i];
    return NULL;
}

/* The live sequence `id`, or NULL with "<what>: unknown sequence <id>" set. */
static inline tsr_kv_seq *tsr_kv_store_find_or_fail(tsr_kv_store *s, int64_t id,
                                                    const char *what) {
    tsr_kv_seq *q = tsr_kv_store_find(s, id);
    if (!q) s->host->set_error(s->host->ctx, "%s: unknown sequence %lld", what, (long long)id);
    return q;
}

/* The live sequence `id` whose `layer` lies in [0, n_layer) (the store's own n_layer, or the
 * model's for a per-head store), or NULL with *status and the message set:
 * "<what>: unknown sequence <id>" (TSR_E_INVALID) or "<what>: layer <l> outside [0, n)"
 * (TSR_E_RANGE). */
static inline tsr_kv_seq *tsr_kv_store_find_layer(tsr_kv_store *s, int64_t id, int32_t layer,
                                                  int32_t n_layer, const char *what,
                                                  tsr_status *status) {
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(s, id, what);
    *status = q ? TSR_OK : TSR_E_INVALID;
    if (q && (layer < 0 || layer >= n_layer)) {
        s->host->set_error(s->host->ctx, "%s: layer %d outside [0, %d)", what, (int)layer,
                           (int)n_layer);
        *status = TSR_E_RANGE;
        q = NULL;
    }
    return q;
}

static inline void tsr_kv_rows_free_arrays_(const tsr_host *h, int32_t *pos, uint64_t *stamp,
                                            float *score, char *k, char *v) {
    h->free(h->ctx, pos);
    h->free(h->ctx, stamp);
    h->free(h->ctx, score);
    h->free(h->ctx, k);
    h->free(h->ctx, v);
}

/* Moves the layer to `cap` rows per head (cap >= L->n), keeping its entries, and accounts
 * the change in bytes_reserved / bytes_peak. */
static inline tsr_status tsr_kv_rows_resize(tsr_kv_store *s, tsr_kv_rows *L, int64_t cap) {
    const tsr_host *h = s->host;
    size_t head_bytes = (size_t)cap * s->row_bytes;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof(int32_t), 0);
    uint64_t *stamp = s->stamps ? h->alloc(h->ctx, (size_t)cap * sizeof(uint64_t), 0) : NULL;
    float *score = s->scores ? h->alloc(h->ctx, (size_t)cap * sizeof(float), 0) : NULL;
    char *k = h->alloc(h->ctx, (size_t)s->n_kv_head * head_bytes, 0);
    char *v = h->alloc(h->ctx, (size_t)s->n_kv_head * head_bytes, 0);
    if (!pos || (s->stamps && !stamp) || (s->scores && !score) || !k || !v) {
        tsr_kv_rows_free_arrays_(h, pos, stamp, score, k, v);
        h->set_error(h->ctx, "out of memory growing a layer to %lld rows", (long long)cap);
        return TSR_E_NOMEM;
    }
    if (L->n) {
        memcpy(pos, L->pos, (size_t)L->n * sizeof(int32_t));
        if (stamp) memcpy(stamp, L->stamp, (size_t)L->n * sizeof(uint64_t));
        if (score) memcpy(score, L->score, (size_t)L->n * sizeof(float));
        size_t used = (size_t)L->n * s->row_bytes, old_head = (size_t)L->cap * s->row_bytes;
        for (int32_t hd = 0; hd < s->n_kv_head; hd++) {
            memcpy(k + hd * head_bytes, L->k + hd * old_head, used);
            memcpy(v + hd * head_bytes, L->v + hd * old_head, used);
        }
    }
    tsr_kv_rows_free_arrays_(h, L->pos, L->stamp, L->score, L->k, L->v);
    s->bytes_reserved = s->bytes_reserved - tsr_kv_store_bytes_(s, L->cap) +
                        tsr_kv_store_bytes_(s, cap);
    if (s->bytes_reserved > s->bytes_peak) s->bytes_peak = s->bytes_reserved;
    L->pos = pos;
    L->stamp = stamp;
    L->score = score;
    L->k = k;
    L->v = v;
    L->cap = cap;
    return TSR_OK;
}

/* Frees the layer's rows and takes them out of the counters; the layer is left empty. */
static inline void tsr_kv_rows_free(tsr_kv_store *s, tsr_kv_rows *L) {
    tsr_kv_rows_free_arrays_(s->host, L->pos, L->stamp, L->score, L->k, L->v);
    s->bytes_reserved -= tsr_kv_store_bytes_(s, L->cap);
    s->entries -= L->n * s->n_kv_head;
    *L = (tsr_kv_rows){0};
}

/* Copies entry `from` (position, stamp, score, every head's K and V rows) over entry `to`. */
static inline void tsr_kv_rows_move(const tsr_kv_store *s, tsr_kv_rows *L, int64_t to,
                                    int64_t from) {
    size_t head_bytes = (size_t)L->cap * s->row_bytes, rb = s->row_bytes;
    L->pos[to] = L->pos[from];
    if (L->stamp) L->stamp[to] = L->stamp[from];
    if (L->score) L->score[to] = L->score[from];
    for (int32_t h = 0; h < s->n_kv_head; h++) {
        char *kh = L->k + h * head_bytes, *vh = L->v + h * head_bytes;
        memcpy(kh + (size_t)to * rb, kh + (size_t)from * rb, rb);
        memcpy(vh + (size_t)to * rb, vh + (size_t)from * rb, rb);
    }
}

static inline void tsr_kv_store_put_row_(const tsr_kv_store *s, char *dst, const float *src) {
    if (s->dtype == TSR_DTYPE_F32) {
        memcpy(dst, src, s->row_bytes);
        return;
    }
    for (int32_t d = 0; d < s->head_dim; d++) {
        uint16_t h = tsr_f32_to_f16(src[d]);
        memcpy(dst + 2 * (size_t)d, &h, 2);
    }
}

/* The checks every store callback starts with: a live sequence, a layer in range, and rows
 * that come with their positions, keys and values. Sets *seq on success. */
static inline tsr_status tsr_kv_store_check_write(tsr_kv_store *s, const tsr_kv_write *w,
                                                  tsr_kv_seq **seq) {
    const tsr_host *h = s->host;
    *seq = tsr_kv_store_find_or_fail(s, w->seq_id, "store");
    if (!*seq) return TSR_E_INVALID;
    if (w->layer < 0 || w->layer >= s->n_layer) {
        h->set_error(h->ctx, "store: layer %d outside [0, %d)", (int)w->layer, (int)s->n_layer);
        return TSR_E_RANGE;
    }
    if (w->n < 0 || (w->n > 0 && (!w->pos || !w->k || !w->v))) {
        h->set_error(h->ctx, "store: layer %d: %lld rows without pos, k or v", (int)w->layer,
                     (long long)w->n);
        return TSR_E_INVALID;
    }
    return TSR_OK;
}

/* For a policy that holds at most n_ctx positions a layer: refuses an init without n_ctx. */
static inline tsr_status tsr_kv_store_need_ctx(const tsr_host *host, const tsr_cache_init *init) {
    if (init->n_ctx > 0) return TSR_OK;
    host->set_error(host->ctx, "n_ctx %d: expected a positive size", (int)init->n_ctx);
    return TSR_E_INVALID;
}

/* For the same policies: every position of the write in [0, n_ctx), and the `held` entries of
 * the layer plus the write's within n_ctx; TSR_E_RANGE with the message otherwise. */
static inline tsr_status tsr_kv_store_check_ctx(const tsr_kv_store *s, const tsr_kv_write *w,
                                                int64_t held) {
    const tsr_host *h = s->host;
    for (int64_t t = 0; t < w->n; t++) {
        if (w->pos[t] < 0 || w->pos[t] >= s->n_ctx) {
            h->set_error(h->ctx, "store: sequence %lld layer %d: position %d outside [0, %d) "
                         "(n_ctx)", (long long)w->seq_id, (int)w->layer, (int)w->pos[t],
                         (int)s->n_ctx);
            return TSR_E_RANGE;
        }
    }
    if (held + w->n > s->n_ctx) {
        h->set_error(h->ctx, "store: sequence %lld layer %d: %lld + %lld entries exceed n_ctx %d",
                     (long long)w->seq_id, (int)w->layer, (long long)held, (long long)w->n,
                     (int)s->n_ctx);
        return TSR_E_RANGE;
    }
    return TSR_OK;
}

/* Gives the layer room for `need` rows: when they do not fit, the smallest of min_rows,
 * 2 min_rows, 4 min_rows... that does (at most n_ctx, which need does not exceed). With
 * `shrink`, rows over four times what is needed go back to that size too (a policy whose
 * rows only hold recent entries, after a long prompt). */
static inline tsr_status tsr_kv_rows_fit(tsr_kv_store *s, tsr_kv_rows *L, int64_t need,
                                         int64_t min_rows, int shrink) {
    int64_t floor = need > min_rows ? need : min_rows;
    if (need <= L->cap && !(shrink && L->cap > 4 * floor)) return TSR_OK;
    int64_t cap = min_rows;
    while (cap < need) cap *= 2;
    if (s->n_ctx > 0 && cap > s->n_ctx && need <= s->n_ctx) cap = s->n_ctx;
    return tsr_kv_rows_resize(s, L, cap);
}

/* Appends the write's rows after the L->n held (the caller made room: L->cap >= L->n + w->n),
 * converted to the store's dtype, with the sequence's next stamps. */
static inline void tsr_kv_rows_append(tsr_kv_store *s, tsr_kv_seq *seq, tsr_kv_rows *L,
                                      const tsr_kv_write *w) {
    size_t head_bytes = (size_t)L->cap * s->row_bytes;
    for (int64_t t = 0; t < w->n; t++) {
        L->pos[L->n + t] = w->pos[t];
        if (L->stamp) L->stamp[L->n + t] = seq->next_stamp++;
        for (int32_t hd = 0; hd < s->n_kv_head; hd++) {
            size_t src = ((size_t)t * (size_t)s->n_kv_head + (size_t)hd) * (size_t)s->head_dim;
            size_t dst = hd * head_bytes + (size_t)(L->n + t) * s->row_bytes;
            tsr_kv_store_put_row_(s, L->k + dst, w->k + src);
            tsr_kv_store_put_row_(s, L->v + dst, w->v + src);
        }
    }
    L->n += w->n;
    s->entries += w->n * s->n_kv_head;
}

/* Removes the first k entries of the layer (positions, stamps, every head's K and V rows),
 * keeping the others in order. The counters are the caller's: a policy that moved the entries
 * elsewhere (quantized them, merged them) still holds them; one that dropped them evicted them. */
static inline void tsr_kv_rows_drop_front(const tsr_kv_store *s, tsr_kv_rows *L, int64_t k) {
    if (k <= 0) return;
    int64_t left = L->n - k;
    size_t head_bytes = (size_t)L->cap * s->row_bytes, rb = s->row_bytes;
    memmove(L->pos, L->pos + k, (size_t)left * sizeof(int32_t));
    if (L->stamp) memmove(L->stamp, L->stamp + k, (size_t)left * sizeof(uint64_t));
    for (int32_t h = 0; h < s->n_kv_head; h++) {
        memmove(L->k + h * head_bytes, L->k + h * head_bytes + (size_t)k * rb, (size_t)left * rb);
        memmove(L->v + h * head_bytes, L->v + h * head_bytes + (size_t)k * rb, (size_t)left * rb);
    }
    L->n = left;
}

/* Bytes a policy allocated besides the store's rows (quantized codes, merged states, blocks),
 * added to or taken from bytes_reserved, with the peak kept. */
static inline void tsr_kv_store_account(tsr_kv_store *s, int64_t delta_bytes) {
    s->bytes_reserved = (uint64_t)((int64_t)s->bytes_reserved + delta_bytes);
    if (s->bytes_reserved > s->bytes_peak) s->bytes_peak = s->bytes_reserved;
}

/* The slot index of a live sequence, for policies that keep per-sequence state of their own in
 * an array parallel to the store's slots (n_seq_max). */
static inline int32_t tsr_kv_store_slot(const tsr_kv_store *s, const tsr_kv_seq *q) {
    return (int32_t)(q - s->seqs);
}

/* ---- vtable callbacks: `self` is the policy's instance, a tsr_kv_store first ------------- */

static inline tsr_status tsr_kv_store_seq_begin(void *self, int64_t id) {
    tsr_kv_store *s = self;
    if (tsr_kv_store_find(s, id)) {
        s->host->set_error(s->host->ctx, "seq_begin: sequence %lld is already alive",
                           (long long)id);
        return TSR_E_STATE;
    }
    for (int32_t i = 0; i < s->n_seq_max; i++) {
        tsr_kv_seq *q = &s->seqs[i];
        if (q->alive) continue;
        q->layers = tsr_calloc(s->host, (size_t)s->n_layer, sizeof(tsr_kv_rows));
        if (!q->layers) {
            s->host->set_error(s->host->ctx, "seq_begin: out of memory");
            return TSR_E_NOMEM;
        }
        for (int32_t l = 0; l < s->n_layer; l++) q->layers[l].evicted_max_pos = -1;
        q->id = id;
        q->alive = 1;
        q->next_stamp = 1;
        return TSR_OK;
    }
    s->host->set_error(s->host->ctx, "seq_begin: sequence %lld: all %d sequences (n_seq_max) are "
                       "alive", (long long)id, (int)s->n_seq_max);
    return TSR_E_RANGE;
}

/* Frees every layer of a live sequence and its slot. */
static inline void tsr_kv_store_seq_free(tsr_kv_store *s, tsr_kv_seq *q) {
    for (int32_t l = 0; l < s->n_layer; l++) tsr_kv_rows_free(s, &q->layers[l]);
    s->host->free(s->host->ctx, q->layers);
    *q = (tsr_kv_seq){0};
}

static inline void tsr_kv_store_seq_end(void *self, int64_t id) {
    tsr_kv_store *s = self;
    tsr_kv_seq *q = tsr_kv_store_find(s, id);
    if (q) tsr_kv_store_seq_free(s, q);
}

static inline tsr_status tsr_kv_store_seq_fork(void *self, int64_t src, int64_t dst) {
    tsr_kv_store *s = self;
    tsr_kv_seq *from_seq = tsr_kv_store_find_or_fail(s, src, "seq_fork");
    if (!from_seq) return TSR_E_INVALID;
    tsr_status st = tsr_kv_store_seq_begin(s, dst);
    if (st < 0) return st;
    tsr_kv_seq *to_seq = tsr_kv_store_find(s, dst);
    to_seq->next_stamp = from_seq->next_stamp;
    for (int32_t l = 0; l < s->n_layer; l++) {
        const tsr_kv_rows *from = &from_seq->layers[l];
        tsr_kv_rows *to = &to_seq->layers[l];
        to->evicted_max_pos = from->evicted_max_pos;
        to->score_from_pos = from->score_from_pos;
        if (!from->cap) continue;
        st = tsr_kv_rows_resize(s, to, from->cap);
        if (st < 0) {
            tsr_kv_store_seq_free(s, to_seq);
            return st;
        }
        memcpy(to->pos, from->pos, (size_t)from->n * sizeof(int32_t));
        if (to->stamp) memcpy(to->stamp, from->stamp, (size_t)from->n * sizeof(uint64_t));
        if (to->score) memcpy(to->score, from->score, (size_t)from->n * sizeof(float));
        size_t bytes = (size_t)s->n_kv_head * (size_t)from->cap * s->row_bytes;
        memcpy(to->k, from->k, bytes);
        memcpy(to->v, from->v, bytes);
        to->n = from->n;
        s->entries += to->n * s->n_kv_head;
    }
    return TSR_OK;
}

/* Keeps the entries below n_pos, in their order; TSR_E_UNSUPPORTED (nothing changed) when a
 * layer already evicted a position at or after the cut. */
static inline tsr_status tsr_kv_store_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    tsr_kv_store *s = self;
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(s, id, "seq_truncate");
    if (!q) return TSR_E_INVALID;
    if (n_pos < 0) {
        s->host->set_error(s->host->ctx, "seq_truncate: sequence %lld: position %d is negative",
                           (long long)id, (int)n_pos);
        return TSR_E_RANGE;
    }
    for (int32_t l = 0; l < s->n_layer; l++) {
        if (q->layers[l].evicted_max_pos >= n_pos) {
            s->host->set_error(s->host->ctx,
                               "seq_truncate: sequence %lld: layer %d already evicted position "
                               "%d >= %d; this policy cannot bring it back",
                               (long long)id, (int)l, (int)q->layers[l].evicted_max_pos,
                               (int)n_pos);
            return TSR_E_UNSUPPORTED;
        }
    }
    for (int32_t l = 0; l < s->n_layer; l++) {
        tsr_kv_rows *L = &q->layers[l];
        int64_t kept = 0;
        for (int64_t j = 0; j < L->n; j++) {
            if (L->pos[j] >= n_pos) continue;
            if (kept != j) tsr_kv_rows_move(s, L, kept, j);
            kept++;
        }
        s->entries -= (L->n - kept) * s->n_kv_head;
        L->n = kept;
    }
    return TSR_OK;
}

/* Every KV head sees all the entries the layer holds, in slot order. */
static inline tsr_status tsr_kv_store_view(void *self, int64_t id, int32_t layer, int32_t phase,
                                           tsr_kv_view *views) {
    (void)phase;
    tsr_kv_store *s = self;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(s, id, layer, s->n_layer, "view", &st);
    if (!q) return st;
    const tsr_kv_rows *L = &q->layers[layer];
    size_t head_bytes = (size_t)L->cap * s->row_bytes;
    for (int32_t h = 0; h < s->n_kv_head; h++) {
        views[h] = (tsr_kv_view){
            TSR_SIZED(tsr_kv_view),
            .n = L->n,
            .pos = L->pos,
            .dtype = s->dtype,
            .k = L->k ? L->k + h * head_bytes : NULL,
            .v = L->v ? L->v + h * head_bytes : NULL,
            .k_stride = s->row_bytes,
            .v_stride = s->row_bytes,
        };
    }
    return TSR_OK;
}

static inline void tsr_kv_store_stats(void *self, tsr_cache_stats *out) {
    const tsr_kv_store *s = self;
    out->bytes_reserved = s->bytes_reserved;
    out->bytes_peak = s->bytes_peak;
    out->entries = s->entries;
    out->evicted = s->evicted;
    if (out->struct_size >= offsetof(tsr_cache_stats, bits_per_value) + sizeof(double))
        out->bits_per_value = 8.0 * (double)s->row_bytes / (double)s->head_dim;
}

/* Frees every live sequence, the slots and the instance itself. A policy with storage of its
 * own frees that first, then calls this. */
static inline void tsr_kv_store_destroy(void *self) {
    tsr_kv_store *s = self;
    for (int32_t i = 0; i < s->n_seq_max; i++)
        if (s->seqs[i].alive) tsr_kv_store_seq_free(s, &s->seqs[i]);
    s->host->free(s->host->ctx, s->seqs);
    s->host->free(s->host->ctx, s);
}

/* ---- a policy with state of its own per sequence --------------------------------------- */

/* Besides the rows, a policy may keep per-sequence state in arrays parallel to the slots
 * (tsr_kv_store_slot). It gives an init, which makes that state for a new sequence (a copy of
 * `from`'s when not NULL: a fork), and a fini, which frees it and takes what it held out of the
 * counters; fini must also undo an init that failed halfway (state zeroed before it starts).
 * The callbacks below run them around the store's own. */
typedef tsr_status (*tsr_kv_seq_init_fn)(void *self, tsr_kv_seq *q, const tsr_kv_seq *from);
typedef void (*tsr_kv_seq_fini_fn)(void *self, tsr_kv_seq *q);

static inline tsr_status tsr_kv_store_seq_begin_with(void *self, int64_t id,
                                                     tsr_kv_seq_init_fn init,
                                                     tsr_kv_seq_fini_fn fini) {
    tsr_status st = tsr_kv_store_seq_begin(self, id);
    if (st < 0) return st;
    tsr_kv_seq *q = tsr_kv_store_find(self, id);
    if ((st = init(self, q, NULL)) < 0) {
        fini(self, q);
        tsr_kv_store_seq_free(self, q);
    }
    return st;
}

static inline tsr_status tsr_kv_store_seq_fork_with(void *self, int64_t src, int64_t dst,
                                                    tsr_kv_seq_init_fn init,
                                                    tsr_kv_seq_fini_fn fini) {
    tsr_status st = tsr_kv_store_seq_fork(self, src, dst);
    if (st < 0) return st;
    tsr_kv_seq *q = tsr_kv_store_find(self, dst);
    if ((st = init(self, q, tsr_kv_store_find(self, src))) < 0) {
        fini(self, q);
        tsr_kv_store_seq_free(self, q);
    }
    return st;
}

static inline void tsr_kv_store_seq_end_with(void *self, int64_t id, tsr_kv_seq_fini_fn fini) {
    tsr_kv_seq *q = tsr_kv_store_find(self, id);
    if (!q) return;
    fini(self, q);
    tsr_kv_store_seq_free(self, q);
}

/* Frees every live sequence's own state (a destroy does this first, then frees the policy's
 * arrays and calls tsr_kv_store_destroy). */
static inline void tsr_kv_store_fini_all(void *self, tsr_kv_seq_fini_fn fini) {
    tsr_kv_store *s = self;
    for (int32_t i = 0; i < s->n_seq_max; i++)
        if (s->seqs[i].alive) fini(self, &s->seqs[i]);
}

/* What a policy with storage of its own holds in `layer` of sequence q: the bits of its
 * storage (scales and rows included) added to *bits, and the K and V elements they stand for
 * to *values. */
typedef void (*tsr_kv_bits_fn)(const void *self, const tsr_kv_seq *q, int32_t layer,
                               double *bits, double *values);

/* tsr_kv_store_stats with bits_per_value from `bits` over every live (sequence, layer). */
static inline void tsr_kv_store_stats_with(void *self, tsr_cache_stats *out, tsr_kv_bits_fn bits) {
    const tsr_kv_store *s = self;
    tsr_kv_store_stats(self, out);
    if (out->struct_size < offsetof(tsr_cache_stats, bits_per_value) + sizeof(double)) return;
    double b = 0.0, values = 0.0;
    for (int32_t i = 0; i < s->n_seq_max; i++)
        for (int32_t l = 0; s->seqs[i].alive && l < s->n_layer; l++)
            bits(self, &s->seqs[i], l, &b, &values);
    out->bits_per_value = values > 0 ? b / values : 0.0;
}

/* The vtable entries that need nothing of a policy but its tsr_kv_store (a policy with hooks
 * of its own there lists them one by one instead). */
#define TSR_KV_STORE_CALLBACKS                                                             \
    .seq_begin = tsr_kv_store_seq_begin, .seq_end = tsr_kv_store_seq_end,                 \
    .seq_fork = tsr_kv_store_seq_fork, .seq_truncate = tsr_kv_store_seq_truncate,         \
    .view = tsr_kv_store_view, .stats = tsr_kv_store_stats

/* ---- per-head stores: entries chosen for each KV head by the attention they receive -------- */

/*
 * Policies that evict by attention (H2O, TOVA, SnapKV) keep a different set of entries for
 * each KV head of a layer. A tsr_kv_heads is a tsr_kv_store whose "layers" are the model's
 * (layer, KV head) pairs, one head each (tsr_kv_heads_rows), so the rows, counters and the
 * callbacks above serve it unchanged; every entry also carries a score, which the views hand
 * to attention as score_acc. The policy's instance starts with it:
 *
 *   typedef struct my_cache { tsr_kv_heads kh; int64_t budget; } my_cache;
 *   create:   tsr_kv_heads_create(host, params, init, sizeof(my_cache), out)
 *   store:    tsr_kv_heads_store(&c->kh, w, budget, observe, &seq), then the policy's own work
 *   step_end: tsr_kv_heads_evict(&c->kh, L, L->score, protect_from, L->n - budget) per rows
 *   static const tsr_cache_vtable vt = { TSR_SIZED(tsr_cache_vtable), .create = my_create,
 *       .destroy = tsr_kv_heads_destroy, .store = my_store, .step_end = my_step_end,
 *       TSR_KV_HEADS_CALLBACKS };
 *
 * Eviction refills each hole with the entry from the end of the rows, so the views are not in
 * position order once a policy evicted (the ABI allows it); before that they are in the order
 * stored, as 'full' shows them.
 */
typedef struct tsr_kv_heads {
    tsr_kv_store kv;            /* first: its layers are (layer, KV head) pairs of one head */
    int32_t n_layer, n_kv_head; /* the model's */
    /* Scratch of the eviction helpers, (scratch_cap) each: a key per entry for a policy that
     * ranks by something else than the score, and a second array of its own; the entries
     * tsr_kv_heads_pick marked for dropping; the candidates in selection order. */
    float *key, *aux;
    uint8_t *drop;
    int64_t *order;
    int64_t scratch_cap;
} tsr_kv_heads;

/* Allocates the policy's instance (self_bytes, a tsr_kv_heads first) as tsr_kv_store_create
 * does, with its refusals and its "dtype" parameter, and refuses an n_ctx that is not
 * positive: a head's rows never outgrow n_ctx. Free it with tsr_kv_heads_destroy. */
static inline tsr_status tsr_kv_heads_create(const tsr_host *host, const tsr_params *params,
                                             const tsr_cache_init *init, size_t self_bytes,
                                             void **out) {
    if (init->n_ctx <= 0) {
        host->set_error(host->ctx, "n_ctx %d: expected a positive size", (int)init->n_ctx);
        return TSR_E_INVALID;
    }
    void *self;
    tsr_status st = tsr_kv_store_create(host, params, init, self_bytes, 0, &self);
    if (st < 0) return st;
    tsr_kv_heads *kh = self;
    kh->n_layer = kh->kv.n_layer;
    kh->n_kv_head = kh->kv.n_kv_head;
    if (kh->n_layer > INT32_MAX / kh->n_kv_head) {
        tsr_kv_store_destroy(kh);
        host->set_error(host->ctx, "shape n_layer %d, n_kv_head %d: more heads than this policy "
                        "counts", (int)init->n_layer, (int)init->n_kv_head);
        return TSR_E_INVALID;
    }
    kh->kv.n_layer = kh->n_layer * kh->n_kv_head;
    kh->kv.n_kv_head = 1;
    kh->kv.scores = 1;
    *out = kh;
    return TSR_OK;
}

/* The rows of KV head `head` of `layer` in sequence q. */
static inline tsr_kv_rows *tsr_kv_heads_rows(const tsr_kv_heads *kh, const tsr_kv_seq *q,
                                             int32_t layer, int32_t head) {
    return &q->layers[(size_t)layer * (size_t)kh->n_kv_head + (size_t)head];
}

/* What every store callback of a per-head policy does first: checks the write, makes room in
 * each head of the layer and appends the rows there, each with a score of 0. `keep`: the
 * entries the policy keeps per head between forwards, so the rows hold keep + w->n of them
 * (at most n_ctx) and shrink back after a larger write; 0: no bound, the rows grow by
 * doubling from 16. `observe`: how many of the write's last queries attention adds to the
 * scores (the views' score_from_pos is the first of them; INT64_MAX: all); 0: none, and the
 * views ask for no scores. Sets *seq. */
static inline tsr_status tsr_kv_heads_store(tsr_kv_heads *kh, const tsr_kv_write *w,
                                            int64_t keep, int64_t observe, tsr_kv_seq **seq) {
    tsr_kv_store *s = &kh->kv;
    tsr_status st;
    *seq = tsr_kv_store_find_layer(s, w->seq_id, w->layer, kh->n_layer, "store", &st);
    if (!*seq || (st = tsr_kv_store_check_write(s, w, seq)) < 0 || w->n == 0) return st;
    /* The positions of a write ascend one by one (CACHE_9): the first is the lowest. */
    if (w->pos[0] < 0) {
        s->host->set_error(s->host->ctx, "store: sequence %lld layer %d: negative position %d",
                           (long long)w->seq_id, (int)w->layer, (int)w->pos[0]);
        return TSR_E_RANGE;
    }
    /* Room in every head first, so that a failure leaves the layer as it was. */
    for (int32_t h = 0; h < kh->n_kv_head; h++) {
        tsr_kv_rows *L = tsr_kv_heads_rows(kh, *seq, w->layer, h);
        int64_t need = L->n + w->n, cap = L->cap;
        if (keep > 0) {
            int64_t target = keep + w->n < s->n_ctx ? keep + w->n : s->n_ctx;
            if (target < need) target = need;
            if (cap < target || cap >= 2 * target) cap = target;
        } else if (need > cap) {
            for (cap = cap ? cap : 16; cap < need; cap *= 2) {}
        }
        if (cap != L->cap && (st = tsr_kv_rows_resize(s, L, cap)) < 0) return st;
    }
    int32_t last = w->pos[w->n - 1];
    int32_t from = observe <= 0         ? TSR_KV_NO_SCORES
                   : observe >= w->n    ? w->pos[0]
                                        : last + 1 - (int32_t)observe;
    for (int32_t h = 0; h < kh->n_kv_head; h++) {
        tsr_kv_rows *L = tsr_kv_heads_rows(kh, *seq, w->layer, h);
        for (int64_t t = 0; t < w->n; t++) {
            size_t src = ((size_t)t * (size_t)kh->n_kv_head + (size_t)h) * (size_t)s->head_dim;
            size_t dst = (size_t)(L->n + t) * s->row_bytes;
            L->pos[L->n + t] = w->pos[t];
            L->score[L->n + t] = 0.0f;
            tsr_kv_store_put_row_(s, L->k + dst, w->k + src);
            tsr_kv_store_put_row_(s, L->v + dst, w->v + src);
        }
        L->n += w->n;
        L->next_pos = last + 1;
        L->score_from_pos = from;
        s->entries += w->n;
    }
    return TSR_OK;
}

/* The view callback: each KV head sees the entries it keeps, with its scores as score_acc when
 * the last store asked attention for them. */
static inline tsr_status tsr_kv_heads_view(void *self, int64_t id, int32_t layer, int32_t phase,
                                           tsr_kv_view *views) {
    (void)phase;
    tsr_kv_heads *kh = self;
    tsr_kv_store *s = &kh->kv;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(s, id, layer, kh->n_layer, "view", &st);
    if (!q) return st;
    for (int32_t h = 0; h < kh->n_kv_head; h++) {
        tsr_kv_rows *L = tsr_kv_heads_rows(kh, q, layer, h);
        int scored = L->n > 0 && L->score_from_pos != TSR_KV_NO_SCORES;
        views[h] = (tsr_kv_view){
            TSR_SIZED(tsr_kv_view),
            .n = L->n,
            .pos = L->pos,
            .dtype = s->dtype,
            .k = L->k,
            .v = L->v,
            .k_stride = s->row_bytes,
            .v_stride = s->row_bytes,
            .score_acc = scored ? L->score : NULL,
            .score_from_pos = scored ? L->score_from_pos : 0,
        };
    }
    return TSR_OK;
}

/* The seq_truncate callback: tsr_kv_store_seq_truncate, refusing with the layer and KV head
 * that already evicted a position at or after the cut. */
static inline tsr_status tsr_kv_heads_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    tsr_kv_heads *kh = self;
    tsr_kv_seq *q = tsr_kv_store_find(&kh->kv, id);
    for (int32_t i = 0; q && n_pos >= 0 && i < kh->kv.n_layer; i++) {
        if (q->layers[i].evicted_max_pos < n_pos) continue;
        kh->kv.host->set_error(kh->kv.host->ctx,
                               "seq_truncate: sequence %lld: layer %d KV head %d already "
                               "evicted position %d >= %d; this policy cannot bring it back",
                               (long long)id, (int)(i / kh->n_kv_head), (int)(i % kh->n_kv_head),
                               (int)q->layers[i].evicted_max_pos, (int)n_pos);
        return TSR_E_UNSUPPORTED;
    }
    return tsr_kv_store_seq_truncate(self, id, n_pos);
}

/* Makes the scratch arrays hold at least n entries (their contents are lost when they grow):
 * call it before filling kh->key or kh->aux. */
static inline tsr_status tsr_kv_heads_scratch(tsr_kv_heads *kh, int64_t n) {
    if (n <= kh->scratch_cap) return TSR_OK;
    const tsr_host *h = kh->kv.host;
    float *key = h->alloc(h->ctx, (size_t)n * sizeof(float), 0);
    float *aux = h->alloc(h->ctx, (size_t)n * sizeof(float), 0);
    uint8_t *drop = h->alloc(h->ctx, (size_t)n, 0);
    int64_t *order = h->alloc(h->ctx, (size_t)n * sizeof(int64_t), 0);
    if (!key || !aux || !drop || !order) {
        h->free(h->ctx, key);
        h->free(h->ctx, aux);
        h->free(h->ctx, drop);
        h->free(h->ctx, order);
        h->set_error(h->ctx, "out of memory ranking %lld entries", (long long)n);
        return TSR_E_NOMEM;
    }
    h->free(h->ctx, kh->key);
    h->free(h->ctx, kh->aux);
    h->free(h->ctx, kh->drop);
    h->free(h->ctx, kh->order);
    kh->key = key;
    kh->aux = aux;
    kh->drop = drop;
    kh->order = order;
    kh->scratch_cap = n;
    return TSR_OK;
}

/* Whether entry a ranks below entry b: a lower key, or the same key at a lower position (the
 * positions of one head are unique, so this orders every entry). */
static inline int tsr_kv_heads_below_(const float *key, const int32_t *pos, int64_t a,
                                      int64_t b) {
    return key[a] < key[b] || (key[a] == key[b] && pos[a] < pos[b]);
}

/* Reorders idx (m entries) so that its first k (0 < k < m) are the k that rank lowest: Hoare's
 * selection, in expected linear time. */
static inline void tsr_kv_heads_select_(int64_t *idx, int64_t m, int64_t k, const float *key,
                                        const int32_t *pos) {
    int64_t lo = 0, hi = m - 1, t = k - 1;
    while (lo < hi) {
        int64_t pivot = idx[lo + (hi - lo) / 2], i = lo, j = hi;
        while (i <= j) {
            while (tsr_kv_heads_below_(key, pos, idx[i], pivot)) i++;
            while (tsr_kv_heads_below_(key, pos, pivot, idx[j])) j--;
            if (i <= j) {
                int64_t x = idx[i];
                idx[i++] = idx[j];
                idx[j--] = x;
            }
        }
        /* [lo, j] ranks below the pivot, [i, hi] above, and between them lies the pivot. */
        if (t <= j) hi = j;
        else if (t >= i) lo = i;
        else return;
    }
}

/* Marks in kh->drop the n_evict entries of L that rank lowest by key (ties: the lower position
 * first) among those at positions below protect_from, or all of these when there are fewer.
 * key (L->n) may be kh->key. Returns how many it marked, or a negative status. */
static inline int64_t tsr_kv_heads_pick(tsr_kv_heads *kh, const tsr_kv_rows *L,
                                        const float *key, int32_t protect_from,
                                        int64_t n_evict) {
    tsr_status st = tsr_kv_heads_scratch(kh, L->n);
    if (st < 0) return st;
    int64_t m = 0;
    for (int64_t j = 0; j < L->n; j++) {
        kh->drop[j] = 0;
        if (L->pos[j] < protect_from) kh->order[m++] = j;
    }
    if (n_evict <= 0) return 0;
    if (n_evict < m) tsr_kv_heads_select_(kh->order, m, n_evict, key, L->pos);
    else n_evict = m;
    for (int64_t i = 0; i < n_evict; i++) kh->drop[kh->order[i]] = 1;
    return n_evict;
}

/* Drops the entries marked in kh->drop (by tsr_kv_heads_pick on L, or on another head of the
 * layer that holds the same positions in the same slots) and counts them evicted. */
static inline void tsr_kv_heads_drop(tsr_kv_heads *kh, tsr_kv_rows *L) {
    tsr_kv_store *s = &kh->kv;
    int64_t n_drop = 0;
    for (int64_t j = 0; j < L->n; j++) {
        if (!kh->drop[j]) continue;
        n_drop++;
        if (L->pos[j] > L->evicted_max_pos) L->evicted_max_pos = L->pos[j];
    }
    /* Each hole below the new end takes the last entry kept above it: one row copied per
     * eviction, rather than shifting every later entry. */
    int64_t new_n = L->n - n_drop, src = L->n - 1;
    for (int64_t j = 0; j < new_n; j++) {
        if (!kh->drop[j]) continue;
        while (kh->drop[src]) src--;
        tsr_kv_rows_move(s, L, j, src--);
    }
    L->n = new_n;
    s->entries -= n_drop;
    s->evicted += n_drop;
}

/* tsr_kv_heads_pick, then tsr_kv_heads_drop. */
static inline tsr_status tsr_kv_heads_evict(tsr_kv_heads *kh, tsr_kv_rows *L, const float *key,
                                            int32_t protect_from, int64_t n_evict) {
    int64_t marked = tsr_kv_heads_pick(kh, L, key, protect_from, n_evict);
    if (marked < 0) return (tsr_status)marked;
    if (marked > 0) tsr_kv_heads_drop(kh, L);
    return TSR_OK;
}

/* H2O's rule (Zhang et al. 2023) on every layer and KV head of q: beyond heavy + recent
 * entries, keep the `recent` latest positions and, of the others, the `heavy` with the
 * highest score. */
static inline tsr_status tsr_kv_heads_keep_heavy(tsr_kv_heads *kh, tsr_kv_seq *q, int64_t heavy,
                                                 int64_t recent) {
    for (int32_t i = 0; i < kh->kv.n_layer; i++) {
        tsr_kv_rows *L = &q->layers[i];
        int64_t excess = L->n - heavy - recent, from = (int64_t)L->next_pos - recent;
        if (excess <= 0) continue;
        tsr_status st = tsr_kv_heads_evict(kh, L, L->score, from < 0 ? 0 : (int32_t)from, excess);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* Frees the scratch, then everything tsr_kv_store_destroy frees. */
static inline void tsr_kv_heads_destroy(void *self) {
    tsr_kv_heads *kh = self;
    const tsr_host *h = kh->kv.host;
    h->free(h->ctx, kh->key);
    h->free(h->ctx, kh->aux);
    h->free(h->ctx, kh->drop);
    h->free(h->ctx, kh->order);
    tsr_kv_store_destroy(kh);
}

/* The vtable entries of a per-head policy that need nothing but its tsr_kv_heads. */
#define TSR_KV_HEADS_CALLBACKS                                                             \
    .seq_begin = tsr_kv_store_seq_begin, .seq_end = tsr_kv_store_seq_end,                 \
    .seq_fork = tsr_kv_store_seq_fork, .seq_truncate = tsr_kv_heads_seq_truncate,         \
    .view = tsr_kv_heads_view, .stats = tsr_kv_store_stats


/* ---- quantized K/V: codes of a few bits on an asymmetric grid (KIVI, ZipCache) ------------ */

/* The widest head these helpers serve: a policy keeps one head's weights on the stack. */
#define TSR_KVQ_MAX_HEAD_DIM 512

/* Refuses a head wider than TSR_KVQ_MAX_HEAD_DIM. */
static inline tsr_status tsr_kvq_check_head(const tsr_host *host, const tsr_cache_init *init) {
    if (init->head_dim <= TSR_KVQ_MAX_HEAD_DIM) return TSR_OK;
    host->set_error(host->ctx, "head_dim %d: this policy serves heads of at most %d",
                    (int)init->head_dim, TSR_KVQ_MAX_HEAD_DIM);
    return TSR_E_UNSUPPORTED;
}

/* x as f16 rounded toward -infinity (up = 0) or +infinity (up = 1); beyond the f16 range
 * (|x| > 65504) x is clamped to it. */
static inline uint16_t tsr_kvq_f16_toward(float x, int up) {
    if (x > 65504.0f) x = 65504.0f;
    if (x < -65504.0f) x = -65504.0f;
    uint16_t h = tsr_f32_to_f16(x);
    float back = tsr_f16_to_f32(h);
    if (up ? back >= x : back <= x) return h;
    /* One unit in the last place toward the side asked for: a zero steps to the smallest
     * subnormal of that side; otherwise the magnitude grows when moving away from zero. */
    if ((h & 0x7fffu) == 0) return up ? 0x0001u : 0x8001u;
    int away = (up != 0) == ((h & 0x8000u) == 0);
    return (uint16_t)(away ? h + 1u : h - 1u);
}

/* The grid of `bits`-bit codes for values in [lo, hi]: zero z = lo rounded down to f16, step
 * s = (hi - z) / (2^bits - 1) rounded up to f16. Every value of [lo, hi] then lies within s / 2
 * of a grid point z + code * s (code in [0, 2^bits - 1]), whatever the f16 rounding. */
static inline void tsr_kvq_grid(float lo, float hi, int32_t bits, uint16_t *zero, uint16_t *step) {
    *zero = tsr_kvq_f16_toward(lo, 0);
    float z = tsr_f16_to_f32(*zero);
    *step = tsr_kvq_f16_toward((hi - z) / (float)((1u << bits) - 1u), 1);
}

/* The code of x on the grid (z, s): round((x - z) / s) clamped to [0, 2^bits - 1]; 0 when the
 * step is 0 (every value of the group equal to z). */
static inline uint32_t tsr_kvq_code(float x, float z, float s, int32_t bits) {
    if (!(s > 0.0f)) return 0;
    float top = (float)((1u << bits) - 1u), f = (x - z) / s + 0.5f;
    if (!(f >= 1.0f)) return 0;
    return f >= top ? (uint32_t)top : (uint32_t)f;
}

/* Sixteen float lanes in GNU C vector extensions: one zmm, two ymm or four xmm registers,
 * whichever TSR_VECTOR_CLONES' clone runs. Lane-wise arithmetic rounds the same in every width,
 * and every sum over lanes below adds them in one fixed order, so all builds agree bit for bit.
 * Vectors pass between helpers by pointer only: a vector argument or result would change the
 * calling convention from one clone to the other. */
typedef float tsr_kvq_f32x16 __attribute__((vector_size(64)));
typedef uint32_t tsr_kvq_u32x16 __attribute__((vector_size(64)));
typedef uint16_t tsr_kvq_u16x16 __attribute__((vector_size(32)));

typedef float tsr_kvq_f32x8 __attribute__((vector_size(32)));
typedef float tsr_kvq_f32x4 __attribute__((vector_size(16)));

/* The lanes' sum: halves added pairwise, lane l with lane l + 8, then + 4, + 2, + 1. */
static inline __attribute__((always_inline)) float tsr_kvq_sum(const tsr_kvq_f32x16 *v) {
    tsr_kvq_f32x8 h8 = __builtin_shufflevector(*v, *v, 0, 1, 2, 3, 4, 5, 6, 7) +
                       __builtin_shufflevector(*v, *v, 8, 9, 10, 11, 12, 13, 14, 15);
    tsr_kvq_f32x4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) +
                       __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
    return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

/* IEEE half -> float for finite halves (the grids hold no infinity or NaN); the same value as
 * tsr_f16_to_f32. */
static inline __attribute__((always_inline)) float tsr_kvq_f16(uint16_t h) {
    uint32_t mag = h & 0x7fffu, normal = (mag << 13) + 0x38000000u, bits;
    float f;
    memcpy(&f, &normal, sizeof f);
    /* A subnormal half is mag * 2^-24 exactly. */
    f = mag < 0x400u ? (float)mag * 0x1p-24f : f;
    memcpy(&bits, &f, sizeof bits);
    bits |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* dst[i] = tsr_kvq_f16(src[i]) for n halves, sixteen at a time. */
static inline __attribute__((always_inline)) void tsr_kvq_f16_row(float *dst, const uint16_t *src,
                                                                  int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        tsr_kvq_u16x16 h;
        memcpy(&h, src + i, sizeof h);
        tsr_kvq_u32x16 x = __builtin_convertvector(h, tsr_kvq_u32x16), mag = x & 0x7fffu;
        tsr_kvq_u32x16 normal = (mag << 13) + 0x38000000u;
        tsr_kvq_u32x16 sub = (tsr_kvq_u32x16)(__builtin_convertvector(mag, tsr_kvq_f32x16) *
                                              0x1p-24f);
        tsr_kvq_u32x16 small = (tsr_kvq_u32x16)(mag < 0x400u);
        tsr_kvq_u32x16 bits = (sub & small) | (normal & ~small) | ((x & 0x8000u) << 16);
        memcpy(dst + i, &bits, sizeof bits);
    }
    for (; i < n; i++) dst[i] = tsr_kvq_f16(src[i]);
}

/* The sum of a[i] * b[i] over n floats: sixteen lanes, then the tail, in a fixed order (the f32
 * rows a quantizing policy keeps beside its codes). */
static inline __attribute__((always_inline)) float tsr_kvq_dot_f32(const float *a, const float *b,
                                                                   int32_t n) {
    tsr_kvq_f32x16 acc = {0}, x, y;
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        acc += x * y;
    }
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return tsr_kvq_sum(&acc) + tail;
}

/* Codes in lanes. A row of head_dim codes of `bits` bits (2, 4 or 8) is cut into slots of 16
 * channels, channel d in lane d % 16 of slot d / 16. A lane keeps a row's codes for all its
 * slots in `unit` bits (slots * bits rounded up to a power of two, or to whole 32-bit words),
 * and `per_word` consecutive rows share the lane's words: rows [k per_word, (k+1) per_word)
 * form a group of 16 * words 32-bit words, lane l's words at l, l + 16, ... So one slot of one
 * row unpacks with a load of 16 words, a shift and a mask: sixteen codes in sixteen lanes,
 * with no widening of bytes (which the vectoriser handles poorly). */
typedef struct tsr_kvq_layout {
    int32_t bits, slots;
    int32_t unit;     /* bits of one row in one lane */
    int32_t per_word; /* rows that share a group: 1 << per_word_log2 */
    int32_t per_word_log2;
    int32_t words;    /* 32-bit words per lane in a group */
} tsr_kvq_layout;

static inline tsr_kvq_layout tsr_kvq_layout_make(int32_t head_dim, int32_t bits) {
    tsr_kvq_layout L = {bits, (head_dim + 15) / 16, 0, 1, 0, 1};
    int32_t need = L.slots * bits;
    if (need <= 32) {
        for (L.unit = bits; L.unit < need; L.unit *= 2) {}
        for (L.per_word = 32 / L.unit; (1 << L.per_word_log2) < L.per_word; L.per_word_log2++) {}
    } else {
        L.words = (need + 31) / 32;
        L.unit = 32 * L.words;
    }
    return L;
}

/* Bytes that hold n rows. */
static inline size_t tsr_kvq_bytes(const tsr_kvq_layout *L, int64_t n) {
    return (size_t)((n + L->per_word - 1) / L->per_word) * (size_t)L->words * 64;
}

/* The words of row r's group in `codes`, and the bit where the row starts in its lanes. */
static inline __attribute__((always_inline)) const uint32_t *
tsr_kvq_row(const tsr_kvq_layout *L, const void *codes, int64_t r, uint32_t *at) {
    *at = (uint32_t)(r & (L->per_word - 1)) * (uint32_t)L->unit;
    return (const uint32_t *)codes + (size_t)(r >> L->per_word_log2) * (size_t)L->words * 16;
}

/* The first word of slot `slot` of row r in `codes`, and the shift of its code in it. */
static inline __attribute__((always_inline)) const uint32_t *
tsr_kvq_slot(const tsr_kvq_layout *L, const void *codes, int64_t r, int32_t slot,
             uint32_t *shift) {
    uint32_t at;
    const uint32_t *group = tsr_kvq_row(L, codes, r, &at);
    at += (uint32_t)(slot * L->bits);
    *shift = at % 32;
    return group + (size_t)(at / 32) * 16;
}

/* Sets channel d of row r to `code`. */
static inline void tsr_kvq_set(const tsr_kvq_layout *L, void *codes, int64_t r, int32_t d,
                               uint32_t code) {
    uint32_t shift;
    uint32_t *w = (uint32_t *)(uintptr_t)tsr_kvq_slot(L, codes, r, d / 16, &shift);
    w[d % 16] = (w[d % 16] & ~(((1u << L->bits) - 1u) << shift)) | code << shift;
}

static inline uint32_t tsr_kvq_get(const tsr_kvq_layout *L, const void *codes, int64_t r,
                                   int32_t d) {
    uint32_t shift;
    const uint32_t *w = tsr_kvq_slot(L, codes, r, d / 16, &shift);
    return (w[d % 16] >> shift) & ((1u << L->bits) - 1u);
}

/* The sixteen codes of slot `slot` of a row that starts at bit `at` of its group's lanes, as
 * floats. */
static inline __attribute__((always_inline)) void tsr_kvq_unpack(tsr_kvq_f32x16 *out,
                                                                 const tsr_kvq_layout *L,
                                                                 const uint32_t *group,
                                                                 uint32_t at, int32_t slot) {
    tsr_kvq_u32x16 w;
    at += (uint32_t)(slot * L->bits);
    memcpy(&w, group + (size_t)(at / 32) * 16, sizeof w);
    *out = __builtin_convertvector((w >> (at % 32)) & ((1u << L->bits) - 1u), tsr_kvq_f32x16);
}

/* The sum over row r's channels of w[d] * code_d, w holding 16 * slots weights (zeros past
 * head_dim): slot by slot in sixteen lanes, then tsr_kvq_sum, so the order is fixed. */
static inline __attribute__((always_inline)) float tsr_kvq_dot(const tsr_kvq_layout *L,
                                                               const float *w, const void *codes,
                                                               int64_t r) {
    tsr_kvq_f32x16 acc = {0}, x, code;
    uint32_t at;
    const uint32_t *group = tsr_kvq_row(L, codes, r, &at);
    for (int32_t m = 0; m < L->slots; m++) {
        memcpy(&x, w + 16 * m, sizeof x);
        tsr_kvq_unpack(&code, L, group, at, m);
        acc += x * code;
    }
    return tsr_kvq_sum(&acc);
}

/* Row r dequantized: out[d] = code_d * scale[d] + zero[d] for d < head_dim (scale and zero
 * hold 16 * slots floats, out head_dim). */
static inline __attribute__((always_inline)) void tsr_kvq_dequant(const tsr_kvq_layout *L,
                                                                  float *out, int32_t head_dim,
                                                                  const float *scale,
                                                                  const float *zero,
                                                                  const void *codes, int64_t r) {
    tsr_kvq_f32x16 code, x, s, z;
    uint32_t at;
    const uint32_t *group = tsr_kvq_row(L, codes, r, &at);
    for (int32_t m = 0; m < L->slots; m++) {
        tsr_kvq_unpack(&code, L, group, at, m);
        memcpy(&s, scale + 16 * m, sizeof s);
        memcpy(&z, zero + 16 * m, sizeof z);
        x = code * s + z;
        const int32_t left = head_dim - 16 * m;
        memcpy(out + 16 * m, &x, (size_t)(left < 16 ? left : 16) * sizeof(float));
    }
}

/* acc[16 m + l] += sum over i < n of a[i * slots + m] * the code of channel 16 m + l of row
 * r0 + i, for every slot m (acc holds 16 * slots floats): slot by slot, so that each slot's sum
 * stays in registers across the rows. */
static inline __attribute__((always_inline)) void tsr_kvq_axpy(const tsr_kvq_layout *L,
                                                               float *acc, const float *a,
                                                               const void *codes, int64_t r0,
                                                               int64_t n) {
    tsr_kvq_f32x16 x, code;
    for (int32_t m = 0; m < L->slots; m++) {
        tsr_kvq_f32x16 sum = {0};
        for (int64_t i = 0; i < n; i++) {
            uint32_t at;
            const uint32_t *group = tsr_kvq_row(L, codes, r0 + i, &at);
            tsr_kvq_unpack(&code, L, group, at, m);
            sum += a[i * L->slots + m] * code;
        }
        memcpy(&x, acc + 16 * m, sizeof x);
        x += sum;
        memcpy(acc + 16 * m, &x, sizeof x);
    }
}

#endif /* TESSERA_SDK_CACHE_H */
