/*
 * attention 'reference': out = softmax(scale * q.k^T) v over the entries each view exposes,
 * written as the definition reads, in double precision, so every other attention plugin can
 * be checked against it.
 *
 * Work is split over (query, head) pairs with parallel_for; each pair is computed by one task
 * from start to end, so the result does not depend on the number of threads. When a view asks
 * for score_acc, a second pass split over (KV head, block of entries) recomputes each
 * probability from the per-pair maximum and normaliser kept by the first pass, and sums them
 * for each entry in a fixed order (head, then query): again independent of the thread count.
 * When the call asks for head_mass, the first pass also keeps each (query, head)'s probability
 * outside the sinks and the window, and the calling thread adds them up per head in query
 * order.
 */
#include <math.h>
#include <stdatomic.h>

#include <tessera/sdk_attention.h>

/* Rows converted at a time for F16 views and views read through load_k / load_v. */
#define REF_BLOCK 64

typedef struct ref_attn {
    tsr_attention_shape sh; /* first: tsr_attention_new / _destroy rely on it */
} ref_attn;

/* One forward call shared by the tasks. */
typedef struct ref_job {
    const ref_attn *a;
    const tsr_attention_call *call;
    int64_t max_view_n;
    double *stat;            /* (n_q, n_head, 2): max score and sum of exp(score - max) */
    double *outside;         /* (n_q, n_head) probability outside sinks + window, or NULL */
    int64_t n_score_items;   /* (KV head, entry block) items of the score pass */
    atomic_int failed;       /* a task could not allocate its scratch */
} ref_job;

static double ref_dot(const float *q, const float *k, int32_t d) {
    double s = 0.0;
    for (int32_t i = 0; i < d; i++) s += (double)q[i] * (double)k[i];
    return s;
}

static void ref_task(void *arg, int ith, int nth) {
    ref_job *job = arg;
    const ref_attn *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head;
    int64_t n_items = c->n_q * a->sh.n_head;
    int64_t first = n_items * ith / nth, last = n_items * (ith + 1) / nth;
    if (first == last) return;

    size_t bytes = (size_t)job->max_view_n * sizeof(double) + (size_t)hd * sizeof(double) +
                   (size_t)REF_BLOCK * (size_t)hd * sizeof(float);
    char *mem = a->sh.host->alloc(a->sh.host->ctx, bytes, 0);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    double *p = (double *)mem;                 /* (view n) scores, then probabilities */
    double *acc = p + job->max_view_n;         /* (head_dim) */
    float *rows = (float *)(acc + hd);         /* (REF_BLOCK, head_dim) */

    for (int64_t it = first; it < last; it++) {
        int64_t i = it / a->sh.n_head;
        int32_t h = (int32_t)(it % a->sh.n_head);
        const tsr_kv_view *v = &c->views[h / group];
        const float *q = c->q + (size_t)it * (size_t)hd;
        float *out = c->out + (size_t)it * (size_t)hd;
        int32_t qpos = c->q_pos[i];

        double m = -INFINITY;
        for (int64_t j0 = 0; j0 < v->n; j0 += REF_BLOCK) {
            int64_t nb = v->n - j0 < REF_BLOCK ? v->n - j0 : REF_BLOCK;
            size_t st;
            const float *k = tsr_kv_view_rows(v, 0, j0, nb, hd, rows, &st);
            for (int64_t r = 0; r < nb; r++) {
                if (v->pos[j0 + r] > qpos) continue;
                p[j0 + r] = (double)c->scale * ref_dot(q, k + (size_t)r * st, hd);
                if (p[j0 + r] > m) m = p[j0 + r];
            }
        }
        double l = 0.0;
        for (int32_t d = 0; d < hd; d++) acc[d] = 0.0;
        if (m > -INFINITY) {
            for (int64_t j = 0; j < v->n; j++) {
                if (v->pos[j] > qpos) continue;
                p[j] = exp(p[j] - m);
                l += p[j];
            }
            for (int64_t j0 = 0; j0 < v->n; j0 += REF_BLOCK) {
                int64_t nb = v->n - j0 < REF_BLOCK ? v->n - j0 : REF_BLOCK;
                size_t st;
                const float *vv = tsr_kv_view_rows(v, 1, j0, nb, hd, rows, &st);
                for (int64_t r = 0; r < nb; r++) {
                    if (v->pos[j0 + r] > qpos) continue;
                    for (int32_t d = 0; d < hd; d++)
                        acc[d] += p[j0 + r] * (double)vv[(size_t)r * st + (size_t)d];
                }
            }
        }
        /* A query that sees no entry gets zeros (only possible with a policy that hid even
         * the query's own position). */
        for (int32_t d = 0; d < hd; d++) out[d] = l > 0.0 ? (float)(acc[d] / l) : 0.0f;
        if (job->outside) {
            double mass = 0.0;
            for (int64_t j = 0; j < v->n && l > 0.0; j++)
                if (v->pos[j] <= qpos && v->pos[j] >= c->stats_sink &&
                    v->pos[j] <= (int64_t)qpos - c->stats_window)
                    mass += p[j];
            job->outside[it] = l > 0.0 ? mass / l : 0.0;
        }
        job->stat[2 * it] = m;
        job->stat[2 * it + 1] = l;
    }
    a->sh.host->free(a->sh.host->ctx, mem);
}

/* Score pass: item (g, b) covers entries [b*REF_BLOCK, ...) of views[g]; items of KV heads
 * without score_acc are empty. */
static void ref_score_task(void *arg, int ith, int nth) {
    ref_job *job = arg;
    const ref_attn *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head;
    int64_t blocks_per_head = (job->max_view_n + REF_BLOCK - 1) / REF_BLOCK;
    int64_t first = job->n_score_items * ith / nth;
    int64_t last = job->n_score_items * (ith + 1) / nth;
    if (first == last) return;

    const tsr_host *host = a->sh.host;
    float *rows = host->alloc(host->ctx, (size_t)REF_BLOCK * (size_t)hd * sizeof(float), 0);
    if (!rows) {
        atomic_store(&job->failed, 1);
        return;
    }
    for (int64_t it = first; it < last; it++) {
        int32_t g = (int32_t)(it / blocks_per_head);
        int64_t j0 = (it % blocks_per_head) * REF_BLOCK;
        const tsr_kv_view *v = &c->views[g];
        if (!v->score_acc || j0 >= v->n) continue;
        int64_t nb = v->n - j0 < REF_BLOCK ? v->n - j0 : REF_BLOCK;
        size_t st;
        const float *k = tsr_kv_view_rows(v, 0, j0, nb, hd, rows, &st);
        for (int64_t r = 0; r < nb; r++) {
            int32_t kpos = v->pos[j0 + r];
            double sum = 0.0;
            for (int32_t h = g * group; h < (g + 1) * group; h++) {
                for (int64_t i = 0; i < c->n_q; i++) {
                    int32_t qpos = c->q_pos[i];
                    if (qpos < v->score_from_pos || kpos > qpos) continue;
                    int64_t pair = i * a->sh.n_head + h;
                    const float *q = c->q + (size_t)pair * (size_t)hd;
                    double s = (double)c->scale * ref_dot(q, k + (size_t)r * st, hd);
                    sum += exp(s - job->stat[2 * pair]) / job->stat[2 * pair + 1];
                }
            }
            v->score_acc[j0 + r] += (float)sum;
        }
    }
    host->free(host->ctx, rows);
}

static tsr_status ref_forward(void *self, const tsr_attention_call *call) {
    ref_attn *a = self;
    tsr_status st = tsr_attention_check_call(&a->sh, call);
    if (st < 0) return st;
    if (call->n_q == 0) return TSR_OK;

    ref_job job = {.a = a, .call = call};
    int any_scores = tsr_attention_scan_views(&a->sh, call, &job.max_view_n);
    atomic_init(&job.failed, 0);
    job.stat = tsr_calloc(a->sh.host, (size_t)(call->n_q * a->sh.n_head) * 2, sizeof(double));
    if (call->head_mass)
        job.outside = tsr_calloc(a->sh.host, (size_t)(call->n_q * a->sh.n_head), sizeof(double));
    if (!job.stat || (call->head_mass && !job.outside)) atomic_store(&job.failed, 1);
    else a->sh.host->parallel_for(a->sh.host->ctx, ref_task, &job);
    for (int32_t h = 0; job.outside && !atomic_load(&job.failed) && h < a->sh.n_head; h++) {
        double mass = 0.0;
        for (int64_t i = 0; i < call->n_q; i++) mass += job.outside[i * a->sh.n_head + h];
        call->head_mass[h] += (float)mass;
    }
    if (!atomic_load(&job.failed) && any_scores) {
        job.n_score_items = a->sh.n_kv_head * ((job.max_view_n + REF_BLOCK - 1) / REF_BLOCK);
        a->sh.host->parallel_for(a->sh.host->ctx, ref_score_task, &job);
    }
    a->sh.host->free(a->sh.host->ctx, job.stat);
    a->sh.host->free(a->sh.host->ctx, job.outside);
    if (atomic_load(&job.failed)) return tsr_attention_nomem(&a->sh, call, job.max_view_n);
    return TSR_OK;
}

static tsr_status ref_create(const tsr_host *host, const tsr_params *params,
                             const tsr_attention_init *init, void **out) {
    (void)params;
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    ref_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    *out = a;
    return TSR_OK;
}

static const tsr_attention_vtable ref_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = ref_create,
    .destroy = tsr_attention_destroy,
    .forward = ref_forward,
};

static const tsr_plugin_desc ref_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "reference",
    .version = "1.0",
    .description = "plain softmax(q.k^T*scale) v in double precision: the yardstick for the others",
    .vtable = &ref_vtable,
};

TSR_PLUGIN_EXPORT(&ref_desc)
