/* Unit tests for the SIP module's (index, label) table and its datagram check. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <cmocka.h>
#include <osipparser2/osip_parser.h>

#include "transports/sip_msg.h"

static void test_take_until_full_then_release(void **state)
{
    (void)state;
    tr_sip_slots t;
    int objs[4];
    unsigned idx[4], lab[4];
    assert_int_equal(tr_sip_slots_init(&t, 3), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tr_sip_slots_take(&t, &objs[i], &idx[i], &lab[i]), 0);
        assert_int_equal(idx[i], (unsigned)i + 1); /* lowest first */
        assert_true(lab[i] != 0);
        assert_ptr_equal(tr_sip_slots_get(&t, idx[i], lab[i]), &objs[i]);
    }
    assert_int_equal(tr_sip_slots_take(&t, &objs[3], &idx[3], &lab[3]), -ENOSPC);
    tr_sip_slots_release(&t, idx[1], lab[1]);
    assert_null(tr_sip_slots_get(&t, idx[1], lab[1]));
    assert_int_equal(tr_sip_slots_take(&t, &objs[3], &idx[3], &lab[3]), 0);
    assert_int_equal(idx[3], idx[1]);                  /* the index is reused... */
    assert_true(lab[3] != lab[1]);                     /* ...under a new label */
    assert_null(tr_sip_slots_get(&t, idx[1], lab[1])); /* the old pair names nothing */
    assert_ptr_equal(tr_sip_slots_get(&t, idx[3], lab[3]), &objs[3]);
    tr_sip_slots_free(&t);
}

static void test_stale_and_bogus_pairs(void **state)
{
    (void)state;
    tr_sip_slots t;
    int o;
    unsigned i, l;
    assert_int_equal(tr_sip_slots_init(&t, 2), 0);
    assert_null(tr_sip_slots_get(&t, 0, 1));
    assert_null(tr_sip_slots_get(&t, 3, 1));
    assert_null(tr_sip_slots_get(&t, 1, 0));
    assert_int_equal(tr_sip_slots_take(&t, &o, &i, &l), 0);
    assert_null(tr_sip_slots_get(&t, i, l + 1));
    tr_sip_slots_release(&t, i, l + 1); /* a stale pair releases nothing */
    assert_ptr_equal(tr_sip_slots_get(&t, i, l), &o);
    tr_sip_slots_release(&t, i, l);
    tr_sip_slots_release(&t, i, l); /* twice: no double free of the index */
    assert_int_equal(t.nfree, 2);
    /* a slot's labels: never 0, never the one before, and not a counter one could guess */
    unsigned prev = l;
    int sequential = 0;
    for (int k = 0; k < 10000; k++) {
        assert_int_equal(tr_sip_slots_take(&t, &o, &i, &l), 0);
        assert_true(l != 0 && l != prev);
        sequential += l == prev + 1;
        prev = l;
        tr_sip_slots_release(&t, i, l);
    }
    assert_true(sequential < 5);
    tr_sip_slots_free(&t);
}

static void test_parse_checks_what_a_transaction_needs(void **state)
{
    (void)state;
    struct osip_message *m;
    const char *why;
    assert_int_equal(tr_sip_parser_init(), 0);
    const char ok[] = "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4:5060;branch=z9hG4bK1\r\n"
                      "From: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n"
                      "Content-Length: 0\r\n\r\n";
    assert_int_equal(tr_sip_parse(ok, sizeof(ok) - 1, &m, &why), 0);
    assert_string_equal(m->sip_method, "OPTIONS");
    osip_message_free(m);
    const char nocseq[] = "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4\r\n"
                          "From: <sip:x@y>\r\nTo: <sip:a@b>\r\nCall-ID: c1\r\n\r\n";
    assert_int_equal(tr_sip_parse(nocseq, sizeof(nocseq) - 1, &m, &why), -1);
    assert_null(m);
    assert_non_null(strstr(why, "missing"));
    assert_int_equal(tr_sip_parse("\x01\x02garbage", 9, &m, &why), -1);
    assert_non_null(why);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_take_until_full_then_release),
        cmocka_unit_test(test_stale_and_bogus_pairs),
        cmocka_unit_test(test_parse_checks_what_a_transaction_needs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
