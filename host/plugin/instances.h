/* The plugin instances of a pipeline (or of `tessera quantize`): created from the config's
 * stage settings, one per `layers:` override where a stage varies per layer, and destroyed
 * together in reverse order of creation (so the backend, made first, goes last). */
#ifndef TSR_HOST_INSTANCES_H
#define TSR_HOST_INSTANCES_H

#include "config/config.h"
#include "plugin/loader.h"
#include "plugin/stage_init.h"

typedef struct tsr_instance_set {
    const tsr_registry *reg;
    tsr_pool *pool;
    tsr_instance **owned; /* in order of creation */
    size_t n_owned;
} tsr_instance_set;

/* Creates the plugin `sc` names for `stage`, with its bound parameters and an init struct
 * made from `shape`. */
tsr_status tsr_instance_set_add(tsr_instance_set *set, int32_t stage, const tsr_stage_conf *sc,
                                const tsr_model_shape *shape, tsr_instance **out, tsr_error *err);

/* The top-level instance of `stage` (*main) and, for each of shape->n_layer layers, the
 * instance that serves it (at[l]): the top-level one, or the one of the `layers:` entry that
 * overrides it (layers of one entry share an instance). */
tsr_status tsr_instance_set_per_layer(tsr_instance_set *set, const tsr_config *cfg, int32_t stage,
                                      const tsr_model_shape *shape, tsr_instance **main,
                                      tsr_instance **at, tsr_error *err);

void tsr_instance_set_free(tsr_instance_set *set);

/* Reports a failed call `what` of `inst` (status `st`) with the message the plugin left
 * through set_error: "<stage> '<plugin>': <what> failed: <its words>". Returns st. */
tsr_status tsr_instance_failed(tsr_instance *inst, tsr_status st, const char *what, tsr_error *err);

#endif
