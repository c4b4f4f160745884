/* Requests a module hands to scripts (hub_req: a SIP request): the current request of a
 * route, what KSR.pv/sl/tm/hdr/tmx and the KEMI async relays do with it, and the native
 * request object. */
#define _GNU_SOURCE 1 /* memmem */
#include <errno.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "hub/log.h"
#include "lua/hlua_int.h"

#define HLUA_REQUEST_MT "evhub.request"

/* Push the value of pv name of r, or nil. */
static int push_pv(lua_State *L, hub_req *r, const char *name)
{
    hub_pv v = {0};
    if (!r || r->ops->pv(r, name, &v) < 0) {
        lua_pushnil(L);
        return 1;
    }
    if (v.is_int)
        lua_pushinteger(L, (lua_Integer)v.i);
    else
        lua_pushlstring(L, v.s, v.len);
    return 1;
}

/* Make r the current request of s: its Call-ID goes with the raises from now on. */
void hlua__set_current(hub_script *s, hub_req *r)
{
    s->cur_req = r;
    if (!s->api->context)
        return;
    hub_pv ci = {0};
    if (r && r->ops->pv(r, "$ci", &ci) == 0 && !ci.is_int)
        s->api->context(s->ud, ci.s, ci.len);
    else
        s->api->context(s->ud, NULL, 0);
}

/* ---- the KEMI helpers (ksr.lua's H.req) ---- */

/* H.req.pv(name): a SIP pseudo-variable of the current request, or nil. */
static int k_pv(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    return push_pv(L, hlua__script(L)->cur_req, name);
}

static hub_req *need_req(lua_State *L, const char *who)
{
    hub_req *r = hlua__script(L)->cur_req;
    if (!r)
        hub_log(HUB_LOG_ERR, "%s: no SIP request in this route", who);
    return r;
}

/* H.req.reply(who, code, reason): 1 or -1 (the reason logged). */
static int k_reply(lua_State *L)
{
    const char *who = luaL_checkstring(L, 1);
    lua_Integer code = luaL_checkinteger(L, 2);
    const char *reason = luaL_optstring(L, 3, "");
    hub_req *r = need_req(L, who);
    char err[160] = "";
    if (!r) {
        lua_pushinteger(L, -1);
        return 1;
    }
    if (code < 100 || code > 699) {
        hub_log(HUB_LOG_ERR, "%s: %lld is not a SIP status code", who, (long long)code);
        lua_pushinteger(L, -1);
        return 1;
    }
    int rc = r->ops->reply(r, (int)code, reason, err, sizeof(err));
    if (rc < 0)
        hub_log(HUB_LOG_ERR, "%s: %s", who, err[0] ? err : strerror(-rc));
    lua_pushinteger(L, rc < 0 ? -1 : 1);
    return 1;
}

/* H.req.append_to_reply(text): 1 or -1. */
static int k_append(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    hub_req *r = need_req(L, "KSR.hdr.append_to_reply");
    char err[160] = "";
    if (!r) {
        lua_pushinteger(L, -1);
        return 1;
    }
    int rc = r->ops->append_to_reply(r, text, len, err, sizeof(err));
    if (rc < 0)
        hub_log(HUB_LOG_ERR, "KSR.hdr.append_to_reply: %s", err[0] ? err : strerror(-rc));
    lua_pushinteger(L, rc < 0 ? -1 : 1);
    return 1;
}

/* H.req.newtran(): 1 in a request route (the transaction exists already), else -1. */
static int k_newtran(lua_State *L)
{
    lua_pushinteger(L, need_req(L, "KSR.tm.t_newtran") ? 1 : -1);
    return 1;
}

/* H.req.check_trans(): -1. A request that belongs to a transaction (a retransmission, the ACK
 * of a non-2xx final reply, a CANCEL) is taken by the SIP module before any route runs, so
 * the request a route sees never does; Kamailio scripts call it first, for ACKs mostly. */
static int k_check_trans(lua_State *L)
{
    need_req(L, "KSR.tm.t_check_trans");
    lua_pushinteger(L, -1);
    return 1;
}

/* Suspend the current request and relay data to the application(s): kind 0 relay,
 * 1 multicast, 2 unicast. 1, or -1 when nothing could receive it (nothing is suspended). */
static int async_relay(lua_State *L, hub_script *s, int kind, const char *who, const char *data,
                       size_t len, const char *tag, size_t taglen)
{
    hub_req *r = s->cur_req;
    char err[160] = "";
    if (!r) {
        hub_log(HUB_LOG_ERR, "%s: no SIP transaction to suspend", who);
        return -1;
    }
    /* Suspended before the relay goes out, so an answer cannot overtake it. */
    if (r->ops->suspend(r, err, sizeof(err)) < 0) {
        hub_log(HUB_LOG_ERR, "%s: %s", who, err);
        return -1;
    }
    int n;
    if (kind == 0)
        n = s->api->relay(s->ud, data, len);
    else if (kind == 1)
        n = s->api->multicast(s->ud, tag, taglen, data, len);
    else
        n = s->api->unicast(s->ud, tag, taglen, data, len);
    if (n <= 0) {
        r->ops->unsuspend(r);
        hub_log(HUB_LOG_INFO, "%s: %s", who,
                n == 0 ? "no client to receive it, not suspended" : strerror(-n));
        (void)L;
        return -1;
    }
    return 1;
}

/* H.req.async(kind, data[, tag]) */
static int k_async(lua_State *L)
{
    static const char *const who[] = {"KSR.evapi.async_relay", "KSR.evapi.async_multicast",
                                      "KSR.evapi.async_unicast"};
    int kind = (int)luaL_checkinteger(L, 1);
    size_t len, taglen = 0;
    const char *data = luaL_checklstring(L, 2, &len);
    const char *tag = kind ? luaL_checklstring(L, 3, &taglen) : NULL;
    luaL_argcheck(L, kind >= 0 && kind <= 2, 1, "bad kind");
    lua_pushinteger(L, async_relay(L, hlua__script(L), kind, who[kind], data, len, tag, taglen));
    return 1;
}

/* Run global function fname (a route) with r as the current request, protected: its errors
 * are logged with a traceback and go no further. */
static void run_route(lua_State *L, hub_script *s, hub_req *r, const char *fname)
{
    hub_req *prev = s->cur_req;
    hlua__set_current(s, r);
    lua_pushcfunction(L, hlua__traceback); /* [.., tb] */
    if (lua_getglobal(L, fname) != LUA_TFUNCTION) {
        hub_log(HUB_LOG_ERR, "lua: t_continue: '%s' is not a function", fname);
        lua_pop(L, 2);
    } else if (lua_pcall(L, 0, 0, -2) != LUA_OK) {
        if (!hlua__is_exit(L, -1)) {
            const char *msg = lua_tostring(L, -1);
            hub_log(HUB_LOG_ERR, "lua: %s: %s", fname, msg ? msg : "(error object)");
            s->api->count(s->ud, HUB_SCRIPT_ERROR);
        }
        lua_pop(L, 2);
    } else {
        lua_pop(L, 1);
    }
    hlua__set_current(s, prev);
}

/* H.req.t_continue(index, label, fname): 1, or -1 (logged) for an unknown, expired,
 * cancelled or already resumed pair. */
static int k_continue(lua_State *L)
{
    hub_script *s = hlua__script(L);
    lua_Integer index = luaL_checkinteger(L, 1), label = luaL_checkinteger(L, 2);
    const char *fname = luaL_checkstring(L, 3);
    char err[160] = "";
    hub_req *r = NULL;
    if (index < 0 || index > 0xffffffffLL || label < 0 || label > 0xffffffffLL)
        snprintf(err, sizeof(err), "no such transaction");
    else
        r = s->api->req_resume(s->ud, (unsigned)index, (unsigned)label, err, sizeof(err));
    if (!r) {
        hub_log(HUB_LOG_ERR, "KSR.tmx.t_continue(%lld, %lld): %s", (long long)index,
                (long long)label, err);
        lua_pushinteger(L, -1);
        return 1;
    }
    run_route(L, s, r, fname);
    r->ops->route_done(r, 1);
    r->ops->unref(r);
    lua_pushinteger(L, 1);
    return 1;
}

void hlua__push_req_helpers(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"pv", k_pv},
        {"reply", k_reply},
        {"append_to_reply", k_append},
        {"newtran", k_newtran},
        {"async", k_async},
        {"t_continue", k_continue},
        {"check_trans", k_check_trans},
        {NULL, NULL},
    };
    luaL_newlib(L, fns);
}

/* ---- the native request object ---- */

typedef struct lreq {
    hub_req *r; /* a reference; NULL once collected */
} lreq;

static const struct {
    const char *field, *pv;
} fields[] = {
    {"method", "$rm"},         {"ruri", "$ru"},           {"ruser", "$rU"},    {"rdomain", "$rd"},
    {"from_uri", "$fu"},       {"from_user", "$fU"},      {"to_uri", "$tu"},   {"to_user", "$tU"},
    {"callid", "$ci"},         {"src_ip", "$si"},         {"src_port", "$sp"}, {"body", "$rb"},
    {"index", "$T(id_index)"}, {"label", "$T(id_label)"},
};

static lreq *check_lreq(lua_State *L, int i)
{
    lreq *q = luaL_checkudata(L, i, HLUA_REQUEST_MT);
    luaL_argcheck(L, q->r != NULL, i, "request is gone");
    return q;
}

/* req:reply(code, reason[, headers]): true, or nil, msg, code */
static int req_reply(lua_State *L)
{
    lreq *q = check_lreq(L, 1);
    lua_Integer code = luaL_checkinteger(L, 2);
    const char *reason = luaL_optstring(L, 3, "");
    size_t hl = 0;
    const char *hdrs = luaL_optlstring(L, 4, NULL, &hl);
    luaL_argcheck(L, code >= 100 && code <= 699, 2, "a SIP status code (100..699)");
    char err[160] = "";
    int rc = 0;
    if (hdrs && hl)
        rc = q->r->ops->append_to_reply(q->r, hdrs, hl, err, sizeof(err));
    if (rc >= 0)
        rc = q->r->ops->reply(q->r, (int)code, reason, err, sizeof(err));
    if (rc >= 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    int n = hlua__push_result(L, rc);
    if (err[0]) {
        lua_pushstring(L, err);
        lua_replace(L, -3);
    }
    return n;
}

/* req:header(name): the first header of that name, or nil */
static int req_header(lua_State *L)
{
    lreq *q = check_lreq(L, 1);
    const char *name = luaL_checkstring(L, 2);
    lua_pushfstring(L, "$hdr(%s)", name);
    return push_pv(L, q->r, lua_tostring(L, -1));
}

static int req_index(lua_State *L)
{
    lreq *q = check_lreq(L, 1);
    const char *k = luaL_checkstring(L, 2);
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        if (strcmp(k, fields[i].field) == 0)
            return push_pv(L, q->r, fields[i].pv);
    }
    if (strcmp(k, "reply") == 0)
        lua_pushcfunction(L, req_reply);
    else if (strcmp(k, "header") == 0)
        lua_pushcfunction(L, req_header);
    else
        lua_pushnil(L);
    return 1;
}

static int req_gc(lua_State *L)
{
    lreq *q = luaL_checkudata(L, 1, HLUA_REQUEST_MT);
    if (q->r) {
        q->r->ops->unref(q->r);
        q->r = NULL;
    }
    return 0;
}

static int req_tostring(lua_State *L)
{
    lreq *q = luaL_checkudata(L, 1, HLUA_REQUEST_MT);
    if (!q->r)
        return lua_pushliteral(L, "request (gone)"), 1;
    hub_pv m = {0}, c = {0};
    q->r->ops->pv(q->r, "$rm", &m);
    q->r->ops->pv(q->r, "$ci", &c);
    lua_pushfstring(L, "request %s %s", m.s ? m.s : "?", c.s ? c.s : "?");
    return 1;
}

void hlua__push_request(lua_State *L, hub_req *r)
{
    lreq *q = lua_newuserdatauv(L, sizeof(*q), 0);
    q->r = NULL;
    if (luaL_newmetatable(L, HLUA_REQUEST_MT)) {
        lua_pushcfunction(L, req_index);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, req_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, req_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "request");
        lua_setfield(L, -2, "__metatable");
    }
    lua_setmetatable(L, -2);
    r->ops->ref(r);
    q->r = r;
}

/* ---- native async: the request handler as a coroutine ---- */

/* Resume co (its request r) with nargs values on its stack; then either it waits again (a
 * completion entry holds it), or it ended: its request's route is done. Errors are logged
 * with co's traceback and counted. */
static void resume_co(hub_script *s, lua_State *co, hub_req *r, int nargs, int first)
{
    lua_State *L = hlua__script_main(s);
    hub_req *prev = s->cur_req;
    int nres = 0;
    lua_State *prev_co = s->cur_co, *prev_run;
    hlua__set_current(s, r);
    int began = hlua__enter(s, co, &prev_run);
    s->cur_co = co;
    int st = lua_resume(co, L, nargs, &nres);
    s->cur_co = prev_co;
    hlua__leave(s, began, prev_run);
    hlua__set_current(s, prev);
    if (st == LUA_YIELD) {
        lua_pop(co, nres);
        return;
    }
    if (st != LUA_OK && !hlua__is_exit(co, -1)) {
        const char *msg = lua_tostring(co, -1);
        luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
        hub_log(HUB_LOG_ERR, "lua: request: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        s->api->count(s->ud, HUB_SCRIPT_ERROR);
    }
    lua_settop(co, 0);
    s->arg_done = 1;
    if (!first)
        r->ops->route_done(r, 1); /* the first run's is the hub's */
}

/* Move the top n values of L to co (nothing is allocated on co, which has no handler of its
 * own: an error there would abort the process). */
static void move_args(lua_State *L, lua_State *co, int n)
{
    if (!lua_checkstack(co, n + LUA_MINSTACK))
        luaL_error(L, "out of memory for a coroutine's stack");
    lua_xmove(L, co, n);
}

int hlua__run_request_handler(lua_State *L, hub_script *s, int handler_ref)
{
    lua_State *co = lua_newthread(L); /* [co]: anchored by the entry while it waits */
    lua_rawgeti(L, LUA_REGISTRYINDEX, handler_ref);
    hlua__push_request(L, s->cur_req);
    move_args(L, co, 2);
    resume_co(s, co, s->cur_req, 1, 1);
    lua_pop(L, 1);
    return 0;
}

/* Protected: [co] at 1, the result in s->arg_result, the request in s->arg_req. */
static int waiter_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    lua_State *co = lua_tothread(L, 1);
    struct json_object *v = NULL;
    int n;
    if (json_object_object_get_ex(s->arg_result, "answer", &v)) {
        const char *why = hlua__json_push(L, v);
        if (why) {
            lua_pushnil(L);
            lua_pushstring(L, why);
            n = 2;
        } else {
            n = 1;
        }
    } else {
        json_object_object_get_ex(s->arg_result, "error", &v);
        lua_pushnil(L);
        lua_pushstring(L, v ? json_object_get_string(v) : "failed");
        n = 2;
    }
    move_args(L, co, n);
    resume_co(s, co, s->arg_req, n, 0);
    return 0;
}

void hlua__resume_waiter(hub_script *s, struct json_object *result)
{
    lua_State *L = s->L; /* [entry] */
    lua_getfield(L, -1, "r");
    hub_req *r = lua_touserdata(L, -1);
    lua_pop(L, 1);
    lua_pushcfunction(L, waiter_tramp); /* [entry, tramp] */
    lua_getfield(L, -2, "co");          /* [entry, tramp, co] */
    if (!r || !lua_isthread(L, -1)) {
        lua_pop(L, 3);
        return;
    }
    /* Everything that may allocate runs protected: an answer too large for max_memory fails
     * this request, not the hub. */
    s->arg_result = result;
    s->arg_req = r;
    s->arg_done = 0;
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        hub_log(HUB_LOG_ERR, "lua: request: resuming the handler: %s", msg ? msg : "error");
        s->api->count(s->ud, HUB_SCRIPT_ERROR);
        lua_pop(L, 1);
        if (!s->arg_done)
            r->ops->route_done(r, 1); /* it will not run again: the request is answered */
    }
    s->arg_result = NULL;
    s->arg_req = NULL;
    r->ops->unref(r); /* the entry's */
    lua_pop(L, 1);    /* [] */
}

/* evapi.async_relay(data[, opts]), async_multicast(data, tag[, opts]),
 * async_unicast(data, tag[, opts]): inside a request handler, relay data (a table, sent as
 * JSON with "evhub_id" added) and wait for the application's answer: the answer (a table),
 * or nil, "timeout" | "no client" | reason. opts.timeout: ms (default [sip] async_timeout). */
static int n_async(lua_State *L, int kind)
{
    static const char *const who[] = {"evapi.async_relay", "evapi.async_multicast",
                                      "evapi.async_unicast"};
    hub_script *s = hlua__script(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    size_t taglen = 0;
    const char *tag = kind ? luaL_checklstring(L, 2, &taglen) : NULL;
    int oi = kind ? 3 : 2;
    lua_Integer timeout = 0;
    if (!lua_isnoneornil(L, oi)) {
        luaL_checktype(L, oi, LUA_TTABLE);
        lua_getfield(L, oi, "timeout");
        timeout = lua_isnil(L, -1) ? 0 : luaL_checkinteger(L, -1);
        luaL_argcheck(L, timeout >= 0 && timeout <= 3600000, oi, "timeout: 0..3600000 ms");
        lua_pop(L, 1);
    }
    hub_req *r = s->cur_req;
    if (!r || !r->ops->suspend_wait || !lua_isyieldable(L))
        return luaL_error(L, "%s: only inside a request handler (evapi.on(\"request\"))",
                          who[kind]);
    if (L != s->cur_co)
        return luaL_error(L,
                          "%s: from the request handler itself, not from a coroutine of its "
                          "own",
                          who[kind]);
    hub_pv iv = {0}, lv = {0};
    r->ops->pv(r, "$T(id_index)", &iv);
    r->ops->pv(r, "$T(id_label)", &lv);
    /* A copy of data with the envelope's id: the script's table is left as it was. */
    lua_newtable(L); /* [.., copy] */
    int copy = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, copy);
    }
    lua_pushfstring(L, "%I.%I", (lua_Integer)iv.i, (lua_Integer)lv.i);
    lua_setfield(L, copy, "evhub_id");
    hlua__json_push_box(L, copy, who[kind]); /* [.., copy, box]: raises on what JSON refuses */
    struct json_object *o = hlua__json_take(L, -1);
    size_t len = 0;
    const char *text = json_object_to_json_string_length(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    lua_pushlstring(L, text, len); /* [.., copy, box, json] */
    json_object_put(o);
    text = lua_tolstring(L, -1, &len);

    /* The waiting entry exists before the application can answer. */
    uint64_t token = s->api->token(s->ud);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [.., json, done] */
    lua_createtable(L, 0, 2);
    lua_pushthread(L);
    lua_setfield(L, -2, "co");
    lua_pushlightuserdata(L, r);
    lua_setfield(L, -2, "r");
    lua_rawseti(L, -2, (lua_Integer)token);
    lua_pop(L, 1); /* [.., json] */
    char err[160] = "";
    const char *fail = NULL;
    if (r->ops->suspend_wait(r, token, (int)timeout, err, sizeof(err)) < 0) {
        fail = err;
    } else {
        int n = kind == 0   ? s->api->relay(s->ud, text, len)
                : kind == 1 ? s->api->multicast(s->ud, tag, taglen, text, len)
                            : s->api->unicast(s->ud, tag, taglen, text, len);
        if (n <= 0) {
            r->ops->unsuspend(r);
            fail = n == 0 ? "no client" : strerror(-n);
        }
    }
    if (fail) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, (lua_Integer)token);
        lua_pushnil(L);
        lua_pushstring(L, fail);
        return 2;
    }
    r->ops->ref(r); /* the entry's, dropped once it resumed */
    return lua_yield(L, 0);
}

void hlua__drop_waiters(hub_script *s)
{
    lua_State *L = s->L;
    if (s->completions_ref == LUA_NOREF || s->completions_ref == 0)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [done] */
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) { /* [done, token, entry] */
        if (lua_istable(L, -1) && lua_getfield(L, -1, "r") == LUA_TLIGHTUSERDATA) {
            hub_req *r = lua_touserdata(L, -1);
            r->ops->unref(r);
        }
        lua_settop(L, 2); /* [done, token] */
    }
    lua_pop(L, 1);
}

static int n_async_relay(lua_State *L) { return n_async(L, 0); }
static int n_async_multicast(lua_State *L) { return n_async(L, 1); }
static int n_async_unicast(lua_State *L) { return n_async(L, 2); }

void hlua__open_async(lua_State *L)
{
    lua_getglobal(L, "evapi");
    lua_pushcfunction(L, n_async_relay);
    lua_setfield(L, -2, "async_relay");
    lua_pushcfunction(L, n_async_multicast);
    lua_setfield(L, -2, "async_multicast");
    lua_pushcfunction(L, n_async_unicast);
    lua_setfield(L, -2, "async_unicast");
    lua_pop(L, 1);
}

int hlua__take_answer(hub_script *s, const char *data, size_t len)
{
    if (!memmem(data, len, "\"evhub_id\"", 10))
        return 0;
    struct json_tokener *tok = json_tokener_new();
    struct json_object *o = tok ? json_tokener_parse_ex(tok, data, (int)len) : NULL;
    json_tokener_free(tok);
    struct json_object *id = NULL;
    unsigned index = 0, label = 0;
    char tail;
    if (!o || !json_object_object_get_ex(o, "evhub_id", &id) ||
        !json_object_is_type(id, json_type_string) ||
        sscanf(json_object_get_string(id), "%u.%u%c", &index, &label, &tail) != 2) {
        json_object_put(o);
        return 0; /* not an answer: the message handler gets it */
    }
    char err[160] = "";
    hub_req *r = s->api->req_resume(s->ud, index, label, err, sizeof(err));
    if (!r) {
        hub_log(HUB_LOG_INFO, "lua: answer for request %u.%u dropped: %s", index, label, err);
        json_object_put(o);
        return 1;
    }
    if (!r->ops->wake || r->ops->wake(r, o) < 0) {
        json_object_put(o);
        hub_log(HUB_LOG_WARN,
                "lua: answer for request %u.%u: it waits for t_continue, not for "
                "an evhub_id answer",
                index, label);
        r->ops->route_done(r, 1);
    }
    r->ops->unref(r);
    return 1;
}
