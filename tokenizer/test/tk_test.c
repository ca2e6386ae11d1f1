
/*
 * Copyright (C) The token budget authors
 *
 * Conformance test of the tokenizer against ids computed by tiktoken
 * (t/gen/expected.js).  Run from the repository root:
 *
 *     build/tk_test DATADIR
 *
 * DATADIR holds the .tiktoken files; the corpus and the expected ids are
 * read from t/corpus.  Prints one line per group of checks and ends with
 * "N passed, M failed"; exits with 1 if any check failed.
 */


#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tk.h"


#define TK_TEST_CORPUS    "t/corpus"
#define TK_TEST_EXPECTED  "t/corpus/expected"
#define TK_TEST_REPORTS   10       /* mismatches printed per group */
#define TK_TEST_BLOCKS    (0x110000 >> 8)

#define TK_TEST_FNV_BASIS  0xcbf29ce484222325ULL
#define TK_TEST_FNV_PRIME  0x100000001b3ULL


typedef struct {
    const char            *name;
    tk_pattern_e           pattern;
    tk_encoding_t         *enc;
} tk_test_encoding_t;


typedef struct {
    unsigned char         *data;
    size_t                 len;
} tk_test_str_t;


typedef struct {
    const char            *name;
    void                 (*make)(tk_test_str_t *s);
} tk_test_long_t;


typedef struct {
    const char            *name;
    const char            *data;
    size_t                 len;
} tk_test_bytes_t;


typedef size_t (*tk_test_template_pt)(unsigned char *p, uint32_t cp);


static void *tk_test_xalloc(size_t size);
static int tk_test_read(const char *path, tk_test_str_t *s);
static uint32_t *tk_test_parse_ids(const tk_test_str_t *s, size_t *n);
static size_t tk_test_utf8(unsigned char *p, uint32_t cp);
static uint32_t tk_test_random(void);
static void tk_test_group(const char *enc, const char *name);
static void tk_test_group_end(void);
static int tk_test_check(int ok);
static int tk_test_report(void);
static void tk_test_print_token(const tk_encoding_t *enc, uint32_t id);
static void tk_test_print_bytes(const unsigned char *p, size_t len);

static void tk_test_ids(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len, const uint32_t *expect, size_t n);
static void tk_test_counter(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len);
static void tk_test_roundtrip(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len);

static char **tk_test_corpus_files(size_t *n);
static void tk_test_corpus(tk_test_encoding_t *te, char **files, size_t n);
static void tk_test_long_inputs(tk_test_encoding_t *te);
static void tk_test_sweep(tk_test_encoding_t *te, const char *file,
    tk_test_template_pt template);
static void tk_test_invalid(tk_test_encoding_t *te);

static size_t tk_test_codepoint_template(unsigned char *p, uint32_t cp);
static size_t tk_test_contraction_template(unsigned char *p, uint32_t cp);
static size_t tk_test_class_template(unsigned char *p, uint32_t cp);

static void tk_test_make_a(tk_test_str_t *s);
static void tk_test_make_spaces(tk_test_str_t *s);
static void tk_test_make_newlines(tk_test_str_t *s);
static void tk_test_make_digits(tk_test_str_t *s);
static void tk_test_make_base64(tk_test_str_t *s);
static void tk_test_make_thumbs(tk_test_str_t *s);
static void tk_test_make_family(tk_test_str_t *s);
static void tk_test_make_ab(tk_test_str_t *s);
static void tk_test_make_hello_world(tk_test_str_t *s);
static void tk_test_make_lcg(tk_test_str_t *s);
static void tk_test_repeat(tk_test_str_t *s, const char *unit, size_t n);


static tk_test_encoding_t  tk_test_encodings[] = {
    { "r50k_base", TK_PAT_R50K, NULL },
    { "p50k_base", TK_PAT_R50K, NULL },
    { "cl100k_base", TK_PAT_CL100K, NULL },
    { "o200k_base", TK_PAT_O200K, NULL }
};

#define TK_TEST_NENCODINGS                                                    \
    (sizeof(tk_test_encodings) / sizeof(tk_test_encodings[0]))


/* as t/corpus/expected/LONG.md */

static tk_test_long_t  tk_test_longs[] = {
    { "a", tk_test_make_a },
    { "spaces", tk_test_make_spaces },
    { "newlines", tk_test_make_newlines },
    { "digits", tk_test_make_digits },
    { "base64", tk_test_make_base64 },
    { "thumbs", tk_test_make_thumbs },
    { "family", tk_test_make_family },
    { "ab", tk_test_make_ab },
    { "hello-world", tk_test_make_hello_world },
    { "lcg", tk_test_make_lcg },
    { NULL, NULL }
};


#define tk_test_bytes(name, s)  { name, s, sizeof(s) - 1 }

static tk_test_bytes_t  tk_test_invalid_inputs[] = {
    tk_test_bytes("empty", ""),
    tk_test_bytes("lone continuation", "\x80"),
    tk_test_bytes("0xff", "\xff"),
    tk_test_bytes("0xfe 0xff", "\xfe\xff"),
    tk_test_bytes("continuations", "\x80\x81\xbf\x80"),
    tk_test_bytes("in a word", "ab\x80" "cd"),
    tk_test_bytes("truncated 2", "\xc3"),
    tk_test_bytes("truncated 3", "\xe2\x82"),
    tk_test_bytes("truncated 4", "\xf0\x9f\x91"),
    tk_test_bytes("truncated in text", "abc \xf0\x9f\x91 def \xe2\x82"),
    tk_test_bytes("truncated at end", "word \xc3"),
    tk_test_bytes("overlong slash", "\xc0\xaf"),
    tk_test_bytes("overlong 3", "\xe0\x80\xaf"),
    tk_test_bytes("overlong 4", "\xf0\x80\x80\xaf"),
    tk_test_bytes("overlong nul", "a\xc0\x80" "b"),
    tk_test_bytes("surrogate high", "\xed\xa0\x80"),
    tk_test_bytes("surrogate low", "\xed\xbf\xbf"),
    tk_test_bytes("surrogate pair", "\xed\xa0\xbd\xed\xb8\x80"),
    tk_test_bytes("above 10ffff", "\xf4\x90\x80\x80"),
    tk_test_bytes("5 bytes", "\xf8\x88\x80\x80\x80"),
    tk_test_bytes("6 bytes", "\xfc\x84\x80\x80\x80\x80"),
    tk_test_bytes("stray after valid", "\xc3\xa9\x80\xc3"),
    tk_test_bytes("apostrophe", "'\x80s it'\xff" "s '\xc5"),
    tk_test_bytes("spaces", "  \x80  \xff\n\n \xc3 1\xe2"),
    tk_test_bytes("digits", "12\x80" "345\xff" "6789"),
    tk_test_bytes("mixed", "Hello \x80\x80 world's\xff 123\xc3\xa9\xc3"),
    tk_test_bytes("c1 byte 0x85", "a\x85" "b \x85\n"),
    tk_test_bytes("nul bytes", "a\0b\0\0 c"),
    { NULL, NULL, 0 }
};


static unsigned long   tk_test_passed;
static unsigned long   tk_test_failed;
static unsigned long   tk_test_group_passed;
static unsigned long   tk_test_group_failed;
static const char     *tk_test_group_enc;
static const char     *tk_test_group_name;
static uint32_t        tk_test_seed = 1;


int
main(int argc, char **argv)
{
    char                 path[4096], err[256];
    char               **files;
    size_t               i, nfiles;
    tk_pattern_e         pattern;
    const char          *datadir;
    tk_test_encoding_t  *te;

    datadir = argc > 1 ? argv[1] : "data";

    files = tk_test_corpus_files(&nfiles);

    tk_test_group("corpus", "files");
    tk_test_check(files != NULL && nfiles > 0);
    tk_test_group_end();

    for (i = 0; i < TK_TEST_NENCODINGS; i++) {
        te = &tk_test_encodings[i];

        tk_test_group(te->name, "load");

        snprintf(path, sizeof(path), "%s/%s.tiktoken", datadir, te->name);

        err[0] = '\0';
        te->enc = tk_encoding_load(path, te->pattern, NULL, err,
                                   sizeof(err));

        if (!tk_test_check(te->enc != NULL)) {
            printf("  %s: %s\n", path, err);
        }

        if (!tk_test_check(tk_pattern_by_name(te->name, &pattern) == TK_OK
                           && pattern == te->pattern))
        {
            printf("  tk_pattern_by_name(\"%s\") failed\n", te->name);
        }

        tk_test_group_end();

        if (te->enc == NULL) {
            continue;
        }

        printf("%s: %u ids, %zu bytes of memory\n", te->name,
               tk_encoding_vocab_size(te->enc),
               tk_encoding_memory(te->enc));

        if (files != NULL) {
            tk_test_corpus(te, files, nfiles);
        }

        tk_test_long_inputs(te);
        tk_test_sweep(te, "codepoints.txt", tk_test_codepoint_template);
        tk_test_sweep(te, "contractions.txt", tk_test_contraction_template);
        tk_test_sweep(te, "classes.txt", tk_test_class_template);
        tk_test_invalid(te);

        tk_encoding_free(te->enc);
        te->enc = NULL;
    }

    if (files != NULL) {
        for (i = 0; i < nfiles; i++) {
            free(files[i]);
        }

        free(files);
    }

    printf("%lu passed, %lu failed\n", tk_test_passed, tk_test_failed);

    return tk_test_failed ? 1 : 0;
}


/* checks and reports */


static void
tk_test_group(const char *enc, const char *name)
{
    tk_test_group_enc = enc;
    tk_test_group_name = name;
    tk_test_group_passed = 0;
    tk_test_group_failed = 0;
}


static void
tk_test_group_end(void)
{
    printf("%s: %s: %lu passed, %lu failed%s\n", tk_test_group_enc,
           tk_test_group_name, tk_test_group_passed, tk_test_group_failed,
           tk_test_group_failed > TK_TEST_REPORTS
           ? " (not all mismatches shown)" : "");
    fflush(stdout);
}


static int
tk_test_check(int ok)
{
    if (ok) {
        tk_test_passed++;
        tk_test_group_passed++;

    } else {
        tk_test_failed++;
        tk_test_group_failed++;
    }

    return ok;
}


/* whether to print details of the current failure */

static int
tk_test_report(void)
{
    return tk_test_group_failed <= TK_TEST_REPORTS;
}


static void
tk_test_print_bytes(const unsigned char *p, size_t len)
{
    size_t  i;

    putchar('"');

    for (i = 0; i < len; i++) {
        if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"' && p[i] != '\\') {
            putchar(p[i]);

        } else {
            printf("\\x%02x", p[i]);
        }
    }

    putchar('"');
}


static void
tk_test_print_token(const tk_encoding_t *enc, uint32_t id)
{
    int64_t        n;
    unsigned char  buf[1024];

    printf("%u ", id);

    n = tk_decode(enc, &id, 1, buf, sizeof(buf));

    if (n < 0) {
        printf("(bad id)");

    } else {
        tk_test_print_bytes(buf, (size_t) n < sizeof(buf) ? (size_t) n
                                                          : sizeof(buf));
    }
}


/*
 * tk_encode() ids equal to the expected ones, tk_count() equal to their
 * number, and tk_decode() back to the text: three checks
 */

static void
tk_test_ids(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len, const uint32_t *expect, size_t n)
{
    size_t          i, max, m;
    int64_t         rc, count, dlen;
    uint32_t       *ids;
    unsigned char  *buf;

    max = n + len + 16;
    ids = tk_test_xalloc(max * sizeof(uint32_t));

    rc = tk_encode(enc, text, len, ids, max);

    if (rc < 0) {
        tk_test_check(0);

        if (tk_test_report()) {
            printf("  %s: tk_encode() failed: %lld\n", what, (long long) rc);
        }

    } else {
        m = (size_t) rc < max ? (size_t) rc : max;

        for (i = 0; i < m && i < n; i++) {
            if (ids[i] != expect[i]) {
                break;
            }
        }

        if (!tk_test_check(i == m && (size_t) rc == n)) {
            if (tk_test_report()) {
                printf("  %s: %lld ids, expected %zu; first difference at "
                       "id %zu:\n", what, (long long) rc, n, i);
                printf("    expected ");

                if (i < n) {
                    tk_test_print_token(enc, expect[i]);

                } else {
                    printf("(end)");
                }

                printf("\n    got      ");

                if (i < m) {
                    tk_test_print_token(enc, ids[i]);

                } else {
                    printf("(end)");
                }

                printf("\n");
            }
        }
    }

    count = tk_count(enc, text, len);

    if (!tk_test_check(count >= 0 && (size_t) count == n)) {
        if (tk_test_report()) {
            printf("  %s: tk_count() %lld, expected %zu\n", what,
                   (long long) count, n);
        }
    }

    buf = tk_test_xalloc(len + 16);

    dlen = tk_decode(enc, expect, n, buf, len + 16);

    if (!tk_test_check(dlen >= 0 && (size_t) dlen == len
                       && memcmp(buf, text, len) == 0))
    {
        if (tk_test_report()) {
            printf("  %s: tk_decode() of the expected ids gave %lld bytes, "
                   "expected %zu", what, (long long) dlen, len);

            for (i = 0; dlen >= 0 && i < (size_t) dlen && i < len; i++) {
                if (buf[i] != text[i]) {
                    break;
                }
            }

            printf(", first difference at byte %zu\n", i);
        }
    }

    free(buf);
    free(ids);
}


/*
 * tk_counter_*() over the text in chunks of 1, 2, 3, 7, 64 bytes and of
 * random sizes equals tk_count(); with chunks of 64 bytes, also
 * tk_counter_peek() after a chunk equals tk_count() of the text so far.
 */

static void
tk_test_counter(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len)
{
    int           rc, peek_ok;
    size_t        k, pos, chunk;
    int64_t       expect, n, got;
    tk_counter_t  c;

    static const size_t  chunks[] = { 1, 2, 3, 7, 64, 0 };

    expect = tk_count(enc, text, len);

    for (k = 0; k < sizeof(chunks) / sizeof(chunks[0]); k++) {

        tk_counter_init(&c, enc);

        rc = TK_OK;
        peek_ok = 1;

        for (pos = 0; pos < len; pos += chunk) {

            if (chunks[k]) {
                chunk = chunks[k];

            } else {
                /* random sizes, 0 (an empty feed) to 99 */
                chunk = tk_test_random() % 100;
            }

            if (chunk > len - pos) {
                chunk = len - pos;
            }

            rc = tk_counter_feed(&c, text + pos, chunk);
            if (rc != TK_OK) {
                break;
            }

            /* every chunk of short texts, every 32nd of long ones */

            if (chunks[k] == 64 && peek_ok
                && (len <= 8192 || pos % (64 * 32) == 0))
            {
                n = tk_counter_peek(&c);

                if (n != tk_count(enc, text, pos + chunk)) {
                    peek_ok = 0;

                    if (tk_test_report()) {
                        printf("  %s: tk_counter_peek() after %zu bytes: "
                               "%lld, tk_count(): %lld\n", what, pos + chunk,
                               (long long) n,
                               (long long) tk_count(enc, text, pos + chunk));
                    }
                }
            }
        }

        if (rc != TK_OK) {
            tk_counter_free(&c);
            tk_test_check(0);

            if (tk_test_report()) {
                printf("  %s: tk_counter_feed() failed: %d\n", what, rc);
            }

            continue;
        }

        got = tk_counter_finish(&c);

        if (!tk_test_check(got == expect)) {
            if (tk_test_report()) {
                if (chunks[k]) {
                    printf("  %s: chunks of %zu: %lld, tk_count(): %lld\n",
                           what, chunks[k], (long long) got,
                           (long long) expect);

                } else {
                    printf("  %s: random chunks: %lld, tk_count(): %lld\n",
                           what, (long long) got, (long long) expect);
                }
            }
        }

        if (chunks[k] == 64) {
            tk_test_check(peek_ok);
        }
    }

    /* the whole text in one feed */

    tk_counter_init(&c, enc);

    rc = tk_counter_feed(&c, text, len);
    got = rc == TK_OK ? tk_counter_finish(&c) : rc;

    if (rc != TK_OK) {
        tk_counter_free(&c);
    }

    if (!tk_test_check(got == expect)) {
        if (tk_test_report()) {
            printf("  %s: one chunk: %lld, tk_count(): %lld\n", what,
                   (long long) got, (long long) expect);
        }
    }
}


/*
 * No reference ids: tk_encode() must not fail, tk_count() must equal the
 * number of ids and tk_decode() must give the text back.
 */

static void
tk_test_roundtrip(const tk_encoding_t *enc, const char *what,
    const unsigned char *text, size_t len)
{
    int64_t         n, count, dlen;
    uint32_t       *ids;
    unsigned char  *buf;

    /* a token is at least one byte long */

    ids = tk_test_xalloc((len + 1) * sizeof(uint32_t));
    buf = tk_test_xalloc(len + 16);

    n = tk_encode(enc, text, len, ids, len + 1);

    if (!tk_test_check(n >= 0 && (size_t) n <= len)) {
        if (tk_test_report()) {
            printf("  %s: tk_encode() returned %lld for %zu bytes\n", what,
                   (long long) n, len);
        }

        goto done;
    }

    count = tk_count(enc, text, len);

    if (!tk_test_check(count == n)) {
        if (tk_test_report()) {
            printf("  %s: tk_count() %lld, tk_encode() %lld\n", what,
                   (long long) count, (long long) n);
        }
    }

    dlen = tk_decode(enc, ids, (size_t) n, buf, len + 16);

    if (!tk_test_check(dlen >= 0 && (size_t) dlen == len
                       && memcmp(buf, text, len) == 0))
    {
        if (tk_test_report()) {
            printf("  %s: tk_decode(tk_encode(x)) != x: %lld bytes of %zu\n",
                   what, (long long) dlen, len);
            printf("    text ");
            tk_test_print_bytes(text, len < 64 ? len : 64);
            printf("\n");
        }
    }

done:

    free(buf);
    free(ids);
}


/* corpus files */


static int
tk_test_strcmp(const void *a, const void *b)
{
    return strcmp(*(char * const *) a, *(char * const *) b);
}


static char **
tk_test_corpus_files(size_t *n)
{
    DIR            *dir;
    char            path[4096];
    char          **files;
    size_t          nfiles, size;
    struct stat     st;
    struct dirent  *de;

    dir = opendir(TK_TEST_CORPUS);
    if (dir == NULL) {
        printf("opendir(\"%s\") failed: %s (run from the repository root)\n",
               TK_TEST_CORPUS, strerror(errno));
        *n = 0;
        return NULL;
    }

    files = NULL;
    nfiles = 0;
    size = 0;

    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] == '.') {
            continue;
        }

        snprintf(path, sizeof(path), "%s/%s", TK_TEST_CORPUS, de->d_name);

        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
            continue;
        }

        if (nfiles == size) {
            size = size ? size * 2 : 32;
            files = realloc(files, size * sizeof(char *));
            if (files == NULL) {
                fprintf(stderr, "out of memory\n");
                exit(2);
            }
        }

        files[nfiles] = tk_test_xalloc(strlen(de->d_name) + 1);
        strcpy(files[nfiles], de->d_name);
        nfiles++;
    }

    closedir(dir);

    if (nfiles) {
        qsort(files, nfiles, sizeof(char *), tk_test_strcmp);
    }

    *n = nfiles;

    return files;
}


static void
tk_test_corpus(tk_test_encoding_t *te, char **files, size_t nfiles)
{
    char           path[4096];
    size_t         i, n;
    uint32_t      *ids;
    tk_test_str_t  text, expect;

    tk_test_group(te->name, "corpus ids, count, decode");

    for (i = 0; i < nfiles; i++) {
        snprintf(path, sizeof(path), "%s/%s", TK_TEST_CORPUS, files[i]);

        if (!tk_test_check(tk_test_read(path, &text) == 0)) {
            continue;
        }

        snprintf(path, sizeof(path), "%s/%s/%s.ids", TK_TEST_EXPECTED,
                 te->name, files[i]);

        if (!tk_test_check(tk_test_read(path, &expect) == 0)) {
            free(text.data);
            continue;
        }

        ids = tk_test_parse_ids(&expect, &n);

        if (tk_test_check(ids != NULL)) {
            tk_test_ids(te->enc, files[i], text.data, text.len, ids, n);
        }

        free(ids);
        free(expect.data);
        free(text.data);
    }

    tk_test_group_end();

    tk_test_group(te->name, "corpus incremental counting");

    for (i = 0; i < nfiles; i++) {
        snprintf(path, sizeof(path), "%s/%s", TK_TEST_CORPUS, files[i]);

        if (!tk_test_check(tk_test_read(path, &text) == 0)) {
            continue;
        }

        tk_test_counter(te->enc, files[i], text.data, text.len);

        free(text.data);
    }

    tk_test_group_end();
}


/* long inputs */


static void
tk_test_long_inputs(tk_test_encoding_t *te)
{
    char             path[4096], what[64];
    size_t           n;
    uint32_t        *ids;
    tk_test_str_t    text, expect;
    tk_test_long_t  *l;

    tk_test_group(te->name, "long inputs");

    for (l = tk_test_longs; l->name != NULL; l++) {
        snprintf(path, sizeof(path), "%s/%s/long-%s.ids", TK_TEST_EXPECTED,
                 te->name, l->name);
        snprintf(what, sizeof(what), "long-%s", l->name);

        if (!tk_test_check(tk_test_read(path, &expect) == 0)) {
            continue;
        }

        ids = tk_test_parse_ids(&expect, &n);

        if (tk_test_check(ids != NULL)) {
            l->make(&text);
            tk_test_ids(te->enc, what, text.data, text.len, ids, n);
            tk_test_counter(te->enc, what, text.data, text.len);
            free(text.data);
        }

        free(ids);
        free(expect.data);
    }

    tk_test_group_end();
}


static void
tk_test_repeat(tk_test_str_t *s, const char *unit, size_t n)
{
    size_t  i, len;

    len = strlen(unit);

    s->len = len * n;
    s->data = tk_test_xalloc(s->len + 1);

    for (i = 0; i < n; i++) {
        memcpy(s->data + i * len, unit, len);
    }
}


static void
tk_test_make_a(tk_test_str_t *s)
{
    tk_test_repeat(s, "a", 20000);
}


static void
tk_test_make_spaces(tk_test_str_t *s)
{
    tk_test_repeat(s, " ", 20000);
}


static void
tk_test_make_newlines(tk_test_str_t *s)
{
    tk_test_repeat(s, "\n", 5000);
}


static void
tk_test_make_digits(tk_test_str_t *s)
{
    tk_test_repeat(s, "0123456789", 3000);
}


static void
tk_test_make_base64(tk_test_str_t *s)
{
    size_t          i, n;
    uint32_t        v;
    unsigned char   b[15000];

    static const unsigned char  alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    for (i = 0; i < sizeof(b); i++) {
        b[i] = (unsigned char) ((i * 7 + 3) & 0xff);
    }

    /* 15000 is a multiple of 3: no padding */

    s->data = tk_test_xalloc(sizeof(b) / 3 * 4 + 1);
    n = 0;

    for (i = 0; i < sizeof(b); i += 3) {
        v = (uint32_t) b[i] << 16 | (uint32_t) b[i + 1] << 8 | b[i + 2];

        s->data[n++] = alphabet[(v >> 18) & 0x3f];
        s->data[n++] = alphabet[(v >> 12) & 0x3f];
        s->data[n++] = alphabet[(v >> 6) & 0x3f];
        s->data[n++] = alphabet[v & 0x3f];
    }

    s->len = n;
}


static void
tk_test_make_thumbs(tk_test_str_t *s)
{
    tk_test_repeat(s, "\xf0\x9f\x91\x8d", 4000);
}


static void
tk_test_make_family(tk_test_str_t *s)
{
    tk_test_repeat(s, "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9"
                      "\xe2\x80\x8d\xf0\x9f\x91\xa7\xe2\x80\x8d"
                      "\xf0\x9f\x91\xa6", 1000);
}


static void
tk_test_make_ab(tk_test_str_t *s)
{
    tk_test_repeat(s, "ab ", 10000);
}


static void
tk_test_make_hello_world(tk_test_str_t *s)
{
    s->len = 5 + 20000 + 5;
    s->data = tk_test_xalloc(s->len + 1);

    memcpy(s->data, "Hello", 5);
    memset(s->data + 5, ' ', 20000);
    memcpy(s->data + 5 + 20000, "world", 5);
}


static void
tk_test_make_lcg(tk_test_str_t *s)
{
    size_t    i;
    uint32_t  x;

    s->len = 20000;
    s->data = tk_test_xalloc(s->len + 1);

    x = 1;

    for (i = 0; i < s->len; i++) {
        x = (x * 1103515245u + 12345u) & 0x7fffffff;
        s->data[i] = (unsigned char) ('a' + (x >> 16) % 26);
    }
}


/* code point sweeps, as t/corpus/expected/SWEEPS.md */


static size_t
tk_test_codepoint_template(unsigned char *p, uint32_t cp)
{
    size_t  n;

    n = 0;

    p[n++] = 'x';
    n += tk_test_utf8(p + n, cp);
    p[n++] = 'y';
    n += tk_test_utf8(p + n, cp);
    n += tk_test_utf8(p + n, cp);
    p[n++] = ' ';
    n += tk_test_utf8(p + n, cp);
    p[n++] = '1';
    n += tk_test_utf8(p + n, cp);
    p[n++] = '2';
    p[n++] = 'A';
    n += tk_test_utf8(p + n, cp);
    p[n++] = 'a';
    p[n++] = '\'';
    n += tk_test_utf8(p + n, cp);
    p[n++] = ' ';
    n += tk_test_utf8(p + n, cp);
    p[n++] = '\n';

    return n;
}


static size_t
tk_test_contraction_template(unsigned char *p, uint32_t cp)
{
    size_t  n;

    n = 0;

    p[n++] = '\'';
    n += tk_test_utf8(p + n, cp);
    p[n++] = ' ';
    p[n++] = 'a';
    p[n++] = '\'';
    n += tk_test_utf8(p + n, cp);
    p[n++] = 'x';
    p[n++] = ' ';

    return n;
}


static size_t
tk_test_class_template(unsigned char *p, uint32_t cp)
{
    size_t  n;

    n = 0;

    p[n++] = 'x';
    n += tk_test_utf8(p + n, cp);
    memcpy(p + n, "'ll ", 4);
    n += 4;
    n += tk_test_utf8(p + n, cp);
    memcpy(p + n, "1234   ", 7);
    n += 7;
    n += tk_test_utf8(p + n, cp);
    p[n++] = '!';
    p[n++] = '\n';

    return n;
}


static void
tk_test_sweep(tk_test_encoding_t *te, const char *file,
    tk_test_template_pt template)
{
    int            k;
    FILE          *f;
    char           path[4096], line[256], hash[32];
    size_t         len, n, i, max;
    int64_t        rc, count;
    uint32_t       b, cp, *ids;
    uint64_t       h;
    unsigned int   eb;
    unsigned long  ecount;
    unsigned char  text[256 * 64];

    tk_test_group(te->name, file);

    snprintf(path, sizeof(path), "%s/%s/%s", TK_TEST_EXPECTED, te->name,
             file);

    f = fopen(path, "r");

    if (!tk_test_check(f != NULL)) {
        printf("  %s: %s\n", path, strerror(errno));
        tk_test_group_end();
        return;
    }

    max = sizeof(text);
    ids = tk_test_xalloc(max * sizeof(uint32_t));

    for (b = 0; b < TK_TEST_BLOCKS; b++) {

        if (b >= 0xd8 && b <= 0xdf) {
            continue;
        }

        if (fgets(line, sizeof(line), f) == NULL
            || sscanf(line, "%x %lu %16s", &eb, &ecount, hash) != 3
            || eb != b || strlen(hash) != 16)
        {
            tk_test_check(0);

            if (tk_test_report()) {
                printf("  %s: no valid line for block %04x\n", path, b);
            }

            break;
        }

        len = 0;

        for (cp = b << 8; cp < (b + 1) << 8; cp++) {
            len += template(text + len, cp);
        }

        rc = tk_encode(te->enc, text, len, ids, max);
        count = tk_count(te->enc, text, len);

        h = TK_TEST_FNV_BASIS;
        n = rc > 0 ? ((size_t) rc < max ? (size_t) rc : max) : 0;

        for (i = 0; i < n; i++) {
            for (k = 0; k < 4; k++) {
                h ^= (ids[i] >> (8 * k)) & 0xff;
                h *= TK_TEST_FNV_PRIME;
            }
        }

        snprintf(line, sizeof(line), "%016llx", (unsigned long long) h);

        if (!tk_test_check(rc >= 0 && (unsigned long) rc == ecount
                           && count == rc && strcmp(line, hash) == 0))
        {
            if (tk_test_report()) {
                printf("  block %04x (U+%04X..U+%04X): expected %lu ids, "
                       "hash %s; got %lld ids, hash %s, tk_count() %lld\n",
                       b, b << 8, (b << 8) + 0xff, ecount, hash,
                       (long long) rc, line, (long long) count);
            }
        }
    }

    free(ids);
    fclose(f);

    tk_test_group_end();
}


/* invalid UTF-8 and other input without reference ids */


static void
tk_test_invalid(tk_test_encoding_t *te)
{
    size_t            i, len;
    unsigned char     all[256], rnd[8192];
    tk_test_bytes_t  *t;

    tk_test_group(te->name, "invalid UTF-8");

    for (t = tk_test_invalid_inputs; t->name != NULL; t++) {
        tk_test_roundtrip(te->enc, t->name, (const unsigned char *) t->data,
                          t->len);
        tk_test_counter(te->enc, t->name, (const unsigned char *) t->data,
                        t->len);
    }

    /* every byte value, ascending and descending */

    for (i = 0; i < 256; i++) {
        all[i] = (unsigned char) i;
    }

    tk_test_roundtrip(te->enc, "bytes 00..ff", all, 256);
    tk_test_counter(te->enc, "bytes 00..ff", all, 256);

    for (i = 0; i < 256; i++) {
        all[i] = (unsigned char) (255 - i);
    }

    tk_test_roundtrip(te->enc, "bytes ff..00", all, 256);

    /* each byte alone */

    for (i = 0; i < 256; i++) {
        all[0] = (unsigned char) i;
        tk_test_roundtrip(te->enc, "one byte", all, 1);
    }

    /* random bytes, then random bytes of UTF-8 shape */

    tk_test_seed = 12345;

    for (i = 0; i < sizeof(rnd); i++) {
        rnd[i] = (unsigned char) (tk_test_random() >> 8);
    }

    tk_test_roundtrip(te->enc, "random bytes", rnd, sizeof(rnd));
    tk_test_counter(te->enc, "random bytes", rnd, sizeof(rnd));

    for (len = 0; len < sizeof(rnd) - 8; /* void */) {
        switch (tk_test_random() % 8) {

        case 0:
            rnd[len++] = (unsigned char) (0x80 + tk_test_random() % 0x40);
            break;

        case 1:
            rnd[len++] = (unsigned char) (0xc0 + tk_test_random() % 0x40);
            break;

        case 2:
            rnd[len++] = ' ';
            break;

        case 3:
            rnd[len++] = '\'';
            break;

        case 4:
            rnd[len++] = (unsigned char) ('0' + tk_test_random() % 10);
            break;

        default:
            len += tk_test_utf8(rnd + len, tk_test_random() % 0x110000);
            break;
        }
    }

    tk_test_roundtrip(te->enc, "random UTF-8-like", rnd, len);
    tk_test_counter(te->enc, "random UTF-8-like", rnd, len);

    tk_test_group_end();
}


/* helpers */


static void *
tk_test_xalloc(size_t size)
{
    void  *p;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }

    return p;
}


static int
tk_test_read(const char *path, tk_test_str_t *s)
{
    FILE    *f;
    long     size;
    size_t   n;

    s->data = NULL;
    s->len = 0;

    f = fopen(path, "rb");
    if (f == NULL) {
        goto failed;
    }

    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0
        || fseek(f, 0, SEEK_SET) != 0)
    {
        fclose(f);
        goto failed;
    }

    s->data = tk_test_xalloc((size_t) size + 1);
    n = fread(s->data, 1, (size_t) size, f);

    fclose(f);

    if (n != (size_t) size) {
        free(s->data);
        s->data = NULL;
        goto failed;
    }

    s->data[n] = '\0';
    s->len = n;

    return 0;

failed:

    if (tk_test_report()) {
        printf("  cannot read %s: %s\n", path, strerror(errno));
    }

    return -1;
}


/* "id id ... id\n" */

static uint32_t *
tk_test_parse_ids(const tk_test_str_t *s, size_t *n)
{
    size_t          i, count;
    uint32_t        v, *ids;
    unsigned char  *p, *end;

    p = s->data;
    end = s->data + s->len;

    if (s->len == 0 || end[-1] != '\n') {
        goto invalid;
    }

    count = 0;

    for (i = 0; i < s->len; i++) {
        if (p[i] == ' ') {
            count++;
        }
    }

    ids = tk_test_xalloc((count + 1) * sizeof(uint32_t));
    count = 0;

    while (*p != '\n') {
        if (*p < '0' || *p > '9') {
            free(ids);
            goto invalid;
        }

        for (v = 0; *p >= '0' && *p <= '9'; p++) {
            v = v * 10 + (uint32_t) (*p - '0');
        }

        ids[count++] = v;

        if (*p == ' ') {
            p++;

        } else if (*p != '\n') {
            free(ids);
            goto invalid;
        }
    }

    if (p + 1 != end) {
        free(ids);
        goto invalid;
    }

    *n = count;

    return ids;

invalid:

    if (tk_test_report()) {
        printf("  invalid ids file\n");
    }

    *n = 0;

    return NULL;
}


static size_t
tk_test_utf8(unsigned char *p, uint32_t cp)
{
    if (cp < 0x80) {
        p[0] = (unsigned char) cp;
        return 1;
    }

    if (cp < 0x800) {
        p[0] = (unsigned char) (0xc0 | (cp >> 6));
        p[1] = (unsigned char) (0x80 | (cp & 0x3f));
        return 2;
    }

    if (cp < 0x10000) {
        p[0] = (unsigned char) (0xe0 | (cp >> 12));
        p[1] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
        p[2] = (unsigned char) (0x80 | (cp & 0x3f));
        return 3;
    }

    p[0] = (unsigned char) (0xf0 | (cp >> 18));
    p[1] = (unsigned char) (0x80 | ((cp >> 12) & 0x3f));
    p[2] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
    p[3] = (unsigned char) (0x80 | (cp & 0x3f));
    return 4;
}


static uint32_t
tk_test_random(void)
{
    tk_test_seed = tk_test_seed * 1103515245u + 12345u;

    return (tk_test_seed >> 8) & 0xffffff;
}
