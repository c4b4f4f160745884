/* The control socket: JSON-RPC 2.0 over a unix socket (and optionally loopback TCP), served
 * by the loop without blocking it. The socket code knows no command: each feature registers
 * its own, with a spec (hub/control_spec.h) the server checks parameters against. */
#ifndef HUB_CONTROL_H
#define HUB_CONTROL_H

#include <stddef.h>

#include "hub/control_spec.h"

struct json_object;
struct ev_loop;
typedef struct hub_ctl hub_ctl;
typedef struct hub_ctl_call hub_ctl_call;

#define HUB_CTL_MAX_CONNS   64                  /* control connections open at once */
#define HUB_CTL_MAX_REQUEST (1024 * 1024)       /* bytes in one request */
#define HUB_CTL_MAX_OUTPUT  (256 * 1024 * 1024) /* bytes of answers queued to one connection */
/* Backpressure: a connection's next request (or next element of a batch) is read and started
 * only while fewer than HUB_CTL_MAX_INFLIGHT of its calls are under way and fewer than
 * HUB_CTL_OUT_PAUSE bytes of its answers are unsent. So what one connection holds is at most
 * HUB_CTL_OUT_PAUSE + HUB_CTL_MAX_INFLIGHT answers (a `clients` answer is ~170 bytes a
 * listed client) + one read (HUB_CTL_READ) + one request being parsed (HUB_CTL_MAX_REQUEST),
 * however many requests it pipelines and however it batches them. */
#define HUB_CTL_MAX_INFLIGHT 4
#define HUB_CTL_OUT_PAUSE    (64 * 1024)
#define HUB_CTL_READ         16384
#define HUB_CTL_LINGER       2.0 /* s a connection ended by a parse error reads on for the EOF */
/* s a connection may go without progress before it is closed: no request from the peer and,
 * when answers wait for it, none of their bytes taken. A call the hub is still working on
 * (a reload, a listing) holds the clock. So idle connections cannot hold the 64 slots. */
#define HUB_CTL_IDLE_TIMEOUT 60.0
/* When all HUB_CTL_MAX_CONNS are open, a new connection closes the one idle longest (nothing
 * pending) if it has been idle this many seconds, rather than being refused: the operator
 * gets in within this long whatever idle connections hold the socket. */
#define HUB_CTL_EVICT_IDLE 10.0

/* A command handler, run on the loop thread. params is an object holding only the spec's
 * params, with their types checked (borrowed: take a reference to keep it). The handler
 * answers with exactly one hub_ctl_reply() or hub_ctl_fail(), now or later (the call stays
 * valid until then, even if the asker has gone). */
typedef void (*hub_ctl_fn)(hub_ctl_call *call, struct json_object *params, void *ud);

/* The command registry, listening as hub_ctl_listen (path and tcp may both be empty: a
 * registry only). NULL with err set. */
hub_ctl *hub_ctl_new(struct ev_loop *loop, const char *path, const char *tcp, char *err,
                     size_t errlen);
/* Listen on the unix socket path (mode 0600; a stale socket file is replaced, a live one is
 * an error) when path is not empty and, when tcp is not empty, on that loopback host:port.
 * Out of descriptors, a connection is accepted and closed (listen.h). 0 or -1 with err set. */
int hub_ctl_listen(hub_ctl *ctl, const char *path, const char *tcp, char *err, size_t errlen);
/* Close every control connection and remove the socket file. NULL-safe. Calls still
 * pending may be answered later: their answers are dropped. */
void hub_ctl_free(hub_ctl *ctl);
/* Add a command; spec must outlive ctl. 0, -EEXIST (name taken) or -ENOMEM. */
int hub_ctl_register(hub_ctl *ctl, const hub_ctl_spec *spec, hub_ctl_fn fn, void *ud);
/* The registered commands' specs, in registration order; NULL past the end. */
const hub_ctl_spec *hub_ctl_spec_at(const hub_ctl *ctl, size_t i);
/* Requests received (every request, the broken ones included). Any thread. */
unsigned long long hub_ctl_requests(hub_ctl *ctl);
/* The TCP port actually bound (useful with port 0), or 0. */
int hub_ctl_tcp_port(const hub_ctl *ctl);

/* Answer a call with result (its reference passes to the call; NULL is JSON null). */
void hub_ctl_reply(hub_ctl_call *call, struct json_object *result);
/* Answer a call with an error (a HUB_CTL_* code and a message). */
void hub_ctl_fail(hub_ctl_call *call, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
