
/*
 * Copyright (C) The token budget authors
 *
 * Hand-written pre-tokenisers, one per encoding, each equal to the
 * encoding's pat_str regex under leftmost-first alternation:
 *
 * r50k_base, p50k_base:
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
 *   |\s+(?!\S)|\s+
 *
 * cl100k_base:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
 *   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *
 * o200k_base:
 *   [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*
 *       [\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
 *   |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+
 *       [\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
 *   |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *
 * A byte that does not start a valid UTF-8 sequence is a character of its
 * own with no class: neither letter, number, mark nor space.
 */


#include "tk_internal.h"


#define TK_UPPERISH  (TK_U_LU|TK_U_LT|TK_U_LM|TK_U_LO|TK_U_M)
#define TK_LOWERISH  (TK_U_LL|TK_U_LM|TK_U_LO|TK_U_M)


typedef const unsigned char  *tk_ptr_t;


static tk_ptr_t tk_contraction(tk_ptr_t p, tk_ptr_t end, int icase);
static tk_ptr_t tk_skip_slow(tk_ptr_t p, tk_ptr_t end, unsigned in,
    unsigned out);
static tk_ptr_t tk_digits(tk_ptr_t p, tk_ptr_t end, int max);
static tk_ptr_t tk_space(tk_ptr_t p, tk_ptr_t end, int newlines);
static tk_ptr_t tk_punct_piece(uint32_t c, unsigned cl, tk_ptr_t q,
    tk_ptr_t end, int slash);
static tk_ptr_t tk_scan_r50k(tk_ptr_t p, tk_ptr_t end);
static tk_ptr_t tk_scan_cl100k(tk_ptr_t p, tk_ptr_t end);
static tk_ptr_t tk_scan_o200k(tk_ptr_t p, tk_ptr_t end);
static tk_ptr_t tk_o200k_suffix(tk_ptr_t p, tk_ptr_t end);
static tk_ptr_t tk_o200k_lower(tk_ptr_t i, tk_ptr_t end);
static tk_ptr_t tk_o200k_upper(tk_ptr_t i, tk_ptr_t end);


/* the classes of ASCII, as in the Unicode tables */

const uint8_t  tk_ascii_class[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, TK_U_WS, TK_U_WS, TK_U_WS, TK_U_WS, TK_U_WS,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    TK_U_WS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    TK_U_N, TK_U_N, TK_U_N, TK_U_N, TK_U_N,
    TK_U_N, TK_U_N, TK_U_N, TK_U_N, TK_U_N, 0, 0, 0, 0, 0, 0,
    0, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU,
    TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU,
    TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU, TK_U_LU,
    TK_U_LU, TK_U_LU, TK_U_LU, 0, 0, 0, 0, 0,
    0, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL,
    TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL,
    TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL, TK_U_LL,
    TK_U_LL, TK_U_LL, TK_U_LL, 0, 0, 0, 0, 0
};


uint32_t
tk_utf8_decode(const unsigned char **pp, const unsigned char *end)
{
    uint32_t              c, cp;
    const unsigned char  *p;

    p = *pp;
    c = p[0];

    if (c >= 0xc2 && c <= 0xdf) {
        if (end - p >= 2 && (p[1] & 0xc0) == 0x80) {
            *pp = p + 2;
            return ((c & 0x1f) << 6) | (p[1] & 0x3f);
        }

    } else if (c >= 0xe0 && c <= 0xef) {
        if (end - p >= 3 && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
            cp = ((c & 0x0f) << 12) | ((p[1] & 0x3f) << 6) | (p[2] & 0x3f);

            if (cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff)) {
                *pp = p + 3;
                return cp;
            }
        }

    } else if (c >= 0xf0 && c <= 0xf4) {
        if (end - p >= 4 && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80
            && (p[3] & 0xc0) == 0x80)
        {
            cp = ((c & 0x07) << 18) | ((p[1] & 0x3f) << 12)
                 | ((p[2] & 0x3f) << 6) | (p[3] & 0x3f);

            if (cp >= 0x10000 && cp <= 0x10ffff) {
                *pp = p + 4;
                return cp;
            }
        }
    }

    *pp = p + 1;
    return TK_INVALID_CP;
}


size_t
tk_piece(tk_pattern_e pattern, const unsigned char *p,
    const unsigned char *end)
{
    switch (pattern) {

    case TK_PAT_CL100K:
        return tk_scan_cl100k(p, end) - p;

    case TK_PAT_O200K:
        return tk_scan_o200k(p, end) - p;

    default:
        return tk_scan_r50k(p, end) - p;
    }
}


/*
 * (?i:'s|'t|'re|'ve|'m|'ll|'d) after the apostrophe at p[-1]; case folding
 * is Unicode simple case folding, where U+017F folds to "s"
 */

static tk_ptr_t
tk_contraction(tk_ptr_t p, tk_ptr_t end, int icase)
{
    uint32_t  c, c2, want;

    if (p >= end) {
        return NULL;
    }

    c = tk_utf8_next(&p, end);

    if (icase) {
        if (c >= 'A' && c <= 'Z') {
            c += 'a' - 'A';

        } else if (c == 0x17f) {
            c = 's';
        }
    }

    switch (c) {

    case 's':
    case 't':
    case 'm':
    case 'd':
        return p;

    case 'r':
    case 'v':
        want = 'e';
        break;

    case 'l':
        want = 'l';
        break;

    default:
        return NULL;
    }

    if (p >= end) {
        return NULL;
    }

    c2 = *p;

    if (icase && c2 >= 'A' && c2 <= 'Z') {
        c2 += 'a' - 'A';
    }

    return (c2 == want) ? p + 1 : NULL;
}


/*
 * skips characters that have a class in "in" and none in "out": ASCII in
 * a tight loop, inlined with the classes known, the rest out of line
 */

static tk_ptr_t
tk_skip_slow(tk_ptr_t p, tk_ptr_t end, unsigned in, unsigned out)
{
    unsigned  cl;
    uint32_t  c;
    tk_ptr_t  q;

    while (p < end) {
        q = p;
        c = *p;

        /* three bytes, as CJK has them, inline: not overlong, no surrogate */

        if ((c & 0xf0) == 0xe0 && end - p >= 3
            && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80
            && (c != 0xe0 || p[1] >= 0xa0) && (c != 0xed || p[1] < 0xa0))
        {
            c = (c & 0x0f) << 12 | (p[1] & 0x3f) << 6 | (p[2] & 0x3f);
            q += 3;

        } else {
            c = tk_utf8_next(&q, end);
        }

        cl = tk_class(c);

        if ((cl & in) == 0 || (cl & out) != 0) {
            return p;
        }

        p = q;
    }

    return p;
}


tk_inline tk_ptr_t
tk_skip(tk_ptr_t p, tk_ptr_t end, unsigned in, unsigned out)
{
    unsigned  cl;

    while (p < end && *p < 0x80) {
        cl = tk_ascii_class[*p];

        if ((cl & in) == 0 || (cl & out) != 0) {
            return p;
        }

        p++;
    }

    if (p == end) {
        return p;
    }

    return tk_skip_slow(p, end, in, out);
}


/* [^\s\p{L}\p{N}]+ */

tk_inline tk_ptr_t
tk_punct(tk_ptr_t p, tk_ptr_t end)
{
    while (p < end && *p < 0x80) {
        if (tk_ascii_class[*p] != 0) {
            return p;
        }

        p++;
    }

    if (p == end) {
        return p;
    }

    return tk_skip_slow(p, end, TK_U_ALL, TK_U_WS|TK_U_L|TK_U_N);
}


static tk_ptr_t
tk_digits(tk_ptr_t p, tk_ptr_t end, int max)
{
    int       n;
    tk_ptr_t  q;

    for (n = 0; p < end && n != max; n++) {
        q = p;

        if ((tk_class(tk_utf8_next(&q, end)) & TK_U_N) == 0) {
            break;
        }

        p = q;
    }

    return p;
}


/*
 * a piece that starts with white space: \s*[\r\n]+ (when "newlines"),
 * else \s+(?!\S), else \s+
 */

static tk_ptr_t
tk_space(tk_ptr_t start, tk_ptr_t end, int newlines)
{
    uint32_t  c;
    tk_ptr_t  p, q, last, nl;

    p = start;
    last = start;
    nl = NULL;

    while (p < end) {
        q = p;
        c = tk_utf8_next(&q, end);

        if ((tk_class(c) & TK_U_WS) == 0) {
            break;
        }

        if (c == '\r' || c == '\n') {
            nl = q;
        }

        last = p;
        p = q;
    }

    if (newlines && nl != NULL) {
        return nl;
    }

    if (p == end) {
        return p;
    }

    /* followed by \S: the last character goes with what follows */

    if (last > start) {
        return last;
    }

    return p;
}


/*
 * " ?[^\s\p{L}\p{N}]+" and the line ends after it, "/" too when "slash",
 * for the character c of class cl before q; NULL when it does not match
 */

static tk_ptr_t
tk_punct_piece(uint32_t c, unsigned cl, tk_ptr_t q, tk_ptr_t end, int slash)
{
    tk_ptr_t  r;

    if (c == ' ' && q < end) {
        r = q;

        if (tk_class(tk_utf8_next(&r, end)) & (TK_U_WS|TK_U_L|TK_U_N)) {
            return NULL;
        }

    } else if ((cl & TK_U_WS) == 0) {
        r = q;

    } else {
        return NULL;
    }

    r = tk_punct(r, end);

    while (r < end && (*r == '\r' || *r == '\n' || (slash && *r == '/'))) {
        r++;
    }

    return r;
}


static tk_ptr_t
tk_scan_r50k(tk_ptr_t p, tk_ptr_t end)
{
    unsigned  cl;
    uint32_t  c;
    tk_ptr_t  q, r;

    q = p;
    c = tk_utf8_next(&q, end);

    if (c == '\'') {
        r = tk_contraction(q, end, 0);
        if (r != NULL) {
            return r;
        }
    }

    if (c == ' ' && q < end) {
        r = q;
        cl = tk_class(tk_utf8_next(&r, end));

    } else {
        cl = tk_class(c);
        r = q;
    }

    /* r is after the first character of the class run */

    if (cl & TK_U_L) {
        return tk_skip(r, end, TK_U_L, 0);
    }

    if (cl & TK_U_N) {
        return tk_skip(r, end, TK_U_N, 0);
    }

    if ((cl & TK_U_WS) == 0) {
        return tk_punct(r, end);
    }

    return tk_space(p, end, 0);
}


static tk_ptr_t
tk_scan_cl100k(tk_ptr_t p, tk_ptr_t end)
{
    unsigned  cl, cl1;
    uint32_t  c;
    tk_ptr_t  q, r;

    q = p;
    c = tk_utf8_next(&q, end);
    cl = tk_class(c);

    if (c == '\'') {
        r = tk_contraction(q, end, 1);
        if (r != NULL) {
            return r;
        }
    }

    /* [^\r\n\p{L}\p{N}]?\p{L}+ */

    if (cl & TK_U_L) {
        return tk_skip(q, end, TK_U_L, 0);
    }

    if ((cl & TK_U_N) == 0 && c != '\r' && c != '\n' && q < end) {
        r = q;
        cl1 = tk_class(tk_utf8_next(&r, end));

        if (cl1 & TK_U_L) {
            return tk_skip(r, end, TK_U_L, 0);
        }
    }

    /* \p{N}{1,3} */

    if (cl & TK_U_N) {
        return tk_digits(q, end, 2);
    }

    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */

    r = tk_punct_piece(c, cl, q, end, 0);
    if (r != NULL) {
        return r;
    }

    return tk_space(p, end, 1);
}


static tk_ptr_t
tk_scan_o200k(tk_ptr_t p, tk_ptr_t end)
{
    unsigned  cl;
    uint32_t  c;
    tk_ptr_t  q, r;

    q = p;
    c = tk_utf8_next(&q, end);
    cl = tk_class(c);

    /*
     * the two word alternatives, each tried first with the optional
     * leading [^\r\n\p{L}\p{N}] and then without it
     */

    if ((cl & (TK_U_L|TK_U_N)) == 0 && c != '\r' && c != '\n') {
        /* may be the leading character */

        if (q < end) {
            r = tk_o200k_lower(q, end);
            if (r != NULL) {
                return r;
            }
        }

        if (cl & TK_U_M) {
            r = tk_o200k_lower(p, end);
            if (r != NULL) {
                return r;
            }
        }

        if (q < end) {
            r = tk_o200k_upper(q, end);
            if (r != NULL) {
                return r;
            }
        }

        if (cl & TK_U_M) {
            r = tk_o200k_upper(p, end);
            if (r != NULL) {
                return r;
            }
        }

    } else if (cl & TK_U_L) {
        r = tk_o200k_lower(p, end);
        if (r != NULL) {
            return r;
        }

        return tk_o200k_upper(p, end);
    }

    /* \p{N}{1,3} */

    if (cl & TK_U_N) {
        return tk_digits(q, end, 2);
    }

    /*  ?[^\s\p{L}\p{N}]+[\r\n/]* */

    r = tk_punct_piece(c, cl, q, end, 1);
    if (r != NULL) {
        return r;
    }

    return tk_space(p, end, 1);
}


/* an optional (?i:'s|'t|'re|'ve|'m|'ll|'d) at p */

static tk_ptr_t
tk_o200k_suffix(tk_ptr_t p, tk_ptr_t end)
{
    tk_ptr_t  r;

    if (p < end && *p == '\'') {
        r = tk_contraction(p + 1, end, 1);
        if (r != NULL) {
            return r;
        }
    }

    return p;
}


/*
 * [Lu Lt Lm Lo M]*[Ll Lm Lo M]+ at i: the upper run is greedy and gives
 * back characters until a lower one can follow
 */

static tk_ptr_t
tk_o200k_lower(tk_ptr_t i, tk_ptr_t end)
{
    unsigned  cl;
    tk_ptr_t  p, q, lower;

    p = i;
    lower = NULL;

    while (p < end) {
        q = p;
        cl = tk_class(tk_utf8_next(&q, end));

        if ((cl & TK_UPPERISH) == 0) {

            if (cl & TK_LOWERISH) {
                /* Ll: the lower run goes on from here */
                return tk_o200k_suffix(tk_skip(q, end, TK_LOWERISH, 0),
                                       end);
            }

            break;
        }

        if (cl & TK_LOWERISH) {
            lower = q;
        }

        p = q;
    }

    if (lower == NULL) {
        return NULL;
    }

    /* the last character of the upper run that is also lower */

    return tk_o200k_suffix(lower, end);
}


/* [Lu Lt Lm Lo M]+[Ll Lm Lo M]* at i */

static tk_ptr_t
tk_o200k_upper(tk_ptr_t i, tk_ptr_t end)
{
    tk_ptr_t  p;

    p = tk_skip(i, end, TK_UPPERISH, 0);

    if (p == i) {
        return NULL;
    }

    return tk_o200k_suffix(tk_skip(p, end, TK_LOWERISH, 0), end);
}
