/* Unit tests for the events module's JSON writer (transports/json_text.c): exact text for
 * the simple cases, escapes, big integers, doubles left to json-c, deep trees, and every
 * document parsing back equal to the tree it came from. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "transports/json_text.h"

/* The text of the document src parses to, as tr_json_append writes it (valid until the
 * next call). */
static const char *text_of(const char *src, tr_buf *b)
{
    static char out[4096];
    json_object *o = json_tokener_parse(src);
    if (!o && strcmp(src, "null") != 0)
        fail_msg("test JSON does not parse: %s", src);
    b->len = 0;
    assert_int_equal(tr_json_append(b, o), 0);
    json_object_put(o);
    assert_true(b->len < sizeof(out));
    memcpy(out, b->data, b->len);
    out[b->len] = '\0';
    return out;
}

static void test_json_exact_text(void **state)
{
    static const char *const same[] = {
        "{}",
        "[]",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "\"\"",
        "{\"a\":1,\"b\":[1,\"two\",null,true,{}],\"c\":{\"d\":\"e\"}}",
        "[[[[]]]]",
        "\"caf\xc3\xa9 \xe2\x82\xac\"",
        "\"a/b\"",
    };
    tr_buf b = {0};
    (void)state;
    for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++)
        assert_string_equal(text_of(same[i], &b), same[i]);
    tr_buf_free(&b);
}

static void test_json_escapes(void **state)
{
    tr_buf b = {0};
    (void)state;
    assert_string_equal(text_of("\"q\\\"b\\\\n\\nr\\rt\\tb\\bf\\f\"", &b),
                        "\"q\\\"b\\\\n\\nr\\rt\\tb\\bf\\f\"");
    assert_string_equal(text_of("\"\\u0001\\u001f\\u007f\"", &b), "\"\\u0001\\u001f\x7f\"");
    assert_string_equal(text_of("{\"k\\\"ey\":\"\\u0000x\"}", &b), "{\"k\\\"ey\":\"\\u0000x\"}");
    tr_buf_free(&b);
}

/* Whatever the writer makes, json-c reads back as the same tree. */
static void test_json_round_trip(void **state)
{
    static const char *const docs[] = {
        "{\"pi\":3.25,\"e\":-2.5e-300,\"big\":1e300,\"i\":42}",
        "[0.1,1.5,-0.0,100.0]",
        "{\"nested\":{\"a\":[{\"b\":[{\"c\":\"\\u00e9\\n\\\"\"}]}]}}",
        "{\"ip\":\"192.168.2.11\",\"list\":[3,5],\"none\":null}",
    };
    tr_buf b = {0};
    (void)state;
    for (size_t i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
        json_object *want = json_tokener_parse(docs[i]);
        const char *t = text_of(docs[i], &b);
        json_object *got = json_tokener_parse(t);
        if (!got || !json_object_equal(want, got))
            fail_msg("%s wrote %s", docs[i], t);
        json_object_put(want);
        json_object_put(got);
    }
    tr_buf_free(&b);
}

/* Deeper than the writer recurses: json-c writes the rest, and it still parses back. */
static void test_json_deep_tree(void **state)
{
    tr_buf b = {0};
    json_object *root = json_object_new_array(), *cur = root;
    (void)state;
    for (int i = 0; i < 200; i++) {
        json_object *next = json_object_new_array();
        json_object_array_add(cur, next);
        cur = next;
    }
    json_object_array_add(cur, json_object_new_int(7));
    assert_int_equal(tr_json_append(&b, root), 0);
    assert_int_equal(b.len, 200 * 2 + 2 + 1);
    assert_memory_equal(b.data + 201, "7", 1);
    json_object_put(root);
    tr_buf_free(&b);
}

static void test_json_appends(void **state)
{
    tr_buf b = {0};
    json_object *o = json_object_new_string("x");
    (void)state;
    for (int i = 0; i < 1000; i++)
        assert_int_equal(tr_json_append(&b, o), 0);
    assert_int_equal(b.len, 3000);
    assert_memory_equal(b.data + 2997, "\"x\"", 3);
    json_object_put(o);
    tr_buf_free(&b);
    assert_null(b.data);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_exact_text), cmocka_unit_test(test_json_escapes),
        cmocka_unit_test(test_json_round_trip), cmocka_unit_test(test_json_deep_tree),
        cmocka_unit_test(test_json_appends),
    };
    return cmocka_run_group_tests_name("events_json", tests, NULL, NULL);
}
