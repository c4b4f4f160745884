/* INI configuration: the core's sections as tables of rows with their defaults, strict per-key
 * parsing, the sections modules own ([name] and [name:INSTANCE]), and the file read by libinih. */
#include "hub/config.h"

#include "hub/alloc.h"
#include "hub/core.h"
#include "hub/log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <ini.h>
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
/* For a SIZE row's lo: 0 (off) or lo..hi. A fresh Lua state with the KEMI layer takes ~49 KiB,
 * so a smaller max_memory fails in lua_newstate without a file:line; 256k leaves room to run. */
#define OFF_OR(lo) (-(lo))
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
    NUM("sndbuf", HUB_CONF_SIZE, sndbuf, OFF_OR(4096), 64 * 1024 * 1024, "256k"),
    ENUM("outbuf_policy", outbuf_policy, outbuf_choices, "close"),
    ENUM("unicast", unicast_policy, unicast_choices, "first"),
    STR("event_callback", HUB_CONF_IDENT, event_callback, NULL),
    NUM("wait_idle", HUB_CONF_LONG, wait_idle, 1, 60000000, "500000"),
    NUM("wait_increase", HUB_CONF_INT, wait_increase, 1, 100, "3"),
    NUM("worker_queue", HUB_CONF_INT, worker_queue, 1, 10000000, "4096"),
    NUM("worker_calls", HUB_CONF_SIZE, worker_calls, 1024, GiB, "64m"),
    NUM("shutdown_timeout", HUB_CONF_INT, shutdown_timeout, 0, 600000, "5000"),
    NUM("frame_timeout", HUB_CONF_INT, frame_timeout, 0, 86400000, "30000"),
    NUM("idle_timeout", HUB_CONF_INT, idle_timeout, 0, 86400000, "0"),
    END_ROWS,
};

static const hub_conf_row lua_rows[] = {
    STR("script", HUB_CONF_PATH, script, NULL),
    NUM("max_instructions", HUB_CONF_LONG, max_instructions, 0, LONG_MAX, "100000000"),
    NUM("max_memory", HUB_CONF_SIZE, max_memory, OFF_OR(256 * 1024), LLONG_MAX, "0"),
    NUM("restrict", HUB_CONF_BOOL, lua_restrict, 0, 1, "no"),
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

/* 1 when row k is a prefix row (a LIST named "x.": see HUB_CONF_LIST). */
static int is_prefix_row(const hub_conf_row *k)
{
    size_t n = strlen(k->name);
    return k->kind == HUB_CONF_LIST && n > 0 && k->name[n - 1] == '.';
}

/* The row named name, else the prefix row name starts with (and goes beyond), else NULL. */
static const hub_conf_row *find_row(const hub_conf_section *s, const char *name)
{
    const hub_conf_row *prefix = NULL;
    for (const hub_conf_row *k = s->rows; k && k->name; k++) {
        if (strcmp(k->name, name) == 0 && !is_prefix_row(k))
            return k;
        size_t n = strlen(k->name);
        if (!prefix && is_prefix_row(k) && strncmp(k->name, name, n) == 0 && name[n])
            prefix = k;
    }
    return prefix;
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
        /* OFF_OR: a size is never negative, so a negative min marks "0 or -min..max". */
        int off_or = k->kind == HUB_CONF_SIZE && k->min < 0;
        if (off_or && (rc == -ERANGE || (n != 0 && (n < -k->min || n > k->max))))
            return set_err(err, errlen, "%s: '%.64s' must be 0 (off) or in %lld..%lld", k->name, v,
                           -k->min, k->max);
        if (!off_or && (rc == -ERANGE || n < k->min || n > k->max))
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
    /* A name inih would cut, or one leaving no room for ":INSTANCE", could never be read. */
    size_t name_max = HUB_CONF_SECTION_MAX - (s->named ? 2 : 0);
    if (!s->name[0] || strlen(s->name) > name_max || strpbrk(s->name, ":[]; \t") ||
        find_core_section(s->name) || !s->size)
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

/* Where each non-list key of one section instance was set: a key given twice is an error (a
 * silent last-wins hides typos and merge accidents). Core sections share the hub_config as
 * their data, so a record is per (section, data). */
typedef struct seen_keys {
    struct seen_keys *next;
    const hub_conf_section *sec;
    const void *data;
    int line[]; /* per row of sec: the line that set it, 0 if none yet */
} seen_keys;

/* libinih parses the file; we hand it the lines ourselves (ini_parse_stream), one physical line
 * per call, for what it cannot tell us:
 * - a line longer than its buffer would be cut into pieces, each read as a line of its own (and
 *   miscounted); we refuse the line instead, naming it;
 * - it never calls back for a section without keys, yet [name:INSTANCE] alone is an instance;
 *   and it cuts section names to 49 bytes without a word. So the reader notices each header
 *   itself and opens its section there, with errors at the header's own line;
 * - it reports only the first bad line's number, never the reason; we keep ours.
 * Everything else is inih's dialect, untouched: ';' and '#' comment lines, ';' after a blank
 * as an inline comment, "key = value" or "key: value", blanks trimmed, a UTF-8 BOM, and text
 * after "[section]" ignored. inih reads an indented line after a key as more of its value; we
 * refuse that instead. The first error stops the parse. */
typedef struct load_ctx {
    hub_config *c; /* the copy being filled */
    const hub_conf_section *const *tables;
    int skip_unknown; /* sections nobody declared are skipped unread (evhubctl) */
    const char *path;
    FILE *f;
    int lineno;     /* physical line last read: inih's count too, as lines are never split */
    int read_errno; /* errno of a failed read, 0 if none */
    int err;        /* first error (negative errno), 0 if none; lineno is then its line */
    /* The section being read: secname as written (inih's section name too); sec NULL when
     * secname names no known section; data where sec's rows are stored. */
    int in_section;
    char secname[HUB_CONF_SECTION_MAX + 1];
    const hub_conf_section *sec;
    void *data;
    seen_keys *seen;     /* the current instance's record (NULL when sec is) */
    seen_keys *seen_all; /* every record of this load, freed with the context */
    int key_seen;        /* a key since the header: inih's prev_name is set */
    int continuation;    /* inih reads the current line as more of the last key's value */
    char prev_name[65];
    char header[HUB_CONF_LINE_MAX + 1]; /* a header's name, copied out of inih's line */
    char base[HUB_PATH_MAX];            /* the config file's directory with a trailing '/', or "" */
    char reason[256];
} load_ctx;

/* The first error at the current line; it stops the parse (the reader returns NULL next). */
static int fail(load_ctx *x, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(load_ctx *x, int err, const char *fmt, ...)
{
    va_list ap;
    if (x->err)
        return x->err;
    va_start(ap, fmt);
    vsnprintf(x->reason, sizeof(x->reason), fmt, ap);
    va_end(ap);
    x->err = err;
    return err;
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

/* INSTANCE of [name:INSTANCE]: 1 to max bytes, ASCII letters, digits, '_' and '-'. */
static int valid_instance_name(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
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
            return fail(x, -EINVAL,
                        "duplicate instance name: [%s:%s] differs from [%s:%s] (line %d) only "
                        "in case",
                        s->name, inst, s->name, i->name, i->line);
    }
    if (!(i = hub_calloc(1, sizeof(*i))))
        return fail(x, -ENOMEM, "out of memory");
    /* Appended at once, so that hub_config_free frees it whatever fails next. */
    *tail = i;
    i->section = s;
    snprintf(i->name, sizeof(i->name), "%s", inst);
    i->line = x->lineno;
    if (!(i->file = hub_strndup(x->path, strlen(x->path))) || !(i->data = hub_calloc(1, s->size)))
        return fail(x, -ENOMEM, "out of memory");
    x->data = i->data;
    char reason[256];
    if (apply_defaults(s, i->data, reason, sizeof(reason)) < 0)
        return fail(x, -EINVAL, "%s", reason);
    return 0;
}

/* The record of the instance the current header opened (x->sec, x->data), found or made. A
 * repeated header finds the record of its first, so its keys count against the first's. */
static int open_seen(load_ctx *x)
{
    seen_keys *k;
    for (k = x->seen_all; k; k = k->next) {
        if (k->sec == x->sec && k->data == x->data)
            break;
    }
    if (!k) {
        size_t nrows = 0;
        while (x->sec->rows && x->sec->rows[nrows].name)
            nrows++;
        if (!(k = hub_calloc(1, sizeof(*k) + nrows * sizeof(k->line[0]))))
            return fail(x, -ENOMEM, "out of memory");
        k->sec = x->sec;
        k->data = x->data;
        k->next = x->seen_all;
        x->seen_all = k;
    }
    x->seen = k;
    return 0;
}

/* A header inih will read: name is the text between the brackets (our copy). An unknown
 * section is reported at its first key, as it always was (one without keys sets nothing). */
static int open_section(load_ctx *x, char *name)
{
    size_t len = strlen(name);
    char *inst = strchr(name, ':');
    if (inst)
        *inst++ = '\0';
    const hub_conf_section *s = find_section(x, name);
    if (s && inst && !s->named)
        return fail(x, -EINVAL, "section [%s] takes no instance name ('%.64s')", s->name, inst);
    /* "name:INSTANCE" must fit inih's section name (check_section keeps name short enough). */
    size_t inst_max = s ? HUB_CONF_SECTION_MAX - 1 - strlen(s->name) : 0;
    if (s && inst && !valid_instance_name(inst, inst_max))
        return fail(x, -EINVAL,
                    "bad instance name '%.64s' in [%s:...] (letters, digits, '_' and '-', at "
                    "most %zu bytes)",
                    inst, s->name, inst_max);
    /* inih would keep the first 49 bytes and carry on as if that were the name. */
    if (len > HUB_CONF_SECTION_MAX)
        return fail(x, -EINVAL, "section name is too long (max %d bytes)", HUB_CONF_SECTION_MAX);
    if (inst)
        inst[-1] = ':';
    memcpy(x->secname, name, len + 1);
    x->in_section = len > 0; /* "[]": keys after it are outside any section */
    x->key_seen = 0;
    x->sec = s;
    x->data = NULL;
    x->seen = NULL;
    if (!s)
        return 0;
    if (find_core_section(s->name))
        x->data = x->c;
    else if (open_instance(x, s, inst ? inst : "") < 0)
        return x->err;
    return open_seen(x);
}

/* Where inih ends a header's name: the first ']', unless an inline comment (one of
 * INI_INLINE_COMMENT_PREFIXES after a blank) comes first. NULL when there is none: inih then
 * reports the line as a syntax error. */
static char *header_end(char *s)
{
    int was_space = 0;
    /* Bounded by the line: each pass moves one byte towards its NUL. */
    for (; *s && *s != ']'; s++) {
        if (INI_ALLOW_INLINE_COMMENTS && was_space && strchr(INI_INLINE_COMMENT_PREFIXES, *s))
            return NULL;
        was_space = isspace((unsigned char)*s);
    }
    return *s == ']' ? s : NULL;
}

/* What inih will make of line, as far as we must know it first; inih's order of tests, from
 * ini_parse_stream(): a comment or blank line, a continuation (an indented line after a key),
 * then a header. 0, or <0 with the error recorded. line itself is left as it was. */
static int notice_line(load_ctx *x, const char *line)
{
    const char *start = line;
    x->continuation = 0;
    if (INI_ALLOW_BOM && x->lineno == 1 && strncmp(start, "\xEF\xBB\xBF", 3) == 0)
        start += 3;
    while (*start && isspace((unsigned char)*start))
        start++;
    if (*start == '\0' || strchr(INI_START_COMMENT_PREFIXES, *start))
        return 0;
    if (INI_ALLOW_MULTILINE && x->key_seen && start > line) {
        x->continuation = 1;
        return 0;
    }
    char *end = *start == '[' ? header_end((char *)start + 1) : NULL;
    if (!end)
        return 0;
    size_t n = (size_t)(end - (start + 1));
    memcpy(x->header, start + 1, n); /* n < the line's length <= HUB_CONF_LINE_MAX */
    x->header[n] = '\0';
    return open_section(x, x->header);
}

/* inih's ini_reader: one physical line into str (num bytes, inih's line buffer) with its '\n',
 * never a piece of one. NULL at the end of the file, after a read error (read_errno) and after
 * the first error, which a line too long or holding a NUL byte is (inih would cut the one, and
 * read the other as ending at the NUL). */
static char *conf_reader(char *str, int num, void *stream)
{
    load_ctx *x = stream;
    /* Room for the '\n' and the NUL; we promise no more than HUB_CONF_LINE_MAX either way. */
    size_t max = num > 2 ? (size_t)num - 2 : 0, n = 0;
    if (max > HUB_CONF_LINE_MAX)
        max = HUB_CONF_LINE_MAX;
    if (x->err || num < 2)
        return NULL;
    int ch = getc(x->f);
    if (ch == EOF) {
        x->read_errno = ferror(x->f) ? (errno ? errno : EIO) : 0;
        return NULL;
    }
    x->lineno++;
    /* Bounded by max: each pass stores a byte or leaves. */
    for (; ch != EOF && ch != '\n'; ch = getc(x->f)) {
        if (ch == '\0') {
            fail(x, -EINVAL, "line holds a NUL byte");
            return NULL;
        }
        if (n == max) {
            fail(x, -EINVAL, "line is too long (max %zu characters)", max);
            return NULL;
        }
        str[n++] = (char)ch;
    }
    if (ch == EOF && ferror(x->f)) {
        x->read_errno = errno ? errno : EIO;
        return NULL;
    }
    if (ch == '\n')
        str[n++] = '\n';
    str[n] = '\0';
    return notice_line(x, str) == 0 ? str : NULL;
}

/* One key of the current section: 0, or <0 with the reason in r. */
static int set_key(load_ctx *x, const char *name, const char *value, char *r, size_t rlen)
{
    if (!x->in_section)
        return set_err(r, rlen, "key '%.64s' is outside any section", name);
    if (!x->sec && x->skip_unknown)
        return 0;
    if (!x->sec)
        return set_err(r, rlen, "unknown section [%.64s] (not supported by this build)",
                       x->secname);
    const hub_conf_row *k = find_row(x->sec, name);
    if (!k)
        return set_err(r, rlen, "unknown key '%.64s' in section [%s]", name, x->secname);
    /* Only a LIST key collects a value per line; any other set twice is refused. */
    int *first = k->kind == HUB_CONF_LIST ? NULL : &x->seen->line[k - x->sec->rows];
    if (first && *first)
        return set_err(r, rlen, "key '%.64s' given twice in [%s] (first at line %d)", name,
                       x->secname, *first);
    char kv[HUB_CONF_LINE_MAX + 2];
    if (is_prefix_row(k)) {
        /* what a prefix row keeps is the whole key and its value (fits: both are one line) */
        snprintf(kv, sizeof(kv), "%s=%s", name, value);
        value = kv;
    }
    int rc = set_row(x->data, k, value, x->base, x->lineno, r, rlen);
    if (rc == 0 && first)
        *first = x->lineno;
    return rc;
}

/* inih's ini_handler, for each key of the line the reader just gave it. 1, or 0 when the key is
 * refused (inih then counts the line as its first error; we have the reason). */
static int load_handler(void *user, const char *section, const char *name, const char *value)
{
    load_ctx *x = user;
    if (!name)
        return 1; /* inih built to announce each new section: the reader opened it already */
    if (x->continuation) {
        fail(x, -EINVAL, "indented line continues the value of '%.64s'; remove the indentation",
             x->prev_name);
        return 0;
    }
    /* The reader's reading of the headers and inih's must agree, or keys would land in the
     * wrong section; a mismatch means inih's rules differ from those mirrored here. */
    if (strcmp(section, x->secname) != 0) {
        fail(x, -EINVAL, "section [%.64s] was read as [%.64s] by the INI library", x->secname,
             section);
        return 0;
    }
    if (!value) {
        fail(x, -EINVAL, "%.64s: missing value", name);
        return 0;
    }
    x->key_seen = 1;
    snprintf(x->prev_name, sizeof(x->prev_name), "%s", name);
    char reason[256];
    int rc = set_key(x, name, value, reason, sizeof(reason));
    if (rc < 0) {
        fail(x, rc, "%s", reason);
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

/* 0, or <0 with x->reason set and x->lineno the line to name (0: the file as a whole). */
static int load_file(load_ctx *x)
{
    x->f = fopen(x->path, "r");
    if (!x->f) {
        x->read_errno = errno;
        snprintf(x->reason, sizeof(x->reason), "cannot open: %s", strerror(errno));
        return -x->read_errno;
    }
    int rc = ini_parse_stream(conf_reader, x, load_handler, x);
    fclose(x->f);
    if (x->read_errno) {
        x->lineno = 0;
        snprintf(x->reason, sizeof(x->reason), "cannot read: %s", strerror(x->read_errno));
        return -x->read_errno;
    }
    if (rc < 0) {
        x->lineno = 0;
        snprintf(x->reason, sizeof(x->reason), "out of memory");
        return -ENOMEM;
    }
    /* inih's first bad line is a syntax error unless it is the line of our own first error
     * (a key we refused): the parse stopped there, so inih's can only be earlier. */
    if (rc > 0 && (!x->err || rc < x->lineno)) {
        x->lineno = rc;
        snprintf(x->reason, sizeof(x->reason), MSG_SYNTAX);
        return -EINVAL;
    }
    return x->err;
}

static int load_sections(hub_config *c, const char *path, const hub_conf_section *const *sections,
                         int skip_unknown, char *err, size_t errlen)
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
    x->skip_unknown = skip_unknown;
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
    for (seen_keys *k = x->seen_all, *next; k; k = next) {
        next = k->next;
        hub_free(k);
    }
    hub_free(x);
    return rc;
}

int hub_config_load_sections(hub_config *c, const char *path,
                             const hub_conf_section *const *sections, char *err, size_t errlen)
{
    return load_sections(c, path, sections, 0, err, errlen);
}

int hub_config_load_core(hub_config *c, const char *path, char *err, size_t errlen)
{
    static const hub_conf_section *const none[] = {NULL};
    return load_sections(c, path, none, 1, err, errlen);
}
