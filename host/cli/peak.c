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
    uint64_t ops[256];   /* per thread */
    uint32_t sink[256];  /* per thread, so the chains cannot be optimised away */
} peak_job;

#if defined(__x86_64__)
/* The operands come through an empty asm so that the compiler cannot fold the chains; the
 * accumulators are named registers updated in place by asm: with an array and the
 * intrinsics (destructive in their destination) GCC copies or spills them every step, work
 * that is no part of the peak. */
#define PEAK_STEP_ASM(op)                                                                      \
    __asm__(op " %[b], %[a], %[c0]\n\t" op " %[b], %[a], %[c1]\n\t" op " %[b], %[a], %[c2]\n\t"   \
            op " %[b], %[a], %[c3]\n\t" op " %[b], %[a], %[c4]\n\t" op " %[b], %[a], %[c5]\n\t"   \
            op " %[b], %[a], %[c6]\n\t" op " %[b], %[a], %[c7]\n\t" op " %[b], %[a], %[c8]\n\t"   \
            op " %[b], %[a], %[c9]\n\t" op " %[b], %[a], %[c10]\n\t" op " %[b], %[a], %[c11]"     \
            : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3),             \
              [c4] "+v"(c4), [c5] "+v"(c5), [c6] "+v"(c6), [c7] "+v"(c7),             \
              [c8] "+v"(c8), [c9] "+v"(c9), [c10] "+v"(c10), [c11] "+v"(c11)          \
            : [a] "v"(a), [b] "v"(b))

/* The chains c0..c11 after a step, as an array for the reduction. */
#define PEAK_CHAINS_DECLARE(type, set1)                                                        \
    type c0 = set1(0), c1 = set1(1), c2 = set1(2), c3 = set1(3), c4 = set1(4), c5 = set1(5),  \
         c6 = set1(6), c7 = set1(7), c8 = set1(8), c9 = set1(9), c10 = set1(10),               \
         c11 = set1(11)
#define PEAK_CHAINS_ARRAY {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static uint32_t
run_vnni512(uint64_t steps) {
    __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(-1);
    __asm__("" : "+v"(a), "+v"(b));
    PEAK_CHAINS_DECLARE(__m512i, _mm512_set1_epi32);
    for (uint64_t i = 0; i < steps; i++) PEAK_STEP_ASM("vpdpbusd");
    __m512i c[PEAK_CHAINS] = PEAK_CHAINS_ARRAY, t = c[0];
    for (int k = 1; k < PEAK_CHAINS; k++) t = _mm512_xor_si512(t, c[k]);
    return (uint32_t)_mm512_reduce_add_epi32(t);
}

__attribute__((target("avx512f"))) static uint32_t run_fma512(uint64_t steps) {
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(0.0f);
    __asm__("" : "+v"(a), "+v"(b));
    PEAK_CHAINS_DECLARE(__m512, _mm512_set1_ps);
    for (uint64_t i = 0; i < steps; i++) PEAK_STEP_ASM("vfmadd213ps");
    __m512 c[PEAK_CHAINS] = PEAK_CHAINS_ARRAY, t = c[0];
    for (int k = 1; k < PEAK_CHAINS; k++) t = _mm512_add_ps(t, c[k]);
    return (uint32_t)_mm512_reduce_add_ps(t);
}

__attribute__((target("avx2,fma"))) static uint32_t run_fma256(uint64_t steps) {
    __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(0.0f);
    __asm__("" : "+x"(a), "+x"(b));
    PEAK_CHAINS_DECLARE(__m256, _mm256_set1_ps);
    for (uint64_t i = 0; i < steps; i++) PEAK_STEP_ASM("vfmadd213ps");
    __m256 c[PEAK_CHAINS] = PEAK_CHAINS_ARRAY, t = c[0];
    for (int k = 1; k < PEAK_CHAINS; k++) t = _mm256_add_ps(t, c[k]);
    float f[8];
    _mm256_storeu_ps(f, t);
    return (uint32_t)f[0];
}
#endif

/* The operations of one step of PEAK_CHAINS instructions, and its kernel; 0 when none. */
static uint64_t peak_kernel(tsr_peak_kind kind, uint32_t (**run)(uint64_t)) {
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
    uint32_t (*run)(uint64_t);
    uint64_t per_step = peak_kernel(job->kind, &run), steps = 0;
    uint32_t sink = 0;
    uint64_t t0 = tsr_clock_ns();
    while (run && tsr_clock_seconds_since(t0) < job->seconds) {
        sink ^= run(PEAK_STEP);
        steps += PEAK_STEP;
    }
    job->ops[ith & 255] = steps * per_step;
    job->sink[ith & 255] = sink;
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
