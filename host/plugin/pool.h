/* The host's thread pool: plugins reach it through tsr_host.parallel_for. */
#ifndef TSR_HOST_POOL_H
#define TSR_HOST_POOL_H

#include <tessera/common.h>

typedef struct tsr_pool tsr_pool;

/* n_threads >= 1 counts the caller: n_threads - 1 workers are started. NULL on failure. */
tsr_pool *tsr_pool_create(int n_threads);
void tsr_pool_free(tsr_pool *pool);
int tsr_pool_size(const tsr_pool *pool);

/* Runs fn(arg, ith, nth) for ith in [0, nth) with nth = pool size, the caller running ith 0,
 * and returns when all have finished. A call from inside a task (nested) runs all of its
 * tasks serially on the calling thread. */
void tsr_pool_run(tsr_pool *pool, tsr_task_fn fn, void *arg);

/* Makes every later tsr_pool_run from the calling thread run on `share` instead of the pool it
 * names (NULL: on that pool again), so that two threads can each run one model's forward on a
 * share of the threads (a decoder's forward_begin). Results do not depend on the thread count
 * (the plugins' rule INST_5), so a forward gives the same bits on a share. */
void tsr_pool_bind_thread(tsr_pool *share);

#endif
