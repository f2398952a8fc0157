/*
 * attention 'hydragen': Hydragen (J. Juravsky, B. Brown, R. Ehrlich, D. Y. Fu, C. Re,
 * A. Mirhoseini, "Hydragen: High-Throughput LLM Inference with Shared Prefixes", 2024,
 * arXiv:2402.05099). Sequences decoded together often share a prefix (a system prompt, the
 * prompt of N sampled continuations). Attention over a sequence's entries splits into the
 * shared prefix and its own suffix: softmax attention over the two parts, each with its
 * log-sum-exp, combines exactly into attention over the whole. The prefix part is computed
 * once for the queries of every sequence that shares it, stacked into one matrix against the
 * prefix's K/V (each K/V tile read once for all of them: matrix-matrix products where each
 * sequence alone makes matrix-vector ones); the suffix part is computed per sequence.
 *
 * The shared prefix is found in forward_batch (attention ABI 1.1), which gets the calls of
 * every sequence of one forward: in each KV head's view extension, sequences whose views list
 * the same block pointers share those blocks (the 'paged' cache shows a fork's common prefix
 * so, without a copy). Calls of sequences that share at least one tile of whole blocks are
 * grouped; the prefix is cut down to whole tiles.
 *
 * The combination is the online softmax of <tessera/sdk_flash.h>, the 'flash' plugin's: the
 * prefix pass leaves each (query, head) the running max m, normaliser l and unnormalised
 * output of the prefix tiles, and the sequence's own pass resumes from them at the first
 * suffix tile. Combining by log-sum-exp this way, with flash's tiles and per-row arithmetic,
 * gives flash's bits exactly (same `tile`), which the tests check. A call alone (forward, or a
 * sequence sharing nothing) is flash's computation. score_acc and head_mass are filled over
 * every entry, as flash fills them.
 */
#include <tessera/sdk_flash.h>

/* (query, head) rows of one prefix work item: enough to reuse each K/V tile many times. */
#define HYD_ROWS 64

typedef struct hyd_attn {
    tsr_flash flash; /* first: tsr_attention_new / _destroy and tsr_flash_run rely on it */
    /* Over the instance's life: (query, head) x entry pairs computed in shared prefix passes,
     * and all pairs visible to the batched calls (for the destroy log and `shared_fraction`). */
    int64_t shared_pairs, batched_pairs;
} hyd_attn;

/* A group of calls sharing a prefix of `n_prefix` entries (whole tiles) in KV head g. */
typedef struct hyd_group {
    int32_t g;
    int64_t n_prefix;
    int64_t first, n_members; /* into hyd_batch.members */
    int64_t n_rows;           /* queries of the members times the query heads of g */
} hyd_group;

/* One forward_batch: the calls, where each resumes, and the prefix passes to run. */
typedef struct hyd_batch {
    const hyd_attn *a;
    const tsr_attention_call *const *calls;
    int64_t n_calls;
    tsr_flash_start *starts; /* (n_calls) */
    int64_t *j0;             /* (n_calls, n_kv_head) */
    float **ml, **acc;       /* (n_calls) the starts' arrays */
    int64_t *members;        /* (n_calls * n_kv_head) call indices, group by group */
    hyd_group *groups;       /* (n_calls * n_kv_head) */
    int64_t n_groups;
    int64_t *item_group, *item_row; /* (n_items) */
    int64_t n_items;
    atomic_int failed;
} hyd_batch;

/* The extension of view g of call c when its entries lie in blocks the prefix pass reads as
 * flash reads them (F32 or F16, no products of the policy's own), else NULL. */
static const tsr_kv_view_ext *hyd_blocks(const tsr_flash *f, const tsr_attention_call *c,
                                         int32_t g) {
    const tsr_kv_view_ext *e = tsr_flash_view_ext(c, g);
    if (!e || e->block_size <= 0 || !e->k_blocks || !e->v_blocks || c->views[g].n <= 0 ||
        (e->block_dtype != TSR_DTYPE_F32 && e->block_dtype != TSR_DTYPE_F16) ||
        ((e->dot_k || e->axpy_v) && tsr_flash_products(f)))
        return NULL;
    return e;
}

/* Entries that views x and y (with extensions ex, ey) hold in common at their start: the same
 * block pointers and positions, up to the shorter view. */
static int64_t hyd_common(const tsr_kv_view *x, const tsr_kv_view_ext *ex, const tsr_kv_view *y,
                          const tsr_kv_view_ext *ey) {
    if (ex->block_size != ey->block_size || ex->block_dtype != ey->block_dtype ||
        x->k_stride != y->k_stride || x->v_stride != y->v_stride)
        return 0;
    const int64_t bs = ex->block_size, n = x->n < y->n ? x->n : y->n;
    int64_t j = 0;
    for (int64_t b = 0; j < n && ex->k_blocks[b] == ey->k_blocks[b] &&
                        ex->v_blocks[b] == ey->v_blocks[b]; b++)
        j = (b + 1) * bs < n ? (b + 1) * bs : n;
    int64_t same = 0;
    while (same < j && x->pos[same] == y->pos[same]) same++;
    return same;
}

/* Groups the calls by shared prefix, KV head by KV head: each call with blocks joins the first
 * call whose first block it shares; a group of two or more sharing a tile or more is kept. */
static void hyd_find_groups(hyd_batch *b) {
    const tsr_flash *f = &b->a->flash;
    const int32_t nkv = f->sh.n_kv_head, group = f->sh.n_head / nkv;
    char *taken = b->a->flash.sh.host->alloc(b->a->flash.sh.host->ctx, (size_t)b->n_calls, 0);
    if (!taken) return; /* no sharing: every call computes alone, which is exact too */
    int64_t n_members = 0;
    for (int32_t g = 0; g < nkv; g++) {
        memset(taken, 0, (size_t)b->n_calls);
        for (int64_t i = 0; i < b->n_calls; i++) {
            const tsr_attention_call *ci = b->calls[i];
            const tsr_kv_view_ext *ei = hyd_blocks(f, ci, g);
            if (taken[i] || !ei) continue;
            hyd_group *gr = &b->groups[b->n_groups];
            *gr = (hyd_group){.g = g, .n_prefix = ci->views[g].n, .first = n_members};
            for (int64_t k = i; k < b->n_calls; k++) {
                const tsr_attention_call *ck = b->calls[k];
                const tsr_kv_view_ext *ek = hyd_blocks(f, ck, g);
                if (taken[k] || !ek || ek->k_blocks[0] != ei->k_blocks[0]) continue;
                int64_t common = hyd_common(&ci->views[g], ei, &ck->views[g], ek);
                if (common < f->tile) continue;
                if (common < gr->n_prefix) gr->n_prefix = common;
                taken[k] = 1;
                b->members[n_members++] = k;
                gr->n_rows += ck->n_q * group;
            }
            gr->n_members = n_members - gr->first;
            gr->n_prefix = gr->n_prefix / f->tile * f->tile;
            if (gr->n_members < 2 || gr->n_prefix == 0) {
                n_members = gr->first; /* alone: computed by its own pass from entry 0 */
                continue;
            }
            for (int64_t m = 0; m < gr->n_members; m++)
                b->j0[b->members[gr->first + m] * nkv + g] = gr->n_prefix;
            b->n_groups++;
        }
    }
    b->a->flash.sh.host->free(b->a->flash.sh.host->ctx, taken);
}

/* Row r of group gr: its call, query and head. */
static void hyd_row(const hyd_batch *b, const hyd_group *gr, int64_t r, int64_t *call,
                    int64_t *query, int32_t *head) {
    const int32_t group = b->a->flash.sh.n_head / b->a->flash.sh.n_kv_head;
    for (int64_t m = 0;; m++) {
        int64_t i = b->members[gr->first + m];
        int64_t rows = b->calls[i]->n_q * group;
        if (r < rows) {
            *call = i;
            *query = r / group;
            *head = gr->g * group + (int32_t)(r % group);
            return;
        }
        r -= rows;
    }
}

/* The prefix pass of one item (HYD_ROWS rows of a group): every prefix tile read once, each
 * row's online softmax advanced over it as flash's would be, into the row's start state. */
TSR_VECTOR_CLONES
static void hyd_prefix_task(void *arg, int ith, int nth) {
    hyd_batch *b = arg;
    const tsr_flash *f = &b->a->flash;
    const int32_t hd = f->sh.head_dim, tile = f->tile, n_head = f->sh.n_head;
    int64_t first = b->n_items * ith / nth, last = b->n_items * (ith + 1) / nth;
    if (first == last) return;
    /* kt, vt (tile, hd) | kT (hd, kstride) | s (tile) | qs (HYD_ROWS, hd) */
    const int64_t kstride = (tile + TSR_FLASH_KB - 1) / TSR_FLASH_KB * TSR_FLASH_KB;
    size_t n_floats = (2 * (size_t)tile + (size_t)kstride) * (size_t)hd + (size_t)tile +
                      (size_t)HYD_ROWS * (size_t)hd;
    float *mem = f->sh.host->alloc(f->sh.host->ctx, n_floats * sizeof(float), 0);
    if (!mem) {
        atomic_store(&b->failed, 1);
        return;
    }
    float *kt = mem, *vt = kt + (size_t)tile * hd, *kT = vt + (size_t)tile * hd;
    float *s = kT + (size_t)kstride * hd, *qs = s + tile;
    int64_t call[HYD_ROWS], query[HYD_ROWS];
    int32_t head[HYD_ROWS];
    for (int64_t it = first; it < last; it++) {
        const hyd_group *gr = &b->groups[b->item_group[it]];
        const int64_t r0 = b->item_row[it];
        const int64_t nr = gr->n_rows - r0 < HYD_ROWS ? gr->n_rows - r0 : HYD_ROWS;
        const tsr_attention_call *lead = b->calls[b->members[gr->first]];
        const tsr_kv_view *v = &lead->views[gr->g];
        const tsr_kv_view_ext *e = tsr_flash_view_ext(lead, gr->g);
        for (int64_t r = 0; r < nr; r++) {
            hyd_row(b, gr, r0 + r, &call[r], &query[r], &head[r]);
            const tsr_attention_call *c = b->calls[call[r]];
            const float *q = c->q + (query[r] * n_head + head[r]) * hd;
            for (int32_t d = 0; d < hd; d++) qs[r * hd + d] = q[d] * c->scale;
        }
        for (int64_t j0 = 0; j0 < gr->n_prefix; j0 += tile) {
            size_t kst, vst;
            const float *vv = tsr_flash_rows(v, e, 1, j0, tile, hd, vt, &vst);
            const float *k = tsr_flash_rows(v, e, 0, j0, tile, hd, kt, &kst);
            tsr_flash_transpose(kT, k, kst, tile, hd, kstride);
            for (int64_t r = 0; r < nr; r++) {
                const tsr_attention_call *c = b->calls[call[r]];
                int64_t pair = query[r] * n_head + head[r];
                tsr_sparse_scores(s, qs + r * hd, kT, tile, hd, kstride);
                tsr_flash_update(s, v->pos, j0, tile, c->q_pos[query[r]], b->ml[call[r]] + 2 * pair,
                                 b->acc[call[r]] + pair * hd, vv, vst, hd, NULL, NULL);
            }
        }
    }
    f->sh.host->free(f->sh.host->ctx, mem);
}

static tsr_status hyd_forward(void *self, const tsr_attention_call *call) {
    return tsr_flash_run(self, call, NULL);
}

static void hyd_batch_free(hyd_batch *b) {
    const tsr_host *host = b->a->flash.sh.host;
    for (int64_t i = 0; b->ml && i < b->n_calls; i++) {
        host->free(host->ctx, b->ml[i]);
        host->free(host->ctx, b->acc[i]);
    }
    void *arrays[] = {b->starts, b->j0, b->ml, b->acc, b->members, b->groups, b->item_group,
                      b->item_row};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) host->free(host->ctx, arrays[i]);
}

/* The start states of the calls (each (query, head) before any entry) and the groups' items. */
static tsr_status hyd_batch_prepare(hyd_batch *b) {
    const tsr_flash *f = &b->a->flash;
    const tsr_host *host = f->sh.host;
    const int64_t n = b->n_calls, nkv = f->sh.n_kv_head, hd = f->sh.head_dim;
    b->starts = tsr_calloc(host, (size_t)n, sizeof *b->starts);
    b->j0 = tsr_calloc(host, (size_t)(n * nkv), sizeof *b->j0);
    b->ml = tsr_calloc(host, (size_t)n, sizeof *b->ml);
    b->acc = tsr_calloc(host, (size_t)n, sizeof *b->acc);
    b->members = tsr_calloc(host, (size_t)(n * nkv), sizeof *b->members);
    b->groups = tsr_calloc(host, (size_t)(n * nkv), sizeof *b->groups);
    if (!b->starts || !b->j0 || !b->ml || !b->acc || !b->members || !b->groups) return TSR_E_NOMEM;
    hyd_find_groups(b);
    for (int64_t i = 0; i < n; i++) {
        size_t pairs = (size_t)(b->calls[i]->n_q * f->sh.n_head);
        b->ml[i] = host->alloc(host->ctx, pairs * 2 * sizeof(float), 0);
        b->acc[i] = tsr_calloc(host, pairs * (size_t)hd, sizeof(float));
        if (!b->ml[i] || !b->acc[i]) return TSR_E_NOMEM;
        for (size_t p = 0; p < pairs; p++) {
            b->ml[i][2 * p] = -INFINITY;
            b->ml[i][2 * p + 1] = 0.0f;
        }
        b->starts[i] = (tsr_flash_start){.j0 = b->j0 + i * nkv, .ml = b->ml[i], .acc = b->acc[i]};
    }
    for (int64_t k = 0; k < b->n_groups; k++) b->n_items += (b->groups[k].n_rows + HYD_ROWS - 1) / HYD_ROWS;
    b->item_group = host->alloc(host->ctx, (size_t)(b->n_items + 1) * sizeof *b->item_group, 0);
    b->item_row = host->alloc(host->ctx, (size_t)(b->n_items + 1) * sizeof *b->item_row, 0);
    if (!b->item_group || !b->item_row) return TSR_E_NOMEM;
    int64_t it = 0;
    for (int64_t k = 0; k < b->n_groups; k++)
        for (int64_t r = 0; r < b->groups[k].n_rows; r += HYD_ROWS, it++) {
            b->item_group[it] = k;
            b->item_row[it] = r;
        }
    return TSR_OK;
}

static tsr_status hyd_forward_batch(void *self, const tsr_attention_call *const *calls,
                                    int64_t n_calls) {
    hyd_attn *a = self;
    const tsr_host *host = a->flash.sh.host;
    tsr_status st;
    for (int64_t i = 0; i < n_calls; i++)
        if ((st = tsr_attention_check_call(&a->flash.sh, calls[i])) < 0) return st;
    hyd_batch b = {.a = a, .calls = calls, .n_calls = n_calls};
    atomic_init(&b.failed, 0);
    st = hyd_batch_prepare(&b);
    if (st >= 0 && b.n_items > 0) {
        host->parallel_for(host->ctx, hyd_prefix_task, &b);
        if (atomic_load(&b.failed)) st = TSR_E_NOMEM;
    }
    if (st < 0) {
        hyd_batch_free(&b);
        host->set_error(host->ctx, "forward_batch: layer %d: out of memory for the prefix "
                        "passes of %lld sequences", (int)calls[0]->layer, (long long)n_calls);
        return st;
    }
    for (int64_t k = 0; k < b.n_groups; k++) a->shared_pairs += b.groups[k].n_rows * b.groups[k].n_prefix;
    for (int64_t i = 0; i < n_calls; i++)
        for (int32_t g = 0; g < a->flash.sh.n_kv_head; g++)
            a->batched_pairs += calls[i]->n_q * (a->flash.sh.n_head / a->flash.sh.n_kv_head) *
                                calls[i]->views[g].n;
    for (int64_t i = 0; i < n_calls && st >= 0; i++) st = tsr_flash_run(&a->flash, calls[i], &b.starts[i]);
    hyd_batch_free(&b);
    return st;
}

/* The fraction of the (query, head) x entry pairs of batched forwards computed in shared
 * prefix passes; 0 before any. */
static double hyd_shared_fraction(void *self) {
    const hyd_attn *a = self;
    return a->batched_pairs > 0 ? (double)a->shared_pairs / (double)a->batched_pairs : 0;
}

static void hyd_destroy(void *self) {
    hyd_attn *a = self;
    if (a->batched_pairs > 0)
        a->flash.sh.host->log(a->flash.sh.host->ctx, TSR_LOG_INFO,
                              "batched forwards: %lld of %lld (query, head) x entry pairs in "
                              "shared prefix passes (%.1f%%)", (long long)a->shared_pairs,
                              (long long)a->batched_pairs, 100.0 * hyd_shared_fraction(a));
    tsr_attention_destroy(a);
}

static tsr_status hyd_create(const tsr_host *host, const tsr_params *params,
                             const tsr_attention_init *init, void **out) {
    tsr_status st = tsr_attention_check_init(host, init, 0);
    if (st < 0) return st;
    hyd_attn *a = tsr_attention_new(host, init, sizeof *a);
    if (!a) return TSR_E_NOMEM;
    a->flash.tile = (int32_t)tsr_param_int(params, "tile");
    *out = a;
    return TSR_OK;
}

static const tsr_param_def hyd_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "tile", .type = TSR_PARAM_INT, .default_value = "64",
     .min = 8, .max = 1024, .unit = "entries",
     .doc = "keys read per step of the online softmax (flash's); a shared prefix is cut to "
            "whole tiles"},
};

static const tsr_command hyd_commands[] = {
    {TSR_SIZED(tsr_command), .name = "shared_fraction", .signature = "d(I)",
     .fn = (void (*)(void))hyd_shared_fraction,
     .doc = "shared_fraction(): fraction of batched (query, head) x entry pairs computed in "
            "shared prefix passes"},
};

static const tsr_attention_vtable hyd_vtable = {
    TSR_SIZED(tsr_attention_vtable),
    .create = hyd_create,
    .destroy = hyd_destroy,
    .forward = hyd_forward,
    .forward_batch = hyd_forward_batch,
};

static const tsr_plugin_desc hyd_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ATTENTION, ATTENTION),
    .name = "hydragen",
    .version = "1.0",
    .description = "Hydragen: a prefix shared by the batch's sequences (paged blocks) attended "
                   "once for all their queries; flash's bits",
    TSR_PARAMS(hyd_params),
    TSR_COMMANDS(hyd_commands),
    .vtable = &hyd_vtable,
};

TSR_PLUGIN_EXPORT(&hyd_desc)
