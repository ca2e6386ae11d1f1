
/*
 * Copyright (C) The token budget authors
 *
 * The "usage" an upstream reports in a JSON response, read as the body
 * passes, piece by piece, without keeping it: OpenAI's prompt_tokens and
 * completion_tokens (chat, completions, embeddings), input_tokens and
 * output_tokens (the Responses API), and Anthropic's input_tokens,
 * cache_creation_input_tokens, cache_read_input_tokens and output_tokens.
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


static int ngx_http_tb_usage_number(void *data, const char *s, size_t len);
static int ngx_http_tb_usage_value(void *data);
static int ngx_http_tb_usage_bool(void *data, int v);
static int ngx_http_tb_usage_string(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_usage_start(void *data);
static int ngx_http_tb_usage_key(void *data, const unsigned char *s,
    size_t len);
static int ngx_http_tb_usage_end(void *data);
static void ngx_http_tb_usage_cleanup(void *data);


static yajl_callbacks  ngx_http_tb_usage_callbacks = {
    ngx_http_tb_usage_value,
    ngx_http_tb_usage_bool,
    NULL,
    NULL,
    ngx_http_tb_usage_number,
    ngx_http_tb_usage_string,
    ngx_http_tb_usage_start,
    ngx_http_tb_usage_key,
    ngx_http_tb_usage_end,
    ngx_http_tb_usage_start,
    ngx_http_tb_usage_end
};


ngx_int_t
ngx_http_tb_usage_init(ngx_pool_t *pool, ngx_http_tb_usage_t *u)
{
    ngx_pool_cleanup_t  *cln;

    ngx_memzero(u, sizeof(ngx_http_tb_usage_t));

    u->handle = yajl_alloc(&ngx_http_tb_usage_callbacks, NULL, u);
    if (u->handle == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(pool, 0);
    if (cln == NULL) {
        yajl_free((yajl_handle) u->handle);
        u->handle = NULL;
        return NGX_ERROR;
    }

    cln->handler = ngx_http_tb_usage_cleanup;
    cln->data = u;

    return NGX_OK;
}


void
ngx_http_tb_usage_feed(ngx_http_tb_usage_t *u, u_char *p, size_t len,
    ngx_uint_t last)
{
    if (u->handle == NULL || u->failed) {
        return;
    }

    if (len && yajl_parse((yajl_handle) u->handle, p, len) != yajl_status_ok) {
        u->failed = 1;
        return;
    }

    if (last && yajl_complete_parse((yajl_handle) u->handle) != yajl_status_ok) {
        u->failed = 1;
    }
}


static void
ngx_http_tb_usage_cleanup(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    if (u->handle) {
        yajl_free((yajl_handle) u->handle);
        u->handle = NULL;
    }
}


static int
ngx_http_tb_usage_start(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    /* "usage" at the top, or in an Anthropic "message" or a "response" */

    if (u->depth < 3 && u->key == NGX_HTTP_TB_USAGE_OTHER + 1) {
        u->in_usage = u->depth + 1;
    }

    u->depth++;
    u->key = NGX_HTTP_TB_USAGE_OTHER;

    return 1;
}


static int
ngx_http_tb_usage_end(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    if (u->in_usage == u->depth) {
        u->in_usage = 0;
    }

    u->depth--;
    u->key = NGX_HTTP_TB_USAGE_OTHER;

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

    ngx_uint_t  i;

    u->key = NGX_HTTP_TB_USAGE_OTHER;

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
        u->key = NGX_HTTP_TB_USAGE_OTHER + 1;
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
        return 1;
    }

    n = 0;

    for (i = 0; i < len && i < 12; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return 1;
        }

        n = n * 10 + (s[i] - '0');
    }

    u->value[u->key] = n;
    u->seen |= 1 << u->key;
    u->key = NGX_HTTP_TB_USAGE_OTHER;

    return 1;
}


static int
ngx_http_tb_usage_value(void *data)
{
    ngx_http_tb_usage_t  *u = data;

    u->key = NGX_HTTP_TB_USAGE_OTHER;

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
    return ngx_http_tb_usage_value(data);
}


/* the prompt and output tokens reported, NGX_DECLINED when none were */

ngx_int_t
ngx_http_tb_usage_get(ngx_http_tb_usage_t *u, uint64_t *prompt,
    uint64_t *output)
{
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
