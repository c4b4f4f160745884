/* Unit tests for the loop's mailbox (hub/mailbox.c) and completion tokens (hub/module.c): a
 * bare hub with only a loop and a mailbox, posted to from several threads at once. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"

enum { POSTERS = 4, PER_POSTER = 20000 };

typedef struct tally {
    int ran;                    /* posts run, loop thread only */
    uint32_t next[POSTERS];     /* the sequence number each poster's next post must carry */
    int out_of_order, off_loop; /* violations seen */
} tally;

typedef struct note {
    tally *t;
    int poster;
    uint32_t seq;
} note;

static hub *bare_hub(void)
{
    hub *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    h->loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(h->loop);
    h->loop_thread = pthread_self();
    pthread_rwlock_init(&h->tags_lock, NULL);
    hub__mailbox_init(h);
    return h;
}

static void bare_hub_free(hub *h)
{
    hub__mailbox_free(h);
    pthread_rwlock_destroy(&h->tags_lock);
    ev_loop_destroy(h->loop);
    free(h);
}

static void count_note(hub *h, void *arg)
{
    note *n = arg;
    tally *t = n->t;
    if (!hub_on_loop(h))
        t->off_loop++;
    if (n->seq != t->next[n->poster])
        t->out_of_order++;
    t->next[n->poster] = n->seq + 1;
    if (++t->ran == POSTERS * PER_POSTER)
        ev_break(h->loop, EVBREAK_ALL);
    free(n);
}

typedef struct poster {
    hub *h;
    tally *t;
    int index;
} poster;

static void *post_many(void *arg)
{
    poster *p = arg;
    for (uint32_t i = 0; i < PER_POSTER; i++) {
        note *n = malloc(sizeof(*n));
        assert_non_null(n);
        *n = (note){p->t, p->index, i};
        if (i % 2)
            hub_loop_post_retry(p->h, count_note, n);
        else
            assert_int_equal(hub_loop_post(p->h, count_note, n), 0);
    }
    return NULL;
}

static void safety_stop(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w, (void)revents;
    ev_break(loop, EVBREAK_ALL);
}

static void test_mailbox_every_post_runs_once_in_order_per_poster(void **state)
{
    (void)state;
    hub *h = bare_hub();
    tally t = {0};
    poster ps[POSTERS];
    pthread_t th[POSTERS];
    ev_timer guard;
    ev_timer_init(&guard, safety_stop, 30.0, 0);
    ev_timer_start(h->loop, &guard);
    for (int i = 0; i < POSTERS; i++) {
        ps[i] = (poster){h, &t, i};
        assert_int_equal(pthread_create(&th[i], NULL, post_many, &ps[i]), 0);
    }
    ev_run(h->loop, 0);
    for (int i = 0; i < POSTERS; i++)
        pthread_join(th[i], NULL);
    hub__mailbox_drain(h); /* nothing left: every post already ran */
    assert_int_equal(t.ran, POSTERS * PER_POSTER);
    assert_int_equal(t.out_of_order, 0);
    assert_int_equal(t.off_loop, 0);
    for (int i = 0; i < POSTERS; i++)
        assert_int_equal(t.next[i], PER_POSTER);
    bare_hub_free(h);
}

static void note_ran(hub *h, void *arg)
{
    (void)h;
    (*(int *)arg)++;
}

/* What is still posted when the loop has stopped runs at exit, once. */
static void test_mailbox_drain_runs_what_the_loop_never_ran(void **state)
{
    (void)state;
    hub *h = bare_hub();
    int ran = 0;
    for (int i = 0; i < 3; i++)
        assert_int_equal(hub_loop_post(h, note_ran, &ran), 0);
    hub__mailbox_drain(h);
    assert_int_equal(ran, 3);
    hub__mailbox_drain(h);
    assert_int_equal(ran, 3);
    bare_hub_free(h);
}

static void *no_malloc(size_t n)
{
    (void)n;
    return NULL;
}

/* A failed post never runs its closure and leaves arg with the caller. */
static void test_mailbox_post_fails_cleanly_without_memory(void **state)
{
    (void)state;
    hub *h = bare_hub();
    int ran = 0;
    const hub_allocator failing = {no_malloc, calloc, realloc, free};
    hub_set_allocator(&failing);
    assert_int_equal(hub_loop_post(h, note_ran, &ran), -ENOMEM);
    hub_set_allocator(NULL);
    hub__mailbox_drain(h);
    assert_int_equal(ran, 0);
    bare_hub_free(h);
}

/* Tokens carry their executor and are never reused, from any thread. */
static void test_tokens_are_unique_and_name_their_executor(void **state)
{
    (void)state;
    hub *h = bare_hub();
    atomic_init(&h->next_token, 1);
    uint64_t a = hub__token_new(h, -1), b = hub__token_new(h, -1), c = hub__token_new(h, 3);
    assert_true(a != 0 && a != b && b != c);
    assert_int_equal(a >> 48, 0);
    assert_int_equal(c >> 48, 4);
    assert_true((c & 0xffffffffffffull) > (b & 0xffffffffffffull));
    bare_hub_free(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mailbox_every_post_runs_once_in_order_per_poster),
        cmocka_unit_test(test_mailbox_drain_runs_what_the_loop_never_ran),
        cmocka_unit_test(test_mailbox_post_fails_cleanly_without_memory),
        cmocka_unit_test(test_tokens_are_unique_and_name_their_executor),
    };
    return cmocka_run_group_tests_name("mailbox", tests, NULL, NULL);
}
