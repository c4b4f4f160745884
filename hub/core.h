/* What a module may use of the hub: the loop, the mailbox, config sections, the control
 * registry, counters, completions, the event interface's seam and the listener helper. Code in
 * transports/ includes this (and hub/control.h, hub/log.h, hub/alloc.h), never hub_int.h or lua/.
 */
#ifndef HUB_CORE_H
#define HUB_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "hub/config.h"
#include "hub/control.h"
#include "hub/listen.h"
#include "hub/script.h"

struct ev_loop;
struct json_object;
typedef struct hub hub;

/* ---- the loop and its mailbox ---- */

/* The loop every socket of the hub is watched by. Loop thread only. */
struct ev_loop *hub_loop(hub *h);
/* 1 when called on the loop thread. */
int hub_on_loop(const hub *h);
/* 1 once SIGTERM/SIGINT started the shutdown. Loop thread. */
int hub_stopping(const hub *h);

/* A closure for the loop thread. fn gets the hub and arg; it owns arg from then on. */
typedef void (*hub_post_fn)(hub *h, void *arg);

/* Any thread: run fn(h, arg) on the loop thread, after everything this thread posted before.
 * 0, or -ENOMEM (fn never runs; arg stays the caller's). Posts made after the loop stopped
 * are run by hub_destroy, with hub_stopping() true. A module's threads must be joined (or
 * unable to post) by the end of its stop: a post after hub_destroy is a use after free. */
int hub_loop_post(hub *h, hub_post_fn fn, void *arg);
/* As hub_loop_post for what must get through (an answer the loop waits for): waits for
 * memory rather than fail. */
void hub_loop_post_retry(hub *h, hub_post_fn fn, void *arg);

/* ---- modules ---- */

/* A module: one table, registered by CMake (HUB_MODULE in transports/CMakeLists.txt). Every
 * callback may be NULL. state is the module's own, made by init. */
typedef struct hub_module {
    const char *name;
    const hub_conf_section *sections; /* ends with a NULL name; may be NULL */
    /* Before the loop runs (config read, control registry ready): parse the module's
     * sections, register control commands. 0, or <0 with err "file:line: reason" or a
     * reason; start-up stops. */
    int (*init)(hub *h, void **state, char *err, size_t errlen);
    /* After daemonizing, before the first event: start threads (the hub blocks signals in
     * them for you when they are created from here). 0 or <0 with err set. */
    int (*start)(void *state, char *err, size_t errlen);
    /* Shutdown began: take no new work; returns how many deliveries are still in flight.
     * Called again each loop iteration until 0 or shutdown_timeout. */
    size_t (*drain)(void *state);
    /* Drained or out of time: report whatever is left as failed, close sockets, join
     * threads. The loop still runs completions posted from here. */
    void (*stop)(void *state);
    void (*free)(void *state); /* NULL-safe on a half-built state */
    /* Its counters and gauges, as hub_api.stats. Any thread. */
    size_t (*stats)(void *state, hub_stat *out, size_t cap);
    /* Functions it offers scripts (hub/script.h), ending with a NULL name; may be NULL.
     * Called with the state init made; present (and failing) in a state being checked. */
    const hub_script_fn *fns;
} hub_module;

/* The modules CMake registered, in order, NULL-terminated (generated modules.c). */
extern const hub_module *const hub_modules[];

/* The state init made for the module called name, or NULL. */
void *hub_module_state(hub *h, const char *name);
/* The hub's config (module sections included). */
const hub_config *hub_get_config(const hub *h);

/* ---- the control registry: present even when no control socket is configured ---- */
hub_ctl *hub_get_ctl(hub *h);

/* ---- connections ---- */

/* Any thread: 1 when tag is a valid tag (1..HUB_TAG_MAX printable ASCII bytes, no spaces). */
int hub_tag_valid(const char *tag, size_t len);

/* Loop thread: multicast data to every client of this hub carrying tag (framed as the hub
 * frames; never routed beyond it). Recipients, 0 for none, or <0 (-EINVAL bad tag,
 * -EMSGSIZE too large). */
int hub_multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len);

/* Loop thread: how many connections are open on this hub. */
int hub_clients(const hub *h);
/* Loop thread: how many of this hub's connections carry tag (0 for an unknown tag). */
int hub_tag_members(hub *h, const char *tag, size_t taglen);

/* ---- the router seam: one module (e.g. a cluster of hubs) routes beyond this process ----
 *
 * The hub calls the router for what scripts and the control socket ask (never for what the
 * hub_local_* functions below deliver, which is how a router hands in what arrives from
 * elsewhere, so nothing it delivers comes back to it). Every callback runs on the loop
 * thread unless it says otherwise, must not block, and may be NULL. A hub with no router
 * pays one pointer test per call. */
typedef struct hub_router {
    /* After the local delivery of a relay (tag NULL) or multicast of n local recipients
     * (not for one with scope local). Returns how many remote recipients to add to the
     * caller's count (>= 0; failures are the router's to count). */
    int (*relay)(void *ud, const char *data, size_t len);
    int (*multicast)(void *ud, const char *tag, size_t taglen, const char *data, size_t len);
    /* Before a unicast, nlocal being the local members of tag: > 0 when the router took it
     * (the count to return), 0 to deliver it locally as without a router, < 0 an error. */
    int (*unicast)(void *ud, const char *tag, size_t taglen, const char *data, size_t len,
                   uint32_t nlocal);
    /* id is no connection of this hub: 1 when handed to where it may be, or -ENOENT. */
    int (*send)(void *ud, uint64_t id, const char *data, size_t len);
    int (*set_tag)(void *ud, uint64_t id, const char *tag, size_t taglen); /* taglen 0: none */
    int (*close)(void *ud, uint64_t id, const char *reason);
    /* tag got its first local member (present 1) or lost its last (present 0). */
    void (*tag_members)(void *ud, const char *tag, size_t taglen, int present);
    /* Any thread: how many remote recipients a relay (tag NULL) or multicast to tag would
     * reach as far as the router knows (what a worker's call returns, beside the local). */
    int (*reach)(void *ud, const char *tag, size_t taglen);
} hub_router;

/* Loop thread, from a module's init: the one router (a second is -EEXIST). */
int hub_set_router(hub *h, const hub_router *router, void *ud);
/* Loop thread, from a module's init: ids of connections accepted from now on are base + 1,
 * base + 2, ... (a node's prefix in the high bits makes them unique across hubs). 0, or
 * -EINVAL when base is below the next id or leaves fewer than 2^32 ids. */
int hub_set_id_base(hub *h, uint64_t base);

/* Loop thread: deliver to this hub's connections only, as a relay / multicast / unicast /
 * send / set_tag / close of the control socket would, without the router. Recipients (or 1),
 * 0 for none, or <0 (-EINVAL bad tag, -EMSGSIZE too large, -ENOENT no such id). */
int hub_local_relay(hub *h, const char *data, size_t len);
int hub_local_unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len);
int hub_local_send(hub *h, uint64_t id, const char *data, size_t len);
int hub_local_set_tag(hub *h, uint64_t id, const char *tag, size_t taglen);
int hub_local_close(hub *h, uint64_t id, const char *reason);

/* ---- what other hubs send, through this hub's script (opt-in) ---- */

/* Loop thread, from a module's init: the scripts are to handle what the module hands to
 * hub_remote_event (checked when a script loads). */
void hub_want_remote_events(hub *h);
/* Loop thread: run the scripts' remote handler (hub_script_ops.on_remote) for data, which
 * came from o, in the executor key picks (the same key, the same executor, in order).
 * 0; -ENOBUFS when that worker's queue is full (worker_queue, or its 64 MiB), -ESHUTDOWN
 * when the workers have stopped, -ENOMEM: the event was dropped (the caller counts it). */
int hub_remote_event(hub *h, uint64_t key, const hub_origin *o, const char *data, size_t len);

/* ---- completions ---- */

/* Any thread: deliver the result of the work token stands for to the state that started it,
 * in order with that state's other events (its on_complete), never from inside this call:
 * it goes through the mailbox. result's reference passes to the hub. A result with
 * "more": true keeps the token for further results; any other is its last. A token whose
 * state is gone (reloaded, stopped) is counted as undelivered (completions_undelivered). */
void hub_complete(hub *h, uint64_t token, struct json_object *result);
/* As hub_complete, with the result as n typed fields (hub/script.h), copied: the caller
 * keeps f and its strings. No json-c on the way, and none of the per-result allocations: on
 * the loop thread the results of one loop iteration go to the mailbox together, and the
 * engine builds each table directly. more: HUB_RESULT_MORE keeps the token. Each field has
 * a name that lives as long as the module (a literal; the names of one result differ: they
 * become table keys) and one of the HUB_FIELD_* types; at most 65,535 fields. A result that
 * breaks these is logged, counted undelivered and dropped. */
void hub_complete_fields(hub *h, uint64_t token, unsigned more, const hub_field *f, size_t n);

/* ---- requests: a module (SIP) hands requests to the scripts' request route ---- */

/* Loop thread: run the request route for r in the executor key picks (the same key, e.g. a
 * hash of the Call-ID, always the same executor, in order). The hub takes r's reference and
 * calls route_done and unref once the route ran (route_done also when it never could). */
void hub_request(hub *h, uint64_t key, hub_req *r);
/* Loop thread, from a module's init: the one module that resolves t_continue's (index,
 * label) pairs; resume is called from any thread running a script. -EEXIST for a second. */
typedef hub_req *(*hub_req_resume_fn)(void *ud, unsigned index, unsigned label, char *err,
                                      size_t errlen);
int hub_set_req_resolver(hub *h, hub_req_resume_fn resume, void *ud);

/* ---- the event interface seam: one module (events) is the sink ---- */

#define HUB_EVENT_MAX 64 /* bytes in an event name */

/* 1 when name is 1..HUB_EVENT_MAX letters, digits, '_', '.' or '-'. Any thread. */
int hub_event_name_valid(const char *name);

typedef struct hub_event_sink {
    /* Loop thread. Raise event (params' reference passes; may be NULL); token (0: none)
     * gets one completion per subscriber. 0, or <0 with err set. */
    int (*raise)(void *ud, const char *event, struct json_object *params, uint64_t token, char *err,
                 size_t errlen);
    /* Loop thread: 1 when event has at least one subscriber (hub events cost nothing
     * otherwise). */
    int (*wanted)(void *ud, const char *event);
    /* Loop thread. expire_s 0: never. 0 or <0 with err set. */
    int (*subscribe)(void *ud, const char *event, const char *socket, long expire_s, char *err,
                     size_t errlen);
    int (*unsubscribe)(void *ud, const char *event, const char *socket, char *err, size_t errlen);
    /* Any thread: 0 when event is a valid name and socket a valid URI, else <0 with err. */
    int (*check)(void *ud, const char *event, const char *socket, char *err, size_t errlen);
} hub_event_sink;

/* Loop thread, from a module's init: the one sink (a second is -EEXIST). */
int hub_set_event_sink(hub *h, const hub_event_sink *sink, void *ud);
/* Loop thread: as sink->raise; -ENOSYS when no events module is built in. */
int hub_raise(hub *h, const char *event, struct json_object *params, uint64_t token, char *err,
              size_t errlen);
/* Loop thread, inside sink->raise: the Call-ID of the SIP message whose route raised the
 * event (hub_api.context), or NULL. */
const char *hub_raise_context(const hub *h);
/* Loop thread: 1 when the event has a subscriber. */
int hub_event_wanted(hub *h, const char *event);

#endif
