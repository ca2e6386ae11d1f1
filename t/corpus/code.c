/*
 * ring.c: a tiny ring buffer, written for the tokenizer test corpus.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RING_SIZE  16

typedef struct {
    unsigned char  data[RING_SIZE];
    size_t         head;
    size_t         tail;
    size_t         count;
} ring_t;


static int
ring_push(ring_t *r, unsigned char c)
{
    if (r->count == RING_SIZE) {
        return -1;
    }

    r->data[r->head] = c;
    r->head = (r->head + 1) % RING_SIZE;
    r->count++;

    return 0;
}


static int
ring_pop(ring_t *r, unsigned char *c)
{
    if (r->count == 0) {
        return -1;
    }

    *c = r->data[r->tail];
    r->tail = (r->tail + 1) & (RING_SIZE - 1);
    r->count--;

    return 0;
}


int
main(int argc, char **argv)
{
    ring_t         r;
    unsigned char  c;
    int            i, n;

    memset(&r, 0, sizeof(ring_t));
    n = argc > 1 ? atoi(argv[1]) : 20;

    for (i = 0; i < n; i++) {
        if (ring_push(&r, (unsigned char) ('a' + i % 26)) != 0) {
            fprintf(stderr, "full after %d pushes\n", i);
            break;
        }
    }

    while (ring_pop(&r, &c) == 0) {
        putchar(c);
    }

    printf("\n0x%08x %lu %5.2f%%\n", 0xdeadbeefU, (unsigned long) n,
           100.0 * n / RING_SIZE);

    return r.count == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
