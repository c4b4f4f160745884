/* Unit tests for the Lua engine: hub_scripts from hlua_script_ops on a fake hub_api that
 * records every call, with scripts written to temporary files. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>
#include <lauxlib.h>
#include <lua.h>

#include "hub/log.h"
#include "lua/hlua.h"
#include "lua/hlua_int.h"

/* ---- the fake hub ---- */

typedef struct fake_call {
    char op[16];
    uint64_t id;
    char tag[128];
    size_t taglen;
    char data[256 + 1]; /* room for a NUL */
    size_t len;
    char reason[64];
    int has_reason;
    /* the event interface: data holds raise's params as JSON text (has_params 0: NULL) */
    char event[80];
    char socket[128];
    long expire;
    uint64_t token;
    int has_params;
    int fn_kept; /* raise: the state held a function under token when the hub was called */
} fake_call;

#define FAKE_MAX_CALLS 1024

typedef struct fake_hub {
    int ret; /* what every call returns */
    int ncalls;
    fake_call calls[FAKE_MAX_CALLS];
    int counts[HUB_SCRIPT_NCOUNTS]; /* what the engine reported through count() */
    size_t nstats;                  /* entries stats() reports, from fake_stats below */
    uint64_t last_token;            /* the last token handed out */
    const char *errtext;            /* the err text set by an event call failing with ret */
    hub_script *s;                  /* the state under test, when a fake looks into it */
} fake_hub;

static fake_call *record(void *ud, const char *op)
{
    fake_hub *h = ud;
    assert_true(h->ncalls < FAKE_MAX_CALLS);
    fake_call *c = &h->calls[h->ncalls++];
    memset(c, 0, sizeof(*c));
    snprintf(c->op, sizeof(c->op), "%s", op);
    return c;
}

static void copy_data(fake_call *c, const char *data, size_t len)
{
    assert_true(len < sizeof(c->data));
    memcpy(c->data, data, len);
    c->len = len;
}

static void copy_tag(fake_call *c, const char *tag, size_t taglen)
{
    assert_true(taglen < sizeof(c->tag));
    memcpy(c->tag, tag, taglen);
    c->taglen = taglen;
}

static int fake_relay(void *ud, const char *data, size_t len)
{
    copy_data(record(ud, "relay"), data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_multicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    fake_call *c = record(ud, "multicast");
    copy_tag(c, tag, taglen);
    copy_data(c, data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_unicast(void *ud, const char *tag, size_t taglen, const char *data, size_t len)
{
    fake_call *c = record(ud, "unicast");
    copy_tag(c, tag, taglen);
    copy_data(c, data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_relay_local(void *ud, const char *data, size_t len)
{
    fake_call *c = record(ud, "relay_local");
    copy_data(c, data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_multicast_local(void *ud, const char *tag, size_t taglen, const char *data,
                                size_t len)
{
    fake_call *c = record(ud, "multicast_local");
    copy_tag(c, tag, taglen);
    copy_data(c, data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_send(void *ud, uint64_t id, const char *data, size_t len)
{
    fake_call *c = record(ud, "send");
    c->id = id;
    copy_data(c, data, len);
    return ((fake_hub *)ud)->ret;
}

static int fake_set_tag(void *ud, uint64_t id, const char *tag, size_t taglen)
{
    fake_call *c = record(ud, "set_tag");
    c->id = id;
    copy_tag(c, tag, taglen);
    return ((fake_hub *)ud)->ret;
}

static int fake_close(void *ud, uint64_t id, const char *reason)
{
    fake_call *c = record(ud, "close");
    c->id = id;
    if (reason) {
        c->has_reason = 1;
        snprintf(c->reason, sizeof(c->reason), "%s", reason);
    }
    return ((fake_hub *)ud)->ret;
}

/* The function the state keeps for token, pushed, or nothing when none (tests look into the
 * state's completions table directly). */
static int pending_fn(hub_script *s, uint64_t token)
{
    lua_rawgeti(s->L, LUA_REGISTRYINDEX, s->completions_ref);
    int t = lua_rawgeti(s->L, -1, (lua_Integer)token);
    lua_pop(s->L, 2);
    return t == LUA_TFUNCTION;
}

static size_t pending_count(hub_script *s)
{
    size_t n = 0;
    lua_rawgeti(s->L, LUA_REGISTRYINDEX, s->completions_ref);
    lua_pushnil(s->L);
    while (lua_next(s->L, -2)) {
        lua_pop(s->L, 1);
        n++;
    }
    lua_pop(s->L, 1);
    return n;
}

static uint64_t fake_token(void *ud)
{
    fake_hub *h = ud;
    return h->last_token = h->last_token ? h->last_token + 1 : 1000;
}

/* ret and err as the hub gives them for the event interface. */
static int fake_event_ret(fake_hub *h, char *err, size_t errlen)
{
    if (h->ret < 0 && h->errtext)
        snprintf(err, errlen, "%s", h->errtext);
    return h->ret;
}

static int fake_raise(void *ud, const char *event, struct json_object *params, uint64_t token,
                      char *err, size_t errlen)
{
    fake_hub *h = ud;
    fake_call *c = record(ud, "raise");
    snprintf(c->event, sizeof(c->event), "%s", event);
    c->token = token;
    c->fn_kept = token && h->s && pending_fn(h->s, token);
    if (params) {
        size_t len;
        const char *text = json_object_to_json_string_length(
            params, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
        c->has_params = 1;
        copy_data(c, text, len);
    }
    json_object_put(params); /* the reference passed to the hub */
    return fake_event_ret(h, err, errlen);
}

static int fake_subscribe(void *ud, const char *event, const char *socket, long expire_s, char *err,
                          size_t errlen)
{
    fake_call *c = record(ud, "subscribe");
    snprintf(c->event, sizeof(c->event), "%s", event);
    snprintf(c->socket, sizeof(c->socket), "%s", socket);
    c->expire = expire_s;
    return fake_event_ret(ud, err, errlen);
}

static int fake_unsubscribe(void *ud, const char *event, const char *socket, char *err,
                            size_t errlen)
{
    fake_call *c = record(ud, "unsubscribe");
    snprintf(c->event, sizeof(c->event), "%s", event);
    snprintf(c->socket, sizeof(c->socket), "%s", socket);
    return fake_event_ret(ud, err, errlen);
}

/* What the fake hub reports as its counters: hub-wide ones and two workers. */
static const hub_stat fake_stats[] = {
    {.name = "frames_in", .help = "h", .gauge = 0, .worker = -1, .value = 42},
    {.name = "clients", .help = "h", .gauge = 1, .worker = -1, .value = 3},
    {.name = "queued_events", .help = "h", .gauge = 1, .worker = 0, .value = 5},
    {.name = "events", .help = "h", .gauge = 0, .worker = 0, .value = 7},
    {.name = "queued_events", .help = "h", .gauge = 1, .worker = 1, .value = 6},
    {.name = "events", .help = "h", .gauge = 0, .worker = 1, .value = 8},
    {.name = "bytes_in", .help = "h", .gauge = 0, .worker = -1, .value = 1ull << 40},
    {.name = "events_delivered",
     .help = "h",
     .worker = -1,
     .value = 9,
     .label = "socket=\"tcp:1.2.3.4:80\""},
    {.name = "events_delivered", .help = "h", .worker = -1, .value = 4, .label = "socket=\"u:9\""},
    {.name = "events", .help = "h", .worker = 1, .value = 2, .label = "kind=\"x\""},
};

static size_t fake_stats_fn(void *ud, hub_stat *out, size_t cap)
{
    fake_hub *h = ud;
    size_t n = h->nstats ? h->nstats : sizeof(fake_stats) / sizeof(fake_stats[0]);
    for (size_t i = 0; i < n && i < cap; i++)
        out[i] = fake_stats[i % (sizeof(fake_stats) / sizeof(fake_stats[0]))];
    return n;
}

static void fake_count(void *ud, int what)
{
    fake_hub *h = ud;
    assert_true(what >= 0 && what < HUB_SCRIPT_NCOUNTS);
    h->counts[what]++;
}

/* ---- a fake request (hub_req) ---- */

typedef struct fake_req {
    hub_req base;
    int refs, suspended, unsuspends, route_done, resumed_done;
    int codes[8], ncodes;
    char reasons[8][32];
    char appended[256];
    char last_hdrs[256]; /* what the last reply carried */
    unsigned index, label;
} fake_req;

static fake_req *resumable; /* what fake_req_resume hands out */

static int freq_pv(hub_req *r, const char *name, hub_pv *out)
{
    fake_req *q = (fake_req *)r;
    static const char *const kv[][2] = {
        {"$rm", "INVITE"}, {"$ru", "sip:100@example.com"},
        {"$rU", "100"},    {"$rd", "example.com"},
        {"$ci", "call-1"}, {"$si", "127.0.0.1"},
        {"$fU", "alice"},  {"$hdr(X-Test)", "yes"},
    };
    if (strcmp(name, "$sp") == 0 || strcmp(name, "$T(id_index)") == 0 ||
        strcmp(name, "$T(id_label)") == 0) {
        out->is_int = 1;
        out->i = name[1] == 's' ? 5061 : name[6] == 'i' ? (long long)q->index : (long long)q->label;
        return 0;
    }
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
        if (strcmp(name, kv[i][0]) == 0) {
            out->is_int = 0;
            out->s = kv[i][1];
            out->len = strlen(kv[i][1]);
            return 0;
        }
    }
    return strncmp(name, "$hdr(", 5) == 0 ? -ENOENT : -EINVAL;
}

static int freq_reply(hub_req *r, int code, const char *reason, char *err, size_t errlen)
{
    fake_req *q = (fake_req *)r;
    if (q->ncodes && q->codes[q->ncodes - 1] >= 200) {
        snprintf(err, errlen, "a final reply was sent already");
        return -EALREADY;
    }
    q->codes[q->ncodes] = code;
    snprintf(q->reasons[q->ncodes++], 32, "%s", reason);
    snprintf(q->last_hdrs, sizeof(q->last_hdrs), "%s", q->appended);
    q->appended[0] = '\0';
    return 0;
}

static int freq_append(hub_req *r, const char *text, size_t len, char *err, size_t errlen)
{
    fake_req *q = (fake_req *)r;
    (void)err, (void)errlen;
    strncat(q->appended, text, len);
    return 0;
}

static int freq_suspend(hub_req *r, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    ((fake_req *)r)->suspended++;
    return 0;
}

static void freq_unsuspend(hub_req *r)
{
    fake_req *q = (fake_req *)r;
    q->suspended--;
    q->unsuspends++;
}

static void freq_route_done(hub_req *r, int resumed)
{
    fake_req *q = (fake_req *)r;
    if (resumed)
        q->resumed_done++;
    else
        q->route_done++;
}

static void freq_ref(hub_req *r) { ((fake_req *)r)->refs++; }
static void freq_unref(hub_req *r) { ((fake_req *)r)->refs--; }

static const hub_req_ops freq_ops = {
    .pv = freq_pv,
    .reply = freq_reply,
    .append_to_reply = freq_append,
    .suspend = freq_suspend,
    .unsuspend = freq_unsuspend,
    .route_done = freq_route_done,
    .ref = freq_ref,
    .unref = freq_unref,
};

static hub_req *fake_req_resume(void *ud, unsigned index, unsigned label, char *err, size_t errlen)
{
    (void)ud;
    if (!resumable || resumable->index != index || resumable->label != label) {
        snprintf(err, errlen, "no such transaction");
        return NULL;
    }
    freq_ref(&resumable->base);
    return &resumable->base;
}

static const hub_api fake_api = {
    .req_resume = fake_req_resume,
    .relay = fake_relay,
    .multicast = fake_multicast,
    .unicast = fake_unicast,
    .send = fake_send,
    .set_tag = fake_set_tag,
    .close = fake_close,
    .stats = fake_stats_fn,
    .count = fake_count,
    .token = fake_token,
    .raise = fake_raise,
    .subscribe = fake_subscribe,
    .unsubscribe = fake_unsubscribe,
    .relay_local = fake_relay_local,
    .multicast_local = fake_multicast_local,
};

/* ---- fixture: a fake hub, a script file, captured logs ---- */

typedef struct fixture {
    fake_hub hub;
    char path[64];
    char err[512];
    hub_script *s;
    int saved_stderr;
    int log_fd;
    char log[16384];
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->hub.ret = 1;
    f->saved_stderr = -1;
    snprintf(f->path, sizeof(f->path), "/tmp/evhub_test_lua_XXXXXX.lua");
    int fd = mkstemps(f->path, 4);
    assert_true(fd >= 0);
    close(fd);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    hlua_script_ops.free(f->s);
    unlink(f->path);
    free(f);
    return 0;
}

static void write_script(fixture *f, const char *src)
{
    FILE *fp = fopen(f->path, "w");
    assert_non_null(fp);
    fputs(src, fp);
    fclose(fp);
}

static hub_script *load_full(fixture *f, const char *src, const char *cb, long max_instr,
                             size_t max_mem)
{
    hub_script_conf conf = {
        .path = f->path,
        .event_callback = cb,
        .max_instructions = max_instr,
        .max_memory = max_mem,
        .worker = 2,
    };
    write_script(f, src);
    f->err[0] = '\0';
    return hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
}

/* Load and expect success; the fixture owns the script. */
static hub_script *load_ok(fixture *f, const char *src, const char *cb)
{
    f->s = load_full(f, src, cb, 1000000, 0);
    if (f->s == NULL)
        fail_msg("load failed: %s", f->err);
    return f->s;
}

static void capture_begin(fixture *f)
{
    char tmpl[] = "/tmp/evhub_test_log_XXXXXX";
    f->log_fd = mkstemp(tmpl);
    assert_true(f->log_fd >= 0);
    unlink(tmpl);
    f->saved_stderr = dup(STDERR_FILENO);
    dup2(f->log_fd, STDERR_FILENO);
}

/* Stop capturing; the log text is in f->log. */
static const char *capture_end(fixture *f)
{
    dup2(f->saved_stderr, STDERR_FILENO);
    close(f->saved_stderr);
    f->saved_stderr = -1;
    ssize_t n = pread(f->log_fd, f->log, sizeof(f->log) - 1, 0);
    f->log[n > 0 ? n : 0] = '\0';
    close(f->log_fd);
    return f->log;
}

/* Run a chunk in the script's state; it must succeed. */
static void lua_ok(hub_script *s, const char *code)
{
    if (luaL_dostring(s->L, code) != LUA_OK) {
        fail_msg("lua error: %s\nin: %s", lua_tostring(s->L, -1), code);
    }
    lua_settop(s->L, 0);
}

/* Run a chunk returning one integer. */
static lua_Integer lua_int(hub_script *s, const char *code)
{
    if (luaL_dostring(s->L, code) != LUA_OK)
        fail_msg("lua error: %s\nin: %s", lua_tostring(s->L, -1), code);
    int isnum = 0;
    lua_Integer v = lua_tointegerx(s->L, -1, &isnum);
    if (!isnum)
        fail_msg("not an integer: %s", luaL_typename(s->L, -1));
    lua_settop(s->L, 0);
    return v;
}

static void connect(hub_script *s, uint64_t id, int conidx, const char *addr, uint16_t port)
{
    hub_conn_info ci = {.id = id, .conidx = conidx, .port = port};
    snprintf(ci.addr, sizeof(ci.addr), "%s", addr);
    hlua_script_ops.on_connect(s, &ci);
}

static void message(hub_script *s, uint64_t id, const char *msg)
{
    hlua_script_ops.on_message(s, id, msg, strlen(msg));
}

/* Sends msg from id to the KEMI script and returns the rc its callback recorded (R[#R].rc). */
static lua_Integer kemi_rc(hub_script *s, uint64_t id, const char *msg)
{
    message(s, id, msg);
    return lua_int(s, "return R[#R].rc");
}

/* The conn userdata the state holds for id, or NULL. */
static const hlua_conn *registered_conn(hub_script *s, uint64_t id)
{
    const hlua_conn *c = NULL;
    lua_rawgeti(s->L, LUA_REGISTRYINDEX, s->conns_ref);
    if (lua_rawgeti(s->L, -1, (lua_Integer)id) == LUA_TUSERDATA)
        c = lua_touserdata(s->L, -1);
    lua_pop(s->L, 2);
    return c;
}

static fake_call *last_call(fixture *f)
{
    assert_true(f->hub.ncalls > 0);
    return &f->hub.calls[f->hub.ncalls - 1];
}

/* ---- KEMI dialect ---- */

static const char kemi_script[] =
    "R = {}\n"
    "function ksr_evapi_event(evname)\n"
    "  local ev = {name = evname, msg = KSR.pv.get('$evapi(msg)'),\n"
    "    addr = KSR.pv.get('$evapi(srcaddr)'), port = KSR.pv.get('$evapi(srcport)'),\n"
    "    conidx = KSR.pv.get('$evapi(conidx)'), other = KSR.pv.get('$var(x)'),\n"
    "    msg_e = KSR.pv.gete('$evapi(msg)'), msg_null = KSR.pv.is_null('$evapi(msg)')}\n"
    "  R[#R + 1] = ev\n"
    "  local msg = ev.msg\n"
    "  if evname ~= 'evapi:message-received' then return end\n"
    "  if msg == 'close' then ev.rc = KSR.evapi.close()\n"
    "  elseif msg:sub(1, 4) == 'tag:' then ev.rc = KSR.evapi.set_tag(msg:sub(5))\n"
    "  elseif msg:sub(1, 10) == 'multicast:' then\n"
    "    local tag, payload = msg:match('^multicast:([^:]+):(.*)$')\n"
    "    ev.rc = KSR.evapi.relay_multicast(payload, tag)\n"
    "  elseif msg:sub(1, 8) == 'unicast:' then\n"
    "    local tag, payload = msg:match('^unicast:([^:]+):(.*)$')\n"
    "    ev.rc = KSR.evapi.relay_unicast(payload, tag)\n"
    "  elseif msg == 'exit' then KSR.x.exit(); error('not reached')\n"
    "  elseif msg == 'boom' then error('boom!')\n"
    "  elseif msg == 'spin' then while true do end\n"
    "  else ev.rc = KSR.evapi.relay(msg) end\n"
    "end\n"
    "function ksr_request_route() KSR.sl.sl_send_reply(200, 'OK') end\n";

#define CB "ksr_evapi_event"

static void test_kemi_relay_returns_1_or_minus_1(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 7, 3, "127.0.0.1", 5000);
    assert_int_equal(kemi_rc(s, 7, "hello"), 1);
    assert_string_equal(last_call(f)->op, "relay");
    assert_memory_equal(last_call(f)->data, "hello", 5);
    f->hub.ret = 0;
    assert_int_equal(kemi_rc(s, 7, "nobody"), -1);
    f->hub.ret = -EMSGSIZE;
    assert_int_equal(kemi_rc(s, 7, "big"), -1);
}

static void test_kemi_multicast_and_unicast(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 1, 0, "127.0.0.1", 5000);
    assert_int_equal(kemi_rc(s, 1, "multicast:pbx:{\"a\":1}"), 1);
    assert_string_equal(last_call(f)->op, "multicast");
    assert_int_equal(last_call(f)->taglen, 3);
    assert_memory_equal(last_call(f)->tag, "pbx", 3);
    assert_int_equal(last_call(f)->len, 7);
    assert_memory_equal(last_call(f)->data, "{\"a\":1}", 7);
    f->hub.ret = 0;
    assert_int_equal(kemi_rc(s, 1, "unicast:app1:x"), -1);
    assert_string_equal(last_call(f)->op, "unicast");
    assert_memory_equal(last_call(f)->tag, "app1", 4);
    f->hub.ret = -EINVAL;
    assert_int_equal(kemi_rc(s, 1, "unicast:app1:x"), -1);
}

static void test_kemi_close_returns_0_and_minus_1(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 9, 1, "10.0.0.1", 4000);
    assert_int_equal(kemi_rc(s, 9, "close"), 0); /* Kamailio's quirk */
    assert_string_equal(last_call(f)->op, "close");
    assert_int_equal(last_call(f)->id, 9);
    /* outside an evapi event there is no context */
    assert_int_equal(lua_int(s, "return KSR.evapi.close()"), -1);
    /* the hub failing to close */
    connect(s, 10, 2, "10.0.0.1", 4001);
    f->hub.ret = -ENOENT;
    assert_int_equal(kemi_rc(s, 10, "close"), -1);
}

static void test_kemi_set_tag(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 4, 0, "127.0.0.1", 6000);
    assert_int_equal(kemi_rc(s, 4, "tag:pbx-1"), 1);
    assert_string_equal(last_call(f)->op, "set_tag");
    assert_int_equal(last_call(f)->id, 4);
    assert_int_equal(last_call(f)->taglen, 5);
    assert_memory_equal(last_call(f)->tag, "pbx-1", 5);
    int n = f->hub.ncalls;
    assert_int_equal(kemi_rc(s, 4, "tag:has space"), -1);
    assert_int_equal(kemi_rc(s, 4, "tag:"), -1);
    assert_int_equal(
        kemi_rc(s, 4, "tag:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"), -1);
    assert_int_equal(f->hub.ncalls, n); /* refused before reaching the hub */
    f->hub.ret = -EINVAL;
    assert_int_equal(kemi_rc(s, 4, "tag:ok"), -1);
    assert_int_equal(lua_int(s, "return KSR.evapi.set_tag('x')"), -1); /* no event */
}

static void test_kemi_pv_in_each_event(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 5, 12, "192.0.2.1", 40000);
    message(s, 5, "payload");
    hlua_script_ops.on_close(s, 5);
    lua_ok(s, "local new, msg, closed = R[1], R[2], R[3]\n"
              "assert(new.name == 'evapi:connection-new')\n"
              "assert(new.msg == nil and new.msg_e == '' and new.msg_null == true)\n"
              "assert(new.addr == '192.0.2.1' and new.port == 40000 and new.conidx == 12)\n"
              "assert(math.type(new.port) == 'integer' and math.type(new.conidx) == 'integer')\n"
              "assert(new.other == nil)\n"
              "assert(msg.name == 'evapi:message-received' and msg.msg == 'payload')\n"
              "assert(msg.msg_null == false and msg.addr == '192.0.2.1')\n"
              "assert(closed.name == 'evapi:connection-closed' and closed.msg == nil)\n"
              "assert(closed.addr == '192.0.2.1' and closed.port == 40000)\n"
              "assert(KSR.pv.get('$evapi(msg)') == nil and KSR.pv.get('$evapi(srcaddr)') == nil)\n"
              "assert(KSR.pv.gete('$evapi(srcaddr)') == '')\n"
              "assert(KSR.pv.getw('$evapi(srcaddr)') == '<<null>>')\n"
              "assert(KSR.pv.is_null('$evapi(conidx)'))\n");
}

static void test_kemi_binary_payload_round_trip(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    static const char bin[] = {'a', '\0', 'b', '\xff', '\0', '\n'};
    connect(s, 1, 0, "127.0.0.1", 1);
    hlua_script_ops.on_message(s, 1, bin, sizeof(bin));
    assert_string_equal(last_call(f)->op, "relay");
    assert_int_equal(last_call(f)->len, sizeof(bin));
    assert_memory_equal(last_call(f)->data, bin, sizeof(bin));
    assert_int_equal(lua_int(s, "return #R[#R].msg"), sizeof(bin));
}

static void test_kemi_exit_is_silent_and_resets_context(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(s, 1, "exit");
    const char *log = capture_end(f);
    assert_string_equal(log, "");
    assert_int_equal(lua_int(s, "return KSR.pv.is_null('$evapi(msg)') and 1 or 0"), 1);
    assert_int_equal(kemi_rc(s, 1, "after"), 1);
    assert_string_equal(last_call(f)->op, "relay");
}

static void test_kemi_runtime_error_logged_and_next_works(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(s, 1, "boom");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "lua: message: "));
    assert_non_null(strstr(log, "boom!"));
    assert_non_null(strstr(log, "stack traceback:"));
    assert_non_null(strstr(log, "ksr_evapi_event"));
    /* the context was reset even though the callback failed */
    assert_int_equal(lua_int(s, "return KSR.pv.is_null('$evapi(srcaddr)') and 1 or 0"), 1);
    message(s, 1, "next");
    assert_string_equal(last_call(f)->op, "relay");
    assert_memory_equal(last_call(f)->data, "next", 4);
}

static void test_kemi_budget_resets_context(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, kemi_script, CB, 20000, 0);
    assert_non_null(f->s);
    connect(f->s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(f->s, 1, "spin");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "instruction budget exceeded (20000 instructions)"));
    assert_int_equal(lua_int(f->s, "return KSR.pv.is_null('$evapi(msg)') and 1 or 0"), 1);
    message(f->s, 1, "fine");
    assert_memory_equal(last_call(f)->data, "fine", 4);
}

static void test_kemi_log_functions_strip_one_newline(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    hub_log_set_level(HUB_LOG_DEBUG);
    capture_begin(f);
    lua_ok(
        s,
        "log.info('native\\n') KSR.info('hello info\\n') KSR.err('an error') KSR.dbg('dbg\\n\\n')\n"
        "KSR.log('warn', 'via log\\n') KSR.notice('n') KSR.warn('w') KSR.crit('c')");
    const char *log = capture_end(f);
    hub_log_set_level(HUB_LOG_INFO);
    assert_non_null(strstr(log, "info: hello info\n"));
    assert_null(strstr(log, "hello info\n\n"));
    assert_non_null(strstr(log, "info: lua: native\n")); /* log.* says where it comes from */
    assert_non_null(strstr(log, "err: an error\n"));
    assert_non_null(strstr(log, "debug: dbg\n\n")); /* only one newline is stripped */
    assert_non_null(strstr(log, "warn: via log\n"));
    assert_non_null(strstr(log, "notice: n\n"));
    assert_non_null(strstr(log, "crit: c\n"));
}

static void test_kemi_unavailable_functions(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    capture_begin(f);
    lua_ok(s, "assert(KSR.evapi.async_relay('x') == -1)\n"
              "assert(KSR.evapi.async_multicast('x', 't') == -1)\n"
              "assert(KSR.evapi.async_unicast('x', 't') == -1)\n"
              "assert(KSR.tmx.t_continue(1, 2, 'r') == -1)\n"
              "assert(KSR.kafka.send('t', 'm') == -1 and KSR.kafka.send_key('t', 'm', 'k') == -1)\n"
              "assert(KSR.rabbitmq.publish('e', 'r', 'c', 'b') == -1)\n"
              "local ok, err = pcall(function() return KSR.hdr.get('X') end)\n"
              "assert(not ok and err:find('KSR.hdr.get is not available in evhub', 1, true), err)\n"
              "assert(KSR.tm.t_reply(404, 'x') == -1 and KSR.sl.sl_send_reply(200, 'OK') == -1)\n"
              "assert(KSR.tm.t_newtran() == -1 and KSR.pv.get('$rm') == nil)\n"
              "ok, err = pcall(function() return KSR.evapi.bogus() end)\n"
              "assert(not ok and err:find('KSR.evapi.bogus is not available', 1, true), err)\n");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "KSR.evapi.async_relay: no SIP transaction to suspend"));
    assert_non_null(strstr(log, "KSR.tmx.t_continue(1, 2): no such transaction"));
    assert_non_null(strstr(log, "KSR.tm.t_reply: no SIP request in this route"));
    assert_non_null(strstr(log, "KSR.kafka.send_key: not available in this build"));
    assert_non_null(strstr(log, "KSR.rabbitmq.publish: not available in this build"));
    assert_int_equal(f->hub.ncalls, 0);
}

static void test_kemi_callback_redefined_at_runtime(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 1, 0, "127.0.0.1", 1);
    lua_ok(s, "function ksr_evapi_event(ev) KSR.evapi.relay('v2:' .. ev) end");
    message(s, 1, "m");
    assert_memory_equal(last_call(f)->data, "v2:evapi:message-received", 25);
}

/* ---- native dialect ---- */

static const char native_script[] =
    "CONNS = {}\n"
    "evapi.on('connect', function(conn) CONNS[conn.id] = conn end)\n"
    "evapi.on('message', function(conn, msg)\n"
    "  LAST = {conn = conn, msg = msg}\n"
    "  if msg == 'ping' then RES = {conn:send('pong')}\n"
    "  elseif msg == 'loop' then while true do end\n"
    "  elseif msg == 'sneaky' then while true do pcall(function() while true do end end) end\n"
    "  elseif msg == 'alloc' then local t = {} for i = 1, 1e8 do t[i] = ('x'):rep(64) .. i end\n"
    "  elseif msg == 'co' then\n"
    "    local co = coroutine.wrap(function() while true do end end) co()\n"
    "  elseif msg == 'spread' then\n"
    "    -- work split into coroutines that each stay under the count hook's period\n"
    "    local function work() local x = 0 for i = 1, 20000 do x = x + i end end\n"
    "    while true do coroutine.wrap(function()\n"
    "      for j = 1, 3 do coroutine.resume(coroutine.create(work)) end end)() end\n"
    "  elseif msg == 'gen' then\n"
    "    GEN = GEN or coroutine.wrap(function() while true do\n"
    "      local x = 0 for i = 1, 1000 do x = x + i end coroutine.yield(x) end end)\n"
    "    RES = {evapi.relay(tostring(GEN()))}\n"
    "  else RES = {evapi.relay(msg)} end\n"
    "end)\n"
    "evapi.on('close', function(conn) CLOSED = conn; CLOSED_WAS = conn:is_closed() end)\n";

static void test_native_conn_fields_and_methods(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 7, 3, "127.0.0.1", 5000);
    lua_ok(s, "local c = CONNS[7]\n"
              "assert(c.id == 7 and c.conidx == 3 and c.addr == '127.0.0.1' and c.port == 5000)\n"
              "assert(c.tag == nil and c.nosuch == nil and not c:is_closed())\n"
              "assert(tostring(c) == 'evhub.client id=7 addr=127.0.0.1:5000 tag=-', tostring(c))\n"
              "assert(c:set_tag('pbx1') == true and c.tag == 'pbx1')\n"
              "assert(tostring(c) == 'evhub.client id=7 addr=127.0.0.1:5000 tag=pbx1')\n"
              "assert(getmetatable(c) == 'evhub.client')\n"
              "assert(evapi.worker == 2)\n");
    assert_string_equal(last_call(f)->op, "set_tag");
    message(s, 7, "ping");
    assert_string_equal(last_call(f)->op, "send");
    assert_int_equal(last_call(f)->id, 7);
    assert_memory_equal(last_call(f)->data, "pong", 4);
    lua_ok(s, "assert(RES[1] == true and LAST.conn == CONNS[7] and LAST.msg == 'ping')");
    lua_ok(s, "assert(CONNS[7]:close('bye') == true)\n"
              "assert(CONNS[7]:is_closed())\n");
    assert_string_equal(last_call(f)->op, "close");
    assert_int_equal(last_call(f)->has_reason, 1);
    assert_string_equal(last_call(f)->reason, "bye");
    lua_ok(s, "local ok, msg = CONNS[7]:send('x') assert(ok == nil and msg == 'closed')\n"
              "ok, msg = CONNS[7]:set_tag('x') assert(ok == nil and msg == 'closed')\n"
              "ok, msg = CONNS[7]:close() assert(ok == nil and msg == 'closed')\n");
}

static void test_native_results_are_nil_msg_code(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    f->hub.ret = 0;
    lua_ok(s, "local ok, msg = evapi.relay('x') assert(ok == nil and msg == 'no client')");
    f->hub.ret = -EINVAL;
    lua_ok(s, "local ok, msg, code = evapi.multicast('x', 'bad tag')\n"
              "assert(ok == nil and msg == 'invalid tag' and code == 'EINVAL')");
    f->hub.ret = -ENOENT;
    lua_ok(s, "local ok, msg, code = evapi.send(99, 'x')\n"
              "assert(ok == nil and msg == 'no such connection' and code == 'ENOENT')");
    assert_int_equal(last_call(f)->id, 99);
    f->hub.ret = -EMSGSIZE;
    lua_ok(s, "local ok, msg, code = evapi.unicast('x', 't')\n"
              "assert(ok == nil and code == 'EMSGSIZE', msg)");
    f->hub.ret = 3;
    lua_ok(s, "assert(evapi.multicast('x', 't') == true)");
}

static void test_native_evapi_by_id(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 11, 0, "::1", 7000);
    lua_ok(s, "assert(evapi.send(11, 'a\\0b') == true)\n"
              "assert(evapi.set_tag(11, 'app') == true and CONNS[11].tag == 'app')\n"
              "assert(evapi.send(CONNS[11], 'c') == true)\n"
              "assert(evapi.close(11) == true and CONNS[11]:is_closed())\n");
    assert_string_equal(f->hub.calls[0].op, "send");
    assert_int_equal(f->hub.calls[0].len, 3);
    assert_memory_equal(f->hub.calls[0].data, "a\0b", 3);
    assert_string_equal(f->hub.calls[1].op, "set_tag");
    assert_string_equal(f->hub.calls[3].op, "close");
    assert_int_equal(f->hub.calls[3].has_reason, 0);
}

/* {scope = "local"} picks the hub's local-only calls; "cluster" (or no options) the routed ones. */
static void test_native_scope_local(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "assert(evapi.relay('a', {scope = 'local'}) == true)\n"
              "assert(evapi.multicast('b', 'red', {scope = 'local'}) == true)\n"
              "assert(evapi.relay('c', {scope = 'cluster'}) == true)\n"
              "assert(evapi.multicast('d', 'red', {}) == true)\n"
              "local ok, err = pcall(evapi.relay, 'e', {scope = 'nowhere'})\n"
              "assert(not ok and tostring(err):find('scope must be', 1, true), err)\n"
              "ok, err = pcall(evapi.multicast, 'f', 'red', 'local')\n"
              "assert(not ok and tostring(err):find('table expected', 1, true), err)\n");
    assert_int_equal(f->hub.ncalls, 4);
    assert_string_equal(f->hub.calls[0].op, "relay_local");
    assert_string_equal(f->hub.calls[1].op, "multicast_local");
    assert_string_equal(f->hub.calls[1].tag, "red");
    assert_string_equal(f->hub.calls[2].op, "relay");
    assert_string_equal(f->hub.calls[3].op, "multicast");
}

static void test_native_misuse_raises(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 1, 0, "127.0.0.1", 1);
    lua_ok(s, "local function raises(fn, pat)\n"
              "  local ok, err = pcall(fn)\n"
              "  assert(not ok, 'did not raise: ' .. pat)\n"
              "  assert(tostring(err):find(pat, 1, true), err)\n"
              "end\n"
              "local c = CONNS[1]\n"
              "raises(function() c:set_tag(5) end, 'string expected')\n"
              "raises(function() c:set_tag() end, 'string expected')\n"
              "raises(function() c:send() end, 'bad argument')\n"
              "raises(function() c:send({}) end, 'bad argument')\n"
              "raises(function() c.send(nil, 'x') end, 'evhub.client expected')\n"
              "raises(function() c.id = 3 end, 'read-only')\n"
              "raises(function() evapi.relay() end, 'bad argument #1')\n"
              "raises(function() evapi.multicast('x') end, 'bad argument #2')\n"
              "raises(function() evapi.send(-1, 'x') end, 'must not be negative')\n"
              "raises(function() evapi.on('bogus', print) end, \"invalid option 'bogus'\")\n"
              "raises(function() evapi.on('message', 42) end, 'function expected')\n"
              "raises(function() log.info() end, 'bad argument')\n"
              "local ok, msg = c:set_tag('bad tag') assert(ok == nil and msg == 'invalid tag')\n");
    assert_int_equal(f->hub.ncalls, 0);
}

static void test_native_close_event_marks_closed(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 3, 0, "127.0.0.1", 1);
    hlua_script_ops.on_close(s, 3);
    lua_ok(s, "assert(CLOSED.id == 3 and CLOSED_WAS == false and CLOSED:is_closed())\n"
              "local ok, msg = CLOSED:send('x') assert(ok == nil and msg == 'closed')\n");
    assert_int_equal(f->hub.ncalls, 0);
    /* the connection is forgotten: a late message is ignored */
    lua_ok(s, "LAST = nil CLOSED = nil");
    message(s, 3, "late");
    hlua_script_ops.on_close(s, 3); /* a second close is ignored too */
    hlua_script_ops.on_message(s, 12345, "x", 1);
    lua_ok(s, "assert(LAST == nil and CLOSED == nil)");
    assert_int_equal(f->hub.ncalls, 0);
}

static void test_native_on_replaces_and_unsets(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 1, 0, "127.0.0.1", 1);
    lua_ok(s, "evapi.on('message', function(c, m) evapi.relay('second:' .. m) end)");
    message(s, 1, "x");
    assert_memory_equal(last_call(f)->data, "second:x", 8);
    lua_ok(s, "evapi.on('message', nil)");
    int n = f->hub.ncalls;
    message(s, 1, "y");
    assert_int_equal(f->hub.ncalls, n);
}

static void test_native_binary_message(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    static const char bin[] = {'\0', '\0', 'z', '\x80'};
    connect(s, 1, 0, "127.0.0.1", 1);
    hlua_script_ops.on_message(s, 1, bin, sizeof(bin));
    assert_int_equal(last_call(f)->len, sizeof(bin));
    assert_memory_equal(last_call(f)->data, bin, sizeof(bin));
    hlua_script_ops.on_message(s, 1, "", 0);
    assert_int_equal(last_call(f)->len, 0);
}

/* ---- load checks ---- */

static void test_load_syntax_error_gives_file_line(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, "local a = 1\nlocal b = = 2\n", "", 0, 0);
    assert_null(s);
    char want[128];
    snprintf(want, sizeof(want), "%s:2: unexpected symbol near '='", f->path);
    assert_string_equal(f->err, want);
}

static void test_load_runtime_error_gives_file_line(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, "\n\nnosuch()\n", "", 0, 0);
    assert_null(s);
    char want[128];
    snprintf(want, sizeof(want), "%s:3: attempt to call a nil value (global 'nosuch')", f->path);
    assert_string_equal(f->err, want);
}

static void test_load_missing_file(void **state)
{
    fixture *f = *state;
    hub_script_conf conf = {.path = "/nonexistent/x.lua", .event_callback = "", .worker = -1};
    hub_script *s = hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
    assert_null(s);
    assert_non_null(strstr(f->err, "cannot open /nonexistent/x.lua"));
}

static void test_load_refuses_missing_callback(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, "function other() end\n", CB, 0, 0);
    assert_null(s);
    char want[256];
    snprintf(want, sizeof(want), "event_callback 'ksr_evapi_event' is not a function defined by %s",
             f->path);
    assert_string_equal(f->err, want);
}

static void test_load_refuses_no_handler(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, "function ksr_evapi_event() end\n", "", 0, 0);
    assert_null(s);
    assert_non_null(strstr(f->err, "script registers no evapi.on(\"message\") handler and no "
                                   "event_callback is configured"));
    /* a connect handler alone does not do: messages would be dropped */
    assert_null(load_full(f, "evapi.on('connect', print)\n", "", 0, 0));
    assert_non_null(strstr(f->err, "evapi.on(\"message\")"));
    /* NULL event_callback means native too */
    hub_script_conf conf = {.path = f->path, .event_callback = NULL, .worker = -1};
    assert_null(hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err)));
}

static void test_load_budget_stops_top_level_loop(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, "evapi.on('message', print)\nwhile true do end\n", "", 50000, 0);
    assert_null(s);
    assert_non_null(strstr(f->err, "instruction budget exceeded (50000 instructions)"));
}

static void test_load_exit_at_top_level_is_fine(void **state)
{
    fixture *f = *state;
    f->s =
        load_full(f, "evapi.on('message', print)\nKSR.x.exit()\nerror('not reached')\n", "", 0, 0);
    assert_non_null(f->s);
}

static void test_load_warns_when_both_dialects(void **state)
{
    fixture *f = *state;
    capture_begin(f);
    load_ok(f, "function ksr_evapi_event() end\nevapi.on('message', print)\n", CB);
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "evapi.on() handlers are not called"));
}

/* ---- budget and memory ---- */

static void test_budget_stops_runaway_and_next_call_works(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, native_script, "", 100000, 0);
    assert_non_null(f->s);
    connect(f->s, 1, 0, "127.0.0.1", 1);
    const char *cases[] = {"loop", "sneaky", "co", "spread"};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        capture_begin(f);
        message(f->s, 1, cases[i]);
        const char *log = capture_end(f);
        assert_non_null(strstr(log, "lua: message: "));
        assert_non_null(strstr(log, "instruction budget exceeded (100000 instructions)"));
        int n = f->hub.ncalls;
        message(f->s, 1, "after");
        assert_int_equal(f->hub.ncalls, n + 1);
        assert_memory_equal(last_call(f)->data, "after", 5);
    }
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 4);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_BUDGET], 4);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_MEMORY], 0);
    /* a coroutine living across callbacks gets a fresh budget in each one */
    for (int i = 0; i < 40; i++) {
        message(f->s, 1, "gen");
        assert_memory_equal(last_call(f)->data, "500500", 6);
    }
    /* a modest loop within the budget runs to the end */
    lua_ok(f->s, "evapi.on('message', function() local n = 0 for i = 1, 10000 do n = n + i end "
                 "evapi.relay(tostring(n)) end)");
    message(f->s, 1, "x");
    assert_memory_equal(last_call(f)->data, "50005000", 8);
}

static void test_memory_limit_fails_callback_not_hub(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, native_script, "", 0, 2 * 1024 * 1024);
    assert_non_null(f->s);
    connect(f->s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(f->s, 1, "alloc");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "lua: message: not enough memory"));
    assert_true(f->s->mem_used <= 2 * 1024 * 1024);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 1);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_MEMORY], 1);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_BUDGET], 0);
    hlua_script_ops.idle(f->s);
    message(f->s, 1, "after");
    assert_memory_equal(last_call(f)->data, "after", 5);
}

static void test_memory_limit_at_load(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f, native_script, "", 0, 16 * 1024);
    assert_null(s);
    assert_non_null(strstr(f->err, "not enough memory (max_memory 16384 bytes)"));
}

/* Small blocks go through the state's cache: what Lua counts and what the hub counts stay
 * equal through churn across size classes (tables and strings growing and shrinking), and
 * the cache keeps at most HLUA_CACHE_BYTES, and counts them exactly. */
static void test_memory_small_block_cache_counts_exactly(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, native_script, "", 0, 0);
    assert_non_null(f->s);
    lua_ok(f->s, "local t = {}\n"
                 "for i = 1, 5000 do t[i] = {i, tostring(i) .. string.rep('x', i % 300)} end\n"
                 "for i = 1, 5000, 2 do t[i] = nil end\n"
                 "collectgarbage()\n"
                 "local g = {} for i = 1, 300 do g[i] = i; g['k' .. i] = i end\n"
                 "for i = 1, 300 do g['k' .. i] = nil end\n"
                 "t = nil g = nil collectgarbage() collectgarbage()");
    lua_State *L = f->s->L;
    size_t lua_count =
        (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
    assert_int_equal(f->s->mem_used, lua_count);
    unsigned kept = 0;
    size_t bytes = 0;
    for (int c = 0; c < HLUA_CACHE_CLASSES; c++) {
        kept += f->s->ncache[c];
        bytes += (size_t)f->s->ncache[c] * (size_t)(c + 1) * 16;
    }
    assert_int_equal(bytes, f->s->cache_bytes);
    assert_true(bytes <= HLUA_CACHE_BYTES);
    assert_true(kept > 0); /* what the collector freed is kept for reuse */
    /* and reused: the same churn again finds its blocks there */
    lua_ok(f->s, "local t = {} for i = 1, 200 do t[i] = {i} end");
    unsigned after = 0;
    for (int c = 0; c < HLUA_CACHE_CLASSES; c++)
        after += f->s->ncache[c];
    assert_true(after < kept);
}

/* ---- counters, stats and tags changed by the hub ---- */

static void test_errors_are_counted_exits_are_not(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_script, CB);
    connect(s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(s, 1, "boom");
    message(s, 1, "exit");
    message(s, 1, "boom");
    capture_end(f);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 2);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_BUDGET], 0);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_MEMORY], 0);
}

static void test_stats_table(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "local t = evapi.stats()\n"
              "assert(t.frames_in == 42 and t.clients == 3 and t.bytes_in == 1 << 40)\n"
              "assert(t.queued_events == nil and #t.workers == 2)\n"
              "assert(t.workers[1].worker == 0 and t.workers[1].queued_events == 5)\n"
              "assert(t.workers[1].events == 7 and t.workers[2].worker == 1)\n"
              "assert(t.workers[2].queued_events == 6 and t.workers[2].events == 8)\n");
    /* an entry with a label is keyed name{label}; the unlabelled keys are as before */
    lua_ok(s, "local t = evapi.stats()\n"
              "assert(t['events_delivered{socket=\"tcp:1.2.3.4:80\"}'] == 9)\n"
              "assert(t['events_delivered{socket=\"u:9\"}'] == 4 and t.events_delivered == nil)\n"
              "assert(t.workers[2]['events{kind=\"x\"}'] == 2 and t.workers[2].events == 8)\n");
    /* more entries than the engine's first guess: it asks again with room for all */
    f->hub.nstats = 700;
    lua_ok(s, "local t = evapi.stats() assert(t.frames_in == 42 and #t.workers == 2)");
    /* a hub with no workers still gives a workers table */
    f->hub.nstats = 2;
    lua_ok(s, "local t = evapi.stats() assert(t.clients == 3 and #t.workers == 0)");
}

static void test_on_tag_updates_conn_view(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 5, 0, "127.0.0.1", 1);
    hlua_script_ops.on_tag(s, 5, "pbx2", 4);
    lua_ok(s, "assert(CONNS[5].tag == 'pbx2', tostring(CONNS[5].tag))");
    assert_string_equal(registered_conn(s, 5)->tag, "pbx2");
    hlua_script_ops.on_tag(s, 5, "", 0);
    lua_ok(s, "assert(CONNS[5].tag == nil)");
    /* an id this state does not hold is ignored */
    hlua_script_ops.on_tag(s, 99, "x", 1);
    assert_int_equal(lua_gettop(s->L), 0);
}

/* ---- reload ---- */

static void test_reload_carries_connections_and_tags(void **state)
{
    fixture *f = *state;
    hub_script *old = load_ok(f, native_script, "");
    connect(old, 1, 0, "127.0.0.1", 1001);
    connect(old, 2, 1, "127.0.0.2", 1002);
    connect(old, 3, 2, "127.0.0.3", 1003);
    lua_ok(old, "assert(CONNS[2]:set_tag('pbx'))");
    hlua_script_ops.on_close(old, 3);

    /* a failed reload leaves old as it was */
    write_script(f, "syntax error here\n");
    hub_script_conf conf = {
        .path = f->path, .event_callback = CB, .max_instructions = 100000, .worker = 2};
    assert_null(hlua_script_ops.reload(old, &conf, f->err, sizeof(f->err)));
    assert_non_null(strstr(f->err, ":1:"));

    write_script(f, kemi_script);
    hub_script *s = hlua_script_ops.reload(old, &conf, f->err, sizeof(f->err));
    if (s == NULL)
        fail_msg("reload failed: %s", f->err);
    message(old, 1, "old still works");
    assert_memory_equal(last_call(f)->data, "old still works", 15);
    hlua_script_ops.free(old);
    f->s = s;

    message(s, 2, "unicast:pbx:hi");
    assert_string_equal(last_call(f)->op, "unicast");
    lua_ok(s, "local e = R[#R]\n"
              "assert(e.addr == '127.0.0.2' and e.port == 1002 and e.conidx == 1, e.addr)\n");
    message(s, 3, "closed before reload");
    lua_ok(s, "assert(#R == 1)");
    /* the tag travelled with the connection, and the closed one did not */
    const hlua_conn *c = registered_conn(s, 2);
    assert_non_null(c);
    assert_int_equal(c->taglen, 3);
    assert_string_equal(c->tag, "pbx");
    assert_int_equal(c->closed, 0);
    c = registered_conn(s, 1);
    assert_non_null(c);
    assert_int_equal(c->taglen, 0);
    assert_null(registered_conn(s, 3));
    hlua_script_ops.on_close(s, 2);
    assert_null(registered_conn(s, 2));
}

/* A reload loads the text the hub read once, as a file is read: BOM and shebang skipped,
 * line numbers kept, and the chunk named after the file. */
static void test_load_from_source_reads_like_a_file(void **state)
{
    fixture *f = *state;
    static const char *const texts[] = {
        "#!/usr/bin/env lua\nevapi.on('message', function(c, m) evapi.relay('s:' .. m) end)\n",
        "\xEF\xBB\xBF#!/x\nevapi.on('message', function(c, m) evapi.relay('s:' .. m) end)\n",
        "\xEF\xBB\xBF"
        "evapi.on('message', function(c, m) evapi.relay('s:' .. m) end)\n",
    };
    write_script(f, "error('the file is not what is loaded')\n");
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        hub_script_conf conf = {.path = f->path,
                                .event_callback = "",
                                .max_instructions = 1000000,
                                .worker = 0,
                                .source = texts[i],
                                .source_len = strlen(texts[i])};
        hub_script *s = hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
        if (!s)
            fail_msg("text %zu: %s", i, f->err);
        connect(s, 1, 0, "127.0.0.1", 1);
        message(s, 1, "x");
        assert_memory_equal(last_call(f)->data, "s:x", 3);
        hlua_script_ops.free(s);
    }
    const char bad[] = "#!/usr/bin/env lua\n\nlocal x = = 1\n";
    hub_script_conf conf = {.path = f->path,
                            .event_callback = "",
                            .worker = 0,
                            .source = bad,
                            .source_len = sizeof(bad) - 1};
    assert_null(hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err)));
    char want[128];
    snprintf(want, sizeof(want), "%s:3:", f->path);
    if (!strstr(f->err, want))
        fail_msg("error %s lacks %s", f->err, want);
}

static void test_reload_native_sees_tag(void **state)
{
    fixture *f = *state;
    hub_script *old = load_ok(f, native_script, "");
    connect(old, 5, 4, "10.1.1.1", 999);
    lua_ok(old, "assert(CONNS[5]:set_tag('t-5'))");
    hub_script_conf conf = {.path = f->path, .event_callback = "", .worker = 0};
    write_script(f, "evapi.on('message', function(c, m) evapi.relay(tostring(c)) end)\n");
    hub_script *s = hlua_script_ops.reload(old, &conf, f->err, sizeof(f->err));
    assert_non_null(s);
    hlua_script_ops.free(old);
    f->s = s;
    message(s, 5, "x");
    const char *want = "evhub.client id=5 addr=10.1.1.1:999 tag=t-5";
    assert_int_equal(last_call(f)->len, strlen(want));
    assert_memory_equal(last_call(f)->data, want, strlen(want));
}

/* ---- json ---- */

static void test_json_round_trip(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "local v = {a = {1, 2, {b = 'c'}}, n = json.null, f = 1.5, i = -7, t = true,\n"
              "  e = {}, s = 'x\\0y\\255', big = 9007199254740993, list = {json.null, 2}}\n"
              "local text = json.encode(v)\n"
              "local d = assert(json.decode(text))\n"
              "assert(d.a[1] == 1 and d.a[2] == 2 and d.a[3].b == 'c' and #d.a == 3)\n"
              "assert(d.n == json.null and d.f == 1.5 and d.i == -7 and d.t == true)\n"
              "assert(math.type(d.i) == 'integer' and math.type(d.f) == 'float')\n"
              "assert(next(d.e) == nil and d.s == 'x\\0y\\255' and #d.s == 4)\n"
              "assert(d.big == 9007199254740993 and math.type(d.big) == 'integer')\n"
              "assert(d.list[1] == json.null and d.list[2] == 2 and #d.list == 2)\n"
              "assert(json.encode({}) == '{}')\n"
              "assert(json.encode({1, 2, 3}) == '[1,2,3]')\n"
              "assert(json.encode({[1] = 'a', [3] = 'c'}):find('\"3\":\"c\"', 1, true))\n"
              "assert(json.encode('a/b\"\\n') == '\"a/b\\\\\"\\\\n\"')\n"
              "assert(json.encode(0.1) == '0.1' and json.encode(2.0) == '2.0')\n"
              "assert(json.encode(nil) == 'null' and json.encode(json.null) == 'null')\n"
              "assert(json.encode({x = {}}) == '{\"x\":{}}')\n"
              "assert(json.decode('  [1, 2.5, \"\\\\u0000\"] \\n')[3] == '\\0')\n"
              "assert(json.decode('1') == 1 and json.decode('\"s\"') == 's')\n"
              "assert(json.decode('null') == json.null and json.decode('false') == false)\n"
              "assert(json.decode('18446744073709551614') > 1.8e19)\n"
              "assert(json.decode('-9223372036854775807') == -9223372036854775807)\n");
}

static void test_json_errors(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(
        s,
        "local function nilmsg(text)\n"
        "  local v, msg = json.decode(text)\n"
        "  assert(v == nil and type(msg) == 'string' and msg:find('^json.decode: '), text)\n"
        "end\n"
        "nilmsg('') nilmsg('{') nilmsg('[1,') nilmsg('{\"a\" 1}') nilmsg('nul')\n"
        "nilmsg('[1] x') nilmsg('1 2') nilmsg('[1]\\0') nilmsg('\"abc')\n"
        "nilmsg(string.rep('[', 200) .. string.rep(']', 200))\n"
        "-- strict JSON only, and no number silently changed\n"
        "nilmsg(\"'abc'\") nilmsg('/*x*/ 1') nilmsg('01') nilmsg('NaN') nilmsg('[Infinity]')\n"
        "nilmsg('1e400') nilmsg('-100000000000000000000000') nilmsg('[100000000000000000000000]')\n"
        "nilmsg('{\"a\":-9223372036854775809}')\n"
        "local function raises(v, pat)\n"
        "  local ok, err = pcall(json.encode, v)\n"
        "  assert(not ok and err:find(pat, 1, true), tostring(err))\n"
        "end\n"
        "raises(0/0, 'NaN or infinity') raises(math.huge, 'NaN or infinity')\n"
        "raises({a = -math.huge}, 'NaN or infinity')\n"
        "raises(print, 'cannot encode a function')\n"
        "raises({[true] = 1}, 'key must be a string or a number')\n"
        "raises({['a\\0b'] = 1}, 'NUL byte')\n"
        "raises({[1] = 1, ['1'] = 2, [3] = 3}, 'duplicate object key')\n"
        "local t = {} t.self = t raises(t, 'nesting deeper than')\n"
        "local deep = {} local cur = deep for i = 1, 100 do cur[1] = {} cur = cur[1] end\n"
        "raises(deep, 'nesting deeper than')\n"
        "assert(not pcall(json.decode, {}))\n"
        "assert(not pcall(json.encode))\n");
}

/* ---- the examples ---- */

static hub_script *load_example(fixture *f, const char *name, const char *cb)
{
    const char *dir = getenv("EVHUB_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/examples/%s", dir ? dir : ".", name);
    hub_script_conf conf = {
        .path = path, .event_callback = cb, .max_instructions = 1000000, .worker = 0};
    f->s = hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
    if (f->s == NULL)
        fail_msg("%s", f->err);
    return f->s;
}

static void expect_call(fixture *f, int i, const char *op, const char *tag, const char *data)
{
    assert_true(i < f->hub.ncalls);
    fake_call *c = &f->hub.calls[i];
    assert_string_equal(c->op, op);
    if (tag) {
        assert_int_equal(c->taglen, strlen(tag));
        assert_memory_equal(c->tag, tag, c->taglen);
    }
    if (data) {
        assert_int_equal(c->len, strlen(data));
        assert_memory_equal(c->data, data, c->len);
    }
}

static void test_example_kemi_protocol(void **state)
{
    fixture *f = *state;
    hub_script *s = load_example(f, "kemi.lua", CB);
    capture_begin(f);
    connect(s, 1, 0, "127.0.0.1", 5000);
    message(s, 1, "tag:pbx1");
    message(s, 1, "multicast:pbx1:hello all");
    message(s, 1, "unicast:pbx1:hello one");
    message(s, 1, "just relay");
    hlua_script_ops.on_close(s, 1);
    const char *log = capture_end(f);
    assert_int_equal(f->hub.ncalls, 5);
    expect_call(f, 0, "set_tag", "127.0.0.1", NULL);
    expect_call(f, 1, "set_tag", "pbx1", NULL);
    expect_call(f, 2, "multicast", "pbx1", "hello all");
    expect_call(f, 3, "unicast", "pbx1", "hello one");
    expect_call(f, 4, "relay", NULL, "just relay");
    assert_non_null(strstr(log, "new connection from 127.0.0.1:5000\n"));
    assert_non_null(strstr(log, "connection closed: 127.0.0.1:5000\n"));
    assert_null(strstr(log, "err:"));
}

static void test_example_native_protocol(void **state)
{
    fixture *f = *state;
    hub_script *s = load_example(f, "native.lua", "");
    capture_begin(f);
    connect(s, 1, 0, "127.0.0.1", 5000);
    message(s, 1, "ping");
    message(s, 1, "tag:app");
    message(s, 1, "tag:bad tag");
    message(s, 1, "multicast:pbx1:m");
    message(s, 1, "unicast:pbx1:u");
    message(s, 1, "{\"to\":\"pbx1\",\"data\":[1,null]}");
    message(s, 1, "{oops");
    message(s, 1, "other");
    hlua_script_ops.on_close(s, 1);
    const char *log = capture_end(f);
    expect_call(f, 0, "set_tag", "127.0.0.1", NULL);
    expect_call(f, 1, "send", NULL, "pong");
    expect_call(f, 2, "set_tag", "app", NULL);
    expect_call(f, 3, "send", NULL, "ok");
    expect_call(f, 4, "send", NULL, "error: invalid tag");
    expect_call(f, 5, "multicast", "pbx1", "m");
    expect_call(f, 6, "unicast", "pbx1", "u");
    expect_call(f, 7, "multicast", "pbx1", NULL);
    f->hub.calls[7].data[f->hub.calls[7].len] = '\0';
    assert_non_null(strstr(f->hub.calls[7].data, "\"from\":\"app\""));
    assert_non_null(strstr(f->hub.calls[7].data, "\"data\":[1,null]"));
    assert_int_equal(f->hub.ncalls, 11);
    expect_call(f, 8, "send", NULL, "{\"ok\":true}");
    expect_call(f, 9, "send", NULL, NULL);
    assert_non_null(strstr(f->hub.calls[9].data, "\"ok\":false"));
    expect_call(f, 10, "relay", NULL, "other");
    assert_non_null(strstr(log, "new connection evhub.client id=1 addr=127.0.0.1:5000"));
    assert_null(strstr(log, "err:"));
}

/* ---- the event interface and completions ---- */

/* on_complete with the result given as JSON text (NULL: a NULL result). */
static int complete(hub_script *s, uint64_t token, const char *json)
{
    struct json_object *r = json ? json_tokener_parse(json) : NULL;
    assert_true(json == NULL || r != NULL);
    int rc = hlua_script_ops.on_complete(s, token, r);
    json_object_put(r);
    return rc;
}

/* The JSON the fake hub got as raise's params, parsed (the caller puts it). */
static struct json_object *raised_params(fixture *f, int i)
{
    fake_call *c = &f->hub.calls[i];
    assert_string_equal(c->op, "raise");
    assert_int_equal(c->has_params, 1);
    c->data[c->len] = '\0';
    struct json_object *o = json_tokener_parse(c->data);
    assert_non_null(o);
    return o;
}

static void test_raise_passes_object_array_and_no_params(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "assert(evapi.raise('call.start-1', {id = 7, who = 'a\\0b', nested = {1, 2.5, "
              "{x = json.null}}}) == true)\n"
              "assert(evapi.raise('list', {1, 'two', true}) == true)\n"
              "assert(evapi.raise('bare') == true)\n"
              "assert(evapi.raise('bare', nil) == true)\n"
              "assert(evapi.raise('empty', {}) == true)\n"
              "assert(evapi.raise('sparse', {[1] = 'a', [3] = 'c'}) == true)\n");
    assert_int_equal(f->hub.ncalls, 6);
    struct json_object *o = raised_params(f, 0), *v;
    assert_string_equal(f->hub.calls[0].event, "call.start-1");
    assert_int_equal(f->hub.calls[0].token, 0); /* no report function, no token */
    assert_true(json_object_is_type(o, json_type_object));
    assert_int_equal(json_object_object_length(o), 3);
    assert_true(json_object_object_get_ex(o, "id", &v) && json_object_get_int64(v) == 7);
    assert_true(json_object_object_get_ex(o, "who", &v));
    assert_int_equal(json_object_get_string_len(v), 3);
    assert_memory_equal(json_object_get_string(v), "a\0b", 3);
    assert_true(json_object_object_get_ex(o, "nested", &v));
    assert_string_equal(json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN),
                        "[1,2.5,{\"x\":null}]");
    json_object_put(o);
    o = raised_params(f, 1);
    assert_string_equal(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN),
                        "[1,\"two\",true]");
    json_object_put(o);
    assert_string_equal(f->hub.calls[2].op, "raise");
    assert_int_equal(f->hub.calls[2].has_params, 0); /* nil params: NULL, not {} */
    assert_int_equal(f->hub.calls[3].has_params, 0);
    assert_memory_equal(f->hub.calls[4].data, "{}", 3); /* an empty table is an object */
    o = raised_params(f, 5);
    assert_true(json_object_is_type(o, json_type_object)); /* not a sequence: as json.encode */
    json_object_put(o);
}

static void test_raise_misuse_raises_and_reaches_no_hub(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "local function raises(fn, pat)\n"
              "  local ok, err = pcall(fn)\n"
              "  assert(not ok, 'did not raise: ' .. pat)\n"
              "  assert(tostring(err):find(pat, 1, true), err)\n"
              "end\n"
              "local rule = \"event name must be 1..64 letters, digits, '_', '.' or '-'\"\n"
              "raises(function() evapi.raise('') end, rule)\n"
              "raises(function() evapi.raise(('x'):rep(65)) end, rule)\n"
              "raises(function() evapi.raise('a b') end, rule)\n"
              "raises(function() evapi.raise('a/b') end, rule)\n"
              "raises(function() evapi.raise('a\\0b') end, rule)\n"
              "raises(function() evapi.raise('caf\\xc3\\xa9') end, rule)\n"
              "raises(function() evapi.raise(5) end, 'bad argument #1')\n"
              "raises(function() evapi.raise() end, 'bad argument #1')\n"
              "raises(function() evapi.raise('e', 'x') end, 'bad argument #2')\n"
              "raises(function() evapi.raise('e', 5) end, 'table or nil expected')\n"
              "raises(function() evapi.raise('e', json.null) end, 'bad argument #2')\n"
              "raises(function() evapi.raise('e', {}, 'fn') end, 'bad argument #3')\n"
              "raises(function() evapi.raise('e', {f = print}) end,\n"
              "  'evapi.raise: cannot encode a function')\n"
              "local t = {} t.self = t\n"
              "raises(function() evapi.raise('e', t) end, 'evapi.raise: nesting deeper than')\n"
              "raises(function() evapi.subscribe('a b', 'tcp:h:1') end, rule)\n"
              "raises(function() evapi.subscribe('e', 5) end, 'bad argument #2')\n"
              "raises(function() evapi.subscribe('e', 'tcp:h\\0:1') end, 'NUL byte')\n"
              "raises(function() evapi.subscribe('e', 'tcp:h:1', -1) end, 'must not be negative')\n"
              "raises(function() evapi.subscribe('e', 'tcp:h:1', 1.5) end, 'bad argument #3')\n"
              "raises(function() evapi.unsubscribe(('x'):rep(65), 'tcp:h:1') end, rule)\n"
              "raises(function() evapi.unsubscribe('e') end, 'bad argument #2')\n"
              "assert(evapi.raise(('x'):rep(64)) == true)\n");
    assert_int_equal(f->hub.ncalls, 1);
    assert_int_equal(f->hub.last_token, 0); /* no token was taken for a refused call */
    assert_int_equal(pending_count(s), 0);
}

static const char report_script[] = "evapi.on('message', function() end)\n"
                                    "REPORTS = {}\n"
                                    "function report(r) REPORTS[#REPORTS + 1] = r end\n";

static void test_report_runs_once_with_the_result_table(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, report_script, "");
    f->hub.s = s;
    lua_ok(s, "assert(evapi.raise('call.end', {id = 1}, report) == true)");
    fake_call *c = last_call(f);
    assert_true(c->token != 0);
    assert_int_equal(c->token, f->hub.last_token);
    assert_int_equal(c->fn_kept, 1); /* kept before the hub was called */
    assert_int_equal(pending_count(s), 1);
    assert_int_equal(complete(s, c->token,
                              "{\"event\":\"call.end\",\"socket\":\"tcp:1.2.3.4:80\",\"status\":0,"
                              "\"error\":null,\"n\":1.5,\"list\":[1,null,\"x\"]}"),
                     0);
    lua_ok(s, "assert(#REPORTS == 1)\n"
              "local r = REPORTS[1]\n"
              "assert(r.event == 'call.end' and r.socket == 'tcp:1.2.3.4:80')\n"
              "assert(r.status == 0 and math.type(r.status) == 'integer')\n"
              "assert(r.n == 1.5 and math.type(r.n) == 'float')\n"
              "assert(r.error == json.null)\n"
              "assert(#r.list == 3 and r.list[2] == json.null and r.list[3] == 'x')\n");
    /* done: a second result for the token is not delivered */
    assert_int_equal(complete(s, c->token, "{\"status\":-1}"), -ENOENT);
    lua_ok(s, "assert(#REPORTS == 1)");
    assert_int_equal(pending_count(s), 0);
}

static void test_report_runs_for_each_result_while_more(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, report_script, "");
    lua_ok(s, "assert(evapi.raise('e', nil, report))");
    uint64_t tok = last_call(f)->token;
    assert_int_equal(complete(s, tok, "{\"socket\":\"a\",\"status\":0,\"more\":true}"), 0);
    assert_int_equal(complete(s, tok,
                              "{\"socket\":\"b\",\"status\":-1,\"error\":\"refused\","
                              "\"more\":true}"),
                     0);
    assert_int_equal(pending_count(s), 1);
    /* only boolean true means more */
    assert_int_equal(complete(s, tok, "{\"socket\":\"c\",\"status\":0,\"more\":1}"), 0);
    assert_int_equal(complete(s, tok, "{\"socket\":\"d\",\"status\":0}"), -ENOENT);
    lua_ok(s, "assert(#REPORTS == 3)\n"
              "assert(REPORTS[1].socket == 'a' and REPORTS[1].more == true)\n"
              "assert(REPORTS[2].socket == 'b' and REPORTS[2].error == 'refused')\n"
              "assert(REPORTS[3].socket == 'c')\n");
    assert_int_equal(pending_count(s), 0);
}

static void test_report_gets_json_null_and_binary_strings(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, report_script, "");
    lua_ok(s, "evapi.raise('e', nil, report) evapi.raise('e', nil, report)");
    assert_int_equal(complete(s, f->hub.last_token - 1, NULL), 0);
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "s", json_object_new_string_len("a\0b\xff", 4));
    assert_int_equal(hlua_script_ops.on_complete(s, f->hub.last_token, r), 0);
    json_object_put(r);
    lua_ok(s, "assert(REPORTS[1] == json.null)\n"
              "assert(REPORTS[2].s == 'a\\0b\\xff' and #REPORTS[2].s == 4)\n");
}

static void test_on_complete_of_unknown_token_is_enoent(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, report_script, "");
    assert_int_equal(complete(s, 1, "{}"), -ENOENT);
    assert_int_equal(complete(s, UINT64_MAX, NULL), -ENOENT);
    lua_ok(s, "evapi.raise('e', nil, report)");
    assert_int_equal(complete(s, f->hub.last_token + 1, "{}"), -ENOENT);
    lua_ok(s, "assert(#REPORTS == 0)");
    assert_int_equal(lua_gettop(s->L), 0);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 0);
}

static void test_failing_report_is_a_counted_error_and_state_goes_on(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, native_script, "", 100000, 0);
    assert_non_null(f->s);
    hub_script *s = f->s;
    lua_ok(s, "evapi.raise('e', nil, function(r) error('report failed: ' .. r.status) end)\n"
              "evapi.raise('e', nil, function(r) while true do end end)\n");
    uint64_t tok = f->hub.last_token;
    capture_begin(f);
    assert_int_equal(complete(s, tok - 1, "{\"status\":-1,\"more\":true}"), 0);
    assert_int_equal(complete(s, tok, "{\"status\":0}"), 0);
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "lua: report: "));
    assert_non_null(strstr(log, "report failed: -1"));
    assert_non_null(strstr(log, "stack traceback:"));
    assert_non_null(strstr(log, "instruction budget exceeded (100000 instructions)"));
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 2);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_BUDGET], 1);
    /* the failing function is kept while more results come, and the state serves on */
    capture_begin(f);
    assert_int_equal(complete(s, tok - 1, "{\"status\":-2}"), 0);
    capture_end(f);
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 3);
    assert_int_equal(complete(s, tok - 1, "{}"), -ENOENT);
    assert_int_equal(complete(s, tok, "{}"), -ENOENT);
    connect(s, 1, 0, "127.0.0.1", 1);
    message(s, 1, "after");
    assert_memory_equal(last_call(f)->data, "after", 5);
}

static void test_raise_failure_returns_nil_reason_and_forgets_the_function(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, report_script, "");
    f->hub.ret = -ENOSYS;
    f->hub.errtext = "no events module in this build";
    lua_ok(s, "local ok, msg, code = evapi.raise('e', {a = 1}, report)\n"
              "assert(ok == nil and msg == 'no events module in this build' and code == 'ENOSYS',"
              " msg)\n");
    uint64_t tok = last_call(f)->token;
    assert_true(tok != 0);
    assert_int_equal(pending_count(s), 0);
    assert_int_equal(complete(s, tok, "{}"), -ENOENT);
    /* without an err text the reason is the code's; a bad name the hub finds is not raised */
    f->hub.errtext = NULL;
    f->hub.ret = -EINVAL;
    lua_ok(s, "local ok, msg, code = evapi.raise('e')\n"
              "assert(ok == nil and type(msg) == 'string' and code == 'EINVAL', msg)\n");
    f->hub.ret = -ENOMEM;
    lua_ok(s, "local ok, msg, code = evapi.raise('e', nil, report)\n"
              "assert(ok == nil and msg == 'out of memory' and code == 'ENOMEM')\n");
    assert_int_equal(pending_count(s), 0);
    lua_ok(s, "assert(#REPORTS == 0)");
}

static void test_subscribe_and_unsubscribe(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    lua_ok(s, "assert(evapi.subscribe('call.start', 'tcp:10.0.0.1:8080', 30) == true)\n"
              "assert(evapi.subscribe('call.start', 'tcp:10.0.0.2:8080') == true)\n"
              "assert(evapi.unsubscribe('call.start', 'tcp:10.0.0.1:8080') == true)\n");
    assert_int_equal(f->hub.ncalls, 3);
    assert_string_equal(f->hub.calls[0].op, "subscribe");
    assert_string_equal(f->hub.calls[0].event, "call.start");
    assert_string_equal(f->hub.calls[0].socket, "tcp:10.0.0.1:8080");
    assert_int_equal(f->hub.calls[0].expire, 30);
    assert_int_equal(f->hub.calls[1].expire, 0); /* absent: never expires */
    assert_string_equal(f->hub.calls[2].op, "unsubscribe");
    assert_string_equal(f->hub.calls[2].socket, "tcp:10.0.0.1:8080");
}

static void test_subscribe_bad_uri_raises_with_the_reason(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    f->hub.ret = -EINVAL;
    f->hub.errtext = "bad socket URI 'tcp:nowhere': no port";
    lua_ok(s, "local ok, err = pcall(evapi.subscribe, 'e', 'tcp:nowhere')\n"
              "assert(not ok and err:find(\"evapi.subscribe: bad socket URI 'tcp:nowhere': no "
              "port\", 1, true), err)\n"
              "ok, err = pcall(evapi.unsubscribe, 'e', 'tcp:nowhere')\n"
              "assert(not ok and err:find(\"evapi.unsubscribe: bad socket URI\", 1, true), err)\n"
              "-- the error is at the script's line that gave the URI\n"
              "ok, err = pcall(function()\n"
              "  evapi.subscribe('e', 'tcp:nowhere')\n"
              "end)\n"
              "assert(err:find(']:7: evapi.subscribe: ', 1, true), err)\n");
    /* other failures are answers, not errors */
    f->hub.ret = -ENOMEM;
    f->hub.errtext = "too many subscriptions";
    lua_ok(s, "local ok, msg, code = evapi.subscribe('e', 'tcp:h:1')\n"
              "assert(ok == nil and msg == 'too many subscriptions' and code == 'ENOMEM')\n"
              "ok, msg, code = evapi.unsubscribe('e', 'tcp:h:1')\n"
              "assert(ok == nil and msg == 'too many subscriptions' and code == 'ENOMEM')\n");
    f->hub.ret = -ENOSYS;
    f->hub.errtext = NULL;
    lua_ok(s, "local ok, msg, code = evapi.subscribe('e', 'tcp:h:1')\n"
              "assert(ok == nil and msg == 'no events module' and code == 'ENOSYS')\n");
}

static void test_kemi_script_uses_the_event_interface(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f,
                            "function ksr_evapi_event(ev)\n"
                            "  if ev ~= 'evapi:message-received' then return end\n"
                            "  local msg = KSR.pv.get('$evapi(msg)')\n"
                            "  assert(evapi.subscribe('evapi.msg', 'tcp:127.0.0.1:9000', 60))\n"
                            "  assert(evapi.raise('evapi.msg', {msg = msg}, function(r)\n"
                            "    REPORT = r KSR.info('report ' .. r.status)\n"
                            "  end))\n"
                            "  assert(evapi.unsubscribe('evapi.msg', 'tcp:127.0.0.1:9000'))\n"
                            "end\n",
                            CB);
    connect(s, 1, 0, "127.0.0.1", 1);
    message(s, 1, "hi");
    assert_int_equal(f->hub.ncalls, 3);
    expect_call(f, 0, "subscribe", NULL, NULL);
    assert_int_equal(f->hub.calls[0].expire, 60);
    expect_call(f, 1, "raise", NULL, "{\"msg\":\"hi\"}");
    assert_string_equal(f->hub.calls[1].event, "evapi.msg");
    expect_call(f, 2, "unsubscribe", NULL, NULL);
    capture_begin(f);
    assert_int_equal(complete(s, f->hub.calls[1].token, "{\"status\":0}"), 0);
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "report 0"));
    lua_ok(s, "assert(REPORT.status == 0)");
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 0);
}

static void test_reload_logs_pending_reports_that_will_not_run(void **state)
{
    fixture *f = *state;
    hub_script *old = load_ok(f, report_script, "");
    lua_ok(old, "evapi.raise('a', nil, report) evapi.raise('b', nil, report)\n"
                "evapi.raise('c', nil, report)\n");
    uint64_t tok = f->hub.last_token;
    assert_int_equal(complete(old, tok, "{}"), 0);
    hub_script_conf conf = {.path = f->path, .event_callback = "", .worker = 0};
    capture_begin(f);
    hub_script *s = hlua_script_ops.reload(old, &conf, f->err, sizeof(f->err));
    const char *log = capture_end(f);
    if (s == NULL)
        fail_msg("reload failed: %s", f->err);
    assert_non_null(strstr(log, "notice: lua: reload: 2 report function(s) of the old script "
                                "will not run"));
    hlua_script_ops.free(old);
    f->s = s;
    /* the new state does not know the old tokens: the hub counts those results */
    assert_int_equal(complete(s, tok - 1, "{}"), -ENOENT);
    assert_int_equal(complete(s, tok - 2, "{}"), -ENOENT);
    lua_ok(s, "assert(#REPORTS == 0)");
    /* nothing pending, nothing logged */
    capture_begin(f);
    hub_script *s2 = hlua_script_ops.reload(s, &conf, f->err, sizeof(f->err));
    log = capture_end(f);
    assert_non_null(s2);
    assert_null(strstr(log, "report function"));
    hlua_script_ops.free(s2);
}

/* ---- housekeeping ---- */

static void test_idle_and_free_are_safe(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    connect(s, 1, 0, "127.0.0.1", 1);
    for (int i = 0; i < 100; i++)
        hlua_script_ops.idle(s);
    hlua_script_ops.free(NULL);
    assert_string_equal(hlua_script_ops.name, "lua");
}

static void test_script_finalizers_refused(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, native_script, "");
    /* Lua runs __gc with hooks off: a looping finalizer would hang the hub beyond any budget. */
    lua_ok(s, "local ok, err = pcall(setmetatable, {}, {__gc = function() while true do end end})\n"
              "assert(not ok and err:find('__gc metamethods are not supported', 1, true), err)\n"
              "ok, err = pcall(debug.setmetatable, {}, {__gc = print})\n"
              "assert(not ok and err:find('__gc', 1, true), err)\n"
              "local t = setmetatable({}, {__index = {a = 1}}) assert(t.a == 1)\n"
              "assert(getmetatable(setmetatable({}, nil)) == nil)\n"
              "collectgarbage()\n");
}

/* ---- the sandbox: the budget stays, os.exit does not end the hub, restrict ---- */

static const char unhook_script[] =
    "evapi.on('message', function(conn, msg)\n"
    "  if msg == 'clear' then debug.sethook()\n"
    "  elseif msg == 'pclear' then pcall(debug.sethook)\n"
    "  elseif msg == 'replace' then pcall(debug.sethook, function() end, '', 0)\n"
    "  elseif msg == 'co' then pcall(debug.sethook, coroutine.running())\n"
    "  elseif msg == 'spread' then\n"
    "    -- the unchecked resume, if a wrapper kept it where the script can reach it\n"
    "    local resume = debug.getupvalue(coroutine.resume, 1) or coroutine.resume\n"
    "    local function work() local x = 0 for i = 1, 20000 do x = x + i end end\n"
    "    for j = 1, 1000 do resume(coroutine.create(work)) end\n"
    "    evapi.relay('survived')\n"
    "  elseif msg == 'ping' then evapi.relay('pong') return\n"
    "  end\n"
    "  -- never ends: only the budget stops it (the watchdog arms the hook 10-20 ms into a\n"
    "  -- callback, later under valgrind, so a loop that merely runs long could finish first)\n"
    "  local x = 0 while true do x = x + 1 end\n"
    "  evapi.relay('survived')\n"
    "end)\n";

static void test_sethook_cannot_remove_the_budget(void **state)
{
    fixture *f = *state;
    f->s = load_full(f, unhook_script, "", 100000, 0);
    assert_non_null(f->s);
    connect(f->s, 1, 0, "127.0.0.1", 1);
    const char *cases[] = {"clear", "pclear", "replace", "co", "spread"};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int n = f->hub.ncalls;
        capture_begin(f);
        message(f->s, 1, cases[i]);
        const char *log = capture_end(f);
        if (f->hub.ncalls != n)
            fail_msg("'%s' escaped the budget", cases[i]);
        if (i == 0)
            assert_non_null(strstr(log, "debug.sethook and debug.gethook are not allowed"));
        else
            assert_non_null(strstr(log, "instruction budget exceeded (100000 instructions)"));
        message(f->s, 1, "ping");
        assert_int_equal(f->hub.ncalls, n + 1);
        assert_memory_equal(last_call(f)->data, "pong", 4);
    }
    /* the wrapped functions hold nothing the script could call instead */
    lua_ok(f->s, "assert(debug.getupvalue(coroutine.resume, 1) == nil)\n"
                 "assert(debug.getupvalue(setmetatable, 1) == nil)\n"
                 "assert(debug.getupvalue(debug.setmetatable, 1) == nil)\n"
                 "local ok, err = pcall(debug.gethook)\n"
                 "assert(not ok and err:find('not allowed', 1, true), err)\n");
}

static void test_os_exit_raises_and_the_hub_goes_on(void **state)
{
    fixture *f = *state;
    f->s = load_full(f,
                     "evapi.on('message', function(conn, msg)\n"
                     "  if msg == 'exit' then os.exit(7) end\n"
                     "  if msg == 'pexit' then evapi.relay(select(2, pcall(os.exit, true))) end\n"
                     "  evapi.relay(msg)\n"
                     "end)\n",
                     "", 100000, 0);
    assert_non_null(f->s);
    connect(f->s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(f->s, 1, "exit");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "lua: message: "));
    assert_non_null(strstr(log, "os.exit is not allowed in evhub scripts"));
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 1);
    message(f->s, 1, "pexit");
    assert_non_null(strstr(f->hub.calls[f->hub.ncalls - 2].data, "os.exit is not allowed"));
    message(f->s, 1, "after");
    assert_memory_equal(last_call(f)->data, "after", 5);
    /* at load too */
    hub_script *s2 = load_full(f, "evapi.on('message', print)\nos.exit(0)\n", "", 0, 0);
    assert_null(s2);
    assert_non_null(strstr(f->err, "os.exit is not allowed"));
}

static hub_script *load_restricted(fixture *f, const char *src, int restricted)
{
    hub_script_conf conf = {
        .path = f->path,
        .event_callback = "",
        .max_instructions = 1000000,
        .restricted = restricted,
        .worker = -1,
    };
    write_script(f, src);
    f->err[0] = '\0';
    return hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
}

static void test_restrict_withholds_io_os_native_code_and_debug(void **state)
{
    fixture *f = *state;
    f->s = load_restricted(f, native_script, 1);
    if (f->s == NULL)
        fail_msg("load failed: %s", f->err);
    lua_ok(f->s,
           "assert(io == nil and package.loaded.io == nil)\n"
           "assert(not pcall(require, 'io'))\n"
           "for _, k in ipairs({'execute', 'exit', 'remove', 'rename', 'tmpname'}) do\n"
           "  assert(os[k] == nil, k)\n"
           "end\n"
           "assert(type(os.time()) == 'number' and type(os.clock()) == 'number')\n"
           "assert(package.loadlib == nil and package.cpath == '' and #package.searchers == 2)\n"
           "local ok, err = pcall(require, 'no_such_module_anywhere')\n"
           "assert(not ok and not err:find('cpath', 1, true), err)\n"
           "assert(debug.traceback('x'):find('stack traceback', 1, true))\n"
           "local n = 0 for k in pairs(debug) do n = n + 1 end assert(n == 1)\n"
           "assert(package.loaded.debug == debug and require('debug') == debug)\n"
           "assert(string.rep('a', 3) == 'aaa' and math.max(1, 2) == 2 and utf8.char(65) == 'A')\n"
           "assert(coroutine.wrap(function() return 5 end)() == 5)\n");
    /* errors still carry the hub's traceback */
    connect(f->s, 1, 0, "127.0.0.1", 1);
    capture_begin(f);
    message(f->s, 1, "loop");
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "instruction budget exceeded"));
    assert_non_null(strstr(log, "stack traceback"));
    /* a script needing what is withheld fails at load (so evhub -t and reloads refuse it) */
    assert_null(load_restricted(f, "evapi.on('message', print)\nio.write('x')\n", 1));
    assert_non_null(strstr(f->err, "'io'"));
    assert_null(load_restricted(f, "evapi.on('message', print)\nos.execute('true')\n", 1));
    assert_non_null(strstr(f->err, "execute"));
}

static void test_unrestricted_keeps_the_libraries(void **state)
{
    fixture *f = *state;
    f->s = load_restricted(f, native_script, 0);
    if (f->s == NULL)
        fail_msg("load failed: %s", f->err);
    lua_ok(f->s, "assert(type(io.open) == 'function' and type(os.execute) == 'function')\n"
                 "assert(type(package.loadlib) == 'function' and #package.searchers == 4)\n"
                 "assert(type(debug.getinfo) == 'function' and type(os.exit) == 'function')\n");
}

/* ---- functions a module offers scripts (hub_script_fn) ---- */

typedef struct fake_module {
    int ncalls;
    char args[256];
    uint64_t token;
    int worker;
} fake_module;

/* The arguments as JSON text, so tests can compare them whole; a float is "N.f", a string
 * that holds a NUL shows it as \u0000 (json-c's). */
static void args_text(const hub_call *c, char *out, size_t cap)
{
    struct json_object *a = json_object_new_array();
    for (int i = 0; i < c->argc; i++) {
        const hub_arg *v = &c->argv[i];
        struct json_object *o = NULL;
        switch (v->type) {
        case HUB_ARG_BOOL:
            o = json_object_new_boolean((int)v->i);
            break;
        case HUB_ARG_INT:
            o = json_object_new_int64(v->i);
            break;
        case HUB_ARG_NUM: {
            char num[64];
            snprintf(num, sizeof(num), "%gf", v->d);
            o = json_object_new_string(num);
            break;
        }
        case HUB_ARG_STR:
            assert_int_equal(v->s[v->len], '\0'); /* NUL-terminated as documented */
            o = json_object_new_string_len(v->s, (int)v->len);
            break;
        case HUB_ARG_JSON:
            o = json_object_get(v->json);
            break;
        }
        json_object_array_add(a, o);
    }
    snprintf(out, cap, "%s", json_object_to_json_string_ext(a, JSON_C_TO_STRING_PLAIN));
    json_object_put(a);
}

/* mod.echo: records its arguments; "fail" first fails with ENOBUFS, "ret" returns a table. */
static int mod_echo(void *state, hub_call *c)
{
    fake_module *m = state;
    m->ncalls++;
    args_text(c, m->args, sizeof(m->args));
    m->token = c->token;
    m->worker = c->worker;
    size_t flen;
    const char *first = hub_arg_str(c, 0, &flen);
    if (first && strcmp(first, "fail") == 0) {
        snprintf(c->err, sizeof(c->err), "queue full");
        return -ENOBUFS;
    }
    if (first && strcmp(first, "ret") == 0)
        c->ret = json_tokener_parse("{\"x\":1,\"l\":[1,null]}");
    return 0;
}

static const hub_script_fn mod_fns[] = {
    {"mod", "echo", HUB_FN_REPORT, mod_echo},
    {"KSR.kafka", "send", HUB_FN_KEMI, mod_echo},
    {"a.b.c", "echo", 0, mod_echo},
    {NULL, NULL, 0, NULL},
};

static hub_script *load_with_fns(fixture *f, fake_module *m, hub_script_fn_ref *refs, int inert,
                                 const char *cb)
{
    for (size_t i = 0; mod_fns[i].name; i++)
        refs[i] = (hub_script_fn_ref){&mod_fns[i], m};
    hub_script_conf conf = {.path = f->path,
                            .event_callback = cb,
                            .max_instructions = 1000000,
                            .worker = 2,
                            .fns = refs,
                            .nfns = 3,
                            .fns_inert = inert};
    write_script(f, cb[0] ? kemi_script : report_script);
    f->s = hlua_script_ops.load(&conf, &fake_api, &f->hub, f->err, sizeof(f->err));
    if (!f->s)
        fail_msg("load failed: %s", f->err);
    return f->s;
}

static void test_module_fn_native_args_results_report(void **state)
{
    fixture *f = *state;
    fake_module m = {0};
    hub_script_fn_ref refs[3];
    hub_script *s = load_with_fns(f, &m, refs, 0, "");
    lua_ok(s, "assert(mod.echo('a', nil, 3, {k = true}) == true)");
    assert_int_equal(m.ncalls, 1);
    assert_string_equal(m.args, "[\"a\",null,3,{\"k\":true}]");
    assert_int_equal(m.token, 0);
    assert_int_equal(m.worker, 2);
    lua_ok(s, "assert(mod.echo() == true)");
    assert_string_equal(m.args, "[]");
    /* a trailing function is the report function: not an argument, a token */
    lua_ok(s, "assert(mod.echo('x', report) == true)");
    assert_string_equal(m.args, "[\"x\"]");
    assert_true(m.token != 0);
    assert_int_equal(pending_count(s), 1);
    assert_int_equal(complete(s, m.token, "{\"status\":0,\"id\":\"k1\"}"), 0);
    lua_ok(s, "assert(#REPORTS == 1 and REPORTS[1].id == 'k1' and REPORTS[1].status == 0)");
    /* a failure: nil, the module's reason, the errno's name; its token never reports */
    lua_ok(s, "local ok, msg, code = mod.echo('fail', report)\n"
              "assert(ok == nil and msg == 'queue full' and code == 'ENOBUFS', msg)");
    assert_int_equal(pending_count(s), 0);
    assert_int_equal(complete(s, m.token, "{\"status\":0}"), -ENOENT);
    /* a value returned instead of true */
    lua_ok(s, "local r = mod.echo('ret')\n"
              "assert(r.x == 1 and #r.l == 2 and r.l[2] == json.null)");
    /* what json.encode refuses raises, naming the function; the module is not called */
    int before = m.ncalls;
    lua_ok(s, "local ok, err = pcall(mod.echo, print, 1)\n"
              "assert(not ok and err:find('mod.echo: cannot encode a function', 1, true), err)");
    assert_int_equal(m.ncalls, before);
    lua_ok(s, "assert(a.b.c.echo('deep') == true)");
    assert_string_equal(m.args, "[\"deep\"]");
}

static void test_module_fn_kemi_codes_and_inert(void **state)
{
    fixture *f = *state;
    fake_module m = {0};
    hub_script_fn_ref refs[3];
    hub_script *s = load_with_fns(f, &m, refs, 0, "ksr_evapi_event");
    /* the module's function replaces ksr.lua's "not available" entry */
    assert_int_equal(lua_int(s, "return KSR.kafka.send('topic', 'msg')"), 1);
    assert_string_equal(m.args, "[\"topic\",\"msg\"]");
    capture_begin(f);
    lua_Integer rc = lua_int(s, "return KSR.kafka.send('fail', 'msg')");
    const char *log = capture_end(f);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(log, "KSR.kafka.send: queue full"));
    /* a function handed to a KEMI call is not a report function: it cannot be encoded */
    lua_ok(s, "assert(not pcall(KSR.kafka.send, 't', print))");
    hlua_script_ops.free(f->s);

    /* a state being checked has the functions, and every call fails without reaching them */
    m.ncalls = 0;
    s = load_with_fns(f, &m, refs, 1, "");
    lua_ok(s, "local ok, msg, code = mod.echo('x', report)\n"
              "assert(ok == nil and code == 'EAGAIN' and msg:find('checked'), msg)");
    assert_int_equal(m.ncalls, 0);
    assert_int_equal(pending_count(s), 0);
}

/* Arguments arrive as the script gave them: strings binary-safe as pointer and length,
 * integers apart from floats, booleans, nil and json.null as nil, tables as JSON. */
static void test_module_fn_typed_args(void **state)
{
    fixture *f = *state;
    fake_module m = {0};
    hub_script_fn_ref refs[3];
    hub_script *s = load_with_fns(f, &m, refs, 0, "");
    lua_ok(s, "assert(mod.echo('a\\0b', 3, 3.5, true, false, json.null, {1, 'x'}, {}) == true)");
    assert_string_equal(m.args, "[\"a\\u0000b\",3,\"3.5f\",true,false,null,[1,\"x\"],{}]");
    /* two tables, a raise in the second: nothing leaks, the module is not called */
    int before = m.ncalls;
    lua_ok(s, "local ok, err = pcall(mod.echo, {a = 1}, {b = print})\n"
              "assert(not ok and err:find('mod.echo: cannot encode a function', 1, true), err)");
    lua_ok(s, "local t = {} for i = 1, 17 do t[i] = i end\n"
              "local ok, err = pcall(mod.echo, table.unpack(t))\n"
              "assert(not ok and err:find('more than 16 arguments', 1, true), err)");
    assert_int_equal(m.ncalls, before);
    lua_ok(s, "assert(mod.echo(table.unpack({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, "
              "16})) == true)");
    assert_int_equal(m.ncalls, before + 1);
}

/* A typed result record packed as the hub packs one (hub/script.h). */
static size_t pack_result(char *buf, size_t off, uint64_t token, unsigned flags,
                          const hub_field *fl, size_t n)
{
    hub_result *r = (hub_result *)(buf + off);
    char *str = (char *)&r->f[n];
    *r = (hub_result){.token = token, .nfields = (uint16_t)n, .flags = (uint16_t)flags};
    for (size_t i = 0; i < n; i++) {
        r->f[i] = (hub_rfield){fl[i].name, (uint32_t)fl[i].type, 0, fl[i].i};
        if (fl[i].type == HUB_FIELD_STR) {
            r->f[i].len = (uint32_t)fl[i].len;
            r->f[i].i = str - (char *)r;
            memcpy(str, fl[i].s, fl[i].len);
            str[fl[i].len] = '\0';
            str += fl[i].len + 1;
        }
    }
    size_t size = ((size_t)(str - (char *)r) + 7) & ~(size_t)7;
    r->size = (uint32_t)size;
    return off + size;
}

/* Typed results: each report function gets a table of the fields; a batch goes on after a
 * report function fails; "more" keeps the token; an unknown token is counted. */
static void test_module_fn_typed_results(void **state)
{
    fixture *f = *state;
    fake_module m = {0};
    hub_script_fn_ref refs[3];
    hub_script *s = load_with_fns(f, &m, refs, 0, "");
    uint64_t t[4];
    lua_ok(s, "assert(mod.echo('x', report))");
    t[0] = m.token;
    lua_ok(s, "assert(mod.echo('x', function(r) error('boom ' .. r.id) end))");
    t[1] = m.token;
    lua_ok(s, "assert(mod.echo('x', report))");
    t[2] = m.token;
    lua_ok(s, "assert(mod.echo('x', report))");
    t[3] = m.token;
    assert_int_equal(pending_count(s), 4);
    _Alignas(8) static char buf[4096];
    size_t off = 0;
    hub_field a[] = {{"id", HUB_FIELD_STR, "k1", 2, 0},
                     {"status", HUB_FIELD_INT, NULL, 0, -1},
                     {"msg", HUB_FIELD_STR, "a\0b", 3, 0},
                     {"ok", HUB_FIELD_BOOL, NULL, 0, 0},
                     {"offset", HUB_FIELD_INT, NULL, 0, 1LL << 40}};
    off = pack_result(buf, off, t[0], 0, a, 5);
    off = pack_result(buf, off, t[1], 0, a, 1);
    off = pack_result(buf, off, t[2], HUB_RESULT_MORE, a + 1, 1);
    off = pack_result(buf, off, 123456789, 0, a, 1);
    off = pack_result(buf, off, t[3], 0, a + 1, 1);
    capture_begin(f);
    assert_int_equal(hlua_script_ops.on_results(s, buf, off), 1);
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "lua: report:"));
    assert_non_null(strstr(log, "boom k1"));
    lua_ok(s, "assert(#REPORTS == 3)\n"
              "local r = REPORTS[1]\n"
              "assert(r.id == 'k1' and r.status == -1 and r.msg == 'a\\0b' and r.ok == false)\n"
              "assert(math.type(r.offset) == 'integer' and r.offset == 1 << 40 and r.more == nil)\n"
              "assert(REPORTS[2].more == true and REPORTS[2].status == -1)\n"
              "assert(REPORTS[3].status == -1 and REPORTS[3].id == nil)");
    assert_int_equal(pending_count(s), 1); /* t[2]: more to come */
    /* its last result, then nothing is left */
    off = pack_result(buf, 0, t[2], 0, a, 2);
    assert_int_equal(hlua_script_ops.on_results(s, buf, off), 0);
    assert_int_equal(pending_count(s), 0);
    lua_ok(s, "assert(#REPORTS == 4 and REPORTS[4].more == nil)");
}

/* Field names become Lua strings once per state: past HLUA_KEYS_MAX names they are made
 * each time, and two names with the same text at different addresses are the same key. */
static void test_module_fn_result_field_names(void **state)
{
    fixture *f = *state;
    fake_module m = {0};
    hub_script_fn_ref refs[3];
    hub_script *s = load_with_fns(f, &m, refs, 0, "");
    enum { N = HLUA_KEYS_MAX + 8 };
    static char names[N][8]; /* static: a name outlives the results */
    static char same1[] = "same", same2[] = "same";
    hub_field a[N];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof(names[i]), "f%02d", i);
        a[i] = (hub_field){names[i], HUB_FIELD_INT, NULL, 0, i};
    }
    hub_field b = {same1, HUB_FIELD_STR, "one", 3, 0}, c = {same2, HUB_FIELD_STR, "two", 3, 0};
    _Alignas(8) static char buf[8192];
    size_t off = 0;
    for (int k = 0; k < 2; k++) { /* twice: the second time from the cache as far as it goes */
        lua_ok(s, "assert(mod.echo('x', report))");
        off = pack_result(buf, off, m.token, 0, a, N);
    }
    lua_ok(s, "assert(mod.echo('x', report))");
    off = pack_result(buf, off, m.token, 0, &b, 1);
    lua_ok(s, "assert(mod.echo('x', report))");
    off = pack_result(buf, off, m.token, 0, &c, 1);
    assert_int_equal(hlua_script_ops.on_results(s, buf, off), 0);
    assert_int_equal(s->nkeys, HLUA_KEYS_MAX);
    lua_ok(s, "assert(#REPORTS == 4)\n"
              "for k = 1, 2 do\n"
              "  local n = 0\n"
              "  for name, v in pairs(REPORTS[k]) do\n"
              "    assert(name == string.format('f%02d', v)) n = n + 1\n"
              "  end\n"
              "  assert(n == 40)\n"
              "end\n"
              "assert(REPORTS[3].same == 'one' and REPORTS[4].same == 'two')");
}

/* ---- requests (hub_req): the request route and what it may do ---- */

static const char kemi_sip_script[] =
    "function ksr_evapi_event(evname)\n"
    "  if evname == 'evapi:message-received' then\n"
    "    local a = json.decode(KSR.pv.get('$evapi(msg)'))\n"
    "    CONTACT = a.contact\n"
    "    RC = KSR.tmx.t_continue(a.tindex, a.tlabel, 'ksr_route_resume')\n"
    "  end\n"
    "end\n"
    "function ksr_request_route()\n"
    "  SEEN = {KSR.pv.get('$rm'), KSR.pv.get('$rU'), KSR.pv.get('$sp'), "
    "KSR.pv.get('$hdr(X-Test)'),\n"
    "          KSR.pv.get('$hdr(Nope)'), KSR.pv.get('$nosuch'), KSR.tm.t_newtran()}\n"
    "  if KSR.pv.get('$rU') == '100' then\n"
    "    local data = json.encode({tindex = KSR.pv.get('$T(id_index)'),\n"
    "                              tlabel = KSR.pv.get('$T(id_label)')})\n"
    "    if KSR.evapi.async_relay(data) < 0 then KSR.sl.sl_send_reply(503, 'No app') end\n"
    "    return\n"
    "  end\n"
    "  KSR.sl.sl_send_reply(200, 'OK')\n"
    "end\n"
    "function ksr_route_resume()\n"
    "  KSR.hdr.append_to_reply('Contact: <' .. CONTACT .. '>\\r\\n')\n"
    "  KSR.tm.t_reply(302, 'Moved')\n"
    "end\n";

static void test_request_kemi_async_and_continue(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_sip_script, CB);
    fake_req q = {.base = {&freq_ops}, .refs = 1, .index = 7, .label = 42};
    hlua_script_ops.on_request(s, &q.base);
    lua_ok(s, "assert(SEEN[1] == 'INVITE' and SEEN[2] == '100' and SEEN[3] == 5061)\n"
              "assert(math.type(SEEN[3]) == 'integer' and SEEN[4] == 'yes')\n"
              "assert(SEEN[5] == nil and SEEN[6] == nil and SEEN[7] == 1)\n");
    assert_int_equal(q.suspended, 1); /* relayed to a client: suspended */
    assert_int_equal(q.ncodes, 0);
    fake_call *c = last_call(f);
    assert_string_equal(c->op, "relay");
    c->data[c->len] = '\0';
    assert_non_null(strstr(c->data, "\"tindex\":7"));
    assert_non_null(strstr(c->data, "\"tlabel\":42"));
    /* the application answers: t_continue runs the route with the request, at once */
    resumable = &q;
    connect(s, 9, 0, "127.0.0.1", 4000);
    message(s, 9, "{\"tindex\":7,\"tlabel\":42,\"contact\":\"sip:100@10.0.0.1\"}");
    resumable = NULL;
    assert_int_equal(lua_int(s, "return RC"), 1);
    assert_int_equal(q.ncodes, 1);
    assert_int_equal(q.codes[0], 302);
    assert_string_equal(q.reasons[0], "Moved");
    assert_string_equal(q.last_hdrs, "Contact: <sip:100@10.0.0.1>\r\n");
    assert_int_equal(q.resumed_done, 1);
    assert_int_equal(q.refs, 1); /* every reference taken was dropped */
    /* an unknown pair: -1 and a log line, nothing runs */
    capture_begin(f);
    message(s, 9, "{\"tindex\":7,\"tlabel\":43,\"contact\":\"x\"}");
    const char *log = capture_end(f);
    assert_int_equal(lua_int(s, "return RC"), -1);
    assert_non_null(strstr(log, "KSR.tmx.t_continue(7, 43): no such transaction"));
    assert_int_equal(q.ncodes, 1);
}

static void test_request_kemi_no_client_is_not_suspended(void **state)
{
    fixture *f = *state;
    hub_script *s = load_ok(f, kemi_sip_script, CB);
    f->hub.ret = 0; /* no client receives the relay */
    fake_req q = {.base = {&freq_ops}, .refs = 1, .index = 1, .label = 2};
    hlua_script_ops.on_request(s, &q.base);
    assert_int_equal(q.suspended, 0);
    assert_int_equal(q.unsuspends, 1);
    assert_int_equal(q.ncodes, 1);
    assert_int_equal(q.codes[0], 503);
    /* a plain request: answered in the route; a second final reply is refused (-1) */
    fake_req o = {.base = {&freq_ops}, .refs = 1};
    lua_ok(s, "function ksr_request_route() RC1 = KSR.sl.sl_send_reply(200, 'OK')\n"
              "  RC2 = KSR.tm.t_reply(500, 'again') end");
    hlua_script_ops.on_request(s, &o.base);
    assert_int_equal(lua_int(s, "return RC1"), 1);
    assert_int_equal(lua_int(s, "return RC2"), -1);
    assert_int_equal(o.ncodes, 1);
    assert_int_equal(o.refs, 1);
}

static void test_request_native_object(void **state)
{
    fixture *f = *state;
    hub_script *s =
        load_ok(f,
                "evapi.on('message', function() end)\n"
                "evapi.on('request', function(req)\n"
                "  R = {req.method, req.ruser, req.src_port, req.index, req.label,\n"
                "       req:header('X-Test'), req:header('Nope'), req.bogus, tostring(req)}\n"
                "  KEPT = req\n"
                "  assert(req:reply(486, 'Busy', 'X-Why: test\\r\\n') == true)\n"
                "  local ok, msg, code = req:reply(200, 'late')\n"
                "  assert(ok == nil and code == 'EALREADY', tostring(code))\n"
                "end)\n",
                "");
    fake_req q = {.base = {&freq_ops}, .refs = 1, .index = 3, .label = 4};
    hlua_script_ops.on_request(s, &q.base);
    lua_ok(s, "assert(R[1] == 'INVITE' and R[2] == '100' and R[3] == 5061 and R[4] == 3)\n"
              "assert(R[5] == 4 and R[6] == 'yes' and R[7] == nil and R[8] == nil)\n"
              "assert(R[9] == 'request INVITE call-1', R[9])\n");
    assert_int_equal(q.ncodes, 1);
    assert_int_equal(q.codes[0], 486);
    assert_string_equal(q.last_hdrs, "X-Why: test\r\n");
    assert_int_equal(q.refs, 2); /* KEPT holds one */
    lua_ok(s, "KEPT = nil collectgarbage()");
    assert_int_equal(q.refs, 1);
}

/* The native request handler runs as a coroutine resumed from C: a runaway one is stopped
 * by the budget as any callback (the watchdog hooks the coroutine that runs). */
static void test_request_native_runaway_is_stopped(void **state)
{
    fixture *f = *state;
    hub_script *s = load_full(f,
                              "evapi.on('message', function() end)\n"
                              "evapi.on('request', function(req)\n"
                              "  if req.ruser == '100' then while true do end end\n"
                              "end)\n",
                              "", 100000, 0);
    assert_non_null(s);
    f->s = s;
    fake_req q = {.base = {&freq_ops}, .refs = 1, .index = 3, .label = 4};
    capture_begin(f);
    hlua_script_ops.on_request(s, &q.base);
    const char *log = capture_end(f);
    assert_non_null(strstr(log, "instruction budget exceeded (100000 instructions)"));
    assert_int_equal(f->hub.counts[HUB_SCRIPT_ERROR], 1);
    /* and the state goes on; the failed handler's coroutine lets go of the request */
    assert_int_equal(lua_int(s, "return 7"), 7);
    lua_ok(s, "collectgarbage()");
    assert_int_equal(q.refs, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(test_kemi_relay_returns_1_or_minus_1),
        T(test_request_kemi_async_and_continue),
        T(test_request_kemi_no_client_is_not_suspended),
        T(test_request_native_object),
        T(test_request_native_runaway_is_stopped),
        T(test_module_fn_native_args_results_report),
        T(test_module_fn_kemi_codes_and_inert),
        T(test_module_fn_typed_args),
        T(test_module_fn_typed_results),
        T(test_module_fn_result_field_names),
        T(test_kemi_multicast_and_unicast),
        T(test_kemi_close_returns_0_and_minus_1),
        T(test_kemi_set_tag),
        T(test_kemi_pv_in_each_event),
        T(test_kemi_binary_payload_round_trip),
        T(test_kemi_exit_is_silent_and_resets_context),
        T(test_kemi_runtime_error_logged_and_next_works),
        T(test_kemi_budget_resets_context),
        T(test_kemi_log_functions_strip_one_newline),
        T(test_kemi_unavailable_functions),
        T(test_kemi_callback_redefined_at_runtime),
        T(test_native_conn_fields_and_methods),
        T(test_native_results_are_nil_msg_code),
        T(test_native_evapi_by_id),
        T(test_native_scope_local),
        T(test_native_misuse_raises),
        T(test_native_close_event_marks_closed),
        T(test_native_on_replaces_and_unsets),
        T(test_native_binary_message),
        T(test_load_syntax_error_gives_file_line),
        T(test_load_runtime_error_gives_file_line),
        T(test_load_missing_file),
        T(test_load_refuses_missing_callback),
        T(test_load_refuses_no_handler),
        T(test_load_budget_stops_top_level_loop),
        T(test_load_exit_at_top_level_is_fine),
        T(test_load_warns_when_both_dialects),
        T(test_budget_stops_runaway_and_next_call_works),
        T(test_errors_are_counted_exits_are_not),
        T(test_stats_table),
        T(test_on_tag_updates_conn_view),
        T(test_load_from_source_reads_like_a_file),
        T(test_memory_limit_fails_callback_not_hub),
        T(test_memory_limit_at_load),
        T(test_memory_small_block_cache_counts_exactly),
        T(test_reload_carries_connections_and_tags),
        T(test_reload_native_sees_tag),
        T(test_reload_logs_pending_reports_that_will_not_run),
        T(test_raise_passes_object_array_and_no_params),
        T(test_raise_misuse_raises_and_reaches_no_hub),
        T(test_report_runs_once_with_the_result_table),
        T(test_report_runs_for_each_result_while_more),
        T(test_report_gets_json_null_and_binary_strings),
        T(test_on_complete_of_unknown_token_is_enoent),
        T(test_failing_report_is_a_counted_error_and_state_goes_on),
        T(test_raise_failure_returns_nil_reason_and_forgets_the_function),
        T(test_subscribe_and_unsubscribe),
        T(test_subscribe_bad_uri_raises_with_the_reason),
        T(test_kemi_script_uses_the_event_interface),
        T(test_json_round_trip),
        T(test_json_errors),
        T(test_example_kemi_protocol),
        T(test_example_native_protocol),
        T(test_idle_and_free_are_safe),
        T(test_script_finalizers_refused),
        T(test_sethook_cannot_remove_the_budget),
        T(test_os_exit_raises_and_the_hub_goes_on),
        T(test_restrict_withholds_io_os_native_code_and_debug),
        T(test_unrestricted_keeps_the_libraries),
#undef T
    };
    return cmocka_run_group_tests_name("lua", tests, NULL, NULL);
}
