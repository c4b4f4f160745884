/* raisebench: events raised per second from Lua into one tcp: subscriber, side by side with
 * a plain C client writing the same documents to the same receiver in the same run.
 *
 * One receiver (a thread here: accepts, reads, counts newline-ended documents) listens on
 * loopback. evhub is started with `subscribe = E_BENCH tcp:127.0.0.1:PORT/bench` and a
 * script that raises N events per "go:N" frame. Rounds alternate:
 *   plain  a C client connects to the receiver and writes the documents evhub would write
 *          (snprintf each, writev in batches of --plain-batch, default 64: what evhub's tcp:
 *          socket does per wakeup; --plain-batch 1 is a client that writes each document)
 *   evhub  the driver keeps two "go:N" frames outstanding; the receiver counts what arrives
 * while a publisher keeps relaying frames through the hub to a tagged subscriber at a fixed
 * rate (--relay-rate), so the hub raises while it keeps relaying clients' messages. Each
 * window's rate is counted at the receiver; the ratio is evhub / plain. Not a test: it
 * prints a table and exits 0 unless something broke. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAD_LEN     64
#define MAX_ROUNDS  16
#define HUB_WAIT_MS 20000

static struct {
    const char *evhub;
    double seconds;
    int workers, batch, rounds, relay_rate;
    int plain_batch; /* documents per writev of the plain client: 64 as evhub, 1 = a write each */
} opt = {NULL, 3.0, 0, 500, 2, 2000, 64};

static atomic_ullong docs_in;  /* newline-ended documents the receiver got */
static atomic_ullong relay_in; /* bytes the relay subscriber got */
static atomic_int quit;
static char pad[PAD_LEN + 1];

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "raisebench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int tcp_connect(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("connect to port %d: %s", port, strerror(errno));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

static void send_ns(int fd, const char *s)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), "%zu:%s,", strlen(s), s);
    write_all(fd, buf, (size_t)n);
}

/* ---- the receiver: counts documents ---- */

static void *receiver_main(void *arg)
{
    int lfd = *(int *)arg, ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[64];
    static char buf[256 << 10];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    while (!atomic_load(&quit)) {
        int n = epoll_wait(ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                if (c >= 0)
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                continue;
            }
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                continue;
            }
            unsigned long long k = 0;
            for (char *p = buf, *end = buf + r; (p = memchr(p, '\n', (size_t)(end - p))); p++)
                k++;
            atomic_fetch_add(&docs_in, k);
        }
    }
    close(ep);
    return NULL;
}

/* ---- the plain C client ---- */

/* The document evhub's tcp: socket writes for evapi.raise("E_BENCH", {seq=i, pad=PAD}) to
 * tcp:...:PORT/bench. */
static int make_doc(char *buf, size_t cap, long seq)
{
    return snprintf(buf, cap,
                    "{\"jsonrpc\":\"2.0\",\"method\":\"bench\",\"params\":{\"seq\":%ld,\"pad\":"
                    "\"%s\"}}\n",
                    seq, pad);
}

static double plain_round(int port)
{
    int fd = tcp_connect(port);
    char docs[64][192];
    struct iovec iov[64];
    long seq = 0;
    unsigned long long d0 = atomic_load(&docs_in);
    double t0 = now_s(), t1 = t0 + opt.seconds;
    int nb = opt.plain_batch;
    while (now_s() < t1) {
        size_t left = 0;
        for (int i = 0; i < nb; i++) {
            iov[i].iov_base = docs[i];
            iov[i].iov_len = (size_t)make_doc(docs[i], sizeof(docs[i]), ++seq);
            left += iov[i].iov_len;
        }
        struct iovec *v = iov;
        int cnt = nb;
        while (left > 0) {
            ssize_t w = writev(fd, v, cnt);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                die("plain client writev: %s", strerror(errno));
            left -= (size_t)w;
            size_t k = (size_t)w;
            for (; cnt > 0 && k >= v->iov_len; cnt--, v++)
                k -= v->iov_len;
            if (cnt > 0 && k > 0) {
                v->iov_base = (char *)v->iov_base + k;
                v->iov_len -= k;
            }
        }
    }
    double el = now_s() - t0;
    unsigned long long got = atomic_load(&docs_in) - d0;
    close(fd);
    return got / el;
}

/* ---- evhub ---- */

static pid_t hub_pid;
static int hub_port;
static char dir[64], logpath[128];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0)
        die("cannot write %s", path);
}

static void hub_start(int rport)
{
    char path[160], conf[1024];
    snprintf(dir, sizeof(dir), "/tmp/raisebench-XXXXXX");
    if (!mkdtemp(dir))
        die("mkdtemp: %s", strerror(errno));
    snprintf(path, sizeof(path), "%s/bench.lua", dir);
    write_file(path,
               "local pad = string.rep('x', 64)\n"
               "evapi.on('message', function(conn, msg)\n"
               "  local cmd, rest = msg:match('^(%a+):?(.*)$')\n"
               "  if cmd == 'go' then\n"
               "    for i = 1, tonumber(rest) do evapi.raise('E_BENCH', {seq = i, pad = pad}) "
               "end\n"
               "    conn:send('done')\n"
               "  elseif cmd == 'sub' then conn:set_tag('relay') conn:send('ok')\n"
               "  elseif cmd == 'r' then evapi.multicast(msg, 'relay')\n"
               "  end\n"
               "end)\n");
    snprintf(conf, sizeof(conf),
             "[evapi]\nbind_addr = 127.0.0.1:0\nworkers = %d\n[lua]\nscript = bench.lua\n"
             "max_instructions = 0\n[log]\nlevel = notice\n[control]\nsocket = %s/ctl.sock\n"
             "[events]\nsubscribe = E_BENCH tcp:127.0.0.1:%d/bench\n",
             opt.workers, dir, rport);
    snprintf(path, sizeof(path), "%s/evhub.conf", dir);
    write_file(path, conf);
    snprintf(logpath, sizeof(logpath), "%s/evhub.log", dir);
    hub_pid = fork();
    if (hub_pid == 0) {
        int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(opt.evhub, opt.evhub, "-c", path, "-f", (char *)NULL);
        _exit(127);
    }
    for (double t0 = now_s(); now_s() - t0 < HUB_WAIT_MS / 1000.0;) {
        char text[8192] = "";
        FILE *f = fopen(logpath, "r");
        size_t n = f ? fread(text, 1, sizeof(text) - 1, f) : 0;
        if (f)
            fclose(f);
        text[n] = '\0';
        char *l = strstr(text, "listening on ");
        if (l && strchr(l, '(')) {
            char *colon = strchr(l + 13, ':');
            hub_port = colon ? atoi(colon + 1) : 0;
            if (hub_port > 0)
                return;
        }
        if (waitpid(hub_pid, NULL, WNOHANG) == hub_pid)
            die("evhub exited at start; see %s", logpath);
        usleep(20000);
    }
    die("evhub did not start; see %s", logpath);
}

static void hub_stop(void)
{
    if (hub_pid > 0) {
        kill(hub_pid, SIGTERM);
        waitpid(hub_pid, NULL, 0);
    }
}

/* Read netstring frames from fd until one equals want; returns 0, -1 on EOF. */
static int wait_frame(int fd, const char *want, char *buf, size_t cap, size_t *have)
{
    for (;;) {
        char *colon = memchr(buf, ':', *have);
        if (colon) {
            size_t len = strtoul(buf, NULL, 10), hdr = (size_t)(colon - buf) + 1;
            if (*have >= hdr + len + 1) {
                int match = len == strlen(want) && !memcmp(colon + 1, want, len);
                memmove(buf, buf + hdr + len + 1, *have - hdr - len - 1);
                *have -= hdr + len + 1;
                if (match)
                    return 0;
                continue;
            }
        }
        ssize_t r = read(fd, buf + *have, cap - *have);
        if (r <= 0)
            return -1;
        *have += (size_t)r;
    }
}

static double hub_round(int fd)
{
    char go[32], buf[4096];
    size_t have = 0;
    snprintf(go, sizeof(go), "go:%d", opt.batch);
    send_ns(fd, go);
    send_ns(fd, go);
    unsigned long long d0 = atomic_load(&docs_in);
    double t0 = now_s(), t1 = t0 + opt.seconds;
    while (now_s() < t1) {
        if (wait_frame(fd, "done", buf, sizeof(buf), &have) < 0)
            die("evhub closed the driver's connection; see %s", logpath);
        send_ns(fd, go);
    }
    double el = now_s() - t0;
    unsigned long long got = atomic_load(&docs_in) - d0;
    /* let the two batches still outstanding finish before the next round */
    for (int i = 0; i < 2; i++)
        wait_frame(fd, "done", buf, sizeof(buf), &have);
    unsigned long long want = atomic_load(&docs_in);
    for (double w0 = now_s(); now_s() - w0 < 10;) {
        usleep(50000);
        unsigned long long cur = atomic_load(&docs_in);
        if (cur == want)
            break;
        want = cur;
    }
    return got / el;
}

/* ---- relay load ---- */

static void *relay_pub_main(void *arg)
{
    int fd = *(int *)arg;
    char frame[160];
    memset(frame, 'r', sizeof(frame));
    memcpy(frame, "r:", 2);
    frame[128] = '\0';
    double next = now_s();
    while (!atomic_load(&quit) && opt.relay_rate > 0) {
        send_ns(fd, frame);
        next += 1.0 / opt.relay_rate;
        double d = next - now_s();
        if (d > 0)
            usleep((useconds_t)(d * 1e6));
    }
    return NULL;
}

static void *relay_sub_main(void *arg)
{
    int fd = *(int *)arg;
    char buf[64 << 10];
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (!atomic_load(&quit)) {
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r <= 0)
            break;
        atomic_fetch_add(&relay_in, (unsigned long long)r);
    }
    return NULL;
}

static void usage(void)
{
    printf("usage: raisebench [--evhub PATH] [--seconds S] [--workers N] [--batch N]\n"
           "                  [--rounds N] [--relay-rate FRAMES_PER_S] [--plain-batch 1..64]\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {{"evhub", required_argument, NULL, 'e'},
                                       {"seconds", required_argument, NULL, 's'},
                                       {"workers", required_argument, NULL, 'w'},
                                       {"batch", required_argument, NULL, 'b'},
                                       {"rounds", required_argument, NULL, 'r'},
                                       {"relay-rate", required_argument, NULL, 'R'},
                                       {"plain-batch", required_argument, NULL, 'p'},
                                       {"help", no_argument, NULL, 'h'},
                                       {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "e:s:w:b:r:R:p:h", lo, NULL)) != -1) {
        switch (c) {
        case 'e':
            opt.evhub = optarg;
            break;
        case 's':
            opt.seconds = atof(optarg);
            break;
        case 'w':
            opt.workers = atoi(optarg);
            break;
        case 'b':
            opt.batch = atoi(optarg);
            break;
        case 'r':
            opt.rounds = atoi(optarg);
            break;
        case 'R':
            opt.relay_rate = atoi(optarg);
            break;
        case 'p':
            opt.plain_batch = atoi(optarg);
            break;
        case 'h':
            usage();
            return 0;
        default:
            usage();
            return 2;
        }
    }
    if (!opt.evhub)
        opt.evhub = getenv("EVHUB_BIN") ? getenv("EVHUB_BIN") : "build/evhub";
    if (opt.rounds < 1 || opt.rounds > MAX_ROUNDS || opt.batch < 1 || opt.seconds <= 0 ||
        opt.plain_batch < 1 || opt.plain_batch > 64)
        die("bad --rounds (1..%d), --batch, --seconds or --plain-batch (1..64)", MAX_ROUNDS);
    signal(SIGPIPE, SIG_IGN);
    memset(pad, 'x', PAD_LEN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t al = sizeof(a);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 16) < 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &al) < 0)
        die("receiver: %s", strerror(errno));
    int rport = ntohs(a.sin_port);
    pthread_t rt, pt, st;
    pthread_create(&rt, NULL, receiver_main, &lfd);

    hub_start(rport);
    char buf[256];
    size_t have = 0;
    int sub = tcp_connect(hub_port), pub = tcp_connect(hub_port), drv = tcp_connect(hub_port);
    send_ns(sub, "sub");
    if (wait_frame(sub, "ok", buf, sizeof(buf), &have) < 0)
        die("relay subscriber: no answer; see %s", logpath);
    pthread_create(&st, NULL, relay_sub_main, &sub);
    pthread_create(&pt, NULL, relay_pub_main, &pub);

    double plain[MAX_ROUNDS], hubr[MAX_ROUNDS], sp = 0, sh = 0;
    char sample[192];
    int dl = make_doc(sample, sizeof(sample), 123456);
    printf("raisebench: evhub=%s workers=%d seconds=%.1f batch=%d relay=%d frames/s "
           "document=%d bytes plain-batch=%d\n",
           opt.evhub, opt.workers, opt.seconds, opt.batch, opt.relay_rate, dl, opt.plain_batch);
    printf("  %-6s %16s %16s %7s\n", "round", "plain C docs/s", "evhub raise/s", "ratio");
    for (int r = 0; r < opt.rounds; r++) {
        plain[r] = plain_round(rport);
        hubr[r] = hub_round(drv);
        sp += plain[r];
        sh += hubr[r];
        printf("  %-6d %16.0f %16.0f %7.2f\n", r + 1, plain[r], hubr[r], hubr[r] / plain[r]);
        fflush(stdout);
    }
    unsigned long long relayed = atomic_load(&relay_in);
    printf("  %-6s %16.0f %16.0f %7.2f\n", "mean", sp / opt.rounds, sh / opt.rounds, sh / sp);
    printf("  relayed to the subscriber meanwhile: %llu bytes\n", relayed);
    atomic_store(&quit, 1);
    pthread_join(pt, NULL);
    pthread_join(st, NULL);
    hub_stop();
    pthread_join(rt, NULL);
    close(sub);
    close(pub);
    close(drv);
    close(lfd);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "raisebench: could not remove %s\n", dir);
    return 0;
}
