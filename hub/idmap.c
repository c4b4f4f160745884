/* Map from 64-bit ids to pointers (see idmap.h). */
#include <errno.h>

#include "hub/alloc.h"
#include "hub/idmap.h"

static size_t id_hash(uint64_t id, size_t cap)
{
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdULL;
    id ^= id >> 33;
    return (size_t)id & (cap - 1);
}

static int grow(hub_idmap *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64;
    struct hub_idmap_slot *n = hub_calloc(ncap, sizeof(*n));
    if (!n)
        return -ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].id)
            continue;
        size_t j = id_hash(m->slots[i].id, ncap);
        while (n[j].id)
            j = (j + 1) & (ncap - 1);
        n[j] = m->slots[i];
    }
    hub_free(m->slots);
    m->slots = n;
    m->cap = ncap;
    return 0;
}

/* Index of id's slot, or of the empty slot where it would go. The map is never full. */
static size_t find(const hub_idmap *m, uint64_t id)
{
    size_t j = id_hash(id, m->cap);
    while (m->slots[j].id && m->slots[j].id != id)
        j = (j + 1) & (m->cap - 1);
    return j;
}

int hub_idmap_put(hub_idmap *m, uint64_t id, void *p)
{
    if (!id)
        return -EINVAL;
    /* Keep the load under one half so probe runs stay short. */
    if ((m->len + 1) * 2 > m->cap && grow(m) < 0)
        return -ENOMEM;
    size_t j = find(m, id);
    if (!m->slots[j].id) {
        m->slots[j].id = id;
        m->len++;
    }
    m->slots[j].p = p;
    return 0;
}

void *hub_idmap_get(const hub_idmap *m, uint64_t id)
{
    if (!m->cap || !id)
        return NULL;
    size_t j = find(m, id);
    return m->slots[j].id ? m->slots[j].p : NULL;
}

void *hub_idmap_del(hub_idmap *m, uint64_t id)
{
    if (!m->cap || !id)
        return NULL;
    size_t mask = m->cap - 1, i = find(m, id);
    if (!m->slots[i].id)
        return NULL;
    void *p = m->slots[i].p;
    /* Shift later members of the probe run back so lookups never stop early. */
    for (size_t j = i, n = 0; n < m->cap; n++) {
        m->slots[i].id = 0;
        size_t k;
        do {
            j = (j + 1) & mask;
            if (!m->slots[j].id)
                goto done;
            k = id_hash(m->slots[j].id, m->cap);
            /* j may fill the hole at i unless its home k lies cyclically in (i, j] */
        } while (i <= j ? (i < k && k <= j) : (i < k || k <= j));
        m->slots[i] = m->slots[j];
        i = j;
    }
done:
    m->len--;
    return p;
}

void hub_idmap_free(hub_idmap *m)
{
    if (!m)
        return;
    hub_free(m->slots);
    m->slots = NULL;
    m->cap = m->len = 0;
}
