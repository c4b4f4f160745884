/* kamailio.h: Kamailio 5.6's evapi as evbench's reference hub: started, measured, stopped. */
#ifndef EVBENCH_KAMAILIO_H
#define EVBENCH_KAMAILIO_H

#include <stddef.h>
#include <sys/types.h>

#define KAM_DEFAULT_BIN "/usr/sbin/kamailio"

struct kam {
    pid_t pid;     /* the main process, also the id of its process group; 0 when not running */
    int port;      /* evapi's TCP port on 127.0.0.1 */
    char dir[256]; /* private temp dir: cfg, Lua script, log, and the -Y runtime dir */
    char cfg[300];
    char script[300];
    char log[300];
};

/* The first line of `bin -v` into buf. Returns 0, or -1 if bin did not run. */
int kam_version(const char *bin, char *buf, size_t len);
/* Writes a cfg (evapi + app_lua, event_callback ksr_evapi_event, max_clients) and lua_script
 * (KEMI dialect) into a fresh temp dir and starts bin in the foreground in its own process
 * group, on ports picked free; returns 0 once evapi listens. On failure returns -1, having said
 * why on stderr, left nothing running and removed the temp dir. */
int kam_start(struct kam *k, const char *bin, const char *lua_script, int max_clients);
/* SIGTERM to the main process (it stops its children), SIGKILL to the whole group if anything
 * is left after a timeout, then removes the temp dir. Returns the main process's wait status
 * (0: clean), or -1. Safe on a stopped or zeroed struct. */
int kam_stop(struct kam *k);
/* utime + stime of every process in the group, in clock ticks, or -1. */
long kam_cpu_ticks(const struct kam *k);

#endif
