
/*
 * Copyright (C) The token budget authors
 *
 * Byte pair encoding of one piece, with tiktoken's semantics: repeatedly
 * merge the adjacent pair of parts whose concatenation is the token of the
 * lowest rank, the leftmost one on ties.
 *
 * Short pieces are merged in place, as tiktoken does, on token ids; most
 * characters of two or three bytes start there from the tokens their bytes
 * merge into, where that provably changes nothing (tk_chars_prepare()).
 * Merging is quadratic in the length of a piece, so long pieces (a megabyte
 * of one letter is one piece) are encoded by backtracking instead: the
 * longest token that fits is taken first, then shorter ones, until every
 * adjacent pair of tokens is one that the merging would have left apart.
 * Only one encoding has that property, so the result is the same; the work
 * is linear.
 *
 * A pair of tokens (a, b) is left apart when, going back through the merges
 * that built a and b, no pair of parts facing each other across the
 * boundary would have merged before the merge that consumed one of them.
 */


#include "tk_internal.h"


/* the sides of tk_chars_prepare() */
#define TK_CHAR_ANY_LEFT    0
#define TK_CHAR_CONT_LEFT   1
#define TK_CHAR_ANY_RIGHT   2
#define TK_CHAR_LEAD_RIGHT  3

/* a character may start from its parts whatever is on that side */
#define TK_CHAR_LEFT        (1ULL << 62)
#define TK_CHAR_RIGHT       (1ULL << 63)


/*
 * The trie of the tokens that merging makes: a node is a slot of an open
 * addressing table, holding 13 bits that say which bytes its children may
 * have, its parent plus one and its byte, then the token it ends plus one,
 * or 0.  A node's children are looked for from a hash of the node's bytes
 * plus the child's byte: a walk knows where to look before it has found
 * the parent, so that it loads the next slot while it looks for this one,
 * and the children of a node are near each other, so that the nodes that
 * short prefixes use stay in the cache.  They crowd the slots, though, and
 * most walks end looking for a child that is not there, which the bits
 * answer without going through the crowd.
 */
#define TK_TRIE_SEED        0x2545f4914f6cdd1dULL
#define TK_TRIE_TOKEN       0x1fffff
#define TK_TRIE_KEY_SHIFT   21
#define TK_TRIE_KEY         0x3fffffffULL
#define TK_TRIE_BITS_SHIFT  51
#define TK_TRIE_MAX         (1 << 21)
#define tk_trie_bit(c)                                                        \
    (1ULL << (TK_TRIE_BITS_SHIFT + (c) % 13))
#define tk_trie_hash(h, c)  (((h) ^ (c)) * 0x9e3779b97f4a7c15ULL)
#define tk_trie_key(node, c)  ((uint64_t) ((node) + 1) << 8 | (c))
#define tk_trie_slot(enc, h, c)                                               \
    (((uint32_t) ((h) >> (enc)->trie_shift) + (c)) & (enc)->trie_mask)

#if defined(__GNUC__)
#define tk_prefetch(p)      __builtin_prefetch(p)
#else
#define tk_prefetch(p)
#endif


/* the two bits of a pair's word of the merge filter, from its hash */
#define TK_MERGE_BITS(h)                                                      \
    (1ULL << ((h) >> 26 & 63) | 1ULL << ((h) >> 32 & 63))


#define tk_emit(out, id)                                                      \
    if ((out)->ids != NULL && (out)->n < (out)->max) {                        \
        (out)->ids[(out)->n] = (id);                                          \
    }                                                                         \
    (out)->n++


static int tk_bpe_merge_ids(const tk_encoding_t *enc, const unsigned char *p,
    size_t n, tk_out_t *out);
static int tk_bpe_backtrack(const tk_encoding_t *enc, const unsigned char *p,
    size_t n, tk_out_t *out);
static int tk_bt_run(const tk_encoding_t *enc, const unsigned char *p,
    size_t n, tk_out_t *out, uint64_t *dead, size_t cap, size_t bits,
    size_t span);
static uint32_t tk_longest(const tk_encoding_t *enc, const unsigned char *p,
    size_t n, size_t *len);
static void tk_longest_prefetch(const tk_encoding_t *enc,
    const unsigned char *p);
static int tk_valid_pair(const tk_encoding_t *enc, uint32_t a, uint32_t b);
static uint32_t tk_pair(const tk_encoding_t *enc, uint32_t a, uint32_t b);
static void tk_merge_put(tk_encoding_t *enc, uint32_t a, uint32_t b,
    uint32_t m);
static int tk_trie_build(tk_encoding_t *enc, const uint32_t *reachable,
    size_t size);
static int tk_trie_add(tk_encoding_t *enc, uint32_t id);
static int tk_chars_prepare(tk_encoding_t *enc);
static uint64_t tk_char_parts(const tk_encoding_t *enc, const unsigned char *b,
    size_t k, const uint32_t *min);
static void tk_char_min(uint32_t *min, uint32_t rank);


void *
tk_alloc(const tk_allocator_t *a, size_t size)
{
    return a->alloc(a->data, size);
}


void
tk_free(const tk_allocator_t *a, void *p)
{
    if (p != NULL) {
        a->free(a->data, p);
    }
}


/* the slot of a node's child by the byte c, h the hash of the node */

tk_inline uint32_t
tk_trie_child(const tk_encoding_t *enc, uint32_t node, uint64_t h,
    unsigned char c)
{
    uint32_t  i;
    uint64_t  key, e;

    key = tk_trie_key(node, c);

    for (i = tk_trie_slot(enc, h, c);
         /* void */;
         i = (i + 1) & enc->trie_mask)
    {
        e = enc->trie[i];

        if (e == 0) {
            return TK_NONE;
        }

        if ((e >> TK_TRIE_KEY_SHIFT & TK_TRIE_KEY) == key) {
            return i;
        }
    }
}


int
tk_bpe(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out)
{
    uint32_t  id;

    if (n == 1) {
        tk_emit(out, enc->byte_rank[p[0]]);
        return TK_OK;
    }

    id = tk_rank_whole(enc, p, n);

    if (id != TK_NONE) {
        tk_emit(out, id);
        return TK_OK;
    }

    if (n <= TK_SHORT_PIECE) {
        return tk_bpe_merge_ids(enc, p, n, out);
    }

    return tk_bpe_backtrack(enc, p, n, out);
}


/*
 * tiktoken's merge loop on token ids: two adjacent parts merge into the
 * token whose last merge they are (see tk_pair()), which is what looking
 * up their bytes would find, without hashing bytes
 */

static int
tk_bpe_merge_ids(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out)
{
    size_t                i, k, m, min_i, live;
    uint32_t              min, cp, id[TK_SHORT_PIECE], rank[TK_SHORT_PIECE];
    uint64_t              parts;
    const unsigned char  *q, *b, *end;

    end = p + n;

    for (q = p; q < end && *q < 0x80; q++) {
        /* void */
    }

    if (q == end || enc->chars == NULL) {

        /* bytes only: their pairs are two bytes */

        for (i = 0; i < n; i++) {
            id[i] = enc->byte_rank[p[i]];
        }

        for (i = 0; i + 1 < n; i++) {
            rank[i] = enc->pair_rank[p[i] << 8 | p[i + 1]];
        }

        m = n;

    } else {
        m = 0;

        for (q = p; q < end && *q < 0x80; q++) {
            if (m > 0) {
                rank[m - 1] = enc->pair_rank[q[-1] << 8 | q[0]];
            }

            id[m++] = enc->byte_rank[*q];
        }

        /*
         * a character of two or three bytes starts from the parts it
         * merges into alone, where tk_chars_prepare() found that nothing
         * on either side can merge with it first
         */

        while (q < end) {
            b = q;

            if (*q >= 0x80) {

                /* two and three bytes inline, the rest by tk_utf8_decode() */

                if (*q >= 0xc2 && *q < 0xe0 && end - q >= 2
                    && (q[1] & 0xc0) == 0x80)
                {
                    cp = (*q & 0x1f) << 6 | (q[1] & 0x3f);
                    q += 2;

                } else if ((*q & 0xf0) == 0xe0 && end - q >= 3
                           && (q[1] & 0xc0) == 0x80 && (q[2] & 0xc0) == 0x80
                           && (*q != 0xe0 || q[1] >= 0xa0))
                {
                    cp = (*q & 0x0f) << 12 | (q[1] & 0x3f) << 6 | (q[2] & 0x3f);
                    q += 3;

                } else {
                    cp = tk_utf8_decode(&q, end);
                }

                parts = (cp < 0x10000) ? enc->chars[cp] : 0;

                if (parts != 0
                    && (b == p || (b[-1] & 0xc0) == 0x80
                        || (parts & TK_CHAR_LEFT))
                    && (q == end || *q >= 0xc0 || (parts & TK_CHAR_RIGHT)))
                {
                    for (k = parts & 3, parts >>= 2; k; k--, parts >>= 20) {
                        if (m > 0) {
                            rank[m - 1] = tk_pair(enc, id[m - 1],
                                                  (uint32_t) parts & 0xfffff);
                        }

                        id[m++] = (uint32_t) parts & 0xfffff;
                    }

                    continue;
                }

            } else {
                q++;
            }

            /* bytes, and pairs of two bytes where the last part is one */

            for ( /* void */ ; b < q; b++) {
                if (m == 0) {
                    /* void */

                } else if (id[m - 1] == enc->byte_rank[b[-1]]) {
                    rank[m - 1] = enc->pair_rank[b[-1] << 8 | b[0]];

                } else {
                    rank[m - 1] = tk_pair(enc, id[m - 1],
                                          enc->byte_rank[b[0]]);
                }

                id[m++] = enc->byte_rank[*b];
            }
        }
    }

    rank[m - 1] = TK_NONE;

    /*
     * a merge leaves the part on the right of the pair in its slot, dead,
     * rather than moving the parts after it: its rank is TK_NONE, and its
     * id too, for the neighbours to step over it
     */

    for (live = m; /* void */; live--) {
        min = TK_NONE;
        min_i = 0;

        for (i = 0; i + 1 < m; i++) {
            if (rank[i] < min) {
                min = rank[i];
                min_i = i;
            }
        }

        if (min == TK_NONE) {
            break;
        }

        i = min_i;
        id[i] = min;

        for (k = i + 1; id[k] == TK_NONE; k++) { /* void */ }

        id[k] = TK_NONE;
        rank[k] = TK_NONE;

        for (k++; k < m && id[k] == TK_NONE; k++) { /* void */ }

        rank[i] = (k < m) ? tk_pair(enc, id[i], id[k]) : TK_NONE;

        for (k = i; k > 0 && id[k - 1] == TK_NONE; k--) { /* void */ }

        if (k > 0) {
            rank[k - 1] = tk_pair(enc, id[k - 1], id[i]);
        }
    }

    if (out->ids == NULL) {
        out->n += live;

    } else {
        for (i = 0; i < m; i++) {
            if (id[i] != TK_NONE) {
                tk_emit(out, id[i]);
            }
        }
    }

    return TK_OK;
}


/*
 * tiktoken's own merge loop; "split", when not NULL, gets the two parts
 * of the last merge
 */

int
tk_bpe_merge(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out, uint32_t *split)
{
    size_t     i, m, min_i;
    uint32_t   min, buf[2 * (TK_SHORT_PIECE + 1)], *start, *rank;

    if (n <= TK_SHORT_PIECE) {
        start = buf;

    } else {
        start = tk_alloc(&enc->allocator, 2 * (n + 1) * sizeof(uint32_t));
        if (start == NULL) {
            return TK_ENOMEM;
        }
    }

    rank = start + n + 1;

    for (i = 0; i + 1 < n; i++) {
        start[i] = i;
        rank[i] = enc->pair_rank[p[i] << 8 | p[i + 1]];
    }

    start[n - 1] = n - 1;
    rank[n - 1] = TK_NONE;
    start[n] = n;
    rank[n] = TK_NONE;
    m = n + 1;

    for ( ;; ) {
        min = TK_NONE;
        min_i = 0;

        for (i = 0; i + 1 < m; i++) {
            if (rank[i] < min) {
                min = rank[i];
                min_i = i;
            }
        }

        if (min == TK_NONE) {
            break;
        }

        i = min_i;

        if (split != NULL && m == 3) {
            split[0] = tk_rank(enc, p, start[1]);
            split[1] = tk_rank(enc, p + start[1], n - start[1]);
        }

        if (i > 0) {
            rank[i - 1] = (i + 2 < m)
                          ? tk_rank(enc, p + start[i - 1],
                                    start[i + 2] - start[i - 1])
                          : TK_NONE;
        }

        rank[i] = (i + 3 < m)
                  ? tk_rank(enc, p + start[i], start[i + 3] - start[i])
                  : TK_NONE;

        memmove(&start[i + 1], &start[i + 2], (m - i - 2) * sizeof(uint32_t));
        memmove(&rank[i + 1], &rank[i + 2], (m - i - 2) * sizeof(uint32_t));
        m--;
    }

    if (out->ids == NULL) {
        out->n += m - 1;

    } else {
        for (i = 0; i + 1 < m; i++) {
            tk_emit(out, tk_rank(enc, p + start[i], start[i + 1] - start[i]));
        }
    }

    if (start != buf) {
        tk_free(&enc->allocator, start);
    }

    return TK_OK;
}


/*
 * Backtracking keeps the tokens it has taken, and their lengths, in a ring
 * and emits those more than half a ring or TK_BT_SPAN / 2 bytes behind
 * when the ring is full or its tokens span more than TK_BT_SPAN bytes: in
 * practice it only ever steps back a few tokens, and a long piece then
 * needs 28 KB rather than 4 bytes per byte.  Should it step back to a
 * token already emitted, the piece is encoded again with room for all its
 * tokens.  The positions where nothing fits are kept in a ring of bits
 * too, which holds the span and two tokens past it.
 */

#ifndef TK_BT_TOKENS
#define TK_BT_TOKENS        4096
#define TK_BT_SPAN          16384
#define TK_BT_DEAD          32768
#endif

/* what tk_bt_run() returns when it would step back to a token emitted */
#define TK_AGAIN            1

#if (TK_BT_SPAN + 2 * TK_MAX_TOKEN_LEN >= TK_BT_DEAD)
#error "TK_BT_DEAD must hold TK_BT_SPAN and two tokens"
#endif


static int
tk_bpe_backtrack(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out)
{
    int        rc;
    size_t     start, cap, bits;
    uint64_t  *dead;

    dead = tk_alloc(&enc->allocator, TK_BT_DEAD / 8
                                     + TK_BT_TOKENS * sizeof(uint32_t)
                                     + TK_BT_TOKENS * sizeof(uint16_t));
    if (dead == NULL) {
        return TK_ENOMEM;
    }

    start = out->n;

    rc = tk_bt_run(enc, p, n, out, dead, TK_BT_TOKENS, TK_BT_DEAD,
                   TK_BT_SPAN);

    tk_free(&enc->allocator, dead);

    if (rc != TK_AGAIN) {
        return rc;
    }

    /* it stepped back to a token emitted: again, with room for all */

    out->n = start;

    for (cap = 2; cap <= n; cap <<= 1) { /* void */ }
    for (bits = 64; bits <= n; bits <<= 1) { /* void */ }

    dead = tk_alloc(&enc->allocator, bits / 8 + cap * sizeof(uint32_t)
                                     + cap * sizeof(uint16_t));
    if (dead == NULL) {
        return TK_ENOMEM;
    }

    rc = tk_bt_run(enc, p, n, out, dead, cap, bits, n);

    tk_free(&enc->allocator, dead);

    return rc;
}


/*
 * the loop of backtracking, in "dead" of "bits" / 8 bytes followed by a
 * ring of "cap" tokens and one of their lengths, both powers of two; it
 * emits tokens when the ring is full or its tokens span more than "span"
 * bytes, and returns TK_AGAIN if it has to step back to one of those
 */

tk_inline int
tk_bt_run(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    tk_out_t *out, uint64_t *dead, size_t cap, size_t bits, size_t span)
{
    size_t     pos, end, len, top, done, done_pos, clean, full, full_pos, i;
    uint16_t  *lens;
    uint32_t   t, last, *ring;

    ring = (uint32_t *) (dead + bits / 64);
    lens = (uint16_t *) (ring + cap);

    /* the bits of the positions the piece has, all if it wraps */

    memset(dead, 0, ((n < bits ? n : bits - 1) / 64 + 1) * sizeof(uint64_t));

    pos = 0;
    top = 0;
    done = 0;
    done_pos = 0;
    clean = 0;
    full = cap;
    full_pos = span;

    t = tk_longest(enc, p, n, &len);

    for ( ;; ) {

        /*
         * the slot before the ring's oldest token still holds the last
         * one emitted: it is only written when the ring is full, and the
         * oldest tokens are emitted right then
         */

        last = top ? ring[(top - 1) & (cap - 1)] : TK_NONE;

        end = pos + len;

        if (end + 4 <= n) {
            tk_longest_prefetch(enc, p + end);
        }

        if ((end == n
             || (dead[(end & (bits - 1)) >> 6] & (1ULL << (end & 63))) == 0)
            && (last == TK_NONE || tk_valid_pair(enc, last, t)))
        {
            lens[top & (cap - 1)] = (uint16_t) len;
            ring[top++ & (cap - 1)] = t;
            pos = end;

            if (pos == n) {
                break;
            }

            if (top == full || pos > full_pos) {

                /*
                 * emit the older tokens; the bits of the positions they
                 * cover are cleared a word at a time, once they are all
                 * behind, well before the ring of bits comes round to them
                 */

                i = done;

                do {
                    done_pos += lens[done++ & (cap - 1)];
                } while (top - done > cap / 2 || pos - done_pos > span / 2);

                if (out->ids == NULL) {
                    out->n += done - i;

                } else {
                    for ( /* void */ ; i < done; i++) {
                        tk_emit(out, ring[i & (cap - 1)]);
                    }
                }

                for ( /* void */ ; clean + 64 <= done_pos; clean += 64) {
                    dead[(clean & (bits - 1)) >> 6] = 0;
                }

                full = done + cap;
                full_pos = done_pos + span;
            }

            t = tk_longest(enc, p + pos, n - pos, &len);
            continue;
        }

        len = enc->tokens[t].prefix_len;
        t = enc->tokens[t].prefix;

        if (t != TK_NONE) {
            tk_prefetch(&enc->tokens[t]);
            continue;
        }

        /* nothing fits at pos after the last token: step back */

        if (top == done) {
            if (done == 0) {
                /* cannot happen with a consistent vocabulary */
                return tk_bpe_merge(enc, p, n, out, NULL);
            }

            return TK_AGAIN;
        }

        dead[(pos & (bits - 1)) >> 6] |= 1ULL << (pos & 63);
        top--;
        len = lens[top & (cap - 1)];
        pos -= len;
        t = last;
    }

    if (out->ids == NULL) {
        out->n += top - done;

    } else {
        for ( /* void */ ; done < top; done++) {
            tk_emit(out, ring[done & (cap - 1)]);
        }
    }

    return TK_OK;
}


static uint32_t
tk_longest(const tk_encoding_t *enc, const unsigned char *p, size_t n,
    size_t *len)
{
    size_t    i;
    uint32_t  node, best;
    uint64_t  h, next, e;

    best = enc->byte_rank[p[0]];
    *len = 1;

    if (n == 1) {
        return best;
    }

    /* the first two bytes at once, while the children load */

    h = tk_trie_hash(tk_trie_hash(TK_TRIE_SEED, p[0]), p[1]);

    if (n > 2) {
        tk_prefetch(&enc->trie[tk_trie_slot(enc, h, p[2])]);
    }

    e = enc->trie2[2 * (p[0] << 8 | p[1])];

    if (e == 0) {
        return best;
    }

    node = (uint32_t) enc->trie2[2 * (p[0] << 8 | p[1]) + 1];

    if ((e & TK_TRIE_TOKEN) != 0) {
        best = (uint32_t) (e & TK_TRIE_TOKEN) - 1;
        *len = 2;
    }

    for (i = 2; i < n; i++) {
        if ((e & tk_trie_bit(p[i])) == 0) {
            break;
        }

        next = tk_trie_hash(h, p[i]);

        if (i + 1 < n) {
            tk_prefetch(&enc->trie[tk_trie_slot(enc, next, p[i + 1])]);
        }

        node = tk_trie_child(enc, node, h, p[i]);

        if (node == TK_NONE) {
            break;
        }

        e = enc->trie[node];

        if ((e & TK_TRIE_TOKEN) != 0) {
            best = (uint32_t) (e & TK_TRIE_TOKEN) - 1;
            *len = i + 1;
        }

        h = next;
    }

    /* what checking the token needs, while the next one is looked for */

    tk_prefetch(&enc->tokens[best]);

    return best;
}


/*
 * the first nodes tk_longest() will look at after this token, while
 * the token's pair with the last one is checked
 */

static void
tk_longest_prefetch(const tk_encoding_t *enc, const unsigned char *p)
{
    uint64_t  h;

    tk_prefetch(&enc->trie2[2 * (p[0] << 8 | p[1])]);

    h = tk_trie_hash(tk_trie_hash(TK_TRIE_SEED, p[0]), p[1]);
    tk_prefetch(&enc->trie[tk_trie_slot(enc, h, p[2])]);
    h = tk_trie_hash(h, p[2]);
    tk_prefetch(&enc->trie[tk_trie_slot(enc, h, p[3])]);
}


tk_inline int
tk_valid_pair(const tk_encoding_t *enc, uint32_t a, uint32_t b)
{
    uint32_t  limit, m;

    limit = TK_NONE;

    for ( ;; ) {
        if ((a | b) < 256 && enc->byte_ids) {
            m = enc->pair_rank[enc->id_byte[a] << 8 | enc->id_byte[b]];

        } else {
            m = tk_pair(enc, a, b);
        }

        if (m != TK_NONE && m < limit) {
            return 0;
        }

        /* undo the later of the two merges that made a and b */

        if (a > b) {
            limit = a;
            a = enc->tokens[a].right;

            if (a == limit) {
                limit = b + 1;
                b = enc->tokens[b].left;

                if (b + 1 == limit) {
                    return 1;
                }
            }

        } else {
            limit = b + 1;
            b = enc->tokens[b].left;

            if (b + 1 == limit) {
                limit = a;
                a = enc->tokens[a].right;

                if (a == limit) {
                    return 1;
                }
            }
        }
    }
}


/*
 * the token that merging a and b makes: a part is only ever formed by its
 * own last merge, so the pairs are those of the tokens' splits
 */

tk_inline uint32_t
tk_pair(const tk_encoding_t *enc, uint32_t a, uint32_t b)
{
    uint32_t  i;
    uint64_t  key, h, e;

    key = (uint64_t) a << 20 | b;
    h = key * 0x9e3779b97f4a7c15ULL;

    /* most pairs do not merge: two bits of one word of the filter say so */

    e = TK_MERGE_BITS(h);

    if ((enc->merge_filter[h >> enc->merge_shift] & e) != e) {
        return TK_NONE;
    }

    for (i = (uint32_t) (h >> 40) & enc->merge_mask;
         /* void */;
         i = (i + 1) & enc->merge_mask)
    {
        e = enc->merge[i];

        if (e == 0) {
            return TK_NONE;
        }

        if (e >> 20 == key) {
            return (uint32_t) (e & 0xfffff);
        }
    }
}


static void
tk_merge_put(tk_encoding_t *enc, uint32_t a, uint32_t b, uint32_t m)
{
    uint32_t  i;
    uint64_t  key, h;

    key = (uint64_t) a << 20 | b;
    h = key * 0x9e3779b97f4a7c15ULL;

    enc->merge_filter[h >> enc->merge_shift] |= TK_MERGE_BITS(h);

    for (i = (uint32_t) (h >> 40) & enc->merge_mask;
         enc->merge[i] != 0;
         i = (i + 1) & enc->merge_mask)
    {
        /* void */
    }

    enc->merge[i] = key << 20 | m;
}


static int
tk_trie_build(tk_encoding_t *enc, const uint32_t *reachable, size_t size)
{
    uint32_t  id;

    enc->trie = tk_alloc(&enc->allocator, size * sizeof(uint64_t));
    if (enc->trie == NULL) {
        return TK_ENOMEM;
    }

    memset(enc->trie, 0, size * sizeof(uint64_t));

    enc->trie_mask = size - 1;
    enc->trie_nodes = 1;

    for (enc->trie_shift = 64; size > 1; size >>= 1) {
        enc->trie_shift--;
    }

    for (id = 0; id < enc->nids; id++) {
        if (reachable[id] && tk_trie_add(enc, id) != TK_OK) {
            tk_free(&enc->allocator, enc->trie);
            enc->trie = NULL;
            return TK_ERROR;
        }
    }

    return TK_OK;
}


static int
tk_trie_add(tk_encoding_t *enc, uint32_t id)
{
    size_t          n, k;
    uint32_t        node, child;
    uint64_t        h;
    const uint8_t  *p;

    p = enc->bytes + enc->offset[id];
    n = tk_token_len(enc, id);
    node = enc->trie_mask + 1;
    h = TK_TRIE_SEED;

    for (k = 0; k < n; k++) {
        child = tk_trie_child(enc, node, h, p[k]);

        if (child == TK_NONE) {
            if (4 * (size_t) enc->trie_nodes > 3 * (size_t) enc->trie_mask) {
                /* over a load of 3/4 */
                return TK_ERROR;
            }

            for (child = tk_trie_slot(enc, h, p[k]);
                 enc->trie[child] != 0;
                 child = (child + 1) & enc->trie_mask)
            {
                /* void */
            }

            enc->trie[child] = tk_trie_key(node, p[k]) << TK_TRIE_KEY_SHIFT;
            enc->trie_nodes++;

            if (node <= enc->trie_mask) {
                enc->trie[node] |= tk_trie_bit(p[k]);
            }
        }

        node = child;
        h = tk_trie_hash(h, p[k]);
    }

    enc->trie[node] = (enc->trie[node] & ~(uint64_t) TK_TRIE_TOKEN) | (id + 1);

    return TK_OK;
}


/*
 * builds what backtracking needs: the last merge of every token, a trie of
 * the tokens that merging can produce, and each one's longest prefix token
 */

int
tk_bpe_prepare(tk_encoding_t *enc)
{
    int             rc;
    size_t          size, k, n;
    uint32_t        id, node, root, best, split[2], *reachable;
    uint64_t        h;
    tk_out_t        out;
    const uint8_t  *p;

    enc->tokens = tk_alloc(&enc->allocator, enc->nids * sizeof(tk_token_t));
    reachable = tk_alloc(&enc->allocator, enc->nids * sizeof(uint32_t));

    if (enc->tokens == NULL || reachable == NULL) {
        tk_free(&enc->allocator, reachable);
        return TK_ENOMEM;
    }

    for (id = 0; id < enc->nids; id++) {
        enc->tokens[id].left = id;
        enc->tokens[id].right = id;
        enc->tokens[id].prefix = TK_NONE;
        enc->tokens[id].len = (uint16_t) tk_token_len(enc, id);
        enc->tokens[id].prefix_len = 0;
        reachable[id] = 0;

        if (!enc->present[id]) {
            continue;
        }

        n = tk_token_len(enc, id);

        if (n == 1) {
            reachable[id] = 1;
            continue;
        }

        out.ids = NULL;
        out.max = 0;
        out.n = 0;
        split[0] = TK_NONE;
        split[1] = TK_NONE;

        if (tk_bpe_merge(enc, enc->bytes + enc->offset[id], n, &out, split)
            != TK_OK)
        {
            tk_free(&enc->allocator, reachable);
            return TK_ENOMEM;
        }

        if (out.n == 1 && split[0] != TK_NONE && split[1] != TK_NONE) {
            enc->tokens[id].left = split[0];
            enc->tokens[id].right = split[1];
            reachable[id] = 1;
        }
    }

    /* the merges, at a load of at most a half */

    for (size = 1024; size < 2 * (size_t) enc->ntokens; size <<= 1) {
        /* void */
    }

    enc->merge_mask = size - 1;
    enc->merge = tk_alloc(&enc->allocator, size * sizeof(uint64_t));

    /* and a filter of 4 bits per slot, 8 to 16 per merge */

    for (enc->merge_shift = 64, k = size / 16; k > 1; k >>= 1) {
        enc->merge_shift--;
    }

    enc->merge_filter = tk_alloc(&enc->allocator, size / 16 * sizeof(uint64_t));

    if (enc->merge == NULL || enc->merge_filter == NULL) {
        tk_free(&enc->allocator, reachable);
        return TK_ENOMEM;
    }

    memset(enc->merge, 0, size * sizeof(uint64_t));
    memset(enc->merge_filter, 0, size / 16 * sizeof(uint64_t));
    enc->memory += size * sizeof(uint64_t) + size / 16 * sizeof(uint64_t);

    for (id = 0; id < enc->nids; id++) {
        if (enc->tokens[id].left != id) {
            tk_merge_put(enc, enc->tokens[id].left, enc->tokens[id].right, id);
        }
    }

    /*
     * where ids 0 to 255 are the bytes, as in tiktoken's vocabularies,
     * the merges of two of them are those pair_rank gives for their bytes
     */

    enc->byte_ids = 1;

    for (k = 0; k < 256 && enc->byte_ids; k++) {
        id = enc->byte_rank[k];

        if (id < 256) {
            enc->id_byte[id] = (uint8_t) k;

        } else {
            enc->byte_ids = 0;
        }
    }

    for (k = 0; k < 65536 && enc->byte_ids; k++) {
        enc->byte_ids = (tk_pair(enc, enc->byte_rank[k >> 8],
                                 enc->byte_rank[k & 0xff])
                         == enc->pair_rank[k]);
    }

    /*
     * the trie, at a load of at most 3/4: the vocabularies have about two
     * nodes per token, a larger table is tried if that is not enough
     */

    for (size = 1024; 3 * size < 8 * (size_t) enc->ntokens; size <<= 1) {
        /* void */
    }

    do {
        if (size > TK_TRIE_MAX) {
            tk_free(&enc->allocator, reachable);
            return TK_ERROR;
        }

        rc = tk_trie_build(enc, reachable, size);

        if (rc == TK_ENOMEM) {
            tk_free(&enc->allocator, reachable);
            return TK_ENOMEM;
        }

        size <<= 1;

    } while (rc != TK_OK);

    tk_free(&enc->allocator, reachable);

    enc->trie2 = tk_alloc(&enc->allocator, 2 * 65536 * sizeof(uint64_t));
    if (enc->trie2 == NULL) {
        return TK_ENOMEM;
    }

    root = enc->trie_mask + 1;

    for (k = 0; k < 65536; k++) {
        h = TK_TRIE_SEED;
        node = tk_trie_child(enc, root, h, (unsigned char) (k >> 8));

        if (node != TK_NONE) {
            node = tk_trie_child(enc, node, tk_trie_hash(h, k >> 8),
                                 (unsigned char) (k & 0xff));
        }

        enc->trie2[2 * k] = (node == TK_NONE) ? 0 : enc->trie[node];
        enc->trie2[2 * k + 1] = node;
    }

    enc->memory += 2 * 65536 * sizeof(uint64_t);

    for (id = 0; id < enc->nids; id++) {
        if (enc->tokens[id].left == id && tk_token_len(enc, id) != 1) {
            /* a token that merging never makes */
            continue;
        }

        node = root;
        h = TK_TRIE_SEED;
        best = TK_NONE;
        n = tk_token_len(enc, id);
        p = enc->bytes + enc->offset[id];

        for (k = 0; k + 1 < n; k++) {
            node = tk_trie_child(enc, node, h, p[k]);
            h = tk_trie_hash(h, p[k]);

            if ((enc->trie[node] & TK_TRIE_TOKEN) != 0) {
                best = (uint32_t) (enc->trie[node] & TK_TRIE_TOKEN) - 1;
            }
        }

        enc->tokens[id].prefix = best;

        if (best != TK_NONE) {
            enc->tokens[id].prefix_len = enc->tokens[best].len;
        }
    }

    enc->memory += enc->nids * sizeof(tk_token_t)
                   + (enc->trie_mask + 1) * sizeof(uint64_t);

    return tk_chars_prepare(enc);
}


/*
 * The parts that merging starts from for the characters of two and three
 * bytes: the parts a character's bytes merge into alone, where that is
 * provably what they merge into in a piece too.
 *
 * Let "max" be the highest rank of the merges of a character alone: while
 * it has merges to come, one of its pairs has a rank up to max.  Suppose
 * every part that is ever at its left edge, the last one too, merges with
 * what can be on its left only into tokens of ranks above max, and so on
 * the right.  Then in a piece no pair across the character's edges is the
 * lowest before the character's own merges are done, its merges are those
 * it makes alone, and every other merge sees the same pairs and makes the
 * same choice as when the character starts from its own parts: merging
 * from those gives the same tokens.
 *
 * What can be on a character's left is a token that ends with the byte
 * before it, and on its right one that starts with the byte after it.
 * That a character starts from its parts needs the condition against the
 * tokens ending with a continuation byte on its left (another character
 * of several bytes is there) and those starting with a lead byte on its
 * right; TK_CHAR_LEFT and TK_CHAR_RIGHT say it holds against any token on
 * that side.  Characters where it does not hold start from their bytes.
 */

static int
tk_chars_prepare(tk_encoding_t *enc)
{
    size_t          k;
    uint32_t        id, a, b, cp, *min;
    unsigned char   u[3], c;

    if (enc->nids > 0x100000) {
        return TK_OK;
    }

    enc->chars = tk_alloc(&enc->allocator, 65536 * sizeof(uint64_t));
    min = tk_alloc(&enc->allocator, 4 * enc->nids * sizeof(uint32_t));

    if (enc->chars == NULL || min == NULL) {
        tk_free(&enc->allocator, min);
        return TK_ENOMEM;
    }

    memset(enc->chars, 0, 65536 * sizeof(uint64_t));
    memset(min, 0xff, 4 * enc->nids * sizeof(uint32_t));

    /*
     * the lowest rank each token merges into with any token on its right,
     * one starting with a lead byte, with any token on its left, and one
     * ending with a continuation byte
     */

    for (id = 0; id < enc->nids; id++) {
        a = enc->tokens[id].left;
        b = enc->tokens[id].right;

        if (a == id) {
            continue;
        }

        tk_char_min(&min[TK_CHAR_ANY_RIGHT * enc->nids + a], id);
        tk_char_min(&min[TK_CHAR_ANY_LEFT * enc->nids + b], id);

        c = enc->bytes[enc->offset[b]];

        if (c >= 0xc0) {
            tk_char_min(&min[TK_CHAR_LEAD_RIGHT * enc->nids + a], id);
        }

        c = enc->bytes[enc->offset[a + 1] - 1];

        if ((c & 0xc0) == 0x80) {
            tk_char_min(&min[TK_CHAR_CONT_LEFT * enc->nids + b], id);
        }
    }

    for (cp = 0x80; cp < 0x10000; cp++) {
        if (cp >= 0xd800 && cp <= 0xdfff) {
            continue;
        }

        if (cp < 0x800) {
            u[0] = (unsigned char) (0xc0 | cp >> 6);
            u[1] = (unsigned char) (0x80 | (cp & 0x3f));
            k = 2;

        } else {
            u[0] = (unsigned char) (0xe0 | cp >> 12);
            u[1] = (unsigned char) (0x80 | (cp >> 6 & 0x3f));
            u[2] = (unsigned char) (0x80 | (cp & 0x3f));
            k = 3;
        }

        enc->chars[cp] = tk_char_parts(enc, u, k, min);
    }

    tk_free(&enc->allocator, min);

    enc->memory += 65536 * sizeof(uint64_t);

    return TK_OK;
}


/*
 * the parts of one character merged alone, as TK_CHAR_LEFT, TK_CHAR_RIGHT,
 * the count and the ids (see tk_bpe_merge_ids()), or 0 when it starts from
 * its bytes; where the condition above holds for its first merges only,
 * the parts those make
 */

static uint64_t
tk_char_parts(const tk_encoding_t *enc, const unsigned char *b, size_t k,
    const uint32_t *min)
{
    size_t    i, m, min_i, side;
    uint32_t  r, max, edge[4], id[3];
    uint64_t  parts, best;

    for (i = 0; i < k; i++) {
        id[i] = enc->byte_rank[b[i]];
    }

    m = k;
    max = 0;
    best = 0;

    for (side = 0; side < 4; side++) {
        edge[side] = TK_NONE;
    }

    for ( ;; ) {

        /* the parts at the edges now: a left one, and a right one */

        for (side = 0; side < 4; side++) {
            i = (side == TK_CHAR_ANY_LEFT || side == TK_CHAR_CONT_LEFT)
                ? 0 : m - 1;

            tk_char_min(&edge[side], min[side * enc->nids + id[i]]);
        }

        if (edge[TK_CHAR_CONT_LEFT] <= max
            || edge[TK_CHAR_LEAD_RIGHT] <= max)
        {
            break;
        }

        if (m < k) {
            parts = 0;

            for (i = m; i > 0; i--) {
                parts = parts << 20 | id[i - 1];
            }

            best = parts << 2 | m;

            if (edge[TK_CHAR_ANY_LEFT] > max) {
                best |= TK_CHAR_LEFT;
            }

            if (edge[TK_CHAR_ANY_RIGHT] > max) {
                best |= TK_CHAR_RIGHT;
            }
        }

        r = TK_NONE;
        min_i = 0;

        for (i = 0; i + 1 < m; i++) {
            if (tk_pair(enc, id[i], id[i + 1]) < r) {
                r = tk_pair(enc, id[i], id[i + 1]);
                min_i = i;
            }
        }

        if (r == TK_NONE) {
            break;
        }

        if (r > max) {
            max = r;
        }

        id[min_i] = r;

        for (i = min_i + 1; i + 1 < m; i++) {
            id[i] = id[i + 1];
        }

        m--;
    }

    return best;
}


static void
tk_char_min(uint32_t *min, uint32_t rank)
{
    if (rank < *min) {
        *min = rank;
    }
}
