/*
 * attention 'tidal': TidalDecode (Yang et al. 2024, "TidalDecode: Fast and Accurate LLM
 * Decoding with Position Persistent Sparse Attention", arXiv:2410.05076). The tokens a decode
 * query attends to most are much the same from one layer to the next, so a few token selection
 * layers choose them and the others reuse the choice: in each decode step the layers before
 * `select_layer` read every entry; `select_layer` reads every entry and then chooses, per query
 * head, the positions of the `k` highest scores q.k; the layers after it read only the entries
 * at those positions, plus the query's own; `reselect_layer` (a middle layer) reads everything
 * again and chooses anew for the layers after it. This is the paper's schedule: full attention
 * in layers 0 and 1, selection at layer 2 and re-selection at layer 13 of 32 in the authors'
 * code, so by default the re-selection layer is 13/32 of the depth, rounded.
 *
 * Prefill and any call of several queries read every entry, as in the paper; so does a head
 * whose view holds at most k entries besides the query's own, which makes the result flash's
 * bit for bit when k covers the context. The choice is of positions: a layer whose policy
 * keeps other entries reads those of the chosen positions it has. The attention itself runs
 * through <tessera/sdk_sparse.h>. The paper's optional cache correction (recomputing the K/V of
 * sparsely decoded tokens) is not done.
 */
#include <tessera/sdk_attention.h>
#include <tessera/sdk_sparse.h>

/* The positions one decode step chose, per query head. */
typedef struct tidal_seq {
    int32_t q_pos;         /* the step's query position; -1 before any choice */
    int64_t cap;           /* positions per head the arrays hold */
    int32_t *chosen;       /* (n_head, cap) */
    int64_t *n_chosen;     /* (n_head) */
    unsigned char *every;  /* (n_head) the head's view held at most k others: read it all */
} tidal_seq;

typedef struct tidal_attn {
    tsr_sparse_base base; /* first: shape and counts */
    int32_t k, select_layer, reselect_layer;
    tsr_seq_table seqs;
    tsr_sparse_chosen chosen; /* the current call's positions, as entries */
    float *scores;            /* (n_head, scores_cap) a selection layer's scores */
    int64_t scores_cap;
    int32_t *index_of;    /* (index_cap) view index of each position, for views not in order */
    int64_t index_cap;
} tidal_attn;

static void tidal_seq_free(tidal_attn *a, tidal_seq *s) {
    const tsr_host *host = a->base.sh.host;
    if (!s) return;
    host->free(host->ctx, s->chosen);
    host->free(host->ctx, s->n_chosen);
    host->free(host->ctx, s->every);
    host->free(host->ctx, s);
}

/* Sequence id's state, made on first sight (a forked sequence has had no seq_begin). */
static tidal_seq *tidal_seq_get(tidal_attn *a, int64_t id) {
    const tsr_host *host = a->base.sh.host;
    void **slot = tsr_seq_table_get(host, &a->seqs, id);
    if (slot && !*slot) {
        tidal_seq *s = tsr_calloc(host, 1, sizeof *s);
        if (s) {
            s->q_pos = -1;
            s->n_chosen = tsr_calloc(host, (size_t)a->base.sh.n_head, sizeof *s->n_chosen);
            s->every = tsr_calloc(host, (size_t)a->base.sh.n_head, 1);
        }
        if (!s || !s->n_chosen || !s->every) {
            tidal_seq_free(a, s);
            tsr_seq_table_take(&a->seqs, id);
            return NULL;
        }
        *slot = s;
    }
    return slot ? *slot : NULL;
}

static tsr_status tidal_seq_begin(void *self, int64_t seq_id) {
    tidal_attn *a = self;
    tidal_seq_free(a, tsr_seq_table_take(&a->seqs, seq_id));
    if (tidal_seq_get(a, seq_id)) return TSR_OK;
    a->base.sh.host->set_error(a->base.sh.host->ctx, "seq_begin: sequence %lld: out of memory",
                               (long long)seq_id);
    return TSR_E_NOMEM;
}

static void tidal_seq_end(void *self, int64_t seq_id) {
    tidal_attn *a = self;
    tidal_seq_free(a, tsr_seq_table_take(&a->seqs, seq_id));
}

/* The choice at a selection layer, one query head per task item, from the scores of the
 * layer's full attention. */
typedef struct tidal_job {
    tidal_attn *a;
    const tsr_attention_call *call;
    tidal_seq *s;
    int64_t max_n;
    atomic_int failed;
} tidal_job;

/* Keeps the positions of the k best scores among the entries the query sees but its own. */
static void tidal_choose_task(void *arg, int ith, int nth) {
    tidal_job *job = arg;
    tidal_attn *a = job->a;
    const tsr_host *host = a->base.sh.host;
    const tsr_attention_call *c = job->call;
    const int32_t n_head = a->base.sh.n_head, group = n_head / a->base.sh.n_kv_head;
    const int32_t qpos = c->q_pos[0];
    int32_t first = n_head * ith / nth, last = n_head * (ith + 1) / nth;
    if (first == last) return;
    /* candidates' rows (max_n) | the best (max_n) | candidates' scores (max_n) */
    char *mem = host->alloc(host->ctx, (size_t)job->max_n * (2 * sizeof(int64_t) + sizeof(float)), 0);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    int64_t *cand = (int64_t *)mem, *best = cand + job->max_n;
    float *cand_score = (float *)(best + job->max_n);
    for (int32_t h = first; h < last; h++) {
        const tsr_kv_view *v = &c->views[h / group];
        const float *score = a->scores + (size_t)h * (size_t)job->max_n;
        int64_t n_cand = 0;
        for (int64_t j = 0; j < v->n; j++) {
            if (v->pos[j] >= qpos) continue; /* the future, and the query's own */
            cand[n_cand] = j;
            cand_score[n_cand++] = score[j];
        }
        job->s->every[h] = n_cand <= a->k;
        if (job->s->every[h]) continue;
        tsr_sparse_top_k(cand_score, n_cand, a->k, best);
        int32_t *chosen = job->s->chosen + (size_t)h * (size_t)job->s->cap;
        for (int64_t i = 0; i < a->k; i++) chosen[i] = v->pos[cand[best[i]]];
        job->s->n_chosen[h] = a->k;
    }
    host->free(host->ctx, mem);
}

static tsr_status tidal_nomem(tidal_attn *a, const tsr_attention_call *call) {
    a->base.sh.host->set_error(a->base.sh.host->ctx, "forward: layer %d: out of memory for the "
                               "token choice of sequence %lld", (int)call->layer,
                               (long long)call->seq_id);
    return TSR_E_NOMEM;
}

/* A selection layer: full attention, then the step's positions chosen from its scores. */
static tsr_status tidal_select_layer(tidal_attn *a, tidal_seq *s, const tsr_attention_call *call,
                                     tsr_sparse_counts *counts) {
    const tsr_host *host = a->base.sh.host;
    int64_t most = 0;
    tsr_attention_scan_views(&a->base.sh, call, &most);
    int64_t need = a->k < most ? a->k : most;
    if (need > s->cap) {
        int32_t *chosen = host->alloc(host->ctx,
                                      (size_t)(need * a->base.sh.n_head) * sizeof *chosen, 0);
        if (!chosen) return tidal_nomem(a, call);
        host->free(host->ctx, s->chosen);
        s->chosen = chosen;
        s->cap = need;
    }
    if (most > a->scores_cap) {
        float *scores = host->alloc(host->ctx, (size_t)(most * a->base.sh.n_head) * sizeof *scores, 0);
        if (!scores) return tidal_nomem(a, call);
        host->free(host->ctx, a->scores);
        a->scores = scores;
        a->scores_cap = most;
    }
    s->q_pos = -1;
    tsr_status st = tsr_sparse_forward(&a->base.sh, call, NULL, NULL, counts, a->scores);
    if (st < 0) return st;
    tidal_job job = {.a = a, .call = call, .s = s, .max_n = most};
    atomic_init(&job.failed, 0);
    host->parallel_for(host->ctx, tidal_choose_task, &job);
    if (atomic_load(&job.failed)) return tidal_nomem(a, call);
    s->q_pos = call->q_pos[0];
    return TSR_OK;
}

/* The view index of position p in v, or -1: entry p itself when the view is in position order
 * there, else through index_of (filled for v by the caller). */
static int64_t tidal_index(const tidal_attn *a, const tsr_kv_view *v, int32_t p, int have_map) {
    if (p < v->n && v->pos[p] == p) return p;
    if (!have_map || p >= a->index_cap) return -1;
    return a->index_of[p];
}

/* Fills index_of with view v's positions; 0 when out of memory. */
static int tidal_map(tidal_attn *a, const tsr_kv_view *v) {
    const tsr_host *host = a->base.sh.host;
    int32_t top = -1;
    for (int64_t j = 0; j < v->n; j++)
        if (v->pos[j] > top) top = v->pos[j];
    if (top + 1 > a->index_cap) {
        int32_t *map = host->alloc(host->ctx, (size_t)(top + 1) * sizeof *map, 0);
        if (!map) return 0;
        host->free(host->ctx, a->index_of);
        a->index_of = map;
        a->index_cap = top + 1;
    }
    for (int64_t p = 0; p < a->index_cap; p++) a->index_of[p] = -1;
    for (int64_t j = 0; j < v->n; j++)
        if (v->pos[j] >= 0) a->index_of[v->pos[j]] = (int32_t)j;
    return 1;
}

/* The bits of the chosen positions (and the query's own) of each head, for a sparse layer. */
static tsr_status tidal_words(tidal_attn *a, const tidal_seq *s, const tsr_attention_call *call) {
    const tsr_host *host = a->base.sh.host;
    const int32_t group = a->base.sh.n_head / a->base.sh.n_kv_head;
    int64_t most = 0;
    tsr_attention_scan_views(&a->base.sh, call, &most);
    if (!tsr_sparse_chosen_reserve(host, &a->chosen, a->base.sh.n_head, most))
        return tidal_nomem(a, call);
    a->chosen.every = s->every;
    for (int32_t g = 0; g < a->base.sh.n_kv_head; g++) {
        const tsr_kv_view *v = &call->views[g];
        int have_map = 0;
        for (int32_t h = g * group; h < (g + 1) * group; h++) {
            if (s->every[h]) continue;
            uint64_t *words = tsr_sparse_chosen_row(&a->chosen, h, v->n);
            const int32_t *chosen = s->chosen + (size_t)h * (size_t)s->cap;
            for (int64_t i = 0; i <= s->n_chosen[h]; i++) {
                int32_t p = i < s->n_chosen[h] ? chosen[i] : call->q_pos[0];
                int64_t j = tidal_index(a, v, p, have_map);
                if (j < 0 && !have_map) {
                    if (!tidal_map(a, v)) return tidal_nomem(a, call);
                    have_map = 1;
                    j = tidal_index(a, v, p, have_map);
                }
                if (j >= 0) words[j / TSR_SPARSE_TILE] |= UINT64_C(1) << (j % TSR_SPARSE_TILE);
            }
        }
    }
    return TSR_OK;
}

static tsr_status tidal_forward(void *self, const tsr_attention_call *call) {
    tidal_attn *a = self;
    tsr_status st = tsr_attention_check_call(&a->base.sh, call);
    if (st < 0) return st;
    tsr_sparse_counts *counts = tsr_sparse_counts_of(&a->base, call);
    if (call->phase != TSR_PHASE_DECODE || call->n_q != 1 || call->layer < a->select_layer)
        return tsr_sparse_forward(&a->base.sh, call, NULL, NULL, counts, NULL);
    tidal_seq *s = tidal_seq_get(a, call->seq_id);
    if (!s) return tidal_nomem(a, call);
    if (call->layer == a->select_layer || call->layer == a->reselect_layer)
        return tidal_select_layer(a, s, call, counts);
    /* No choice for this step (its selection layer did not run as a decode call of one query):
     * read everything. */
    if (s->q_pos != call->q_pos[0])
        return tsr_sparse_forward(&a->base.sh, call, NULL, NULL, counts, NULL);
    if ((st = tidal_words(a, s, call)) < 0) return st;
    return tsr_sparse_forward(&a->base.sh, call, tsr_sparse_select_chosen, &a->chosen, counts,
                              NULL);
}

static void tidal_destroy(void *self) {
    tidal_attn *a = self;
    const tsr_host *host = a->base.sh.host;
    tsr_sparse_log_reads(&a->base);
    while (a->seqs.n) tidal_seq_free(a, tsr_seq_table_take(&a->seqs, a->seqs.ids[0]));
    tsr_seq_table_free(host, &a->seqs);
    host->free(host->ctx, a->chosen.words);
    host->free(host->ctx, a->scores);
    host->free(host->ctx, a->index_of);
    tsr_attention_destroy(a);
}

static tsr_status tidal_create(const tsr_host *host, const tsr_params *params,
                               const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    int64_t select = tsr_param_int(params, "select_layer");
    int64_t reselect = tsr_param_int(params, "reselect_layer");
    if (reselect >= 0 && reselect < select) {
        host->set_error(host->ctx, "reselect_layer %lld is before select_layer %lld: the "
                                   "re-selection comes after the selection (or -1: 13/32 of the "
                                   "layers)", (long long)reselect, (long long)select);
        return TSR_E_INVALID;
    }
    if (select >= init->n_layer)
        host->log(host->ctx, TSR_LOG_WARN, "select_layer %lld: the model has %d layers, so no "
                  "layer selects and every layer reads every entry", (long long)select,
                  (int)init->n_layer);
    tidal_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->k = (int32_t)tsr_param_int(params, "k");
    a->select_layer = (int32_t)select;
    a->reselect_layer = reselect >= 0 ? (int32_t)reselect : (init->n_layer * 13 + 16) / 32;
    *out = a;
    return TSR_OK;
}

static const tsr_param_def tidal_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "k", .type = TSR_PARAM_INT, .default_value = "256",
     .min = 1, .max = 1 << 20, .unit = "tokens",
     .doc = "positions each query head reads in sparse layers, besides its own"},
    {TSR_SIZED(tsr_param_def), .name = "select_layer", .type = TSR_PARAM_INT,
     .default_value = "2", .min = 0, .max = 1 << 16, .unit = "layer",
     .doc = "the token selection layer; the layers before it read every entry"},
    {TSR_SIZED(tsr_param_def), .name = "reselect_layer", .type = TSR_PARAM_INT,
     .default_value = "-1", .min = -1, .max = 1 << 16, .unit = "layer",
     .doc = "the re-selection layer; -1: 13/32 of the layers, rounded (the paper's 13 of 32)"},
};

static const tsr_command tidal_commands[] = {TSR_SPARSE_READ_COMMANDS};

static const tsr_attention_vtable tidal_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = tidal_create,
    .destroy = tidal_destroy,
    .forward = tidal_forward,
    .seq_begin = tidal_seq_begin,
    .seq_end = tidal_seq_end,
};

static const tsr_plugin_desc tidal_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "tidal",
    .version = "1.0",
    .description = "TidalDecode: selection layers choose the top-k positions other layers reuse",
    TSR_PARAMS(tidal_params),
    TSR_COMMANDS(tidal_commands),
    .vtable = &tidal_vtable,
};

TSR_PLUGIN_EXPORT(&tidal_desc)
