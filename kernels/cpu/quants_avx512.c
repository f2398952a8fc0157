/* Quantized products with AVX-512 VNNI at 256 bits: vpdpbusd sums four u8 x s8 products per
 * lane in 32 bits, without vpmaddubsw's 16-bit saturation. */
#define TSR_QX_DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "quants_x86.h"

const tsr_quant_ops tsr_quant_ops_avx512 = QX_OPS;
