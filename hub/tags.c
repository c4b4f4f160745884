/* Tag index: tag -> the clients carrying it, so a multicast touches only those clients. */
#include <errno.h>
#include <string.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"

int hub__tag_valid(const char *tag, size_t len)
{
    if (len == 0 || len > HUB_TAG_MAX)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)tag[i];
        if (ch < 0x21 || ch > 0x7e)
            return 0;
    }
    return 1;
}

static size_t tag_hash(const char *s, size_t len)
{
    uint64_t x = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        x ^= (unsigned char)s[i];
        x *= 1099511628211ULL;
    }
    return (size_t)x;
}

static hub_tag **tag_slot(hub *h, const char *tag, size_t len)
{
    hub_tag **pp = &h->tagtab[tag_hash(tag, len) & (h->tagtab_cap - 1)];
    while (*pp && ((*pp)->len != len || memcmp((*pp)->name, tag, len) != 0))
        pp = &(*pp)->hnext;
    return pp;
}

hub_tag *hub__tag_find(hub *h, const char *tag, size_t len)
{
    if (!h->tagtab || len > HUB_TAG_MAX)
        return NULL;
    return *tag_slot(h, tag, len);
}

uint32_t hub__tag_count(hub *h, const char *tag, size_t len)
{
    uint32_t n = 0;
    pthread_rwlock_rdlock(&h->tags_lock);
    hub_tag *t = hub__tag_find(h, tag, len);
    if (t)
        n = t->count;
    pthread_rwlock_unlock(&h->tags_lock);
    return n;
}

static void tag_remove_client(hub *h, hub_client *c)
{
    hub_tag *t = c->tag;
    if (t->rr == c)
        t->rr = c->tag_next;
    if (c->tag_prev)
        c->tag_prev->tag_next = c->tag_next;
    else
        t->head = c->tag_next;
    if (c->tag_next)
        c->tag_next->tag_prev = c->tag_prev;
    else
        t->tail = c->tag_prev;
    c->tag = NULL;
    c->tag_prev = c->tag_next = NULL;
    if (--t->count == 0) {
        hub_tag **pp = tag_slot(h, t->name, t->len);
        *pp = t->hnext;
        hub_free(t);
        h->ntags--;
    }
}

/* Double the bucket array when chains get long (called with the write lock held). */
static void tags_grow(hub *h)
{
    size_t ncap = h->tagtab_cap * 2;
    hub_tag **n = hub_calloc(ncap, sizeof(*n));
    if (!n)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < h->tagtab_cap; i++) {
        hub_tag *t = h->tagtab[i];
        for (size_t bound = 0; t && bound < SIZE_MAX; bound++) {
            hub_tag *next = t->hnext;
            size_t j = tag_hash(t->name, t->len) & (ncap - 1);
            t->hnext = n[j];
            n[j] = t;
            t = next;
        }
    }
    hub_free(h->tagtab);
    h->tagtab = n;
    h->tagtab_cap = ncap;
}

int hub__tag_set(hub *h, hub_client *c, const char *tag, size_t len)
{
    if (len && !hub__tag_valid(tag, len))
        return -EINVAL;
    if (c->tag && len && c->tag->len == len && memcmp(c->tag->name, tag, len) == 0)
        return 0;
    if (!h->tagtab) {
        if (!len)
            return 0;
        h->tagtab_cap = 256;
        h->tagtab = hub_calloc(h->tagtab_cap, sizeof(*h->tagtab));
        if (!h->tagtab)
            return -ENOMEM;
    }
    int rc = 0;
    pthread_rwlock_wrlock(&h->tags_lock);
    if (c->tag)
        tag_remove_client(h, c);
    if (len) {
        hub_tag **pp = tag_slot(h, tag, len);
        hub_tag *t = *pp;
        if (!t && (t = hub_calloc(1, sizeof(*t)))) {
            memcpy(t->name, tag, len);
            t->len = (uint8_t)len;
            *pp = t;
            if (++h->ntags > h->tagtab_cap * 2)
                tags_grow(h);
        }
        if (t) {
            c->tag = t;
            c->tag_prev = t->tail;
            if (t->tail)
                t->tail->tag_next = c;
            else
                t->head = c;
            t->tail = c;
            t->count++;
        } else {
            rc = -ENOMEM;
        }
    }
    pthread_rwlock_unlock(&h->tags_lock);
    return rc;
}

void hub__tags_free(hub *h)
{
    for (size_t i = 0; h->tagtab && i < h->tagtab_cap; i++) {
        hub_tag *t = h->tagtab[i];
        for (size_t bound = 0; t && bound < SIZE_MAX; bound++) {
            hub_tag *n = t->hnext;
            hub_free(t);
            t = n;
        }
    }
    hub_free(h->tagtab);
    h->tagtab = NULL;
}
