/* The seam between the hub and a scripting engine: two tables of function pointers.
 * hub/ never includes lua/; main.c hands hub_script_ops from lua/ to the hub. */
#ifndef HUB_SCRIPT_H
#define HUB_SCRIPT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct json_object;

#define HUB_TAG_MAX  64  /* bytes in a tag, without NUL */
#define HUB_ADDR_MAX 46  /* INET6_ADDRSTRLEN */
#define HUB_CTX_MAX  255 /* bytes of a raise's context (a Call-ID) */

/* What a script learns about a connection when it connects. */
typedef struct hub_conn_info {
    uint64_t id;   /* never reused */
    int conidx;    /* slot index, reused after close (Kamailio's $evapi(conidx)) */
    uint16_t port; /* peer port */
    char addr[HUB_ADDR_MAX];
} hub_conn_info;

/* One counter or gauge of the hub's (see hub_api.stats). */
typedef struct hub_stat {
    const char *name; /* snake_case, e.g. "frames_in"; per-worker entries repeat names */
    const char *help; /* one line, for evhubctl and the Prometheus HELP line */
    int gauge;        /* 0: a counter (only grows), 1: a gauge */
    int worker;       /* -1: hub-wide, else the worker index it belongs to */
    uint64_t value;
    /* "" or one Prometheus label pair set without braces, e.g. socket="tcp:1.2.3.4:80"
     * (copied, so a list outlives what it describes) */
    char label[160];
} hub_stat;

/* Script events the engine reports through hub_api.count. */
enum {
    HUB_SCRIPT_ERROR = 0,  /* a callback raised (budget and memory failures included) */
    HUB_SCRIPT_BUDGET = 1, /* a callback was stopped by its instruction budget */
    HUB_SCRIPT_MEMORY = 2, /* a callback failed for want of memory (max_memory) */
    HUB_SCRIPT_NCOUNTS = 3
};

/* ---- requests a module hands to scripts (a SIP request): the script's request route ----
 * A hub_req is the module's object; its ops may be called from any thread running a script
 * and must not block. The engine holds a reference while it uses one. */
typedef struct hub_req hub_req;

/* The value of a pseudo-variable: a string (s, len) or an integer (is_int, i). */
typedef struct hub_pv {
    int is_int;
    long long i;
    const char *s; /* valid while the engine holds its reference */
    size_t len;
} hub_pv;

typedef struct hub_req_ops {
    /* $rm, $ru, $hdr(Name), $T(id_index)...: 0 with *out set; -ENOENT when the request has
     * no such value ($null); -EINVAL when name is not a variable of this kind of request. */
    int (*pv)(hub_req *r, const char *name, hub_pv *out);
    /* Reply now (code 100..699) with the headers appended so far (then forgotten). 0, or <0
     * with err set (-EALREADY: a final reply went already; -ECANCELED: cancelled or expired). */
    int (*reply)(hub_req *r, int code, const char *reason, char *err, size_t errlen);
    /* Add a header line (or lines, with or without the CRLF) to the next reply. */
    int (*append_to_reply)(hub_req *r, const char *text, size_t len, char *err, size_t errlen);
    /* Suspend the request (an INVITE gets 100 Trying): once its route returns it waits for a
     * resume (hub_api.req_resume) or its deadline. 0, or <0 with err. unsuspend takes it back
     * (the relay that was to reach an application reached none). */
    int (*suspend)(hub_req *r, char *err, size_t errlen);
    void (*unsuspend)(hub_req *r);
    /* Native async: suspend as above, and when an answer comes (wake) or timeout_ms passes
     * (0: the module's default), complete token with {"answer": ANSWER} or
     * {"error": "timeout"} (hub_complete) instead of running a route. May be NULL. */
    int (*suspend_wait)(hub_req *r, uint64_t token, int timeout_ms, char *err, size_t errlen);
    /* An application's answer for r, resumed through req_resume: 0 when r waits for one
     * (suspend_wait; the answer's reference passes), -EINVAL when it does not. */
    int (*wake)(hub_req *r, struct json_object *answer);
    /* A route ran with r as the current request (the first, or one resumed): a request left
     * neither answered nor suspended is answered by the module (500, logged). */
    void (*route_done)(hub_req *r, int resumed);
    /* NULL for the request route; else the name of the global function that is to run
     * instead (e.g. the route for a suspended request whose deadline passed). May be NULL. */
    const char *(*route)(hub_req *r);
    void (*ref)(hub_req *r);
    void (*unref)(hub_req *r);
} hub_req_ops;

struct hub_req {
    const hub_req_ops *ops; /* the first member of the module's own struct */
};

/* Where a message another hub of a cluster sent came from (hub_script_ops.on_remote). */
typedef struct hub_origin {
    char node[128]; /* the sending hub's name */
    char kind[12];  /* what it was there: "relay", "multicast", "unicast" or "send" */
    uint64_t id;    /* send: the connection it is for; else 0 */
    size_t taglen;  /* multicast, unicast: the tag; else 0 */
    char tag[HUB_TAG_MAX + 1];
} hub_origin;

/* What a script may ask of the hub. Each call is made from the thread running the script,
 * with the ud given at load. Results: n > 0 success (n recipients when known, else 1),
 * 0 no eligible connection, < 0 a negative errno (-EINVAL bad tag, -ENOENT no such id,
 * -EMSGSIZE frame too large, -ENOMEM). Data is copied before the call returns. */
typedef struct hub_api {
    int (*relay)(void *ud, const char *data, size_t len);
    int (*multicast)(void *ud, const char *tag, size_t taglen, const char *data, size_t len);
    int (*unicast)(void *ud, const char *tag, size_t taglen, const char *data, size_t len);
    int (*send)(void *ud, uint64_t id, const char *data, size_t len);
    int (*set_tag)(void *ud, uint64_t id, const char *tag, size_t taglen);
    /* reason may be NULL; it is logged, and sent as an error frame in netstring mode */
    int (*close)(void *ud, uint64_t id, const char *reason);
    /* Fill up to cap entries with the hub's counters and gauges (the same ones the control
     * socket reports); returns how many there are, which may be more than cap. */
    size_t (*stats)(void *ud, hub_stat *out, size_t cap);
    /* Count a script event (HUB_SCRIPT_*). */
    void (*count)(void *ud, int what);
    /* A new completion token bound to the calling state: the result of the work it is given
     * to comes back through hub_script_ops.on_complete, in that state. Never 0. */
    uint64_t (*token)(void *ud);
    /* The event interface. raise: params' reference passes (may be NULL); token 0 or from
     * .token (one completion per subscriber). subscribe: expire_s 0 never expires.
     * Return 1 when done or queued, <0 with err set (-EINVAL bad name or socket URI,
     * -ENOSYS no events module, -ENOMEM). */
    int (*raise)(void *ud, const char *event, struct json_object *params, uint64_t token, char *err,
                 size_t errlen);
    int (*subscribe)(void *ud, const char *event, const char *socket, long expire_s, char *err,
                     size_t errlen);
    int (*unsubscribe)(void *ud, const char *event, const char *socket, char *err, size_t errlen);
    /* As relay and multicast, to this hub's connections only (scope "local": never routed
     * to other hubs of a cluster). */
    int (*relay_local)(void *ud, const char *data, size_t len);
    int (*multicast_local)(void *ud, const char *tag, size_t taglen, const char *data, size_t len);
    /* t_continue: the suspended request (index, label), now resumed (a reference the caller
     * drops with ops->unref after ops->route_done), or NULL with err set (unknown, expired,
     * cancelled, already resumed, or no module offers requests). */
    hub_req *(*req_resume)(void *ud, unsigned index, unsigned label, char *err, size_t errlen);
    /* The Call-ID of the SIP message the script's route is about (NULL: none), carried with
     * the raises the script makes from now on (kafka: sockets with key=callid key records
     * with it). At most HUB_CTX_MAX bytes are kept. May be NULL in a hub_api. */
    void (*context)(void *ud, const char *callid, size_t len);
} hub_api;

/* ---- functions a module offers scripts (hub_module.fns) ----
 * Each appears in every state as TABLE.NAME (e.g. kafka.publish, KSR.kafka.send; the tables
 * are made as needed). The engine hands the arguments over as they are (strings as pointer
 * and length, numbers as integers or doubles; only a table is converted, to JSON as
 * json.encode does), calls the function on the thread running the script, and turns the
 * result into the dialect's. */

#define HUB_ARGS_MAX 16 /* arguments of a module function; more raises */

enum {
    HUB_ARG_NIL = 0, /* nil or json.null */
    HUB_ARG_BOOL,    /* i: 0 or 1 */
    HUB_ARG_INT,     /* i */
    HUB_ARG_NUM,     /* d: a float (finite or not) */
    HUB_ARG_STR,     /* s, len: the script's bytes, NUL-terminated, binary-safe */
    HUB_ARG_JSON,    /* json: a table, as json.encode converts it */
};

/* One argument, borrowed for the call: copy what must outlive it. */
typedef struct hub_arg {
    int type; /* HUB_ARG_* */
    const char *s;
    size_t len;
    int64_t i;
    double d;
    struct json_object *json;
} hub_arg;

typedef struct hub_call {
    const hub_arg *argv; /* the arguments; with HUB_FN_REPORT the trailing report function is
                          * not among them */
    int argc;
    uint64_t token;          /* 0, or the token the report function's results go to
                              * (hub_complete); a call that fails must never complete it */
    int worker;              /* the calling executor: -1 the loop thread, else a worker */
    struct json_object *ret; /* out, optional: returned instead of true (reference passes;
                              * native dialect only) */
    char err[256];           /* out: the reason of a failure */
} hub_call;

/* Argument i when it is a string (*len set), else NULL and *len 0 (absent, or another type). */
static inline const char *hub_arg_str(const hub_call *c, int i, size_t *len)
{
    *len = 0;
    if (i >= c->argc || c->argv[i].type != HUB_ARG_STR)
        return NULL;
    *len = c->argv[i].len;
    return c->argv[i].s;
}

/* The type of argument i, HUB_ARG_NIL when absent. */
static inline int hub_arg_type(const hub_call *c, int i)
{
    return i < c->argc ? c->argv[i].type : HUB_ARG_NIL;
}

enum {
    HUB_FN_REPORT = 1, /* a function as last argument is the report function (c->token) */
    HUB_FN_KEMI = 2,   /* Kamailio style: returns the call's code (>0 done, <0 -1) as an
                        * integer, and logs a failure's reason; else true / ret, or
                        * nil, reason, code ("EINVAL", "ENOBUFS"...) */
};

typedef struct hub_script_fn {
    const char *table; /* "kafka", or a path such as "KSR.kafka" */
    const char *name;
    int flags; /* HUB_FN_* */
    /* Any thread running a script; must not block. state: the module's. >= 0 done (KEMI:
     * the code to return, 0 read as 1), or a negative errno with c->err set. */
    int (*call)(void *state, hub_call *c);
} hub_script_fn;

typedef struct hub_script_fn_ref {
    const hub_script_fn *fn;
    void *state;
} hub_script_fn_ref;

typedef struct hub_script_conf {
    const char *path;           /* script file */
    const char *event_callback; /* KEMI global function name, or "" for native handlers */
    long max_instructions;      /* per callback, 0 = unlimited */
    size_t max_memory;          /* bytes per state, 0 = unlimited */
    int restricted;             /* 1: withhold io, os.execute/exit/remove/rename/tmpname,
                                 * package.loadlib and C modules, debug but traceback */
    int worker;                 /* worker index, -1 for the loop thread / checks */
    const char *source;         /* the script's text, if already read (else path is read) */
    size_t source_len;
    atomic_int *cancel;           /* if not NULL: loading stops with an error once it is non-zero */
    const hub_script_fn_ref *fns; /* the modules' functions (outlive the state) */
    size_t nfns;
    int fns_inert; /* a state being checked: the functions exist but every call fails */
    int requests;  /* a module offers requests: frames carrying "evhub_id" may be answers */
    int remote;    /* a module hands the script what other hubs send (on_remote): the script
                    * must have a handler for it */
} hub_script_conf;

/* ---- typed results (hub_complete_fields in hub/core.h): no json-c on the way ---- */

enum {
    HUB_FIELD_STR = 1, /* s, len (copied) */
    HUB_FIELD_INT,     /* i */
    HUB_FIELD_BOOL,    /* i: 0 or 1 */
};

/* One field of a result, as a module hands it over. name must outlive the hub (a string
 * literal): only the pointer is kept. */
typedef struct hub_field {
    const char *name;
    int type; /* HUB_FIELD_* */
    const char *s;
    size_t len;
    int64_t i;
} hub_field;

/* A field as stored in a result: a string's bytes are in the record (NUL-terminated), at
 * offset i from the record's start, so a record may be copied as it is. */
typedef struct hub_rfield {
    const char *name;
    uint32_t type;
    uint32_t len;
    int64_t i;
} hub_rfield;

#define HUB_RESULT_MORE 1u /* more results follow for this token (the table gets more = true) */
#define HUB_RESULT_JSON 2u /* hub-internal: json holds a json-c result (hub_complete) */

/* One typed result: nfields fields, then their strings; size bytes in all (a multiple of 8:
 * records lie back to back). */
typedef struct hub_result {
    uint64_t token;
    uint32_t size;
    uint16_t nfields;
    uint16_t flags; /* HUB_RESULT_* */
    struct json_object *json;
    hub_rfield f[];
} hub_result;

static inline const char *hub_result_str(const hub_result *r, const hub_rfield *f)
{
    return (const char *)r + f->i;
}

typedef struct hub_script hub_script;

/* One hub_script per thread that runs callbacks; its functions are called only from there. */
typedef struct hub_script_ops {
    const char *name;
    /* Load and check the script (syntax, required handlers). NULL with err set on failure. */
    hub_script *(*load)(const hub_script_conf *conf, const hub_api *api, void *ud, char *err,
                        size_t errlen);
    /* Load the script afresh into a new state that inherits old's connections (and their
     * tags), for a reload. NULL with err set on failure; old is untouched either way. */
    hub_script *(*reload)(hub_script *old, const hub_script_conf *conf, char *err, size_t errlen);
    /* Carry old's connections (and their tags) into s, a state just loaded for a reload.
     * 0, or -1 with err set (s is then unusable, old untouched). */
    int (*adopt)(hub_script *s, hub_script *old, char *err, size_t errlen);
    void (*free)(hub_script *s); /* NULL-safe */
    /* Callbacks never fail from the hub's point of view: script errors are logged inside. */
    void (*on_connect)(hub_script *s, const hub_conn_info *ci);
    void (*on_message)(hub_script *s, uint64_t id, const char *data, size_t len);
    void (*on_close)(hub_script *s, uint64_t id);
    /* Housekeeping while idle (an incremental GC step). */
    void (*idle)(hub_script *s);
    /* Someone other than this state changed id's tag (another worker, the control socket);
     * len 0: no tag. Keeps the state's own view of the connection current. */
    void (*on_tag)(hub_script *s, uint64_t id, const char *tag, size_t len);
    /* The result of the work token was given to (hub_api.token), result borrowed; run as an
     * event of the state's own, never from inside a hub_api call. A result with "more": true
     * keeps the token for further results (the event interface sends one per subscriber);
     * any other is its last. 0 when the state knew the token, -ENOENT when not (it was
     * started by a state since replaced): the hub counts and logs those. */
    int (*on_complete)(hub_script *s, uint64_t token, struct json_object *result);
    /* Typed results (hub_complete_fields): records back to back in buf (len bytes, each
     * record's size apart), every one for a token of this state, in order; borrowed. Each
     * runs as on_complete's would, with a table of its fields (and more = true when
     * flagged), never from inside a hub_api call. Returns how many tokens it did not know
     * (the hub counts them as undelivered). */
    size_t (*on_results)(hub_script *s, const void *buf, size_t len);
    /* Run the request route (KEMI ksr_request_route, native evapi.on("request")) with r as
     * the current request; r is borrowed (the hub calls route_done and unref after). */
    void (*on_request)(hub_script *s, hub_req *r);
    /* What another hub sent, as o describes it (hub_remote_event); o and data borrowed.
     * While it runs, the hub_api's relay, multicast, unicast and send reach this hub's
     * connections only: nothing a remote message causes goes back to the other hubs. */
    void (*on_remote)(hub_script *s, const hub_origin *o, const char *data, size_t len);
} hub_script_ops;

#endif
