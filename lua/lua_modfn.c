/* The functions modules offer scripts (hub_script_fn): each becomes a Lua function at its
 * TABLE.NAME that hands its arguments over as they are (strings as pointer and length,
 * numbers as integers or doubles, tables converted to JSON), takes a token for a report
 * function, calls the module and answers in the dialect the entry asks for. */
#include <errno.h>
#include <json-c/json.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "hub/log.h"
#include "lua/hlua_int.h"

/* "TABLE.NAME" for messages: only made when something fails. */
static const char *who_of(lua_State *L, const hub_script_fn *fn)
{
    return lua_pushfstring(L, "%s.%s", fn->table, fn->name);
}

/* Argument i as a hub_arg; a table is converted (its name and box pushed: the box frees
 * the JSON if anything raises before the call, and a->i holds its index until then).
 * Raises on what json.encode refuses. */
static void take_arg(lua_State *L, const hub_script_fn *fn, int i, hub_arg *a)
{
    switch (lua_type(L, i)) {
    case LUA_TNIL:
        break;
    case LUA_TBOOLEAN:
        a->type = HUB_ARG_BOOL;
        a->i = lua_toboolean(L, i);
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, i)) {
            a->type = HUB_ARG_INT;
            a->i = (int64_t)lua_tointeger(L, i);
        } else {
            a->type = HUB_ARG_NUM;
            a->d = (double)lua_tonumber(L, i);
        }
        break;
    case LUA_TSTRING:
        a->type = HUB_ARG_STR;
        a->s = lua_tolstring(L, i, &a->len); /* stays on the stack for the call */
        break;
    case LUA_TTABLE:
        a->type = HUB_ARG_JSON;
        hlua__json_push_box(L, i, who_of(L, fn)); /* [.., who, box] */
        a->i = lua_gettop(L);
        break;
    case LUA_TLIGHTUSERDATA:
        if (hlua__is_json_null(L, i))
            break;
        /* fall through */
    default:
        luaL_error(L, "%s: cannot encode a %s", who_of(L, fn), luaL_typename(L, i));
    }
}

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
    if (n > HUB_ARGS_MAX)
        return luaL_error(L, "%s: more than %d arguments", who_of(L, fn), HUB_ARGS_MAX);
    luaL_checkstack(L, 2 * n + 4, "module function arguments");

    /* Nothing raises once the first table is taken out of its box (below). */
    hub_arg argv[HUB_ARGS_MAX];
    memset(argv, 0, sizeof(argv[0]) * (size_t)n);
    for (int i = 1; i <= n; i++)
        take_arg(L, fn, i, &argv[i - 1]); /* [args.., (fn), (who, box)..] */
    hub_call c = {.argv = argv, .argc = n, .token = 0};
    if (has_fn) {
        /* Kept before the module sees the work, so no result can come before its function.
         * Setting a new integer key may raise (memory): before the boxes are emptied. */
        c.token = s->api->token(s->ud);
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [.., done] */
        lua_pushvalue(L, has_fn);
        lua_rawseti(L, -2, (lua_Integer)c.token);
        lua_pop(L, 1); /* [..] */
    }
    for (int i = 0; i < n; i++) {
        if (argv[i].type == HUB_ARG_JSON) {
            argv[i].json = hlua__json_take(L, (int)argv[i].i);
            argv[i].i = 0;
        }
    }
    c.worker = s->worker;
    int rc;
    if (inert) {
        snprintf(c.err, sizeof(c.err), "%s.%s: not available while the script is checked",
                 fn->table, fn->name);
        rc = -EAGAIN;
    } else {
        rc = fn->call(ref->state, &c);
    }
    for (int i = 0; i < n; i++) {
        if (argv[i].type == HUB_ARG_JSON)
            json_object_put(argv[i].json);
    }
    if (rc < 0 && c.token) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, (lua_Integer)c.token); /* a failed call never reports */
        lua_pop(L, 1);
    }
    if (kemi) {
        json_object_put(c.ret);
        if (rc < 0)
            hub_log(HUB_LOG_ERR, "%s.%s: %s", fn->table, fn->name,
                    c.err[0] ? c.err : strerror(-rc));
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
            return luaL_error(L, "%s: %s", who_of(L, fn), why);
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
