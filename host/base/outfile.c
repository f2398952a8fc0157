#include "base/outfile.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- removal of temporary files on a fatal signal --------------------------------------- */

/* The temporary files that exist now, for the signal handler. A slot is claimed (CLAIMED) by
 * the thread creating a file and handed to the handler (ARMED) once its path is complete;
 * only lock-free atomics and unlink() are touched from the handler. */
enum { SLOT_FREE = 0, SLOT_CLAIMED = 1, SLOT_ARMED = 2, N_SLOTS = 8 };
static struct {
    atomic_int state;
    char path[PATH_MAX];
} pending[N_SLOTS];

static const int fatal_signals[] = {SIGINT, SIGTERM, SIGHUP};

static void remove_pending_and_die(int sig) {
    int saved = errno;
    for (int i = 0; i < N_SLOTS; i++)
        if (atomic_load(&pending[i].state) == SLOT_ARMED) unlink(pending[i].path);
    errno = saved;
    /* SA_RESETHAND restored the default action: the signal, pending until this handler
     * returns, ends the process as if no handler had run. */
    raise(sig);
}

static void install_handlers(void) {
    static atomic_flag installed = ATOMIC_FLAG_INIT;
    if (atomic_flag_test_and_set(&installed)) return;
    for (size_t i = 0; i < sizeof fatal_signals / sizeof fatal_signals[0]; i++) {
        struct sigaction old, sa = {.sa_handler = remove_pending_and_die,
                                    .sa_flags = SA_RESETHAND};
        sigemptyset(&sa.sa_mask);
        /* A program that handles or ignores the signal itself keeps doing so. */
        if (sigaction(fatal_signals[i], NULL, &old) == 0 && old.sa_handler == SIG_DFL)
            sigaction(fatal_signals[i], &sa, NULL);
    }
}

/* Creating and renaming a temporary file happen with the fatal signals held back, so the
 * handler never sees a file that exists but is not listed, or one listed but already gone. */
static void hold_signals(sigset_t *old) {
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof fatal_signals / sizeof fatal_signals[0]; i++)
        sigaddset(&set, fatal_signals[i]);
    pthread_sigmask(SIG_BLOCK, &set, old);
}

static void release_signals(const sigset_t *old) { pthread_sigmask(SIG_SETMASK, old, NULL); }

/* Lists `path` for the handler; returns 1 + the slot, or 0 when every slot is taken or the
 * path is too long (the file is then not removed on a signal, nothing worse). */
static int arm_slot(const char *path) {
    if (strlen(path) >= PATH_MAX) return 0;
    for (int i = 0; i < N_SLOTS; i++) {
        int expected = SLOT_FREE;
        if (!atomic_compare_exchange_strong(&pending[i].state, &expected, SLOT_CLAIMED)) continue;
        strcpy(pending[i].path, path);
        atomic_store(&pending[i].state, SLOT_ARMED);
        return i + 1;
    }
    return 0;
}

static void disarm_slot(tsr_outfile *o) {
    if (o->slot > 0) atomic_store(&pending[o->slot - 1].state, SLOT_FREE);
    o->slot = 0;
}

/* ---- the output file --------------------------------------------------------------------- */

static bool same_file(const struct stat *a, const struct stat *b) {
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* "<folder of target>/.<name of target>.XXXXXX", malloc'd. */
static char *temp_template(const char *target) {
    const char *slash = strrchr(target, '/');
    size_t dir_len = slash ? (size_t)(slash - target) + 1 : 0;
    const char *name = target + dir_len;
    size_t n = dir_len + strlen(name) + 9;
    char *t = malloc(n);
    if (t) snprintf(t, n, "%.*s.%s.XXXXXX", (int)dir_len, target, name);
    return t;
}

/* The mode a new file gets from open(..., 0666): umask can only be read by setting it, and no
 * other thread of this program creates files meanwhile. */
static mode_t new_file_mode(void) {
    mode_t mask = umask(0);
    umask(mask);
    return 0666 & ~mask;
}

static tsr_status outfile_clear(tsr_outfile *o, tsr_status st) {
    free(o->path);
    free(o->target);
    free(o->tmp);
    memset(o, 0, sizeof *o);
    return st;
}

static tsr_status open_temp(tsr_outfile *o, const struct stat *existing, tsr_error *err) {
    /* Through a link, the file it names is replaced and the link kept. */
    o->target = existing ? realpath(o->path, NULL) : strdup(o->path);
    if (!o->target)
        return tsr_error_set(err, existing ? TSR_E_IO : TSR_E_NOMEM, "%s: cannot resolve: %s",
                             o->path, strerror(errno));
    if (!(o->tmp = temp_template(o->target)))
        return tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory", o->path);
    install_handlers();
    sigset_t held;
    hold_signals(&held);
    int fd = mkostemp(o->tmp, O_CLOEXEC);
    int e = errno;
    if (fd >= 0) o->slot = arm_slot(o->tmp);
    release_signals(&held);
    if (fd < 0) {
        free(o->tmp);
        o->tmp = NULL;
        return tsr_error_set(err, TSR_E_IO, "%s: cannot create: %s", o->path, strerror(e));
    }
    if (fchmod(fd, existing ? existing->st_mode & 0777 : new_file_mode()) != 0 ||
        !(o->f = fdopen(fd, "wb"))) {
        e = errno;
        close(fd);
        tsr_outfile_discard(o);
        return tsr_error_set(err, TSR_E_IO, "%s: cannot create: %s", o->path, strerror(e));
    }
    return TSR_OK;
}

tsr_status tsr_outfile_open(tsr_outfile *o, const char *path, const char *input, tsr_error *err) {
    memset(o, 0, sizeof *o);
    struct stat st, in;
    if (!*path) return tsr_error_set(err, TSR_E_INVALID, "the output file name is empty");
    bool exists = stat(path, &st) == 0;
    if (!exists && errno != ENOENT)
        return tsr_error_set(err, TSR_E_IO, "%s: cannot write: %s", path, strerror(errno));
    /* Replacing the link would put the file somewhere the user did not mean it to go. */
    if (!exists && lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
        return tsr_error_set(err, TSR_E_INVALID, "%s: is a link to a file that does not exist; "
                             "give the file's own name", path);
    if (exists && S_ISDIR(st.st_mode))
        return tsr_error_set(err, TSR_E_INVALID, "%s: is a folder; expected a file name", path);
    if (exists && input && stat(input, &in) == 0 && same_file(&st, &in))
        return tsr_error_set(err, TSR_E_INVALID, "%s: is the input file %s; write the output to "
                             "another file", path, input);
    if (!(o->path = strdup(path))) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    if (!exists || S_ISREG(st.st_mode)) {
        tsr_status s = open_temp(o, exists ? &st : NULL, err);
        return s < 0 ? outfile_clear(o, s) : TSR_OK;
    }
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || !(o->f = fdopen(fd, "wb"))) {
        int e = errno;
        if (fd >= 0) close(fd);
        tsr_error_set(err, TSR_E_IO, "%s: cannot open for writing: %s", path, strerror(e));
        return outfile_clear(o, TSR_E_IO);
    }
    return TSR_OK;
}

bool tsr_outfile_write(tsr_outfile *o, const void *data, size_t size) {
    if (o->write_errno) return false;
    errno = 0;
    if (size > 0 && fwrite(data, 1, size, o->f) != size) {
        o->write_errno = errno ? errno : EIO;
        return false;
    }
    return true;
}

tsr_status tsr_outfile_commit(tsr_outfile *o, tsr_error *err) {
    int e = o->write_errno;
    if (!e && fflush(o->f) != 0) e = errno;
    /* Devices and FIFOs have nothing to sync (fsync fails on them with EINVAL). */
    if (!e && o->tmp && fsync(fileno(o->f)) != 0) e = errno;
    if (fclose(o->f) != 0 && !e) e = errno;
    o->f = NULL;
    if (e) {
        tsr_error_set(err, TSR_E_IO, "%s: cannot write: %s", o->path, strerror(e));
        tsr_outfile_discard(o);
        return TSR_E_IO;
    }
    if (o->tmp) {
        sigset_t held;
        hold_signals(&held);
        if (rename(o->tmp, o->target) != 0) {
            e = errno;
            unlink(o->tmp);
        }
        disarm_slot(o);
        release_signals(&held);
    }
    if (e) tsr_error_set(err, TSR_E_IO, "%s: cannot replace it with the written file: %s",
                         o->path, strerror(e));
    free(o->tmp);
    o->tmp = NULL;
    tsr_outfile_discard(o);
    return e ? TSR_E_IO : TSR_OK;
}

void tsr_outfile_discard(tsr_outfile *o) {
    if (o->f) fclose(o->f);
    if (o->tmp) {
        sigset_t held;
        hold_signals(&held);
        unlink(o->tmp);
        disarm_slot(o);
        release_signals(&held);
    }
    outfile_clear(o, TSR_OK);
}

bool tsr_outfile_is_stdout(const tsr_outfile *o) {
    struct stat a, b;
    return o->f && !o->tmp && fstat(fileno(o->f), &a) == 0 && fstat(STDOUT_FILENO, &b) == 0 &&
           same_file(&a, &b);
}
