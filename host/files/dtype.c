#include "files/dtype.h"

#include <tessera/kernels_cpu.h>

/* The layouts are the kernels' table (<tessera/kernels_cpu.h>), one for the whole project; the
 * host knows every type of it, converted by the kernels or not. */
bool tsr_dtype_known(int32_t dtype) {
    return tsr_dtype_layout_of(dtype) != NULL;
}

const char *tsr_dtype_name(int32_t dtype) {
    const tsr_dtype_layout *t = tsr_dtype_layout_of(dtype);
    return t ? t->name : NULL;
}

uint32_t tsr_dtype_block(int32_t dtype) {
    const tsr_dtype_layout *t = tsr_dtype_layout_of(dtype);
    return t ? (uint32_t)t->block : 0;
}

uint32_t tsr_dtype_type_size(int32_t dtype) {
    const tsr_dtype_layout *t = tsr_dtype_layout_of(dtype);
    return t ? (uint32_t)t->block_bytes : 0;
}

size_t tsr_dtype_row_bytes(int32_t dtype, int64_t n) {
    const tsr_dtype_layout *t = tsr_dtype_layout_of(dtype);
    if (!t || n < 0 || n % t->block != 0) return 0;
    size_t bytes;
    if (__builtin_mul_overflow((uint64_t)(n / t->block), (uint64_t)t->block_bytes, &bytes)) return 0;
    return bytes;
}

bool tsr_dtype_tensor_bytes(int32_t dtype, const int64_t ne[4], size_t *bytes) {
    const tsr_dtype_layout *t = tsr_dtype_layout_of(dtype);
    if (!t || ne[0] < 0 || ne[0] % t->block != 0) return false;
    uint64_t n;
    bool overflow = __builtin_mul_overflow((uint64_t)(ne[0] / t->block), (uint64_t)t->block_bytes, &n);
    for (int d = 1; d < 4; d++)
        overflow |= ne[d] < 0 || __builtin_mul_overflow(n, (uint64_t)ne[d], &n);
    if (overflow || n > SIZE_MAX) return false;
    *bytes = (size_t)n;
    return true;
}
