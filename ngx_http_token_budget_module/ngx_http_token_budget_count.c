
/*
 * Copyright (C) The token budget authors
 *
 * Counting the prompt of a request body the way each API bills it.
 *
 * OpenAI chat (the published recipe): 3 tokens a message, 1 more for a
 * "name", every string value of the message, 3 priming the reply; tools
 * and functions by the published recipe for function definitions, and
 * whatever a definition holds beyond it counted as text.  Completions and
 * embeddings: the prompt or input, text or token ids.  Responses: the
 * instructions and input items as chat messages.  Anthropic: all text,
 * tool inputs and schemas with the model's encoding, an estimate.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_token_budget.h"


#define NGX_HTTP_TB_KEYS       1    /* count object keys too */
#define NGX_HTTP_TB_NUMBERS    2    /* count numbers as text */
#define NGX_HTTP_TB_NO_TYPE    4    /* skip the values of "type" */

#define NGX_HTTP_TB_IMAGE_PEEK  65536


static ngx_int_t ngx_http_tb_text(ngx_http_tb_count_t *c, u_char *p,
    size_t len, uint64_t *n);
static ngx_int_t ngx_http_tb_leaves(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *v, ngx_uint_t flags, uint64_t *n);
static ngx_int_t ngx_http_tb_members(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *obj, const char **skip, uint64_t *n);
static ngx_int_t ngx_http_tb_chat(ngx_http_tb_count_t *c);
static ngx_int_t ngx_http_tb_message(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *m, uint64_t *n);
static ngx_int_t ngx_http_tb_content(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *v, uint64_t *n);
static ngx_int_t ngx_http_tb_tools_field(ngx_http_tb_count_t *c,
    const char *name, uint64_t *n);
static ngx_int_t ngx_http_tb_tools(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *tools, uint64_t *n);
static ngx_int_t ngx_http_tb_function(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *fn, int64_t *n);
static ngx_int_t ngx_http_tb_completions(ngx_http_tb_count_t *c);
static ngx_int_t ngx_http_tb_embeddings(ngx_http_tb_count_t *c);
static ngx_int_t ngx_http_tb_input(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *v, const char *name, uint64_t *total);
static ngx_int_t ngx_http_tb_responses(ngx_http_tb_count_t *c);
static ngx_int_t ngx_http_tb_anthropic(ngx_http_tb_count_t *c);
static ngx_int_t ngx_http_tb_anthropic_content(ngx_http_tb_count_t *c,
    ngx_http_tb_json_t *v, uint64_t *n);
static ngx_int_t ngx_http_tb_output(ngx_http_tb_count_t *c,
    const char **fields);
static ngx_int_t ngx_http_tb_integer(ngx_http_tb_json_t *v, uint64_t max,
    uint64_t *n);
static ngx_int_t ngx_http_tb_image(ngx_http_tb_count_t *c,
    ngx_str_t *data, ngx_uint_t kind, uint64_t *n);
static ngx_int_t ngx_http_tb_image_size(u_char *p, size_t len,
    ngx_uint_t *w, ngx_uint_t *h);
static ngx_int_t ngx_http_tb_invalid(ngx_http_tb_count_t *c,
    const char *message);


static uint64_t ngx_http_tb_hash(u_char *p, size_t len);


/*
 * Counts of long strings, per worker: a conversation's history comes back
 * with every turn, and is counted once.  An entry is a 64-bit keyed hash,
 * the length and the encoding; a string only counts from here when all
 * three are equal.
 */

#define NGX_HTTP_TB_CACHE_SIZE  4096
#define NGX_HTTP_TB_CACHE_MIN   256

typedef struct {
    uint64_t             hash;
    size_t               len;
    tk_encoding_t       *enc;
    uint64_t             count;
} ngx_http_tb_cache_t;


static ngx_http_tb_cache_t  ngx_http_tb_cache[NGX_HTTP_TB_CACHE_SIZE];
static uint64_t             ngx_http_tb_hash_key;
static ngx_uint_t           ngx_http_tb_image_tokens;


ngx_http_tb_model_t *
ngx_http_tb_find_model(ngx_array_t *models, ngx_str_t *name)
{
    ngx_uint_t            i;
    ngx_http_tb_model_t  *m, *best;

    best = NULL;
    m = models->elts;

    for (i = 0; i < models->nelts; i++) {

        if (m[i].prefix) {
            if (name->len < m[i].pattern.len
                || ngx_strncmp(name->data, m[i].pattern.data,
                               m[i].pattern.len) != 0)
            {
                continue;
            }

        } else if (name->len != m[i].pattern.len
                   || ngx_strncmp(name->data, m[i].pattern.data,
                                  name->len) != 0)
        {
            continue;
        }

        if (best == NULL
            || m[i].pattern.len > best->pattern.len
            || (m[i].pattern.len == best->pattern.len && !m[i].prefix))
        {
            best = &m[i];
        }
    }

    return best;
}


ngx_int_t
ngx_http_tb_count_body(ngx_http_tb_count_t *c, ngx_array_t *models,
    ngx_uint_t image_tokens)
{
    ngx_int_t            rc;
    ngx_http_tb_json_t  *model;

    ngx_http_tb_image_tokens = image_tokens;

    if (c->root->type != NGX_HTTP_TB_JSON_OBJECT) {
        return ngx_http_tb_invalid(c, "the body must be a JSON object");
    }

    model = ngx_http_tb_json_get(c->root, "model");

    if (model == NULL) {
        return ngx_http_tb_invalid(c, "you must provide a model parameter");
    }

    if (model->type != NGX_HTTP_TB_JSON_STRING) {
        return ngx_http_tb_invalid(c, "\"model\" must be a string");
    }

    c->model_name = model->str;
    c->model = ngx_http_tb_find_model(models, &model->str);

    if (c->model == NULL) {
        c->error.status = NGX_HTTP_BAD_REQUEST;
        ngx_str_set(&c->error.code, "model_not_found");
        ngx_str_set(&c->error.message, "the model is not known here");
        return NGX_DECLINED;
    }

    c->choices = 1;

    switch (c->format) {

    case NGX_HTTP_TB_FORMAT_CHAT:
        rc = ngx_http_tb_chat(c);
        break;

    case NGX_HTTP_TB_FORMAT_COMPLETIONS:
        rc = ngx_http_tb_completions(c);
        break;

    case NGX_HTTP_TB_FORMAT_EMBEDDINGS:
        rc = ngx_http_tb_embeddings(c);
        break;

    case NGX_HTTP_TB_FORMAT_RESPONSES:
        rc = ngx_http_tb_responses(c);
        break;

    default: /* NGX_HTTP_TB_FORMAT_ANTHROPIC */
        rc = ngx_http_tb_anthropic(c);
        break;
    }

    if (rc != NGX_OK) {
        return rc;
    }

    if (c->model->estimate) {
        c->method |= NGX_HTTP_TB_ESTIMATE;
        c->prompt = (c->prompt * c->model->estimate + 99) / 100;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_text(ngx_http_tb_count_t *c, u_char *p, size_t len, uint64_t *n)
{
    int64_t               k;
    uint64_t              h;
    ngx_http_tb_cache_t  *e;

    if (len == 0) {
        return NGX_OK;
    }

    e = NULL;

    if (c->cache && len >= NGX_HTTP_TB_CACHE_MIN) {
        h = ngx_http_tb_hash(p, len);
        e = &ngx_http_tb_cache[h & (NGX_HTTP_TB_CACHE_SIZE - 1)];

        if (e->hash == h && e->len == len
            && e->enc == c->model->encoding->enc)
        {
            *n += e->count;
            return NGX_OK;
        }
    }

    k = tk_count(c->model->encoding->enc, p, len);

    if (k < 0) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                      "token budget: out of memory counting %uz bytes", len);
        return NGX_ERROR;
    }

    if (e) {
        e->hash = h;
        e->len = len;
        e->enc = c->model->encoding->enc;
        e->count = (uint64_t) k;
    }

    *n += (uint64_t) k;

    return NGX_OK;
}


/*
 * A 64-bit hash of a string, with a key drawn when the worker starts, so
 * that strings cannot be made to collide from outside.  Four lanes take
 * 32 bytes at a time, each independent of the others, so that the
 * multiplications overlap.
 */

static uint64_t
ngx_http_tb_hash(u_char *p, size_t len)
{
    uint64_t  h, h1, h2, h3, w, w1, w2, w3;

    if (ngx_http_tb_hash_key == 0) {
        ngx_http_tb_hash_key = ((uint64_t) ngx_random() << 32 | ngx_random())
                               | 1;
    }

    h = ngx_http_tb_hash_key ^ (len * 0x9e3779b97f4a7c15ULL);

    if (len >= 32) {
        h1 = h ^ 0x243f6a8885a308d3ULL;
        h2 = h ^ 0x13198a2e03707344ULL;
        h3 = h ^ 0xa4093822299f31d0ULL;

        do {
            ngx_memcpy(&w, p, 8);
            ngx_memcpy(&w1, p + 8, 8);
            ngx_memcpy(&w2, p + 16, 8);
            ngx_memcpy(&w3, p + 24, 8);

            h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
            h1 = (h1 ^ w1) * 0xbf58476d1ce4e5b9ULL;
            h2 = (h2 ^ w2) * 0xbf58476d1ce4e5b9ULL;
            h3 = (h3 ^ w3) * 0xbf58476d1ce4e5b9ULL;

            h ^= h >> 29;
            h1 ^= h1 >> 29;
            h2 ^= h2 >> 29;
            h3 ^= h3 >> 29;

            p += 32;
            len -= 32;

        } while (len >= 32);

        h = (h ^ h1) * 0x94d049bb133111ebULL;
        h ^= h >> 31;
        h = (h ^ h2) * 0x94d049bb133111ebULL;
        h ^= h >> 31;
        h = (h ^ h3) * 0x94d049bb133111ebULL;
        h ^= h >> 31;
    }

    while (len >= 8) {
        ngx_memcpy(&w, p, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
        p += 8;
        len -= 8;
    }

    w = 0;

    while (len) {
        w = w << 8 | p[--len];
    }

    h = (h ^ w) * 0x94d049bb133111ebULL;
    h ^= h >> 31;
    h = (h ^ ngx_http_tb_hash_key) * 0xbf58476d1ce4e5b9ULL;

    return h ^ (h >> 32);
}


static ngx_int_t
ngx_http_tb_leaves(ngx_http_tb_count_t *c, ngx_http_tb_json_t *v,
    ngx_uint_t flags, uint64_t *n)
{
    ngx_http_tb_json_t  *m;

    switch (v->type) {

    case NGX_HTTP_TB_JSON_STRING:
        return ngx_http_tb_text(c, v->str.data, v->str.len, n);

    case NGX_HTTP_TB_JSON_NUMBER:
        if (flags & NGX_HTTP_TB_NUMBERS) {
            return ngx_http_tb_text(c, v->str.data, v->str.len, n);
        }

        return NGX_OK;

    case NGX_HTTP_TB_JSON_ARRAY:
    case NGX_HTTP_TB_JSON_OBJECT:

        for (m = v->first; m; m = m->next) {

            if (v->type == NGX_HTTP_TB_JSON_OBJECT) {

                if ((flags & NGX_HTTP_TB_NO_TYPE)
                    && m->key.len == 4
                    && ngx_strncmp(m->key.data, "type", 4) == 0)
                {
                    continue;
                }

                if ((flags & NGX_HTTP_TB_KEYS)
                    && ngx_http_tb_text(c, m->key.data, m->key.len, n)
                       != NGX_OK)
                {
                    return NGX_ERROR;
                }
            }

            if (ngx_http_tb_leaves(c, m, flags, n) != NGX_OK) {
                return NGX_ERROR;
            }
        }

        return NGX_OK;

    default:
        return NGX_OK;
    }
}


/* the members of an object not named in "skip", keys and values as text */

static ngx_int_t
ngx_http_tb_members(ngx_http_tb_count_t *c, ngx_http_tb_json_t *obj,
    const char **skip, uint64_t *n)
{
    const char          **s;
    ngx_http_tb_json_t   *m;

    if (obj == NULL || obj->type != NGX_HTTP_TB_JSON_OBJECT) {
        return NGX_OK;
    }

    for (m = obj->first; m; m = m->next) {

        for (s = skip; *s; s++) {
            if (m->key.len == ngx_strlen(*s)
                && ngx_strncmp(m->key.data, *s, m->key.len) == 0)
            {
                break;
            }
        }

        if (*s) {
            continue;
        }

        if (ngx_http_tb_text(c, m->key.data, m->key.len, n) != NGX_OK
            || ngx_http_tb_leaves(c, m, NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NUMBERS,
                                  n)
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_chat(ngx_http_tb_count_t *c)
{
    uint64_t             n;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *messages, *m, *v;

    static const char   *output[] = {
        "max_completion_tokens", "max_tokens", NULL
    };

    messages = ngx_http_tb_json_get(c->root, "messages");

    if (messages == NULL || messages->type != NGX_HTTP_TB_JSON_ARRAY
        || messages->n == 0)
    {
        return ngx_http_tb_invalid(c,
                                  "\"messages\" must be a non-empty array");
    }

    n = 0;

    for (m = messages->first; m; m = m->next) {
        rc = ngx_http_tb_message(c, m, &n);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    n += 3;

    rc = ngx_http_tb_tools_field(c, "tools", &n);
    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_tb_tools_field(c, "functions", &n);
    if (rc != NGX_OK) {
        return rc;
    }

    /* a structured output schema is part of the prompt */

    v = ngx_http_tb_json_get(c->root, "response_format");

    if (v != NULL
        && ngx_http_tb_leaves(c, ngx_http_tb_json_get(v, "json_schema")
                                 ? ngx_http_tb_json_get(v, "json_schema") : v,
                              NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NO_TYPE, &n)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->prompt = n;

    return ngx_http_tb_output(c, output);
}


static ngx_int_t
ngx_http_tb_message(ngx_http_tb_count_t *c, ngx_http_tb_json_t *m,
    uint64_t *n)
{
    ngx_int_t            rc;
    ngx_http_tb_json_t  *f;

    if (m->type != NGX_HTTP_TB_JSON_OBJECT) {
        return ngx_http_tb_invalid(c, "each message must be an object");
    }

    *n += 3;

    for (f = m->first; f; f = f->next) {

        if (f->key.len == 4 && ngx_strncmp(f->key.data, "name", 4) == 0
            && f->type == NGX_HTTP_TB_JSON_STRING)
        {
            *n += 1;
        }

        if (f->key.len == 7 && ngx_strncmp(f->key.data, "content", 7) == 0) {
            rc = ngx_http_tb_content(c, f, n);

        } else {
            rc = ngx_http_tb_leaves(c, f, NGX_HTTP_TB_NO_TYPE, n);
        }

        if (rc != NGX_OK) {
            return rc;
        }
    }

    return NGX_OK;
}


/* message content: a string, or parts of text, images, audio and files */

static ngx_int_t
ngx_http_tb_content(ngx_http_tb_count_t *c, ngx_http_tb_json_t *v,
    uint64_t *n)
{
    ngx_int_t            rc;
    ngx_str_t            url;
    ngx_http_tb_json_t  *part, *type, *image, *u, *detail;

    if (v->type == NGX_HTTP_TB_JSON_STRING || v->type == NGX_HTTP_TB_JSON_NULL)
    {
        return ngx_http_tb_leaves(c, v, 0, n);
    }

    if (v->type != NGX_HTTP_TB_JSON_ARRAY) {
        return ngx_http_tb_invalid(c, "\"content\" must be a string "
                                      "or an array of parts");
    }

    for (part = v->first; part; part = part->next) {

        if (part->type != NGX_HTTP_TB_JSON_OBJECT) {
            return ngx_http_tb_invalid(c, "each content part must be "
                                          "an object");
        }

        type = ngx_http_tb_json_get(part, "type");

        if (ngx_http_tb_is(type, "image_url")
            || ngx_http_tb_is(type, "input_image"))
        {
            image = ngx_http_tb_json_get(part, "image_url");
            u = (image && image->type == NGX_HTTP_TB_JSON_OBJECT)
                ? ngx_http_tb_json_get(image, "url") : image;
            detail = ngx_http_tb_json_get(part, "detail");

            if (detail == NULL && image
                && image->type == NGX_HTTP_TB_JSON_OBJECT)
            {
                detail = ngx_http_tb_json_get(image, "detail");
            }

            ngx_str_null(&url);

            if (u && u->type == NGX_HTTP_TB_JSON_STRING) {
                url = u->str;
            }

            rc = ngx_http_tb_image(c, &url, ngx_http_tb_is(detail, "low"), n);

        } else if (ngx_http_tb_is(type, "input_audio")
                   || ngx_http_tb_is(type, "file")
                   || ngx_http_tb_is(type, "input_file"))
        {
            /* billed by duration or pages, not counted here */
            c->method |= NGX_HTTP_TB_ESTIMATE;
            rc = NGX_OK;

        } else {
            rc = ngx_http_tb_leaves(c, part, NGX_HTTP_TB_NO_TYPE, n);
        }

        if (rc != NGX_OK) {
            return rc;
        }
    }

    return NGX_OK;
}


/* the tool definitions under "name", when there are */

static ngx_int_t
ngx_http_tb_tools_field(ngx_http_tb_count_t *c, const char *name,
    uint64_t *n)
{
    ngx_http_tb_json_t  *v;

    v = ngx_http_tb_json_get(c->root, name);

    if (v == NULL || v->type == NGX_HTTP_TB_JSON_NULL) {
        return NGX_OK;
    }

    return ngx_http_tb_tools(c, v, n);
}


/*
 * tools by the published recipe for function definitions, with the
 * overheads of the GPT-4o family for o200k_base models and of GPT-4 and
 * GPT-3.5 for the others
 */

static ngx_int_t
ngx_http_tb_tools(ngx_http_tb_count_t *c, ngx_http_tb_json_t *tools,
    uint64_t *n)
{
    int64_t              k;
    uint64_t             extra;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *t, *fn;

    static const char   *skip[] = { "type", "function", NULL };

    if (tools->type != NGX_HTTP_TB_JSON_ARRAY) {
        return ngx_http_tb_invalid(c, "\"tools\" must be an array");
    }

    if (tools->n == 0) {
        return NGX_OK;
    }

    k = 0;
    extra = 0;

    for (t = tools->first; t; t = t->next) {

        if (t->type != NGX_HTTP_TB_JSON_OBJECT) {
            return ngx_http_tb_invalid(c, "each tool must be an object");
        }

        fn = ngx_http_tb_json_get(t, "function");

        if (fn != NULL && fn->type == NGX_HTTP_TB_JSON_OBJECT) {
            /* chat completions: {"type": "function", "function": {...}} */

            rc = ngx_http_tb_function(c, fn, &k);

            if (rc == NGX_OK) {
                rc = ngx_http_tb_members(c, t, skip, &extra);
            }

        } else if (ngx_http_tb_json_get(t, "name") != NULL) {
            /* functions, and Responses API function tools */
            rc = ngx_http_tb_function(c, t, &k);

        } else {
            rc = ngx_http_tb_leaves(c, t, NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NO_TYPE,
                                    &extra);
        }

        if (rc != NGX_OK) {
            return rc;
        }
    }

    if (k != 0) {
        /* the end of the function definitions */
        k += 12;
    }

    *n += (uint64_t) (k > 0 ? k : 0) + extra;

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_function(ngx_http_tb_count_t *c, ngx_http_tb_json_t *fn,
    int64_t *n)
{
    size_t               len;
    u_char              *line, *p;
    uint64_t             t;
    ngx_str_t            name, desc, type, pdesc;
    ngx_http_tb_json_t  *v, *params, *props, *prop, *e;

    static const char   *fn_skip[] = {
        "type", "name", "description", "parameters", "strict", NULL
    };
    static const char   *params_skip[] = {
        "type", "properties", "required", "additionalProperties", NULL
    };
    static const char   *prop_skip[] = {
        "type", "description", "enum", NULL
    };

    ngx_str_null(&name);
    ngx_str_null(&desc);

    v = ngx_http_tb_json_get(fn, "name");
    if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
        name = v->str;
    }

    v = ngx_http_tb_json_get(fn, "description");
    if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
        desc = v->str;
    }

    if (desc.len && desc.data[desc.len - 1] == '.') {
        desc.len--;
    }

    t = 0;

    line = ngx_pnalloc(c->pool, name.len + 1 + desc.len);
    if (line == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(line, name.data, name.len);
    *p++ = ':';
    p = ngx_cpymem(p, desc.data, desc.len);

    if (ngx_http_tb_text(c, line, p - line, &t) != NGX_OK) {
        return NGX_ERROR;
    }

    *n += (c->model->encoding->pattern == TK_PAT_O200K) ? 7 : 10;

    params = ngx_http_tb_json_get(fn, "parameters");
    props = ngx_http_tb_json_get(params, "properties");

    if (props && props->type == NGX_HTTP_TB_JSON_OBJECT && props->n) {
        *n += 3;

        for (prop = props->first; prop; prop = prop->next) {
            *n += 3;

            ngx_str_null(&type);
            ngx_str_null(&pdesc);

            v = ngx_http_tb_json_get(prop, "type");
            if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                type = v->str;

            } else if (v && ngx_http_tb_leaves(c, v, 0, &t) != NGX_OK) {
                return NGX_ERROR;
            }

            v = ngx_http_tb_json_get(prop, "description");
            if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
                pdesc = v->str;
            }

            if (pdesc.len && pdesc.data[pdesc.len - 1] == '.') {
                pdesc.len--;
            }

            v = ngx_http_tb_json_get(prop, "enum");

            if (v && v->type == NGX_HTTP_TB_JSON_ARRAY) {
                *n -= 3;

                for (e = v->first; e; e = e->next) {
                    *n += 3;

                    if (ngx_http_tb_leaves(c, e, NGX_HTTP_TB_NUMBERS, &t)
                        != NGX_OK)
                    {
                        return NGX_ERROR;
                    }
                }
            }

            len = prop->key.len + 1 + type.len + 1 + pdesc.len;

            line = ngx_pnalloc(c->pool, len);
            if (line == NULL) {
                return NGX_ERROR;
            }

            p = ngx_cpymem(line, prop->key.data, prop->key.len);
            *p++ = ':';
            p = ngx_cpymem(p, type.data, type.len);
            *p++ = ':';
            p = ngx_cpymem(p, pdesc.data, pdesc.len);

            if (ngx_http_tb_text(c, line, len, &t) != NGX_OK
                || ngx_http_tb_members(c, prop, prop_skip, &t) != NGX_OK)
            {
                return NGX_ERROR;
            }
        }
    }

    if (ngx_http_tb_members(c, params, params_skip, &t) != NGX_OK
        || ngx_http_tb_members(c, fn, fn_skip, &t) != NGX_OK)
    {
        return NGX_ERROR;
    }

    *n += (int64_t) t;

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_completions(ngx_http_tb_count_t *c)
{
    uint64_t             n, best;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *prompt, *v;

    static const char   *output[] = { "max_tokens", NULL };

    prompt = ngx_http_tb_json_get(c->root, "prompt");

    if (prompt == NULL) {
        return ngx_http_tb_invalid(c, "you must provide a prompt parameter");
    }

    n = 0;

    rc = ngx_http_tb_input(c, prompt, "prompt", &n);
    if (rc != NGX_OK) {
        return rc;
    }

    v = ngx_http_tb_json_get(c->root, "suffix");

    if (v && v->type == NGX_HTTP_TB_JSON_STRING
        && ngx_http_tb_text(c, v->str.data, v->str.len, &n) != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->prompt = n;

    rc = ngx_http_tb_output(c, output);
    if (rc != NGX_OK) {
        return rc;
    }

    v = ngx_http_tb_json_get(c->root, "best_of");

    if (v && v->type != NGX_HTTP_TB_JSON_NULL) {
        if (ngx_http_tb_integer(v, 128, &best) != NGX_OK || best == 0) {
            return ngx_http_tb_invalid(c, "\"best_of\" must be an integer "
                                          "from 1 to 128");
        }

        if (best > c->choices) {
            c->choices = best;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_embeddings(ngx_http_tb_count_t *c)
{
    uint64_t             n;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *input;

    input = ngx_http_tb_json_get(c->root, "input");

    if (input == NULL) {
        return ngx_http_tb_invalid(c, "you must provide an input parameter");
    }

    n = 0;

    rc = ngx_http_tb_input(c, input, "input", &n);
    if (rc != NGX_OK) {
        return rc;
    }

    c->prompt = n;
    c->output = 0;

    return NGX_OK;
}


/* a string, strings, token ids, or arrays of token ids */

static ngx_int_t
ngx_http_tb_input(ngx_http_tb_count_t *c, ngx_http_tb_json_t *v,
    const char *name, uint64_t *total)
{
    uint64_t             n, id;
    ngx_http_tb_json_t  *e, *t;

    if (v->type == NGX_HTTP_TB_JSON_STRING) {
        n = 0;

        if (ngx_http_tb_text(c, v->str.data, v->str.len, &n) != NGX_OK) {
            return NGX_ERROR;
        }

        *total += n;
        c->largest_input = ngx_max(c->largest_input, n);

        return NGX_OK;
    }

    if (v->type != NGX_HTTP_TB_JSON_ARRAY || v->n == 0) {
        goto invalid;
    }

    if (v->first->type == NGX_HTTP_TB_JSON_NUMBER) {
        /* one prompt of token ids */

        for (e = v->first; e; e = e->next) {
            if (ngx_http_tb_integer(e, 0xffffffff, &id) != NGX_OK) {
                goto invalid;
            }
        }

        *total += v->n;
        c->largest_input = ngx_max(c->largest_input, v->n);

        return NGX_OK;
    }

    for (e = v->first; e; e = e->next) {

        if (e->type == NGX_HTTP_TB_JSON_STRING) {
            n = 0;

            if (ngx_http_tb_text(c, e->str.data, e->str.len, &n) != NGX_OK) {
                return NGX_ERROR;
            }

        } else if (e->type == NGX_HTTP_TB_JSON_ARRAY && e->n > 0) {

            for (t = e->first; t; t = t->next) {
                if (ngx_http_tb_integer(t, 0xffffffff, &id) != NGX_OK) {
                    goto invalid;
                }
            }

            n = e->n;

        } else {
            goto invalid;
        }

        *total += n;
        c->largest_input = ngx_max(c->largest_input, n);
    }

    return NGX_OK;

invalid:

    c->error.status = NGX_HTTP_BAD_REQUEST;
    ngx_str_set(&c->error.code, "invalid_type");
    c->error.message.data = ngx_pnalloc(c->pool, 128);

    if (c->error.message.data == NULL) {
        return NGX_ERROR;
    }

    c->error.message.len = ngx_snprintf(c->error.message.data, 128,
                               "\"%s\" must be a string, an array of "
                               "strings, or token ids", name)
                           - c->error.message.data;

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_tb_responses(ngx_http_tb_count_t *c)
{
    uint64_t             n;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *v, *item;

    static const char   *output[] = { "max_output_tokens", NULL };

    n = 0;

    v = ngx_http_tb_json_get(c->root, "instructions");

    if (v && v->type == NGX_HTTP_TB_JSON_STRING) {
        n += 3;

        if (ngx_http_tb_text(c, v->str.data, v->str.len, &n) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    v = ngx_http_tb_json_get(c->root, "input");

    if (v == NULL) {
        return ngx_http_tb_invalid(c, "you must provide an input parameter");
    }

    if (v->type == NGX_HTTP_TB_JSON_STRING) {
        n += 3;

        if (ngx_http_tb_text(c, v->str.data, v->str.len, &n) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (v->type == NGX_HTTP_TB_JSON_ARRAY) {

        for (item = v->first; item; item = item->next) {
            rc = ngx_http_tb_message(c, item, &n);
            if (rc != NGX_OK) {
                return rc;
            }
        }

    } else {
        return ngx_http_tb_invalid(c, "\"input\" must be a string "
                                      "or an array of items");
    }

    n += 3;

    rc = ngx_http_tb_tools_field(c, "tools", &n);
    if (rc != NGX_OK) {
        return rc;
    }

    v = ngx_http_tb_json_get(c->root, "text");

    if (v != NULL
        && ngx_http_tb_leaves(c, v, NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NO_TYPE, &n)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->prompt = n;

    return ngx_http_tb_output(c, output);
}


static ngx_int_t
ngx_http_tb_anthropic(ngx_http_tb_count_t *c)
{
    uint64_t             n;
    ngx_int_t            rc;
    ngx_http_tb_json_t  *v, *m, *f;

    static const char   *output[] = { "max_tokens", NULL };

    c->method |= NGX_HTTP_TB_ESTIMATE;

    n = 0;

    v = ngx_http_tb_json_get(c->root, "system");

    if (v != NULL && v->type != NGX_HTTP_TB_JSON_NULL) {
        rc = ngx_http_tb_anthropic_content(c, v, &n);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    v = ngx_http_tb_json_get(c->root, "messages");

    if (v == NULL || v->type != NGX_HTTP_TB_JSON_ARRAY || v->n == 0) {
        return ngx_http_tb_invalid(c,
                                  "\"messages\" must be a non-empty array");
    }

    for (m = v->first; m; m = m->next) {

        if (m->type != NGX_HTTP_TB_JSON_OBJECT) {
            return ngx_http_tb_invalid(c, "each message must be an object");
        }

        n += 3;

        for (f = m->first; f; f = f->next) {
            if (f->key.len == 7 && ngx_strncmp(f->key.data, "content", 7) == 0)
            {
                rc = ngx_http_tb_anthropic_content(c, f, &n);

            } else {
                rc = ngx_http_tb_leaves(c, f, 0, &n);
            }

            if (rc != NGX_OK) {
                return rc;
            }
        }
    }

    v = ngx_http_tb_json_get(c->root, "tools");

    if (v != NULL
        && ngx_http_tb_leaves(c, v, NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NUMBERS, &n)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->prompt = n;

    return ngx_http_tb_output(c, output);
}


static ngx_int_t
ngx_http_tb_anthropic_content(ngx_http_tb_count_t *c, ngx_http_tb_json_t *v,
    uint64_t *n)
{
    ngx_int_t            rc;
    ngx_http_tb_json_t  *b, *type, *source, *data;

    if (v->type == NGX_HTTP_TB_JSON_STRING) {
        return ngx_http_tb_text(c, v->str.data, v->str.len, n);
    }

    if (v->type != NGX_HTTP_TB_JSON_ARRAY) {
        return ngx_http_tb_invalid(c, "\"content\" must be a string "
                                      "or an array of blocks");
    }

    for (b = v->first; b; b = b->next) {

        if (b->type != NGX_HTTP_TB_JSON_OBJECT) {
            return ngx_http_tb_invalid(c, "each content block must be "
                                          "an object");
        }

        type = ngx_http_tb_json_get(b, "type");

        if (ngx_http_tb_is(type, "image")) {
            source = ngx_http_tb_json_get(b, "source");
            data = ngx_http_tb_json_get(source, "data");

            rc = ngx_http_tb_image(c, (data
                                       && data->type
                                          == NGX_HTTP_TB_JSON_STRING)
                                      ? &data->str : NULL,
                                   2, n);

        } else if (ngx_http_tb_is(type, "document")) {
            rc = NGX_OK;

        } else if (ngx_http_tb_is(type, "tool_use")) {
            rc = ngx_http_tb_leaves(c, b, NGX_HTTP_TB_KEYS|NGX_HTTP_TB_NUMBERS
                                          |NGX_HTTP_TB_NO_TYPE, n);

        } else if (ngx_http_tb_is(type, "tool_result")) {
            data = ngx_http_tb_json_get(b, "content");
            rc = data ? ngx_http_tb_anthropic_content(c, data, n) : NGX_OK;

        } else {
            rc = ngx_http_tb_leaves(c, b, NGX_HTTP_TB_NO_TYPE, n);
        }

        if (rc != NGX_OK) {
            return rc;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_output(ngx_http_tb_count_t *c, const char **fields)
{
    uint64_t             n;
    ngx_http_tb_json_t  *v;

    c->output = 0;

    for ( /* void */ ; *fields; fields++) {
        v = ngx_http_tb_json_get(c->root, *fields);

        if (v == NULL || v->type == NGX_HTTP_TB_JSON_NULL) {
            continue;
        }

        if (ngx_http_tb_integer(v, 0x7fffffff, &n) != NGX_OK) {
            c->error.status = NGX_HTTP_BAD_REQUEST;
            ngx_str_set(&c->error.code, "invalid_value");
            c->error.message.data = ngx_pnalloc(c->pool, 128);

            if (c->error.message.data == NULL) {
                return NGX_ERROR;
            }

            c->error.message.len = ngx_snprintf(c->error.message.data, 128,
                                       "\"%s\" must be a non-negative "
                                       "integer", *fields)
                                   - c->error.message.data;
            return NGX_DECLINED;
        }

        c->output = n;
        c->output_field = v;

        break;
    }

    v = ngx_http_tb_json_get(c->root, "n");

    if (v && v->type != NGX_HTTP_TB_JSON_NULL) {
        if (ngx_http_tb_integer(v, 128, &n) != NGX_OK || n == 0) {
            return ngx_http_tb_invalid(c, "\"n\" must be an integer "
                                          "from 1 to 128");
        }

        c->choices = n;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_integer(ngx_http_tb_json_t *v, uint64_t max, uint64_t *n)
{
    size_t    i;
    uint64_t  k;

    if (v->type != NGX_HTTP_TB_JSON_NUMBER || v->str.len == 0
        || v->str.len > 12)
    {
        return NGX_ERROR;
    }

    k = 0;

    for (i = 0; i < v->str.len; i++) {
        if (v->str.data[i] < '0' || v->str.data[i] > '9') {
            return NGX_ERROR;
        }

        k = k * 10 + (v->str.data[i] - '0');
    }

    if (k > max) {
        return NGX_ERROR;
    }

    *n = k;

    return NGX_OK;
}


/*
 * Images.  OpenAI (the published formula for GPT-4o and GPT-4.1): 85 tokens
 * at low detail; else fit in 2048 x 2048, scale the short side down to 768,
 * and 170 tokens a 512 px tile plus 85.  Anthropic (kind 2): fit the long
 * side in 1568 px, width x height / 750, at most 1600.  Sizes are read
 * from a base64 data URL's image header; without it, the configured bound
 * counts.
 */

static ngx_int_t
ngx_http_tb_image(ngx_http_tb_count_t *c, ngx_str_t *data, ngx_uint_t kind,
    uint64_t *n)
{
    u_char      *p, *comma, *buf;
    size_t       len;
    ngx_str_t    src, dst;
    ngx_uint_t   w, h, s, tiles;

    if (kind == 1) {
        *n += 85;
        return NGX_OK;
    }

    if (data == NULL || data->len == 0) {
        goto bound;
    }

    p = data->data;
    len = data->len;

    if (len > 5 && ngx_strncmp(p, "data:", 5) == 0) {
        comma = ngx_strlchr(p, p + len, ',');

        if (comma == NULL || comma - p < 7
            || ngx_strncmp(comma - 7, ";base64", 7) != 0)
        {
            goto bound;
        }

        len -= comma + 1 - p;
        p = comma + 1;

    } else if (kind != 2) {
        /* an URL: the image is fetched upstream */
        goto bound;
    }

    src.data = p;
    src.len = ngx_min(len, NGX_HTTP_TB_IMAGE_PEEK) & ~(size_t) 3;

    buf = ngx_pnalloc(c->pool, ngx_base64_decoded_length(src.len));
    if (buf == NULL) {
        return NGX_ERROR;
    }

    dst.data = buf;

    if (ngx_decode_base64(&dst, &src) != NGX_OK
        || ngx_http_tb_image_size(dst.data, dst.len, &w, &h) != NGX_OK
        || w == 0 || h == 0)
    {
        goto bound;
    }

    if (kind == 2) {
        if (w > 1568 || h > 1568) {
            s = ngx_max(w, h);
            w = w * 1568 / s;
            h = h * 1568 / s;
        }

        *n += ngx_min((w * h + 749) / 750, 1600);
        return NGX_OK;
    }

    if (w > 2048 || h > 2048) {
        s = ngx_max(w, h);
        w = w * 2048 / s;
        h = h * 2048 / s;
    }

    if (w > 768 && h > 768) {
        s = ngx_min(w, h);
        w = w * 768 / s;
        h = h * 768 / s;
    }

    tiles = ((w + 511) / 512) * ((h + 511) / 512);
    *n += 170 * tiles + 85;

    return NGX_OK;

bound:

    c->method |= NGX_HTTP_TB_IMAGE_BOUND;
    c->image_bound = 1;
    *n += ngx_http_tb_image_tokens;

    return NGX_OK;
}


static ngx_int_t
ngx_http_tb_image_size(u_char *p, size_t len, ngx_uint_t *w, ngx_uint_t *h)
{
    size_t  i, seg;

    /* PNG: the IHDR chunk comes first */

    if (len >= 24 && ngx_memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0
        && ngx_memcmp(p + 12, "IHDR", 4) == 0)
    {
        *w = (p[16] << 24) | (p[17] << 16) | (p[18] << 8) | p[19];
        *h = (p[20] << 24) | (p[21] << 16) | (p[22] << 8) | p[23];
        return NGX_OK;
    }

    /* GIF */

    if (len >= 10 && ngx_memcmp(p, "GIF8", 4) == 0) {
        *w = p[6] | (p[7] << 8);
        *h = p[8] | (p[9] << 8);
        return NGX_OK;
    }

    /* WebP: VP8X, VP8L or VP8 */

    if (len >= 30 && ngx_memcmp(p, "RIFF", 4) == 0
        && ngx_memcmp(p + 8, "WEBP", 4) == 0)
    {
        if (ngx_memcmp(p + 12, "VP8X", 4) == 0) {
            *w = 1 + (p[24] | (p[25] << 8) | (p[26] << 16));
            *h = 1 + (p[27] | (p[28] << 8) | (p[29] << 16));
            return NGX_OK;
        }

        if (ngx_memcmp(p + 12, "VP8L", 4) == 0 && p[20] == 0x2f) {
            *w = 1 + (p[21] | ((p[22] & 0x3f) << 8));
            *h = 1 + ((p[22] >> 6) | (p[23] << 2) | ((p[24] & 0x0f) << 10));
            return NGX_OK;
        }

        if (ngx_memcmp(p + 12, "VP8 ", 4) == 0) {
            *w = (p[26] | (p[27] << 8)) & 0x3fff;
            *h = (p[28] | (p[29] << 8)) & 0x3fff;
            return NGX_OK;
        }

        return NGX_DECLINED;
    }

    /* JPEG: walk the segments to a start of frame */

    if (len >= 4 && p[0] == 0xff && p[1] == 0xd8) {
        i = 2;

        while (i + 9 < len) {
            if (p[i] != 0xff) {
                return NGX_DECLINED;
            }

            if (p[i + 1] == 0xff) {
                i++;
                continue;
            }

            if (p[i + 1] >= 0xc0 && p[i + 1] <= 0xcf
                && p[i + 1] != 0xc4 && p[i + 1] != 0xc8 && p[i + 1] != 0xcc)
            {
                *h = (p[i + 5] << 8) | p[i + 6];
                *w = (p[i + 7] << 8) | p[i + 8];
                return NGX_OK;
            }

            seg = (p[i + 2] << 8) | p[i + 3];

            if (seg < 2) {
                return NGX_DECLINED;
            }

            i += 2 + seg;
        }
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_tb_invalid(ngx_http_tb_count_t *c, const char *message)
{
    c->error.status = NGX_HTTP_BAD_REQUEST;
    ngx_str_set(&c->error.code, "invalid_request");
    c->error.message.data = (u_char *) message;
    c->error.message.len = ngx_strlen(message);

    return NGX_DECLINED;
}


ngx_uint_t
ngx_http_tb_is(ngx_http_tb_json_t *v, const char *s)
{
    size_t  len;

    if (v == NULL || v->type != NGX_HTTP_TB_JSON_STRING) {
        return 0;
    }

    len = ngx_strlen(s);

    return v->str.len == len && ngx_strncmp(v->str.data, s, len) == 0;
}
