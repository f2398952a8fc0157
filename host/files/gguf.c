/* GGUF reader. The layout (all little-endian):
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x { str key, u32 type, value }            str = u64 length + bytes
 *   n_tensors x { str name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset }
 *   padding to general.alignment, then the data section (tensor offsets are relative to it).
 * Every length and count is checked against the bytes that are left before it is used, and
 * before anything proportional to it is allocated, so a hostile file costs at most memory
 * proportional to its own size. */
#include "files/gguf.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/file.h"
#include "files/dtype.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "the GGUF reader reads little-endian values in place");

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32
/* Smallest encodings, used to refuse counts the rest of the file cannot hold. */
#define GGUF_MIN_KV_BYTES 13     /* empty key (8) + type (4) + one u8 (1) */
#define GGUF_MIN_TENSOR_BYTES 24 /* empty name (8) + n_dims (4) + type (4) + offset (8) */

/* ---------------------------------------------------------------------------------------- */
/* Storage                                                                                    */

typedef struct gguf_kv {
    const char *key; /* NUL-terminated, in the model's pool */
    tsr_gguf_type type;
    union {
        uint64_t u; /* unsigned integer types */
        int64_t i;  /* signed integer types */
        double f;   /* FLOAT32, FLOAT64 */
        bool b;
        tsr_gguf_str s;
        struct {
            tsr_gguf_type type;
            uint64_t n;
            const uint8_t *data;  /* first element */
            uint64_t *str_off;    /* STRING arrays: offset of element i's length from data */
        } arr;
    } v;
} gguf_kv;

/* Open-addressing hash index from names to positions in the key or tensor table. */
typedef struct name_slot {
    uint64_t hash;
    int64_t idx; /* -1: empty */
} name_slot;

typedef struct name_index {
    name_slot *slots;
    size_t cap; /* a power of two, or 0 */
    size_t count;
} name_index;

typedef struct pool_chunk {
    struct pool_chunk *next;
    size_t used, cap;
    char data[];
} pool_chunk;

struct tsr_gguf {
    char *path;
    uint32_t version;
    uint64_t alignment;
    const uint8_t *base; /* the file's bytes */
    size_t size;
    void *map; /* owned mapping, or NULL */
    size_t map_size;

    gguf_kv *kv;
    int64_t n_kv, cap_kv;
    name_index kv_index;

    tsr_gguf_tensor *tensors;
    int64_t n_tensors, cap_tensors;
    name_index tensor_index;

    pool_chunk *pool;
};

static uint64_t hash_name(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3u;
    return h;
}

typedef const char *(*name_of_fn)(const tsr_gguf *g, int64_t idx);

static const char *kv_name_of(const tsr_gguf *g, int64_t idx) { return g->kv[idx].key; }
static const char *tensor_name_of(const tsr_gguf *g, int64_t idx) { return g->tensors[idx].name; }

static int64_t index_find(const tsr_gguf *g, const name_index *ix, name_of_fn name_of,
                          const char *name, size_t len, uint64_t h) {
    if (ix->cap == 0) return -1;
    for (size_t j = h & (ix->cap - 1);; j = (j + 1) & (ix->cap - 1)) {
        const name_slot *s = &ix->slots[j];
        if (s->idx < 0) return -1;
        if (s->hash != h) continue;
        const char *other = name_of(g, s->idx);
        if (strlen(other) == len && memcmp(other, name, len) == 0) return s->idx;
    }
}

static bool index_grow(name_index *ix) {
    size_t cap = ix->cap ? ix->cap * 2 : 16;
    name_slot *slots = malloc(cap * sizeof *slots);
    if (!slots) return false;
    for (size_t j = 0; j < cap; j++) slots[j].idx = -1;
    for (size_t j = 0; j < ix->cap; j++) {
        if (ix->slots[j].idx < 0) continue;
        size_t k = ix->slots[j].hash & (cap - 1);
        while (slots[k].idx >= 0) k = (k + 1) & (cap - 1);
        slots[k] = ix->slots[j];
    }
    free(ix->slots);
    ix->slots = slots;
    ix->cap = cap;
    return true;
}

/* Registers `idx` under its name. Returns -1 when inserted, the earlier index for a duplicate,
 * or -2 when out of memory. */
static int64_t index_insert(const tsr_gguf *g, name_index *ix, name_of_fn name_of, int64_t idx) {
    const char *name = name_of(g, idx);
    size_t len = strlen(name);
    uint64_t h = hash_name(name, len);
    int64_t prev = index_find(g, ix, name_of, name, len, h);
    if (prev >= 0) return prev;
    if ((ix->count + 1) * 2 > ix->cap && !index_grow(ix)) return -2;
    size_t j = h & (ix->cap - 1);
    while (ix->slots[j].idx >= 0) j = (j + 1) & (ix->cap - 1);
    ix->slots[j] = (name_slot){h, idx};
    ix->count++;
    return -1;
}

/* Copies len bytes and a NUL into the model's pool. */
static char *pool_strdup(tsr_gguf *g, const char *s, size_t len) {
    pool_chunk *c = g->pool;
    if (!c || c->cap - c->used < len + 1) {
        size_t cap = len + 1 > 4096 ? len + 1 : 4096;
        c = malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = g->pool;
        c->used = 0;
        c->cap = cap;
        g->pool = c;
    }
    char *p = c->data + c->used;
    memcpy(p, s, len);
    p[len] = '\0';
    c->used += len + 1;
    return p;
}

static bool reserve(void **arr, int64_t *cap, int64_t need, size_t elem) {
    if (need <= *cap) return true;
    int64_t n = *cap ? *cap : 8;
    while (n < need) n *= 2;
    void *p = realloc(*arr, (size_t)n * elem);
    if (!p) return false;
    *arr = p;
    *cap = n;
    return true;
}

tsr_gguf *tsr_gguf_new(const char *name) {
    tsr_gguf *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->path = strdup(name);
    if (!g->path) {
        free(g);
        return NULL;
    }
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    return g;
}

void tsr_gguf_adopt_mapping(tsr_gguf *g, void *addr, size_t size) {
    g->map = addr;
    g->map_size = size;
}

void tsr_gguf_close(tsr_gguf *g) {
    if (!g) return;
    for (int64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].type == TSR_GGUF_ARRAY) free(g->kv[i].v.arr.str_off);
    free(g->kv);
    free(g->tensors);
    free(g->kv_index.slots);
    free(g->tensor_index.slots);
    while (g->pool) {
        pool_chunk *next = g->pool->next;
        free(g->pool);
        g->pool = next;
    }
    if (g->map) munmap(g->map, g->map_size);
    free(g->path);
    free(g);
}

/* Appends a key named `key` (len bytes, no NUL inside). Returns its index, or a negative
 * status after filling err; `where` prefixes messages ("file: offset N" or "file"). */
static int64_t kv_append(tsr_gguf *g, const char *key, size_t len, const char *where,
                         tsr_error *err) {
    if (!reserve((void **)&g->kv, &g->cap_kv, g->n_kv + 1, sizeof *g->kv))
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for key %" PRId64, where,
                             g->n_kv);
    gguf_kv *kv = &g->kv[g->n_kv];
    memset(kv, 0, sizeof *kv);
    kv->key = pool_strdup(g, key, len);
    if (!kv->key) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", where);
    int64_t prev = index_insert(g, &g->kv_index, kv_name_of, g->n_kv);
    if (prev == -2) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", where);
    if (prev >= 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: key '%s' appears twice (keys %" PRId64
                             " and %" PRId64 ")", where, kv->key, prev, g->n_kv);
    return g->n_kv++;
}

/* Appends a tensor whose fields are already checked; only the name remains to copy and index. */
static int tensor_append(tsr_gguf *g, const tsr_gguf_tensor *t, size_t name_len,
                         const char *where, tsr_error *err) {
    if (!reserve((void **)&g->tensors, &g->cap_tensors, g->n_tensors + 1, sizeof *g->tensors))
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for tensor %" PRId64, where,
                             g->n_tensors);
    tsr_gguf_tensor *dst = &g->tensors[g->n_tensors];
    *dst = *t;
    dst->name = pool_strdup(g, t->name, name_len);
    if (!dst->name) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", where);
    int64_t prev = index_insert(g, &g->tensor_index, tensor_name_of, g->n_tensors);
    if (prev == -2) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", where);
    if (prev >= 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s' appears twice (tensors %" PRId64
                             " and %" PRId64 ")", where, dst->name, prev, g->n_tensors);
    g->n_tensors++;
    return TSR_OK;
}

/* Shape checks shared by both builders: known type, ne[0] a whole number of blocks, and a
 * byte size that fits. `where` prefixes messages. */
static int tensor_size(const char *where, const char *name, int32_t dtype, const int64_t ne[4],
                       size_t *size, tsr_error *err) {
    if (!tsr_dtype_known(dtype))
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': unknown type %" PRId32,
                             where, name, dtype);
    uint32_t block = tsr_dtype_block(dtype);
    if (ne[0] % block != 0)
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': ne[0] = %" PRId64
                             " is not a multiple of the %s block size %" PRIu32, where, name,
                             ne[0], tsr_dtype_name(dtype), block);
    if (!tsr_dtype_tensor_bytes(dtype, ne, size))
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': %" PRId64 " x %" PRId64
                             " x %" PRId64 " x %" PRId64 " elements of %s overflow the size",
                             where, name, ne[0], ne[1], ne[2], ne[3], tsr_dtype_name(dtype));
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Builder                                                                                    */

static bool type_is_int(tsr_gguf_type t) {
    return t == TSR_GGUF_UINT8 || t == TSR_GGUF_INT8 || t == TSR_GGUF_UINT16 ||
           t == TSR_GGUF_INT16 || t == TSR_GGUF_UINT32 || t == TSR_GGUF_INT32 ||
           t == TSR_GGUF_UINT64 || t == TSR_GGUF_INT64;
}

static bool type_is_signed(tsr_gguf_type t) {
    return t == TSR_GGUF_INT8 || t == TSR_GGUF_INT16 || t == TSR_GGUF_INT32 ||
           t == TSR_GGUF_INT64;
}

static bool type_is_float(tsr_gguf_type t) {
    return t == TSR_GGUF_FLOAT32 || t == TSR_GGUF_FLOAT64;
}

static bool int_fits(tsr_gguf_type t, int64_t v) {
    switch (t) {
    case TSR_GGUF_UINT8: return v >= 0 && v <= UINT8_MAX;
    case TSR_GGUF_INT8: return v >= INT8_MIN && v <= INT8_MAX;
    case TSR_GGUF_UINT16: return v >= 0 && v <= UINT16_MAX;
    case TSR_GGUF_INT16: return v >= INT16_MIN && v <= INT16_MAX;
    case TSR_GGUF_UINT32: return v >= 0 && v <= (int64_t)UINT32_MAX;
    case TSR_GGUF_INT32: return v >= INT32_MIN && v <= INT32_MAX;
    case TSR_GGUF_UINT64: return v >= 0;
    default: return true;
    }
}

int tsr_gguf_add_int(tsr_gguf *g, const char *key, tsr_gguf_type type, int64_t value,
                     tsr_error *err) {
    if (!type_is_int(type) || !int_fits(type, value))
        return tsr_error_set(err, TSR_E_INVALID, "%s: key '%s': %" PRId64 " is not a valid %s",
                             g->path, key, value, tsr_gguf_type_name(type));
    int64_t k = kv_append(g, key, strlen(key), g->path, err);
    if (k < 0) return (int)k;
    g->kv[k].type = type;
    if (type_is_signed(type)) g->kv[k].v.i = value;
    else g->kv[k].v.u = (uint64_t)value;
    return TSR_OK;
}

int tsr_gguf_add_float(tsr_gguf *g, const char *key, tsr_gguf_type type, double value,
                       tsr_error *err) {
    if (!type_is_float(type))
        return tsr_error_set(err, TSR_E_INVALID, "%s: key '%s': %s is not a float type",
                             g->path, key, tsr_gguf_type_name(type));
    int64_t k = kv_append(g, key, strlen(key), g->path, err);
    if (k < 0) return (int)k;
    g->kv[k].type = type;
    g->kv[k].v.f = type == TSR_GGUF_FLOAT32 ? (double)(float)value : value;
    return TSR_OK;
}

int tsr_gguf_add_bool(tsr_gguf *g, const char *key, bool value, tsr_error *err) {
    int64_t k = kv_append(g, key, strlen(key), g->path, err);
    if (k < 0) return (int)k;
    g->kv[k].type = TSR_GGUF_BOOL;
    g->kv[k].v.b = value;
    return TSR_OK;
}

int tsr_gguf_add_str(tsr_gguf *g, const char *key, const char *value, tsr_error *err) {
    int64_t k = kv_append(g, key, strlen(key), g->path, err);
    if (k < 0) return (int)k;
    size_t len = strlen(value);
    const char *copy = pool_strdup(g, value, len);
    if (!copy) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", g->path);
    g->kv[k].type = TSR_GGUF_STRING;
    g->kv[k].v.s = (tsr_gguf_str){copy, len};
    return TSR_OK;
}

int tsr_gguf_add_tensor(tsr_gguf *g, const char *name, int32_t dtype, uint32_t n_dims,
                        const int64_t *ne, const void *data, uint64_t offset, tsr_error *err) {
    if (n_dims < 1 || n_dims > 4)
        return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': %" PRIu32
                             " dimensions, expected 1 to 4", g->path, name, n_dims);
    tsr_gguf_tensor t = {.name = name, .dtype = dtype, .n_dims = n_dims, .ne = {1, 1, 1, 1},
                         .offset = offset, .data = data};
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] < 0)
            return tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': ne[%" PRIu32 "] = %"
                                 PRId64 " is negative", g->path, name, d, ne[d]);
        t.ne[d] = ne[d];
    }
    int rc = tensor_size(g->path, name, dtype, t.ne, &t.size, err);
    if (rc < 0) return rc;
    return tensor_append(g, &t, strlen(name), g->path, err);
}

/* ---------------------------------------------------------------------------------------- */
/* Parser                                                                                     */

typedef struct cursor {
    tsr_gguf *g;
    size_t pos;
    tsr_error *err;
} cursor;

static size_t left(const cursor *c) { return c->g->size - c->pos; }

/* Fails unless n more bytes exist. `what` names the item being read. */
static int need(cursor *c, uint64_t n, const char *what) {
    if (n <= left(c)) return TSR_OK;
    return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: file ends in %s (%" PRIu64
                         " bytes needed, %zu left)", c->g->path, c->pos, what, n, left(c));
}

static int read_u32(cursor *c, uint32_t *v, const char *what) {
    int rc = need(c, 4, what);
    if (rc < 0) return rc;
    memcpy(v, c->g->base + c->pos, 4);
    c->pos += 4;
    return TSR_OK;
}

static int read_u64(cursor *c, uint64_t *v, const char *what) {
    int rc = need(c, 8, what);
    if (rc < 0) return rc;
    memcpy(v, c->g->base + c->pos, 8);
    c->pos += 8;
    return TSR_OK;
}

/* Reads a string: its length, then checks the bytes are there. */
static int read_str(cursor *c, tsr_gguf_str *s, const char *what) {
    size_t at = c->pos;
    uint64_t len;
    int rc = read_u64(c, &len, what);
    if (rc < 0) return rc;
    if (len > left(c))
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: %s: length %" PRIu64
                             " exceeds the rest of the file (%zu bytes)", c->g->path, at, what,
                             len, left(c));
    s->ptr = (const char *)c->g->base + c->pos;
    s->len = len;
    c->pos += (size_t)len;
    return TSR_OK;
}

/* Key and tensor names become C strings and appear in one-line messages: no control bytes
 * (NUL, newline, ...). */
static int check_name(cursor *c, size_t at, tsr_gguf_str s, const char *what) {
    for (uint64_t i = 0; i < s.len; i++) {
        unsigned char ch = (unsigned char)s.ptr[i];
        if (ch < 0x20 || ch == 0x7f)
            return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: %s contains the "
                                 "control byte 0x%02x", c->g->path, at, what, ch);
    }
    return TSR_OK;
}

/* Decodes one value of fixed-size `type` at p into kv's scalar union. */
static void decode_scalar(const uint8_t *p, tsr_gguf_type type, gguf_kv *kv) {
    switch (type) {
    case TSR_GGUF_UINT8: kv->v.u = p[0]; break;
    case TSR_GGUF_INT8: kv->v.i = (int8_t)p[0]; break;
    case TSR_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); kv->v.u = x; break; }
    case TSR_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); kv->v.i = x; break; }
    case TSR_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); kv->v.u = x; break; }
    case TSR_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); kv->v.i = x; break; }
    case TSR_GGUF_UINT64: memcpy(&kv->v.u, p, 8); break;
    case TSR_GGUF_INT64: memcpy(&kv->v.i, p, 8); break;
    case TSR_GGUF_FLOAT32: { float x; memcpy(&x, p, 4); kv->v.f = x; break; }
    case TSR_GGUF_FLOAT64: memcpy(&kv->v.f, p, 8); break;
    default: kv->v.b = p[0] != 0; break; /* BOOL */
    }
}

static int read_scalar(cursor *c, gguf_kv *kv, tsr_gguf_type type, const char *what) {
    size_t n = tsr_gguf_type_size(type);
    int rc = need(c, n, what);
    if (rc < 0) return rc;
    decode_scalar(c->g->base + c->pos, type, kv);
    c->pos += n;
    return TSR_OK;
}

static int read_array(cursor *c, gguf_kv *kv, const char *what) {
    size_t at = c->pos;
    uint32_t elem;
    uint64_t n;
    int rc = read_u32(c, &elem, what);
    if (rc < 0) return rc;
    if (elem == TSR_GGUF_ARRAY)
        return tsr_error_set(c->err, TSR_E_UNSUPPORTED, "%s: offset %zu: key '%s': arrays of "
                             "arrays are not supported", c->g->path, at, kv->key);
    if (elem >= TSR_GGUF_TYPE_COUNT)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: key '%s': unknown array "
                             "element type %" PRIu32 ", expected 0 to 12", c->g->path, at,
                             kv->key, elem);
    size_t at_n = c->pos;
    rc = read_u64(c, &n, what);
    if (rc < 0) return rc;
    /* Each element takes at least its fixed size, or 8 bytes (the length) for a string. */
    uint64_t min = elem == TSR_GGUF_STRING ? 8 : tsr_gguf_type_size(elem);
    if (n > left(c) / min)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: key '%s': array length %"
                             PRIu64 " exceeds the rest of the file (%zu bytes)", c->g->path,
                             at_n, kv->key, n, left(c));
    kv->v.arr.type = elem;
    kv->v.arr.n = n;
    kv->v.arr.data = c->g->base + c->pos;
    if (elem != TSR_GGUF_STRING) {
        c->pos += (size_t)(n * min);
        return TSR_OK;
    }
    kv->v.arr.str_off = malloc((size_t)(n ? n : 1) * sizeof *kv->v.arr.str_off);
    if (!kv->v.arr.str_off)
        return tsr_error_set(c->err, TSR_E_NOMEM, "%s: key '%s': out of memory for %" PRIu64
                             " strings", c->g->path, kv->key, n);
    size_t start = c->pos;
    for (uint64_t i = 0; i < n; i++) {
        kv->v.arr.str_off[i] = c->pos - start;
        tsr_gguf_str s;
        char elem_what[320];
        snprintf(elem_what, sizeof elem_what, "element %" PRIu64 " of key '%s'", i, kv->key);
        rc = read_str(c, &s, elem_what);
        if (rc < 0) return rc;
    }
    return TSR_OK;
}

static int read_kv(cursor *c, int64_t i) {
    char what[320];
    snprintf(what, sizeof what, "the name of key %" PRId64, i);
    size_t at = c->pos;
    tsr_gguf_str name;
    int rc = read_str(c, &name, what);
    if (rc == TSR_OK) rc = check_name(c, at, name, what);
    if (rc < 0) return rc;
    char where[320];
    snprintf(where, sizeof where, "%s: offset %zu", c->g->path, at);
    int64_t k = kv_append(c->g, name.ptr, (size_t)name.len, where, c->err);
    if (k < 0) return (int)k;
    gguf_kv *kv = &c->g->kv[k];

    snprintf(what, sizeof what, "the type of key '%s'", kv->key);
    size_t at_type = c->pos;
    uint32_t type;
    rc = read_u32(c, &type, what);
    if (rc < 0) return rc;
    if (type >= TSR_GGUF_TYPE_COUNT)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: key '%s': unknown value "
                             "type %" PRIu32 ", expected 0 to 12", c->g->path, at_type, kv->key,
                             type);
    kv->type = type;
    snprintf(what, sizeof what, "the value of key '%s'", kv->key);
    if (type == TSR_GGUF_ARRAY) return read_array(c, kv, what);
    if (type == TSR_GGUF_STRING) return read_str(c, &kv->v.s, what);
    return read_scalar(c, kv, type, what);
}

static int read_alignment(cursor *c) {
    static const char key[] = "general.alignment";
    int64_t k = tsr_gguf_find_key(c->g, key);
    if (k < 0) return TSR_OK;
    uint64_t a;
    if (!tsr_gguf_get_u64(c->g, key, &a, c->err)) return TSR_E_INVALID;
    if (a == 0 || (a & (a - 1)) != 0)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: key '%s': %" PRIu64 " is not a power "
                             "of two", c->g->path, key, a);
    c->g->alignment = a;
    return TSR_OK;
}

static int read_tensor_info(cursor *c, int64_t i) {
    char what[320];
    snprintf(what, sizeof what, "the name of tensor %" PRId64, i);
    size_t at = c->pos;
    tsr_gguf_str name;
    int rc = read_str(c, &name, what);
    if (rc == TSR_OK) rc = check_name(c, at, name, what);
    if (rc < 0) return rc;
    /* Messages quote the name: bound it so a long name cannot crowd out the rest. */
    char shown[128];
    snprintf(shown, sizeof shown, "%.*s", (int)(name.len < 100 ? name.len : 100), name.ptr);

    tsr_gguf_tensor t = {.ne = {1, 1, 1, 1}};
    snprintf(what, sizeof what, "the dimensions of tensor '%s'", shown);
    size_t at_dims = c->pos;
    rc = read_u32(c, &t.n_dims, what);
    if (rc < 0) return rc;
    if (t.n_dims > 4)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: tensor '%s': %" PRIu32
                             " dimensions, at most 4 are supported", c->g->path, at_dims, shown,
                             t.n_dims);
    for (uint32_t d = 0; d < t.n_dims; d++) {
        size_t at_ne = c->pos;
        uint64_t ne;
        rc = read_u64(c, &ne, what);
        if (rc < 0) return rc;
        if (ne > INT64_MAX)
            return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: tensor '%s': ne[%" PRIu32
                                 "] = %" PRIu64 " is too large", c->g->path, at_ne, shown, d, ne);
        t.ne[d] = (int64_t)ne;
    }
    snprintf(what, sizeof what, "the type of tensor '%s'", shown);
    size_t at_type = c->pos;
    uint32_t type;
    rc = read_u32(c, &type, what);
    if (rc < 0) return rc;
    t.dtype = type > INT32_MAX ? -1 : (int32_t)type;
    char where[320];
    snprintf(where, sizeof where, "%s: offset %zu", c->g->path, at_type);
    if (!tsr_dtype_known(t.dtype))
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: tensor '%s': unknown type %" PRIu32,
                             where, shown, type);
    rc = tensor_size(where, shown, t.dtype, t.ne, &t.size, c->err);
    if (rc < 0) return rc;

    snprintf(what, sizeof what, "the offset of tensor '%s'", shown);
    size_t at_off = c->pos;
    rc = read_u64(c, &t.offset, what);
    if (rc < 0) return rc;
    if (t.offset % c->g->alignment != 0)
        return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %zu: tensor '%s': data offset %"
                             PRIu64 " is not a multiple of the alignment %" PRIu64, c->g->path,
                             at_off, shown, t.offset, c->g->alignment);
    t.name = name.ptr;
    snprintf(where, sizeof where, "%s: offset %zu", c->g->path, at);
    return tensor_append(c->g, &t, (size_t)name.len, where, c->err);
}

static int by_offset(const void *a, const void *b) {
    const tsr_gguf_tensor *x = *(const tsr_gguf_tensor *const *)a;
    const tsr_gguf_tensor *y = *(const tsr_gguf_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x < y ? -1 : x > y; /* table order, so the message does not depend on qsort */
}

/* A tensor's bytes belong to it alone: no writer lays out two tensors over the same bytes, so
 * such a table is damaged or hostile, and would run as garbage weights. Sorted by offset,
 * each tensor must start at or after the end of the one before; empty tensors hold no bytes
 * and overlap nothing. */
static int check_overlaps(tsr_gguf *g, tsr_error *err) {
    if (g->n_tensors < 2) return TSR_OK;
    const tsr_gguf_tensor **order = malloc((size_t)g->n_tensors * sizeof *order);
    if (!order)
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %" PRId64 " tensors",
                             g->path, g->n_tensors);
    for (int64_t i = 0; i < g->n_tensors; i++) order[i] = &g->tensors[i];
    qsort(order, (size_t)g->n_tensors, sizeof *order, by_offset);
    const tsr_gguf_tensor *prev = NULL; /* the last non-empty tensor before */
    int rc = TSR_OK;
    for (int64_t i = 0; i < g->n_tensors && rc == TSR_OK; i++) {
        const tsr_gguf_tensor *t = order[i];
        if (t->size == 0) continue;
        /* No overflow: both lie inside the file (place_tensors). */
        if (prev && t->offset < prev->offset + prev->size)
            rc = tsr_error_set(err, TSR_E_INVALID, "%s: tensor '%s': data at offset %" PRIu64
                               " (%zu bytes) overlaps tensor '%s' at offset %" PRIu64 " (%zu "
                               "bytes)", g->path, t->name, t->offset, t->size, prev->name,
                               prev->offset, prev->size);
        prev = t;
    }
    free(order);
    return rc;
}

/* Places every tensor in the data section, which starts at the first aligned offset after
 * the tensor table, and checks that its bytes are inside the file and its own. */
static int place_tensors(cursor *c) {
    tsr_gguf *g = c->g;
    /* Cannot overflow: pos < 2^63 (it is inside the file) and the alignment is at most 2^63. */
    uint64_t start = ((uint64_t)c->pos + g->alignment - 1) / g->alignment * g->alignment;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        tsr_gguf_tensor *t = &g->tensors[i];
        uint64_t at, end;
        if (__builtin_add_overflow(start, t->offset, &at) || at > g->size)
            return tsr_error_set(c->err, TSR_E_INVALID, "%s: tensor '%s': data offset %" PRIu64
                                 " is past the end of the file (%zu bytes, data section at %"
                                 PRIu64 ")", g->path, t->name, t->offset, g->size, start);
        if (__builtin_add_overflow(at, (uint64_t)t->size, &end) || end > g->size)
            return tsr_error_set(c->err, TSR_E_INVALID, "%s: offset %" PRIu64 ": tensor '%s': %zu"
                                 " bytes of data run past the end of the file (%zu bytes)",
                                 g->path, at, t->name, t->size, g->size);
        t->data = g->base + at;
    }
    return check_overlaps(g, c->err);
}

static int parse(tsr_gguf *g, tsr_error *err) {
    cursor c = {.g = g, .err = err};
    uint32_t magic;
    int rc = read_u32(&c, &magic, "the magic");
    if (rc < 0) return rc;
    if (magic != GGUF_MAGIC)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 0: bad magic 0x%08" PRIx32
                             ", expected 0x%08" PRIx32 " (\"GGUF\")", g->path, magic,
                             (uint32_t)GGUF_MAGIC);
    rc = read_u32(&c, &g->version, "the version");
    if (rc < 0) return rc;
    if (g->version == 1)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: offset 4: GGUF version 1 is not "
                             "supported (only 2 and 3); convert the file again with a current "
                             "llama.cpp", g->path);
    if (g->version == 0x02000000u || g->version == 0x03000000u)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: offset 4: big-endian GGUF files are "
                             "not supported", g->path);
    if (g->version != 2 && g->version != 3)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: offset 4: GGUF version %" PRIu32
                             " is not supported (only 2 and 3)", g->path, g->version);
    uint64_t n_tensors, n_kv;
    rc = read_u64(&c, &n_tensors, "the tensor count");
    if (rc == TSR_OK) rc = read_u64(&c, &n_kv, "the key count");
    if (rc < 0) return rc;
    if (n_kv > left(&c) / GGUF_MIN_KV_BYTES)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 16: key count %" PRIu64 " exceeds "
                             "the file size (%zu bytes)", g->path, n_kv, g->size);
    if (!reserve((void **)&g->kv, &g->cap_kv, (int64_t)n_kv, sizeof *g->kv))
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %" PRIu64 " keys",
                             g->path, n_kv);
    for (int64_t i = 0; i < (int64_t)n_kv; i++) {
        rc = read_kv(&c, i);
        if (rc < 0) return rc;
    }
    rc = read_alignment(&c);
    if (rc < 0) return rc;
    /* Checked against what is left after the keys, so a file cut inside a key is reported
     * there rather than as a tensor count that no longer fits. */
    if (n_tensors > left(&c) / GGUF_MIN_TENSOR_BYTES)
        return tsr_error_set(err, TSR_E_INVALID, "%s: offset 8: tensor count %" PRIu64
                             " exceeds the file size (%zu bytes)", g->path, n_tensors, g->size);
    if (!reserve((void **)&g->tensors, &g->cap_tensors, (int64_t)n_tensors, sizeof *g->tensors))
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %" PRIu64 " tensors",
                             g->path, n_tensors);
    for (int64_t i = 0; i < (int64_t)n_tensors; i++) {
        rc = read_tensor_info(&c, i);
        if (rc < 0) return rc;
    }
    return place_tensors(&c);
}

int tsr_gguf_open_memory(const void *data, size_t size, const char *name, tsr_gguf **out,
                         tsr_error *err) {
    *out = NULL;
    tsr_gguf *g = tsr_gguf_new(name);
    if (!g) return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", name);
    g->base = data;
    g->size = size;
    int rc = parse(g, err);
    if (rc < 0) {
        tsr_gguf_close(g);
        return rc;
    }
    *out = g;
    return TSR_OK;
}

int tsr_gguf_map_file(const char *path, void **addr, size_t *size, tsr_error *err) {
    *addr = NULL;
    *size = 0;
    uint64_t bytes;
    int fd = tsr_file_open_regular(path, &bytes, err);
    if (fd < 0) return fd;
    if (bytes > 0) {
        void *map = mmap(NULL, (size_t)bytes, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return tsr_error_set(err, TSR_E_IO, "%s: cannot map %" PRIu64 " bytes: %s", path,
                                 bytes, strerror(e));
        }
        *addr = map;
        *size = (size_t)bytes;
    }
    close(fd);
    return TSR_OK;
}

int tsr_gguf_open(const char *path, tsr_gguf **out, tsr_error *err) {
    *out = NULL;
    void *map;
    size_t size;
    int rc = tsr_gguf_map_file(path, &map, &size, err);
    if (rc < 0) return rc;
    tsr_gguf *g = tsr_gguf_new(path);
    if (!g) {
        if (map) munmap(map, size);
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", path);
    }
    if (map) tsr_gguf_adopt_mapping(g, map, size);
    g->base = map;
    g->size = size;
    rc = parse(g, err);
    if (rc < 0) {
        tsr_gguf_close(g);
        return rc;
    }
    *out = g;
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Queries                                                                                    */

const char *tsr_gguf_type_name(tsr_gguf_type type) {
    static const char *const names[TSR_GGUF_TYPE_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "arr", "u64", "i64", "f64"};
    return (unsigned)type < TSR_GGUF_TYPE_COUNT ? names[type] : "?";
}

size_t tsr_gguf_type_size(tsr_gguf_type type) {
    static const uint8_t sizes[TSR_GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return (unsigned)type < TSR_GGUF_TYPE_COUNT ? sizes[type] : 0;
}

const char *tsr_gguf_path(const tsr_gguf *g) { return g->path; }
const void *tsr_gguf_mapping(const tsr_gguf *g, size_t *size) {
    *size = g->map ? g->map_size : 0;
    return g->map;
}
uint32_t tsr_gguf_version(const tsr_gguf *g) { return g->version; }
uint64_t tsr_gguf_alignment(const tsr_gguf *g) { return g->alignment; }
int64_t tsr_gguf_n_keys(const tsr_gguf *g) { return g->n_kv; }
const char *tsr_gguf_key_name(const tsr_gguf *g, int64_t i) { return g->kv[i].key; }
tsr_gguf_type tsr_gguf_key_type(const tsr_gguf *g, int64_t i) { return g->kv[i].type; }

int64_t tsr_gguf_find_key(const tsr_gguf *g, const char *key) {
    size_t len = strlen(key);
    return index_find(g, &g->kv_index, kv_name_of, key, len, hash_name(key, len));
}

static const gguf_kv *find_kv(const tsr_gguf *g, const char *key, tsr_error *err) {
    int64_t k = tsr_gguf_find_key(g, key);
    if (k < 0) {
        tsr_error_set(err, TSR_E_INVALID, "%s: key '%s' is missing", g->path, key);
        return NULL;
    }
    return &g->kv[k];
}

static bool wrong_type(const tsr_gguf *g, const gguf_kv *kv, const char *expected,
                       tsr_error *err) {
    tsr_error_set(err, TSR_E_INVALID, "%s: key '%s': expected %s, found %s", g->path, kv->key,
                  expected, tsr_gguf_type_name(kv->type));
    return false;
}

bool tsr_gguf_get_u64(const tsr_gguf *g, const char *key, uint64_t *out, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (!type_is_int(kv->type)) return wrong_type(g, kv, "an unsigned integer", err);
    if (type_is_signed(kv->type) && kv->v.i < 0) {
        tsr_error_set(err, TSR_E_RANGE, "%s: key '%s': %" PRId64 " is negative, expected an "
                      "unsigned integer", g->path, key, kv->v.i);
        return false;
    }
    *out = kv->v.u;
    return true;
}

bool tsr_gguf_get_i64(const tsr_gguf *g, const char *key, int64_t *out, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (!type_is_int(kv->type)) return wrong_type(g, kv, "an integer", err);
    if (!type_is_signed(kv->type) && kv->v.u > INT64_MAX) {
        tsr_error_set(err, TSR_E_RANGE, "%s: key '%s': %" PRIu64 " does not fit an int64",
                      g->path, key, kv->v.u);
        return false;
    }
    *out = kv->v.i;
    return true;
}

static double kv_number(const gguf_kv *kv) {
    if (type_is_float(kv->type)) return kv->v.f;
    return type_is_signed(kv->type) ? (double)kv->v.i : (double)kv->v.u;
}

bool tsr_gguf_get_f64(const tsr_gguf *g, const char *key, double *out, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (!type_is_int(kv->type) && !type_is_float(kv->type))
        return wrong_type(g, kv, "a number", err);
    *out = kv_number(kv);
    return true;
}

bool tsr_gguf_get_bool(const tsr_gguf *g, const char *key, bool *out, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (kv->type != TSR_GGUF_BOOL) return wrong_type(g, kv, "bool", err);
    *out = kv->v.b;
    return true;
}

bool tsr_gguf_get_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (kv->type != TSR_GGUF_STRING) return wrong_type(g, kv, "str", err);
    *out = kv->v.s;
    return true;
}

uint64_t tsr_gguf_u64_or(const tsr_gguf *g, const char *key, uint64_t fallback) {
    uint64_t v;
    return tsr_gguf_get_u64(g, key, &v, NULL) ? v : fallback;
}

double tsr_gguf_f64_or(const tsr_gguf *g, const char *key, double fallback) {
    double v;
    return tsr_gguf_get_f64(g, key, &v, NULL) ? v : fallback;
}

bool tsr_gguf_bool_or(const tsr_gguf *g, const char *key, bool fallback) {
    bool v;
    return tsr_gguf_get_bool(g, key, &v, NULL) ? v : fallback;
}

bool tsr_gguf_get_arr(const tsr_gguf *g, const char *key, int64_t *k, tsr_gguf_type *elem_type,
                      uint64_t *n, tsr_error *err) {
    const gguf_kv *kv = find_kv(g, key, err);
    if (!kv) return false;
    if (kv->type != TSR_GGUF_ARRAY) return wrong_type(g, kv, "an array", err);
    if (k) *k = kv - g->kv;
    if (elem_type) *elem_type = kv->v.arr.type;
    if (n) *n = kv->v.arr.n;
    return true;
}

tsr_gguf_type tsr_gguf_arr_type(const tsr_gguf *g, int64_t k) { return g->kv[k].v.arr.type; }
uint64_t tsr_gguf_arr_len(const tsr_gguf *g, int64_t k) { return g->kv[k].v.arr.n; }

const void *tsr_gguf_arr_data(const tsr_gguf *g, int64_t k) {
    const gguf_kv *kv = &g->kv[k];
    return kv->v.arr.type == TSR_GGUF_STRING ? NULL : kv->v.arr.data;
}

tsr_gguf_str tsr_gguf_arr_str(const tsr_gguf *g, int64_t k, uint64_t i) {
    const gguf_kv *kv = &g->kv[k];
    tsr_gguf_str s = {NULL, 0};
    if (kv->v.arr.type != TSR_GGUF_STRING || i >= kv->v.arr.n) return s;
    const uint8_t *p = kv->v.arr.data + kv->v.arr.str_off[i];
    memcpy(&s.len, p, 8);
    s.ptr = (const char *)p + 8;
    return s;
}

/* Decodes element i of a numeric array into the scalar union of `tmp`. */
static bool arr_elem(const gguf_kv *kv, uint64_t i, gguf_kv *tmp) {
    tsr_gguf_type t = kv->v.arr.type;
    if (t == TSR_GGUF_STRING || i >= kv->v.arr.n) return false;
    tmp->type = t;
    decode_scalar(kv->v.arr.data + i * tsr_gguf_type_size(t), t, tmp);
    return true;
}

int64_t tsr_gguf_arr_i64(const tsr_gguf *g, int64_t k, uint64_t i) {
    gguf_kv e;
    if (!arr_elem(&g->kv[k], i, &e)) return 0;
    if (e.type == TSR_GGUF_BOOL) return e.v.b;
    if (!type_is_int(e.type)) return 0;
    if (!type_is_signed(e.type)) return e.v.u > INT64_MAX ? INT64_MAX : (int64_t)e.v.u;
    return e.v.i;
}

double tsr_gguf_arr_f64(const tsr_gguf *g, int64_t k, uint64_t i) {
    gguf_kv e;
    if (!arr_elem(&g->kv[k], i, &e)) return 0;
    if (e.type == TSR_GGUF_BOOL) return e.v.b;
    return kv_number(&e);
}

/* Appends printf output at *len within buf[n], tracking the untruncated length. */
static void put(char *buf, size_t n, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void put(char *buf, size_t n, size_t *len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(*len < n ? buf + *len : NULL, *len < n ? n - *len : 0, fmt, ap);
    va_end(ap);
    if (w > 0) *len += (size_t)w;
}

int tsr_gguf_key_format(const tsr_gguf *g, int64_t i, char *buf, size_t n) {
    const gguf_kv *kv = &g->kv[i];
    size_t len = 0;
    if (n) buf[0] = '\0';
    switch (kv->type) {
    case TSR_GGUF_ARRAY:
        put(buf, n, &len, "[%s x %" PRIu64 "]", tsr_gguf_type_name(kv->v.arr.type), kv->v.arr.n);
        break;
    case TSR_GGUF_STRING:
        put(buf, n, &len, "\"");
        for (uint64_t j = 0; j < kv->v.s.len; j++) {
            unsigned char ch = (unsigned char)kv->v.s.ptr[j];
            if (ch == '"' || ch == '\\') put(buf, n, &len, "\\%c", ch);
            else if (ch == '\n') put(buf, n, &len, "\\n");
            else if (ch < 0x20 || ch >= 0x7f) put(buf, n, &len, "\\x%02x", ch);
            else put(buf, n, &len, "%c", ch);
        }
        put(buf, n, &len, "\"");
        break;
    case TSR_GGUF_BOOL: put(buf, n, &len, "%s", kv->v.b ? "true" : "false"); break;
    case TSR_GGUF_FLOAT32:
    case TSR_GGUF_FLOAT64: put(buf, n, &len, "%.9g", kv->v.f); break;
    default:
        if (type_is_signed(kv->type)) put(buf, n, &len, "%" PRId64, kv->v.i);
        else put(buf, n, &len, "%" PRIu64, kv->v.u);
        break;
    }
    return len > INT32_MAX ? INT32_MAX : (int)len;
}

int64_t tsr_gguf_n_tensors(const tsr_gguf *g) { return g->n_tensors; }

const tsr_gguf_tensor *tsr_gguf_tensor_at(const tsr_gguf *g, int64_t i) {
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const tsr_gguf_tensor *tsr_gguf_find_tensor(const tsr_gguf *g, const char *name) {
    size_t len = strlen(name);
    int64_t i = index_find(g, &g->tensor_index, tensor_name_of, name, len, hash_name(name, len));
    return i >= 0 ? &g->tensors[i] : NULL;
}
