-- Async routing, Kamailio KEMI dialect: each INVITE is suspended and relayed to a routing
-- application over evapi; its answer resumes the transaction with t_continue, which sends a
-- 302 with the Contact the application chose. The same script runs unchanged in Kamailio 5.6
-- (examples/async-routing/kamailio.cfg: evapi, tm, tmx, sl, pv, app_lua): it encodes and
-- decodes its JSON with the small functions below, since Kamailio's Lua has no JSON library
-- (in evhub alone, the `json` global would do).

-- A JSON string, escaped (Call-IDs and user parts may hold quotes and backslashes).
local function jstr(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c)
        return string.format("\\u%04x", string.byte(c))
    end) .. '"'
end

-- UTF-8 of a code point below 0x10000 (Lua 5.1 has no utf8 library).
local function utf8char(c)
    if c < 0x80 then
        return string.char(c)
    elseif c < 0x800 then
        return string.char(0xC0 + math.floor(c / 64), 0x80 + c % 64)
    end
    return string.char(0xE0 + math.floor(c / 4096), 0x80 + math.floor(c / 64) % 64, 0x80 + c % 64)
end

local unescape = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
    r = "\r", t = "\t"}

-- A field of the application's flat JSON answer: a number, or a string (its escapes decoded;
-- nil for a surrogate pair or a malformed one).
local function jfield(text, name)
    local v = text:match('"' .. name .. '"%s*:%s*(-?%d+)')
    if v then
        return tonumber(v)
    end
    local _, i = text:find('"' .. name .. '"%s*:%s*"')
    if not i then
        return nil
    end
    local out, j = {}, i + 1
    while true do
        local c = text:sub(j, j)
        if c == "" then
            return nil
        elseif c == '"' then
            return table.concat(out)
        elseif c == "\\" then
            local e = text:sub(j + 1, j + 1)
            if e == "u" then
                local cp = tonumber(text:sub(j + 2, j + 5):match("^%x%x%x%x$") or "", 16)
                if not cp or (cp >= 0xD800 and cp < 0xE000) then
                    return nil
                end
                out[#out + 1] = utf8char(cp)
                j = j + 6
            elseif unescape[e] then
                out[#out + 1] = unescape[e]
                j = j + 2
            else
                return nil
            end
        else
            out[#out + 1] = c
            j = j + 1
        end
    end
end

function ksr_request_route()
    local method = KSR.pv.get("$rm")
    if method == "OPTIONS" then
        KSR.sl.sl_send_reply(200, "OK")
        return
    end
    if method == "ACK" then
        -- The ACK of a final reply belongs to its transaction: Kamailio absorbs it here
        -- (evhub before any route runs). An ACK for nothing is dropped.
        KSR.tm.t_check_trans()
        return
    end
    if method ~= "INVITE" then
        KSR.sl.sl_send_reply(405, "Method Not Allowed")
        return
    end
    -- 0: a retransmission, which Kamailio absorbs (evhub never runs the route for one).
    local rc = KSR.tm.t_newtran()
    if rc == 0 then
        return
    elseif rc < 0 then
        KSR.sl.sl_send_reply(500, "Server Error")
        return
    end
    local data = string.format('{"event":"route","tindex":%d,"tlabel":%d,"callid":%s,'
        .. '"caller":%s,"callee":%s}', KSR.pv.get("$T(id_index)"), KSR.pv.get("$T(id_label)"),
        jstr(KSR.pv.get("$ci")), jstr(KSR.pv.get("$fU") or ""), jstr(KSR.pv.get("$rU") or ""))
    -- No routing application connected: evhub says so and the call is answered at once. (From
    -- Kamailio's SIP workers the relay "succeeds" with no client, GH #1700: the transaction
    -- then waits for tm's timers.)
    if KSR.evapi.async_unicast(data, "router") < 0 then
        KSR.tm.t_reply(503, "No Routing Application")
    end
end

-- The application's answer: {"tindex":..,"tlabel":..,"contact":"sip:..."} or {"code":404}.
ANSWER = nil
function ksr_evapi_event(evname)
    if evname == "evapi:connection-new" then
        KSR.evapi.set_tag("router")
    elseif evname == "evapi:message-received" then
        local msg = KSR.pv.get("$evapi(msg)") or ""
        local a = {tindex = jfield(msg, "tindex"), tlabel = jfield(msg, "tlabel"),
            contact = jfield(msg, "contact"), code = jfield(msg, "code"),
            reason = jfield(msg, "reason")}
        if not a.tindex or not a.tlabel then
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
