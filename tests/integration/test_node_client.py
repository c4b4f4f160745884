#!/usr/bin/python3
"""Third-party netstring clients: two independent npm netstring libraries (@endo/netstring and
the old netstring 0.3.0), used unchanged by tests/integration/node/client.mjs, talk to evhub.
Echo of text, binary (NUL, ',', ':'), empty and 200 KiB frames; relays between a Python client
and a node client both ways; multicast by tag across both libraries; a hub error frame read by
the library's reader.

Needs node and npm (installed by `make test` as the Debian packages nodejs and npm). Without them
every case FAILS (never skips). node_modules is installed with `npm ci` from the pinned
package-lock.json into tests/integration/node when it is missing or stale.
"""

import base64
import fcntl
import json
import os
import random
import selectors
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (TIMEOUT, Hub, Suite, TestFailure, check, check_eq,  # noqa: E402
                           fence, parse_error_frame, pump, request, wait_frames)

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
CLIENT_JS = os.path.join(NODE_DIR, "client.mjs")
NPM_CI_TIMEOUT = 600

suite = Suite("node_client")

# A native-dialect script: "echo:X" answers X with conn:send, "relay:X" relays X, "tag:T" sets
# the tag and answers "tagged:T", "mc:T:X" multicasts X to tag T, "len:X" answers "len:<#X>";
# anything else (the empty frame, binary frames) comes back verbatim. A failed call answers
# "error:<call>:<message>" so that a test sees it instead of timing out.
SCRIPT = r'''
local function must(conn, what, ok, err)
    if not ok then conn:send("error:" .. what .. ":" .. tostring(err)) end
end

evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%l+):(.*)$")
    if cmd == "echo" then
        must(conn, "send", conn:send(rest))
    elseif cmd == "relay" then
        must(conn, "relay", evapi.relay(rest))
    elseif cmd == "tag" then
        must(conn, "set_tag", conn:set_tag(rest))
        must(conn, "send", conn:send("tagged:" .. rest))
    elseif cmd == "mc" then
        local tag, data = rest:match("^([^:]+):(.*)$")
        must(conn, "multicast", evapi.multicast(data, tag))
    elseif cmd == "len" then
        must(conn, "send", conn:send("len:" .. #rest))
    else
        must(conn, "send", conn:send(msg))
    end
end)
'''

# Payloads every case uses.
BIN = (b"\x00,:\x00" + b"12:abc," + bytes(range(256)) + b"\r\n \t" + b",,::" + b"0:," + b"\x00")
BIN2 = bytes(reversed(BIN)) + b"\xff\xfe:,"
BIG = random.Random(8448).randbytes(200 * 1024)
BIG2 = random.Random(5060).randbytes(200 * 1024 + 7)
check(b"\x00" in BIG and b"," in BIG and b":" in BIG, "BIG lacks NUL/','/':'")


# ---------------------------------------------------------------------------------------------
# The node toolchain and node_modules

_setup_error = None
_setup_done = False


def _pinned_versions():
    with open(os.path.join(NODE_DIR, "package.json")) as f:
        return json.load(f)["dependencies"]


def _installed_ok():
    for name, version in _pinned_versions().items():
        try:
            with open(os.path.join(NODE_DIR, "node_modules", name, "package.json")) as f:
                if json.load(f).get("version") != version:
                    return False
        except (OSError, ValueError):
            return False
    return True


def ensure_node():
    """node and npm must be present and node_modules installed; raises TestFailure otherwise
    (the first error is remembered: every case fails with the same clear message)."""
    global _setup_error, _setup_done
    if _setup_error:
        raise TestFailure(_setup_error)
    if _setup_done:
        return
    try:
        _setup()
    except TestFailure as e:
        _setup_error = str(e)
        raise
    _setup_done = True


def _setup():
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [n for n, p in (("node", node), ("npm", npm)) if not p]
    check(not missing, "%s not found on PATH: this test needs Node.js and npm (Debian packages "
          "'nodejs' and 'npm', installed by `make test`); it does not skip" % " and ".join(missing))
    r = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    check(r.returncode == 0, "node --version failed: %s" % (r.stdout + r.stderr))
    major = int(r.stdout.strip().lstrip("v").split(".")[0])
    check(major >= 16, "node %s is too old (need >= 16)" % r.stdout.strip())
    # One npm ci at a time in this directory (parallel ctest runs share it).
    with open(os.path.join(NODE_DIR, ".npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_ok():
            return
        t0 = time.monotonic()
        try:
            r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=NPM_CI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TestFailure("npm ci in %s did not finish within %ds" % (NODE_DIR,
                                                                          NPM_CI_TIMEOUT))
        check(r.returncode == 0, "npm ci in %s failed (rc %d):\n%s" % (
            NODE_DIR, r.returncode, (r.stdout + r.stderr)[-4000:]))
        check(_installed_ok(), "npm ci succeeded but %s is not installed in %s/node_modules" % (
            _pinned_versions(), NODE_DIR))
        print("     npm ci in %s: %.1fs" % (NODE_DIR, time.monotonic() - t0))


# ---------------------------------------------------------------------------------------------
# A node client process


_nodes = []


def b64(data):
    return base64.b64encode(data).decode()


class NodeClient:
    """client.mjs running one library against the hub. Commands go to its stdin and events come
    from its stdout, both non-blocking (a 200 KiB frame is bigger than a pipe), serviced only
    while this object waits."""

    def __init__(self, hub, lib, name=None):
        ensure_node()
        self.name = name or lib
        self.lib = lib
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [shutil.which("node"), CLIENT_JS, "--lib", lib, hub.addr[0], str(hub.addr[1])],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        _nodes.append(self)
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.frames = []
        self.seq = 0  # commands queued
        self.acked = 0  # commands the client reported done
        self.eof = False
        self.stdout_closed = False
        self.port = None
        self.wait(lambda: self.port is not None, "connected")

    def __repr__(self):
        return "<node %s frames=%d acked=%d/%d eof=%s>" % (
            self.name, len(self.frames), self.acked, self.seq, self.eof)

    # -- commands

    def _cmd(self, obj):
        check(not self.stdout_closed, "%s: the node client has exited" % self.name)
        self.outbuf += json.dumps(obj).encode() + b"\n"
        self.seq += 1
        # Hand it to the process now (it then runs on its own while we pump Python clients).
        self.wait(lambda: not self.outbuf, "command %d written to its stdin" % self.seq)
        return self.seq

    def send(self, payload):
        """One frame through the library's writer; payload is bytes, or a list of byte chunks
        (endo only) forming one frame."""
        if isinstance(payload, (list, tuple)):
            return self._cmd({"op": "send", "b64": [b64(p) for p in payload]})
        return self._cmd({"op": "send", "b64": b64(payload)})

    def batch(self, payloads):
        return self._cmd({"op": "batch", "b64": [b64(p) for p in payloads]})

    def raw(self, data):
        return self._cmd({"op": "raw", "b64": b64(data)})

    def take(self):
        f = self.frames
        self.frames = []
        return f

    # -- I/O

    def _service(self, timeout):
        sel = selectors.DefaultSelector()
        try:
            if not self.stdout_closed:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
            if self.outbuf and self.proc.stdin is not None:
                sel.register(self.proc.stdin, selectors.EVENT_WRITE)
            if not sel.get_map():
                time.sleep(timeout)
                return
            for key, ev in sel.select(timeout):
                if ev & selectors.EVENT_WRITE:
                    try:
                        n = os.write(self.proc.stdin.fileno(), self.outbuf[:1 << 16])
                        del self.outbuf[:n]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:
                        self.outbuf.clear()
                if ev & selectors.EVENT_READ:
                    try:
                        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        self.stdout_closed = True
                    self.inbuf += chunk
                    self._events()
        finally:
            sel.close()

    def _events(self):
        while True:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[:nl + 1]
            try:
                ev = json.loads(line)
            except ValueError:
                raise TestFailure("%s printed a line that is not JSON: %r" % (
                    self.name, line[:300]))
            kind = ev.get("event")
            if kind == "frame":
                data = base64.b64decode(ev["b64"])
                check_eq(len(data), ev["len"], "%s: frame length vs payload" % self.name)
                check(not self.eof, "%s: a frame after EOF" % self.name)
                self.frames.append(data)
            elif kind == "sent":
                self.acked = ev["seq"]
            elif kind == "connected":
                self.port = ev["port"]
            elif kind == "eof":
                self.eof = True
            elif kind == "error":
                raise TestFailure("%s: the node client failed in %s: %s" % (
                    self.name, ev.get("where"), ev.get("message")))
            else:
                raise TestFailure("%s: unknown event %r" % (self.name, ev))

    def stderr_text(self):
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")

    def wait(self, cond, what, timeout=None):
        timeout = TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not cond():
            if self.stdout_closed:
                rc = self.proc.wait(TIMEOUT)
                raise TestFailure("%s: the node client exited (rc %s) while waiting for %s; "
                                  "stderr:\n%s" % (self.name, rc, what, self.stderr_text()[-3000:]))
            now = time.monotonic()
            if now >= deadline:
                raise TestFailure("%s: timed out after %.0fs waiting for %s (%r); stderr:\n%s" % (
                    self.name, timeout, what, self, self.stderr_text()[-3000:]))
            self._service(min(0.2, deadline - now))

    def flush(self):
        """Wait until every command queued so far has been carried out."""
        seq = self.seq
        self.wait(lambda: self.acked >= seq, "command %d done" % seq)

    def wait_frames(self, n, what=None):
        self.wait(lambda: len(self.frames) >= n, what or "%d frames" % n)

    def request(self, payload):
        """Send one frame and return the next frame received."""
        n = len(self.frames)
        self.send(payload)
        self.wait_frames(n + 1)
        return self.frames.pop(n)

    def finish(self):
        """Close our side (unless the hub already closed), read to EOF, require exit 0."""
        if not self.eof:
            self._cmd({"op": "end"})
        self.wait(lambda: self.eof and not self.outbuf, "EOF")
        self.proc.stdin.close()
        self.wait(lambda: self.stdout_closed, "exit")
        rc = self.proc.wait(TIMEOUT)
        check(rc == 0, "%s: node client exited with rc %s; stderr:\n%s" % (
            self.name, rc, self.stderr_text()[-3000:]))
        check(not self.inbuf, "%s: trailing output %r" % (self.name, bytes(self.inbuf[:200])))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                if f:
                    f.close()
            except OSError:
                pass


def case(fn):
    """A suite case that first needs node, and kills its node clients however it ends."""
    def wrapped():
        try:
            ensure_node()
            fn()
        finally:
            while _nodes:
                _nodes.pop().kill()
    wrapped.__name__ = fn.__name__
    return suite.case(wrapped)


def start_hub():
    return Hub(SCRIPT).start()


def ready_py(hub, name):
    c = hub.client(name=name)
    check_eq(request(c, "echo:ready"), b"ready", "%s echo" % name)
    return c


def ready_node(hub, lib, name=None):
    n = NodeClient(hub, lib, name)
    check_eq(n.request(b"echo:ready"), b"ready", "%s echo" % n.name)
    return n


def fence_all(sender, pys, nodes, label):
    """harness fence() over Python clients pys, then wait for the marker on node clients too;
    returns the frames each received before it (Python clients first, then node clients)."""
    out = fence(sender, pys, label)
    marker = ("fence-" + label).encode()
    for n in nodes:
        n.wait(lambda: marker in n.frames, "fence " + label)
        i = n.frames.index(marker)
        out.append(n.frames[:i])
        n.frames = n.frames[i + 1:]
    return out


# ---------------------------------------------------------------------------------------------
# Cases


@case
def node_toolchain_and_libraries():
    node = shutil.which("node")
    for mod, want in _pinned_versions().items():
        r = subprocess.run([node, "-e", "process.stdout.write(require(process.argv[1] + "
                            "'/package.json').version)", mod],
                           cwd=NODE_DIR, capture_output=True, text=True, timeout=TIMEOUT)
        check(r.returncode == 0, "cannot resolve %s from %s: %s" % (mod, NODE_DIR, r.stderr))
        check_eq(r.stdout, want, "installed version of %s" % mod)


def echo_frames(lib):
    h = start_hub()
    n = ready_node(h, lib)
    sent = [b"echo:hello", BIN, b"", b"echo:" + BIG, b"len:" + BIG, b"echo:\x00,:", b"echo:"]
    want = [b"hello", BIN, b"", BIG, b"len:204800", b"\x00,:", b""]
    for p in sent:
        n.send(p)
    if lib == "endo":
        # One frame handed to the writer as several chunks.
        n.send([b"echo:", b"multi", b"", b"-chunk:\x00"])
        want.append(b"multi-chunk:\x00")
    # Frames written back to back without waiting for each other.
    n.batch([b"echo:%d" % i for i in range(100)] + [BIN2, b""])
    want += [b"%d" % i for i in range(100)] + [BIN2, b""]
    n.wait_frames(len(want))
    got = n.take()
    check_eq(len(got), len(want), "number of frames echoed")
    for i, (g, w) in enumerate(zip(got, want)):
        check_eq(g, w, "echoed frame %d" % i)
    n.flush()
    n.finish()
    check_eq(n.frames, [], "frames after the last echo")
    check(h.count_log("protocol") == 0, "the hub logged a protocol error:\n%s" % h.log())


@case
def endo_echo_text_binary_empty_big():
    echo_frames("endo")


@case
def legacy_echo_text_binary_empty_big():
    echo_frames("legacy")


def relay_both_ways(lib):
    h = start_hub()
    p = ready_py(h, "py")
    n = ready_node(h, lib)
    # Python -> node (relay reaches the sender too).
    p.send(b"relay:" + BIN)
    pump([p])
    n.wait_frames(1)
    check_eq(n.take(), [BIN], "node got the binary relay from Python")
    wait_frames([p], 1)
    check_eq(p.take(), [BIN], "Python got its own relay")
    # node -> Python.
    n.send(b"relay:" + BIN2)
    wait_frames([p], 1)
    check_eq(p.take(), [BIN2], "Python got the binary relay from node")
    n.wait_frames(1)
    check_eq(n.take(), [BIN2], "node got its own relay")
    # Empty frames both ways.
    n.send(b"relay:")
    wait_frames([p], 1)
    check_eq(p.take(), [b""], "Python got the empty relay from node")
    p.send(b"relay:")
    pump([p])
    n.wait_frames(2)
    check_eq(n.take(), [b"", b""], "node got both empty relays")
    wait_frames([p], 1)
    check_eq(p.take(), [b""], "Python got its own empty relay")
    # 200 KiB both ways.
    n.send(b"relay:" + BIG2)
    wait_frames([p], 1)
    check_eq(p.take(), [BIG2], "Python got the 200 KiB relay from node")
    p.send(b"relay:" + BIG)
    pump([p])
    n.wait_frames(2)
    check_eq(n.take(), [BIG2, BIG], "node got its own 200 KiB relay then Python's")
    wait_frames([p], 1)
    check_eq(p.take(), [BIG], "Python got its own 200 KiB relay")
    n.finish()
    check_eq(n.frames, [], "node frames after the test")
    check_eq(fence_all(p, [p], [], "end"), [[]], "Python frames after the test")


@case
def endo_relay_python_to_node_and_back():
    relay_both_ways("endo")


@case
def legacy_relay_python_to_node_and_back():
    relay_both_ways("legacy")


@case
def multicast_by_tag_across_libraries():
    h = start_hub()
    p1 = ready_py(h, "py-tagged")
    p2 = ready_py(h, "py-untagged")
    e = ready_node(h, "endo")
    lg = ready_node(h, "legacy")
    check_eq(request(p1, "tag:py"), b"tagged:py", "Python tag")
    check_eq(e.request(b"tag:apps"), b"tagged:apps", "endo tag")
    check_eq(lg.request(b"tag:apps"), b"tagged:apps", "legacy tag")
    # Python -> both node clients.
    p1.send(b"mc:apps:" + BIN)
    pump([p1])
    for n in (e, lg):
        n.wait_frames(1)
        check_eq(n.take(), [BIN], "%s: multicast from Python" % n.name)
    # endo -> the Python client tagged py.
    e.send(b"mc:py:" + BIN2)
    wait_frames([p1], 1)
    check_eq(p1.take(), [BIN2], "Python: multicast from endo")
    # legacy -> both node clients (itself included), then endo -> both, 200 KiB.
    for sender, payload in ((lg, b"from-legacy:\x00"), (e, BIG)):
        sender.send(b"mc:apps:" + payload)
        for n in (e, lg):
            n.wait_frames(1)
            check_eq(n.take(), [payload], "%s: multicast from %s" % (n.name, sender.name))
    # A tag nobody has.
    check_eq(lg.request(b"mc:nobody:x"), b"error:multicast:no client", "multicast to nobody")
    # Nothing else arrived anywhere; the untagged Python client got none of it.
    got = fence_all(p2, [p1, p2], [e, lg], "mc")
    check_eq(got, [[], [], [], []], "frames before the fence (py, py-untagged, endo, legacy)")
    e.finish()
    lg.finish()


def error_frame_read_by_library(lib):
    h = start_hub()
    n = ready_node(h, lib)
    n.raw(b"3:abcX")  # no ',' after the payload: the hub answers an error frame and closes
    n.wait(lambda: n.eof, "the hub to close the connection")
    got = n.take()
    check_eq(len(got), 1, "frames before EOF (%r)" % got)
    err = parse_error_frame(got[0])
    check_eq(err.get("error"), "protocol", "error frame kind (%r)" % err)
    n.finish()


@case
def endo_reads_the_hub_error_frame():
    error_frame_read_by_library("endo")


@case
def legacy_reads_the_hub_error_frame():
    error_frame_read_by_library("legacy")


if __name__ == "__main__":
    suite.run()
