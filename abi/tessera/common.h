/*
 * <tessera/common.h> -- the part of the Tessera plugin ABI that every stage shares.
 *
 * The headers in <tessera/...> are the specification of the ABI; abi/CONTRACT.md numbers the
 * rules a plugin must follow. Comments on callbacks use these tags:
 *   [main]      called on the host's main thread, never concurrently with another [main] call
 *               on the same instance (since decoder 1.2, while a decoder's forward_begin runs
 *               the target's forward, the target pipeline's instances are called on another
 *               thread than the draft pipeline's: each instance still from one thread at a
 *               time);
 *   [worker]    may be called on a thread-pool worker, concurrently with other [worker] calls
 *               on the same instance for disjoint work;
 *   [any]       may be called from any thread; must be thread-safe.
 *
 * Versioning. The common part (this header: host services, tensors, parameters, descriptor)
 * and each stage interface carry their own MAJOR.MINOR. A MAJOR change breaks binary
 * compatibility; a MINOR change only appends fields at the end of structs or slots at the end
 * of tables. A plugin states, for the common part and for its stage, the MAJOR it speaks and
 * the oldest MINOR it needs; the host loads it when the MAJORs agree and its own MINOR is at
 * least the one needed. Every struct that crosses the boundary starts with `struct_size`, so
 * either side can tell which fields the other one knows: a field beyond `struct_size` is
 * absent and reads as zero/NULL. Fields and slots a MINOR appended are marked `since 1.N`;
 * everything unmarked is 1.0 (tests/abi-1.0 keeps the 1.0 headers). A struct passed as an
 * array (tsr_param_def, tsr_command, tsr_batch_entry, tsr_kv_view, tsr_kv_view_ext) never
 * grows, since its size is the array's stride: a MINOR adds a parallel array instead.
 *
 * Ownership. Whoever allocates frees. Plugins allocate through tsr_host.alloc so the host can
 * account memory per plugin. Strings passed into a callback are borrowed for the duration of
 * the call unless stated otherwise.
 *
 * Global state. A plugin keeps no global mutable state: two instances of one plugin live in
 * one process and must not see each other. Descriptors and parameter tables are `const`.
 */
#ifndef TESSERA_COMMON_H
#define TESSERA_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_COMMON_ABI_MAJOR 1
#define TSR_COMMON_ABI_MINOR 1

#if defined(_WIN32)
#define TSR_EXPORT __declspec(dllexport)
#else
#define TSR_EXPORT __attribute__((visibility("default")))
#endif

/* The one symbol a plugin object exports. */
#define TSR_PLUGIN_ENTRY_SYMBOL "tessera_plugin_entry"

/* ---------------------------------------------------------------------------------------- */
/* Status codes: 0 is success, negative is an error. The human explanation of an error goes  */
/* through tsr_host.set_error before the callback returns.                                   */

typedef int32_t tsr_status;
enum {
    TSR_OK = 0,
    TSR_E_INVALID = -1,     /* an argument or parameter value is not acceptable */
    TSR_E_NOMEM = -2,       /* an allocation failed */
    TSR_E_UNSUPPORTED = -3, /* the request is valid but this plugin cannot do it */
    TSR_E_IO = -4,          /* reading or writing a file failed */
    TSR_E_RANGE = -5,       /* a size, index or position is out of range */
    TSR_E_STATE = -6,       /* the call is not allowed in the instance's current state */
    TSR_E_INTERNAL = -7     /* a broken invariant inside the plugin */
};

/* ---------------------------------------------------------------------------------------- */
/* Stages                                                                                    */

typedef enum tsr_stage {
    TSR_STAGE_BACKEND = 1,
    TSR_STAGE_QUANTIZER = 2,
    TSR_STAGE_ATTENTION = 3,
    TSR_STAGE_CACHE = 4,
    TSR_STAGE_DECODER = 5,
    TSR_STAGE_ROUTER = 6
} tsr_stage;
#define TSR_STAGE_COUNT 6

/* ---------------------------------------------------------------------------------------- */
/* Element types. Values 0..39 are GGUF's (ggml_type) numbers, so a tensor read from a GGUF  */
/* file keeps its type id; values from 1000 up belong to plugins (a quantizer may define its  */
/* own block formats there; only that quantizer interprets them).                            */

typedef enum tsr_dtype {
    TSR_DTYPE_F32 = 0,
    TSR_DTYPE_F16 = 1,
    TSR_DTYPE_Q4_0 = 2,
    TSR_DTYPE_Q4_1 = 3,
    TSR_DTYPE_Q5_0 = 6,
    TSR_DTYPE_Q5_1 = 7,
    TSR_DTYPE_Q8_0 = 8,
    TSR_DTYPE_Q8_1 = 9,
    TSR_DTYPE_Q2_K = 10,
    TSR_DTYPE_Q3_K = 11,
    TSR_DTYPE_Q4_K = 12,
    TSR_DTYPE_Q5_K = 13,
    TSR_DTYPE_Q6_K = 14,
    TSR_DTYPE_Q8_K = 15,
    TSR_DTYPE_IQ4_NL = 20,
    TSR_DTYPE_I8 = 24,
    TSR_DTYPE_I16 = 25,
    TSR_DTYPE_I32 = 26,
    TSR_DTYPE_I64 = 27,
    TSR_DTYPE_F64 = 28,
    TSR_DTYPE_IQ4_XS = 23,
    TSR_DTYPE_BF16 = 30,
    TSR_DTYPE_PLUGIN_FIRST = 1000
} tsr_dtype;

/* ---------------------------------------------------------------------------------------- */
/* Where the running backend's buffers live, as the stages that read them see them (the       */
/* memory_space of their init structs; see <tessera/backend.h>).                              */

typedef enum tsr_memory_space {
    TSR_MEMORY_HOST = 0,  /* the CPU reads and writes them directly (the buffers may still be
                             the backend's own, allocated apart from the host's) */
    TSR_MEMORY_DEVICE = 1 /* only code that runs on the backend's device reaches them */
} tsr_memory_space;

/* ---------------------------------------------------------------------------------------- */
/* Tensors. A descriptor, never an owner: `data` belongs to whoever the call says.           */
/* ne[0] is the innermost (contiguous) dimension, as in GGUF; a weight matrix of n_out rows   */
/* and n_in columns has ne = {n_in, n_out}.                                                  */

#define TSR_MAX_DIMS 4

typedef struct tsr_tensor {
    uint32_t struct_size;
    int32_t dtype;                /* tsr_dtype or a plugin type >= TSR_DTYPE_PLUGIN_FIRST */
    uint32_t n_dims;
    int64_t ne[TSR_MAX_DIMS];     /* elements per dimension; unused dimensions are 1 */
    size_t row_bytes;             /* bytes of one row of ne[0] elements in this dtype */
    void *data;                   /* in the memory space of the backend that owns it */
    const char *name;             /* GGUF tensor name, e.g. "blk.0.attn_q.weight"; may be NULL */
    void *extra;                  /* owned by the quantizer that prepared the tensor, or NULL */
} tsr_tensor;

/* ---------------------------------------------------------------------------------------- */
/* Parameters. A plugin declares a static table; the host validates configuration values     */
/* against it (type, range, choices) before the plugin sees them, prints it for              */
/* `tessera plugins info`, and passes typed values in the same order as the table.           */

typedef enum tsr_param_type {
    TSR_PARAM_BOOL = 1,
    TSR_PARAM_INT = 2,    /* int64; bounded by [min, max] */
    TSR_PARAM_FLOAT = 3,  /* double; bounded by [min, max] */
    TSR_PARAM_STRING = 4, /* free text */
    TSR_PARAM_ENUM = 5    /* one of `choices`; passed as its index and its text */
} tsr_param_type;

/* What a parameter means to the host, beyond its name. The host maps its own options to the
 * parameter of the bound plugin that declares the role, and to nothing when no parameter does
 * (the option is then refused, naming the option and the plugin): `-t` and the size of the
 * host's thread pool to the backend's THREADS, `--temperature` and `--seed` to the decoder's
 * TEMPERATURE and SEED, the TYPE of `tessera quantize` to the quantizer's WEIGHT_TYPE. At most
 * one parameter of a plugin has a given role, and it has the type stated here (the host
 * refuses the plugin otherwise). A role this host does not know reads as NONE. */
typedef enum tsr_param_role {
    TSR_PARAM_ROLE_NONE = 0,
    TSR_PARAM_ROLE_THREADS = 1,     /* INT >= 1: threads to compute with */
    TSR_PARAM_ROLE_SEED = 2,        /* INT: seed of the plugin's random numbers */
    TSR_PARAM_ROLE_TEMPERATURE = 3, /* FLOAT >= 0: sampling temperature, 0 choosing greedily */
    TSR_PARAM_ROLE_WEIGHT_TYPE = 4, /* ENUM: the weight format to make, choices named as GGUF
                                       types in lower case ("q8_0", "q4_k_m"...) */
    TSR_PARAM_ROLE_PARALLEL = 5     /* since 1.1. INT >= 1: sequences a decoder generates side by
                                       side from one prompt; `--parallel N` sets it */
} tsr_param_role;

/* Parameter definitions and commands (below) are elements of arrays: their size is their
 * stride, so these two structs never grow. A later ABI that needs more per-parameter facts
 * adds a parallel table to the descriptor instead. */
typedef struct tsr_param_def {
    uint32_t struct_size;
    const char *name;            /* [a-z0-9_]+, unique within the plugin */
    int32_t type;                /* tsr_param_type */
    const char *default_value;   /* as it would be written in YAML; NULL = required */
    double min, max;             /* INT and FLOAT only; min > max means unbounded */
    const char *const *choices;  /* ENUM only: NULL-terminated list */
    const char *unit;            /* e.g. "tokens"; may be NULL */
    const char *doc;             /* one line */
    int32_t role;                /* tsr_param_role; 0 for most parameters */
} tsr_param_def;

typedef struct tsr_param_value {
    int32_t type; /* copy of the definition's type */
    union {
        int b;          /* BOOL: 0 or 1 */
        int64_t i;      /* INT, and ENUM's choice index */
        double f;       /* FLOAT */
    } u;
    const char *s; /* STRING and ENUM: the text (owned by the host, valid while the instance lives) */
} tsr_param_value;

typedef struct tsr_params {
    uint32_t struct_size;
    uint32_t count;                 /* = the descriptor's n_params */
    const tsr_param_def *defs;      /* the plugin's own table */
    const tsr_param_value *values;  /* values[i] belongs to defs[i] */
} tsr_params;

/* ---------------------------------------------------------------------------------------- */
/* Host services. One table per loaded object, valid until the object is unloaded. Entries   */
/* only ever get appended; check struct_size (or TSR_HOST_HAS) before using a newer one.      */

typedef enum tsr_log_level {
    TSR_LOG_ERROR = 0,
    TSR_LOG_WARN = 1,
    TSR_LOG_INFO = 2,
    TSR_LOG_DEBUG = 3
} tsr_log_level;

/* One task of a parallel_for: `ith` in [0, nth). Called on pool workers ([worker]). */
typedef void (*tsr_task_fn)(void *arg, int ith, int nth);

typedef struct tsr_host {
    uint32_t struct_size;
    uint16_t common_major, common_minor; /* the host's common ABI version */
    const char *host_version;            /* e.g. "0.1.0" */
    void *ctx;                           /* first argument of every service below */

    /* [any] Writes one line to the host's log (stderr by default), prefixed with the plugin id.
     * printf-style; the message needs no trailing newline. */
    void (*log)(void *ctx, int32_t level, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 3, 4)))
#endif
        ;

    /* [any] Records the explanation of the error the current callback is about to return.
     * The host copies the text and shows it with context (plugin id, file, YAML path). Safe
     * from several threads at once (a worker of a parallel_for may call it): the last call
     * before the callback returns is the one shown. */
    void (*set_error)(void *ctx, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 2, 3)))
#endif
        ;

    /* [any] Accounted allocation. `align` is a power of two (0 = default, 64 bytes). Returns
     * NULL on failure. Memory is freed with `free` and never by the C library's free();
     * free(ctx, NULL) does nothing. */
    void *(*alloc)(void *ctx, size_t size, size_t align);
    void (*free)(void *ctx, void *ptr);

    /* [main] Runs fn(arg, ith, nth) for ith = 0..nth-1 on the host pool (the caller takes a
     * share) and returns when all are done. nth is the pool size (n_threads). Results must not
     * depend on nth. Nested calls from inside a task run serially on the calling worker. */
    void (*parallel_for)(void *ctx, tsr_task_fn fn, void *arg);
    int32_t (*n_threads)(void *ctx);

    /* [any] Monotonic clock in nanoseconds, for plugins that report their own timings. */
    uint64_t (*now_ns)(void *ctx);
} tsr_host;

#define TSR_HOST_HAS(host, field) \
    ((host)->struct_size >= offsetof(tsr_host, field) + sizeof((host)->field) && (host)->field)

/* ---------------------------------------------------------------------------------------- */
/* Plugin commands: extra functions a plugin exports for diagnostics (dump statistics, reset  */
/* counters...). The host calls them through libffi from `tessera plugins call` and from a    */
/* pipeline's `hooks:`.                                                                       */
/*                                                                                            */
/* `signature` is "R(A...)" where R is the return type and each A one argument, as letters:   */
/*   v void (return only)   i int32_t   l int64_t   d double   s const char*   b int (0/1)    */
/*   I the plugin instance (void*; the host passes the live instance; first argument only)   */
/* e.g. "i(Is)" is int32_t fn(void *instance, const char *path). A return of type i is a     */
/* tsr_status when `returns_status` is set. Text output goes through tsr_host.log.            */

typedef struct tsr_command {
    uint32_t struct_size;
    const char *name;      /* [a-z0-9_]+ */
    const char *signature; /* see above */
    void (*fn)(void);      /* cast to the real type by the host, through libffi */
    const char *doc;       /* one line, arguments named */
    int32_t returns_status;
} tsr_command;

/* ---------------------------------------------------------------------------------------- */
/* Descriptor: what a plugin is. Static and const; the host reads it, never writes it.       */

typedef struct tsr_plugin_desc {
    uint32_t struct_size;
    int32_t stage;                  /* tsr_stage */
    uint16_t stage_major;           /* the stage MAJOR the plugin speaks */
    uint16_t stage_minor_needed;    /* the oldest stage MINOR the plugin works with */
    const char *name;               /* unique id used in configs, [a-z0-9_-]+ */
    const char *version;            /* the plugin's own version, free text */
    const char *description;        /* one line */

    const tsr_param_def *params;
    uint32_t n_params;
    const tsr_command *commands;
    uint32_t n_commands;

    /* [main] Optional. How well the plugin can run on this machine: 0 = cannot (it is then
     * listed but refused in pipelines, with the message it gave through set_error), higher is
     * better. NULL means 1. */
    int32_t (*probe)(const tsr_host *host);

    /* The stage's table (tsr_backend_vtable, tsr_cache_vtable, ...), which starts with its own
     * struct_size. Never NULL. */
    const void *vtable;
} tsr_plugin_desc;

/* What the entry point returns: every plugin the object provides. Static and const. */
typedef struct tsr_plugin_set {
    uint32_t struct_size;
    uint16_t common_major;        /* the common MAJOR the object speaks */
    uint16_t common_minor_needed; /* the oldest common MINOR it works with */
    uint32_t n_plugins;
    const tsr_plugin_desc *const *plugins;
} tsr_plugin_set;

/* The entry point, exported as TSR_PLUGIN_ENTRY_SYMBOL. [main] Called once after dlopen.
 * `host` stays valid until the object is unloaded. Returning NULL refuses to load (explain
 * through host->set_error). */
typedef const tsr_plugin_set *(*tsr_plugin_entry_fn)(uint32_t host_common_major,
                                                      uint32_t host_common_minor,
                                                      const tsr_host *host);

#ifdef __cplusplus
}
#endif
#endif /* TESSERA_COMMON_H */
