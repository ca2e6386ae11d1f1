
/*
 * Copyright (C) The token budget authors
 *
 * tk: an exact byte-level BPE tokenizer compatible with tiktoken.
 * No nginx headers: the library builds and tests alone.
 */


#ifndef _TK_H_INCLUDED_
#define _TK_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


#define TK_OK          0
#define TK_ERROR      -1
#define TK_ENOMEM     -2


typedef enum {
    TK_PAT_R50K = 0,      /* r50k_base, p50k_base: the GPT-2 rule */
    TK_PAT_CL100K,        /* cl100k_base */
    TK_PAT_O200K          /* o200k_base */
} tk_pattern_e;


typedef struct tk_encoding_s  tk_encoding_t;


typedef struct {
    void       *(*alloc)(void *data, size_t size);
    void        (*free)(void *data, void *p);
    void         *data;
} tk_allocator_t;


/*
 * Incremental counter: feed text in any chunks; tk_counter_finish()
 * returns exactly tk_count() of the concatenation.
 */

typedef struct {
    const tk_encoding_t  *enc;
    tk_allocator_t        allocator;
    uint64_t              count;       /* tokens of committed text */
    unsigned char        *buf;         /* pending, uncommitted text */
    size_t                len;
    size_t                size;
    size_t                scanned;     /* len at the last scan */
    int                   error;
} tk_counter_t;


/* unicode classes, tk_unicode.c */

#define TK_U_LU   0x01
#define TK_U_LL   0x02
#define TK_U_LT   0x04
#define TK_U_LM   0x08
#define TK_U_LO   0x10
#define TK_U_M    0x20
#define TK_U_N    0x40
#define TK_U_WS   0x80

#define TK_U_L    (TK_U_LU|TK_U_LL|TK_U_LT|TK_U_LM|TK_U_LO)

extern const uint16_t  tk_unicode_stage1[0x110000 >> 8];
extern const uint8_t   tk_unicode_stage2[];

#define tk_unicode_class(cp)                                                  \
    tk_unicode_stage2[((size_t) tk_unicode_stage1[(cp) >> 8] << 8)            \
                      + ((cp) & 0xff)]


/* encodings */

int tk_pattern_by_name(const char *name, tk_pattern_e *pattern);
const char *tk_encoding_for_model(const char *model);

tk_encoding_t *tk_encoding_load(const char *path, tk_pattern_e pattern,
    const tk_allocator_t *allocator, char *err, size_t errlen);
tk_encoding_t *tk_encoding_parse(const unsigned char *data, size_t len,
    tk_pattern_e pattern, const tk_allocator_t *allocator, char *err,
    size_t errlen);
void tk_encoding_free(tk_encoding_t *enc);
size_t tk_encoding_memory(const tk_encoding_t *enc);
uint32_t tk_encoding_vocab_size(const tk_encoding_t *enc);


/*
 * Counting and encoding, as tiktoken's encode_ordinary().  Each returns
 * the number of tokens, or TK_ENOMEM when scratch memory for a long piece
 * could not be allocated.  tk_encode() stores at most "max" ids and returns
 * the full count.
 */

int64_t tk_count(const tk_encoding_t *enc, const unsigned char *text,
    size_t len);
int64_t tk_encode(const tk_encoding_t *enc, const unsigned char *text,
    size_t len, uint32_t *ids, size_t max);

/* returns the number of bytes the ids decode to, or TK_ERROR on a bad id */
int64_t tk_decode(const tk_encoding_t *enc, const uint32_t *ids, size_t n,
    unsigned char *buf, size_t size);

void tk_counter_init(tk_counter_t *c, const tk_encoding_t *enc);
int tk_counter_feed(tk_counter_t *c, const unsigned char *p, size_t len);
int64_t tk_counter_finish(tk_counter_t *c);
/* committed count plus the pending text counted as if it ended here */
int64_t tk_counter_peek(tk_counter_t *c);
void tk_counter_free(tk_counter_t *c);


/* the pre-tokeniser: the length of the piece at p, end > p */

size_t tk_piece(tk_pattern_e pattern, const unsigned char *p,
    const unsigned char *end);


#endif /* _TK_H_INCLUDED_ */
