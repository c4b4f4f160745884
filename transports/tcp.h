/* The tcp: socket of the event interface (OpenSIPS event_stream): JSON-RPC 2.0 over one
 * persistent TCP connection per socket URI, one document per line. This header holds the
 * pure URI parser (unit-tested); the module itself is tcp_module. */
#ifndef TR_TCP_H
#define TR_TCP_H

#include <stddef.h>

#define TR_TCP_NAME_MAX 64 /* bytes in a method or an event_param key */

/* tcp:HOST:PORT[/METHOD][?OPTION=VALUE[&...]] with HOST a name, an IPv4 address or an IPv6
 * address in brackets; options reliable=0|1, timeout=MS, event_param=KEY (empty: none),
 * queue=N override the [tcp] section for this socket. */
typedef struct tr_tcp_uri {
    char host[256]; /* without brackets */
    char port[6];
    int family;                            /* AF_INET/AF_INET6 for an address, AF_UNSPEC a name */
    char method[TR_TCP_NAME_MAX + 1];      /* "" : the event's name */
    int reliable;                          /* -1: the [tcp] default */
    int timeout_ms;                        /* -1: the [tcp] default */
    int queue;                             /* -1: the [tcp] default */
    int has_event_param;                   /* 0: the [tcp] default */
    char event_param[TR_TCP_NAME_MAX + 1]; /* "" (with has_event_param): none */
} tr_tcp_uri;

/* Parse uri (the whole URI, "tcp:" included). 0, or -EINVAL with err set to the reason. */
int tr_tcp_uri_parse(const char *uri, tr_tcp_uri *out, char *err, size_t errlen);
/* 0 when s[0..len) may be a method or an event_param key: 1..64 of letters, digits and
 * _ . - : / (nothing JSON would need to escape), else -EINVAL. */
int tr_tcp_name_check(const char *s, size_t len);

#endif
