#!/usr/bin/env python3
"""The cost of crossing a node (issue 10's benchmark; not a test).

The fan-out workload — 4 publishers, 16 subscribers tagged "subs", 128-byte frames, a Lua
callback per message that multicasts it, paced at --rate frames a second in total — run side
by side, in one invocation, through one local nats-server:

  one node          the baseline: one hub, no [cluster]
  one node+cluster  the same hub with [cluster] connected to NATS and no other node: what the
                    module costs when nothing crosses
  two nodes         the publishers and 8 subscribers on node A, 8 subscribers on node B: every
                    message crosses once (A -> NATS -> B) and fans out on B

The variants alternate, --rounds times (the machine is shared and noisy). Printed per run and
as medians: deliveries a second, p50/p99/p99.9 latency, and CPU µs per published message of
each hub and of nats-server; then the ratios against the baseline.

  EVHUB_BIN=build/evhub python3 tests/bench/cluster/cluster_bench.py [--rate 20000]
      [--seconds 5] [--rounds 3] [--fanload build/tests/bench/cluster/fanload]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

SCRIPT = """-- cluster bench: subscribers say "sub", everything else is multicast to them
evapi.on("message", function(conn, msg)
    if msg == "sub" then
        conn:set_tag("subs")
        conn:send("ok")
    else
        evapi.multicast(msg, "subs")
    end
end)
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("%s exited (rc %s)" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit("%s did not listen on %d" % (what, port))


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Proc:
    def __init__(self, cmd, log):
        self.log = log
        with open(log, "wb") as out:
            self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def start_hub(evhub, d, name, nats_url):
    port = free_port()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "bench.lua"), "w") as f:
        f.write(SCRIPT)
    conf = ("[evapi]\nbind_addr = 127.0.0.1:%d\nworkers = 0\nmax_outbuf = 64m\n"
            "[lua]\nscript = bench.lua\n[log]\nlevel = notice\n[control]\nsocket = %s/ctl.sock\n"
            % (port, d))
    if nats_url:
        conf += "[cluster]\nnats = %s\nnode = %s\nheartbeat = 200\nnode_timeout = 1000\n" % (
            nats_url, name)
    with open(os.path.join(d, "evhub.conf"), "w") as f:
        f.write(conf)
    h = Proc([evhub, "-f", "-c", os.path.join(d, "evhub.conf")], os.path.join(d, "evhub.log"))
    wait_port(port, h.p, "evhub " + name)
    h.port = port
    return h


def stats(evhubctl, d):
    out = subprocess.run([evhubctl, "-s", os.path.join(d, "ctl.sock"), "--json", "stats"],
                         capture_output=True, timeout=20).stdout
    return json.loads(out)


def run(args, variant, nats, tmp, n):
    d = os.path.join(tmp, "%s-%d" % (variant.replace(" ", "_").replace("+", "_"), n))
    url = nats and "nats://127.0.0.1:%d" % nats[1]
    hubs = []
    if variant == "two nodes":
        hubs.append(start_hub(args.evhub, d + "/a", "a", url))
        hubs.append(start_hub(args.evhub, d + "/b", "b", url))
        time.sleep(0.5)  # the nodes see each other (heartbeat 200 ms)
        subs = "%d,%d" % (hubs[0].port, hubs[1].port)
    else:
        hubs.append(start_hub(args.evhub, d + "/a", "a",
                              url if variant == "one node+cluster" else None))
        subs = str(hubs[0].port)
    pids = [h.p.pid for h in hubs] + [nats[0].p.pid]
    c0 = [cpu_ticks(p) for p in pids]
    t0 = time.monotonic()
    out = subprocess.run([args.fanload, "--pub", str(hubs[0].port), "--sub", subs,
                          "--rate", str(args.rate), "--seconds", str(args.seconds),
                          "--warmup", "1"], capture_output=True, timeout=120)
    el = time.monotonic() - t0
    c1 = [cpu_ticks(p) for p in pids]
    if out.returncode != 0:
        sys.exit("fanload failed: %s" % out.stderr.decode())
    r = json.loads(out.stdout)
    # CPU over fanload's whole run (subscribe, settle, warm-up, window, tail), per message
    # published in that time (rate x the run's length)
    tck = os.sysconf("SC_CLK_TCK")
    published = args.rate * (el - 0.6)  # less the two 0.3 s pauses with no publishing
    cpu = [(b - a) / tck for a, b in zip(c0, c1)]
    r["cpu_us_per_msg"] = [round(c / published * 1e6, 2) for c in cpu]
    r["cpu_pct"] = [round(c / el * 100, 1) for c in cpu]
    st = [stats(args.evhubctl, d + ("/a", "/b")[i]) for i in range(len(hubs))]
    r["dropped"] = sum(s.get("dropped_frames", 0) + s.get("slow_closes", 0) for s in st)
    r["crossed"] = sum(sum(s.get("cluster_in", {}).values()) for s in st) if variant == \
        "two nodes" else 0
    r["publish_failed"] = sum(s.get("cluster_publish_failed", 0) for s in st)
    r["gaps"] = sum(s.get("cluster_gaps", 0) for s in st)
    for h in hubs:
        h.stop()
    shutil.rmtree(d, ignore_errors=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--evhub", default=os.environ.get("EVHUB_BIN",
                                                      os.path.join(ROOT, "build", "evhub")))
    ap.add_argument("--evhubctl", default=None)
    ap.add_argument("--fanload", default=None)
    ap.add_argument("--nats-server", default=shutil.which("nats-server") or "nats-server")
    ap.add_argument("--rate", type=float, default=20000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bdir = os.path.dirname(os.path.abspath(args.evhub))
    args.evhubctl = args.evhubctl or os.path.join(bdir, "evhubctl")
    args.fanload = args.fanload or os.path.join(bdir, "tests", "bench", "cluster", "fanload")
    tmp = tempfile.mkdtemp(prefix="evhub-clbench-")
    port = free_port()
    nats = Proc([args.nats_server, "-a", "127.0.0.1", "-p", str(port)],
                os.path.join(tmp, "nats.log"))
    wait_port(port, nats.p, "nats-server")
    variants = ["one node", "one node+cluster", "two nodes"]
    res = {v: [] for v in variants}
    print("cluster_bench: rate %.0f/s, 4 publishers, 16 subscribers, 128 B, %d s windows, "
          "%d rounds (CPU: hubs, then nats-server, µs per published message)" % (
              args.rate, args.seconds, args.rounds))
    try:
        for n in range(args.rounds):
            for v in variants:
                r = run(args, v, (nats, port), tmp, n)
                res[v].append(r)
                print("  round %d %-17s deliveries/s %8.0f  p50 %7.1f µs  p99 %8.1f µs  "
                      "p99.9 %8.1f µs  cpu µs/msg %s  crossed %d  dropped %d  failed %d  "
                      "gaps %d" % (n + 1, v, r["deliveries_s"], r["p50_us"], r["p99_us"],
                                   r["p999_us"], r["cpu_us_per_msg"], r["crossed"],
                                   r["dropped"], r["publish_failed"], r["gaps"]))
                sys.stdout.flush()
    finally:
        nats.stop()
    base = res["one node"]

    def med(rs, k, i=None):
        return statistics.median(x[k] if i is None else sum(x[k][:i]) for x in rs)

    b_del, b_p50, b_p99 = med(base, "deliveries_s"), med(base, "p50_us"), med(base, "p99_us")
    b_cpu = med(base, "cpu_us_per_msg", 1)
    print("medians (ratio to one node):")
    for v in variants:
        rs = res[v]
        nh = 2 if v == "two nodes" else 1
        hub_cpu = med(rs, "cpu_us_per_msg", nh)
        all_cpu = statistics.median(sum(x["cpu_us_per_msg"]) for x in rs) if v != "one node" \
            else b_cpu
        print("  %-17s deliveries/s %8.0f (%.2f)  p50 %7.1f µs (%.2f)  p99 %8.1f µs (%.2f)  "
              "hub CPU %.2f µs/msg (%.2f)  with nats-server %.2f µs/msg (%.2f)" % (
                  v, med(rs, "deliveries_s"), med(rs, "deliveries_s") / b_del,
                  med(rs, "p50_us"), med(rs, "p50_us") / b_p50, med(rs, "p99_us"),
                  med(rs, "p99_us") / b_p99, hub_cpu, hub_cpu / b_cpu, all_cpu,
                  all_cpu / b_cpu))
    two = res["two nodes"]
    added = statistics.median(sum(x["cpu_us_per_msg"]) for x in two) - b_cpu
    print("crossing a node: +%.1f µs p50, +%.1f µs p99 latency; +%.2f µs CPU per published "
          "message (both hubs and nats-server, each message crossing once)" % (
              med(two, "p50_us") - b_p50, med(two, "p99_us") - b_p99, added))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
