/* Allocation hooks: every allocation in hub/ goes through these so tests can inject OOM. */
#ifndef HUB_ALLOC_H
#define HUB_ALLOC_H

#include <stddef.h>

typedef struct hub_allocator {
    void *(*malloc_fn)(size_t);
    void *(*calloc_fn)(size_t, size_t);
    void *(*realloc_fn)(void *, size_t);
    void (*free_fn)(void *);
} hub_allocator;

/* Replace the allocator (NULL restores libc). Not thread-safe: call before starting threads. */
void hub_set_allocator(const hub_allocator *a);

void *hub_malloc(size_t n);
void *hub_calloc(size_t n, size_t size);
void *hub_realloc(void *p, size_t n);
void hub_free(void *p);
/* Returns a hub_malloc'd copy of s[0..len) with a NUL appended, or NULL on OOM. */
char *hub_strndup(const char *s, size_t len);

#endif
