/* Listener: bind, accept with max_clients checked before allocation, and the EMFILE cure. */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "hub/hub_int.h"
#include "hub/log.h"

void hub__addr_str(const struct sockaddr *sa, char *ip, size_t iplen, uint16_t *port)
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

int hub__listen(hub *h, char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int one = 1, fd = -1;

    if (hub_config_split_addr(h->cfg.bind_addr, host, sizeof(host), port, sizeof(port)) < 0) {
        snprintf(err, errlen, "bind_addr '%s' is not host:port", h->cfg.bind_addr);
        return -EINVAL;
    }
    /* Resolved once, at start-up, before the loop runs. */
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve bind_addr '%s': %s", h->cfg.bind_addr,
                 gai_strerror(rc));
        return -EINVAL;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto syserr;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, h->cfg.backlog) < 0)
        goto syserr;
    freeaddrinfo(res);
    res = NULL;

    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char ip[INET6_ADDRSTRLEN] = "?";
    uint16_t lport = 0;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    hub__addr_str((struct sockaddr *)&ss, ip, sizeof(ip), &lport);
    int v6 = ss.ss_family == AF_INET6;
    snprintf(h->listen_addr, sizeof(h->listen_addr), "%s%s%s:%u", v6 ? "[" : "", ip, v6 ? "]" : "",
             lport);
    h->lfd = fd;
    /* A spare descriptor, given up to accept-and-close when the process runs out (EMFILE),
     * so a full table does not leave the listener readable forever. */
    h->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ev_io_init(&h->accept_w, hub__accept_cb, fd, EV_READ);
    h->accept_w.data = h;
    hub_log(HUB_LOG_NOTICE, "listening on %s (max_clients=%d, netstring_format=%d, workers=%d)",
            h->listen_addr, h->cfg.max_clients, h->cfg.netstring_format, h->cfg.workers);
    return 0;
syserr:
    snprintf(err, errlen, "cannot listen on %s: %s", h->cfg.bind_addr, strerror(errno));
    if (fd >= 0)
        close(fd);
    if (res)
        freeaddrinfo(res);
    return -errno;
}

static void refuse(hub *h, int fd, const struct sockaddr_storage *ss)
{
    char ip[INET6_ADDRSTRLEN] = "?", why[96];
    uint16_t port = 0;
    hub__addr_str((const struct sockaddr *)ss, ip, sizeof(ip), &port);
    snprintf(why, sizeof(why), "too many clients (max_clients=%d)", h->cfg.max_clients);
    hub_log(HUB_LOG_WARN, "refused connection from %s:%u: max_clients (%d) reached", ip, port,
            h->cfg.max_clients);
    hub__write_error_frame(h, fd, "max_clients", why);
    close(fd);
    HUB_STAT_ADD(h, refused, 1);
}

/* Out of descriptors: give up the spare one to accept the connection and close it with a
 * reason, so the listener does not stay readable and spin. Logged at most once a second. */
static void refuse_emfile(hub *h, int err)
{
    close(h->spare_fd);
    int fd = accept(h->lfd, NULL, NULL);
    if (fd >= 0) {
        hub__write_error_frame(h, fd, "unavailable", "the server is out of file descriptors");
        close(fd);
        HUB_STAT_ADD(h, refused, 1);
        h->emfile_refused++;
    }
    h->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ev_tstamp now = ev_now(h->loop);
    if (now - h->emfile_logged >= 1.0) {
        hub_log(HUB_LOG_ERR, "accept: %s; refused %llu connection(s) since the last report",
                strerror(err), (unsigned long long)h->emfile_refused);
        h->emfile_logged = now;
        h->emfile_refused = 0;
    }
}

void hub__accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    hub *h = w->data;
    (void)loop;
    (void)revents;
    if (h->spare_fd < 0)
        h->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (int i = 0; i < HUB_ACCEPT_PER_EVENT; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(h->lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && h->spare_fd >= 0) {
                refuse_emfile(h, errno);
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                hub_log(HUB_LOG_ERR, "accept: %s", strerror(errno));
            return;
        }
        if (atomic_load(&h->nclients) >= h->cfg.max_clients || h->nfree == 0) {
            refuse(h, fd, &ss);
            continue;
        }
        hub__client_accepted(h, fd, (struct sockaddr *)&ss);
    }
}
