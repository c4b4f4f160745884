/* Reloading the script without dropping a connection, all or nothing: a thread checks the
 * new text in a scratch state, every state loads it beside its running one, and all switch
 * only once every one succeeded. Its state is struct hub_reload (hub_int.h). */
#include <errno.h>
#include <json-c/json.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "hub/alloc.h"
#include "hub/control.h"
#include "hub/hub_int.h"
#include "hub/log.h"

static hub_script_conf script_conf(const hub_config *cfg, int worker, const char *source,
                                   size_t len, atomic_int *cancel)
{
    size_t nfns;
    const hub_script_fn_ref *fns = hub__inert_fns(&nfns);
    return (hub_script_conf){.path = cfg->script,
                             .event_callback = cfg->event_callback,
                             .max_instructions = cfg->max_instructions,
                             .max_memory = cfg->max_memory,
                             .restricted = cfg->lua_restrict,
                             .worker = worker,
                             .source = source,
                             .source_len = len,
                             .cancel = cancel,
                             .fns = fns,
                             .nfns = nfns,
                             .fns_inert = 1};
}

hub_script_conf hub__script_conf(const hub *h, int worker)
{
    /* During a reload round, every state loads the text read once, and may be cancelled. */
    hub_script_conf sc = script_conf(&h->cfg, worker, h->rl.source, h->rl.source_len,
                                     h->rl.source ? (atomic_int *)&h->rl.cancel : NULL);
    sc.fns = h->fns;
    sc.nfns = h->nfns;
    sc.fns_inert = 0;
    sc.requests = h->req_resume != NULL;
    sc.remote = h->remote_events;
    return sc;
}

/* A script being checked must not reach a hub: every call fails. */
static int noapi_data(void *ud, const char *data, size_t len)
{
    (void)ud, (void)data, (void)len;
    return -EAGAIN;
}
static int noapi_tagged(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    (void)ud, (void)tag, (void)taglen, (void)data, (void)len;
    return -EAGAIN;
}
static int noapi_id_data(void *ud, uint64_t id, const char *data, size_t len)
{
    (void)ud, (void)id, (void)data, (void)len;
    return -EAGAIN;
}
static int noapi_close(void *ud, uint64_t id, const char *reason)
{
    (void)ud, (void)id, (void)reason;
    return -EAGAIN;
}
static size_t noapi_stats(void *ud, hub_stat *out, size_t cap)
{
    (void)ud, (void)out, (void)cap;
    return 0;
}
static void noapi_count(void *ud, int what) { (void)ud, (void)what; }
static uint64_t noapi_token(void *ud)
{
    (void)ud;
    return 1; /* never completed: a checked state runs no events */
}
static int noapi_raise(void *ud, const char *event, struct json_object *params, uint64_t token,
                       char *err, size_t errlen)
{
    (void)ud, (void)event, (void)token;
    json_object_put(params);
    snprintf(err, errlen, "not while the script is being checked");
    return -EAGAIN;
}
static int noapi_subscribe(void *ud, const char *event, const char *socket, long expire_s,
                           char *err, size_t errlen)
{
    (void)ud, (void)event, (void)socket, (void)expire_s;
    snprintf(err, errlen, "not while the script is being checked");
    return -EAGAIN;
}
static int noapi_unsubscribe(void *ud, const char *event, const char *socket, char *err,
                             size_t errlen)
{
    return noapi_subscribe(ud, event, socket, 0, err, errlen);
}
static hub_req *noapi_req_resume(void *ud, unsigned index, unsigned label, char *err, size_t errlen)
{
    (void)ud, (void)index, (void)label;
    snprintf(err, errlen, "not available while the script is checked");
    return NULL;
}
static const hub_api no_api = {
    .req_resume = noapi_req_resume,
    .relay = noapi_data,
    .multicast = noapi_tagged,
    .unicast = noapi_tagged,
    .send = noapi_id_data,
    .set_tag = noapi_id_data,
    .close = noapi_close,
    .stats = noapi_stats,
    .count = noapi_count,
    .token = noapi_token,
    .raise = noapi_raise,
    .subscribe = noapi_subscribe,
    .unsubscribe = noapi_unsubscribe,
};

/* Load the script (source, or the file when source is NULL) in a scratch state. */
static int check_source(const hub_config *cfg, const hub_script_ops *ops, const char *source,
                        size_t len, atomic_int *cancel, char *err, size_t errlen)
{
    hub_script_conf sc = script_conf(cfg, -1, source, len, cancel);
    if (!cfg->script[0]) {
        snprintf(err, errlen, "no script configured ([lua] script)");
        return -EINVAL;
    }
    hub_script *s = ops->load(&sc, &no_api, NULL, err, errlen);
    if (!s)
        return -EINVAL;
    ops->free(s);
    return 0;
}

int hub_check_script(const hub_config *cfg, const hub_script_ops *ops, char *err, size_t errlen)
{
    return check_source(cfg, ops, NULL, 0, NULL, err, errlen);
}

/* The whole file, hub_malloc'd (with a NUL after it), or NULL with err set. */
static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    size_t cap = 0, n = 0;
    char *buf = NULL;
    if (!f) {
        snprintf(err, errlen, "cannot open %.900s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = hub_realloc(buf, cap = cap ? cap * 2 : 16384);
            if (!nb) {
                snprintf(err, errlen, "%.900s: out of memory reading it", path);
                goto fail;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        snprintf(err, errlen, "cannot read %.900s", path);
        goto fail;
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
fail:
    fclose(f);
    hub_free(buf);
    return NULL;
}

static void reload_round(hub *h);

/* Add call to a list of waiting calls. 0, or -ENOMEM (the call is answered). */
static int calls_add(hub_ctl_call ***list, size_t *n, hub_ctl_call *call)
{
    hub_ctl_call **nl = hub_realloc(*list, (*n + 1) * sizeof(*nl));
    if (!nl) {
        hub_ctl_fail(call, HUB_CTL_INTERNAL_ERROR, "out of memory");
        return -ENOMEM;
    }
    *list = nl;
    nl[(*n)++] = call;
    return 0;
}

/* Answer every call of a list with "the hub is stopping", and empty it. */
static void calls_stop(hub_ctl_call ***list, size_t *n)
{
    for (size_t i = 0; i < *n; i++)
        hub_ctl_fail((*list)[i], HUB_CTL_STOPPING, "the hub is stopping");
    hub_free(*list);
    *list = NULL;
    *n = 0;
}

/* A round is under way from its check to the workers' last answer. */
static int reload_busy(const hub *h) { return h->rl.checking || h->rl.waiting > 0; }

/* The end of a reload round, good or bad: counters, the log, the callers' answers, and the
 * next round if more reloads were asked for meanwhile. */
static void reload_done(hub *h, const char *why)
{
    hub_free(h->rl.source);
    h->rl.source = NULL;
    hub_free(h->rl.error);
    h->rl.error = NULL;
    if (why) {
        HUB_STAT_ADD(h, reload_failures, 1);
        h->rl.error = hub_strndup(why, strlen(why));
        hub_log(HUB_LOG_ERR, "reload failed: %s; keeping the old script", why);
    } else {
        HUB_STAT_ADD(h, reloads, 1);
        h->script_loaded = hub__wall_now();
        hub_log(HUB_LOG_NOTICE, "script reloaded");
    }
    hub_ctl_call **calls = h->rl.calls;
    size_t n = h->rl.ncalls;
    h->rl.calls = NULL;
    h->rl.ncalls = 0;
    for (size_t i = 0; i < n; i++) {
        if (why)
            hub_ctl_fail(calls[i], HUB_CTL_FAILED, "reload failed: %s", why);
        else
            hub_ctl_reply(calls[i], hub__reload_result(h));
    }
    hub_free(calls);
    if (h->rl.again && !h->stopping) {
        /* Asked for while this round ran, maybe for a newer file: load it again. */
        h->rl.again = 0;
        h->rl.calls = h->rl.next;
        h->rl.ncalls = h->rl.nnext;
        h->rl.next = NULL;
        h->rl.nnext = 0;
        reload_round(h);
    }
}

/* A round cut short by shutdown: neither a reload nor a failure; the callers are told. */
static void reload_stopped(hub *h)
{
    hub_free(h->rl.source);
    h->rl.source = NULL;
    calls_stop(&h->rl.calls, &h->rl.ncalls);
}

/* The check of a reload reads the file once (every state of the round loads that same
 * text, however the file changes meanwhile) and runs its top level, which may take up to
 * its instruction budget: a thread of its own does it while the loop goes on serving. */
static void *check_main(void *arg)
{
    hub *h = arg;
    char err[1024];
    size_t len = 0;
    char *src = read_file(h->cfg.script, &len, err, sizeof(err));
    int rc = src ? check_source(&h->cfg, h->ops, src, len, &h->rl.cancel, err, sizeof(err)) : -EIO;
    h->rl.source = src; /* the loop reads these after joining this thread */
    h->rl.source_len = len;
    hub__post_checked(h, rc < 0 ? err : NULL); /* on to hub__reload_checked, in the loop */
    return NULL;
}

static void reload_round(hub *h)
{
    sigset_t all, old;
    hub_log(HUB_LOG_NOTICE, "reloading %s", h->cfg.script);
    /* Check in a scratch state first, so a broken script never reaches the workers. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the loop thread */
    int rc = pthread_create(&h->rl.check_thread, NULL, check_main, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        reload_done(h, "cannot start a thread to check the script");
        return;
    }
    h->rl.checking = 1;
}

void hub__reload_checked(hub *h, const char *why)
{
    char err[1024];
    if (h->rl.checking)
        pthread_join(h->rl.check_thread, NULL); /* it has posted its last word */
    h->rl.checking = 0;
    if (h->stopping) {
        reload_stopped(h); /* whatever the check said, perhaps that it was cancelled */
        return;
    }
    if (why) {
        reload_done(h, why);
        return;
    }
    if (h->nworkers) {
        /* Two steps: every worker loads the new text beside its running script and says
         * how it went; then all switch, or all keep the old one (hub__reload_answered). */
        h->rl.waiting = h->nworkers;
        h->rl.failed = 0;
        hub_log(HUB_LOG_INFO, "reload: %s checked; the workers load it", h->cfg.script);
        if (hub__workers_reload(h) < 0) {
            h->rl.waiting = 0;
            reload_done(h, "out of memory");
        }
        return;
    }
    hub_script_conf sc = hub__script_conf(h, -1);
    hub_script *n = h->ops->reload(h->script, &sc, err, sizeof(err));
    if (!n) {
        reload_done(h, err);
        return;
    }
    h->ops->free(h->script);
    h->script = n;
    reload_done(h, NULL);
}

void hub__reload(hub *h, hub_ctl_call *call)
{
    if (reload_busy(h)) {
        /* Workers are still loading an earlier request's file: this one gets a round of its
         * own once they finish (requests arriving meanwhile share it). */
        if (!call || calls_add(&h->rl.next, &h->rl.nnext, call) == 0)
            h->rl.again = 1;
        return;
    }
    if (call && calls_add(&h->rl.calls, &h->rl.ncalls, call) < 0)
        return;
    reload_round(h);
}

void hub__reload_answered(hub *h, int worker, const char *why)
{
    if (why && !h->rl.failed) {
        h->rl.failed = 1;
        hub_free(h->rl.error);
        h->rl.error = NULL;
        char msg[1100];
        snprintf(msg, sizeof(msg), "worker %d: %s", worker, why);
        h->rl.error = hub_strndup(msg, strlen(msg));
    }
    if (h->rl.waiting == 0 || --h->rl.waiting > 0)
        return;
    if (h->stopping) {
        hub__workers_decide(h, 0); /* (not run: the workers stop first) */
        reload_stopped(h);
        return;
    }
    /* Every worker has answered: all switch to the new script, or all keep the old. */
    hub__workers_decide(h, !h->rl.failed);
    if (h->rl.failed) {
        char *msg = h->rl.error;
        h->rl.error = NULL;
        reload_done(h, msg);
        hub_free(msg);
    } else {
        reload_done(h, NULL);
    }
}

void hub__reload_join(hub *h)
{
    if (h->rl.checking) {
        pthread_join(h->rl.check_thread, NULL);
        h->rl.checking = 0;
    }
}

void hub__reload_free(hub *h)
{
    /* A reload still waiting for workers will not finish now: tell whoever asked. */
    reload_stopped(h);
    calls_stop(&h->rl.next, &h->rl.nnext);
    hub_free(h->rl.error);
    h->rl.error = NULL;
}
