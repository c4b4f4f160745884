/* evhub configuration: an INI file parsed by libinih, each section a table of rows that carry
 * their own defaults; the core's sections and those of the modules share one engine. */
#ifndef HUB_CONFIG_H
#define HUB_CONFIG_H

#include <stddef.h>

#define HUB_OUTBUF_CLOSE   0 /* a full write queue closes the slow consumer (default) */
#define HUB_OUTBUF_DROP    1 /* a full write queue drops the new frame and counts it */
#define HUB_UNICAST_FIRST  0 /* first connection with the tag, in connect order (Kamailio) */
#define HUB_UNICAST_RROBIN 1 /* rotate over the connections with the tag */

#define HUB_PATH_MAX 1024
/* The longest line of a config file, in bytes, its '\n' excluded (a '\r' before it counts):
 * libinih's buffer (INI_MAX_LINE, 200 in Debian's build) less the '\n' and the NUL. A longer
 * line is an error naming it ("file:line: line is too long (max 198 characters)"), never cut. */
#define HUB_CONF_LINE_MAX 198
/* The longest section name, the text between '[' and ']' (for [name:INSTANCE], all of
 * "name:INSTANCE"), in bytes: libinih's (MAX_SECTION 50, less the NUL). A longer one is an error
 * naming its line ("section name is too long (max 49 bytes)"), never cut. */
#define HUB_CONF_SECTION_MAX 49
/* The longest INSTANCE in [name:INSTANCE] (letters, digits, '_' and '-'): what is left of
 * HUB_CONF_SECTION_MAX after "name:", i.e. 48 - strlen(name) bytes (43 for [kafka:...]). This
 * bound is that of a one-letter name, and the size of hub_conf_instance.name. */
#define HUB_CONF_INSTANCE_MAX (HUB_CONF_SECTION_MAX - 2)

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
    HUB_CONF_STRING,   /* char[size]: any text that fits (a longer one is an error) */
    HUB_CONF_LIST,     /* hub_conf_list: the key may repeat; each value is kept, in order.
                        * No default (def must be NULL); module sections only. A LIST row
                        * whose name ends with '.' ("g.") is a prefix: it collects every key
                        * of the section that starts with it and has more after it, each item
                        * kept as "KEY=VALUE" with the whole key (a library's own properties,
                        * checked by the module). */
} hub_conf_kind;

/* One key of a section: where it is stored in the section's struct, how it is parsed, and
 * its default written as it would be in the file (NULL: zero / empty), parsed by the same
 * code as the file. A key given twice is an error, except a LIST, which appends. */
typedef struct hub_conf_row {
    const char *name; /* NULL ends a table */
    hub_conf_kind kind;
    size_t off;  /* offsetof(struct, field) */
    size_t size; /* sizeof the field (checked against the kind when a file is loaded) */
    long long min, max;
    const char *const *choices; /* ENUM: NULL-terminated, index = stored value */
    const char *def;
} hub_conf_row;

/* A row of a table for struct type: HUB_CONF_ROW(kafka_conf, "brokers", HUB_CONF_STRING,
 * brokers, 0, 0, NULL, "localhost:9092"). */
#define HUB_CONF_ROW(type, key, kind_, field, lo, hi, choices_, def_)                              \
    {                                                                                              \
        .name = (key), .kind = (kind_), .off = offsetof(type, field),                              \
        .size = sizeof(((type *)0)->field), .min = (lo), .max = (hi), .choices = (choices_),       \
        .def = (def_)                                                                              \
    }

/* A repeated key's values, each with the line it came from (for file:line errors). value is
 * owned by the config (hub_strndup'd; freed by hub_config_free). */
typedef struct hub_conf_item {
    char *value;
    int line;
} hub_conf_item;
typedef struct hub_conf_list {
    hub_conf_item *items;
    size_t n;
} hub_conf_list;

/* A section a module owns: [name], and with named set also [name:INSTANCE] (each its own
 * instance, built from the rows' defaults). name holds no ':', ']' or blank, and has at most
 * HUB_CONF_SECTION_MAX bytes (2 fewer when named, to leave room for ":INSTANCE"). */
typedef struct hub_conf_section {
    const char *name; /* NULL ends a table */
    int named;
    size_t size; /* bytes of one instance's struct */
    const hub_conf_row *rows;
} hub_conf_section;

/* One instance of a module's section as read from the file. Owned by the hub_config whose
 * modules list holds it (hub_config_free). */
typedef struct hub_conf_instance {
    struct hub_conf_instance *next;
    const hub_conf_section *section;
    char name[HUB_CONF_INSTANCE_MAX + 1]; /* "" for [name], INSTANCE for [name:INSTANCE] */
    /* The file read, for "file:line: reason" errors: the instance's own copy, because the
     * hub_config is copied by value into the hub and the loader's copy may be gone. */
    char *file;
    int line;   /* of the section's first header */
    void *data; /* section->size bytes, the row types at their offsets */
} hub_conf_instance;

/* Fill data (section->size bytes) with the rows' defaults, as the loader does for a section
 * present with no keys: for a module whose section is absent from the file. LIST rows have no
 * default, so nothing is allocated. 0, or -EINVAL with err set (a bad row or def). */
int hub_conf_defaults(const hub_conf_section *section, void *data, char *err, size_t errlen);
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
    size_t sndbuf;            /* SO_SNDBUF asked for each client (the kernel doubles it);
                               * 0 = the kernel's auto-tuning (up to 4 MiB); default 256 KiB */
    int outbuf_policy;        /* HUB_OUTBUF_*; default close */
    int unicast_policy;       /* HUB_UNICAST_*; default first */
    char event_callback[128]; /* KEMI callback name; empty = native evapi.on() */
    long wait_idle;           /* microseconds; default 500000 */
    int wait_increase;        /* default 3 */
    int worker_queue;         /* frames queued per worker before reading pauses; default 4096 */
    size_t worker_calls;      /* payload bytes a worker's script has handed to the loop and
                               * not yet carried out; over it a call fails (ENOBUFS); 64 MiB */
    int shutdown_timeout;     /* ms to flush write queues on SIGTERM; default 5000 */
    int frame_timeout;        /* ms a started inbound frame may take; 0 = off; default 30000 */
    int idle_timeout;         /* ms without a complete inbound frame; 0 = off; default 0 */
    /* [lua] */
    char script[HUB_PATH_MAX]; /* resolved against the config file's directory */
    long max_instructions;     /* per callback; 0 = unlimited; default 100000000 */
    size_t max_memory;         /* per lua_State in bytes; 0 = unlimited; default 0 */
    int lua_restrict;          /* 1: withhold io, os.execute/exit/..., debug; default 0 */
    /* [control] */
    char control_socket[108]; /* unix socket path ("" = none); default /run/evhub/evhub.sock */
    char control_tcp[64];     /* loopback "host:port" ("" = none); default "" */
    /* [log] */
    int log_level;  /* HUB_LOG_*; default info */
    int log_syslog; /* default 0 */
    /* Modules' sections, in file order. Owned: hub_config_free. Copying the struct (as
     * hub_new does) moves this ownership with it; free exactly one of the copies. */
    hub_conf_instance *modules;
    char file[HUB_PATH_MAX]; /* the file last loaded ("" if none), for "file:line" errors */
} hub_config;

/* Zero c and apply the core rows' defaults. It does not free: call hub_config_free first on
 * a config that holds module instances. */
void hub_config_defaults(hub_config *c);
/* Parse path over the current values of the core's sections; the module instances become
 * this file's (the previous ones are freed). Returns 0, or -EINVAL / -ENOENT / -ENOMEM with
 * err set to "file:line: reason" (line 0 when the file cannot be read); c is then unchanged.
 * The sections are the core's and those of hub_modules (defined in module.c, so that a
 * program without modules links config.c alone). */
int hub_config_load(hub_config *c, const char *path, char *err, size_t errlen);
/* As hub_config_load with the core's sections only; every other section is skipped unread
 * (evhubctl, which knows no module, reads [control] from the hub's file this way). */
int hub_config_load_core(hub_config *c, const char *path, char *err, size_t errlen);
/* As hub_config_load, with sections (a NULL-terminated array of tables, each ending with a
 * NULL name) instead of the modules' (for tests). */
int hub_config_load_sections(hub_config *c, const char *path,
                             const hub_conf_section *const *sections, char *err, size_t errlen);
/* Free the module instances and their lists; the core's values stay. NULL-safe, and safe to
 * call twice. */
void hub_config_free(hub_config *c);
/* Set one key of a core section as if read from the file (used for command-line overrides).
 * Returns 0 or -EINVAL with err set to the reason; c is then unchanged. */
int hub_config_set(hub_config *c, const char *section, const char *key, const char *value,
                   char *err, size_t errlen);
/* Split "host:port" / "[v6]:port" into host and port. Returns 0 or -EINVAL. */
int hub_config_split_addr(const char *addr, char *host, size_t hostlen, char *port, size_t portlen);

#endif
