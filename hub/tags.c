/* Tag index: tag -> the clients carrying it, so a multicast touches only those clients.
 *
 * Two views of a tag are kept. Membership (the client list) belongs to the loop thread, which
 * delivers through it. Intent (which tag each connection id should carry) is updated at once
 * by whoever sets a tag, from any thread, under tags_lock; it answers "does anyone carry this
 * tag?" for a worker whose own set_tag is still on its way to the loop. Only the loop thread
 * frees a tag, when it has neither members nor intents. */
#include <errno.h>
#include <string.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"

int hub_tag_valid(const char *tag, size_t len)
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

/* Callers hold tags_lock. */
static hub_tag **tag_slot(hub *h, const char *tag, size_t len)
{
    hub_tag **pp = &h->tagtab[tag_hash(tag, len) & (h->tagtab_cap - 1)];
    while (*pp && ((*pp)->len != len || memcmp((*pp)->name, tag, len) != 0))
        pp = &(*pp)->hnext;
    return pp;
}

/* Double the bucket array when chains get long (write lock held). */
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

/* Find or create (write lock held). NULL on OOM. */
static hub_tag *tag_get(hub *h, const char *tag, size_t len)
{
    if (!h->tagtab) {
        h->tagtab = hub_calloc(256, sizeof(*h->tagtab));
        if (!h->tagtab)
            return NULL;
        h->tagtab_cap = 256;
    }
    hub_tag **pp = tag_slot(h, tag, len);
    if (*pp)
        return *pp;
    hub_tag *t = hub_calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    memcpy(t->name, tag, len);
    t->len = (uint8_t)len;
    *pp = t;
    if (++h->ntags > h->tagtab_cap * 2)
        tags_grow(h);
    return t;
}

/* Loop thread, write lock held. */
static void tag_maybe_free(hub *h, hub_tag *t)
{
    if (t->nmembers || t->intended || t->gc_listed)
        return;
    hub_tag **pp = tag_slot(h, t->name, t->len);
    *pp = t->hnext;
    hub_free(t);
    h->ntags--;
}

/* The tag, or NULL (a lock held). */
static hub_tag *tag_lookup(hub *h, const char *tag, size_t len)
{
    return len <= HUB_TAG_MAX && h->tagtab ? *tag_slot(h, tag, len) : NULL;
}

hub_tag *hub__tag_find(hub *h, const char *tag, size_t len)
{
    /* Workers may insert (and grow the table) concurrently; they never free. */
    pthread_rwlock_rdlock(&h->tags_lock);
    hub_tag *t = tag_lookup(h, tag, len);
    pthread_rwlock_unlock(&h->tags_lock);
    return t;
}

size_t hub__tag_intended(hub *h, uint64_t id, char out[HUB_TAG_MAX + 1])
{
    size_t len = 0;
    pthread_rwlock_rdlock(&h->tags_lock);
    hub_tag *t = hub_idmap_get(&h->intents, id);
    if (t) {
        len = t->len;
        memcpy(out, t->name, len);
    }
    pthread_rwlock_unlock(&h->tags_lock);
    out[len] = '\0';
    return len;
}

uint32_t hub__tag_count(hub *h, const char *tag, size_t len)
{
    pthread_rwlock_rdlock(&h->tags_lock);
    hub_tag *t = tag_lookup(h, tag, len);
    uint32_t n = t ? t->intended : 0;
    pthread_rwlock_unlock(&h->tags_lock);
    return n;
}

void hub__tags_sweep(hub *h)
{
    if (!atomic_load(&h->tag_gc_pending))
        return;
    pthread_rwlock_wrlock(&h->tags_lock);
    for (hub_tag *t = h->tag_gc, *next; t; t = next) {
        next = t->gc_next;
        t->gc_listed = 0;
        tag_maybe_free(h, t);
    }
    h->tag_gc = NULL;
    atomic_store(&h->tag_gc_pending, 0);
    pthread_rwlock_unlock(&h->tags_lock);
}

/* Drop a tag nobody uses any more (write lock held): now from the loop; from a worker, listed
 * for hub__tags_sweep, since only the loop frees tags. */
static void tag_release(hub *h, hub_tag *t, int loop_thread)
{
    if (loop_thread) {
        tag_maybe_free(h, t);
    } else if (!t->nmembers && !t->intended && !t->gc_listed) {
        t->gc_listed = 1;
        t->gc_next = h->tag_gc;
        h->tag_gc = t;
        atomic_store(&h->tag_gc_pending, 1);
    }
}

int hub__tag_intent(hub *h, uint64_t id, const char *tag, size_t len, int loop_thread)
{
    int rc = 0;
    if (len && !hub_tag_valid(tag, len))
        return -EINVAL;
    if (!id)
        return -ENOENT;
    pthread_rwlock_wrlock(&h->tags_lock);
    hub_tag *old = hub_idmap_get(&h->intents, id);
    hub_tag *t = len ? tag_get(h, tag, len) : NULL;
    if (len && !t) {
        rc = -ENOMEM;
    } else if (t != old) {
        if (t && hub_idmap_put(&h->intents, id, t) < 0) {
            rc = -ENOMEM;
        } else {
            if (t)
                t->intended++;
            else
                hub_idmap_del(&h->intents, id);
            if (old) {
                old->intended--;
                tag_release(h, old, loop_thread);
            }
        }
    }
    if (t)
        tag_release(h, t, loop_thread); /* only when the put above failed */
    pthread_rwlock_unlock(&h->tags_lock);
    return rc;
}

static void tag_remove_member(hub *h, hub_client *c)
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
    t->nmembers--;
    tag_maybe_free(h, t);
}

/* Members are kept in conidx order: Kamailio's unicast picks the lowest slot with the tag,
 * and multicast walks its array in slot order. */
static void tag_insert_member(hub_tag *t, hub_client *c)
{
    hub_client *after = t->tail;
    while (after && after->info.conidx > c->info.conidx)
        after = after->tag_prev;
    c->tag = t;
    c->tag_prev = after;
    c->tag_next = after ? after->tag_next : t->head;
    if (c->tag_next)
        c->tag_next->tag_prev = c;
    else
        t->tail = c;
    if (after)
        after->tag_next = c;
    else
        t->head = c;
}

int hub__tag_set(hub *h, hub_client *c, const char *tag, size_t len)
{
    int rc = 0;
    if (len && !hub_tag_valid(tag, len))
        return -EINVAL;
    if (c->tag && len && c->tag->len == len && memcmp(c->tag->name, tag, len) == 0)
        return 0;
    if (!c->tag && !len)
        return 0;
    /* A router hears of a tag's first local member and of its last (hub_router). */
    const hub_router *r = h->router && h->router->tag_members ? h->router : NULL;
    char gone[HUB_TAG_MAX + 1];
    size_t gone_len = 0;
    int first = 0;
    pthread_rwlock_wrlock(&h->tags_lock);
    hub_tag *t = len ? tag_get(h, tag, len) : NULL;
    if (len && !t) {
        rc = -ENOMEM;
    } else {
        if (t)
            t->nmembers++; /* before the old tag goes, so t cannot be freed with it */
        if (c->tag) {
            if (r && c->tag->head == c && !c->tag_next) {
                gone_len = c->tag->len;
                memcpy(gone, c->tag->name, gone_len);
            }
            tag_remove_member(h, c);
        }
        if (t) {
            first = r && !t->head;
            tag_insert_member(t, c);
        }
    }
    pthread_rwlock_unlock(&h->tags_lock);
    /* After the lock: the router may look at tags (hub_tag_count...) */
    if (gone_len)
        r->tag_members(h->router_ud, gone, gone_len, 0);
    if (first)
        r->tag_members(h->router_ud, tag, len, 1);
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
    h->tagtab_cap = h->ntags = 0;
    hub_idmap_free(&h->intents);
}
