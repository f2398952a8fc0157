/* The SIMD levels a test compares with the scalar reference, said out loud: a machine or a
 * build without AVX-512 (or AVX2) runs fewer comparisons, and a test that passes there must
 * not look as if it had checked them. */
#ifndef TESSERA_TESTS_CPU_LEVELS_H
#define TESSERA_TESTS_CPU_LEVELS_H

#include <stdio.h>

#include <tessera/kernels_cpu.h>

/* Prints "<test>: compared scalar, avx2, avx512" and, when the machine or the build lacks a
 * level, "; not available here (machine or build): ...". Call it after the suite has run:
 * it selects the level in this process, which a forked test of the environment variable
 * TESSERA_CPU_LEVEL must find unset. */
static inline void tsr_test_print_levels(const char *test) {
    tsr_cpu_level best = tsr_cpu_level_best();
    printf("%s: compared", test);
    for (int l = TSR_CPU_LEVEL_SCALAR; l <= (int)best; l++)
        printf("%s %s", l ? "," : "", tsr_cpu_level_name((tsr_cpu_level)l));
    for (int l = (int)best + 1; l <= TSR_CPU_LEVEL_AVX512; l++)
        printf("%s %s", l == (int)best + 1 ? "; not available here (machine or build):" : ",",
               tsr_cpu_level_name((tsr_cpu_level)l));
    printf("\n");
    fflush(stdout);
}

#endif
