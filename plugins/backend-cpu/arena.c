/*
 * backend 'cpu-arena': the 'cpu' backend with memory of its own, for testing hosts and plugins
 * without a GPU. Its buffers (buffer_alloc) are host memory the CPU reads, but they are the
 * backend's: every op checks that each pointer it is handed (activations, weights, norm
 * weights, biases, token ids, positions, row indices and mixing weights) lies inside a buffer
 * it allocated, and refuses the call otherwise, as a device backend would fault. A host that
 * runs a model on it keeps device memory apart: it uploads weights and per-call arrays and
 * downloads what it reads. The arithmetic is the 'cpu' backend's, so results are
 * bit-identical to it.
 */
#include <stdbool.h>

#define TSR_CPU_NO_EXPORT
#include "cpu.c"

typedef struct arena_buffer {
    char *p;
    size_t bytes;
} arena_buffer;

typedef struct arena_backend {
    const tsr_host *host;
    cpu_backend *cpu;
    arena_buffer *buffers; /* live allocations, in no order */
    size_t n_buffers, cap_buffers;
} arena_backend;

static tsr_status arena_create(const tsr_host *host, const tsr_params *params,
                               const tsr_backend_init *init, void **out) {
    arena_backend *a = tsr_calloc(host, 1, sizeof *a);
    if (!a) {
        host->set_error(host->ctx, "out of memory");
        return TSR_E_NOMEM;
    }
    a->host = host;
    void *cpu;
    tsr_status st = cpu_create(host, params, init, &cpu);
    if (st < 0) {
        host->free(host->ctx, a);
        return st;
    }
    a->cpu = cpu;
    *out = a;
    return TSR_OK;
}

static void arena_destroy(void *self) {
    arena_backend *a = self;
    if (!a) return;
    for (size_t i = 0; i < a->n_buffers; i++) a->host->free(a->host->ctx, a->buffers[i].p);
    a->host->free(a->host->ctx, a->buffers);
    cpu_destroy(a->cpu);
    a->host->free(a->host->ctx, a);
}

static tsr_status arena_buffer_alloc(void *self, size_t bytes, void **out) {
    arena_backend *a = self;
    if (a->n_buffers == a->cap_buffers) {
        size_t cap = a->cap_buffers ? 2 * a->cap_buffers : 64;
        arena_buffer *grown = tsr_calloc(a->host, cap, sizeof *grown);
        if (!grown) {
            a->host->set_error(a->host->ctx, "out of memory");
            return TSR_E_NOMEM;
        }
        if (a->n_buffers) memcpy(grown, a->buffers, a->n_buffers * sizeof *grown);
        a->host->free(a->host->ctx, a->buffers);
        a->buffers = grown;
        a->cap_buffers = cap;
    }
    char *p = a->host->alloc(a->host->ctx, bytes ? bytes : 1, 64);
    if (!p) {
        a->host->set_error(a->host->ctx, "out of memory for a buffer of %zu bytes", bytes);
        return TSR_E_NOMEM;
    }
    a->buffers[a->n_buffers++] = (arena_buffer){p, bytes};
    *out = p;
    return TSR_OK;
}

static void arena_buffer_free(void *self, void *buf) {
    arena_backend *a = self;
    for (size_t i = 0; buf && i < a->n_buffers; i++)
        if (a->buffers[i].p == buf) {
            a->host->free(a->host->ctx, buf);
            a->buffers[i] = a->buffers[--a->n_buffers];
            return;
        }
}

/* Whether [p, p + bytes) lies inside one of the backend's buffers; when not, leaves a message
 * naming the op and the operand. */
static bool arena_holds(const arena_backend *a, const char *op, const char *what, const void *p,
                        size_t bytes) {
    const char *c = p;
    for (size_t i = 0; c && i < a->n_buffers; i++) {
        const arena_buffer *b = &a->buffers[i];
        if (c >= b->p && c <= b->p + b->bytes && bytes <= (size_t)(b->p + b->bytes - c))
            return true;
    }
    a->host->set_error(a->host->ctx, "%s: %s (%p, %zu bytes) is not in the backend's memory: "
                       "the host must place it there with upload", op, what, p, bytes);
    return false;
}

/* Bytes of n rows of dim 4-byte values (f32 activations, int32 ids and positions). */
static size_t words(int64_t n, int64_t dim) {
    return n > 0 && dim > 0 ? (size_t)n * (size_t)dim * 4 : 0;
}

static size_t tensor_bytes(const tsr_tensor *w) { return w->row_bytes * (size_t)w->ne[1]; }

static tsr_status arena_upload(void *self, void *dst, const void *src, size_t bytes) {
    arena_backend *a = self;
    if (!arena_holds(a, "upload", "the destination", dst, bytes)) return TSR_E_INVALID;
    if (bytes) memcpy(dst, src, bytes);
    return TSR_OK;
}

static tsr_status arena_download(void *self, void *dst, const void *src, size_t bytes) {
    arena_backend *a = self;
    if (!arena_holds(a, "download", "the source", src, bytes)) return TSR_E_INVALID;
    if (bytes) memcpy(dst, src, bytes);
    return TSR_OK;
}

static int32_t arena_supports(void *self, int32_t dtype) {
    arena_backend *a = self;
    return cpu_supports(a->cpu, dtype);
}

static tsr_status arena_matmul(void *self, float *y, const tsr_tensor *w, const float *x,
                               int64_t n) {
    arena_backend *a = self;
    if (!arena_holds(a, "matmul", "y", y, words(n, w->ne[1])) ||
        !arena_holds(a, "matmul", "x", x, words(n, w->ne[0])) ||
        !arena_holds(a, "matmul", w->name ? w->name : "the weight", w->data, tensor_bytes(w)))
        return TSR_E_INVALID;
    return cpu_matmul(a->cpu, y, w, x, n);
}

static tsr_status arena_get_rows(void *self, float *y, const tsr_tensor *w, const int32_t *ids,
                                 int64_t n) {
    arena_backend *a = self;
    if (!arena_holds(a, "get_rows", "y", y, words(n, w->ne[0])) ||
        !arena_holds(a, "get_rows", "ids", ids, words(n, 1)) ||
        !arena_holds(a, "get_rows", w->name ? w->name : "the table", w->data, tensor_bytes(w)))
        return TSR_E_INVALID;
    return cpu_get_rows(a->cpu, y, w, ids, n);
}

static tsr_status arena_rms_norm(void *self, float *y, const float *x, const float *weight,
                                 int64_t n, int64_t dim, float eps) {
    arena_backend *a = self;
    if (!arena_holds(a, "rms_norm", "y", y, words(n, dim)) ||
        !arena_holds(a, "rms_norm", "x", x, words(n, dim)) ||
        !arena_holds(a, "rms_norm", "the norm weight", weight, words(1, dim)))
        return TSR_E_INVALID;
    return cpu_rms_norm(a->cpu, y, x, weight, n, dim, eps);
}

static tsr_status arena_rope(void *self, float *x, const int32_t *pos, int64_t n,
                             int32_t n_head, int32_t head_dim, const tsr_rope_params *rope) {
    arena_backend *a = self;
    if (!arena_holds(a, "rope", "x", x, words(n, (int64_t)n_head * head_dim)) ||
        !arena_holds(a, "rope", "the positions", pos, words(n, 1)))
        return TSR_E_INVALID;
    return cpu_rope(a->cpu, x, pos, n, n_head, head_dim, rope);
}

static tsr_status arena_swiglu(void *self, float *y, const float *gate, const float *up,
                               int64_t n, int64_t dim) {
    arena_backend *a = self;
    if (!arena_holds(a, "swiglu", "y", y, words(n, dim)) ||
        !arena_holds(a, "swiglu", "gate", gate, words(n, dim)) ||
        !arena_holds(a, "swiglu", "up", up, words(n, dim)))
        return TSR_E_INVALID;
    return cpu_swiglu(a->cpu, y, gate, up, n, dim);
}

static tsr_status arena_add(void *self, float *y, const float *x, const float *b, int64_t n,
                            int64_t dim, int64_t b_rows) {
    arena_backend *a = self;
    if (!arena_holds(a, "add", "y", y, words(n, dim)) ||
        !arena_holds(a, "add", "a", x, words(n, dim)) ||
        !arena_holds(a, "add", "b", b, words(b_rows, dim)))
        return TSR_E_INVALID;
    return cpu_add(a->cpu, y, x, b, n, dim, b_rows);
}

/* Rows up to the largest index of `ids` (n of them, in the backend's memory: checked first),
 * or n rows when ids is NULL. */
static int64_t rows_addressed(const int32_t *ids, int64_t n) {
    int64_t rows = ids ? 0 : n;
    for (int64_t i = 0; ids && i < n; i++)
        if (ids[i] + (int64_t)1 > rows) rows = ids[i] + (int64_t)1;
    return rows;
}

static tsr_status arena_copy_rows(void *self, float *y, const int32_t *y_ids, const float *x,
                                  const int32_t *x_ids, int64_t n, int64_t dim) {
    arena_backend *a = self;
    if ((y_ids && !arena_holds(a, "copy_rows", "y_ids", y_ids, words(n, 1))) ||
        (x_ids && !arena_holds(a, "copy_rows", "x_ids", x_ids, words(n, 1))) ||
        !arena_holds(a, "copy_rows", "y", y, words(rows_addressed(y_ids, n), dim)) ||
        !arena_holds(a, "copy_rows", "x", x, words(rows_addressed(x_ids, n), dim)))
        return TSR_E_INVALID;
    return cpu_copy_rows(a->cpu, y, y_ids, x, x_ids, n, dim);
}

static tsr_status arena_weighted_sum(void *self, float *y, const float *x, const float *w,
                                     int64_t n, int64_t k, int64_t dim) {
    arena_backend *a = self;
    if (!arena_holds(a, "weighted_sum", "y", y, words(n, dim)) ||
        !arena_holds(a, "weighted_sum", "x", x, words(n * k, dim)) ||
        !arena_holds(a, "weighted_sum", "w", w, words(n, k)))
        return TSR_E_INVALID;
    return cpu_weighted_sum(a->cpu, y, x, w, n, k, dim);
}

static int32_t arena_memory_space(void *self) {
    (void)self;
    return TSR_MEMORY_HOST;
}

static const tsr_backend_vtable arena_vtable = {
    TSR_SIZED(tsr_backend_vtable),
    .create = arena_create,
    .destroy = arena_destroy,
    .buffer_alloc = arena_buffer_alloc,
    .buffer_free = arena_buffer_free,
    .upload = arena_upload,
    .download = arena_download,
    .supports = arena_supports,
    .matmul = arena_matmul,
    .get_rows = arena_get_rows,
    .rms_norm = arena_rms_norm,
    .rope = arena_rope,
    .swiglu = arena_swiglu,
    .add = arena_add,
    .memory_space = arena_memory_space,
    .copy_rows = arena_copy_rows,
    .weighted_sum = arena_weighted_sum,
};

static const tsr_plugin_desc arena_desc = {
    TSR_PLUGIN_HEADER(TSR_STAGE_BACKEND, BACKEND),
    .name = "cpu-arena",
    .version = "1.1",
    .description = "the cpu backend with buffers of its own, checking that every pointer an op "
                   "receives lies in them (tests that a host keeps device memory apart)",
    TSR_PARAMS(cpu_params),
    TSR_COMMANDS(cpu_commands),
    .vtable = &arena_vtable,
};

TSR_PLUGIN_EXPORT(&arena_desc)
