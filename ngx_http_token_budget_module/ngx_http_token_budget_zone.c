
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
    ngx_http_tb_node_t *node, uint64_t amount, ngx_msec_t now);


/* wall clock milliseconds: windows follow the calendar */

ngx_msec_t
ngx_http_tb_zone_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (ngx_msec_t) tp->sec * 1000 + tp->msec;
}


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
    tn->inflight = 0;
    tn->window = now - now % zone->period;
    tn->prev = 0;
    tn->curr = 0;
    tn->reserved = 0;

    ngx_memcpy(tn->data, key->data, key->len);

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

        if (tn->inflight || tn->prev > 0 || tn->curr != 0) {
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
    uint64_t amount, ngx_msec_t now)
{
    int64_t   need, room;
    uint64_t  elapsed, start, at;

    elapsed = now % zone->period;
    start = now - elapsed;

    need = node->reserved + amount;
    room = (int64_t) zone->limit - need - node->curr;

    if (room >= 0 && node->prev > 0) {
        /* prev * (1 - f) <= room, f = 1 - room / prev */
        at = start + zone->period
             - (uint64_t) (room * (int64_t) zone->period / node->prev);

    } else if ((int64_t) zone->limit - need >= 0 && node->curr > 0) {
        room = (int64_t) zone->limit - need;
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
 * locked one at a time, and what a later zone refuses is given back
 */

#define ngx_http_tb_amount(zone, prompt, output)                              \
    ((zone)->count == NGX_HTTP_TB_COUNT_PROMPT ? (prompt)                     \
     : (zone)->count == NGX_HTTP_TB_COUNT_COMPLETION ? (output)               \
     : (prompt) + (output))


ngx_int_t
ngx_http_tb_zone_reserve(ngx_http_request_t *r, ngx_array_t *limits,
    uint64_t prompt, uint64_t output, ngx_http_tb_reservation_t *res,
    ngx_uint_t *nres, ngx_http_tb_refusal_t *refusal)
{
    int64_t                     used;
    uint64_t                    amount;
    uint32_t                    hash;
    ngx_str_t                   key;
    ngx_uint_t                  i, j, n;
    ngx_msec_t                  now;
    ngx_http_tb_zone_t         *zone, **zones;
    ngx_http_tb_node_t         *node;

    zones = limits->elts;
    now = ngx_http_tb_zone_now();
    n = 0;

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

        hash = ngx_crc32_short(key.data, key.len);

        ngx_shmtx_lock(&zone->shpool->mutex);

        node = ngx_http_tb_zone_lookup(zone, &key, hash);

        if (node == NULL) {
            node = ngx_http_tb_zone_create(zone, &key, hash, now);

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

        } else {
            ngx_queue_remove(&node->queue);
            ngx_queue_insert_head(&zone->sh->queue, &node->queue);
        }

        used = ngx_http_tb_zone_used(zone, node, now);

        if (used < 0) {
            used = 0;
        }

        if ((uint64_t) used + node->reserved + amount > zone->limit) {
            refusal->zone = zone;
            refusal->amount = amount;
            refusal->retry = ngx_http_tb_zone_retry(zone, node, amount, now);
            zone->sh->rejected++;

            ngx_shmtx_unlock(&zone->shpool->mutex);
            goto refused;
        }

        node->reserved += amount;
        node->inflight++;
        zone->sh->admitted++;

        if (refusal->tightest == NULL
            || (int64_t) (zone->limit - used - node->reserved)
               < refusal->remaining)
        {
            refusal->tightest = zone;
            refusal->remaining = zone->limit - used - node->reserved;
            refusal->limit = zone->limit;
            refusal->reset = (time_t) (((node->curr > 0 ? 2 : 1)
                                        * zone->period
                                        - now % zone->period + 999) / 1000);
        }

        ngx_shmtx_unlock(&zone->shpool->mutex);

        res[n].zone = zone;
        res[n].node = node;
        res[n].amount = amount;
        n++;
    }

    *nres = n;

    return NGX_OK;

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


/* replaces a reservation with what was spent; "admitted" == 0 undoes it */

void
ngx_http_tb_zone_settle(ngx_http_tb_reservation_t *res, uint64_t prompt,
    uint64_t output, ngx_uint_t admitted)
{
    uint64_t             spent;
    ngx_msec_t           now;
    ngx_http_tb_zone_t  *zone;

    zone = res->zone;
    spent = ngx_http_tb_amount(zone, prompt, output);
    now = ngx_http_tb_zone_now();

    ngx_shmtx_lock(&zone->shpool->mutex);

    res->node->reserved -= res->amount;
    res->node->inflight--;

    if (!admitted) {
        zone->sh->admitted--;
    }

    ngx_http_tb_zone_roll(zone, res->node, now);
    res->node->curr += spent;
    zone->sh->spent += spent;

    ngx_shmtx_unlock(&zone->shpool->mutex);

    res->zone = NULL;
}


/* one key's state, for the API: NGX_DECLINED when the key is unknown */

ngx_int_t
ngx_http_tb_zone_key(ngx_http_tb_zone_t *zone, ngx_str_t *key,
    ngx_http_tb_key_state_t *st, ngx_uint_t op, int64_t credit)
{
    uint32_t             hash;
    ngx_msec_t           now;
    ngx_http_tb_node_t  *node;

    now = ngx_http_tb_zone_now();
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

    now = ngx_http_tb_zone_now();
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
