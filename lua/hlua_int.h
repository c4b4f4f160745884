/* Internals shared by the lua/ files: the hub_script struct, the client userdata, helpers. */
#ifndef HLUA_INT_H
#define HLUA_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "hub/script.h"

struct json_object;

#define HLUA_CLIENT_MT "evhub.client"

/* Events, also the codes passed to the KEMI dispatcher in ksr.lua. */
enum {
    HLUA_EV_CONNECT = 1,
    HLUA_EV_MESSAGE = 2,
    HLUA_EV_CLOSE = 3,
    HLUA_EV_REQUEST = 4, /* native only: KEMI runs ksr_request_route */
    HLUA_EV_REMOTE = 5,  /* from another hub: native "cluster", KEMI evapi:cluster-message */
    HLUA_EV_COUNT = 5
};

/* The full userdata behind a conn object. It is a copy of what the hub told us; the hub
 * stays the owner of the connection, Lua only holds its id. */
typedef struct hlua_conn {
    uint64_t id;
    int conidx;
    uint16_t port;
    unsigned char closed; /* closed by the script, or the hub reported the close */
    unsigned char taglen; /* 0: no tag */
    char addr[HUB_ADDR_MAX];
    char tag[HUB_TAG_MAX + 1];
} hlua_conn;

/* Lua allocates and frees many small objects (a report's table and strings, a key built
 * with ..), and its collector frees them in bursts of thousands: blocks up to
 * HLUA_CACHE_CLASSES x 16 bytes are kept per size class, up to HLUA_CACHE_BYTES in all, for
 * the state's next allocations of that class. */
#define HLUA_CACHE_CLASSES 16
#define HLUA_CACHE_BYTES   (1u << 20)
/* Result field names kept as Lua strings per state (past that, made each time). */
#define HLUA_KEYS_MAX 32

struct hub_script {
    lua_State *L;
    const hub_api *api;
    void *ud;
    long max_instructions; /* 0: unlimited */
    size_t max_memory;     /* 0: unlimited */
    size_t mem_used;       /* bytes currently allocated by L */
    /* Small blocks L freed, kept for its next allocations of their class (lua_host.c) */
    void *cache[HLUA_CACHE_CLASSES];
    unsigned ncache[HLUA_CACHE_CLASSES];
    size_t cache_bytes; /* bytes in those blocks */
    long budget_left;   /* instructions left in the current callback */
    double deadline;    /* CLOCK_MONOTONIC seconds the current callback may run to */
    int budget_hit;     /* the current callback ran out of budget */
    atomic_int *cancel; /* while loading: non-zero stops the load */
    /* The budget's hook is armed lazily in callbacks (lua_host.c, "the watchdog"): */
    int lazy;                 /* loaded: callbacks run with no hook until the watchdog arms it */
    int armed;                /* the hook is set for the callback under way */
    _Atomic unsigned cb_seq;  /* odd while a callback runs; changed by the owner thread only */
    _Atomic unsigned arm_req; /* the callback (cb_seq) the watchdog asked to arm */
    unsigned watch_seen;      /* cb_seq at the watchdog's previous look (watchdog only) */
    pthread_t cb_thread;      /* the thread running the callback under way */
    lua_State *running;       /* the coroutine a callback resumed and runs now, or NULL */
    struct hub_script *watch_next;  /* in the watchdog's list */
    int worker;                     /* the executor running it: -1 the loop thread */
    hub_req *cur_req;               /* the request of the route running, or NULL */
    int requests;                   /* frames carrying "evhub_id" may be answers */
    int handler[HLUA_EV_COUNT + 1]; /* evapi.on() registry refs, LUA_NOREF when unset */
    int conns_ref;                  /* registry ref: id -> conn userdata */
    int dispatch_ref;               /* ksr.lua's KEMI dispatcher, which then gets every event
                                     * instead of handler[]; LUA_NOREF without event_callback */
    int reset_ref;                  /* KEMI context reset from ksr.lua, or LUA_NOREF */
    int completions_ref;            /* registry ref: token -> report function (see below) */
    /* Result field names already made Lua strings (push_result): names[i] is at index i + 1
     * of the registry table keys_ref. A module's names are literals: the pointer is the key. */
    int keys_ref;
    unsigned nkeys;
    const char *keys[HLUA_KEYS_MAX];
    /* Arguments handed to the protected trampolines (no allocation on the hot path). */
    const char *arg_data;
    size_t arg_len;
    const hub_conn_info *arg_ci;
    const hub_origin *arg_origin;
    struct json_object *arg_result;
    const char *res_buf; /* on_results: the records, how far they ran, tokens not known */
    size_t res_len, res_off, res_unknown;
    int res_waiter;    /* the record at res_off is for a waiting request handler */
    hub_req *arg_req;  /* the request of a waiting handler being resumed */
    lua_State *cur_co; /* the request handler's coroutine while it runs, or NULL */
    int arg_done;      /* ...and whether its resume ran to the end */
    /* The library functions the sandbox wraps, called by pointer: kept as upvalues they
     * would be one debug.getupvalue() away from the script. */
    lua_CFunction orig_resume, orig_setmetatable, orig_debug_setmetatable;
    char warn[256]; /* pieces of a lua_warning() being assembled */
    size_t warnlen;
};

/* Completions. evapi.raise(event, params, fn) takes a token from hub_api.token and keeps fn
 * in the completions table under it before the hub sees the work (and removes it again if
 * the hub refuses). hub_script_ops.on_complete(s, token, result):
 * - a token not in the table (never given, already done, or given by a state a reload
 *   replaced: tokens are the hub's, never reused) is -ENOENT and runs nothing;
 * - else fn runs once, through the protected call with the budget and traceback as any
 *   callback (logged as "lua: report: ..." and counted as a script error if it fails), with
 *   the result as json.decode would give it: objects are tables with string keys, arrays
 *   sequences, integral numbers integers, strings binary-safe, and JSON null json.null (so
 *   a key with a null value stays visible and arrays keep their length);
 * - the token is then done, unless result is an object with "more": true (boolean true,
 *   nothing else): the event interface reports once per subscriber of one raise, and marks
 *   every report but the last so. The entry is removed before fn runs, so a failing fn does
 *   not keep it either.
 * The hub delivers results through its mailbox (hub_complete), so on_complete never runs
 * inside a callback of the script: fn is a callback of its own, never nested in the script's
 * call, its budget or KEMI context.
 * Typed results (hub_script_ops.on_results) run the same way, their table built from the
 * fields directly: a batch of them runs in one protected call that starts a fresh callback
 * (budget, watchdog) for each report, and goes on with the next after one fails.
 * A token whose last result never comes keeps its fn until the state is freed. A reload
 * cannot carry report functions over (they are closures of the old state); adopt logs at
 * notice how many will not run. */

/* The hub_script that owns L (kept in lua_getextraspace, inherited by coroutines). */
static inline hub_script *hlua__script(lua_State *L)
{
    return *(hub_script **)lua_getextraspace(L);
}

/* Unique value raised by KSR.x.exit(); the protected call ends the callback silently. */
extern const char hlua__exit_sentinel;

/* Define the evapi and log globals (evapi.worker = worker) and the "evhub.client" metatable. */
void hlua__open_evapi(lua_State *L, int worker);
/* Define the json global. */
void hlua__open_json(lua_State *L);
/* Push the helpers table that ksr.lua receives as its first argument. */
void hlua__push_ksr_helpers(lua_State *L);
/* Push a new conn userdata for ci (metatable set). */
hlua_conn *hlua__push_conn(lua_State *L, const hub_conn_info *ci);
/* Push the usual result of a hub_api call: true, or nil + message (+ code). */
int hlua__push_result(lua_State *L, int n);

/* Convert the value at idx to JSON as json.encode does (same rules and nesting limit; an
 * empty table is {}), into a box pushed on the stack that owns the result: raises on what
 * json.encode refuses, with who ("evapi.raise") naming the caller, and the box frees what
 * was built. nil and json.null give a box holding NULL. */
void hlua__json_push_box(lua_State *L, int idx, const char *who);
/* Take the object out of the box at idx: its reference is the caller's (NULL for null), the
 * box is left empty. Never raises. */
struct json_object *hlua__json_take(lua_State *L, int idx);
/* Push o (borrowed) as json.decode would; NULL is JSON null (json.null). NULL, or a reason
 * with nothing pushed (a number with no exact Lua value, nesting past the limit). Raises
 * only for memory. */
const char *hlua__json_push(lua_State *L, struct json_object *o);
/* Push json.null. */
void hlua__push_json_null(lua_State *L);
/* 1 when the value at idx is json.null. */
int hlua__is_json_null(lua_State *L, int idx);
/* The traceback message handler of every protected call, and the test for KSR.x.exit(). */
int hlua__traceback(lua_State *L);
int hlua__is_exit(lua_State *L, int idx);
/* Push the table of request helpers ksr.lua receives as H.req. */
void hlua__push_req_helpers(lua_State *L);
/* Make r (NULL: none) the current request: its Call-ID goes with raises (hub_api.context). */
void hlua__set_current(hub_script *s, hub_req *r);
/* The state's main thread. */
static inline lua_State *hlua__script_main(hub_script *s) { return s->L; }
/* Around a coroutine co resumed from C (a native request handler): the budget is armed
 * afresh, co is what the watchdog's signal hooks, and when no callback is under way on this
 * thread one begins (see lua_host.c). Pass enter's result and *prev to leave. */
int hlua__enter(hub_script *s, lua_State *co, lua_State **prev);
void hlua__leave(hub_script *s, int began, lua_State *prev);
/* A frame that is an application's answer ({"evhub_id": "I.L", ...}) for a native handler
 * waiting in evapi.async_*: handed to it (through the module and a completion); 1 when the
 * frame was one (consumed), 0 when not. */
int hlua__take_answer(hub_script *s, const char *data, size_t len);
/* The completion entry at the top of L's stack is a native handler waiting for an answer
 * ({co =, r =}): resume it with result. Pops the entry. */
void hlua__resume_waiter(hub_script *s, struct json_object *result);
/* The state is going: drop the references its waiting handlers hold on their requests
 * (the module answers those requests itself: SIP_WAKE_GRACE). */
void hlua__drop_waiters(hub_script *s);
/* Run the native request handler for r in a new coroutine (inside the protected call). */
int hlua__run_request_handler(lua_State *L, hub_script *s, int handler_ref);
/* Add evapi.async_relay/multicast/unicast (native, inside a request handler). */
void hlua__open_async(lua_State *L);
/* Push a native request object holding a reference to r. */
void hlua__push_request(lua_State *L, hub_req *r);
/* Define every function conf->fns offers at its TABLE.NAME (after ksr.lua made KSR). */
void hlua__open_module_fns(lua_State *L, const hub_script_conf *conf);

#endif
