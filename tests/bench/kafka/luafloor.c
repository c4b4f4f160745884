/* luafloor: the Lua work of kafka_bench.py's script alone, with no hub, no librdkafka and no
 * broker (tests/bench/kafka/kafka_bench.py prints it next to the two producers). It runs the
 * benchmark's own script in a bare Lua 5.4 state, drives it with the same commands ("reset",
 * then "pub B N0" batches), and serves every report the cheapest way any host could:
 *
 *   kafka.publish(id, msg, key, fn) keeps references to fn, msg and key (no copy, no check)
 *   and answers true; each report is a table made by a Lua constructor with constant keys
 *   ({id=, status=0, key=, msg=, topic=, partition=, offset=}, the strings the script passed)
 *   handed to fn, a batch of reports in one protected call, as the hub runs them.
 *
 * It prints "count cpu_us_per_msg cpu_us_per_msg_without_reports": the CPU time of the process
 * (one thread) per message. Whatever the hub and librdkafka do comes on top of this figure.
 * With "reports" after BATCH only the round with reports runs (the other figure is 0): under
 * callgrind, two COUNTs then give its instructions per message by difference.
 *
 *   luafloor SCRIPT_FILE COUNT SIZE BATCH [reports]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

static lua_Integer next_token, first_pending = 1;
static char sent[128];

/* kafka.publish(id, msg, key[, fn]): upvalue 1 is the pending table (fn, msg, key per token). */
static int l_publish(lua_State *L)
{
    if (lua_type(L, 4) == LUA_TFUNCTION) {
        lua_Integer t = 3 * ++next_token;
        lua_pushvalue(L, 4);
        lua_rawseti(L, lua_upvalueindex(1), t);
        lua_pushvalue(L, 2);
        lua_rawseti(L, lua_upvalueindex(1), t + 1);
        lua_pushvalue(L, 3);
        lua_rawseti(L, lua_upvalueindex(1), t + 2);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_on(lua_State *L)
{
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_setfield(L, LUA_REGISTRYINDEX, "floor_handler");
    return 0;
}

static int l_send(lua_State *L)
{
    snprintf(sent, sizeof(sent), "%s", luaL_checkstring(L, 2));
    return 0;
}

static int l_nop(lua_State *L)
{
    (void)L;
    return 0;
}

/* Every pending report, in order: [pending, make] are upvalues 1 and 2. */
static int l_drain(lua_State *L)
{
    for (; first_pending <= next_token; first_pending++) {
        lua_Integer t = 3 * first_pending;
        lua_pushvalue(L, lua_upvalueindex(2));      /* make */
        lua_rawgeti(L, lua_upvalueindex(1), t);     /* fn */
        lua_pushliteral(L, "b");                    /* id */
        lua_rawgeti(L, lua_upvalueindex(1), t + 2); /* key */
        lua_rawgeti(L, lua_upvalueindex(1), t + 1); /* msg */
        lua_pushliteral(L, "bench");                /* topic */
        lua_pushinteger(L, 0);                      /* partition */
        lua_pushinteger(L, first_pending);          /* offset */
        for (int i = 0; i < 3; i++) {
            lua_pushnil(L);
            lua_rawseti(L, lua_upvalueindex(1), t + i);
        }
        lua_call(L, 7, 0);
    }
    first_pending = 1; /* every token served: the next batch starts again at 1 */
    next_token = 0;
    return 0;
}

static void command(lua_State *L, const char *cmd)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "floor_handler");
    lua_getfield(L, LUA_REGISTRYINDEX, "floor_conn");
    lua_pushstring(L, cmd);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        fprintf(stderr, "luafloor: %s\n", lua_tostring(L, -1));
        exit(1);
    }
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One round of count messages in batches; the reports of a batch are served after it. */
static double round_cpu(lua_State *L, long count, long size, long batch, int reports)
{
    char cmd[96];
    snprintf(cmd, sizeof(cmd), "reset %ld %ld", reports ? count : 0, size);
    command(L, cmd);
    double c0 = cpu_s();
    for (long n0 = 1; n0 <= count; n0 += batch) {
        long b = count - n0 + 1 < batch ? count - n0 + 1 : batch;
        snprintf(cmd, sizeof(cmd), "%s %ld %ld", reports ? "pub" : "pubn", b, n0);
        command(L, cmd);
        if (reports) {
            lua_getfield(L, LUA_REGISTRYINDEX, "floor_drain");
            if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
                fprintf(stderr, "luafloor: %s\n", lua_tostring(L, -1));
                exit(1);
            }
        }
    }
    double c = cpu_s() - c0;
    char want[64];
    snprintf(want, sizeof(want), "done %ld 0", count);
    if (reports && strcmp(sent, want) != 0) {
        fprintf(stderr, "luafloor: the script said '%s', not '%s'\n", sent, want);
        exit(1);
    }
    return c / (double)count;
}

int main(int argc, char **argv)
{
    if (argc != 5 && !(argc == 6 && !strcmp(argv[5], "reports"))) {
        fprintf(stderr, "usage: luafloor SCRIPT_FILE COUNT SIZE BATCH [reports]\n");
        return 2;
    }
    long count = atol(argv[2]), size = atol(argv[3]), batch = atol(argv[4]);
    if (count < 1 || size < 0 || batch < 1) {
        fprintf(stderr, "luafloor: COUNT >= 1, SIZE >= 0, BATCH >= 1\n");
        return 2;
    }
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_newtable(L); /* pending */
    lua_newtable(L); /* kafka */
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, l_publish, 1);
    lua_setfield(L, -2, "publish");
    lua_setglobal(L, "kafka");
    if (luaL_loadstring(L, "local fn, id, key, msg, topic, part, off = ...\n"
                           "fn({id = id, status = 0, key = key, msg = msg, topic = topic,\n"
                           "    partition = part, offset = off})") != LUA_OK)
        return 1;
    lua_pushcclosure(L, l_drain, 2); /* [pending, make] */
    lua_setfield(L, LUA_REGISTRYINDEX, "floor_drain");
    lua_newtable(L); /* evapi */
    lua_pushcfunction(L, l_on);
    lua_setfield(L, -2, "on");
    lua_pushcfunction(L, l_nop);
    lua_setfield(L, -2, "multicast");
    lua_setglobal(L, "evapi");
    lua_newtable(L); /* the connection */
    lua_pushcfunction(L, l_send);
    lua_setfield(L, -2, "send");
    lua_pushcfunction(L, l_nop);
    lua_setfield(L, -2, "set_tag");
    lua_setfield(L, LUA_REGISTRYINDEX, "floor_conn");
    if (luaL_dofile(L, argv[1]) != LUA_OK) {
        fprintf(stderr, "luafloor: %s\n", lua_tostring(L, -1));
        return 1;
    }
    round_cpu(L, count < 10000 ? count : 10000, size, batch, 1); /* warm-up */
    double with = round_cpu(L, count, size, batch, 1);
    double without = argc == 6 ? 0 : round_cpu(L, count, size, batch, 0);
    printf("%ld %.4f %.4f\n", count, with * 1e6, without * 1e6);
    lua_close(L);
    return 0;
}
