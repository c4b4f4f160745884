-- Async routing, Kamailio KEMI dialect: each INVITE is suspended and relayed to a routing
-- application over evapi; its answer resumes the transaction with t_continue, which sends a
-- 302 with the Contact the application chose. The same script runs in Kamailio with evapi,
-- tm, tmx, sl, textops (append_to_reply) and a JSON decoder.

function ksr_request_route()
    local method = KSR.pv.get("$rm")
    if method == "OPTIONS" then
        KSR.sl.sl_send_reply(200, "OK")
        return
    end
    if method ~= "INVITE" then
        KSR.sl.sl_send_reply(405, "Method Not Allowed")
        return
    end
    KSR.tm.t_newtran()
    local data = json.encode({
        event = "route",
        tindex = KSR.pv.get("$T(id_index)"),
        tlabel = KSR.pv.get("$T(id_label)"),
        callid = KSR.pv.get("$ci"),
        caller = KSR.pv.get("$fU"),
        callee = KSR.pv.get("$rU"),
    })
    -- No routing application connected: answer at once rather than suspend.
    if KSR.evapi.async_unicast(data, "router") < 0 then
        KSR.sl.sl_send_reply(503, "No Routing Application")
    end
end

-- The application's answer: {"tindex":..,"tlabel":..,"contact":"sip:..."} or {"code":404}.
ANSWER = nil
function ksr_evapi_event(evname)
    if evname == "evapi:connection-new" then
        KSR.evapi.set_tag("router")
    elseif evname == "evapi:message-received" then
        local ok, a = pcall(json.decode, KSR.pv.get("$evapi(msg)"))
        if not ok or type(a) ~= "table" or not a.tindex then
            KSR.err("routing application sent something that is not an answer\n")
            return
        end
        ANSWER = a
        KSR.tmx.t_continue(a.tindex, a.tlabel, "ksr_route_answer")
        ANSWER = nil
    end
end

function ksr_route_answer()
    local a = ANSWER
    if a.contact then
        KSR.hdr.append_to_reply("Contact: <" .. a.contact .. ">\r\n")
        KSR.tm.t_reply(302, "Moved Temporarily")
    else
        KSR.tm.t_reply(tonumber(a.code) or 404, a.reason or "Not Found")
    end
end

-- async_timeout passed with no answer ([sip] async_timeout_route = ksr_route_timeout).
function ksr_route_timeout()
    KSR.tm.t_reply(408, "Routing Timeout")
end
