/* The Lua host: one lua_State per hub_script, a counting allocator with a memory limit, an
 * instruction budget per callback, and one protected call with a traceback for every entry
 * into Lua. Connections live in a registry table (id -> conn userdata) that a reload copies. */
#include "lua/hlua.h"
#include "lua/hlua_int.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>
#include <lauxlib.h>
#include <lualib.h>

#include "hub/alloc.h"
#include "hub/log.h"

/* The address is the value: KSR.x.exit() raises it as a light userdata. */
const char hlua__exit_sentinel = 0;

/* The count hook fires at most every HLUA_HOOK_CHUNK instructions, so budgets above INT_MAX
 * still work; the remainder is tracked in budget_left. */
#define HLUA_HOOK_CHUNK (1 << 30)
/* While a load may be cancelled, the hook also fires every HLUA_CANCEL_CHUNK instructions (a
 * few milliseconds) to look at the flag. */
#define HLUA_CANCEL_CHUNK (1 << 20)
/* Instructions a second assumed when turning the budget into a deadline (see arm_budget). */
#define HLUA_MIN_IPS 20e6
/* The watchdog's period: a callback still running after one to two periods gets its hook. */
#define HLUA_WATCH_MS 10

/* The size class of a small block (0: 1..16 bytes, ...), or -1 for a large one. */
static int cache_class(size_t n)
{
    return n == 0 || n > HLUA_CACHE_CLASSES * 16 ? -1 : (int)((n - 1) / 16);
}

/* The full size of a block of class c: any size of the class fits. */
static size_t class_bytes(int c) { return (size_t)(c + 1) * 16; }

/* A block of class c, from the cache first. */
static void *cache_get(hub_script *s, int c)
{
    void *p = s->cache[c];
    if (p) {
        s->cache[c] = *(void **)p;
        s->ncache[c]--;
        s->cache_bytes -= class_bytes(c);
        return p;
    }
    return hub_malloc(class_bytes(c));
}

static void cache_put(hub_script *s, int c, void *p)
{
    if (s->cache_bytes + class_bytes(c) > HLUA_CACHE_BYTES) {
        hub_free(p);
        return;
    }
    *(void **)p = s->cache[c];
    s->cache[c] = p;
    s->ncache[c]++;
    s->cache_bytes += class_bytes(c);
}

static void cache_free(hub_script *s)
{
    for (int c = 0; c < HLUA_CACHE_CLASSES; c++) {
        for (unsigned bound = s->ncache[c]; s->cache[c] && bound > 0; bound--) {
            void *p = s->cache[c];
            s->cache[c] = *(void **)p;
            hub_free(p);
        }
        s->cache[c] = NULL;
        s->ncache[c] = 0;
    }
    s->cache_bytes = 0;
}

/* Lua's allocator: counts bytes for max_memory, small blocks through the cache (a small
 * block is always allocated at its class's full size, so it may be kept and reused). */
static void *counting_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    hub_script *s = ud;
    size_t old = ptr ? osize : 0; /* with ptr NULL, osize is a type tag */
    int oc = ptr ? cache_class(old) : -1, nc = cache_class(nsize);

    if (nsize == 0) {
        if (oc >= 0)
            cache_put(s, oc, ptr);
        else
            hub_free(ptr);
        s->mem_used -= old;
        return NULL;
    }
    /* Shrinking never fails, growing fails past max_memory (Lua then collects and retries). */
    if (s->max_memory && nsize > old && s->mem_used - old + nsize > s->max_memory)
        return NULL;
    void *p;
    if (ptr && oc >= 0 && oc == nc) {
        p = ptr; /* the same class: the block has room */
    } else if (nc < 0 && oc < 0) {
        p = hub_realloc(ptr, nsize);
    } else {
        p = nc >= 0 ? cache_get(s, nc) : hub_malloc(nsize);
        if (!p && ptr && nsize <= old)
            p = ptr; /* a shrink must not fail: the larger block serves (it has room) */
        else if (p && ptr) {
            memcpy(p, ptr, old < nsize ? old : nsize);
            if (oc >= 0)
                cache_put(s, oc, ptr);
            else
                hub_free(ptr);
        }
    }
    if (p == NULL)
        return NULL;
    s->mem_used = s->mem_used - old + nsize;
    return p;
}

static int panic_cb(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);
    hub_log(HUB_LOG_CRIT, "lua: unprotected error: %s", msg ? msg : "?");
    return 0; /* Lua aborts */
}

/* Warnings (errors in __gc, warn()) are assembled from pieces and logged whole. */
static void warn_cb(void *ud, const char *msg, int tocont)
{
    hub_script *s = ud;
    size_t n = strlen(msg);

    if (s->warnlen == 0 && !tocont && msg[0] == '@')
        return; /* control message ("@on", "@off"): warnings are always on */
    if (n > sizeof(s->warn) - 1 - s->warnlen)
        n = sizeof(s->warn) - 1 - s->warnlen;
    memcpy(s->warn + s->warnlen, msg, n);
    s->warnlen += n;
    if (!tocont) {
        hub_log(HUB_LOG_WARN, "lua: warning: %.*s", (int)s->warnlen, s->warn);
        s->warnlen = 0;
    }
}

static void budget_hook(lua_State *L, lua_Debug *ar);

static long hook_chunk(const hub_script *s)
{
    return s->cancel ? HLUA_CANCEL_CHUNK : HLUA_HOOK_CHUNK;
}

/* Set L's count hook for what the current callback has left of its budget, at most a chunk;
 * without a budget, only while a load may be cancelled, to look at the flag; else remove it. */
static void set_hook(lua_State *L, const hub_script *s)
{
    long chunk = hook_chunk(s);

    if (s->max_instructions > 0)
        lua_sethook(L, budget_hook, LUA_MASKCOUNT,
                    (int)(s->budget_left > chunk ? chunk : s->budget_left));
    else if (s->cancel)
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, (int)chunk);
    else
        lua_sethook(L, NULL, 0, 0);
}

/* ---- the watchdog: the budget's hook, armed only in callbacks that run long ----
 *
 * Lua 5.4 runs every instruction through its hook dispatcher while any hook is set (a count
 * hook included), which made the hook most of a short callback's cost. So a loaded state's
 * callbacks start with no hook: one watchdog thread per process looks at every state every
 * HLUA_WATCH_MS, and a state still in the same callback as at its previous look gets a signal
 * on the thread running it; the handler sets the count hook there, as lua.c's SIGINT handler
 * does (lua_sethook may be called from a signal handler). From then on the callback's budget
 * counts as before. A callback is thus stopped after max_instructions counted from at most
 * 2 * HLUA_WATCH_MS into it; loading a script (its top level) counts from the start. */

static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t watch_mu = PTHREAD_MUTEX_INITIALIZER;
static hub_script *watch_list;     /* under watch_mu */
static int watch_sig;              /* 0: the watchdog could not start (hooks stay eager) */
static __thread hub_script *tl_cb; /* the state whose callback this thread runs */
static __thread int tl_unblocked;  /* this thread lets watch_sig through */

static void watch_signal_cb(int sig)
{
    hub_script *s = tl_cb;
    int saved = errno;
    (void)sig;
    if (s && !s->armed) {
        unsigned seq = atomic_load_explicit(&s->cb_seq, memory_order_relaxed);
        if ((seq & 1) && seq == atomic_load_explicit(&s->arm_req, memory_order_relaxed)) {
            s->armed = 1;
            lua_State *run = s->running ? s->running : s->L;
            set_hook(run, s);
            if (run != s->L)
                set_hook(s->L, s);
        }
    }
    errno = saved;
}

/* The watchdog thread runs while at least one state with a budget exists, and is joined
 * when the last one goes (so nothing of it outlives the states, and an idle process with no
 * script has no thread waking every HLUA_WATCH_MS). */
static pthread_cond_t watch_cv = PTHREAD_COND_INITIALIZER;
static pthread_t watch_thread;
static int watch_running, watch_stop; /* under watch_mu */

static void *watch_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&watch_mu);
    while (!watch_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += HLUA_WATCH_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&watch_cv, &watch_mu, &ts);
        if (watch_stop)
            break;
        for (hub_script *s = watch_list; s; s = s->watch_next) {
            unsigned seq = atomic_load_explicit(&s->cb_seq, memory_order_relaxed);
            if ((seq & 1) && seq == s->watch_seen &&
                atomic_load_explicit(&s->arm_req, memory_order_relaxed) != seq) {
                atomic_store_explicit(&s->arm_req, seq, memory_order_relaxed);
                pthread_kill(s->cb_thread, watch_sig);
            }
            s->watch_seen = seq;
        }
    }
    pthread_mutex_unlock(&watch_mu);
    return NULL;
}

/* Once per process: the signal the watchdog sends (0 when it cannot be installed). */
static void watch_init(void)
{
    struct sigaction sa;
    int sig = SIGRTMIN + 4;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = watch_signal_cb;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) == 0)
        watch_sig = sig;
}

/* Under watch_mu: the thread runs, or 0 when it cannot be started. */
static int watch_ensure_running(void)
{
    if (watch_running)
        return 1;
    sigset_t all, old;
    /* The watchdog itself never takes a signal meant for the hub's threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    watch_stop = 0;
    int rc = pthread_create(&watch_thread, NULL, watch_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        hub_log(HUB_LOG_WARN, "lua: no budget watchdog (%s): budgets count every instruction",
                strerror(rc));
        return 0;
    }
    watch_running = 1;
    return 1;
}

/* A loaded state with a budget: its callbacks arm the hook lazily from now on (eagerly when
 * there can be no watchdog). */
static void watch_add(hub_script *s)
{
    pthread_once(&watch_once, watch_init);
    if (!watch_sig || s->max_instructions <= 0)
        return;
    pthread_mutex_lock(&watch_mu);
    if (watch_ensure_running()) {
        s->watch_next = watch_list;
        watch_list = s;
        s->lazy = 1;
    }
    pthread_mutex_unlock(&watch_mu);
}

static void watch_del(hub_script *s)
{
    if (!s->lazy)
        return;
    pthread_mutex_lock(&watch_mu);
    for (hub_script **pp = &watch_list; *pp; pp = &(*pp)->watch_next) {
        if (*pp == s) {
            *pp = s->watch_next;
            break;
        }
    }
    int join = watch_running && !watch_list;
    if (join) {
        watch_stop = 1;
        watch_running = 0;
        pthread_cond_signal(&watch_cv);
    }
    pthread_mutex_unlock(&watch_mu);
    if (join)
        pthread_join(watch_thread, NULL);
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Fire on every instruction from now on, in this thread and the main one (new coroutines
 * inherit its hook), so neither pcall() nor a fresh coroutine can swallow the error the
 * caller raises next. */
static void hook_every_instruction(lua_State *L, const hub_script *s)
{
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
    if (L != s->L)
        lua_sethook(s->L, budget_hook, LUA_MASKCOUNT, 1);
}

/* Raise if the load was cancelled, or if the callback is past its budget: spent (the count
 * ran out, seen by the hook) or past its deadline (see arm_budget). The budget error names
 * the running line: from the hook, the script's; from a C function, none. */
static void check_limits(lua_State *L, hub_script *s, int spent)
{
    if (s->cancel && atomic_load(s->cancel)) {
        hook_every_instruction(L, s);
        luaL_error(L, "loading cancelled: the hub is stopping");
    }
    if (s->max_instructions > 0 && (spent || now_mono() > s->deadline)) {
        s->budget_hit = 1;
        hook_every_instruction(L, s);
        luaL_where(L, 0);
        lua_pushfstring(L, "instruction budget exceeded (%I instructions)",
                        (lua_Integer)s->max_instructions);
        lua_concat(L, 2);
        lua_error(L);
    }
}

static void budget_hook(lua_State *L, lua_Debug *ar)
{
    hub_script *s = hlua__script(L);
    (void)ar;

    if (s->max_instructions > 0) {
        check_limits(L, s, s->budget_left <= hook_chunk(s));
        s->budget_left -= hook_chunk(s);
    } else {
        check_limits(L, s, 0);
    }
    set_hook(L, s);
}

/* Reset the budget before each entry into Lua. Each coroutine counts its instructions on its
 * own and a count it does not finish is never charged, so a script spreading its work over
 * many coroutines is stopped by a deadline instead, checked at every resume: the time the
 * budget takes at HLUA_MIN_IPS instructions a second, far slower than any machine runs. */
static void arm_budget(hub_script *s)
{
    if (s->max_instructions > 0) {
        s->budget_left = s->max_instructions;
        s->deadline = now_mono() + (double)s->max_instructions / HLUA_MIN_IPS + 0.05;
    }
    if (s->lazy) {
        /* No hook until the watchdog arms it (a budget error left one on every instruction);
         * a callback under way (a coroutine resumed inside it) gets signalled again. */
        s->armed = 0;
        atomic_store_explicit(&s->arm_req, 0, memory_order_relaxed);
        if (lua_gethook(s->L))
            lua_sethook(s->L, NULL, 0, 0);
        return;
    }
    set_hook(s->L, s);
}

static int is_exit(lua_State *L, int idx)
{
    return lua_islightuserdata(L, idx) && lua_touserdata(L, idx) == &hlua__exit_sentinel;
}

/* Message handler: the error text with a traceback; KSR.x.exit()'s sentinel passes through. */
static int traceback_cb(lua_State *L)
{
    if (is_exit(L, 1))
        return 1;
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int hlua__traceback(lua_State *L) { return traceback_cb(L); }
/* A callback begins or ends on this thread: the watchdog sees it (cb_seq odd while it runs). */
static void cb_begin(hub_script *s)
{
    tl_cb = s;
    s->running = NULL;
    if (!s->lazy)
        return;
    if (!tl_unblocked) {
        /* Threads the hub starts block every signal; the watchdog's must get through. */
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, watch_sig);
        pthread_sigmask(SIG_UNBLOCK, &one, NULL);
        tl_unblocked = 1;
    }
    s->cb_thread = pthread_self();
    atomic_store_explicit(&s->cb_seq, s->cb_seq + 1, memory_order_relaxed); /* odd */
}

static void cb_end(hub_script *s)
{
    if (s->lazy)
        atomic_store_explicit(&s->cb_seq, s->cb_seq + 1, memory_order_relaxed); /* even */
    s->running = NULL;
    tl_cb = NULL;
}

/* co is about to run: a fresh count when the hook is on, else no hook at all (the
 * watchdog's signal hooks whatever runs then: s->running). */
static void hook_coroutine(hub_script *s, lua_State *co)
{
    if (!s->lazy || s->armed) {
        set_hook(co, s);
    } else if (lua_gethook(co)) {
        lua_sethook(co, NULL, 0, 0);
        if (s->armed) /* the signal came while the hook was being cleared */
            set_hook(co, s);
    }
}

int hlua__enter(hub_script *s, lua_State *co, lua_State **prev)
{
    int began = tl_cb != s;
    arm_budget(s);
    if (began)
        cb_begin(s);
    *prev = s->running;
    s->running = co; /* before the hook: the signal may come in between */
    hook_coroutine(s, co);
    return began;
}

void hlua__leave(hub_script *s, int began, lua_State *prev)
{
    if (began) {
        cb_end(s);
        return;
    }
    s->running = prev;
    if (s->lazy && s->armed)
        set_hook(prev ? prev : s->L, s); /* armed while co ran: the resumer counts too */
}
int hlua__is_exit(lua_State *L, int idx) { return is_exit(L, idx); }

static void kemi_reset(hub_script *s)
{
    lua_State *L = s->L;
    if (s->reset_ref == LUA_NOREF)
        return;
    arm_budget(s); /* after a budget error the hook fires on every instruction */
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->reset_ref); /* [reset] */
    if (lua_pcall(L, 0, 0, 0) != LUA_OK)
        lua_pop(L, 1);
}

/* The one way into Lua. Stack: [traceback_cb, fn, args...]; all of it is popped. The budget
 * is armed, a failure is logged with its traceback and the hub keeps going. */
static int hlua_pcall(hub_script *s, int nargs, const char *what)
{
    lua_State *L = s->L;
    int base = lua_gettop(L) - nargs - 1;

    arm_budget(s);
    s->budget_hit = 0;
    cb_begin(s);
    int rc = lua_pcall(L, nargs, 0, base);
    cb_end(s);
    if (rc != LUA_OK) {
        if (!is_exit(L, -1)) {
            const char *msg = lua_tostring(L, -1);
            hub_log(HUB_LOG_ERR, "lua: %s: %s", what, msg ? msg : "(error object is not a string)");
            s->api->count(s->ud, HUB_SCRIPT_ERROR);
            if (s->budget_hit)
                s->api->count(s->ud, HUB_SCRIPT_BUDGET);
            else if (rc == LUA_ERRMEM)
                s->api->count(s->ud, HUB_SCRIPT_MEMORY);
        }
        lua_pop(L, 1); /* [traceback_cb] */
        kemi_reset(s);
    }
    lua_pop(L, 1); /* [] */
    return rc == LUA_OK ? 0 : -1;
}

/* Call ev's handler, or the KEMI dispatcher, with the conn at index 1 and, for a message,
 * the frame. Runs inside the protected call, so allocations may raise safely. */
static int call_handler(lua_State *L, hub_script *s, int ev)
{
    int nargs = 1;
    if (s->dispatch_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->dispatch_ref); /* [conn, dispatch] */
        lua_pushinteger(L, ev);                             /* [conn, dispatch, ev] */
        nargs = 2;
    } else if (s->handler[ev] != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler[ev]); /* [conn, fn] */
    } else {
        return 0;
    }
    lua_pushvalue(L, 1); /* [conn, fn, (ev,) conn] */
    if (ev == HLUA_EV_MESSAGE) {
        lua_pushlstring(L, s->arg_data, s->arg_len); /* [conn, fn, (ev,) conn, msg] */
        nargs++;
    }
    lua_call(L, nargs, 0);
    return 0;
}

/* Trampolines for the protected call; each sees the conn at index 1 but connect's, which
 * registers it first. */
static int connect_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const hub_conn_info *ci = s->arg_ci;

    lua_rawgeti(L, LUA_REGISTRYINDEX, s->conns_ref); /* [conns] */
    hlua__push_conn(L, ci);                          /* [conns, conn] */
    lua_pushvalue(L, -1);                            /* [conns, conn, conn] */
    lua_rawseti(L, -3, (lua_Integer)ci->id);         /* [conns, conn] */
    lua_remove(L, 1);                                /* [conn] */
    return call_handler(L, s, HLUA_EV_CONNECT);
}

static int message_tramp(lua_State *L) { return call_handler(L, hlua__script(L), HLUA_EV_MESSAGE); }

static int close_tramp(lua_State *L) { return call_handler(L, hlua__script(L), HLUA_EV_CLOSE); }

/* Push the conn for id (no allocation). Returns it, or NULL with nothing pushed. */
static hlua_conn *find_conn(hub_script *s, uint64_t id)
{
    lua_State *L = s->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->conns_ref); /* [conns] */
    if (lua_rawgeti(L, -1, (lua_Integer)id) != LUA_TUSERDATA) {
        lua_pop(L, 2); /* [] */
        return NULL;
    }
    lua_remove(L, -2); /* [conn] */
    return lua_touserdata(L, -1);
}

static void hlua_on_connect(hub_script *s, const hub_conn_info *ci)
{
    lua_State *L = s->L;
    s->arg_ci = ci;
    lua_pushcfunction(L, traceback_cb);  /* [tb] */
    lua_pushcfunction(L, connect_tramp); /* [tb, tramp] */
    hlua_pcall(s, 0, "connect");
    s->arg_ci = NULL;
}

static void hlua_on_message(hub_script *s, uint64_t id, const char *data, size_t len)
{
    lua_State *L = s->L;

    if (s->requests && len > 12 && data[0] == '{' && hlua__take_answer(s, data, len))
        return;
    if (s->dispatch_ref == LUA_NOREF && s->handler[HLUA_EV_MESSAGE] == LUA_NOREF)
        return;
    lua_pushcfunction(L, traceback_cb);  /* [tb] */
    lua_pushcfunction(L, message_tramp); /* [tb, tramp] */
    hlua_conn *c = find_conn(s, id);     /* [tb, tramp, conn] */
    if (c == NULL || c->closed) {
        /* With workers, frames already queued still arrive after the script closed the
         * connection; as with workers = 0, the script sees none of them. */
        lua_pop(L, c ? 3 : 2);
        hub_log(HUB_LOG_DEBUG, "lua: message for %s connection id=%llu ignored",
                c ? "a closed" : "an unknown", (unsigned long long)id);
        return;
    }
    s->arg_data = data;
    s->arg_len = len;
    hlua_pcall(s, 1, "message");
    s->arg_data = NULL;
}

static void hlua_on_close(hub_script *s, uint64_t id)
{
    lua_State *L = s->L;

    lua_pushcfunction(L, traceback_cb); /* [tb] */
    lua_pushcfunction(L, close_tramp);  /* [tb, tramp] */
    hlua_conn *c = find_conn(s, id);    /* [tb, tramp, conn] */
    if (c == NULL) {
        lua_pop(L, 2);
        hub_log(HUB_LOG_DEBUG, "lua: close of unknown connection id=%llu ignored",
                (unsigned long long)id);
        return;
    }
    hlua_pcall(s, 1, "close"); /* c stays alive: the conns table still holds it */
    /* Forget it whatever the handler did; setting an existing key to nil does not allocate. */
    c->closed = 1;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->conns_ref); /* [conns] */
    lua_pushnil(L);                                  /* [conns, nil] */
    lua_rawseti(L, -2, (lua_Integer)id);             /* [conns] */
    lua_pop(L, 1);                                   /* [] */
}

/* What another hub sent: native handler(msg, from), KEMI dispatch(5, nil, msg, from), from
 * being {node =, kind =, tag =, id =} (tag and id only when there is one). */
static int remote_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const hub_origin *o = s->arg_origin;
    int nargs = 2;
    if (s->dispatch_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->dispatch_ref); /* [dispatch] */
        lua_pushinteger(L, HLUA_EV_REMOTE);                 /* [dispatch, ev] */
        lua_pushnil(L);                                     /* [dispatch, ev, nil] */
        nargs = 4;
    } else {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler[HLUA_EV_REMOTE]); /* [fn] */
    }
    lua_pushlstring(L, s->arg_data, s->arg_len); /* [fn.., msg] */
    lua_createtable(L, 0, 4);                    /* [fn.., msg, from] */
    lua_pushstring(L, o->node);
    lua_setfield(L, -2, "node");
    lua_pushstring(L, o->kind);
    lua_setfield(L, -2, "kind");
    if (o->taglen) {
        lua_pushlstring(L, o->tag, o->taglen);
        lua_setfield(L, -2, "tag");
    }
    if (o->id) {
        lua_pushinteger(L, (lua_Integer)o->id);
        lua_setfield(L, -2, "id");
    }
    lua_call(L, nargs, 0);
    return 0;
}

static void hlua_on_remote(hub_script *s, const hub_origin *o, const char *data, size_t len)
{
    lua_State *L = s->L;
    if (s->dispatch_ref == LUA_NOREF && s->handler[HLUA_EV_REMOTE] == LUA_NOREF)
        return; /* a state loaded before the module asked for them (checked at load since) */
    s->arg_origin = o;
    s->arg_data = data;
    s->arg_len = len;
    lua_pushcfunction(L, traceback_cb); /* [tb] */
    lua_pushcfunction(L, remote_tramp); /* [tb, tramp] */
    hlua_pcall(s, 0, "cluster");
    s->arg_data = NULL;
    s->arg_origin = NULL;
}

/* The request route: KEMI's ksr_request_route(), or the native "request" handler with a
 * request object. */
static int request_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const char *route = s->cur_req->ops->route ? s->cur_req->ops->route(s->cur_req) : NULL;
    if (route) {
        if (lua_getglobal(L, route) != LUA_TFUNCTION)
            return luaL_error(L, "route '%s' is not a function", route);
        lua_call(L, 0, 0);
        return 0;
    }
    if (s->dispatch_ref != LUA_NOREF) {
        if (lua_getglobal(L, "ksr_request_route") != LUA_TFUNCTION)
            return luaL_error(L, "a SIP request came and the script defines no "
                                 "ksr_request_route()");
        lua_call(L, 0, 0);
        return 0;
    }
    if (s->handler[HLUA_EV_REQUEST] == LUA_NOREF)
        return luaL_error(L, "a SIP request came and the script has no evapi.on(\"request\") "
                             "handler");
    return hlua__run_request_handler(L, s, s->handler[HLUA_EV_REQUEST]);
}

static void hlua_on_request(hub_script *s, hub_req *r)
{
    lua_State *L = s->L;
    hlua__set_current(s, r);
    lua_pushcfunction(L, traceback_cb);  /* [tb] */
    lua_pushcfunction(L, request_tramp); /* [tb, tramp] */
    hlua_pcall(s, 0, "request");
    hlua__set_current(s, NULL);
}

/* Trampoline for a report function: [fn] -> fn(result). */
static int complete_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const char *err = hlua__json_push(L, s->arg_result); /* [fn, result] */
    if (err)
        return luaL_error(L, "the result cannot be given to Lua: %s", err);
    lua_call(L, 1, 0);
    return 0;
}

/* 1 when result says more results will follow for its token ("more": true). */
static int result_has_more(struct json_object *result)
{
    struct json_object *more;
    return json_object_is_type(result, json_type_object) &&
           json_object_object_get_ex(result, "more", &more) &&
           json_object_is_type(more, json_type_boolean) && json_object_get_boolean(more);
}

/* Run token's report function with result (see hlua_int.h, "Completions"). Nothing here
 * allocates before the protected call: an unknown token costs a lookup, and clearing an
 * existing key does not allocate. */
static int hlua_on_complete(hub_script *s, uint64_t token, struct json_object *result)
{
    lua_State *L = s->L;

    lua_pushcfunction(L, traceback_cb);                    /* [tb] */
    lua_pushcfunction(L, complete_tramp);                  /* [tb, tramp] */
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [tb, tramp, done] */
    if (lua_rawgeti(L, -1, (lua_Integer)token) == LUA_TTABLE) {
        /* A native request handler waiting in evapi.async_*: resumed, not called. */
        lua_pushnil(L);                         /* [tb, tramp, done, entry, nil] */
        lua_rawseti(L, -3, (lua_Integer)token); /* [tb, tramp, done, entry] */
        lua_remove(L, -2);                      /* [tb, tramp, entry] */
        lua_remove(L, -2);                      /* [tb, entry] */
        lua_remove(L, -2);                      /* [entry] */
        hlua__resume_waiter(s, result);         /* [] */
        return 0;
    }
    if (lua_type(L, -1) != LUA_TFUNCTION) {
        lua_pop(L, 4); /* [] */
        hub_log(HUB_LOG_DEBUG, "lua: result for unknown token %llu", (unsigned long long)token);
        return -ENOENT;
    }
    lua_insert(L, -2); /* [tb, tramp, fn, done] */
    if (!result_has_more(result)) {
        lua_pushnil(L);                         /* [tb, tramp, fn, done, nil] */
        lua_rawseti(L, -2, (lua_Integer)token); /* [tb, tramp, fn, done] */
    }
    lua_pop(L, 1); /* [tb, tramp, fn] */
    s->arg_result = result;
    hlua_pcall(s, 1, "report");
    s->arg_result = NULL;
    return 0;
}

/* Push a result field's name: the Lua string made the first time, from the table at keys
 * (interning the name anew for every field of every report cost more than the table). */
static void push_key(lua_State *L, hub_script *s, int keys, const char *name)
{
    for (unsigned i = 0; i < s->nkeys; i++) {
        if (s->keys[i] == name) {
            lua_rawgeti(L, keys, (lua_Integer)i + 1);
            return;
        }
    }
    lua_pushstring(L, name);
    if (s->nkeys < HLUA_KEYS_MAX) {
        lua_pushvalue(L, -1);
        lua_rawseti(L, keys, (lua_Integer)s->nkeys + 1);
        s->keys[s->nkeys++] = name;
    }
}

/* A typed result as a table of its fields, the names' strings at stack index keys: [.., t] */
static void push_result(lua_State *L, hub_script *s, int keys, const hub_result *r)
{
    int more = (r->flags & HUB_RESULT_MORE) != 0;
    lua_createtable(L, 0, r->nfields + more);
    for (unsigned i = 0; i < r->nfields; i++) {
        const hub_rfield *f = &r->f[i];
        if (f->type != HUB_FIELD_STR && f->type != HUB_FIELD_INT && f->type != HUB_FIELD_BOOL)
            continue;
        push_key(L, s, keys, f->name);
        if (f->type == HUB_FIELD_STR)
            lua_pushlstring(L, hub_result_str(r, f), f->len);
        else if (f->type == HUB_FIELD_INT)
            lua_pushinteger(L, (lua_Integer)f->i);
        else
            lua_pushboolean(L, f->i != 0);
        lua_rawset(L, -3); /* a new table: no metamethods to honour */
    }
    if (more) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "more");
    }
}

/* The same as a json-c object, for a request handler waiting on the token (rare). */
static struct json_object *result_json(const hub_result *r)
{
    struct json_object *o = json_object_new_object();
    for (unsigned i = 0; o && i < r->nfields; i++) {
        const hub_rfield *f = &r->f[i];
        struct json_object *v = f->type == HUB_FIELD_STR
                                    ? json_object_new_string_len(hub_result_str(r, f), (int)f->len)
                                : f->type == HUB_FIELD_INT ? json_object_new_int64(f->i)
                                                           : json_object_new_boolean(f->i != 0);
        json_object_object_add(o, f->name, v);
    }
    if (o && (r->flags & HUB_RESULT_MORE))
        json_object_object_add(o, "more", json_object_new_boolean(1));
    return o;
}

/* Trampoline for a batch of typed results: runs report functions from s->res_off on, each
 * as a callback of its own; stops at a record for a waiting request handler (res_waiter). */
static int results_tramp(lua_State *L)
{
    hub_script *s = hlua__script(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [done] */
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->keys_ref);        /* [done, keys] */
    for (int first = 1; s->res_off < s->res_len; first = 0) {
        const hub_result *r = (const hub_result *)(s->res_buf + s->res_off);
        int t = lua_rawgeti(L, 1, (lua_Integer)r->token); /* [done, keys, fn] */
        if (t == LUA_TTABLE) {
            s->res_waiter = 1;
            return 0;
        }
        s->res_off += r->size; /* past it before it runs: a failure goes on with the next */
        if (t != LUA_TFUNCTION) {
            lua_pop(L, 1);
            s->res_unknown++;
            hub_log(HUB_LOG_DEBUG, "lua: result for unknown token %llu",
                    (unsigned long long)r->token);
            continue;
        }
        if (!(r->flags & HUB_RESULT_MORE)) {
            lua_pushnil(L);
            lua_rawseti(L, 1, (lua_Integer)r->token);
        }
        if (!first) { /* each report is a callback of its own for the budget and watchdog */
            cb_end(s);
            arm_budget(s);
            s->budget_hit = 0;
            cb_begin(s);
        }
        push_result(L, s, 2, r); /* [done, keys, fn, t] */
        lua_call(L, 1, 0);       /* [done, keys] */
    }
    return 0;
}

static size_t hlua_on_results(hub_script *s, const void *buf, size_t len)
{
    lua_State *L = s->L;
    /* saved: a report function could run a loop that delivers results (it does not today) */
    const char *sbuf = s->res_buf;
    size_t slen = s->res_len, soff = s->res_off, sunknown = s->res_unknown;
    s->res_buf = buf;
    s->res_len = len;
    s->res_off = 0;
    s->res_unknown = 0;
    while (s->res_off < len) {
        size_t before = s->res_off;
        s->res_waiter = 0;
        lua_pushcfunction(L, traceback_cb);  /* [tb] */
        lua_pushcfunction(L, results_tramp); /* [tb, tramp] */
        hlua_pcall(s, 0, "report");
        if (!s->res_waiter) {
            if (s->res_off == before) {
                /* it failed before taking the record (no memory for the call): skip it,
                 * or the same record would be tried again and again */
                const hub_result *r = (const hub_result *)(s->res_buf + s->res_off);
                s->res_off += r->size;
                s->res_unknown++;
            }
            continue;
        }
        const hub_result *r = (const hub_result *)(s->res_buf + s->res_off);
        s->res_off += r->size;
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->completions_ref); /* [done] */
        lua_rawgeti(L, -1, (lua_Integer)r->token);             /* [done, entry] */
        lua_pushnil(L);
        lua_rawseti(L, -3, (lua_Integer)r->token);
        lua_remove(L, -2); /* [entry] */
        struct json_object *o = result_json(r);
        hlua__resume_waiter(s, o); /* [] */
        json_object_put(o);
    }
    size_t unknown = s->res_unknown;
    s->res_buf = sbuf;
    s->res_len = slen;
    s->res_off = soff;
    s->res_unknown = sunknown;
    return unknown;
}

/* The hub changed a tag behind this state's back: keep conn.tag current. */
static void hlua_on_tag(hub_script *s, uint64_t id, const char *tag, size_t len)
{
    hlua_conn *c = find_conn(s, id); /* [conn] */
    if (c == NULL)
        return;
    lua_pop(s->L, 1); /* [] */
    if (len > HUB_TAG_MAX)
        len = 0;
    memcpy(c->tag, tag, len);
    c->tag[len] = '\0';
    c->taglen = (unsigned char)len;
}

static void hlua_idle(hub_script *s)
{
    lua_gc(s->L, LUA_GCSTEP, 0); /* only C finalizers: scripts cannot set __gc */
}

static void hlua_free(hub_script *s)
{
    if (s == NULL)
        return;
    watch_del(s);
    if (s->L) {
        arm_budget(s);
        hlua__drop_waiters(s);
        lua_close(s->L);
    }
    cache_free(s);
    hub_free(s);
}

/* Tail of a wrapped library function: call orig with every argument. */
static int call_original(lua_State *L, lua_CFunction orig)
{
    lua_pushcfunction(L, orig); /* [args.., orig] */
    lua_insert(L, 1);           /* [orig, args..] */
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* coroutine.resume with the callback's deadline and a cancel checked first (see arm_budget). */
static int co_resume(lua_State *L)
{
    hub_script *s = hlua__script(L);
    lua_State *co = lua_tothread(L, 1);
    check_limits(L, s, 0);
    if (!co)
        return call_original(L, s->orig_resume); /* it raises the argument error */
    /* A fresh count for this resume: a coroutine living across callbacks must not carry
     * what an earlier callback left of its count into this one. Lazy and not armed yet:
     * no hook, and the watchdog's signal hooks the coroutine that runs then. */
    lua_State *prev = s->running;
    s->running = co; /* first: the signal may come while the hook is being cleared */
    hook_coroutine(s, co);
    int n = call_original(L, s->orig_resume);
    s->running = prev;
    if (s->lazy && s->armed)
        set_hook(L, s); /* armed while co ran: the resumer counts too */
    return n;
}

/* 1 when the metatable argument at index 2 has a __gc field: Lua runs finalizers with hooks
 * off, outside any budget, so a looping one would hang the hub. */
static int has_gc(lua_State *L)
{
    if (lua_type(L, 2) != LUA_TTABLE)
        return 0;
    lua_pushliteral(L, "__gc"); /* [t, mt, .., "__gc"] */
    int found = lua_rawget(L, 2) != LUA_TNIL;
    lua_pop(L, 1);
    return found;
}

static int setmetatable_no_gc(lua_State *L)
{
    if (has_gc(L))
        return luaL_argerror(L, 2, "__gc metamethods are not supported by evhub");
    return call_original(L, hlua__script(L)->orig_setmetatable);
}

static int debug_setmetatable_no_gc(lua_State *L)
{
    if (has_gc(L))
        return luaL_argerror(L, 2, "__gc metamethods are not supported by evhub");
    return call_original(L, hlua__script(L)->orig_debug_setmetatable);
}

/* The count hook is the hub's: it enforces max_instructions and lets a load be cancelled. A
 * script that could clear or replace it could loop for ever, holding its thread and the
 * hub's shutdown, so the functions that reach it raise instead. */
static int hook_refused(lua_State *L)
{
    return luaL_error(L, "debug.sethook and debug.gethook are not allowed in evhub scripts: "
                         "the hub's instruction budget (max_instructions) uses the hook");
}

/* os.exit would end the hub at once, with write queues unflushed and no shutdown: it raises
 * instead, so pcall() sees an ordinary error and the hub goes on. */
static int os_exit_refused(lua_State *L)
{
    return luaL_error(L, "os.exit is not allowed in evhub scripts; KSR.x.exit() ends the "
                         "callback, SIGTERM stops the hub");
}

/* Replace global tbl.name (tbl NULL: a global) by f; returns the original (a light C function
 * in the standard libraries, so calling it by pointer loses nothing). */
static lua_CFunction replace_lib_function(lua_State *L, const char *tbl, const char *name,
                                          lua_CFunction f)
{
    if (tbl)
        lua_getglobal(L, tbl); /* [lib] */
    else
        lua_pushglobaltable(L); /* [lib] */
    lua_getfield(L, -1, name);  /* [lib, orig] */
    lua_CFunction orig = lua_tocfunction(L, -1);
    lua_pushcfunction(L, f);   /* [lib, orig, f] */
    lua_setfield(L, -3, name); /* [lib, orig] */
    lua_pop(L, 2);             /* [] */
    return orig;
}

/* coroutine.wrap rebuilt on the checked resume (the original resumes in C, unchecked). */
static const char sandbox_lua[] = "local create, resume, close, pack, unpack, err = ...\n"
                                  "coroutine.wrap = function(f)\n"
                                  "  local co = create(f)\n"
                                  "  return function(...)\n"
                                  "    local r = pack(resume(co, ...))\n"
                                  "    if r[1] then return unpack(r, 2, r.n) end\n"
                                  "    close(co)\n"
                                  "    err(r[2], 2)\n"
                                  "  end\n"
                                  "end\n";

static void open_sandbox(lua_State *L, hub_script *s)
{
    s->orig_resume = replace_lib_function(L, "coroutine", "resume", co_resume);
    s->orig_setmetatable = replace_lib_function(L, NULL, "setmetatable", setmetatable_no_gc);
    s->orig_debug_setmetatable =
        replace_lib_function(L, "debug", "setmetatable", debug_setmetatable_no_gc);
    replace_lib_function(L, "debug", "sethook", hook_refused);
    replace_lib_function(L, "debug", "gethook", hook_refused);
    replace_lib_function(L, "os", "exit", os_exit_refused);
    if (luaL_loadbufferx(L, sandbox_lua, sizeof(sandbox_lua) - 1, "=sandbox", "t") != LUA_OK)
        lua_error(L);
    lua_getglobal(L, "coroutine"); /* [chunk, co] */
    lua_getfield(L, -1, "create");
    lua_getfield(L, -2, "resume");
    lua_getfield(L, -3, "close");
    lua_remove(L, -4); /* [chunk, create, resume, close] */
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "pack");
    lua_getfield(L, -2, "unpack");
    lua_remove(L, -3); /* [chunk, create, resume, close, pack, unpack] */
    lua_getglobal(L, "error");
    lua_call(L, 6, 0);
}

/* Set field name of the table at idx to nil. */
static void withhold(lua_State *L, int idx, const char *name)
{
    lua_pushnil(L);
    lua_setfield(L, idx > 0 ? idx : idx - 1, name);
}

/* [lua] restrict = yes: no io (never opened), no os functions that run commands, end the
 * process or touch files, no native code (package.loadlib, and require's C searchers that
 * use it), and of the debug library only traceback. The hub's own traceback is C's. */
static void open_restricted(lua_State *L)
{
    lua_getglobal(L, "os"); /* [os] */
    withhold(L, -1, "execute");
    withhold(L, -1, "exit");
    withhold(L, -1, "remove");
    withhold(L, -1, "rename");
    withhold(L, -1, "tmpname");
    lua_pop(L, 1);               /* [] */
    lua_getglobal(L, "package"); /* [package] */
    withhold(L, -1, "loadlib");
    lua_pushliteral(L, ""); /* [package, ""] */
    lua_setfield(L, -2, "cpath");
    lua_getfield(L, -1, "searchers"); /* [package, searchers]: preload, Lua, C, C root */
    for (lua_Integer i = lua_rawlen(L, -1); i > 2; i--) {
        lua_pushnil(L);
        lua_rawseti(L, -2, i);
    }
    lua_pop(L, 1);                      /* [package] */
    lua_getfield(L, -1, "loaded");      /* [package, loaded] */
    lua_createtable(L, 0, 1);           /* [package, loaded, dbg] */
    lua_getglobal(L, "debug");          /* [package, loaded, dbg, debug] */
    lua_getfield(L, -1, "traceback");   /* [package, loaded, dbg, debug, tb] */
    lua_setfield(L, -3, "traceback");   /* [package, loaded, dbg, debug] */
    lua_pop(L, 1);                      /* [package, loaded, dbg] */
    lua_pushvalue(L, -1);               /* [package, loaded, dbg, dbg] */
    lua_setfield(L, -3, LUA_DBLIBNAME); /* [package, loaded, dbg] */
    lua_setglobal(L, LUA_DBLIBNAME);    /* [package, loaded] */
    lua_pop(L, 2);                      /* [] */
}

/* The standard libraries, as luaL_openlibs opens them, but io when restricted. */
static void open_libs(lua_State *L, int restricted)
{
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},          {LUA_LOADLIBNAME, luaopen_package},
        {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_IOLIBNAME, luaopen_io},        {LUA_OSLIBNAME, luaopen_os},
        {LUA_STRLIBNAME, luaopen_string},   {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},    {LUA_DBLIBNAME, luaopen_debug},
    };
    for (size_t i = 0; i < sizeof(libs) / sizeof(libs[0]); i++) {
        if (restricted && libs[i].func == luaopen_io)
            continue;
        luaL_requiref(L, libs[i].name, libs[i].func, 1);
        lua_pop(L, 1);
    }
}

/* Runs protected: libraries, native API, ksr.lua, the script, the handler check.
 * Arguments: [conf as light userdata]. Raises a one-line message on failure. */
static int init_state(lua_State *L)
{
    hub_script *s = hlua__script(L);
    const hub_script_conf *conf = lua_touserdata(L, 1);
    const char *cb = conf->event_callback && conf->event_callback[0] ? conf->event_callback : NULL;

    open_libs(L, conf->restricted);
    open_sandbox(L, s);
    if (conf->restricted)
        open_restricted(L);
    lua_newtable(L); /* [conf, conns] */
    s->conns_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L); /* [conf, completions] */
    s->completions_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L); /* [conf, keys] */
    s->keys_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    hlua__open_evapi(L, conf->worker);
    hlua__open_json(L);

    if (luaL_loadbufferx(L, hlua_ksr_source, hlua_ksr_source_len, "=ksr.lua", "t") != LUA_OK)
        return lua_error(L);
    hlua__push_ksr_helpers(L); /* [conf, ksr, helpers] */
    lua_pushstring(L, cb);     /* [conf, ksr, helpers, cb or nil] */
    lua_call(L, 2, 2);         /* [conf, dispatch, reset] */
    if (cb) {
        s->reset_ref = luaL_ref(L, LUA_REGISTRYINDEX);    /* [conf, dispatch] */
        s->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* [conf] */
    }
    lua_settop(L, 1); /* [conf] */
    hlua__open_module_fns(L, conf);

    int lrc;
    if (conf->source) {
        /* The text the hub read once for every state of a reload; named as the file, and
         * read as luaL_loadfilex reads one: a UTF-8 BOM, then a first line starting with
         * '#' (a shebang) are skipped, the line's newline kept so line numbers hold. */
        const char *src = conf->source;
        size_t len = conf->source_len;
        if (len >= 3 && memcmp(src, "\xEF\xBB\xBF", 3) == 0)
            src += 3, len -= 3;
        if (len > 0 && src[0] == '#') {
            const char *nl = memchr(src, '\n', len);
            len = nl ? len - (size_t)(nl - src) : 0;
            src = nl ? nl : src + len;
        }
        lua_pushfstring(L, "@%s", conf->path); /* [conf, name] */
        lrc = luaL_loadbufferx(L, src, len, lua_tostring(L, -1), "t");
        lua_remove(L, -2);
    } else {
        lrc = luaL_loadfilex(L, conf->path, "t");
    }
    if (lrc != LUA_OK) /* [conf, chunk] */
        return lua_error(L);
    arm_budget(s);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK && !is_exit(L, -1))
        return lua_error(L);
    lua_settop(L, 1);

    if (cb) {
        if (lua_getglobal(L, cb) != LUA_TFUNCTION)
            return luaL_error(L, "event_callback '%s' is not a function defined by %s", cb,
                              conf->path);
        for (int ev = 1; ev <= HLUA_EV_COUNT; ev++) {
            if (s->handler[ev] != LUA_NOREF) {
                hub_log(HUB_LOG_WARN,
                        "lua: %s: event_callback '%s' is set, so evapi.on() "
                        "handlers are not called",
                        conf->path, cb);
                break;
            }
        }
        return 0;
    }
    /* Without a message handler every frame would be dropped: surely a mistake. */
    if (s->handler[HLUA_EV_MESSAGE] == LUA_NOREF)
        return luaL_error(L,
                          "%s: script registers no evapi.on(\"message\") handler and no "
                          "event_callback is configured",
                          conf->path);
    /* [cluster] script = yes: what other nodes send comes here and nowhere else */
    if (conf->remote && s->handler[HLUA_EV_REMOTE] == LUA_NOREF)
        return luaL_error(L,
                          "%s: [cluster] script = yes, but the script registers no "
                          "evapi.on(\"cluster\") handler (and no event_callback is configured)",
                          conf->path);
    return 0;
}

static hub_script *hlua_load(const hub_script_conf *conf, const hub_api *api, void *ud, char *err,
                             size_t errlen)
{
    hub_script *s = hub_calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->api = api;
    s->ud = ud;
    s->max_instructions = conf->max_instructions > 0 ? conf->max_instructions : 0;
    s->max_memory = conf->max_memory;
    s->worker = conf->worker;
    s->requests = conf->requests;
    for (int ev = 0; ev <= HLUA_EV_COUNT; ev++)
        s->handler[ev] = LUA_NOREF;
    s->conns_ref = s->dispatch_ref = s->reset_ref = s->completions_ref = LUA_NOREF;
    s->keys_ref = LUA_NOREF;

    s->L = lua_newstate(counting_alloc, s);
    if (s->L == NULL) {
        snprintf(err, errlen, "%s: cannot create a Lua state: out of memory", conf->path);
        goto fail;
    }
    *(hub_script **)lua_getextraspace(s->L) = s;
    lua_atpanic(s->L, panic_cb);
    lua_setwarnf(s->L, warn_cb, s);

    s->cancel = conf->cancel;
    lua_pushcfunction(s->L, init_state);       /* [init] */
    lua_pushlightuserdata(s->L, (void *)conf); /* [init, conf] */
    int rc = lua_pcall(s->L, 1, 0, 0);
    s->cancel = NULL; /* only loading can be cancelled: callbacks run to their end */
    if (s->max_instructions <= 0)
        lua_sethook(s->L, NULL, 0, 0);
    if (rc == LUA_OK) {
        watch_add(s);
        arm_budget(s); /* lazy: the loading's hook goes */
    }
    if (rc != LUA_OK) {
        const char *msg = lua_tostring(s->L, -1);
        if (rc == LUA_ERRMEM)
            snprintf(err, errlen, "%s: not enough memory (max_memory %zu bytes)", conf->path,
                     s->max_memory);
        else
            snprintf(err, errlen, "%s", msg ? msg : "(error object is not a string)");
        goto fail;
    }
    return s;

fail:
    hlua_free(s);
    return NULL;
}

/* Runs protected in the new state: copy old's connections. Arguments: [old]. */
static int copy_conns(lua_State *L)
{
    hub_script *s = hlua__script(L);
    hub_script *old = lua_touserdata(L, 1);
    lua_State *OL = old->L;

    lua_rawgeti(L, LUA_REGISTRYINDEX, s->conns_ref);    /* L: [old, conns] */
    lua_rawgeti(OL, LUA_REGISTRYINDEX, old->conns_ref); /* OL: [oconns] */
    lua_pushnil(OL);                                    /* OL: [oconns, nil] */
    while (lua_next(OL, -2)) {                          /* OL: [oconns, id, oconn] */
        const hlua_conn *oc = lua_touserdata(OL, -1);
        if (oc != NULL) {
            hub_conn_info ci = {0};
            hlua_conn *c = hlua__push_conn(L, &ci);  /* L: [old, conns, conn] */
            *c = *oc;                                /* every field, the tag and closed too */
            lua_rawseti(L, -2, (lua_Integer)oc->id); /* L: [old, conns] */
        }
        lua_pop(OL, 1); /* OL: [oconns, id] */
    }
    lua_pop(OL, 1); /* OL: [] */
    return 0;
}

/* Entries of the registry table ref (no allocation; a bounded walk of the table). */
static size_t count_entries(lua_State *L, int ref)
{
    size_t n = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref); /* [t] */
    lua_pushnil(L);                         /* [t, nil] */
    while (lua_next(L, -2)) {               /* [t, k, v] */
        lua_pop(L, 1);                      /* [t, k] */
        n++;
    }
    lua_pop(L, 1); /* [] */
    return n;
}

static int hlua_adopt(hub_script *s, hub_script *old, char *err, size_t errlen)
{
    int otop = lua_gettop(old->L);
    lua_pushcfunction(s->L, copy_conns); /* [copy] */
    lua_pushlightuserdata(s->L, old);    /* [copy, old] */
    int rc = lua_pcall(s->L, 1, 0, 0);
    lua_settop(old->L, otop); /* an error may have left old's stack mid-iteration */
    if (rc != LUA_OK) {
        snprintf(err, errlen, "reload: cannot copy connections: %s",
                 rc == LUA_ERRMEM ? "not enough memory" : lua_tostring(s->L, -1));
        return -1;
    }
    /* Report functions are closures of the old state: they cannot move. Their results will
     * reach the new state, which does not know the tokens (-ENOENT): the hub counts them. */
    size_t pending = count_entries(old->L, old->completions_ref);
    if (pending > 0)
        hub_log(HUB_LOG_NOTICE,
                "lua: reload: %zu report function(s) of the old script will not run", pending);
    return 0;
}

static hub_script *hlua_reload(hub_script *old, const hub_script_conf *conf, char *err,
                               size_t errlen)
{
    hub_script *s = hlua_load(conf, old->api, old->ud, err, errlen);
    if (s == NULL)
        return NULL;
    if (hlua_adopt(s, old, err, errlen) < 0) {
        hlua_free(s);
        return NULL;
    }
    return s;
}

const hub_script_ops hlua_script_ops = {
    .name = "lua",
    .load = hlua_load,
    .reload = hlua_reload,
    .adopt = hlua_adopt,
    .free = hlua_free,
    .on_connect = hlua_on_connect,
    .on_message = hlua_on_message,
    .on_close = hlua_on_close,
    .idle = hlua_idle,
    .on_tag = hlua_on_tag,
    .on_complete = hlua_on_complete,
    .on_results = hlua_on_results,
    .on_request = hlua_on_request,
    .on_remote = hlua_on_remote,
};
