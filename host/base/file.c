#include "base/file.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a folder";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "a special file";
}

int tsr_file_open_regular(const char *path, uint64_t *size, tsr_error *err) {
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (the flag does
     * not change how a regular file reads). The type is checked on the open descriptor, so
     * the path cannot be swapped in between. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return tsr_error_set(err, TSR_E_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return tsr_error_set(err, TSR_E_IO, "%s: %s, not a regular file", path,
                             file_kind(st.st_mode));
    }
    if (size) *size = (uint64_t)st.st_size;
    return fd;
}

tsr_status tsr_file_read(const char *path, size_t max_bytes, const char *what, char **out,
                         size_t *size, tsr_error *err) {
    *out = NULL;
    *size = 0;
    uint64_t bytes;
    int fd = tsr_file_open_regular(path, &bytes, err);
    if (fd < 0) return fd;
    tsr_status rc = TSR_OK;
    char *buf = NULL;
    size_t len = 0;
    if (bytes > max_bytes) {
        rc = tsr_error_set(err, TSR_E_INVALID, "%s: %" PRIu64 " bytes; a %s has at most %zu",
                           path, bytes, what, max_bytes);
    } else if (!(buf = malloc((size_t)bytes + 1))) {
        rc = tsr_error_set(err, TSR_E_NOMEM, "%s: out of memory for %" PRIu64 " bytes", path,
                           bytes);
    } else {
        /* Up to the size seen at open: a file that grows meanwhile is read as it was. */
        while (len < bytes) {
            ssize_t got = read(fd, buf + len, (size_t)bytes - len);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) {
                rc = tsr_error_set(err, TSR_E_IO, "%s: cannot read: %s", path, strerror(errno));
                break;
            }
            if (got == 0) break;
            len += (size_t)got;
        }
    }
    close(fd);
    if (rc < 0) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *out = buf;
    *size = len;
    return TSR_OK;
}
