
/*
 * Copyright (C) The token budget authors
 *
 * Loading a vocabulary in tiktoken's format, one "base64-token rank" pair
 * a line, and the entry points: count, encode, decode.
 */


#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <sys/stat.h>

#include "tk_internal.h"


#define TK_MAX_RANK   (1U << 20)
#define TK_MAX_FILE   (256L * 1024 * 1024)


typedef struct {
    uint32_t              rank;
    uint32_t              len;        /* of the base64 text */
    const unsigned char  *b64;
} tk_line_t;


typedef struct {
    const char           *name;
    tk_pattern_e          pattern;
} tk_pattern_name_t;


typedef struct {
    const char           *prefix;
    const char           *encoding;
} tk_model_t;


static void *tk_default_alloc(void *data, size_t size);
static void tk_default_free(void *data, void *p);
static int tk_line_cmp(const void *a, const void *b);
static int tk_b64_value(unsigned char c);
static int tk_b64_decode(const unsigned char *src, size_t len,
    unsigned char *dst, size_t *n);
static int tk_table_add(tk_encoding_t *enc, uint32_t id);


static tk_pattern_name_t  tk_patterns[] = {
    { "r50k_base", TK_PAT_R50K },
    { "p50k_base", TK_PAT_R50K },
    { "p50k_edit", TK_PAT_R50K },
    { "gpt2", TK_PAT_R50K },
    { "cl100k_base", TK_PAT_CL100K },
    { "o200k_base", TK_PAT_O200K },
    { "o200k_harmony", TK_PAT_O200K },
    { NULL, 0 }
};


/*
 * tiktoken's encoding_for_model(): whole names first, then prefixes
 * (a name ending in '-' or ':' is a prefix), first match wins
 */

static tk_model_t  tk_models[] = {
    { "gpt-5", "o200k_base" },
    { "gpt-4.5", "o200k_base" },
    { "gpt-4.1", "o200k_base" },
    { "gpt-4o", "o200k_base" },
    { "chatgpt-4o-latest", "o200k_base" },
    { "o1", "o200k_base" },
    { "o3", "o200k_base" },
    { "o4-mini", "o200k_base" },
    { "gpt-4", "cl100k_base" },
    { "gpt-3.5-turbo", "cl100k_base" },
    { "gpt-3.5", "cl100k_base" },
    { "gpt-35-turbo", "cl100k_base" },
    { "davinci-002", "cl100k_base" },
    { "babbage-002", "cl100k_base" },
    { "text-embedding-ada-002", "cl100k_base" },
    { "text-embedding-3-small", "cl100k_base" },
    { "text-embedding-3-large", "cl100k_base" },
    { "text-davinci-003", "p50k_base" },
    { "text-davinci-002", "p50k_base" },
    { "text-davinci-001", "r50k_base" },
    { "text-curie-001", "r50k_base" },
    { "text-babbage-001", "r50k_base" },
    { "text-ada-001", "r50k_base" },
    { "davinci", "r50k_base" },
    { "curie", "r50k_base" },
    { "babbage", "r50k_base" },
    { "ada", "r50k_base" },
    { "code-davinci-002", "p50k_base" },
    { "code-davinci-001", "p50k_base" },
    { "code-cushman-002", "p50k_base" },
    { "code-cushman-001", "p50k_base" },
    { "davinci-codex", "p50k_base" },
    { "cushman-codex", "p50k_base" },
    { "text-davinci-edit-001", "p50k_edit" },
    { "code-davinci-edit-001", "p50k_edit" },
    { "text-similarity-davinci-001", "r50k_base" },
    { "text-similarity-curie-001", "r50k_base" },
    { "text-similarity-babbage-001", "r50k_base" },
    { "text-similarity-ada-001", "r50k_base" },
    { "text-search-davinci-doc-001", "r50k_base" },
    { "text-search-curie-doc-001", "r50k_base" },
    { "text-search-babbage-doc-001", "r50k_base" },
    { "text-search-ada-doc-001", "r50k_base" },
    { "code-search-babbage-code-001", "r50k_base" },
    { "code-search-ada-code-001", "r50k_base" },
    { "gpt2", "gpt2" },
    { "gpt-2", "gpt2" },

    { "o1-", "o200k_base" },
    { "o3-", "o200k_base" },
    { "o4-mini-", "o200k_base" },
    { "gpt-5-", "o200k_base" },
    { "gpt-4.5-", "o200k_base" },
    { "gpt-4.1-", "o200k_base" },
    { "chatgpt-4o-", "o200k_base" },
    { "gpt-4o-", "o200k_base" },
    { "gpt-oss-", "o200k_harmony" },
    { "gpt-4-", "cl100k_base" },
    { "gpt-3.5-turbo-", "cl100k_base" },
    { "gpt-35-turbo-", "cl100k_base" },
    { "ft:gpt-4o", "o200k_base" },
    { "ft:gpt-4", "cl100k_base" },
    { "ft:gpt-3.5-turbo", "cl100k_base" },
    { "ft:davinci-002", "cl100k_base" },
    { "ft:babbage-002", "cl100k_base" },
    { NULL, NULL }
};


static const tk_allocator_t  tk_default_allocator = {
    tk_default_alloc, tk_default_free, NULL
};


int
tk_pattern_by_name(const char *name, tk_pattern_e *pattern)
{
    tk_pattern_name_t  *p;

    for (p = tk_patterns; p->name != NULL; p++) {
        if (strcmp(p->name, name) == 0) {
            *pattern = p->pattern;
            return TK_OK;
        }
    }

    return TK_ERROR;
}


const char *
tk_encoding_for_model(const char *model)
{
    size_t       n;
    tk_model_t  *m;

    for (m = tk_models; m->prefix != NULL; m++) {
        n = strlen(m->prefix);

        if (m->prefix[n - 1] == '-' || strncmp(m->prefix, "ft:", 3) == 0) {
            continue;
        }

        if (strcmp(m->prefix, model) == 0) {
            return m->encoding;
        }
    }

    for (m = tk_models; m->prefix != NULL; m++) {
        n = strlen(m->prefix);

        if (m->prefix[n - 1] != '-' && strncmp(m->prefix, "ft:", 3) != 0) {
            continue;
        }

        if (strncmp(m->prefix, model, n) == 0) {
            return m->encoding;
        }
    }

    return NULL;
}


tk_encoding_t *
tk_encoding_load(const char *path, tk_pattern_e pattern,
    const tk_allocator_t *allocator, char *err, size_t errlen)
{
    long            size;
    FILE           *f;
    size_t          n;
    struct stat     st;
    unsigned char  *data;
    tk_encoding_t  *enc;

    if (allocator == NULL) {
        allocator = &tk_default_allocator;
    }

    f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "cannot open \"%s\": %s", path, strerror(errno));
        return NULL;
    }

    if (fstat(fileno(f), &st) != 0) {
        snprintf(err, errlen, "cannot read \"%s\": %s", path, strerror(errno));
        fclose(f);
        return NULL;
    }

    if (!S_ISREG(st.st_mode) || st.st_size > TK_MAX_FILE) {
        snprintf(err, errlen, "\"%s\" is not a vocabulary file", path);
        fclose(f);
        return NULL;
    }

    size = (long) st.st_size;

    data = tk_alloc(allocator, size + 1);
    if (data == NULL) {
        snprintf(err, errlen, "out of memory reading \"%s\"", path);
        fclose(f);
        return NULL;
    }

    n = fread(data, 1, size, f);

    if (n != (size_t) size || ferror(f)) {
        snprintf(err, errlen, "cannot read \"%s\"", path);
        tk_free(allocator, data);
        fclose(f);
        return NULL;
    }

    fclose(f);

    enc = tk_encoding_parse(data, n, pattern, allocator, err, errlen);

    tk_free(allocator, data);

    return enc;
}


tk_encoding_t *
tk_encoding_parse(const unsigned char *data, size_t len, tk_pattern_e pattern,
    const tk_allocator_t *allocator, char *err, size_t errlen)
{
    int                   sorted, rc;
    size_t                nlines, i, line, total, n, tlen;
    uint32_t              id, rank;
    tk_line_t            *lines;
    tk_encoding_t        *enc;
    const unsigned char  *p, *end, *eol, *sp;

    if (allocator == NULL) {
        allocator = &tk_default_allocator;
    }

    enc = tk_alloc(allocator, sizeof(tk_encoding_t));
    if (enc == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }

    memset(enc, 0, sizeof(tk_encoding_t));
    enc->pattern = pattern;
    enc->allocator = *allocator;
    lines = NULL;

    nlines = 0;
    end = data + len;

    for (p = data; p < end; p++) {
        if (*p == '\n') {
            nlines++;
        }
    }

    nlines++;

    lines = tk_alloc(allocator, nlines * sizeof(tk_line_t));
    if (lines == NULL) {
        snprintf(err, errlen, "out of memory");
        goto failed;
    }

    /* the lines: "base64 rank" */

    n = 0;
    total = 0;
    sorted = 1;
    line = 0;

    for (p = data; p < end; p = eol + 1) {
        line++;

        eol = memchr(p, '\n', end - p);
        if (eol == NULL) {
            eol = end;
        }

        if (eol == p || (eol - p == 1 && *p == '\r')) {
            continue;
        }

        sp = memchr(p, ' ', eol - p);

        if (sp == NULL || sp == p || (sp - p) % 4 != 0 || sp + 1 >= eol) {
            snprintf(err, errlen, "invalid vocabulary line %zu", line);
            goto failed;
        }

        rank = 0;

        for (i = 1; sp + i < eol && sp[i] != '\r'; i++) {
            if (sp[i] < '0' || sp[i] > '9' || rank >= TK_MAX_RANK) {
                snprintf(err, errlen, "invalid rank in vocabulary line %zu",
                         line);
                goto failed;
            }

            rank = rank * 10 + (sp[i] - '0');
        }

        if (i == 1 || rank >= TK_MAX_RANK) {
            snprintf(err, errlen, "invalid rank in vocabulary line %zu",
                     line);
            goto failed;
        }

        if (n > 0 && rank <= lines[n - 1].rank) {
            sorted = 0;
        }

        lines[n].rank = rank;
        lines[n].len = sp - p;
        lines[n].b64 = p;
        total += (sp - p) / 4 * 3;
        n++;

        if (rank + 1 > enc->nids) {
            enc->nids = rank + 1;
        }
    }

    if (n < 256) {
        snprintf(err, errlen, "vocabulary has %zu tokens, too few", n);
        goto failed;
    }

    if (!sorted) {
        qsort(lines, n, sizeof(tk_line_t), tk_line_cmp);
    }

    enc->ntokens = n;
    enc->bytes = tk_alloc(allocator, total + 1);
    enc->offset = tk_alloc(allocator, (enc->nids + 1) * sizeof(uint32_t));
    enc->present = tk_alloc(allocator, enc->nids);

    for (enc->mask = 1023; enc->mask < 2 * n; enc->mask = enc->mask * 2 + 1) {
        /* void */
    }

    enc->table = tk_alloc(allocator, (enc->mask + 1) * sizeof(tk_slot_t));
    enc->pair_rank = tk_alloc(allocator, 65536 * sizeof(uint32_t));
    enc->key = tk_alloc(allocator, enc->nids * sizeof(uint64_t));

    /* the filter: about 40 bits a token, 2% false positives */

    for (enc->filter_shift = 32 - 16;
         (1U << (32 - enc->filter_shift)) < 40 * n && enc->filter_shift > 8;
         enc->filter_shift--)
    {
        /* void */
    }

    enc->filter = tk_alloc(allocator, ((size_t) 1 << (32 - enc->filter_shift))
                                      / 8);

    if (enc->key == NULL || enc->filter == NULL || enc->bytes == NULL
        || enc->offset == NULL || enc->present == NULL
        || enc->table == NULL || enc->pair_rank == NULL)
    {
        snprintf(err, errlen, "out of memory");
        goto failed;
    }

    memset(enc->present, 0, enc->nids);
    memset(enc->key, 0, enc->nids * sizeof(uint64_t));
    memset(enc->filter, 0, ((size_t) 1 << (32 - enc->filter_shift)) / 8);
    memset(enc->table, 0xff, (enc->mask + 1) * sizeof(tk_slot_t));
    memset(enc->pair_rank, 0xff, 65536 * sizeof(uint32_t));

    for (i = 0; i < 256; i++) {
        enc->byte_rank[i] = TK_NONE;
    }

    /* decode in rank order, so that a token's bytes end where the next begin */

    total = 0;
    i = 0;

    for (id = 0; id < enc->nids; id++) {
        enc->offset[id] = total;

        if (i >= n || lines[i].rank != id) {
            continue;
        }

        if (tk_b64_decode(lines[i].b64, lines[i].len, enc->bytes + total,
                          &tlen)
            != TK_OK
            || tlen == 0 || tlen > TK_MAX_TOKEN_LEN)
        {
            snprintf(err, errlen, "invalid token of rank %u", id);
            goto failed;
        }

        total += tlen;
        enc->present[id] = 1;
        i++;

        if (i < n && lines[i].rank == id) {
            snprintf(err, errlen, "duplicate rank %u", id);
            goto failed;
        }
    }

    enc->offset[enc->nids] = total;

    for (id = 0; id < enc->nids; id++) {
        if (!enc->present[id]) {
            continue;
        }

        tlen = tk_token_len(enc, id);

        if (tlen > enc->max_len) {
            enc->max_len = tlen;
        }
    }

    for (id = 0; id < enc->nids; id++) {
        if (!enc->present[id]) {
            continue;
        }

        if (tk_table_add(enc, id) != TK_OK) {
            snprintf(err, errlen, "duplicate token of rank %u", id);
            goto failed;
        }

        p = enc->bytes + enc->offset[id];
        tlen = tk_token_len(enc, id);

        if (tlen == 1) {
            enc->byte_rank[p[0]] = id;

        } else if (tlen == 2) {
            enc->pair_rank[p[0] << 8 | p[1]] = id;
        }
    }

    for (i = 0; i < 256; i++) {
        if (enc->byte_rank[i] == TK_NONE) {
            snprintf(err, errlen, "vocabulary lacks the byte 0x%02zx", i);
            goto failed;
        }
    }

    enc->memory = sizeof(tk_encoding_t) + total
                  + (enc->nids + 1) * sizeof(uint32_t) + enc->nids
                  + (enc->mask + 1) * sizeof(tk_slot_t)
                  + 65536 * sizeof(uint32_t)
                  + enc->nids * sizeof(uint64_t)
                  + ((size_t) 1 << (32 - enc->filter_shift)) / 8;

    rc = tk_bpe_prepare(enc);

    if (rc != TK_OK) {
        snprintf(err, errlen, rc == TK_ENOMEM ? "out of memory"
                                              : "too many tokens");
        goto failed;
    }

    tk_free(allocator, lines);

    return enc;

failed:

    tk_free(allocator, lines);
    tk_encoding_free(enc);

    return NULL;
}


void
tk_encoding_free(tk_encoding_t *enc)
{
    tk_allocator_t  a;

    if (enc == NULL) {
        return;
    }

    a = enc->allocator;

    tk_free(&a, enc->bytes);
    tk_free(&a, enc->offset);
    tk_free(&a, enc->present);
    tk_free(&a, enc->table);
    tk_free(&a, enc->key);
    tk_free(&a, enc->filter);
    tk_free(&a, enc->pair_rank);
    tk_free(&a, enc->tokens);
    tk_free(&a, enc->trie);
    tk_free(&a, enc->merge);
    tk_free(&a, enc->merge_filter);
    tk_free(&a, enc->trie2);
    tk_free(&a, enc->chars);
    tk_free(&a, enc);
}


size_t
tk_encoding_memory(const tk_encoding_t *enc)
{
    return enc->memory;
}


uint32_t
tk_encoding_vocab_size(const tk_encoding_t *enc)
{
    return enc->ntokens;
}


int64_t
tk_encode(const tk_encoding_t *enc, const unsigned char *text, size_t len,
    uint32_t *ids, size_t max)
{
    int                   rc;
    size_t                n;
    tk_out_t              out;
    const unsigned char  *p, *end;

    if (len == 0) {
        return 0;
    }

    out.ids = ids;
    out.max = max;
    out.n = 0;

    end = text + len;

    for (p = text; p < end; p += n) {
        n = tk_piece(enc->pattern, p, end);

        rc = tk_bpe(enc, p, n, &out);
        if (rc != TK_OK) {
            return rc;
        }
    }

    return (int64_t) out.n;
}


int64_t
tk_count(const tk_encoding_t *enc, const unsigned char *text, size_t len)
{
    return tk_encode(enc, text, len, NULL, 0);
}


int64_t
tk_decode(const tk_encoding_t *enc, const uint32_t *ids, size_t n,
    unsigned char *buf, size_t size)
{
    size_t  i, len, total;

    total = 0;

    for (i = 0; i < n; i++) {
        if (ids[i] >= enc->nids || !enc->present[ids[i]]) {
            return TK_ERROR;
        }

        len = tk_token_len(enc, ids[i]);

        if (total + len <= size) {
            memcpy(buf + total, enc->bytes + enc->offset[ids[i]], len);
        }

        total += len;
    }

    return (int64_t) total;
}


static int
tk_table_add(tk_encoding_t *enc, uint32_t id)
{
    size_t                len;
    uint32_t              h, i;
    uint64_t              k0;
    const unsigned char  *p;

    p = enc->bytes + enc->offset[id];
    len = tk_token_len(enc, id);

    if (tk_rank(enc, p, len) != TK_NONE) {
        return TK_ERROR;
    }

    h = tk_key(p, len, &k0, &enc->key[id]);

    i = (h * 0x9e3779b1U) >> enc->filter_shift;
    enc->filter[i >> 6] |= 1ULL << (i & 63);

    for (i = h & enc->mask;
         enc->table[i].id_len != TK_SLOT_EMPTY;
         i = (i + 1) & enc->mask)
    {
        /* void */
    }

    enc->table[i].k0 = k0;
    enc->table[i].hash = h;
    enc->table[i].id_len = id << 12 | (uint32_t) len;

    return TK_OK;
}


static int
tk_line_cmp(const void *a, const void *b)
{
    const tk_line_t  *la, *lb;

    la = a;
    lb = b;

    return (la->rank > lb->rank) - (la->rank < lb->rank);
}


static int
tk_b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }

    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }

    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }

    if (c == '+') {
        return 62;
    }

    if (c == '/') {
        return 63;
    }

    return -1;
}


static int
tk_b64_decode(const unsigned char *src, size_t len, unsigned char *dst,
    size_t *n)
{
    int       v[4], k, pad;
    size_t    i, out;

    out = 0;

    for (i = 0; i < len; i += 4) {
        pad = 0;

        for (k = 0; k < 4; k++) {
            if (src[i + k] == '=' && i + 4 == len && k >= 2) {
                v[k] = 0;
                pad++;
                continue;
            }

            if (pad) {
                return TK_ERROR;
            }

            v[k] = tk_b64_value(src[i + k]);

            if (v[k] < 0) {
                return TK_ERROR;
            }
        }

        dst[out++] = (unsigned char) (v[0] << 2 | v[1] >> 4);

        if (pad < 2) {
            dst[out++] = (unsigned char) ((v[1] & 0xf) << 4 | v[2] >> 2);
        }

        if (pad < 1) {
            dst[out++] = (unsigned char) ((v[2] & 0x3) << 6 | v[3]);
        }
    }

    *n = out;

    return TK_OK;
}


static void *
tk_default_alloc(void *data, size_t size)
{
    return malloc(size);
}


static void
tk_default_free(void *data, void *p)
{
    free(p);
}
