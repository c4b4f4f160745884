/* Worker threads: each runs its own script state. The loop hands events over in a bounded
 * queue (a mutex, a list and a condition variable); workers hand commands back through the
 * mailbox. A connection's events always go to the same worker, in order. */
#define _GNU_SOURCE /* pthread_timedjoin_np */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"
#include "hub/log.h"

#define CMD_FLUSH_EVERY 64 /* events between command hand-offs while a batch runs */
/* Payload bytes queued per worker before reading pauses, whatever worker_queue says. */
#define WORKER_QUEUE_BYTES (64u * 1024 * 1024)

typedef struct hub_item {
    struct hub_item *next;
    int type;
    uint64_t id;
    size_t len;
    char data[]; /* the message, or a hub_conn_info for HUB_EV_CONNECT */
} hub_item;

/* A worker's command to the loop: a mailbox node whose run function does the work and
 * frees it. */
typedef struct hub_cmd {
    hub_post node;
    int counted; /* its payload counts toward its worker's worker_calls bound */
    int worker;
    uint64_t id;
    size_t taglen, len;
    char tag[HUB_TAG_MAX + 1];
    char data[]; /* len bytes and a NUL */
} hub_cmd;

struct hub_worker {
    hub *h;
    int index;
    size_t ctx_len; /* hub_api.context of its script's route now, 0: none */
    char ctx[HUB_CTX_MAX + 1];
    pthread_t thread;
    int started;
    hub_script *script;
    hub_item *decision; /* loop side: the decision item of the reload under way */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    hub_item *head, *tail;      /* under mu */
    int sleeping;               /* under mu */
    atomic_int queued;          /* events handed over and not yet run, outbox included */
    atomic_size_t queued_bytes; /* their payload bytes */
    atomic_int resume_wanted;
    /* payload bytes of its commands the loop has not yet carried out (worker_calls) */
    atomic_size_t calls_bytes;
    /* counters: written by the worker only (relaxed load and store), read anywhere */
    _Atomic uint64_t calls_refused;
    _Atomic uint64_t events;
    _Atomic uint64_t counts[HUB_SCRIPT_NCOUNTS];

    /* loop side */
    hub_item *ob_head, *ob_tail;
    uint64_t *paused;
    size_t npaused, paused_cap;

    /* worker side: commands not yet handed to the loop */
    hub_post *cmd_head, *cmd_tail;
};

/* ---- worker -> loop commands ---- */

static hub_cmd *cmd_new(void (*run)(hub *, hub_post *), int worker, uint64_t id, const char *tag,
                        size_t taglen, const char *data, size_t len)
{
    hub_cmd *c = hub_malloc(sizeof(*c) + len + 1);
    if (!c)
        return NULL;
    c->node.next = NULL;
    c->node.run = run;
    c->counted = 0;
    c->worker = worker;
    c->id = id;
    c->taglen = taglen;
    c->len = len;
    if (taglen)
        memcpy(c->tag, tag, taglen);
    c->tag[taglen] = '\0';
    if (len)
        memcpy(c->data, data, len);
    c->data[len] = '\0';
    return c;
}

#define CMD(p) ((hub_cmd *)(void *)(p))

/* A command carried out: its payload no longer counts toward its worker's bound (once the
 * workers are gone, at exit, nothing counts any more). */
static void cmd_free(hub *h, hub_post *p)
{
    hub_cmd *c = CMD(p);
    if (c->counted && h->workers)
        atomic_fetch_sub(&h->workers[c->worker].calls_bytes, c->len);
    hub_free(c);
}

static void run_relay(hub *h, hub_post *p)
{
    hub__route_relay(h, CMD(p)->data, CMD(p)->len, 0);
    cmd_free(h, p);
}

static void run_relay_local(hub *h, hub_post *p)
{
    hub__relay(h, CMD(p)->data, CMD(p)->len);
    cmd_free(h, p);
}

static void run_multicast(hub *h, hub_post *p)
{
    hub__route_multicast(h, CMD(p)->tag, CMD(p)->taglen, CMD(p)->data, CMD(p)->len, 0);
    cmd_free(h, p);
}

static void run_multicast_local(hub *h, hub_post *p)
{
    hub__multicast(h, CMD(p)->tag, CMD(p)->taglen, CMD(p)->data, CMD(p)->len);
    cmd_free(h, p);
}

static void run_unicast(hub *h, hub_post *p)
{
    hub__route_unicast(h, CMD(p)->tag, CMD(p)->taglen, CMD(p)->data, CMD(p)->len);
    cmd_free(h, p);
}

static void run_unicast_local(hub *h, hub_post *p)
{
    hub__unicast(h, CMD(p)->tag, CMD(p)->taglen, CMD(p)->data, CMD(p)->len);
    cmd_free(h, p);
}

static void run_send_local(hub *h, hub_post *p)
{
    hub__send(h, CMD(p)->id, CMD(p)->data, CMD(p)->len);
    cmd_free(h, p);
}

static void run_send(hub *h, hub_post *p)
{
    hub_cmd *c = CMD(p);
    if (hub__route_send(h, c->id, c->data, c->len) == -ENOENT)
        hub_log(HUB_LOG_DEBUG, "send to client id=%llu: no such connection",
                (unsigned long long)c->id);
    cmd_free(h, p);
}

static void run_set_tag(hub *h, hub_post *p)
{
    hub_cmd *c = CMD(p);
    hub_client *cl;
    /* The owner's state learns of a tag another worker set. */
    if (hub__route_set_tag(h, c->id, c->tag, c->taglen, 1) > 0 &&
        (cl = hub__client_by_id(h, c->id)) && cl->worker != c->worker)
        hub__tag_changed(h, cl);
    hub_free(c);
}

static void run_close(hub *h, hub_post *p)
{
    hub__route_close(h, CMD(p)->id, CMD(p)->data);
    cmd_free(h, p);
}

static void run_start_read(hub *h, hub_post *p)
{
    hub__connect_seen(h, CMD(p)->id);
    hub_free(p);
}

static void resume_worker_clients(hub *h, int wi);

static void run_resume(hub *h, hub_post *p)
{
    if (h->workers)
        resume_worker_clients(h, CMD(p)->worker);
    hub_free(p);
}

static void run_reloaded(hub *h, hub_post *p)
{
    hub__reload_answered(h, CMD(p)->worker, CMD(p)->len ? CMD(p)->data : NULL);
    hub_free(p);
}

static void run_checked(hub *h, hub_post *p)
{
    hub__reload_checked(h, CMD(p)->len ? CMD(p)->data : NULL);
    hub_free(p);
}

static void run_marked(hub *h, hub_post *p)
{
    h->markers_waiting--;
    hub_free(p);
}

static void run_caught_up(hub *h, hub_post *p)
{
    hub__client_caught_up(h, CMD(p)->id);
    hub_free(p);
}

static void run_done(hub *h, hub_post *p)
{
    h->workers_done++;
    hub_free(p);
}

/* A command the loop waits for (a reload's answer or check): it must get through, so the
 * calling thread waits for memory if it must. why may be NULL. */
static hub_cmd *cmd_new_retry(void (*run)(hub *, hub_post *), int worker, const char *why)
{
    size_t len = why ? strlen(why) : 0;
    hub_cmd *c = hub__malloc_retry(sizeof(*c) + len + 1);
    c->node.next = NULL;
    c->node.run = run;
    c->counted = 0;
    c->worker = worker;
    c->id = 0;
    c->taglen = 0;
    c->tag[0] = '\0';
    c->len = len;
    if (len)
        memcpy(c->data, why, len);
    c->data[len] = '\0';
    return c;
}

static void worker_flush_cmds(hub_worker *w)
{
    if (!w->cmd_head)
        return;
    hub__post_chain(w->h, w->cmd_head, w->cmd_tail);
    w->cmd_head = w->cmd_tail = NULL;
}

static void post_append(hub_worker *w, hub_post *p)
{
    if (w->cmd_tail)
        w->cmd_tail->next = p;
    else
        w->cmd_head = p;
    w->cmd_tail = p;
}

static void cmd_append(hub_worker *w, hub_cmd *c) { post_append(w, &c->node); }

static int worker_cmd(hub_worker *w, void (*type)(hub *, hub_post *), uint64_t id, const char *tag,
                      size_t taglen, const char *data, size_t len)
{
    hub_cmd *c = cmd_new(type, w->index, id, tag, taglen, data, len);
    if (!c)
        return -ENOMEM;
    if (len) {
        c->counted = 1;
        atomic_fetch_add(&w->calls_bytes, len);
    }
    cmd_append(w, c);
    return 0;
}

/* ---- the API a script in a worker uses: commands to the loop ---- */

static void bump(_Atomic uint64_t *v);

/* The bound on what a worker's script hands the loop (worker_calls): over it a call fails
 * with ENOBUFS, and is counted, rather than queue without limit. */
static int calls_room(hub_worker *w, size_t len)
{
    if (atomic_load(&w->calls_bytes) + len <= w->h->cfg.worker_calls)
        return 0;
    bump(&w->calls_refused);
    return -ENOBUFS;
}

/* What a relay or multicast reaches beyond this hub, as far as its router knows. */
static int remote_reach(hub *h, const char *tag, size_t taglen, int local)
{
    if (local || !h->router || !h->router->reach)
        return 0;
    int r = h->router->reach(h->router_ud, tag, taglen);
    return r > 0 ? r : 0;
}

static int relay_as(void *ud, const char *data, size_t len, int local)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__route_relay(w->h, data, len, local);
    if (hub__frame_too_big(w->h, len))
        return -EMSGSIZE;
    int reach = remote_reach(w->h, NULL, 0, local);
    if (atomic_load(&w->h->nclients) == 0 && !reach)
        return 0;
    if (calls_room(w, len) < 0)
        return -ENOBUFS;
    int rc = worker_cmd(w, local ? run_relay_local : run_relay, 0, NULL, 0, data, len);
    return rc < 0 ? rc : 1;
}

static int api_relay(void *ud, const char *data, size_t len)
{
    return relay_as(ud, data, len, hub__local_scope);
}

static int api_relay_local(void *ud, const char *data, size_t len)
{
    return relay_as(ud, data, len, 1);
}

static int api_tagged(hub_worker *w, void (*type)(hub *, hub_post *), const char *tag,
                      size_t taglen, const char *data, size_t len)
{
    if (!hub_tag_valid(tag, taglen))
        return -EINVAL;
    if (hub__frame_too_big(w->h, len))
        return -EMSGSIZE;
    if (calls_room(w, len) < 0)
        return -ENOBUFS;
    /* The command goes even when the count is 0: a set_tag queued just before it by this
     * same script is applied first. */
    uint32_t n = hub__tag_count(w->h, tag, taglen);
    if (!n)
        n = (uint32_t)remote_reach(w->h, tag, taglen, type == run_multicast_local);
    int rc = worker_cmd(w, type, 0, tag, taglen, data, len);
    if (rc < 0)
        return rc;
    return n ? 1 : 0;
}

static int api_multicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__route_multicast(w->h, tag, taglen, data, len, hub__local_scope);
    return api_tagged(ud, hub__local_scope ? run_multicast_local : run_multicast, tag, taglen, data,
                      len);
}

static int api_multicast_local(void *ud, const char *tag, size_t taglen, const char *data,
                               size_t len)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__route_multicast(w->h, tag, taglen, data, len, 1);
    return api_tagged(ud, run_multicast_local, tag, taglen, data, len);
}

static int api_unicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__local_scope ? hub__unicast(w->h, tag, taglen, data, len)
                                : hub__route_unicast(w->h, tag, taglen, data, len);
    return api_tagged(ud, hub__local_scope ? run_unicast_local : run_unicast, tag, taglen, data,
                      len);
}

static int api_send(void *ud, uint64_t id, const char *data, size_t len)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__local_scope ? hub__send(w->h, id, data, len)
                                : hub__route_send(w->h, id, data, len);
    if (hub__frame_too_big(w->h, len))
        return -EMSGSIZE;
    if (calls_room(w, len) < 0)
        return -ENOBUFS;
    int rc = worker_cmd(w, hub__local_scope ? run_send_local : run_send, id, NULL, 0, data, len);
    return rc < 0 ? rc : 1;
}

static int api_set_tag(void *ud, uint64_t id, const char *tag, size_t taglen)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__route_set_tag(w->h, id, tag, taglen, 0);
    /* The command first: an intent recorded with no command behind it would never be
     * applied. */
    hub_cmd *c = cmd_new(run_set_tag, w->index, id, tag, taglen, NULL, 0);
    if (!c)
        return -ENOMEM;
    /* Recorded now, so a multicast right behind it in this script sees the tag. */
    int rc = hub__tag_intent(w->h, id, tag, taglen, 0);
    if (rc < 0) {
        hub_free(c);
        return rc;
    }
    cmd_append(w, c);
    return 1;
}

static int api_close(void *ud, uint64_t id, const char *reason)
{
    hub_worker *w = ud;
    if (w->index < 0)
        return hub__route_close(w->h, id, reason);
    /* The reason is cut at 255 bytes: it only goes to a log line and an error frame. */
    size_t rl = reason ? strnlen(reason, 255) : 0;
    hub_cmd *c = cmd_new(run_close, w->index, id, NULL, 0, reason, rl);
    if (!c)
        return -ENOMEM;
    /* Untagged at once, so a unicast right behind it in this script finds no one. */
    hub__tag_intent(w->h, id, NULL, 0, 0);
    cmd_append(w, c);
    return 1;
}

static void bump(_Atomic uint64_t *v)
{
    atomic_store_explicit(v, atomic_load_explicit(v, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static size_t api_stats(void *ud, hub_stat *out, size_t cap)
{
    hub_worker *w = ud;
    return hub__stats_collect(w->h, out, cap);
}

static void api_count(void *ud, int what)
{
    hub_worker *w = ud;
    if (what < 0 || what >= HUB_SCRIPT_NCOUNTS)
        return;
    if (w->index < 0)
        HUB_STAT_ADD(w->h, script[what], 1);
    else
        bump(&w->counts[what]);
}

static uint64_t api_token(void *ud)
{
    hub_worker *w = ud;
    return hub__token_new(w->h, w->index);
}

/* A raise handed to the loop, in order with the worker's other commands. */
typedef struct raise_cmd {
    hub_post node;
    uint64_t token;
    json_object *params;
    int has_ctx;
    char event[HUB_EVENT_MAX + 1];
    char ctx[]; /* the route's Call-ID, when has_ctx */
} raise_cmd;

static void run_raise(hub *h, hub_post *p)
{
    raise_cmd *rc = (raise_cmd *)(void *)p;
    char err[256];
    h->raise_ctx = rc->has_ctx ? rc->ctx : NULL;
    int r = hub_raise(h, rc->event, rc->params, rc->token, err, sizeof(err));
    h->raise_ctx = NULL;
    if (r < 0) {
        hub_log(HUB_LOG_WARN, "raise %s: %s", rc->event, err);
        /* The script was told "queued": its report function hears of the failure. */
        if (rc->token)
            hub_complete(h, rc->token, hub__event_report(rc->event, "", err));
    }
    hub_free(rc);
}

static int api_raise(void *ud, const char *event, json_object *params, uint64_t token, char *err,
                     size_t errlen)
{
    hub_worker *w = ud;
    int rc;
    raise_cmd *c = NULL;
    if (w->index < 0) {
        w->h->raise_ctx = w->ctx_len ? w->ctx : NULL;
        rc = hub_raise(w->h, event, params, token, err, errlen);
        w->h->raise_ctx = NULL;
        return rc < 0 ? rc : 1;
    }
    /* Checked here too, so that the script hears at once what the loop would refuse. */
    rc = hub__raise_check(w->h, event, err, errlen);
    if (rc == 0 && !(c = hub_malloc(sizeof(*c) + w->ctx_len + 1))) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
    }
    if (rc < 0) {
        json_object_put(params);
        return rc;
    }
    c->node.next = NULL;
    c->node.run = run_raise;
    c->token = token;
    c->params = params; /* owned by the command from here */
    snprintf(c->event, sizeof(c->event), "%s", event);
    c->has_ctx = w->ctx_len > 0;
    memcpy(c->ctx, w->ctx, w->ctx_len);
    c->ctx[w->ctx_len] = '\0';
    post_append(w, &c->node);
    return 1;
}

/* A subscribe or unsubscribe handed to the loop (checked already). */
typedef struct sub_cmd {
    hub_post node;
    long expire_s; /* -1: unsubscribe */
    char event[HUB_EVENT_MAX + 1];
    char socket[];
} sub_cmd;

static void run_sub(hub *h, hub_post *p)
{
    sub_cmd *c = (sub_cmd *)(void *)p;
    char err[256];
    int rc = c->expire_s < 0
                 ? hub__event_unsubscribe(h, c->event, c->socket, err, sizeof(err))
                 : hub__event_subscribe(h, c->event, c->socket, c->expire_s, err, sizeof(err));
    if (rc < 0)
        hub_log(HUB_LOG_WARN, "%s %s %s: %s", c->expire_s < 0 ? "unsubscribe" : "subscribe",
                c->event, c->socket, err);
    hub_free(c);
}

static int post_sub(hub_worker *w, const char *event, const char *socket, long expire_s, char *err,
                    size_t errlen)
{
    /* Checked here, so a bad URI is an error at the script line that gave it. */
    int rc = hub__event_check(w->h, event, socket, err, errlen);
    if (rc < 0)
        return rc;
    size_t sl = strlen(socket);
    sub_cmd *c = hub_malloc(sizeof(*c) + sl + 1);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    c->node.next = NULL;
    c->node.run = run_sub;
    c->expire_s = expire_s;
    snprintf(c->event, sizeof(c->event), "%s", event);
    memcpy(c->socket, socket, sl + 1);
    post_append(w, &c->node);
    return 1;
}

static int api_subscribe(void *ud, const char *event, const char *socket, long expire_s, char *err,
                         size_t errlen)
{
    hub_worker *w = ud;
    if (expire_s < 0)
        expire_s = 0;
    if (w->index < 0) {
        int rc = hub__event_subscribe(w->h, event, socket, expire_s, err, errlen);
        return rc < 0 ? rc : 1;
    }
    return post_sub(w, event, socket, expire_s, err, errlen);
}

static int api_unsubscribe(void *ud, const char *event, const char *socket, char *err,
                           size_t errlen)
{
    hub_worker *w = ud;
    if (w->index < 0) {
        int rc = hub__event_unsubscribe(w->h, event, socket, err, errlen);
        return rc < 0 ? rc : 1;
    }
    return post_sub(w, event, socket, -1, err, errlen);
}

static void api_context(void *ud, const char *callid, size_t len)
{
    hub_worker *w = ud;
    w->ctx_len = callid ? (len > HUB_CTX_MAX ? HUB_CTX_MAX : len) : 0;
    memcpy(w->ctx, callid ? callid : "", w->ctx_len);
    w->ctx[w->ctx_len] = '\0';
}

static hub_req *api_req_resume(void *ud, unsigned index, unsigned label, char *err, size_t errlen)
{
    hub_worker *w = ud;
    hub *h = w->h;
    if (!h->req_resume) {
        snprintf(err, errlen, "no module offers requests to resume (no [sip])");
        return NULL;
    }
    return h->req_resume(h->req_resume_ud, index, label, err, errlen);
}

/* The one API every executor's script uses, ud being its executor: the loop's own (index
 * -1, workers = 0) calls straight in; a worker's hands commands to the loop, in order. */
const hub_api hub__api = {
    .token = api_token,
    .raise = api_raise,
    .subscribe = api_subscribe,
    .unsubscribe = api_unsubscribe,
    .relay = api_relay,
    .multicast = api_multicast,
    .unicast = api_unicast,
    .send = api_send,
    .set_tag = api_set_tag,
    .close = api_close,
    .stats = api_stats,
    .count = api_count,
    .relay_local = api_relay_local,
    .multicast_local = api_multicast_local,
    .req_resume = api_req_resume,
    .context = api_context,
};

/* ---- the worker thread ---- */

/* Tell the loop how loading went (why NULL: loaded); it waits for every worker's answer. */
static void reload_answer(hub_worker *w, const char *why)
{
    cmd_append(w, cmd_new_retry(run_reloaded, w->index, why));
    worker_flush_cmds(w);
}

/* Wait for the loop's decision on a reload (the item is taken out of the queue wherever it
 * stands). 1: commit; 0: abort, or the hub is stopping (its STOP item is left in place). */
static int wait_decision(hub_worker *w)
{
    pthread_mutex_lock(&w->mu);
    for (;;) {
        hub_item *prev = NULL, *it;
        for (it = w->head; it && it->type != HUB_EV_STOP; prev = it, it = it->next) {
            if (it->type != HUB_EV_COMMIT && it->type != HUB_EV_ABORT)
                continue;
            if (prev)
                prev->next = it->next;
            else
                w->head = it->next;
            if (w->tail == it)
                w->tail = prev;
            pthread_mutex_unlock(&w->mu);
            int commit = it->type == HUB_EV_COMMIT;
            hub_free(it);
            return commit;
        }
        /* STOP came first, or the hub is stopping: its STOP may already be in this worker's
         * batch, behind the reload, where this scan cannot see it. */
        if (it || atomic_load(&w->h->rl.cancel))
            break;
        w->sleeping = 1;
        pthread_cond_wait(&w->cv, &w->mu);
        w->sleeping = 0;
    }
    pthread_mutex_unlock(&w->mu);
    return 0;
}

/* A reload, in two steps: load the round's text beside the running script and carry the
 * connections over (everything that can fail), answer, then wait for the loop's decision
 * (all workers switch, or none) without running anything else in between, so the new state
 * misses no event and switching cannot fail. Events queue up meanwhile; the loop does not
 * wait. */
static void worker_reload(hub_worker *w)
{
    hub *h = w->h;
    char err[1024];
    hub_script_conf sc = hub__script_conf(h, w->index);
    hub_script *n = h->ops->load(&sc, &hub__api, w, err, sizeof(err));
    if (n && h->ops->adopt(n, w->script, err, sizeof(err)) < 0) {
        h->ops->free(n);
        n = NULL;
    }
    if (!n)
        hub_log(HUB_LOG_ERR, "worker %d: reload failed: %s", w->index, err);
    reload_answer(w, n ? NULL : err);
    if (wait_decision(w) && n) {
        h->ops->free(w->script);
        w->script = n;
        hub_log(HUB_LOG_NOTICE, "worker %d: script reloaded", w->index);
        return;
    }
    h->ops->free(n);
}

/* Paused readers resume only once the queue is half empty, so a queue hovering at its limit
 * does not pause and resume for every event. */
static int below_low_water(hub_worker *w)
{
    int half = w->h->cfg.worker_queue / 2;
    return atomic_load(&w->queued) < (half > 0 ? half : 1) &&
           atomic_load(&w->queued_bytes) < WORKER_QUEUE_BYTES / 2;
}

/* Runs one event; returns 1 for the stop event. */
static int worker_run(hub_worker *w, hub_item *it)
{
    hub *h = w->h;
    switch (it->type) {
    case HUB_EV_CONNECT:
    case HUB_EV_MESSAGE:
    case HUB_EV_CLOSE:
    case HUB_EV_TAG:
    case HUB_EV_COMPLETE:
    case HUB_EV_RESULT:
    case HUB_EV_REQUEST:
    case HUB_EV_REMOTE:
        hub__event_run(h, w->script, it->type, it->id, it->data, it->len);
        if (it->type == HUB_EV_CONNECT) /* the loop starts reading once the script saw it */
            worker_cmd(w, run_start_read, it->id, NULL, 0, NULL, 0);
        break;
    case HUB_EV_RELOAD:
        worker_reload(w);
        return 0;
    case HUB_EV_COMMIT:
    case HUB_EV_ABORT:
        return 0; /* a decision nobody waits for (the round ended at shutdown) */
    case HUB_EV_STOP:
        return 1;
    case HUB_EV_MARK:
        /* Behind every command of the events before it (one list, in order). */
        cmd_append(w, cmd_new_retry(run_marked, w->index, NULL)); /* the loop waits for it */
        break;
    case HUB_EV_EOF:
        /* Behind the commands of the connection's events before it: what they sent is
         * queued when the loop closes it. On OOM its shutdown_timeout timer closes it. */
        worker_cmd(w, run_caught_up, it->id, NULL, 0, NULL, 0);
        break;
    }
    bump(&w->events);
    atomic_fetch_sub(&w->queued_bytes, it->len);
    atomic_fetch_sub(&w->queued, 1);
    /* Paired with the loop's store-then-check in hub__worker_pause. */
    if (atomic_load(&w->resume_wanted) && below_low_water(w) &&
        atomic_exchange(&w->resume_wanted, 0))
        worker_cmd(w, run_resume, 0, NULL, 0, NULL, 0);
    return 0;
}

static void deadline_after(struct timespec *ts, long usec)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += usec / 1000000;
    ts->tv_nsec += (usec % 1000000) * 1000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

/* Release what an item never run carries (a completion's result, counted as undelivered). */
static void item_drop(hub *h, hub_item *it)
{
    if (it->type == HUB_EV_REQUEST) {
        hub__event_run(h, NULL, it->type, it->id, it->data, it->len); /* answered, released */
        it->type = HUB_EV_STOP;
        return;
    }
    if (it->type == HUB_EV_RESULT) {
        hub__results_undelivered(h, it->id, "their worker stopped first");
        it->type = HUB_EV_STOP;
        return;
    }
    if (it->type != HUB_EV_COMPLETE)
        return;
    json_object *res;
    memcpy(&res, it->data, sizeof(res));
    hub__complete_undelivered(h, it->id, "its worker stopped first");
    json_object_put(res);
    it->type = HUB_EV_STOP; /* released */
}

static void *worker_main(void *arg)
{
    hub_worker *w = arg;
    hub *h = w->h;
    int step = 1, stop = 0;

    pthread_mutex_lock(&w->mu);
    while (!stop) {
        if (!w->head) {
            /* Idle: wake for housekeeping after wait_idle, growing up to
             * wait_idle * wait_increase; new work signals the condition at once. */
            struct timespec ts;
            deadline_after(&ts, h->cfg.wait_idle * step);
            w->sleeping = 1;
            int r = pthread_cond_timedwait(&w->cv, &w->mu, &ts);
            w->sleeping = 0;
            if (r == ETIMEDOUT && !w->head) {
                pthread_mutex_unlock(&w->mu);
                h->ops->idle(w->script);
                pthread_mutex_lock(&w->mu);
                if (step < h->cfg.wait_increase)
                    step++;
            }
            continue;
        }
        step = 1;
        hub_item *list = w->head;
        w->head = w->tail = NULL;
        pthread_mutex_unlock(&w->mu);
        for (int n = 1; list; n++) {
            hub_item *it = list;
            list = it->next;
            if (!stop)
                stop = worker_run(w, it);
            else
                item_drop(h, it);
            hub_free(it);
            if (n % CMD_FLUSH_EVERY == 0)
                worker_flush_cmds(w);
        }
        worker_flush_cmds(w);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    worker_cmd(w, run_done, 0, NULL, 0, NULL, 0);
    worker_flush_cmds(w);
    return NULL;
}

/* ---- loop side ---- */

static hub_item *item_new(int type, uint64_t id, const void *data, size_t len)
{
    hub_item *it = hub_malloc(sizeof(*it) + len);
    if (!it)
        return NULL;
    it->next = NULL;
    it->type = type;
    it->id = id;
    it->len = len;
    if (len)
        memcpy(it->data, data, len);
    return it;
}

static void items_free(hub *h, hub_item *it)
{
    for (size_t bound = 0; it && bound < SIZE_MAX; bound++) {
        hub_item *n = it->next;
        item_drop(h, it);
        hub_free(it);
        it = n;
    }
}

/* Commands a worker never handed over: none is left, since a worker hands over what its
 * first load asked for at once and the rest after each batch; freed here for safety. */
static void cmds_free(hub_post *c)
{
    for (size_t bound = 0; c && bound < SIZE_MAX; bound++) {
        hub_post *n = c->next;
        hub_free(c);
        c = n;
    }
}

static void outbox_add(hub_worker *w, hub_item *it)
{
    if (w->ob_tail)
        w->ob_tail->next = it;
    else
        w->ob_head = it;
    w->ob_tail = it;
}

int hub__worker_full(hub *h, int w)
{
    return atomic_load(&h->workers[w].queued) >= h->cfg.worker_queue ||
           atomic_load(&h->workers[w].queued_bytes) >= WORKER_QUEUE_BYTES;
}

void hub__post_checked(hub *h, const char *why)
{
    /* The verdict must reach the loop or the reload never ends. */
    hub_cmd *c = cmd_new_retry(run_checked, -1, why);
    hub__post_chain(h, &c->node, &c->node);
}

void hub__worker_view(hub *h, int wi, hub_worker_view *out)
{
    hub_worker *w = &h->workers[wi];
    out->index = wi;
    out->queued_events = (uint64_t)atomic_load(&w->queued);
    out->queued_bytes = atomic_load(&w->queued_bytes);
    out->events = atomic_load_explicit(&w->events, memory_order_relaxed);
    out->calls_bytes = atomic_load(&w->calls_bytes);
    out->calls_refused = atomic_load_explicit(&w->calls_refused, memory_order_relaxed);
    for (int i = 0; i < HUB_SCRIPT_NCOUNTS; i++)
        out->script[i] = atomic_load_explicit(&w->counts[i], memory_order_relaxed);
}

size_t hub__worker_paused(hub *h, int wi) { return h->workers[wi].npaused; }

int hub__worker_queue_item(hub *h, int wi, int type, uint64_t id, const void *data, size_t len)
{
    hub_worker *w = &h->workers[wi];
    hub_item *it = item_new(type, id, data, len);
    if (!it) {
        hub_log(HUB_LOG_ERR, "worker %d: out of memory queueing an event for id=%llu", wi,
                (unsigned long long)id);
        return -ENOMEM;
    }
    atomic_fetch_add(&w->queued, 1);
    atomic_fetch_add(&w->queued_bytes, it->len);
    outbox_add(w, it);
    return 0;
}

static void push_outbox(hub_worker *w)
{
    if (!w->ob_head)
        return;
    pthread_mutex_lock(&w->mu);
    if (w->tail)
        w->tail->next = w->ob_head;
    else
        w->head = w->ob_head;
    w->tail = w->ob_tail;
    if (w->sleeping)
        pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    w->ob_head = w->ob_tail = NULL;
}

void hub__workers_flush(hub *h)
{
    for (int i = 0; i < h->nworkers; i++)
        push_outbox(&h->workers[i]);
}

void hub__worker_pause(hub *h, int wi, hub_client *c)
{
    hub_worker *w = &h->workers[wi];
    if (w->npaused == w->paused_cap) {
        size_t ncap = w->paused_cap ? w->paused_cap * 2 : 16;
        uint64_t *n = hub_realloc(w->paused, ncap * sizeof(*n));
        if (!n)
            return; /* not paused: the queue grows past its bound instead of losing data */
        w->paused = n;
        w->paused_cap = ncap;
    }
    w->paused[w->npaused++] = c->id;
    c->flags |= HUB_CLIENT_PAUSED;
    hub_log(HUB_LOG_DEBUG, "worker %d: queue full, reading from client id=%llu paused", wi,
            (unsigned long long)c->id);
    ev_io_stop(h->loop, &c->rio);
    atomic_store(&w->resume_wanted, 1);
    /* The worker may have drained the queue before it could see resume_wanted. */
    if (below_low_water(w) && atomic_exchange(&w->resume_wanted, 0)) {
        hub_cmd *cmd = cmd_new(run_resume, wi, 0, NULL, 0, NULL, 0);
        if (cmd)
            hub__post_chain(h, &cmd->node, &cmd->node);
    }
}

static void resume_worker_clients(hub *h, int wi)
{
    hub_worker *w = &h->workers[wi];
    uint64_t *ids = w->paused;
    size_t n = w->npaused;
    w->paused = NULL;
    w->npaused = w->paused_cap = 0;
    for (size_t i = 0; i < n; i++) {
        hub_client *c = hub__client_by_id(h, ids[i]);
        if (c)
            hub__client_resume(c);
    }
    hub_free(ids);
}

int hub__workers_start(hub *h, char *err, size_t errlen)
{
    pthread_condattr_t ca;
    sigset_t all, old;

    h->workers = hub_calloc((size_t)h->cfg.workers, sizeof(*h->workers));
    if (!h->workers) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    h->nworkers = h->cfg.workers;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    for (int i = 0; i < h->nworkers; i++) {
        hub_worker *w = &h->workers[i];
        hub_script_conf sc = hub__script_conf(h, i);
        w->h = h;
        w->index = i;
        pthread_mutex_init(&w->mu, NULL);
        pthread_cond_init(&w->cv, &ca);
        w->script = h->ops->load(&sc, &hub__api, w, err, errlen);
        if (!w->script) {
            pthread_condattr_destroy(&ca);
            return -EINVAL;
        }
        /* What its top level asked of the hub (a subscription, say) runs once the loop does,
         * not after the worker's first batch. */
        worker_flush_cmds(w);
    }
    pthread_condattr_destroy(&ca);
    /* Signals belong to the loop thread: workers start with all of them blocked. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < h->nworkers; i++) {
        hub_worker *w = &h->workers[i];
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            snprintf(err, errlen, "cannot start worker thread %d", i);
            return -EAGAIN;
        }
        w->started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return 0;
}

int hub__workers_reload(hub *h)
{
    hub_item **reloads = hub_calloc((size_t)h->nworkers, sizeof(*reloads));
    int ok = reloads != NULL;
    for (int i = 0; ok && i < h->nworkers; i++) {
        reloads[i] = item_new(HUB_EV_RELOAD, 0, NULL, 0);
        h->workers[i].decision = item_new(HUB_EV_ABORT, 0, NULL, 0);
        ok = reloads[i] && h->workers[i].decision;
    }
    for (int i = 0; reloads && i < h->nworkers; i++) {
        hub_worker *w = &h->workers[i];
        if (!ok) {
            hub_free(reloads[i]);
            hub_free(w->decision);
            w->decision = NULL;
            continue;
        }
        outbox_add(w, reloads[i]);
        push_outbox(w);
    }
    hub_free(reloads);
    return ok ? 0 : -ENOMEM;
}

void hub__workers_decide(hub *h, int commit)
{
    for (int i = 0; i < h->nworkers; i++) {
        hub_worker *w = &h->workers[i];
        hub_item *it = w->decision;
        w->decision = NULL;
        if (!it)
            continue;
        it->type = commit ? HUB_EV_COMMIT : HUB_EV_ABORT;
        outbox_add(w, it);
        push_outbox(w);
    }
}

int hub__workers_mark(hub *h)
{
    int n = 0;
    for (int i = 0; i < h->nworkers; i++) {
        hub_item *it = item_new(HUB_EV_MARK, 0, NULL, 0);
        if (!it)
            continue; /* that worker is not waited for: its queue is still checked */
        atomic_fetch_add(&h->workers[i].queued, 1);
        outbox_add(&h->workers[i], it);
        n++;
    }
    return n;
}

int hub__workers_busy(hub *h)
{
    for (int i = 0; i < h->nworkers; i++) {
        if (atomic_load(&h->workers[i].queued) > 0)
            return 1;
    }
    return 0;
}

void hub__workers_stop(hub *h)
{
    h->workers_stopped = 1;
    for (int i = 0; i < h->nworkers; i++) {
        hub_item *it = item_new(HUB_EV_STOP, 0, NULL, 0);
        if (!it) {
            hub_log(HUB_LOG_ERR, "worker %d: out of memory posting a control event", i);
            continue;
        }
        outbox_add(&h->workers[i], it);
        push_outbox(&h->workers[i]);
    }
}

hub_worker *hub__loop_exec_new(hub *h)
{
    hub_worker *w = hub_calloc(1, sizeof(*w));
    if (w) {
        w->h = h;
        w->index = -1; /* only h and index are used: the loop runs its events inline */
    }
    return w;
}

void hub__workers_join(hub *h)
{
    /* A worker stuck in its script (a loop with no budget, a blocking call) would hold the
     * exit for ever: each gets HUB_STUCK_GRACE_MS after its STOP, then the process
     * leaves without it, non-zero, naming it. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += HUB_STUCK_GRACE_MS / 1000;
    deadline.tv_nsec += (HUB_STUCK_GRACE_MS % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    for (int i = 0; i < h->nworkers; i++) {
        if (!h->workers[i].started ||
            pthread_timedjoin_np(h->workers[i].thread, NULL, &deadline) != ETIMEDOUT)
            continue;
        hub_log(HUB_LOG_CRIT,
                "worker %d did not stop within %d ms of being told to (stuck in its script: a "
                "loop with no budget, a blocking call?); exiting without it",
                i, HUB_STUCK_GRACE_MS);
        _exit(HUB_EXIT_STUCK);
    }
    for (int i = 0; i < h->nworkers; i++) {
        hub_worker *w = &h->workers[i];
        items_free(h, w->head);
        items_free(h, w->ob_head);
        cmds_free(w->cmd_head);
        h->ops->free(w->script);
        hub_free(w->decision);
        hub_free(w->paused);
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
    }
    hub_free(h->workers);
    h->workers = NULL;
    h->nworkers = 0;
}
