/* The host thread pool (tsr_pool_run) and the host services a plugin gets (tsr_services):
 * accounted aligned allocation, parallel_for, error capture. */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plugin/host_services.h"
#include "plugin/pool.h"
#include "testutil.h"

#define MAX_TH 8

/* ---- the pool ------------------------------------------------------------------------------ */

typedef struct cover {
    atomic_int hits[MAX_TH];
    atomic_int bad_nth;
    int nth;
} cover;

static void count_task(void *arg, int ith, int nth) {
    cover *c = arg;
    if (nth != c->nth || ith < 0 || ith >= nth) {
        atomic_fetch_add(&c->bad_nth, 1);
        return;
    }
    atomic_fetch_add(&c->hits[ith], 1);
}

static void check_cover(tsr_pool *pool, int nth) {
    cover c = {.nth = nth};
    tsr_pool_run(pool, count_task, &c);
    ck_assert_int_eq(atomic_load(&c.bad_nth), 0);
    for (int i = 0; i < MAX_TH; i++)
        ck_assert_int_eq(atomic_load(&c.hits[i]), i < nth ? 1 : 0);
}

START_TEST(test_every_ith_once) {
    for (int n = 1; n <= 4; n++) {
        tsr_pool *pool = tsr_pool_create(n);
        ck_assert_ptr_nonnull(pool);
        ck_assert_int_eq(tsr_pool_size(pool), n);
        for (int rep = 0; rep < 50; rep++) check_cover(pool, n);
        tsr_pool_free(pool);
    }
    /* no pool, or a size below 1, runs on the caller alone */
    check_cover(NULL, 1);
    ck_assert_int_eq(tsr_pool_size(NULL), 1);
    tsr_pool *pool = tsr_pool_create(0);
    ck_assert_int_eq(tsr_pool_size(pool), 1);
    check_cover(pool, 1);
    tsr_pool_free(pool);
}
END_TEST

/* The caller takes ith 0 itself. */
typedef struct owner {
    pthread_t caller;
    atomic_int zero_on_caller;
} owner;

static void owner_task(void *arg, int ith, int nth) {
    owner *o = arg;
    (void)nth;
    if (ith == 0 && pthread_equal(pthread_self(), o->caller)) atomic_store(&o->zero_on_caller, 1);
}

START_TEST(test_caller_runs_ith_zero) {
    tsr_pool *pool = tsr_pool_create(3);
    owner o = {.caller = pthread_self()};
    tsr_pool_run(pool, owner_task, &o);
    ck_assert_int_eq(atomic_load(&o.zero_on_caller), 1);
    tsr_pool_free(pool);
}
END_TEST

/* A task that calls the pool again: the inner call runs every inner ith, in order, on the
 * thread of the outer task. */
typedef struct nested {
    tsr_pool *pool;
    atomic_int inner_calls;
    atomic_int errors;
} nested;

typedef struct inner_arg {
    nested *n;
    pthread_t thread;
    int next;
} inner_arg;

static void inner_task(void *arg, int ith, int nth) {
    inner_arg *a = arg;
    if (!pthread_equal(pthread_self(), a->thread) || ith != a->next++ ||
        nth != tsr_pool_size(a->n->pool))
        atomic_fetch_add(&a->n->errors, 1);
    atomic_fetch_add(&a->n->inner_calls, 1);
}

static void outer_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    nested *n = arg;
    inner_arg a = {n, pthread_self(), 0};
    tsr_pool_run(n->pool, inner_task, &a);
    if (a.next != tsr_pool_size(n->pool)) atomic_fetch_add(&n->errors, 1);
}

START_TEST(test_nested_runs_serially) {
    for (int size = 1; size <= 4; size++) {
        nested n = {.pool = tsr_pool_create(size)};
        tsr_pool_run(n.pool, outer_task, &n);
        ck_assert_int_eq(atomic_load(&n.errors), 0);
        ck_assert_int_eq(atomic_load(&n.inner_calls), size * size);
        /* the pool is usable again after a nested run */
        check_cover(n.pool, size);
        tsr_pool_free(n.pool);
    }
}
END_TEST

static void add_task(void *arg, int ith, int nth) {
    (void)nth;
    atomic_fetch_add((atomic_long *)arg, ith + 1);
}

START_TEST(test_many_runs) {
    for (int size = 2; size <= 4; size++) {
        tsr_pool *pool = tsr_pool_create(size);
        atomic_long sum = 0;
        const long runs = 10000;
        for (long r = 0; r < runs; r++) tsr_pool_run(pool, add_task, &sum);
        ck_assert_int_eq(atomic_load(&sum), runs * size * (size + 1) / 2);
        tsr_pool_free(pool);
    }
}
END_TEST

/* Creating and freeing pools, with or without work, does not hang. */
START_TEST(test_create_free) {
    for (int i = 0; i < 200; i++) {
        tsr_pool *pool = tsr_pool_create(1 + i % 4);
        if (i % 2) check_cover(pool, 1 + i % 4);
        tsr_pool_free(pool);
    }
    tsr_pool_free(NULL);
}
END_TEST

/* ---- host services ------------------------------------------------------------------------- */

START_TEST(test_alloc_alignment) {
    tsr_services s;
    tsr_services_init(&s, "fx", NULL);
    const tsr_host *h = &s.table;
    ck_assert_uint_eq(h->struct_size, sizeof(tsr_host));
    ck_assert_ptr_eq(h->ctx, &s);
    static const size_t aligns[] = {1, 2, 4, 8, 16, 32, 64, 128, 4096, 1 << 16};
    void *blocks[sizeof aligns / sizeof aligns[0]];
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        blocks[i] = h->alloc(h->ctx, 3 + i, aligns[i]);
        ck_assert_ptr_nonnull(blocks[i]);
        ck_assert_uint_eq((uintptr_t)blocks[i] % aligns[i], 0);
        memset(blocks[i], 0xab, 3 + i); /* the whole block is usable (ASan checks) */
    }
    void *dflt = h->alloc(h->ctx, 1, 0);
    ck_assert_uint_eq((uintptr_t)dflt % 64, 0); /* 0 = the default, 64 bytes */
    void *empty = h->alloc(h->ctx, 0, 0);
    ck_assert_ptr_nonnull(empty);
    /* not a power of two, or too large: refused, nothing accounted */
    size_t live = atomic_load(&s.bytes_live);
    ck_assert_ptr_null(h->alloc(h->ctx, 8, 3));
    ck_assert_ptr_null(h->alloc(h->ctx, 8, 48));
    ck_assert_ptr_null(h->alloc(h->ctx, SIZE_MAX - 8, 64));
    ck_assert_uint_eq(atomic_load(&s.bytes_live), live);
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) h->free(h->ctx, blocks[i]);
    h->free(h->ctx, dflt);
    h->free(h->ctx, empty);
    h->free(h->ctx, NULL);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 0);
    ck_assert_uint_eq(atomic_load(&s.n_allocs_live), 0);
}
END_TEST

START_TEST(test_alloc_accounting) {
    tsr_services s;
    tsr_services_init(&s, "fx", NULL);
    const tsr_host *h = &s.table;
    void *a = h->alloc(h->ctx, 1000, 0);
    void *b = h->alloc(h->ctx, 500, 16);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 1500);
    ck_assert_uint_eq(atomic_load(&s.n_allocs_live), 2);
    h->free(h->ctx, a);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 500);
    void *c = h->alloc(h->ctx, 200, 0);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 700);
    ck_assert_uint_eq(atomic_load(&s.bytes_peak), 1500);
    void *d = h->alloc(h->ctx, 1000, 256);
    ck_assert_uint_eq(atomic_load(&s.bytes_peak), 1700);
    h->free(h->ctx, b);
    h->free(h->ctx, c);
    h->free(h->ctx, d);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 0);
    ck_assert_uint_eq(atomic_load(&s.bytes_peak), 1700);

    /* two tables account apart */
    tsr_services other;
    tsr_services_init(&other, "other", NULL);
    void *e = other.table.alloc(other.table.ctx, 64, 0);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 0);
    ck_assert_uint_eq(atomic_load(&other.bytes_live), 64);
    other.table.free(other.table.ctx, e);
}
END_TEST

/* parallel_for through the table, with each task allocating: accounting is thread-safe. */
static void alloc_task(void *arg, int ith, int nth) {
    (void)nth;
    const tsr_host *h = arg;
    for (int k = 0; k < 200; k++) {
        void *p = h->alloc(h->ctx, (size_t)(ith + 1) * 16, 32);
        if (p) memset(p, ith, (size_t)(ith + 1) * 16);
        h->free(h->ctx, p);
    }
}

START_TEST(test_services_parallel_for) {
    tsr_pool *pool = tsr_pool_create(4);
    tsr_services s;
    tsr_services_init(&s, "fx", pool);
    const tsr_host *h = &s.table;
    ck_assert_int_eq(h->n_threads(h->ctx), 4);
    cover c = {.nth = 4};
    h->parallel_for(h->ctx, count_task, &c);
    for (int i = 0; i < 4; i++) ck_assert_int_eq(atomic_load(&c.hits[i]), 1);
    h->parallel_for(h->ctx, alloc_task, (void *)h);
    ck_assert_uint_eq(atomic_load(&s.bytes_live), 0);
    ck_assert_uint_eq(atomic_load(&s.n_allocs_live), 0);
    ck_assert_uint_ge(atomic_load(&s.bytes_peak), 64);
    ck_assert_uint_le(atomic_load(&s.bytes_peak), 16 * (1 + 2 + 3 + 4));
    tsr_pool_free(pool);

    /* without a pool the table runs serially with nth 1 */
    tsr_services_init(&s, "fx", NULL);
    ck_assert_int_eq(s.table.n_threads(s.table.ctx), 1);
    cover one = {.nth = 1};
    s.table.parallel_for(s.table.ctx, count_task, &one);
    ck_assert_int_eq(atomic_load(&one.hits[0]), 1);
}
END_TEST

START_TEST(test_services_errors_and_clock) {
    tsr_services s;
    tsr_services_init(&s, "fx", NULL);
    ck_assert_str_eq(tsr_services_take_error(&s, "none"), "none");
    s.table.set_error(s.table.ctx, "window %d exceeds %s", 9000, "n_ctx");
    ck_assert_str_eq(tsr_services_take_error(&s, "none"), "window 9000 exceeds n_ctx");
    /* taken once */
    ck_assert_str_eq(tsr_services_take_error(&s, "none"), "none");
    ck_assert_int_eq(s.table.common_major, TSR_COMMON_ABI_MAJOR);
    ck_assert_int_eq(s.table.common_minor, TSR_COMMON_ABI_MINOR);
    ck_assert_ptr_nonnull(s.table.host_version);
    ck_assert_str_eq(s.name, "fx");
    uint64_t t0 = s.table.now_ns(s.table.ctx), t1 = s.table.now_ns(s.table.ctx);
    ck_assert_uint_ge(t1, t0);
    ck_assert_uint_gt(t0, 0);
}
END_TEST

static Suite *pool_suite(void) {
    Suite *s = suite_create("pool");
    struct {
        const char *name;
        const TTest *test;
    } cases[] = {
        {"every_ith_once", test_every_ith_once},
        {"caller_ith_zero", test_caller_runs_ith_zero},
        {"nested", test_nested_runs_serially},
        {"many_runs", test_many_runs},
        {"create_free", test_create_free},
        {"alloc_alignment", test_alloc_alignment},
        {"alloc_accounting", test_alloc_accounting},
        {"services_parallel_for", test_services_parallel_for},
        {"services_errors", test_services_errors_and_clock},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_add_test(tc, cases[i].test);
        /* 30,000 pool runs on a loaded 2-core machine under sanitizers take a while */
        tcase_set_timeout(tc, 120);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void) {
    return tsr_test_run_suite(pool_suite());
}
