#include "cli/membw.h"

#include <stdlib.h>
#include <string.h>

#include "base/clock.h"

typedef struct read_job {
    const uint64_t *buf;
    size_t n_words;
    uint64_t sums[256]; /* one per thread, so the reads cannot be optimised away */
} read_job;

/* A cache line of words, read with the widest loads the machine has: with 8- or 16-byte
 * loads one core keeps too few lines in flight and reads ~34 GB/s on the benchmark machine
 * where 64-byte loads read ~41, as fast as the AVX-512 product kernels stream their weights,
 * so the roofline would be the probe's limit instead of the memory's. */
typedef uint64_t line_words __attribute__((vector_size(64)));
#define LINE_WORDS 8
#define READ_SUMS 4 /* independent sums: the adds never hold the loads back */

#if defined(__x86_64__)
#define READ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define READ_CLONES
#endif

READ_CLONES static uint64_t read_lines(const line_words *p, size_t n_lines) {
    line_words s[READ_SUMS] = {{0}};
    for (size_t i = 0; i < n_lines; i += READ_SUMS)
        for (int k = 0; k < READ_SUMS; k++) s[k] += p[i + (size_t)k];
    line_words t = (s[0] + s[1]) + (s[2] + s[3]);
    uint64_t r = 0;
    for (int k = 0; k < LINE_WORDS; k++) r ^= t[k];
    return r;
}

/* Each thread's share, whole groups of READ_SUMS lines. */
static size_t chunk_words(const read_job *job, int nth) {
    return job->n_words / (size_t)nth & ~(size_t)(LINE_WORDS * READ_SUMS - 1);
}

static void read_task(void *arg, int ith, int nth) {
    read_job *job = arg;
    size_t chunk = chunk_words(job, nth);
    const line_words *p = (const line_words *)(job->buf + chunk * (size_t)ith);
    job->sums[ith & 255] = read_lines(p, chunk / LINE_WORDS);
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
        uint64_t t0 = tsr_clock_ns();
        tsr_pool_run(pool, read_task, &job);
        double secs = tsr_clock_seconds_since(t0);
        size_t read = chunk_words(&job, tsr_pool_size(pool)) * (size_t)tsr_pool_size(pool) *
                      sizeof(uint64_t);
        double gbs = secs > 0 ? (double)read / secs * 1e-9 : 0;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}
