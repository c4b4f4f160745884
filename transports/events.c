/* The events module: subscriptions (event -> socket URI, with an optional expiry), raise
 * (one JSON-RPC 2.0 notification per subscriber, through the socket's scheme), reports to
 * the raiser's completion token, per-socket counters, the [events] section, the control
 * commands subscribe/unsubscribe/subscriptions/raise. Socket kinds plug in as schemes
 * (tcp.c, evapi_sock.c). Everything here runs on the loop thread except check and stats. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ev.h>
#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/control.h"
#include "hub/core.h"
#include "hub/log.h"
#include "transports/events.h"
#include "transports/json_text.h"

#define SRC_CONFIG  0
#define SRC_SCRIPT  1
#define SRC_CONTROL 2
static const char *const src_names[] = {"config", "script", "control"};

#define EVENTS_MAX_SUBS 65536     /* subscriptions at once: a runaway script cannot eat memory */
#define SCRATCH_KEEP    (1 << 20) /* params' text buffer kept between raises, at most */

typedef struct events_state events_state;

/* One distinct socket URI, shared by the subscriptions naming it. The counters are read by
 * stats from any thread. */
typedef struct ev_sock {
    struct ev_sock *next;
    events_state *es;
    int scheme; /* index in es->schemes */
    void *handle;
    int refs; /* subscriptions */
    _Atomic uint64_t raised, delivered, failed, queued;
    char uri[];
} ev_sock;

typedef struct ev_sub {
    struct ev_sub *next;
    ev_sock *sock;
    int source;
    int removed;
    double deadline; /* ev_now() based; 0: never */
    uint64_t delivered, failed;
    size_t inflight; /* deliveries not done: the sub is freed when removed and 0 */
    char event[TR_EVENT_NAME_MAX + 1];
} ev_sub;

/* One raise, shared by its deliveries. */
typedef struct raise_rec {
    tr_event ev;
    char *ctx; /* ev.callid's copy */
    uint64_t token;
    size_t pending; /* reports still to come (for "more") */
    size_t refs;    /* deliveries alive, plus the raise itself while it sends */
    char name[TR_EVENT_NAME_MAX + 1];
    char text[]; /* ev.params */
} raise_rec;

struct tr_delivery {
    raise_rec *r;
    ev_sub *sub;
    ev_sock *sock;
    max_align_t room[]; /* the scheme's (tr_scheme.room) */
};

typedef struct scheme_slot {
    const tr_scheme *sc;
    void *ud;
    atomic_int dead; /* removed at stop: check still reads the table from other threads */
} scheme_slot;

/* [events] */
typedef struct events_conf {
    hub_conf_list subscribe;
} events_conf;

struct events_state {
    hub *h;
    struct ev_loop *loop;
    scheme_slot schemes[TR_SCHEME_MAX];
    atomic_int nschemes;
    ev_sub *subs;
    size_t nsubs;
    ev_sock *socks;       /* changed under lock (stats walks it from any thread) */
    pthread_mutex_t lock; /* guards the socks list's links */
    ev_timer expiry;
    tr_buf scratch; /* params' text, reused from raise to raise */
    _Atomic uint64_t raises;
};

/* Counters are written by the loop thread only and read by stats from any thread: a relaxed
 * load and store (no locked read-modify-write) is enough for a single writer. */
static inline void bump(_Atomic uint64_t *c, int64_t d)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + (uint64_t)d,
                          memory_order_relaxed);
}

/* ---- names and URIs ---- */

int tr_event_name_check(const char *name, size_t len)
{
    /* The hub's one rule (hub_event_name_valid), on a name that may not end in a NUL. */
    char nul[TR_EVENT_NAME_MAX + 1];
    if (!name || len == 0 || len > TR_EVENT_NAME_MAX)
        return -EINVAL;
    memcpy(nul, name, len);
    nul[len] = '\0';
    return hub_event_name_valid(nul) ? 0 : -EINVAL;
}

int tr_evapi_uri_parse(const char *uri, char *tag, char *err, size_t errlen)
{
    if (strncmp(uri, "evapi:", 6) != 0) {
        snprintf(err, errlen, "not an evapi: socket");
        return -EINVAL;
    }
    const char *t = uri + 6;
    size_t n = strlen(t);
    if (n == 0 || n > HUB_TAG_MAX) {
        snprintf(err, errlen, "evapi: needs a tag of 1..%d bytes", HUB_TAG_MAX);
        return -EINVAL;
    }
    if (!hub_tag_valid(t, n)) {
        snprintf(err, errlen, "evapi: tag has a space or a non-printable byte");
        return -EINVAL;
    }
    memcpy(tag, t, n + 1);
    return 0;
}

double tr_sub_deadline(double now, long expire_s) { return expire_s > 0 ? now + expire_s : 0; }

int tr_sub_expired(double deadline, double now) { return deadline > 0 && deadline <= now; }

/* The slot of uri's scheme, or -1 with err set. Any thread. */
static int scheme_of(events_state *es, const char *uri, char *err, size_t errlen)
{
    const char *colon = strchr(uri, ':');
    size_t n = colon ? (size_t)(colon - uri) : 0;
    int ns = atomic_load(&es->nschemes);
    for (int i = 0; colon && i < ns; i++) {
        const tr_scheme *sc = es->schemes[i].sc;
        if (strlen(sc->name) == n && !memcmp(sc->name, uri, n)) {
            if (atomic_load(&es->schemes[i].dead)) {
                snprintf(err, errlen, "socket module '%s' has stopped", sc->name);
                return -1;
            }
            return i;
        }
    }
    char known[64] = "";
    for (int i = 0; i < ns; i++) {
        size_t k = strlen(known);
        snprintf(known + k, sizeof(known) - k, "%s%s:", i ? ", " : "", es->schemes[i].sc->name);
    }
    snprintf(err, errlen, "unknown socket '%.*s' (known: %s)", 40, uri, known);
    return -1;
}

static int name_fail(char *err, size_t errlen)
{
    snprintf(err, errlen, "invalid event name (1..%d letters, digits, '_', '.', '-')",
             TR_EVENT_NAME_MAX);
    return -EINVAL;
}

/* Event name and socket URI both valid: the slot of the scheme, or <0 with err. */
static int check_pair(events_state *es, const char *event, const char *socket, char *err,
                      size_t errlen)
{
    if (!event || tr_event_name_check(event, strlen(event)) < 0)
        return name_fail(err, errlen);
    if (!socket || strlen(socket) > TR_SOCKET_URI_MAX) {
        snprintf(err, errlen, "socket URI missing or longer than %d bytes", TR_SOCKET_URI_MAX);
        return -EINVAL;
    }
    int i = scheme_of(es, socket, err, errlen);
    if (i < 0)
        return -EINVAL;
    if (es->schemes[i].sc->check(socket, err, errlen) < 0)
        return -EINVAL;
    return i;
}

/* ---- sockets and subscriptions ---- */

static ev_sock *sock_find(events_state *es, const char *uri)
{
    for (ev_sock *s = es->socks; s; s = s->next) {
        if (!strcmp(s->uri, uri))
            return s;
    }
    return NULL;
}

static void sock_unlink(events_state *es, ev_sock *s)
{
    pthread_mutex_lock(&es->lock);
    for (ev_sock **pp = &es->socks; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    pthread_mutex_unlock(&es->lock);
}

/* Close the socket's handle, if open, which finishes its deliveries. The handle is cleared
 * first, so that nothing the scheme's close does can reach it again. */
static void close_handle(events_state *es, ev_sock *s)
{
    if (s->handle) {
        const scheme_slot *sl = &es->schemes[s->scheme];
        void *hd = s->handle;
        s->handle = NULL;
        sl->sc->close(sl->ud, hd);
    }
}

/* Close the socket's handle and free it. */
static void sock_close(events_state *es, ev_sock *s)
{
    close_handle(es, s);
    sock_unlink(es, s);
    hub_free(s);
}

static ev_sock *sock_get(events_state *es, int scheme, const char *uri, char *err, size_t errlen)
{
    ev_sock *s = sock_find(es, uri);
    if (s)
        return s;
    size_t n = strlen(uri);
    s = hub_calloc(1, sizeof(*s) + n + 1);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    memcpy(s->uri, uri, n + 1);
    s->es = es;
    s->scheme = scheme;
    const scheme_slot *sl = &es->schemes[scheme];
    s->handle = sl->sc->open(sl->ud, uri, err, errlen);
    if (!s->handle) {
        hub_free(s);
        return NULL;
    }
    ev_sock **pp = &es->socks; /* appended: stats list sockets in the order they came */
    while (*pp)
        pp = &(*pp)->next;
    pthread_mutex_lock(&es->lock);
    *pp = s;
    pthread_mutex_unlock(&es->lock);
    return s;
}

/* The link (in es->subs) to event's subscription of uri, or NULL: unsubscribe needs the
 * link to unlink it. */
static ev_sub **sub_link(events_state *es, const char *event, const char *uri)
{
    for (ev_sub **pp = &es->subs; *pp; pp = &(*pp)->next) {
        if (!strcmp((*pp)->event, event) && !strcmp((*pp)->sock->uri, uri))
            return pp;
    }
    return NULL;
}

static ev_sub *sub_find(events_state *es, const char *event, const char *uri)
{
    ev_sub **pp = sub_link(es, event, uri);
    return pp ? *pp : NULL;
}

static void expiry_arm(events_state *es)
{
    double first = 0;
    for (ev_sub *s = es->subs; s; s = s->next) {
        if (s->deadline > 0 && (first == 0 || s->deadline < first))
            first = s->deadline;
    }
    ev_timer_stop(es->loop, &es->expiry);
    if (first > 0) {
        double after = first - ev_now(es->loop);
        ev_timer_set(&es->expiry, after > 0 ? after : 0, 0);
        ev_timer_start(es->loop, &es->expiry);
    }
}

/* Unlink s (from the list, by pointer to its link) and let go of its socket. */
static void sub_remove(events_state *es, ev_sub **link)
{
    ev_sub *s = *link;
    *link = s->next;
    es->nsubs--;
    s->removed = 1;
    s->inflight++; /* held while the socket closes: its deliveries finish now, s's included */
    ev_sock *sock = s->sock;
    if (--sock->refs == 0)
        sock_close(es, sock);
    if (--s->inflight == 0)
        hub_free(s);
}

static int subscribe(events_state *es, const char *event, const char *uri, long expire_s,
                     int source, char *err, size_t errlen)
{
    int sc = check_pair(es, event, uri, err, errlen);
    if (sc < 0)
        return sc;
    if (expire_s < 0) {
        snprintf(err, errlen, "expire must be >= 0 seconds");
        return -EINVAL;
    }
    double now = ev_now(es->loop);
    ev_sub *s = sub_find(es, event, uri);
    if (s) {
        /* Subscribing again renews the expiry (OpenSIPS does the same); one from the config
         * stays permanent. */
        if (s->source != SRC_CONFIG) {
            s->deadline = tr_sub_deadline(now, expire_s);
            s->source = source;
        }
        expiry_arm(es);
        return 0;
    }
    if (es->nsubs >= EVENTS_MAX_SUBS) {
        snprintf(err, errlen, "too many subscriptions (%d)", EVENTS_MAX_SUBS);
        return -ENOSPC;
    }
    s = hub_calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->sock = sock_get(es, sc, uri, err, errlen);
    if (!s->sock) {
        hub_free(s);
        return -EINVAL;
    }
    s->sock->refs++;
    memcpy(s->event, event, strlen(event) + 1);
    s->source = source;
    s->deadline = source == SRC_CONFIG ? 0 : tr_sub_deadline(now, expire_s);
    /* appended, so listings and deliveries follow subscription order */
    ev_sub **pp = &es->subs;
    while (*pp)
        pp = &(*pp)->next;
    *pp = s;
    es->nsubs++;
    if (s->deadline > 0)
        expiry_arm(es);
    hub_log(HUB_LOG_INFO, "events: %s subscribed to %s (%s%s)", uri, event, src_names[source],
            s->deadline > 0 ? ", expires" : "");
    return 0;
}

static int unsubscribe(events_state *es, const char *event, const char *uri, char *err,
                       size_t errlen)
{
    ev_sub **pp = sub_link(es, event, uri);
    if (!pp) {
        snprintf(err, errlen, "no subscription of %s to %s", uri, event);
        return -ENOENT;
    }
    sub_remove(es, pp);
    expiry_arm(es);
    hub_log(HUB_LOG_INFO, "events: %s unsubscribed from %s", uri, event);
    return 0;
}

static void expiry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    events_state *es = w->data;
    double now = ev_now(loop);
    (void)revents;
    for (ev_sub **pp = &es->subs; *pp;) {
        if (tr_sub_expired((*pp)->deadline, now)) {
            hub_log(HUB_LOG_INFO, "events: subscription of %s to %s expired", (*pp)->sock->uri,
                    (*pp)->event);
            sub_remove(es, pp);
        } else {
            pp = &(*pp)->next;
        }
    }
    expiry_arm(es);
}

/* ---- raise and deliveries ---- */

const tr_event *tr_delivery_event(const tr_delivery *d) { return &d->r->ev; }

void *tr_delivery_room(tr_delivery *d) { return d->room; }

static void raise_unref(raise_rec *r)
{
    if (--r->refs == 0) {
        hub_free(r->ctx);
        hub_free(r);
    }
}

/* Report one outcome to r's token. hub_complete goes through the mailbox, so the report
 * function never runs inside a socket's callback. */
static void report(events_state *es, raise_rec *r, const char *socket, int status,
                   const char *error)
{
    json_object *o = json_object_new_object();
    r->pending--;
    if (!o) {
        hub_log(HUB_LOG_ERR, "events: out of memory reporting %s to token %llu", r->name,
                (unsigned long long)r->token);
        return;
    }
    json_object_object_add(o, "event", json_object_new_string(r->name));
    if (socket)
        json_object_object_add(o, "socket", json_object_new_string(socket));
    json_object_object_add(o, "status", json_object_new_int(status));
    if (status != 0)
        json_object_object_add(o, "error", json_object_new_string(error ? error : "failed"));
    json_object_object_add(o, "more", json_object_new_boolean(r->pending > 0));
    hub_complete(es->h, r->token, o); /* o's reference passes */
}

void tr_delivery_done(tr_delivery *d, int status, const char *error)
{
    ev_sock *sock = d->sock;
    events_state *es = sock->es;
    ev_sub *sub = d->sub;
    bump(&sock->queued, -1);
    if (status == 0) {
        bump(&sock->delivered, 1);
        sub->delivered++;
    } else {
        bump(&sock->failed, 1);
        sub->failed++;
        hub_log(HUB_LOG_DEBUG, "events: %s to %s failed: %s", d->r->name, sock->uri,
                error ? error : "failed");
    }
    if (d->r->token)
        report(es, d->r, sock->uri, status, error);
    if (--sub->inflight == 0 && sub->removed)
        hub_free(sub);
    raise_unref(d->r);
    hub_free(d);
}

/* One delivery of r to sub. */
static void deliver(events_state *es, raise_rec *r, ev_sub *sub)
{
    ev_sock *sock = sub->sock;
    const scheme_slot *sl = &es->schemes[sock->scheme];
    size_t room = sock->handle && sl->sc->room ? sl->sc->room(sl->ud, sock->handle, &r->ev) : 0;
    tr_delivery *d = hub_malloc(sizeof(*d) + room);
    bump(&sock->raised, 1);
    if (!d) {
        bump(&sock->failed, 1);
        sub->failed++;
        if (r->token)
            report(es, r, sock->uri, -1, "out of memory");
        return;
    }
    d->r = r;
    d->sub = sub;
    d->sock = sock;
    r->refs++;
    sub->inflight++;
    bump(&sock->queued, 1);
    if (!sock->handle) {
        tr_delivery_done(d, -1, "the socket is closed (its module stopped)");
        return;
    }
    sl->sc->send(sl->ud, sock->handle, d); /* d is the socket's now */
}

static int do_raise(events_state *es, const char *event, json_object *params, uint64_t token,
                    char *err, size_t errlen)
{
    if (tr_event_name_check(event, event ? strlen(event) : 0) < 0) {
        json_object_put(params);
        return name_fail(err, errlen);
    }
    if (params && !json_object_is_type(params, json_type_object) &&
        !json_object_is_type(params, json_type_array)) {
        snprintf(err, errlen, "params must be an object, an array or nothing");
        json_object_put(params);
        return -EINVAL;
    }
    size_t n = 0;
    for (ev_sub *s = es->subs; s; s = s->next)
        n += !strcmp(s->event, event);
    bump(&es->raises, 1);
    /* Serialized once for every subscriber (and not at all for none), then the tree goes:
     * the text is all a socket needs. */
    int has = params != NULL;
    es->scratch.len = 0;
    int rc = has && n ? tr_json_append(&es->scratch, params) : 0;
    json_object_put(params);
    size_t tl = has && n ? es->scratch.len : 0;
    raise_rec *r = rc == 0 ? hub_malloc(sizeof(*r) + tl + 1) : NULL;
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    memset(r, 0, sizeof(*r));
    memcpy(r->name, event, strlen(event) + 1);
    r->ev.name = r->name;
    const char *ctx = hub_raise_context(es->h);
    if (ctx && n && (r->ctx = hub_malloc(strlen(ctx) + 1))) {
        memcpy(r->ctx, ctx, strlen(ctx) + 1);
        r->ev.callid = r->ctx;
    }
    memcpy(r->text, es->scratch.data ? es->scratch.data : "", tl);
    r->text[tl] = '\0';
    if (has) {
        r->ev.params = r->text;
        r->ev.params_len = tl;
    }
    if (es->scratch.cap > SCRATCH_KEEP)
        tr_buf_free(&es->scratch); /* one huge event does not keep its buffer */
    r->token = token;
    r->refs = 1;
    r->pending = n;
    if (n == 0 && token) {
        /* No subscriber is not an error (as OpenSIPS); one report tells the raiser its
         * report function will not be called again. */
        r->pending = 1;
        report(es, r, NULL, -1, "no subscriber");
    }
    /* A delivery may finish (and unlink nothing) inside send: the list is only read here,
     * and nothing a scheme does from send removes a subscription. */
    for (ev_sub *s = es->subs; s; s = s->next) {
        if (!strcmp(s->event, event))
            deliver(es, r, s);
    }
    raise_unref(r);
    return 0;
}

/* ---- the sink ---- */

static int sink_raise(void *ud, const char *event, json_object *params, uint64_t token, char *err,
                      size_t errlen)
{
    return do_raise(ud, event, params, token, err, errlen);
}

static int sink_wanted(void *ud, const char *event)
{
    events_state *es = ud;
    for (ev_sub *s = es->subs; s; s = s->next) {
        if (!strcmp(s->event, event))
            return 1;
    }
    return 0;
}

static int sink_subscribe(void *ud, const char *event, const char *socket, long expire_s, char *err,
                          size_t errlen)
{
    return subscribe(ud, event, socket, expire_s, SRC_SCRIPT, err, errlen);
}

static int sink_unsubscribe(void *ud, const char *event, const char *socket, char *err,
                            size_t errlen)
{
    events_state *es = ud;
    if (!event || !socket) {
        snprintf(err, errlen, "event and socket are required");
        return -EINVAL;
    }
    return unsubscribe(es, event, socket, err, errlen);
}

static int sink_check(void *ud, const char *event, const char *socket, char *err, size_t errlen)
{
    int rc = check_pair(ud, event, socket, err, errlen);
    return rc < 0 ? rc : 0;
}

static const hub_event_sink events_sink = {
    .raise = sink_raise,
    .wanted = sink_wanted,
    .subscribe = sink_subscribe,
    .unsubscribe = sink_unsubscribe,
    .check = sink_check,
};

/* ---- the scheme registry ---- */

/* Close the handle of every socket of scheme (-1: of every scheme). The walk starts over
 * after each close, so that nothing a close does to the list can trip it; each close leaves
 * one handle fewer, which bounds it. */
static void close_all(events_state *es, int scheme)
{
    for (int again = 1; again;) {
        again = 0;
        for (ev_sock *s = es->socks; s; s = s->next) {
            if (s->handle && (scheme < 0 || s->scheme == scheme)) {
                close_handle(es, s);
                again = 1;
                break;
            }
        }
    }
}

static int add_scheme(events_state *es, const tr_scheme *sc, void *ud)
{
    int n = atomic_load(&es->nschemes);
    for (int i = 0; i < n; i++) {
        if (!strcmp(es->schemes[i].sc->name, sc->name))
            return -EEXIST;
    }
    if (n >= TR_SCHEME_MAX)
        return -ENOSPC;
    es->schemes[n].sc = sc;
    es->schemes[n].ud = ud;
    atomic_store(&es->schemes[n].dead, 0);
    atomic_store(&es->nschemes, n + 1); /* published last: readers see a whole slot */
    return 0;
}

int tr_events_add_scheme(hub *h, const char *who, const tr_scheme *sc, void *ud, char *err,
                         size_t errlen)
{
    events_state *es = hub_module_state(h, "events");
    int rc = es ? add_scheme(es, sc, ud) : -ENOENT;
    if (rc < 0)
        snprintf(err, errlen, "%s: cannot register the %s: scheme: %s", who, sc->name,
                 rc == -ENOENT ? "no events module before it" : strerror(-rc));
    return rc;
}

void tr_events_remove_scheme(hub *h, const char *name)
{
    events_state *es = hub_module_state(h, "events");
    if (!es)
        return;
    int n = atomic_load(&es->nschemes), idx = -1;
    for (int i = 0; i < n; i++) {
        if (!strcmp(es->schemes[i].sc->name, name))
            idx = i;
    }
    if (idx < 0 || atomic_exchange(&es->schemes[idx].dead, 1))
        return;
    /* Subscriptions stay (listed, and failing); their sockets close now. */
    close_all(es, idx);
}

/* ---- control commands ---- */

static const hub_ctl_param subscribe_params[] = {
    {"event", HUB_CTL_STRING, 1, "the event name, e.g. E_EVAPI_CONNECTION_NEW"},
    {"socket", HUB_CTL_STRING, 1, "the subscriber, e.g. tcp:127.0.0.1:8080/method or evapi:TAG"},
    {"expire", HUB_CTL_INT, 0, "seconds until the subscription ends (default: never)"},
};
static const hub_ctl_param unsubscribe_params[] = {
    {"event", HUB_CTL_STRING, 1, "the event name"},
    {"socket", HUB_CTL_STRING, 1, "the subscriber's socket URI, as subscribed"},
};
static const hub_ctl_param raise_params[] = {
    {"event", HUB_CTL_STRING, 1, "the event name"},
    {"params", HUB_CTL_STRING, 0, "the params as JSON text: an object or an array"},
};

static const hub_ctl_spec events_specs[] = {
    {"subscribe", "subscribe a socket to an event",
     "Adds a subscription (or renews its expiry). Sockets: tcp:HOST:PORT[/METHOD][?OPTIONS] "
     "(JSON-RPC over TCP) and evapi:TAG (the hub's clients with that tag).",
     subscribe_params, 3},
    {"unsubscribe", "remove a subscription", NULL, unsubscribe_params, 2},
    {"subscriptions", "list the subscriptions",
     "Each subscription with its source (config, script, control), its socket's state, the "
     "events delivered and failed, and the seconds left until it expires (- for never).",
     NULL, 0},
    {"raise", "raise an event to its subscribers", NULL, raise_params, 2},
};

static const char *str_param(json_object *params, const char *name)
{
    json_object *v = NULL;
    return json_object_object_get_ex(params, name, &v) ? json_object_get_string(v) : NULL;
}

static void cmd_subscribe(hub_ctl_call *call, json_object *params, void *ud)
{
    events_state *es = ud;
    json_object *ex = NULL;
    long expire = 0;
    char err[256];
    if (json_object_object_get_ex(params, "expire", &ex))
        expire = (long)json_object_get_int64(ex);
    if (subscribe(es, str_param(params, "event"), str_param(params, "socket"), expire, SRC_CONTROL,
                  err, sizeof(err)) < 0) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "%s", err);
        return;
    }
    hub_ctl_reply(call, json_object_new_string("subscribed"));
}

static void cmd_unsubscribe(hub_ctl_call *call, json_object *params, void *ud)
{
    events_state *es = ud;
    char err[256];
    int rc =
        unsubscribe(es, str_param(params, "event"), str_param(params, "socket"), err, sizeof(err));
    if (rc < 0) {
        hub_ctl_fail(call, rc == -ENOENT ? HUB_CTL_FAILED : HUB_CTL_INVALID_PARAMS, "%s", err);
        return;
    }
    hub_ctl_reply(call, json_object_new_string("unsubscribed"));
}

static void cmd_subscriptions(hub_ctl_call *call, json_object *params, void *ud)
{
    events_state *es = ud;
    json_object *list = json_object_new_array(), *r = json_object_new_object();
    double now = ev_now(es->loop);
    (void)params;
    for (ev_sub *s = es->subs; s; s = s->next) {
        json_object *o = json_object_new_object();
        const scheme_slot *sl = &es->schemes[s->sock->scheme];
        json_object_object_add(o, "event", json_object_new_string(s->event));
        json_object_object_add(o, "socket", json_object_new_string(s->sock->uri));
        json_object_object_add(o, "source", json_object_new_string(src_names[s->source]));
        json_object_object_add(o, "state",
                               json_object_new_string(s->sock->handle
                                                          ? sl->sc->state(sl->ud, s->sock->handle)
                                                          : "closed"));
        json_object_object_add(o, "delivered", json_object_new_uint64(s->delivered));
        json_object_object_add(o, "failed", json_object_new_uint64(s->failed));
        long left = s->deadline > 0 ? (long)(s->deadline - now + 0.999) : 0;
        json_object_object_add(o, "expires",
                               s->deadline > 0 ? json_object_new_int64(left < 0 ? 0 : left) : NULL);
        json_object_array_add(list, o);
    }
    json_object_object_add(r, "subscriptions", list);
    hub_ctl_reply(call, r);
}

static void cmd_raise(hub_ctl_call *call, json_object *params, void *ud)
{
    events_state *es = ud;
    const char *event = str_param(params, "event"), *text = str_param(params, "params");
    json_object *p = NULL;
    char err[256];
    if (text) {
        enum json_tokener_error jerr = json_tokener_success;
        p = json_tokener_parse_verbose(text, &jerr);
        if (!p && jerr != json_tokener_success) {
            hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "params is not JSON: %s",
                         json_tokener_error_desc(jerr));
            return;
        }
    }
    size_t n = 0;
    for (ev_sub *s = es->subs; s; s = s->next)
        n += event && !strcmp(s->event, event);
    if (do_raise(es, event, p, 0, err, sizeof(err)) < 0) { /* p's reference passed */
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "%s", err);
        return;
    }
    json_object *r = json_object_new_object();
    json_object_object_add(r, "subscribers", json_object_new_uint64(n));
    hub_ctl_reply(call, r);
}

/* ---- the module ---- */

static const hub_conf_row events_rows[] = {
    {"subscribe", HUB_CONF_LIST, offsetof(events_conf, subscribe), sizeof(hub_conf_list), 0, 0,
     NULL, NULL},
    {NULL, 0, 0, 0, 0, 0, NULL, NULL},
};

static const hub_conf_section events_sections[] = {
    {"events", 0, sizeof(events_conf), events_rows},
    {NULL, 0, 0, NULL},
};

static void events_free(void *state)
{
    events_state *es = state;
    if (!es)
        return;
    /* Sockets still open (a scheme without a stop of its own): closed here, before the
     * subscriptions that reference them. */
    while (es->subs)
        sub_remove(es, &es->subs);
    while (es->socks)
        sock_close(es, es->socks);
    if (es->loop)
        ev_timer_stop(es->loop, &es->expiry);
    pthread_mutex_destroy(&es->lock);
    tr_buf_free(&es->scratch);
    hub_free(es);
}

static int events_init(hub *h, void **state, char *err, size_t errlen)
{
    events_state *es = hub_calloc(1, sizeof(*es));
    if (!es) {
        snprintf(err, errlen, "events: out of memory");
        return -ENOMEM;
    }
    es->h = h;
    es->loop = hub_loop(h);
    pthread_mutex_init(&es->lock, NULL);
    ev_timer_init(&es->expiry, expiry_cb, 0, 0);
    es->expiry.data = es;
    int rc = hub_set_event_sink(h, &events_sink, es);
    hub_ctl *ctl = hub_get_ctl(h);
    static const hub_ctl_fn fns[] = {cmd_subscribe, cmd_unsubscribe, cmd_subscriptions, cmd_raise};
    for (size_t i = 0; rc == 0 && i < sizeof(fns) / sizeof(fns[0]); i++)
        rc = hub_ctl_register(ctl, &events_specs[i], fns[i], es);
    if (rc < 0) {
        snprintf(err, errlen, "events: cannot register the sink or a command: %s", strerror(-rc));
        events_free(es);
        return rc;
    }
    *state = es;
    return 0;
}

/* "EVENT SOCKET [EXPIRE_S]" from the file. */
static int config_row(events_state *es, const hub_conf_instance *in, const hub_conf_item *it,
                      char *err, size_t errlen)
{
    char ev[TR_EVENT_NAME_MAX + 2], sock[TR_SOCKET_URI_MAX + 2], exp[32], extra[2];
    char why[256];
    int n = sscanf(it->value, "%65s %256s %31s %1s", ev, sock, exp, extra);
    if (n < 2 || n > 3) {
        snprintf(err, errlen, "%s:%d: subscribe: expected EVENT SOCKET [EXPIRE_S]", in->file,
                 it->line);
        return -EINVAL;
    }
    if (n == 3) {
        char *end;
        long v = strtol(exp, &end, 10);
        if (*end || v < 0) {
            snprintf(err, errlen, "%s:%d: subscribe: EXPIRE_S must be a number of seconds",
                     in->file, it->line);
            return -EINVAL;
        }
        hub_log(HUB_LOG_WARN,
                "%s:%d: subscribe: a subscription from the config never expires; %s ignored",
                in->file, it->line, exp);
    }
    if (subscribe(es, ev, sock, 0, SRC_CONFIG, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "%s:%d: subscribe: %s", in->file, it->line, why);
        return -EINVAL;
    }
    return 0;
}

static int events_start(void *state, char *err, size_t errlen)
{
    events_state *es = state;
    const hub_config *cfg = hub_get_config(es->h);
    for (const hub_conf_instance *in = hub_conf_next(cfg, "events", NULL); in;
         in = hub_conf_next(cfg, "events", in)) {
        const events_conf *c = in->data;
        for (size_t i = 0; i < c->subscribe.n; i++) {
            if (config_row(es, in, &c->subscribe.items[i], err, errlen) < 0)
                return -EINVAL;
        }
    }
    return 0;
}

/* Raises are still taken while the sockets drain (a hub event such as a connection closed
 * by the shutdown, a report function raising again): the sockets are up, and whatever they
 * have not delivered when they stop is reported failed. What is in flight belongs to the
 * socket modules, whose own drain counts it. */
static size_t events_drain(void *state)
{
    (void)state;
    return 0;
}

static void events_stop(void *state)
{
    events_state *es = state;
    ev_timer_stop(es->loop, &es->expiry);
    /* Close every socket: whatever is still in flight is reported failed now. */
    close_all(es, -1);
}

static void stat_label(hub_stat *st, const char *uri)
{
    size_t o = 0, cap = sizeof(st->label);
    o += (size_t)snprintf(st->label, cap, "socket=\"");
    for (const char *p = uri; *p && o + 4 < cap; p++) {
        if (*p == '"' || *p == '\\')
            st->label[o++] = '\\';
        st->label[o++] = *p;
    }
    st->label[o++] = '"';
    st->label[o] = '\0';
}

static size_t events_stats(void *state, hub_stat *out, size_t cap)
{
    events_state *es = state;
    static const struct {
        const char *name, *help;
        int gauge;
    } per[] = {
        {"events_raised", "events handed to this subscriber socket", 0},
        {"events_delivered", "events this socket delivered (written, or answered when reliable)",
         0},
        {"events_failed", "events this socket failed (queue full, timeout, error reply, ...)", 0},
        {"events_queued", "events in flight on this socket (queued or awaiting a reply)", 1},
    };
    size_t n = 0;
    if (n < cap)
        out[n] = (hub_stat){.name = "events_raises",
                            .help = "events raised (whatever the number of subscribers)",
                            .worker = -1,
                            .value = atomic_load(&es->raises)};
    n++;
    pthread_mutex_lock(&es->lock);
    for (ev_sock *s = es->socks; s; s = s->next) {
        uint64_t v[4] = {atomic_load(&s->raised), atomic_load(&s->delivered),
                         atomic_load(&s->failed), atomic_load(&s->queued)};
        for (size_t i = 0; i < 4; i++, n++) {
            if (n >= cap)
                continue;
            out[n] = (hub_stat){.name = per[i].name,
                                .help = per[i].help,
                                .gauge = per[i].gauge,
                                .worker = -1,
                                .value = v[i]};
            stat_label(&out[n], s->uri);
        }
    }
    pthread_mutex_unlock(&es->lock);
    return n;
}

const hub_module events_module = {
    .name = "events",
    .sections = events_sections,
    .init = events_init,
    .start = events_start,
    .drain = events_drain,
    .stop = events_stop,
    .free = events_free,
    .stats = events_stats,
};
