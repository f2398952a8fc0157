/*
 * attention 'ggml': the result of 'reference', rounded as llama.cpp's CPU backend rounds it
 * without flash attention, so that logits can be compared with llama.cpp bit for bit. The
 * model is the one the fixture references were made with (llama.cpp c392e5094, February 2025:
 * an AVX-512 build by GCC, one thread, F32 KV cache). Per layer llama.cpp computes
 *
 *   KQ  = mul_mat(K, Q)                      f32 dots, one per (cell, token, head)
 *   KQ  = soft_max_ext(KQ, mask, scale)      KQ * scale, + mask (0 or -inf), ggml's softmax
 *   KQV = mul_mat(V^T, KQ)                   f32 dots over the cells
 *
 * over n_kv cache cells: the used cells rounded up to a multiple of 32 (`kv_pad`, 256 only
 * with flash attention), at least 32, at most the cache size (n_ctx rounded up the same way);
 * cells of other sequences, unused cells and cells in a token's future are masked with -inf.
 * Here view entry j plays cell j (a fresh llama.cpp cache puts position p in cell p, as the
 * 'full' cache's view does), and entries from view->n to n_kv are the unused cells.
 *
 * How ggml rounds a f32 mul_mat: llamafile's tinyBLAS serves it when the right operand is
 * contiguous, has n >= 2 columns, its dot length k is a multiple of 16 and the left operand's
 * row count m a multiple of 4; a dot is then 16 f32 fma lanes (term t into lane t % 16, in
 * order) reduced by _mm512_reduce_add_ps. Otherwise ggml_vec_dot_f32 runs: 4 x 16 fma lanes
 * over the first k & ~63 terms, the four registers added (0+2, 1+3, then the two), reduced
 * the same way, then the remaining terms one by one as `sumf += x*y` with two roundings, not
 * an fma (the fixture references tell: with an fma chain, llama-tiny-q4_k_m's logits leave
 * llama.cpp's from position 29 on, with two roundings they agree up to 48).
 *  - KQ: the right operand is Q permuted to (head_dim, tokens, heads), contiguous only for
 *    one token (then n = 1, refused) or one head: vec_dot, except with one head.
 *  - KQV: the right operand is the softmax output, contiguous: tinyBLAS from 2 tokens on
 *    (when n_kv % 16 == 0), vec_dot for a single token (decode).
 * The softmax is tsr_softmax (ggml's exp and summation order) on the n_kv scores.
 *
 * Every (query, head) is computed whole by one task in plain C (fmaf where ggml has an fma;
 * the build forbids the compiler any fma of its own), so the bits depend neither on the
 * thread count nor on the CPU. F16 views are read exactly, as 'reference' reads them;
 * llama.cpp's F16 cache would also round Q and the probabilities to F16, which this plugin
 * does not model.
 */
#include <math.h>
#include <stdatomic.h>

#include <tessera/kernels_cpu.h>
#include <tessera/sdk_attention.h>

/* Queries per work item: each item converts (F16 / loaded views) its KV head's rows once. */
#define GGML_QB 16
/* f32 lanes of an AVX-512 register, and ggml_vec_dot_f32's step: four registers. */
#define GGML_LANES 16
#define GGML_STEP 64

typedef struct ggml_attn {
    tsr_attention_shape sh; /* first: tsr_attention_new / _destroy rely on it */
    int64_t kv_pad;  /* n_kv is a multiple of this */
    int64_t kv_size; /* llama.cpp's cache size: n_ctx rounded up to kv_pad */
} ggml_attn;

typedef struct ggml_job {
    const ggml_attn *a;
    const tsr_attention_call *call;
    int64_t max_n, max_kv;  /* largest view, largest padded length */
    int64_t q_per_item;     /* all queries when score_acc is asked: one item per KV head */
    int64_t items_per_head;
    atomic_int failed;      /* a task could not allocate its scratch */
} ggml_job;

/* _mm512_reduce_add_ps as GCC expands it: upper + lower half, then quarters, then pairs. */
static float ggml_hsum16(const float *v) {
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = v[i] + v[i + 8];
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* ggml_vec_dot_f32's four registers of lane sums (64 floats) folded and reduced. */
static float ggml_fold64(const float *acc) {
    float r[GGML_LANES];
    for (int l = 0; l < GGML_LANES; l++)
        r[l] = (acc[l] + acc[l + 32]) + (acc[l + 16] + acc[l + 48]);
    return ggml_hsum16(r);
}

/* x . y as ggml_vec_dot_f32 computes it on AVX-512. */
static float ggml_vec_dot(const float *x, const float *y, int64_t n) {
    float acc[GGML_STEP] = {0};
    int64_t np = n & ~(int64_t)(GGML_STEP - 1);
    for (int64_t i = 0; i < np; i += GGML_STEP)
        for (int l = 0; l < GGML_STEP; l++) acc[l] = fmaf(x[i + l], y[i + l], acc[l]);
    float s = ggml_fold64(acc);
    for (int64_t i = np; i < n; i++) s += x[i] * y[i];
    return s;
}

/* x . y as tinyBLAS computes it (n a multiple of 16). */
static float ggml_tiny_dot(const float *x, const float *y, int64_t n) {
    float acc[GGML_LANES] = {0};
    for (int64_t i = 0; i < n; i += GGML_LANES)
        for (int l = 0; l < GGML_LANES; l++) acc[l] = fmaf(x[i + l], y[i + l], acc[l]);
    return ggml_hsum16(acc);
}

/* out[d] = sum over j < n_kv of p[j] * V[j][d], as mul_mat(V^T, KQ) rounds it: tinyBLAS when
 * `tiny`, else ggml_vec_dot_f32 over n_kv terms. Terms j >= n (unused cells) have p = 0:
 * adding a zero product leaves a sum as it is (sums start at +0 and never become -0), so
 * they are skipped. acc: (hd, 64) scratch. */
static void ggml_pv(float *out, const float *p, int64_t n, int64_t n_kv, const float *v,
                    size_t vst, int32_t hd, int tiny, float *acc) {
    int32_t width = tiny ? GGML_LANES : GGML_STEP;
    int64_t n_lanes = tiny ? n : (n_kv & ~(int64_t)(GGML_STEP - 1));
    if (n_lanes > n) n_lanes = n;
    memset(acc, 0, (size_t)hd * (size_t)width * sizeof(float));
    for (int64_t j = 0; j < n_lanes; j++) {
        const float *vr = v + (size_t)j * vst;
        int32_t l = (int32_t)(j % width);
        for (int32_t d = 0; d < hd; d++) acc[d * width + l] = fmaf(vr[d], p[j], acc[d * width + l]);
    }
    for (int32_t d = 0; d < hd; d++)
        out[d] = tiny ? ggml_hsum16(acc + d * width) : ggml_fold64(acc + d * width);
    for (int64_t j = n_lanes; j < n; j++) {
        const float *vr = v + (size_t)j * vst;
        for (int32_t d = 0; d < hd; d++) out[d] += vr[d] * p[j];
    }
}

/* llama.cpp's n_kv for a view of n entries. */
static int64_t ggml_n_kv(const ggml_attn *a, int64_t n) {
    int64_t n_kv = (n + a->kv_pad - 1) / a->kv_pad * a->kv_pad;
    if (n_kv < a->kv_pad) n_kv = a->kv_pad;
    if (n_kv > a->kv_size && n <= a->kv_size) n_kv = a->kv_size;
    return n_kv;
}

static void ggml_task(void *arg, int ith, int nth) {
    ggml_job *job = arg;
    const ggml_attn *a = job->a;
    const tsr_attention_call *c = job->call;
    const int32_t hd = a->sh.head_dim, group = a->sh.n_head / a->sh.n_kv_head;
    int64_t n_items = job->items_per_head * a->sh.n_kv_head;
    int64_t first = n_items * ith / nth, last = n_items * (ith + 1) / nth;
    if (first == last) return;

    /* Which mul_mat path llama.cpp takes (see the top of the file). */
    const int prompt = c->n_q >= 2;
    const int kq_tiny = prompt && a->sh.n_head == 1 && hd % GGML_LANES == 0;
    const int pv_tiny_shape = prompt && hd % 4 == 0;

    size_t rows = (size_t)job->max_n * (size_t)hd;
    size_t n_floats = 2 * rows + 2 * (size_t)job->max_kv + (size_t)hd * GGML_STEP;
    size_t bytes = n_floats * sizeof(float) + (size_t)job->max_n * sizeof(double);
    char *mem = a->sh.host->alloc(a->sh.host->ctx, bytes, 0);
    if (!mem) {
        atomic_store(&job->failed, 1);
        return;
    }
    double *sums = (double *)mem;                 /* (max_n) score_acc of the item's view */
    float *kbuf = (float *)(sums + job->max_n);   /* (max_n, hd) converted keys */
    float *vbuf = kbuf + rows;                    /* (max_n, hd) converted values */
    float *s = vbuf + rows;                       /* (max_kv) scaled, masked scores */
    float *p = s + job->max_kv;                   /* (max_kv) probabilities */
    float *acc = p + job->max_kv;                 /* (hd, 64) lanes of the V product */

    for (int64_t it = first; it < last; it++) {
        int32_t g = (int32_t)(it / job->items_per_head);
        int64_t i0 = (it % job->items_per_head) * job->q_per_item;
        int64_t i1 = i0 + job->q_per_item < c->n_q ? i0 + job->q_per_item : c->n_q;
        const tsr_kv_view *v = &c->views[g];
        int64_t n = v->n, n_kv = ggml_n_kv(a, n);
        int kq_tiny_here = kq_tiny && n_kv % 4 == 0;
        int pv_tiny = pv_tiny_shape && n_kv % GGML_LANES == 0;
        size_t kst = (size_t)hd, vst = (size_t)hd;
        const float *k = n ? tsr_kv_view_rows(v, 0, 0, n, hd, kbuf, &kst) : kbuf;
        const float *vv = n ? tsr_kv_view_rows(v, 1, 0, n, hd, vbuf, &vst) : vbuf;
        int scoring = v->score_acc != NULL;
        if (scoring) memset(sums, 0, (size_t)n * sizeof(double));

        for (int64_t i = i0; i < i1; i++) {
            int32_t qpos = c->q_pos[i];
            for (int32_t h = g * group; h < (g + 1) * group; h++) {
                int64_t pair = i * a->sh.n_head + h;
                const float *q = c->q + pair * hd;
                float *out = c->out + pair * hd;
                int any = 0;
                for (int64_t j = 0; j < n_kv; j++) s[j] = -INFINITY;
                for (int64_t j = 0; j < n; j++) {
                    if (v->pos[j] > qpos) continue;
                    const float *kr = k + (size_t)j * kst;
                    float dot = kq_tiny_here ? ggml_tiny_dot(kr, q, hd) : ggml_vec_dot(kr, q, hd);
                    s[j] = dot * c->scale;
                    any = 1;
                }
                if (!any) {
                    /* Nothing visible: zeros, as in 'reference' (llama.cpp would give NaN). */
                    memset(out, 0, (size_t)hd * sizeof(float));
                    continue;
                }
                tsr_softmax(p, s, 1, n_kv, 0, 1);
                ggml_pv(out, p, n, n_kv, vv, vst, hd, pv_tiny, acc);
                if (scoring && qpos >= v->score_from_pos)
                    for (int64_t j = 0; j < n; j++) sums[j] += p[j];
            }
        }
        /* With score_acc, this item holds every query of KV head g: the sums are complete
         * and their order (query, then head) is fixed. */
        if (scoring)
            for (int64_t j = 0; j < n; j++) v->score_acc[j] += (float)sums[j];
    }
    a->sh.host->free(a->sh.host->ctx, mem);
}

static tsr_status ggml_forward(void *self, const tsr_attention_call *call) {
    ggml_attn *a = self;
    tsr_status st = tsr_attention_check_call(&a->sh, call);
    if (st < 0) return st;
    if (call->n_q == 0) return TSR_OK;

    ggml_job job = {.a = a, .call = call, .q_per_item = GGML_QB};
    for (int32_t g = 0; g < a->sh.n_kv_head; g++) {
        const tsr_kv_view *v = &call->views[g];
        if (v->n > job.max_n) job.max_n = v->n;
        if (ggml_n_kv(a, v->n) > job.max_kv) job.max_kv = ggml_n_kv(a, v->n);
        if (v->score_acc) job.q_per_item = call->n_q;
    }
    job.items_per_head = (call->n_q + job.q_per_item - 1) / job.q_per_item;
    atomic_init(&job.failed, 0);
    a->sh.host->parallel_for(a->sh.host->ctx, ggml_task, &job);
    if (atomic_load(&job.failed)) return tsr_attention_nomem(&a->sh, call, job.max_n);
    return TSR_OK;
}

static tsr_status ggml_create(const tsr_host *host, const tsr_params *params,
                              const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 1);
    if (st < 0) return st;
    int64_t pad = tsr_param_int(params, "kv_pad");
    if (pad < 1 || pad > 4096) {
        host->set_error(host->ctx, "kv_pad %lld: expected an integer in [1, 4096]",
                        (long long)pad);
        return TSR_E_INVALID;
    }
    ggml_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->kv_pad = pad;
    a->kv_size = ((int64_t)init->n_ctx + pad - 1) / pad * pad;
    *out = a;
    return TSR_OK;
}

static const tsr_param_def ggml_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "kv_pad", .type = TSR_PARAM_INT, .default_value = "32",
     .min = 1, .max = 4096, .unit = "entries",
     .doc = "llama.cpp pads the attended cache length to a multiple of this (32 without flash "
            "attention)"},
};

static const tsr_attention_vtable ggml_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = ggml_create,
    .destroy = tsr_attention_destroy,
    .forward = ggml_forward,
};

static const tsr_plugin_desc ggml_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "ggml",
    .version = "1.0",
    .description = "llama.cpp's non-flash CPU attention, rounding for rounding (f32, slow)",
    TSR_PARAMS(ggml_params),
    .vtable = &ggml_vtable,
};

TSR_PLUGIN_EXPORT(&ggml_desc)
