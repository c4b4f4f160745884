"""Shared helpers for the evhub integration tests: start real evhub processes, talk to them
over TCP with netstrings, and count what arrives.

Python standard library only. Every wait is bounded and driven by events (a log line, a frame,
a socket closing); every process and socket a test opens is closed by Suite.run().

Environment:
  EVHUB_BIN         the evhub executable (default: $EVHUB_SOURCE_DIR/build/evhub)
  EVHUB_SOURCE_DIR  the repository root
  EVHUB_WRAPPER     a command prefixed to evhub, e.g. "valgrind --error-exitcode=99 --leak-check=full"
"""

import collections
import json
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("EVHUB_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("EVHUB_BIN") or os.path.join(SOURCE_DIR, "build", "evhub")
CTL_BIN = os.environ.get("EVHUBCTL_BIN") or os.path.join(os.path.dirname(BIN), "evhubctl")
WRAPPER = shlex.split(os.environ.get("EVHUB_WRAPPER", ""))


def _binary_has(marker):
    try:
        with open(BIN, "rb") as f:
            return marker in f.read()
    except OSError:
        return False


# Instrumented runs are 2-50x slower and use more memory: scale volumes and timeouts.
ASAN = _binary_has(b"__asan_init")
VALGRIND = any("valgrind" in w for w in WRAPPER)
SLOW = VALGRIND or ASAN or bool(WRAPPER)
TIMEOUT = 90.0 if VALGRIND else (40.0 if SLOW else 20.0)


def scaled(normal, slow):
    """A volume for a normal run, and a smaller one under valgrind/ASan."""
    return slow if SLOW else normal


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def check_eq(got, want, what):
    if got != want:
        raise TestFailure("%s: got %s, want %s" % (what, _short(got), _short(want)))


def _short(v, limit=600):
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "...(%d chars)" % len(s)


# ---------------------------------------------------------------------------------------------
# Netstrings


def ns(data):
    """Encode one netstring."""
    if isinstance(data, str):
        data = data.encode()
    return b"%d:%s," % (len(data), data)


class NsParser:
    """A strict streaming netstring parser for what the hub sends. Once failed, stays failed."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.error = None

    def feed(self, data):
        """Append bytes; returns the list of complete payloads (bytes)."""
        out = []
        if self.error:
            return out
        self.buf += data
        buf = self.buf
        pos = self.pos
        n = len(buf)
        while pos < n:
            colon = buf.find(b":", pos, min(n, pos + 21))
            if colon < 0:
                if n - pos >= 21 or not bytes(buf[pos:n]).isdigit():
                    self.error = "bad netstring header %r" % bytes(buf[pos:pos + 24])
                break
            digits = bytes(buf[pos:colon])
            if not digits.isdigit():
                self.error = "bad netstring length %r" % digits
                break
            length = int(digits)
            end = colon + 1 + length
            if end >= n:
                break
            if buf[end] != 0x2C:
                self.error = "netstring of length %d not followed by ',' (got %r)" % (
                    length, bytes(buf[end:end + 1]))
                break
            out.append(bytes(buf[colon + 1:end]))
            pos = end + 1
        if pos > 0 and (pos > 65536 or pos == n):
            del buf[:pos]
            pos = 0
        self.pos = pos
        return out

    def pending(self):
        """Bytes received that do not (yet) form a complete frame."""
        return len(self.buf) - self.pos


# ---------------------------------------------------------------------------------------------
# Clients


class Client:
    """A non-blocking TCP client. Frames received are appended to .frames (netstring mode) or
    the bytes to .data (raw mode) by pump()."""

    def __init__(self, addr, raw=False, rcvbuf=None, name=None, connect_timeout=None):
        self.name = name or "client"
        self.raw = raw
        host, port = addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(connect_timeout or TIMEOUT)
        self.sock.connect((host, port))
        self.sock.setblocking(False)
        self.local = self.sock.getsockname()
        self.port = self.local[1]
        self.parser = NsParser()
        self.frames = []
        self.data = bytearray()
        self.outq = collections.deque()  # bytes objects; the first is partly sent from outpos
        self.outpos = 0
        self.out = 0  # bytes queued, not yet written
        self.eof = False
        self.err = None
        self.paused = False
        self.bytes_in = 0
        _registry_clients.append(self)

    def __repr__(self):
        return "<%s port=%d frames=%d eof=%s err=%s>" % (
            self.name, self.port, len(self.frames), self.eof, self.err)

    def send(self, payload):
        """Queue one netstring; pump() writes it."""
        self.send_raw(ns(payload))

    def send_raw(self, data):
        data = bytes(data) if isinstance(data, (bytes, bytearray)) else data.encode()
        if data:
            self.outq.append(data)
            self.out += len(data)

    def send_now(self, data):
        """Write bytes immediately (blocking up to TIMEOUT); for split-point tests."""
        self.sock.setblocking(True)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def take(self):
        """Return and forget the frames received so far."""
        f = self.frames
        self.frames = []
        return f

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.eof = True

    def _on_read(self):
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.eof = True
            self.err = e.__class__.__name__
            return
        if not chunk:
            self.eof = True
            return
        self.bytes_in += len(chunk)
        if self.raw:
            self.data += chunk
        else:
            self.frames.extend(self.parser.feed(chunk))
            if self.parser.error:
                raise TestFailure("%s received a malformed netstring: %s" % (
                    self.name, self.parser.error))

    def _on_write(self):
        bufs = [memoryview(self.outq[0])[self.outpos:]]
        for i in range(1, min(len(self.outq), 64)):
            bufs.append(self.outq[i])
        try:
            n = self.sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.err = e.__class__.__name__
            self.outq.clear()
            self.outpos = self.out = 0
            return
        self.out -= n
        n += self.outpos
        while self.outq and n >= len(self.outq[0]):
            n -= len(self.outq.popleft())
        self.outpos = n


_registry_clients = []
_registry_hubs = []


def pump(clients, until=None, timeout=None, what="condition"):
    """Read and write every client until until() is true (checked after each I/O round).
    Raises TestFailure after timeout seconds. With until=None, runs until every queued
    byte is written."""
    if until is None:
        def until():
            return all(not c.out for c in clients if not c.eof and not c.err)
    timeout = TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    # Every open client takes part (once), so nobody's queued output is forgotten.
    clients = list(dict.fromkeys(list(clients) + _registry_clients))
    sel = selectors.DefaultSelector()
    try:
        while True:
            if until():
                return
            now = time.monotonic()
            if now >= deadline:
                raise TestFailure("timed out after %.1fs waiting for %s; clients: %s" % (
                    timeout, what, clients))
            registered = 0
            for c in clients:
                if c.eof and not c.out:
                    continue
                ev = 0
                if not c.paused and not c.eof:
                    ev |= selectors.EVENT_READ
                if c.out and not c.err:
                    ev |= selectors.EVENT_WRITE
                if ev:
                    sel.register(c.sock, ev, c)
                    registered += 1
            if registered == 0:
                time.sleep(min(0.01, deadline - now))
                continue
            for key, ev in sel.select(min(0.05, deadline - now)):
                c = key.data
                if ev & selectors.EVENT_WRITE:
                    c._on_write()
                if ev & selectors.EVENT_READ:
                    c._on_read()
            for key in list(sel.get_map().values()):
                sel.unregister(key.fileobj)
    finally:
        sel.close()


def take_until(clients, marker, what):
    """Wait until every client has received the frame marker; drop it and return, for each
    client, the frames that came before it (the frames after it stay queued)."""
    pump(clients, lambda: all(marker in c.frames for c in clients), what=what)
    out = []
    for c in clients:
        i = c.frames.index(marker)
        out.append(c.frames[:i])
        c.frames = c.frames[i + 1:]
    return out


def fence(sender, clients, label):
    """sender relays a marker (CMD_SCRIPT's "relay:") and each client waits for it: anything
    the hub produced before is then already in its frames (per-connection order). Returns,
    for each client, the frames before the marker."""
    marker = ("fence-" + label).encode()
    sender.send(b"relay:" + marker)
    return take_until(clients, marker, "fence " + label)


def wait_frames(clients, counts, timeout=None, others=()):
    """Pump until each client in clients has at least the given number of frames."""
    if isinstance(counts, int):
        counts = [counts] * len(clients)
    allc = list(clients) + list(others)
    pump(allc, lambda: all(len(c.frames) >= n for c, n in zip(clients, counts)), timeout,
         "frames %s" % list(zip([c.name for c in clients], counts)))


def wait_eof(clients, timeout=None, others=()):
    pump(list(clients) + list(others), lambda: all(c.eof for c in clients), timeout,
         "connection close of %s" % [c.name for c in clients])


def request(client, payload, others=(), timeout=None):
    """Send one frame, wait for one new frame on that client, and return it (it is removed
    from client.frames; frames that were there before stay)."""
    n = len(client.frames)
    client.send(payload)
    wait_frames([client], n + 1, timeout, others)
    return client.frames.pop(n)


def wait_for(fetch, pred, what, timeout=None, interval=0.02):
    """Poll fetch() until pred(value) holds; returns the value. For state only a query shows
    (the control socket, files a script makes); frames and log lines have their own waits."""
    deadline = time.monotonic() + (TIMEOUT if timeout is None else timeout)
    while True:
        v = fetch()
        if pred(v):
            return v
        if time.monotonic() > deadline:
            raise TestFailure("timed out waiting for %s; last value %r" % (what, v))
        time.sleep(interval)


def parse_error_frame(frame):
    """Decode a hub error frame; returns the dict."""
    try:
        obj = json.loads(frame.decode())
    except (ValueError, UnicodeDecodeError):
        raise TestFailure("expected a JSON error frame, got %s" % _short(frame))
    check(isinstance(obj, dict), "error frame is not a JSON object: %s" % _short(frame))
    check(isinstance(obj.get("reason"), str) and obj["reason"] != "",
          "error frame has no non-empty \"reason\": %s" % _short(frame))
    return obj


# ---------------------------------------------------------------------------------------------
# The hub process


_SIGTERM = signal.SIGTERM
READY_RE = re.compile(r"listening on (\S+)")


def _split_hostport(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


class Hub:
    """One evhub process with its own temp dir, config and script.

    evapi/lua/log/control are dicts of INI keys (order kept); bind_addr defaults to
    127.0.0.1:0 and the control socket to ctl.sock in the hub's temp dir. conf_text replaces the
    generated config entirely (a [control] section is still added when it has none, so that
    no test touches the default /run/evhub/evhub.sock)."""

    def __init__(self, script=None, evapi=None, lua=None, log=None, extra="", conf_text=None,
                 args=(), env=None, script_name="script.lua", wrapper=True, control=None):
        self.dir = tempfile.mkdtemp(prefix="evhub-test-")
        self.conf = os.path.join(self.dir, "evhub.conf")
        self.ctl_path = os.path.join(self.dir, "ctl.sock")
        self.script_path = os.path.join(self.dir, script_name)
        self.logfile = os.path.join(self.dir, "evhub.log")
        self.args = list(args)
        self.env = dict(os.environ)
        if env:
            self.env.update(env)
        self.wrapper = WRAPPER if wrapper else []
        self.proc = None
        self.addr = None
        self.rc = None
        if script is not None:
            self.write_script(script)
        if conf_text is None:
            ev = {"bind_addr": "127.0.0.1:0"}
            ev.update(evapi or {})
            lu = {"script": script_name}
            lu.update(lua or {})
            lg = {"level": "info"}
            lg.update(log or {})
            ct = {"socket": self.ctl_path}
            ct.update(control or {})
            conf_text = "".join([
                "; generated by evhub_harness.py\n",
                _section("evapi", ev), _section("lua", lu), _section("log", lg),
                _section("control", ct), extra])
        elif "[control]" not in conf_text:
            conf_text += "\n" + _section("control", {"socket": self.ctl_path})
        self.conf_text = conf_text
        with open(self.conf, "w") as f:
            f.write(conf_text)
        _registry_hubs.append(self)

    def write_script(self, text):
        tmp = self.script_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.script_path)

    def command(self, *extra):
        return self.wrapper + [BIN, "-c", self.conf, "-f"] + self.args + list(extra)

    def start(self, wait=True):
        self._log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=self.env)
        self._log.close()
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, timeout=None):
        m = self.wait_log(READY_RE, timeout, what="the 'listening on' line")
        self.addr = _split_hostport(m.group(1).rstrip(",;."))
        return self.addr

    def wait_log(self, pattern, timeout=None, count=1, what=None):
        """Poll the log until pattern (regex or str) occurs count times; returns the last match.
        Fails early if the process exits first."""
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        timeout = TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            found = list(rx.finditer(text))
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                text = self.log()
                found = list(rx.finditer(text))
                if len(found) >= count:
                    return found[count - 1]
                raise TestFailure("evhub exited (rc %s) before logging %s; log:\n%s" % (
                    self.proc.returncode, what or rx.pattern, _tail(text)))
            if time.monotonic() >= deadline:
                raise TestFailure("timed out after %.0fs waiting for log %s (%d/%d); log:\n%s"
                                  % (timeout, what or rx.pattern, len(found), count,
                                     _tail(text)))
            time.sleep(0.02)

    def count_log(self, pattern):
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        return len(rx.findall(self.log()))

    def client(self, **kw):
        return Client(self.addr, **kw)

    def ctl(self, *args, timeout=None, socket_path=None):
        """Run evhubctl against this hub's control socket: (rc, stdout, stderr)."""
        return run_ctl(["-s", socket_path or self.ctl_path] + [str(a) for a in args],
                       timeout=timeout)

    def ctl_json(self, *args, timeout=None):
        """evhubctl --json ARGS; requires exit 0 and returns the parsed result."""
        rc, out, err = self.ctl("--json", *args, timeout=timeout)
        check(rc == 0, "evhubctl %s: rc %s, stderr %r, stdout %r; hub log:\n%s" % (
            " ".join(map(str, args)), rc, err, out, _tail(self.log())))
        try:
            return json.loads(out)
        except ValueError:
            raise TestFailure("evhubctl %s printed no JSON: %r" % (" ".join(map(str, args)), out))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=None):
        timeout = TIMEOUT if timeout is None else timeout
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure("evhub did not exit within %.0fs; log:\n%s" % (
                timeout, _tail(self.log())))
        return self.rc

    def stop(self, sig=_SIGTERM, timeout=None):
        """Signal the hub and require a clean exit (rc 0: no valgrind/ASan error either)."""
        if self.proc.poll() is None:
            self.signal(sig)
        rc = self.wait_exit(timeout)
        check(rc == 0, "evhub exited with rc %s after %s; log:\n%s" % (
            rc, signal.Signals(sig).name, _tail(self.log())))
        return rc

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise TestFailure("no VmRSS for pid %d" % self.proc.pid)

    def cpu_seconds(self):
        """User + system CPU time of the hub (all its threads), from /proc."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                pass


class Raw:
    """A raw JSON-RPC connection to a hub's control socket: answers are lines of JSON."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def answer(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TestFailure("control connection closed; unread %r" % self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def expect_closed(self, what):
        """The hub closes this connection (after the answers already read)."""
        try:
            rest = self.sock.recv(65536)
        except ConnectionResetError:
            rest = b""
        check_eq(self.buf + rest, b"", "connection closed " + what)
        self.close()

    def call(self, obj):
        self.send(json.dumps(obj) + "\n")
        return self.answer()

    def request(self, method, rid, params):
        """Call method with id rid and params; the answer."""
        return self.call({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})

    def close(self):
        self.sock.close()


def _section(name, kv):
    return "[%s]\n%s\n" % (name, "".join("%s = %s\n" % (k, v) for k, v in kv.items()))


def _tail(text, lines=40):
    parts = text.splitlines()
    return "\n".join("    | " + l for l in parts[-lines:])


def run_ctl(args, timeout=None, env=None):
    """Run evhubctl to completion: (rc, stdout, stderr), decoded."""
    timeout = TIMEOUT if timeout is None else timeout
    e = dict(os.environ)
    e.pop("EVHUB_SOCKET", None)
    if env:
        e.update(env)
    try:
        p = subprocess.run([CTL_BIN] + list(args), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=timeout, env=e)
    except subprocess.TimeoutExpired:
        raise TestFailure("evhubctl %s did not exit within %.0fs" % (" ".join(args), timeout))
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def run_once(args, timeout=None, env=None, wrapper=True):
    """Run evhub to completion (e.g. -t, a bad config) and return (rc, combined output)."""
    timeout = TIMEOUT if timeout is None else timeout
    cmd = (WRAPPER if wrapper else []) + [BIN] + list(args)
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=e)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise TestFailure("%s did not exit within %.0fs" % (" ".join(args), timeout))
    return p.returncode, out.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# A tiny test runner


class Suite:
    """Collects cases; run() prints one line per case and the final "N passed, M failed"."""

    def __init__(self, name):
        self.name = name
        self.cases = []

    def case(self, fn):
        self.cases.append(fn)
        return fn

    def case_with(self, name, fn, *args, **kw):
        """Add case name: fn(*args, **kw) (one variant of a parameterised case)."""
        def variant():
            return fn(*args, **kw)
        variant.__name__ = name
        self.cases.append(variant)

    def run(self):
        if not os.access(BIN, os.X_OK):
            print("evhub binary not found or not executable: %s" % BIN)
            print("0 passed, 1 failed")
            sys.exit(1)
        # Stopped by ctest's timeout or Ctrl-C: still kill every hub this script started.
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            self._run()
        finally:
            for h in _registry_hubs:
                h.kill()

    def _run(self):
        only = set(sys.argv[1:])
        passed = failed = 0
        print("%s: evhub=%s wrapper=%r asan=%s" % (self.name, BIN, " ".join(WRAPPER), ASAN))
        sys.stdout.flush()
        for fn in self.cases:
            if only and fn.__name__ not in only:
                continue
            t0 = time.monotonic()
            ok = False
            try:
                fn()
                ok = True
            except Exception as e:  # noqa: BLE001 - report every failure the same way
                msg = "".join(traceback.format_exception(e)) if not isinstance(
                    e, TestFailure) else "%s\n%s" % (e, "".join(traceback.format_tb(
                        e.__traceback__)[-2:]))
                print("FAIL %s (%.1fs)\n%s" % (fn.__name__, time.monotonic() - t0,
                                                 _indent(msg)))
            finally:
                cleanup_ok = _cleanup(ok)
            if ok and cleanup_ok:
                passed += 1
                print("ok   %s (%.1fs)" % (fn.__name__, time.monotonic() - t0))
            else:
                failed += 1
            sys.stdout.flush()
        print("%d passed, %d failed" % (passed, failed))
        sys.stdout.flush()
        sys.exit(0 if failed == 0 and passed > 0 else 1)


def _on_sigterm(signum, frame):
    raise SystemExit("terminated by signal %d" % signum)


def _indent(text):
    return "\n".join("    " + l for l in text.rstrip().splitlines())


def _cleanup(ok):
    """Close every client, stop every hub still running (SIGTERM, then SIGKILL). A hub that
    was still running at the end of a passing case must exit 0 on SIGTERM (this is how
    valgrind/ASan findings surface)."""
    for c in _registry_clients:
        c.close()
    del _registry_clients[:]
    good = True
    for h in _registry_hubs:
        if h.alive():
            if ok:
                h.signal(signal.SIGTERM)
                try:
                    rc = h.proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                if rc != 0:
                    good = False
                    print("FAIL cleanup: evhub (pid %d) exited with %s on SIGTERM; log:\n%s" % (
                        h.proc.pid, rc, _tail(h.log())))
            h.kill()
        elif h.proc is not None and h.proc.returncode is not None and (
                h.proc.returncode < 0 or h.proc.returncode > 1) and h.rc is None:
            good = False
            print("FAIL cleanup: evhub (pid %d) died on its own with rc %s; log:\n%s" % (
                h.proc.pid, h.proc.returncode, _tail(h.log())))
        if not ok and h.proc is not None:
            print("    evhub log (%s):\n%s" % (h.logfile, _tail(h.log(), 25)))
        if ok and good:
            _rmtree(h.dir)
    del _registry_hubs[:]
    return good


def _rmtree(d):
    for root, dirs, files in os.walk(d, topdown=False):
        for f in files:
            try:
                os.unlink(os.path.join(root, f))
            except OSError:
                pass
        for x in dirs:
            try:
                os.rmdir(os.path.join(root, x))
            except OSError:
                pass
    try:
        os.rmdir(d)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# A native-dialect script with a tiny command language ("cmd:args"), shared by several tests.

CMD_SCRIPT = r'''
-- evhub integration-test script (native dialect): frames are "cmd:args" commands.
local function res(a, b) return tostring(a) .. " " .. tostring(b) end

evapi.on("connect", function(conn)
end)

evapi.on("close", function(conn)
    evapi.multicast("closed:" .. conn.id, "watch")
end)

evapi.on("message", function(conn, msg)
    if msg == "" then conn:send("empty") return end
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    if cmd == "echo" then
        conn:send(rest)
    elseif cmd == "relay" then
        evapi.relay(rest)
    elseif cmd == "rrelay" then
        local a, b = evapi.relay(rest)
        conn:send("rrelay " .. res(a, b))
    elseif cmd == "mc" or cmd == "rmc" or cmd == "uc" or cmd == "ruc" then
        local tag, data = rest:match("^([^:]*):(.*)$")
        local f = (cmd == "mc" or cmd == "rmc") and evapi.multicast or evapi.unicast
        local a, b = f(data, tag)
        if cmd:sub(1, 1) == "r" then conn:send(cmd .. " " .. res(a, b)) end
    elseif cmd == "tag" then
        local ok, a = pcall(conn.set_tag, conn, rest)
        conn:send("tag " .. tostring(ok) .. " " .. tostring(conn.tag))
    elseif cmd == "info" then
        conn:send(json.encode({id = conn.id, addr = conn.addr, port = conn.port,
                               tag = conn.tag or json.null}))
    elseif cmd == "json" then
        conn:send(json.encode(json.decode(rest)))
    elseif cmd == "close" then
        conn:send("closing")
        if rest == "" then conn:close() else conn:close(rest) end
    else
        conn:send("unknown:" .. msg)
    end
end)
'''
