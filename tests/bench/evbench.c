/* evbench: a load generator that starts its own evhub processes (one per variant), drives
 * them over loopback TCP with netstrings and prints one table per workload.
 *
 *   A  fanout   4 publishers flood 128 B frames, 16 subscribers tagged "subs" get each one
 *   B  paced    the same topology at a fixed total rate (--rate): latency percentiles
 *   C  16 KiB   1 publisher, 4 subscribers, 16 KiB frames: deliveries/s and MB/s
 *   D  idle     --idle-conns idle connections: evhub RSS growth per connection
 *
 * Variants, side by side: native workers=0 (the baseline row), KEMI workers=0, native
 * workers=1, native workers=2, and for A, B and C a reference row: Kamailio 5.6's evapi
 * running the KEMI script (--kamailio, see kamailio.c). Publishers embed a CLOCK_MONOTONIC
 * timestamp in each payload; subscribers compute the delay. Publishers stop sending while
 * subscribers lag more than --window messages behind, so A and C measure the hub, not an
 * ever-growing queue. The reference row never changes evbench's exit status. */
#define _GNU_SOURCE
#include "util.h"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kamailio.h"

#define MAX_PUB          8
#define MAX_SUB          32
#define HDR_LEN          24 /* payload header: ts (8), publisher (8), seq (8) */
#define MASK56           ((UINT64_C(1) << 56) - 1)
#define READ_CHUNK       (256 * 1024)
#define HUB_START_MS     20000
#define HUB_STOP_MS      30000
#define PER_SRC_IP       1000 /* idle connections per source address: port search stays short */
#define CONNECT_INFLIGHT 512
#define KAM_MAX_CLIENTS  (MAX_PUB + MAX_SUB + 8) /* evapi's default is 8 */

struct options {
    const char *evhub;
    const char *kamailio; /* NULL: no reference row, kam_missing says why */
    double seconds;
    double rate;
    char only;
    long idle_conns;
    int window;
    const char *bare; /* --bare: compare with this forwarder, in rounds */
    int rounds;
    int pin;           /* hub on CPU 0, evbench on CPU 1 */
    const char *evapi; /* --evapi LINE: added to evhub's [evapi] section */
};

static struct options opt = {
    "./build/evhub", NULL, 5.0, 20000.0, 0, 100000, 1024, NULL, 3, 0, NULL};

static char kam_missing[512] = "not looked for";
static char kam_ver[128];

/* The hub being measured, killed if evbench itself is interrupted: an evhub pid, or minus
 * Kamailio's process group id. */
static volatile sig_atomic_t current_hub;

static void on_signal(int sig)
{
    if (current_hub != 0)
        kill((pid_t)current_hub, SIGKILL);
    _exit(128 + sig);
}

struct variant {
    const char *name;
    int kemi;
    int workers;
    int kamailio; /* the reference row: Kamailio runs kemi_script, not evhub */
    int bare;     /* the bare forwarder (--bare), not evhub */
};

static const struct variant variants[] = {
    {"native workers=0", 0, 0, 0, 0},   /* the baseline row */
    {"kemi   workers=0", 1, 0, 0, 0},   /* kemi_script on evhub */
    {"native workers=1", 0, 1, 0, 0},   /* [evapi] workers = 1 */
    {"native workers=2", 0, 2, 0, 0},   /* [evapi] workers = 2 */
    {"kamailio 5.6 evapi", 1, 0, 1, 0}, /* the reference row: kemi_script on Kamailio; A, B, C */
};
#define NVARIANTS ((int)(sizeof(variants) / sizeof(variants[0])))

/* --bare: the baseline first, then evhub running each script with workers = 0. */
static const struct variant bare_variants[] = {
    {"bare forwarder", 0, 0, 0, 1},
    {"evhub kemi w=0", 1, 0, 0, 0},
    {"evhub native w=0", 0, 0, 0, 0},
};
#define NBARE ((int)(sizeof(bare_variants) / sizeof(bare_variants[0])))

static const char native_script[] = "-- evbench fan-out script (native dialect)\n"
                                    "evapi.on(\"message\", function(conn, msg)\n"
                                    "    if msg == \"sub\" then\n"
                                    "        conn:set_tag(\"subs\")\n"
                                    "        evapi.multicast(\"ok\", \"subs\")\n"
                                    "    else\n"
                                    "        evapi.multicast(msg, \"subs\")\n"
                                    "    end\n"
                                    "end)\n";

static const char kemi_script[] = "-- evbench fan-out script (Kamailio KEMI dialect)\n"
                                  "function ksr_evapi_event(evname)\n"
                                  "\tif evname == \"evapi:message-received\" then\n"
                                  "\t\tlocal msg = KSR.pv.get(\"$evapi(msg)\");\n"
                                  "\t\tif msg == \"sub\" then\n"
                                  "\t\t\tKSR.evapi.set_tag(\"subs\");\n"
                                  "\t\t\tKSR.evapi.relay_multicast(\"ok\", \"subs\");\n"
                                  "\t\telse\n"
                                  "\t\t\tKSR.evapi.relay_multicast(msg, \"subs\");\n"
                                  "\t\tend\n"
                                  "\tend\n"
                                  "\treturn 1;\n"
                                  "end\n";

/* ------------------------------------------------------------------------------------------ */
/* small helpers */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "evbench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n, sz);
    if (!p)
        die("out of memory");
    return p;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* A blocking TCP connection to 127.0.0.1:port with TCP_NODELAY, or -1. */
static int tcp_connect(int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        return -1;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads fd (blocking, up to timeout_ms) until the netstring "2:ok," has been seen. Earlier
 * frames are skipped. Returns 0 or -1. */
static int wait_ok(int fd, int timeout_ms)
{
    char buf[4096];
    size_t have = 0;
    uint64_t deadline = mono_ns() + (uint64_t)timeout_ms * 1000000u;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int64_t left = (int64_t)(deadline - mono_ns()) / 1000000;
        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            return -1;
        ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (n <= 0)
            return -1;
        have += (size_t)n;
        buf[have] = '\0';
        if (strstr(buf, "2:ok,"))
            return 0;
        if (have > sizeof(buf) / 2) { /* keep the tail: the marker may straddle */
            memmove(buf, buf + have - 8, 8);
            have = 8;
        }
    }
}

static int subscribe(int fd)
{
    return write_all(fd, "3:sub,", 6) < 0 ? -1 : wait_ok(fd, HUB_START_MS);
}

/* ------------------------------------------------------------------------------------------ */
/* latency histogram: exact below 64 ns, then 64 sub-buckets per power of two (~1.6 %) */

#define H_SUB     64
#define H_BUCKETS (H_SUB + 58 * H_SUB)

struct hist {
    uint64_t n;
    uint64_t max;
    uint64_t b[H_BUCKETS];
};

static void hist_add(struct hist *h, uint64_t v)
{
    size_t i;
    if (v < H_SUB) {
        i = (size_t)v;
    } else {
        int e = 63 - __builtin_clzll(v);
        i = H_SUB + (size_t)(e - 6) * H_SUB + (size_t)((v >> (e - 6)) - H_SUB);
    }
    h->b[i]++;
    h->n++;
    if (v > h->max)
        h->max = v;
}

static uint64_t hist_bucket_mid(size_t i)
{
    if (i < H_SUB)
        return i;
    size_t e = (i - H_SUB) / H_SUB + 6, sub = (i - H_SUB) % H_SUB;
    uint64_t lo = (uint64_t)(H_SUB + sub) << (e - 6);
    return lo + ((1ull << (e - 6)) >> 1);
}

/* The value at quantile q (0..1), in ns; 0 when empty. */
static uint64_t hist_quantile(const struct hist *h, double q)
{
    if (h->n == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)h->n + 0.5), seen = 0;
    if (rank < 1)
        rank = 1;
    for (size_t i = 0; i < H_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= rank)
            return hist_bucket_mid(i);
    }
    return h->max;
}

/* ------------------------------------------------------------------------------------------ */
/* evhub processes */

struct hub {
    pid_t pid;
    int port;
    struct kam kam; /* the reference variant; pid and port are then Kamailio's */
    char dir[256];
    char conf[300];
    char script[300];
    char log[300];
};

/* Reads the log for "listening on HOST:PORT"; returns the port, 0 if not yet, -1 on error. */
static int hub_find_port(const struct hub *h)
{
    char buf[16384];
    FILE *f = fopen(h->log, "r");
    int port = 0;
    if (!f)
        return 0;
    while (fgets(buf, sizeof(buf), f)) {
        char *p = strstr(buf, "listening on ");
        if (!p)
            continue;
        p += strlen("listening on ");
        char *end = p + strcspn(p, " \t\r\n,;");
        *end = '\0';
        char *colon = strrchr(p, ':');
        port = colon ? atoi(colon + 1) : -1;
        break;
    }
    fclose(f);
    return port;
}

static int hub_stop(struct hub *h);

/* CPU seconds used by this process (all threads). */
static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* --pin: the calling thread (and what it forks or creates later) on one CPU. */
static void pin_cpu(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        fprintf(stderr, "evbench: cannot pin to CPU %d: %s\n", cpu, strerror(errno));
}

/* Writes config and script into a fresh temp dir and starts evhub (Kamailio for the reference
 * variant); waits for the port. */
static int hub_start(struct hub *h, const struct variant *v, const char *extra_evapi)
{
    char conf[2048];
    memset(h, 0, sizeof(*h));
    if (v->kamailio) {
        if (kam_start(&h->kam, opt.kamailio, kemi_script, KAM_MAX_CLIENTS) < 0) {
            /* not again for every workload: the reference row is then missing */
            snprintf(kam_missing, sizeof(kam_missing), "%s did not start (see stderr)",
                     opt.kamailio);
            opt.kamailio = NULL;
            return -1;
        }
        h->pid = h->kam.pid;
        h->port = h->kam.port;
        current_hub = -h->pid;
        return 0;
    }
    snprintf(h->dir, sizeof(h->dir), "/tmp/evbench.XXXXXX");
    if (!mkdtemp(h->dir))
        die("mkdtemp: %s", strerror(errno));
    snprintf(h->log, sizeof(h->log), "%s/evhub.log", h->dir);
    if (v->bare)
        goto spawn;
    snprintf(h->conf, sizeof(h->conf), "%s/evhub.conf", h->dir);
    snprintf(h->script, sizeof(h->script), "%s/bench.lua", h->dir);
    snprintf(conf, sizeof(conf),
             "[evapi]\nbind_addr = 127.0.0.1:0\nworkers = %d\nmax_outbuf = 64m\n"
             "event_callback = %s\n%s\n%s\n[lua]\nscript = bench.lua\n[log]\nlevel = info\n"
             "[control]\nsocket = ctl.sock\n",
             v->workers, v->kemi ? "ksr_evapi_event" : "", extra_evapi ? extra_evapi : "",
             opt.evapi ? opt.evapi : "");
    if (bench_write_file(h->conf, conf) < 0 ||
        bench_write_file(h->script, v->kemi ? kemi_script : native_script) < 0)
        die("cannot write into %s", h->dir);
spawn:
    h->pid = fork();
    if (h->pid < 0)
        die("fork: %s", strerror(errno));
    if (h->pid == 0) {
        int fd = open(h->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        if (opt.pin)
            pin_cpu(0);
        if (v->bare)
            execl(opt.bare, opt.bare, "127.0.0.1", "0", (char *)NULL);
        else
            execl(opt.evhub, opt.evhub, "-c", h->conf, "-f", (char *)NULL);
        fprintf(stderr, "exec %s: %s\n", v->bare ? opt.bare : opt.evhub, strerror(errno));
        _exit(127);
    }
    current_hub = h->pid;
    for (int i = 0; i < HUB_START_MS / 10; i++) {
        int status;
        h->port = hub_find_port(h);
        if (h->port != 0)
            break;
        if (waitpid(h->pid, &status, WNOHANG) == h->pid) {
            h->pid = 0;
            current_hub = 0;
            break;
        }
        bench_sleep_ms(10);
    }
    if (h->port <= 0) {
        fprintf(stderr, "evbench: %s did not start\n", v->name);
        hub_stop(h);
        return -1;
    }
    return 0;
}

/* SIGTERM, wait (then SIGKILL), remove the temp dir. Returns the exit status or -1. */
static int hub_stop(struct hub *h)
{
    int status = -1;
    if (h->kam.dir[0]) {
        status = kam_stop(&h->kam);
        h->pid = 0;
        current_hub = 0;
        return status;
    }
    if (h->pid > 0) {
        kill(h->pid, SIGTERM);
        for (int i = 0; i < HUB_STOP_MS / 10; i++) {
            if (waitpid(h->pid, &status, WNOHANG) == h->pid)
                break;
            bench_sleep_ms(10);
            if (i == HUB_STOP_MS / 10 - 1) {
                fprintf(stderr, "evbench: evhub %d did not stop, killing it\n", (int)h->pid);
                kill(h->pid, SIGKILL);
                waitpid(h->pid, &status, 0);
            }
        }
        h->pid = 0;
        current_hub = 0;
    }
    if (status != 0)
        bench_log_tail(h->log);
    if (h->conf[0])
        unlink(h->conf);
    if (h->script[0])
        unlink(h->script);
    unlink(h->log);
    rmdir(h->dir);
    return status;
}

static long proc_rss_kb(pid_t pid)
{
    char path[64], line[256];
    long kb = -1;
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

/* The hub's CPU time in clock ticks (all of Kamailio's processes), or -1. */
static long hub_cpu_ticks(const struct hub *h)
{
    long ticks;
    if (h->kam.pid > 0)
        return kam_cpu_ticks(&h->kam);
    return bench_proc_stat(h->pid, NULL, NULL, &ticks) == 0 ? ticks : -1;
}

static const char *hub_kind(const struct variant *v)
{
    return v->kamailio ? "kamailio" : v->bare ? "bareforward" : "evhub";
}

/* ------------------------------------------------------------------------------------------ */
/* workloads A, B, C: publishers and subscribers */

struct pubconn {
    int fd;
    char *wbuf;
    size_t wlen, woff, wcap;
    uint64_t seq;
};

struct subconn {
    int fd;
    char *rbuf;
    size_t rlen;
    uint64_t last_seq[MAX_PUB];
};

struct flow {
    int npub, nsub;
    size_t msg_size;
    double rate;  /* 0: flood with the window */
    int window;   /* messages in flight (sent - delivered/nsub) */
    int batch;    /* messages per write */
    int nul_free; /* header fields as put56(): Kamailio's relay stops at a NUL byte */
    struct pubconn pub[MAX_PUB];
    struct subconn sub[MAX_SUB];
    _Atomic uint64_t sent, delivered, payload_bytes;
    _Atomic uint64_t lost; /* deliveries that never came: gaps in a publisher's seq */
    _Atomic int stop, measuring, sub_done;
    uint64_t errors; /* out-of-order or malformed frames seen by subscribers */
    struct hist hist;
};

struct result {
    int ok;
    double deliveries_s, mb_s, sent_s, cpu_pct, self_cpu_pct;
    uint64_t p50, p99, p999, max, samples, errors;
    double rss_per_conn, connect_s;
    double hub_cpu_s;      /* the hub's CPU seconds while measuring */
    uint64_t measured_del; /* deliveries while measuring */
    long rss0, rss1;
    uint64_t lost; /* of the errors: deliveries missing from a publisher's seq */
};

/* v's low 56 bits, 7 per byte with the high bit set: no NUL byte (nor digit, ':' or ','). */
static void put56(char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (char)(0x80 | ((v >> (7 * i)) & 0x7f));
}

static uint64_t get56(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)((unsigned char)p[i] & 0x7f) << (7 * i);
    return v;
}

static void pub_fill(struct flow *fl, int pi, int nmsg, uint64_t now)
{
    struct pubconn *p = &fl->pub[pi];
    char hdr[32];
    int hl = snprintf(hdr, sizeof(hdr), "%zu:", fl->msg_size);
    size_t frame = (size_t)hl + fl->msg_size + 1;
    p->wlen = p->woff = 0;
    for (int k = 0; k < nmsg; k++) {
        char *f = p->wbuf + p->wlen;
        uint64_t who = (uint64_t)pi;
        memcpy(f, hdr, (size_t)hl);
        if (fl->nul_free) {
            put56(f + hl, now);
            put56(f + hl + 8, who);
            put56(f + hl + 16, p->seq);
        } else {
            memcpy(f + hl, &now, 8);
            memcpy(f + hl + 8, &who, 8);
            memcpy(f + hl + 16, &p->seq, 8);
        }
        /* filler bytes stay as written at allocation */
        f[hl + fl->msg_size] = ',';
        p->wlen += frame;
        p->seq++;
    }
}

static void *pub_main(void *arg)
{
    struct flow *fl = arg;
    char hdr[32];
    size_t frame = (size_t)snprintf(hdr, sizeof(hdr), "%zu:", fl->msg_size) + fl->msg_size + 1;
    uint64_t t0 = mono_ns();
    uint64_t paced_sent[MAX_PUB] = {0};

    for (int i = 0; i < fl->npub; i++) {
        struct pubconn *p = &fl->pub[i];
        p->wcap = frame * (size_t)fl->batch;
        p->wbuf = xcalloc(1, p->wcap);
        memset(p->wbuf, 'x', p->wcap);
    }
    uint64_t drain_deadline = 0;
    for (;;) {
        int progressed = 0, blocked = 0, pending = 0;
        struct pollfd pfd[MAX_PUB];
        uint64_t now = mono_ns();
        /* On stop, finish the buffers already filled (their messages are counted as sent). */
        if (!drain_deadline && atomic_load_explicit(&fl->stop, memory_order_relaxed))
            drain_deadline = now + 2000000000u;
        if (drain_deadline && now > drain_deadline)
            break;
        for (int i = 0; i < fl->npub; i++) {
            struct pubconn *p = &fl->pub[i];
            if (p->woff == p->wlen && !drain_deadline) {
                int64_t k;
                if (fl->rate > 0) {
                    double due = (double)(now - t0) / 1e9 * fl->rate / fl->npub;
                    k = (int64_t)due - (int64_t)paced_sent[i];
                } else {
                    uint64_t sent = atomic_load_explicit(&fl->sent, memory_order_relaxed);
                    /* a frame the hub lost is no longer in flight (Kamailio drops some) */
                    uint64_t del = atomic_load_explicit(&fl->delivered, memory_order_relaxed) +
                                   atomic_load_explicit(&fl->lost, memory_order_relaxed);
                    k = (int64_t)fl->window - ((int64_t)sent - (int64_t)(del / fl->nsub));
                }
                if (k > fl->batch)
                    k = fl->batch;
                if (k > 0) {
                    pub_fill(fl, i, (int)k, now);
                    paced_sent[i] += (uint64_t)k;
                    atomic_fetch_add_explicit(&fl->sent, (uint64_t)k, memory_order_relaxed);
                }
            }
            if (p->woff < p->wlen) {
                ssize_t n = write(p->fd, p->wbuf + p->woff, p->wlen - p->woff);
                if (n > 0) {
                    p->woff += (size_t)n;
                    progressed = 1;
                } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                    fprintf(stderr, "evbench: publisher write: %s\n", strerror(errno));
                    atomic_store(&fl->stop, 1);
                    p->wlen = p->woff; /* lost */
                    continue;
                }
                if (p->woff < p->wlen) {
                    pfd[blocked++] = (struct pollfd){.fd = p->fd, .events = POLLOUT};
                    pending = 1;
                }
            }
        }
        if (drain_deadline && !pending)
            break;
        if (progressed)
            continue;
        if (blocked)
            poll(pfd, (nfds_t)blocked, 1);
        else {
            struct timespec ts = {0, fl->rate > 0 ? 200000 : 50000};
            nanosleep(&ts, NULL);
        }
    }
    for (int i = 0; i < fl->npub; i++) {
        struct pubconn *p = &fl->pub[i];
        if (p->woff < p->wlen) /* never completed: not sent */
            atomic_fetch_sub(&fl->sent, (p->wlen - p->woff + frame - 1) / frame);
        free(p->wbuf);
    }
    return NULL;
}

/* Parses the complete frames in s->rbuf; returns the data frames handled, and adds the ones
 * that a gap in a publisher's seq shows lost to *lost. */
static uint64_t sub_parse(struct flow *fl, struct subconn *s, uint64_t now, int measuring,
                          uint64_t *lost)
{
    char *p = s->rbuf, *end = s->rbuf + s->rlen;
    uint64_t frames = 0, bytes = 0;
    for (;;) {
        size_t len = 0;
        char *q = p;
        while (q < end && *q >= '0' && *q <= '9' && q - p < 20)
            len = len * 10 + (size_t)(*q++ - '0');
        if (q >= end)
            break;
        if (*q != ':' || q == p) {
            fl->errors++;
            p = end; /* resynchronising is pointless: drop the buffer */
            break;
        }
        if ((size_t)(end - q - 1) < len + 1)
            break;
        char *pl = q + 1;
        if (pl[len] != ',')
            fl->errors++;
        if (len >= HDR_LEN) {
            uint64_t ts, who, seq;
            if (fl->nul_free) {
                ts = get56(pl);
                who = get56(pl + 8);
                seq = get56(pl + 16);
                ts = now - ((now - ts) & MASK56); /* ts's high bits back, from now */
            } else {
                memcpy(&ts, pl, 8);
                memcpy(&who, pl + 8, 8);
                memcpy(&seq, pl + 16, 8);
            }
            if (who < MAX_PUB) {
                uint64_t expect = s->last_seq[who] + 1; /* UINT64_MAX + 1: seq 0 first */
                if (seq < expect)
                    fl->errors++;
                else
                    *lost += seq - expect;
                s->last_seq[who] = seq;
            } else {
                fl->errors++;
            }
            if (measuring)
                hist_add(&fl->hist, now > ts ? now - ts : 0);
            frames++;
            bytes += len;
        }
        p = pl + len + 1;
    }
    s->rlen = (size_t)(end - p);
    if (s->rlen && p != s->rbuf)
        memmove(s->rbuf, p, s->rlen);
    atomic_fetch_add_explicit(&fl->payload_bytes, bytes, memory_order_relaxed);
    return frames;
}

static void *sub_main(void *arg)
{
    struct flow *fl = arg;
    size_t cap = READ_CHUNK + fl->msg_size + 64;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[MAX_SUB];
    uint64_t drain_deadline = 0;

    for (int i = 0; i < fl->nsub; i++) {
        struct subconn *s = &fl->sub[i];
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        s->rbuf = xcalloc(1, cap);
        for (int k = 0; k < MAX_PUB; k++)
            s->last_seq[k] = UINT64_MAX;
        epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    }
    for (;;) {
        if (atomic_load_explicit(&fl->stop, memory_order_relaxed)) {
            uint64_t now = mono_ns();
            if (!drain_deadline)
                drain_deadline = now + 5000000000u;
            uint64_t want = atomic_load(&fl->sent) * (uint64_t)fl->nsub;
            if (atomic_load(&fl->delivered) + atomic_load(&fl->lost) >= want ||
                now > drain_deadline)
                break;
        }
        int n = epoll_wait(ep, evs, MAX_SUB, 10);
        if (n <= 0)
            continue;
        uint64_t now = mono_ns();
        int measuring = atomic_load_explicit(&fl->measuring, memory_order_relaxed);
        uint64_t got = 0, lost = 0;
        for (int e = 0; e < n; e++) {
            struct subconn *s = &fl->sub[evs[e].data.u32];
            ssize_t r = read(s->fd, s->rbuf + s->rlen, cap - s->rlen);
            if (r <= 0) {
                if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    fprintf(stderr, "evbench: subscriber %u lost its connection\n",
                            evs[e].data.u32);
                    fl->errors++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                }
                continue;
            }
            s->rlen += (size_t)r;
            got += sub_parse(fl, s, now, measuring, &lost);
        }
        atomic_fetch_add_explicit(&fl->delivered, got, memory_order_relaxed);
        atomic_fetch_add_explicit(&fl->lost, lost, memory_order_relaxed);
    }
    close(ep);
    for (int i = 0; i < fl->nsub; i++)
        free(fl->sub[i].rbuf);
    atomic_store(&fl->sub_done, 1);
    return NULL;
}

static void close_flow(struct flow *fl)
{
    for (int i = 0; i < fl->npub; i++)
        if (fl->pub[i].fd >= 0)
            close(fl->pub[i].fd);
    for (int i = 0; i < fl->nsub; i++)
        if (fl->sub[i].fd >= 0)
            close(fl->sub[i].fd);
}

static int run_flow(const struct variant *v, int npub, int nsub, size_t msg_size, double rate,
                    int window, struct result *res)
{
    struct hub h;
    struct flow *fl;
    pthread_t tp, ts;
    int rc = -1;

    memset(res, 0, sizeof(*res));
    if (v->kamailio && !opt.kamailio)
        return -1; /* the table says why */
    fl = xcalloc(1, sizeof(*fl));
    fl->npub = npub;
    fl->nsub = nsub;
    fl->msg_size = msg_size;
    fl->rate = rate;
    fl->window = window;
    fl->batch = msg_size >= 4096 ? 4 : 32;
    fl->nul_free = v->kamailio; /* the same bytes on the wire, only their values differ */
    for (int i = 0; i < MAX_PUB; i++)
        fl->pub[i].fd = -1;
    for (int i = 0; i < MAX_SUB; i++)
        fl->sub[i].fd = -1;
    if (hub_start(&h, v, NULL) < 0) {
        free(fl);
        return -1;
    }
    bench_sleep_ms(100); /* the hub settles after start-up (not measured either way) */
    for (int i = 0; i < nsub; i++) {
        fl->sub[i].fd = tcp_connect(h.port);
        if (fl->sub[i].fd < 0 || subscribe(fl->sub[i].fd) < 0) {
            fprintf(stderr, "evbench: subscriber %d could not subscribe\n", i);
            goto out;
        }
        set_nonblock(fl->sub[i].fd);
    }
    for (int i = 0; i < npub; i++) {
        fl->pub[i].fd = tcp_connect(h.port);
        if (fl->pub[i].fd < 0)
            goto out;
        set_nonblock(fl->pub[i].fd);
    }
    pthread_create(&ts, NULL, sub_main, fl);
    pthread_create(&tp, NULL, pub_main, fl);

    bench_sleep_ms(500); /* warm-up: not measured */
    uint64_t d0 = atomic_load(&fl->delivered), b0 = atomic_load(&fl->payload_bytes);
    uint64_t s0 = atomic_load(&fl->sent);
    long c0 = hub_cpu_ticks(&h);
    double sc0 = self_cpu_s();
    uint64_t t0 = mono_ns();
    atomic_store(&fl->measuring, 1);
    bench_sleep_ms((long)(opt.seconds * 1000));
    atomic_store(&fl->measuring, 0);
    uint64_t t1 = mono_ns();
    long c1 = hub_cpu_ticks(&h);
    double sc1 = self_cpu_s();
    uint64_t d1 = atomic_load(&fl->delivered), b1 = atomic_load(&fl->payload_bytes);
    uint64_t s1 = atomic_load(&fl->sent);
    atomic_store(&fl->stop, 1);
    pthread_join(tp, NULL);
    pthread_join(ts, NULL);

    double el = (double)(t1 - t0) / 1e9;
    res->deliveries_s = (double)(d1 - d0) / el;
    res->mb_s = (double)(b1 - b0) / el / 1e6;
    res->sent_s = (double)(s1 - s0) / el;
    res->cpu_pct =
        c0 >= 0 && c1 >= 0 ? (double)(c1 - c0) / (double)sysconf(_SC_CLK_TCK) / el * 100 : -1;
    res->self_cpu_pct = (sc1 - sc0) / el * 100;
    res->hub_cpu_s = c0 >= 0 && c1 >= 0 ? (double)(c1 - c0) / (double)sysconf(_SC_CLK_TCK) : -1;
    res->measured_del = d1 - d0;
    res->p50 = hist_quantile(&fl->hist, 0.50);
    res->p99 = hist_quantile(&fl->hist, 0.99);
    res->p999 = hist_quantile(&fl->hist, 0.999);
    res->max = fl->hist.max;
    res->samples = fl->hist.n;
    res->errors = fl->errors;
    res->lost = atomic_load(&fl->lost);
    if (atomic_load(&fl->delivered) < atomic_load(&fl->sent) * (uint64_t)nsub)
        res->errors += atomic_load(&fl->sent) * (uint64_t)nsub - atomic_load(&fl->delivered);
    res->ok = 1;
    rc = 0;
out:
    close_flow(fl);
    if (hub_stop(&h) != 0) {
        fprintf(stderr, "evbench: %s (%s) did not exit cleanly\n", hub_kind(v), v->name);
        res->errors++;
    }
    free(fl);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* workload D: idle connections */

static int idle_socket(int vi, long idx, int port)
{
    struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        return -1;
    /* 127.(20+variant).x.y, a new address every PER_SRC_IP connections: each has its own
     * ephemeral ports, and a range per variant keeps clear of the previous variant's sockets. */
    uint32_t a = (uint32_t)(idx / PER_SRC_IP);
    src.sin_addr.s_addr =
        htonl((127u << 24) | ((uint32_t)(20 + vi) << 16) | ((a / 250) << 8) | (a % 250 + 1));
#ifdef IP_BIND_ADDRESS_NO_PORT
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
#endif
    (void)one;
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0) {
        close(fd);
        return -1;
    }
    dst.sin_port = htons((uint16_t)port);
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static void close_reset(int fd)
{
    struct linger lg = {1, 0}; /* RST: no TIME_WAIT left behind for the next variant */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

static int run_idle(int vi, struct result *res)
{
    const struct variant *v = &variants[vi];
    long n = opt.idle_conns, done = 0, failed = 0, next = 0, inflight = 0;
    int *fds = xcalloc((size_t)n, sizeof(int));
    char extra[128];
    struct hub h;
    int ep = -1, probe = -1, rc = -1;

    memset(res, 0, sizeof(*res));
    snprintf(extra, sizeof(extra), "max_clients = %ld\nbacklog = 4096\n", n + 64);
    if (hub_start(&h, v, extra) < 0) {
        free(fds);
        return -1;
    }
    probe = tcp_connect(h.port);
    if (probe < 0 || subscribe(probe) < 0) {
        fprintf(stderr, "evbench: the idle probe could not subscribe\n");
        goto out;
    }
    bench_sleep_ms(200);
    res->rss0 = proc_rss_kb(h.pid);
    ep = epoll_create1(EPOLL_CLOEXEC);
    uint64_t t0 = mono_ns(), deadline = t0 + 300000000000ull;
    while (done + failed < n && mono_ns() < deadline) {
        struct epoll_event evs[CONNECT_INFLIGHT];
        while (inflight < CONNECT_INFLIGHT && next < n) {
            int fd = idle_socket(vi, next, h.port);
            fds[next] = fd;
            if (fd < 0) {
                if (failed++ == 0)
                    fprintf(stderr, "evbench: idle connect: %s\n", strerror(errno));
            } else {
                struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)next};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                inflight++;
            }
            next++;
        }
        int k = epoll_wait(ep, evs, CONNECT_INFLIGHT, 1000);
        for (int e = 0; e < k; e++) {
            long idx = (long)evs[e].data.u64;
            int err = 0;
            socklen_t el = sizeof(err);
            getsockopt(fds[idx], SOL_SOCKET, SO_ERROR, &err, &el);
            epoll_ctl(ep, EPOLL_CTL_DEL, fds[idx], NULL);
            inflight--;
            if (err) {
                if (failed++ == 0)
                    fprintf(stderr, "evbench: idle connect: %s\n", strerror(err));
                close(fds[idx]);
                fds[idx] = -1;
            } else {
                done++;
            }
        }
    }
    res->connect_s = (double)done / ((double)(mono_ns() - t0) / 1e9);
    /* The listen queue is FIFO: once a connection made after all the others is served, the hub
     * has accepted every one of them. */
    close(probe);
    probe = tcp_connect(h.port);
    if (probe < 0 || subscribe(probe) < 0) {
        fprintf(stderr, "evbench: the hub did not serve a connection after %ld idle ones\n", done);
        goto out;
    }
    bench_sleep_ms(300);
    res->rss1 = proc_rss_kb(h.pid);
    res->rss_per_conn = done > 0 ? (double)(res->rss1 - res->rss0) * 1024.0 / (double)done : 0;
    res->errors = (uint64_t)failed + (uint64_t)(n - done - failed);
    res->samples = (uint64_t)done;
    res->ok = 1;
    rc = 0;
out:
    for (long i = 0; i < next; i++)
        if (fds[i] >= 0)
            close_reset(fds[i]);
    if (probe >= 0)
        close(probe);
    if (ep >= 0)
        close(ep);
    if (hub_stop(&h) != 0) {
        fprintf(stderr, "evbench: evhub (%s) did not exit cleanly\n", v->name);
        res->errors++;
    }
    free(fds);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* reporting */

static double us(uint64_t ns) { return (double)ns / 1000.0; }

static double ratio(double v, double base) { return base > 0 ? v / base : 0; }

static int print_flow_table(char w, const char *title, struct result *r, int paced)
{
    int bad = 0;
    printf("\n%c  %s\n", w, title);
    printf("   %-18s %12s %7s %9s %9s %9s %9s %9s %7s %7s %6s\n", "variant",
           paced ? "sent msg/s" : "deliveries/s", paced ? "" : "x base", "MB/s", "p50 us", "p99 us",
           "p99.9 us", "max us", "hub cpu", "own cpu", "errors");
    for (int i = 0; i < NVARIANTS; i++) {
        if (variants[i].kamailio && !opt.kamailio) {
            printf("   %-18s %12s  reference row missing: %s\n", variants[i].name, "-",
                   kam_missing);
            continue;
        }
        if (!r[i].ok) {
            printf("   %-18s %12s\n", variants[i].name, "FAILED");
            bad |= !variants[i].kamailio;
            continue;
        }
        char rt[16] = "";
        if (!paced)
            snprintf(rt, sizeof(rt), "%.2fx", ratio(r[i].deliveries_s, r[0].deliveries_s));
        printf("   %-18s %12.0f %7s %9.1f %9.1f %9.1f %9.1f %9.1f %6.0f%% %6.0f%% %6" PRIu64 "\n",
               variants[i].name, paced ? r[i].sent_s : r[i].deliveries_s, rt, r[i].mb_s,
               us(r[i].p50), us(r[i].p99), us(r[i].p999), us(r[i].max), r[i].cpu_pct,
               r[i].self_cpu_pct, r[i].errors);
        if (r[i].errors && !variants[i].kamailio)
            bad = 1;
    }
    if (paced) {
        printf("   p99 vs baseline:");
        for (int i = 0; i < NVARIANTS; i++) {
            if (r[i].ok)
                printf("  %s %.2fx", variants[i].name, ratio((double)r[i].p99, (double)r[0].p99));
        }
        printf("\n");
    }
    for (int i = 0; i < NVARIANTS; i++) {
        if (!r[i].ok || !r[i].lost)
            continue;
        printf("   %s: %" PRIu64 " of its errors are deliveries lost in the hub (gaps in a "
               "publisher's sequence)\n",
               variants[i].name, r[i].lost);
        if (variants[i].kamailio)
            printf("      evapi 5.6 reads at most 32 KiB at a time and drops the data that "
                   "follows a read ending inside a netstring's length prefix\n");
    }
    fflush(stdout);
    return bad;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: evbench [--evhub PATH] [--seconds S] [--rate MSG_PER_S] [--only A|B|C|D]\n"
               "               [--idle-conns N] [--window MSGS] [--kamailio PATH|none]\n"
               "               [--bare PATH [--rounds N]] [--pin] [--evapi 'KEY = VALUE']\n"
               "--kamailio: the reference row's Kamailio 5.6 (evapi + app_lua modules);\n"
               "            default " KAM_DEFAULT_BIN " if it exists, none: no reference row\n"
               "--bare:     compare with the bare forwarder at PATH instead (A, B, C): the bare\n"
               "            forwarder, evhub KEMI and native (workers = 0) run alternately,\n"
               "            --rounds times (3), each figure a ratio to the bare forwarder's\n"
               "--pin:      the hub on CPU 0, evbench on CPU 1\n"
               "--evapi:    a line added to evhub's [evapi] section (repeatable: join with \\n)\n");
}

static int want(char w) { return !opt.only || opt.only == w; }

/* ------------------------------------------------------------------------------------------ */
/* --bare: evhub against the bare forwarder, rounds alternating */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    if (n == 0)
        return 0;
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

#define MAX_ROUNDS 15

/* One workload over every bare_variants row, --rounds times alternating. Per row: the median
 * of each figure, and the median of its per-round ratios to the bare forwarder of the same
 * round (a round's ratio compares runs made seconds apart). Returns 1 on an error. */
static int bare_workload(char w, const char *title, int npub, int nsub, size_t size, double rate,
                         int window)
{
    static struct result r[MAX_ROUNDS][NBARE];
    int bad = 0, paced = rate > 0;
    for (int k = 0; k < opt.rounds; k++) {
        for (int i = 0; i < NBARE; i++) {
            if (run_flow(&bare_variants[i], npub, nsub, size, rate, window, &r[k][i]) < 0 ||
                r[k][i].errors)
                bad = 1;
        }
    }
    printf("\n%c  %s; %d rounds, medians\n", w, title, opt.rounds);
    printf("   %-17s %12s %7s %7s %8s %9s %7s %8s %8s %8s %7s %6s\n", "variant",
           paced ? "sent msg/s" : "deliveries/s", "x bare", "hub cpu", "cpu us/d", "x bare",
           "p50 us", "p99 us", "p99.9 us", "x bare", "MB/s", "errors");
    for (int i = 0; i < NBARE; i++) {
        double thr[MAX_ROUNDS], thr_x[MAX_ROUNDS], cpu[MAX_ROUNDS], cpd[MAX_ROUNDS],
            cpd_x[MAX_ROUNDS], p50[MAX_ROUNDS], p99[MAX_ROUNDS], p999[MAX_ROUNDS],
            p99_x[MAX_ROUNDS], mb[MAX_ROUNDS];
        int n = 0;
        uint64_t errors = 0;
        for (int k = 0; k < opt.rounds; k++) {
            const struct result *x = &r[k][i], *b = &r[k][0];
            errors += x->errors;
            if (!x->ok || !b->ok)
                continue;
            double cd = x->measured_del ? x->hub_cpu_s * 1e6 / (double)x->measured_del : 0;
            double bd = b->measured_del ? b->hub_cpu_s * 1e6 / (double)b->measured_del : 0;
            thr[n] = paced ? x->sent_s : x->deliveries_s;
            thr_x[n] = ratio(x->deliveries_s, b->deliveries_s);
            cpu[n] = x->cpu_pct;
            cpd[n] = cd;
            cpd_x[n] = ratio(cd, bd);
            p50[n] = us(x->p50);
            p99[n] = us(x->p99);
            p999[n] = us(x->p999);
            p99_x[n] = ratio((double)x->p99, (double)b->p99);
            mb[n] = x->mb_s;
            n++;
        }
        if (!n) {
            printf("   %-17s %12s\n", bare_variants[i].name, "FAILED");
            continue;
        }
        printf(
            "   %-17s %12.0f %6.2fx %6.0f%% %8.3f %8.2fx %7.1f %8.1f %8.1f %7.2fx %7.1f %6" PRIu64
            "\n",
            bare_variants[i].name, median(thr, n), median(thr_x, n), median(cpu, n), median(cpd, n),
            median(cpd_x, n), median(p50, n), median(p99, n), median(p999, n), median(p99_x, n),
            median(mb, n), errors);
    }
    printf("   per round (deliveries/s, hub cpu us per delivery, p99 us):");
    for (int k = 0; k < opt.rounds; k++) {
        printf("\n     round %d:", k + 1);
        for (int i = 0; i < NBARE; i++)
            printf("  %s %.0f (%.3f, %.0f)", bare_variants[i].name, r[k][i].deliveries_s,
                   r[k][i].measured_del ? r[k][i].hub_cpu_s * 1e6 / (double)r[k][i].measured_del
                                        : 0,
                   us(r[k][i].p99));
    }
    printf("\n");
    fflush(stdout);
    return bad;
}

static int bare_main(void)
{
    int bad = 0;
    printf("baseline: the bare forwarder %s; x bare = the median of each round's ratio to\n"
           "the bare forwarder's run of the same round; hub cpu = its CPU time / wall time;\n"
           "cpu us/d = its CPU microseconds per delivered frame%s\n",
           opt.bare, opt.pin ? "; hub on CPU 0, evbench on CPU 1" : "");
    if (opt.evapi)
        printf("evhub's [evapi] also has: %s\n", opt.evapi);
    fflush(stdout);
    if (want('A'))
        bad |= bare_workload('A', "fanout: 4 publishers -> 16 subscribers, 128 B, flood", 4, 16,
                             128, 0, opt.window);
    if (want('B')) {
        char title[128];
        snprintf(title, sizeof(title), "paced: 4 -> 16, 128 B, %.0f msg/s total", opt.rate);
        bad |= bare_workload('B', title, 4, 16, 128, opt.rate, opt.window);
    }
    if (want('C'))
        bad |= bare_workload('C', "16 KiB: 1 publisher -> 4 subscribers, flood", 1, 4, 16384, 0,
                             opt.window / 8 > 0 ? opt.window / 8 : 1);
    return bad;
}

static void parse_args(int argc, char **argv)
{
    static const struct option lo[] = {
        {"evhub", required_argument, NULL, 'e'},
        {"seconds", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},
        {"only", required_argument, NULL, 'o'},
        {"idle-conns", required_argument, NULL, 'i'},
        {"window", required_argument, NULL, 'w'},
        {"kamailio", required_argument, NULL, 'k'},
        {"bare", required_argument, NULL, 'b'},
        {"rounds", required_argument, NULL, 'R'},
        {"pin", no_argument, NULL, 'p'},
        {"evapi", required_argument, NULL, 'E'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *kamailio = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'e':
            opt.evhub = optarg;
            break;
        case 's':
            opt.seconds = atof(optarg);
            break;
        case 'r':
            opt.rate = atof(optarg);
            break;
        case 'o':
            opt.only = optarg[0];
            break;
        case 'i':
            opt.idle_conns = atol(optarg);
            break;
        case 'w':
            opt.window = atoi(optarg);
            break;
        case 'k':
            kamailio = optarg;
            break;
        case 'b':
            opt.bare = optarg;
            break;
        case 'R':
            opt.rounds = atoi(optarg);
            break;
        case 'p':
            opt.pin = 1;
            break;
        case 'E':
            opt.evapi = optarg;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (opt.seconds <= 0 || opt.rate <= 0 || opt.idle_conns <= 0 || opt.window <= 0 ||
        (opt.only && !strchr("ABCD", opt.only)) || optind != argc || opt.rounds < 1 ||
        opt.rounds > MAX_ROUNDS || (opt.bare && opt.only == 'D')) {
        usage(stderr);
        exit(2);
    }
    if (access(opt.evhub, X_OK) != 0)
        die("%s is not executable (use --evhub PATH)", opt.evhub);
    if (opt.bare && access(opt.bare, X_OK) != 0)
        die("%s is not executable (--bare PATH)", opt.bare);
    if (kamailio && strcmp(kamailio, "none") == 0) {
        snprintf(kam_missing, sizeof(kam_missing), "--kamailio none");
    } else if (kamailio && access(kamailio, X_OK) != 0) {
        die("%s is not executable (--kamailio PATH, or none)", kamailio);
    } else if (!kamailio && access(KAM_DEFAULT_BIN, X_OK) != 0) {
        snprintf(kam_missing, sizeof(kam_missing),
                 "%s not found (apt-get install kamailio kamailio-extra-modules "
                 "kamailio-lua-modules, or --kamailio PATH)",
                 KAM_DEFAULT_BIN);
    } else {
        opt.kamailio = kamailio ? kamailio : KAM_DEFAULT_BIN;
        if (kam_version(opt.kamailio, kam_ver, sizeof(kam_ver)) < 0)
            snprintf(kam_ver, sizeof(kam_ver), "version unknown");
    }
}

/* Raises RLIMIT_NOFILE (inherited by the evhub processes) for n idle connections. Without
 * CAP_SYS_RESOURCE the hard limit caps it: n is then lowered, and the table says so. */
static void raise_fd_limit(long *n)
{
    struct rlimit rl;
    long want = *n + 1024;
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((long)rl.rlim_cur >= want)
        return;
    struct rlimit nl = {(rlim_t)want, rl.rlim_max > (rlim_t)want ? rl.rlim_max : (rlim_t)want};
    if (setrlimit(RLIMIT_NOFILE, &nl) == 0)
        return;
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    long cap = (long)rl.rlim_max - 1024;
    if (cap < 1)
        die("RLIMIT_NOFILE is too low (%ld)", (long)rl.rlim_max);
    fprintf(stderr,
            "evbench: cannot raise RLIMIT_NOFILE to %ld (%s): --idle-conns lowered to %ld\n", want,
            strerror(errno), cap);
    printf("note: --idle-conns lowered from %ld to %ld (RLIMIT_NOFILE hard limit %ld, no "
           "CAP_SYS_RESOURCE)\n",
           *n, cap, (long)rl.rlim_max);
    *n = cap;
}

int main(int argc, char **argv)
{
    struct result r[NVARIANTS];
    int bad = 0;

    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("evbench: evhub=%s seconds=%.1f rate=%.0f idle-conns=%ld window=%d cpus=%ld\n",
           opt.evhub, opt.seconds, opt.rate, opt.idle_conns, opt.window,
           sysconf(_SC_NPROCESSORS_ONLN));
    if (opt.pin)
        pin_cpu(1); /* evbench's threads, created from here on, inherit it */
    if (opt.bare)
        return bare_main() ? 1 : 0;
    if (opt.kamailio)
        printf("reference row (A, B, C): %s (%s), evapi + app_lua, same KEMI script\n",
               opt.kamailio, kam_ver);
    else
        printf("reference row missing: %s\n", kam_missing);
    printf("baseline row: native workers=0; latency = publisher write to subscriber read;\n"
           "hub cpu = the hub's CPU time (Kamailio: all its processes) / wall time;\n"
           "own cpu = evbench's (all its threads)\n");
    if (want('D'))
        raise_fd_limit(&opt.idle_conns);
    fflush(stdout);

    if (want('A')) {
        for (int i = 0; i < NVARIANTS; i++)
            run_flow(&variants[i], 4, 16, 128, 0, opt.window, &r[i]);
        bad |= print_flow_table('A',
                                "fanout: 4 publishers -> 16 subscribers, 128 B frames, "
                                "flood (window)",
                                r, 0);
    }
    if (want('B')) {
        for (int i = 0; i < NVARIANTS; i++)
            run_flow(&variants[i], 4, 16, 128, opt.rate, opt.window, &r[i]);
        char title[128];
        snprintf(title, sizeof(title),
                 "paced: 4 publishers -> 16 subscribers, 128 B frames, %.0f msg/s total", opt.rate);
        bad |= print_flow_table('B', title, r, 1);
    }
    if (want('C')) {
        for (int i = 0; i < NVARIANTS; i++)
            run_flow(&variants[i], 1, 4, 16384, 0, opt.window / 8 > 0 ? opt.window / 8 : 1, &r[i]);
        bad |= print_flow_table('C',
                                "16 KiB: 1 publisher -> 4 subscribers, 16 KiB frames, "
                                "flood (window/8)",
                                r, 0);
    }
    if (want('D')) {
        for (int i = 0; i < NVARIANTS; i++) {
            if (!variants[i].kamailio)
                run_idle(i, &r[i]);
        }
        printf("\nD  idle: %ld connections, evhub RSS growth per connection\n", opt.idle_conns);
        printf("   %-18s %10s %10s %12s %8s %12s %7s\n", "variant", "RSS0 KiB", "RSS1 KiB",
               "bytes/conn", "x base", "connects/s", "errors");
        for (int i = 0; i < NVARIANTS; i++) {
            if (variants[i].kamailio) {
                /* evapi 5.6 mallocs max_clients slots of ~32 KiB (the read buffer) at start
                 * and scans all of them on every relay: not an idle-connection workload */
                printf("   %-18s %10s  not measured: evapi preallocates ~32 KiB per "
                       "max_clients slot\n",
                       variants[i].name, "-");
                continue;
            }
            if (!r[i].ok) {
                printf("   %-18s %10s\n", variants[i].name, "FAILED");
                bad = 1;
                continue;
            }
            printf("   %-18s %10ld %10ld %12.0f %7.2fx %12.0f %7" PRIu64 "\n", variants[i].name,
                   r[i].rss0, r[i].rss1, r[i].rss_per_conn,
                   ratio(r[i].rss_per_conn, r[0].rss_per_conn), r[i].connect_s, r[i].errors);
            if (r[i].errors)
                bad = 1;
        }
    }
    fflush(stdout);
    return bad ? 1 : 0;
}
