#!/usr/bin/python3
"""kafka: sockets with key=callid, fed by SIP: a MESSAGE request's route raises an event; the
record in the mock cluster (librdkafka's mock, its own process) is keyed with the request's
Call-ID, from the loop (workers = 0) and from a worker (workers = 2), from a native handler and
from a KEMI route; a raise outside a request route has no key."""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import Hub, Suite, check_eq, request  # noqa: E402
from test_kafka import Mock, consume, stop_mocks  # noqa: E402
from test_sip import free_udp_port  # noqa: E402

suite = Suite("kafka_sip")

NATIVE = r'''
evapi.on("message", function(conn, msg) evapi.raise("E_PLAIN", {msg = msg}) conn:send("ok") end)
evapi.on("request", function(req)
    evapi.raise("E_MSG", {from = req.from_user, body = req.body})
    req:reply(202, "Accepted")
end)
'''

KEMI = r'''
function ksr_evapi_event(evname) end
function ksr_request_route()
    evapi.raise("E_MSG", {from = KSR.pv.get("$fU"), body = KSR.pv.get("$rb")})
    KSR.sl.sl_send_reply(202, "Accepted")
end
'''


def message(port, callid, body):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    me = s.getsockname()[1]
    m = ("MESSAGE sip:bob@127.0.0.1:%d SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-%s\r\n"
         "From: <sip:alice@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: %s\r\n"
         "CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
         % (port, me, callid, callid, len(body), body))
    s.sendto(m.encode(), ("127.0.0.1", port))
    s.settimeout(10)
    data = s.recv(65536).decode()
    s.close()
    return int(data.split()[1])


def case(workers, kemi):
    m = Mock("msgs")
    try:
        port = free_udp_port()
        extra = ("[events]\nsubscribe = E_MSG kafka:%s/msgs?g.linger.ms=1&key=callid\n"
                 "subscribe = E_PLAIN kafka:%s/msgs?g.linger.ms=1&key=callid\n"
                 "[sip]\nlisten = udp:127.0.0.1:%d\n" % (m.bootstrap, m.bootstrap, port))
        ev = {"workers": workers}
        if kemi:
            ev["event_callback"] = "ksr_evapi_event"
        h = Hub(KEMI if kemi else NATIVE, evapi=ev, extra=extra)
        h.start()
        h.wait_log("sip: receiving on")
        calls = ["call-%d-%d@test" % (workers, i) for i in range(3)]
        for i, cid in enumerate(calls):
            check_eq(message(port, cid, "hello %d" % i), 202, "MESSAGE answered")
        n = 3
        if not kemi:
            c = h.client()
            check_eq(request(c, b"plain"), b"ok", "the plain message ran")
            n = 4
        recs = consume(m.bootstrap, "msgs", n)
        keys = [r["key"] for r in recs]
        check_eq(sorted(k for k in keys if k), sorted(calls), "records keyed by Call-ID")
        for r in recs:
            body = json.loads(r["payload"])
            if body["method"] == "E_MSG":
                check_eq(body["params"]["from"], "alice", "the event's params")
            else:
                check_eq(r["key"], None, "a raise outside a request route has no key")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("native_workers0", case, 0, False)
suite.case_with("native_workers2", case, 2, False)
suite.case_with("kemi_workers2", case, 2, True)

if __name__ == "__main__":
    try:
        suite.run()
    finally:
        stop_mocks()
