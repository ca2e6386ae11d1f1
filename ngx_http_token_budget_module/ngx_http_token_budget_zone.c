
/*
 * Copyright (C) The token budget authors
 *
 * Windowed budgets per key in shared memory.
 *
 * Each key keeps what it spent in the current window and the previous
 * one, and what its requests in flight have reserved.  What counts as used
 * at a moment is the previous window's spending weighted by the part of it
 * still inside the sliding window, plus the current window's: the sliding
 * window counter.  A request is admitted when what is used, what is
 * reserved and its own reservation fit the limit; its reservation is then
 * replaced by what the upstream reports it used.
 *
 * Windows are aligned to the epoch, so a day is a calendar day in UTC.
 * Keys live in an rbtree with an LRU queue, in the zone's slab pool.
 *
 * A zone with "redis=" shares its budgets with other hosts through Redis.
 * Each budget subject (the zone's name and a key) has its keys under one
 * hash tag, "tb:{zone:key}": a hash with the window's start and spending,
 * what is reserved and when reservations were last expired; a sorted set
 * of reservations by when they expire, and a hash of their amounts; a
 * hash of the last delta each host applied.  One script per operation
 * rolls the window by Redis' clock and does the operation atomically.
 *
 * mode=strict reserves in Redis at admission and settles there; a settle
 * applies only while its reservation exists, so sending it again does
 * nothing, and a reservation whose host died expires after "hold".
 * mode=batched decides from the shared memory zone, where each key also
 * keeps what this host spent and Redis has not been told; every "sync"
 * the keys used are told their deltas (each with a sequence number, so
 * that a delta is applied once) and learn what the fleet spent.
 * When Redis cannot answer within "timeout", fail= decides: closed
 * refuses, open admits, local enforces "share" of the budget on what this
 * host knows; what was spent meanwhile is kept as deltas and told once
 * Redis is back.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_budget.h"


static void ngx_http_tb_zone_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static ngx_http_tb_node_t *ngx_http_tb_zone_lookup(ngx_http_tb_zone_t *zone,
    ngx_str_t *key, uint32_t hash);
static ngx_http_tb_node_t *ngx_http_tb_zone_create(ngx_http_tb_zone_t *zone,
    ngx_str_t *key, uint32_t hash, ngx_msec_t now);
static void ngx_http_tb_zone_expire(ngx_http_tb_zone_t *zone, ngx_uint_t n,
    ngx_msec_t now, ngx_uint_t force);
static void ngx_http_tb_zone_roll(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, ngx_msec_t now);
static int64_t ngx_http_tb_zone_used(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, ngx_msec_t now);
static time_t ngx_http_tb_zone_retry(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, uint64_t amount, uint64_t limit,
    ngx_msec_t now);
static void ngx_http_tb_zone_tightest(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, uint64_t limit, int64_t used, ngx_msec_t now,
    ngx_http_tb_refusal_t *refusal);
static ngx_msec_t ngx_http_tb_zone_replied(ngx_http_tb_zone_t *zone,
    ngx_http_tb_reservation_t *res, ngx_http_tb_node_t *node);
static ngx_uint_t ngx_http_tb_zone_answered(ngx_http_tb_zone_t *zone,
    ngx_http_tb_redis_reply_t *reply);
static ngx_http_tb_node_t *ngx_http_tb_zone_get(ngx_http_tb_zone_t *zone,
    ngx_str_t *key, ngx_msec_t now);
static ngx_int_t ngx_http_tb_zone_take(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, uint64_t amount, uint64_t limit,
    ngx_msec_t now, ngx_http_tb_refusal_t *refusal);
static void ngx_http_tb_zone_pend(ngx_http_tb_zone_t *zone,
    ngx_http_tb_node_t *node, int64_t spent);
static ngx_http_tb_redis_cmd_t *ngx_http_tb_zone_cmd(ngx_http_tb_zone_t *zone,
    ngx_http_tb_redis_script_t *script, ngx_str_t *key, ngx_str_t *argv,
    ngx_uint_t nargv);
static void ngx_http_tb_zone_reserve_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply);
static void ngx_http_tb_zone_release(ngx_http_tb_zone_t *zone,
    ngx_str_t *key, uint64_t id, int64_t spent);
static void ngx_http_tb_zone_settle_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply);
static void ngx_http_tb_zone_settle_abandon(ngx_http_tb_redis_cmd_t *cmd);
static void ngx_http_tb_zone_unpark(ngx_http_tb_zone_t *zone);
static void ngx_http_tb_zone_sync_handler(ngx_event_t *ev);
static void ngx_http_tb_zone_synced(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply);
static ngx_uint_t ngx_http_tb_zone_fallback(ngx_http_tb_zone_t *zone);


#define NGX_HTTP_TB_SYNC_BATCH          1024


/* a settle an exiting worker could not send, for another to send */

typedef struct {
    ngx_queue_t                  queue;
    uint64_t                     id;
    int64_t                      spent;
    size_t                       len;
    u_char                       key[1];
} ngx_http_tb_parked_t;


/* the key's bytes and what a command needs of its reservation */

typedef struct {
    ngx_http_tb_zone_t          *zone;
    uint64_t                     id;
    int64_t                      amount;
    uint64_t                     seq;
    size_t                       len;
    u_char                       key[1];
} ngx_http_tb_zone_extra_t;


/*
 * the scripts; ARGV[1] the period, ARGV[2] how long an expired
 * reservation may still be settled, ARGV[3] how long the keys stay after
 * the last use, beyond two periods; numbers are doubles, exact below 2^53
 */

#define NGX_HTTP_TB_LUA_ROLL                                                  \
    "local t = redis.call('TIME')\n"                                          \
    "local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"                     \
    "local period = tonumber(ARGV[1])\n"                                      \
    "local s = redis.call('HMGET', KEYS[1], 'w', 'p', 'c', 'r', 'x')\n"       \
    "local w = tonumber(s[1]) or 0\n"                                         \
    "local p = tonumber(s[2]) or 0\n"                                         \
    "local c = tonumber(s[3]) or 0\n"                                         \
    "local r = tonumber(s[4]) or 0\n"                                         \
    "local x = tonumber(s[5]) or 0\n"                                         \
    "local start = now - now % period\n"                                      \
    "if w < start then\n"                                                     \
    "  if w + period >= start and c > 0 then p = c else p = 0 end\n"          \
    "  if c > 0 then c = 0 end\n"                                             \
    "end\n"                                                                   \
    "w = start\n"                                                             \
    "if x < now then\n"                                                       \
    "  local e = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. x, now)\n"       \
    "  for i = 1, #e do\n"                                                    \
    "    r = r - (tonumber(redis.call('HGET', KEYS[3], e[i])) or 0)\n"        \
    "  end\n"                                                                 \
    "  if r < 0 then r = 0 end\n"                                             \
    "  x = now\n"                                                             \
    "  local g = now - tonumber(ARGV[2])\n"                                   \
    "  local o = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', g)\n"           \
    "  for i = 1, #o do redis.call('HDEL', KEYS[3], o[i]) end\n"              \
    "  if #o > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', g) end\n"\
    "end\n"

#define NGX_HTTP_TB_LUA_STORE                                                 \
    "redis.call('HSET', KEYS[1], 'w', w, 'p', p, 'c', c, 'r', r, 'x', x)\n"   \
    "for i = 1, #KEYS do\n"                                                   \
    "  redis.call('PEXPIRE', KEYS[i], 2 * period + tonumber(ARGV[3]))\n"      \
    "end\n"


/* ARGV[4] limit, ARGV[5] amount, ARGV[6] id, ARGV[7] hold */

static const char  ngx_http_tb_lua_reserve[] =
    NGX_HTTP_TB_LUA_ROLL
    "local e = now - start\n"
    "local q = math.floor(p / period)\n"
    "local a = (p - q * period) * (period - e)\n"
    "local k = math.floor(a / period)\n"
    "while k * period < a do k = k + 1 end\n"
    "while k > 0 and (k - 1) * period >= a do k = k - 1 end\n"
    "local used = q * (period - e) + k + c\n"
    "if used < 0 then used = 0 end\n"
    "local ok = 0\n"
    "if used + r + tonumber(ARGV[5]) <= tonumber(ARGV[4]) then\n"
    "  ok = 1\n"
    "  r = r + tonumber(ARGV[5])\n"
    "  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[6])\n"
    "  redis.call('HSET', KEYS[3], ARGV[6], ARGV[5])\n"
    "end\n"
    NGX_HTTP_TB_LUA_STORE
    "return {ok, now, p, c, r}\n";


/* ARGV[4] id, ARGV[5] spent: applied while the reservation exists */

static const char  ngx_http_tb_lua_settle[] =
    NGX_HTTP_TB_LUA_ROLL
    "local ok = 0\n"
    "local e = redis.call('ZSCORE', KEYS[2], ARGV[4])\n"
    "if e then\n"
    "  if tonumber(e) > now then\n"
    "    r = r - (tonumber(redis.call('HGET', KEYS[3], ARGV[4])) or 0)\n"
    "    if r < 0 then r = 0 end\n"
    "  end\n"
    "  c = c + tonumber(ARGV[5])\n"
    "  redis.call('ZREM', KEYS[2], ARGV[4])\n"
    "  redis.call('HDEL', KEYS[3], ARGV[4])\n"
    "  ok = 1\n"
    "end\n"
    NGX_HTTP_TB_LUA_STORE
    "return {ok, now, p, c, r}\n";


/* ARGV[4] host, ARGV[5] sequence, ARGV[6] delta: applied once */

static const char  ngx_http_tb_lua_sync[] =
    NGX_HTTP_TB_LUA_ROLL
    "local ok = 0\n"
    "local last = tonumber(redis.call('HGET', KEYS[4], ARGV[4])) or 0\n"
    "if tonumber(ARGV[5]) > last then\n"
    "  c = c + tonumber(ARGV[6])\n"
    "  redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])\n"
    "  ok = 1\n"
    "end\n"
    NGX_HTTP_TB_LUA_STORE
    "return {ok, now, p, c, r}\n";


static ngx_http_tb_redis_script_t  ngx_http_tb_script_reserve;
static ngx_http_tb_redis_script_t  ngx_http_tb_script_settle;
static ngx_http_tb_redis_script_t  ngx_http_tb_script_sync;


/* a settle Redis has not seen is retried for an hour at most */
#define NGX_HTTP_TB_REDIS_GRACE        3600000


void
ngx_http_tb_zone_scripts(void)
{
    ngx_http_tb_redis_script(&ngx_http_tb_script_reserve,
                             ngx_http_tb_lua_reserve);
    ngx_http_tb_redis_script(&ngx_http_tb_script_settle,
                             ngx_http_tb_lua_settle);
    ngx_http_tb_redis_script(&ngx_http_tb_script_sync,
                             ngx_http_tb_lua_sync);
}


/* wall clock milliseconds: windows follow the calendar */

ngx_msec_t
ngx_http_tb_zone_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (ngx_msec_t) tp->sec * 1000 + tp->msec;
}


/* a Redis zone follows Redis' clock, as last seen */

#define ngx_http_tb_zone_clock(zone)                                          \
    (ngx_http_tb_zone_now() + (zone)->sh->clock)


ngx_int_t
ngx_http_tb_zone_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_tb_zone_t  *ozone = data;

    size_t               len;
    ngx_http_tb_zone_t  *zone;

    zone = shm_zone->data;

    if (ozone) {
        if (ngx_strcmp(zone->key.value.data, ozone->key.value.data) != 0) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "token_budget_zone \"%V\" uses the \"%V\" key "
                          "while previously it used the \"%V\" key; "
                          "rename the zone or change its size to start "
                          "it anew",
                          &shm_zone->shm.name, &zone->key.value,
                          &ozone->key.value);
            return NGX_ERROR;
        }

        /* the counters survive a reload: the limit may change */

        zone->shpool = ozone->shpool;
        zone->sh = ozone->sh;

        return NGX_OK;
    }

    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;
        return NGX_OK;
    }

    zone->sh = ngx_slab_calloc(zone->shpool, sizeof(ngx_http_tb_zone_sh_t));
    if (zone->sh == NULL) {
        return NGX_ERROR;
    }

    zone->shpool->data = zone->sh;

    ngx_rbtree_init(&zone->sh->rbtree, &zone->sh->sentinel,
                    ngx_http_tb_zone_rbtree_insert_value);

    ngx_queue_init(&zone->sh->queue);
    ngx_queue_init(&zone->sh->dirty);
    ngx_queue_init(&zone->sh->settles);

    zone->sh->host = ((uint64_t) ngx_random() << 32 ^ ngx_random()
                      ^ (uint64_t) ngx_time() << 20 ^ ngx_pid);

    len = sizeof(" in token_budget_zone \"\"") + shm_zone->shm.name.len;

    zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
    if (zone->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(zone->shpool->log_ctx, " in token_budget_zone \"%V\"%Z",
                &shm_zone->shm.name);

    zone->shpool->log_nomem = 0;

    return NGX_OK;
}


static void
ngx_http_tb_zone_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t   **p;
    ngx_http_tb_node_t   *n, *nt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else { /* node->key == temp->key */

            n = (ngx_http_tb_node_t *) &node->color;
            nt = (ngx_http_tb_node_t *) &temp->color;

            p = (ngx_memn2cmp(n->data, nt->data, n->len, nt->len) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


static ngx_http_tb_node_t *
ngx_http_tb_zone_lookup(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    uint32_t hash)
{
    ngx_int_t            rc;
    ngx_rbtree_node_t   *node, *sentinel;
    ngx_http_tb_node_t  *tn;

    node = zone->sh->rbtree.root;
    sentinel = zone->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        /* hash == node->key */

        tn = (ngx_http_tb_node_t *) &node->color;

        rc = ngx_memn2cmp(key->data, tn->data, key->len, (size_t) tn->len);

        if (rc == 0) {
            return tn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


static ngx_http_tb_node_t *
ngx_http_tb_zone_create(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    uint32_t hash, ngx_msec_t now)
{
    size_t               size;
    ngx_rbtree_node_t   *node;
    ngx_http_tb_node_t  *tn;

    size = offsetof(ngx_rbtree_node_t, color)
           + offsetof(ngx_http_tb_node_t, data)
           + key->len;

    if (zone->redis) {
        size += NGX_ALIGNMENT + sizeof(ngx_http_tb_sync_t);
    }

    ngx_http_tb_zone_expire(zone, 1, now, 0);

    node = ngx_slab_alloc_locked(zone->shpool, size);

    if (node == NULL) {
        ngx_http_tb_zone_expire(zone, 0, now, 1);

        node = ngx_slab_alloc_locked(zone->shpool, size);
        if (node == NULL) {
            return NULL;
        }
    }

    node->key = hash;

    tn = (ngx_http_tb_node_t *) &node->color;

    tn->len = (u_short) key->len;
    tn->dirty = 0;
    tn->inflight = 0;
    tn->window = now - now % zone->period;
    tn->prev = 0;
    tn->curr = 0;
    tn->reserved = 0;

    ngx_memcpy(tn->data, key->data, key->len);

    if (zone->redis) {
        ngx_memzero(ngx_http_tb_node_sync(tn), sizeof(ngx_http_tb_sync_t));
        ngx_http_tb_node_sync(tn)->node = tn;
    }

    ngx_rbtree_insert(&zone->sh->rbtree, node);
    ngx_queue_insert_head(&zone->sh->queue, &tn->queue);

    zone->sh->keys++;

    return tn;
}


/*
 * frees keys from the tail of the LRU queue that nothing holds: no
 * reservation in flight and nothing spent inside the sliding window;
 * "n" == 0 walks the whole queue
 */

static void
ngx_http_tb_zone_expire(ngx_http_tb_zone_t *zone, ngx_uint_t n,
    ngx_msec_t now, ngx_uint_t force)
{
    ngx_uint_t           seen;
    ngx_queue_t         *q, *prev;
    ngx_rbtree_node_t   *node;
    ngx_http_tb_node_t  *tn;

    seen = 0;

    for (q = ngx_queue_last(&zone->sh->queue);
         q != ngx_queue_sentinel(&zone->sh->queue);
         q = prev)
    {
        prev = ngx_queue_prev(q);

        if (n && seen++ >= 2 * n) {
            return;
        }

        tn = ngx_queue_data(q, ngx_http_tb_node_t, queue);

        ngx_http_tb_zone_roll(zone, tn, now);

        if (tn->inflight || tn->prev > 0 || tn->curr != 0 || tn->dirty) {
            if (!force) {
                return;
            }

            continue;
        }

        ngx_queue_remove(q);

        node = (ngx_rbtree_node_t *)
                   ((u_char *) tn - offsetof(ngx_rbtree_node_t, color));

        ngx_rbtree_delete(&zone->sh->rbtree, node);
        ngx_slab_free_locked(zone->shpool, node);

        zone->sh->keys--;

        if (n && --n == 0) {
            return;
        }
    }
}


/*
 * moves a key's counters to the window "now" is in; windows are kept by
 * their start, so that a reload that changes the period keeps what was
 * spent: a window that started in the new current one is the current one
 */

static void
ngx_http_tb_zone_roll(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    ngx_msec_t now)
{
    uint64_t  start;

    start = now - now % zone->period;

    if (node->window >= start) {
        node->window = start;
        return;
    }

    /* credit left by a top-up carries over, spending moves back */

    node->prev = (node->window + zone->period >= start && node->curr > 0)
                 ? node->curr : 0;

    if (node->curr > 0) {
        node->curr = 0;
    }

    node->window = start;
}


/*
 * the previous window's share is rounded up, so that it matches the
 * moment ngx_http_tb_zone_retry() finds
 */

static int64_t
ngx_http_tb_zone_used(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    ngx_msec_t now)
{
    uint64_t  elapsed;

    ngx_http_tb_zone_roll(zone, node, now);

    elapsed = now % zone->period;

    return (node->prev * (int64_t) (zone->period - elapsed)
            + (int64_t) zone->period - 1)
           / (int64_t) zone->period
           + node->curr;
}


/*
 * when "amount" fits, if nothing else spends and the reservations in
 * flight stay: the previous window's share decays linearly, and after the
 * current window ends its spending decays in turn
 */

static time_t
ngx_http_tb_zone_retry(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    uint64_t amount, uint64_t limit, ngx_msec_t now)
{
    int64_t   need, room;
    uint64_t  elapsed, start, at;

    elapsed = now % zone->period;
    start = now - elapsed;

    need = node->reserved + amount;
    room = (int64_t) limit - need - node->curr;

    if (room >= 0 && node->prev > 0) {
        /* prev * (1 - f) <= room, f = 1 - room / prev */
        at = start + zone->period
             - (uint64_t) (room * (int64_t) zone->period / node->prev);

    } else if ((int64_t) limit - need >= 0 && node->curr > 0) {
        room = (int64_t) limit - need;
        at = start + 2 * zone->period
             - (uint64_t) (room * (int64_t) zone->period / node->curr);

        if (at < start + zone->period) {
            at = start + zone->period;
        }

    } else {
        /* waits for reservations in flight: a window at most */
        at = now + zone->period;
    }

    if (at <= now) {
        return 1;
    }

    return (time_t) ((at - now + 999) / 1000);
}


/*
 * reserves "amount" in every zone of the request, or in none: zones are
 * locked one at a time, and what a later zone refuses is given back;
 * NGX_AGAIN when some reservations are to be made in Redis, by
 * ngx_http_tb_zone_remote() and ngx_http_tb_zone_conclude()
 */

#define ngx_http_tb_amount(zone, prompt, output)                              \
    ((zone)->count == NGX_HTTP_TB_COUNT_PROMPT ? (prompt)                     \
     : (zone)->count == NGX_HTTP_TB_COUNT_COMPLETION ? (output)               \
     : (prompt) + (output))

#define NGX_HTTP_TB_DIRTY_QUEUED        1
#define NGX_HTTP_TB_DIRTY_SYNCING       2


ngx_int_t
ngx_http_tb_zone_reserve(ngx_http_request_t *r, ngx_array_t *limits,
    uint64_t prompt, uint64_t output, ngx_http_tb_reservation_t *res,
    ngx_uint_t *nres, ngx_http_tb_refusal_t *refusal)
{
    uint64_t                    amount, limit;
    ngx_int_t                   rc;
    ngx_str_t                   key;
    ngx_uint_t                  i, j, n, remote, fail;
    ngx_msec_t                  now;
    ngx_http_tb_zone_t         *zone, **zones;
    ngx_http_tb_node_t         *node;

    zones = limits->elts;
    n = 0;
    remote = 0;

    ngx_memzero(refusal, sizeof(ngx_http_tb_refusal_t));

    for (i = 0; i < limits->nelts; i++) {
        zone = zones[i];

        if (ngx_http_complex_value(r, &zone->key, &key) != NGX_OK) {
            goto failed;
        }

        if (key.len == 0) {
            continue;
        }

        amount = ngx_http_tb_amount(zone, prompt, output);

        if (key.len > 65535) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "the value of the \"%V\" key "
                          "is more than 65535 bytes: \"%V\"",
                          &zone->key.value, &key);
            continue;
        }

        if (amount > zone->limit) {
            refusal->zone = zone;
            refusal->never = 1;
            refusal->amount = amount;
            goto refused;
        }

        ngx_memzero(&res[n], sizeof(ngx_http_tb_reservation_t));

        fail = NGX_HTTP_TB_FAIL_LOCAL;
        limit = zone->limit;

        if (zone->redis && !ngx_http_tb_redis_usable(zone->redis)) {
            fail = ngx_http_tb_zone_fallback(zone);

            if (fail == NGX_HTTP_TB_FAIL_CLOSED) {
                refusal->zone = zone;
                refusal->unavailable = 1;
                goto refused;
            }

            if (fail == NGX_HTTP_TB_FAIL_LOCAL) {
                limit = zone->limit * zone->share / 100;
            }
        }

        now = ngx_http_tb_zone_clock(zone);

        ngx_shmtx_lock(&zone->shpool->mutex);

        node = ngx_http_tb_zone_get(zone, &key, now);

        if (node == NULL) {
            zone->sh->full++;
            ngx_shmtx_unlock(&zone->shpool->mutex);

            if (!zone->logged_full) {
                zone->logged_full = 1;
                ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                              "token_budget_zone \"%V\" is full, "
                              "keys it cannot hold are refused",
                              &zone->shm_zone->shm.name);
            }

            refusal->zone = zone;
            refusal->full = 1;
            goto refused;
        }

        if (zone->mode == NGX_HTTP_TB_REDIS_STRICT
            && ngx_http_tb_redis_usable(zone->redis))
        {
            /* decided by Redis; here only what this host holds */

            node->reserved += amount;
            node->inflight++;

            res[n].state = NGX_HTTP_TB_RES_WAIT;
            res[n].id = ++zone->sh->seq;
            remote = 1;

        } else if (fail == NGX_HTTP_TB_FAIL_OPEN) {
            node->reserved += amount;
            node->inflight++;
            zone->sh->admitted++;
            zone->sh->fail_open++;
            res[n].counted = 1;

        } else {
            rc = ngx_http_tb_zone_take(zone, node, amount, limit, now,
                                       refusal);

            if (limit != zone->limit) {
                zone->sh->fail_local++;
            }

            if (rc != NGX_OK) {
                ngx_shmtx_unlock(&zone->shpool->mutex);
                goto refused;
            }

            res[n].counted = 1;

            if (zone->mode == NGX_HTTP_TB_REDIS_BATCHED) {
                /* learns what the fleet spent at the next sync */
                ngx_http_tb_zone_pend(zone, node, 0);
            }
        }

        ngx_shmtx_unlock(&zone->shpool->mutex);

        res[n].zone = zone;
        res[n].node = node;
        res[n].amount = amount;
        res[n].pending = (zone->redis != NULL
                          && res[n].state != NGX_HTTP_TB_RES_WAIT);

        if (zone->redis) {
            res[n].key.data = ngx_pstrdup(r->pool, &key);
            if (res[n].key.data == NULL) {
                n++;
                goto failed;
            }

            res[n].key.len = key.len;
        }

        n++;
    }

    *nres = n;

    return remote ? NGX_AGAIN : NGX_OK;

refused:

    for (j = 0; j < n; j++) {
        ngx_http_tb_zone_settle(&res[j], 0, 0, 0);
    }

    *nres = 0;

    return NGX_DECLINED;

failed:

    for (j = 0; j < n; j++) {
        ngx_http_tb_zone_settle(&res[j], 0, 0, 0);
    }

    *nres = 0;

    return NGX_ERROR;
}


/* the key's node, made when new; the zone is locked */

static ngx_http_tb_node_t *
ngx_http_tb_zone_get(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    ngx_msec_t now)
{
    uint32_t             hash;
    ngx_http_tb_node_t  *node;

    hash = ngx_crc32_short(key->data, key->len);

    node = ngx_http_tb_zone_lookup(zone, key, hash);

    if (node == NULL) {
        return ngx_http_tb_zone_create(zone, key, hash, now);
    }

    ngx_queue_remove(&node->queue);
    ngx_queue_insert_head(&zone->sh->queue, &node->queue);

    return node;
}


/* admits "amount" against "limit" in the shared memory; locked */

static ngx_int_t
ngx_http_tb_zone_take(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    uint64_t amount, uint64_t limit, ngx_msec_t now,
    ngx_http_tb_refusal_t *refusal)
{
    int64_t  used;

    used = ngx_http_tb_zone_used(zone, node, now);

    if (used < 0) {
        used = 0;
    }

    if ((uint64_t) used + node->reserved + amount > limit) {
        refusal->zone = zone;
        refusal->amount = amount;
        refusal->retry = ngx_http_tb_zone_retry(zone, node, amount, limit,
                                                now);

        zone->sh->rejected++;

        return NGX_DECLINED;
    }

    node->reserved += amount;
    node->inflight++;
    zone->sh->admitted++;

    ngx_http_tb_zone_tightest(zone, node, limit, used, now, refusal);

    return NGX_OK;
}


/* the zone with the fewest tokens left after the request's reservation */

static void
ngx_http_tb_zone_tightest(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    uint64_t limit, int64_t used, ngx_msec_t now,
    ngx_http_tb_refusal_t *refusal)
{
    int64_t  remaining;

    remaining = (int64_t) (limit - used - node->reserved);

    if (refusal->tightest == NULL || remaining < refusal->remaining) {
        refusal->tightest = zone;
        refusal->remaining = remaining;
        refusal->limit = limit;
        refusal->reset = (time_t) (((node->curr > 0 ? 2 : 1) * zone->period
                                    - now % zone->period + 999) / 1000);
    }
}


/* Redis down, or slow: what its zone does meanwhile */

static ngx_uint_t
ngx_http_tb_zone_fallback(ngx_http_tb_zone_t *zone)
{
    if (zone->fail == NGX_HTTP_TB_FAIL_CLOSED) {
        ngx_shmtx_lock(&zone->shpool->mutex);
        zone->sh->fail_closed++;
        ngx_shmtx_unlock(&zone->shpool->mutex);
    }

    return zone->fail;
}


/*
 * replaces a reservation with what was spent; "admitted" == 0 undoes it;
 * in Redis by a settle, or by a delta told later
 */

void
ngx_http_tb_zone_settle(ngx_http_tb_reservation_t *res, uint64_t prompt,
    uint64_t output, ngx_uint_t admitted)
{
    uint64_t             spent;
    ngx_msec_t           now;
    ngx_http_tb_zone_t  *zone;

    zone = res->zone;
    spent = ngx_http_tb_amount(zone, prompt, output);
    now = ngx_http_tb_zone_clock(zone);

    ngx_shmtx_lock(&zone->shpool->mutex);

    res->node->reserved -= res->amount;
    res->node->inflight--;

    if (!admitted && res->counted) {
        zone->sh->admitted--;
    }

    ngx_http_tb_zone_roll(zone, res->node, now);
    res->node->curr += spent;
    zone->sh->spent += spent;

    if (res->pending && spent) {
        ngx_http_tb_zone_pend(zone, res->node, spent);
    }

    if (res->state == NGX_HTTP_TB_RES_WAIT
        || res->state == NGX_HTTP_TB_RES_FAILED)
    {
        /* Redis may hold it: it expires after "hold" */
        res->state = NGX_HTTP_TB_RES_LOCAL;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (res->state == NGX_HTTP_TB_RES_OK) {
        ngx_http_tb_zone_release(zone, &res->key, res->id, spent);
    }

    res->zone = NULL;
}


/* a delta for Redis; the zone is locked */

static void
ngx_http_tb_zone_pend(ngx_http_tb_zone_t *zone, ngx_http_tb_node_t *node,
    int64_t spent)
{
    ngx_http_tb_sync_t  *sync;

    sync = ngx_http_tb_node_sync(node);

    sync->pending += spent;
    zone->sh->pending += spent;

    if (!(node->dirty & NGX_HTTP_TB_DIRTY_QUEUED)) {
        node->dirty |= NGX_HTTP_TB_DIRTY_QUEUED;
        ngx_queue_insert_tail(&zone->sh->dirty, &sync->dirty);
    }
}


/* a command to run a script on a budget subject's keys */

static ngx_http_tb_redis_cmd_t *
ngx_http_tb_zone_cmd(ngx_http_tb_zone_t *zone,
    ngx_http_tb_redis_script_t *script, ngx_str_t *key, ngx_str_t *argv,
    ngx_uint_t nargv)
{
    size_t                     len, klen;
    u_char                    *p, *k;
    ngx_uint_t                 i;
    ngx_http_tb_zone_extra_t  *x;
    ngx_http_tb_redis_cmd_t   *cmd;

    static const char         *suffix[] = { "", ":r", ":a", ":h" };

    klen = sizeof("tb:{:}") - 1 + zone->shm_zone->shm.name.len + key->len;

    len = sizeof("$1\r\n4\r\n") - 1
          + 4 * (klen + sizeof("$65535:r\r\n\r\n"))
          + 3 * sizeof("$-9223372036854775808\r\n\r\n");

    for (i = 0; i < nargv; i++) {
        len += argv[i].len + sizeof("$65535\r\n\r\n");
    }

    cmd = ngx_http_tb_redis_cmd(zone->redis, len,
                                sizeof(ngx_http_tb_zone_extra_t) + klen
                                + NGX_ALIGNMENT);
    if (cmd == NULL) {
        return NULL;
    }

    x = (ngx_http_tb_zone_extra_t *) ngx_align_ptr(cmd->extra, NGX_ALIGNMENT);
    ngx_memzero(x, sizeof(ngx_http_tb_zone_extra_t));

    x->zone = zone;
    x->len = key->len;
    ngx_memcpy(x->key, key->data, key->len);

    /* "tb:{zone:key}" and its suffixes, one hash tag for Redis Cluster */

    k = x->key + key->len;
    p = ngx_sprintf(k, "tb:{%V:%V}", &zone->shm_zone->shm.name, key);
    klen = p - k;

    p = cmd->args;
    p = ngx_http_tb_redis_arg(p, (u_char *) "4", 1);

    for (i = 0; i < 4; i++) {
        p = ngx_sprintf(p, "$%uz\r\n", klen + ngx_strlen(suffix[i]));
        p = ngx_cpymem(p, k, klen);
        p = ngx_sprintf(p, "%s\r\n", suffix[i]);
    }

    p = ngx_http_tb_redis_int(p, zone->period);
    p = ngx_http_tb_redis_int(p, NGX_HTTP_TB_REDIS_GRACE);
    p = ngx_http_tb_redis_int(p, zone->hold + NGX_HTTP_TB_REDIS_GRACE);

    for (i = 0; i < nargv; i++) {
        p = ngx_http_tb_redis_arg(p, argv[i].data, argv[i].len);
    }

    cmd->len = p - cmd->args;
    cmd->nargs = 1 + 4 + 3 + nargv;
    cmd->script = script;

    return cmd;
}


#define ngx_http_tb_zone_extra(cmd)                                           \
    ((ngx_http_tb_zone_extra_t *) ngx_align_ptr((cmd)->extra, NGX_ALIGNMENT))


/* reservation ids: this host's, and a number */

static ngx_str_t
ngx_http_tb_zone_id(ngx_http_tb_zone_t *zone, uint64_t id, u_char *buf)
{
    ngx_str_t  s;

    s.data = buf;
    s.len = ngx_sprintf(buf, "%016uxL-%uL", zone->sh->host, id) - buf;

    return s;
}


/* a number as a script argument */

static ngx_str_t
ngx_http_tb_zone_num(u_char *buf, int64_t n)
{
    ngx_str_t  s;

    s.data = buf;
    s.len = ngx_sprintf(buf, "%L", n) - buf;

    return s;
}


/* sends the reservations to make in Redis */

ngx_int_t
ngx_http_tb_zone_remote(ngx_http_request_t *r, ngx_http_tb_reservation_t *res,
    ngx_uint_t nres)
{
    u_char                    buf[4][NGX_INT64_LEN + 32];
    ngx_str_t                 argv[4];
    ngx_uint_t                i, waiting;
    ngx_http_tb_zone_t       *zone;
    ngx_http_tb_redis_cmd_t  *cmd;

    waiting = 0;

    for (i = 0; i < nres; i++) {
        if (res[i].state != NGX_HTTP_TB_RES_WAIT || res[i].cmd) {
            continue;
        }

        zone = res[i].zone;

        /* ARGV: limit, amount, id, hold */

        argv[0] = ngx_http_tb_zone_num(buf[0], zone->limit);
        argv[1] = ngx_http_tb_zone_num(buf[1], res[i].amount);
        argv[2] = ngx_http_tb_zone_id(zone, res[i].id, buf[2]);
        argv[3] = ngx_http_tb_zone_num(buf[3], zone->hold);

        cmd = ngx_http_tb_zone_cmd(zone, &ngx_http_tb_script_reserve,
                                   &res[i].key, argv, 4);
        if (cmd == NULL) {
            res[i].state = NGX_HTTP_TB_RES_FAILED;
            continue;
        }

        ngx_http_tb_zone_extra(cmd)->id = res[i].id;

        cmd->handler = ngx_http_tb_zone_reserve_handler;
        cmd->data = &res[i];

        if (ngx_http_tb_redis_send(cmd) != NGX_OK) {
            ngx_http_tb_redis_free(cmd);
            res[i].state = NGX_HTTP_TB_RES_FAILED;
            continue;
        }

        res[i].cmd = cmd;
        waiting++;
    }

    return waiting ? NGX_AGAIN : NGX_OK;
}


/*
 * whether a script answered {ok, now, prev, curr, reserved}: Redis' clock
 * is kept from the answer, a failure counted
 */

static ngx_uint_t
ngx_http_tb_zone_answered(ngx_http_tb_zone_t *zone,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_uint_t  ok;

    ok = (reply->type == NGX_HTTP_TB_REDIS_ARRAY && reply->nelts == 5);

    ngx_shmtx_lock(&zone->shpool->mutex);

    if (ok) {
        zone->sh->clock = reply->elts[1] - ngx_http_tb_zone_now();

    } else {
        zone->sh->redis_errors++;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return ok;
}


/* a key's state as Redis answered a reservation, and Redis' time */

static ngx_msec_t
ngx_http_tb_zone_replied(ngx_http_tb_zone_t *zone,
    ngx_http_tb_reservation_t *res, ngx_http_tb_node_t *node)
{
    ngx_msec_t  now;

    now = res->reply[1];

    ngx_memzero(node, sizeof(ngx_http_tb_node_t));

    node->window = now - now % zone->period;
    node->prev = res->reply[2];
    node->curr = res->reply[3];
    node->reserved = res->reply[4];

    return now;
}


static void
ngx_http_tb_zone_reserve_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_str_t                   key;
    ngx_uint_t                  ok;
    ngx_http_tb_zone_t         *zone;
    ngx_http_tb_zone_extra_t   *x;
    ngx_http_tb_reservation_t  *res;

    x = ngx_http_tb_zone_extra(cmd);
    zone = x->zone;
    res = cmd->data;

    if (reply->type == NGX_HTTP_TB_REDIS_ERROR) {
        ngx_log_error(NGX_LOG_ERR, cmd->redis->log, 0,
                      "token budget: redis \"%V\" failed a reservation "
                      "in token_budget_zone \"%V\": %V",
                      &cmd->redis->name, &zone->shm_zone->shm.name,
                      &reply->str);
    }

    ok = ngx_http_tb_zone_answered(zone, reply);

    if (res == NULL) {
        /* nobody waits: what Redis reserved goes back */

        if (ok && reply->elts[0] == 1) {
            key.data = x->key;
            key.len = x->len;
            ngx_http_tb_zone_release(zone, &key, x->id, 0);
        }

        return;
    }

    res->cmd = NULL;

    if (ok) {
        ngx_memcpy(res->reply, reply->elts, sizeof(res->reply));
        res->state = reply->elts[0] ? NGX_HTTP_TB_RES_OK
                                    : NGX_HTTP_TB_RES_REFUSED;

    } else {
        res->state = NGX_HTTP_TB_RES_FAILED;
    }

    if (res->done) {
        res->done(res);
    }
}


/* the request stops waiting: replies still due will release */

void
ngx_http_tb_zone_detach(ngx_http_tb_reservation_t *res, ngx_uint_t nres)
{
    ngx_uint_t  i;

    for (i = 0; i < nres; i++) {
        if (res[i].cmd) {
            res[i].cmd->data = NULL;
            res[i].cmd = NULL;
            res[i].state = NGX_HTTP_TB_RES_FAILED;
        }
    }
}


/*
 * the decision once Redis has answered, or not: a reservation Redis
 * refused refuses the request, one it failed is decided by the zone's
 * fail=; then all are kept, or all given back
 */

ngx_int_t
ngx_http_tb_zone_conclude(ngx_http_request_t *r,
    ngx_http_tb_reservation_t *res, ngx_uint_t *nres,
    ngx_http_tb_refusal_t *refusal)
{
    int64_t                     used;
    uint64_t                    limit;
    ngx_int_t                   rc;
    ngx_uint_t                  i, n, refused;
    ngx_msec_t                  now;
    ngx_http_tb_zone_t         *zone;
    ngx_http_tb_node_t          node;
    ngx_http_tb_reservation_t  *rs;

    n = *nres;
    refused = 0;

    for (i = 0; i < n && !refused; i++) {
        rs = &res[i];
        zone = rs->zone;

        switch (rs->state) {

        case NGX_HTTP_TB_RES_OK:
            ngx_shmtx_lock(&zone->shpool->mutex);
            zone->sh->admitted++;
            ngx_shmtx_unlock(&zone->shpool->mutex);

            rs->counted = 1;

            /* the remaining tokens as Redis sees them */

            now = ngx_http_tb_zone_replied(zone, rs, &node);
            used = ngx_http_tb_zone_used(zone, &node, now);

            if (used < 0) {
                used = 0;
            }

            ngx_http_tb_zone_tightest(zone, &node, zone->limit, used, now,
                                      refusal);
            break;

        case NGX_HTTP_TB_RES_REFUSED:
            ngx_shmtx_lock(&zone->shpool->mutex);
            zone->sh->rejected++;
            ngx_shmtx_unlock(&zone->shpool->mutex);

            now = ngx_http_tb_zone_replied(zone, rs, &node);

            refusal->zone = zone;
            refusal->amount = rs->amount;
            refusal->retry = ngx_http_tb_zone_retry(zone, &node, rs->amount,
                                                    zone->limit, now);
            refused = 1;
            break;

        case NGX_HTTP_TB_RES_FAILED:

            /* the reservation the host made stays, decided anew */

            rs->state = NGX_HTTP_TB_RES_LOCAL;
            rs->pending = 1;

            switch (ngx_http_tb_zone_fallback(zone)) {

            case NGX_HTTP_TB_FAIL_CLOSED:
                refusal->zone = zone;
                refusal->unavailable = 1;
                refused = 1;
                break;

            case NGX_HTTP_TB_FAIL_OPEN:
                ngx_shmtx_lock(&zone->shpool->mutex);
                zone->sh->admitted++;
                zone->sh->fail_open++;
                ngx_shmtx_unlock(&zone->shpool->mutex);

                rs->counted = 1;
                break;

            default: /* NGX_HTTP_TB_FAIL_LOCAL */

                limit = zone->limit * zone->share / 100;
                now = ngx_http_tb_zone_clock(zone);

                ngx_shmtx_lock(&zone->shpool->mutex);

                /* take the host's own share out, and ask again */

                rs->node->reserved -= rs->amount;
                rs->node->inflight--;

                rc = ngx_http_tb_zone_take(zone, rs->node, rs->amount, limit,
                                           now, refusal);

                zone->sh->fail_local++;

                if (rc != NGX_OK) {
                    /* given back below, as the others */
                    rs->node->reserved += rs->amount;
                    rs->node->inflight++;
                    rs->pending = 0;
                    refused = 1;

                } else {
                    rs->counted = 1;
                }

                ngx_shmtx_unlock(&zone->shpool->mutex);
            }

            break;

        default:
            break;
        }
    }

    if (!refused) {
        return NGX_OK;
    }

    for (i = 0; i < n; i++) {
        ngx_http_tb_zone_settle(&res[i], 0, 0, 0);
    }

    *nres = 0;

    return NGX_DECLINED;
}


/* tells Redis what a reservation spent: 0 gives it back */

static void
ngx_http_tb_zone_release(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    uint64_t id, int64_t spent)
{
    u_char                     buf[2][NGX_INT64_LEN + 32];
    ngx_str_t                  argv[2];
    ngx_http_tb_zone_extra_t  *x;
    ngx_http_tb_redis_cmd_t   *cmd;

    argv[0] = ngx_http_tb_zone_id(zone, id, buf[0]);
    argv[1] = ngx_http_tb_zone_num(buf[1], spent);

    cmd = ngx_http_tb_zone_cmd(zone, &ngx_http_tb_script_settle, key, argv, 2);

    if (cmd == NULL) {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "token budget: %L tokens spent in token_budget_zone "
                      "\"%V\" are lost: no memory", spent,
                      &zone->shm_zone->shm.name);
        return;
    }

    x = ngx_http_tb_zone_extra(cmd);
    x->id = id;
    x->amount = spent;

    cmd->handler = ngx_http_tb_zone_settle_handler;
    cmd->abandon = ngx_http_tb_zone_settle_abandon;
    cmd->data = zone;

    if (ngx_http_tb_redis_send(cmd) != NGX_OK
        && ngx_http_tb_redis_park(cmd) != NGX_OK)
    {
        ngx_http_tb_redis_free(cmd);
    }
}


static void
ngx_http_tb_zone_settle_handler(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_http_tb_zone_t        *zone;
    ngx_http_tb_zone_extra_t  *x;

    x = ngx_http_tb_zone_extra(cmd);
    zone = x->zone;

    if (ngx_http_tb_zone_answered(zone, reply)) {

        if (reply->elts[0] == 0 && x->amount) {
            /* applied before, if sent again; or expired long ago */
            ngx_log_error(NGX_LOG_INFO, cmd->redis->log, 0,
                          "token budget: redis \"%V\" had no reservation "
                          "%016uxL-%uL of token_budget_zone \"%V\" to "
                          "settle %L tokens", &cmd->redis->name,
                          zone->sh->host, x->id, &zone->shm_zone->shm.name,
                          x->amount);
        }

        return;
    }

    if (reply->type == NGX_HTTP_TB_REDIS_ERROR) {
        ngx_log_error(NGX_LOG_ERR, cmd->redis->log, 0,
                      "token budget: redis \"%V\" failed a settle "
                      "in token_budget_zone \"%V\": %V",
                      &cmd->redis->name, &zone->shm_zone->shm.name,
                      &reply->str);
    }

    /* not known to be applied: sent again, Redis applies it once */

    (void) ngx_http_tb_redis_park(cmd);
}


/*
 * a worker exits with a settle Redis may not have seen: it is kept in the
 * zone, and another worker sends it, by the same reservation, so that
 * Redis applies it once
 */

static void
ngx_http_tb_zone_settle_abandon(ngx_http_tb_redis_cmd_t *cmd)
{
    ngx_str_t                  key;
    ngx_http_tb_node_t        *node;
    ngx_http_tb_zone_t        *zone;
    ngx_http_tb_parked_t      *pk;
    ngx_http_tb_zone_extra_t  *x;

    x = ngx_http_tb_zone_extra(cmd);
    zone = x->zone;

    if (x->amount == 0) {
        /* a release: the reservation expires by itself */
        return;
    }

    key.data = x->key;
    key.len = x->len;

    ngx_shmtx_lock(&zone->shpool->mutex);

    pk = ngx_slab_alloc_locked(zone->shpool,
                               offsetof(ngx_http_tb_parked_t, key) + key.len);

    if (pk) {
        pk->id = x->id;
        pk->spent = x->amount;
        pk->len = key.len;
        ngx_memcpy(pk->key, key.data, key.len);

        ngx_queue_insert_tail(&zone->sh->settles, &pk->queue);

        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    /* no room: a delta, counted again if Redis had seen the settle */

    node = ngx_http_tb_zone_get(zone, &key, ngx_http_tb_zone_clock(zone));

    if (node) {
        ngx_http_tb_zone_pend(zone, node, x->amount);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    if (node == NULL) {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "token budget: %L tokens spent in token_budget_zone "
                      "\"%V\" are lost: the zone is full", x->amount,
                      &zone->shm_zone->shm.name);
    }
}


/* sends the settles exiting workers left */

static void
ngx_http_tb_zone_unpark(ngx_http_tb_zone_t *zone)
{
    ngx_str_t              key;
    ngx_uint_t             n;
    ngx_queue_t           *q;
    ngx_http_tb_parked_t  *pk;

    for (n = 0; n < NGX_HTTP_TB_SYNC_BATCH; n++) {

        ngx_shmtx_lock(&zone->shpool->mutex);

        if (ngx_queue_empty(&zone->sh->settles)) {
            ngx_shmtx_unlock(&zone->shpool->mutex);
            return;
        }

        q = ngx_queue_head(&zone->sh->settles);
        ngx_queue_remove(q);

        ngx_shmtx_unlock(&zone->shpool->mutex);

        pk = ngx_queue_data(q, ngx_http_tb_parked_t, queue);

        key.data = pk->key;
        key.len = pk->len;

        ngx_http_tb_zone_release(zone, &key, pk->id, pk->spent);

        ngx_shmtx_lock(&zone->shpool->mutex);
        ngx_slab_free_locked(zone->shpool, pk);
        ngx_shmtx_unlock(&zone->shpool->mutex);
    }
}


ngx_int_t
ngx_http_tb_zone_init_process(ngx_http_tb_zone_t *zone, ngx_cycle_t *cycle)
{
    if (zone->redis == NULL) {
        return NGX_OK;
    }

    zone->sync_event.handler = ngx_http_tb_zone_sync_handler;
    zone->sync_event.data = zone;
    zone->sync_event.log = cycle->log;
    zone->sync_event.cancelable = 1;

    ngx_add_timer(&zone->sync_event, zone->sync);

    return NGX_OK;
}


void
ngx_http_tb_zone_exit_process(ngx_http_tb_zone_t *zone)
{
    if (zone->sync_event.timer_set) {
        ngx_del_timer(&zone->sync_event);
    }
}


/*
 * every "sync": one worker of the host tells Redis the deltas of the keys
 * on the dirty queue; in batched mode they also learn what the fleet spent
 */


static void
ngx_http_tb_zone_sync_handler(ngx_event_t *ev)
{
    u_char                     buf[3][NGX_INT64_LEN + 32];
    ngx_str_t                  key, argv[3];
    ngx_uint_t                 n, i;
    ngx_msec_t                 now;
    ngx_queue_t               *q, *next, todo;
    ngx_http_tb_node_t        *node;
    ngx_http_tb_sync_t        *sync;
    ngx_http_tb_zone_t        *zone;
    ngx_http_tb_redis_cmd_t   *cmd, *cmds[NGX_HTTP_TB_SYNC_BATCH];
    ngx_http_tb_zone_extra_t  *x;

    zone = ev->data;

    if (ngx_exiting) {
        return;
    }

    ngx_add_timer(ev, zone->sync);

    if (zone->redis->state != NGX_HTTP_TB_REDIS_UP) {
        return;
    }

    ngx_http_tb_zone_unpark(zone);

    now = ngx_current_msec;
    n = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    if ((ngx_msec_int_t) (now - zone->sh->sync_last)
        < (ngx_msec_int_t) (zone->sync / 2))
    {
        /* another worker's turn */
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    zone->sh->sync_last = now;
    zone->sh->syncs++;

    ngx_queue_init(&todo);

    for (q = ngx_queue_head(&zone->sh->dirty);
         q != ngx_queue_sentinel(&zone->sh->dirty)
         && n < NGX_HTTP_TB_SYNC_BATCH;
         q = next)
    {
        next = ngx_queue_next(q);

        sync = ngx_queue_data(q, ngx_http_tb_sync_t, dirty);

        if (sync->synced
            && (ngx_msec_int_t) (now - sync->synced)
               < (ngx_msec_int_t) (2 * zone->timeout + zone->sync))
        {
            /* told already, no answer yet */
            continue;
        }

        node = sync->node;

        ngx_queue_remove(q);

        if (sync->syncing == 0 && sync->pending == 0
            && zone->mode == NGX_HTTP_TB_REDIS_STRICT)
        {
            /* nothing to tell */
            node->dirty = 0;
            continue;
        }

        if (sync->syncing == 0) {
            sync->seq = ++zone->sh->seq;
            sync->syncing = sync->pending;
            sync->pending = 0;
        }

        sync->synced = now;

        ngx_queue_insert_tail(&todo, q);
        n++;
    }

    /* the commands: made under the lock, sent after it */

    i = 0;

    for (q = ngx_queue_head(&todo);
         q != ngx_queue_sentinel(&todo);
         q = next)
    {
        next = ngx_queue_next(q);

        sync = ngx_queue_data(q, ngx_http_tb_sync_t, dirty);
        node = sync->node;

        node->dirty = NGX_HTTP_TB_DIRTY_SYNCING;

        key.data = node->data;
        key.len = node->len;

        argv[0].data = buf[0];
        argv[0].len = ngx_sprintf(buf[0], "%016uxL", zone->sh->host)
                      - buf[0];
        argv[1] = ngx_http_tb_zone_num(buf[1], sync->seq);
        argv[2] = ngx_http_tb_zone_num(buf[2], sync->syncing);

        cmd = ngx_http_tb_zone_cmd(zone, &ngx_http_tb_script_sync, &key,
                                   argv, 3);

        if (cmd == NULL) {
            /* stays dirty, for the next round */
            sync->synced = 0;
            node->dirty = NGX_HTTP_TB_DIRTY_QUEUED;
            ngx_queue_remove(q);
            ngx_queue_insert_tail(&zone->sh->dirty, q);
            continue;
        }

        x = ngx_http_tb_zone_extra(cmd);
        x->seq = sync->seq;
        x->amount = sync->syncing;

        cmd->handler = ngx_http_tb_zone_synced;
        cmd->data = zone;

        cmds[i++] = cmd;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    for (n = 0; n < i; n++) {
        if (ngx_http_tb_redis_send(cmds[n]) != NGX_OK) {
            /* the reply handler puts it back */
            ngx_http_tb_redis_reply_t  reply;

            ngx_memzero(&reply, sizeof(ngx_http_tb_redis_reply_t));
            reply.type = NGX_HTTP_TB_REDIS_FAILED;

            cmds[n]->answered = 1;
            ngx_http_tb_zone_synced(cmds[n], &reply);
            ngx_http_tb_redis_free(cmds[n]);
        }
    }
}


static void
ngx_http_tb_zone_synced(ngx_http_tb_redis_cmd_t *cmd,
    ngx_http_tb_redis_reply_t *reply)
{
    ngx_str_t                  key;
    ngx_msec_t                 now;
    ngx_http_tb_node_t        *node;
    ngx_http_tb_sync_t        *sync;
    ngx_http_tb_zone_t        *zone;
    ngx_http_tb_zone_extra_t  *x;

    x = ngx_http_tb_zone_extra(cmd);
    zone = x->zone;

    key.data = x->key;
    key.len = x->len;

    if (reply->type == NGX_HTTP_TB_REDIS_ERROR) {
        ngx_log_error(NGX_LOG_ERR, cmd->redis->log, 0,
                      "token budget: redis \"%V\" failed a sync "
                      "in token_budget_zone \"%V\": %V",
                      &cmd->redis->name, &zone->shm_zone->shm.name,
                      &reply->str);
    }

    ngx_shmtx_lock(&zone->shpool->mutex);

    node = ngx_http_tb_zone_lookup(zone, &key,
                                   ngx_crc32_short(key.data, key.len));

    if (node == NULL) {
        /* cannot be: a node with a delta is kept */
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    sync = ngx_http_tb_node_sync(node);

    if (sync->seq != x->seq) {
        /* an older round's answer */
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    if (reply->type != NGX_HTTP_TB_REDIS_ARRAY || reply->nelts != 5) {
        /* told again next round, with the same sequence number */

        zone->sh->redis_errors++;
        sync->synced = 0;

        if (!(node->dirty & NGX_HTTP_TB_DIRTY_QUEUED)) {
            ngx_queue_insert_tail(&zone->sh->dirty, &sync->dirty);
        }

        node->dirty = NGX_HTTP_TB_DIRTY_QUEUED;

        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    zone->sh->clock = reply->elts[1] - ngx_http_tb_zone_now();
    zone->sh->pending -= sync->syncing;
    zone->sh->flushed += sync->syncing;

    sync->syncing = 0;
    sync->synced = 0;
    node->dirty &= ~NGX_HTTP_TB_DIRTY_SYNCING;

    if (sync->pending && !(node->dirty & NGX_HTTP_TB_DIRTY_QUEUED)) {
        /* spent while a delta sent before was told again */
        node->dirty |= NGX_HTTP_TB_DIRTY_QUEUED;
        ngx_queue_insert_tail(&zone->sh->dirty, &sync->dirty);
    }

    if (zone->mode == NGX_HTTP_TB_REDIS_BATCHED) {
        /* the fleet's spending, and this host's not told yet */

        now = reply->elts[1];

        node->window = now - now % zone->period;
        node->prev = reply->elts[2];
        node->curr = reply->elts[3] + sync->pending;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


/* one key's state, for the API: NGX_DECLINED when the key is unknown */

ngx_int_t
ngx_http_tb_zone_key(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    ngx_http_tb_key_state_t *st, ngx_uint_t op, int64_t credit)
{
    uint32_t             hash;
    ngx_msec_t           now;
    ngx_http_tb_node_t  *node;

    now = ngx_http_tb_zone_clock(zone);
    hash = ngx_crc32_short(key->data, key->len);

    ngx_shmtx_lock(&zone->shpool->mutex);

    node = ngx_http_tb_zone_lookup(zone, key, hash);

    if (node == NULL && op == NGX_HTTP_TB_KEY_TOPUP) {
        node = ngx_http_tb_zone_create(zone, key, hash, now);

        if (node == NULL) {
            zone->sh->full++;
            ngx_shmtx_unlock(&zone->shpool->mutex);
            return NGX_ERROR;
        }
    }

    if (node == NULL) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return NGX_DECLINED;
    }

    ngx_http_tb_zone_roll(zone, node, now);

    if (op == NGX_HTTP_TB_KEY_RESET) {
        node->prev = 0;
        node->curr = 0;

    } else if (op == NGX_HTTP_TB_KEY_TOPUP) {
        node->curr -= credit;
    }

    st->used = ngx_http_tb_zone_used(zone, node, now);
    st->reserved = node->reserved;
    st->inflight = node->inflight;
    st->remaining = (int64_t) zone->limit - st->used - node->reserved;

    if (st->remaining < 0) {
        st->remaining = 0;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return NGX_OK;
}


/* the keys using most, for the API */

ngx_uint_t
ngx_http_tb_zone_top(ngx_http_tb_zone_t *zone, ngx_pool_t *pool,
    ngx_http_tb_top_t *top, ngx_uint_t max)
{
    int64_t              used;
    ngx_uint_t           n, i, j;
    ngx_msec_t           now;
    ngx_queue_t         *q;
    ngx_http_tb_node_t  *node;

    now = ngx_http_tb_zone_clock(zone);
    n = 0;

    ngx_shmtx_lock(&zone->shpool->mutex);

    for (q = ngx_queue_head(&zone->sh->queue);
         q != ngx_queue_sentinel(&zone->sh->queue);
         q = ngx_queue_next(q))
    {
        node = ngx_queue_data(q, ngx_http_tb_node_t, queue);
        used = ngx_http_tb_zone_used(zone, node, now) + node->reserved;

        if (n == max && used <= top[n - 1].used) {
            continue;
        }

        i = (n < max) ? n++ : n - 1;

        /* keep the list sorted, most first */

        for (j = i; j > 0 && top[j - 1].used < used; j--) {
            top[j] = top[j - 1];
        }

        top[j].used = used;
        top[j].key.len = node->len;
        top[j].key.data = ngx_pnalloc(pool, node->len);

        if (top[j].key.data == NULL) {
            top[j].key.len = 0;
            continue;
        }

        ngx_memcpy(top[j].key.data, node->data, node->len);
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return n;
}
