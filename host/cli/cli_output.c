/* What the commands print: stdout checked for lost output, progress on stderr. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "base/clock.h"
#include "cli/cli.h"

/* The first reason a flush of stdout failed: stdio keeps only the error flag, and errno is
 * long overwritten by the time the command ends. */
static int stdout_errno;

void tsr_cli_flush_stdout(void) {
    if (fflush(stdout) != 0 && !stdout_errno) stdout_errno = errno ? errno : EIO;
}

bool tsr_cli_stdout_ok(void) {
    tsr_cli_flush_stdout();
    if (!stdout_errno && !ferror(stdout)) return true;
    tsr_cli_error("stdout: cannot write: %s", strerror(stdout_errno ? stdout_errno : EIO));
    return false;
}

void tsr_cli_progress_start(tsr_cli_progress *p, const char *what, double quiet_s) {
    *p = (tsr_cli_progress){.what = what, .t0 = tsr_clock_ns(), .quiet_s = quiet_s,
                            .tty = isatty(STDERR_FILENO) == 1};
}

void tsr_cli_progress_show(tsr_cli_progress *p, int64_t done, int64_t total, const char *unit,
                           const char *extra) {
    double secs = tsr_clock_seconds_since(p->t0);
    bool last = done >= total;
    if (secs < p->quiet_s || (!p->tty && !last)) return;
    fprintf(stderr, "%stessera: %s: %lld/%lld%s%s%s%s, %.1f s%s", p->tty ? "\r" : "", p->what,
            (long long)done, (long long)total, unit ? " " : "", unit ? unit : "",
            extra ? ", " : "", extra ? extra : "", secs, last ? "\n" : "");
    p->open = p->tty && !last;
}

void tsr_cli_progress_end(tsr_cli_progress *p) {
    if (p->open) fputc('\n', stderr);
    p->open = false;
}
