/* Internal shapes shared by the hub's modules (loop, listener, client, tags, dispatch, workers).
 * Everything here belongs to the loop thread unless a field says otherwise. */
#ifndef HUB_HUB_INT_H
#define HUB_HUB_INT_H

#include <ev.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "hub/config.h"
#include "hub/control.h"
#include "hub/core.h"
#include "hub/hub.h"
#include "hub/idmap.h"
#include "hub/listen.h"
#include "hub/netstring.h"
#include "hub/script.h"

#define HUB_READ_CHUNK      (64 * 1024)  /* bytes asked of read(2) at a time, at most */
#define HUB_READ_MIN        4096         /* ...at first: it doubles while reads fill it */
#define HUB_READS_PER_EVENT 4            /* reads per readable event on a client */
#define HUB_WRITE_BUDGET    (256 * 1024) /* bytes written to one client per loop iteration */
/* Bytes read from clients, in one loop iteration, after which queued output is written before
 * more is read: a burst from many publishers reaches the readers in slices, instead of all of
 * it landing in their queues first (and closing them as slow consumers). */
#define HUB_FLUSH_EVERY (256 * 1024)
#define HUB_IOV_MAX     1024 /* iovecs per writev */
/* Read buffers a connection left empty are kept for the next read of any connection, up to
 * this many (of at most HUB_RPOOL_CAP bytes): no malloc/free, nor brk, per read under load,
 * while an idle connection still holds no buffer. */
#define HUB_RPOOL_MAX         16
#define HUB_RPOOL_CAP         (256 * 1024)
#define HUB_SHUTDOWN_GRACE_MS 1000 /* flushing after in-flight deliveries were failed */
#define HUB_EXIT_STUCK        3    /* exit status when a worker did not stop in time */
#define HUB_STUCK_GRACE_MS    5000 /* a stopped worker's time to end before it is left behind */

/* Outbound frames are encoded back to back into shared blocks (loop thread only, so counts
 * are plain): every recipient's queue holds a reference to the block, and frames that lie
 * next to each other in a block go to the kernel as one iovec. Per iovec the kernel's copy
 * costs about what a 128-byte frame's bytes do, so a subscriber that gets every frame of a
 * block is written in spans of up to HUB_FBLOCK bytes, as a bare forwarder writes what it
 * read. A frame over HUB_FBLOCK_BIG gets a block of its own. */
#define HUB_FBLOCK     (16 * 1024)
#define HUB_FBLOCK_BIG (4 * 1024)
typedef struct hub_fblock {
    uint32_t refcnt;
    size_t cap, used;
    char data[];
} hub_fblock;

/* One encoded frame: len bytes at data, inside blk (a reference to blk goes with it). */
typedef struct hub_frame {
    hub_fblock *blk;
    char *data;
    size_t len;
} hub_frame;

/* A mailbox node (mailbox.c): run gets the node and owns it from then on. Embedded in what
 * it carries, so a worker's command is one allocation. */
typedef struct hub_rbatch hub_rbatch; /* a mailbox node of results (module.c) */

typedef struct hub_post {
    struct hub_post *next;
    void (*run)(hub *h, struct hub_post *p);
} hub_post;

typedef struct hub_tag hub_tag;
typedef struct hub_client hub_client;
typedef struct hub_worker hub_worker;
typedef struct hub_list_job hub_list_job;

enum {
    HUB_CLIENT_CLOSING = 1u << 0,       /* no more reads, routing or new frames */
    HUB_CLIENT_DRAINING = 1u << 1,      /* closing, still writing what was queued */
    HUB_CLIENT_REAP = 1u << 7,          /* done: the reaper frees it */
    HUB_CLIENT_CLOSE_EVENT = 1u << 8,   /* the script was told it closed */
    HUB_CLIENT_ON_LIST = 1u << 9,       /* on the reaper's list */
    HUB_CLIENT_PENDING = 1u << 2,       /* on the pending-write list */
    HUB_CLIENT_WRITE_WAIT = 1u << 3,    /* socket full: waiting on the write watcher */
    HUB_CLIENT_READING = 1u << 4,       /* the script accepted it; reading is allowed */
    HUB_CLIENT_PAUSED = 1u << 5,        /* its worker's queue is full: reading is paused */
    HUB_CLIENT_CONNECTED = 1u << 6,     /* the connect event was delivered to the script */
    HUB_CLIENT_CLOSE_RAISED = 1u << 10, /* E_EVAPI_CONNECTION_CLOSED was raised */
    HUB_CLIENT_HALF_CLOSED = 1u << 11,  /* the peer sent EOF; its worker is catching up */
    HUB_CLIENT_CONGESTED = 1u << 12,    /* on the congested list (queue over half max_outbuf) */
    HUB_CLIENT_HELD = 1u << 13,         /* on the held list: reading waits for the congested */
};

/* Backpressure for readers that read, against publishers that outpace them. A client whose
 * queue passes half of max_outbuf is congested. While one congested client is still taking
 * bytes (its socket took some in the last HUB_STALL seconds) and has been congested for less
 * than HUB_HOLD_MAX, the hub reads from no client: the publishers wait for it instead of it
 * being closed. One that stopped taking bytes (stalled) or stays congested longer is not
 * waited for: its queue grows to max_outbuf, and it is closed (or its frames dropped). */
#define HUB_STALL    0.5
#define HUB_HOLD_MAX 2.0

struct hub_client {
    ev_io rio;
    ev_io wio;
    hub *h;
    uint64_t id;
    unsigned flags;
    int fd;
    int worker;         /* index of the worker that runs its events, -1 for the loop */
    uint32_t read_want; /* bytes the next read asks room for (HUB_READ_MIN..CHUNK) */
    hub_ns_reader reader;
    /* write queue: a ring of frames; wq_off bytes of the head frame are already written */
    hub_frame *wq;
    uint32_t wq_cap, wq_head, wq_count;
    size_t wq_off, wq_bytes;
    /* Bytes of the blocks its queue holds (each run of frames in one block counts the block
     * once): kept under 2 * wq_bytes + 4 * HUB_FBLOCK by copying a frame into its own block
     * (pblk) when sharing would hold more, so a reader that gets one frame now and then
     * does not keep whole blocks of others' frames alive. */
    size_t wq_pinned;
    hub_fblock *pblk;
    hub_tag *tag;
    hub_client *tag_prev, *tag_next; /* in tag's list, in the order tags were set */
    hub_client *prev, *next;         /* in the hub's list of live clients */
    hub_client *pend_next;           /* in the pending-write list */
    hub_client *close_next;          /* in the reaper's list */
    hub_client *cong_next;           /* in the congested list */
    hub_client *held_next;           /* in the held list */
    ev_tstamp last_write;            /* when its socket last took bytes (or it connected) */
    ev_tstamp congested_since;
    ev_tstamp drain_deadline; /* when DRAINING gives up */
    /* One timer for frame_timeout, idle_timeout and a half-closed client's wait for its
     * worker; it fires at the earliest deadline and is re-armed from the times below. */
    ev_timer tmo;
    ev_tstamp last_frame;  /* when the last complete frame came (or the connection) */
    ev_tstamp frame_start; /* when the frame still incomplete began; 0: none */
    hub_conn_info info;
    /* For E_EVAPI_CONNECTION_CLOSED, allocated when it closes (an open client holds neither):
     * why, and the tag it had (closing drops it). NULL: none, or no memory to say. */
    char *close_reason, *close_tag;
    uint64_t frames_in, frames_out, bytes_in, bytes_out;
};

/* A tag and the clients carrying it (see tags.c for the two counts). */
struct hub_tag {
    hub_tag *hnext;
    hub_client *head, *tail, *rr; /* members, loop thread only */
    uint32_t nmembers;            /* loop thread, changed under tags_lock */
    uint32_t intended;            /* ids meant to carry it, any thread, under tags_lock */
    hub_tag *gc_next;             /* in hub.tag_gc, under tags_lock */
    uint8_t gc_listed;
    uint8_t len;
    char name[HUB_TAG_MAX + 1];
};

/* Hub-wide counters. Each has one writer, the loop thread, and readers anywhere (evapi.stats()
 * in a worker), so a relaxed load and store is enough: it costs what a plain increment does. */
typedef struct hub_stats {
    _Atomic uint64_t accepted, refused, closed;
    _Atomic uint64_t frames_in, bytes_in, frames_out, bytes_out;
    _Atomic uint64_t decode_errors, slow_closes, dropped_frames, frames_lost;
    _Atomic uint64_t timeout_closes, read_holds;
    _Atomic uint64_t outq_bytes, outq_blocks; /* gauges: every client's wq_bytes, wq_pinned */
    _Atomic uint64_t rbufs, rbuf_bytes;       /* gauges: read buffers clients hold, their bytes */
    _Atomic uint64_t reloads, reload_failures;
    _Atomic uint64_t script[HUB_SCRIPT_NCOUNTS]; /* the loop's own state (workers == 0) */
} hub_stats;

#define HUB_STAT_GET(h, f) atomic_load_explicit(&(h)->stats.f, memory_order_relaxed)
#define HUB_STAT_ADD(h, f, n)                                                                      \
    atomic_store_explicit(&(h)->stats.f, HUB_STAT_GET(h, f) + (uint64_t)(n), memory_order_relaxed)

/* A reload round's state (reload.c). */
typedef struct hub_reload {
    char *error;  /* the last failed reload's reason, or NULL */
    int checking; /* check_thread is checking the script for a reload round */
    pthread_t check_thread;
    int waiting;       /* workers that have not yet answered a reload */
    int failed;        /* one of them failed */
    atomic_int cancel; /* set at shutdown: a reload's loads stop where they are */
    char *source;      /* the text of the script a reload round loads, read once */
    size_t source_len;
    hub_ctl_call **calls; /* control calls waiting for the reload under way */
    size_t ncalls;
    hub_ctl_call **next; /* ...and for the one asked for while it runs */
    size_t nnext;
    int again; /* a reload was asked for while one ran */
} hub_reload;

struct hub {
    struct ev_loop *loop;
    hub_config cfg;
    const hub_script_ops *ops;
    hub_script *script; /* the loop's own state when workers == 0 */

    struct hub_listener *listener; /* evapi clients (listener.c), from start to drain */
    ev_prepare prepare_w;
    ev_idle idle_w;
    ev_signal sigterm_w, sigint_w, sighup_w;
    ev_async mbox_w;
    ev_timer shutdown_w;
    ev_timer drain_w; /* checks DRAINING clients' deadlines, once a second */
    int ndraining;

    uint64_t next_id;
    atomic_int nclients; /* read by workers for "no client" answers */
    hub_client *clients; /* list of live clients */
    hub_client **slots;  /* conidx -> client */
    int *free_slots;     /* stack of free conidx values */
    int nfree;
    hub_idmap ids; /* id -> client */

    hub_tag **tagtab; /* hash of tags */
    size_t tagtab_cap, ntags;
    hub_idmap intents; /* id -> hub_tag it should carry, under tags_lock */
    hub_tag *tag_gc;   /* tags a worker left unused, for the loop to free */
    atomic_int tag_gc_pending;
    pthread_rwlock_t tags_lock; /* guards tagtab, intents and the tags' counts */

    char *rpool[HUB_RPOOL_MAX]; /* spare read buffers (client.c) */
    size_t rpool_cap[HUB_RPOOL_MAX];
    int nrpool;
    hub_fblock *fcur;        /* the block frames are encoded into now (one reference) */
    hub_client *pending;     /* clients with queued output to flush this iteration */
    size_t read_since_flush; /* bytes read since hub__flush_pending last ran */
    hub_client *congested;   /* clients with over half of max_outbuf queued (HUB_STALL) */
    hub_client *held;        /* clients whose reading waits while hold_reads */
    int hold_reads;          /* a congested client still reading: read from no one */
    ev_timer hold_w;         /* re-checks the hold when a congested client's wait runs out */
    hub_client *closing;     /* clients to reap */

    hub_worker *workers;
    int nworkers;
    hub_worker *loop_exec;           /* the loop as an executor (its script is h->script) */
    pthread_mutex_t mbox_mu;         /* guards the mailbox (mailbox.c) */
    hub_post *mbox_head, *mbox_tail; /* posted closures, run by the loop in order */
    int workers_done;

    int stopping;
    int workers_stopped; /* their STOP is posted: completions can no longer reach them */
    hub_stats stats;
    pthread_t loop_thread;

    /* modules (module.c): hub_modules[i]'s state is mod_state[i] */
    void **mod_state;
    size_t nmods;      /* states made (a failed init's included: free sees it) */
    size_t mods_ready; /* modules whose init succeeded: they start, drain, stop, count */
    int mods_stopped;
    hub_script_fn_ref *fns; /* the functions modules offer scripts, with their states */
    size_t nfns;
    int started_mods;    /* hub_start ran */
    int markers_sent;    /* shutdown: a marker round is out to the workers */
    int markers_waiting; /* ...and how many have not come back */
    const hub_event_sink *sink;
    void *sink_ud;
    int remote_events;        /* hub_want_remote_events */
    const hub_router *router; /* hub_set_router, or NULL */
    void *router_ud;
    hub_req_resume_fn req_resume; /* the module that resolves t_continue pairs, or NULL */
    const char *raise_ctx;        /* hub_raise_context: set around a raise from a route */
    void *req_resume_ud;
    atomic_uint_fast64_t next_token;
    atomic_uint_fast64_t completions_undelivered;
    hub_rbatch *rb_open;    /* results completed on the loop go here until it runs (module.c) */
    hub_rbatch *rb_pool[4]; /* spare result batches */
    int nrb_pool;

    /* control socket and what it reports (control.c, control_cmds.c) */
    hub_ctl *ctl;
    char listen_addr[320];   /* the address actually bound, as logged */
    double started;          /* wall-clock seconds at start */
    double script_loaded;    /* wall-clock seconds the running script was loaded */
    hub_list_job *list_jobs; /* client listings under way (control_cmds.c) */
    ev_timer list_w;         /* writes their next slices */
    hub_reload rl;           /* reload.c */
};

/* frames and queues (client.c) */
/* Encode a frame into the hub's current block (or one of its own when big): *out holds a
 * reference, released with _unref. 0 or -ENOMEM. */
int hub__frame_new(hub *h, const char *data, size_t len, hub_frame *out);
void hub__frame_unref(hub_frame *f);
/* At exit: release the current block. */
void hub__frames_free(hub *h);
/* 1 when a payload of len would take more than max_outbuf on the wire: a frame that alone
 * fills a queue could never be sent to anyone. */
int hub__frame_too_big(const hub *h, size_t len);
/* Queue f (a reference is taken). 0, -EPIPE if closing, -ENOBUFS if over max_outbuf (the
 * client is then closed or the frame dropped, per outbuf_policy). */
int hub__client_enqueue(hub_client *c, const hub_frame *f);
/* Stop reading and routing to c; it is freed once its queue is written (or after
 * shutdown_timeout). reason is logged, and sent as an error frame when code is set. */
void hub__client_close(hub_client *c, const char *code, const char *reason);
/* As _close, but drops what is queued except a frame already begun (slow consumers). */
void hub__client_abort(hub_client *c, const char *reason);
void hub__drain_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents);
void hub__client_accepted(hub *h, int fd, const struct sockaddr *sa);
void hub__client_start_reading(hub_client *c);
/* Loop thread: work out whether reading waits for a congested client (each iteration). */
void hub__hold_update(hub *h);
void hub__hold_init(hub *h);
void hub__client_resume(hub_client *c);
/* Loop thread: the worker of id has run every event queued before its peer's EOF (and its
 * commands are carried out), so a half-closed client begins to close now. */
void hub__client_caught_up(hub *h, uint64_t id);
void hub__flush_pending(hub *h);
void hub__reap_closing(hub *h);
hub_client *hub__client_by_id(hub *h, uint64_t id);
void hub__client_free_all(hub *h);
/* Try to write a one-off error frame straight to fd (used before close and on refusal). */
void hub__write_error_frame(hub *h, int fd, const char *code, const char *reason);

/* tags (tags.c) */
/* Loop thread: makes c a member of tag or, with len 0, of none. 0 or -EINVAL / -ENOMEM. */
int hub__tag_set(hub *h, hub_client *c, const char *tag, size_t len);
/* Any thread: records that id should carry tag (len 0: none), before the loop applies it.
 * loop_thread says whether tags left unused may be freed now. 0 or -EINVAL / -ENOMEM. */
int hub__tag_intent(hub *h, uint64_t id, const char *tag, size_t len, int loop_thread);
/* Loop thread. The pointer stays valid until the loop itself changes tags. */
hub_tag *hub__tag_find(hub *h, const char *tag, size_t len);
/* Any thread: the tag id is meant to carry (the last one anybody set), copied to out;
 * returns its length, 0 for none. */
size_t hub__tag_intended(hub *h, uint64_t id, char out[HUB_TAG_MAX + 1]);
/* Any thread: how many connections carry (or are about to carry) the tag. */
uint32_t hub__tag_count(hub *h, const char *tag, size_t len);
/* Loop thread: free the tags workers left with neither members nor intents. */
void hub__tags_sweep(hub *h);
void hub__tags_free(hub *h);

/* dispatch (dispatch.c), loop thread: the recipients count, or <0 */
int hub__relay(hub *h, const char *data, size_t len);
int hub__multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len);
int hub__unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len);
int hub__send(hub *h, uint64_t id, const char *data, size_t len);
/* from_worker: the worker already recorded the intent; an unknown id clears it. */
int hub__set_tag_id(hub *h, uint64_t id, const char *tag, size_t len, int from_worker);
int hub__close_id(hub *h, uint64_t id, const char *reason);
/* The same, as scripts and the control socket ask them: through the router when there is
 * one (hub_router). local: a relay / multicast with scope local (the router is not asked). */
int hub__route_relay(hub *h, const char *data, size_t len, int local);
int hub__route_multicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len,
                         int local);
int hub__route_unicast(hub *h, const char *tag, size_t taglen, const char *data, size_t len);
int hub__route_send(hub *h, uint64_t id, const char *data, size_t len);
/* from_worker as hub__set_tag_id. */
int hub__route_set_tag(hub *h, uint64_t id, const char *tag, size_t len, int from_worker);
int hub__route_close(hub *h, uint64_t id, const char *reason);

/* kinds of events handed to a worker */
enum {
    HUB_EV_CONNECT,
    HUB_EV_MESSAGE,
    HUB_EV_CLOSE,
    HUB_EV_TAG,
    HUB_EV_RELOAD, /* load the new script beside the running one, and say how it went */
    HUB_EV_COMMIT, /* switch to it */
    HUB_EV_ABORT,  /* drop it */
    HUB_EV_STOP,
    HUB_EV_COMPLETE, /* a completion for the worker's state: id is the token */
    HUB_EV_MARK,     /* shutdown: answer once everything before it has run */
    HUB_EV_EOF,      /* the peer of id half-closed: answer once its events before it ran */
    HUB_EV_REQUEST,  /* a module's request for the request route: data is a hub_req * (owned) */
    HUB_EV_REMOTE,   /* from another hub: data is a hub_origin, then the message */
    HUB_EV_RESULT    /* typed results (hub_result records back to back) for the worker's
                      * state, one run of a batch: id is how many */
};

/* Executors (dispatch.c): the loop's own state (exec -1, workers = 0) and each worker run the
 * same events. Run one in state s, on the executor's thread: data is a hub_conn_info for
 * CONNECT, the payload for MESSAGE, a struct json_object * (owned) for COMPLETE. */
void hub__event_run(hub *h, hub_script *s, int type, uint64_t id, const void *data, size_t len);
/* Loop thread: hand an event to executor exec, inline for the loop, queued (data copied) for
 * a worker. 0, or -ENOMEM (not taken; a COMPLETE's result stays the caller's). */
int hub__exec_post(hub *h, int exec, int type, uint64_t id, const void *data, size_t len);
/* Non-zero while this thread runs a script's remote handler: its relay, multicast, unicast
 * and send stay on this hub (hub_script_ops.on_remote). */
extern _Thread_local int hub__local_scope;
/* The script of the client id's executor has seen it connect: reading may start. */
void hub__connect_seen(hub *h, uint64_t id);

/* script events from the loop, to the executor of the client */
void hub__event_connect(hub *h, hub_client *c);
/* Backpressure, decided here only: 0 when c's executor can take another frame, or -EAGAIN
 * when its queue is full (reading from c is then paused until it drains). */
int hub__event_admit(hub *h, hub_client *c);
/* Hand a frame to c's executor. 0, or -ENOMEM: the frame could not be queued, so c is
 * closed with that reason and counted (frames_lost) — never silently lost. */
int hub__event_message(hub *h, hub_client *c, const char *data, size_t len);
void hub__event_close(hub *h, hub_client *c);

/* workers (workers.c) */
/* The one API of every executor's script; ud is the executor (a worker, or the loop's). */
extern const hub_api hub__api;
/* The loop's own executor record, for the API's ud when workers = 0. NULL on OOM. */
hub_worker *hub__loop_exec_new(hub *h);
int hub__workers_start(hub *h, char *err, size_t errlen);
/* Hand queued events to the workers and wake them. */
void hub__workers_flush(hub *h);
/* Ask every worker to load h->rl.source beside its script; each answers through
 * hub__reload_answered. The decisions are allocated now, so that hub__workers_decide
 * cannot fail. 0, or -ENOMEM with nothing posted. */
int hub__workers_reload(hub *h);
/* Tell every worker to switch to the script it loaded (commit) or to drop it. */
void hub__workers_decide(hub *h, int commit);
void hub__workers_stop(hub *h);
/* Shutdown: queue a marker to every worker; each answers (h->markers_waiting--) once what it
 * was handed before has run and its commands are posted. Returns how many were queued. */
int hub__workers_mark(hub *h);
/* 1 when a worker still has events queued. */
int hub__workers_busy(hub *h);
void hub__workers_join(hub *h);
int hub__worker_full(hub *h, int w);
void hub__worker_pause(hub *h, int w, hub_client *c);

/* mailbox (mailbox.c) */
void hub__mailbox_init(hub *h);
/* Any thread: append a chain of nodes (linked through next, ending at tail) and wake the
 * loop once. */
void hub__post_chain(hub *h, hub_post *head, hub_post *tail);
/* Loop thread: run what is posted now (as a wake-up would). */
void hub__mailbox_run(hub *h);
/* At exit, once no other thread can post: run what is left (h->stopping is set). */
void hub__mailbox_drain(hub *h);
void hub__mailbox_free(hub *h);
/* hub_malloc that waits for memory instead of failing (for what must get through). */
void *hub__malloc_retry(size_t size);
int hub__worker_queue_item(hub *h, int w, int type, uint64_t id, const void *data, size_t len);

/* A worker's queue and counters, readable from any thread. */
typedef struct hub_worker_view {
    int index;
    uint64_t queued_events, queued_bytes, events;
    uint64_t calls_bytes, calls_refused; /* worker_calls: held by the loop, refused */
    uint64_t script[HUB_SCRIPT_NCOUNTS];
} hub_worker_view;
void hub__worker_view(hub *h, int w, hub_worker_view *out);
/* Loop thread: how many of the worker's connections wait for its queue to drain. */
size_t hub__worker_paused(hub *h, int w);

/* Tell the state that runs c's events that c's tag changed behind its back (dispatch.c). */
void hub__tag_changed(hub *h, hub_client *c);

/* What a state of worker (-1: the loop's) loads: the configured script, or during a reload
 * round the text read once for it, cancelled at shutdown (reload.c). */
hub_script_conf hub__script_conf(const hub *h, int worker);
/* At exit: wait for the check thread (reload_cancel is set), then answer and free what a
 * round left (after the mailbox ran its verdict). */
void hub__reload_join(hub *h);
void hub__reload_free(hub *h);
/* reload (reload.c): check the script, then reload every state. call (may be NULL) is answered
 * once every state runs the new script, or with the reason it failed. */
void hub__reload(hub *h, hub_ctl_call *call);
/* The check thread's verdict on the script (why is NULL when it loads), in the loop. */
void hub__reload_checked(hub *h, const char *why);
/* From the check thread: hand the verdict to the loop (workers.c, with the commands). */
void hub__post_checked(hub *h, const char *why);
/* A worker finished its part of a reload; why is NULL on success. */
void hub__reload_answered(hub *h, int worker, const char *why);

/* modules (module.c) */
int hub__modules_init(hub *h, char *err, size_t errlen);
int hub__modules_start(hub *h, char *err, size_t errlen);
/* Shutdown: how many deliveries the modules still have in flight (each is asked to drain). */
size_t hub__modules_in_flight(hub *h);
/* Stop every module once (they fail what is left), in reverse order. */
void hub__modules_stop(hub *h);
void hub__modules_free(hub *h);
/* The modules' script functions with no state, for states being checked (never freed). */
const hub_script_fn_ref *hub__inert_fns(size_t *n);
size_t hub__modules_stats(hub *h, hub_stat *out, size_t cap);
/* A completion token for the state of worker (-1: the loop's). */
uint64_t hub__token_new(hub *h, int worker);
/* Count (and log at debug) a completion that found no state to run in. Any thread. */
void hub__complete_undelivered(hub *h, uint64_t token, const char *why);
/* n results of a run not delivered (their tokens are not logged one by one). */
void hub__results_undelivered(hub *h, uint64_t n, const char *why);
/* The spare result batches, at exit (after the mailbox's last run). */
void hub__results_free(hub *h);
/* Any thread: 0 when event may be raised (a valid name, an events module built in), else
 * -EINVAL / -ENOSYS with err set. */
int hub__raise_check(const hub *h, const char *event, char *err, size_t errlen);
/* The sink's calls, -ENOSYS with err set when no events module is built in. */
int hub__event_check(hub *h, const char *event, const char *socket, char *err, size_t errlen);
int hub__event_subscribe(hub *h, const char *event, const char *socket, long expire_s, char *err,
                         size_t errlen);
int hub__event_unsubscribe(hub *h, const char *event, const char *socket, char *err, size_t errlen);
/* A failed delivery's report, {event, socket, status = -1, error} (NULL on OOM). */
struct json_object *hub__event_report(const char *event, const char *socket, const char *error);
/* E_EVAPI_CONNECTION_NEW / _CLOSED about ci, only when the event has a subscriber. */
void hub__raise_conn_event(hub *h, const char *event, const hub_conn_info *ci, const char *tag,
                           const char *reason);

/* statistics (stats.c): the counters and gauges as a list (see hub_api.stats); any thread.
 * Returns how many there are, which may be more than cap. */
size_t hub__stats_collect(hub *h, hub_stat *out, size_t cap);
/* Wall-clock seconds (CLOCK_REALTIME), for start and load times. */
double hub__wall_now(void);
/* The core control commands (control_cmds.c). 0 or -ENOMEM. */
int hub__ctl_register_core(hub *h);
/* Answer the listings still under way (the hub is stopping) and free them. */
void hub__ctl_jobs_free(hub *h);
/* What a successful reload answers (control_cmds.c). */
struct json_object *hub__reload_result(hub *h);

#endif
