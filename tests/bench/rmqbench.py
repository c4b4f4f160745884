#!/usr/bin/python3
"""rmqbench: confirmed RabbitMQ publishes per second from Lua, next to a plain rabbitmq-c
publisher, into the same private rabbitmq-server in the same run.

Starts a loopback rabbitmq-server (as the integration tests do), then:
  1. baseline: rmqtool bench (rabbitmq-c, confirm.select, at most WINDOW unconfirmed, 256-byte
     bodies, default exchange into a durable queue);
  2. evhub (workers = 2): a client asks the script for CHUNK publishes at a time until N
     (rabbitmq.publish with a report function each); the rate is N over the time from the
     first request to the last report. Meanwhile a second client relays ping round trips.
Repeats both ROUNDS times, alternating, and prints each rate, the ratio hub / plain of the
medians, and the relay round trips during the hub's runs.

usage: rmqbench.py [--evhub PATH] [-n N] [--rounds R]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
from rmq_broker import Broker  # noqa: E402

WINDOW = 4096  # the hub's unconfirmed window (transports/rabbitmq.c WINDOW)
SIZE = 256
CHUNK = 1000

SCRIPT = r'''
local want, ok, failed, conn = 0, 0, 0, nil
local body = string.rep("x", %d)
local function report(r)
    if r.status == 0 then ok = ok + 1 else failed = failed + 1 end
    if want > 0 and ok + failed == want then
        conn:send("done " .. ok .. " " .. failed)
        want = 0
    end
end
evapi.on("message", function(c, msg)
    local cmd, arg = msg:match("^(%%a+):?(.*)$")
    if cmd == "want" then
        want, ok, failed, conn = tonumber(arg), 0, 0, c
    elseif cmd == "pub" then
        for i = 1, tonumber(arg) do
            local good, err = rabbitmq.publish("r1", "", "hubq", body, nil, report)
            if not good then failed = failed + 1 end
        end
    elseif cmd == "ping" then
        c:send("pong")
    end
end)
''' % SIZE


def ns(data):
    return b"%d:%s," % (len(data), data)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.s.sendall(ns(data))

    def frame(self):
        while True:
            colon = self.buf.find(b":")
            if colon > 0:
                n = int(self.buf[:colon])
                if len(self.buf) >= colon + n + 2:
                    f = self.buf[colon + 1:colon + 1 + n]
                    self.buf = self.buf[colon + n + 2:]
                    return f
            d = self.s.recv(65536)
            if not d:
                raise RuntimeError("hub closed the connection")
            self.buf += d


def pinger(port, stop, rtts):
    c = Conn(port)
    while not stop.is_set():
        t = time.perf_counter()
        c.send(b"ping")
        c.frame()
        rtts.append(time.perf_counter() - t)
        time.sleep(0.001)


def purge(tool, b, q):
    subprocess.run([tool, "purge", b.url(), q], check=True, timeout=60)


def run_plain(tool, b, n):
    purge(tool, b, "plainq")
    r = subprocess.run([tool, "bench", b.url(), "plainq", str(n), str(SIZE), str(WINDOW)],
                       capture_output=True, text=True, check=True, timeout=600)
    return json.loads(r.stdout)["rate"]


def run_hub(port, n):
    c = Conn(port)
    stop, rtts = threading.Event(), []
    th = threading.Thread(target=pinger, args=(port, stop, rtts))
    th.start()
    c.send(b"want:%d" % n)
    t0 = time.perf_counter()
    for _ in range(n // CHUNK):
        c.send(b"pub:%d" % CHUNK)
    done = c.frame().decode()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    _, ok, failed = done.split()
    if int(ok) != n:
        raise RuntimeError("hub: %s of %d confirmed (%s failed)" % (ok, n, failed))
    return n / dt, rtts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--evhub", default=os.path.join(SOURCE, "build", "evhub"))
    ap.add_argument("-n", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tool = os.path.join(os.path.dirname(os.path.abspath(a.evhub)), "tests", "bench", "rmqtool",
                        "rmqtool")
    b = Broker(tool)
    hub = None
    try:
        b.start()
        b.declare("plainq")
        b.declare("hubq")
        d = tempfile.mkdtemp(prefix="rmqbench-")
        with open(os.path.join(d, "bench.lua"), "w") as f:
            f.write(SCRIPT)
        port = None
        with open(os.path.join(d, "evhub.conf"), "w") as f:
            f.write("[evapi]\nbind_addr = 127.0.0.1:0\nworkers = 2\n[lua]\nscript = bench.lua\n"
                    "[control]\nsocket = %s/ctl.sock\n[log]\nlevel = notice\n"
                    "[rabbitmq]\nserver = [r1]%s\n" % (d, b.url()))
        log = open(os.path.join(d, "evhub.log"), "w+")
        hub = subprocess.Popen([a.evhub, "-f", "-c", os.path.join(d, "evhub.conf")],
                               stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            log.seek(0)
            for line in log:
                if "listening on" in line:
                    port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
            time.sleep(0.05)
        plain, hubr, allrtt = [], [], []
        for i in range(a.rounds):
            plain.append(run_plain(tool, b, a.n))
            purge(tool, b, "hubq")
            r, rtts = run_hub(port, a.n)
            hubr.append(r)
            allrtt += rtts
            print("round %d: plain %.0f msg/s, hub %.0f msg/s (ratio %.2f)" % (
                i + 1, plain[-1], hubr[-1], hubr[-1] / plain[-1]))
            sys.stdout.flush()
        allrtt.sort()
        mp, mh = statistics.median(plain), statistics.median(hubr)
        print("median: plain %.0f msg/s, hub %.0f msg/s, ratio %.2f (goal >= 0.9)" % (
            mp, mh, mh / mp))
        print("relay round trips during the hub's runs: %d, p50 %.2f ms, p99 %.2f ms, max %.2f ms"
              % (len(allrtt), allrtt[len(allrtt) // 2] * 1e3,
                 allrtt[int(len(allrtt) * 0.99)] * 1e3, allrtt[-1] * 1e3))
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait()
        b.close()


if __name__ == "__main__":
    main()
