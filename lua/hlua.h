/* The Lua scripting engine behind the hub_script seam: native evapi API and the KSR layer. */
#ifndef HLUA_H
#define HLUA_H

#include "hub/script.h"

/* The engine's table of operations; main.c hands it to the hub. Each hub_script owns one
 * lua_State and must only be used from the thread that loaded it. */
extern const hub_script_ops hlua_script_ops;

/* ksr.lua, embedded at build time by lua/embed.cmake. */
extern const char hlua_ksr_source[];
extern const size_t hlua_ksr_source_len;

#endif
