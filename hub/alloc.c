/* Allocation hooks (see alloc.h). */
#include "hub/alloc.h"

#include <stdlib.h>
#include <string.h>

static hub_allocator current = {malloc, calloc, realloc, free};

void hub_set_allocator(const hub_allocator *a)
{
    if (a) {
        current = *a;
    } else {
        current = (hub_allocator){malloc, calloc, realloc, free};
    }
}

void *hub_malloc(size_t n) { return current.malloc_fn(n); }

void *hub_calloc(size_t n, size_t size) { return current.calloc_fn(n, size); }

void *hub_realloc(void *p, size_t n) { return current.realloc_fn(p, n); }

void hub_free(void *p)
{
    if (p)
        current.free_fn(p);
}

char *hub_strndup(const char *s, size_t len)
{
    char *d = hub_malloc(len + 1);
    if (!d)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}
