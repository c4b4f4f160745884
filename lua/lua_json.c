/* The json module on json-c: json.encode(value) and json.decode(text), binary-safe, with
 * json.null for JSON null and a nesting limit both ways. */
#include "lua/hlua_int.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>
#include <lauxlib.h>

#define HLUA_JSON_MAX_DEPTH 64
#define HLUA_JSON_BOX       "evhub.json.box"

/* The address is json.null. */
static const char json_null = 0;

/* Owns json-c objects while Lua code that may raise (out of memory) runs; __gc frees them.
 * who names the Lua function in encoding errors ("json.encode", "evapi.raise"). */
typedef struct jbox {
    json_object *obj;
    json_tokener *tok;
    const char *who;
} jbox;

static void box_release(jbox *b)
{
    json_object_put(b->obj);
    b->obj = NULL;
    if (b->tok)
        json_tokener_free(b->tok);
    b->tok = NULL;
}

static int box_gc(lua_State *L)
{
    box_release(luaL_checkudata(L, 1, HLUA_JSON_BOX));
    return 0;
}

static jbox *push_box(lua_State *L)
{
    jbox *b = lua_newuserdatauv(L, sizeof(*b), 0);
    b->obj = NULL;
    b->tok = NULL;
    b->who = "json.encode";
    luaL_setmetatable(L, HLUA_JSON_BOX);
    return b;
}

/* ---- encode ---- */

/* Shortest "%.Ng" that reads back as d, always with a '.' or an exponent so it stays a float. */
static void format_double(double d, char *buf, size_t len)
{
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, d);
        if (strtod(buf, NULL) == d)
            break;
    }
    if (strpbrk(buf, ".eE") == NULL && strlen(buf) + 3 <= len)
        strcat(buf, ".0");
}

/* 1..n with no holes -> n; empty -> 0; anything else -> -1. */
static lua_Integer array_length(lua_State *L, int idx)
{
    lua_Integer max = 0, count = 0;
    lua_pushnil(L);            /* [.., nil] */
    while (lua_next(L, idx)) { /* [.., k, v] */
        lua_pop(L, 1);         /* [.., k] */
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
            lua_pop(L, 1);
            return -1;
        }
        lua_Integer k = lua_tointeger(L, -1);
        if (k > max)
            max = k;
        count++;
    }
    return max == count ? count : -1;
}

/* Attach o to parent (array when key is NULL and parent is an array), or make it the root.
 * Every new object is attached at once so an error later frees it with the root. */
static void attach(jbox *b, json_object *parent, const char *key, json_object *o)
{
    if (parent == NULL)
        b->obj = o;
    else if (key == NULL)
        json_object_array_add(parent, o);
    else
        json_object_object_add(parent, key, o);
}

static void encode_value(lua_State *L, jbox *b, int idx, int depth, json_object *parent,
                         const char *key);

static void encode_table(lua_State *L, jbox *b, int idx, int depth, json_object *parent,
                         const char *key)
{
    if (depth >= HLUA_JSON_MAX_DEPTH)
        luaL_error(L, "%s: nesting deeper than %d (a cycle?)", b->who, HLUA_JSON_MAX_DEPTH);
    luaL_checkstack(L, 4, b->who);
    lua_Integer n = array_length(L, idx);
    if (n > 0) {
        json_object *arr = json_object_new_array_ext((int)(n < 1024 ? n : 1024));
        if (arr == NULL)
            luaL_error(L, "%s: out of memory", b->who);
        attach(b, parent, key, arr);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i); /* [.., v] */
            encode_value(L, b, lua_gettop(L), depth + 1, arr, NULL);
            lua_pop(L, 1);
        }
        return;
    }
    json_object *obj = json_object_new_object();
    if (obj == NULL)
        luaL_error(L, "%s: out of memory", b->who);
    attach(b, parent, key, obj);
    lua_pushnil(L);            /* [.., nil] */
    while (lua_next(L, idx)) { /* [.., k, v] */
        char num[64];
        const char *k;
        switch (lua_type(L, -2)) {
        case LUA_TSTRING: {
            size_t klen;
            k = lua_tolstring(L, -2, &klen);
            if (strlen(k) != klen)
                luaL_error(L, "%s: an object key contains a NUL byte", b->who);
            break;
        }
        case LUA_TNUMBER: /* formatted by hand: lua_tostring would change the key for lua_next */
            if (lua_isinteger(L, -2))
                snprintf(num, sizeof(num), "%lld", (long long)lua_tointeger(L, -2));
            else
                format_double(lua_tonumber(L, -2), num, sizeof(num));
            k = num;
            break;
        default:
            luaL_error(L, "%s: table key must be a string or a number, not a %s", b->who,
                       luaL_typename(L, -2));
            return;
        }
        /* 1 and "1" would both become "1": refuse rather than drop one silently. */
        if (json_object_object_get_ex(obj, k, NULL))
            luaL_error(L, "%s: duplicate object key \"%s\"", b->who, k);
        encode_value(L, b, lua_gettop(L), depth + 1, obj, k);
        lua_pop(L, 1); /* [.., k] */
    }
}

static void encode_value(lua_State *L, jbox *b, int idx, int depth, json_object *parent,
                         const char *key)
{
    json_object *o = NULL;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        break;
    case LUA_TBOOLEAN:
        o = json_object_new_boolean(lua_toboolean(L, idx));
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            o = json_object_new_int64(lua_tointeger(L, idx));
        } else {
            double d = lua_tonumber(L, idx);
            char buf[64];
            if (!isfinite(d))
                luaL_error(L, "%s: cannot encode NaN or infinity", b->who);
            format_double(d, buf, sizeof(buf));
            o = json_object_new_double_s(d, buf);
        }
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (len > INT32_MAX)
            luaL_error(L, "%s: string too long", b->who);
        o = json_object_new_string_len(s, (int)len);
        break;
    }
    case LUA_TTABLE:
        encode_table(L, b, idx, depth, parent, key);
        return;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == &json_null)
            break;
        /* fall through */
    default:
        luaL_error(L, "%s: cannot encode a %s", b->who, luaL_typename(L, idx));
        return;
    }
    if (o == NULL && lua_type(L, idx) != LUA_TNIL && lua_type(L, idx) != LUA_TLIGHTUSERDATA)
        luaL_error(L, "%s: out of memory", b->who);
    attach(b, parent, key, o);
}

static int json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    jbox *b = push_box(L); /* [v, box] */
    encode_value(L, b, 1, 0, NULL, NULL);
    size_t len;
    const char *out = json_object_to_json_string_length(
        b->obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    if (out == NULL)
        return luaL_error(L, "%s: out of memory", b->who);
    lua_pushlstring(L, out, len); /* [v, box, json] */
    box_release(b);
    return 1;
}

void hlua__json_push_box(lua_State *L, int idx, const char *who)
{
    idx = lua_absindex(L, idx);
    jbox *b = push_box(L); /* [.., box] */
    b->who = who;
    encode_value(L, b, idx, 0, NULL, NULL);
}

struct json_object *hlua__json_take(lua_State *L, int idx)
{
    jbox *b = lua_touserdata(L, idx);
    json_object *o = b->obj;
    b->obj = NULL; /* the reference is the caller's now */
    return o;
}

/* ---- decode ---- */

/* Push o as a Lua value. NULL, or a reason (with nothing pushed) for a number that has no
 * exact Lua value (json-c clamps integers out of range and accepts inf/nan as doubles) or
 * nesting past the limit (the tokener stops it in text, but o may be built in C). */
static const char *push_json(lua_State *L, json_object *o, int depth)
{
    const char *err = NULL;
    if (depth >= HLUA_JSON_MAX_DEPTH &&
        (json_object_is_type(o, json_type_array) || json_object_is_type(o, json_type_object)))
        return "json.decode: nesting too deep";
    luaL_checkstack(L, 3, "json.decode");
    switch (json_object_get_type(o)) {
    case json_type_null:
        lua_pushlightuserdata(L, (void *)&json_null);
        break;
    case json_type_boolean:
        lua_pushboolean(L, json_object_get_boolean(o));
        break;
    case json_type_double: {
        double d = json_object_get_double(o);
        if (isnan(d) || isinf(d))
            return "json.decode: number out of range";
        lua_pushnumber(L, d);
        break;
    }
    case json_type_int: {
        int64_t i = json_object_get_int64(o);
        uint64_t u = i == INT64_MAX ? json_object_get_uint64(o) : 0;
        if (i == INT64_MIN || u == UINT64_MAX)
            return "json.decode: integer out of range";
        if (u > (uint64_t)INT64_MAX)
            lua_pushnumber(L, (lua_Number)u);
        else
            lua_pushinteger(L, i);
        break;
    }
    case json_type_string:
        lua_pushlstring(L, json_object_get_string(o), (size_t)json_object_get_string_len(o));
        break;
    case json_type_array: {
        size_t n = json_object_array_length(o);
        lua_createtable(L, n > INT32_MAX ? INT32_MAX : (int)n, 0); /* [.., arr] */
        for (size_t i = 0; i < n && !err; i++) {
            err = push_json(L, json_object_array_get_idx(o, i), depth + 1); /* [.., arr, v] */
            if (!err)
                lua_rawseti(L, -2, (lua_Integer)i + 1); /* [.., arr] */
        }
        break;
    }
    case json_type_object: {
        int n = json_object_object_length(o);
        lua_createtable(L, 0, n); /* [.., obj] */
        struct json_object_iterator it = json_object_iter_begin(o);
        struct json_object_iterator end = json_object_iter_end(o);
        while (!err && !json_object_iter_equal(&it, &end)) {
            lua_pushstring(L, json_object_iter_peek_name(&it));              /* [.., obj, k] */
            err = push_json(L, json_object_iter_peek_value(&it), depth + 1); /* [.., obj, k, v] */
            if (err)
                lua_pop(L, 1); /* [.., obj] */
            else
                lua_rawset(L, -3); /* [.., obj] */
            json_object_iter_next(&it);
        }
        break;
    }
    }
    if (err)
        lua_pop(L, 1); /* the unfinished container */
    return err;
}

const char *hlua__json_push(lua_State *L, struct json_object *o) { return push_json(L, o, 0); }

void hlua__push_json_null(lua_State *L) { lua_pushlightuserdata(L, (void *)&json_null); }

int hlua__is_json_null(lua_State *L, int idx)
{
    return lua_islightuserdata(L, idx) && lua_touserdata(L, idx) == &json_null;
}

/* json.decode's failure: the box's objects freed, nil and the message on top of the stack. */
static int decode_fail(lua_State *L, jbox *b)
{
    box_release(b);
    lua_pushnil(L);    /* [.., msg, nil] */
    lua_insert(L, -2); /* [.., nil, msg] */
    return 2;
}

static int json_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    if (len >= INT32_MAX)
        return luaL_error(L, "json.decode: text too long");
    jbox *b = push_box(L); /* [s, box] */
    b->tok = json_tokener_new_ex(HLUA_JSON_MAX_DEPTH);
    if (b->tok == NULL)
        return luaL_error(L, "json.decode: out of memory");
    /* Strict: no comments, single quotes, leading zeros, NaN or Infinity literals. */
    json_tokener_set_flags(b->tok, JSON_TOKENER_STRICT);
    /* Lua strings end with a NUL; passing it lets json-c finish a trailing number. */
    b->obj = json_tokener_parse_ex(b->tok, s, (int)len + 1);
    enum json_tokener_error e = json_tokener_get_error(b->tok);
    size_t end = json_tokener_get_parse_end(b->tok);
    if (e != json_tokener_success) {
        if (e == json_tokener_continue || (end >= len && e == json_tokener_error_parse_eof))
            lua_pushliteral(L, "json.decode: unexpected end of input");
        else
            lua_pushfstring(L, "json.decode: %s at offset %d", json_tokener_error_desc(e),
                            (int)end);
        return decode_fail(L, b);
    }
    for (size_t i = end; i < len; i++) {
        if (strchr(" \t\r\n", s[i]) == NULL || s[i] == '\0') {
            lua_pushfstring(L, "json.decode: unexpected data at offset %d", (int)i);
            return decode_fail(L, b);
        }
    }
    const char *err = push_json(L, b->obj, 0); /* [s, box, v] */
    if (err) {
        lua_pushstring(L, err);
        return decode_fail(L, b);
    }
    box_release(b);
    return 1;
}

void hlua__open_json(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"encode", json_encode},
        {"decode", json_decode},
        {NULL, NULL},
    };
    luaL_newmetatable(L, HLUA_JSON_BOX); /* [mt] */
    lua_pushcfunction(L, box_gc);        /* [mt, gc] */
    lua_setfield(L, -2, "__gc");         /* [mt] */
    lua_pop(L, 1);                       /* [] */
    luaL_newlib(L, funcs);               /* [json] */
    lua_pushlightuserdata(L, (void *)&json_null);
    lua_setfield(L, -2, "null"); /* [json] */
    lua_setglobal(L, "json");    /* [] */
}
