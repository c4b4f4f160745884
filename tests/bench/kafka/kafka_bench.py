#!/usr/bin/python3
"""Kafka publishing benchmark (issue 8; not a test). One mock broker (kafka_mock) serves both
sides, alternating, in the same run:

  hub    messages published from Lua (kafka.publish with a report function for every one,
         workers = 0) until every report has run: messages/s, and the hub's CPU per message
  plain  kafkabench, a plain librdkafka producer with the same properties, same sizes

  floor  luafloor: the script's own Lua work, in a bare Lua state with no hub and no
         librdkafka, every report served the cheapest way any host could (CPU per message)

and, meanwhile, a client relays frames through the hub to another client (a multicast by
tag): frames/s relayed while the hub publishes, next to frames/s with no publishing (measured
first). The relay goes on during both sides' runs (the plain producer shares the machine
with it as the hub shares its loop). Each round then pauses the relay and runs both sides
again: those runs give each side's own CPU per message (the hub's process would otherwise
count the relaying too) and the rates with nothing else going on. Figures are ratios within
this one run; the machine is shared.

  kafka_bench.py [--count N] [--size BYTES] [--rounds R] [--batch B] [--workers W] [--perf F]
Environment: EVHUB_BIN (default build/evhub), the tools next to it under tests/bench/kafka/.
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
sys.path.insert(0, os.path.join(HERE, "..", "..", "integration"))
from evhub_harness import BIN, Hub  # noqa: E402

TOOLS = os.path.join(os.path.dirname(BIN), "tests", "bench", "kafka")
PROPS = ["linger.ms=5", "acks=all"]  # the same for both sides (librdkafka's defaults, said)

SCRIPT = r'''
local target, got, fails, waiter, payload = 0, 0, 0, nil, ""
local function rep(r)
    if r.status == 0 then got = got + 1 else fails = fails + 1 end
    if waiter and got + fails >= target then
        waiter:send("done " .. got .. " " .. fails)
        waiter = nil
    end
end
evapi.on("message", function(conn, msg)
    local cmd, a, b = msg:match("^(%a+) ?(%d*) ?(%d*)$")
    if cmd == "reset" then
        target, got, fails, waiter = tonumber(a), 0, 0, conn
        payload = string.rep("x", tonumber(b))
        conn:send("ready")
    elseif cmd == "pub" then
        local n0 = tonumber(b)
        for i = n0, n0 + tonumber(a) - 1 do kafka.publish("b", payload, "k" .. i, rep) end
        conn:send("ok")
    elseif cmd == "pubn" then              -- no report function
        local n0 = tonumber(b)
        for i = n0, n0 + tonumber(a) - 1 do kafka.publish("b", payload, "k" .. i) end
        conn:send("ok")
    elseif cmd == "sink" then
        conn:set_tag("sink")
        conn:send("sink")
    else
        evapi.multicast(msg, "sink")
    end
end)
'''


def ns(b):
    return b"%d:%s," % (len(b), b)


class Conn:
    def __init__(self, addr):
        self.s = socket.create_connection(addr)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, b):
        self.s.sendall(ns(b))

    def frame(self, timeout=120):
        self.s.settimeout(timeout)
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


class Relay:
    """A sender multicasting 64-byte frames to a sink client as fast as a window of 256 frames
    in flight allows; counts frames the sink got, per interval."""

    def __init__(self, addr):
        self.sink = Conn(addr)
        self.sink.send(b"sink")
        assert self.sink.frame() == b"sink"
        self.src = Conn(addr)
        self.got = 0
        self.sent = 0
        self.stop = False
        self.paused = False
        self.lock = threading.Condition()
        self.t1 = threading.Thread(target=self._send, daemon=True)
        self.t2 = threading.Thread(target=self._recv, daemon=True)
        self.t1.start()
        self.t2.start()

    def _send(self):
        chunk = ns(b"r" * 64) * 64
        while not self.stop:
            with self.lock:
                while (self.sent - self.got > 256 or self.paused) and not self.stop:
                    self.lock.wait(0.1)
            try:
                self.src.s.sendall(chunk)
            except OSError:
                return  # the hub is gone: the run is over
            self.sent += 64

    def _recv(self):
        frame_len = len(ns(b"r" * 64))
        pending = 0
        while not self.stop:
            try:
                d = self.sink.s.recv(1 << 16)
            except OSError:
                return
            if not d:
                return
            pending += len(d)
            with self.lock:
                self.got += pending // frame_len
                pending %= frame_len
                self.lock.notify()

    def pause(self, paused):
        """Stop sending (and let what is in flight arrive), or go on."""
        with self.lock:
            self.paused = paused
            self.lock.notify_all()
        if paused:
            time.sleep(0.2)

    def rate(self, seconds):
        g0, t0 = self.got, time.monotonic()
        time.sleep(seconds)
        return (self.got - g0) / (time.monotonic() - t0)


def hub_round(hub, ctl, relay, count, size, batch, reports=True):
    ctl.send(b"reset %d %d" % (count if reports else 0, size))
    assert ctl.frame() == b"ready"
    cpu0, g0 = hub.cpu_seconds(), relay.got
    t0 = time.monotonic()
    # two batches in flight: each loop iteration publishes at most a batch or two, as a
    # script serving live traffic would
    sent = acked = 0
    starts = list(range(0, count, batch))
    while acked < len(starts):
        while sent < len(starts) and sent - acked < 2:
            ctl.send(b"%s %d %d" % (b"pub" if reports else b"pubn", min(batch, count - starts[sent]),
                                    starts[sent] + 1))
            sent += 1
        f = ctl.frame()
        if f == b"ok":
            acked += 1
        elif f.startswith(b"done"):
            raise RuntimeError("done before every batch was acknowledged: %r" % f)
    if reports:
        done = ctl.frame(timeout=300)
    else:  # no reports: the connection's counters say when every message is delivered
        deadline = time.monotonic() + 300
        while True:
            st = json.loads(subprocess.run(
                [os.path.join(os.path.dirname(BIN), "evhubctl"), "-s", hub.ctl_path, "--json",
                 "kafka", "status"], capture_output=True).stdout)["connections"][0]
            if st["in_flight"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        done = b"done %d 0" % count if st["in_flight"] == 0 else b"timeout"
    dt = time.monotonic() - t0
    relayed = (relay.got - g0) / dt
    parts = done.split()
    if parts[0] != b"done" or int(parts[2]) != 0:
        raise RuntimeError("hub round: %r" % done)
    return count / dt, (hub.cpu_seconds() - cpu0) / count, relayed


def plain_round(bootstrap, count, size):
    out = subprocess.run([os.path.join(TOOLS, "kafkabench"), bootstrap, "bench", str(count),
                          str(size)] + PROPS, capture_output=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError("kafkabench: %r" % out.stderr)
    f = out.stdout.split()
    return float(f[4]), float(f[5]) / 1e6


def floor_round(count, size, batch):
    """The Lua floor: CPU per message of the script alone, with and without reports."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(SCRIPT)
        f.flush()
        out = subprocess.run([os.path.join(TOOLS, "luafloor"), f.name, str(count), str(size),
                              str(batch)], capture_output=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError("luafloor: %r" % out.stderr)
    f = out.stdout.split()
    return float(f[1]) / 1e6, float(f[2]) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--perf", metavar="FILE",
                    help="record the hub (perf record; options from KAFKA_BENCH_PERF_ARGS, default"
                    " -g) during its rounds with reports and the relay paused: FILE.1, FILE.2...")
    o = ap.parse_args()
    mock = subprocess.Popen([os.path.join(TOOLS, "kafka_mock"), "bench"], stdout=subprocess.PIPE)
    hub = None
    try:
        bootstrap = mock.stdout.readline().decode().strip()
        props = "&".join("g." + p for p in PROPS)
        hub = Hub(script=SCRIPT, evapi={"workers": str(o.workers)},
                  extra="[kafka]\nbroker = [b]%s/bench?%s\n" % (bootstrap, props)).start()
        relay = Relay(hub.addr)
        time.sleep(0.5)
        relay_alone = relay.rate(2.0)
        ctl = Conn(hub.addr)
        hub_rates, plain_rates, relays, bare = [], [], [], []
        q_hub, q_plain, cpus, pcpus = [], [], [], []
        hub_round(hub, ctl, relay, min(o.count, 10000), o.size, o.batch)  # warm-up
        for r in range(o.rounds):
            # with the relay going: the goal's figures
            h, _, rel = hub_round(hub, ctl, relay, o.count, o.size, o.batch)
            p, _ = plain_round(bootstrap, o.count, o.size)
            n, _, _ = hub_round(hub, ctl, relay, o.count, o.size, o.batch, reports=False)
            # the relay paused: each side's own CPU per message, and rates with nothing else on
            relay.pause(True)
            perf = None
            if o.perf:
                perf = subprocess.Popen(
                    ["perf", "record"] + os.environ.get("KAFKA_BENCH_PERF_ARGS", "-g").split() +
                    ["-q", "-o", "%s.%d" % (o.perf, r + 1), "-p", str(hub.pid)],
                    stdout=subprocess.DEVNULL)
                time.sleep(0.5)
            hq, cpu, _ = hub_round(hub, ctl, relay, o.count, o.size, o.batch)
            if perf:
                perf.send_signal(2)
                perf.wait()
            pq, pcpu = plain_round(bootstrap, o.count, o.size)
            relay.pause(False)
            for lst, v in ((hub_rates, h), (plain_rates, p), (relays, rel), (bare, n), (q_hub, hq),
                           (q_plain, pq), (cpus, cpu), (pcpus, pcpu)):
                lst.append(v)
            print("round %d: relaying: hub %.0f msg/s (%.0f without reports), plain %.0f msg/s "
                  "(ratio %.2f), relayed %.0f frames/s; relay paused: hub %.0f, plain %.0f msg/s "
                  "(ratio %.2f), CPU per message hub %.2f us, plain %.2f us" %
                  (r + 1, h, n, p, h / p, rel, hq, pq, hq / pq, cpu * 1e6, pcpu * 1e6))
            sys.stdout.flush()
        relay.stop = True
        floors = [floor_round(o.count, o.size, o.batch)[0] for _ in range(3)]
        med = statistics.median
        hm, pm = med(hub_rates), med(plain_rates)
        print("messages of %d bytes, %d per round, properties %s, workers = %d, %d rounds" %
              (o.size, o.count, " ".join(PROPS), o.workers, o.rounds))
        print("median, relaying: hub (reports on) %.0f msg/s, plain librdkafka %.0f msg/s: ratio "
              "%.2f; hub without reports %.0f msg/s: ratio %.2f" %
              (hm, pm, hm / pm, med(bare), med(bare) / pm))
        print("median, relay paused: hub (reports on) %.0f msg/s, plain %.0f msg/s: ratio %.2f" %
              (med(q_hub), med(q_plain), med(q_hub) / med(q_plain)))
        print("CPU per published message (median, relay paused, all threads): hub %.2f us, "
              "plain %.2f us" % (med(cpus) * 1e6, med(pcpus) * 1e6))
        fl = med(floors)
        print("Lua floor (luafloor, the script's Lua work alone, median of 3): %.2f us per message;"
              " plain + floor = %.2f us, hub over that: %.2f us; with no core to spare (the relay"
              " going) a hub could reach at most plain / (plain + floor) = %.2f of the plain rate"
              % (fl * 1e6, (med(pcpus) + fl) * 1e6, (med(cpus) - med(pcpus) - fl) * 1e6,
                 med(pcpus) / (med(pcpus) + fl)))
        print("relay (multicast to 1 client): %.0f frames/s alone, %.0f frames/s while publishing"
              " (ratio %.2f)" % (relay_alone, med(relays), med(relays) / relay_alone))
        print("rate ranges: hub %.0f..%.0f, plain %.0f..%.0f msg/s" %
              (min(hub_rates), max(hub_rates), min(plain_rates), max(plain_rates)))
    finally:
        if hub:
            hub.kill()
        mock.terminate()
        mock.wait()


if __name__ == "__main__":
    main()
