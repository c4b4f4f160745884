/* Pieces of the SIP module that need no hub: parsing a datagram into a request libosip2
 * has checked, and the (index, label) table that names suspended transactions. */
#ifndef TR_SIP_MSG_H
#define TR_SIP_MSG_H

#include <stddef.h>
#include <stdint.h>

struct osip_message;

/* Parse a datagram: 0 with *out (osip_message_free it) when it is a SIP message with the
 * headers a transaction needs (Via, From, To, Call-ID, CSeq; a request line for requests);
 * -1 with *why set, *out NULL, when not. Call tr_sip_parser_init() once first. */
int tr_sip_parser_init(void);
int tr_sip_parse(const char *buf, size_t n, struct osip_message **out, const char **why);

/* Transactions by (index, label), as Kamailio's tm names them: index 1..cap names a slot,
 * label tells its successive occupants apart (never 0, never the one before). */
typedef struct tr_sip_slots {
    void **obj;
    unsigned *label;
    unsigned *free;
    int nfree, cap;
    uint64_t rng; /* labels are random (an application cannot guess a pair it was not sent) */
} tr_sip_slots;

int tr_sip_slots_init(tr_sip_slots *t, int cap); /* 0 or -ENOMEM */
void tr_sip_slots_free(tr_sip_slots *t);
/* Put obj in a free slot: 0 with *index and *label, or -ENOSPC. */
int tr_sip_slots_take(tr_sip_slots *t, void *obj, unsigned *index, unsigned *label);
/* The object at (index, label), or NULL (never taken, released, or another label). */
void *tr_sip_slots_get(const tr_sip_slots *t, unsigned index, unsigned label);
/* Free the slot if (index, label) still names it. */
void tr_sip_slots_release(tr_sip_slots *t, unsigned index, unsigned label);

#endif
