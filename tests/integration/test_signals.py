#!/usr/bin/python3
"""Signals: SIGHUP reloads the script without dropping connections or their tags (a failed
reload keeps the old script); SIGTERM/SIGINT stop accepting, flush queued output to clients
(up to shutdown_timeout) and exit 0."""

import errno
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (SLOW, TIMEOUT, VALGRIND, Hub, Suite, TestFailure, check, check_eq,  # noqa: E402
                           pump, request, wait_eof, wait_frames)

suite = Suite("signals")

VERSIONED = r'''
local VERSION = "%s"
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%%a+):?(.*)$")
    if cmd == "ver" then
        conn:send(VERSION .. " " .. tostring(conn.tag))
    elseif cmd == "tag" then
        conn:set_tag(rest)
        conn:send("tagged")
    elseif cmd == "mc" then
        local t, d = rest:match("^([^:]*):(.*)$")
        evapi.multicast(VERSION .. ":" .. d, t)
    end
end)
'''


def v(name):
    return VERSIONED % name


def reload(h, workers, script):
    """Write the script, SIGHUP, and wait for every worker's "reloaded" line (the loop's
    own when workers=0)."""
    n = h.count_log("reloaded")
    h.write_script(script)
    h.signal(signal.SIGHUP)
    h.wait_log("reloaded", count=n + max(1, workers))


def reload_keeps_connections(workers):
    h = Hub(v("v1"), evapi={"workers": workers}).start()
    a, b, c = h.client(name="a"), h.client(name="b"), h.client(name="c")
    check_eq(request(a, "tag:grp"), b"tagged", "tag a")
    check_eq(request(c, "tag:grp"), b"tagged", "tag c")
    check_eq(request(b, "ver"), b"v1 nil", "version before reload")
    reload(h, workers, v("v2"))
    check_eq(request(a, "ver", others=[b, c]), b"v2 grp", "a after reload: new script, tag kept")
    check_eq(request(b, "ver", others=[a, c]), b"v2 nil", "b after reload")
    b.send("mc:grp:hello")
    wait_frames([a, c], 1, others=[b])
    check_eq([a.take(), c.take()], [[b"v2:hello"], [b"v2:hello"]],
             "a multicast to a tag set before the reload")
    check(not (a.eof or b.eof or c.eof), "a reload dropped a connection")
    # A second reload works as well.
    reload(h, workers, v("v3"))
    check_eq(request(c, "ver", others=[a, b]), b"v3 grp", "c after the second reload")
    d = h.client(name="d")
    check_eq(request(d, "ver"), b"v3 nil", "a new connection after reloads")


suite.case_with("reload_keeps_connections_workers0", reload_keeps_connections, 0)
suite.case_with("reload_keeps_connections_workers2", reload_keeps_connections, 2)


def failed_reload(workers, bad_script):
    h = Hub(v("v1"), evapi={"workers": workers}).start()
    a = h.client(name="a")
    check_eq(request(a, "tag:grp"), b"tagged", "tag a")
    h.write_script(bad_script)
    h.signal(signal.SIGHUP)
    h.wait_log("keeping")
    check_eq(request(a, "ver"), b"v1 grp", "the old script still runs")
    b = h.client(name="b")
    check_eq(request(b, "ver", others=[a]), b"v1 nil", "a new connection gets the old script")
    reload(h, workers, v("v2"))
    check_eq(request(a, "ver", others=[b]), b"v2 grp", "a good reload after a failed one")


@suite.case
def failed_reload_syntax_error():
    failed_reload(0, "evapi.on('message', function(conn, msg)\n  if then\nend)\n")


@suite.case
def failed_reload_missing_handler_workers2():
    failed_reload(2, "evapi.on('connect', function(conn) end)\n")


@suite.case
def failed_reload_error_at_load():
    failed_reload(1, "error('no way')\n")


FLUSH_SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "sub" then
        conn:set_tag("r")
        conn:send("subbed")
    elseif msg == "done" then
        conn:send("ack")
    else
        evapi.multicast(msg, "r")
    end
end)
'''

FRAME = 16 * 1024


def payload(i):
    return b"%08d" % i + bytes([0x61 + i % 26]) * (FRAME - 8)


def queue_for_reader(h, count):
    """A subscriber that does not read yet, and `count` frames queued for it by the hub."""
    r = h.client(name="reader", rcvbuf=16384)
    check_eq(request(r, "sub"), b"subbed", "subscribe")
    r.take()
    r.paused = True
    p = h.client(name="publisher")
    for i in range(count):
        p.send(payload(i))
    p.send("done")
    wait_frames([p], 1, timeout=240 if VALGRIND else 60, others=[r])
    check_eq(p.take(), [b"ack"], "publisher ack: every frame is queued")
    return r, p


def connect_refused(addr, timeout):
    """Poll until a connection to addr is refused; fail if it keeps being accepted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket()
        try:
            s.settimeout(2)
            s.connect(addr)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                return
            raise
        finally:
            s.close()
        time.sleep(0.02)
    raise TestFailure("connections still accepted %.0fs after SIGTERM" % timeout)


def slow_read_all(r, count, others):
    """Read r with pauses (a slowish reader) until EOF."""
    state = {"t": 0.0}

    def until():
        now = time.monotonic()
        r.paused = now - state["t"] < 0.002
        if not r.paused:
            state["t"] = now
        return r.eof
    r.paused = False
    pump([r] + others, until, timeout=240 if VALGRIND else 90, what="the reader to reach EOF")


@suite.case
def sigterm_flushes_then_exits_0():
    count = 512  # 8 MiB: far more than the socket buffers
    h = Hub(FLUSH_SCRIPT, evapi={"max_outbuf": "64m", "shutdown_timeout": 60000}).start()
    r, p = queue_for_reader(h, count)
    p.close()
    h.signal(signal.SIGTERM)
    connect_refused(h.addr, TIMEOUT)
    check(h.alive(), "the hub exited with output still queued")
    slow_read_all(r, count, [])
    check_eq(h.wait_exit(), 0, "rc after SIGTERM")
    check_eq(len(r.frames), count, "frames flushed to the reader")
    for i, f in enumerate(r.frames):
        if f != payload(i):
            check(False, "flushed frame %d is %r..." % (i, f[:10]))
    check_eq(r.parser.pending(), 0, "bytes of a partial frame")


@suite.case
def sigint_exits_0_and_closes_clients():
    h = Hub(FLUSH_SCRIPT).start()
    cs = [h.client(name="c%d" % i) for i in range(3)]
    for c in cs:
        check_eq(request(c, "sub"), b"subbed", "subscribe")
    h.signal(signal.SIGINT)
    wait_eof(cs)
    check_eq(h.wait_exit(), 0, "rc after SIGINT")


@suite.case
def sigterm_idle_exits_quickly():
    h = Hub(FLUSH_SCRIPT).start()
    t0 = time.monotonic()
    h.stop(signal.SIGTERM)
    dt = time.monotonic() - t0
    check(dt < (10 if SLOW else 2), "an idle hub took %.1fs to stop" % dt)


@suite.case
def shutdown_timeout_bounds_the_flush():
    h = Hub(FLUSH_SCRIPT, evapi={"max_outbuf": "64m", "shutdown_timeout": 1500}).start()
    r, p = queue_for_reader(h, 512 if VALGRIND else 1024)
    t0 = time.monotonic()
    h.signal(signal.SIGTERM)
    rc = h.wait_exit(TIMEOUT)
    dt = time.monotonic() - t0
    check_eq(rc, 0, "rc after SIGTERM with a stuck reader")
    check(dt >= 1.0, "exited after %.2fs: it did not wait for the flush" % dt)
    check(dt < 1.5 + (15 if SLOW else 3), "exited after %.1fs: shutdown_timeout is 1.5s" % dt)


suite.run()
