#!/usr/bin/python3
"""Issue 12, items 7 and 8, end to end: leading zeros in a netstring length; connection ids
the control socket must refuse instead of clamping; what `evhub -t` checks (bind_addr
resolves, max_memory and duplicate keys reported with file:line); an empty multicast tag from
the control socket against KEMI's relay_multicast(data, "")."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Raw, Suite, check, check_eq,  # noqa: E402
                           pump, request, run_once, wait_frames)

suite = Suite("hostile_small")

# "id" answers the connection's id; "relay:X" relays X; anything else is echoed.
SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "id" then
        conn:send(tostring(conn.id))
    elseif msg:sub(1, 6) == "relay:" then
        evapi.relay(msg:sub(7))
    else
        conn:send(msg)
    end
end)
'''

KEMI_SCRIPT = r'''
function ksr_evapi_event(evname)
	if evname == "evapi:message-received" then
		local msg = KSR.pv.get("$evapi(msg)");
		if string.sub(msg, 1, 3) == "mc:" then
			KSR.evapi.relay_multicast(string.sub(msg, 4), "");
		end
	end
end
'''


def code_of(answer):
    return answer.get("error", {}).get("code") if isinstance(answer, dict) else None


def start(script=SCRIPT, **kw):
    h = Hub(script, evapi={"workers": 0, **kw.pop("evapi", {})}, **kw)
    h.start()
    h.wait_log("control socket ")
    return h


def check_conf(conf_text):
    """evhub -t on a config with the echo script: (rc, output)."""
    h = Hub(SCRIPT, conf_text=conf_text)
    return run_once(["-t", "-c", h.conf])


# ---------------------------------------------------------------------------------------------
# Item 7: leading zeros


@suite.case
def leading_zeros_in_the_length_are_accepted():
    h = start()
    c = h.client()
    c.send_raw(b"00000005:hello,")
    wait_frames([c], 1)
    check_eq(c.take(), [b"hello"], "00000005:hello, at max_frame_size = 1m")
    # 20 digits in all is the cap; one more is a protocol error that closes the connection.
    c.send_raw(b"0" * 19 + b"2:hi,")
    wait_frames([c], 1)
    check_eq(c.take(), [b"hi"], "19 zeros and a digit")
    d = h.client(name="d")
    d.send_raw(b"0" * 21 + b"2:hi,")
    pump([d], lambda: d.eof, what="d closed")
    check(any(b"more than 20 digits" in f for f in d.frames), "d's error frame: %r" % d.frames)


@suite.case
def leading_zeros_at_a_small_limit():
    h = start(evapi={"max_frame_size": "1k"})
    c = h.client()
    c.send_raw(b"0001024:" + b"z" * 1024 + b",")
    wait_frames([c], 1)
    check_eq(c.take(), [b"z" * 1024], "0001024: at max_frame_size = 1k")


# ---------------------------------------------------------------------------------------------
# Item 8: connection ids out of range are invalid params, not clamped to 2^63-1


@suite.case
def control_ids_out_of_range_are_invalid_params():
    h = start()
    c = h.client()
    cid = int(request(c, "id"))
    r = Raw(h.ctl_path)
    bad = [2**64 - 1, 2**64, 2**63, 10**30, 0, -1, -2**63, -2**64]
    for n, v in enumerate(bad):
        for method, params in (("close", {"id": v}), ("tag", {"id": v, "tag": "x"}),
                               ("close", [v, "why"])):
            a = r.request(method, n, params)
            check_eq(code_of(a), -32602, "%s with id %d: %r" % (method, v, a))
    # The largest id that fits is a valid id that names no connection.
    a = r.request("close", 100, {"id": 2**63 - 1})
    check_eq(code_of(a), -32001, "close with id 2^63-1: %r" % a)
    check_eq(request(c, "still here"), b"still here", "the client survived every refusal")
    a = r.request("close", 101, {"id": cid})
    check_eq(a.get("result"), {"id": cid, "closed": True}, "close of the real id")
    pump([c], lambda: c.eof, what="the client closed")
    r.close()


# ---------------------------------------------------------------------------------------------
# Item 8: evhub -t


def conf(evapi="", lua=""):
    return ("[evapi]\nbind_addr = 127.0.0.1:0\n%s[lua]\nscript = script.lua\n%s"
            "[control]\nsocket =\n" % (evapi, lua))


@suite.case
def check_resolves_bind_addr():
    rc, out = check_conf(conf().replace("127.0.0.1:0", "999.1.1.1:1"))
    check_eq(rc, 1, "evhub -t with bind_addr 999.1.1.1:1 (output %r)" % out)
    check("bind_addr '999.1.1.1:1' cannot be resolved" in out, "the reason: %r" % out)
    rc, out = check_conf(conf())
    check_eq(rc, 0, "evhub -t with bind_addr 127.0.0.1:0 (output %r)" % out)
    # -b overrides bind_addr and is checked the same way.
    h = Hub(SCRIPT, conf_text=conf())
    rc, out = run_once(["-t", "-c", h.conf, "-b", "999.1.1.1:1"])
    check_eq(rc, 1, "evhub -t -b 999.1.1.1:1 (output %r)" % out)


@suite.case
def check_names_max_memory_with_file_and_line():
    rc, out = check_conf(conf(lua="max_memory = 1k\n"))
    check_eq(rc, 1, "max_memory = 1k (output %r)" % out)
    check("evhub.conf:5: max_memory: '1k' must be 0 (off) or in 262144.." in out,
          "file:line and the key: %r" % out)
    rc, out = check_conf(conf(lua="max_memory = 256k\n"))
    check_eq(rc, 0, "max_memory = 256k loads the script (output %r)" % out)


@suite.case
def check_refuses_a_key_given_twice():
    rc, out = check_conf(conf(evapi="workers = 1\n") + "[evapi]\nworkers = 2\n")
    check_eq(rc, 1, "workers twice (output %r)" % out)
    check("evhub.conf:9: key 'workers' given twice in [evapi] (first at line 3)" in out,
          "file:line of both: %r" % out)


# ---------------------------------------------------------------------------------------------
# Item 8: an empty tag. Documented, not changed: the control socket refuses it (use relay),
# KEMI's relay_multicast(data, "") relays to everyone as Kamailio's does.


@suite.case
def empty_multicast_tag_control_refuses_kemi_relays():
    h = start(KEMI_SCRIPT, evapi={"event_callback": "ksr_evapi_event"})
    a, b = h.client(name="a"), h.client(name="b")
    r = Raw(h.ctl_path)
    check_eq(code_of(r.request("multicast", 1, {"tag": "", "data": "x"})), -32602,
             "control multicast with an empty tag")
    a.send("mc:to-all")
    wait_frames([a, b], 1)
    check_eq([a.take(), b.take()], [[b"to-all"], [b"to-all"]], "KEMI relay_multicast(d, \"\")")
    r.close()


if __name__ == "__main__":
    suite.run()
