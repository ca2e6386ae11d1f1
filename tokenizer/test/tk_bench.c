
/*
 * Copyright (C) The token budget authors
 *
 * tk_bench DATADIR ENCODING NAME=FILE...: counts each file's tokens once
 * to warm up, then repeatedly for at least a second of processor time (of
 * this process alone, so that other load counts less) and at least five
 * times, and prints, one line each, "ENCODING NAME BYTES TOKENS MB/s
 * tokens/s" of the median call; the first line is the load time and the
 * memory of the vocabulary.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tk.h"


static double
now(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);

    return ts.tv_sec + ts.tv_nsec / 1e9;
}


static int
cmp_double(const void *a, const void *b)
{
    double  x, y;

    x = *(const double *) a;
    y = *(const double *) b;

    return (x > y) - (x < y);
}


static unsigned char *
slurp(const char *name, size_t *len)
{
    FILE           *f;
    long            size;
    unsigned char  *buf;

    f = fopen(name, "rb");
    if (f == NULL) {
        return NULL;
    }

    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);

    buf = malloc(size + 1);

    if (buf != NULL && fread(buf, 1, size, f) != (size_t) size) {
        free(buf);
        buf = NULL;
    }

    fclose(f);
    *len = size;

    return buf;
}


int
main(int argc, char **argv)
{
    int             i, runs;
    char            path[4200], err[256], *eq;
    size_t          len;
    double          t0, t1, total, median, times[4096];
    int64_t         n;
    tk_pattern_e    pattern;
    unsigned char  *text;
    tk_encoding_t  *enc;

    if (argc < 3) {
        fprintf(stderr, "usage: tk_bench DATADIR ENCODING NAME=FILE...\n");
        return 2;
    }

    if (tk_pattern_by_name(argv[2], &pattern) != 0) {
        fprintf(stderr, "tk_bench: unknown encoding \"%s\"\n", argv[2]);
        return 2;
    }

    snprintf(path, sizeof(path), "%s/%s.tiktoken", argv[1], argv[2]);

    t0 = now();
    enc = tk_encoding_load(path, pattern, NULL, err, sizeof(err));
    t1 = now();

    if (enc == NULL) {
        fprintf(stderr, "tk_bench: %s\n", err);
        return 1;
    }

    printf("%s load %.1f ms, %.1f MB\n", argv[2], (t1 - t0) * 1e3,
           tk_encoding_memory(enc) / 1048576.0);

    for (i = 3; i < argc; i++) {
        eq = strchr(argv[i], '=');
        if (eq == NULL) {
            fprintf(stderr, "tk_bench: \"%s\" is not NAME=FILE\n", argv[i]);
            return 2;
        }

        *eq = '\0';

        text = slurp(eq + 1, &len);
        if (text == NULL) {
            fprintf(stderr, "tk_bench: cannot read \"%s\"\n", eq + 1);
            return 1;
        }

        n = tk_count(enc, text, len);
        runs = 0;
        total = 0;

        do {
            t0 = now();
            n = tk_count(enc, text, len);
            t1 = now();

            times[runs++] = t1 - t0;
            total += t1 - t0;

        } while ((total < 1.0 || runs < 5) && runs < 4096);

        qsort(times, runs, sizeof(double), cmp_double);

        median = (runs % 2) ? times[runs / 2]
                            : (times[runs / 2 - 1] + times[runs / 2]) / 2;

        printf("%s %s %zu %lld %.1f %.0f\n", argv[2], argv[i], len,
               (long long) n, len / median / 1e6, (double) n / median);

        free(text);
    }

    tk_encoding_free(enc);

    return 0;
}
