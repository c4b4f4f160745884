#!/usr/bin/python3
"""Routing: relay (sender included), multicast, unicast (first and round_robin), replies to the
sender, connection info, binary payloads, empty frames and arbitrary TCP split points."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (CMD_SCRIPT, Hub, Suite, check, check_eq, fence, ns,  # noqa: E402
                           request, scaled, take_until, wait_eof, wait_frames)

suite = Suite("routing")


def hub_with(**evapi):
    return Hub(CMD_SCRIPT, evapi=evapi).start()


def tag_all(clients, tag):
    for c in clients:
        check_eq(request(c, "tag:" + tag), ("tag true " + tag).encode(), "set_tag reply")


@suite.case
def relay_reaches_everyone_including_sender():
    h = hub_with()
    cs = [h.client(name="c%d" % i) for i in range(4)]
    for c in cs:  # make sure every connection is registered before relaying
        check_eq(request(c, "echo:hi"), b"hi", "echo")
    cs[1].send("relay:to-all")
    got = fence(cs[1], cs, "a")
    for c, frames in zip(cs, got):
        check_eq(frames, [b"to-all"], "frames of %s" % c.name)
    cs[2].send("rrelay:x")
    wait_frames([cs[2]], 2)
    check_eq(cs[2].take(), [b"x", b"rrelay true nil"], "relay to the sender, then the result")
    for c in (cs[0], cs[1], cs[3]):
        wait_frames([c], 1)
        check_eq(c.take(), [b"x"], "relayed frame on %s" % c.name)


@suite.case
def multicast_reaches_exactly_the_tag():
    h = hub_with()
    cs = [h.client(name="c%d" % i) for i in range(5)]
    tag_all(cs[0:2], "red")
    tag_all(cs[2:4], "blue")
    cs[4].send("mc:red:for-red")
    cs[0].send("mc:blue:for-blue")  # sender not in the tag: does not get it
    cs[2].send("mc:blue:blue-self")  # sender in the tag: gets it
    wait_frames(cs[0:4], [1, 1, 2, 2])
    got = fence(cs[4], cs, "b")
    check_eq(got[0], [b"for-red"], "red c0")
    check_eq(got[1], [b"for-red"], "red c1")
    check_eq(sorted(got[2]), sorted([b"for-blue", b"blue-self"]), "blue c2")
    check_eq(sorted(got[3]), sorted([b"for-blue", b"blue-self"]), "blue c3")
    check_eq(got[4], [], "untagged c4")
    check_eq(request(cs[4], "rmc:green:x"), b"rmc nil no client", "multicast to nobody")
    check_eq(request(cs[4], "ruc:green:x"), b"ruc nil no client", "unicast to nobody")
    check_eq(request(cs[4], "rmc:red:y"), b"rmc true nil", "multicast result")
    wait_frames(cs[0:2], 1)
    check_eq([cs[0].take(), cs[1].take()], [[b"y"], [b"y"]], "second multicast")


@suite.case
def tags_are_exact_and_bounded():
    h = hub_with()
    a, b, c = h.client(name="a"), h.client(name="b"), h.client(name="c")
    tag_all([a], "pbx")
    tag_all([b], "pbx1")
    tag_all([c], "PBX")
    c.send("mc:pbx:only-a")
    got = fence(c, [a, b, c], "t")
    check_eq(got, [[b"only-a"], [], []], "exact, case-sensitive tag match")
    t64 = "x" * 64
    check_eq(request(a, "tag:" + t64), ("tag true " + t64).encode(), "a 64-byte tag")
    reply = request(a, "tag:" + "y" * 65)
    check_eq(reply.split(b" ")[-1], t64.encode(), "a 65-byte tag is refused, old tag kept")
    tag_all([a], "other")  # a connection has one tag: the new one replaces the old
    c.send("mc:pbx:none")
    c.send("mc:" + t64 + ":none")
    got = fence(c, [a, b, c], "u")
    check_eq(got, [[], [], []], "old tags no longer match")


def tag_then_route_pipelined(workers):
    # set_tag and a multicast/unicast right behind it, in one write: the result the script
    # sees must agree with what was delivered.
    h = hub_with(workers=workers)
    a, b = h.client(name="a"), h.client(name="b")
    a.send_raw(ns("tag:t1") + ns("rmc:t1:m1") + ns("ruc:t1:u1"))
    wait_frames([a], 5)
    check_eq(a.take(), [b"tag true t1", b"m1", b"rmc true nil", b"u1", b"ruc true nil"],
             "workers=%d: set_tag, then multicast and unicast to that tag" % workers)
    a.send_raw(ns("tag:t2") + ns("rmc:t1:m2"))
    wait_frames([a], 2)
    check_eq(a.take(), [b"tag true t2", b"rmc nil no client"],
             "workers=%d: the old tag no longer matches" % workers)
    b.send_raw(ns("tag:t2") + ns("rmc:t2:m3"))
    wait_frames([a, b], [1, 3])
    check_eq(a.take(), [b"m3"], "workers=%d: multicast to a" % workers)
    check_eq(b.take(), [b"tag true t2", b"m3", b"rmc true nil"], "workers=%d: b" % workers)


suite.case_with("tag_then_route_pipelined_workers0", tag_then_route_pipelined, 0)
suite.case_with("tag_then_route_pipelined_workers1", tag_then_route_pipelined, 1)
suite.case_with("tag_then_route_pipelined_workers4", tag_then_route_pipelined, 4)


@suite.case
def unicast_first_is_the_lowest_conidx():
    h = hub_with(unicast="first")
    cs = [h.client(name="c%d" % i) for i in range(3)]
    d = h.client(name="d")
    # Tag in the order c1, c2, c0: as Kamailio, "first" is the lowest slot (conidx) carrying
    # the tag, whatever the tagging order; c0..c2 took conidx 0..2.
    tag_all([cs[1], cs[2], cs[0]], "grp")
    for i in range(4):
        check_eq(request(d, "ruc:grp:u%d" % i), b"ruc true nil", "unicast result")
    got = fence(d, cs + [d], "f")
    check_eq(got, [[b"u0", b"u1", b"u2", b"u3"], [], [], []], "unicast first")
    w = h.client(name="w")
    tag_all([w], "watch")  # CMD_SCRIPT multicasts "closed:<id>" to "watch"
    c0_id = json.loads(request(cs[0], "info"))["id"]
    cs[0].close()
    # Raced with the close: lost with c0, or c1's once the hub has seen c0 go; nobody else's.
    d.send("uc:grp:race")
    got = fence(d, [cs[1], cs[2], d], "g")
    check(got[0] in ([], [b"race"]) and got[1:] == [[], []],
          "unicast to a closing connection is lost or goes to c1, not misrouted: %r" % got)
    # The close event runs after the hub unroutes c0: from then on the first is c1.
    take_until([w], ("closed:%d" % c0_id).encode(), "close event of c0")
    d.send("uc:grp:after")
    check_eq(fence(d, [cs[1], cs[2], d], "h"), [[b"after"], [], []],
             "unicast after the first closed")


@suite.case
def unicast_round_robin_rotates():
    h = hub_with(unicast="round_robin")
    cs = [h.client(name="c%d" % i) for i in range(3)]
    d = h.client(name="d")
    tag_all(cs, "grp")
    n = 9
    for i in range(n):
        d.send("uc:grp:r%d" % i)
    got = fence(d, cs + [d], "r")
    counts = [len(g) for g in got[:3]]
    check_eq(counts, [3, 3, 3], "round robin spreads %d unicasts evenly" % n)
    seen = sorted(f for g in got[:3] for f in g)
    check_eq(seen, sorted(("r%d" % i).encode() for i in range(n)), "each unicast once")
    # Rotation: consecutive unicasts go to different connections.
    owner = {f: i for i, g in enumerate(got[:3]) for f in g}
    for i in range(n - 1):
        check(owner[("r%d" % i).encode()] != owner[("r%d" % (i + 1)).encode()],
              "r%d and r%d went to the same connection" % (i, i + 1))


@suite.case
def reply_goes_to_the_sender_only():
    h = hub_with(workers=2)
    cs = [h.client(name="c%d" % i) for i in range(4)]
    for i, c in enumerate(cs):
        for j in range(20):
            c.send("echo:%d-%d" % (i, j))
    wait_frames(cs, 20)
    for i, c in enumerate(cs):
        check_eq(c.take(), [("%d-%d" % (i, j)).encode() for j in range(20)],
                 "replies on %s" % c.name)


@suite.case
def connection_info_and_ids():
    h = hub_with()
    a = h.client(name="a")
    info = json.loads(request(a, "info"))
    check_eq(info.get("addr"), "127.0.0.1", "conn.addr")
    check_eq(info.get("port"), a.port, "conn.port")
    check(isinstance(info.get("id"), int), "conn.id is an integer: %r" % info)
    check(info.get("tag") is None, "conn.tag of an untagged connection is nil: %r" % info)
    ids = [info["id"]]
    for i in range(3):  # ids are never reused, even when a slot is
        a.close()
        a = h.client(name="a%d" % i)
        ids.append(json.loads(request(a, "info"))["id"])
    check_eq(len(set(ids)), 4, "distinct ids %s" % ids)
    check(ids == sorted(ids), "ids increase: %s" % ids)
    tag_all([a], "t1")
    check_eq(json.loads(request(a, "info")).get("tag"), "t1", "conn.tag")


@suite.case
def close_event_and_script_close():
    h = hub_with()
    w = h.client(name="watcher")
    tag_all([w], "watch")
    a = h.client(name="a")
    aid = json.loads(request(a, "info"))["id"]
    a.close()
    wait_frames([w], 1)
    check_eq(w.take(), [("closed:%d" % aid).encode()], "close handler ran for a")
    b = h.client(name="b")
    bid = json.loads(request(b, "info"))["id"]
    b.send("close:")
    wait_eof([b], others=[w])
    check_eq(b.frames[0], b"closing", "a frame sent before conn:close() is delivered")
    wait_frames([w], 1)
    check_eq(w.take(), [("closed:%d" % bid).encode()], "close handler ran for b")
    check_eq(request(w, "echo:still"), b"still", "others unaffected")


@suite.case
def binary_payloads_are_byte_exact():
    h = hub_with()
    a, b = h.client(name="a"), h.client(name="b")
    every = bytes(range(256))
    payloads = [b"\x00", b",", b":", b"1:a,", b"\x00:,\x00" * 10, every, every * 300,
                b"12:" + every + b",,,", b"\r\n \t"]
    for p in payloads:
        check_eq(request(a, b"echo:" + p), p, "echo of %d binary bytes" % len(p))
    for p in payloads:
        a.send(b"relay:" + p)
    wait_frames([a, b], len(payloads))
    check_eq(a.take(), payloads, "binary relay to the sender")
    check_eq(b.take(), payloads, "binary relay to another client")
    # json.encode's exact spacing is the hub's choice: compare decoded values.
    doc = {"k": [1, 2.5, "\u00e9", True], "s": "a\"b\\c", "n": {"x": -3}}
    got = json.loads(request(a, "json:" + json.dumps(doc)))
    check_eq(got, doc, "json.decode/json.encode round trip")


@suite.case
def empty_frames():
    h = hub_with()
    a, b = h.client(name="a"), h.client(name="b")
    a.send_raw(b"0:,")
    wait_frames([a], 1, others=[b])
    check_eq(a.take(), [b"empty"], "an inbound 0:, is a message")
    a.send("relay:")
    wait_frames([a, b], 1)
    check_eq([a.take(), b.take()], [[b""], [b""]], "an empty relay arrives as 0:,")
    a.send_raw(b"0:,0:," + ns("echo:x") + b"0:,")
    wait_frames([a], 4, others=[b])
    check_eq(a.take(), [b"empty", b"empty", b"x", b"empty"], "empty frames among others")


@suite.case
def frames_split_at_every_point():
    h = hub_with()
    a, b = h.client(name="a"), h.client(name="b")
    frame = ns("echo:" + "q" * 100)  # 3-digit length: splits land inside the digits too
    two = ns("echo:first") + ns("echo:second")
    for i in range(1, len(frame)):
        a.send_now(frame[:i])
        time.sleep(0.002)  # let the hub read the first piece alone
        a.send_now(frame[i:])
    wait_frames([a], len(frame) - 1, others=[b])
    got = a.take()
    check_eq(got, [b"q" * 100] * (len(frame) - 1), "frames split at each offset")
    for i in range(1, len(two)):
        a.send_now(two[:i])
        time.sleep(0.002)
        a.send_now(two[i:])
    wait_frames([a], 2 * (len(two) - 1), others=[b])
    check_eq(a.take(), [b"first", b"second"] * (len(two) - 1), "two frames, split")
    check_eq(b.frames, [], "the other client got nothing")


@suite.case
def frames_byte_by_byte():
    h = hub_with()
    a = h.client(name="a")
    data = ns("echo:one") + b"0:," + ns("echo:" + "z" * 1234) + ns("echo:three")
    for i in range(len(data)):
        a.send_now(data[i:i + 1])
        if i % 16 == 0:
            time.sleep(0.001)
    wait_frames([a], 4)
    check_eq(a.take(), [b"one", b"empty", b"z" * 1234, b"three"], "byte-by-byte frames")


@suite.case
def many_frames_in_one_write():
    h = hub_with()
    a = h.client(name="a")
    n = scaled(5000, 1000)
    a.send_now(b"".join(ns("echo:%d" % i) for i in range(n)))
    wait_frames([a], n)
    check_eq(a.take(), [str(i).encode() for i in range(n)], "pipelined echoes in order")


suite.run()
