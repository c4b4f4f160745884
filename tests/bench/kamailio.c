/* kamailio.c: Kamailio 5.6's evapi as evbench's reference hub (see kamailio.h).
 *
 * Kamailio runs in the foreground (-DD -E) on a private temp dir that holds the cfg, the Lua
 * script, its log and its runtime dir (-Y), like tests/integration/test_kamailio_compat.py
 * runs it. It forks about seven processes; they all stay in the process group of the main one,
 * which is what kam_stop() waits for and, as a last resort, kills. evbench's own SIGINT/SIGTERM
 * handler kills the group too, and PR_SET_PDEATHSIG stops the main process if evbench dies.
 *
 * workers = 0: in 5.6.3 evapi's worker processes never run the script (evapi_run_worker() is
 * a loop around sleep(3)); the dispatcher process reads each client, runs the KEMI callback
 * inline (so set_tag always runs there) and writes every relay to the clients itself, with
 * blocking writes. Any `workers` value gives that same data path, comparable to evhub's
 * workers=0; 0 just leaves out a process that would only sleep. */
#define _GNU_SOURCE
#include "util.h"
#include "kamailio.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KAM_START_MS 20000
#define KAM_STOP_MS  10000
#define KAM_GROUP_MS 5000 /* for the children, once the main process has exited */
#define KAM_TRIES    3    /* a port picked free can be taken before Kamailio binds it */
#define KAM_MAX_PROC 64

/* evapi with the bench's script as event_callback, nothing else. Kamailio insists on a SIP
 * listener: one UDP socket, never sent to. -m 32 (shm) holds the relays in flight: at most
 * evbench's window of 16 KiB frames (2 MiB). */
static const char kam_cfg_fmt[] = "#!KAMAILIO\n"
                                  "# written by evbench for one run, removed afterwards\n"
                                  "debug=2\n"
                                  "log_stderror=yes\n"
                                  "children=1\n"
                                  "auto_aliases=no\n"
                                  "listen=udp:127.0.0.1:%d\n"
                                  "loadmodule \"evapi.so\"\n"
                                  "loadmodule \"app_lua.so\"\n"
                                  "modparam(\"evapi\", \"bind_addr\", \"127.0.0.1:%d\")\n"
                                  "modparam(\"evapi\", \"workers\", 0)\n"
                                  "modparam(\"evapi\", \"max_clients\", %d)\n"
                                  "modparam(\"evapi\", \"netstring_format\", 1)\n"
                                  "modparam(\"evapi\", \"event_callback\", \"ksr_evapi_event\")\n"
                                  "modparam(\"app_lua\", \"load\", \"%s\")\n"
                                  "cfgengine \"lua\"\n";

/* A port on 127.0.0.1 that nobody holds right now (type: SOCK_STREAM or SOCK_DGRAM), or -1. */
static int free_port(int type)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0), port = -1;
    if (fd < 0)
        return -1;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* The live (not zombie) processes of group pgid: up to max pids into pids (may be NULL), and
 * the sum of their CPU ticks into *ticks (may be NULL). Returns how many there are. */
static int group_scan(pid_t pgid, pid_t *pids, int max, long *ticks)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;
    if (ticks)
        *ticks = 0;
    if (!d)
        return 0;
    while ((e = readdir(d))) {
        char state;
        pid_t pg;
        long t;
        pid_t pid = (pid_t)atoi(e->d_name);
        if (pid <= 0 || bench_proc_stat(pid, &state, &pg, &t) < 0 || pg != pgid || state == 'Z')
            continue;
        if (pids && n < max)
            pids[n] = pid;
        if (ticks)
            *ticks += t;
        n++;
    }
    closedir(d);
    return n;
}

/* The inode of the socket listening on 127.0.0.1:port (/proc/net/tcp), or 0. */
static unsigned long listen_inode(int port)
{
    char line[512];
    unsigned long inode = 0;
    FILE *f = fopen("/proc/net/tcp", "r");
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned int addr, lport, st;
        unsigned long ino;
        if (sscanf(line, " %*d: %8X:%4X %*X:%*X %2X %*X:%*X %*X:%*X %*X %*d %*d %lu", &addr, &lport,
                   &st, &ino) != 4)
            continue; /* the header line */
        if (addr == htonl(INADDR_LOOPBACK) && lport == (unsigned int)port && st == 0x0A) {
            inode = ino;
            break;
        }
    }
    fclose(f);
    return inode;
}

/* 1 if a process of group pgid holds the socket with this inode. */
static int group_owns_socket(pid_t pgid, unsigned long inode)
{
    pid_t pids[KAM_MAX_PROC];
    char want[64];
    int n = group_scan(pgid, pids, KAM_MAX_PROC, NULL);
    snprintf(want, sizeof(want), "socket:[%lu]", inode);
    for (int i = 0; i < n && i < KAM_MAX_PROC; i++) {
        char path[64], link[64];
        snprintf(path, sizeof(path), "/proc/%d/fd", (int)pids[i]);
        DIR *d = opendir(path);
        struct dirent *e;
        if (!d)
            continue;
        while ((e = readdir(d))) {
            char fdpath[320];
            snprintf(fdpath, sizeof(fdpath), "%s/%s", path, e->d_name);
            ssize_t len = readlink(fdpath, link, sizeof(link) - 1);
            if (len <= 0)
                continue;
            link[len] = '\0';
            if (strcmp(link, want) == 0) {
                closedir(d);
                return 1;
            }
        }
        closedir(d);
    }
    return 0;
}

/* 1 if the log holds needle. */
static int log_has(const struct kam *k, const char *needle)
{
    char line[1024];
    int found = 0;
    FILE *f = fopen(k->log, "r");
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof(line), f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

int kam_version(const char *bin, char *buf, size_t len)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "'%s' -v 2>/dev/null", bin);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    int ok = fgets(buf, (int)len, p) != NULL;
    while (ok && fgetc(p) != EOF) { /* drain: no SIGPIPE for the child */
    }
    if (pclose(p) != 0 || !ok)
        return -1;
    size_t n = strcspn(buf, "\r\n");
    while (n > 0 && buf[n - 1] == ' ')
        n--;
    buf[n] = '\0';
    return 0;
}

/* Everything in the group gone, or SIGKILL after KAM_GROUP_MS. The main process must have
 * been reaped already. */
static void group_finish(pid_t pgid)
{
    for (int i = 0; group_scan(pgid, NULL, 0, NULL) > 0; i++) {
        if (i == KAM_GROUP_MS / 10) {
            fprintf(stderr, "evbench: processes of kamailio group %d left, killing them\n",
                    (int)pgid);
            kill(-pgid, SIGKILL);
        }
        if (i > KAM_GROUP_MS / 10 * 2) {
            fprintf(stderr, "evbench: kamailio group %d does not die\n", (int)pgid);
            break;
        }
        bench_sleep_ms(10);
    }
}

/* One start on fresh ports. Returns 0 when evapi listens; -EADDRINUSE if Kamailio could not
 * bind (try other ports), -1 otherwise; on failure the group is gone. */
static int start_once(struct kam *k, const char *bin, int max_clients)
{
    char cfg[2048];
    int sip_port = free_port(SOCK_DGRAM), status;
    pid_t parent = getpid();

    k->port = free_port(SOCK_STREAM);
    if (k->port <= 0 || sip_port <= 0) {
        fprintf(stderr, "evbench: no free port for kamailio: %s\n", strerror(errno));
        return -1;
    }
    snprintf(cfg, sizeof(cfg), kam_cfg_fmt, sip_port, k->port, max_clients, k->script);
    if (bench_write_file(k->cfg, cfg) < 0) {
        fprintf(stderr, "evbench: cannot write %s\n", k->cfg);
        return -1;
    }
    k->pid = fork();
    if (k->pid < 0) {
        fprintf(stderr, "evbench: fork: %s\n", strerror(errno));
        k->pid = 0;
        return -1;
    }
    if (k->pid == 0) {
        /* its own process group: kill(-pgid) then reaches every process it forks */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        int in = open("/dev/null", O_RDONLY), fd = open(k->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (in >= 0 && dup2(in, 0) >= 0 && in > 2)
            close(in);
        if (fd >= 0 && dup2(fd, 1) >= 0 && dup2(fd, 2) >= 0 && fd > 2)
            close(fd);
        if (chdir(k->dir) < 0)
            _exit(127);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        execl(bin, bin, "-f", k->cfg, "-DD", "-E", "-Y", k->dir, "-m", "32", "-M", "4",
              (char *)NULL);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    setpgid(k->pid, k->pid); /* as the child does: no window where the group does not exist */

    for (int i = 0; i < KAM_START_MS / 20; i++) {
        unsigned long inode = listen_inode(k->port);
        if (inode && group_owns_socket(k->pid, inode))
            return 0;
        if (waitpid(k->pid, &status, WNOHANG) == k->pid) {
            pid_t pgid = k->pid;
            k->pid = 0;
            group_finish(pgid);
            if (log_has(k, "cannot bind") || log_has(k, "Address already in use"))
                return -EADDRINUSE;
            if (WIFSIGNALED(status))
                fprintf(stderr, "evbench: kamailio died at start-up (signal %d)\n",
                        WTERMSIG(status));
            else
                fprintf(stderr, "evbench: kamailio exited at start-up (exit code %d)\n",
                        WEXITSTATUS(status));
            return -1;
        }
        bench_sleep_ms(20);
    }
    fprintf(stderr, "evbench: kamailio did not listen on 127.0.0.1:%d within %d ms\n", k->port,
            KAM_START_MS);
    return -1;
}

/* Removes the files in dir (Kamailio may leave some in its runtime dir), then dir. */
static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d)
        return;
    while ((e = readdir(d))) {
        char path[600];
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

/* Stops the group (see kam_stop) without touching the temp dir; returns the wait status. */
static int stop_group(struct kam *k)
{
    int status = -1;
    if (k->pid <= 0)
        return -1;
    pid_t pgid = k->pid;
    kill(k->pid, SIGTERM);
    for (int i = 0;; i++) {
        if (waitpid(k->pid, &status, WNOHANG) == k->pid)
            break;
        if (i == KAM_STOP_MS / 10) {
            fprintf(stderr, "evbench: kamailio %d did not stop, killing its group\n", (int)k->pid);
            kill(-pgid, SIGKILL);
            waitpid(k->pid, &status, 0);
            break;
        }
        bench_sleep_ms(10);
    }
    k->pid = 0;
    group_finish(pgid);
    return status;
}

int kam_start(struct kam *k, const char *bin, const char *lua_script, int max_clients)
{
    int rc = -1;
    memset(k, 0, sizeof(*k));
    snprintf(k->dir, sizeof(k->dir), "/tmp/evbench-kamailio.XXXXXX");
    if (!mkdtemp(k->dir)) {
        fprintf(stderr, "evbench: mkdtemp: %s\n", strerror(errno));
        k->dir[0] = '\0';
        return -1;
    }
    snprintf(k->cfg, sizeof(k->cfg), "%s/kamailio.cfg", k->dir);
    snprintf(k->script, sizeof(k->script), "%s/bench.lua", k->dir);
    snprintf(k->log, sizeof(k->log), "%s/kamailio.log", k->dir);
    if (bench_write_file(k->script, lua_script) < 0) {
        fprintf(stderr, "evbench: cannot write %s\n", k->script);
    } else {
        for (int i = 0; i < KAM_TRIES; i++) {
            rc = start_once(k, bin, max_clients);
            if (rc != -EADDRINUSE)
                break;
        }
    }
    if (rc == 0)
        return 0;
    if (access(k->log, R_OK) == 0)
        bench_log_tail(k->log);
    stop_group(k);
    remove_dir(k->dir);
    k->dir[0] = '\0';
    return -1;
}

int kam_stop(struct kam *k)
{
    int status = -1;
    if (k->pid > 0) {
        status = stop_group(k);
        if (status != 0)
            bench_log_tail(k->log);
    }
    if (k->dir[0])
        remove_dir(k->dir);
    k->dir[0] = '\0';
    return status;
}

long kam_cpu_ticks(const struct kam *k)
{
    long ticks;
    if (k->pid <= 0 || group_scan(k->pid, NULL, 0, &ticks) == 0)
        return -1;
    return ticks;
}
