/* Charts with cairo: the same drawing on an image surface (PNG) or an SVG surface. */
#include <cairo-svg.h>
#include <cairo.h>
#include <fontconfig/fontconfig.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "base/outfile.h"
#include "cli/cli_plot.h"

enum { WIDTH = 820, HEIGHT = 500, LEFT = 80, RIGHT = 210, TOP = 44, BOTTOM = 64 };

/* Colours apart for the eye (Okabe and Ito's palette), one per series, cycling. */
static const double palette[][3] = {{0.00, 0.45, 0.70}, {0.84, 0.37, 0.00}, {0.00, 0.62, 0.45},
                                    {0.80, 0.47, 0.65}, {0.94, 0.89, 0.26}, {0.34, 0.71, 0.91},
                                    {0.90, 0.62, 0.00}, {0.00, 0.00, 0.00}};

static bool has_extension(const char *path, const char *ext) {
    size_t n = strlen(path), e = strlen(ext);
    return n > e && strcasecmp(path + n - e, ext) == 0;
}

bool tsr_plot_format_known(const char *path) {
    return has_extension(path, ".png") || has_extension(path, ".svg");
}

typedef struct frame {
    double x0, x1, y0, y1; /* data range (x in log2 when the axis is) */
    bool x_log2;
} frame;

static double x_value(const frame *f, double x) { return f->x_log2 ? log2(x) : x; }

static double px(const frame *f, double x) {
    return LEFT + (x_value(f, x) - f->x0) / (f->x1 - f->x0) * (WIDTH - LEFT - RIGHT);
}

static double py(const frame *f, double y) {
    return HEIGHT - BOTTOM - (y - f->y0) / (f->y1 - f->y0) * (HEIGHT - TOP - BOTTOM);
}

/* The range of the data, widened a little so no point sits on the frame. */
static frame frame_of(const tsr_plot *p) {
    frame f = {INFINITY, -INFINITY, INFINITY, -INFINITY, p->x_log2};
    for (int s = 0; s < p->n_series; s++)
        for (int i = 0; i < p->series[s].n; i++) {
            double x = x_value(&f, p->series[s].x[i]), y = p->series[s].y[i];
            f.x0 = fmin(f.x0, x), f.x1 = fmax(f.x1, x);
            f.y0 = fmin(f.y0, y), f.y1 = fmax(f.y1, y);
        }
    if (p->has_reference) f.y0 = fmin(f.y0, p->reference_y), f.y1 = fmax(f.y1, p->reference_y);
    if (p->has_reference && p->reference_x > 0) {
        double x = x_value(&f, p->reference_x);
        f.x0 = fmin(f.x0, x), f.x1 = fmax(f.x1, x);
    }
    if (!(f.x0 < f.x1)) f.x0 -= 1, f.x1 += 1;
    if (!(f.y0 < f.y1)) f.y0 -= 0.5 * fmax(fabs(f.y0), 1), f.y1 += 0.5 * fmax(fabs(f.y1), 1);
    double dx = 0.06 * (f.x1 - f.x0), dy = 0.08 * (f.y1 - f.y0);
    f.x0 -= dx, f.x1 += dx, f.y0 -= dy, f.y1 += dy;
    return f;
}

/* A tick step of 1, 2 or 5 times a power of ten giving about `n` ticks over `range`. */
static double nice_step(double range, int n) {
    double raw = range / n, mag = pow(10, floor(log10(raw))), r = raw / mag;
    return (r < 1.5 ? 1 : r < 3.5 ? 2 : r < 7.5 ? 5 : 10) * mag;
}

static void byte_size(char *buf, size_t size, double bytes) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) bytes /= 1024, u++;
    snprintf(buf, size, "%g %s", bytes, unit[u]);
}

static void text_at(cairo_t *cr, double x, double y, const char *text, double align_x,
                    double align_y) {
    cairo_text_extents_t e;
    cairo_text_extents(cr, text, &e);
    cairo_move_to(cr, x - align_x * e.width - e.x_bearing, y - align_y * e.height - e.y_bearing);
    cairo_show_text(cr, text);
}

static void draw_axes(cairo_t *cr, const tsr_plot *p, const frame *f) {
    char label[64];
    cairo_set_font_size(cr, 12);
    cairo_set_line_width(cr, 0.5);
    double step = nice_step(f->y1 - f->y0, 6);
    for (double y = ceil(f->y0 / step) * step; y <= f->y1; y += step) {
        cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
        cairo_move_to(cr, LEFT, py(f, y));
        cairo_line_to(cr, WIDTH - RIGHT, py(f, y));
        cairo_stroke(cr);
        cairo_set_source_rgb(cr, 0, 0, 0);
        snprintf(label, sizeof label, "%g", fabs(y) < step * 1e-6 ? 0 : y);
        text_at(cr, LEFT - 6, py(f, y), label, 1, 0.5);
    }
    double xstep = f->x_log2 ? ceil((f->x1 - f->x0) / 10) : nice_step(f->x1 - f->x0, 6);
    for (double v = ceil(f->x0 / xstep) * xstep; v <= f->x1; v += xstep) {
        double x = f->x_log2 ? exp2(v) : v;
        cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
        cairo_move_to(cr, px(f, x), TOP);
        cairo_line_to(cr, px(f, x), HEIGHT - BOTTOM);
        cairo_stroke(cr);
        cairo_set_source_rgb(cr, 0, 0, 0);
        if (p->x_bytes) byte_size(label, sizeof label, x);
        else snprintf(label, sizeof label, "%g", x);
        text_at(cr, px(f, x), HEIGHT - BOTTOM + 8, label, 0.5, 0);
    }
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, LEFT, TOP, WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    cairo_stroke(cr);
    text_at(cr, (LEFT + WIDTH - RIGHT) / 2.0, HEIGHT - 22, p->x_label, 0.5, 0);
    cairo_save(cr);
    cairo_translate(cr, 22, (TOP + HEIGHT - BOTTOM) / 2.0);
    cairo_rotate(cr, -M_PI / 2);
    text_at(cr, 0, 0, p->y_label, 0.5, 0.5);
    cairo_restore(cr);
    cairo_set_font_size(cr, 15);
    text_at(cr, (LEFT + WIDTH - RIGHT) / 2.0, 14, p->title, 0.5, 0);
}

/* Each series: its curve (one stroked path, width 2.5), a filled dot per point, and its
 * swatch and label in the legend (a filled square, so only curves are stroked that wide). */
static void draw(cairo_t *cr, const tsr_plot *p) {
    frame f = frame_of(p);
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    draw_axes(cr, p, &f);
    double legend_y = TOP + 8;
    cairo_set_font_size(cr, 12);
    if (p->has_reference) {
        static const double dash[] = {6, 4};
        cairo_set_source_rgb(cr, 0.4, 0.4, 0.4);
        cairo_set_line_width(cr, 1.5);
        cairo_set_dash(cr, dash, 2, 0);
        cairo_move_to(cr, LEFT, py(&f, p->reference_y));
        cairo_line_to(cr, WIDTH - RIGHT, py(&f, p->reference_y));
        cairo_move_to(cr, WIDTH - RIGHT + 10, legend_y + 5);
        cairo_line_to(cr, WIDTH - RIGHT + 26, legend_y + 5);
        cairo_stroke(cr);
        cairo_set_dash(cr, NULL, 0, 0);
        if (p->reference_x > 0) {
            cairo_arc(cr, px(&f, p->reference_x), py(&f, p->reference_y), 3.5, 0, 2 * M_PI);
            cairo_fill(cr);
        }
        cairo_set_source_rgb(cr, 0, 0, 0);
        text_at(cr, WIDTH - RIGHT + 30, legend_y, p->reference_label, 0, 0);
        legend_y += 20;
    }
    for (int s = 0; s < p->n_series; s++) {
        const tsr_plot_series *ser = &p->series[s];
        const double *c = palette[s % (int)(sizeof palette / sizeof palette[0])];
        cairo_set_source_rgb(cr, c[0], c[1], c[2]);
        if (ser->n > 1) {
            cairo_set_line_width(cr, 2.5);
            for (int i = 0; i < ser->n; i++)
                (i ? cairo_line_to : cairo_move_to)(cr, px(&f, ser->x[i]), py(&f, ser->y[i]));
            cairo_stroke(cr);
        }
        for (int i = 0; i < ser->n; i++) {
            cairo_new_sub_path(cr);
            cairo_arc(cr, px(&f, ser->x[i]), py(&f, ser->y[i]), 3.5, 0, 2 * M_PI);
            cairo_fill(cr);
        }
        cairo_rectangle(cr, WIDTH - RIGHT + 14, legend_y, 10, 10);
        cairo_fill(cr);
        cairo_set_source_rgb(cr, 0, 0, 0);
        text_at(cr, WIDTH - RIGHT + 30, legend_y, ser->label, 0, 0);
        legend_y += 20;
    }
}

static cairo_status_t write_out(void *closure, const unsigned char *data, unsigned int length) {
    return tsr_outfile_write(closure, data, length) ? CAIRO_STATUS_SUCCESS
                                                     : CAIRO_STATUS_WRITE_ERROR;
}

tsr_status tsr_plot_write(const tsr_plot *p, const char *path, const char *input,
                          tsr_error *err) {
    if (!tsr_plot_format_known(path))
        return tsr_error_set(err, TSR_E_INVALID, "%s: expected a file name ending in .png or "
                             ".svg (the chart's format)", path);
    tsr_outfile out;
    tsr_status st = tsr_outfile_open(&out, path, input, err);
    if (st < 0) return st;
    bool svg = has_extension(path, ".svg");
    cairo_surface_t *surface =
        svg ? cairo_svg_surface_create_for_stream(write_out, &out, WIDTH, HEIGHT)
            : cairo_image_surface_create(CAIRO_FORMAT_RGB24, WIDTH, HEIGHT);
    cairo_t *cr = cairo_create(surface);
    draw(cr, p);
    cairo_status_t cs = cairo_status(cr);
    cairo_destroy(cr);
    if (cs == CAIRO_STATUS_SUCCESS && !svg)
        cs = cairo_surface_write_to_png_stream(surface, write_out, &out);
    cairo_surface_finish(surface);
    if (cs == CAIRO_STATUS_SUCCESS) cs = cairo_surface_status(surface);
    cairo_surface_destroy(surface);
    /* cairo and fontconfig keep the fonts they found for the process's life; with no cairo
     * object left, they go now, so leak checkers see only what is truly lost. */
    cairo_debug_reset_static_data();
    FcFini();
    /* A write that failed is the outfile's to report, with its reason. */
    if (cs != CAIRO_STATUS_SUCCESS && cs != CAIRO_STATUS_WRITE_ERROR) {
        tsr_outfile_discard(&out);
        return tsr_error_set(err, TSR_E_INTERNAL, "%s: cannot draw the chart: %s", path,
                             cairo_status_to_string(cs));
    }
    return tsr_outfile_commit(&out, err);
}
