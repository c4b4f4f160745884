/* Unit tests for the tag index (hub/tags.c) on a bare hub with fake clients. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"

#define NCLIENTS 8

typedef struct fixture {
    hub h;
    hub_client c[NCLIENTS];
} fixture;

static int setup(void **state)
{
    fixture *f = test_calloc(1, sizeof(*f));
    pthread_rwlock_init(&f->h.tags_lock, NULL);
    for (int i = 0; i < NCLIENTS; i++) {
        f->c[i].h = &f->h;
        f->c[i].id = (uint64_t)i + 1;
        f->c[i].info.conidx = i;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    hub__tags_free(&f->h);
    pthread_rwlock_destroy(&f->h.tags_lock);
    test_free(f);
    return 0;
}

/* As the loop's own set_tag does: intent and membership together. */
static int set_tag(hub *h, hub_client *c, const char *tag, size_t len)
{
    int rc = hub__tag_intent(h, c->id, tag, len, 1);
    return rc < 0 ? rc : hub__tag_set(h, c, tag, len);
}

static int set(fixture *f, int i, const char *tag)
{
    return set_tag(&f->h, &f->c[i], tag, strlen(tag));
}

static void test_tag_valid_accepts_printable_up_to_64_bytes(void **state)
{
    char t64[65], t65[66];
    (void)state;
    memset(t64, 'a', 64);
    t64[64] = '\0';
    memset(t65, 'a', 65);
    t65[65] = '\0';
    assert_true(hub_tag_valid("pbx1", 4));
    assert_true(hub_tag_valid(t64, 64));
    assert_false(hub_tag_valid(t65, 65));
    assert_false(hub_tag_valid("", 0));
    assert_false(hub_tag_valid("a b", 3));
    assert_false(hub_tag_valid("a\0b", 3));
    assert_false(hub_tag_valid("tab\t", 4));
}

static void test_tag_set_rejects_invalid_tag(void **state)
{
    fixture *f = *state;
    assert_int_equal(set(f, 0, "has space"), -EINVAL);
    assert_null(f->c[0].tag);
}

static void test_tag_members_kept_in_conidx_order(void **state)
{
    fixture *f = *state;
    assert_int_equal(set(f, 3, "subs"), 0);
    assert_int_equal(set(f, 1, "subs"), 0);
    assert_int_equal(set(f, 2, "other"), 0);
    assert_int_equal(set(f, 0, "subs"), 0);
    hub_tag *t = hub__tag_find(&f->h, "subs", 4);
    assert_non_null(t);
    assert_int_equal(t->nmembers, 3);
    /* Kamailio's unicast takes the lowest slot with the tag, whatever the tagging order. */
    assert_ptr_equal(t->head, &f->c[0]);
    assert_ptr_equal(t->head->tag_next, &f->c[1]);
    assert_ptr_equal(t->tail, &f->c[3]);
    assert_ptr_equal(t->tail->tag_prev, &f->c[1]);
    assert_null(t->head->tag_prev);
    assert_int_equal(hub__tag_count(&f->h, "subs", 4), 3);
    assert_int_equal(hub__tag_count(&f->h, "other", 5), 1);
    assert_int_equal(hub__tag_count(&f->h, "none", 4), 0);
}

static void test_tag_retag_moves_client_and_frees_empty_tag(void **state)
{
    fixture *f = *state;
    assert_int_equal(set(f, 0, "a"), 0);
    assert_int_equal(set(f, 0, "b"), 0);
    assert_null(hub__tag_find(&f->h, "a", 1));
    assert_int_equal(hub__tag_count(&f->h, "b", 1), 1);
    assert_int_equal(f->h.ntags, 1);
    assert_int_equal(set_tag(&f->h, &f->c[0], NULL, 0), 0);
    assert_null(f->c[0].tag);
    assert_null(hub__tag_find(&f->h, "b", 1));
    assert_int_equal(f->h.ntags, 0);
}

static void test_tag_same_tag_twice_keeps_position(void **state)
{
    fixture *f = *state;
    assert_int_equal(set(f, 0, "x"), 0);
    assert_int_equal(set(f, 1, "x"), 0);
    hub_tag *t = hub__tag_find(&f->h, "x", 1);
    t->rr = &f->c[0];
    /* a no-op: taking the client out and back would move the round-robin cursor on */
    assert_int_equal(set(f, 0, "x"), 0);
    assert_int_equal(t->nmembers, 2);
    assert_ptr_equal(t->head, &f->c[0]);
    assert_ptr_equal(t->rr, &f->c[0]);
}

static void test_tag_removing_rr_cursor_advances_it(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 3; i++)
        assert_int_equal(set(f, i, "rr"), 0);
    hub_tag *t = hub__tag_find(&f->h, "rr", 2);
    t->rr = &f->c[1];
    assert_int_equal(set_tag(&f->h, &f->c[1], NULL, 0), 0);
    assert_ptr_equal(t->rr, &f->c[2]);
    assert_ptr_equal(t->head->tag_next, &f->c[2]);
    assert_ptr_equal(f->c[2].tag_prev, &f->c[0]);
}

static void test_tag_index_grows_with_many_tags(void **state)
{
    fixture *f = *state;
    enum { N = 2000 };
    static hub_client many[N];
    char name[16];
    memset(many, 0, sizeof(many));
    for (int i = 0; i < N; i++) {
        many[i].h = &f->h;
        many[i].id = 1000 + (uint64_t)i;
        snprintf(name, sizeof(name), "t%d", i);
        assert_int_equal(set_tag(&f->h, &many[i], name, strlen(name)), 0);
    }
    assert_true(f->h.tagtab_cap >= N / 2);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "t%d", i);
        assert_int_equal(hub__tag_count(&f->h, name, strlen(name)), 1);
    }
    for (int i = 0; i < N; i++)
        set_tag(&f->h, &many[i], NULL, 0);
    assert_int_equal(f->h.ntags, 0);
}

static void test_tag_worker_intent_counts_before_the_loop_applies_it(void **state)
{
    fixture *f = *state;
    set(f, 1, "old");
    /* A worker moves client 1 from "old" to "new": counts change at once. */
    assert_int_equal(hub__tag_intent(&f->h, f->c[1].id, "new", 3, 0), 0);
    assert_int_equal(hub__tag_count(&f->h, "new", 3), 1);
    assert_int_equal(hub__tag_count(&f->h, "old", 3), 0);
    /* Membership still says "old" until the loop runs the command. */
    assert_ptr_equal(hub__tag_find(&f->h, "old", 3)->head, &f->c[1]);
    assert_null(hub__tag_find(&f->h, "new", 3)->head);
    assert_int_equal(hub__tag_set(&f->h, &f->c[1], "new", 3), 0);
    assert_null(hub__tag_find(&f->h, "old", 3));
    assert_ptr_equal(hub__tag_find(&f->h, "new", 3)->head, &f->c[1]);
    /* The connection goes: intent and membership are both cleared, the tag freed. */
    hub__tag_set(&f->h, &f->c[1], NULL, 0);
    hub__tag_intent(&f->h, f->c[1].id, NULL, 0, 1);
    assert_null(hub__tag_find(&f->h, "new", 3));
    assert_int_equal(f->h.ntags, 0);
}

static void test_tag_intent_for_a_closed_id_is_cleared(void **state)
{
    fixture *f = *state;
    /* The worker tags an id the loop has already closed; the loop clears it. */
    assert_int_equal(hub__tag_intent(&f->h, 99, "ghost", 5, 0), 0);
    assert_int_equal(hub__tag_count(&f->h, "ghost", 5), 1);
    assert_int_equal(hub__tag_intent(&f->h, 99, NULL, 0, 1), 0);
    assert_int_equal(hub__tag_count(&f->h, "ghost", 5), 0);
    assert_int_equal(f->h.ntags, 0);
    assert_int_equal(hub__tag_intent(&f->h, 99, "bad tag", 7, 0), -EINVAL);
}

static void test_routing_to_a_tag_with_no_members_yet_reaches_no_one(void **state)
{
    fixture *f = *state;
    /* A worker's set_tag creates the tag before the loop adds the member. */
    assert_int_equal(hub__tag_intent(&f->h, 42, "soon", 4, 0), 0);
    assert_non_null(hub__tag_find(&f->h, "soon", 4));
    assert_int_equal(hub__unicast(&f->h, "soon", 4, "x", 1), 0);
    f->h.cfg.unicast_policy = HUB_UNICAST_RROBIN;
    assert_int_equal(hub__unicast(&f->h, "soon", 4, "x", 1), 0);
    assert_int_equal(hub__multicast(&f->h, "soon", 4, "x", 1), 0);
    hub__tag_intent(&f->h, 42, NULL, 0, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tag_valid_accepts_printable_up_to_64_bytes),
        cmocka_unit_test_setup_teardown(test_tag_set_rejects_invalid_tag, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_members_kept_in_conidx_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_retag_moves_client_and_frees_empty_tag, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_tag_same_tag_twice_keeps_position, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_removing_rr_cursor_advances_it, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_index_grows_with_many_tags, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_worker_intent_counts_before_the_loop_applies_it,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_tag_intent_for_a_closed_id_is_cleared, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_routing_to_a_tag_with_no_members_yet_reaches_no_one,
                                        setup, teardown),
    };
    return cmocka_run_group_tests_name("tags", tests, NULL, NULL);
}
