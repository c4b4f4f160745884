-- A Kamailio-style evapi script (KEMI dialect): runs unchanged under Kamailio with
-- modparam("evapi", "event_callback", "ksr_evapi_event"), and under evhub with
-- event_callback = ksr_evapi_event in [evapi].
--
-- Protocol (one netstring per message):
--   on connect             the connection is tagged with its source address ("127.0.0.1")
--   "tag:NAME"             re-tag this connection as NAME (1..64 printable bytes, no spaces)
--   "multicast:TAG:DATA"   DATA goes to every connection tagged TAG
--   "unicast:TAG:DATA"     DATA goes to one connection tagged TAG
--   anything else          relayed as is to every connection (the sender included)

local function on_message(msg)
    local tag = msg:match("^tag:(.+)$")
    if tag then
        if KSR.evapi.set_tag(tag) < 0 then
            KSR.warn("evapi: invalid tag '" .. tag .. "'\n")
        end
        return
    end
    local kind, target, data = msg:match("^(%a+):([^:]+):(.*)$")
    if kind == "multicast" then
        if KSR.evapi.relay_multicast(data, target) < 0 then
            KSR.info("evapi: nobody is tagged " .. target .. "\n")
        end
    elseif kind == "unicast" then
        if KSR.evapi.relay_unicast(data, target) < 0 then
            KSR.info("evapi: nobody is tagged " .. target .. "\n")
        end
    else
        KSR.evapi.relay(msg)
    end
end

function ksr_evapi_event(evname)
    if evname == "evapi:connection-new" then
        local addr = KSR.pv.get("$evapi(srcaddr)")
        KSR.info("evapi: new connection from " .. addr .. ":"
            .. KSR.pv.get("$evapi(srcport)") .. "\n")
        KSR.evapi.set_tag(addr)
    elseif evname == "evapi:message-received" then
        on_message(KSR.pv.get("$evapi(msg)"))
    elseif evname == "evapi:connection-closed" then
        KSR.info("evapi: connection closed: " .. KSR.pv.get("$evapi(srcaddr)") .. ":"
            .. KSR.pv.get("$evapi(srcport)") .. "\n")
    end
    return 1
end

-- Kamailio's SIP entry point. evhub does not call it until its SIP listener is enabled.
function ksr_request_route()
    KSR.evapi.async_relay('{"event":"invite"}')
    KSR.x.exit()
end
