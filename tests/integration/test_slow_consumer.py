#!/usr/bin/python3
"""Slow consumers: a subscriber that never reads while others get lots of data. With
outbuf_policy=close it is closed ("slow consumer" logged), with drop its frames are dropped and
it stays connected; either way the hub's RSS stays bounded, the other subscribers receive every
frame in order, and no frame is ever written partially."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (ASAN, VALGRIND, Hub, Suite, check, check_eq, parse_error_frame,  # noqa: E402
                           pump, request, wait_eof)

suite = Suite("slow_consumer")

SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "sub" then
        conn:set_tag("subs")
        conn:send("subbed")
    else
        evapi.multicast(msg, "subs")
    end
end)
'''

FRAME = 64 * 1024
N = 320 if VALGRIND else 1024  # 20 MiB / 64 MiB through the hub, to each subscriber
WINDOW = 8  # frames the publisher may be ahead of the fast subscribers (512 KiB < max_outbuf)
# RSS growth allowed while relaying N frames; an unbounded queue for the slow one grows ~N*FRAME.
RSS_BOUND_KB = (96 if VALGRIND else 40 if ASAN else 24) * 1024
FILLS = [bytes([0x41 + i]) * (FRAME - 8) for i in range(16)]


def payload(seq):
    return b"%08d" % seq + FILLS[seq % 16]


def setup(policy, workers, extra=None):
    evapi = {"max_outbuf": "1m", "outbuf_policy": policy, "workers": workers}
    evapi.update(extra or {})
    # A small ASan quarantine, so freed frames are reused as they would be without ASan.
    asan = "quarantine_size_mb=4:" + os.environ.get("ASAN_OPTIONS", "")
    h = Hub(SCRIPT, evapi=evapi, env={"ASAN_OPTIONS": asan}).start()
    fast = [h.client(name="fast%d" % i) for i in range(2)]
    slow = h.client(name="slow", rcvbuf=4096)
    for c in fast + [slow]:
        check_eq(request(c, "sub"), b"subbed", "subscribe")
        c.take()
    slow.paused = True
    pub = h.client(name="publisher")
    return h, fast, slow, pub


def flood(h, fast, slow, pub):
    """Publish N frames, never more than WINDOW ahead of the fast subscribers; returns the
    peak RSS growth in KiB."""
    base = h.rss_kb()
    state = {"sent": 0, "peak": base, "t": 0.0}

    def until():
        low = min(len(c.frames) for c in fast)
        while state["sent"] < N and state["sent"] - low < WINDOW:
            pub.send(payload(state["sent"]))
            state["sent"] += 1
        now = time.monotonic()
        if now - state["t"] > 0.05:
            state["t"] = now
            state["peak"] = max(state["peak"], h.rss_kb())
        return low >= N
    pump(fast + [slow, pub], until, timeout=240 if VALGRIND else 120,
         what="fast subscribers to get %d frames" % N)
    state["peak"] = max(state["peak"], h.rss_kb())
    return state["peak"] - base


def check_fast(fast):
    for c in fast:
        check(not c.eof, "%s was closed" % c.name)
        check_eq(len(c.frames), N, "frames received by %s" % c.name)
        for i, f in enumerate(c.frames):
            if f != payload(i):
                check(False, "%s: frame %d is %r..., want %r..." % (
                    c.name, i, f[:12], payload(i)[:12]))
        c.frames = []


def data_frames(c):
    """Split c.frames into the 64 KiB data frames (checked intact) and the others."""
    seqs, others = [], []
    for f in c.frames:
        if len(f) == FRAME:
            seq = int(f[:8])
            check(f == payload(seq), "%s: frame %d is corrupted" % (c.name, seq))
            seqs.append(seq)
        else:
            others.append(f)
    return seqs, others


def close_case(workers, extra=None):
    h, fast, slow, pub = setup("close", workers, extra)
    growth = flood(h, fast, slow, pub)
    h.wait_log("slow consumer")
    check_fast(fast)
    check(growth < RSS_BOUND_KB, "RSS grew by %d KiB (bound %d KiB)" % (growth, RSS_BOUND_KB))
    slow.paused = False
    wait_eof([slow], others=fast + [pub])
    seqs, others = data_frames(slow)
    check(len(seqs) < N, "the slow consumer got all %d frames: it was never slowed" % N)
    check_eq(seqs, list(range(len(seqs))), "the slow consumer's frames are an in-order prefix")
    check(len(others) <= 1, "unexpected frames on the slow consumer: %r" % others[:3])
    for f in others:
        parse_error_frame(f)
    check_eq(slow.parser.pending(), 0, "bytes of a partial frame left on the slow consumer (%s, %d bytes in all)" % (slow.err or "EOF", slow.bytes_in))
    # The hub still serves everyone else.
    pub.send(b"after")
    pump(fast + [pub], lambda: all(c.frames == [b"after"] for c in fast), what="after")


suite.case_with("close_policy_closes_the_slow_consumer", close_case, 0)
suite.case_with("close_policy_with_a_worker", close_case, 1, {"worker_queue": 16})


def drop_case(workers):
    h, fast, slow, pub = setup("drop", workers, {"worker_queue": 16})
    growth = flood(h, fast, slow, pub)
    check_fast(fast)
    check(growth < RSS_BOUND_KB, "RSS grew by %d KiB (bound %d KiB)" % (growth, RSS_BOUND_KB))
    check(not slow.eof, "the drop policy closed the slow consumer")
    check_eq(h.count_log("slow consumer"), 0, "'slow consumer' close logged under drop")
    # Drain the slow one; an end marker goes through once its queue has room again.
    slow.paused = False
    state = {"k": 0, "t": 0.0}

    def until():
        if any(f.startswith(b"end-") for f in slow.frames):
            return True
        now = time.monotonic()
        if now - state["t"] > 0.2:
            state["t"] = now
            pub.send(b"end-%d" % state["k"])
            state["k"] += 1
        return False
    pump(fast + [slow, pub], until, what="an end marker on the drained slow consumer")
    seqs, others = data_frames(slow)
    check(len(seqs) < N, "nothing was dropped (%d frames arrived)" % len(seqs))
    check(len(seqs) > 0, "the slow consumer got no data frame at all")
    check(all(a < b for a, b in zip(seqs, seqs[1:])), "dropped frames left the rest in order")
    check(all(f.startswith(b"end-") for f in others), "unexpected frames %r" % others[:3])
    check(not slow.eof, "the slow consumer is still connected")
    check_eq(slow.parser.pending(), 0, "bytes of a partial frame on the slow consumer")
    # It keeps receiving new frames whole.
    slow.frames = []
    pub.send(payload(7))
    pump(fast + [slow, pub], lambda: payload(7) in slow.frames, what="a frame after draining")


suite.case_with("drop_policy_keeps_the_slow_consumer", drop_case, 0)
suite.case_with("drop_policy_with_a_worker", drop_case, 1)


suite.run()
