
/*
 * Copyright (C) The token budget authors
 *
 * tokcount: counts the tokens of files or standard input.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <libgen.h>
#include <sys/stat.h>

#include "tk.h"


#ifndef TK_DATADIR
#define TK_DATADIR  "data"
#endif

#ifndef TK_INSTALL_DATADIR
#define TK_INSTALL_DATADIR  "/usr/local/share/token-budget"
#endif

#define TK_DEFAULT_ENCODING  "o200k_base"


static void usage(FILE *f);
static int find_datadir(char *dir, size_t size, const char *encoding);
static unsigned char *read_input(const char *name, size_t *len);
static int print_ids(const tk_encoding_t *enc, const unsigned char *text,
    size_t len);


int
main(int argc, char **argv)
{
    int             i, ids, nfiles, rc;
    char            path[4200], dir[4096], err[256];
    size_t          len;
    int64_t         n;
    const char     *encoding, *model, *datadir, *name;
    tk_pattern_e    pattern;
    unsigned char  *text;
    tk_encoding_t  *enc;

    encoding = NULL;
    model = NULL;
    datadir = NULL;
    ids = 0;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-e") == 0 || strcmp(argv[i], "--encoding") == 0
            || strcmp(argv[i], "-m") == 0 || strcmp(argv[i], "--model") == 0
            || strcmp(argv[i], "-d") == 0 || strcmp(argv[i], "--data-dir") == 0)
        {
            if (i + 1 == argc) {
                fprintf(stderr, "tokcount: option \"%s\" needs a value\n",
                        argv[i]);
                return 2;
            }

            if (argv[i][1] == 'e' || argv[i][2] == 'e') {
                encoding = argv[++i];

            } else if (argv[i][1] == 'm' || argv[i][2] == 'm') {
                model = argv[++i];

            } else {
                datadir = argv[++i];
            }

            continue;
        }

        if (strcmp(argv[i], "--ids") == 0) {
            ids = 1;
            continue;
        }

        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        }

        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }

        if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "tokcount: unknown option \"%s\"\n", argv[i]);
            usage(stderr);
            return 2;
        }

        break;
    }

    if (encoding != NULL && model != NULL) {
        fprintf(stderr, "tokcount: -e and -m are exclusive\n");
        return 2;
    }

    if (model != NULL) {
        encoding = tk_encoding_for_model(model);

        if (encoding == NULL) {
            fprintf(stderr, "tokcount: unknown model \"%s\"\n", model);
            return 2;
        }
    }

    if (encoding == NULL) {
        encoding = TK_DEFAULT_ENCODING;
    }

    if (tk_pattern_by_name(encoding, &pattern) != 0) {
        fprintf(stderr, "tokcount: unknown encoding \"%s\"\n", encoding);
        return 2;
    }

    /* o200k_harmony shares the ordinary tokens of o200k_base */

    if (strcmp(encoding, "o200k_harmony") == 0) {
        encoding = "o200k_base";
    }

    if (datadir == NULL) {
        if (find_datadir(dir, sizeof(dir), encoding) != 0) {
            fprintf(stderr, "tokcount: no data directory with "
                    "\"%s.tiktoken\", use -d\n", encoding);
            return 1;
        }

        datadir = dir;
    }

    snprintf(path, sizeof(path), "%s/%s.tiktoken", datadir, encoding);

    enc = tk_encoding_load(path, pattern, NULL, err, sizeof(err));
    if (enc == NULL) {
        fprintf(stderr, "tokcount: %s\n", err);
        return 1;
    }

    nfiles = argc - i;
    rc = 0;

    do {
        name = (i < argc) ? argv[i] : "-";

        text = read_input(name, &len);
        if (text == NULL) {
            rc = 1;
            continue;
        }

        if (ids) {
            if (print_ids(enc, text, len) != 0) {
                fprintf(stderr, "tokcount: out of memory\n");
                free(text);
                rc = 1;
                break;
            }

            if (nfiles > 1) {
                printf("\t%s", name);
            }

            printf("\n");

        } else {
            n = tk_count(enc, text, len);

            if (n < 0) {
                fprintf(stderr, "tokcount: out of memory\n");
                free(text);
                rc = 1;
                break;
            }

            if (nfiles > 1) {
                printf("%lld\t%s\n", (long long) n, name);

            } else {
                printf("%lld\n", (long long) n);
            }
        }

        free(text);

    } while (++i < argc);

    tk_encoding_free(enc);

    if (fflush(stdout) != 0) {
        fprintf(stderr, "tokcount: write error: %s\n", strerror(errno));
        return 1;
    }

    return rc;
}


static void
usage(FILE *f)
{
    fprintf(f,
        "usage: tokcount [-e ENCODING | -m MODEL] [-d DATADIR] [--ids] "
        "[FILE...]\n"
        "  -e, --encoding  r50k_base, p50k_base, cl100k_base, o200k_base "
        "(default)\n"
        "  -m, --model     pick the encoding by model name, as tiktoken "
        "does\n"
        "  -d, --data-dir  where the .tiktoken files are\n"
        "  --ids           print token ids instead of the count\n"
        "Reads standard input when no FILE or \"-\" is given.\n");
}


/*
 * the data directory: $TOKCOUNT_DATA, then "data" beside the binary's
 * directory (the build tree), then "share/token-budget" beside it (an
 * installed tree), then the directories compiled in
 */

static int
find_datadir(char *dir, size_t size, const char *encoding)
{
    int          k;
    char         exe[4096], path[4200], *base;
    ssize_t      n;
    const char  *env;
    struct stat  st;

    env = getenv("TOKCOUNT_DATA");
    base = NULL;

    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

    if (n > 0) {
        exe[n] = '\0';
        base = dirname(exe);
    }

    for (k = 0; k < 5; k++) {
        switch (k) {
        case 0:
            if (env == NULL) {
                continue;
            }
            snprintf(dir, size, "%s", env);
            break;

        case 1:
            if (base == NULL) {
                continue;
            }
            snprintf(dir, size, "%s/../data", base);
            break;

        case 2:
            if (base == NULL) {
                continue;
            }
            snprintf(dir, size, "%s/../share/token-budget", base);
            break;

        case 3:
            snprintf(dir, size, "%s", TK_DATADIR);
            break;

        default:
            snprintf(dir, size, "%s", TK_INSTALL_DATADIR);
            break;
        }

        snprintf(path, sizeof(path), "%s/%s.tiktoken", dir, encoding);

        if (stat(path, &st) == 0) {
            return 0;
        }
    }

    return -1;
}


static unsigned char *
read_input(const char *name, size_t *len)
{
    FILE           *f;
    size_t          n, size;
    unsigned char  *buf, *p;

    if (strcmp(name, "-") == 0) {
        f = stdin;

    } else {
        f = fopen(name, "rb");
        if (f == NULL) {
            fprintf(stderr, "tokcount: cannot open \"%s\": %s\n", name,
                    strerror(errno));
            return NULL;
        }
    }

    size = 65536;
    n = 0;
    buf = malloc(size);

    while (buf != NULL) {
        n += fread(buf + n, 1, size - n, f);

        if (n < size) {
            break;
        }

        size *= 2;
        p = realloc(buf, size);

        if (p == NULL) {
            free(buf);
            buf = NULL;
            break;
        }

        buf = p;
    }

    if (buf == NULL) {
        fprintf(stderr, "tokcount: out of memory reading \"%s\"\n", name);

    } else if (ferror(f)) {
        fprintf(stderr, "tokcount: cannot read \"%s\": %s\n", name,
                strerror(errno));
        free(buf);
        buf = NULL;
    }

    if (f != stdin) {
        fclose(f);
    }

    *len = n;

    return buf;
}


static int
print_ids(const tk_encoding_t *enc, const unsigned char *text, size_t len)
{
    size_t     i;
    int64_t    n;
    uint32_t  *ids;

    n = tk_count(enc, text, len);
    if (n < 0) {
        return -1;
    }

    ids = malloc((n ? n : 1) * sizeof(uint32_t));
    if (ids == NULL) {
        return -1;
    }

    if (tk_encode(enc, text, len, ids, n) != n) {
        free(ids);
        return -1;
    }

    for (i = 0; i < (size_t) n; i++) {
        printf(i ? " %u" : "%u", ids[i]);
    }

    free(ids);

    return 0;
}
