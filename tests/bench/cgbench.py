#!/usr/bin/env python3
"""cgbench: instructions per delivered frame, counted by callgrind (reproducible, unlike
timings on a shared machine). Starts evhub (workers = 0 or --workers, the KEMI or native fan-out script of
evbench) or the bare forwarder under valgrind --tool=callgrind, subscribes --subs
connections, sends --frames frames of --size bytes from one publisher, waits until every
subscriber has them all, stops the hub and prints the hub's instructions (user space only:
the kernel's work is not counted) per delivered frame, start-up and shutdown included.

  tests/bench/cgbench.py [--evhub build/evhub] [--bare build/tests/bench/bare/bareforward]
                         [--frames 20000] [--size 128] [--subs 4] [--workers 0] [--keep DIR]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NATIVE = """evapi.on("message", function(conn, msg)
    if msg == "sub" then
        conn:set_tag("subs")
        evapi.multicast("ok", "subs")
    else
        evapi.multicast(msg, "subs")
    end
end)
"""

KEMI = """function ksr_evapi_event(evname)
\tif evname == "evapi:message-received" then
\t\tlocal msg = KSR.pv.get("$evapi(msg)");
\t\tif msg == "sub" then
\t\t\tKSR.evapi.set_tag("subs");
\t\t\tKSR.evapi.relay_multicast("ok", "subs");
\t\telse
\t\t\tKSR.evapi.relay_multicast(msg, "subs");
\t\tend
\t\tend
\treturn 1;
end
"""


def wait_port(log, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("cgbench: the hub exited at start-up:\n" + open(log).read()[-2000:])
        try:
            m = re.search(r"listening on [0-9.]+:(\d+)", open(log).read())
            if m:
                return int(m.group(1))
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    sys.exit("cgbench: the hub did not start")


def read_frames(sock, buf, want, deadline):
    """Read until want frames were parsed; returns (frames, rest of buf)."""
    got = 0
    while got < want:
        sock.settimeout(max(0.1, deadline - time.time()))
        data = sock.recv(1 << 20)
        if not data:
            raise RuntimeError("connection closed")
        buf += data
        pos = 0
        while True:
            colon = buf.find(b":", pos)
            if colon < 0:
                break
            n = int(buf[pos:colon])
            if len(buf) < colon + 1 + n + 1:
                break
            pos = colon + 1 + n + 1
            got += 1
        buf = buf[pos:]
        if time.time() > deadline:
            raise RuntimeError("timed out with %d of %d frames" % (got, want))
    return got, buf


def run(kind, args):
    d = tempfile.mkdtemp(prefix="cgbench.")
    log = os.path.join(d, "hub.log")
    out = os.path.join(d, "callgrind.out")
    vg = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out]
    if kind == "bare":
        cmd = vg + [args.bare, "127.0.0.1", "0"]
    else:
        with open(os.path.join(d, "bench.lua"), "w") as f:
            f.write(KEMI if kind == "kemi" else NATIVE)
        with open(os.path.join(d, "evhub.conf"), "w") as f:
            f.write("[evapi]\nbind_addr = 127.0.0.1:0\nworkers = %d\nmax_outbuf = 64m\n"
                    "event_callback = %s\n%s\n[lua]\nscript = bench.lua\n%s\n[log]\nlevel = info\n"
                    % (args.workers, "ksr_evapi_event" if kind == "kemi" else "", args.evapi,
                       args.lua))
        cmd = vg + [args.evhub, "-c", os.path.join(d, "evhub.conf"), "-f"]
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
    try:
        port = wait_port(log, proc)
        subs = []
        deadline = time.time() + 120
        for _ in range(args.subs):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"3:sub,")
            subs.append([s, b""])
            _, subs[-1][1] = read_frames(s, b"", 1, deadline)
        # every subscriber gets one "ok" per subscription made after its own
        for i, sb in enumerate(subs):
            if args.subs - i - 1:
                _, sb[1] = read_frames(sb[0], sb[1], args.subs - i - 1, deadline)
        pub = socket.create_connection(("127.0.0.1", port))
        payload = bytes((i * 7 + 1) % 256 for i in range(args.size))
        frame = b"%d:%s," % (len(payload), payload)
        batch = frame * 32
        sent = 0
        while sent < args.frames:
            k = min(32, args.frames - sent)
            pub.sendall(batch if k == 32 else frame * k)
            sent += k
            # keep the hub's queues short, as evbench's window does
            if sent % 1024 == 0:
                for sb in subs:
                    got, sb[1] = read_frames(sb[0], sb[1], 1024, deadline)
        rest = sent % 1024
        for sb in subs:
            if rest:
                read_frames(sb[0], sb[1], rest, deadline)
        pub.close()
        for sb in subs:
            sb[0].close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    total = None
    with open(out) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    if args.keep:
        shutil.copy(out, os.path.join(args.keep, "callgrind.%s.out" % kind))
    shutil.rmtree(d)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evhub", default="build/evhub")
    ap.add_argument("--bare", default="build/tests/bench/bare/bareforward")
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--only", choices=["bare", "kemi", "native"])
    ap.add_argument("--keep", help="copy the callgrind output files here")
    ap.add_argument("--evapi", default="", help="a line added to evhub's [evapi] section")
    ap.add_argument("--workers", type=int, default=0,
                    help="evhub's workers (every thread's instructions are counted)")
    ap.add_argument("--lua", default="", help="a line added to evhub's [lua] section")
    args = ap.parse_args()
    deliveries = args.frames * args.subs
    print("cgbench: %d frames of %d bytes, 1 publisher -> %d subscribers (%d deliveries)"
          % (args.frames, args.size, args.subs, deliveries))
    base = None
    for kind in ("bare", "kemi", "native"):
        if args.only and kind != args.only:
            continue
        total = run(kind, args)
        per = total / deliveries
        if kind == "bare":
            base = per
        print("  %-7s %14d instructions  %9.1f per delivery%s" % (
            kind, total, per, "  (%.2fx bare)" % (per / base) if base else ""))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
