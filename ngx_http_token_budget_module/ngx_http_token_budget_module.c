
/*
 * Copyright (C) The token budget authors
 *
 * Placeholder: a minimal valid module so that the build and the test
 * harness can be exercised before the real module lands.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "tk.h"


static ngx_http_module_t  ngx_http_token_budget_module_ctx = {
    NULL,                                  /* preconfiguration */
    NULL,                                  /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_token_budget_module = {
    NGX_MODULE_V1,
    &ngx_http_token_budget_module_ctx,     /* module context */
    NULL,                                  /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};
