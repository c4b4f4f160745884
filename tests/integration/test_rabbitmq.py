#!/usr/bin/python3
"""The rabbitmq module against a real rabbitmq-server that this test starts (loopback, its own
node, never skipped): rabbitmq.publish with reports (confirmed, returned when mandatory and
unroutable), content type, headers and persistence as consumed, 256 KiB and 4 MiB bodies,
KSR.rabbitmq.publish, a non-default vhost, rabbitmq: event subscribers, evhubctl rabbitmq
status and send, bad URLs and credentials, a full queue while the broker is down (immediate
failures, the loop stays responsive), heartbeats (an idle connection stays up; a stopped
broker is detected), a broker restarted under a stream of 10,000 messages (delivered + failed
= published), SIGTERM with messages unconfirmed, workers 0 and 2."""

import json
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (BIN, SLOW, TIMEOUT, Hub, Suite, check, check_eq,  # noqa: E402
                           pump, request, run_once, wait_for)
from rmq_broker import Broker, free_port, rmqtool_path  # noqa: E402

suite = Suite("rabbitmq")
TOOL = rmqtool_path(BIN)
_broker = None


def broker():
    global _broker
    if _broker is None:
        _broker = Broker(TOOL).start()
    elif _broker.proc is None:
        _broker.start()
    return _broker


# "cmd:args" frames; reports come back as "report JSON".
SCRIPT = r'''
local reports = {ok = 0, failed = 0, want = -1, conn = nil, errors = {}}
local function check_done()
    if reports.want >= 0 and reports.ok + reports.failed == reports.want then
        local errs = {}
        for e, n in pairs(reports.errors) do errs[#errs + 1] = e .. "=" .. n end
        reports.conn:send("done ok=" .. reports.ok .. " failed=" .. reports.failed ..
                          " " .. table.concat(errs, ";"))
        reports.want = -1
    end
end
local function count(r)
    if r.status == 0 then reports.ok = reports.ok + 1 else
        reports.failed = reports.failed + 1
        local e = (r.error or "?"):gsub("%d+ ms", "N ms")
        reports.errors[e] = (reports.errors[e] or 0) + 1
    end
    log.info("report " .. json.encode(r))
    check_done()
end
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    if cmd == "pub" then                  -- pub:{"id":..,"ex":..,"key":..,"body":..,"opts":..}
        local a = json.decode(rest)
        local ok, err, code = rabbitmq.publish(a.id, a.ex, a.key, a.body, a.opts,
            function(r) conn:send("report " .. json.encode(r)) end)
        conn:send("queued " .. tostring(ok) .. " " .. tostring(err) .. " " .. tostring(code))
    elseif cmd == "noreport" then         -- as pub, without a report function
        local a = json.decode(rest)
        local ok, err = rabbitmq.publish(a.id, a.ex, a.key, a.body, a.opts)
        conn:send("queued " .. tostring(ok) .. " " .. tostring(err))
    elseif cmd == "big" then              -- big:ID KEY SIZE
        local id, key, size = rest:match("^(%S+) (%S+) (%d+)$")
        local body = {}
        for i = 1, tonumber(size) // 64 do
            body[#body + 1] = string.format("%063d", i) .. "\n"
        end
        local ok, err = rabbitmq.publish(id, "", key, table.concat(body), nil,
            function(r) conn:send("report " .. json.encode(r)) end)
        conn:send("queued " .. tostring(ok) .. " " .. tostring(err))
    elseif cmd == "many" then             -- many:ID KEY N: N messages "m<i>", reports counted
        local id, key, n = rest:match("^(%S+) (%S+) (%d+)$")
        n = tonumber(n)
        reports.ok, reports.failed, reports.errors, reports.conn = 0, 0, {}, conn
        local refused, why = 0, {}
        for i = 1, n do
            local ok, err = rabbitmq.publish(id, "", key, "m" .. i, {persistent = true}, count)
            if not ok then refused = refused + 1; why[err] = true end
        end
        local w = {}
        for e in pairs(why) do w[#w + 1] = e end
        reports.want = n - refused
        conn:send("many queued=" .. (n - refused) .. " refused=" .. refused .. " " ..
                  table.concat(w, ";"))
        check_done()
    elseif cmd == "ksr" then              -- ksr:EXCHANGE KEY CONTENT_TYPE BODY
        local ex, key, ct, body = rest:match("^(%S*) (%S+) (%S+) (.*)$")
        if ex == "-" then ex = "" end
        conn:send("ksr " .. tostring(KSR.rabbitmq.publish(ex, key, ct, body)))
    elseif cmd == "raise" then            -- raise:EVENT JSON
        local ev, p = rest:match("^(%S+)%s*(.*)$")
        local ok, err = evapi.raise(ev, json.decode(p), function(r)
            conn:send("raised " .. json.encode(r))
        end)
        if not ok then conn:send("raise failed " .. tostring(err)) end
    elseif cmd == "echo" then
        conn:send(rest)
    end
end)
'''


def frames_text(c):
    return [f.decode() if isinstance(f, bytes) else f for f in c.frames]


def hub_with(b, conf, workers=1, extra_lua=None):
    h = Hub(script=SCRIPT, evapi={"workers": workers}, extra=conf)
    h.start()
    return h


def server_conf(b, sid="r1", extra=""):
    return "[rabbitmq]\nserver = [%s]%s\n%s" % (sid, b.url(), extra)


def req(c, text, timeout=None):
    f = request(c, text, timeout=timeout)
    return f.decode() if isinstance(f, bytes) else f


def wait_report(c, timeout=None):
    def has():
        return any(f.startswith(b"report ") for f in c.frames)
    pump([c], until=has, timeout=timeout, what="a report")
    for i, f in enumerate(c.frames):
        if f.startswith(b"report "):
            c.frames.pop(i)
            return json.loads(f[7:].decode())


def status(h, sid):
    st = h.ctl_json("rabbitmq", "status")
    for s in st["servers"]:
        if s["id"] == sid:
            return s
    raise AssertionError("no server %s in %r" % (sid, st))


def wait_connected(h, sid, timeout=None):
    return wait_for(lambda: status(h, sid), lambda s: s["state"] == "connected",
                    "server %s connected" % sid, timeout=timeout or TIMEOUT)


def publish_direct(workers):
    b = broker()
    q = "direct%d" % workers
    b.declare(q)
    h = hub_with(b, server_conf(b), workers=workers)
    c = h.client()
    wait_connected(h, "r1")
    opts = {"content_type": "text/plain", "persistent": True,
            "headers": {"x-call": "abc", "n": 7, "flag": True}}
    for i in range(3):
        c.send("pub:" + json.dumps({"id": "r1", "ex": "", "key": q, "body": "hello%d" % i,
                                    "opts": opts}))
    pump([c], until=lambda: len(c.frames) >= 6, what="3 answers and 3 reports")
    got = frames_text(c)
    check_eq([f for f in got if f.startswith("queued")], ["queued true nil nil"] * 3,
             "publish answers")
    reps = [json.loads(f[7:]) for f in got if f.startswith("report ")]
    check_eq(len(reps), 3, "reports")
    for r in reps:
        check_eq((r["status"], r["id"], r["exchange"], r["routing_key"]), (0, "r1", "", q),
                 "report")
        check("error" not in r, "a confirmed report has no error: %r" % r)
    msgs = b.consume(q, 3)
    check_eq(sorted(m["body"] for m in msgs), ["hello0", "hello1", "hello2"], "bodies consumed")
    for m in msgs:
        check_eq(m["content_type"], "text/plain", "content type")
        check_eq(m["delivery_mode"], 2, "persistent")
        check_eq(m["headers"], {"x-call": "abc", "n": 7, "flag": True}, "headers")
    check_eq(sorted(int(m["message_id"]) for m in msgs), sorted(r["message_id"] for r in reps),
             "message ids")
    s = status(h, "r1")
    check_eq((s["confirmed"], s["failed"], s["queued"], s["unconfirmed"]), (3, 0, 0, 0),
             "status counts")
    check("guest@127.0.0.1:%d" % b.port in s["url"] and "guest:guest" not in s["url"],
          "status url without password: %r" % s["url"])


suite.case_with("publish_direct_workers_0", publish_direct, 0)
suite.case_with("publish_direct_workers_2", publish_direct, 2)


@suite.case
def mandatory_unroutable_and_bad_calls():
    b = broker()
    h = hub_with(b, server_conf(b))
    c = h.client()
    wait_connected(h, "r1")
    got = req(c, "pub:" + json.dumps({"id": "r1", "ex": "amq.direct", "key": "nobody-home",
                                      "body": "x", "opts": {"mandatory": True}}))
    check_eq(got, "queued true nil nil", "publish answer")
    r = wait_report(c)
    check_eq(r["status"], -1, "an unroutable mandatory message is reported failed")
    check("312" in r["error"] and "NO_ROUTE" in r["error"], "reason: %r" % r)
    # not mandatory: the broker confirms it (and drops it)
    req(c, "pub:" + json.dumps({"id": "r1", "ex": "amq.direct", "key": "nobody-home",
                                "body": "x"}))
    check_eq(wait_report(c)["status"], 0, "unroutable, not mandatory: confirmed")
    # an exchange that does not exist: the channel closes, the message fails, the next works
    req(c, "pub:" + json.dumps({"id": "r1", "ex": "no-such-exchange", "key": "k", "body": "x"}))
    r = wait_report(c)
    check(r["status"] == -1 and "404" in r["error"], "missing exchange: %r" % r)
    b.declare("afterclose")
    req(c, "pub:" + json.dumps({"id": "r1", "ex": "", "key": "afterclose", "body": "y"}))
    check_eq(wait_report(c)["status"], 0, "the channel was reopened")
    check_eq([m["body"] for m in b.consume("afterclose", 1)], ["y"], "consumed after reopen")
    got = req(c, "pub:" + json.dumps({"id": "nope", "ex": "", "key": "k", "body": "x"}))
    check(got.startswith("queued nil rabbitmq: unknown server 'nope' ENOENT"), got)
    got = req(c, "pub:" + json.dumps({"id": "r1", "ex": "", "key": "k", "body": "x",
                                      "opts": {"colour": "red"}}))
    check(got.startswith("queued nil opts: unknown option 'colour'"), got)
    check_eq(frames_text(c), [], "a failed call never reports")


@suite.case
def big_bodies():
    b = broker()
    b.declare("big")
    h = hub_with(b, server_conf(b, extra="frame_max = 8192\n"))
    c = h.client()
    wait_connected(h, "r1")
    for size in (256 * 1024, 4 * 1024 * 1024):
        check_eq(req(c, "big:r1 big %d" % size), "queued true nil", "big publish")
        r = wait_report(c, timeout=TIMEOUT * 2)
        check_eq(r["status"], 0, "a %d-byte body confirmed" % size)
        m = b.consume("big", 1)
        check_eq(len(m), 1, "one message")
        body = "".join("%063d\n" % i for i in range(1, size // 64 + 1)).encode()
        s = 0
        for ch in body:
            s = (s * 31 + ch) & 0xFFFFFFFFFFFFFFFF
        check_eq((m[0]["len"], m[0]["sum"]), (size, s), "body of %d bytes intact" % size)


@suite.case
def ksr_publish_and_vhost():
    b = broker()
    b.add_vhost("pbx")
    b.declare("kq", vhost="pbx")
    b.declare("kq")
    conf = ("[rabbitmq]\nserver = [r1]%s\nkemi_server = r2\n[rabbitmq:r2]\nurl = %s\n"
            "heartbeat = 5\n" % (b.url(), b.url("pbx")))
    h = hub_with(b, conf)
    c = h.client()
    wait_connected(h, "r2")
    check_eq(req(c, "ksr:- kq application/json {\"a\":1}"), "ksr 1", "KSR.rabbitmq.publish")
    m = wait_for(lambda: b.consume("kq", 1, 300, vhost="pbx"), lambda m: m,
                 "the KEMI message in vhost pbx")
    check_eq((m[0]["body"], m[0]["content_type"], m[0]["delivery_mode"]),
             ('{"a":1}', "application/json", 2), "KEMI message")
    check_eq(b.consume("kq", 1, 300), [], "nothing in vhost /")
    check_eq(req(c, "ksr:no-such-ex kq text/plain x"), "ksr 1", "queued (fails later)")


@suite.case
def event_subscribers():
    b = broker()
    b.add_vhost("ev")
    b.declare("evq", "amq.topic", "calls.#")
    b.declare("evq2", vhost="ev")
    sock = "rabbitmq:guest:guest@127.0.0.1:%d/amq.topic?calls.new" % b.port
    sock2 = "rabbitmq:127.0.0.1:%d/evq2;vhost=ev" % b.port
    sock3 = "rabbitmq:127.0.0.1:%d/amq.direct?nobody" % b.port
    conf = ("[events]\nsubscribe = E_CALL %s\nsubscribe = E_CALL %s\nsubscribe = E_LOST %s\n"
            % (sock, sock2, sock3))
    h = hub_with(b, conf)
    c = h.client()
    c.send('raise:E_CALL {"callid":"c1","n":1}')
    got = []
    pump([c], until=lambda: len(c.frames) >= 2, what="two reports")
    got = [json.loads(f.decode()[7:]) for f in c.frames]
    check_eq(sorted(g["status"] for g in got), [0, 0], "both subscribers delivered: %r" % got)
    m = b.consume("evq", 1)
    check_eq(json.loads(m[0]["body"]), {"jsonrpc": "2.0", "method": "E_CALL",
                                        "params": {"callid": "c1", "n": 1}}, "notification")
    check_eq((m[0]["routing_key"], m[0]["exchange"]), ("calls.new", "amq.topic"), "routing")
    check_eq(len(b.consume("evq2", 1, vhost="ev")), 1, "vhost subscriber")
    c.frames.clear()
    c.send('raise:E_LOST {"x":1}')
    pump([c], until=lambda: c.frames, what="report")
    r = json.loads(c.frames[0].decode()[7:])
    check(r["status"] == -1 and "NO_ROUTE" in r["error"], "unroutable event fails: %r" % r)
    st = h.ctl_json("rabbitmq", "status")
    check_eq(len(st["sockets"]), 3, "three sockets listed")
    check(all("guest:guest" not in s["socket"] for s in st["sockets"]), "no password: %r" % st)
    # a socket added at run time whose broker is unreachable: events wait; unsubscribing
    # fails them at once without waiting for the thread
    dead = "rabbitmq:127.0.0.1:%d/k" % free_port()
    check_eq(h.ctl_json("subscribe", "E_DEAD", dead), "subscribed", "subscribe")
    c.frames.clear()
    c.send('raise:E_DEAD {"y":2}')
    pump([c])
    wait_for(lambda: h.ctl_json("rabbitmq", "status")["sockets"],
             lambda ss: any(s["queued"] == 1 and s["reconnects"] >= 1 for s in ss),
             "the event waiting for its broker")
    check_eq(frames_text(c), [], "no report yet")
    t0 = time.monotonic()
    check_eq(h.ctl_json("unsubscribe", "E_DEAD", dead), "unsubscribed", "unsubscribe")
    check(time.monotonic() - t0 < 1.0, "unsubscribe does not wait")
    pump([c], until=lambda: c.frames, what="report")
    r = json.loads(c.frames[0].decode()[7:])
    check(r["status"] == -1 and "unsubscribed" in r["error"], "%r" % r)
    check_eq(len(h.ctl_json("rabbitmq", "status")["sockets"]), 3, "the socket is gone")
    check(all("guest:guest" not in s["socket"] for s in st["sockets"]), "no password: %r" % st)
    stats = h.ctl_json("stats")
    conf, failed = stats["rabbitmq_confirmed"], stats["rabbitmq_failed"]
    check_eq((len(conf), sum(conf.values()), sum(failed.values())), (3, 2, 1),
             "counters per socket: %r %r" % (conf, failed))


@suite.case
def evhubctl_send_and_status():
    b = broker()
    b.declare("ctlq")
    h = hub_with(b, server_conf(b))
    wait_connected(h, "r1")
    r = h.ctl_json("rabbitmq", "send", "r1", "", "ctlq", "from-ctl")
    check_eq(r["status"], 0, "send answers on confirm")
    check_eq([m["body"] for m in b.consume("ctlq", 1)], ["from-ctl"], "consumed")
    rc, out, err = h.ctl("rabbitmq", "send", "r1", "amq.direct", "k-none", "x")
    check_eq(rc, 0, "non-mandatory unroutable is confirmed")
    rc, out, err = h.ctl("rabbitmq", "send", "r9", "", "q", "x")
    check(rc != 0 and "unknown server" in err, "unknown id: %r %r" % (out, err))
    rc, out, err = h.ctl("rabbitmq", "status")
    check(rc == 0 and "r1" in out and "connected" in out, out)


def start_fails(extra):
    """A hub with extra config that must refuse to start: its log."""
    h = Hub(script=SCRIPT, extra=extra)
    h.start(wait=False)
    rc = h.wait_exit()
    check(rc != 0, "evhub started with %r" % extra)
    h.rc = rc
    return h.log()


@suite.case
def bad_urls_are_config_errors():
    for line, why in [("server = [r1]http://x", "must start with amqp://"),
                      ("server = [r1]amqps://h/", "amqps:// (TLS) is not supported"),
                      ("server = r1 amqp://h", "expected [ID]amqp://"),
                      ("server = [r!]amqp://h", "bad server id"),
                      ("server = [r1]amqp://h:99999/", "port must be 1..65535"),
                      ("server = [r1]amqp://h/a/b", "written %2f"),
                      ("server = [r1]amqp://h/\nserver = [r1]amqp://g/", "defined twice")]:
        log = start_fails("[rabbitmq]\n%s\n" % line.replace("\\n", "\n"))
        check(why in log and "evhub.conf:" in log, "%s: %r" % (line, log))
    log = start_fails("[rabbitmq:r2]\nheartbeat = 5\n")
    check("[rabbitmq:r2] needs url" in log, log)
    log = start_fails("[rabbitmq]\nserver = [r1]amqp://h/\nqueue_size = 0\n")
    check("queue_size must be at least 1" in log, log)
    log = start_fails("[rabbitmq]\nserver = [r1]amqp://h/\nkemi_server = r3\n")
    check("kemi_server: no server 'r3'" in log, log)
    log = start_fails("[events]\nsubscribe = E rabbitmq:h:1/ex?k;colour=red\n")
    check("unknown option" in log, log)


@suite.case
def bad_credentials_retried():
    b = broker()
    conf = "[rabbitmq]\nserver = [r1]%s\nserver = [r2]%s\n" % (
        b.url(password="wrong"), b.url(vhost="no-such-vhost"))
    h = hub_with(b, conf)
    s = wait_for(lambda: status(h, "r1"), lambda s: s["reconnects"] >= 3,
                 "three failed attempts")
    check("login as guest" in s["last_error"] and "ACCESS_REFUSED" in s["last_error"],
          s["last_error"])
    check(s["state"] in ("down", "connecting"), s["state"])
    s2 = wait_for(lambda: status(h, "r2"), lambda s: s["reconnects"] >= 2, "bad vhost retried")
    check("no-such-vhost" in s2["last_error"] and "NOT_ALLOWED" in s2["last_error"],
          s2["last_error"])
    check(h.count_log("rabbitmq: r1 ") >= 3 and "retrying in" in h.log(), "logged with backoff")
    c = h.client()
    check_eq(req(c, "echo:alive"), "alive", "the hub answers")


@suite.case
def heartbeats():
    b = broker()
    h = hub_with(b, server_conf(b, extra="heartbeat = 1\n"))
    wait_connected(h, "r1")
    time.sleep(3.5)  # more than 3 intervals, idle
    s = status(h, "r1")
    check_eq((s["state"], s["reconnects"]), ("connected", 0), "idle connection kept up")
    beam = b.beam_pid()
    os.kill(beam, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_for(lambda: status(h, "r1"), lambda s: s["state"] != "connected",
                 "the stopped broker detected", timeout=6)
        took = time.monotonic() - t0
        s = status(h, "r1")
        check("heartbeat" in s["last_error"], s["last_error"])
        check(took < 3.5, "detected in %.1f s (heartbeat 1 s)" % took)
        c = h.client()
        t1 = time.monotonic()
        check_eq(req(c, "echo:x"), "x", "round trip")
        check(time.monotonic() - t1 < 0.5, "the loop answers at once")
    finally:
        os.kill(beam, signal.SIGCONT)
    wait_connected(h, "r1", timeout=TIMEOUT * 2)


@suite.case
def heartbeats_while_busy():
    """Heartbeat 1 s and a stream of publishes for about 4 s: the thread services heartbeats
    between publishes; the connection is never dropped and every message is confirmed."""
    b = broker()
    b.declare("busyq")
    h = hub_with(b, server_conf(b, extra="heartbeat = 1\n"))
    c = h.client()
    wait_connected(h, "r1")
    total, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 4.0:
        c.frames.clear()
        got = req(c, "many:r1 busyq 2000")
        check(got.startswith("many queued=2000 refused=0"), got)
        pump([c], until=lambda: any(f.startswith(b"done") for f in c.frames),
             what="the chunk confirmed")
        check(frames_text(c)[-1].startswith("done ok=2000 failed=0"), frames_text(c)[-1])
        total += 2000
        time.sleep(0.2)
    s = status(h, "r1")
    check_eq((s["state"], s["reconnects"], s["confirmed"], s["failed"]),
             ("connected", 0, total, 0), "busy connection kept up")


@suite.case
def queue_full_while_broker_down():
    b = broker()
    b.declare("fullq")
    h = hub_with(b, server_conf(b, extra="queue_size = 100\n"))
    c = h.client()
    wait_connected(h, "r1")
    b.stop()
    try:
        wait_for(lambda: status(h, "r1"), lambda s: s["state"] != "connected", "down")
        t0 = time.monotonic()
        got = req(c, "many:r1 fullq 150")
        check(time.monotonic() - t0 < 1.0, "publishing while down does not block")
        check(got.startswith("many queued=100 refused=50 rabbitmq: r1: queue full (100"), got)
        for _ in range(5):
            t1 = time.monotonic()
            check_eq(req(c, "echo:rt"), "rt", "round trip")
            check(time.monotonic() - t1 < 0.5, "the loop stays fast")
        s = status(h, "r1")
        check_eq(s["queued"], 100, "100 wait")
    finally:
        b.start()
    pump([c], until=lambda: any(f.startswith(b"done") for f in c.frames), timeout=TIMEOUT * 2,
         what="the 100 reported")
    check_eq(frames_text(c)[-1].split(" ")[:3], ["done", "ok=100", "failed=0"], "all confirmed")
    check_eq(len(b.consume("fullq", 200)), 100, "100 consumed")


@suite.case
def restart_under_stream():
    b = broker()
    b.declare("streamq")
    h = hub_with(b, server_conf(b))
    c = h.client()
    wait_connected(h, "r1")
    n = 10000
    # The broker is paused while the stream starts, so that the restart finds messages
    # published and not confirmed whatever the speed of this machine.
    beam = b.beam_pid()
    os.kill(beam, signal.SIGSTOP)
    try:
        c.send("many:r1 streamq %d" % n)
        pump([c], until=lambda: c.frames, what="queued")
        check(frames_text(c)[0].startswith("many queued=%d refused=0" % n), frames_text(c)[0])
        wait_for(lambda: status(h, "r1"), lambda s: s["unconfirmed"] > 0, "messages in flight")
        t0 = time.monotonic()
        check_eq(req(c, "echo:rt"), "rt", "round trip while the broker is paused")
        check(time.monotonic() - t0 < 0.5, "the loop is not held")
    finally:
        os.kill(beam, signal.SIGCONT)
    b.stop()
    b.start()
    pump([c], until=lambda: any(f.startswith(b"done") for f in c.frames), timeout=TIMEOUT * 3,
         what="every message reported")
    done = frames_text(c)[-1]
    m = re.match(r"done ok=(\d+) failed=(\d+)", done)
    ok, failed = int(m.group(1)), int(m.group(2))
    check_eq(ok + failed, n, "reported = published (%s)" % done)
    msgs = b.consume("streamq", n * 2, idle_ms=2000)
    bodies = set(m["body"] for m in msgs)
    # at-least-once: a confirmed message is consumed (perhaps twice); a failed one may be too
    check(ok <= len(bodies) <= n, "confirmed %d, distinct consumed %d" % (ok, len(bodies)))
    s = status(h, "r1")
    check_eq((s["confirmed"] + s["failed"], s["queued"], s["unconfirmed"]), (n, 0, 0),
             "counters")
    check(s["reconnects"] >= 1, "a reconnect counted")
    resent = sum(h.ctl_json("stats")["rabbitmq_resent"].values())
    check(resent > 0 or failed > 0, "the restart caught messages in flight")
    check_eq(req(c, "echo:still"), "still", "the hub relays")
    print("    restart: %d confirmed, %d failed, %d resent, %d distinct consumed, %d consumed"
          % (ok, failed, resent, len(bodies), len(msgs)))


@suite.case
def sigterm_drains_a_healthy_queue():
    b = broker()
    b.declare("drainq")
    h = hub_with(b, server_conf(b))
    c = h.client()
    wait_connected(h, "r1")
    got = req(c, "many:r1 drainq 5000")
    check(got.startswith("many queued=5000"), got)
    h.signal(signal.SIGTERM)
    check_eq(h.wait_exit(TIMEOUT), 0, "exit status")
    reps = [json.loads(r) for r in re.findall(r"report (\{.*\})", h.log())]
    check_eq((len(reps), sum(r["status"] == 0 for r in reps)), (5000, 5000),
             "every queued message confirmed before the exit")
    check_eq(len(b.consume("drainq", 6000)), 5000, "consumed")


@suite.case
def sigterm_with_unconfirmed():
    b = broker()
    b.declare("termq")
    h = hub_with(b, server_conf(b))
    c = h.client()
    wait_connected(h, "r1")
    beam = b.beam_pid()
    os.kill(beam, signal.SIGSTOP)
    try:
        got = req(c, "many:r1 termq 20")
        check(got.startswith("many queued=20"), got)
        time.sleep(0.3)
        h.signal(signal.SIGTERM)
        rc = h.wait_exit(TIMEOUT)
        check_eq(rc, 0, "exit status")
    finally:
        os.kill(beam, signal.SIGCONT)
    log = h.log()
    reps = re.findall(r"report (\{.*\})", log)
    check_eq(len(reps), 20, "every message reported")
    for r in map(json.loads, reps):
        check(r["status"] == -1 and "the hub stopped" in r["error"], r)


if __name__ == "__main__":
    try:
        suite.run()
    finally:
        if _broker is not None:
            _broker.close()
