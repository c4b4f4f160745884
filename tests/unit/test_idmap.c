/* Unit tests for the id -> pointer map (hub/idmap.c). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "hub/alloc.h"
#include "hub/idmap.h"

static void *tag_of(uint64_t id) { return (void *)(uintptr_t)(id * 7 + 1); }

static void test_idmap_put_get_replace_and_del(void **state)
{
    hub_idmap m = {0};
    (void)state;
    assert_null(hub_idmap_get(&m, 5));
    assert_int_equal(hub_idmap_put(&m, 0, tag_of(0)), -EINVAL);
    assert_int_equal(hub_idmap_put(&m, 5, tag_of(5)), 0);
    assert_ptr_equal(hub_idmap_get(&m, 5), tag_of(5));
    assert_int_equal(hub_idmap_put(&m, 5, tag_of(6)), 0);
    assert_int_equal(m.len, 1);
    assert_ptr_equal(hub_idmap_del(&m, 5), tag_of(6));
    assert_null(hub_idmap_del(&m, 5));
    assert_int_equal(m.len, 0);
    hub_idmap_free(&m);
}

/* Deleting from the middle of probe runs must never hide a later member: insert many
 * (colliding) ids, delete a pseudo-random half, check every one. */
static void test_idmap_deletes_keep_every_other_id_reachable(void **state)
{
    enum { N = 20000 };
    hub_idmap m = {0};
    static unsigned char gone[N + 1];
    (void)state;
    for (uint64_t id = 1; id <= N; id++)
        assert_int_equal(hub_idmap_put(&m, id << 20, tag_of(id)), 0);
    srand(7);
    for (int i = 0; i < N; i++) {
        uint64_t id = 1 + (uint64_t)rand() % N;
        void *p = hub_idmap_del(&m, id << 20);
        if (gone[id])
            assert_null(p);
        else
            assert_ptr_equal(p, tag_of(id));
        gone[id] = 1;
    }
    size_t left = 0;
    for (uint64_t id = 1; id <= N; id++) {
        void *p = hub_idmap_get(&m, id << 20);
        if (gone[id]) {
            assert_null(p);
        } else {
            assert_ptr_equal(p, tag_of(id));
            left++;
        }
    }
    assert_int_equal(m.len, left);
    hub_idmap_free(&m);
}

static int fail_calloc_now;
static void *failing_calloc(size_t n, size_t size)
{
    return fail_calloc_now ? NULL : calloc(n, size);
}

static void test_idmap_put_reports_oom_and_keeps_the_map(void **state)
{
    hub_idmap m = {0};
    hub_allocator a = {malloc, failing_calloc, realloc, free};
    (void)state;
    hub_set_allocator(&a);
    assert_int_equal(hub_idmap_put(&m, 1, tag_of(1)), 0);
    fail_calloc_now = 1;
    int rc = 0;
    uint64_t id = 2;
    for (; id < 1000 && rc == 0; id++)
        rc = hub_idmap_put(&m, id, tag_of(id));
    assert_int_equal(rc, -ENOMEM);
    fail_calloc_now = 0;
    for (uint64_t k = 1; k < id - 1; k++)
        assert_ptr_equal(hub_idmap_get(&m, k), tag_of(k));
    assert_null(hub_idmap_get(&m, id - 1));
    hub_set_allocator(NULL);
    hub_idmap_free(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idmap_put_get_replace_and_del),
        cmocka_unit_test(test_idmap_deletes_keep_every_other_id_reachable),
        cmocka_unit_test(test_idmap_put_reports_oom_and_keeps_the_map),
    };
    return cmocka_run_group_tests_name("idmap", tests, NULL, NULL);
}
