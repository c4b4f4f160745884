#!/usr/bin/python3
"""Limits and framing errors: max_clients refusal, oversized and malformed frames (only that
connection closes), whitespace between frames, raw mode."""

import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (CMD_SCRIPT, Hub, Suite, check, check_eq, ns, parse_error_frame,  # noqa: E402
                           pump, request, wait_eof, wait_frames)

suite = Suite("limits")


def expect_refused(h, others):
    """Connect one client and require: one max_clients error frame, then the close."""
    x = h.client(name="refused")
    wait_eof([x], others=others)
    check_eq(len(x.frames), 1, "frames sent to a refused client (%r)" % x.frames)
    err = parse_error_frame(x.frames[0])
    check_eq(err.get("error"), "max_clients", "error of a refused client")
    return err


@suite.case
def max_clients_refusal():
    h = Hub(CMD_SCRIPT, evapi={"max_clients": 3}).start()
    w = h.client(name="watcher")
    check_eq(request(w, "tag:watch"), b"tag true watch", "tag")
    cs = [h.client(name="c%d" % i) for i in range(2)]
    for c in cs:
        check_eq(request(c, "echo:in"), b"in", "an accepted client works")
    expect_refused(h, [w] + cs)
    h.wait_log("max_clients")
    expect_refused(h, [w] + cs)
    for c in [w] + cs:
        check_eq(request(c, "echo:still"), b"still", "accepted clients unaffected")
    check_eq(w.frames, [], "no close event for refused connections (watcher frames)")
    cid = json.loads(request(cs[0], "info"))["id"]
    cs[0].close()
    wait_frames([w], 1)
    check_eq(w.take(), [("closed:%d" % cid).encode()], "close event of c0")
    # The slot is free again: a new client is accepted, and the next one refused.
    n = h.client(name="new")
    check_eq(request(n, "echo:new", others=[w, cs[1]]), b"new", "a client after a close")
    expect_refused(h, [w, cs[1], n])


@suite.case
def max_clients_slots_are_reused():
    h = Hub(CMD_SCRIPT, evapi={"max_clients": 2}).start()
    keep = h.client(name="keep")
    check_eq(request(keep, "tag:watch"), b"tag true watch", "tag")
    for i in range(30):
        c = h.client(name="c%d" % i)
        check_eq(request(c, "echo:%d" % i, others=[keep]), str(i).encode(), "client %d" % i)
        c.close()
        wait_frames([keep], 1 + i)  # the close event: the slot is free again
    a = h.client(name="a")
    check_eq(request(a, "echo:a", others=[keep]), b"a", "a client once slots are free")
    expect_refused(h, [keep, a])


@suite.case
def oversized_frame_closes_only_that_connection():
    h = Hub(CMD_SCRIPT, evapi={"max_frame_size": "1k"}).start()
    b = h.client(name="bystander")
    a = h.client(name="a")
    fit = "echo:" + "f" * (1024 - 5)
    check_eq(request(a, fit, others=[b]), b"f" * 1019, "a frame of exactly max_frame_size")
    a.send("echo:" + "g" * (1025 - 5))
    wait_eof([a], others=[b])
    check_eq(len(a.frames), 1, "frames on the oversized connection (%r)" % a.frames)
    check_eq(parse_error_frame(a.frames[0]).get("error"), "protocol", "error of oversize")
    check_eq(request(b, "echo:ok"), b"ok", "the bystander still works")
    # A huge length is refused while the digits are read, before any payload is sent.
    c = h.client(name="huge")
    c.send_raw(b"99999999999999999999999999999999:")
    wait_eof([c], others=[b])
    check_eq(len(c.frames), 1, "frames on the huge-length connection (%r)" % c.frames)
    check_eq(parse_error_frame(c.frames[0]).get("error"), "protocol", "error of huge length")
    d = h.client(name="big-header")
    d.send_raw(b"1025:")
    wait_eof([d], others=[b])
    check_eq(len(d.frames), 1, "frames on the 1025-length connection (%r)" % d.frames)
    check_eq(request(b, "echo:ok2"), b"ok2", "the bystander still works")


MALFORMED = [
    ("bad length char", b"abc,"),
    ("length then junk", b"5x:hello,"),
    ("negative length", b"-1:x,"),
    ("empty length", b":hello,"),
    ("missing comma", b"5:hello!"),
    ("wrong terminator", b"3:abc;"),
    ("length too short", b"4:echo:x,"),
]


@suite.case
def malformed_frames_close_only_that_connection():
    h = Hub(CMD_SCRIPT).start()
    b = h.client(name="bystander")
    for name, junk in MALFORMED:
        c = h.client(name=name)
        # The valid frame ahead of the junk still reaches the script (its relay reaches b);
        # whether the relay to c itself arrives before the close is the hub's choice.
        c.send_raw(ns("relay:before-" + name) + junk)
        wait_eof([c], others=[b])
        wait_frames([b], 1)
        check_eq(b.take(), [("before-" + name).encode()], "%s: the frame before the junk" % name)
        frames = [f for f in c.frames if f != ("before-" + name).encode()]
        check(len(frames) == 1, "%s: want one error frame before the close, got %r" % (
            name, c.frames))
        err = parse_error_frame(frames[0])
        check_eq(err.get("error"), "protocol", "%s: error" % name)
        check_eq(request(b, "echo:alive"), b"alive", "%s: bystander unaffected" % name)


@suite.case
def whitespace_between_frames_is_tolerated():
    h = Hub(CMD_SCRIPT).start()
    a = h.client(name="a")
    a.send_raw(b" \r\n\t" + ns("echo:a") + b"\n\n" + ns("echo:b") + b"\r\n \t" + b"0:," + b"\n")
    wait_frames([a], 3)
    check_eq(a.take(), [b"a", b"b", b"empty"], "frames around whitespace")
    check_eq(request(a, "echo:c"), b"c", "the connection stays open")
    a.send_raw(b"\n")
    a.send_raw(ns("echo:d"))
    wait_frames([a], 1)
    check_eq(a.take(), [b"d"], "whitespace in its own segment")


RAW_SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg:sub(1, 6) == "relay " then
        evapi.relay(msg:sub(7))
    else
        conn:send("got:" .. msg)
    end
end)
'''


def raw_exchange(c, data, want, others=()):
    n = len(c.data)
    c.send_raw(data)
    pump([c] + list(others), lambda: len(c.data) >= n + len(want), what="raw reply %r" % want)
    check_eq(bytes(c.data[n:]), want, "raw reply")


@suite.case
def raw_mode_passes_bytes_bare():
    h = Hub(RAW_SCRIPT, evapi={"netstring_format": 0}).start()
    a, b = h.client(raw=True, name="a"), h.client(raw=True, name="b")
    raw_exchange(a, b"hello", b"got:hello", [b])
    raw_exchange(a, b"5:hello,", b"got:5:hello,", [b])
    raw_exchange(a, b"abc,::\x00", b"got:abc,::\x00", [b])
    a.send_raw(b"relay xyz")
    pump([a, b], lambda: len(a.data) >= 16 and len(b.data) >= 3, what="raw relay")
    check_eq(bytes(a.data[-3:]), b"xyz", "bare relay to the sender")
    check_eq(bytes(b.data), b"xyz", "bare relay to another client")
    check(not a.eof and not b.eof, "raw clients stay connected")


@suite.case
def frame_larger_than_max_outbuf_is_refused_to_the_script():
    # The encoded frame (header and ',' included) must fit max_outbuf; one that cannot is an
    # error for the script, not a reason to close recipients as slow consumers.
    h = Hub(CMD_SCRIPT, evapi={"max_outbuf": 1024}).start()
    a, b = h.client(name="a"), h.client(name="b")
    check_eq(request(a, "rrelay:" + "x" * 1019), b"rrelay nil message too large",
             "a relay of 1019 bytes (1025 on the wire with its header)")
    check_eq(b.take(), [], "nothing relayed")
    ok = "y" * 900
    check_eq(request(a, "rrelay:" + ok, others=[b]), ok.encode(), "a relay that fits")
    wait_frames([a, b], [1, 1])
    check_eq([a.take(), b.take()], [[b"rrelay true nil"], [ok.encode()]], "delivery and result")
    check_eq(h.count_log("slow consumer"), 0, "a fitting queue was taken for a slow one")


RESET_SCRIPT = r'''
evapi.on("connect", function(conn)
    -- Even ids stay in their connect handler for a while, so the hub does not read them yet.
    if conn.id % 2 == 0 then local x = 0 for i = 1, 3e7 do x = x + i end end
end)
evapi.on("message", function(conn, msg) evapi.relay(msg) end)
'''


@suite.case
def peer_reset_found_by_a_write_is_reaped_at_once():
    # A peer resets while the hub is not reading it; a relay's write then fails. The connection
    # must be closed then and there, not left behind until shutdown_timeout.
    h = Hub(RESET_SCRIPT, evapi={"workers": 2, "shutdown_timeout": 20000},
            lua={"max_instructions": 0}).start()
    b = h.client(name="b")  # id 1: read at once
    wait_frames([b], 0)
    h.wait_log("client id=1 ")
    a = socket.create_connection(h.addr)  # id 2: its worker is busy in the connect handler
    h.wait_log("client id=2 ")
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    b.send("hello")
    wait_frames([b], 1)
    h.wait_log("Connection reset by peer")
    time.sleep(0.2)
    h.stop()
    check("0 bytes left unsent" in h.log(), "queued bytes left at shutdown:\n%s" % h.log())
    check("peer stopped reading" not in h.log(), "the reset connection lingered")


suite.run()
