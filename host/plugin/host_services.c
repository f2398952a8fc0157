#include "plugin/host_services.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


#include "base/clock.h"
#include "base/version.h"

static atomic_int log_level = TSR_LOG_WARN;
static tsr_progress_fn progress_fn;
static void *progress_ctx;

void tsr_progress_set(tsr_progress_fn fn, void *ctx) {
    progress_fn = fn;
    progress_ctx = ctx;
}

void tsr_progress_report(const char *what, int64_t done, int64_t total) {
    if (progress_fn) progress_fn(progress_ctx, what, done, total);
}

void tsr_log_set_level(int32_t level) { atomic_store(&log_level, level); }
int32_t tsr_log_get_level(void) { return atomic_load(&log_level); }

static const char *level_name(int32_t level) {
    switch (level) {
    case TSR_LOG_ERROR: return "error";
    case TSR_LOG_WARN: return "warning";
    case TSR_LOG_INFO: return "info";
    default: return "debug";
    }
}

static void vlog(int32_t level, const char *who, const char *fmt, va_list ap) {
    if (level > tsr_log_get_level()) return;
    /* One fprintf per line so lines from several threads do not interleave. */
    char line[2048];
    int n = snprintf(line, sizeof line, "tessera: %s: %s: ", who, level_name(level));
    if (n < 0) return;
    if ((size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    fprintf(stderr, "%s\n", line);
}

void tsr_log(int32_t level, const char *who, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog(level, who, fmt, ap);
    va_end(ap);
}

static void svc_log(void *ctx, int32_t level, const char *fmt, ...) {
    tsr_services *s = ctx;
    va_list ap;
    va_start(ap, fmt);
    vlog(level, s->name, fmt, ap);
    va_end(ap);
}

static void svc_set_error(void *ctx, const char *fmt, ...) {
    tsr_services *s = ctx;
    char text[sizeof s->error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    while (atomic_flag_test_and_set_explicit(&s->error_lock, memory_order_acquire)) {
    }
    memcpy(s->error, text, sizeof text);
    s->has_error = true;
    atomic_flag_clear_explicit(&s->error_lock, memory_order_release);
}

/* Each block carries a header just below the aligned pointer: where the raw allocation
 * starts and how big the user part is, so free() can account and release it. */
typedef struct alloc_header {
    void *raw;
    size_t size;
} alloc_header;

static void *svc_alloc(void *ctx, size_t size, size_t align) {
    tsr_services *s = ctx;
    if (align == 0) align = 64;
    if (align & (align - 1)) return NULL;
    if (align < sizeof(alloc_header)) align = sizeof(alloc_header);
    if (size > SIZE_MAX - align - sizeof(alloc_header)) return NULL;
    char *raw = malloc(size + align + sizeof(alloc_header));
    if (!raw) return NULL;
    uintptr_t user = ((uintptr_t)raw + sizeof(alloc_header) + align - 1) & ~(uintptr_t)(align - 1);
    alloc_header *h = (alloc_header *)user - 1;
    h->raw = raw;
    h->size = size;
    size_t live = atomic_fetch_add(&s->bytes_live, size) + size;
    atomic_fetch_add(&s->n_allocs_live, 1);
    size_t peak = atomic_load(&s->bytes_peak);
    while (live > peak && !atomic_compare_exchange_weak(&s->bytes_peak, &peak, live)) {
    }
    return (void *)user;
}

static void svc_free(void *ctx, void *ptr) {
    if (!ptr) return;
    tsr_services *s = ctx;
    alloc_header *h = (alloc_header *)ptr - 1;
    atomic_fetch_sub(&s->bytes_live, h->size);
    atomic_fetch_sub(&s->n_allocs_live, 1);
    free(h->raw);
}

static void svc_parallel_for(void *ctx, tsr_task_fn fn, void *arg) {
    tsr_services *s = ctx;
    tsr_pool_run(s->pool, fn, arg);
}

static int32_t svc_n_threads(void *ctx) {
    tsr_services *s = ctx;
    return tsr_pool_size(s->pool);
}

static uint64_t svc_now_ns(void *ctx) {
    (void)ctx;
    return tsr_clock_ns();
}

void tsr_services_init(tsr_services *s, const char *name, tsr_pool *pool) {
    memset(s, 0, sizeof *s);
    atomic_flag_clear(&s->error_lock);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->pool = pool;
    s->table = (tsr_host){
        .struct_size = sizeof(tsr_host),
        .common_major = TSR_COMMON_ABI_MAJOR,
        .common_minor = TSR_COMMON_ABI_MINOR,
        .host_version = TESSERA_VERSION,
        .ctx = s,
        .log = svc_log,
        .set_error = svc_set_error,
        .alloc = svc_alloc,
        .free = svc_free,
        .parallel_for = svc_parallel_for,
        .n_threads = svc_n_threads,
        .now_ns = svc_now_ns,
    };
}

const char *tsr_services_take_error(tsr_services *s, const char *fallback) {
    if (!s->has_error) return fallback;
    s->has_error = false;
    return s->error;
}
