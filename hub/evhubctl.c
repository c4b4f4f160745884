/* evhubctl: the command-line client of evhub's control socket. Each run sends one JSON-RPC
 * request and prints the answer. Commands, their parameters and their help come from
 * hub/control_spec.c, or from the hub's own "commands" answer for commands that later
 * features register, so evhubctl knows no command by heart. */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "hub/config.h"
#include "hub/control_spec.h"

#define DEFAULT_SOCKET  "/run/evhub/evhub.sock"
#define DEFAULT_TIMEOUT 10000        /* ms */
#define HELP_LOOKUP_MS  2000         /* `evhubctl help` waits no longer for the hub's list */
#define MAX_REPLY       (256u << 20) /* a longer reply line is refused rather than buffered */
#define WRAP_COLS       78
#define MAX_COLS        64 /* table columns shown; --json has them all */

/* Exit codes, as documented in print_help(). */
#define CTL_EXIT_OK      0
#define CTL_EXIT_HUB     1 /* the hub answered with an error */
#define CTL_EXIT_USAGE   2 /* unknown command, bad arguments, unreadable CONFIG */
#define CTL_EXIT_CONNECT 3 /* no such socket, permission denied, connection refused */
#define CTL_EXIT_REPLY   4 /* timeout, connection closed early, reply not JSON-RPC */

typedef struct ctl_opts {
    const char *socket;
    int json;
    long timeout_ms;
} ctl_opts;

/* A command's spec as the hub described it. The strings point into owner (the "commands"
 * result), which the remote_spec holds a reference to. */
typedef struct remote_spec {
    hub_ctl_spec spec;
    hub_ctl_param *params;
    json_object *owner;
} remote_spec;

/* ---- talking to the hub ---- */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events. Returns 0, -ETIMEDOUT after the deadline, or -errno. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) { /* bounded by the deadline */
        long long left = deadline - now_ms();
        if (left <= 0)
            return -ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (n > 0)
            return 0; /* errors and hang-ups show up in the next read or write */
        if (n < 0 && errno != EINTR)
            return -errno;
    }
}

/* Connect a non-blocking stream socket by the deadline. Returns the fd or -errno. */
static int connect_addr(int family, const struct sockaddr *sa, socklen_t salen, long long deadline)
{
    int soerr = 0, fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    socklen_t len = sizeof(soerr);
    if (fd < 0)
        return -errno;
    int rc = connect(fd, sa, salen) == 0 ? 0 : -errno;
    if (rc == -EINPROGRESS || rc == -EINTR) { /* either way the connect goes on */
        rc = wait_fd(fd, POLLOUT, deadline);
        if (rc == 0)
            rc = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0 ? -errno : -soerr;
    }
    if (rc < 0)
        close(fd);
    return rc < 0 ? rc : fd;
}

/* "tcp:HOST:PORT", or no '/' and ending in ":digits", is TCP; anything else a unix path. */
static int is_tcp(const char *s)
{
    if (strncmp(s, "tcp:", 4) == 0)
        return 1;
    const char *colon = strrchr(s, ':');
    if (strchr(s, '/') || !colon || !colon[1])
        return 0;
    return strspn(colon + 1, "0123456789") == strlen(colon + 1);
}

/* Connect to the hub, saying why not on stderr unless quiet. Returns the fd or -1. */
static int ctl_connect(const char *sock, long long deadline, int quiet)
{
    const char *why = NULL;
    int fd = -ENOENT, g;
    if (is_tcp(sock)) {
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        char host[256], port[16];
        if (hub_config_split_addr(sock + (strncmp(sock, "tcp:", 4) == 0 ? 4 : 0), host,
                                  sizeof(host), port, sizeof(port)) < 0)
            why = "not HOST:PORT or [V6]:PORT";
        else if ((g = getaddrinfo(host, port, &hints, &res)) != 0)
            why = gai_strerror(g);
        for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next)
            fd = connect_addr(ai->ai_family, ai->ai_addr, ai->ai_addrlen, deadline);
        if (res)
            freeaddrinfo(res);
    } else {
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        fd = -ENAMETOOLONG;
        if (strlen(sock) < sizeof(sun.sun_path)) {
            memcpy(sun.sun_path, sock, strlen(sock) + 1);
            fd = connect_addr(AF_UNIX, (struct sockaddr *)&sun, sizeof(sun), deadline);
        }
    }
    if (fd < 0 && !quiet)
        fprintf(stderr, "evhubctl: cannot connect to %s: %s%s\n", sock, why ? why : strerror(-fd),
                why ? "" : " (is evhub running? see -s)");
    return fd < 0 ? -1 : fd;
}

/* Write out, then read up to the first "\n", by the deadline. Returns 0 with *line (malloc'd,
 * cut at the newline; the caller frees it), or -ETIMEDOUT, -ECONNRESET (closed before the
 * newline), -EMSGSIZE, -ENOMEM or -errno. */
static int exchange(int fd, const char *out, size_t outlen, long long deadline, char **line)
{
    size_t cap = 0, len = 0;
    char *buf = NULL;
    int rc = 0;
    while (rc == 0) { /* each pass moves bytes or waits: bounded by MAX_REPLY and the deadline */
        if (outlen == 0 && len + 1 >= cap) {
            size_t ncap = cap ? cap * 2 : 4096;
            char *nbuf = ncap > MAX_REPLY ? NULL : realloc(buf, ncap);
            if (!nbuf) {
                rc = ncap > MAX_REPLY ? -EMSGSIZE : -ENOMEM;
                break;
            }
            buf = nbuf;
            cap = ncap;
        }
        ssize_t n =
            outlen ? send(fd, out, outlen, MSG_NOSIGNAL) : recv(fd, buf + len, cap - len - 1, 0);
        if (n > 0 && outlen) {
            out += n;
            outlen -= (size_t)n;
        } else if (n > 0) {
            char *nl = memchr(buf + len, '\n', (size_t)n);
            len += (size_t)n;
            if (nl) {
                *nl = '\0';
                *line = buf;
                return 0;
            }
        } else if (n == 0) {
            rc = -ECONNRESET;
        } else if (outlen && (errno == EPIPE || errno == ECONNRESET)) {
            outlen = 0; /* the hub may have refused us with an answer before closing: read it */
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            rc = wait_fd(fd, outlen ? POLLOUT : POLLIN, deadline);
        } else if (errno != EINTR) {
            rc = -errno;
        }
    }
    free(buf);
    return rc;
}

static json_object *member(json_object *obj, const char *key)
{
    json_object *v = NULL;
    json_object_object_get_ex(obj, key, &v); /* NULL-safe, and for non-objects */
    return v;
}

static const char *member_string(json_object *obj, const char *key)
{
    json_object *v = member(obj, key);
    return json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
}

/* Check one reply line. Returns CTL_EXIT_OK with *result (the caller puts it; NULL for a null
 * result), CTL_EXIT_HUB after printing the hub's error, or CTL_EXIT_REPLY. */
static int parse_reply(const char *line, const char *method, int quiet, json_object **result)
{
    json_object *reply = json_tokener_parse(line), *res = NULL, *err = NULL;
    json_object *id = member(reply, "id"), *code = NULL, *msg = NULL;
    const char *ver = member_string(reply, "jsonrpc");
    int has_res = json_object_object_get_ex(reply, "result", &res);
    int has_err = json_object_object_get_ex(reply, "error", &err);
    int id_ok = json_object_is_type(id, json_type_int) && json_object_get_int(id) == 1;
    int rc = CTL_EXIT_REPLY;
    if (!ver || strcmp(ver, "2.0") != 0 || has_res == has_err) {
        /* not JSON-RPC */
    } else if (has_res && id_ok) {
        *result = json_object_get(res);
        rc = CTL_EXIT_OK;
    } else if ((id_ok || !id) && json_object_is_type(code = member(err, "code"), json_type_int) &&
               json_object_is_type(msg = member(err, "message"), json_type_string)) {
        /* A null id: the hub could not tell which request failed (e.g. too many clients). */
        if (!quiet)
            fprintf(stderr, "evhubctl: %s: %s (code %d)\n", method, json_object_get_string(msg),
                    json_object_get_int(code));
        rc = CTL_EXIT_HUB;
    }
    if (rc == CTL_EXIT_REPLY && !quiet)
        fprintf(stderr, "evhubctl: %s: the reply is not a JSON-RPC 2.0 answer to id 1: %.80s\n",
                method, line);
    json_object_put(reply);
    return rc;
}

/* Send one request (id 1; params taken over, NULL for none) and read its answer. Returns
 * CTL_EXIT_OK with *result (the caller puts it), or another CTL_EXIT_* after saying why on
 * stderr unless quiet. */
static int rpc_call(const ctl_opts *o, const char *method, json_object *params, int quiet,
                    json_object **result)
{
    long long deadline = now_ms() + o->timeout_ms;
    json_object *req = json_object_new_object();
    char *text = NULL, *line = NULL;
    int rc = CTL_EXIT_CONNECT, fd, err;

    *result = NULL;
    json_object_object_add(req, "jsonrpc", json_object_new_string("2.0"));
    json_object_object_add(req, "id", json_object_new_int(1));
    json_object_object_add(req, "method", json_object_new_string(method));
    if (params)
        json_object_object_add(req, "params", params); /* params now owned by req */
    const char *json = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN |
                                                               JSON_C_TO_STRING_NOSLASHESCAPE);
    size_t len = json ? strlen(json) : 0;
    if (!json || !(text = malloc(len + 1))) {
        fprintf(stderr, "evhubctl: out of memory\n");
        goto done;
    }
    memcpy(text, json, len);
    text[len] = '\n';
    if ((fd = ctl_connect(o->socket, deadline, quiet)) < 0)
        goto done;
    err = exchange(fd, text, len + 1, deadline, &line);
    close(fd);
    rc = err == 0 ? parse_reply(line, method, quiet, result) : CTL_EXIT_REPLY;
    if (err == 0 || quiet)
        goto done;
    if (err == -ETIMEDOUT)
        fprintf(stderr, "evhubctl: %s: no reply from %s within %g s (see -t)\n", method, o->socket,
                o->timeout_ms / 1000.0);
    else if (err == -ECONNRESET || err == -EPIPE)
        fprintf(stderr, "evhubctl: %s: %s closed the connection without a complete reply\n", method,
                o->socket);
    else
        fprintf(stderr, "evhubctl: %s: %s: %s\n", method, o->socket, strerror(-err));
done:
    free(line);
    free(text);
    json_object_put(req);
    return rc;
}

/* ---- specs ---- */

/* Ask the hub for its commands. Returns CTL_EXIT_OK with *res (the caller puts it) and *list
 * (its "commands" array, owned by *res), or another CTL_EXIT_*. */
static int fetch_commands(const ctl_opts *o, int quiet, json_object **res, json_object **list)
{
    int rc = rpc_call(o, "commands", NULL, quiet, res);
    if (rc != CTL_EXIT_OK)
        return rc;
    *list = member(*res, "commands");
    if (json_object_is_type(*list, json_type_array))
        return CTL_EXIT_OK;
    if (!quiet)
        fprintf(stderr, "evhubctl: commands: the reply has no \"commands\" array\n");
    json_object_put(*res);
    *res = NULL;
    return CTL_EXIT_REPLY;
}

/* Fill rs from the entry of list named name. Returns 0, -ENOENT or -ENOMEM. On success rs
 * holds a reference to res, which owns list. */
static int remote_spec_find(json_object *res, json_object *list, const char *name, remote_spec *rs)
{
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        json_object *cmd = json_object_array_get_idx(list, i), *params = member(cmd, "params");
        const char *cname = member_string(cmd, "name"), *summary = member_string(cmd, "summary");
        if (!cname || strcmp(cname, name) != 0)
            continue;
        size_t n = json_object_is_type(params, json_type_array) ? json_object_array_length(params)
                                                                : 0,
               np = 0;
        if (!(rs->params = calloc(n ? n : 1, sizeof(*rs->params))))
            return -ENOMEM;
        for (size_t j = 0; j < n; j++) {
            json_object *p = json_object_array_get_idx(params, j);
            const char *type = member_string(p, "type"), *help = member_string(p, "help");
            if (!(rs->params[np].name = member_string(p, "name")))
                continue; /* nothing evhubctl could send */
            /* A type evhubctl does not know is taken as a string. */
            rs->params[np].type = HUB_CTL_STRING;
            for (hub_ctl_type t = HUB_CTL_STRING; type && t <= HUB_CTL_BOOL; t++) {
                if (strcmp(type, hub_ctl_type_name(t)) == 0)
                    rs->params[np].type = t;
            }
            rs->params[np].required = json_object_get_boolean(member(p, "required"));
            rs->params[np++].help = help ? help : "";
        }
        rs->spec = (hub_ctl_spec){cname, summary ? summary : "", member_string(cmd, "help"),
                                  rs->params, np};
        rs->owner = json_object_get(res);
        return 0;
    }
    return -ENOENT;
}

/* The spec of a core command, or else the hub's. Returns CTL_EXIT_OK with *out (valid while
 * rs is), or another CTL_EXIT_* after saying why, with rs left empty. */
static int lookup_spec(const ctl_opts *o, const char *name, remote_spec *rs,
                       const hub_ctl_spec **out)
{
    json_object *res = NULL, *list = NULL;
    if ((*out = hub_ctl_core_spec(name)) != NULL)
        return CTL_EXIT_OK;
    int rc = fetch_commands(o, 0, &res, &list);
    if (rc != CTL_EXIT_OK) {
        fprintf(stderr, "evhubctl: '%s' is not a core command, and the hub could not be asked\n",
                name);
        return rc;
    }
    int err = remote_spec_find(res, list, name, rs);
    json_object_put(res); /* rs holds its own reference on success */
    if (err < 0)
        fprintf(stderr,
                err == -ENOENT ? "evhubctl: unknown command '%s' (see evhubctl help)\n"
                               : "evhubctl: %s: out of memory\n",
                name);
    *out = err < 0 ? NULL : &rs->spec;
    return err == 0 ? CTL_EXIT_OK : err == -ENOENT ? CTL_EXIT_USAGE : CTL_EXIT_HUB;
}

static void remote_spec_free(remote_spec *rs)
{
    free(rs->params);
    json_object_put(rs->owner);
}

/* ---- help ---- */

/* A param's placeholder: its name in capitals ("id" -> "ID"), cut to fit buf. */
static const char *metavar(char *buf, size_t len, const char *name)
{
    size_t i = 0;
    for (; name[i] && i + 1 < len; i++)
        buf[i] = (char)toupper((unsigned char)name[i]);
    buf[i] = '\0';
    return buf;
}

static const hub_ctl_param *find_param(const hub_ctl_spec *s, long nth, const char *name,
                                       size_t namelen);

static void print_cmd_usage(FILE *f, const hub_ctl_spec *s)
{
    const hub_ctl_param *p;
    char mv[64];
    fprintf(f, "usage: evhubctl [OPTIONS] %s", s->name);
    for (long i = 0; (p = find_param(s, i, NULL, 0)); i++) /* positional ones, in their order */
        fprintf(f, p->required ? " %s" : " [%s]", metavar(mv, sizeof(mv), p->name));
    for (size_t i = 0; i < s->nparams; i++) {
        if (!s->params[i].required && s->params[i].type == HUB_CTL_BOOL)
            fprintf(f, " [--%s]", s->params[i].name);
    }
    fputc('\n', f);
}

/* Print text word-wrapped to WRAP_COLS. */
static void print_wrapped(const char *text)
{
    const char *p = text;
    while (*p) { /* each pass consumes at least one byte */
        p += strspn(p, " ");
        size_t take = strcspn(p, "\n");
        if (take > WRAP_COLS) {
            for (take = WRAP_COLS; take > 0 && p[take] != ' ';)
                take--;
            if (take == 0)
                take = strcspn(p, " \n"); /* one long word */
        }
        printf("%.*s\n", (int)take, p);
        p += take;
        if (*p == '\n')
            p++;
    }
}

static void print_cmd_help(const hub_ctl_spec *s)
{
    print_cmd_usage(stdout, s);
    printf("\n");
    print_wrapped(s->summary);
    if (s->help && s->help[0]) {
        printf("\n");
        print_wrapped(s->help);
    }
    if (s->nparams > 0)
        printf("\nparameters:\n");
    for (size_t i = 0; i < s->nparams; i++) {
        const hub_ctl_param *p = &s->params[i];
        int flag = !p->required && p->type == HUB_CTL_BOOL;
        char mv[64], left[160];
        metavar(mv, sizeof(mv), p->name);
        snprintf(left, sizeof(left), "%s%s%s%s", p->required ? "" : "--",
                 p->required ? "" : p->name, p->required || flag ? "" : " ", flag ? "" : mv);
        printf("  %-18s  %s%s%s%s\n", left, p->help, flag ? "" : " (",
               flag ? "" : hub_ctl_type_name(p->type), flag ? "" : ")");
    }
}

static void print_usage(FILE *f)
{
    fprintf(f, "usage: evhubctl [-s SOCKET] [-c CONFIG] [--json] [-t SECONDS] COMMAND [ARGS...]\n"
               "       evhubctl help [COMMAND] | COMMAND --help | --help | --version\n");
}

/* The whole help; with ask_hub, also the commands the running hub adds, if it answers. */
static void print_help(const ctl_opts *o, int ask_hub)
{
    print_usage(stdout);
    printf("\nSends COMMAND to a running evhub over its control socket and prints the answer.\n"
           "\noptions:\n"
           "  -s, --socket SOCKET    a unix socket path, or HOST:PORT or tcp:HOST:PORT for TCP\n"
           "                         (default: $EVHUB_SOCKET, else " DEFAULT_SOCKET ")\n"
           "  -c, --config CONFIG    the control socket of this evhub configuration file\n"
           "  -j, --json             print the JSON-RPC result as received\n"
           "  -t, --timeout SECONDS  how long to wait for the hub (default %d)\n"
           "  -h, --help             this help (evhubctl COMMAND --help: the command's)\n"
           "  -V, --version          print the version\n"
           "\nParameters are positional, required ones first, and optional ones may be left\n"
           "off from the end; any may also be given as --name VALUE (or --name=VALUE),\n"
           "and a boolean as just --name.\n"
           "\ncommands:\n",
           DEFAULT_TIMEOUT / 1000);
    for (size_t i = 0; i < hub_ctl_core_nspecs; i++)
        printf("  %-12s  %s\n", hub_ctl_core_specs[i].name, hub_ctl_core_specs[i].summary);
    json_object *res = NULL, *list = NULL;
    ctl_opts quick = *o;
    quick.timeout_ms = o->timeout_ms < HELP_LOOKUP_MS ? o->timeout_ms : HELP_LOOKUP_MS;
    if (ask_hub && fetch_commands(&quick, 1, &res, &list) == CTL_EXIT_OK) {
        for (size_t i = 0, shown = 0; i < json_object_array_length(list); i++) {
            json_object *cmd = json_object_array_get_idx(list, i);
            const char *name = member_string(cmd, "name"), *sum = member_string(cmd, "summary");
            if (!name || hub_ctl_core_spec(name))
                continue;
            if (shown++ == 0)
                printf("\ncommands the hub at %s adds:\n", o->socket);
            printf("  %-12s  %s\n", name, sum ? sum : "");
        }
    }
    json_object_put(res);
    printf("\nexit status:\n"
           "  0  success\n"
           "  1  the hub answered with an error\n"
           "  2  usage error: unknown command, bad arguments, unreadable CONFIG\n"
           "  3  cannot connect to the hub\n"
           "  4  no valid reply: timeout, connection closed early, not JSON-RPC\n");
}

/* ---- arguments to params ---- */

/* Add name = text to params as the param's type. Returns 0, or -1 after a usage error. */
static int add_value(json_object *params, const char *cmd, const hub_ctl_param *p, const char *text)
{
    json_object *v = NULL;
    char *end;
    if (p->type == HUB_CTL_INT) {
        errno = 0;
        long long n = strtoll(text, &end, 10);
        if (text[0] && !isspace((unsigned char)text[0]) && *end == '\0' && errno == 0)
            v = json_object_new_int64(n);
    } else if (p->type == HUB_CTL_BOOL) {
        if (!strcmp(text, "true") || !strcmp(text, "false"))
            v = json_object_new_boolean(text[0] == 't');
    } else {
        v = json_object_new_string(text);
    }
    if (!v) {
        fprintf(stderr, "evhubctl: %s: %s must be %s, not '%s'\n", cmd, p->name,
                p->type == HUB_CTL_INT ? "an integer" : "true or false", text);
        return -1;
    }
    json_object_object_add(params, p->name, v); /* a repeated --name: the last one wins */
    return 0;
}

/* Positional arguments fill the required params in spec order, then the optional ones
 * that are not flags. The nth positional param (nth >= 0), or the param called name
 * (namelen bytes); NULL if none. */
static const hub_ctl_param *find_param(const hub_ctl_spec *s, long nth, const char *name,
                                       size_t namelen)
{
    for (int pass = 0; pass < 2 && nth >= 0; pass++) {
        for (size_t i = 0; i < s->nparams; i++) {
            const hub_ctl_param *p = &s->params[i];
            int positional = pass == 0 ? p->required : !p->required && p->type != HUB_CTL_BOOL;
            if (positional && nth-- == 0)
                return p;
        }
    }
    for (size_t i = 0; i < s->nparams && nth < 0; i++) {
        const hub_ctl_param *p = &s->params[i];
        if (strlen(p->name) == namelen && strncmp(p->name, name, namelen) == 0)
            return p;
    }
    return NULL;
}

/* Map argv[*i] (and, for --name VALUE, the next one) into params. Returns 0, 1 for --help,
 * or -1 after a usage error. */
static int take_arg(const hub_ctl_spec *s, int argc, char **argv, int *i, int *opts_done,
                    long *npos, json_object *params)
{
    const char *a = argv[*i], *name = a + 2, *eq = strchr(name, '=');
    if (!*opts_done && (!strcmp(a, "--help") || !strcmp(a, "-h")))
        return 1;
    if (!*opts_done && !strcmp(a, "--"))
        return (*opts_done = 1) - 1;
    if (*opts_done || a[0] != '-' || !a[1] || isdigit((unsigned char)a[1])) {
        const hub_ctl_param *p = find_param(s, (*npos)++, NULL, 0);
        if (!p)
            fprintf(stderr, "evhubctl: %s: too many arguments at '%s'\n", s->name, a);
        return p ? add_value(params, s->name, p, a) : -1;
    }
    const hub_ctl_param *p =
        a[1] == '-' ? find_param(s, -1, name, eq ? (size_t)(eq - name) : strlen(name)) : NULL;
    if (!p) {
        fprintf(stderr, "evhubctl: %s: unknown option '%s'\n", s->name, a);
        return -1;
    }
    if (eq || p->type == HUB_CTL_BOOL)
        return add_value(params, s->name, p, eq ? eq + 1 : "true");
    if (*i + 1 < argc)
        return add_value(params, s->name, p, argv[++*i]);
    fprintf(stderr, "evhubctl: %s: --%s needs a value\n", s->name, p->name);
    return -1;
}

/* Build the params object from ARGS. Returns 0 with *out (the caller owns it), 1 for --help,
 * or -1 after a usage error. */
static int build_params(const hub_ctl_spec *s, int argc, char **argv, json_object **out)
{
    json_object *params = json_object_new_object();
    int opts_done = 0, rc = 0;
    long npos = 0;
    char mv[64];
    for (int i = 0; i < argc && rc == 0; i++)
        rc = take_arg(s, argc, argv, &i, &opts_done, &npos, params);
    for (size_t i = 0; i < s->nparams && rc == 0; i++) {
        const hub_ctl_param *p = &s->params[i];
        if (p->required && !json_object_object_get_ex(params, p->name, NULL)) {
            fprintf(stderr, "evhubctl: %s: missing %s\n", s->name,
                    metavar(mv, sizeof(mv), p->name));
            rc = -1;
        }
    }
    if (rc == 0)
        *out = params;
    else
        json_object_put(params);
    return rc;
}

/* ---- output ---- */

/* Columns s takes: UTF-8 continuation bytes take none. */
static size_t text_width(const char *s)
{
    size_t w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

/* Print s with control characters as '?' so that no value breaks the layout; a newline
 * continues at column nl_indent instead when nl_indent >= 0. */
static void put_text(const char *s, int nl_indent)
{
    for (; *s; s++) {
        if (*s == '\n' && nl_indent >= 0)
            printf("\n%*s", nl_indent, "");
        else
            putchar((unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s);
    }
}

/* A value as one cell or line: strings raw, null "-", empty containers "(none)", other
 * values as compact JSON. The text lives as long as v. */
static const char *value_text(json_object *v)
{
    if (!v)
        return "-";
    if (json_object_is_type(v, json_type_string))
        return json_object_get_string(v);
    if ((json_object_is_type(v, json_type_array) && json_object_array_length(v) == 0) ||
        (json_object_is_type(v, json_type_object) && json_object_object_length(v) == 0))
        return "(none)";
    return json_object_to_json_string_ext(v,
                                          JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
}

/* A non-empty array of objects only: printed as a table. */
static int is_table(json_object *v)
{
    if (!json_object_is_type(v, json_type_array) || json_object_array_length(v) == 0)
        return 0;
    for (size_t i = 0; i < json_object_array_length(v); i++) {
        if (!json_object_is_type(json_object_array_get_idx(v, i), json_type_object))
            return 0;
    }
    return 1;
}

/* A header row of the first object's keys (up to MAX_COLS), then one aligned row per object. */
static void print_table(json_object *rows, int indent)
{
    json_object *first = json_object_array_get_idx(rows, 0);
    size_t nrows = json_object_array_length(rows), ncols = 0, w[MAX_COLS];
    const char *keys[MAX_COLS];
    json_object_object_foreach(first, key, unused)
    {
        (void)unused;
        if (ncols < MAX_COLS) {
            keys[ncols] = key;
            w[ncols++] = text_width(key);
        }
    }
    for (size_t r = 0; r < nrows; r++) {
        for (size_t c = 0; c < ncols; c++) {
            size_t cw = text_width(value_text(member(json_object_array_get_idx(rows, r), keys[c])));
            w[c] = cw > w[c] ? cw : w[c];
        }
    }
    for (size_t r = 0; r <= nrows; r++) { /* row 0 is the header */
        printf("%*s", indent, "");
        for (size_t c = 0; c < ncols; c++) {
            json_object *row = r ? json_object_array_get_idx(rows, r - 1) : NULL;
            const char *t = r == 0 ? keys[c] : value_text(member(row, keys[c]));
            put_text(t, -1);
            printf("%*s", c + 1 < ncols ? (int)(w[c] - text_width(t) + 2) : 0, "");
        }
        putchar('\n');
    }
}

static int is_block(json_object *v)
{
    return is_table(v) ||
           (json_object_is_type(v, json_type_object) && json_object_object_length(v) > 0);
}

/* Aligned "key  value" lines; a nested object or a table is an indented block under its key. */
static void print_object(json_object *obj, int indent)
{
    size_t w = 0;
    json_object_object_foreach(obj, k, v)
    {
        if (!is_block(v) && text_width(k) > w)
            w = text_width(k);
    }
    json_object_object_foreach(obj, key, val)
    {
        printf("%*s", indent, "");
        put_text(key, -1);
        if (is_table(val)) {
            printf(":\n");
            print_table(val, indent + 2);
        } else if (is_block(val)) {
            printf(":\n");
            print_object(val, indent + 2);
        } else {
            printf("%*s", (int)(w - text_width(key) + 2), "");
            put_text(value_text(val), indent + (int)w + 2);
            putchar('\n');
        }
    }
}

static void print_result(json_object *r)
{
    /* {"clients":[...]}: just the table, or "(none)". */
    if (json_object_is_type(r, json_type_object) && json_object_object_length(r) == 1) {
        struct json_object_iterator it = json_object_iter_begin(r);
        json_object *only = json_object_iter_peek_value(&it);
        if (is_table(only) ||
            (json_object_is_type(only, json_type_array) && json_object_array_length(only) == 0))
            r = only;
    }
    if (json_object_is_type(r, json_type_string)) {
        /* Text meant to be read as is, like the Prometheus format. */
        size_t n = (size_t)json_object_get_string_len(r);
        fwrite(json_object_get_string(r), 1, n, stdout);
        printf(n == 0 || json_object_get_string(r)[n - 1] != '\n' ? "\n" : "");
    } else if (is_table(r)) {
        print_table(r, 0);
    } else if (json_object_is_type(r, json_type_object) && json_object_object_length(r) > 0) {
        print_object(r, 0);
    } else {
        printf("%s\n", value_text(r));
    }
}

/* ---- main ---- */

/* Run COMMAND ARGS: look its spec up, build the request, print the answer. */
static int run_command(const ctl_opts *o, const char *name, int argc, char **argv, int help)
{
    remote_spec rs = {0};
    const hub_ctl_spec *s = NULL;
    json_object *params = NULL, *result = NULL;
    int rc = lookup_spec(o, name, &rs, &s);
    if (rc != CTL_EXIT_OK)
        return rc; /* lookup_spec said why; rs holds nothing */
    int b = help ? 1 : build_params(s, argc, argv, &params);
    if (b == 1) {
        print_cmd_help(s);
    } else if (b < 0) {
        print_cmd_usage(stderr, s);
        rc = CTL_EXIT_USAGE;
    } else if ((rc = rpc_call(o, s->name, params, 0, &result)) == CTL_EXIT_OK) {
        if (o->json)
            printf("%s\n", json_object_to_json_string_ext(
                               result, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE));
        else
            print_result(result);
    }
    json_object_put(result);
    remote_spec_free(&rs);
    return rc;
}

/* Parse -t SECONDS (fractions allowed) into ms. Returns 0 or -1. */
static int parse_timeout(const char *s, long *ms)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (!s[0] || isspace((unsigned char)s[0]) || *end || errno || !(d > 0) || d > 86400.0 * 365)
        return -1;
    *ms = (long)(d * 1000) > 0 ? (long)(d * 1000) : 1;
    return 0;
}

/* The socket: -s, else CONFIG's (its unix socket, else its loopback TCP port), else
 * $EVHUB_SOCKET, else the default. Returns CTL_EXIT_OK, or another CTL_EXIT_* after saying why. */
static int resolve_socket(ctl_opts *o, const char *config)
{
    static hub_config cfg; /* static: it is large, and o->socket may point into it */
    const char *env = getenv("EVHUB_SOCKET");
    char err[1024];
    if (!o->socket && !config)
        o->socket = env && env[0] ? env : DEFAULT_SOCKET;
    if (o->socket)
        return CTL_EXIT_OK;
    hub_config_defaults(&cfg);
    if (hub_config_load_core(&cfg, config, err, sizeof(err)) < 0) {
        fprintf(stderr, "evhubctl: %s\n", err);
        return CTL_EXIT_USAGE;
    }
    if (!cfg.control_socket[0] && cfg.control_tcp[0])
        snprintf(cfg.control_socket, sizeof(cfg.control_socket), "tcp:%s", cfg.control_tcp);
    if (!cfg.control_socket[0])
        fprintf(stderr, "evhubctl: %s has no control socket ([control] socket or tcp)\n", config);
    o->socket = cfg.control_socket;
    return cfg.control_socket[0] ? CTL_EXIT_OK : CTL_EXIT_CONNECT;
}

/* Say what is wrong (what, then arg quoted, if any), print the usage and return
 * CTL_EXIT_USAGE. */
static int usage_error(const char *what, const char *arg)
{
    fprintf(stderr, "evhubctl: %s%s%s%s\n", what, arg ? " '" : "", arg ? arg : "", arg ? "'" : "");
    print_usage(stderr);
    return CTL_EXIT_USAGE;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"socket", required_argument, NULL, 's'},
                                             {"config", required_argument, NULL, 'c'},
                                             {"json", no_argument, NULL, 'j'},
                                             {"timeout", required_argument, NULL, 't'},
                                             {"help", no_argument, NULL, 'h'},
                                             {"version", no_argument, NULL, 'V'},
                                             {NULL, 0, NULL, 0}};
    ctl_opts o = {.socket = NULL, .json = 0, .timeout_ms = DEFAULT_TIMEOUT};
    const char *config = NULL;
    int opt, help = 0, rc;

    /* '+': options end at COMMAND, whose own --options are left to it. */
    while ((opt = getopt_long(argc, argv, "+s:c:jt:hV", longopts, NULL)) != -1) {
        if (opt == 's') {
            o.socket = optarg;
        } else if (opt == 'c') {
            config = optarg;
        } else if (opt == 'j') {
            o.json = 1;
        } else if (opt == 'h') {
            help = 1;
        } else if (opt == 'V') {
            printf("evhubctl %s\n", EVHUB_VERSION);
            return CTL_EXIT_OK;
        } else if (opt != 't') {
            print_usage(stderr); /* getopt said what is wrong */
            return CTL_EXIT_USAGE;
        } else if (parse_timeout(optarg, &o.timeout_ms) < 0) {
            return usage_error("-t wants a number of seconds, not", optarg);
        }
    }
    if (optind >= argc && help) {
        print_help(&o, 0); /* offline: --help works without a hub or a readable CONFIG */
        return CTL_EXIT_OK;
    }
    if (optind >= argc)
        return usage_error("no command given (see evhubctl help)", NULL);
    if ((rc = resolve_socket(&o, config)) != CTL_EXIT_OK)
        return rc;
    if (strcmp(argv[optind], "help") == 0 && argc - optind == 1) {
        print_help(&o, 1);
        return CTL_EXIT_OK;
    }
    if (strcmp(argv[optind], "help") != 0)
        return run_command(&o, argv[optind], argc - optind - 1, argv + optind + 1, help);
    if (argc - optind == 2)
        return run_command(&o, argv[optind + 1], 0, NULL, 1);
    return usage_error("help takes one command at most, not also", argv[optind + 2]);
}
