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
 */
#include <math.h>
#include <stdatomic.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>

/* Rows converted at a time for F16 views and views read through load_k / load_v. */
#define REF_BLOCK 64

typedef struct ref_attn {
    const tsr_host *host;
    int32_t n_layer, n_head, n_kv_head, head_dim;
} ref_attn;

/* One forward call shared by the tasks. */
typedef struct ref_job {
    const ref_attn *a;
    const tsr_attention_call *call;
    int64_t max_view_n;
    double *stat;            /* (n_q, n_head, 2): max score and sum of exp(score - max) */
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
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head;
    int64_t n_items = c->n_q * a->n_head;
    int64_t first = n_items * ith / nth, last = n_items * (ith + 1) / nth;
    if (first == last) return;

    size_t bytes = (size_t)job->max_view_n * sizeof(double) + (size_t)hd * sizeof(double) +
                   (size_t)REF_BLOCK * (size_t)hd * sizeof(float);
    char *mem = a->host->alloc(a->host->ctx, bytes, 0);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    double *p = (double *)mem;                 /* (view n) scores, then probabilities */
    double *acc = p + job->max_view_n;         /* (head_dim) */
    float *rows = (float *)(acc + hd);         /* (REF_BLOCK, head_dim) */

    for (int64_t it = first; it < last; it++) {
        int64_t i = it / a->n_head;
        int32_t h = (int32_t)(it % a->n_head);
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
        job->stat[2 * it] = m;
        job->stat[2 * it + 1] = l;
    }
    a->host->free(a->host->ctx, mem);
}

/* Score pass: item (g, b) covers entries [b*REF_BLOCK, ...) of views[g]; items of KV heads
 * without score_acc are empty. */
static void ref_score_task(void *arg, int ith, int nth) {
    ref_job *job = arg;
    const ref_attn *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->head_dim, group = a->n_head / a->n_kv_head;
    int64_t blocks_per_head = (job->max_view_n + REF_BLOCK - 1) / REF_BLOCK;
    int64_t first = job->n_score_items * ith / nth;
    int64_t last = job->n_score_items * (ith + 1) / nth;
    if (first == last) return;

    float *rows = a->host->alloc(a->host->ctx, (size_t)REF_BLOCK * (size_t)hd * sizeof(float), 0);
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
                    int64_t pair = i * a->n_head + h;
                    const float *q = c->q + (size_t)pair * (size_t)hd;
                    double s = (double)c->scale * ref_dot(q, k + (size_t)r * st, hd);
                    sum += exp(s - job->stat[2 * pair]) / job->stat[2 * pair + 1];
                }
            }
            v->score_acc[j0 + r] += (float)sum;
        }
    }
    a->host->free(a->host->ctx, rows);
}

static tsr_status ref_check_call(const ref_attn *a, const tsr_attention_call *c) {
    const tsr_host *host = a->host;
    if (c->layer < 0 || c->layer >= a->n_layer) {
        host->set_error(host->ctx, "forward: layer %d outside [0, %d)", (int)c->layer,
                        (int)a->n_layer);
        return TSR_E_RANGE;
    }
    if (c->n_q < 0 || (c->n_q > 0 && (!c->q || !c->q_pos || !c->out)) || !c->views) {
        host->set_error(host->ctx, "forward: layer %d: missing q, q_pos, out or views",
                        (int)c->layer);
        return TSR_E_INVALID;
    }
    for (int32_t g = 0; g < a->n_kv_head; g++) {
        const tsr_kv_view *v = &c->views[g];
        if (v->n < 0 || (v->n > 0 && !v->pos) || !tsr_kv_view_readable(v)) {
            host->set_error(host->ctx,
                            "forward: layer %d: view of KV head %d is not readable (n %lld, "
                            "dtype %d: F32/F16 need k, v and pos; others need load_k/load_v)",
                            (int)c->layer, (int)g, (long long)v->n, (int)v->dtype);
            return TSR_E_INVALID;
        }
    }
    return TSR_OK;
}

static tsr_status ref_forward(void *self, const tsr_attention_call *call) {
    ref_attn *a = self;
    tsr_status st = ref_check_call(a, call);
    if (st < 0) return st;
    if (call->n_q == 0) return TSR_OK;

    ref_job job = {.a = a, .call = call};
    int any_scores = 0;
    for (int32_t g = 0; g < a->n_kv_head; g++) {
        if (call->views[g].n > job.max_view_n) job.max_view_n = call->views[g].n;
        any_scores |= call->views[g].score_acc != NULL;
    }
    atomic_init(&job.failed, 0);
    job.stat = tsr_calloc(a->host, (size_t)(call->n_q * a->n_head) * 2, sizeof(double));
    if (!job.stat) goto nomem;
    a->host->parallel_for(a->host->ctx, ref_task, &job);
    if (!atomic_load(&job.failed) && any_scores) {
        job.n_score_items = a->n_kv_head * ((job.max_view_n + REF_BLOCK - 1) / REF_BLOCK);
        a->host->parallel_for(a->host->ctx, ref_score_task, &job);
    }
    a->host->free(a->host->ctx, job.stat);
    if (atomic_load(&job.failed)) goto nomem;
    return TSR_OK;
nomem:
    a->host->set_error(a->host->ctx, "forward: layer %d: out of memory for %lld queries over %lld "
                       "entries", (int)call->layer, (long long)call->n_q,
                       (long long)job.max_view_n);
    return TSR_E_NOMEM;
}

static tsr_status ref_create(const tsr_host *host, const tsr_params *params,
                             const tsr_attention_init *init, void **out) {
    (void)params;
    if (init->n_layer <= 0 || init->n_head <= 0 || init->n_kv_head <= 0 || init->head_dim <= 0 ||
        init->n_head % init->n_kv_head != 0) {
        host->set_error(host->ctx,
                        "shape n_layer %d, n_head %d, n_kv_head %d, head_dim %d: expected "
                        "positive sizes with n_head a multiple of n_kv_head",
                        (int)init->n_layer, (int)init->n_head, (int)init->n_kv_head,
                        (int)init->head_dim);
        return TSR_E_INVALID;
    }
    if (init->backend_name && strcmp(init->backend_name, "cpu") != 0) {
        host->set_error(host->ctx, "backend '%s': this plugin reads host memory only (cpu)",
                        init->backend_name);
        return TSR_E_UNSUPPORTED;
    }
    ref_attn *a = tsr_calloc(host, 1, sizeof *a);
    if (!a) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    a->host = host;
    a->n_layer = init->n_layer;
    a->n_head = init->n_head;
    a->n_kv_head = init->n_kv_head;
    a->head_dim = init->head_dim;
    *out = a;
    return TSR_OK;
}

static void ref_destroy(void *self) {
    ref_attn *a = self;
    a->host->free(a->host->ctx, a);
}

static const tsr_attention_vtable ref_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = ref_create,
    .destroy = ref_destroy,
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
