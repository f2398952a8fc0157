/* The machine's own memory read bandwidth, measured STREAM-style, so benchmarks can report
 * how close decoding comes to the memory roofline in the same run. */
#ifndef TSR_HOST_MEMBW_H
#define TSR_HOST_MEMBW_H

#include <stddef.h>

#include "plugin/pool.h"

/* Reads a `bytes` buffer with every thread of `pool` (each its own share), `reps` times;
 * returns the best rate in GB/s (10^9 bytes per second). 0 if the buffer cannot be had. */
double tsr_measure_read_bandwidth(tsr_pool *pool, size_t bytes, int reps);

#endif
