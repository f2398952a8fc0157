#include "pool.h"

#include <pthread.h>
#include <stdlib.h>

struct tsr_pool {
    int n_threads;
    pthread_t *workers;
    pthread_mutex_t mutex;
    pthread_cond_t work_ready;
    pthread_cond_t work_done;
    uint64_t generation; /* bumped for each job; workers run once per generation */
    int pending;         /* workers still running the current job */
    int stopping;
    tsr_task_fn fn;
    void *arg;
};

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
    pthread_mutex_lock(&pool->mutex);
    for (;;) {
        while (!pool->stopping && pool->generation == seen)
            pthread_cond_wait(&pool->work_ready, &pool->mutex);
        if (pool->stopping) break;
        seen = pool->generation;
        tsr_task_fn fn = pool->fn;
        void *arg = pool->arg;
        pthread_mutex_unlock(&pool->mutex);
        in_task = 1;
        fn(arg, start.ith, pool->n_threads);
        in_task = 0;
        pthread_mutex_lock(&pool->mutex);
        if (--pool->pending == 0) pthread_cond_signal(&pool->work_done);
    }
    pthread_mutex_unlock(&pool->mutex);
    return NULL;
}

tsr_pool *tsr_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    tsr_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
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
    pool->stopping = 1;
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

void tsr_pool_run(tsr_pool *pool, tsr_task_fn fn, void *arg) {
    if (!pool || pool->n_threads == 1 || in_task) {
        int nth = tsr_pool_size(pool);
        for (int i = 0; i < nth; i++) fn(arg, i, nth);
        return;
    }
    pthread_mutex_lock(&pool->mutex);
    pool->fn = fn;
    pool->arg = arg;
    pool->pending = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->mutex);

    in_task = 1;
    fn(arg, 0, pool->n_threads);
    in_task = 0;

    pthread_mutex_lock(&pool->mutex);
    while (pool->pending > 0) pthread_cond_wait(&pool->work_done, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);
}
