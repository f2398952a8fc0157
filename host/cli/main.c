/* tessera: the command-line program. Subcommands live in cli_*.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/attention.h>
#include <tessera/backend.h>
#include <tessera/cache.h>
#include <tessera/decoder.h>
#include <tessera/quantizer.h>
#include <tessera/router.h>

#include "cli/cli.h"
#include "plugin/host_services.h"
#include "base/version.h"

static void print_version(void) {
    printf("tessera %s\n", TESSERA_VERSION);
    printf("plugin ABI: common %d.%d", TSR_COMMON_ABI_MAJOR, TSR_COMMON_ABI_MINOR);
    for (int32_t s = 1; s <= TSR_STAGE_COUNT; s++)
        printf(", %s %u.%u", tsr_stage_name(s), tsr_stage_abi_major(s), tsr_stage_abi_minor(s));
    printf("\n");
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: tessera [-v]... <command> [args]\n"
            "\n"
            "commands:\n"
            "  run [CONFIG] -m MODEL [-p PROMPT] [-n N] [--set K=V]...  generate text\n"
            "  logits -m MODEL [CONFIG] --tokens \"IDS\" --out FILE     raw float32 logits\n"
            "  tokenize -m MODEL (-p TEXT | -f FILE) [--no-bos]         token ids of a text\n"
            "  bench -m MODEL [CONFIG] [-p 512] [-n 128] [-t 1,2] [--json] speed, roofline\n"
            "  perplexity -m MODEL [CONFIG] -f TEXT [--ctx N] [--json]  quality on a text\n"
            "             [--ubatch N] [--kl-base FILE [--kl]]          fed in pieces; KL\n"
            "  compare -m MODEL CONFIG... -f TEXT [--budget B,...]      pipelines side by side\n"
            "             [--plot FILE.svg] [--json]                    (cache budgets)\n"
            "  profile-heads -m MODEL [CONFIG] -f TEXT [--out FILE]     retrieval/streaming heads\n"
            "  experts -m MODEL [CONFIG] -f TEXT [--json]               each expert's use\n"
            "  quantize IN OUT TYPE [--config CONFIG] [--set K=V]...   write a quantized GGUF\n"
            "  synth --shape NAME --type TYPE -o FILE                 random model of a real shape\n"
            "  plugins list | info NAME | call NAME FUNC [ARGS...]   the plugins found\n"
            "  validate CONFIG.yaml [--set K=V]...                      check a pipeline\n"
            "Every command that loads plugins takes --plugin-dir DIR (repeatable): folders\n"
            "searched before the others (see `tessera plugins --help`).\n"
            "\n"
            "options:\n"
            "  -v, --verbose   more log lines on stderr: -v info, -vv (or -v -v) debug,\n"
            "                  which shows every plugin folder searched and why one is skipped\n"
            "  --version       host version and the version of each plugin ABI\n"
            "  -h, --help      this text; `tessera <command> --help` for a command\n"
            "\n"
            "environment:\n"
            "  TESSERA_PLUGIN_PATH  colon-separated plugin folders, searched after --plugin-dir\n"
            "                       and a config's plugin_dirs, before the install folder\n"
            "  TESSERA_LOG          info or debug: the log level without -v\n"
            "  TESSERA_CPU_LEVEL    scalar, avx2 or avx512: caps the CPU kernels' instruction\n"
            "                       set (never above what the machine has)\n"
            "  TESSERA_NO_DLCLOSE   set (to anything): plugin objects stay mapped at exit, so\n"
            "                       leak reports (LeakSanitizer) can name plugin frames\n");
}

/* -v, -vv, -vvv...: how many levels of logging to add; 0 when `arg` is not one. */
static int verbosity(const char *arg) {
    if (!strcmp(arg, "--verbose")) return 1;
    if (arg[0] != '-' || arg[1] != 'v') return 0;
    int n = 0;
    for (const char *c = arg + 1; *c; c++, n++)
        if (*c != 'v') return 0;
    return n;
}

/* Output lost on the way out (a full disk, /dev/full) fails a command that otherwise worked. */
static int finish(int status) {
    return status == TSR_EXIT_OK && !tsr_cli_stdout_ok() ? TSR_EXIT_FAIL : status;
}

int main(int argc, char **argv) {
    int level = TSR_LOG_WARN;
    const char *env = getenv("TESSERA_LOG");
    if (env && !strcmp(env, "info")) level = TSR_LOG_INFO;
    else if (env && !strcmp(env, "debug")) level = TSR_LOG_DEBUG;
    else if (env && *env)
        fprintf(stderr, "tessera: warning: TESSERA_LOG='%s' is not info or debug; ignored\n", env);
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (verbosity(argv[i]) > 0) {
            level += verbosity(argv[i]);
        } else if (!strcmp(argv[i], "--version")) {
            print_version();
            return finish(TSR_EXIT_OK);
        } else if (tsr_cli_is_help(argv[i])) {
            usage(stdout);
            return finish(TSR_EXIT_OK);
        } else {
            tsr_cli_error("unknown option '%s' (see tessera --help)", argv[i]);
            return TSR_EXIT_USAGE;
        }
    }
    tsr_log_set_level(level);
    if (i == argc) {
        usage(stderr);
        return TSR_EXIT_USAGE;
    }
    const char *cmd = argv[i];
    int sub_argc = argc - i;
    char **sub_argv = argv + i;
    if (!strcmp(cmd, "run")) return finish(tsr_cli_run(sub_argc, sub_argv));
    if (!strcmp(cmd, "logits")) return finish(tsr_cli_logits(sub_argc, sub_argv));
    if (!strcmp(cmd, "tokenize")) return finish(tsr_cli_tokenize(sub_argc, sub_argv));
    if (!strcmp(cmd, "bench")) return finish(tsr_cli_bench(sub_argc, sub_argv));
    if (!strcmp(cmd, "perplexity")) return finish(tsr_cli_perplexity(sub_argc, sub_argv));
    if (!strcmp(cmd, "compare")) return finish(tsr_cli_compare(sub_argc, sub_argv));
    if (!strcmp(cmd, "profile-heads")) return finish(tsr_cli_profile_heads(sub_argc, sub_argv));
    if (!strcmp(cmd, "experts")) return finish(tsr_cli_experts(sub_argc, sub_argv));
    if (!strcmp(cmd, "quantize")) return finish(tsr_cli_quantize(sub_argc, sub_argv));
    if (!strcmp(cmd, "synth")) return finish(tsr_cli_synth(sub_argc, sub_argv));
    if (!strcmp(cmd, "plugins")) return finish(tsr_cli_plugins(sub_argc, sub_argv));
    if (!strcmp(cmd, "validate")) return finish(tsr_cli_validate(sub_argc, sub_argv));
    tsr_cli_error("unknown command '%s' (see tessera --help)", cmd);
    return TSR_EXIT_USAGE;
}
