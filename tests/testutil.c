#include "testutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

const char *tsr_test_data_dir(void) {
    /* The caller's TESSERA_TEST_DATA first, so `TESSERA_TEST_DATA=/elsewhere ctest` works on a
     * build configured with another folder; then the folder the build was configured with. */
    const char *names[] = {"TESSERA_TEST_DATA", "TESSERA_TEST_DATA_CONFIGURED"};
    for (int i = 0; i < 2; i++) {
        const char *dir = getenv(names[i]);
        if (dir && *dir) return dir;
    }
    return "../shared";
}

char *tsr_test_data_path(const char *rel) {
    const char *dir = tsr_test_data_dir();
    size_t n = strlen(dir) + strlen(rel) + 2;
    char *path = malloc(n);
    snprintf(path, n, "%s/%s", dir, rel);
    if (access(path, R_OK) != 0) {
        free(path);
        return NULL;
    }
    return path;
}

char *tsr_test_require_data(const char *rel) {
    char *path = tsr_test_data_path(rel);
    if (!path) {
        printf("skipped: %s/%s is absent (set TESSERA_TEST_DATA to the shared data folder)\n",
               tsr_test_data_dir(), rel);
        exit(77);
    }
    return path;
}

char *tsr_test_data(const char *rel) {
    char *path = tsr_test_data_path(rel);
    ck_assert_msg(path != NULL, "%s/%s missing", tsr_test_data_dir(), rel);
    return path;
}

char *tsr_test_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, (cap *= 2) + 1);
    }
    fclose(f);
    buf[n] = '\0';
    if (size) *size = n;
    return buf;
}

float *tsr_test_read_f32(const char *rel, size_t *n) {
    char *path = tsr_test_data(rel);
    size_t size = 0;
    float *v = (float *)tsr_test_read_file(path, &size);
    ck_assert_msg(v != NULL, "%s cannot be read", path);
    free(path);
    *n = size / sizeof *v;
    return v;
}

int tsr_test_write_file(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t put = fwrite(data, 1, size, f);
    return (fclose(f) == 0 && put == size) ? 0 : -1;
}

char *tsr_test_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/tessera-test-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpl)) return NULL;
    return strdup(tmpl);
}

char *tsr_test_tmp_path(const char *name) {
    char *dir = tsr_test_tmpdir();
    ck_assert_ptr_nonnull(dir);
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = malloc(n);
    ck_assert_ptr_nonnull(path);
    snprintf(path, n, "%s/%s", dir, name);
    free(dir);
    return path;
}

char *tsr_test_fifo(void) {
    char *path = tsr_test_tmp_path("fifo");
    if (mkfifo(path, 0600) != 0) {
        free(path);
        return NULL;
    }
    return path;
}

int tsr_test_count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

/* Drains both pipes together so a child that fills one does not block. */
static void drain(int fd_out, int fd_err, char **out, char **err) {
    struct pollfd fds[2] = {{fd_out, POLLIN, 0}, {fd_err, POLLIN, 0}};
    char *bufs[2] = {NULL, NULL};
    size_t lens[2] = {0, 0};
    int open_fds = 2;
    while (open_fds > 0) {
        if (poll(fds, 2, -1) < 0) break;
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char chunk[8192];
            ssize_t got = read(fds[i].fd, chunk, sizeof chunk);
            if (got <= 0) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_fds--;
                continue;
            }
            bufs[i] = realloc(bufs[i], lens[i] + (size_t)got + 1);
            memcpy(bufs[i] + lens[i], chunk, (size_t)got);
            lens[i] += (size_t)got;
        }
    }
    for (int i = 0; i < 2; i++)
        if (!bufs[i]) bufs[i] = calloc(1, 1);
        else bufs[i][lens[i]] = '\0';
    if (out) *out = bufs[0]; else free(bufs[0]);
    if (err) *err = bufs[1]; else free(bufs[1]);
}

int tsr_test_run(char *const argv[], char **out, char **err) {
    int po[2], pe[2];
    if (pipe(po) != 0 || pipe(pe) != 0) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        close(po[0]); close(pe[0]); close(po[1]); close(pe[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    drain(po[0], pe[0], out, err);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int tsr_test_tessera(char **out, char **err, const char *const *args) {
    char *argv[64];
    int n = 0;
    argv[n++] = (char *)tsr_test_env("TESSERA_BIN");
    for (; args[n - 1] && n < 63; n++) argv[n] = (char *)args[n - 1];
    argv[n] = NULL;
    return tsr_test_run(argv, out, err);
}

int tsr_test_synth(const char *shape, const char *type, const char *path) {
    char *err = NULL;
    const char *args[] = {"synth", "--shape", shape, "--type", type, "-o", path, NULL};
    int status = tsr_test_tessera(NULL, &err, args);
    if (status != 0) fprintf(stderr, "tessera synth --shape %s failed: %s\n", shape, err ? err : "");
    free(err);
    return status;
}

int tsr_test_tessera_sh(char **out, char **err, const char *shell_tail, const char *const *args) {
    char script[4096];
    /* "$0" "$@" pass the program and its arguments through without any quoting. */
    snprintf(script, sizeof script, "\"$0\" \"$@\" %s", shell_tail);
    char *argv[68] = {"/bin/sh", "-c", script, (char *)tsr_test_env("TESSERA_BIN")};
    int n = 4;
    for (; args[n - 4] && n < 67; n++) argv[n] = (char *)args[n - 4];
    argv[n] = NULL;
    return tsr_test_run(argv, out, err);
}

Suite *tsr_test_suite(const char *name, const tsr_test_case *cases, size_t n) {
    Suite *s = suite_create(name);
    for (size_t i = 0; i < n; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_add_test(tc, cases[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int tsr_test_run_suite(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

uint64_t tsr_test_rng_u64(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545f4914f6cdd1dull;
}

float tsr_test_rng_unit(uint64_t *state) {
    return (float)((double)(tsr_test_rng_u64(state) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

const char *tsr_test_env(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v) {
        fprintf(stderr, "test environment variable %s is not set (run the tests through ctest)\n", name);
        abort();
    }
    return v;
}
