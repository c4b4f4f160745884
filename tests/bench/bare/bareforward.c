/* bareforward: the baseline evbench compares evhub with (issue 13). A plain epoll netstring
 * forwarder with no script: it reads frames and writes each one to the subscribers, nothing
 * else, as fast as plain C on one thread can.
 *
 *   bareforward [HOST [PORT [SNDBUF]]]
 *
 * (default 127.0.0.1, port 0: any, prints "listening on H:P"; SNDBUF bytes per socket, as
 * evhub's [evapi] sndbuf, default 262144; 0 leaves the kernel's auto-tuning).
 *
 * The protocol is evbench's fan-out script's: a frame "sub" makes its sender a subscriber and
 * sends "ok" to every subscriber; any other frame goes to every subscriber as it came.
 *
 * How it forwards: each connection keeps one read buffer for its life (256 KiB, never freed or
 * shrunk); a read ends in a run of complete frames plus maybe a partial one. The run of data
 * frames is written to every subscriber as one byte span: straight from the read buffer with
 * one write() when the subscriber has nothing queued, else appended to its output buffer. The
 * output buffers are flushed after every readable connection of an epoll_wait batch was read.
 * The partial tail is moved to the front of the read buffer only when the free room after it
 * is too small for another read. A subscriber whose output passes 64 MiB is closed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define RBUF       (256 * 1024)
#define READ_MIN   (64 * 1024) /* room wanted for a read before the tail is moved down */
#define OUT_MAX    (64u * 1024 * 1024)
#define MAX_CONNS  4096
#define MAX_EVENTS 256

struct conn {
    int fd;
    int sub;     /* a subscriber */
    int pending; /* on the flush list */
    int wait;    /* EPOLLOUT armed: its socket is full */
    char *rbuf;
    size_t rstart, rend; /* unparsed bytes: rbuf[rstart..rend) */
    char *obuf;
    size_t ooff, olen, ocap;
    struct conn *next_pending;
};

static struct conn *conns[MAX_CONNS];
static int subs[MAX_CONNS], nsubs;
static struct conn *pending;
static struct conn *dead[MAX_CONNS]; /* closed in this batch: freed after it */
static int ndead;
static int ep;
static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void conn_close(struct conn *c)
{
    for (int i = 0; i < nsubs; i++) {
        if (subs[i] == c->fd) {
            subs[i] = subs[--nsubs];
            break;
        }
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    c->fd = -1;
    dead[ndead++] = c; /* freed after the batch: it may be on the pending list */
}

static int out_append(struct conn *c, const char *p, size_t n)
{
    if (c->olen + n > OUT_MAX)
        return -1;
    if (c->ooff && c->olen + n > c->ocap) {
        memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
        c->olen -= c->ooff;
        c->ooff = 0;
    }
    if (c->olen + n > c->ocap) {
        size_t cap = c->ocap ? c->ocap : 256 * 1024;
        while (cap < c->olen + n)
            cap *= 2;
        char *b = realloc(c->obuf, cap);
        if (!b)
            return -1;
        c->obuf = b;
        c->ocap = cap;
    }
    memcpy(c->obuf + c->olen, p, n);
    c->olen += n;
    if (!c->pending && !c->wait) {
        c->pending = 1;
        c->next_pending = pending;
        pending = c;
    }
    return 0;
}

/* Write what is queued; arm EPOLLOUT when the socket is full. */
static void out_flush(struct conn *c)
{
    while (c->ooff < c->olen) {
        ssize_t w = write(c->fd, c->obuf + c->ooff, c->olen - c->ooff);
        if (w > 0) {
            c->ooff += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            if (!c->wait) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = c->fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->wait = 1;
            }
            return;
        }
        conn_close(c);
        return;
    }
    c->ooff = c->olen = 0;
    if (c->wait) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->wait = 0;
    }
}

/* Send p[0..n) to every subscriber: written at once when nothing is queued before it. */
static void to_subs(const char *p, size_t n)
{
    for (int i = 0; i < nsubs && n; i++) {
        struct conn *s = conns[subs[i]];
        size_t done = 0;
        if (s->olen == s->ooff && !s->wait) {
            ssize_t w = write(s->fd, p, n);
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                conn_close(s);
                i--;
                continue;
            }
            done = w > 0 ? (size_t)w : 0;
        }
        if (done < n && out_append(s, p + done, n - done) < 0) {
            fprintf(stderr, "bareforward: subscriber fd %d over %u bytes, closed\n", s->fd,
                    OUT_MAX);
            conn_close(s);
            i--;
        }
    }
}

/* Parse the complete frames in c's buffer, forwarding runs of data frames as one span.
 * Returns -1 on a framing error. */
static int conn_parse(struct conn *c)
{
    char *b = c->rbuf;
    size_t pos = c->rstart, run = c->rstart;
    while (pos < c->rend) {
        size_t len = 0, q = pos;
        while (q < c->rend && b[q] >= '0' && b[q] <= '9' && q - pos < 10)
            len = len * 10 + (size_t)(b[q++] - '0');
        if (q == c->rend)
            break;
        if (b[q] != ':' || q == pos || len > RBUF - 16)
            return -1;
        if (c->rend - q - 1 < len + 1)
            break;
        const char *pl = b + q + 1;
        if (pl[len] != ',')
            return -1;
        size_t next = q + 1 + len + 1;
        if (len == 3 && memcmp(pl, "sub", 3) == 0) {
            if (pos > run)
                to_subs(b + run, pos - run);
            if (!c->sub) {
                c->sub = 1;
                subs[nsubs++] = c->fd;
            }
            to_subs("2:ok,", 5);
            run = next;
        }
        pos = next;
    }
    if (pos > run)
        to_subs(b + run, pos - run);
    c->rstart = pos;
    return 0;
}

static void conn_read(struct conn *c)
{
    for (int i = 0; i < 4 && c->fd >= 0; i++) {
        if (c->rstart == c->rend) {
            c->rstart = c->rend = 0;
        } else if (RBUF - c->rend < READ_MIN) {
            memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
            c->rend -= c->rstart;
            c->rstart = 0;
        }
        size_t room = RBUF - c->rend;
        ssize_t n = read(c->fd, c->rbuf + c->rend, room);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            conn_close(c);
            return;
        }
        if (n < 0)
            return;
        c->rend += (size_t)n;
        if (conn_parse(c) < 0) {
            fprintf(stderr, "bareforward: framing error on fd %d, closed\n", c->fd);
            conn_close(c);
            return;
        }
        if ((size_t)n < room)
            return;
    }
}

int main(int argc, char **argv)
{
    const char *host = argc > 1 ? argv[1] : "127.0.0.1";
    int port = argc > 2 ? atoi(argv[2]) : 0, one = 1;
    int sndbuf = argc > 3 ? atoi(argv[3]) : 256 * 1024;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};

    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "bareforward: bad address %s\n", host);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    socklen_t sl = sizeof(sa);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1024) < 0 ||
        getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0) {
        perror("bareforward: listen");
        return 2;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("bareforward: listening on %s:%d\n", host, ntohs(sa.sin_port));
    fflush(stdout);

    while (!stop) {
        struct epoll_event evs[MAX_EVENTS];
        int n = epoll_wait(ep, evs, MAX_EVENTS, 1000);
        for (int e = 0; e < n; e++) {
            int fd = evs[e].data.fd;
            if (fd == lfd) {
                int cfd;
                while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct conn *c = calloc(1, sizeof(*c));
                    if (cfd >= MAX_CONNS || !c || !(c->rbuf = malloc(RBUF))) {
                        if (c)
                            free(c);
                        close(cfd);
                        continue;
                    }
                    c->fd = cfd;
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    if (sndbuf > 0)
                        setsockopt(cfd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
                    conns[cfd] = c;
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev);
                }
                continue;
            }
            struct conn *c = conns[fd];
            if (!c)
                continue;
            if (evs[e].events & EPOLLOUT)
                out_flush(c);
            if (c->fd >= 0 && (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                conn_read(c);
        }
        while (pending) {
            struct conn *c = pending;
            pending = c->next_pending;
            c->pending = 0;
            if (c->fd >= 0)
                out_flush(c);
        }
        for (int i = 0; i < ndead; i++) {
            free(dead[i]->rbuf);
            free(dead[i]->obuf);
            free(dead[i]);
        }
        ndead = 0;
    }
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i]) {
            close(i);
            free(conns[i]->rbuf);
            free(conns[i]->obuf);
            free(conns[i]);
        }
    }
    close(lfd);
    close(ep);
    return 0;
}
