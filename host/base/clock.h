/* The host's one clock: monotonic nanoseconds, for timings, spin limits and progress. */
#ifndef TSR_HOST_CLOCK_H
#define TSR_HOST_CLOCK_H

#include <stdint.h>

uint64_t tsr_clock_ns(void);

/* Seconds from `t0_ns` (a tsr_clock_ns() reading) to now. */
double tsr_clock_seconds_since(uint64_t t0_ns);

#endif
