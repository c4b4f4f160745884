#!/usr/bin/python3
"""The control socket and evhubctl: status, clients, close, tag, relay/multicast/unicast,
stats (JSON, Prometheus and evapi.stats() in scripts), reload, log-level; the JSON-RPC 2.0
protocol spoken raw over the unix socket; socket path, permissions, stale and busy sockets;
the optional loopback TCP listener; evhubctl's exit codes and help."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (TIMEOUT, Hub, Raw, Suite, check, check_eq, ns, scaled,  # noqa: E402
                           pump, request, run_ctl, run_once, take_until, wait_eof, wait_for,
                           wait_frames)

suite = Suite("control")

# "cmd:args" frames; the script answers with conn.id and conn.tag as the script sees them.
SCRIPT = r'''
local VERSION = "@VERSION@"
evapi.on("close", function(conn)
    if conn.tag ~= "watch" then evapi.multicast("closed:" .. conn.id, "watch") end
end)
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    if cmd == "id" then
        conn:send(tostring(conn.id))
    elseif cmd == "whoami" then
        conn:send(VERSION .. " " .. conn.id .. " " .. tostring(conn.tag))
    elseif cmd == "tag" then
        conn:set_tag(rest)
        conn:send("tagged " .. tostring(conn.tag))
    elseif cmd == "gated" then
        -- "gated:FILE:TAG": wait until FILE exists (the test makes it), then tag
        local file, tag = rest:match("^(.*):([^:]+)$")
        local t0 = os.clock()
        while os.clock() - t0 < 30 do
            local f = io.open(file)
            if f then f:close() break end
        end
        conn:set_tag(tag)
        conn:send("tagged " .. tostring(conn.tag))
    elseif cmd == "tagwait" then
        -- "tagwait:ACK:GATE:TAG": tag, make ACK, then wait for GATE (the test makes it)
        local ack, gate, tag = rest:match("^(.*):(.*):([^:]+)$")
        conn:set_tag(tag)
        io.open(ack, "w"):close()
        local t0 = os.clock()
        while os.clock() - t0 < 30 do
            local f = io.open(gate)
            if f then f:close() break end
        end
        conn:send("tagged " .. tostring(conn.tag))
    elseif cmd == "echo" then
        conn:send(rest)
    elseif cmd == "stats" then
        local s = evapi.stats()
        local w = s.workers[1]
        conn:send(json.encode({frames_in = s.frames_in, bytes_in = s.bytes_in,
            frames_out = s.frames_out, bytes_out = s.bytes_out, clients = s.clients,
            connections_accepted = s.connections_accepted, nworkers = #s.workers,
            worker0 = w and w.worker or json.null, worker0_events = w and w.events or json.null}))
    elseif cmd == "busy" then
        -- wall time (os.clock is CPU time: on a loaded machine 3 s of it can take longer
        -- than the 5 s a stopping worker gets); lasts rest to rest + 1 seconds
        local t0 = os.time()
        while os.time() - t0 < tonumber(rest) do end
    elseif cmd == "boom" then
        error("boom requested")
    elseif cmd == "spin" then
        while true do end
    end
    -- "quiet:..." and anything else: no answer
end)
'''

KEMI_SCRIPT = r'''
function ksr_evapi_event(evname)
	if evname == "evapi:message-received" then
		KSR.evapi.relay(KSR.pv.get("$evapi(msg)"));
	end
end
'''

CORE = {  # command -> (required params, optional params), as hub/control_spec.c has them
    "commands": ([], []), "status": ([], []), "clients": ([], ["tag"]),
    "close": (["id"], ["reason"]), "tag": (["id", "tag"], []), "relay": (["data"], []),
    "multicast": (["tag", "data"], []), "unicast": (["tag", "data"], []),
    "stats": ([], ["prometheus"]), "reload": ([], []), "log-level": ([], ["level"]),
}

NO_HUB = "/nonexistent-evhub-dir/ctl.sock"

# ---------------------------------------------------------------------------------------------
# Helpers


def script(version="v1"):
    return SCRIPT.replace("@VERSION@", version)


def up(h):
    """Start h and wait for its control socket's log line too (belt and braces: the socket
    is made before "listening on" is logged)."""
    h.start()
    h.wait_log("control socket ")
    return h


def start(workers=0, version="v1", evapi=None, **kw):
    ev = {"workers": workers}
    ev.update(evapi or {})
    return up(Hub(script(version), evapi=ev, **kw))


def counted(c, payload):
    """Count one frame about to be sent (frames and wire bytes) on the client."""
    c.tx_frames = getattr(c, "tx_frames", 0) + 1
    c.tx_bytes = getattr(c, "tx_bytes", 0) + len(ns(payload))
    return payload


def tx(c, payload):
    """Send one frame and count it."""
    c.send(counted(c, payload))


def ask(c, payload, others=()):
    """tx() one frame and return the one frame that answers it (harness request())."""
    return request(c, counted(c, payload), others)


def cid(c, others=()):
    return int(ask(c, "id", others))


def ctl(h, *args):
    """evhubctl with a timeout that fits instrumented hubs: (rc, stdout, stderr)."""
    return h.ctl("-t", TIMEOUT, *args)


def cj(h, *args):
    """evhubctl --json: the parsed result (requires exit 0)."""
    return h.ctl_json("-t", TIMEOUT, *args)


def ctl_fails(h, args, rc, code=None, what=""):
    """Require evhubctl ARGS to exit rc, with "(code N)" on stderr when code is given."""
    got, out, err = ctl(h, *args)
    check_eq(got, rc, "rc of evhubctl %s (stderr %r)" % (" ".join(map(str, args)), err))
    if code is not None:
        check("(code %d)" % code in err, "%s: stderr %r does not carry code %d" % (
            what or args[0], err, code))
    check_eq(out, "", "stdout of a failing evhubctl %s" % args[0])
    return err


def wait_file(path, what):
    """Wait until path exists (a script makes it to say where it has got to)."""
    wait_for(lambda: os.path.exists(path), bool, what)


def wait_queued(h, worker, what):
    """Wait until the worker holds exactly one event (the one it is busy with)."""
    wait_for(lambda: cj(h, "status")["workers"][worker]["queued_events"], lambda q: q == 1, what)


def wait_stats(h, **want):
    """Poll stats until every key has the wanted value (counters: fail at once past it)."""
    def ok(s):
        for k, v in want.items():
            check(s[k] <= v, "stats %s is %s, more than the %s expected" % (k, s[k], v))
        return all(s[k] == v for k, v in want.items())
    return wait_for(lambda: cj(h, "stats"), ok, "stats %r" % want)


def fence(h, clients, label):
    """Relay a marker through evhubctl and wait for it on every client: frames the control
    socket sent before are then in place. Returns each client's frames before the marker."""
    marker = ("fence-" + label).encode()
    check_eq(cj(h, "relay", marker.decode())["recipients"], len(clients), "fence recipients")
    return take_until(clients, marker, "fence " + label)


def by_id(h, *args):
    return {e["id"]: e for e in cj(h, "clients", *args)["clients"]}


def req(method, id=1, **params):
    r = {"jsonrpc": "2.0", "id": id, "method": method}
    if params:
        r["params"] = params
    return r


def err_code(answer, want, what, id=1):
    check(isinstance(answer, dict) and "error" in answer and "result" not in answer,
          "%s: not an error answer: %r" % (what, answer))
    check_eq(answer.get("jsonrpc"), "2.0", what + ": jsonrpc")
    check_eq(answer["error"].get("code"), want, what + ": error code")
    check(isinstance(answer["error"].get("message"), str) and answer["error"]["message"],
          "%s: error without a message: %r" % (what, answer))
    check_eq(answer.get("id", "absent"), id, what + ": id")


# ---------------------------------------------------------------------------------------------
# 1. status


def status_case(workers):
    h = start(workers, evapi={"max_clients": 77})
    cs = [h.client(name="c%d" % i) for i in range(3)]
    ids = [cid(c, cs) for c in cs]
    st = cj(h, "status")
    check(re.fullmatch(r"\d+\.\d+\.\d+", st["version"]), "version %r" % st["version"])
    rc, out, _ = run_ctl(["--version"])
    check_eq((rc, out.strip()), (0, "evhubctl " + st["version"]), "evhubctl --version")
    check_eq(st["pid"], h.pid, "pid")
    check_eq(st["listen"], "%s:%d" % h.addr, "listen")
    check_eq(st["control"], h.ctl_path, "control")
    check_eq(st["clients"], 3, "clients")
    check_eq(st["max_clients"], 77, "max_clients")
    check_eq(st["tags"], 0, "tags")
    check_eq(st["log_level"], "info", "log_level")
    check(isinstance(st["uptime"], (int, float)) and 0 <= st["uptime"] < 3600,
          "uptime %r" % st["uptime"])
    check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", st["started"]), "started %r" % st)
    sc = st["script"]
    check_eq((sc["path"], sc["dialect"], sc["reloads"], sc["reload_failures"], sc["last_error"]),
             (h.script_path, "native", 0, 0, None), "script")
    check_eq([w["worker"] for w in st["workers"]], list(range(workers)), "workers")
    for w in st["workers"]:
        check_eq((w["queued_events"], w["queued_bytes"], w["paused_clients"]), (0, 0, 0),
                 "worker %d queues at rest" % w["worker"])
    cj(h, "tag", ids[0], "t1")
    cj(h, "tag", ids[1], "t1")
    check_eq(cj(h, "status")["tags"], 1, "two connections, one tag")
    cs[2].close()
    wait_for(lambda: cj(h, "status")["clients"], lambda n: n == 2, "clients 2 after a close")
    prometheus_check(h)  # with two workers, each per-worker metric has two samples


suite.case_with("status_workers0", status_case, 0)
suite.case_with("status_workers2", status_case, 2)


@suite.case
def status_kemi_dialect():
    h = up(Hub(KEMI_SCRIPT, evapi={"event_callback": "ksr_evapi_event"}))
    sc = cj(h, "status")["script"]
    check_eq((sc["path"], sc["dialect"], sc["event_callback"]),
             (h.script_path, "kemi", "ksr_evapi_event"), "KEMI script")
    rc, out, _ = ctl(h, "status")
    check_eq(rc, 0, "plain status rc")
    check(re.search(r"(?m)^\s*dialect\s+kemi$", out), "plain status shows the dialect:\n" + out)


# ---------------------------------------------------------------------------------------------
# 2. clients


def clients_case(workers):
    h = start(workers)
    a, b, c = h.client(name="a"), h.client(name="b"), h.client(name="c")
    ida, idb, idc = cid(a), cid(b), cid(c)
    check(ida < idb < idc, "ids increase: %s" % [ida, idb, idc])
    for i in range(5):
        check_eq(ask(a, "echo:" + "p" * (10 * i + 1), [b, c]), b"p" * (10 * i + 1), "echo")
    tx(b, "quiet:" + "q" * 300)
    check_eq(ask(b, "echo:x", [a, c]), b"x", "echo b")
    check_eq(ask(c, "tag:grp", [a, b]), b"tagged grp", "tag c by script")
    got = cj(h, "clients")["clients"]
    check_eq([e["id"] for e in got], [ida, idb, idc], "listed ids, sorted")
    for cl, e, n_out in ((a, got[0], 6), (b, got[1], 2), (c, got[2], 2)):
        check_eq((e["address"], e["port"]), (cl.local[0], cl.local[1]), "%s address" % cl.name)
        check_eq((e["frames_in"], e["bytes_in"]), (cl.tx_frames, cl.tx_bytes),
                 "%s frames_in/bytes_in (wire bytes)" % cl.name)
        check_eq((e["frames_out"], e["bytes_out"]), (n_out, cl.bytes_in),
                 "%s frames_out/bytes_out" % cl.name)
        check_eq((e["queued_bytes"], e["state"]), (0, "open"), "%s at rest" % cl.name)
    check_eq([e["tag"] for e in got], [None, None, "grp"], "tags")
    check_eq(sorted(e["conidx"] for e in got), [0, 1, 2], "conidx")
    check_eq(list(by_id(h, "--tag", "grp")), [idc], "--tag grp")
    check_eq(cj(h, "clients", "--tag", "gr")["clients"], [], "--tag is exact")
    rc, out, _ = ctl(h, "clients")
    check_eq(rc, 0, "plain clients rc")
    for cl in (a, b, c):
        check(re.search(r"\b%d\b" % cl.port, out), "plain clients lists port %d:\n%s" % (
            cl.port, out))
    rc, out, _ = ctl(h, "clients", "--tag", "nobody")
    check_eq((rc, out.strip()), (0, "(none)"), "plain clients with no match")


suite.case_with("clients_workers0", clients_case, 0)
suite.case_with("clients_workers1", clients_case, 1)


# ---------------------------------------------------------------------------------------------
# 3. close


def close_case(workers):
    h = start(workers)
    w, a, b = h.client(name="watcher"), h.client(name="a"), h.client(name="b")
    check_eq(ask(w, "tag:watch"), b"tagged watch", "watcher")
    idw, ida, idb = cid(w), cid(a, [w]), cid(b, [w])
    before = cj(h, "stats")["connections_closed"]
    check_eq(cj(h, "close", ida, "--reason", "maintenance window"), {"id": ida, "closed": True},
             "close result")
    wait_eof([a], others=[w, b])
    check_eq(len(a.frames), 1, "frames after close: %r" % a.frames)
    check_eq(json.loads(a.frames[0]), {"error": "closed", "reason": "maintenance window"},
             "error frame")
    wait_frames([w], 1, others=[b])
    check_eq(w.take(), [("closed:%d" % ida).encode()], "the close handler ran")
    wait_stats(h, connections_closed=before + 1)
    check_eq(list(by_id(h)), [idw, idb], "listed after the close")
    err = ctl_fails(h, ["close", ida], 1, -32001, "close of a closed id")
    check(str(ida) in err, "the message names id %d: %r" % (ida, err))
    ctl_fails(h, ["close", 999999], 1, -32001, "close of an unknown id")
    check_eq(ask(b, "echo:alive", [w]), b"alive", "others unaffected")
    check_eq(cj(h, "stats")["connections_closed"], before + 1, "one close counted")
    check_eq(cj(h, "close", idb), {"id": idb, "closed": True}, "close without a reason")
    wait_eof([b], others=[w])
    reason = json.loads(b.frames[-1])
    check(reason.get("error") == "closed" and reason.get("reason"), "default reason %r" % reason)


@suite.case
def clients_many():
    # More connections than one listing slice (the hub lists 128 per loop iteration), some of
    # them closing while listings are under way, and a tag that JSON must escape.
    h = start(0)
    cs = [h.client(name="m%d" % i) for i in range(300)]
    for cl in cs[:3]:
        cid(cl, cs)
    pump(cs, lambda: cj(h, "status")["clients"] == 300, what="300 connected")
    got = cj(h, "clients")["clients"]
    check_eq([e["id"] for e in got], list(range(1, 301)), "every id once, sorted")
    check_eq(sorted(e["port"] for e in got), sorted(cl.local[1] for cl in cs), "every port")
    check_eq(cj(h, "tag", 7, 'a"b\\c'), {"id": 7, "tag": 'a"b\\c'}, "an odd tag")
    r = Raw(h.ctl_path)
    r.send("".join(json.dumps(req("clients", id=i)) + "\n" for i in range(1, 4)))
    for cl in cs[100:150]:
        cl.close()
    answers = [r.answer() for _ in range(3)]
    for a in answers:
        ids = [e["id"] for e in a["result"]["clients"]]
        check(set(range(101, 151)).issuperset(set(range(1, 301)) - set(ids)),
              "only closed connections may be missing: %s" % sorted(set(range(1, 301)) - set(ids)))
        check_eq(ids, sorted(set(ids)), "sorted, no duplicates")
    tagged = cj(h, "clients", "--tag", 'a"b\\c')["clients"]
    check_eq([(e["id"], e["tag"]) for e in tagged], [(7, 'a"b\\c')], "the odd tag listed")
    pump(cs[:100], lambda: cj(h, "status")["clients"] == 250, what="250 left")
    check_eq([e["id"] for e in cj(h, "clients")["clients"]],
             list(range(1, 101)) + list(range(151, 301)), "after the closes")


suite.case_with("close_workers0", close_case, 0)
suite.case_with("close_workers1", close_case, 1)


# ---------------------------------------------------------------------------------------------
# 4. tag


def tag_case(workers):
    h = start(workers)
    a, b = h.client(name="a"), h.client(name="b")
    ida, idb = cid(a, [b]), cid(b, [a])
    check_eq(cj(h, "tag", ida, "pbx1"), {"id": ida, "tag": "pbx1"}, "tag result")
    check_eq(ask(a, "whoami", [b]), ("v1 %d pbx1" % ida).encode(), "conn.tag in the script")
    check_eq(ask(b, "whoami", [a]), ("v1 %d nil" % idb).encode(), "b untagged")
    check_eq(cj(h, "multicast", "pbx1", "to pbx1")["recipients"], 1, "multicast recipients")
    check_eq(fence(h, [a, b], "1"), [[b"to pbx1"], []], "multicast reaches exactly a")
    check_eq(by_id(h)[ida]["tag"], "pbx1", "clients shows the tag")
    check_eq(cj(h, "tag", ida, "pbx2")["tag"], "pbx2", "retag")
    ctl_fails(h, ["multicast", "pbx1", "x"], 1, -32002, "the old tag no longer matches")
    check_eq(ask(a, "whoami", [b]), ("v1 %d pbx2" % ida).encode(), "retagged in the script")
    check_eq(cj(h, "tag", ida, ""), {"id": ida, "tag": None}, "tag \"\" removes it")
    check_eq(ask(a, "whoami", [b]), ("v1 %d nil" % ida).encode(), "untagged in the script")
    ctl_fails(h, ["multicast", "pbx2", "x"], 1, -32002, "multicast to a removed tag")
    check_eq(cj(h, "status")["tags"], 0, "no tag left")
    # Invalid tags: the hub answers -32602, which evhubctl reports with exit status 1.
    for bad in ("has space", "x" * 65, "tab\there"):
        ctl_fails(h, ["tag", ida, bad], 1, -32602, "tag %r" % bad)
    ctl_fails(h, ["tag", 999999, "ok"], 1, -32001, "tag of an unknown id")
    check_eq(by_id(h)[ida]["tag"], None, "a refused tag changes nothing")
    # A tag set by the script is seen by the control socket, and replaced by it.
    check_eq(ask(b, "tag:mine", [a]), b"tagged mine", "script tag")
    check_eq(list(by_id(h, "--tag", "mine")), [idb], "script tag listed")
    cj(h, "tag", idb, "theirs")
    check_eq(ask(b, "whoami", [a]), ("v1 %d theirs" % idb).encode(), "control overrides")


suite.case_with("tag_workers0", tag_case, 0)
suite.case_with("tag_workers1", tag_case, 1)
suite.case_with("tag_workers2", tag_case, 2)


@suite.case
def tag_race_script_and_control():
    # The script tags its own connection while the control socket tags it too: the control
    # request is handled while the script's message waits in the worker's queue (or runs),
    # and the script's set_tag comes last. Afterwards the script's conn.tag, the hub's
    # listing and the routing all agree on the script's tag. Then the other order.
    h = start(2)
    a, w = h.client(name="a"), h.client(name="w")
    ida = cid(a, [w])
    cid(w, [a])
    r = Raw(h.ctl_path)
    for i in range(4):
        mine, theirs = "s%d" % i, "c%d" % i
        gate = os.path.join(h.dir, "gate%d" % i)
        n = len(a.frames)
        a.send_now(ns("gated:%s:%s" % (gate, mine)))
        worker = ida % 2
        wait_queued(h, worker, "the message in the worker's hands")
        got = r.call(req("tag", id=i) | {"params": [ida, theirs]})
        check_eq(got.get("result"), {"id": ida, "tag": theirs}, "control tag %d" % i)
        open(gate, "w").close()
        wait_frames([a], n + 1, others=[w])
        check_eq(a.frames.pop(n), ("tagged " + mine).encode(), "the script's own set_tag")
        view = ask(a, "whoami", [w]).decode().split(" ")[2]
        listed = by_id(h)[ida]["tag"]
        check_eq((view, listed), (mine, mine), "round %d: conn.tag and the hub's tag" % i)
        check_eq(cj(h, "multicast", mine, "m%d" % i)["recipients"], 1, "routing by it")
        wait_frames([a], n + 1, others=[w])
        check_eq(a.frames.pop(n), ("m%d" % i).encode(), "round %d: the multicast" % i)
    # The other way round: the script's set_tag comes first but reaches the loop after the
    # control socket's tag (its command waits for the callback to end). The control socket's
    # tag was set last, so it wins everywhere.
    for i in range(4):
        mine, theirs = "t%d" % i, "d%d" % i
        ack, gate = (os.path.join(h.dir, "%s%d" % (x, i)) for x in ("ack", "gate2-"))
        n = len(a.frames)
        a.send_now(ns("tagwait:%s:%s:%s" % (ack, gate, mine)))
        wait_file(ack, "the script's set_tag")
        check_eq(r.call(req("tag", id=i) | {"params": [ida, theirs]}).get("result"),
                 {"id": ida, "tag": theirs}, "control tag after the script's")
        open(gate, "w").close()
        wait_frames([a], n + 1, others=[w])
        a.frames.pop(n)
        view = ask(a, "whoami", [w]).decode().split(" ")[2]
        check_eq((view, by_id(h)[ida]["tag"]), (theirs, theirs),
                 "round %d: conn.tag and the hub's tag" % i)
    # The control socket last: its tag wins everywhere.
    check_eq(ask(a, "tag:own", [w]), b"tagged own", "script tag")
    cj(h, "tag", ida, "ctl")
    check_eq(ask(a, "whoami", [w]).decode().split(" ")[2], "ctl", "control last: conn.tag")
    check_eq(by_id(h)[ida]["tag"], "ctl", "control last: the hub's tag")


# ---------------------------------------------------------------------------------------------
# 5. relay, multicast, unicast


@suite.case
def relay_multicast_unicast():
    h = start(0)
    ctl_fails(h, ["relay", "nobody"], 1, -32002, "relay with no connection")
    cs = [h.client(name="c%d" % i) for i in range(4)]
    ids = [cid(c, cs) for c in cs]
    check_eq(cj(h, "relay", "hello all"), {"recipients": 4}, "relay result")
    check_eq(fence(h, cs, "r"), [[b"hello all"]] * 4, "relay reaches every client once")
    binary = "\u00e9 : , 12:x, \"q\""
    check_eq(cj(h, "relay", binary)["recipients"], 4, "relay of a tricky payload")
    check_eq(fence(h, cs, "b"), [[binary.encode()]] * 4, "payload byte-exact")
    cj(h, "tag", ids[1], "u")
    cj(h, "tag", ids[2], "u")
    check_eq(cj(h, "multicast", "u", "mc"), {"recipients": 2}, "multicast result")
    check_eq(cj(h, "unicast", "u", "uc"), {"recipients": 1}, "unicast result")
    got = fence(h, cs, "u")
    check_eq((got[0], got[3]), ([], []), "untagged clients get nothing")
    check_eq(sorted(got[1] + got[2]), sorted([b"mc", b"mc", b"uc"]), "tagged clients")
    check(got[1].count(b"mc") == 1 and got[2].count(b"mc") == 1, "multicast once each")
    ctl_fails(h, ["multicast", "none", "x"], 1, -32002, "multicast to nobody")
    ctl_fails(h, ["unicast", "none", "x"], 1, -32002, "unicast to nobody")
    ctl_fails(h, ["multicast", "bad tag", "x"], 1, -32602, "multicast to an invalid tag")
    check_eq(fence(h, cs, "z"), [[]] * 4, "failed sends delivered nothing")


# ---------------------------------------------------------------------------------------------
# 6. stats


def stats_case(workers):
    h = start(workers, lua={"max_instructions": 100000})
    s0 = cj(h, "stats")
    for k in ("connections_accepted", "connections_closed", "frames_in", "bytes_in",
              "frames_out", "bytes_out", "decode_errors", "lua_errors", "lua_budget_kills",
              "reloads", "reload_failures", "clients", "tags"):
        check_eq(s0[k], 0, "fresh hub: " + k)
    check(s0["control_requests"] >= 1, "control_requests counts this request: %r" % s0)
    a, b = h.client(name="a"), h.client(name="b")
    idb = (cid(a, [b]), cid(b, [a]))[1]
    for i in range(7):
        tx(a, "quiet:" + "z" * (i * 37))
    check_eq(ask(a, "echo:" + "e" * 1000, [b]), b"e" * 1000, "echo")
    check_eq(ask(b, "whoami", [a]), ("v1 %d nil" % idb).encode(), "whoami")
    rx = 4  # id, id, echo, whoami
    s = wait_stats(h, frames_in=a.tx_frames + b.tx_frames)
    check_eq((s["connections_accepted"], s["connections_closed"], s["clients"]), (2, 0, 2),
             "connections")
    check_eq((s["frames_in"], s["bytes_in"]), (a.tx_frames + b.tx_frames, a.tx_bytes + b.tx_bytes),
             "frames_in/bytes_in")
    check_eq((s["frames_out"], s["bytes_out"]), (rx, a.bytes_in + b.bytes_in),
             "frames_out/bytes_out")
    # Lua errors and the instruction budget; the connection keeps working after each.
    tx(a, "boom")
    check_eq(ask(a, "echo:after boom", [b]), b"after boom", "served after an error")
    wait_stats(h, lua_errors=1)
    tx(a, "spin")
    check_eq(ask(a, "echo:after spin", [b]), b"after spin", "served after a runaway")
    s = wait_stats(h, lua_errors=2, lua_budget_kills=1)
    check_eq(s["lua_memory_errors"], 0, "lua_memory_errors")
    if workers:
        w = s["workers"][0]
        check_eq((w["worker"], w["lua_errors"], w["lua_budget_kills"]), (0, 2, 1),
                 "worker 0's Lua counters")
        check_eq((w["queued_events"], w["queued_bytes"]), (0, 0), "worker queue at rest")
        check(w["events"] >= a.tx_frames + b.tx_frames, "worker events %r" % w)
    else:
        check_eq(s["workers"], [], "no worker entries with workers = 0")
    # A malformed frame: the connection is closed and counted.
    bad = h.client(name="bad")
    cid(bad, [a, b])
    bad.send_raw(b"xyz")
    wait_eof([bad], others=[a, b])
    s = wait_stats(h, decode_errors=1, connections_closed=1)
    check_eq((s["connections_accepted"], s["clients"]), (3, 2), "after the decode error")
    check_eq(s["frames_in"], a.tx_frames + b.tx_frames + bad.tx_frames,
             "a malformed frame is not a frame")
    check_eq(s["slow_consumer_closes"], 0, "slow_consumer_closes")
    check_eq(cj(h, "reload")["reloads"], 1, "reload result")
    s = cj(h, "stats")
    check_eq((s["reloads"], s["reload_failures"]), (1, 0), "reload counted")
    prometheus_check(h)


def prometheus_check(h):
    js = cj(h, "stats")
    rc, text, err = ctl(h, "stats", "--prometheus")
    check_eq(rc, 0, "stats --prometheus rc (%s)" % err)
    check_eq(cj(h, "stats", "--prometheus").count("\n"), text.count("\n"), "--json gives the text")
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([a-z_]+)="([^"]*)"\})? (\S+)')
    typed, helped, values = {}, set(), {}
    done, current = set(), None  # a metric's lines come as one group
    for line in text.rstrip("\n").split("\n"):
        m = re.fullmatch(r"# (HELP|TYPE) (\S+) (.+)", line)
        name = m.group(2) if m else line.split("{")[0].split(" ")[0]
        if name != current:
            check(name not in done, "metric %s is not one group: %r" % (name, line))
            if current:
                done.add(current)
            current = name
        if m and m.group(1) == "HELP":
            helped.add(m.group(2))
            continue
        if m:
            check(m.group(3) in ("counter", "gauge"), "metric type: %r" % line)
            typed[m.group(2)] = m.group(3)
            continue
        m = sample.fullmatch(line)
        check(m, "not a Prometheus sample line: %r" % line)
        name = m.group(1)
        check(name in typed and name in helped, "sample before its HELP/TYPE: %r" % line)
        check_eq(name.endswith("_total"), typed[name] == "counter", "_total iff counter: " + name)
        check(name.startswith("evhub_"), "prefix: %r" % name)
        values[(name, m.group(3))] = float(m.group(4))
    for k, v in js.items():
        if k == "workers":
            continue
        gauge = k in ("clients", "tags", "uptime_seconds", "outq_bytes", "outq_block_bytes",
                     "read_buffers", "read_buffer_bytes")
        name = "evhub_%s%s" % (k, "" if gauge else "_total")
        check((name, None) in values, "%s missing from the Prometheus text" % name)
        got = values[(name, None)]
        if k == "control_requests":
            check_eq(got, v + 1, name + " (one more request since)")
        elif k == "uptime_seconds":
            check(v <= got <= v + TIMEOUT, "uptime %s then %s" % (v, got))
        else:
            check_eq(got, v, name)
    for w in js["workers"]:
        for k, v in w.items():
            if k == "worker":
                continue
            gauge = k.startswith("queued_")
            name = "evhub_worker_%s%s" % (k, "" if gauge else "_total")
            check_eq(values.get((name, str(w["worker"]))), v, "%s{worker=%d}" % (name, w["worker"]))


suite.case_with("stats_workers0", stats_case, 0)
suite.case_with("stats_workers1", stats_case, 1)


# ---------------------------------------------------------------------------------------------
# 7. evapi.stats() in scripts


def lua_stats_case(workers):
    h = start(workers)
    a, b = h.client(name="a"), h.client(name="b")
    cid(a, [b])
    for i in range(5):
        tx(b, "quiet:" + "n" * (i * 11))
    check_eq(ask(b, "echo:k", [a]), b"k", "echo")
    got = json.loads(ask(a, "stats", [b]))
    frames_in, bytes_in = a.tx_frames + b.tx_frames, a.tx_bytes + b.tx_bytes
    check_eq((got["frames_in"], got["bytes_in"]), (frames_in, bytes_in),
             "evapi.stats() counts every frame, the one being handled too")
    check_eq((got["frames_out"], got["clients"], got["connections_accepted"]), (2, 2, 2),
             "evapi.stats() frames_out (written before), clients, accepted")
    s = wait_stats(h, frames_out=3)
    check_eq((s["frames_in"], s["bytes_in"], s["bytes_out"]),
             (frames_in, bytes_in, a.bytes_in + b.bytes_in), "evhubctl stats agrees")
    check_eq(got["nworkers"], workers, "#evapi.stats().workers")
    if workers:
        check_eq(got["worker0"], 0, "evapi.stats().workers[1].worker")
        check(isinstance(got["worker0_events"], int) and got["worker0_events"] >= frames_in,
              "workers[1].events %r" % got["worker0_events"])
    else:
        check_eq(got["worker0"], None, "no worker entry with workers = 0")


suite.case_with("lua_stats_workers0", lua_stats_case, 0)
suite.case_with("lua_stats_workers1", lua_stats_case, 1)


# ---------------------------------------------------------------------------------------------
# 8. reload


def reload_case(workers):
    h = start(workers)
    a, b = h.client(name="a"), h.client(name="b")
    ida, idb = cid(a, [b]), cid(b, [a])
    cj(h, "tag", ida, "keep")
    check_eq(ask(b, "tag:grp", [a]), b"tagged grp", "script tag")
    h.write_script(script("v2"))
    check_eq(cj(h, "reload"), {"script": h.script_path, "reloads": 1, "workers": workers},
             "reload result")
    check_eq(ask(a, "whoami", [b]), ("v2 %d keep" % ida).encode(), "a: new script, tag kept")
    check_eq(ask(b, "whoami", [a]), ("v2 %d grp" % idb).encode(), "b: new script, tag kept")
    check_eq(cj(h, "multicast", "keep", "still")["recipients"], 1, "tag index kept")
    check_eq(fence(h, [a, b], "k"), [[b"still"], []], "multicast after the reload")
    sc = cj(h, "status")["script"]
    check_eq((sc["reloads"], sc["reload_failures"], sc["last_error"]), (1, 0, None), "status")
    h.write_script('local x = 1\nerror("no way: v3")\n')
    err = ctl_fails(h, ["reload"], 1, -32000, "a broken script")
    check("no way: v3" in err, "the message has the load error: %r" % err)
    check_eq(ask(a, "whoami", [b]), ("v2 %d keep" % ida).encode(), "old script kept")
    st = cj(h, "status")
    check_eq((st["script"]["reloads"], st["script"]["reload_failures"]), (1, 1), "status counts")
    check("no way: v3" in (st["script"]["last_error"] or ""), "last_error %r" % st["script"])
    s = cj(h, "stats")
    check_eq((s["reloads"], s["reload_failures"]), (1, 1), "stats after a failed reload")
    h.write_script("evapi.on('message', function(conn, msg)\n  if then\nend)\n")
    err = ctl_fails(h, ["reload"], 1, -32000, "a syntax error")
    check("script.lua:2" in err, "the message has file:line: %r" % err)
    h.write_script(script("v4"))
    check_eq(cj(h, "reload")["reloads"], 2, "a good reload after failed ones")
    check_eq(ask(b, "whoami", [a]), ("v4 %d grp" % idb).encode(), "b after the second reload")
    sc = cj(h, "status")["script"]
    check_eq((sc["reloads"], sc["reload_failures"], sc["last_error"]), (2, 2, None),
             "a good reload clears last_error")
    check(not (a.eof or b.eof), "a reload dropped a connection")


suite.case_with("reload_workers0", reload_case, 0)
suite.case_with("reload_workers2", reload_case, 2)


# ---------------------------------------------------------------------------------------------
# 9. log-level


@suite.case
def log_level():
    h = start(0)
    check_eq(cj(h, "log-level"), {"level": "info", "previous": "info"}, "show")
    check_eq(h.count_log(re.compile(r"debug: control:")), 0, "no debug lines at info")
    check_eq(cj(h, "log-level", "--level", "debug"), {"level": "debug", "previous": "info"}, "set")
    cj(h, "status")
    h.wait_log(re.compile(r"debug: control: status"))
    check_eq(cj(h, "log-level"), {"level": "debug", "previous": "debug"}, "show after set")
    check_eq(cj(h, "status")["log_level"], "debug", "status log_level")
    ctl_fails(h, ["log-level", "--level", "loud"], 1, -32602, "an unknown level")
    check_eq(cj(h, "log-level", "--level", "warn"), {"level": "warn", "previous": "debug"}, "warn")
    n = h.count_log(re.compile(r"(debug|info): "))
    cj(h, "status")
    c = h.client()
    check_eq(cid(c), 1, "a client")
    check_eq(h.count_log(re.compile(r"(debug|info): ")), n, "nothing under warn is logged")


@suite.case
def log_level_positional():
    # The level is the command's only parameter: `evhubctl log-level debug` should set it.
    h = start(0)
    rc, out, err = ctl(h, "--json", "log-level", "debug")
    check_eq(rc, 0, "evhubctl log-level debug (stderr %r)" % err)
    check_eq(json.loads(out), {"level": "debug", "previous": "info"}, "result")


# ---------------------------------------------------------------------------------------------
# 10. JSON-RPC over the raw socket


@suite.case
def jsonrpc_protocol():
    h = start(0)
    tcp = h.client(name="tcp")
    r = Raw(h.ctl_path)
    r.send("this is not json\n" + json.dumps(req("relay", id=2, data="after")) + "\n")
    err_code(r.answer(), -32700, "garbage", id=None)
    r.expect_closed("after a parse error (nothing after it runs)")
    r = Raw(h.ctl_path)
    check_eq(r.call(req("status", id=2))["result"]["pid"], cj(h, "status")["pid"],
             "a new connection is served")
    err_code(r.call({"jsonrpc": "1.0", "id": 3, "method": "status"}), -32600, "1.0", id=3)
    err_code(r.call({"jsonrpc": "2.0", "id": 4}), -32600, "no method", id=4)
    err_code(r.call({"jsonrpc": "2.0", "id": 5, "method": 5}), -32600, "method 5", id=5)
    err_code(r.call(req("no-such", id=6)), -32601, "unknown method", id=6)
    err_code(r.call(req("close", id=7) | {"params": {"id": "x"}}), -32602,
             "wrong type", id=7)
    err_code(r.call(req("close", id=8) | {"params": {}}), -32602, "missing id", id=8)
    err_code(r.call(req("status", id=9, bogus=1)), -32602, "unknown param", id=9)
    err_code(r.call(req("tag", id=10) | {"params": [1, "a", "b"]}), -32602, "too many", id=10)
    check_eq(r.call(req("log-level", id=11) | {"params": ["info"]})["result"]["level"], "info",
             "params by position")
    check_eq(r.call(req("log-level", id="abc"))["id"], "abc", "a string id echoes back")
    # Notifications get no answer, valid or not: the next line answers the next request.
    for note in ({"jsonrpc": "2.0", "method": "log-level"},
                 {"jsonrpc": "2.0", "method": "no-such"},
                 {"jsonrpc": "2.0", "method": "close", "params": {"id": "x"}}):
        r.send(json.dumps(note) + "\n")
    check_eq(r.call(req("log-level", id=12))["id"], 12, "notifications answered nothing")
    # A batch: one answer per non-notification, in one array.
    r.send(json.dumps([req("log-level", id=20), {"jsonrpc": "2.0", "method": "status"}, 5,
                       req("no-such", id=21), req("clients", id=22)]) + "\n")
    batch = r.answer()
    check(isinstance(batch, list), "a batch is answered by an array: %r" % batch)
    check_eq(sorted((str(x.get("id")), "error" in x) for x in batch),
             [("20", False), ("21", True), ("22", False), ("None", True)], "batch answers")
    r.send("[]\n")
    err_code(r.answer(), -32600, "empty batch", id=None)
    # Split across writes, and two in one write.
    text = json.dumps(req("log-level", id=30))
    for i in range(0, len(text), 7):
        r.send(text[i:i + 7])
        time.sleep(0.01)  # separate reads on the hub's side, not synchronisation
    r.send("\n")
    check_eq(r.answer()["id"], 30, "a request split across writes")
    r.send(json.dumps(req("log-level", id=31)) + "\n" + json.dumps(req("status", id=32)) + "\n")
    check_eq(sorted([r.answer()["id"], r.answer()["id"]]), [31, 32], "two in one write")
    r.send(json.dumps(req("log-level", id=33)) + json.dumps(req("log-level", id=34)))
    check_eq(sorted([r.answer()["id"], r.answer()["id"]]), [33, 34], "no newline between")
    # Too large: a parse error; the hub goes on serving this and other connections.
    big = '{"jsonrpc":"2.0","id":40,"method":"relay","params":{"data":"%s"}}\n' % ("x" * (2 << 20))
    try:
        r.send(big)  # the hub stops reading at 1 MiB and closes: the rest may not go out
    except (BrokenPipeError, ConnectionResetError):
        pass
    a = r.answer()
    err_code(a, -32700, "2 MiB request", id=None)
    check("too large" in a["error"]["message"], "message %r" % a)
    check_eq(fence(h, [tcp], "big"), [[]], "the large relay was not run")
    r2 = Raw(h.ctl_path)
    check_eq(r2.call(req("status", id=41))["result"]["clients"], 1, "another connection")
    r.expect_closed("after the 2 MiB request")
    r.close()
    r2.close()
    check_eq(cid(tcp), 1, "TCP clients are still served")
    check_eq(cj(h, "status")["clients"], 1, "status after the protocol abuse")


@suite.case
def jsonrpc_payloads_and_limits():
    h = start(0)
    c = h.client(name="c")
    cid(c)
    r = Raw(h.ctl_path)
    check_eq(r.call(req("relay", data="a\u0000b\u00ff\n"))["result"], {"recipients": 1}, "relay")
    wait_frames([c], 1)
    check_eq(c.take(), ["a\u0000b\u00ff\n".encode()], "NUL, UTF-8 and newline pass byte-exact")
    err_code(r.call(req("tag", id=2) | {"params": {"id": 1, "tag": "a\u0000b"}}), -32602,
             "a tag with a NUL", id=2)
    err_code(r.call(req("log-level", id=3) | {"id": 1.5}), -32600, "a fractional id", id=None)
    r.send("[" * 100000 + "\n")
    err_code(r.answer(), -32700, "nesting too deep", id=None)
    r.expect_closed("after deep nesting")
    r = Raw(h.ctl_path)
    check_eq(r.call(req("status", id=4))["id"], 4, "served on a new connection")
    # 64 control connections at once: the next is refused with an answer, the hub carries on.
    conns = [Raw(h.ctl_path) for _ in range(63)]  # and r
    check_eq(conns[-1].call(req("status", id=9))["id"], 9, "the 64th connection is served")
    extra = Raw(h.ctl_path)
    err_code(extra.answer(), -32603, "the 65th connection", id=None)
    extra.close()
    for x in conns:
        x.close()
    wait_for(lambda: run_ctl(["-s", h.ctl_path, "status"])[0], lambda rc: rc == 0,
             "a control connection once the others closed")
    check_eq(r.call(req("status", id=5))["id"], 5, "the first connection still works")


@suite.case
def jsonrpc_null_id():
    # JSON-RPC 2.0: "id": null is a request (not a notification) and is answered with id null.
    h = start(0)
    r = Raw(h.ctl_path)
    r.send(json.dumps({"jsonrpc": "2.0", "id": None, "method": "log-level"}) + "\n")
    r.send(json.dumps(req("status", id=2)) + "\n")
    got = r.answer()
    check_eq(got.get("id", "absent"), None, "the first answer is to id null: %r" % got)
    check_eq(got.get("result"), {"level": "info", "previous": "info"}, "its result")


@suite.case
def reload_is_all_or_nothing():
    # A script that loads in the check and in one worker but not in the other: the reload
    # fails and every worker keeps the old script (none runs the new one).
    h = start(2)
    a, b = h.client(name="a"), h.client(name="b")
    ida, idb = cid(a, [b]), cid(b, [a])
    check_eq(sorted([ida % 2, idb % 2]), [0, 1], "one client on each worker")
    h.write_script('if evapi.worker == 1 then error("not on worker 1") end\n' + script("v2"))
    err = ctl_fails(h, ["reload"], 1, -32000, "a script one worker cannot load")
    check("worker 1" in err and "not on worker 1" in err, "why: %r" % err)
    for c, i, o in ((a, ida, b), (b, idb, a)):
        check_eq(ask(c, "whoami", [o]), ("v1 %d nil" % i).encode(), "client %d: old script" % i)
    check_eq(cj(h, "stats")["reload_failures"], 1, "one failed reload")
    # Every state of a round loads the text the check read: the file changing meanwhile (an
    # editor writing in place) does not reach the workers.
    marker = os.path.join(h.dir, "checked")
    slow = ('io.open(%r, "w"):close()\nlocal t0 = os.clock()\n'
            'while os.clock() - t0 < 0.3 do end\n' % marker)
    h.write_script(slow + script("v3"))
    r = Raw(h.ctl_path)
    r.send(json.dumps(req("reload", id=1)) + "\n")
    wait_file(marker, "the check running the new text")
    h.write_script("this is not Lua\n")
    got = r.answer()
    check_eq(got.get("result", {}).get("reloads"), 1, "the reload of the text read: %r" % got)
    for c, i, o in ((a, ida, b), (b, idb, a)):
        check_eq(ask(c, "whoami", [o]), ("v3 %d nil" % i).encode(), "client %d: new script" % i)


@suite.case
def reload_fails_whole_when_connections_do_not_fit():
    # The new script leaves too little of max_memory for the connections the workers carry
    # over (the scratch check, with none, loads fine): the reload fails as a whole, it is
    # counted as failed, and every connection stays on the old script.
    limit = 4 << 20
    h = start(2, lua={"max_memory": limit})
    cs = [h.client(name="c%d" % i) for i in range(600)]
    ids = [cid(c, cs) for c in cs[:2]]
    pump(cs, lambda: cj(h, "status")["clients"] == 600, what="600 connected")
    fill = ('KEEP = {}\nfor round = 1, 3 do\n    collectgarbage()\n'
            '    while collectgarbage("count") * 1024 < %d do\n'
            '        KEEP[#KEEP + 1] = string.rep("x", 2000)\n    end\nend\n' % (limit - 32 * 1024))
    h.write_script(fill + script("v2"))
    err = ctl_fails(h, ["reload"], 1, -32000, "connections that do not fit")
    check("not enough memory" in err and "worker" in err, "why: %r" % err)
    s = cj(h, "stats")
    check_eq((s["reloads"], s["reload_failures"]), (0, 1), "counted as one failure")
    for c, i in zip(cs[:2], ids):
        check_eq(ask(c, "whoami", cs), ("v1 %d nil" % i).encode(), "client %d: old script" % i)


@suite.case
def stop_cancels_a_reload_in_progress():
    # A new script whose top level never ends, with no instruction budget (in a plain loop,
    # then in fresh coroutines): SIGTERM still stops the hub (the load is cancelled), and the
    # caller is told the hub is stopping.
    loops = ("while true do end\n",
             "while true do coroutine.resume(coroutine.create(function() while true do end "
             "end)) end\n")
    for workers, loop in ((0, loops[0]), (2, loops[0]), (0, loops[1])):
        h = start(workers, lua={"max_instructions": 0})
        a = h.client(name="a")
        cid(a)
        marker = os.path.join(h.dir, "looping")
        h.write_script('io.open(%r, "w"):close()\n' % marker + loop)
        r = Raw(h.ctl_path)
        r.send(json.dumps(req("reload", id=5)) + "\n")
        wait_file(marker, "the new top level running")
        h.stop()  # requires exit 0 within the timeout
        got = r.answer()
        check_eq(got.get("error", {}).get("code"), -32003, "workers=%d: %r" % (workers, got))
    # SIGTERM while one worker is still in a long callback when the reload reaches it: its
    # batch then holds the reload and the stop together; it must not wait for a decision
    # the stopped loop will never send.
    h = start(2, evapi={"shutdown_timeout": 300}, lua={"max_instructions": 0})
    a = h.client(name="a")
    ida = cid(a)
    check_eq(ida % 2, 1, "a runs on worker 1")
    h.write_script(script("v2"))
    a.send_now(ns("busy:3"))
    wait_queued(h, 1, "worker 1 busy")
    r = Raw(h.ctl_path)
    r.send(json.dumps(req("reload", id=6)) + "\n")
    h.wait_log("checked; the workers load it")
    h.stop()
    got = r.answer()
    check_eq(got.get("error", {}).get("code"), -32003, "a busy worker at shutdown: %r" % got)


@suite.case
def reload_during_reload():
    # Two reloads in one write: the second arrives while the workers still load the first, and
    # gets a round of its own (so a file changed in between would be loaded), not the first's
    # outcome.
    h = start(2)
    a = h.client(name="a")
    ida = cid(a)
    h.write_script(script("v2"))
    r = Raw(h.ctl_path)
    r.send(json.dumps(req("reload", id=1)) + "\n" + json.dumps(req("reload", id=2)) + "\n")
    got = {x["id"]: x for x in (r.answer(), r.answer())}
    check_eq(sorted(got), [1, 2], "both answered")
    check_eq(got[1].get("result", {}).get("reloads"), 1, "the first round: %r" % got[1])
    check_eq(got[2].get("result", {}).get("reloads"), 2, "the second round: %r" % got[2])
    check_eq(cj(h, "stats")["reloads"], 2, "two reloads ran")
    check_eq(ask(a, "whoami"), ("v2 %d nil" % ida).encode(), "the new script runs")


@suite.case
def reload_check_does_not_hold_the_loop():
    # The new script's top level runs until its budget stops it. The check runs beside the
    # loop: a client is answered while the reload is still out, then the reload fails with
    # the budget error and the old script keeps running. (workers = 0: the loop also runs Lua.)
    h = start(0, lua={"max_instructions": 50000000})
    a = h.client(name="a")
    ida = cid(a)
    h.write_script("while true do end\n")
    r = Raw(h.ctl_path)
    r.send(json.dumps(req("reload", id=9)) + "\n")
    check_eq(ask(a, "echo:during"), b"during", "served while the check runs")
    r.sock.setblocking(False)
    try:
        early = r.sock.recv(65536)
    except BlockingIOError:
        early = b""
    check_eq(early, b"", "the reload is still being checked when the client is answered")
    r.sock.setblocking(True)
    got = r.answer()
    check_eq(got.get("error", {}).get("code"), -32000, "the reload fails: %r" % got)
    check("instruction budget exceeded" in got["error"]["message"], "why: %r" % got)
    check_eq(ask(a, "whoami"), ("v1 %d nil" % ida).encode(), "the old script still runs")


@suite.case
def control_client_leaves_early():
    # Clients that close with calls still running (reload waits for the workers): the answers
    # are dropped, the hub neither crashes nor leaks (ASan/valgrind), and the calls take effect.
    h = start(2)
    a = h.client(name="a")
    ida = cid(a)
    h.write_script(script("v2"))
    for i in range(10):
        x = Raw(h.ctl_path)
        x.send(json.dumps(req("reload")) + "\n" + json.dumps(
            [req("reload", id=2), req("status", id=3), req("log-level", id=4)]) + "\n")
        x.close()
    wait_for(lambda: cj(h, "status")["script"]["reloads"], lambda n: n >= 1, "a reload")
    check_eq(ask(a, "whoami"), ("v2 %d nil" % ida).encode(), "the reloads ran")
    x = Raw(h.ctl_path)
    x.send(json.dumps(req("close", id=1) | {"params": {"id": ida}}) + "\n")
    x.close()
    wait_eof([a])
    check_eq(cj(h, "stats")["connections_closed"], 1, "the close ran")


# ---------------------------------------------------------------------------------------------
# 11. Finding the socket


@suite.case
def socket_paths():
    h = start(0)
    rc, out, err = run_ctl(["-s", NO_HUB, "status"])
    check_eq((rc, out), (3, ""), "rc of a missing socket (%r)" % err)
    check(NO_HUB in err and "No such file" in err, "stderr names the path and why: %r" % err)
    rc, _, err = run_ctl(["-s", h.conf, "status"])  # a regular file
    check_eq(rc, 3, "rc of a regular file (%r)" % err)
    check(h.conf in err, "stderr names the path: %r" % err)
    rc, out, err = run_ctl(["--json", "status"], env={"EVHUB_SOCKET": h.ctl_path})
    check_eq((rc, json.loads(out)["control"] if rc == 0 else err), (0, h.ctl_path),
             "EVHUB_SOCKET")
    rc, out, err = run_ctl(["-c", h.conf, "--json", "status"])
    check_eq((rc, json.loads(out)["control"] if rc == 0 else err), (0, h.ctl_path), "-c CONFIG")
    rc, out, err = run_ctl(["-s", h.ctl_path, "--json", "status"],
                           env={"EVHUB_SOCKET": NO_HUB})
    check_eq(rc, 0, "-s wins over EVHUB_SOCKET (%r)" % err)
    rc, _, err = run_ctl(["-c", os.path.join(h.dir, "missing.conf"), "status"])
    check_eq(rc, 2, "an unreadable CONFIG is a usage error (%r)" % err)


# ---------------------------------------------------------------------------------------------
# 12. The socket file


@suite.case
def socket_file_lifecycle():
    h = start(0)
    st = os.lstat(h.ctl_path)
    check(stat.S_ISSOCK(st.st_mode), "%s is not a socket" % h.ctl_path)
    check_eq(oct(stat.S_IMODE(st.st_mode)), oct(0o600), "socket mode")
    # The socket's own directory is made when missing (as /run/evhub for the default).
    sub = os.path.join(h.dir, "run-evhub", "ctl.sock")
    hd = Hub(script("v1"), control={"socket": sub})
    hd.ctl_path = sub
    up(hd)
    check_eq(cj(hd, "status")["control"], sub, "served from a new directory")
    hd.stop()
    h.stop(signal.SIGTERM)
    check(not os.path.exists(h.ctl_path), "the socket is removed at exit")
    # A hub killed with SIGKILL leaves its socket; the next one replaces it.
    h2 = start(0, control={"socket": h.ctl_path})
    h2.proc.kill()
    h2.wait_exit()
    check(stat.S_ISSOCK(os.lstat(h.ctl_path).st_mode), "SIGKILL leaves the socket file")
    h3 = start(0, control={"socket": h.ctl_path})
    h3.ctl_path = h.ctl_path
    check_eq(cj(h3, "status")["listen"], "%s:%d" % h3.addr, "the new hub answers")
    h3.wait_log("stale")
    # A second hub on a socket in use fails to start; the first keeps its socket.
    h4 = Hub(script(), control={"socket": h.ctl_path}).start(wait=False)
    check_eq(h4.wait_exit(), 1, "rc of a hub whose control socket is in use")
    log = h4.log()
    check(h.ctl_path in log and "in use" in log, "the reason is logged:\n" + log)
    check_eq(cj(h3, "status")["listen"], "%s:%d" % h3.addr, "the first hub still answers")
    check_eq(cid(h3.client()), 1, "and serves TCP")
    h3.stop()
    check(not os.path.exists(h.ctl_path), "removed at the second hub's exit too")


@suite.case
def socket_path_not_a_socket():
    h = Hub(script())
    with open(h.ctl_path, "w") as f:
        f.write("precious\n")
    h.start(wait=False)
    check_eq(h.wait_exit(), 1, "rc when the socket path is a regular file")
    check("not a socket" in h.log(), "reason logged:\n" + h.log())
    with open(h.ctl_path) as f:
        check_eq(f.read(), "precious\n", "the file is left alone")


# ---------------------------------------------------------------------------------------------
# 13. Loopback TCP


@suite.case
def control_tcp():
    h = start(0, control={"tcp": "127.0.0.1:0"})
    port = int(h.wait_log(re.compile(r"control tcp on port (\d+)")).group(1))
    for sock in ("127.0.0.1:%d" % port, "tcp:127.0.0.1:%d" % port):
        rc, out, err = h.ctl("--json", "status", socket_path=sock)
        check_eq(rc, 0, "status over %s (%r)" % (sock, err))
        check_eq(json.loads(out)["listen"], "%s:%d" % h.addr, "status over " + sock)
    bad = Hub(script(), control={"tcp": "0.0.0.0:0"})
    line = bad.conf_text.splitlines().index("tcp = 0.0.0.0:0") + 1
    for args in (["-c", bad.conf, "-t"], ["-c", bad.conf, "-f"]):
        rc, out = run_once(args)
        check_eq(rc, 1, "rc of %s with a non-loopback control address" % args)
        check("%s:%d" % (bad.conf, line) in out and "loopback" in out,
              "file:line and the reason:\n" + out)


# ---------------------------------------------------------------------------------------------
# 14. evhubctl usage


@suite.case
def ctl_help_and_usage():
    for cmd, (required, optional) in CORE.items():
        for args in ([cmd, "--help"], ["help", cmd]):
            rc, out, err = run_ctl(["-s", NO_HUB] + args)
            check_eq(rc, 0, "evhubctl %s without a hub (%r)" % (" ".join(args), err))
            check("usage: evhubctl [OPTIONS] %s" % cmd in out, "%s usage:\n%s" % (cmd, out))
            for p in required:
                check(p.upper() in out, "%s --help names %s:\n%s" % (cmd, p.upper(), out))
            for p in optional:
                check("--" + p in out, "%s --help names --%s:\n%s" % (cmd, p, out))
    rc, out, _ = run_ctl(["-s", NO_HUB, "--help"])
    check_eq(rc, 0, "evhubctl --help")
    for cmd in CORE:
        check(re.search(r"(?m)^  %s\s" % re.escape(cmd), out), "--help lists " + cmd)
    usage = [["close", "abc"], ["close", "1x"], ["close"], ["tag", "1"], ["status", "extra"],
             ["close", "1", "2", "3"], ["log-level", "info", "x"], ["clients", "--tag"], ["stats", "--prometheus=maybe"],
             ["log-level", "--nope", "x"], []]
    for args in usage:
        rc, out, err = run_ctl(["-s", NO_HUB] + args)
        check_eq((rc, out), (2, ""), "evhubctl %s (stderr %r)" % (" ".join(args), err))
        check(err.strip(), "a usage error says why: %s" % args)
    rc, _, err = run_ctl(["-s", NO_HUB, "-t", "soon", "status"])
    check_eq(rc, 2, "a bad -t (%r)" % err)
    h = start(0)
    rc, out, err = ctl(h, "no-such-command")
    check_eq((rc, out), (2, ""), "an unknown command (%r)" % err)
    check("no-such-command" in err, "stderr names it: %r" % err)
    names = [c["name"] for c in cj(h, "commands")["commands"]]
    check_eq(sorted(n for n in names if n in CORE), sorted(CORE), "commands lists the core")
    for c in cj(h, "commands")["commands"]:
        if c["name"] in CORE:
            req_, opt = CORE[c["name"]]
            check_eq([(p["name"], p["required"]) for p in c["params"]],
                     [(p, True) for p in req_] + [(p, False) for p in opt], c["name"] + " params")


@suite.case
def socat_client():
    """A generic client, socat, speaks to the socket as the README shows: one request piped
    in, its send side closed (half-close), the answer read back."""
    h = start(1)
    a, b = h.client(name="a"), h.client(name="b")
    cid(a, [b])
    cid(b, [a])
    req = b'{"jsonrpc":"2.0","id":"s1","method":"relay","params":{"data":"via socat"}}\n'
    p = subprocess.run(["socat", "-t", str(int(TIMEOUT)), "-", "UNIX-CONNECT:" + h.ctl_path],
                       input=req, capture_output=True, timeout=TIMEOUT + 5)
    check_eq(p.returncode, 0, "socat rc (stderr %r)" % p.stderr)
    check_eq(json.loads(p.stdout), {"jsonrpc": "2.0", "id": "s1", "result": {"recipients": 2}},
             "socat's answer")
    check_eq(p.stdout.count(b"\n"), 1, "one answer, one line")
    wait_frames([a, b], 1)
    check_eq((a.frames[-1], b.frames[-1]), (b"via socat", b"via socat"), "relayed")


suite.run()
