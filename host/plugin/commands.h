/* Plugin commands: functions a plugin exports by name and signature (tsr_command), called
 * through libffi with arguments converted from text. */
#ifndef TSR_HOST_COMMANDS_H
#define TSR_HOST_COMMANDS_H

#include <stddef.h>

#include <tessera/common.h>

#include "base/error.h"

/* Checks a command's declaration (name, signature grammar, fn not NULL). `who` prefixes the
 * message. */
tsr_status tsr_command_check(const tsr_command *cmd, const char *who, tsr_error *err);

/* Finds a command by name in a descriptor; NULL when absent. */
const tsr_command *tsr_command_find(const tsr_plugin_desc *desc, const char *name);

/* Calls `cmd` with `args` (text, one per non-instance parameter), converting each to the
 * parameter's type and refusing a wrong count or a value that does not parse. `instance` is
 * passed for an 'I' parameter (it must then be non-NULL). The result is printed into `ret`
 * ("" for void). A command with returns_status that returns a negative value fails with
 * "command 'x' failed (status N)"; the caller adds the text the plugin left through
 * set_error, which only it can reach (tsr_services_take_error). */
tsr_status tsr_command_call(const tsr_command *cmd, void *instance, const char *const *args,
                            size_t n_args, char *ret, size_t ret_cap, tsr_error *err);

#endif
