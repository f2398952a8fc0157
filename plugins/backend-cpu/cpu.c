/*
 * backend 'cpu': tensors in host memory, ops on the host's thread pool, the arithmetic of the
 * shared kernels (<tessera/kernels_cpu.h>: scalar, AVX2 or AVX-512, chosen once from cpuid).
 *
 * Products. Weights are multiplied in place, in their own format -- every type the kernels
 * multiply (tsr_matmul_act_type: F32, F16, BF16, Q8_0 at least): the activations are
 * converted once per call to the weights' activation type (F16, BF16, Q8_0 blocks, as
 * llama.cpp does), into a scratch buffer the instance keeps and grows, then the output rows
 * are split over the pool. Every op splits rows or elements, never a sum, so each
 * value is computed by exactly one thread in a fixed order: results are bit-identical for
 * every pool size.
 *
 * Mixture-of-experts layers (backend 1.1): copy_rows gathers and scatters rows
 * (tsr_copy_rows), weighted_sum mixes each token's expert rows in slot order
 * (tsr_weighted_sum, llama.cpp's order and roundings).
 */
#include <stdatomic.h>

#include <tessera/kernels_cpu.h>
#include <tessera/sdk.h>

/* Below this many elements an op runs on the calling thread: waking the pool would cost more
 * than the op. The split never changes a value, so this is a speed choice only. */
#define CPU_SERIAL_BELOW 16384

typedef struct cpu_backend {
    const tsr_host *host;
    void *scratch; /* prepared activations of the current matmul */
    size_t scratch_bytes;
} cpu_backend;

static void cpu_run(const cpu_backend *b, tsr_task_fn fn, void *arg, int64_t work) {
    if (work < CPU_SERIAL_BELOW) fn(arg, 0, 1);
    else b->host->parallel_for(b->host->ctx, fn, arg);
}

/* ---- lifecycle -------------------------------------------------------------------------- */

static tsr_status cpu_create(const tsr_host *host, const tsr_params *params,
                             const tsr_backend_init *init, void **out) {
    (void)params;
    (void)init;
    cpu_backend *b = tsr_calloc(host, 1, sizeof *b);
    if (!b) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    b->host = host;
    host->log(host->ctx, TSR_LOG_INFO, "kernels: %s, %d threads",
              tsr_cpu_level_name(tsr_cpu_level_get()), (int)host->n_threads(host->ctx));
    *out = b;
    return TSR_OK;
}

static void cpu_destroy(void *self) {
    cpu_backend *b = self;
    if (!b) return;
    if (b->scratch) b->host->free(b->host->ctx, b->scratch);
    b->host->free(b->host->ctx, b);
}

static int32_t cpu_supports(void *self, int32_t dtype) {
    (void)self;
    return tsr_matmul_act_type(dtype) >= 0;
}

/* ---- weights ---------------------------------------------------------------------------- */

/* Checks that `w` holds rows of ne[0] elements of a type the kernels read, `row_bytes` apart
 * with no padding when `packed`. */
static tsr_status cpu_check_weight(const cpu_backend *b, const char *op, const tsr_tensor *w,
                                   int packed) {
    const char *name = w->name ? w->name : "weight";
    if (tsr_matmul_act_type(w->dtype) < 0) {
        b->host->set_error(b->host->ctx, "%s: %s: the CPU kernels have no product for type %d",
                           op, name, (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    size_t need = tsr_row_size(w->dtype, w->ne[0]);
    if (w->ne[0] <= 0 || need == 0) {
        b->host->set_error(b->host->ctx, "%s: %s: a row of %lld elements is not a whole number "
                           "of blocks of type %d", op, name, (long long)w->ne[0],
                           (int)w->dtype);
        return TSR_E_INVALID;
    }
    if (packed ? w->row_bytes != need : w->row_bytes < need) {
        b->host->set_error(b->host->ctx, "%s: %s: row_bytes %zu, expected %s%zu for %lld "
                           "elements of type %d", op, name, w->row_bytes,
                           packed ? "" : "at least ", need, (long long)w->ne[0], (int)w->dtype);
        return TSR_E_INVALID;
    }
    return TSR_OK;
}

static void *cpu_scratch(cpu_backend *b, size_t bytes) {
    if (bytes <= b->scratch_bytes) return b->scratch;
    void *p = b->host->alloc(b->host->ctx, bytes, 64);
    if (!p) return NULL;
    if (b->scratch) b->host->free(b->host->ctx, b->scratch);
    b->scratch = p;
    b->scratch_bytes = bytes;
    return p;
}

typedef struct mm_job {
    float *y;           /* (n_tok, n_out) */
    const void *w;      /* (n_out, row bytes) */
    int32_t wtype, act_type;
    void *buf;          /* (n_tok, prepared row bytes): the scratch, when x is converted */
    const void *xp;     /* the prepared rows: buf, or x itself for F32 weights */
    const float *x;     /* (n_tok, n_in) */
    int64_t n_tok, n_in, n_out;
    atomic_int failed;  /* a kernel refused (a broken invariant: arguments were checked) */
} mm_job;

static void mm_prepare_task(void *arg, int ith, int nth) {
    mm_job *j = arg;
    if (tsr_matmul_prepare(j->buf, j->act_type, j->x, j->n_tok, j->n_in, ith, nth) < 0)
        atomic_store(&j->failed, 1);
}

static void mm_task(void *arg, int ith, int nth) {
    mm_job *j = arg;
    if (tsr_matmul(j->y, j->n_out, j->w, j->wtype, j->xp, j->n_tok, j->n_in, j->n_out, ith,
                   nth) < 0)
        atomic_store(&j->failed, 1);
}

static tsr_status cpu_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                             int64_t n) {
    cpu_backend *b = self;
    tsr_status st = cpu_check_weight(b, "matmul", w, 1);
    if (st < 0) return st;
    if (n <= 0) return TSR_OK;
    mm_job j = {.y = y, .w = w->data, .wtype = w->dtype,
                .act_type = tsr_matmul_act_type(w->dtype), .x = x, .n_tok = n,
                .n_in = w->ne[0], .n_out = w->ne[1]};
    if (j.act_type == TSR_DTYPE_F32) {
        j.xp = x; /* F32 activations need no conversion */
    } else {
        size_t row = tsr_row_size(j.act_type, j.n_in);
        if ((size_t)n > SIZE_MAX / row || !(j.buf = cpu_scratch(b, (size_t)n * row))) {
            b->host->set_error(b->host->ctx, "matmul: out of memory for %lld prepared rows",
                               (long long)n);
            return TSR_E_NOMEM;
        }
        cpu_run(b, mm_prepare_task, &j, n > 1 ? n * j.n_in : 0);
        j.xp = j.buf;
    }
    cpu_run(b, mm_task, &j, j.n_out * j.n_in * n);
    if (atomic_load(&j.failed)) {
        b->host->set_error(b->host->ctx, "matmul: %s: the kernels refused type %d (%lld x %lld)",
                           w->name ? w->name : "weight", (int)w->dtype, (long long)j.n_out,
                           (long long)j.n_in);
        return TSR_E_INTERNAL;
    }
    return TSR_OK;
}

typedef struct rows_job {
    float *y;             /* (n, dim) */
    const tsr_tensor *w;
    const int32_t *ids;   /* (n) */
    int64_t n;
    atomic_int failed;    /* the kernels cannot convert rows of this type */
} rows_job;

static void rows_task(void *arg, int ith, int nth) {
    rows_job *j = arg;
    int64_t i0, i1, dim = j->w->ne[0];
    tsr_thread_slice(&i0, &i1, j->n, 1, ith, nth);
    for (int64_t i = i0; i < i1; i++)
        if (tsr_row_to_f32(j->y + i * dim, j->w->dtype,
                           (const char *)j->w->data + (size_t)j->ids[i] * j->w->row_bytes,
                           dim) < 0)
            atomic_store(&j->failed, 1);
}

static tsr_status cpu_get_rows(void *self, float *y, const tsr_tensor *w, const int32_t *ids,
                               int64_t n) {
    cpu_backend *b = self;
    tsr_status st = cpu_check_weight(b, "get_rows", w, 0);
    if (st < 0) return st;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= w->ne[1]) {
            b->host->set_error(b->host->ctx, "get_rows: %s: id %d at index %lld is outside "
                               "[0, %lld)", w->name ? w->name : "table", (int)ids[i],
                               (long long)i, (long long)w->ne[1]);
            return TSR_E_RANGE;
        }
    }
    rows_job j = {.y = y, .w = w, .ids = ids, .n = n};
    cpu_run(b, rows_task, &j, n * w->ne[0]);
    if (atomic_load(&j.failed)) {
        b->host->set_error(b->host->ctx, "get_rows: %s: the CPU kernels cannot convert rows of "
                           "type %d to f32", w->name ? w->name : "table", (int)w->dtype);
        return TSR_E_UNSUPPORTED;
    }
    return TSR_OK;
}

/* ---- activations ------------------------------------------------------------------------ */

/* One job type for the row and elementwise ops. */
typedef struct op_job {
    float *y;
    const float *a, *b;   /* inputs; b: the second operand, or the norm weight */
    const int32_t *pos;
    int64_t n, dim, b_rows;
    int64_t n_head, head_dim, n_rot;
    int32_t mode;
    float f, base, freq_scale; /* eps or scale; rope's frequencies */
} op_job;

static tsr_status cpu_bad_shape(const cpu_backend *b, const char *op, int64_t n, int64_t dim) {
    b->host->set_error(b->host->ctx, "%s: negative shape (%lld rows of %lld)", op, (long long)n,
                       (long long)dim);
    return TSR_E_INVALID;
}

static void rms_norm_task(void *arg, int ith, int nth) {
    op_job *j = arg;
    tsr_rms_norm(j->y, j->a, j->b, j->n, j->dim, j->f, ith, nth);
}

static tsr_status cpu_rms_norm(void *self, float *y, const float *x, const float *weight,
                               int64_t n, int64_t dim, float eps) {
    cpu_backend *b = self;
    if (n < 0 || dim < 0) return cpu_bad_shape(b, "rms_norm", n, dim);
    op_job j = {.y = y, .a = x, .b = weight, .n = n, .dim = dim, .f = eps};
    cpu_run(b, rms_norm_task, &j, n * dim);
    return TSR_OK;
}

static void rope_task(void *arg, int ith, int nth) {
    op_job *j = arg;
    tsr_rope(j->y, j->pos, j->n, j->n_head, j->head_dim, j->n_rot, (tsr_cpu_rope_mode)j->mode,
             j->base, j->freq_scale, ith, nth);
}

static tsr_status cpu_rope(void *self, float *x, const int32_t *pos, int64_t n, int32_t n_head,
                           int32_t head_dim, const tsr_rope_params *rope) {
    cpu_backend *b = self;
    if (!rope || rope->struct_size < offsetof(tsr_rope_params, freq_scale) + sizeof(float)) {
        b->host->set_error(b->host->ctx, "rope: parameters missing or too short (struct_size "
                           "%u)", rope ? (unsigned)rope->struct_size : 0u);
        return TSR_E_INVALID;
    }
    if (rope->mode != TSR_ROPE_NORMAL && rope->mode != TSR_ROPE_NEOX) {
        b->host->set_error(b->host->ctx, "rope: mode %d is neither NORMAL (0) nor NEOX (2)",
                           (int)rope->mode);
        return TSR_E_UNSUPPORTED;
    }
    if (n < 0 || n_head < 0 || head_dim < 0 || rope->n_rot < 0 || rope->n_rot % 2 ||
        rope->n_rot > head_dim) {
        b->host->set_error(b->host->ctx, "rope: n_rot %d must be even and at most head_dim %d "
                           "(n %lld, n_head %d)", (int)rope->n_rot, (int)head_dim, (long long)n,
                           (int)n_head);
        return TSR_E_INVALID;
    }
    op_job j = {.y = x, .pos = pos, .n = n, .n_head = n_head, .head_dim = head_dim,
                .n_rot = rope->n_rot, .mode = rope->mode == TSR_ROPE_NEOX ? TSR_ROPE_MODE_NEOX
                                                                          : TSR_ROPE_MODE_NORMAL,
                .base = rope->freq_base, .freq_scale = rope->freq_scale};
    cpu_run(b, rope_task, &j, n * n_head * rope->n_rot);
    return TSR_OK;
}

/* Elementwise ops split the n * dim values in cache-line multiples. */
static void elem_slice(const op_job *j, int64_t *i0, int64_t *i1, int ith, int nth) {
    tsr_thread_slice(i0, i1, j->n * j->dim, 16, ith, nth);
}

static void swiglu_task(void *arg, int ith, int nth) {
    op_job *j = arg;
    int64_t i0, i1;
    elem_slice(j, &i0, &i1, ith, nth);
    tsr_swiglu(j->y + i0, j->a + i0, j->b + i0, i1 - i0);
}

static tsr_status cpu_swiglu(void *self, float *y, const float *gate, const float *up,
                             int64_t n, int64_t dim) {
    cpu_backend *b = self;
    if (n < 0 || dim < 0) return cpu_bad_shape(b, "swiglu", n, dim);
    op_job j = {.y = y, .a = gate, .b = up, .n = n, .dim = dim};
    cpu_run(b, swiglu_task, &j, n * dim);
    return TSR_OK;
}

static void add_task(void *arg, int ith, int nth) {
    op_job *j = arg;
    if (j->b_rows == 1) {
        int64_t r0, r1;
        tsr_thread_slice(&r0, &r1, j->n, 1, ith, nth);
        for (int64_t r = r0; r < r1; r++)
            tsr_add(j->y + r * j->dim, j->a + r * j->dim, j->b, j->dim);
        return;
    }
    int64_t i0, i1;
    elem_slice(j, &i0, &i1, ith, nth);
    tsr_add(j->y + i0, j->a + i0, j->b + i0, i1 - i0);
}

static tsr_status cpu_add(void *self, float *y, const float *a, const float *bv, int64_t n,
                          int64_t dim, int64_t b_rows) {
    cpu_backend *b = self;
    if (n < 0 || dim < 0) return cpu_bad_shape(b, "add", n, dim);
    if (b_rows != 1 && b_rows != n) {
        b->host->set_error(b->host->ctx, "add: b has %lld rows; expected 1 (broadcast) or %lld",
                           (long long)b_rows, (long long)n);
        return TSR_E_INVALID;
    }
    op_job j = {.y = y, .a = a, .b = bv, .n = n, .dim = dim, .b_rows = b_rows};
    cpu_run(b, add_task, &j, n * dim);
    return TSR_OK;
}

/* ---- rows (mixture-of-experts layers) ---------------------------------------------------- */

typedef struct rows_op_job {
    float *y;
    const float *x, *w;
    const int32_t *y_ids, *x_ids;
    int64_t n, k, dim;
} rows_op_job;

static void copy_rows_task(void *arg, int ith, int nth) {
    rows_op_job *j = arg;
    tsr_copy_rows(j->y, j->y_ids, j->x, j->x_ids, j->n, j->dim, ith, nth);
}

/* An index list with a negative entry would address memory before the buffer. */
static tsr_status cpu_check_ids(const cpu_backend *b, const char *which, const int32_t *ids,
                                int64_t n) {
    for (int64_t i = 0; ids && i < n; i++)
        if (ids[i] < 0) {
            b->host->set_error(b->host->ctx, "copy_rows: %s[%lld] is %d; row indices are not "
                               "negative", which, (long long)i, (int)ids[i]);
            return TSR_E_RANGE;
        }
    return TSR_OK;
}

static tsr_status cpu_copy_rows(void *self, float *y, const int32_t *y_ids, const float *x,
                                const int32_t *x_ids, int64_t n, int64_t dim) {
    cpu_backend *b = self;
    if (n < 0 || dim < 0) return cpu_bad_shape(b, "copy_rows", n, dim);
    tsr_status st = cpu_check_ids(b, "y_ids", y_ids, n);
    if (st >= 0) st = cpu_check_ids(b, "x_ids", x_ids, n);
    if (st < 0) return st;
    rows_op_job j = {.y = y, .x = x, .y_ids = y_ids, .x_ids = x_ids, .n = n, .dim = dim};
    cpu_run(b, copy_rows_task, &j, n * dim);
    return TSR_OK;
}

static void weighted_sum_task(void *arg, int ith, int nth) {
    rows_op_job *j = arg;
    tsr_weighted_sum(j->y, j->x, j->w, j->n, j->k, j->dim, ith, nth);
}

static tsr_status cpu_weighted_sum(void *self, float *y, const float *x, const float *w,
                                   int64_t n, int64_t k, int64_t dim) {
    cpu_backend *b = self;
    if (n < 0 || dim < 0 || k < 0) {
        b->host->set_error(b->host->ctx, "weighted_sum: negative shape (%lld rows of %lld "
                           "slots of %lld)", (long long)n, (long long)k, (long long)dim);
        return TSR_E_INVALID;
    }
    rows_op_job j = {.y = y, .x = x, .w = w, .n = n, .k = k, .dim = dim};
    cpu_run(b, weighted_sum_task, &j, n * k * dim);
    return TSR_OK;
}

/* ---- descriptor ------------------------------------------------------------------------- */

static const char *cpu_isa(void) {
    return tsr_cpu_level_name(tsr_cpu_level_get());
}

static const tsr_param_def cpu_params[] = {
    {TSR_SIZED(tsr_param_def), .name = "threads", .type = TSR_PARAM_INT, .default_value = "2",
     .min = 1, .max = 256, .unit = "threads", .role = TSR_PARAM_ROLE_THREADS,
     .doc = "threads of the host pool (the host sizes its pool from this parameter; -t sets it)"},
};

static const tsr_command cpu_commands[] = {
    {TSR_SIZED(tsr_command), .name = "isa", .signature = "s()", .fn = (void (*)(void))cpu_isa,
     .doc = "the kernels' instruction set in use: scalar, avx2 or avx512"},
};

static const tsr_backend_vtable cpu_vtable = {
    TSR_SIZED(tsr_backend_vtable),
    .create = cpu_create,
    .destroy = cpu_destroy,
    .supports = cpu_supports,
    .matmul = cpu_matmul,
    .get_rows = cpu_get_rows,
    .rms_norm = cpu_rms_norm,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .copy_rows = cpu_copy_rows,
    .weighted_sum = cpu_weighted_sum,
};

static const tsr_plugin_desc cpu_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_BACKEND, BACKEND),
    .name = "cpu",
    .version = "1.1",
    .description = "host memory and thread pool; weights multiplied in place (F32, F16, BF16, "
                   "Q8_0...), scalar/AVX2/AVX-512 kernels chosen at run time (command isa)",
    TSR_PARAMS(cpu_params),
    TSR_COMMANDS(cpu_commands),
    .vtable = &cpu_vtable,
};

#ifndef TSR_CPU_NO_EXPORT /* arena.c builds on this file and exports a plugin of its own */
TSR_PLUGIN_EXPORT(&cpu_desc)
#endif
