-- The same hub as kemi.lua in evhub's native dialect (leave event_callback empty), plus
-- replies to the sender and JSON.
--
-- Protocol (one netstring per message):
--   on connect             the connection is tagged with its source address ("127.0.0.1")
--   "tag:NAME"             re-tag this connection as NAME; replies "ok" or "error: invalid tag"
--   "multicast:TAG:DATA"   DATA goes to every connection tagged TAG
--   "unicast:TAG:DATA"     DATA goes to one connection tagged TAG
--   "ping"                 replies "pong" to the sender only
--   {"to":TAG,"data":V}    sends {"from":<sender's tag>,"data":V} to every connection tagged TAG
--                          and replies {"ok":true}, or {"ok":false,"error":...}
--   anything else          relayed as is to every connection (the sender included)

local function reply_json(conn, v)
    conn:send(json.encode(v))
end

local function on_json(conn, msg)
    local req, err = json.decode(msg)
    if type(req) ~= "table" or type(req.to) ~= "string" then
        return reply_json(conn, { ok = false, error = err or "expected {\"to\":TAG,\"data\":...}" })
    end
    local ok, why = evapi.multicast(json.encode({ from = conn.tag or json.null, data = req.data }),
        req.to)
    if ok then
        reply_json(conn, { ok = true })
    else
        reply_json(conn, { ok = false, error = why })
    end
end

evapi.on("connect", function(conn)
    log.info("new connection " .. tostring(conn))
    conn:set_tag(conn.addr)
end)

evapi.on("message", function(conn, msg)
    if msg == "ping" then
        conn:send("pong")
        return
    end
    if msg:byte(1) == 123 then -- "{"
        return on_json(conn, msg)
    end
    local tag = msg:match("^tag:(.+)$")
    if tag then
        local ok, err = conn:set_tag(tag)
        conn:send(ok and "ok" or ("error: " .. err))
        return
    end
    local kind, target, data = msg:match("^(%a+):([^:]+):(.*)$")
    local ok, err
    if kind == "multicast" then
        ok, err = evapi.multicast(data, target)
    elseif kind == "unicast" then
        ok, err = evapi.unicast(data, target)
    else
        ok, err = evapi.relay(msg)
    end
    if not ok then
        log.info(tostring(conn) .. ": not delivered: " .. err)
    end
end)

evapi.on("close", function(conn)
    log.info("connection closed " .. tostring(conn))
end)
