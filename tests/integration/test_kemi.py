#!/usr/bin/python3
"""KEMI dialect: a Lua script written exactly as for Kamailio's evapi module (event_callback =
ksr_evapi_event, KSR.pv.get("$evapi(...)"), KSR.evapi.*, KSR.info, KSR.x.exit) runs unchanged."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Suite, check, check_eq, pump, request, wait_eof,  # noqa: E402
                           wait_frames)

suite = Suite("kemi")

# Kamailio style: tabs, semicolons, KSR.info with "\n", set_tag in connection-new, branching
# on evname, and a request route that evhub never calls (it has no SIP here).
KAMAILIO_SCRIPT = r'''
-- Kamailio evapi KEMI script (modparam("evapi", "event_callback", "ksr_evapi_event"))

-- SIP request routing: not used by evapi events
function ksr_request_route()
	KSR.info("===== request - from kamailio lua script\n");
	KSR.x.exit();
end

local function mytag()
	return "c" .. KSR.pv.get("$evapi(srcport)");
end

-- evapi event callback
function ksr_evapi_event(evname)
	KSR.info("===== evapi module triggered event: " .. evname .. "\n");
	if evname == "evapi:connection-new" then
		local srcaddr = KSR.pv.get("$evapi(srcaddr)");
		local srcport = KSR.pv.get("$evapi(srcport)");
		local conidx = KSR.pv.get("$evapi(conidx)");
		if srcaddr ~= "127.0.0.1" and srcaddr ~= "::1" then
			KSR.evapi.close();
			return 1;
		end
		local rc = KSR.evapi.set_tag("c" .. srcport);
		KSR.evapi.relay_unicast("welcome " .. srcaddr .. " " .. srcport .. " " .. conidx
			.. " " .. rc, "c" .. srcport);
	elseif evname == "evapi:connection-closed" then
		KSR.info("===== evapi connection closed: " .. KSR.pv.get("$evapi(srcport)") .. "\n");
		KSR.evapi.relay_multicast("closed " .. KSR.pv.get("$evapi(srcport)"), "watch");
	elseif evname == "evapi:message-received" then
		local msg = KSR.pv.get("$evapi(msg)");
		KSR.dbg("===== evapi message: " .. msg .. "\n");
		if msg == "ping" then
			KSR.evapi.relay_unicast("pong", mytag());
		elseif msg == "types" then
			local p = KSR.pv.get("$evapi(srcport)");
			local i = KSR.pv.get("$evapi(conidx)");
			KSR.evapi.relay_unicast(math.type(p) .. " " .. math.type(i) .. " " .. type(msg),
				mytag());
		elseif string.sub(msg, 1, 4) == "all:" then
			local t = mytag();
			local rc = KSR.evapi.relay(string.sub(msg, 5));
			KSR.evapi.relay_unicast("rc relay " .. rc, t);
		elseif string.sub(msg, 1, 3) == "mc:" or string.sub(msg, 1, 3) == "uc:" then
			local t = mytag();
			local tag, data = string.match(string.sub(msg, 4), "^([^:]*):(.*)$");
			local rc;
			if string.sub(msg, 1, 3) == "mc:" then
				rc = KSR.evapi.relay_multicast(data, tag);
			else
				rc = KSR.evapi.relay_unicast(data, tag);
			end
			KSR.evapi.relay_unicast("rc " .. string.sub(msg, 1, 2) .. " " .. rc, t);
		elseif string.sub(msg, 1, 5) == "join:" then
			local g = string.sub(msg, 6);
			local rc = KSR.evapi.set_tag(g);
			KSR.evapi.relay_multicast("joined " .. rc, g);
		elseif msg == "quit" then
			local rc = KSR.evapi.close();
			KSR.info("===== close rc=" .. rc .. "\n");
		elseif msg == "exit" then
			KSR.evapi.relay_unicast("before", mytag());
			KSR.x.exit();
			KSR.evapi.relay_unicast("after", mytag());
		elseif msg == "err" then
			KSR.err("===== an error line from the script\n");
			KSR.evapi.relay_unicast("logged", mytag());
		else
			KSR.evapi.relay_unicast("unknown " .. msg, mytag());
		end
	end
	return 1;
end
'''


def start(workers):
    h = Hub(KAMAILIO_SCRIPT, evapi={"event_callback": "ksr_evapi_event", "workers": workers})
    return h.start()


def connect(h, name):
    c = h.client(name=name)
    wait_frames([c], 1)
    w = c.take()[0].split(b" ")
    check_eq(w[0], b"welcome", "first frame")
    check_eq(w[1], b"127.0.0.1", "$evapi(srcaddr)")
    check_eq(w[2], str(c.port).encode(), "$evapi(srcport)")
    check(w[3].isdigit(), "$evapi(conidx) is an integer: %r" % w[3])
    check_eq(w[4], b"1", "KSR.evapi.set_tag return code")
    return c, int(w[3])


def kemi_script_runs_unchanged(workers):
    h = start(workers)
    a, ia = connect(h, "a")
    b, ib = connect(h, "b")
    check(ia != ib, "distinct conidx for live connections: %d %d" % (ia, ib))
    check_eq(request(a, "ping", others=[b]), b"pong", "reply through the connection's own tag")
    check_eq(request(a, "types", others=[b]), b"integer integer string", "PV types")
    a.send("all:hello")
    wait_frames([a, b], [2, 1])
    check_eq(a.take(), [b"hello", b"rc relay 1"], "relay reaches the sender, returns 1")
    check_eq(b.take(), [b"hello"], "relay reaches the other client")
    check_eq(request(b, "mc:c%d:to-a" % a.port, others=[a]), b"rc mc 1", "relay_multicast rc")
    wait_frames([a], 1)
    check_eq(a.take(), [b"to-a"], "multicast by tag")
    check_eq(request(b, "uc:c%d:uni" % a.port, others=[a]), b"rc uc 1", "relay_unicast rc")
    wait_frames([a], 1)
    check_eq(a.take(), [b"uni"], "unicast by tag")
    check_eq(request(b, "mc:nobody:x", others=[a]), b"rc mc -1", "multicast to nobody")
    check_eq(request(b, "uc:nobody:x", others=[a]), b"rc uc -1", "unicast to nobody")
    check_eq(request(a, "exit", others=[b]), b"before", "KSR.x.exit stops the callback")
    check_eq(request(a, "ping", others=[b]), b"pong", "served after KSR.x.exit")
    check_eq(request(a, "err", others=[b]), b"logged", "KSR.err")
    check(not any(c.frames for c in (a, b)), "stray frames: %r %r" % (a.frames, b.frames))
    # Watchers: a group joined by two clients; the close event names the closing port.
    w1, _ = connect(h, "w1")
    w2, _ = connect(h, "w2")
    w1.send("join:watch")
    wait_frames([w1], 1)
    check_eq(w1.take(), [b"joined 1"], "set_tag from message-received")
    w2.send("join:watch")
    wait_frames([w1, w2], 1)
    check_eq([w1.take(), w2.take()], [[b"joined 1"], [b"joined 1"]], "multicast to the group")
    b.close()
    wait_frames([w1, w2], 1)
    check_eq([w1.take(), w2.take()], [[b"closed %d" % b.port]] * 2,
             "connection-closed sees $evapi(srcport)")
    a.send("quit")
    wait_eof([a], others=[w1, w2])
    # As Kamailio: no connection-closed for a connection the script closed itself. The next
    # close event seen by w1 must be w2's, with nothing about a before it.
    w2.close()
    wait_frames([w1], 1)
    check_eq(w1.take(), [b"closed %d" % w2.port], "no connection-closed after KSR.evapi.close")
    h.wait_log("close rc=0")
    log = h.log()
    for ev in ("connection-new", "message-received", "connection-closed"):
        check(re.search(r"info: ===== evapi module triggered event: evapi:" + ev, log),
              "KSR.info line for %s in the log" % ev)
    check(re.search(r"err: ===== an error line from the script", log), "KSR.err at level err")
    check("===== request" not in log, "ksr_request_route was called")
    check("stack traceback" not in log, "a script error was logged:\n%s" % log)
    check("===== evapi message:" not in log, "KSR.dbg printed at level info")


suite.case_with("kamailio_script_workers1", kemi_script_runs_unchanged, 1)
suite.case_with("kamailio_script_workers0", kemi_script_runs_unchanged, 0)
suite.case_with("kamailio_script_workers4", kemi_script_runs_unchanged, 4)


@suite.case
def conidx_is_reused_after_close():
    h = Hub(KAMAILIO_SCRIPT, evapi={"event_callback": "ksr_evapi_event", "max_clients": 2})
    h.start()
    a, ia = connect(h, "a")
    b, ib = connect(h, "b")
    check_eq(sorted([ia, ib]), [0, 1], "conidx are slot indexes 0..max_clients-1")
    a.close()
    c = None
    for i in range(200):  # until the hub has freed a's slot
        c = h.client(name="c%d" % i)
        pump([c, b], lambda: c.frames or c.eof, what="welcome or refusal")
        if c.frames and c.frames[0].startswith(b"welcome"):
            break
    w = c.frames[0].split(b" ")
    check_eq(int(w[3]), ia, "the freed conidx is reused")


@suite.case
def runtime_error_in_kemi_callback():
    script = KAMAILIO_SCRIPT.replace('if msg == "ping" then',
                                     'if msg == "boom" then\n\t\t\tlocal x = nil .. "x";\n'
                                     '\t\telseif msg == "ping" then')
    h = Hub(script, evapi={"event_callback": "ksr_evapi_event"}).start()
    a, _ = connect(h, "a")
    a.send("boom")
    check_eq(request(a, "ping"), b"pong", "served after a script error")
    h.wait_log("stack traceback")
    check("lua:" in h.log(), "the error is logged with 'lua:'")


suite.run()
