/* `tessera plugins ...` and `tessera validate`. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "plugin/commands.h"
#include "config/params.h"
#include "plugin/stage_init.h"

void tsr_cli_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("tessera: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

bool tsr_cli_is_help(const char *arg) { return !strcmp(arg, "-h") || !strcmp(arg, "--help"); }

int tsr_cli_take_plugin_dir(const char *cmd, int argc, char **argv, int *i,
                            tsr_cli_plugin_dirs *dirs) {
    if (strcmp(argv[*i], "--plugin-dir") != 0) return 0;
    if (dirs->n == TSR_CLI_MAX_PLUGIN_DIRS) {
        tsr_cli_error("%s: --plugin-dir: at most %d folders", cmd, TSR_CLI_MAX_PLUGIN_DIRS);
        return -1;
    }
    const char *dir = tsr_cli_value(cmd, argc, argv, i, "DIR");
    if (!dir) return -1;
    dirs->dir[dirs->n++] = dir;
    return 1;
}

tsr_registry *tsr_cli_registry(tsr_pool *pool, const tsr_cli_plugin_dirs *dirs,
                               const tsr_config *cfg) {
    tsr_registry *reg = tsr_registry_create(pool);
    if (!reg) return NULL;
    for (size_t i = 0; dirs && i < dirs->n; i++)
        tsr_registry_add_dir(reg, dirs->dir[i], "--plugin-dir", true);
    if (cfg && cfg->n_plugin_dirs) {
        char origin[1024];
        snprintf(origin, sizeof origin, "plugin_dirs of %s", cfg->path);
        for (size_t i = 0; i < cfg->n_plugin_dirs; i++)
            tsr_registry_add_dir(reg, cfg->plugin_dirs[i], origin, true);
    }
    tsr_registry_add_default_dirs(reg);
    for (size_t i = 0; i < tsr_registry_n_warnings(reg); i++)
        fprintf(stderr, "tessera: warning: %s\n", tsr_registry_warning(reg, i));
    return reg;
}

static const tsr_plugin_desc *find_plugin(void *reg, int32_t stage, const char *name,
                                          tsr_error *why) {
    const tsr_plugin_ref *ref = tsr_registry_lookup(reg, stage, name, why);
    return ref ? ref->desc : NULL;
}

tsr_status tsr_cli_bind(tsr_config *cfg, tsr_registry *reg, tsr_error *err) {
    return tsr_config_bind(cfg, find_plugin, reg, err);
}

static void plugins_usage(FILE *f) {
    fprintf(f,
            "usage: tessera plugins [--plugin-dir DIR]... list\n"
            "       tessera plugins [--plugin-dir DIR]... info NAME\n"
            "       tessera plugins [--plugin-dir DIR]... call NAME FUNC [ARGS...]\n"
            "\n"
            "A plugin NAME of stage STAGE is the file STAGE-NAME.so of the first folder that\n"
            "has one, among: the --plugin-dir folders (up to %d), TESSERA_PLUGIN_PATH\n"
            "(colon-separated), then the install folder (or the build's plugin folder, for a\n"
            "program run from its build tree); `tessera -vv` shows the folders. `list` opens\n"
            "every plugin file of those folders (never other shared objects); `info` and\n"
            "`call` open the one file of NAME. `call` runs a command the plugin exports (see\n"
            "`info`) on a fresh instance with default parameters.\n",
            TSR_CLI_MAX_PLUGIN_DIRS);
}

/* Opens every plugin file of the search folders and says which could not be loaded. */
static void load_all(tsr_registry *reg) {
    tsr_registry_load_all(reg);
    for (size_t i = 0; i < tsr_registry_n_diagnostics(reg); i++)
        fprintf(stderr, "tessera: warning: %s\n", tsr_registry_diagnostic(reg, i));
}

/* The plugin NAME of any stage: by its file name, else among all plugin files (a plugin whose
 * file is named otherwise); NULL after an error line. */
static const tsr_plugin_ref *find_any(tsr_registry *reg, const char *name) {
    tsr_error why;
    const tsr_plugin_ref *r = tsr_registry_lookup(reg, 0, name, &why);
    if (!r && !why.msg[0]) {
        load_all(reg);
        r = tsr_registry_find(reg, 0, name);
    }
    if (r) return r;
    if (why.msg[0]) tsr_cli_error("%s", why.msg);
    else tsr_cli_error("no plugin named '%s' (see `tessera plugins list`)", name);
    return NULL;
}

static int plugins_list(tsr_registry *reg) {
    load_all(reg);
    size_t n = tsr_registry_count(reg);
    printf("%-20s %-10s %-8s %-6s %s\n", "NAME", "STAGE", "VERSION", "USABLE", "DESCRIPTION");
    for (int32_t stage = 1; stage <= TSR_STAGE_COUNT; stage++)
        for (size_t i = 0; i < n; i++) {
            const tsr_plugin_ref *r = tsr_registry_at(reg, i);
            if (r->desc->stage != stage) continue;
            printf("%-20s %-10s %-8s %-6s %s\n", r->desc->name, tsr_stage_name(stage),
                   r->desc->version ? r->desc->version : "-", r->score > 0 ? "yes" : "no",
                   r->desc->description ? r->desc->description : "");
        }
    if (n == 0) printf("(no plugins found)\n");
    return TSR_EXIT_OK;
}

static int plugins_info(tsr_registry *reg, const char *name) {
    const tsr_plugin_ref *r = find_any(reg, name);
    if (!r) return TSR_EXIT_FAIL;
    const tsr_plugin_desc *d = r->desc;
    printf("%s %s: %s\n", d->name, d->version ? d->version : "", d->description ? d->description : "");
    printf("  stage:    %s (ABI %u.%u needed, host has %u.%u)\n", tsr_stage_name(d->stage),
           d->stage_major, d->stage_minor_needed, tsr_stage_abi_major(d->stage),
           tsr_stage_abi_minor(d->stage));
    printf("  file:     %s\n", r->path);
    if (r->score > 0) printf("  usable:   yes (score %d)\n", r->score);
    else printf("  usable:   no: %s\n", r->unusable);
    printf("parameters:\n");
    if (d->n_params) tsr_param_table_print(stdout, d->params, d->n_params);
    else printf("  (none)\n");
    if (d->n_commands) {
        printf("commands:\n");
        for (uint32_t i = 0; i < d->n_commands; i++)
            printf("  %-16s %-10s %s\n", d->commands[i].name, d->commands[i].signature,
                   d->commands[i].doc ? d->commands[i].doc : "");
    }
    return TSR_EXIT_OK;
}

static int plugins_call(tsr_registry *reg, tsr_pool *pool, int argc, char **argv) {
    const char *name = argv[0], *func = argv[1];
    const tsr_plugin_ref *r = find_any(reg, name);
    if (!r) return TSR_EXIT_FAIL;
    const tsr_command *cmd = tsr_command_find(r->desc, func);
    if (!cmd) {
        tsr_cli_error("plugin '%s' has no command '%s' (see `tessera plugins info %s`)", name,
                      func, name);
        return TSR_EXIT_FAIL;
    }
    tsr_error err;
    tsr_instance *inst = NULL;
    tsr_bound_params bound = {0};
    int status = TSR_EXIT_FAIL;
    if (strstr(cmd->signature, "(I")) {
        if (tsr_params_bind(r->desc->params, r->desc->n_params, r->desc->name,
                            tsr_stage_name(r->desc->stage), (tsr_src_loc){"defaults", 0, 0},
                            NULL, 0, &bound, &err) < 0)
            goto fail;
        tsr_model_shape shape = tsr_model_shape_synthetic();
        tsr_stage_init init;
        if (tsr_instance_create(r, pool, &bound.params,
                                tsr_stage_init_fill(r->desc->stage, &shape, &init), &inst,
                                &err) < 0)
            goto fail;
    }
    char ret[4096];
    if (tsr_command_call(cmd, inst ? inst->self : NULL, (const char *const *)argv + 2,
                         (size_t)argc - 2, ret, sizeof ret, &err) < 0) {
        if (inst) {
            const char *why = tsr_services_take_error(&inst->services, NULL);
            if (why) snprintf(err.msg + strlen(err.msg), sizeof err.msg - strlen(err.msg), ": %s", why);
        }
        goto fail;
    }
    if (*ret) printf("%s\n", ret);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    tsr_instance_destroy(inst);
    tsr_bound_params_free(&bound);
    return status;
}

int tsr_cli_plugins(int argc, char **argv) {
    tsr_cli_plugin_dirs dirs = {0};
    /* The arguments other than options move to argv[1..n]; those after `call NAME FUNC` are
     * the command's own and are taken as they are. */
    int n = 0;
    for (int i = 1; i < argc; i++) {
        bool own = n >= 3 && !strcmp(argv[1], "call");
        int took = own ? 0 : tsr_cli_take_plugin_dir("plugins", argc, argv, &i, &dirs);
        if (took < 0) return TSR_EXIT_USAGE;
        if (!own && n == 0 && tsr_cli_is_help(argv[i])) {
            plugins_usage(stdout);
            return TSR_EXIT_OK;
        }
        if (!took) argv[1 + n++] = argv[i];
    }
    const char *sub = n > 0 ? argv[1] : "";
    int need = !strcmp(sub, "list") ? 1 : !strcmp(sub, "info") ? 2 : !strcmp(sub, "call") ? 3 : 0;
    if (need == 0 || n < need || (need < 3 && n != need)) {
        plugins_usage(stderr);
        return TSR_EXIT_USAGE;
    }
    tsr_pool *pool = tsr_pool_create(1);
    tsr_registry *reg = tsr_cli_registry(pool, &dirs, NULL);
    int status;
    if (need == 1) status = plugins_list(reg);
    else if (need == 2) status = plugins_info(reg, argv[2]);
    else status = plugins_call(reg, pool, n - 1, argv + 2);
    tsr_registry_free(reg);
    tsr_pool_free(pool);
    return status;
}

/* Checks that each hook names a configured stage, an existing command of its plugin, and
 * arguments that suit the command's signature. */
static tsr_status check_hooks(const tsr_config *cfg, tsr_registry *reg, tsr_error *err) {
    for (size_t i = 0; i < cfg->n_hooks; i++) {
        const tsr_hook_conf *h = &cfg->hooks[i];
        const tsr_stage_conf *sc = &cfg->stage[h->stage];
        const tsr_plugin_ref *r = sc->plugin ? tsr_registry_find(reg, h->stage, sc->plugin) : NULL;
        if (!r)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s:%d:%d: hooks: stage '%s' has no plugin configured",
                                 h->loc.file, h->loc.line, h->loc.col, tsr_stage_name(h->stage));
        const tsr_command *cmd = tsr_command_find(r->desc, h->command);
        if (!cmd)
            return tsr_error_set(err, TSR_E_INVALID,
                                 "%s:%d:%d: hooks: plugin '%s' has no command '%s'", h->loc.file,
                                 h->loc.line, h->loc.col, sc->plugin, h->command);
    }
    return TSR_OK;
}

/* The files a run would open first: a config naming a model that is not there is not one
 * that runs. */
static tsr_status check_files(const tsr_config *cfg, tsr_error *err) {
    const char *keys[] = {"model.path", "model.tokenizer", "draft.model", "draft.tokenizer"};
    const char *paths[] = {cfg->model_path, cfg->tokenizer_path,
                           cfg->draft ? cfg->draft->model_path : NULL,
                           cfg->draft ? cfg->draft->tokenizer_path : NULL};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        struct stat st;
        if (!paths[i]) continue;
        if (stat(paths[i], &st) != 0)
            return tsr_error_set(err, TSR_E_IO, "%s: %s: %s: %s", cfg->path, keys[i], paths[i],
                                 strerror(errno));
        if (S_ISDIR(st.st_mode))
            return tsr_error_set(err, TSR_E_INVALID, "%s: %s: %s: is a folder; expected a file",
                                 cfg->path, keys[i], paths[i]);
    }
    return TSR_OK;
}

int tsr_cli_validate(int argc, char **argv) {
    const char *path = NULL;
    const char **sets = calloc((size_t)argc, sizeof *sets);
    size_t n_sets = 0;
    tsr_cli_plugin_dirs dirs = {0};
    for (int i = 1; i < argc; i++) {
        if (tsr_cli_is_help(argv[i])) {
            printf("usage: tessera validate CONFIG.yaml [--set K=V]... [--plugin-dir DIR]...\n"
                   "Checks the file's shape, that every plugin exists, every parameter value\n"
                   "against the plugin's declared parameters, and that the model and tokenizer\n"
                   "files it names (the draft's too) exist. Only the plugins the pipeline names\n"
                   "are loaded (see tessera plugins --help for the search).\n");
            free(sets);
            return TSR_EXIT_OK;
        }
        int took = tsr_cli_take_plugin_dir("validate", argc, argv, &i, &dirs);
        if (took == 0 && !strcmp(argv[i], "--set"))
            took = (sets[n_sets++] = tsr_cli_value("validate", argc, argv, &i,
                                                   "SECTION.KEY=VALUE")) ? 1 : -1;
        else if (took == 0 && !path && argv[i][0] != '-') path = argv[i];
        else if (took == 0) took = (tsr_cli_bad_arg("validate", argv[i]), -1);
        if (took < 0) {
            free(sets);
            return TSR_EXIT_USAGE;
        }
    }
    if (!path) {
        tsr_cli_error("validate: no CONFIG.yaml given (see tessera validate --help)");
        free(sets);
        return TSR_EXIT_USAGE;
    }
    tsr_error err;
    tsr_config *cfg = NULL;
    tsr_registry *reg = NULL;
    tsr_pool *pool = NULL;
    int status = TSR_EXIT_FAIL;
    if (tsr_config_load(path, &cfg, &err) < 0) goto fail;
    for (size_t i = 0; i < n_sets; i++)
        if (tsr_config_set(cfg, sets[i], &err) < 0) goto fail;
    pool = tsr_pool_create(1);
    reg = tsr_cli_registry(pool, &dirs, cfg);
    if (tsr_cli_bind(cfg, reg, &err) < 0) goto fail;
    if (check_hooks(cfg, reg, &err) < 0) goto fail;
    if (check_files(cfg, &err) < 0) goto fail;
    printf("%s: ok\n", path);
    status = TSR_EXIT_OK;
    goto done;
fail:
    tsr_cli_error("%s", err.msg);
done:
    tsr_config_free(cfg);
    tsr_registry_free(reg);
    tsr_pool_free(pool);
    free(sets);
    return status;
}
