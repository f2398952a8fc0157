/* Pipeline configuration. The YAML is read with libyaml's event API into a small tree that
 * keeps the line and column of every node, then the tree is checked against the schema
 * (docs/config.md). Parameter values stay text until tsr_config_bind. */
#include "config/config.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include <tessera/decoder.h>

#include "base/file.h"
#include "plugin/vtable.h"

/* The built-in default pipeline: the only place in the host that names plugins. */
static const char *const default_plugin[TSR_STAGE_COUNT + 1] = {
    [TSR_STAGE_BACKEND] = "cpu",   [TSR_STAGE_QUANTIZER] = "gguf", [TSR_STAGE_ATTENTION] = "flash",
    [TSR_STAGE_CACHE] = "full",    [TSR_STAGE_DECODER] = "sample",
};

/* NULL-terminated, so that stage_names + 1 serves as an ENUM choice list */
static const char *const stage_names[TSR_STAGE_COUNT + 2] = {
    [TSR_STAGE_BACKEND] = "backend", [TSR_STAGE_QUANTIZER] = "quantizer",
    [TSR_STAGE_ATTENTION] = "attention", [TSR_STAGE_CACHE] = "cache",
    [TSR_STAGE_DECODER] = "decoder", [TSR_STAGE_ROUTER] = "router",
};

static const char set_file[] = "--set";
enum { MAX_DEPTH = 64, MAX_FILE_BYTES = 16 << 20, EXCERPT = 96 };

const char *tsr_stage_name(int32_t stage) {
    return stage >= 1 && stage <= TSR_STAGE_COUNT ? stage_names[stage] : NULL;
}

int32_t tsr_stage_from_name(const char *name) {
    for (int32_t s = 1; name && s <= TSR_STAGE_COUNT; s++)
        if (strcmp(stage_names[s], name) == 0) return s;
    return 0;
}

static bool stage_per_layer(int32_t stage) {
    return stage == TSR_STAGE_QUANTIZER || stage == TSR_STAGE_ATTENTION ||
           stage == TSR_STAGE_CACHE || stage == TSR_STAGE_ROUTER;
}

/* ---------------------------------------------------------------------------------------- */
/* YAML tree                                                                                 */

typedef enum ynode_kind { YN_SCALAR, YN_SEQ, YN_MAP } ynode_kind;

typedef struct ynode {
    ynode_kind kind;
    char *text;           /* YN_SCALAR */
    tsr_src_loc loc;
    struct ynode **items; /* YN_SEQ: the items; YN_MAP: key, value, key, value... */
    size_t n, cap;
} ynode;

static void ynode_free(ynode *n) {
    if (!n) return;
    for (size_t i = 0; i < n->n; i++) ynode_free(n->items[i]);
    free(n->items);
    free(n->text);
    free(n);
}

static tsr_status oom(tsr_error *err) {
    return tsr_error_set(err, TSR_E_NOMEM, "out of memory while reading the configuration");
}

static tsr_src_loc mark_loc(const char *file, yaml_mark_t m) {
    return (tsr_src_loc){file, (int)m.line + 1, (int)m.column + 1};
}

static const char *kind_text(const ynode *n, char *buf, size_t size) {
    if (n->kind == YN_SEQ) return "a sequence";
    if (n->kind == YN_MAP) return "a mapping";
    char ex[EXCERPT];
    snprintf(buf, size, "'%s'", tsr_text_excerpt(ex, sizeof ex, n->text));
    return buf;
}

static tsr_status append(ynode *parent, ynode *child) {
    if (parent->n == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8;
        ynode **items = realloc(parent->items, cap * sizeof *items);
        if (!items) return TSR_E_NOMEM;
        parent->items = items;
        parent->cap = cap;
    }
    parent->items[parent->n++] = child;
    return TSR_OK;
}

/* Orders a mapping's keys by text, then by position, so equal keys sit together with their
 * first occurrence first. */
static int key_order(const void *a, const void *b) {
    const ynode *const *x = *(const ynode *const *const *)a;
    const ynode *const *y = *(const ynode *const *const *)b;
    int c = strcmp((*x)->text, (*y)->text);
    return c ? c : (x > y) - (x < y);
}

/* Reports the key that repeats an earlier one soonest in the file. Sorting makes this
 * O(n log n): a mapping of 100,000 keys would take tens of seconds compared pairwise. */
static tsr_status check_duplicates(const ynode *map, tsr_error *err) {
    size_t n = map->n / 2;
    if (n < 2) return TSR_OK;
    ynode *const **keys = malloc(n * sizeof *keys);
    if (!keys) return oom(err);
    for (size_t i = 0; i < n; i++) keys[i] = &map->items[2 * i];
    qsort(keys, n, sizeof *keys, key_order);
    /* In a run of equal keys the second is the soonest repeat (later ones lie further on). */
    ynode *const *first = NULL, *const *again = NULL;
    for (size_t i = 1; i < n; i++) {
        if (strcmp((*keys[i])->text, (*keys[i - 1])->text) == 0 && (!again || keys[i] < again)) {
            first = keys[i - 1];
            again = keys[i];
        }
    }
    free(keys);
    if (!again) return TSR_OK;
    char ex[EXCERPT];
    return tsr_error_set_at(err, TSR_E_INVALID, (*again)->loc, "duplicate key '%s' (first at %d:%d)",
                            tsr_text_excerpt(ex, sizeof ex, (*again)->text), (*first)->loc.line,
                            (*first)->loc.col);
}

/* Line and column of a byte offset, for reader errors that libyaml reports by offset only. */
static tsr_src_loc offset_loc(const char *file, const char *buf, size_t len, size_t off) {
    tsr_src_loc loc = {file, 1, 1};
    for (size_t i = 0; i < off && i < len; i++) {
        if (buf[i] == '\n') {
            loc.line++;
            loc.col = 1;
        } else {
            loc.col++;
        }
    }
    return loc;
}

static tsr_status yaml_failure(const yaml_parser_t *p, const char *file, const char *buf,
                               size_t len, tsr_error *err) {
    const char *problem = p->problem ? p->problem : "unknown error";
    switch (p->error) {
    case YAML_MEMORY_ERROR: return oom(err);
    case YAML_READER_ERROR:
        return tsr_error_set_at(err, TSR_E_INVALID, offset_loc(file, buf, len, p->problem_offset),
                                "not readable as YAML text: %s", problem);
    default:
        if (p->context)
            return tsr_error_set_at(err, TSR_E_INVALID, mark_loc(file, p->problem_mark),
                                    "YAML syntax error: %s (%s at %d:%d)", problem, p->context,
                                    (int)p->context_mark.line + 1, (int)p->context_mark.column + 1);
        return tsr_error_set_at(err, TSR_E_INVALID, mark_loc(file, p->problem_mark),
                                "YAML syntax error: %s", problem);
    }
}

/* Builds the tree of the one document in buf. Anchors and aliases are refused: a value that
 * appears twice in a pipeline is clearer written twice. */
static tsr_status yaml_read(const char *buf, size_t len, const char *file, ynode **root,
                            tsr_error *err) {
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) return oom(err);
    yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
    ynode *stack[MAX_DEPTH];
    int depth = 0, documents = 0;
    tsr_status st = TSR_OK;
    bool done = false;
    *root = NULL;
    while (!done && st == TSR_OK) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            st = yaml_failure(&parser, file, buf, len, err);
            break;
        }
        tsr_src_loc loc = mark_loc(file, ev.start_mark);
        const yaml_char_t *anchor = NULL;
        ynode *node = NULL;
        switch (ev.type) {
        case YAML_STREAM_END_EVENT: done = true; break;
        case YAML_DOCUMENT_START_EVENT:
            if (++documents > 1)
                st = tsr_error_set_at(err, TSR_E_INVALID, loc,
                                      "a second YAML document; a config file holds one");
            break;
        case YAML_ALIAS_EVENT:
            st = tsr_error_set_at(err, TSR_E_INVALID, loc,
                                  "YAML aliases (*%.60s) are not supported; write the value out",
                                  (const char *)ev.data.alias.anchor);
            break;
        case YAML_SCALAR_EVENT:
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
            anchor = ev.type == YAML_SCALAR_EVENT          ? ev.data.scalar.anchor
                     : ev.type == YAML_SEQUENCE_START_EVENT ? ev.data.sequence_start.anchor
                                                            : ev.data.mapping_start.anchor;
            if (anchor) {
                st = tsr_error_set_at(err, TSR_E_INVALID, loc,
                                      "YAML anchors (&%.60s) are not supported; write the value "
                                      "out",
                                      (const char *)anchor);
                break;
            }
            node = calloc(1, sizeof *node);
            if (!node) {
                st = oom(err);
                break;
            }
            node->loc = loc;
            node->kind = ev.type == YAML_SCALAR_EVENT          ? YN_SCALAR
                         : ev.type == YAML_SEQUENCE_START_EVENT ? YN_SEQ
                                                                : YN_MAP;
            if (node->kind == YN_SCALAR) {
                /* "\0" escapes would cut the C string every later step reads */
                if (memchr(ev.data.scalar.value, '\0', ev.data.scalar.length)) {
                    free(node);
                    st = tsr_error_set_at(err, TSR_E_INVALID, loc, "a NUL byte (\\0) in the "
                                          "text; config values and keys cannot hold one");
                    break;
                }
                node->text = malloc(ev.data.scalar.length + 1);
                if (!node->text) {
                    free(node);
                    st = oom(err);
                    break;
                }
                memcpy(node->text, ev.data.scalar.value, ev.data.scalar.length);
                node->text[ev.data.scalar.length] = '\0';
            }
            if (depth == 0) {
                *root = node;
            } else {
                ynode *parent = stack[depth - 1];
                if (parent->kind == YN_MAP && parent->n % 2 == 0 && node->kind != YN_SCALAR) {
                    st = tsr_error_set_at(err, TSR_E_INVALID, loc,
                                          "a mapping key must be plain text, not a %s",
                                          node->kind == YN_MAP ? "mapping" : "sequence");
                    ynode_free(node);
                    break;
                }
                if (append(parent, node) < 0) {
                    ynode_free(node);
                    st = oom(err);
                    break;
                }
            }
            if (node->kind != YN_SCALAR) {
                if (depth == MAX_DEPTH) {
                    st = tsr_error_set_at(err, TSR_E_INVALID, loc,
                                          "nested deeper than %d levels", MAX_DEPTH);
                    break;
                }
                stack[depth++] = node;
            }
            break;
        case YAML_SEQUENCE_END_EVENT: depth--; break;
        case YAML_MAPPING_END_EVENT:
            st = check_duplicates(stack[--depth], err);
            break;
        default: break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    if (st < 0) {
        ynode_free(*root);
        *root = NULL;
        return st;
    }
    if (*root && (*root)->kind == YN_SCALAR && !(*root)->text[0]) {
        ynode_free(*root); /* a document with only `---` or comments */
        *root = NULL;
    }
    if (!*root)
        return tsr_error_set_at(err, TSR_E_INVALID, (tsr_src_loc){file, 1, 1},
                                "the configuration is empty; it needs at least `tessera: %d`",
                                TSR_CONFIG_SCHEMA);
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Schema                                                                                    */

typedef struct walk {
    tsr_config *cfg;
    const char *base_dir; /* folder of the config file for relative paths; NULL: keep as is */
    tsr_error *err;
} walk;

static tsr_status expect_kind(walk *w, const ynode *n, ynode_kind kind, const char *path) {
    if (n->kind == kind) return TSR_OK;
    static const char *const want[] = {"a scalar value", "a sequence", "a mapping"};
    char got[EXCERPT + 2];
    return tsr_error_set_at(w->err, TSR_E_INVALID, n->loc, "%s: expected %s, got %s", path,
                            want[kind], kind_text(n, got, sizeof got));
}

/* A non-empty scalar. */
static tsr_status expect_text(walk *w, const ynode *n, const char *path, const char *what) {
    if (n->kind == YN_SCALAR && n->text[0]) return TSR_OK;
    char got[EXCERPT + 2];
    return tsr_error_set_at(w->err, TSR_E_INVALID, n->loc, "%s: expected %s, got %s", path, what,
                            kind_text(n, got, sizeof got));
}

static tsr_status unknown_key(walk *w, const ynode *key, const char *path,
                              const char *const *known, size_t n_known) {
    char list[400] = "", ex[EXCERPT];
    size_t used = 0;
    for (size_t i = 0; i < n_known && used < sizeof list; i++) {
        int k = snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", known[i]);
        if (k < 0) break;
        used += (size_t)k;
    }
    tsr_text_excerpt(ex, sizeof ex, key->text);
    if (!path)
        return tsr_error_set_at(w->err, TSR_E_INVALID, key->loc, "unknown key '%s'; known: %s",
                                ex, list);
    return tsr_error_set_at(w->err, TSR_E_INVALID, key->loc, "%s: unknown key '%s'; known: %s",
                            path, ex, list);
}

static char *resolve_path(const char *base_dir, const char *p) {
    if (!base_dir || p[0] == '/') return strdup(p);
    size_t n = strlen(base_dir) + strlen(p) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", base_dir, p);
    return out;
}

static tsr_status set_text(walk *w, char **dst, const char *text) {
    char *copy = strdup(text);
    if (!copy) return oom(w->err);
    free(*dst);
    *dst = copy;
    return TSR_OK;
}

static tsr_status set_path(walk *w, char **dst, const char *text) {
    char *copy = resolve_path(w->base_dir, text);
    if (!copy) return oom(w->err);
    free(*dst);
    *dst = copy;
    return TSR_OK;
}

/* Adds a parameter the stage does not have yet, in room the caller made. */
static tsr_status stage_append(walk *w, tsr_stage_conf *sc, const char *key, const char *value,
                               tsr_src_loc loc) {
    tsr_kv_text *kv = &sc->params[sc->n_params];
    kv->key = strdup(key);
    kv->value = strdup(value);
    kv->loc = loc;
    if (!kv->key || !kv->value) {
        free(kv->key);
        free(kv->value);
        return oom(w->err);
    }
    sc->n_params++;
    return TSR_OK;
}

/* Sets (or replaces) one parameter of a stage. */
static tsr_status stage_put(walk *w, tsr_stage_conf *sc, const char *key, const char *value,
                            tsr_src_loc loc) {
    for (size_t i = 0; i < sc->n_params; i++) {
        if (strcmp(sc->params[i].key, key) == 0) {
            sc->params[i].loc = loc;
            return set_text(w, &sc->params[i].value, value);
        }
    }
    tsr_kv_text *grown = realloc(sc->params, (sc->n_params + 1) * sizeof *grown);
    if (!grown) return oom(w->err);
    sc->params = grown;
    return stage_append(w, sc, key, value, loc);
}

static tsr_status role_put(tsr_config *cfg, int32_t stage, int32_t role, const char *text,
                           const char *origin, tsr_src_loc loc, tsr_error *err) {
    tsr_role_value *rv = &cfg->role_value[stage][role];
    char *t = strdup(text), *o = strdup(origin);
    if (!t || !o) {
        free(t);
        free(o);
        return oom(err);
    }
    free(rv->text);
    free(rv->origin);
    *rv = (tsr_role_value){.text = t, .origin = o, .loc = loc};
    return TSR_OK;
}

tsr_status tsr_config_set_role(tsr_config *cfg, int32_t stage, int32_t role, const char *value,
                               const char *origin, tsr_error *err) {
    if (!tsr_stage_name(stage) || role <= 0 || role >= TSR_PARAM_ROLE_COUNT)
        return tsr_error_set(err, TSR_E_INVALID, "%s: no such stage or role", origin);
    return role_put(cfg, stage, role, value, origin, (tsr_src_loc){origin, 0, 0}, err);
}

static void stage_conf_free(tsr_stage_conf *sc) {
    free(sc->plugin);
    for (size_t i = 0; i < sc->n_params; i++) {
        free(sc->params[i].key);
        free(sc->params[i].value);
    }
    free(sc->params);
    tsr_bound_params_free(&sc->bound);
    memset(sc, 0, sizeof *sc);
}

/* `stage: { plugin: NAME, param: value... }` */
static tsr_status walk_stage(walk *w, const ynode *map, const char *path, const char *stage,
                             tsr_stage_conf *sc) {
    tsr_status st = expect_kind(w, map, YN_MAP, path);
    /* The stage is new and the mapping's keys are distinct (check_duplicates), so parameters
     * are appended without a search, which would make a long mapping quadratic. */
    if (st == TSR_OK && map->n > 0 && !(sc->params = malloc(map->n / 2 * sizeof *sc->params)))
        st = oom(w->err);
    for (size_t i = 0; st == TSR_OK && i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        char sub[160], ex[EXCERPT];
        snprintf(sub, sizeof sub, "%s.%s", path, tsr_text_excerpt(ex, sizeof ex, key->text));
        if (strcmp(key->text, "plugin") == 0) {
            st = expect_text(w, val, sub, "a plugin name");
            if (st == TSR_OK) st = set_text(w, &sc->plugin, val->text);
            sc->loc = val->loc;
        } else {
            st = expect_kind(w, val, YN_SCALAR, sub);
            if (st == TSR_OK) st = stage_append(w, sc, key->text, val->text, key->loc);
        }
    }
    if (st == TSR_OK && !sc->plugin)
        st = tsr_error_set_at(w->err, TSR_E_INVALID, map->loc,
                              "%s: missing `plugin:` (which %s plugin to use)", path, stage);
    return st;
}

static tsr_status walk_model(walk *w, const ynode *map) {
    static const char *const known[] = {"path", "tokenizer"};
    tsr_status st = expect_kind(w, map, YN_MAP, "model");
    for (size_t i = 0; st == TSR_OK && i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        if (strcmp(key->text, "path") == 0) {
            st = expect_text(w, val, "model.path", "a file path");
            if (st == TSR_OK) st = set_path(w, &w->cfg->model_path, val->text);
        } else if (strcmp(key->text, "tokenizer") == 0) {
            st = expect_text(w, val, "model.tokenizer", "a file path");
            if (st == TSR_OK) st = set_path(w, &w->cfg->tokenizer_path, val->text);
        } else {
            st = unknown_key(w, key, "model", known, 2);
        }
    }
    return st;
}

static tsr_status walk_plugin_dirs(walk *w, const ynode *seq) {
    tsr_config *cfg = w->cfg;
    tsr_status st = expect_kind(w, seq, YN_SEQ, "plugin_dirs");
    if (st < 0) return st;
    cfg->plugin_dirs = calloc(seq->n ? seq->n : 1, sizeof *cfg->plugin_dirs);
    if (!cfg->plugin_dirs) return oom(w->err);
    for (size_t i = 0; i < seq->n; i++) {
        char path[48];
        snprintf(path, sizeof path, "plugin_dirs[%zu]", i);
        st = expect_text(w, seq->items[i], path, "a folder path");
        if (st < 0) return st;
        cfg->plugin_dirs[i] = resolve_path(w->base_dir, seq->items[i]->text);
        if (!cfg->plugin_dirs[i]) return oom(w->err);
        cfg->n_plugin_dirs = i + 1;
    }
    return TSR_OK;
}

/* The generate: keys are checked with the same parser as plugin parameters. */
static const tsr_param_def generate_defs[] = {
    {.struct_size = sizeof(tsr_param_def), .name = "prompt", .type = TSR_PARAM_STRING, .min = 1,
     .max = 0, .doc = "prompt text"},
    {.struct_size = sizeof(tsr_param_def), .name = "max_tokens", .type = TSR_PARAM_INT, .min = 0,
     .max = 1 << 30, .unit = "tokens", .doc = "tokens to generate"},
    {.struct_size = sizeof(tsr_param_def), .name = "temperature", .type = TSR_PARAM_FLOAT,
     .min = 0, .max = 100, .role = TSR_PARAM_ROLE_TEMPERATURE,
     .doc = "the decoder's temperature parameter; 0 is greedy"},
    {.struct_size = sizeof(tsr_param_def), .name = "seed", .type = TSR_PARAM_INT, .min = 0,
     .max = 0x1p63, .role = TSR_PARAM_ROLE_SEED, .doc = "the decoder's seed parameter"},
};
#define N_GENERATE (sizeof generate_defs / sizeof generate_defs[0])

static tsr_status generate_put(walk *w, const tsr_param_def *def, const char *text,
                               tsr_src_loc loc) {
    tsr_param_value v;
    tsr_status st = tsr_param_parse(def, text, "generate", loc, &v, w->err);
    if (st < 0) return st;
    tsr_generate_conf *g = &w->cfg->generate;
    if (def == &generate_defs[0]) return set_text(w, &g->prompt, text);
    if (def->role) {
        char origin[64];
        snprintf(origin, sizeof origin, "generate.%s", def->name);
        return role_put(w->cfg, TSR_STAGE_DECODER, def->role, text, origin, loc, w->err);
    }
    g->max_tokens = v.u.i;
    return TSR_OK;
}

static const tsr_param_def *generate_def(const char *key) {
    for (size_t i = 0; i < N_GENERATE; i++)
        if (strcmp(generate_defs[i].name, key) == 0) return &generate_defs[i];
    return NULL;
}

static tsr_status walk_generate(walk *w, const ynode *map) {
    static const char *const known[] = {"prompt", "max_tokens", "temperature", "seed"};
    tsr_status st = expect_kind(w, map, YN_MAP, "generate");
    for (size_t i = 0; st == TSR_OK && i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        const tsr_param_def *def = generate_def(key->text);
        if (!def) return unknown_key(w, key, "generate", known, N_GENERATE);
        char sub[64];
        snprintf(sub, sizeof sub, "generate.%s", def->name);
        st = expect_kind(w, val, YN_SCALAR, sub);
        if (st == TSR_OK) st = generate_put(w, def, val->text, val->loc);
    }
    return st;
}

/* range: [first, last], inclusive, 0-based layer numbers. */
static tsr_status walk_range(walk *w, const ynode *n, const char *path, tsr_layer_override *lo) {
    static const tsr_param_def layer_def = {.struct_size = sizeof(tsr_param_def), .name = "range",
                                            .type = TSR_PARAM_INT, .min = 0, .max = INT32_MAX};
    if (n->kind != YN_SEQ || n->n != 2) {
        char got[EXCERPT + 2];
        if (n->kind == YN_SEQ) snprintf(got, sizeof got, "%zu items", n->n);
        return tsr_error_set_at(w->err, TSR_E_INVALID, n->loc,
                                "%s.range: expected [first, last] (two layer numbers), got %s",
                                path, n->kind == YN_SEQ ? got : kind_text(n, got, sizeof got));
    }
    int64_t v[2];
    for (int i = 0; i < 2; i++) {
        const ynode *item = n->items[i];
        char sub[80];
        snprintf(sub, sizeof sub, "%s.range[%d]", path, i);
        tsr_status st = expect_kind(w, item, YN_SCALAR, sub);
        tsr_param_value pv;
        if (st == TSR_OK)
            st = tsr_param_parse(&layer_def, item->text, path, item->loc, &pv, w->err);
        if (st < 0) return st;
        v[i] = pv.u.i;
    }
    if (v[0] > v[1])
        return tsr_error_set_at(w->err, TSR_E_INVALID, n->loc,
                                "%s.range: first layer %d is after last layer %d", path, (int)v[0],
                                (int)v[1]);
    lo->first = (int32_t)v[0];
    lo->last = (int32_t)v[1];
    return TSR_OK;
}

static tsr_status walk_layer(walk *w, const ynode *map, const char *path, tsr_layer_override *lo) {
    static const char *const known[] = {"range", "quantizer", "attention", "cache", "router"};
    tsr_status st = expect_kind(w, map, YN_MAP, path);
    if (st < 0) return st;
    lo->loc = map->loc;
    bool have_range = false, have_stage = false;
    for (size_t i = 0; i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        int32_t stage = tsr_stage_from_name(key->text);
        if (strcmp(key->text, "range") == 0) {
            st = walk_range(w, val, path, lo);
            have_range = true;
        } else if (stage_per_layer(stage)) {
            char sub[96];
            snprintf(sub, sizeof sub, "%s.%s", path, key->text);
            st = walk_stage(w, val, sub, key->text, &lo->stage[stage]);
            have_stage = true;
        } else if (stage) {
            st = tsr_error_set_at(w->err, TSR_E_INVALID, key->loc,
                                  "%s: %s cannot vary per layer; only quantizer, attention, "
                                  "cache and router can",
                                  path, key->text);
        } else {
            st = unknown_key(w, key, path, known, sizeof known / sizeof known[0]);
        }
        if (st < 0) return st;
    }
    if (!have_range)
        return tsr_error_set_at(w->err, TSR_E_INVALID, map->loc,
                                "%s: missing `range: [first, last]`", path);
    if (!have_stage)
        return tsr_error_set_at(w->err, TSR_E_INVALID, map->loc,
                                "%s: nothing to override; give quantizer, attention, cache or "
                                "router",
                                path);
    return TSR_OK;
}

static tsr_status walk_layers(walk *w, const ynode *seq) {
    tsr_config *cfg = w->cfg;
    tsr_status st = expect_kind(w, seq, YN_SEQ, "layers");
    if (st < 0) return st;
    cfg->layers = calloc(seq->n ? seq->n : 1, sizeof *cfg->layers);
    if (!cfg->layers) return oom(w->err);
    for (size_t i = 0; i < seq->n; i++) {
        char path[48];
        snprintf(path, sizeof path, "layers[%zu]", i);
        cfg->n_layers = i + 1;
        st = walk_layer(w, seq->items[i], path, &cfg->layers[i]);
        if (st < 0) return st;
    }
    return TSR_OK;
}

static const char *const hook_events[] = {"after_load", "after_step", "at_end", NULL};

static tsr_status walk_hook(walk *w, const ynode *map, const char *path, tsr_hook_conf *h) {
    static const char *const known[] = {"on", "stage", "call", "args"};
    static const tsr_param_def on_def = {.struct_size = sizeof(tsr_param_def), .name = "on",
                                         .type = TSR_PARAM_ENUM, .choices = hook_events};
    static const tsr_param_def stage_def = {.struct_size = sizeof(tsr_param_def), .name = "stage",
                                            .type = TSR_PARAM_ENUM, .choices = stage_names + 1};
    tsr_status st = expect_kind(w, map, YN_MAP, path);
    if (st < 0) return st;
    h->loc = map->loc;
    h->event = -1;
    for (size_t i = 0; i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        char sub[96];
        snprintf(sub, sizeof sub, "%s.%s", path, key->text);
        tsr_param_value v;
        if (strcmp(key->text, "on") == 0 || strcmp(key->text, "stage") == 0) {
            bool on = key->text[0] == 'o';
            st = expect_kind(w, val, YN_SCALAR, sub);
            if (st == TSR_OK)
                st = tsr_param_parse(on ? &on_def : &stage_def, val->text, path, val->loc, &v,
                                     w->err);
            if (st == TSR_OK && on) h->event = (int32_t)v.u.i;
            if (st == TSR_OK && !on) h->stage = (int32_t)v.u.i + 1;
        } else if (strcmp(key->text, "call") == 0) {
            st = expect_text(w, val, sub, "a command name");
            if (st == TSR_OK) st = set_text(w, &h->command, val->text);
        } else if (strcmp(key->text, "args") == 0) {
            st = expect_kind(w, val, YN_SEQ, sub);
            if (st < 0) return st;
            h->args = calloc(val->n ? val->n : 1, sizeof *h->args);
            if (!h->args) return oom(w->err);
            for (size_t a = 0; a < val->n && st == TSR_OK; a++) {
                char arg[128];
                snprintf(arg, sizeof arg, "%s[%zu]", sub, a);
                st = expect_kind(w, val->items[a], YN_SCALAR, arg);
                if (st == TSR_OK) st = set_text(w, &h->args[a], val->items[a]->text);
                if (st == TSR_OK) h->n_args = a + 1;
            }
        } else {
            st = unknown_key(w, key, path, known, 4);
        }
        if (st < 0) return st;
    }
    const char *missing = h->event < 0 ? "on"
                          : !h->stage  ? "stage"
                          : !h->command ? "call"
                                        : NULL;
    static const char *const hint[] = {"after_load, after_step or at_end",
                                       "the stage whose plugin has the command",
                                       "the command's name"};
    if (missing)
        return tsr_error_set_at(w->err, TSR_E_INVALID, map->loc, "%s: missing `%s:` (%s)", path,
                                missing, hint[h->event < 0 ? 0 : !h->stage ? 1 : 2]);
    return TSR_OK;
}

static tsr_status walk_hooks(walk *w, const ynode *seq) {
    tsr_config *cfg = w->cfg;
    tsr_status st = expect_kind(w, seq, YN_SEQ, "hooks");
    if (st < 0) return st;
    cfg->hooks = calloc(seq->n ? seq->n : 1, sizeof *cfg->hooks);
    if (!cfg->hooks) return oom(w->err);
    for (size_t i = 0; i < seq->n; i++) {
        char path[48];
        snprintf(path, sizeof path, "hooks[%zu]", i);
        cfg->n_hooks = i + 1;
        st = walk_hook(w, seq->items[i], path, &cfg->hooks[i]);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* ---- draft: ---- */

static tsr_config *config_new(const char *name);

/* The draft section of cfg, made empty when there is none yet; NULL when out of memory. */
static tsr_config *draft_of(tsr_config *cfg, tsr_src_loc loc) {
    if (cfg->draft) return cfg->draft;
    tsr_config *d = config_new(cfg->path);
    if (!d) return NULL;
    d->schema = TSR_CONFIG_SCHEMA;
    d->loc = loc;
    return cfg->draft = d;
}

/* Appends one layer number (text) to the draft's skip_layers. */
static tsr_status add_skip_layer(walk *w, tsr_config *d, const char *text, tsr_src_loc loc) {
    static const tsr_param_def skip_def = {.struct_size = sizeof(tsr_param_def),
                                           .name = "skip_layers", .type = TSR_PARAM_INT,
                                           .min = 0, .max = INT32_MAX};
    tsr_param_value v;
    tsr_status st = tsr_param_parse(&skip_def, text, "draft", loc, &v, w->err);
    if (st < 0) return st;
    for (size_t i = 0; i < d->n_skip_layers; i++)
        if (d->skip_layers[i] == (int32_t)v.u.i)
            return tsr_error_set_at(w->err, TSR_E_INVALID, loc, "draft.skip_layers: layer %d is "
                                    "listed twice", (int)v.u.i);
    int32_t *grown = realloc(d->skip_layers, (d->n_skip_layers + 1) * sizeof *grown);
    if (!grown) return oom(w->err);
    d->skip_layers = grown;
    d->skip_layers[d->n_skip_layers++] = (int32_t)v.u.i;
    return TSR_OK;
}

/* draft: { model: FILE, tokenizer: FILE, skip_layers: [...], backend: {...}, ... } */
static tsr_status walk_draft(walk *w, const ynode *map) {
    static const char *const known[] = {"model", "tokenizer", "skip_layers", "backend",
                                        "quantizer", "attention", "cache", "router"};
    tsr_status st = expect_kind(w, map, YN_MAP, "draft");
    if (st < 0) return st;
    tsr_config *d = draft_of(w->cfg, map->loc);
    if (!d) return oom(w->err);
    walk dw = {d, w->base_dir, w->err};
    for (size_t i = 0; st == TSR_OK && i < map->n; i += 2) {
        const ynode *key = map->items[i], *val = map->items[i + 1];
        int32_t stage = tsr_stage_from_name(key->text);
        char sub[64];
        snprintf(sub, sizeof sub, "draft.%s", stage ? key->text : "");
        if (stage == TSR_STAGE_DECODER) {
            st = tsr_error_set_at(w->err, TSR_E_INVALID, key->loc, "draft: a draft has no decoder "
                                  "of its own: the pipeline's decoder drives both models");
        } else if (stage) {
            st = walk_stage(&dw, val, sub, key->text, &d->stage[stage]);
        } else if (strcmp(key->text, "model") == 0 || strcmp(key->text, "tokenizer") == 0) {
            bool model = key->text[0] == 'm';
            st = expect_text(w, val, model ? "draft.model" : "draft.tokenizer", "a file path");
            if (st == TSR_OK)
                st = set_path(&dw, model ? &d->model_path : &d->tokenizer_path, val->text);
        } else if (strcmp(key->text, "skip_layers") == 0) {
            st = expect_kind(w, val, YN_SEQ, "draft.skip_layers");
            d->skip_loc = val->loc;
            for (size_t k = 0; st == TSR_OK && k < val->n; k++) {
                st = expect_kind(w, val->items[k], YN_SCALAR, "draft.skip_layers");
                if (st == TSR_OK) st = add_skip_layer(w, d, val->items[k]->text, val->items[k]->loc);
            }
        } else {
            st = unknown_key(w, key, "draft", known, sizeof known / sizeof known[0]);
        }
    }
    return st;
}

static tsr_status walk_root(walk *w, const ynode *root) {
    static const char *const known[] = {"tessera", "model",  "plugin_dirs", "backend",
                                        "quantizer", "attention", "cache",  "decoder",
                                        "router",  "layers", "generate", "hooks", "draft"};
    tsr_status st = expect_kind(w, root, YN_MAP, "the top level");
    if (st < 0) return st;
    /* the version first: a newer schema's keys would otherwise be reported as unknown */
    const ynode *version = NULL;
    for (size_t i = 0; i < root->n && !version; i += 2)
        if (strcmp(root->items[i]->text, "tessera") == 0) version = root->items[i + 1];
    if (!version)
        return tsr_error_set_at(w->err, TSR_E_INVALID, root->loc,
                                "missing `tessera: %d` (the config schema version)",
                                TSR_CONFIG_SCHEMA);
    if (version->kind != YN_SCALAR || strcmp(version->text, "1") != 0) {
        char got[EXCERPT + 2];
        return tsr_error_set_at(w->err, TSR_E_INVALID, version->loc,
                                "tessera: expected schema version %d, got %s", TSR_CONFIG_SCHEMA,
                                kind_text(version, got, sizeof got));
    }
    w->cfg->schema = TSR_CONFIG_SCHEMA;
    for (size_t i = 0; i < root->n; i += 2) {
        const ynode *key = root->items[i], *val = root->items[i + 1];
        int32_t stage = tsr_stage_from_name(key->text);
        if (stage)
            st = walk_stage(w, val, key->text, key->text, &w->cfg->stage[stage]);
        else if (strcmp(key->text, "tessera") == 0)
            st = TSR_OK;
        else if (strcmp(key->text, "model") == 0)
            st = walk_model(w, val);
        else if (strcmp(key->text, "plugin_dirs") == 0)
            st = walk_plugin_dirs(w, val);
        else if (strcmp(key->text, "layers") == 0)
            st = walk_layers(w, val);
        else if (strcmp(key->text, "generate") == 0)
            st = walk_generate(w, val);
        else if (strcmp(key->text, "hooks") == 0)
            st = walk_hooks(w, val);
        else if (strcmp(key->text, "draft") == 0)
            st = walk_draft(w, val);
        else
            st = unknown_key(w, key, NULL, known, sizeof known / sizeof known[0]);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Public API                                                                                */

static tsr_config *config_new(const char *name) {
    tsr_config *cfg = calloc(1, sizeof *cfg);
    if (!cfg) return NULL;
    cfg->path = strdup(name);
    if (!cfg->path) {
        free(cfg);
        return NULL;
    }
    cfg->generate = (tsr_generate_conf){.max_tokens = -1};
    return cfg;
}

static tsr_status load_buffer(const char *buf, size_t len, const char *name, const char *base_dir,
                              tsr_config **out, tsr_error *err) {
    *out = NULL;
    tsr_config *cfg = config_new(name);
    if (!cfg) return oom(err);
    ynode *root;
    tsr_status st = yaml_read(buf, len, cfg->path, &root, err);
    if (st == TSR_OK) {
        walk w = {cfg, base_dir, err};
        st = walk_root(&w, root);
        ynode_free(root);
    }
    if (st < 0) {
        tsr_config_free(cfg);
        return st;
    }
    *out = cfg;
    return TSR_OK;
}

tsr_status tsr_config_load_string(const char *yaml, const char *name, tsr_config **out,
                                  tsr_error *err) {
    return load_buffer(yaml, strlen(yaml), name, NULL, out, err);
}

tsr_status tsr_config_load(const char *path, tsr_config **out, tsr_error *err) {
    *out = NULL;
    char *buf;
    size_t len;
    tsr_status st = tsr_file_read(path, MAX_FILE_BYTES, "config file", &buf, &len, err);
    if (st < 0) return st;
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : NULL;
    if (slash && !dir)
        st = oom(err);
    else
        st = load_buffer(buf, len, path, dir, out, err);
    free(dir);
    free(buf);
    return st;
}

tsr_status tsr_config_default(tsr_config **out, tsr_error *err) {
    *out = NULL;
    tsr_config *cfg = config_new("<default>");
    if (!cfg) return oom(err);
    cfg->schema = TSR_CONFIG_SCHEMA;
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
        if (!default_plugin[s]) continue;
        cfg->stage[s].plugin = strdup(default_plugin[s]);
        cfg->stage[s].loc = (tsr_src_loc){cfg->path, 0, 0};
        if (!cfg->stage[s].plugin) {
            tsr_config_free(cfg);
            return oom(err);
        }
    }
    *out = cfg;
    return TSR_OK;
}

/* --set STAGE.KEY=VALUE of one stage: `plugin` chooses it, any other key is a parameter. */
static tsr_status stage_set(walk *w, tsr_stage_conf *sc, const char *key, const char *value,
                            const char *ex) {
    tsr_src_loc loc = {set_file, 0, 0};
    if (strcmp(key, "plugin") != 0) return stage_put(w, sc, key, value, loc);
    if (!*value)
        return tsr_error_set(w->err, TSR_E_INVALID, "--set '%s': expected a plugin name after '='",
                             ex);
    tsr_bound_params_free(&sc->bound);
    sc->loc = loc;
    return set_text(w, &sc->plugin, value);
}

/* --set draft.model=FILE, draft.tokenizer=FILE, draft.skip_layers=N,N..., draft.STAGE.KEY=V;
 * the draft section is made by the first that is well-formed. */
static tsr_status draft_set(walk *w, const char *key, const char *value, const char *ex) {
    tsr_src_loc loc = {set_file, 0, 0};
    const char *dot = strchr(key, '.');
    char stage_name[64] = "";
    if (dot) snprintf(stage_name, sizeof stage_name, "%.*s", (int)(dot - key), key);
    int32_t stage = tsr_stage_from_name(stage_name);
    bool path = *value && (strcmp(key, "model") == 0 || strcmp(key, "tokenizer") == 0);
    bool skip = strcmp(key, "skip_layers") == 0;
    if (!path && !skip && (!stage || stage == TSR_STAGE_DECODER || !dot[1]))
        return tsr_error_set(w->err, TSR_E_INVALID, "--set '%s': expected draft.model=FILE, "
                             "draft.tokenizer=FILE, draft.skip_layers=N,N... or "
                             "draft.STAGE.KEY=VALUE (STAGE: backend, quantizer, attention, cache, "
                             "router)", ex);
    tsr_config *d = draft_of(w->cfg, loc);
    if (!d) return oom(w->err);
    walk dw = {d, NULL, w->err};
    if (path) return set_text(&dw, key[0] == 'm' ? &d->model_path : &d->tokenizer_path, value);
    if (!skip) return stage_set(&dw, &d->stage[stage], dot + 1, value, ex);
    /* comma-separated; empty: no layer skipped */
    d->n_skip_layers = 0;
    d->skip_loc = loc;
    tsr_status st = TSR_OK;
    for (const char *p = value; *p && st == TSR_OK;) {
        size_t len = strcspn(p, ",");
        char *item = strndup(p, len);
        if (!item) return oom(w->err);
        st = add_skip_layer(w, d, item, loc);
        free(item);
        p += len + (p[len] == ',');
    }
    return st;
}

tsr_status tsr_config_set(tsr_config *cfg, const char *assignment, tsr_error *err) {
    char ex[EXCERPT], key_ex[EXCERPT], section_ex[EXCERPT];
    tsr_text_excerpt(ex, sizeof ex, assignment);
    const char *eq = strchr(assignment, '='), *dot = strchr(assignment, '.');
    if (!eq || !dot || dot > eq || dot == assignment || dot + 1 == eq)
        return tsr_error_set(err, TSR_E_INVALID, "--set '%s': expected section.key=value", ex);
    char section[64], key[128];
    snprintf(section, sizeof section, "%.*s", (int)(dot - assignment), assignment);
    snprintf(key, sizeof key, "%.*s", (int)(eq - dot - 1), dot + 1);
    const char *value = eq + 1;
    tsr_src_loc loc = {set_file, 0, 0};
    walk w = {cfg, NULL, err};
    int32_t stage = tsr_stage_from_name(section);
    if (stage) return stage_set(&w, &cfg->stage[stage], key, value, ex);
    if (strcmp(section, "draft") == 0) return draft_set(&w, key, value, ex);
    if (strcmp(section, "model") == 0) {
        if (*value && strcmp(key, "path") == 0) return set_text(&w, &cfg->model_path, value);
        if (*value && strcmp(key, "tokenizer") == 0)
            return set_text(&w, &cfg->tokenizer_path, value);
        return tsr_error_set(err, TSR_E_INVALID,
                             "--set '%s': expected model.path=FILE or model.tokenizer=FILE", ex);
    }
    if (strcmp(section, "generate") == 0) {
        const tsr_param_def *def = generate_def(key);
        if (!def)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "--set '%s': unknown key '%s' in generate; known: prompt, "
                                 "max_tokens, temperature, seed",
                                 ex, tsr_text_excerpt(key_ex, sizeof key_ex, key));
        return generate_put(&w, def, value, loc);
    }
    if (strcmp(section, "layers") == 0 || strcmp(section, "hooks") == 0 ||
        strcmp(section, "plugin_dirs") == 0 || strcmp(section, "tessera") == 0)
        return tsr_error_set(err, TSR_E_INVALID,
                             "--set '%s': %s cannot be set from the command line; edit the config "
                             "file",
                             ex, section);
    return tsr_error_set(err, TSR_E_INVALID,
                         "--set '%s': unknown section '%s'; settable: backend, quantizer, "
                         "attention, cache, decoder, router, model, generate, draft",
                         ex, tsr_text_excerpt(section_ex, sizeof section_ex, section));
}

/* The stage's parameters as given, with the values given by role (`roles`, NULL for a layer
 * override) in place of what the file said of those parameters. */
static tsr_status params_with_roles(const tsr_stage_conf *sc, const tsr_plugin_desc *desc,
                                    const char *section, const tsr_role_value *roles,
                                    tsr_kv_text **out, size_t *n_out, tsr_error *err) {
    *out = malloc((sc->n_params + TSR_PARAM_ROLE_COUNT) * sizeof **out);
    if (!*out) return oom(err);
    *n_out = 0;
    int32_t by_role[TSR_PARAM_ROLE_COUNT];
    for (int32_t r = 1; r < TSR_PARAM_ROLE_COUNT; r++) {
        by_role[r] = roles && roles[r].text ? tsr_param_find_role(desc->params, desc->n_params, r)
                                            : -1;
        if (roles && roles[r].text && by_role[r] < 0) {
            free(*out);
            char where[256] = "";
            if (roles[r].loc.line > 0) tsr_src_loc_format(where, sizeof where - 2, roles[r].loc);
            return tsr_error_set(err, TSR_E_INVALID, "%s%s%s: the %s plugin '%s' has no %s "
                                 "parameter", where, *where ? ": " : "", roles[r].origin, section,
                                 desc->name, tsr_param_role_name(r));
        }
    }
    for (size_t i = 0; i < sc->n_params; i++) {
        bool replaced = false;
        for (int32_t r = 1; r < TSR_PARAM_ROLE_COUNT; r++)
            replaced |= by_role[r] >= 0 && !strcmp(desc->params[by_role[r]].name, sc->params[i].key);
        if (!replaced) (*out)[(*n_out)++] = sc->params[i];
    }
    for (int32_t r = 1; r < TSR_PARAM_ROLE_COUNT; r++)
        if (by_role[r] >= 0)
            (*out)[(*n_out)++] = (tsr_kv_text){.key = (char *)desc->params[by_role[r]].name,
                                               .value = roles[r].text, .loc = roles[r].loc};
    return TSR_OK;
}

/* Binds one stage; *found (when not NULL) receives its plugin's descriptor. */
static tsr_status bind_stage(tsr_stage_conf *sc, int32_t stage, const char *section,
                             const tsr_role_value *roles, tsr_plugin_find_fn find, void *find_ctx,
                             const tsr_plugin_desc **found, tsr_error *err) {
    tsr_error why = {""};
    const tsr_plugin_desc *desc = find(find_ctx, stage, sc->plugin, &why);
    if (found) *found = desc;
    if (!desc && why.msg[0])
        return tsr_error_set_at(err, TSR_E_INVALID, sc->loc, "%s: %s", section, why.msg);
    if (!desc) {
        char ex[EXCERPT];
        return tsr_error_set_at(err, TSR_E_INVALID, sc->loc,
                                "%s: unknown plugin '%s' (see `tessera plugins list`)", section,
                                tsr_text_excerpt(ex, sizeof ex, sc->plugin));
    }
    tsr_bound_params_free(&sc->bound);
    tsr_kv_text *kv;
    size_t n_kv;
    tsr_status st = params_with_roles(sc, desc, section, roles, &kv, &n_kv, err);
    if (st < 0) return st;
    st = tsr_params_bind(desc->params, desc->n_params, desc->name, section, sc->loc, kv, n_kv,
                         &sc->bound, err);
    free(kv);
    return st;
}

/* A draft stage the section does not name: a copy of the target's, with the parameters given
 * for the draft's (by --set draft.STAGE.KEY=VALUE) in place of the target's. */
static tsr_status inherit_stage(tsr_stage_conf *sc, const tsr_stage_conf *target, tsr_error *err) {
    tsr_kv_text *own = sc->params;
    size_t n_own = sc->n_params;
    walk w = {NULL, NULL, err};
    sc->params = NULL;
    sc->n_params = 0;
    sc->loc = target->loc;
    tsr_status st = set_text(&w, &sc->plugin, target->plugin);
    for (size_t i = 0; st == TSR_OK && i < target->n_params; i++)
        st = stage_put(&w, sc, target->params[i].key, target->params[i].value,
                       target->params[i].loc);
    for (size_t i = 0; st == TSR_OK && i < n_own; i++)
        st = stage_put(&w, sc, own[i].key, own[i].value, own[i].loc);
    for (size_t i = 0; i < n_own; i++) {
        free(own[i].key);
        free(own[i].value);
    }
    free(own);
    return st;
}

/* The draft's stages: its own, else the target's (the router only for a self-draft, since a
 * router serves the experts of its model). Values given by role reach them as they reach the
 * target's (-t sizes every backend's threads). */
static tsr_status bind_draft(tsr_config *cfg, tsr_plugin_find_fn find, void *find_ctx,
                             tsr_error *err) {
    tsr_config *d = cfg->draft;
    if (d->tokenizer_path && !d->model_path)
        return tsr_error_set_at(err, TSR_E_INVALID, d->loc, "draft.tokenizer: a self-draft reads "
                                "with the target's vocabulary; give draft.model too, or remove "
                                "draft.tokenizer");
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
        tsr_stage_conf *sc = &d->stage[s], *target = &cfg->stage[s];
        if (s == TSR_STAGE_DECODER) continue;
        char section[64];
        snprintf(section, sizeof section, "draft.%s", stage_names[s]);
        if (!sc->plugin && (!target->plugin || (s == TSR_STAGE_ROUTER && d->model_path))) {
            char key[EXCERPT];
            if (sc->n_params > 0)
                return tsr_error_set_at(err, TSR_E_INVALID, sc->params[0].loc,
                                        "%s.%s: parameter given but no %s plugin chosen; set "
                                        "%s.plugin", section,
                                        tsr_text_excerpt(key, sizeof key, sc->params[0].key),
                                        stage_names[s], section);
            continue;
        }
        tsr_status st = sc->plugin ? TSR_OK : inherit_stage(sc, target, err);
        if (st == TSR_OK)
            st = bind_stage(sc, s, section, cfg->role_value[s], find, find_ctx, NULL, err);
        if (st < 0) return st;
    }
    return TSR_OK;
}

/* A draft section the decoder never reads is a mistake worth one line, and so is a decoder
 * that cannot run without a draft in a pipeline without one. */
static tsr_status check_draft_use(const tsr_config *cfg, const tsr_plugin_desc *desc,
                                  tsr_error *err) {
    const tsr_stage_conf *dec = &cfg->stage[TSR_STAGE_DECODER];
    const tsr_decoder_vtable *vt = desc ? desc->vtable : NULL;
    int32_t use = vt && vt->struct_size >= TSR_END_OF(tsr_decoder_vtable, draft_use)
                      ? vt->draft_use
                      : TSR_DECODER_DRAFT_NONE;
    if (use < TSR_DECODER_DRAFT_NONE || use > TSR_DECODER_DRAFT_REQUIRED)
        return tsr_error_set_at(err, TSR_E_INVALID, dec->loc, "decoder: '%s' declares draft_use "
                                "%d, which is not a tsr_decoder_draft_use (0, 1 or 2)", desc->name,
                                (int)use);
    if (use == TSR_DECODER_DRAFT_NONE && cfg->draft)
        return tsr_error_set_at(err, TSR_E_INVALID, cfg->draft->loc, "draft: the decoder '%s' does "
                                "not use a draft model; choose a decoder that drafts, or remove "
                                "the draft", desc->name);
    if (use == TSR_DECODER_DRAFT_REQUIRED && !cfg->draft)
        return tsr_error_set_at(err, TSR_E_INVALID, dec->loc, "decoder: '%s' needs a draft model: "
                                "add a draft: section (draft.model: FILE, or draft.skip_layers: "
                                "[...] to draft with the target's own layers)", desc->name);
    return TSR_OK;
}

tsr_status tsr_config_bind(tsr_config *cfg, tsr_plugin_find_fn find, void *find_ctx,
                           tsr_error *err) {
    const tsr_plugin_desc *decoder = NULL;
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
        tsr_stage_conf *sc = &cfg->stage[s];
        if (!sc->plugin && !default_plugin[s]) {
            char key[EXCERPT];
            if (sc->n_params > 0)
                return tsr_error_set_at(err, TSR_E_INVALID, sc->params[0].loc,
                                        "%s.%s: parameter given but no %s plugin chosen; set "
                                        "%s.plugin",
                                        stage_names[s],
                                        tsr_text_excerpt(key, sizeof key, sc->params[0].key),
                                        stage_names[s], stage_names[s]);
            continue;
        }
        if (!sc->plugin) {
            sc->plugin = strdup(default_plugin[s]);
            if (!sc->plugin) return oom(err);
            sc->loc = (tsr_src_loc){cfg->path, 0, 0};
        }
        tsr_status st = bind_stage(sc, s, stage_names[s], cfg->role_value[s], find, find_ctx,
                                   s == TSR_STAGE_DECODER ? &decoder : NULL, err);
        if (st < 0) return st;
    }
    for (size_t i = 0; i < cfg->n_layers; i++) {
        for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++) {
            tsr_stage_conf *sc = &cfg->layers[i].stage[s];
            if (!sc->plugin) continue;
            char section[64];
            snprintf(section, sizeof section, "layers[%zu].%s", i, stage_names[s]);
            tsr_status st = bind_stage(sc, s, section, NULL, find, find_ctx, NULL, err);
            if (st < 0) return st;
        }
    }
    tsr_status st = cfg->draft ? bind_draft(cfg, find, find_ctx, err) : TSR_OK;
    return st < 0 ? st : check_draft_use(cfg, decoder, err);
}

const tsr_stage_conf *tsr_config_stage_at(const tsr_config *cfg, int32_t stage, int32_t layer) {
    if (!tsr_stage_name(stage)) return NULL;
    for (size_t i = cfg->n_layers; i-- > 0;) {
        const tsr_layer_override *lo = &cfg->layers[i];
        if (layer >= lo->first && layer <= lo->last && lo->stage[stage].plugin)
            return &lo->stage[stage];
    }
    return &cfg->stage[stage];
}

void tsr_config_free(tsr_config *cfg) {
    if (!cfg) return;
    tsr_config_free(cfg->draft);
    free(cfg->skip_layers);
    for (int32_t s = 0; s <= TSR_STAGE_COUNT; s++) stage_conf_free(&cfg->stage[s]);
    for (size_t i = 0; i < cfg->n_layers; i++)
        for (int32_t s = 0; s <= TSR_STAGE_COUNT; s++) stage_conf_free(&cfg->layers[i].stage[s]);
    free(cfg->layers);
    for (size_t i = 0; i < cfg->n_hooks; i++) {
        free(cfg->hooks[i].command);
        for (size_t a = 0; a < cfg->hooks[i].n_args; a++) free(cfg->hooks[i].args[a]);
        free(cfg->hooks[i].args);
    }
    free(cfg->hooks);
    for (size_t i = 0; i < cfg->n_plugin_dirs; i++) free(cfg->plugin_dirs[i]);
    free(cfg->plugin_dirs);
    free(cfg->model_path);
    free(cfg->tokenizer_path);
    free(cfg->generate.prompt);
    for (int32_t s = 0; s <= TSR_STAGE_COUNT; s++)
        for (int32_t r = 0; r < TSR_PARAM_ROLE_COUNT; r++) {
            free(cfg->role_value[s][r].text);
            free(cfg->role_value[s][r].origin);
        }
    free(cfg->path);
    free(cfg);
}
