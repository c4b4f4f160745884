/* See sip_msg.h. */
#include <sys/time.h>
#include <time.h>

#include "transports/sip_msg.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>

#include <osipparser2/osip_parser.h>

#include "hub/alloc.h"

int tr_sip_parser_init(void) { return parser_init() == 0 ? 0 : -1; }

int tr_sip_parse(const char *buf, size_t n, struct osip_message **out, const char **why)
{
    osip_message_t *msg = NULL;
    *out = NULL;
    *why = NULL;
    if (osip_message_init(&msg) != 0) {
        *why = "out of memory";
        return -1;
    }
    if (osip_message_parse(msg, buf, n) != 0)
        *why = "not a SIP message";
    else if (!msg->call_id || !msg->call_id->number || !msg->cseq || !msg->cseq->method ||
             !msg->cseq->number || !msg->from || !msg->to || osip_list_size(&msg->vias) < 1)
        *why = "a header SIP requires is missing (Via, From, To, Call-ID, CSeq)";
    else if (MSG_IS_REQUEST(msg) && (!msg->sip_method || !msg->req_uri))
        *why = "no request line";
    if (*why) {
        osip_message_free(msg);
        return -1;
    }
    *out = msg;
    return 0;
}

int tr_sip_slots_init(tr_sip_slots *t, int cap)
{
    memset(t, 0, sizeof(*t));
    t->obj = hub_calloc((size_t)cap, sizeof(*t->obj));
    t->label = hub_calloc((size_t)cap, sizeof(*t->label));
    t->free = hub_malloc((size_t)cap * sizeof(*t->free));
    if (!t->obj || !t->label || !t->free) {
        tr_sip_slots_free(t);
        return -ENOMEM;
    }
    t->cap = cap;
    if (getrandom(&t->rng, sizeof(t->rng), GRND_NONBLOCK) != sizeof(t->rng))
        t->rng = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)t;
    t->rng |= 1;
    for (int i = 0; i < cap; i++)
        t->free[i] = (unsigned)(cap - i); /* index 1 is taken first */
    t->nfree = cap;
    return 0;
}

void tr_sip_slots_free(tr_sip_slots *t)
{
    hub_free(t->obj);
    hub_free(t->label);
    hub_free(t->free);
    memset(t, 0, sizeof(*t));
}

int tr_sip_slots_take(tr_sip_slots *t, void *obj, unsigned *index, unsigned *label)
{
    if (t->nfree == 0)
        return -ENOSPC;
    unsigned i = t->free[--t->nfree], l;
    do { /* xorshift64*: never 0, never what the slot had */
        t->rng ^= t->rng >> 12;
        t->rng ^= t->rng << 25;
        t->rng ^= t->rng >> 27;
        l = (unsigned)((t->rng * 2685821657736338717ull) >> 32);
    } while (l == 0 || l == t->label[i - 1]);
    t->obj[i - 1] = obj;
    t->label[i - 1] = l;
    *index = i;
    *label = l;
    return 0;
}

void *tr_sip_slots_get(const tr_sip_slots *t, unsigned index, unsigned label)
{
    if (index < 1 || index > (unsigned)t->cap || label == 0 || t->label[index - 1] != label)
        return NULL;
    return t->obj[index - 1];
}

void tr_sip_slots_release(tr_sip_slots *t, unsigned index, unsigned label)
{
    if (!tr_sip_slots_get(t, index, label))
        return;
    t->obj[index - 1] = NULL;
    t->label[index - 1] = label; /* kept, so the next occupant's differs */
    t->free[t->nfree++] = index;
}
