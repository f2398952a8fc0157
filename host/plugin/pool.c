#include "plugin/pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "base/clock.h"

/* A decode step runs ~150 parallel_for calls a few microseconds apart: waking a sleeping
 * worker through the condition variable costs about as much as the work. So workers and the
 * caller first spin this long on the atomics, then sleep. */
#define POOL_SPIN_NS 100000

struct tsr_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t mutex;
    pthread_cond_t work_ready;
    pthread_cond_t work_done;
    atomic_uint_fast64_t generation; /* bumped for each job; workers run once per generation */
    atomic_int pending;              /* workers still running the current job */
    atomic_int stopping;
    int sleepers;                    /* workers waiting on work_ready (under mutex) */
    tsr_task_fn fn;                  /* written before generation is bumped */
    void *arg;
};

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spins until done(pool, v) or POOL_SPIN_NS have passed; returns whether done. */
static int spin_until(tsr_pool *pool, int (*done)(tsr_pool *, uint64_t), uint64_t v) {
    uint64_t end = 0;
    for (int i = 0;; i++) {
        if (done(pool, v)) return 1;
        if ((i & 63) == 0) {
            uint64_t t = tsr_clock_ns();
            if (!end) end = t + POOL_SPIN_NS;
            else if (t >= end) return 0;
        }
        cpu_relax();
    }
}

static int job_posted(tsr_pool *pool, uint64_t seen) {
    return atomic_load_explicit(&pool->generation, memory_order_acquire) != seen ||
           atomic_load_explicit(&pool->stopping, memory_order_acquire);
}

static int job_finished(tsr_pool *pool, uint64_t unused) {
    (void)unused;
    return atomic_load_explicit(&pool->pending, memory_order_acquire) == 0;
}

/* Set while a thread runs a task, so nested parallel_for calls run serially instead of
 * deadlocking on a pool whose workers are all busy. */
static _Thread_local int in_task;

typedef struct worker_start {
    tsr_pool *pool;
    int ith;
} worker_start;

static void *worker_main(void *p) {
    worker_start start = *(worker_start *)p;
    free(p);
    tsr_pool *pool = start.pool;
    uint64_t seen = 0;
    for (;;) {
        if (!spin_until(pool, job_posted, seen)) {
            pthread_mutex_lock(&pool->mutex);
            pool->sleepers++;
            while (!job_posted(pool, seen)) pthread_cond_wait(&pool->work_ready, &pool->mutex);
            pool->sleepers--;
            pthread_mutex_unlock(&pool->mutex);
        }
        if (atomic_load_explicit(&pool->stopping, memory_order_acquire)) break;
        seen = atomic_load_explicit(&pool->generation, memory_order_acquire);
        in_task = 1;
        pool->fn(pool->arg, start.ith, pool->n_threads);
        in_task = 0;
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            /* under the mutex: the caller checks pending under it before it sleeps */
            pthread_mutex_lock(&pool->mutex);
            pthread_cond_signal(&pool->work_done);
            pthread_mutex_unlock(&pool->mutex);
        }
    }
    return NULL;
}

tsr_pool *tsr_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    tsr_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->stopping, 0);
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->work_ready, NULL);
    pthread_cond_init(&pool->work_done, NULL);
    pool->workers = calloc((size_t)n_threads, sizeof *pool->workers);
    if (!pool->workers) {
        tsr_pool_free(pool);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_start *start = malloc(sizeof *start);
        if (!start) {
            pool->n_threads = i;
            break;
        }
        *start = (worker_start){pool, i};
        if (pthread_create(&pool->workers[i], NULL, worker_main, start) != 0) {
            free(start);
            pool->n_threads = i;
            break;
        }
    }
    return pool;
}

void tsr_pool_free(tsr_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    atomic_store_explicit(&pool->stopping, 1, memory_order_release);
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 1; pool->workers && i < pool->n_threads; i++) pthread_join(pool->workers[i], NULL);
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->work_ready);
    pthread_cond_destroy(&pool->work_done);
    free(pool->workers);
    free(pool);
}

int tsr_pool_size(const tsr_pool *pool) { return pool ? pool->n_threads : 1; }

static _Thread_local tsr_pool *bound_share;

void tsr_pool_bind_thread(tsr_pool *share) { bound_share = share; }

void tsr_pool_run(tsr_pool *pool, tsr_task_fn fn, void *arg) {
    if (bound_share) pool = bound_share;
    if (!pool || pool->n_threads == 1 || in_task) {
        int nth = tsr_pool_size(pool);
        for (int i = 0; i < nth; i++) fn(arg, i, nth);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    /* a worker checks generation under the mutex before it sleeps: no lost wake-up */
    pthread_mutex_lock(&pool->mutex);
    if (pool->sleepers) pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->mutex);

    in_task = 1;
    fn(arg, 0, pool->n_threads);
    in_task = 0;

    if (spin_until(pool, job_finished, 0)) return;
    pthread_mutex_lock(&pool->mutex);
    while (!job_finished(pool, 0)) pthread_cond_wait(&pool->work_done, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);
}
