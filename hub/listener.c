/* The evapi listener (a module of the hub's own, on listen.c's helper): max_clients checked
 * before allocation, refusals with a reason. */
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
#include "hub/listen.h"
#include "hub/log.h"

static void refuse(hub *h, int fd, const struct sockaddr *sa)
{
    char ip[INET6_ADDRSTRLEN] = "?", why[96];
    uint16_t port = 0;
    hub_addr_str(sa, ip, sizeof(ip), &port);
    snprintf(why, sizeof(why), "too many clients (max_clients=%d)", h->cfg.max_clients);
    hub_log(HUB_LOG_WARN, "refused connection from %s:%u: max_clients (%d) reached", ip, port,
            h->cfg.max_clients);
    hub__write_error_frame(h, fd, "max_clients", why);
    close(fd);
    HUB_STAT_ADD(h, refused, 1);
}

/* max_clients is checked before anything is allocated for the connection. */
static void accept_client(void *ud, int fd, const struct sockaddr *sa, socklen_t salen)
{
    hub *h = ud;
    (void)salen;
    if (atomic_load(&h->nclients) >= h->cfg.max_clients || h->nfree == 0) {
        refuse(h, fd, sa);
        return;
    }
    hub__client_accepted(h, fd, sa);
}

/* Out of descriptors: the listener accepted this one only to turn it away. */
static void refuse_unavailable(void *ud, int fd)
{
    hub *h = ud;
    hub__write_error_frame(h, fd, "unavailable", "the server is out of file descriptors");
    HUB_STAT_ADD(h, refused, 1);
}

/* The evapi listener as a module of the hub's own: it binds once the scripts are loaded
 * (start), and stops accepting as soon as shutdown begins (drain). */
static int evapi_init(hub *h, void **state, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    *state = h;
    return 0;
}

static int evapi_start(void *state, char *err, size_t errlen)
{
    hub *h = state;
    char why[512];
    int fd = hub_listen_tcp(h->cfg.bind_addr, h->cfg.backlog, 0, h->listen_addr,
                            sizeof(h->listen_addr), why, sizeof(why));
    if (fd < 0) {
        snprintf(err, errlen, "%s", why);
        return fd;
    }
    h->listener = hub_listener_new(h->loop, fd, "evapi", accept_client, refuse_unavailable, h);
    if (!h->listener) {
        close(fd);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    hub_listener_start(h->listener);
    hub_log(HUB_LOG_NOTICE, "listening on %s (max_clients=%d, netstring_format=%d, workers=%d)",
            h->listen_addr, h->cfg.max_clients, h->cfg.netstring_format, h->cfg.workers);
    return 0;
}

static size_t evapi_drain(void *state)
{
    hub *h = state;
    /* Closed at once: a connection attempt during shutdown is refused by the kernel. */
    hub_listener_free(h->listener);
    h->listener = NULL;
    return 0;
}

static void evapi_free(void *state)
{
    hub *h = state;
    if (h) {
        hub_listener_free(h->listener);
        h->listener = NULL;
    }
}

const hub_module evapi_module = {
    .name = "evapi",
    .init = evapi_init,
    .start = evapi_start,
    .drain = evapi_drain,
    .free = evapi_free,
};
