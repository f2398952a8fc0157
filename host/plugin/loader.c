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
    char *path;
    void *handle;
    tsr_services services; /* the table handed to the entry point; lives as long as the object */
};

typedef struct ref_entry {
    tsr_plugin_ref ref;
    char *unusable_text;
} ref_entry;

struct tsr_registry {
    tsr_pool *pool;
    tsr_plugin_object **objects;
    size_t n_objects;
    ref_entry **refs; /* one allocation each: a tsr_plugin_ref stays put while more load */
    size_t n_refs;
    char **diags;
    size_t n_diags;
    char **refused_names, **refused_why; /* plugins refused at load, with their reason */
    size_t n_refused;
    char **scanned_dirs; /* folders already scanned, in search order */
    size_t n_scanned;
};

static void *grow(void *array, size_t n, size_t elem) {
    /* Grows by doubling at powers of two so appends stay amortised O(1). */
    if (n && (n & (n - 1))) return array;
    size_t cap = n ? n * 2 : 4;
    return realloc(array, cap * elem);
}

static void add_diag(tsr_registry *reg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_diag(tsr_registry *reg, const char *fmt, ...) {
    char line[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    reg->diags = grow(reg->diags, reg->n_diags, sizeof *reg->diags);
    reg->diags[reg->n_diags++] = strdup(line);
    tsr_log(TSR_LOG_INFO, "loader", "%s", line);
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
    free(obj);
}

void tsr_registry_free(tsr_registry *reg) {
    if (!reg) return;
    for (size_t i = 0; i < reg->n_refs; i++) {
        free(reg->refs[i]->unusable_text);
        free(reg->refs[i]);
    }
    for (size_t i = 0; i < reg->n_objects; i++) object_free(reg->objects[i]);
    for (size_t i = 0; i < reg->n_diags; i++) free(reg->diags[i]);
    for (size_t i = 0; i < reg->n_refused; i++) {
        free(reg->refused_names[i]);
        free(reg->refused_why[i]);
    }
    free(reg->refused_names);
    free(reg->refused_why);
    for (size_t i = 0; i < reg->n_scanned; i++) free(reg->scanned_dirs[i]);
    free(reg->refs);
    free(reg->objects);
    free(reg->diags);
    free(reg->scanned_dirs);
    free(reg);
}

size_t tsr_registry_count(const tsr_registry *reg) { return reg->n_refs; }
const tsr_plugin_ref *tsr_registry_at(const tsr_registry *reg, size_t i) {
    return i < reg->n_refs ? &reg->refs[i]->ref : NULL;
}
size_t tsr_registry_n_diagnostics(const tsr_registry *reg) { return reg->n_diags; }
const char *tsr_registry_diagnostic(const tsr_registry *reg, size_t i) {
    return i < reg->n_diags ? reg->diags[i] : NULL;
}

const char *tsr_registry_refusal(const tsr_registry *reg, const char *name) {
    for (size_t i = 0; i < reg->n_refused; i++)
        if (strcmp(reg->refused_names[i], name) == 0) return reg->refused_why[i];
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

/* ---- checks -------------------------------------------------------------------------- */

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* A file that others can write could be replaced by anyone on the machine, and the host would
 * run its code: refuse it, and refuse a folder others can write (they could add files). */
static tsr_status check_permissions(const char *path, tsr_error *err) {
    struct stat st;
    if (stat(path, &st) != 0)
        return tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return tsr_error_set(err, TSR_E_INVALID, "%s: not a regular file", path);
    if (st.st_mode & S_IWOTH)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: refusing to load a plugin file writable by others; "
                             "fix with: chmod o-w %s", path, path);
    char *copy = strdup(path);
    const char *dir = dirname(copy);
    tsr_status status = TSR_OK;
    if (stat(dir, &st) == 0 && (st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX))
        status = tsr_error_set(err, TSR_E_INVALID,
                               "%s: refusing to load from folder %s, which is writable by "
                               "others; fix with: chmod o-w %s", path, dir, dir);
    free(copy);
    return status;
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

static bool name_ok(const char *name) {
    if (!name || !*name || strlen(name) > 64) return false;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
            return false;
    return true;
}

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

tsr_status tsr_registry_load_file(tsr_registry *reg, const char *path, tsr_error *err) {
    tsr_status st = check_permissions(path, err);
    if (st < 0) return st;

    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) return describe_dlopen_failure(path, dlerror(), err);

    tsr_plugin_object *obj = calloc(1, sizeof *obj);
    obj->path = strdup(path);
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

    size_t registered = 0;
    tsr_status refusal = TSR_E_INVALID; /* why the last refused plugin was refused */
    for (uint32_t i = 0; i < set->n_plugins; i++) {
        const tsr_plugin_desc *d = set->plugins[i];
        tsr_error why;
        tsr_status checked = check_desc(path, d, i, &why);
        if (checked < 0) {
            refusal = checked;
            add_diag(reg, "%s", why.msg);
            if (d && d->struct_size >= offsetof(tsr_plugin_desc, name) + sizeof(d->name) &&
                d->name) {
                reg->refused_names = grow(reg->refused_names, reg->n_refused, sizeof(char *));
                reg->refused_why = grow(reg->refused_why, reg->n_refused, sizeof(char *));
                reg->refused_names[reg->n_refused] = strdup(d->name);
                reg->refused_why[reg->n_refused++] = strdup(why.msg);
            }
            continue;
        }
        const tsr_plugin_ref *prev = tsr_registry_find(reg, 0, d->name);
        if (prev) {
            refusal = TSR_E_INVALID;
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

    if (registered == 0) {
        /* An object of one refused plugin fails the way that plugin did (an ABI version
         * mismatch stays TSR_E_UNSUPPORTED). */
        st = tsr_error_set(err, refusal, "%s", reg->n_diags ? reg->diags[reg->n_diags - 1]
                                                            : "no usable plugin");
        /* The last diagnostic is now the error itself: do not report it twice. */
        if (reg->n_diags) free(reg->diags[--reg->n_diags]);
        goto fail;
    }
    reg->objects = grow(reg->objects, reg->n_objects, sizeof *reg->objects);
    reg->objects[reg->n_objects++] = obj;
    return TSR_OK;

fail:
    object_free(obj);
    return st;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int tsr_registry_scan_dir(tsr_registry *reg, const char *dir, tsr_error *err) {
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return tsr_error_set(err, TSR_E_IO, "%s: not a folder", dir);
    /* Unlike one named file, a scan loads whatever others put there: the sticky bit (which
     * only stops them replacing files they do not own) is no protection. */
    if (st.st_mode & S_IWOTH)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: refusing to load plugins from a folder writable by others; "
                             "fix with: chmod o-w %s", dir, dir);
    DIR *d = opendir(dir);
    if (!d) return tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 4 || strcmp(e->d_name + len - 3, ".so") != 0 || e->d_name[0] == '.') continue;
        names = grow(names, n, sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_str); /* names is NULL when n is 0 */
    int loaded = 0;
    for (size_t i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        tsr_error why;
        if (tsr_registry_load_file(reg, path, &why) < 0)
            add_diag(reg, "%s (skipped)", why.msg);
        else
            loaded++;
        free(names[i]);
    }
    free(names);
    return loaded;
}

static void scan_once(tsr_registry *reg, const char *dir) {
    char *real = realpath(dir, NULL);
    if (!real) return; /* a folder that does not exist is simply not searched */
    for (size_t i = 0; i < reg->n_scanned; i++)
        if (strcmp(reg->scanned_dirs[i], real) == 0) {
            free(real);
            return;
        }
    reg->scanned_dirs = grow(reg->scanned_dirs, reg->n_scanned, sizeof *reg->scanned_dirs);
    reg->scanned_dirs[reg->n_scanned++] = real;
    tsr_error err;
    if (tsr_registry_scan_dir(reg, real, &err) < 0) add_diag(reg, "%s", err.msg);
}

/* The build tree's plugins are found when the program itself runs from the build tree, so a
 * developer needs no install and no environment variable. */
static bool running_from_build_tree(void) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return false;
    exe[n] = '\0';
    char *build = realpath(TESSERA_PLUGIN_BUILD_DIR "/..", NULL);
    bool inside = build && strncmp(exe, build, strlen(build)) == 0 && exe[strlen(build)] == '/';
    free(build);
    return inside;
}

void tsr_registry_scan_default(tsr_registry *reg, char *const *dirs, size_t n_dirs) {
    for (size_t i = 0; i < n_dirs; i++) scan_once(reg, dirs[i]);
    const char *env = getenv("TESSERA_PLUGIN_PATH");
    if (env && *env) {
        char *copy = strdup(env), *save = NULL;
        for (char *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save))
            scan_once(reg, dir);
        free(copy);
    }
    if (running_from_build_tree()) scan_once(reg, TESSERA_PLUGIN_BUILD_DIR);
    scan_once(reg, TESSERA_PLUGIN_INSTALL_DIR);
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
