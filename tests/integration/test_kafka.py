#!/usr/bin/python3
"""The kafka module against a real Kafka-protocol broker: librdkafka's mock cluster in its own
process (tests/bench/kafka/kafka_mock), consumed back with kcat. Publishing from Lua (payloads,
keys, options table with topic and headers, reports with status 0, partition and offset, in
order), KSR.kafka.send/send_key, kafka: subscribers (the JSON-RPC body), bad properties, URIs
and ids at start-up and at run time, the broker killed mid-stream (every message delivered or
reported -1, counts exact, clients still relayed), QUEUE_FULL (retried from a timer; failed and
counted when still full), SIGTERM with messages in flight, a reload with reports pending,
evhubctl kafka status/connection/send, workers 0 and 2; with workers 2 (publishes made on the
workers themselves) each state's order and exact counts while QUEUE_FULL comes and goes and
while fatal errors drop and remake the producer."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (BIN, TIMEOUT, Hub, Raw, Suite, TestFailure, check, check_eq,  # noqa: E402
                           pump, run_once, scaled, wait_for, wait_frames)

suite = Suite("kafka")

MOCK_BIN = os.environ.get("EVHUB_KAFKA_MOCK") or os.path.join(
    os.path.dirname(BIN), "tests", "bench", "kafka", "kafka_mock")
KCAT = shutil.which("kcat") or "/usr/bin/kcat"
_mocks = []


class Mock:
    """kafka_mock in its own process: a one-broker cluster with the given topics (1 partition
    each, so that offsets are in publish order)."""

    def __init__(self, *topics):
        check(os.access(MOCK_BIN, os.X_OK), "kafka_mock not built: %s" % MOCK_BIN)
        self.proc = subprocess.Popen([MOCK_BIN, "-c"] + list(topics), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _mocks.append(self)
        line = self.proc.stdout.readline().decode().strip()
        check(re.match(r"^127\.0\.0\.1:\d+$", line), "kafka_mock printed %r" % line)
        self.bootstrap = line

    def cmd(self, line):
        """A fault-injection command (kafka_mock -c): "down 1", "err 22 31 1", ..."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        check_eq(self.proc.stdout.readline().decode().strip(), "ok", "kafka_mock " + line)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(TIMEOUT)


def stop_mocks():
    while _mocks:
        _mocks.pop().kill()


def consume(bootstrap, topic, count, timeout=None):
    """The records of partition 0 of topic, read back with kcat (JSON envelope), until count
    are there."""
    deadline = time.monotonic() + (TIMEOUT if timeout is None else timeout)
    while True:
        p = subprocess.run([KCAT, "-b", bootstrap, "-C", "-t", topic, "-p", "0", "-o", "beginning",
                            "-e", "-J", "-q"], capture_output=True, timeout=TIMEOUT)
        recs = [json.loads(x) for x in p.stdout.decode().splitlines() if x.strip()]
        if len(recs) >= count or time.monotonic() > deadline:
            check_eq(len(recs), count, "records in %s (kcat stderr %r)" % (topic, p.stderr))
            return recs
        time.sleep(0.1)


def dead_port():
    """A loopback port nothing listens on (bound, then closed)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return "127.0.0.1:%d" % port


# "cmd:args" frames; every report comes back as "report JSON".
SCRIPT = r'''
local function rep(conn)
    return function(r) conn:send("report " .. json.encode(r)) end
end
-- this state's name (a table's address, the table kept by the handler) and publish count
local anchor, seqno = {}, 0
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    if cmd == "seq" then                     -- seq:ID N: N publishes keyed STATE:SEQ
        local id, n = rest:match("^(%S+) (%d+)$")
        local sid, oks = tostring(anchor):match("0x(%x+)"), 0
        for _ = 1, tonumber(n) do
            seqno = seqno + 1
            if kafka.publish(id, "s", sid .. ":" .. seqno, rep(conn)) then oks = oks + 1 end
        end
        conn:send("seq " .. oks)
    elseif cmd == "pub" then                 -- pub:ID|MSG[|KEY]
        local id, m, k = rest:match("^([^|]*)|([^|]*)|?(.*)$")
        if k == "" then k = nil end
        local ok, err, code = kafka.publish(id, m, k, rep(conn))
        conn:send("pub " .. tostring(ok) .. " " .. tostring(err) .. " " .. tostring(code))
    elseif cmd == "opt" then                 -- opt:ID|MSG|OPTIONS_JSON
        local id, m, o = rest:match("^([^|]*)|([^|]*)|(.*)$")
        local ok, err, code = kafka.publish(id, m, json.decode(o), rep(conn))
        conn:send("pub " .. tostring(ok) .. " " .. tostring(err) .. " " .. tostring(code))
    elseif cmd == "many" then                -- many:ID N: N publishes m1..mN keyed k1..kN
        local id, n = rest:match("^(%S+) (%d+)$")
        local oks = 0
        for i = 1, tonumber(n) do
            if kafka.publish(id, "m" .. i, "k" .. i, rep(conn)) then oks = oks + 1 end
        end
        conn:send("many " .. oks)
    elseif cmd == "big" then                 -- big:ID N: a message of N bytes
        local id, n = rest:match("^(%S+) (%d+)$")
        local ok, err, code = kafka.publish(id, string.rep("x", tonumber(n)), rep(conn))
        conn:send("pub " .. tostring(ok) .. " " .. tostring(err) .. " " .. tostring(code))
    elseif cmd == "kemi" then                -- kemi:TOPIC|MSG[|KEY]
        local t, m, k = rest:match("^([^|]*)|([^|]*)|?(.*)$")
        local rc
        if k == "" then rc = KSR.kafka.send(t, m) else rc = KSR.kafka.send_key(t, m, k) end
        conn:send("kemi " .. tostring(rc))
    elseif cmd == "raise" then               -- raise:EVENT PARAMS_JSON
        local ev, p = rest:match("^(%S+) (.*)$")
        evapi.raise(ev, json.decode(p), function(r) conn:send("raised " .. json.encode(r)) end)
        conn:send("raise sent")
    elseif cmd == "relay" then
        evapi.relay(rest)
    end
end)
'''


def hub_with(conf_kafka, workers=0, extra="", script=SCRIPT, evapi=None):
    ev = {"workers": str(workers)}
    ev.update(evapi or {})
    return Hub(script=script, evapi=ev, extra=conf_kafka + extra).start()


def ask(client, payload, timeout=None):
    """Send one frame and return the script's direct answer to it: the first frame that is not
    a report (reports may come before it; they stay in client.frames, in order)."""
    def answers():
        return [f for f in client.frames if not f.startswith((b"report ", b"raised "))]
    n = len(answers())
    client.send(payload)
    pump([client], lambda: len(answers()) > n, timeout, "the answer to %r" % payload[:40])
    a = answers()[n]
    client.frames.remove(a)
    return a


def reports(client, n, timeout=None):
    """Wait for n report frames on client; return them decoded (other frames stay)."""
    pump([client], lambda: sum(f.startswith(b"report ") for f in client.frames) >= n, timeout,
         "%d reports" % n)
    out, rest = [], []
    for f in client.frames:
        if f.startswith(b"report ") and len(out) < n:
            out.append(json.loads(f[7:]))
        else:
            rest.append(f)
    client.frames = rest
    return out


def status_of(hub, name):
    r = hub.ctl_json("kafka", "status")
    for c in r["connections"]:
        if c["name"] == name:
            return c
    raise TestFailure("no connection %s in %r" % (name, r))


def publish_case(workers):
    m = Mock("ev", "other")
    try:
        conf = ("[kafka]\nbroker = [k1]%s/ev?g.linger.ms=1&t.acks=all\n\n"
                "[kafka:named]\nbrokers = %s\ntopic = other\ng.linger.ms = 2\n" %
                (m.bootstrap, m.bootstrap))
        h = hub_with(conf, workers)
        c = h.client()
        for i in range(5):
            check_eq(ask(c, b"pub:k1|msg %d|key%d" % (i, i)), b"pub true nil nil", "publish")
        got = reports(c, 5)
        check_eq([r["msg"] for r in got], ["msg %d" % i for i in range(5)], "report order")
        for i, r in enumerate(got):
            check_eq((r["id"], r["status"], r["key"], r["topic"], r["partition"], r["offset"]),
                     ("k1", 0, "key%d" % i, "ev", 0, i), "report %d" % i)
            check("error" not in r, "no error in a delivered report")
        # no key; the options table: topic, key, headers; the named connection's default topic
        check_eq(ask(c, b"pub:k1|nokey"), b"pub true nil nil", "publish without key")
        check_eq(ask(c, b'opt:k1|withopts|{"topic":"other","key":"ok1",'
                            b'"headers":{"h1":"v1"}}'), b"pub true nil nil", "options")
        check_eq(ask(c, b"pub:named|to default topic"), b"pub true nil nil", "named")
        got = reports(c, 3)  # in order per topic; the two topics' reports may interleave
        check_eq(sorted((r["msg"], r["topic"], r.get("key"), r["status"]) for r in got),
                 [("nokey", "ev", None, 0), ("to default topic", "other", None, 0),
                  ("withopts", "other", "ok1", 0)], "reports")
        recs = consume(m.bootstrap, "ev", 6)
        check_eq([(r["key"], r["payload"]) for r in recs],
                 [("key%d" % i, "msg %d" % i) for i in range(5)] + [(None, "nokey")],
                 "records on ev")
        recs = consume(m.bootstrap, "other", 2)  # two producers: either may come first
        recs.sort(key=lambda r: r["payload"])
        check_eq([(r["key"], r["payload"]) for r in recs],
                 [(None, "to default topic"), ("ok1", "withopts")], "records on other")
        check_eq(recs[1].get("headers"), ["h1", "v1"], "headers")
        s = status_of(h, "k1")
        check_eq((s["produced"], s["delivered"], s["failed"], s["in_flight"]), (7, 7, 0, 0),
                 "k1 counters")
        st = h.ctl_json("stats")
        check_eq((st["kafka_produced"]["named"], st["kafka_delivered"]["named"],
                  st["kafka_in_flight"]["named"]), (1, 1, 0), "stats of named")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("publish_reports_and_records_workers0", publish_case, 0)
suite.case_with("publish_reports_and_records_workers2", publish_case, 2)


@suite.case
def refusals_at_run_time():
    m = Mock("ev")
    try:
        conf = ("[kafka]\nbroker = [k1]%s/ev?g.message.max.bytes=2000\n\n"
                "[kafka:notopic]\nbrokers = %s\n" % (m.bootstrap, m.bootstrap))
        h = hub_with(conf)
        c = h.client()
        check_eq(ask(c, b"pub:nope|x"), b"pub nil unknown kafka id 'nope' ENOENT",
                 "unknown id")
        check_eq(ask(c, b"pub:k1\x00x|x"),
                 b"pub nil the id must be a string (without NUL bytes) EINVAL",
                 "an id with a NUL byte is not k1")
        check_eq(ask(c, b"big:k1 5000"), b"pub nil message of 5000 bytes is over "
                 b"message.max.bytes (2000) EMSGSIZE", "too large")
        r = ask(c, b"pub:notopic|x")
        check(r.startswith(b"pub nil notopic has no default topic"), r)
        r = ask(c, b'opt:k1|x|{"color":"red"}')
        check(b"unknown option 'color'" in r and r.endswith(b"EINVAL"), r)
        r = ask(c, b'opt:k1|x|{"topic":"bad/topic"}')
        check(b"topic must be" in r, r)
        check_eq(ask(c, b"big:k1 100"), b"pub true nil nil", "a small one")
        check_eq(reports(c, 1)[0]["status"], 0, "delivered")
        s = status_of(h, "k1")
        check_eq((s["produced"], s["delivered"], s["failed"]), (1, 1, 0), "counters")
        h.stop()
    finally:
        stop_mocks()


@suite.case
def bad_config_stops_start_up():
    cases = [
        ("[kafka]\nbroker = [k1]127.0.0.1:9092/ev?g.no.such.prop=1\n", 2,
         r"broker \[k1\]: g\.no\.such\.prop = 1: No such configuration property"),
        ("[kafka]\nbroker = [k1]127.0.0.1:9092/ev?t.acks=maybe\n", 2, r"t\.acks = maybe: "),
        ("[kafka]\nbroker = k1 127.0.0.1:9092/ev\n", 2, r"broker: expected \[ID\]"),
        ("[kafka]\nbroker = [k1]127.0.0.1:9092\n", 2, r"expected BROKERS/TOPIC"),
        ("[kafka]\nbroker = [k1]127.0.0.1:9092/ev?x.y=1\n", 2, r"starts with g\. \(global\)"),
        ("[kafka]\nbroker = [k1]h:1/a\nbroker = [k1]h:1/b\n", 3, r"the id \[k1\] is taken"),
        ("[kafka:c1]\nbrokers = h:1\ng.linger.ms = soon\n", 3,
         r"\[kafka:c1\] g\.linger\.ms = soon: "),
        ("[kafka:c1]\nbrokers = h:1\nt.message.timeout.ms = 1\nt.message.timeout.ms = 2\n", 4,
         r"t\.message\.timeout\.ms given twice \(first at line \d+\)"),
        ("[kafka:c1]\nbroker = [x]h:1/t\n", 1, r"broker belongs in \[kafka\]"),
        ("[kafka]\nkemi_broker = zz\n", 1, r"kemi_broker: no connection 'zz'"),
        ("[events]\nsubscribe = E_X kafka:h:1/t?g.bogus=1\n", 2,
         r"subscribe: kafka: socket: g\.bogus = 1: No such configuration property"),
        ("[events]\nsubscribe = E_X kafka:h:1/t?key=from\n", 2, r"only key=callid"),
        ("[kafka:c1]\nbrokers = h:1\nacks = all\n", 3, r"unknown key 'acks' in section"),
    ]
    for text, line, reason in cases:
        h = Hub(script=SCRIPT, extra=text)
        rc, out = run_once(["-c", h.conf, "-f"])
        check(rc != 0, "start-up refused: %r\n%s" % (text, out))
        pat = re.escape(h.conf) + r":%d: .*%s" % (line + _conf_offset(h, text), reason)
        check(re.search(pat, out), "want %s in:\n%s" % (pat, out))


@suite.case
def eager_connect():
    # a rule librdkafka checks only when it makes the producer: start-up stops when eager
    text = ("[kafka]\nconnect = eager\n"
            "broker = [k1]127.0.0.1:9/ev?g.enable.idempotence=true&t.acks=1\n")
    h = Hub(script=SCRIPT, extra=text)
    rc, out = run_once(["-c", h.conf, "-f"])
    pat = re.escape(h.conf) + r":%d: kafka k1: cannot create the producer: .*acks" % (
        3 + _conf_offset(h, text))
    check(rc != 0 and re.search(pat, out), "want %s in:\n%s" % (pat, out))
    # eager and fine: the producer exists before anything is published
    m = Mock("ev")
    try:
        h = hub_with("[kafka:e]\nconnect = eager\nbrokers = %s\ntopic = ev\n" % m.bootstrap)
        h.wait_log("kafka: e: producer made")
        check_eq(status_of(h, "e")["produced"], 0, "nothing published yet")
        h.stop()
    finally:
        stop_mocks()


def _conf_offset(h, text):
    """Lines of the generated config before the extra text."""
    return h.conf_text[:h.conf_text.rindex(text)].count("\n")


def subscriber_case(workers):
    m = Mock("calls")
    try:
        extra = "[events]\nsubscribe = E_CALL kafka:%s/calls?g.linger.ms=1\n" % m.bootstrap
        h = hub_with("", workers, extra=extra)
        c = h.client()
        for i in range(3):
            check_eq(ask(c, b'raise:E_CALL {"n":%d,"who":"alice"}' % i), b"raise sent", "raise")
        pump([c], lambda: sum(f.startswith(b"raised ") for f in c.frames) >= 3, None, "reports")
        got = [json.loads(f[7:]) for f in c.frames if f.startswith(b"raised ")]
        check_eq([(r["status"], r["socket"]) for r in got],
                 [(0, "kafka:%s/calls?g.linger.ms=1" % m.bootstrap)] * 3, "reports")
        recs = consume(m.bootstrap, "calls", 3)
        for i, r in enumerate(recs):
            check_eq(json.loads(r["payload"]), {"jsonrpc": "2.0", "method": "E_CALL",
                                                "params": {"n": i, "who": "alice"}}, "record")
            check_eq(r["key"], None, "no key")
        subs = h.ctl_json("subscriptions")["subscriptions"]
        check_eq((subs[0]["state"], subs[0]["delivered"]), ("up", 3), "subscription")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("kafka_subscriber_jsonrpc_body_workers0", subscriber_case, 0)
suite.case_with("kafka_subscriber_jsonrpc_body_workers2", subscriber_case, 2)


@suite.case
def kemi_send_and_send_key():
    m = Mock("kt")
    try:
        conf = ("[kafka]\nkemi_broker = second\nbroker = [first]%s/kt\n\n"
                "[kafka:second]\nbrokers = %s\n" % (dead_port(), m.bootstrap))
        h = hub_with(conf)
        c = h.client()
        check_eq(ask(c, b"kemi:kt|plain"), b"kemi 1", "send")
        check_eq(ask(c, b"kemi:kt|keyed|kk"), b"kemi 1", "send_key")
        check_eq(ask(c, b"kemi:bad/topic|x"), b"kemi -1", "bad topic")
        recs = consume(m.bootstrap, "kt", 2)
        check_eq([(r["key"], r["payload"]) for r in recs], [(None, "plain"), ("kk", "keyed")],
                 "records")
        h.wait_log("KSR.kafka.send: the topic must be")
        s = status_of(h, "second")
        check_eq((s["produced"], s["delivered"]), (2, 2), "on the kemi_broker connection")
        check_eq(status_of(h, "first")["produced"], 0, "not on the first")
        h.stop()
    finally:
        stop_mocks()


def outage_case(workers):
    m = Mock("ev")
    try:
        conf = ("[kafka]\nbroker = [k1]%s/ev?g.linger.ms=1&t.message.timeout.ms=2000"
                "&g.reconnect.backoff.max.ms=200\n" % m.bootstrap)
        h = hub_with(conf, workers)
        c, other = h.client(), h.client()
        check_eq(ask(c, b"many:k1 20"), b"many 20", "first 20")
        got = reports(c, 20)
        check(all(r["status"] == 0 for r in got), "first 20 delivered")
        m.kill()
        check_eq(ask(c, b"many:k1 20"), b"many 20", "20 with the broker gone")
        # meanwhile the hub keeps relaying clients
        t0 = time.monotonic()
        for i in range(50):
            c.send(b"relay:r%d" % i)
        wait_frames([other], 50, others=[c])
        check(time.monotonic() - t0 < 2, "relays while the broker is down were not held up")
        got = reports(c, 20, timeout=40)
        check_eq([r["status"] for r in got], [-1] * 20, "every one reported failed")
        check_eq([r["msg"] for r in got], ["m%d" % i for i in range(1, 21)], "in order")
        check(all(r["error"] for r in got), "with the error text: %r" % got[0])
        s = status_of(h, "k1")
        check_eq((s["produced"], s["delivered"], s["failed"], s["in_flight"]), (40, 20, 20, 0),
                 "produced = delivered + failed")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("broker_killed_mid_stream_workers0", outage_case, 0)
suite.case_with("broker_killed_mid_stream_workers2", outage_case, 2)


def queue_full_retried_case(workers):
    m = Mock("ev")
    try:
        # retries for 10 s: a loaded machine's broker round trips must not fail the last ones
        conf = ("[kafka]\nqueue_full_retries = 2000\nqueue_full_interval = 5\n"
                "broker = [k1]%s/ev?g.queue.buffering.max.messages=1&g.linger.ms=0\n" %
                m.bootstrap)
        h = hub_with(conf, workers)
        c = h.client()
        check_eq(ask(c, b"many:k1 30"), b"many 30", "accepted")
        got = reports(c, 30)
        check_eq([(r["status"], r["offset"]) for r in got], [(0, i) for i in range(30)],
                 "delivered in order")
        st = h.ctl_json("stats")
        check(st["kafka_queue_full"]["k1"] > 0, "QUEUE_FULL was met and counted: %r" % st)
        check_eq((st["kafka_produced"]["k1"], st["kafka_delivered"]["k1"]), (30, 30), "counts")
        check_eq(len(consume(m.bootstrap, "ev", 30)), 30, "records")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("queue_full_retried_then_delivered_workers0", queue_full_retried_case, 0)
suite.case_with("queue_full_retried_then_delivered_workers2", queue_full_retried_case, 2)


def queue_full_still_full_case(workers):
    conf = ("[kafka]\nqueue_full_retries = 3\nqueue_full_interval = 20\n"
            "broker = [k1]%s/ev?g.queue.buffering.max.messages=2&t.message.timeout.ms=1500\n" %
            dead_port())
    h = hub_with(conf, workers)
    c, other = h.client(), h.client()
    check_eq(ask(c, b"many:k1 10"), b"many 10", "accepted")
    c.send(b"relay:still here")
    wait_frames([other], 1, others=[c])
    got = reports(c, 8)
    check_eq([r["msg"] for r in got], ["m%d" % i for i in range(3, 11)], "the 8 that did not fit")
    check(all(r["status"] == -1 and "queue full" in r["error"] for r in got), repr(got[0]))
    got = reports(c, 2, timeout=40)
    check_eq([(r["msg"], r["status"]) for r in got], [("m1", -1), ("m2", -1)], "timed out")
    s = status_of(h, "k1")
    check_eq((s["produced"], s["delivered"], s["failed"], s["in_flight"]), (10, 0, 10, 0),
             "counters")
    h.stop()


suite.case_with("queue_full_still_full_fails_and_counts_workers0", queue_full_still_full_case, 0)
suite.case_with("queue_full_still_full_fails_and_counts_workers2", queue_full_still_full_case, 2)


def sigterm_case(workers):
    conf = ("[kafka]\nbroker = [k1]%s/ev?t.message.timeout.ms=60000\n" % dead_port())
    h = hub_with(conf, workers, evapi={"shutdown_timeout": "600"})
    c = h.client()
    check_eq(ask(c, b"many:k1 5"), b"many 5", "accepted")
    t0 = time.monotonic()
    h.stop()
    check(time.monotonic() - t0 < 5, "the shutdown deadline held")
    h.wait_log("kafka: k1: 5 message(s) reported failed: the hub stopped before it was "
               "delivered")


suite.case_with("sigterm_with_messages_in_flight_workers0", sigterm_case, 0)
suite.case_with("sigterm_with_messages_in_flight_workers2", sigterm_case, 2)


def reload_case(workers):
    conf = ("[kafka]\nbroker = [k1]%s/ev?t.message.timeout.ms=1000\n" % dead_port())
    h = hub_with(conf, workers)
    c = h.client()
    check_eq(ask(c, b"many:k1 3"), b"many 3", "accepted")
    h.ctl_json("reload")
    wait_for(lambda: status_of(h, "k1"), lambda s: s["failed"] == 3, "3 failed", timeout=30)
    s = status_of(h, "k1")
    check_eq((s["produced"], s["delivered"], s["in_flight"]), (3, 0, 0), "counters")
    check_eq(h.ctl_json("stats")["completions_undelivered"], 3, "reports of the old script")
    h.stop()


suite.case_with("reload_with_reports_pending_workers0", reload_case, 0)
suite.case_with("reload_with_reports_pending_workers2", reload_case, 2)


def order_case(workers, fatals):
    """Many clients publish at once into a queue of 4 messages, so QUEUE_FULL comes and goes
    (and, with fatals, the first producers die of a fatal error one after the other): every
    message ends once, the counters agree, and each state's records are in the order it
    published them (the key is STATE:SEQ, the topic has one partition)."""
    m = Mock("ord")
    try:
        idem = "&g.enable.idempotence=true" if fatals else ""
        conf = ("[kafka]\nqueue_full_retries = 100000\nqueue_full_interval = 1\n"
                "broker = [k1]%s/ord?g.queue.buffering.max.messages=4&g.linger.ms=0%s\n" %
                (m.bootstrap, idem))
        if fatals:
            m.cmd("err 22 31 %d" % fatals)  # InitProducerId refused: each producer dies
        h = hub_with(conf, workers)
        rounds, each, clients = scaled(15, 5), 20, [h.client() for _ in range(8)]
        per = rounds * each
        n = per * len(clients)

        def answers(c):
            return [f for f in c.frames if not f.startswith(b"report ")]
        # in rounds, so that publishes keep coming while the retry list fills and empties
        for i in range(rounds):
            for c in clients:
                c.send(b"seq:k1 %d" % each)
            pump(clients, lambda: all(len(answers(c)) == i + 1 for c in clients), None,
                 "round %d" % i)

        def reports_in(c):
            return sum(f.startswith(b"report ") for f in c.frames)
        pump(clients, lambda: all(reports_in(c) == per for c in clients), TIMEOUT * 2,
             "%d reports" % n)
        got = []
        for c in clients:
            check_eq(answers(c), [b"seq %d" % each] * rounds, "every publish accepted")
            got += [json.loads(f[7:]) for f in c.frames if f.startswith(b"report ")]
        check_eq(len(set(r["key"] for r in got)), n, "one report a message")
        ok = [r for r in got if r["status"] == 0]
        check(all(r["status"] == -1 and r["error"] for r in got if r["status"] != 0),
              "failures reported with their error")
        s = status_of(h, "k1")
        check_eq((s["produced"], s["delivered"], s["failed"], s["in_flight"]),
                 (n, len(ok), n - len(ok), 0), "produced = delivered + failed")
        st = h.ctl_json("stats")
        check(st["kafka_queue_full"]["k1"] > 0, "QUEUE_FULL was met: %r" % st["kafka_queue_full"])
        if fatals:
            check_eq(st["kafka_fatal"]["k1"], fatals, "fatal errors")
            h.wait_log("kafka: k1: producer made", count=fatals + 1)
        recs = consume(m.bootstrap, "ord", len(ok))
        last = {}
        for r in recs:
            sid, seq = r["key"].split(":")
            check(int(seq) > last.get(sid, 0), "state %s: %s after %d" % (sid, seq, last.get(sid, 0)))
            last[sid] = int(seq)
        check_eq(len(last), 2 if workers == 2 else 1, "states that published")
        check_eq(sorted(r["key"] for r in recs), sorted(r["key"] for r in ok), "records")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("order_kept_through_queue_full_workers0", order_case, 0, 0)
suite.case_with("order_kept_through_queue_full_workers2", order_case, 2, 0)
suite.case_with("order_kept_through_fatal_errors_workers2", order_case, 2, 3)


@suite.case
def evhubctl_kafka():
    m = Mock("ct")
    try:
        conf = ("[kafka]\nbroker = [k1]%s/ct?g.statistics.interval.ms=100\n"
                "broker = [dead]%s/ct?t.message.timeout.ms=500\n" % (m.bootstrap, dead_port()))
        h = hub_with(conf)
        r = h.ctl_json("kafka", "send", "k1", "ct", "hello", "--key", "kk")
        check_eq((r["status"], r["topic"], r["partition"], r["offset"]), ("delivered", "ct", 0, 0),
                 "send answers with the report")
        rc, out, err = h.ctl("kafka", "send", "dead", "ct", "x")
        check(rc != 0 and "not delivered:" in err + out, "failed send: %r %r" % (out, err))
        rc, out, err = h.ctl("kafka", "send", "nope", "ct", "x")
        check(rc != 0 and "no kafka connection 'nope'" in err + out, err + out)
        st = h.ctl_json("kafka", "status")["connections"]
        check_eq([(x["name"], x["state"], x["delivered"], x["failed"]) for x in st],
                 [("k1", "up", 1, 0), ("dead", st[1]["state"], 0, 1)], "status")
        check(st[1]["last_error"], "dead has a last error")
        conn = wait_for(lambda: h.ctl_json("kafka", "connection", "k1"),
                        lambda x: x["broker_states"], "broker states from statistics")
        check_eq(conn["settings"]["g.statistics.interval.ms"], "100", "settings")
        check(any(b["state"] == "UP" for b in conn["broker_states"]), conn["broker_states"])
        recs = consume(m.bootstrap, "ct", 1)
        check_eq((recs[0]["key"], recs[0]["payload"]), ("kk", "hello"), "record")
        h.stop()
    finally:
        stop_mocks()


@suite.case
def outage_shorter_than_the_timeout_is_buffered():
    m = Mock("ev")
    try:
        conf = ("[kafka]\nbroker = [k1]%s/ev?g.linger.ms=1&t.message.timeout.ms=20000"
                "&g.reconnect.backoff.max.ms=200\n" % m.bootstrap)
        h = hub_with(conf)
        c = h.client()
        check_eq(ask(c, b"pub:k1|before"), b"pub true nil nil", "publish")
        check_eq(reports(c, 1)[0]["status"], 0, "delivered")
        m.cmd("down 1")
        check_eq(ask(c, b"many:k1 5"), b"many 5", "5 while the broker is down")
        time.sleep(1.0)
        check(not any(f.startswith(b"report ") for f in c.frames), "nothing reported yet")
        check_eq(status_of(h, "k1")["in_flight"], 5, "waiting inside librdkafka")
        m.cmd("up 1")
        got = reports(c, 5, timeout=30)
        check_eq([(r["msg"], r["status"]) for r in got], [("m%d" % i, 0) for i in range(1, 6)],
                 "delivered once the broker is back, in order")
        check_eq(len(consume(m.bootstrap, "ev", 6)), 6, "records")
        h.stop()
    finally:
        stop_mocks()


def fatal_case(workers):
    m = Mock("ev")
    try:
        # an idempotent producer refused its producer id: librdkafka's fatal error
        m.cmd("err 22 31 1")  # InitProducerId -> CLUSTER_AUTHORIZATION_FAILED, once
        conf = "[kafka]\nbroker = [k1]%s/ev?g.enable.idempotence=true&g.linger.ms=1\n" % \
            m.bootstrap
        h = hub_with(conf, workers)
        c = h.client()
        check_eq(ask(c, b"pub:k1|first"), b"pub true nil nil", "publish")
        r = reports(c, 1)[0]
        check_eq((r["msg"], r["status"]), ("first", -1), "failed by the fatal error")
        h.wait_log("kafka: k1: fatal error: ")
        check_eq(ask(c, b"pub:k1|second"), b"pub true nil nil", "publish again")
        r = reports(c, 1)[0]
        check_eq((r["msg"], r["status"], r["offset"]), ("second", 0, 0), "a new producer")
        h.wait_log("kafka: k1: producer made", count=2)
        st = h.ctl_json("stats")
        check_eq((st["kafka_fatal"]["k1"], st["kafka_produced"]["k1"], st["kafka_delivered"]["k1"],
                  st["kafka_failed"]["k1"]), (1, 2, 1, 1), "counters")
        h.stop()
    finally:
        stop_mocks()


suite.case_with("fatal_error_counted_and_producer_made_anew_workers0", fatal_case, 0)
suite.case_with("fatal_error_counted_and_producer_made_anew_workers2", fatal_case, 2)


@suite.case
def control_sends_pipelined_through_a_fatal_error():
    """Two control connections each send 8 `kafka send` requests in one write while the
    producer dies of a fatal error: a reply finished inside librdkafka's report callback used
    to start the connection's next request right there, whose publish dropped the producer
    inside the poll that was serving its reports (a use after free under ASan, the hub gone).
    Every request is answered, the hub serves on, the counters add up."""
    m = Mock("ev")
    try:
        m.cmd("err 22 31 1")  # InitProducerId -> CLUSTER_AUTHORIZATION_FAILED, once
        conf = ("[kafka]\nbroker = [k1]%s/ev?g.enable.idempotence=true&g.linger.ms=50\n" %
                m.bootstrap)
        h = hub_with(conf, 0)
        conns = [Raw(h.ctl_path) for _ in range(2)]
        for k, r in enumerate(conns):
            r.send(b"".join(json.dumps({
                "jsonrpc": "2.0", "id": i, "method": "kafka",
                "params": {"action": "send", "name": "k1", "topic": "ev",
                           "message": "c%d-%d" % (k, i)}}).encode() + b"\n" for i in range(8)))
        for k, r in enumerate(conns):
            answers = [r.answer() for _ in range(8)]
            check_eq(sorted(a["id"] for a in answers), list(range(8)), "connection %d answered" % k)
            for a in answers:
                check(("result" in a and a["result"]["status"] == "delivered") or
                      ("error" in a and "not delivered" in a["error"]["message"]), a)
            r.close()
        check(h.proc.poll() is None, "the hub serves on")
        st = h.ctl_json("stats")
        produced, delivered, failed = (st["kafka_produced"]["k1"], st["kafka_delivered"]["k1"],
                                       st["kafka_failed"]["k1"])
        check_eq((produced, delivered + failed), (16, 16), "counters")
        check_eq(st["kafka_fatal"]["k1"], 1, "one fatal error")
        h.stop()
    finally:
        stop_mocks()


if __name__ == "__main__":
    try:
        suite.run()
    finally:
        stop_mocks()
