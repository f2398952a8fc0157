/*
 * cache 'minicache': MiniCache (A. Liu, J. Liu, Z. Pan, Y. He, G. Haffari, B. Zhuang,
 * "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS
 * 2024, arXiv:2405.14366). From layer `start` (the paper's S = L/2) up, adjacent layers are
 * merged in pairs (start, start+1), (start+2, start+3), ...: a token's K (and, apart, its V)
 * rows x_a of the lower layer and x_b of the upper one become one direction and two norms:
 *
 *   Omega = arccos(x_a . x_b / (|x_a| |x_b|)),
 *   e = sin((1 - t) Omega) / sin(Omega) * x_a / |x_a| + sin(t Omega) / sin(Omega) * x_b / |x_b|
 *
 * (SLERP of the two directions, the paper's Eq. 3), and the layers read back |x_a| e and
 * |x_b| e. Tokens whose pair differs most stay unmerged (retention): with the angular distance
 * d = Omega / pi, a token is kept as its two original rows when d > d_min + (d_max - d_min)
 * gamma, d_min and d_max taken over the tokens merged so far (for the prompt, exactly the
 * paper's over its tokens; each later token against the range including it). Layers below
 * `start`, and a last layer without a partner, keep every row like 'full'.
 *
 * Merging is per KV head (each head's direction and norms: attention reads heads apart) and
 * happens at prefill_end and step_end, for the tokens the step stored: a step's attention reads
 * its own tokens as they came. Two near-parallel rows (sin Omega < 1e-6) interpolate linearly;
 * two opposite ones cannot be interpolated and are kept; a zero row takes the other's
 * direction (its norm, 0, restores it exactly).
 *
 * Views of a merged layer have dtype MC_DTYPE (loaders restore rows) and products in
 * tsr_kv_view_ext: q . (|x| e) = |x| (q . e), and p (|x| e) adds with one scale per entry.
 */
#include <math.h>

#include <tessera/sdk.h>
#include <tessera/sdk_cache.h>

#define MC_DTYPE (TSR_DTYPE_PLUGIN_FIRST + 0x3c1)
#define MC_PI 3.14159265358979323846
#define MC_MIN_ROWS 16
#define MC_MIN_MERGED 64

typedef struct mc_cache mc_cache;
typedef struct mc_pair mc_pair;

/* One merged tensor (the keys or the values) of a layer pair. */
typedef struct mc_merged {
    float *dir;       /* (n_kv_head, cap, head_dim): e, or x_a of a retained token */
    float *norm;      /* (n_kv_head, cap, 2): |x_a|, |x_b| */
    int32_t *kept;    /* (n_kv_head, cap): -1 merged, else the row of x_b in upper[h] */
    float **upper;    /* (n_kv_head) the x_b rows of retained tokens: (upper_cap[h], head_dim) */
    int64_t *n_upper, *upper_cap; /* (n_kv_head) */
    double *dmin, *dmax; /* (n_kv_head) the range of angular distances merged so far */
} mc_merged;

struct mc_pair {
    int64_t nm, cap;   /* entries merged (positions 0..nm-1), room */
    mc_merged t[2];    /* keys, values */
};

/* What one view reads: a KV head of one layer of a pair. */
typedef struct mc_head {
    const mc_cache *c;
    const mc_pair *P;
    const tsr_kv_rows *rows; /* the layer's rows: entries [nm, n) */
    int32_t head, upper;     /* upper: the pair's second layer */
} mc_head;

/* Per (sequence, layer): every position (merged entries, then the rows'), the views' contexts. */
typedef struct mc_layer {
    int32_t *pos;
    int64_t pcap;
    mc_head *heads; /* (n_kv_head) */
} mc_layer;

struct mc_cache {
    tsr_kv_store kv;   /* first: slots, rows (whole layers, and a pair's unmerged tokens) */
    int32_t start;     /* first merged layer; pairs below n_layer - 1 */
    int32_t n_pairs;
    double t, gamma;
    mc_layer *layers;  /* (n_seq_max, n_layer) */
    mc_pair *pairs;    /* (n_seq_max, n_pairs) */
};

/* The pair that holds `layer`, or -1 for a whole layer. */
static int32_t mc_pair_of(const mc_cache *c, int32_t layer) {
    if (layer < c->start) return -1;
    int32_t p = (layer - c->start) / 2;
    return p < c->n_pairs ? p : -1;
}

static mc_layer *mc_layers(const mc_cache *c, const tsr_kv_seq *q) {
    return c->layers + (size_t)tsr_kv_store_slot(&c->kv, q) * (size_t)c->kv.n_layer;
}
static mc_pair *mc_pairs(const mc_cache *c, const tsr_kv_seq *q) {
    return c->pairs + (size_t)tsr_kv_store_slot(&c->kv, q) * (size_t)c->n_pairs;
}

/* Bytes of a merged tensor: its arrays for cap entries and the retained upper rows. */
static int64_t mc_merged_bytes(const mc_cache *c, const mc_merged *m, int64_t cap) {
    int64_t per_entry = (int64_t)c->kv.head_dim * 4 + 2 * 4 + 4, b = 0;
    for (int32_t h = 0; m->upper_cap && h < c->kv.n_kv_head; h++)
        b += m->upper_cap[h] * c->kv.head_dim * 4;
    return per_entry * cap * c->kv.n_kv_head + b;
}

static void mc_merged_free(mc_cache *c, mc_merged *m, int64_t cap) {
    const tsr_host *h = c->kv.host;
    tsr_kv_store_account(&c->kv, -mc_merged_bytes(c, m, cap));
    for (int32_t i = 0; m->upper && i < c->kv.n_kv_head; i++) h->free(h->ctx, m->upper[i]);
    h->free(h->ctx, m->dir);
    h->free(h->ctx, m->norm);
    h->free(h->ctx, m->kept);
    h->free(h->ctx, m->upper);
    h->free(h->ctx, m->n_upper);
    h->free(h->ctx, m->upper_cap);
    h->free(h->ctx, m->dmin);
    h->free(h->ctx, m->dmax);
    *m = (mc_merged){0};
}

static tsr_status mc_nomem(const mc_cache *c, const char *what) {
    c->kv.host->set_error(c->kv.host->ctx, "%s: out of memory", what);
    return TSR_E_NOMEM;
}

/* Gives both tensors of the pair room for `need` merged entries, keeping the nm held. */
static tsr_status mc_reserve(mc_cache *c, mc_pair *P, int64_t need) {
    if (need <= P->cap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    const int32_t nkv = c->kv.n_kv_head, hd = c->kv.head_dim;
    int64_t cap = P->cap ? P->cap : MC_MIN_MERGED;
    while (cap < need) cap *= 2;
    for (int k = 0; k < 2; k++) {
        mc_merged *m = &P->t[k];
        float *dir = h->alloc(h->ctx, (size_t)(nkv * cap * hd) * sizeof(float), 0);
        float *norm = h->alloc(h->ctx, (size_t)(nkv * cap * 2) * sizeof(float), 0);
        int32_t *kept = h->alloc(h->ctx, (size_t)(nkv * cap) * sizeof(int32_t), 0);
        if (!m->upper) {
            m->upper = tsr_calloc(h, (size_t)nkv, sizeof *m->upper);
            m->n_upper = tsr_calloc(h, (size_t)nkv, sizeof *m->n_upper);
            m->upper_cap = tsr_calloc(h, (size_t)nkv, sizeof *m->upper_cap);
            m->dmin = tsr_calloc(h, (size_t)nkv, sizeof *m->dmin);
            m->dmax = tsr_calloc(h, (size_t)nkv, sizeof *m->dmax);
        }
        if (!dir || !norm || !kept || !m->upper || !m->n_upper || !m->upper_cap || !m->dmin ||
            !m->dmax) {
            h->free(h->ctx, dir);
            h->free(h->ctx, norm);
            h->free(h->ctx, kept);
            return mc_nomem(c, "merge");
        }
        for (int32_t i = 0; i < nkv && P->cap; i++) {
            memcpy(dir + (size_t)(i * cap * hd), m->dir + (size_t)(i * P->cap * hd),
                   (size_t)(P->nm * hd) * sizeof(float));
            memcpy(norm + (size_t)(i * cap * 2), m->norm + (size_t)(i * P->cap * 2),
                   (size_t)(P->nm * 2) * sizeof(float));
            memcpy(kept + (size_t)(i * cap), m->kept + (size_t)(i * P->cap),
                   (size_t)P->nm * sizeof(int32_t));
        }
        h->free(h->ctx, m->dir);
        h->free(h->ctx, m->norm);
        h->free(h->ctx, m->kept);
        m->dir = dir;
        m->norm = norm;
        m->kept = kept;
        tsr_kv_store_account(&c->kv, mc_merged_bytes(c, m, cap) - mc_merged_bytes(c, m, P->cap));
    }
    P->cap = cap;
    return TSR_OK;
}

/* Room for one more retained upper row of head h. */
static tsr_status mc_reserve_upper(mc_cache *c, mc_merged *m, int32_t h) {
    if (m->n_upper[h] < m->upper_cap[h]) return TSR_OK;
    const tsr_host *host = c->kv.host;
    int64_t cap = m->upper_cap[h] ? 2 * m->upper_cap[h] : 16;
    float *rows = host->alloc(host->ctx, (size_t)(cap * c->kv.head_dim) * sizeof(float), 0);
    if (!rows) return mc_nomem(c, "merge");
    if (m->n_upper[h])
        memcpy(rows, m->upper[h], (size_t)(m->n_upper[h] * c->kv.head_dim) * sizeof(float));
    host->free(host->ctx, m->upper[h]);
    m->upper[h] = rows;
    tsr_kv_store_account(&c->kv, (cap - m->upper_cap[h]) * c->kv.head_dim * 4);
    m->upper_cap[h] = cap;
    return TSR_OK;
}

static tsr_status mc_reserve_pos(mc_cache *c, mc_layer *L, int64_t need) {
    if (need <= L->pcap) return TSR_OK;
    const tsr_host *h = c->kv.host;
    int64_t cap = L->pcap ? L->pcap : MC_MIN_MERGED;
    while (cap < need) cap *= 2;
    int32_t *pos = h->alloc(h->ctx, (size_t)cap * sizeof(int32_t), 0);
    if (!pos) return mc_nomem(c, "store");
    if (L->pcap) memcpy(pos, L->pos, (size_t)L->pcap * sizeof(int32_t));
    h->free(h->ctx, L->pos);
    L->pos = pos;
    L->pcap = cap;
    return TSR_OK;
}

/* ---- the merge -------------------------------------------------------------------------- */

/* The paper's merge of rows a (lower layer) and b (upper) of head_dim values: the SLERP e of
 * their directions at t, their norms, and their angle Omega (pi: opposite rows, which have no
 * interpolation). */
static double mc_slerp(const float *a, const float *b, int32_t hd, double t, float *e,
                       float *na_out, float *nb_out) {
    double na = 0.0, nb = 0.0, ab = 0.0;
    for (int32_t d = 0; d < hd; d++) {
        na += (double)a[d] * a[d];
        nb += (double)b[d] * b[d];
        ab += (double)a[d] * b[d];
    }
    na = sqrt(na);
    nb = sqrt(nb);
    *na_out = (float)na;
    *nb_out = (float)nb;
    if (na == 0.0 || nb == 0.0) {
        const float *x = na == 0.0 ? b : a;
        double n = na == 0.0 ? nb : na;
        for (int32_t d = 0; d < hd; d++) e[d] = n > 0.0 ? (float)(x[d] / n) : 0.0f;
        return 0.0;
    }
    double cosine = ab / (na * nb);
    cosine = cosine > 1.0 ? 1.0 : cosine < -1.0 ? -1.0 : cosine;
    double omega = acos(cosine), s = sin(omega), wa, wb;
    if (s < 1e-6) {
        if (cosine < 0.0) return MC_PI;
        wa = 1.0 - t;
        wb = t;
    } else {
        wa = sin((1.0 - t) * omega) / s;
        wb = sin(t * omega) / s;
    }
    for (int32_t d = 0; d < hd; d++) e[d] = (float)(wa * a[d] / na + wb * b[d] / nb);
    return omega;
}

/* Merges entries [nm, nm + count) of one tensor of the pair from the two layers' rows. */
static tsr_status mc_merge_tensor(mc_cache *c, mc_pair *P, int k, const tsr_kv_rows *ra,
                                  const tsr_kv_rows *rb, int64_t count) {
    mc_merged *m = &P->t[k];
    const int32_t hd = c->kv.head_dim;
    const size_t rbytes = c->kv.row_bytes;
    double *dist = c->kv.host->alloc(c->kv.host->ctx, (size_t)count * sizeof(double), 0);
    if (!dist) return mc_nomem(c, "merge");
    tsr_status st = TSR_OK;
    for (int32_t h = 0; h < c->kv.n_kv_head && st >= 0; h++) {
        const char *base_a = (k ? ra->v : ra->k) + (size_t)h * (size_t)ra->cap * rbytes;
        const char *base_b = (k ? rb->v : rb->k) + (size_t)h * (size_t)rb->cap * rbytes;
        for (int64_t i = 0; i < count; i++) {
            int64_t j = P->nm + i;
            float *e = m->dir + ((size_t)h * (size_t)P->cap + (size_t)j) * (size_t)hd;
            float *norm = m->norm + ((size_t)h * (size_t)P->cap + (size_t)j) * 2;
            dist[i] = mc_slerp((const float *)(base_a + (size_t)i * rbytes),
                               (const float *)(base_b + (size_t)i * rbytes), hd, c->t, e,
                               &norm[0], &norm[1]) / MC_PI;
            int first = P->nm == 0 && i == 0;
            if (first || dist[i] < m->dmin[h]) m->dmin[h] = dist[i];
            if (first || dist[i] > m->dmax[h]) m->dmax[h] = dist[i];
        }
        const double threshold = m->dmin[h] + (m->dmax[h] - m->dmin[h]) * c->gamma;
        for (int64_t i = 0; i < count && st >= 0; i++) {
            int64_t j = P->nm + i;
            int32_t *kept = m->kept + (size_t)h * (size_t)P->cap + (size_t)j;
            *kept = -1;
            if (!(dist[i] > threshold || dist[i] >= 1.0)) continue;
            if ((st = mc_reserve_upper(c, m, h)) < 0) break;
            memcpy(m->dir + ((size_t)h * (size_t)P->cap + (size_t)j) * (size_t)hd,
                   base_a + (size_t)i * rbytes, rbytes);
            memcpy(m->upper[h] + (size_t)(m->n_upper[h] * hd), base_b + (size_t)i * rbytes,
                   rbytes);
            *kept = (int32_t)m->n_upper[h]++;
        }
    }
    c->kv.host->free(c->kv.host->ctx, dist);
    return st;
}

/* The hooks: each pair merges the tokens both its layers hold unmerged. */
static tsr_status mc_merge(void *self, int64_t id) {
    mc_cache *c = self;
    tsr_kv_seq *q = tsr_kv_store_find_or_fail(&c->kv, id, "merge");
    if (!q) return TSR_E_INVALID;
    mc_pair *pairs = mc_pairs(c, q);
    for (int32_t p = 0; p < c->n_pairs; p++) {
        mc_pair *P = &pairs[p];
        tsr_kv_rows *ra = &q->layers[c->start + 2 * p], *rb = &q->layers[c->start + 2 * p + 1];
        int64_t count = ra->n < rb->n ? ra->n : rb->n;
        if (!count) continue;
        tsr_status st = mc_reserve(c, P, P->nm + count);
        for (int k = 0; k < 2 && st >= 0; k++) st = mc_merge_tensor(c, P, k, ra, rb, count);
        if (st < 0) return st;
        tsr_kv_rows_drop_front(&c->kv, ra, count);
        tsr_kv_rows_drop_front(&c->kv, rb, count);
        P->nm += count;
    }
    return TSR_OK;
}

static tsr_status mc_store(void *self, const tsr_kv_write *w) {
    mc_cache *c = self;
    tsr_kv_seq *q;
    tsr_status st = tsr_kv_store_check_write(&c->kv, w, &q);
    if (st < 0) return st;
    tsr_kv_rows *rows = &q->layers[w->layer];
    mc_layer *L = &mc_layers(c, q)[w->layer];
    int32_t p = mc_pair_of(c, w->layer);
    int64_t n = (p < 0 ? 0 : mc_pairs(c, q)[p].nm) + rows->n;
    /* A pair's rows give back the room a long prompt took once it is merged. */
    if ((st = tsr_kv_store_check_ctx(&c->kv, w, n)) < 0 ||
        (st = mc_reserve_pos(c, L, n + w->n)) < 0 ||
        (st = tsr_kv_rows_fit(&c->kv, rows, rows->n + w->n, MC_MIN_ROWS, p >= 0)) < 0)
        return st;
    tsr_kv_rows_append(&c->kv, q, rows, w);
    memcpy(L->pos + n, w->pos, (size_t)w->n * sizeof(int32_t));
    return TSR_OK;
}

/* ---- reading ---------------------------------------------------------------------------- */

static const float *mc_row(const mc_head *mh, int k, int64_t j) {
    const size_t rbytes = mh->c->kv.row_bytes;
    const char *base = k ? mh->rows->v : mh->rows->k;
    return (const float *)(base + ((size_t)mh->head * (size_t)mh->rows->cap +
                                   (size_t)(j - mh->P->nm)) * rbytes);
}

/* Entry j of tensor k as stored: the row to read and the scale it takes: |x| for a merged
 * direction, 1 for the rows of a retained or an unmerged token. */
static inline __attribute__((always_inline)) const float *mc_entry(const mc_head *mh, int k,
                                                                   int64_t j, float *scale) {
    *scale = 1.0f;
    if (j >= mh->P->nm) return mc_row(mh, k, j);
    const mc_merged *m = &mh->P->t[k];
    const size_t at = (size_t)mh->head * (size_t)mh->P->cap + (size_t)j;
    const int32_t kept = m->kept[at];
    const int32_t hd = mh->c->kv.head_dim;
    if (kept >= 0 && mh->upper) return m->upper[mh->head] + (size_t)kept * (size_t)hd;
    if (kept < 0) *scale = m->norm[at * 2 + (size_t)mh->upper];
    return m->dir + at * (size_t)hd;
}

/* Rows restored: |x| e for merged entries, the rows themselves for the others. */
static void mc_load(const mc_head *mh, int k, int64_t j0, int64_t n, float *dst) {
    const int32_t hd = mh->c->kv.head_dim;
    for (int64_t j = j0; j < j0 + n; j++) {
        float scale, *out = dst + (j - j0) * hd;
        const float *row = mc_entry(mh, k, j, &scale);
        for (int32_t d = 0; d < hd; d++) out[d] = scale * row[d];
    }
}
static void mc_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    mc_load(ctx, 0, j0, n, dst);
}
static void mc_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    mc_load(ctx, 1, j0, n, dst);
}

/* q . (|x| e) = |x| (q . e); retained and unmerged entries as they are. */
TSR_VECTOR_CLONES
static void mc_dot_k(const void *ctx, const float *q, int64_t j0, int64_t n, float *scores) {
    const mc_head *mh = ctx;
    for (int64_t j = j0; j < j0 + n; j++) {
        float scale;
        const float *row = mc_entry(mh, 0, j, &scale);
        scores[j - j0] = scale * tsr_kvq_dot_f32(q, row, mh->c->kv.head_dim);
    }
}

/* out += p |x| e, one scale per entry. */
TSR_VECTOR_CLONES
static void mc_axpy_v(const void *ctx, const float *p, int64_t j0, int64_t n, float *out) {
    const mc_head *mh = ctx;
    const int32_t hd = mh->c->kv.head_dim;
    for (int64_t j = j0; j < j0 + n; j++) {
        float scale;
        const float *row = mc_entry(mh, 1, j, &scale);
        const float a = p[j - j0] * scale;
        for (int32_t d = 0; d < hd; d++) out[d] += a * row[d];
    }
}

static tsr_status mc_view_ext(void *self, int64_t id, int32_t layer, int32_t phase,
                              tsr_kv_view *views, tsr_kv_view_ext *ext) {
    mc_cache *c = self;
    tsr_status st;
    tsr_kv_seq *q = tsr_kv_store_find_layer(&c->kv, id, layer, c->kv.n_layer, "view", &st);
    if (!q) return st;
    int32_t p = mc_pair_of(c, layer);
    mc_pair *P = p < 0 ? NULL : &mc_pairs(c, q)[p];
    if (!P || P->nm == 0) return tsr_kv_store_view(self, id, layer, phase, views);
    mc_layer *L = &mc_layers(c, q)[layer];
    for (int32_t h = 0; h < c->kv.n_kv_head; h++) {
        L->heads[h] = (mc_head){c, P, &q->layers[layer], h, (layer - c->start) % 2};
        views[h] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = P->nm + q->layers[layer].n,
                                 .pos = L->pos, .dtype = MC_DTYPE, .load_k = mc_load_k,
                                 .load_v = mc_load_v, .load_ctx = &L->heads[h]};
        if (ext) {
            ext[h].dot_k = mc_dot_k;
            ext[h].axpy_v = mc_axpy_v;
        }
    }
    return TSR_OK;
}

static tsr_status mc_view(void *self, int64_t id, int32_t layer, int32_t phase,
                          tsr_kv_view *views) {
    return mc_view_ext(self, id, layer, phase, views, NULL);
}

/* ---- sequences --------------------------------------------------------------------------- */

/* Frees what the sequence holds besides the store's rows. */
static void mc_seq_fini(void *self, tsr_kv_seq *q) {
    mc_cache *c = self;
    mc_layer *layers = mc_layers(c, q);
    mc_pair *pairs = mc_pairs(c, q);
    for (int32_t p = 0; p < c->n_pairs; p++) {
        c->kv.entries -= 2 * pairs[p].nm * c->kv.n_kv_head;
        for (int k = 0; k < 2; k++) mc_merged_free(c, &pairs[p].t[k], pairs[p].cap);
        pairs[p] = (mc_pair){0};
    }
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        c->kv.host->free(c->kv.host->ctx, layers[l].pos);
        c->kv.host->free(c->kv.host->ctx, layers[l].heads);
        layers[l] = (mc_layer){0};
    }
}

/* The per-sequence state besides the store's; `from` (or NULL) is copied into it. */
static tsr_status mc_seq_init(void *self, tsr_kv_seq *q, const tsr_kv_seq *from) {
    mc_cache *c = self;
    const int32_t nkv = c->kv.n_kv_head, hd = c->kv.head_dim;
    mc_layer *layers = mc_layers(c, q);
    mc_pair *pairs = mc_pairs(c, q);
    for (int32_t l = 0; l < c->kv.n_layer; l++) layers[l] = (mc_layer){0};
    for (int32_t p = 0; p < c->n_pairs; p++) pairs[p] = (mc_pair){0};
    for (int32_t l = 0; l < c->kv.n_layer; l++) {
        layers[l].heads = tsr_calloc(c->kv.host, (size_t)nkv, sizeof(mc_head));
        if (!layers[l].heads) return mc_nomem(c, from ? "seq_fork" : "seq_begin");
        const mc_layer *F = from ? &mc_layers(c, from)[l] : NULL;
        if (F && F->pcap) {
            tsr_status st = mc_reserve_pos(c, &layers[l], F->pcap);
            if (st < 0) return st;
            memcpy(layers[l].pos, F->pos, (size_t)F->pcap * sizeof(int32_t));
        }
    }
    for (int32_t p = 0; from && p < c->n_pairs; p++) {
        const mc_pair *F = &mc_pairs(c, from)[p];
        mc_pair *T = &pairs[p];
        if (!F->nm) continue;
        tsr_status st = mc_reserve(c, T, F->nm);
        if (st < 0) return st;
        for (int k = 0; k < 2; k++) {
            const mc_merged *fm = &F->t[k];
            mc_merged *tm = &T->t[k];
            for (int32_t h = 0; h < nkv; h++) {
                memcpy(tm->dir + (size_t)(h * T->cap * hd), fm->dir + (size_t)(h * F->cap * hd),
                       (size_t)(F->nm * hd) * sizeof(float));
                memcpy(tm->norm + (size_t)(h * T->cap * 2), fm->norm + (size_t)(h * F->cap * 2),
                       (size_t)(F->nm * 2) * sizeof(float));
                memcpy(tm->kept + (size_t)(h * T->cap), fm->kept + (size_t)(h * F->cap),
                       (size_t)F->nm * sizeof(int32_t));
                while (tm->upper_cap[h] < fm->n_upper[h]) {
                    tm->n_upper[h] = tm->upper_cap[h];
                    if ((st = mc_reserve_upper(c, tm, h)) < 0) return st;
                }
                if (fm->n_upper[h])
                    memcpy(tm->upper[h], fm->upper[h], (size_t)(fm->n_upper[h] * hd) * sizeof(float));
                tm->n_upper[h] = fm->n_upper[h];
                tm->dmin[h] = fm->dmin[h];
                tm->dmax[h] = fm->dmax[h];
            }
        }
        T->nm = F->nm;
        c->kv.entries += 2 * T->nm * nkv;
    }
    return TSR_OK;
}

static tsr_status mc_seq_begin(void *self, int64_t id) {
    return tsr_kv_store_seq_begin_with(self, id, mc_seq_init, mc_seq_fini);
}
static void mc_seq_end(void *self, int64_t id) { tsr_kv_store_seq_end_with(self, id, mc_seq_fini); }
static tsr_status mc_seq_fork(void *self, int64_t src, int64_t dst) {
    return tsr_kv_store_seq_fork_with(self, src, dst, mc_seq_init, mc_seq_fini);
}

/* Merged entries are kept per token: a cut drops those at or after it, as the store drops its
 * rows. */
static tsr_status mc_seq_truncate(void *self, int64_t id, int32_t n_pos) {
    mc_cache *c = self;
    tsr_status st = tsr_kv_store_seq_truncate(self, id, n_pos);
    if (st < 0) return st;
    tsr_kv_seq *q = tsr_kv_store_find(&c->kv, id);
    mc_pair *pairs = mc_pairs(c, q);
    for (int32_t p = 0; p < c->n_pairs; p++) {
        mc_pair *P = &pairs[p];
        const int32_t *pos = mc_layers(c, q)[c->start + 2 * p].pos;
        int64_t cut = 0;
        while (cut < P->nm && pos[cut] < n_pos) cut++;
        c->kv.entries -= 2 * (P->nm - cut) * c->kv.n_kv_head;
        P->nm = cut;
    }
    return TSR_OK;
}

/* Bits per value of a layer: its f32 rows; for the lower layer of a pair, the pair's merged
 * tokens (per head one direction row, two norms and the retention index for both layers' rows,
 * plus the upper rows kept). */
static void mc_bits_held(const void *self, const tsr_kv_seq *q, int32_t layer, double *bits,
                         double *values) {
    const mc_cache *c = self;
    const int32_t nkv = c->kv.n_kv_head, hd = c->kv.head_dim, p = mc_pair_of(c, layer);
    *bits += 32.0 * 2 * (double)q->layers[layer].n * hd * nkv;
    *values += 2.0 * (double)q->layers[layer].n * hd * nkv;
    if (p < 0 || layer != c->start + 2 * p) return;
    const mc_pair *P = &mc_pairs(c, q)[p];
    for (int k = 0; k < 2; k++) {
        int64_t upper = 0;
        for (int32_t h = 0; h < nkv; h++)
            for (int64_t j = 0; j < P->nm; j++)
                upper += P->t[k].kept[(size_t)h * (size_t)P->cap + (size_t)j] >= 0;
        *bits += 32.0 * ((double)P->nm * nkv * (hd + 3) + (double)upper * hd);
    }
    *values += 2.0 * 2.0 * (double)P->nm * hd * nkv;
}

static void mc_stats(void *self, tsr_cache_stats *out) {
    tsr_kv_store_stats_with(self, out, mc_bits_held);
}

static void mc_destroy(void *self) {
    mc_cache *c = self;
    tsr_kv_store_fini_all(self, mc_seq_fini);
    c->kv.host->free(c->kv.host->ctx, c->layers);
    c->kv.host->free(c->kv.host->ctx, c->pairs);
    tsr_kv_store_destroy(c);
}

static tsr_status mc_create(const tsr_host *host, const tsr_params *params,
                            const tsr_cache_init *init, void **out) {
    void *self;
    tsr_status st = tsr_kv_store_need_ctx(host, init);
    if (st < 0 || (st = tsr_kv_store_create(host, params, init, sizeof(mc_cache), 0, &self)) < 0)
        return st;
    mc_cache *c = self;
    int64_t start = tsr_param_int(params, "start");
    if (start > (int64_t)init->n_layer - 2)
        host->log(host->ctx, TSR_LOG_WARN, "start %lld: the model has %d layers, so no pair "
                  "(start, start+1) merges and every layer keeps every row, as 'full' does",
                  (long long)start, (int)init->n_layer);
    c->start = start < 0 ? init->n_layer / 2 : start > init->n_layer ? init->n_layer : (int32_t)start;
    c->n_pairs = (init->n_layer - c->start) / 2;
    c->t = tsr_param_float(params, "t");
    c->gamma = tsr_param_float(params, "gamma");
    c->layers = tsr_calloc(host, (size_t)init->n_seq_max * (size_t)init->n_layer,
                           sizeof(mc_layer));
    c->pairs = c->n_pairs ? tsr_calloc(host, (size_t)init->n_seq_max * (size_t)c->n_pairs,
                                       sizeof(mc_pair))
                          : NULL;
    if (!c->layers || (c->n_pairs && !c->pairs)) {
        mc_destroy(c);
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    *out = c;
    return TSR_OK;
}

static const tsr_param_def mc_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "start", .type = TSR_PARAM_INT, .default_value = "-1",
     .min = -1, .max = 1 << 20, .unit = "layer",
     .doc = "first merged layer, pairs (start, start+1)...; -1: half the layers (the paper's)"},
    {TSR_SIZED(tsr_param_def), .name = "t", .type = TSR_PARAM_FLOAT, .default_value = "0.6",
     .min = 0, .max = 1, .doc = "SLERP position between the lower (0) and the upper (1) layer"},
    {TSR_SIZED(tsr_param_def), .name = "gamma", .type = TSR_PARAM_FLOAT, .default_value = "0.05",
     .min = 0, .max = 0.3,
     .doc = "retention threshold: tokens beyond d_min + gamma (d_max - d_min) stay unmerged"},
};

static const tsr_cache_vtable mc_vtable = {
    TSR_SIZED(tsr_cache_vtable),
    .create = mc_create,
    .destroy = mc_destroy,
    .seq_begin = mc_seq_begin,
    .seq_end = mc_seq_end,
    .seq_fork = mc_seq_fork,
    .seq_truncate = mc_seq_truncate,
    .store = mc_store,
    .view = mc_view,
    .prefill_end = mc_merge,
    .step_end = mc_merge,
    .stats = mc_stats,
    .view_ext = mc_view_ext,
};

static const tsr_plugin_desc mc_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_CACHE, CACHE),
    .name = "minicache",
    .version = "1.0",
    .description = "MiniCache: adjacent upper layers share K/V directions (SLERP), norms apart, "
                   "distinct tokens kept",
    TSR_PARAMS(mc_params),
    .vtable = &mc_vtable,
};

TSR_PLUGIN_EXPORT(&mc_desc)
