/* The rabbitmq module: publishing to RabbitMQ (rabbitmq-c 0.11) from scripts, from evhubctl
 * and as the rabbitmq: socket of the event interface (OpenSIPS event_rabbitmq). rabbitmq-c
 * blocks, so every server connection has its own thread and a bounded queue: the loop and
 * the workers only hand messages to it; the thread connects, services heartbeats, reads
 * publisher confirms and returns, reconnects with a backoff, and reports every message
 * (confirmed, or failed with a reason) back through the mailbox. This header holds the pure
 * parsers (unit-tested); the module itself is rabbitmq_module. */
#ifndef TR_RABBITMQ_H
#define TR_RABBITMQ_H

#include <stddef.h>

struct json_object;

#define TR_RMQ_ID_MAX    32  /* bytes in a server id */
#define TR_RMQ_SHORT_MAX 255 /* an AMQP short string: exchange, routing key, vhost, host */
#define TR_RMQ_CRED_MAX  127 /* bytes in a user name or a password */

/* Where and how to connect, from an amqp:// URL or a rabbitmq: socket URI. */
typedef struct tr_rmq_target {
    char host[TR_RMQ_SHORT_MAX + 1];
    int port;
    char user[TR_RMQ_CRED_MAX + 1];
    char pass[TR_RMQ_CRED_MAX + 1];
    char vhost[TR_RMQ_SHORT_MAX + 1];
    /* rabbitmq: sockets only */
    char exchange[TR_RMQ_SHORT_MAX + 1];
    char routing_key[TR_RMQ_SHORT_MAX + 1];
} tr_rmq_target;

/* amqp://[user[:pass]@]host[:port][/vhost] as the AMQP URI spec (and rabbitmq-c's
 * amqp_parse_url): fields %-escaped, no path means vhost "/", "/" alone means vhost "",
 * "/%2f" is "/". amqps:// is refused (no TLS here). 0, or -EINVAL with err set. */
int tr_rmq_url_parse(const char *url, tr_rmq_target *out, char *err, size_t errlen);

/* rabbitmq:[user[:password]@]host[:port]/[exchange?]routing_key[;vhost=VHOST] (the
 * OpenSIPS event_rabbitmq syntax plus a vhost): defaults guest/guest, port 5672, exchange ""
 * (the default exchange), vhost "/". Every field is %-unescaped (write ';' as %3B and a '/'
 * vhost as %2F). 0, or -EINVAL with err set. */
int tr_rmq_uri_parse(const char *uri, tr_rmq_target *out, char *err, size_t errlen);

/* "amqp://user@host:port/vhost" (vhost %-escaped, no password), for logs and status. */
void tr_rmq_target_desc(const tr_rmq_target *t, char *buf, size_t len);

/* 0 when s is a valid server id: 1..TR_RMQ_ID_MAX of letters, digits, '_' and '-'. */
int tr_rmq_id_check(const char *s, size_t len);

/* A publish's options as a script gives them (a JSON object, or NULL): content_type (string),
 * headers (object of strings, integers, numbers, booleans), persistent (boolean, default
 * false), mandatory (boolean, default false). 0 with the fields set, or -EINVAL with err set.
 * *headers is borrowed from opts. */
typedef struct tr_rmq_opts {
    const char *content_type; /* NULL: none */
    size_t content_type_len;
    struct json_object *headers; /* NULL: none */
    int persistent;
    int mandatory;
} tr_rmq_opts;
int tr_rmq_opts_parse(struct json_object *opts, tr_rmq_opts *out, char *err, size_t errlen);

#endif
