
/*
 * Copyright (C) The token budget authors
 *
 * libFuzzer target of the tokenizer.  The first byte of an input picks
 * the encoding and a seed for chunking, the rest is the text, any bytes.
 * Checks, with abort() and a message on the first failure:
 *
 *   tk_count() is the number of ids tk_encode() gives;
 *   tk_decode() of those ids gives the text back, byte for byte;
 *   the incremental counter, fed in chunks of sizes from the seed (one
 *   byte at a time among them), counts as tk_count() does, and
 *   tk_counter_peek() on the way does not fail;
 *   every piece scanned alone is the same piece, and its ids from
 *   tk_encode() (backtracking over TK_SHORT_PIECE bytes) are those of
 *   tk_bpe_merge(), tiktoken's merge loop, for pieces up to 4096 bytes;
 *   the ids of the pieces, one after another, are those of the text.
 *
 * The same checks run on a second text made of the input: characters of
 * the scripts that merge from their characters' parts rather than from
 * bytes (CJK, kana, Hangul, two-byte letters, the whole BMP) among ASCII,
 * emoji and stray bytes, two bytes of input to one character; and on a
 * third one of letters, mostly lowercase, a byte of input to a letter,
 * whose long pieces are encoded by backtracking.
 *
 * The vocabularies are read from $TK_FUZZ_DATA, "data" by default.  The
 * Makefile builds the tokenizer for this target with a ring of 4 tokens
 * and a span of 64 bytes for backtracking, so that it emits tokens early
 * and steps back past them, and starts over, as a long piece would.
 */


#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tk_internal.h"


#define TK_FUZZ_MAX_PIECE  4096
#define TK_FUZZ_MAX_PEEKS  64
#define TK_FUZZ_NENC       3


typedef struct {
    const char            *name;
    tk_pattern_e           pattern;
    tk_encoding_t         *enc;
} tk_fuzz_encoding_t;


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void tk_fuzz_text(const tk_fuzz_encoding_t *e, unsigned seed,
    const unsigned char *text, size_t len);
static size_t tk_fuzz_characters(const unsigned char *data, size_t len,
    unsigned char *out);
static void tk_fuzz_letters(const unsigned char *data, size_t len,
    unsigned char *out);
static void tk_fuzz_fail(const tk_fuzz_encoding_t *e, const char *fmt,
    long long a, long long b);
static void *tk_fuzz_alloc(size_t size);
static uint32_t tk_fuzz_random(uint32_t *state);
static size_t tk_fuzz_chunk(unsigned seed, uint32_t *state, size_t left);
static void tk_fuzz_counter(const tk_fuzz_encoding_t *e, unsigned seed,
    const unsigned char *text, size_t len, int64_t expect);
static void tk_fuzz_pieces(const tk_fuzz_encoding_t *e,
    const unsigned char *text, size_t len, const uint32_t *ids, size_t n);


static tk_fuzz_encoding_t  tk_fuzz_encodings[TK_FUZZ_NENC] = {
    { "cl100k_base", TK_PAT_CL100K, NULL },
    { "o200k_base", TK_PAT_O200K, NULL },
    { "r50k_base", TK_PAT_R50K, NULL }
};


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int                  i;
    char                 path[4096], err[256];
    const char          *dir;
    tk_fuzz_encoding_t  *e;

    dir = getenv("TK_FUZZ_DATA");
    if (dir == NULL || *dir == '\0') {
        dir = "data";
    }

    for (i = 0; i < TK_FUZZ_NENC; i++) {
        e = &tk_fuzz_encodings[i];

        snprintf(path, sizeof(path), "%s/%s.tiktoken", dir, e->name);

        e->enc = tk_encoding_load(path, e->pattern, NULL, err, sizeof(err));

        if (e->enc == NULL) {
            fprintf(stderr, "tk_fuzz: %s (set TK_FUZZ_DATA)\n", err);
            exit(2);
        }
    }

    return 0;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                     len;
    unsigned                   seed;
    unsigned char             *chars;
    const tk_fuzz_encoding_t  *e;

    if (size == 0) {
        return 0;
    }

    e = &tk_fuzz_encodings[data[0] % TK_FUZZ_NENC];
    seed = data[0] / TK_FUZZ_NENC;

    tk_fuzz_text(e, seed, data + 1, size - 1);

    chars = tk_fuzz_alloc(2 * size + 4);
    len = tk_fuzz_characters(data + 1, size - 1, chars);

    tk_fuzz_text(e, seed, chars, len);

    tk_fuzz_letters(data + 1, size - 1, chars);
    tk_fuzz_text(e, seed, chars, size - 1);

    free(chars);

    return 0;
}


static void
tk_fuzz_text(const tk_fuzz_encoding_t *e, unsigned seed,
    const unsigned char *text, size_t len)
{
    int64_t         n, count, m;
    uint32_t       *ids;
    unsigned char  *back;

    /* every token has at least one byte: len ids are enough */

    ids = tk_fuzz_alloc((len + 1) * sizeof(uint32_t));
    back = tk_fuzz_alloc(len + 1);

    n = tk_encode(e->enc, text, len, ids, len);

    if (n < 0 || (size_t) n > len) {
        tk_fuzz_fail(e, "tk_encode() returned %lld for %lld bytes",
                     n, (long long) len);
    }

    count = tk_count(e->enc, text, len);

    if (count != n) {
        tk_fuzz_fail(e, "tk_count() is %lld, tk_encode() gave %lld ids",
                     count, n);
    }

    m = tk_decode(e->enc, ids, n, back, len);

    if (m != (int64_t) len) {
        tk_fuzz_fail(e, "tk_decode() gave %lld bytes of %lld", m,
                     (long long) len);
    }

    if (len && memcmp(back, text, len) != 0) {
        tk_fuzz_fail(e, "tk_decode() differs from the text (%lld bytes, "
                     "%lld ids)", (long long) len, n);
    }

    tk_fuzz_counter(e, seed, text, len, count);
    tk_fuzz_pieces(e, text, len, ids, n);

    free(ids);
    free(back);
}


/*
 * a letter for every byte of data: lowercase ones, a few uppercase ones
 * and a space now and then
 */

static void
tk_fuzz_letters(const unsigned char *data, size_t len, unsigned char *out)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (data[i] < 234) {
            out[i] = (unsigned char) ('a' + data[i] % 26);

        } else if (data[i] < 252) {
            out[i] = (unsigned char) ('A' + data[i] % 26);

        } else {
            out[i] = ' ';
        }
    }
}


/*
 * a character for every two bytes of data, in UTF-8, at most four bytes
 * each: the top three bits of the first byte choose the kind
 */

static size_t
tk_fuzz_characters(const unsigned char *data, size_t len, unsigned char *out)
{
    size_t          i, n;
    uint32_t        x, y, cp;
    unsigned char  *p;

    static const char  ascii[] = " \n.,!'-\tabcXYZ019";

    p = out;

    for (i = 0; i + 1 < len; i += 2) {
        x = data[i];
        y = data[i + 1];
        n = (x & 0x1f) << 8 | y;

        switch (x >> 5) {

        case 0:
            *p++ = ascii[y % (sizeof(ascii) - 1)];
            continue;

        case 1:
            cp = 0x80 + n % 0x780;
            break;

        case 2:
            cp = 0x3000 + n % 0x100;
            break;

        case 3:
        case 4:
            cp = 0x4e00 + ((x & 0x3f) << 8 | y) % 0x5200;
            break;

        case 5:
            cp = 0xac00 + n % 11172;
            break;

        case 6:
            cp = 0x800 + (n * 7) % 0xf800;

            if (cp >= 0xd800 && cp <= 0xdfff) {
                cp = 0xfffd;
            }

            break;

        default:
            if (y & 1) {
                cp = 0x1f300 + y;
                break;
            }

            *p++ = (unsigned char) (x << 3 | y >> 5);
            continue;
        }

        if (cp < 0x800) {
            *p++ = (unsigned char) (0xc0 | cp >> 6);

        } else if (cp < 0x10000) {
            *p++ = (unsigned char) (0xe0 | cp >> 12);
            *p++ = (unsigned char) (0x80 | (cp >> 6 & 0x3f));

        } else {
            *p++ = (unsigned char) (0xf0 | cp >> 18);
            *p++ = (unsigned char) (0x80 | (cp >> 12 & 0x3f));
            *p++ = (unsigned char) (0x80 | (cp >> 6 & 0x3f));
        }

        *p++ = (unsigned char) (0x80 | (cp & 0x3f));
    }

    return p - out;
}


static void
tk_fuzz_fail(const tk_fuzz_encoding_t *e, const char *fmt, long long a,
    long long b)
{
    fprintf(stderr, "tk_fuzz: %s: ", e->name);
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    abort();
}


static void *
tk_fuzz_alloc(size_t size)
{
    void  *p;

    p = malloc(size);
    if (p == NULL) {
        fprintf(stderr, "tk_fuzz: out of memory\n");
        abort();
    }

    return p;
}


static uint32_t
tk_fuzz_random(uint32_t *state)
{
    /* xorshift32, never zero */

    *state ^= *state << 13;
    *state ^= *state >> 17;
    *state ^= *state << 5;

    return *state;
}


/*
 * the next chunk size: the low two bits of the seed choose one byte at a
 * time, a fixed size, small random sizes, or random sizes of up to a
 * kilobyte that may be empty
 */

static size_t
tk_fuzz_chunk(unsigned seed, uint32_t *state, size_t left)
{
    size_t  n;

    switch (seed & 3) {

    case 0:
        n = 1;
        break;

    case 1:
        n = (seed >> 2) + 2;
        break;

    case 2:
        n = tk_fuzz_random(state) % ((seed >> 2) * 4 + 8) + 1;
        break;

    default:
        switch (tk_fuzz_random(state) % 4) {
        case 0:
            n = 0;
            break;
        case 1:
            n = 1;
            break;
        case 2:
            n = tk_fuzz_random(state) % 32 + 1;
            break;
        default:
            n = tk_fuzz_random(state) % 1024 + 1;
            break;
        }
    }

    return n < left ? n : left;
}


static void
tk_fuzz_counter(const tk_fuzz_encoding_t *e, unsigned seed,
    const unsigned char *text, size_t len, int64_t expect)
{
    int           rc, peeks;
    size_t        off, n, feeds;
    int64_t       count;
    uint32_t      state;
    tk_counter_t  c;

    tk_counter_init(&c, e->enc);

    state = 0x9e3779b9U ^ (seed * 0x85ebca6bU);
    if (state == 0) {
        state = 1;
    }

    off = 0;
    feeds = 0;
    peeks = 0;

    while (off < len) {
        n = tk_fuzz_chunk(seed, &state, len - off);

        rc = tk_counter_feed(&c, text + off, n);

        if (rc != TK_OK) {
            tk_fuzz_fail(e, "tk_counter_feed() returned %lld at %lld",
                         rc, (long long) off);
        }

        off += n;
        feeds++;

        if (feeds % 7 == 0 && peeks < TK_FUZZ_MAX_PEEKS) {
            peeks++;

            count = tk_counter_peek(&c);

            if (count < 0) {
                tk_fuzz_fail(e, "tk_counter_peek() returned %lld at %lld",
                             count, (long long) off);
            }
        }
    }

    count = tk_counter_finish(&c);

    if (count != expect) {
        tk_fuzz_fail(e, "the counter counted %lld, tk_count() %lld",
                     count, expect);
    }
}


static void
tk_fuzz_pieces(const tk_fuzz_encoding_t *e, const unsigned char *text,
    size_t len, const uint32_t *ids, size_t n)
{
    size_t                i, k, done;
    int64_t               got;
    uint32_t             *a, *b;
    tk_out_t              out;
    const unsigned char  *p, *end;

    end = text + len;
    done = 0;

    a = tk_fuzz_alloc((len + 1) * sizeof(uint32_t));
    b = tk_fuzz_alloc((len + 1) * sizeof(uint32_t));

    for (p = text; p < end; p += k) {
        k = tk_piece(e->pattern, p, end);

        if (k == 0 || k > (size_t) (end - p)) {
            tk_fuzz_fail(e, "tk_piece() returned %lld at %lld",
                         (long long) k, (long long) (p - text));
        }

        if (tk_piece(e->pattern, p, p + k) != k) {
            tk_fuzz_fail(e, "the piece at %lld of %lld bytes is another "
                         "piece when scanned alone", (long long) (p - text),
                         (long long) k);
        }

        got = tk_encode(e->enc, p, k, a, k);

        if (got <= 0 || (size_t) got > k) {
            tk_fuzz_fail(e, "tk_encode() of the piece at %lld returned %lld",
                         (long long) (p - text), got);
        }

        if (done + got > n || memcmp(a, ids + done, got * sizeof(uint32_t))) {
            tk_fuzz_fail(e, "the piece at %lld has other ids alone than in "
                         "the text (%lld ids)", (long long) (p - text), got);
        }

        done += got;

        if (k > TK_FUZZ_MAX_PIECE) {
            continue;
        }

        out.ids = b;
        out.max = k;
        out.n = 0;

        if (tk_bpe_merge(e->enc, p, k, &out, NULL) != TK_OK) {
            tk_fuzz_fail(e, "tk_bpe_merge() failed at %lld of %lld bytes",
                         (long long) (p - text), (long long) k);
        }

        if (out.n != (size_t) got) {
            tk_fuzz_fail(e, "tk_encode() gave %lld ids, tk_bpe_merge() "
                         "%lld", got, (long long) out.n);
        }

        for (i = 0; i < out.n; i++) {
            if (a[i] != b[i]) {
                fprintf(stderr, "tk_fuzz: %s: piece of %zu bytes at %zu, "
                        "id %zu: tk_encode() %u, tk_bpe_merge() %u\n",
                        e->name, k, (size_t) (p - text), i, a[i], b[i]);
                abort();
            }
        }
    }

    if (done != n) {
        tk_fuzz_fail(e, "the pieces have %lld ids, the text %lld",
                     (long long) done, (long long) n);
    }

    free(a);
    free(b);
}
