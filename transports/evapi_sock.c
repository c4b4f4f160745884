/* The evapi:TAG socket of the event interface: an event raised to it is multicast, as a
 * JSON-RPC 2.0 notification in one frame (a netstring in netstring mode), to the hub's own
 * clients carrying TAG. Delivered when at least one client got it; failed when none has the
 * tag. Nothing is ever in flight: the outcome is known when send returns. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "hub/alloc.h"
#include "hub/core.h"
#include "transports/events.h"

typedef struct evapi_sock {
    hub *h;
    size_t taglen;
    char tag[HUB_TAG_MAX + 1];
} evapi_sock;

static int evapi_check(const char *uri, char *err, size_t errlen)
{
    char tag[HUB_TAG_MAX + 1];
    return tr_evapi_uri_parse(uri, tag, err, errlen);
}

static void *evapi_open(void *ud, const char *uri, char *err, size_t errlen)
{
    evapi_sock *s = hub_calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (tr_evapi_uri_parse(uri, s->tag, err, errlen) < 0) {
        hub_free(s);
        return NULL;
    }
    s->h = ud;
    s->taglen = strlen(s->tag);
    return s;
}

static size_t evapi_room(void *ud, void *sock, const tr_event *e)
{
    (void)ud;
    (void)sock;
    return 64 + strlen(e->name) + e->params_len;
}

static void evapi_send(void *ud, void *sock, tr_delivery *d)
{
    evapi_sock *s = sock;
    const tr_event *e = tr_delivery_event(d);
    size_t cap = evapi_room(ud, sock, e);
    char *doc = tr_delivery_room(d);
    /* event names need no escaping; params is JSON already */
    int n =
        snprintf(doc, cap, "{\"jsonrpc\":\"2.0\",\"method\":\"%s\"%s%.*s}", e->name,
                 e->params ? ",\"params\":" : "", (int)e->params_len, e->params ? e->params : "");
    int rc = hub_multicast(s->h, s->tag, s->taglen, doc, (size_t)n); /* copies doc */
    if (rc > 0) {
        tr_delivery_done(d, 0, NULL);
    } else {
        char why[96];
        snprintf(why, sizeof(why), "%s", rc == 0 ? "no client with that tag" : strerror(-rc));
        tr_delivery_done(d, -1, why);
    }
}

static const char *evapi_state(void *ud, void *sock)
{
    (void)ud;
    (void)sock;
    return "ready";
}

static void evapi_close(void *ud, void *sock)
{
    (void)ud;
    hub_free(sock); /* evapi: delivers at once, so nothing is ever left in flight */
}

static const tr_scheme evapi_scheme = {
    .name = "evapi",
    .check = evapi_check,
    .open = evapi_open,
    .room = evapi_room,
    .send = evapi_send,
    .state = evapi_state,
    .close = evapi_close,
};

static int evapi_sock_init(hub *h, void **state, char *err, size_t errlen)
{
    *state = NULL;
    return tr_events_add_scheme(h, "evapi_sock", &evapi_scheme, h, err, errlen);
}

const hub_module evapi_sock_module = {
    .name = "evapi_sock",
    .init = evapi_sock_init,
};
