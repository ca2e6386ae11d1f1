
/*
 * Copyright (C) The token budget authors
 *
 * A request body as a tree in the request pool, parsed by yajl in one
 * pass: strings decoded and checked as UTF-8, duplicate keys and deep
 * nesting refused.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <yajl/yajl_parse.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_JSON_DEPTH  64


typedef struct {
    ngx_pool_t                  *pool;
    ngx_http_tb_json_t          *root;
    ngx_http_tb_json_t          *stack[NGX_HTTP_TB_JSON_DEPTH];
    ngx_http_tb_json_t          *last[NGX_HTTP_TB_JSON_DEPTH];
    ngx_uint_t                   depth;
    ngx_str_t                    key;
    ngx_uint_t                   has_key;
    const char                  *error;
    void                        *handle;    /* yajl_handle */
    size_t                       end;       /* of the root, once closed */
} ngx_http_tb_json_ctx_t;


static ngx_http_tb_json_t *ngx_http_tb_json_add(ngx_http_tb_json_ctx_t *ctx,
    ngx_uint_t type);
static int ngx_http_tb_json_null(void *data);
static int ngx_http_tb_json_boolean(void *data, int value);
static int ngx_http_tb_json_number(void *data, const char *s, size_t len);
static int ngx_http_tb_json_string(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_json_start_map(void *data);
static int ngx_http_tb_json_map_key(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_json_end(void *data);
static int ngx_http_tb_json_start_array(void *data);
static ngx_int_t ngx_http_tb_json_unique(ngx_http_tb_json_ctx_t *ctx,
    ngx_http_tb_json_t *obj);
static int ngx_libc_cdecl ngx_http_tb_json_key_cmp(const void *a,
    const void *b);
static size_t ngx_http_tb_json_len(ngx_http_tb_json_t *v);
static u_char *ngx_http_tb_json_write(u_char *p, ngx_http_tb_json_t *v);
static size_t ngx_http_tb_json_str_len(ngx_str_t *s);
static u_char *ngx_http_tb_json_str_write(u_char *p, ngx_str_t *s);


static ngx_int_t ngx_http_tb_json_utf8(const u_char *p, size_t len);
static ngx_int_t ngx_http_tb_json_surrogates(u_char *p, size_t len);


static yajl_callbacks  ngx_http_tb_json_callbacks = {
    ngx_http_tb_json_null,
    ngx_http_tb_json_boolean,
    NULL,
    NULL,
    ngx_http_tb_json_number,
    ngx_http_tb_json_string,
    ngx_http_tb_json_start_map,
    ngx_http_tb_json_map_key,
    ngx_http_tb_json_end,
    ngx_http_tb_json_start_array,
    ngx_http_tb_json_end
};


ngx_int_t
ngx_http_tb_json_parse(ngx_pool_t *pool, u_char *data, size_t len,
    ngx_http_tb_json_t **root, ngx_str_t *err)
{
    size_t                   at;
    ngx_uint_t               truncated;
    yajl_handle              h;
    yajl_status              st;
    ngx_http_tb_json_ctx_t  *ctx, parse;

    /* the parser's state lives only as long as the parse */

    ctx = &parse;
    ngx_memzero(ctx, sizeof(ngx_http_tb_json_ctx_t));

    ctx->pool = pool;

    if (ngx_http_tb_json_surrogates(data, len) != NGX_OK) {
        ngx_str_set(err, "the JSON body has an unpaired surrogate escape");
        return NGX_DECLINED;
    }

    h = yajl_alloc(&ngx_http_tb_json_callbacks, NULL, ctx);
    if (h == NULL) {
        return NGX_ERROR;
    }

    ctx->handle = h;

    /* every string and key is checked as strict UTF-8 here, faster */

    yajl_config(h, yajl_dont_validate_strings, 1);

    truncated = 0;
    st = yajl_parse(h, data, len);
    at = yajl_get_bytes_consumed(h);

    if (st == yajl_status_ok) {
        st = yajl_complete_parse(h);
        truncated = 1;
    }

    if (st == yajl_status_ok && ctx->end) {

        /*
         * yajl lets the end of a document be followed by a token it has
         * not finished, "x or tru: only white space may follow
         */

        for (at = ctx->end; at < len; at++) {
            if (data[at] != ' ' && data[at] != '\t' && data[at] != '\n'
                && data[at] != '\r' && data[at] != '\v' && data[at] != '\f')
            {
                yajl_free(h);
                ngx_str_set(err, "the body is not valid JSON "
                                 "(data after the end)");
                return NGX_DECLINED;
            }
        }
    }

    if (st != yajl_status_ok) {
        yajl_free(h);

        if (ctx->error == NULL && st == yajl_status_client_canceled) {
            return NGX_ERROR;
        }

        err->data = ngx_pnalloc(pool, 128);
        if (err->data == NULL) {
            return NGX_ERROR;
        }

        if (ctx->error != NULL) {
            err->len = ngx_snprintf(err->data, 128, "%s", ctx->error)
                       - err->data;

        } else if (truncated) {
            err->len = ngx_snprintf(err->data, 128,
                                    "the JSON body is truncated")
                       - err->data;

        } else {
            err->len = ngx_snprintf(err->data, 128,
                                    "the body is not valid JSON "
                                    "(near byte %uz)", at)
                       - err->data;
        }

        return NGX_DECLINED;
    }

    yajl_free(h);

    if (ctx->root == NULL) {
        ngx_str_set(err, "the body is empty");
        return NGX_DECLINED;
    }

    *root = ctx->root;

    return NGX_OK;
}


ngx_http_tb_json_t *
ngx_http_tb_json_get(ngx_http_tb_json_t *obj, const char *key)
{
    size_t               len;
    ngx_http_tb_json_t  *v;

    if (obj == NULL || obj->type != NGX_HTTP_TB_JSON_OBJECT) {
        return NULL;
    }

    len = ngx_strlen(key);

    for (v = obj->first; v; v = v->next) {
        if (v->key.len == len && ngx_memcmp(v->key.data, key, len) == 0) {
            return v;
        }
    }

    return NULL;
}


static ngx_http_tb_json_t *
ngx_http_tb_json_add(ngx_http_tb_json_ctx_t *ctx, ngx_uint_t type)
{
    ngx_http_tb_json_t  *v, *parent;

    v = ngx_palloc(ctx->pool, sizeof(ngx_http_tb_json_t));
    if (v == NULL) {
        return NULL;
    }

    v->type = type;
    v->first = NULL;
    v->next = NULL;
    v->n = 0;
    ngx_str_null(&v->str);
    ngx_str_null(&v->key);

    if (ctx->depth == 0) {
        ctx->root = v;
        return v;
    }

    parent = ctx->stack[ctx->depth - 1];

    if (parent->type == NGX_HTTP_TB_JSON_OBJECT) {
        v->key = ctx->key;
        ctx->has_key = 0;
    }

    if (ctx->last[ctx->depth - 1] == NULL) {
        parent->first = v;

    } else {
        ctx->last[ctx->depth - 1]->next = v;
    }

    ctx->last[ctx->depth - 1] = v;
    parent->n++;

    return v;
}


static int
ngx_http_tb_json_null(void *data)
{
    return ngx_http_tb_json_add(data, NGX_HTTP_TB_JSON_NULL) != NULL;
}


static int
ngx_http_tb_json_boolean(void *data, int value)
{
    return ngx_http_tb_json_add(data, value ? NGX_HTTP_TB_JSON_TRUE
                                            : NGX_HTTP_TB_JSON_FALSE)
           != NULL;
}


static int
ngx_http_tb_json_number(void *data, const char *s, size_t len)
{
    ngx_http_tb_json_t      *v;
    ngx_http_tb_json_ctx_t  *ctx;

    ctx = data;

    v = ngx_http_tb_json_add(ctx, NGX_HTTP_TB_JSON_NUMBER);
    if (v == NULL) {
        return 0;
    }

    v->str.data = ngx_pnalloc(ctx->pool, len);
    if (v->str.data == NULL) {
        return 0;
    }

    ngx_memcpy(v->str.data, s, len);
    v->str.len = len;

    return 1;
}


static int
ngx_http_tb_json_string(void *data, const unsigned char *s, size_t len)
{
    ngx_http_tb_json_t      *v;
    ngx_http_tb_json_ctx_t  *ctx;

    ctx = data;

    if (ngx_http_tb_json_utf8(s, len) != NGX_OK) {
        ctx->error = "the JSON body has a string that is not valid UTF-8";
        return 0;
    }

    v = ngx_http_tb_json_add(ctx, NGX_HTTP_TB_JSON_STRING);
    if (v == NULL) {
        return 0;
    }

    v->str.data = ngx_pnalloc(ctx->pool, len ? len : 1);
    if (v->str.data == NULL) {
        return 0;
    }

    ngx_memcpy(v->str.data, s, len);
    v->str.len = len;

    return 1;
}


static int
ngx_http_tb_json_start(ngx_http_tb_json_ctx_t *ctx, ngx_uint_t type)
{
    ngx_http_tb_json_t  *v;

    if (ctx->depth == NGX_HTTP_TB_JSON_DEPTH) {
        ctx->error = "the JSON body is nested too deeply";
        return 0;
    }

    v = ngx_http_tb_json_add(ctx, type);
    if (v == NULL) {
        return 0;
    }

    ctx->stack[ctx->depth] = v;
    ctx->last[ctx->depth] = NULL;
    ctx->depth++;

    return 1;
}


static int
ngx_http_tb_json_start_map(void *data)
{
    return ngx_http_tb_json_start(data, NGX_HTTP_TB_JSON_OBJECT);
}


static int
ngx_http_tb_json_start_array(void *data)
{
    return ngx_http_tb_json_start(data, NGX_HTTP_TB_JSON_ARRAY);
}


static int
ngx_http_tb_json_map_key(void *data, const unsigned char *s, size_t len)
{
    ngx_http_tb_json_ctx_t  *ctx;

    ctx = data;

    if (ngx_http_tb_json_utf8(s, len) != NGX_OK) {
        ctx->error = "the JSON body has a key that is not valid UTF-8";
        return 0;
    }

    ctx->key.data = ngx_pnalloc(ctx->pool, len ? len : 1);
    if (ctx->key.data == NULL) {
        return 0;
    }

    ngx_memcpy(ctx->key.data, s, len);
    ctx->key.len = len;
    ctx->has_key = 1;

    return 1;
}


static int
ngx_http_tb_json_end(void *data)
{
    ngx_http_tb_json_t      *v;
    ngx_http_tb_json_ctx_t  *ctx;

    ctx = data;

    ctx->depth--;
    v = ctx->stack[ctx->depth];

    if (ctx->depth == 0) {
        /* yajl's offset is past the token that closed the root */
        ctx->end = yajl_get_bytes_consumed(ctx->handle);
    }

    if (v->type == NGX_HTTP_TB_JSON_OBJECT && v->n > 1) {
        if (ngx_http_tb_json_unique(ctx, v) != NGX_OK) {
            return 0;
        }
    }

    return 1;
}


/*
 * upstreams keep the last of duplicate keys, a counter might count the
 * first: a body with duplicate keys is refused
 */

static ngx_int_t
ngx_http_tb_json_unique(ngx_http_tb_json_ctx_t *ctx, ngx_http_tb_json_t *obj)
{
    ngx_uint_t            i, j;
    ngx_http_tb_json_t   *a, *b, **keys;

    if (obj->n <= 8) {
        for (a = obj->first; a; a = a->next) {
            for (b = a->next; b; b = b->next) {
                if (a->key.len == b->key.len
                    && ngx_memcmp(a->key.data, b->key.data, a->key.len) == 0)
                {
                    ctx->error = "the JSON body has a duplicate key";
                    return NGX_ERROR;
                }
            }
        }

        return NGX_OK;
    }

    keys = ngx_palloc(ctx->pool, obj->n * sizeof(ngx_http_tb_json_t *));
    if (keys == NULL) {
        return NGX_ERROR;
    }

    for (i = 0, a = obj->first; a; a = a->next) {
        keys[i++] = a;
    }

    ngx_qsort(keys, obj->n, sizeof(ngx_http_tb_json_t *),
              ngx_http_tb_json_key_cmp);

    for (j = 1; j < obj->n; j++) {
        if (ngx_http_tb_json_key_cmp(&keys[j - 1], &keys[j]) == 0) {
            ctx->error = "the JSON body has a duplicate key";
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static int ngx_libc_cdecl
ngx_http_tb_json_key_cmp(const void *one, const void *two)
{
    int                  rc;
    ngx_http_tb_json_t  *a, *b;

    a = *(ngx_http_tb_json_t **) one;
    b = *(ngx_http_tb_json_t **) two;

    rc = ngx_memcmp(a->key.data, b->key.data, ngx_min(a->key.len, b->key.len));

    if (rc != 0) {
        return rc;
    }

    return (a->key.len > b->key.len) - (a->key.len < b->key.len);
}


/* the tree back to JSON, for a body the module changed */

ngx_int_t
ngx_http_tb_json_print(ngx_pool_t *pool, ngx_http_tb_json_t *root,
    ngx_str_t *out)
{
    size_t   len;
    u_char  *p;

    len = ngx_http_tb_json_len(root);

    out->data = ngx_pnalloc(pool, len);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_http_tb_json_write(out->data, root);
    out->len = p - out->data;

    return NGX_OK;
}


static size_t
ngx_http_tb_json_len(ngx_http_tb_json_t *v)
{
    size_t               len;
    ngx_http_tb_json_t  *c;

    switch (v->type) {

    case NGX_HTTP_TB_JSON_NULL:
    case NGX_HTTP_TB_JSON_TRUE:
        return 4;

    case NGX_HTTP_TB_JSON_FALSE:
        return 5;

    case NGX_HTTP_TB_JSON_NUMBER:
        return v->str.len;

    case NGX_HTTP_TB_JSON_STRING:
        return ngx_http_tb_json_str_len(&v->str);

    default:
        len = 2;

        for (c = v->first; c; c = c->next) {
            len += ngx_http_tb_json_len(c) + 1;

            if (v->type == NGX_HTTP_TB_JSON_OBJECT) {
                len += ngx_http_tb_json_str_len(&c->key) + 1;
            }
        }

        return len;
    }
}


static u_char *
ngx_http_tb_json_write(u_char *p, ngx_http_tb_json_t *v)
{
    ngx_http_tb_json_t  *c;

    switch (v->type) {

    case NGX_HTTP_TB_JSON_NULL:
        return ngx_cpymem(p, "null", 4);

    case NGX_HTTP_TB_JSON_TRUE:
        return ngx_cpymem(p, "true", 4);

    case NGX_HTTP_TB_JSON_FALSE:
        return ngx_cpymem(p, "false", 5);

    case NGX_HTTP_TB_JSON_NUMBER:
        return ngx_cpymem(p, v->str.data, v->str.len);

    case NGX_HTTP_TB_JSON_STRING:
        return ngx_http_tb_json_str_write(p, &v->str);

    default:
        *p++ = (v->type == NGX_HTTP_TB_JSON_OBJECT) ? '{' : '[';

        for (c = v->first; c; c = c->next) {
            if (c != v->first) {
                *p++ = ',';
            }

            if (v->type == NGX_HTTP_TB_JSON_OBJECT) {
                p = ngx_http_tb_json_str_write(p, &c->key);
                *p++ = ':';
            }

            p = ngx_http_tb_json_write(p, c);
        }

        *p++ = (v->type == NGX_HTTP_TB_JSON_OBJECT) ? '}' : ']';

        return p;
    }
}


static size_t
ngx_http_tb_json_str_len(ngx_str_t *s)
{
    size_t  i, len;

    len = 2;

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == '"' || s->data[i] == '\\') {
            len += 2;

        } else if (s->data[i] < 0x20) {
            len += 6;

        } else {
            len++;
        }
    }

    return len;
}


static u_char *
ngx_http_tb_json_str_write(u_char *p, ngx_str_t *s)
{
    size_t  i;

    *p++ = '"';

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == '"' || s->data[i] == '\\') {
            *p++ = '\\';
            *p++ = s->data[i];

        } else if (s->data[i] < 0x20) {
            p = ngx_cpymem(p, "\\u00", 4);
            *p++ = "0123456789abcdef"[s->data[i] >> 4];
            *p++ = "0123456789abcdef"[s->data[i] & 0xf];

        } else {
            *p++ = s->data[i];
        }
    }

    *p++ = '"';

    return p;
}


/* strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF */

static ngx_int_t
ngx_http_tb_json_utf8(const u_char *p, size_t len)
{
    uint64_t       w;
    const u_char  *end;

    end = p + len;

    while (p < end) {

        /* ASCII eight bytes at a time */

        while (end - p >= 8) {
            ngx_memcpy(&w, p, 8);

            if (w & 0x8080808080808080ULL) {
                break;
            }

            p += 8;
        }

        if (p == end) {
            break;
        }

        if (*p < 0x80) {
            p++;
            continue;
        }

        if (*p >= 0xc2 && *p <= 0xdf) {
            if (end - p < 2 || (p[1] & 0xc0) != 0x80) {
                return NGX_ERROR;
            }

            p += 2;
            continue;
        }

        if (*p >= 0xe0 && *p <= 0xef) {
            if (end - p < 3 || (p[1] & 0xc0) != 0x80
                || (p[2] & 0xc0) != 0x80
                || (*p == 0xe0 && p[1] < 0xa0)
                || (*p == 0xed && p[1] >= 0xa0))
            {
                return NGX_ERROR;
            }

            p += 3;
            continue;
        }

        if (*p >= 0xf0 && *p <= 0xf4) {
            if (end - p < 4 || (p[1] & 0xc0) != 0x80
                || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80
                || (*p == 0xf0 && p[1] < 0x90)
                || (*p == 0xf4 && p[1] >= 0x90))
            {
                return NGX_ERROR;
            }

            p += 4;
            continue;
        }

        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * yajl turns an unpaired surrogate escape into some other character, where
 * the provider sees U+FFFD: such bodies are refused.  Backslashes appear
 * only inside strings of valid JSON, so the escapes are found without
 * following the strings.
 */

static ngx_int_t
ngx_http_tb_json_surrogates(u_char *p, size_t len)
{
    u_char      *end;
    ngx_int_t    hi, lo;

    end = p + len;

    p = memchr(p, '\\', end - p);

    while (p != NULL && end - p >= 2) {

        if (p[1] != 'u') {
            p = memchr(p + 2, '\\', end - p - 2);
            continue;
        }

        if (end - p < 6) {
            return NGX_OK;
        }

        hi = ngx_hextoi(p + 2, 4);

        if (hi >= 0xdc00 && hi <= 0xdfff) {
            return NGX_ERROR;
        }

        if (hi >= 0xd800 && hi <= 0xdbff) {
            if (end - p < 12 || p[6] != '\\' || p[7] != 'u') {
                return NGX_ERROR;
            }

            lo = ngx_hextoi(p + 8, 4);

            if (lo < 0xdc00 || lo > 0xdfff) {
                return NGX_ERROR;
            }

            p += 6;
        }

        p = (end - p > 6) ? memchr(p + 6, '\\', end - p - 6) : NULL;
    }

    return NGX_OK;
}


/*
 * the member "usage": null of an OpenAI chunk, with the comma that joins
 * it to the others; a quoted key cannot occur inside a JSON string, where
 * quotes are escaped, so the first one found outside nested objects is it
 */

u_char *
ngx_http_tb_null_usage(u_char *p, size_t len, u_char **cut_end)
{
    u_char      *end, *q, *k, *start;
    ngx_uint_t   depth, in_string;

    end = p + len;
    depth = 0;
    in_string = 0;

    for (q = p; q < end; q++) {

        if (in_string) {
            if (*q == '\\') {
                q++;

            } else if (*q == '"') {
                in_string = 0;
            }

            continue;
        }

        switch (*q) {

        case '{':
        case '[':
            depth++;
            continue;

        case '}':
        case ']':
            depth--;
            continue;

        case '"':
            break;

        default:
            continue;
        }

        if (depth != 1 || end - q < 7 || ngx_strncmp(q, "\"usage\"", 7) != 0)
        {
            in_string = 1;
            continue;
        }

        /* "usage" <ws> : <ws> null */

        k = q + 7;

        while (k < end && (*k == ' ' || *k == '\t')) {
            k++;
        }

        if (k == end || *k != ':') {
            in_string = 1;
            continue;
        }

        k++;

        while (k < end && (*k == ' ' || *k == '\t')) {
            k++;
        }

        if (end - k < 4 || ngx_strncmp(k, "null", 4) != 0) {
            in_string = 1;
            continue;
        }

        k += 4;

        /* the comma before it, else the one after it */

        start = q;

        while (start > p && (start[-1] == ' ' || start[-1] == '\t')) {
            start--;
        }

        if (start > p && start[-1] == ',') {
            *cut_end = k;
            return start - 1;
        }

        while (k < end && (*k == ' ' || *k == '\t')) {
            k++;
        }

        if (k < end && *k == ',') {
            *cut_end = k + 1;
            return q;
        }

        *cut_end = k;
        return q;
    }

    return NULL;
}
