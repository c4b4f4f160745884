/* The hub's loop: set-up, signals, the before-sleep work (flush, reap, hand-off), reload and
 * graceful shutdown. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "hub/alloc.h"
#include "hub/control.h"
#include "hub/hub_int.h"
#include "hub/log.h"

static hub_script_conf script_conf(const hub_config *cfg, int worker, const char *source,
                                   size_t len, atomic_int *cancel)
{
    return (hub_script_conf){.path = cfg->script,
                             .event_callback = cfg->event_callback,
                             .max_instructions = cfg->max_instructions,
                             .max_memory = cfg->max_memory,
                             .worker = worker,
                             .source = source,
                             .source_len = len,
                             .cancel = cancel};
}

hub_script_conf hub__script_conf(const hub *h, int worker)
{
    /* During a reload round, every state loads the text read once, and may be cancelled. */
    return script_conf(&h->cfg, worker, h->reload_source, h->reload_source_len,
                       h->reload_source ? (atomic_int *)&h->reload_cancel : NULL);
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
static const hub_api no_api = {
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

/* Modules fail what they still hold (reports reach the scripts), then the workers stop. */
static void stop_modules(hub *h)
{
    hub__modules_stop(h);
    if (h->nworkers && !h->workers_stopped)
        hub__workers_stop(h);
}

static void prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    hub *h = w->data;
    (void)revents;
    /* Reaping runs close handlers that may queue output, so flush after it. */
    for (int round = 0; (h->closing || h->pending) && round < 8; round++) {
        hub__reap_closing(h);
        hub__flush_pending(h);
    }
    /* Whatever is left (the round bound was hit) must not wait for the next event. */
    if ((h->closing || h->pending) && !ev_is_active(&h->idle_w))
        ev_idle_start(loop, &h->idle_w);
    /* Shutdown, first step: modules deliver what they have in flight (the scripts still run
     * its reports); then they fail what is left and the workers stop behind it. */
    if (h->stopping && !h->mods_stopped && hub__modules_in_flight(h) == 0)
        stop_modules(h);
    if (h->nworkers)
        hub__workers_flush(h);
    if (h->stopping && h->mods_stopped && h->workers_done >= h->nworkers && !h->pending) {
        int busy = 0;
        for (hub_client *c = h->clients; c && !busy; c = c->next)
            busy = c->wq_count != 0;
        if (!busy)
            ev_break(loop, EVBREAK_ALL);
    }
}

static void idle_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
    /* Only keeps the loop from blocking while output is pending; prepare_cb does the work. */
    (void)loop, (void)w, (void)revents;
}

static void shutdown_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    hub *h = w->data;
    (void)revents;
    if (!h->mods_stopped)
        hub_log(HUB_LOG_WARN, "shutdown: %d ms passed with %zu deliveries in flight; failing them",
                h->cfg.shutdown_timeout, hub__modules_in_flight(h));
    else
        hub_log(HUB_LOG_WARN, "shutdown: %d ms passed with output still queued; closing anyway",
                h->cfg.shutdown_timeout);
    stop_modules(h);
    ev_break(loop, EVBREAK_ALL);
}

static void start_shutdown(hub *h, const char *why)
{
    if (h->stopping)
        return;
    h->stopping = 1;
    atomic_store(&h->reload_cancel, 1); /* a reload's loads give up where they are */
    hub_log(HUB_LOG_NOTICE, "%s: stopping (flushing queued output, up to %d ms)", why,
            h->cfg.shutdown_timeout);
    ev_io_stop(h->loop, &h->accept_w);
    close(h->lfd);
    h->lfd = -1;
    for (hub_client *c = h->clients; c; c = c->next) {
        ev_io_stop(h->loop, &c->rio);
        c->flags &= ~HUB_CLIENT_READING;
    }
    ev_timer_init(&h->shutdown_w, shutdown_timeout_cb, h->cfg.shutdown_timeout / 1000.0, 0);
    h->shutdown_w.data = h;
    ev_timer_start(h->loop, &h->shutdown_w);
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
static int reload_busy(const hub *h) { return h->checking || h->reload_waiting > 0; }

/* The end of a reload round, good or bad: counters, the log, the callers' answers, and the
 * next round if more reloads were asked for meanwhile. */
static void reload_done(hub *h, const char *why)
{
    hub_free(h->reload_source);
    h->reload_source = NULL;
    hub_free(h->reload_error);
    h->reload_error = NULL;
    if (why) {
        HUB_STAT_ADD(h, reload_failures, 1);
        h->reload_error = hub_strndup(why, strlen(why));
        hub_log(HUB_LOG_ERR, "reload failed: %s; keeping the old script", why);
    } else {
        HUB_STAT_ADD(h, reloads, 1);
        h->script_loaded = hub__wall_now();
        hub_log(HUB_LOG_NOTICE, "script reloaded");
    }
    hub_ctl_call **calls = h->reload_calls;
    size_t n = h->nreload_calls;
    h->reload_calls = NULL;
    h->nreload_calls = 0;
    for (size_t i = 0; i < n; i++) {
        if (why)
            hub_ctl_fail(calls[i], HUB_CTL_FAILED, "reload failed: %s", why);
        else
            hub_ctl_reply(calls[i], hub__reload_result(h));
    }
    hub_free(calls);
    if (h->reload_again && !h->stopping) {
        /* Asked for while this round ran, maybe for a newer file: load it again. */
        h->reload_again = 0;
        h->reload_calls = h->reload_next;
        h->nreload_calls = h->nreload_next;
        h->reload_next = NULL;
        h->nreload_next = 0;
        reload_round(h);
    }
}

/* A round cut short by shutdown: neither a reload nor a failure; the callers are told. */
static void reload_stopped(hub *h)
{
    hub_free(h->reload_source);
    h->reload_source = NULL;
    calls_stop(&h->reload_calls, &h->nreload_calls);
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
    int rc =
        src ? check_source(&h->cfg, h->ops, src, len, &h->reload_cancel, err, sizeof(err)) : -EIO;
    h->reload_source = src; /* the loop reads these after joining this thread */
    h->reload_source_len = len;
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
    int rc = pthread_create(&h->check_thread, NULL, check_main, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        reload_done(h, "cannot start a thread to check the script");
        return;
    }
    h->checking = 1;
}

void hub__reload_checked(hub *h, const char *why)
{
    char err[1024];
    if (h->checking)
        pthread_join(h->check_thread, NULL); /* it has posted its last word */
    h->checking = 0;
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
        h->reload_waiting = h->nworkers;
        h->reload_failed = 0;
        hub_log(HUB_LOG_INFO, "reload: %s checked; the workers load it", h->cfg.script);
        if (hub__workers_reload(h) < 0) {
            h->reload_waiting = 0;
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
        if (!call || calls_add(&h->reload_next, &h->nreload_next, call) == 0)
            h->reload_again = 1;
        return;
    }
    if (call && calls_add(&h->reload_calls, &h->nreload_calls, call) < 0)
        return;
    reload_round(h);
}

void hub__reload_answered(hub *h, int worker, const char *why)
{
    if (why && !h->reload_failed) {
        h->reload_failed = 1;
        hub_free(h->reload_error);
        h->reload_error = NULL;
        char msg[1100];
        snprintf(msg, sizeof(msg), "worker %d: %s", worker, why);
        h->reload_error = hub_strndup(msg, strlen(msg));
    }
    if (h->reload_waiting == 0 || --h->reload_waiting > 0)
        return;
    if (h->stopping) {
        hub__workers_decide(h, 0); /* (not run: the workers stop first) */
        reload_stopped(h);
        return;
    }
    /* Every worker has answered: all switch to the new script, or all keep the old. */
    hub__workers_decide(h, !h->reload_failed);
    if (h->reload_failed) {
        char *msg = h->reload_error;
        h->reload_error = NULL;
        reload_done(h, msg);
        hub_free(msg);
    } else {
        reload_done(h, NULL);
    }
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    hub *h = w->data;
    (void)loop;
    (void)revents;
    if (w->signum == SIGHUP) {
        hub_log(HUB_LOG_NOTICE, "SIGHUP");
        hub__reload(h, NULL);
    } else
        start_shutdown(h, w->signum == SIGINT ? "SIGINT" : "SIGTERM");
}

static int setup_slots(hub *h)
{
    size_t n = (size_t)h->cfg.max_clients;
    h->slots = hub_calloc(n, sizeof(*h->slots));
    h->free_slots = hub_malloc(n * sizeof(*h->free_slots));
    if (!h->slots || !h->free_slots)
        return -ENOMEM;
    /* A min-heap of free conidx values (see client.c); ascending order is one. */
    for (size_t i = 0; i < n; i++)
        h->free_slots[i] = (int)i;
    h->nfree = (int)n;
    return 0;
}

hub *hub_new(const hub_config *cfg, const hub_script_ops *ops, char *err, size_t errlen)
{
    hub *h = hub_calloc(1, sizeof(*h));
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->cfg = *cfg;
    h->ops = ops;
    h->lfd = h->spare_fd = -1;
    h->loop_thread = pthread_self();
    atomic_init(&h->next_token, 1);
    h->next_id = 1;
    h->started = h->script_loaded = hub__wall_now();
    pthread_rwlock_init(&h->tags_lock, NULL);
    h->loop = ev_default_loop(EVFLAG_AUTO);
    if (!h->loop) {
        snprintf(err, errlen, "cannot create the event loop");
        goto fail;
    }
    hub__mailbox_init(h);
    signal(SIGPIPE, SIG_IGN);
    if (setup_slots(h) < 0) {
        snprintf(err, errlen, "out of memory for %d client slots", cfg->max_clients);
        goto fail;
    }
    if (!cfg->script[0]) {
        snprintf(err, errlen, "no script configured ([lua] script)");
        goto fail;
    }
    /* The control socket exists before anything is logged as listening, and before the
     * worker threads (its mode is set through the process-wide umask). Its registry exists
     * even with no socket configured, so modules register commands either way. */
    h->ctl = hub_ctl_new(h->loop, cfg->control_socket, cfg->control_tcp, err, errlen);
    if (!h->ctl || hub__ctl_register_core(h) < 0) {
        if (h->ctl)
            snprintf(err, errlen, "out of memory registering control commands");
        goto fail;
    }
    /* Modules before any script loads: a script's top level may subscribe or raise. */
    if (hub__modules_init(h, err, errlen) < 0)
        goto fail;
    if (cfg->workers > 0) {
        if (hub__workers_start(h, err, errlen) < 0)
            goto fail;
    } else {
        hub_script_conf sc = hub__script_conf(h, -1);
        h->script = ops->load(&sc, &hub__loop_api, h, err, errlen);
        if (!h->script)
            goto fail;
    }
    if (hub__listen(h, err, errlen) < 0)
        goto fail;

    ev_init(&h->drain_w, hub__drain_timeout_cb);
    h->drain_w.repeat = 1.0;
    h->drain_w.data = h;
    ev_prepare_init(&h->prepare_w, prepare_cb);
    ev_idle_init(&h->idle_w, idle_cb);
    h->prepare_w.data = h->idle_w.data = h;
    ev_prepare_start(h->loop, &h->prepare_w);
    ev_signal_init(&h->sigterm_w, signal_cb, SIGTERM);
    ev_signal_init(&h->sigint_w, signal_cb, SIGINT);
    ev_signal_init(&h->sighup_w, signal_cb, SIGHUP);
    h->sigterm_w.data = h->sigint_w.data = h->sighup_w.data = h;
    ev_signal_start(h->loop, &h->sigterm_w);
    ev_signal_start(h->loop, &h->sigint_w);
    ev_signal_start(h->loop, &h->sighup_w);
    return h;
fail:
    hub_destroy(h);
    return NULL;
}

static void finish_shutdown(hub *h)
{
    size_t left = 0;
    for (hub_client *c = h->clients; c; c = c->next)
        left += c->wq_bytes;
    hub_log(HUB_LOG_NOTICE, "stopped (%llu connections served, %zu bytes left unsent)",
            (unsigned long long)HUB_STAT_GET(h, accepted), left);
}

int hub_run(hub *h)
{
    char err[1024];
    if (hub__modules_start(h, err, sizeof(err)) < 0) {
        hub_log(HUB_LOG_CRIT, "%s", err);
        return 1;
    }
    ev_io_start(h->loop, &h->accept_w);
    ev_run(h->loop, 0);
    finish_shutdown(h);
    return 0;
}

void hub_destroy(hub *h)
{
    if (!h)
        return;
    atomic_store(&h->reload_cancel, 1);
    hub__modules_stop(h); /* (if the loop did not) their threads end here */
    if (h->workers) {
        if (!h->workers_stopped)
            hub__workers_stop(h);
        hub__workers_join(h);
    }
    if (h->checking) {
        pthread_join(h->check_thread, NULL);
        h->checking = 0;
    }
    h->stopping = 1;
    hub__mailbox_drain(h); /* the check's verdict among them, if the loop never ran it */
    /* A reload still waiting for workers will not finish now: tell whoever asked. */
    reload_stopped(h);
    calls_stop(&h->reload_next, &h->nreload_next);
    hub__ctl_jobs_free(h);
    hub_free(h->reload_error);
    h->sink = NULL;
    hub__modules_free(h); /* after the mailbox ran their closures, before their commands go */
    hub_ctl_free(h->ctl);
    hub__client_free_all(h);
    hub__tags_free(h);
    h->ops->free(h->script); /* NULL-safe */
    if (h->lfd >= 0)
        close(h->lfd);
    if (h->spare_fd >= 0)
        close(h->spare_fd);
    hub_idmap_free(&h->ids);
    hub_free(h->slots);
    hub_free(h->free_slots);
    pthread_rwlock_destroy(&h->tags_lock);
    if (h->loop) {
        hub__mailbox_free(h);
        ev_loop_destroy(h->loop);
    }
    hub_free(h);
}
