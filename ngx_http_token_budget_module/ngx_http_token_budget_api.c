
/*
 * Copyright (C) The token budget authors
 *
 * token_budget_api: the state of the budgets, over HTTP.
 *
 *   GET    <location>/zones                     every zone, its top keys
 *   GET    <location>/metrics                   Prometheus text format
 *   GET    <location>/zones/NAME/keys/KEY       one key's budget
 *   DELETE <location>/zones/NAME/keys/KEY       resets what the key spent
 *   POST   <location>/zones/NAME/keys/KEY?tokens=N
 *                                               tops the key up by N
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_API_TOP  10


static ngx_int_t ngx_http_tb_api_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_tb_api_zones(ngx_http_request_t *r,
    ngx_http_tb_main_conf_t *tmcf, ngx_chain_t **out);
static ngx_int_t ngx_http_tb_api_key(ngx_http_request_t *r,
    ngx_http_tb_main_conf_t *tmcf, ngx_str_t *path, ngx_chain_t **out);
static ngx_int_t ngx_http_tb_api_metrics(ngx_http_request_t *r,
    ngx_http_tb_main_conf_t *tmcf, ngx_chain_t **out);
static ngx_int_t ngx_http_tb_api_send(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, ngx_chain_t *out);
static ngx_int_t ngx_http_tb_api_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *message);
static ngx_buf_t *ngx_http_tb_api_buf(ngx_http_request_t *r,
    ngx_chain_t ***last, size_t size);
static ngx_str_t *ngx_http_tb_api_zone_name(ngx_http_tb_zone_t *zone);


char *
ngx_http_tb_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_tb_api_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_tb_api_handler(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_str_t                  path;
    ngx_chain_t               *out;
    ngx_http_core_loc_conf_t  *clcf;
    ngx_http_tb_main_conf_t   *tmcf;

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_budget_module);
    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    path = r->uri;

    if (!clcf->exact_match && !clcf->regex && path.len >= clcf->name.len) {
        path.data += clcf->name.len;
        path.len -= clcf->name.len;
    }

    while (path.len && path.data[0] == '/') {
        path.data++;
        path.len--;
    }

    out = NULL;

    if (path.len == 5 && ngx_strncmp(path.data, "zones", 5) == 0) {
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
            return ngx_http_tb_api_error(r, NGX_HTTP_NOT_ALLOWED,
                                         "method not allowed");
        }

        rc = ngx_http_tb_api_zones(r, tmcf, &out);
        if (rc != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_tb_api_send(r, NGX_HTTP_OK, "application/json", out);
    }

    if (path.len == 7 && ngx_strncmp(path.data, "metrics", 7) == 0) {
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
            return ngx_http_tb_api_error(r, NGX_HTTP_NOT_ALLOWED,
                                         "method not allowed");
        }

        rc = ngx_http_tb_api_metrics(r, tmcf, &out);
        if (rc != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_tb_api_send(r, NGX_HTTP_OK,
                                    "text/plain; version=0.0.4", out);
    }

    if (path.len > 6 && ngx_strncmp(path.data, "zones/", 6) == 0) {
        path.data += 6;
        path.len -= 6;

        return ngx_http_tb_api_key(r, tmcf, &path, &out);
    }

    return ngx_http_tb_api_error(r, NGX_HTTP_NOT_FOUND, "not found");
}


static ngx_int_t
ngx_http_tb_api_zones(ngx_http_request_t *r, ngx_http_tb_main_conf_t *tmcf,
    ngx_chain_t **out)
{
    ngx_buf_t            *b;
    ngx_uint_t            i, k, n;
    ngx_chain_t         **last;
    ngx_http_tb_top_t     top[NGX_HTTP_TB_API_TOP];
    ngx_http_tb_zone_t  **zones, *zone;

    last = out;

    b = ngx_http_tb_api_buf(r, &last, 16);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->last, "{\"zones\":[", 10);

    zones = tmcf->zones.elts;

    for (i = 0; i < tmcf->zones.nelts; i++) {
        zone = zones[i];

        n = ngx_http_tb_zone_top(zone, r->pool, top, NGX_HTTP_TB_API_TOP);

        b = ngx_http_tb_api_buf(r, &last, 1024 + 6 * zone->key.value.len);
        if (b == NULL) {
            return NGX_ERROR;
        }

        b->last = ngx_sprintf(b->last,
                              "%s{\"name\":\"%V\",\"key\":\"",
                              i ? "," : "", ngx_http_tb_api_zone_name(zone));
        b->last = (u_char *) ngx_escape_json(b->last, zone->key.value.data,
                                             zone->key.value.len);
        b->last = ngx_sprintf(b->last,
                              "\",\"limit\":%uL,\"per\":\"%V\","
                              "\"per_seconds\":%M,\"count\":\"%s\","
                              "\"keys\":%ui,\"admitted\":%uL,"
                              "\"rejected\":%uL,\"full\":%uL,"
                              "\"spent\":%uL,\"free_pages\":%ui,\"top\":[",
                              zone->limit, &zone->per, zone->period / 1000,
                              zone->count == NGX_HTTP_TB_COUNT_PROMPT
                              ? "prompt"
                              : zone->count == NGX_HTTP_TB_COUNT_COMPLETION
                              ? "completion" : "total",
                              zone->sh->keys, zone->sh->admitted,
                              zone->sh->rejected, zone->sh->full,
                              zone->sh->spent, zone->shpool->pfree);

        if (zone->redis) {
            b->last -= sizeof("\"top\":[") - 1;
            b->last = ngx_sprintf(b->last,
                                  "\"redis\":{\"address\":\"%V\","
                                  "\"mode\":\"%s\",\"fail\":\"%s\","
                                  "\"up\":%s,\"errors\":%uL,"
                                  "\"fail_open\":%uL,\"fail_local\":%uL,"
                                  "\"fail_closed\":%uL,"
                                  "\"pending_tokens\":%L,"
                                  "\"flushed_tokens\":%uL,\"syncs\":%uL},"
                                  "\"top\":[",
                                  &zone->redis->name,
                                  zone->mode == NGX_HTTP_TB_REDIS_STRICT
                                  ? "strict" : "batched",
                                  zone->fail == NGX_HTTP_TB_FAIL_CLOSED
                                  ? "closed"
                                  : zone->fail == NGX_HTTP_TB_FAIL_OPEN
                                  ? "open" : "local",
                                  zone->redis->state == NGX_HTTP_TB_REDIS_UP
                                  ? "true" : "false",
                                  zone->sh->redis_errors
                                  + zone->redis->errors,
                                  zone->sh->fail_open, zone->sh->fail_local,
                                  zone->sh->fail_closed, zone->sh->pending,
                                  zone->sh->flushed, zone->sh->syncs);
        }

        for (k = 0; k < n; k++) {
            b = ngx_http_tb_api_buf(r, &last, 64 + 6 * top[k].key.len);
            if (b == NULL) {
                return NGX_ERROR;
            }

            b->last = ngx_sprintf(b->last, "%s{\"key\":\"", k ? "," : "");
            b->last = (u_char *) ngx_escape_json(b->last, top[k].key.data,
                                                 top[k].key.len);
            b->last = ngx_sprintf(b->last, "\",\"used\":%L}", top[k].used);
        }

        b = ngx_http_tb_api_buf(r, &last, 4);
        if (b == NULL) {
            return NGX_ERROR;
        }

        b->last = ngx_cpymem(b->last, "]}", 2);
    }

    b = ngx_http_tb_api_buf(r, &last, 4);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->last, "]}\n", 3);

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_api_key(ngx_http_request_t *r, ngx_http_tb_main_conf_t *tmcf,
    ngx_str_t *path, ngx_chain_t **out)
{
    u_char                   *p;
    off_t                     credit;
    ngx_int_t                 rc;
    ngx_str_t                 name, key, arg;
    ngx_buf_t                *b;
    ngx_uint_t                i, op;
    ngx_chain_t             **last;
    ngx_http_tb_zone_t      **zones, *zone;
    ngx_http_tb_key_state_t   st;

    p = ngx_strlchr(path->data, path->data + path->len, '/');

    if (p == NULL || path->data + path->len - p < 7
        || ngx_strncmp(p, "/keys/", 6) != 0)
    {
        return ngx_http_tb_api_error(r, NGX_HTTP_NOT_FOUND, "not found");
    }

    name.data = path->data;
    name.len = p - path->data;

    key.data = p + 6;
    key.len = path->data + path->len - key.data;

    zone = NULL;
    zones = tmcf->zones.elts;

    for (i = 0; i < tmcf->zones.nelts; i++) {
        if (ngx_http_tb_api_zone_name(zones[i])->len == name.len
            && ngx_strncmp(ngx_http_tb_api_zone_name(zones[i])->data,
                           name.data, name.len) == 0)
        {
            zone = zones[i];
            break;
        }
    }

    if (zone == NULL) {
        return ngx_http_tb_api_error(r, NGX_HTTP_NOT_FOUND,
                                     "no such zone");
    }

    credit = 0;

    switch (r->method) {

    case NGX_HTTP_GET:
    case NGX_HTTP_HEAD:
        op = NGX_HTTP_TB_KEY_GET;
        break;

    case NGX_HTTP_DELETE:
        op = NGX_HTTP_TB_KEY_RESET;
        break;

    case NGX_HTTP_POST:
        op = NGX_HTTP_TB_KEY_TOPUP;

        if (ngx_http_arg(r, (u_char *) "tokens", 6, &arg) != NGX_OK
            || (credit = ngx_atoof(arg.data, arg.len)) <= 0)
        {
            return ngx_http_tb_api_error(r, NGX_HTTP_BAD_REQUEST,
                                         "a top-up needs ?tokens=N, N > 0");
        }

        break;

    default:
        return ngx_http_tb_api_error(r, NGX_HTTP_NOT_ALLOWED,
                                     "method not allowed");
    }

    rc = ngx_http_tb_zone_key(zone, &key, &st, op, (int64_t) credit);

    if (rc == NGX_DECLINED) {
        return ngx_http_tb_api_error(r, NGX_HTTP_NOT_FOUND,
                                     "no such key in the zone");
    }

    if (rc != NGX_OK) {
        return ngx_http_tb_api_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                     "the zone has no room for the key");
    }

    last = out;

    b = ngx_http_tb_api_buf(r, &last, 256 + 6 * key.len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_sprintf(b->last, "{\"zone\":\"%V\",\"key\":\"", &name);
    b->last = (u_char *) ngx_escape_json(b->last, key.data, key.len);
    b->last = ngx_sprintf(b->last,
                          "\",\"limit\":%uL,\"per\":\"%V\",\"used\":%L,"
                          "\"reserved\":%uL,\"in_flight\":%ui,"
                          "\"remaining\":%L}\n",
                          zone->limit, &zone->per, st.used, st.reserved,
                          st.inflight, st.remaining);

    return ngx_http_tb_api_send(r, NGX_HTTP_OK, "application/json", *out);
}


static ngx_int_t
ngx_http_tb_api_metrics(ngx_http_request_t *r, ngx_http_tb_main_conf_t *tmcf,
    ngx_chain_t **out)
{
    ngx_buf_t              *b;
    ngx_str_t              *name;
    ngx_uint_t              i, k, n;
    ngx_atomic_uint_t       cum;
    ngx_chain_t           **last;
    ngx_http_tb_zone_t    **zones, *zone;
    ngx_http_tb_model_t    *models;
    ngx_http_tb_metrics_t  *m;

    static const char  *decisions[] = {
        "", "passed", "rejected", "rejected_dry_run", "error"
    };

    static const char  *counters[] = {
        "requests_total", "prompt_tokens_total", "reserved_tokens_total",
        "completion_tokens_total", "rejected_total"
    };

    static const struct {
        const char  *name;
        const char  *help;
        const char  *type;
        const char  *label;
    } zmetrics[] = {
        { "keys", "Keys in the zone.", "gauge", "" },
        { "free_pages", "Free pages of the zone's memory.", "gauge", "" },
        { "requests_total", "Requests by the zone's decision.", "counter",
          ",decision=\"admitted\"" },
        { "requests_total", "", "", ",decision=\"rejected\"" },
        { "requests_total", "", "", ",decision=\"full\"" },
        { "spent_tokens_total", "Tokens spent against the zone.", "counter",
          "" }
    };

    static const char  *rmetrics[] = {
        "# HELP token_budget_zone_redis_up Whether this worker's "
        "connection to the zone's Redis answers.\n"
        "# TYPE token_budget_zone_redis_up gauge\n",
        "# HELP token_budget_zone_redis_errors_total Redis commands "
        "failed or timed out, and connections lost.\n"
        "# TYPE token_budget_zone_redis_errors_total counter\n",
        "# HELP token_budget_zone_degraded_total Decisions made without "
        "Redis, by the zone's fail mode.\n"
        "# TYPE token_budget_zone_degraded_total counter\n",
        "# HELP token_budget_zone_pending_tokens Tokens spent that Redis "
        "has not been told yet.\n"
        "# TYPE token_budget_zone_pending_tokens gauge\n",
        "# HELP token_budget_zone_flushed_tokens_total Tokens told to "
        "Redis as deltas.\n"
        "# TYPE token_budget_zone_flushed_tokens_total counter\n"
    };

    static const ngx_int_t  bounds[NGX_HTTP_TB_DRIFT_BUCKETS] = {
        -100, -10, -3, -1, 0, 1, 3, 10, 100
    };

    last = out;
    m = tmcf->metrics;

    b = ngx_http_tb_api_buf(r, &last, 4096);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->last,
        "# HELP token_budget_requests_total Requests counted, by decision.\n"
        "# TYPE token_budget_requests_total counter\n",
        sizeof("# HELP token_budget_requests_total Requests counted, by "
               "decision.\n# TYPE token_budget_requests_total counter\n")
        - 1);

    for (i = 1; i < 5; i++) {
        b->last = ngx_sprintf(b->last,
                              "token_budget_requests_total{decision=\"%s\"} "
                              "%uA\n", decisions[i],
                              m ? m->decisions[i] : 0);
    }

    b->last = ngx_sprintf(b->last,
        "# HELP token_budget_prompt_drift_tokens Our prompt count less the "
        "prompt_tokens the provider reported.\n"
        "# TYPE token_budget_prompt_drift_tokens histogram\n");

    cum = 0;

    for (i = 0; i < NGX_HTTP_TB_DRIFT_BUCKETS; i++) {
        cum += m ? m->drift[i] : 0;
        b->last = ngx_sprintf(b->last,
                              "token_budget_prompt_drift_tokens_bucket"
                              "{le=\"%i\"} %uA\n", bounds[i], cum);
    }

    cum += m ? m->drift[NGX_HTTP_TB_DRIFT_BUCKETS] : 0;

    b->last = ngx_sprintf(b->last,
                          "token_budget_prompt_drift_tokens_bucket"
                          "{le=\"+Inf\"} %uA\n"
                          "token_budget_prompt_drift_tokens_sum %L\n"
                          "token_budget_prompt_drift_tokens_count %uA\n"
                          "# HELP token_budget_prompt_drift_abs_tokens_total "
                          "The sum of the drifts' absolute values.\n"
                          "# TYPE token_budget_prompt_drift_abs_tokens_total "
                          "counter\n"
                          "token_budget_prompt_drift_abs_tokens_total %uA\n",
                          cum, m ? (int64_t) m->drift_sum : 0,
                          m ? m->drift_count : 0,
                          m ? m->drift_sum_abs : 0);

    models = tmcf->models.elts;

    for (k = 0; k < 5; k++) {
        b = ngx_http_tb_api_buf(r, &last,
                                128 + tmcf->models.nelts * 160);
        if (b == NULL) {
            return NGX_ERROR;
        }

        b->last = ngx_sprintf(b->last,
                              "# HELP token_budget_model_%s Requests and "
                              "tokens by model pattern.\n"
                              "# TYPE token_budget_model_%s counter\n",
                              counters[k], counters[k]);

        for (i = 0; i < tmcf->models.nelts; i++) {
            b->last = ngx_sprintf(b->last,
                                  "token_budget_model_%s{model=\"%V%s\"} "
                                  "%uA\n", counters[k],
                                  &models[i].pattern,
                                  models[i].prefix ? "*" : "",
                                  m ? m->model[i][k] : 0);
        }
    }

    /* each metric's samples together, after its HELP and TYPE */

    zones = tmcf->zones.elts;

    for (k = 0; k < 6; k++) {
        b = ngx_http_tb_api_buf(r, &last, 256 + tmcf->zones.nelts * 160);
        if (b == NULL) {
            return NGX_ERROR;
        }

        if (zmetrics[k].type[0]) {
            b->last = ngx_sprintf(b->last,
                                  "# HELP token_budget_zone_%s %s\n"
                                  "# TYPE token_budget_zone_%s %s\n",
                                  zmetrics[k].name, zmetrics[k].help,
                                  zmetrics[k].name, zmetrics[k].type);
        }

        for (i = 0; i < tmcf->zones.nelts; i++) {
            zone = zones[i];
            name = ngx_http_tb_api_zone_name(zone);

            b->last = ngx_sprintf(b->last,
                                  "token_budget_zone_%s{zone=\"%V\"%s} ",
                                  zmetrics[k].name, name, zmetrics[k].label);

            switch (k) {
            case 0:
                b->last = ngx_sprintf(b->last, "%ui\n", zone->sh->keys);
                break;
            case 1:
                b->last = ngx_sprintf(b->last, "%ui\n", zone->shpool->pfree);
                break;
            case 2:
                b->last = ngx_sprintf(b->last, "%uL\n", zone->sh->admitted);
                break;
            case 3:
                b->last = ngx_sprintf(b->last, "%uL\n", zone->sh->rejected);
                break;
            case 4:
                b->last = ngx_sprintf(b->last, "%uL\n", zone->sh->full);
                break;
            default:
                b->last = ngx_sprintf(b->last, "%uL\n", zone->sh->spent);
                break;
            }
        }
    }

    /* zones shared through Redis */

    for (i = 0; i < tmcf->zones.nelts; i++) {
        if (zones[i]->redis) {
            break;
        }
    }

    if (i == tmcf->zones.nelts) {
        return NGX_OK;
    }

    b = ngx_http_tb_api_buf(r, &last, 1024 + tmcf->zones.nelts * 640);
    if (b == NULL) {
        return NGX_ERROR;
    }

    for (k = 0; k < 5; k++) {
        n = 0;

        for (i = 0; i < tmcf->zones.nelts; i++) {
            zone = zones[i];

            if (zone->redis == NULL) {
                continue;
            }

            if (n++ == 0) {
                b->last = ngx_sprintf(b->last, "%s", rmetrics[k]);
            }

            name = ngx_http_tb_api_zone_name(zone);

            switch (k) {
            case 0:
                b->last = ngx_sprintf(b->last,
                              "token_budget_zone_redis_up{zone=\"%V\"} %d\n",
                              name,
                              zone->redis->state == NGX_HTTP_TB_REDIS_UP);
                break;
            case 1:
                b->last = ngx_sprintf(b->last,
                              "token_budget_zone_redis_errors_total"
                              "{zone=\"%V\"} %uL\n", name,
                              zone->sh->redis_errors + zone->redis->errors);
                break;
            case 2:
                b->last = ngx_sprintf(b->last,
                              "token_budget_zone_degraded_total"
                              "{zone=\"%V\",fail=\"open\"} %uL\n"
                              "token_budget_zone_degraded_total"
                              "{zone=\"%V\",fail=\"local\"} %uL\n"
                              "token_budget_zone_degraded_total"
                              "{zone=\"%V\",fail=\"closed\"} %uL\n",
                              name, zone->sh->fail_open,
                              name, zone->sh->fail_local,
                              name, zone->sh->fail_closed);
                break;
            case 3:
                b->last = ngx_sprintf(b->last,
                              "token_budget_zone_pending_tokens"
                              "{zone=\"%V\"} %L\n", name, zone->sh->pending);
                break;
            default:
                b->last = ngx_sprintf(b->last,
                              "token_budget_zone_flushed_tokens_total"
                              "{zone=\"%V\"} %uL\n", name,
                              zone->sh->flushed);
                break;
            }
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_api_send(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, ngx_chain_t *out)
{
    off_t         len;
    ngx_int_t     rc;
    ngx_chain_t  *cl;

    len = 0;

    for (cl = out; cl; cl = cl->next) {
        len += cl->buf->last - cl->buf->pos;

        if (cl->next == NULL) {
            cl->buf->last_buf = 1;
            cl->buf->last_in_chain = 1;
        }
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type.data = (u_char *) type;
    r->headers_out.content_type.len = ngx_strlen(type);
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, out);
}


static ngx_int_t
ngx_http_tb_api_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *message)
{
    ngx_buf_t     *b;
    ngx_chain_t   *out, **last;

    out = NULL;
    last = &out;

    b = ngx_http_tb_api_buf(r, &last, 64 + ngx_strlen(message));
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_sprintf(b->last, "{\"error\":{\"message\":\"%s\"}}\n",
                          message);

    return ngx_http_tb_api_send(r, status, "application/json", out);
}


static ngx_buf_t *
ngx_http_tb_api_buf(ngx_http_request_t *r, ngx_chain_t ***last, size_t size)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NULL;
    }

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NULL;
    }

    cl->buf = b;
    cl->next = NULL;

    **last = cl;
    *last = &cl->next;

    return b;
}


static ngx_str_t *
ngx_http_tb_api_zone_name(ngx_http_tb_zone_t *zone)
{
    return &zone->shm_zone->shm.name;
}
