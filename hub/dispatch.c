/* Dispatch: relay / multicast / unicast over the tag index, and script events from the loop. */
#include <errno.h>
#include <string.h>

#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"
#include "hub/log.h"

/* Build the frame once; every recipient shares it. */
static int frame_for(hub *h, const char *data, size_t len, hub_frame *out)
{
    if (hub__frame_too_big(h, len))
        return -EMSGSIZE;
    return hub__frame_new(h, data, len, out);
}

int hub__relay(hub *h, const char *data, size_t len)
{
    hub_frame f;
    int n = 0, rc = frame_for(h, data, len, &f);
    if (rc < 0)
        return rc;
    for (hub_client *c = h->clients; c; c = c->next) {
        if (hub__client_enqueue(c, &f) == 0)
            n++;
    }
    hub__frame_unref(&f);
    return n;
}

int hub__multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    hub_frame f;
    if (!hub_tag_valid(tag, taglen))
        return -EINVAL;
    hub_tag *t = hub__tag_find(h, tag, taglen);
    if (!t || !t->head)
        return 0;
    int n = 0, rc = frame_for(h, data, len, &f);
    if (rc < 0)
        return rc;
    /* A slow consumer closed here leaves the list at once, so keep the next pointer. */
    hub_client *next;
    for (hub_client *c = t->head; c; c = next) {
        next = c->tag_next;
        if (hub__client_enqueue(c, &f) == 0)
            n++;
    }
    hub__frame_unref(&f);
    return n;
}

/* One recipient: 1 when queued, 0 when its queue refused the frame, or <0. */
static int deliver_one(hub *h, hub_client *c, const char *data, size_t len)
{
    hub_frame f;
    int rc = frame_for(h, data, len, &f);
    if (rc < 0)
        return rc;
    rc = hub__client_enqueue(c, &f);
    hub__frame_unref(&f);
    return rc == 0 ? 1 : 0;
}

int hub__unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    if (!hub_tag_valid(tag, taglen))
        return -EINVAL;
    /* A tag may exist with no members yet: a worker's set_tag on its way to the loop. */
    hub_tag *t = hub__tag_find(h, tag, taglen);
    if (!t || !t->head)
        return 0;
    hub_client *c = t->head;
    if (h->cfg.unicast_policy == HUB_UNICAST_RROBIN) {
        c = t->rr ? t->rr : t->head;
        t->rr = c->tag_next;
    }
    return deliver_one(h, c, data, len);
}

int hub__send(hub *h, uint64_t id, const char *data, size_t len)
{
    hub_client *c = hub__client_by_id(h, id);
    if (!c || (c->flags & HUB_CLIENT_CLOSING))
        return -ENOENT;
    return deliver_one(h, c, data, len);
}

int hub__set_tag_id(hub *h, uint64_t id, const char *tag, size_t len, int from_worker)
{
    hub_client *c = hub__client_by_id(h, id);
    char intended[HUB_TAG_MAX + 1];
    int rc;
    if (from_worker && c) {
        /* Membership follows the latest intent, whoever recorded it: a tag the control
         * socket or another worker set after this command's wins over it. */
        len = hub__tag_intended(h, id, intended);
        tag = intended;
    }
    if (!c || (c->flags & HUB_CLIENT_CLOSING)) {
        if (from_worker)
            hub__tag_intent(h, id, NULL, 0, 1);
        return -ENOENT;
    }
    if (!from_worker && (rc = hub__tag_intent(h, id, tag, len, 1)) < 0)
        return rc;
    rc = hub__tag_set(h, c, tag, len);
    if (rc == 0)
        hub_log(HUB_LOG_DEBUG, "client id=%llu: tag set to '%.*s'", (unsigned long long)id,
                (int)len, tag);
    return rc < 0 ? rc : 1;
}

int hub__close_id(hub *h, uint64_t id, const char *reason)
{
    hub_client *c = hub__client_by_id(h, id);
    if (!c || (c->flags & HUB_CLIENT_CLOSING))
        return -ENOENT;
    if (reason && *reason)
        hub__client_close(c, "closed", reason);
    else
        hub__client_close(c, NULL, "closed by script");
    return 1;
}

int hub_multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    return hub__multicast(h, tag, taglen, data, len);
}

/* ---- the router seam (hub_router in core.h) ---- */

int hub_set_router(hub *h, const hub_router *router, void *ud)
{
    if (h->router)
        return -EEXIST;
    h->router = router;
    h->router_ud = ud;
    return 0;
}

int hub_set_id_base(hub *h, uint64_t base)
{
    if (base + 1 < h->next_id || base > UINT64_MAX - (UINT64_C(1) << 32))
        return -EINVAL;
    h->next_id = base + 1;
    return 0;
}

int hub_clients(const hub *h) { return atomic_load(&h->nclients); }

int hub_tag_members(hub *h, const char *tag, size_t taglen)
{
    hub_tag *t = hub__tag_find(h, tag, taglen);
    return t && t->head ? (int)t->nmembers : 0;
}

int hub_local_relay(hub *h, const char *data, size_t len) { return hub__relay(h, data, len); }

int hub_local_unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    return hub__unicast(h, tag, taglen, data, len);
}

int hub_local_send(hub *h, uint64_t id, const char *data, size_t len)
{
    return hub__send(h, id, data, len);
}

int hub_local_set_tag(hub *h, uint64_t id, const char *tag, size_t taglen)
{
    if (taglen && !hub_tag_valid(tag, taglen))
        return -EINVAL;
    int rc = hub__set_tag_id(h, id, tag, taglen, 0);
    if (rc > 0)
        hub__tag_changed(h, hub__client_by_id(h, id));
    return rc;
}

int hub_local_close(hub *h, uint64_t id, const char *reason)
{
    return hub__close_id(h, id, reason);
}

int hub__route_relay(hub *h, const char *data, size_t len, int local)
{
    if (!h->router) /* a single hub: the plain call, nothing more */
        return hub__relay(h, data, len);
    int n = hub__relay(h, data, len);
    if (n < 0 || local || !h->router || !h->router->relay)
        return n;
    int r = h->router->relay(h->router_ud, data, len);
    return r > 0 ? n + r : n;
}

int hub__route_multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len,
                         int local)
{
    if (!h->router)
        return hub__multicast(h, tag, taglen, data, len);
    int n = hub__multicast(h, tag, taglen, data, len);
    if (n < 0 || local || !h->router || !h->router->multicast)
        return n;
    /* 0 local recipients is no reason not to route: the frame size was not checked then */
    if (hub__frame_too_big(h, len))
        return -EMSGSIZE;
    int r = h->router->multicast(h->router_ud, tag, taglen, data, len);
    return r > 0 ? n + r : n;
}

int hub__route_unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    if (!h->router)
        return hub__unicast(h, tag, taglen, data, len);
    if (h->router && h->router->unicast) {
        if (!hub_tag_valid(tag, taglen))
            return -EINVAL;
        if (hub__frame_too_big(h, len))
            return -EMSGSIZE;
        hub_tag *t = hub__tag_find(h, tag, taglen);
        int r = h->router->unicast(h->router_ud, tag, taglen, data, len,
                                   t && t->head ? t->nmembers : 0);
        if (r != 0)
            return r;
    }
    return hub__unicast(h, tag, taglen, data, len);
}

int hub__route_send(hub *h, uint64_t id, const char *data, size_t len)
{
    int rc = hub__send(h, id, data, len);
    if (rc == -ENOENT && h->router && h->router->send && !hub__client_by_id(h, id)) {
        if (hub__frame_too_big(h, len))
            return -EMSGSIZE;
        rc = h->router->send(h->router_ud, id, data, len);
    }
    return rc;
}

int hub__route_set_tag(hub *h, uint64_t id, const char *tag, size_t len, int from_worker)
{
    int rc = hub__set_tag_id(h, id, tag, len, from_worker);
    if (rc == -ENOENT && h->router && h->router->set_tag && !hub__client_by_id(h, id))
        rc = h->router->set_tag(h->router_ud, id, tag, len);
    return rc;
}

int hub__route_close(hub *h, uint64_t id, const char *reason)
{
    int rc = hub__close_id(h, id, reason);
    if (rc == -ENOENT && h->router && h->router->close && !hub__client_by_id(h, id))
        rc = h->router->close(h->router_ud, id, reason);
    return rc;
}

/* ---- executors: the loop (workers = 0) and each worker run the same events ---- */

void hub__event_run(hub *h, hub_script *s, int type, uint64_t id, const void *data, size_t len)
{
    switch (type) {
    case HUB_EV_CONNECT:
        h->ops->on_connect(s, data);
        break;
    case HUB_EV_MESSAGE:
        h->ops->on_message(s, id, data, len);
        break;
    case HUB_EV_CLOSE:
        h->ops->on_close(s, id);
        break;
    case HUB_EV_TAG: {
        /* The tag as it is now, not as it was when this was queued: the script may have
         * set another since, and that one is what the hub applies. */
        char tag[HUB_TAG_MAX + 1];
        size_t tl = hub__tag_intended(h, id, tag);
        if (h->ops->on_tag)
            h->ops->on_tag(s, id, tag, tl);
        break;
    }
    case HUB_EV_REQUEST: {
        /* s NULL: it can no longer run (its worker stopped); the module answers it. */
        hub_req *r;
        memcpy(&r, data, sizeof(r));
        if (s && h->ops->on_request)
            h->ops->on_request(s, r);
        r->ops->route_done(r, 0);
        r->ops->unref(r);
        break;
    }
    case HUB_EV_REMOTE: {
        /* s NULL: its worker stopped; the message is dropped with it */
        const hub_origin *o = data;
        if (s && h->ops->on_remote) {
            hub__local_scope = 1;
            h->ops->on_remote(s, o, (const char *)data + sizeof(*o), len - sizeof(*o));
            hub__local_scope = 0;
        }
        break;
    }
    case HUB_EV_COMPLETE: {
        json_object *res;
        memcpy(&res, data, sizeof(res));
        if (!s || !h->ops->on_complete || h->ops->on_complete(s, id, res) < 0)
            hub__complete_undelivered(h, id, "its state is gone");
        json_object_put(res);
        break;
    }
    case HUB_EV_RESULT: {
        /* data is a run of id hub_result records, copied into the worker's item (8-byte
         * aligned) */
        size_t unknown = s && h->ops->on_results ? h->ops->on_results(s, data, len) : id;
        hub__results_undelivered(h, unknown, "their state is gone");
        break;
    }
    }
}

void hub_request(hub *h, uint64_t key, hub_req *r)
{
    int exec = h->nworkers && !h->workers_stopped ? (int)(key % (uint64_t)h->nworkers) : -1;
    if (h->nworkers && h->workers_stopped) {
        r->ops->route_done(r, 0);
        r->ops->unref(r);
        return;
    }
    /* r's reference travels as the event's data */
    if (hub__exec_post(h, exec, HUB_EV_REQUEST, key, &r, sizeof(r)) < 0) {
        r->ops->route_done(r, 0);
        r->ops->unref(r);
    }
}

_Thread_local int hub__local_scope;

void hub_want_remote_events(hub *h) { h->remote_events = 1; }

int hub_remote_event(hub *h, uint64_t key, const hub_origin *o, const char *data, size_t len)
{
    if (h->nworkers && h->workers_stopped)
        return -ESHUTDOWN; /* shutting down: no script runs any more */
    int exec = h->nworkers ? (int)(key % (uint64_t)h->nworkers) : -1;
    if (exec >= 0 && hub__worker_full(h, exec))
        return -ENOBUFS; /* worker_queue bounds these as it bounds clients' frames */
    /* one event: the origin, then the message (the item's data is 8-byte aligned) */
    char *buf = hub_malloc(sizeof(*o) + len);
    if (!buf)
        return -ENOMEM;
    memcpy(buf, o, sizeof(*o));
    if (len)
        memcpy(buf + sizeof(*o), data, len);
    int rc = hub__exec_post(h, exec, HUB_EV_REMOTE, 0, buf, sizeof(*o) + len);
    hub_free(buf);
    return rc;
}

int hub_set_req_resolver(hub *h, hub_req_resume_fn resume, void *ud)
{
    if (h->req_resume)
        return -EEXIST;
    h->req_resume = resume;
    h->req_resume_ud = ud;
    return 0;
}

int hub__exec_post(hub *h, int exec, int type, uint64_t id, const void *data, size_t len)
{
    if (exec >= 0)
        return hub__worker_queue_item(h, exec, type, id, data, len);
    hub__event_run(h, h->script, type, id, data, len);
    if (type == HUB_EV_CONNECT)
        hub__connect_seen(h, id);
    return 0;
}

void hub__connect_seen(hub *h, uint64_t id)
{
    /* As Kamailio: connection-new runs before reading starts, so a script can refuse. */
    hub_client *c = hub__client_by_id(h, id);
    if (c)
        hub__client_start_reading(c);
}

void hub__tag_changed(hub *h, hub_client *c)
{
    if (!h->ops->on_tag || !(c->flags & HUB_CLIENT_CONNECTED))
        return;
    hub__exec_post(h, c->worker, HUB_EV_TAG, c->id, NULL, 0); /* it reads the tag then */
}

void hub__event_connect(hub *h, hub_client *c)
{
    c->flags |= HUB_CLIENT_CONNECTED;
    hub__exec_post(h, c->worker, HUB_EV_CONNECT, c->id, &c->info, sizeof(c->info));
}

int hub__event_admit(hub *h, hub_client *c)
{
    if (c->worker < 0 || !hub__worker_full(h, c->worker))
        return 0;
    hub__worker_pause(h, c->worker, c);
    return -EAGAIN;
}

int hub__event_message(hub *h, hub_client *c, const char *data, size_t len)
{
    if (hub__exec_post(h, c->worker, HUB_EV_MESSAGE, c->id, data, len) == 0)
        return 0;
    HUB_STAT_ADD(h, frames_lost, 1);
    hub__client_close(c, "internal", "out of memory queueing a frame for the script");
    return -ENOMEM;
}

void hub__event_close(hub *h, hub_client *c)
{
    hub__exec_post(h, c->worker, HUB_EV_CLOSE, c->id, NULL, 0);
}
