/* Unit tests for the rabbitmq module's pure parts (transports/rabbitmq.c): amqp:// URLs as the
 * AMQP URI spec reads them (vhosts "/" and "", %-escapes), rabbitmq: socket URIs as OpenSIPS
 * event_rabbitmq writes them (defaults, exchange?key, ;vhost=), the URL shown without its
 * password, server ids, and a publish's options; and the garbage each must refuse. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "transports/rabbitmq.h"

static void test_rmq_url_full(void **state)
{
    tr_rmq_target t;
    char err[128] = "";
    (void)state;
    assert_int_equal(
        tr_rmq_url_parse("amqp://bob:s%40cret@mq.example:5673/pbx", &t, err, sizeof(err)), 0);
    assert_string_equal(t.user, "bob");
    assert_string_equal(t.pass, "s@cret");
    assert_string_equal(t.host, "mq.example");
    assert_int_equal(t.port, 5673);
    assert_string_equal(t.vhost, "pbx");
}

static void test_rmq_url_vhosts_and_defaults(void **state)
{
    tr_rmq_target t;
    char err[128] = "";
    (void)state;
    assert_int_equal(tr_rmq_url_parse("amqp://h", &t, err, sizeof(err)), 0);
    assert_string_equal(t.vhost, "/"); /* no path: the default vhost */
    assert_string_equal(t.user, "guest");
    assert_string_equal(t.pass, "guest");
    assert_int_equal(t.port, 5672);
    assert_int_equal(tr_rmq_url_parse("amqp://h/", &t, err, sizeof(err)), 0);
    assert_string_equal(t.vhost, ""); /* "/" alone: the empty vhost, as amqp_parse_url */
    assert_int_equal(tr_rmq_url_parse("amqp://h/%2f", &t, err, sizeof(err)), 0);
    assert_string_equal(t.vhost, "/");
    assert_int_equal(tr_rmq_url_parse("amqp://u@[::1]:1/%2Fa", &t, err, sizeof(err)), 0);
    assert_string_equal(t.host, "::1");
    assert_string_equal(t.user, "u");
    assert_string_equal(t.pass, "");
    assert_string_equal(t.vhost, "/a");
}

static void test_rmq_url_refused(void **state)
{
    static const struct {
        const char *url, *why;
    } bad[] = {
        {"http://h/", "amqp://"},    {"amqps://h/", "TLS"},
        {"amqp://", "host"},         {"amqp://h:0/", "port"},
        {"amqp://h:65536/", "port"}, {"amqp://h:x/", "port"},
        {"amqp://h/a/b", "%2f"},     {"amqp://h/?heartbeat=1", "query"},
        {"amqp://h/%zz", "vhost"},   {"amqp://h/%00", "vhost"},
        {"amqp://:p@h/", "user"},    {"amqp://h h/", "host"},
        {"amqp://[::1/", "']'"},     {NULL, NULL},
    };
    (void)state;
    for (int i = 0; bad[i].url; i++) {
        tr_rmq_target t;
        char err[128] = "";
        assert_int_equal(tr_rmq_url_parse(bad[i].url, &t, err, sizeof(err)), -EINVAL);
        if (!strstr(err, bad[i].why))
            fail_msg("%s: reason '%s' lacks '%s'", bad[i].url, err, bad[i].why);
    }
}

static void test_rmq_uri_seed_forms(void **state)
{
    tr_rmq_target t;
    char err[128] = "";
    (void)state;
    /* the two spellings of OpenSIPS' example */
    assert_int_equal(
        tr_rmq_uri_parse("rabbitmq:guest:guest@127.0.0.1:5672/pike", &t, err, sizeof(err)), 0);
    assert_string_equal(t.routing_key, "pike");
    assert_string_equal(t.exchange, "");
    assert_string_equal(t.vhost, "/");
    assert_int_equal(tr_rmq_uri_parse("rabbitmq:127.0.0.1/pike", &t, err, sizeof(err)), 0);
    assert_string_equal(t.user, "guest");
    assert_string_equal(t.pass, "guest");
    assert_int_equal(t.port, 5672);
    assert_string_equal(t.host, "127.0.0.1");
    assert_string_equal(t.routing_key, "pike");
    /* exchange?key, a user without a password, %-escapes, a vhost */
    assert_int_equal(tr_rmq_uri_parse("rabbitmq:ops@mq:5673/amq.topic?calls.%3Bnew;vhost=%2Fpbx",
                                      &t, err, sizeof(err)),
                     0);
    assert_string_equal(t.user, "ops");
    assert_string_equal(t.pass, "");
    assert_string_equal(t.host, "mq");
    assert_int_equal(t.port, 5673);
    assert_string_equal(t.exchange, "amq.topic");
    assert_string_equal(t.routing_key, "calls.;new");
    assert_string_equal(t.vhost, "/pbx");
    /* a fanout exchange needs no key */
    assert_int_equal(tr_rmq_uri_parse("rabbitmq:h/fan?", &t, err, sizeof(err)), 0);
    assert_string_equal(t.exchange, "fan");
    assert_string_equal(t.routing_key, "");
}

static void test_rmq_uri_refused(void **state)
{
    static const struct {
        const char *uri, *why;
    } bad[] = {
        {"tcp:h/k", "rabbitmq:"},
        {"rabbitmq:h", "expected"},
        {"rabbitmq:/k", "host"},
        {"rabbitmq:h:99999/k", "port"},
        {"rabbitmq:h/", "routing key"},
        {"rabbitmq:h/?", "routing key"},
        {"rabbitmq:h/k;colour=red", "unknown option"},
        {"rabbitmq:h/k;vhost=%G0", "vhost"},
        {"rabbitmq:h/e%?k", "exchange"},
        {NULL, NULL},
    };
    (void)state;
    for (int i = 0; bad[i].uri; i++) {
        tr_rmq_target t;
        char err[128] = "";
        assert_int_equal(tr_rmq_uri_parse(bad[i].uri, &t, err, sizeof(err)), -EINVAL);
        if (!strstr(err, bad[i].why))
            fail_msg("%s: reason '%s' lacks '%s'", bad[i].uri, err, bad[i].why);
    }
}

static void test_rmq_desc_hides_the_password(void **state)
{
    tr_rmq_target t;
    char err[128] = "", d[300];
    (void)state;
    assert_int_equal(tr_rmq_url_parse("amqp://bob:secret@h:5/%2fa%20b", &t, err, sizeof(err)), 0);
    tr_rmq_target_desc(&t, d, sizeof(d));
    assert_string_equal(d, "amqp://bob@h:5/%2fa%20b");
    assert_int_equal(tr_rmq_url_parse("amqp://[::1]", &t, err, sizeof(err)), 0);
    tr_rmq_target_desc(&t, d, sizeof(d));
    assert_string_equal(d, "amqp://guest@[::1]:5672/%2f");
}

static void test_rmq_id_check(void **state)
{
    (void)state;
    assert_int_equal(tr_rmq_id_check("r1", 2), 0);
    assert_int_equal(tr_rmq_id_check("a_b-C9", 6), 0);
    assert_int_equal(tr_rmq_id_check("", 0), -EINVAL);
    assert_int_equal(tr_rmq_id_check("a b", 3), -EINVAL);
    assert_int_equal(tr_rmq_id_check("abcdefghijklmnopqrstuvwxyz0123456", 33), -EINVAL);
}

static void test_rmq_opts(void **state)
{
    tr_rmq_opts o;
    char err[160] = "";
    (void)state;
    assert_int_equal(tr_rmq_opts_parse(NULL, &o, err, sizeof(err)), 0);
    assert_null(o.content_type);
    assert_int_equal(o.persistent, 0);
    assert_int_equal(o.mandatory, 0);
    json_object *j = json_tokener_parse("{\"content_type\":\"text/plain\",\"persistent\":true,"
                                        "\"mandatory\":true,\"headers\":{\"a\":\"b\",\"n\":1,"
                                        "\"f\":1.5,\"t\":false}}");
    assert_int_equal(tr_rmq_opts_parse(j, &o, err, sizeof(err)), 0);
    assert_string_equal(o.content_type, "text/plain");
    assert_int_equal(o.content_type_len, 10);
    assert_int_equal(o.persistent, 1);
    assert_int_equal(o.mandatory, 1);
    assert_non_null(o.headers);
    json_object_put(j);
    static const struct {
        const char *json, *why;
    } bad[] = {
        {"[1]", "table"},
        {"{\"colour\":1}", "unknown option 'colour'"},
        {"{\"persistent\":1}", "boolean"},
        {"{\"content_type\":5}", "string"},
        {"{\"headers\":[1]}", "headers"},
        {"{\"headers\":{\"x\":{\"y\":1}}}", "'x'"},
        {NULL, NULL},
    };
    for (int i = 0; bad[i].json; i++) {
        j = json_tokener_parse(bad[i].json);
        assert_int_equal(tr_rmq_opts_parse(j, &o, err, sizeof(err)), -EINVAL);
        if (!strstr(err, bad[i].why))
            fail_msg("%s: reason '%s' lacks '%s'", bad[i].json, err, bad[i].why);
        json_object_put(j);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmq_url_full),    cmocka_unit_test(test_rmq_url_vhosts_and_defaults),
        cmocka_unit_test(test_rmq_url_refused), cmocka_unit_test(test_rmq_uri_seed_forms),
        cmocka_unit_test(test_rmq_uri_refused), cmocka_unit_test(test_rmq_desc_hides_the_password),
        cmocka_unit_test(test_rmq_id_check),    cmocka_unit_test(test_rmq_opts),
    };
    return cmocka_run_group_tests_name("rabbitmq", tests, NULL, NULL);
}
