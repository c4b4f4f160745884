#!/usr/bin/python3
"""ctlbench: what the control socket costs the clients of a busy hub.

Starts evhub (native example script, workers = 0 so the loop thread also runs Lua), opens
--conns idle connections, and measures the round-trip time of a ping client ("ping" ->
"pong") in a separate process, first alone (the baseline), then while another client asks
the control socket for `clients` (every connection listed) in a loop, then for `stats`.
Prints each run's RTT percentiles next to the baseline's, and how fast the commands answer:
the mean time from the request to the answer's first byte (the hub builds an answer whole
before it writes it, so this is the hub's time) and to its last (the reader's time to take in
a `clients` listing of 1.5 MB at 9,000 connections counts there too).

usage: ctlbench.py [--evhub PATH] [--conns N] [--seconds S]
"""

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))

PINGER = r'''
import socket, sys, time
p = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.monotonic() + float(sys.argv[2])
rtts = []
while time.monotonic() < end:
    t = time.perf_counter()
    p.sendall(b"4:ping,")
    d = b""
    while not d.endswith(b","):
        d += p.recv(64)
    rtts.append(time.perf_counter() - t)
print(" ".join("%.9f" % r for r in rtts))
'''


def percentile(sorted_v, q):
    return sorted_v[min(len(sorted_v) - 1, int(len(sorted_v) * q))]


def ask(sock, method):
    """Ask method; returns the seconds until the answer's first byte came."""
    t = time.perf_counter()
    sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
    buf = bytearray()  # appending to bytes would copy the whole answer at every recv
    first = None
    while not buf.endswith(b"\n"):
        d = sock.recv(1 << 20)
        if not d:
            sys.exit("ctlbench: the hub closed the control connection")
        if first is None:
            first = time.perf_counter() - t
        buf += d
    return first


def run(port, ctl_path, method, seconds):
    """Ping for `seconds` while method (or nothing) is asked in a loop; returns
    (sorted RTTs in ms, commands answered, their mean times in ms to the first byte and to
    the whole answer)."""
    pinger = subprocess.Popen([sys.executable, "-c", PINGER, str(port), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    done, spent, to_first = 0, 0.0, 0.0
    if method:
        s = socket.socket(socket.AF_UNIX)
        s.connect(ctl_path)
        end = time.monotonic() + seconds
        while time.monotonic() < end and pinger.poll() is None:
            t = time.perf_counter()
            to_first += ask(s, method)
            spent += time.perf_counter() - t
            done += 1
        s.close()
    out = pinger.communicate()[0].split()
    rtts = sorted(float(x) * 1000 for x in out)
    return rtts, done, (to_first / done * 1000 if done else 0.0), (spent / done * 1000
                                                                    if done else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evhub", default=os.path.join(SOURCE, "build", "evhub"))
    ap.add_argument("--conns", type=int, default=9000)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = min(a.conns, hard - 200)
    if conns < a.conns:
        print("ctlbench: %d connections (RLIMIT_NOFILE hard limit %d)" % (conns, hard))
    tmp = tempfile.mkdtemp(prefix="ctlbench.")
    conf, ctl_path, log = (os.path.join(tmp, n) for n in ("evhub.conf", "ctl.sock", "evhub.log"))
    with open(conf, "w") as f:
        f.write("[evapi]\nbind_addr = 127.0.0.1:0\nworkers = 0\nmax_clients = %d\n"
                "[lua]\nscript = %s\n[control]\nsocket = %s\n[log]\nlevel = notice\n"
                % (conns + 16, os.path.join(SOURCE, "examples", "native.lua"), ctl_path))
    with open(log, "wb") as lf:
        hub = subprocess.Popen([a.evhub, "-c", conf, "-f"], stdout=lf, stderr=lf,
                               preexec_fn=lambda: resource.setrlimit(
                                   resource.RLIMIT_NOFILE, (hard, hard)))
    try:
        port = None
        for _ in range(500):
            text = open(log).read()
            if "listening on" in text and os.path.exists(ctl_path):
                port = int(text.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                break
            time.sleep(0.01)
        if port is None:
            sys.exit("ctlbench: evhub did not start:\n" + open(log).read())
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
        time.sleep(0.5)
        print("ctlbench: %d idle connections, workers = 0, %.0f s per run; ping RTT in ms"
              % (len(idle), a.seconds))
        print("  %-22s %8s %8s %8s %8s %9s %12s" % ("run", "p50", "p99", "p99.9", "max", "pings",
                                                 "command ms: first byte / all (n)"))
        base = None
        for label, method in (("baseline (no command)", None), ("`clients` in a loop",
                                                                 "clients"),
                              ("`stats` in a loop", "stats")):
            rtts, done, first, per = run(port, ctl_path, method, a.seconds)
            row = [percentile(rtts, q) for q in (0.5, 0.99, 0.999)] + [rtts[-1]]
            if base is None:
                base = row
            print("  %-22s %8.3f %8.3f %8.3f %8.3f %9d %12s" % (
                label, *row, len(rtts), "%.2f / %.2f (%d)" % (first, per, done) if method else "-"))
            if method:
                print("  %-22s %7.2fx %7.2fx %7.2fx %7.2fx" % (
                    "  vs baseline", *[r / b if b else 0 for r, b in zip(row, base)]))
        for c in idle:
            c.close()
    finally:
        hub.terminate()
        hub.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
