#include "plugin/trust.h"

#include <errno.h>
#include <grp.h>
#include <libgen.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* How an entry is judged: the file itself, the folder searched for plugins, or a folder above
 * either of them. */
typedef enum entry_role { ENTRY_FILE, ENTRY_SEARCHED, ENTRY_ABOVE } entry_role;

static void user_name(uid_t uid, char *out, size_t cap) {
    char buf[4096];
    struct passwd pw, *found = NULL;
    if (getpwuid_r(uid, &pw, buf, sizeof buf, &found) == 0 && found)
        snprintf(out, cap, "user '%s' (uid %u)", found->pw_name, (unsigned)uid);
    else
        snprintf(out, cap, "uid %u", (unsigned)uid);
}

static void group_name(gid_t gid, char *out, size_t cap) {
    char buf[4096];
    struct group gr, *found = NULL;
    if (getgrgid_r(gid, &gr, buf, sizeof buf, &found) == 0 && found)
        snprintf(out, cap, "group '%s' (gid %u)", found->gr_name, (unsigned)gid);
    else
        snprintf(out, cap, "gid %u", (unsigned)gid);
}

/* True when `owner` is the only member of group `gid`: it names nobody else as a member, and
 * no other account has it as primary group. A group without members (such as setgid programs
 * use) is not the owner's. Unknown or too large entries count as shared. */
static bool group_is_owners_alone(gid_t gid, uid_t owner) {
    char gbuf[16384], pbuf[4096];
    struct group gr, *g = NULL;
    struct passwd pw, *p = NULL;
    if (getgrgid_r(gid, &gr, gbuf, sizeof gbuf, &g) != 0 || !g) return false;
    if (getpwuid_r(owner, &pw, pbuf, sizeof pbuf, &p) != 0 || !p) return false;
    size_t members = 0;
    for (char **m = g->gr_mem; *m; m++, members++)
        if (strcmp(*m, p->pw_name) != 0) return false;
    bool alone = true;
    char ebuf[4096];
    struct passwd entry, *e = NULL;
    setpwent();
    while (alone && getpwent_r(&entry, ebuf, sizeof ebuf, &e) == 0) {
        if (e->pw_gid != gid) continue;
        if (e->pw_uid == owner) members++;
        else alone = false;
    }
    endpwent();
    return alone && members > 0;
}

static tsr_status check_entry(const char *shown, const char *action, const char *path,
                              const struct stat *st, entry_role role, tsr_error *err) {
    const char *kind = role == ENTRY_FILE ? "file" : "folder";
    if (st->st_uid != 0 && st->st_uid != geteuid()) {
        char owner[320];
        user_name(st->st_uid, owner, sizeof owner);
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: refusing to %s: %s %s is owned by %s, not by root or you; "
                             "fix with: chown root %s (if you trust it)",
                             shown, action, kind, path, owner, path);
    }
    /* Nobody can replace what they do not own in a sticky folder: safe above, but not where
     * files are looked up by name. */
    bool sticky_above = role == ENTRY_ABOVE && (st->st_mode & S_ISVTX);
    if ((st->st_mode & S_IWOTH) && !sticky_above)
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: refusing to %s: %s %s is writable by others; fix with: "
                             "chmod o-w %s", shown, action, kind, path, path);
    if ((st->st_mode & S_IWGRP) && !sticky_above &&
        !group_is_owners_alone(st->st_gid, st->st_uid)) {
        char group[320];
        group_name(st->st_gid, group, sizeof group);
        return tsr_error_set(err, TSR_E_INVALID,
                             "%s: refusing to %s: %s %s is writable by %s, which is not "
                             "its owner's alone; fix with: chmod g-w %s",
                             shown, action, kind, path, group, path);
    }
    return TSR_OK;
}

/* Checks the resolved folder `dir` in `first_role`, then every folder above it up to /. */
static tsr_status check_folders(const char *shown, const char *action, const char *dir,
                                entry_role first_role, tsr_error *err) {
    char *p = strdup(dir);
    if (!p) return tsr_error_set(err, TSR_E_NOMEM, "out of memory");
    tsr_status status = TSR_OK;
    entry_role role = first_role;
    for (;;) {
        struct stat st;
        if (stat(p, &st) != 0) {
            status = tsr_error_set(err, TSR_E_IO, "%s: refusing to %s: cannot inspect folder "
                                   "%s: %s", shown, action, p, strerror(errno));
            break;
        }
        if ((status = check_entry(shown, action, p, &st, role, err)) < 0) break;
        char *slash = strrchr(p, '/');
        if (!slash || slash[1] == '\0') break; /* "/" is done (a resolved path has no other
                                                  trailing slash) */
        slash[slash == p ? 1 : 0] = '\0';
        role = ENTRY_ABOVE;
    }
    free(p);
    return status;
}

tsr_status tsr_trust_folder(const char *shown, const char *real, tsr_error *err) {
    return check_folders(shown, "search it for plugins", real, ENTRY_SEARCHED, err);
}

/* The resolved folder holding `path` itself (a link, when it is one); NULL when it cannot be
 * resolved. */
static char *real_parent(const char *path) {
    char *copy = strdup(path);
    char *real = copy ? realpath(dirname(copy), NULL) : NULL;
    free(copy);
    return real;
}

tsr_status tsr_trust_file(const char *path, const char *real, tsr_error *err) {
    static const char action[] = "load";
    struct stat st;
    if (stat(real, &st) != 0)
        return tsr_error_set(err, TSR_E_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return tsr_error_set(err, TSR_E_INVALID, "%s: not a regular file", path);
    tsr_status status = check_entry(path, action, real, &st, ENTRY_FILE, err);
    if (status < 0) return status;
    char *file_dir = real_parent(real), *link_dir = real_parent(path);
    if (!file_dir || !link_dir)
        status = tsr_error_set(err, TSR_E_IO, "%s: cannot resolve its folder: %s", path,
                               strerror(errno));
    if (status >= 0) status = check_folders(path, action, file_dir, ENTRY_ABOVE, err);
    /* Whoever can replace the link chooses what is loaded. */
    if (status >= 0 && strcmp(file_dir, link_dir) != 0)
        status = check_folders(path, action, link_dir, ENTRY_ABOVE, err);
    free(file_dir);
    free(link_dir);
    return status;
}
