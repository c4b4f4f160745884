#!/usr/bin/python3
"""IPv6: bind_addr = [::1]:0 (and -b [::1]:0); clients over ::1 see conn.addr / $evapi(srcaddr)
"::1". There is no fallback: if ::1 is unusable here, this test fails."""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (CMD_SCRIPT, Hub, Suite, check, check_eq, request,  # noqa: E402
                           wait_frames)

suite = Suite("ipv6")


@suite.case
def loopback_v6_is_available():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.bind(("::1", 0))  # fails loudly if the machine has no ::1
    finally:
        s.close()


@suite.case
def native_over_v6():
    h = Hub(CMD_SCRIPT, evapi={"bind_addr": "[::1]:0"}).start()
    check_eq(h.addr[0], "::1", "listening address")
    a, b = h.client(name="a"), h.client(name="b")
    check_eq(a.sock.family, socket.AF_INET6, "client family")
    info = json.loads(request(a, "info"))
    check_eq(info.get("addr"), "::1", "conn.addr")
    check_eq(info.get("port"), a.port, "conn.port")
    a.send("relay:v6")
    wait_frames([a, b], 1)
    check_eq([a.take(), b.take()], [[b"v6"], [b"v6"]], "relay over v6")
    check_eq(request(b, "tag:six"), b"tag true six", "tag")
    a.send("mc:six:m")
    wait_frames([b], 1, others=[a])
    check_eq(b.take(), [b"m"], "multicast over v6")
    check_eq(request(a, b"echo:\x00bin,:"), b"\x00bin,:", "binary echo over v6")


@suite.case
def bind_flag_v6():
    h = Hub(CMD_SCRIPT, args=["-b", "[::1]:0"]).start()
    check_eq(h.addr[0], "::1", "listening address with -b")
    check_eq(request(h.client(), "echo:x"), b"x", "echo")
    # Bound to ::1 only: nothing answers on 127.0.0.1 at that port.
    s = socket.socket()
    try:
        s.settimeout(5)
        refused = s.connect_ex(("127.0.0.1", h.addr[1])) != 0
    finally:
        s.close()
    check(refused, "a [::1] hub also accepts on 127.0.0.1")


@suite.case
def kemi_over_v6():
    script = r'''
function ksr_evapi_event(evname)
	if evname == "evapi:message-received" then
		KSR.evapi.relay(KSR.pv.get("$evapi(srcaddr)") .. " " .. KSR.pv.get("$evapi(srcport)"));
	end
	return 1;
end
'''
    h = Hub(script, evapi={"bind_addr": "[::1]:0", "event_callback": "ksr_evapi_event"})
    h.start()
    a = h.client()
    check_eq(request(a, "who"), ("::1 %d" % a.port).encode(), "$evapi(srcaddr) over v6")


suite.run()
