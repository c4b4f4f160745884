/* Unit tests for the tcp: socket URI parser (transports/tcp.c): hosts (names, IPv4, [IPv6]),
 * ports, methods, query options, and the garbage each must refuse with a reason. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "transports/tcp.h"

static void test_tcp_uri_ipv4_port(void **state)
{
    tr_tcp_uri u;
    char err[128] = "";
    (void)state;
    assert_int_equal(tr_tcp_uri_parse("tcp:127.0.0.1:8080", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_string_equal(u.port, "8080");
    assert_int_equal(u.family, AF_INET);
    assert_string_equal(u.method, "");
    assert_int_equal(u.reliable, -1);
    assert_int_equal(u.timeout_ms, -1);
    assert_int_equal(u.queue, -1);
    assert_int_equal(u.has_event_param, 0);
}

static void test_tcp_uri_method(void **state)
{
    tr_tcp_uri u;
    char err[128] = "";
    (void)state;
    assert_int_equal(tr_tcp_uri_parse("tcp:10.0.0.1:1/block_ip", &u, err, sizeof(err)), 0);
    assert_string_equal(u.method, "block_ip");
    assert_string_equal(u.port, "1");
    assert_int_equal(tr_tcp_uri_parse("tcp:10.0.0.1:65535/a.b-c:d/e", &u, err, sizeof(err)), 0);
    assert_string_equal(u.method, "a.b-c:d/e");
    assert_string_equal(u.port, "65535");
}

static void test_tcp_uri_ipv6_brackets(void **state)
{
    tr_tcp_uri u;
    char err[128] = "";
    (void)state;
    assert_int_equal(tr_tcp_uri_parse("tcp:[::1]:8080/m", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.family, AF_INET6);
    assert_string_equal(u.method, "m");
    assert_int_equal(tr_tcp_uri_parse("tcp:[2001:db8::7]:9", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "2001:db8::7");
}

static void test_tcp_uri_host_names(void **state)
{
    tr_tcp_uri u;
    char err[128] = "";
    (void)state;
    assert_int_equal(tr_tcp_uri_parse("tcp:localhost:80", &u, err, sizeof(err)), 0);
    assert_int_equal(u.family, AF_UNSPEC);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(tr_tcp_uri_parse("tcp:rpc-1.example.org:80/x", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "rpc-1.example.org");
    assert_int_equal(tr_tcp_uri_parse("tcp:my_host:80", &u, err, sizeof(err)), 0);
}

static void test_tcp_uri_options(void **state)
{
    tr_tcp_uri u;
    char err[128] = "";
    (void)state;
    assert_int_equal(
        tr_tcp_uri_parse("tcp:127.0.0.1:8080/m?reliable=1&timeout=500&event_param=ev&queue=7", &u,
                         err, sizeof(err)),
        0);
    assert_string_equal(u.method, "m");
    assert_int_equal(u.reliable, 1);
    assert_int_equal(u.timeout_ms, 500);
    assert_int_equal(u.queue, 7);
    assert_int_equal(u.has_event_param, 1);
    assert_string_equal(u.event_param, "ev");
    /* options without a method; an empty event_param turns the [tcp] one off */
    assert_int_equal(
        tr_tcp_uri_parse("tcp:127.0.0.1:8080?event_param=&reliable=0", &u, err, sizeof(err)), 0);
    assert_string_equal(u.method, "");
    assert_int_equal(u.has_event_param, 1);
    assert_string_equal(u.event_param, "");
    assert_int_equal(u.reliable, 0);
}

/* Each bad URI is refused with a reason naming what is wrong. */
static void test_tcp_uri_garbage(void **state)
{
    static const struct {
        const char *uri, *why;
    } bad[] = {
        {"", "tcp:"},
        {"udp:1.2.3.4:5", "tcp:"},
        {"tcp:", "tcp:HOST:PORT"},
        {"tcp:127.0.0.1", "tcp:HOST:PORT"},
        {"tcp:127.0.0.1:", "port"},
        {"tcp:127.0.0.1:0", "port"},
        {"tcp:127.0.0.1:65536", "port"},
        {"tcp:127.0.0.1:80x", "port"},
        {"tcp:127.0.0.1:-1", "port"},
        {"tcp::80", "host"},
        {"tcp:1.2.3.256:80", "IPv4"},
        {"tcp:::1:80", "host"},
        {"tcp:[::1:80", "]"},
        {"tcp:[::1]80", "':'"},
        {"tcp:[zz::1]:80", "IPv6"},
        {"tcp:[]:80", "IPv6"},
        {"tcp:ho st:80", "host"},
        {"tcp:h\"x:80", "host"},
        {"tcp:h:80/", "method"},
        {"tcp:h:80/bad method", "method"},
        {"tcp:h:80/q\"uote", "method"},
        {"tcp:h:80/m?", "NAME=VALUE"},
        {"tcp:h:80?reliable", "NAME=VALUE"},
        {"tcp:h:80?reliable=2", "reliable"},
        {"tcp:h:80?timeout=0", "timeout"},
        {"tcp:h:80?timeout=abc", "timeout"},
        {"tcp:h:80?queue=0", "queue"},
        {"tcp:h:80?event_param=a b", "event_param"},
        {"tcp:h:80?nope=1", "unknown option"},
        {"tcp:h:80?reliable=1&", "NAME=VALUE"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        tr_tcp_uri u;
        char err[160] = "";
        int rc = tr_tcp_uri_parse(bad[i].uri, &u, err, sizeof(err));
        if (rc != -EINVAL || !strstr(err, bad[i].why))
            fail_msg("%s: rc %d, err '%s' (wanted -EINVAL and '%s')", bad[i].uri, rc, err,
                     bad[i].why);
    }
}

static void test_tcp_uri_long_host_refused(void **state)
{
    char uri[400], err[128];
    tr_tcp_uri u;
    (void)state;
    memset(uri, 'a', sizeof(uri));
    memcpy(uri, "tcp:", 4);
    memcpy(uri + 300, ":80", 4);
    assert_int_equal(tr_tcp_uri_parse(uri, &u, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "host"));
}

static void test_tcp_name_check(void **state)
{
    char long_name[TR_TCP_NAME_MAX + 2];
    (void)state;
    assert_int_equal(tr_tcp_name_check("E_PIKE_BLOCKED", 14), 0);
    assert_int_equal(tr_tcp_name_check("a.b-c:d/e", 9), 0);
    assert_int_equal(tr_tcp_name_check("", 0), -EINVAL);
    assert_int_equal(tr_tcp_name_check("a\"b", 3), -EINVAL);
    assert_int_equal(tr_tcp_name_check("a\\b", 3), -EINVAL);
    memset(long_name, 'x', sizeof(long_name));
    assert_int_equal(tr_tcp_name_check(long_name, TR_TCP_NAME_MAX), 0);
    assert_int_equal(tr_tcp_name_check(long_name, TR_TCP_NAME_MAX + 1), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tcp_uri_ipv4_port),         cmocka_unit_test(test_tcp_uri_method),
        cmocka_unit_test(test_tcp_uri_ipv6_brackets),     cmocka_unit_test(test_tcp_uri_host_names),
        cmocka_unit_test(test_tcp_uri_options),           cmocka_unit_test(test_tcp_uri_garbage),
        cmocka_unit_test(test_tcp_uri_long_host_refused), cmocka_unit_test(test_tcp_name_check),
    };
    return cmocka_run_group_tests_name("tcp", tests, NULL, NULL);
}
