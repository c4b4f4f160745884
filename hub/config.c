/* INI configuration: defaults, strict per-key parsing, and file loading via libinih. */
#include "hub/config.h"

#include "hub/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* How a key's value is parsed and stored. */
enum key_kind {
    K_INT,      /* int, decimal, within [min, max] */
    K_LONG,     /* long, decimal, within [min, max] */
    K_SIZE,     /* size_t, bytes with an optional k/m/g suffix, within [min, max] */
    K_BOOL,     /* int 0/1 from yes/no, true/false, on/off, 1/0 */
    K_ENUM,     /* int: the index of the value in choices */
    K_ADDR,     /* char[size]: "host:port" or "[v6]:port" */
    K_LOOPBACK, /* char[size]: as K_ADDR with a numeric loopback host, or empty */
    K_IDENT,    /* char[size]: a Lua identifier, or empty */
    K_PATH,     /* char[size]: relative paths resolved against the config file's directory */
    K_LEVEL,    /* int: a hub_log_level_parse() name */
};

typedef struct key_spec {
    const char *section;
    const char *name;
    enum key_kind kind;
    size_t off;  /* offsetof(hub_config, field) */
    size_t size; /* sizeof the field, for strings */
    long long min, max;
    const char *const *choices; /* K_ENUM: NULL-terminated, index = stored value */
} key_spec;

/* Reasons shared by several keys; each is prefixed with "key: 'value' ". */
#define MSG_BOOL  "is not a boolean (yes/no, true/false, on/off, 1/0)"
#define MSG_LEVEL "must be crit, err, warn, notice, info or debug"
#define MSG_SIZE  "is not a size (bytes, or a number with k, m or g)"
#define MSG_ADDR  "is not host:port or [v6]:port with a port in 0..65535"

static const char *const outbuf_choices[] = {"close", "drop", NULL};
static const char *const unicast_choices[] = {"first", "round_robin", NULL};

#define GiB (1024LL * 1024 * 1024)
#define KEY(sec, key, kind, field, lo, hi, choices)                                                \
    {                                                                                              \
        sec, key, kind, offsetof(hub_config, field), sizeof(((hub_config *)0)->field), lo, hi,     \
            choices                                                                                \
    }
#define NUM(sec, key, kind, field, lo, hi) KEY(sec, key, kind, field, lo, hi, NULL)
#define STR(sec, key, kind, field)         KEY(sec, key, kind, field, 0, 0, NULL)
#define ENUM(sec, key, field, choices)     KEY(sec, key, K_ENUM, field, 0, 0, choices)

static const key_spec keys[] = {
    STR("evapi", "bind_addr", K_ADDR, bind_addr),
    NUM("evapi", "backlog", K_INT, backlog, 1, 65535),
    NUM("evapi", "workers", K_INT, workers, 0, 64),
    NUM("evapi", "netstring_format", K_INT, netstring_format, 0, 1),
    NUM("evapi", "max_clients", K_INT, max_clients, 1, 1000000),
    NUM("evapi", "max_frame_size", K_SIZE, max_frame_size, 1, GiB),
    NUM("evapi", "max_outbuf", K_SIZE, max_outbuf, 1024, GiB),
    ENUM("evapi", "outbuf_policy", outbuf_policy, outbuf_choices),
    ENUM("evapi", "unicast", unicast_policy, unicast_choices),
    STR("evapi", "event_callback", K_IDENT, event_callback),
    NUM("evapi", "wait_idle", K_LONG, wait_idle, 1, 60000000),
    NUM("evapi", "wait_increase", K_INT, wait_increase, 1, 100),
    NUM("evapi", "worker_queue", K_INT, worker_queue, 1, 10000000),
    NUM("evapi", "shutdown_timeout", K_INT, shutdown_timeout, 0, 600000),
    STR("lua", "script", K_PATH, script),
    NUM("lua", "max_instructions", K_LONG, max_instructions, 0, LONG_MAX),
    NUM("lua", "max_memory", K_SIZE, max_memory, 0, LLONG_MAX),
    STR("control", "socket", K_PATH, control_socket),
    STR("control", "tcp", K_LOOPBACK, control_tcp),
    STR("log", "level", K_LEVEL, log_level),
    NUM("log", "syslog", K_BOOL, log_syslog, 0, 1),
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

void hub_config_defaults(hub_config *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->bind_addr, sizeof(c->bind_addr), "%s", "127.0.0.1:8448");
    c->backlog = 128;
    c->workers = 1;
    c->netstring_format = 1;
    c->max_clients = 1024;
    c->max_frame_size = 1024 * 1024;
    c->max_outbuf = 8 * 1024 * 1024;
    c->outbuf_policy = HUB_OUTBUF_CLOSE;
    c->unicast_policy = HUB_UNICAST_FIRST;
    c->wait_idle = 500000;
    c->wait_increase = 3;
    c->worker_queue = 4096;
    c->shutdown_timeout = 5000;
    c->max_instructions = 100000000;
    c->max_memory = 0;
    snprintf(c->control_socket, sizeof(c->control_socket), "%s", "/run/evhub/evhub.sock");
    c->log_level = HUB_LOG_INFO;
    c->log_syslog = 0;
}

static int set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (err && errlen) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

/* ---- strict scalar parsers: 0, -EINVAL for junk, -ERANGE for overflow ---------------- */

/* Decimal digits only (no sign, no spaces) into *out. */
static int parse_digits(const char **sp, unsigned long long *out)
{
    const char *s = *sp;
    unsigned long long v = 0;
    if (*s < '0' || *s > '9')
        return -EINVAL;
    for (size_t i = 0; i < 64 && *s >= '0' && *s <= '9'; i++, s++) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (ULLONG_MAX - d) / 10)
            return -ERANGE;
        v = v * 10 + d;
    }
    if (*s >= '0' && *s <= '9')
        return -ERANGE; /* more than 64 digits */
    *sp = s;
    *out = v;
    return 0;
}

static int parse_ll(const char *s, long long *out)
{
    int neg = *s == '-';
    unsigned long long v;
    s += neg;
    int rc = parse_digits(&s, &v);
    if (rc < 0)
        return rc;
    if (*s != '\0')
        return -EINVAL;
    if (v > (unsigned long long)LLONG_MAX + (unsigned)neg)
        return -ERANGE;
    /* Written so that LLONG_MIN does not overflow on the way. */
    *out = !neg ? (long long)v : v == 0 ? 0 : -(long long)(v - 1) - 1;
    return 0;
}

/* Bytes, or a number followed by one of k/K, m/M, g/G (KiB, MiB, GiB). */
static int parse_size(const char *s, long long *out)
{
    unsigned long long v, mult = 1;
    int rc = parse_digits(&s, &v);
    if (rc < 0)
        return rc;
    switch (*s) {
    case '\0':
        break;
    case 'k':
    case 'K':
        mult = 1024;
        break;
    case 'm':
    case 'M':
        mult = 1024 * 1024;
        break;
    case 'g':
    case 'G':
        mult = 1024 * 1024 * 1024;
        break;
    default:
        return -EINVAL;
    }
    if (*s != '\0' && s[1] != '\0')
        return -EINVAL;
    if (v > (unsigned long long)LLONG_MAX / mult)
        return -ERANGE;
    *out = (long long)(v * mult);
    return 0;
}

static int parse_bool(const char *s)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (strcasecmp(s, yes[i]) == 0)
            return 1;
        if (strcasecmp(s, no[i]) == 0)
            return 0;
    }
    return -EINVAL;
}

static int is_lua_ident(const char *s)
{
    static const char *const reserved[] = {
        "and",      "break",  "do",   "else", "elseif", "end",   "false", "for",
        "function", "goto",   "if",   "in",   "local",  "nil",   "not",   "or",
        "repeat",   "return", "then", "true", "until",  "while",
    };
    size_t n = strlen(s);
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        int alpha = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
        if (!alpha && (i == 0 || ch < '0' || ch > '9'))
            return 0;
    }
    for (size_t i = 0; i < sizeof(reserved) / sizeof(reserved[0]); i++) {
        if (strcmp(s, reserved[i]) == 0)
            return 0;
    }
    return n > 0;
}

int hub_config_split_addr(const char *addr, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *h = addr, *colon;
    size_t hlen;
    if (addr[0] == '[') {
        /* "[v6]:port": the brackets keep the address's own colons out of the split. */
        const char *rb = strchr(addr, ']');
        if (!rb || rb[1] != ':')
            return -EINVAL;
        h = addr + 1;
        hlen = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        /* A bare host with a second colon is an unbracketed IPv6 literal: ambiguous. */
        colon = strchr(addr, ':');
        if (!colon || strchr(colon + 1, ':'))
            return -EINVAL;
        hlen = (size_t)(colon - addr);
    }
    const char *p = colon + 1;
    size_t plen = strlen(p);
    long long pn;
    if (hlen == 0 || hlen >= hostlen || plen == 0 || plen >= portlen)
        return -EINVAL;
    if (memchr(h, '[', hlen) || memchr(h, ']', hlen))
        return -EINVAL;
    /* Port 0 asks the kernel for an ephemeral port: the tests bind 127.0.0.1:0. */
    if (p[0] == '-' || parse_ll(p, &pn) < 0 || pn < 0 || pn > 65535)
        return -EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    memcpy(port, p, plen + 1);
    return 0;
}

static int is_loopback_host(const char *host)
{
    unsigned char a[16];
    if (inet_pton(AF_INET, host, a) == 1)
        return a[0] == 127;
    return inet_pton(AF_INET6, host, a) == 1 && IN6_IS_ADDR_LOOPBACK((struct in6_addr *)a);
}

/* ---- one key ------------------------------------------------------------------------ */

static const key_spec *find_key(const char *section, const char *name)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
            return &keys[i];
    }
    return NULL;
}

static int section_known(const char *section)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(keys[i].section, section) == 0)
            return 1;
    }
    return 0;
}

/* Index of v in a NULL-terminated list, or -1. */
static int find_choice(const char *const *choices, const char *v)
{
    for (int i = 0; i < 8 && choices[i]; i++) {
        if (strcmp(choices[i], v) == 0)
            return i;
    }
    return -1;
}

/* K_INT, K_LONG, K_SIZE, K_BOOL, K_ENUM, K_LEVEL: parse to a number, range-check, store. */
static int set_number(hub_config *c, const key_spec *k, const char *v, char *err, size_t errlen)
{
    char *field = (char *)c + k->off;
    long long n = 0;
    int rc = 0;
    if (k->kind == K_BOOL) {
        if ((n = parse_bool(v)) < 0)
            return set_err(err, errlen, "%s: '%.64s' " MSG_BOOL, k->name, v);
    } else if (k->kind == K_LEVEL) {
        if ((n = hub_log_level_parse(v)) < 0)
            return set_err(err, errlen, "%s: '%.64s' " MSG_LEVEL, k->name, v);
    } else if (k->kind == K_ENUM) {
        if ((n = find_choice(k->choices, v)) < 0)
            return set_err(err, errlen, "%s: '%.64s' must be %s or %s", k->name, v, k->choices[0],
                           k->choices[1]);
    } else {
        rc = k->kind == K_SIZE ? parse_size(v, &n) : parse_ll(v, &n);
        if (rc == -EINVAL)
            return set_err(err, errlen, "%s: '%.64s' %s", k->name, v,
                           k->kind == K_SIZE ? MSG_SIZE : "is not an integer");
        if (rc == -ERANGE || n < k->min || n > k->max)
            return set_err(err, errlen, "%s: '%.64s' is out of range %lld..%lld", k->name, v,
                           k->min, k->max);
    }
    if (k->kind == K_LONG)
        *(long *)field = (long)n;
    else if (k->kind == K_SIZE)
        *(size_t *)field = (size_t)n;
    else
        *(int *)field = (int)n;
    return 0;
}

/* K_ADDR, K_IDENT, K_PATH: validate and copy. base is prepended to relative paths. */
static int set_string(hub_config *c, const key_spec *k, const char *v, const char *base, char *err,
                      size_t errlen)
{
    char *field = (char *)c + k->off;
    char host[256], port[16];
    if (strlen(v) >= k->size)
        return set_err(err, errlen, "%s: value is too long (max %zu bytes)", k->name, k->size - 1);
    if ((k->kind == K_ADDR || (k->kind == K_LOOPBACK && v[0])) &&
        hub_config_split_addr(v, host, sizeof(host), port, sizeof(port)) < 0)
        return set_err(err, errlen, "%s: '%.64s' " MSG_ADDR, k->name, v);
    if (k->kind == K_LOOPBACK && v[0] && !is_loopback_host(host))
        return set_err(err, errlen,
                       "%s: '%.64s' is not a numeric loopback address (127.x.x.x or [::1]); the "
                       "control socket has no authentication",
                       k->name, v);
    if (k->kind == K_IDENT && v[0] && !is_lua_ident(v))
        return set_err(err, errlen, "%s: '%.64s' is not a Lua identifier", k->name, v);
    if (k->kind != K_PATH || !base || !base[0] || v[0] == '/' || v[0] == '\0')
        base = "";
    int n = snprintf(field, k->size, "%s%s", base, v);
    if (n < 0 || (size_t)n >= k->size) {
        field[0] = '\0';
        return set_err(err, errlen, "%s: path is too long (max %zu bytes)", k->name, k->size - 1);
    }
    return 0;
}

/* The shared per-key entry point of the file loader and command-line overrides. */
static int apply(hub_config *c, const char *section, const char *name, const char *value,
                 const char *base, char *err, size_t errlen)
{
    const key_spec *k = find_key(section, name);
    if (!k) {
        if (section[0] == '\0')
            return set_err(err, errlen, "key '%.64s' is outside any section", name);
        if (!section_known(section))
            return set_err(err, errlen, "unknown section [%.64s] (not supported by this build)",
                           section);
        return set_err(err, errlen, "unknown key '%.64s' in section [%s]", name, section);
    }
    if (!value)
        return set_err(err, errlen, "%s: missing value", name);
    switch (k->kind) {
    case K_ADDR:
    case K_LOOPBACK:
    case K_IDENT:
    case K_PATH:
        return set_string(c, k, value, base, err, errlen);
    default:
        return set_number(c, k, value, err, errlen);
    }
}

int hub_config_set(hub_config *c, const char *section, const char *key, const char *value,
                   char *err, size_t errlen)
{
    /* Validate into a copy so that a rejected value leaves c untouched. */
    hub_config tmp = *c;
    int rc = apply(&tmp, section, key, value, NULL, err, errlen);
    if (rc == 0)
        *c = tmp;
    return rc;
}

/* ---- the file ------------------------------------------------------------------------- */

/* inih numbers the lines it reads, and a line longer than its buffer is read in several pieces
 * and miscounted; it also only reports the first error's line, not its reason. So we read the
 * lines ourselves, count physical lines, and record the first error with its own line. */
typedef struct load_ctx {
    hub_config *c;
    FILE *f;
    int lineno;     /* physical line of the text last read */
    int reads;      /* reader calls that returned text: inih's own line count */
    int at_bol;     /* the next read starts a new physical line */
    int indented;   /* the current physical line starts with a blank */
    int read_errno; /* errno of a failed read, 0 if none */
    int err_reads;  /* inih's line count at the first recorded error, 0 = none */
    int err_line;   /* physical line of the first recorded error */
    char prev_section[64];
    char prev_name[64];
    char base[HUB_PATH_MAX]; /* the config file's directory with a trailing '/', or "" */
    char reason[256];
} load_ctx;

static void record(load_ctx *x, const char *reason)
{
    if (x->err_reads)
        return;
    x->err_reads = x->reads;
    x->err_line = x->lineno;
    snprintf(x->reason, sizeof(x->reason), "%s", reason);
}

static char *count_reader(char *str, int num, void *stream)
{
    load_ctx *x = stream;
    if (!fgets(str, num, x->f)) {
        if (ferror(x->f))
            x->read_errno = errno ? errno : EIO;
        return NULL;
    }
    size_t n = strlen(str);
    x->reads++;
    if (x->at_bol) {
        x->lineno++;
        x->indented = str[0] == ' ' || str[0] == '\t';
        /* inih forgets the previous key at a section header; so do we. */
        if (str[strspn(str, " \t")] == '[')
            x->prev_name[0] = '\0';
        /* A piece that fills the buffer without a newline (and is not the last) is cut. */
        if (n == (size_t)num - 1 && str[n - 1] != '\n') {
            int next = getc(x->f);
            if (next != EOF) {
                ungetc(next, x->f);
                char msg[64];
                snprintf(msg, sizeof(msg), "line is too long (max %d characters)", num - 2);
                record(x, msg);
            }
        }
    }
    x->at_bol = n > 0 && str[n - 1] == '\n';
    return str;
}

static int load_handler(void *user, const char *section, const char *name, const char *value)
{
    load_ctx *x = user;
    char reason[256];
    if (!name)
        name = ""; /* inih built to announce each new section: nothing to set yet */
    /* inih reads an indented line after a key as more of that key's value (multi-line values);
     * refuse that rather than silently mangle an indented config. */
    if (x->indented && strcmp(section, x->prev_section) == 0 && strcmp(name, x->prev_name) == 0) {
        snprintf(reason, sizeof(reason),
                 "indented line continues the value of '%.64s'; remove the indentation", name);
        record(x, reason);
        return 0;
    }
    snprintf(x->prev_section, sizeof(x->prev_section), "%s", section);
    snprintf(x->prev_name, sizeof(x->prev_name), "%s", name);
    if (!name[0] && section_known(section))
        return 1;
    if (apply(x->c, section, name, value, x->base, reason, sizeof(reason)) < 0) {
        record(x, reason);
        return 0;
    }
    return 1;
}

/* The directory part of path, with its trailing '/', or "" when path has none. */
static int dir_of(const char *path, char *out, size_t outlen)
{
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) + 1 : 0;
    if (n >= outlen)
        return -ENAMETOOLONG;
    memcpy(out, path, n);
    out[n] = '\0';
    return 0;
}

int hub_config_load(hub_config *c, const char *path, char *err, size_t errlen)
{
    load_ctx ctx = {0}, *x = &ctx;
    /* Parse into a copy so that a file with an error leaves c untouched. */
    hub_config tmp = *c;
    x->c = &tmp;
    x->at_bol = 1;
    if (dir_of(path, x->base, sizeof(x->base)) < 0) {
        set_err(err, errlen, "%s:0: path is too long", path);
        return -ENAMETOOLONG;
    }
    x->f = fopen(path, "r");
    if (!x->f) {
        int e = errno;
        set_err(err, errlen, "%s:0: cannot open: %s", path, strerror(e));
        return -e;
    }
    int rc = ini_parse_stream(count_reader, x, load_handler, x);
    fclose(x->f);
    if (x->read_errno) {
        set_err(err, errlen, "%s:0: cannot read: %s", path, strerror(x->read_errno));
        return -x->read_errno;
    }
    if (rc < 0) {
        set_err(err, errlen, "%s:0: out of memory", path);
        return -ENOMEM;
    }
    /* inih reports the first bad line; it is a syntax error unless we recorded it ourselves.
     * Up to our first error, inih's count and ours agree (only a long line splits them). */
    if (rc > 0 && (!x->err_reads || rc < x->err_reads))
        return set_err(err, errlen, "%s:%d: syntax error (expected [section] or key = value)", path,
                       rc);
    if (x->err_reads)
        return set_err(err, errlen, "%s:%d: %s", path, x->err_line, x->reason);
    *c = tmp;
    return 0;
}
