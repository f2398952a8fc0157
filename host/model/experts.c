#include "model/experts.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct tsr_experts {
    tsr_expert_access access; /* access.ctx is this */
    const tsr_model_weights *weights;
    int32_t n_layer, n_expert;
    const char *map; /* the model file's mapping when the backend reads weights in place */
    size_t map_size, page;
    int fd;          /* the model file, for dropping its pages from the page cache; or -1 */
    bool rest_read;  /* the bytes that are no expert's were read in at the first eviction */

    /* Prefetch: experts waiting to be read, in order, by a thread of the host's own, started
     * with the first request. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    bool thread_started, stop;
    int32_t *queue;  /* (n_layer * n_expert) a ring of layer * n_expert + e */
    size_t head, n_queued;
    bool *queued;    /* (n_layer * n_expert) */
};

/* The bytes of one of an expert's matrices, and whether they lie in the file's mapping. */
typedef struct span {
    const char *p;
    size_t bytes;
    bool mapped;
} span;

static bool valid(const tsr_experts *x, int32_t layer, int32_t e) {
    return layer >= 0 && layer < x->n_layer && e >= 0 && e < x->n_expert;
}

static void spans(const tsr_experts *x, int32_t layer, int32_t e, span out[TSR_EXPERT_MATRICES]) {
    const tsr_weight *w = &x->weights->moe[layer].experts[e * TSR_EXPERT_MATRICES];
    for (int m = 0; m < TSR_EXPERT_MATRICES; m++) {
        const char *p = w[m].t.data;
        size_t bytes = (size_t)tsr_weight_bytes(&w[m]);
        out[m] = (span){p, bytes, x->map && p >= x->map && bytes <= x->map_size &&
                                      (size_t)(p - x->map) <= x->map_size - bytes};
    }
}

/* The pages holding [p, p + bytes), rounded outwards. */
static void page_range(const tsr_experts *x, const span *s, char **start, size_t *len) {
    uintptr_t a = (uintptr_t)s->p & ~(uintptr_t)(x->page - 1);
    uintptr_t b = ((uintptr_t)s->p + s->bytes + x->page - 1) & ~(uintptr_t)(x->page - 1);
    *start = (char *)a;
    *len = (size_t)(b - a);
}

/* Bytes of the span in memory now: those of its pages mincore says are resident. */
static uint64_t span_resident(const tsr_experts *x, const span *s) {
    if (!s->mapped || s->bytes == 0) return s->bytes;
    char *start;
    size_t len;
    page_range(x, s, &start, &len);
    size_t n_pages = len / x->page;
    unsigned char *vec = malloc(n_pages);
    if (!vec || mincore(start, len, vec) != 0) {
        free(vec);
        return s->bytes; /* unknown: say resident, so that nobody waits on it */
    }
    uint64_t in = 0;
    for (size_t i = 0; i < n_pages; i++) {
        if (!(vec[i] & 1)) continue;
        const char *lo = start + i * x->page, *hi = lo + x->page;
        if (lo < s->p) lo = s->p;
        if (hi > s->p + s->bytes) hi = s->p + s->bytes;
        in += (uint64_t)(hi - lo);
    }
    free(vec);
    return in;
}

/* Reads every page of the span, so that a later product finds it in memory. */
static void span_touch(const tsr_experts *x, const span *s) {
    if (!s->mapped) return;
    volatile unsigned char sink = 0;
    for (size_t off = 0; off < s->bytes; off += x->page) sink ^= (unsigned char)s->p[off];
    if (s->bytes) sink ^= (unsigned char)s->p[s->bytes - 1];
    (void)sink;
}

static uint64_t ex_bytes(void *ctx, int32_t layer, int32_t e) {
    const tsr_experts *x = ctx;
    return valid(x, layer, e) ? tsr_moe_expert_bytes(x->weights, layer, e) : 0;
}

static uint64_t ex_resident(void *ctx, int32_t layer, int32_t e) {
    const tsr_experts *x = ctx;
    if (!valid(x, layer, e)) return 0;
    span s[TSR_EXPERT_MATRICES];
    spans(x, layer, e, s);
    return span_resident(x, &s[0]) + span_resident(x, &s[1]) + span_resident(x, &s[2]);
}

/* Reads the span's pages into the page cache through the file, which was opened for random
 * reads: exactly those pages, where a fault on the mapping would read around it (readahead)
 * and bring in neighbouring experts the caller did not ask for. Pages already in memory are
 * read too: reading only the missing ones let a cold file's first forward read experts in
 * (tests/test-router-cache.c), as a page the kernel's readahead marked starts more readahead
 * at its first use through the mapping. */
static void span_read(const tsr_experts *x, const span *s) {
    if (!s->mapped || x->fd < 0 || s->bytes == 0) return;
    char *start;
    size_t len;
    page_range(x, s, &start, &len);
    char buf[64 * 1024];
    off_t off = (off_t)(start - x->map);
    for (size_t done = 0; done < len;) {
        size_t n = len - done < sizeof buf ? len - done : sizeof buf;
        ssize_t got = pread(x->fd, buf, n, off + (off_t)done);
        if (got <= 0) return; /* the mapping's faults read what is left */
        done += (size_t)got;
    }
}

static uint64_t ex_load(void *ctx, int32_t layer, int32_t e) {
    const tsr_experts *x = ctx;
    if (!valid(x, layer, e)) return 0;
    uint64_t missing = ex_bytes(ctx, layer, e) - ex_resident(ctx, layer, e);
    if (missing == 0) return 0; /* in memory: a hit costs a residency check, no copy */
    span s[TSR_EXPERT_MATRICES];
    spans(x, layer, e, s);
    for (int m = 0; m < TSR_EXPERT_MATRICES; m++) {
        span_read(x, &s[m]);
        span_touch(x, &s[m]);
    }
    return missing;
}

/* Lets the pages go, so that the next read goes to the file: what an offloading router
 * measures. Only the pages wholly the expert's: a page it shares with a neighbouring tensor
 * stays, since a later use of that tensor would fault it in and read the pages around it
 * (readahead), other experts among them. The page cache keeps file data in folios of several
 * pages, which a drop of a range (posix_fadvise) leaves whole where they straddle its edges;
 * MADV_PAGEOUT first reclaims the pages this process maps, splitting such folios. Then the
 * mapping lets them go (MADV_DONTNEED) and the page cache what is left unmapped
 * (POSIX_FADV_DONTNEED). */
/* Maps into this process the pages of [start, start + len) that are in memory (a read of each),
 * so that MADV_PAGEOUT, which reaches only mapped pages, splits and reclaims page-cache folios
 * read before this process used them. */
static void map_resident(const tsr_experts *x, char *start, size_t len) {
    size_t n_pages = len / x->page;
    unsigned char *vec = malloc(n_pages);
    if (vec && mincore(start, len, vec) == 0) {
        volatile unsigned char sink = 0;
        for (size_t i = 0; i < n_pages; i++)
            if (vec[i] & 1) sink ^= (unsigned char)start[i * x->page];
        (void)sink;
    }
    free(vec);
}

static int span_order(const void *a, const void *b) {
    const span *l = a, *r = b;
    return (l->p > r->p) - (l->p < r->p);
}

/* Reads in every byte of the mapping that is not an expert's (the dense weights, which every
 * forward reads anyway), exactly, through the random-read descriptor: left to the forward's
 * first faults, such a read would read around it (readahead), into experts let go. */
static void read_the_rest(tsr_experts *x) {
    x->rest_read = true;
    size_t n = 0;
    span *all = malloc((size_t)x->n_layer * (size_t)x->n_expert * TSR_EXPERT_MATRICES * sizeof *all);
    if (!all) return;
    for (int32_t l = 0; l < x->n_layer; l++)
        for (int32_t e = 0; e < x->n_expert; e++) {
            span s[TSR_EXPERT_MATRICES];
            spans(x, l, e, s);
            for (int m = 0; m < TSR_EXPERT_MATRICES; m++)
                if (s[m].mapped && s[m].bytes) all[n++] = s[m];
        }
    qsort(all, n, sizeof *all, span_order);
    const char *at = x->map;
    for (size_t i = 0; i <= n; i++) {
        const char *end = i < n ? all[i].p : x->map + x->map_size;
        if (end > at) span_read(x, &(span){at, (size_t)(end - at), true});
        if (i < n && all[i].p + all[i].bytes > at) at = all[i].p + all[i].bytes;
    }
    free(all);
}

static void ex_evict(void *ctx, int32_t layer, int32_t e) {
    tsr_experts *x = ctx;
    if (!valid(x, layer, e)) return;
    if (!x->rest_read) read_the_rest(x);
    span s[TSR_EXPERT_MATRICES];
    spans(x, layer, e, s);
    for (int m = 0; m < TSR_EXPERT_MATRICES; m++) {
        if (!s[m].mapped || !s[m].bytes) continue;
        uintptr_t lo = ((uintptr_t)s[m].p + x->page - 1) & ~(uintptr_t)(x->page - 1);
        uintptr_t hi = ((uintptr_t)s[m].p + s[m].bytes) & ~(uintptr_t)(x->page - 1);
        if (hi <= lo) continue;
        char *start = (char *)lo;
        size_t len = (size_t)(hi - lo);
#ifdef MADV_PAGEOUT
        map_resident(x, start, len);
        madvise(start, len, MADV_PAGEOUT);
#endif
        madvise(start, len, MADV_DONTNEED);
        if (x->fd >= 0)
            posix_fadvise(x->fd, (off_t)(start - x->map), (off_t)len, POSIX_FADV_DONTNEED);
    }
}

static tsr_status ex_matrices(void *ctx, int32_t layer, int32_t e, tsr_tensor *gate,
                              tsr_tensor *up, tsr_tensor *down) {
    const tsr_experts *x = ctx;
    if (!valid(x, layer, e)) return TSR_E_RANGE;
    const tsr_weight *w = &x->weights->moe[layer].experts[e * TSR_EXPERT_MATRICES];
    *gate = w[TSR_EXPERT_GATE].t;
    *up = w[TSR_EXPERT_UP].t;
    *down = w[TSR_EXPERT_DOWN].t;
    return TSR_OK;
}

/* ---- prefetch ------------------------------------------------------------------------ */

static void *prefetch_thread(void *arg) {
    tsr_experts *x = arg;
    pthread_mutex_lock(&x->lock);
    for (;;) {
        while (!x->stop && x->n_queued == 0) pthread_cond_wait(&x->wake, &x->lock);
        if (x->stop) break;
        int32_t item = x->queue[x->head];
        x->head = (x->head + 1) % ((size_t)x->n_layer * (size_t)x->n_expert);
        x->n_queued--;
        pthread_mutex_unlock(&x->lock);
        span s[TSR_EXPERT_MATRICES];
        spans(x, item / x->n_expert, item % x->n_expert, s);
        for (int m = 0; m < TSR_EXPERT_MATRICES; m++) {
            if (!s[m].mapped || !s[m].bytes) continue;
            char *start;
            size_t len;
            page_range(x, &s[m], &start, &len);
            madvise(start, len, MADV_WILLNEED);
            span_touch(x, &s[m]);
        }
        pthread_mutex_lock(&x->lock);
        x->queued[item] = false;
    }
    pthread_mutex_unlock(&x->lock);
    return NULL;
}

/* [any] An expert already waiting is not queued twice; the ring holds every expert once. */
static void ex_prefetch(void *ctx, int32_t layer, int32_t e) {
    tsr_experts *x = ctx;
    if (!valid(x, layer, e) || !x->map) return;
    int32_t item = layer * x->n_expert + e;
    size_t cap = (size_t)x->n_layer * (size_t)x->n_expert;
    pthread_mutex_lock(&x->lock);
    if (!x->thread_started)
        x->thread_started = pthread_create(&x->thread, NULL, prefetch_thread, x) == 0;
    if (x->thread_started && !x->queued[item]) {
        x->queued[item] = true;
        x->queue[(x->head + x->n_queued) % cap] = item;
        x->n_queued++;
        pthread_cond_signal(&x->wake);
    }
    pthread_mutex_unlock(&x->lock);
}

/* ---- lifetime ------------------------------------------------------------------------ */

tsr_status tsr_experts_create(const tsr_model *model, const tsr_model_weights *weights,
                              bool in_place, tsr_experts **out, tsr_error *err) {
    *out = NULL;
    tsr_experts *x = calloc(1, sizeof *x);
    size_t cap = (size_t)model->hp.n_layer * (size_t)model->hp.n_expert;
    if (x) {
        x->queue = malloc(cap * sizeof *x->queue);
        x->queued = calloc(cap, sizeof *x->queued);
    }
    if (!x || !x->queue || !x->queued) {
        if (x) free(x->queue);
        free(x);
        return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    }
    x->weights = weights;
    x->n_layer = model->hp.n_layer;
    x->n_expert = model->hp.n_expert;
    x->page = (size_t)sysconf(_SC_PAGESIZE);
    x->fd = -1;
    if (in_place) {
        x->map = tsr_gguf_mapping(model->file, &x->map_size);
        /* To drop pages from the page cache (without it, eviction stays in the process) and
         * to read an expert's pages and no others on a load. */
        if (x->map) x->fd = open(tsr_gguf_path(model->file), O_RDONLY | O_CLOEXEC);
        if (x->fd >= 0) posix_fadvise(x->fd, 0, 0, POSIX_FADV_RANDOM);
    }
    pthread_mutex_init(&x->lock, NULL);
    pthread_cond_init(&x->wake, NULL);
    x->access = (tsr_expert_access){.struct_size = sizeof x->access, .ctx = x,
                                    .bytes = ex_bytes, .prefetch = ex_prefetch,
                                    .resident = ex_resident, .load = ex_load,
                                    .evict = ex_evict, .matrices = ex_matrices};
    *out = x;
    return TSR_OK;
}

const tsr_expert_access *tsr_experts_access(const tsr_experts *x) { return &x->access; }

void tsr_experts_free(tsr_experts *x) {
    if (!x) return;
    pthread_mutex_lock(&x->lock);
    x->stop = true;
    pthread_cond_signal(&x->wake);
    pthread_mutex_unlock(&x->lock);
    if (x->thread_started) pthread_join(x->thread, NULL);
    pthread_mutex_destroy(&x->lock);
    pthread_cond_destroy(&x->wake);
    if (x->fd >= 0) close(x->fd);
    free(x->queue);
    free(x->queued);
    free(x);
}
