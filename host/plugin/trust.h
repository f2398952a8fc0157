/* Whether the host may run code from a file: the checks ssh makes of its keys (StrictModes),
 * applied to the resolved file and to every folder above it, up to /.
 *
 * An entry (the file or a folder) is trusted when it is owned by root or by the effective user,
 * and nobody else can change it: not writable by others, and not writable by its group unless
 * the owner is that group's only member (a user private group, as Debian makes for each
 * account). A folder above may be writable by others when it has the sticky bit (/tmp):
 * nobody can then replace an entry they do not own. A folder searched for plugins may not: a
 * file is found there by name, and anyone could add one (or a link to any library).
 *
 * Refusals are one line: "<shown>: refusing to <action>: <file or folder> <path> is <why>; fix
 * with: <command>". Owner and group names are looked up through NSS; call from one thread. */
#ifndef TSR_HOST_TRUST_H
#define TSR_HOST_TRUST_H

#include "base/error.h"

/* A plugin file the host may dlopen. `path` is as the user or the search named it (first in
 * messages); `real` is its realpath(). Checks the file (a regular file), the folders above
 * `real`, and, when `path` reaches it through a link, the folders above that link too. */
tsr_status tsr_trust_file(const char *path, const char *real, tsr_error *err);

/* A folder searched for plugins (`real` resolved, `shown` as given): the folder itself must
 * not be writable by anyone else, even with the sticky bit; the folders above it as above. */
tsr_status tsr_trust_folder(const char *shown, const char *real, tsr_error *err);

#endif
