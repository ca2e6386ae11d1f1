
/*
 * Copyright (C) The token budget authors
 */


#ifndef _NGX_HTTP_TOKEN_BUDGET_H_INCLUDED_
#define _NGX_HTTP_TOKEN_BUDGET_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "tk.h"


#define NGX_HTTP_TB_FORMAT_AUTO         0
#define NGX_HTTP_TB_FORMAT_CHAT         1
#define NGX_HTTP_TB_FORMAT_COMPLETIONS  2
#define NGX_HTTP_TB_FORMAT_EMBEDDINGS   3
#define NGX_HTTP_TB_FORMAT_RESPONSES    4
#define NGX_HTTP_TB_FORMAT_ANTHROPIC    5

#define NGX_HTTP_TB_JSON_NULL           0
#define NGX_HTTP_TB_JSON_FALSE          1
#define NGX_HTTP_TB_JSON_TRUE           2
#define NGX_HTTP_TB_JSON_NUMBER         3
#define NGX_HTTP_TB_JSON_STRING         4
#define NGX_HTTP_TB_JSON_ARRAY          5
#define NGX_HTTP_TB_JSON_OBJECT         6

/* how a count was made: bits, the worst one names it */
#define NGX_HTTP_TB_EXACT               0
#define NGX_HTTP_TB_IMAGE_BOUND         1
#define NGX_HTTP_TB_ESTIMATE            2


typedef struct ngx_http_tb_json_s  ngx_http_tb_json_t;

struct ngx_http_tb_json_s {
    ngx_str_t                    key;
    ngx_str_t                    str;      /* a string, or a number's text */
    ngx_http_tb_json_t          *first;
    ngx_http_tb_json_t          *next;
    ngx_uint_t                   n;
    ngx_uint_t                   type;
};


typedef struct {
    ngx_str_t                    name;
    tk_encoding_t               *enc;
    tk_pattern_e                 pattern;
} ngx_http_tb_encoding_t;


typedef struct {
    ngx_str_t                    pattern;   /* without a trailing '*' */
    ngx_uint_t                   prefix;    /* the pattern ended in '*' */
    ngx_http_tb_encoding_t      *encoding;
    ngx_uint_t                   estimate;  /* percent of the count, or 0 */
    ngx_uint_t                   context;
    ngx_uint_t                   max_output;
} ngx_http_tb_model_t;


typedef struct {
    ngx_str_t                    message;
    ngx_str_t                    code;     /* a provider's error code */
    ngx_uint_t                   status;
} ngx_http_tb_error_t;


/* what counting a request body found */

typedef struct {
    ngx_http_tb_json_t          *root;
    ngx_http_tb_model_t         *model;
    ngx_str_t                    model_name;
    ngx_uint_t                   format;
    ngx_uint_t                   method;
    uint64_t                     prompt;
    uint64_t                     largest_input;  /* embeddings */
    uint64_t                     output;          /* asked for, or 0 */
    ngx_http_tb_json_t          *output_field;
    ngx_uint_t                   choices;         /* n, best_of */
    ngx_uint_t                   image_bound;
    ngx_http_tb_error_t          error;
    ngx_log_t                   *log;
    ngx_pool_t                  *pool;
} ngx_http_tb_count_t;


ngx_int_t ngx_http_tb_json_parse(ngx_pool_t *pool, u_char *data, size_t len,
    ngx_http_tb_json_t **root, ngx_str_t *err);
ngx_http_tb_json_t *ngx_http_tb_json_get(ngx_http_tb_json_t *obj,
    const char *key);
ngx_int_t ngx_http_tb_json_print(ngx_pool_t *pool, ngx_http_tb_json_t *root,
    ngx_str_t *out);

ngx_int_t ngx_http_tb_count_body(ngx_http_tb_count_t *c, ngx_array_t *models,
    ngx_uint_t image_tokens);
ngx_http_tb_model_t *ngx_http_tb_find_model(ngx_array_t *models,
    ngx_str_t *name);


#endif /* _NGX_HTTP_TOKEN_BUDGET_H_INCLUDED_ */
