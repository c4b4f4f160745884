/* evhub configuration: an INI file parsed with libinih, every key with a default. */
#ifndef HUB_CONFIG_H
#define HUB_CONFIG_H

#include <stddef.h>

#define HUB_OUTBUF_CLOSE   0 /* a full write queue closes the slow consumer (default) */
#define HUB_OUTBUF_DROP    1 /* a full write queue drops the new frame and counts it */
#define HUB_UNICAST_FIRST  0 /* first connection with the tag, in connect order (Kamailio) */
#define HUB_UNICAST_RROBIN 1 /* rotate over the connections with the tag */

#define HUB_PATH_MAX 1024

struct hub_config;

/* ---- config sections (the engine is config.c's; rows carry their defaults) ---- */

typedef enum hub_conf_kind {
    HUB_CONF_INT,      /* int, decimal, within [min, max] */
    HUB_CONF_LONG,     /* long, decimal, within [min, max] */
    HUB_CONF_SIZE,     /* size_t, bytes with an optional k/m/g suffix, within [min, max] */
    HUB_CONF_BOOL,     /* int 0/1 from yes/no, true/false, on/off, 1/0 */
    HUB_CONF_ENUM,     /* int: the index of the value in choices (any number of choices) */
    HUB_CONF_ADDR,     /* char[size]: "host:port" or "[v6]:port" */
    HUB_CONF_LOOPBACK, /* char[size]: as ADDR with a numeric loopback host, or empty */
    HUB_CONF_IDENT,    /* char[size]: a Lua identifier, or empty */
    HUB_CONF_PATH,     /* char[size]: relative paths resolved against the file's directory */
    HUB_CONF_LEVEL,    /* int: a hub_log_level_parse() name */
    HUB_CONF_STRING,   /* char[size]: any text that fits */
    HUB_CONF_LIST,     /* hub_conf_list: the key may repeat; each value is kept, in order */
} hub_conf_kind;

/* One key of a section: where it is stored in the section's struct, how it is parsed, and
 * its default written as it would be in the file (NULL: zero / empty). */
typedef struct hub_conf_row {
    const char *name; /* NULL ends a table */
    hub_conf_kind kind;
    size_t off;  /* offsetof(struct, field) */
    size_t size; /* sizeof the field, for strings */
    long long min, max;
    const char *const *choices; /* ENUM: NULL-terminated, index = stored value */
    const char *def;
} hub_conf_row;

/* A repeated key's values, each with the line it came from (for file:line errors). */
typedef struct hub_conf_item {
    char *value;
    int line;
} hub_conf_item;
typedef struct hub_conf_list {
    hub_conf_item *items;
    size_t n;
} hub_conf_list;

/* A section a module owns: [name], and with named set also [name:INSTANCE] (each its own
 * instance, built from the rows' defaults). */
typedef struct hub_conf_section {
    const char *name;
    int named;
    size_t size; /* bytes of one instance's struct */
    const hub_conf_row *rows;
} hub_conf_section;

/* One instance of a module's section as read from the file. */
typedef struct hub_conf_instance {
    struct hub_conf_instance *next;
    const hub_conf_section *section;
    char name[64]; /* "" for [name], INSTANCE for [name:INSTANCE] */
    const char *file;
    int line;   /* of the section header, 0 if built from defaults only */
    void *data; /* section->size bytes, the row types at their offsets */
} hub_conf_instance;

/* The instances of section, in file order (NULL past the end; prev NULL for the first).
 * A section absent from the file has no instance. */
const hub_conf_instance *hub_conf_next(const struct hub_config *cfg, const char *section,
                                       const hub_conf_instance *prev);

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
    /* modules' sections, in file order (owned: hub_config_free) */
    hub_conf_instance *modules;
    char file[HUB_PATH_MAX]; /* the file read, for "file:line" in modules' errors */
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
