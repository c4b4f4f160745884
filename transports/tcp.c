/* The tcp: socket of the event interface, as OpenSIPS event_stream: each socket URI gets one
 * persistent, non-blocking TCP connection, made when there is something to send and remade
 * with a backoff when it fails or drops. Every event is one JSON-RPC 2.0 document followed
 * by "\n": a notification, or in reliable mode a request whose reply (matched by id, read
 * with json-c's incremental tokener however the peer splits or joins its documents) decides
 * the outcome. Host names are resolved by one resolver thread, never on the loop; its
 * results come back through the mailbox. While a connection is down, events wait in a
 * bounded queue; a full queue fails the event at once. */
#define _GNU_SOURCE /* pthread_timedjoin_np */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>
#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/core.h"
#include "hub/log.h"
#include "transports/events.h"
#include "transports/tcp.h"

#define BACKOFF_MIN_MS  100        /* first retry after a failed connect or a drop */
#define WRITE_BUDGET    (64 << 10) /* bytes written per wakeup (STYLE: at most 64 KiB) */
#define WRITE_IOV       256        /* documents per sendmsg (IOV_MAX is 1024) */
#define READ_CHUNK      (64 << 10)
#define REPLY_MAX_BYTES (1 << 20) /* a reply larger than this is a protocol error */
#define RESOLVER_JOIN_S 1         /* how long a stop waits for a lookup under way */

/* [tcp]: event_stream's module parameters, the defaults of every tcp: socket. */
typedef struct tcp_conf {
    int reliable_mode;
    int timeout; /* ms */
    char event_param[TR_TCP_NAME_MAX + 1];
    int queue_size;
    int reconnect_max; /* ms */
} tcp_conf;

static const hub_conf_row tcp_rows[] = {
    HUB_CONF_ROW(tcp_conf, "reliable_mode", HUB_CONF_BOOL, reliable_mode, 0, 1, NULL, "no"),
    HUB_CONF_ROW(tcp_conf, "timeout", HUB_CONF_INT, timeout, 1, 3600000, NULL, "1000"),
    HUB_CONF_ROW(tcp_conf, "event_param", HUB_CONF_STRING, event_param, 0, 0, NULL, NULL),
    HUB_CONF_ROW(tcp_conf, "queue_size", HUB_CONF_INT, queue_size, 1, 1000000, NULL, "1024"),
    HUB_CONF_ROW(tcp_conf, "reconnect_max", HUB_CONF_INT, reconnect_max, BACKOFF_MIN_MS, 3600000,
                 NULL, "5000"),
    {.name = NULL},
};

static const hub_conf_section tcp_sections[] = {
    {"tcp", 0, sizeof(tcp_conf), tcp_rows},
    {NULL, 0, 0, NULL},
};

/* ---- the URI ---- */

int tr_tcp_name_check(const char *s, size_t len)
{
    if (len == 0 || len > TR_TCP_NAME_MAX)
        return -EINVAL;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-' || c == ':' || c == '/'))
            return -EINVAL;
    }
    return 0;
}

static int uri_fail(char *err, size_t errlen, const char *why)
{
    snprintf(err, errlen, "tcp: socket: %s", why);
    return -EINVAL;
}

/* A decimal in [lo, hi] spanning s[0..len), or -1. */
static long parse_num(const char *s, size_t len, long lo, long hi)
{
    long v = 0;
    if (len == 0 || len > 9)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v < lo || v > hi ? -1 : v;
}

static int parse_option(const char *s, size_t len, tr_tcp_uri *u, char *err, size_t errlen)
{
    const char *eq = memchr(s, '=', len);
    if (!eq)
        return uri_fail(err, errlen, "an option needs NAME=VALUE");
    size_t kl = (size_t)(eq - s), vl = len - kl - 1;
    const char *v = eq + 1;
    if (kl == 8 && !memcmp(s, "reliable", 8)) {
        if ((u->reliable = (int)parse_num(v, vl, 0, 1)) < 0)
            return uri_fail(err, errlen, "reliable must be 0 or 1");
    } else if (kl == 7 && !memcmp(s, "timeout", 7)) {
        if ((u->timeout_ms = (int)parse_num(v, vl, 1, 3600000)) < 0)
            return uri_fail(err, errlen, "timeout must be 1..3600000 ms");
    } else if (kl == 5 && !memcmp(s, "queue", 5)) {
        if ((u->queue = (int)parse_num(v, vl, 1, 1000000)) < 0)
            return uri_fail(err, errlen, "queue must be 1..1000000");
    } else if (kl == 11 && !memcmp(s, "event_param", 11)) {
        if (vl > 0 && tr_tcp_name_check(v, vl) < 0)
            return uri_fail(err, errlen, "event_param must be 1..64 of [A-Za-z0-9_.:/-]");
        memcpy(u->event_param, v, vl);
        u->event_param[vl] = '\0';
        u->has_event_param = 1;
    } else {
        snprintf(err, errlen,
                 "tcp: socket: unknown option '%.*s' (reliable, timeout, event_param, queue)",
                 (int)(kl > 32 ? 32 : kl), s);
        return -EINVAL;
    }
    return 0;
}

static int parse_host(const char *s, size_t len, tr_tcp_uri *u, char *err, size_t errlen)
{
    unsigned char buf[sizeof(struct in6_addr)];
    if (len == 0 || len >= sizeof(u->host))
        return uri_fail(err, errlen, "the host is missing or too long");
    memcpy(u->host, s, len);
    u->host[len] = '\0';
    if (inet_pton(AF_INET, u->host, buf) == 1) {
        u->family = AF_INET;
        return 0;
    }
    /* A name: letters, digits, '-', '_' and '.' (an IPv6 address needs brackets). */
    int alpha = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || c == '_' || c == '.';
        if (!ok)
            return uri_fail(err, errlen, "the host is not a name, an IPv4 or an [IPv6] address");
        alpha |= !(c >= '0' && c <= '9') && c != '.';
    }
    if (!alpha) /* digits and dots that inet_pton refused: e.g. 1.2.3.256 */
        return uri_fail(err, errlen, "the host is not a valid IPv4 address");
    u->family = AF_UNSPEC;
    return 0;
}

int tr_tcp_uri_parse(const char *uri, tr_tcp_uri *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof(*u));
    u->reliable = u->timeout_ms = u->queue = -1;
    if (!uri || strncmp(uri, "tcp:", 4) != 0)
        return uri_fail(err, errlen, "it must start with tcp:");
    const char *p = uri + 4, *hend, *after;
    if (*p == '[') {
        hend = strchr(p, ']');
        if (!hend)
            return uri_fail(err, errlen, "'[' without ']'");
        size_t hl = (size_t)(hend - p - 1);
        unsigned char buf[sizeof(struct in6_addr)];
        if (hl == 0 || hl >= sizeof(u->host))
            return uri_fail(err, errlen, "an empty IPv6 address");
        memcpy(u->host, p + 1, hl);
        u->host[hl] = '\0';
        if (inet_pton(AF_INET6, u->host, buf) != 1)
            return uri_fail(err, errlen, "not a valid IPv6 address in [ ]");
        u->family = AF_INET6;
        after = hend + 1;
        if (*after != ':')
            return uri_fail(err, errlen, "a ':' and a port must follow ]");
    } else {
        after = strchr(p, ':');
        if (!after)
            return uri_fail(err, errlen, "expected tcp:HOST:PORT");
        if (parse_host(p, (size_t)(after - p), u, err, errlen) < 0)
            return -EINVAL;
    }
    const char *port = after + 1;
    size_t pl = strcspn(port, "/?");
    long pn = parse_num(port, pl, 1, 65535);
    if (pn < 0)
        return uri_fail(err, errlen, "the port must be 1..65535");
    snprintf(u->port, sizeof(u->port), "%u", (unsigned)(uint16_t)pn); /* 1..65535, checked */
    p = port + pl;
    if (*p == '/') {
        size_t ml = strcspn(p + 1, "?");
        if (tr_tcp_name_check(p + 1, ml) < 0)
            return uri_fail(err, errlen, "the method must be 1..64 of [A-Za-z0-9_.:/-]");
        memcpy(u->method, p + 1, ml);
        u->method[ml] = '\0';
        p += 1 + ml;
    }
    if (*p == '?') {
        p++;
        for (int i = 0; i < 8; i++) { /* bounded: four options exist */
            size_t ol = strcspn(p, "&");
            if (parse_option(p, ol, u, err, errlen) < 0)
                return -EINVAL;
            p += ol;
            if (*p != '&')
                break;
            p++;
        }
    }
    if (*p)
        return uri_fail(err, errlen, "unexpected text after the port, method or options");
    return 0;
}

static int tcp_check(const char *uri, char *err, size_t errlen)
{
    tr_tcp_uri u;
    return tr_tcp_uri_parse(uri, &u, err, errlen);
}

/* ---- state ---- */

typedef struct tcp_state tcp_state;

/* One document on its way: queued to be written, or (reliable) written and awaiting its
 * reply. */
typedef struct tcp_item {
    struct tcp_item *next;
    tr_delivery *d;
    uint64_t id;     /* reliable: the request's id */
    double deadline; /* reliable: when the reply is late (set once written) */
    size_t len;
    char doc[];
} tcp_item;

typedef struct item_list {
    tcp_item *head, *tail;
    size_t n;
} item_list;

enum { S_IDLE, S_RESOLVING, S_CONNECTING, S_CONNECTED, S_BACKOFF };
static const char *const state_names[] = {"idle", "resolving", "connecting", "connected", "down"};

typedef struct tcp_sock {
    struct tcp_sock *next;
    tcp_state *ts;
    uint64_t sid; /* what the resolver's answers name, never reused */
    tr_tcp_uri u;
    int reliable, timeout_ms, queue;
    const char *event_param; /* "" : none */
    int state;
    int fd;
    ev_io rio, wio;
    ev_timer timer;  /* connect timeout, or the backoff */
    ev_timer rtimer; /* the first awaited reply's deadline */
    item_list outq;  /* to write; the head written up to out_off */
    size_t out_off;
    item_list wait; /* reliable: written, awaiting replies, in write order */
    json_tokener *tok;
    size_t reply_bytes;            /* read since the last complete document */
    struct addrinfo *ai, *ai_next; /* the addresses, and the next one to try */
    double backoff;                /* seconds */
    int down_logged;
    char desc[TR_SOCKET_URI_MAX + 1];
} tcp_sock;

/* The resolver thread: a queue of names to look up, each request coming back through the
 * mailbox as its own answer. The resolver lives apart from tcp_state (refcounted) so that an
 * answer still in the mailbox when the module stops finds it. */
typedef struct resolve_req {
    struct resolve_req *next;
    struct resolver *rv;
    uint64_t sid;
    int rc;
    struct addrinfo *ai;
    char host[256], port[6];
} resolve_req;

typedef struct resolver {
    hub *h;
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    resolve_req *head, *tail;
    int quit;
    int running;
    pthread_t thread;
    tcp_state *ts; /* loop thread only; NULL once the module stopped */
} resolver;

struct tcp_state {
    hub *h;
    struct ev_loop *loop;
    tcp_conf conf;
    tcp_sock *socks;
    uint64_t next_sid;
    uint64_t next_id;
    resolver *rv;
    int stopped;
};

/* ---- item lists ---- */

static void list_push(item_list *l, tcp_item *it)
{
    it->next = NULL;
    if (l->tail)
        l->tail->next = it;
    else
        l->head = it;
    l->tail = it;
    l->n++;
}

static tcp_item *list_pop(item_list *l)
{
    tcp_item *it = l->head;
    if (it) {
        l->head = it->next;
        if (!l->head)
            l->tail = NULL;
        l->n--;
    }
    return it;
}

static void item_done(tcp_item *it, int status, const char *error)
{
    tr_delivery_done(it->d, status, error); /* it lives in d's room: gone with it */
}

static void fail_list(item_list *l, const char *why)
{
    tcp_item *it;
    size_t bound = l->n;
    while (bound-- > 0 && (it = list_pop(l)))
        item_done(it, -1, why);
}

/* ---- connection ---- */

static void try_connect(tcp_sock *s);
static void kick(tcp_sock *s);

static void close_fd(tcp_sock *s)
{
    struct ev_loop *loop = s->ts->loop;
    ev_io_stop(loop, &s->rio);
    ev_io_stop(loop, &s->wio);
    ev_timer_stop(loop, &s->timer);
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->out_off = 0; /* a document cut short is sent whole on the next connection */
    json_tokener_reset(s->tok);
    s->reply_bytes = 0;
}

static void free_addrs(tcp_sock *s)
{
    if (s->ai)
        freeaddrinfo(s->ai);
    s->ai = s->ai_next = NULL;
}

/* The connection failed or dropped: what awaited a reply fails; what is queued waits for
 * the next connection, made after the backoff. */
static void conn_lost(tcp_sock *s, const char *why)
{
    struct ev_loop *loop = s->ts->loop;
    int was_up = s->state == S_CONNECTED;
    close_fd(s);
    free_addrs(s);
    char msg[192];
    snprintf(msg, sizeof(msg), "%s: %s", was_up ? "connection lost" : "cannot connect", why);
    if (was_up && !s->outq.n && !s->wait.n) {
        /* nothing lost and nothing waiting: the next event reconnects */
        hub_log(HUB_LOG_INFO, "tcp: %s: %s", s->desc, msg);
    } else if (!s->down_logged) {
        hub_log(HUB_LOG_WARN, "tcp: %s: %s; retrying", s->desc, msg);
        s->down_logged = 1;
    }
    fail_list(&s->wait, msg);
    ev_timer_stop(loop, &s->rtimer);
    s->state = S_BACKOFF;
    ev_timer_set(&s->timer, s->backoff, 0);
    ev_timer_start(loop, &s->timer);
    s->backoff *= 2;
    if (s->backoff * 1000 > s->ts->conf.reconnect_max)
        s->backoff = s->ts->conf.reconnect_max / 1000.0;
}

static void connected(tcp_sock *s)
{
    struct ev_loop *loop = s->ts->loop;
    ev_timer_stop(loop, &s->timer);
    ev_io_stop(loop, &s->wio);
    free_addrs(s);
    s->state = S_CONNECTED;
    s->backoff = BACKOFF_MIN_MS / 1000.0;
    if (s->down_logged)
        hub_log(HUB_LOG_NOTICE, "tcp: %s: connected", s->desc);
    else
        hub_log(HUB_LOG_DEBUG, "tcp: %s: connected", s->desc);
    s->down_logged = 0;
    ev_io_set(&s->rio, s->fd, EV_READ);
    ev_io_start(loop, &s->rio);
    ev_io_set(&s->wio, s->fd, EV_WRITE);
    if (s->outq.n)
        ev_io_start(loop, &s->wio);
}

/* Try the addresses from ai_next on; the last failure's reason goes to conn_lost. */
static void try_connect(tcp_sock *s)
{
    struct ev_loop *loop = s->ts->loop;
    int err = 0;
    for (int i = 0; s->ai_next && i < 64; i++) {
        struct addrinfo *a = s->ai_next;
        s->ai_next = a->ai_next;
        int fd = socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 || errno == EINPROGRESS) {
            s->fd = fd;
            s->state = S_CONNECTING;
            /* writable = the connect finished, one way or the other */
            ev_io_set(&s->wio, fd, EV_WRITE);
            ev_io_start(loop, &s->wio);
            ev_timer_set(&s->timer, s->timeout_ms / 1000.0, 0);
            ev_timer_start(loop, &s->timer);
            return;
        }
        err = errno;
        close(fd);
    }
    conn_lost(s, err ? strerror(err) : "no address");
}

static tcp_sock *sock_by_sid(tcp_state *ts, uint64_t sid)
{
    for (tcp_sock *s = ts->socks; s; s = s->next) {
        if (s->sid == sid)
            return s;
    }
    return NULL;
}

static void resolver_unref(resolver *rv);

/* Loop thread: a name was looked up. */
static void resolved_cb(hub *h, void *arg)
{
    resolve_req *q = arg;
    resolver *rv = q->rv;
    tcp_sock *s = rv->ts ? sock_by_sid(rv->ts, q->sid) : NULL;
    (void)h;
    if (!s || s->state != S_RESOLVING) {
        if (q->ai)
            freeaddrinfo(q->ai);
    } else if (q->rc != 0) {
        conn_lost(s, gai_strerror(q->rc));
    } else {
        s->ai = s->ai_next = q->ai; /* the socket's now */
        try_connect(s);
    }
    hub_free(q);
    resolver_unref(rv);
}

/* The resolver thread holds a reference of its own, so that a stop that does not wait for a
 * slow lookup (see resolver_stop) leaves it something to finish with. */
static void *resolver_main(void *arg)
{
    resolver *rv = arg;
    pthread_mutex_lock(&rv->mu);
    for (;;) {
        while (!rv->quit && !rv->head)
            pthread_cond_wait(&rv->cv, &rv->mu);
        if (rv->quit)
            break;
        resolve_req *q = rv->head;
        rv->head = q->next;
        if (!rv->head)
            rv->tail = NULL;
        pthread_mutex_unlock(&rv->mu);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
        q->rc = getaddrinfo(q->host, q->port, &hints, &q->ai);
        if (q->rc != 0)
            q->ai = NULL;
        pthread_mutex_lock(&rv->mu);
        if (rv->quit) {
            /* the module stopped meanwhile, and the hub may be gone: post nothing */
            if (q->ai)
                freeaddrinfo(q->ai);
            hub_free(q);
            break;
        }
        /* Posted under the lock: a stop that sets quit after this knows the answer is in
         * the mailbox, which the hub runs before it goes. */
        atomic_fetch_add(&rv->refs, 1);             /* the answer's, dropped by resolved_cb */
        hub_loop_post_retry(rv->h, resolved_cb, q); /* q is the loop's now */
    }
    pthread_mutex_unlock(&rv->mu);
    resolver_unref(rv);
    return NULL;
}

static void resolver_unref(resolver *rv)
{
    if (atomic_fetch_sub(&rv->refs, 1) != 1)
        return;
    for (resolve_req *q = rv->head, *n; q; q = n) {
        n = q->next;
        hub_free(q);
    }
    pthread_mutex_destroy(&rv->mu);
    pthread_cond_destroy(&rv->cv);
    hub_free(rv);
}

static void start_lookup(tcp_sock *s)
{
    tcp_state *ts = s->ts;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_NUMERICHOST,
                             .ai_family = s->u.family};
    free_addrs(s);
    if (s->u.family != AF_UNSPEC) {
        /* an address: no lookup, nothing that could block */
        int rc = getaddrinfo(s->u.host, s->u.port, &hints, &s->ai);
        if (rc != 0) {
            conn_lost(s, gai_strerror(rc));
            return;
        }
        s->ai_next = s->ai;
        try_connect(s);
        return;
    }
    resolve_req *q = hub_calloc(1, sizeof(*q));
    if (!q || !ts->rv || !ts->rv->running) {
        hub_free(q);
        conn_lost(s, !q ? "out of memory" : "no resolver");
        return;
    }
    q->rv = ts->rv;
    q->sid = s->sid;
    snprintf(q->host, sizeof(q->host), "%s", s->u.host);
    snprintf(q->port, sizeof(q->port), "%s", s->u.port);
    s->state = S_RESOLVING;
    resolver *rv = ts->rv;
    pthread_mutex_lock(&rv->mu);
    if (rv->tail)
        rv->tail->next = q;
    else
        rv->head = q;
    rv->tail = q;
    pthread_cond_signal(&rv->cv);
    pthread_mutex_unlock(&rv->mu);
}

/* Something is queued: connect if nothing is under way. */
static void kick(tcp_sock *s)
{
    if (s->state == S_IDLE)
        start_lookup(s);
    else if (s->state == S_CONNECTED)
        ev_io_start(s->ts->loop, &s->wio);
}

/* ---- replies ---- */

static void rtimer_arm(tcp_sock *s)
{
    struct ev_loop *loop = s->ts->loop;
    ev_timer_stop(loop, &s->rtimer);
    if (s->wait.head) {
        double after = s->wait.head->deadline - ev_now(loop);
        ev_timer_set(&s->rtimer, after > 0 ? after : 0, 0);
        ev_timer_start(loop, &s->rtimer);
    }
}

static void rtimer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    tcp_sock *s = w->data;
    double now = ev_now(loop);
    char why[64];
    (void)revents;
    snprintf(why, sizeof(why), "timeout: no reply within %d ms", s->timeout_ms);
    /* deadlines grow along the list: every socket's requests share one timeout */
    size_t bound = s->wait.n;
    while (bound-- > 0 && s->wait.head && s->wait.head->deadline <= now + 1e-4)
        item_done(list_pop(&s->wait), -1, why);
    rtimer_arm(s);
}

/* One document from the peer (reliable mode): a reply settles its request; anything else
 * (a document without a known id) is ignored. */
static void on_reply(tcp_sock *s, json_object *o)
{
    json_object *id, *err;
    if (!json_object_is_type(o, json_type_object) || !json_object_object_get_ex(o, "id", &id) ||
        !json_object_is_type(id, json_type_int))
        return;
    uint64_t want = (uint64_t)json_object_get_int64(id);
    tcp_item **pp = &s->wait.head, *prev = NULL;
    for (; *pp; prev = *pp, pp = &(*pp)->next) { /* replies come in order: found at once */
        if ((*pp)->id != want)
            continue;
        tcp_item *it = *pp;
        *pp = it->next;
        if (s->wait.tail == it)
            s->wait.tail = prev;
        s->wait.n--;
        if (json_object_object_get_ex(o, "error", &err) && err) {
            json_object *m = NULL;
            char why[160];
            json_object_object_get_ex(err, "message", &m);
            snprintf(why, sizeof(why), "error reply: %s",
                     m ? json_object_get_string(m) : json_object_to_json_string(err));
            item_done(it, -1, why);
        } else {
            item_done(it, 0, NULL);
        }
        if (!prev)
            rtimer_arm(s);
        return;
    }
    hub_log(HUB_LOG_DEBUG, "tcp: %s: reply to unknown id %llu ignored", s->desc,
            (unsigned long long)want);
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    tcp_sock *s = w->data;
    char buf[READ_CHUNK];
    (void)loop;
    (void)revents;
    ssize_t n = read(s->fd, buf, sizeof(buf));
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        conn_lost(s, n == 0 ? "closed by the peer" : strerror(errno));
        return;
    }
    if (!s->reliable)
        return; /* notifications expect nothing back: whatever comes is read and dropped */
    size_t off = 0;
    for (int i = 0; off < (size_t)n && i < READ_CHUNK; i++) {
        json_object *o = json_tokener_parse_ex(s->tok, buf + off, (int)((size_t)n - off));
        enum json_tokener_error e = json_tokener_get_error(s->tok);
        size_t used = json_tokener_get_parse_end(s->tok);
        if (o || e == json_tokener_success) {
            off += used;
            s->reply_bytes = 0;
            json_tokener_reset(s->tok);
            on_reply(s, o);
            json_object_put(o);
            if (s->fd < 0)
                return;
            continue;
        }
        if (e == json_tokener_continue) {
            s->reply_bytes += (size_t)n - off;
            if (s->reply_bytes > REPLY_MAX_BYTES)
                conn_lost(s, "a reply larger than 1 MiB");
            return;
        }
        char why[128];
        snprintf(why, sizeof(why), "the peer sent what is not JSON (%s)",
                 json_tokener_error_desc(e));
        conn_lost(s, why);
        return;
    }
}

/* ---- writing ---- */

static void written(tcp_sock *s, tcp_item *it)
{
    if (!s->reliable) {
        item_done(it, 0, NULL); /* a notification is done once written */
        return;
    }
    it->deadline = ev_now(s->ts->loop) + s->timeout_ms / 1000.0;
    list_push(&s->wait, it);
    if (s->wait.n == 1)
        rtimer_arm(s);
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    tcp_sock *s = w->data;
    (void)revents;
    if (s->state == S_CONNECTING) {
        int e = 0;
        socklen_t el = sizeof(e);
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &el) < 0)
            e = errno;
        if (e) {
            close_fd(s);
            if (s->ai_next) {
                try_connect(s); /* the next address */
                return;
            }
            conn_lost(s, strerror(e));
            return;
        }
        connected(s);
        if (!s->outq.n)
            return;
    }
    size_t budget = WRITE_BUDGET;
    for (int round = 0; round < 16 && s->outq.head && budget > 0; round++) {
        struct iovec iov[WRITE_IOV];
        int cnt = 0;
        size_t total = 0;
        for (tcp_item *it = s->outq.head; it && cnt < WRITE_IOV && total < budget; it = it->next) {
            size_t skip = cnt == 0 ? s->out_off : 0;
            iov[cnt].iov_base = it->doc + skip;
            iov[cnt].iov_len = it->len - skip;
            total += iov[cnt++].iov_len;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t n = sendmsg(s->fd, &mh, MSG_NOSIGNAL); /* a peer gone is an error, not a signal */
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            conn_lost(s, strerror(errno));
            return;
        }
        budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
        size_t left = (size_t)n;
        while (s->outq.head && left >= s->outq.head->len - s->out_off) {
            left -= s->outq.head->len - s->out_off;
            s->out_off = 0;
            written(s, list_pop(&s->outq));
        }
        s->out_off += left;
        if ((size_t)n < total)
            return; /* the socket is full: wait for EV_WRITE */
    }
    if (!s->outq.head)
        ev_io_stop(loop, &s->wio);
}

/* ---- the document ---- */

/* Bytes of the document for e on s, at most. */
static size_t doc_cap(const tcp_sock *s, const tr_event *e)
{
    const char *m = s->u.method[0] ? s->u.method : e->name;
    return 96 + strlen(m) + strlen(s->event_param) + strlen(e->name) + e->params_len;
}

static size_t tcp_room(void *ud, void *sock, const tr_event *e)
{
    (void)ud;
    return sizeof(tcp_item) + doc_cap(sock, e);
}

static char *cat(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    return p + n;
}
#define LIT(p, s) cat((p), (s), sizeof(s) - 1)

static char *cat_u64(char *p, uint64_t v)
{
    char tmp[24], *t = tmp + sizeof(tmp);
    do {
        *--t = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return cat(p, t, (size_t)(tmp + sizeof(tmp) - t));
}

/* Write into it (doc_cap bytes of doc) {"jsonrpc":"2.0","method":M,"params":P[,"id":N]}\n,
 * with event_param's key added first to an object (or the event's name first in an
 * array). No printf on this path: it runs once per event per subscriber. Names and keys
 * need no escaping (their characters are checked); params is JSON text already. */
static void build(tcp_sock *s, const tr_event *e, tcp_item *it)
{
    const char *m = s->u.method[0] ? s->u.method : e->name;
    const char *ep = s->event_param;
    size_t nl = strlen(e->name);
    char *p = LIT(it->doc, "{\"jsonrpc\":\"2.0\",\"method\":\"");
    p = cat(p, m, strlen(m));
    p = LIT(p, "\"");
    if (*ep) {
        if (!e->params || e->params[0] == '{') {
            p = LIT(p, ",\"params\":{\"");
            p = cat(p, ep, strlen(ep));
            p = LIT(p, "\":\"");
        } else { /* an array: the event's name comes first, as OpenSIPS */
            p = LIT(p, ",\"params\":[\"");
        }
        p = cat(p, e->name, nl);
        p = LIT(p, "\"");
        if (!e->params) {
            p = LIT(p, "}");
        } else {
            if (e->params_len > 2) /* not {} or [] */
                p = LIT(p, ",");
            p = cat(p, e->params + 1, e->params_len - 1);
        }
    } else if (e->params) {
        p = LIT(p, ",\"params\":");
        p = cat(p, e->params, e->params_len);
    }
    it->id = 0;
    if (s->reliable) {
        it->id = ++s->ts->next_id;
        p = LIT(p, ",\"id\":");
        p = cat_u64(p, it->id);
    }
    p = LIT(p, "}\n");
    it->len = (size_t)(p - it->doc);
}

/* ---- the scheme ---- */

static void tcp_send(void *ud, void *sock, tr_delivery *d)
{
    tcp_sock *s = sock;
    (void)ud;
    if (s->outq.n + s->wait.n >= (size_t)s->queue) {
        char why[64];
        snprintf(why, sizeof(why), "queue full (%d events)", s->queue);
        tr_delivery_done(d, -1, why);
        return;
    }
    tcp_item *it = tr_delivery_room(d); /* tcp_room's bytes */
    build(s, tr_delivery_event(d), it);
    it->d = d;
    list_push(&s->outq, it);
    kick(s);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    tcp_sock *s = w->data;
    (void)loop;
    (void)revents;
    if (s->state == S_CONNECTING) {
        char why[64];
        snprintf(why, sizeof(why), "connect timeout (%d ms)", s->timeout_ms);
        conn_lost(s, why);
    } else if (s->state == S_BACKOFF) {
        s->state = S_IDLE;
        if (s->outq.n)
            kick(s);
    }
}

static void *tcp_open(void *ud, const char *uri, char *err, size_t errlen)
{
    tcp_state *ts = ud;
    tcp_sock *s = hub_calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (tr_tcp_uri_parse(uri, &s->u, err, errlen) < 0) {
        hub_free(s);
        return NULL;
    }
    s->tok = json_tokener_new();
    if (!s->tok) {
        hub_free(s);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->ts = ts;
    s->sid = ++ts->next_sid;
    s->fd = -1;
    s->reliable = s->u.reliable >= 0 ? s->u.reliable : ts->conf.reliable_mode;
    s->timeout_ms = s->u.timeout_ms >= 0 ? s->u.timeout_ms : ts->conf.timeout;
    s->queue = s->u.queue >= 0 ? s->u.queue : ts->conf.queue_size;
    s->event_param = s->u.has_event_param ? s->u.event_param : ts->conf.event_param;
    s->backoff = BACKOFF_MIN_MS / 1000.0;
    snprintf(s->desc, sizeof(s->desc), "%s", uri);
    ev_io_init(&s->rio, read_cb, -1, EV_READ);
    ev_io_init(&s->wio, write_cb, -1, EV_WRITE);
    ev_timer_init(&s->timer, timer_cb, 0, 0);
    ev_timer_init(&s->rtimer, rtimer_cb, 0, 0);
    s->rio.data = s->wio.data = s->timer.data = s->rtimer.data = s;
    s->next = ts->socks;
    ts->socks = s;
    return s;
}

static const char *tcp_state_name(void *ud, void *sock)
{
    tcp_sock *s = sock;
    (void)ud;
    return state_names[s->state];
}

static void tcp_close(void *ud, void *sock)
{
    tcp_state *ts = ud;
    tcp_sock *s = sock;
    const char *why = hub_stopping(ts->h) ? "the hub stopped before it was delivered"
                                          : "the socket was closed (unsubscribed)";
    close_fd(s);
    ev_timer_stop(ts->loop, &s->rtimer);
    free_addrs(s);
    fail_list(&s->wait, why);
    fail_list(&s->outq, why);
    for (tcp_sock **pp = &ts->socks; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    json_tokener_free(s->tok);
    hub_free(s);
}

static const tr_scheme tcp_scheme = {
    .name = "tcp",
    .check = tcp_check,
    .open = tcp_open,
    .room = tcp_room,
    .send = tcp_send,
    .state = tcp_state_name,
    .close = tcp_close,
};

/* ---- the module ---- */

static void resolver_stop(tcp_state *ts)
{
    resolver *rv = ts->rv;
    if (!rv)
        return;
    ts->rv = NULL;
    rv->ts = NULL; /* answers still in the mailbox find no module */
    if (rv->running) {
        pthread_mutex_lock(&rv->mu);
        rv->quit = 1;
        pthread_cond_signal(&rv->cv);
        pthread_mutex_unlock(&rv->mu);
        /* A lookup under way may take the resolver's whole timeout (seconds per name
         * server): wait a little, then let the thread finish on its own reference. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += RESOLVER_JOIN_S;
        if (pthread_timedjoin_np(rv->thread, NULL, &until) != 0) {
            hub_log(HUB_LOG_WARN, "tcp: a host name lookup is still under way; not waiting");
            pthread_detach(rv->thread);
        }
        rv->running = 0;
    }
    resolver_unref(rv);
}

static void tcp_free(void *state)
{
    tcp_state *ts = state;
    if (!ts)
        return;
    if (!ts->stopped)
        tr_events_remove_scheme(ts->h, "tcp");
    resolver_stop(ts);
    hub_free(ts);
}

static int tcp_init(hub *h, void **state, char *err, size_t errlen)
{
    tcp_state *ts = hub_calloc(1, sizeof(*ts));
    if (!ts) {
        snprintf(err, errlen, "tcp: out of memory");
        return -ENOMEM;
    }
    *state = ts;
    ts->h = h;
    ts->loop = hub_loop(h);
    const hub_config *cfg = hub_get_config(h);
    const hub_conf_instance *in = hub_conf_next(cfg, "tcp", NULL);
    if (!in && hub_conf_defaults(&tcp_sections[0], &ts->conf, err, errlen) < 0)
        return -EINVAL;
    if (in) {
        ts->conf = *(const tcp_conf *)in->data;
        size_t n = strlen(ts->conf.event_param);
        if (n && tr_tcp_name_check(ts->conf.event_param, n) < 0) {
            snprintf(err, errlen, "%s:%d: [tcp] event_param must be 1..64 of [A-Za-z0-9_.:/-]",
                     in->file, in->line);
            return -EINVAL;
        }
    }
    resolver *rv = hub_calloc(1, sizeof(*rv));
    if (!rv) {
        snprintf(err, errlen, "tcp: out of memory");
        return -ENOMEM;
    }
    rv->h = h;
    atomic_init(&rv->refs, 1);
    pthread_mutex_init(&rv->mu, NULL);
    pthread_cond_init(&rv->cv, NULL);
    rv->ts = ts;
    ts->rv = rv;
    return tr_events_add_scheme(h, "tcp", &tcp_scheme, ts, err, errlen);
}

static int tcp_start(void *state, char *err, size_t errlen)
{
    tcp_state *ts = state;
    atomic_fetch_add(&ts->rv->refs, 1); /* the thread's */
    int rc = pthread_create(&ts->rv->thread, NULL, resolver_main, ts->rv);
    if (rc != 0) {
        atomic_fetch_sub(&ts->rv->refs, 1);
        snprintf(err, errlen, "tcp: cannot start the resolver thread: %s", strerror(rc));
        return -rc;
    }
    ts->rv->running = 1;
    return 0;
}

static size_t tcp_drain(void *state)
{
    tcp_state *ts = state;
    size_t n = 0;
    for (tcp_sock *s = ts->socks; s; s = s->next)
        n += s->outq.n + s->wait.n;
    return n;
}

static void tcp_stop(void *state)
{
    tcp_state *ts = state;
    /* every tcp: socket closes through the events module: what is left is reported failed */
    tr_events_remove_scheme(ts->h, "tcp");
    ts->stopped = 1;
    resolver_stop(ts);
}

const hub_module tcp_module = {
    .name = "tcp",
    .sections = tcp_sections,
    .init = tcp_init,
    .start = tcp_start,
    .drain = tcp_drain,
    .stop = tcp_stop,
    .free = tcp_free,
};
