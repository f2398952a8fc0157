/* A pipeline opened the way the CLI opens one, for tests that drive the library: a config from
 * YAML text, the plugins of the given folders, a model file, a thread pool. */
#ifndef TSR_TEST_PIPELINE_FIXTURE_H
#define TSR_TEST_PIPELINE_FIXTURE_H

#include "config/config.h"
#include "model/model.h"
#include "pipeline/pipeline.h"
#include "plugin/loader.h"

typedef struct tsr_test_pipeline {
    tsr_pool *pool;
    tsr_registry *reg;
    tsr_config *cfg;
    tsr_model *model;
    tsr_model *draft_model; /* the config's draft.model, or NULL */
    tsr_pipeline *pl;
} tsr_test_pipeline;

/* Opens `model_path` with the pipeline `yaml` (and the draft model its draft.model names),
 * plugins from `plugin_dir` (and the shipped ones, TESSERA_PLUGIN_DIR), for n_ctx positions. Returns tsr_pipeline_create's status (the
 * earlier steps must succeed: they fail the test), its message in err. */
tsr_status tsr_test_pipeline_open(tsr_test_pipeline *r, const char *model_path, const char *yaml,
                                  const char *plugin_dir, int32_t n_ctx, tsr_error *err);
/* The same, failing the test unless the pipeline opens. */
void tsr_test_pipeline_open_ok(tsr_test_pipeline *r, const char *model_path, const char *yaml,
                               int32_t n_ctx);
void tsr_test_pipeline_close(tsr_test_pipeline *r);
/* After a change to r->cfg (tsr_config_set): binds it again and replaces the pipeline with one
 * on the same models, for n_ctx positions. Returns tsr_pipeline_create's status. */
tsr_status tsr_test_pipeline_rebind(tsr_test_pipeline *r, int32_t n_ctx, tsr_error *err);

/* The logits of every position of `tokens` (n of them, positions 0..n-1) run as one forward of
 * sequence 0 from an empty cache: (n, n_vocab), malloc'd. */
float *tsr_test_pipeline_logits(tsr_test_pipeline *r, const int32_t *tokens, int n);

#endif
