#!/usr/bin/env python3
"""A small evhub / Kamailio evapi client: each line read from stdin is sent as one netstring,
and every frame received is printed on its own line.

  client.py [HOST:PORT] [--tag T] [--raw] [--wait S]

  HOST:PORT   default 127.0.0.1:8448; IPv6 as [::1]:8448
  --tag T     first send "tag:T" (the convention of examples/native.lua and kemi.lua)
  --raw       netstring_format = 0: send lines bare and print each chunk received
  --wait S    after stdin ends, keep printing for S seconds (default 1), then exit

  echo ping | examples/client.py 127.0.0.1:8448
  examples/client.py --tag pbx1          # interactive; Ctrl-D to quit

Python standard library only.
"""

import argparse
import os
import selectors
import socket
import sys
import time


def parse_addr(s):
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    return host.strip("[]") or "127.0.0.1", int(port)


def netstring(data):
    return b"%d:%s," % (len(data), data)


class Reader:
    """Streaming netstring decoder: feed bytes, get complete payloads."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        frames = []
        while True:
            while self.buf[:1] in (b" ", b"\t", b"\r", b"\n"):
                del self.buf[:1]
            colon = self.buf.find(b":")
            if colon < 0:
                if len(self.buf) > 20 or not bytes(self.buf).isdigit():
                    if self.buf:
                        raise ValueError("bad netstring header %r" % bytes(self.buf[:24]))
                return frames
            if colon == 0 or not bytes(self.buf[:colon]).isdigit():
                raise ValueError("bad netstring length %r" % bytes(self.buf[:colon]))
            n = int(self.buf[:colon])
            end = colon + 1 + n
            if len(self.buf) <= end:
                return frames
            if self.buf[end] != ord(","):
                raise ValueError("netstring not terminated by ','")
            frames.append(bytes(self.buf[colon + 1:end]))
            del self.buf[:end + 1]


def show(data):
    sys.stdout.write(data.decode("utf-8", "backslashreplace") + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description="netstring client for evhub / Kamailio evapi")
    ap.add_argument("addr", nargs="?", type=parse_addr, default=("127.0.0.1", 8448),
                    metavar="HOST:PORT")
    ap.add_argument("--tag", help='send "tag:TAG" first')
    ap.add_argument("--raw", action="store_true", help="raw mode (netstring_format = 0)")
    ap.add_argument("--wait", type=float, default=1.0,
                    help="seconds to keep printing after stdin ends (default 1)")
    args = ap.parse_args()

    try:
        sock = socket.create_connection(args.addr, timeout=10)
    except OSError as e:
        sys.exit("cannot connect to %s:%d: %s" % (args.addr[0], args.addr[1], e))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)

    def send(payload):
        sock.sendall(payload if args.raw else netstring(payload))

    if args.tag:
        send(b"tag:" + args.tag.encode())

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    stdin = sys.stdin.buffer
    sel.register(stdin, selectors.EVENT_READ, "stdin")
    reader = Reader()
    pending = b""
    stop_at = None
    while stop_at is None or time.monotonic() < stop_at:
        timeout = None if stop_at is None else max(0.0, stop_at - time.monotonic())
        for key, _ in sel.select(timeout):
            if key.data == "stdin":
                chunk = os.read(stdin.fileno(), 65536)
                if not chunk:
                    sel.unregister(stdin)
                    if pending:
                        send(pending)
                    stop_at = time.monotonic() + args.wait
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    send(line.rstrip(b"\r"))
            else:
                data = sock.recv(1 << 20)
                if not data:
                    sys.stderr.write("connection closed by the hub\n")
                    return 0
                if args.raw:
                    show(data)
                    continue
                try:
                    for frame in reader.feed(data):
                        show(frame)
                except ValueError as e:
                    sys.stderr.write("protocol error from the hub: %s\n" % e)
                    return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
