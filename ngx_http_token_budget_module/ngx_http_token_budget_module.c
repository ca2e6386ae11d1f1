
/*
 * Copyright (C) The token budget authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <zlib.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_PASSED            1
#define NGX_HTTP_TB_REJECTED          2
#define NGX_HTTP_TB_REJECTED_DRY_RUN  3
#define NGX_HTTP_TB_ERROR             4

#define NGX_HTTP_TB_MAX_LIMITS        16

#define ngx_http_tb_literal(p, s)     ngx_cpymem(p, s, sizeof(s) - 1)


typedef struct {
    ngx_flag_t                   enable;
    ngx_uint_t                   format;
    ngx_uint_t                   max_input;
    ngx_uint_t                   reserve_output;
    ngx_str_t                    header;
    ngx_flag_t                   dry_run;
    ngx_uint_t                   status;
    ngx_flag_t                   clamp;
    ngx_uint_t                   image_tokens;
    ngx_uint_t                   estimate_margin;
    size_t                       max_body;
    ngx_array_t                 *limits;     /* ngx_http_tb_zone_t * */
    ngx_uint_t                   full_status;
    ngx_uint_t                   stream_cut;
    ngx_flag_t                   count_cache;
    ngx_uint_t                   uncounted;  /* 1: pass, 0: reject */
} ngx_http_tb_loc_conf_t;


typedef struct {
    ngx_uint_t                   done;
    ngx_int_t                    rc;        /* for the phase handler */
    ngx_uint_t                   decision;
    ngx_uint_t                   format;
    ngx_uint_t                   method;
    ngx_str_t                    model;
    uint64_t                     prompt;
    uint64_t                     output;
    ngx_str_t                    reason;
    ngx_http_tb_error_t          error;

    ngx_http_request_t          *request;
    tk_encoding_t               *enc;
    ngx_int_t                    model_index;
    ngx_uint_t                   limited;
    ngx_uint_t                   nres;
    ngx_http_tb_reservation_t    res[NGX_HTTP_TB_MAX_LIMITS];
    ngx_http_tb_refusal_t        refusal;
    ngx_http_tb_json_t          *root;
    ngx_uint_t                   count_format;
    ngx_uint_t                   waiting;   /* replies due from Redis */
    ngx_uint_t                   over;      /* limits of a dry run */
    ngx_event_t                  wait;
    time_t                       retry_after;
    ngx_uint_t                   reading_usage;
    ngx_uint_t                   settled;
    ngx_uint_t                   replace;
    ngx_uint_t                   strip;     /* usage asked for by us */
    ngx_uint_t                   rewrite;   /* events are rewritten */
    ngx_uint_t                   cut;       /* the stream was cut */
    ngx_uint_t                   client_usage;  /* include_usage asked */
    uint64_t                     cut_at;    /* output tokens, 0: never */
    ngx_uint_t                   choices;
    ngx_uint_t                   block_open;
    ngx_str_t                    block_index;
    ngx_str_t                    stream_id;
    ngx_str_t                    stream_created;
    ngx_str_t                    stream_model;
    ngx_str_t                    item_id;
    ngx_str_t                    text;      /* streamed Responses text */
    size_t                       text_size;
    ngx_int_t                    sequence;
    u_char                      *events;    /* an event not yet complete */
    size_t                       events_len;
    size_t                       events_size;
    ngx_http_tb_usage_t          usage;
} ngx_http_tb_ctx_t;


static ngx_int_t ngx_http_tb_handler(ngx_http_request_t *r);
static void ngx_http_tb_body_handler(ngx_http_request_t *r);
static ngx_http_tb_ctx_t *ngx_http_tb_get_ctx(ngx_http_request_t *r);
static void ngx_http_tb_cleanup(void *data);
static void ngx_http_tb_settle(ngx_http_tb_ctx_t *ctx);
static ngx_uint_t ngx_http_tb_format(ngx_http_request_t *r,
    ngx_http_tb_loc_conf_t *tlcf);
static void ngx_http_tb_decide(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx);
static ngx_int_t ngx_http_tb_read_body(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, ngx_str_t *body, ngx_uint_t *decoded);
static ngx_int_t ngx_http_tb_inflate(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, ngx_str_t *body);
static ngx_int_t ngx_http_tb_clamp(ngx_http_request_t *r,
    ngx_http_tb_count_t *c, uint64_t room);
static ngx_int_t ngx_http_tb_replace_body(ngx_http_request_t *r,
    ngx_str_t *body);
static ngx_int_t ngx_http_tb_set_header(ngx_http_request_t *r,
    ngx_str_t *name, ngx_str_t *value);
static void ngx_http_tb_fail(ngx_http_tb_ctx_t *ctx, ngx_uint_t status,
    const char *code, const char *message);
static ngx_int_t ngx_http_tb_send_error(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx);
static u_char *ngx_http_tb_escape(u_char *p, ngx_str_t *s);

static void ngx_http_tb_decided(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx);
static void ngx_http_tb_over(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx);
static void ngx_http_tb_limited(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_int_t rc);
static void ngx_http_tb_forward(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx);
static void ngx_http_tb_internal(ngx_http_tb_ctx_t *ctx);
static void ngx_http_tb_limit_reply(ngx_http_tb_reservation_t *res);
static void ngx_http_tb_limit_timeout(ngx_event_t *ev);
static void ngx_http_tb_limit_resume(ngx_http_tb_ctx_t *ctx);
static ngx_int_t ngx_http_tb_limit_result(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, ngx_int_t rc, ngx_uint_t dry_run);
static ngx_int_t ngx_http_tb_limit(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, ngx_uint_t dry_run);
static ngx_int_t ngx_http_tb_inject_usage(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx);
static ngx_int_t ngx_http_tb_rewrite(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, ngx_chain_t *in);
static ngx_int_t ngx_http_tb_event(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, u_char *p, size_t len, ngx_chain_t ***last);
static ngx_uint_t ngx_http_tb_usage_chunk(u_char *p, size_t len);
static ngx_uint_t ngx_http_tb_lines(u_char *p, u_char *end);
static ngx_int_t ngx_http_tb_event_lines(ngx_http_request_t *r, u_char *p,
    size_t len, ngx_chain_t ***last);
static ngx_int_t ngx_http_tb_append(ngx_pool_t *pool, ngx_str_t *to,
    size_t *size, ngx_str_t *s);
static ngx_int_t ngx_http_tb_ending(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx, uint64_t prompt, uint64_t output,
    ngx_chain_t ***last);
static ngx_int_t ngx_http_tb_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_tb_nginx_error(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx);
static ngx_int_t ngx_http_tb_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_tb_add_header(ngx_http_request_t *r,
    const char *name, ngx_str_t *value);
static char *ngx_http_tb_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_tb_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_tb_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_tb_add_variables(ngx_conf_t *cf);
static void *ngx_http_tb_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_tb_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_tb_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_tb_encoding(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_tb_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_tb_header(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_tb_margin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void *ngx_http_tb_alloc(void *data, size_t size);
static void ngx_http_tb_free(void *data, void *p);
static void ngx_http_tb_encoding_cleanup(void *data);
static ngx_int_t ngx_http_tb_metrics_init(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_http_tb_metrics_decision(ngx_http_request_t *r,
    ngx_http_tb_ctx_t *ctx);
static ngx_int_t ngx_http_tb_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_tb_init_process(ngx_cycle_t *cycle);
static void ngx_http_tb_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_tb_formats[] = {
    { ngx_string("auto"), NGX_HTTP_TB_FORMAT_AUTO },
    { ngx_string("chat"), NGX_HTTP_TB_FORMAT_CHAT },
    { ngx_string("completions"), NGX_HTTP_TB_FORMAT_COMPLETIONS },
    { ngx_string("embeddings"), NGX_HTTP_TB_FORMAT_EMBEDDINGS },
    { ngx_string("responses"), NGX_HTTP_TB_FORMAT_RESPONSES },
    { ngx_string("anthropic"), NGX_HTTP_TB_FORMAT_ANTHROPIC },
    { ngx_null_string, 0 }
};


#define NGX_HTTP_TB_CUT_OFF       0
#define NGX_HTTP_TB_CUT_RESERVED  1
#define NGX_HTTP_TB_CUT_BUDGET    2


static ngx_conf_enum_t  ngx_http_tb_cuts[] = {
    { ngx_string("off"), NGX_HTTP_TB_CUT_OFF },
    { ngx_string("reserved"), NGX_HTTP_TB_CUT_RESERVED },
    { ngx_string("budget"), NGX_HTTP_TB_CUT_BUDGET },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_tb_uncounted[] = {
    { ngx_string("reject"), 0 },
    { ngx_string("pass"), 1 },
    { ngx_null_string, 0 }
};


static ngx_conf_num_bounds_t  ngx_http_tb_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};


static ngx_command_t  ngx_http_tb_commands[] = {

    { ngx_string("token_budget_encoding"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      ngx_http_tb_encoding,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_model"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_tb_model,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_tb_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_tb_limit_zone,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_full_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, full_status),
      &ngx_http_tb_status_bounds },

    { ngx_string("token_budget_stream_cut"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, stream_cut),
      &ngx_http_tb_cuts },

    { ngx_string("token_budget_uncounted"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, uncounted),
      &ngx_http_tb_uncounted },

    { ngx_string("token_budget_count_cache"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, count_cache),
      NULL },

    { ngx_string("token_budget_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_tb_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, enable),
      NULL },

    { ngx_string("token_budget_format"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, format),
      &ngx_http_tb_formats },

    { ngx_string("token_budget_max_input"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, max_input),
      NULL },

    { ngx_string("token_budget_reserve_output"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, reserve_output),
      NULL },

    { ngx_string("token_budget_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_tb_header,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_dry_run"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, dry_run),
      NULL },

    { ngx_string("token_budget_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, status),
      &ngx_http_tb_status_bounds },

    { ngx_string("token_budget_clamp"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, clamp),
      NULL },

    { ngx_string("token_budget_image_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, image_tokens),
      NULL },

    { ngx_string("token_budget_estimate_margin"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_tb_margin,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("token_budget_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_tb_loc_conf_t, max_body),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_token_budget_module_ctx = {
    ngx_http_tb_add_variables,             /* preconfiguration */
    ngx_http_tb_init,                      /* postconfiguration */

    ngx_http_tb_create_main_conf,          /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_tb_create_loc_conf,           /* create location configuration */
    ngx_http_tb_merge_loc_conf             /* merge location configuration */
};


ngx_module_t  ngx_http_token_budget_module = {
    NGX_MODULE_V1,
    &ngx_http_token_budget_module_ctx,     /* module context */
    ngx_http_tb_commands,                  /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_tb_init_process,              /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_tb_exit_process,              /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


#define NGX_HTTP_TB_VAR_PROMPT     0
#define NGX_HTTP_TB_VAR_RESERVED   1
#define NGX_HTTP_TB_VAR_OUTPUT     2
#define NGX_HTTP_TB_VAR_MODEL      3
#define NGX_HTTP_TB_VAR_METHOD     4
#define NGX_HTTP_TB_VAR_STATUS     5
#define NGX_HTTP_TB_VAR_REASON     6
#define NGX_HTTP_TB_VAR_FORMAT     7
#define NGX_HTTP_TB_VAR_REMAINING  8
#define NGX_HTTP_TB_VAR_COMPLETION 9


static ngx_http_variable_t  ngx_http_tb_vars[] = {

    { ngx_string("token_budget_prompt_tokens"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_PROMPT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_reserved_tokens"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_RESERVED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_output_tokens"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_OUTPUT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_model"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_MODEL, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_count_method"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_METHOD, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_status"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_STATUS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_reason"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_REASON, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_format"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_FORMAT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_remaining"), NULL, ngx_http_tb_variable,
      NGX_HTTP_TB_VAR_REMAINING, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("token_budget_completion_tokens"), NULL,
      ngx_http_tb_variable, NGX_HTTP_TB_VAR_COMPLETION,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_str_t  ngx_http_tb_decisions[] = {
    ngx_null_string,
    ngx_string("PASSED"),
    ngx_string("REJECTED"),
    ngx_string("REJECTED_DRY_RUN"),
    ngx_string("ERROR")
};


static ngx_str_t  ngx_http_tb_methods[] = {
    ngx_string("exact"),
    ngx_string("image_bound"),
    ngx_string("estimate"),
    ngx_string("estimate")
};


static ngx_str_t  ngx_http_tb_format_names[] = {
    ngx_null_string,
    ngx_string("chat"),
    ngx_string("completions"),
    ngx_string("embeddings"),
    ngx_string("responses"),
    ngx_string("anthropic")
};


static ngx_int_t
ngx_http_tb_handler(ngx_http_request_t *r)
{
    ngx_int_t                rc;
    ngx_str_t                value;
    ngx_http_tb_ctx_t       *ctx;
    ngx_pool_cleanup_t      *cln;
    ngx_http_tb_loc_conf_t  *tlcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    ctx = ngx_http_tb_get_ctx(r);

    if (ctx != NULL) {
        /* decided already, before an internal redirect, or reading */

        if (!ctx->done) {
            return NGX_DONE;
        }

        if (ctx->rc == NGX_DECLINED) {
            return NGX_DECLINED;
        }

        rc = ngx_http_tb_send_error(r, ctx);
        ctx->rc = NGX_DECLINED;

        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (!tlcf->enable) {
        return NGX_DECLINED;
    }

    if (r->method == NGX_HTTP_POST && tlcf->uncounted == 0
        && ngx_http_tb_format(r, tlcf) == NGX_HTTP_TB_FORMAT_AUTO)
    {
        /* a POST to an API whose tokens would not be counted */

        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_tb_ctx_t));
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->model_index = -1;
        ctx->request = r;
        ctx->done = 1;
        ctx->decision = NGX_HTTP_TB_REJECTED;
        ngx_str_set(&ctx->reason, "uncounted_api");
        ngx_http_tb_fail(ctx, NGX_HTTP_FORBIDDEN, "uncounted_api",
                         "this API is not counted by the token budget");
        ngx_http_set_ctx(r, ctx, ngx_http_token_budget_module);

        rc = ngx_http_discard_request_body(r);

        if (rc != NGX_OK) {
            return rc;
        }

        rc = ngx_http_tb_send_error(r, ctx);
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (r->method != NGX_HTTP_POST
        || ngx_http_tb_format(r, tlcf) == NGX_HTTP_TB_FORMAT_AUTO)
    {
        /* not an API that takes a prompt: the client's count goes */

        if (tlcf->header.len) {
            ngx_str_null(&value);

            if (ngx_http_tb_set_header(r, &tlcf->header, &value) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }

        return NGX_DECLINED;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_tb_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->format = ngx_http_tb_format(r, tlcf);
    ctx->model_index = -1;

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_tb_cleanup;
    cln->data = ctx;

    ctx->request = r;
    ngx_http_set_ctx(r, ctx, ngx_http_token_budget_module);

    rc = ngx_http_read_client_request_body(r, ngx_http_tb_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);
    return NGX_DONE;
}


static void
ngx_http_tb_body_handler(ngx_http_request_t *r)
{
    ngx_http_tb_ctx_t  *ctx;

    ctx = ngx_http_tb_get_ctx(r);

    ngx_http_tb_decide(r, ctx);

    if (ctx->waiting) {
        /* for Redis: ngx_http_tb_limit_resume() goes on */
        return;
    }

    ngx_http_tb_decided(r, ctx);
}


static void
ngx_http_tb_decided(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ctx->done = 1;

    ngx_http_tb_metrics_decision(r, ctx);

    r->preserve_body = 1;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


/* the context survives internal redirects through the pool cleanup */

static ngx_http_tb_ctx_t *
ngx_http_tb_get_ctx(ngx_http_request_t *r)
{
    ngx_http_tb_ctx_t   *ctx;
    ngx_pool_cleanup_t  *cln;

    ctx = ngx_http_get_module_ctx(r, ngx_http_token_budget_module);

    if (ctx != NULL || !r->internal) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_tb_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_token_budget_module);
            break;
        }
    }

    return ctx;
}


/*
 * settles the reservations when the response has passed, or whichever
 * other way the request ended (the pool cleanup): with the
 * usage the upstream reported; without it, the prompt counts as spent once
 * the upstream has received the request, and nothing when it has not
 */

static void
ngx_http_tb_cleanup(void *data)
{
    ngx_http_tb_ctx_t  *ctx = data;

    if (ctx->waiting) {
        ngx_http_tb_zone_detach(ctx->res, ctx->nres);
        ctx->waiting = 0;
    }

    if (ctx->wait.timer_set) {
        ngx_del_timer(&ctx->wait);
    }

    ngx_http_tb_settle(ctx);
}


static void
ngx_http_tb_settle(ngx_http_tb_ctx_t *ctx)
{
    int64_t                 drift;
    uint64_t                prompt, output;
    ngx_uint_t              i;
    ngx_http_request_t     *r;
    ngx_http_tb_metrics_t  *m;

    static const int64_t    bounds[NGX_HTTP_TB_DRIFT_BUCKETS] = {
        -100, -10, -3, -1, 0, 1, 3, 10, 100
    };

    if (ctx->settled || (ctx->nres == 0 && !ctx->reading_usage)) {
        return;
    }

    ctx->settled = 1;

    r = ctx->request;
    m = ((ngx_http_tb_main_conf_t *) ngx_http_get_module_main_conf(r,
                                    ngx_http_token_budget_module))->metrics;

    if (ngx_http_tb_usage_get(&ctx->usage, &prompt, &output) == NGX_OK) {

        if (m && ctx->model_index >= 0) {
            (void) ngx_atomic_fetch_add(
                       &m->model[ctx->model_index][NGX_HTTP_TB_M_COMPLETION],
                       output);
        }

        if (m && ctx->method == NGX_HTTP_TB_EXACT && prompt) {
            drift = (int64_t) ctx->prompt - (int64_t) prompt;

            for (i = 0; i < NGX_HTTP_TB_DRIFT_BUCKETS; i++) {
                if (drift <= bounds[i]) {
                    break;
                }
            }

            (void) ngx_atomic_fetch_add(&m->drift[i], 1);
            (void) ngx_atomic_fetch_add(&m->drift_count, 1);
            (void) ngx_atomic_fetch_add(&m->drift_sum,
                                        (ngx_atomic_int_t) drift);
            (void) ngx_atomic_fetch_add(&m->drift_sum_abs,
                                        drift < 0 ? -drift : drift);
        }

    } else if (ngx_http_tb_usage_counted(&ctx->usage, &output) == NGX_OK) {
        /* a stream without usage: its text was counted as it passed */
        prompt = ctx->prompt;

        if (m && ctx->model_index >= 0) {
            (void) ngx_atomic_fetch_add(
                       &m->model[ctx->model_index][NGX_HTTP_TB_M_COMPLETION],
                       output);
        }

    } else {
        output = 0;
        prompt = (r->upstream && r->upstream->request_sent) ? ctx->prompt : 0;
    }

    for (i = 0; i < ctx->nres; i++) {
        if (ctx->res[i].zone) {
            ngx_http_tb_zone_settle(&ctx->res[i], prompt, output, 1);
        }
    }

    ctx->nres = 0;
}


static ngx_uint_t
ngx_http_tb_format(ngx_http_request_t *r, ngx_http_tb_loc_conf_t *tlcf)
{
    size_t   len;
    u_char  *p;

    if (tlcf->format != NGX_HTTP_TB_FORMAT_AUTO) {
        return tlcf->format;
    }

    p = r->uri.data;
    len = r->uri.len;

    while (len > 1 && p[len - 1] == '/') {
        len--;
    }

#define ngx_http_tb_ends(s)                                                   \
    (len >= sizeof(s) - 1                                                     \
     && ngx_strncmp(p + len - (sizeof(s) - 1), s, sizeof(s) - 1) == 0)

    if (ngx_http_tb_ends("/chat/completions")) {
        return NGX_HTTP_TB_FORMAT_CHAT;
    }

    if (ngx_http_tb_ends("/completions")) {
        return NGX_HTTP_TB_FORMAT_COMPLETIONS;
    }

    if (ngx_http_tb_ends("/embeddings")) {
        return NGX_HTTP_TB_FORMAT_EMBEDDINGS;
    }

    if (ngx_http_tb_ends("/responses")) {
        return NGX_HTTP_TB_FORMAT_RESPONSES;
    }

    if (ngx_http_tb_ends("/messages")) {
        return NGX_HTTP_TB_FORMAT_ANTHROPIC;
    }

#undef ngx_http_tb_ends

    return NGX_HTTP_TB_FORMAT_AUTO;
}


static void
ngx_http_tb_decide(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    u_char                   *p;
    uint64_t                  limit, reserve, room, total;
    ngx_int_t                 rc;
    ngx_str_t                 body, err, value;
    ngx_uint_t                decoded, estimate;
    ngx_http_tb_json_t       *v;
    ngx_http_tb_count_t       c;
    ngx_http_tb_loc_conf_t   *tlcf;
    ngx_http_tb_main_conf_t  *tmcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);
    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_budget_module);

    ctx->rc = NGX_DECLINED;
    ctx->decision = NGX_HTTP_TB_ERROR;

    if (r->request_body == NULL) {
        ngx_http_tb_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_request",
                         "the request has no body");
        goto reject;
    }

    rc = ngx_http_tb_read_body(r, ctx, &body, &decoded);

    if (rc == NGX_DECLINED) {
        goto reject;
    }

    if (rc != NGX_OK) {
        goto internal;
    }

    if (decoded) {
        /* upstreams take plain bodies: forward what was counted */

        if (ngx_http_tb_replace_body(r, &body) != NGX_OK) {
            goto internal;
        }
    }

    ngx_memzero(&c, sizeof(ngx_http_tb_count_t));
    c.format = ctx->format;
    c.log = r->connection->log;
    c.pool = r->pool;
    c.cache = tlcf->count_cache;

    rc = ngx_http_tb_json_parse(r->pool, body.data, body.len, &c.root, &err);

    if (rc == NGX_DECLINED) {
        ctx->error.status = NGX_HTTP_BAD_REQUEST;
        ngx_str_set(&ctx->error.code, "invalid_json");
        ctx->error.message = err;
        goto reject;
    }

    if (rc != NGX_OK) {
        goto internal;
    }

    rc = ngx_http_tb_count_body(&c, &tmcf->models, tlcf->image_tokens);

    ctx->model = c.model_name;

    if (rc == NGX_DECLINED) {
        ctx->error = c.error;
        goto reject;
    }

    if (rc != NGX_OK) {
        goto internal;
    }

    ctx->method = c.method;
    ctx->prompt = c.prompt;
    ctx->model_index = c.model - (ngx_http_tb_model_t *) tmcf->models.elts;
    ctx->enc = c.model->encoding->enc;

    if (c.format == NGX_HTTP_TB_FORMAT_EMBEDDINGS) {
        reserve = 0;

    } else if (c.output_field) {
        reserve = c.output;

    } else {
        reserve = (tlcf->reserve_output != NGX_CONF_UNSET_UINT)
                  ? tlcf->reserve_output : c.model->max_output;

        /* without a limit the model writes at most what fits */

        if (c.model->context && c.prompt < c.model->context
            && reserve > c.model->context - c.prompt)
        {
            reserve = c.model->context - c.prompt;
        }
    }

    ctx->output = reserve * c.choices;
    ctx->choices = c.choices;

    v = ngx_http_tb_json_get(ngx_http_tb_json_get(c.root, "stream_options"),
                             "include_usage");
    ctx->client_usage = (v && v->type == NGX_HTTP_TB_JSON_TRUE);

    estimate = (c.method & NGX_HTTP_TB_ESTIMATE) ? tlcf->estimate_margin : 0;

    /* the per-request cap on the prompt */

    if (tlcf->max_input
        && c.prompt * 100 > (uint64_t) tlcf->max_input * (100 + estimate))
    {
        ctx->error.status = tlcf->status;
        ngx_str_set(&ctx->reason, "max_input");
        ngx_str_set(&ctx->error.code, "max_input_exceeded");

        p = ngx_pnalloc(r->pool, 256);
        if (p == NULL) {
            goto internal;
        }

        ctx->error.message.data = p;
        ctx->error.message.len = ngx_snprintf(p, 256,
                "this request's prompt is %uL tokens, over the limit of %ui "
                "tokens per request", c.prompt, tlcf->max_input) - p;

        goto over;
    }

    /* the model's context window: the prompt and the output it may write */

    limit = c.model->context;

    if (c.format == NGX_HTTP_TB_FORMAT_EMBEDDINGS) {
        total = c.largest_input;

    } else {
        total = c.prompt + reserve;
    }

    if (limit && total * 100 > limit * (100 + estimate)) {

        room = (c.prompt < limit) ? limit - c.prompt : 0;

        if (tlcf->clamp && room > 0 && c.output_field
            && c.format != NGX_HTTP_TB_FORMAT_EMBEDDINGS
            && !(c.method & NGX_HTTP_TB_ESTIMATE))
        {
            rc = ngx_http_tb_clamp(r, &c, room);

            if (rc == NGX_ERROR) {
                goto internal;
            }

            reserve = room;
            ctx->output = reserve * c.choices;

        } else {
            ctx->error.status = tlcf->status;
            ngx_str_set(&ctx->reason, "context_length_exceeded");
            ngx_str_set(&ctx->error.code, "context_length_exceeded");

            p = ngx_pnalloc(r->pool, 256);
            if (p == NULL) {
                goto internal;
            }

            ctx->error.message.data = p;

            if (c.format == NGX_HTTP_TB_FORMAT_EMBEDDINGS) {
                ctx->error.message.len = ngx_snprintf(p, 256,
                    "this model's maximum context length is %uL tokens, "
                    "however an input has %uL tokens", limit, total) - p;

            } else {
                ctx->error.message.len = ngx_snprintf(p, 256,
                    "this model's maximum context length is %uL tokens, "
                    "however you requested %uL tokens (%uL in the messages, "
                    "%uL in the completion)", limit, total, c.prompt, reserve)
                    - p;
            }

            goto over;
        }
    }

    ctx->decision = NGX_HTTP_TB_PASSED;

    if (tlcf->limits) {
        ctx->root = c.root;
        ctx->count_format = c.format;

        rc = ngx_http_tb_limit(r, ctx, tlcf->dry_run);

        if (rc == NGX_AGAIN) {
            return;
        }

        ngx_http_tb_limited(r, ctx, rc);
        return;
    }

    ngx_http_tb_forward(r, ctx);
    return;

over:

    ngx_http_tb_over(r, ctx);
    return;

reject:

    if (ctx->reason.len == 0) {
        ctx->reason = ctx->error.code;
    }

    ctx->decision = NGX_HTTP_TB_ERROR;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token budget: bad request: %V", &ctx->error.message);

    if (!tlcf->dry_run) {
        ctx->rc = ctx->error.status;
        return;
    }

    /* a dry run forwards it uncounted, without the client's count */

    if (tlcf->header.len) {
        ngx_str_null(&value);

        if (ngx_http_tb_set_header(r, &tlcf->header, &value) != NGX_OK) {
            goto internal;
        }
    }

    return;

internal:

    ngx_http_tb_internal(ctx);
}


static void
ngx_http_tb_internal(ngx_http_tb_ctx_t *ctx)
{
    ngx_http_tb_fail(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR, "internal_error",
                     "the token budget could not be checked");
    ngx_str_set(&ctx->reason, "internal_error");
    ctx->decision = NGX_HTTP_TB_ERROR;
    ctx->rc = ctx->error.status;
}


/* what the limits decided, once they have */

static void
ngx_http_tb_limited(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_int_t rc)
{
    if (rc == NGX_ERROR) {
        ngx_http_tb_internal(ctx);
        return;
    }

    if (ctx->over) {
        /* a dry run's limits, after it was over already */
        ngx_http_tb_forward(r, ctx);
        return;
    }

    if (rc == NGX_DECLINED) {
        ngx_http_tb_over(r, ctx);
        return;
    }

    if (ctx->nres && ngx_http_tb_inject_usage(r, ctx) != NGX_OK) {
        ngx_http_tb_internal(ctx);
        return;
    }

    ngx_http_tb_forward(r, ctx);
}


/* over a limit: refused, or forwarded by a dry run */

static void
ngx_http_tb_over(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ngx_int_t                rc;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    if (tlcf->dry_run) {
        ctx->decision = NGX_HTTP_TB_REJECTED_DRY_RUN;

        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "token budget: dry run, would reject: %V",
                      &ctx->error.message);

        if (tlcf->limits && !ctx->limited) {
            ctx->over = 1;

            rc = ngx_http_tb_limit(r, ctx, 1);

            if (rc == NGX_AGAIN) {
                return;
            }

            ngx_http_tb_limited(r, ctx, rc);
            return;
        }

        ngx_http_tb_forward(r, ctx);
        return;
    }

    ctx->decision = NGX_HTTP_TB_REJECTED;
    ctx->rc = ctx->error.status;

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "token budget: rejected: %V", &ctx->error.message);
}


/* forwarded: with the count in the header, if configured */

static void
ngx_http_tb_forward(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ngx_str_t                value;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    if (tlcf->header.len == 0) {
        return;
    }

    value.data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (value.data == NULL) {
        ngx_http_tb_internal(ctx);
        return;
    }

    value.len = ngx_sprintf(value.data, "%uL", ctx->prompt) - value.data;

    if (ngx_http_tb_set_header(r, &tlcf->header, &value) != NGX_OK) {
        ngx_http_tb_internal(ctx);
    }
}


/* the windowed budgets: a reservation in every zone, or a refusal */

static ngx_int_t
ngx_http_tb_limit(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_uint_t dry_run)
{
    ngx_int_t                rc;
    ngx_uint_t               i;
    ngx_msec_t               timeout;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    ctx->limited = 1;

    rc = ngx_http_tb_zone_reserve(r, tlcf->limits, ctx->prompt, ctx->output,
                                  ctx->res, &ctx->nres, &ctx->refusal);

    if (rc != NGX_AGAIN) {
        return ngx_http_tb_limit_result(r, ctx, rc, dry_run);
    }

    /* reservations in Redis: the request waits, "timeout" at most */

    timeout = 0;

    for (i = 0; i < ctx->nres; i++) {
        ctx->res[i].done = ngx_http_tb_limit_reply;
        ctx->res[i].data = ctx;

        if (ctx->res[i].state == NGX_HTTP_TB_RES_WAIT) {
            timeout = ngx_max(timeout, ctx->res[i].zone->timeout);
        }
    }

    if (ngx_http_tb_zone_remote(r, ctx->res, ctx->nres) == NGX_AGAIN) {

        for (i = 0; i < ctx->nres; i++) {
            if (ctx->res[i].cmd) {
                ctx->waiting++;
            }
        }

        ctx->wait.handler = ngx_http_tb_limit_timeout;
        ctx->wait.data = ctx;
        ctx->wait.log = r->connection->log;

        ngx_add_timer(&ctx->wait, timeout);

        return NGX_AGAIN;
    }

    rc = ngx_http_tb_zone_conclude(r, ctx->res, &ctx->nres, &ctx->refusal);

    return ngx_http_tb_limit_result(r, ctx, rc, dry_run);
}


static void
ngx_http_tb_limit_reply(ngx_http_tb_reservation_t *res)
{
    ngx_http_tb_ctx_t  *ctx;

    ctx = res->data;

    if (--ctx->waiting) {
        return;
    }

    if (ctx->wait.timer_set) {
        ngx_del_timer(&ctx->wait);
    }

    ngx_http_tb_limit_resume(ctx);
}


static void
ngx_http_tb_limit_timeout(ngx_event_t *ev)
{
    ngx_http_tb_ctx_t  *ctx;

    ctx = ev->data;

    ngx_log_error(NGX_LOG_WARN, ev->log, 0,
                  "token budget: redis did not answer in time, "
                  "the zones' fail= decides");

    ngx_http_tb_zone_detach(ctx->res, ctx->nres);
    ctx->waiting = 0;

    ngx_http_tb_limit_resume(ctx);
}


static void
ngx_http_tb_limit_resume(ngx_http_tb_ctx_t *ctx)
{
    ngx_int_t                rc;
    ngx_connection_t        *c;
    ngx_http_request_t      *r;
    ngx_http_tb_loc_conf_t  *tlcf;

    r = ctx->request;
    c = r->connection;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    rc = ngx_http_tb_zone_conclude(r, ctx->res, &ctx->nres, &ctx->refusal);
    rc = ngx_http_tb_limit_result(r, ctx, rc, ctx->over || tlcf->dry_run);

    ngx_http_tb_limited(r, ctx, rc);

    ngx_http_tb_decided(r, ctx);

    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_http_tb_limit_result(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_int_t rc, ngx_uint_t dry_run)
{
    u_char                  *p;
    ngx_str_t                name, value;
    ngx_http_tb_zone_t      *zone;
    ngx_http_tb_refusal_t   *rf;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    rf = &ctx->refusal;

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_OK) {
        /* the usage is read from the response: ask for it unencoded */

        ngx_str_set(&name, "Accept-Encoding");
        ngx_str_null(&value);

        return ngx_http_tb_set_header(r, &name, &value);
    }

    zone = rf->zone;

    p = ngx_pnalloc(r->pool, 512);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ctx->error.message.data = p;

    if (rf->never) {
        ctx->error.status = tlcf->status;
        ngx_str_set(&ctx->reason, "budget_too_large");
        ngx_str_set(&ctx->error.code, "budget_exceeded");

        ctx->error.message.len = ngx_snprintf(p, 512,
            "this request needs %uL tokens, more than the whole budget of "
            "%uL tokens per %V of token_budget_zone \"%V\"",
            rf->amount, zone->limit, &zone->per, &zone->shm_zone->shm.name)
            - p;

    } else if (rf->full) {
        ctx->error.status = tlcf->full_status;
        ngx_str_set(&ctx->reason, "zone_full");
        ngx_str_set(&ctx->error.code, "budget_unavailable");

        ctx->error.message.len = ngx_snprintf(p, 512,
            "token_budget_zone \"%V\" has no room for this key now",
            &zone->shm_zone->shm.name) - p;

    } else if (rf->unavailable) {
        ctx->error.status = NGX_HTTP_SERVICE_UNAVAILABLE;
        ngx_str_set(&ctx->reason, "redis_unavailable");
        ngx_str_set(&ctx->error.code, "budget_unavailable");

        ctx->error.message.len = ngx_snprintf(p, 512,
            "token_budget_zone \"%V\" cannot check the budget now: "
            "its redis does not answer", &zone->shm_zone->shm.name) - p;

        ctx->retry_after = 1;
        rf->retry = 1;

    } else {
        ctx->error.status = NGX_HTTP_TOO_MANY_REQUESTS;
        ngx_str_set(&ctx->reason, "budget_exhausted");
        ngx_str_set(&ctx->error.code, "rate_limit_exceeded");

        ctx->error.message.len = ngx_snprintf(p, 512,
            "rate limit reached for tokens in token_budget_zone \"%V\": "
            "limit %uL per %V, this request needs %uL; please try again "
            "in %Ts", &zone->shm_zone->shm.name, zone->limit, &zone->per,
            rf->amount, rf->retry) - p;

        ctx->retry_after = rf->retry;
    }

    rf->tightest = zone;
    rf->limit = zone->limit;
    rf->remaining = 0;
    rf->reset = rf->retry;

    if (dry_run) {
        ctx->decision = NGX_HTTP_TB_REJECTED_DRY_RUN;
        ctx->retry_after = 0;

        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "token budget: dry run, would reject: %V",
                      &ctx->error.message);

        return NGX_OK;
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_tb_header_filter(ngx_http_request_t *r)
{
    u_char                  *p;
    ngx_uint_t               sse, i;
    ngx_list_part_t         *part;
    ngx_table_elt_t         *h;
    ngx_http_tb_loc_conf_t  *tlcf;
    ngx_str_t           value;
    ngx_http_tb_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_tb_get_ctx(r);

    if (r->err_status >= NGX_HTTP_BAD_REQUEST && (ctx == NULL || !ctx->done)) {
        return ngx_http_tb_nginx_error(r, ctx);
    }

    if (ctx == NULL || !ctx->done) {
        return ngx_http_next_header_filter(r);
    }

    /* what the upstream reports settles reservations and feeds metrics */

    if (r->upstream && !ctx->reading_usage
        && (ctx->decision == NGX_HTTP_TB_PASSED
            || ctx->decision == NGX_HTTP_TB_REJECTED_DRY_RUN)
        && r->headers_out.status >= NGX_HTTP_OK
        && r->headers_out.status < NGX_HTTP_SPECIAL_RESPONSE)
    {
        sse = (r->headers_out.content_type.len >= 17
               && ngx_strncasecmp(r->headers_out.content_type.data,
                                  (u_char *) "text/event-stream", 17) == 0);

        if (ngx_http_tb_usage_init(r->pool, &ctx->usage, sse, ctx->enc)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        ctx->reading_usage = 1;
        r->filter_need_in_memory = 1;

        tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

        if (sse && tlcf->stream_cut == NGX_HTTP_TB_CUT_RESERVED) {
            ctx->cut_at = ctx->output;

        } else if (sse && tlcf->stream_cut == NGX_HTTP_TB_CUT_BUDGET
                   && ctx->refusal.tightest)
        {
            /* what the zone had left when the request was admitted */
            ctx->cut_at = ctx->output + ngx_max(ctx->refusal.remaining, 0);
        }

        if (sse && (ctx->strip || ctx->cut_at)) {
            ctx->rewrite = 1;
            ngx_http_clear_content_length(r);
            ngx_http_clear_accept_ranges(r);
        }

        if (sse) {
            /*
             * events go to the client as they come, whatever
             * proxy_buffering says: nginx reads this after the header
             */
            r->upstream->buffering = 0;
        }
    }

    if (!ctx->limited || ctx->refusal.tightest == NULL) {
        return ngx_http_next_header_filter(r);
    }

    /* the upstream's own figures of these give way to the budget's */

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash != 0 && h[i].key.len > 17
            && ngx_strncasecmp(h[i].key.data, (u_char *) "x-ratelimit-", 12)
               == 0
            && ngx_strncasecmp(h[i].key.data + h[i].key.len - 7,
                               (u_char *) "-tokens", 7) == 0)
        {
            h[i].hash = 0;
        }
    }

    p = ngx_pnalloc(r->pool, 3 * NGX_INT64_LEN + 2);
    if (p == NULL) {
        return NGX_ERROR;
    }

    value.data = p;
    value.len = ngx_sprintf(p, "%uL", ctx->refusal.limit) - p;

    if (ngx_http_tb_add_header(r, "x-ratelimit-limit-tokens", &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += value.len;
    value.data = p;
    value.len = ngx_sprintf(p, "%L", ngx_max(ctx->refusal.remaining, 0))
                - p;

    if (ngx_http_tb_add_header(r, "x-ratelimit-remaining-tokens", &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += value.len;
    value.data = p;
    value.len = ngx_sprintf(p, "%Ts", ctx->refusal.reset) - p;

    if (ngx_http_tb_add_header(r, "x-ratelimit-reset-tokens", &value)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ctx->retry_after
        && (r->headers_out.status == NGX_HTTP_TOO_MANY_REQUESTS
            || r->headers_out.status == NGX_HTTP_SERVICE_UNAVAILABLE)
        && r->upstream == NULL)
    {
        value.data = p + value.len;
        value.len = ngx_sprintf(value.data, "%T", ctx->retry_after)
                    - value.data;

        if (ngx_http_tb_add_header(r, "Retry-After", &value) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return ngx_http_next_header_filter(r);
}


/*
 * nginx's own errors on an API the module counts (a body over
 * client_max_body_size, a bad chunked body, a missing length) get a JSON
 * body like the module's, instead of an HTML page
 */

static ngx_int_t
ngx_http_tb_nginx_error(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ngx_int_t                rc;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    if (!tlcf->enable || r->method != NGX_HTTP_POST
        || r->headers_out.status != r->err_status
        || ngx_http_tb_format(r, tlcf) == NGX_HTTP_TB_FORMAT_AUTO)
    {
        return ngx_http_next_header_filter(r);
    }

    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_tb_ctx_t));
        if (ctx == NULL) {
            return NGX_ERROR;
        }

        ctx->format = ngx_http_tb_format(r, tlcf);
        ctx->model_index = -1;
        ctx->request = r;
        ngx_http_set_ctx(r, ctx, ngx_http_token_budget_module);
    }

    ctx->decision = NGX_HTTP_TB_ERROR;

    switch (r->err_status) {

    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        ngx_http_tb_fail(ctx, r->err_status, "request_too_large",
                         "the body is larger than client_max_body_size");
        break;

    case NGX_HTTP_LENGTH_REQUIRED:
        ngx_http_tb_fail(ctx, r->err_status, "length_required",
                         "the request needs a Content-Length or a chunked "
                         "body");
        break;

    case NGX_HTTP_BAD_REQUEST:
        ngx_http_tb_fail(ctx, r->err_status, "invalid_request",
                         "the request or its body is malformed");
        break;

    default:
        return ngx_http_next_header_filter(r);
    }

    ctx->reason = ctx->error.code;
    ctx->done = 1;

    rc = ngx_http_tb_send_error(r, ctx);

    /* nginx's page, sent next, is dropped by the body filter */

    ctx->replace = 1;

    return rc;
}


static ngx_int_t
ngx_http_tb_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t          *b;
    ngx_chain_t        *cl;
    ngx_http_tb_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_tb_get_ctx(r);

    if (ctx && ctx->replace) {
        /* nginx's page gives way to the JSON body already sent */

        for (cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }

        return NGX_OK;
    }

    if (ctx == NULL || !ctx->reading_usage) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->rewrite) {
        return ngx_http_tb_rewrite(r, ctx, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            ngx_http_tb_usage_feed(&ctx->usage, b->pos, b->last - b->pos,
                                   b->last_buf);

        } else if (b->last_buf) {
            ngx_http_tb_usage_feed(&ctx->usage, NULL, 0, 1);
        }

        if (b->last_buf) {
            /* the whole response passed: settle now, not when freed */
            ngx_http_tb_settle(ctx);
        }
    }

    return ngx_http_next_body_filter(r, in);
}


static ngx_int_t
ngx_http_tb_add_header(ngx_http_request_t *r, const char *name,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value = *value;

    return NGX_OK;
}


/*
 * An OpenAI stream reports its usage only when asked: a stream the budgets
 * settle is asked for it, and what the client did not ask for, the
 * usage-only chunk and the "usage": null of the other chunks, is taken out
 * of the stream again, so that the client sees what it would have seen.
 */

static ngx_int_t
ngx_http_tb_inject_usage(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ngx_str_t            body;
    ngx_http_tb_json_t  *stream, *opts, *inc, *v, *last;

    if (ctx->count_format != NGX_HTTP_TB_FORMAT_CHAT
        && ctx->count_format != NGX_HTTP_TB_FORMAT_COMPLETIONS)
    {
        return NGX_OK;
    }

    stream = ngx_http_tb_json_get(ctx->root, "stream");

    if (stream == NULL || stream->type != NGX_HTTP_TB_JSON_TRUE) {
        return NGX_OK;
    }

    opts = ngx_http_tb_json_get(ctx->root, "stream_options");
    inc = ngx_http_tb_json_get(opts, "include_usage");

    if (inc && inc->type == NGX_HTTP_TB_JSON_TRUE) {
        return NGX_OK;
    }

    if (opts && opts->type != NGX_HTTP_TB_JSON_OBJECT
        && opts->type != NGX_HTTP_TB_JSON_NULL)
    {
        /* the upstream will refuse it: nothing to add to */
        return NGX_OK;
    }

    if (inc == NULL) {
        inc = ngx_pcalloc(r->pool, sizeof(ngx_http_tb_json_t));
        if (inc == NULL) {
            return NGX_ERROR;
        }

        ngx_str_set(&inc->key, "include_usage");

        if (opts == NULL) {
            opts = ngx_pcalloc(r->pool, sizeof(ngx_http_tb_json_t));
            if (opts == NULL) {
                return NGX_ERROR;
            }

            ngx_str_set(&opts->key, "stream_options");

            for (last = ctx->root->first; last->next; last = last->next) {
                /* void */
            }

            last->next = opts;
            ctx->root->n++;
        }

        opts->type = NGX_HTTP_TB_JSON_OBJECT;

        for (v = opts->first; v && v->next; v = v->next) {
            /* void */
        }

        if (v) {
            v->next = inc;

        } else {
            opts->first = inc;
        }

        opts->n++;
    }

    inc->type = NGX_HTTP_TB_JSON_TRUE;

    if (ngx_http_tb_json_print(r->pool, ctx->root, &body) != NGX_OK
        || ngx_http_tb_replace_body(r, &body) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ctx->strip = 1;

    return NGX_OK;
}


/* complete events go on, rewritten; a partial one waits for its end */

static ngx_int_t
ngx_http_tb_rewrite(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_chain_t *in)
{
    u_char       *p, *end, *start, *buf;
    size_t        n, size;
    ngx_int_t     rc;
    ngx_uint_t    last, flush;
    ngx_buf_t    *b;
    ngx_chain_t  *cl, *out, **ll;

    last = 0;
    flush = 0;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b) && !ctx->cut) {
            n = b->last - b->pos;

            if (ctx->events_len + n > ctx->events_size) {
                size = ngx_max(2 * ctx->events_size, ctx->events_len + n);
                size = ngx_max(size, 4096);

                buf = ngx_pnalloc(r->pool, size);
                if (buf == NULL) {
                    return NGX_ERROR;
                }

                ngx_memcpy(buf, ctx->events, ctx->events_len);
                ctx->events = buf;
                ctx->events_size = size;
            }

            ngx_memcpy(ctx->events + ctx->events_len, b->pos, n);
            ctx->events_len += n;
        }

        b->pos = b->last;
        last |= b->last_buf;
        flush |= b->flush;
    }

    if (ctx->cut) {
        /* the client has its ending: what the upstream still sends goes */
        return ngx_http_next_body_filter(r, NULL);
    }

    out = NULL;
    ll = &out;
    rc = NGX_OK;

    p = ctx->events;
    end = p + ctx->events_len;
    start = p;

    /* an event ends with an empty line */

    while (p < end && rc == NGX_OK) {
        if (*p != '\n' && *p != '\r') {
            p++;
            continue;
        }

        n = (*p == '\r' && p + 1 < end && p[1] == '\n') ? 2 : 1;

        if (*p == '\r' && p + 1 == end && !last) {
            break;
        }

        p += n;

        if (p < end && (*p == '\n' || *p == '\r')) {
            n = (*p == '\r' && p + 1 < end && p[1] == '\n') ? 2 : 1;

            if (*p == '\r' && p + 1 == end && !last) {
                break;
            }

            p += n;

            rc = ngx_http_tb_event(r, ctx, start, p - start, &ll);

            if (rc == NGX_ERROR) {
                return NGX_ERROR;
            }

            start = p;
        }
    }

    if (rc == NGX_DONE) {
        /* cut: the rest of the stream goes, the ending was the last */

        ctx->cut = 1;
        last = 1;
        start = end;
        ngx_http_tb_usage_feed(&ctx->usage, NULL, 0, 1);
        ngx_http_tb_settle(ctx);

    } else if (last) {
        /* the upstream's last bytes, an event it did not end among them */

        if (start < end) {
            b = ngx_create_temp_buf(r->pool, end - start);
            if (b == NULL) {
                return NGX_ERROR;
            }

            b->last = ngx_cpymem(b->last, start, end - start);

            cl = ngx_alloc_chain_link(r->pool);
            if (cl == NULL) {
                return NGX_ERROR;
            }

            cl->buf = b;
            cl->next = NULL;
            *ll = cl;
            ll = &cl->next;
            start = end;
        }

        ngx_http_tb_usage_feed(&ctx->usage, NULL, 0, 1);
        ngx_http_tb_settle(ctx);
    }

    ctx->events_len = end - start;

    if (ctx->events_len) {
        ngx_memmove(ctx->events, start, ctx->events_len);
    }

    if (last || flush || out) {
        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            return NGX_ERROR;
        }

        b->last_buf = last;
        b->flush = 1;
        b->sync = 1;

        cl = ngx_alloc_chain_link(r->pool);
        if (cl == NULL) {
            return NGX_ERROR;
        }

        cl->buf = b;
        cl->next = NULL;
        *ll = cl;
    }

    if (out == NULL) {
        return NGX_OK;
    }

    rc = ngx_http_next_body_filter(r, out);

    if (ctx->cut && r->upstream) {
        /*
         * the response is complete as far as the upstream module is
         * concerned: it closes the upstream connection, so the provider
         * stops generating, and ends the request as usual, so the
         * client's connection may be kept alive
         */

        r->upstream->length = 0;
    }

    return rc;
}


static ngx_int_t
ngx_http_tb_event(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx, u_char *p,
    size_t len, ngx_chain_t ***last)
{
    u_char              *q, *data, *end, *d, *cut, *cut_end;
    size_t               dlen;
    uint64_t             prompt, output;
    ngx_int_t            rc;
    ngx_str_t            err;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_http_tb_json_t  *root, *choices, *usage, *v;

    end = p + len;
    cut = NULL;
    cut_end = NULL;

    /* what the event reports counts once it has ended, here */

    ngx_http_tb_usage_feed(&ctx->usage, p, len, 0);

    /* the event's data line, as the providers stream them */

    for (q = p; q < end; q = d) {
        for (d = q; d < end && *d != '\n' && *d != '\r'; d++) {
            /* void */
        }

        if (d - q > 5 && ngx_strncmp(q, "data:", 5) == 0) {
            data = q + 5;

            while (data < d && *data == ' ') {
                data++;
            }

            dlen = d - data;

            /*
             * the tree of an event is needed to take usage out, and to
             * learn what an ending needs; once that is known, an OpenAI
             * event that is not rewritten goes as it is
             */

            if (ctx->strip && ngx_http_tb_lines(q, end) > 1) {
                rc = ngx_http_tb_event_lines(r, p, len, last);
                goto written;
            }

            if (ctx->stream_id.len
                && ctx->format != NGX_HTTP_TB_FORMAT_ANTHROPIC
                && !(ctx->format == NGX_HTTP_TB_FORMAT_RESPONSES
                     && ctx->cut_at))
            {
                if (!ctx->strip) {
                    break;
                }

                /*
                 * keys are found in the text of the event's data: a quoted
                 * key cannot occur inside a JSON string, where quotes are
                 * escaped
                 */

                if (ngx_http_tb_usage_chunk(data, dlen)) {
                    return NGX_OK;
                }

                cut = ngx_http_tb_null_usage(data, dlen, &cut_end);
                break;
            }

            if (dlen && *data == '{'
                && ngx_http_tb_json_parse(r->pool, data, dlen, &root, &err)
                   == NGX_OK)
            {
                choices = ngx_http_tb_json_get(root, "choices");
                usage = ngx_http_tb_json_get(root, "usage");

                if (ctx->strip
                    && usage && usage->type == NGX_HTTP_TB_JSON_OBJECT
                    && choices && choices->type == NGX_HTTP_TB_JSON_ARRAY
                    && choices->n == 0)
                {
                    /* the usage-only chunk: the client did not ask */
                    return NGX_OK;
                }

                if (ctx->strip
                    && usage && usage->type == NGX_HTTP_TB_JSON_NULL)
                {
                    cut = ngx_http_tb_null_usage(data, dlen, &cut_end);
                }

                /* what an ending made here needs */

                v = ngx_http_tb_json_get(root, "id");
                if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                    ctx->stream_id = v->str;
                }

                v = ngx_http_tb_json_get(root, "created");
                if (v && v->type == NGX_HTTP_TB_JSON_NUMBER) {
                    ctx->stream_created = v->str;
                }

                v = ngx_http_tb_json_get(root, "model");
                if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                    ctx->stream_model = v->str;
                }

                v = ngx_http_tb_json_get(root, "sequence_number");
                if (v && v->type == NGX_HTTP_TB_JSON_NUMBER) {
                    ctx->sequence = ngx_atoi(v->str.data, v->str.len);
                }

                v = ngx_http_tb_json_get(root, "type");

                if (ctx->format == NGX_HTTP_TB_FORMAT_RESPONSES
                    && ngx_http_tb_is(v, "response.output_text.delta"))
                {
                    v = ngx_http_tb_json_get(root, "delta");

                    if (v && v->type == NGX_HTTP_TB_JSON_STRING
                        && ngx_http_tb_append(r->pool, &ctx->text,
                                              &ctx->text_size, &v->str)
                           != NGX_OK)
                    {
                        return NGX_ERROR;
                    }

                    v = ngx_http_tb_json_get(root, "item_id");
                    if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                        ctx->item_id = v->str;
                    }

                } else if (ngx_http_tb_is(v, "content_block_start")) {
                    ctx->block_open = 1;

                    v = ngx_http_tb_json_get(root, "index");
                    if (v && v->type == NGX_HTTP_TB_JSON_NUMBER) {
                        ctx->block_index = v->str;
                    }

                } else if (ngx_http_tb_is(v, "content_block_stop")) {
                    ctx->block_open = 0;
                }

                root = ngx_http_tb_json_get(root, "response");

                v = ngx_http_tb_json_get(root, "id");
                if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                    ctx->stream_id = v->str;
                }

                v = ngx_http_tb_json_get(root, "model");
                if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                    ctx->stream_model = v->str;
                }
            }

            break;
        }

        while (d < end && (*d == '\n' || *d == '\r')) {
            d++;
            break;
        }
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    if (cut) {
        b->last = ngx_cpymem(b->last, p, cut - p);
        b->last = ngx_cpymem(b->last, cut_end, end - cut_end);

    } else {
        b->last = ngx_cpymem(b->last, p, len);
    }

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    **last = cl;
    *last = &cl->next;

    rc = NGX_OK;

written:

    if (rc != NGX_OK) {
        return rc;
    }

    /* the output so far, against where the stream is to be cut */

    if (ctx->cut_at == 0) {
        return NGX_OK;
    }

    if (ngx_http_tb_usage_counted(&ctx->usage, &output) != NGX_OK) {
        output = 0;
    }

    if (ctx->usage.seen & (1 << 3)) {
        /* Anthropic's message_delta: the output as it grows */
        output = ngx_max(output, ctx->usage.value[3]);
    }

    if (output < ctx->cut_at) {
        return NGX_OK;
    }

    prompt = ctx->prompt;

    if (ngx_http_tb_ending(r, ctx, prompt, output, last) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "token budget: stream cut after %uL output tokens", output);

    return NGX_DONE;
}


/* the data lines of an event from its first one */

static ngx_uint_t
ngx_http_tb_lines(u_char *p, u_char *end)
{
    u_char      *d;
    ngx_uint_t   n;

    for (n = 0; p < end; p = d + 1) {
        for (d = p; d < end && *d != '\n' && *d != '\r'; d++) {
            /* void */
        }

        if (d - p >= 5 && ngx_strncmp(p, "data:", 5) == 0) {
            n++;
        }
    }

    return n;
}


/*
 * an event whose data is spread over several lines: the data is joined as
 * a client joins it, the usage taken out of it, and the event written
 * again with the same lines, the data where its first line was
 */

static ngx_int_t
ngx_http_tb_event_lines(ngx_http_request_t *r, u_char *p, size_t len,
    ngx_chain_t ***last)
{
    u_char       *q, *d, *end, *data, *dp, *cut, *cut_end, *o;
    size_t        n;
    ngx_buf_t    *b;
    ngx_uint_t    first;
    ngx_chain_t  *cl;

    end = p + len;

    data = ngx_pnalloc(r->pool, len);
    b = ngx_create_temp_buf(r->pool, 2 * len + 16);

    if (data == NULL || b == NULL) {
        return NGX_ERROR;
    }

    dp = data;
    first = 1;

    for (q = p; q < end; q = d + 1) {
        for (d = q; d < end && *d != '\n' && *d != '\r'; d++) {
            /* void */
        }

        if (d - q >= 5 && ngx_strncmp(q, "data:", 5) == 0) {
            o = q + 5;

            if (o < d && *o == ' ') {
                o++;
            }

            if (dp > data) {
                *dp++ = '\n';
            }

            dp = ngx_cpymem(dp, o, d - o);
        }

        if (d < end && *d == '\r' && d + 1 < end && d[1] == '\n') {
            d++;
        }
    }

    n = dp - data;

    if (ngx_http_tb_usage_chunk(data, n)) {
        return NGX_OK;
    }

    cut = ngx_http_tb_null_usage(data, n, &cut_end);

    if (cut) {
        ngx_memmove(cut, cut_end, data + n - cut_end);
        n -= cut_end - cut;
    }

    /* the other lines as they were, the data at the first data line */

    for (q = p; q < end; q = d + 1) {
        for (d = q; d < end && *d != '\n' && *d != '\r'; d++) {
            /* void */
        }

        if (d == q) {
            continue;
        }

        if (d - q >= 5 && ngx_strncmp(q, "data:", 5) == 0) {

            if (first) {
                first = 0;

                for (o = data; o <= data + n; o = dp + 1) {
                    dp = ngx_strlchr(o, data + n, '\n');

                    if (dp == NULL) {
                        dp = data + n;
                    }

                    b->last = ngx_http_tb_literal(b->last, "data: ");
                    b->last = ngx_cpymem(b->last, o, dp - o);
                    *b->last++ = '\n';
                }
            }

        } else {
            b->last = ngx_cpymem(b->last, q, d - q);
            *b->last++ = '\n';
        }

        if (d < end && *d == '\r' && d + 1 < end && d[1] == '\n') {
            d++;
        }
    }

    *b->last++ = '\n';

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    **last = cl;
    *last = &cl->next;

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_append(ngx_pool_t *pool, ngx_str_t *to, size_t *size,
    ngx_str_t *s)
{
    u_char  *p;
    size_t   n;

    if (to->len + s->len > *size) {
        n = ngx_max(2 * *size, to->len + s->len);
        n = ngx_max(n, 256);

        p = ngx_pnalloc(pool, n);
        if (p == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(p, to->data, to->len);
        to->data = p;
        *size = n;
    }

    ngx_memcpy(to->data + to->len, s->data, s->len);
    to->len += s->len;

    return NGX_OK;
}


/* an OpenAI usage-only chunk: "choices": [] and a "usage" object */

static ngx_uint_t
ngx_http_tb_usage_chunk(u_char *p, size_t len)
{
    u_char  *q, *end;

    end = p + len;

    q = ngx_strlcasestrn(p, end, (u_char *) "\"choices\"", 9 - 1);
    if (q == NULL) {
        return 0;
    }

    for (q += 9; q < end && (*q == ' ' || *q == ':'); q++) { /* void */ }

    if (q == end || *q++ != '[') {
        return 0;
    }

    while (q < end && *q == ' ') {
        q++;
    }

    if (q == end || *q != ']') {
        return 0;
    }

    q = ngx_strlcasestrn(p, end, (u_char *) "\"usage\"", 7 - 1);
    if (q == NULL) {
        return 0;
    }

    for (q += 7; q < end && (*q == ' ' || *q == ':'); q++) { /* void */ }

    return q < end && *q == '{';
}


/* the end of a stream, the way the provider ends one at its output limit */

static ngx_int_t
ngx_http_tb_ending(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    uint64_t prompt, uint64_t output, ngx_chain_t ***last)
{
    u_char       *p;
    size_t        len;
    ngx_buf_t    *b;
    ngx_uint_t    i;
    ngx_chain_t  *cl;
    ngx_str_t     id, created, model, index;

    id = ctx->stream_id;
    created = ctx->stream_created;
    model = ctx->stream_model;
    index = ctx->block_index;

    if (created.len == 0) {
        ngx_str_set(&created, "0");
    }

    if (index.len == 0) {
        ngx_str_set(&index, "0");
    }

    len = 1024 + 6 * (id.len + model.len + ctx->item_id.len + ctx->text.len)
          + ctx->choices * 128;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = b->last;

    switch (ctx->format) {

    case NGX_HTTP_TB_FORMAT_CHAT:
    case NGX_HTTP_TB_FORMAT_COMPLETIONS:

        p = ngx_http_tb_literal(p, "data: {\"id\":\"");
        p = ngx_http_tb_escape(p, &id);
        p = ngx_sprintf(p, "\",\"object\":\"%s\",\"created\":%V,\"model\":\"",
                        ctx->format == NGX_HTTP_TB_FORMAT_CHAT
                        ? "chat.completion.chunk" : "text_completion",
                        &created);
        p = ngx_http_tb_escape(p, &model);
        p = ngx_http_tb_literal(p, "\",\"choices\":[");

        for (i = 0; i < ctx->choices; i++) {
            p = ngx_sprintf(p, "%s{\"index\":%ui,", i ? "," : "", i);

            if (ctx->format == NGX_HTTP_TB_FORMAT_CHAT) {
                p = ngx_sprintf(p, "\"delta\":{},\"logprobs\":null,"
                                   "\"finish_reason\":\"length\"}");

            } else {
                p = ngx_sprintf(p, "\"text\":\"\",\"logprobs\":null,"
                                   "\"finish_reason\":\"length\"}");
            }
        }

        p = ngx_http_tb_literal(p, "]}\n\n");

        if (ctx->client_usage) {
            /* the client asked for the usage chunk */

            p = ngx_http_tb_literal(p, "data: {\"id\":\"");
            p = ngx_http_tb_escape(p, &id);
            p = ngx_sprintf(p, "\",\"object\":\"%s\",\"created\":%V,"
                               "\"model\":\"",
                            ctx->format == NGX_HTTP_TB_FORMAT_CHAT
                            ? "chat.completion.chunk" : "text_completion",
                            &created);
            p = ngx_http_tb_escape(p, &model);
            p = ngx_sprintf(p, "\",\"choices\":[],\"usage\":"
                               "{\"prompt_tokens\":%uL,"
                               "\"completion_tokens\":%uL,"
                               "\"total_tokens\":%uL}}\n\n",
                            prompt, output, prompt + output);
        }

        p = ngx_http_tb_literal(p, "data: [DONE]\n\n");
        break;

    case NGX_HTTP_TB_FORMAT_ANTHROPIC:

        if (ctx->block_open) {
            p = ngx_sprintf(p, "event: content_block_stop\n"
                               "data: {\"type\":\"content_block_stop\","
                               "\"index\":%V}\n\n", &index);
        }

        p = ngx_sprintf(p, "event: message_delta\n"
                           "data: {\"type\":\"message_delta\","
                           "\"delta\":{\"stop_reason\":\"max_tokens\","
                           "\"stop_sequence\":null},"
                           "\"usage\":{\"output_tokens\":%uL}}\n\n"
                           "event: message_stop\n"
                           "data: {\"type\":\"message_stop\"}\n\n",
                        output);
        break;

    default: /* NGX_HTTP_TB_FORMAT_RESPONSES */

        /* the text streamed so far is the response's output */

        p = ngx_sprintf(p, "event: response.incomplete\n"
                           "data: {\"type\":\"response.incomplete\","
                           "\"sequence_number\":%i,\"response\":{\"id\":\"",
                        ctx->sequence + 1);
        p = ngx_http_tb_escape(p, &id);
        p = ngx_http_tb_literal(p, "\",\"object\":\"response\",\"model\":\"");
        p = ngx_http_tb_escape(p, &model);
        p = ngx_http_tb_literal(p, "\",\"status\":\"incomplete\","
                                   "\"incomplete_details\":"
                                   "{\"reason\":\"max_output_tokens\"},"
                                   "\"output\":[");

        if (ctx->text.len) {
            p = ngx_http_tb_literal(p, "{\"id\":\"");
            p = ngx_http_tb_escape(p, &ctx->item_id);
            p = ngx_http_tb_literal(p, "\",\"type\":\"message\","
                                       "\"status\":\"incomplete\","
                                       "\"role\":\"assistant\",\"content\":"
                                       "[{\"type\":\"output_text\","
                                       "\"annotations\":[],\"text\":\"");
            p = ngx_http_tb_escape(p, &ctx->text);
            p = ngx_http_tb_literal(p, "\"}]}");
        }

        p = ngx_sprintf(p, "],\"usage\":{\"input_tokens\":%uL,"
                           "\"output_tokens\":%uL,\"total_tokens\":%uL}}}\n\n",
                        prompt, output, prompt + output);
        break;
    }

    b->last = p;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    **last = cl;
    *last = &cl->next;

    return NGX_OK;
}


/* the whole body in one buffer, decoded when it came compressed */

static ngx_int_t
ngx_http_tb_read_body(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_str_t *body, ngx_uint_t *decoded)
{
    u_char                  *p;
    off_t                    len;
    size_t                   size;
    ssize_t                  n;
    ngx_buf_t               *b;
    ngx_str_t               *ct, *ce;
    ngx_chain_t             *cl;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    *decoded = 0;

    if (r->headers_in.content_type == NULL) {
        ngx_http_tb_fail(ctx, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                         "unsupported_media_type",
                         "the request must have Content-Type: "
                         "application/json");
        return NGX_DECLINED;
    }

    ct = &r->headers_in.content_type->value;

    if (ct->len < 16
        || ngx_strncasecmp(ct->data, (u_char *) "application/json", 16) != 0
        || (ct->len > 16 && ct->data[16] != ';' && ct->data[16] != ' '))
    {
        ngx_http_tb_fail(ctx, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                         "unsupported_media_type",
                         "the request must have Content-Type: "
                         "application/json");
        return NGX_DECLINED;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    if (len == 0) {
        ngx_http_tb_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_json",
                         "the body is empty");
        return NGX_DECLINED;
    }

    if (len > (off_t) tlcf->max_body) {
        ngx_http_tb_fail(ctx, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                         "request_too_large",
                         "the body is larger than token_budget_max_body");
        return NGX_DECLINED;
    }

    size = (size_t) len;

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    body->data = p;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file && !ngx_buf_in_memory(b)) {
            n = ngx_read_file(b->file, p, b->file_last - b->file_pos,
                              b->file_pos);

            if (n != b->file_last - b->file_pos) {
                return NGX_ERROR;
            }

            p += n;
            continue;
        }

        p = ngx_cpymem(p, b->pos, b->last - b->pos);
    }

    body->len = p - body->data;

    ce = NULL;

    {
        ngx_uint_t        i;
        ngx_list_part_t  *part;
        ngx_table_elt_t  *h;

        part = &r->headers_in.headers.part;
        h = part->elts;

        for (i = 0; /* void */; i++) {

            if (i >= part->nelts) {
                if (part->next == NULL) {
                    break;
                }

                part = part->next;
                h = part->elts;
                i = 0;
            }

            if (h[i].key.len == 16
                && ngx_strncasecmp(h[i].key.data,
                                   (u_char *) "Content-Encoding", 16) == 0)
            {
                if (ce != NULL) {
                    ngx_http_tb_fail(ctx, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                                     "unsupported_media_type",
                                     "more than one Content-Encoding");
                    return NGX_DECLINED;
                }

                ce = &h[i].value;
            }
        }
    }

    if (ce == NULL || (ce->len == 8
                       && ngx_strncasecmp(ce->data, (u_char *) "identity", 8)
                          == 0))
    {
        return NGX_OK;
    }

    if ((ce->len == 4 && ngx_strncasecmp(ce->data, (u_char *) "gzip", 4) == 0)
        || (ce->len == 7
            && ngx_strncasecmp(ce->data, (u_char *) "deflate", 7) == 0))
    {
        *decoded = 1;
        return ngx_http_tb_inflate(r, ctx, body);
    }

    ngx_http_tb_fail(ctx, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                     "unsupported_media_type",
                     "the body's Content-Encoding is not supported");
    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_tb_inflate(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx,
    ngx_str_t *body)
{
    int                      rc;
    u_char                  *out, *p;
    size_t                   size;
    z_stream                 z;
    ngx_http_tb_loc_conf_t  *tlcf;

    tlcf = ngx_http_get_module_loc_conf(r, ngx_http_token_budget_module);

    ngx_memzero(&z, sizeof(z_stream));

    /* zlib or gzip, told apart by the header */

    if (inflateInit2(&z, MAX_WBITS + 32) != Z_OK) {
        return NGX_ERROR;
    }

    size = ngx_min(tlcf->max_body, ngx_max(4 * body->len, 65536));
    out = NULL;

    z.next_in = body->data;
    z.avail_in = body->len;

    for ( ;; ) {
        p = ngx_pnalloc(r->pool, size);
        if (p == NULL) {
            inflateEnd(&z);
            return NGX_ERROR;
        }

        if (out != NULL) {
            ngx_memcpy(p, out, z.total_out);
        }

        out = p;
        z.next_out = out + z.total_out;
        z.avail_out = size - z.total_out;

        rc = inflate(&z, Z_FINISH);

        if (rc == Z_STREAM_END) {
            break;
        }

        if ((rc == Z_BUF_ERROR || rc == Z_OK) && z.avail_out == 0
            && size < tlcf->max_body)
        {
            size = ngx_min(2 * size, tlcf->max_body);
            continue;
        }

        inflateEnd(&z);

        if (z.avail_out == 0) {
            ngx_http_tb_fail(ctx, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                             "request_too_large",
                             "the decoded body is larger than "
                             "token_budget_max_body");

        } else {
            ngx_http_tb_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_encoding",
                             "the body could not be decoded");
        }

        return NGX_DECLINED;
    }

    if (z.avail_in != 0) {
        inflateEnd(&z);
        ngx_http_tb_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_encoding",
                         "the body has data after its compressed stream");
        return NGX_DECLINED;
    }

    body->data = out;
    body->len = z.total_out;

    inflateEnd(&z);

    return NGX_OK;
}


/* max_tokens in the forwarded body, lowered to what fits */

static ngx_int_t
ngx_http_tb_clamp(ngx_http_request_t *r, ngx_http_tb_count_t *c,
    uint64_t room)
{
    u_char              *p;
    ngx_str_t            body;
    ngx_http_tb_json_t  *v;

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    /*
     * only a limit the body sets can be over: without one, the output
     * reserved is what fits
     */

    v = c->output_field;

    v->type = NGX_HTTP_TB_JSON_NUMBER;
    v->str.data = p;
    v->str.len = ngx_sprintf(p, "%uL", room) - p;

    if (ngx_http_tb_json_print(r->pool, c->root, &body) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_tb_replace_body(r, &body);
}


static ngx_int_t
ngx_http_tb_replace_body(ngx_http_request_t *r, ngx_str_t *body)
{
    ngx_buf_t        *b;
    ngx_str_t         name, value;
    ngx_chain_t      *cl;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body->data;
    b->last = body->data + body->len;
    b->start = b->pos;
    b->end = b->last;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    r->request_body->bufs = cl;
    r->request_body->temp_file = NULL;
    r->headers_in.content_length_n = body->len;

    /* the body goes up decoded */

    ngx_str_set(&name, "Content-Encoding");
    ngx_str_null(&value);

    return ngx_http_tb_set_header(r, &name, &value);
}


/*
 * sets a request header for the upstream, replacing whatever the client
 * sent under that name; an empty value removes the header
 */

static ngx_int_t
ngx_http_tb_set_header(ngx_http_request_t *r, ngx_str_t *name,
    ngx_str_t *value)
{
    ngx_uint_t        i, found;
    ngx_list_part_t  *part, old;
    ngx_table_elt_t  *h, *nh;

    /* the list is made anew only when the client sent the header */

    found = 0;
    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == name->len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            found = 1;
            break;
        }
    }

    if (!found && value->len == 0) {
        return NGX_OK;
    }

    if (found) {
        old = r->headers_in.headers.part;

        if (ngx_list_init(&r->headers_in.headers, r->pool, 20,
                          sizeof(ngx_table_elt_t))
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        part = &old;
        h = part->elts;

        for (i = 0; /* void */; i++) {

            if (i >= part->nelts) {
                if (part->next == NULL) {
                    break;
                }

                part = part->next;
                h = part->elts;
                i = 0;
            }

            if (h[i].key.len == name->len
                && ngx_strncasecmp(h[i].key.data, name->data, name->len)
                   == 0)
            {
                continue;
            }

            nh = ngx_list_push(&r->headers_in.headers);
            if (nh == NULL) {
                return NGX_ERROR;
            }

            *nh = h[i];
        }
    }

    if (value->len) {
        nh = ngx_list_push(&r->headers_in.headers);
        if (nh == NULL) {
            return NGX_ERROR;
        }

        nh->key = *name;
        nh->value = *value;

        nh->lowcase_key = ngx_pnalloc(r->pool, name->len);
        if (nh->lowcase_key == NULL) {
            return NGX_ERROR;
        }

        ngx_strlow(nh->lowcase_key, name->data, name->len);
        nh->hash = ngx_hash_key(nh->lowcase_key, name->len);
    }

    return NGX_OK;
}


static void
ngx_http_tb_fail(ngx_http_tb_ctx_t *ctx, ngx_uint_t status, const char *code,
    const char *message)
{
    ctx->error.status = status;
    ctx->error.code.data = (u_char *) code;
    ctx->error.code.len = ngx_strlen(code);
    ctx->error.message.data = (u_char *) message;
    ctx->error.message.len = ngx_strlen(message);
}


/* an error body shaped like the provider's own */

static ngx_int_t
ngx_http_tb_send_error(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    size_t        len;
    u_char       *p;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_str_t     type;
    ngx_chain_t   out;

    switch (ctx->error.status) {

    case NGX_HTTP_INTERNAL_SERVER_ERROR:
        ngx_str_set(&type, "api_error");
        break;

    case NGX_HTTP_TOO_MANY_REQUESTS:
        if (ctx->format == NGX_HTTP_TB_FORMAT_ANTHROPIC) {
            ngx_str_set(&type, "rate_limit_error");

        } else {
            ngx_str_set(&type, "tokens");
        }

        break;

    case NGX_HTTP_SERVICE_UNAVAILABLE:
        if (ctx->format == NGX_HTTP_TB_FORMAT_ANTHROPIC) {
            ngx_str_set(&type, "overloaded_error");

        } else {
            ngx_str_set(&type, "server_error");
        }

        break;

    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        if (ctx->format == NGX_HTTP_TB_FORMAT_ANTHROPIC) {
            ngx_str_set(&type, "request_too_large");
            break;
        }

        /* fall through */

    default:
        ngx_str_set(&type, "invalid_request_error");
        break;
    }

    len = sizeof("{\"type\":\"error\",\"error\":{\"type\":\"\","
                 "\"message\":\"\",\"param\":null,\"code\":\"\"}}\n")
          + type.len + 6 * ctx->error.message.len + 6 * ctx->error.code.len;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;

    if (ctx->format == NGX_HTTP_TB_FORMAT_ANTHROPIC) {
        p = ngx_sprintf(p, "{\"type\":\"error\",\"error\":{\"type\":\"%V\","
                           "\"message\":\"", &type);
        p = ngx_http_tb_escape(p, &ctx->error.message);
        p = ngx_cpymem(p, "\"}}\n", 4);

    } else {
        p = ngx_cpymem(p, "{\"error\":{\"message\":\"", 21);
        p = ngx_http_tb_escape(p, &ctx->error.message);
        p = ngx_sprintf(p, "\",\"type\":\"%V\",\"param\":null,\"code\":\"",
                        &type);
        p = ngx_http_tb_escape(p, &ctx->error.code);
        p = ngx_cpymem(p, "\"}}\n", 4);
    }

    b->last = p;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = ctx->error.status;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static u_char *
ngx_http_tb_escape(u_char *p, ngx_str_t *s)
{
    return (u_char *) ngx_escape_json(p, s->data, s->len);
}


static ngx_int_t
ngx_http_tb_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    u_char             *p;
    ngx_str_t           s;
    ngx_http_tb_ctx_t  *ctx;

    ctx = ngx_http_tb_get_ctx(r->main);

    if (ctx == NULL || !ctx->done) {
        v->not_found = 1;
        return NGX_OK;
    }

    ngx_str_null(&s);

    switch (data) {

    case NGX_HTTP_TB_VAR_PROMPT:
    case NGX_HTTP_TB_VAR_RESERVED:
    case NGX_HTTP_TB_VAR_OUTPUT:

        if (ctx->decision == NGX_HTTP_TB_ERROR) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%uL",
                            data == NGX_HTTP_TB_VAR_PROMPT ? ctx->prompt
                            : data == NGX_HTTP_TB_VAR_OUTPUT ? ctx->output
                            : ctx->prompt + ctx->output)
                - p;
        break;

    case NGX_HTTP_TB_VAR_REMAINING:
        if (ctx->refusal.tightest == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%L", ngx_max(ctx->refusal.remaining, 0)) - p;
        break;

    case NGX_HTTP_TB_VAR_COMPLETION:
        {
        uint64_t  prompt, output;

        if (ngx_http_tb_usage_get(&ctx->usage, &prompt, &output) != NGX_OK
            && ngx_http_tb_usage_counted(&ctx->usage, &output) != NGX_OK)
        {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%uL", output) - p;
        }
        break;

    case NGX_HTTP_TB_VAR_MODEL:
        s = ctx->model;
        break;

    case NGX_HTTP_TB_VAR_METHOD:
        if (ctx->decision != NGX_HTTP_TB_ERROR) {
            s = ngx_http_tb_methods[ctx->method & 3];
        }

        {
        uint64_t  prompt, output;

        if (s.len && ctx->reading_usage
            && ngx_http_tb_usage_get(&ctx->usage, &prompt, &output)
               != NGX_OK
            && ngx_http_tb_usage_counted(&ctx->usage, &output) == NGX_OK)
        {
            /* the output was counted here, the upstream reported none */

            p = ngx_pnalloc(r->pool, s.len + sizeof("+output_counted"));
            if (p == NULL) {
                return NGX_ERROR;
            }

            s.len = ngx_sprintf(p, "%V+output_counted", &s) - p;
            s.data = p;
        }
        }

        break;

    case NGX_HTTP_TB_VAR_STATUS:
        s = ngx_http_tb_decisions[ctx->decision];
        break;

    case NGX_HTTP_TB_VAR_REASON:
        s = ctx->reason;
        break;

    default: /* NGX_HTTP_TB_VAR_FORMAT */
        s = ngx_http_tb_format_names[ctx->format];
        break;
    }

    if (s.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = s.len;
    v->data = s.data;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_tb_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_tb_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_tb_main_conf_t  *tmcf;

    tmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_tb_main_conf_t));
    if (tmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&tmcf->encodings, cf->pool, 4,
                       sizeof(ngx_http_tb_encoding_t))
        != NGX_OK
        || ngx_array_init(&tmcf->models, cf->pool, 32,
                          sizeof(ngx_http_tb_model_t))
           != NGX_OK
        || ngx_array_init(&tmcf->zones, cf->pool, 4,
                          sizeof(ngx_http_tb_zone_t *))
           != NGX_OK
        || ngx_array_init(&tmcf->redis, cf->pool, 1,
                          sizeof(ngx_http_tb_redis_t *))
           != NGX_OK)
    {
        return NULL;
    }

    return tmcf;
}


static void *
ngx_http_tb_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_tb_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_tb_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->header = { 0, NULL };
     *     conf->limits = NULL;
     */

    conf->enable = NGX_CONF_UNSET;
    conf->format = NGX_CONF_UNSET_UINT;
    conf->max_input = NGX_CONF_UNSET_UINT;
    conf->reserve_output = NGX_CONF_UNSET_UINT;
    conf->dry_run = NGX_CONF_UNSET;
    conf->status = NGX_CONF_UNSET_UINT;
    conf->clamp = NGX_CONF_UNSET;
    conf->image_tokens = NGX_CONF_UNSET_UINT;
    conf->estimate_margin = NGX_CONF_UNSET_UINT;
    conf->max_body = NGX_CONF_UNSET_SIZE;
    conf->full_status = NGX_CONF_UNSET_UINT;
    conf->stream_cut = NGX_CONF_UNSET_UINT;
    conf->count_cache = NGX_CONF_UNSET;
    conf->uncounted = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_tb_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_tb_loc_conf_t *prev = parent;
    ngx_http_tb_loc_conf_t *conf = child;

    ngx_http_tb_main_conf_t  *tmcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_uint_value(conf->format, prev->format,
                              NGX_HTTP_TB_FORMAT_AUTO);
    ngx_conf_merge_uint_value(conf->max_input, prev->max_input, 0);

    if (conf->reserve_output == NGX_CONF_UNSET_UINT) {
        conf->reserve_output = prev->reserve_output;
    }

    if (conf->header.data == NULL) {
        if (prev->header.data) {
            conf->header = prev->header;

        } else {
            ngx_str_set(&conf->header, "X-Token-Count");
        }
    }

    ngx_conf_merge_value(conf->dry_run, prev->dry_run, 0);
    ngx_conf_merge_uint_value(conf->status, prev->status,
                              NGX_HTTP_REQUEST_ENTITY_TOO_LARGE);
    ngx_conf_merge_value(conf->clamp, prev->clamp, 0);
    ngx_conf_merge_uint_value(conf->image_tokens, prev->image_tokens, 1600);
    ngx_conf_merge_uint_value(conf->estimate_margin, prev->estimate_margin,
                              10);
    ngx_conf_merge_size_value(conf->max_body, prev->max_body,
                              32 * 1024 * 1024);
    ngx_conf_merge_uint_value(conf->full_status, prev->full_status,
                              NGX_HTTP_SERVICE_UNAVAILABLE);
    ngx_conf_merge_uint_value(conf->stream_cut, prev->stream_cut,
                              NGX_HTTP_TB_CUT_OFF);
    ngx_conf_merge_value(conf->count_cache, prev->count_cache, 1);
    ngx_conf_merge_uint_value(conf->uncounted, prev->uncounted, 1);

    if (conf->limits == NULL) {
        conf->limits = prev->limits;
    }

    if (conf->enable) {
        tmcf = ngx_http_conf_get_module_main_conf(cf,
                                                 ngx_http_token_budget_module);

        if (tmcf->models.nelts == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"token_budget\" is on, but no "
                               "\"token_budget_model\" is defined");
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_tb_encoding(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_main_conf_t *tmcf = conf;

    char                     err[256];
    ngx_str_t               *value, path;
    ngx_uint_t               i;
    tk_pattern_e             pattern;
    tk_allocator_t           allocator;
    ngx_pool_cleanup_t      *cln;
    ngx_http_tb_encoding_t  *e;

    value = cf->args->elts;

    e = tmcf->encodings.elts;

    for (i = 0; i < tmcf->encodings.nelts; i++) {
        if (e[i].name.len == value[1].len
            && ngx_strncmp(e[i].name.data, value[1].data, value[1].len) == 0)
        {
            return "is duplicate";
        }
    }

    if (tk_pattern_by_name((char *) value[1].data, &pattern) != TK_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown encoding \"%V\", expected r50k_base, "
                           "p50k_base, cl100k_base or o200k_base", &value[1]);
        return NGX_CONF_ERROR;
    }

    path = value[2];

    if (ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    allocator.alloc = ngx_http_tb_alloc;
    allocator.free = ngx_http_tb_free;
    allocator.data = cf->log;

    e = ngx_array_push(&tmcf->encodings);
    if (e == NULL) {
        return NGX_CONF_ERROR;
    }

    e->name = value[1];
    e->pattern = pattern;
    e->enc = tk_encoding_load((char *) path.data, pattern, &allocator, err,
                              sizeof(err));

    if (e->enc == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "cannot load encoding \"%V\": %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        tk_encoding_free(e->enc);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_tb_encoding_cleanup;
    cln->data = e->enc;

    ngx_log_error(NGX_LOG_INFO, cf->log, 0,
                  "token budget: encoding \"%V\" loaded, %uD tokens, %uz bytes",
                  &value[1], tk_encoding_vocab_size(e->enc),
                  tk_encoding_memory(e->enc));

    return NGX_CONF_OK;
}


static char *
ngx_http_tb_model(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_main_conf_t *tmcf = conf;

    ngx_int_t                n;
    ngx_str_t               *value, s;
    ngx_uint_t               i;
    ngx_http_tb_model_t     *m;
    ngx_http_tb_encoding_t  *e;

    value = cf->args->elts;

    m = ngx_array_push(&tmcf->models);
    if (m == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(m, sizeof(ngx_http_tb_model_t));

    m->pattern = value[1];

    if (m->pattern.len && m->pattern.data[m->pattern.len - 1] == '*') {
        m->pattern.len--;
        m->prefix = 1;
    }

    if (ngx_strlchr(m->pattern.data, m->pattern.data + m->pattern.len, '*')) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid model pattern \"%V\", only a trailing "
                           "\"*\" is allowed", &value[1]);
        return NGX_CONF_ERROR;
    }

    e = tmcf->encodings.elts;

    for (i = 0; i < tmcf->encodings.nelts; i++) {
        if (e[i].name.len == value[2].len
            && ngx_strncmp(e[i].name.data, value[2].data, value[2].len) == 0)
        {
            m->encoding = &e[i];
            break;
        }
    }

    if (m->encoding == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model \"%V\" uses encoding \"%V\", which no "
                           "\"token_budget_encoding\" before it loads",
                           &value[1], &value[2]);
        return NGX_CONF_ERROR;
    }

    for (i = 3; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "context=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;

            n = ngx_atoi(s.data, s.len);
            if (n <= 0) {
                goto invalid;
            }

            m->context = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_output=", 11) == 0) {
            s.data = value[i].data + 11;
            s.len = value[i].len - 11;

            n = ngx_atoi(s.data, s.len);
            if (n <= 0) {
                goto invalid;
            }

            m->max_output = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "estimate=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            if (s.len && s.data[s.len - 1] == '%') {
                s.len--;
            }

            n = ngx_atoi(s.data, s.len);
            if (n <= 0 || n > 1000) {
                goto invalid;
            }

            m->estimate = n;
            continue;
        }

        goto invalid;
    }

    if (m->context && m->max_output > m->context) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model \"%V\": max_output is larger than its "
                           "context", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_tb_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_main_conf_t *tmcf = conf;

    u_char                            *p;
    off_t                              tokens;
    ssize_t                            size;
    time_t                             per;
    ngx_int_t                          n;
    ngx_str_t                         *value, name, s;
    ngx_uint_t                         i, count;
    ngx_shm_zone_t                    *shm_zone;
    ngx_http_tb_zone_t                *zone, **zp;
    ngx_http_tb_redis_conf_t           rc;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_tb_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = &zone->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    size = 0;
    tokens = 0;
    per = 0;
    count = NGX_HTTP_TB_COUNT_TOTAL;
    ngx_str_null(&name);
    ngx_memzero(&rc, sizeof(ngx_http_tb_redis_conf_t));

    zone->mode = NGX_CONF_UNSET_UINT;
    zone->fail = NGX_HTTP_TB_FAIL_LOCAL;
    zone->share = 100;
    zone->timeout = 100;
    zone->sync = NGX_CONF_UNSET_MSEC;
    zone->hold = 600000;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            name.data = value[i].data + 5;

            p = (u_char *) ngx_strchr(name.data, ':');

            if (p == NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            name.len = p - name.data;

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);

            if (size == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            if (size < (ssize_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "tokens=", 7) == 0) {
            tokens = ngx_atoof(value[i].data + 7, value[i].len - 7);

            if (tokens <= 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "per=", 4) == 0) {
            s.data = value[i].data + 4;
            s.len = value[i].len - 4;

            per = ngx_parse_time(&s, 1);

            if (per == (time_t) NGX_ERROR || per <= 0) {
                goto invalid;
            }

            zone->per = s;
            continue;
        }

        if (ngx_strcmp(value[i].data, "count=total") == 0) {
            count = NGX_HTTP_TB_COUNT_TOTAL;
            continue;
        }

        if (ngx_strcmp(value[i].data, "count=prompt") == 0) {
            count = NGX_HTTP_TB_COUNT_PROMPT;
            continue;
        }

        if (ngx_strcmp(value[i].data, "count=completion") == 0) {
            count = NGX_HTTP_TB_COUNT_COMPLETION;
            continue;
        }

        /* budgets shared through Redis */

        if (ngx_strncmp(value[i].data, "redis=", 6) == 0) {
            rc.addr.data = value[i].data + 6;
            rc.addr.len = value[i].len - 6;

            if (rc.addr.len == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_password=", 15) == 0) {
            rc.password.data = value[i].data + 15;
            rc.password.len = value[i].len - 15;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_db=", 9) == 0) {
            rc.db = ngx_atoi(value[i].data + 9, value[i].len - 9);

            if (rc.db == NGX_ERROR) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "redis_tls=on") == 0) {
            rc.tls = 1;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_ca=", 13) == 0) {
            rc.tls_ca.data = value[i].data + 13;
            rc.tls_ca.len = value[i].len - 13;
            continue;
        }

        if (ngx_strncmp(value[i].data, "redis_tls_name=", 15) == 0) {
            rc.tls_name.data = value[i].data + 15;
            rc.tls_name.len = value[i].len - 15;
            continue;
        }

        if (ngx_strcmp(value[i].data, "mode=strict") == 0) {
            zone->mode = NGX_HTTP_TB_REDIS_STRICT;
            continue;
        }

        if (ngx_strcmp(value[i].data, "mode=batched") == 0) {
            zone->mode = NGX_HTTP_TB_REDIS_BATCHED;
            continue;
        }

        if (ngx_strcmp(value[i].data, "fail=local") == 0) {
            zone->fail = NGX_HTTP_TB_FAIL_LOCAL;
            continue;
        }

        if (ngx_strcmp(value[i].data, "fail=open") == 0) {
            zone->fail = NGX_HTTP_TB_FAIL_OPEN;
            continue;
        }

        if (ngx_strcmp(value[i].data, "fail=closed") == 0) {
            zone->fail = NGX_HTTP_TB_FAIL_CLOSED;
            continue;
        }

        if (ngx_strncmp(value[i].data, "share=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

            if (s.len && s.data[s.len - 1] == '%') {
                s.len--;
            }

            n = ngx_atoi(s.data, s.len);

            if (n == NGX_ERROR || n < 1 || n > 100) {
                goto invalid;
            }

            zone->share = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0
            || ngx_strncmp(value[i].data, "sync=", 5) == 0
            || ngx_strncmp(value[i].data, "hold=", 5) == 0)
        {
            p = (u_char *) ngx_strchr(value[i].data, '=') + 1;

            s.data = p;
            s.len = value[i].data + value[i].len - p;

            n = ngx_parse_time(&s, 0);

            if (n == NGX_ERROR || n < 1) {
                goto invalid;
            }

            if (value[i].data[0] == 't') {
                zone->timeout = n;

            } else if (value[i].data[0] == 's') {
                zone->sync = n;

            } else {
                zone->hold = n;
            }

            continue;
        }

        goto invalid;
    }

    if ((rc.tls_ca.len || rc.tls_name.len) && !rc.tls) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"redis_tls_ca\" and \"redis_tls_name\" need "
                           "\"redis_tls=on\"");
        return NGX_CONF_ERROR;
    }

    if (rc.addr.len) {
        if (zone->mode == NGX_CONF_UNSET_UINT) {
            zone->mode = NGX_HTTP_TB_REDIS_STRICT;
        }

        if (zone->sync == NGX_CONF_UNSET_MSEC) {
            zone->sync = (zone->mode == NGX_HTTP_TB_REDIS_BATCHED) ? 100
                                                                   : 1000;
        }

        zone->redis = ngx_http_tb_redis_add(cf, &tmcf->redis, &rc);
        if (zone->redis == NULL) {
            return NGX_CONF_ERROR;
        }

        if (zone->redis->timeout == NGX_CONF_UNSET_MSEC
            || zone->timeout < zone->redis->timeout)
        {
            zone->redis->timeout = zone->timeout;
        }

    } else if (zone->mode != NGX_CONF_UNSET_UINT
               || rc.password.len || rc.db || rc.tls
               || zone->sync != NGX_CONF_UNSET_MSEC)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"mode\", \"sync\" and the \"redis_\" "
                           "parameters need the \"redis\" parameter");
        return NGX_CONF_ERROR;

    } else {
        zone->mode = NGX_HTTP_TB_REDIS_NONE;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (tokens == 0 || per == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"tokens\" and \"per\" "
                           "parameters", &cmd->name);
        return NGX_CONF_ERROR;
    }

    zone->limit = (uint64_t) tokens;
    zone->period = (ngx_msec_t) per * 1000;
    zone->count = count;

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_token_budget_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%V \"%V\" is already bound to key \"%V\"",
                           &cmd->name, &name,
                           &((ngx_http_tb_zone_t *) shm_zone->data)->key.value);
        return NGX_CONF_ERROR;
    }

    shm_zone->init = ngx_http_tb_zone_init;
    shm_zone->data = zone;
    zone->shm_zone = shm_zone;

    zp = ngx_array_push(&tmcf->zones);
    if (zp == NULL) {
        return NGX_CONF_ERROR;
    }

    *zp = zone;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_tb_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_loc_conf_t *tlcf = conf;

    ngx_str_t                 *value, name;
    ngx_uint_t                 i;
    ngx_http_tb_zone_t       **zones, **zp, *zone;
    ngx_http_tb_main_conf_t   *tmcf;

    value = cf->args->elts;

    if (ngx_strncmp(value[1].data, "zone=", 5) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    name.data = value[1].data + 5;
    name.len = value[1].len - 5;

    tmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_token_budget_module);

    zone = NULL;
    zones = tmcf->zones.elts;

    for (i = 0; i < tmcf->zones.nelts; i++) {
        if (zones[i]->shm_zone->shm.name.len == name.len
            && ngx_strncmp(zones[i]->shm_zone->shm.name.data, name.data,
                           name.len) == 0)
        {
            zone = zones[i];
            break;
        }
    }

    if (zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown token_budget_zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    if (tlcf->limits == NULL) {
        tlcf->limits = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_tb_zone_t *));
        if (tlcf->limits == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    zones = tlcf->limits->elts;

    for (i = 0; i < tlcf->limits->nelts; i++) {
        if (zones[i] == zone) {
            return "is duplicate";
        }
    }

    if (tlcf->limits->nelts == NGX_HTTP_TB_MAX_LIMITS) {
        return "is used too many times";
    }

    zp = ngx_array_push(tlcf->limits);
    if (zp == NULL) {
        return NGX_CONF_ERROR;
    }

    *zp = zone;

    return NGX_CONF_OK;
}


static char *
ngx_http_tb_header(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_loc_conf_t *tlcf = conf;

    ngx_str_t   *value;
    ngx_uint_t   i;

    if (tlcf->header.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        ngx_str_set(&tlcf->header, "");
        return NGX_CONF_OK;
    }

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid header name \"\"");
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < value[1].len; i++) {
        if (!((value[1].data[i] >= 'a' && value[1].data[i] <= 'z')
              || (value[1].data[i] >= 'A' && value[1].data[i] <= 'Z')
              || (value[1].data[i] >= '0' && value[1].data[i] <= '9')
              || value[1].data[i] == '-' || value[1].data[i] == '_'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid header name \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    tlcf->header = value[1];

    return NGX_CONF_OK;
}


static char *
ngx_http_tb_margin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_tb_loc_conf_t *tlcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value, s;

    if (tlcf->estimate_margin != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;
    s = value[1];

    if (s.len && s.data[s.len - 1] == '%') {
        s.len--;
    }

    n = ngx_atoi(s.data, s.len);

    if (n == NGX_ERROR || n > 100) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid margin \"%V\", expected 0%% to 100%%",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    tlcf->estimate_margin = n;

    return NGX_CONF_OK;
}


static void *
ngx_http_tb_alloc(void *data, size_t size)
{
    return ngx_alloc(size, ngx_cycle->log);
}


static void
ngx_http_tb_free(void *data, void *p)
{
    ngx_free(p);
}


static void
ngx_http_tb_encoding_cleanup(void *data)
{
    tk_encoding_free(data);
}


static void
ngx_http_tb_metrics_decision(ngx_http_request_t *r, ngx_http_tb_ctx_t *ctx)
{
    ngx_atomic_t             *c;
    ngx_http_tb_metrics_t    *m;
    ngx_http_tb_main_conf_t  *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_budget_module);
    m = tmcf->metrics;

    if (m == NULL) {
        return;
    }

    (void) ngx_atomic_fetch_add(&m->decisions[ctx->decision], 1);

    if (ctx->model_index < 0) {
        return;
    }

    c = m->model[ctx->model_index];

    (void) ngx_atomic_fetch_add(&c[NGX_HTTP_TB_M_REQUESTS], 1);

    if (ctx->decision == NGX_HTTP_TB_REJECTED) {
        (void) ngx_atomic_fetch_add(&c[NGX_HTTP_TB_M_REJECTED], 1);
        return;
    }

    if (ctx->decision != NGX_HTTP_TB_ERROR) {
        (void) ngx_atomic_fetch_add(&c[NGX_HTTP_TB_M_PROMPT], ctx->prompt);
        (void) ngx_atomic_fetch_add(&c[NGX_HTTP_TB_M_RESERVED],
                                    ctx->prompt + ctx->output);
    }
}


static ngx_int_t
ngx_http_tb_metrics_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_tb_main_conf_t  *otmcf = data;

    size_t                    size;
    ngx_uint_t                i, j, k;
    ngx_slab_pool_t          *shpool;
    ngx_http_tb_model_t      *models, *omodels;
    ngx_http_tb_metrics_t    *m, *old;
    ngx_http_tb_main_conf_t  *tmcf;

    tmcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists && otmcf == NULL) {
        tmcf->metrics = shpool->data;
        return NGX_OK;
    }

    /*
     * the models may differ after a reload: new memory, sized for the new
     * list, takes the counters over by the models' names
     */

    size = sizeof(ngx_http_tb_metrics_t)
           + tmcf->models.nelts * sizeof(ngx_atomic_t) * 5;

    tmcf->metrics = ngx_slab_calloc(shpool, size);
    if (tmcf->metrics == NULL) {
        return NGX_ERROR;
    }

    shpool->data = tmcf->metrics;

    if (otmcf == NULL || otmcf->metrics == NULL) {
        return NGX_OK;
    }

    old = otmcf->metrics;
    m = tmcf->metrics;

    for (i = 0; i < 5; i++) {
        m->decisions[i] = old->decisions[i];
    }

    for (i = 0; i <= NGX_HTTP_TB_DRIFT_BUCKETS; i++) {
        m->drift[i] = old->drift[i];
    }

    m->drift_count = old->drift_count;
    m->drift_sum = old->drift_sum;
    m->drift_sum_abs = old->drift_sum_abs;

    models = tmcf->models.elts;
    omodels = otmcf->models.elts;

    for (i = 0; i < tmcf->models.nelts; i++) {
        for (j = 0; j < otmcf->models.nelts; j++) {
            if (models[i].prefix == omodels[j].prefix
                && models[i].pattern.len == omodels[j].pattern.len
                && ngx_strncmp(models[i].pattern.data, omodels[j].pattern.data,
                               models[i].pattern.len) == 0)
            {
                for (k = 0; k < 5; k++) {
                    m->model[i][k] = old->model[j][k];
                }

                break;
            }
        }
    }

    ngx_slab_free(shpool, old);

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                 i;
    ngx_http_tb_zone_t       **zones;
    ngx_http_tb_redis_t      **redis;
    ngx_http_tb_main_conf_t   *tmcf;

    tmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_token_budget_module);

    if (tmcf == NULL || tmcf->redis.nelts == 0) {
        return NGX_OK;
    }

    redis = tmcf->redis.elts;

    for (i = 0; i < tmcf->redis.nelts; i++) {
        if (ngx_http_tb_redis_init_process(redis[i], cycle) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    zones = tmcf->zones.elts;

    for (i = 0; i < tmcf->zones.nelts; i++) {
        if (ngx_http_tb_zone_init_process(zones[i], cycle) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_tb_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                 i;
    ngx_http_tb_zone_t       **zones;
    ngx_http_tb_redis_t      **redis;
    ngx_http_tb_main_conf_t   *tmcf;

    tmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_token_budget_module);

    if (tmcf == NULL || tmcf->redis.nelts == 0) {
        return;
    }

    zones = tmcf->zones.elts;

    for (i = 0; i < tmcf->zones.nelts; i++) {
        ngx_http_tb_zone_exit_process(zones[i]);
    }

    redis = tmcf->redis.elts;

    for (i = 0; i < tmcf->redis.nelts; i++) {
        ngx_http_tb_redis_exit_process(redis[i]);
    }
}


static ngx_int_t
ngx_http_tb_init(ngx_conf_t *cf)
{
    size_t                      size;
    ngx_str_t                   name;
    ngx_http_handler_pt        *h;
    ngx_http_tb_main_conf_t    *tmcf;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_tb_handler;

    tmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_token_budget_module);

    if (tmcf->redis.nelts) {
        ngx_http_tb_zone_scripts();
    }

    if (tmcf->models.nelts) {
        ngx_str_set(&name, "token_budget_metrics");

        size = ngx_align(sizeof(ngx_http_tb_metrics_t)
                         + tmcf->models.nelts * sizeof(ngx_atomic_t) * 5,
                         ngx_pagesize)
               + 8 * ngx_pagesize;

        tmcf->metrics_zone = ngx_shared_memory_add(cf, &name, size,
                                                &ngx_http_token_budget_module);
        if (tmcf->metrics_zone == NULL) {
            return NGX_ERROR;
        }

        tmcf->metrics_zone->init = ngx_http_tb_metrics_init;
        tmcf->metrics_zone->data = tmcf;
    }

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_tb_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_tb_body_filter;

    return NGX_OK;
}
