#!/usr/bin/python3
"""Stalled readers next to a fast one (issue 12, item 4): prints what the fast reader got.

  stallbench.py EVHUB [--sndbuf SIZE] [--scenario steady|burst|both]

steady: 200 subscribers that never read, 1 that reads at full speed, 1 publisher relaying
        10,000 1-KiB frames a second for 4 s, max_outbuf = 1m.
burst:  64 publishers each sending 1 MiB at once (1-KiB frames), 1 fast reader,
        max_outbuf = 1m.
The fast reader runs in its own process. Figures: frames the fast reader got of those sent,
whether it was closed, its longest gap, the stalled ones closed, the hub's peak RSS."""

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time

SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "hello" then conn:set_tag("pub") return end
    evapi.multicast(msg, "sub")
end)
evapi.on("connect", function(conn) conn:set_tag("sub") end)
'''


def ns(b):
    return b"%d:%s," % (len(b), b)


def start_hub(evhub, sndbuf):
    d = tempfile.mkdtemp(prefix="stallbench-")
    with open(os.path.join(d, "s.lua"), "w") as f:
        f.write(SCRIPT)
    conf = os.path.join(d, "evhub.conf")
    with open(conf, "w") as f:
        f.write("[evapi]\nbind_addr = 127.0.0.1:0\nworkers = 0\nmax_outbuf = 1m\n"
                "max_clients = 4096\n%s[lua]\nscript = %s\n[log]\nlevel = notice\n"
                % ("sndbuf = %s\n" % sndbuf if sndbuf else "", os.path.join(d, "s.lua")))
    log = open(os.path.join(d, "log"), "wb")
    p = subprocess.Popen([evhub, "-f", "-c", conf], stdout=log, stderr=log)
    for _ in range(200):
        time.sleep(0.05)
        text = open(os.path.join(d, "log"), errors="replace").read()
        if "listening on" in text:
            port = int(text.split("listening on")[1].split()[0].rsplit(":", 1)[1])
            return p, port, d
    p.kill()
    sys.exit("hub did not start: " + text)


def fast_reader(port, expect, q):
    s = socket.create_connection(("127.0.0.1", port))
    q.put("ready")
    buf = bytearray()
    got = 0
    last = None
    gap = 0.0
    closed = False
    s.settimeout(5)
    while got < expect:
        try:
            chunk = s.recv(1 << 20)
        except socket.timeout:
            break
        now = time.time()
        if last is not None:
            gap = max(gap, now - last)
        last = now
        if not chunk:
            closed = True
            break
        buf += chunk
        # count whole frames
        i = 0
        while True:
            c = buf.find(b":", i)
            if c < 0:
                break
            n = int(buf[i:c])
            if c + 1 + n + 1 > len(buf):
                break
            if buf[c + 1:c + 2] == b"{":  # an error frame: closed
                closed = True
            got += 1
            i = c + 1 + n + 1
        del buf[:i]
    q.put((got, closed, gap))


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def stalled(port, n):
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def closed_count(socks):
    """Stalled sockets the hub closed: drained for up to 2 s, EOF or reset."""
    open_ = list(socks)
    for s in open_:
        s.setblocking(False)
    closed = 0
    for _ in range(20):
        still = []
        for s in open_:
            try:
                while True:
                    b = s.recv(1 << 20)
                    if not b:
                        closed += 1
                        break
            except BlockingIOError:
                still.append(s)
            except ConnectionResetError:
                closed += 1
        open_ = still
        if not open_:
            break
        time.sleep(0.1)
    return closed


def run(evhub, sndbuf, scenario):
    p, port, d = start_hub(evhub, sndbuf)
    peak = 0.0
    try:
        slow = stalled(port, 200 if scenario == "steady" else 0)
        frame = ns(b"x" * 1024)
        if scenario == "steady":
            total = 40000
        else:
            total = 64 * 1024
        q = mp.Queue()
        r = mp.Process(target=fast_reader, args=(port, total, q))
        r.start()
        q.get()
        time.sleep(0.3)
        t0 = time.time()
        if scenario == "steady":
            pub = socket.create_connection(("127.0.0.1", port))
            pub.sendall(ns(b"hello"))
            sent = 0
            while sent < total:
                pub.sendall(frame * 100)
                sent += 100
                ahead = t0 + sent / 10000.0 - time.time()
                if ahead > 0:
                    time.sleep(ahead)
                peak = max(peak, rss_mb(p.pid))
        else:
            pubs = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
            for s in pubs:
                s.sendall(ns(b"hello"))
            time.sleep(0.3)
            blob = frame * 1024
            for s in pubs:
                s.setblocking(False)
            left = {s: memoryview(blob) for s in pubs}
            while left:
                for s in list(left):
                    try:
                        n = s.send(left[s])
                        left[s] = left[s][n:]
                        if not left[s]:
                            del left[s]
                    except BlockingIOError:
                        pass
                peak = max(peak, rss_mb(p.pid))
        while r.is_alive() and time.time() - t0 < 30:
            peak = max(peak, rss_mb(p.pid))
            time.sleep(0.05)
        got, closed, gap = q.get()
        r.join()
        closed_slow = closed_count(slow)
        print("%-6s sndbuf=%-5s fast reader got %6d/%d frames%s, longest gap %.2f s; "
              "stalled closed %d/%d; hub peak RSS %.0f MB"
              % (scenario, sndbuf or "-", got, total, " (CLOSED)" if closed else "", gap,
                 closed_slow, len(slow), peak))
        sys.stdout.flush()
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("evhub")
    ap.add_argument("--sndbuf", default=None)
    ap.add_argument("--scenario", default="both")
    a = ap.parse_args()
    for sc in (["steady", "burst"] if a.scenario == "both" else [a.scenario]):
        run(a.evhub, a.sndbuf, sc)


if __name__ == "__main__":
    main()
