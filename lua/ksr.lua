-- The KEMI layer: Kamailio's KSR table on top of evhub's native evapi API, so an existing
-- Kamailio Lua evapi script runs unchanged. Called by the host with (helpers, event_callback)
-- and returns the dispatcher and the context reset the host uses when event_callback is set.
local H, cbname = ...

local evapi, log = evapi, log
local type, tostring, error, setmetatable = type, tostring, error, setmetatable
local G = _G
local relay, multicast, unicast = evapi.relay, evapi.multicast, evapi.unicast

-- The current event context: the connection the event is about, and the message (only for
-- evapi:message-received and evapi:cluster-message), and for the latter where it came from
-- ({node, kind, tag, id}). Set by dispatch(), cleared when it returns (or by reset()).
local cur_conn, cur_msg, cur_from = nil, nil, nil

-- A table whose missing entries raise a clear error instead of "attempt to index a nil value".
local function module(prefix)
    return setmetatable({}, {
        __index = function(_, k)
            error(prefix .. tostring(k) .. " is not available in evhub", 2)
        end,
    })
end

local KSR = module("KSR.")
local E = module("KSR.evapi.")
local P = module("KSR.pv.")
local X = module("KSR.x.")
local TMX = module("KSR.tmx.")
local TM = module("KSR.tm.")
local SL = module("KSR.sl.")
local HDR = module("KSR.hdr.")
local KAFKA = module("KSR.kafka.")
local RABBITMQ = module("KSR.rabbitmq.")
rawset(KSR, "evapi", E)
rawset(KSR, "pv", P)
rawset(KSR, "x", X)
rawset(KSR, "tmx", TMX)
rawset(KSR, "tm", TM)
rawset(KSR, "sl", SL)
rawset(KSR, "hdr", HDR)
rawset(KSR, "kafka", KAFKA)
rawset(KSR, "rabbitmq", RABBITMQ)

-- KSR.evapi: Kamailio's return codes (1 success, -1 failure; close() returns 0 on success).

-- The native calls answer true, or nil and a reason; Kamailio's answer 1 or -1.
local function rc(ok)
    if ok then
        return 1
    end
    return -1
end

function E.relay(data)
    return rc(relay(data))
end

-- The call every fan-out script makes once per message: rc() inlined.
function E.relay_multicast(data, tag)
    -- Kamailio treats an empty tag as no tag at all: the data goes to everyone.
    if tag == "" then
        return rc(relay(data))
    end
    if multicast(data, tag) then
        return 1
    end
    return -1
end

function E.relay_unicast(data, tag)
    return rc(unicast(data, tag))
end

function E.close()
    local c = cur_conn
    if c == nil then
        return -1
    end
    if c:is_closed() then
        return -2
    end
    if c:close() then
        return 0
    end
    return -1
end

function E.set_tag(tag)
    local c = cur_conn
    if type(tag) == "number" then
        tag = tostring(tag)
    end
    if c == nil or type(tag) ~= "string" then
        return -1
    end
    return rc(c:set_tag(tag))
end

-- Functions Kamailio scripts call that need parts evhub does not have yet: they log why
-- and fail as Kamailio's do.
local function unavailable(name, why)
    return function()
        log.err(name .. ": " .. why)
        return -1
    end
end
local not_built = "not available in this build"

-- SIP: the current request of a request route (or of a route t_continue runs). Without one
-- (an evapi event, no [sip]) they log why and return -1, as Kamailio's do.
local R = H.req
function E.async_relay(data)
    return R.async(0, data)
end
function E.async_multicast(data, tag)
    return R.async(1, data, tag)
end
function E.async_unicast(data, tag)
    return R.async(2, data, tag)
end
function TMX.t_continue(index, label, fname)
    return R.t_continue(index, label, fname)
end
function TM.t_newtran()
    return R.newtran()
end
function TM.t_check_trans()
    return R.check_trans()
end
function TM.t_reply(code, reason)
    return R.reply("KSR.tm.t_reply", code, reason)
end
function SL.sl_send_reply(code, reason)
    return R.reply("KSR.sl.sl_send_reply", code, reason)
end
function SL.send_reply(code, reason)
    return R.reply("KSR.sl.send_reply", code, reason)
end
function HDR.append_to_reply(text)
    return R.append_to_reply(text)
end
KAFKA.send = unavailable("KSR.kafka.send", not_built)
KAFKA.send_key = unavailable("KSR.kafka.send_key", not_built)
RABBITMQ.publish = unavailable("KSR.rabbitmq.publish", not_built)
RABBITMQ.publish_consume = unavailable("KSR.rabbitmq.publish_consume", not_built)

-- KSR.pv: the read-only $evapi(...) variables; any other variable is $null (nil).

-- A getter for a field of the current connection; nil outside an event, and in
-- evapi:cluster-message (no connection of this node sent it): one value, so that
-- tostring(KSR.pv.get(...)) works as it does in Kamailio.
local function conn_field(k)
    return function()
        local c = cur_conn
        if c then
            return c[k]
        end
        return nil
    end
end

local pv_getters = {
    ["$evapi(msg)"] = function()
        return cur_msg
    end,
    ["$evapi(srcaddr)"] = conn_field("addr"),
    ["$evapi(srcport)"] = conn_field("port"),
    ["$evapi(conidx)"] = conn_field("conidx"),
    -- evapi:cluster-message: the node it came from, what it was there, its tag
    ["$evapi(node)"] = function()
        return cur_from and cur_from.node
    end,
    ["$evapi(kind)"] = function()
        return cur_from and cur_from.kind
    end,
    ["$evapi(tag)"] = function()
        return cur_from and cur_from.tag
    end,
    -- ...and for a send, the connection it is for (evapi.send($evapi(id), msg) delivers it)
    ["$evapi(id)"] = function()
        return cur_from and cur_from.id
    end,
}

local function pv_get(name)
    local f = pv_getters[name]
    if f then
        return f()
    end
    -- $rm, $ru, $hdr(Name), $T(id_index)...: the current SIP request's, or $null
    return R.pv(name)
end
-- $evapi(msg), read once per message by nearly every script, without the table and the call.
function P.get(name)
    if name == "$evapi(msg)" then
        return cur_msg
    end
    return pv_get(name)
end

-- KSR.pv.gete / getw: the value, or what Kamailio prints for $null.
local function pv_get_or(null)
    return function(name)
        local v = pv_get(name)
        if v == nil then
            return null
        end
        return v
    end
end
P.gete = pv_get_or("")
P.getw = pv_get_or("<<null>>")

function P.is_null(name)
    return pv_get(name) == nil
end

-- Logging as Kamailio's: the script's text as is (no "lua: " prefix), one trailing "\n" dropped.

local klog = H.log
KSR.dbg = klog.debug
KSR.info = klog.info
KSR.notice = klog.notice
KSR.warn = klog.warn
KSR.err = klog.err
KSR.crit = klog.crit

local log_levels = {
    dbg = klog.debug, debug = klog.debug, info = klog.info, notice = klog.notice,
    warn = klog.warn, warning = klog.warn, err = klog.err, error = klog.err,
    crit = klog.crit, alert = klog.crit, bug = klog.crit,
}

function KSR.log(level, msg)
    local f = log_levels[level] or klog.info
    f(msg)
end

-- KSR.x.exit() ends the current callback quietly (the host recognises H.exit's error value).
X.exit = H.exit
X.drop = H.exit

G.KSR = KSR

if cbname == nil then
    return nil, nil
end

local evnames = { "evapi:connection-new", "evapi:message-received", "evapi:connection-closed",
    nil, "evapi:cluster-message" }
local checked_cb = false -- the last value of the callback's global that was a function

-- Called by the host for every event: (code, conn[, msg[, from]]). The callback is looked up
-- by name each time, as Kamailio does, so a script may redefine it.
local function dispatch(ev, conn, msg, from)
    -- Kamailio runs no connection-closed for a connection its script closed itself.
    if ev == 3 and conn:is_closed() then
        return
    end
    cur_conn, cur_msg, cur_from = conn, msg, from
    local f = G[cbname]
    -- type() only when the global changed (a script may redefine it): one comparison a call
    if f ~= checked_cb then
        if type(f) ~= "function" then
            error("event_callback '" .. cbname .. "' is not a function", 0)
        end
        checked_cb = f
    end
    f(evnames[ev])
    cur_conn, cur_msg, cur_from = nil, nil, nil
end

local function reset()
    cur_conn, cur_msg, cur_from = nil, nil, nil
end

return dispatch, reset
