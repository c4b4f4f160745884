-- Kamailio evapi KEMI script (Lua), written for Kamailio 5.6:
--   loadmodule "evapi.so"
--   modparam("evapi", "event_callback", "ksr_evapi_event")
--   modparam("app_lua", "load", "evapi.lua")
--   cfgengine "lua"
-- tests/integration/test_kamailio_compat.py runs this very file, unchanged, under Kamailio and
-- under evhub ([evapi] event_callback = ksr_evapi_event) and compares what the clients get.
--
-- Every connection is tagged "<srcaddr>:<srcport>" when it arrives, so the script can answer
-- the sender of a message with KSR.evapi.relay_unicast(data, <srcaddr>:<srcport>). Clients send
-- one command per netstring:
--
--   join GROUP        re-tag this connection as GROUP; the group is told "member ... joined"
--   tag NAME          re-tag this connection as NAME; "rc tag N" goes to the tag it now has
--   retag NAME        re-tag as NAME, then unicast and multicast to NAME at once; the codes
--                     of both go to NAME as "rc retag set_tag=N unicast=N multicast=N"
--   relay DATA        DATA to every connection (the sender too)           -> "rc relay N"
--   sync TOKEN        TOKEN to every connection (the sender too), nothing else: the test's
--                     barrier, so that TOKEN is the last frame a step causes at every client
--   mc TAG DATA       DATA to every connection tagged TAG                 -> "rc mc N"
--   uc TAG DATA       DATA to the first connection tagged TAG             -> "rc uc N"
--   echo DATA         DATA back to the sender
--   big N             N bytes ("0123456789" repeated) back to the sender
--   pv                the $evapi(...) variables back to the sender
--   exit              "rc exit" back, then KSR.x.exit() (nothing after it runs)
--   bye               "goodbye" back, then KSR.evapi.close(); "monitor" is told the codes
--   anything else     "unknown <message>" back
--
-- Connections from anything but 127.0.0.1 are refused in evapi:connection-new (the evapi
-- documentation's ACL example). The "monitor" group hears about every connection and close.

-- SIP requests (Kamailio requires this function with cfgengine "lua"). No SIP traffic is sent
-- to the test instance; evhub has no SIP listener and never calls it.
function ksr_request_route()
	KSR.info("===== SIP request " .. KSR.pv.get("$rm") .. " from " .. KSR.pv.get("$si") .. "\n");
	KSR.evapi.relay_multicast("sip " .. KSR.pv.get("$rm"), "monitor");
	KSR.x.exit();
end

-- the unique tag of the connection of the current evapi event
local function evapi_tag()
	return KSR.pv.get("$evapi(srcaddr)") .. ":" .. KSR.pv.get("$evapi(srcport)");
end

-- send data to the connection of the current evapi event
local function evapi_reply(data)
	return KSR.evapi.relay_unicast(data, evapi_tag());
end

local function evapi_connection_new()
	local srcaddr = KSR.pv.get("$evapi(srcaddr)");
	local srcport = KSR.pv.get("$evapi(srcport)");
	local conidx = KSR.pv.get("$evapi(conidx)");
	if srcaddr ~= "127.0.0.1" then
		KSR.warn("===== evapi: refusing connection from " .. srcaddr .. "\n");
		local rc = KSR.evapi.close();
		KSR.evapi.relay_multicast("refused " .. srcaddr .. " conidx=" .. conidx
			.. " close=" .. rc, "monitor");
		return 1;
	end
	local tag = srcaddr .. ":" .. srcport;
	local rc = KSR.evapi.set_tag(tag);
	KSR.info("===== evapi: new connection " .. tag .. " conidx=" .. conidx .. "\n");
	KSR.evapi.relay_unicast("welcome " .. tag .. " conidx=" .. conidx .. " set_tag=" .. rc
		.. " msg=" .. tostring(KSR.pv.get("$evapi(msg)"))
		.. " types=" .. type(srcport) .. "," .. type(conidx), tag);
	KSR.evapi.relay_multicast("joined " .. tag .. " conidx=" .. conidx, "monitor");
	return 1;
end

local function evapi_connection_closed()
	local tag = evapi_tag();
	KSR.info("===== evapi: connection closed " .. tag .. "\n");
	KSR.evapi.relay_multicast("left " .. tag .. " conidx=" .. KSR.pv.get("$evapi(conidx)")
		.. " msg=" .. tostring(KSR.pv.get("$evapi(msg)")), "monitor");
	return 1;
end

local function evapi_message_received()
	local msg = KSR.pv.get("$evapi(msg)");
	local cmd, arg = string.match(msg, "^(%S+)%s?(.*)$");
	local rc;

	if cmd == "join" then
		rc = KSR.evapi.set_tag(arg);
		if rc == 1 then
			KSR.evapi.relay_multicast("member " .. evapi_tag() .. " joined " .. arg, arg);
		else
			evapi_reply("rc join " .. rc);
		end
	elseif cmd == "tag" then
		rc = KSR.evapi.set_tag(arg);
		if rc == 1 then
			KSR.evapi.relay_unicast("rc tag " .. rc, arg);
		else
			evapi_reply("rc tag " .. rc);
		end
	elseif cmd == "retag" then
		-- the return codes of a unicast and a multicast to the tag set just before
		rc = KSR.evapi.set_tag(arg);
		local urc = KSR.evapi.relay_unicast("retagged", arg);
		local mrc = KSR.evapi.relay_multicast("retagged too", arg);
		KSR.evapi.relay_unicast("rc retag set_tag=" .. rc .. " unicast=" .. urc
			.. " multicast=" .. mrc, arg);
	elseif cmd == "relay" then
		rc = KSR.evapi.relay(arg);
		evapi_reply("rc relay " .. rc);
	elseif cmd == "sync" then
		-- no reply: one with the return code would come after TOKEN, and only if the
		-- sender still has its own tag (see Run.sync in test_kamailio_compat.py)
		KSR.evapi.relay(arg);
	elseif cmd == "mc" or cmd == "uc" then
		local tag, data = string.match(arg, "^(%S+) (.*)$");
		if cmd == "mc" then
			rc = KSR.evapi.relay_multicast(data, tag);
		else
			rc = KSR.evapi.relay_unicast(data, tag);
		end
		evapi_reply("rc " .. cmd .. " " .. rc);
	elseif cmd == "echo" then
		evapi_reply(arg);
	elseif cmd == "big" then
		local n = tonumber(arg);
		local s = string.rep("0123456789", math.floor(n / 10) + 1);
		evapi_reply(string.sub(s, 1, n));
	elseif cmd == "pv" then
		evapi_reply("pv srcaddr=" .. KSR.pv.get("$evapi(srcaddr)")
			.. " srcport=" .. KSR.pv.get("$evapi(srcport)")
			.. " conidx=" .. KSR.pv.get("$evapi(conidx)")
			.. " msg=" .. KSR.pv.get("$evapi(msg)")
			.. " other=" .. tostring(KSR.pv.get("$evapi(foo)")));
	elseif cmd == "exit" then
		evapi_reply("rc exit");
		KSR.x.exit();
		evapi_reply("not reached");
	elseif cmd == "bye" then
		local tag = evapi_tag();
		evapi_reply("goodbye");
		rc = KSR.evapi.close();
		local after = KSR.evapi.relay_unicast("after close", tag);
		KSR.info("===== evapi: closed " .. tag .. " rc=" .. rc .. "\n");
		KSR.evapi.relay_multicast("closed " .. tag .. " close=" .. rc .. " unicast=" .. after,
			"monitor");
	else
		evapi_reply("unknown " .. msg);
	end
	return 1;
end

-- evapi event callback: evname is evapi:connection-new, evapi:connection-closed or
-- evapi:message-received
function ksr_evapi_event(evname)
	KSR.dbg("===== evapi event: " .. evname .. "\n");
	if evname == "evapi:connection-new" then
		return evapi_connection_new();
	elseif evname == "evapi:connection-closed" then
		return evapi_connection_closed();
	elseif evname == "evapi:message-received" then
		return evapi_message_received();
	end
	return 1;
end
