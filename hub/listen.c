/* Listening sockets: bind, listen, accept, and one cure for running out of descriptors
 * (libev's ev.pod "The special problem of accept()ing when you can't"). */
#define _GNU_SOURCE /* accept4 */
#include "hub/listen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/log.h"

struct hub_listener {
    ev_io io;
    ev_timer pause_w; /* accepting again after a pause */
    struct ev_loop *loop;
    int fd, spare_fd;
    int active; /* started by the owner (a pause does not change it) */
    char name[32];
    hub_accept_fn accept;
    hub_refuse_fn refuse;
    void *ud;
    ev_tstamp logged;           /* the last "out of descriptors" report */
    unsigned long long since;   /* refused since then */
    unsigned long long refused; /* in all */
};

void hub_addr_str(const struct sockaddr *sa, char *ip, size_t iplen, uint16_t *port)
{
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, iplen);
        *port = ntohs(s6->sin6_port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, iplen);
        *port = ntohs(s4->sin_port);
    }
}

int hub_listen_tcp(const char *addr, int backlog, int numeric_only, char *bound, size_t boundlen,
                   char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags =
                                 AI_PASSIVE | AI_NUMERICSERV | (numeric_only ? AI_NUMERICHOST : 0)};
    struct addrinfo *res = NULL;
    int one = 1, fd = -1, e;

    if (hub_config_split_addr(addr, host, sizeof(host), port, sizeof(port)) < 0) {
        snprintf(err, errlen, "'%s' is not host:port", addr);
        return -EINVAL;
    }
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve '%s': %s", addr, gai_strerror(rc));
        return -EINVAL;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto syserr;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, backlog) < 0)
        goto syserr;
    freeaddrinfo(res);
    if (bound && boundlen) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        char ip[INET6_ADDRSTRLEN] = "?";
        uint16_t p = 0;
        if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
            hub_addr_str((struct sockaddr *)&ss, ip, sizeof(ip), &p);
        int v6 = ss.ss_family == AF_INET6;
        snprintf(bound, boundlen, "%s%s%s:%u", v6 ? "[" : "", ip, v6 ? "]" : "", p);
    }
    return fd;
syserr:
    e = errno;
    snprintf(err, errlen, "cannot listen on %s: %s", addr, strerror(e));
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return -e;
}

static void report(hub_listener *l, int err)
{
    ev_tstamp now = ev_now(l->loop);
    if (now - l->logged < 1.0)
        return;
    hub_log(HUB_LOG_ERR, "%s: accept failed: %s; refused %llu connection(s) since the last report",
            l->name, strerror(err), l->since);
    l->logged = now;
    l->since = 0;
}

/* Stop accepting for a second: the socket stays readable while the cause lasts. */
static void pause_accepting(hub_listener *l)
{
    ev_io_stop(l->loop, &l->io);
    ev_timer_set(&l->pause_w, 1.0, 0.); /* a fired timer keeps no delay */
    ev_timer_start(l->loop, &l->pause_w);
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    hub_listener *l = w->data;
    (void)revents;
    if (l->active)
        ev_io_start(loop, &l->io);
}

/* Out of descriptors: give up the spare one to accept the connection and turn it away with a
 * reason; without a spare, pause. */
static void out_of_descriptors(hub_listener *l, int err)
{
    if (l->spare_fd < 0) {
        report(l, err);
        pause_accepting(l);
        return;
    }
    close(l->spare_fd);
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
        if (l->refuse)
            l->refuse(l->ud, fd);
        close(fd);
        l->refused++;
        l->since++;
    }
    l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    report(l, err);
    if (fd < 0 || l->spare_fd < 0)
        pause_accepting(l); /* the spare did not help (another thread took the slot) */
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    hub_listener *l = w->data;
    (void)loop, (void)revents;
    if (l->spare_fd < 0)
        l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (int i = 0; i < HUB_LISTEN_PER_EVENT && ev_is_active(&l->io); i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            l->accept(l->ud, fd, (struct sockaddr *)&ss, sl);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED)
            continue;
        if (errno == EMFILE || errno == ENFILE) {
            out_of_descriptors(l, errno);
            continue;
        }
        if (errno == ENOBUFS || errno == ENOMEM) {
            report(l, errno);
            pause_accepting(l);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
            hub_log(HUB_LOG_ERR, "%s: accept failed: %s", l->name, strerror(errno));
        }
        return;
    }
}

hub_listener *hub_listener_new(struct ev_loop *loop, int fd, const char *name, hub_accept_fn accept,
                               hub_refuse_fn refuse, void *ud)
{
    hub_listener *l = hub_calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->loop = loop;
    l->fd = fd;
    snprintf(l->name, sizeof(l->name), "%s", name);
    l->accept = accept;
    l->refuse = refuse;
    l->ud = ud;
    /* A spare descriptor, given up to accept-and-close when the process runs out, so a full
     * table does not leave the listener readable forever. */
    l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ev_io_init(&l->io, accept_cb, fd, EV_READ);
    ev_timer_init(&l->pause_w, resume_cb, 1.0, 0.);
    l->io.data = l->pause_w.data = l;
    return l;
}

void hub_listener_start(hub_listener *l)
{
    l->active = 1;
    if (!ev_is_active(&l->pause_w))
        ev_io_start(l->loop, &l->io);
}

void hub_listener_stop(hub_listener *l)
{
    l->active = 0;
    ev_io_stop(l->loop, &l->io);
    ev_timer_stop(l->loop, &l->pause_w);
}

void hub_listener_free(hub_listener *l)
{
    if (!l)
        return;
    hub_listener_stop(l);
    close(l->fd);
    if (l->spare_fd >= 0)
        close(l->spare_fd);
    hub_free(l);
}

unsigned long long hub_listener_refused(const hub_listener *l) { return l->refused; }
