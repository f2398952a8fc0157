/* Reading a plugin's stage table. A table only grows at the end (a MINOR appends slots), and a
 * plugin's `struct_size` says how much of it the plugin was built with: a slot beyond it is not
 * in the plugin's memory at all, so every optional slot is read through TSR_VT_HAS, which also
 * treats NULL as absent. Mandatory slots lie within the 1.0 table, which the loader requires. */
#ifndef TSR_HOST_VTABLE_H
#define TSR_HOST_VTABLE_H

#include <stddef.h>

/* The end of `field` in `type`: the size a table must have to hold it. */
#define TSR_END_OF(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))

/* Whether the table `vt` (a pointer to a stage table) holds `field`, set. */
#define TSR_VT_HAS(vt, field) \
    ((vt)->struct_size >= TSR_END_OF(__typeof__(*(vt)), field) && (vt)->field)

#endif
