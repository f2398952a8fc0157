/* Quantized products with AVX2: u8 x s8 products by vpmaddubsw (pairs stay below 2^15 for
 * every format: |u| <= 128, |s| <= 127, and |u| <= 63 where two large values could meet). */
#define TSR_QX_DPBUSD(acc, u, s)                                                               \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)),                  \
                                              _mm256_set1_epi16(1)))
#include "quants_x86.h"

const tsr_quant_ops tsr_quant_ops_avx2 = QX_OPS;
