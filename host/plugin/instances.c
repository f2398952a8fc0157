#include "plugin/instances.h"

#include <stdlib.h>

tsr_status tsr_instance_set_add(tsr_instance_set *set, int32_t stage, const tsr_stage_conf *sc,
                                const tsr_model_shape *shape, tsr_instance **out, tsr_error *err) {
    const tsr_plugin_ref *ref = tsr_registry_find(set->reg, stage, sc->plugin);
    if (!ref)
        return tsr_error_set(err, TSR_E_INVALID, "%s: unknown plugin '%s' (see `tessera plugins "
                             "list`)", tsr_stage_name(stage), sc->plugin);
    tsr_instance **grown = realloc(set->owned, (set->n_owned + 1) * sizeof *set->owned);
    if (!grown) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    set->owned = grown;
    tsr_stage_init init;
    tsr_status st = tsr_instance_create(ref, set->pool, &sc->bound.params,
                                        tsr_stage_init_fill(stage, shape, &init), out, err);
    if (st < 0) return st;
    set->owned[set->n_owned++] = *out;
    return TSR_OK;
}

tsr_status tsr_instance_set_per_layer(tsr_instance_set *set, const tsr_config *cfg, int32_t stage,
                                      const tsr_model_shape *shape, tsr_instance **main,
                                      tsr_instance **at, tsr_error *err) {
    const tsr_stage_conf *top = &cfg->stage[stage];
    tsr_status st = tsr_instance_set_add(set, stage, top, shape, main, err);
    if (st < 0) return st;
    const tsr_stage_conf **made_for = calloc((size_t)shape->n_layer, sizeof *made_for);
    if (!made_for) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    for (int32_t l = 0; l < shape->n_layer; l++) {
        const tsr_stage_conf *sc = tsr_config_stage_at(cfg, stage, l);
        if (sc == top) {
            at[l] = *main;
            continue;
        }
        at[l] = NULL;
        for (int32_t j = 0; j < l; j++)
            if (made_for[j] == sc) at[l] = at[j];
        if (!at[l] && (st = tsr_instance_set_add(set, stage, sc, shape, &at[l], err)) < 0) break;
        made_for[l] = sc;
    }
    free(made_for);
    return st;
}

void tsr_instance_set_free(tsr_instance_set *set) {
    for (size_t i = set->n_owned; i-- > 0;) tsr_instance_destroy(set->owned[i]);
    free(set->owned);
    set->owned = NULL;
    set->n_owned = 0;
}

tsr_status tsr_instance_failed(tsr_instance *inst, tsr_status st, const char *what, tsr_error *err) {
    return tsr_error_set(err, st, "%s '%s': %s failed: %s", tsr_stage_name(inst->ref->desc->stage),
                         inst->ref->desc->name, what,
                         tsr_services_take_error(&inst->services, "no reason given"));
}
