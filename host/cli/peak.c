#include "cli/peak.h"

#include "base/clock.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* Independent accumulators: more than latency x throughput of every x86 core we know, so the
 * chains never wait on each other and the rate is the units' own. */
#define PEAK_CHAINS 12
/* Iterations between clock readings: long enough that the clock costs nothing. */
#define PEAK_STEP 4096

typedef struct peak_job {
    tsr_peak_kind kind;
    double seconds;
    uint64_t ops[256]; /* per thread */
} peak_job;

#if defined(__x86_64__)
/* The instruction itself is asm on named registers updated in place: with an array and the
 * intrinsics (destructive in their destination) GCC copies or spills the accumulators every
 * step, work that is no part of the peak. The operands pass through an empty asm and the
 * chains end in one, so the compiler can neither fold nor drop them. */
#define PEAK_STEP_ASM(op)                                                                      \
    __asm__(op " %[b], %[a], %[c0]\n\t" op " %[b], %[a], %[c1]\n\t" op " %[b], %[a], %[c2]\n\t"   \
            op " %[b], %[a], %[c3]\n\t" op " %[b], %[a], %[c4]\n\t" op " %[b], %[a], %[c5]\n\t"   \
            op " %[b], %[a], %[c6]\n\t" op " %[b], %[a], %[c7]\n\t" op " %[b], %[a], %[c8]\n\t"   \
            op " %[b], %[a], %[c9]\n\t" op " %[b], %[a], %[c10]\n\t" op " %[b], %[a], %[c11]"     \
            : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4),      \
              [c5] "+v"(c5), [c6] "+v"(c6), [c7] "+v"(c7), [c8] "+v"(c8), [c9] "+v"(c9),      \
              [c10] "+v"(c10), [c11] "+v"(c11)                                                \
            : [a] "v"(a), [b] "v"(b))

/* A kernel running `steps` steps of PEAK_CHAINS `op` on vectors of `type`, with operands
 * set1(a_value), set1(b_value). */
#define PEAK_KERNEL(name, isa, type, set1, op, a_value, b_value)                                \
    __attribute__((target(isa))) static void name(uint64_t steps) {                             \
        type a = set1(a_value), b = set1(b_value);                                              \
        __asm__("" : "+v"(a), "+v"(b));                                                         \
        type c0 = set1(0), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,       \
             c8 = c0, c9 = c0, c10 = c0, c11 = c0;                                              \
        for (uint64_t i = 0; i < steps; i++) PEAK_STEP_ASM(op);                                 \
        __asm__ volatile("" ::"v"(c0), "v"(c1), "v"(c2), "v"(c3), "v"(c4), "v"(c5), "v"(c6),    \
                         "v"(c7), "v"(c8), "v"(c9), "v"(c10), "v"(c11));                        \
    }

/* u8 0x01 x s8 -1 (all bytes 0xff): the sums stay small whatever the number of steps. */
PEAK_KERNEL(run_vnni512, "avx512f,avx512bw,avx512vnni", __m512i, _mm512_set1_epi32, "vpdpbusd",
            0x01010101, -1)
/* c = c x 1 + 0 keeps every chain at 0: no denormals, no overflow. */
PEAK_KERNEL(run_fma512, "avx512f", __m512, _mm512_set1_ps, "vfmadd213ps", 1.0f, 0.0f)
PEAK_KERNEL(run_fma256, "avx2,fma", __m256, _mm256_set1_ps, "vfmadd213ps", 1.0f, 0.0f)
#endif

/* The operations of one step of PEAK_CHAINS instructions, and its kernel; 0 when none. */
static uint64_t peak_kernel(tsr_peak_kind kind, void (**run)(uint64_t)) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (kind == TSR_PEAK_INT8 && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512bw")) {
        *run = run_vnni512;
        return PEAK_CHAINS * 64 * 2; /* 16 lanes x 4 byte products */
    }
    if (kind == TSR_PEAK_F32 && __builtin_cpu_supports("avx512f")) {
        *run = run_fma512;
        return PEAK_CHAINS * 16 * 2;
    }
    if (kind == TSR_PEAK_F32 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *run = run_fma256;
        return PEAK_CHAINS * 8 * 2;
    }
#else
    (void)kind;
#endif
    *run = NULL;
    return 0;
}

static void peak_task(void *arg, int ith, int nth) {
    (void)nth;
    peak_job *job = arg;
    void (*run)(uint64_t);
    uint64_t per_step = peak_kernel(job->kind, &run), steps = 0;
    uint64_t t0 = tsr_clock_ns();
    while (run && tsr_clock_seconds_since(t0) < job->seconds) {
        run(PEAK_STEP);
        steps += PEAK_STEP;
    }
    job->ops[ith & 255] = steps * per_step;
}

double tsr_measure_peak_gops(tsr_pool *pool, tsr_peak_kind kind, double seconds) {
    peak_job job = {.kind = kind, .seconds = seconds};
    uint64_t t0 = tsr_clock_ns();
    tsr_pool_run(pool, peak_task, &job);
    double secs = tsr_clock_seconds_since(t0);
    double ops = 0;
    int nth = tsr_pool_size(pool);
    for (int i = 0; i < nth && i < 256; i++) ops += (double)job.ops[i];
    return secs > 0 ? ops / secs * 1e-9 : 0;
}
