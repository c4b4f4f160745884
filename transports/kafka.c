/* The kafka module: librdkafka producers for scripts (kafka.publish, KSR.kafka.send/send_key)
 * and for kafka: subscribers of the event interface, as OpenSIPS event_kafka and Asterisk
 * res_kafka, without their poll thread, sleeps and blocking flushes.
 *
 * Everything librdkafka hands back (delivery reports, errors, logs, statistics) is served on
 * the loop thread: each producer's main queue writes a byte to a non-blocking pipe when it
 * becomes non-empty (rd_kafka_queue_io_event_enable), an ev_io watches the pipe and calls
 * rd_kafka_poll(rk, 0), and a 1 s timer polls as a backstop. Producers are made on first use
 * (or at start with connect = eager) and are made and dropped on the loop thread. A worker's
 * publish goes to librdkafka from the worker itself (rd_kafka_producev is thread-safe) when the
 * producer is up and nothing of its connection waits on the loop; otherwise it is handed to
 * the loop through the mailbox, behind what waits. QUEUE_FULL puts the message on the
 * connection's retry list, tried again from a timer a bounded number of times; the loop never
 * waits for librdkafka. Every message accepted ends delivered or reported failed, once, and
 * the counters say which: produced = delivered + failed + in flight. */
#define _GNU_SOURCE /* pipe2, pthread_rwlockattr_setkind_np */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ev.h>
#include <json-c/json.h>
#include <librdkafka/rdkafka.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/core.h"
#include "hub/log.h"
#include "transports/events.h"
#include "transports/kafka.h"

#define BACKSTOP_S    1.0    /* a poll every second whatever the fd says */
#define STATS_MS      "5000" /* statistics.interval.ms unless set: broker states for evhubctl */
#define IO_DRAIN_MAX  64     /* reads of the wake-up pipe per wake */
#define DEF_BROKERS   "localhost:9092"
#define DEF_CLIENT_ID "evhub"
#define WHY_STOPPED   "the hub stopped before it was delivered"

/* ---- config ---- */

static const char *const connect_modes[] = {"lazy", "eager", NULL};

/* [kafka] (broker lines, kemi_broker, and the defaults of its lines and of kafka: sockets) and
 * [kafka:NAME] (one connection, res_kafka's keys) share one row table; init refuses a key in
 * the section it does not belong to. Numbers left 0 / strings left empty were not given. */
typedef struct kafka_conf {
    hub_conf_list broker;
    char kemi_broker[TR_KAFKA_ID_MAX + 1];
    int connect;
    int max_in_flight;
    int queue_full_retries;
    int queue_full_interval;
    char brokers[192];
    char topic[192];
    char client_id[128];
    int message_max_bytes;
    int request_timeout_ms;
    int message_timeout_ms;
    hub_conf_list g, t;
} kafka_conf;

static const hub_conf_row kafka_rows[] = {
    HUB_CONF_ROW(kafka_conf, "broker", HUB_CONF_LIST, broker, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "kemi_broker", HUB_CONF_STRING, kemi_broker, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "connect", HUB_CONF_ENUM, connect, 0, 0, connect_modes, "lazy"),
    HUB_CONF_ROW(kafka_conf, "max_in_flight", HUB_CONF_INT, max_in_flight, 1, 100000000, NULL,
                 "200000"),
    HUB_CONF_ROW(kafka_conf, "queue_full_retries", HUB_CONF_INT, queue_full_retries, 0, 100000,
                 NULL, "10"),
    HUB_CONF_ROW(kafka_conf, "queue_full_interval", HUB_CONF_INT, queue_full_interval, 1, 60000,
                 NULL, "50"),
    HUB_CONF_ROW(kafka_conf, "brokers", HUB_CONF_STRING, brokers, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "topic", HUB_CONF_STRING, topic, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "client_id", HUB_CONF_STRING, client_id, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "message_max_bytes", HUB_CONF_INT, message_max_bytes, 1, 1000000000,
                 NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "request_timeout_ms", HUB_CONF_INT, request_timeout_ms, 1, 900000,
                 NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "message_timeout_ms", HUB_CONF_INT, message_timeout_ms, 1, 2147483647,
                 NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "g.", HUB_CONF_LIST, g, 0, 0, NULL, NULL),
    HUB_CONF_ROW(kafka_conf, "t.", HUB_CONF_LIST, t, 0, 0, NULL, NULL),
    {.name = NULL},
};

static const hub_conf_section kafka_sections[] = {
    {"kafka", 1, sizeof(kafka_conf), kafka_rows},
    {NULL, 0, 0, NULL},
};

/* ---- parsing (pure) ---- */

static int fail_at(char *err, size_t errlen, const char *who, const char *why)
{
    snprintf(err, errlen, "%s: %s", who, why);
    return -EINVAL;
}

static int topic_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 249)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static int id_ok(const char *s, size_t n)
{
    if (n == 0 || n > TR_KAFKA_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* "brokers/topic[?props]" in u->buf from p on; uri: key=callid is allowed. */
static int parse_rest(char *p, tr_kafka_uri *u, int uri, const char *who, char *err, size_t errlen)
{
    char *slash = strchr(p, '/');
    if (!slash || slash == p)
        return fail_at(err, errlen, who, "expected BROKERS/TOPIC (host:port[,host:port...]/topic)");
    *slash = '\0';
    if (strpbrk(p, " \t?&="))
        return fail_at(err, errlen, who, "the brokers hold a blank, '?', '&' or '='");
    u->brokers = p;
    char *topic = slash + 1, *q = strchr(topic, '?');
    if (q)
        *q = '\0';
    if (strchr(topic, '/'))
        return fail_at(err, errlen, who, "a second '/' (expected BROKERS/TOPIC)");
    if (!topic_ok(topic))
        return fail_at(err, errlen, who,
                       "the topic must be 1..249 of [A-Za-z0-9._-] (Kafka's topic names)");
    u->topic = topic;
    if (!q)
        return 0;
    char *o = q + 1;
    if (!*o)
        return fail_at(err, errlen, who, "nothing after '?'");
    for (int i = 0; i <= TR_KAFKA_PROPS_MAX && o; i++) {
        char *amp = strchr(o, '&'), *eq;
        if (amp)
            *amp = '\0';
        eq = strchr(o, '=');
        if (!eq || eq == o || !eq[1])
            return fail_at(err, errlen, who, "a property needs NAME=VALUE");
        *eq = '\0';
        if (uri && !strcmp(o, "key")) {
            if (strcmp(eq + 1, "callid") != 0)
                return fail_at(err, errlen, who, "key: only key=callid is known");
            u->key_callid = 1;
        } else if ((o[0] == 'g' || o[0] == 't') && o[1] == '.' && o[2]) {
            if (u->nprops == TR_KAFKA_PROPS_MAX)
                return fail_at(err, errlen, who, "more than 32 properties");
            for (int j = 0; j < u->nprops; j++) {
                if (!strcmp(u->props[j].name, o)) {
                    char why[160];
                    snprintf(why, sizeof(why), "'%.64s' given twice", o);
                    return fail_at(err, errlen, who, why);
                }
            }
            u->props[u->nprops].name = o;
            u->props[u->nprops].value = eq + 1;
            u->nprops++;
        } else {
            char why[160];
            snprintf(why, sizeof(why),
                     "'%.64s': a property starts with g. (global) or t. (topic)%s", o,
                     uri ? ", or is key=callid" : "");
            return fail_at(err, errlen, who, why);
        }
        o = amp ? amp + 1 : NULL;
    }
    if (o)
        return fail_at(err, errlen, who, "more than 32 properties");
    return 0;
}

int tr_kafka_broker_parse(const char *line, tr_kafka_uri *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof(*u));
    if (!line || strlen(line) > TR_KAFKA_TEXT_MAX)
        return fail_at(err, errlen, "broker", "missing or too long");
    memcpy(u->buf, line, strlen(line) + 1);
    char *p = u->buf;
    if (*p != '[')
        return fail_at(err, errlen, "broker", "expected [ID]BROKERS/TOPIC[?PROPS]");
    char *close = strchr(p, ']');
    if (!close || !id_ok(p + 1, (size_t)(close - p - 1)))
        return fail_at(err, errlen, "broker",
                       "the [ID] must be 1..43 letters, digits, '_' or '-', in brackets");
    memcpy(u->id, p + 1, (size_t)(close - p - 1));
    u->id[close - p - 1] = '\0';
    return parse_rest(close + 1, u, 0, "broker", err, errlen);
}

int tr_kafka_prop_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *err,
                      size_t errlen)
{
    char why[512];
    rd_kafka_conf_res_t r;
    if ((name[0] != 'g' && name[0] != 't') || name[1] != '.' || !name[2]) {
        snprintf(err, errlen, "%s: a property starts with g. (global) or t. (topic)", name);
        return -EINVAL;
    }
    if (name[0] == 't') {
        /* checked as a topic property; set on conf, where it joins the default topic conf */
        rd_kafka_topic_conf_t *tc = rd_kafka_topic_conf_new();
        r = rd_kafka_topic_conf_set(tc, name + 2, value, why, sizeof(why));
        rd_kafka_topic_conf_destroy(tc);
        if (r == RD_KAFKA_CONF_OK)
            r = rd_kafka_conf_set(conf, name + 2, value, why, sizeof(why));
    } else {
        r = rd_kafka_conf_set(conf, name + 2, value, why, sizeof(why));
    }
    if (r != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "%.100s = %.200s: %.200s", name, value, why);
        return -EINVAL;
    }
    return 0;
}

/* Check a URI's properties on a throw-away conf (memory only). */
static int uri_props_check(const tr_kafka_uri *u, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    int rc = 0;
    for (int i = 0; i < u->nprops && rc == 0; i++)
        rc = tr_kafka_prop_set(conf, u->props[i].name, u->props[i].value, err, errlen);
    rd_kafka_conf_destroy(conf);
    return rc;
}

int tr_kafka_uri_parse(const char *uri, tr_kafka_uri *u, char *err, size_t errlen)
{
    char why[600];
    memset(u, 0, sizeof(*u));
    if (!uri || strncmp(uri, "kafka:", 6) != 0)
        return fail_at(err, errlen, "kafka: socket", "it must start with kafka:");
    if (strlen(uri) > TR_KAFKA_TEXT_MAX)
        return fail_at(err, errlen, "kafka: socket", "too long");
    memcpy(u->buf, uri + 6, strlen(uri + 6) + 1);
    if (parse_rest(u->buf, u, 1, "kafka: socket", err, errlen) < 0)
        return -EINVAL;
    if (uri_props_check(u, why, sizeof(why)) < 0)
        return fail_at(err, errlen, "kafka: socket", why);
    return 0;
}

/* ---- state ---- */

typedef struct kafka_state kafka_state;
typedef struct kconn kconn;

/* One message in librdkafka's hands (its msg_opaque): who to tell. */
typedef struct kmsg {
    struct kmsg *prev, *next;
    uint64_t token;     /* 0: no report function */
    tr_delivery *d;     /* a kafka: subscriber's delivery, or NULL */
    hub_ctl_call *call; /* evhubctl kafka send, or NULL */
    /* With a report function or a send: copies of what the report tells, for a failure the
     * hub reports itself (the producer dropped: stop, fatal error, unsubscribe) */
    char *topic, *key, *msg; /* into data, or NULL */
    size_t klen, len;
    char data[];
} kmsg;

/* A message not (yet) in librdkafka's hands: a worker's publish on its way to the loop, or one
 * waiting out QUEUE_FULL on the retry list. Owns copies of everything. */
typedef struct kjob {
    struct kjob *next;
    kconn *c;
    uint64_t token;
    tr_delivery *d;
    hub_ctl_call *call;
    rd_kafka_headers_t *hdrs; /* owned until librdkafka takes it */
    int32_t partition;
    int has_key;
    unsigned tick;     /* the retry tick it started waiting at */
    int qfull_counted; /* met QUEUE_FULL and already counted in qfull */
    size_t topic_len, key_len, len;
    char *topic, *key, *payload; /* into data, NUL-terminated */
    char data[];
} kjob;

enum { K_IDLE, K_CONNECTING, K_UP, K_DOWN, K_FAILED };
static const char *const kstate_names[] = {"idle", "connecting", "up", "down", "failed"};

/* A connection ([kafka:NAME] or a broker line) or a kafka: socket: its settings and, once
 * made, its producer. Settings never change after init (workers read them). The loop thread
 * makes and drops the producer, serves its queue and owns the retry list, the watchers, state
 * and last_error. Workers share four things with it, for their direct publishes (produce_fast):
 *  - rk, read by a worker only under rk_lock held for reading, for the whole check-and-produce;
 *    the loop sets or clears rk and q under it held for writing, so no worker is inside
 *    librdkafka on a handle that prod_drop hands to a reaper;
 *  - out and nout, under out_mu: a worker inserts, the loop removes (reports) and walks
 *    (prod_drop); nout is atomic too, for readers that need no list;
 *  - jobs and fatal, atomics the worker reads before it tries: while a job of this connection
 *    is alive (posted, on the retry list) or the producer is fatally failed, a worker's message
 *    takes the loop's path, behind them;
 *  - the counters. */
struct kconn {
    kafka_state *ks;
    kconn *next; /* sockets: the module's list */
    int is_sock;
    char name[TR_KAFKA_TEXT_MAX + 8]; /* the id, or the socket's URI */
    char brokers[TR_KAFKA_TEXT_MAX + 1];
    char topic[256]; /* default topic ("" : none) */
    rd_kafka_conf_t *conf;
    json_object *settings; /* for evhubctl kafka connection */
    int eager, max_in_flight, retries, interval_ms;
    int key_callid; /* a kafka: socket with key=callid */
    size_t max_bytes;
    char file[HUB_PATH_MAX];
    int line;

    pthread_rwlock_t rk_lock; /* guards rk and q against prod_drop (writer-preferring) */
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    int pipe_r, pipe_w;
    ev_io io;
    ev_timer backstop, retry;
    pthread_mutex_t out_mu;
    kmsg out; /* the messages librdkafka holds: a ring with out as its head (out_mu) */
    atomic_size_t nout;
    atomic_size_t jobs;      /* kjobs alive: posted to the loop or on the retry list */
    kjob *rq_head, *rq_tail; /* the retry list */
    size_t rq_n;
    unsigned ticks;
    int state;
    int serving;      /* rd_kafka_poll is running on the loop: no drop, no nested poll */
    atomic_int fatal; /* librdkafka's fatal error: the producer is to be made anew */
    int locks;        /* rk_lock and out_mu made (conn_free destroys them) */
    char last_error[256];
    json_object *brokers_view; /* the last statistics' brokers */
    double stats_at;

    atomic_uint_fast64_t produced, delivered, failed, refused, qfull, errors, fatals;
};

typedef struct reaper {
    struct reaper *next;
    pthread_t thread;
    rd_kafka_t *rk;
} reaper;

struct kafka_state {
    hub *h;
    struct ev_loop *loop;
    kconn **conns; /* [kafka:NAME] and broker lines, in file order; fixed after init */
    size_t nconns;
    kconn *kemi;         /* KSR.kafka's connection, or NULL */
    kconn *socks;        /* kafka: sockets */
    kafka_conf defaults; /* [kafka]'s, for broker lines and sockets */
    reaper *reapers;
    atomic_int stopped;
    int scheme_added;
};

/* ---- connections ---- */

static void conn_settings_add(kconn *c, const char *k, const char *v)
{
    json_object_object_add(c->settings, k, json_object_new_string(v));
}

static int set_or_fail(kconn *c, const char *name, const char *value, char *err, size_t errlen)
{
    char why[512];
    if (tr_kafka_prop_set(c->conf, name, value, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "%s", why);
        return -EINVAL;
    }
    conn_settings_add(c, name, value);
    return 0;
}

static void conn_free(kconn *c)
{
    if (!c)
        return;
    if (c->conf)
        rd_kafka_conf_destroy(c->conf);
    json_object_put(c->settings);
    json_object_put(c->brokers_view);
    if (c->locks) {
        pthread_rwlock_destroy(&c->rk_lock);
        pthread_mutex_destroy(&c->out_mu);
    }
    hub_free(c);
}

/* The locks a worker's direct publish shares with the loop. rk_lock prefers writers: workers
 * publishing back to back could otherwise keep the loop's prod_drop waiting. */
static int conn_locks(kconn *c)
{
    pthread_rwlockattr_t ra;
    if (pthread_rwlockattr_init(&ra) != 0)
        return -ENOMEM;
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(&c->rk_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    if (rc != 0)
        return -rc;
    rc = pthread_mutex_init(&c->out_mu, NULL);
    if (rc != 0) {
        pthread_rwlock_destroy(&c->rk_lock);
        return -rc;
    }
    c->locks = 1;
    return 0;
}

static kconn *conn_new(kafka_state *ks, const char *name, int is_sock, const kafka_conf *d)
{
    kconn *c = hub_calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->ks = ks;
    c->is_sock = is_sock;
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->conf = rd_kafka_conf_new();
    c->settings = json_object_new_object();
    c->pipe_r = c->pipe_w = -1;
    c->out.next = c->out.prev = &c->out;
    c->eager = d->connect == 1;
    c->max_in_flight = d->max_in_flight;
    c->retries = d->queue_full_retries;
    c->interval_ms = d->queue_full_interval;
    ev_io_init(&c->io, NULL, -1, EV_READ);
    ev_timer_init(&c->backstop, NULL, BACKSTOP_S, BACKSTOP_S);
    ev_timer_init(&c->retry, NULL, 0, 0);
    if (!c->conf || !c->settings || conn_locks(c) < 0) {
        conn_free(c);
        return NULL;
    }
    return c;
}

/* Read message.max.bytes back from the conf (what librdkafka will enforce). */
static void conn_limits(kconn *c)
{
    char v[32];
    size_t n = sizeof(v);
    c->max_bytes = 1000000;
    if (rd_kafka_conf_get(c->conf, "message.max.bytes", v, &n) == RD_KAFKA_CONF_OK)
        c->max_bytes = (size_t)strtoul(v, NULL, 10);
}

/* The settings every conf starts with; the user's properties come after and win. */
static int conn_base(kconn *c, const char *brokers, const char *topic, char *err, size_t errlen)
{
    snprintf(c->brokers, sizeof(c->brokers), "%s", brokers);
    snprintf(c->topic, sizeof(c->topic), "%s", topic);
    conn_settings_add(c, "brokers", brokers);
    conn_settings_add(c, "topic", topic);
    char why[512];
    if (rd_kafka_conf_set(c->conf, "bootstrap.servers", brokers, why, sizeof(why)) ||
        rd_kafka_conf_set(c->conf, "statistics.interval.ms", STATS_MS, why, sizeof(why))) {
        snprintf(err, errlen, "brokers = %s: %s", brokers, why);
        return -EINVAL;
    }
    return 0;
}

/* ---- reports ---- */

static uint64_t in_flight(kconn *c)
{
    uint64_t p = atomic_load(&c->produced), d = atomic_load(&c->delivered),
             f = atomic_load(&c->failed);
    return p >= d + f ? p - d - f : 0;
}

/* One message ended: tell whoever waits (a report function, a subscriber's delivery, an
 * evhubctl send) and count it. Loop thread. */
static void report(kconn *c, uint64_t token, tr_delivery *d, hub_ctl_call *call, int ok,
                   const char *error, const char *topic, int32_t partition, int64_t offset,
                   const char *key, size_t klen, const char *msg, size_t len)
{
    atomic_fetch_add(ok ? &c->delivered : &c->failed, 1);
    if (token) {
        /* r = {id=, status=, key=, msg=, error=, topic=, partition=, offset=} */
        hub_field f[8];
        size_t n = 0;
        f[n++] = (hub_field){"id", HUB_FIELD_STR, c->name, strlen(c->name), 0};
        f[n++] = (hub_field){"status", HUB_FIELD_INT, NULL, 0, ok ? 0 : -1};
        if (key)
            f[n++] = (hub_field){"key", HUB_FIELD_STR, key, klen, 0};
        f[n++] = (hub_field){"msg", HUB_FIELD_STR, msg ? msg : "", msg ? len : 0, 0};
        if (!ok) {
            const char *e = error ? error : "failed";
            f[n++] = (hub_field){"error", HUB_FIELD_STR, e, strlen(e), 0};
        }
        if (topic)
            f[n++] = (hub_field){"topic", HUB_FIELD_STR, topic, strlen(topic), 0};
        if (partition >= 0)
            f[n++] = (hub_field){"partition", HUB_FIELD_INT, NULL, 0, partition};
        if (ok && offset >= 0)
            f[n++] = (hub_field){"offset", HUB_FIELD_INT, NULL, 0, offset};
        hub_complete_fields(c->ks->h, token, 0, f, n); /* copied */
    }
    if (d)
        tr_delivery_done(d, ok ? 0 : -1, error);
    if (call) {
        if (ok) {
            json_object *r = json_object_new_object();
            json_object_object_add(r, "status", json_object_new_string("delivered"));
            json_object_object_add(r, "topic", json_object_new_string(topic ? topic : ""));
            json_object_object_add(r, "partition", json_object_new_int(partition));
            json_object_object_add(r, "offset", json_object_new_int64(offset));
            hub_ctl_reply(call, r);
        } else {
            hub_ctl_fail(call, HUB_CTL_FAILED, "not delivered: %s", error ? error : "failed");
        }
    }
}

/* A job ends (handed to librdkafka, or reported failed): from now on it holds back no worker's
 * direct publish, so jobs drops only after librdkafka has taken the message or its failure was
 * reported. Any thread (a worker whose post failed). */
static void job_free(kjob *j)
{
    kconn *c = j->c;
    if (j->hdrs)
        rd_kafka_headers_destroy(j->hdrs);
    hub_free(j);
    atomic_fetch_sub(&c->jobs, 1);
}

static void job_fail(kjob *j, const char *why)
{
    report(j->c, j->token, j->d, j->call, 0, why, j->topic, -1, -1, j->has_key ? j->key : NULL,
           j->key_len, j->payload, j->len);
    job_free(j);
}

static kjob *job_new(kconn *c, const char *topic, const char *key, size_t klen, const char *msg,
                     size_t len)
{
    size_t tl = strlen(topic);
    kjob *j = hub_malloc(sizeof(*j) + tl + 1 + klen + 1 + len + 1);
    if (!j)
        return NULL;
    memset(j, 0, sizeof(*j));
    j->c = c;
    j->partition = RD_KAFKA_PARTITION_UA;
    j->topic = j->data;
    memcpy(j->topic, topic, tl + 1);
    j->topic_len = tl;
    j->key = j->topic + tl + 1;
    if (key)
        memcpy(j->key, key, klen);
    j->key[klen] = '\0';
    j->key_len = klen;
    j->has_key = key != NULL;
    j->payload = j->key + klen + 1;
    memcpy(j->payload, msg, len);
    j->payload[len] = '\0';
    j->len = len;
    atomic_fetch_add(&c->jobs, 1); /* before anyone can see j: job_free undoes it */
    return j;
}

/* ---- the producer ---- */

static void io_cb(struct ev_loop *loop, ev_io *w, int revents);
static void backstop_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void *reaper_main(void *arg)
{
    reaper *r = arg;
    rd_kafka_destroy(r->rk); /* joins librdkafka's threads: not on the loop */
    return NULL;
}

/* c->out gets km before librdkafka does: a worker's message can be delivered, and its report
 * served on the loop, before the worker's rd_kafka_producev returns. */
static void out_insert(kconn *c, kmsg *km)
{
    pthread_mutex_lock(&c->out_mu);
    km->next = &c->out;
    km->prev = c->out.prev;
    c->out.prev->next = km;
    c->out.prev = km;
    atomic_fetch_add(&c->nout, 1);
    pthread_mutex_unlock(&c->out_mu);
}

static void out_remove(kconn *c, kmsg *km)
{
    pthread_mutex_lock(&c->out_mu);
    km->prev->next = km->next;
    km->next->prev = km->prev;
    atomic_fetch_sub(&c->nout, 1);
    pthread_mutex_unlock(&c->out_mu);
}

/* Fail what librdkafka holds for c (its reports will never be served), then let the producer
 * go: its queue detached here, the handle destroyed by a thread of its own (joined at stop).
 * Loop thread. Once rk_lock is ours for writing no worker is inside librdkafka on rk, and with
 * rk cleared none will be: what c->out holds then is all rk will ever have had of ours. */
static void prod_drop(kconn *c, const char *why)
{
    kafka_state *ks = c->ks;
    kmsg lost;
    size_t n;
    pthread_rwlock_wrlock(&c->rk_lock);
    rd_kafka_t *rk = c->rk;
    rd_kafka_queue_t *q = c->q;
    c->rk = NULL;
    c->q = NULL;
    pthread_mutex_lock(&c->out_mu);
    n = atomic_exchange(&c->nout, 0);
    if (n) { /* the ring moves to lost, head and all */
        lost.next = c->out.next;
        lost.prev = c->out.prev;
        lost.next->prev = lost.prev->next = &lost;
    } else {
        lost.next = lost.prev = &lost;
    }
    c->out.next = c->out.prev = &c->out;
    pthread_mutex_unlock(&c->out_mu);
    pthread_rwlock_unlock(&c->rk_lock);
    if (rk) { /* the producer goes first: a report below may start another (prod_start) */
        ev_io_stop(ks->loop, &c->io);
        ev_timer_stop(ks->loop, &c->backstop);
        rd_kafka_queue_io_event_enable(q, -1, NULL, 0);
        rd_kafka_queue_destroy(q); /* before rd_kafka_destroy, or it blocks */
        close(c->pipe_r);
        close(c->pipe_w);
        c->pipe_r = c->pipe_w = -1;
        reaper *r = hub_calloc(1, sizeof(*r));
        if (r) {
            r->rk = rk;
            if (pthread_create(&r->thread, NULL, reaper_main, r) == 0) {
                r->next = ks->reapers;
                ks->reapers = r;
                r = NULL;
            }
        }
        if (r) { /* no thread: destroyed here, the loop waits this once */
            rd_kafka_destroy(rk);
            hub_free(r);
        }
        c->state = K_IDLE;
        atomic_store(&c->fatal, 0); /* before a new rk is published (under rk_lock) */
    }
    /* reported outside the locks (no worker waits on the loop's reports) and once c is
     * whole again */
    for (size_t bound = n; bound > 0 && lost.next != &lost; bound--) {
        kmsg *m = lost.next;
        lost.next = m->next;
        report(c, m->token, m->d, m->call, 0, why, m->topic, -1, -1, m->key, m->klen, m->msg,
               m->len);
        hub_free(m);
    }
    if (n)
        hub_log(HUB_LOG_WARN, "kafka: %s: %zu message(s) reported failed: %s", c->name, n, why);
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    kconn *c = opaque;
    kmsg *km = m->_private;
    (void)rk;
    if (!km)
        return;
    out_remove(c, km);
    int ok = m->err == RD_KAFKA_RESP_ERR_NO_ERROR;
    if (ok && c->state != K_FAILED)
        c->state = K_UP;
    const char *why = ok ? NULL : rd_kafka_err2str(m->err);
    if (!ok)
        snprintf(c->last_error, sizeof(c->last_error), "%s", why);
    report(c, km->token, km->d, km->call, ok, why, m->rkt ? rd_kafka_topic_name(m->rkt) : NULL,
           m->partition, m->offset, m->key, m->key_len, km->token ? m->payload : NULL,
           km->token ? m->len : 0);
    hub_free(km);
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    kconn *c = opaque;
    atomic_fetch_add(&c->errors, 1);
    snprintf(c->last_error, sizeof(c->last_error), "%s", reason);
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char why[256];
        rd_kafka_fatal_error(rk, why, sizeof(why));
        snprintf(c->last_error, sizeof(c->last_error), "fatal: %.240s", why);
        hub_log(HUB_LOG_ERR, "kafka: %s: fatal error: %s; the producer is made anew", c->name, why);
        atomic_fetch_add(&c->fatals, 1);
        atomic_store(&c->fatal, 1); /* workers' messages take the loop's path from now on */
        c->state = K_FAILED;
        return;
    }
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        if (c->state != K_DOWN)
            hub_log(HUB_LOG_WARN,
                    "kafka: %s: all brokers are down (%s); messages wait up to "
                    "message.timeout.ms",
                    c->name, reason);
        c->state = K_DOWN;
        return;
    }
    hub_log(HUB_LOG_INFO, "kafka: %s: %s", c->name, reason);
}

static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    kconn *c = rd_kafka_opaque(rk);
    int l = level <= 3   ? HUB_LOG_ERR
            : level == 4 ? HUB_LOG_WARN
            : level == 5 ? HUB_LOG_NOTICE
            : level == 6 ? HUB_LOG_INFO
                         : HUB_LOG_DEBUG;
    hub_log(l, "kafka: %s: librdkafka %s: %s", c ? c->name : "?", fac, buf);
}

/* The brokers' part of librdkafka's statistics, kept for evhubctl kafka connection. */
static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    kconn *c = opaque;
    (void)rk;
    json_tokener *tok = json_tokener_new();
    json_object *o = tok ? json_tokener_parse_ex(tok, json, (int)len) : NULL, *b;
    json_tokener_free(tok);
    if (o && json_object_object_get_ex(o, "brokers", &b)) {
        json_object *view = json_object_new_array();
        json_object_object_foreach(b, name, br)
        {
            json_object *v = json_object_new_object(), *x;
            json_object_object_add(v, "name", json_object_new_string(name));
            static const char *const keep[] = {"nodeid",           "state", "outbuf_msg_cnt",
                                               "waitresp_msg_cnt", "tx",    "txerrs",
                                               "connects"};
            for (size_t i = 0; i < sizeof(keep) / sizeof(keep[0]); i++) {
                if (json_object_object_get_ex(br, keep[i], &x))
                    json_object_object_add(v, keep[i], json_object_get(x));
            }
            json_object_array_add(view, v);
        }
        json_object_put(c->brokers_view);
        c->brokers_view = view;
        c->stats_at = ev_now(c->ks->loop);
    }
    json_object_put(o);
    return 0; /* librdkafka frees json */
}

/* Make c's producer if it has none (loop thread). 0, or <0 with err set. */
static int prod_start(kconn *c, char *err, size_t errlen)
{
    kafka_state *ks = c->ks;
    char why[512];
    if (c->rk && atomic_load(&c->fatal) && !c->serving)
        prod_drop(c, c->last_error); /* librdkafka said: make a new instance */
    if (c->rk)
        return 0;
    rd_kafka_conf_t *conf = rd_kafka_conf_dup(c->conf);
    if (!conf || rd_kafka_conf_set(conf, "log.queue", "true", why, sizeof(why))) {
        if (conf)
            rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot make the producer's config");
        return -ENOMEM;
    }
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_log_cb(conf, log_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof(why));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot create the producer: %s", why);
        snprintf(c->last_error, sizeof(c->last_error), "%s", err);
        return -EINVAL;
    }
    /* conf now owned by rk */
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) { /* both ends non-blocking (librdkafka#2932) */
        snprintf(err, errlen, "cannot create the producer's pipe: %s", strerror(errno));
        rd_kafka_destroy(rk);
        return -errno;
    }
    rd_kafka_set_log_queue(rk, NULL); /* logs come through the main queue: the loop */
    rd_kafka_queue_t *q = rd_kafka_queue_get_main(rk);
    c->pipe_r = fds[0];
    c->pipe_w = fds[1];
    rd_kafka_queue_io_event_enable(q, c->pipe_w, "1", 1);
    pthread_rwlock_wrlock(&c->rk_lock); /* published: workers may produce on it from here */
    c->rk = rk;
    c->q = q;
    pthread_rwlock_unlock(&c->rk_lock);
    ev_io_init(&c->io, io_cb, c->pipe_r, EV_READ);
    c->io.data = c;
    ev_io_start(ks->loop, &c->io);
    ev_timer_init(&c->backstop, backstop_cb, BACKSTOP_S, BACKSTOP_S);
    c->backstop.data = c;
    ev_timer_start(ks->loop, &c->backstop);
    c->state = K_CONNECTING;
    hub_log(HUB_LOG_INFO, "kafka: %s: producer made (%s)", c->name, c->brokers);
    return 0;
}

/* Every report, error, log and statistics queued, unless a poll is under way: then this is
 * called from inside one of its callbacks, and the outer poll goes on. */
static void poll_queue(kconn *c)
{
    if (c->serving || !c->rk)
        return;
    c->serving = 1;
    rd_kafka_poll(c->rk, 0);
    c->serving = 0;
}

static void serve(kconn *c)
{
    if (c->serving)
        return; /* no drop inside a poll: its queue and handle are in use */
    poll_queue(c);
    /* A fatal error: librdkafka purges what it holds, each with its report; once they are
     * all in, the producer goes (or at the next publish, which fails what is left). */
    if (atomic_load(&c->fatal) && atomic_load(&c->nout) == 0)
        prod_drop(c, c->last_error);
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    kconn *c = w->data;
    char buf[256];
    (void)loop;
    (void)revents;
    for (int i = 0; i < IO_DRAIN_MAX && read(c->pipe_r, buf, sizeof(buf)) > 0; i++)
        ;
    serve(c); /* after each wake-up the queue must be served, or no more come */
}

static void backstop_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    serve(w->data);
}

/* ---- producing ---- */

/* Hand one message to librdkafka: the loop thread, or a worker holding rk_lock for reading
 * with c->rk set. 0, or librdkafka's error (then nothing was taken: hdrs and everything else
 * stay the caller's). */
static rd_kafka_resp_err_t try_produce(kconn *c, const char *topic, int32_t partition,
                                       const char *key, size_t klen, const char *msg, size_t len,
                                       rd_kafka_headers_t *hdrs, uint64_t token, tr_delivery *d,
                                       hub_ctl_call *call)
{
    int keep = token || call;
    size_t tl = strlen(topic);
    kmsg *km = hub_malloc(sizeof(*km) + (keep ? tl + 1 + klen + len : 0));
    if (!km)
        return RD_KAFKA_RESP_ERR__FAIL; /* out of memory: "Local: Failed" */
    km->token = token;
    km->d = d;
    km->call = call;
    km->topic = km->key = km->msg = NULL;
    km->klen = km->len = 0;
    if (keep) {
        km->topic = km->data;
        memcpy(km->topic, topic, tl + 1);
        km->msg = km->topic + tl + 1;
        memcpy(km->msg, msg, len);
        km->len = len;
        if (key) {
            km->key = km->msg + len;
            memcpy(km->key, key, klen);
            km->klen = klen;
        }
    }
    out_insert(c, km);
    rd_kafka_resp_err_t e;
    if (hdrs)
        e = rd_kafka_producev(c->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(partition),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_VALUE((void *)msg, len), RD_KAFKA_V_KEY(key, klen),
                              RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(km), RD_KAFKA_V_END);
    else
        e = rd_kafka_producev(c->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(partition),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_VALUE((void *)msg, len), RD_KAFKA_V_KEY(key, klen),
                              RD_KAFKA_V_OPAQUE(km), RD_KAFKA_V_END);
    if (e) {
        out_remove(c, km); /* never librdkafka's: no report can have taken it */
        hub_free(km);
        return e;
    }
    /* km now librdkafka's opaque until its report: not to be touched here any more */
    return RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* try_produce on the loop thread, the producer made first. A producer whose fatal error is
 * queued but not yet served refuses with __FATAL: served now (error_cb marks it), it is dropped
 * and made anew, once, and the message goes to the new one, as it would have had the report
 * come a moment earlier. 0 with *e librdkafka's answer, or <0 with err set (no producer). */
static int loop_produce(kconn *c, const char *topic, int32_t partition, const char *key,
                        size_t klen, const char *msg, size_t len, rd_kafka_headers_t *hdrs,
                        uint64_t token, tr_delivery *d, hub_ctl_call *call, rd_kafka_resp_err_t *e,
                        char *err, size_t errlen)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = prod_start(c, err, errlen);
        if (rc < 0)
            return rc;
        *e = try_produce(c, topic, partition, key, klen, msg, len, hdrs, token, d, call);
        if (*e != RD_KAFKA_RESP_ERR__FATAL || attempt > 0)
            return 0;
        serve(c); /* may drop the producer already (nothing left in flight) */
        if (c->rk && !atomic_load(&c->fatal))
            return 0; /* not (yet) known as fatal: refused as it is */
    }
    return 0;
}

/* librdkafka's refusal as the script sees it: <0 with err set. */
static int produce_refused(rd_kafka_resp_err_t e, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", rd_kafka_err2str(e));
    return e == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE ? -EMSGSIZE : -EINVAL;
}

/* QUEUE_FULL met, counted once per message however many times it is met. */
static void count_qfull(kconn *c, kjob *j)
{
    if (!j->qfull_counted)
        atomic_fetch_add(&c->qfull, 1);
    j->qfull_counted = 1;
}

static void rq_push(kconn *c, kjob *j)
{
    j->next = NULL;
    j->tick = c->ticks;
    if (c->rq_tail)
        c->rq_tail->next = j;
    else
        c->rq_head = j;
    c->rq_tail = j;
    c->rq_n++;
    count_qfull(c, j);
    if (!ev_is_active(&c->retry)) {
        ev_timer_init(&c->retry, retry_cb, c->interval_ms / 1000.0, c->interval_ms / 1000.0);
        c->retry.data = c;
        ev_timer_start(c->ks->loop, &c->retry);
    }
}

static kjob *rq_pop(kconn *c)
{
    kjob *j = c->rq_head;
    if (j) {
        c->rq_head = j->next;
        if (!c->rq_head)
            c->rq_tail = NULL;
        c->rq_n--;
    }
    return j;
}

/* A job's turn (loop thread): 0 handed to librdkafka (j freed), 1 queue full (j kept), or
 * -1 failed and reported (j freed). */
static int job_try(kconn *c, kjob *j)
{
    char why[512];
    rd_kafka_resp_err_t e;
    if (loop_produce(c, j->topic, j->partition, j->has_key ? j->key : NULL, j->key_len, j->payload,
                     j->len, j->hdrs, j->token, j->d, j->call, &e, why, sizeof(why)) < 0) {
        job_fail(j, why);
        return -1;
    }
    if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL)
        return 1;
    if (e) {
        job_fail(j, rd_kafka_err2str(e));
        return -1;
    }
    j->hdrs = NULL; /* librdkafka's now */
    job_free(j);    /* after librdkafka took it: what was held back may follow */
    return 0;
}

static void job_wait(kconn *c, kjob *j)
{
    if (c->retries == 0) {
        count_qfull(c, j);
        job_fail(j, "queue full (queue.buffering.max.messages or .kbytes reached)");
        return;
    }
    rq_push(c, j);
}

/* A job on the loop: tried now unless others wait before it (order is kept). */
static void job_submit(kconn *c, kjob *j)
{
    if (atomic_load(&c->ks->stopped)) {
        job_fail(j, WHY_STOPPED);
        return;
    }
    if (c->rq_n) {
        rq_push(c, j);
        return;
    }
    if (job_try(c, j) == 1)
        job_wait(c, j);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    kconn *c = w->data;
    (void)revents;
    c->ticks++;
    poll_queue(c); /* what has been delivered frees room */
    for (size_t bound = c->rq_n; bound > 0 && c->rq_head; bound--) {
        kjob *j = c->rq_head;
        c->rq_head = j->next; /* taken off while tried; put back at the head if still full */
        c->rq_n--;
        if (!c->rq_head)
            c->rq_tail = NULL;
        if (job_try(c, j) != 1)
            continue;
        j->next = c->rq_head;
        c->rq_head = j;
        if (!c->rq_tail)
            c->rq_tail = j;
        c->rq_n++;
        break;
    }
    char why[128];
    snprintf(why, sizeof(why), "queue full: still full after %d retries (%d ms apart)", c->retries,
             c->interval_ms);
    /* the oldest are at the head: those out of retries are a prefix of the list */
    for (size_t bound = c->rq_n; bound > 0 && c->rq_head; bound--) {
        if (c->ticks - c->rq_head->tick < (unsigned)c->retries)
            break;
        job_fail(rq_pop(c), why);
    }
    if (!c->rq_head)
        ev_timer_stop(loop, w);
}

/* A message from the loop thread itself: straight to librdkafka when nothing waits before it.
 * 0 accepted (its end will be reported), or <0 with err set (nothing accepted; hdrs are still
 * the caller's). */
static int produce_now(kconn *c, const char *topic, int32_t partition, const char *key, size_t klen,
                       const char *msg, size_t len, rd_kafka_headers_t *hdrs, uint64_t token,
                       tr_delivery *d, hub_ctl_call *call, char *err, size_t errlen)
{
    if (!c->rq_n) {
        rd_kafka_resp_err_t e;
        int rc = loop_produce(c, topic, partition, key, klen, msg, len, hdrs, token, d, call, &e,
                              err, errlen);
        if (rc < 0)
            return rc;
        if (!e) {
            atomic_fetch_add(&c->produced, 1);
            return 0;
        }
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            return produce_refused(e, err, errlen);
    }
    kjob *j = job_new(c, topic, key, klen, msg, len);
    if (!j) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    j->partition = partition;
    j->hdrs = hdrs;
    j->token = token;
    j->d = d;
    j->call = call;
    atomic_fetch_add(&c->produced, 1);
    if (c->rq_n)
        rq_push(c, j);
    else
        job_wait(c, j);
    return 0;
}

/* ---- script functions ---- */

static kconn *find_conn(kafka_state *ks, const char *name)
{
    for (size_t i = 0; i < ks->nconns; i++) {
        if (!strcmp(ks->conns[i]->name, name))
            return ks->conns[i];
    }
    return NULL;
}

typedef struct pub_args {
    kconn *c;
    const char *topic, *key, *msg;
    size_t klen, len;
    int32_t partition;
    rd_kafka_headers_t *hdrs; /* owned */
} pub_args;

/* The call fails with rc; its reason (what the script gets, or the KEMI layer logs). */
static int arg_fail(hub_call *call, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int arg_fail(hub_call *call, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(call->err, sizeof(call->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* The options table: key, topic, partition, headers. */
static int parse_options(json_object *o, pub_args *a, hub_call *call)
{
    json_object_object_foreach(o, k, v)
    {
        if (!strcmp(k, "key")) {
            if (!json_object_is_type(v, json_type_string))
                return arg_fail(call, -EINVAL, "key must be a string");
            a->key = json_object_get_string(v);
            a->klen = (size_t)json_object_get_string_len(v);
        } else if (!strcmp(k, "topic")) {
            if (!json_object_is_type(v, json_type_string) || !topic_ok(json_object_get_string(v)))
                return arg_fail(call, -EINVAL, "topic must be 1..249 of [A-Za-z0-9._-]");
            a->topic = json_object_get_string(v);
        } else if (!strcmp(k, "partition")) {
            int64_t p = json_object_get_int64(v);
            if (!json_object_is_type(v, json_type_int) || p < 0 || p > INT32_MAX)
                return arg_fail(call, -EINVAL, "partition must be an integer >= 0");
            a->partition = (int32_t)p;
        } else if (!strcmp(k, "headers")) {
            if (!json_object_is_type(v, json_type_object))
                return arg_fail(call, -EINVAL, "headers must be a table of name = string");
            if (!a->hdrs)
                a->hdrs = rd_kafka_headers_new((size_t)json_object_object_length(v));
            json_object_object_foreach(v, hn, hv)
            {
                if (!json_object_is_type(hv, json_type_string))
                    return arg_fail(call, -EINVAL, "header '%.64s' is not a string", hn);
                rd_kafka_header_add(a->hdrs, hn, -1, json_object_get_string(hv),
                                    json_object_get_string_len(hv));
            }
        } else {
            return arg_fail(call, -EINVAL,
                            "unknown option '%.64s' (key, topic, partition, headers)", k);
        }
    }
    return 0;
}

/* Check a publish (message at argument first, then a key or an options table) and fill a;
 * a->hdrs may be set even on failure (the caller frees it). */
static int check_publish(kafka_state *ks, kconn *c, hub_call *call, int first, pub_args *a)
{
    a->c = c;
    a->partition = RD_KAFKA_PARTITION_UA;
    a->msg = hub_arg_str(call, first, &a->len);
    if (!a->msg)
        return arg_fail(call, -EINVAL, "the message must be a string");
    int xt = hub_arg_type(call, first + 1);
    if (xt == HUB_ARG_STR) {
        a->key = hub_arg_str(call, first + 1, &a->klen);
    } else if (xt == HUB_ARG_JSON &&
               json_object_is_type(call->argv[first + 1].json, json_type_object)) {
        int rc = parse_options(call->argv[first + 1].json, a, call);
        if (rc < 0)
            return rc;
    } else if (xt != HUB_ARG_NIL) {
        return arg_fail(call, -EINVAL, "the key must be a string (or an options table)");
    }
    if (call->argc > first + 2)
        return arg_fail(call, -EINVAL, "too many arguments");
    if (!a->topic)
        a->topic = c->topic;
    if (!a->topic[0]) {
        snprintf(call->err, sizeof(call->err), "%.64s has no default topic and none was given",
                 c->name);
        return -EINVAL;
    }
    if (a->len + a->klen > c->max_bytes) {
        atomic_fetch_add(&c->refused, 1);
        snprintf(call->err, sizeof(call->err),
                 "message of %zu bytes is over message.max.bytes (%zu)", a->len + a->klen,
                 c->max_bytes);
        return -EMSGSIZE;
    }
    if (atomic_load(&ks->stopped)) {
        atomic_fetch_add(&c->refused, 1);
        snprintf(call->err, sizeof(call->err), "the kafka module has stopped");
        return -EAGAIN;
    }
    if (in_flight(c) >= (uint64_t)c->max_in_flight) {
        atomic_fetch_add(&c->refused, 1);
        snprintf(call->err, sizeof(call->err), "queue full (%d messages in flight on %.64s)",
                 c->max_in_flight, c->name);
        return -ENOBUFS;
    }
    return 0;
}

static void job_post_cb(hub *h, void *arg)
{
    kjob *j = arg;
    (void)h;
    job_submit(j->c, j);
}

/* What produce_fast did with a message it did not refuse. */
enum { FAST_TAKEN = 0, FAST_POST = 1, FAST_FULL = 2 };

/* A worker's publish straight to librdkafka, when it cannot overtake anything of its state:
 * the worker's earlier messages of c that took the loop's path are jobs until librdkafka has
 * them (or they failed), so with jobs at 0 each of them is in librdkafka's queue before this
 * one is (job_free drops jobs only after rd_kafka_producev returned), and while any is alive
 * this one is posted behind them, in the mailbox's per-thread order. FAST_TAKEN, FAST_POST
 * (not taken: no producer yet, a fatal error; the caller posts it), FAST_FULL (not taken for
 * QUEUE_FULL), or <0 refused by librdkafka with call->err set, as on the loop. */
static int produce_fast(kconn *c, pub_args *a, hub_call *call)
{
    if (atomic_load(&c->jobs) || atomic_load(&c->ks->stopped) || atomic_load(&c->fatal))
        return FAST_POST;
    pthread_rwlock_rdlock(&c->rk_lock); /* rk stays until the unlock (prod_drop writes) */
    if (!c->rk) {
        pthread_rwlock_unlock(&c->rk_lock);
        return FAST_POST; /* the loop makes it */
    }
    /* counted before its report can be served: delivered + failed never pass produced */
    atomic_fetch_add(&c->produced, 1);
    rd_kafka_resp_err_t e = try_produce(c, a->topic, a->partition, a->key, a->klen, a->msg, a->len,
                                        a->hdrs, call->token, NULL, NULL);
    pthread_rwlock_unlock(&c->rk_lock);
    if (!e) {
        a->hdrs = NULL; /* librdkafka's now */
        return FAST_TAKEN;
    }
    atomic_fetch_sub(&c->produced, 1);
    /* Full, or the producer failed for good (the loop makes a new one): the loop's path, where
     * the script's true stands and the message is retried or reported. */
    if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL)
        return FAST_FULL;
    if (e == RD_KAFKA_RESP_ERR__FATAL)
        return FAST_POST;
    return produce_refused(e, call->err, sizeof(call->err));
}

/* Accept a checked publish: on the loop, produce; on a worker, produce there when it may
 * (produce_fast), or hand a copy to the loop. */
static int do_publish(kafka_state *ks, pub_args *a, hub_call *call)
{
    kconn *c = a->c;
    if (hub_on_loop(ks->h)) {
        int rc = produce_now(c, a->topic, a->partition, a->key, a->klen, a->msg, a->len, a->hdrs,
                             call->token, NULL, NULL, call->err, sizeof(call->err));
        if (rc < 0) {
            atomic_fetch_add(&c->refused, 1);
            return rc;
        }
        a->hdrs = NULL; /* the message's now */
        return 0;
    }
    int rc = produce_fast(c, a, call);
    if (rc < 0)
        atomic_fetch_add(&c->refused, 1);
    if (rc < 0 || rc == FAST_TAKEN)
        return rc;
    kjob *j = job_new(c, a->topic, a->key, a->klen, a->msg, a->len);
    if (!j) {
        atomic_fetch_add(&c->refused, 1);
        return arg_fail(call, -ENOMEM, "out of memory");
    }
    j->partition = a->partition;
    j->hdrs = a->hdrs;
    j->token = call->token;
    j->qfull_counted =
        rc == FAST_FULL;               /* counted below once posted: j is the loop's from then on */
    atomic_fetch_add(&c->produced, 1); /* counted before the loop can end it */
    if (hub_loop_post(ks->h, job_post_cb, j) < 0) {
        atomic_fetch_sub(&c->produced, 1);
        atomic_fetch_add(&c->refused, 1);
        j->hdrs = NULL; /* still the caller's */
        job_free(j);
        return arg_fail(call, -ENOMEM, "out of memory");
    }
    if (rc == FAST_FULL)
        atomic_fetch_add(&c->qfull, 1);
    a->hdrs = NULL;
    return 0;
}

/* kafka.publish(id, message[, key | {key=, topic=, partition=, headers=}][, report_fn]) */
static int fn_publish(void *state, hub_call *call)
{
    kafka_state *ks = state;
    size_t idlen;
    const char *id = hub_arg_str(call, 0, &idlen);
    if (!id || strlen(id) != idlen)
        return arg_fail(call, -EINVAL, "the id must be a string (without NUL bytes)");
    kconn *c = find_conn(ks, id);
    if (!c)
        return arg_fail(call, -ENOENT, "unknown kafka id '%.64s'", id);
    pub_args a = {0};
    int rc = check_publish(ks, c, call, 1, &a);
    if (rc == 0)
        rc = do_publish(ks, &a, call);
    if (a.hdrs)
        rd_kafka_headers_destroy(a.hdrs);
    return rc;
}

/* KSR.kafka.send(topic, msg) / send_key(topic, msg, key), on the KEMI connection. */
static int kemi_send(kafka_state *ks, hub_call *call, int with_key)
{
    kconn *c = ks->kemi;
    if (!c)
        return arg_fail(call, -ENOENT, "no kafka connection is configured");
    size_t tl;
    const char *t = hub_arg_str(call, 0, &tl);
    if (call->argc != (with_key ? 3 : 2))
        return arg_fail(call, -EINVAL, "wrong number of arguments");
    if (!t || strlen(t) != tl || !topic_ok(t))
        return arg_fail(call, -EINVAL, "the topic must be 1..249 of [A-Za-z0-9._-]");
    if (with_key && hub_arg_type(call, 2) != HUB_ARG_STR)
        return arg_fail(call, -EINVAL, "the key must be a string");
    pub_args a = {.topic = t};
    int rc = check_publish(ks, c, call, 1, &a);
    if (rc == 0)
        rc = do_publish(ks, &a, call);
    if (a.hdrs)
        rd_kafka_headers_destroy(a.hdrs);
    return rc;
}

static int fn_send(void *state, hub_call *call) { return kemi_send(state, call, 0); }

static int fn_send_key(void *state, hub_call *call) { return kemi_send(state, call, 1); }

static const hub_script_fn kafka_fns[] = {
    {"kafka", "publish", HUB_FN_REPORT, fn_publish},
    {"KSR.kafka", "send", HUB_FN_KEMI, fn_send},
    {"KSR.kafka", "send_key", HUB_FN_KEMI, fn_send_key},
    {NULL, NULL, 0, NULL},
};

/* ---- the kafka: scheme ---- */

static int sock_check(const char *uri, char *err, size_t errlen)
{
    tr_kafka_uri *u = hub_malloc(sizeof(*u));
    if (!u) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    int rc = tr_kafka_uri_parse(uri, u, err, errlen);
    hub_free(u);
    return rc;
}

static void *sock_open(void *ud, const char *uri, char *err, size_t errlen)
{
    kafka_state *ks = ud;
    tr_kafka_uri *u = hub_malloc(sizeof(*u));
    kconn *c = NULL;
    char why[600];
    snprintf(why, sizeof(why), "out of memory");
    if (!u)
        goto fail;
    if (tr_kafka_uri_parse(uri, u, err, errlen) < 0) {
        hub_free(u);
        return NULL; /* err says why */
    }
    c = conn_new(ks, uri, 1, &ks->defaults);
    if (!c || conn_base(c, u->brokers, u->topic, why, sizeof(why)) < 0)
        goto fail;
    for (int i = 0; i < u->nprops; i++) {
        if (set_or_fail(c, u->props[i].name, u->props[i].value, why, sizeof(why)) < 0)
            goto fail;
    }
    if (u->key_callid) {
        c->key_callid = 1;
        conn_settings_add(c, "key", "callid");
    }
    conn_limits(c);
    c->next = ks->socks;
    ks->socks = c;
    hub_free(u);
    return c;
fail:
    snprintf(err, errlen, "kafka: socket: %s", why);
    conn_free(c);
    hub_free(u);
    return NULL;
}

static size_t sock_room(void *ud, void *sock, const tr_event *e)
{
    (void)ud;
    (void)sock;
    return 64 + strlen(e->name) + e->params_len;
}

static void sock_send(void *ud, void *sock, tr_delivery *d)
{
    kafka_state *ks = ud;
    kconn *c = sock;
    const tr_event *e = tr_delivery_event(d);
    char *doc = tr_delivery_room(d);
    size_t cap = sock_room(ud, sock, e);
    /* The record's value: the JSON-RPC 2.0 notification (names need no escaping: checked). */
    int n = e->params
                ? snprintf(doc, cap, "{\"jsonrpc\":\"2.0\",\"method\":\"%s\",\"params\":%.*s}",
                           e->name, (int)e->params_len, e->params)
                : snprintf(doc, cap, "{\"jsonrpc\":\"2.0\",\"method\":\"%s\"}", e->name);
    char err[256];
    if (atomic_load(&ks->stopped)) {
        tr_delivery_done(d, -1, WHY_STOPPED);
        return;
    }
    /* key=callid: the Call-ID of the SIP message whose route raised it (none: no key) */
    const char *key = c->key_callid ? e->callid : NULL;
    if (produce_now(c, c->topic, RD_KAFKA_PARTITION_UA, key, key ? strlen(key) : 0, doc, (size_t)n,
                    NULL, 0, d, NULL, err, sizeof(err)) < 0)
        tr_delivery_done(d, -1, err);
}

static const char *sock_state(void *ud, void *sock)
{
    kconn *c = sock;
    (void)ud;
    return kstate_names[c->state];
}

/* Fail whatever c still has (retry list, then librdkafka's), and let its producer go. */
static void conn_shut(kconn *c, const char *why)
{
    ev_timer_stop(c->ks->loop, &c->retry);
    size_t n = c->rq_n;
    for (size_t bound = c->rq_n; bound > 0 && c->rq_head; bound--)
        job_fail(rq_pop(c), why);
    if (n)
        hub_log(HUB_LOG_WARN,
                "kafka: %s: %zu message(s) waiting out a full queue reported "
                "failed: %s",
                c->name, n, why);
    prod_drop(c, why);
}

static void sock_close(void *ud, void *sock)
{
    kafka_state *ks = ud;
    kconn *c = sock;
    conn_shut(c, hub_stopping(ks->h) ? WHY_STOPPED : "the socket was closed (unsubscribed)");
    for (kconn **pp = &ks->socks; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    conn_free(c);
}

static const tr_scheme kafka_scheme = {
    .name = "kafka",
    .check = sock_check,
    .open = sock_open,
    .room = sock_room,
    .send = sock_send,
    .state = sock_state,
    .close = sock_close,
};

/* ---- evhubctl kafka ---- */

static const hub_ctl_param kafka_params[] = {
    {"action", HUB_CTL_STRING, 1, "status, connection or send"},
    {"name", HUB_CTL_STRING, 0, "connection, send: the connection's id"},
    {"topic", HUB_CTL_STRING, 0, "send: the topic"},
    {"message", HUB_CTL_STRING, 0, "send: the message"},
    {"key", HUB_CTL_STRING, 0, "send: the record's key"},
};

static const hub_ctl_spec kafka_spec = {
    "kafka", "Kafka connections: status | connection NAME | send NAME TOPIC MESSAGE [--key K]",
    "status: every connection and kafka: socket with its brokers, state, messages in flight, "
    "delivered, failed and last error. connection NAME: its settings and librdkafka's view of "
    "its brokers (from the statistics, every 5 s). send NAME TOPIC MESSAGE [--key K]: a test "
    "message; answers once its delivery report arrives, with partition and offset or the error.",
    kafka_params, 5};

static json_object *conn_status(kconn *c)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string(c->name));
    json_object_object_add(o, "kind", json_object_new_string(c->is_sock ? "socket" : "connection"));
    json_object_object_add(o, "brokers", json_object_new_string(c->brokers));
    json_object_object_add(o, "state", json_object_new_string(kstate_names[c->state]));
    json_object_object_add(o, "in_flight", json_object_new_uint64(in_flight(c)));
    json_object_object_add(o, "produced", json_object_new_uint64(atomic_load(&c->produced)));
    json_object_object_add(o, "delivered", json_object_new_uint64(atomic_load(&c->delivered)));
    json_object_object_add(o, "failed", json_object_new_uint64(atomic_load(&c->failed)));
    json_object_object_add(o, "last_error", json_object_new_string(c->last_error));
    return o;
}

static const char *str_param(json_object *params, const char *name)
{
    json_object *v = NULL;
    return json_object_object_get_ex(params, name, &v) ? json_object_get_string(v) : NULL;
}

static void cmd_kafka(hub_ctl_call *call, json_object *params, void *ud)
{
    kafka_state *ks = ud;
    const char *action = str_param(params, "action"), *name = str_param(params, "name");
    if (!strcmp(action, "status")) {
        json_object *list = json_object_new_array(), *r = json_object_new_object();
        for (size_t i = 0; i < ks->nconns; i++)
            json_object_array_add(list, conn_status(ks->conns[i]));
        for (kconn *c = ks->socks; c; c = c->next)
            json_object_array_add(list, conn_status(c));
        json_object_object_add(r, "connections", list);
        hub_ctl_reply(call, r);
        return;
    }
    if (strcmp(action, "connection") != 0 && strcmp(action, "send") != 0) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                     "unknown action '%.64s' (status, connection or send)", action);
        return;
    }
    kconn *c = name ? find_conn(ks, name) : NULL;
    if (!c) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "no kafka connection '%.64s'",
                     name ? name : "(none given)");
        return;
    }
    if (!strcmp(action, "connection")) {
        json_object *r = conn_status(c);
        json_object_object_add(r, "settings", json_object_get(c->settings));
        json_object_object_add(r, "broker_states",
                               c->brokers_view ? json_object_get(c->brokers_view)
                                               : json_object_new_array());
        json_object_object_add(
            r, "stats_age_s",
            c->brokers_view ? json_object_new_double(ev_now(ks->loop) - c->stats_at) : NULL);
        hub_ctl_reply(call, r);
        return;
    }
    const char *topic = str_param(params, "topic"), *msg = str_param(params, "message"),
               *key = str_param(params, "key");
    if (!topic || !topic_ok(topic) || !msg) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                     "send: NAME TOPIC MESSAGE (topic: 1..249 of [A-Za-z0-9._-])");
        return;
    }
    char err[256];
    if (atomic_load(&ks->stopped)) {
        hub_ctl_fail(call, HUB_CTL_STOPPING, "the kafka module has stopped");
        return;
    }
    if (produce_now(c, topic, RD_KAFKA_PARTITION_UA, key, key ? strlen(key) : 0, msg, strlen(msg),
                    NULL, 0, NULL, call, err, sizeof(err)) < 0) {
        atomic_fetch_add(&c->refused, 1);
        hub_ctl_fail(call, HUB_CTL_FAILED, "%s", err);
    }
}

/* ---- the module ---- */

/* One [kafka:NAME] section into a connection. */
static int named_conn(kafka_state *ks, const hub_conf_instance *in, char *err, size_t errlen)
{
    const kafka_conf *k = in->data;
    char why[600];
    if (k->broker.n || k->kemi_broker[0]) {
        snprintf(err, errlen, "%s:%d: [kafka:%s]: %s belongs in [kafka]", in->file, in->line,
                 in->name, k->broker.n ? "broker" : "kemi_broker");
        return -EINVAL;
    }
    if (find_conn(ks, in->name)) {
        snprintf(err, errlen, "%s:%d: [kafka:%s]: a connection with that id already exists",
                 in->file, in->line, in->name);
        return -EINVAL;
    }
    if (k->topic[0] && !topic_ok(k->topic)) {
        snprintf(err, errlen, "%s:%d: [kafka:%s] topic: 1..249 of [A-Za-z0-9._-]", in->file,
                 in->line, in->name);
        return -EINVAL;
    }
    kconn *c = conn_new(ks, in->name, 0, k);
    if (!c) {
        snprintf(err, errlen, "kafka: out of memory");
        return -ENOMEM;
    }
    ks->conns[ks->nconns++] = c;
    snprintf(c->file, sizeof(c->file), "%s", in->file);
    c->line = in->line;
    char num[3][16];
    snprintf(num[0], sizeof(num[0]), "%d", k->message_max_bytes ? k->message_max_bytes : 1000000);
    snprintf(num[1], sizeof(num[1]), "%d", k->request_timeout_ms ? k->request_timeout_ms : 30000);
    snprintf(num[2], sizeof(num[2]), "%d", k->message_timeout_ms ? k->message_timeout_ms : 300000);
    const char *base[][2] = {{"g.client.id", k->client_id[0] ? k->client_id : DEF_CLIENT_ID},
                             {"g.message.max.bytes", num[0]},
                             {"t.request.timeout.ms", num[1]},
                             {"t.message.timeout.ms", num[2]}};
    if (conn_base(c, k->brokers[0] ? k->brokers : DEF_BROKERS, k->topic, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "%s:%d: [kafka:%s] %s", in->file, in->line, in->name, why);
        return -EINVAL;
    }
    for (size_t i = 0; i < sizeof(base) / sizeof(base[0]); i++) {
        if (set_or_fail(c, base[i][0], base[i][1], why, sizeof(why)) < 0) {
            snprintf(err, errlen, "%s:%d: [kafka:%s] %s", in->file, in->line, in->name, why);
            return -EINVAL;
        }
    }
    const hub_conf_list *lists[] = {&k->g, &k->t};
    for (size_t l = 0; l < 2; l++) {
        for (size_t i = 0; i < lists[l]->n; i++) {
            const hub_conf_item *it = &lists[l]->items[i];
            char name[200];
            snprintf(name, sizeof(name), "%s", it->value);
            char *eq = strchr(name, '=');
            *eq = '\0'; /* the engine keeps "KEY=VALUE" */
            json_object *seen = NULL;
            if (json_object_object_get_ex(c->settings, name, &seen) && i > 0) {
                for (size_t j = 0; j < i; j++) {
                    if (!strncmp(lists[l]->items[j].value, it->value, strlen(name) + 1)) {
                        snprintf(err, errlen, "%s:%d: [kafka:%s] %s given twice (first at line %d)",
                                 in->file, it->line, in->name, name, lists[l]->items[j].line);
                        return -EINVAL;
                    }
                }
            }
            if (set_or_fail(c, name, eq + 1, why, sizeof(why)) < 0) {
                snprintf(err, errlen, "%s:%d: [kafka:%s] %s", in->file, it->line, in->name, why);
                return -EINVAL;
            }
        }
    }
    conn_limits(c);
    return 0;
}

/* The broker lines of [kafka], each a connection. */
static int broker_lines(kafka_state *ks, const hub_conf_instance *in, char *err, size_t errlen)
{
    const kafka_conf *k = in->data;
    char why[600];
    if (k->brokers[0] || k->topic[0] || k->client_id[0] || k->message_max_bytes ||
        k->request_timeout_ms || k->message_timeout_ms || k->g.n || k->t.n) {
        snprintf(err, errlen,
                 "%s:%d: [kafka]: brokers, topic, client_id, message_*/request_* and g./t. keys "
                 "belong in a [kafka:NAME] section (a broker line carries its own ?g.&t.)",
                 in->file, in->line);
        return -EINVAL;
    }
    tr_kafka_uri *u = hub_malloc(sizeof(*u));
    if (!u) {
        snprintf(err, errlen, "kafka: out of memory");
        return -ENOMEM;
    }
    int rc = 0;
    for (size_t i = 0; i < k->broker.n && rc == 0; i++) {
        const hub_conf_item *it = &k->broker.items[i];
        rc = -EINVAL;
        if (tr_kafka_broker_parse(it->value, u, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "%s:%d: %s", in->file, it->line, why);
            break;
        }
        if (find_conn(ks, u->id)) {
            snprintf(err, errlen, "%s:%d: broker: the id [%s] is taken", in->file, it->line, u->id);
            break;
        }
        kconn *c = conn_new(ks, u->id, 0, k);
        if (!c) {
            snprintf(err, errlen, "kafka: out of memory");
            rc = -ENOMEM;
            break;
        }
        ks->conns[ks->nconns++] = c;
        snprintf(c->file, sizeof(c->file), "%s", in->file);
        c->line = it->line;
        if (conn_base(c, u->brokers, u->topic, why, sizeof(why)) < 0 ||
            set_or_fail(c, "g.client.id", DEF_CLIENT_ID, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "%s:%d: broker: %s", in->file, it->line, why);
            break;
        }
        int j = 0;
        for (; j < u->nprops; j++) {
            if (set_or_fail(c, u->props[j].name, u->props[j].value, why, sizeof(why)) < 0)
                break;
        }
        if (j < u->nprops) {
            snprintf(err, errlen, "%s:%d: broker [%s]: %s", in->file, it->line, u->id, why);
            break;
        }
        conn_limits(c);
        rc = 0;
    }
    hub_free(u);
    return rc;
}

static void kafka_free(void *state)
{
    kafka_state *ks = state;
    if (!ks)
        return;
    if (ks->scheme_added && !atomic_load(&ks->stopped))
        tr_events_remove_scheme(ks->h, "kafka");
    for (size_t i = 0; i < ks->nconns; i++) {
        conn_shut(ks->conns[i], WHY_STOPPED);
        conn_free(ks->conns[i]);
    }
    for (reaper *r = ks->reapers, *next; r; r = next) {
        next = r->next;
        pthread_join(r->thread, NULL);
        hub_free(r);
    }
    hub_free(ks->conns);
    hub_free(ks);
}

static int kafka_init(hub *h, void **state, char *err, size_t errlen)
{
    kafka_state *ks = hub_calloc(1, sizeof(*ks));
    if (!ks) {
        snprintf(err, errlen, "kafka: out of memory");
        return -ENOMEM;
    }
    *state = ks;
    ks->h = h;
    ks->loop = hub_loop(h);
    const hub_config *cfg = hub_get_config(h);
    const hub_conf_instance *in, *top = NULL;
    size_t n = 0;
    for (in = hub_conf_next(cfg, "kafka", NULL); in; in = hub_conf_next(cfg, "kafka", in)) {
        const kafka_conf *k = in->data;
        n += in->name[0] ? 1 : k->broker.n;
        if (!in->name[0])
            top = in;
    }
    if (top)
        ks->defaults = *(const kafka_conf *)top->data;
    else if (hub_conf_defaults(&kafka_sections[0], &ks->defaults, err, errlen) < 0)
        return -EINVAL;
    ks->conns = hub_calloc(n ? n : 1, sizeof(*ks->conns));
    if (!ks->conns) {
        snprintf(err, errlen, "kafka: out of memory");
        return -ENOMEM;
    }
    int rc = 0;
    for (in = hub_conf_next(cfg, "kafka", NULL); in && rc == 0;
         in = hub_conf_next(cfg, "kafka", in))
        rc = in->name[0] ? named_conn(ks, in, err, errlen) : broker_lines(ks, in, err, errlen);
    if (rc < 0)
        return rc;
    /* the defaults' lists belong to the config: not kept */
    memset(&ks->defaults.broker, 0, sizeof(ks->defaults.broker));
    if (ks->defaults.kemi_broker[0]) {
        ks->kemi = find_conn(ks, ks->defaults.kemi_broker);
        if (!ks->kemi) {
            snprintf(err, errlen, "%s:%d: [kafka] kemi_broker: no connection '%s'", top->file,
                     top->line, ks->defaults.kemi_broker);
            return -EINVAL;
        }
    } else if (ks->nconns) {
        ks->kemi = ks->conns[0];
    }
    rc = hub_ctl_register(hub_get_ctl(h), &kafka_spec, cmd_kafka, ks);
    if (rc < 0) {
        snprintf(err, errlen, "kafka: cannot register the kafka command: %s", strerror(-rc));
        return rc;
    }
    rc = tr_events_add_scheme(h, "kafka", &kafka_scheme, ks, err, errlen);
    if (rc == 0)
        ks->scheme_added = 1;
    return rc;
}

static int kafka_start(void *state, char *err, size_t errlen)
{
    kafka_state *ks = state;
    char why[600];
    for (size_t i = 0; i < ks->nconns; i++) {
        kconn *c = ks->conns[i];
        if (c->eager && prod_start(c, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "%s:%d: kafka %s: %s", c->file, c->line, c->name, why);
            return -EINVAL;
        }
    }
    return 0;
}

static size_t kafka_drain(void *state)
{
    kafka_state *ks = state;
    size_t n = 0;
    for (size_t i = 0; i < ks->nconns; i++)
        n += (size_t)in_flight(ks->conns[i]);
    for (kconn *c = ks->socks; c; c = c->next)
        n += atomic_load(&c->nout) + c->rq_n;
    return n;
}

static void kafka_stop(void *state)
{
    kafka_state *ks = state;
    atomic_store(&ks->stopped, 1);
    /* kafka: sockets close through the events module: what is left is reported failed */
    tr_events_remove_scheme(ks->h, "kafka");
    for (size_t i = 0; i < ks->nconns; i++)
        conn_shut(ks->conns[i], WHY_STOPPED);
    for (reaper *r = ks->reapers, *next; r; r = next) {
        next = r->next;
        pthread_join(r->thread, NULL);
        hub_free(r);
    }
    ks->reapers = NULL;
}

static size_t kafka_stats(void *state, hub_stat *out, size_t cap)
{
    kafka_state *ks = state;
    static const struct {
        const char *name, *help;
        int gauge;
    } per[] = {
        {"kafka_produced", "messages accepted for this connection", 0},
        {"kafka_delivered", "messages the broker acknowledged", 0},
        {"kafka_failed", "messages reported failed (timeout, queue full, error, shutdown)", 0},
        {"kafka_in_flight", "messages accepted and not yet delivered or failed", 1},
        {"kafka_refused", "publishes refused at once (size, queue bound, stopped)", 0},
        {"kafka_queue_full", "messages that met QUEUE_FULL, or waited behind one, for a retry", 0},
        {"kafka_errors", "errors librdkafka reported (broker down, transport, ...)", 0},
        {"kafka_fatal", "fatal producer errors (the producer was made anew)", 0},
    };
    size_t n = 0;
    for (size_t i = 0; i < ks->nconns; i++) {
        kconn *c = ks->conns[i];
        uint64_t v[8] = {atomic_load(&c->produced), atomic_load(&c->delivered),
                         atomic_load(&c->failed),   in_flight(c),
                         atomic_load(&c->refused),  atomic_load(&c->qfull),
                         atomic_load(&c->errors),   atomic_load(&c->fatals)};
        for (size_t k = 0; k < 8; k++, n++) {
            if (n >= cap)
                continue;
            out[n] = (hub_stat){.name = per[k].name,
                                .help = per[k].help,
                                .gauge = per[k].gauge,
                                .worker = -1,
                                .value = v[k]};
            snprintf(out[n].label, sizeof(out[n].label), "connection=\"%.64s\"", c->name);
        }
    }
    return n;
}

const hub_module kafka_module = {
    .name = "kafka",
    .sections = kafka_sections,
    .init = kafka_init,
    .start = kafka_start,
    .drain = kafka_drain,
    .stop = kafka_stop,
    .free = kafka_free,
    .stats = kafka_stats,
    .fns = kafka_fns,
};
