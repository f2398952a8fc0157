/*
 * <tessera/sdk_heads.h> -- reading a head file, the split of a model's KV heads into retrieval
 * heads (they read every entry) and streaming heads (the sinks and a recent window) that
 * `tessera profile-heads` writes, for DuoAttention: the 'duo' attention plugin and the
 * 'streaming' cache's `heads` parameter read the same file.
 *
 * The file is text, one record a line; '#' starts a comment line, blank lines are ignored:
 *
 *   tessera-heads 1                    first record: the format and its version
 *   layers 22 heads 32 kv_heads 4      the model shape it was profiled on
 *   sink 4                             the profile's sinks and window (the window: positions
 *   window 252                         before the query; the query's own is always inside)
 *   0 0 retrieval 0.4312 0.41 0.43 ... one line per (layer, KV head), after the header: layer,
 *   0 1 streaming 0.0123 0.01 0.01 ... KV head, role, its score, then the score of each of its
 *                                      n_head / n_kv_head query heads
 *
 * A score is the mean attention probability a query head put outside the sinks and the window
 * (over the queries that had entries there); a KV head's is its query heads' largest. Only
 * the roles are used here; hand-edit them to choose heads yourself.
 * Header-only, like <tessera/sdk.h>.
 */
#ifndef TESSERA_SDK_HEADS_H
#define TESSERA_SDK_HEADS_H

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera/sdk.h>

typedef struct tsr_heads {
    int32_t sink, window;  /* what the profile measured with */
    uint8_t *retrieval;    /* (n_layer, n_kv_head): 1 for a retrieval head, 0 for streaming */
} tsr_heads;

/* The longest line read; a longer one is refused. */
#define TSR_HEADS_LINE 8192

/* Reads one integer word at *p into *out; 0 when the text there is not one. */
static inline int tsr_heads_int_(char **p, long *out) {
    char *end;
    errno = 0;
    long v = strtol(*p, &end, 10);
    if (end == *p || errno || (*end && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r'))
        return 0;
    *out = v;
    *p = end;
    return 1;
}

/* True when only blanks remain at p. */
static inline int tsr_heads_rest_blank_(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return *p == '\0';
}

/* Reads `path` for a model of n_layer layers, n_head query heads and n_kv_head KV heads into
 * *out (free with tsr_heads_free). On failure: TSR_E_IO or TSR_E_INVALID with one line through
 * host->set_error naming the file, the line and what was expected, and *out untouched. */
static inline tsr_status tsr_heads_load(const tsr_host *host, const char *path, int32_t n_layer,
                                        int32_t n_head, int32_t n_kv_head, tsr_heads *out) {
    FILE *f = fopen(path, "r");
    if (!f) {
        host->set_error(host->ctx, "heads: %s: cannot open: %s", path, strerror(errno));
        return TSR_E_IO;
    }
    size_t n_rows = (size_t)n_layer * (size_t)n_kv_head;
    uint8_t *role = host->alloc(host->ctx, n_rows, 0);
    uint8_t *seen = host->alloc(host->ctx, n_rows, 0);
    char *line = host->alloc(host->ctx, TSR_HEADS_LINE, 0);
    tsr_status st = TSR_OK;
    if (!role || !seen || !line) {
        host->set_error(host->ctx, "heads: %s: out of memory", path);
        st = TSR_E_NOMEM;
        goto done;
    }
    memset(seen, 0, n_rows);
    /* What the header has given so far: the version line, the shape, sink, window. */
    int have_magic = 0, have_shape = 0, have_sink = 0, have_window = 0;
    long sink = 0, window = 0;
    const int32_t group = n_head / n_kv_head;
    for (long ln = 1; fgets(line, TSR_HEADS_LINE, f); ln++) {
        size_t len = strlen(line);
        if (len == TSR_HEADS_LINE - 1 && line[len - 1] != '\n') {
            host->set_error(host->ctx, "heads: %s: line %ld: longer than %d bytes", path, ln,
                            TSR_HEADS_LINE - 2);
            st = TSR_E_INVALID;
            goto done;
        }
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '#' || tsr_heads_rest_blank_(p)) continue;
        long a, b, c;
        if (!have_magic) {
            if (strncmp(p, "tessera-heads", 13) != 0 || (p += 13, !tsr_heads_int_(&p, &a)) ||
                a != 1 || !tsr_heads_rest_blank_(p)) {
                host->set_error(host->ctx, "heads: %s: line %ld: expected 'tessera-heads 1' (a "
                                "head file written by tessera profile-heads)", path, ln);
                st = TSR_E_INVALID;
                goto done;
            }
            have_magic = 1;
        } else if (strncmp(p, "layers ", 7) == 0) {
            p += 7;
            int ok = tsr_heads_int_(&p, &a) && (p += strspn(p, " \t"), strncmp(p, "heads ", 6) == 0) &&
                     (p += 6, tsr_heads_int_(&p, &b)) &&
                     (p += strspn(p, " \t"), strncmp(p, "kv_heads ", 9) == 0) &&
                     (p += 9, tsr_heads_int_(&p, &c)) && tsr_heads_rest_blank_(p);
            if (!ok) {
                host->set_error(host->ctx, "heads: %s: line %ld: expected 'layers L heads H "
                                "kv_heads G'", path, ln);
                st = TSR_E_INVALID;
                goto done;
            }
            if (a != n_layer || b != n_head || c != n_kv_head) {
                host->set_error(host->ctx, "heads: %s: profiled on a model of %ld layers, %ld "
                                "query heads and %ld KV heads; this one has %d, %d and %d: "
                                "profile it with tessera profile-heads", path, a, b, c,
                                (int)n_layer, (int)n_head, (int)n_kv_head);
                st = TSR_E_INVALID;
                goto done;
            }
            have_shape = 1;
        } else if (strncmp(p, "sink ", 5) == 0 || strncmp(p, "window ", 7) == 0) {
            int is_sink = p[0] == 's';
            p += is_sink ? 5 : 7;
            if (!tsr_heads_int_(&p, &a) || a < (is_sink ? 0 : 1) || a > INT32_MAX ||
                !tsr_heads_rest_blank_(p)) {
                host->set_error(host->ctx, "heads: %s: line %ld: expected '%s N' with N >= %d",
                                path, ln, is_sink ? "sink" : "window", is_sink ? 0 : 1);
                st = TSR_E_INVALID;
                goto done;
            }
            *(is_sink ? &sink : &window) = a;
            *(is_sink ? &have_sink : &have_window) = 1;
        } else if (*p >= '0' && *p <= '9') {
            if (!have_shape || !have_sink || !have_window) {
                host->set_error(host->ctx, "heads: %s: line %ld: a head before the header's "
                                "layers, sink and window lines", path, ln);
                st = TSR_E_INVALID;
                goto done;
            }
            int ok = tsr_heads_int_(&p, &a) && tsr_heads_int_(&p, &b);
            if (!ok || a < 0 || a >= n_layer || b < 0 || b >= n_kv_head) {
                host->set_error(host->ctx, "heads: %s: line %ld: expected a layer in [0, %d) "
                                "and a KV head in [0, %d)", path, ln, (int)n_layer,
                                (int)n_kv_head);
                st = TSR_E_INVALID;
                goto done;
            }
            size_t at = (size_t)a * (size_t)n_kv_head + (size_t)b;
            p += strspn(p, " \t");
            size_t word = strcspn(p, " \t\r\n");
            int retrieval = word == 9 && strncmp(p, "retrieval", 9) == 0;
            if (!retrieval && !(word == 9 && strncmp(p, "streaming", 9) == 0)) {
                host->set_error(host->ctx, "heads: %s: line %ld: layer %ld KV head %ld: role "
                                "'%.*s'; expected retrieval or streaming", path, ln, a, b,
                                (int)(word < 40 ? word : 40), p);
                st = TSR_E_INVALID;
                goto done;
            }
            p += word;
            /* The head's score, then one per query head of the group. */
            int n_scores = 0;
            for (;;) {
                p += strspn(p, " \t\r\n");
                if (!*p) break;
                char *end;
                double x = strtod(p, &end);
                if (end == p || !isfinite(x) || (*end && !strchr(" \t\r\n", *end))) {
                    n_scores = -1;
                    break;
                }
                p = end;
                n_scores++;
            }
            if (n_scores != 1 + group) {
                host->set_error(host->ctx, "heads: %s: line %ld: layer %ld KV head %ld: expected "
                                "%d numbers after the role (its score, then each of its %d "
                                "query heads')", path, ln, a, b, 1 + group, group);
                st = TSR_E_INVALID;
                goto done;
            }
            if (seen[at]) {
                host->set_error(host->ctx, "heads: %s: line %ld: layer %ld KV head %ld is given "
                                "twice", path, ln, a, b);
                st = TSR_E_INVALID;
                goto done;
            }
            seen[at] = 1;
            role[at] = (uint8_t)retrieval;
        } else {
            size_t word = strcspn(p, " \t\r\n");
            host->set_error(host->ctx, "heads: %s: line %ld: unknown record '%.*s' (expected "
                            "layers, sink, window or a head's line)", path, ln,
                            (int)(word < 40 ? word : 40), p);
            st = TSR_E_INVALID;
            goto done;
        }
    }
    if (ferror(f)) {
        host->set_error(host->ctx, "heads: %s: cannot read: %s", path, strerror(errno));
        st = TSR_E_IO;
        goto done;
    }
    if (!have_magic) {
        host->set_error(host->ctx, "heads: %s: empty; expected a head file written by tessera "
                        "profile-heads", path);
        st = TSR_E_INVALID;
        goto done;
    }
    for (size_t at = 0; at < n_rows; at++) {
        if (seen[at]) continue;
        host->set_error(host->ctx, "heads: %s: layer %d KV head %d has no line (each of the %d x "
                        "%d heads needs one)", path, (int)(at / (size_t)n_kv_head),
                        (int)(at % (size_t)n_kv_head), (int)n_layer, (int)n_kv_head);
        st = TSR_E_INVALID;
        goto done;
    }
    *out = (tsr_heads){.sink = (int32_t)sink, .window = (int32_t)window, .retrieval = role};
    role = NULL;
done:
    fclose(f);
    host->free(host->ctx, role);
    host->free(host->ctx, seen);
    host->free(host->ctx, line);
    return st;
}

static inline void tsr_heads_free(const tsr_host *host, tsr_heads *h) {
    host->free(host->ctx, h->retrieval);
    h->retrieval = NULL;
}

#endif /* TESSERA_SDK_HEADS_H */
