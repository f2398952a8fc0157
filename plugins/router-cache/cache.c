/*
 * router 'cache': expert offloading for machines whose memory is smaller than the model, after
 * HOBBIT (Tang et al. 2024, "HOBBIT: A Mixed Precision Expert Offloading System for Fast MoE
 * Inference", arXiv:2411.01433). The routing is the model's own (<tessera/sdk_router.h>, as
 * 'topk'); what changes is where each chosen expert's weights come from:
 *   - kept in memory (the cache holds it): a hit;
 *   - not held, and its routing weight at or above `lowbit_threshold` (or the low-bit rule
 *     off): read from the model file now (tsr_expert_access.load), after letting go of held
 *     experts (evict: least recently or least frequently used) until it fits the budget: a miss;
 *   - not held and its weight below the threshold: served from a low-bit copy made at create
 *     and held in memory apart from the budget, handed to the host as substitutes: HOBBIT's
 *     mixed-precision rule (a less important missed expert costs little accuracy at low
 *     precision and spares a read).
 * With the rule off (threshold 0, the default) every expert is its own weights, so the logits
 * are topk's at any budget. Tokens are taken in order and each token's slots in rank order. No
 * expert the call chose is let go during it, since the host multiplies after route returns:
 * the budget must hold the k experts of one token, and a batch whose tokens choose more at a
 * layer holds them until its next call. With a budget, create lets every expert go, so that
 * the cache starts empty and its counts are what it read.
 *
 * Counters (hits, misses, low-bit uses, bytes read from the file, tokens) are logged at INFO
 * when the router goes (`-v`), by the `stats` command, and written by `dump_stats`.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <tessera/kernels_cpu.h>
#include <tessera/sdk_router.h>

#define MIB 1048576.0

enum evict_rule { EVICT_LRU, EVICT_LFU };
static const char *const evict_rules[] = {"lru", "lfu", NULL};

/* The types a low-bit copy may have: whatever the kernels quantize and multiply. */
static const char *const lowbit_names[] = {"q2_k", "q3_k",   "q4_0",   "q4_1", "q4_k",
                                           "q5_0", "q5_1",   "q5_k",   "q6_k", "q8_0",
                                           "iq4_nl", "iq4_xs", NULL};
static const int32_t lowbit_dtypes[] = {TSR_DTYPE_Q2_K, TSR_DTYPE_Q3_K,   TSR_DTYPE_Q4_0,
                                        TSR_DTYPE_Q4_1, TSR_DTYPE_Q4_K,   TSR_DTYPE_Q5_0,
                                        TSR_DTYPE_Q5_1, TSR_DTYPE_Q5_K,   TSR_DTYPE_Q6_K,
                                        TSR_DTYPE_Q8_0, TSR_DTYPE_IQ4_NL, TSR_DTYPE_IQ4_XS};

typedef struct expert_state {
    uint64_t bytes;     /* its weights' bytes (0: the layer has no experts) */
    uint64_t last_use;  /* the use counter when it was last chosen */
    uint64_t uses;      /* times chosen while held or loaded (LFU) */
    uint64_t call;      /* the last call that chose it */
    bool held;
} expert_state;

typedef struct counters {
    uint64_t hits, misses, lowbit, bytes_read, tokens;
} counters;

typedef struct cache_router {
    const tsr_host *host;
    tsr_topk_rule rule;
    const tsr_expert_access *access; /* NULL without a model: routing only */
    int32_t n_layer, n_expert;
    int32_t evict;
    uint64_t budget;                 /* bytes; 0: every expert may stay */
    uint64_t held_bytes;
    float lowbit_threshold;          /* 0: the low-bit rule is off */
    int32_t lowbit_type;
    expert_state *state;             /* (n_layer, n_expert) */
    tsr_tensor *lowbit;              /* (n_layer, n_expert, 3) when the rule is on */
    void **lowbit_data;              /* (n_layer, n_expert, 3) */
    uint64_t use_clock, calls;
    int32_t last_layer;              /* of the previous call: a new forward starts below it */
    counters count;
} cache_router;

static expert_state *state_of(cache_router *c, int32_t layer, int32_t e) {
    return &c->state[(size_t)layer * (size_t)c->n_expert + (size_t)e];
}

/* ---- the low-bit copies ----------------------------------------------------------------- */

typedef struct copy_job {
    cache_router *c;
    float *rows;          /* (nth, row_elems) scratch */
    int64_t row_elems;
    tsr_status *status;   /* (n_layer * n_expert) each expert's, written by its worker */
} copy_job;

/* One matrix of `src`'s rows converted to f32 and quantized to the low-bit type. */
static tsr_status copy_matrix(copy_job *j, const tsr_tensor *src, tsr_tensor *dst, void **data,
                              float *row) {
    const cache_router *c = j->c;
    const int64_t n = src->ne[0], rows = src->ne[1];
    const size_t out_row = tsr_row_size(c->lowbit_type, n);
    *data = c->host->alloc(c->host->ctx, out_row * (size_t)rows, 64);
    if (!*data) return TSR_E_NOMEM;
    for (int64_t r = 0; r < rows; r++) {
        tsr_status st = tsr_row_to_f32(row, src->dtype, (const char *)src->data + r * src->row_bytes,
                                       n);
        if (st < 0) return st;
        tsr_quantize_row(c->lowbit_type, (char *)*data + (size_t)r * out_row, row, n);
    }
    *dst = *src;
    dst->dtype = c->lowbit_type;
    dst->row_bytes = out_row;
    dst->data = *data;
    dst->extra = NULL;
    dst->name = "cache low-bit copy";
    return TSR_OK;
}

static void copy_task(void *arg, int ith, int nth) {
    copy_job *j = arg;
    cache_router *c = j->c;
    const tsr_expert_access *a = c->access;
    float *row = j->rows + (int64_t)ith * j->row_elems;
    for (int64_t i = ith; i < (int64_t)c->n_layer * c->n_expert; i += nth) {
        const int32_t layer = (int32_t)(i / c->n_expert), e = (int32_t)(i % c->n_expert);
        if (c->state[i].bytes == 0) continue;
        tsr_tensor m[3];
        tsr_status st = a->matrices(a->ctx, layer, e, &m[0], &m[1], &m[2]);
        for (int k = 0; st >= 0 && k < 3; k++)
            st = copy_matrix(j, &m[k], &c->lowbit[i * 3 + k], &c->lowbit_data[i * 3 + k], row);
        j->status[i] = st;
    }
}

/* Checks that every expert's rows are whole blocks of the low-bit type, then makes the
 * copies on the host's pool. */
static tsr_status make_lowbit(cache_router *c, const char *type_name) {
    const tsr_expert_access *a = c->access;
    const int64_t block = tsr_dtype_block_elems(c->lowbit_type);
    int64_t widest = 0;
    for (int32_t l = 0; l < c->n_layer; l++)
        for (int32_t e = 0; e < c->n_expert; e++) {
            if (state_of(c, l, e)->bytes == 0) continue;
            tsr_tensor m[3];
            if (a->matrices(a->ctx, l, e, &m[0], &m[1], &m[2]) < 0) {
                c->host->set_error(c->host->ctx, "layer %d expert %d: no matrices", (int)l,
                                   (int)e);
                return TSR_E_INVALID;
            }
            for (int k = 0; k < 3; k++) {
                if (m[k].ne[0] % block) {
                    c->host->set_error(c->host->ctx, "lowbit_type %s: the experts' %s rows hold "
                                       "%lld values, not a whole number of its blocks of %lld",
                                       type_name, k == 2 ? "down" : k ? "up" : "gate",
                                       (long long)m[k].ne[0], (long long)block);
                    return TSR_E_INVALID;
                }
                if (m[k].ne[0] > widest) widest = m[k].ne[0];
            }
        }
    const size_t n_items = (size_t)c->n_layer * (size_t)c->n_expert;
    const int nth = c->host->n_threads(c->host->ctx);
    copy_job j = {.c = c, .row_elems = widest};
    c->lowbit = tsr_calloc(c->host, n_items * 3, sizeof *c->lowbit);
    c->lowbit_data = tsr_calloc(c->host, n_items * 3, sizeof *c->lowbit_data);
    j.rows = tsr_calloc(c->host, (size_t)nth * (size_t)(widest ? widest : 1), sizeof *j.rows);
    j.status = tsr_calloc(c->host, n_items, sizeof *j.status);
    tsr_status st = TSR_OK;
    if (!c->lowbit || !c->lowbit_data || !j.rows || !j.status) {
        c->host->set_error(c->host->ctx, "out of memory for the low-bit copies");
        st = TSR_E_NOMEM;
    } else {
        c->host->parallel_for(c->host->ctx, copy_task, &j);
    }
    for (size_t i = 0; st >= 0 && i < n_items; i++) {
        if (j.status[i] >= 0) continue;
        st = j.status[i];
        c->host->set_error(c->host->ctx, "layer %d expert %d: cannot make its low-bit copy (%s)",
                           (int)(i / (size_t)c->n_expert), (int)(i % (size_t)c->n_expert),
                           st == TSR_E_NOMEM ? "out of memory" : "the kernels cannot read its type");
    }
    c->host->free(c->host->ctx, j.rows);
    c->host->free(c->host->ctx, j.status);
    return st;
}

/* ---- lifetime ----------------------------------------------------------------------------- */

static void cache_destroy(void *self);

/* The budget, which must hold the k experts a token uses at a layer (the host multiplies them
 * after route returns, so letting one go to make room for another would only have the product
 * read it again); then every expert is let go, so that the cache starts empty and what it
 * holds is what it read. */
static tsr_status start_budget(cache_router *c, double budget_mib, int32_t k) {
    c->budget = (uint64_t)(budget_mib * MIB);
    if (c->budget == 0) return TSR_OK;
    for (int32_t l = 0; l < c->n_layer; l++) {
        uint64_t largest = 0;
        for (int32_t e = 0; e < c->n_expert; e++)
            if (state_of(c, l, e)->bytes > largest) largest = state_of(c, l, e)->bytes;
        if (c->budget < (uint64_t)k * largest) {
            c->host->set_error(c->host->ctx, "budget_mib %g (%llu bytes) cannot hold the %d "
                               "experts a token uses at a layer: %d x %llu bytes at layer %d "
                               "(%.4g MiB)", budget_mib, (unsigned long long)c->budget, (int)k,
                               (int)k, (unsigned long long)largest, (int)l,
                               (double)k * (double)largest / MIB);
            return TSR_E_INVALID;
        }
    }
    for (int32_t l = 0; l < c->n_layer; l++)
        for (int32_t e = 0; e < c->n_expert; e++)
            if (state_of(c, l, e)->bytes) c->access->evict(c->access->ctx, l, e);
    return TSR_OK;
}

static tsr_status cache_create(const tsr_host *host, const tsr_params *params,
                               const tsr_router_init *init, void **out) {
    cache_router *c = tsr_calloc(host, 1, sizeof *c);
    if (!c) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    tsr_status st = tsr_topk_rule_init(&c->rule, host, init);
    if (st < 0) {
        host->free(host->ctx, c);
        return st;
    }
    c->host = host;
    c->access = init->experts;
    c->n_layer = init->n_layer;
    c->n_expert = init->n_expert;
    c->evict = (int32_t)tsr_param_int(params, "evict");
    c->lowbit_threshold = (float)tsr_param_float(params, "lowbit_threshold");
    c->lowbit_type = lowbit_dtypes[tsr_param_int(params, "lowbit_type")];
    c->last_layer = INT32_MAX;
    *out = c;
    if (!c->access) return TSR_OK;
    c->state = tsr_calloc(host, (size_t)c->n_layer * (size_t)c->n_expert, sizeof *c->state);
    if (!c->state) {
        host->set_error(host->ctx, "out of memory for %d layers of %d experts", (int)c->n_layer,
                        (int)c->n_expert);
        st = TSR_E_NOMEM;
    }
    for (int32_t l = 0; st >= 0 && l < c->n_layer; l++)
        for (int32_t e = 0; e < c->n_expert; e++)
            state_of(c, l, e)->bytes = c->access->bytes(c->access->ctx, l, e);
    if (st >= 0 && c->lowbit_threshold > 0)
        st = make_lowbit(c, tsr_param_str(params, "lowbit_type"));
    if (st >= 0) st = start_budget(c, tsr_param_float(params, "budget_mib"), init->n_expert_used);
    if (st < 0) {
        cache_destroy(c);
        *out = NULL;
    }
    return st;
}

static void log_counts(const cache_router *c) {
    const counters *n = &c->count;
    const double per = n->tokens ? 1.0 / (double)n->tokens : 0.0;
    char budget[64] = "no budget";
    if (c->budget) snprintf(budget, sizeof budget, "a budget of %.4g MiB", (double)c->budget / MIB);
    c->host->log(c->host->ctx, TSR_LOG_INFO,
                 "experts: %llu tokens: %llu hits, %llu misses, %llu low-bit (%.3g, %.3g, %.3g per "
                 "token); %.4g MiB read from the file (%.4g MiB per token); %.4g MiB held of %s",
                 (unsigned long long)n->tokens, (unsigned long long)n->hits,
                 (unsigned long long)n->misses, (unsigned long long)n->lowbit,
                 (double)n->hits * per, (double)n->misses * per, (double)n->lowbit * per,
                 (double)n->bytes_read / MIB, (double)n->bytes_read / MIB * per,
                 (double)c->held_bytes / MIB, budget);
}

static void cache_destroy(void *self) {
    cache_router *c = self;
    if (c->access) log_counts(c);
    if (c->lowbit_data)
        for (size_t i = 0; i < (size_t)c->n_layer * (size_t)c->n_expert * 3; i++)
            c->host->free(c->host->ctx, c->lowbit_data[i]);
    c->host->free(c->host->ctx, c->lowbit_data);
    c->host->free(c->host->ctx, c->lowbit);
    c->host->free(c->host->ctx, c->state);
    tsr_topk_rule_free(&c->rule);
    c->host->free(c->host->ctx, c);
}

/* ---- the rule ------------------------------------------------------------------------------ */

/* The held expert to let go: the least recently used (LRU), or the least used, then the least
 * recently (LFU); never one the current call chose. NULL when there is none. */
static expert_state *victim(cache_router *c) {
    expert_state *best = NULL;
    for (size_t i = 0; i < (size_t)c->n_layer * (size_t)c->n_expert; i++) {
        expert_state *s = &c->state[i];
        if (!s->held || s->call == c->calls) continue;
        bool better = !best || s->last_use < best->last_use;
        if (best && c->evict == EVICT_LFU && s->uses != best->uses) better = s->uses < best->uses;
        if (better) best = s;
    }
    return best;
}

/* Makes room for `bytes` within the budget, as far as experts the call did not choose allow:
 * a batch whose tokens choose more experts at a layer than the budget holds keeps them all
 * until its next call. */
static void make_room(cache_router *c, uint64_t bytes) {
    while (c->budget && c->held_bytes + bytes > c->budget) {
        expert_state *s = victim(c);
        if (!s) return;
        size_t i = (size_t)(s - c->state);
        c->access->evict(c->access->ctx, (int32_t)(i / (size_t)c->n_expert),
                         (int32_t)(i % (size_t)c->n_expert));
        s->held = false;
        c->held_bytes -= s->bytes;
    }
}

/* Where slot `slot` of a token gets expert e's weights from. */
static void serve(cache_router *c, const tsr_route_call *call, int64_t slot, int32_t e, float w) {
    expert_state *s = state_of(c, call->layer, e);
    if (s->bytes == 0) return;
    const tsr_expert_access *a = c->access;
    if (s->held) {
        c->count.hits++;
        /* pages it shared with an expert let go since went with it: read them back */
        c->count.bytes_read += a->load(a->ctx, call->layer, e);
    } else if (c->lowbit_threshold > 0 && w < c->lowbit_threshold) {
        c->count.lowbit++;
        const tsr_tensor *copy = &c->lowbit[((size_t)call->layer * (size_t)c->n_expert + (size_t)e) * 3];
        for (int m = 0; m < 3; m++) call->substitute[slot * 3 + m] = &copy[m];
        return;
    } else {
        c->count.misses++;
        make_room(c, s->bytes);
        c->count.bytes_read += a->load(a->ctx, call->layer, e);
        s->held = true;
        c->held_bytes += s->bytes;
    }
    s->last_use = ++c->use_clock;
    s->uses++;
}

static tsr_status cache_route(void *self, const tsr_route_call *call) {
    cache_router *c = self;
    const int32_t n = c->n_expert, k = call->k;
    const int64_t slots = call->n_tok * k;
    if (call->layer <= c->last_layer) c->count.tokens += (uint64_t)call->n_tok;
    c->last_layer = call->layer;
    for (int64_t t = 0; t < call->n_tok; t++) {
        tsr_topk_rank(&c->rule, call->gate_logits + t * n);
        tsr_topk_choose(&c->rule, k, k, call->experts + t * k, call->weights + t * k);
    }
    if (!c->access) return TSR_OK;
    /* the call's experts stay until the host has multiplied them */
    c->calls++;
    for (int64_t i = 0; i < slots; i++)
        if (call->experts[i] >= 0) state_of(c, call->layer, call->experts[i])->call = c->calls;
    make_room(c, 0); /* what the last batch held beyond the budget */
    for (int64_t i = 0; i < slots; i++)
        if (call->experts[i] >= 0) serve(c, call, i, call->experts[i], call->weights[i]);
    return TSR_OK;
}

/* ---- commands ------------------------------------------------------------------------------ */

/* Command stats "v(I)": the counters' line at INFO. */
static void cache_stats(void *instance) { log_counts(instance); }

/* Command dump_stats "i(Is)": the counters as "name value" lines. */
static int32_t cache_dump_stats(void *instance, const char *path) {
    const cache_router *c = instance;
    FILE *f = fopen(path, "w");
    if (!f) {
        c->host->set_error(c->host->ctx, "dump_stats: %s: cannot open for writing", path);
        return TSR_E_IO;
    }
    const counters *n = &c->count;
    fprintf(f, "tokens %llu\nhits %llu\nmisses %llu\nlowbit %llu\nbytes_read %llu\n"
               "held_bytes %llu\nbudget %llu\n",
            (unsigned long long)n->tokens, (unsigned long long)n->hits,
            (unsigned long long)n->misses, (unsigned long long)n->lowbit,
            (unsigned long long)n->bytes_read, (unsigned long long)c->held_bytes,
            (unsigned long long)c->budget);
    if (fclose(f) != 0) {
        c->host->set_error(c->host->ctx, "dump_stats: %s: write failed", path);
        return TSR_E_IO;
    }
    return TSR_OK;
}

static const tsr_command cache_commands[] = {
    {TSR_SIZED(tsr_command), .name = "stats", .signature = "v(I)",
     .fn = (void (*)(void))cache_stats,
     .doc = "stats(): logs hits, misses, low-bit uses and bytes read, in all and per token"},
    {TSR_SIZED(tsr_command), .name = "dump_stats", .signature = "i(Is)",
     .fn = (void (*)(void))cache_dump_stats, .returns_status = 1,
     .doc = "dump_stats(path): writes tokens, hits, misses, lowbit, bytes_read, held_bytes and "
            "budget as 'name value' lines to path"},
};

static const tsr_param_def cache_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "budget_mib", .type = TSR_PARAM_FLOAT,
     .default_value = "0", .min = 0, .max = 1e9, .unit = "MiB",
     .doc = "memory for the experts kept in memory; 0: no limit, every expert may stay"},
    {TSR_SIZED(tsr_param_def), .name = "evict", .type = TSR_PARAM_ENUM, .default_value = "lru",
     .choices = evict_rules, .doc = "which held expert goes first: least recently or least "
                                    "frequently used"},
    {TSR_SIZED(tsr_param_def), .name = "lowbit_threshold", .type = TSR_PARAM_FLOAT,
     .default_value = "0", .min = 0, .max = 1,
     .doc = "a missed expert whose routing weight is below this is served from its low-bit "
            "copy; 0: never (lossless)"},
    {TSR_SIZED(tsr_param_def), .name = "lowbit_type", .type = TSR_PARAM_ENUM,
     .default_value = "q4_0", .choices = lowbit_names,
     .doc = "the type of the low-bit copies, made at create when lowbit_threshold > 0"},
};

static const tsr_router_vtable cache_vtable = {
    TSR_SIZED(tsr_router_vtable),
    .create = cache_create,
    .destroy = cache_destroy,
    .route = cache_route,
};

static const tsr_plugin_desc cache_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_ROUTER, ROUTER),
    .name = "cache",
    .version = "1.0",
    .description = "HOBBIT-style expert offloading: the model's routing, a memory budget of "
                   "experts (LRU or LFU), low-bit copies for missed experts of low weight",
    TSR_PARAMS(cache_params),
    TSR_COMMANDS(cache_commands),
    .vtable = &cache_vtable,
};

TSR_PLUGIN_EXPORT(&cache_desc)
