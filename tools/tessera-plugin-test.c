/*
 * tessera-plugin-test PLUGIN.so [--verbose]
 *
 * Checks every plugin of one object against the rules of abi/CONTRACT.md that can be checked
 * without a model: the descriptor and its parameter table, creation with default and edge
 * parameters, memory accounting over repeated create/destroy, the commands, and the rules of
 * each stage on synthetic data: a cache policy driven as the host drives it, past its budget,
 * with every view checked against what was stored; attention against a reference on random
 * views; a decoder against a fake model that tracks what each sequence holds through batches,
 * forks and truncations and checks every call (and a fake draft model for a decoder that
 * drafts; one that drafts only when given a draft runs without one too); router outputs, what
 * they hand back in place of experts' matrices (routers get made-up experts) and what they
 * need; backend ops (the rows of expert layers too) against scalar formulas; a quantizer's
 * reconstruction error. The cache, attention and decoder checks run again with each parameter
 * at its cheap bounds, named "check[param=value]".
 *
 * Prints one line per check, "PASS plugin/check" or "FAIL plugin/check: why", then
 * "N passed, N failed"; exits 1 when a check failed, 2 on a usage error. Each check runs in a
 * child process with a time limit, so a plugin that crashes or hangs fails that check alone.
 */
#include <errno.h>
#include <float.h>
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
#include "plugin/vtable.h"

#define CHECK_TIMEOUT_S 60
#define N_CYCLES 50
#define RUNNER "tessera-plugin-test"

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

#define MAX_KV 64

/* Parameter values as text, as a config file would give them. */
typedef struct kvset {
    tsr_kv_text kv[MAX_KV];
    char keys[MAX_KV][72];
    char vals[MAX_KV][96];
    size_t n;
} kvset;

typedef struct runner {
    const char *path;
    const tsr_plugin_ref *ref;
    tsr_model_shape shape;
    /* The parameters of the stage check running: the defaults, or one of them changed as
     * params_label ("window=1") says. */
    const kvset *params;
    char params_label[120];
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

/* Binds `kv` and creates an instance on `shape`. Negative status with the reason in err when
 * binding or create fails. */
static tsr_status live_open(const runner *r, const tsr_model_shape *shape, const kvset *kv,
                            live *l, tsr_error *err) {
    const tsr_plugin_desc *d = r->ref->desc;
    memset(l, 0, sizeof *l);
    tsr_status st = tsr_params_bind(d->params, d->n_params, d->name, tsr_stage_name(d->stage),
                                    (tsr_src_loc){RUNNER, 0, 0}, kv->kv, kv->n, &l->bound, err);
    if (st < 0) return st;
    l->pool = tsr_pool_create(shape->n_threads);
    const void *init = tsr_stage_init_fill(d->stage, shape, &l->init_storage);
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
    if (live_open(r, &r->shape, &kv, l, &err) < 0) {
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
    /* A table breaking the rest of PARAM_1 made the loader refuse the plugin: "load" failed. */
    for (uint32_t i = 0; i < d->n_params; i++)
        if (!one_line(d->params[i].doc))
            fail(c, "parameter '%s': doc is empty, NULL or several lines", d->params[i].name);
    note(c, "%s ABI %u.%u needed, host %u.%u; %u parameters, %u commands",
         tsr_stage_name(d->stage), d->stage_major, d->stage_minor_needed,
         tsr_stage_abi_major(d->stage), tsr_stage_abi_minor(d->stage), d->n_params,
         d->n_commands);
}

static void check_commands(const runner *r, check *c) {
    const tsr_plugin_desc *d = r->ref->desc;
    /* A command breaking the rest of CMD_1 made the loader refuse the plugin: "load" failed. */
    for (uint32_t i = 0; i < d->n_commands; i++)
        if (!one_line(d->commands[i].doc))
            fail(c, "command '%s': doc is empty, NULL or several lines", d->commands[i].name);
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
            fail(c, "command '%s' on a fresh instance: %s: %s", cmd->name, err.msg,
                 plugin_error(&l));
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
    if (live_open(r, &r->shape, &kv, &l, &err) < 0) {
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

/* The shape the cache checks drive: more layers and KV heads than the synthetic one, query
 * heads grouped by two, and a context long enough to run past the budget of any policy whose
 * defaults fit it. */
enum { CACHE_LAYERS = 4, CACHE_HEADS = 8, CACHE_KV_HEADS = 4, CACHE_HEAD_DIM = 16,
       CACHE_CTX = 384, CACHE_SEQS = 4, CACHE_PREFILL = 24, CACHE_MAX_Q = 32 };

/* What the runner stored in one sequence: positions 0..n_pos-1, each with the K/V rows stored
 * there last (a truncation forgets the rest; writes continue the sequence). */
typedef struct cache_seq {
    int64_t id;
    bool alive, prefilled;
    int32_t n_pos;
    float *k, *v;  /* (n_layer, n_ctx, n_kv_head, head_dim) */
    char *exposed; /* (n_layer, n_kv_head, n_ctx) a cache_exposure of each position */
} cache_seq;

/* What the views of one layer and KV head did with a position so far: a position no longer
 * exposed was evicted, and may not come back (CACHE_2) until a truncation forgets it. */
enum cache_exposure { CACHE_NEVER = 0, CACHE_SHOWN = 1, CACHE_GONE = 2 };

/* A cache policy driven as the host drives it, with every view checked against cache_seq. */
typedef struct cache_drive {
    check *c;
    live l;
    const tsr_cache_vtable *vt;
    void *self;
    int32_t n_layer, n_head, n_kv_head, head_dim, n_ctx;
    cache_seq seq[CACHE_SEQS];
    uint64_t rng;
    int32_t *positions;  /* (n_ctx) 0, 1, 2...: the pos arrays of the writes */
    tsr_kv_view *views;  /* (n_kv_head) */
    float *scratch;      /* (head_dim) */
    float *q;            /* (CACHE_MAX_Q, n_head, head_dim): the queries of the current write */
    double *logit;       /* (n_ctx, CACHE_MAX_Q, group) */
    char *seen;          /* (n_ctx) */
    char when[128];      /* what the runner did last, for messages */
    /* Until a fork or truncation, every row stored is either held or was evicted. */
    bool rows_exact;
    int64_t rows_stored;
    bool has_stats;
    tsr_cache_stats base, last;
    /* Over the run: the shortest and longest view next to the positions held, and whether
     * the KV heads of one view ever differed in length (per-head eviction). */
    int64_t views_shorter;
    bool heads_differ;
} cache_drive;

static size_t cache_row(const cache_drive *d) { return (size_t)d->n_kv_head * d->head_dim; }

/* Bytes of a per-position mark of every layer and KV head. */
static size_t cache_marks(const cache_drive *d) {
    return (size_t)d->n_layer * d->n_kv_head * d->n_ctx;
}

static float *cache_ref(const cache_drive *d, float *kv, int32_t layer, int32_t pos) {
    return kv + ((size_t)layer * d->n_ctx + (size_t)pos) * cache_row(d);
}

static bool cache_open(const runner *r, check *c, cache_drive *d) {
    memset(d, 0, sizeof *d);
    tsr_model_shape shape = r->shape;
    shape.n_layer = CACHE_LAYERS;
    shape.n_head = CACHE_HEADS;
    shape.n_kv_head = CACHE_KV_HEADS;
    shape.head_dim = CACHE_HEAD_DIM;
    shape.n_ctx = CACHE_CTX;
    shape.n_seq_max = CACHE_SEQS;
    tsr_error err;
    if (live_open(r, &shape, r->params, &d->l, &err) < 0) {
        /* PARAM_3 lets a plugin refuse a value with a reason; edge-params checks the reason. */
        if (r->params_label[0]) note(c, "create refused: %s", err.msg);
        else fail(c, "create with default parameters failed: %s", err.msg);
        return false;
    }
    d->c = c;
    d->vt = d->l.inst->vtable;
    d->self = d->l.inst->self;
    d->n_layer = shape.n_layer;
    d->n_head = shape.n_head;
    d->n_kv_head = shape.n_kv_head;
    d->head_dim = shape.head_dim;
    d->n_ctx = shape.n_ctx;
    d->rng = 0x5eed0011;
    size_t ref_floats = (size_t)d->n_layer * d->n_ctx * cache_row(d);
    for (int i = 0; i < CACHE_SEQS; i++) {
        d->seq[i].k = malloc(ref_floats * sizeof(float));
        d->seq[i].v = malloc(ref_floats * sizeof(float));
        d->seq[i].exposed = malloc(cache_marks(d));
    }
    d->positions = malloc((size_t)d->n_ctx * sizeof *d->positions);
    for (int32_t i = 0; i < d->n_ctx; i++) d->positions[i] = i;
    d->views = calloc((size_t)d->n_kv_head, sizeof *d->views);
    d->scratch = malloc((size_t)d->head_dim * sizeof *d->scratch);
    d->q = malloc((size_t)CACHE_MAX_Q * d->n_head * d->head_dim * sizeof *d->q);
    d->logit = malloc((size_t)d->n_ctx * CACHE_MAX_Q * (d->n_head / d->n_kv_head) *
                      sizeof *d->logit);
    d->seen = malloc((size_t)d->n_ctx);
    d->rows_exact = true;
    d->has_stats = TSR_VT_HAS(d->vt, stats);
    d->base.struct_size = sizeof d->base;
    if (d->has_stats) d->vt->stats(d->self, &d->base);
    d->last = d->base;
    snprintf(d->when, sizeof d->when, "start");
    return true;
}

/* Ends what is still alive, checks that the stats came back, frees everything. */
static void cache_close(cache_drive *d) {
    for (int i = 0; i < CACHE_SEQS; i++)
        if (d->seq[i].alive) d->vt->seq_end(d->self, d->seq[i].id);
    if (d->has_stats && !d->c->failed) {
        tsr_cache_stats s = {.struct_size = sizeof s};
        d->vt->stats(d->self, &s);
        note(d->c, "stats after seq_end: %llu bytes reserved (%llu before), peak %llu, %lld "
                   "entries, %lld evicted", (unsigned long long)s.bytes_reserved,
             (unsigned long long)d->base.bytes_reserved, (unsigned long long)s.bytes_peak,
             (long long)s.entries, (long long)s.evicted);
        if (s.bytes_reserved != d->base.bytes_reserved || s.entries != d->base.entries)
            fail(d->c, "seq_end did not free the sequences: stats say %llu bytes and %lld "
                       "entries held, %llu and %lld before the first seq_begin",
                 (unsigned long long)s.bytes_reserved, (long long)s.entries,
                 (unsigned long long)d->base.bytes_reserved, (long long)d->base.entries);
    }
    for (int i = 0; i < CACHE_SEQS; i++) {
        free(d->seq[i].k);
        free(d->seq[i].v);
        free(d->seq[i].exposed);
    }
    free(d->positions);
    free(d->views);
    free(d->scratch);
    free(d->q);
    free(d->logit);
    free(d->seen);
    close_checked(d->c, &d->l);
}

static cache_seq *cache_find(cache_drive *d, int64_t id) {
    for (int i = 0; i < CACHE_SEQS; i++)
        if (d->seq[i].alive && d->seq[i].id == id) return &d->seq[i];
    return NULL;
}

static cache_seq *cache_free_slot(cache_drive *d, int64_t id) {
    for (int i = 0; i < CACHE_SEQS; i++)
        if (!d->seq[i].alive) {
            cache_seq *s = &d->seq[i];
            s->id = id;
            s->alive = true;
            s->prefilled = false;
            s->n_pos = 0;
            memset(s->exposed, CACHE_NEVER, cache_marks(d));
            return s;
        }
    return NULL;
}

static bool cache_begin(cache_drive *d, int64_t id) {
    tsr_status st = d->vt->seq_begin(d->self, id);
    if (st < 0) {
        fail(d->c, "seq_begin(%lld): status %d: %s", (long long)id, st, plugin_error(&d->l));
        return false;
    }
    cache_free_slot(d, id);
    return true;
}

static void cache_end(cache_drive *d, int64_t id) {
    cache_seq *s = cache_find(d, id);
    d->vt->seq_end(d->self, id);
    s->alive = false;
    /* What the sequence held leaves `entries` by an amount only the policy knows. */
    d->rows_exact = false;
}

/* Whether F16 storage explains the difference: round to nearest keeps 11 significant bits
 * (and subnormals an absolute 2^-25). */
static bool f16_close(float got, float want) {
    return fabsf(got - want) <= fabsf(want) * (1.0f / 2048.0f) + 3e-8f;
}

/* Calls view for (s, layer) and checks each KV head's view against what was stored. With
 * n_q > 0 it also plays attention for the queries d->q at positions q0..q0+n_q-1: where the
 * policy asked for scores, it adds the probabilities of the query heads of that KV head for
 * the queries at pos >= score_from_pos. With `mark` (n_kv_head, n_ctx), records the positions
 * exposed. */
static bool cache_check_view(cache_drive *d, cache_seq *s, int32_t layer, int32_t q0,
                             int32_t n_q, char *mark) {
    check *c = d->c;
    const int32_t hd = d->head_dim, nkv = d->n_kv_head, group = d->n_head / d->n_kv_head;
    for (int32_t h = 0; h < nkv; h++)
        d->views[h] = (tsr_kv_view){.struct_size = sizeof(tsr_kv_view)};
    tsr_status st = d->vt->view(d->self, s->id, layer, s->prefilled ? TSR_PHASE_DECODE
                                                                     : TSR_PHASE_PREFILL,
                                d->views);
    if (st < 0) {
        fail(c, "%s: view(seq %lld, layer %d): status %d: %s", d->when, (long long)s->id, layer,
             st, plugin_error(&d->l));
        return false;
    }
    for (int32_t h = 0; h < nkv; h++) {
        const tsr_kv_view *v = &d->views[h];
        if (v->n < s->n_pos) d->views_shorter++;
        if (v->n != d->views[0].n) d->heads_differ = true;
        char where[256];
        snprintf(where, sizeof where, "%s: seq %lld layer %d KV head %d", d->when,
                 (long long)s->id, layer, h);
        if (v->n < 0 || v->n > s->n_pos) {
            fail(c, "%s: the view has %lld entries, the sequence holds %d positions", where,
                 (long long)v->n, s->n_pos);
            return false;
        }
        if (v->n > 0 && !v->pos) {
            fail(c, "%s: %lld entries with a NULL pos", where, (long long)v->n);
            return false;
        }
        if (!tsr_kv_view_readable(v)) {
            fail(c, "%s: a view of dtype %d is not readable (F32/F16 without k/v, or another "
                    "dtype without load_k/load_v)", where, v->dtype);
            return false;
        }
        size_t elt = v->dtype == TSR_DTYPE_F32 ? 4 : 2, row_bytes = (size_t)hd * elt;
        if (v->n > 1 && (v->dtype == TSR_DTYPE_F32 || v->dtype == TSR_DTYPE_F16) &&
            (v->k_stride < row_bytes || v->v_stride < row_bytes)) {
            fail(c, "%s: strides %zu (k) and %zu (v) bytes, less than a row of %zu", where,
                 v->k_stride, v->v_stride, row_bytes);
            return false;
        }
        memset(d->seen, 0, (size_t)d->n_ctx);
        double err_num = 0, err_den = 0;
        for (int64_t j = 0; j < v->n; j++) {
            int32_t p = v->pos[j];
            if (p < 0 || p >= s->n_pos || d->seen[p]) {
                if (p >= 0 && p < s->n_pos)
                    fail(c, "%s: position %d is exposed twice (entry %lld)", where, p,
                         (long long)j);
                else
                    fail(c, "%s: entry %lld has position %d, which this sequence does not hold "
                            "(it holds positions 0..%d)", where, (long long)j, p, s->n_pos - 1);
                return false;
            }
            d->seen[p] = 1;
            if (mark) mark[(size_t)h * d->n_ctx + p] = 1;
            for (int values = 0; values < 2; values++) {
                const float *want = cache_ref(d, values ? s->v : s->k, layer, p) + (size_t)h * hd;
                size_t stride;
                const float *got = tsr_kv_view_rows(v, values, j, 1, hd, d->scratch, &stride);
                for (int32_t i = 0; i < hd; i++) {
                    bool ok = v->dtype == TSR_DTYPE_F32   ? got[i] == want[i]
                              : v->dtype == TSR_DTYPE_F16 ? f16_close(got[i], want[i])
                                                          : true;
                    if (!ok) {
                        fail(c, "%s: entry %lld (position %d): %s[%d] reads %.9g, %.9g was "
                                "stored (%s)", where, (long long)j, p, values ? "V" : "K", i,
                             got[i], want[i], v->dtype == TSR_DTYPE_F32
                                                  ? "F32 views give back exactly what was stored"
                                                  : "beyond F16 rounding");
                        return false;
                    }
                    err_num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
                    err_den += (double)want[i] * want[i];
                }
                if (values) continue;
                for (int32_t t = 0; t < n_q; t++)
                    for (int32_t g = 0; g < group; g++) {
                        const float *q = d->q + ((size_t)t * d->n_head + h * group + g) * hd;
                        double dot = 0;
                        for (int32_t i = 0; i < hd; i++) dot += (double)q[i] * got[i];
                        d->logit[((size_t)j * n_q + t) * group + g] = dot / sqrt((double)hd);
                    }
            }
        }
        char *exposed = s->exposed + ((size_t)layer * nkv + h) * d->n_ctx;
        for (int32_t p = 0; p < s->n_pos; p++) {
            if (d->seen[p] && exposed[p] == CACHE_GONE) {
                fail(c, "%s: position %d is exposed again, after a view without it (an evicted "
                        "entry stays evicted)", where, p);
                return false;
            }
            if (d->seen[p]) exposed[p] = CACHE_SHOWN;
            else if (exposed[p] == CACHE_SHOWN) exposed[p] = CACHE_GONE;
        }
        for (int32_t g = 0; v->score_acc && g < h; g++) {
            const tsr_kv_view *o = &d->views[g];
            if (o->score_acc && o->n > 0 && v->n > 0 && v->score_acc < o->score_acc + o->n &&
                o->score_acc < v->score_acc + v->n) {
                fail(c, "%s: score_acc overlaps KV head %d's: attention adds each KV head's "
                        "probabilities to its own (CACHE_8)", where, g);
                return false;
            }
        }
        for (int64_t j = 0; v->score_acc && j < v->n; j++)
            if (!(v->score_acc[j] >= 0) || !isfinite(v->score_acc[j])) {
                fail(c, "%s: score_acc[%lld] holds %g before attention adds to it: a sum of "
                        "probabilities is finite and >= 0 (the policy zeroes it, CACHE_8)",
                     where, (long long)j, v->score_acc[j]);
                return false;
            }
        double e = err_den > 0 ? sqrt(err_num / err_den) : 0;
        if (e >= 0.5) {
            fail(c, "%s: the view's K/V differ from what was stored at their positions (rel "
                    "rmse %.3g through load_k/load_v)", where, e);
            return false;
        }
        if (!v->score_acc) continue;
        for (int32_t t = 0; t < n_q; t++) {
            int32_t qpos = q0 + t;
            if (qpos < v->score_from_pos) continue;
            for (int32_t g = 0; g < group; g++) {
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j < v->n; j++)
                    if (v->pos[j] <= qpos)
                        mx = fmax(mx, d->logit[((size_t)j * n_q + t) * group + g]);
                for (int64_t j = 0; j < v->n; j++)
                    if (v->pos[j] <= qpos)
                        sum += exp(d->logit[((size_t)j * n_q + t) * group + g] - mx);
                for (int64_t j = 0; j < v->n; j++)
                    if (v->pos[j] <= qpos)
                        v->score_acc[j] += (float)(exp(d->logit[((size_t)j * n_q + t) * group +
                                                                g] - mx) / sum);
            }
        }
    }
    return true;
}

/* The counters after a step: peak at least what is held, peak and evicted never going down,
 * and, until a fork, truncation or seq_end, every row stored either held or evicted. */
static void cache_check_stats(cache_drive *d) {
    if (!d->has_stats || d->c->failed) return;
    tsr_cache_stats s = {.struct_size = sizeof s};
    d->vt->stats(d->self, &s);
    if (s.entries < 0 || s.bytes_peak < s.bytes_reserved || s.bytes_peak < d->last.bytes_peak ||
        s.evicted < d->last.evicted)
        fail(d->c, "%s: stats %lld entries, %lld evicted, %llu bytes reserved, peak %llu after "
                   "%lld evicted and peak %llu (peak below what is held, or a counter going "
                   "down)", d->when, (long long)s.entries, (long long)s.evicted,
             (unsigned long long)s.bytes_reserved, (unsigned long long)s.bytes_peak,
             (long long)d->last.evicted, (unsigned long long)d->last.bytes_peak);
    else if (d->rows_exact &&
             s.entries - d->base.entries + s.evicted - d->base.evicted != d->rows_stored)
        fail(d->c, "%s: stats count %lld entries held and %lld evicted since the start, but "
                   "%lld rows were stored (one per position, layer and KV head)", d->when,
             (long long)(s.entries - d->base.entries), (long long)(s.evicted - d->base.evicted),
             (long long)d->rows_stored);
    d->last = s;
}

/* One forward pass of the host over runs of `n[i]` new positions of sequences `ids[i]`:
 * layer by layer, each run stored then viewed (and its views checked and scored), then
 * prefill_end after a sequence's first forward and step_end after each later one. */
static bool cache_forward(cache_drive *d, const int64_t *ids, const int32_t *n, int n_runs) {
    check *c = d->c;
    const size_t row = cache_row(d);
    cache_seq *seqs[CACHE_SEQS];
    for (int i = 0; i < n_runs; i++) {
        cache_seq *s = seqs[i] = cache_find(d, ids[i]);
        for (int32_t layer = 0; layer < d->n_layer; layer++) {
            fill_random(cache_ref(d, s->k, layer, s->n_pos), (size_t)n[i] * row, &d->rng);
            fill_random(cache_ref(d, s->v, layer, s->n_pos), (size_t)n[i] * row, &d->rng);
        }
    }
    snprintf(d->when, sizeof d->when, "%s of positions %d..%d of seq %lld%s",
             seqs[0]->prefilled ? "decode step" : "prefill", seqs[0]->n_pos,
             seqs[0]->n_pos + n[0] - 1, (long long)ids[0], n_runs > 1 ? " (and others)" : "");
    for (int32_t layer = 0; layer < d->n_layer; layer++) {
        for (int i = 0; i < n_runs; i++) {
            cache_seq *s = seqs[i];
            tsr_kv_write w = {sizeof w, s->id, layer,
                              s->prefilled ? TSR_PHASE_DECODE : TSR_PHASE_PREFILL, n[i],
                              d->positions + s->n_pos, cache_ref(d, s->k, layer, s->n_pos),
                              cache_ref(d, s->v, layer, s->n_pos)};
            tsr_status st = d->vt->store(d->self, &w);
            if (st < 0) {
                fail(c, "%s: store(seq %lld, layer %d, %d rows): status %d: %s", d->when,
                     (long long)s->id, layer, n[i], st, plugin_error(&d->l));
                return false;
            }
            /* The view sees the new rows: the sequence holds them from here on. */
            int32_t q0 = s->n_pos;
            s->n_pos += n[i];
            fill_random(d->q, (size_t)n[i] * d->n_head * d->head_dim, &d->rng);
            for (size_t k = 0; k < (size_t)n[i] * d->n_head * d->head_dim; k++) d->q[k] *= 3;
            bool ok = cache_check_view(d, s, layer, q0, n[i], NULL);
            s->n_pos = q0;
            if (!ok) return false;
        }
    }
    for (int i = 0; i < n_runs; i++) {
        cache_seq *s = seqs[i];
        s->n_pos += n[i];
        d->rows_stored += (int64_t)n[i] * d->n_layer * d->n_kv_head;
        const char *hook_name = s->prefilled ? "step_end" : "prefill_end";
        tsr_status (*hook)(void *, int64_t) =
            s->prefilled ? (TSR_VT_HAS(d->vt, step_end) ? d->vt->step_end : NULL)
                         : (TSR_VT_HAS(d->vt, prefill_end) ? d->vt->prefill_end : NULL);
        s->prefilled = true;
        tsr_status st = hook ? hook(d->self, s->id) : TSR_OK;
        if (st < 0) {
            fail(c, "%s: %s(seq %lld): status %d: %s", d->when, hook_name, (long long)s->id, st,
                 plugin_error(&d->l));
            return false;
        }
    }
    cache_check_stats(d);
    return !c->failed;
}

/* A forward of one run. */
static bool cache_step(cache_drive *d, int64_t id, int32_t n) {
    return cache_forward(d, &id, &n, 1);
}

/* The positions every KV head of every layer of `s` exposes, checked, into
 * mark (n_layer, n_kv_head, n_ctx). */
static bool cache_exposed(cache_drive *d, cache_seq *s, char *mark) {
    memset(mark, 0, (size_t)d->n_layer * d->n_kv_head * d->n_ctx);
    for (int32_t layer = 0; layer < d->n_layer; layer++)
        if (!cache_check_view(d, s, layer, 0, 0,
                              mark + (size_t)layer * d->n_kv_head * d->n_ctx))
            return false;
    return true;
}

/* A sequence that grows from a prompt to the end of the context one position per step, with
 * a second one beside it that starts later, continues its prompt in a second chunk (a decode
 * step of several tokens) and stops earlier. */
static void check_cache_long_run(const runner *r, check *c) {
    cache_drive d;
    if (!cache_open(r, c, &d)) return;
    bool ok = cache_begin(&d, 0) && cache_step(&d, 0, CACHE_PREFILL);
    for (int step = 0; ok && cache_find(&d, 0)->n_pos < d.n_ctx; step++) {
        if (step == 16) {
            ok = cache_begin(&d, 1) && cache_step(&d, 1, 13) && cache_step(&d, 1, 7);
            continue;
        }
        int64_t ids[2] = {0, 1};
        int32_t n[2] = {1, 1};
        cache_seq *other = cache_find(&d, 1);
        ok = cache_forward(&d, ids, n, other && other->n_pos < d.n_ctx - 64 ? 2 : 1);
    }
    if (ok)
        note(c, "seq 0 grew to %d positions, seq 1 to %d; %lld rows stored; %lld views held "
                "fewer entries than positions (eviction)%s", d.n_ctx, cache_find(&d, 1)->n_pos,
             (long long)d.rows_stored, (long long)d.views_shorter,
             d.heads_differ ? ", KV heads of one view of different lengths" : "");
    cache_close(&d);
}

/* A fork in the middle of a run: the copy exposes what its source exposes, then the two take
 * different tokens at the same positions and must not see each other's; the source ends first. */
static void check_cache_fork(const runner *r, check *c) {
    cache_drive d;
    if (!cache_open(r, c, &d)) return;
    size_t mark_bytes = (size_t)d.n_layer * d.n_kv_head * d.n_ctx;
    char *src_mark = malloc(mark_bytes), *dst_mark = malloc(mark_bytes);
    bool ok = cache_begin(&d, 0) && cache_step(&d, 0, CACHE_PREFILL);
    while (ok && cache_find(&d, 0)->n_pos < 200) ok = cache_step(&d, 0, 1);
    tsr_status st = ok ? d.vt->seq_fork(d.self, 0, 2) : TSR_OK;
    if (st < 0) {
        fail(c, "seq_fork(0, 2) at position 200: status %d: %s", st, plugin_error(&d.l));
        ok = false;
    }
    if (ok) {
        cache_seq *src = cache_find(&d, 0), *dst = cache_free_slot(&d, 2);
        size_t ref_bytes = (size_t)d.n_layer * d.n_ctx * cache_row(&d) * sizeof(float);
        memcpy(dst->k, src->k, ref_bytes);
        memcpy(dst->v, src->v, ref_bytes);
        memcpy(dst->exposed, src->exposed, cache_marks(&d));
        dst->n_pos = src->n_pos;
        dst->prefilled = src->prefilled;
        d.rows_exact = false;
        snprintf(d.when, sizeof d.when, "after seq_fork(0, 2)");
        ok = cache_exposed(&d, src, src_mark) && cache_exposed(&d, dst, dst_mark);
        for (size_t i = 0; ok && i < mark_bytes; i++)
            if (src_mark[i] != dst_mark[i]) {
                size_t per_layer = (size_t)d.n_kv_head * d.n_ctx;
                fail(c, "after seq_fork(0, 2): layer %zu KV head %zu: position %zu is exposed "
                        "by seq %d only; a fork is a copy", i / per_layer,
                     i % per_layer / (size_t)d.n_ctx, i % (size_t)d.n_ctx, src_mark[i] ? 0 : 2);
                ok = false;
            }
    }
    int64_t ids[2] = {0, 2};
    int32_t n[2] = {1, 1};
    for (int step = 0; ok && step < 100; step++) ok = cache_forward(&d, ids, n, 2);
    if (ok) cache_end(&d, 0);
    for (int step = 0; ok && step < 20; step++) ok = cache_step(&d, 2, 1);
    free(src_mark);
    free(dst_mark);
    cache_close(&d);
}

/* Cuts a sequence back to n_pos positions: it must then expose exactly what it exposed below
 * n_pos, or refuse with TSR_E_UNSUPPORTED, leaving the sequence as it was, when it no longer
 * has some position >= n_pos (CACHE_6). */
static bool cache_truncate(cache_drive *d, int64_t id, int32_t n_pos) {
    check *c = d->c;
    cache_seq *s = cache_find(d, id);
    size_t per_layer = (size_t)d->n_kv_head * d->n_ctx, mark_bytes = d->n_layer * per_layer;
    char *before = malloc(mark_bytes), *after = malloc(mark_bytes);
    snprintf(d->when, sizeof d->when, "before seq_truncate(%lld, %d)", (long long)id, n_pos);
    bool ok = cache_exposed(d, s, before), evicted_some = false;
    for (size_t i = 0; ok && i < mark_bytes; i++)
        if ((int32_t)(i % d->n_ctx) >= n_pos && (int32_t)(i % d->n_ctx) < s->n_pos && !before[i])
            evicted_some = true;
    tsr_status st = ok ? d->vt->seq_truncate(d->self, id, n_pos) : TSR_OK;
    d->rows_exact = false;
    if (ok && st == TSR_E_UNSUPPORTED) {
        if (!evicted_some) {
            fail(c, "seq_truncate(%lld, %d) returned TSR_E_UNSUPPORTED, but every position "
                    "from %d to %d was still exposed: a policy refuses only when it no longer "
                    "has some of them (CACHE_6)", (long long)id, n_pos, n_pos, s->n_pos - 1);
            ok = false;
        } else {
            note(c, "seq_truncate(%lld, %d): unsupported: %s", (long long)id, n_pos,
                 plugin_error(&d->l));
        }
    } else if (ok && st < 0) {
        fail(c, "seq_truncate(%lld, %d): status %d: %s", (long long)id, n_pos, st,
             plugin_error(&d->l));
        ok = false;
    } else if (ok) {
        s->n_pos = n_pos;
        for (size_t i = 0; i < mark_bytes; i++)
            if ((int32_t)(i % d->n_ctx) >= n_pos) s->exposed[i] = CACHE_NEVER;
    }
    snprintf(d->when, sizeof d->when, "after seq_truncate(%lld, %d)%s", (long long)id, n_pos,
             st == TSR_E_UNSUPPORTED ? " refused" : "");
    ok = ok && cache_exposed(d, s, after);
    for (size_t i = 0; ok && i < mark_bytes; i++) {
        bool kept = before[i] && (st == TSR_E_UNSUPPORTED || (int32_t)(i % d->n_ctx) < n_pos);
        if (kept != (after[i] != 0)) {
            fail(c, "%s: layer %zu KV head %zu: position %zu is %s", d->when, i / per_layer,
                 i % per_layer / (size_t)d->n_ctx, i % (size_t)d->n_ctx,
                 kept ? "no longer exposed" : "exposed again");
            ok = false;
        }
    }
    free(before);
    free(after);
    return ok;
}

/* Speculative rollback past the budget: a shallow cut then several tokens verified in one
 * step, and a deep cut into the prompt. */
static void check_cache_truncate(const runner *r, check *c) {
    cache_drive d;
    if (!cache_open(r, c, &d)) return;
    bool ok = cache_begin(&d, 0) && cache_step(&d, 0, CACHE_PREFILL);
    while (ok && cache_find(&d, 0)->n_pos < 300) ok = cache_step(&d, 0, 1);
    ok = ok && cache_truncate(&d, 0, 290) && cache_step(&d, 0, 6);
    while (ok && cache_find(&d, 0)->n_pos < 320) ok = cache_step(&d, 0, 1);
    ok = ok && cache_truncate(&d, 0, 5);
    for (int step = 0; ok && step < 20; step++) ok = cache_step(&d, 0, 1);
    cache_close(&d);
}

/* ---- attention ------------------------------------------------------------------------- */

/* Query heads per KV head 1, 2, 4 and 8, and three head sizes. */
typedef struct attn_shape {
    int32_t n_head, n_kv_head, head_dim;
} attn_shape;
static const attn_shape attn_shapes[] = {{4, 4, 16}, {4, 2, 16}, {8, 2, 32}, {8, 1, 64}};

enum { ATTN_SPAN = 64, ATTN_MAX_KV = 40, ATTN_MAX_Q = 6 };

/* How a view hands its rows over. */
enum { ATTN_F32, ATTN_F16, ATTN_LOADER };
static const char *const attn_kind_names[] = {"F32", "F16", "load_k/load_v only"};

/* The rows of one KV head's view: `k`/`v` dense f32, what attention must read (already
 * rounded to F16 for an F16 view), and the storage the view points to. */
typedef struct attn_head {
    int32_t head_dim;
    float *k, *v;             /* (ATTN_MAX_KV, head_dim) */
    float *k_pad, *v_pad;     /* F32 storage with rows ATTN_PAD floats apart */
    uint16_t *k16, *v16;      /* F16 storage */
    int32_t pos[ATTN_MAX_KV];
    float acc[ATTN_MAX_KV];
} attn_head;

/* F32 views with rows wider than head_dim: attention must use the stride. */
#define ATTN_PAD(hd) ((size_t)(hd) + 5)

static void attn_load_k(const void *ctx, int64_t j0, int64_t n, float *dst) {
    const attn_head *a = ctx;
    memcpy(dst, a->k + j0 * a->head_dim, (size_t)n * a->head_dim * sizeof *dst);
}

static void attn_load_v(const void *ctx, int64_t j0, int64_t n, float *dst) {
    const attn_head *a = ctx;
    memcpy(dst, a->v + j0 * a->head_dim, (size_t)n * a->head_dim * sizeof *dst);
}

/* Fills head `a` with n random entries at distinct positions drawn from [1, ATTN_SPAN) in
 * random order, and points `view` at them in the given storage. */
static void attn_make_view(attn_head *a, tsr_kv_view *view, int64_t n, int kind, uint64_t *rng) {
    const int32_t hd = a->head_dim;
    int32_t all[ATTN_SPAN - 1];
    for (int i = 0; i < ATTN_SPAN - 1; i++) all[i] = i + 1;
    for (int64_t j = 0; j < n; j++) {
        int64_t pick = j + (int64_t)((rng_uniform(rng) + 1.0f) * 0.5f * (float)(ATTN_SPAN - 1 - j));
        if (pick >= ATTN_SPAN - 1) pick = ATTN_SPAN - 2;
        int32_t t = all[j];
        all[j] = all[pick];
        all[pick] = t;
        a->pos[j] = all[j];
    }
    fill_random(a->k, (size_t)n * hd, rng);
    fill_random(a->v, (size_t)n * hd, rng);
    for (int64_t i = 0; i < n * hd; i++) {
        a->k16[i] = tsr_f32_to_f16(a->k[i]);
        a->v16[i] = tsr_f32_to_f16(a->v[i]);
        if (kind == ATTN_F16) {
            a->k[i] = tsr_f16_to_f32(a->k16[i]);
            a->v[i] = tsr_f16_to_f32(a->v16[i]);
        }
    }
    for (int64_t j = 0; j < n; j++) {
        memcpy(a->k_pad + j * ATTN_PAD(hd), a->k + j * hd, (size_t)hd * sizeof(float));
        memcpy(a->v_pad + j * ATTN_PAD(hd), a->v + j * hd, (size_t)hd * sizeof(float));
    }
    *view = (tsr_kv_view){.struct_size = sizeof *view, .n = n, .pos = a->pos};
    if (kind == ATTN_F32) {
        view->dtype = TSR_DTYPE_F32;
        view->k = a->k_pad;
        view->v = a->v_pad;
        view->k_stride = view->v_stride = ATTN_PAD(hd) * sizeof(float);
    } else if (kind == ATTN_F16) {
        view->dtype = TSR_DTYPE_F16;
        view->k = a->k16;
        view->v = a->v16;
        view->k_stride = view->v_stride = (size_t)hd * sizeof(uint16_t);
    } else {
        view->dtype = TSR_DTYPE_PLUGIN_FIRST + 7;
        view->load_k = attn_load_k;
        view->load_v = attn_load_v;
        view->load_ctx = a;
    }
}

/* Softmax attention by the book: out (n_q, n_head, head_dim), zeros for a query that sees no
 * entry; acc (n_kv_head, ATTN_MAX_KV) receives what score_acc should. */
static void reference_attention(const tsr_attention_call *call, const attn_shape *sh,
                                const attn_head *heads, double *out, double *acc) {
    const int32_t hd = sh->head_dim, group = sh->n_head / sh->n_kv_head;
    double p[ATTN_MAX_KV];
    memset(acc, 0, (size_t)sh->n_kv_head * ATTN_MAX_KV * sizeof *acc);
    for (int64_t t = 0; t < call->n_q; t++) {
        for (int32_t h = 0; h < sh->n_head; h++) {
            int32_t g = h / group;
            const attn_head *a = &heads[g];
            const tsr_kv_view *view = &call->views[g];
            const float *q = call->q + ((size_t)t * sh->n_head + h) * hd;
            double mx = -INFINITY, sum = 0;
            for (int64_t j = 0; j < view->n; j++) {
                p[j] = -INFINITY;
                if (a->pos[j] > call->q_pos[t]) continue;
                double s = 0;
                for (int32_t i = 0; i < hd; i++) s += (double)q[i] * a->k[j * hd + i];
                p[j] = s * call->scale;
                mx = fmax(mx, p[j]);
            }
            double *o = out + ((size_t)t * sh->n_head + h) * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = 0;
            if (mx == -INFINITY) continue;
            for (int64_t j = 0; j < view->n; j++) sum += p[j] = exp(p[j] - mx);
            for (int64_t j = 0; j < view->n; j++) {
                p[j] /= sum;
                for (int32_t i = 0; i < hd; i++) o[i] += p[j] * a->v[j * hd + i];
                if (call->q_pos[t] >= view->score_from_pos)
                    acc[(size_t)g * ATTN_MAX_KV + j] += p[j];
            }
        }
    }
}

/* One call of the attention checks: its queries, where the scores start, how the views hand
 * their rows over. */
typedef struct attn_case {
    int32_t n_q, q_pos0, from_pos, kind;
    bool empty_last; /* with one KV head: its view is empty */
} attn_case;

static const attn_case attn_cases[] = {
    {6, 30, 33, ATTN_F32, false},    /* prefill in the middle of the entries */
    {1, 63, 0, ATTN_F16, false},     /* decode after all of them */
    {5, 0, 2, ATTN_LOADER, false},   /* prefill from position 0: the first queries see nothing */
    {1, 40, 41, ATTN_F32, true},     /* decode without scores to add; an empty view */
};

/* Random views against the reference, for every shape and case. `scores` checks score_acc
 * (ATTN_3) instead of out (ATTN_2), so that each rule fails under its own name. */
static void run_attention(const runner *r, check *c, bool scores) {
    uint64_t rng = 0x5eed0002;
    for (size_t si = 0; si < sizeof attn_shapes / sizeof attn_shapes[0] && !c->failed; si++) {
        const attn_shape *sh = &attn_shapes[si];
        tsr_model_shape shape = r->shape;
        shape.n_head = sh->n_head;
        shape.n_kv_head = sh->n_kv_head;
        shape.head_dim = sh->head_dim;
        live l;
        tsr_error err;
        if (live_open(r, &shape, r->params, &l, &err) < 0) {
            if (r->params_label[0]) note(c, "create refused: %s", err.msg);
            else fail(c, "create (n_head %d, n_kv_head %d, head_dim %d) failed: %s",
                      sh->n_head, sh->n_kv_head, sh->head_dim, err.msg);
            return;
        }
        const tsr_attention_vtable *vt = l.inst->vtable;
        void *self = l.inst->self;
        const int32_t nh = sh->n_head, nkv = sh->n_kv_head, hd = sh->head_dim;
        attn_head *heads = calloc((size_t)nkv, sizeof *heads);
        tsr_kv_view *views = calloc((size_t)nkv, sizeof *views);
        for (int32_t g = 0; g < nkv; g++) {
            attn_head *a = &heads[g];
            a->head_dim = hd;
            a->k = malloc((size_t)ATTN_MAX_KV * hd * sizeof(float));
            a->v = malloc((size_t)ATTN_MAX_KV * hd * sizeof(float));
            a->k_pad = malloc(ATTN_MAX_KV * ATTN_PAD(hd) * sizeof(float));
            a->v_pad = malloc(ATTN_MAX_KV * ATTN_PAD(hd) * sizeof(float));
            a->k16 = malloc((size_t)ATTN_MAX_KV * hd * sizeof(uint16_t));
            a->v16 = malloc((size_t)ATTN_MAX_KV * hd * sizeof(uint16_t));
        }
        size_t n_out = (size_t)ATTN_MAX_Q * nh * hd;
        float *q = malloc(n_out * sizeof *q), *out = malloc(n_out * sizeof *out);
        double *ref = malloc(n_out * sizeof *ref);
        double *ref_acc = malloc((size_t)nkv * ATTN_MAX_KV * sizeof *ref_acc);
        int32_t q_pos[ATTN_MAX_Q];
        tsr_status st;
        if (TSR_VT_HAS(vt, seq_begin) && (st = vt->seq_begin(self, 0)) < 0)
            fail(c, "seq_begin(0): status %d: %s", st, plugin_error(&l));
        for (size_t ci = 0; ci < sizeof attn_cases / sizeof attn_cases[0] && !c->failed; ci++) {
            const attn_case *ac = &attn_cases[ci];
            /* A different KV head's view is empty in each case when there are several. */
            int32_t empty = nkv > 1 ? (int32_t)(ci % (size_t)nkv) : ac->empty_last ? 0 : -1;
            for (int32_t g = 0; g < nkv; g++) {
                int64_t n = g == empty ? 0
                                       : 1 + (int64_t)((rng_uniform(&rng) + 1.0f) * 0.5f *
                                                       (ATTN_MAX_KV - 1));
                attn_make_view(&heads[g], &views[g], n, ac->kind, &rng);
                /* A policy's running sums, which attention adds to. */
                for (int j = 0; j < ATTN_MAX_KV; j++) heads[g].acc[j] = (float)j;
                views[g].score_acc = scores ? heads[g].acc : NULL;
                views[g].score_from_pos = ac->from_pos;
            }
            fill_random(q, (size_t)ac->n_q * nh * hd, &rng);
            /* Larger queries sharpen the softmax, so a wrong mask or a wrong entry shows. */
            for (size_t i = 0; i < (size_t)ac->n_q * nh * hd; i++) q[i] *= 3.0f;
            for (int32_t t = 0; t < ac->n_q; t++) q_pos[t] = ac->q_pos0 + t;
            for (size_t i = 0; i < n_out; i++) out[i] = NAN;
            tsr_attention_call call = {
                .struct_size = sizeof call, .seq_id = 0, .layer = (int32_t)ci % shape.n_layer,
                .phase = ci == 0 ? TSR_PHASE_PREFILL : TSR_PHASE_DECODE, .n_q = ac->n_q, .q = q,
                .q_pos = q_pos, .scale = 1.0f / sqrtf((float)hd), .views = views, .out = out};
            char what[160];
            snprintf(what, sizeof what, "n_head %d, n_kv_head %d, head_dim %d, queries at %d..%d, "
                     "%s views", nh, nkv, hd, ac->q_pos0, ac->q_pos0 + ac->n_q - 1,
                     attn_kind_names[ac->kind]);
            if ((st = vt->forward(self, &call)) < 0) {
                fail(c, "%s: forward: status %d: %s", what, st, plugin_error(&l));
                break;
            }
            reference_attention(&call, sh, heads, ref, ref_acc);
            if (!scores) {
                size_t n = (size_t)ac->n_q * nh * hd;
                long bad = -1;
                for (size_t i = 0; i < n && bad < 0; i++)
                    if (!isfinite(out[i])) bad = (long)i;
                if (bad < 0) bad = first_mismatch(out, ref, n, 1e-4, 1e-3);
                if (bad >= 0 && !isfinite(out[bad])) {
                    fail(c, "%s: out[query %ld, head %ld, %ld] = %g: not written, or not "
                            "finite (a query that sees no entry gets zeros)", what,
                         bad / (nh * hd), bad / hd % nh, bad % hd, out[bad]);
                } else if (bad >= 0) {
                    long t = bad / (nh * hd), h = bad / hd % nh;
                    fail(c, "%s: out[query %ld, head %ld, %ld] = %.6g, the reference softmax "
                            "attention gives %.6g (query head %ld reads KV head %ld, which has "
                            "%lld entries; an entry is visible when its pos <= %d)", what, t, h,
                         bad % hd, out[bad], ref[bad], h, h / (nh / nkv),
                         (long long)views[h / (nh / nkv)].n, q_pos[t]);
                }
                continue;
            }
            for (int32_t g = 0; g < nkv && !c->failed; g++) {
                for (int64_t j = 0; j < views[g].n; j++) {
                    double want = j + ref_acc[(size_t)g * ATTN_MAX_KV + j];
                    if (fabs(heads[g].acc[j] - want) <= 1e-4 + 1e-4 * want) continue;
                    fail(c, "%s: views[%d].score_acc[%lld] = %.6g, expected %.6g (it held %d; "
                            "attention adds the probabilities summed over the %d query heads "
                            "of the KV head and the queries at pos >= %d)", what, g,
                         (long long)j, heads[g].acc[j], want, (int)j, nh / nkv, ac->from_pos);
                    break;
                }
            }
        }
        if (TSR_VT_HAS(vt, seq_end)) vt->seq_end(self, 0);
        for (int32_t g = 0; g < nkv; g++) {
            attn_head *a = &heads[g];
            free(a->k);
            free(a->v);
            free(a->k_pad);
            free(a->v_pad);
            free(a->k16);
            free(a->v16);
        }
        free(heads);
        free(views);
        free(q);
        free(out);
        free(ref);
        free(ref_acc);
        close_checked(c, &l);
    }
}

static void check_attention(const runner *r, check *c) { run_attention(r, c, false); }
static void check_attention_scores(const runner *r, check *c) { run_attention(r, c, true); }

/* ---- decoder --------------------------------------------------------------------------- */

#define FAKE_MAX_SEQ 64
#define FAKE_MAX_EMIT 512

/* A fake model behind tsr_decode_api: deterministic logits from (token, position), and a
 * record of every rule the decoder breaks. A decoder that drafts gets a second one as its
 * draft model, whose logits agree with the target's often but not always. */
typedef struct fake_model {
    check *c;
    int req; /* 1, 2...: for messages */
    const char *name; /* "" for the target, "draft " for the draft */
    struct fake_model *target; /* the draft's: the request's target model; NULL for the target */
    int32_t n_vocab, n_ctx;
    int32_t len[FAKE_MAX_SEQ];
    bool alive[FAKE_MAX_SEQ];
    bool stopped[FAKE_MAX_SEQ];      /* emit returned 1 for the sequence */
    int64_t emitted_by[FAKE_MAX_SEQ];
    int64_t emitted, limit, n_forward, calls_after_stop;
    int32_t tokens[FAKE_MAX_EMIT];   /* every emitted token, in order of emission */
    /* The target's forward begun by forward_begin: it runs at forward_wait, on the entries as
     * they are then (a decoder that changed them in between would break DEC_2 or DEC_8). */
    const tsr_batch_entry *begun;
    int64_t n_begun;
    float *begun_logits;
} fake_model;

static float fake_logit(int32_t token, int32_t pos, int32_t v) {
    uint64_t h = (uint64_t)(uint32_t)token * 0x9e3779b97f4a7c15ull ^
                 (uint64_t)(uint32_t)pos * 0xc2b2ae3d27d4eb4full ^ (uint64_t)(uint32_t)v;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return (float)((double)(h >> 40) / (double)(1ull << 24)) * 8.0f - 4.0f;
}

/* The draft's: the target's logit and a disturbance from another stream, so that a draft's
 * proposals are accepted sometimes and rejected sometimes. */
static float fake_draft_logit(int32_t token, int32_t pos, int32_t v) {
    return fake_logit(token, pos, v) + 0.5f * fake_logit(token ^ 0x5bd1, pos + 7, v);
}

/* True when emit returned 1 for every sequence that emitted: the request is over (DEC_3). */
static bool fake_done(const fake_model *m) {
    bool any = false;
    for (int s = 0; s < FAKE_MAX_SEQ; s++) {
        if (m->emitted_by[s] > 0 && !m->stopped[s]) return false;
        any |= m->stopped[s];
    }
    return any;
}

static bool seq_ok(fake_model *m, int64_t seq, const char *what) {
    if (seq < 0 || seq >= FAKE_MAX_SEQ || !m->alive[seq]) {
        fail(m->c, "request %d: %s%s: sequence %lld is not alive (never begun or forked, or "
                   "already ended)", m->req, m->name, what, (long long)seq);
        return false;
    }
    return true;
}

/* DEC_8: between forward_begin and forward_wait, nothing of the target's API. */
static bool not_begun(fake_model *m, const char *what) {
    if (!m->begun) return true;
    fail(m->c, "request %d: %s between forward_begin and forward_wait (DEC_8)", m->req, what);
    return false;
}

static tsr_status fake_forward(void *ctx, const tsr_batch_entry *e, int64_t n, float *logits) {
    fake_model *m = ctx;
    if (!not_begun(m, "forward")) return TSR_E_STATE;
    fake_model *target = m->target ? m->target : m;
    if (fake_done(target)) target->calls_after_stop++;
    if (n <= 0) {
        fail(m->c, "request %d: %sforward with %lld entries", m->req, m->name, (long long)n);
        return TSR_E_INVALID;
    }
    m->n_forward++;
    int64_t row = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!seq_ok(m, e[i].seq_id, "forward")) return TSR_E_INVALID;
        if (!m->target && m->stopped[e[i].seq_id]) target->calls_after_stop++;
        /* The host runs each sequence's entries as one run. */
        for (int64_t j = 0; i > 0 && e[i - 1].seq_id != e[i].seq_id && j < i - 1; j++)
            if (e[j].seq_id == e[i].seq_id) {
                fail(m->c, "request %d: %sforward entry %lld: the entries of sequence %lld are "
                           "not contiguous in the batch", m->req, m->name, (long long)i,
                     (long long)e[i].seq_id);
                return TSR_E_INVALID;
            }
        int32_t *len = &m->len[e[i].seq_id];
        if (e[i].pos != *len || e[i].pos >= m->n_ctx || e[i].token < 0 ||
            e[i].token >= m->n_vocab) {
            fail(m->c, "request %d: %sforward entry %lld: seq %lld pos %d token %d; the sequence "
                       "holds %d positions (the next one is %d), n_ctx %d, n_vocab %d", m->req,
                 m->name, (long long)i, (long long)e[i].seq_id, e[i].pos, e[i].token, *len, *len,
                 m->n_ctx, m->n_vocab);
            return TSR_E_INVALID;
        }
        (*len)++;
        if (!e[i].want_logits) continue;
        for (int32_t v = 0; v < m->n_vocab; v++)
            logits[row * m->n_vocab + v] = m->target ? fake_draft_logit(e[i].token, e[i].pos, v)
                                                     : fake_logit(e[i].token, e[i].pos, v);
        row++;
    }
    return TSR_OK;
}

static tsr_status fake_fork(void *ctx, int64_t src, int64_t dst) {
    fake_model *m = ctx;
    if (!not_begun(m, "seq_fork")) return TSR_E_STATE;
    if (!seq_ok(m, src, "seq_fork")) return TSR_E_INVALID;
    if (dst < 0 || dst >= FAKE_MAX_SEQ || m->alive[dst]) {
        fail(m->c, "request %d: %sseq_fork(%lld, %lld): the destination is alive or out of range "
                   "(the fake model has %d sequences)", m->req, m->name, (long long)src,
             (long long)dst, FAKE_MAX_SEQ);
        return TSR_E_INVALID;
    }
    m->alive[dst] = true;
    m->len[dst] = m->len[src];
    return TSR_OK;
}

static tsr_status fake_truncate(void *ctx, int64_t seq, int32_t n_pos) {
    fake_model *m = ctx;
    if (!not_begun(m, "seq_truncate")) return TSR_E_STATE;
    if (!seq_ok(m, seq, "seq_truncate")) return TSR_E_INVALID;
    if (n_pos < 0) {
        fail(m->c, "request %d: %sseq_truncate(%lld, %d): negative position", m->req, m->name,
             (long long)seq, n_pos);
        return TSR_E_INVALID;
    }
    if (n_pos < m->len[seq]) m->len[seq] = n_pos;
    return TSR_OK;
}

static tsr_status fake_seq_end(void *ctx, int64_t seq) {
    fake_model *m = ctx;
    if (!not_begun(m, "seq_end")) return TSR_E_STATE;
    if (!seq_ok(m, seq, "seq_end")) return TSR_E_INVALID;
    m->alive[seq] = false;
    return TSR_OK;
}

static int32_t fake_emit_seq(void *ctx, int64_t seq, const int32_t *tokens, int64_t n) {
    fake_model *m = ctx;
    if (!not_begun(m, "emit")) return 1;
    if (seq < 0 || seq >= FAKE_MAX_SEQ) {
        fail(m->c, "request %d: emit_seq for sequence %lld (the fake model has %d)", m->req,
             (long long)seq, FAKE_MAX_SEQ);
        return 1;
    }
    if (m->stopped[seq]) {
        m->calls_after_stop++;
        return 1;
    }
    for (int64_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->n_vocab)
            fail(m->c, "request %d: emitted token %d, outside [0, n_vocab = %d)", m->req,
                 tokens[i], m->n_vocab);
        if (m->emitted + i < FAKE_MAX_EMIT) m->tokens[m->emitted + i] = tokens[i];
    }
    m->emitted += n;
    m->emitted_by[seq] += n;
    if (m->emitted_by[seq] >= m->limit) m->stopped[seq] = true;
    return m->stopped[seq];
}

static int32_t fake_emit(void *ctx, const int32_t *tokens, int64_t n) {
    return fake_emit_seq(ctx, 0, tokens, n);
}

static int32_t fake_is_eog(void *ctx, int32_t token) { return 0; }

static tsr_status fake_forward_begin(void *ctx, const tsr_batch_entry *e, int64_t n,
                                     float *logits) {
    fake_model *m = ctx;
    if (!not_begun(m, "a second forward_begin")) return TSR_E_STATE;
    m->begun = e;
    m->n_begun = n;
    m->begun_logits = logits;
    return TSR_OK;
}

static tsr_status fake_forward_wait(void *ctx) {
    fake_model *m = ctx;
    const tsr_batch_entry *e = m->begun;
    if (!e) {
        fail(m->c, "request %d: forward_wait without forward_begin (DEC_8)", m->req);
        return TSR_E_STATE;
    }
    m->begun = NULL;
    return fake_forward(m, e, m->n_begun, m->begun_logits);
}

/* The draft_use a decoder declares (0 for other stages and for decoders without the field). */
static int32_t draft_use(const tsr_plugin_desc *d) {
    const tsr_decoder_vtable *vt = d->vtable;
    return d->stage == TSR_STAGE_DECODER && TSR_VT_HAS(vt, draft_use) ? vt->draft_use : 0;
}

/* DEC_6 for one model: every sequence but 0 ended. */
static void check_forks_ended(check *c, int req, const fake_model *m) {
    for (int s = 1; s < FAKE_MAX_SEQ && !c->failed; s++)
        if (m->alive[s])
            fail(c, "request %d: %ssequence %d was forked and never ended (DEC_6)", req, m->name,
                 s);
}

/* Runs one request of `n_prompt` tokens allowing `limit` new ones per sequence against the
 * fake model *m (and a fake draft model when the decoder drafts); false when a rule was
 * broken (the check has failed). */
static bool fake_request(const runner *r, check *c, live *l, fake_model *m, int req,
                         int64_t n_prompt, int64_t limit) {
    const tsr_decoder_vtable *vt = l->inst->vtable;
    *m = (fake_model){.c = c, .req = req, .name = "", .n_vocab = r->shape.n_vocab,
                      .n_ctx = r->shape.n_ctx, .limit = limit};
    fake_model draft = *m;
    draft.name = "draft ";
    draft.target = m;
    m->alive[0] = draft.alive[0] = true;
    int32_t *prompt = malloc((size_t)n_prompt * sizeof *prompt);
    for (int64_t i = 0; i < n_prompt; i++) prompt[i] = (int32_t)((i * 37 + 1) % m->n_vocab);
    tsr_decode_api draft_api = {.struct_size = sizeof draft_api, .ctx = &draft,
                                .n_vocab = m->n_vocab, .n_ctx = m->n_ctx,
                                .forward = fake_forward, .seq_fork = fake_fork,
                                .seq_truncate = fake_truncate, .seq_end = fake_seq_end};
    tsr_decode_api api = {.struct_size = sizeof api, .ctx = m, .n_vocab = m->n_vocab,
                          .n_ctx = m->n_ctx, .forward = fake_forward, .seq_fork = fake_fork,
                          .seq_truncate = fake_truncate, .seq_end = fake_seq_end,
                          .emit = fake_emit, .is_eog = fake_is_eog,
                          .draft = r->shape.has_draft ? &draft_api : NULL,
                          .emit_seq = fake_emit_seq,
                          .forward_begin = r->shape.has_draft ? fake_forward_begin : NULL,
                          .forward_wait = r->shape.has_draft ? fake_forward_wait : NULL};
    tsr_generate_request rq = {sizeof rq, prompt, n_prompt, limit};
    tsr_status st = vt->generate(l->inst->self, &api, &rq);
    free(prompt);
    if (m->begun)
        fail(c, "request %d: generate returned before forward_wait (DEC_8)", req);
    if (c->failed) return false;
    if (st < 0) {
        fail(c, "request %d: generate: status %d: %s", req, st, plugin_error(l));
        return false;
    }
    if (m->calls_after_stop)
        fail(c, "request %d: %lld forward/emit calls after emit() returned 1 (DEC_3)", req,
             (long long)m->calls_after_stop);
    else if (m->emitted == 0)
        fail(c, "request %d: generate emitted no token", req);
    check_forks_ended(c, req, m);
    check_forks_ended(c, req, &draft);
    note(c, "request %d: %lld tokens emitted in %lld forwards (%lld of the draft)%s", req,
         (long long)m->emitted, (long long)m->n_forward, (long long)draft.n_forward,
         fake_done(m) ? "" : " (stopped on its own)");
    return !c->failed;
}

static bool open_params(const runner *r, check *c, const kvset *kv, live *l) {
    tsr_error err;
    if (live_open(r, &r->shape, kv, l, &err) < 0) {
        /* PARAM_3 lets a plugin refuse a value with a reason; edge-params checks the reason. */
        if (r->params_label[0]) note(c, "create refused: %s", err.msg);
        else fail(c, "create with default parameters failed: %s", err.msg);
        return false;
    }
    return true;
}

/* A short request, then one that ends at the context's last position. */
static void check_decoder(const runner *r, check *c) {
    live l;
    if (!open_params(r, c, r->params, &l)) return;
    fake_model m;
    if (fake_request(r, c, &l, &m, 1, 5, 12))
        fake_request(r, c, &l, &m, 2, r->shape.n_ctx - 6, 6);
    close_checked(c, &l);
}

/* DEC_7: a decoder that drafts only when the pipeline has a draft model also runs without
 * one (created without has_draft, api->draft NULL), as the host runs it then. */
static void check_decoder_no_draft(const runner *r, check *c) {
    runner alone = *r;
    alone.shape.has_draft = 0;
    check_decoder(&alone, c);
}

/* DEC_4: two requests on one instance emit the same tokens, with the seed fixed when the
 * decoder has one. */
static void check_decoder_repeat(const runner *r, check *c) {
    kvset kv = *r->params;
    const tsr_plugin_desc *d = r->ref->desc;
    for (uint32_t i = 0; i < d->n_params; i++)
        if (d->params[i].role == TSR_PARAM_ROLE_SEED) kvset_put(&kv, d->params[i].name, "1234");
    live l;
    if (!open_params(r, c, &kv, &l)) return;
    fake_model first, second;
    if (fake_request(r, c, &l, &first, 1, 5, 24) && fake_request(r, c, &l, &second, 2, 5, 24)) {
        int64_t n = first.emitted < second.emitted ? first.emitted : second.emitted;
        if (n > FAKE_MAX_EMIT) n = FAKE_MAX_EMIT;
        for (int64_t i = 0; i < n && !c->failed; i++)
            if (first.tokens[i] != second.tokens[i])
                fail(c, "the same request twice on one instance: token %lld is %d, then %d (a "
                        "request must not depend on the ones before it, DEC_4)", (long long)i,
                     first.tokens[i], second.tokens[i]);
        if (!c->failed && first.emitted != second.emitted)
            fail(c, "the same request twice on one instance: %lld tokens, then %lld (DEC_4)",
                 (long long)first.emitted, (long long)second.emitted);
    }
    close_checked(c, &l);
}

/* DEC_5 on random logits and on finite extremes: ties, the largest magnitudes, tiny values. */
static void check_decoder_pick(const runner *r, check *c) {
    live l;
    if (!open_params(r, c, r->params, &l)) return;
    const tsr_decoder_vtable *vt = l.inst->vtable;
    int32_t n_vocab = r->shape.n_vocab;
    float *logits = malloc((size_t)n_vocab * sizeof *logits);
    static const int32_t history[] = {1, 17, 42, 17};
    static const char *const kinds[] = {"random", "all 0", "all -FLT_MAX", "all FLT_MAX",
                                        "alternating +-FLT_MAX", "one FLT_MAX, rest -FLT_MAX",
                                        "random * 1e30", "subnormal"};
    uint64_t rng = 0x5eed0003;
    for (int kind = 0; kind < 8 && !c->failed; kind++) {
        for (int32_t i = 0; i < n_vocab; i++) {
            float x = rng_uniform(&rng);
            logits[i] = kind == 0   ? x
                        : kind == 1 ? 0.0f
                        : kind == 2 ? -FLT_MAX
                        : kind == 3 ? FLT_MAX
                        : kind == 4 ? (i % 2 ? FLT_MAX : -FLT_MAX)
                        : kind == 5 ? (i == n_vocab / 3 ? FLT_MAX : -FLT_MAX)
                        : kind == 6 ? x * 1e30f
                                    : x * 1e-40f;
        }
        for (int trial = 0; trial < 4 && !c->failed; trial++) {
            int32_t id = vt->pick(l.inst->self, logits, history, 4);
            if (id < 0 || id >= n_vocab)
                fail(c, "pick on %s logits returned %d, outside [0, %d)", kinds[kind], id,
                     n_vocab);
        }
    }
    free(logits);
    close_checked(c, &l);
}

/* ---- router ---------------------------------------------------------------------------- */

/* A model's experts as routers see them (tsr_router_init.experts), made up: F32 matrices of
 * random values, made on first use, for a router that makes copies of its own; every byte
 * counts as in memory, so that loading reads nothing and evicting does nothing. */
typedef struct fake_experts {
    tsr_expert_access access;
    int32_t n_layer, n_expert, n_embd, n_ff;
    float **matrices; /* (n_layer, n_expert, 3) */
} fake_experts;

static bool fake_valid(const fake_experts *x, int32_t layer, int32_t e) {
    return layer >= 0 && layer < x->n_layer && e >= 0 && e < x->n_expert;
}

static uint64_t fake_bytes(void *ctx, int32_t layer, int32_t e) {
    const fake_experts *x = ctx;
    return fake_valid(x, layer, e) ? 3 * (uint64_t)x->n_embd * (uint64_t)x->n_ff * 4 : 0;
}

static void fake_prefetch(void *ctx, int32_t layer, int32_t e) {
    (void)ctx, (void)layer, (void)e;
}

static uint64_t fake_load(void *ctx, int32_t layer, int32_t e) {
    (void)ctx, (void)layer, (void)e;
    return 0;
}

static tsr_status fake_matrices(void *ctx, int32_t layer, int32_t e, tsr_tensor *gate,
                                tsr_tensor *up, tsr_tensor *down) {
    fake_experts *x = ctx;
    if (!fake_valid(x, layer, e)) return TSR_E_RANGE;
    tsr_tensor *out[3] = {gate, up, down};
    size_t at = ((size_t)layer * (size_t)x->n_expert + (size_t)e) * 3;
    for (int m = 0; m < 3; m++) {
        int64_t n_in = m == 2 ? x->n_ff : x->n_embd, n_out = m == 2 ? x->n_embd : x->n_ff;
        if (!x->matrices[at + m]) {
            uint64_t rng = 0x5eed0010 + at + (uint64_t)m;
            x->matrices[at + m] = malloc((size_t)(n_in * n_out) * sizeof(float));
            if (!x->matrices[at + m]) return TSR_E_NOMEM;
            fill_random(x->matrices[at + m], (size_t)(n_in * n_out), &rng);
        }
        *out[m] = (tsr_tensor){.struct_size = sizeof(tsr_tensor), .dtype = TSR_DTYPE_F32,
                               .n_dims = 2, .ne = {n_in, n_out, 1, 1},
                               .row_bytes = (size_t)n_in * sizeof(float),
                               .data = x->matrices[at + m], .name = "conformance.expert"};
    }
    return TSR_OK;
}

/* Made-up experts for `shape`, which then hands them to routers. */
static void fake_experts_init(fake_experts *x, tsr_model_shape *shape) {
    *x = (fake_experts){
        .access = {.struct_size = sizeof x->access, .ctx = x, .bytes = fake_bytes,
                   .prefetch = fake_prefetch, .resident = fake_bytes, .load = fake_load,
                   .evict = fake_prefetch, .matrices = fake_matrices},
        .n_layer = shape->n_layer, .n_expert = shape->n_expert, .n_embd = shape->n_embd,
        .n_ff = shape->n_ff_expert};
    x->matrices = calloc((size_t)shape->n_layer * (size_t)shape->n_expert * 3,
                         sizeof *x->matrices);
    shape->experts = &x->access;
}

static void fake_experts_free(fake_experts *x) {
    for (size_t i = 0; x->matrices && i < (size_t)x->n_layer * (size_t)x->n_expert * 3; i++)
        free(x->matrices[i]);
    free(x->matrices);
}

/* ROUTE_4: a router asks only for what a host knows how to give. */
static void check_router_needs(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_router_vtable *vt = l.inst->vtable;
    int32_t needs = vt->needs(l.inst->self);
    note(c, "needs 0x%x", (unsigned)needs);
    if (needs & ~TSR_ROUTER_NEEDS_NEXT_GATE)
        fail(c, "needs() returned 0x%x: flags 0x%x are none of TSR_ROUTER_NEEDS_* (ROUTE_4)",
             (unsigned)needs, (unsigned)(needs & ~TSR_ROUTER_NEEDS_NEXT_GATE));
    close_checked(c, &l);
}

/* ROUTE_3: substitutes all three or none, for a chosen expert, each with data and shaped as
 * the expert's matrix it stands for. */
static void check_substitutes(check *c, const char *what, const tsr_router_init *in,
                              const tsr_route_call *call) {
    static const char *const names[3] = {"gate", "up", "down"};
    for (int64_t t = 0; t < call->n_tok && !c->failed; t++)
        for (int32_t s = 0; s < call->k && !c->failed; s++) {
            const tsr_tensor *const *sub = call->substitute + (t * call->k + s) * 3;
            int given = (sub[0] != NULL) + (sub[1] != NULL) + (sub[2] != NULL);
            if (given == 0) continue;
            if (given != 3) {
                fail(c, "%s: token %lld slot %d: %d of the 3 substitute matrices: all three or "
                        "none (ROUTE_3)", what, (long long)t, s, given);
                break;
            }
            if (call->experts[t * call->k + s] < 0)
                fail(c, "%s: token %lld slot %d: substitutes for an empty slot (ROUTE_3)", what,
                     (long long)t, s);
            for (int m = 0; m < 3 && !c->failed; m++) {
                int64_t n_in = m == 2 ? in->n_ff_expert : in->n_embd;
                int64_t n_out = m == 2 ? in->n_embd : in->n_ff_expert;
                if (sub[m]->ne[0] != n_in || sub[m]->ne[1] != n_out || sub[m]->ne[2] != 1 ||
                    sub[m]->ne[3] != 1 || !sub[m]->data)
                    fail(c, "%s: token %lld slot %d: the substitute %s matrix has ne {%lld, "
                            "%lld, %lld, %lld}%s; the expert's is {%lld, %lld, 1, 1} (ROUTE_3)",
                         what, (long long)t, s, names[m], (long long)sub[m]->ne[0],
                         (long long)sub[m]->ne[1], (long long)sub[m]->ne[2],
                         (long long)sub[m]->ne[3], sub[m]->data ? "" : " and no data",
                         (long long)n_in, (long long)n_out);
            }
        }
}


/* Router shapes: the synthetic one, every expert used, a single one among many. */
static const int32_t router_shapes[][2] = {{4, 2}, {8, 8}, {16, 1}};

/* ROUTE_2 on random gate logits and, every other layer, on ties (every logit equal), where a
 * top-k that does not exclude what it chose picks one expert twice; ROUTE_3 on what it hands
 * back as substitutes. The next layer's gate logits come when needs() asks for them. */
static void check_router(const runner *r, check *c) {
    for (size_t si = 0; si < sizeof router_shapes / sizeof router_shapes[0] && !c->failed; si++) {
        tsr_model_shape shape = r->shape;
        shape.n_layer = 4;
        shape.n_expert = router_shapes[si][0];
        shape.n_expert_used = router_shapes[si][1];
        fake_experts fx;
        fake_experts_init(&fx, &shape);
        live l;
        tsr_error err;
        if (live_open(r, &shape, r->params, &l, &err) < 0) {
            fail(c, "create (%d experts, %d used): %s", shape.n_expert, shape.n_expert_used,
                 err.msg);
            fake_experts_free(&fx);
            return;
        }
        const tsr_router_vtable *vt = l.inst->vtable;
        const tsr_router_init *in = &l.init_storage.router;
        const int64_t n_tok = 5;
        const int32_t k = in->n_expert_used, ne = in->n_expert;
        const bool next_asked = TSR_VT_HAS(vt, needs) &&
                                (vt->needs(l.inst->self) & TSR_ROUTER_NEEDS_NEXT_GATE);
        float *gate = malloc((size_t)n_tok * ne * sizeof *gate);
        float *next = malloc((size_t)n_tok * ne * sizeof *next);
        float *hidden = malloc((size_t)n_tok * in->n_embd * sizeof *hidden);
        int32_t *experts = malloc((size_t)n_tok * k * sizeof *experts);
        int32_t *prev = malloc((size_t)n_tok * k * sizeof *prev);
        float *weights = malloc((size_t)n_tok * k * sizeof *weights);
        const tsr_tensor **substitute = calloc((size_t)n_tok * k * 3, sizeof *substitute);
        uint64_t rng = 0x5eed0004;
        for (int32_t layer = 0; layer < in->n_layer && !c->failed; layer++) {
            fill_random(gate, (size_t)n_tok * ne, &rng);
            if (layer % 2) for (int64_t i = 0; i < n_tok * ne; i++) gate[i] = 0.5f;
            fill_random(hidden, (size_t)n_tok * in->n_embd, &rng);
            fill_random(next, (size_t)n_tok * ne, &rng);
            for (int64_t i = 0; i < n_tok * k; i++) {
                experts[i] = -2;
                weights[i] = NAN;
            }
            memset(substitute, 0, (size_t)n_tok * k * 3 * sizeof *substitute);
            bool give_next = next_asked && layer + 1 < in->n_layer;
            tsr_route_call call = {.struct_size = sizeof call, .layer = layer, .n_tok = n_tok,
                                   .gate_logits = gate, .hidden = hidden,
                                   .prev_experts = layer ? prev : NULL, .k = k,
                                   .experts = experts, .weights = weights,
                                   .next_gate_logits = give_next ? next : NULL,
                                   .next_layer = give_next ? layer + 1 : -1,
                                   .substitute = substitute};
            tsr_status st = vt->route(l.inst->self, &call);
            char what[96];
            snprintf(what, sizeof what, "%d experts, %d used, layer %d%s", ne, k, layer,
                     layer % 2 ? " (equal gate logits)" : "");
            if (st < 0) {
                fail(c, "%s: route: status %d: %s", what, st, plugin_error(&l));
                break;
            }
            for (int64_t t = 0; t < n_tok && !c->failed; t++) {
                for (int32_t s = 0; s < k && !c->failed; s++) {
                    int32_t e = experts[t * k + s];
                    if (e < -1 || e >= ne)
                        fail(c, "%s: token %lld slot %d: expert %d, outside [-1, %d)", what,
                             (long long)t, s, e, ne);
                    else if (e >= 0 && !isfinite(weights[t * k + s]))
                        fail(c, "%s: token %lld slot %d: weight %g", what, (long long)t, s,
                             weights[t * k + s]);
                    for (int32_t s2 = 0; s2 < s && !c->failed; s2++)
                        if (e >= 0 && experts[t * k + s2] == e)
                            fail(c, "%s: token %lld: expert %d chosen twice (slots %d and %d)",
                                 what, (long long)t, e, s2, s);
                }
            }
            check_substitutes(c, what, in, &call);
            memcpy(prev, experts, (size_t)n_tok * k * sizeof *prev);
        }
        free(gate);
        free(next);
        free(hidden);
        free(experts);
        free(prev);
        free(weights);
        free(substitute);
        close_checked(c, &l);
        fake_experts_free(&fx);
    }
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
    if (TSR_VT_HAS(d->vt, buffer_alloc)) {
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
    if (TSR_VT_HAS(d->vt, buffer_alloc)) {
        if (TSR_VT_HAS(d->vt, buffer_free)) d->vt->buffer_free(d->self, p);
    } else {
        free(p);
    }
}

static void dev_put(device *d, void *dst, const void *src, size_t bytes) {
    if (!dst) return;
    if (TSR_VT_HAS(d->vt, upload)) d->vt->upload(d->self, dst, src, bytes);
    else memcpy(dst, src, bytes);
}

static void dev_get(device *d, void *dst, const void *src, size_t bytes) {
    if (TSR_VT_HAS(d->vt, synchronize)) d->vt->synchronize(d->self);
    if (TSR_VT_HAS(d->vt, download)) d->vt->download(d->self, dst, src, bytes);
    else memcpy(dst, src, bytes);
}

/* Compares an op's result (on the device) with the runner's reference. */
static void dev_expect(device *d, const char *op, const float *dev_y, const double *ref,
                       size_t n, double abs_tol, double rel_tol) {
    if (d->c->failed || !dev_y) return;
    float *y = malloc(n * sizeof *y);
    dev_get(d, y, dev_y, n * sizeof *y);
    long bad = first_mismatch(y, ref, n, abs_tol, rel_tol);
    if (bad >= 0) fail(d->c, "%s: y[%ld] = %.9g, expected %.9g", op, bad, y[bad], ref[bad]);
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

/* BACKEND_4: its own memory comes with all four of buffer_alloc, buffer_free, upload and
 * download, or none of them; device memory cannot be reached without them. */
static void check_backend_memory(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    const tsr_backend_vtable *vt = l.inst->vtable;
    int n_slots = TSR_VT_HAS(vt, buffer_alloc) + TSR_VT_HAS(vt, buffer_free) + TSR_VT_HAS(vt, upload) +
                  TSR_VT_HAS(vt, download);
    int32_t space = TSR_VT_HAS(vt, memory_space) ? vt->memory_space(l.inst->self) : TSR_MEMORY_HOST;
    note(c, "%s memory, %d of the 4 memory callbacks",
         space == TSR_MEMORY_DEVICE ? "device" : "host", n_slots);
    if (n_slots != 0 && n_slots != 4)
        fail(c, "provides %d of buffer_alloc, buffer_free, upload and download (missing:%s%s%s"
                "%s): all four or none (BACKEND_4)", n_slots,
             TSR_VT_HAS(vt, buffer_alloc) ? "" : " buffer_alloc",
             TSR_VT_HAS(vt, buffer_free) ? "" : " buffer_free", TSR_VT_HAS(vt, upload) ? "" : " upload",
             TSR_VT_HAS(vt, download) ? "" : " download");
    else if (space != TSR_MEMORY_HOST && space != TSR_MEMORY_DEVICE)
        fail(c, "memory_space returned %d, neither TSR_MEMORY_HOST nor TSR_MEMORY_DEVICE", space);
    else if (space == TSR_MEMORY_DEVICE && n_slots == 0)
        fail(c, "memory_space says device memory, but without buffer_alloc, buffer_free, upload "
                "and download the host cannot reach it (BACKEND_4)");
    close_checked(c, &l);
}

/* BACKEND_6: copy_rows and weighted_sum come together or not at all (a model with experts
 * needs both), gather and scatter rows exactly, and mix each token's rows as the header says:
 * each product rounded, then added in slot order from the first. */
static void check_backend_rows(const runner *r, check *c) {
    live l;
    if (!open_default(r, c, &l)) return;
    device d = {l.inst->vtable, l.inst->self, c};
    const tsr_backend_vtable *vt = d.vt;
    bool copy = TSR_VT_HAS(vt, copy_rows), mix = TSR_VT_HAS(vt, weighted_sum);
    if (!copy && !mix) {
        note(c, "no copy_rows, no weighted_sum: models with experts cannot run on it");
        close_checked(c, &l);
        return;
    }
    if (!copy || !mix) {
        fail(c, "has %s but not %s: both or neither (BACKEND_6)",
             copy ? "copy_rows" : "weighted_sum", copy ? "weighted_sum" : "copy_rows");
        close_checked(c, &l);
        return;
    }
    enum { N = BN, K = 3, DIM = BDIM };
    static const int32_t from[N] = {7, 0, 4}, to[N] = {5, 8, 1};
    float x[N * K * DIM], w[N * K], y[N * K * DIM];
    double ref[N * K * DIM];
    uint64_t rng = 0x5eed0011;
    fill_random(x, N * K * DIM, &rng);
    fill_random(w, N * K, &rng);
    float *dx = dev_alloc(&d, N * K * DIM), *dy = dev_alloc(&d, N * K * DIM);
    float *dg = dev_alloc(&d, N * DIM), *dw = dev_alloc(&d, N * K);
    int32_t *dfrom = (int32_t *)dev_alloc(&d, N), *dto = (int32_t *)dev_alloc(&d, N);
    if (c->failed) goto out;
    dev_put(&d, dx, x, sizeof x);
    dev_put(&d, dw, w, sizeof w);
    dev_put(&d, dfrom, from, sizeof from);
    dev_put(&d, dto, to, sizeof to);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < DIM; j++) ref[i * DIM + j] = x[from[i] * DIM + j];
    if (op_ok(&d, "copy_rows (gather)", vt->copy_rows(d.self, dg, NULL, dx, dfrom, N, DIM), &l))
        dev_expect(&d, "copy_rows (gather)", dg, ref, N * DIM, 0, 0);
    memset(y, 0, sizeof y);
    dev_put(&d, dy, y, sizeof y);
    for (int i = 0; i < N * K * DIM; i++) ref[i] = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < DIM; j++) ref[to[i] * DIM + j] = x[from[i] * DIM + j];
    if (op_ok(&d, "copy_rows (scatter)", vt->copy_rows(d.self, dy, dto, dg, NULL, N, DIM), &l))
        dev_expect(&d, "copy_rows (scatter)", dy, ref, N * K * DIM, 0, 0);
    for (int t = 0; t < N; t++)
        for (int j = 0; j < DIM; j++) {
            volatile float sum = w[t * K] * x[t * K * DIM + j];
            for (int k = 1; k < K; k++) {
                volatile float p = w[t * K + k] * x[(t * K + k) * DIM + j];
                sum = sum + p;
            }
            ref[t * DIM + j] = sum;
        }
    if (op_ok(&d, "weighted_sum", vt->weighted_sum(d.self, dg, dx, dw, N, K, DIM), &l))
        dev_expect(&d, "weighted_sum (products rounded, added in slot order)", dg, ref, N * DIM,
                   0, 0);
out:
    dev_free(&d, dx);
    dev_free(&d, dy);
    dev_free(&d, dg);
    dev_free(&d, dw);
    dev_free(&d, dfrom);
    dev_free(&d, dto);
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
    if (!c->failed && TSR_VT_HAS(vt, dequantize_rows)) {
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
    if (!c->failed && TSR_VT_HAS(vt, matmul)) {
        const float *wref = TSR_VT_HAS(vt, dequantize_rows) ? deq : src;
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
            double limit = TSR_VT_HAS(vt, dequantize_rows) ? 0.05 : 0.5;
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
    bool each_param_set;    /* also run with each parameter at its cheap bounds */
    bool optional_draft;    /* only for a decoder whose draft_use is OPTIONAL */
} stage_check;

#define NEEDS(type, field) offsetof(type, field), offsetof(type, field) + sizeof(void *)

static const stage_check stage_checks[] = {
    {TSR_STAGE_CACHE, "cache-long-run", check_cache_long_run, 0, 0, true, false},
    {TSR_STAGE_CACHE, "cache-fork", check_cache_fork, NEEDS(tsr_cache_vtable, seq_fork), true,
     false},
    {TSR_STAGE_CACHE, "cache-truncate", check_cache_truncate,
     NEEDS(tsr_cache_vtable, seq_truncate), true, false},
    {TSR_STAGE_ATTENTION, "attention-reference", check_attention, 0, 0, true, false},
    {TSR_STAGE_ATTENTION, "attention-scores", check_attention_scores, 0, 0, true, false},
    {TSR_STAGE_DECODER, "decoder-generate", check_decoder, 0, 0, true, false},
    {TSR_STAGE_DECODER, "decoder-no-draft", check_decoder_no_draft, 0, 0, true, true},
    {TSR_STAGE_DECODER, "decoder-repeat", check_decoder_repeat, 0, 0, true, false},
    {TSR_STAGE_DECODER, "decoder-pick", check_decoder_pick, NEEDS(tsr_decoder_vtable, pick),
     true, false},
    {TSR_STAGE_ROUTER, "router-route", check_router, 0, 0, false, false},
    {TSR_STAGE_ROUTER, "router-needs", check_router_needs, NEEDS(tsr_router_vtable, needs), false,
     false},
    {TSR_STAGE_BACKEND, "backend-rows", check_backend_rows, 0, 0, false, false},
    {TSR_STAGE_BACKEND, "backend-memory", check_backend_memory, 0, 0, false, false},
    {TSR_STAGE_BACKEND, "backend-activations", check_backend_ops, 0, 0, false, false},
    {TSR_STAGE_BACKEND, "backend-rope", check_backend_rope, 0, 0, false, false},
    {TSR_STAGE_BACKEND, "backend-weights", check_backend_weights, 0, 0, false, false},
    {TSR_STAGE_QUANTIZER, "quantizer-roundtrip", check_quantizer, 0, 0, false, false},
};

/* A numeric bound the stage checks also run with: beyond it a cache or a window sized by the
 * parameter costs more than a check should. */
#define CHEAP_BOUND 4096.0
#define MAX_PARAM_SETS 48

typedef struct param_set {
    kvset kv;
    char label[120];
} param_set;

static void param_set_add(const tsr_plugin_desc *d, param_set *sets, size_t *n,
                          const tsr_param_def *p, const char *value) {
    if (*n == MAX_PARAM_SETS || (p->default_value && strcmp(p->default_value, value) == 0))
        return;
    base_params(d, &sets[*n].kv);
    kvset_put(&sets[*n].kv, p->name, value);
    snprintf(sets[*n].label, sizeof sets[*n].label, "%s=%s", p->name, value);
    (*n)++;
}

/* A cache's sizes (its INT parameters counted in entries or tokens) all at a 64th of their
 * defaults, within their ranges: a policy whose default budget exceeds the checks' context
 * (SnapKV's 1024) still runs far past a budget of its own, with its sizes in proportion
 * (a window below a budget stays below it). */
static void param_set_small_budget(const tsr_plugin_desc *d, param_set *sets, size_t *n) {
    if (*n == MAX_PARAM_SETS) return;
    param_set *set = &sets[*n];
    base_params(d, &set->kv);
    int used = snprintf(set->label, sizeof set->label, "small");
    bool changed = false;
    for (uint32_t i = 0; i < d->n_params; i++) {
        const tsr_param_def *p = &d->params[i];
        if (p->type != TSR_PARAM_INT || !p->unit || !p->default_value ||
            (strcmp(p->unit, "entries") != 0 && strcmp(p->unit, "tokens") != 0))
            continue;
        long long def = strtoll(p->default_value, NULL, 10), v = def / 64;
        if (param_bounded(p) && v < p->min) v = (long long)p->min;
        if (v == def) continue;
        char buf[32];
        snprintf(buf, sizeof buf, "%lld", v);
        kvset_put(&set->kv, p->name, buf);
        if (used < (int)sizeof set->label)
            used += snprintf(set->label + used, sizeof set->label - used, "%s%s=%s",
                             changed ? "," : ":", p->name, buf);
        changed = true;
    }
    if (changed) (*n)++;
}

/* The defaults, then each parameter alone at each cheap bound, each other ENUM choice and
 * each BOOL value; a cache also with all its sizes small. */
static size_t param_sets(const tsr_plugin_desc *d, param_set *sets) {
    size_t n = 1;
    base_params(d, &sets[0].kv);
    sets[0].label[0] = 0;
    char buf[96];
    for (uint32_t i = 0; i < d->n_params; i++) {
        const tsr_param_def *p = &d->params[i];
        switch (p->type) {
        case TSR_PARAM_INT:
        case TSR_PARAM_FLOAT:
            for (int e = 0; e < 2 && param_bounded(p); e++) {
                double v = e ? p->max : p->min;
                if (fabs(v) > CHEAP_BOUND) continue;
                if (p->type == TSR_PARAM_INT) snprintf(buf, sizeof buf, "%lld", (long long)v);
                else snprintf(buf, sizeof buf, "%.17g", v);
                if (p->default_value && strtod(p->default_value, NULL) == v) continue;
                param_set_add(d, sets, &n, p, buf);
            }
            break;
        case TSR_PARAM_ENUM:
            for (const char *const *ch = p->choices; *ch; ch++) param_set_add(d, sets, &n, p, *ch);
            break;
        case TSR_PARAM_BOOL:
            param_set_add(d, sets, &n, p, "true");
            param_set_add(d, sets, &n, p, "false");
            break;
        default:
            break;
        }
    }
    if (d->stage == TSR_STAGE_CACHE) param_set_small_budget(d, sets, &n);
    return n;
}

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
    fake_experts experts;
    fake_experts_init(&experts, &r.shape);
    if (r.verbose) tsr_log_set_level(TSR_LOG_INFO);

    /* Loading runs the object's constructors and entry point: in the parent only once they
     * are known not to crash. Plugins refused alone fail "load"; their siblings are checked. */
    bool loadable = run_check(&r, "load", check_load);
    param_set *sets = malloc(MAX_PARAM_SETS * sizeof *sets);
    tsr_registry *reg = tsr_registry_create(NULL);
    tsr_error err;
    if (loadable && tsr_registry_load_file(reg, r.path, &err) >= 0) {
        for (size_t i = 0; i < tsr_registry_count(reg); i++) {
            r.ref = tsr_registry_at(reg, i);
            /* A decoder that drafts is created, and driven, with a draft model. */
            r.shape.has_draft = draft_use(r.ref->desc) != TSR_DECODER_DRAFT_NONE;
            run_check(&r, "descriptor", check_descriptor);
            run_check(&r, "commands", check_commands);
            run_check(&r, "create-defaults", check_create_defaults);
            run_check(&r, "edge-params", check_edge_params);
            run_check(&r, "param-rejection", check_param_rejection);
            run_check(&r, "create-destroy-cycles", check_cycles);
            size_t n_sets = param_sets(r.ref->desc, sets);
            for (size_t j = 0; j < sizeof stage_checks / sizeof stage_checks[0]; j++) {
                const stage_check *sc = &stage_checks[j];
                if (sc->stage != r.ref->desc->stage ||
                    (sc->optional_draft &&
                     draft_use(r.ref->desc) != TSR_DECODER_DRAFT_OPTIONAL))
                    continue;
                if (!slot_present(r.ref->desc, sc)) {
                    if (r.verbose) printf("skip %s/%s: optional callback absent\n",
                                          r.ref->desc->name, sc->name);
                    continue;
                }
                for (size_t k = 0; k < (sc->each_param_set ? n_sets : 1); k++) {
                    char name[200];
                    r.params = &sets[k].kv;
                    snprintf(r.params_label, sizeof r.params_label, "%s", sets[k].label);
                    snprintf(name, sizeof name, k ? "%s[%s]" : "%s", sc->name, sets[k].label);
                    run_check(&r, name, sc->fn);
                }
            }
        }
    }
    free(sets);
    tsr_registry_free(reg);
    fake_experts_free(&experts);
    printf("%d passed, %d failed\n", r.n_pass, r.n_fail);
    return r.n_fail ? 1 : 0;
}
