/* The functions modules offer scripts (hub_script_fn): each becomes a Lua function at its
 * TABLE.NAME that converts its arguments to JSON, takes a token for a report function, calls
 * the module and answers in the dialect the entry asks for. */
#include <errno.h>
#include <json-c/json.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "hub/log.h"
#include "lua/hlua_int.h"

/* Upvalues: 1 the hub_script_fn_ref (light userdata), 2 inert (boolean). */
static int call_module(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const hub_script_fn_ref *ref = lua_touserdata(L, lua_upvalueindex(1));
    int inert = lua_toboolean(L, lua_upvalueindex(2));
    const hub_script_fn *fn = ref->fn;
    int kemi = (fn->flags & HUB_FN_KEMI) != 0;

    int n = lua_gettop(L);
    int has_fn = 0;
    if ((fn->flags & HUB_FN_REPORT) && n > 0 && lua_type(L, n) == LUA_TFUNCTION)
        has_fn = n--;

    /* The arguments as a sequence with json.null for nil, converted as json.encode does
     * (raises on what it refuses, naming the function); none is an empty array. */
    lua_createtable(L, n, 0); /* [args.., t] */
    for (int i = 1; i <= n; i++) {
        if (lua_isnil(L, i))
            hlua__push_json_null(L);
        else
            lua_pushvalue(L, i);
        lua_rawseti(L, -2, i);
    }
    int top = lua_gettop(L);
    lua_pushfstring(L, "%s.%s", fn->table, fn->name); /* [args.., t, who] */
    const char *who = lua_tostring(L, -1);
    hlua__json_push_box(L, top, who); /* [args.., t, who, box] */

    hub_call c = {.token = 0};
    if (has_fn) {
        /* Kept before the module sees the work, so no result can come before its function. */
        c.token = s->api->token(s->ud);
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [.., box, done] */
        lua_pushvalue(L, has_fn);
        lua_rawseti(L, -2, (lua_Integer)c.token);
        lua_pop(L, 1); /* [.., box] */
    }
    /* Nothing raises until the call is made: the box is emptied and the array freed here.
     * No arguments is an empty array (json.encode makes {} of an empty table). */
    c.args = hlua__json_take(L, -1);
    if (n == 0) {
        json_object_put(c.args);
        c.args = json_object_new_array();
    }
    c.worker = s->worker;
    int rc;
    if (!c.args) {
        rc = -ENOMEM;
    } else if (inert) {
        snprintf(c.err, sizeof(c.err), "%s: not available while the script is checked", who);
        rc = -EAGAIN;
    } else {
        rc = fn->call(ref->state, &c);
    }
    json_object_put(c.args);
    if (rc < 0 && c.token) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, (lua_Integer)c.token); /* a failed call never reports */
        lua_pop(L, 1);
    }
    if (kemi) {
        json_object_put(c.ret);
        if (rc < 0)
            hub_log(HUB_LOG_ERR, "%s: %s", who, c.err[0] ? c.err : strerror(-rc));
        lua_pushinteger(L, rc < 0 ? -1 : rc == 0 ? 1 : rc);
        return 1;
    }
    if (rc >= 0) {
        if (!c.ret) {
            lua_pushboolean(L, 1);
            return 1;
        }
        const char *why = hlua__json_push(L, c.ret);
        json_object_put(c.ret);
        if (why)
            return luaL_error(L, "%s: %s", who, why);
        return 1;
    }
    json_object_put(c.ret);
    int nret = hlua__push_result(L, rc); /* [nil, msg, code] */
    if (c.err[0]) {
        lua_pushstring(L, c.err);
        lua_replace(L, -3);
    }
    return nret;
}

/* Push the table at path ("kafka", "KSR.kafka"), made (as a plain table) where missing. Raw
 * accesses: ksr.lua's tables raise on a missing entry. */
static void push_table(lua_State *L, const char *path)
{
    lua_pushglobaltable(L);
    while (*path) {
        const char *dot = strchr(path, '.');
        size_t len = dot ? (size_t)(dot - path) : strlen(path);
        lua_pushlstring(L, path, len); /* [parent, key] */
        lua_pushvalue(L, -1);
        if (lua_rawget(L, -3) != LUA_TTABLE) { /* [parent, key, v] */
            lua_pop(L, 1);
            lua_newtable(L);
            lua_pushvalue(L, -2);
            lua_pushvalue(L, -2); /* [parent, key, t, key, t] */
            lua_rawset(L, -5);    /* [parent, key, t] */
        }
        lua_remove(L, -2); /* [parent, t] */
        lua_remove(L, -2); /* [t] */
        path += len + (dot != NULL);
    }
}

void hlua__open_module_fns(lua_State *L, const hub_script_conf *conf)
{
    for (size_t i = 0; i < conf->nfns; i++) {
        const hub_script_fn_ref *ref = &conf->fns[i];
        push_table(L, ref->fn->table);         /* [t] */
        lua_pushlightuserdata(L, (void *)ref); /* [t, ref] */
        lua_pushboolean(L, conf->fns_inert);   /* [t, ref, inert] */
        lua_pushcclosure(L, call_module, 2);   /* [t, fn] */
        lua_setfield(L, -2, ref->fn->name);    /* [t] */
        lua_pop(L, 1);
    }
}
