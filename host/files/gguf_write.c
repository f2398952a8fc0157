/* GGUF writer. Each key's value is encoded into its own little-endian blob when it is set,
 * so writing is a plain sequence of copies; tensor data is laid out at write time, each
 * tensor starting at a multiple of the alignment from the start of the data section. */
#include "files/gguf_write.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "files/dtype.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "the GGUF writer copies host values as little-endian bytes");

#define GGUF_VERSION 3u

typedef struct byte_buf {
    uint8_t *p;
    size_t len, cap;
    bool failed; /* out of memory at some point */
} byte_buf;

typedef struct writer_kv {
    char *key;
    uint32_t type;
    byte_buf value; /* encoded value, as it follows the type in the file */
} writer_kv;

typedef struct writer_tensor {
    char *name;
    int32_t dtype;
    uint32_t n_dims;
    int64_t ne[4];
    size_t size;
    const void *data;
} writer_tensor;

struct tsr_gguf_writer {
    writer_kv *kv;
    size_t n_kv, cap_kv;
    writer_tensor *tensors;
    size_t n_tensors, cap_tensors;
    uint32_t alignment;
    int status;    /* first error of a set/add call, or TSR_OK */
    tsr_error err; /* its message, without the file name */
};

static void buf_put(byte_buf *b, const void *src, size_t n) {
    if (b->failed) return;
    if (n > b->cap - b->len) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap - b->len < n) {
            if (cap > SIZE_MAX / 2) {
                b->failed = true;
                return;
            }
            cap *= 2;
        }
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void buf_u32(byte_buf *b, uint32_t v) { buf_put(b, &v, 4); }
static void buf_u64(byte_buf *b, uint64_t v) { buf_put(b, &v, 8); }

static void buf_str(byte_buf *b, const char *s, uint64_t len) {
    buf_u64(b, len);
    buf_put(b, s, (size_t)len);
}

/* Records the first error and returns its status. */
static int fail(tsr_gguf_writer *w, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(tsr_gguf_writer *w, int status, const char *fmt, ...) {
    if (w->status == TSR_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->err.msg, sizeof w->err.msg, fmt, ap);
        va_end(ap);
        w->status = status;
    }
    return status;
}

tsr_gguf_writer *tsr_gguf_writer_new(void) {
    tsr_gguf_writer *w = calloc(1, sizeof *w);
    if (w) w->alignment = 32;
    return w;
}

void tsr_gguf_writer_free(tsr_gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].value.p);
    }
    for (size_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
    free(w->kv);
    free(w->tensors);
    free(w);
}

static bool grow(void **arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t n = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, n * elem);
    if (!p) return false;
    *arr = p;
    *cap = n;
    return true;
}

/* Starts a new key of `type`; NULL (error recorded) on a duplicate or out of memory. */
static writer_kv *new_kv(tsr_gguf_writer *w, const char *key, tsr_gguf_type type) {
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key) == 0) {
            fail(w, TSR_E_INVALID, "key '%s' is set twice", key);
            return NULL;
        }
    }
    if (!grow((void **)&w->kv, &w->cap_kv, w->n_kv + 1, sizeof *w->kv)) {
        fail(w, TSR_E_NOMEM, "out of memory for key '%s'", key);
        return NULL;
    }
    writer_kv *kv = &w->kv[w->n_kv];
    *kv = (writer_kv){.key = strdup(key), .type = type};
    if (!kv->key) {
        fail(w, TSR_E_NOMEM, "out of memory for key '%s'", key);
        return NULL;
    }
    w->n_kv++;
    return kv;
}

static int finish_kv(tsr_gguf_writer *w, writer_kv *kv) {
    if (kv->value.failed) return fail(w, TSR_E_NOMEM, "out of memory for key '%s'", kv->key);
    return TSR_OK;
}

int tsr_gguf_writer_set_uint(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                             uint64_t value) {
    uint64_t max = type == TSR_GGUF_UINT8    ? UINT8_MAX
                   : type == TSR_GGUF_UINT16 ? UINT16_MAX
                   : type == TSR_GGUF_UINT32 ? UINT32_MAX
                   : type == TSR_GGUF_UINT64 ? UINT64_MAX
                                             : 0;
    if (max == 0)
        return fail(w, TSR_E_INVALID, "key '%s': %s is not an unsigned integer type", key,
                    tsr_gguf_type_name(type));
    if (value > max)
        return fail(w, TSR_E_RANGE, "key '%s': %" PRIu64 " does not fit %s", key, value,
                    tsr_gguf_type_name(type));
    if (strcmp(key, "general.alignment") == 0) {
        if (type != TSR_GGUF_UINT32 || value == 0 || (value & (value - 1)) != 0)
            return fail(w, TSR_E_INVALID, "key 'general.alignment': expected a u32 power of "
                        "two, got %s %" PRIu64, tsr_gguf_type_name(type), value);
        w->alignment = (uint32_t)value;
    }
    writer_kv *kv = new_kv(w, key, type);
    if (!kv) return w->status;
    buf_put(&kv->value, &value, tsr_gguf_type_size(type));
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_int(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                            int64_t value) {
    int64_t lo = type == TSR_GGUF_INT8    ? INT8_MIN
                 : type == TSR_GGUF_INT16 ? INT16_MIN
                 : type == TSR_GGUF_INT32 ? INT32_MIN
                                          : INT64_MIN;
    int64_t hi = type == TSR_GGUF_INT8    ? INT8_MAX
                 : type == TSR_GGUF_INT16 ? INT16_MAX
                 : type == TSR_GGUF_INT32 ? INT32_MAX
                                          : INT64_MAX;
    if (type != TSR_GGUF_INT8 && type != TSR_GGUF_INT16 && type != TSR_GGUF_INT32 &&
        type != TSR_GGUF_INT64)
        return fail(w, TSR_E_INVALID, "key '%s': %s is not a signed integer type", key,
                    tsr_gguf_type_name(type));
    if (value < lo || value > hi)
        return fail(w, TSR_E_RANGE, "key '%s': %" PRId64 " does not fit %s", key, value,
                    tsr_gguf_type_name(type));
    writer_kv *kv = new_kv(w, key, type);
    if (!kv) return w->status;
    buf_put(&kv->value, &value, tsr_gguf_type_size(type)); /* low bytes: little-endian */
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_float(tsr_gguf_writer *w, const char *key, tsr_gguf_type type,
                              double value) {
    if (type != TSR_GGUF_FLOAT32 && type != TSR_GGUF_FLOAT64)
        return fail(w, TSR_E_INVALID, "key '%s': %s is not a float type", key,
                    tsr_gguf_type_name(type));
    writer_kv *kv = new_kv(w, key, type);
    if (!kv) return w->status;
    if (type == TSR_GGUF_FLOAT32) {
        float f = (float)value;
        buf_put(&kv->value, &f, 4);
    } else {
        buf_put(&kv->value, &value, 8);
    }
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_bool(tsr_gguf_writer *w, const char *key, bool value) {
    writer_kv *kv = new_kv(w, key, TSR_GGUF_BOOL);
    if (!kv) return w->status;
    uint8_t b = value;
    buf_put(&kv->value, &b, 1);
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_str(tsr_gguf_writer *w, const char *key, const char *value) {
    writer_kv *kv = new_kv(w, key, TSR_GGUF_STRING);
    if (!kv) return w->status;
    buf_str(&kv->value, value, strlen(value));
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_arr(tsr_gguf_writer *w, const char *key, tsr_gguf_type elem_type,
                            const void *data, uint64_t n) {
    size_t size = tsr_gguf_type_size(elem_type);
    size_t bytes;
    if (size == 0)
        return fail(w, TSR_E_INVALID, "key '%s': %s arrays are written with set_arr_str or "
                    "not at all", key, tsr_gguf_type_name(elem_type));
    if (__builtin_mul_overflow(n, size, &bytes))
        return fail(w, TSR_E_RANGE, "key '%s': %" PRIu64 " elements overflow", key, n);
    writer_kv *kv = new_kv(w, key, TSR_GGUF_ARRAY);
    if (!kv) return w->status;
    buf_u32(&kv->value, elem_type);
    buf_u64(&kv->value, n);
    buf_put(&kv->value, data, bytes);
    return finish_kv(w, kv);
}

int tsr_gguf_writer_set_arr_str(tsr_gguf_writer *w, const char *key, const tsr_gguf_str *strs,
                                uint64_t n) {
    writer_kv *kv = new_kv(w, key, TSR_GGUF_ARRAY);
    if (!kv) return w->status;
    buf_u32(&kv->value, TSR_GGUF_STRING);
    buf_u64(&kv->value, n);
    for (uint64_t i = 0; i < n; i++) buf_str(&kv->value, strs[i].ptr, strs[i].len);
    return finish_kv(w, kv);
}

int tsr_gguf_writer_copy_key(tsr_gguf_writer *w, const tsr_gguf *g, int64_t k) {
    const char *key = tsr_gguf_key_name(g, k);
    tsr_gguf_type type = tsr_gguf_key_type(g, k);
    switch (type) {
    case TSR_GGUF_UINT8:
    case TSR_GGUF_UINT16:
    case TSR_GGUF_UINT32:
    case TSR_GGUF_UINT64:
        return tsr_gguf_writer_set_uint(w, key, type, tsr_gguf_u64_or(g, key, 0));
    case TSR_GGUF_INT8:
    case TSR_GGUF_INT16:
    case TSR_GGUF_INT32:
    case TSR_GGUF_INT64: {
        int64_t v = 0;
        tsr_gguf_get_i64(g, key, &v, NULL);
        return tsr_gguf_writer_set_int(w, key, type, v);
    }
    case TSR_GGUF_FLOAT32:
    case TSR_GGUF_FLOAT64:
        return tsr_gguf_writer_set_float(w, key, type, tsr_gguf_f64_or(g, key, 0));
    case TSR_GGUF_BOOL: return tsr_gguf_writer_set_bool(w, key, tsr_gguf_bool_or(g, key, false));
    case TSR_GGUF_STRING: {
        tsr_gguf_str s = {"", 0};
        tsr_gguf_get_str(g, key, &s, NULL);
        writer_kv *kv = new_kv(w, key, TSR_GGUF_STRING);
        if (!kv) return w->status;
        buf_str(&kv->value, s.ptr, s.len);
        return finish_kv(w, kv);
    }
    case TSR_GGUF_ARRAY: {
        tsr_gguf_type elem = tsr_gguf_arr_type(g, k);
        uint64_t n = tsr_gguf_arr_len(g, k);
        if (elem != TSR_GGUF_STRING) return tsr_gguf_writer_set_arr(w, key, elem,
                                                                    tsr_gguf_arr_data(g, k), n);
        writer_kv *kv = new_kv(w, key, TSR_GGUF_ARRAY);
        if (!kv) return w->status;
        buf_u32(&kv->value, TSR_GGUF_STRING);
        buf_u64(&kv->value, n);
        for (uint64_t i = 0; i < n; i++) {
            tsr_gguf_str s = tsr_gguf_arr_str(g, k, i);
            buf_str(&kv->value, s.ptr, s.len);
        }
        return finish_kv(w, kv);
    }
    }
    return fail(w, TSR_E_INVALID, "key '%s': unknown type %d", key, (int)type);
}

int tsr_gguf_writer_add_tensor(tsr_gguf_writer *w, const char *name, int32_t dtype,
                               uint32_t n_dims, const int64_t *ne, const void *data) {
    writer_tensor t = {.dtype = dtype, .n_dims = n_dims, .ne = {1, 1, 1, 1}, .data = data};
    if (n_dims < 1 || n_dims > 4)
        return fail(w, TSR_E_INVALID, "tensor '%s': %" PRIu32 " dimensions, expected 1 to 4",
                    name, n_dims);
    memcpy(t.ne, ne, n_dims * sizeof *ne);
    if (!tsr_dtype_known(dtype))
        return fail(w, TSR_E_INVALID, "tensor '%s': unknown type %" PRId32, name, dtype);
    if (!tsr_dtype_tensor_bytes(dtype, t.ne, &t.size))
        return fail(w, TSR_E_INVALID, "tensor '%s': shape %" PRId64 " x %" PRId64 " x %" PRId64
                    " x %" PRId64 " is not valid for %s (negative, not whole blocks of %" PRIu32
                    ", or too large)", name, t.ne[0], t.ne[1], t.ne[2], t.ne[3],
                    tsr_dtype_name(dtype), tsr_dtype_block(dtype));
    for (size_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return fail(w, TSR_E_INVALID, "tensor '%s' is added twice", name);
    if (!grow((void **)&w->tensors, &w->cap_tensors, w->n_tensors + 1, sizeof *w->tensors) ||
        !(t.name = strdup(name)))
        return fail(w, TSR_E_NOMEM, "out of memory for tensor '%s'", name);
    w->tensors[w->n_tensors++] = t;
    return TSR_OK;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Writes the header, key table and tensor table. */
static bool encode_header(const tsr_gguf_writer *w, byte_buf *b) {
    buf_u32(b, 0x46554747u); /* "GGUF" */
    buf_u32(b, GGUF_VERSION);
    buf_u64(b, w->n_tensors);
    buf_u64(b, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        buf_str(b, w->kv[i].key, strlen(w->kv[i].key));
        buf_u32(b, w->kv[i].type);
        buf_put(b, w->kv[i].value.p, w->kv[i].value.len);
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const writer_tensor *t = &w->tensors[i];
        buf_str(b, t->name, strlen(t->name));
        buf_u32(b, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) buf_u64(b, (uint64_t)t->ne[d]);
        buf_u32(b, (uint32_t)t->dtype);
        buf_u64(b, offset);
        offset = align_up(offset + t->size, w->alignment);
    }
    static const uint8_t zeros[64];
    size_t pad = (size_t)(align_up(b->len, w->alignment) - b->len);
    while (pad > 0) {
        size_t n = pad < sizeof zeros ? pad : sizeof zeros;
        buf_put(b, zeros, n);
        pad -= n;
    }
    return !b->failed;
}

/* Zero bytes up to the next multiple of the alignment. */
static bool write_pad(tsr_outfile *out, size_t written, uint32_t alignment) {
    static const uint8_t zeros[64];
    size_t pad = (size_t)(align_up(written, alignment) - written);
    while (pad > 0) {
        size_t n = pad < sizeof zeros ? pad : sizeof zeros;
        if (!tsr_outfile_write(out, zeros, n)) return false;
        pad -= n;
    }
    return true;
}

int tsr_gguf_writer_write_to(const tsr_gguf_writer *w, tsr_outfile *out, tsr_error *err) {
    if (w->status != TSR_OK) return tsr_error_set(err, w->status, "%s: %s", out->path, w->err.msg);
    byte_buf header = {0};
    if (!encode_header(w, &header)) {
        free(header.p);
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for the header", out->path);
    }
    bool ok = tsr_outfile_write(out, header.p, header.len);
    free(header.p);
    for (size_t i = 0; ok && i < w->n_tensors; i++) {
        const writer_tensor *t = &w->tensors[i];
        ok = tsr_outfile_write(out, t->data, t->size) &&
             (i + 1 == w->n_tensors || write_pad(out, t->size, w->alignment));
    }
    if (!ok)
        return tsr_error_set(err, TSR_E_IO, "%s: cannot write: %s", out->path,
                             strerror(out->write_errno));
    return TSR_OK;
}

int tsr_gguf_writer_write(const tsr_gguf_writer *w, const char *path, tsr_error *err) {
    /* An earlier set/add error is reported before any file is made. */
    if (w->status != TSR_OK) return tsr_error_set(err, w->status, "%s: %s", path, w->err.msg);
    tsr_outfile out;
    int st = tsr_outfile_open(&out, path, NULL, err);
    if (st < 0) return st;
    if ((st = tsr_gguf_writer_write_to(w, &out, err)) < 0) {
        tsr_outfile_discard(&out);
        return st;
    }
    return tsr_outfile_commit(&out, err);
}
