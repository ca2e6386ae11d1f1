
/*
 * Copyright (C) The token budget authors
 *
 * Counting text that arrives in chunks.  The counter keeps the text it
 * has not committed yet, and commits it up to the last piece boundary
 * that more text cannot move.  Such a boundary has a character other than
 * white space before it, a character that is neither a letter, a mark nor
 * white space after it (so no run of letters, marks or spaces crosses it),
 * and enough text after it for the contraction look-ahead.  The pending
 * text is scanned again only once it has grown by half, so the work stays
 * linear when no boundary comes for a long time.
 */


#include "tk_internal.h"


#define TK_COUNTER_STEP       256
#define TK_COUNTER_LOOKAHEAD  16


static int tk_counter_commit(tk_counter_t *c);
static unsigned tk_last_class(const unsigned char *p, const unsigned char *e,
    const unsigned char *end);


void
tk_counter_init(tk_counter_t *c, const tk_encoding_t *enc)
{
    memset(c, 0, sizeof(tk_counter_t));
    c->enc = enc;
    c->allocator = enc->allocator;
}


int
tk_counter_feed(tk_counter_t *c, const unsigned char *p, size_t len)
{
    size_t          size;
    unsigned char  *buf;

    if (c->error) {
        return c->error;
    }

    if (len == 0) {
        return TK_OK;
    }

    if (c->len + len > c->size) {
        for (size = c->size ? c->size : 1024; size < c->len + len; size *= 2) {
            /* void */
        }

        buf = tk_alloc(&c->allocator, size);
        if (buf == NULL) {
            c->error = TK_ENOMEM;
            return c->error;
        }

        if (c->len) {
            memcpy(buf, c->buf, c->len);
        }

        tk_free(&c->allocator, c->buf);
        c->buf = buf;
        c->size = size;
    }

    memcpy(c->buf + c->len, p, len);
    c->len += len;

    if (c->len - c->scanned >= TK_COUNTER_STEP
        && c->len - c->scanned >= c->scanned / 2)
    {
        return tk_counter_commit(c);
    }

    return TK_OK;
}


int64_t
tk_counter_finish(tk_counter_t *c)
{
    int64_t  n;

    n = tk_counter_peek(c);

    tk_counter_free(c);

    return n;
}


int64_t
tk_counter_peek(tk_counter_t *c)
{
    int64_t  n;

    if (c->error) {
        return c->error;
    }

    n = tk_count(c->enc, c->buf, c->len);

    if (n < 0) {
        return n;
    }

    return (int64_t) c->count + n;
}


void
tk_counter_free(tk_counter_t *c)
{
    tk_free(&c->allocator, c->buf);
    c->buf = NULL;
    c->len = 0;
    c->size = 0;
    c->scanned = 0;
}


static int
tk_counter_commit(tk_counter_t *c)
{
    size_t                n;
    uint32_t              cp;
    tk_out_t              out;
    const unsigned char  *p, *q, *e, *end, *safe;

    end = c->buf + c->len;
    safe = c->buf;

    if (c->len > TK_COUNTER_LOOKAHEAD) {

        for (p = c->buf; p < end; p = e) {
            e = p + tk_piece(c->enc->pattern, p, end);

            if (e > end - TK_COUNTER_LOOKAHEAD) {
                break;
            }

            q = e;
            cp = tk_utf8_next(&q, end);

            if ((tk_class(cp) & (TK_U_WS|TK_U_L|TK_U_M)) == 0
                && (tk_last_class(p, e, end) & TK_U_WS) == 0)
            {
                safe = e;
            }
        }
    }

    if (safe > c->buf) {
        out.ids = NULL;
        out.max = 0;
        out.n = 0;

        for (p = c->buf; p < safe; p += n) {
            n = tk_piece(c->enc->pattern, p, end);

            if (tk_bpe(c->enc, p, n, &out) != TK_OK) {
                c->error = TK_ENOMEM;
                return c->error;
            }
        }

        c->count += out.n;
        c->len = end - safe;
        memmove(c->buf, safe, c->len);
    }

    c->scanned = c->len;

    return TK_OK;
}


/* the class of the last character of the piece from p to e */

static unsigned
tk_last_class(const unsigned char *p, const unsigned char *e,
    const unsigned char *end)
{
    uint32_t  cp;

    cp = 0;

    while (p < e) {
        cp = tk_utf8_next(&p, end);
    }

    return tk_class(cp);
}
