/* The hub's loop: set-up, signals, the before-sleep work (flush, reap, hand-off) and
 * graceful shutdown. The reload lives in reload.c. */
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

/* Modules fail what they still hold (reports reach the scripts), then the workers stop. */
static void stop_modules(hub *h)
{
    hub__modules_stop(h);
    /* What their stop posted (failure reports among it) reaches the workers before STOP. */
    hub__mailbox_run(h);
    if (h->nworkers && !h->workers_stopped)
        hub__workers_stop(h);
}

/* Shutdown, first step: the modules deliver what they have in flight while the scripts
 * still run (their reports, and the events queued to workers, which may raise more). The
 * modules stop only once nothing is in flight after every worker has run what it was handed:
 * a marker queued behind its events comes back through the mailbox behind its commands. */
static void drain_step(hub *h)
{
    if (hub__modules_in_flight(h) > 0) {
        h->markers_sent = 0; /* what the workers do with the results needs a round of its own */
        return;
    }
    if (h->markers_waiting > 0)
        return;
    if (h->nworkers && (!h->markers_sent || hub__workers_busy(h))) {
        h->markers_sent = 1;
        h->markers_waiting = hub__workers_mark(h);
        return;
    }
    stop_modules(h);
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
    /* Writes may have drained a congested reader: reading may go on. */
    if (h->congested || h->hold_reads)
        hub__hold_update(h);
    /* Whatever is left (the round bound was hit) must not wait for the next event. */
    if ((h->closing || h->pending) && !ev_is_active(&h->idle_w))
        ev_idle_start(loop, &h->idle_w);
    if (h->stopping && !h->mods_stopped)
        drain_step(h);
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
    if (!h->mods_stopped) {
        /* What is left is failed and reported; the reports (and what they send) get a short
         * grace to reach the scripts and the clients before the hub gives up. */
        int grace = h->cfg.shutdown_timeout < HUB_SHUTDOWN_GRACE_MS ? h->cfg.shutdown_timeout
                                                                    : HUB_SHUTDOWN_GRACE_MS;
        hub_log(HUB_LOG_WARN,
                "shutdown: %d ms passed with %zu deliveries in flight; failing them (%d ms more "
                "to flush)",
                h->cfg.shutdown_timeout, hub__modules_in_flight(h), grace);
        stop_modules(h);
        ev_timer_set(w, grace / 1000.0, 0);
        ev_timer_start(loop, w);
        return;
    }
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
    atomic_store(&h->rl.cancel, 1); /* a reload's loads give up where they are */
    hub_log(HUB_LOG_NOTICE, "%s: stopping (flushing queued output, up to %d ms)", why,
            h->cfg.shutdown_timeout);
    for (hub_client *c = h->clients; c; c = c->next) {
        ev_io_stop(h->loop, &c->rio);
        c->flags &= ~HUB_CLIENT_READING;
    }
    ev_timer_init(&h->shutdown_w, shutdown_timeout_cb, h->cfg.shutdown_timeout / 1000.0, 0);
    h->shutdown_w.data = h;
    ev_timer_start(h->loop, &h->shutdown_w);
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
    h->ctl = hub_ctl_new(h->loop, "", "", err, errlen); /* the socket: the control module */
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
        if (!(h->loop_exec = hub__loop_exec_new(h))) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        h->script = ops->load(&sc, &hub__api, h->loop_exec, err, errlen);
        if (!h->script)
            goto fail;
    }

    ev_init(&h->drain_w, hub__drain_timeout_cb);
    h->drain_w.repeat = 1.0;
    h->drain_w.data = h;
    hub__hold_init(h);
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

int hub_start(hub *h, char *err, size_t errlen)
{
    if (h->started_mods)
        return 0;
    h->started_mods = 1;
    return hub__modules_start(h, err, errlen);
}

int hub_run(hub *h)
{
    char err[1024];
    if (hub_start(h, err, sizeof(err)) < 0) {
        hub_log_write(HUB_LOG_CRIT, "cannot start: %s", err);
        return 1;
    }
    ev_run(h->loop, 0);
    finish_shutdown(h);
    return 0;
}

void hub_destroy(hub *h)
{
    if (!h)
        return;
    atomic_store(&h->rl.cancel, 1);
    hub__modules_stop(h); /* (if the loop did not) their threads end here */
    if (h->workers) {
        if (!h->workers_stopped)
            hub__workers_stop(h);
        hub__workers_join(h);
    }
    hub__reload_join(h);
    h->stopping = 1;
    h->sink = NULL;        /* the modules have stopped: a raise now fails at once, it cannot loop */
    hub__mailbox_drain(h); /* the check's verdict among them, if the loop never ran it */
    hub__reload_free(h);
    hub__ctl_jobs_free(h);
    hub__modules_free(h); /* after the mailbox ran their closures, before their commands go */
    hub_ctl_free(h->ctl);
    hub__client_free_all(h);
    hub__tags_free(h);
    h->ops->free(h->script); /* NULL-safe */
    hub_free(h->loop_exec);
    hub_idmap_free(&h->ids);
    hub_free(h->slots);
    hub_free(h->free_slots);
    pthread_rwlock_destroy(&h->tags_lock);
    if (h->loop) {
        hub__mailbox_free(h);
        hub__results_free(h);
        ev_loop_destroy(h->loop);
    }
    hub_free(h);
}
