/* The hub's counters and gauges as one list: the control socket's stats (JSON and Prometheus)
 * and evapi.stats() in scripts are all rendered from it, so they always agree. */
#include <math.h>
#include <time.h>

#include "hub/hub_int.h"

typedef struct collector {
    hub_stat *out;
    size_t cap, n;
} collector;

static void put(collector *c, const char *name, const char *help, int gauge, int worker,
                uint64_t value)
{
    if (c->n < c->cap)
        c->out[c->n] = (hub_stat){
            .name = name, .help = help, .gauge = gauge, .worker = worker, .value = value};
    c->n++;
}

static const char *const script_names[HUB_SCRIPT_NCOUNTS] = {"lua_errors", "lua_budget_kills",
                                                             "lua_memory_errors"};
static const char *const script_help[HUB_SCRIPT_NCOUNTS] = {
    "Lua callbacks that raised an error (budget and memory failures included)",
    "Lua callbacks stopped by the instruction budget",
    "Lua callbacks that failed for want of memory (max_memory)"};

double hub__wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

size_t hub__stats_collect(hub *h, hub_stat *out, size_t cap)
{
    collector c = {out, cap, 0};
    hub_worker_view wv;

    pthread_rwlock_rdlock(&h->tags_lock);
    uint64_t ntags = h->ntags;
    pthread_rwlock_unlock(&h->tags_lock);
    double up = hub__wall_now() - h->started;

    put(&c, "connections_accepted", "connections accepted", 0, -1, HUB_STAT_GET(h, accepted));
    put(&c, "connections_refused", "connections refused (max_clients, out of descriptors)", 0, -1,
        HUB_STAT_GET(h, refused));
    put(&c, "connections_closed", "connections closed after the script saw them open", 0, -1,
        HUB_STAT_GET(h, closed));
    put(&c, "clients", "connections open now", 1, -1, (uint64_t)atomic_load(&h->nclients));
    put(&c, "tags", "tags in the index now", 1, -1, ntags);
    put(&c, "frames_in", "frames received from clients", 0, -1, HUB_STAT_GET(h, frames_in));
    put(&c, "bytes_in", "bytes received from clients", 0, -1, HUB_STAT_GET(h, bytes_in));
    put(&c, "frames_out", "frames written to clients in full", 0, -1, HUB_STAT_GET(h, frames_out));
    put(&c, "bytes_out", "bytes written to clients", 0, -1, HUB_STAT_GET(h, bytes_out));
    put(&c, "decode_errors", "connections closed for a malformed frame", 0, -1,
        HUB_STAT_GET(h, decode_errors));
    put(&c, "slow_consumer_closes", "connections closed for a write queue over max_outbuf", 0, -1,
        HUB_STAT_GET(h, slow_closes));
    put(&c, "timeout_closes", "connections closed by frame_timeout or idle_timeout", 0, -1,
        HUB_STAT_GET(h, timeout_closes));
    put(&c, "read_holds",
        "times reading from every client waited for a congested reader to catch up", 0, -1,
        HUB_STAT_GET(h, read_holds));
    put(&c, "frames_lost",
        "frames that could not be queued for the script (out of memory); each closed its "
        "connection",
        0, -1, HUB_STAT_GET(h, frames_lost));
    put(&c, "dropped_frames", "frames dropped for a full write queue (outbuf_policy drop)", 0, -1,
        HUB_STAT_GET(h, dropped_frames));
    put(&c, "outq_bytes", "bytes of frames queued for clients, not yet written", 1, -1,
        HUB_STAT_GET(h, outq_bytes));
    put(&c, "outq_block_bytes", "bytes of the frame blocks the clients' queues hold", 1, -1,
        HUB_STAT_GET(h, outq_blocks));
    put(&c, "read_buffers", "read buffers clients hold (a partial frame keeps one; idle: none)", 1,
        -1, HUB_STAT_GET(h, rbufs));
    put(&c, "read_buffer_bytes", "bytes of the read buffers clients hold", 1, -1,
        HUB_STAT_GET(h, rbuf_bytes));
    size_t totals = c.n; /* the loop's script counts, plus the workers' added below */
    for (int i = 0; i < HUB_SCRIPT_NCOUNTS; i++)
        put(&c, script_names[i], script_help[i], 0, -1, HUB_STAT_GET(h, script[i]));
    put(&c, "reloads", "script reloads that succeeded", 0, -1, HUB_STAT_GET(h, reloads));
    put(&c, "reload_failures", "script reloads that failed (the old script kept running)", 0, -1,
        HUB_STAT_GET(h, reload_failures));
    put(&c, "control_requests", "requests received on the control socket", 0, -1,
        h->ctl ? hub_ctl_requests(h->ctl) : 0);
    put(&c, "completions_undelivered",
        "results of work started by a script that found no state to run in (reloaded, stopped)", 0,
        -1, atomic_load(&h->completions_undelivered));
    put(&c, "uptime_seconds", "seconds since the hub started", 1, -1,
        up > 0 ? (uint64_t)floor(up) : 0);
    for (int w = 0; w < h->nworkers; w++) {
        hub__worker_view(h, w, &wv);
        put(&c, "queued_events", "events waiting in the worker's queue", 1, w, wv.queued_events);
        put(&c, "queued_bytes", "payload bytes waiting in the worker's queue", 1, w,
            wv.queued_bytes);
        put(&c, "events", "events the worker has run", 0, w, wv.events);
        put(&c, "queued_call_bytes",
            "payload bytes the worker's script handed to the loop, not yet carried out", 1, w,
            wv.calls_bytes);
        put(&c, "calls_refused", "script calls refused for the worker_calls bound (ENOBUFS)", 0, w,
            wv.calls_refused);
        for (int i = 0; i < HUB_SCRIPT_NCOUNTS; i++) {
            put(&c, script_names[i], script_help[i], 0, w, wv.script[i]);
            if (totals + (size_t)i < cap)
                out[totals + i].value += wv.script[i];
        }
    }
    /* The modules' own, after the hub's: an entry they add never moves the hub's. */
    c.n += hub__modules_stats(h, c.n < cap ? out + c.n : NULL, c.n < cap ? cap - c.n : 0);
    return c.n;
}
