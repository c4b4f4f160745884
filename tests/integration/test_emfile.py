#!/usr/bin/python3
"""Running out of file descriptors: evhub started with a small RLIMIT_NOFILE must refuse the
connections it cannot hold without spinning on a listener that stays readable (the EMFILE
trap), keep serving the clients it has, and accept again once descriptors are free."""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (CMD_SCRIPT, SLOW, VALGRIND, Hub, Suite, check, check_eq,  # noqa: E402
                           parse_error_frame, pump, request, wait_for)

suite = Suite("emfile")

NOFILE = 64


class LimitedHub(Hub):
    """A hub whose descriptor table holds NOFILE entries (prlimit from util-linux)."""

    def command(self, *extra):
        return ["prlimit", "--nofile=%d:%d" % (NOFILE, NOFILE), "--"] + super().command(*extra)


def idle_cpu_share(h):
    """The share of a core the hub uses over two quiet seconds (prlimit execs evhub, so
    h.pid is the hub itself), and the span measured."""
    t0, c0 = time.monotonic(), h.cpu_seconds()
    time.sleep(2.0)  # the measuring window, not a wait
    span = time.monotonic() - t0
    return (h.cpu_seconds() - c0) / span, span


@suite.case
def emfile_refuses_without_spinning():
    h = LimitedHub(CMD_SCRIPT, evapi={"max_clients": 1000}).start()
    held = []
    # Connect until the hub starts refusing: refused sockets see EOF without any frame.
    for i in range(NOFILE + 20):
        c = h.client(name="c%d" % i)
        held.append(c)
    h.wait_log("Too many open files")
    pump(held, until=lambda: any(c.eof for c in held), what="a refused client's EOF")
    # Let every connect reach the hub, then measure its CPU while nothing else happens.
    time.sleep(0.5)
    pump(held, until=lambda: all(not c.out for c in held), what="settle")
    used = idle_cpu_share(h)[0]
    check(used < 0.3, "evhub used %.0f%% of a core while idle at its descriptor limit" %
          (used * 100))
    alive = [c for c in held if not c.eof]
    refused = [c for c in held if c.eof]
    check(len(refused) > 0, "no connection was refused at a %d-descriptor limit" % NOFILE)
    check(len(alive) > NOFILE // 2, "only %d connections were kept" % len(alive))
    # The error frame is best effort (the descriptor freed for it can be taken by someone
    # else, valgrind for one), but nothing else may reach a refused client.
    errors = [[parse_error_frame(f).get("error") for f in c.frames] for c in refused]
    check(all(e in ([], ["unavailable"]) for e in errors), "refused clients got %r" % errors)
    if not VALGRIND:  # under valgrind its own descriptors take the freed slot first
        check(["unavailable"] in errors, "no refused client was told why: %r" % errors)
    # The connections it holds are served as before.
    for c in alive[:5]:
        check_eq(request(c, "echo:still", others=[x for x in alive if x is not c]), b"still",
                 "a held client is served")
    # Free descriptors and connect again: accepted and served.
    for c in alive[: NOFILE // 4]:
        c.close()
    # The hub notices those closes asynchronously: until it has, a new client may still be
    # refused, so retry (each try ends at the first frame or EOF).
    others = alive[NOFILE // 4:]

    def try_late():
        n = h.client(name="late")
        n.send("echo:late")
        pump([n] + others, until=lambda: n.frames or n.eof, what="a late client's answer")
        if n.frames and n.frames[0] != b"late":
            parse_error_frame(n.frames[0])  # only a refusal may come instead
            n.close()
        return n.frames
    wait_for(try_late, lambda frames: frames == [b"late"],
             "a new client accepted after descriptors were freed",
             timeout=20 if not SLOW else 60, interval=0.2)


@suite.case
def control_socket_at_the_limit_does_not_spin():
    # The control listener has no spare descriptor: out of descriptors, it stops accepting
    # for a second at a time instead of being called back for ever, and serves again once
    # descriptors are free.
    h = LimitedHub(CMD_SCRIPT, evapi={"max_clients": 1000}).start()
    h.wait_log("control socket ")
    held = [h.client(name="c%d" % i) for i in range(NOFILE + 20)]
    h.wait_log("Too many open files")
    pump(held, until=lambda: any(c.eof for c in held), what="a refused client's EOF")
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.connect(h.ctl_path)  # queued by the kernel; the hub's accept fails
    h.wait_log("control: accept failed")
    time.sleep(0.5)
    used, span = idle_cpu_share(h)
    check(used < 0.3, "evhub used %.0f%% of a core with a control connection it cannot accept"
          % (used * 100))
    fails = h.count_log("control: accept failed")
    check(fails <= span + 4, "%d accept failures logged in %.1f s: it spins" % (fails, span))
    ctl.close()
    for c in held[: NOFILE // 2]:
        c.close()
    wait_for(lambda: h.ctl("status"), lambda r: r[0] == 0, "the control socket serving again",
             timeout=20 if not SLOW else 60, interval=0.2)


suite.run()
