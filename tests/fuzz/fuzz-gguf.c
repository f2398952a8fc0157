/* Fuzz target for the GGUF reader: any bytes either open and can be read entirely, or are
 * refused with one line. Also feeds the same bytes to the llama2.c reader. */
#include <stdint.h>
#include <string.h>

#include "files/gguf.h"
#include "files/llama2c.h"

/* Touches everything the model exposes so a bad pointer or length shows under ASan. */
static uint64_t walk(const tsr_gguf *g) {
    uint64_t sum = 0;
    char buf[96];
    for (int64_t k = 0; k < tsr_gguf_n_keys(g); k++) {
        sum += (uint64_t)tsr_gguf_key_format(g, k, buf, sizeof buf);
        sum += (uint64_t)tsr_gguf_find_key(g, tsr_gguf_key_name(g, k));
        if (tsr_gguf_key_type(g, k) != TSR_GGUF_ARRAY) continue;
        for (uint64_t i = 0; i < tsr_gguf_arr_len(g, k); i++) {
            tsr_gguf_str s = tsr_gguf_arr_str(g, k, i);
            for (uint64_t j = 0; j < s.len; j++) sum += (uint8_t)s.ptr[j];
            sum += (uint64_t)tsr_gguf_arr_i64(g, k, i) + (uint64_t)(tsr_gguf_arr_f64(g, k, i) != 0);
        }
    }
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        sum += tsr_gguf_find_tensor(g, t->name) == t;
        for (size_t j = 0; j < t->size; j++) sum += ((const uint8_t *)t->data)[j];
    }
    return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tsr_gguf *g = NULL;
    tsr_error err;
    volatile uint64_t sink = 0;
    if (tsr_gguf_open_memory(data, size, "fuzz.gguf", &g, &err) == 0) {
        sink += walk(g);
        tsr_gguf_close(g);
    } else if (!memchr(err.msg, '\0', sizeof err.msg) || strchr(err.msg, '\n')) {
        __builtin_trap(); /* a message must be one terminated line */
    }
    if (tsr_llama2c_open_memory(data, size, "fuzz.bin", &g, &err) == 0) {
        sink += walk(g);
        tsr_gguf_close(g);
    }
    (void)sink;
    return 0;
}
