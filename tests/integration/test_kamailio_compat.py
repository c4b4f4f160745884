#!/usr/bin/python3
"""Differential test against the real thing: the Kamailio evapi KEMI Lua script
tests/integration/kamailio/evapi.lua runs UNCHANGED under Kamailio 5.6 (evapi + app_lua, with
tests/integration/kamailio/kamailio.cfg) and under evhub ([evapi] event_callback =
ksr_evapi_event, max_clients = 8), and netstring TCP clients get the same frames from both.

Each case starts a fresh Kamailio and fresh evhubs (workers = 1, as in kamailio.cfg, and
workers = 0), plays the same scenario against each, and compares per client: every payload in
order, and whether the hub closed the connection. Client ports are replaced by client names
before comparing (they differ from run to run). Each step ends with a barrier: the sender
sends "sync sync-N", the script relays sync-N to every connection (and replies nothing), and
the step is over when every open client has it (per-connection FIFO means everything the step
caused came before; see Run.sync).

Deliberate, documented differences (README) are kept out of the comparison and evhub's fixed
behaviour is asserted instead; Kamailio's behaviour there is printed as a note only:
  * a frame over ~32 KB: Kamailio drops the connection; evhub takes it (max_frame_size 1m);
  * a frame split inside its length prefix: Kamailio loses it; evhub reassembles it;
  * "0:,": Kamailio discards it; evhub delivers an empty message;
  * the 9th client (max_clients 8): Kamailio accepts and closes it silently; evhub sends
    {"error":"max_clients","reason":...} first;
  * tags: evhub takes 1..64 printable bytes without spaces (Kamailio 0..63 of anything); only
    tags valid in both are used here.

Where the two must agree and each case's scenario:
  routing_and_return_codes        relay / relay_multicast / relay_unicast / set_tag return codes
                                  and payloads, $evapi(...) values and types, KSR.x.exit, an empty
                                  relay, a 100000-byte relay, UTF-8, batched and split frames,
                                  connection-closed events, KSR.info lines in both logs
  unicast_goes_to_the_lowest_conidx   which member of a tag a unicast reaches
  conidx_reuse_takes_the_lowest_free_slot   $evapi(conidx) of new connections after closes
  close_in_message_received       KSR.evapi.close() on a "bye" message
  return_codes_right_after_set_tag    set_tag(T), then unicast/multicast to T, same callback
  close_in_connection_new         the documented ACL: close() in evapi:connection-new
  max_clients_8                   8 clients, the 9th refused, the freed slot reused
  framing_fixed_in_evhub          the documented framing differences (evhub asserted only)
  async_routing_example           examples/async-routing/kemi.lua (the SIP async round trip:
                                  async_unicast, t_continue, append_to_reply, t_reply,
                                  t_check_trans) in Kamailio (tm, tmx, sl, pv with
                                  examples/async-routing/kamailio.cfg) and in evhub ([sip]),
                                  the same routing application connected to each: the same
                                  replies to the same INVITEs, the ACK absorbed by both

Requires the Debian packages kamailio, kamailio-extra-modules (evapi) and kamailio-lua-modules
(app_lua). Without them every case FAILS (never skips).

Environment: EVHUB_BIN (see evhub_harness.py), KAMAILIO_BIN (default: kamailio on PATH),
KAMCOMPAT_DUMP=1 prints Kamailio's transcripts. Run one case: test_kamailio_compat.py CASE.
"""

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from evhub_harness import (TIMEOUT, Hub, NsParser, Suite, TestFailure,  # noqa: E402
                           check, check_eq, ns, parse_error_frame)
from sip_peer import SipPeer  # noqa: E402

suite = Suite("kamailio_compat")

KAM_DIR = os.path.join(HERE, "kamailio")
SCRIPT = os.path.join(KAM_DIR, "evapi.lua")
CFG = os.path.join(KAM_DIR, "kamailio.cfg")
APT_PACKAGES = "kamailio kamailio-extra-modules kamailio-lua-modules"
KAMAILIO = os.environ.get("KAMAILIO_BIN") or shutil.which("kamailio") or "/usr/sbin/kamailio"
KAM_MODULES = ("evapi.so", "app_lua.so")
KAM_MODDIRS = ("/usr/lib/x86_64-linux-gnu/kamailio/modules",
               "/usr/lib/aarch64-linux-gnu/kamailio/modules", "/usr/lib/kamailio/modules")

# One wait of the scenario. Kamailio answers in microseconds on loopback; evhub under
# valgrind is slower (TIMEOUT is scaled by the harness).
STEP_TIMEOUT = min(TIMEOUT, 10.0)


class ScenarioAbort(Exception):
    """A wait of the scenario timed out: the transcript so far is still compared."""


def note(text):
    print("    note: " + text.replace("\n", "\n          "))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Kamailio


def require_kamailio():
    problems = []
    if not (os.path.isfile(KAMAILIO) and os.access(KAMAILIO, os.X_OK)):
        problems.append("no kamailio executable (looked for %s)" % KAMAILIO)
    for mod in KAM_MODULES:
        if not any(os.path.isfile(os.path.join(d, mod)) for d in KAM_MODDIRS):
            problems.append("Kamailio module %s not found in %s" % (mod, ", ".join(KAM_MODDIRS)))
    if problems:
        raise TestFailure("Kamailio is required for this test and is not installed: %s.\n"
                          "Install it with: apt-get install -y %s"
                          % ("; ".join(problems), APT_PACKAGES))


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _listen_inode(port):
    """The socket inode listening on 127.0.0.1:port, from /proc/net/tcp (no connection made)."""
    want = "0100007F:%04X" % port
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if p[1] == want and p[3] == "0A":
                    return p[9]
    except OSError:
        pass
    return None


def _group(pgid):
    """{pid: state} of the processes in process group pgid (Kamailio's, see start_new_session)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            out[int(d)] = fields[0]
    return out


def _owns_socket(pids, inode):
    link = "socket:[%s]" % inode
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == link:
                    return True
            except OSError:
                pass
    return False


class Kamailio:
    """Kamailio in the foreground on a private run directory, ports picked here."""

    name = "kamailio"

    def __init__(self):
        require_kamailio()
        self.dir = tempfile.mkdtemp(prefix="evhub-kamailio-")
        self.logfile = os.path.join(self.dir, "kamailio.log")
        self.port = free_port(socket.SOCK_STREAM)
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", self.port)
        self.proc = None
        self.proc_rc = None
        self.final_log = None

    def command(self):
        return [KAMAILIO, "-f", CFG, "-DD", "-E", "-Y", self.dir, "-m", "32", "-M", "4",
                "-A", 'EVAPI_BIND="127.0.0.1:%d"' % self.port,
                "-A", "SIP_LISTEN=udp:127.0.0.1:%d" % self.sip_port,
                "-A", 'LUA_SCRIPT="%s"' % SCRIPT]

    def start(self):
        for attempt in range(3):
            if attempt:  # a port picked here was taken meanwhile: pick others
                self.port = free_port(socket.SOCK_STREAM)
                self.sip_port = free_port(socket.SOCK_DGRAM)
            if self._start_once():
                return self
        raise TestFailure("kamailio could not bind its ports 3 times; log:\n%s" % self.tail())

    def _start_once(self):
        self.addr = ("127.0.0.1", self.port)
        cmd = self.command()
        with open(self.logfile, "wb") as log:
            # Its own process group: stop() can then find every process it forked.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, cwd=self.dir, start_new_session=True)
        _running.append(self)
        deadline = time.monotonic() + 20
        while True:
            inode = _listen_inode(self.port)
            if inode and _owns_socket(_group(self.proc.pid), inode):
                return True
            if self.proc.poll() is not None or "cannot bind" in self.log():
                self.stop()
                if re.search(r"cannot bind|bind.*Address already in use", self.log()):
                    return False
                raise TestFailure("kamailio exited with rc %s at start-up; command: %s\n"
                                  "log:\n%s" % (self.proc_rc, " ".join(cmd), self.tail()))
            if time.monotonic() > deadline:
                raise TestFailure("kamailio did not listen on 127.0.0.1:%d within 20s; log:\n%s"
                                  % (self.port, self.tail()))
            time.sleep(0.02)

    def log(self):
        if self.final_log is not None:
            return self.final_log
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n=30):
        return "\n".join("    | " + line for line in self.log().splitlines()[-n:])

    def stop(self):
        """SIGTERM to the main process (it stops its children and waits for them), then make
        sure nothing of its process group is left (SIGKILL to the group as a last resort)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc_rc = self.proc.returncode
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if all(st == "Z" for st in _group(pgid).values()):
                break
            time.sleep(0.02)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        self.proc = None
        if self in _running:
            _running.remove(self)

    def cleanup(self):
        """Stop, keep the log text for reports, remove the run directory."""
        self.stop()
        self.final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)


class Evhub:
    """evhub on the same script file, configured like kamailio.cfg."""

    def __init__(self, workers):
        self.name = "evhub(workers=%d)" % workers
        self.hub = Hub(evapi={"event_callback": "ksr_evapi_event", "max_clients": 8,
                              "workers": workers},
                       lua={"script": SCRIPT})

    def start(self):
        self.hub.start()
        self.addr = self.hub.addr
        return self

    def log(self):
        return self.hub.log()

    def tail(self, n=30):
        return "\n".join("    | " + line for line in self.log().splitlines()[-n:])

    def stop(self):
        if self.hub.alive():
            self.hub.stop()


_running = []


def _stop_kamailios():
    while _running:
        _running[-1].cleanup()


# ---------------------------------------------------------------------------------------------
# Clients


class Peer:
    """A netstring TCP client; what it receives goes to .frames, a close to .closed."""

    def __init__(self, name, addr, src="127.0.0.1"):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((src, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(STEP_TIMEOUT)
        self.sock.connect(addr)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.parser = NsParser()
        self.frames = []
        self.closed = None  # None, "eof" or the error
        self.out = bytearray()
        self.hung_up = False  # we closed it

    def send(self, payload):
        self.out += ns(payload)

    def send_raw(self, data):
        self.out += data

    def hang_up(self):
        self.sock.close()
        self.hung_up = True

    @property
    def open(self):
        return self.closed is None and not self.hung_up

    def on_read(self):
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.closed = e.__class__.__name__
            return
        if not chunk:
            self.closed = "eof"
            return
        for f in self.parser.feed(chunk):
            self.frames.append(f.decode("utf-8", "surrogateescape"))
        if self.parser.error:
            self.frames.append("<malformed: %s>" % self.parser.error)
            self.closed = "malformed"

    def on_write(self):
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.closed = e.__class__.__name__
            self.out.clear()
            return
        del self.out[:n]


class Run:
    """One scenario played against one target; .transcript() is what gets compared."""

    def __init__(self, target, timeout=STEP_TIMEOUT):
        self.t = target
        self.timeout = timeout
        self.peers = {}
        self.nsync = 0

    def connect(self, name, src="127.0.0.1", welcome=True):
        p = Peer(name, self.t.addr, src)
        self.peers[name] = p
        if welcome:
            self.wait(lambda: p.frames or not p.open, "the welcome of %s" % name)
        return p

    def pump(self, until):
        deadline = time.monotonic() + self.timeout
        sel = selectors.DefaultSelector()
        try:
            while not until():
                now = time.monotonic()
                if now >= deadline:
                    return False
                n = 0
                for p in self.peers.values():
                    if p.hung_up or p.closed is not None:
                        continue
                    ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if p.out else 0)
                    sel.register(p.sock, ev, p)
                    n += 1
                if n == 0:
                    time.sleep(min(0.01, deadline - now))
                    continue
                for key, ev in sel.select(min(0.05, deadline - now)):
                    if ev & selectors.EVENT_WRITE:
                        key.data.on_write()
                    if ev & selectors.EVENT_READ:
                        key.data.on_read()
                for key in list(sel.get_map().values()):
                    sel.unregister(key.fileobj)
        finally:
            sel.close()
        return True

    def wait(self, until, what):
        if not self.pump(until):
            raise ScenarioAbort("%s: timed out after %.0fs waiting for %s" % (
                self.t.name, self.timeout, what))

    def flush(self):
        self.wait(lambda: not any(p.out for p in self.peers.values() if p.open), "writes")

    def sync(self, via):
        """Barrier: `via` sends "sync sync-N" (the script relays sync-N to every connection
        and replies nothing); wait until every open client has sync-N.

        sync-N must be the last frame the step causes at every client. It used to be
        "relay sync-N", whose "rc relay N" reply comes after sync-N at the sender, and only
        when the sender still has its own "<addr>:<port>" tag (not after "join monitor").
        Kamailio writes the two in separate writes (the evapi worker hands each relay to the
        dispatcher process on its own), so the reply could arrive after the barrier had
        ended: whether the last step's reply made it into Kamailio's transcript before
        close_all() was left to chance (conidx_reuse_takes_the_lowest_free_slot failed about
        2 runs in 3 with "rc relay 1" missing at client f on the Kamailio side only, while
        evhub, which writes both in one go, always had it). Waiting for the reply instead
        would need the test to know every sender's current tag. Return codes of relay are
        still compared where the scenarios send "relay" themselves."""
        self.nsync += 1
        tok = "sync-%d" % self.nsync
        self.peers[via].send("sync " + tok)
        self.wait(lambda: all(tok in p.frames for p in self.peers.values() if p.open),
                  "%s at every open client" % tok)

    def step(self, name, *payloads):
        """Send the commands, then a barrier through the same connection."""
        for pl in payloads:
            self.peers[name].send(pl)
        self.sync(name)

    def hang_up(self, name, watcher="monitor"):
        """The client closes; wait until the watcher hears of it (connection-closed)."""
        p = self.peers[name]
        p.hang_up()
        w = self.peers[watcher]
        self.wait(lambda: any(f.startswith("left %s " % self.tag(name)) for f in w.frames),
                  "'left' of %s at %s" % (name, watcher))

    def tag(self, name):
        return "127.0.0.1:%d" % self.peers[name].port

    def transcript(self, exclude=()):
        """{client: [frames..., "<closed by hub>"]} with client ports replaced by names."""
        subs = [(re.compile(r"(?<![0-9])%d(?![0-9])" % p.port), "<%s>" % n)
                for n, p in self.peers.items()]
        out = {}
        for n, p in self.peers.items():
            if n in exclude:
                continue
            frames = []
            for f in p.frames:
                for rx, rep in subs:
                    f = rx.sub(rep, f)
                frames.append(f)
            if p.closed is not None:
                frames.append("<closed by hub: %s>" % p.closed)
            out[n] = frames
        return out

    def close_all(self):
        for p in self.peers.values():
            if not p.hung_up:
                p.hang_up()


def _short(s, n=160):
    return s if len(s) <= n else s[:n] + "...(%d chars)" % len(s)


def diff_transcripts(ref, got, ref_name, got_name):
    lines = []
    for name in sorted(set(ref) | set(got), key=lambda n: (n not in ref, n)):
        a, b = ref.get(name), got.get(name)
        if a == b:
            continue
        if a is None or b is None:
            lines.append("client %s: only in %s" % (name, ref_name if b is None else got_name))
            continue
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        lines.append("client %s: first difference at frame %d of %d/%d" % (
            name, i, len(a), len(b)))
        lines.append("    %-18s %s" % (ref_name + ":", " | ".join(_short(x) for x in a[i:i + 4])
                                       or "(nothing more)"))
        lines.append("    %-18s %s" % (got_name + ":", " | ".join(_short(x) for x in b[i:i + 4])
                                       or "(nothing more)"))
    return "\n".join(lines)


def play(target, scenario, timeout=STEP_TIMEOUT):
    """Start the target and play the scenario; returns (run, aborted-reason or None)."""
    target.start()
    run = Run(target, timeout)
    aborted = None
    try:
        scenario(run)
    except ScenarioAbort as e:
        aborted = str(e)
    except (OSError, TestFailure) as e:
        aborted = "%s: %s: %s" % (target.name, e.__class__.__name__, e)
    finally:
        run.close_all()
    return run, aborted


def differential(scenario, exclude=(), extra_checks=None):
    """Play scenario on Kamailio, then on evhub with workers=1 and workers=0; compare."""
    kam = Kamailio()
    try:
        kr, kabort = play(kam, scenario)
    finally:
        kam.cleanup()
    if kabort:
        raise TestFailure("the scenario failed on Kamailio itself (the test's expectation is "
                          "wrong, or Kamailio is broken): %s\nkamailio log:\n%s"
                          % (kabort, kam.tail()))
    ref = kr.transcript(exclude)
    if os.environ.get("KAMCOMPAT_DUMP"):
        for name, frames in ref.items():
            note("kamailio %s: %s" % (name, " | ".join(_short(f, 80) for f in frames)))
    if extra_checks:
        extra_checks(kr, kam, None)
    failures = []
    for workers in (1, 0):
        ev = Evhub(workers)
        er, eabort = play(ev, scenario)
        got = er.transcript(exclude)
        if got != ref or eabort:
            failures.append("%s differs from Kamailio 5.6%s:\n%s" % (
                ev.name, (" (%s)" % eabort) if eabort else "",
                diff_transcripts(ref, got, "kamailio", ev.name)))
        elif extra_checks:
            extra_checks(er, ev, kr)
        ev.stop()
    if failures:
        raise TestFailure("\n".join(failures))
    return kr


# ---------------------------------------------------------------------------------------------
# Scenarios

TAG63 = "t" * 63
TAG65 = "u" * 65


def scenario_routing(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    for n in ("alice", "bob", "g1", "g2"):
        r.connect(n)
    r.step("g1", "join grp")
    r.step("g2", "join grp")
    # One command per step: each gets its own barrier.
    for cmd in ("pv", "relay hello everyone", "relay ", "mc grp to the group",
                "mc monitor to the monitor", "mc nobody lost"):
        r.step("alice", cmd)
    for cmd in ("uc grp to one member", "uc nobody lost",
                "echo h\u00e9llo w\u00f6rld \u2713 : , 12:x, \t{\"json\":[1,2]}", "big 100000",
                "tag " + TAG65, "tag " + TAG63, "tag " + r.tag("bob")):
        r.step("bob", cmd)
    for cmd in ("exit", "no such command"):
        r.step("alice", cmd)
    # Several frames in one write, with the whitespace evapi skips between frames.
    r.peers["alice"].send_raw(ns("pv") + b"\r\n" + ns("echo second") + b" \t" + ns("echo third"))
    r.sync("alice")
    # A frame split inside its payload, in two writes.
    whole = ns("echo split in two")
    r.peers["alice"].send_raw(whole[:8])
    r.flush()
    time.sleep(0.1)
    r.peers["alice"].send_raw(whole[8:])
    r.sync("alice")
    r.hang_up("bob")
    r.sync("alice")
    r.hang_up("g1")
    r.step("alice", "mc grp after g1 left")
    r.step("alice", "uc grp after g1 left")


def check_routing(run, target, ref_run):
    """Spot checks of what the scenario is meant to show (on Kamailio and evhub alike)."""
    t = run.transcript()
    for name in ("monitor", "alice", "bob", "g1", "g2"):
        p = run.peers[name]
        check(re.match(r"welcome 127\.0\.0\.1:%d conidx=\d set_tag=1 msg=nil types=number,number$"
                       % p.port, p.frames[0]),
              "%s: welcome of %s: %r" % (target.name, name, p.frames[0]))
    a = t["alice"]
    for want in ("rc relay 1", "rc mc 1", "rc mc -1", "hello everyone", "",
                 "pv srcaddr=127.0.0.1 srcport=<alice> conidx=1 msg=pv other=nil",
                 "rc exit", "unknown no such command", "second", "third", "split in two"):
        check(want in a, "%s: alice did not get %r: %r" % (target.name, want, a))
    check("not reached" not in a, "%s: KSR.x.exit() did not stop the callback" % target.name)
    b = t["bob"]
    check("rc uc 1" in b and "rc uc -1" in b and "rc tag -1" in b and b.count("rc tag 1") == 2,
          "%s: bob's return codes: %r" % (target.name, b))
    check(("0123456789" * 10000) in b, "%s: bob did not get the 100000-byte frame" % target.name)
    check("to one member" in t["g1"] and "to one member" not in t["g2"],
          "%s: unicast did not pick the first member (g1)" % target.name)
    check("after g1 left" in t["g2"], "%s: g2 lost traffic after g1 left" % target.name)
    log = target.log()
    for name, idx in (("alice", 1), ("bob", 2)):
        line = "===== evapi: new connection %s conidx=%d" % (run.tag(name), idx)
        check(line + "\n" in log, "%s: KSR.info line %r not in the log" % (target.name, line))
        check(line + "\n\n" not in log, "%s: KSR.info kept the script's \\n" % target.name)
    check("SIP request" not in log, "%s: ksr_request_route was called" % target.name)


@suite.case
def routing_and_return_codes():
    """The bulk of the script: routing, return codes, variables, framing that both accept."""
    differential(scenario_routing, extra_checks=check_routing)


def scenario_unicast_first(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    for n in ("a", "b", "c"):
        r.connect(n)
    # c (conidx 3) joins the group before b (conidx 2).
    r.step("c", "join grp")
    r.step("b", "join grp")
    r.step("a", "uc grp to the first", "uc grp again")


@suite.case
def unicast_goes_to_the_lowest_conidx():
    """Kamailio's unicast writes to the first matching slot of its client array (the lowest
    conidx), whichever connection took the tag first."""
    differential(scenario_unicast_first)


def scenario_conidx_reuse(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    for n in ("a", "b", "c", "d"):
        r.connect(n)
    r.hang_up("b")  # conidx 2
    r.hang_up("d")  # conidx 4
    r.connect("e")
    r.connect("f")
    r.step("e", "pv")
    r.step("f", "pv")


@suite.case
def conidx_reuse_takes_the_lowest_free_slot():
    """Kamailio gives a new connection the first free slot of its array: after conidx 2 then
    4 are freed, the next connections get 2, then 4."""
    differential(scenario_conidx_reuse)


def scenario_close_in_message_received(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    r.connect("alice")
    r.connect("bob")
    r.step("alice", "relay before")
    r.peers["alice"].send("bye")
    r.wait(lambda: not r.peers["alice"].open, "alice closed by the script")
    r.step("bob", "relay after")
    r.step("bob", "uc " + r.tag("alice") + " to the closed one")
    # No new connection after this: Kamailio 5.6 leaves the read watcher of a connection it
    # closed from a script behind, and a new connection reusing the descriptor misbehaves.


@suite.case
def close_in_message_received():
    """KSR.evapi.close() on a "bye" message. Kamailio: returns 0, the goodbye unicast before
    it is delivered, a unicast to the closed connection's tag right after returns -1, and no
    evapi:connection-closed event runs for it."""
    differential(scenario_close_in_message_received)


def scenario_set_tag_then_relay(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    r.connect("a")
    r.connect("b")
    r.step("a", "retag alpha")
    r.step("b", "retag alpha")
    r.step("monitor", "mc alpha to both")


@suite.case
def return_codes_right_after_set_tag():
    """set_tag(T) then relay_unicast/relay_multicast(..., T) in the same callback: delivered,
    and 1 returned (the usual "tag in connection-new, then unicast to it" pattern)."""
    differential(scenario_set_tag_then_relay)


def scenario_refuse_in_connection_new(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    r.connect("stranger", src="127.0.0.2", welcome=False)
    r.wait(lambda: not r.peers["stranger"].open, "the stranger's connection to close")
    r.connect("a")
    r.step("a", "pv")
    r.step("monitor", "relay done")


@suite.case
def close_in_connection_new():
    """The evapi documentation's ACL: KSR.evapi.close() in evapi:connection-new (a client
    from 127.0.0.2). Kamailio: close returns 0, the slot is free again, and no
    evapi:connection-closed event runs for it."""
    differential(scenario_refuse_in_connection_new)


def scenario_max_clients(r):
    r.connect("monitor")
    r.step("monitor", "join monitor")
    for i in range(1, 8):
        r.connect("p%d" % i)
    r.step("p1", "relay all eight")
    r.connect("ninth", welcome=False)
    r.wait(lambda: not r.peers["ninth"].open, "the 9th client's connection to close")
    r.step("p1", "relay still eight")
    r.hang_up("p3")
    r.connect("late")
    r.step("late", "pv")


def check_max_clients(run, target, ref_run):
    p = run.peers["ninth"]
    if ref_run is None:
        note("kamailio: the 9th client got %r, closed: %s" % (p.frames, p.closed))
        return
    check(p.closed == "eof", "%s: the 9th client was not closed cleanly: %s" % (
        target.name, p.closed))
    check_eq(len(p.frames), 1, "%s: frames to the 9th client (%r)" % (target.name, p.frames))
    err = parse_error_frame(p.frames[0].encode("utf-8", "surrogateescape"))
    check_eq(err.get("error"), "max_clients", "%s: error of the 9th client" % target.name)
    check("8" in err["reason"], "%s: reason names the limit: %r" % (target.name, err["reason"]))


@suite.case
def max_clients_8():
    """Eight clients work, the ninth is refused (no connection-new), a freed slot is reused.
    Deliberate difference: evhub tells the ninth why (Kamailio just closes)."""
    differential(scenario_max_clients, exclude=("ninth",), extra_checks=check_max_clients)


# ---------------------------------------------------------------------------------------------
# Documented differences: evhub's fixed framing, asserted on evhub; Kamailio noted only.


def scenario_framing(r):
    r.connect("a")
    # "0:," then a normal frame, in separate writes.
    r.peers["a"].send_raw(b"0:,")
    r.flush()
    time.sleep(0.1)  # so that Kamailio reads it alone (it discards whole reads)
    r.step("a", "echo after empty")
    # A frame split inside its length prefix.
    frame = ns("echo split in the length")
    r.peers["a"].send_raw(frame[:1])
    r.flush()
    time.sleep(0.1)
    r.peers["a"].send_raw(frame[1:])
    r.flush()
    time.sleep(0.1)
    r.step("a", "echo after split")
    # A 40000-byte inbound frame (Kamailio's receive buffer is 32 KB).
    r.peers["a"].send("echo " + "x" * 40000)
    r.sync("a")


@suite.case
def framing_fixed_in_evhub():
    """Documented differences: "0:,", a split inside the length, a frame over 32 KB."""
    require_kamailio()
    kam = Kamailio()
    try:
        kr, kabort = play(kam, scenario_framing, timeout=2.0)
    finally:
        kam.cleanup()
    note("kamailio: %s; client a got %r" % (
        kabort or "completed", [_short(f, 40) for f in kr.transcript()["a"]]))
    for workers in (1, 0):
        ev = Evhub(workers)
        er, eabort = play(ev, scenario_framing)
        check(eabort is None, "%s: %s" % (ev.name, eabort))
        got = er.transcript()["a"]
        want = ["welcome 127.0.0.1:<a> conidx=0 set_tag=1 msg=nil types=number,number",
                "unknown ", "after empty", "sync-1",
                "split in the length", "after split", "sync-2",
                "x" * 40000, "sync-3"]
        check_eq(got, want, "%s: frames to a" % ev.name)
        ev.stop()


# ---------------------------------------------------------------------------------------------
# The SIP async round trip of examples/async-routing, in both

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "async-routing")


class KamailioSip(Kamailio):
    """Kamailio with tm/tmx/sl and the async-routing example's script."""

    name = "kamailio(async-routing)"

    def command(self):
        return [KAMAILIO, "-f", os.path.join(EXAMPLE, "kamailio.cfg"), "-DD", "-E", "-Y",
                self.dir, "-m", "64", "-M", "8",
                "-A", 'EVAPI_BIND="127.0.0.1:%d"' % self.port,
                "-A", "SIP_LISTEN=udp:127.0.0.1:%d" % self.sip_port,
                "-A", 'LUA_SCRIPT="%s"' % os.path.join(EXAMPLE, "kemi.lua")]


def sip_exchange(port, callee, n, final_timeout=STEP_TIMEOUT, listen_after=1.2,
                 callid_part=""):
    """INVITE n to sip:CALLEE@127.0.0.1:PORT from a fresh UDP socket, ACK its final reply,
    then listen LISTEN_AFTER s (timer G would resend the reply at 0.5 s). Returns (final status
    line, Contact header or None, provisional status codes, replies after the ACK)."""
    p = SipPeer(port)
    try:
        inv, branch, callid = p.request("INVITE", ruser=callee,
                                        callid="cmp-%d%s@evhub" % (n, callid_part))
        p.send(inv)
        prov, final = p.final(final_timeout)
        if final is None:
            raise TestFailure("no final reply to INVITE %d (to %s) within %.0f s; got %r"
                              % (n, callee, final_timeout, prov))
        p.send(p.ack(final, branch, callid, ruser=callee))
        after = [text.split("\r\n")[0] for _, text in p.recv_all(listen_after)]
    finally:
        p.close()
    lines = final.split("\r\n")
    contact = ([x for x in lines if x.lower().startswith("contact:")] or [None])[0]
    return lines[0], contact, prov, after


def routing_app(addr):
    p = subprocess.Popen([sys.executable, os.path.join(EXAMPLE, "app.py"), "%s:%d" % addr],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    if line[:2] != ["app:", "connected"]:
        p.kill()
        raise TestFailure("the routing application did not connect to %s:%d" % addr)
    return p


def first_302(sip_port):
    """Probe INVITEs until one gets its 302: the application is connected and tagged.
    (Kamailio runs connection-new in its dispatcher; until then an INVITE waits.)"""
    p = SipPeer(sip_port)
    try:
        if not p.first_302(TIMEOUT):
            raise TestFailure("no 302 for a probe INVITE within %.0f s" % TIMEOUT)
    finally:
        p.close()


def async_routing_transcript(target, sip_port):
    app = routing_app(target.addr)
    try:
        first_302(sip_port)
        # The last Call-ID carries a quote and a backslash (a SIP word may): the script's
        # JSON must escape them, or the application cannot read the request.
        return [sip_exchange(sip_port, callee, i, callid_part=part)
                for i, (callee, part) in enumerate([("100", ""), ("4242", ""), ("alice", ""),
                                                    ("100", '"q\\x')])]
    finally:
        app.kill()
        app.wait()


@suite.case
def async_routing_example():
    """The async-routing example's KEMI script, unchanged, in Kamailio and in evhub."""
    require_kamailio()
    for mod in ("tm.so", "tmx.so", "sl.so", "pv.so"):
        check(any(os.path.exists(os.path.join(d, mod)) for d in KAM_MODDIRS),
              "Kamailio module %s is installed" % mod)
    kam = KamailioSip().start()
    try:
        ref = async_routing_transcript(kam, kam.sip_port)
    finally:
        kam.cleanup()
    finals = [(r[0], r[1]) for r in ref]
    check_eq(finals, [
        ("SIP/2.0 302 Moved Temporarily", "Contact: <sip:100@10.0.0.101:5060>"),
        ("SIP/2.0 302 Moved Temporarily", "Contact: <sip:4242@10.0.0.243:5060>"),
        ("SIP/2.0 404 Unknown Number", None),
        ("SIP/2.0 302 Moved Temporarily", "Contact: <sip:100@10.0.0.101:5060>"),
    ], "Kamailio's final replies (the reference)")
    check_eq([r[3] for r in ref], [[]] * 4, "Kamailio absorbed each ACK (no reply resent)")
    sys.path.insert(0, HERE)
    from test_sip import start as start_sip  # noqa: E402
    for workers in (0, 2):
        h = start_sip(script=open(os.path.join(EXAMPLE, "kemi.lua")).read(), workers=workers)
        try:
            got = async_routing_transcript(h, h.sip_port)
            check_eq([(r[0], r[1]) for r in got], finals,
                     "evhub (workers=%d): the same final replies as Kamailio" % workers)
            check_eq([r[3] for r in got], [[]] * 4,
                     "evhub (workers=%d): each ACK absorbed" % workers)
            check(all(r[2] == [100] for r in got), "evhub (workers=%d): a 100 Trying "
                  "before each final reply (Kamailio: %r)" % (workers, [r[2] for r in ref]))
            st = h.ctl_json("sip", "status")
            check_eq(st["suspended"], 0, "evhub (workers=%d): nothing suspended" % workers)
            check(st["acks_absorbed"] >= 4, "evhub (workers=%d): the ACKs absorbed: %d"
                  % (workers, st["acks_absorbed"]))
        finally:
            h.stop()



if __name__ == "__main__":
    # Kamailio instances are stopped after every case, passing or not.
    for fn in list(suite.cases):
        def wrapped(fn=fn):
            try:
                fn()
            finally:
                _stop_kamailios()
        wrapped.__name__ = fn.__name__
        suite.cases[suite.cases.index(fn)] = wrapped
    suite.run()
