/* The hub's own control commands (their specs are in control_spec.c). Each runs on the loop
 * thread and answers through hub_ctl_reply / hub_ctl_fail. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <json-c/printbuf.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"
#include "hub/log.h"

/* A string parameter and its length (*len may be NULL), or NULL (and 0) when absent. */
static const char *str_param(json_object *params, const char *name, size_t *len)
{
    json_object *v = NULL;
    json_object_object_get_ex(params, name, &v);
    if (len)
        *len = v ? (size_t)json_object_get_string_len(v) : 0;
    return v ? json_object_get_string(v) : NULL;
}

static void invalid_tag(hub_ctl_call *call)
{
    hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                 "invalid tag (1..%d printable characters, no spaces)", HUB_TAG_MAX);
}

static json_object *u64(uint64_t v) { return json_object_new_uint64(v); }

/* "2026-11-22T08:50:01Z" */
static json_object *iso_time(double t)
{
    char buf[32];
    struct tm tm;
    time_t s = (time_t)t;
    gmtime_r(&s, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_object_new_string(buf);
}

/* ---- commands ---- */

static void cmd_commands(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    json_object *list = json_object_new_array();
    (void)params;
    const hub_ctl_spec *sp;
    for (size_t i = 0; (sp = hub_ctl_spec_at(h->ctl, i)); i++) {
        json_object *o = json_object_new_object(), *ps = json_object_new_array();
        json_object_object_add(o, "name", json_object_new_string(sp->name));
        json_object_object_add(o, "summary", json_object_new_string(sp->summary));
        json_object_object_add(o, "help", sp->help ? json_object_new_string(sp->help) : NULL);
        for (size_t j = 0; j < sp->nparams; j++) {
            const hub_ctl_param *p = &sp->params[j];
            json_object *po = json_object_new_object();
            json_object_object_add(po, "name", json_object_new_string(p->name));
            json_object_object_add(po, "type", json_object_new_string(hub_ctl_type_name(p->type)));
            json_object_object_add(po, "required", json_object_new_boolean(p->required));
            json_object_object_add(po, "help", json_object_new_string(p->help));
            json_object_array_add(ps, po);
        }
        json_object_object_add(o, "params", ps);
        json_object_array_add(list, o);
    }
    json_object *r = json_object_new_object();
    json_object_object_add(r, "commands", list);
    hub_ctl_reply(call, r);
}

static void cmd_status(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    json_object *r = json_object_new_object(), *sc = json_object_new_object();
    json_object *ws = json_object_new_array();
    (void)params;
    double up = hub__wall_now() - h->started;
    json_object_object_add(r, "version", json_object_new_string(EVHUB_VERSION));
    json_object_object_add(r, "pid", json_object_new_int((int)getpid()));
    json_object_object_add(r, "started", iso_time(h->started));
    char upbuf[32];
    snprintf(upbuf, sizeof(upbuf), "%.3f", up > 0 ? up : 0.0);
    json_object_object_add(r, "uptime", json_object_new_double_s(atof(upbuf), upbuf));
    json_object_object_add(r, "listen", json_object_new_string(h->listen_addr));
    json_object_object_add(r, "control", json_object_new_string(h->cfg.control_socket));
    json_object_object_add(r, "clients", json_object_new_int(atomic_load(&h->nclients)));
    json_object_object_add(r, "max_clients", json_object_new_int(h->cfg.max_clients));
    pthread_rwlock_rdlock(&h->tags_lock); /* workers add tags too */
    uint64_t ntags = h->ntags;
    pthread_rwlock_unlock(&h->tags_lock);
    json_object_object_add(r, "tags", u64(ntags));
    json_object_object_add(r, "log_level",
                           json_object_new_string(hub_log_level_name(atomic_load(&hub_log_level))));
    json_object_object_add(sc, "path", json_object_new_string(h->cfg.script));
    json_object_object_add(sc, "dialect",
                           json_object_new_string(h->cfg.event_callback[0] ? "kemi" : "native"));
    json_object_object_add(sc, "event_callback", json_object_new_string(h->cfg.event_callback));
    json_object_object_add(sc, "loaded", iso_time(h->script_loaded));
    json_object_object_add(sc, "reloads", u64(HUB_STAT_GET(h, reloads)));
    json_object_object_add(sc, "reload_failures", u64(HUB_STAT_GET(h, reload_failures)));
    json_object_object_add(sc, "last_error",
                           h->rl.error ? json_object_new_string(h->rl.error) : NULL);
    json_object_object_add(r, "script", sc);
    for (int i = 0; i < h->nworkers; i++) {
        hub_worker_view wv;
        json_object *w = json_object_new_object();
        hub__worker_view(h, i, &wv);
        json_object_object_add(w, "worker", json_object_new_int(i));
        json_object_object_add(w, "queued_events", u64(wv.queued_events));
        json_object_object_add(w, "queued_bytes", u64(wv.queued_bytes));
        json_object_object_add(w, "paused_clients", u64(hub__worker_paused(h, i)));
        json_object_array_add(ws, w);
    }
    json_object_object_add(r, "workers", ws);
    hub_ctl_reply(call, r);
}

static int by_id(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static const char *client_state(const hub_client *c)
{
    if (c->flags & HUB_CLIENT_CLOSING)
        return "closing";
    if (c->flags & HUB_CLIENT_PAUSED)
        return "paused";
    if (!(c->flags & HUB_CLIENT_READING))
        return "connecting";
    return "open";
}

/* A client listing is written a slice at a time, one slice per loop iteration, so listing
 * tens of thousands of connections never holds the loop for long: it is a snapshot of the
 * ids at the request, and a connection gone by its turn is left out. */
#define LIST_SLICE 128

struct hub_list_job {
    hub *h;
    hub_ctl_call *call;
    hub_list_job *next;
    uint64_t *ids;
    size_t n, done;
    struct printbuf *pb; /* the "clients" array's text so far */
};

/* Append s as a JSON string. Addresses and tags are ASCII, so escaping '"', '\\' and control
 * characters (as \u00XX) is all JSON asks for. */
static void put_str(struct printbuf *pb, const char *s, size_t len)
{
    printbuf_memappend(pb, "\"", 1);
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"' || s[i] == '\\' || (unsigned char)s[i] < 0x20) {
            char esc[8];
            snprintf(esc, sizeof(esc), "\\u%04x", (unsigned char)s[i]);
            printbuf_memappend(pb, esc, 6);
        } else {
            printbuf_memappend(pb, s + i, 1);
        }
    }
    printbuf_memappend(pb, "\"", 1);
}

static void put_client(struct printbuf *pb, const hub_client *c, int first)
{
    sprintbuf(pb, "%s{\"id\":%llu,\"conidx\":%d,\"address\":", first ? "" : ",",
              (unsigned long long)c->id, c->info.conidx);
    put_str(pb, c->info.addr, strlen(c->info.addr));
    sprintbuf(pb, ",\"port\":%u,\"tag\":", (unsigned)c->info.port);
    if (c->tag)
        put_str(pb, c->tag->name, c->tag->len);
    else
        printbuf_memappend(pb, "null", 4);
    sprintbuf(pb,
              ",\"frames_in\":%llu,\"bytes_in\":%llu,\"frames_out\":%llu,\"bytes_out\":%llu,"
              "\"queued_bytes\":%llu,\"state\":\"%s\"}",
              (unsigned long long)c->frames_in, (unsigned long long)c->bytes_in,
              (unsigned long long)c->frames_out, (unsigned long long)c->bytes_out,
              (unsigned long long)(c->wq_bytes - c->wq_off), client_state(c));
}

/* json-c serializer of the finished listing: the text built by the job. */
static int listing_to_json(json_object *o, struct printbuf *pb, int level, int flags)
{
    struct printbuf *text = json_object_get_userdata(o);
    (void)level, (void)flags;
    printbuf_memappend(pb, "{\"clients\":[", 12);
    printbuf_memappend(pb, text->buf, text->bpos);
    printbuf_memappend(pb, "]}", 2);
    return 0;
}

static void listing_free(json_object *o, void *ud)
{
    (void)o;
    printbuf_free(ud);
}

static void job_free(hub_list_job *j)
{
    if (!j)
        return;
    hub_free(j->ids);
    printbuf_free(j->pb); /* NULL-safe */
    hub_free(j);
}

/* One slice of every listing under way; the finished ones are answered. */
static void list_step_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    hub *h = w->data;
    (void)revents;
    for (hub_list_job **pp = &h->list_jobs; *pp;) {
        hub_list_job *j = *pp;
        size_t end = j->done + LIST_SLICE < j->n ? j->done + LIST_SLICE : j->n;
        for (; j->done < end; j->done++) {
            hub_client *c = hub__client_by_id(h, j->ids[j->done]);
            if (c)
                put_client(j->pb, c, j->pb->bpos == 0);
        }
        if (j->done < j->n) {
            pp = &j->next;
            continue;
        }
        *pp = j->next;
        json_object *r = json_object_new_object();
        if (!r) {
            hub_ctl_fail(j->call, HUB_CTL_INTERNAL_ERROR, "out of memory");
            job_free(j);
            continue;
        }
        json_object_set_serializer(r, listing_to_json, j->pb, listing_free); /* r owns pb */
        j->pb = NULL;
        hub_ctl_reply(j->call, r);
        job_free(j);
    }
    if (h->list_jobs) {
        ev_timer_set(w, 0., 0.); /* the next slice in the next iteration, after I/O */
        ev_timer_start(loop, w);
    }
}

static void cmd_clients(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    size_t taglen, n = 0;
    const char *tag = str_param(params, "tag", &taglen);
    hub_list_job *j = hub_calloc(1, sizeof(*j));
    if (!j || !(j->ids = hub_malloc(((size_t)atomic_load(&h->nclients) + 1) * sizeof(*j->ids))) ||
        !(j->pb = printbuf_new())) {
        job_free(j);
        hub_ctl_fail(call, HUB_CTL_INTERNAL_ERROR, "out of memory");
        return;
    }
    /* The tag filter is applied now: a connection tagged later is not listed. */
    for (hub_client *c = h->clients; c; c = c->next) {
        if (tag && (!c->tag || c->tag->len != taglen || memcmp(c->tag->name, tag, taglen)))
            continue;
        j->ids[n++] = c->id;
    }
    qsort(j->ids, n, sizeof(*j->ids), by_id);
    j->h = h;
    j->call = call;
    j->n = n;
    /* At the tail: listings finishing in the same slice are answered in the order asked. */
    hub_list_job **tail = &h->list_jobs;
    while (*tail)
        tail = &(*tail)->next;
    *tail = j;
    if (!ev_is_active(&h->list_w)) {
        ev_timer_init(&h->list_w, list_step_cb, 0., 0.);
        h->list_w.data = h;
        ev_timer_start(h->loop, &h->list_w);
    }
}

void hub__ctl_jobs_free(hub *h)
{
    if (ev_is_active(&h->list_w))
        ev_timer_stop(h->loop, &h->list_w);
    while (h->list_jobs) {
        hub_list_job *j = h->list_jobs;
        h->list_jobs = j->next;
        hub_ctl_fail(j->call, HUB_CTL_STOPPING, "the hub is stopping");
        job_free(j);
    }
}

/* The id parameter, exactly as given, in *id: returns 0, or -1 once the call is answered
 * -32602 because the id is not a connection id (an exact integer 1..2^63-1). json-c clamps: 2^63
 * and up (2^64 too, as 2^64-1) read back as 2^63-1 through get_int64 but as themselves through
 * get_uint64, so the two must agree. Ids count up from 1 and never reach 2^63. */
static int id_param(hub_ctl_call *call, json_object *params, int64_t *id)
{
    json_object *v = NULL;
    json_object_object_get_ex(params, "id", &v);
    int64_t i = v ? json_object_get_int64(v) : 0;
    if (i <= 0 || (uint64_t)i != json_object_get_uint64(v)) {
        /* Not echoed: json-c may already have clamped what was sent. */
        hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                     "parameter 'id' must be a connection id (an integer from 1 to %lld)",
                     (long long)INT64_MAX);
        return -1;
    }
    *id = i;
    return 0;
}

static void no_such_client(hub_ctl_call *call, int64_t id)
{
    hub_ctl_fail(call, HUB_CTL_NO_SUCH_CLIENT, "no open connection has id %lld", (long long)id);
}

static void cmd_close(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    int64_t id;
    const char *reason = str_param(params, "reason", NULL);
    if (id_param(call, params, &id) < 0)
        return;
    if (hub__route_close(h, (uint64_t)id, reason && *reason ? reason : "closed by the operator") <
        0) {
        no_such_client(call, id);
        return;
    }
    hub_log(HUB_LOG_NOTICE, "control: closed connection id=%llu", (unsigned long long)id);
    json_object *r = json_object_new_object();
    json_object_object_add(r, "id", json_object_new_int64(id));
    json_object_object_add(r, "closed", json_object_new_boolean(1));
    hub_ctl_reply(call, r);
}

static void cmd_tag(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    int64_t id;
    size_t len;
    const char *tag = str_param(params, "tag", &len);
    if (id_param(call, params, &id) < 0)
        return;
    if (len && !hub_tag_valid(tag, len)) {
        invalid_tag(call);
        return;
    }
    int rc = hub__route_set_tag(h, (uint64_t)id, tag, len, 0);
    if (rc == -ENOENT) {
        no_such_client(call, id);
        return;
    }
    if (rc < 0) {
        hub_ctl_fail(call, HUB_CTL_INTERNAL_ERROR, "%s", strerror(-rc));
        return;
    }
    hub_client *c = hub__client_by_id(h, (uint64_t)id);
    if (c) /* else another hub's (a router took it) */
        hub__tag_changed(h, c);
    json_object *r = json_object_new_object();
    json_object_object_add(r, "id", json_object_new_int64(id));
    json_object_object_add(r, "tag", len ? json_object_new_string_len(tag, (int)len) : NULL);
    hub_ctl_reply(call, r);
}

/* relay (route NULL), multicast or unicast, answered with the number of recipients. */
static void cmd_route(hub_ctl_call *call, json_object *params, hub *h,
                      int (*route)(hub *, const char *, size_t, const char *, size_t))
{
    size_t taglen, len;
    const char *tag = str_param(params, "tag", &taglen), *data = str_param(params, "data", &len);
    int n = route ? route(h, tag, taglen, data, len) : hub__route_relay(h, data, len, 0);
    if (n == -EINVAL) {
        invalid_tag(call);
    } else if (n == -EMSGSIZE) {
        hub_ctl_fail(call, HUB_CTL_FAILED, "the frame is larger than max_outbuf (%zu bytes)",
                     h->cfg.max_outbuf);
    } else if (n < 0) {
        hub_ctl_fail(call, HUB_CTL_INTERNAL_ERROR, "%s", strerror(-n));
    } else if (n == 0) {
        if (tag)
            hub_ctl_fail(call, HUB_CTL_NO_RECIPIENT, "no connection carries tag '%s'", tag);
        else
            hub_ctl_fail(call, HUB_CTL_NO_RECIPIENT, "no connection is open");
    } else {
        json_object *r = json_object_new_object();
        json_object_object_add(r, "recipients", json_object_new_int(n));
        hub_ctl_reply(call, r);
    }
}

static int route_multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len)
{
    return hub__route_multicast(h, tag, taglen, data, len, 0);
}

static void cmd_relay(hub_ctl_call *call, json_object *params, void *ud)
{
    cmd_route(call, params, ud, NULL);
}

static void cmd_multicast(hub_ctl_call *call, json_object *params, void *ud)
{
    cmd_route(call, params, ud, route_multicast);
}

static void cmd_unicast(hub_ctl_call *call, json_object *params, void *ud)
{
    cmd_route(call, params, ud, hub__route_unicast);
}

static int same_metric(const hub_stat *a, const hub_stat *b)
{
    return strcmp(a->name, b->name) == 0 && (a->worker >= 0) == (b->worker >= 0);
}

/* Prometheus text format: counters end in _total, worker entries carry a worker label, and
 * each metric's samples come together under one HELP and TYPE. */
static json_object *prometheus_text(const hub_stat *st, size_t n)
{
    struct printbuf *pb = printbuf_new();
    if (!pb)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        const hub_stat *s = &st[i];
        char name[128];
        size_t j = 0;
        while (j < i && !same_metric(&st[j], s))
            j++;
        if (j < i)
            continue; /* printed with the first of its kind */
        snprintf(name, sizeof(name), "evhub_%s%s%s", s->worker >= 0 ? "worker_" : "", s->name,
                 s->gauge ? "" : "_total");
        sprintbuf(pb, "# HELP %s %s\n# TYPE %s %s\n", name, s->help, name,
                  s->gauge ? "gauge" : "counter");
        for (size_t k = i; k < n; k++) {
            if (!same_metric(&st[k], s))
                continue;
            if (s->worker >= 0)
                sprintbuf(pb, "%s{worker=\"%d\"} %llu\n", name, st[k].worker,
                          (unsigned long long)st[k].value);
            else if (st[k].label[0])
                sprintbuf(pb, "%s{%s} %llu\n", name, st[k].label, (unsigned long long)st[k].value);
            else
                sprintbuf(pb, "%s %llu\n", name, (unsigned long long)st[k].value);
        }
    }
    json_object *r = json_object_new_string_len(pb->buf, pb->bpos);
    printbuf_free(pb);
    return r;
}

/* A labelled sample (a module's, per socket say) goes in an object under its name, keyed by
 * the label's value: "events_delivered": {"tcp:127.0.0.1:8080": 3}. */
static void add_labelled(json_object *r, const hub_stat *s)
{
    json_object *o;
    if (!json_object_object_get_ex(r, s->name, &o) || !json_object_is_type(o, json_type_object)) {
        o = json_object_new_object();
        json_object_object_add(r, s->name, o);
    }
    const char *v = strstr(s->label, "=\"");
    size_t vl = v ? strlen(v + 2) : 0;
    char key[sizeof(s->label)];
    if (v && vl && v[1 + vl] == '"') {
        snprintf(key, sizeof(key), "%.*s", (int)(vl - 1), v + 2);
        json_object_object_add(o, key, u64(s->value));
    } else
        json_object_object_add(o, s->label, u64(s->value));
}

/* The counters as one object, with the per-worker ones in "workers". */
static json_object *stats_json(const hub_stat *st, size_t n, int nworkers)
{
    json_object *r = json_object_new_object(), *ws = json_object_new_array();
    for (int w = 0; w < nworkers; w++) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "worker", json_object_new_int(w));
        json_object_array_add(ws, o);
    }
    for (size_t i = 0; i < n; i++) {
        if (st[i].worker < 0 && st[i].label[0])
            add_labelled(r, &st[i]);
        else if (st[i].worker < 0)
            json_object_object_add(r, st[i].name, u64(st[i].value));
        else if (st[i].worker < nworkers)
            json_object_object_add(json_object_array_get_idx(ws, (size_t)st[i].worker), st[i].name,
                                   u64(st[i].value));
    }
    json_object_object_add(r, "workers", ws);
    return r;
}

static void cmd_stats(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    json_object *v, *r = NULL;
    hub_stat buf[64], *st = buf;
    size_t n = hub__stats_collect(h, buf, 64);
    if (n > 64 && (st = hub_calloc(n, sizeof(*st))))
        n = hub__stats_collect(h, st, n); /* many workers; the list's length is fixed */
    int prom = json_object_object_get_ex(params, "prometheus", &v) && json_object_get_boolean(v);
    if (st)
        r = prom ? prometheus_text(st, n) : stats_json(st, n, h->nworkers);
    if (st != buf)
        hub_free(st);
    if (!r) {
        hub_ctl_fail(call, HUB_CTL_INTERNAL_ERROR, "out of memory");
        return;
    }
    hub_ctl_reply(call, r);
}

json_object *hub__reload_result(hub *h)
{
    json_object *r = json_object_new_object();
    json_object_object_add(r, "script", json_object_new_string(h->cfg.script));
    json_object_object_add(r, "reloads", u64(HUB_STAT_GET(h, reloads)));
    json_object_object_add(r, "workers", json_object_new_int(h->nworkers));
    return r;
}

static void cmd_reload(hub_ctl_call *call, json_object *params, void *ud)
{
    hub *h = ud;
    (void)params;
    if (h->stopping) {
        hub_ctl_fail(call, HUB_CTL_STOPPING, "the hub is stopping");
        return;
    }
    hub_log(HUB_LOG_NOTICE, "control: reload requested");
    hub__reload(h, call);
}

static void cmd_log_level(hub_ctl_call *call, json_object *params, void *ud)
{
    const char *s = str_param(params, "level", NULL);
    int prev = atomic_load(&hub_log_level), level = prev;
    (void)ud;
    if (s) {
        if ((level = hub_log_level_parse(s)) < 0) {
            hub_ctl_fail(call, HUB_CTL_INVALID_PARAMS,
                         "level '%.32s' must be crit, err, warn, notice, info or debug", s);
            return;
        }
        hub_log_set_level(level);
        hub_log(HUB_LOG_NOTICE, "control: log level %s (was %s)", hub_log_level_name(level),
                hub_log_level_name(prev));
    }
    json_object *r = json_object_new_object();
    json_object_object_add(r, "level", json_object_new_string(hub_log_level_name(level)));
    json_object_object_add(r, "previous", json_object_new_string(hub_log_level_name(prev)));
    hub_ctl_reply(call, r);
}

int hub__ctl_register_core(hub *h)
{
    static const struct {
        const char *name;
        hub_ctl_fn fn;
    } fns[] = {
        {"commands", cmd_commands},
        {"status", cmd_status},
        {"clients", cmd_clients},
        {"close", cmd_close},
        {"tag", cmd_tag},
        {"relay", cmd_relay},
        {"multicast", cmd_multicast},
        {"unicast", cmd_unicast},
        {"stats", cmd_stats},
        {"reload", cmd_reload},
        {"log-level", cmd_log_level},
    };
    for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
        const hub_ctl_spec *spec = hub_ctl_core_spec(fns[i].name);
        int rc = spec ? hub_ctl_register(h->ctl, spec, fns[i].fn, h) : -ENOENT;
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* The control socket as a module of the hub's own: the registry exists from the start (every
 * module registers its commands in it); this binds the socket, before any script loads and
 * before the worker threads (its mode is set through the process-wide umask). */
static int control_init(hub *h, void **state, char *err, size_t errlen)
{
    *state = h;
    return hub_ctl_listen(h->ctl, h->cfg.control_socket, h->cfg.control_tcp, err, errlen);
}

const hub_module control_module = {
    .name = "control",
    .init = control_init,
};
