/*
 * tessera-plugin-test PLUGIN.so [--verbose]
 *
 * Checks every plugin of one object against the rules of abi/CONTRACT.md that can be checked
 * without a model: the descriptor and its parameter table, creation with default and edge
 * parameters, memory accounting over repeated create/destroy, the commands, and the invariants
 * of each stage on small synthetic data (the cache policy's store/view round trip, attention
 * against a reference softmax attention, a decoder against a fake model, router outputs,
 * backend ops against scalar formulas, a quantizer's reconstruction error).
 *
 * Prints one line per check, "PASS plugin/check" or "FAIL plugin/check: why", then
 * "N passed, N failed"; exits 1 when a check failed, 2 on a usage error. Each check runs in a
 * child process with a time limit, so a plugin that crashes or hangs fails that check alone.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/common.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>
#include <tessera/sdk_kv.h>

#include "plugin/commands.h"
#include "config/config.h"
#include "plugin/host_services.h"
#include "plugin/loader.h"
#include "config/params.h"
#include "plugin/pool.h"
#include "plugin/stage_init.h"

#define CHECK_TIMEOUT_S 60
#define N_CYCLES 50
#define RUNNER "tessera-plugin-test"

/* Whether an optional slot lies within the table the plugin was built with and is set. */
#define VT_HAS(vt, field) \
    ((vt)->struct_size >= offsetof(__typeof__(*(vt)), field) + sizeof((vt)->field) && (vt)->field)

/* ---- check results ------------------------------------------------------------------------ */

/* What one check found; written by the child process through a pipe. */
typedef struct check {
    int failed;
    char why[768];
    char notes[2048];
} check;

static void fail(check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(check *c, const char *fmt, ...) {
    if (c->failed) return; /* the first failure is the one worth reading */
    c->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->why, sizeof c->why, fmt, ap);
    va_end(ap);
}

static void note(check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(check *c, const char *fmt, ...) {
    size_t used = strlen(c->notes);
    if (used + 8 >= sizeof c->notes) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->notes + used, sizeof c->notes - used - 1, fmt, ap);
    va_end(ap);
    strcat(c->notes, "\n");
}

typedef struct runner {
    const char *path;
    const tsr_plugin_ref *ref;
    tsr_model_shape shape;
    bool verbose;
    int n_pass, n_fail;
} runner;

typedef void (*check_fn)(const runner *r, check *c);

static void report(runner *r, const char *name, const check *c) {
    const char *plugin = r->ref ? r->ref->desc->name : NULL;
    if (c->failed) {
        r->n_fail++;
        printf("FAIL %s%s%s: %s\n", plugin ? plugin : "", plugin ? "/" : "", name, c->why);
    } else {
        r->n_pass++;
        printf("PASS %s%s%s\n", plugin ? plugin : "", plugin ? "/" : "", name);
    }
    if (r->verbose && c->notes[0]) {
        const char *p = c->notes;
        while (*p) {
            const char *nl = strchr(p, '\n');
            int len = nl ? (int)(nl - p) : (int)strlen(p);
            printf("    %.*s\n", len, p);
            p += len + (nl != NULL);
        }
    }
    fflush(stdout);
}

/* Runs fn in a child process so that a crash, an abort or a hang fails this check only.
 * Returns whether the child finished and reported (passed or not). */
static bool run_check(runner *r, const char *name, check_fn fn) {
    check c = {0};
    int fd[2];
    fflush(stdout);
    fflush(stderr);
    if (pipe(fd) != 0) {
        fail(&c, "pipe: %s", strerror(errno));
        report(r, name, &c);
        return false;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fail(&c, "fork: %s", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        report(r, name, &c);
        return false;
    }
    if (pid == 0) {
        close(fd[0]);
        alarm(CHECK_TIMEOUT_S);
        fn(r, &c);
        const char *p = (const char *)&c;
        size_t left = sizeof c;
        while (left) {
            ssize_t n = write(fd[1], p, left);
            if (n <= 0) _exit(3);
            p += n;
            left -= (size_t)n;
        }
        /* _exit: the child shares the parent's stdio buffers and must not run atexit work. */
        _exit(0);
    }
    close(fd[1]);
    size_t got = 0;
    while (got < sizeof c) {
        ssize_t n = read(fd[0], (char *)&c + got, sizeof c - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) continue;
    bool completed = false;
    if (WIFSIGNALED(status)) {
        memset(&c, 0, sizeof c);
        int sig = WTERMSIG(status);
        if (sig == SIGALRM)
            fail(&c, "did not finish within %d s", CHECK_TIMEOUT_S);
        else
            fail(&c, "crashed: signal %d (%s)", sig, strsignal(sig));
    } else if (got != sizeof c || WEXITSTATUS(status) != 0) {
        memset(&c, 0, sizeof c);
        fail(&c, "the check process exited with status %d before reporting (a plugin called "
                 "exit(), or a sanitizer stopped it: see stderr)", WEXITSTATUS(status));
    } else {
        completed = true;
    }
    report(r, name, &c);
    return completed;
}

/* ---- small utilities ------------------------------------------------------------------- */

/* xorshift64*: reproducible test data, the same on every machine. */
static float rng_uniform(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    uint64_t x = *s * 2685821657736338717ull;
    return (float)((double)(x >> 40) / (double)(1ull << 24) * 2.0 - 1.0); /* [-1, 1) */
}

static void fill_random(float *x, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) x[i] = rng_uniform(s);
}

static bool all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return false;
    return true;
}

/* Largest |a - b| beyond the tolerance abs_tol + rel_tol*|b|, as an index (or -1). */
static long first_mismatch(const float *a, const double *b, size_t n, double abs_tol,
                           double rel_tol) {
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)a[i] - b[i]) <= abs_tol + rel_tol * fabs(b[i]))) return (long)i;
    return -1;
}

static double rel_rmse(const float *x, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* ---- parameter sets -------------------------------------------------------------------- */

#define MAX_KV 64

/* Parameter values as text, as a config file would give them. */
typedef struct kvset {
    tsr_kv_text kv[MAX_KV];
    char keys[MAX_KV][72];
    char vals[MAX_KV][96];
    size_t n;
} kvset;

static void kvset_put(kvset *s, const char *key, const char *value) {
    size_t i = 0;
    while (i < s->n && strcmp(s->keys[i], key) != 0) i++;
    if (i == MAX_KV) return;
    if (i == s->n) s->n++;
    snprintf(s->keys[i], sizeof s->keys[i], "%s", key);
    snprintf(s->vals[i], sizeof s->vals[i], "%s", value);
    for (size_t j = 0; j < s->n; j++)
        s->kv[j] = (tsr_kv_text){.key = s->keys[j], .value = s->vals[j],
                                 .loc = {RUNNER, 0, 0}};
}

static bool param_bounded(const tsr_param_def *d) { return d->min <= d->max; }

/* A value for a parameter that has no default (required): the plugin must accept some value,
 * and the smallest one allowed is the natural pick. */
static void required_value(const tsr_param_def *d, char *buf, size_t size) {
    switch (d->type) {
    case TSR_PARAM_BOOL: snprintf(buf, size, "false"); break;
    case TSR_PARAM_INT: snprintf(buf, size, "%lld", param_bounded(d) ? (long long)d->min : 0LL);
        break;
    case TSR_PARAM_FLOAT: snprintf(buf, size, "%.17g", param_bounded(d) ? d->min : 0.0); break;
    case TSR_PARAM_ENUM: snprintf(buf, size, "%s", d->choices[0]); break;
    default: snprintf(buf, size, "x"); break;
    }
}

/* The values every instance of the runner starts from: defaults, plus the required ones. */
static void base_params(const tsr_plugin_desc *d, kvset *s) {
    memset(s, 0, sizeof *s);
    for (uint32_t i = 0; i < d->n_params; i++) {
        if (d->params[i].default_value) continue;
        char buf[96];
        required_value(&d->params[i], buf, sizeof buf);
        kvset_put(s, d->params[i].name, buf);
    }
}

/* ---- instances ------------------------------------------------------------------------- */

typedef struct live {
    tsr_bound_params bound;
    tsr_instance *inst;
    tsr_pool *pool;
    tsr_stage_init init_storage;
} live;

/* Binds `kv` and creates an instance on the synthetic shape. Negative status with the reason
 * in err when binding or create fails. */
static tsr_status live_open(const runner *r, const kvset *kv, live *l, tsr_error *err) {
    const tsr_plugin_desc *d = r->ref->desc;
    memset(l, 0, sizeof *l);
    tsr_status st = tsr_params_bind(d->params, d->n_params, d->name, tsr_stage_name(d->stage),
                                    (tsr_src_loc){RUNNER, 0, 0}, kv->kv, kv->n, &l->bound, err);
    if (st < 0) return st;
    l->pool = tsr_pool_create(r->shape.n_threads);
    const void *init = tsr_stage_init_fill(d->stage, &r->shape, &l->init_storage);
    st = tsr_instance_create(r->ref, l->pool, &l->bound.params, init, &l->inst, err);
    if (st < 0) {
        tsr_bound_params_free(&l->bound);
        tsr_pool_free(l->pool);
        l->inst = NULL;
    }
    return st;
}

/* Destroys the instance; the bytes it still held through tsr_host.alloc. */
static size_t live_close(live *l) {
    size_t leaked = tsr_instance_destroy(l->inst);
    tsr_bound_params_free(&l->bound);
    tsr_pool_free(l->pool);
    l->inst = NULL;
    return leaked;
}

static bool open_default(const runner *r, check *c, live *l) {
    kvset kv;
    base_params(r->ref->desc, &kv);
    tsr_error err;
    if (live_open(r, &kv, l, &err) < 0) {
        fail(c, "create with default parameters failed: %s", err.msg);
        return false;
    }
    return true;
}

static void close_checked(check *c, live *l) {
    size_t leaked = live_close(l);
    if (leaked) fail(c, "destroy left %zu bytes allocated through tsr_host.alloc", leaked);
}

/* The text the plugin left with set_error during the last failing call. */
static const char *plugin_error(live *l) {
    return tsr_services_take_error(&l->inst->services, "(no message through set_error)");
}

/* ---- generic checks -------------------------------------------------------------------- */

static bool one_line(const char *s) { return s && *s && !strchr(s, '\n'); }

static void check_load(const runner *r, check *c) {
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    if (tsr_registry_load_file(reg, r->path, &err) < 0) fail(c, "%s", err.msg);
    /* A plugin refused alone (version, NULL callback, bad table) leaves a diagnostic while its
     * siblings load. */
    for (size_t i = 0; i < tsr_registry_n_diagnostics(reg); i++)
        fail(c, "%s", tsr_registry_diagnostic(reg, i));
    for (size_t i = 0; i < tsr_registry_count(reg); i++) {
        const tsr_plugin_ref *ref = tsr_registry_at(reg, i);
        note(c, "%s plugin '%s' %s, score %d", tsr_stage_name(ref->desc->stage),
             ref->desc->name, ref->desc->version ? ref->desc->version : "", ref->score);
    }
    tsr_registry_free(reg);
}

static void check_descriptor(const runner *r, check *c) {
    const tsr_plugin_desc *d = r->ref->desc;
    if (!one_line(d->version)) fail(c, "version is empty, NULL or several lines");
    if (!one_line(d->description)) fail(c, "description is empty, NULL or several lines");
    if (r->ref->score == 0) fail(c, "probe says it cannot run here: %s", r->ref->unusable);
    char who[256];
    snprintf(who, sizeof who, "plugin '%s'", d->name);
    tsr_error err;
    if (tsr_param_table_check(d->params, d->n_params, who, &err) < 0) fail(c, "%s", err.msg);
    for (uint32_t i = 0; i < d->n_params; i++) {
        const tsr_param_def *p = &d->params[i];
        if (p->struct_size < offsetof(tsr_param_def, doc) + sizeof p->doc)
            fail(c, "parameter #%u: struct_size %u is too small", i, p->struct_size);
        if (!one_line(p->doc))
            fail(c, "parameter '%s': doc is empty, NULL or several lines", p->name);
    }
    note(c, "%s ABI %u.%u needed, host %u.%u; %u parameters, %u commands",
         tsr_stage_name(d->stage), d->stage_major, d->stage_minor_needed,
         tsr_stage_abi_major(d->stage), tsr_stage_abi_minor(d->stage), d->n_params,
         d->n_commands);
}

static void check_commands(const runner *r, check *c) {
    const tsr_plugin_desc *d = r->ref->desc;
    char who[256];
    snprintf(who, sizeof who, "plugin '%s'", d->name);
    for (uint32_t i = 0; i < d->n_commands; i++) {
        tsr_error err;
        if (tsr_command_check(&d->commands[i], who, &err) < 0) {
            fail(c, "%s", err.msg);
            continue;
        }
        if (!one_line(d->commands[i].doc))
            fail(c, "command '%s': doc is empty, NULL or several lines", d->commands[i].name);
    }
    if (c->failed || d->n_commands == 0) return;

    /* Commands that take nothing but the instance can be called blind: a diagnostic command
     * must work on a fresh instance. */
    live l;
    if (!open_default(r, c, &l)) return;
    for (uint32_t i = 0; i < d->n_commands; i++) {
        const tsr_command *cmd = &d->commands[i];
        const char *args = strchr(cmd->signature, '(') + 1;
        if (strcmp(args, ")") != 0 && strcmp(args, "I)") != 0) {
            note(c, "command '%s' %s takes arguments: not called", cmd->name, cmd->signature);
            continue;
        }
        char ret[256];
        tsr_error err;
        if (tsr_command_call(cmd, l.inst->self, NULL, 0, ret, sizeof ret, &err) < 0)
            fail(c, "command '%s' on a fresh instance: %s", cmd->name, err.msg);
        else
            note(c, "command '%s' -> %s", cmd->name, ret);
    }
    close_checked(c, &l);
}

static void check_create_defaults(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    note(c, "instance held %zu bytes after create",
         (size_t)atomic_load(&l.inst->services.bytes_live));
    close_checked(c, &l);
}

/* One create/destroy with `key` set to `value`: a value the table allows must be accepted,
 * or refused with a reason; never crash or leak. */
static void try_edge(const runner *r, check *c, const char *key, const char *value) {
    kvset kv;
    base_params(r->ref->desc, &kv);
    kvset_put(&kv, key, value);
    live l;
    tsr_error err;
    if (live_open(r, &kv, &l, &err) < 0) {
        if (strstr(err.msg, "without a reason"))
            fail(c, "%s=%s: create refused without a message through set_error", key, value);
        else
            note(c, "%s=%s: refused: %s", key, value, err.msg);
        return;
    }
    size_t leaked = live_close(&l);
    if (leaked) fail(c, "%s=%s: destroy left %zu bytes allocated", key, value, leaked);
    else note(c, "%s=%s: ok", key, value);
}

static void check_edge_params(const runner *r, check *c) {
    const tsr_plugin_desc *d = r->ref->desc;
    char buf[96];
    for (uint32_t i = 0; i < d->n_params; i++) {
        const tsr_param_def *p = &d->params[i];
        switch (p->type) {
        case TSR_PARAM_INT:
        case TSR_PARAM_FLOAT:
            if (!param_bounded(p)) {
                note(c, "%s: unbounded, no edges to try", p->name);
                break;
            }
            for (int e = 0; e < 2; e++) {
                double v = e ? p->max : p->min;
                if (p->type == TSR_PARAM_INT)
                    snprintf(buf, sizeof buf, "%lld", (long long)v);
                else
                    snprintf(buf, sizeof buf, "%.17g", v);
                try_edge(r, c, p->name, buf);
            }
            break;
        case TSR_PARAM_ENUM:
            for (const char *const *ch = p->choices; *ch; ch++) try_edge(r, c, p->name, *ch);
            break;
        case TSR_PARAM_BOOL:
            try_edge(r, c, p->name, "true");
            try_edge(r, c, p->name, "false");
            break;
        default:
            break;
        }
    }
}

/* Binding `value` to `key` must fail: the table is what protects the plugin from it. */
static void expect_refused(const runner *r, check *c, const char *key, const char *value) {
    const tsr_plugin_desc *d = r->ref->desc;
    kvset kv;
    base_params(d, &kv);
    kvset_put(&kv, key, value);
    tsr_bound_params bound;
    tsr_error err;
    if (tsr_params_bind(d->params, d->n_params, d->name, tsr_stage_name(d->stage),
                        (tsr_src_loc){RUNNER, 0, 0}, kv.kv, kv.n, &bound, &err) >= 0) {
        tsr_bound_params_free(&bound);
        fail(c, "%s=%s was accepted", key, value);
    } else {
        note(c, "%s=%s: %s", key, value, err.msg);
    }
}

static void check_param_rejection(const runner *r, check *c) {
    const tsr_plugin_desc *d = r->ref->desc;
    char buf[96];
    expect_refused(r, c, "conformance_no_such_parameter", "1");
    for (uint32_t i = 0; i < d->n_params; i++) {
        const tsr_param_def *p = &d->params[i];
        switch (p->type) {
        case TSR_PARAM_INT:
            expect_refused(r, c, p->name, "not-a-number");
            expect_refused(r, c, p->name, "1.5");
            /* Beyond ±2^62 an int64 neighbour of the bound is not exact in a double. */
            if (param_bounded(p) && p->min > -4.6e18) {
                snprintf(buf, sizeof buf, "%lld", (long long)p->min - 1);
                expect_refused(r, c, p->name, buf);
            }
            if (param_bounded(p) && p->max < 4.6e18) {
                snprintf(buf, sizeof buf, "%lld", (long long)p->max + 1);
                expect_refused(r, c, p->name, buf);
            }
            break;
        case TSR_PARAM_FLOAT:
            expect_refused(r, c, p->name, "not-a-number");
            expect_refused(r, c, p->name, "nan");
            if (param_bounded(p)) {
                double step = fmax(1.0, fabs(p->max - p->min));
                snprintf(buf, sizeof buf, "%.17g", p->min - step);
                expect_refused(r, c, p->name, buf);
                snprintf(buf, sizeof buf, "%.17g", p->max + step);
                expect_refused(r, c, p->name, buf);
            }
            break;
        case TSR_PARAM_BOOL:
            expect_refused(r, c, p->name, "maybe");
            break;
        case TSR_PARAM_ENUM:
            expect_refused(r, c, p->name, "conformance-no-such-choice");
            break;
        default:
            break;
        }
    }
}

static void check_cycles(const runner *r, check *c) {
    for (int i = 0; i < N_CYCLES && !c->failed; i++) {
        live l;
        if (!open_default(r, c, &l)) return;
        size_t leaked = live_close(&l);
        if (leaked) fail(c, "cycle %d: destroy left %zu bytes allocated", i + 1, leaked);
    }
}

/* ---- cache policy ------------------------------------------------------------------------ */

/* Checks the views of one layer against what was stored: (n_stored) tokens at positions
 * 0..n_stored-1 with K/V rows k_all/v_all (n_stored, n_kv_head, head_dim). */
static void check_views(check *c, const tsr_cache_init *in, int32_t layer, const tsr_kv_view *vw,
                        int64_t n_stored, const float *k_all, const float *v_all) {
    const int32_t hd = in->head_dim, nkv = in->n_kv_head;
    float *scratch = malloc((size_t)hd * sizeof *scratch);
    char *seen = calloc((size_t)n_stored, 1);
    for (int32_t h = 0; h < nkv && !c->failed; h++) {
        const tsr_kv_view *v = &vw[h];
        if (v->n < 0 || v->n > n_stored) {
            fail(c, "layer %d head %d: view has %lld entries, %lld were stored", layer, h,
                 (long long)v->n, (long long)n_stored);
            break;
        }
        if (v->n > 0 && !v->pos) {
            fail(c, "layer %d head %d: view pos is NULL", layer, h);
            break;
        }
        if (!tsr_kv_view_readable(v)) {
            fail(c, "layer %d head %d: view of dtype %d is not readable (F32/F16 without k/v, "
                    "or another dtype without load_k/load_v)", layer, h, v->dtype);
            break;
        }
        memset(seen, 0, (size_t)n_stored);
        double err_num = 0, err_den = 0;
        for (int64_t j = 0; j < v->n; j++) {
            int32_t p = v->pos[j];
            if (p < 0 || p >= n_stored || seen[p]) {
                fail(c, "layer %d head %d: entry %lld has position %d (%s)", layer, h,
                     (long long)j, p, p >= 0 && p < n_stored ? "seen twice" : "never stored");
                break;
            }
            seen[p] = 1;
            /* Read as attention reads it: the SDK's view reader, whatever the storage. */
            for (int values = 0; values < 2; values++) {
                const float *src = (values ? v_all : k_all) + ((size_t)p * nkv + h) * hd;
                size_t stride;
                const float *got = tsr_kv_view_rows(v, values, j, 1, hd, scratch, &stride);
                for (int32_t i = 0; i < hd; i++) {
                    err_num += ((double)got[i] - src[i]) * ((double)got[i] - src[i]);
                    err_den += (double)src[i] * src[i];
                }
            }
        }
        double e = err_den > 0 ? sqrt(err_num / err_den) : 0;
        if (!c->failed && e >= 0.5)
            fail(c, "layer %d head %d: the view's K/V differ from what was stored at their "
                    "positions (rel rmse %.3g)", layer, h, e);
        if (h == 0 && layer == 0)
            note(c, "%lld stored -> view of %lld entries, dtype %d, rel rmse %.3g",
                 (long long)n_stored, (long long)v->n, v->dtype, e);
    }
    free(scratch);
    free(seen);
}

static void check_cache(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_cache_vtable *vt = l.inst->vtable;
    void *self = l.inst->self;
    const tsr_cache_init *in = &l.init_storage.cache;
    const int32_t nl = in->n_layer, nkv = in->n_kv_head, hd = in->head_dim;
    const int64_t n_prompt = 8, n_total = 9;
    const size_t row = (size_t)nkv * hd;
    float *k = malloc((size_t)nl * n_total * row * sizeof *k);
    float *v = malloc((size_t)nl * n_total * row * sizeof *v);
    tsr_kv_view *views = calloc((size_t)nkv, sizeof *views);
    int32_t pos[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
    uint64_t rng = 0x5eed0001;
    fill_random(k, (size_t)nl * n_total * row, &rng);
    fill_random(v, (size_t)nl * n_total * row, &rng);

    tsr_cache_stats base = {.struct_size = sizeof base};
    if (VT_HAS(vt, stats)) vt->stats(self, &base);
    tsr_status st = vt->seq_begin(self, 0);
    if (st < 0) {
        fail(c, "seq_begin(0): status %d: %s", st, plugin_error(&l));
        goto out;
    }
    /* The prompt, then one decode step, layer by layer as the host's forward pass does. */
    for (int step = 0; step < 2 && !c->failed; step++) {
        int64_t first = step ? n_prompt : 0, n = step ? 1 : n_prompt;
        int32_t phase = step ? TSR_PHASE_DECODE : TSR_PHASE_PREFILL;
        for (int32_t layer = 0; layer < nl && !c->failed; layer++) {
            const float *lk = k + (size_t)layer * n_total * row;
            const float *lv = v + (size_t)layer * n_total * row;
            tsr_kv_write w = {sizeof w, 0, layer, phase, n, pos + first, lk + first * row,
                              lv + first * row};
            if ((st = vt->store(self, &w)) < 0) {
                fail(c, "store(layer %d, %lld tokens): status %d: %s", layer, (long long)n, st,
                     plugin_error(&l));
                break;
            }
            for (int32_t h = 0; h < nkv; h++)
                views[h] = (tsr_kv_view){.struct_size = sizeof *views};
            if ((st = vt->view(self, 0, layer, phase, views)) < 0) {
                fail(c, "view(layer %d): status %d: %s", layer, st, plugin_error(&l));
                break;
            }
            check_views(c, in, layer, views, first + n, lk, lv);
        }
        if (c->failed) break;
        tsr_status (*hook)(void *, int64_t) = NULL;
        if (step == 0 && VT_HAS(vt, prefill_end)) hook = vt->prefill_end;
        if (step == 1 && VT_HAS(vt, step_end)) hook = vt->step_end;
        if (hook && (st = hook(self, 0)) < 0)
            fail(c, "%s: status %d: %s", step ? "step_end" : "prefill_end", st, plugin_error(&l));
    }
    vt->seq_end(self, 0);
    if (VT_HAS(vt, stats)) {
        tsr_cache_stats after = {.struct_size = sizeof after};
        vt->stats(self, &after);
        note(c, "stats after seq_end: %llu bytes reserved (%llu before), peak %llu, %lld entries",
             (unsigned long long)after.bytes_reserved, (unsigned long long)base.bytes_reserved,
             (unsigned long long)after.bytes_peak, (long long)after.entries);
        if (after.bytes_reserved != base.bytes_reserved || after.entries != base.entries)
            fail(c, "seq_end did not free the sequence: stats say %llu bytes and %lld entries "
                    "held, %llu and %lld before seq_begin",
                 (unsigned long long)after.bytes_reserved, (long long)after.entries,
                 (unsigned long long)base.bytes_reserved, (long long)base.entries);
    }
out:
    free(k);
    free(v);
    free(views);
    close_checked(c, &l);
}

/* ---- attention ------------------------------------------------------------------------- */

/* A plain softmax attention over full views, with the per-entry probability sums the views'
 * score_acc should receive. out (n_q, n_head, head_dim), acc (n_kv_head, n_kv). */
static void reference_attention(const tsr_attention_init *in, const tsr_attention_call *call,
                                int64_t n_kv, const float *const *kd, const float *const *vd,
                                const int32_t *kv_pos, int32_t from_pos, double *out,
                                double *acc) {
    const int32_t hd = in->head_dim, group = in->n_head / in->n_kv_head;
    double *p = malloc((size_t)n_kv * sizeof *p);
    memset(acc, 0, (size_t)in->n_kv_head * n_kv * sizeof *acc);
    for (int64_t t = 0; t < call->n_q; t++) {
        for (int32_t h = 0; h < in->n_head; h++) {
            int32_t g = h / group;
            const float *q = call->q + ((size_t)t * in->n_head + h) * hd;
            double mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < n_kv; j++) {
                p[j] = -INFINITY;
                if (kv_pos[j] > call->q_pos[t]) continue;
                double s = 0;
                for (int32_t i = 0; i < hd; i++) s += (double)q[i] * kd[g][j * hd + i];
                p[j] = s * call->scale;
                mx = fmax(mx, p[j]);
            }
            for (int64_t j = 0; j < n_kv; j++) sum += p[j] = exp(p[j] - mx);
            double *o = out + ((size_t)t * in->n_head + h) * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = 0;
            for (int64_t j = 0; j < n_kv; j++) {
                p[j] /= sum;
                for (int32_t i = 0; i < hd; i++) o[i] += p[j] * vd[g][j * hd + i];
                if (call->q_pos[t] >= from_pos) acc[(size_t)g * n_kv + j] += p[j];
            }
        }
    }
    free(p);
}

/* One prefill call (3 queries) and one decode call (1 query) over 10 cached entries. */
static void run_attention(const runner *r, check *c, bool scores) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_attention_vtable *vt = l.inst->vtable;
    void *self = l.inst->self;
    const tsr_attention_init *in = &l.init_storage.attention;
    const int32_t nh = in->n_head, nkv = in->n_kv_head, hd = in->head_dim;
    enum { N_KV = 10, MAX_Q = 3 };
    const int32_t from_pos = 8;
    int32_t kv_pos[N_KV];
    for (int j = 0; j < N_KV; j++) kv_pos[j] = j;
    float **kd = calloc((size_t)nkv, sizeof *kd), **vd = calloc((size_t)nkv, sizeof *vd);
    float **acc = calloc((size_t)nkv, sizeof *acc);
    tsr_kv_view *views = calloc((size_t)nkv, sizeof *views);
    float *q = malloc((size_t)MAX_Q * nh * hd * sizeof *q);
    float *out = malloc((size_t)MAX_Q * nh * hd * sizeof *out);
    double *ref = malloc((size_t)MAX_Q * nh * hd * sizeof *ref);
    double *ref_acc = malloc((size_t)nkv * N_KV * sizeof *ref_acc);
    uint64_t rng = 0x5eed0002;
    for (int32_t g = 0; g < nkv; g++) {
        kd[g] = malloc((size_t)N_KV * hd * sizeof **kd);
        vd[g] = malloc((size_t)N_KV * hd * sizeof **vd);
        acc[g] = malloc((size_t)N_KV * sizeof **acc);
        fill_random(kd[g], (size_t)N_KV * hd, &rng);
        fill_random(vd[g], (size_t)N_KV * hd, &rng);
    }
    /* Larger queries sharpen the softmax, so a wrong mask or a wrong entry shows. */
    fill_random(q, (size_t)MAX_Q * nh * hd, &rng);
    for (size_t i = 0; i < (size_t)MAX_Q * nh * hd; i++) q[i] *= 3.0f;

    tsr_status st;
    if (VT_HAS(vt, seq_begin) && (st = vt->seq_begin(self, 0)) < 0) {
        fail(c, "seq_begin(0): status %d: %s", st, plugin_error(&l));
        goto out;
    }
    static const int32_t prefill_pos[MAX_Q] = {7, 8, 9}, decode_pos[1] = {9};
    for (int call_i = 0; call_i < 2 && !c->failed; call_i++) {
        int64_t n_q = call_i ? 1 : MAX_Q;
        for (int32_t g = 0; g < nkv; g++) {
            memset(acc[g], 0, N_KV * sizeof **acc);
            views[g] = (tsr_kv_view){
                .struct_size = sizeof *views, .n = N_KV, .pos = kv_pos, .dtype = TSR_DTYPE_F32,
                .k = kd[g], .v = vd[g], .k_stride = (size_t)hd * 4, .v_stride = (size_t)hd * 4,
                .score_acc = scores ? acc[g] : NULL, .score_from_pos = from_pos};
        }
        for (size_t i = 0; i < (size_t)n_q * nh * hd; i++) out[i] = NAN;
        tsr_attention_call call = {
            .struct_size = sizeof call, .seq_id = 0, .layer = call_i % in->n_layer,
            .phase = call_i ? TSR_PHASE_DECODE : TSR_PHASE_PREFILL, .n_q = n_q,
            .q = call_i ? q + (size_t)2 * nh * hd : q, .q_pos = call_i ? decode_pos : prefill_pos,
            .scale = 1.0f / sqrtf((float)hd), .views = views, .out = out};
        const char *what = call_i ? "decode" : "prefill";
        if ((st = vt->forward(self, &call)) < 0) {
            fail(c, "%s forward: status %d: %s", what, st, plugin_error(&l));
            break;
        }
        reference_attention(in, &call, N_KV, (const float *const *)kd, (const float *const *)vd,
                            kv_pos, from_pos, ref, ref_acc);
        size_t n_out = (size_t)n_q * nh * hd;
        if (!all_finite(out, n_out)) {
            fail(c, "%s: output has NaN/Inf (or was not entirely written)", what);
            break;
        }
        /* The scores check leaves the output to attention-reference, so each rule fails
         * under its own name. */
        long bad = scores ? -1 : first_mismatch(out, ref, n_out, 1e-4, 1e-3);
        if (bad >= 0) {
            fail(c, "%s: out[%ld] = %.6g, the reference softmax attention gives %.6g", what, bad,
                 out[bad], ref[bad]);
            break;
        }
        for (int32_t g = 0; scores && g < nkv && !c->failed; g++) {
            bad = first_mismatch(acc[g], ref_acc + (size_t)g * N_KV, N_KV, 1e-4, 1e-3);
            if (bad >= 0)
                fail(c, "%s: views[%d].score_acc[%ld] = %.6g, expected %.6g (probabilities "
                        "summed over the head group and the queries at pos >= %d)", what, g,
                     bad, acc[g][bad], ref_acc[(size_t)g * N_KV + bad], from_pos);
        }
    }
    if (VT_HAS(vt, seq_end)) vt->seq_end(self, 0);
out:
    for (int32_t g = 0; g < nkv; g++) {
        free(kd[g]);
        free(vd[g]);
        free(acc[g]);
    }
    free(kd);
    free(vd);
    free(acc);
    free(views);
    free(q);
    free(out);
    free(ref);
    free(ref_acc);
    close_checked(c, &l);
}

static void check_attention(const runner *r, check *c) { run_attention(r, c, false); }
static void check_attention_scores(const runner *r, check *c) { run_attention(r, c, true); }

/* ---- decoder --------------------------------------------------------------------------- */

#define FAKE_MAX_SEQ 64

/* A fake model behind tsr_decode_api: deterministic logits from (token, position), and a
 * record of every rule the decoder breaks. */
typedef struct fake_model {
    check *c;
    int32_t n_vocab, n_ctx;
    int32_t len[FAKE_MAX_SEQ];
    bool alive[FAKE_MAX_SEQ];
    int64_t emitted, limit, n_forward, calls_after_stop;
    bool stopped;
} fake_model;

static float fake_logit(int32_t token, int32_t pos, int32_t v) {
    uint64_t h = (uint64_t)(uint32_t)token * 0x9e3779b97f4a7c15ull ^
                 (uint64_t)(uint32_t)pos * 0xc2b2ae3d27d4eb4full ^ (uint64_t)(uint32_t)v;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return (float)((double)(h >> 40) / (double)(1ull << 24)) * 8.0f - 4.0f;
}

static bool seq_ok(fake_model *m, int64_t seq, const char *what) {
    if (seq < 0 || seq >= FAKE_MAX_SEQ || !m->alive[seq]) {
        fail(m->c, "%s: sequence %lld is not alive", what, (long long)seq);
        return false;
    }
    return true;
}

static tsr_status fake_forward(void *ctx, const tsr_batch_entry *e, int64_t n, float *logits) {
    fake_model *m = ctx;
    if (m->stopped) m->calls_after_stop++;
    if (n <= 0) {
        fail(m->c, "forward with %lld entries", (long long)n);
        return TSR_E_INVALID;
    }
    m->n_forward++;
    int64_t row = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!seq_ok(m, e[i].seq_id, "forward")) return TSR_E_INVALID;
        int32_t *len = &m->len[e[i].seq_id];
        if (e[i].pos != *len || e[i].pos >= m->n_ctx || e[i].token < 0 ||
            e[i].token >= m->n_vocab) {
            fail(m->c, "forward entry %lld: seq %lld pos %d token %d; the sequence holds %d "
                       "positions, n_ctx %d, n_vocab %d", (long long)i, (long long)e[i].seq_id,
                 e[i].pos, e[i].token, *len, m->n_ctx, m->n_vocab);
            return TSR_E_INVALID;
        }
        (*len)++;
        if (!e[i].want_logits) continue;
        for (int32_t v = 0; v < m->n_vocab; v++)
            logits[row * m->n_vocab + v] = fake_logit(e[i].token, e[i].pos, v);
        row++;
    }
    return TSR_OK;
}

static tsr_status fake_fork(void *ctx, int64_t src, int64_t dst) {
    fake_model *m = ctx;
    if (!seq_ok(m, src, "seq_fork")) return TSR_E_INVALID;
    if (dst < 0 || dst >= FAKE_MAX_SEQ || m->alive[dst]) {
        fail(m->c, "seq_fork(%lld, %lld): destination is alive or out of range (the fake model "
                   "has %d sequences)", (long long)src, (long long)dst, FAKE_MAX_SEQ);
        return TSR_E_INVALID;
    }
    m->alive[dst] = true;
    m->len[dst] = m->len[src];
    return TSR_OK;
}

static tsr_status fake_truncate(void *ctx, int64_t seq, int32_t n_pos) {
    fake_model *m = ctx;
    if (!seq_ok(m, seq, "seq_truncate")) return TSR_E_INVALID;
    if (n_pos < 0) {
        fail(m->c, "seq_truncate(%lld, %d): negative position", (long long)seq, n_pos);
        return TSR_E_INVALID;
    }
    if (n_pos < m->len[seq]) m->len[seq] = n_pos;
    return TSR_OK;
}

static tsr_status fake_seq_end(void *ctx, int64_t seq) {
    fake_model *m = ctx;
    if (!seq_ok(m, seq, "seq_end")) return TSR_E_INVALID;
    m->alive[seq] = false;
    return TSR_OK;
}

static int32_t fake_emit(void *ctx, const int32_t *tokens, int64_t n) {
    fake_model *m = ctx;
    if (m->stopped) {
        m->calls_after_stop++;
        return 1;
    }
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->n_vocab)
            fail(m->c, "emitted token %d, outside [0, n_vocab = %d)", tokens[i], m->n_vocab);
    m->emitted += n;
    if (m->emitted >= m->limit) m->stopped = true;
    return m->stopped;
}

static int32_t fake_is_eog(void *ctx, int32_t token) { return 0; }

static void check_decoder(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_decoder_vtable *vt = l.inst->vtable;
    void *self = l.inst->self;
    static const int32_t prompt[] = {1, 17, 42, 99, 3};
    /* Two requests on one instance: a decoder must not keep state from the first. */
    for (int req_i = 0; req_i < 2 && !c->failed; req_i++) {
        fake_model m = {.c = c, .n_vocab = r->shape.n_vocab, .n_ctx = r->shape.n_ctx,
                        .limit = 12};
        m.alive[0] = true;
        tsr_decode_api api = {sizeof api, &m, m.n_vocab, m.n_ctx, fake_forward, fake_fork,
                              fake_truncate, fake_seq_end, fake_emit, fake_is_eog};
        tsr_generate_request req = {sizeof req, prompt, 5, m.limit};
        tsr_status st = vt->generate(self, &api, &req);
        if (c->failed) break;
        if (st < 0) {
            fail(c, "request %d: generate: status %d: %s", req_i + 1, st, plugin_error(&l));
            break;
        }
        if (m.calls_after_stop)
            fail(c, "request %d: %lld forward/emit calls after emit() returned 1", req_i + 1,
                 (long long)m.calls_after_stop);
        if (m.emitted == 0) fail(c, "request %d: generate emitted no token", req_i + 1);
        note(c, "request %d: %lld tokens emitted in %lld forwards%s", req_i + 1,
             (long long)m.emitted, (long long)m.n_forward,
             m.stopped ? "" : " (stopped on its own)");
    }
    close_checked(c, &l);
}

static void check_decoder_pick(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_decoder_vtable *vt = l.inst->vtable;
    int32_t n_vocab = r->shape.n_vocab;
    float *logits = malloc((size_t)n_vocab * sizeof *logits);
    static const int32_t history[] = {1, 17, 42};
    uint64_t rng = 0x5eed0003;
    for (int trial = 0; trial < 8 && !c->failed; trial++) {
        fill_random(logits, (size_t)n_vocab, &rng);
        int32_t id = vt->pick(l.inst->self, logits, history, 3);
        if (id < 0 || id >= n_vocab) fail(c, "pick returned %d, outside [0, %d)", id, n_vocab);
    }
    free(logits);
    close_checked(c, &l);
}

/* ---- router ---------------------------------------------------------------------------- */

static void check_router(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_router_vtable *vt = l.inst->vtable;
    const tsr_router_init *in = &l.init_storage.router;
    const int64_t n_tok = 5;
    const int32_t k = in->n_expert_used, ne = in->n_expert;
    float *gate = malloc((size_t)n_tok * ne * sizeof *gate);
    float *hidden = malloc((size_t)n_tok * in->n_embd * sizeof *hidden);
    int32_t *experts = malloc((size_t)n_tok * k * sizeof *experts);
    int32_t *prev = malloc((size_t)n_tok * k * sizeof *prev);
    float *weights = malloc((size_t)n_tok * k * sizeof *weights);
    uint64_t rng = 0x5eed0004;
    for (int32_t layer = 0; layer < in->n_layer && !c->failed; layer++) {
        fill_random(gate, (size_t)n_tok * ne, &rng);
        fill_random(hidden, (size_t)n_tok * in->n_embd, &rng);
        for (int64_t i = 0; i < n_tok * k; i++) {
            experts[i] = -2;
            weights[i] = NAN;
        }
        tsr_route_call call = {sizeof call, layer, n_tok, gate, hidden, layer ? prev : NULL, k,
                               experts, weights};
        tsr_status st = vt->route(l.inst->self, &call);
        if (st < 0) {
            fail(c, "layer %d: route: status %d: %s", layer, st, plugin_error(&l));
            break;
        }
        for (int64_t t = 0; t < n_tok && !c->failed; t++) {
            for (int32_t s = 0; s < k; s++) {
                int32_t e = experts[t * k + s];
                if (e < -1 || e >= ne) {
                    fail(c, "layer %d token %lld slot %d: expert %d, outside [-1, %d)", layer,
                         (long long)t, s, e, ne);
                    break;
                }
                if (e >= 0 && !isfinite(weights[t * k + s])) {
                    fail(c, "layer %d token %lld slot %d: weight %g", layer, (long long)t, s,
                         weights[t * k + s]);
                    break;
                }
                for (int32_t s2 = 0; s2 < s; s2++)
                    if (e >= 0 && experts[t * k + s2] == e)
                        fail(c, "layer %d token %lld: expert %d chosen twice", layer,
                             (long long)t, e);
            }
        }
        memcpy(prev, experts, (size_t)n_tok * k * sizeof *prev);
    }
    free(gate);
    free(hidden);
    free(experts);
    free(prev);
    free(weights);
    close_checked(c, &l);
}

/* ---- backend --------------------------------------------------------------------------- */

/* Buffers in the backend's memory: its own allocator when it has one, host memory else. */
typedef struct device {
    const tsr_backend_vtable *vt;
    void *self;
    check *c;
} device;

static float *dev_alloc(device *d, size_t n) {
    void *p = NULL;
    if (VT_HAS(d->vt, buffer_alloc)) {
        if (d->vt->buffer_alloc(d->self, n * sizeof(float), &p) < 0 || !p) {
            fail(d->c, "buffer_alloc(%zu bytes) failed", n * sizeof(float));
            return NULL;
        }
        return p;
    }
    return malloc(n * sizeof(float));
}

static void dev_free(device *d, void *p) {
    if (!p) return;
    if (VT_HAS(d->vt, buffer_alloc)) {
        if (VT_HAS(d->vt, buffer_free)) d->vt->buffer_free(d->self, p);
    } else {
        free(p);
    }
}

static void dev_put(device *d, void *dst, const void *src, size_t bytes) {
    if (!dst) return;
    if (VT_HAS(d->vt, upload)) d->vt->upload(d->self, dst, src, bytes);
    else memcpy(dst, src, bytes);
}

static void dev_get(device *d, void *dst, const void *src, size_t bytes) {
    if (VT_HAS(d->vt, synchronize)) d->vt->synchronize(d->self);
    if (VT_HAS(d->vt, download)) d->vt->download(d->self, dst, src, bytes);
    else memcpy(dst, src, bytes);
}

/* Compares an op's result (on the device) with the runner's reference. */
static void dev_expect(device *d, const char *op, const float *dev_y, const double *ref,
                       size_t n, double abs_tol, double rel_tol) {
    if (d->c->failed || !dev_y) return;
    float *y = malloc(n * sizeof *y);
    dev_get(d, y, dev_y, n * sizeof *y);
    long bad = first_mismatch(y, ref, n, abs_tol, rel_tol);
    if (bad >= 0) fail(d->c, "%s: y[%ld] = %.7g, expected %.7g", op, bad, y[bad], ref[bad]);
    free(y);
}

static bool op_ok(device *d, const char *op, tsr_status st, live *l) {
    if (st >= 0) return true;
    fail(d->c, "%s: status %d: %s", op, st, plugin_error(l));
    return false;
}

enum { BN = 3, BDIM = 64 };

static void check_backend_ops(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    device d = {l.inst->vtable, l.inst->self, c};
    const tsr_backend_vtable *vt = d.vt;
    const size_t n = (size_t)BN * BDIM;
    float a[BN * BDIM], b[BN * BDIM], w[BDIM];
    double ref[BN * BDIM];
    uint64_t rng = 0x5eed0005;
    fill_random(a, n, &rng);
    fill_random(b, n, &rng);
    fill_random(w, BDIM, &rng);
    float *da = dev_alloc(&d, n), *db = dev_alloc(&d, n), *dw = dev_alloc(&d, BDIM);
    float *dy = dev_alloc(&d, n);
    if (c->failed) goto out;
    dev_put(&d, da, a, sizeof a);
    dev_put(&d, db, b, sizeof b);
    dev_put(&d, dw, w, sizeof w);

    const float eps = 1e-5f;
    for (int t = 0; t < BN; t++) {
        double ss = 0;
        for (int i = 0; i < BDIM; i++) ss += (double)a[t * BDIM + i] * a[t * BDIM + i];
        double inv = 1.0 / sqrt(ss / BDIM + eps);
        for (int i = 0; i < BDIM; i++) ref[t * BDIM + i] = a[t * BDIM + i] * inv * w[i];
    }
    if (op_ok(&d, "rms_norm", vt->rms_norm(d.self, dy, da, dw, BN, BDIM, eps), &l))
        dev_expect(&d, "rms_norm", dy, ref, n, 1e-5, 1e-4);

    for (size_t i = 0; i < n; i++) ref[i] = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
    if (op_ok(&d, "swiglu", vt->swiglu(d.self, dy, da, db, BN, BDIM), &l))
        dev_expect(&d, "swiglu", dy, ref, n, 1e-5, 1e-4);

    for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    if (op_ok(&d, "add", vt->add(d.self, dy, da, db, BN, BDIM, BN), &l))
        dev_expect(&d, "add", dy, ref, n, 1e-6, 1e-6);
    for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i % BDIM];
    if (op_ok(&d, "add (broadcast)", vt->add(d.self, dy, da, db, BN, BDIM, 1), &l))
        dev_expect(&d, "add (broadcast)", dy, ref, n, 1e-6, 1e-6);

    /* In place, as the graph uses them: y == a for add, y == gate for swiglu. */
    dev_put(&d, dy, a, sizeof a);
    for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    if (op_ok(&d, "add (in place)", vt->add(d.self, dy, dy, db, BN, BDIM, BN), &l))
        dev_expect(&d, "add (in place)", dy, ref, n, 1e-6, 1e-6);
    dev_put(&d, dy, a, sizeof a);
    for (size_t i = 0; i < n; i++) ref[i] = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
    if (op_ok(&d, "swiglu (in place)", vt->swiglu(d.self, dy, dy, db, BN, BDIM), &l))
        dev_expect(&d, "swiglu (in place)", dy, ref, n, 1e-5, 1e-4);
out:
    dev_free(&d, da);
    dev_free(&d, db);
    dev_free(&d, dw);
    dev_free(&d, dy);
    close_checked(c, &l);
}

static void check_backend_rope(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    device d = {l.inst->vtable, l.inst->self, c};
    enum { NH = 4, HD = 16, N = BN * NH * HD };
    static const int32_t pos[BN] = {0, 5, 100};
    float x[N];
    double ref[N];
    uint64_t rng = 0x5eed0006;
    fill_random(x, N, &rng);
    float *dx = dev_alloc(&d, N);
    int32_t *dpos = (int32_t *)dev_alloc(&d, BN);
    for (int mode_i = 0; mode_i < 2 && !c->failed; mode_i++) {
        int32_t mode = mode_i ? TSR_ROPE_NEOX : TSR_ROPE_NORMAL;
        tsr_rope_params rp = {sizeof rp, mode, HD, 10000.0f, 1.0f};
        for (int t = 0; t < BN; t++) {
            for (int h = 0; h < NH; h++) {
                const float *xi = x + (t * NH + h) * HD;
                double *yo = ref + (t * NH + h) * HD;
                for (int i = 0; i < HD / 2; i++) {
                    double theta = pos[t] * 1.0 * pow(10000.0, -2.0 * i / HD);
                    int i0 = mode == TSR_ROPE_NEOX ? i : 2 * i;
                    int i1 = mode == TSR_ROPE_NEOX ? i + HD / 2 : 2 * i + 1;
                    yo[i0] = xi[i0] * cos(theta) - xi[i1] * sin(theta);
                    yo[i1] = xi[i0] * sin(theta) + xi[i1] * cos(theta);
                }
            }
        }
        dev_put(&d, dx, x, sizeof x);
        dev_put(&d, dpos, pos, sizeof pos);
        const char *op = mode_i ? "rope (neox)" : "rope (normal)";
        if (op_ok(&d, op, d.vt->rope(d.self, dx, dpos, BN, NH, HD, &rp), &l))
            dev_expect(&d, op, dx, ref, N, 1e-4, 1e-4);
    }
    dev_free(&d, dx);
    dev_free(&d, dpos);
    close_checked(c, &l);
}

static void check_backend_weights(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    device d = {l.inst->vtable, l.inst->self, c};
    enum { N_IN = 64, N_OUT = 24 };
    if (!d.vt->supports(d.self, TSR_DTYPE_F32)) {
        fail(c, "supports(F32) is 0: every backend must take F32 weights (rule BACKEND_2)");
        close_checked(c, &l);
        return;
    }
    float wt[N_OUT * N_IN], x[BN * N_IN];
    double ref[BN * N_OUT > BN * N_IN ? BN * N_OUT : BN * N_IN];
    uint64_t rng = 0x5eed0007;
    fill_random(wt, N_OUT * N_IN, &rng);
    fill_random(x, BN * N_IN, &rng);
    float *dw = dev_alloc(&d, N_OUT * N_IN), *dx = dev_alloc(&d, BN * N_IN);
    float *dy = dev_alloc(&d, BN * N_IN);
    int32_t *dids = (int32_t *)dev_alloc(&d, BN);
    static const int32_t ids[BN] = {3, 0, 23};
    if (c->failed) goto out;
    dev_put(&d, dw, wt, sizeof wt);
    dev_put(&d, dx, x, sizeof x);
    dev_put(&d, dids, ids, sizeof ids);
    tsr_tensor w = {.struct_size = sizeof w, .dtype = TSR_DTYPE_F32, .n_dims = 2,
                    .ne = {N_IN, N_OUT, 1, 1}, .row_bytes = N_IN * sizeof(float), .data = dw,
                    .name = "conformance.weight"};
    for (int t = 0; t < BN; t++)
        for (int o = 0; o < N_OUT; o++) {
            double s = 0;
            for (int i = 0; i < N_IN; i++) s += (double)x[t * N_IN + i] * wt[o * N_IN + i];
            ref[t * N_OUT + o] = s;
        }
    if (op_ok(&d, "matmul F32", d.vt->matmul(d.self, dy, &w, dx, BN), &l))
        dev_expect(&d, "matmul F32", dy, ref, BN * N_OUT, 1e-4, 1e-4);
    for (int t = 0; t < BN; t++)
        for (int i = 0; i < N_IN; i++) ref[t * N_IN + i] = wt[ids[t] * N_IN + i];
    if (op_ok(&d, "get_rows F32", d.vt->get_rows(d.self, dy, &w, dids, BN), &l))
        dev_expect(&d, "get_rows F32", dy, ref, BN * N_IN, 0, 0);
out:
    dev_free(&d, dw);
    dev_free(&d, dx);
    dev_free(&d, dy);
    dev_free(&d, dids);
    close_checked(c, &l);
}

/* ---- quantizer ------------------------------------------------------------------------- */

static void check_quantizer(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_quantizer_vtable *vt = l.inst->vtable;
    void *self = l.inst->self;
    /* 256 columns: a whole super-block of the K-quants. */
    enum { COLS = 256, ROWS = 4, NX = 2 };
    float *src = malloc(ROWS * COLS * sizeof *src), *deq = malloc(ROWS * COLS * sizeof *deq);
    float *part = malloc(2 * COLS * sizeof *part), x[NX * COLS], y[NX * ROWS];
    double ref[NX * ROWS];
    uint64_t rng = 0x5eed0008;
    /* Sums of uniforms: roughly normal, like trained weights, with a few larger values. */
    for (int i = 0; i < ROWS * COLS; i++)
        src[i] = rng_uniform(&rng) + rng_uniform(&rng) + rng_uniform(&rng);
    fill_random(x, NX * COLS, &rng);
    tsr_weight_in in = {.struct_size = sizeof in, .layer = 0, .role = "ffn_down",
                        .src = {.struct_size = sizeof(tsr_tensor), .dtype = TSR_DTYPE_F32,
                                .n_dims = 2, .ne = {COLS, ROWS, 1, 1},
                                .row_bytes = COLS * sizeof(float), .data = src,
                                .name = "blk.0.ffn_down.weight"}};
    tsr_weight_out out = {.struct_size = sizeof out};
    tsr_status st = vt->prepare(self, &in, &out);
    if (st == TSR_E_UNSUPPORTED) {
        note(c, "prepare refuses F32 sources: %s", plugin_error(&l));
        goto done;
    }
    if (st < 0) {
        fail(c, "prepare: status %d: %s", st, plugin_error(&l));
        goto done;
    }
    note(c, "dtype %d, %.3g bits per weight, reported rel rmse %.3g", out.dst.dtype,
         out.bits_per_weight, out.rel_rmse);
    if (out.dst.ne[0] != COLS || out.dst.ne[1] != ROWS)
        fail(c, "prepare changed the shape: ne {%lld, %lld}, expected {%d, %d}",
             (long long)out.dst.ne[0], (long long)out.dst.ne[1], COLS, ROWS);
    if (!(out.bits_per_weight > 0 && out.bits_per_weight <= 64))
        fail(c, "bits_per_weight %g is not in (0, 64]", out.bits_per_weight);
    if (!(out.rel_rmse >= 0 && isfinite(out.rel_rmse)))
        fail(c, "rel_rmse %g is not a finite non-negative number", out.rel_rmse);
    if (!c->failed && VT_HAS(vt, dequantize_rows)) {
        if ((st = vt->dequantize_rows(self, deq, &out.dst, 0, ROWS)) < 0) {
            fail(c, "dequantize_rows: status %d: %s", st, plugin_error(&l));
        } else {
            double e = rel_rmse(deq, (const float *)src, ROWS * COLS);
            note(c, "measured rel rmse %.3g", e);
            if (!(e < 0.5)) fail(c, "dequantized weights have rel rmse %.3g (>= 0.5)", e);
            if (!c->failed && (st = vt->dequantize_rows(self, part, &out.dst, 1, 2)) < 0)
                fail(c, "dequantize_rows(rows 1..2): status %d: %s", st, plugin_error(&l));
            else if (!c->failed && memcmp(part, deq + COLS, 2 * COLS * sizeof *part) != 0)
                fail(c, "dequantize_rows of rows 1..2 differs from the same rows of a full "
                        "dequantization");
        }
    }
    if (!c->failed && VT_HAS(vt, matmul)) {
        const float *wref = VT_HAS(vt, dequantize_rows) ? deq : src;
        for (int t = 0; t < NX; t++)
            for (int o = 0; o < ROWS; o++) {
                double s = 0;
                for (int i = 0; i < COLS; i++) s += (double)x[t * COLS + i] * wref[o * COLS + i];
                ref[t * ROWS + o] = s;
            }
        st = vt->matmul(self, y, &out.dst, x, NX);
        if (st == TSR_E_UNSUPPORTED) {
            note(c, "matmul leaves dtype %d to the backend", out.dst.dtype);
        } else if (st < 0) {
            fail(c, "matmul: status %d: %s", st, plugin_error(&l));
        } else {
            /* Against its own dequantization the product is exact up to activation
             * quantization (W4A8 and such): a few percent; against the source, the weight
             * error too. */
            float fref[NX * ROWS];
            for (int i = 0; i < NX * ROWS; i++) fref[i] = (float)ref[i];
            double e = rel_rmse(y, fref, NX * ROWS);
            double limit = VT_HAS(vt, dequantize_rows) ? 0.05 : 0.5;
            note(c, "matmul rel rmse %.3g", e);
            if (!(e < limit)) fail(c, "matmul result has rel rmse %.3g (limit %.2g)", e, limit);
        }
    }
    vt->release(self, &out.dst);
done:
    free(src);
    free(deq);
    free(part);
    close_checked(c, &l);
}

/* ---- main ------------------------------------------------------------------------------ */

typedef struct stage_check {
    int32_t stage;
    const char *name;
    check_fn fn;
    size_t optional_offset; /* a vtable slot the check needs, 0 when none */
    size_t optional_end;
} stage_check;

#define NEEDS(type, field) offsetof(type, field), offsetof(type, field) + sizeof(void *)

static const stage_check stage_checks[] = {
    {TSR_STAGE_CACHE, "cache-roundtrip", check_cache, 0, 0},
    {TSR_STAGE_ATTENTION, "attention-reference", check_attention, 0, 0},
    {TSR_STAGE_ATTENTION, "attention-scores", check_attention_scores, 0, 0},
    {TSR_STAGE_DECODER, "decoder-generate", check_decoder, 0, 0},
    {TSR_STAGE_DECODER, "decoder-pick", check_decoder_pick, NEEDS(tsr_decoder_vtable, pick)},
    {TSR_STAGE_ROUTER, "router-route", check_router, 0, 0},
    {TSR_STAGE_BACKEND, "backend-activations", check_backend_ops, 0, 0},
    {TSR_STAGE_BACKEND, "backend-rope", check_backend_rope, 0, 0},
    {TSR_STAGE_BACKEND, "backend-weights", check_backend_weights, 0, 0},
    {TSR_STAGE_QUANTIZER, "quantizer-roundtrip", check_quantizer, 0, 0},
};

static bool slot_present(const tsr_plugin_desc *d, const stage_check *sc) {
    if (!sc->optional_end) return true;
    const void *vt = d->vtable;
    if (*(const uint32_t *)vt < sc->optional_end) return false;
    const void *fn;
    memcpy(&fn, (const char *)vt + sc->optional_offset, sizeof fn);
    return fn != NULL;
}

static void usage(FILE *f) {
    fprintf(f, "usage: " RUNNER " PLUGIN.so [--verbose]\n"
               "Checks every plugin in PLUGIN.so against the Tessera plugin contract\n"
               "(abi/CONTRACT.md); one PASS/FAIL line per check, then a count. Exit status 1\n"
               "when a check failed.\n");
}

int main(int argc, char **argv) {
    runner r = {.shape = tsr_model_shape_synthetic()};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--verbose") == 0 || strcmp(argv[i], "-v") == 0) {
            r.verbose = true;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' || r.path) {
            usage(stderr);
            return 2;
        } else {
            r.path = argv[i];
        }
    }
    if (!r.path) {
        usage(stderr);
        return 2;
    }
    /* Two threads, so that plugins using parallel_for run it for real. */
    r.shape.n_threads = 2;
    if (r.verbose) tsr_log_set_level(TSR_LOG_INFO);

    /* Loading runs the object's constructors and entry point: in the parent only once they
     * are known not to crash. Plugins refused alone fail "load"; their siblings are checked. */
    bool loadable = run_check(&r, "load", check_load);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    if (loadable && tsr_registry_load_file(reg, r.path, &err) >= 0) {
        for (size_t i = 0; i < tsr_registry_count(reg); i++) {
            r.ref = tsr_registry_at(reg, i);
            run_check(&r, "descriptor", check_descriptor);
            run_check(&r, "commands", check_commands);
            run_check(&r, "create-defaults", check_create_defaults);
            run_check(&r, "edge-params", check_edge_params);
            run_check(&r, "param-rejection", check_param_rejection);
            run_check(&r, "create-destroy-cycles", check_cycles);
            for (size_t j = 0; j < sizeof stage_checks / sizeof stage_checks[0]; j++) {
                const stage_check *sc = &stage_checks[j];
                if (sc->stage != r.ref->desc->stage) continue;
                if (!slot_present(r.ref->desc, sc)) {
                    if (r.verbose) printf("skip %s/%s: optional callback absent\n",
                                          r.ref->desc->name, sc->name);
                    continue;
                }
                run_check(&r, sc->name, sc->fn);
            }
        }
    }
    tsr_registry_free(reg);
    printf("%d passed, %d failed\n", r.n_pass, r.n_fail);
    return r.n_fail ? 1 : 0;
}
