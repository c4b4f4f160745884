#!/usr/bin/python3
"""Issue 12, item 1, end to end: a control client that pipelines listings and never reads.
With many clients connected, one control connection sends a thousand `clients` requests
(pipelined, then as one batch) and reads nothing. The hub must stop reading it once a few
answers are unsent (backpressure), so its memory stays bounded and traffic keeps flowing;
when the control client finally reads, every answer is there."""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (SLOW, Hub, Raw, Suite, check, check_eq,  # noqa: E402
                           request, scaled)

suite = Suite("hostile_control")

SCRIPT = r'''
evapi.on("message", function(conn, msg) conn:send(msg) end)
'''

NCLIENTS = scaled(1000, 300)
NREQ = scaled(1000, 150)
NREQ_BATCH = scaled(200, 60)  # one line of answers, parsed whole at the end


def connect_many(h, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(h.addr)
        socks.append(s)
    return socks


def wait_clients(h, n):
    deadline = time.time() + scaled(20, 120)
    while time.time() < deadline:
        st = h.ctl_json("status")
        if st.get("clients", 0) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("clients never reached %d" % n)


def read_answers(raw, n, batch):
    """Read n answers (one line of n for a batch); return their ids."""
    raw.sock.settimeout(scaled(60, 600))
    ids = []
    if batch:
        buf = bytearray(raw.buf)
        while not buf.endswith(b"\n"):
            chunk = raw.sock.recv(1 << 20)
            check(chunk, "the connection stays open until the batch's answer is read")
            buf += chunk
        a = json.loads(bytes(buf))
        check(isinstance(a, list), "a batch answer is an array")
        ids = [e["id"] for e in a]
        for e in a:
            check_eq(len(e["result"]["clients"]), NCLIENTS + 1, "clients listed in one answer")
    else:
        for _ in range(n):
            a = raw.answer()
            ids.append(a["id"])
            check_eq(len(a["result"]["clients"]), NCLIENTS + 1, "clients listed in one answer")
    return ids


def flood_and_measure(batch):
    h = Hub(SCRIPT, evapi={"workers": 0, "max_clients": NCLIENTS + 16})
    h.start()
    h.wait_log("control socket ")
    socks = connect_many(h, NCLIENTS)
    talker = h.client(name="talker")
    wait_clients(h, NCLIENTS + 1)
    check_eq(request(talker, b"warm"), b"warm", "a round trip before")
    rss0 = h.rss_kb()

    raw = Raw(h.ctl_path)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    nreq = NREQ_BATCH if batch else NREQ
    reqs = [{"jsonrpc": "2.0", "id": i, "method": "clients"} for i in range(1, nreq + 1)]
    if batch:
        raw.send(json.dumps(reqs) + "\n")
    else:
        raw.send("".join(json.dumps(r) + "\n" for r in reqs))

    # Traffic goes on while the control client reads nothing.
    worst = 0.0
    peak = rss0
    end = time.time() + scaled(3, 10)
    n = 0
    while time.time() < end:
        t0 = time.time()
        check_eq(request(talker, b"ping%d" % n), b"ping%d" % n, "a round trip during")
        worst = max(worst, time.time() - t0)
        peak = max(peak, h.rss_kb())
        n += 1
        time.sleep(0.01)
    grew_mb = (peak - rss0) / 1024.0
    print("  %s: %d requests unread, %d clients: rss grew %.1f MB, worst round trip %.1f ms "
          "over %d" % ("batch" if batch else "pipelined", nreq, NCLIENTS, grew_mb,
                       worst * 1000, n))
    # Each unread answer would be ~170 bytes a client: all of them nreq * NCLIENTS * 170
    # bytes (170 MB pipelined, 34 MB batched here). Bounded: a few answers and the socket
    # buffers.
    check(grew_mb < 20, "memory grew %.1f MB with unread control answers" % grew_mb)
    if not SLOW:
        check(worst < 0.5, "a traffic round trip took %.0f ms" % (worst * 1000))

    # Now read: every answer arrives, in order for the pipelined ones.
    ids = read_answers(raw, nreq, batch)
    if batch:
        check_eq(sorted(ids), list(range(1, nreq + 1)), "every batch answer")
    else:
        check_eq(ids, list(range(1, nreq + 1)), "every answer, in order")
    raw.close()
    for s in socks:
        s.close()
    h.stop()


@suite.case
def pipelined_listings_unread_stay_bounded():
    flood_and_measure(batch=False)


@suite.case
def a_batch_of_listings_unread_stays_bounded():
    flood_and_measure(batch=True)


if __name__ == "__main__":
    suite.run()
