/* Element types of model tensors (tsr_dtype, GGML type ids): names, block sizes, byte sizes,
 * read from the kernels' layout table (tsr_dtype_layout_of), with the overflow checks a file
 * reader needs.
 *
 * A quantized type packs `block` consecutive elements of a row into `type_size` bytes, so a
 * row of n elements (n a multiple of the block) takes n / block * type_size bytes. Plain
 * types have a block of 1. */
#ifndef TSR_HOST_DTYPE_H
#define TSR_HOST_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <tessera/common.h>

/* True when `dtype` is one of the types below (plugin types >= TSR_DTYPE_PLUGIN_FIRST are not
 * known here: only their quantizer can size them). */
bool tsr_dtype_known(int32_t dtype);

/* "F32", "Q8_0", "Q4_K", ... as GGML spells them; NULL for an unknown type. */
const char *tsr_dtype_name(int32_t dtype);

/* Elements per block (1 for plain types, 32 or 256 for quantized ones); 0 if unknown. */
uint32_t tsr_dtype_block(int32_t dtype);

/* Bytes per block; 0 if unknown. */
uint32_t tsr_dtype_type_size(int32_t dtype);

/* Bytes of a row of `n` elements. 0 when the type is unknown, n is negative or not a multiple
 * of the block size, or the size does not fit a size_t; callers that accept empty rows check
 * those conditions first. */
size_t tsr_dtype_row_bytes(int32_t dtype, int64_t n);

/* Bytes of a tensor of ne[0] x ne[1] x ne[2] x ne[3] elements (unused dimensions are 1).
 * False when the type is unknown, a dimension is negative, ne[0] is not a multiple of the
 * block size, or the size does not fit a size_t. */
bool tsr_dtype_tensor_bytes(int32_t dtype, const int64_t ne[4], size_t *bytes);

#endif
