/* fanload: the fan-out workload against hubs that are already running, for cluster_bench.py.
 *
 *   fanload --pub PORT --sub PORT[,PORT...] [--pubs 4] [--subs 16] [--size 128]
 *           [--rate 20000] [--seconds 5] [--warmup 1]
 *
 * Subscribers connect round-robin to the --sub ports and send "sub" (the bench script tags
 * them "subs" and answers "ok"); publishers connect to --pub and send SIZE-byte frames that
 * the script multicasts to "subs", paced to RATE frames a second in total, each carrying a
 * CLOCK_MONOTONIC timestamp. One thread publishes, one reads every subscriber (epoll). Prints
 * one JSON line: sent and deliveries a second, p50/p99/p999 latency (µs) over the measured
 * window, deliveries expected and missing. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONN 64
#define HDR      16 /* timestamp (8), sequence (8) */

static int npubs = 4, nsubs = 16, size = 128, pub_port;
static int sub_ports[8], nsub_ports;
static double rate = 20000, seconds = 5, warmup = 1;
static int pub_fd[MAX_CONN], sub_fd[MAX_CONN];
static atomic_int stop, measuring;
static atomic_ulong sent_measured, delivered_measured;
static uint64_t *lat; /* ns, deliveries measured */
static size_t nlat, caplat;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "fanload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int connect_to(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write");
        p += w;
        n -= (size_t)w;
    }
}

/* Wait for "2:ok," on a fresh subscriber. */
static void expect_ok(int fd)
{
    char buf[16];
    size_t got = 0;
    while (got < 5) {
        ssize_t r = read(fd, buf + got, 5 - got);
        if (r <= 0)
            die("read ok");
        got += (size_t)r;
    }
    if (memcmp(buf, "2:ok,", 5) != 0) {
        fprintf(stderr, "fanload: subscriber got %.5s, not 2:ok,\n", buf);
        exit(2);
    }
}

static void *publisher(void *arg)
{
    (void)arg;
    char frame[64 + 65536];
    int hl = snprintf(frame, sizeof(frame), "%d:", size);
    char *payload = frame + hl;
    memset(payload, 'x', (size_t)size);
    payload[size] = ',';
    size_t flen = (size_t)hl + (size_t)size + 1;
    uint64_t seq = 0, start = now_ns();
    double per_ns = rate / 1e9;
    while (!atomic_load(&stop)) {
        uint64_t t = now_ns();
        uint64_t due = (uint64_t)((double)(t - start) * per_ns);
        while (seq < due) {
            uint64_t ts = now_ns();
            memcpy(payload, &ts, 8);
            memcpy(payload + 8, &seq, 8);
            write_all(pub_fd[seq % (uint64_t)npubs], frame, flen);
            if (atomic_load(&measuring))
                atomic_fetch_add(&sent_measured, 1);
            seq++;
        }
        struct timespec d = {0, 200000}; /* 0.2 ms */
        nanosleep(&d, NULL);
    }
    return NULL;
}

struct rd {
    char buf[1 << 16];
    size_t len;
};

static void take(struct rd *r, uint64_t now)
{
    size_t off = 0;
    while (off < r->len) {
        char *colon = memchr(r->buf + off, ':', r->len - off);
        if (!colon)
            break;
        size_t n = strtoul(r->buf + off, NULL, 10);
        size_t start = (size_t)(colon - r->buf) + 1;
        if (start + n + 1 > r->len)
            break;
        if (n >= HDR && atomic_load(&measuring)) {
            uint64_t ts;
            memcpy(&ts, r->buf + start, 8);
            if (nlat < caplat)
                lat[nlat++] = now - ts;
            atomic_fetch_add(&delivered_measured, 1);
        }
        off = start + n + 1;
    }
    memmove(r->buf, r->buf + off, r->len - off);
    r->len -= off;
}

static void *subscriber(void *arg)
{
    (void)arg;
    int ep = epoll_create1(0);
    struct rd *rds = calloc((size_t)nsubs, sizeof(*rds));
    for (int i = 0; i < nsubs; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, sub_fd[i], &e);
    }
    struct epoll_event evs[MAX_CONN];
    while (!atomic_load(&stop)) {
        int n = epoll_wait(ep, evs, MAX_CONN, 50);
        for (int k = 0; k < n; k++) {
            struct rd *r = &rds[evs[k].data.u32];
            ssize_t got = read(sub_fd[evs[k].data.u32], r->buf + r->len, sizeof(r->buf) - r->len);
            if (got <= 0)
                continue;
            r->len += (size_t)got;
            take(r, now_ns()); /* after the read: nothing in it was stamped later */
        }
    }
    free(rds);
    close(ep);
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q)
{
    if (!nlat)
        return -1;
    size_t i = (size_t)(q * (double)(nlat - 1));
    return (double)lat[i] / 1000.0;
}

int main(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--pub"))
            pub_port = atoi(v);
        else if (!strcmp(k, "--sub")) {
            char *dup = strdup(v), *save = NULL;
            for (char *t = strtok_r(dup, ",", &save); t && nsub_ports < 8;
                 t = strtok_r(NULL, ",", &save))
                sub_ports[nsub_ports++] = atoi(t);
            free(dup);
        } else if (!strcmp(k, "--pubs"))
            npubs = atoi(v);
        else if (!strcmp(k, "--subs"))
            nsubs = atoi(v);
        else if (!strcmp(k, "--size"))
            size = atoi(v);
        else if (!strcmp(k, "--rate"))
            rate = atof(v);
        else if (!strcmp(k, "--seconds"))
            seconds = atof(v);
        else if (!strcmp(k, "--warmup"))
            warmup = atof(v);
        else {
            fprintf(stderr, "fanload: unknown option %s\n", k);
            return 2;
        }
    }
    if (!pub_port || !nsub_ports || npubs < 1 || npubs > MAX_CONN || nsubs < 1 ||
        nsubs > MAX_CONN || size < HDR || size > 65536) {
        fprintf(stderr, "usage: fanload --pub PORT --sub PORT[,PORT...] [--pubs N] [--subs N] "
                        "[--size B] [--rate R] [--seconds S] [--warmup S]\n");
        return 2;
    }
    caplat = (size_t)(rate * seconds * nsubs * 1.2) + 1024;
    lat = malloc(caplat * sizeof(*lat));
    if (!lat)
        die("malloc");
    for (int i = 0; i < nsubs; i++) {
        sub_fd[i] = connect_to(sub_ports[i % nsub_ports]);
        write_all(sub_fd[i], "3:sub,", 6);
        expect_ok(sub_fd[i]);
    }
    for (int i = 0; i < npubs; i++)
        pub_fd[i] = connect_to(pub_port);
    struct timespec settle = {0, 300000000}; /* the nodes' heartbeats list the new tag */
    nanosleep(&settle, NULL);
    pthread_t tp, ts;
    pthread_create(&ts, NULL, subscriber, NULL);
    pthread_create(&tp, NULL, publisher, NULL);
    struct timespec w = {(time_t)warmup, (long)((warmup - (double)(time_t)warmup) * 1e9)};
    nanosleep(&w, NULL);
    atomic_store(&measuring, 1);
    uint64_t t0 = now_ns();
    struct timespec m = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&m, NULL);
    atomic_store(&measuring, 0);
    uint64_t t1 = now_ns();
    struct timespec tail = {0, 300000000}; /* what was sent in the window arrives */
    nanosleep(&tail, NULL);
    atomic_store(&stop, 1);
    pthread_join(tp, NULL);
    pthread_join(ts, NULL);
    double el = (double)(t1 - t0) / 1e9;
    qsort(lat, nlat, sizeof(*lat), cmp_u64);
    unsigned long sent = atomic_load(&sent_measured), deliv = atomic_load(&delivered_measured);
    printf("{\"sent_s\": %.0f, \"deliveries_s\": %.0f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"sent\": %lu, \"delivered\": %lu, \"samples\": %zu}\n",
           (double)sent / el, (double)deliv / el, pct(0.50), pct(0.99), pct(0.999), sent, deliv,
           nlat);
    free(lat);
    return 0;
}
