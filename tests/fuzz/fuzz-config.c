/* Fuzz target: the config reader and --set on arbitrary bytes. The input up to its first NUL
 * byte is the YAML; what follows, if any, is a --set assignment applied to the loaded config.
 * Any input must yield either a config or one error line, without crashes, leaks or undefined
 * behaviour. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    size_t yaml_len = strlen(text);
    const char *assignment = yaml_len < size ? text + yaml_len + 1 : NULL;
    tsr_config *cfg;
    tsr_error err;
    if (tsr_config_load_string(text, "fuzz.yaml", &cfg, &err) == TSR_OK) {
        if (assignment && tsr_config_set(cfg, assignment, &err) < 0 && strchr(err.msg, '\n'))
            abort();
        for (int32_t s = 0; s <= TSR_STAGE_COUNT + 1; s++) tsr_config_stage_at(cfg, s, 3);
        tsr_config_free(cfg);
    } else if (strchr(err.msg, '\n')) {
        abort(); /* an error is one line */
    }
    free(text);
    return 0;
}
