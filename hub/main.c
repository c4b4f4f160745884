/* evhub: command line, configuration, and the hub's life from start to exit. */
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hub/config.h"
#include "hub/hub.h"
#include "hub/log.h"
#include "lua/hlua.h"

#define DEFAULT_CONFIG "/etc/evhub/evhub.conf"

static void usage(FILE *f)
{
    fprintf(f, "usage: evhub [-c FILE] [-f] [-l LEVEL] [-b ADDR] [-t] [-h] [--version]\n"
               "  -c FILE     configuration file (default " DEFAULT_CONFIG ")\n"
               "  -f          stay in the foreground\n"
               "  -l LEVEL    log level: crit, err, warn, notice, info, debug\n"
               "  -b ADDR     listen on ADDR (host:port or [v6]:port), overriding bind_addr\n"
               "  -t          check the configuration and the script, then exit\n"
               "  -h          this help\n"
               "  --version   print the version\n");
}

/* -t: bind_addr must resolve as the listener will resolve it (nothing is bound: the hub
 * being checked may be running on it). Returns 0 or -1 with err set. */
static int check_bind_addr(const hub_config *cfg, char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    if (hub_config_split_addr(cfg->bind_addr, host, sizeof(host), port, sizeof(port)) < 0) {
        snprintf(err, errlen, "[evapi] bind_addr '%s' is not host:port", cfg->bind_addr);
        return -1;
    }
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "[evapi] bind_addr '%s' cannot be resolved: %s", cfg->bind_addr,
                 gai_strerror(rc));
        return -1;
    }
    freeaddrinfo(res);
    return 0;
}

/* Everything after the file is read; cfg (its modules' sections included) stays the
 * caller's. */
static int run(hub_config *cfg, const char *path, int check, int foreground)
{
    char err[1024];
    hub_log_set_level(cfg->log_level);
    hub_log_set_syslog(cfg->log_syslog, "evhub");

    if (check) {
        if (check_bind_addr(cfg, err, sizeof(err)) < 0 ||
            hub_check_script(cfg, &hlua_script_ops, err, sizeof(err)) < 0) {
            fprintf(stderr, "evhub: %s\n", err);
            return 1;
        }
        printf("evhub: %s: configuration and script %s are valid\n", path, cfg->script);
        return 0;
    }
    if (!foreground && daemon(1, 1) < 0) {
        fprintf(stderr, "evhub: cannot daemonize: %s\n", strerror(errno));
        return 1;
    }
    hub *h = hub_new(cfg, &hlua_script_ops, err, sizeof(err));
    if (!h || hub_start(h, err, sizeof(err)) < 0) {
        hub_log_write(HUB_LOG_CRIT, "cannot start: %s", err);
        hub_destroy(h);
        return 1;
    }
    hub_log(HUB_LOG_NOTICE, "evhub %s started (config %s, script %s)", EVHUB_VERSION, path,
            cfg->script);
    int rc = hub_run(h);
    hub_destroy(h);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"version", no_argument, NULL, 'V'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    const char *path = DEFAULT_CONFIG, *level = NULL, *bind = NULL;
    int foreground = 0, check = 0, opt;
    char err[1024];
    hub_config cfg;

    while ((opt = getopt_long(argc, argv, "c:fl:b:th", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 'f':
            foreground = 1;
            break;
        case 'l':
            level = optarg;
            break;
        case 'b':
            bind = optarg;
            break;
        case 't':
            check = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("evhub %s\n", EVHUB_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "evhub: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    hub_config_defaults(&cfg);
    if (hub_config_load(&cfg, path, err, sizeof(err)) < 0) {
        fprintf(stderr, "evhub: %s\n", err);
        return 1;
    }
    if ((level && hub_config_set(&cfg, "log", "level", level, err, sizeof(err)) < 0) ||
        (bind && hub_config_set(&cfg, "evapi", "bind_addr", bind, err, sizeof(err)) < 0)) {
        fprintf(stderr, "evhub: command line: %s\n", err);
        hub_config_free(&cfg);
        return 1;
    }
    int rc = run(&cfg, path, check, foreground);
    hub_config_free(&cfg); /* the modules' sections: the hub only borrowed them */
    return rc;
}
