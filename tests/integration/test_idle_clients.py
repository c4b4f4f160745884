#!/usr/bin/python3
"""Idle connections cost little (issue 13): a hub with 10,000 idle clients holds no read buffer
for any of them. The read_buffers gauge counts the buffers clients hold: one per client with
part of a frame received, none once its frames are complete, whether its frames ran at once
(workers = 0), in a worker, or after reading from it was paused for a full worker queue."""

import os
import resource
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Suite, check, check_eq, scaled, wait_for,  # noqa: E402
                           wait_frames)

suite = Suite("idle_clients")

QUIET = 'evapi.on("message", function(conn, msg) end)\n'


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def stats(h):
    return h.ctl_json("stats")


def buffers(h, nbuf, what):
    """Wait until the hub's clients hold exactly nbuf read buffers."""
    st = wait_for(lambda: stats(h), lambda st: st["read_buffers"] == nbuf, what)
    check((st["read_buffer_bytes"] > 0) == (nbuf > 0),
          "read_buffer_bytes %d with %d buffers" % (st["read_buffer_bytes"], nbuf))
    return st


def idle_clients(workers):
    # The hub inherits this limit: it needs a descriptor per client too.
    n = scaled(10000, 2000)
    n = min(n, raise_nofile(n + 200) - 200)
    check(n >= 1000, "only %d descriptors" % n)
    h = Hub(QUIET, evapi={"workers": workers, "max_clients": n + 10, "backlog": 4096},
            log={"level": "notice"}).start()
    host, port = h.addr
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, port))
            socks.append(s)
        wait_for(lambda: stats(h), lambda st: st["clients"] == n, "%d clients open" % n)
        st = buffers(h, 0, "no read buffer for clients that sent nothing")
        # Every client sends a frame; every other one only its first part.
        for i, s in enumerate(socks):
            s.sendall(b"5:he" if i % 2 else b"5:hello,")
        half = n // 2
        st = buffers(h, half, "a buffer for each of the %d clients with a partial frame" % half)
        check_eq(st["frames_in"], n - half, "frames in with half of them partial")
        print("  %d clients, %d with a partial frame: read_buffer_bytes %d" % (
            n, half, st["read_buffer_bytes"]))
        for i, s in enumerate(socks):
            if i % 2:
                s.sendall(b"llo,")
        wait_for(lambda: stats(h), lambda st: st["frames_in"] == n, "every frame in")
        st = buffers(h, 0, "no read buffer once every frame is complete")
        check_eq(st["clients"], n, "clients still open")
        # Closing gives back what a client held: a partial frame's buffer too.
        for s in socks[:10]:
            s.sendall(b"3:ab")
        buffers(h, 10, "ten partial frames")
        for s in socks[:10]:
            s.close()
        wait_for(lambda: stats(h), lambda st: st["clients"] == n - 10, "ten closed")
        buffers(h, 0, "the closed clients' buffers released")
    finally:
        for s in socks:
            s.close()
    h.stop()


suite.case_with("idle_clients_hold_no_read_buffer_workers0", idle_clients, 0)
suite.case_with("idle_clients_hold_no_read_buffer_workers2", idle_clients, 2)


@suite.case
def a_client_paused_for_its_worker_keeps_no_buffer_once_caught_up():
    # One worker taking one event at a time, each taking 20 ms: a client's ten frames in one
    # write are read together, reading from it pauses with nine still buffered, and they are
    # handed over as the worker takes them. Once the last one ran, no buffer is left held,
    # although nothing more is read from that client.
    slow = ('evapi.on("message", function(conn, msg)\n'
            '    local t = os.clock()\n'
            '    while os.clock() - t < 0.02 do end\n'
            '    conn:send("done " .. msg)\n'
            'end)\n')
    h = Hub(slow, evapi={"workers": 1, "worker_queue": 1}).start()
    c = h.client()
    c.send_raw(b"".join(b"1:%d," % i for i in range(10)))
    wait_frames([c], 10)
    check_eq(c.take(), [b"done %d" % i for i in range(10)], "replies in order")
    buffers(h, 0, "no buffer held once the paused client's frames ran")
    h.stop()


suite.run()
