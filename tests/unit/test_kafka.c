/* Unit tests for the kafka module's pure parts (transports/kafka.c): OpenSIPS' broker lines,
 * kafka: socket URIs and the g./t. properties as librdkafka checks them. Producing, reports,
 * outages and the control command are covered by tests/integration/test_kafka.py against
 * librdkafka's mock cluster. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>

#include <cmocka.h>

#include "transports/kafka.h"

static void test_kafka_broker_line_is_split(void **state)
{
    tr_kafka_uri u;
    char err[256];
    (void)state;
    assert_int_equal(tr_kafka_broker_parse("[k1]127.0.0.1:9092,10.0.0.2:9093/events?g.linger.ms=5"
                                           "&t.acks=all",
                                           &u, err, sizeof(err)),
                     0);
    assert_string_equal(u.id, "k1");
    assert_string_equal(u.brokers, "127.0.0.1:9092,10.0.0.2:9093");
    assert_string_equal(u.topic, "events");
    assert_int_equal(u.nprops, 2);
    assert_string_equal(u.props[0].name, "g.linger.ms");
    assert_string_equal(u.props[0].value, "5");
    assert_string_equal(u.props[1].name, "t.acks");
    assert_string_equal(u.props[1].value, "all");
    assert_int_equal(u.key_callid, 0);
    /* no properties at all */
    assert_int_equal(tr_kafka_broker_parse("[a_b-9]h:1/t.x-y_z", &u, err, sizeof(err)), 0);
    assert_string_equal(u.id, "a_b-9");
    assert_string_equal(u.topic, "t.x-y_z");
    assert_int_equal(u.nprops, 0);
}

static void test_kafka_bad_broker_lines_say_why(void **state)
{
    static const struct {
        const char *line, *why;
    } cases[] = {
        {"k1 h:1/t", "broker: expected [ID]BROKERS/TOPIC[?PROPS]"},
        {"[]h:1/t", "broker: the [ID] must be"},
        {"[a b]h:1/t", "broker: the [ID] must be"},
        {"[k1]h:1", "broker: expected BROKERS/TOPIC"},
        {"[k1]/t", "broker: expected BROKERS/TOPIC"},
        {"[k1]h:1/t/u", "broker: a second '/'"},
        {"[k1]h:1/", "broker: the topic must be"},
        {"[k1]h:1/t?", "broker: nothing after '?'"},
        {"[k1]h:1/t?g.linger.ms", "broker: a property needs NAME=VALUE"},
        {"[k1]h:1/t?g.linger.ms=", "broker: a property needs NAME=VALUE"},
        {"[k1]h:1/t?linger.ms=5", "broker: 'linger.ms': a property starts with g."},
        {"[k1]h:1/t?key=callid", "broker: 'key': a property starts with g."},
        {"[k1]h 1/t", "broker: the brokers hold a blank"},
        {"[k1]h:1/t?g.linger.ms=1&t.acks=1&g.linger.ms=2", "broker: 'g.linger.ms' given twice"},
    };
    tr_kafka_uri u;
    char err[256];
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        err[0] = '\0';
        assert_int_equal(tr_kafka_broker_parse(cases[i].line, &u, err, sizeof(err)), -EINVAL);
        if (strncmp(err, cases[i].why, strlen(cases[i].why)) != 0)
            fail_msg("%s: got '%s', want '%s...'", cases[i].line, err, cases[i].why);
    }
}

static void test_kafka_broker_line_of_33_properties_is_refused(void **state)
{
    char line[TR_KAFKA_TEXT_MAX + 1];
    tr_kafka_uri u;
    char err[256];
    (void)state;
    size_t n = (size_t)snprintf(line, sizeof(line), "[k]h:1/t?");
    for (int i = 0; i < TR_KAFKA_PROPS_MAX; i++)
        n += (size_t)snprintf(line + n, sizeof(line) - n, "%sg.a%d=1", i ? "&" : "", i);
    assert_int_equal(tr_kafka_broker_parse(line, &u, err, sizeof(err)), 0);
    assert_int_equal(u.nprops, TR_KAFKA_PROPS_MAX);
    snprintf(line + n, sizeof(line) - n, "&g.b=1");
    assert_int_equal(tr_kafka_broker_parse(line, &u, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "broker: more than 32 properties");
}

static void test_kafka_uri_checks_properties_with_librdkafka(void **state)
{
    tr_kafka_uri u;
    char err[700];
    (void)state;
    assert_int_equal(tr_kafka_uri_parse("kafka:127.0.0.1:9092/calls?g.linger.ms=1&key=callid&"
                                        "t.message.timeout.ms=3000",
                                        &u, err, sizeof(err)),
                     0);
    assert_string_equal(u.brokers, "127.0.0.1:9092");
    assert_string_equal(u.topic, "calls");
    assert_int_equal(u.key_callid, 1);
    assert_int_equal(u.nprops, 2);
    assert_int_equal(tr_kafka_uri_parse("tcp:h:1/t", &u, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "kafka: socket: it must start with kafka:");
    assert_int_equal(tr_kafka_uri_parse("kafka:h:1/t?key=from", &u, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "kafka: socket: key: only key=callid is known");
    assert_int_equal(tr_kafka_uri_parse("kafka:h:1/t?g.no.such=1", &u, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "kafka: socket: g.no.such = 1: No such configuration property"));
    assert_int_equal(tr_kafka_uri_parse("kafka:h:1/t?g.linger.ms=soon", &u, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "g.linger.ms = soon: "));
}

static void test_kafka_properties_global_and_topic(void **state)
{
    char err[700], v[64];
    size_t n;
    (void)state;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    assert_int_equal(tr_kafka_prop_set(conf, "g.linger.ms", "7", err, sizeof(err)), 0);
    n = sizeof(v);
    assert_int_equal(rd_kafka_conf_get(conf, "linger.ms", v, &n), RD_KAFKA_CONF_OK);
    assert_string_equal(v, "7");
    /* a topic property lands in the default topic config */
    assert_int_equal(tr_kafka_prop_set(conf, "t.message.timeout.ms", "1234", err, sizeof(err)), 0);
    const rd_kafka_topic_conf_t *tc = rd_kafka_conf_get_default_topic_conf(conf);
    assert_non_null(tc);
    n = sizeof(v);
    assert_int_equal(rd_kafka_topic_conf_get(tc, "message.timeout.ms", v, &n), RD_KAFKA_CONF_OK);
    assert_string_equal(v, "1234");
    /* t. is checked as a topic property: a global one is refused there */
    assert_int_equal(tr_kafka_prop_set(conf, "t.client.id", "x", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "t.client.id = x: "));
    assert_int_equal(tr_kafka_prop_set(conf, "x.linger.ms", "1", err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "x.linger.ms: a property starts with g. (global) or t. (topic)");
    assert_int_equal(tr_kafka_prop_set(conf, "g.acks", "everyone", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "g.acks = everyone: "));
    rd_kafka_conf_destroy(conf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kafka_broker_line_is_split),
        cmocka_unit_test(test_kafka_bad_broker_lines_say_why),
        cmocka_unit_test(test_kafka_broker_line_of_33_properties_is_refused),
        cmocka_unit_test(test_kafka_uri_checks_properties_with_librdkafka),
        cmocka_unit_test(test_kafka_properties_global_and_topic),
    };
    return cmocka_run_group_tests_name("kafka", tests, NULL, NULL);
}
