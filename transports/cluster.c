/* The cluster module: several evhub nodes act as one hub over NATS (libnats 3.4).
 *
 * Subjects (PREFIX is [cluster] prefix, "evhub" by default):
 *   PREFIX.relay          every node subscribes: relays
 *   PREFIX.t.TAG          a node subscribes while it has local members of TAG: multicasts
 *   PREFIX.u.TAG          the same, in queue group PREFIX.u: unicasts when the rotation
 *                         cannot pick a node, and those rerouted (one node each)
 *   PREFIX.n.NID          node NID's own: unicasts the rotation sent it, send / set_tag /
 *                         close by connection id
 *   PREFIX.hb             heartbeats (JSON): who is there, its clients, tags and counters
 * A tag of other bytes than letters, digits, '_' and '-' goes as '=' and its hex.
 *
 * Connection ids are cluster-unique: node NID (1..2^19-1, from [cluster] node_id or a hash of
 * the node's name) numbers its connections NID << 44 + 1, + 2, ... (hub_set_id_base), so the
 * node holding an id is id >> 44.
 *
 * Every message but a heartbeat carries an envelope (cl_env): the origin's NID and a sequence
 * number of its own, so that a node ignores its own messages (NATS echoes them to its
 * subscriptions) and hands what one read brought in the order each origin published it
 * (libnats queues messages per subscription, and a read may fill several).
 *
 * NATS I/O runs on the hub's loop: natsOptions_SetEventLoop with the libev adapter below,
 * SendAsap (no flusher thread) and synchronous subscriptions drained on the loop after each
 * read, so no message is handed between threads. libnats' own threads (timers, reconnects)
 * only call the adapter, which hands their wishes to the loop through an ev_async. */
#define _GNU_SOURCE /* strcasestr */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>
#include <json-c/json.h>
#include <nats/nats.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/core.h"
#include "hub/log.h"

#define CL_NID_BITS  19
#define CL_ID_SHIFT  44
#define CL_NID_MAX   ((1u << CL_NID_BITS) - 1)
#define CL_HB_TAGS   1000 /* tags listed in a heartbeat; past it "tags_more" is set */
#define CL_ENV_MAGIC 0xE1
/* magic, kind, aux length (2), origin (4), seq (8), id (8), stream seq (8) */
#define CL_ENV_HEAD 32
#define CL_STREAMS  4096 /* buckets of the stream tables */
#define CL_SOON     0.02 /* s: a heartbeat after a tag came or went, to tell the others */

/* ---- config ---- */

static const char *const unicast_modes[] = {"local_first", "cluster", NULL};
enum { CL_UNICAST_LOCAL_FIRST, CL_UNICAST_CLUSTER };

typedef struct cluster_conf {
    char nats[512];
    char node[128];
    int node_id;
    char prefix[64];
    int unicast;
    int heartbeat;
    int node_timeout;
    size_t reconnect_buffer;
    int reconnect_wait;
    size_t max_pending;
    int max_pending_msgs;
    int connect_timeout;
    char token[256];
    char user[128];
    char password[128];
    char creds[HUB_PATH_MAX];
    char nkey[128];
    char nkey_seed[HUB_PATH_MAX];
    int script;
    int tls;
    char tls_ca[HUB_PATH_MAX];
    char tls_cert[HUB_PATH_MAX];
    char tls_key[HUB_PATH_MAX];
} cluster_conf;

static const hub_conf_row cluster_rows[] = {
    HUB_CONF_ROW(cluster_conf, "nats", HUB_CONF_STRING, nats, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "node", HUB_CONF_STRING, node, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "node_id", HUB_CONF_INT, node_id, 0, CL_NID_MAX, NULL, "0"),
    HUB_CONF_ROW(cluster_conf, "prefix", HUB_CONF_STRING, prefix, 0, 0, NULL, "evhub"),
    HUB_CONF_ROW(cluster_conf, "unicast", HUB_CONF_ENUM, unicast, 0, 0, unicast_modes,
                 "local_first"),
    HUB_CONF_ROW(cluster_conf, "heartbeat", HUB_CONF_INT, heartbeat, 50, 60000, NULL, "1000"),
    HUB_CONF_ROW(cluster_conf, "node_timeout", HUB_CONF_INT, node_timeout, 100, 600000, NULL,
                 "3000"),
    HUB_CONF_ROW(cluster_conf, "reconnect_buffer", HUB_CONF_SIZE, reconnect_buffer, 0,
                 1024LL * 1024 * 1024, NULL, "8m"),
    HUB_CONF_ROW(cluster_conf, "reconnect_wait", HUB_CONF_INT, reconnect_wait, 10, 600000, NULL,
                 "500"),
    HUB_CONF_ROW(cluster_conf, "max_pending", HUB_CONF_SIZE, max_pending, 65536,
                 4LL * 1024 * 1024 * 1024, NULL, "64m"),
    HUB_CONF_ROW(cluster_conf, "max_pending_msgs", HUB_CONF_INT, max_pending_msgs, 16, 100000000,
                 NULL, "65536"),
    HUB_CONF_ROW(cluster_conf, "connect_timeout", HUB_CONF_INT, connect_timeout, 10, 60000, NULL,
                 "2000"),
    HUB_CONF_ROW(cluster_conf, "token", HUB_CONF_STRING, token, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "user", HUB_CONF_STRING, user, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "password", HUB_CONF_STRING, password, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "creds", HUB_CONF_PATH, creds, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "nkey", HUB_CONF_STRING, nkey, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "nkey_seed", HUB_CONF_PATH, nkey_seed, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "script", HUB_CONF_BOOL, script, 0, 0, NULL, "no"),
    HUB_CONF_ROW(cluster_conf, "tls", HUB_CONF_BOOL, tls, 0, 0, NULL, "no"),
    HUB_CONF_ROW(cluster_conf, "tls_ca", HUB_CONF_PATH, tls_ca, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "tls_cert", HUB_CONF_PATH, tls_cert, 0, 0, NULL, NULL),
    HUB_CONF_ROW(cluster_conf, "tls_key", HUB_CONF_PATH, tls_key, 0, 0, NULL, NULL),
    {NULL, 0, 0, 0, 0, 0, NULL, NULL},
};

static const hub_conf_section cluster_sections[] = {
    {"cluster", 0, sizeof(cluster_conf), cluster_rows},
    {NULL, 0, 0, NULL},
};

/* ---- state ---- */

enum { K_RELAY, K_MULTICAST, K_UNICAST, K_DIRECT, K_NKINDS };
static const char *const kind_names[K_NKINDS] = {"relay", "multicast", "unicast", "direct"};
/* envelope kinds */
enum {
    E_RELAY = 'R',
    E_MULTICAST = 'M',
    E_UNICAST = 'U',    /* through the queue group */
    E_UNICAST_TO = 'u', /* to the node the rotation picked */
    E_SEND = 'S',
    E_TAG = 'T',
    E_CLOSE = 'C'
};

typedef struct cl_ev cl_ev;
typedef struct cluster cluster;

/* A stream: what one origin publishes on one subject (its relays, its multicasts to one tag,
 * its messages to one node), numbered 1, 2, ... so that a receiver sees what it missed. The
 * publisher keeps the last number it gave (key origin 0), a receiver the last it took. */
typedef struct cl_stream {
    struct cl_stream *next;
    uint64_t seq;
    uint32_t origin;
    char kind;
    uint8_t len;
    char tag[HUB_TAG_MAX];
} cl_stream;

/* A tag with local members: its two subscriptions. */
typedef struct cl_tag {
    struct cl_tag *next;
    natsSubscription *msub, *usub;
    size_t len;
    char name[HUB_TAG_MAX + 1];
} cl_tag;

/* A tag another node lists, with its members there. */
typedef struct cl_ntag {
    char *name;
    uint32_t members;
} cl_ntag;

/* Another node, as its heartbeats describe it (under cluster.mu: reach() reads it from any
 * thread). */
typedef struct cl_node {
    struct cl_node *next;
    uint32_t nid;
    char name[128];
    ev_tstamp last_seen;
    int64_t clients;
    cl_ntag *tags; /* sorted by name */
    size_t ntags;
    int tags_more;
    uint64_t in_from;                   /* messages we took from it */
    int64_t its_out, its_in, its_drops; /* as it reports them */
} cl_node;

/* The libev adapter of one connection (see the file comment). */
struct cl_ev {
    cluster *cl;
    ev_io rio, wio;
    ev_async wake;
    pthread_mutex_t mu; /* guards the wishes below, set from any thread */
    int fd, fd_changed, want_read, want_write, detached;
    natsConnection *nc;
};

/* The unicast rotation over the nodes holding one tag (smooth weighted round robin, as
 * nginx's upstreams): a node's weight is its members of the tag, cw its current weight. */
typedef struct cl_rr_slot {
    uint32_t nid, weight;
    int64_t cw;
} cl_rr_slot;

typedef struct cl_rr {
    struct cl_rr *next;
    ev_tstamp used;
    cl_rr_slot *slots;
    size_t n, cap;
    uint8_t len;
    char tag[HUB_TAG_MAX];
} cl_rr;

/* One message drained from a subscription, for the ordering sort. */
typedef struct cl_in {
    natsMsg *m;
    uint32_t origin;
    uint64_t seq;
} cl_in;

struct cluster {
    hub *h;
    struct ev_loop *loop;
    cluster_conf conf;
    int enabled;
    uint32_t nid;
    char subj_relay[96], subj_hb[96], subj_direct[96], queue[96];
    natsOptions *opts;
    natsConnection *nc;
    cl_ev *ev;
    natsSubscription *relay_sub, *direct_sub, *hb_sub;
    cl_tag *tags;
    size_t ntags;
    uint64_t seq;
    char *buf; /* an envelope being built */
    size_t bufcap;
    cl_in *inv;
    size_t incap;
    ev_timer hb_w, soon_w;
    int stopping, said_bye;
    int draining; /* drain_subs is handing messages out */
    int ipayload_warned;
    pthread_mutex_t mu; /* guards nodes */
    cl_node *nodes;
    int id_conflict_logged;
    cl_stream **sent, **seen; /* CL_STREAMS buckets each */
    cl_rr **rr;               /* CL_STREAMS buckets: the unicast rotations (loop thread) */
    size_t nrr;
    /* counters: written on the loop (or by libnats' threads, for the connection's), read
     * anywhere */
    _Atomic uint64_t out[K_NKINDS], in[K_NKINDS], bytes_out, bytes_in;
    _Atomic uint64_t publish_failed, unicast_lost, unicast_rerouted, direct_unknown, bad_messages,
        slow_dropped;
    _Atomic uint64_t gaps, to_script, script_dropped;
    _Atomic uint64_t reconnects, disconnects, id_conflicts, heartbeats_in;
    _Atomic int connected, nnodes;
    uint64_t dropped_gone; /* slow-consumer drops of subscriptions since removed */
};

#define BUMP(v, n) atomic_fetch_add_explicit(&(v), (uint64_t)(n), memory_order_relaxed)
#define GET(v)     atomic_load_explicit(&(v), memory_order_relaxed)

/* ---- the libev adapter ---- */

/* Loop thread: make the watchers what libnats last asked for. */
static void ev_apply(cl_ev *a)
{
    pthread_mutex_lock(&a->mu);
    int fd = a->fd, changed = a->fd_changed, rd = a->want_read, wr = a->want_write,
        gone = a->detached;
    a->fd_changed = 0;
    pthread_mutex_unlock(&a->mu);
    struct ev_loop *loop = a->cl->loop;
    if (changed || gone) {
        ev_io_stop(loop, &a->rio);
        ev_io_stop(loop, &a->wio);
    }
    if (gone || fd < 0)
        return;
    if (changed) {
        ev_io_set(&a->rio, fd, EV_READ);
        ev_io_set(&a->wio, fd, EV_WRITE);
    }
    if (rd)
        ev_io_start(loop, &a->rio);
    else
        ev_io_stop(loop, &a->rio);
    if (wr)
        ev_io_start(loop, &a->wio);
    else
        ev_io_stop(loop, &a->wio);
}

/* Any thread (libnats holds the connection's lock): apply now on the loop, else wake it. */
static void ev_kick(cl_ev *a)
{
    if (hub_on_loop(a->cl->h))
        ev_apply(a);
    else
        ev_async_send(a->cl->loop, &a->wake);
}

static natsStatus ev_attach(void **user, void *loop, natsConnection *nc, natsSock fd)
{
    cl_ev *a = loop;
    pthread_mutex_lock(&a->mu);
    a->fd = fd;
    a->fd_changed = 1;
    a->want_read = 1;
    a->want_write = 0;
    a->detached = 0;
    a->nc = nc;
    pthread_mutex_unlock(&a->mu);
    *user = a;
    ev_kick(a);
    return NATS_OK;
}

static natsStatus ev_read(void *user, bool add)
{
    cl_ev *a = user;
    pthread_mutex_lock(&a->mu);
    a->want_read = add;
    pthread_mutex_unlock(&a->mu);
    ev_kick(a);
    return NATS_OK;
}

static natsStatus ev_write(void *user, bool add)
{
    cl_ev *a = user;
    pthread_mutex_lock(&a->mu);
    a->want_write = add;
    pthread_mutex_unlock(&a->mu);
    ev_kick(a);
    return NATS_OK;
}

static natsStatus ev_detach(void *user)
{
    cl_ev *a = user;
    pthread_mutex_lock(&a->mu);
    a->detached = 1;
    pthread_mutex_unlock(&a->mu);
    ev_kick(a);
    return NATS_OK;
}

static void ev_wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop;
    (void)revents;
    ev_apply(w->data);
}

static void drain_subs(cluster *cl);

static void ev_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    cl_ev *a = w->data;
    if (revents & EV_ERROR) { /* libnats closed the socket from one of its threads */
        ev_io_stop(loop, w);
        return;
    }
    if (a->nc)
        natsConnection_ProcessReadEvent(a->nc);
    drain_subs(a->cl);
}

static void ev_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    cl_ev *a = w->data;
    if (revents & EV_ERROR) {
        ev_io_stop(loop, w);
        return;
    }
    if (a->nc)
        natsConnection_ProcessWriteEvent(a->nc);
}

static cl_ev *ev_adapter_new(cluster *cl)
{
    cl_ev *a = hub_calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->cl = cl;
    a->fd = -1;
    pthread_mutex_init(&a->mu, NULL);
    ev_io_init(&a->rio, ev_read_cb, -1, EV_READ);
    ev_io_init(&a->wio, ev_write_cb, -1, EV_WRITE);
    a->rio.data = a->wio.data = a;
    ev_async_init(&a->wake, ev_wake_cb);
    a->wake.data = a;
    ev_async_start(cl->loop, &a->wake);
    ev_unref(cl->loop); /* the wake-up alone keeps no loop running */
    return a;
}

static void ev_adapter_free(cluster *cl, cl_ev *a)
{
    if (!a)
        return;
    ev_io_stop(cl->loop, &a->rio);
    ev_io_stop(cl->loop, &a->wio);
    ev_ref(cl->loop);
    ev_async_stop(cl->loop, &a->wake);
    pthread_mutex_destroy(&a->mu);
    hub_free(a);
}

/* ---- names: subjects, node ids ---- */

static int tag_plain(const char *tag, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = tag[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* PREFIX.KIND.TAG (or PREFIX.KIND.=HEX) into out (room for prefix + 3 + 2 * HUB_TAG_MAX + 2) */
static void tag_subject(const cluster *cl, char kind, const char *tag, size_t len, char *out,
                        size_t cap)
{
    int n = snprintf(out, cap, "%s.%c.", cl->conf.prefix, kind);
    if (n < 0 || (size_t)n >= cap)
        return;
    size_t o = (size_t)n;
    if (tag_plain(tag, len)) {
        if (o + len < cap) {
            memcpy(out + o, tag, len);
            out[o + len] = '\0';
        }
        return;
    }
    static const char hex[] = "0123456789abcdef";
    if (o + 1 + 2 * len >= cap)
        return;
    out[o++] = '=';
    for (size_t i = 0; i < len; i++) {
        out[o++] = hex[(unsigned char)tag[i] >> 4];
        out[o++] = hex[(unsigned char)tag[i] & 15];
    }
    out[o] = '\0';
}

#define SUBJ_MAX (64 + 4 + 2 * HUB_TAG_MAX + 2)

/* A node's number from its name: FNV-1a folded into 1..CL_NID_MAX. */
static uint32_t nid_of_name(const char *name)
{
    uint32_t hsh = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        hsh = (hsh ^ *p) * 16777619u;
    return hsh % CL_NID_MAX + 1;
}

/* subject tokens: letters, digits, '_', '-' */
static int prefix_valid(const char *p)
{
    if (!*p)
        return 0;
    for (const char *t = p; *t; t++) {
        if (*t == '.' && (t == p || t[1] == '.' || t[1] == '\0'))
            return 0;
        if (*t != '.' && !tag_plain(t, 1))
            return 0;
    }
    return 1;
}

/* ---- nodes ---- */

static cl_node *node_find(cluster *cl, uint32_t nid)
{
    for (cl_node *n = cl->nodes; n; n = n->next)
        if (n->nid == nid)
            return n;
    return NULL;
}

static void node_tags_free(cl_node *n)
{
    for (size_t i = 0; i < n->ntags; i++)
        hub_free(n->tags[i].name);
    hub_free(n->tags);
    n->tags = NULL;
    n->ntags = 0;
}

static int cmp_ntag(const void *a, const void *b)
{
    return strcmp(((const cl_ntag *)a)->name, ((const cl_ntag *)b)->name);
}

/* Under mu: the members of tag node n listed (0: not listed). */
static uint32_t node_tag_members(const cl_node *n, const char *tag, size_t len)
{
    char key[HUB_TAG_MAX + 1];
    if (len > HUB_TAG_MAX)
        return 0;
    memcpy(key, tag, len);
    key[len] = '\0';
    cl_ntag k = {key, 0};
    const cl_ntag *t = n->ntags ? bsearch(&k, n->tags, n->ntags, sizeof(k), cmp_ntag) : NULL;
    return t ? t->members : 0;
}

/* Under mu: 1 when node n may have members of tag. */
static int node_has_tag(const cl_node *n, const char *tag, size_t len)
{
    return n->tags_more || node_tag_members(n, tag, len) > 0;
}

/* Any thread: remote nodes a relay (tag NULL) or multicast reaches, as far as we know. */
static int cl_reach(void *ud, const char *tag, size_t taglen)
{
    cluster *cl = ud;
    int n = 0;
    pthread_mutex_lock(&cl->mu);
    for (cl_node *nd = cl->nodes; nd; nd = nd->next)
        if (!tag || node_has_tag(nd, tag, taglen))
            n++;
    pthread_mutex_unlock(&cl->mu);
    return n;
}

/* ---- streams ---- */

static size_t stream_bucket(uint32_t origin, char kind, const char *tag, size_t len)
{
    uint32_t hsh = 2166136261u ^ origin;
    hsh = (hsh ^ (unsigned char)kind) * 16777619u;
    for (size_t i = 0; i < len; i++)
        hsh = (hsh ^ (unsigned char)tag[i]) * 16777619u;
    return hsh % CL_STREAMS;
}

/* The stream's record in table t, made (seq 0) when create is set; NULL if none / no memory. */
static cl_stream *stream_get(cl_stream **t, uint32_t origin, char kind, const char *tag, size_t len,
                             int create)
{
    if (!t || len > sizeof(((cl_stream *)0)->tag))
        return NULL;
    cl_stream **b = &t[stream_bucket(origin, kind, tag, len)];
    for (cl_stream *x = *b; x; x = x->next)
        if (x->origin == origin && x->kind == kind && x->len == len &&
            (!len || memcmp(x->tag, tag, len) == 0))
            return x;
    if (!create)
        return NULL;
    cl_stream *x = hub_calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->origin = origin;
    x->kind = kind;
    x->len = (uint8_t)len;
    if (len)
        memcpy(x->tag, tag, len);
    x->next = *b;
    *b = x;
    return x;
}

/* Forget the streams that match (origin 0: any origin; kind 0: any kind; tag NULL: any). */
static void streams_forget(cl_stream **t, uint32_t origin, char kind, const char *tag, size_t len)
{
    for (size_t i = 0; t && i < CL_STREAMS; i++) {
        for (cl_stream **pp = &t[i]; *pp;) {
            cl_stream *x = *pp;
            if ((!origin || x->origin == origin) && (!kind || x->kind == kind) &&
                (!tag || (x->len == len && memcmp(x->tag, tag, len) == 0))) {
                *pp = x->next;
                hub_free(x);
            } else {
                pp = &x->next;
            }
        }
    }
}

static void streams_free(cl_stream **t)
{
    streams_forget(t, 0, 0, NULL, 0);
    hub_free(t);
}

/* ---- the unicast rotation ---- */

static cl_rr *rr_get(cluster *cl, const char *tag, size_t len)
{
    cl_rr **b = &cl->rr[stream_bucket(0, 'u', tag, len)];
    for (cl_rr *x = *b; x; x = x->next)
        if (x->len == len && memcmp(x->tag, tag, len) == 0)
            return x;
    cl_rr *x = hub_calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->len = (uint8_t)len;
    memcpy(x->tag, tag, len);
    x->next = *b;
    *b = x;
    cl->nrr++;
    return x;
}

/* Loop thread: unlink and free rotation x. */
static void rr_drop(cluster *cl, cl_rr *x)
{
    for (cl_rr **pp = &cl->rr[stream_bucket(0, 'u', x->tag, x->len)]; *pp; pp = &(*pp)->next) {
        if (*pp == x) {
            *pp = x->next;
            hub_free(x->slots);
            hub_free(x);
            cl->nrr--;
            return;
        }
    }
}

/* Loop thread: forget the rotations no unicast used for max_age seconds (0: all). */
static void rr_prune(cluster *cl, ev_tstamp max_age)
{
    ev_tstamp now = max_age > 0 ? ev_now(cl->loop) : 0;
    for (size_t i = 0; cl->rr && cl->nrr && i < CL_STREAMS; i++) {
        for (cl_rr **pp = &cl->rr[i]; *pp;) {
            cl_rr *x = *pp;
            if (max_age > 0 && now - x->used <= max_age) {
                pp = &x->next;
                continue;
            }
            *pp = x->next;
            hub_free(x->slots);
            hub_free(x);
            cl->nrr--;
        }
    }
}

/* Under mu, loop thread: give node nid the weight w in rotation x (a new node starts at 0). */
static int rr_weigh(cl_rr *x, uint32_t nid, uint32_t w)
{
    for (size_t i = 0; i < x->n; i++) {
        if (x->slots[i].nid == nid) {
            x->slots[i].weight = w;
            return 0;
        }
    }
    if (x->n == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 4;
        cl_rr_slot *ns = hub_realloc(x->slots, cap * sizeof(*ns));
        if (!ns)
            return -ENOMEM;
        x->slots = ns;
        x->cap = cap;
    }
    x->slots[x->n++] = (cl_rr_slot){nid, w, 0};
    return 0;
}

/* Loop thread: the node the next unicast to tag goes to. Each node holding members of tag
 * (this one with its nlocal, the others as their last heartbeat counted them) is weighted by
 * its members, and picked by smooth weighted round robin: over any run of W unicasts (W the
 * members in all, the weights unchanged) a node gets exactly its members' share, spread out
 * rather than in bursts. 0 when no node is known to hold the tag (*unknown set when a node
 * listing only part of its tags may), or -ENOMEM. */
static int64_t rr_pick(cluster *cl, const char *tag, size_t len, uint32_t nlocal, int *unknown)
{
    cl_rr *x = rr_get(cl, tag, len);
    if (!x)
        return -ENOMEM;
    x->used = ev_now(cl->loop);
    int rc = 0;
    for (size_t i = 0; i < x->n; i++)
        x->slots[i].weight = 0;
    pthread_mutex_lock(&cl->mu);
    for (cl_node *n = cl->nodes; n && rc == 0; n = n->next) {
        uint32_t w = node_tag_members(n, tag, len);
        if (w)
            rc = rr_weigh(x, n->nid, w);
        else if (n->tags_more)
            *unknown = 1;
    }
    pthread_mutex_unlock(&cl->mu);
    if (rc == 0 && nlocal)
        rc = rr_weigh(x, cl->nid, nlocal);
    if (rc < 0)
        return rc;
    /* nodes that no longer hold the tag leave the rotation */
    size_t k = 0;
    int64_t total = 0;
    for (size_t i = 0; i < x->n; i++) {
        if (x->slots[i].weight)
            x->slots[k++] = x->slots[i];
    }
    x->n = k;
    cl_rr_slot *best = NULL;
    for (size_t i = 0; i < x->n; i++) {
        x->slots[i].cw += x->slots[i].weight;
        total += x->slots[i].weight;
        if (!best || x->slots[i].cw > best->cw)
            best = &x->slots[i];
    }
    if (!best) {
        rr_drop(cl, x); /* nobody holds it: a unicast to a tag of nobody keeps no rotation */
        return 0;
    }
    best->cw -= total;
    return best->nid;
}

/* ---- publishing ---- */

static void put_be(char *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        p[i] = (char)(v & 0xff);
}

static uint64_t get_be(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

/* Publish an envelope of kind on subj. 0, or <0 (counted as publish_failed). */
static int publish(cluster *cl, const char *subj, int kidx, char kind, uint64_t id, const char *aux,
                   size_t auxlen, const char *data, size_t len)
{
    /* the stream: relays, multicasts to a tag, messages to a node (unicasts, shared by a
     * queue group, are not numbered: each node sees a part of them) */
    cl_stream *st = NULL;
    if (kind == E_RELAY || kind == E_MULTICAST)
        st = stream_get(cl->sent, 0, kind, aux, auxlen, 1);
    else if (kind != E_UNICAST)
        st = stream_get(cl->sent, (uint32_t)(id >> CL_ID_SHIFT), 'N', NULL, 0, 1);
    if (!cl->nc || cl->stopping) {
        BUMP(cl->publish_failed, 1);
        return -EAGAIN;
    }
    if ((size_t)natsConnection_Buffered(cl->nc) > cl->conf.max_pending) {
        BUMP(cl->publish_failed, 1);
        return -ENOBUFS;
    }
    size_t need = CL_ENV_HEAD + auxlen + len;
    if (need > cl->bufcap) {
        char *nb = hub_realloc(cl->buf, need);
        if (!nb) {
            BUMP(cl->publish_failed, 1);
            return -ENOMEM;
        }
        cl->buf = nb;
        cl->bufcap = need;
    }
    char *p = cl->buf;
    p[0] = (char)CL_ENV_MAGIC;
    p[1] = kind;
    put_be(p + 2, auxlen, 2);
    put_be(p + 4, cl->nid, 4);
    put_be(p + 8, ++cl->seq, 8);
    put_be(p + 16, id, 8);
    put_be(p + 24, st ? st->seq + 1 : 0, 8);
    if (auxlen)
        memcpy(p + CL_ENV_HEAD, aux, auxlen);
    if (len)
        memcpy(p + CL_ENV_HEAD + auxlen, data, len);
    natsStatus s = natsConnection_Publish(cl->nc, subj, p, (int)need);
    if (s != NATS_OK) {
        BUMP(cl->publish_failed, 1);
        if (s == NATS_MAX_PAYLOAD && !cl->ipayload_warned) {
            cl->ipayload_warned = 1;
            hub_log(HUB_LOG_WARN,
                    "cluster: a %zu-byte message is over the NATS server's max_payload (raise "
                    "it to max_frame_size + 256); such messages are counted in "
                    "cluster_publish_failed",
                    need);
        }
        hub_log(HUB_LOG_DEBUG, "cluster: publish on %s failed: %s", subj, natsStatus_GetText(s));
        return s == NATS_INSUFFICIENT_BUFFER ? -ENOBUFS : -EIO;
    }
    if (st) /* numbered once NATS took it: a refusal is counted as failed, not as a gap */
        st->seq++;
    BUMP(cl->out[kidx], 1);
    BUMP(cl->bytes_out, need);
    return 0;
}

/* A relay or multicast is published only when a heartbeat says another node takes it: with
 * no other node (or none with members of the tag) it costs nothing beyond this lookup. */
static int cl_relay(void *ud, const char *data, size_t len)
{
    cluster *cl = ud;
    int reach = cl_reach(cl, NULL, 0);
    if (!reach || publish(cl, cl->subj_relay, K_RELAY, E_RELAY, 0, NULL, 0, data, len) < 0)
        return 0;
    return reach;
}

static int cl_multicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    cluster *cl = ud;
    int reach = cl_reach(cl, tag, taglen);
    if (!reach)
        return 0;
    char subj[SUBJ_MAX];
    tag_subject(cl, 't', tag, taglen, subj, sizeof(subj));
    if (publish(cl, subj, K_MULTICAST, E_MULTICAST, 0, tag, taglen, data, len) < 0)
        return 0;
    return reach;
}

/* local_first: a local member, else the rotation over the other nodes; cluster: the rotation
 * over every node holding members, this one included (hub_router.unicast). The queue group
 * only when the rotation knows of no node. */
static int cl_unicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len,
                      uint32_t nlocal)
{
    cluster *cl = ud;
    if (nlocal && cl->conf.unicast == CL_UNICAST_LOCAL_FIRST)
        return 0;
    int unknown = 0;
    int64_t nid = rr_pick(cl, tag, taglen, nlocal, &unknown);
    if (nid == cl->nid)
        return 0; /* this node's turn: the hub hands it to a local member */
    if (nid == 0 && !unknown)
        return 0; /* no member anywhere that we know of: as a single hub, nobody */
    char subj[SUBJ_MAX];
    int rc;
    if (nid > 0) {
        snprintf(subj, sizeof(subj), "%s.n.%u", cl->conf.prefix, (uint32_t)nid);
        rc = publish(cl, subj, K_UNICAST, E_UNICAST_TO, (uint64_t)nid << CL_ID_SHIFT, tag, taglen,
                     data, len);
    } else {
        tag_subject(cl, 'u', tag, taglen, subj, sizeof(subj));
        rc = publish(cl, subj, K_UNICAST, E_UNICAST, 0, tag, taglen, data, len);
    }
    if (rc < 0)
        return nlocal ? 0 : -EIO; /* with local members, one of them takes it after all */
    return 1;
}

/* The subject of the node holding id, or -ENOENT (ours, or a node not seen). */
static int direct_subject(cluster *cl, uint64_t id, char *out, size_t cap)
{
    uint32_t nid = (uint32_t)(id >> CL_ID_SHIFT);
    if (nid == cl->nid || nid == 0 || nid > CL_NID_MAX)
        return -ENOENT;
    pthread_mutex_lock(&cl->mu);
    int known = node_find(cl, nid) != NULL;
    pthread_mutex_unlock(&cl->mu);
    if (!known)
        return -ENOENT;
    snprintf(out, cap, "%s.n.%u", cl->conf.prefix, nid);
    return 0;
}

static int cl_direct(cluster *cl, char kind, uint64_t id, const char *aux, size_t auxlen,
                     const char *data, size_t len)
{
    char subj[96];
    if (direct_subject(cl, id, subj, sizeof(subj)) < 0)
        return -ENOENT;
    int rc = publish(cl, subj, K_DIRECT, kind, id, aux, auxlen, data, len);
    return rc < 0 ? rc : 1;
}

static int cl_send(void *ud, uint64_t id, const char *data, size_t len)
{
    return cl_direct(ud, E_SEND, id, NULL, 0, data, len);
}

static int cl_set_tag(void *ud, uint64_t id, const char *tag, size_t taglen)
{
    return cl_direct(ud, E_TAG, id, tag, taglen, NULL, 0);
}

static int cl_close(void *ud, uint64_t id, const char *reason)
{
    size_t rl = reason ? strnlen(reason, 255) : 0;
    return cl_direct(ud, E_CLOSE, id, reason, rl, NULL, 0);
}

/* ---- tags: subscribe while there are local members ---- */

static void hb_soon(cluster *cl)
{
    if (!ev_is_active(&cl->soon_w) && !cl->stopping) {
        ev_timer_set(&cl->soon_w, CL_SOON, 0.);
        ev_timer_start(cl->loop, &cl->soon_w);
    }
}

static void tag_unsub(cluster *cl, cl_tag *t)
{
    int64_t d = 0;
    int pending = 0;
    /* unicasts still queued here would have gone to another node's member: counted */
    if (t->usub && natsSubscription_GetPending(t->usub, &pending, NULL) == NATS_OK && pending > 0)
        BUMP(cl->unicast_lost, (uint64_t)pending);
    natsSubscription *subs[2] = {t->msub, t->usub};
    for (int i = 0; i < 2; i++) {
        if (!subs[i])
            continue;
        if (natsSubscription_GetDropped(subs[i], &d) == NATS_OK && d > 0)
            cl->dropped_gone += (uint64_t)d;
        natsSubscription_Unsubscribe(subs[i]);
        natsSubscription_Destroy(subs[i]);
    }
    t->msub = t->usub = NULL;
}

static void cl_tag_members(void *ud, const char *tag, size_t taglen, int present)
{
    cluster *cl = ud;
    if (!cl->nc)
        return;
    if (!present) {
        /* What the subscriptions hold goes out first (a member may be back by then). Inside a
         * drain (a delivery closed the last member) it is not drained again: what the drain
         * under way took goes out, what is still queued is counted below. */
        drain_subs(cl);
        for (cl_tag **pp = &cl->tags; *pp; pp = &(*pp)->next) {
            cl_tag *t = *pp;
            if (t->len == taglen && memcmp(t->name, tag, taglen) == 0) {
                *pp = t->next;
                tag_unsub(cl, t);
                /* with no interest, nothing of this tag is missed: numbering starts afresh */
                streams_forget(cl->seen, 0, E_MULTICAST, tag, taglen);
                hub_free(t);
                cl->ntags--;
                hb_soon(cl);
                return;
            }
        }
        return;
    }
    cl_tag *t = hub_calloc(1, sizeof(*t));
    if (!t) {
        hub_log(HUB_LOG_ERR, "cluster: out of memory subscribing tag '%.*s'", (int)taglen, tag);
        return;
    }
    memcpy(t->name, tag, taglen);
    t->len = taglen;
    char subj[SUBJ_MAX];
    tag_subject(cl, 't', tag, taglen, subj, sizeof(subj));
    natsStatus s = natsConnection_SubscribeSync(&t->msub, cl->nc, subj);
    if (s == NATS_OK) {
        tag_subject(cl, 'u', tag, taglen, subj, sizeof(subj));
        s = natsConnection_QueueSubscribeSync(&t->usub, cl->nc, subj, cl->queue);
    }
    if (s != NATS_OK) {
        hub_log(HUB_LOG_ERR, "cluster: cannot subscribe tag '%.*s': %s", (int)taglen, tag,
                natsStatus_GetText(s));
        tag_unsub(cl, t);
        hub_free(t);
        return;
    }
    t->next = cl->tags;
    cl->tags = t;
    cl->ntags++;
    hb_soon(cl);
}

/* ---- receiving ---- */

static void take_heartbeat(cluster *cl, natsMsg *m);

/* 1 when an envelope of this kind, with this aux, may arrive on a subscription of this sort:
 * relay (R), this node's own subject (N), or a tag's multicast (M) or unicast (U) subject
 * for tag. Anything else is not from an evhub node of this version: counted, dropped. */
static int envelope_fits(char sort, const cl_tag *t, char kind, const char *aux, size_t auxlen)
{
    switch (sort) {
    case 'R':
        return kind == E_RELAY && auxlen == 0;
    case 'M':
    case 'U':
        return kind == (sort == 'M' ? E_MULTICAST : E_UNICAST) && auxlen == t->len &&
               memcmp(aux, t->name, auxlen) == 0;
    default: /* 'N' */
        switch (kind) {
        case E_SEND:
            return auxlen == 0;
        case E_TAG:
            return auxlen == 0 || hub_tag_valid(aux, auxlen);
        case E_UNICAST_TO:
            return hub_tag_valid(aux, auxlen);
        case E_CLOSE:
            return 1; /* a reason, cut to 255 bytes where it is used */
        default:
            return 0;
        }
    }
}

static void collect(cluster *cl, natsSubscription *sub, char sort, const cl_tag *t, size_t *n)
{
    natsMsg *m;
    while (sub && natsSubscription_NextMsg(&m, sub, 0) == NATS_OK) {
        const unsigned char *d = (const unsigned char *)natsMsg_GetData(m);
        int len = natsMsg_GetDataLength(m);
        if (len < CL_ENV_HEAD || d[0] != CL_ENV_MAGIC ||
            CL_ENV_HEAD + get_be(d + 2, 2) > (uint64_t)len ||
            !envelope_fits(sort, t, (char)d[1], (const char *)d + CL_ENV_HEAD,
                           (size_t)get_be(d + 2, 2))) {
            BUMP(cl->bad_messages, 1);
            natsMsg_Destroy(m);
            continue;
        }
        if (*n == cl->incap) {
            size_t cap = cl->incap ? cl->incap * 2 : 256;
            cl_in *nv = hub_realloc(cl->inv, cap * sizeof(*nv));
            if (!nv) {
                hub_log(HUB_LOG_ERR, "cluster: out of memory taking a message: dropped");
                BUMP(cl->bad_messages, 1);
                natsMsg_Destroy(m);
                continue;
            }
            cl->inv = nv;
            cl->incap = cap;
        }
        cl->inv[*n] = (cl_in){m, (uint32_t)get_be(d + 4, 4), get_be(d + 8, 8)};
        (*n)++;
    }
}

static int cmp_in(const void *a, const void *b)
{
    const cl_in *x = a, *y = b;
    if (x->origin != y->origin)
        return x->origin < y->origin ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* [cluster] script = yes: a relay, multicast, unicast or send goes to the script's cluster
 * handler instead of the clients (a unicast only while this node has members: else it is
 * passed on or lost as without a script). 1 when taken (or dropped, counted). */
static int to_script(cluster *cl, uint32_t origin, hub_origin *o, char kind, uint64_t id,
                     const char *aux, size_t auxlen, const char *data, size_t len)
{
    const char *what = kind == E_RELAY                             ? "relay"
                       : kind == E_MULTICAST                       ? "multicast"
                       : kind == E_SEND                            ? "send"
                       : kind == E_UNICAST || kind == E_UNICAST_TO ? "unicast"
                                                                   : NULL;
    if (!what)
        return 0; /* set_tag and close by id act at once */
    if ((kind == E_UNICAST || kind == E_UNICAST_TO) && !hub_tag_members(cl->h, aux, auxlen))
        return 0;
    if (!o->node[0])
        snprintf(o->node, sizeof(o->node), "%u", origin); /* no heartbeat from it yet */
    snprintf(o->kind, sizeof(o->kind), "%s", what);
    o->id = kind == E_SEND ? id : 0;
    if (kind != E_RELAY && kind != E_SEND) {
        if (auxlen >= sizeof(o->tag))
            return 0; /* (collect lets no such tag through) */
        o->taglen = auxlen;
        memcpy(o->tag, aux, auxlen);
        o->tag[auxlen] = '\0';
    }
    BUMP(cl->in[kind == E_RELAY       ? K_RELAY
                : kind == E_MULTICAST ? K_MULTICAST
                : kind == E_SEND      ? K_DIRECT
                                      : K_UNICAST],
         1);
    /* keyed by origin: one origin's messages run in one executor, in order */
    int rc = hub_remote_event(cl->h, origin, o, data, len);
    if (rc < 0) {
        BUMP(cl->script_dropped, 1);
        hub_log(HUB_LOG_DEBUG, "cluster: a %s for the script dropped: %s", what,
                rc == -ENOBUFS ? "its worker's queue is full" : strerror(-rc));
    } else {
        BUMP(cl->to_script, 1);
    }
    return 1;
}

static void deliver(cluster *cl, const cl_in *in)
{
    const unsigned char *d = (const unsigned char *)natsMsg_GetData(in->m);
    size_t len = (size_t)natsMsg_GetDataLength(in->m);
    char kind = (char)d[1];
    size_t auxlen = (size_t)get_be(d + 2, 2);
    uint64_t id = get_be(d + 16, 8);
    const char *aux = (const char *)d + CL_ENV_HEAD;
    const char *data = aux + auxlen;
    size_t dlen = len - CL_ENV_HEAD - auxlen;
    int rc;
    /* our own relays and multicasts come back (NATS echoes): they were delivered here */
    if (in->origin == cl->nid && (kind == E_RELAY || kind == E_MULTICAST))
        return;
    BUMP(cl->bytes_in, len);
    uint64_t sseq = get_be(d + 24, 8);
    if (sseq) {
        int direct = kind != E_RELAY && kind != E_MULTICAST;
        cl_stream *st = stream_get(cl->seen, in->origin, direct ? 'N' : kind, direct ? NULL : aux,
                                   direct ? 0 : auxlen, 1);
        if (st && st->seq && sseq > st->seq + 1)
            BUMP(cl->gaps, sseq - st->seq - 1); /* missed: NATS had no interest, or dropped */
        if (st) /* a number at or below the last: the origin restarted */
            st->seq = sseq;
    }
    if (in->origin != cl->nid) {
        hub_origin o; /* (only with script = yes) */
        pthread_mutex_lock(&cl->mu);
        cl_node *n = node_find(cl, in->origin);
        if (n)
            n->in_from++;
        if (cl->conf.script) {
            memset(&o, 0, sizeof(o));
            snprintf(o.node, sizeof(o.node), "%s", n ? n->name : "");
        }
        pthread_mutex_unlock(&cl->mu);
        /* (what NATS hands back of this node's own, a unicast through the queue group, its
         * script saw when it sent it) */
        if (cl->conf.script && to_script(cl, in->origin, &o, kind, id, aux, auxlen, data, dlen))
            return;
    }
    switch (kind) {
    case E_RELAY:
        BUMP(cl->in[K_RELAY], 1);
        hub_local_relay(cl->h, data, dlen);
        break;
    case E_MULTICAST:
        BUMP(cl->in[K_MULTICAST], 1);
        hub_multicast(cl->h, aux, auxlen, data, dlen);
        break;
    case E_UNICAST:
        BUMP(cl->in[K_UNICAST], 1);
        if (hub_local_unicast(cl->h, aux, auxlen, data, dlen) <= 0)
            BUMP(cl->unicast_lost, 1); /* its last member left while it travelled */
        break;
    case E_UNICAST_TO:
        BUMP(cl->in[K_UNICAST], 1);
        if (hub_local_unicast(cl->h, aux, auxlen, data, dlen) > 0)
            break;
        /* The publisher picked this node from a heartbeat older than the departure of its
         * last member: one more hop, through the queue group (the nodes subscribed to it have
         * members now), never a second one. */
        if (cl_reach(cl, aux, auxlen) > 0) {
            char subj[SUBJ_MAX];
            tag_subject(cl, 'u', aux, auxlen, subj, sizeof(subj));
            if (publish(cl, subj, K_UNICAST, E_UNICAST, 0, aux, auxlen, data, dlen) == 0) {
                BUMP(cl->unicast_rerouted, 1);
                break;
            }
        }
        BUMP(cl->unicast_lost, 1);
        break;
    case E_SEND:
    case E_TAG:
    case E_CLOSE:
        BUMP(cl->in[K_DIRECT], 1);
        if (kind == E_SEND) {
            rc = hub_local_send(cl->h, id, data, dlen);
        } else if (kind == E_TAG) {
            rc = hub_local_set_tag(cl->h, id, aux, auxlen);
        } else {
            char reason[256];
            memcpy(reason, aux, auxlen < 255 ? auxlen : 255);
            reason[auxlen < 255 ? auxlen : 255] = '\0';
            rc = hub_local_close(cl->h, id, reason[0] ? reason : "closed by another node");
        }
        if (rc == -ENOENT)
            BUMP(cl->direct_unknown, 1);
        break;
    default:
        BUMP(cl->bad_messages, 1);
    }
}

/* Loop thread: hand out everything the subscriptions hold, each origin's in its order. */
static void drain_subs(cluster *cl)
{
    natsMsg *m;
    /* A delivery may close a client or change a tag, and so come back here: the messages
     * being handed out (cl->inv) stay untouched until they all went. */
    if (cl->draining)
        return;
    cl->draining = 1;
    while (cl->hb_sub && natsSubscription_NextMsg(&m, cl->hb_sub, 0) == NATS_OK) {
        take_heartbeat(cl, m);
        natsMsg_Destroy(m);
    }
    size_t n = 0;
    collect(cl, cl->relay_sub, 'R', NULL, &n);
    collect(cl, cl->direct_sub, 'N', NULL, &n);
    for (cl_tag *t = cl->tags; t; t = t->next) {
        collect(cl, t->msub, 'M', t, &n);
        collect(cl, t->usub, 'U', t, &n);
    }
    if (n > 1)
        qsort(cl->inv, n, sizeof(*cl->inv), cmp_in);
    for (size_t i = 0; i < n; i++) {
        deliver(cl, &cl->inv[i]);
        natsMsg_Destroy(cl->inv[i].m);
    }
    cl->draining = 0;
}

/* ---- heartbeats ---- */

static void send_heartbeat(cluster *cl, int bye)
{
    if (!cl->nc)
        return;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "node", json_object_new_string(cl->conf.node));
    json_object_object_add(o, "nid", json_object_new_int64(cl->nid));
    if (bye) {
        json_object_object_add(o, "bye", json_object_new_boolean(1));
    } else {
        json_object_object_add(o, "clients", json_object_new_int64(hub_clients(cl->h)));
        /* "members" (each listed tag's local members, in the same order) weighs the nodes in
         * the others' unicast rotations; a node that sends none counts 1 for each tag */
        json_object *tags = json_object_new_array(), *members = json_object_new_array();
        size_t i = 0;
        for (cl_tag *t = cl->tags; t && i < CL_HB_TAGS; t = t->next, i++) {
            json_object_array_add(tags, json_object_new_string_len(t->name, (int)t->len));
            json_object_array_add(members,
                                  json_object_new_int(hub_tag_members(cl->h, t->name, t->len)));
        }
        json_object_object_add(o, "tags", tags);
        json_object_object_add(o, "members", members);
        json_object_object_add(o, "tags_more", json_object_new_boolean(cl->ntags > CL_HB_TAGS));
        uint64_t out = 0, in = 0;
        for (int k = 0; k < K_NKINDS; k++) {
            out += GET(cl->out[k]);
            in += GET(cl->in[k]);
        }
        json_object_object_add(o, "out", json_object_new_int64((int64_t)out));
        json_object_object_add(o, "in", json_object_new_int64((int64_t)in));
        json_object_object_add(o, "drops", json_object_new_int64((int64_t)GET(cl->publish_failed)));
    }
    const char *txt = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
    natsConnection_Publish(cl->nc, cl->subj_hb, txt, (int)strlen(txt));
    json_object_put(o);
}

static const char *jstr(json_object *o, const char *k)
{
    json_object *v;
    return json_object_object_get_ex(o, k, &v) && json_object_is_type(v, json_type_string)
               ? json_object_get_string(v)
               : NULL;
}

static int64_t jint(json_object *o, const char *k)
{
    json_object *v;
    return json_object_object_get_ex(o, k, &v) ? json_object_get_int64(v) : 0;
}

static void node_drop(cluster *cl, cl_node **pp, const char *why)
{
    cl_node *n = *pp;
    hub_log(HUB_LOG_NOTICE, "cluster: node %s (%u) %s", n->name, n->nid, why);
    streams_forget(cl->seen, n->nid, 0, NULL, 0);
    *pp = n->next;
    node_tags_free(n);
    hub_free(n);
    atomic_fetch_sub(&cl->nnodes, 1);
}

static void take_heartbeat(cluster *cl, natsMsg *m)
{
    json_tokener *tok = json_tokener_new();
    json_object *o =
        tok ? json_tokener_parse_ex(tok, natsMsg_GetData(m), natsMsg_GetDataLength(m)) : NULL;
    if (tok)
        json_tokener_free(tok);
    const char *name = o ? jstr(o, "node") : NULL;
    int64_t nid = o ? jint(o, "nid") : 0;
    if (!name || nid <= 0 || nid > CL_NID_MAX) {
        BUMP(cl->bad_messages, 1);
        json_object_put(o);
        return;
    }
    BUMP(cl->heartbeats_in, 1);
    if ((uint32_t)nid == cl->nid) {
        if (strcmp(name, cl->conf.node) != 0) {
            BUMP(cl->id_conflicts, 1);
            if (!cl->id_conflict_logged++)
                hub_log(HUB_LOG_ERR,
                        "cluster: node '%s' has this node's id %u: connection ids clash; set a "
                        "distinct [cluster] node_id on one of them",
                        name, cl->nid);
        }
        json_object_put(o);
        return;
    }
    json_object *bye, *tags, *members = NULL;
    pthread_mutex_lock(&cl->mu);
    cl_node **pp = &cl->nodes;
    while (*pp && (*pp)->nid != (uint32_t)nid)
        pp = &(*pp)->next;
    if (json_object_object_get_ex(o, "bye", &bye) && json_object_get_boolean(bye)) {
        if (*pp)
            node_drop(cl, pp, "left the cluster");
        pthread_mutex_unlock(&cl->mu);
        json_object_put(o);
        return;
    }
    cl_node *n = *pp;
    if (!n) {
        n = hub_calloc(1, sizeof(*n));
        if (!n) {
            pthread_mutex_unlock(&cl->mu);
            json_object_put(o);
            return;
        }
        n->nid = (uint32_t)nid;
        n->next = cl->nodes;
        cl->nodes = n;
        atomic_fetch_add(&cl->nnodes, 1);
        hub_log(HUB_LOG_NOTICE, "cluster: node %s (%u) joined", name, n->nid);
    }
    snprintf(n->name, sizeof(n->name), "%s", name);
    n->last_seen = ev_now(cl->loop);
    n->clients = jint(o, "clients");
    n->its_out = jint(o, "out");
    n->its_in = jint(o, "in");
    n->its_drops = jint(o, "drops");
    json_object *more;
    n->tags_more =
        json_object_object_get_ex(o, "tags_more", &more) && json_object_get_boolean(more);
    node_tags_free(n);
    if (json_object_object_get_ex(o, "tags", &tags) && json_object_is_type(tags, json_type_array)) {
        size_t nt = json_object_array_length(tags);
        if (!json_object_object_get_ex(o, "members", &members) ||
            !json_object_is_type(members, json_type_array) ||
            json_object_array_length(members) != nt)
            members = NULL;
        n->tags = nt ? hub_calloc(nt, sizeof(*n->tags)) : NULL;
        if (nt && !n->tags) {
            n->tags_more = 1; /* unknown: treat as having every tag */
        } else {
            for (size_t i = 0; i < nt; i++) {
                json_object *t = json_object_array_get_idx(tags, i);
                const char *s = json_object_get_string(t);
                char *c = s ? hub_strndup(s, strlen(s)) : NULL;
                if (!c) {
                    n->tags_more = 1;
                    continue;
                }
                int64_t k =
                    members ? json_object_get_int64(json_object_array_get_idx(members, i)) : 1;
                n->tags[n->ntags++] = (cl_ntag){c, k < 1           ? 1
                                                   : k > INT32_MAX ? INT32_MAX
                                                                   : (uint32_t)k};
            }
            if (n->ntags > 1)
                qsort(n->tags, n->ntags, sizeof(*n->tags), cmp_ntag);
        }
    }
    pthread_mutex_unlock(&cl->mu);
    json_object_put(o);
}

static void expire_nodes(cluster *cl)
{
    ev_tstamp now = ev_now(cl->loop), limit = cl->conf.node_timeout / 1000.0;
    int connected = atomic_load(&cl->connected);
    pthread_mutex_lock(&cl->mu);
    for (cl_node **pp = &cl->nodes; *pp;) {
        if (!connected) {
            /* Cut off from NATS we hear nobody: that is no sign the others went. The view
             * stays as it was (what is published meanwhile waits in the reconnect buffer
             * for them), and after the reconnect each node gets node_timeout afresh. */
            (*pp)->last_seen = now;
            pp = &(*pp)->next;
            continue;
        }
        if (now - (*pp)->last_seen > limit)
            node_drop(cl, pp, "timed out (no heartbeat)");
        else
            pp = &(*pp)->next;
    }
    pthread_mutex_unlock(&cl->mu);
}

static uint64_t slow_dropped(cluster *cl);

static void hb_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    cluster *cl = w->data;
    expire_nodes(cl);
    rr_prune(cl, cl->conf.node_timeout / 1000.0);
    if (!cl->stopping)
        send_heartbeat(cl, 0);
    /* for the stats, which any thread may read */
    atomic_store(&cl->slow_dropped, slow_dropped(cl));
}

static void soon_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    cluster *cl = w->data;
    if (!cl->stopping)
        send_heartbeat(cl, 0);
}

/* ---- connection callbacks (libnats' threads: counters and logs only) ---- */

static void on_disconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    cluster *cl = closure;
    atomic_store(&cl->connected, 0);
    if (!cl->stopping) {
        BUMP(cl->disconnects, 1);
        hub_log(HUB_LOG_WARN, "cluster: disconnected from NATS; reconnecting (publishes are "
                              "buffered up to reconnect_buffer)");
    }
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    cluster *cl = closure;
    char url[256] = "";
    natsConnection_GetConnectedUrl(nc, url, sizeof(url));
    atomic_store(&cl->connected, 1);
    BUMP(cl->reconnects, 1);
    hub_log(HUB_LOG_NOTICE, "cluster: reconnected to NATS at %s", url);
}

static void on_connected(natsConnection *nc, void *closure)
{
    cluster *cl = closure;
    char url[256] = "";
    natsConnection_GetConnectedUrl(nc, url, sizeof(url));
    atomic_store(&cl->connected, 1);
    hub_log(HUB_LOG_NOTICE, "cluster: connected to NATS at %s", url);
}

static void on_closed(natsConnection *nc, void *closure)
{
    cluster *cl = closure;
    atomic_store(&cl->connected, 0);
    const char *why = NULL;
    natsConnection_GetLastError(nc, &why);
    if (!cl->stopping)
        hub_log(HUB_LOG_ERR,
                "cluster: the NATS connection is closed for good (%s): this node is alone until "
                "it restarts",
                why && *why ? why : "the server refused it");
}

static void on_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    (void)nc;
    (void)sub;
    (void)closure;
    if (err != NATS_SLOW_CONSUMER) /* counted from the subscriptions */
        hub_log(HUB_LOG_WARN, "cluster: NATS error: %s", natsStatus_GetText(err));
}

/* ---- evhubctl cluster ---- */

static uint64_t slow_dropped(cluster *cl)
{
    uint64_t total = cl->dropped_gone;
    int64_t d;
    natsSubscription *fixed[3] = {cl->relay_sub, cl->direct_sub, cl->hb_sub};
    for (int i = 0; i < 3; i++)
        if (fixed[i] && natsSubscription_GetDropped(fixed[i], &d) == NATS_OK && d > 0)
            total += (uint64_t)d;
    for (cl_tag *t = cl->tags; t; t = t->next) {
        if (t->msub && natsSubscription_GetDropped(t->msub, &d) == NATS_OK && d > 0)
            total += (uint64_t)d;
        if (t->usub && natsSubscription_GetDropped(t->usub, &d) == NATS_OK && d > 0)
            total += (uint64_t)d;
    }
    return total;
}

static const hub_ctl_spec cluster_spec = {
    "cluster", "The cluster: this node, the nodes seen, their clients and tags",
    "Lists this node (name, id, NATS server, connected, its tags) and every other node whose "
    "heartbeat arrived within node_timeout: its clients and tags, seconds since its last "
    "heartbeat, messages this node took from it, and the messages in/out and drops it reports; "
    "then this node's cluster counters.",
    NULL, 0};

static json_object *tags_json(const cl_ntag *tags, size_t n, int members)
{
    json_object *a = members ? json_object_new_object() : json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        if (members)
            json_object_object_add(a, tags[i].name, json_object_new_int64(tags[i].members));
        else
            json_object_array_add(a, json_object_new_string(tags[i].name));
    }
    return a;
}

static void cmd_cluster(hub_ctl_call *call, json_object *params, void *ud)
{
    (void)params;
    cluster *cl = ud;
    json_object *r = json_object_new_object();
    json_object_object_add(r, "enabled", json_object_new_boolean(cl->enabled));
    if (!cl->enabled) {
        hub_ctl_reply(call, r);
        return;
    }
    char url[256] = "";
    if (cl->nc)
        natsConnection_GetConnectedUrl(cl->nc, url, sizeof(url));
    json_object_object_add(r, "node", json_object_new_string(cl->conf.node));
    json_object_object_add(r, "nid", json_object_new_int64(cl->nid));
    json_object_object_add(r, "prefix", json_object_new_string(cl->conf.prefix));
    json_object_object_add(r, "unicast", json_object_new_string(unicast_modes[cl->conf.unicast]));
    json_object_object_add(r, "script", json_object_new_boolean(cl->conf.script));
    json_object_object_add(r, "server", json_object_new_string(url));
    json_object_object_add(r, "connected", json_object_new_boolean(atomic_load(&cl->connected)));
    json_object_object_add(r, "clients", json_object_new_int(hub_clients(cl->h)));
    json_object *mytags = json_object_new_array(), *mine = json_object_new_object();
    for (cl_tag *t = cl->tags; t; t = t->next) {
        json_object_array_add(mytags, json_object_new_string_len(t->name, (int)t->len));
        json_object_object_add(mine, t->name,
                               json_object_new_int(hub_tag_members(cl->h, t->name, t->len)));
    }
    json_object_object_add(r, "tags", mytags);
    json_object_object_add(r, "members", mine);
    json_object *nodes = json_object_new_array();
    ev_tstamp now = ev_now(cl->loop);
    pthread_mutex_lock(&cl->mu);
    for (cl_node *n = cl->nodes; n; n = n->next) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "node", json_object_new_string(n->name));
        json_object_object_add(o, "nid", json_object_new_int64(n->nid));
        json_object_object_add(o, "clients", json_object_new_int64(n->clients));
        json_object_object_add(o, "tags", tags_json(n->tags, n->ntags, 0));
        json_object_object_add(o, "members", tags_json(n->tags, n->ntags, 1));
        json_object_object_add(o, "tags_more", json_object_new_boolean(n->tags_more));
        json_object_object_add(o, "last_seen_s", json_object_new_double(now - n->last_seen));
        json_object_object_add(o, "messages_from", json_object_new_int64((int64_t)n->in_from));
        json_object_object_add(o, "its_out", json_object_new_int64(n->its_out));
        json_object_object_add(o, "its_in", json_object_new_int64(n->its_in));
        json_object_object_add(o, "its_drops", json_object_new_int64(n->its_drops));
        json_object_array_add(nodes, o);
    }
    pthread_mutex_unlock(&cl->mu);
    json_object_object_add(r, "nodes", nodes);
    json_object *c = json_object_new_object();
    for (int k = 0; k < K_NKINDS; k++) {
        char key[32];
        snprintf(key, sizeof(key), "out_%s", kind_names[k]);
        json_object_object_add(c, key, json_object_new_int64((int64_t)GET(cl->out[k])));
        snprintf(key, sizeof(key), "in_%s", kind_names[k]);
        json_object_object_add(c, key, json_object_new_int64((int64_t)GET(cl->in[k])));
    }
    json_object_object_add(c, "bytes_out", json_object_new_int64((int64_t)GET(cl->bytes_out)));
    json_object_object_add(c, "bytes_in", json_object_new_int64((int64_t)GET(cl->bytes_in)));
    json_object_object_add(c, "publish_failed",
                           json_object_new_int64((int64_t)GET(cl->publish_failed)));
    json_object_object_add(c, "slow_dropped", json_object_new_int64((int64_t)slow_dropped(cl)));
    json_object_object_add(c, "gaps", json_object_new_int64((int64_t)GET(cl->gaps)));
    json_object_object_add(c, "unicast_lost",
                           json_object_new_int64((int64_t)GET(cl->unicast_lost)));
    json_object_object_add(c, "to_script", json_object_new_int64((int64_t)GET(cl->to_script)));
    json_object_object_add(c, "unicast_rerouted",
                           json_object_new_int64((int64_t)GET(cl->unicast_rerouted)));
    json_object_object_add(c, "direct_unknown",
                           json_object_new_int64((int64_t)GET(cl->direct_unknown)));
    json_object_object_add(c, "reconnects", json_object_new_int64((int64_t)GET(cl->reconnects)));
    json_object_object_add(c, "disconnects", json_object_new_int64((int64_t)GET(cl->disconnects)));
    json_object_object_add(r, "counters", c);
    hub_ctl_reply(call, r);
}

/* ---- script functions: cluster.node(), cluster.node_of(id) ---- */

/* The node's name ("" when not in a cluster). */
static int fn_node(void *state, hub_call *c)
{
    cluster *cl = state;
    c->ret = json_object_new_string(cl && cl->enabled ? cl->conf.node : "");
    return 1;
}

static int fn_node_of(void *state, hub_call *c)
{
    cluster *cl = state;
    if (hub_arg_type(c, 0) != HUB_ARG_INT) {
        snprintf(c->err, sizeof(c->err), "cluster.node_of: a connection id is expected");
        return -EINVAL;
    }
    uint64_t id = (uint64_t)c->argv[0].i;
    uint32_t nid = (uint32_t)(id >> CL_ID_SHIFT);
    if (!cl || !cl->enabled || nid == cl->nid) {
        c->ret = json_object_new_string(cl && cl->enabled ? cl->conf.node : "");
        return 1;
    }
    pthread_mutex_lock(&cl->mu);
    cl_node *n = node_find(cl, nid);
    if (n)
        c->ret = json_object_new_string(n->name);
    pthread_mutex_unlock(&cl->mu);
    if (!n) {
        snprintf(c->err, sizeof(c->err), "no node known holds connection %llu",
                 (unsigned long long)id);
        return -ENOENT;
    }
    return 1;
}

static const hub_script_fn cluster_fns[] = {
    {"cluster", "node", 0, fn_node},
    {"cluster", "node_of", 0, fn_node_of},
    {NULL, NULL, 0, NULL},
};

/* ---- module ---- */

static const hub_router cluster_router = {
    .relay = cl_relay,
    .multicast = cl_multicast,
    .unicast = cl_unicast,
    .send = cl_send,
    .set_tag = cl_set_tag,
    .close = cl_close,
    .tag_members = cl_tag_members,
    .reach = cl_reach,
};

static int cluster_init(hub *h, void **state, char *err, size_t errlen)
{
    cluster *cl = hub_calloc(1, sizeof(*cl));
    if (!cl) {
        snprintf(err, errlen, "cluster: out of memory");
        return -ENOMEM;
    }
    *state = cl;
    cl->h = h;
    cl->loop = hub_loop(h);
    pthread_mutex_init(&cl->mu, NULL);
    const hub_config *cfg = hub_get_config(h);
    const hub_conf_instance *in = hub_conf_next(cfg, "cluster", NULL);
    int rc = hub_ctl_register(hub_get_ctl(h), &cluster_spec, cmd_cluster, cl);
    if (rc < 0) {
        snprintf(err, errlen, "cluster: cannot register the cluster command: %s", strerror(-rc));
        return rc;
    }
    if (!in)
        return 0; /* no [cluster]: a single hub, nothing of this runs */
    cl->conf = *(const cluster_conf *)in->data;
    if (!cl->conf.nats[0])
        return 0; /* [cluster] without nats: off (an example config may keep the section) */
    if (!prefix_valid(cl->conf.prefix)) {
        snprintf(err, errlen,
                 "%s:%d: [cluster] prefix '%s': NATS subject tokens of letters, digits, '_' "
                 "and '-', separated by '.'",
                 in->file, in->line, cl->conf.prefix);
        return -EINVAL;
    }
    if (strncmp(cl->conf.nats, "nats://", 7) != 0 && strncmp(cl->conf.nats, "tls://", 6) != 0) {
        snprintf(err, errlen, "%s:%d: [cluster] nats: expected nats://host:port[,nats://...]",
                 in->file, in->line);
        return -EINVAL;
    }
    if ((cl->conf.user[0] != 0) != (cl->conf.password[0] != 0)) {
        snprintf(err, errlen, "%s:%d: [cluster] user and password go together", in->file, in->line);
        return -EINVAL;
    }
    if ((cl->conf.nkey[0] != 0) != (cl->conf.nkey_seed[0] != 0)) {
        snprintf(err, errlen, "%s:%d: [cluster] nkey and nkey_seed go together", in->file,
                 in->line);
        return -EINVAL;
    }
    if ((cl->conf.tls_cert[0] != 0) != (cl->conf.tls_key[0] != 0)) {
        snprintf(err, errlen, "%s:%d: [cluster] tls_cert and tls_key go together", in->file,
                 in->line);
        return -EINVAL;
    }
    if (cl->conf.node_timeout <= cl->conf.heartbeat) {
        snprintf(err, errlen, "%s:%d: [cluster] node_timeout must be longer than heartbeat",
                 in->file, in->line);
        return -EINVAL;
    }
    if (!cl->conf.node[0]) {
        char host[64] = "localhost";
        gethostname(host, sizeof(host) - 1);
        const char *colon = strrchr(cfg->bind_addr, ':');
        snprintf(cl->conf.node, sizeof(cl->conf.node), "%s:%s", host, colon ? colon + 1 : "0");
    }
    cl->nid = cl->conf.node_id ? (uint32_t)cl->conf.node_id : nid_of_name(cl->conf.node);
    snprintf(cl->subj_relay, sizeof(cl->subj_relay), "%s.relay", cl->conf.prefix);
    snprintf(cl->subj_hb, sizeof(cl->subj_hb), "%s.hb", cl->conf.prefix);
    snprintf(cl->subj_direct, sizeof(cl->subj_direct), "%s.n.%u", cl->conf.prefix, cl->nid);
    snprintf(cl->queue, sizeof(cl->queue), "%s.u", cl->conf.prefix);
    if (cl->conf.script)
        hub_want_remote_events(h); /* before the scripts load: they are checked for it */
    rc = hub_set_id_base(h, (uint64_t)cl->nid << CL_ID_SHIFT);
    if (rc == 0)
        rc = hub_set_router(h, &cluster_router, cl);
    if (rc < 0) {
        snprintf(err, errlen, "cluster: cannot take the hub's routing: %s", strerror(-rc));
        return rc;
    }
    cl->sent = hub_calloc(CL_STREAMS, sizeof(*cl->sent));
    cl->seen = hub_calloc(CL_STREAMS, sizeof(*cl->seen));
    cl->rr = hub_calloc(CL_STREAMS, sizeof(*cl->rr));
    if (!cl->sent || !cl->seen || !cl->rr) {
        snprintf(err, errlen, "cluster: out of memory");
        return -ENOMEM;
    }
    cl->enabled = 1;
    return 0;
}

/* This thread's last libnats error, without the "(conn.c:1905): " it starts with; NULL if none. */
static const char *nats_why(void)
{
    const char *why = nats_GetLastError(NULL);
    if (why && why[0] == '(') {
        const char *e = strstr(why, "): ");
        if (e)
            why = e + 3;
    }
    return why && *why ? why : NULL;
}

#define NATS_TRY(call)                                                                             \
    do {                                                                                           \
        natsStatus s_ = (call);                                                                    \
        if (s_ != NATS_OK) {                                                                       \
            snprintf(err, errlen, "cluster: %s: %s", #call, natsStatus_GetText(s_));               \
            return -EINVAL;                                                                        \
        }                                                                                          \
    } while (0)

/* 1 when the first connect failed for a reason retrying cannot cure: the server refused the
 * credentials or TLS failed (a certificate, TLS on one side only, which libnats reports as
 * a handshake that ended before its PONG). A server down, silent, full ("maximum
 * connections exceeded") or going away (lame duck) is retried in the background. */
static int connect_refused(natsStatus s, const char *why)
{
    if (s == NATS_CONNECTION_AUTH_FAILED || s == NATS_NOT_PERMITTED || s == NATS_SSL_ERROR ||
        s == NATS_SECURE_CONNECTION_REQUIRED)
        return 1;
    return why && (strcasestr(why, "authorization") || strcasestr(why, "authentication") ||
                   strcasestr(why, "tls") || strcasestr(why, "certificate") ||
                   strcasestr(why, "expected 'pong'"));
}

static int cluster_start(void *state, char *err, size_t errlen)
{
    cluster *cl = state;
    if (!cl->enabled)
        return 0;
    const cluster_conf *c = &cl->conf;
    /* servers: the comma-separated list */
    char list[sizeof(c->nats)];
    const char *urls[32];
    int nurls = 0;
    snprintf(list, sizeof(list), "%s", c->nats);
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok && nurls < 32;
         tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        if (*tok)
            urls[nurls++] = tok;
    }
    NATS_TRY(natsOptions_Create(&cl->opts));
    NATS_TRY(natsOptions_SetServers(cl->opts, urls, nurls));
    NATS_TRY(natsOptions_SetName(cl->opts, c->node));
    NATS_TRY(natsOptions_SetSendAsap(cl->opts, true));
    NATS_TRY(natsOptions_SetNoRandomize(cl->opts, false));
    NATS_TRY(natsOptions_SetTimeout(cl->opts, c->connect_timeout));
    NATS_TRY(natsOptions_SetMaxReconnect(cl->opts, -1));
    NATS_TRY(natsOptions_SetReconnectWait(cl->opts, c->reconnect_wait));
    NATS_TRY(natsOptions_SetReconnectBufSize(cl->opts, (int)c->reconnect_buffer));
    NATS_TRY(natsOptions_SetMaxPendingMsgs(cl->opts, c->max_pending_msgs));
    NATS_TRY(natsOptions_SetDisconnectedCB(cl->opts, on_disconnected, cl));
    NATS_TRY(natsOptions_SetReconnectedCB(cl->opts, on_reconnected, cl));
    NATS_TRY(natsOptions_SetErrorHandler(cl->opts, on_error, cl));
    NATS_TRY(natsOptions_SetClosedCB(cl->opts, on_closed, cl));
    if (c->token[0])
        NATS_TRY(natsOptions_SetToken(cl->opts, c->token));
    if (c->user[0])
        NATS_TRY(natsOptions_SetUserInfo(cl->opts, c->user, c->password));
    if (c->creds[0])
        NATS_TRY(natsOptions_SetUserCredentialsFromFiles(cl->opts, c->creds, NULL));
    if (c->nkey[0])
        NATS_TRY(natsOptions_SetNKeyFromSeed(cl->opts, c->nkey, c->nkey_seed));
    if (c->tls || c->tls_ca[0] || c->tls_cert[0])
        NATS_TRY(natsOptions_SetSecure(cl->opts, true));
    if (c->tls_ca[0])
        NATS_TRY(natsOptions_LoadCATrustedCertificates(cl->opts, c->tls_ca));
    if (c->tls_cert[0])
        NATS_TRY(natsOptions_LoadCertificatesChain(cl->opts, c->tls_cert, c->tls_key));
    cl->ev = ev_adapter_new(cl);
    if (!cl->ev) {
        snprintf(err, errlen, "cluster: out of memory");
        return -ENOMEM;
    }
    NATS_TRY(natsOptions_SetEventLoop(cl->opts, cl->ev, ev_attach, ev_read, ev_write, ev_detach));
    ev_timer_init(&cl->hb_w, hb_cb, 0., c->heartbeat / 1000.0);
    cl->hb_w.data = cl;
    ev_init(&cl->soon_w, soon_cb);
    cl->soon_w.data = cl;
    /* The first connect runs here, before the loop: a TCP connect and handshake bounded by
     * connect_timeout (host names are resolved here too). Once without retrying, so that
     * what the server or TLS refuses (credentials, a certificate, TLS on one side only)
     * stops start-up with its reason: libnats would give up on those in the background. A
     * server that is down (or silent) is retried in the background (RetryOnFailedConnect;
     * its first attempt is one more connect_timeout here): the hub starts without it. */
    NATS_TRY(natsOptions_SetRetryOnFailedConnect(cl->opts, false, NULL, NULL));
    natsStatus s = natsConnection_Connect(&cl->nc, cl->opts);
    if (s != NATS_OK && connect_refused(s, nats_why())) {
        const char *why = nats_why();
        if (s == NATS_CONNECTION_AUTH_FAILED || s == NATS_NOT_PERMITTED ||
            (why && (strcasestr(why, "authorization") || strcasestr(why, "authentication"))))
            snprintf(err, errlen, "cluster: NATS (%s) refused this node's credentials: %s", c->nats,
                     why ? why : natsStatus_GetText(s));
        else
            snprintf(err, errlen, "cluster: cannot connect to NATS (%s): %s", c->nats,
                     why ? why : natsStatus_GetText(s));
        return s == NATS_CONNECTION_AUTH_FAILED ? -EACCES : -EIO;
    }
    if (s != NATS_OK) {
        const char *why = nats_why();
        char reason[256];
        snprintf(reason, sizeof(reason), "%s", why ? why : natsStatus_GetText(s));
        NATS_TRY(natsOptions_SetRetryOnFailedConnect(cl->opts, true, on_connected, cl));
        s = natsConnection_Connect(&cl->nc, cl->opts);
        if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
            snprintf(err, errlen, "cluster: cannot connect to NATS (%s): %s", c->nats,
                     natsStatus_GetText(s));
            return -EIO;
        }
        if (s == NATS_NOT_YET_CONNECTED)
            hub_log(HUB_LOG_WARN,
                    "cluster: NATS (%s) not reachable yet (%s); node %s keeps trying (local "
                    "delivery works meanwhile)",
                    c->nats, reason, c->node);
    }
    if (s == NATS_OK) {
        atomic_store(&cl->connected, 1);
        char url[256] = "";
        natsConnection_GetConnectedUrl(cl->nc, url, sizeof(url));
        hub_log(HUB_LOG_NOTICE, "cluster: node %s (id %u) connected to NATS at %s", c->node,
                cl->nid, url);
    }
    s = natsConnection_SubscribeSync(&cl->relay_sub, cl->nc, cl->subj_relay);
    if (s == NATS_OK)
        s = natsConnection_SubscribeSync(&cl->direct_sub, cl->nc, cl->subj_direct);
    if (s == NATS_OK)
        s = natsConnection_SubscribeSync(&cl->hb_sub, cl->nc, cl->subj_hb);
    if (s != NATS_OK) {
        /* the server may refuse the credentials after Connect returned (libnats then closes
         * the connection from its own thread): say so rather than "connection closed" */
        const char *why = NULL;
        natsConnection_GetLastError(cl->nc, &why);
        if (why && (strcasestr(why, "authorization") || strcasestr(why, "authentication")))
            snprintf(err, errlen, "cluster: NATS (%s) refused this node's credentials: %s", c->nats,
                     why);
        else
            snprintf(err, errlen, "cluster: cannot subscribe on NATS (%s): %s", c->nats,
                     why && *why ? why : natsStatus_GetText(s));
        return -EIO;
    }
    send_heartbeat(cl, 0);
    ev_timer_again(cl->loop, &cl->hb_w);
    return 0;
}

static size_t cluster_drain(void *state)
{
    cluster *cl = state;
    if (!cl->enabled || !cl->nc)
        return 0;
    if (!cl->said_bye) {
        cl->said_bye = 1;
        send_heartbeat(cl, 1); /* the others drop us now rather than after node_timeout */
        cl->stopping = 1;
        ev_timer_stop(cl->loop, &cl->hb_w);
        ev_timer_stop(cl->loop, &cl->soon_w);
    }
    /* what is buffered for NATS goes out while the loop runs (if it is connected) */
    return atomic_load(&cl->connected) && natsConnection_Buffered(cl->nc) > 0 ? 1 : 0;
}

static void cluster_stop(void *state)
{
    cluster *cl = state;
    if (!cl->enabled)
        return;
    cl->stopping = 1;
    ev_timer_stop(cl->loop, &cl->hb_w);
    ev_timer_stop(cl->loop, &cl->soon_w);
    if (cl->nc) {
        /* Close first: with nothing buffered (drain waited for that) it does not flush, and a
         * flush would wait up to 500 ms for a PONG only this thread could read. The
         * subscriptions then go without an UNSUB each (the server drops them with us). */
        natsConnection_Close(cl->nc);
        for (cl_tag *t = cl->tags; t; t = t->next) {
            natsSubscription_Destroy(t->msub);
            natsSubscription_Destroy(t->usub);
            t->msub = t->usub = NULL;
        }
        natsSubscription *fixed[3] = {cl->relay_sub, cl->direct_sub, cl->hb_sub};
        for (int i = 0; i < 3; i++)
            natsSubscription_Destroy(fixed[i]);
        cl->relay_sub = cl->direct_sub = cl->hb_sub = NULL;
        natsConnection_Destroy(cl->nc);
        cl->nc = NULL;
    }
}

static void cluster_free(void *state)
{
    cluster *cl = state;
    if (!cl)
        return;
    cluster_stop(cl);
    for (cl_tag *t = cl->tags, *next; t; t = next) {
        next = t->next;
        hub_free(t);
    }
    for (cl_node *n = cl->nodes, *next; n; n = next) {
        next = n->next;
        node_tags_free(n);
        hub_free(n);
    }
    if (cl->opts) {
        natsOptions_Destroy(cl->opts);
        nats_CloseAndWait(2000); /* libnats' own threads end here */
    }
    ev_adapter_free(cl, cl->ev);
    streams_free(cl->sent);
    streams_free(cl->seen);
    rr_prune(cl, 0);
    hub_free(cl->rr);
    hub_free(cl->buf);
    hub_free(cl->inv);
    pthread_mutex_destroy(&cl->mu);
    hub_free(cl);
}

static size_t cluster_stats(void *state, hub_stat *out, size_t cap)
{
    cluster *cl = state;
    if (!cl->enabled)
        return 0;
    size_t n = 0;
#define PUT(nm, hl, g, v, lbl)                                                                     \
    do {                                                                                           \
        if (n < cap) {                                                                             \
            out[n] =                                                                               \
                (hub_stat){.name = (nm), .help = (hl), .gauge = (g), .worker = -1, .value = (v)};  \
            snprintf(out[n].label, sizeof(out[n].label), "%s", (lbl));                             \
        }                                                                                          \
        n++;                                                                                       \
    } while (0)
    char lbl[K_NKINDS][32];
    for (int k = 0; k < K_NKINDS; k++) {
        snprintf(lbl[k], sizeof(lbl[k]), "kind=\"%s\"", kind_names[k]);
        PUT("cluster_out", "messages this node published to the cluster", 0, GET(cl->out[k]),
            lbl[k]);
    }
    for (int k = 0; k < K_NKINDS; k++)
        PUT("cluster_in", "messages this node took from other nodes", 0, GET(cl->in[k]), lbl[k]);
    PUT("cluster_bytes_out", "bytes published to the cluster (envelopes included)", 0,
        GET(cl->bytes_out), "");
    PUT("cluster_bytes_in", "bytes taken from other nodes (envelopes included)", 0,
        GET(cl->bytes_in), "");
    PUT("cluster_publish_failed",
        "messages not published: NATS reconnect buffer full, max_pending, too large, stopping", 0,
        GET(cl->publish_failed), "");
    PUT("cluster_slow_dropped",
        "messages NATS dropped at this node's subscriptions (pending limit; as of the last "
        "heartbeat)",
        0, GET(cl->slow_dropped), "");
    PUT("cluster_gaps",
        "messages of another node's relays, multicasts or messages to this node that never "
        "came (numbering gaps: NATS had no interest yet, or dropped them)",
        0, GET(cl->gaps), "");
    PUT("cluster_unicast_lost",
        "unicasts that reached this node after its last member left, with no other node to "
        "take them",
        0, GET(cl->unicast_lost), "");
    PUT("cluster_unicast_rerouted",
        "unicasts sent here after this node's last member left, passed on to the queue group", 0,
        GET(cl->unicast_rerouted), "");
    PUT("cluster_direct_unknown", "send/tag/close by id for an id this node does not hold", 0,
        GET(cl->direct_unknown), "");
    PUT("cluster_to_script",
        "messages from other nodes handed to this node's script ([cluster] script = yes)", 0,
        GET(cl->to_script), "");
    PUT("cluster_script_dropped",
        "messages from other nodes dropped before the script: its worker's queue full "
        "(worker_queue), shutting down, or no memory",
        0, GET(cl->script_dropped), "");
    PUT("cluster_bad_messages", "messages on cluster subjects that were not evhub's", 0,
        GET(cl->bad_messages), "");
    PUT("cluster_reconnects", "reconnections to NATS", 0, GET(cl->reconnects), "");
    PUT("cluster_disconnects", "connections to NATS lost", 0, GET(cl->disconnects), "");
    PUT("cluster_id_conflicts", "heartbeats of another node with this node's id", 0,
        GET(cl->id_conflicts), "");
    PUT("cluster_connected", "1 while connected to NATS", 1, (uint64_t)atomic_load(&cl->connected),
        "");
    PUT("cluster_nodes", "other nodes seen within node_timeout", 1,
        (uint64_t)atomic_load(&cl->nnodes), "");
#undef PUT
    return n;
}

const hub_module cluster_module = {
    .name = "cluster",
    .sections = cluster_sections,
    .init = cluster_init,
    .start = cluster_start,
    .drain = cluster_drain,
    .stop = cluster_stop,
    .free = cluster_free,
    .stats = cluster_stats,
    .fns = cluster_fns,
};
