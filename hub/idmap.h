/* A map from 64-bit ids (never 0) to pointers: open addressing, linear probing,
 * backward-shift deletion. Not thread-safe: the owner locks if it must. */
#ifndef HUB_IDMAP_H
#define HUB_IDMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct hub_idmap {
    struct hub_idmap_slot {
        uint64_t id; /* 0 = empty */
        void *p;
    } * slots;
    size_t cap, len;
} hub_idmap;

/* Insert or replace. 0, -EINVAL for id 0, or -ENOMEM (the map is unchanged). */
int hub_idmap_put(hub_idmap *m, uint64_t id, void *p);
/* The pointer stored for id, or NULL. */
void *hub_idmap_get(const hub_idmap *m, uint64_t id);
/* Remove id; returns what was stored, or NULL. */
void *hub_idmap_del(hub_idmap *m, uint64_t id);
/* Release the slots (not what they point to). NULL-safe. */
void hub_idmap_free(hub_idmap *m);

#endif
