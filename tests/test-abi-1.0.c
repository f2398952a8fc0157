/* A 1.0 plugin keeps working in every 1.y host: the plugins of tests/abi-1.0/plugins, built
 * against the frozen 1.0 headers alone, run a whole pipeline in this host. On the F32 fixtures
 * they give llama.cpp's logits (llama normal RoPE; qwen2 NEOX RoPE and biases), on stories260K
 * the shipped plugins' greedy text; and a router, which only mixture-of-experts models use, is
 * refused by name on a dense model and routes the experts of the MoE fixture with the shipped
 * stages, while the frozen backend, which cannot run experts, is refused by name for it. The
 * conformance runner checks each of them on its own (ctest abi-1.0-conformance). Needs the
 * shared data folder; skips without it. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pipeline_impl.h"
#include "pipeline_fixture.h"
#include "testutil.h"

static const char *const frozen_yaml =
    "tessera: 1\nbackend: { plugin: abi10-cpu }\nquantizer: { plugin: abi10-keep }\n"
    "attention: { plugin: abi10-naive }\ncache: { plugin: abi10-full }\n"
    "decoder: { plugin: abi10-greedy }\n";

static void open_frozen(tsr_test_pipeline *r, const char *model_rel, const char *yaml) {
    char *path = tsr_test_data(model_rel);
    tsr_error err;
    if (tsr_test_pipeline_open(r, path, yaml, tsr_test_env("TESSERA_ABI10_PLUGIN_DIR"), 512,
                               &err) < 0)
        ck_abort_msg("%s", err.msg);
    free(path);
}

/* The 64 fixture tokens, as llama.cpp ran them. */
static int32_t *seq64(int *n) {
    char *path = tsr_test_data("fixtures/inputs/seq64.txt");
    char *text = tsr_test_read_file(path, NULL), *p = text, *end;
    int32_t *ids = malloc(64 * sizeof *ids);
    *n = 0;
    for (long v = strtol(p, &end, 10); end != p && *n < 64; v = strtol(p = end, &end, 10))
        ids[(*n)++] = (int32_t)v;
    free(text);
    free(path);
    return ids;
}

/* The frozen plugins sum in double, llama.cpp in float: measured 1.3e-6 (llama-tiny) and
 * 8.6e-7 (qwen2-tiny) at worst; about three times that. */
#define LOGIT_TOL 4e-6

static const char *const fixtures[] = {"llama-tiny-f32", "qwen2-tiny-f32"};

START_TEST(frozen_plugins_give_llama_cpp_logits) {
    char rel[128];
    snprintf(rel, sizeof rel, "fixtures/models/%s.gguf", fixtures[_i]);
    tsr_test_pipeline r;
    open_frozen(&r, rel, frozen_yaml);
    int n;
    int32_t *ids = seq64(&n);
    ck_assert_int_eq(n, 64);
    float *got = tsr_test_pipeline_logits(&r, ids, n);
    snprintf(rel, sizeof rel, "fixtures/ref/%s.logits-seq64.f32", fixtures[_i]);
    size_t n_ref;
    float *want = tsr_test_read_f32(rel, &n_ref);
    ck_assert_uint_eq(n_ref, (size_t)n * (size_t)r.model->hp.n_vocab);
    double worst = 0;
    for (size_t i = 0; i < n_ref; i++) worst = fmax(worst, fabs((double)got[i] - want[i]));
    ck_assert_msg(worst <= LOGIT_TOL, "%s: max |logit - llama.cpp's| = %g", fixtures[_i], worst);
    free(want);
    free(got);
    free(ids);
    tsr_test_pipeline_close(&r);
}
END_TEST

/* Greedy text through the frozen decoder equals the shipped pipeline's. */
START_TEST(frozen_pipeline_generates_like_the_shipped_one) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *cfg_dir = tsr_test_tmpdir(), cfg_path[512], yaml[1024];
    snprintf(cfg_path, sizeof cfg_path, "%s/frozen.yaml", cfg_dir);
    snprintf(yaml, sizeof yaml, "%splugin_dirs: [\"%s\"]\n", frozen_yaml,
             tsr_test_env("TESSERA_ABI10_PLUGIN_DIR"));
    ck_assert_int_eq(tsr_test_write_file(cfg_path, yaml, strlen(yaml)), 0);
    char *frozen = NULL, *shipped = NULL, *err = NULL;
    const char *a[] = {"run", cfg_path, "-m", model, "-p", "Once upon a time", "-n", "40", NULL};
    ck_assert_msg(tsr_test_tessera(&frozen, &err, a) == 0, "%s", err);
    free(err);
    const char *b[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "40", "--set",
                       "decoder.plugin=greedy", NULL};
    ck_assert_msg(tsr_test_tessera(&shipped, &err, b) == 0, "%s", err);
    ck_assert_str_eq(frozen, shipped);
    ck_assert_uint_gt(strlen(frozen), strlen("Once upon a time") + 40);
    free(frozen);
    free(shipped);
    free(err);
    free(cfg_dir);
    free(model);
}
END_TEST

START_TEST(router_on_a_dense_model_is_refused) {
    char *path = tsr_test_data("fixtures/models/llama-tiny-f32.gguf");
    char yaml[512];
    snprintf(yaml, sizeof yaml, "%srouter: { plugin: abi10-topk }\n", frozen_yaml);
    tsr_test_pipeline r;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&r, path, yaml, tsr_test_env("TESSERA_ABI10_PLUGIN_DIR"),
                                            64, &err), TSR_E_INVALID);
    ck_assert_str_eq(err.msg, "test.yaml:7:19: router: 'abi10-topk' is configured but the model "
                              "has no mixture-of-experts layers to route; remove the router");
    tsr_test_pipeline_close(&r);
    free(path);
}
END_TEST

/* The frozen router routes a model with experts through the shipped stages: 1.0 knows
 * nothing of gating or expert access, and its softmax over the chosen experts in double
 * gives llama.cpp's logits within float error (measured 7.2e-7 with 'flash'). */
START_TEST(frozen_router_routes_experts) {
    char *path = tsr_test_data("fixtures/models/moe-tiny-f32.gguf");
    tsr_test_pipeline r;
    tsr_error err;
    if (tsr_test_pipeline_open(&r, path, "tessera: 1\nrouter: { plugin: abi10-topk }\n"
                               "decoder: { plugin: greedy }\n",
                               tsr_test_env("TESSERA_ABI10_PLUGIN_DIR"), 512, &err) < 0)
        ck_abort_msg("%s", err.msg);
    ck_assert_str_eq(r.pl->stage_main[TSR_STAGE_ROUTER]->ref->desc->name, "abi10-topk");
    int n;
    int32_t *ids = seq64(&n);
    float *got = tsr_test_pipeline_logits(&r, ids, n);
    size_t n_ref;
    float *want = tsr_test_read_f32("fixtures/ref/moe-tiny-f32.logits-seq64.f32", &n_ref);
    double worst = 0;
    for (size_t i = 0; i < n_ref; i++) worst = fmax(worst, fabs((double)got[i] - want[i]));
    ck_assert_msg(worst <= 2.2e-6, "max |logit - llama.cpp's| = %g", worst);
    free(want);
    free(got);
    free(ids);
    tsr_test_pipeline_close(&r);
    free(path);
}
END_TEST

/* A 1.0 backend has no copy_rows and weighted_sum: a model with experts is refused by name. */
START_TEST(frozen_backend_refuses_experts) {
    char *path = tsr_test_data("fixtures/models/moe-tiny-f32.gguf");
    tsr_test_pipeline r;
    tsr_error err;
    ck_assert_int_eq(tsr_test_pipeline_open(&r, path, frozen_yaml,
                                            tsr_test_env("TESSERA_ABI10_PLUGIN_DIR"), 64, &err),
                     TSR_E_UNSUPPORTED);
    ck_assert_str_eq(err.msg, "backend 'abi10-cpu' has no copy_rows and weighted_sum (backend "
                              "ABI 1.1), which a mixture-of-experts model (4 experts per layer) "
                              "needs; use a backend that has them (cpu)");
    tsr_test_pipeline_close(&r);
    free(path);
}
END_TEST

int main(void) {
    free(tsr_test_require_data("models/stories260K.gguf"));
    free(tsr_test_require_data("fixtures/ref/llama-tiny-f32.logits-seq64.f32"));
    Suite *s = suite_create("abi-1.0");
    TCase *tc = tcase_create("frozen plugins");
    tcase_add_loop_test(tc, frozen_plugins_give_llama_cpp_logits, 0,
                        (int)(sizeof fixtures / sizeof fixtures[0]));
    tcase_add_test(tc, frozen_pipeline_generates_like_the_shipped_one);
    tcase_add_test(tc, router_on_a_dense_model_is_refused);
    tcase_add_test(tc, frozen_router_routes_experts);
    tcase_add_test(tc, frozen_backend_refuses_experts);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    return tsr_test_run_suite(s);
}
