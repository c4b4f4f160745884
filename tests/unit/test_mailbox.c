/* Unit tests for the loop's mailbox (hub/mailbox.c) and completion tokens (hub/module.c): a
 * bare hub with only a loop and a mailbox, posted to from several threads at once. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <json-c/json.h>

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
    hub__results_free(h);
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

/* ---- results (hub_complete, hub_complete_fields) ---- */

/* A fake engine: what ran, in order. "[r1r2]" one on_results call with tokens 1 and 2 (an
 * "m" after a token: flagged more), "j4" a json completion, "p" a plain post. */
static char trace[4096];
static int nresults;

static void trace_add(const char *s) { strncat(trace, s, sizeof(trace) - strlen(trace) - 1); }

static size_t fake_on_results(hub_script *s, const void *buf, size_t len)
{
    (void)s;
    size_t unknown = 0;
    char one[64];
    trace_add("[");
    for (size_t off = 0; off < len;) {
        const hub_result *r = (const hub_result *)((const char *)buf + off);
        assert_int_equal(r->size % 8, 0);
        assert_true(off + r->size <= len);
        nresults++;
        if (r->token == 1) { /* every kind of field, strings copied with a NUL after */
            assert_int_equal(r->nfields, 3);
            assert_string_equal(r->f[0].name, "msg");
            assert_int_equal(r->f[0].type, HUB_FIELD_STR);
            assert_int_equal(r->f[0].len, 3);
            assert_memory_equal(hub_result_str(r, &r->f[0]), "a\0b\0", 4);
            assert_string_equal(r->f[1].name, "offset");
            assert_int_equal(r->f[1].i, 7);
            assert_int_equal(r->f[2].type, HUB_FIELD_BOOL);
            assert_int_equal(r->f[2].i, 1);
        }
        if (strlen(trace) < 200) {
            snprintf(one, sizeof(one), "r%llu%s", (unsigned long long)r->token,
                     (r->flags & HUB_RESULT_MORE) ? "m" : "");
            trace_add(one);
        }
        if (r->token == 99)
            unknown++;
        off += r->size;
    }
    trace_add("]");
    return unknown;
}

static int fake_on_complete(hub_script *s, uint64_t token, struct json_object *result)
{
    (void)s;
    char one[32];
    assert_non_null(result);
    snprintf(one, sizeof(one), "j%llu", (unsigned long long)token);
    trace_add(one);
    return 0;
}

static const hub_script_ops fake_ops = {.on_results = fake_on_results,
                                        .on_complete = fake_on_complete};

static void note_p(hub *h, void *arg)
{
    (void)h, (void)arg;
    trace_add("p");
}

static hub *results_hub(void)
{
    hub *h = bare_hub();
    h->ops = &fake_ops;
    h->script = (hub_script *)&fake_ops; /* any non-NULL state: the fake ignores it */
    trace[0] = '\0';
    nresults = 0;
    return h;
}

static void complete_one(hub *h, uint64_t token, unsigned more)
{
    hub_field f = {"status", HUB_FIELD_INT, NULL, 0, 0};
    hub_complete_fields(h, token, more, &f, 1);
}

static void *complete_off_loop(void *arg)
{
    complete_one(arg, 6, 0);
    return NULL;
}

/* Results completed on the loop share one mailbox node until something else is posted, so
 * the mailbox's order holds; json and typed results keep their order; another thread's
 * result comes on its own; a token the state does not know is counted. */
static void test_results_batch_in_order_with_other_posts(void **state)
{
    (void)state;
    hub *h = results_hub();
    hub_field f[3] = {{"msg", HUB_FIELD_STR, "a\0b", 3, 0},
                      {"offset", HUB_FIELD_INT, NULL, 0, 7},
                      {"ok", HUB_FIELD_BOOL, NULL, 0, 1}};
    hub_complete_fields(h, 1, 0, f, 3);
    complete_one(h, 2, HUB_RESULT_MORE);
    assert_int_equal(hub_loop_post(h, note_p, NULL), 0);
    complete_one(h, 3, 0);
    hub_complete(h, 4, json_object_new_object());
    complete_one(h, 5, 0);
    complete_one(h, 99, 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, complete_off_loop, h), 0);
    pthread_join(th, NULL);
    assert_string_equal(trace, ""); /* never inside the call: through the mailbox */
    hub__mailbox_drain(h);
    assert_string_equal(trace, "[r1r2m]p[r3]j4[r5r99][r6]");
    assert_int_equal(atomic_load(&h->completions_undelivered), 1);
    bare_hub_free(h);
}

/* Many results: batches fill up and new ones follow (a large result gets its own), in
 * order; the spare batches are kept to a few. */
static void test_results_many_fill_several_batches(void **state)
{
    (void)state;
    hub *h = results_hub();
    static char big[100000];
    memset(big, 'x', sizeof(big));
    hub_field f = {"msg", HUB_FIELD_STR, big, 200, 0};
    for (int i = 0; i < 3000; i++) {
        f.len = i == 1500 ? sizeof(big) : 200;
        hub_complete_fields(h, 1000 + (uint64_t)i, 0, &f, 1);
    }
    hub__mailbox_drain(h);
    assert_int_equal(nresults, 3000);
    assert_int_equal(atomic_load(&h->completions_undelivered), 0);
    assert_true(h->nrb_pool >= 1 && h->nrb_pool <= 4);
    /* a second round reuses them */
    for (int i = 0; i < 3000; i++)
        hub_complete_fields(h, 1000 + (uint64_t)i, 0, &f, 1);
    hub__mailbox_drain(h);
    assert_int_equal(nresults, 6000);
    bare_hub_free(h);
}

/* A result with a field of no name or no known type is logged, counted and dropped, not
 * handed to an engine that would read it differently (or crash on the name). */
static void test_results_malformed_fields_are_refused(void **state)
{
    (void)state;
    hub *h = results_hub();
    hub_field noname = {NULL, HUB_FIELD_INT, NULL, 0, 1};
    hub_field badtype = {"x", 77, NULL, 0, 1};
    hub_field ok[2] = {{"a", HUB_FIELD_INT, NULL, 0, 1}, {"b", 0, NULL, 0, 2}};
    hub_complete_fields(h, 1, 0, &noname, 1);
    hub_complete_fields(h, 2, 0, &badtype, 1);
    hub_complete_fields(h, 3, 0, ok, 2);
    complete_one(h, 4, 0);
    hub__mailbox_drain(h);
    assert_string_equal(trace, "[r4]");
    assert_int_equal(atomic_load(&h->completions_undelivered), 3);
    bare_hub_free(h);
}

/* On the loop, a result without memory is counted, never waited for. */
static void test_results_without_memory_are_counted(void **state)
{
    (void)state;
    hub *h = results_hub();
    const hub_allocator failing = {no_malloc, calloc, realloc, free};
    hub_set_allocator(&failing);
    complete_one(h, 1, 0);
    hub_complete(h, 2, json_object_new_object());
    hub_set_allocator(NULL);
    hub__mailbox_drain(h);
    assert_string_equal(trace, "");
    assert_int_equal(atomic_load(&h->completions_undelivered), 2);
    bare_hub_free(h);
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
        cmocka_unit_test(test_results_batch_in_order_with_other_posts),
        cmocka_unit_test(test_results_many_fill_several_batches),
        cmocka_unit_test(test_results_without_memory_are_counted),
        cmocka_unit_test(test_results_malformed_fields_are_refused),
    };
    return cmocka_run_group_tests_name("mailbox", tests, NULL, NULL);
}
