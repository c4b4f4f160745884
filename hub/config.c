/* INI configuration: the core's sections as tables of rows with their defaults, strict per-key
 * parsing, the sections modules own ([name] and [name:INSTANCE]), and the file reader. */
#include "hub/config.h"

#include "hub/alloc.h"
#include "hub/core.h"
#include "hub/log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Reasons shared by several keys; each is prefixed with "key: 'value' ". */
#define MSG_BOOL   "is not a boolean (yes/no, true/false, on/off, 1/0)"
#define MSG_LEVEL  "must be crit, err, warn, notice, info or debug"
#define MSG_SIZE   "is not a size (bytes, or a number with k, m or g)"
#define MSG_ADDR   "is not host:port or [v6]:port with a port in 0..65535"
#define MSG_SYNTAX "syntax error (expected [section] or key = value)"

/* ---- the core's sections: each row carries its default, written as in the file ------------ */

static const char *const outbuf_choices[] = {"close", "drop", NULL};
static const char *const unicast_choices[] = {"first", "round_robin", NULL};

#define GiB (1024LL * 1024 * 1024)
#define ROW(key, kind, field, lo, hi, choices, def)                                                \
    HUB_CONF_ROW(hub_config, key, kind, field, lo, hi, choices, def)
#define NUM(key, kind, field, lo, hi, def) ROW(key, kind, field, lo, hi, NULL, def)
#define STR(key, kind, field, def)         ROW(key, kind, field, 0, 0, NULL, def)
#define ENUM(key, field, choices, def)     ROW(key, HUB_CONF_ENUM, field, 0, 0, choices, def)
#define END_ROWS                                                                                   \
    {                                                                                              \
        .name = NULL                                                                               \
    }

static const hub_conf_row evapi_rows[] = {
    STR("bind_addr", HUB_CONF_ADDR, bind_addr, "127.0.0.1:8448"),
    NUM("backlog", HUB_CONF_INT, backlog, 1, 65535, "128"),
    NUM("workers", HUB_CONF_INT, workers, 0, 64, "1"),
    NUM("netstring_format", HUB_CONF_INT, netstring_format, 0, 1, "1"),
    NUM("max_clients", HUB_CONF_INT, max_clients, 1, 1000000, "1024"),
    NUM("max_frame_size", HUB_CONF_SIZE, max_frame_size, 1, GiB, "1m"),
    NUM("max_outbuf", HUB_CONF_SIZE, max_outbuf, 1024, GiB, "8m"),
    ENUM("outbuf_policy", outbuf_policy, outbuf_choices, "close"),
    ENUM("unicast", unicast_policy, unicast_choices, "first"),
    STR("event_callback", HUB_CONF_IDENT, event_callback, NULL),
    NUM("wait_idle", HUB_CONF_LONG, wait_idle, 1, 60000000, "500000"),
    NUM("wait_increase", HUB_CONF_INT, wait_increase, 1, 100, "3"),
    NUM("worker_queue", HUB_CONF_INT, worker_queue, 1, 10000000, "4096"),
    NUM("shutdown_timeout", HUB_CONF_INT, shutdown_timeout, 0, 600000, "5000"),
    END_ROWS,
};

static const hub_conf_row lua_rows[] = {
    STR("script", HUB_CONF_PATH, script, NULL),
    NUM("max_instructions", HUB_CONF_LONG, max_instructions, 0, LONG_MAX, "100000000"),
    NUM("max_memory", HUB_CONF_SIZE, max_memory, 0, LLONG_MAX, "0"),
    END_ROWS,
};

static const hub_conf_row control_rows[] = {
    STR("socket", HUB_CONF_PATH, control_socket, "/run/evhub/evhub.sock"),
    STR("tcp", HUB_CONF_LOOPBACK, control_tcp, NULL),
    END_ROWS,
};

static const hub_conf_row log_rows[] = {
    STR("level", HUB_CONF_LEVEL, log_level, "info"),
    NUM("syslog", HUB_CONF_BOOL, log_syslog, 0, 1, "no"),
    END_ROWS,
};

/* Their data is the hub_config itself; they have no LIST rows, so that a hub_config copied by
 * value (hub_config_set, hub_new) never shares a list with its original. */
static const hub_conf_section core_sections[] = {
    {.name = "evapi", .size = sizeof(hub_config), .rows = evapi_rows},
    {.name = "lua", .size = sizeof(hub_config), .rows = lua_rows},
    {.name = "control", .size = sizeof(hub_config), .rows = control_rows},
    {.name = "log", .size = sizeof(hub_config), .rows = log_rows},
    {.name = NULL},
};

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

static const hub_conf_row *find_row(const hub_conf_section *s, const char *name)
{
    for (const hub_conf_row *k = s->rows; k && k->name; k++) {
        if (strcmp(k->name, name) == 0)
            return k;
    }
    return NULL;
}

/* Index of v in a NULL-terminated list, or -1. */
static int find_choice(const char *const *choices, const char *v)
{
    for (int i = 0; choices[i]; i++) {
        if (strcmp(choices[i], v) == 0)
            return i;
    }
    return -1;
}

/* "a, b or c" into buf, cut to fit. */
static void join_choices(const char *const *choices, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; choices[i] && used < len; i++) {
        const char *sep = i == 0 ? "" : choices[i + 1] ? ", " : " or ";
        int n = snprintf(buf + used, len - used, "%s%s", sep, choices[i]);
        if (n < 0)
            return;
        used += (size_t)n;
    }
}

/* INT, LONG, SIZE, BOOL, ENUM, LEVEL: parse to a number, range-check, store. */
static int set_number(void *data, const hub_conf_row *k, const char *v, char *err, size_t errlen)
{
    char *field = (char *)data + k->off;
    long long n = 0;
    int rc = 0;
    if (k->kind == HUB_CONF_BOOL) {
        if ((n = parse_bool(v)) < 0)
            return set_err(err, errlen, "%s: '%.64s' " MSG_BOOL, k->name, v);
    } else if (k->kind == HUB_CONF_LEVEL) {
        if ((n = hub_log_level_parse(v)) < 0)
            return set_err(err, errlen, "%s: '%.64s' " MSG_LEVEL, k->name, v);
    } else if (k->kind == HUB_CONF_ENUM) {
        if ((n = find_choice(k->choices, v)) < 0) {
            char all[192];
            join_choices(k->choices, all, sizeof(all));
            return set_err(err, errlen, "%s: '%.64s' must be %s", k->name, v, all);
        }
    } else {
        rc = k->kind == HUB_CONF_SIZE ? parse_size(v, &n) : parse_ll(v, &n);
        if (rc == -EINVAL)
            return set_err(err, errlen, "%s: '%.64s' %s", k->name, v,
                           k->kind == HUB_CONF_SIZE ? MSG_SIZE : "is not an integer");
        if (rc == -ERANGE || n < k->min || n > k->max)
            return set_err(err, errlen, "%s: '%.64s' is out of range %lld..%lld", k->name, v,
                           k->min, k->max);
    }
    if (k->kind == HUB_CONF_LONG)
        *(long *)field = (long)n;
    else if (k->kind == HUB_CONF_SIZE)
        *(size_t *)field = (size_t)n;
    else
        *(int *)field = (int)n;
    return 0;
}

/* ADDR, LOOPBACK, IDENT, PATH, STRING: validate and copy. base is prepended to relative paths. */
static int set_string(void *data, const hub_conf_row *k, const char *v, const char *base, char *err,
                      size_t errlen)
{
    char *field = (char *)data + k->off;
    char host[256], port[16];
    if (strlen(v) >= k->size)
        return set_err(err, errlen, "%s: value is too long (max %zu bytes)", k->name, k->size - 1);
    if ((k->kind == HUB_CONF_ADDR || (k->kind == HUB_CONF_LOOPBACK && v[0])) &&
        hub_config_split_addr(v, host, sizeof(host), port, sizeof(port)) < 0)
        return set_err(err, errlen, "%s: '%.64s' " MSG_ADDR, k->name, v);
    if (k->kind == HUB_CONF_LOOPBACK && v[0] && !is_loopback_host(host))
        return set_err(err, errlen,
                       "%s: '%.64s' is not a numeric loopback address (127.x.x.x or [::1]); the "
                       "control socket has no authentication",
                       k->name, v);
    if (k->kind == HUB_CONF_IDENT && v[0] && !is_lua_ident(v))
        return set_err(err, errlen, "%s: '%.64s' is not a Lua identifier", k->name, v);
    if (k->kind != HUB_CONF_PATH || !base || !base[0] || v[0] == '/' || v[0] == '\0')
        base = "";
    int n = snprintf(field, k->size, "%s%s", base, v);
    if (n < 0 || (size_t)n >= k->size) {
        field[0] = '\0';
        return set_err(err, errlen, "%s: path is too long (max %zu bytes)", k->name, k->size - 1);
    }
    return 0;
}

/* LIST: append a copy of v. The array grows to the next power of two, so that n alone tells
 * when it is full. -ENOMEM leaves the list as it was. */
static int list_append(void *data, const hub_conf_row *k, const char *v, int line, char *err,
                       size_t errlen)
{
    hub_conf_list *l = (hub_conf_list *)((char *)data + k->off);
    if ((l->n & (l->n - 1)) == 0) {
        size_t cap = l->n ? l->n * 2 : 1;
        hub_conf_item *items = hub_realloc(l->items, cap * sizeof(*items));
        if (!items)
            goto oom;
        l->items = items;
    }
    char *copy = hub_strndup(v, strlen(v));
    if (!copy)
        goto oom;
    l->items[l->n].value = copy;
    l->items[l->n].line = line;
    l->n++;
    return 0;
oom:
    set_err(err, errlen, "%s: out of memory", k->name);
    return -ENOMEM;
}

/* One value for row k of the struct at data, from the file's line (0: not from a file). */
static int set_row(void *data, const hub_conf_row *k, const char *v, const char *base, int line,
                   char *err, size_t errlen)
{
    switch (k->kind) {
    case HUB_CONF_ADDR:
    case HUB_CONF_LOOPBACK:
    case HUB_CONF_IDENT:
    case HUB_CONF_PATH:
    case HUB_CONF_STRING:
        return set_string(data, k, v, base, err, errlen);
    case HUB_CONF_LIST:
        return list_append(data, k, v, line, err, errlen);
    default:
        return set_number(data, k, v, err, errlen);
    }
}

/* The rows' defaults over data (zeroed by the caller). Relative PATH defaults stay relative to
 * the working directory: a default belongs to no file. */
static int apply_defaults(const hub_conf_section *s, void *data, char *err, size_t errlen)
{
    char reason[256];
    for (const hub_conf_row *k = s->rows; k && k->name; k++) {
        if (k->def && set_row(data, k, k->def, NULL, 0, reason, sizeof(reason)) < 0)
            return set_err(err, errlen, "[%s] bad default: %s", s->name, reason);
    }
    return 0;
}

void hub_config_defaults(hub_config *c)
{
    memset(c, 0, sizeof(*c));
    /* The core's defaults are literals of this file; test_config checks each of them. */
    for (const hub_conf_section *s = core_sections; s->name; s++)
        (void)apply_defaults(s, c, NULL, 0);
}

static const hub_conf_section *find_core_section(const char *name)
{
    for (const hub_conf_section *s = core_sections; s->name; s++) {
        if (strcmp(s->name, name) == 0)
            return s;
    }
    return NULL;
}

int hub_config_set(hub_config *c, const char *section, const char *key, const char *value,
                   char *err, size_t errlen)
{
    const hub_conf_section *s = find_core_section(section);
    const hub_conf_row *k = s ? find_row(s, key) : NULL;
    if (!k) {
        if (section[0] == '\0')
            return set_err(err, errlen, "key '%.64s' is outside any section", key);
        if (!s)
            return set_err(err, errlen, "unknown section [%.64s] (not supported by this build)",
                           section);
        return set_err(err, errlen, "unknown key '%.64s' in section [%s]", key, section);
    }
    if (!value)
        return set_err(err, errlen, "%s: missing value", key);
    /* Validate into a copy so that a rejected value leaves c untouched. */
    hub_config tmp = *c;
    int rc = set_row(&tmp, k, value, NULL, 0, err, errlen);
    if (rc == 0)
        *c = tmp;
    return rc;
}

/* ---- module instances ------------------------------------------------------------------- */

const hub_conf_instance *hub_conf_next(const hub_config *cfg, const char *section,
                                       const hub_conf_instance *prev)
{
    const hub_conf_instance *i = prev ? prev->next : cfg->modules;
    while (i && strcmp(i->section->name, section) != 0)
        i = i->next;
    return i;
}

/* NULL-safe on an instance whose data or file could not be allocated. */
static void instance_free(hub_conf_instance *i)
{
    for (const hub_conf_row *k = i->section->rows; i->data && k && k->name; k++) {
        if (k->kind != HUB_CONF_LIST)
            continue;
        hub_conf_list *l = (hub_conf_list *)((char *)i->data + k->off);
        for (size_t j = 0; j < l->n; j++)
            hub_free(l->items[j].value);
        hub_free(l->items);
    }
    hub_free(i->data);
    hub_free(i->file);
    hub_free(i);
}

void hub_config_free(hub_config *c)
{
    if (!c)
        return;
    hub_conf_instance *i = c->modules, *next;
    c->modules = NULL;
    for (; i; i = next) {
        next = i->next;
        instance_free(i);
    }
}

/* The size a row of this kind must have (0 for strings, which need at least 1 byte). */
static size_t kind_size(hub_conf_kind kind)
{
    switch (kind) {
    case HUB_CONF_INT:
    case HUB_CONF_BOOL:
    case HUB_CONF_ENUM:
    case HUB_CONF_LEVEL:
        return sizeof(int);
    case HUB_CONF_LONG:
        return sizeof(long);
    case HUB_CONF_SIZE:
        return sizeof(size_t);
    case HUB_CONF_LIST:
        return sizeof(hub_conf_list);
    default:
        return 0;
    }
}

/* A module's table is checked before it is trusted with offsets into memory: a row that does not
 * fit its struct would otherwise write past an instance. Returns 0 or -EINVAL with the reason. */
static int check_section(const hub_conf_section *s, char *err, size_t errlen)
{
    if (!s->name[0] || strpbrk(s->name, ":[]; \t") || find_core_section(s->name) || !s->size)
        return set_err(err, errlen, "section [%.64s]: bad name or size", s->name);
    for (const hub_conf_row *k = s->rows; k && k->name; k++) {
        size_t want = kind_size(k->kind);
        int bad = k->kind < HUB_CONF_INT || k->kind > HUB_CONF_LIST;
        bad |= want ? k->size != want : k->size == 0;
        bad |= k->off > s->size || k->size > s->size - k->off;
        bad |= k->kind == HUB_CONF_ENUM && (!k->choices || !k->choices[0]);
        bad |= k->kind == HUB_CONF_LIST && k->def != NULL;
        if (bad)
            return set_err(err, errlen, "section [%s] key '%.64s': row does not fit its kind",
                           s->name, k->name);
    }
    return 0;
}

/* ---- the file ------------------------------------------------------------------------- */

/* We read the lines ourselves rather than through libinih (no longer called): Debian builds it
 * with 200-byte lines (a longer one is cut into pieces and miscounted), cuts section names to 49
 * bytes without a word ([name:INSTANCE] needs more) and never calls back for a section without
 * keys (which is still an instance). The limits here are HUB_CONF_LINE_MAX and secname's.
 * The dialect is inih's, as the core has always read it: ';' or '#' starts a comment line,
 * ';' after a blank starts an inline comment, '=' or ':' ends the key, blanks around keys and
 * values are dropped, a UTF-8 BOM is skipped, and text after "[section]" is ignored. inih reads
 * an indented line after a key as more of its value; we refuse that instead. */
typedef struct load_ctx {
    hub_config *c; /* the copy being filled */
    const hub_conf_section *const *tables;
    const char *path;
    FILE *f;
    int lineno;
    int read_errno; /* errno of a failed read, 0 if none */
    /* The section being read: secname as written (cut to fit, for messages); sec NULL when
     * secname names no known section; data where sec's rows are stored. */
    int in_section;
    char secname[128];
    const hub_conf_section *sec;
    void *data;
    char prev_name[65];      /* the last key since the header, "" if none */
    char base[HUB_PATH_MAX]; /* the config file's directory with a trailing '/', or "" */
    char reason[256];
    char line[HUB_CONF_LINE_MAX + 1];
} load_ctx;

static char *lskip(char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    return s;
}

static char *rstrip(char *s)
{
    char *p = s + strlen(s);
    while (p > s && isspace((unsigned char)p[-1]))
        *--p = '\0';
    return s;
}

/* The first of chars (NULL: none) or of an inline comment (';' after a blank) in s, else its
 * end. */
static char *find_chars_or_comment(char *s, const char *chars)
{
    int was_space = 0;
    while (*s && (!chars || !strchr(chars, *s)) && !(was_space && *s == ';')) {
        was_space = isspace((unsigned char)*s);
        s++;
    }
    return s;
}

/* One physical line into x->line without its '\n'. 1 when a line was read, 0 at the end of the
 * file, -EIO with read_errno set on a read error, -EINVAL for a line too long or with a NUL. */
static int read_line(load_ctx *x)
{
    size_t n = 0;
    int ch = getc(x->f);
    if (ch == EOF) {
        x->read_errno = ferror(x->f) ? (errno ? errno : EIO) : 0;
        return x->read_errno ? -EIO : 0;
    }
    x->lineno++;
    /* Bounded by the file: each pass consumes a byte. */
    for (; ch != EOF && ch != '\n'; ch = getc(x->f)) {
        if (n == HUB_CONF_LINE_MAX)
            return set_err(x->reason, sizeof(x->reason), "line is too long (max %d bytes)",
                           HUB_CONF_LINE_MAX);
        if (ch == '\0')
            return set_err(x->reason, sizeof(x->reason), "line holds a NUL byte");
        x->line[n++] = (char)ch;
    }
    if (ch == EOF && ferror(x->f)) {
        x->read_errno = errno ? errno : EIO;
        return -EIO;
    }
    x->line[n] = '\0';
    return 1;
}

static const hub_conf_section *find_section(const load_ctx *x, const char *name)
{
    const hub_conf_section *s = find_core_section(name);
    for (size_t t = 0; !s && x->tables[t]; t++) {
        for (s = x->tables[t]; s->name && strcmp(s->name, name) != 0; s++)
            ;
        if (!s->name)
            s = NULL;
    }
    return s;
}

static int valid_instance_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > HUB_CONF_INSTANCE_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i]; /* ASCII ranges: isalnum() would follow the locale */
        int alnum =
            (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
        if (!alnum && ch != '_' && ch != '-')
            return 0;
    }
    return 1;
}

/* The instance [s->name:inst] of this file, made from the rows' defaults when it is new. A
 * repeated header continues its instance; a name differing from another only in case would be
 * a second instance nobody meant, so it is an error. */
static int open_instance(load_ctx *x, const hub_conf_section *s, const char *inst)
{
    hub_conf_instance **tail = &x->c->modules, *i;
    for (; (i = *tail); tail = &i->next) {
        if (i->section != s)
            continue;
        if (strcmp(i->name, inst) == 0) {
            x->data = i->data;
            return 0;
        }
        if (strcasecmp(i->name, inst) == 0)
            return set_err(x->reason, sizeof(x->reason),
                           "duplicate instance name: [%s:%s] differs from [%s:%s] (line %d) only "
                           "in case",
                           s->name, inst, s->name, i->name, i->line);
    }
    if (!(i = hub_calloc(1, sizeof(*i))))
        goto oom;
    /* Appended at once, so that hub_config_free frees it whatever fails next. */
    *tail = i;
    i->section = s;
    snprintf(i->name, sizeof(i->name), "%s", inst);
    i->line = x->lineno;
    if (!(i->file = hub_strndup(x->path, strlen(x->path))) || !(i->data = hub_calloc(1, s->size)))
        goto oom;
    x->data = i->data;
    return apply_defaults(s, i->data, x->reason, sizeof(x->reason));
oom:
    set_err(x->reason, sizeof(x->reason), "out of memory");
    return -ENOMEM;
}

/* A "[...]" line: name is the text between the brackets. An unknown section is reported at its
 * first key, as it always was (one without keys sets nothing and passes). */
static int open_section(load_ctx *x, char *name)
{
    snprintf(x->secname, sizeof(x->secname), "%s", name);
    x->in_section = name[0] != '\0'; /* "[]": keys after it are outside any section */
    x->prev_name[0] = '\0';
    x->sec = NULL;
    x->data = NULL;
    char *inst = strchr(name, ':');
    if (inst)
        *inst++ = '\0';
    const hub_conf_section *s = find_section(x, name);
    if (!s)
        return 0;
    if (inst && !s->named)
        return set_err(x->reason, sizeof(x->reason),
                       "section [%s] takes no instance name ('%.64s')", s->name, inst);
    if (inst && !valid_instance_name(inst))
        return set_err(x->reason, sizeof(x->reason),
                       "bad instance name '%.64s' in [%s:...] (letters, digits, '_' and '-', at "
                       "most %d bytes)",
                       inst, s->name, HUB_CONF_INSTANCE_MAX);
    x->sec = s;
    if (find_core_section(s->name)) {
        x->data = x->c;
        return 0;
    }
    return open_instance(x, s, inst ? inst : "");
}

static int set_key(load_ctx *x, const char *name, const char *value)
{
    char *r = x->reason;
    size_t rlen = sizeof(x->reason);
    if (!x->in_section)
        return set_err(r, rlen, "key '%.64s' is outside any section", name);
    if (!x->sec)
        return set_err(r, rlen, "unknown section [%.64s] (not supported by this build)",
                       x->secname);
    const hub_conf_row *k = find_row(x->sec, name);
    if (!k)
        return set_err(r, rlen, "unknown key '%.64s' in section [%s]", name, x->secname);
    return set_row(x->data, k, value, x->base, x->lineno, r, rlen);
}

/* One line of x->line: 0, or <0 with x->reason set. */
static int parse_line(load_ctx *x)
{
    char *line = x->line, *start = line, *end;
    if (x->lineno == 1 && strncmp(start, "\xEF\xBB\xBF", 3) == 0)
        start += 3;
    start = lskip(rstrip(start));
    if (*start == '\0' || *start == ';' || *start == '#')
        return 0;
    if (x->prev_name[0] && start > line)
        return set_err(x->reason, sizeof(x->reason),
                       "indented line continues the value of '%.64s'; remove the indentation",
                       x->prev_name);
    if (*start == '[') {
        end = find_chars_or_comment(start + 1, "]");
        if (*end != ']')
            return set_err(x->reason, sizeof(x->reason), MSG_SYNTAX);
        *end = '\0';
        return open_section(x, start + 1);
    }
    end = find_chars_or_comment(start, "=:");
    if (*end != '=' && *end != ':')
        return set_err(x->reason, sizeof(x->reason), MSG_SYNTAX);
    *end = '\0';
    char *name = rstrip(start), *value = end + 1;
    *find_chars_or_comment(value, NULL) = '\0';
    value = rstrip(lskip(value));
    snprintf(x->prev_name, sizeof(x->prev_name), "%s", name);
    return set_key(x, name, value);
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

/* Each module table checked, and no section name claimed twice. */
static int check_tables(const hub_conf_section *const *tables, char *err, size_t errlen)
{
    for (size_t t = 0; tables[t]; t++) {
        for (const hub_conf_section *s = tables[t]; s->name; s++) {
            int rc = check_section(s, err, errlen);
            for (size_t u = 0; rc == 0 && u <= t; u++) {
                for (const hub_conf_section *o = tables[u]; o->name && (u < t || o < s); o++) {
                    if (strcmp(o->name, s->name) == 0)
                        rc = set_err(err, errlen, "section [%s] is claimed twice", s->name);
                }
            }
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

int hub_conf_defaults(const hub_conf_section *section, void *data, char *err, size_t errlen)
{
    int rc = check_section(section, err, errlen);
    if (rc < 0)
        return rc;
    memset(data, 0, section->size);
    return apply_defaults(section, data, err, errlen);
}

static int load_file(load_ctx *x)
{
    int rc;
    x->f = fopen(x->path, "r");
    if (!x->f) {
        x->read_errno = errno;
        snprintf(x->reason, sizeof(x->reason), "cannot open: %s", strerror(errno));
        return -x->read_errno;
    }
    /* Bounded by the file: each pass reads a line, and the first error stops. */
    while ((rc = read_line(x)) > 0 && (rc = parse_line(x)) == 0)
        ;
    fclose(x->f);
    if (x->read_errno) {
        x->lineno = 0;
        snprintf(x->reason, sizeof(x->reason), "cannot read: %s", strerror(x->read_errno));
        return -x->read_errno;
    }
    return rc;
}

int hub_config_load_sections(hub_config *c, const char *path,
                             const hub_conf_section *const *sections, char *err, size_t errlen)
{
    static const hub_conf_section *const none[] = {NULL};
    load_ctx *x = hub_calloc(1, sizeof(*x));
    if (!x) {
        set_err(err, errlen, "%s:0: out of memory", path);
        return -ENOMEM;
    }
    /* Parse into a copy so that a file with an error leaves c untouched. */
    hub_config tmp = *c;
    tmp.modules = NULL;
    x->c = &tmp;
    x->path = path;
    x->tables = sections ? sections : none;
    int rc = check_tables(x->tables, x->reason, sizeof(x->reason));
    if (rc == 0 && (strlen(path) >= sizeof(tmp.file) || dir_of(path, x->base, sizeof(x->base)) < 0))
        rc = set_err(x->reason, sizeof(x->reason), "path is too long");
    if (rc == 0)
        rc = load_file(x);
    if (rc < 0) {
        set_err(err, errlen, "%s:%d: %s", path, x->lineno, x->reason);
        hub_config_free(&tmp);
    } else {
        snprintf(tmp.file, sizeof(tmp.file), "%s", path);
        /* The new instances replace the old: this file's modules are the config's. */
        hub_config_free(c);
        *c = tmp;
        rc = 0;
    }
    hub_free(x);
    return rc;
}

int hub_config_load(hub_config *c, const char *path, char *err, size_t errlen)
{
    size_t n = 0, t = 0;
    while (hub_modules[n])
        n++;
    const hub_conf_section **tables = hub_calloc(n + 1, sizeof(*tables));
    if (!tables) {
        set_err(err, errlen, "%s:0: out of memory", path);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        if (hub_modules[i]->sections)
            tables[t++] = hub_modules[i]->sections;
    }
    int rc = hub_config_load_sections(c, path, tables, err, errlen);
    hub_free(tables);
    return rc;
}
