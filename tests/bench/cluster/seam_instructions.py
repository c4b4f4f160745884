#!/usr/bin/env python3
"""Instructions per delivered frame of a hub without [cluster], under callgrind (not a test):
what the router seam costs a single node, measured without the machine's noise.

  python3 tests/bench/cluster/seam_instructions.py EVHUB [EVHUB...]

For each binary: evhub (workers = 0, no [cluster]) under valgrind --tool=callgrind; 4
subscribers tag themselves; one publisher sends N 128-byte frames that the script multicasts
to them (each subscriber reads all before the next batch); SIGTERM; the run's total
instructions (start to exit) divided by the frames delivered."""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

N = int(os.environ.get("SEAM_FRAMES", "20000"))
BATCH = 500
SCRIPT = """evapi.on("message", function(conn, msg)
    if msg == "sub" then conn:set_tag("subs") conn:send("ok")
    else evapi.multicast(msg, "subs") end
end)
"""


def ns(b):
    return b"%d:%s," % (len(b), b)


def read_frames(sock, want, buf):
    n = 0
    while n < want:
        data = sock.recv(1 << 16)
        if not data:
            raise SystemExit("hub closed a subscriber")
        buf += data
        while True:
            c = buf.find(b":")
            if c < 0:
                break
            ln = int(buf[:c])
            if len(buf) < c + 1 + ln + 1:
                break
            buf = buf[c + 2 + ln:]
            n += 1
    return buf


def run(evhub):
    d = tempfile.mkdtemp(prefix="evhub-seam-")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with open(os.path.join(d, "s.lua"), "w") as f:
        f.write(SCRIPT)
    with open(os.path.join(d, "evhub.conf"), "w") as f:
        f.write("[evapi]\nbind_addr = 127.0.0.1:%d\nworkers = 0\n[lua]\nscript = s.lua\n"
                "[log]\nlevel = notice\n[control]\nsocket = %s/ctl.sock\n" % (port, d))
    out = os.path.join(d, "callgrind.out")
    p = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                          evhub, "-f", "-c", os.path.join(d, "evhub.conf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("evhub did not start under callgrind")
            time.sleep(0.1)
    subs = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    bufs = [b""] * 4
    for i, c in enumerate(subs):
        c.sendall(ns(b"sub"))
        bufs[i] = read_frames(c, 1, b"")
    pub = socket.create_connection(("127.0.0.1", port))
    payload = b"x" * 128
    for start in range(0, N, BATCH):
        pub.sendall(b"".join(ns(payload) for _ in range(BATCH)))
        for i, c in enumerate(subs):
            bufs[i] = read_frames(c, BATCH, bufs[i])
    for c in subs + [pub]:
        c.close()
    p.terminate()
    p.wait(120)
    with open(out) as f:
        text = f.read()
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    return int(m.group(1)) / (N * 4)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    base = None
    for evhub in sys.argv[1:]:
        ipf = run(evhub)
        base = base or ipf
        print("%-50s %8.0f instructions per delivered frame (%.3f)" % (evhub, ipf, ipf / base))


if __name__ == "__main__":
    main()
