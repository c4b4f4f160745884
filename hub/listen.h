/* A listening socket on the loop, for every kind of connection the hub accepts (evapi
 * clients, the control socket, and later SIP over TCP): bind, listen, accept a bounded
 * number per event, and one policy for running out of descriptors. */
#ifndef HUB_LISTEN_H
#define HUB_LISTEN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct ev_loop;
typedef struct hub_listener hub_listener;

#define HUB_LISTEN_PER_EVENT 64 /* accepts per readable event */

/* A connection accepted (non-blocking, close-on-exec): fd is the callee's. */
typedef void (*hub_accept_fn)(void *ud, int fd, const struct sockaddr *sa, socklen_t salen);
/* Out of descriptors, a connection accepted only to be turned away: the callee may write a
 * reason to fd (best effort, never blocking) and count it; the listener closes fd. */
typedef void (*hub_refuse_fn)(void *ud, int fd);

/* The numeric host of sa (AF_INET or AF_INET6) into ip, and its port. */
void hub_addr_str(const struct sockaddr *sa, char *ip, size_t iplen, uint16_t *port);

/* Bind and listen on "host:port" or "[v6]:port" (TCP, SO_REUSEADDR, v6 only for v6). The
 * host is resolved here, once: call it at start-up. With numeric_only, names are refused.
 * Returns the descriptor, or <0 with err set; bound (if not NULL) gets the address actually
 * bound, as "ip:port" or "[ip]:port". */
int hub_listen_tcp(const char *addr, int backlog, int numeric_only, char *bound, size_t boundlen,
                   char *err, size_t errlen);

/* Watch fd (a listening socket, now the listener's). name prefixes its log lines ("evapi",
 * "control"). refuse may be NULL. Out of descriptors (EMFILE/ENFILE), a spare descriptor is
 * given up to accept the connection and turn it away, so the socket does not stay readable
 * and spin; without a spare (or on ENOBUFS/ENOMEM) accepting pauses for a second. Either way
 * it is logged at most once a second with the count refused. NULL on OOM (fd left open). */
hub_listener *hub_listener_new(struct ev_loop *loop, int fd, const char *name, hub_accept_fn accept,
                               hub_refuse_fn refuse, void *ud);
void hub_listener_start(hub_listener *l);
void hub_listener_stop(hub_listener *l);
/* Stop and close. NULL-safe. */
void hub_listener_free(hub_listener *l);
/* Connections turned away for want of descriptors, in all. */
unsigned long long hub_listener_refused(const hub_listener *l);

#endif
