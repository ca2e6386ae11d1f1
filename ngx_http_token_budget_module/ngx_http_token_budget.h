
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
    ngx_uint_t                   cache;
    ngx_http_tb_error_t          error;
    ngx_log_t                   *log;
    ngx_pool_t                  *pool;
} ngx_http_tb_count_t;


/* Redis, ngx_http_token_budget_redis.c */

#define NGX_HTTP_TB_REDIS_DOWN          0
#define NGX_HTTP_TB_REDIS_CONNECTING    1
#define NGX_HTTP_TB_REDIS_UP            2

#define NGX_HTTP_TB_REDIS_FAILED        0   /* no reply: timeout, closed */
#define NGX_HTTP_TB_REDIS_STATUS        1
#define NGX_HTTP_TB_REDIS_ERROR         2
#define NGX_HTTP_TB_REDIS_INTEGER       3
#define NGX_HTTP_TB_REDIS_BULK          4
#define NGX_HTTP_TB_REDIS_NIL           5
#define NGX_HTTP_TB_REDIS_ARRAY         6

#define NGX_HTTP_TB_REDIS_ELTS          8
#define NGX_HTTP_TB_REDIS_CMD_SIZE      512


typedef struct ngx_http_tb_redis_s      ngx_http_tb_redis_t;
typedef struct ngx_http_tb_redis_cmd_s  ngx_http_tb_redis_cmd_t;


typedef struct {
    ngx_uint_t                   type;
    ngx_str_t                    str;       /* valid in the handler only */
    int64_t                      integer;
    ngx_uint_t                   nelts;     /* integers of an array */
    int64_t                      elts[NGX_HTTP_TB_REDIS_ELTS];
} ngx_http_tb_redis_reply_t;


typedef struct {
    ngx_str_t                    text;
    u_char                       sha[40];
} ngx_http_tb_redis_script_t;


typedef void (*ngx_http_tb_redis_handler_pt)(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply);
typedef void (*ngx_http_tb_redis_abandon_pt)(ngx_http_tb_redis_cmd_t *cmd);


struct ngx_http_tb_redis_cmd_s {
    ngx_queue_t                  queue;
    ngx_http_tb_redis_t         *redis;
    ngx_http_tb_redis_handler_pt handler;
    ngx_http_tb_redis_abandon_pt abandon;  /* a parked one, at exit */
    void                        *data;      /* NULL: nobody waits */
    ngx_http_tb_redis_script_t  *script;
    ngx_msec_t                   deadline;
    size_t                       size;
    u_char                      *args;      /* encoded, after the script */
    size_t                       len;
    ngx_uint_t                   nargs;
    u_char                      *extra;     /* the caller's */
    unsigned                     eval:1;
    unsigned                     answered:1;
    unsigned                     kept:1;
};


struct ngx_http_tb_redis_s {
    ngx_str_t                    name;
    ngx_addr_t                   addr;
    ngx_str_t                    password;
    ngx_int_t                    db;
    ngx_msec_t                   timeout;   /* the shortest of its zones */
    ngx_uint_t                   tls;
    ngx_str_t                    tls_ca;
    ngx_str_t                    tls_name_conf;
#if (NGX_SSL)
    ngx_ssl_t                   *ssl;
    ngx_str_t                    tls_name;  /* null-terminated */
    ngx_uint_t                   verify;
#endif

    /* the worker's */
    ngx_log_t                   *log;
    ngx_uint_t                   state;
    ngx_peer_connection_t        peer;
    ngx_connection_t            *c;
    ngx_queue_t                  sent;      /* waiting for replies */
    ngx_queue_t                  retry;     /* to send once it answers */
    ngx_uint_t                   nretry;
    ngx_queue_t                  free;
    ngx_uint_t                   nfree;
    ngx_buf_t                   *out;
    ngx_buf_t                   *in;
    ngx_event_t                  timer;
    ngx_msec_t                   backoff;
    ngx_msec_t                   connect_deadline;
    ngx_uint_t                   failures;  /* in a row */
    ngx_uint_t                   errors;
    ngx_uint_t                   handshake;
    u_char                       db_text[NGX_INT_T_LEN];
};


typedef struct {
    ngx_str_t                    addr;
    ngx_str_t                    password;
    ngx_int_t                    db;
    ngx_uint_t                   tls;
    ngx_str_t                    tls_ca;    /* verifies the server */
    ngx_str_t                    tls_name;
} ngx_http_tb_redis_conf_t;


ngx_http_tb_redis_t *ngx_http_tb_redis_add(ngx_conf_t *cf,
    ngx_array_t *servers, ngx_http_tb_redis_conf_t *rc);
void ngx_http_tb_redis_script(ngx_http_tb_redis_script_t *s,
    const char *text);
ngx_int_t ngx_http_tb_redis_init_process(ngx_http_tb_redis_t *rd,
    ngx_cycle_t *cycle);
void ngx_http_tb_redis_exit_process(ngx_http_tb_redis_t *rd);
ngx_uint_t ngx_http_tb_redis_usable(ngx_http_tb_redis_t *rd);
ngx_http_tb_redis_cmd_t *ngx_http_tb_redis_cmd(ngx_http_tb_redis_t *rd,
    size_t len, size_t extra);
void ngx_http_tb_redis_free(ngx_http_tb_redis_cmd_t *cmd);
u_char *ngx_http_tb_redis_arg(u_char *p, u_char *data, size_t len);
u_char *ngx_http_tb_redis_int(u_char *p, int64_t n);
ngx_int_t ngx_http_tb_redis_send(ngx_http_tb_redis_cmd_t *cmd);
ngx_int_t ngx_http_tb_redis_park(ngx_http_tb_redis_cmd_t *cmd);


/* windowed budgets, ngx_http_token_budget_zone.c */

#define NGX_HTTP_TB_COUNT_TOTAL         0
#define NGX_HTTP_TB_COUNT_PROMPT        1
#define NGX_HTTP_TB_COUNT_COMPLETION    2

#define NGX_HTTP_TB_KEY_GET             0
#define NGX_HTTP_TB_KEY_RESET           1
#define NGX_HTTP_TB_KEY_TOPUP           2


#define NGX_HTTP_TB_REDIS_NONE          0
#define NGX_HTTP_TB_REDIS_STRICT        1
#define NGX_HTTP_TB_REDIS_BATCHED       2

#define NGX_HTTP_TB_FAIL_LOCAL          0
#define NGX_HTTP_TB_FAIL_OPEN           1
#define NGX_HTTP_TB_FAIL_CLOSED         2


typedef struct {
    u_char                       color;
    u_char                       dirty;     /* on the queue to sync */
    u_short                      len;
    uint32_t                     inflight;  /* reservations in flight */
    ngx_queue_t                  queue;
    uint64_t                     window;    /* its start, epoch ms */
    int64_t                      prev;      /* spent in the previous window */
    int64_t                      curr;      /* spent in the current one */
    uint64_t                     reserved;  /* by requests in flight */
    u_char                       data[1];
} ngx_http_tb_node_t;


/* what a Redis zone keeps of a key besides, after the key's bytes */

typedef struct {
    ngx_queue_t                  dirty;
    void                        *node;
    int64_t                      pending;   /* spent, Redis not yet told */
    int64_t                      syncing;   /* told, not yet acknowledged */
    uint64_t                     seq;       /* of what is syncing */
    ngx_msec_t                   synced;    /* when it was told, or 0 */
} ngx_http_tb_sync_t;


typedef struct {
    ngx_rbtree_t                 rbtree;
    ngx_rbtree_node_t            sentinel;
    ngx_queue_t                  queue;
    ngx_uint_t                   keys;
    uint64_t                     admitted;
    uint64_t                     rejected;
    uint64_t                     full;
    uint64_t                     spent;

    /* Redis */
    ngx_queue_t                  dirty;
    ngx_queue_t                  settles;   /* left by exiting workers */
    uint64_t                     host;      /* names this host's deltas */
    uint64_t                     seq;
    int64_t                      clock;     /* Redis' clock less ours */
    ngx_msec_t                   sync_last;
    uint64_t                     redis_errors;
    uint64_t                     fail_open;
    uint64_t                     fail_local;
    uint64_t                     fail_closed;
    int64_t                      pending;
    uint64_t                     flushed;
    uint64_t                     syncs;
} ngx_http_tb_zone_sh_t;


typedef struct {
    ngx_http_tb_zone_sh_t       *sh;
    ngx_slab_pool_t             *shpool;
    ngx_shm_zone_t              *shm_zone;
    ngx_http_complex_value_t     key;
    uint64_t                     limit;
    ngx_msec_t                   period;    /* milliseconds */
    ngx_str_t                    per;
    ngx_uint_t                   count;
    ngx_uint_t                   logged_full;

    ngx_http_tb_redis_t         *redis;
    ngx_uint_t                   mode;
    ngx_uint_t                   fail;
    ngx_uint_t                   share;     /* percent, for fail=local */
    ngx_msec_t                   timeout;
    ngx_msec_t                   sync;
    ngx_msec_t                   hold;      /* reservations expire */
    ngx_event_t                  sync_event;
} ngx_http_tb_zone_t;


#define NGX_HTTP_TB_RES_LOCAL           0
#define NGX_HTTP_TB_RES_WAIT            1   /* sent to Redis */
#define NGX_HTTP_TB_RES_OK              2
#define NGX_HTTP_TB_RES_REFUSED         3
#define NGX_HTTP_TB_RES_FAILED          4


typedef struct ngx_http_tb_reservation_s  ngx_http_tb_reservation_t;

struct ngx_http_tb_reservation_s {
    ngx_http_tb_zone_t          *zone;
    ngx_http_tb_node_t          *node;
    uint64_t                     amount;

    /* Redis */
    ngx_uint_t                   state;
    ngx_uint_t                   counted;   /* in the zone's "admitted" */
    ngx_uint_t                   pending;   /* the spend goes as a delta */
    ngx_str_t                    key;
    uint64_t                     id;
    ngx_http_tb_redis_cmd_t     *cmd;
    int64_t                      reply[5];  /* ok, now, prev, curr, reserved */
    void                       (*done)(ngx_http_tb_reservation_t *res);
    void                        *data;
};


typedef struct {
    ngx_http_tb_zone_t          *zone;      /* the zone that refused */
    ngx_uint_t                   never;     /* more than the whole limit */
    ngx_uint_t                   full;      /* no room for the key */
    ngx_uint_t                   unavailable;  /* Redis, fail=closed */
    uint64_t                     amount;
    time_t                       retry;

    ngx_http_tb_zone_t          *tightest;  /* of those admitting */
    uint64_t                     limit;
    int64_t                      remaining;
    time_t                       reset;
} ngx_http_tb_refusal_t;


typedef struct {
    int64_t                      used;
    uint64_t                     reserved;
    ngx_uint_t                   inflight;
    int64_t                      remaining;
} ngx_http_tb_key_state_t;


typedef struct {
    ngx_str_t                    key;
    int64_t                      used;
} ngx_http_tb_top_t;


#define NGX_HTTP_TB_USAGE_DEPTH         16

typedef struct {
    void                        *handle;    /* yajl_handle */
    ngx_pool_t                  *pool;
    ngx_uint_t                   depth;
    ngx_uint_t                   in_usage;
    ngx_uint_t                   in_delta;
    ngx_uint_t                   key;
    ngx_uint_t                   key_id;
    ngx_uint_t                   failed;
    ngx_uint_t                   seen;
    uint64_t                     value[6];
    u_char                       stack[NGX_HTTP_TB_USAGE_DEPTH];
    ngx_uint_t                   final;     /* a usage that is not partial */

    /* what the current event reports, kept until the event ends */
    uint64_t                     ev_value[6];
    ngx_uint_t                   ev_seen;
    ngx_uint_t                   ev_final;
    ngx_uint_t                   partial;
    u_char                      *text;
    size_t                       text_len;
    size_t                       text_size;

    /* server-sent events */
    ngx_uint_t                   sse;
    u_char                      *line;
    size_t                       line_len;
    size_t                       line_size;
    ngx_uint_t                   line_overflow;
    ngx_uint_t                   skip_lf;
    ngx_uint_t                   counting;
    ngx_uint_t                   counted;
    ngx_uint_t                   done;
    int64_t                      output;
    tk_counter_t                 counter;
} ngx_http_tb_usage_t;


ngx_int_t ngx_http_tb_usage_init(ngx_pool_t *pool, ngx_http_tb_usage_t *u,
    ngx_uint_t sse, tk_encoding_t *enc);
void ngx_http_tb_usage_feed(ngx_http_tb_usage_t *u, u_char *p, size_t len,
    ngx_uint_t last);
ngx_int_t ngx_http_tb_usage_get(ngx_http_tb_usage_t *u, uint64_t *prompt,
    uint64_t *output);
ngx_int_t ngx_http_tb_usage_counted(ngx_http_tb_usage_t *u,
    uint64_t *output);

#define ngx_http_tb_node_sync(tn)                                             \
    ((ngx_http_tb_sync_t *) ngx_align_ptr((tn)->data + (tn)->len,             \
                                          NGX_ALIGNMENT))

ngx_msec_t ngx_http_tb_zone_now(void);
ngx_int_t ngx_http_tb_zone_init(ngx_shm_zone_t *shm_zone, void *data);
ngx_int_t ngx_http_tb_zone_reserve(ngx_http_request_t *r,
    ngx_array_t *limits, uint64_t prompt, uint64_t output,
    ngx_http_tb_reservation_t *res, ngx_uint_t *nres,
    ngx_http_tb_refusal_t *refusal);
void ngx_http_tb_zone_settle(ngx_http_tb_reservation_t *res,
    uint64_t prompt, uint64_t output, ngx_uint_t admitted);
ngx_int_t ngx_http_tb_zone_remote(ngx_http_request_t *r,
    ngx_http_tb_reservation_t *res, ngx_uint_t nres);
void ngx_http_tb_zone_detach(ngx_http_tb_reservation_t *res,
    ngx_uint_t nres);
ngx_int_t ngx_http_tb_zone_conclude(ngx_http_request_t *r,
    ngx_http_tb_reservation_t *res, ngx_uint_t *nres,
    ngx_http_tb_refusal_t *refusal);
ngx_int_t ngx_http_tb_zone_init_process(ngx_http_tb_zone_t *zone,
    ngx_cycle_t *cycle);
void ngx_http_tb_zone_exit_process(ngx_http_tb_zone_t *zone);
void ngx_http_tb_zone_scripts(void);
ngx_int_t ngx_http_tb_zone_key(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    ngx_http_tb_key_state_t *st, ngx_uint_t op, int64_t credit);
ngx_uint_t ngx_http_tb_zone_top(ngx_http_tb_zone_t *zone, ngx_pool_t *pool,
    ngx_http_tb_top_t *top, ngx_uint_t max);


/* shared counters for the metrics */

#define NGX_HTTP_TB_DRIFT_BUCKETS       9

typedef struct {
    ngx_atomic_t                 decisions[5];
    ngx_atomic_t                 drift[NGX_HTTP_TB_DRIFT_BUCKETS + 1];
    ngx_atomic_t                 drift_count;
    ngx_atomic_t                 drift_sum;     /* signed, wrapping */
    ngx_atomic_t                 drift_sum_abs;
    ngx_atomic_t                 model[1][5];   /* models x counters */
} ngx_http_tb_metrics_t;

#define NGX_HTTP_TB_M_REQUESTS          0
#define NGX_HTTP_TB_M_PROMPT            1
#define NGX_HTTP_TB_M_RESERVED          2
#define NGX_HTTP_TB_M_COMPLETION        3
#define NGX_HTTP_TB_M_REJECTED          4


typedef struct {
    ngx_array_t                  encodings;  /* ngx_http_tb_encoding_t */
    ngx_array_t                  models;     /* ngx_http_tb_model_t */
    ngx_array_t                  zones;      /* ngx_http_tb_zone_t * */
    ngx_array_t                  redis;      /* ngx_http_tb_redis_t * */
    ngx_shm_zone_t              *metrics_zone;
    ngx_http_tb_metrics_t       *metrics;
} ngx_http_tb_main_conf_t;


extern ngx_module_t  ngx_http_token_budget_module;


ngx_int_t ngx_http_tb_json_parse(ngx_pool_t *pool, u_char *data, size_t len,
    ngx_http_tb_json_t **root, ngx_str_t *err);
ngx_http_tb_json_t *ngx_http_tb_json_get(ngx_http_tb_json_t *obj,
    const char *key);
u_char *ngx_http_tb_null_usage(u_char *p, size_t len, u_char **cut_end);
ngx_int_t ngx_http_tb_json_print(ngx_pool_t *pool, ngx_http_tb_json_t *root,
    ngx_str_t *out);

ngx_int_t ngx_http_tb_count_body(ngx_http_tb_count_t *c, ngx_array_t *models,
    ngx_uint_t image_tokens);
ngx_http_tb_model_t *ngx_http_tb_find_model(ngx_array_t *models,
    ngx_str_t *name);
ngx_uint_t ngx_http_tb_is(ngx_http_tb_json_t *v, const char *s);

char *ngx_http_tb_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);


#endif /* _NGX_HTTP_TOKEN_BUDGET_H_INCLUDED_ */
