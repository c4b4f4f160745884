#!/usr/bin/python3
"""A routing application for examples/async-routing: connects to evhub over netstrings, and
answers each routing request with a Contact for the called number.

  app.py [HOST:PORT] [--silent] [--delay MS]

Requests are JSON objects with "callee" (and "tindex"/"tlabel" for the KEMI script, or
"evhub_id" for the native one); the answer echoes those and adds "contact":
sip:CALLEE@10.0.0.<n>:5060. --silent reads and never answers (to see async_timeout)."""

import json
import re
import socket
import sys
import time


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    addr = args[0] if args else "127.0.0.1:8448"
    silent = "--silent" in sys.argv
    delay = 0.0
    if "--delay" in sys.argv:
        delay = float(sys.argv[sys.argv.index("--delay") + 1]) / 1000.0
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("app: connected to", addr, flush=True)
    buf = b""
    answered = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            print("app: evhub closed the connection; answered", answered, flush=True)
            return
        buf += chunk
        out = []
        pos = 0  # frames are taken by offset: one copy of what is left per read, not per frame
        while True:
            colon = buf.find(b":", pos)
            if colon < 0:
                break
            n = int(buf[pos:colon])
            if len(buf) < colon + n + 2:
                break
            frame, pos = buf[colon + 1:colon + 1 + n], colon + n + 2
            try:
                req = json.loads(frame)
            except ValueError:
                continue
            if not isinstance(req, dict) or "callee" not in req or silent:
                continue
            ans = {k: req[k] for k in ("tindex", "tlabel", "evhub_id") if k in req}
            callee = str(req["callee"])
            if re.fullmatch(r"[0-9]{1,32}", callee):
                ans["contact"] = "sip:%s@10.0.0.%d:5060" % (callee, int(callee) % 250 + 1)
            else:
                ans["code"], ans["reason"] = 404, "Unknown Number"
            body = json.dumps(ans).encode()
            out.append(b"%d:%s," % (len(body), body))
        buf = buf[pos:]
        if out:
            if delay:
                time.sleep(delay)
            s.sendall(b"".join(out))
            answered += len(out)


if __name__ == "__main__":
    main()
