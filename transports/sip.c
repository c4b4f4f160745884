/* The SIP module: UDP listeners, libosip2's parser, evhub's own RFC 3261 server transactions
 * (INVITE and non-INVITE, indexed by branch, one timer each), and requests handed to the
 * scripts' request route (hub_request) with async suspend / t_continue.
 *
 * Threads: the transactions, sockets and timers are the loop's. What scripts do with a
 * request (reply, suspend, resume) may come from any worker: those calls change the
 * request's state under the module's mutex and post the work to the loop (the mailbox), which
 * sends. A request's variables are copied when it arrives, so scripts read them lock-free. */
#include <sys/time.h>
#include <time.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>
#include <json-c/json.h>
#include <osipparser2/osip_parser.h>

#include "hub/alloc.h"
#include "hub/control.h"
#include "hub/core.h"
#include "hub/log.h"
#include "transports/sip_msg.h"

#define SIP_T1         0.5
#define SIP_T2         4.0
#define SIP_T4         5.0
#define SIP_BUCKETS    (1u << 16)
#define SIP_READS      64 /* datagrams read per readable event */
#define SIP_MAX_LISTEN 8
#define SIP_TO_TAG_LEN 16
/* A native handler woken (an answer, its timeout, a cancel) has this long to answer before
 * the module does (500): its state may be gone (a reload), and a request never hangs. */
#define SIP_WAKE_GRACE 2.0

/* ---- configuration ---- */

typedef struct sip_conf {
    hub_conf_list listen;
    int async_timeout;             /* ms a suspended request waits for t_continue */
    char async_timeout_route[128]; /* function run when it passes; empty: reply 408 */
    int max_transactions;
} sip_conf;

static const hub_conf_row sip_rows[] = {
    HUB_CONF_ROW(sip_conf, "listen", HUB_CONF_LIST, listen, 0, 0, NULL, NULL),
    HUB_CONF_ROW(sip_conf, "async_timeout", HUB_CONF_INT, async_timeout, 1, 3600000, NULL, "5000"),
    HUB_CONF_ROW(sip_conf, "async_timeout_route", HUB_CONF_IDENT, async_timeout_route, 0, 0, NULL,
                 NULL),
    HUB_CONF_ROW(sip_conf, "max_transactions", HUB_CONF_INT, max_transactions, 16, 10000000, NULL,
                 "65536"),
    {.name = NULL},
};

static const hub_conf_section sip_sections[] = {
    {"sip", 0, sizeof(sip_conf), sip_rows},
    {NULL, 0, 0, NULL},
};

/* ---- state ---- */

enum { PV_RM, PV_RU, PV_RUSER, PV_RDOM, PV_FU, PV_FUSER, PV_TU, PV_TUSER, PV_CI, PV_N };
static const char *const pv_names[PV_N] = {"$rm", "$ru", "$rU", "$rd", "$fu",
                                           "$fU", "$tu", "$tU", "$ci"};

enum { TS_TRYING, TS_PROCEEDING, TS_COMPLETED, TS_CONFIRMED, TS_ACCEPTED, TS_NSTATES };
static const char *const ts_names[TS_NSTATES] = {"trying", "proceeding", "completed", "confirmed",
                                                 "accepted"};

typedef struct sip_mod sip_mod;
typedef struct sip_txn sip_txn;

typedef struct sip_req {
    hub_req base;
    atomic_int refs;
    sip_mod *m;
    unsigned index, label;
    int invite;
    char *raw; /* the request as received, NUL-terminated */
    size_t rawlen, hdr_end, body_off;
    char *pv[PV_N];
    size_t pvlen[PV_N];
    char si[HUB_ADDR_MAX];
    int sp;
    sip_txn *txn;       /* loop only: NULL once the transaction is gone */
    int woken;          /* loop only: a native waiter was woken; the grace timer runs */
    ev_tstamp dl_armed; /* loop only: when its deadline was armed */
    /* under m->mu */
    int final_sent, suspended, resumed, cancelled, expired, provisional_sent;
    uint64_t token; /* native async: the completion its coroutine waits on, or 0 */
    int wait_ms;    /* native async: its own timeout, or 0 */
    char *append;
    size_t append_len;
} sip_req;

struct sip_txn {
    sip_txn *hnext;
    sip_mod *m;
    char *key;
    uint32_t hash;
    int invite, state;
    ev_timer t;      /* G/H in COMPLETED, I in CONFIRMED, J for non-INVITE */
    ev_timer dl;     /* the deadline of a suspended request */
    double g;        /* the next timer G interval */
    ev_tstamp h_due; /* timer H: when COMPLETED gives up waiting for the ACK */
    int lfd;         /* the listener it came on */
    struct sockaddr_storage dst;
    socklen_t dstlen;
    char *skel; /* the response's header block: Vias, From, Call-ID, CSeq */
    char *to, *to_tagged;
    char *last;
    size_t lastlen;
    int last_code;
    sip_req *req; /* one reference */
};

typedef struct sip_listener {
    ev_io io;
    sip_mod *m;
    int fd;
    char desc[80];
} sip_listener;

struct sip_mod {
    hub *h;
    struct ev_loop *loop;
    sip_conf conf;
    sip_listener ls[SIP_MAX_LISTEN];
    int nls;
    sip_txn **buckets;
    _Atomic size_t ntxn; /* written on the loop, read by sip_stats on any thread */
    size_t nstate[TS_NSTATES];
    int draining;
    pthread_mutex_t mu; /* guards slots, labels and every sip_req's state fields */
    tr_sip_slots slots; /* (index, label) -> request while its transaction lives */
    size_t suspended;
    double last_malformed_log;
    unsigned long malformed_quiet;
    char rbuf[65536];
    atomic_uint_fast64_t requests, retrans_absorbed, malformed, replies, resp_retrans,
        async_timeouts, cancels, acks_absorbed, acks_unmatched, overload, no_reply, stray;
};

/* ---- small helpers ---- */

static uint32_t fnv(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

/* Append fmt to a growing string (*buf, *len, *cap). -1 on no memory. */
static int sbuf_add(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap * 2 : 512;
        while (nc < *len + n + 1)
            nc *= 2;
        char *b = hub_realloc(*buf, nc);
        if (!b)
            return -1;
        *buf = b;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return 0;
}

static int sbuf_str(char **buf, size_t *len, size_t *cap, const char *s)
{
    return sbuf_add(buf, len, cap, s, strlen(s));
}

/* ---- requests: what scripts see (hub_req) ---- */

static void req_ref(hub_req *r) { atomic_fetch_add(&((sip_req *)r)->refs, 1); }

static void req_free(sip_req *q)
{
    for (int i = 0; i < PV_N; i++)
        hub_free(q->pv[i]);
    hub_free(q->raw);
    hub_free(q->append);
    hub_free(q);
}

static void req_unref(hub_req *r)
{
    sip_req *q = (sip_req *)r;
    if (atomic_fetch_sub(&q->refs, 1) == 1)
        req_free(q);
}

static const char *const compact[][2] = {
    {"f", "From"},         {"t", "To"},      {"i", "Call-ID"},
    {"v", "Via"},          {"m", "Contact"}, {"l", "Content-Length"},
    {"c", "Content-Type"}, {"s", "Subject"}, {"k", "Supported"},
};

static int name_is(const char *line, size_t nlen, const char *want)
{
    size_t wl = strlen(want);
    if (nlen == wl && strncasecmp(line, want, wl) == 0)
        return 1;
    for (size_t i = 0; i < sizeof(compact) / sizeof(compact[0]); i++) {
        if (strcasecmp(want, compact[i][1]) == 0 && nlen == 1 &&
            (line[0] | 0x20) == compact[i][0][0])
            return 1;
        if (strcasecmp(want, compact[i][0]) == 0 && nlen == strlen(compact[i][1]) &&
            strncasecmp(line, compact[i][1], nlen) == 0)
            return 1;
    }
    return 0;
}

/* $hdr(Name): the first header of that name in the raw request (folded lines not joined). */
static int find_header(const sip_req *q, const char *name, size_t namelen, hub_pv *out)
{
    char want[64];
    if (namelen == 0 || namelen >= sizeof(want))
        return -ENOENT;
    memcpy(want, name, namelen);
    want[namelen] = '\0';
    const char *p = memchr(q->raw, '\n', q->hdr_end), *end = q->raw + q->hdr_end;
    while (p && ++p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon) {
            size_t nl = (size_t)(colon - p);
            while (nl && (p[nl - 1] == ' ' || p[nl - 1] == '\t'))
                nl--;
            if (name_is(p, nl, want)) {
                const char *v = colon + 1, *ve = eol;
                while (v < ve && (*v == ' ' || *v == '\t'))
                    v++;
                while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                    ve--;
                out->is_int = 0;
                out->s = v;
                out->len = (size_t)(ve - v);
                return 0;
            }
        }
        p = eol;
    }
    return -ENOENT;
}

static int req_pv(hub_req *r, const char *name, hub_pv *out)
{
    sip_req *q = (sip_req *)r;
    for (int i = 0; i < PV_N; i++) {
        if (strcmp(name, pv_names[i]) == 0) {
            if (!q->pv[i])
                return -ENOENT;
            *out = (hub_pv){.s = q->pv[i], .len = q->pvlen[i]};
            return 0;
        }
    }
    if (strcmp(name, "$si") == 0) {
        *out = (hub_pv){.s = q->si, .len = strlen(q->si)};
        return 0;
    }
    if (strcmp(name, "$sp") == 0 || strcmp(name, "$T(id_index)") == 0 ||
        strcmp(name, "$T(id_label)") == 0) {
        long long v = name[1] == 's'   ? (long long)q->sp
                      : name[6] == 'i' ? (long long)q->index
                                       : (long long)q->label;
        *out = (hub_pv){.is_int = 1, .i = v};
        return 0;
    }
    if (strcmp(name, "$rb") == 0) {
        *out = (hub_pv){.s = q->raw + q->body_off, .len = q->rawlen - q->body_off};
        return 0;
    }
    size_t nl = strlen(name);
    if (nl > 6 && strncmp(name, "$hdr(", 5) == 0 && name[nl - 1] == ')')
        return find_header(q, name + 5, nl - 6, out);
    return -EINVAL;
}

/* Work for the loop, posted by whichever thread a script runs on. */
enum { OP_REPLY, OP_SUSPEND, OP_RELEASE, OP_WOKEN };
typedef struct sip_op {
    int op;
    sip_req *q; /* a reference */
    int code;
    char *hdrs;
    char reason[96];
} sip_op;

static void run_op(hub *h, void *arg);

static void post_op(sip_req *q, int op, int code, const char *reason, char *hdrs)
{
    sip_op *o = hub_malloc(sizeof(*o));
    while (!o) {
        usleep(1000); /* what a script asked must reach the loop */
        o = hub_malloc(sizeof(*o));
    }
    o->op = op;
    o->q = q;
    req_ref(&q->base);
    o->code = code;
    o->hdrs = hdrs;
    snprintf(o->reason, sizeof(o->reason), "%s", reason ? reason : "");
    hub_loop_post_retry(q->m->h, run_op, o);
}

/* Under m->mu: q is suspended no more (the gauge follows). */
static void unsuspend_locked(sip_req *q)
{
    if (q->suspended) {
        q->suspended = 0;
        q->m->suspended--;
    }
}

/* Any thread: 1 when the caller is the one to send q's final reply (it was not sent yet, and
 * now counts as sent), 0 when someone else did. */
static int claim_final(sip_req *q)
{
    pthread_mutex_lock(&q->m->mu);
    int mine = !q->final_sent;
    q->final_sent = 1;
    pthread_mutex_unlock(&q->m->mu);
    return mine;
}

static int req_reply(hub_req *r, int code, const char *reason, char *err, size_t errlen)
{
    sip_req *q = (sip_req *)r;
    sip_mod *m = q->m;
    if (reason && strpbrk(reason, "\r\n")) {
        snprintf(err, errlen, "a reason phrase must not contain CR or LF");
        return -EINVAL;
    }
    pthread_mutex_lock(&m->mu);
    if (q->final_sent || q->cancelled) {
        int cancelled = q->cancelled;
        pthread_mutex_unlock(&m->mu);
        snprintf(err, errlen, "%s",
                 cancelled ? "the transaction was cancelled" : "a final reply was sent already");
        return cancelled ? -ECANCELED : -EALREADY;
    }
    if (code >= 200) {
        q->final_sent = 1;
        unsuspend_locked(q);
    } else {
        q->provisional_sent = 1;
    }
    char *hdrs = q->append;
    q->append = NULL;
    q->append_len = 0;
    pthread_mutex_unlock(&m->mu);
    post_op(q, OP_REPLY, code, reason, hdrs);
    return 0;
}

/* NULL when text is header lines ("Name: value", CRLF between them): no NUL, no bare CR or
 * LF, no blank line (it would end the headers), no Content-Length (evhub writes it). */
static const char *header_lines_bad(const char *text, size_t len)
{
    size_t start = 0;
    if (len == 0)
        return "an empty header";
    for (size_t i = 0; i <= len; i++) {
        int eol = i == len || (text[i] == '\r' && i + 1 < len && text[i + 1] == '\n');
        if (!eol) {
            if (text[i] == '\0')
                return "a header must not contain a NUL byte";
            if (text[i] == '\r' || text[i] == '\n')
                return "CR and LF only as CRLF between header lines";
            continue;
        }
        const char *line = text + start, *colon = memchr(line, ':', i - start);
        if (i == start)
            return "a blank line would end the headers";
        if (!colon || colon == line)
            return "a header line needs a name and a ':'";
        if (colon - line == 14 && strncasecmp(line, "Content-Length", 14) == 0)
            return "Content-Length is evhub's to write";
        start = i + 2;
        i++;
    }
    return NULL;
}

static int req_append(hub_req *r, const char *text, size_t len, char *err, size_t errlen)
{
    sip_req *q = (sip_req *)r;
    int crlf = len >= 2 && text[len - 2] == '\r' && text[len - 1] == '\n';
    const char *why = header_lines_bad(text, crlf ? len - 2 : len);
    if (why) {
        snprintf(err, errlen, "%s", why);
        return -EINVAL;
    }
    pthread_mutex_lock(&q->m->mu);
    size_t n = q->append_len + len + (crlf ? 0 : 2);
    char *b = n > 16384 ? NULL : hub_realloc(q->append, n + 1);
    if (!b) {
        pthread_mutex_unlock(&q->m->mu);
        snprintf(err, errlen, "headers for the reply over 16 KiB");
        return -ENOBUFS;
    }
    memcpy(b + q->append_len, text, len);
    if (!crlf)
        memcpy(b + q->append_len + len, "\r\n", 2);
    b[n] = '\0';
    q->append = b;
    q->append_len = n;
    pthread_mutex_unlock(&q->m->mu);
    return 0;
}

static int req_suspend(hub_req *r, char *err, size_t errlen)
{
    sip_req *q = (sip_req *)r;
    sip_mod *m = q->m;
    pthread_mutex_lock(&m->mu);
    const char *why = q->final_sent  ? "the request was answered already"
                      : q->cancelled ? "the request was cancelled"
                      : q->suspended ? "the request is suspended already"
                                     : NULL;
    if (!why) {
        q->suspended = 1;
        q->resumed = 0;
        m->suspended++;
    }
    pthread_mutex_unlock(&m->mu);
    if (why) {
        snprintf(err, errlen, "%s", why);
        return -EALREADY;
    }
    post_op(q, OP_SUSPEND, 0, NULL, NULL);
    return 0;
}

static int req_suspend_wait(hub_req *r, uint64_t token, int timeout_ms, char *err, size_t errlen)
{
    sip_req *q = (sip_req *)r;
    pthread_mutex_lock(&q->m->mu);
    q->token = token;
    q->wait_ms = timeout_ms;
    pthread_mutex_unlock(&q->m->mu);
    int rc = req_suspend(r, err, errlen);
    if (rc < 0) {
        pthread_mutex_lock(&q->m->mu);
        q->token = 0;
        pthread_mutex_unlock(&q->m->mu);
    }
    return rc;
}

/* Complete a native waiter's token with key: value (value's reference passes). */
static void wake_token(sip_mod *m, uint64_t token, const char *key, json_object *value)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, key, value);
    hub_complete(m->h, token, o);
}

static int req_wake(hub_req *r, json_object *answer)
{
    sip_req *q = (sip_req *)r;
    pthread_mutex_lock(&q->m->mu);
    uint64_t tok = q->token;
    q->token = 0;
    pthread_mutex_unlock(&q->m->mu);
    if (!tok)
        return -EINVAL;
    wake_token(q->m, tok, "answer", answer);
    post_op(q, OP_WOKEN, 0, NULL, NULL);
    return 0;
}

static void req_unsuspend(hub_req *r)
{
    sip_req *q = (sip_req *)r;
    pthread_mutex_lock(&q->m->mu);
    unsuspend_locked(q);
    q->token = 0;
    pthread_mutex_unlock(&q->m->mu);
    post_op(q, OP_RELEASE, 0, NULL, NULL);
}

static void req_route_done(hub_req *r, int resumed)
{
    sip_req *q = (sip_req *)r;
    pthread_mutex_lock(&q->m->mu);
    /* After the first route, a request resumed meanwhile (t_continue) or expired (the
     * timeout route, 408) is someone else's to answer. */
    int answer = !q->final_sent && !q->suspended && !q->cancelled &&
                 (resumed || (!q->resumed && !q->expired));
    if (answer)
        q->final_sent = 1;
    pthread_mutex_unlock(&q->m->mu);
    if (!answer)
        return;
    atomic_fetch_add(&q->m->no_reply, 1);
    hub_log(HUB_LOG_WARN, "sip: %.*s %.*s: %s without a reply: 500", (int)q->pvlen[PV_RM],
            q->pv[PV_RM], (int)q->pvlen[PV_CI], q->pv[PV_CI],
            resumed ? "a route ended" : "the request route ended");
    post_op(q, OP_REPLY, 500, "Server Internal Error", NULL);
}

static const hub_req_ops req_ops = {
    .pv = req_pv,
    .reply = req_reply,
    .append_to_reply = req_append,
    .suspend = req_suspend,
    .unsuspend = req_unsuspend,
    .suspend_wait = req_suspend_wait,
    .wake = req_wake,
    .route_done = req_route_done,
    .ref = req_ref,
    .unref = req_unref,
};

/* t_continue: any thread. */
static hub_req *resume(void *ud, unsigned index, unsigned label, char *err, size_t errlen)
{
    sip_mod *m = ud;
    sip_req *q = NULL;
    const char *why = "no such transaction (unknown, or finished)";
    pthread_mutex_lock(&m->mu);
    sip_req *c = tr_sip_slots_get(&m->slots, index, label);
    if (c) {
        if (c->suspended) {
            unsuspend_locked(c);
            c->resumed = 1;
            req_ref(&c->base);
            q = c;
        } else {
            why = c->cancelled    ? "the transaction was cancelled"
                  : c->expired    ? "the transaction expired (async_timeout)"
                  : c->final_sent ? "the transaction was answered already"
                                  : "the transaction is not suspended";
        }
    }
    pthread_mutex_unlock(&m->mu);
    if (!q) {
        snprintf(err, errlen, "%s", why);
        return NULL;
    }
    post_op(q, OP_RELEASE, 0, NULL, NULL);
    return &q->base;
}

/* ---- transactions (loop thread) ---- */

static void txn_set_state(sip_txn *t, int st)
{
    t->m->nstate[t->state]--;
    t->state = st;
    t->m->nstate[st]++;
}

static void txn_send(sip_txn *t, const char *buf, size_t len)
{
    ssize_t n = sendto(t->lfd, buf, len, MSG_DONTWAIT, (struct sockaddr *)&t->dst, t->dstlen);
    if (n < 0)
        hub_log(HUB_LOG_DEBUG, "sip: sendto: %s", strerror(errno));
}

/* What a transaction owns, once it is in no list and holds no request. */
static void txn_free_unlinked(sip_txn *t)
{
    hub_free(t->key);
    hub_free(t->skel);
    hub_free(t->to);
    hub_free(t->to_tagged);
    hub_free(t->last);
    hub_free(t);
}

static void txn_destroy(sip_txn *t)
{
    sip_mod *m = t->m;
    sip_txn **pp = &m->buckets[t->hash & (SIP_BUCKETS - 1)];
    while (*pp && *pp != t)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = t->hnext;
    ev_timer_stop(m->loop, &t->t);
    ev_timer_stop(m->loop, &t->dl);
    m->ntxn--;
    m->nstate[t->state]--;
    sip_req *q = t->req;
    pthread_mutex_lock(&m->mu);
    tr_sip_slots_release(&m->slots, q->index, q->label);
    unsuspend_locked(q);
    uint64_t tok = q->token;
    q->token = 0;
    pthread_mutex_unlock(&m->mu);
    if (tok) /* a native handler still waits (t_continue answered it): it resumes */
        wake_token(m, tok, "error", json_object_new_string("the transaction ended"));
    q->txn = NULL;
    req_unref(&q->base);
    txn_free_unlinked(t);
}

/* Build and send a response; a final one moves the transaction on and arms its timers. */
/* A response for t's request, hub_malloc'd (NULL for no memory, logged). */
static char *build_response(const sip_txn *t, int code, const char *reason, const char *hdrs,
                            size_t *lenp)
{
    char *b = NULL, line[160];
    size_t len = 0, cap = 0;
    snprintf(line, sizeof(line), "SIP/2.0 %d %s\r\n", code, reason && *reason ? reason : "-");
    int fail = sbuf_str(&b, &len, &cap, line) < 0 || sbuf_str(&b, &len, &cap, t->skel) < 0 ||
               sbuf_str(&b, &len, &cap, code > 100 ? t->to_tagged : t->to) < 0 ||
               (hdrs && sbuf_str(&b, &len, &cap, hdrs) < 0) ||
               sbuf_str(&b, &len, &cap, "Server: evhub\r\nContent-Length: 0\r\n\r\n") < 0;
    if (fail) {
        hub_free(b);
        hub_log(HUB_LOG_ERR, "sip: out of memory building a %d", code);
        return NULL;
    }
    *lenp = len;
    return b;
}

static void txn_respond(sip_txn *t, int code, const char *reason, const char *hdrs)
{
    sip_mod *m = t->m;
    size_t len;
    char *b = build_response(t, code, reason, hdrs, &len);
    if (!b)
        return;
    txn_send(t, b, len);
    atomic_fetch_add(&m->replies, 1);
    hub_free(t->last);
    t->last = b;
    t->lastlen = len;
    t->last_code = code;
    if (code < 200) {
        if (t->state == TS_TRYING)
            txn_set_state(t, TS_PROCEEDING);
        return;
    }
    ev_timer_stop(m->loop, &t->dl);
    if (t->invite && code < 300) {
        /* 2xx: Accepted (RFC 6026) for 64*T1: a retransmitted INVITE gets the 2xx again and
         * never reaches the route twice. The ACK is end to end (another branch). */
        txn_set_state(t, TS_ACCEPTED);
        ev_timer_stop(m->loop, &t->t);
        ev_timer_set(&t->t, 64 * SIP_T1, 0.);
        ev_timer_start(m->loop, &t->t);
        return;
    }
    txn_set_state(t, TS_COMPLETED);
    if (t->invite) {
        t->g = SIP_T1;
        ev_timer_set(&t->t, SIP_T1, 0.);
    } else {
        ev_timer_set(&t->t, 64 * SIP_T1, 0.); /* timer J */
    }
    ev_timer_start(m->loop, &t->t);
    t->h_due = ev_now(m->loop) + 64 * SIP_T1;
}

static void txn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    sip_txn *t = w->data;
    (void)revents;
    if (t->invite && t->state == TS_COMPLETED) {
        if (ev_now(loop) >= t->h_due) {
            hub_log(HUB_LOG_INFO, "sip: no ACK for %d within 32 s (timer H)", t->last_code);
            txn_destroy(t);
            return;
        }
        txn_send(t, t->last, t->lastlen); /* timer G */
        atomic_fetch_add(&t->m->resp_retrans, 1);
        t->g = t->g * 2 < SIP_T2 ? t->g * 2 : SIP_T2;
        ev_timer_set(&t->t, t->g, 0.);
        ev_timer_start(loop, &t->t);
        return;
    }
    txn_destroy(t); /* timer I or J */
}

/* The timeout route runs with a view of the request whose route is that function and whose
 * route_done answers (500) whatever it left unanswered: the expired request is its own. */
typedef struct sip_troute {
    hub_req base;
    atomic_int refs;
    sip_req *q; /* a reference */
} sip_troute;

static sip_req *tq(hub_req *r) { return ((sip_troute *)r)->q; }
static int tr_pv(hub_req *r, const char *n, hub_pv *o) { return req_pv(&tq(r)->base, n, o); }
static int tr_reply(hub_req *r, int code, const char *reason, char *err, size_t errlen)
{
    return req_reply(&tq(r)->base, code, reason, err, errlen);
}
static int tr_append(hub_req *r, const char *t, size_t n, char *err, size_t errlen)
{
    return req_append(&tq(r)->base, t, n, err, errlen);
}
static int tr_suspend(hub_req *r, char *err, size_t errlen)
{
    (void)r;
    snprintf(err, errlen, "a request whose deadline passed cannot be suspended again");
    return -EALREADY;
}
static void tr_unsuspend(hub_req *r) { (void)r; }
static void tr_route_done(hub_req *r, int resumed)
{
    (void)resumed;
    req_route_done(&tq(r)->base, 1); /* answered by this route, or 500 */
}
static const char *tr_route(hub_req *r) { return tq(r)->m->conf.async_timeout_route; }
static void tr_ref(hub_req *r) { atomic_fetch_add(&((sip_troute *)r)->refs, 1); }
static void tr_unref(hub_req *r)
{
    sip_troute *v = (sip_troute *)r;
    if (atomic_fetch_sub(&v->refs, 1) == 1) {
        req_unref(&v->q->base);
        hub_free(v);
    }
}

static const hub_req_ops troute_ops = {
    .pv = tr_pv,
    .reply = tr_reply,
    .append_to_reply = tr_append,
    .suspend = tr_suspend,
    .unsuspend = tr_unsuspend,
    .route_done = tr_route_done,
    .route = tr_route,
    .ref = tr_ref,
    .unref = tr_unref,
};

/* Arm t's deadline timer to fire in after seconds. */
static void arm_dl(sip_txn *t, double after)
{
    ev_timer_stop(t->m->loop, &t->dl);
    ev_timer_set(&t->dl, after, 0.);
    ev_timer_start(t->m->loop, &t->dl);
    t->req->dl_armed = ev_now(t->m->loop);
}

/* A native waiter was woken: if nothing answers within SIP_WAKE_GRACE, the module does. */
static void grace_start(sip_txn *t)
{
    t->req->woken = 1;
    arm_dl(t, SIP_WAKE_GRACE);
}

/* The deadline of a suspended request: the timeout route, or 408; for a native waiter that
 * was woken, the end of its grace (500). */
static void deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    sip_txn *t = w->data;
    sip_mod *m = t->m;
    sip_req *q = t->req;
    (void)loop, (void)revents;
    if (q->woken) {
        if (claim_final(q)) {
            atomic_fetch_add(&m->no_reply, 1);
            hub_log(HUB_LOG_WARN,
                    "sip: %.*s %.*s: the handler did not answer within %.0f s of its wake-up "
                    "(its state may be gone): 500",
                    (int)q->pvlen[PV_RM], q->pv[PV_RM], (int)q->pvlen[PV_CI], q->pv[PV_CI],
                    SIP_WAKE_GRACE);
            txn_respond(t, 500, "Server Internal Error", NULL);
        }
        return;
    }
    pthread_mutex_lock(&m->mu);
    int expire = q->suspended && !q->final_sent;
    uint64_t tok = 0;
    if (expire) {
        unsuspend_locked(q);
        q->expired = 1;
        tok = q->token;
        q->token = 0;
    }
    pthread_mutex_unlock(&m->mu);
    if (!expire)
        return;
    atomic_fetch_add(&m->async_timeouts, 1);
    if (tok) {
        /* A native handler waits: it resumes with nil, "timeout" and answers itself. */
        wake_token(m, tok, "error", json_object_new_string("timeout"));
        grace_start(t);
        return;
    }
    if (m->conf.async_timeout_route[0]) {
        sip_troute *v = hub_malloc(sizeof(*v));
        if (v) {
            v->base.ops = &troute_ops;
            atomic_init(&v->refs, 1);
            v->q = q;
            req_ref(&q->base);
            hub_request(m->h, fnv(q->pv[PV_CI], q->pvlen[PV_CI]), &v->base);
            return;
        }
        hub_log(HUB_LOG_ERR, "sip: out of memory for the timeout route: 408");
    }
    if (claim_final(q))
        txn_respond(t, 408, "Request Timeout", NULL);
}

static void run_op(hub *h, void *arg)
{
    sip_op *o = arg;
    sip_req *q = o->q;
    sip_txn *t = q->txn;
    (void)h;
    if (t) {
        sip_mod *m = t->m;
        switch (o->op) {
        case OP_REPLY:
            txn_respond(t, o->code, o->reason, o->hdrs);
            break;
        case OP_SUSPEND:
            pthread_mutex_lock(&m->mu);
            int still = q->suspended, trying = t->invite && !q->provisional_sent;
            if (trying)
                q->provisional_sent = 1;
            pthread_mutex_unlock(&m->mu);
            if (still && !ev_is_active(&t->dl))
                arm_dl(t, (q->wait_ms ? q->wait_ms : m->conf.async_timeout) / 1000.0);
            if (still && trying)
                txn_respond(t, 100, "Trying", NULL);
            break;
        case OP_RELEASE:
            pthread_mutex_lock(&m->mu);
            int susp = q->suspended;
            pthread_mutex_unlock(&m->mu);
            if (!susp && !q->woken)
                ev_timer_stop(m->loop, &t->dl);
            break;
        case OP_WOKEN: {
            pthread_mutex_lock(&m->mu);
            int open_ = !q->final_sent;
            pthread_mutex_unlock(&m->mu);
            if (open_)
                grace_start(t);
            break;
        }
        }
    }
    hub_free(o->hdrs);
    req_unref(&q->base);
    hub_free(o);
}

/* ---- receiving ---- */

static sip_txn *txn_find(sip_mod *m, const char *key, size_t klen, uint32_t hv)
{
    for (sip_txn *t = m->buckets[hv & (SIP_BUCKETS - 1)]; t; t = t->hnext) {
        if (t->hash == hv && strncmp(t->key, key, klen) == 0 && t->key[klen] == '\0')
            return t;
    }
    return NULL;
}

static void log_malformed(sip_mod *m, const char *from, const char *why)
{
    atomic_fetch_add(&m->malformed, 1);
    double now = ev_now(m->loop);
    if (now - m->last_malformed_log < 1.0) {
        m->malformed_quiet++;
        return;
    }
    hub_log(HUB_LOG_NOTICE, "sip: malformed datagram from %s dropped: %s%s", from, why,
            m->malformed_quiet ? " (and more not logged)" : "");
    m->last_malformed_log = now;
    m->malformed_quiet = 0;
}

/* A stateless reply to a request no transaction takes (overload, shutting down, CANCEL with
 * no INVITE): built from a transaction on the stack. */
static void stateless_reply(sip_mod *m, sip_txn *tmp, int code, const char *reason)
{
    size_t len;
    char *b = build_response(tmp, code, reason, NULL, &len);
    if (b) {
        txn_send(tmp, b, len);
        atomic_fetch_add(&m->replies, 1);
    }
    hub_free(b);
}

/* The To header with a tag of ours for responses above 100 (unless it has one). */
static int build_to(sip_txn *t, osip_message_t *msg, uint32_t seed)
{
    char *s = NULL;
    if (osip_to_to_str(msg->to, &s) != 0 || !s)
        return -1;
    osip_generic_param_t *tag = NULL;
    osip_to_get_tag(msg->to, &tag);
    size_t n = strlen(s);
    t->to = hub_malloc(n + 7);
    t->to_tagged = hub_malloc(n + 7 + 5 + SIP_TO_TAG_LEN + 1);
    if (!t->to || !t->to_tagged) {
        osip_free(s);
        return -1;
    }
    snprintf(t->to, n + 7, "To: %s\r\n", s);
    if (tag)
        snprintf(t->to_tagged, n + 7, "To: %s\r\n", s);
    else
        snprintf(t->to_tagged, n + 7 + 5 + SIP_TO_TAG_LEN + 1, "To: %s;tag=%08x%08x\r\n", s, seed,
                 fnv((const char *)&t, sizeof(t)));
    osip_free(s);
    return 0;
}

/* The response's fixed headers: every Via (the top one with received and rport filled),
 * From, Call-ID, CSeq. Also where responses go (RFC 3261 18.2.2 and RFC 3581). */
static int build_skel(sip_txn *t, osip_message_t *msg, const char *src_ip, int src_port,
                      const struct sockaddr_storage *src, socklen_t srclen)
{
    char *b = NULL, *s = NULL;
    size_t len = 0, cap = 0;
    t->dst = *src;
    t->dstlen = srclen;
    for (int i = 0;; i++) {
        osip_via_t *via = NULL;
        if (osip_message_get_via(msg, i, &via) < 0 || !via)
            break;
        if (i == 0) {
            osip_generic_param_t *rport = NULL, *recv = NULL;
            osip_via_param_get_byname(via, "rport", &rport);
            osip_via_param_get_byname(via, "received", &recv);
            if (!recv && (!via->host || strcmp(via->host, src_ip) != 0))
                osip_via_set_received(via, osip_strdup(src_ip));
            if (rport) {
                char pb[8];
                snprintf(pb, sizeof(pb), "%d", src_port);
                osip_free(rport->gvalue);
                rport->gvalue = osip_strdup(pb);
            } else {
                /* Without rport: to the source address, at the port in the Via. */
                int port = via->port ? atoi(via->port) : 5060;
                if (t->dst.ss_family == AF_INET)
                    ((struct sockaddr_in *)&t->dst)->sin_port = htons((uint16_t)port);
                else
                    ((struct sockaddr_in6 *)&t->dst)->sin6_port = htons((uint16_t)port);
            }
        }
        if (osip_via_to_str(via, &s) != 0 || !s)
            goto fail;
        int bad = sbuf_str(&b, &len, &cap, "Via: ") < 0 || sbuf_str(&b, &len, &cap, s) < 0 ||
                  sbuf_str(&b, &len, &cap, "\r\n") < 0;
        osip_free(s);
        s = NULL;
        if (bad)
            goto fail;
    }
    if (osip_from_to_str(msg->from, &s) != 0 || !s || sbuf_str(&b, &len, &cap, "From: ") < 0 ||
        sbuf_str(&b, &len, &cap, s) < 0 || sbuf_str(&b, &len, &cap, "\r\n") < 0)
        goto fail;
    osip_free(s);
    s = NULL;
    if (osip_call_id_to_str(msg->call_id, &s) != 0 || !s ||
        sbuf_str(&b, &len, &cap, "Call-ID: ") < 0 || sbuf_str(&b, &len, &cap, s) < 0 ||
        sbuf_str(&b, &len, &cap, "\r\n") < 0)
        goto fail;
    osip_free(s);
    s = NULL;
    if (osip_cseq_to_str(msg->cseq, &s) != 0 || !s || sbuf_str(&b, &len, &cap, "CSeq: ") < 0 ||
        sbuf_str(&b, &len, &cap, s) < 0 || sbuf_str(&b, &len, &cap, "\r\n") < 0)
        goto fail;
    osip_free(s);
    t->skel = b;
    return 0;
fail:
    if (s)
        osip_free(s);
    hub_free(b);
    return -1;
}

static char *uri_str(osip_uri_t *u, size_t *len)
{
    char *s = NULL;
    if (!u || osip_uri_to_str(u, &s) != 0 || !s)
        return NULL;
    char *d = hub_strndup(s, strlen(s));
    osip_free(s);
    if (d)
        *len = strlen(d);
    return d;
}

static void set_pv(sip_req *q, int i, const char *s)
{
    if (s) {
        q->pv[i] = hub_strndup(s, strlen(s));
        q->pvlen[i] = q->pv[i] ? strlen(s) : 0;
    }
}

/* A new request's copy of what scripts may read. NULL for no memory. */
static sip_req *req_new(sip_mod *m, osip_message_t *msg, const char *buf, size_t n, const char *ip,
                        int port)
{
    sip_req *q = hub_calloc(1, sizeof(*q));
    if (!q || !(q->raw = hub_strndup(buf, n))) {
        hub_free(q);
        return NULL;
    }
    q->base.ops = &req_ops;
    atomic_init(&q->refs, 1);
    q->m = m;
    q->rawlen = n;
    const char *sep = strstr(q->raw, "\r\n\r\n");
    q->hdr_end = sep ? (size_t)(sep - q->raw) + 2 : n;
    q->body_off = sep ? (size_t)(sep - q->raw) + 4 : n;
    q->invite = strcmp(msg->sip_method, "INVITE") == 0;
    set_pv(q, PV_RM, msg->sip_method);
    q->pv[PV_RU] = uri_str(msg->req_uri, &q->pvlen[PV_RU]);
    set_pv(q, PV_RUSER, msg->req_uri ? msg->req_uri->username : NULL);
    set_pv(q, PV_RDOM, msg->req_uri ? msg->req_uri->host : NULL);
    q->pv[PV_FU] = uri_str(msg->from ? msg->from->url : NULL, &q->pvlen[PV_FU]);
    set_pv(q, PV_FUSER, msg->from && msg->from->url ? msg->from->url->username : NULL);
    q->pv[PV_TU] = uri_str(msg->to ? msg->to->url : NULL, &q->pvlen[PV_TU]);
    set_pv(q, PV_TUSER, msg->to && msg->to->url ? msg->to->url->username : NULL);
    char *ci = NULL;
    if (osip_call_id_to_str(msg->call_id, &ci) == 0 && ci) {
        set_pv(q, PV_CI, ci);
        osip_free(ci);
    }
    snprintf(q->si, sizeof(q->si), "%s", ip);
    q->sp = port;
    if (!q->pv[PV_CI] || !q->pv[PV_RM]) {
        req_free(q);
        return NULL;
    }
    return q;
}

/* The transaction key: branch, sent-by and the method's class (an ACK and a CANCEL match
 * their INVITE's branch; RFC 3261 17.2.3). Returns its length, or 0. */
static size_t txn_key(osip_message_t *msg, const char *method, char *out, size_t cap)
{
    osip_via_t *via = NULL;
    osip_generic_param_t *br = NULL;
    if (osip_message_get_via(msg, 0, &via) < 0 || !via || !via->host)
        return 0;
    osip_via_param_get_byname(via, "branch", &br);
    int n;
    if (br && br->gvalue && strncmp(br->gvalue, "z9hG4bK", 7) == 0) {
        n = snprintf(out, cap, "%s|%s:%s|%s", br->gvalue, via->host, via->port ? via->port : "",
                     method);
    } else {
        /* RFC 2543 peers: Call-ID, CSeq number, From tag. */
        osip_generic_param_t *ft = NULL;
        osip_from_get_tag(msg->from, &ft);
        n = snprintf(out, cap, "%s|%s|%s|%s", msg->call_id->number,
                     msg->cseq->number ? msg->cseq->number : "", ft && ft->gvalue ? ft->gvalue : "",
                     method);
    }
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

static sip_txn *txn_new(sip_mod *m, const char *key, size_t klen, uint32_t hv, int invite, int lfd)
{
    sip_txn *t = hub_calloc(1, sizeof(*t));
    if (!t || !(t->key = hub_strndup(key, klen))) {
        hub_free(t);
        return NULL;
    }
    t->m = m;
    t->hash = hv;
    t->invite = invite;
    t->lfd = lfd;
    t->state = invite ? TS_PROCEEDING : TS_TRYING;
    ev_init(&t->t, txn_timer_cb);
    ev_init(&t->dl, deadline_cb);
    t->t.data = t->dl.data = t;
    return t;
}

static void on_request(sip_mod *m, int lfd, osip_message_t *msg, const char *buf, size_t n,
                       const struct sockaddr_storage *src, socklen_t srclen, const char *ip,
                       int port)
{
    char key[512];
    const char *method = msg->sip_method;
    int is_ack = strcmp(method, "ACK") == 0, is_cancel = strcmp(method, "CANCEL") == 0;
    size_t klen = txn_key(msg, is_ack ? "INVITE" : method, key, sizeof(key));
    if (!klen) {
        log_malformed(m, ip, "no usable Via");
        return;
    }
    uint32_t hv = fnv(key, klen);
    sip_txn *t = txn_find(m, key, klen, hv);
    if (is_ack) {
        if (t && t->state == TS_COMPLETED) {
            txn_set_state(t, TS_CONFIRMED); /* timer I */
            ev_timer_stop(m->loop, &t->t);
            ev_timer_set(&t->t, SIP_T4, 0.);
            ev_timer_start(m->loop, &t->t);
            atomic_fetch_add(&m->acks_absorbed, 1);
        } else if (t) {
            atomic_fetch_add(&m->acks_absorbed, 1);
        } else {
            atomic_fetch_add(&m->acks_unmatched, 1); /* an ACK for a 2xx: end to end */
        }
        return;
    }
    if (t) {
        /* A retransmission: absorbed, and answered again with the last response. */
        atomic_fetch_add(&m->retrans_absorbed, 1);
        if (t->last) {
            txn_send(t, t->last, t->lastlen);
            atomic_fetch_add(&m->resp_retrans, 1);
        }
        return;
    }
    int invite = strcmp(method, "INVITE") == 0;
    sip_txn tmp = {.m = m, .lfd = lfd};
    if (m->draining || atomic_load(&m->ntxn) >= (size_t)m->conf.max_transactions ||
        m->slots.nfree < 2) {
        if (build_skel(&tmp, msg, ip, port, src, srclen) == 0 && build_to(&tmp, msg, hv) == 0) {
            if (m->draining)
                stateless_reply(m, &tmp, 503, "Shutting Down");
            else
                stateless_reply(m, &tmp, 503, "Too Many Transactions");
        }
        if (!m->draining)
            atomic_fetch_add(&m->overload, 1);
        hub_free(tmp.skel);
        hub_free(tmp.to);
        hub_free(tmp.to_tagged);
        return;
    }
    t = txn_new(m, key, klen, hv, invite, lfd);
    if (!t || build_skel(t, msg, ip, port, src, srclen) < 0 || build_to(t, msg, hv) < 0) {
        if (t)
            txn_free_unlinked(t);
        hub_log(HUB_LOG_ERR, "sip: out of memory for a transaction");
        return;
    }
    if (is_cancel) {
        /* Its own transaction (for retransmissions), answered at once; the INVITE it
         * cancels shares its branch. */
        char ikey[512];
        size_t ilen = txn_key(msg, "INVITE", ikey, sizeof(ikey));
        sip_txn *inv = ilen ? txn_find(m, ikey, ilen, fnv(ikey, ilen)) : NULL;
        /* The CANCEL transaction holds a request of its own (answered already), so it lives
         * and dies as any other. */
        sip_req *cq = req_new(m, msg, buf, n, ip, port);
        if (!cq) {
            txn_free_unlinked(t);
            return;
        }
        pthread_mutex_lock(&m->mu);
        tr_sip_slots_take(&m->slots, cq, &cq->index, &cq->label); /* nfree checked above */
        cq->final_sent = 1;
        pthread_mutex_unlock(&m->mu);
        cq->txn = t;
        t->req = cq;
        t->hnext = m->buckets[hv & (SIP_BUCKETS - 1)];
        m->buckets[hv & (SIP_BUCKETS - 1)] = t;
        m->ntxn++;
        m->nstate[t->state]++;
        atomic_fetch_add(&m->requests, 1);
        if (!inv) {
            txn_respond(t, 481, "Call/Transaction Does Not Exist", NULL);
            return;
        }
        txn_respond(t, 200, "OK", NULL);
        sip_req *iq = inv->req;
        pthread_mutex_lock(&m->mu);
        int cancel = !iq->final_sent;
        uint64_t tok = 0;
        if (cancel) {
            iq->final_sent = 1;
            iq->cancelled = 1;
            unsuspend_locked(iq);
            tok = iq->token;
            iq->token = 0;
        }
        pthread_mutex_unlock(&m->mu);
        if (tok) /* a native handler waits: it resumes with nil, "cancelled" */
            wake_token(m, tok, "error", json_object_new_string("cancelled"));
        if (cancel) {
            atomic_fetch_add(&m->cancels, 1);
            txn_respond(inv, 487, "Request Terminated", NULL);
        }
        return;
    }
    sip_req *q = req_new(m, msg, buf, n, ip, port);
    if (!q) {
        txn_free_unlinked(t);
        hub_log(HUB_LOG_ERR, "sip: out of memory for a request");
        return;
    }
    pthread_mutex_lock(&m->mu);
    tr_sip_slots_take(&m->slots, q, &q->index, &q->label); /* nfree checked above */
    pthread_mutex_unlock(&m->mu);
    q->txn = t;
    t->req = q; /* the transaction's reference */
    t->hnext = m->buckets[hv & (SIP_BUCKETS - 1)];
    m->buckets[hv & (SIP_BUCKETS - 1)] = t;
    m->ntxn++;
    m->nstate[t->state]++;
    atomic_fetch_add(&m->requests, 1);
    /* The route runs in the executor the Call-ID picks (inline when workers = 0). */
    req_ref(&q->base);
    hub_request(m->h, fnv(q->pv[PV_CI], q->pvlen[PV_CI]), &q->base);
}

static void handle_datagram(sip_mod *m, int lfd, const char *buf, size_t n,
                            const struct sockaddr_storage *src, socklen_t srclen)
{
    char ip[HUB_ADDR_MAX];
    uint16_t port;
    hub_addr_str((const struct sockaddr *)src, ip, sizeof(ip), &port);
    if (n < 4 || (n <= 4 && strspn(buf, "\r\n") == n))
        return; /* keep-alive CRLFs */
    osip_message_t *msg = NULL;
    const char *why;
    if (tr_sip_parse(buf, n, &msg, &why) < 0) {
        log_malformed(m, ip, why);
        return;
    }
    if (MSG_IS_RESPONSE(msg))
        atomic_fetch_add(&m->stray, 1); /* evhub sends no requests */
    else
        on_request(m, lfd, msg, buf, n, src, srclen, ip, port);
    osip_message_free(msg);
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    sip_listener *l = w->data;
    sip_mod *m = l->m;
    (void)loop, (void)revents;
    for (int i = 0; i < SIP_READS; i++) {
        struct sockaddr_storage src;
        socklen_t sl = sizeof(src);
        ssize_t n = recvfrom(l->fd, m->rbuf, sizeof(m->rbuf) - 1, MSG_DONTWAIT,
                             (struct sockaddr *)&src, &sl);
        if (n < 0)
            return;
        m->rbuf[n] = '\0';
        handle_datagram(m, l->fd, m->rbuf, (size_t)n, &src, sl);
    }
}

/* ---- listeners ---- */

static int open_udp(sip_listener *l, const char *spec, char *err, size_t errlen)
{
    char host[256], port[16];
    if (strncmp(spec, "udp:", 4) != 0) {
        snprintf(err, errlen, "listen '%s': only udp:HOST:PORT is supported (tcp: is not built)",
                 spec);
        return -EINVAL;
    }
    if (hub_config_split_addr(spec + 4, host, sizeof(host), port, sizeof(port)) < 0) {
        snprintf(err, errlen, "listen '%s': expected udp:HOST:PORT or udp:[V6]:PORT", spec);
        return -EINVAL;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_DGRAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE};
    struct addrinfo *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0) {
        snprintf(err, errlen, "listen '%s': %s (a numeric address is needed)", spec,
                 gai_strerror(rc));
        return -EINVAL;
    }
    int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1, rcv = 4 * 1024 * 1024;
    if (fd >= 0 && ai->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    /* A burst of datagrams waits in the kernel, not dropped: 4 MiB (past rmem_max when the
     * hub may, as root). */
    if (fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        snprintf(err, errlen, "listen '%s': %s", spec, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -EINVAL;
    }
    freeaddrinfo(ai);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    char ip[HUB_ADDR_MAX];
    uint16_t p;
    hub_addr_str((struct sockaddr *)&ss, ip, sizeof(ip), &p);
    snprintf(l->desc, sizeof(l->desc), ss.ss_family == AF_INET6 ? "udp:[%s]:%u" : "udp:%s:%u", ip,
             (unsigned)p);
    l->fd = fd;
    return 0;
}

/* ---- control: evhubctl sip status ---- */

static const hub_ctl_param ctl_params[] = {
    {"action", HUB_CTL_STRING, 1, "status"},
};

static const hub_ctl_spec ctl_spec = {
    "sip", "the SIP listener: status",
    "sip status: the listeners, transactions by state, how many are suspended and the oldest "
    "one's age, async timeouts, retransmissions absorbed and sent, malformed datagrams dropped.",
    ctl_params, 1};

static void cmd_sip(hub_ctl_call *call, json_object *params, void *ud)
{
    sip_mod *m = ud;
    json_object *a = NULL;
    json_object_object_get_ex(params, "action", &a);
    if (strcmp(json_object_get_string(a), "status") != 0) {
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS, "sip: unknown action '%s' (status)",
                     json_object_get_string(a));
        return;
    }
    json_object *o = json_object_new_object(), *ls = json_object_new_array();
    for (int i = 0; i < m->nls; i++)
        json_object_array_add(ls, json_object_new_string(m->ls[i].desc));
    json_object_object_add(o, "listeners", ls);
    json_object *st = json_object_new_object();
    for (int i = 0; i < TS_NSTATES; i++)
        json_object_object_add(st, ts_names[i], json_object_new_int64((int64_t)m->nstate[i]));
    json_object_object_add(o, "transactions",
                           json_object_new_int64((int64_t)atomic_load(&m->ntxn)));
    json_object_object_add(o, "by_state", st);
    /* the oldest suspended: the one whose deadline comes first */
    double oldest = 0;
    size_t susp = 0;
    for (size_t b = 0; b < SIP_BUCKETS; b++) {
        for (sip_txn *t = m->buckets[b]; t; t = t->hnext) {
            if (!ev_is_active(&t->dl) || t->req->woken)
                continue;
            susp++;
            double age = ev_now(m->loop) - t->req->dl_armed;
            if (age > oldest)
                oldest = age;
        }
    }
    pthread_mutex_lock(&m->mu);
    json_object_object_add(o, "suspended", json_object_new_int64((int64_t)m->suspended));
    pthread_mutex_unlock(&m->mu);
    json_object_object_add(o, "oldest_suspended_ms",
                           json_object_new_int64((int64_t)(oldest * 1000)));
    (void)susp;
    struct {
        const char *k;
        atomic_uint_fast64_t *v;
    } c[] = {
        {"requests", &m->requests},
        {"async_timeouts", &m->async_timeouts},
        {"retransmissions_absorbed", &m->retrans_absorbed},
        {"responses_retransmitted", &m->resp_retrans},
        {"malformed_dropped", &m->malformed},
        {"cancels", &m->cancels},
        {"acks_absorbed", &m->acks_absorbed},
        {"acks_unmatched", &m->acks_unmatched},
        {"responses_received", &m->stray},
        {"replies", &m->replies},
        {"no_reply_500", &m->no_reply},
        {"overload_503", &m->overload},
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++)
        json_object_object_add(o, c[i].k, json_object_new_int64((int64_t)atomic_load(c[i].v)));
    hub_ctl_reply(call, o);
}

/* ---- the module ---- */

static int sip_init(hub *h, void **state, char *err, size_t errlen)
{
    const hub_config *cfg = hub_get_config(h);
    const hub_conf_instance *in = hub_conf_next(cfg, "sip", NULL);
    if (!in)
        return 0; /* no [sip]: nothing of it runs */
    sip_mod *m = hub_calloc(1, sizeof(*m));
    if (!m) {
        snprintf(err, errlen, "sip: out of memory");
        return -ENOMEM;
    }
    *state = m;
    for (int i = 0; i < SIP_MAX_LISTEN; i++)
        m->ls[i].fd = -1;
    pthread_mutex_init(&m->mu, NULL);
    m->h = h;
    m->loop = hub_loop(h);
    m->conf = *(const sip_conf *)in->data;
    if (m->conf.listen.n == 0) {
        snprintf(err, errlen, "%s:%d: [sip] needs at least one listen = udp:HOST:PORT", in->file,
                 in->line);
        return -EINVAL;
    }
    if (m->conf.listen.n > SIP_MAX_LISTEN) {
        snprintf(err, errlen, "%s:%d: [sip] at most %d listen lines", in->file,
                 m->conf.listen.items[SIP_MAX_LISTEN].line, SIP_MAX_LISTEN);
        return -EINVAL;
    }
    if (tr_sip_parser_init() != 0) {
        snprintf(err, errlen, "sip: libosip2's parser did not initialise");
        return -EINVAL;
    }
    m->buckets = hub_calloc(SIP_BUCKETS, sizeof(*m->buckets));
    if (!m->buckets || tr_sip_slots_init(&m->slots, m->conf.max_transactions) < 0) {
        snprintf(err, errlen, "sip: out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < m->conf.listen.n; i++) {
        char why[200];
        sip_listener *l = &m->ls[i];
        if (open_udp(l, m->conf.listen.items[i].value, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "%s:%d: [sip] %s", in->file, m->conf.listen.items[i].line, why);
            return -EINVAL;
        }
        l->m = m;
        ev_io_init(&l->io, read_cb, l->fd, EV_READ);
        l->io.data = l;
        m->nls++;
    }
    if (hub_set_req_resolver(h, resume, m) < 0) {
        snprintf(err, errlen, "sip: another module resolves t_continue");
        return -EINVAL;
    }
    if (hub_ctl_register(hub_get_ctl(h), &ctl_spec, cmd_sip, m) < 0) {
        snprintf(err, errlen, "sip: cannot register the sip control command");
        return -EINVAL;
    }
    return 0;
}

static int sip_start(void *state, char *err, size_t errlen)
{
    sip_mod *m = state;
    (void)err, (void)errlen;
    if (!m)
        return 0;
    for (int i = 0; i < m->nls; i++) {
        ev_io_start(m->loop, &m->ls[i].io);
        hub_log(HUB_LOG_INFO, "sip: receiving on %s", m->ls[i].desc);
    }
    return 0;
}

/* Unanswered transactions: shutdown waits for them (up to shutdown_timeout). */
static size_t sip_drain(void *state)
{
    sip_mod *m = state;
    if (!m)
        return 0;
    m->draining = 1;
    size_t n = 0;
    pthread_mutex_lock(&m->mu);
    for (size_t b = 0; b < SIP_BUCKETS; b++) {
        for (sip_txn *t = m->buckets[b]; t; t = t->hnext)
            n += !t->req->final_sent;
    }
    pthread_mutex_unlock(&m->mu);
    return n;
}

static void sip_stop(void *state)
{
    sip_mod *m = state;
    if (!m)
        return;
    size_t answered = 0;
    for (size_t b = 0; b < SIP_BUCKETS; b++) {
        while (m->buckets[b]) {
            sip_txn *t = m->buckets[b];
            sip_req *q = t->req;
            pthread_mutex_lock(&m->mu);
            int send = !q->final_sent;
            q->final_sent = 1;
            uint64_t tok = q->token;
            q->token = 0;
            pthread_mutex_unlock(&m->mu);
            if (tok)
                wake_token(m, tok, "error", json_object_new_string("stopping"));
            if (send) {
                /* txn_respond may destroy t (a 2xx); a 503 never does */
                txn_respond(t, 503, "Shutting Down", NULL);
                answered++;
            }
            txn_destroy(t);
        }
    }
    if (answered)
        hub_log(HUB_LOG_NOTICE, "sip: %zu unanswered transactions got 503 at shutdown", answered);
    for (int i = 0; i < m->nls; i++) {
        ev_io_stop(m->loop, &m->ls[i].io);
        close(m->ls[i].fd);
        m->ls[i].fd = -1;
    }
}

static void sip_free(void *state)
{
    sip_mod *m = state;
    if (!m)
        return;
    if (m->buckets) {
        for (size_t b = 0; b < SIP_BUCKETS; b++) {
            while (m->buckets[b])
                txn_destroy(m->buckets[b]);
        }
    }
    for (int i = 0; i < SIP_MAX_LISTEN; i++) {
        if (m->ls[i].fd >= 0)
            close(m->ls[i].fd);
    }
    hub_free(m->buckets);
    tr_sip_slots_free(&m->slots);
    pthread_mutex_destroy(&m->mu);
    hub_free(m);
}

static size_t sip_stats(void *state, hub_stat *out, size_t cap)
{
    sip_mod *m = state;
    if (!m)
        return 0;
    pthread_mutex_lock(&m->mu);
    uint64_t susp = m->suspended;
    pthread_mutex_unlock(&m->mu);
    const struct {
        const char *name, *help;
        int gauge;
        uint64_t v;
    } s[] = {
        {"sip_requests", "SIP requests that started a transaction", 0, atomic_load(&m->requests)},
        {"sip_transactions", "SIP server transactions alive", 1, (uint64_t)atomic_load(&m->ntxn)},
        {"sip_suspended", "SIP requests suspended, waiting for t_continue", 1, susp},
        {"sip_async_timeouts", "suspended SIP requests whose async_timeout passed", 0,
         atomic_load(&m->async_timeouts)},
        {"sip_retransmissions_absorbed", "retransmitted SIP requests absorbed", 0,
         atomic_load(&m->retrans_absorbed)},
        {"sip_responses_retransmitted", "SIP responses sent again (timer G, retransmissions)", 0,
         atomic_load(&m->resp_retrans)},
        {"sip_malformed_dropped", "datagrams dropped as malformed", 0, atomic_load(&m->malformed)},
        {"sip_cancels", "INVITEs cancelled (487)", 0, atomic_load(&m->cancels)},
        {"sip_replies", "SIP responses sent", 0, atomic_load(&m->replies)},
        {"sip_no_reply", "requests a route left unanswered (500)", 0, atomic_load(&m->no_reply)},
        {"sip_overload", "requests refused for max_transactions (503)", 0,
         atomic_load(&m->overload)},
        {"sip_acks_unmatched", "ACKs that matched no transaction (for a 2xx: end to end)", 0,
         atomic_load(&m->acks_unmatched)},
        {"sip_responses_received", "SIP responses received and dropped (evhub sends no requests)",
         0, atomic_load(&m->stray)},
    };
    size_t n = sizeof(s) / sizeof(s[0]);
    for (size_t i = 0; i < n && i < cap; i++)
        out[i] = (hub_stat){.name = s[i].name,
                            .help = s[i].help,
                            .gauge = s[i].gauge,
                            .worker = -1,
                            .value = s[i].v};
    return n;
}

const hub_module sip_module = {
    .name = "sip",
    .sections = sip_sections,
    .init = sip_init,
    .start = sip_start,
    .drain = sip_drain,
    .stop = sip_stop,
    .free = sip_free,
    .stats = sip_stats,
};
