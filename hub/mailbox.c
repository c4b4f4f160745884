/* The loop's mailbox: any thread hands a closure to the loop thread (libuv's uv_async plus a
 * work-item list). One door for workers' commands, the reload check, and every module
 * thread: a mutex-guarded FIFO and one ev_async, so posts from one thread run in the order
 * they were made, and a burst of posts costs one wake-up. */
#include <errno.h>
#include <time.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"

/* A node made by hub_loop_post for a caller's (fn, arg): freed once fn ran. */
typedef struct plain_post {
    hub_post node;
    hub_post_fn fn;
    void *arg;
} plain_post;

static void run_plain(hub *h, hub_post *p)
{
    plain_post *pp = (plain_post *)p;
    hub_post_fn fn = pp->fn;
    void *arg = pp->arg;
    hub_free(pp);
    fn(h, arg);
}

void hub__post_chain(hub *h, hub_post *head, hub_post *tail)
{
    /* Results completed from now on must not join a batch posted before this (module.c) */
    if (hub_on_loop(h))
        h->rb_open = NULL;
    pthread_mutex_lock(&h->mbox_mu);
    if (h->mbox_tail)
        h->mbox_tail->next = head;
    else
        h->mbox_head = head;
    h->mbox_tail = tail;
    pthread_mutex_unlock(&h->mbox_mu);
    ev_async_send(h->loop, &h->mbox_w);
}

static void post_plain(hub *h, plain_post *pp, hub_post_fn fn, void *arg)
{
    pp->node.next = NULL;
    pp->node.run = run_plain;
    pp->fn = fn;
    pp->arg = arg;
    hub__post_chain(h, &pp->node, &pp->node);
}

int hub_loop_post(hub *h, hub_post_fn fn, void *arg)
{
    plain_post *pp = hub_malloc(sizeof(*pp));
    if (!pp)
        return -ENOMEM;
    post_plain(h, pp, fn, arg);
    return 0;
}

void *hub__malloc_retry(size_t size)
{
    void *p;
    /* Bounded only by memory coming back: the caller's answer must get through. */
    while (!(p = hub_malloc(size))) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return p;
}

void hub_loop_post_retry(hub *h, hub_post_fn fn, void *arg)
{
    post_plain(h, hub__malloc_retry(sizeof(plain_post)), fn, arg);
}

/* Runs what was posted before this wake-up; what is posted meanwhile waits for the next. */
static void run_all(hub *h)
{
    pthread_mutex_lock(&h->mbox_mu);
    hub_post *list = h->mbox_head;
    h->mbox_head = h->mbox_tail = NULL;
    pthread_mutex_unlock(&h->mbox_mu);
    for (size_t bound = 0; list && bound < SIZE_MAX; bound++) {
        hub_post *p = list;
        list = p->next;
        p->run(h, p); /* p belongs to run from here */
    }
}

void hub__mailbox_run(hub *h) { run_all(h); }

static void mbox_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    hub *h = w->data;
    (void)loop, (void)revents;
    run_all(h);
    hub__tags_sweep(h);
}

void hub__mailbox_init(hub *h)
{
    pthread_mutex_init(&h->mbox_mu, NULL);
    ev_async_init(&h->mbox_w, mbox_cb);
    h->mbox_w.data = h;
    ev_async_start(h->loop, &h->mbox_w);
}

void hub__mailbox_drain(hub *h)
{
    /* At exit, once no other thread can post: what is left runs with h->stopping set, so
     * each closure can answer or free what it carries. Closures may post again. */
    for (int round = 0; h->mbox_head && round < 1000; round++)
        run_all(h);
}

void hub__mailbox_free(hub *h) { pthread_mutex_destroy(&h->mbox_mu); }
