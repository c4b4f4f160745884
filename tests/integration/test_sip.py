#!/usr/bin/python3
"""The SIP listener end to end: sipp calls through the async round trip (INVITE suspended,
relayed to the routing application, resumed by t_continue, 302), with and without workers;
no application (503 at once); an application that never answers (the timeout route, nothing
left suspended); and, with a raw UDP peer, retransmissions absorbed while suspended, the final
response retransmitted until the ACK, CANCEL (200 + 487, the late answer refused), malformed
datagrams counted and dropped, non-INVITE requests, the native dialect."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Suite, check, check_eq, scaled, wait_for,  # noqa: E402
                           wait_frames)
from sip_peer import SipPeer  # noqa: E402

suite = Suite("sip")
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("EVHUB_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
EXAMPLE = os.path.join(SRC, "examples", "async-routing")
APP = os.path.join(EXAMPLE, "app.py")
SIPP = shutil.which("sipp")


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(script=None, workers=0, timeout_ms=2000, route="ksr_route_timeout", kemi=True):
    port = free_udp_port()
    if script is None:
        script = open(os.path.join(EXAMPLE, "kemi.lua" if kemi else "native.lua")).read()
    text = script
    sip = "[sip]\nlisten = udp:127.0.0.1:%d\nasync_timeout = %d\n" % (port, timeout_ms)
    if route:
        sip += "async_timeout_route = %s\n" % route
    ev = {"workers": workers}
    if kemi:
        ev["event_callback"] = "ksr_evapi_event"
    h = Hub(text, evapi=ev, extra=sip)
    h.start()
    h.wait_log("sip: receiving on udp:127.0.0.1:%d" % port)
    h.sip_port = port
    return h


def stats(h):
    return h.ctl_json("stats")


def app(h, *args):
    p = subprocess.Popen([sys.executable, APP, "%s:%d" % h.addr] + list(args),
                         stdout=subprocess.PIPE, text=True)
    check_eq(p.stdout.readline().strip().split()[:2], ["app:", "connected"], "the app connected")
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection seen")
    return p


def sipp(h, scenario, calls, rate=50, extra=()):
    """Run sipp as UAC; returns (successful, failed, log text)."""
    check(SIPP is not None, "sipp (Debian sip-tester) is installed")
    d = tempfile.mkdtemp(prefix="evhub-sipp-")
    log = os.path.join(d, "sipp.log")
    cmd = [SIPP, "-sf", os.path.join(HERE, "sip", scenario), "127.0.0.1:%d" % h.sip_port,
           "-s", "100", "-m", str(calls), "-r", str(rate), "-i", "127.0.0.1", "-p",
           str(free_udp_port()), "-nostdin", "-timeout", str(scaled(30, 120)), "-trace_logs",
           "-log_file", log, "-trace_stat", "-stf", os.path.join(d, "stat.csv")] + list(extra)
    r = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=scaled(60, 300))
    out = r.stdout + r.stderr
    ok = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    bad = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    text = open(log).read() if os.path.exists(log) else ""
    shutil.rmtree(d, ignore_errors=True)
    check(ok and bad, "sipp printed its summary: %s" % out[-2000:])
    return int(ok.group(1)), int(bad.group(1)), text


def calls(workers, kemi=True):
    h = start(workers=workers, kemi=kemi, route="ksr_route_timeout" if kemi else None)
    a = app(h)
    n = scaled(100, 20)
    ok, bad, log = sipp(h, "uac_302.xml", n)
    check_eq((ok, bad), (n, 0), "calls through the async round trip")
    contacts = re.findall(r"contact Contact: <([^>]*)>", log)
    check_eq(len(contacts), n, "each 302 carries a Contact")
    check(all(c == "sip:100@10.0.0.101:5060" for c in contacts), "the app's Contact: %r"
          % contacts[:3])
    st = stats(h)
    check_eq(st["sip_suspended"], 0, "nothing left suspended")
    check_eq(st["sip_requests"], n, "requests")
    a.kill()
    h.stop()


@suite.case
def kemi_async_round_trip_workers0():
    calls(0)


@suite.case
def kemi_async_round_trip_workers2():
    calls(2)


@suite.case
def native_async_round_trip_workers0():
    calls(0, kemi=False)


@suite.case
def native_async_round_trip_workers2():
    calls(2, kemi=False)


@suite.case
def native_no_application_and_silent_application():
    h = start(kemi=False, route=None, timeout_ms=300)
    ok, bad, _ = sipp(h, "uac_503.xml", 3)
    check_eq((ok, bad), (3, 0), "no application: 503 from the handler")
    a = app(h, "--silent")
    ok, bad, _ = sipp(h, "uac_408.xml", 3, rate=20)
    check_eq((ok, bad), (3, 0), "the handler's 408 after evapi.async_unicast's timeout")
    st = stats(h)
    check_eq((st["sip_suspended"], st["sip_async_timeouts"]), (0, 3), "timeouts, none left")
    a.kill()
    h.stop()


@suite.case
def no_application_gets_503_at_once():
    h = start()
    n = scaled(20, 5)
    ok, bad, _ = sipp(h, "uac_503.xml", n)
    check_eq((ok, bad), (n, 0), "every call got 503")
    st = stats(h)
    check_eq((st["sip_suspended"], st["sip_async_timeouts"]), (0, 0), "nothing suspended")
    h.stop()


@suite.case
def an_application_that_never_answers_gets_the_timeout_route():
    h = start(timeout_ms=300)
    a = app(h, "--silent")
    n = scaled(10, 4)
    ok, bad, _ = sipp(h, "uac_408.xml", n, rate=20)
    check_eq((ok, bad), (n, 0), "every call got the timeout route's 408")
    st = stats(h)
    check_eq((st["sip_suspended"], st["sip_async_timeouts"]), (0, n), "timeouts, none left")
    a.kill()
    # without a timeout route: 408 too
    h.stop()
    h = start(timeout_ms=300, route=None)
    a = app(h, "--silent")
    ok, bad, _ = sipp(h, "uac_408.xml", 2, rate=20)
    check_eq((ok, bad), (2, 0), "the default 408")
    a.kill()
    h.stop()


# ---- a raw UDP peer ----

class RawApp:
    """An application on a plain TCP connection: the requests it got, and answers on demand."""

    def __init__(self, h):
        self.c = h.client(name="app")

    def wait(self, n):
        wait_frames([self.c], n)
        return [json.loads(f) for f in self.c.frames]

    def answer(self, req, **kw):
        a = {"tindex": req["tindex"], "tlabel": req["tlabel"]}
        a.update(kw)
        body = json.dumps(a).encode()
        self.c.send_now(b"%d:%s," % (len(body), body))


@suite.case
def a_retransmitted_invite_reaches_the_app_once_and_the_final_response_repeats_until_ack():
    h = start(timeout_ms=scaled(5000, 20000))
    a = RawApp(h)
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
    p = SipPeer(h)
    inv, branch, callid = p.request("INVITE")
    p.send(inv)
    check("Trying" in p.expect(100), "100 Trying for the suspended INVITE")
    p.send(inv)  # a retransmission while suspended: answered with the 100 again
    check("Trying" in p.expect(100), "the retransmission re-answered")
    reqs = a.wait(1)
    time.sleep(0.2)
    check_eq(len(a.c.frames), 1, "the application got the INVITE once")
    check_eq(stats(h)["sip_retransmissions_absorbed"], 1, "one retransmission absorbed")
    a.answer(reqs[0], contact="sip:100@10.9.9.9")
    first = p.expect(302)
    check("Contact: <sip:100@10.9.9.9>" in first, "the Contact: %s" % first)
    via = re.search(r"^Via: (.*)$", first, re.M).group(1)
    check("rport=%d" % p.port in via, "the Via's rport filled: %s" % via)
    copies = p.recv_all(scaled(1.8, 4))
    check(len([c for c, _ in copies if c == 302]) >= 2,
          "302 retransmitted (timer G) until the ACK: %r" % [c for c, _ in copies])
    p.send(p.ack(first, branch, callid))
    time.sleep(0.1)
    p.recv_all(0.1)
    check_eq(p.recv_all(scaled(2.5, 5)), [], "nothing after the ACK")
    st = stats(h)
    check(st["sip_responses_retransmitted"] >= 3, "retransmissions counted: %r" % st)
    h.stop()


@suite.case
def cancel_answers_200_and_487_and_the_late_answer_is_refused():
    h = start(timeout_ms=scaled(5000, 20000))
    a = RawApp(h)
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
    p = SipPeer(h)
    inv, branch, callid = p.request("INVITE")
    p.send(inv)
    p.expect(100)
    reqs = a.wait(1)
    cancel = inv.replace("INVITE sip:", "CANCEL sip:", 1).replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL")
    p.send(cancel)
    got = p.recv_all(scaled(1, 3))
    codes = sorted(set(c for c, _ in got))
    check_eq(codes, [200, 487], "200 for the CANCEL, 487 for the INVITE")
    cseqs = {c: re.search(r"^CSeq: (.*)$", t, re.M).group(1).strip() for c, t in got}
    check_eq((cseqs[200], cseqs[487]), ("1 CANCEL", "1 INVITE"), "each to its request")
    a.answer(reqs[0], contact="sip:late@10.0.0.1")
    h.wait_log("the transaction was cancelled")
    check_eq([c for c, _ in p.recv_all(0.3) if c == 302], [], "no 302 after the CANCEL")
    st = stats(h)
    check_eq((st["sip_cancels"], st["sip_suspended"]), (1, 0), "counted, nothing suspended")
    # a CANCEL for nothing: 481
    c2, _, _ = p.request("CANCEL")
    p.send(c2)
    p.expect(481)
    h.stop()


@suite.case
def an_answer_after_the_deadline_is_refused():
    h = start(timeout_ms=300, route=None)
    a = RawApp(h)
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
    p = SipPeer(h)
    inv, _, _ = p.request("INVITE")
    p.send(inv)
    reqs = a.wait(1)
    p.expect(408)
    a.answer(reqs[0], contact="sip:late@10.0.0.1")
    h.wait_log("the transaction expired (async_timeout)")
    check_eq([c for c, _ in p.recv_all(0.3) if c == 302], [], "no 302 after the 408")
    h.stop()


RAISE = r'''
evapi.on("message", function(conn, msg) end)
evapi.subscribe("sip.message", "evapi:watch")
evapi.on("request", function(req)
    evapi.raise("sip.message", {from = req.from_user, body = req.body})
    req:reply(202, "Accepted")
end)
'''


@suite.case
def a_message_request_raises_an_event():
    h = start(script=RAISE, kemi=False, route=None)
    w = h.client(name="watch")
    w.send(b"x")  # any frame; the tag is set below
    h.ctl("tag", "1", "watch")
    p = SipPeer(h)
    m, _, _ = p.request("MESSAGE", extra="Content-Type: text/plain\r\n")
    m = m.replace("Content-Length: 0\r\n\r\n", "Content-Length: 5\r\n\r\nhello")
    p.send(m)
    p.expect(202)
    wait_frames([w], 1)
    ev = json.loads(w.frames[-1])
    check_eq((ev["method"], ev["params"]["from"], ev["params"]["body"]),
             ("sip.message", "alice", "hello"), "the event")
    h.stop()


@suite.case
def malformed_datagrams_are_counted_and_dropped():
    h = start()
    p = SipPeer(h)
    corpus = [b"\x00\x01\x02garbage", b"INVITE\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n",
              b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4\r\n\r\n",  # no Call-ID, CSeq
              b"A" * 3000, b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: zz\r\n\r\n",
              b"\r\n\r\n" * 2]
    for d in corpus:
        p.send(d)
    opts, _, _ = p.request("OPTIONS")
    p.send(opts)
    p.expect(200)
    st = stats(h)
    check(st["sip_malformed_dropped"] >= 5, "malformed counted: %d" % st["sip_malformed_dropped"])
    check_eq(st["sip_requests"], 1, "only the OPTIONS made a transaction")
    check(h.alive(), "the hub goes on")
    # a retransmitted OPTIONS is answered again with the same 200, not routed again
    p.send(opts)
    again = p.expect(200)
    check("200 OK" in again, "re-answered")
    check_eq(stats(h)["sip_requests"], 1, "not a new request")
    h.stop()


NATIVE = r'''
evapi.on("message", function(conn, msg) end)
evapi.on("request", function(req)
    if req.method == "OPTIONS" then
        req:reply(200, "OK", "X-Callee: " .. tostring(req.ruser) .. "\r\n")
    else
        req:reply(403, "Forbidden")
    end
end)
'''


@suite.case
def native_request_handler():
    h = start(script=NATIVE, kemi=False, route=None)
    p = SipPeer(h)
    m, _, _ = p.request("OPTIONS", ruser="555")
    p.send(m)
    r = p.expect(200)
    check("X-Callee: 555" in r, "the handler's header: %s" % r)
    m, _, _ = p.request("MESSAGE")
    p.send(m)
    p.expect(403)
    h.stop()


# ---- what a hostile review found (each failed before its fix) ----

WAITER = r"""
evapi.on("message", function(conn, msg) end)
evapi.on("request", function(req)
    local a, err = evapi.async_relay({callid = req.callid}, {timeout = %d})
    log.notice("handler resumed: " .. tostring(a and "answer" or err))
    req:reply(a and 200 or 480, a and "OK" or "Gone")
end)
"""


def native_waiter(timeout_ms, **kw):
    h = start(script=WAITER % timeout_ms, kemi=False, route=None, **kw)
    c = h.client(name="app")
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
    return h, c


def answer_frame(c, frame, **kw):
    a = {"evhub_id": json.loads(frame)["evhub_id"]}
    a.update(kw)
    body = json.dumps(a).encode()
    c.send_now(b"%d:%s," % (len(body), body))


@suite.case
def an_answer_too_large_for_max_memory_fails_the_call_not_the_hub():
    port = free_udp_port()
    h = Hub(WAITER % 5000, evapi={"workers": 0, "max_frame_size": "4m"},
            lua={"max_memory": "2m"}, extra="[sip]\nlisten = udp:127.0.0.1:%d\n" % port)
    h.start()
    h.wait_log("sip: receiving on")
    h.sip_port = port
    c = h.client(name="app")
    wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
    p = SipPeer(h)
    inv, _, _ = p.request("INVITE")
    p.send(inv)
    p.expect(100)
    wait_frames([c], 1)
    answer_frame(c, c.frames[0], pad="x" * 3000000)
    p.expect(500, scaled(5, 20))
    check(h.alive(), "the hub goes on")
    h.stop()


@suite.case
def cancel_wakes_a_native_waiter():
    h, c = native_waiter(5000)
    p = SipPeer(h)
    inv, _, _ = p.request("INVITE")
    p.send(inv)
    p.expect(100)
    wait_frames([c], 1)
    p.send(inv.replace("INVITE sip:", "CANCEL sip:", 1).replace("CSeq: 1 INVITE",
                                                                "CSeq: 1 CANCEL"))
    p.expect(487)
    h.wait_log("handler resumed: cancelled")
    h.stop()


@suite.case
def a_waiter_lost_in_a_reload_still_gets_an_answer():
    h, c = native_waiter(300)
    p = SipPeer(h)
    inv, _, _ = p.request("INVITE")
    p.send(inv)
    p.expect(100)
    wait_frames([c], 1)
    h.ctl("reload")
    h.wait_log("reload")
    # the timeout wakes a coroutine the reload took away: the module answers after its grace
    p.expect(500, scaled(5, 20))
    check_eq(stats(h)["sip_transactions"] >= 1, True, "the transaction lives on its timers")
    h.stop()


@suite.case
def a_retransmitted_invite_after_a_2xx_is_absorbed():
    h = start(script=NATIVE.replace("403, \"Forbidden\"", "200, \"OK\""), kemi=False, route=None)
    p = SipPeer(h)
    inv, _, _ = p.request("INVITE")
    p.send(inv)
    p.expect(200)
    p.send(inv)
    p.expect(200)
    st = stats(h)
    check_eq((st["sip_requests"], st["sip_retransmissions_absorbed"]), (1, 1),
             "one request, one retransmission absorbed")
    h.stop()


@suite.case
def header_and_reason_injection_is_refused():
    script = r"""
evapi.on("message", function(conn, msg) end)
evapi.on("request", function(req)
    local ok1, e1 = req:reply(404, "Nope\r\nContact: <sip:evil@6.6.6.6>")
    local ok2, e2 = req:reply(404, "Nope", "X-A: 1\r\n\r\nContact: <sip:evil@6.6.6.6>\r\n")
    local ok3, e3 = req:reply(404, "Nope", "Content-Length: 99\r\n")
    log.notice("refused: " .. tostring(e1) .. " | " .. tostring(e2) .. " | " .. tostring(e3))
    req:reply(404, "Not Found", "X-Ok: yes\r\n")
end)
"""
    h = start(script=script, kemi=False, route=None)
    p = SipPeer(h)
    m, _, _ = p.request("OPTIONS")
    p.send(m)
    r = p.expect(404)
    check("evil" not in r and "X-Ok: yes" in r, "only the clean reply: %s" % r)
    h.wait_log("refused: ")
    log = h.log()
    check("must not contain CR or LF" in log and "blank line" in log and
          "Content-Length is evhub's" in log, "each refusal says why: %s" % log[-600:])
    h.stop()


@suite.case
def the_deadline_before_the_route_returns_gets_the_timeout_route():
    # A route that still works after suspending, a deadline shorter than that work: the
    # timeout route answers (408), not the first route's end (500), with workers as without.
    src = open(os.path.join(EXAMPLE, "kemi.lua")).read().replace(
        """        KSR.tm.t_reply(503, "No Routing Application")
    end""", """        KSR.tm.t_reply(503, "No Routing Application")
    end
    local t = os.time() while os.time() - t < 1 do end""")
    check("while os.time()" in src, "the example's 503 line was found and the busy loop added")
    for w in (0, 2):
        h = start(script=src, workers=w, timeout_ms=10)
        a = RawApp(h)
        wait_for(lambda: stats(h)["clients"], lambda n: n >= 1, "the app's connection")
        p = SipPeer(h)
        inv, _, _ = p.request("INVITE")
        p.send(inv)
        got = [c for c, _ in p.recv_all(scaled(2.5, 8)) if c >= 200]
        check_eq(sorted(set(got)), [408], "workers=%d: the timeout route's reply (repeated: no ACK)" % w)
        check_eq(stats(h)["sip_no_reply"], 0, "no 500")
        del a
        h.stop()


if __name__ == "__main__":
    suite.run()
