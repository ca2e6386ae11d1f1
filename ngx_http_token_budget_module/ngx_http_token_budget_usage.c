
/*
 * Copyright (C) The token budget authors
 *
 * The "usage" an upstream reports, read as the response passes, piece by
 * piece, without keeping it: OpenAI's prompt_tokens and completion_tokens
 * (chat, completions, embeddings), input_tokens and output_tokens (the
 * Responses API), and Anthropic's input_tokens, cache_creation_input_tokens,
 * cache_read_input_tokens and output_tokens.
 *
 * A JSON response is one document.  A stream of server-sent events is
 * split into events, and each event's data is a document of its own; the
 * last value reported for each field wins (Anthropic reports the input in
 * message_start and the output, as it grows, in message_delta), and only
 * events that ended count, as for a client.  When a
 * stream reports no usage, the text it streams is counted instead: the
 * strings under a "delta" (chat chunks, Anthropic content_block_delta),
 * a Responses event's "delta", and a completions chunk's choices' "text".
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <yajl/yajl_parse.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_USAGE_PROMPT      0
#define NGX_HTTP_TB_USAGE_COMPLETION  1
#define NGX_HTTP_TB_USAGE_INPUT       2
#define NGX_HTTP_TB_USAGE_OUTPUT      3
#define NGX_HTTP_TB_USAGE_CACHE_NEW   4
#define NGX_HTTP_TB_USAGE_CACHE_READ  5
#define NGX_HTTP_TB_USAGE_OTHER       6
#define NGX_HTTP_TB_USAGE_MARK        7     /* the key "usage" */

/* the keys that matter for the streamed text */
#define NGX_HTTP_TB_KEY_NONE          0
#define NGX_HTTP_TB_KEY_DELTA         1
#define NGX_HTTP_TB_KEY_CHOICES       2
#define NGX_HTTP_TB_KEY_TEXT          3     /* "text" */
#define NGX_HTTP_TB_KEY_TEXTLIKE      4     /* content, partial_json, ... */
#define NGX_HTTP_TB_KEY_MESSAGE       5     /* Anthropic's message_start */

#define NGX_HTTP_TB_SSE_LINE          (1024 * 1024)


static ngx_int_t ngx_http_tb_usage_open(ngx_http_tb_usage_t *u);
static void ngx_http_tb_usage_close(ngx_http_tb_usage_t *u,
    ngx_uint_t complete);
static void ngx_http_tb_usage_line(ngx_http_tb_usage_t *u, u_char *p,
    size_t len);
static int ngx_http_tb_usage_number(void *data, const char *s, size_t len);
static int ngx_http_tb_usage_value(void *data);
static int ngx_http_tb_usage_bool(void *data, int v);
static int ngx_http_tb_usage_string(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_usage_start(ngx_http_tb_usage_t *u, ngx_uint_t array);
static int ngx_http_tb_usage_start_map(void *data);
static int ngx_http_tb_usage_start_array(void *data);
static int ngx_http_tb_usage_key(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_usage_end(void *data);
static void ngx_http_tb_usage_cleanup(void *data);
static void *ngx_http_tb_usage_malloc(void *ctx, size_t size);
static void *ngx_http_tb_usage_realloc(void *ctx, void *p, size_t size);
static void ngx_http_tb_usage_free(void *ctx, void *p);


static yajl_callbacks  ngx_http_tb_usage_callbacks = {
    ngx_http_tb_usage_value,
    ngx_http_tb_usage_bool,
    NULL,
    NULL,
    ngx_http_tb_usage_number,
    ngx_http_tb_usage_string,
    ngx_http_tb_usage_start_map,
    ngx_http_tb_usage_key,
    ngx_http_tb_usage_end,
    ngx_http_tb_usage_start_array,
    ngx_http_tb_usage_end
};


ngx_int_t
ngx_http_tb_usage_init(ngx_pool_t *pool, ngx_http_tb_usage_t *u,
    ngx_uint_t sse, tk_encoding_t *enc)
{
    ngx_pool_cleanup_t  *cln;

    ngx_memzero(u, sizeof(ngx_http_tb_usage_t));

    u->pool = pool;
    u->sse = sse;

    cln = ngx_pool_cleanup_add(pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_tb_usage_cleanup;
    cln->data = u;

    if (sse && enc) {
        tk_counter_init(&u->counter, enc);
        u->counting = 1;
    }

    if (!sse) {
        return ngx_http_tb_usage_open(u);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_usage_open(ngx_http_tb_usage_t *u)
{
    yajl_alloc_funcs  af, *afp;

    /*
     * a response's one document is parsed in the request pool; the
     * events of a stream, a handle each, in memory given back as they end
     */

    afp = NULL;

    if (!u->sse) {
        af.malloc = ngx_http_tb_usage_malloc;
        af.realloc = ngx_http_tb_usage_realloc;
        af.free = ngx_http_tb_usage_free;
        af.ctx = u->pool;
        afp = &af;
    }

    u->handle = yajl_alloc(&ngx_http_tb_usage_callbacks, afp, u);
    if (u->handle == NULL) {
        return NGX_ERROR;
    }

    u->depth = 0;
    u->in_usage = 0;
    u->in_delta = 0;
    u->partial = 0;
    u->ev_seen = 0;
    u->ev_final = 0;
    u->text_len = 0;
    u->key = NGX_HTTP_TB_USAGE_OTHER;
    u->key_id = NGX_HTTP_TB_KEY_NONE;
    u->failed = 0;

    return NGX_OK;
}


/*
 * "complete": the document or the event ended, and what it reported
 * counts; a stream cut inside an event loses the event, as a client would
 */

static void
ngx_http_tb_usage_close(ngx_http_tb_usage_t *u, ngx_uint_t complete)
{
    ngx_uint_t  i;

    if (u->handle == NULL) {
        return;
    }

    if (complete && !u->failed
        && yajl_complete_parse((yajl_handle) u->handle) != yajl_status_ok)
    {
        u->failed = 1;
    }

    yajl_free((yajl_handle) u->handle);
    u->handle = NULL;

    if (!complete || u->failed) {
        return;
    }

    for (i = 0; i < 6; i++) {
        if (u->ev_seen & (1 << i)) {
            u->value[i] = u->ev_value[i];
        }
    }

    u->seen |= u->ev_seen;
    u->final |= u->ev_final;

    if (u->text_len && u->counting) {
        if (tk_counter_feed(&u->counter, u->text, u->text_len) != TK_OK) {
            u->counting = 0;
        }

        u->counted = 1;
    }
}


void
ngx_http_tb_usage_feed(ngx_http_tb_usage_t *u, u_char *p, size_t len,
    ngx_uint_t last)
{
    u_char  *end, *eol, *buf;
    size_t   n, size;

    if (!u->sse) {
        if (u->handle == NULL || u->failed) {
            return;
        }

        if (len && yajl_parse((yajl_handle) u->handle, p, len)
                   != yajl_status_ok)
        {
            u->failed = 1;
            return;
        }

        if (last) {
            ngx_http_tb_usage_close(u, 1);
        }

        return;
    }

    /* server-sent events: lines end in CR LF, LF or CR */

    end = p + len;

    while (p < end) {

        if (u->skip_lf) {
            u->skip_lf = 0;

            if (*p == '\n') {
                p++;
                continue;
            }
        }

        for (eol = p; eol < end && *eol != '\n' && *eol != '\r'; eol++) {
            /* void */
        }

        n = eol - p;

        if (eol == end || u->line_len) {
            /* a line in pieces: keep it until its end */

            if (u->line_len + n > NGX_HTTP_TB_SSE_LINE) {
                u->line_len = 0;
                u->line_overflow = 1;

            } else if (!u->line_overflow) {
                if (u->line_len + n > u->line_size) {
                    size = ngx_max(2 * u->line_size, u->line_len + n);
                    size = ngx_max(size, 1024);

                    buf = ngx_pnalloc(u->pool, size);
                    if (buf == NULL) {
                        u->line_overflow = 1;
                        u->line_len = 0;
                        goto next;
                    }

                    ngx_memcpy(buf, u->line, u->line_len);
                    u->line = buf;
                    u->line_size = size;
                }

                ngx_memcpy(u->line + u->line_len, p, n);
                u->line_len += n;
            }

        next:

            if (eol == end) {
                break;
            }

            if (!u->line_overflow) {
                ngx_http_tb_usage_line(u, u->line, u->line_len);
            }

            u->line_len = 0;
            u->line_overflow = 0;

        } else {
            ngx_http_tb_usage_line(u, p, n);
        }

        if (*eol == '\r') {
            u->skip_lf = 1;
        }

        p = eol + 1;
    }

    if (last) {
        /* an event the stream did not end with an empty line is lost */

        u->line_len = 0;
        ngx_http_tb_usage_close(u, 0);
    }
}


static void
ngx_http_tb_usage_line(ngx_http_tb_usage_t *u, u_char *p, size_t len)
{
    if (len == 0) {
        /* the end of an event */
        ngx_http_tb_usage_close(u, 1);
        return;
    }

    if (len < 5 || ngx_strncmp(p, "data:", 5) != 0) {
        /* comments, event names, ids, retry */
        return;
    }

    p += 5;
    len -= 5;

    if (len && *p == ' ') {
        p++;
        len--;
    }

    if (len == 6 && ngx_strncmp(p, "[DONE]", 6) == 0) {
        return;
    }

    if (u->handle == NULL && ngx_http_tb_usage_open(u) != NGX_OK) {
        return;
    }

    if (u->failed) {
        return;
    }

    /* data lines of one event are joined by a line feed */

    if (yajl_parse((yajl_handle) u->handle, p, len) != yajl_status_ok
        || yajl_parse((yajl_handle) u->handle, (u_char *) "\n", 1)
           != yajl_status_ok)
    {
        u->failed = 1;
    }
}


static void
ngx_http_tb_usage_cleanup(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    ngx_http_tb_usage_close(u, 0);

    if (u->counting) {
        /* the count stays for the settlement, which may come later */

        u->output = tk_counter_peek(&u->counter);
        tk_counter_free(&u->counter);
        u->counting = 0;
        u->done = 1;
    }
}


static int
ngx_http_tb_usage_start_map(void *data)
{
    return ngx_http_tb_usage_start(data, 0);
}


static int
ngx_http_tb_usage_start_array(void *data)
{
    return ngx_http_tb_usage_start(data, 1);
}


static int
ngx_http_tb_usage_start(ngx_http_tb_usage_t *u, ngx_uint_t array)
{
    ngx_uint_t  id;

    /* "usage" at the top, or in an Anthropic "message" or a "response" */

    if (u->depth < 3 && u->key == NGX_HTTP_TB_USAGE_MARK) {
        u->in_usage = u->depth + 1;

        /* message_start's output is a placeholder, message_delta's counts */

        u->partial = (u->depth && u->depth <= NGX_HTTP_TB_USAGE_DEPTH
                      && (u->stack[u->depth - 1] & 0x7f)
                         == NGX_HTTP_TB_KEY_MESSAGE);
    }

    /* an array's elements sit under the array's key */

    if (u->depth && u->depth <= NGX_HTTP_TB_USAGE_DEPTH
        && (u->stack[u->depth - 1] & 0x80))
    {
        id = u->stack[u->depth - 1] & 0x7f;

    } else {
        id = u->key_id;
    }

    if (u->depth < NGX_HTTP_TB_USAGE_DEPTH) {
        u->stack[u->depth] = (u_char) (id | (array ? 0x80 : 0));
    }

    if (id == NGX_HTTP_TB_KEY_DELTA) {
        u->in_delta++;
    }

    u->depth++;
    u->key = NGX_HTTP_TB_USAGE_OTHER;
    u->key_id = NGX_HTTP_TB_KEY_NONE;

    return 1;
}


static int
ngx_http_tb_usage_end(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    if (u->in_usage == u->depth) {
        u->in_usage = 0;

        if (!u->partial) {
            u->ev_final = 1;
        }
    }

    u->depth--;

    if (u->depth < NGX_HTTP_TB_USAGE_DEPTH
        && (u->stack[u->depth] & 0x7f) == NGX_HTTP_TB_KEY_DELTA)
    {
        u->in_delta--;
    }

    u->key = NGX_HTTP_TB_USAGE_OTHER;
    u->key_id = NGX_HTTP_TB_KEY_NONE;

    return 1;
}


static int
ngx_http_tb_usage_key(void *data, const unsigned char *s, size_t len)
{
    ngx_http_tb_usage_t  *u = data;

    static struct {
        ngx_str_t   name;
        ngx_uint_t  key;
    } keys[] = {
        { ngx_string("prompt_tokens"), NGX_HTTP_TB_USAGE_PROMPT },
        { ngx_string("completion_tokens"), NGX_HTTP_TB_USAGE_COMPLETION },
        { ngx_string("input_tokens"), NGX_HTTP_TB_USAGE_INPUT },
        { ngx_string("output_tokens"), NGX_HTTP_TB_USAGE_OUTPUT },
        { ngx_string("cache_creation_input_tokens"),
          NGX_HTTP_TB_USAGE_CACHE_NEW },
        { ngx_string("cache_read_input_tokens"),
          NGX_HTTP_TB_USAGE_CACHE_READ },
        { ngx_null_string, 0 }
    };

    static struct {
        ngx_str_t   name;
        ngx_uint_t  id;
    } texts[] = {
        { ngx_string("delta"), NGX_HTTP_TB_KEY_DELTA },
        { ngx_string("choices"), NGX_HTTP_TB_KEY_CHOICES },
        { ngx_string("text"), NGX_HTTP_TB_KEY_TEXT },
        { ngx_string("content"), NGX_HTTP_TB_KEY_TEXTLIKE },
        { ngx_string("partial_json"), NGX_HTTP_TB_KEY_TEXTLIKE },
        { ngx_string("arguments"), NGX_HTTP_TB_KEY_TEXTLIKE },
        { ngx_string("refusal"), NGX_HTTP_TB_KEY_TEXTLIKE },
        { ngx_string("thinking"), NGX_HTTP_TB_KEY_TEXTLIKE },
        { ngx_string("message"), NGX_HTTP_TB_KEY_MESSAGE },
        { ngx_null_string, 0 }
    };

    ngx_uint_t  i;

    u->key = NGX_HTTP_TB_USAGE_OTHER;
    u->key_id = NGX_HTTP_TB_KEY_NONE;

    if (u->counting) {
        for (i = 0; texts[i].name.len; i++) {
            if (texts[i].name.len == len
                && ngx_strncmp(texts[i].name.data, s, len) == 0)
            {
                u->key_id = texts[i].id;
                break;
            }
        }
    }

    if (u->in_usage && u->in_usage == u->depth) {
        for (i = 0; keys[i].name.len; i++) {
            if (keys[i].name.len == len
                && ngx_strncmp(keys[i].name.data, s, len) == 0)
            {
                u->key = keys[i].key;
                break;
            }
        }

        return 1;
    }

    if (len == 5 && ngx_strncmp(s, "usage", 5) == 0) {
        u->key = NGX_HTTP_TB_USAGE_MARK;
    }

    return 1;
}


static int
ngx_http_tb_usage_number(void *data, const char *s, size_t len)
{
    ngx_http_tb_usage_t  *u = data;

    size_t    i;
    uint64_t  n;

    if (u->key >= NGX_HTTP_TB_USAGE_OTHER) {
        return ngx_http_tb_usage_value(data);
    }

    n = 0;

    for (i = 0; i < len && i < 12; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return ngx_http_tb_usage_value(data);
        }

        n = n * 10 + (s[i] - '0');
    }

    u->ev_value[u->key] = n;
    u->ev_seen |= 1 << u->key;

    return ngx_http_tb_usage_value(data);
}


static int
ngx_http_tb_usage_value(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    u->key = NGX_HTTP_TB_USAGE_OTHER;
    u->key_id = NGX_HTTP_TB_KEY_NONE;

    return 1;
}


static int
ngx_http_tb_usage_bool(void *data, int v)
{
    return ngx_http_tb_usage_value(data);
}


static int
ngx_http_tb_usage_string(void *data, const unsigned char *s, size_t len)
{
    ngx_http_tb_usage_t  *u = data;

    u_char      *buf;
    size_t       size;
    ngx_uint_t   parent, count;

    if (!u->counting || u->key_id == NGX_HTTP_TB_KEY_NONE) {
        return ngx_http_tb_usage_value(data);
    }

    parent = (u->depth && u->depth <= NGX_HTTP_TB_USAGE_DEPTH)
             ? (ngx_uint_t) (u->stack[u->depth - 1] & 0x7f)
             : NGX_HTTP_TB_KEY_NONE;

    count = 0;

    if (u->in_delta
        && (u->key_id == NGX_HTTP_TB_KEY_TEXT
            || u->key_id == NGX_HTTP_TB_KEY_TEXTLIKE))
    {
        /* chat chunks' delta, Anthropic's content_block_delta */
        count = 1;

    } else if (u->depth == 1 && u->key_id == NGX_HTTP_TB_KEY_DELTA) {
        /* a Responses API *.delta event */
        count = 1;

    } else if (parent == NGX_HTTP_TB_KEY_CHOICES
               && u->key_id == NGX_HTTP_TB_KEY_TEXT)
    {
        /* a completions chunk */
        count = 1;
    }

    if (count && len) {
        if (u->text_len + len > u->text_size) {
            size = ngx_max(2 * u->text_size, u->text_len + len);
            size = ngx_max(size, 256);

            buf = ngx_pnalloc(u->pool, size);
            if (buf == NULL) {
                u->counting = 0;
                return 0;
            }

            ngx_memcpy(buf, u->text, u->text_len);
            u->text = buf;
            u->text_size = size;
        }

        ngx_memcpy(u->text + u->text_len, s, len);
        u->text_len += len;
    }

    return ngx_http_tb_usage_value(data);
}


/* the prompt and output tokens reported, NGX_DECLINED when none were */

ngx_int_t
ngx_http_tb_usage_get(ngx_http_tb_usage_t *u, uint64_t *prompt,
    uint64_t *output)
{
    if (u->sse && !u->final) {
        /* only message_start's, or none: the output is what was counted */
        return NGX_DECLINED;
    }

    if (u->seen & (1 << NGX_HTTP_TB_USAGE_PROMPT)) {
        *prompt = u->value[NGX_HTTP_TB_USAGE_PROMPT];
        *output = u->value[NGX_HTTP_TB_USAGE_COMPLETION];
        return NGX_OK;
    }

    if (u->seen & ((1 << NGX_HTTP_TB_USAGE_INPUT)
                   | (1 << NGX_HTTP_TB_USAGE_OUTPUT)))
    {
        *prompt = u->value[NGX_HTTP_TB_USAGE_INPUT]
                  + u->value[NGX_HTTP_TB_USAGE_CACHE_NEW]
                  + u->value[NGX_HTTP_TB_USAGE_CACHE_READ];
        *output = u->value[NGX_HTTP_TB_USAGE_OUTPUT];
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/* the streamed output counted here, NGX_DECLINED when none was */

ngx_int_t
ngx_http_tb_usage_counted(ngx_http_tb_usage_t *u, uint64_t *output)
{
    int64_t  n;

    if (!u->sse || !u->counted) {
        return NGX_DECLINED;
    }

    n = u->counting ? tk_counter_peek(&u->counter)
                    : (u->done ? u->output : -1);

    if (n < 0) {
        return NGX_DECLINED;
    }

    *output = (uint64_t) n;

    return NGX_OK;
}


/* yajl's memory in the pool: each block after its size */

static void *
ngx_http_tb_usage_malloc(void *ctx, size_t size)
{
    size_t  *p;

    p = ngx_palloc(ctx, sizeof(size_t) + size);
    if (p == NULL) {
        return NULL;
    }

    *p = size;

    return p + 1;
}


static void *
ngx_http_tb_usage_realloc(void *ctx, void *p, size_t size)
{
    void    *n;
    size_t  *old;

    n = ngx_http_tb_usage_malloc(ctx, size);

    if (n == NULL || p == NULL) {
        return n;
    }

    old = (size_t *) p - 1;

    ngx_memcpy(n, p, ngx_min(*old, size));
    ngx_pfree(ctx, old);

    return n;
}


static void
ngx_http_tb_usage_free(void *ctx, void *p)
{
    if (p != NULL) {
        /* a large block goes back now, a small one with the pool */
        ngx_pfree(ctx, (size_t *) p - 1);
    }
}
