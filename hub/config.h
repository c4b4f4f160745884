/* evhub configuration: an INI file parsed with libinih, every key with a default. */
#ifndef HUB_CONFIG_H
#define HUB_CONFIG_H

#include <stddef.h>

#define HUB_OUTBUF_CLOSE   0 /* a full write queue closes the slow consumer (default) */
#define HUB_OUTBUF_DROP    1 /* a full write queue drops the new frame and counts it */
#define HUB_UNICAST_FIRST  0 /* first connection with the tag, in connect order (Kamailio) */
#define HUB_UNICAST_RROBIN 1 /* rotate over the connections with the tag */

#define HUB_PATH_MAX 1024

typedef struct hub_config {
    /* [evapi] */
    char bind_addr[256];      /* "host:port" or "[v6]:port"; default 127.0.0.1:8448 */
    int backlog;              /* listen(2) backlog; default 128 */
    int workers;              /* 0 = Lua in the loop thread; default 1 */
    int netstring_format;     /* 1 = netstrings both ways, 0 = raw; default 1 */
    int max_clients;          /* default 1024 */
    size_t max_frame_size;    /* inbound payload limit; default 1 MiB */
    size_t max_outbuf;        /* per-client write queue limit in bytes; default 8 MiB */
    int outbuf_policy;        /* HUB_OUTBUF_*; default close */
    int unicast_policy;       /* HUB_UNICAST_*; default first */
    char event_callback[128]; /* KEMI callback name; empty = native evapi.on() */
    long wait_idle;           /* microseconds; default 500000 */
    int wait_increase;        /* default 3 */
    int worker_queue;         /* frames queued per worker before reading pauses; default 4096 */
    int shutdown_timeout;     /* ms to flush write queues on SIGTERM; default 5000 */
    /* [lua] */
    char script[HUB_PATH_MAX]; /* resolved against the config file's directory */
    long max_instructions;     /* per callback; 0 = unlimited; default 100000000 */
    size_t max_memory;         /* per lua_State in bytes; 0 = unlimited; default 0 */
    /* [control] */
    char control_socket[108]; /* unix socket path ("" = none); default /run/evhub/evhub.sock */
    char control_tcp[64];     /* loopback "host:port" ("" = none); default "" */
    /* [log] */
    int log_level;  /* HUB_LOG_*; default info */
    int log_syslog; /* default 0 */
} hub_config;

void hub_config_defaults(hub_config *c);
/* Parse path over the current values. Returns 0, or -EINVAL / -ENOENT with err set to
 * "file:line: reason" (line 0 when the file cannot be read). */
int hub_config_load(hub_config *c, const char *path, char *err, size_t errlen);
/* Set one key as if read from the file (used for command-line overrides).
 * Returns 0 or -EINVAL with err set to the reason. */
int hub_config_set(hub_config *c, const char *section, const char *key, const char *value,
                   char *err, size_t errlen);
/* Split "host:port" / "[v6]:port" into host and port. Returns 0 or -EINVAL. */
int hub_config_split_addr(const char *addr, char *host, size_t hostlen, char *port, size_t portlen);

#endif
