/* The event interface (OpenSIPS style): subscriptions of events to socket URIs, raise, and
 * the registry through which socket modules (tcp:, evapi:, ...) plug in their URI scheme.
 * The events module is the hub's event sink (hub_set_event_sink). */
#ifndef TR_EVENTS_H
#define TR_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "hub/core.h"

#define TR_EVENT_NAME_MAX HUB_EVENT_MAX /* bytes in an event name (hub/core.h's rule) */
#define TR_SOCKET_URI_MAX 255           /* bytes in a socket URI, scheme included */
#define TR_SCHEME_MAX     8             /* socket schemes registered at once */

/* One raise as a socket sees it; shared read-only by every delivery of that raise. */
typedef struct tr_event {
    const char *name;   /* valid event name, NUL-terminated */
    const char *params; /* params serialized as compact JSON (an object or an array), or NULL */
    size_t params_len;
    const char *callid; /* the Call-ID of the SIP message whose route raised it, or NULL */
} tr_event;

/* One notification for one subscriber, handed to a scheme's send. The scheme completes it
 * exactly once with tr_delivery_done, now or later (loop thread), and never touches it
 * afterwards. */
typedef struct tr_delivery tr_delivery;

/* The event this delivery carries (valid until tr_delivery_done). */
const tr_event *tr_delivery_event(const tr_delivery *d);
/* The bytes the scheme asked for with room (suitably aligned for any type), part of d: valid
 * until tr_delivery_done. */
void *tr_delivery_room(tr_delivery *d);
/* Loop thread: the delivery ended; status 0 (delivered) or -1 (failed, error says why; may
 * be NULL). Counts it, reports it to the raiser's token if any, and frees d. */
void tr_delivery_done(tr_delivery *d, int status, const char *error);

/* A URI scheme ("tcp", "evapi"): a module's socket kind. The events module shares one
 * socket object per distinct URI among the subscriptions that name it. */
typedef struct tr_scheme {
    const char *name; /* before the ':' */
    /* Any thread: 0 when uri (the whole URI, scheme included) is valid, else -EINVAL with
     * err set to the reason. Pure: no I/O, no state. */
    int (*check)(const char *uri, char *err, size_t errlen);
    /* Loop thread: make the socket for a checked uri. NULL with err set. */
    void *(*open)(void *ud, const char *uri, char *err, size_t errlen);
    /* Loop thread, optional: how many bytes to keep with each delivery of e to sock
     * (tr_delivery_room), so that a send needs no allocation of its own. */
    size_t (*room)(void *ud, void *sock, const tr_event *e);
    /* Loop thread: deliver d through sock; d is the socket's until it is done. */
    void (*send)(void *ud, void *sock, tr_delivery *d);
    /* Loop thread: a word for the listing ("connected", "connecting", "down", ...). */
    const char *(*state)(void *ud, void *sock);
    /* Loop thread: the last subscription let go of sock, or the module stops. Every
     * delivery of sock not yet done is done (failed) before this returns; sock is freed. */
    void (*close)(void *ud, void *sock);
} tr_scheme;

/* Loop thread, from a socket module's init (after the events module's init): register sc
 * (which must outlive the hub) with ud. 0, or -ENOENT (no events module), -EEXIST (name
 * taken) or -ENOSPC (TR_SCHEME_MAX) with err set, prefixed by who (the module's name). */
int tr_events_add_scheme(hub *h, const char *who, const tr_scheme *sc, void *ud, char *err,
                         size_t errlen);
/* Loop thread, from the socket module's stop: close every socket of that scheme (their
 * deliveries are done, failed) and refuse the scheme from now on. NULL-safe on no events. */
void tr_events_remove_scheme(hub *h, const char *name);

/* 0 when name is a valid event name, else -EINVAL. */
int tr_event_name_check(const char *name, size_t len);

/* evapi:TAG: 0 and the tag copied to tag (HUB_TAG_MAX + 1 bytes) when uri is valid, else
 * -EINVAL with err set. */
int tr_evapi_uri_parse(const char *uri, char *tag, char *err, size_t errlen);

/* Subscriptions' expiry arithmetic, kept pure for tests: the deadline for expire_s seconds
 * from now (0 when expire_s is 0: never), and whether a deadline has passed at now. */
double tr_sub_deadline(double now, long expire_s);
int tr_sub_expired(double deadline, double now);

#endif
