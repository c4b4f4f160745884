#!/usr/bin/python3
"""Workers: with workers=0 and workers=4 each connection's events are handled in order
(connect, messages, close), under many concurrent clients and many messages; an idle worker
wakes at once when work arrives."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (CMD_SCRIPT, SLOW, VALGRIND, Hub, Suite, check, check_eq, ns,  # noqa: E402
                           parse_error_frame, pump, request, scaled, wait_eof, wait_frames)

suite = Suite("workers")

CLIENTS = 8
N = scaled(3000, 300)


def replies_in_order(workers):
    h = Hub(CMD_SCRIPT, evapi={"workers": workers}).start()
    cs = [h.client(name="c%d" % i) for i in range(CLIENTS)]
    for i, c in enumerate(cs):
        for j in range(N):
            c.send("echo:%d:%d" % (i, j))
    wait_frames(cs, N, timeout=240 if VALGRIND else 60)
    for i, c in enumerate(cs):
        want = [("%d:%d" % (i, j)).encode() for j in range(N)]
        got = c.take()
        if got != want:
            bad = next(k for k in range(min(len(got), N)) if got[k] != want[k])
            check(False, "%s: reply %d is %r, want %r" % (c.name, bad, got[bad], want[bad]))


suite.case_with("replies_in_order_workers0", replies_in_order, 0)
suite.case_with("replies_in_order_workers4", replies_in_order, 4)


def no_frames_after_close(workers):
    # "close" then "relay:leak" in one write: once the script has closed the connection it
    # sees no further frame of it, with workers as without (they may already be queued).
    h = Hub(CMD_SCRIPT, evapi={"workers": workers}).start()
    w = h.client(name="watcher")
    check_eq(request(w, "tag:watch"), b"tag true watch", "tag")
    a = h.client(name="a")
    a.send_raw(ns("close") + ns("relay:leak"))
    wait_eof([a], others=[w])
    check_eq(a.frames, [b"closing"], "frames to the closed connection")
    wait_frames([w], 1)  # the close event, multicast by the script's close handler
    w.send("echo:fence")
    pump([w], lambda: b"fence" in w.frames, what="the fence")
    got = [f for f in w.take() if f != b"fence"]
    check_eq([f for f in got if not f.startswith(b"closed:")], [], "relayed after the close")
    check_eq(len(got), 1, "one close event (%r)" % got)


suite.case_with("no_frames_after_close_workers0", no_frames_after_close, 0)
suite.case_with("no_frames_after_close_workers2", no_frames_after_close, 2)


REFUSE_SCRIPT = r'''
evapi.on("connect", function(conn)
    if conn.id ~= 1 then
        -- take a while, so the stranger's frames are on their way before the close
        local x = 0 for i = 1, 3000000 do x = x + i end
        conn:close("go away")
    end
end)
evapi.on("message", function(conn, msg) evapi.relay("seen:" .. msg) end)
'''


def close_in_connect(workers):
    # A script refusing a connection in its connect handler sees none of its frames, even
    # ones sent at once, before the handler ran (Kamailio's ACL in connection-new).
    h = Hub(REFUSE_SCRIPT, evapi={"workers": workers}).start()
    w = h.client(name="watcher")  # id 1: accepted
    x = h.client(name="stranger")
    x.send_raw(ns("early") * 50)
    wait_eof([x], others=[w])
    check_eq([parse_error_frame(f).get("error") for f in x.frames], ["closed"], "refusal")
    w.send("fence")
    wait_frames([w], 1)
    check_eq(w.take(), [b"seen:fence"], "frames of the refused connection reached the script")


suite.case_with("close_in_connect_workers0", close_in_connect, 0)
suite.case_with("close_in_connect_workers2", close_in_connect, 2)


SLOW_SCRIPT = r'''
evapi.on("message", function(conn, msg)
    local x = 0
    for i = 1, 20000 do x = x + i end  -- a slow script, so the worker queue fills up
    conn:send(msg)
end)
'''


@suite.case
def full_worker_queue_pauses_reading_and_loses_nothing():
    # worker_queue = 2: the loop must stop reading these clients while the worker catches up,
    # and resume them, without dropping or reordering a frame.
    h = Hub(SLOW_SCRIPT, evapi={"workers": 2, "worker_queue": 2}, log={"level": "debug"}).start()
    cs = [h.client(name="c%d" % i) for i in range(4)]
    n = scaled(500, 100)
    for i, c in enumerate(cs):
        c.send_raw(b"".join(ns("%d:%d" % (i, j)) for j in range(n)))
    wait_frames(cs, n, timeout=240 if VALGRIND else 60)
    for i, c in enumerate(cs):
        check_eq(c.take(), [("%d:%d" % (i, j)).encode() for j in range(n)], c.name)
    check("error" not in h.log(), "errors logged:\n%s" % h.log())
    check(h.count_log("queue full, reading from client") > 0, "reading was never paused")


def relays_in_order(workers):
    h = Hub(CMD_SCRIPT, evapi={"workers": workers}).start()
    n = N // 4
    cs = [h.client(name="c%d" % i) for i in range(6)]
    for c in cs:  # every connection registered before the flood
        check_eq(request(c, "echo:x"), b"x", "echo")
        c.take()
    for j in range(n):
        for i, c in enumerate(cs):
            c.send("relay:%d:%d" % (i, j))
    wait_frames(cs, n * len(cs), timeout=240 if VALGRIND else 60)
    for c in cs:
        got = c.take()
        check_eq(len(got), n * len(cs), "frames on %s" % c.name)
        per = {}
        for f in got:
            origin, seq = f.split(b":")
            per.setdefault(int(origin), []).append(int(seq))
        for origin in range(len(cs)):
            check_eq(per.get(origin), list(range(n)),
                     "%s: relays from c%d in order" % (c.name, origin))


suite.case_with("relays_in_order_workers0", relays_in_order, 0)
suite.case_with("relays_in_order_workers4", relays_in_order, 4)


STATE_SCRIPT = r'''
-- Per-worker state: each connection's events must reach the same state in order.
local seen = {}
evapi.on("connect", function(conn)
    if seen[conn.id] ~= nil then log.err("ORDER: connect twice " .. conn.id) end
    seen[conn.id] = 0
end)
evapi.on("message", function(conn, msg)
    local n = seen[conn.id]
    if n == nil then
        conn:send("no-connect-event")
        return
    end
    seen[conn.id] = n + 1
    conn:send("n=" .. (n + 1))
end)
evapi.on("close", function(conn)
    if seen[conn.id] == nil then log.err("ORDER: close without connect " .. conn.id) end
    seen[conn.id] = nil
    log.info("CLOSED " .. conn.id)
end)
'''


def events_in_order(workers):
    h = Hub(STATE_SCRIPT, evapi={"workers": workers}).start()
    total = 0
    rounds = scaled(5, 2)
    for r in range(rounds):
        cs = [h.client(name="r%dc%d" % (r, i)) for i in range(20)]
        for c in cs:  # messages right behind the connect
            for j in range(3):
                c.send("m")
        wait_frames(cs, 3)
        for c in cs:
            check_eq(c.take(), [b"n=1", b"n=2", b"n=3"], "events of %s" % c.name)
            c.close()
        total += len(cs)
        h.wait_log("CLOSED", count=total)
    check_eq(h.count_log("ORDER:"), 0, "order violations:\n%s" % h.log())


suite.case_with("connection_events_in_order_workers0", events_in_order, 0)
suite.case_with("connection_events_in_order_workers4", events_in_order, 4)


@suite.case
def idle_worker_wakes_at_once():
    # Kamailio's workers poll every wait_idle..wait_idle*wait_increase; evhub's wake on work.
    h = Hub(CMD_SCRIPT, evapi={"workers": 1, "wait_idle": 1000000, "wait_increase": 3}).start()
    c = h.client()
    check_eq(request(c, "echo:warm"), b"warm", "echo")
    bound = 1.0 if SLOW else 0.3
    for idle in (1.2, 2.5):
        time.sleep(idle)  # let the worker go idle for more than wait_idle
        t0 = time.monotonic()
        check_eq(request(c, "echo:now"), b"now", "echo after idle")
        dt = time.monotonic() - t0
        check(dt < bound, "round trip after %.1fs idle took %.3fs (bound %.1fs)" % (
            idle, dt, bound))


@suite.case
def many_clients_many_messages_workers4():
    h = Hub(CMD_SCRIPT, evapi={"workers": 4}).start()
    cs = [h.client(name="c%d" % i) for i in range(scaled(64, 16))]
    m = scaled(200, 30)
    for j in range(m):
        for i, c in enumerate(cs):
            c.send("echo:%d" % j)
    pump(cs, lambda: all(len(c.frames) >= m for c in cs), timeout=240 if VALGRIND else 60,
         what="%d echoes each" % m)
    for c in cs:
        check_eq(c.take(), [str(j).encode() for j in range(m)], "echoes of %s" % c.name)


suite.run()
