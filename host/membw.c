#include "membw.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct read_job {
    const uint64_t *buf;
    size_t n_words;
    uint64_t sums[256]; /* one per thread, so the reads cannot be optimised away */
} read_job;

/* Eight independent sums keep enough loads in flight to saturate memory, not the adder. */
__attribute__((optimize("O3", "unroll-loops"))) static void read_task(void *arg, int ith, int nth) {
    read_job *job = arg;
    size_t chunk = (job->n_words / (size_t)nth) & ~(size_t)7;
    const uint64_t *p = job->buf + chunk * (size_t)ith;
    uint64_t s[8] = {0};
    for (size_t i = 0; i < chunk; i += 8)
        for (int k = 0; k < 8; k++) s[k] += p[i + (size_t)k];
    job->sums[ith & 255] = s[0] ^ s[1] ^ s[2] ^ s[3] ^ s[4] ^ s[5] ^ s[6] ^ s[7];
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

double tsr_measure_read_bandwidth(tsr_pool *pool, size_t bytes, int reps) {
    read_job job = {.n_words = bytes / sizeof(uint64_t)};
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, job.n_words * sizeof *buf) != 0) return 0;
    /* Touch every page so the first pass does not measure page faults. */
    memset(buf, 1, job.n_words * sizeof *buf);
    job.buf = buf;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        tsr_pool_run(pool, read_task, &job);
        double secs = now() - t0;
        size_t read = (job.n_words / (size_t)tsr_pool_size(pool) & ~(size_t)7) *
                      (size_t)tsr_pool_size(pool) * sizeof(uint64_t);
        double gbs = secs > 0 ? (double)read / secs * 1e-9 : 0;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}
