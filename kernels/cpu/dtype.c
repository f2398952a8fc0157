/* The layouts of the element types, by tsr_dtype: GGML's names and block sizes (the block
 * structs' sizes, <tessera/kernels_cpu.h>). The one table the kernels, the plugins and the host
 * (host/files/dtype.c) read. */
#include <tessera/kernels_cpu.h>

static const tsr_dtype_layout layouts[] = {
    [TSR_DTYPE_F32] = {"F32", 1, sizeof(float), 1},
    [TSR_DTYPE_F16] = {"F16", 1, sizeof(uint16_t), 1},
    [TSR_DTYPE_BF16] = {"BF16", 1, sizeof(uint16_t), 1},
    [TSR_DTYPE_Q4_0] = {"Q4_0", TSR_QK, sizeof(tsr_block_q4_0), 1},
    [TSR_DTYPE_Q4_1] = {"Q4_1", TSR_QK, sizeof(tsr_block_q4_1), 1},
    [TSR_DTYPE_Q5_0] = {"Q5_0", TSR_QK, sizeof(tsr_block_q5_0), 1},
    [TSR_DTYPE_Q5_1] = {"Q5_1", TSR_QK, sizeof(tsr_block_q5_1), 1},
    [TSR_DTYPE_Q8_0] = {"Q8_0", TSR_QK, sizeof(tsr_block_q8_0), 1},
    [TSR_DTYPE_Q8_1] = {"Q8_1", TSR_QK, sizeof(tsr_block_q8_1), 1},
    [TSR_DTYPE_IQ4_NL] = {"IQ4_NL", TSR_QK, sizeof(tsr_block_iq4_nl), 1},
    [TSR_DTYPE_Q2_K] = {"Q2_K", TSR_QK_K, sizeof(tsr_block_q2_k), 1},
    [TSR_DTYPE_Q3_K] = {"Q3_K", TSR_QK_K, sizeof(tsr_block_q3_k), 1},
    [TSR_DTYPE_Q4_K] = {"Q4_K", TSR_QK_K, sizeof(tsr_block_q4_k), 1},
    [TSR_DTYPE_Q5_K] = {"Q5_K", TSR_QK_K, sizeof(tsr_block_q5_k), 1},
    [TSR_DTYPE_Q6_K] = {"Q6_K", TSR_QK_K, sizeof(tsr_block_q6_k), 1},
    [TSR_DTYPE_Q8_K] = {"Q8_K", TSR_QK_K, sizeof(tsr_block_q8_k), 1},
    [TSR_DTYPE_IQ4_XS] = {"IQ4_XS", TSR_QK_K, sizeof(tsr_block_iq4_xs), 1},
    /* Types a GGUF file may hold that no kernel converts. */
    [TSR_DTYPE_I8] = {"I8", 1, 1, 0},
    [TSR_DTYPE_I16] = {"I16", 1, 2, 0},
    [TSR_DTYPE_I32] = {"I32", 1, 4, 0},
    [TSR_DTYPE_I64] = {"I64", 1, 8, 0},
    [TSR_DTYPE_F64] = {"F64", 1, 8, 0},
};

/* GGML's sizes, which files and llama.cpp's kernels rely on. */
_Static_assert(sizeof(tsr_block_q4_0) == 18 && sizeof(tsr_block_q8_0) == 34 &&
                   sizeof(tsr_block_q4_k) == 144 && sizeof(tsr_block_q6_k) == 210 &&
                   sizeof(tsr_block_iq4_xs) == 136,
               "block layouts");

const tsr_dtype_layout *tsr_dtype_layout_of(int32_t dtype) {
    if (dtype < 0 || (size_t)dtype >= sizeof layouts / sizeof layouts[0]) return NULL;
    return layouts[dtype].name ? &layouts[dtype] : NULL;
}

int64_t tsr_dtype_block_elems(int32_t dtype) {
    const tsr_dtype_layout *l = tsr_dtype_layout_of(dtype);
    return l && l->kernels ? l->block : 0;
}

size_t tsr_dtype_block_bytes(int32_t dtype) {
    const tsr_dtype_layout *l = tsr_dtype_layout_of(dtype);
    return l && l->kernels ? l->block_bytes : 0;
}

size_t tsr_row_size(int32_t dtype, int64_t n) {
    int64_t be = tsr_dtype_block_elems(dtype);
    if (be == 0 || n < 0 || n % be) return 0;
    return (size_t)(n / be) * tsr_dtype_block_bytes(dtype);
}
