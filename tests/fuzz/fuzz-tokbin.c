/* Fuzz target: the llama2.c tok*.bin parser over arbitrary bytes; whatever it accepts must
 * tokenize and detokenize a fixed text without fault. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tsr_tokenizer *tok;
    tsr_error err;
    if (tsr_tokenizer_from_llama2c_memory(data, size, "fuzz.bin", 0, &tok, &err) != TSR_OK)
        return 0;
    static const char text[] = "Once upon a time, \xc3\xa9t\xc3\xa9 <0x41>\n";
    int32_t *ids;
    size_t n;
    if (tsr_tokenize(tok, text, sizeof text - 1, true, false, &ids, &n, &err) != TSR_OK) abort();
    for (size_t i = 0; i < n; i++)
        if ((uint32_t)ids[i] >= tsr_tokenizer_n_vocab(tok)) abort();
    char *s;
    size_t len;
    if (tsr_detokenize(tok, ids, n, &s, &len, &err) != TSR_OK) abort();
    free(s);
    free(ids);
    tsr_tokenizer_free(tok);
    return 0;
}
