-- Async routing, native dialect: the request handler asks the routing application and waits
-- for its answer (the handler is a coroutine; evapi.async_unicast suspends it and the SIP
-- transaction). The hub adds "evhub_id" to what it sends; the application echoes it in its
-- answer, which the hub hands back here instead of to the message handler.

evapi.on("connect", function(conn)
    conn:set_tag("router")
end)

evapi.on("message", function(conn, msg)
    log.info("not an answer: " .. msg)
end)

evapi.on("request", function(req)
    if req.method == "OPTIONS" then
        return req:reply(200, "OK")
    end
    if req.method ~= "INVITE" then
        return req:reply(405, "Method Not Allowed")
    end
    local answer, err = evapi.async_unicast({
        event = "route",
        callid = req.callid,
        caller = req.from_user,
        callee = req.ruser,
    }, "router", {timeout = 2000})
    if not answer then
        if err == "no client" then
            return req:reply(503, "No Routing Application")
        end
        return req:reply(408, "Routing Timeout") -- "timeout"
    end
    if answer.contact then
        req:reply(302, "Moved Temporarily", "Contact: <" .. answer.contact .. ">\r\n")
    else
        req:reply(tonumber(answer.code) or 404, answer.reason or "Not Found")
    end
end)
