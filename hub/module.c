/* The core side of hub/core.h: the modules' life (init, start, drain, stop, free, counters),
 * completions routed back to the state that started the work, and the event interface's
 * seam (one sink, which the events module provides). */
#include <errno.h>
#include <json-c/json.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"
#include "hub/log.h"

struct ev_loop *hub_loop(hub *h) { return h->loop; }

int hub_on_loop(const hub *h) { return pthread_equal(pthread_self(), h->loop_thread); }

int hub_stopping(const hub *h) { return h->stopping; }

hub_ctl *hub_get_ctl(hub *h) { return h->ctl; }

const hub_config *hub_get_config(const hub *h) { return &h->cfg; }

static size_t nmodules(void)
{
    size_t n = 0;
    while (hub_modules[n])
        n++;
    return n;
}

void *hub_module_state(hub *h, const char *name)
{
    for (size_t i = 0; i < h->nmods; i++) {
        if (strcmp(hub_modules[i]->name, name) == 0)
            return h->mod_state[i];
    }
    return NULL;
}

/* The functions modules offer scripts, each with its module's state (NULL: none made). One
 * TABLE.NAME offered twice is an error. */
static hub_script_fn_ref *fn_refs(void *const *states, size_t *n, char *err, size_t errlen)
{
    size_t count = 0;
    for (size_t i = 0; hub_modules[i]; i++) {
        for (const hub_script_fn *f = hub_modules[i]->fns; f && f->name; f++)
            count++;
    }
    hub_script_fn_ref *refs = hub_calloc(count ? count : 1, sizeof(*refs));
    if (!refs) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    *n = 0;
    for (size_t i = 0; hub_modules[i]; i++) {
        for (const hub_script_fn *f = hub_modules[i]->fns; f && f->name; f++) {
            for (size_t j = 0; j < *n; j++) {
                if (strcmp(refs[j].fn->table, f->table) == 0 &&
                    strcmp(refs[j].fn->name, f->name) == 0) {
                    snprintf(err, errlen, "module %s: script function %s.%s is offered twice",
                             hub_modules[i]->name, f->table, f->name);
                    hub_free(refs);
                    return NULL;
                }
            }
            refs[(*n)++] = (hub_script_fn_ref){f, states ? states[i] : NULL};
        }
    }
    return refs;
}

static int collect_fns(hub *h, char *err, size_t errlen)
{
    h->fns = fn_refs(h->mod_state, &h->nfns, err, errlen);
    return h->fns ? 0 : -EINVAL;
}

static hub_script_fn_ref *inert_refs;
static size_t inert_n;
static void make_inert(void)
{
    char err[160];
    inert_refs = fn_refs(NULL, &inert_n, err, sizeof(err));
    if (!inert_refs)
        inert_n = 0;
}

const hub_script_fn_ref *hub__inert_fns(size_t *n)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, make_inert);
    *n = inert_n;
    return inert_refs;
}

int hub__modules_init(hub *h, char *err, size_t errlen)
{
    size_t n = nmodules();
    h->mod_state = hub_calloc(n ? n : 1, sizeof(*h->mod_state));
    if (!h->mod_state) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        const hub_module *m = hub_modules[i];
        h->nmods = i + 1; /* a failed init's half-built state is freed too */
        if (m->init && m->init(h, &h->mod_state[i], err, errlen) < 0) {
            hub_log(HUB_LOG_DEBUG, "module %s: init failed", m->name);
            return -EINVAL;
        }
        h->mods_ready = i + 1;
    }
    return collect_fns(h, err, errlen);
}

int hub__modules_start(hub *h, char *err, size_t errlen)
{
    sigset_t all, old;
    int rc = 0;
    /* Threads a module starts here inherit a mask with every signal blocked: signals belong
     * to the loop thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (size_t i = 0; i < h->mods_ready && rc == 0; i++) {
        const hub_module *m = hub_modules[i];
        if (m->start && (rc = m->start(h->mod_state[i], err, errlen)) < 0)
            hub_log(HUB_LOG_DEBUG, "module %s: start failed", m->name);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

size_t hub__modules_in_flight(hub *h)
{
    size_t n = 0;
    for (size_t i = 0; i < h->mods_ready; i++) {
        if (hub_modules[i]->drain)
            n += hub_modules[i]->drain(h->mod_state[i]);
    }
    return n;
}

void hub__modules_stop(hub *h)
{
    if (h->mods_stopped)
        return;
    h->mods_stopped = 1;
    /* In reverse order: a module stops before those it was built on. */
    for (size_t i = h->mods_ready; i-- > 0;) {
        if (hub_modules[i]->stop)
            hub_modules[i]->stop(h->mod_state[i]);
    }
}

void hub__modules_free(hub *h)
{
    if (!h->mod_state)
        return;
    for (size_t i = h->nmods; i-- > 0;) {
        if (hub_modules[i]->free)
            hub_modules[i]->free(h->mod_state[i]);
    }
    hub_free(h->mod_state);
    h->mod_state = NULL;
    hub_free(h->fns);
    h->fns = NULL;
    h->nfns = 0;
    h->nmods = h->mods_ready = 0;
}

size_t hub__modules_stats(hub *h, hub_stat *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < h->mods_ready; i++) {
        const hub_module *m = hub_modules[i];
        if (m->stats)
            n += m->stats(h->mod_state[i], n < cap ? out + n : NULL, n < cap ? cap - n : 0);
    }
    return n;
}

int hub_config_load(hub_config *c, const char *path, char *err, size_t errlen)
{
    /* Every module's section table, in list order (one more slot for the NULL). */
    const hub_conf_section **tables = hub_calloc(nmodules() + 1, sizeof(*tables));
    if (!tables) {
        snprintf(err, errlen, "%s:0: out of memory", path);
        return -ENOMEM;
    }
    for (size_t i = 0, t = 0; hub_modules[i]; i++) {
        if (hub_modules[i]->sections)
            tables[t++] = hub_modules[i]->sections;
    }
    int rc = hub_config_load_sections(c, path, tables, err, errlen);
    hub_free(tables);
    return rc;
}

/* ---- completions ---- */

/* A token holds the executor that started the work in its top 16 bits (0: the loop, w + 1:
 * worker w) and a hub-wide sequence number below, so a token is never reused and a state
 * loaded later cannot mistake an older one for its own. */
#define TOKEN_EXEC_SHIFT 48

uint64_t hub__token_new(hub *h, int worker)
{
    uint64_t seq = atomic_fetch_add(&h->next_token, 1) & ((1ull << TOKEN_EXEC_SHIFT) - 1);
    return ((uint64_t)(worker + 1) << TOKEN_EXEC_SHIFT) | seq;
}

void hub__complete_undelivered(hub *h, uint64_t token, const char *why)
{
    atomic_fetch_add(&h->completions_undelivered, 1);
    hub_log(HUB_LOG_DEBUG, "completion %llx not delivered: %s", (unsigned long long)token, why);
}

void hub__results_undelivered(hub *h, uint64_t n, const char *why)
{
    if (!n)
        return;
    atomic_fetch_add(&h->completions_undelivered, n);
    hub_log(HUB_LOG_DEBUG, "%llu result(s) not delivered: %s", (unsigned long long)n, why);
}

static int token_exec(uint64_t token) { return (int)(token >> TOKEN_EXEC_SHIFT) - 1; }

/* Loop thread: run the completion in the loop's state, or queue it to its worker. */
static void deliver(hub *h, uint64_t token, json_object *result)
{
    int exec = token_exec(token);
    if (exec >= h->nworkers || (exec >= 0 && h->workers_stopped)) {
        hub__complete_undelivered(h, token, "its worker has stopped");
        json_object_put(result);
        return;
    }
    /* result is owned by the event from here (the pointer travels as its data) */
    if (hub__exec_post(h, exec, HUB_EV_COMPLETE, token, &result, sizeof(result)) < 0) {
        hub__complete_undelivered(h, token, "out of memory");
        json_object_put(result);
    }
}

/* Results travel in batches: records (hub_result) back to back in one mailbox node. On the
 * loop thread the node stays open (h->rb_open) and takes every result completed after it
 * until it runs or something else is posted from the loop (which keeps the mailbox's order:
 * nothing completed later overtakes a post made earlier), so the reports of one loop
 * iteration cost one post and no allocation each; nodes of RB_CAP come from a small pool.
 * Another thread posts a node per result. */
#define RB_CAP  (64 * 1024)
#define RB_POOL 4

struct hub_rbatch {
    hub_post node;
    size_t len, cap;
    int pooled;
    _Alignas(8) char buf[];
};

static size_t rec_size(size_t nfields, size_t strbytes)
{
    size_t n = sizeof(hub_result) + nfields * sizeof(hub_rfield) + strbytes;
    return (n + 7) & ~(size_t)7;
}

static void run_batch(hub *h, hub_post *p);

static void batch_recycle(hub *h, hub_rbatch *b)
{
    if (b->pooled && h->nrb_pool < RB_POOL)
        h->rb_pool[h->nrb_pool++] = b;
    else
        hub_free(b);
}

void hub__results_free(hub *h)
{
    while (h->nrb_pool > 0)
        hub_free(h->rb_pool[--h->nrb_pool]);
}

/* Room for a record of size bytes at the end of a batch: on the loop thread the open batch
 * (a new one, posted at once, when it is full or there is none), elsewhere a node of its own
 * (waiting for memory) that *post says to post once the record is written. NULL when the
 * loop has no memory. */
static hub_result *batch_room(hub *h, int loop, size_t size, hub_rbatch **post)
{
    hub_rbatch *b = loop ? h->rb_open : NULL;
    *post = NULL;
    if (b && b->len + size <= b->cap) {
        hub_result *r = (hub_result *)(b->buf + b->len);
        b->len += size;
        return r;
    }
    size_t cap = size > RB_CAP || !loop ? size : RB_CAP;
    if (loop && cap == RB_CAP && h->nrb_pool > 0)
        b = h->rb_pool[--h->nrb_pool];
    else if (loop)
        b = hub_malloc(sizeof(*b) + cap);
    else
        b = hub__malloc_retry(sizeof(*b) + cap);
    if (!b)
        return NULL;
    b->node.next = NULL;
    b->node.run = run_batch;
    b->len = size;
    b->cap = cap;
    b->pooled = cap == RB_CAP;
    if (loop) { /* the loop runs it later, written by then; posting closes the open batch */
        hub__post_chain(h, &b->node, &b->node);
        h->rb_open = b;
    } else {
        *post = b;
    }
    return (hub_result *)b->buf;
}

static void batch_post(hub *h, hub_rbatch *b)
{
    if (b)
        hub__post_chain(h, &b->node, &b->node);
}

/* The loop's own state runs its results (a run of records) at once. */
static void run_loop_results(hub *h, const char *buf, size_t len)
{
    if (!len)
        return;
    size_t unknown = 0, n = 0;
    if (h->script && h->ops->on_results) {
        unknown = h->ops->on_results(h->script, buf, len);
    } else {
        for (size_t off = 0; off < len; off += ((const hub_result *)(buf + off))->size)
            n++;
        unknown = n;
    }
    if (unknown) {
        atomic_fetch_add(&h->completions_undelivered, unknown);
        hub_log(HUB_LOG_DEBUG, "%zu result(s) not delivered: their state is gone", unknown);
    }
}

/* A run of a batch's records for one executor: the loop's state runs it at once, a worker
 * gets it as one event (one protected call there too). */
static void run_flush(hub *h, int exec, const char *buf, size_t len, uint64_t n)
{
    if (!len)
        return;
    if (exec < 0)
        run_loop_results(h, buf, len);
    else if (exec >= h->nworkers || h->workers_stopped)
        hub__results_undelivered(h, n, "its worker has stopped");
    else if (hub__exec_post(h, exec, HUB_EV_RESULT, n, buf, len) < 0)
        hub__results_undelivered(h, n, "out of memory");
}

static void run_batch(hub *h, hub_post *p)
{
    hub_rbatch *b = (hub_rbatch *)p;
    if (h->rb_open == b)
        h->rb_open = NULL; /* what completes while it runs goes to a new batch */
    /* consecutive typed records for the same executor go together, in order */
    size_t run = 0, runlen = 0;
    uint64_t n = 0;
    int run_exec = -1;
    for (size_t off = 0; off < b->len;) {
        hub_result *r = (hub_result *)(b->buf + off);
        int exec = token_exec(r->token);
        if (!(r->flags & HUB_RESULT_JSON) && (!runlen || exec == run_exec)) {
            if (!runlen) {
                run = off;
                run_exec = exec;
            }
            runlen += r->size;
            n++;
            off += r->size;
            continue;
        }
        run_flush(h, run_exec, b->buf + run, runlen, n);
        runlen = 0;
        n = 0;
        if (r->flags & HUB_RESULT_JSON) {
            deliver(h, r->token, r->json);
            off += r->size;
        } /* else: a typed record for another executor starts the next run */
    }
    run_flush(h, run_exec, b->buf + run, runlen, n);
    batch_recycle(h, b);
}

void hub_complete(hub *h, uint64_t token, struct json_object *result)
{
    /* Always through the mailbox, even from the loop thread: a result never runs inside the
     * call that started the work (a raise with no subscriber completes at once), and one
     * completed while a state is being loaded reaches it once it is installed. The loop
     * never waits for memory (a result it cannot carry is counted); another thread does,
     * since the result must get through. */
    size_t size = rec_size(0, 0);
    hub_rbatch *post;
    hub_result *r = batch_room(h, hub_on_loop(h), size, &post);
    if (!r) {
        hub__complete_undelivered(h, token, "out of memory");
        json_object_put(result);
        return;
    }
    *r = (hub_result){.token = token, .size = (uint32_t)size, .flags = HUB_RESULT_JSON};
    r->json = result; /* its reference travels with the record */
    batch_post(h, post);
}

void hub_complete_fields(hub *h, uint64_t token, unsigned more, const hub_field *f, size_t n)
{
    size_t strbytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (!f[i].name || f[i].type < HUB_FIELD_STR || f[i].type > HUB_FIELD_BOOL) {
            hub_log(HUB_LOG_ERR, "a module completed %llx with field %zu %s: dropped",
                    (unsigned long long)token, i,
                    f[i].name ? "of no known type" : "without a name");
            hub__complete_undelivered(h, token, "a malformed field");
            return;
        }
        if (f[i].type == HUB_FIELD_STR)
            strbytes += f[i].len + 1;
    }
    if (n > UINT16_MAX) {
        hub_log(HUB_LOG_ERR, "a module completed %llx with %zu fields (at most %u): dropped",
                (unsigned long long)token, n, (unsigned)UINT16_MAX);
        hub__complete_undelivered(h, token, "too many fields");
        return;
    }
    size_t size = rec_size(n, strbytes);
    hub_rbatch *post;
    hub_result *r = size > UINT32_MAX ? NULL : batch_room(h, hub_on_loop(h), size, &post);
    if (!r) {
        hub__complete_undelivered(h, token, "out of memory");
        return;
    }
    *r = (hub_result){.token = token,
                      .size = (uint32_t)size,
                      .nfields = (uint16_t)n,
                      .flags = (uint16_t)(more & HUB_RESULT_MORE)};
    char *str = (char *)&r->f[n];
    for (size_t i = 0; i < n; i++) {
        hub_rfield *o = &r->f[i];
        o->name = f[i].name;
        o->type = (uint32_t)f[i].type;
        o->len = 0;
        o->i = f[i].i;
        if (f[i].type == HUB_FIELD_STR) {
            o->len = (uint32_t)f[i].len;
            o->i = str - (char *)r;
            if (f[i].len)
                memcpy(str, f[i].s, f[i].len);
            str[f[i].len] = '\0';
            str += f[i].len + 1;
        }
    }
    batch_post(h, post);
}

/* ---- the event interface's seam ---- */

int hub_set_event_sink(hub *h, const hub_event_sink *sink, void *ud)
{
    if (h->sink)
        return -EEXIST;
    h->sink = sink;
    h->sink_ud = ud;
    return 0;
}

/* The event interface is a module; a build without it answers every call so. */
static int no_sink(char *err, size_t errlen)
{
    snprintf(err, errlen, "no event interface is built in");
    return -ENOSYS;
}

int hub__raise_check(const hub *h, const char *event, char *err, size_t errlen)
{
    if (!hub_event_name_valid(event)) {
        snprintf(err, errlen, "bad event name (letters, digits, _ . -, at most %d bytes)",
                 HUB_EVENT_MAX);
        return -EINVAL;
    }
    return h->sink ? 0 : no_sink(err, errlen);
}

const char *hub_raise_context(const hub *h) { return h->raise_ctx; }

int hub_raise(hub *h, const char *event, struct json_object *params, uint64_t token, char *err,
              size_t errlen)
{
    int rc = hub__raise_check(h, event, err, errlen);
    if (rc < 0) {
        json_object_put(params);
        return rc;
    }
    return h->sink->raise(h->sink_ud, event, params, token, err, errlen);
}

int hub_event_wanted(hub *h, const char *event)
{
    return h->sink && h->sink->wanted(h->sink_ud, event);
}

int hub__event_check(hub *h, const char *event, const char *socket, char *err, size_t errlen)
{
    return h->sink ? h->sink->check(h->sink_ud, event, socket, err, errlen) : no_sink(err, errlen);
}

int hub__event_subscribe(hub *h, const char *event, const char *socket, long expire_s, char *err,
                         size_t errlen)
{
    return h->sink ? h->sink->subscribe(h->sink_ud, event, socket, expire_s, err, errlen)
                   : no_sink(err, errlen);
}

int hub__event_unsubscribe(hub *h, const char *event, const char *socket, char *err, size_t errlen)
{
    return h->sink ? h->sink->unsubscribe(h->sink_ud, event, socket, err, errlen)
                   : no_sink(err, errlen);
}

int hub_event_name_valid(const char *name)
{
    size_t n = 0;
    for (; name[n] && n <= HUB_EVENT_MAX; n++) {
        char ch = name[n];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return 0;
    }
    return n >= 1 && n <= HUB_EVENT_MAX;
}

json_object *hub__event_report(const char *event, const char *socket, const char *error)
{
    json_object *r = json_object_new_object();
    if (!r)
        return NULL;
    json_object_object_add(r, "event", json_object_new_string(event));
    json_object_object_add(r, "socket", json_object_new_string(socket));
    json_object_object_add(r, "status", json_object_new_int(-1));
    json_object_object_add(r, "error", json_object_new_string(error));
    return r;
}

/* A hub event about c (E_EVAPI_CONNECTION_NEW / _CLOSED), raised only when someone listens. */
void hub__raise_conn_event(hub *h, const char *event, const hub_conn_info *ci, const char *tag,
                           const char *reason)
{
    char err[256];
    if (!hub_event_wanted(h, event))
        return;
    json_object *p = json_object_new_object();
    if (!p)
        return;
    json_object_object_add(p, "id", json_object_new_uint64(ci->id));
    json_object_object_add(p, "addr", json_object_new_string(ci->addr));
    json_object_object_add(p, "port", json_object_new_int(ci->port));
    json_object_object_add(p, "tag", tag && *tag ? json_object_new_string(tag) : NULL);
    if (reason)
        json_object_object_add(p, "reason", json_object_new_string(reason));
    if (hub_raise(h, event, p, 0, err, sizeof(err)) < 0)
        hub_log(HUB_LOG_WARN, "%s: %s", event, err);
}
