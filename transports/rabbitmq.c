/* The rabbitmq module (see rabbitmq.h): named servers that scripts and evhubctl publish to,
 * and the rabbitmq: socket of the event interface. Each connection (a named server, or one
 * distinct rabbitmq: socket URI) is an rmq_conn with its own thread, because every call of
 * rabbitmq-c may block. The loop and the workers only append to the connection's bounded
 * queue and wake its thread (an eventfd); the thread publishes, reads confirms, returns,
 * channel and connection closes without blocking on reads (amqp_simple_wait_frame_noblock,
 * which also sends and checks heartbeats), sleeps in poll() on {eventfd, socket} for at most
 * a quarter of the heartbeat, and reconnects with a backoff. Every message ends exactly
 * once: confirmed (status 0) or failed (-1, with a reason), counted, and reported — to a
 * script's report function through hub_complete_fields, to the event interface and to evhubctl
 * through the mailbox. Delivery is at-least-once: what was published but not confirmed when
 * a connection dropped is published again after reconnecting, with the same message_id. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <ev.h>
#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/control.h"
#include "hub/core.h"
#include "hub/log.h"
#include "transports/events.h"
#include "transports/rabbitmq.h"

#define DEF_HEARTBEAT       60     /* s; rabbitmq-c's 0 would leave a dead peer unseen */
#define DEF_CONNECT_TIMEOUT 500    /* ms, as OpenSIPS event_rabbitmq */
#define DEF_QUEUE_SIZE      65536  /* messages a connection holds (queued + unconfirmed) */
#define DEF_FRAME_MAX       131072 /* AMQP_DEFAULT_FRAME_SIZE */
#define BACKOFF_MIN         0.1    /* s: first retry after a failed connect or a drop */
#define BACKOFF_MAX         30.0   /* s */
#define WINDOW              4096   /* published and not yet confirmed, per connection */
#define BATCH               256    /* messages taken from the queue at once */
#define RESEND_MAX          5      /* a message resent more often than this fails */
#define RPC_TIMEOUT_MIN_MS  2000   /* login and channel setup: max(this, 4 x connect_timeout) */
#define STALL_NO_HB_S       30     /* a publish blocked this long is cut (heartbeat 0) */
#define WATCH_S             0.25   /* the loop's check of stalled publishes */

/* ---- configuration ---- */

static const char *const confirms_choices[] = {"default", "no",   "yes", "off", "on",
                                               "false",   "true", "0",   "1",   NULL};

/* [rabbitmq] (server = [ID]URL lines, and the defaults of every server) and
 * [rabbitmq:ID] (url = URL, and that server's own values). -1 / "default": inherit. */
typedef struct rmq_conf {
    hub_conf_list server;
    char url[HUB_CONF_LINE_MAX + 1];
    int heartbeat;
    int connect_timeout;
    int confirms;
    int queue_size;
    long frame_max;
    char kemi_server[TR_RMQ_ID_MAX + 1];
} rmq_conf;

static const hub_conf_row rmq_rows[] = {
    HUB_CONF_ROW(rmq_conf, "server", HUB_CONF_LIST, server, 0, 0, NULL, NULL),
    HUB_CONF_ROW(rmq_conf, "url", HUB_CONF_STRING, url, 0, 0, NULL, NULL),
    HUB_CONF_ROW(rmq_conf, "heartbeat", HUB_CONF_INT, heartbeat, -1, 65535, NULL, "-1"),
    HUB_CONF_ROW(rmq_conf, "connect_timeout", HUB_CONF_INT, connect_timeout, -1, 600000, NULL,
                 "-1"),
    HUB_CONF_ROW(rmq_conf, "confirms", HUB_CONF_ENUM, confirms, 0, 0, confirms_choices, "default"),
    HUB_CONF_ROW(rmq_conf, "queue_size", HUB_CONF_INT, queue_size, -1, 100000000, NULL, "-1"),
    HUB_CONF_ROW(rmq_conf, "frame_max", HUB_CONF_LONG, frame_max, -1, 2147483647L, NULL, "-1"),
    HUB_CONF_ROW(rmq_conf, "kemi_server", HUB_CONF_STRING, kemi_server, 0, 0, NULL, NULL),
    {.name = NULL},
};

static const hub_conf_section rmq_sections[] = {
    {"rabbitmq", 1, sizeof(rmq_conf), rmq_rows},
    {NULL, 0, 0, NULL},
};

/* The values one connection uses. */
typedef struct rmq_settings {
    int heartbeat;       /* s, 0: off */
    int connect_timeout; /* ms */
    int confirms;
    int queue_size;
    int frame_max;
} rmq_settings;

/* ---- parsers ---- */

int tr_rmq_id_check(const char *s, size_t len)
{
    if (len == 0 || len > TR_RMQ_ID_MAX)
        return -EINVAL;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return -EINVAL;
    }
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* %-unescape s[0..len) into out (cap bytes with the NUL). 0, or -1 (bad escape, too long,
 * or a NUL). */
static int unescape(const char *s, size_t len, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= len)
                return -1;
            int hi = hexval(s[i + 1]);
            int lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -1;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o + 1 >= cap)
            return -1;
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

static int parse_port(const char *s, size_t len)
{
    long v = 0;
    if (len == 0 || len > 5)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= 65535 ? (int)v : -1;
}

/* [user[:pass]@]host[:port] spanning s[0..len). */
static int parse_authority(const char *s, size_t len, tr_rmq_target *t, const char **why)
{
    const char *at = memrchr(s, '@', len);
    if (at) {
        size_t ul = (size_t)(at - s);
        const char *colon = memchr(s, ':', ul);
        size_t nl = colon ? (size_t)(colon - s) : ul;
        if (nl == 0 || unescape(s, nl, t->user, sizeof(t->user)) < 0) {
            *why = "a bad or empty user name";
            return -1;
        }
        if (colon && unescape(colon + 1, ul - nl - 1, t->pass, sizeof(t->pass)) < 0) {
            *why = "a bad password";
            return -1;
        }
        if (!colon)
            t->pass[0] = '\0';
        len -= ul + 1;
        s = at + 1;
    }
    const char *pcolon;
    size_t hl;
    if (len && s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (!close) {
            *why = "'[' without ']'";
            return -1;
        }
        hl = (size_t)(close - s - 1);
        if (hl == 0 || hl >= sizeof(t->host)) {
            *why = "an empty or long IPv6 address";
            return -1;
        }
        memcpy(t->host, s + 1, hl);
        t->host[hl] = '\0';
        pcolon = close + 1 < s + len ? close + 1 : NULL;
        if (pcolon && *pcolon != ':') {
            *why = "text after ']'";
            return -1;
        }
    } else {
        pcolon = memchr(s, ':', len);
        hl = pcolon ? (size_t)(pcolon - s) : len;
        if (hl == 0 || unescape(s, hl, t->host, sizeof(t->host)) < 0) {
            *why = "the host is missing or bad";
            return -1;
        }
        for (const char *p = t->host; *p; p++) {
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_')) {
                *why = "the host is not a name or an address";
                return -1;
            }
        }
    }
    if (pcolon) {
        t->port = parse_port(pcolon + 1, (size_t)(s + len - pcolon - 1));
        if (t->port < 0) {
            *why = "the port must be 1..65535";
            return -1;
        }
    }
    return 0;
}

int tr_rmq_url_parse(const char *url, tr_rmq_target *t, char *err, size_t errlen)
{
    const char *why = NULL;
    memset(t, 0, sizeof(*t));
    strcpy(t->user, "guest");
    strcpy(t->pass, "guest");
    strcpy(t->vhost, "/");
    t->port = 5672;
    if (!url || strncmp(url, "amqp://", 7) != 0) {
        why = url && !strncmp(url, "amqps://", 8) ? "amqps:// (TLS) is not supported"
                                                  : "it must start with amqp://";
    } else {
        const char *s = url + 7, *slash = strchr(s, '/');
        size_t al = slash ? (size_t)(slash - s) : strlen(s);
        if (strchr(s, '?') || strchr(s, '#'))
            why = "a query or a fragment is not allowed";
        else if (parse_authority(s, al, t, &why) == 0 && slash &&
                 unescape(slash + 1, strlen(slash + 1), t->vhost, sizeof(t->vhost)) < 0)
            why = "a bad vhost";
        else if (!why && slash && strchr(slash + 1, '/'))
            why = "a '/' in the vhost must be written %2f";
    }
    if (why) {
        snprintf(err, errlen, "bad URL: %s", why);
        return -EINVAL;
    }
    return 0;
}

int tr_rmq_uri_parse(const char *uri, tr_rmq_target *t, char *err, size_t errlen)
{
    const char *why = NULL;
    memset(t, 0, sizeof(*t));
    strcpy(t->user, "guest");
    strcpy(t->pass, "guest");
    strcpy(t->vhost, "/");
    t->port = 5672;
    if (!uri || strncmp(uri, "rabbitmq:", 9) != 0) {
        why = "it must start with rabbitmq:";
        goto fail;
    }
    const char *s = uri + 9, *slash = strchr(s, '/');
    if (!slash) {
        why = "expected rabbitmq:[USER[:PASS]@]HOST[:PORT]/[EXCHANGE?]ROUTING_KEY";
        goto fail;
    }
    if (parse_authority(s, (size_t)(slash - s), t, &why) < 0)
        goto fail;
    const char *path = slash + 1, *semi = strchr(path, ';');
    size_t pl = semi ? (size_t)(semi - path) : strlen(path);
    const char *q = memchr(path, '?', pl);
    if (q && unescape(path, (size_t)(q - path), t->exchange, sizeof(t->exchange)) < 0) {
        why = "a bad exchange";
        goto fail;
    }
    const char *key = q ? q + 1 : path;
    if (unescape(key, (size_t)(path + pl - key), t->routing_key, sizeof(t->routing_key)) < 0) {
        why = "a bad routing key";
        goto fail;
    }
    if (!t->routing_key[0] && !t->exchange[0]) {
        why = "a routing key (or an exchange) is needed";
        goto fail;
    }
    for (int i = 0; semi && i < 4; i++) { /* bounded: one option exists */
        const char *o = semi + 1, *next = strchr(o, ';');
        size_t ol = next ? (size_t)(next - o) : strlen(o);
        if (ol > 6 && !memcmp(o, "vhost=", 6)) {
            if (unescape(o + 6, ol - 6, t->vhost, sizeof(t->vhost)) < 0) {
                why = "a bad vhost";
                goto fail;
            }
        } else {
            why = "unknown option after ';' (vhost=NAME)";
            goto fail;
        }
        semi = next;
    }
    if (semi) {
        why = "too many options";
        goto fail;
    }
    return 0;
fail:
    snprintf(err, errlen, "rabbitmq: socket: %s", why);
    return -EINVAL;
}

void tr_rmq_target_desc(const tr_rmq_target *t, char *buf, size_t len)
{
    char vh[3 * TR_RMQ_SHORT_MAX + 1];
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)t->vhost; *p && o + 4 < sizeof(vh); p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            *p == '-' || *p == '.' || *p == '_')
            vh[o++] = (char)*p;
        else
            o += (size_t)snprintf(vh + o, sizeof(vh) - o, "%%%02x", *p);
    }
    vh[o] = '\0';
    int v6 = strchr(t->host, ':') != NULL;
    snprintf(buf, len, "amqp://%s@%s%s%s:%d/%s", t->user, v6 ? "[" : "", t->host, v6 ? "]" : "",
             t->port, vh);
}

int tr_rmq_opts_parse(json_object *opts, tr_rmq_opts *o, char *err, size_t errlen)
{
    memset(o, 0, sizeof(*o));
    if (!opts)
        return 0;
    if (!json_object_is_type(opts, json_type_object)) {
        snprintf(err, errlen, "opts must be a table");
        return -EINVAL;
    }
    json_object_object_foreach(opts, k, v)
    {
        if (!strcmp(k, "content_type")) {
            if (!json_object_is_type(v, json_type_string) ||
                json_object_get_string_len(v) > TR_RMQ_SHORT_MAX) {
                snprintf(err, errlen, "opts.content_type must be a string of at most 255 bytes");
                return -EINVAL;
            }
            o->content_type = json_object_get_string(v);
            o->content_type_len = (size_t)json_object_get_string_len(v);
        } else if (!strcmp(k, "headers")) {
            if (!json_object_is_type(v, json_type_object)) {
                snprintf(err, errlen, "opts.headers must be a table of name = value");
                return -EINVAL;
            }
            json_object_object_foreach(v, hk, hv)
            {
                json_type ty = json_object_get_type(hv);
                if (strlen(hk) > TR_RMQ_SHORT_MAX ||
                    !(ty == json_type_string || ty == json_type_int || ty == json_type_double ||
                      ty == json_type_boolean)) {
                    snprintf(err, errlen,
                             "opts.headers: '%.64s' must be a string, a number or a boolean "
                             "(names at most 255 bytes)",
                             hk);
                    return -EINVAL;
                }
            }
            o->headers = json_object_object_length(v) ? v : NULL;
        } else if (!strcmp(k, "persistent") || !strcmp(k, "mandatory")) {
            if (!json_object_is_type(v, json_type_boolean)) {
                snprintf(err, errlen, "opts.%s must be a boolean", k);
                return -EINVAL;
            }
            *(k[0] == 'p' ? &o->persistent : &o->mandatory) = json_object_get_boolean(v);
        } else {
            snprintf(err, errlen,
                     "opts: unknown option '%.64s' (content_type, headers, persistent, "
                     "mandatory)",
                     k);
            return -EINVAL;
        }
    }
    return 0;
}

/* ---- messages ---- */

enum { M_PLAIN, M_TOKEN, M_EVENT, M_CTL };

typedef struct rmq_conn rmq_conn;
typedef struct rmq_state rmq_state;

/* One message, from its submission until it is reported. Fields under "thread" belong to
 * the connection's thread once queued; lprev/lnext and resolved to the loop (M_EVENT and
 * M_CTL only, which the loop creates and resolves). */
typedef struct rmq_msg {
    struct rmq_msg *next; /* thread: queue, unconfirmed or done list */
    struct rmq_msg *lprev, *lnext;
    int kind;
    int resolved;
    uint64_t token;
    tr_delivery *d;
    hub_ctl_call *call;
    uint64_t seq; /* the message_id */
    uint64_t tag; /* thread: delivery tag on the current channel */
    int resends;  /* thread */
    int returned; /* thread: basic.return seen, its ack decides -1 */
    int status;   /* set by the thread before the message leaves it */
    char error[192];
    int persistent, mandatory;
    amqp_table_t headers; /* entries point into data */
    amqp_bytes_t exchange, routing_key, content_type, body;
    char data[];
} rmq_msg;

typedef struct msg_list {
    rmq_msg *head, *tail;
    size_t n;
} msg_list;

static void list_push(msg_list *l, rmq_msg *m)
{
    m->next = NULL;
    if (l->tail)
        l->tail->next = m;
    else
        l->head = m;
    l->tail = m;
    l->n++;
}

static rmq_msg *list_pop(msg_list *l)
{
    rmq_msg *m = l->head;
    if (m) {
        l->head = m->next;
        if (!l->head)
            l->tail = NULL;
        l->n--;
        m->next = NULL;
    }
    return m;
}

/* Put all of src in front of dst, in order. */
static void list_prepend(msg_list *dst, msg_list *src)
{
    if (!src->head)
        return;
    src->tail->next = dst->head;
    if (!dst->tail)
        dst->tail = src->tail;
    dst->head = src->head;
    dst->n += src->n;
    *src = (msg_list){0};
}

/* A message as one block: the entries of its headers table, then exchange, routing key,
 * content type, body and the header names and string values, each NUL-terminated. NULL with
 * err set when out of memory. */
static rmq_msg *msg_new(const char *ex, size_t exl, const char *rk, size_t rkl,
                        const tr_rmq_opts *o, const char *body, size_t bl, char *err, size_t errlen)
{
    size_t nh = o && o->headers ? (size_t)json_object_object_length(o->headers) : 0;
    size_t ctl = o && o->content_type ? o->content_type_len : 0;
    size_t need = sizeof(rmq_msg) + nh * sizeof(amqp_table_entry_t) + exl + rkl + ctl + bl + 4;
    if (nh) {
        json_object_object_foreach(o->headers, k, v)
        {
            need += strlen(k) + 1;
            if (json_object_is_type(v, json_type_string))
                need += (size_t)json_object_get_string_len(v) + 1;
        }
    }
    rmq_msg *m = hub_malloc(need);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    memset(m, 0, sizeof(*m));
    amqp_table_entry_t *ent = (amqp_table_entry_t *)(void *)m->data;
    char *p = m->data + nh * sizeof(amqp_table_entry_t);
#define TAKE(field, src, n)                                                                        \
    do {                                                                                           \
        memcpy(p, (src), (n));                                                                     \
        p[(n)] = '\0';                                                                             \
        (field).bytes = p;                                                                         \
        (field).len = (n);                                                                         \
        p += (n) + 1;                                                                              \
    } while (0)
    TAKE(m->exchange, ex, exl);
    TAKE(m->routing_key, rk, rkl);
    if (ctl)
        TAKE(m->content_type, o->content_type, ctl);
    TAKE(m->body, body, bl);
    if (nh) {
        size_t i = 0;
        json_object_object_foreach(o->headers, k, v)
        {
            amqp_table_entry_t *e = &ent[i++];
            TAKE(e->key, k, strlen(k));
            switch (json_object_get_type(v)) {
            case json_type_string:
                e->value.kind = AMQP_FIELD_KIND_UTF8;
                TAKE(e->value.value.bytes, json_object_get_string(v),
                     (size_t)json_object_get_string_len(v));
                break;
            case json_type_int:
                e->value.kind = AMQP_FIELD_KIND_I64;
                e->value.value.i64 = json_object_get_int64(v);
                break;
            case json_type_double:
                e->value.kind = AMQP_FIELD_KIND_F64;
                e->value.value.f64 = json_object_get_double(v);
                break;
            default:
                e->value.kind = AMQP_FIELD_KIND_BOOLEAN;
                e->value.value.boolean = json_object_get_boolean(v);
                break;
            }
        }
        m->headers.num_entries = (int)nh;
        m->headers.entries = ent;
    }
#undef TAKE
    if (o) {
        m->persistent = o->persistent;
        m->mandatory = o->mandatory;
    }
    return m;
}

/* ---- connections ---- */

enum { C_IDLE, C_CONNECTING, C_UP, C_DOWN, C_STOPPED };
static const char *const cstate_names[] = {"idle", "connecting", "connected", "down", "stopped"};

struct rmq_conn {
    rmq_conn *next; /* rs->conns (servers) or rs->socks (rabbitmq: sockets) */
    rmq_state *rs;
    hub *h;
    char id[TR_RMQ_ID_MAX + 1]; /* a server's id; "" for a socket */
    char desc[TR_SOCKET_URI_MAX + 64];
    tr_rmq_target t;
    rmq_settings set;
    int is_sock;
    /* the thread */
    pthread_t thread;
    int running;
    int efd;
    pthread_mutex_t mu; /* queue, sleeping, quit, last_error */
    msg_list queue;
    int sleeping;
    int quit;
    int detached; /* closed while running: the thread's last post frees it (reap_cb) */
    char last_error[192];
    atomic_int state;
    atomic_uint_fast64_t held; /* queued + unconfirmed + being published */
    atomic_uint_fast64_t n_queued, n_unconfirmed;
    atomic_uint_fast64_t published, confirmed, failed, reconnects, resent;
    atomic_uint_fast64_t next_seq;
    /* thread only */
    amqp_connection_state_t amqp;
    msg_list unconf;
    msg_list done; /* M_EVENT and M_CTL decided, to post to the loop */
    uint64_t next_tag;
    int blocked; /* connection.blocked by the broker */
    int was_up;
    /* a publish under way, for the loop's stall check */
    pthread_mutex_t fdmu;
    int fd;
    atomic_llong busy_since_ms; /* 0: not publishing */
    /* loop only: M_EVENT and M_CTL messages not yet resolved */
    rmq_msg *inflight;
};

struct rmq_state {
    hub *h;
    struct ev_loop *loop;
    rmq_settings defaults;
    rmq_conn *conns; /* named servers, in config order */
    rmq_conn *socks; /* rabbitmq: sockets */
    rmq_conn *dying; /* sockets closed while their thread ran, until it ended */
    rmq_conn *kemi;  /* KSR.rabbitmq.publish's server */
    atomic_int started;
    atomic_int draining;
    int stopped;
    ev_timer watch;
};

static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_error(rmq_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(rmq_conn *c, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&c->mu);
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&c->mu);
}

/* The loop's list of messages it must resolve. */
static void inflight_add(rmq_conn *c, rmq_msg *m)
{
    m->lprev = NULL;
    m->lnext = c->inflight;
    if (c->inflight)
        c->inflight->lprev = m;
    c->inflight = m;
}

static void inflight_del(rmq_conn *c, rmq_msg *m)
{
    if (m->lprev)
        m->lprev->lnext = m->lnext;
    else
        c->inflight = m->lnext;
    if (m->lnext)
        m->lnext->lprev = m->lprev;
    m->lprev = m->lnext = NULL;
}

/* Loop thread: tell whoever waits for an M_EVENT or M_CTL message how it ended. */
static void resolve(rmq_conn *c, rmq_msg *m)
{
    if (m->resolved)
        return;
    m->resolved = 1;
    inflight_del(c, m);
    if (m->kind == M_EVENT) {
        tr_delivery_done(m->d, m->status, m->status ? m->error : NULL);
    } else if (m->kind == M_CTL) {
        if (m->status == 0) {
            json_object *r = json_object_new_object();
            json_object_object_add(r, "status", json_object_new_int(0));
            json_object_object_add(r, "message_id", json_object_new_uint64(m->seq));
            hub_ctl_reply(m->call, r);
        } else {
            hub_ctl_fail(m->call, HUB_CTL_FAILED, "%s", m->error);
        }
    }
}

typedef struct done_batch {
    rmq_conn *c;
    rmq_msg *head;
} done_batch;

/* Loop thread: messages the connection's thread decided. A message the connection's close
 * already resolved (the batch was still in the mailbox) is only freed: c may be gone. */
static void done_cb(hub *h, void *arg)
{
    done_batch *b = arg;
    (void)h;
    for (rmq_msg *m = b->head, *n; m; m = n) {
        n = m->next;
        if (!m->resolved)
            resolve(b->c, m);
        hub_free(m);
    }
    hub_free(b);
}

/* Thread: post what is in c->done to the loop. */
static void flush_done(rmq_conn *c)
{
    if (!c->done.head)
        return;
    done_batch *b = hub_malloc(sizeof(*b));
    if (!b) {
        return; /* kept: the next flush, or the close, takes them */
    }
    b->c = c;
    b->head = c->done.head;
    c->done = (msg_list){0};
    hub_loop_post_retry(c->h, done_cb, b); /* b is the loop's now */
}

/* r = {id=, status=, error= (failed only), exchange=, routing_key=, message_id=}: typed
 * fields, copied by the hub (no json-c on the way). */
static void report(rmq_conn *c, rmq_msg *m)
{
    hub_field f[6];
    size_t n = 0;
    f[n++] = (hub_field){"id", HUB_FIELD_STR, c->id, strlen(c->id), 0};
    f[n++] = (hub_field){"status", HUB_FIELD_INT, NULL, 0, m->status};
    if (m->status)
        f[n++] = (hub_field){"error", HUB_FIELD_STR, m->error, strlen(m->error), 0};
    f[n++] = (hub_field){"exchange", HUB_FIELD_STR, m->exchange.bytes, m->exchange.len, 0};
    f[n++] = (hub_field){"routing_key", HUB_FIELD_STR, m->routing_key.bytes, m->routing_key.len, 0};
    f[n++] = (hub_field){"message_id", HUB_FIELD_INT, NULL, 0, (int64_t)m->seq};
    hub_complete_fields(c->h, m->token, 0, f, n);
}

/* Thread (or the close, after the thread ended): m ended with status; count it and report
 * it. m leaves the caller. */
static void decide(rmq_conn *c, rmq_msg *m, int status, const char *error)
{
    m->status = status;
    if (status) {
        if (error != m->error) /* a returned message carries its reason already */
            snprintf(m->error, sizeof(m->error), "%s", error ? error : "failed");
        atomic_fetch_add(&c->failed, 1);
    } else {
        atomic_fetch_add(&c->confirmed, 1);
    }
    atomic_fetch_sub(&c->held, 1);
    switch (m->kind) {
    case M_TOKEN:
        report(c, m);
        hub_free(m);
        break;
    case M_PLAIN:
        if (status)
            hub_log(HUB_LOG_DEBUG, "rabbitmq: %s: message %" PRIu64 " failed: %s", c->desc, m->seq,
                    m->error);
        hub_free(m);
        break;
    default:
        list_push(&c->done, m);
        break;
    }
}

static void fail_list(rmq_conn *c, msg_list *l, const char *why)
{
    rmq_msg *m;
    size_t bound = l->n;
    while (bound-- > 0 && (m = list_pop(l)))
        decide(c, m, -1, m->returned ? m->error : why);
}

/* Any thread: hand m to c. 0, or -ENOBUFS (full) / -ESHUTDOWN with err set; m is then still
 * the caller's. */
static int conn_submit(rmq_conn *c, rmq_msg *m, char *err, size_t errlen)
{
    int wake = 0;
    pthread_mutex_lock(&c->mu);
    if (c->quit) {
        pthread_mutex_unlock(&c->mu);
        snprintf(err, errlen, "rabbitmq: %.200s: stopped", c->id[0] ? c->id : c->desc);
        return -ESHUTDOWN;
    }
    if (atomic_load(&c->held) >= (uint64_t)c->set.queue_size) {
        pthread_mutex_unlock(&c->mu);
        snprintf(err, errlen, "rabbitmq: %.160s: queue full (%d messages)",
                 c->id[0] ? c->id : c->desc, c->set.queue_size);
        return -ENOBUFS;
    }
    m->seq = atomic_fetch_add(&c->next_seq, 1) + 1;
    atomic_fetch_add(&c->held, 1);
    atomic_fetch_add(&c->n_queued, 1);
    atomic_fetch_add(&c->published, 1);
    list_push(&c->queue, m);
    if (c->sleeping) {
        c->sleeping = 0;
        wake = 1;
    }
    pthread_mutex_unlock(&c->mu);
    if (wake) {
        uint64_t one = 1;
        ssize_t w = write(c->efd, &one, sizeof(one));
        (void)w; /* EAGAIN: the counter is already non-zero, the thread wakes anyway */
    }
    return 0;
}

/* ---- the connection's thread ---- */

static void reply_str(amqp_rpc_reply_t r, char *buf, size_t len)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf(buf, len, "ok");
        break;
    case AMQP_RESPONSE_NONE:
        snprintf(buf, len, "no reply");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(buf, len, "%s", amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *cc = r.reply.decoded;
            snprintf(buf, len, "connection closed by the broker: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *cc = r.reply.decoded;
            snprintf(buf, len, "channel closed by the broker: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
        } else {
            snprintf(buf, len, "unexpected method 0x%08x", r.reply.id);
        }
        break;
    }
}

/* Forget the connection: no close frames (on a broken or half-written stream they are what
 * OpenSIPS#4224 is made of). What was published and not confirmed is published again
 * (at-least-once), unless it was returned or resent too often; then it fails. */
static void conn_drop(rmq_conn *c, const char *why)
{
    pthread_mutex_lock(&c->fdmu);
    c->fd = -1;
    pthread_mutex_unlock(&c->fdmu);
    if (c->amqp)
        amqp_destroy_connection(c->amqp);
    c->amqp = NULL;
    c->blocked = 0;
    set_error(c, "%s", why);
    atomic_store(&c->state, C_DOWN);
    if (c->was_up)
        hub_log(HUB_LOG_WARN, "rabbitmq: %s: connection lost: %s", c->desc, why);
    c->was_up = 0;
    msg_list again = {0};
    rmq_msg *m;
    size_t bound = c->unconf.n;
    char msg[224];
    snprintf(msg, sizeof(msg), "connection lost before the broker confirmed it: %.175s", why);
    atomic_store(&c->n_unconfirmed, 0);
    while (bound-- > 0 && (m = list_pop(&c->unconf))) {
        if (m->returned) {
            decide(c, m, -1, m->error);
        } else if (++m->resends > RESEND_MAX) {
            decide(c, m, -1, msg);
        } else {
            atomic_fetch_add(&c->resent, 1);
            list_push(&again, m);
        }
    }
    if (again.n) {
        pthread_mutex_lock(&c->mu);
        atomic_fetch_add(&c->n_queued, again.n);
        list_prepend(&c->queue, &again);
        pthread_mutex_unlock(&c->mu);
    }
}

static int open_channel(rmq_conn *c, char *why, size_t len)
{
    amqp_channel_open(c->amqp, 1);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->amqp);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char s[160];
        reply_str(r, s, sizeof(s));
        snprintf(why, len, "channel.open: %s", s);
        return -1;
    }
    c->next_tag = 1;
    if (c->set.confirms) {
        amqp_confirm_select(c->amqp, 1);
        r = amqp_get_rpc_reply(c->amqp);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            char s[160];
            reply_str(r, s, sizeof(s));
            snprintf(why, len, "confirm.select: %s", s);
            return -1;
        }
    }
    return 0;
}

/* Connect, log in, open channel 1, select confirms. 0, or -1 with why set (the connection is
 * gone again). Blocks for at most connect_timeout plus the handshake and RPC timeouts. */
static int conn_connect(rmq_conn *c, char *why, size_t len)
{
    c->amqp = amqp_new_connection();
    amqp_socket_t *sock = c->amqp ? amqp_tcp_socket_new(c->amqp) : NULL;
    if (!sock) {
        snprintf(why, len, "out of memory");
        goto fail;
    }
    struct timeval ct = {c->set.connect_timeout / 1000, (c->set.connect_timeout % 1000) * 1000};
    int rc = amqp_socket_open_noblock(sock, c->t.host, c->t.port, &ct);
    if (rc != AMQP_STATUS_OK) {
        snprintf(why, len, "cannot connect to %.100s:%d: %.100s", c->t.host, c->t.port,
                 rc == AMQP_STATUS_TIMEOUT ? "connect timeout" : amqp_error_string2(rc));
        goto fail;
    }
    long long rpc_ms = 4LL * c->set.connect_timeout;
    if (rpc_ms < RPC_TIMEOUT_MIN_MS)
        rpc_ms = RPC_TIMEOUT_MIN_MS;
    struct timeval rt = {(time_t)(rpc_ms / 1000), (suseconds_t)(rpc_ms % 1000) * 1000};
    amqp_set_handshake_timeout(c->amqp, &rt);
    amqp_set_rpc_timeout(c->amqp, &rt);
    /* connection.blocked: told when the broker stops reading (memory or disk alarm), instead
     * of a publish blocking unseen; the name shows in the management UI. */
    amqp_table_entry_t caps[2], props[2];
    caps[0].key = amqp_cstring_bytes("connection.blocked");
    caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[0].value.value.boolean = 1;
    caps[1].key = amqp_cstring_bytes("authentication_failure_close");
    caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[1].value.value.boolean = 1;
    props[0].key = amqp_cstring_bytes("capabilities");
    props[0].value.kind = AMQP_FIELD_KIND_TABLE;
    props[0].value.value.table = (amqp_table_t){2, caps};
    char cname[64];
    snprintf(cname, sizeof(cname), "evhub %s", c->id[0] ? c->id : "event socket");
    props[1].key = amqp_cstring_bytes("connection_name");
    props[1].value.kind = AMQP_FIELD_KIND_UTF8;
    props[1].value.value.bytes = amqp_cstring_bytes(cname);
    amqp_table_t ptab = {2, props};
    amqp_rpc_reply_t r =
        amqp_login_with_properties(c->amqp, c->t.vhost, 0, c->set.frame_max, c->set.heartbeat,
                                   &ptab, AMQP_SASL_METHOD_PLAIN, c->t.user, c->t.pass);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char s[160];
        reply_str(r, s, sizeof(s));
        snprintf(why, len, "login as %.40s to vhost '%.60s': %.100s", c->t.user, c->t.vhost, s);
        goto fail;
    }
    if (open_channel(c, why, len) < 0)
        goto fail;
    pthread_mutex_lock(&c->fdmu);
    c->fd = amqp_get_sockfd(c->amqp);
    pthread_mutex_unlock(&c->fdmu);
    return 0;
fail:
    if (c->amqp)
        amqp_destroy_connection(c->amqp);
    c->amqp = NULL;
    return -1;
}

static rmq_msg *unconf_take(rmq_conn *c, uint64_t tag)
{
    rmq_msg *prev = NULL;
    for (rmq_msg *m = c->unconf.head; m; prev = m, m = m->next) {
        if (m->tag != tag)
            continue;
        if (prev)
            prev->next = m->next;
        else
            c->unconf.head = m->next;
        if (c->unconf.tail == m)
            c->unconf.tail = prev;
        c->unconf.n--;
        m->next = NULL;
        return m;
    }
    return NULL;
}

/* basic.ack / basic.nack: tag, or every tag up to it when multiple. */
static void on_confirm(rmq_conn *c, uint64_t tag, int multiple, int ack)
{
    rmq_msg *m;
    size_t bound = c->unconf.n;
    if (multiple) {
        while (bound-- > 0 && c->unconf.head && c->unconf.head->tag <= tag) {
            m = list_pop(&c->unconf);
            atomic_fetch_sub(&c->n_unconfirmed, 1);
            if (m->returned || !ack)
                decide(c, m, -1, m->returned ? m->error : "nacked by the broker");
            else
                decide(c, m, 0, NULL);
        }
        return;
    }
    if ((m = unconf_take(c, tag)) != NULL) {
        atomic_fetch_sub(&c->n_unconfirmed, 1);
        if (m->returned || !ack)
            decide(c, m, -1, m->returned ? m->error : "nacked by the broker");
        else
            decide(c, m, 0, NULL);
    }
}

/* basic.return: the content follows; the returned message is found by its message_id. */
static int on_return(rmq_conn *c, amqp_frame_t *f, char *why, size_t len)
{
    amqp_basic_return_t *ret = f->payload.method.decoded;
    char err[192];
    snprintf(err, sizeof(err), "returned by the broker: %u %.*s", ret->reply_code,
             (int)ret->reply_text.len, (const char *)ret->reply_text.bytes);
    amqp_message_t msg;
    amqp_rpc_reply_t r = amqp_read_message(c->amqp, f->channel, &msg, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char s[160];
        reply_str(r, s, sizeof(s));
        snprintf(why, len, "reading a returned message: %s", s);
        return -1;
    }
    uint64_t seq = 0;
    if (msg.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        char id[32];
        size_t n = msg.properties.message_id.len < sizeof(id) - 1 ? msg.properties.message_id.len
                                                                  : sizeof(id) - 1;
        memcpy(id, msg.properties.message_id.bytes, n);
        id[n] = '\0';
        seq = strtoull(id, NULL, 10);
    }
    amqp_destroy_message(&msg);
    for (rmq_msg *m = c->unconf.head; m; m = m->next) {
        if (m->seq == seq) {
            m->returned = 1;
            snprintf(m->error, sizeof(m->error), "%s", err);
            return 0;
        }
    }
    hub_log(HUB_LOG_DEBUG, "rabbitmq: %s: message %" PRIu64 " %s", c->desc, seq, err);
    return 0;
}

/* Read what the broker sent, without waiting; heartbeats are sent and checked here. 0, or -1
 * with why set when the connection must go. */
static int read_frames(rmq_conn *c, char *why, size_t len)
{
    for (int i = 0; i < 4096; i++) {
        amqp_frame_t f;
        struct timeval tv = {0, 0};
        int rc = amqp_simple_wait_frame_noblock(c->amqp, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            snprintf(why, len, "%s",
                     rc == AMQP_STATUS_HEARTBEAT_TIMEOUT
                         ? "heartbeat timeout: the broker stopped answering"
                         : amqp_error_string2(rc));
            return -1;
        }
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            on_confirm(c, a->delivery_tag, a->multiple, 1);
            break;
        }
        case AMQP_BASIC_NACK_METHOD: {
            amqp_basic_nack_t *a = f.payload.method.decoded;
            on_confirm(c, a->delivery_tag, a->multiple, 0);
            break;
        }
        case AMQP_BASIC_RETURN_METHOD:
            if (on_return(c, &f, why, len) < 0)
                return -1;
            break;
        case AMQP_CHANNEL_CLOSE_METHOD: {
            amqp_channel_close_t *cc = f.payload.method.decoded;
            char e[224];
            snprintf(e, sizeof(e), "channel closed by the broker: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
            amqp_channel_close_ok_t ok = {0};
            hub_log(HUB_LOG_WARN, "rabbitmq: %s: %s", c->desc, e);
            set_error(c, "%s", e);
            /* what was published on the channel is lost with it: it fails, not resent */
            atomic_store(&c->n_unconfirmed, 0);
            fail_list(c, &c->unconf, e);
            if (amqp_send_method(c->amqp, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK ||
                open_channel(c, why, len) < 0) {
                if (!why[0])
                    snprintf(why, len, "cannot reopen the channel");
                return -1;
            }
            break;
        }
        case AMQP_CONNECTION_CLOSE_METHOD: {
            amqp_connection_close_t *cc = f.payload.method.decoded;
            amqp_connection_close_ok_t ok = {0};
            snprintf(why, len, "connection closed by the broker: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
            amqp_send_method(c->amqp, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            return -1;
        }
        case AMQP_CONNECTION_BLOCKED_METHOD:
            c->blocked = 1;
            hub_log(HUB_LOG_WARN, "rabbitmq: %s: the broker blocked publishing (an alarm)",
                    c->desc);
            break;
        case AMQP_CONNECTION_UNBLOCKED_METHOD:
            c->blocked = 0;
            hub_log(HUB_LOG_NOTICE, "rabbitmq: %s: the broker unblocked publishing", c->desc);
            break;
        default:
            break;
        }
        amqp_maybe_release_buffers(c->amqp);
    }
    return 0;
}

/* Publish up to BATCH queued messages (within the confirm window). 0, or -1 with why set.
 * Between messages, the frames the broker sent are read, so acks and heartbeats flow while
 * busy. */
static int publish_some(rmq_conn *c, int *did, char *why, size_t len)
{
    msg_list take = {0};
    size_t room = c->set.confirms ? WINDOW - (c->unconf.n < WINDOW ? c->unconf.n : WINDOW) : BATCH;
    if (room > BATCH)
        room = BATCH;
    *did = 0;
    if (c->blocked || room == 0)
        return 0;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < room && c->queue.head; i++)
        list_push(&take, list_pop(&c->queue));
    pthread_mutex_unlock(&c->mu);
    atomic_fetch_sub(&c->n_queued, take.n);
    rmq_msg *m;
    size_t bound = take.n;
    /* rabbitmq-c encodes into its connection pool, which only amqp_maybe_release_buffers
     * empties (read_frames does after each frame; a batch may read none) */
    amqp_maybe_release_buffers(c->amqp);
    while (bound-- > 0 && (m = list_pop(&take))) {
        amqp_basic_properties_t p;
        char mid[24];
        memset(&p, 0, sizeof(p));
        snprintf(mid, sizeof(mid), "%" PRIu64, m->seq);
        p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
        p.delivery_mode = m->persistent ? 2 : 1;
        p.message_id = amqp_cstring_bytes(mid);
        if (m->content_type.len) {
            p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
            p.content_type = m->content_type;
        }
        if (m->headers.num_entries) {
            p._flags |= AMQP_BASIC_HEADERS_FLAG;
            p.headers = m->headers;
        }
        m->tag = c->next_tag++;
        atomic_store(&c->busy_since_ms, mono_ms());
        int rc = amqp_basic_publish(c->amqp, 1, m->exchange, m->routing_key, m->mandatory, 0, &p,
                                    m->body);
        atomic_store(&c->busy_since_ms, 0);
        if (rc != AMQP_STATUS_OK) {
            snprintf(why, len, "publish: %s", amqp_error_string2(rc));
            /* m and what is left go back in front, in order: the drop resends or fails */
            list_push(&c->unconf, m);
            atomic_fetch_add(&c->n_unconfirmed, 1);
            pthread_mutex_lock(&c->mu);
            atomic_fetch_add(&c->n_queued, take.n);
            list_prepend(&c->queue, &take);
            pthread_mutex_unlock(&c->mu);
            return -1;
        }
        (*did)++;
        if (c->set.confirms) {
            list_push(&c->unconf, m);
            atomic_fetch_add(&c->n_unconfirmed, 1);
        } else {
            decide(c, m, 0, NULL); /* without confirms, written is all we know */
        }
        if ((*did & 63) == 0 && read_frames(c, why, len) < 0) {
            pthread_mutex_lock(&c->mu);
            atomic_fetch_add(&c->n_queued, take.n);
            list_prepend(&c->queue, &take);
            pthread_mutex_unlock(&c->mu);
            return -1;
        }
    }
    return 0;
}

/* Sleep until ms passed, the module wakes the thread (a message queued while it slept, or
 * the stop), or, connected, the broker sent something. */
static void wait_wake(rmq_conn *c, int ms, int connected)
{
    struct pollfd p[2] = {{.fd = c->efd, .events = POLLIN}, {.fd = -1, .events = POLLIN}};
    if (connected) {
        p[1].fd = amqp_get_sockfd(c->amqp);
        pthread_mutex_lock(&c->mu);
        int ready =
            c->quit || (c->queue.head && !c->blocked && (!c->set.confirms || c->unconf.n < WINDOW));
        c->sleeping = !ready;
        pthread_mutex_unlock(&c->mu);
        if (ready)
            return;
    }
    poll(p, 2, ms);
    uint64_t v;
    ssize_t r = read(c->efd, &v, sizeof(v)); /* non-blocking: clears the wake-up */
    (void)r;
    if (connected) {
        pthread_mutex_lock(&c->mu);
        c->sleeping = 0;
        pthread_mutex_unlock(&c->mu);
    }
}

static int is_quit(rmq_conn *c)
{
    pthread_mutex_lock(&c->mu);
    int q = c->quit;
    pthread_mutex_unlock(&c->mu);
    return q;
}

static void reap_cb(hub *h, void *arg);

static void *conn_main(void *arg)
{
    rmq_conn *c = arg;
    double backoff = BACKOFF_MIN;
    long long next_try = 0;
    char why[256];
    int hb_ms = c->set.heartbeat > 0 ? c->set.heartbeat * 1000 / 4 : 1000;
    if (hb_ms < 50)
        hb_ms = 50;
    while (!is_quit(c)) {
        why[0] = '\0';
        if (!c->amqp) {
            long long now = mono_ms();
            if (now < next_try) {
                wait_wake(c, (int)(next_try - now), 0);
                flush_done(c);
                continue;
            }
            atomic_store(&c->state, C_CONNECTING);
            if (conn_connect(c, why, sizeof(why)) < 0) {
                atomic_store(&c->state, C_DOWN);
                atomic_fetch_add(&c->reconnects, 1);
                set_error(c, "%s", why);
                hub_log(HUB_LOG_WARN, "rabbitmq: %s: %s; retrying in %.1f s", c->desc, why,
                        backoff);
                /* jitter: 75..100% of the backoff, so that servers restarted together do not
                 * see every client at once */
                next_try = mono_ms() +
                           (long long)(backoff * 1000 * (0.75 + 0.25 * rand() / (double)RAND_MAX));
                backoff = backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : backoff * 2;
                continue;
            }
            backoff = BACKOFF_MIN;
            c->was_up = 1;
            atomic_store(&c->state, C_UP);
            hub_log(HUB_LOG_NOTICE, "rabbitmq: %s: connected (heartbeat %d s, confirms %s)",
                    c->desc, amqp_get_heartbeat(c->amqp), c->set.confirms ? "on" : "off");
        }
        int did = 0;
        if (publish_some(c, &did, why, sizeof(why)) < 0 || read_frames(c, why, sizeof(why)) < 0) {
            conn_drop(c, why);
            atomic_fetch_add(&c->reconnects, 1);
            next_try = mono_ms() + (long long)(backoff * 1000);
            flush_done(c);
            continue;
        }
        flush_done(c);
        if (did || amqp_frames_enqueued(c->amqp) || amqp_data_in_buffer(c->amqp))
            continue;
        wait_wake(c, hb_ms, 1);
    }
    flush_done(c);
    pthread_mutex_lock(&c->mu);
    int detached = c->detached;
    pthread_mutex_unlock(&c->mu);
    if (detached)
        hub_loop_post_retry(c->h, reap_cb, c); /* the last thing this thread does with c */
    return NULL;
}

/* ---- starting and stopping connections ---- */

static rmq_conn *conn_new(rmq_state *rs, const tr_rmq_target *t, const rmq_settings *set,
                          const char *id, int is_sock)
{
    rmq_conn *c = hub_calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) {
        hub_free(c);
        return NULL;
    }
    c->rs = rs;
    c->h = rs->h;
    c->t = *t;
    c->set = *set;
    c->is_sock = is_sock;
    c->fd = -1;
    snprintf(c->id, sizeof(c->id), "%s", id ? id : "");
    char url[TR_SOCKET_URI_MAX];
    tr_rmq_target_desc(t, url, sizeof(url));
    if (is_sock)
        snprintf(c->desc, sizeof(c->desc), "rabbitmq:%.40s@%.60s:%d/%.60s%s%.60s;vhost=%.40s",
                 t->user, t->host, t->port, t->exchange, t->exchange[0] ? "?" : "", t->routing_key,
                 t->vhost);
    else
        snprintf(c->desc, sizeof(c->desc), "%s %s", id, url);
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->fdmu, NULL);
    atomic_init(&c->state, C_IDLE);
    return c;
}

/* Start c's thread with every signal blocked (the hub does it for threads made in start; a
 * socket subscribed later is made on the loop thread). */
static int conn_start(rmq_conn *c, char *err, size_t errlen)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&c->thread, NULL, conn_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "rabbitmq: %s: cannot start its thread: %s", c->desc, strerror(rc));
        return -rc;
    }
    c->running = 1;
    return 0;
}

/* Ask c's thread to end, cutting a publish or a read under way. Any thread. */
static void conn_quit(rmq_conn *c)
{
    uint64_t one = 1;
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_mutex_unlock(&c->mu);
    ssize_t w = write(c->efd, &one, sizeof(one));
    (void)w;
    pthread_mutex_lock(&c->fdmu);
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&c->fdmu);
}

/* Loop thread: end c's thread and report everything c still holds: what was queued or
 * unconfirmed fails with why, what the thread had decided gets its own outcome. c is
 * then empty (and may be freed). */
static void conn_finish(rmq_conn *c, const char *why)
{
    conn_quit(c);
    if (c->running) {
        pthread_join(c->thread, NULL);
        c->running = 0;
    }
    if (c->amqp) {
        amqp_destroy_connection(c->amqp);
        c->amqp = NULL;
    }
    atomic_store(&c->state, C_STOPPED);
    char w1[224], w2[224];
    snprintf(w1, sizeof(w1), "%s before the broker confirmed it", why);
    snprintf(w2, sizeof(w2), "%s before it was published", why);
    atomic_store(&c->n_unconfirmed, 0);
    fail_list(c, &c->unconf, w1);
    pthread_mutex_lock(&c->mu);
    msg_list q = c->queue;
    c->queue = (msg_list){0};
    pthread_mutex_unlock(&c->mu);
    atomic_store(&c->n_queued, 0);
    fail_list(c, &q, w2);
    for (rmq_msg *m = c->done.head, *n; m; m = n) {
        n = m->next;
        resolve(c, m);
        hub_free(m);
    }
    c->done = (msg_list){0};
    /* the rest is in batches still in the mailbox: resolved now, freed by done_cb */
    for (int i = 0; c->inflight && i < 100000000; i++)
        resolve(c, c->inflight);
}

static void conn_free(rmq_conn *c)
{
    if (!c)
        return;
    close(c->efd);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->fdmu);
    hub_free(c);
}

/* The loop's check of publishes that do not return: rabbitmq-c writes with no deadline, so a
 * broker that stops reading (SIGSTOP, a dead link) would hold the thread forever; its socket
 * is shut down, the publish fails, and the connection is remade. */
static void watch_conn(rmq_conn *c, long long now)
{
    long long since = atomic_load(&c->busy_since_ms);
    long long limit = c->set.heartbeat > 0 ? 2000LL * c->set.heartbeat : STALL_NO_HB_S * 1000LL;
    if (!since || now - since <= limit)
        return;
    pthread_mutex_lock(&c->fdmu);
    if (c->fd >= 0) {
        hub_log(HUB_LOG_WARN,
                "rabbitmq: %s: a publish has been blocked for %lld ms; dropping the "
                "connection",
                c->desc, now - since);
        shutdown(c->fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&c->fdmu);
}

static void watch_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    rmq_state *rs = w->data;
    long long now = mono_ms();
    (void)loop;
    (void)revents;
    for (rmq_conn *c = rs->conns; c; c = c->next)
        watch_conn(c, now);
    for (rmq_conn *c = rs->socks; c; c = c->next)
        watch_conn(c, now);
}

/* ---- the rabbitmq: socket ---- */

static pthread_mutex_t socks_lock = PTHREAD_MUTEX_INITIALIZER; /* rs->socks against stats */

static int sock_check(const char *uri, char *err, size_t errlen)
{
    tr_rmq_target t;
    return tr_rmq_uri_parse(uri, &t, err, errlen);
}

static void *sock_open(void *ud, const char *uri, char *err, size_t errlen)
{
    rmq_state *rs = ud;
    tr_rmq_target t;
    if (tr_rmq_uri_parse(uri, &t, err, errlen) < 0)
        return NULL;
    rmq_conn *c = conn_new(rs, &t, &rs->defaults, NULL, 1);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (atomic_load(&rs->started) && conn_start(c, err, errlen) < 0) {
        conn_free(c);
        return NULL;
    }
    pthread_mutex_lock(&socks_lock);
    c->next = rs->socks;
    rs->socks = c;
    pthread_mutex_unlock(&socks_lock);
    return c;
}

static void sock_send(void *ud, void *sock, tr_delivery *d)
{
    rmq_conn *c = sock;
    const tr_event *e = tr_delivery_event(d);
    char err[256];
    (void)ud;
    /* the JSON-RPC 2.0 notification: names need no escaping, params is JSON already */
    size_t nl = strlen(e->name), cap = 64 + nl + e->params_len;
    char *doc = hub_malloc(cap);
    if (!doc) {
        tr_delivery_done(d, -1, "out of memory");
        return;
    }
    int n =
        snprintf(doc, cap, "{\"jsonrpc\":\"2.0\",\"method\":\"%s\"%s%.*s}", e->name,
                 e->params ? ",\"params\":" : "", (int)e->params_len, e->params ? e->params : "");
    tr_rmq_opts o = {.mandatory = 1, .content_type = "application/json", .content_type_len = 16};
    rmq_msg *m = msg_new(c->t.exchange, strlen(c->t.exchange), c->t.routing_key,
                         strlen(c->t.routing_key), &o, doc, (size_t)n, err, sizeof(err));
    hub_free(doc);
    if (!m) {
        tr_delivery_done(d, -1, err);
        return;
    }
    m->kind = M_EVENT;
    m->d = d;
    inflight_add(c, m);
    if (conn_submit(c, m, err, sizeof(err)) < 0) {
        inflight_del(c, m);
        hub_free(m);
        tr_delivery_done(d, -1, err);
    }
}

static const char *sock_state(void *ud, void *sock)
{
    rmq_conn *c = sock;
    (void)ud;
    return cstate_names[atomic_load(&c->state)];
}

/* Loop thread: a closed socket's thread ended (or the module stopped it first). */
static void reap_cb(hub *h, void *arg)
{
    rmq_conn *c = arg;
    rmq_state *rs = c->rs;
    (void)h;
    conn_finish(c, "the socket was closed"); /* joins; what is left was resolved at close */
    for (rmq_conn **pp = &rs->dying; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    conn_free(c);
}

static void sock_close(void *ud, void *sock)
{
    rmq_state *rs = ud;
    rmq_conn *c = sock;
    pthread_mutex_lock(&socks_lock);
    for (rmq_conn **pp = &rs->socks; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&socks_lock);
    if (hub_stopping(rs->h) || !c->running) {
        conn_finish(c, hub_stopping(rs->h) ? "the hub stopped" : "the socket was closed");
        conn_free(c);
        return;
    }
    /* Unsubscribed while the hub runs: the thread may be inside a connect or a login for
     * seconds, which the loop does not wait for. Every delivery fails now (the thread's own
     * outcome, if it comes, is dropped); the thread's last post frees c (reap_cb). */
    for (int i = 0; c->inflight && i < 100000000; i++) {
        rmq_msg *m = c->inflight;
        m->resolved = 1;
        inflight_del(c, m);
        tr_delivery_done(m->d, -1, "the socket was closed (unsubscribed)");
    }
    pthread_mutex_lock(&c->mu);
    c->detached = 1;
    pthread_mutex_unlock(&c->mu);
    c->next = rs->dying;
    rs->dying = c;
    conn_quit(c);
}

static const tr_scheme rmq_scheme = {
    .name = "rabbitmq",
    .check = sock_check,
    .open = sock_open,
    .send = sock_send,
    .state = sock_state,
    .close = sock_close,
};

/* ---- script functions ---- */

static rmq_conn *find_server(rmq_state *rs, const char *id)
{
    for (rmq_conn *c = rs->conns; c; c = c->next) {
        if (!strcmp(c->id, id))
            return c;
    }
    return NULL;
}

/* Queue one message on c for a script or evhubctl. 0 or <0 with err set. */
static int publish(rmq_state *rs, rmq_conn *c, const char *ex, size_t exl, const char *rk,
                   size_t rkl, const tr_rmq_opts *o, const char *body, size_t bl, int kind,
                   uint64_t token, char *err, size_t errlen)
{
    if (atomic_load(&rs->draining)) {
        snprintf(err, errlen, "rabbitmq: the hub is stopping");
        return -ESHUTDOWN;
    }
    if (exl > TR_RMQ_SHORT_MAX || rkl > TR_RMQ_SHORT_MAX) {
        snprintf(err, errlen, "rabbitmq: the exchange and the routing key are at most 255 bytes");
        return -EINVAL;
    }
    rmq_msg *m = msg_new(ex, exl, rk, rkl, o, body, bl, err, errlen);
    if (!m)
        return -ENOMEM;
    m->kind = kind;
    m->token = token;
    int rc = conn_submit(c, m, err, errlen);
    if (rc < 0)
        hub_free(m);
    return rc;
}

/* rabbitmq.publish(id, exchange, routing_key, body[, opts][, report_fn]) */
static int fn_publish(void *state, hub_call *call)
{
    rmq_state *rs = state;
    size_t il, exl, rkl, bl;
    const char *id = hub_arg_str(call, 0, &il), *ex = hub_arg_str(call, 1, &exl),
               *rk = hub_arg_str(call, 2, &rkl), *body = hub_arg_str(call, 3, &bl);
    int n = call->argc;
    if (!id || !ex || !rk || !body || n > 5) {
        snprintf(call->err, sizeof(call->err),
                 "rabbitmq.publish(id, exchange, routing_key, body[, opts][, report_fn]): "
                 "strings expected");
        return -EINVAL;
    }
    if (strlen(id) != il || strlen(ex) != exl || strlen(rk) != rkl) {
        snprintf(call->err, sizeof(call->err),
                 "rabbitmq.publish: the id, exchange and routing key may not hold NUL bytes");
        return -EINVAL;
    }
    rmq_conn *c = find_server(rs, id);
    if (!c) {
        snprintf(call->err, sizeof(call->err), "rabbitmq: unknown server '%.64s'", id);
        return -ENOENT;
    }
    tr_rmq_opts o;
    int ot = hub_arg_type(call, 4);
    if (ot != HUB_ARG_NIL && ot != HUB_ARG_JSON) {
        snprintf(call->err, sizeof(call->err), "opts must be a table");
        return -EINVAL;
    }
    json_object *opts = ot == HUB_ARG_JSON ? call->argv[4].json : NULL;
    if (tr_rmq_opts_parse(opts, &o, call->err, sizeof(call->err)) < 0)
        return -EINVAL;
    return publish(rs, c, ex, exl, rk, rkl, &o, body, bl, call->token ? M_TOKEN : M_PLAIN,
                   call->token, call->err, sizeof(call->err));
}

/* KSR.rabbitmq.publish(exchange, routing_key, content_type, body): Kamailio's rabbitmq
 * module, on the kemi_server; persistent (delivery_mode 2) as Kamailio publishes. */
static int fn_ksr_publish(void *state, hub_call *call)
{
    rmq_state *rs = state;
    size_t exl, rkl, ctl, bl;
    const char *ex = hub_arg_str(call, 0, &exl), *rk = hub_arg_str(call, 1, &rkl),
               *ct = hub_arg_str(call, 2, &ctl), *body = hub_arg_str(call, 3, &bl);
    if (!ex || !rk || !ct || !body || call->argc != 4) {
        snprintf(call->err, sizeof(call->err),
                 "KSR.rabbitmq.publish(exchange, routing_key, content_type, body): strings "
                 "expected");
        return -EINVAL;
    }
    if (!rs->kemi) {
        snprintf(call->err, sizeof(call->err), "rabbitmq: no server is configured");
        return -ENOENT;
    }
    tr_rmq_opts o = {.persistent = 1};
    if (ctl > TR_RMQ_SHORT_MAX) {
        snprintf(call->err, sizeof(call->err), "rabbitmq: content_type is at most 255 bytes");
        return -EINVAL;
    }
    if (ctl) {
        o.content_type = ct;
        o.content_type_len = ctl;
    }
    int rc = publish(rs, rs->kemi, ex, exl, rk, rkl, &o, body, bl, M_PLAIN, 0, call->err,
                     sizeof(call->err));
    return rc < 0 ? rc : 1;
}

static const hub_script_fn rmq_fns[] = {
    {"rabbitmq", "publish", HUB_FN_REPORT, fn_publish},
    {"KSR.rabbitmq", "publish", HUB_FN_KEMI, fn_ksr_publish},
    {NULL, NULL, 0, NULL},
};

/* ---- evhubctl rabbitmq status | send ID EXCHANGE KEY BODY ---- */

static const hub_ctl_param ctl_params[] = {
    {"action", HUB_CTL_STRING, 1, "status, or send"},
    {"id", HUB_CTL_STRING, 0, "send: the server's id"},
    {"exchange", HUB_CTL_STRING, 0, "send: the exchange (\"\" the default exchange)"},
    {"key", HUB_CTL_STRING, 0, "send: the routing key"},
    {"body", HUB_CTL_STRING, 0, "send: the message"},
};

static const hub_ctl_spec ctl_spec = {
    "rabbitmq", "RabbitMQ servers and sockets: status, or send a message",
    "rabbitmq status: each server and rabbitmq: socket with its URL (no password), state, "
    "messages queued and unconfirmed, confirmed, failed, reconnects and the last error. "
    "rabbitmq send ID EXCHANGE KEY BODY publishes one message and answers once the broker "
    "confirmed it (or with the reason it failed).",
    ctl_params, 5};

static json_object *conn_json(rmq_conn *c)
{
    json_object *o = json_object_new_object();
    char url[TR_SOCKET_URI_MAX], err[sizeof(c->last_error)];
    tr_rmq_target_desc(&c->t, url, sizeof(url));
    pthread_mutex_lock(&c->mu);
    memcpy(err, c->last_error, sizeof(err));
    pthread_mutex_unlock(&c->mu);
    json_object_object_add(o, c->is_sock ? "socket" : "id",
                           json_object_new_string(c->is_sock ? c->desc : c->id));
    json_object_object_add(o, "url", json_object_new_string(url));
    json_object_object_add(o, "state",
                           json_object_new_string(cstate_names[atomic_load(&c->state)]));
    json_object_object_add(o, "queued", json_object_new_uint64(atomic_load(&c->n_queued)));
    json_object_object_add(o, "unconfirmed",
                           json_object_new_uint64(atomic_load(&c->n_unconfirmed)));
    json_object_object_add(o, "confirmed", json_object_new_uint64(atomic_load(&c->confirmed)));
    json_object_object_add(o, "failed", json_object_new_uint64(atomic_load(&c->failed)));
    json_object_object_add(o, "reconnects", json_object_new_uint64(atomic_load(&c->reconnects)));
    json_object_object_add(o, "last_error", json_object_new_string(err));
    return o;
}

static const char *param_str(json_object *params, const char *name)
{
    json_object *v = NULL;
    return json_object_object_get_ex(params, name, &v) ? json_object_get_string(v) : NULL;
}

static void cmd_rabbitmq(hub_ctl_call *call, json_object *params, void *ud)
{
    rmq_state *rs = ud;
    const char *action = param_str(params, "action");
    if (!strcmp(action, "status")) {
        json_object *r = json_object_new_object(), *sv = json_object_new_array(),
                    *so = json_object_new_array();
        for (rmq_conn *c = rs->conns; c; c = c->next)
            json_object_array_add(sv, conn_json(c));
        for (rmq_conn *c = rs->socks; c; c = c->next)
            json_object_array_add(so, conn_json(c));
        json_object_object_add(r, "servers", sv);
        json_object_object_add(r, "sockets", so);
        hub_ctl_reply(call, r);
        return;
    }
    if (strcmp(action, "send") != 0) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                     "rabbitmq: unknown action '%.32s' (status, send)", action);
        return;
    }
    const char *id = param_str(params, "id"), *ex = param_str(params, "exchange"),
               *key = param_str(params, "key"), *body = param_str(params, "body");
    if (!id || !ex || !key || !body) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "usage: rabbitmq send ID EXCHANGE KEY BODY");
        return;
    }
    rmq_conn *c = find_server(rs, id);
    if (!c) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "rabbitmq: unknown server '%.64s'", id);
        return;
    }
    char err[256];
    if (atomic_load(&rs->draining)) {
        hub_ctl_fail(call, HUB_CTL_STOPPING, "rabbitmq: the hub is stopping");
        return;
    }
    rmq_msg *m =
        msg_new(ex, strlen(ex), key, strlen(key), NULL, body, strlen(body), err, sizeof(err));
    if (!m || strlen(ex) > TR_RMQ_SHORT_MAX || strlen(key) > TR_RMQ_SHORT_MAX) {
        hub_free(m);
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "%s",
                     m ? "the exchange and the key are at most 255 bytes" : err);
        return;
    }
    m->kind = M_CTL;
    m->call = call;
    inflight_add(c, m);
    if (conn_submit(c, m, err, sizeof(err)) < 0) {
        inflight_del(c, m);
        hub_free(m);
        hub_ctl_fail(call, HUB_CTL_FAILED, "%s", err);
    }
}

/* ---- counters ---- */

static size_t conn_stats(rmq_conn *c, hub_stat *out, size_t n, size_t cap)
{
    static const struct {
        const char *name, *help;
        int gauge;
    } per[] = {
        {"rabbitmq_published", "messages handed to this connection", 0},
        {"rabbitmq_confirmed", "messages the broker confirmed (written, without confirms)", 0},
        {"rabbitmq_failed", "messages that failed (queue full excluded: refused at once)", 0},
        {"rabbitmq_resent", "messages published again after a connection was lost", 0},
        {"rabbitmq_reconnects", "failed connection attempts and lost connections", 0},
        {"rabbitmq_queued", "messages waiting to be published", 1},
        {"rabbitmq_unconfirmed", "messages published and not yet confirmed", 1},
        {"rabbitmq_connected", "1 while the connection is up", 1},
    };
    uint64_t v[8] = {atomic_load(&c->published),     atomic_load(&c->confirmed),
                     atomic_load(&c->failed),        atomic_load(&c->resent),
                     atomic_load(&c->reconnects),    atomic_load(&c->n_queued),
                     atomic_load(&c->n_unconfirmed), atomic_load(&c->state) == C_UP};
    for (size_t i = 0; i < 8; i++, n++) {
        if (n >= cap)
            continue;
        out[n] = (hub_stat){.name = per[i].name,
                            .help = per[i].help,
                            .gauge = per[i].gauge,
                            .worker = -1,
                            .value = v[i]};
        size_t o = 0, lc = sizeof(out[n].label);
        const char *val = c->is_sock ? c->desc : c->id;
        o += (size_t)snprintf(out[n].label, lc, "%s=\"", c->is_sock ? "socket" : "server");
        for (const char *p = val; *p && o + 4 < lc; p++) {
            if (*p == '"' || *p == '\\')
                out[n].label[o++] = '\\';
            out[n].label[o++] = *p;
        }
        out[n].label[o++] = '"';
        out[n].label[o] = '\0';
    }
    return n;
}

static size_t rmq_stats(void *state, hub_stat *out, size_t cap)
{
    rmq_state *rs = state;
    size_t n = 0;
    for (rmq_conn *c = rs->conns; c; c = c->next)
        n = conn_stats(c, out, n, cap);
    pthread_mutex_lock(&socks_lock);
    for (rmq_conn *c = rs->socks; c; c = c->next)
        n = conn_stats(c, out, n, cap);
    pthread_mutex_unlock(&socks_lock);
    return n;
}

/* ---- the module ---- */

/* v unless it is "inherit" (-1), else def. */
static int pick(long v, long def) { return v >= 0 ? (int)v : (int)def; }

static int pick_confirms(int v, int def) { return v == 0 ? def : (v - 1) % 2; }

static int settings_check(const rmq_settings *s, const hub_conf_instance *in, char *err,
                          size_t errlen)
{
    const char *why = NULL;
    if (s->connect_timeout < 1)
        why = "connect_timeout must be 1..600000 ms";
    else if (s->queue_size < 1)
        why = "queue_size must be at least 1";
    else if (s->frame_max < 4096)
        why = "frame_max must be 4096..2147483647";
    if (why) {
        snprintf(err, errlen, "%s:%d: [rabbitmq%s%s] %s", in->file, in->line,
                 in->name[0] ? ":" : "", in->name, why);
        return -EINVAL;
    }
    return 0;
}

static int add_server(rmq_state *rs, const char *id, const char *url, const rmq_settings *set,
                      const char *file, int line, char *err, size_t errlen)
{
    tr_rmq_target t;
    char why[192];
    if (tr_rmq_id_check(id, strlen(id)) < 0) {
        snprintf(err, errlen,
                 "%s:%d: rabbitmq: bad server id '%.40s' (1..32 of letters, digits, "
                 "'_' and '-')",
                 file, line, id);
        return -EINVAL;
    }
    if (find_server(rs, id)) {
        snprintf(err, errlen, "%s:%d: rabbitmq: server '%s' is defined twice", file, line, id);
        return -EINVAL;
    }
    if (tr_rmq_url_parse(url, &t, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "%s:%d: rabbitmq: server '%s': %s", file, line, id, why);
        return -EINVAL;
    }
    rmq_conn *c = conn_new(rs, &t, set, id, 0);
    if (!c) {
        snprintf(err, errlen, "rabbitmq: out of memory");
        return -ENOMEM;
    }
    rmq_conn **pp = &rs->conns;
    while (*pp)
        pp = &(*pp)->next;
    *pp = c;
    return 0;
}

/* [rabbitmq] server = [ID]URL lines. */
static int server_lines(rmq_state *rs, const hub_conf_instance *in, char *err, size_t errlen)
{
    const rmq_conf *g = in->data;
    for (size_t i = 0; i < g->server.n; i++) {
        const hub_conf_item *it = &g->server.items[i];
        const char *v = it->value, *close = v[0] == '[' ? strchr(v, ']') : NULL;
        char id[TR_RMQ_ID_MAX + 2];
        if (!close || (size_t)(close - v - 1) > TR_RMQ_ID_MAX) {
            snprintf(err, errlen,
                     "%s:%d: rabbitmq: server: expected [ID]amqp://USER:PASS@HOST:PORT/VHOST",
                     in->file, it->line);
            return -EINVAL;
        }
        memcpy(id, v + 1, (size_t)(close - v - 1));
        id[close - v - 1] = '\0';
        if (add_server(rs, id, close + 1, &rs->defaults, in->file, it->line, err, errlen) < 0)
            return -EINVAL;
    }
    return 0;
}

static int read_config(rmq_state *rs, char *err, size_t errlen)
{
    const hub_config *cfg = hub_get_config(rs->h);
    const hub_conf_instance *global = NULL;
    rs->defaults =
        (rmq_settings){DEF_HEARTBEAT, DEF_CONNECT_TIMEOUT, 1, DEF_QUEUE_SIZE, DEF_FRAME_MAX};
    for (const hub_conf_instance *in = hub_conf_next(cfg, "rabbitmq", NULL); in;
         in = hub_conf_next(cfg, "rabbitmq", in)) {
        if (in->name[0])
            continue;
        const rmq_conf *g = in->data;
        global = in;
        rs->defaults.heartbeat = pick(g->heartbeat, DEF_HEARTBEAT);
        rs->defaults.connect_timeout = pick(g->connect_timeout, DEF_CONNECT_TIMEOUT);
        rs->defaults.confirms = pick_confirms(g->confirms, 1);
        rs->defaults.queue_size = pick(g->queue_size, DEF_QUEUE_SIZE);
        rs->defaults.frame_max = pick(g->frame_max, DEF_FRAME_MAX);
        if (settings_check(&rs->defaults, in, err, errlen) < 0)
            return -EINVAL;
        if (g->url[0]) {
            snprintf(err, errlen,
                     "%s:%d: [rabbitmq] has server = [ID]URL lines; url belongs in "
                     "a [rabbitmq:ID] section",
                     in->file, in->line);
            return -EINVAL;
        }
        if (server_lines(rs, in, err, errlen) < 0)
            return -EINVAL;
    }
    for (const hub_conf_instance *in = hub_conf_next(cfg, "rabbitmq", NULL); in;
         in = hub_conf_next(cfg, "rabbitmq", in)) {
        if (!in->name[0])
            continue;
        const rmq_conf *s = in->data;
        if (s->server.n || s->kemi_server[0]) {
            snprintf(err, errlen, "%s:%d: [rabbitmq:%s] takes url = URL, not %s", in->file,
                     in->line, in->name, s->server.n ? "server lines" : "kemi_server");
            return -EINVAL;
        }
        if (!s->url[0]) {
            snprintf(err, errlen,
                     "%s:%d: [rabbitmq:%s] needs url = amqp://USER:PASS@HOST:PORT/VHOST", in->file,
                     in->line, in->name);
            return -EINVAL;
        }
        rmq_settings set = {pick(s->heartbeat, rs->defaults.heartbeat),
                            pick(s->connect_timeout, rs->defaults.connect_timeout),
                            pick_confirms(s->confirms, rs->defaults.confirms),
                            pick(s->queue_size, rs->defaults.queue_size),
                            pick(s->frame_max, rs->defaults.frame_max)};
        if (settings_check(&set, in, err, errlen) < 0 ||
            add_server(rs, in->name, s->url, &set, in->file, in->line, err, errlen) < 0)
            return -EINVAL;
    }
    rs->kemi = rs->conns;
    if (global && ((const rmq_conf *)global->data)->kemi_server[0]) {
        const char *k = ((const rmq_conf *)global->data)->kemi_server;
        if (!(rs->kemi = find_server(rs, k))) {
            snprintf(err, errlen, "%s:%d: [rabbitmq] kemi_server: no server '%s'", global->file,
                     global->line, k);
            return -EINVAL;
        }
    }
    return 0;
}

static void rmq_free(void *state)
{
    rmq_state *rs = state;
    if (!rs)
        return;
    if (!rs->stopped) {
        tr_events_remove_scheme(rs->h, "rabbitmq");
        for (rmq_conn *c = rs->conns; c; c = c->next)
            conn_finish(c, "the hub stopped");
    }
    if (rs->loop && ev_is_active(&rs->watch)) {
        ev_ref(rs->loop); /* start unref'd it */
        ev_timer_stop(rs->loop, &rs->watch);
    }
    for (rmq_conn *c = rs->conns, *n; c; c = n) {
        n = c->next;
        conn_free(c);
    }
    for (rmq_conn *c = rs->dying, *n; c; c = n) { /* reap_cb ran before, unless no loop did */
        n = c->next;
        conn_finish(c, "the socket was closed");
        conn_free(c);
    }
    hub_free(rs);
}

static int rmq_init(hub *h, void **state, char *err, size_t errlen)
{
    rmq_state *rs = hub_calloc(1, sizeof(*rs));
    if (!rs) {
        snprintf(err, errlen, "rabbitmq: out of memory");
        return -ENOMEM;
    }
    *state = rs;
    rs->h = h;
    rs->loop = hub_loop(h);
    ev_timer_init(&rs->watch, watch_cb, WATCH_S, WATCH_S);
    rs->watch.data = rs;
    if (read_config(rs, err, errlen) < 0)
        return -EINVAL;
    int rc = hub_ctl_register(hub_get_ctl(h), &ctl_spec, cmd_rabbitmq, rs);
    if (rc < 0) {
        snprintf(err, errlen, "rabbitmq: cannot register its command: %s", strerror(-rc));
        return rc;
    }
    return tr_events_add_scheme(h, "rabbitmq", &rmq_scheme, rs, err, errlen);
}

static int rmq_start(void *state, char *err, size_t errlen)
{
    rmq_state *rs = state;
    atomic_store(&rs->started, 1);
    for (rmq_conn *c = rs->conns; c; c = c->next) {
        if (conn_start(c, err, errlen) < 0)
            return -EAGAIN;
    }
    for (rmq_conn *c = rs->socks; c; c = c->next) {
        if (!c->running && conn_start(c, err, errlen) < 0)
            return -EAGAIN;
    }
    ev_timer_start(rs->loop, &rs->watch);
    ev_unref(rs->loop); /* the check alone does not keep the loop running */
    return 0;
}

static size_t rmq_drain(void *state)
{
    rmq_state *rs = state;
    size_t n = 0;
    atomic_store(&rs->draining, 1);
    for (rmq_conn *c = rs->conns; c; c = c->next)
        n += atomic_load(&c->held);
    for (rmq_conn *c = rs->socks; c; c = c->next)
        n += atomic_load(&c->held);
    return n;
}

static void rmq_stop(void *state)
{
    rmq_state *rs = state;
    atomic_store(&rs->draining, 1);
    /* every thread told first, so that they wind down together */
    for (rmq_conn *c = rs->conns; c; c = c->next)
        conn_quit(c);
    for (rmq_conn *c = rs->socks; c; c = c->next)
        conn_quit(c);
    tr_events_remove_scheme(rs->h, "rabbitmq"); /* closes the sockets: sock_close */
    for (rmq_conn *c = rs->dying; c; c = c->next)
        conn_finish(c, "the socket was closed"); /* joined; reap_cb (in the mailbox) frees */
    for (rmq_conn *c = rs->conns; c; c = c->next)
        conn_finish(c, "the hub stopped");
    if (ev_is_active(&rs->watch)) {
        ev_ref(rs->loop);
        ev_timer_stop(rs->loop, &rs->watch);
    }
    rs->stopped = 1;
}

const hub_module rabbitmq_module = {
    .name = "rabbitmq",
    .sections = rmq_sections,
    .init = rmq_init,
    .start = rmq_start,
    .drain = rmq_drain,
    .stop = rmq_stop,
    .free = rmq_free,
    .stats = rmq_stats,
    .fns = rmq_fns,
};
