#!/usr/bin/python3
"""Issue 12, item 4, end to end: stalled readers must not get a fast reader closed.
- steady: stalled subscribers (never read) and one fast reader (its own process) while a
  publisher multicasts 1-KiB frames at 10,000 a second, max_outbuf = 1m: the fast reader gets
  every frame and stays open; every stalled one is closed as a slow consumer.
- burst: many publishers each send 1 MiB at once (1-KiB frames) to one fast reader,
  max_outbuf = 1m: it gets every frame (the hub read from the publishers only as fast as the
  reader took them: read_holds counts those waits).
- sndbuf: the hub's client sockets have the kernel send buffer sndbuf asks for (ss -tm)."""

import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (SLOW, Hub, Suite, check, check_eq, scaled,  # noqa: E402
                           wait_for)

suite = Suite("hostile_readers")

SCRIPT = r'''
evapi.on("connect", function(conn) conn:set_tag("sub") end)
evapi.on("message", function(conn, msg)
    if msg == "pub" then conn:set_tag("pub") conn:send("ok") return end
    evapi.multicast(msg, "sub")
end)
'''

# The fast reader: its own process, reads everything, prints "frames closed".
READER = r'''
import socket, sys
port, want = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
buf = bytearray(); got = 0; closed = 0
while got < want:
    try:
        chunk = s.recv(1 << 20)
    except socket.timeout:
        break
    if not chunk:
        closed = 1
        break
    buf += chunk
    i = 0
    while True:
        c = buf.find(b":", i)
        if c < 0:
            break
        n = int(buf[i:c])
        if c + 2 + n > len(buf):
            break
        if buf[c + 1:c + 2] == b"{":
            closed = 1
        got += 1
        i = c + 2 + n
    del buf[:i]
print(got, closed, flush=True)
'''

FRAME = b"1024:" + b"x" * 1024 + b","


def start(extra_evapi=None):
    ev = {"workers": 0, "max_outbuf": "1m", "max_clients": 2048}
    ev.update(extra_evapi or {})
    h = Hub(SCRIPT, evapi=ev)
    h.start()
    h.wait_log("control socket ")
    return h


def stat(h, name):
    st = h.ctl_json("stats")
    return st.get(name) if isinstance(st, dict) else None


def reader(h, want):
    p = subprocess.Popen([sys.executable, "-c", READER, str(h.addr[1]), str(want),
                          str(scaled(10, 60))], stdout=subprocess.PIPE, text=True)
    check_eq(p.stdout.readline().strip(), "ready", "the fast reader connected")
    return p


def reader_result(p):
    out, _ = p.communicate(timeout=scaled(60, 300))
    got, closed = out.split()
    return int(got), int(closed)


def publisher(h):
    s = socket.create_connection(h.addr)
    s.sendall(b"3:pub,")
    s.settimeout(10)
    check_eq(s.recv(16), b"2:ok,", "the publisher is tagged")
    return s


def wait_subs(h, n):
    wait_for(lambda: stat(h, "clients"), lambda v: v is not None and v >= n,
             "%d clients connected" % n, timeout=scaled(20, 120))


@suite.case
def stalled_readers_do_not_get_a_fast_one_closed():
    nstalled = scaled(200, 30)
    total = scaled(40000, 4000)
    h = start()
    stalled = []
    for _ in range(nstalled):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(h.addr)
        stalled.append(s)
    r = reader(h, total)
    pub = publisher(h)
    wait_subs(h, nstalled + 2)
    t0 = time.time()
    for sent in range(0, total, 100):
        pub.sendall(FRAME * 100)
        ahead = t0 + (sent + 100) / 10000.0 - time.time()
        if ahead > 0:
            time.sleep(ahead)
    got, closed = reader_result(r)
    print("  fast reader: %d/%d frames, closed=%d; hub RSS %d KB" % (got, total, closed,
                                                                       h.rss_kb()))
    check_eq((got, closed), (total, 0), "the fast reader got every frame and stayed open")
    wait_for(lambda: stat(h, "slow_consumer_closes"), lambda v: v == nstalled,
             "every stalled reader closed as a slow consumer")
    check(h.rss_kb() < 200 * 1024, "memory bounded: %d KB" % h.rss_kb())
    for s in stalled:
        s.close()
    pub.close()
    h.stop()


@suite.case
def a_burst_from_many_publishers_waits_for_the_reader():
    npub = scaled(32, 8)
    per = 1024  # frames of 1 KiB: 1 MiB each
    h = start()
    r = reader(h, npub * per)
    pubs = [publisher(h) for _ in range(npub)]
    wait_subs(h, npub + 1)
    blob = FRAME * per
    for s in pubs:
        s.setblocking(False)
    left = {s: memoryview(blob) for s in pubs}
    deadline = time.time() + scaled(30, 200)
    while left and time.time() < deadline:
        for s in list(left):
            try:
                n = s.send(left[s])
                left[s] = left[s][n:]
                if not left[s]:
                    del left[s]
            except BlockingIOError:
                pass
        time.sleep(0.001)
    check(not left, "every publisher sent its burst")
    got, closed = reader_result(r)
    holds = stat(h, "read_holds")
    print("  fast reader: %d/%d frames, closed=%d; read_holds=%s" % (got, npub * per, closed,
                                                                      holds))
    check_eq((got, closed), (npub * per, 0), "the fast reader got every frame and stayed open")
    check_eq(stat(h, "slow_consumer_closes"), 0, "nobody closed as a slow consumer")
    if not SLOW:
        check(holds > 0, "reading waited for the reader (read_holds %s)" % holds)
    for s in pubs:
        s.close()
    h.stop()


def send_buffers(port):
    """tb (the send buffer) of each established socket whose local port is port, from ss."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", "sport", "= :%d" % port],
                         capture_output=True, text=True, check=True).stdout
    return [int(tok[2:]) for tok in out.replace(",", " ").replace("(", " ").split()
            if tok.startswith("tb") and tok[2:].isdigit()]


@suite.case
def sndbuf_bounds_the_kernel_send_buffer():
    check(shutil.which("ss") is not None, "ss (iproute2) is installed")
    for value, want in (("256k", 2 * 256 * 1024), ("64k", 2 * 64 * 1024)):
        h = start({"sndbuf": value})
        s = socket.create_connection(h.addr)
        wait_subs(h, 1)
        check_eq(send_buffers(h.addr[1]), [want], "the kernel send buffer with sndbuf = " + value)
        s.close()
        h.stop()
    # 0: the kernel's auto-tuning, as before (not locked at a value)
    h = start({"sndbuf": 0})
    s = socket.create_connection(h.addr)
    wait_subs(h, 1)
    tb = send_buffers(h.addr[1])
    check(len(tb) == 1 and tb[0] not in (2 * 256 * 1024,), "auto-tuned: %r" % tb)
    s.close()
    h.stop()


if __name__ == "__main__":
    suite.run()
