
/*
 * Copyright (C) The token budget authors
 */


#ifndef _TK_INTERNAL_H_INCLUDED_
#define _TK_INTERNAL_H_INCLUDED_


#include <string.h>

#include "tk.h"


#define TK_NONE          0xffffffffU

/* every class bit and "no class": what an inverted class set takes in */
#define TK_U_ALL         0x100
#define TK_INVALID_CP    0x110000

/* pieces up to this length are merged in place, longer ones backtrack */
#define TK_SHORT_PIECE   64

/* longer tokens make a vocabulary unsupported */
#define TK_MAX_TOKEN_LEN 1024


/* a hash table slot: the first key word, the hash, the id and length */

typedef struct {
    uint64_t              k0;
    uint32_t              hash;
    uint32_t              id_len;
} tk_slot_t;

#define TK_SLOT_EMPTY    0xffffffffU
#define tk_slot_id(s)    ((s)->id_len >> 12)
#define tk_slot_len(s)   ((s)->id_len & 0xfff)


/*
 * what backtracking needs of a token, in one place: the two parts of
 * the merge that makes it (the token itself twice for a token that
 * merging does not make), its longest shorter prefix that merging makes,
 * or TK_NONE, its length and that of the prefix
 */

typedef struct {
    uint32_t              left;
    uint32_t              right;
    uint32_t              prefix;
    uint16_t              len;
    uint16_t              prefix_len;
} tk_token_t;


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
    uint64_t             *key;          /* nids: the second key words */
    uint64_t             *filter;       /* one bit per hash, for misses */
    uint32_t              filter_shift;
    uint32_t              mask;

    uint32_t             *pair_rank;    /* two bytes to rank, 65536 */
    uint32_t              byte_ids;     /* ids 0 to 255 are the bytes */
    uint8_t               id_byte[256]; /* and which, if so */
    uint32_t              byte_rank[256];

    /* the linear time encoder for long pieces */
    tk_token_t           *tokens;       /* nids */
    uint64_t             *trie;         /* a node per slot, see tk_bpe.c */
    uint32_t              trie_mask;
    uint32_t              trie_shift;
    uint32_t              trie_nodes;
    uint64_t             *trie2;        /* the nodes of two bytes, 65536:
                                           their slots and nodes */
    uint64_t             *merge;        /* (a << 20 | b) << 20 | token */
    uint32_t              merge_mask;
    uint64_t             *merge_filter; /* two bits per pair, for misses */
    uint32_t              merge_shift;

    /* the parts merging starts from for the characters up to U+FFFF */
    uint64_t             *chars;        /* 65536: ids << 2 | count */

    size_t                memory;
};


typedef struct {
    uint32_t             *ids;
    size_t                max;
    size_t                n;
} tk_out_t;


#if defined(__GNUC__)
#define tk_inline  static inline __attribute__((always_inline))
#else
#define tk_inline  static inline
#endif


extern const uint8_t  tk_ascii_class[128];

uint32_t tk_utf8_decode(const unsigned char **pp, const unsigned char *end);


/* the next character; a byte that starts no valid sequence stands alone */

tk_inline uint32_t
tk_utf8_next(const unsigned char **pp, const unsigned char *end)
{
    uint32_t  c;

    c = **pp;

    if (c < 0x80) {
        (*pp)++;
        return c;
    }

    return tk_utf8_decode(pp, end);
}


tk_inline unsigned
tk_class(uint32_t cp)
{
    if (cp < 0x80) {
        return tk_ascii_class[cp] | TK_U_ALL;
    }

    if (cp >= TK_INVALID_CP) {
        return TK_U_ALL;
    }

    return tk_unicode_class(cp) | TK_U_ALL;
}


/*
 * A token's key: its first and last eight bytes, or for shorter tokens
 * loads that overlap; with the length, the key is the whole token up to
 * 16 bytes, and longer tokens are compared in full.
 */

tk_inline uint32_t
tk_key(const unsigned char *p, size_t len, uint64_t *k0, uint64_t *k1)
{
    uint32_t  a, b;
    uint64_t  h;

    if (len >= 8) {
        memcpy(k0, p, 8);
        memcpy(k1, p + len - 8, 8);

    } else if (len >= 4) {
        memcpy(&a, p, 4);
        memcpy(&b, p + len - 4, 4);
        *k0 = a | (uint64_t) b << 32;
        *k1 = 0;

    } else {
        *k0 = p[0] | (uint32_t) p[len >> 1] << 8 | (uint32_t) p[len - 1] << 16;
        *k1 = 0;
    }

    h = (*k0 ^ len) * 0x9e3779b97f4a7c15ULL;
    h ^= (*k1 + (h >> 29)) * 0xbf58476d1ce4e5b9ULL;

    return (uint32_t) (h >> 32);
}


tk_inline uint32_t
tk_lookup(const tk_encoding_t *enc, const unsigned char *p, size_t len,
    int filter)
{
    uint32_t    h, i, id;
    uint64_t    k0, k1;
    tk_slot_t  *s;

    if (len > enc->max_len) {
        return TK_NONE;
    }

    h = tk_key(p, len, &k0, &k1);

    if (filter) {
        i = (h * 0x9e3779b1U) >> enc->filter_shift;

        if ((enc->filter[i >> 6] & (1ULL << (i & 63))) == 0) {
            return TK_NONE;
        }
    }

    for (i = h & enc->mask; /* void */; i = (i + 1) & enc->mask) {
        s = &enc->table[i];

        if (s->id_len == TK_SLOT_EMPTY) {
            return TK_NONE;
        }

        if (s->k0 != k0 || s->hash != h || tk_slot_len(s) != len) {
            continue;
        }

        id = tk_slot_id(s);

        if (len <= 8) {
            return id;
        }

        if (enc->key[id] == k1
            && (len <= 16
                || memcmp(enc->bytes + enc->offset[id], p, len) == 0))
        {
            return id;
        }
    }
}


/* a lookup that is likely to miss goes through the filter first */

#define tk_rank(enc, p, len)       tk_lookup(enc, p, len, 1)
#define tk_rank_whole(enc, p, len) tk_lookup(enc, p, len, 0)


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
