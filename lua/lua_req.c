/* Requests a module hands to scripts (hub_req: a SIP request): the current request of a
 * route, what KSR.pv/sl/tm/hdr/tmx and the KEMI async relays do with it, and the native
 * request object. */
#include <errno.h>
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
    s->cur_req = r;
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
    s->cur_req = prev;
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
        {"pv", k_pv},           {"reply", k_reply}, {"append_to_reply", k_append},
        {"newtran", k_newtran}, {"async", k_async}, {"t_continue", k_continue},
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
