
/*
 * Copyright (C) The token budget authors
 */


#ifndef _TK_INTERNAL_H_INCLUDED_
#define _TK_INTERNAL_H_INCLUDED_


#include <string.h>

#include "tk.h"


#define TK_NONE          0xffffffffU
#define TK_INVALID_CP    0x110000

/* pieces up to this length are merged in place, longer ones backtrack */
#define TK_SHORT_PIECE   64

/* longer tokens make a vocabulary unsupported */
#define TK_MAX_TOKEN_LEN 1024


typedef struct {
    uint32_t              hash;
    uint32_t              id;
} tk_slot_t;


struct tk_encoding_s {
    tk_pattern_e          pattern;
    tk_allocator_t        allocator;

    uint32_t              nids;         /* the largest rank plus one */
    uint32_t              ntokens;
    uint32_t              max_len;

    unsigned char        *bytes;        /* every token's bytes */
    uint32_t             *offset;       /* nids + 1 entries */
    uint8_t              *present;      /* nids entries */

    tk_slot_t            *table;        /* bytes to rank */
    uint32_t              mask;

    uint32_t             *pair_rank;    /* two bytes to rank, 65536 */
    uint32_t              byte_rank[256];

    /* the linear time encoder for long pieces */
    uint32_t             *split;        /* nids * 2: the last merge */
    uint32_t             *next_prefix;  /* the longest shorter prefix */
    uint32_t             *trie_token;   /* per trie node */
    uint64_t             *trie_edge;    /* (node << 8 | byte) + 1, child */
    uint32_t              trie_mask;
    uint32_t              trie_nodes;

    size_t                memory;
};


typedef struct {
    uint32_t             *ids;
    size_t                max;
    size_t                n;
} tk_out_t;


static inline uint32_t
tk_utf8_next(const unsigned char **pp, const unsigned char *end)
{
    uint32_t              c, cp;
    const unsigned char  *p;

    p = *pp;
    c = p[0];

    if (c < 0x80) {
        *pp = p + 1;
        return c;
    }

    if (c >= 0xc2 && c <= 0xdf) {
        if (end - p >= 2 && (p[1] & 0xc0) == 0x80) {
            *pp = p + 2;
            return ((c & 0x1f) << 6) | (p[1] & 0x3f);
        }

    } else if (c >= 0xe0 && c <= 0xef) {
        if (end - p >= 3 && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
            cp = ((c & 0x0f) << 12) | ((p[1] & 0x3f) << 6) | (p[2] & 0x3f);

            if (cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff)) {
                *pp = p + 3;
                return cp;
            }
        }

    } else if (c >= 0xf0 && c <= 0xf4) {
        if (end - p >= 4 && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80
            && (p[3] & 0xc0) == 0x80)
        {
            cp = ((c & 0x07) << 18) | ((p[1] & 0x3f) << 12)
                 | ((p[2] & 0x3f) << 6) | (p[3] & 0x3f);

            if (cp >= 0x10000 && cp <= 0x10ffff) {
                *pp = p + 4;
                return cp;
            }
        }
    }

    /* an invalid byte stands alone, as a character of no class */

    *pp = p + 1;
    return TK_INVALID_CP;
}


static inline unsigned
tk_class(uint32_t cp)
{
    if (cp >= TK_INVALID_CP) {
        return 0;
    }

    return tk_unicode_class(cp);
}


static inline uint32_t
tk_hash(const unsigned char *p, size_t len)
{
    uint64_t  h, w;

    h = (uint64_t) len * 0x9e3779b97f4a7c15ULL;

    while (len >= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 31;
        p += 8;
        len -= 8;
    }

    if (len) {
        w = 0;
        memcpy(&w, p, len);
        h = (h ^ w) * 0x94d049bb133111ebULL;
    }

    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;

    return (uint32_t) (h >> 32);
}


static inline uint32_t
tk_rank(const tk_encoding_t *enc, const unsigned char *p, size_t len)
{
    uint32_t    h, i, id;
    tk_slot_t  *s;

    if (len > enc->max_len) {
        return TK_NONE;
    }

    h = tk_hash(p, len);

    for (i = h & enc->mask; /* void */; i = (i + 1) & enc->mask) {
        s = &enc->table[i];
        id = s->id;

        if (id == TK_NONE) {
            return TK_NONE;
        }

        if (s->hash == h
            && enc->offset[id + 1] - enc->offset[id] == len
            && memcmp(enc->bytes + enc->offset[id], p, len) == 0)
        {
            return id;
        }
    }
}


static inline size_t
tk_token_len(const tk_encoding_t *enc, uint32_t id)
{
    return enc->offset[id + 1] - enc->offset[id];
}


int tk_bpe(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out);
int tk_bpe_merge(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out, uint32_t *last);
int tk_bpe_prepare(tk_encoding_t *enc);

void *tk_alloc(const tk_allocator_t *a, size_t size);
void tk_free(const tk_allocator_t *a, void *p);


#endif /* _TK_INTERNAL_H_INCLUDED_ */
