#include "files/dtype.h"

typedef struct dtype_info {
    const char *name;
    uint32_t block;
    uint32_t type_size;
} dtype_info;

/* Sizes follow the GGML block layouts (e.g. Q8_0: one f16 scale + 32 int8 = 34 bytes;
 * Q6_K: 128 + 64 + 16 bytes of quants and scales + one f16 = 210 bytes per 256). */
static const dtype_info dtype_table[] = {
    [TSR_DTYPE_F32] = {"F32", 1, 4},
    [TSR_DTYPE_F16] = {"F16", 1, 2},
    [TSR_DTYPE_Q4_0] = {"Q4_0", 32, 18},
    [TSR_DTYPE_Q4_1] = {"Q4_1", 32, 20},
    [TSR_DTYPE_Q5_0] = {"Q5_0", 32, 22},
    [TSR_DTYPE_Q5_1] = {"Q5_1", 32, 24},
    [TSR_DTYPE_Q8_0] = {"Q8_0", 32, 34},
    [TSR_DTYPE_Q8_1] = {"Q8_1", 32, 36},
    [TSR_DTYPE_Q2_K] = {"Q2_K", 256, 84},
    [TSR_DTYPE_Q3_K] = {"Q3_K", 256, 110},
    [TSR_DTYPE_Q4_K] = {"Q4_K", 256, 144},
    [TSR_DTYPE_Q5_K] = {"Q5_K", 256, 176},
    [TSR_DTYPE_Q6_K] = {"Q6_K", 256, 210},
    [TSR_DTYPE_Q8_K] = {"Q8_K", 256, 292},
    [TSR_DTYPE_IQ4_NL] = {"IQ4_NL", 32, 18},
    [TSR_DTYPE_IQ4_XS] = {"IQ4_XS", 256, 136},
    [TSR_DTYPE_I8] = {"I8", 1, 1},
    [TSR_DTYPE_I16] = {"I16", 1, 2},
    [TSR_DTYPE_I32] = {"I32", 1, 4},
    [TSR_DTYPE_I64] = {"I64", 1, 8},
    [TSR_DTYPE_F64] = {"F64", 1, 8},
    [TSR_DTYPE_BF16] = {"BF16", 1, 2},
};

static const dtype_info *dtype_lookup(int32_t dtype) {
    if (dtype < 0 || (size_t)dtype >= sizeof dtype_table / sizeof dtype_table[0]) return NULL;
    return dtype_table[dtype].name ? &dtype_table[dtype] : NULL;
}

bool tsr_dtype_known(int32_t dtype) {
    return dtype_lookup(dtype) != NULL;
}

const char *tsr_dtype_name(int32_t dtype) {
    const dtype_info *t = dtype_lookup(dtype);
    return t ? t->name : NULL;
}

uint32_t tsr_dtype_block(int32_t dtype) {
    const dtype_info *t = dtype_lookup(dtype);
    return t ? t->block : 0;
}

uint32_t tsr_dtype_type_size(int32_t dtype) {
    const dtype_info *t = dtype_lookup(dtype);
    return t ? t->type_size : 0;
}

size_t tsr_dtype_row_bytes(int32_t dtype, int64_t n) {
    const dtype_info *t = dtype_lookup(dtype);
    if (!t || n < 0 || n % t->block != 0) return 0;
    size_t bytes;
    if (__builtin_mul_overflow((uint64_t)(n / t->block), (uint64_t)t->type_size, &bytes)) return 0;
    return bytes;
}

bool tsr_dtype_tensor_bytes(int32_t dtype, const int64_t ne[4], size_t *bytes) {
    const dtype_info *t = dtype_lookup(dtype);
    if (!t || ne[0] < 0 || ne[0] % t->block != 0) return false;
    uint64_t n;
    bool overflow = __builtin_mul_overflow((uint64_t)(ne[0] / t->block), t->type_size, &n);
    for (int d = 1; d < 4; d++)
        overflow |= ne[d] < 0 || __builtin_mul_overflow(n, (uint64_t)ne[d], &n);
    if (overflow || n > SIZE_MAX) return false;
    *bytes = (size_t)n;
    return true;
}
