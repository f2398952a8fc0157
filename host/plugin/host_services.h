/* The host-services table (tsr_host) that each plugin object and each plugin instance gets:
 * logging prefixed with the plugin's name, accounted allocation, the thread pool and error
 * capture. */
#ifndef TSR_HOST_SERVICES_H
#define TSR_HOST_SERVICES_H

#include <stdatomic.h>
#include <stdbool.h>

#include <tessera/common.h>

#include "plugin/pool.h"

typedef struct tsr_services {
    tsr_host table;         /* table.ctx points back here */
    char name[128];         /* shown in log lines and errors: the plugin or object name */
    tsr_pool *pool;         /* borrowed; NULL runs parallel_for serially */
    atomic_size_t bytes_live;
    atomic_size_t bytes_peak;
    atomic_size_t n_allocs_live;
    atomic_flag error_lock; /* set_error is [any]: workers of a parallel_for may race */
    char error[1024];       /* the last set_error text */
    bool has_error;
} tsr_services;

/* Verbosity of the host's log: messages above it are dropped. Default TSR_LOG_WARN, raised by
 * -v or TESSERA_LOG=info|debug. */
void tsr_log_set_level(int32_t level);
int32_t tsr_log_get_level(void);
/* Host-side logging, same format as the plugins' (to stderr). */
void tsr_log(int32_t level, const char *who, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Progress of long host work (preparing weights), for a front end to show. The handler is
 * process-wide; NULL (the default) shows nothing. `done` runs from 1 to `total`. */
typedef void (*tsr_progress_fn)(void *ctx, const char *what, int64_t done, int64_t total);
void tsr_progress_set(tsr_progress_fn fn, void *ctx);
void tsr_progress_report(const char *what, int64_t done, int64_t total);

/* Initialises `s` (zeroed by the caller or not) for a plugin object or instance. */
void tsr_services_init(tsr_services *s, const char *name, tsr_pool *pool);

/* Takes the error text the plugin left with set_error (or `fallback` when it left none), and
 * clears it. */
const char *tsr_services_take_error(tsr_services *s, const char *fallback);

#endif
