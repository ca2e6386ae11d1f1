
/*
 * Copyright (C) The token budget authors
 *
 * A Redis connection per worker, owned by nginx's event loop.
 *
 * Commands are encoded in RESP and written together when the event loop
 * comes round (pipelining); replies come back in the order the commands
 * went, and each is handed to its command's handler.  Nothing blocks:
 * the address is resolved when the configuration is read, connect and
 * replies have nginx timers.  A command not answered within the timeout,
 * a refused connection or a protocol error closes the connection, fails
 * every command still waiting, and opens the circuit: new commands are
 * refused at once until a new connection has answered PING; reconnection
 * waits with a backoff doubling from 50ms up to 2s.
 *
 * Scripts go by EVALSHA; a NOSCRIPT reply (Redis restarted or failed
 * over) sends the same command again as EVAL, which also loads the
 * script, and the handler sees only the second reply.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_sha1.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_REDIS_BUF          (64 * 1024)
#define NGX_HTTP_TB_REDIS_MAX_BUF      (4 * 1024 * 1024)
#define NGX_HTTP_TB_REDIS_BACKOFF_MIN  50
#define NGX_HTTP_TB_REDIS_BACKOFF_MAX  2000


static void ngx_http_tb_redis_connect(ngx_http_tb_redis_t *rd);
static void ngx_http_tb_redis_timer_handler(ngx_event_t *ev);
static void ngx_http_tb_redis_write_handler(ngx_event_t *wev);
static void ngx_http_tb_redis_read_handler(ngx_event_t *rev);
#if (NGX_SSL)
static void ngx_http_tb_redis_tls_start(ngx_event_t *wev);
static void ngx_http_tb_redis_tls_done(ngx_connection_t *c);
#endif
static void ngx_http_tb_redis_fail(ngx_http_tb_redis_t *rd,
    const char *reason);
static void ngx_http_tb_redis_arm(ngx_http_tb_redis_t *rd);
static ngx_int_t ngx_http_tb_redis_append(ngx_http_tb_redis_t *rd,
    ngx_http_tb_redis_cmd_t *cmd);
static ngx_int_t ngx_http_tb_redis_reserve_out(ngx_http_tb_redis_t *rd,
    size_t len);
static ngx_int_t ngx_http_tb_redis_parse(ngx_http_tb_redis_t *rd,
    ngx_http_tb_redis_reply_t *reply);
static u_char *ngx_http_tb_redis_value(u_char *p, u_char *last,
    ngx_http_tb_redis_reply_t *reply, ngx_uint_t depth, ngx_uint_t *error);
static void ngx_http_tb_redis_dispatch(ngx_http_tb_redis_t *rd,
    ngx_http_tb_redis_reply_t *reply);
static void ngx_http_tb_redis_handshake_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply);
static ngx_int_t ngx_http_tb_redis_internal(ngx_http_tb_redis_t *rd,
    ngx_str_t *args, ngx_uint_t n);


/* the configuration: one connection per worker per distinct server */

ngx_http_tb_redis_t *
ngx_http_tb_redis_add(ngx_conf_t *cf, ngx_array_t *servers,
    ngx_http_tb_redis_conf_t *rc)
{
    ngx_url_t             u;
    ngx_uint_t            i;
    ngx_http_tb_redis_t  *rd, **rdp;
#if (NGX_SSL)
    ngx_str_t             ca, name;
    ngx_pool_cleanup_t   *cln;
#endif

    rdp = servers->elts;

    for (i = 0; i < servers->nelts; i++) {
        rd = rdp[i];

        if (rd->name.len == rc->addr.len
            && ngx_strncmp(rd->name.data, rc->addr.data, rc->addr.len) == 0
            && rd->password.len == rc->password.len
            && ngx_strncmp(rd->password.data, rc->password.data,
                           rc->password.len) == 0
            && rd->db == rc->db
            && rd->tls == rc->tls
            && rd->tls_ca.len == rc->tls_ca.len
            && ngx_strncmp(rd->tls_ca.data, rc->tls_ca.data, rc->tls_ca.len)
               == 0
            && rd->tls_name_conf.len == rc->tls_name.len
            && ngx_strncmp(rd->tls_name_conf.data, rc->tls_name.data,
                           rc->tls_name.len) == 0)
        {
            return rd;
        }
    }

    ngx_memzero(&u, sizeof(ngx_url_t));

    u.url = rc->addr;
    u.default_port = 6379;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
        if (u.err) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s in redis address \"%V\"", u.err,
                               &rc->addr);
        }

        return NULL;
    }

    if (u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no addresses for redis \"%V\"", &rc->addr);
        return NULL;
    }

    rd = ngx_pcalloc(cf->pool, sizeof(ngx_http_tb_redis_t));
    if (rd == NULL) {
        return NULL;
    }

    rd->name = rc->addr;
    rd->addr = u.addrs[0];
    rd->password = rc->password;
    rd->db = rc->db;
    rd->tls = rc->tls;
    rd->tls_ca = rc->tls_ca;
    rd->tls_name_conf = rc->tls_name;
    rd->timeout = NGX_CONF_UNSET_MSEC;

    if (rc->tls) {
#if (NGX_SSL)
        rd->ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
        if (rd->ssl == NULL) {
            return NULL;
        }

        rd->ssl->log = cf->log;

        if (ngx_ssl_create(rd->ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL)
            != NGX_OK)
        {
            return NULL;
        }

        cln = ngx_pool_cleanup_add(cf->pool, 0);
        if (cln == NULL) {
            ngx_ssl_cleanup_ctx(rd->ssl);
            return NULL;
        }

        cln->handler = ngx_ssl_cleanup_ctx;
        cln->data = rd->ssl;

        if (rc->tls_ca.len) {
            ca = rc->tls_ca;

            if (ngx_ssl_trusted_certificate(cf, rd->ssl, &ca, 4) != NGX_OK) {
                return NULL;
            }

            rd->verify = 1;
        }

        name = rc->tls_name.len ? rc->tls_name : u.host;

        rd->tls_name.len = name.len;
        rd->tls_name.data = ngx_pnalloc(cf->pool, name.len + 1);
        if (rd->tls_name.data == NULL) {
            return NULL;
        }

        (void) ngx_cpystrn(rd->tls_name.data, name.data, name.len + 1);
#else
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "redis_tls needs nginx built with OpenSSL");
        return NULL;
#endif
    }

    rdp = ngx_array_push(servers);
    if (rdp == NULL) {
        return NULL;
    }

    *rdp = rd;

    return rd;
}


/* a script's SHA1, for EVALSHA */

void
ngx_http_tb_redis_script(ngx_http_tb_redis_script_t *s, const char *text)
{
    u_char         digest[20];
    ngx_sha1_t     sha1;

    s->text.data = (u_char *) text;
    s->text.len = ngx_strlen(text);

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, s->text.data, s->text.len);
    ngx_sha1_final(digest, &sha1);

    ngx_hex_dump(s->sha, digest, 20);
}


ngx_int_t
ngx_http_tb_redis_init_process(ngx_http_tb_redis_t *rd, ngx_cycle_t *cycle)
{
    rd->log = cycle->log;

    ngx_queue_init(&rd->sent);
    ngx_queue_init(&rd->retry);
    ngx_queue_init(&rd->free);

    rd->out = ngx_calloc_buf(cycle->pool);
    rd->in = ngx_calloc_buf(cycle->pool);

    if (rd->out == NULL || rd->in == NULL) {
        return NGX_ERROR;
    }

    rd->out->start = ngx_alloc(NGX_HTTP_TB_REDIS_BUF, cycle->log);
    rd->in->start = ngx_alloc(NGX_HTTP_TB_REDIS_BUF, cycle->log);

    if (rd->out->start == NULL || rd->in->start == NULL) {
        return NGX_ERROR;
    }

    rd->out->pos = rd->out->start;
    rd->out->last = rd->out->start;
    rd->out->end = rd->out->start + NGX_HTTP_TB_REDIS_BUF;

    rd->in->pos = rd->in->start;
    rd->in->last = rd->in->start;
    rd->in->end = rd->in->start + NGX_HTTP_TB_REDIS_BUF;

    rd->timer.handler = ngx_http_tb_redis_timer_handler;
    rd->timer.data = rd;
    rd->timer.log = cycle->log;
    rd->timer.cancelable = 1;

    rd->backoff = NGX_HTTP_TB_REDIS_BACKOFF_MIN;
    rd->state = NGX_HTTP_TB_REDIS_DOWN;

    /* the time is the master's until the event loop runs */
    ngx_time_update();

    ngx_http_tb_redis_connect(rd);

    return NGX_OK;
}


void
ngx_http_tb_redis_exit_process(ngx_http_tb_redis_t *rd)
{
    ngx_queue_t              *q;
    ngx_http_tb_redis_cmd_t  *cmd;

    if (rd->log == NULL) {
        return;
    }

    ngx_http_tb_redis_fail(rd, NULL);

    /* settles never sent are handed to their owner to keep elsewhere */

    while (!ngx_queue_empty(&rd->retry)) {
        q = ngx_queue_head(&rd->retry);
        ngx_queue_remove(q);

        cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

        if (cmd->abandon) {
            cmd->abandon(cmd);
        }

        ngx_free(cmd);
    }

    while (!ngx_queue_empty(&rd->free)) {
        q = ngx_queue_head(&rd->free);
        ngx_queue_remove(q);
        ngx_free(ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue));
    }

    if (rd->timer.timer_set) {
        ngx_del_timer(&rd->timer);
    }

    ngx_free(rd->out->start);
    ngx_free(rd->in->start);

    rd->log = NULL;
}


/* is it worth sending: connected, or connecting for the first time */

ngx_uint_t
ngx_http_tb_redis_usable(ngx_http_tb_redis_t *rd)
{
    return rd->log
           && (rd->state == NGX_HTTP_TB_REDIS_UP
               || (rd->state == NGX_HTTP_TB_REDIS_CONNECTING
                   && rd->failures == 0));
}


/*
 * a command with room for "len" bytes of arguments and "extra" bytes of
 * the caller's; it is sent by ngx_http_tb_redis_send()
 */

ngx_http_tb_redis_cmd_t *
ngx_http_tb_redis_cmd(ngx_http_tb_redis_t *rd, size_t len, size_t extra)
{
    size_t                    size;
    ngx_queue_t              *q;
    ngx_http_tb_redis_cmd_t  *cmd;

    size = sizeof(ngx_http_tb_redis_cmd_t) + len + extra;

    cmd = NULL;

    if (size <= NGX_HTTP_TB_REDIS_CMD_SIZE && !ngx_queue_empty(&rd->free)) {
        q = ngx_queue_head(&rd->free);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);
        rd->nfree--;
    }

    if (cmd == NULL) {
        cmd = ngx_alloc(ngx_max(size, NGX_HTTP_TB_REDIS_CMD_SIZE), rd->log);
        if (cmd == NULL) {
            return NULL;
        }
    }

    ngx_memzero(cmd, sizeof(ngx_http_tb_redis_cmd_t));

    cmd->size = ngx_max(size, NGX_HTTP_TB_REDIS_CMD_SIZE);
    cmd->args = (u_char *) cmd + sizeof(ngx_http_tb_redis_cmd_t);
    cmd->extra = cmd->args + len;
    cmd->redis = rd;

    return cmd;
}


void
ngx_http_tb_redis_free(ngx_http_tb_redis_cmd_t *cmd)
{
    ngx_http_tb_redis_t  *rd;

    rd = cmd->redis;

    if (cmd->size == NGX_HTTP_TB_REDIS_CMD_SIZE && rd->nfree < 1024) {
        ngx_queue_insert_head(&rd->free, &cmd->queue);
        rd->nfree++;
        return;
    }

    ngx_free(cmd);
}


/* a RESP bulk string */

u_char *
ngx_http_tb_redis_arg(u_char *p, u_char *data, size_t len)
{
    p = ngx_sprintf(p, "$%uz\r\n", len);
    p = ngx_cpymem(p, data, len);
    *p++ = CR; *p++ = LF;

    return p;
}


u_char *
ngx_http_tb_redis_int(u_char *p, int64_t n)
{
    u_char  buf[NGX_INT64_LEN + 1];

    return ngx_http_tb_redis_arg(p, buf, ngx_sprintf(buf, "%L", n) - buf);
}


/*
 * queues a command: cmd->args holds "nargs" encoded arguments, after the
 * script's (EVALSHA sha) when cmd->script is set; NGX_DECLINED when the
 * circuit is open, and the command is not queued
 */

ngx_int_t
ngx_http_tb_redis_send(ngx_http_tb_redis_cmd_t *cmd)
{
    ngx_http_tb_redis_t  *rd;

    rd = cmd->redis;

    if (!ngx_http_tb_redis_usable(rd)) {
        return NGX_DECLINED;
    }

    cmd->deadline = ngx_current_msec + rd->timeout;

    if (ngx_http_tb_redis_append(rd, cmd) != NGX_OK) {
        return NGX_DECLINED;
    }

    cmd->answered = 0;
    cmd->kept = 0;

    if (rd->state == NGX_HTTP_TB_REDIS_UP) {
        ngx_http_tb_redis_arm(rd);

        if (!rd->c->write->posted) {
            ngx_post_event(rd->c->write, &ngx_posted_events);
        }
    }

    return NGX_OK;
}


/*
 * keeps a command to send again once Redis answers; past a bound, a
 * command its owner can keep elsewhere is handed back (NGX_DECLINED, and
 * the caller frees it)
 */

#define NGX_HTTP_TB_REDIS_MAX_RETRY    10000


ngx_int_t
ngx_http_tb_redis_park(ngx_http_tb_redis_cmd_t *cmd)
{
    ngx_http_tb_redis_t  *rd;

    rd = cmd->redis;

    if (rd->nretry >= NGX_HTTP_TB_REDIS_MAX_RETRY && cmd->abandon) {
        cmd->abandon(cmd);
        cmd->kept = 0;
        return NGX_DECLINED;
    }

    cmd->answered = 0;
    cmd->eval = 0;
    cmd->kept = 1;

    ngx_queue_insert_tail(&rd->retry, &cmd->queue);
    rd->nretry++;

    return NGX_OK;
}


/* a command into the output buffer, and to the commands awaiting replies */

static ngx_int_t
ngx_http_tb_redis_append(ngx_http_tb_redis_t *rd, ngx_http_tb_redis_cmd_t *cmd)
{
    size_t                       len;
    u_char                      *p;
    ngx_http_tb_redis_script_t  *s;

    s = cmd->script;

    len = cmd->len + sizeof("*18446744073709551615\r\n") - 1;

    if (s) {
        len += sizeof("$7\r\nEVALSHA\r\n$18446744073709551615\r\n\r\n") - 1
               + (cmd->eval ? s->text.len : 40);
    }

    if (ngx_http_tb_redis_reserve_out(rd, len) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "token budget: redis \"%V\" output buffer is full",
                      &rd->name);
        return NGX_ERROR;
    }

    p = rd->out->last;

    if (s) {
        p = ngx_sprintf(p, "*%ui\r\n", cmd->nargs + 2);

        if (cmd->eval) {
            p = ngx_http_tb_redis_arg(p, (u_char *) "EVAL", 4);
            p = ngx_http_tb_redis_arg(p, s->text.data, s->text.len);

        } else {
            p = ngx_http_tb_redis_arg(p, (u_char *) "EVALSHA", 7);
            p = ngx_http_tb_redis_arg(p, s->sha, 40);
        }

    } else {
        p = ngx_sprintf(p, "*%ui\r\n", cmd->nargs);
    }

    rd->out->last = ngx_cpymem(p, cmd->args, cmd->len);

    /* its reply comes in its turn */

    ngx_queue_insert_tail(&rd->sent, &cmd->queue);

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_redis_reserve_out(ngx_http_tb_redis_t *rd, size_t len)
{
    size_t      size, used;
    ngx_buf_t  *b;
    u_char     *p;

    b = rd->out;

    if ((size_t) (b->end - b->last) >= len) {
        return NGX_OK;
    }

    used = b->last - b->pos;

    if (b->pos != b->start) {
        ngx_memmove(b->start, b->pos, used);
        b->pos = b->start;
        b->last = b->start + used;

        if ((size_t) (b->end - b->last) >= len) {
            return NGX_OK;
        }
    }

    size = b->end - b->start;

    while (size - used < len) {
        size *= 2;
    }

    if (size > NGX_HTTP_TB_REDIS_MAX_BUF) {
        return NGX_ERROR;
    }

    p = ngx_alloc(size, rd->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, b->pos, used);
    ngx_free(b->start);

    b->start = p;
    b->pos = p;
    b->last = p + used;
    b->end = p + size;

    return NGX_OK;
}


static void
ngx_http_tb_redis_connect(ngx_http_tb_redis_t *rd)
{
    ngx_int_t          rc;
    ngx_str_t          args[3];
    ngx_connection_t  *c;

    ngx_memzero(&rd->peer, sizeof(ngx_peer_connection_t));

    rd->peer.sockaddr = rd->addr.sockaddr;
    rd->peer.socklen = rd->addr.socklen;
    rd->peer.name = &rd->name;
    rd->peer.get = ngx_event_get_peer;
    rd->peer.log = rd->log;
    rd->peer.log_error = NGX_ERROR_ERR;

    rd->state = NGX_HTTP_TB_REDIS_CONNECTING;
    rd->out->pos = rd->out->start;
    rd->out->last = rd->out->start;
    rd->in->pos = rd->in->start;
    rd->in->last = rd->in->start;

    rc = ngx_event_connect_peer(&rd->peer);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        if (rd->peer.connection) {
            ngx_close_connection(rd->peer.connection);
            rd->peer.connection = NULL;
        }

        rd->c = NULL;
        ngx_http_tb_redis_fail(rd, "cannot connect");
        return;
    }

    c = rd->peer.connection;
    rd->c = c;

    c->data = rd;
    c->read->handler = ngx_http_tb_redis_read_handler;
    c->write->handler = ngx_http_tb_redis_write_handler;

#if (NGX_SSL)
    if (rd->ssl) {
        /* TLS first, once connected; the commands wait in the buffer */
        c->write->handler = ngx_http_tb_redis_tls_start;
    }
#endif

    c->log = rd->log;
    c->read->log = rd->log;
    c->write->log = rd->log;

    /* for TLS, whose state comes from the connection's pool */

    c->pool = ngx_create_pool(1024, rd->log);
    if (c->pool == NULL) {
        ngx_http_tb_redis_fail(rd, "cannot connect");
        return;
    }

    /* the handshake: AUTH, SELECT, then PING; ready when PING answers */

    rd->handshake = 0;

    if (rd->password.len) {
        ngx_str_set(&args[0], "AUTH");
        args[1] = rd->password;

        if (ngx_http_tb_redis_internal(rd, args, 2) != NGX_OK) {
            ngx_http_tb_redis_fail(rd, "cannot send");
            return;
        }
    }

    if (rd->db) {
        ngx_str_set(&args[0], "SELECT");
        args[1].data = rd->db_text;
        args[1].len = ngx_sprintf(rd->db_text, "%i", rd->db) - rd->db_text;

        if (ngx_http_tb_redis_internal(rd, args, 2) != NGX_OK) {
            ngx_http_tb_redis_fail(rd, "cannot send");
            return;
        }
    }

    ngx_str_set(&args[0], "PING");

    if (ngx_http_tb_redis_internal(rd, args, 1) != NGX_OK) {
        ngx_http_tb_redis_fail(rd, "cannot send");
        return;
    }

    rd->connect_deadline = ngx_current_msec + rd->timeout;
    ngx_http_tb_redis_arm(rd);

    if (rc == NGX_OK) {
        c->write->handler(c->write);
    }
}


#if (NGX_SSL)

static void
ngx_http_tb_redis_tls_start(ngx_event_t *wev)
{
    ngx_int_t             rc;
    ngx_connection_t     *c;
    ngx_http_tb_redis_t  *rd;

    c = wev->data;
    rd = c->data;

    if (ngx_ssl_create_connection(rd->ssl, c,
                                  NGX_SSL_BUFFER|NGX_SSL_CLIENT)
        != NGX_OK)
    {
        ngx_http_tb_redis_fail(rd, "cannot start TLS");
        return;
    }

#ifdef SSL_CTRL_SET_TLSEXT_HOSTNAME
    if (SSL_set_tlsext_host_name(c->ssl->connection,
                                 (char *) rd->tls_name.data)
        == 0)
    {
        ngx_http_tb_redis_fail(rd, "cannot set the TLS server name");
        return;
    }
#endif

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        c->ssl->handler = ngx_http_tb_redis_tls_done;
        return;
    }

    ngx_http_tb_redis_tls_done(c);
}


static void
ngx_http_tb_redis_tls_done(ngx_connection_t *c)
{
    long                  rc;
    ngx_http_tb_redis_t  *rd;

    rd = c->data;

    if (!c->ssl->handshaked) {
        ngx_http_tb_redis_fail(rd, "failed the TLS handshake");
        return;
    }

    if (rd->verify) {
        rc = SSL_get_verify_result(c->ssl->connection);

        if (rc != X509_V_OK) {
            ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                          "token budget: redis \"%V\" certificate "
                          "verify error: (%l:%s)", &rd->name, rc,
                          X509_verify_cert_error_string(rc));
            ngx_http_tb_redis_fail(rd, "has a certificate not trusted");
            return;
        }

        if (ngx_ssl_check_host(c, &rd->tls_name) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                          "token budget: redis \"%V\" certificate does "
                          "not match \"%V\"", &rd->name, &rd->tls_name);
            ngx_http_tb_redis_fail(rd, "has a certificate not trusted");
            return;
        }
    }

    c->read->handler = ngx_http_tb_redis_read_handler;
    c->write->handler = ngx_http_tb_redis_write_handler;

    ngx_http_tb_redis_write_handler(c->write);
}

#endif


/* a command of the connection's own, sent before any other */

static ngx_int_t
ngx_http_tb_redis_internal(ngx_http_tb_redis_t *rd, ngx_str_t *args,
    ngx_uint_t n)
{
    size_t                    len;
    u_char                   *p;
    ngx_uint_t                i;
    ngx_http_tb_redis_cmd_t  *cmd;

    len = 0;

    for (i = 0; i < n; i++) {
        len += args[i].len + sizeof("$18446744073709551615\r\n\r\n") - 1;
    }

    cmd = ngx_http_tb_redis_cmd(rd, len, 0);
    if (cmd == NULL) {
        return NGX_ERROR;
    }

    p = cmd->args;

    for (i = 0; i < n; i++) {
        p = ngx_http_tb_redis_arg(p, args[i].data, args[i].len);
    }

    cmd->len = p - cmd->args;
    cmd->nargs = n;
    cmd->handler = ngx_http_tb_redis_handshake_handler;
    cmd->data = rd;

    cmd->deadline = ngx_current_msec + rd->timeout;

    if (ngx_http_tb_redis_append(rd, cmd) != NGX_OK) {
        ngx_http_tb_redis_free(cmd);
        return NGX_ERROR;
    }

    rd->handshake++;

    return NGX_OK;
}


static void
ngx_http_tb_redis_handshake_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_queue_t              *q;
    ngx_http_tb_redis_t      *rd;
    ngx_http_tb_redis_cmd_t  *retry;

    rd = cmd->data;

    if (reply->type == NGX_HTTP_TB_REDIS_FAILED) {
        return;
    }

    if (reply->type == NGX_HTTP_TB_REDIS_ERROR) {
        ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                      "token budget: redis \"%V\" refused the handshake: %V",
                      &rd->name, &reply->str);
        ngx_http_tb_redis_fail(rd, "refused the handshake");
        return;
    }

    if (--rd->handshake) {
        return;
    }

    if (rd->failures) {
        ngx_log_error(NGX_LOG_NOTICE, rd->log, 0,
                      "token budget: redis \"%V\" is back", &rd->name);
    }

    rd->state = NGX_HTTP_TB_REDIS_UP;
    rd->failures = 0;
    rd->backoff = NGX_HTTP_TB_REDIS_BACKOFF_MIN;

    /* what waited for Redis goes now: settles are safe to send again */

    while (!ngx_queue_empty(&rd->retry)) {
        q = ngx_queue_head(&rd->retry);
        ngx_queue_remove(q);
        rd->nretry--;

        retry = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

        if (ngx_http_tb_redis_send(retry) != NGX_OK) {
            if (ngx_http_tb_redis_park(retry) != NGX_OK) {
                ngx_http_tb_redis_free(retry);
            }

            break;
        }
    }

    ngx_http_tb_redis_arm(rd);
}


/*
 * one timer: the connect and handshake deadline, the oldest command's
 * deadline, or the end of the backoff
 */

static void
ngx_http_tb_redis_arm(ngx_http_tb_redis_t *rd)
{
    ngx_msec_t                deadline;
    ngx_msec_int_t            left;
    ngx_queue_t              *q;
    ngx_http_tb_redis_cmd_t  *cmd;

    if (rd->state == NGX_HTTP_TB_REDIS_DOWN) {
        return;
    }

    deadline = 0;

    if (rd->state == NGX_HTTP_TB_REDIS_CONNECTING) {
        deadline = rd->connect_deadline;

    } else {
        for (q = ngx_queue_head(&rd->sent);
             q != ngx_queue_sentinel(&rd->sent);
             q = ngx_queue_next(q))
        {
            cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

            if (!cmd->answered) {
                deadline = cmd->deadline;
                break;
            }
        }

        if (q == ngx_queue_sentinel(&rd->sent)) {
            if (rd->timer.timer_set) {
                ngx_del_timer(&rd->timer);
            }

            return;
        }
    }

    left = (ngx_msec_int_t) (deadline - ngx_current_msec);

    if (left < 1) {
        left = 1;
    }

    if (rd->timer.timer_set
        && (ngx_msec_int_t) (rd->timer.timer.key - deadline) <= 0)
    {
        return;
    }

    ngx_add_timer(&rd->timer, (ngx_msec_t) left);
}


static void
ngx_http_tb_redis_timer_handler(ngx_event_t *ev)
{
    ngx_queue_t              *q;
    ngx_http_tb_redis_t      *rd;
    ngx_http_tb_redis_cmd_t  *cmd;

    rd = ev->data;

    switch (rd->state) {

    case NGX_HTTP_TB_REDIS_DOWN:
        ngx_http_tb_redis_connect(rd);
        return;

    case NGX_HTTP_TB_REDIS_CONNECTING:
        if ((ngx_msec_int_t) (ngx_current_msec - rd->connect_deadline) >= 0) {
            ngx_http_tb_redis_fail(rd, "timed out connecting");
            return;
        }

        break;

    default: /* NGX_HTTP_TB_REDIS_UP */

        for (q = ngx_queue_head(&rd->sent);
             q != ngx_queue_sentinel(&rd->sent);
             q = ngx_queue_next(q))
        {
            cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

            if (cmd->answered) {
                continue;
            }

            if ((ngx_msec_int_t) (ngx_current_msec - cmd->deadline) >= 0) {
                ngx_http_tb_redis_fail(rd, "timed out");
                return;
            }

            break;
        }
    }

    ngx_http_tb_redis_arm(rd);
}


static void
ngx_http_tb_redis_write_handler(ngx_event_t *wev)
{
    ssize_t               n;
    ngx_buf_t            *b;
    ngx_connection_t     *c;
    ngx_http_tb_redis_t  *rd;

    c = wev->data;
    rd = c->data;
    b = rd->out;

    while (b->pos < b->last) {
        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR) {
            ngx_http_tb_redis_fail(rd, "cannot send");
            return;
        }

        b->pos += n;
    }

    if (b->pos == b->last) {
        b->pos = b->start;
        b->last = b->start;
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_tb_redis_fail(rd, "cannot send");
    }
}


static void
ngx_http_tb_redis_read_handler(ngx_event_t *rev)
{
    size_t                      size, used;
    u_char                     *p;
    ssize_t                     n;
    ngx_int_t                   rc;
    ngx_buf_t                  *b;
    ngx_connection_t           *c;
    ngx_http_tb_redis_t        *rd;
    ngx_http_tb_redis_reply_t   reply;

    c = rev->data;
    rd = c->data;
    b = rd->in;

    for ( ;; ) {

        if (b->last == b->end) {
            used = b->last - b->pos;

            if (b->pos != b->start) {
                ngx_memmove(b->start, b->pos, used);

            } else {
                /* one reply larger than the buffer */

                size = 2 * (b->end - b->start);

                if (size > NGX_HTTP_TB_REDIS_MAX_BUF) {
                    ngx_http_tb_redis_fail(rd, "sent a reply too large");
                    return;
                }

                p = ngx_alloc(size, rd->log);
                if (p == NULL) {
                    ngx_http_tb_redis_fail(rd, "no memory");
                    return;
                }

                ngx_memcpy(p, b->pos, used);
                ngx_free(b->start);

                b->start = p;
                b->end = p + size;
            }

            b->pos = b->start;
            b->last = b->start + used;
        }

        n = c->recv(c, b->last, b->end - b->last);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == NGX_ERROR || n == 0) {
            ngx_http_tb_redis_fail(rd, "closed the connection");
            return;
        }

        b->last += n;

        for ( ;; ) {
            rc = ngx_http_tb_redis_parse(rd, &reply);

            if (rc == NGX_AGAIN) {
                break;
            }

            if (rc == NGX_ERROR || ngx_queue_empty(&rd->sent)) {
                ngx_http_tb_redis_fail(rd, "sent an invalid reply");
                return;
            }

            ngx_http_tb_redis_dispatch(rd, &reply);

            if (rd->c == NULL) {
                /* a handler failed the connection */
                return;
            }
        }

        if (b->pos == b->last) {
            b->pos = b->start;
            b->last = b->start;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_tb_redis_fail(rd, "cannot read");
        return;
    }

    ngx_http_tb_redis_arm(rd);
}


static void
ngx_http_tb_redis_dispatch(ngx_http_tb_redis_t *rd,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_queue_t              *q;
    ngx_http_tb_redis_cmd_t  *cmd;

    q = ngx_queue_head(&rd->sent);
    ngx_queue_remove(q);

    cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

    if (reply->type == NGX_HTTP_TB_REDIS_ERROR
        && cmd->script && !cmd->eval
        && reply->str.len >= 8
        && ngx_strncmp(reply->str.data, "NOSCRIPT", 8) == 0)
    {
        /* the script cache is empty: the same command by EVAL */

        cmd->eval = 1;

        if (ngx_http_tb_redis_append(rd, cmd) == NGX_OK) {

            if (!rd->c->write->posted) {
                ngx_post_event(rd->c->write, &ngx_posted_events);
            }

            return;
        }
    }

    if (!cmd->answered) {
        cmd->answered = 1;
        cmd->handler(cmd, reply);
    }

    if (!cmd->kept) {
        ngx_http_tb_redis_free(cmd);
    }
}


/*
 * closes the connection, fails what waits for a reply, and opens the
 * circuit; "reason" == NULL: the worker is exiting
 */

static void
ngx_http_tb_redis_fail(ngx_http_tb_redis_t *rd, const char *reason)
{
    ngx_pool_t                 *pool;
    ngx_queue_t                 sent, *q;
    ngx_http_tb_redis_cmd_t    *cmd;
    ngx_http_tb_redis_reply_t   reply;

    if (rd->c) {
#if (NGX_SSL)
        if (rd->c->ssl) {
            rd->c->ssl->no_wait_shutdown = 1;
            (void) ngx_ssl_shutdown(rd->c);
        }
#endif
        pool = rd->c->pool;

        ngx_close_connection(rd->c);

        if (pool) {
            ngx_destroy_pool(pool);
        }

        rd->c = NULL;
        rd->peer.connection = NULL;
    }

    if (reason) {
        if (rd->failures == 0 || rd->state == NGX_HTTP_TB_REDIS_UP) {
            ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                          "token budget: redis \"%V\" %s, "
                          "its zones fall back until it answers",
                          &rd->name, reason);
        }

        rd->failures++;
        rd->errors++;
    }

    rd->state = NGX_HTTP_TB_REDIS_DOWN;
    rd->handshake = 0;

    /* the handlers may queue again: they see an open circuit */

    ngx_queue_init(&sent);

    if (!ngx_queue_empty(&rd->sent)) {
        sent = rd->sent;
        sent.next->prev = &sent;
        sent.prev->next = &sent;
        ngx_queue_init(&rd->sent);
    }

    ngx_memzero(&reply, sizeof(ngx_http_tb_redis_reply_t));
    reply.type = NGX_HTTP_TB_REDIS_FAILED;

    while (!ngx_queue_empty(&sent)) {
        q = ngx_queue_head(&sent);
        ngx_queue_remove(q);

        cmd = ngx_queue_data(q, ngx_http_tb_redis_cmd_t, queue);

        if (!cmd->answered) {
            cmd->answered = 1;
            cmd->handler(cmd, &reply);
        }

        if (!cmd->kept) {
            ngx_http_tb_redis_free(cmd);
        }
    }

    if (rd->timer.timer_set) {
        ngx_del_timer(&rd->timer);
    }

    if (reason == NULL || ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    ngx_add_timer(&rd->timer, rd->backoff);

    rd->backoff *= 2;

    if (rd->backoff > NGX_HTTP_TB_REDIS_BACKOFF_MAX) {
        rd->backoff = NGX_HTTP_TB_REDIS_BACKOFF_MAX;
    }
}


/* one complete reply from the input buffer, or NGX_AGAIN */

static ngx_int_t
ngx_http_tb_redis_parse(ngx_http_tb_redis_t *rd,
    ngx_http_tb_redis_reply_t *reply)
{
    u_char      *p;
    ngx_uint_t   error;

    if (rd->in->pos == rd->in->last) {
        return NGX_AGAIN;
    }

    ngx_memzero(reply, sizeof(ngx_http_tb_redis_reply_t));
    error = 0;

    p = ngx_http_tb_redis_value(rd->in->pos, rd->in->last, reply, 0, &error);

    if (error) {
        return NGX_ERROR;
    }

    if (p == NULL) {
        return NGX_AGAIN;
    }

    rd->in->pos = p;

    return NGX_OK;
}


/*
 * a RESP value from "p": the top level fills "reply", an array's integer
 * elements go to reply->elts; NULL when incomplete
 */

static u_char *
ngx_http_tb_redis_value(u_char *p, u_char *last,
    ngx_http_tb_redis_reply_t *reply, ngx_uint_t depth, ngx_uint_t *error)
{
    u_char      type, *eol;
    int64_t     n;
    ngx_int_t   neg;
    ngx_uint_t  i;

    if (depth > 4) {
        *error = 1;
        return NULL;
    }

    eol = ngx_strlchr(p, last, LF);

    if (eol == NULL) {
        if (last - p > 1024) {
            *error = 1;
        }

        return NULL;
    }

    if (eol - p < 2 || eol[-1] != CR) {
        *error = 1;
        return NULL;
    }

    type = *p++;

    n = 0;
    neg = 0;

    if (type == ':' || type == '$' || type == '*') {
        if (*p == '-') {
            neg = 1;
            p++;
        }

        if (p == eol - 1) {
            *error = 1;
            return NULL;
        }

        for ( /* void */ ; p < eol - 1; p++) {
            if (*p < '0' || *p > '9' || n > (INT64_MAX - 9) / 10) {
                *error = 1;
                return NULL;
            }

            n = n * 10 + (*p - '0');
        }

        if (neg) {
            n = -n;
        }
    }

    switch (type) {

    case '+':
    case '-':
        if (depth == 0) {
            reply->type = (type == '+') ? NGX_HTTP_TB_REDIS_STATUS
                                        : NGX_HTTP_TB_REDIS_ERROR;
            reply->str.data = p;
            reply->str.len = eol - 1 - p;
        }

        return eol + 1;

    case ':':
        if (depth == 0) {
            reply->type = NGX_HTTP_TB_REDIS_INTEGER;
            reply->integer = n;

        } else if (depth == 1 && reply->nelts < NGX_HTTP_TB_REDIS_ELTS) {
            reply->elts[reply->nelts++] = n;
        }

        return eol + 1;

    case '$':
        p = eol + 1;

        if (n < 0) {
            if (depth == 0) {
                reply->type = NGX_HTTP_TB_REDIS_NIL;
            }

            return p;
        }

        if (last - p < n + 2) {
            if (n > NGX_HTTP_TB_REDIS_MAX_BUF) {
                *error = 1;
            }

            return NULL;
        }

        if (depth == 0) {
            reply->type = NGX_HTTP_TB_REDIS_BULK;
            reply->str.data = p;
            reply->str.len = n;
        }

        return p + n + 2;

    case '*':
        p = eol + 1;

        if (depth == 0) {
            reply->type = (n < 0) ? NGX_HTTP_TB_REDIS_NIL
                                  : NGX_HTTP_TB_REDIS_ARRAY;
        }

        for (i = 0; (int64_t) i < n; i++) {
            if (p == last) {
                return NULL;
            }

            p = ngx_http_tb_redis_value(p, last, reply, depth + 1, error);

            if (p == NULL) {
                return NULL;
            }
        }

        return p;

    default:
        *error = 1;
        return NULL;
    }
}
