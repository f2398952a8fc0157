#include "plugin/loader.h"

#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>

#include "plugin/commands.h"
#include "config/config.h"
#include "config/params.h"
#include "plugin/trust.h"
#include "plugin/vtable.h"

/* ---- the host's stage interfaces ------------------------------------------------------ */

typedef struct slot {
    size_t offset;
    const char *name;
} slot;

#define SLOT(type, field) {offsetof(type, field), #field}

static const slot backend_slots[] = {
    SLOT(tsr_backend_vtable, create), SLOT(tsr_backend_vtable, destroy),
    SLOT(tsr_backend_vtable, supports), SLOT(tsr_backend_vtable, matmul),
    SLOT(tsr_backend_vtable, get_rows), SLOT(tsr_backend_vtable, rms_norm),
    SLOT(tsr_backend_vtable, rope), SLOT(tsr_backend_vtable, swiglu),
    SLOT(tsr_backend_vtable, add),
};
static const slot quantizer_slots[] = {
    SLOT(tsr_quantizer_vtable, create), SLOT(tsr_quantizer_vtable, destroy),
    SLOT(tsr_quantizer_vtable, prepare), SLOT(tsr_quantizer_vtable, release),
};
static const slot attention_slots[] = {
    SLOT(tsr_attention_vtable, create), SLOT(tsr_attention_vtable, destroy),
    SLOT(tsr_attention_vtable, forward),
};
static const slot cache_slots[] = {
    SLOT(tsr_cache_vtable, create), SLOT(tsr_cache_vtable, destroy),
    SLOT(tsr_cache_vtable, seq_begin), SLOT(tsr_cache_vtable, seq_end),
    SLOT(tsr_cache_vtable, store), SLOT(tsr_cache_vtable, view),
};
static const slot decoder_slots[] = {
    SLOT(tsr_decoder_vtable, create), SLOT(tsr_decoder_vtable, destroy),
    SLOT(tsr_decoder_vtable, generate),
};
static const slot router_slots[] = {
    SLOT(tsr_router_vtable, create), SLOT(tsr_router_vtable, destroy),
    SLOT(tsr_router_vtable, route),
};

typedef struct stage_info {
    uint16_t major, minor;
    size_t min_vtable_size; /* the table at MINOR 0: the end of its last 1.0 slot */
    const slot *mandatory;
    size_t n_mandatory;
} stage_info;

#define STAGE(MAJOR, MINOR, type, last_1_0_slot, slots) \
    {MAJOR, MINOR, TSR_END_OF(type, last_1_0_slot), slots, sizeof(slots) / sizeof(slots[0])}

/* Later MINORs append slots to these tables; the 1.0 end stays what a 1.0 plugin has. */
static const stage_info stages[TSR_STAGE_COUNT + 1] = {
    [TSR_STAGE_BACKEND] = STAGE(TSR_BACKEND_ABI_MAJOR, TSR_BACKEND_ABI_MINOR, tsr_backend_vtable,
                                memory_space, backend_slots),
    [TSR_STAGE_QUANTIZER] = STAGE(TSR_QUANTIZER_ABI_MAJOR, TSR_QUANTIZER_ABI_MINOR,
                                  tsr_quantizer_vtable, dequantize_rows, quantizer_slots),
    [TSR_STAGE_ATTENTION] = STAGE(TSR_ATTENTION_ABI_MAJOR, TSR_ATTENTION_ABI_MINOR,
                                  tsr_attention_vtable, seq_end, attention_slots),
    [TSR_STAGE_CACHE] = STAGE(TSR_CACHE_ABI_MAJOR, TSR_CACHE_ABI_MINOR, tsr_cache_vtable, stats,
                              cache_slots),
    [TSR_STAGE_DECODER] = STAGE(TSR_DECODER_ABI_MAJOR, TSR_DECODER_ABI_MINOR, tsr_decoder_vtable,
                                pick, decoder_slots),
    [TSR_STAGE_ROUTER] = STAGE(TSR_ROUTER_ABI_MAJOR, TSR_ROUTER_ABI_MINOR, tsr_router_vtable,
                               route, router_slots),
};

static bool stage_valid(int32_t stage) { return stage >= 1 && stage <= TSR_STAGE_COUNT; }

uint16_t tsr_stage_abi_major(int32_t stage) { return stage_valid(stage) ? stages[stage].major : 0; }
uint16_t tsr_stage_abi_minor(int32_t stage) { return stage_valid(stage) ? stages[stage].minor : 0; }

/* ---- registry ---------------------------------------------------------------------------- */

struct tsr_plugin_object {
    char *path;            /* as the search or the caller named it: shown in messages */
    char *real;            /* the resolved file that was opened */
    void *handle;
    tsr_services services; /* the table handed to the entry point; lives as long as the object */
};

typedef struct ref_entry {
    tsr_plugin_ref ref;
    char *unusable_text;
} ref_entry;

/* A growing array of owned strings. */
typedef struct lines {
    char **at;
    size_t n;
} lines;

struct tsr_registry {
    tsr_pool *pool;
    tsr_plugin_object **objects;
    size_t n_objects;
    ref_entry **refs; /* one allocation each: a tsr_plugin_ref stays put while more load */
    size_t n_refs;
    lines diags;
    lines warnings;
    lines refused_names, refused_why; /* plugins refused at load, with their reason */
    lines folders; /* the search path: resolved folders that passed their checks, in order */
};

static void *grow(void *array, size_t n, size_t elem) {
    /* Grows by doubling at powers of two so appends stay amortised O(1). */
    if (n && (n & (n - 1))) return array;
    size_t cap = n ? n * 2 : 4;
    return realloc(array, cap * elem);
}

static void lines_add(lines *l, char *owned) {
    l->at = grow(l->at, l->n, sizeof *l->at);
    l->at[l->n++] = owned;
}

static void lines_free(lines *l) {
    for (size_t i = 0; i < l->n; i++) free(l->at[i]);
    free(l->at);
}

static const char *lines_at(const lines *l, size_t i) { return i < l->n ? l->at[i] : NULL; }

static void lines_vadd(lines *l, const char *fmt, va_list ap) {
    char line[1536];
    vsnprintf(line, sizeof line, fmt, ap);
    lines_add(l, strdup(line));
}

static void add_diag(tsr_registry *reg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_diag(tsr_registry *reg, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lines_vadd(&reg->diags, fmt, ap);
    va_end(ap);
    tsr_log(TSR_LOG_INFO, "loader", "%s", reg->diags.at[reg->diags.n - 1]);
}

static void add_warning(tsr_registry *reg, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void add_warning(tsr_registry *reg, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lines_vadd(&reg->warnings, fmt, ap);
    va_end(ap);
}

tsr_registry *tsr_registry_create(tsr_pool *pool) {
    tsr_registry *reg = calloc(1, sizeof *reg);
    if (reg) reg->pool = pool;
    return reg;
}

static void object_free(tsr_plugin_object *obj) {
    if (!obj) return;
    /* Keep objects mapped under LeakSanitizer so its reports can still symbolise plugin
     * frames; the process is ending anyway when a registry is freed in that case. */
    if (obj->handle && !getenv("TESSERA_NO_DLCLOSE")) dlclose(obj->handle);
    free(obj->path);
    free(obj->real);
    free(obj);
}

void tsr_registry_free(tsr_registry *reg) {
    if (!reg) return;
    for (size_t i = 0; i < reg->n_refs; i++) {
        free(reg->refs[i]->unusable_text);
        free(reg->refs[i]);
    }
    for (size_t i = 0; i < reg->n_objects; i++) object_free(reg->objects[i]);
    lines_free(&reg->diags);
    lines_free(&reg->warnings);
    lines_free(&reg->refused_names);
    lines_free(&reg->refused_why);
    lines_free(&reg->folders);
    free(reg->refs);
    free(reg->objects);
    free(reg);
}

size_t tsr_registry_count(const tsr_registry *reg) { return reg->n_refs; }
const tsr_plugin_ref *tsr_registry_at(const tsr_registry *reg, size_t i) {
    return i < reg->n_refs ? &reg->refs[i]->ref : NULL;
}
size_t tsr_registry_n_diagnostics(const tsr_registry *reg) { return reg->diags.n; }
const char *tsr_registry_diagnostic(const tsr_registry *reg, size_t i) {
    return lines_at(&reg->diags, i);
}
size_t tsr_registry_n_warnings(const tsr_registry *reg) { return reg->warnings.n; }
const char *tsr_registry_warning(const tsr_registry *reg, size_t i) {
    return lines_at(&reg->warnings, i);
}

/* Why the plugin `name` was refused at load (version, callbacks, duplicate...), or NULL. */
static const char *refusal_of(const tsr_registry *reg, const char *name) {
    for (size_t i = 0; i < reg->refused_names.n; i++)
        if (strcmp(reg->refused_names.at[i], name) == 0) return reg->refused_why.at[i];
    return NULL;
}

const tsr_plugin_ref *tsr_registry_find(const tsr_registry *reg, int32_t stage, const char *name) {
    for (size_t i = 0; i < reg->n_refs; i++) {
        const tsr_plugin_desc *d = reg->refs[i]->ref.desc;
        if ((stage == 0 || d->stage == stage) && strcmp(d->name, name) == 0)
            return &reg->refs[i]->ref;
    }
    return NULL;
}

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* ---- files that dlopen refuses ------------------------------------------------------- */

/* The ELF machine this host runs, to name an object built for another one (0 = unknown:
 * then dlopen's own message is shown). */
#if defined(__x86_64__)
#define HOST_ELF_MACHINE EM_X86_64
#elif defined(__aarch64__)
#define HOST_ELF_MACHINE EM_AARCH64
#elif defined(__i386__)
#define HOST_ELF_MACHINE EM_386
#elif defined(__arm__)
#define HOST_ELF_MACHINE EM_ARM
#elif defined(__riscv)
#define HOST_ELF_MACHINE EM_RISCV
#elif defined(__powerpc64__)
#define HOST_ELF_MACHINE EM_PPC64
#elif defined(__s390x__)
#define HOST_ELF_MACHINE EM_S390
#else
#define HOST_ELF_MACHINE 0
#endif

static const char *machine_name(unsigned machine) {
    switch (machine) {
    case EM_386: return "x86";
    case EM_X86_64: return "x86-64";
    case EM_ARM: return "ARM";
    case EM_AARCH64: return "AArch64";
    case EM_RISCV: return "RISC-V";
    case EM_PPC64: return "PowerPC64";
    case EM_S390: return "s390";
    case EM_MIPS: return "MIPS";
    default: return "unknown";
    }
}

/* Reads an unsigned field of `n` bytes at `off` of an ELF header in the file's byte order. */
static uint64_t elf_field(const unsigned char *h, size_t off, size_t n) {
    uint64_t v = 0;
    bool big = h[EI_DATA] == ELFDATA2MSB;
    for (size_t i = 0; i < n; i++) v |= (uint64_t)h[off + i] << (8 * (big ? n - 1 - i : i));
    return v;
}

/* End of a table of `count` entries of `size` bytes at `off`, saturating. */
static uint64_t table_end(uint64_t off, uint64_t count, uint64_t size) {
    uint64_t bytes = count * size; /* both are 16-bit fields: no overflow */
    return off > UINT64_MAX - bytes ? UINT64_MAX : off + bytes;
}

/* dlopen's messages for bad files are cryptic ("invalid ELF header", "cannot read file data")
 * or wrong (an object for another architecture gives "No such file or directory"): look at
 * the ELF header and name the usual causes plainly. */
static tsr_status describe_dlopen_failure(const char *path, const char *dl_error, tsr_error *err) {
    unsigned char h[sizeof(Elf64_Ehdr)] = {0};
    struct stat st;
    FILE *f = fopen(path, "rb");
    size_t got = f ? fread(h, 1, sizeof h, f) : 0;
    uint64_t size = f && fstat(fileno(f), &st) == 0 ? (uint64_t)st.st_size : got;
    if (f) fclose(f);
    if (got < SELFMAG || memcmp(h, ELFMAG, SELFMAG) != 0)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: not a shared object (no ELF header); plugin files are built "
                             "with tessera_add_plugin()", path);
    bool is64 = h[EI_CLASS] == ELFCLASS64;
    uint64_t need = is64 ? sizeof(Elf64_Ehdr) : sizeof(Elf32_Ehdr);
    if (got >= need) {
        /* program and section header tables: the usual end of a file cut short */
        uint64_t ph = is64 ? table_end(elf_field(h, 32, 8), elf_field(h, 56, 2),
                                       elf_field(h, 54, 2))
                           : table_end(elf_field(h, 28, 4), elf_field(h, 44, 2),
                                       elf_field(h, 42, 2));
        uint64_t sh = is64 ? table_end(elf_field(h, 40, 8), elf_field(h, 60, 2),
                                       elf_field(h, 58, 2))
                           : table_end(elf_field(h, 32, 4), elf_field(h, 48, 2),
                                       elf_field(h, 46, 2));
        need = ph > need ? ph : need;
        need = sh > need ? sh : need;
    }
    if (size < need)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: truncated ELF file: %llu bytes, its headers need %llu bytes; "
                             "copy or build it again",
                             path, (unsigned long long)size, (unsigned long long)need);
    unsigned machine = (unsigned)elf_field(h, 18, 2);
    if (HOST_ELF_MACHINE && machine != HOST_ELF_MACHINE)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: built for another architecture (ELF machine %u, %s), this host "
                             "runs %s; rebuild the plugin on this machine",
                             path, machine, machine_name(machine), machine_name(HOST_ELF_MACHINE));
    /* dlerror() usually starts with the path itself: do not print it twice */
    size_t len = strlen(path);
    if (dl_error && strncmp(dl_error, path, len) == 0 && strncmp(dl_error + len, ": ", 2) == 0)
        dl_error += len + 2;
    return tsr_error_set(err, TSR_E_INVALID, "%s: cannot be loaded: %s", path,
                         dl_error ? dl_error : "unknown dlopen error");
}

/* A plugin name: the first `len` bytes of `name`, 1 to 64 of [a-z0-9_-]. */
static bool name_ok_n(const char *name, size_t len) {
    if (len == 0 || len > 64) return false;
    for (const char *p = name; p < name + len; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
            return false;
    return true;
}

static bool name_ok(const char *name) { return name && name_ok_n(name, strlen(name)); }

/* Checks one descriptor against this host. Returns a negative status with the reason in
 * `err` when the plugin must be refused. */
static tsr_status check_desc(const char *path, const tsr_plugin_desc *d, size_t index,
                             tsr_error *err) {
    if (!d)
        return tsr_error_set(err, TSR_E_INVALID, "%s: plugin #%zu: descriptor is NULL", path,
                             index);
    if (d->struct_size < offsetof(tsr_plugin_desc, vtable) + sizeof(d->vtable))
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: plugin #%zu: descriptor struct_size %u is smaller than the "
                             "1.0 descriptor (%zu bytes); was it built with TSR_PLUGIN_HEADER?",
                             path, index, d->struct_size,
                             offsetof(tsr_plugin_desc, vtable) + sizeof(d->vtable));
    if (!name_ok(d->name))
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: plugin #%zu: name '%s' is not valid (1-64 of [a-z0-9_-])",
                             path, index, d->name ? d->name : "(null)");
    if (!stage_valid(d->stage))
        return tsr_error_set(err, TSR_E_INVALID, "%s: plugin '%s': unknown stage %d", path,
                             d->name, d->stage);
    const stage_info *si = &stages[d->stage];
    const char *stage = tsr_stage_name(d->stage);
    if (d->stage_major != si->major)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: plugin '%s': built for %s ABI %u.x, this host speaks %u.%u; "
                             "rebuild it against the %u.x SDK",
                             path, d->name, stage, d->stage_major, si->major, si->minor,
                             si->major);
    if (d->stage_minor_needed > si->minor)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: plugin '%s': needs %s ABI %u.%u, this host speaks %u.%u; "
                             "update Tessera",
                             path, d->name, stage, d->stage_major, d->stage_minor_needed,
                             si->major, si->minor);
    if (!d->vtable)
        return tsr_error_set(err, TSR_E_INVALID, "%s: plugin '%s': %s vtable is NULL", path,
                             d->name, stage);
    uint32_t vt_size = *(const uint32_t *)d->vtable;
    if (vt_size < si->min_vtable_size)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: plugin '%s': %s vtable struct_size %u is smaller than the "
                             "%u.0 table (%zu bytes)",
                             path, d->name, stage, vt_size, si->major, si->min_vtable_size);
    for (size_t i = 0; i < si->n_mandatory; i++) {
        const void *fn;
        memcpy(&fn, (const char *)d->vtable + si->mandatory[i].offset, sizeof fn);
        if (!fn)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s: plugin '%s': mandatory %s callback '%s' is NULL", path,
                                 d->name, stage, si->mandatory[i].name);
    }
    char who[512];
    snprintf(who, sizeof who, "%s: plugin '%s'", path, d->name);
    tsr_status st = tsr_param_table_check(d->n_params ? d->params : NULL, d->n_params, who, err);
    if (st < 0) return st;
    if (d->n_params && !d->params)
        return tsr_error_set(err, TSR_E_INVALID, "%s: n_params is %u but params is NULL", who,
                             d->n_params);
    if (d->n_commands && !d->commands)
        return tsr_error_set(err, TSR_E_INVALID, "%s: n_commands is %u but commands is NULL",
                             who, d->n_commands);
    for (uint32_t i = 0; i < d->n_commands; i++) {
        st = tsr_command_check(&d->commands[i], who, err);
        if (st < 0) return st;
    }
    return TSR_OK;
}

static tsr_status check_set(const char *path, const tsr_plugin_set *set, tsr_error *err) {
    if (set->struct_size < offsetof(tsr_plugin_set, plugins) + sizeof(set->plugins))
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: plugin set struct_size %u is too small", path, set->struct_size);
    if (set->common_major != TSR_COMMON_ABI_MAJOR)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: built for common ABI %u.x, this host speaks %u.%u; rebuild "
                             "it against the %u.x SDK",
                             path, set->common_major, TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR,
                             TSR_COMMON_ABI_MAJOR);
    if (set->common_minor_needed > TSR_COMMON_ABI_MINOR)
        return tsr_error_set(err, TSR_E_UNSUPPORTED,
                             "%s: needs common ABI %u.%u, this host speaks %u.%u; update "
                             "Tessera",
                             path, set->common_major, set->common_minor_needed,
                             TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR);
    if (set->n_plugins == 0 || !set->plugins)
        return tsr_error_set(err, TSR_E_INVALID, "%s: the object provides no plugins", path);
    return TSR_OK;
}

/* ---- loading --------------------------------------------------------------------------- */

static tsr_plugin_object *object_at_real_path(const tsr_registry *reg, const char *real) {
    for (size_t i = 0; i < reg->n_objects; i++)
        if (strcmp(reg->objects[i]->real, real) == 0) return reg->objects[i];
    return NULL;
}

static void note_refusal(tsr_registry *reg, const tsr_plugin_desc *d, const char *why) {
    if (d && d->struct_size >= offsetof(tsr_plugin_desc, name) + sizeof(d->name) && d->name) {
        lines_add(&reg->refused_names, strdup(d->name));
        lines_add(&reg->refused_why, strdup(why));
    }
}

/* Registers the plugins of `set`, which `obj` (loaded from `path`) provides. Returns how many
 * registered; the reason of the last refusal goes to *refusal. */
static size_t register_plugins(tsr_registry *reg, tsr_plugin_object *obj, const char *path,
                               const tsr_plugin_set *set, tsr_status *refusal) {
    size_t registered = 0;
    for (uint32_t i = 0; i < set->n_plugins; i++) {
        const tsr_plugin_desc *d = set->plugins[i];
        tsr_error why;
        tsr_status checked = check_desc(path, d, i, &why);
        if (checked < 0) {
            *refusal = checked;
            add_diag(reg, "%s", why.msg);
            note_refusal(reg, d, why.msg);
            continue;
        }
        const tsr_plugin_ref *prev = tsr_registry_find(reg, 0, d->name);
        if (prev) {
            *refusal = TSR_E_INVALID;
            /* Within one folder (or one object) two plugins of one name are a packaging
             * error; across folders the earlier folder in the search order wins. */
            char *a = strdup(prev->path), *b = strdup(path);
            bool same_dir = strcmp(dirname(a), dirname(b)) == 0;
            free(a);
            free(b);
            if (prev->object == obj)
                add_diag(reg, "%s: plugin '%s': duplicate plugin name, provided twice by this "
                         "object; refused", path, d->name);
            else if (same_dir)
                add_diag(reg, "%s: plugin '%s': duplicate plugin name, already provided by %s; "
                         "refused", path, d->name, prev->path);
            else
                add_diag(reg, "%s: plugin '%s' is shadowed by %s, which comes first in the "
                         "search path", path, d->name, prev->path);
            continue;
        }
        int32_t score = 1;
        const char *unusable = NULL;
        if (d->probe) {
            score = d->probe(&obj->services.table);
            if (score <= 0) {
                score = 0;
                unusable = tsr_services_take_error(&obj->services, "its probe gave no reason");
            }
        }
        ref_entry *e = malloc(sizeof *e);
        reg->refs = grow(reg->refs, reg->n_refs, sizeof *reg->refs);
        reg->refs[reg->n_refs++] = e;
        *e = (ref_entry){.unusable_text = unusable ? strdup(unusable) : NULL};
        e->ref = (tsr_plugin_ref){.desc = d, .path = obj->path, .score = score,
                                  .unusable = e->unusable_text, .object = obj};
        registered++;
    }
    return registered;
}

/* Loads the object at `path` into *out, or finds it already loaded. */
static tsr_status load_object(tsr_registry *reg, const char *path, tsr_plugin_object **out,
                              tsr_error *err) {
    *out = NULL;
    char *real = realpath(path, NULL);
    if (!real) return tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
    *out = object_at_real_path(reg, real);
    if (*out) {
        free(real);
        return TSR_OK;
    }
    tsr_status st = tsr_trust_file(path, real, err);
    /* The resolved file is what was checked: open that, not a link that may since point
     * elsewhere. */
    void *handle = st < 0 ? NULL : dlopen(real, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        if (st >= 0) st = describe_dlopen_failure(path, dlerror(), err);
        free(real);
        return st;
    }
    tsr_plugin_object *obj = calloc(1, sizeof *obj);
    obj->path = strdup(path);
    obj->real = real;
    obj->handle = handle;
    tsr_services_init(&obj->services, base_name(path), reg->pool);

    tsr_plugin_entry_fn entry;
    void *sym = dlsym(handle, TSR_PLUGIN_ENTRY_SYMBOL);
    memcpy(&entry, &sym, sizeof entry);
    if (!entry) {
        st = tsr_error_set(err, TSR_E_INVALID,
                           "%s: no entry symbol '%s': not a Tessera plugin, or built without "
                           "TSR_PLUGIN_EXPORT()", path, TSR_PLUGIN_ENTRY_SYMBOL);
        goto fail;
    }
    const tsr_plugin_set *set = entry(TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR,
                                      &obj->services.table);
    if (!set) {
        st = tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: the plugin refused to load: %s", path,
                           tsr_services_take_error(&obj->services, "no reason given"));
        goto fail;
    }
    st = check_set(path, set, err);
    if (st < 0) goto fail;

    tsr_status refusal = TSR_E_INVALID;
    if (register_plugins(reg, obj, path, set, &refusal) == 0) {
        /* An object of one refused plugin fails the way that plugin did (an ABI version
         * mismatch stays TSR_E_UNSUPPORTED). */
        st = tsr_error_set(err, refusal, "%s", reg->diags.n ? reg->diags.at[reg->diags.n - 1]
                                                            : "no usable plugin");
        /* The last diagnostic is now the error itself: do not report it twice. */
        if (reg->diags.n) free(reg->diags.at[--reg->diags.n]);
        goto fail;
    }
    reg->objects = grow(reg->objects, reg->n_objects, sizeof *reg->objects);
    reg->objects[reg->n_objects++] = obj;
    *out = obj;
    return TSR_OK;

fail:
    object_free(obj);
    return st;
}

tsr_status tsr_registry_load_file(tsr_registry *reg, const char *path, tsr_error *err) {
    tsr_plugin_object *obj;
    return load_object(reg, path, &obj, err);
}

/* ---- plugin files and folders ---------------------------------------------------------- */

/* The stage a plugin file name starts with ("cache-" ...), or 0. */
static int32_t file_name_stage(const char *file_name) {
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
        size_t n = strlen(tsr_stage_name(s));
        if (strncmp(file_name, tsr_stage_name(s), n) == 0 && file_name[n] == '-') return s;
    }
    return 0;
}

bool tsr_plugin_file_name_ok(const char *file_name) {
    int32_t stage = file_name_stage(file_name);
    if (!stage) return false;
    const char *name = file_name + strlen(tsr_stage_name(stage)) + 1;
    size_t len = strlen(name);
    return len > 3 && strcmp(name + len - 3, ".so") == 0 && name_ok_n(name, len - 3);
}

/* "<dir>/<stage>-<name>.so" (malloc'd). */
static char *plugin_file_path(const char *dir, int32_t stage, const char *name) {
    size_t cap = strlen(dir) + strlen(tsr_stage_name(stage)) + strlen(name) + 6;
    char *path = malloc(cap);
    if (path) snprintf(path, cap, "%s/%s-%s.so", dir, tsr_stage_name(stage), name);
    return path;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The plugin file names of the resolved folder `dir`, sorted (malloc'd, each and the array);
 * a negative status when it cannot be read. */
static tsr_status plugin_files(const char *dir, char ***names, size_t *n, tsr_error *err) {
    *names = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d)))
        if (tsr_plugin_file_name_ok(e->d_name)) {
            *names = grow(*names, *n, sizeof **names);
            (*names)[(*n)++] = strdup(e->d_name);
        }
    closedir(d);
    if (*n) qsort(*names, *n, sizeof **names, cmp_str);
    return TSR_OK;
}

static void names_free(char **names, size_t n) {
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
}

/* Resolves a folder to search and checks it: *real is malloc'd on success. TSR_E_IO when it
 * is missing or not a folder, TSR_E_INVALID when it is not safe (tsr_trust_folder). */
static tsr_status open_folder(const char *dir, char **real, tsr_error *err) {
    *real = realpath(dir, NULL);
    struct stat st;
    tsr_status status = TSR_OK;
    if (!*real)
        status = tsr_error_set(err, TSR_E_IO, "%s: %s", dir,
                               errno == ENOENT ? "no such folder" : strerror(errno));
    else if (stat(*real, &st) != 0 || !S_ISDIR(st.st_mode))
        status = tsr_error_set(err, TSR_E_IO, "%s: not a folder", dir);
    else
        status = tsr_trust_folder(dir, *real, err);
    if (status < 0) {
        free(*real);
        *real = NULL;
    }
    return status;
}

/* A scan may load a plugin that its file name would not find (a lookup of NAME opens
 * STAGE-NAME.so only): say so, since a pipeline naming it would fail. */
static void check_found_by_name(tsr_registry *reg, const char *dir, const tsr_plugin_object *obj) {
    for (size_t i = 0; i < reg->n_refs; i++) {
        const tsr_plugin_ref *r = &reg->refs[i]->ref;
        if (r->object != obj) continue;
        char *path = plugin_file_path(dir, r->desc->stage, r->desc->name);
        char *real = path ? realpath(path, NULL) : NULL;
        if (!real || strcmp(real, obj->real) != 0)
            add_diag(reg, "%s: plugin '%s' cannot be found by name, which looks for %s only; "
                     "rename the file, or add a link: ln -s %s %s", obj->path, r->desc->name,
                     path, obj->real, path);
        free(real);
        free(path);
    }
}

/* Loads the plugin files of the resolved, checked folder `dir`. */
static int scan_files(tsr_registry *reg, const char *dir, tsr_error *err) {
    char **names;
    size_t n;
    tsr_status st = plugin_files(dir, &names, &n, err);
    if (st < 0) return st;
    int loaded = 0;
    for (size_t i = 0; i < n; i++) {
        char *path = malloc(strlen(dir) + strlen(names[i]) + 2);
        if (!path) break;
        sprintf(path, "%s/%s", dir, names[i]);
        size_t n_before = reg->n_objects;
        tsr_plugin_object *obj;
        tsr_error why;
        if (load_object(reg, path, &obj, &why) < 0) {
            add_diag(reg, "%s (skipped)", why.msg);
        } else if (reg->n_objects > n_before) {
            loaded++;
            check_found_by_name(reg, dir, obj);
        }
        free(path);
    }
    names_free(names, n);
    return loaded;
}

int tsr_registry_scan_dir(tsr_registry *reg, const char *dir, tsr_error *err) {
    char *real;
    tsr_status st = open_folder(dir, &real, err);
    if (st < 0) return st;
    int loaded = scan_files(reg, real, err);
    free(real);
    return loaded;
}

void tsr_registry_load_all(tsr_registry *reg) {
    for (size_t i = 0; i < reg->folders.n; i++) {
        tsr_error err;
        if (scan_files(reg, reg->folders.at[i], &err) < 0) add_diag(reg, "%s", err.msg);
    }
}

/* ---- the search path ----------------------------------------------------------------- */

void tsr_registry_add_dir(tsr_registry *reg, const char *dir, const char *origin, bool named) {
    char *real;
    tsr_error why;
    tsr_status st = open_folder(dir, &real, &why);
    char **names = NULL;
    size_t n = 0;
    if (st >= 0) st = plugin_files(real, &names, &n, &why);
    if (st < 0) {
        tsr_log(TSR_LOG_DEBUG, "loader", "plugin folder %s (from %s): skipped: %s", dir, origin,
                why.msg);
        /* An unsafe folder is worth a warning wherever it came from: someone should fix it. */
        if (st == TSR_E_INVALID) add_warning(reg, "%s", why.msg);
        else if (named) add_warning(reg, "%s (a plugin folder from %s)", why.msg, origin);
        free(real);
        return;
    }
    names_free(names, n);
    for (size_t i = 0; i < reg->folders.n; i++)
        if (strcmp(reg->folders.at[i], real) == 0) {
            tsr_log(TSR_LOG_DEBUG, "loader", "plugin folder %s (from %s): skipped: already "
                    "searched", real, origin);
            free(real);
            return;
        }
    tsr_log(TSR_LOG_DEBUG, "loader", "plugin folder %s (from %s): searched, %zu plugin file%s",
            real, origin, n, n == 1 ? "" : "s");
    if (n == 0 && named)
        add_warning(reg, "%s: holds no plugin file named STAGE-NAME.so (a plugin folder from %s)",
                    dir, origin);
    lines_add(&reg->folders, real);
}

/* The build tree's plugins are found when the program itself runs from the build tree, so a
 * developer needs no install and no environment variable. */
static bool inside_build_tree(const char *exe) {
    char *build = realpath(TESSERA_PLUGIN_BUILD_DIR "/..", NULL);
    bool inside = build && strncmp(exe, build, strlen(build)) == 0 && exe[strlen(build)] == '/';
    free(build);
    return inside;
}

/* The install folder: TESSERA_PLUGIN_DIR_FROM_BIN is relative to the program's folder (or
 * absolute, when the install folders were configured absolute). */
static char *install_dir(const char *exe) {
    if (TESSERA_PLUGIN_DIR_FROM_BIN[0] == '/') return strdup(TESSERA_PLUGIN_DIR_FROM_BIN);
    const char *slash = strrchr(exe, '/');
    size_t n = (size_t)(slash - exe);
    char *dir = malloc(n + sizeof TESSERA_PLUGIN_DIR_FROM_BIN + 1);
    if (dir) sprintf(dir, "%.*s/%s", (int)n, exe, TESSERA_PLUGIN_DIR_FROM_BIN);
    return dir;
}

void tsr_registry_add_default_dirs(tsr_registry *reg) {
    const char *env = getenv("TESSERA_PLUGIN_PATH");
    if (env && *env) {
        char *copy = strdup(env), *save = NULL;
        for (char *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save))
            tsr_registry_add_dir(reg, dir, "TESSERA_PLUGIN_PATH", false);
        free(copy);
    }
    char *exe = realpath("/proc/self/exe", NULL);
    if (!exe) {
        tsr_log(TSR_LOG_DEBUG, "loader", "install folder: skipped: the program's own path is "
                "unknown (/proc/self/exe: %s)", strerror(errno));
        return;
    }
    char *dir = install_dir(exe);
    if (inside_build_tree(exe)) {
        tsr_log(TSR_LOG_DEBUG, "loader", "plugin folder %s (the install folder): skipped: %s "
                "runs from its build tree, whose plugin folder comes instead", dir, exe);
        tsr_registry_add_dir(reg, TESSERA_PLUGIN_BUILD_DIR, "the build tree", false);
    } else if (dir) {
        tsr_registry_add_dir(reg, dir, "the install folder", false);
    }
    free(dir);
    free(exe);
}

/* ---- lookup by name -------------------------------------------------------------------- */

static bool entry_exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

static const char *article(const char *word) { return strchr("aeiou", word[0]) ? "an" : "a"; }

/* The stage other than `stage` that has a plugin `name`, registered or as a file in a search
 * folder; 0 when none. Opens nothing. */
static int32_t other_stage_with(const tsr_registry *reg, int32_t stage, const char *name) {
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++)
        if (s != stage && tsr_registry_find(reg, s, name)) return s;
    for (size_t f = 0; f < reg->folders.n; f++)
        for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
            if (s == stage) continue;
            char *path = plugin_file_path(reg->folders.at[f], s, name);
            bool found = path && entry_exists(path);
            free(path);
            if (found) return s;
        }
    return 0;
}

/* Loads the file `path` found for plugin `name` of `stage`, and finds the plugin in it. */
static const tsr_plugin_ref *load_named(tsr_registry *reg, const char *path, int32_t stage,
                                        const char *name, tsr_error *err) {
    tsr_plugin_object *obj;
    if (load_object(reg, path, &obj, err) < 0) return NULL;
    tsr_log(TSR_LOG_DEBUG, "loader", "%s plugin '%s': %s", tsr_stage_name(stage), name, path);
    const tsr_plugin_ref *ref = tsr_registry_find(reg, stage, name);
    if (ref) return ref;
    const char *refused = refusal_of(reg, name);
    if (refused) {
        tsr_error_set(err, TSR_E_INVALID, "%s", refused);
        return NULL;
    }
    char provides[512] = "";
    for (size_t i = 0; i < reg->n_refs; i++) {
        const tsr_plugin_desc *d = reg->refs[i]->ref.desc;
        size_t used = strlen(provides);
        if (reg->refs[i]->ref.object == obj)
            snprintf(provides + used, sizeof provides - used, "%s%s '%s'", used ? ", " : "",
                     tsr_stage_name(d->stage), d->name);
    }
    tsr_error_set(err, TSR_E_INVALID, "%s: holds no %s plugin '%s' but %s; a plugin file is "
                  "named after the plugin it holds (STAGE-NAME.so)", path, tsr_stage_name(stage),
                  name, provides);
    return NULL;
}

const tsr_plugin_ref *tsr_registry_lookup(tsr_registry *reg, int32_t stage, const char *name,
                                          tsr_error *err) {
    if (err) err->msg[0] = '\0';
    const tsr_plugin_ref *ref = tsr_registry_find(reg, stage, name);
    if (ref || !name_ok(name) || (stage != 0 && !stage_valid(stage))) return ref;
    int32_t first = stage ? stage : 1, last = stage ? stage : TSR_STAGE_COUNT;
    for (size_t f = 0; f < reg->folders.n; f++)
        for (int32_t s = first; s <= last; s++) {
            char *path = plugin_file_path(reg->folders.at[f], s, name);
            if (path && entry_exists(path)) {
                ref = load_named(reg, path, s, name, err);
                free(path);
                return ref;
            }
            free(path);
        }
    tsr_log(TSR_LOG_DEBUG, "loader", "%s plugin '%s': no %s-%s.so in the %zu plugin folders",
            stage ? tsr_stage_name(stage) : "a", name, stage ? tsr_stage_name(stage) : "STAGE",
            name, reg->folders.n);
    int32_t other = stage ? other_stage_with(reg, stage, name) : 0;
    if (other)
        tsr_error_set(err, TSR_E_INVALID, "'%s' is %s %s plugin, not %s %s plugin", name,
                      article(tsr_stage_name(other)), tsr_stage_name(other),
                      article(tsr_stage_name(stage)), tsr_stage_name(stage));
    return NULL;
}

/* ---- instances ------------------------------------------------------------------------- */

/* Every stage table starts with struct_size, create, destroy, so destroy can be reached
 * without knowing the stage. */
#define DESTROY_OFFSET offsetof(tsr_cache_vtable, destroy)
_Static_assert(offsetof(tsr_backend_vtable, destroy) == DESTROY_OFFSET, "table layout");
_Static_assert(offsetof(tsr_quantizer_vtable, destroy) == DESTROY_OFFSET, "table layout");
_Static_assert(offsetof(tsr_attention_vtable, destroy) == DESTROY_OFFSET, "table layout");
_Static_assert(offsetof(tsr_decoder_vtable, destroy) == DESTROY_OFFSET, "table layout");
_Static_assert(offsetof(tsr_router_vtable, destroy) == DESTROY_OFFSET, "table layout");

tsr_status tsr_instance_create(const tsr_plugin_ref *ref, tsr_pool *pool, const tsr_params *params,
                               const void *init, tsr_instance **out, tsr_error *err) {
    const tsr_plugin_desc *d = ref->desc;
    if (ref->score == 0)
        return tsr_error_set(err, TSR_E_UNSUPPORTED, "%s: plugin '%s' cannot run here: %s",
                             ref->path, d->name, ref->unusable);
    tsr_instance *inst = calloc(1, sizeof *inst);
    if (!inst) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    inst->ref = ref;
    inst->vtable = d->vtable;
    tsr_services_init(&inst->services, d->name, pool);
    const tsr_host *host = &inst->services.table;

    tsr_status st = TSR_E_INVALID;
    void *self = NULL;
    switch (d->stage) {
    case TSR_STAGE_BACKEND:
        st = ((const tsr_backend_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    case TSR_STAGE_QUANTIZER:
        st = ((const tsr_quantizer_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    case TSR_STAGE_ATTENTION:
        st = ((const tsr_attention_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    case TSR_STAGE_CACHE:
        st = ((const tsr_cache_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    case TSR_STAGE_DECODER:
        st = ((const tsr_decoder_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    case TSR_STAGE_ROUTER:
        st = ((const tsr_router_vtable *)d->vtable)->create(host, params, init, &self);
        break;
    }
    if (st < 0) {
        tsr_error_set(err, st, "%s: %s: %s", tsr_stage_name(d->stage), d->name,
                      tsr_services_take_error(&inst->services, "create failed without a reason"));
        free(inst);
        return st;
    }
    inst->self = self;
    *out = inst;
    return TSR_OK;
}

size_t tsr_instance_destroy(tsr_instance *inst) {
    if (!inst) return 0;
    void (*destroy)(void *);
    memcpy(&destroy, (const char *)inst->vtable + DESTROY_OFFSET, sizeof destroy);
    if (inst->self) destroy(inst->self);
    size_t leaked = atomic_load(&inst->services.bytes_live);
    if (leaked)
        tsr_log(TSR_LOG_WARN, inst->ref->desc->name, "leaked %zu bytes in %zu allocations", leaked,
                atomic_load(&inst->services.n_allocs_live));
    free(inst);
    return leaked;
}
