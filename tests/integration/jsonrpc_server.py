#!/usr/bin/python3
"""A JSON-RPC 2.0 server over TCP for the event-interface tests (what an OpenSIPS event_stream
subscriber is): it accepts connections, reads JSON documents however they are delimited, keeps
each one with the connection it came on, and answers as its mode says.

Modes (per server, changeable while it runs):
  "none"     never answer (notifications; or a server that hangs in reliable mode)
  "result"   answer every request (a document with an "id") with {"result": ...}
  "error"    answer every request with {"error": {"code": -32000, "message": "refused"}}
  "reverse"  answer requests in batches of reverse_batch, last first (ids must match)
  a function doc -> reply dict, raw bytes to write as they are, or None

Options: close_after=N closes the connection after its Nth document (then the server keeps
accepting); split_replies writes each reply a byte at a time; joined_replies writes every
pending reply in one write (documents back to back, no newline).

Runs in a thread of the test process; every wait is bounded. Python standard library only.
As a script: python3 jsonrpc_server.py [--host H] [--port P] [--mode M] prints documents.
"""

import argparse
import json
import selectors
import socket
import sys
import threading
import time

_DECODER = json.JSONDecoder()


class JsonRpcServer:
    def __init__(self, host="127.0.0.1", port=0, mode="none", close_after=None,
                 split_replies=False, joined_replies=False, reverse_batch=2, listen=True):
        self.host = host
        self.port = port
        self.mode = mode
        self.close_after = close_after
        self.split_replies = split_replies
        self.joined_replies = joined_replies
        self.reverse_batch = reverse_batch
        self.docs = []  # (connection number, document)
        self.raw = []   # (connection number, bytes) as read
        self.errors = []
        self.connections = 0
        self.cond = threading.Condition()
        self._sel = None
        self._thread = None
        self._stop = False
        self._lsock = None
        self._conns = {}
        if listen:
            self.start()

    # ---- life ----

    def start(self):
        """Listen (again) on host:port (port 0 picks one, kept for later restarts)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, self.port))
        ls.listen(64)
        ls.setblocking(False)
        self.port = ls.getsockname()[1]
        self._lsock = ls
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(ls, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Close the listener and every connection; the port stays known for start()."""
        self._stop = True
        if self._thread:
            self._thread.join(10)
        self._thread = None

    @property
    def addr(self):
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (
            self.host, self.port)

    def uri(self, method=None, query=None):
        u = "tcp:" + self.addr
        if method:
            u += "/" + method
        if query:
            u += "?" + query
        return u

    # ---- waiting ----

    def wait_docs(self, n, timeout=20.0, what=None):
        """Wait until at least n documents arrived; returns the documents (without conn no)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.docs) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %s: %d of %d documents: %r" % (
                        what or "documents", len(self.docs), n, self.docs[-5:]))
                self.cond.wait(left)
            return [d for _, d in self.docs]

    def wait_connections(self, n, timeout=20.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.connections < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %d connections (%d)" % (
                        n, self.connections))
                self.cond.wait(left)

    def take(self):
        with self.cond:
            d = [x for _, x in self.docs]
            self.docs = []
            return d

    # ---- the thread ----

    def _run(self):
        try:
            while not self._stop:
                for key, _ in self._sel.select(0.05):
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(key.fileobj, key.data)
        except Exception as e:  # noqa: BLE001 - reported to the test through .errors
            self.errors.append(repr(e))
        finally:
            for s in list(self._conns):
                self._close(s)
            self._sel.unregister(self._lsock)
            self._lsock.close()
            self._sel.close()

    def _accept(self):
        try:
            c, _ = self._lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        c.setblocking(False)
        with self.cond:
            self.connections += 1
            state = {"no": self.connections, "buf": "", "bytes": b"", "count": 0, "held": []}
            self.cond.notify_all()
        self._conns[c] = state
        self._sel.register(c, selectors.EVENT_READ, state)

    def _close(self, c):
        try:
            self._sel.unregister(c)
        except (KeyError, ValueError):
            pass
        self._conns.pop(c, None)
        c.close()

    def _read(self, c, st):
        try:
            chunk = c.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(c)
            return
        with self.cond:
            self.raw.append((st["no"], chunk))
        st["bytes"] += chunk
        try:
            text = st["bytes"].decode()
        except UnicodeDecodeError:
            return  # a multi-byte character split across reads: wait for the rest
        st["bytes"] = b""
        st["buf"] += text
        replies = []
        while True:
            buf = st["buf"].lstrip()
            if not buf:
                st["buf"] = ""
                break
            try:
                doc, end = _DECODER.raw_decode(buf)
            except ValueError:
                st["buf"] = buf
                break  # incomplete (a broken document would stall here and fail the test)
            st["buf"] = buf[end:]
            st["count"] += 1
            with self.cond:
                self.docs.append((st["no"], doc))
                self.cond.notify_all()
            replies.extend(self._answer(st, doc))
            if self.close_after and st["count"] >= self.close_after:
                self._send(c, replies)
                self._close(c)
                return
        self._send(c, replies)

    def _answer(self, st, doc):
        mode = self.mode
        if not isinstance(doc, dict) or "id" not in doc:
            return []
        if callable(mode):
            r = mode(doc)
            return [r] if r is not None else []
        if mode == "result":
            return [{"jsonrpc": "2.0", "result": 1, "id": doc["id"]}]
        if mode == "error":
            return [{"jsonrpc": "2.0", "error": {"code": -32000, "message": "refused"},
                     "id": doc["id"]}]
        if mode == "reverse":
            st["held"].append({"jsonrpc": "2.0", "result": "ok", "id": doc["id"]})
            if len(st["held"]) >= self.reverse_batch:
                out = list(reversed(st["held"]))
                st["held"] = []
                return out
        return []

    def _send(self, c, replies):
        if not replies:
            return
        raw = [r for r in replies if isinstance(r, bytes)]
        replies = [r for r in replies if not isinstance(r, bytes)]
        if self.joined_replies:
            data = [("".join(json.dumps(r) for r in replies)).encode()] if replies else []
        else:
            data = [(json.dumps(r) + "\n").encode() for r in replies]
        data += raw
        c.setblocking(True)
        try:
            for d in data:
                if self.split_replies:
                    for i in range(len(d)):
                        c.sendall(d[i:i + 1])
                else:
                    c.sendall(d)
        except OSError:
            pass
        finally:
            c.setblocking(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--mode", default="none", choices=["none", "result", "error", "reverse"])
    a = ap.parse_args()
    srv = JsonRpcServer(a.host, a.port, a.mode)
    print("listening on %s" % srv.addr)
    sys.stdout.flush()
    seen = 0
    try:
        while True:
            docs = srv.wait_docs(seen + 1, timeout=1e9)
            for d in docs[seen:]:
                print(json.dumps(d))
            seen = len(docs)
            sys.stdout.flush()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
