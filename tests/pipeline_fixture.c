#include "pipeline_fixture.h"

#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static const tsr_plugin_desc *find_plugin(void *reg, int32_t stage, const char *name,
                                          tsr_error *why) {
    const tsr_plugin_ref *r = tsr_registry_lookup(reg, stage, name, why);
    return r ? r->desc : NULL;
}

tsr_status tsr_test_pipeline_open(tsr_test_pipeline *r, const char *model_path, const char *yaml,
                                  const char *plugin_dir, int32_t n_ctx, tsr_error *err) {
    memset(r, 0, sizeof *r);
    ck_assert_int_ge(tsr_config_load_string(yaml, "test.yaml", &r->cfg, err), 0);
    r->reg = tsr_registry_create(NULL);
    if (plugin_dir) tsr_registry_add_dir(r->reg, plugin_dir, "test", true);
    tsr_registry_add_dir(r->reg, tsr_test_env("TESSERA_PLUGIN_DIR"), "test", true);
    ck_assert_uint_eq(tsr_registry_n_warnings(r->reg), 0);
    if (tsr_config_bind(r->cfg, find_plugin, r->reg, err) < 0) ck_abort_msg("%s", err->msg);
    r->pool = tsr_pool_create(tsr_config_threads(r->cfg));
    if (tsr_model_load(model_path, &r->model, err) < 0) ck_abort_msg("%s", err->msg);
    const char *draft_path = r->cfg->draft ? r->cfg->draft->model_path : NULL;
    if (draft_path && tsr_model_load(draft_path, &r->draft_model, err) < 0)
        ck_abort_msg("%s", err->msg);
    return tsr_pipeline_create(r->cfg, r->reg, r->model, r->draft_model, r->pool, n_ctx, &r->pl,
                               err);
}

void tsr_test_pipeline_open_ok(tsr_test_pipeline *r, const char *model_path, const char *yaml,
                               int32_t n_ctx) {
    tsr_error err;
    if (tsr_test_pipeline_open(r, model_path, yaml, NULL, n_ctx, &err) < 0)
        ck_abort_msg("%s", err.msg);
}

tsr_status tsr_test_pipeline_rebind(tsr_test_pipeline *r, int32_t n_ctx, tsr_error *err) {
    tsr_pipeline_free(r->pl);
    r->pl = NULL;
    if (tsr_config_bind(r->cfg, find_plugin, r->reg, err) < 0) ck_abort_msg("%s", err->msg);
    return tsr_pipeline_create(r->cfg, r->reg, r->model, r->draft_model, r->pool, n_ctx, &r->pl,
                               err);
}

void tsr_test_pipeline_close(tsr_test_pipeline *r) {
    tsr_pipeline_free(r->pl);
    tsr_model_free(r->draft_model);
    tsr_model_free(r->model);
    tsr_registry_free(r->reg);
    tsr_pool_free(r->pool);
    tsr_config_free(r->cfg);
}

float *tsr_test_pipeline_logits(tsr_test_pipeline *r, const int32_t *tokens, int n) {
    int32_t nv = r->model->hp.n_vocab;
    tsr_batch_entry *b = calloc((size_t)n, sizeof *b);
    for (int i = 0; i < n; i++)
        b[i] = (tsr_batch_entry){.seq_id = 0, .pos = i, .token = tokens[i], .want_logits = 1};
    float *logits = malloc((size_t)n * (size_t)nv * sizeof *logits);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r->pl, 0, &err), 0);
    if (tsr_pipeline_forward(r->pl, b, n, logits, &err) < 0) ck_abort_msg("%s", err.msg);
    tsr_pipeline_seq_end(r->pl, 0);
    free(b);
    return logits;
}
