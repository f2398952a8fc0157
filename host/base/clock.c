#include "base/clock.h"

#include <time.h>

uint64_t tsr_clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double tsr_clock_seconds_since(uint64_t t0_ns) { return (double)(tsr_clock_ns() - t0_ns) * 1e-9; }
