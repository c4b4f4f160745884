/* Unit tests for the events module's pure parts (transports/events.c): event names, the
 * evapi:TAG socket URI, and subscriptions' expiry arithmetic. Delivery, reports and the
 * control commands are covered by tests/integration/test_events.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>

#include <cmocka.h>

#include "transports/events.h"

static void test_event_name_rules(void **state)
{
    char name[TR_EVENT_NAME_MAX + 2];
    (void)state;
    assert_int_equal(tr_event_name_check("E_PIKE_BLOCKED", 14), 0);
    assert_int_equal(tr_event_name_check("a.b-c_9", 7), 0);
    assert_int_equal(tr_event_name_check("", 0), -EINVAL);
    assert_int_equal(tr_event_name_check(NULL, 3), -EINVAL);
    assert_int_equal(tr_event_name_check("E X", 3), -EINVAL);
    assert_int_equal(tr_event_name_check("E:X", 3), -EINVAL);
    assert_int_equal(tr_event_name_check("E/X", 3), -EINVAL);
    assert_int_equal(tr_event_name_check("\xc3\xa9", 2), -EINVAL);
    memset(name, 'E', sizeof(name));
    assert_int_equal(tr_event_name_check(name, TR_EVENT_NAME_MAX), 0);
    assert_int_equal(tr_event_name_check(name, TR_EVENT_NAME_MAX + 1), -EINVAL);
}

static void test_evapi_uri_good(void **state)
{
    char tag[65], err[128];
    (void)state;
    assert_int_equal(tr_evapi_uri_parse("evapi:pbx1", tag, err, sizeof(err)), 0);
    assert_string_equal(tag, "pbx1");
    assert_int_equal(tr_evapi_uri_parse("evapi:a:b/c?d", tag, err, sizeof(err)), 0);
    assert_string_equal(tag, "a:b/c?d");
}

static void test_evapi_uri_bad(void **state)
{
    static const char *const bad[] = {"evapi:",    "evapi",      "tcp:x",
                                      "evapi:a b", "evapi:a\tb", "evapi:\x7f"};
    char tag[65], err[128], uri[80];
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        if (tr_evapi_uri_parse(bad[i], tag, err, sizeof(err)) != -EINVAL || !err[0])
            fail_msg("'%s' accepted (or refused without a reason)", bad[i]);
    }
    /* the tag limit is the hub's: 64 bytes */
    memcpy(uri, "evapi:", 6);
    memset(uri + 6, 't', 64);
    uri[70] = '\0';
    assert_int_equal(tr_evapi_uri_parse(uri, tag, err, sizeof(err)), 0);
    assert_int_equal(strlen(tag), 64);
    uri[70] = 't';
    uri[71] = '\0';
    assert_int_equal(tr_evapi_uri_parse(uri, tag, err, sizeof(err)), -EINVAL);
}

static void test_expiry_never(void **state)
{
    (void)state;
    assert_true(tr_sub_deadline(100.0, 0) == 0);
    assert_false(tr_sub_expired(0, 1e12));
}

static void test_expiry_deadline(void **state)
{
    double d = tr_sub_deadline(100.0, 5);
    (void)state;
    assert_true(d == 105.0);
    assert_false(tr_sub_expired(d, 104.999));
    assert_true(tr_sub_expired(d, 105.0));
    assert_true(tr_sub_expired(d, 200.0));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_event_name_rules), cmocka_unit_test(test_evapi_uri_good),
        cmocka_unit_test(test_evapi_uri_bad),    cmocka_unit_test(test_expiry_never),
        cmocka_unit_test(test_expiry_deadline),
    };
    return cmocka_run_group_tests_name("events", tests, NULL, NULL);
}
