/* The machine's own arithmetic peaks, measured, so benchmarks can report how close prefill
 * comes to them in the same run (as membw.h does for decode and the memory). */
#ifndef TSR_HOST_PEAK_H
#define TSR_HOST_PEAK_H

#include "plugin/pool.h"

typedef enum tsr_peak_kind {
    TSR_PEAK_INT8, /* u8 x s8 products summed in int32: AVX-512 VNNI vpdpbusd */
    TSR_PEAK_F32   /* f32 fused multiply-adds: AVX-512 or AVX2 + FMA */
} tsr_peak_kind;

/* Runs independent chains of the kind's widest instruction on every thread of `pool` for
 * `seconds`; returns the rate in GOP/s, a multiply-add counting as 2 operations (as the FLOPs
 * of a matrix product are counted). 0 when the CPU has no such instruction. */
double tsr_measure_peak_gops(tsr_pool *pool, tsr_peak_kind kind, double seconds);

#endif
