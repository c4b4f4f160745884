/* The control socket server: accepts on a unix socket (and optionally loopback TCP), reads
 * JSON-RPC 2.0 requests with json-c's incremental tokener, checks them against the registered
 * commands' specs and writes one JSON text per line back. Every socket is non-blocking and
 * owned by the loop. A request that is valid JSON but not a valid request gets an error and
 * the connection goes on; text that is not JSON gets an error and ends the connection (see
 * parse_failed). */
#define _GNU_SOURCE 1 /* accept4 */
#include "hub/control.h"
#include "hub/listen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <ev.h>
#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/log.h"

typedef struct ctl_cmd {
    const hub_ctl_spec *spec;
    hub_ctl_fn fn;
    void *ud;
} ctl_cmd;

typedef struct ctl_conn ctl_conn;

/* A batch request. Its elements are started one by one as backpressure allows, only once the
 * connection has no other call under way, and their answers are written as they come, as one
 * array (JSON-RPC lets them come in any order): nothing else is written to the connection
 * meanwhile, since no other request is read until the batch ends. */
typedef struct ctl_batch {
    ctl_conn *conn;
    json_object *doc; /* the batch (a reference) */
    size_t next, n;   /* the next element to start, and how many there are */
    int started;      /* its first element has started */
    int outstanding;  /* calls started and not yet answered */
    int answered;     /* "[" is written: at least one answer went out */
} ctl_batch;

struct hub_ctl_call {
    ctl_conn *conn;
    int has_id;      /* 0 for a notification (no answer is sent) */
    json_object *id; /* the request's id; NULL is JSON null (json-c has no null object) */
    ctl_batch *batch;
    const char *method;
};

struct ctl_conn {
    ev_io rio, wio;
    hub_ctl *ctl;
    ctl_conn *prev, *next;
    int fd;            /* -1 once closed: pending calls' answers are dropped */
    int refs;          /* the connection itself, plus each call not yet answered */
    int eof;           /* the peer will send nothing more (or reading was given up) */
    int discard;       /* reading was given up: what still comes is read and dropped */
    ev_timer linger_w; /* once answered: how long a discarding connection waits for EOF */
    ev_timer idle_w;   /* HUB_CTL_IDLE_TIMEOUT, re-armed from active when it fires */
    ev_tstamp active;  /* the last progress: a request read, or answer bytes taken */
    size_t doc_bytes;
    json_tokener *tok;
    char *out;
    size_t out_len, out_off, out_cap;
    char *in; /* HUB_CTL_READ bytes: what was read and not yet parsed */
    size_t in_len, in_off;
    int calls;        /* calls started and not yet answered */
    ctl_batch *batch; /* a batch under way */
    int pumping;      /* conn_pump is running (calls it makes re-enter it) */
    ev_timer pump_w;  /* a pump asked for by a call that ended outside conn_pump */
};

struct hub_ctl {
    struct ev_loop *loop;
    int ufd, tfd, tcp_port;
    hub_listener *ul, *tl; /* accepting on ufd and tfd (listen.c: bounded, EMFILE cure) */
    ino_t ino;             /* the socket file we made, so we remove only ours */
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    ctl_cmd *cmds;
    size_t ncmds, cap;
    ctl_conn *conns;
    int nconns;  /* open, not lingering */
    int nlinger; /* answered after a parse error, reading on until EOF (HUB_CTL_LINGER) */
    atomic_ullong requests; /* written by the loop only, read by any thread */
};

static void conn_close(ctl_conn *c);
static void conn_unref(ctl_conn *c);
static void conn_pump(ctl_conn *c);

/* A call that ends outside conn_pump (a module's reply, often from inside a library's
 * callback) never starts the connection's next request itself: that would run a command,
 * and whatever it does, inside the module's callback. The next request starts from the loop,
 * at its next iteration. */
static void pump_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    conn_pump(w->data);
}

static void conn_pump_soon(ctl_conn *c)
{
    if (c->pumping || c->fd < 0 || ev_is_active(&c->pump_w))
        return; /* a pump under way goes on by itself */
    ev_timer_set(&c->pump_w, 0., 0.);
    ev_timer_start(c->ctl->loop, &c->pump_w);
}

static void linger_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    conn_close(w->data);
}

/* A last word before the hub closes a connection itself, best effort: only when no answer is
 * part-written, so it cannot land inside one. */
static void send_notice(int fd, const char *msg)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf),
                     "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":%d,"
                     "\"message\":\"%s\"}}\n",
                     HUB_CTL_INTERNAL_ERROR, msg);
    if (n > 0 && (size_t)n < sizeof(buf)) {
        ssize_t wr = send(fd, buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)wr;
    }
}

/* Nothing pending that is the hub's to do: no call under way with its answer still to come. */
static int conn_waits_on_peer(const ctl_conn *c) { return c->refs == 1 || c->out_len > 0; }

/* No progress for HUB_CTL_IDLE_TIMEOUT: closed. As ev.pod's "be smart about timeouts", a
 * request only stores the time; the timer fires once per period and re-arms for what is
 * left. */
static void idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ctl_conn *c = w->data;
    ev_tstamp now = ev_now(loop);
    (void)revents;
    if (!conn_waits_on_peer(c))
        c->active = now; /* a call under way holds the clock */
    ev_tstamp left = c->active + HUB_CTL_IDLE_TIMEOUT - now;
    if (left > 1e-3) {
        w->repeat = left;
        ev_timer_again(loop, w);
        return;
    }
    hub_log(HUB_LOG_INFO, "control: connection idle for %.0f s%s, closing", HUB_CTL_IDLE_TIMEOUT,
            c->out_len ? " with its answers unread" : "");
    if (!c->out_len)
        send_notice(c->fd, "closed: idle for too long");
    conn_close(c);
}

/* The peer said all it had to say and has every answer: done. One whose reading was given up
 * may still be sending: closing with its bytes unread would reset the connection, and the
 * answer could be lost, so the hub half-closes and reads on (dropping it all) until the
 * peer's EOF or HUB_CTL_LINGER seconds. */
static void conn_close_if_done(ctl_conn *c)
{
    if (c->fd < 0 || !c->eof || c->refs != 1 || c->out_len != 0 || c->in_off < c->in_len ||
        c->batch)
        return;
    if (!c->discard || c->ctl->nlinger >= HUB_CTL_MAX_CONNS) {
        conn_close(c);
    } else if (!ev_is_active(&c->linger_w)) {
        /* A lingering connection no longer counts as open (its peer may already have made
         * the next one); those lingering are bounded on their own. */
        shutdown(c->fd, SHUT_WR);
        ev_timer_stop(c->ctl->loop, &c->idle_w); /* the linger bounds it now */
        c->ctl->nconns--;
        c->ctl->nlinger++;
        ev_timer_set(&c->linger_w, HUB_CTL_LINGER, 0.);
        ev_timer_start(c->ctl->loop, &c->linger_w);
    }
}

static void count_request(hub_ctl *ctl)
{
    atomic_store_explicit(&ctl->requests,
                          atomic_load_explicit(&ctl->requests, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* ---- output ---- */

static void conn_flush(ctl_conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ev_io_start(c->ctl->loop, &c->wio);
            return;
        }
        if (n < 0) {
            hub_log(HUB_LOG_DEBUG, "control: write failed: %s", strerror(errno));
            conn_close(c);
            return;
        }
        c->out_off += (size_t)n;
        c->active = ev_now(c->ctl->loop);
    }
    c->out_off = c->out_len = 0;
    ev_io_stop(c->ctl->loop, &c->wio);
    conn_pump_soon(c); /* more requests may go now; it closes c if that was all */
}

/* Append pre, o's text (NULL: none) and post to c's answers and write what the socket takes.
 * Past HUB_CTL_MAX_OUTPUT unsent, the connection is closed. */
static void conn_put(ctl_conn *c, const char *pre, json_object *o, const char *post)
{
    size_t len = 0, plen = strlen(pre), qlen = strlen(post);
    const char *s = "";
    if (c->fd < 0)
        return; /* nobody to read it: not even built */
    if (o)
        s = json_object_to_json_string_length(
            o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    size_t add = plen + len + qlen;
    if (c->out_off > 0) {
        /* Keep only what is unsent. */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (c->out_len + add > HUB_CTL_MAX_OUTPUT) {
        hub_log(HUB_LOG_WARN, "control: client reads too slowly (%zu bytes unsent), closing",
                c->out_len);
        conn_close(c);
        return;
    }
    if (c->out_len + add > c->out_cap) {
        size_t ncap = c->out_cap ? c->out_cap : 4096;
        while (ncap < c->out_len + add)
            ncap *= 2;
        char *n = hub_realloc(c->out, ncap);
        if (!n) {
            hub_log(HUB_LOG_ERR, "control: out of memory for a %zu-byte answer", len);
            conn_close(c);
            return;
        }
        c->out = n;
        c->out_cap = ncap;
    }
    memcpy(c->out + c->out_len, pre, plen);
    memcpy(c->out + c->out_len + plen, s, len);
    memcpy(c->out + c->out_len + plen + len, post, qlen);
    c->out_len += add;
    conn_flush(c);
}

static void conn_write_json(ctl_conn *c, json_object *o) { conn_put(c, "", o, "\n"); }

/* Write answer (owned, may be NULL) to c. */
static void conn_answer(ctl_conn *c, json_object *answer)
{
    if (answer) {
        conn_write_json(c, answer);
        json_object_put(answer);
    }
}

/* ---- answers ---- */

/* {"jsonrpc":"2.0","id":id,key:val}; val's reference passes to the answer. */
static json_object *make_answer(json_object *id, const char *key, json_object *val)
{
    json_object *a = json_object_new_object();
    json_object_object_add(a, "jsonrpc", json_object_new_string("2.0"));
    json_object_object_add(a, "id", json_object_get(id));
    json_object_object_add(a, key, val);
    return a;
}

static json_object *error_object(int code, const char *msg)
{
    json_object *e = json_object_new_object();
    json_object_object_add(e, "code", json_object_new_int(code));
    json_object_object_add(e, "message", json_object_new_string(msg));
    return e;
}

static json_object *make_error(json_object *id, int code, const char *msg)
{
    return make_answer(id, "error", error_object(code, msg));
}

static void batch_free(ctl_batch *b)
{
    json_object_put(b->doc);
    hub_free(b);
}

/* An answer (owned, may be NULL) of one of b's elements: written at once, after "[" or ",".
 * Writing may end the batch (its last answer, flushed, lets conn_pump close the array and
 * free b): b is not touched after conn_put. */
static void batch_add(ctl_batch *b, json_object *answer)
{
    if (answer) {
        const char *pre = b->answered ? "," : "[";
        b->answered = 1;
        conn_put(b->conn, pre, answer, "");
        json_object_put(answer);
    }
}

/* Answer call with key:val (val owned; dropped for a notification or a closed connection)
 * and end the call. */
static void call_finish(hub_ctl_call *call, const char *key, json_object *val)
{
    ctl_conn *c = call->conn;
    json_object *answer = NULL;
    if (call->has_id && c->fd >= 0)
        answer = make_answer(call->id, key, val);
    else
        json_object_put(val);
    c->calls--;
    if (call->batch) {
        call->batch->outstanding--;
        batch_add(call->batch, answer);
    } else {
        conn_answer(c, answer);
    }
    json_object_put(call->id);
    hub_free(call);
    conn_pump_soon(c);
    conn_unref(c);
}

void hub_ctl_reply(hub_ctl_call *call, json_object *result) { call_finish(call, "result", result); }

void hub_ctl_fail(hub_ctl_call *call, int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    hub_log(HUB_LOG_DEBUG, "control: %s failed: %s", call->method, msg);
    call_finish(call, "error", error_object(code, msg));
}

/* ---- requests ---- */

static const ctl_cmd *find_cmd(const hub_ctl *ctl, const char *name)
{
    for (size_t i = 0; i < ctl->ncmds; i++) {
        if (strcmp(ctl->cmds[i].spec->name, name) == 0)
            return &ctl->cmds[i];
    }
    return NULL;
}

static int type_ok(json_object *v, hub_ctl_type t)
{
    switch (t) {
    case HUB_CTL_STRING:
        return json_object_is_type(v, json_type_string);
    case HUB_CTL_INT:
        return json_object_is_type(v, json_type_int);
    case HUB_CTL_BOOL:
        return json_object_is_type(v, json_type_boolean);
    }
    return 0;
}

/* The request's params as an object holding only the spec's names, types checked.
 * NULL with msg set when they do not fit. */
static json_object *check_params(const hub_ctl_spec *spec, json_object *params, char *msg,
                                 size_t msglen)
{
    json_object *out = json_object_new_object();
    if (json_object_is_type(params, json_type_array)) {
        size_t n = json_object_array_length(params);
        if (n > spec->nparams) {
            snprintf(msg, msglen, "%s takes at most %zu parameters, %zu given", spec->name,
                     spec->nparams, n);
            goto fail;
        }
        for (size_t i = 0; i < n; i++)
            json_object_object_add(out, spec->params[i].name,
                                   json_object_get(json_object_array_get_idx(params, i)));
    } else if (params) {
        json_object_object_foreach(params, key, val)
        {
            size_t i = 0;
            while (i < spec->nparams && strcmp(spec->params[i].name, key) != 0)
                i++;
            if (i == spec->nparams) {
                snprintf(msg, msglen, "%s has no parameter '%.64s'", spec->name, key);
                goto fail;
            }
            json_object_object_add(out, key, json_object_get(val));
        }
    }
    for (size_t i = 0; i < spec->nparams; i++) {
        const hub_ctl_param *p = &spec->params[i];
        json_object *v;
        if (!json_object_object_get_ex(out, p->name, &v) || v == NULL) {
            /* An explicit null is the same as leaving an optional parameter out. */
            json_object_object_del(out, p->name);
            if (!p->required)
                continue;
            snprintf(msg, msglen, "missing parameter '%s' (%s %s)", p->name,
                     p->type == HUB_CTL_INT ? "an" : "a", hub_ctl_type_name(p->type));
            goto fail;
        }
        if (!type_ok(v, p->type)) {
            snprintf(msg, msglen, "parameter '%s' must be %s %s", p->name,
                     p->type == HUB_CTL_INT ? "an" : "a", hub_ctl_type_name(p->type));
            goto fail;
        }
    }
    return out;
fail:
    json_object_put(out);
    return NULL;
}

/* One request object (alone or in a batch). Returns an error answer to send at once, or NULL
 * when a call was started (or the request was a notification that needs none). */
static json_object *run_request(ctl_conn *c, json_object *req, ctl_batch *batch)
{
    hub_ctl *ctl = c->ctl;
    json_object *id = NULL, *v, *method, *params = NULL;
    char msg[256];

    count_request(ctl);
    if (!json_object_is_type(req, json_type_object))
        return make_error(NULL, HUB_CTL_INVALID_REQUEST, "a request must be a JSON object");
    int has_id = json_object_object_get_ex(req, "id", &id);
    if (has_id && id && !json_object_is_type(id, json_type_int) &&
        !json_object_is_type(id, json_type_string))
        return make_error(NULL, HUB_CTL_INVALID_REQUEST, "id must be a string or an integer");
    if (!json_object_object_get_ex(req, "jsonrpc", &v) ||
        !json_object_is_type(v, json_type_string) || strcmp(json_object_get_string(v), "2.0") != 0)
        return make_error(id, HUB_CTL_INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"");
    if (!json_object_object_get_ex(req, "method", &method) ||
        !json_object_is_type(method, json_type_string))
        return make_error(id, HUB_CTL_INVALID_REQUEST, "\"method\" must be a string");
    if (json_object_object_get_ex(req, "params", &params) && params &&
        !json_object_is_type(params, json_type_object) &&
        !json_object_is_type(params, json_type_array))
        return make_error(id, HUB_CTL_INVALID_REQUEST, "\"params\" must be an object or an array");
    json_object_object_foreach(req, key, val)
    {
        (void)val;
        if (strcmp(key, "jsonrpc") && strcmp(key, "id") && strcmp(key, "method") &&
            strcmp(key, "params")) {
            snprintf(msg, sizeof(msg), "unknown member \"%.64s\"", key);
            return make_error(id, HUB_CTL_INVALID_REQUEST, msg);
        }
    }
    const char *name = json_object_get_string(method);
    const ctl_cmd *cmd = find_cmd(ctl, name);
    if (!cmd) {
        snprintf(msg, sizeof(msg), "no such method: %.64s (try \"commands\")", name);
        return has_id ? make_error(id, HUB_CTL_METHOD_NOT_FOUND, msg) : NULL;
    }
    json_object *checked = check_params(cmd->spec, params, msg, sizeof(msg));
    if (!checked)
        return has_id ? make_error(id, HUB_CTL_INVALID_PARAMS, msg) : NULL;
    hub_ctl_call *call = hub_calloc(1, sizeof(*call));
    if (!call) {
        json_object_put(checked);
        return has_id ? make_error(id, HUB_CTL_INTERNAL_ERROR, "out of memory") : NULL;
    }
    call->conn = c;
    /* A notification carries no id; "id": null is a request whose answer says null. */
    call->has_id = has_id;
    call->id = json_object_get(id);
    call->batch = batch;
    call->method = cmd->spec->name;
    c->refs++;
    c->calls++;
    if (batch)
        batch->outstanding++;
    hub_log(HUB_LOG_DEBUG, "control: %s %s", name, json_object_to_json_string(checked));
    cmd->fn(call, checked, cmd->ud); /* answers now or later */
    json_object_put(checked);
    return NULL;
}

static void run_document(ctl_conn *c, json_object *doc)
{
    if (!json_object_is_type(doc, json_type_array)) {
        conn_answer(c, run_request(c, doc, NULL));
        return;
    }
    size_t n = json_object_array_length(doc);
    if (n == 0) {
        count_request(c->ctl);
        conn_answer(c, make_error(NULL, HUB_CTL_INVALID_REQUEST, "empty batch"));
        return;
    }
    ctl_batch *b = hub_calloc(1, sizeof(*b));
    if (!b) {
        count_request(c->ctl);
        conn_answer(c, make_error(NULL, HUB_CTL_INTERNAL_ERROR, "out of memory"));
        return;
    }
    b->conn = c;
    b->doc = json_object_get(doc);
    b->n = n;
    c->batch = b; /* started by conn_pump, element by element */
}

/* The batch's next step: start an element (once nothing else is under way), or end it once
 * every element is answered. 1 when it did something. */
static int batch_step(ctl_conn *c)
{
    ctl_batch *b = c->batch;
    if (!b->started && c->calls > 0)
        return 0;
    if (b->next < b->n) {
        b->started = 1;
        json_object *err = run_request(c, json_object_array_get_idx(b->doc, b->next++), b);
        batch_add(b, err);
        return 1;
    }
    if (b->outstanding > 0)
        return 0;
    if (b->answered)
        conn_put(c, "", NULL, "]\n");
    c->batch = NULL;
    batch_free(b);
    return 1;
}

/* Answer a request that is not JSON, and read no more from c: the rest of a broken text
 * cannot be told from new requests (a request may span lines), so the connection ends once
 * what it asked before is answered. */
static void parse_failed(ctl_conn *c, const char *why)
{
    char msg[160];
    snprintf(msg, sizeof(msg), "parse error: %s", why);
    count_request(c->ctl);
    hub_log(HUB_LOG_DEBUG, "control: %s; closing the connection", msg);
    c->eof = 1;
    c->discard = 1;        /* still read, so that closing does not reset the connection */
    c->in_off = c->in_len; /* what is left of the read is dropped */
    /* closes c once written, if nothing else is pending */
    conn_answer(c, make_error(NULL, HUB_CTL_PARSE_ERROR, msg));
}

static int is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n'; }

/* Feed what is left of the last read to the tokener, up to the end of one document, and run
 * it. The rest stays in c->in for conn_pump. */
static void feed_one(ctl_conn *c)
{
    while (c->in_off < c->in_len && c->fd >= 0 && !c->eof) {
        const char *buf = c->in + c->in_off;
        size_t len = c->in_len - c->in_off;
        if (c->doc_bytes == 0) {
            /* Whitespace between documents is not part of any. */
            while (len && is_space(*buf))
                buf++, len--, c->in_off++;
            if (!len)
                return;
        }
        size_t chunk = len > HUB_CTL_MAX_REQUEST ? HUB_CTL_MAX_REQUEST : len;
        json_object *doc = json_tokener_parse_ex(c->tok, buf, (int)chunk);
        enum json_tokener_error jerr = json_tokener_get_error(c->tok);
        size_t used = jerr == json_tokener_continue ? chunk : json_tokener_get_parse_end(c->tok);
        if (used == 0 && jerr == json_tokener_success)
            used = chunk; /* cannot happen; never spin */
        /* json-c also takes the whitespace after a document: it does not count toward the
         * size limit, wherever the reads happened to split. */
        size_t body = used;
        while (jerr == json_tokener_success && body > 0 && is_space(buf[body - 1]))
            body--;
        c->doc_bytes += body;
        c->in_off += used;
        if (jerr == json_tokener_continue && c->doc_bytes <= HUB_CTL_MAX_REQUEST)
            continue;
        if (c->doc_bytes > HUB_CTL_MAX_REQUEST) {
            json_object_put(doc);
            jerr = json_tokener_error_size;
        }
        c->doc_bytes = 0;
        if (jerr != json_tokener_success) {
            parse_failed(c, jerr == json_tokener_error_size ? "request too large (over 1 MiB)"
                                                            : json_tokener_error_desc(jerr));
            return;
        }
        json_tokener_reset(c->tok);
        c->active = ev_now(c->ctl->loop);
        run_document(c, doc);
        json_object_put(doc);
        return;
    }
}

/* Too much under way or unsent on c to take more of its requests. */
static int conn_busy(const ctl_conn *c)
{
    return c->calls >= HUB_CTL_MAX_INFLIGHT || c->out_len - c->out_off >= HUB_CTL_OUT_PAUSE;
}

/* Make progress on c as far as backpressure allows: the batch under way, else the next
 * request already read; then read more only when all that is done (or to discard). */
static void conn_pump(ctl_conn *c)
{
    if (c->pumping || c->fd < 0)
        return;
    c->pumping = 1;
    c->refs++; /* a call may close c */
    while (c->fd >= 0 && !c->discard && !conn_busy(c)) {
        if (c->batch) {
            if (!batch_step(c))
                break;
        } else if (c->in_off < c->in_len && !c->eof) {
            feed_one(c);
        } else {
            break;
        }
    }
    if (c->fd >= 0) {
        int want = c->discard || (!c->eof && !c->batch && c->in_off == c->in_len && !conn_busy(c));
        if (want)
            ev_io_start(c->ctl->loop, &c->rio);
        else
            ev_io_stop(c->ctl->loop, &c->rio);
    }
    c->pumping = 0;
    conn_unref(c);
}

/* ---- connections ---- */

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    ctl_conn *c = w->data;
    (void)loop, (void)revents;
    if (!c->in && !(c->in = hub_malloc(HUB_CTL_READ))) {
        hub_log(HUB_LOG_ERR, "control: out of memory reading a request");
        conn_close(c);
        return;
    }
    /* Read only once what was read before is parsed (conn_pump stops the watcher till then). */
    ssize_t n = recv(c->fd, c->in, HUB_CTL_READ, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n < 0 || (n == 0 && c->discard)) {
        conn_close(c);
        return;
    }
    if (c->discard)
        return; /* after a parse error: dropped */
    if (n == 0 && c->doc_bytes > 0) {
        /* The peer is done sending in the middle of a request. */
        parse_failed(c, "incomplete request at the end of the input");
        return;
    }
    if (n == 0) {
        /* The peer is done sending; it may still be waiting for answers. */
        c->eof = 1;
        ev_io_stop(c->ctl->loop, &c->rio);
        conn_close_if_done(c);
        return;
    }
    c->in_off = 0;
    c->in_len = (size_t)n;
    conn_pump(c);
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop, (void)revents;
    conn_flush(w->data);
}

static void conn_close(ctl_conn *c)
{
    if (c->fd < 0)
        return;
    ev_io_stop(c->ctl->loop, &c->rio);
    ev_io_stop(c->ctl->loop, &c->wio);
    ev_timer_stop(c->ctl->loop, &c->idle_w);
    ev_timer_stop(c->ctl->loop, &c->pump_w);
    if (ev_is_active(&c->linger_w)) {
        ev_timer_stop(c->ctl->loop, &c->linger_w);
        c->ctl->nlinger--;
        c->ctl->nconns++; /* taken off below, once */
    }
    close(c->fd);
    c->fd = -1;
    if (c->prev)
        c->prev->next = c->next;
    else
        c->ctl->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->ctl->nconns--;
    conn_unref(c);
}

static void conn_unref(ctl_conn *c)
{
    if (--c->refs > 0) {
        conn_close_if_done(c);
        return;
    }
    if (c->batch)
        batch_free(c->batch);
    json_tokener_free(c->tok);
    hub_free(c->out);
    hub_free(c->in);
    hub_free(c);
}

/* All slots are taken: close the open connection idle longest, if it has been idle for
 * HUB_CTL_EVICT_IDLE and nothing is pending on it (bounded by the list: at most
 * HUB_CTL_MAX_CONNS open and as many lingering). */
static void evict_idlest(hub_ctl *ctl)
{
    ctl_conn *victim = NULL;
    for (ctl_conn *o = ctl->conns; o; o = o->next) {
        if (o->refs != 1 || o->out_len || ev_is_active(&o->linger_w))
            continue;
        if (!victim || o->active < victim->active)
            victim = o;
    }
    if (!victim || ev_now(ctl->loop) - victim->active < HUB_CTL_EVICT_IDLE)
        return;
    hub_log(HUB_LOG_NOTICE,
            "control: %d connections open; closing the one idle longest (%.0f s) for a new one",
            HUB_CTL_MAX_CONNS, ev_now(ctl->loop) - victim->active);
    send_notice(victim->fd, "closed: idle while every control connection was taken");
    conn_close(victim);
}

/* A connection the listener accepted: refused past HUB_CTL_MAX_CONNS (unless an idle one
 * makes room), else read. */
static void accept_conn(void *ud, int fd, const struct sockaddr *sa, socklen_t salen)
{
    hub_ctl *ctl = ud;
    (void)sa, (void)salen;
    if (ctl->nconns >= HUB_CTL_MAX_CONNS)
        evict_idlest(ctl);
    if (ctl->nconns >= HUB_CTL_MAX_CONNS) {
        send_notice(fd, "too many control connections");
        close(fd);
        hub_log(HUB_LOG_WARN, "control: %d connections open, refusing another", HUB_CTL_MAX_CONNS);
        return;
    }
    ctl_conn *c = hub_calloc(1, sizeof(*c));
    if (!c || !(c->tok = json_tokener_new_ex(JSON_TOKENER_DEFAULT_DEPTH))) {
        hub_free(c);
        close(fd);
        hub_log(HUB_LOG_ERR, "control: out of memory accepting a connection");
        return;
    }
    json_tokener_set_flags(c->tok, JSON_TOKENER_STRICT | JSON_TOKENER_ALLOW_TRAILING_CHARS);
    c->ctl = ctl;
    c->fd = fd;
    c->refs = 1;
    ev_io_init(&c->rio, conn_read_cb, fd, EV_READ);
    ev_io_init(&c->wio, conn_write_cb, fd, EV_WRITE);
    ev_init(&c->linger_w, linger_cb);
    ev_init(&c->idle_w, idle_cb);
    ev_init(&c->pump_w, pump_cb);
    c->rio.data = c->wio.data = c->linger_w.data = c->idle_w.data = c->pump_w.data = c;
    c->active = ev_now(ctl->loop);
    c->idle_w.repeat = HUB_CTL_IDLE_TIMEOUT;
    ev_timer_again(ctl->loop, &c->idle_w);
    c->next = ctl->conns;
    if (ctl->conns)
        ctl->conns->prev = c;
    ctl->conns = c;
    ctl->nconns++;
    ev_io_start(ctl->loop, &c->rio);
}

/* ---- listening sockets ---- */

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* A socket file left by a hub that died is replaced; one that answers belongs to a running
 * hub, and anything else at the path is not ours to remove. */
static int clear_stale(const char *path, char *err, size_t errlen)
{
    struct stat st;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : fail(err, errlen, "%s: %s", path, strerror(errno));
    if (!S_ISSOCK(st.st_mode))
        return fail(err, errlen, "%s exists and is not a socket", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail(err, errlen, "socket: %s", strerror(errno));
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    int e = errno;
    close(fd);
    if (rc == 0)
        return fail(err, errlen, "%s is in use by a running evhub", path);
    if (e != ECONNREFUSED)
        return fail(err, errlen, "%s: %s", path, strerror(e));
    if (unlink(path) < 0)
        return fail(err, errlen, "cannot remove the stale socket %s: %s", path, strerror(errno));
    hub_log(HUB_LOG_NOTICE, "control: removed a stale socket %s", path);
    return 0;
}

static int listen_unix(hub_ctl *ctl, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    if (strlen(path) >= sizeof(sa.sun_path))
        return fail(err, errlen, "control socket path is too long (max %zu bytes): %s",
                    sizeof(sa.sun_path) - 1, path);
    if (clear_stale(path, err, errlen) < 0)
        return -1;
    /* The default lives in /run/evhub, which nothing else creates: make the last directory
     * (only that one) when it is missing. */
    char dir[sizeof(sa.sun_path)];
    memcpy(dir, path, strlen(path) + 1);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = '\0';
        if (mkdir(dir, 0755) == 0)
            hub_log(HUB_LOG_NOTICE, "control: created %s", dir);
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail(err, errlen, "control socket: %s", strerror(errno));
    /* Created 0600: only the hub's own user may steer it. */
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    int e = errno;
    umask(old);
    if (rc < 0) {
        close(fd);
        return fail(err, errlen, "cannot create the control socket %s: %s", path, strerror(e));
    }
    if (chmod(path, 0600) < 0 || stat(path, &st) < 0 || listen(fd, 64) < 0) {
        e = errno;
        close(fd);
        unlink(path);
        return fail(err, errlen, "control socket %s: %s", path, strerror(e));
    }
    ctl->ufd = fd;
    ctl->ino = st.st_ino;
    memcpy(ctl->path, path, strlen(path) + 1);
    return 0;
}

static int is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

static int listen_tcp(hub_ctl *ctl, const char *addr, char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_PASSIVE};
    struct addrinfo *ai;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int one = 1;
    if (hub_config_split_addr(addr, host, sizeof(host), port, sizeof(port)) < 0)
        return fail(err, errlen, "control tcp address '%s' is not host:port", addr);
    /* No name lookups: the address must be a numeric loopback one. */
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0)
        return fail(err, errlen,
                    "control tcp address '%s': %s (a numeric loopback address is "
                    "required)",
                    addr, gai_strerror(rc));
    if (!is_loopback(ai->ai_addr)) {
        freeaddrinfo(ai);
        return fail(err, errlen,
                    "control tcp address '%s' is not a loopback address (the "
                    "control socket has no authentication)",
                    addr);
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return fail(err, errlen, "cannot listen for control on %s: %s", addr, strerror(e));
    }
    freeaddrinfo(ai);
    ctl->tfd = fd;
    ctl->tcp_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                   : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

/* Out of descriptors: the connection is told why before it is closed. */
static void refuse_conn(void *ud, int fd)
{
    (void)ud;
    send_notice(fd, "the hub is out of file descriptors");
}

/* The listener takes fd over; 0 or -1 (fd closed) with err set. */
static int watch_listener(hub_ctl *ctl, hub_listener **l, int *fd, char *err, size_t errlen)
{
    *l = hub_listener_new(ctl->loop, *fd, "control", accept_conn, refuse_conn, ctl);
    if (!*l) {
        close(*fd);
        *fd = -1;
        return fail(err, errlen, "out of memory");
    }
    hub_listener_start(*l);
    return 0;
}

hub_ctl *hub_ctl_new(struct ev_loop *loop, const char *path, const char *tcp, char *err,
                     size_t errlen)
{
    hub_ctl *ctl = hub_calloc(1, sizeof(*ctl));
    if (!ctl) {
        fail(err, errlen, "out of memory");
        return NULL;
    }
    ctl->loop = loop;
    ctl->ufd = ctl->tfd = -1;
    if (hub_ctl_listen(ctl, path, tcp, err, errlen) < 0) {
        hub_ctl_free(ctl);
        return NULL;
    }
    return ctl;
}

int hub_ctl_listen(hub_ctl *ctl, const char *path, const char *tcp, char *err, size_t errlen)
{
    if (path && path[0] && listen_unix(ctl, path, err, errlen) < 0)
        return -1;
    if (tcp && tcp[0] && listen_tcp(ctl, tcp, err, errlen) < 0)
        return -1;
    if (ctl->ufd >= 0) {
        if (watch_listener(ctl, &ctl->ul, &ctl->ufd, err, errlen) < 0) {
            unlink(ctl->path); /* ours, just made */
            return -1;
        }
        hub_log(HUB_LOG_INFO, "control socket %s", ctl->path);
    }
    if (ctl->tfd >= 0) {
        if (watch_listener(ctl, &ctl->tl, &ctl->tfd, err, errlen) < 0)
            return -1;
        hub_log(HUB_LOG_INFO, "control tcp on port %d", ctl->tcp_port);
    }
    return 0;
}

void hub_ctl_free(hub_ctl *ctl)
{
    struct stat st;
    if (!ctl)
        return;
    while (ctl->conns)
        conn_close(ctl->conns);
    if (ctl->ufd >= 0) {
        if (ctl->ul)
            hub_listener_free(ctl->ul); /* closes ufd */
        else
            close(ctl->ufd);
        /* Only the file we made: another hub may have replaced it since. */
        if (stat(ctl->path, &st) == 0 && st.st_ino == ctl->ino)
            unlink(ctl->path);
    }
    if (ctl->tfd >= 0) {
        if (ctl->tl)
            hub_listener_free(ctl->tl); /* closes tfd */
        else
            close(ctl->tfd);
    }
    hub_free(ctl->cmds);
    hub_free(ctl);
}

int hub_ctl_register(hub_ctl *ctl, const hub_ctl_spec *spec, hub_ctl_fn fn, void *ud)
{
    if (find_cmd(ctl, spec->name))
        return -EEXIST;
    if (ctl->ncmds == ctl->cap) {
        size_t ncap = ctl->cap ? ctl->cap * 2 : 16;
        ctl_cmd *n = hub_realloc(ctl->cmds, ncap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        ctl->cmds = n;
        ctl->cap = ncap;
    }
    ctl->cmds[ctl->ncmds++] = (ctl_cmd){spec, fn, ud};
    return 0;
}

const hub_ctl_spec *hub_ctl_spec_at(const hub_ctl *ctl, size_t i)
{
    return i < ctl->ncmds ? ctl->cmds[i].spec : NULL;
}

unsigned long long hub_ctl_requests(hub_ctl *ctl)
{
    return atomic_load_explicit(&ctl->requests, memory_order_relaxed);
}

int hub_ctl_tcp_port(const hub_ctl *ctl) { return ctl->tcp_port; }
