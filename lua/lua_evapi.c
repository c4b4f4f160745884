/* The native Lua API: the evapi module, the "evhub.client" conn objects, the log module,
 * and the few C helpers that ksr.lua builds the KEMI layer on. */
#include "lua/hlua.h"
#include "lua/hlua_int.h"

#include <errno.h>
#include <string.h>

#include <lauxlib.h>

#include "hub/core.h"
#include "hub/log.h"

/* ---- results ---- */

static const struct {
    int code;
    const char *name;
    const char *msg;
} errors[] = {
    {EINVAL, "EINVAL", "invalid tag"},
    {ENOENT, "ENOENT", "no such connection"},
    {EMSGSIZE, "EMSGSIZE", "message too large"},
    {ENOMEM, "ENOMEM", "out of memory"},
    {EPIPE, "EPIPE", "connection closing"},
    {ENOSYS, "ENOSYS", "no events module"},
    {ENOBUFS, "ENOBUFS", "too much handed to the hub and not yet carried out (worker_calls)"},
    {EAGAIN, "EAGAIN", "not available now"},
    {ENOTCONN, "ENOTCONN", "not connected"},
    {ETIMEDOUT, "ETIMEDOUT", "timed out"},
    {EALREADY, "EALREADY", "answered already"},
    {ECANCELED, "ECANCELED", "cancelled"},
};

static int push_error(lua_State *L, const char *msg, const char *code)
{
    lua_pushnil(L);
    lua_pushstring(L, msg);
    lua_pushstring(L, code);
    return 3;
}

int hlua__push_result(lua_State *L, int n)
{
    if (n > 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (n == 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "no client");
        return 2;
    }
    for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++) {
        if (errors[i].code == -n)
            return push_error(L, errors[i].msg, errors[i].name);
    }
    lua_pushnil(L);
    lua_pushstring(L, strerror(-n));
    lua_pushfstring(L, "E%d", -n);
    return 3;
}

static int push_closed(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

/* Argument i is a string, not a number converted to one. */
static const char *check_string(lua_State *L, int i, size_t *len)
{
    if (lua_type(L, i) != LUA_TSTRING)
        luaL_typeerror(L, i, "string");
    return lua_tolstring(L, i, len);
}

/* ---- conn objects ---- */

hlua_conn *hlua__push_conn(lua_State *L, const hub_conn_info *ci)
{
    hlua_conn *c = lua_newuserdatauv(L, sizeof(*c), 0); /* [conn] */
    memset(c, 0, sizeof(*c));
    c->id = ci->id;
    c->conidx = ci->conidx;
    c->port = ci->port;
    memcpy(c->addr, ci->addr, sizeof(c->addr));
    c->addr[sizeof(c->addr) - 1] = '\0';
    luaL_setmetatable(L, HLUA_CLIENT_MT);
    return c;
}

static hlua_conn *check_client(lua_State *L, int i)
{
    return luaL_checkudata(L, i, HLUA_CLIENT_MT);
}

/* The conn registered for id, or NULL. Leaves the stack as it was. */
static hlua_conn *lookup_conn(lua_State *L, uint64_t id)
{
    hub_script *s = hlua__script(L);
    hlua_conn *c = NULL;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->conns_ref); /* [.., conns] */
    if (lua_rawgeti(L, -1, (lua_Integer)id) == LUA_TUSERDATA)
        c = lua_touserdata(L, -1); /* kept alive by conns */
    lua_pop(L, 2);
    return c;
}

/* Argument i is a conn or an integer id. Sets *id and returns the conn (NULL if unknown). */
static hlua_conn *check_target(lua_State *L, int i, uint64_t *id)
{
    if (lua_type(L, i) == LUA_TUSERDATA) {
        hlua_conn *c = check_client(L, i);
        *id = c->id;
        return c;
    }
    lua_Integer n = luaL_checkinteger(L, i);
    luaL_argcheck(L, n >= 0, i, "connection id must not be negative");
    *id = (uint64_t)n;
    return lookup_conn(L, *id);
}

static int do_send(lua_State *L, hlua_conn *c, uint64_t id, int di)
{
    hub_script *s = hlua__script(L);
    size_t len;
    const char *data = luaL_checklstring(L, di, &len);
    if (c && c->closed)
        return push_closed(L);
    return hlua__push_result(L, s->api->send(s->ud, id, data, len));
}

static int do_set_tag(lua_State *L, hlua_conn *c, uint64_t id, int ti)
{
    hub_script *s = hlua__script(L);
    size_t len;
    const char *tag = check_string(L, ti, &len);
    if (c && c->closed)
        return push_closed(L);
    if (!hub_tag_valid(tag, len))
        return push_error(L, "invalid tag", "EINVAL");
    int n = s->api->set_tag(s->ud, id, tag, len);
    if (n > 0 && c) {
        memcpy(c->tag, tag, len);
        c->tag[len] = '\0';
        c->taglen = (unsigned char)len;
    }
    return hlua__push_result(L, n);
}

static int do_close(lua_State *L, hlua_conn *c, uint64_t id, int ri)
{
    hub_script *s = hlua__script(L);
    const char *reason = luaL_optstring(L, ri, NULL);
    if (c && c->closed)
        return push_closed(L);
    int n = s->api->close(s->ud, id, reason);
    if (n > 0 && c)
        c->closed = 1;
    return hlua__push_result(L, n);
}

static int client_send(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    return do_send(L, c, c->id, 2);
}

static int client_set_tag(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    return do_set_tag(L, c, c->id, 2);
}

static int client_close(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    return do_close(L, c, c->id, 2);
}

static int client_is_closed(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    lua_pushboolean(L, c->closed);
    return 1;
}

static int client_tostring(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    lua_pushfstring(L, "evhub.client id=%I addr=%s:%d tag=%s%s", (lua_Integer)c->id, c->addr,
                    (int)c->port, c->taglen ? c->tag : "-", c->closed ? " (closed)" : "");
    return 1;
}

/* __index: the fields, then the methods table (upvalue 1). */
static int client_index(lua_State *L)
{
    hlua_conn *c = check_client(L, 1);
    size_t len = 0;
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : "";
#define KEY_IS(lit) (len == sizeof(lit) - 1 && memcmp(k, lit, sizeof(lit) - 1) == 0)

    if (KEY_IS("id"))
        lua_pushinteger(L, (lua_Integer)c->id);
    else if (KEY_IS("tag") && c->taglen)
        lua_pushlstring(L, c->tag, c->taglen);
    else if (KEY_IS("tag"))
        lua_pushnil(L);
    else if (KEY_IS("addr"))
        lua_pushstring(L, c->addr);
    else if (KEY_IS("port"))
        lua_pushinteger(L, c->port);
    else if (KEY_IS("conidx"))
        lua_pushinteger(L, c->conidx);
    else {
        lua_pushvalue(L, 2);                /* [conn, k, k] */
        lua_rawget(L, lua_upvalueindex(1)); /* [conn, k, method] */
    }
    return 1;
#undef KEY_IS
}

static int client_newindex(lua_State *L)
{
    check_client(L, 1);
    return luaL_error(L, "evhub.client fields are read-only");
}

static const luaL_Reg client_methods[] = {
    {"send", client_send},
    {"set_tag", client_set_tag},
    {"close", client_close},
    {"is_closed", client_is_closed},
    {NULL, NULL},
};

static void open_client(lua_State *L)
{
    luaL_newmetatable(L, HLUA_CLIENT_MT);  /* [mt] */
    luaL_newlib(L, client_methods);        /* [mt, methods] */
    lua_pushcclosure(L, client_index, 1);  /* [mt, index] */
    lua_setfield(L, -2, "__index");        /* [mt] */
    lua_pushcfunction(L, client_newindex); /* [mt, newindex] */
    lua_setfield(L, -2, "__newindex");     /* [mt] */
    lua_pushcfunction(L, client_tostring); /* [mt, tostring] */
    lua_setfield(L, -2, "__tostring");     /* [mt] */
    lua_pushliteral(L, HLUA_CLIENT_MT);    /* [mt, name] */
    lua_setfield(L, -2, "__metatable");    /* [mt]: getmetatable() sees the name only */
    lua_pop(L, 1);                         /* [] */
}

/* ---- evapi module ---- */

/* The options table at i of evapi.relay / evapi.multicast: 1 for {scope = "local"} (this
 * hub's connections only), 0 for none or {scope = "cluster"} (the default). */
static int check_scope_local(lua_State *L, int i)
{
    if (lua_isnil(L, i))
        return 0;
    luaL_checktype(L, i, LUA_TTABLE);
    lua_getfield(L, i, "scope");
    const char *scope = luaL_optstring(L, -1, "cluster");
    int local = strcmp(scope, "local") == 0;
    if (!local && strcmp(scope, "cluster") != 0)
        return luaL_argerror(L, i, "scope must be \"local\" or \"cluster\"");
    lua_pop(L, 1);
    return local;
}

static int evapi_relay(lua_State *L)
{
    hub_script *s = hlua__script(L);
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    if (lua_gettop(L) >= 2 && check_scope_local(L, 2)) /* options are rare: test first */
        return hlua__push_result(L, s->api->relay_local(s->ud, data, len));
    return hlua__push_result(L, s->api->relay(s->ud, data, len));
}

/* evapi.multicast / evapi.unicast (data, tag): route is the hub_api function to call. */
static int route_by_tag(lua_State *L,
                        int (*route)(void *, const char *, size_t, const char *, size_t))
{
    hub_script *s = hlua__script(L);
    size_t len, taglen;
    const char *data = luaL_checklstring(L, 1, &len);
    const char *tag = luaL_checklstring(L, 2, &taglen);
    return hlua__push_result(L, route(s->ud, tag, taglen, data, len));
}

static int evapi_multicast(lua_State *L)
{
    const hub_api *api = hlua__script(L)->api;
    if (lua_gettop(L) >= 3 && check_scope_local(L, 3)) /* options are rare: test first */
        return route_by_tag(L, api->multicast_local);
    return route_by_tag(L, api->multicast);
}

static int evapi_unicast(lua_State *L) { return route_by_tag(L, hlua__script(L)->api->unicast); }

static int evapi_send(lua_State *L)
{
    uint64_t id;
    hlua_conn *c = check_target(L, 1, &id);
    return do_send(L, c, id, 2);
}

static int evapi_set_tag(lua_State *L)
{
    uint64_t id;
    hlua_conn *c = check_target(L, 1, &id);
    return do_set_tag(L, c, id, 2);
}

static int evapi_close(lua_State *L)
{
    uint64_t id;
    hlua_conn *c = check_target(L, 1, &id);
    return do_close(L, c, id, 2);
}

/* Push the key of a stat: its name, or name{label} (Prometheus' form) when it has a label,
 * so entries that differ only by label stay apart and unlabelled keys are as before. */
static void push_stat_key(lua_State *L, const hub_stat *st)
{
    size_t n = strnlen(st->label, sizeof(st->label));
    if (n == 0) {
        lua_pushstring(L, st->name); /* [.., name] */
        return;
    }
    lua_pushstring(L, st->name);      /* [.., name] */
    lua_pushliteral(L, "{");          /* [.., name, {] */
    lua_pushlstring(L, st->label, n); /* [.., name, {, label] */
    lua_pushliteral(L, "}");          /* [.., name, {, label, }] */
    lua_concat(L, 4);                 /* [.., key] */
}

/* evapi.stats(): the hub's counters as a table; per-worker ones in .workers[i] (1-based,
 * each with its .worker index), as the control socket's stats command reports them. An
 * entry with a label is keyed name{label}, e.g. t['events_delivered{socket="tcp:h:80"}']. */
static int evapi_stats(lua_State *L)
{
    hub_script *s = hlua__script(L);
    hub_stat buf[64];
    size_t n = s->api->stats(s->ud, buf, 64);
    hub_stat *st = buf;
    if (n > 64) {
        /* Many workers: ask again with room for all (lua_newuserdatauv raises on OOM). */
        st = lua_newuserdatauv(L, n * sizeof(*st), 0); /* [ud] */
        size_t m = s->api->stats(s->ud, st, n);
        if (m < n) /* the list may grow between the two calls (a module's new socket) */
            n = m;
    }
    lua_createtable(L, 0, (int)n); /* [.., t] */
    lua_newtable(L);               /* [.., t, workers] */
    for (size_t i = 0; i < n; i++) {
        if (st[i].worker < 0) {
            push_stat_key(L, &st[i]);                     /* [.., t, workers, k] */
            lua_pushinteger(L, (lua_Integer)st[i].value); /* [.., t, workers, k, v] */
            lua_rawset(L, -4);                            /* [.., t, workers] */
            continue;
        }
        if (lua_rawgeti(L, -1, st[i].worker + 1) != LUA_TTABLE) { /* [.., t, workers, w] */
            lua_pop(L, 1);
            lua_newtable(L);
            lua_pushinteger(L, st[i].worker);
            lua_setfield(L, -2, "worker");
            lua_pushvalue(L, -1);
            lua_rawseti(L, -3, st[i].worker + 1);
        }
        push_stat_key(L, &st[i]);                     /* [.., t, workers, w, k] */
        lua_pushinteger(L, (lua_Integer)st[i].value); /* [.., t, workers, w, k, v] */
        lua_rawset(L, -3);                            /* [.., t, workers, w] */
        lua_pop(L, 1);                                /* [.., t, workers] */
    }
    lua_setfield(L, -2, "workers"); /* [.., t] */
    return 1;
}

/* ---- the event interface ---- */

/* Argument i is an event name (hub_event_name_valid: the hub's rule, checked here too so
 * the error is at the script's line). */
static const char *check_event(lua_State *L, int i)
{
    size_t len;
    const char *ev = check_string(L, i, &len);
    if (strlen(ev) != len || !hub_event_name_valid(ev))
        luaL_argerror(L, i,
                      lua_pushfstring(L,
                                      "event name must be 1..%d letters, digits, '_', '.' or '-'",
                                      HUB_EVENT_MAX));
    return ev;
}

/* Argument i is a socket URI: a string without NUL bytes; the hub checks the rest. */
static const char *check_socket(lua_State *L, int i)
{
    size_t len;
    const char *uri = check_string(L, i, &len);
    luaL_argcheck(L, strlen(uri) == len, i, "socket URI contains a NUL byte");
    return uri;
}

/* The result of an event call: true, or nil, reason, code (reason: the hub's err, else the
 * code's text). With raise_einval, -EINVAL (a bad name or socket URI) raises instead, with
 * the reason, at the script's line that gave it. */
static int push_event_result(lua_State *L, const char *who, int rc, const char *err,
                             int raise_einval)
{
    if (rc >= 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (raise_einval && rc == -EINVAL)
        return luaL_error(L, "%s: %s", who, err[0] ? err : "invalid event name or socket URI");
    int n = hlua__push_result(L, rc); /* [nil, msg, code] */
    if (err[0]) {
        lua_pushstring(L, err); /* [nil, msg, code, err] */
        lua_replace(L, -3);     /* [nil, err, code] */
    }
    return n;
}

/* evapi.raise(event[, params[, report_fn]]): params a table (object or sequence) or nil;
 * report_fn gets each result the hub reports for this raise (see hlua_int.h). */
static int evapi_raise(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const char *event = check_event(L, 1);
    int t = lua_type(L, 2);
    luaL_argexpected(L, t == LUA_TNIL || t == LUA_TNONE || t == LUA_TTABLE, 2, "table or nil");
    int has_fn = !lua_isnoneornil(L, 3);
    if (has_fn)
        luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3);
    hlua__json_push_box(L, 2, "evapi.raise"); /* [ev, params, fn, box]: raises on bad params */

    uint64_t token = 0;
    if (has_fn) {
        /* Kept before the hub sees the work, so no result can come before its function. */
        token = s->api->token(s->ud);
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [.., box, done] */
        lua_pushvalue(L, 3);                                   /* [.., box, done, fn] */
        lua_rawseti(L, -2, (lua_Integer)token);                /* [.., box, done] */
    }
    /* Nothing raises from here on: params' reference passes from the box to the hub. */
    struct json_object *params = hlua__json_take(L, 4);
    char err[256] = "";
    int rc = s->api->raise(s->ud, event, params, token, err, sizeof(err));
    if (rc < 0 && has_fn) {
        lua_pushnil(L);                         /* [.., box, done, nil] */
        lua_rawseti(L, -2, (lua_Integer)token); /* [.., box, done]: a failed call never reports */
    }
    return push_event_result(L, "evapi.raise", rc, err, 0);
}

/* evapi.subscribe(event, socket[, expire_s]): expire_s 0 or absent never expires. */
static int evapi_subscribe(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const char *event = check_event(L, 1);
    const char *socket = check_socket(L, 2);
    lua_Integer expire = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, expire >= 0, 3, "expire_s must not be negative");
    char err[256] = "";
    int rc = s->api->subscribe(s->ud, event, socket, (long)expire, err, sizeof(err));
    return push_event_result(L, "evapi.subscribe", rc, err, 1);
}

/* evapi.unsubscribe(event, socket) */
static int evapi_unsubscribe(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const char *event = check_event(L, 1);
    const char *socket = check_socket(L, 2);
    char err[256] = "";
    int rc = s->api->unsubscribe(s->ud, event, socket, err, sizeof(err));
    return push_event_result(L, "evapi.unsubscribe", rc, err, 1);
}

/* evapi.on(event, fn|nil): keep fn in the registry; the old handler is released first. */
static int evapi_on(lua_State *L)
{
    static const char *const names[] = {"connect", "message", "close", "request", "cluster", NULL};
    hub_script *s = hlua__script(L);
    int ev = luaL_checkoption(L, 1, NULL, names) + 1;
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    luaL_unref(L, LUA_REGISTRYINDEX, s->handler[ev]);
    s->handler[ev] = LUA_NOREF;
    if (!lua_isnoneornil(L, 2)) {
        lua_pushvalue(L, 2); /* [ev, fn, fn] */
        s->handler[ev] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

static const luaL_Reg evapi_funcs[] = {
    {"relay", evapi_relay},
    {"multicast", evapi_multicast},
    {"unicast", evapi_unicast},
    {"send", evapi_send},
    {"set_tag", evapi_set_tag},
    {"close", evapi_close},
    {"on", evapi_on},
    {"stats", evapi_stats},
    {"raise", evapi_raise},
    {"subscribe", evapi_subscribe},
    {"unsubscribe", evapi_unsubscribe},
    {NULL, NULL},
};

/* ---- log module ---- */

/* One trailing newline is dropped: Kamailio scripts end their messages with "\n".
 * Upvalues: the level, and whether to prefix "lua: " (log.*) or not (KSR.*, as Kamailio). */
static int log_write(lua_State *L)
{
    int level = (int)lua_tointeger(L, lua_upvalueindex(1));
    int prefix = lua_toboolean(L, lua_upvalueindex(2));
    size_t len;
    const char *msg = luaL_checklstring(L, 1, &len);
    if (len > 0 && msg[len - 1] == '\n')
        len--;
    hub_log(level, "%s%.*s", prefix ? "lua: " : "", (int)len, msg);
    return 0;
}

/* Push a table of log functions: debug, info, notice, warn, err, crit and aliases. */
static void push_log_table(lua_State *L, int prefix)
{
    static const struct {
        const char *name;
        int level;
    } levels[] = {
        {"debug", HUB_LOG_DEBUG}, {"info", HUB_LOG_INFO},    {"notice", HUB_LOG_NOTICE},
        {"warn", HUB_LOG_WARN},   {"warning", HUB_LOG_WARN}, {"err", HUB_LOG_ERR},
        {"error", HUB_LOG_ERR},   {"crit", HUB_LOG_CRIT},
    };
    lua_createtable(L, 0, sizeof(levels) / sizeof(levels[0])); /* [log] */
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
        lua_pushinteger(L, levels[i].level); /* [log, level] */
        lua_pushboolean(L, prefix);          /* [log, level, prefix] */
        lua_pushcclosure(L, log_write, 2);   /* [log, fn] */
        lua_setfield(L, -2, levels[i].name); /* [log] */
    }
}

void hlua__open_evapi(lua_State *L, int worker)
{
    open_client(L);
    luaL_newlib(L, evapi_funcs);   /* [evapi] */
    lua_pushinteger(L, worker);    /* [evapi, worker] */
    lua_setfield(L, -2, "worker"); /* [evapi] */
    lua_setglobal(L, "evapi");     /* [] */
    hlua__open_async(L);
    push_log_table(L, 1);    /* [log] */
    lua_setglobal(L, "log"); /* [] */
}

/* ---- helpers for ksr.lua ---- */

static int helper_exit(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&hlua__exit_sentinel);
    return lua_error(L);
}

void hlua__push_ksr_helpers(lua_State *L)
{
    lua_createtable(L, 0, 2);          /* [h] */
    lua_pushcfunction(L, helper_exit); /* [h, exit] */
    lua_setfield(L, -2, "exit");       /* [h] */
    push_log_table(L, 0);              /* [h, log] */
    lua_setfield(L, -2, "log");        /* [h] */
    hlua__push_req_helpers(L);         /* [h, req] */
    lua_setfield(L, -2, "req");        /* [h] */
}
