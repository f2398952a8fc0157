/* The sparse attention plugins (duo, quest, tidal), the per-head statistics of reference and
 * flash (head_mass), the streaming cache's head file, and `tessera profile-heads`. Each
 * plugin is held to its defining property: read every entry when its budget covers the view,
 * and its output is flash's bit for bit; below the budget, it reads exactly the entries its
 * paper's rule picks, worked out by hand. Plugins are loaded from their .so files as a
 * pipeline loads them; the model cases run stories260K through the library and the program
 * (they need the shared data folder and skip without it). */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>
#include <tessera/sdk_kv.h>
#include <tessera/sdk_sparse.h>

#include "config/params.h"
#include "pipeline_fixture.h"
#include "plugin/commands.h"
#include "plugin/loader.h"
#include "plugin/stage_init.h"
#include "stage_plugin_fixtures.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

/* ---- fixtures ------------------------------------------------------------------------------ */

static tsr_model_shape shape_of(int32_t n_layer, int32_t n_head, int32_t n_kv_head, int32_t hd) {
    tsr_model_shape s = tsr_model_shape_synthetic();
    s.n_layer = n_layer;
    s.n_head = n_head;
    s.n_kv_head = n_kv_head;
    s.head_dim = hd;
    s.n_ctx = 1 << 16;
    return s;
}

/* The attention plugin `name` with parameters `kv` ("key=value", NULL-terminated, or NULL). */
static void attn_open(fx *f, int threads, const char *name, const char *const *kv,
                      const tsr_model_shape *s) {
    char file[64];
    snprintf(file, sizeof file, "attention-%s.so", name);
    fx_open(f, threads, TSR_STAGE_ATTENTION, file, name, kv, s);
}

/* Creating stage plugin `file`/`name` with `kv` fails: returns the status, the message in msg. */
static tsr_status try_open(int32_t stage, const char *file, const char *name,
                           const char *const *kv, const tsr_model_shape *s, char *msg,
                           size_t size) {
    tsr_pool *pool = tsr_pool_create(1);
    tsr_registry *reg = tsr_registry_create(pool);
    char path[4096];
    tsr_error err = {{0}};
    snprintf(path, sizeof path, "%s/%s", tsr_test_env("TESSERA_PLUGIN_DIR"), file);
    ck_assert_int_eq(tsr_registry_load_file(reg, path, &err), TSR_OK);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, stage, name);
    tsr_kv_text items[8];
    size_t n = 0;
    for (; kv && kv[n]; n++) {
        char *text = strdup(kv[n]);
        char *eq = strchr(text, '=');
        *eq = '\0';
        items[n] = (tsr_kv_text){.key = text, .value = eq + 1, .loc = {"test", 0, 0}};
    }
    tsr_bound_params bound;
    tsr_status st = tsr_params_bind(ref->desc->params, ref->desc->n_params, name, "stage",
                                    (tsr_src_loc){"test", 0, 0}, items, n, &bound, &err);
    ck_assert_msg(st == TSR_OK, "%s", err.msg);
    tsr_stage_init init;
    const void *initp = tsr_stage_init_fill(stage, s, &init);
    tsr_instance *inst = NULL;
    st = tsr_instance_create(ref, pool, &bound.params, initp, &inst, &err);
    snprintf(msg, size, "%s", err.msg);
    if (st >= 0) tsr_instance_destroy(inst);
    for (size_t i = 0; i < n; i++) free(items[i].key);
    tsr_bound_params_free(&bound);
    tsr_registry_free(reg);
    tsr_pool_free(pool);
    return st;
}

/* An instance's command "d(I)". */
static double command_d(fx *f, const char *name) {
    const tsr_command *cmd = tsr_command_find(f->inst->ref->desc, name);
    ck_assert_ptr_nonnull(cmd);
    return ((double (*)(void *))cmd->fn)(f->inst->self);
}

/* Writes a head file: roles[layer * n_kv_head + g] is 'r' or 's'. Returns its path. */
static char *heads_file(const char *name, int32_t n_layer, int32_t n_head, int32_t n_kv_head,
                        int32_t sink, int32_t window, const char *roles) {
    char *path = tsr_test_tmp_path(name);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "# made by the test\ntessera-heads 1\nlayers %d heads %d kv_heads %d\nsink %d\n"
            "window %d\n", (int)n_layer, (int)n_head, (int)n_kv_head, (int)sink, (int)window);
    for (int32_t u = 0; u < n_layer * n_kv_head; u++) {
        fprintf(f, "%d %d %s 0.5", (int)(u / n_kv_head), (int)(u % n_kv_head),
                roles[u] == 'r' ? "retrieval" : "streaming");
        for (int32_t h = 0; h < n_head / n_kv_head; h++) fprintf(f, " 0.25");
        fputc('\n', f);
    }
    ck_assert_int_eq(fclose(f), 0);
    return path;
}

/* n entries at positions 0..n-1 in order (as an appending policy keeps them) per KV head,
 * keys and values random, and up to 16 queries: the views of a sequence's decode step. */
typedef struct ordered {
    int32_t n_head, n_kv_head, hd;
    int64_t n;
    float *k, *v, *q;     /* k, v (n_kv_head, n, hd); q (16, n_head, hd) */
    int32_t *pos;
    tsr_kv_view views[16];
} ordered;

static void ordered_make(ordered *o, uint64_t seed, int32_t n_head, int32_t n_kv_head, int32_t hd,
                         int64_t n) {
    rng_seed(seed);
    *o = (ordered){.n_head = n_head, .n_kv_head = n_kv_head, .hd = hd, .n = n};
    size_t kv = (size_t)(n_kv_head * n * hd);
    o->k = malloc(kv * sizeof(float));
    o->v = malloc(kv * sizeof(float));
    o->q = malloc((size_t)(16 * n_head * hd) * sizeof(float));
    o->pos = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    for (size_t i = 0; i < kv; i++) {
        o->k[i] = 2.0f * tsr_test_rng_unit(&rng_state);
        o->v[i] = tsr_test_rng_unit(&rng_state);
    }
    for (int64_t i = 0; i < 16 * n_head * hd; i++) o->q[i] = 2.0f * tsr_test_rng_unit(&rng_state);
    for (int64_t j = 0; j < n; j++) o->pos[j] = (int32_t)j;
    for (int32_t g = 0; g < n_kv_head; g++)
        o->views[g] = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = n, .pos = o->pos,
                                    .dtype = TSR_DTYPE_F32, .k = o->k + (size_t)(g * n * hd),
                                    .v = o->v + (size_t)(g * n * hd),
                                    .k_stride = 4 * (size_t)hd, .v_stride = 4 * (size_t)hd};
}

static void ordered_free(ordered *o) {
    free(o->k);
    free(o->v);
    free(o->q);
    free(o->pos);
}

/* One call of `f` over o's views: n_q queries at positions q_pos0.., layer and phase given. */
static tsr_status ordered_run(fx *f, ordered *o, int32_t layer, int32_t phase, int64_t n_q,
                              int32_t q_pos0, const float *q, float *out) {
    int32_t qpos[16];
    for (int64_t i = 0; i < n_q; i++) qpos[i] = q_pos0 + (int32_t)i;
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .seq_id = 0, .layer = layer,
                               .phase = phase, .n_q = n_q, .q = q ? q : o->q, .q_pos = qpos,
                               .scale = 1.0f / sqrtf((float)o->hd), .views = o->views,
                               .out = out};
    return fx_attention_forward(f, &call);
}

/* ---- duo ----------------------------------------------------------------------------------- */

/* (n_head, n_kv_head, head_dim, n_q, n_kv) */
static const int32_t mixed_cases[][5] = {{8, 2, 32, 1, 300}, {4, 4, 16, 9, 130}, {6, 3, 13, 17, 257},
                                         {8, 1, 64, 3, 70}};
#define N_MIXED (int)(sizeof mixed_cases / sizeof mixed_cases[0])

/* With every head a retrieval head (a head file saying so, or no head file), duo reads every
 * entry through flash's arithmetic: out and score_acc are flash's bit for bit, for every view
 * storage, in prefill and decode. */
START_TEST(duo_retrieval_heads_are_flash) {
    const int32_t *cs = mixed_cases[_i];
    attn_case c;
    attn_case_make(&c, 40 + (uint64_t)_i, cs[0], cs[1], cs[2], cs[3], cs[4]);
    tsr_model_shape s = shape_of(2, c.n_head, c.n_kv_head, c.head_dim);
    char roles[64];
    memset(roles, 'r', sizeof roles);
    char *path = heads_file("heads.txt", 2, c.n_head, c.n_kv_head, 4, 8, roles);
    char arg[4200];
    snprintf(arg, sizeof arg, "heads=%s", path);
    const char *with_file[] = {arg, "sink=4", "window=8", NULL};
    fx flash, duo_file, duo_none;
    attn_open(&flash, 2, "flash", NULL, &s);
    attn_open(&duo_file, 2, "duo", with_file, &s);
    attn_open(&duo_none, 2, "duo", NULL, &s);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim), n_acc = (size_t)(c.n_kv_head * c.n_kv);
    float *o_ref = malloc(n_out * 4), *o_a = malloc(n_out * 4), *o_b = malloc(n_out * 4);
    float *a_ref = calloc(n_acc, 4), *a_a = calloc(n_acc, 4), *a_b = calloc(n_acc, 4);
    int32_t from = c.q_pos[c.n_q / 2];
    for (int kind = VIEW_F32; kind <= VIEW_LOADED; kind++) {
        ck_assert_int_eq(attn_run(&flash, &c, kind, from, o_ref, a_ref), TSR_OK);
        ck_assert_int_eq(attn_run(&duo_file, &c, kind, from, o_a, a_a), TSR_OK);
        ck_assert_int_eq(attn_run(&duo_none, &c, kind, from, o_b, a_b), TSR_OK);
        ck_assert_mem_eq(o_ref, o_a, n_out * 4);
        ck_assert_mem_eq(o_ref, o_b, n_out * 4);
        ck_assert_mem_eq(a_ref, a_a, n_acc * 4);
        ck_assert_mem_eq(a_ref, a_b, n_acc * 4);
    }
    /* Everything visible was read. */
    ck_assert_double_eq(command_d(&duo_file, "prefill_read"), 1.0);
    fx_close(&flash);
    fx_close(&duo_file);
    fx_close(&duo_none);
    free(o_ref);
    free(o_a);
    free(o_b);
    free(a_ref);
    free(a_a);
    free(a_b);
    free(path);
    attn_case_free(&c);
}
END_TEST

/* The entries of o inside the sinks and the window of a query at qpos, as their own views:
 * what a streaming head reads. */
static void window_views(const ordered *o, int32_t qpos, int32_t sink, int32_t window,
                         float *k, float *v, int32_t *pos, tsr_kv_view *views) {
    int64_t m = 0;
    for (int64_t j = 0; j < o->n; j++)
        if ((o->pos[j] < sink || o->pos[j] >= qpos - window) && o->pos[j] <= qpos) pos[m++] = o->pos[j];
    for (int32_t g = 0; g < o->n_kv_head; g++) {
        for (int64_t r = 0; r < m; r++) {
            memcpy(k + (g * m + r) * o->hd, o->k + (g * o->n + pos[r]) * o->hd, 4 * (size_t)o->hd);
            memcpy(v + (g * m + r) * o->hd, o->v + (g * o->n + pos[r]) * o->hd, 4 * (size_t)o->hd);
        }
        views[g] = o->views[g];
        views[g].n = m;
        views[g].pos = pos;
        views[g].k = k + g * m * o->hd;
        views[g].v = v + g * m * o->hd;
    }
}

/* A streaming head of a query at q reads the positions p < sink and q - window <= p <= q, as
 * flash over a view of exactly those; a retrieval head of the same call reads everything (KV
 * head 0 retrieval, 1 streaming). Prefill queries each get their own window. The streaming
 * heads' entries of a tile read in part are scored with another summation order
 * (tsr_sparse_dot16): within 2e-6 of the row's scale (measured 4.1e-7). */
START_TEST(duo_streaming_heads_read_sinks_and_window) {
    const int32_t sink = 5, window = 70, n_q = 3;
    ordered o;
    ordered_make(&o, 7, 8, 2, 32, 400);
    tsr_model_shape s = shape_of(3, 8, 2, 32);
    char *path = heads_file("heads.txt", 3, 8, 2, sink, window, "rsrsrs");
    char arg[4200];
    snprintf(arg, sizeof arg, "heads=%s", path);
    const char *kv[] = {arg, "sink=5", "window=70", NULL};
    fx duo, flash;
    attn_open(&duo, 2, "duo", kv, &s);
    attn_open(&flash, 2, "flash", NULL, &s);
    const int32_t hd = 32, nh = 8;
    float out[3 * 8 * 32], full[8 * 32], part[8 * 32];
    float *k = malloc(4 * (size_t)(2 * 400 * hd)), *v = malloc(4 * (size_t)(2 * 400 * hd));
    int32_t *pos = malloc(4 * 400);
    /* Queries at 397..399 (prefill), then 399 alone (decode). */
    ck_assert_int_eq(ordered_run(&duo, &o, 1, TSR_PHASE_PREFILL, n_q, 397, NULL, out), TSR_OK);
    for (int64_t i = 0; i < n_q; i++) {
        const float *q = o.q + i * nh * hd;
        ck_assert_int_eq(ordered_run(&flash, &o, 1, TSR_PHASE_DECODE, 1, 397 + (int32_t)i, q, full),
                         TSR_OK);
        tsr_kv_view saved[2] = {o.views[0], o.views[1]};
        window_views(&o, 397 + (int32_t)i, sink, window, k, v, pos, o.views);
        ck_assert_int_eq(o.views[0].n, sink + window + 1);
        ck_assert_int_eq(ordered_run(&flash, &o, 1, TSR_PHASE_DECODE, 1, 397 + (int32_t)i, q, part),
                         TSR_OK);
        o.views[0] = saved[0];
        o.views[1] = saved[1];
        /* Heads 0..3 read KV head 0 (retrieval), 4..7 KV head 1 (streaming). */
        ck_assert_mem_eq(out + i * nh * hd, full, 4 * 4 * (size_t)hd);
        assert_rows_close(part + 4 * hd, out + i * nh * hd + 4 * hd, 4, hd, 2e-6, "streaming");
        /* The window matters: flash over everything is elsewhere. */
        double far = 0;
        for (int32_t d = 4 * hd; d < 8 * hd; d++)
            far = fmax(far, fabs((double)full[d] - out[i * nh * hd + d]));
        ck_assert_double_gt(far, 1e-3);
    }
    /* Half the heads read everything, half sink + window + their own: 397, 398, 399 visible
     * entries, 76 read. */
    double want = (4.0 * (398 + 399 + 400) + 4.0 * 3 * (sink + window + 1)) / (8.0 * (398 + 399 + 400));
    ck_assert_double_eq_tol(command_d(&duo, "prefill_read"), want, 1e-12);
    ck_assert_double_eq(command_d(&duo, "decode_read"), 0.0);
    fx_close(&duo);
    fx_close(&flash);
    free(k);
    free(v);
    free(pos);
    free(path);
    ordered_free(&o);
}
END_TEST

/* ---- head files ------------------------------------------------------------------------------- */

typedef struct bad_heads {
    const char *text; /* the file, after the standard header unless it starts with '!' */
    const char *message;
} bad_heads;

static const bad_heads bad_heads_cases[] = {
    {"!tessera-heads 2\n", "line 1: expected 'tessera-heads 1'"},
    {"!# nothing\n", "empty; expected a head file written by tessera profile-heads"},
    {"!tessera-heads 1\nlayers 22 heads 32 kv_heads 4\n",
     "profiled on a model of 22 layers, 32 query heads and 4 KV heads; this one has 2, 4 and 2"},
    {"!tessera-heads 1\nlayers 2 heads 4\n", "line 2: expected 'layers L heads H kv_heads G'"},
    {"!tessera-heads 1\n0 0 retrieval 0.5 0.5 0.5\n", "line 2: a head before the header's"},
    {"0 0 retrieval 0.5 0.5 0.5\n0 1 streaming 0.5 0.5 0.5\n1 0 streaming 0.5 0.5 0.5\n",
     "layer 1 KV head 1 has no line"},
    {"0 0 retrieval 0.5 0.5 0.5\n0 0 streaming 0.5 0.5 0.5\n", "line 6: layer 0 KV head 0 is given twice"},
    {"0 0 fast 0.5 0.5 0.5\n", "line 5: layer 0 KV head 0: role 'fast'; expected retrieval or streaming"},
    {"0 2 retrieval 0.5 0.5 0.5\n", "line 5: expected a layer in [0, 2) and a KV head in [0, 2)"},
    {"0 0 retrieval 0.5 0.5\n", "line 5: layer 0 KV head 0: expected 3 numbers after the role"},
    {"0 0 retrieval 0.5 0.5 nan\n", "line 5: layer 0 KV head 0: expected 3 numbers after the role"},
    {"sink -1\n", "line 5: expected 'sink N' with N >= 0"},
    {"heads 4\n", "line 5: unknown record 'heads'"},
};

/* A head file that does not fit is refused at create, with one line naming the file, the line
 * and what was expected: by duo and by the streaming cache alike. */
START_TEST(head_file_refusals) {
    const bad_heads *b = &bad_heads_cases[_i];
    char *path = tsr_test_tmp_path("heads.txt");
    FILE *f = fopen(path, "w");
    if (b->text[0] == '!') fputs(b->text + 1, f);
    else fprintf(f, "tessera-heads 1\nlayers 2 heads 4 kv_heads 2\nsink 4\nwindow 8\n%s", b->text);
    fclose(f);
    char arg[4200], msg[1024], want[4400];
    snprintf(arg, sizeof arg, "heads=%s", path);
    const char *kv[] = {arg, NULL};
    tsr_model_shape s = shape_of(2, 4, 2, 16);
    ck_assert_int_eq(try_open(TSR_STAGE_ATTENTION, "attention-duo.so", "duo", kv, &s, msg,
                              sizeof msg), TSR_E_INVALID);
    snprintf(want, sizeof want, "attention: duo: heads: %s: %s", path, b->message);
    ck_assert_msg(strncmp(msg, want, strlen(want)) == 0, "got '%s', want '%s...'", msg, want);
    ck_assert_ptr_null(strchr(msg, '\n'));
    ck_assert_int_eq(try_open(TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, &s, msg,
                              sizeof msg), TSR_E_INVALID);
    snprintf(want, sizeof want, "cache: streaming: heads: %s: %s", path, b->message);
    ck_assert_msg(strncmp(msg, want, strlen(want)) == 0, "cache: got '%s'", msg);
    free(path);
}
END_TEST

START_TEST(head_file_missing) {
    const char *kv[] = {"heads=/nonexistent/heads.txt", NULL};
    tsr_model_shape s = shape_of(2, 4, 2, 16);
    char msg[1024];
    ck_assert_int_eq(try_open(TSR_STAGE_ATTENTION, "attention-duo.so", "duo", kv, &s, msg,
                              sizeof msg), TSR_E_IO);
    ck_assert_str_eq(msg, "attention: duo: heads: /nonexistent/heads.txt: cannot open: No such "
                          "file or directory");
}
END_TEST

/* ---- quest ---------------------------------------------------------------------------------- */

/* With k at least the view's pages (and in prefill, and in the dense layers whatever k), quest
 * reads every entry: flash's output bit for bit. */
START_TEST(quest_every_page_is_flash) {
    ordered o;
    ordered_make(&o, 11, 8, 2, 32, 333);
    tsr_model_shape s = shape_of(4, 8, 2, 32);
    const char *all[] = {"page=16", "k=21", NULL}, *few[] = {"page=16", "k=3", NULL};
    fx flash, quest_all, quest_few;
    attn_open(&flash, 2, "flash", NULL, &s);
    attn_open(&quest_all, 2, "quest", all, &s);
    attn_open(&quest_few, 2, "quest", few, &s);
    float a[8 * 32], b[8 * 32], c[5 * 8 * 32], d[5 * 8 * 32];
    ck_assert_int_eq(ordered_run(&flash, &o, 3, TSR_PHASE_DECODE, 1, 332, NULL, a), TSR_OK);
    ck_assert_int_eq(ordered_run(&quest_all, &o, 3, TSR_PHASE_DECODE, 1, 332, NULL, b), TSR_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    /* 21 pages of 16 cover 333 entries; 3 do not, except in layers 0 and 1. */
    ck_assert_int_eq(ordered_run(&quest_few, &o, 1, TSR_PHASE_DECODE, 1, 332, NULL, b), TSR_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    ck_assert_int_eq(ordered_run(&quest_few, &o, 3, TSR_PHASE_DECODE, 1, 332, NULL, b), TSR_OK);
    ck_assert(memcmp(a, b, sizeof a) != 0);
    /* Several queries (prefill or verification) read everything. */
    ck_assert_int_eq(ordered_run(&flash, &o, 3, TSR_PHASE_PREFILL, 5, 328, NULL, c), TSR_OK);
    ck_assert_int_eq(ordered_run(&quest_few, &o, 3, TSR_PHASE_DECODE, 5, 328, NULL, d), TSR_OK);
    ck_assert_mem_eq(c, d, sizeof c);
    ck_assert_double_eq(command_d(&quest_all, "decode_read"), 1.0);
    fx_close(&flash);
    fx_close(&quest_all);
    fx_close(&quest_few);
    ordered_free(&o);
}
END_TEST

/* One KV head and one query head of head_dim 8, pages of 2 entries, k 3; the query (1, -1) in
 * its first two dimensions and keys only there. Bounds max(q.min, q.max) summed over the two
 * dimensions:
 *   page 0: (3,3) (0,0) -> 3 + 0 = 3 (true scores 0, 0)
 *   page 1: (2,0) (2,0) -> 2 + 0 = 2 (true scores 2, 2)
 *   page 2: (0,1) (1,0) -> 1 + 0 = 1
 *   page 3: (0,-5) (-1,-1) -> 0 + 5 = 5 (true scores 5, 0)
 *   page 4: (-2,-2) (-1,0) -> -1 + 2 = 1
 *   page 5: (0,0) (0,0), the last: always read.
 * Quest reads pages 3 and 0 (the two best bounds) and 5, not page 1 although its true scores
 * are higher than page 0's. Values are one-hot by page, so out[p] is the probability on page
 * p. */
static const float quest_keys[12][2] = {{3, 3}, {0, 0},  {2, 0},   {2, 0},  {0, 1}, {1, 0},
                                        {0, -5}, {-1, -1}, {-2, -2}, {-1, 0}, {0, 0}, {0, 0}};

/* The hand-made case, room for one more entry, and quest (page 2, k 3, every layer sparse). */
typedef struct quest_hand {
    fx quest;
    float k[13 * 8], v[13 * 8], q[8], out[8], acc[13];
    int32_t pos[13], qpos;
    tsr_kv_view view;
    tsr_attention_call call;
} quest_hand;

static void quest_hand_open(quest_hand *h, bool scores) {
    tsr_model_shape s = shape_of(1, 1, 1, 8);
    const char *kv[] = {"page=2", "k=3", "dense_layers=0", NULL};
    memset(h, 0, sizeof *h);
    attn_open(&h->quest, 1, "quest", kv, &s);
    for (int j = 0; j < 12; j++) {
        h->k[j * 8] = quest_keys[j][0];
        h->k[j * 8 + 1] = quest_keys[j][1];
        h->v[j * 8 + j / 2] = 1.0f;
        h->pos[j] = j;
    }
    h->q[0] = 1.0f;
    h->q[1] = -1.0f;
    h->view = (tsr_kv_view){TSR_SIZED(tsr_kv_view), .n = 12, .pos = h->pos,
                            .dtype = TSR_DTYPE_F32, .k = h->k, .v = h->v, .k_stride = 32,
                            .v_stride = 32, .score_acc = scores ? h->acc : NULL};
    h->call = (tsr_attention_call){TSR_SIZED(tsr_attention_call), .seq_id = 3, .layer = 0,
                                   .phase = TSR_PHASE_DECODE, .n_q = 1, .q = h->q,
                                   .q_pos = &h->qpos, .scale = 0.5f, .views = &h->view,
                                   .out = h->out};
}

/* A decode step of the query at qpos. */
static void quest_hand_step(quest_hand *h, int32_t qpos) {
    h->qpos = qpos;
    ck_assert_int_eq(fx_attention_forward(&h->quest, &h->call), TSR_OK);
}

START_TEST(quest_pages_by_hand) {
    quest_hand h;
    quest_hand_open(&h, true);
    quest_hand_step(&h, 11);
    /* Scores (times 1/2): page 0: 0, 0; page 3: 2.5, 0; page 5: 0, 0. */
    double e = exp(2.5), z = e + 5.0;
    ck_assert_double_eq_tol(h.out[0], 2.0 / z, 1e-6);
    ck_assert_float_eq(h.out[1], 0.0f);
    ck_assert_float_eq(h.out[2], 0.0f);
    ck_assert_double_eq_tol(h.out[3], (e + 1.0) / z, 1e-6);
    ck_assert_float_eq(h.out[4], 0.0f);
    ck_assert_double_eq_tol(h.out[5], 2.0 / z, 1e-6);
    /* score_acc: the probability of the entries read, nothing elsewhere. */
    const double want_acc[12] = {1 / z, 1 / z, 0, 0, 0, 0, e / z, 1 / z, 0, 0, 1 / z, 1 / z};
    for (int j = 0; j < 12; j++) ck_assert_double_eq_tol(h.acc[j], want_acc[j], 1e-6);
    ck_assert_double_eq(command_d(&h.quest, "decode_read"), 0.5);

    /* A later step, at 14: a policy put positions 12 and 13 into slots 2 and 3 (page 1) with
     * keys (9, 0). The slots' positions changed, so the statistics start again from page 1,
     * whose bound 9 now ranks first; page 0 drops out. The last page (slots 10, 11) is still
     * read. */
    h.k[2 * 8] = h.k[3 * 8] = 9.0f;
    h.pos[2] = 12;
    h.pos[3] = 13;
    quest_hand_step(&h, 14);
    ck_assert_float_eq(h.out[0], 0.0f);
    ck_assert_float_gt(h.out[1], 0.5f);
    ck_assert_float_gt(h.out[3], 0.0f);
    ck_assert_float_gt(h.out[5], 0.0f);
    ck_assert_float_eq(h.out[2] + h.out[4], 0.0f);
    fx_close(&h.quest);
}
END_TEST

/* A truncation, then the token at the cut stored again with another key: the statistics
 * summarise again what the call itself stores (positions >= its first query's), though the
 * slot keeps its position. Step 2 re-stores position 11 (page 5, the last, read anyway) with
 * key (20, 0); at step 3 the view grows by position 12, page 5 is no longer the last, and its
 * bound must be 20 (the new key), not 0: pages 5 and 3 beat page 0. */
START_TEST(quest_restored_positions_are_summarised_again) {
    quest_hand h;
    quest_hand_open(&h, false);
    quest_hand_step(&h, 11);
    h.k[11 * 8] = 20.0f;
    quest_hand_step(&h, 11);
    h.pos[12] = 12;
    h.v[12 * 8 + 6] = 1.0f;
    h.view.n = 13;
    quest_hand_step(&h, 12);
    ck_assert_float_gt(h.out[5], 0.5f);
    ck_assert_float_gt(h.out[3], 0.0f);
    ck_assert_float_gt(h.out[6], 0.0f);
    ck_assert_float_eq(h.out[0], 0.0f);
    ck_assert_float_eq(h.out[1] + h.out[2] + h.out[4], 0.0f);
    fx_close(&h.quest);
}
END_TEST

/* ---- tidal ---------------------------------------------------------------------------------- */

/* With k at least the entries a query sees besides its own, every layer of a decode step reads
 * everything: flash's output bit for bit, selection and re-selection layers included. */
START_TEST(tidal_k_covering_the_view_is_flash) {
    ordered o;
    ordered_make(&o, 13, 8, 2, 16, 200);
    tsr_model_shape s = shape_of(5, 8, 2, 16);
    const char *kv[] = {"k=199", "select_layer=1", "reselect_layer=3", NULL};
    fx flash, tidal;
    attn_open(&flash, 2, "flash", NULL, &s);
    attn_open(&tidal, 2, "tidal", kv, &s);
    float a[8 * 16], b[8 * 16];
    for (int32_t layer = 0; layer < 5; layer++) {
        const float *q = o.q + layer * 8 * 16;
        ck_assert_int_eq(ordered_run(&flash, &o, layer, TSR_PHASE_DECODE, 1, 199, q, a), TSR_OK);
        ck_assert_int_eq(ordered_run(&tidal, &o, layer, TSR_PHASE_DECODE, 1, 199, q, b), TSR_OK);
        ck_assert_mem_eq(a, b, sizeof a);
    }
    ck_assert_double_eq(command_d(&tidal, "decode_read"), 1.0);
    fx_close(&flash);
    fx_close(&tidal);
    ordered_free(&o);
}
END_TEST

/* One KV head and one query head of head_dim 16, 10 entries at positions 0..9, the query at 9;
 * values one-hot by position, so out[p] is the probability on position p. select_layer 1 and
 * reselect_layer 3 of 5, k 2. The key of entry j is e_j (one-hot) and each layer's query puts
 * its weight on chosen positions: layer 1's q = 3 e_2 + 2 e_6 + e_4 + 4 e_9 ranks 2 and 6 first
 * among the others (the query's own, 9, is not a candidate: it is always read), and
 * layer 3's q = 3 e_1 + 2 e_4 + e_6 ranks 1 and 4. Layer 2, whose own query would rank 5 and 7,
 * reads 2, 6 and its own 9; layer 4 reads 1, 4 and 9. */
START_TEST(tidal_positions_by_hand) {
    tsr_model_shape s = shape_of(5, 1, 1, 16);
    const char *kv[] = {"k=2", "select_layer=1", "reselect_layer=3", NULL};
    fx tidal;
    attn_open(&tidal, 1, "tidal", kv, &s);
    float k[10 * 16] = {0}, v[10 * 16] = {0}, out[16];
    int32_t pos[10], qpos = 9;
    for (int j = 0; j < 10; j++) {
        k[j * 16 + j] = 1.0f;
        v[j * 16 + j] = 1.0f;
        pos[j] = j;
    }
    tsr_kv_view view = {TSR_SIZED(tsr_kv_view), .n = 10, .pos = pos, .dtype = TSR_DTYPE_F32,
                        .k = k, .v = v, .k_stride = 64, .v_stride = 64};
    float q[5][16] = {{0}};
    q[1][2] = 3, q[1][6] = 2, q[1][4] = 1, q[1][9] = 4;
    q[2][5] = 3, q[2][7] = 2;
    q[3][1] = 3, q[3][4] = 2, q[3][6] = 1;
    q[4][5] = 3, q[4][7] = 2;
    const int read[5][10] = {{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                             {0, 0, 1, 0, 0, 0, 1, 0, 0, 1}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                             {0, 1, 0, 0, 1, 0, 0, 0, 0, 1}};
    for (int32_t layer = 0; layer < 5; layer++) {
        tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .seq_id = 5, .layer = layer,
                                   .phase = TSR_PHASE_DECODE, .n_q = 1, .q = q[layer],
                                   .q_pos = &qpos, .scale = 1.0f, .views = &view, .out = out};
        ck_assert_int_eq(fx_attention_forward(&tidal, &call), TSR_OK);
        double z = 0;
        for (int p = 0; p < 10; p++) z += read[layer][p] ? exp(q[layer][p]) : 0.0;
        for (int p = 0; p < 10; p++)
            ck_assert_msg(fabs(out[p] - (read[layer][p] ? exp(q[layer][p]) / z : 0.0)) < 1e-6,
                          "layer %d position %d: %g", layer, p, out[p]);
    }
    /* (10 + 10 + 3 + 10 + 3) of 50. */
    ck_assert_double_eq_tol(command_d(&tidal, "decode_read"), 36.0 / 50.0, 1e-12);
    /* A step whose selection layer did not run (a new position reaching layer 2 first) reads
     * everything. */
    qpos = 8;
    view.n = 9;
    tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .seq_id = 5, .layer = 2,
                               .phase = TSR_PHASE_DECODE, .n_q = 1, .q = q[2], .q_pos = &qpos,
                               .scale = 1.0f, .views = &view, .out = out};
    ck_assert_int_eq(fx_attention_forward(&tidal, &call), TSR_OK);
    for (int p = 0; p < 9; p++) ck_assert_float_gt(out[p], 0.0f);
    fx_close(&tidal);
}
END_TEST

/* Results do not depend on the number of threads, sparse choices included. */
START_TEST(sparse_plugins_thread_independent) {
    ordered o;
    ordered_make(&o, 17, 8, 2, 32, 700);
    tsr_model_shape s = shape_of(4, 8, 2, 32);
    char *path = heads_file("heads.txt", 4, 8, 2, 4, 40, "rsrsrsrs");
    char arg[4200];
    snprintf(arg, sizeof arg, "heads=%s", path);
    const char *duo_kv[] = {arg, "sink=4", "window=40", NULL};
    const char *quest_kv[] = {"page=8", "k=9", "dense_layers=0", NULL};
    const char *tidal_kv[] = {"k=40", "select_layer=1", "reselect_layer=3", NULL};
    const char *names[] = {"duo", "quest", "tidal"};
    const char *const *kvs[] = {duo_kv, quest_kv, tidal_kv};
    float out[2][4][9 * 8 * 32];
    memset(out, 0, sizeof out);
    for (int p = 0; p < 3; p++) {
        for (int t = 0; t < 2; t++) {
            fx f;
            attn_open(&f, t ? 3 : 1, names[p], kvs[p], &s);
            ck_assert_int_eq(ordered_run(&f, &o, 0, TSR_PHASE_PREFILL, 9, 691, NULL, out[t][0]),
                             TSR_OK);
            for (int32_t layer = 1; layer < 4; layer++)
                ck_assert_int_eq(ordered_run(&f, &o, layer, TSR_PHASE_DECODE, 1, 699,
                                             o.q + layer * 8 * 32, out[t][layer]), TSR_OK);
            fx_close(&f);
        }
        ck_assert_mem_eq(out[0], out[1], sizeof out[0]);
    }
    free(path);
    ordered_free(&o);
}
END_TEST

/* ---- the top k ---------------------------------------------------------------------------- */

typedef struct ranked {
    float score;
    int64_t i;
} ranked;

static int ranked_cmp(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int index_cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The distance in units in the last place between two finite floats of the same sign. */
static int64_t ulp_distance(float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    return ia > ib ? (int64_t)ia - ib : (int64_t)ib - ia;
}

/* The softmax's exponential is within 2 ulp of libm's over its whole range, subnormal results
 * included (no jump to 0 where expf still gives a value), exact at 0, and gives 0 for -inf (a
 * masked entry's probability) and below the range, +inf above, NaN for NaN. */
START_TEST(sparse_expf_within_two_ulp_of_libm) {
    int64_t worst = 0;
    for (int i = 0; i <= 2000000; i++) {
        float x = -103.9f + (103.9f + 88.72f) * (float)i / 2000000.0f;
        int64_t d = ulp_distance(tsr_sparse_expf(x), expf(x));
        if (d > worst) worst = d;
    }
    ck_assert_int_le(worst, 2);
    ck_assert_float_eq(tsr_sparse_expf(0.0f), 1.0f);
    ck_assert_float_eq(tsr_sparse_expf(-INFINITY), 0.0f);
    ck_assert_float_eq(tsr_sparse_expf(-104.0f), 0.0f);
    ck_assert_float_eq(tsr_sparse_expf(-200.0f), 0.0f);
    ck_assert(tsr_sparse_expf(-100.0f) > 0.0f);
    ck_assert(isfinite(tsr_sparse_expf(88.72f)));
    ck_assert(isinf(tsr_sparse_expf(88.73f)) && tsr_sparse_expf(88.73f) > 0);
    ck_assert(isinf(tsr_sparse_expf(INFINITY)));
    ck_assert(isnan(tsr_sparse_expf(NAN)));
}
END_TEST

/* One online-softmax step against the same arithmetic written out one entry and one term at a
 * time: the max, the rescaling of an earlier output, each probability, the normaliser's sixteen
 * partial sums added pairwise, and the values added in entry order for every term (21 entries:
 * a whole sixteen and a rest; head dims that take the 64-, 16- and 1-wide spans); a masked
 * entry adds nothing, not even its NaN values. */
START_TEST(sparse_softmax_step_by_hand) {
    enum { N = 21, HD = 86 };
    float scores[N], rows[N][HD], o[HD], want_o[HD];
    uint64_t seed = 7;
    for (int r = 0; r < N; r++) scores[r] = 3.0f * tsr_test_rng_unit(&seed);
    scores[1] = scores[4] = scores[17] = -INFINITY; /* masked */
    scores[6] = -110.0f;                            /* seen, but e^(s - m) below float's range */
    scores[19] = 3.5f;                              /* the max, in the rest */
    for (int r = 0; r < N; r++)
        for (int d = 0; d < HD; d++)
            rows[r][d] = scores[r] == -INFINITY ? NAN : tsr_test_rng_unit(&seed);
    for (int d = 0; d < HD; d++) o[d] = want_o[d] = tsr_test_rng_unit(&seed);
    float ml[2] = {1.5f, 3.0f}, s[N];
    memcpy(s, scores, sizeof s);
    ck_assert_int_eq(tsr_sparse_softmax_step(s, N, ml, o, &rows[0][0], HD, HD), 1);

    const float m = 3.5f, alpha = tsr_sparse_expf(1.5f - m);
    float lane[16] = {0};
    for (int d = 0; d < HD; d++) want_o[d] *= alpha;
    for (int r = 0; r < N; r++) {
        float p = tsr_sparse_expf(scores[r] - m);
        ck_assert_float_eq(s[r], p);
        lane[r % 16] += p;
        if (p == 0.0f) continue;
        for (int d = 0; d < HD; d++) want_o[d] += p * rows[r][d];
    }
    for (int half = 8; half >= 1; half /= 2)
        for (int j = 0; j < half; j++) lane[j] += lane[j + half];
    ck_assert_float_eq(s[1], 0.0f);
    ck_assert_float_eq(s[6], 0.0f);
    ck_assert_float_eq(s[19], 1.0f);
    ck_assert_float_eq(ml[0], m);
    ck_assert_float_eq(ml[1], 3.0f * alpha + lane[0]);
    for (int d = 0; d < HD; d++) ck_assert_float_eq(o[d], want_o[d]);

    /* A tile that shows nothing changes nothing. */
    float none[2] = {-INFINITY, -INFINITY}, before[2] = {ml[0], ml[1]};
    ck_assert_int_eq(tsr_sparse_softmax_step(none, 2, ml, o, &rows[0][0], HD, HD), 0);
    ck_assert_float_eq(ml[0], before[0]);
    ck_assert_float_eq(ml[1], before[1]);
}
END_TEST

/* tsr_sparse_top_k picks exactly the k first of a full sort (higher score first, ties to the
 * lower index), on random scores, many ties, sorted and reversed runs, and all equal. */
START_TEST(top_k_is_the_head_of_a_sort) {
    const int64_t sizes[] = {1, 2, 5, 64, 1000, 4097};
    uint64_t rng = 5;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const int64_t n = sizes[si];
        float *score = malloc((size_t)n * sizeof *score);
        int64_t *idx = malloc((size_t)n * sizeof *idx), *want = malloc((size_t)n * sizeof *want);
        ranked *all = malloc((size_t)n * sizeof *all);
        for (int pattern = 0; pattern < 5; pattern++) {
            for (int64_t i = 0; i < n; i++) {
                float r = tsr_test_rng_unit(&rng);
                score[i] = pattern == 0 ? r
                           : pattern == 1 ? (float)(int)(r * 3.0f)
                           : pattern == 2 ? (float)i
                           : pattern == 3 ? (float)-i : 1.0f;
                all[i] = (ranked){score[i], i};
            }
            qsort(all, (size_t)n, sizeof *all, ranked_cmp);
            const int64_t ks[] = {0, 1, n / 3, n - 1, n};
            for (size_t ki = 0; ki < 5; ki++) {
                int64_t k = ks[ki] < 0 ? 0 : ks[ki];
                tsr_sparse_top_k(score, n, k, idx);
                for (int64_t i = 0; i < k; i++) want[i] = all[i].i;
                qsort(idx, (size_t)k, sizeof *idx, index_cmp);
                qsort(want, (size_t)k, sizeof *want, index_cmp);
                ck_assert_msg(memcmp(idx, want, (size_t)k * sizeof *idx) == 0,
                              "n %lld, k %lld, pattern %d", (long long)n, (long long)k, pattern);
            }

        }
        free(score);
        free(idx);
        free(want);
        free(all);
    }
}
END_TEST

/* ---- head_mass ------------------------------------------------------------------------------ */

/* One head of head_dim 4, scale 1/2, entries at positions 0..3 with keys (a_j, 0, 0, 0), a =
 * (0, 2, 0, 0), and q = (1, 0, 0, 0): scores (0, 1, 0, 0). sink 1 and stats_window 2: inside
 * p < 1 or p > q - 2. The query at 3 puts p_1 = e / (e + 3) outside; the one at 2 sees 0..2,
 * all inside. head_mass gets e / (e + 3), added to what it held. */
START_TEST(head_mass_by_hand) {
    tsr_model_shape s = shape_of(1, 1, 1, 4);
    float k[16] = {0, 0, 0, 0, 2, 0, 0, 0}, v[16] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    int32_t pos[4] = {0, 1, 2, 3}, qpos[2] = {3, 2};
    float q[8] = {1, 0, 0, 0, 1, 0, 0, 0}, out[8];
    tsr_kv_view view = {TSR_SIZED(tsr_kv_view), .n = 4, .pos = pos, .dtype = TSR_DTYPE_F32,
                        .k = k, .v = v, .k_stride = 16, .v_stride = 16};
    const char *names[] = {"reference", "flash"};
    for (int p = 0; p < 2; p++) {
        fx f;
        attn_open(&f, 1, names[p], NULL, &s);
        float mass = 0.25f;
        tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .n_q = 2, .q = q, .q_pos = qpos,
                                   .scale = 0.5f, .views = &view, .out = out, .head_mass = &mass,
                                   .stats_sink = 1, .stats_window = 2};
        ck_assert_int_eq(fx_attention_forward(&f, &call), TSR_OK);
        ck_assert_double_eq_tol(mass, 0.25 + exp(1.0) / (exp(1.0) + 3.0), 1e-6);
        fx_close(&f);
    }
}
END_TEST

/* reference and flash add the same per-head mass (within 1e-5 of each other) on random views
 * with holes and GQA, prefill and decode, every storage; asking for it does not change out. */
START_TEST(head_mass_reference_and_flash_agree) {
    const int32_t *cs = mixed_cases[_i];
    attn_case c;
    attn_case_make(&c, 90 + (uint64_t)_i, cs[0], cs[1], cs[2], cs[3], cs[4]);
    tsr_model_shape s = shape_of(2, c.n_head, c.n_kv_head, c.head_dim);
    fx ref, flash;
    attn_open(&ref, 2, "reference", NULL, &s);
    attn_open(&flash, 3, "flash", NULL, &s);
    size_t n_out = (size_t)(c.n_q * c.n_head * c.head_dim);
    float *plain = malloc(n_out * 4), *out = malloc(n_out * 4);
    for (int kind = VIEW_F32; kind <= VIEW_LOADED; kind++) {
        tsr_kv_view views[16];
        load_src srcs[16];
        attn_case_views(&c, kind, TSR_DTYPE_PLUGIN_FIRST + 7, 0, NULL, views, srcs);
        float m_ref[16] = {0}, m_flash[16] = {0};
        tsr_attention_call call = {TSR_SIZED(tsr_attention_call), .layer = 1, .n_q = c.n_q,
                                   .q = c.q, .q_pos = c.q_pos, .scale = 0.125f, .views = views,
                                   .out = plain, .stats_sink = 9, .stats_window = 20};
        ck_assert_int_eq(fx_attention_forward(&flash, &call), TSR_OK);
        call.out = out;
        call.head_mass = m_flash;
        ck_assert_int_eq(fx_attention_forward(&flash, &call), TSR_OK);
        ck_assert_mem_eq(plain, out, n_out * 4);
        call.head_mass = m_ref;
        ck_assert_int_eq(fx_attention_forward(&ref, &call), TSR_OK);
        double total = 0;
        for (int32_t h = 0; h < c.n_head; h++) {
            ck_assert_msg(fabs(m_ref[h] - m_flash[h]) <= 1e-5 * fmax(1.0, m_ref[h]),
                          "head %d: flash %g, reference %g", h, m_flash[h], m_ref[h]);
            ck_assert(m_ref[h] >= 0 && m_ref[h] <= c.n_q);
            total += m_ref[h];
        }
        /* The positions reach past sink + window: some mass lies outside. */
        ck_assert_double_gt(total, 1e-3);
    }
    fx_close(&ref);
    fx_close(&flash);
    free(plain);
    free(out);
    attn_case_free(&c);
}
END_TEST

/* ---- the streaming cache's head file ---------------------------------------------------------- */

static tsr_status stream_store(fx *f, int32_t layer, int32_t p, int32_t n_kv, int32_t hd) {
    float k[8 * 64], v[8 * 64];
    for (int32_t g = 0; g < n_kv; g++)
        for (int32_t d = 0; d < hd; d++) {
            k[g * hd + d] = (float)(p * 100 + g * 10 + d);
            v[g * hd + d] = -(float)(p * 100 + g * 10 + d);
        }
    tsr_kv_write w = {TSR_SIZED(tsr_kv_write), .seq_id = 0, .layer = layer,
                      .phase = p ? TSR_PHASE_DECODE : TSR_PHASE_PREFILL, .n = 1, .pos = &p,
                      .k = k, .v = v};
    const tsr_cache_vtable *vt = f->vt;
    return vt->store(f->inst->self, &w);
}

/* With a head file, retrieval heads keep every position and streaming heads the sinks and the
 * window (as the cache does without one); each head's rows read back as stored; memory counts
 * what each head keeps; a truncation into what a streaming head dropped is refused naming the
 * layer and KV head. */
START_TEST(streaming_cache_keeps_retrieval_heads_whole) {
    const int32_t n_kv = 2, hd = 16, sink = 3, window = 10, n = 60;
    tsr_model_shape s = shape_of(2, 4, n_kv, hd);
    char *path = heads_file("heads.txt", 2, 4, n_kv, sink, window, "rssr");
    char arg[4200];
    snprintf(arg, sizeof arg, "heads=%s", path);
    const char *kv[] = {arg, "sink=3", "window=10", NULL};
    fx f;
    fx_open(&f, 1, TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, &s);
    const tsr_cache_vtable *vt = f.vt;
    ck_assert_int_eq(vt->seq_begin(f.inst->self, 0), TSR_OK);
    for (int32_t p = 0; p < n; p++)
        for (int32_t layer = 0; layer < 2; layer++)
            ck_assert_int_eq(stream_store(&f, layer, p, n_kv, hd), TSR_OK);
    const char *roles = "rssr";
    for (int32_t layer = 0; layer < 2; layer++) {
        tsr_kv_view views[2];
        ck_assert_int_eq(vt->view(f.inst->self, 0, layer, TSR_PHASE_DECODE, views), TSR_OK);
        for (int32_t g = 0; g < n_kv; g++) {
            const tsr_kv_view *v = &views[g];
            int retrieval = roles[layer * n_kv + g] == 'r';
            ck_assert_int_eq(v->n, retrieval ? n : sink + window + 1);
            char seen[60] = {0};
            for (int64_t j = 0; j < v->n; j++) {
                int32_t p = v->pos[j];
                ck_assert(retrieval || p < sink || p >= n - 1 - window);
                ck_assert(!seen[p]);
                seen[p] = 1;
                const float *krow = (const float *)((const char *)v->k + j * v->k_stride);
                const float *vrow = (const float *)((const char *)v->v + j * v->v_stride);
                for (int32_t d = 0; d < hd; d++) {
                    ck_assert_float_eq(krow[d], (float)(p * 100 + g * 10 + d));
                    ck_assert_float_eq(vrow[d], -(float)(p * 100 + g * 10 + d));
                }
            }
        }
    }
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    vt->stats(f.inst->self, &st);
    ck_assert_int_eq(st.entries, 2 * n + 2 * (sink + window + 1));
    ck_assert_int_eq(st.evicted, 2 * (n - sink - window - 1));
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 20), TSR_E_UNSUPPORTED);
    ck_assert_str_eq(fx_error(&f), "seq_truncate: sequence 0: layer 0 KV head 1 already evicted "
                     "position 48 >= 20; this policy cannot bring it back");
    ck_assert_int_eq(vt->seq_truncate(f.inst->self, 0, 55), TSR_OK);
    vt->seq_end(f.inst->self, 0);
    fx_close(&f);
    free(path);
}
END_TEST

/* ---- on stories260K ------------------------------------------------------------------------- */

typedef tsr_test_pipeline run;

/* The logits of `n` tokens fed one forward each (a prefill of one, then decode steps); the
 * cache statistics before the sequence ends into *stats when not NULL. */
static float *stepwise_logits(run *r, const int32_t *tokens, int n, tsr_cache_stats *stats) {
    int32_t nv = r->model->hp.n_vocab;
    float *logits = malloc((size_t)n * (size_t)nv * sizeof *logits);
    tsr_error err;
    ck_assert_int_ge(tsr_pipeline_seq_begin(r->pl, 0, &err), 0);
    for (int i = 0; i < n; i++) {
        tsr_batch_entry b = {.seq_id = 0, .pos = i, .token = tokens[i], .want_logits = 1};
        if (tsr_pipeline_forward(r->pl, &b, 1, logits + (size_t)i * (size_t)nv, &err) < 0)
            ck_abort_msg("%s", err.msg);
    }
    if (stats) ck_assert_int_eq(tsr_pipeline_cache_stats(r->pl, stats), 1);
    tsr_pipeline_seq_end(r->pl, 0);
    return logits;
}

/* Text tokens of the shared TinyStories file, as ids (n of them). */
static int32_t *story_tokens(int n) {
    char *path = tsr_test_data("models/stories260K.greedy.lily.ids.txt");
    char *text = tsr_test_read_file(path, NULL);
    free(path);
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    char *p = text;
    for (int i = 0; i < n; i++) ids[i] = (int32_t)strtol(p, &p, 10);
    free(text);
    return ids;
}

static float *model_logits(const char *yaml, const int32_t *ids, int n, bool stepwise) {
    run r;
    char *model = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, model, yaml, 512);
    float *l = stepwise ? stepwise_logits(&r, ids, n, NULL) : tsr_test_pipeline_logits(&r, ids, n);
    tsr_test_pipeline_close(&r);
    free(model);
    return l;
}

static double max_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

#define YAML(attention, cache)                                                              \
    "tessera: 1\nbackend: { plugin: cpu, threads: 2 }\nattention: " attention "\ncache: " \
    cache "\ndecoder: { plugin: greedy }\n"

/* The defining properties on a real model, 200 tokens one step at a time and as one prompt:
 * duo with every head a retrieval head, quest with k covering the pages and tidal with k
 * covering the context give flash's logits bit for bit. */
START_TEST(model_budgets_covering_the_context_are_flash) {
    const int n = 200;
    int32_t *ids = story_tokens(n);
    char *path = heads_file("heads.txt", 5, 8, 4, 4, 252, "rrrrrrrrrrrrrrrrrrrr");
    char duo[4400];
    snprintf(duo, sizeof duo, YAML("{ plugin: duo, heads: %s }", "{ plugin: full }"), path);
    const char *others[] = {duo, YAML("{ plugin: quest, page: 16, k: 13 }", "{ plugin: full }"),
                            YAML("{ plugin: tidal, k: 199 }", "{ plugin: full }")};
    for (int stepwise = 0; stepwise < 2; stepwise++) {
        float *flash = model_logits(YAML("{ plugin: flash }", "{ plugin: full }"), ids, n, stepwise);
        for (int p = 0; p < 3; p++) {
            float *l = model_logits(others[p], ids, n, stepwise);
            ck_assert_msg(memcmp(flash, l, (size_t)n * 512 * sizeof(float)) == 0,
                          "%s (stepwise %d): max diff %g", others[p], stepwise,
                          max_diff(flash, l, (size_t)n * 512));
            free(l);
        }
        free(flash);
    }
    /* Below the budget the plugins read less, and the logits move. */
    float *flash = model_logits(YAML("{ plugin: flash }", "{ plugin: full }"), ids, n, true);
    const char *small[] = {YAML("{ plugin: quest, page: 4, k: 3, dense_layers: 0 }", "{ plugin: full }"),
                           YAML("{ plugin: tidal, k: 8, select_layer: 0 }", "{ plugin: full }")};
    for (int p = 0; p < 2; p++) {
        float *l = model_logits(small[p], ids, n, true);
        ck_assert_double_gt(max_diff(flash, l, (size_t)n * 512), 1e-3);
        free(l);
    }
    free(flash);
    free(path);
    free(ids);
}
END_TEST

/* Every head a streaming head (sink 4, window 32) over the full cache reads, in decode, exactly
 * the entries the streaming cache of that sink and window keeps: duo's logits are flash's over
 * that cache but for rounding, as the entries come in another order (the cache refills evicted
 * slots) and the tiles read in part add their products in another order: measured 8.1e-6. And
 * duo's heads read the same from the streaming cache given the same head file, which keeps
 * retrieval heads whole and streaming heads short: measured 8.6e-6, with the memory worked out
 * below. The tolerance, 3e-5, is stories260K's for flash against llama.cpp (test-models). */
START_TEST(model_streaming_heads_are_the_streaming_cache) {
    const int n = 200;
    int32_t *ids = story_tokens(n);
    char *all_s = heads_file("streaming.txt", 5, 8, 4, 4, 32, "ssssssssssssssssssss");
    char *mixed = heads_file("mixed.txt", 5, 8, 4, 4, 32, "rssrsrsssssrrsssrsss");
    char duo[4400], duo_mixed[4400], duo_mixed_cache[9000];
    snprintf(duo, sizeof duo, YAML("{ plugin: duo, heads: %s, sink: 4, window: 32 }",
                                   "{ plugin: full }"), all_s);
    float *a = model_logits(duo, ids, n, true);
    float *b = model_logits(YAML("{ plugin: flash }", "{ plugin: streaming, sink: 4, window: 32 }"),
                            ids, n, true);
    double diff = max_diff(a, b, (size_t)n * 512);
    ck_assert_msg(diff <= 3e-5, "duo streaming vs flash over streaming: %g", diff);
    free(a);
    free(b);
    snprintf(duo_mixed, sizeof duo_mixed, YAML("{ plugin: duo, heads: %s, sink: 4, window: 32 }",
                                               "{ plugin: full }"), mixed);
    snprintf(duo_mixed_cache, sizeof duo_mixed_cache,
             YAML("{ plugin: duo, heads: %s, sink: 4, window: 32 }",
                  "{ plugin: streaming, heads: %s, sink: 4, window: 32 }"), mixed, mixed);
    a = model_logits(duo_mixed, ids, n, true);
    b = model_logits(duo_mixed_cache, ids, n, true);
    diff = max_diff(a, b, (size_t)n * 512);
    ck_assert_msg(diff <= 3e-5, "duo over full vs over streaming with heads: %g", diff);
    free(a);
    free(b);
    /* Memory: the 6 retrieval heads of the file keep all 200 rows, the 14 others 4 + 32 + 1. */
    run r;
    char *model = tsr_test_data("models/stories260K.gguf");
    tsr_test_pipeline_open_ok(&r, model, duo_mixed_cache, 512);
    tsr_cache_stats st = {TSR_SIZED(tsr_cache_stats)};
    free(stepwise_logits(&r, ids, n, &st));
    ck_assert_int_eq(st.entries, 6 * n + 14 * 37);
    ck_assert_int_eq(st.evicted, 14 * (n - 37));
    tsr_test_pipeline_close(&r);
    free(model);
    free(all_s);
    free(mixed);
    free(ids);
}
END_TEST

/* ---- tessera profile-heads -------------------------------------------------------------------- */

/* The command's head file loads into duo and the streaming cache for the model it profiled:
 * run with it works, --retrieval 1 gives flash's text, 0.25 makes 5 of 20 heads retrieval
 * heads, and --json says the same. */
START_TEST(profile_heads_round_trip) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *text = tsr_test_data("data/tinystories_val.txt");
    char *out_path = tsr_test_tmp_path("heads.txt");
    char *out, *err;
    const char *args[] = {"profile-heads", "-m", model, "-f", text, "--sink", "4", "--window",
                          "32", "--ctx", "128", "--chunks", "4", "--retrieval", "0.25",
                          "--out", out_path, NULL};
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    ck_assert_str_eq(out, "");
    ck_assert_ptr_nonnull(strstr(err, "5 layers x 4 KV heads over 364 queries: 5 retrieval heads"));
    free(out);
    free(err);
    char *file = tsr_test_read_file(out_path, NULL);
    int n_retrieval = 0, n_streaming = 0;
    double lowest_retrieval = INFINITY, highest_streaming = -INFINITY;
    for (char *line = file; *line; line = strchr(line, '\n') + 1) {
        int layer, g;
        char role[16];
        double score;
        if (sscanf(line, "%d %d %15s %lf", &layer, &g, role, &score) != 4) continue;
        if (strcmp(role, "retrieval") == 0) {
            n_retrieval++;
            lowest_retrieval = fmin(lowest_retrieval, score);
        } else {
            n_streaming++;
            highest_streaming = fmax(highest_streaming, score);
        }
    }
    ck_assert_int_eq(n_retrieval, 5);
    ck_assert_int_eq(n_streaming, 15);
    /* The retrieval heads are those of highest score. */
    ck_assert_double_gt(lowest_retrieval, highest_streaming);
    ck_assert_ptr_nonnull(strstr(file, "tessera-heads 1\nlayers 5 heads 8 kv_heads 4\nsink 4\n"
                                       "window 32\n"));
    free(file);
    /* Into the plugins. */
    tsr_model_shape s = shape_of(5, 8, 4, 8);
    char arg[4200];
    snprintf(arg, sizeof arg, "heads=%s", out_path);
    const char *kv[] = {arg, "sink=4", "window=32", NULL};
    fx duo, cache;
    attn_open(&duo, 1, "duo", kv, &s);
    fx_open(&cache, 1, TSR_STAGE_CACHE, "cache-streaming.so", "streaming", kv, &s);
    fx_close(&duo);
    fx_close(&cache);
    char set_heads[4200], set_cache[4200];
    snprintf(set_heads, sizeof set_heads, "attention.heads=%s", out_path);
    snprintf(set_cache, sizeof set_cache, "cache.heads=%s", out_path);
    const char *run_args[] = {"run", "-m", model, "-p", "Once upon a time", "-n", "30",
                              "--temperature", "0", "--set", "attention.plugin=duo", "--set",
                              set_heads, "--set", "attention.window=32", "--set",
                              "cache.plugin=streaming", "--set", set_cache, "--set",
                              "cache.window=32", NULL};
    status = tsr_test_tessera(&out, &err, run_args);
    ck_assert_msg(status == 0, "exit %d: %s", status, err);
    ck_assert_ptr_nonnull(strstr(out, "Once upon a time"));
    free(out);
    free(err);
    /* Every head a retrieval head: flash's text. */
    const char *all_args[] = {"profile-heads", "-m", model, "-f", text, "--ctx", "300",
                              "--chunks", "1", "--retrieval", "1", "--out", out_path, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, NULL, all_args), 0);
    char *flash_text, *duo_text;
    const char *flash_run[] = {"run", "-m", model, "-p", "Lily", "-n", "60", "--temperature",
                               "0", NULL};
    const char *duo_run[] = {"run", "-m", model, "-p", "Lily", "-n", "60", "--temperature", "0",
                             "--set", "attention.plugin=duo", "--set", set_heads, NULL};
    ck_assert_int_eq(tsr_test_tessera(&flash_text, NULL, flash_run), 0);
    ck_assert_int_eq(tsr_test_tessera(&duo_text, NULL, duo_run), 0);
    ck_assert_str_eq(flash_text, duo_text);
    free(flash_text);
    free(duo_text);
    /* --json */
    const char *json_args[] = {"profile-heads", "-m", model, "-f", text, "--window", "32",
                               "--ctx", "128", "--chunks", "4", "--retrieval", "0.25", "--json",
                               NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, json_args), 0);
    ck_assert_ptr_nonnull(strstr(out, "\"queries\": 364"));
    ck_assert_ptr_nonnull(strstr(out, "\"retrieval_heads\": 5"));
    int n_heads = 0;
    for (char *p = out; (p = strstr(p, "\"kv_head\"")); p++) n_heads++;
    ck_assert_int_eq(n_heads, 20);
    free(out);
    free(out_path);
    free(model);
    free(text);
}
END_TEST

/* The command's scores are the per-head mass the pipeline measures (tsr_pipeline_profile_heads
 * with the ABI's window, which counts the query's own position: --window + 1), divided by the
 * queries that have positions outside: one chunk of 128 tokens, sink 4, window 32, 91 queries.
 * Checked against the library run the same way, for every query head. */
START_TEST(profile_heads_scores_are_head_mass) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *story = tsr_test_data("data/tinystories_val.txt");
    size_t size;
    char *text = tsr_test_read_file(story, &size);
    char *short_text = tsr_test_tmp_path("story.txt");
    ck_assert_int_eq(tsr_test_write_file(short_text, text, 3000), 0);
    char *out;
    const char *args[] = {"profile-heads", "-m", model, "-f", short_text, "--window", "32",
                          "--ctx", "128", "--chunks", "1", "--json", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, NULL, args), 0);
    json_error_t jerr;
    json_t *root = json_loads(out, 0, &jerr);
    ck_assert_ptr_nonnull(root);
    ck_assert_int_eq(json_integer_value(json_object_get(root, "queries")), 91);

    run r;
    tsr_test_pipeline_open_ok(&r, model,
                              "tessera: 1\nattention: { plugin: flash }\ncache: { plugin: full }\n",
                              128);
    tsr_tokenizer *tok;
    tsr_error err;
    int32_t *ids;
    size_t n_ids;
    ck_assert_int_eq(tsr_tokenizer_from_gguf(r.model->file, &tok, &err), TSR_OK);
    ck_assert_int_eq(tsr_tokenize(tok, text, 3000, true, false, &ids, &n_ids, &err), TSR_OK);
    ck_assert_uint_ge(n_ids, 128);
    float mass[5 * 8] = {0};
    tsr_pipeline_profile_heads(r.pl, mass, 4, 33);
    free(tsr_test_pipeline_logits(&r, ids, 128));
    json_t *heads = json_object_get(root, "heads");
    ck_assert_int_eq(json_array_size(heads), 20);
    for (size_t u = 0; u < 20; u++) {
        json_t *head = json_array_get(heads, u);
        json_t *q = json_object_get(head, "query_heads");
        for (size_t hg = 0; hg < 2; hg++)
            ck_assert_double_eq(json_real_value(json_array_get(q, hg)),
                                (double)mass[u * 2 + hg] / 91.0);
        /* A KV head scores its query heads' largest. */
        ck_assert_double_eq(json_real_value(json_object_get(head, "score")),
                            fmax(mass[u * 2], mass[u * 2 + 1]) / 91.0);
    }
    json_decref(root);
    free(ids);
    tsr_tokenizer_free(tok);
    tsr_test_pipeline_close(&r);
    free(out);
    free(text);
    free(short_text);
    free(story);
    free(model);
}
END_TEST

typedef struct cli_refusal {
    const char *args[16]; /* after "profile-heads -m MODEL -f TEXT"; "@" stands for a tmp path */
    int status;
    const char *message;
} cli_refusal;

static const cli_refusal refusals[] = {
    {{"--set", "attention.plugin=duo", NULL}, 1,
     "tessera: attention plugin 'duo' added nothing to the per-head statistics "
     "(tsr_attention_call.head_mass): it does not measure them; profile with reference or flash "
     "(--set attention.plugin=flash)\n"},
    {{"--ctx", "64", "--window", "60", NULL}, 1, "chunks of 64 tokens leave no query positions "
     "beyond the 4 sinks and the 60-position window; give a longer text, a larger --ctx or a "
     "smaller --window\n"},
    {{"--retrieval", "1.5", NULL}, 2,
     "tessera: profile-heads: --retrieval: expected a number in [0, 1], got '1.5'\n"},
    {{"--window", "0", NULL}, 2,
     "tessera: profile-heads: --window: expected an integer in [1, 1048576], got '0'\n"},
    {{"--out", "/", NULL}, 1, "tessera: /: is a folder; expected a file name\n"},
};

/* stderr's last line ends with `message`, and any line before it is the progress line of the
 * chunks. */
static void assert_error_line(const char *err, const char *message) {
    size_t n = strlen(err), m = strlen(message);
    ck_assert_msg(n >= m && strcmp(err + n - m, message) == 0, "got '%s'", err);
    const char *last = err + n - 1;
    while (last > err && last[-1] != '\n') last--;
    for (const char *line = err; line < last; line = strchr(line, '\n') + 1)
        ck_assert_msg(strncmp(line, "tessera: profile-heads: ", 24) == 0 &&
                          strstr(line, " chunks, ") < strchr(line, '\n'),
                      "a line besides the error: '%s'", err);
}

/* Bad input gets one error line and a non-zero exit. */
START_TEST(profile_heads_refusals) {
    const cli_refusal *c = &refusals[_i];
    char *model = tsr_test_data("models/stories260K.gguf");
    char *text = tsr_test_data("data/tinystories_val.txt");
    const char *args[24] = {"profile-heads", "-m", model, "-f", text, "--chunks", "1"};
    int n = 7;
    for (int i = 0; c->args[i]; i++) args[n++] = c->args[i];
    args[n] = NULL;
    char *out, *err;
    int status = tsr_test_tessera(&out, &err, args);
    ck_assert_int_eq(status, c->status);
    ck_assert_str_eq(out, "");
    assert_error_line(err, c->message);
    free(out);
    free(err);
    free(model);
    free(text);
}
END_TEST

START_TEST(profile_heads_needs_a_text) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *err;
    const char *args[] = {"profile-heads", "-m", model, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 2);
    ck_assert_str_eq(err, "tessera: profile-heads: -f TEXT is required (see tessera profile-heads "
                          "--help)\n");
    free(err);
    free(model);
}
END_TEST

/* A run with a head file duo cannot use fails with the plugin's line. */
START_TEST(run_with_a_head_file_of_another_model) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char roles[88];
    memset(roles, 'r', sizeof roles);
    char *path = heads_file("heads.txt", 22, 32, 4, 4, 252, roles);
    char set[4200], *err;
    snprintf(set, sizeof set, "attention.heads=%s", path);
    const char *args[] = {"run", "-m", model, "-n", "4", "--set", "attention.plugin=duo",
                          "--set", set, NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, args), 1);
    ck_assert_ptr_nonnull(strstr(err, "profiled on a model of 22 layers, 32 query heads and 4 KV "
                                      "heads; this one has 5, 8 and 4"));
    ck_assert_ptr_eq(strchr(err, '\n'), err + strlen(err) - 1);
    free(err);
    free(path);
    free(model);
}
END_TEST

/* bench -d: decode timed after a prompt of DEPTH tokens; the JSON says the depth, the table
 * names the test "tgN @ dDEPTH", a negative depth is a usage error. */
START_TEST(bench_decodes_at_a_depth) {
    char *model = tsr_test_data("models/stories260K.gguf");
    char *out, *err;
    const char *json_args[] = {"bench", "-m", model, "-p", "4", "-n", "3", "-d", "40", "-r", "1",
                               "--bandwidth-mib", "1", "--json", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, json_args), 0);
    ck_assert_ptr_nonnull(strstr(out, "\"n_depth\": 40"));
    ck_assert_ptr_nonnull(strstr(out, "\"n_gen\": 3"));
    free(out);
    free(err);
    const char *table_args[] = {"bench", "-m", model, "-p", "4", "-n", "3", "--depth", "40", "-r",
                                "1", "--bandwidth-mib", "1", NULL};
    ck_assert_int_eq(tsr_test_tessera(&out, &err, table_args), 0);
    ck_assert_ptr_nonnull(strstr(out, "| tg3 @ d40 |"));
    free(out);
    free(err);
    const char *bad_args[] = {"bench", "-m", model, "-d", "-1", NULL};
    ck_assert_int_eq(tsr_test_tessera(NULL, &err, bad_args), 2);
    ck_assert_str_eq(err, "tessera: bench: -d: expected an integer in [0, 2147483645], got '-1'\n");
    free(err);
    free(model);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sparse-attention");
    TCase *plugins = tcase_create("plugins");
    tcase_set_timeout(plugins, 120);
    tcase_add_loop_test(plugins, duo_retrieval_heads_are_flash, 0, N_MIXED);
    tcase_add_test(plugins, duo_streaming_heads_read_sinks_and_window);
    tcase_add_loop_test(plugins, head_file_refusals, 0,
                        (int)(sizeof bad_heads_cases / sizeof bad_heads_cases[0]));
    tcase_add_test(plugins, head_file_missing);
    tcase_add_test(plugins, quest_every_page_is_flash);
    tcase_add_test(plugins, quest_pages_by_hand);
    tcase_add_test(plugins, quest_restored_positions_are_summarised_again);
    tcase_add_test(plugins, tidal_k_covering_the_view_is_flash);
    tcase_add_test(plugins, tidal_positions_by_hand);
    tcase_add_test(plugins, sparse_plugins_thread_independent);
    tcase_add_test(plugins, top_k_is_the_head_of_a_sort);
    tcase_add_test(plugins, sparse_expf_within_two_ulp_of_libm);
    tcase_add_test(plugins, sparse_softmax_step_by_hand);
    tcase_add_test(plugins, head_mass_by_hand);
    tcase_add_loop_test(plugins, head_mass_reference_and_flash_agree, 0, N_MIXED);
    tcase_add_test(plugins, streaming_cache_keeps_retrieval_heads_whole);
    suite_add_tcase(s, plugins);
    /* The model and program cases need the shared data folder. */
    char *probe = tsr_test_data_path("models/stories260K.gguf");
    if (probe) {
        TCase *model = tcase_create("stories260K");
        tcase_set_timeout(model, 600);
        tcase_add_test(model, model_budgets_covering_the_context_are_flash);
        tcase_add_test(model, model_streaming_heads_are_the_streaming_cache);
        tcase_add_test(model, profile_heads_round_trip);
        tcase_add_test(model, profile_heads_scores_are_head_mass);
        tcase_add_loop_test(model, profile_heads_refusals, 0,
                            (int)(sizeof refusals / sizeof refusals[0]));
        tcase_add_test(model, profile_heads_needs_a_text);
        tcase_add_test(model, run_with_a_head_file_of_another_model);
        tcase_add_test(model, bench_decodes_at_a_depth);
        suite_add_tcase(s, model);
    } else {
        printf("skipped: the model cases (shared data folder missing)\n");
    }
    free(probe);
    return tsr_test_run_suite(s);
}
