/* Line charts drawn with cairo, as PNG or SVG by the file name's extension: one curve of
 * points per series, and an optional reference level drawn across as a dashed line. */
#ifndef TSR_HOST_CLI_PLOT_H
#define TSR_HOST_CLI_PLOT_H

#include <stdbool.h>

#include "base/error.h"

typedef struct tsr_plot_series {
    const char *label;
    const double *x, *y; /* n points, drawn in this order */
    int n;
} tsr_plot_series;

typedef struct tsr_plot {
    const char *title, *x_label, *y_label;
    bool x_log2;       /* x on a log2 scale (every x must be > 0), ticks at powers of 2 */
    bool x_bytes;      /* x tick labels as byte sizes (KiB, MiB) */
    const tsr_plot_series *series;
    int n_series;
    bool has_reference;
    double reference_y; /* drawn dashed across the plot, labelled reference_label */
    double reference_x; /* > 0: the reference's own point, drawn there in grey */
    const char *reference_label;
} tsr_plot;

/* True when `path` ends in .png or .svg (any case): the formats tsr_plot_write draws. */
bool tsr_plot_format_known(const char *path);

/* Draws `p` into `path` (written whole or not at all, base/outfile.h); `input` is a file the
 * caller reads, which the chart must not replace. */
tsr_status tsr_plot_write(const tsr_plot *p, const char *path, const char *input,
                          tsr_error *err);

#endif
