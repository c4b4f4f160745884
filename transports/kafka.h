/* The kafka module (librdkafka): named producers a script publishes to (kafka.publish,
 * KSR.kafka.send), and kafka: subscribers of the event interface. Delivery reports reach the
 * loop through librdkafka's queue event fd, watched by an ev_io: no poll thread. This header
 * gives the pure parts, for the tests. */
#ifndef TR_KAFKA_H
#define TR_KAFKA_H

#include <stddef.h>

#include <librdkafka/rdkafka.h>

#define TR_KAFKA_ID_MAX    43  /* bytes in a connection id ([kafka:ID], or [ID] of a broker line) */
#define TR_KAFKA_PROPS_MAX 32  /* g./t. properties in one broker line or kafka: URI */
#define TR_KAFKA_TEXT_MAX  512 /* bytes of a broker line or URI, scheme included */

/* One "[ID]brokers/topic?props" broker line, or one "kafka:brokers/topic?props" URI, split.
 * The strings point into buf. */
typedef struct tr_kafka_uri {
    char id[TR_KAFKA_ID_MAX + 1]; /* broker lines only */
    const char *brokers;          /* "host:port[,host:port...]" */
    const char *topic;
    struct {
        const char *name; /* "g.linger.ms", "t.acks" (prefix kept) */
        const char *value;
    } props[TR_KAFKA_PROPS_MAX];
    int nprops;
    int key_callid; /* URIs only: key=callid */
    char buf[TR_KAFKA_TEXT_MAX + 1];
} tr_kafka_uri;

/* OpenSIPS' broker_id: "[ID]host:port[,host:port...]/topic[?g.prop=v&t.prop=v...]". 0, or
 * -EINVAL with err set to the reason. Properties are split, not checked (tr_kafka_prop_set). */
int tr_kafka_broker_parse(const char *line, tr_kafka_uri *u, char *err, size_t errlen);
/* The event interface's socket: "kafka:host:port[,...]/topic[?g.prop=v&t.prop=v&key=callid]".
 * 0, or -EINVAL with err set. Properties are split and checked by librdkafka (no I/O). */
int tr_kafka_uri_parse(const char *uri, tr_kafka_uri *u, char *err, size_t errlen);
/* Set "g.NAME" (a global property) or "t.NAME" (a topic property) to value on conf, as
 * librdkafka checks it (a topic property is checked on a topic config, then set on conf,
 * whose default topic config it becomes part of). 0, or -EINVAL with err set to "NAME = VALUE:
 * librdkafka's reason". */
int tr_kafka_prop_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *err,
                      size_t errlen);

#endif
