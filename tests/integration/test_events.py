#!/usr/bin/python3
"""The event interface (OpenSIPS event_stream): subscriptions from the config, from Lua and
from evhubctl (with expiry); JSON-RPC 2.0 notifications to a real TCP server (method from the
URI or the event's name, params object/array/absent, event_param); reliable mode (replies
matched by id, error replies, a server that never answers, replies split or joined); a server
down at start and one that closes mid-stream; a full queue; names resolved off the loop and
IPv6; evapi:TAG subscribers; the hub's own events; SIGTERM with events in flight; counters;
workers 0 and 2."""

import json
import os
import re
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (TIMEOUT, Hub, Suite, check, check_eq, pump, request,  # noqa: E402
                           run_once, wait_for, wait_frames)
from jsonrpc_server import JsonRpcServer  # noqa: E402

suite = Suite("events")

# "cmd:args" frames. Reports of raises with a report function come back as "report JSON".
SCRIPT = r'''
local function split(rest)
    local ev, p = rest:match("^(%S+)%s*(.*)$")
    local params = nil
    if p ~= "" then params = json.decode(p) end
    return ev, params
end
@TOP@
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    if cmd == "raise" then                -- raise:EVENT [PARAMS_JSON]
        local ev, params = split(rest)
        local ok, err = evapi.raise(ev, params)
        conn:send("raised " .. tostring(ok) .. " " .. tostring(err))
    elseif cmd == "raiser" then           -- as raise, each report sent back
        local ev, params = split(rest)
        local ok, err = evapi.raise(ev, params, function(r)
            conn:send("report " .. json.encode(r))
        end)
        conn:send("raised " .. tostring(ok) .. " " .. tostring(err))
    elseif cmd == "many" then             -- many:N EVENT: N raises, each report logged
        local n, ev = rest:match("^(%d+) (%S+)$")
        for i = 1, tonumber(n) do
            evapi.raise(ev, {i = i}, function(r)
                log.info("report " .. r.event .. " status=" .. r.status .. " error=" ..
                         tostring(r.error))
            end)
        end
        conn:send("many done")
    elseif cmd == "sub" then              -- sub:EVENT SOCKET [EXPIRE_S]
        local ev, sock, exp = rest:match("^(%S+) (%S+) ?(%d*)$")
        local ok, a, b = pcall(evapi.subscribe, ev, sock, tonumber(exp))
        conn:send("sub " .. tostring(ok) .. " " .. tostring(a) .. " " .. tostring(b))
    elseif cmd == "unsub" then            -- unsub:EVENT SOCKET
        local ev, sock = rest:match("^(%S+) (%S+)$")
        local ok, a, b = pcall(evapi.unsubscribe, ev, sock)
        conn:send("unsub " .. tostring(ok) .. " " .. tostring(a) .. " " .. tostring(b))
    elseif cmd == "big" then              -- big:N SIZE EVENT: N raises of SIZE-byte strings
        local n, size, ev = rest:match("^(%d+) (%d+) (%S+)$")
        for i = 1, tonumber(n) do
            evapi.raise(ev, {i = i, s = string.rep(string.char(97 + i % 26), tonumber(size))})
        end
        conn:send("big done")
    elseif cmd == "stat" then             -- stat:KEY: one entry of evapi.stats()
        conn:send("stat " .. tostring(evapi.stats()[rest]))
    elseif cmd == "tag" then
        conn:set_tag(rest)
        conn:send("tagged")
    elseif cmd == "echo" then
        conn:send(rest)
    end
end)
'''


def script(top=""):
    return SCRIPT.replace("@TOP@", top)


def hub(workers=0, tcp=None, subscribe=(), top="", evapi=None, log_level="info"):
    """A hub with [tcp] keys and [events] subscribe rows."""
    extra = ""
    if tcp:
        extra += "[tcp]\n" + "".join("%s = %s\n" % kv for kv in tcp.items()) + "\n"
    if subscribe:
        extra += "[events]\n" + "".join("subscribe = %s\n" % s for s in subscribe) + "\n"
    ev = {"workers": workers}
    ev.update(evapi or {})
    return Hub(script=script(top), evapi=ev, extra=extra, log={"level": log_level}).start()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def reports(client, n, what="reports"):
    """Wait for n "report" frames on client; returns them decoded (other frames stay)."""
    pump([client], lambda: sum(f.startswith(b"report ") for f in client.frames) >= n,
         what="%d %s" % (n, what))
    out = [json.loads(f[7:]) for f in client.frames if f.startswith(b"report ")]
    client.frames = [f for f in client.frames if not f.startswith(b"report ")]
    return out


def raise_ok(client, line):
    """Send a raise command and wait for its answer; reports arriving meanwhile stay."""
    client.send(line)
    pump([client], lambda: any(f.startswith(b"raised ") for f in client.frames),
         what="the answer to " + line)
    i = [j for j, f in enumerate(client.frames) if f.startswith(b"raised ")][0]
    check_eq(client.frames.pop(i), b"raised true nil", "answer to " + line)


def ctl_stats(h):
    return h.ctl_json("stats")


def by_method(docs):
    out = {}
    for d in docs:
        out.setdefault(d["method"], []).append(d)
    return out


# ---------------------------------------------------------------------------------------------
# notifications


def notifications_case(workers):
    srv = JsonRpcServer()
    h = hub(workers, subscribe=[
        "E_A %s" % srv.uri("m1"),                        # method from the URI
        "E_A %s" % srv.uri(),                            # method = the event's name
        "E_B %s" % srv.uri(query="event_param=ev"),      # the event's name in params
    ])
    c = h.client()
    raise_ok(c, 'raise:E_A {"x":1}')
    raise_ok(c, 'raise:E_A [1,"two"]')
    raise_ok(c, "raise:E_A")
    raise_ok(c, 'raise:E_B {"y":2}')
    raise_ok(c, "raise:E_B [3]")
    raise_ok(c, "raise:E_B")
    raise_ok(c, "raise:E_NOBODY [1]")  # no subscriber: not an error
    docs = srv.wait_docs(9)
    for d in docs:
        check_eq(d.get("jsonrpc"), "2.0", "jsonrpc member")
        check("id" not in d, "a notification carries no id: %r" % d)
    m = by_method(docs)
    check_eq(sorted(m), ["E_A", "E_B", "m1"], "methods")
    want_a = [{"x": 1}, [1, "two"], None]
    check_eq([d.get("params") for d in m["m1"]], want_a, "params via tcp:.../m1")
    check_eq([d.get("params") for d in m["E_A"]], want_a, "params via tcp: (event name)")
    check("params" not in m["E_A"][2], "no params member when raised without params")
    check_eq([d["params"] for d in m["E_B"]],
             [{"ev": "E_B", "y": 2}, ["E_B", 3], {"ev": "E_B"}], "event_param added")
    # one document per line on the wire, one connection per socket URI
    wire = b"".join(chunk for _, chunk in srv.raw)
    lines = wire.split(b"\n")
    check_eq(lines[-1], b"", "the wire ends with a newline")
    check_eq(len(lines) - 1, 9, "one line per document")
    check_eq(srv.connections, 3, "one connection per socket")
    s = ctl_stats(h)
    check_eq(s["events_delivered"].get(srv.uri("m1")), 3, "delivered counter of .../m1")
    check_eq(s["events_raised"].get(srv.uri(query="event_param=ev")), 3, "raised counter")
    check_eq(s["events_failed"].get(srv.uri()), 0, "failed counter")
    subs = h.ctl_json("subscriptions")["subscriptions"]
    check_eq([(x["event"], x["source"], x["state"], x["delivered"], x["expires"])
              for x in subs],
             [("E_A", "config", "connected", 3, None)] * 2 + [
                 ("E_B", "config", "connected", 3, None)], "listing")
    srv.stop()


suite.case_with("notifications_workers0", notifications_case, 0)
suite.case_with("notifications_workers2", notifications_case, 2)


@suite.case
def event_param_from_tcp_section():
    srv = JsonRpcServer()
    h = hub(tcp={"event_param": "opensips_event"},
            subscribe=["E_PIKE_BLOCKED %s" % srv.uri("block_ip"),
                       "E_PIKE_BLOCKED %s" % srv.uri("plain", "event_param=")])
    c = h.client()
    raise_ok(c, 'raise:E_PIKE_BLOCKED {"ip":"192.168.2.11"}')
    m = by_method(srv.wait_docs(2))
    check_eq(m["block_ip"][0]["params"], {"opensips_event": "E_PIKE_BLOCKED",
                                          "ip": "192.168.2.11"}, "seed example 1.7")
    check_eq(m["plain"][0]["params"], {"ip": "192.168.2.11"}, "event_param= turns it off")
    srv.stop()


@suite.case
def raise_from_evhubctl():
    srv = JsonRpcServer()
    h = hub(subscribe=["E_CTL %s" % srv.uri()])
    r = h.ctl_json("raise", "E_CTL", '{"k":[1,2]}')
    check_eq(r, {"subscribers": 1}, "raise answer")
    check_eq(srv.wait_docs(1)[0]["params"], {"k": [1, 2]}, "params")
    rc, out, err = h.ctl("raise", "E_CTL", "not json")
    check(rc != 0 and "JSON" in err + out, "bad params refused: %r %r" % (out, err))
    rc, out, err = h.ctl("raise", "E_CTL", "42")
    check(rc != 0 and "object" in err + out, "scalar params refused: %r %r" % (out, err))
    rc, out, err = h.ctl("raise", "bad name!", "{}")
    check(rc != 0 and "event name" in err + out, "bad event name refused: %r" % (err,))
    srv.stop()


# ---------------------------------------------------------------------------------------------
# reliable mode


def reliable_case(workers, split=False, joined=False):
    srv = JsonRpcServer(mode="reverse", reverse_batch=3, split_replies=split,
                        joined_replies=joined)
    h = hub(workers, tcp={"reliable_mode": "yes"}, subscribe=["E_R %s" % srv.uri("rel")])
    c = h.client()
    for i in range(6):
        raise_ok(c, 'raiser:E_R {"n":%d}' % i)
    rs = reports(c, 6)
    docs = srv.wait_docs(6)
    ids = [d["id"] for d in docs]
    check(all(isinstance(i, int) for i in ids) and len(set(ids)) == 6, "unique ids: %r" % ids)
    check_eq(sorted(d["params"]["n"] for d in docs), list(range(6)), "every request")
    check_eq([(r["event"], r["socket"], r["status"]) for r in rs],
             [("E_R", srv.uri("rel"), 0)] * 6, "reports")
    check("error" not in rs[0], "no error member on success")
    s = ctl_stats(h)
    check_eq(s["events_delivered"][srv.uri("rel")], 6, "delivered")
    check_eq(s["events_queued"][srv.uri("rel")], 0, "nothing in flight")
    srv.stop()


suite.case_with("reliable_replies_by_id_workers0", reliable_case, 0)
suite.case_with("reliable_replies_by_id_workers2", reliable_case, 2)
suite.case_with("reliable_replies_split_bytewise", reliable_case, 0, split=True)
suite.case_with("reliable_replies_joined", reliable_case, 0, joined=True)


@suite.case
def reliable_error_reply_fails():
    srv = JsonRpcServer(mode="error")
    uri = srv.uri(query="reliable=1")
    h = hub(subscribe=["E_ERR %s" % uri])
    c = h.client()
    raise_ok(c, "raiser:E_ERR [1]")
    r = reports(c, 1)[0]
    check_eq((r["status"], r["socket"], r["more"]), (-1, uri, False), "report")
    check("refused" in r["error"], "the error reply's message: %r" % r)
    s = ctl_stats(h)
    check_eq((s["events_failed"][uri], s["events_delivered"][uri]), (1, 0), "counters")
    sub = h.ctl_json("subscriptions")["subscriptions"][0]
    check_eq((sub["delivered"], sub["failed"]), (0, 1), "per subscription")
    srv.stop()


@suite.case
def reliable_no_answer_times_out():
    srv = JsonRpcServer(mode="none")
    uri = srv.uri("slow", "reliable=1&timeout=300")
    h = hub(subscribe=["E_T %s" % uri])
    c = h.client()
    for i in range(3):
        raise_ok(c, "raiser:E_T [%d]" % i)
    rs = reports(c, 3)
    check_eq([r["status"] for r in rs], [-1] * 3, "statuses")
    check(all("timeout" in r["error"] for r in rs), "timeouts: %r" % rs)
    check_eq(len(srv.wait_docs(3)), 3, "the requests were sent")
    check_eq(ctl_stats(h)["events_failed"][uri], 3, "failed counter")
    srv.stop()


@suite.case
def reliable_unknown_id_ignored_and_garbage_drops():
    srv = JsonRpcServer(mode=lambda d: {"jsonrpc": "2.0", "result": 1, "id": d["id"] + 1000})
    uri = srv.uri(query="reliable=1&timeout=300")
    h = hub(subscribe=["E_U %s" % uri])
    c = h.client()
    raise_ok(c, "raiser:E_U [1]")
    r = reports(c, 1)[0]
    check("timeout" in r["error"], "a reply to another id settles nothing: %r" % r)
    check_eq(srv.connections, 1, "the connection stays")
    srv.mode = lambda d: b"this is not json\n"
    raise_ok(c, "raiser:E_U [2]")
    r = reports(c, 1)[0]
    check("connection lost" in r["error"] and "not JSON" in r["error"], "dropped: %r" % r)
    srv.mode = "result"
    raise_ok(c, "raiser:E_U [3]")
    check_eq(reports(c, 1)[0]["status"], 0, "delivered over a new connection")
    check_eq(srv.connections, 2, "reconnected once")
    srv.stop()


def several_subscribers_case(workers):
    a = JsonRpcServer(mode="result")
    b = JsonRpcServer(mode="error")
    ua, ub = a.uri(query="reliable=1"), b.uri(query="reliable=1")
    h = hub(workers, subscribe=["E_M %s" % ua, "E_M %s" % ub])
    c = h.client()
    raise_ok(c, "raiser:E_M {}")
    rs = reports(c, 2)
    check_eq(sorted((r["socket"], r["status"]) for r in rs), sorted([(ua, 0), (ub, -1)]),
             "one report per subscriber")
    check_eq([r["more"] for r in rs], [True, False], "more on all but the last")
    raise_ok(c, "raiser:E_NONE {}")
    r = reports(c, 1)[0]
    check_eq((r["event"], r["status"], r["more"], "socket" in r), ("E_NONE", -1, False, False),
             "no subscriber: one report")
    a.stop()
    b.stop()


suite.case_with("several_subscribers_report_more_workers0", several_subscribers_case, 0)
suite.case_with("several_subscribers_report_more_workers2", several_subscribers_case, 2)


# ---------------------------------------------------------------------------------------------
# connections


@suite.case
def server_down_at_start_then_up():
    port = free_port()
    srv = JsonRpcServer(port=port, listen=False)
    uri = srv.uri("late")
    h = hub(subscribe=["E_L %s" % uri])
    c = h.client()
    for i in range(3):
        raise_ok(c, "raiser:E_L [%d]" % i)
    h.wait_log("cannot connect")
    check_eq(ctl_stats(h)["events_queued"][uri], 3, "queued while down")
    srv.start()
    docs = srv.wait_docs(3)
    check_eq([d["params"] for d in docs], [[0], [1], [2]], "delivered in order after reconnect")
    rs = reports(c, 3)
    check_eq([r["status"] for r in rs], [0, 0, 0], "reports")
    h.wait_log("%s: connected" % uri)
    srv.stop()


@suite.case
def server_closes_mid_stream():
    srv = JsonRpcServer(mode="result", close_after=2)
    uri = srv.uri(query="reliable=1")
    h = hub(subscribe=["E_C %s" % uri])
    c = h.client()
    for i in range(5):
        raise_ok(c, "raiser:E_C [%d]" % i)
    rs = reports(c, 5)
    ok = [r for r in rs if r["status"] == 0]
    bad = [r for r in rs if r["status"] != 0]
    check(len(ok) >= 2, "the two answered ones delivered: %r" % rs)
    check(all("connection lost" in r["error"] for r in bad), "the rest failed: %r" % bad)
    # the next ones go over a new connection
    srv.close_after = None
    for i in range(2):
        raise_ok(c, "raiser:E_C [%d]" % (10 + i))
    check_eq([r["status"] for r in reports(c, 2)], [0, 0], "delivered after the reconnect")
    check(srv.connections >= 2, "reconnected: %d" % srv.connections)
    s = ctl_stats(h)
    check_eq(s["events_delivered"][uri] + s["events_failed"][uri], 7, "every event counted")
    srv.stop()


@suite.case
def queue_full_fails_at_once():
    port = free_port()
    uri = "tcp:127.0.0.1:%d?queue=3" % port
    h = hub(subscribe=["E_Q %s" % uri])
    c = h.client()
    for i in range(5):
        raise_ok(c, "raiser:E_Q [%d]" % i)
    rs = reports(c, 2)
    check(all(r["status"] == -1 and "queue full" in r["error"] for r in rs), "full: %r" % rs)
    check_eq(ctl_stats(h)["events_queued"][uri], 3, "three queued")
    check_eq(h.ctl_json("unsubscribe", "E_Q", uri), "unsubscribed", "unsubscribe")
    rs = reports(c, 3)
    check(all("unsubscribed" in r["error"] for r in rs), "queued ones failed: %r" % rs)


@suite.case
def large_events_written_whole():
    """Documents far larger than a socket buffer: partial writes resume where they stopped."""
    srv = JsonRpcServer()
    uri = srv.uri("big")
    h = hub(subscribe=["E_BIG %s" % uri])
    c = h.client()
    n, size = 24, 150000
    check_eq(request(c, "big:%d %d E_BIG" % (n, size)), b"big done", "raised")
    docs = srv.wait_docs(n)
    check_eq([d["params"]["i"] for d in docs], list(range(1, n + 1)), "in order")
    for d in docs:
        i = d["params"]["i"]
        check(d["params"]["s"] == chr(97 + i % 26) * size, "document %d intact" % i)
    check_eq(ctl_stats(h)["events_delivered"][uri], n, "delivered")
    srv.stop()


@suite.case
def connect_timeout():
    """A listener whose accept queue is full drops SYNs: the connect hangs until timeout."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # the queue's one place
    uri = "tcp:127.0.0.1:%d?timeout=300" % port
    h = hub(subscribe=["E_CT %s" % uri])
    c = h.client()
    raise_ok(c, "raiser:E_CT [1]")
    h.wait_log("cannot connect: connect timeout (300 ms)")
    check_eq(ctl_stats(h)["events_queued"][uri], 1, "kept for the next attempt")
    h.ctl_json("unsubscribe", "E_CT", uri)
    check("unsubscribed" in reports(c, 1)[0]["error"], "reported when let go")
    filler.close()
    ls.close()


@suite.case
def unresolvable_name_retried_and_reported():
    uri = "tcp:no-such-host.invalid:80?reliable=1"
    h = hub(subscribe=["E_NX %s" % uri])
    c = h.client()
    raise_ok(c, "raiser:E_NX [1]")
    h.wait_log(re.compile(r"tcp: tcp:no-such-host\.invalid:80\?reliable=1: cannot connect: "))
    check_eq(ctl_stats(h)["events_queued"][uri], 1, "kept while the name does not resolve")
    check_eq(h.ctl_json("subscriptions")["subscriptions"][0]["state"] in ("down", "resolving"),
             True, "state")
    h.ctl_json("unsubscribe", "E_NX", uri)
    r = reports(c, 1)[0]
    check("unsubscribed" in r["error"], "failed when let go: %r" % r)


@suite.case
def host_name_resolved():
    srv = JsonRpcServer()
    uri = "tcp:localhost:%d/named" % srv.port
    h = hub(subscribe=["E_N %s" % uri])
    c = h.client()
    raise_ok(c, "raise:E_N [1]")
    check_eq(srv.wait_docs(1)[0]["method"], "named", "delivered through a name")
    srv.stop()


@suite.case
def ipv6_socket():
    try:
        srv = JsonRpcServer(host="::1")
    except OSError:
        print("    (no IPv6 loopback here: skipped)")
        return
    h = hub(subscribe=["E_6 %s" % srv.uri("six")])
    c = h.client()
    raise_ok(c, "raise:E_6 [6]")
    check_eq(srv.wait_docs(1)[0]["params"], [6], "over [::1]")
    srv.stop()


# ---------------------------------------------------------------------------------------------
# subscriptions


@suite.case
def evhubctl_subscriptions_and_expiry():
    srv = JsonRpcServer()
    h = hub()
    uri = srv.uri("viactl")
    check_eq(h.ctl_json("subscriptions"), {"subscriptions": []}, "empty at start")
    check_eq(h.ctl_json("subscribe", "E_X", uri), "subscribed", "subscribe")
    rc, out, err = h.ctl("subscriptions")
    check(rc == 0 and "E_X" in out and "control" in out, "table: %r" % out)
    c = h.client()
    raise_ok(c, "raise:E_X [1]")
    srv.wait_docs(1)
    check_eq(h.ctl_json("unsubscribe", "E_X", uri), "unsubscribed", "unsubscribe")
    rc, out, err = h.ctl("unsubscribe", "E_X", uri)
    check(rc != 0 and "no subscription" in err + out, "second unsubscribe: %r" % err)
    # with --expire: listed with its seconds left, then gone by itself
    check_eq(h.ctl_json("subscribe", "E_Y", uri, "--expire", "2"), "subscribed", "expire")
    sub = h.ctl_json("subscriptions")["subscriptions"][0]
    check(sub["event"] == "E_Y" and sub["expires"] in (1, 2), "expires listed: %r" % sub)
    wait_for(lambda: h.ctl_json("subscriptions")["subscriptions"], lambda v: v == [],
             "the subscription to expire")
    h.wait_log("expired")
    raise_ok(c, "raise:E_Y [2]")
    raise_ok(c, "raise:E_X [3]")
    check_eq(h.ctl_json("subscribe", "E_Z", uri), "subscribed", "another")
    raise_ok(c, "raise:E_Z [4]")
    docs = srv.wait_docs(2)
    check_eq([d["params"] for d in docs], [[1], [4]], "nothing after unsubscribe or expiry")
    # bad URIs are errors with the reason
    for bad, why in [("tcp:127.0.0.1", "tcp:HOST:PORT"), ("tcp:127.0.0.1:0", "port"),
                     ("tcp:[::1:80", "]"), ("udp:1.2.3.4:5", "unknown socket"),
                     ("tcp:h:1?nope=1", "unknown option"), ("tcp:h:1/bad method", "method")]:
        rc, out, err = h.ctl("subscribe", "E_X", bad)
        check(rc != 0 and why in err, "%s refused with %r: %r" % (bad, why, err))
    srv.stop()


def lua_subscribe_case(workers):
    srv = JsonRpcServer()
    top = 'evapi.subscribe("E_TOP", "%s")\n' % srv.uri("top")
    h = hub(workers, top=top)
    c = h.client()
    uri = srv.uri("lua")
    check_eq(request(c, "sub:E_L %s" % uri), b"sub true true nil", "subscribe")
    raise_ok(c, "raise:E_L [1]")
    raise_ok(c, "raise:E_TOP [0]")
    check_eq(sorted(d["method"] for d in srv.wait_docs(2)), ["lua", "top"], "both delivered")
    subs = h.ctl_json("subscriptions")["subscriptions"]
    check_eq(sorted((x["event"], x["source"]) for x in subs),
             [("E_L", "script"), ("E_TOP", "script")], "listed as the script's")
    check_eq(request(c, "unsub:E_L %s" % uri), b"unsub true true nil", "unsubscribe")
    r = request(c, "sub:E_L tcp:nowhere")
    check(r.startswith(b"sub false") and b"tcp:HOST:PORT" in r, "bad URI raises: %r" % r)
    r = request(c, "sub:E_L %s 1" % uri)
    check_eq(r, b"sub true true nil", "with expiry")
    wait_for(lambda: len(h.ctl_json("subscriptions")["subscriptions"]), lambda n: n == 1,
             "the script's subscription to expire")
    srv.stop()


suite.case_with("lua_subscribe_unsubscribe_workers0", lua_subscribe_case, 0)
suite.case_with("lua_subscribe_unsubscribe_workers2", lua_subscribe_case, 2)


def top_level_subscribe_case(workers):
    """A subscription made by the script's top level exists once the hub runs, without any
    client traffic to carry it along (and one per hub, whatever the number of workers)."""
    srv = JsonRpcServer()
    top = 'evapi.subscribe("E_TL", "%s", 100)\n' % srv.uri("tl")
    h = hub(workers, top=top)
    subs = wait_for(lambda: h.ctl_json("subscriptions")["subscriptions"], lambda v: v != [],
                    "the top level's subscription")
    check_eq([(x["event"], x["source"]) for x in subs], [("E_TL", "script")], "listed once")
    h.ctl_json("raise", "E_TL", "[1]")
    check_eq(srv.wait_docs(1)[0]["method"], "tl", "delivered")
    srv.stop()


suite.case_with("top_level_subscribe_workers0", top_level_subscribe_case, 0)
suite.case_with("top_level_subscribe_workers2", top_level_subscribe_case, 2)


@suite.case
def resubscribe_renews_expiry():
    srv = JsonRpcServer()
    h = hub()
    uri = srv.uri()
    check_eq(h.ctl_json("subscribe", "E_RN", uri, "--expire", "2"), "subscribed", "first")
    check_eq(h.ctl_json("subscribe", "E_RN", uri, "--expire", "300"), "subscribed", "again")
    subs = h.ctl_json("subscriptions")["subscriptions"]
    check_eq(len(subs), 1, "still one subscription")
    check(subs[0]["expires"] > 200, "renewed: %r" % subs[0])
    check_eq(h.ctl_json("subscribe", "E_RN", uri), "subscribed", "without expiry")
    check_eq(h.ctl_json("subscriptions")["subscriptions"][0]["expires"], None, "now never")
    srv.stop()


@suite.case
def shared_socket_one_connection():
    srv = JsonRpcServer(mode="result")
    uri = srv.uri("shared", "reliable=1")
    h = hub(subscribe=["E_S1 %s" % uri, "E_S2 %s" % uri])
    c = h.client()
    raise_ok(c, "raiser:E_S1 [1]")
    raise_ok(c, "raiser:E_S2 [2]")
    check_eq([r["status"] for r in reports(c, 2)], [0, 0], "both delivered")
    check_eq(h.ctl_json("unsubscribe", "E_S1", uri), "unsubscribed", "one let go")
    raise_ok(c, "raiser:E_S2 [3]")
    check_eq(reports(c, 1)[0]["status"], 0, "the other still delivers")
    check_eq(srv.connections, 1, "one connection for the socket, kept")
    s = ctl_stats(h)
    check_eq((s["events_raised"][uri], s["events_delivered"][uri]), (3, 3), "counters kept")
    srv.stop()


@suite.case
def reliable_down_then_up():
    port = free_port()
    srv = JsonRpcServer(port=port, mode="result", listen=False)
    uri = srv.uri(query="reliable=1&timeout=2000")
    h = hub(subscribe=["E_DU %s" % uri])
    c = h.client()
    for i in range(3):
        raise_ok(c, "raiser:E_DU [%d]" % i)
    h.wait_log("cannot connect")
    srv.start()
    rs = reports(c, 3)
    check_eq([r["status"] for r in rs], [0, 0, 0], "answered after the reconnect")
    srv.stop()


@suite.case
def empty_params_with_event_param():
    srv = JsonRpcServer()
    h = hub(tcp={"event_param": "ev"}, subscribe=["E_EP %s" % srv.uri()])
    for p in ["{}", "[]", '{"a":"\\u00e9\\n"}']:
        check_eq(h.ctl_json("raise", "E_EP", p), {"subscribers": 1}, "raise " + p)
    check_eq(h.ctl_json("raise", "E_EP"), {"subscribers": 1}, "raise without params")
    docs = srv.wait_docs(4)
    check_eq([d["params"] for d in docs],
             [{"ev": "E_EP"}, ["E_EP"], {"ev": "E_EP", "a": "\u00e9\n"}, {"ev": "E_EP"}],
             "event_param with empty and escaped params")
    srv.stop()


@suite.case
def prometheus_labels():
    srv = JsonRpcServer()
    uri = srv.uri("p")
    h = hub(subscribe=["E_P %s" % uri])
    h.ctl_json("raise", "E_P", "[1]")
    srv.wait_docs(1)
    text = wait_for(lambda: h.ctl_json("stats", "--prometheus"),
                    lambda t: ('socket="%s"} 1' % uri) in t, "a labelled delivered sample")
    for name in ["events_raised", "events_delivered", "events_failed", "events_queued"]:
        check(("%s" % name) in text and ('{socket="%s"}' % uri) in text, name + " labelled")
    c = h.client()
    check_eq(request(c, 'stat:events_delivered{socket="%s"}' % uri), b"stat 1",
             "evapi.stats() keyed name{label}")
    check_eq(request(c, "stat:events_raises"), b"stat 1", "raises in evapi.stats()")
    srv.stop()


@suite.case
def config_bad_socket_names_the_line():
    h = Hub(script=script(), extra="[events]\nsubscribe = E_OK tcp:127.0.0.1:9\n"
            "subscribe = E_BAD tcp:127.0.0.1:99999\n")
    rc, out = run_once(["-c", h.conf, "-f"])
    check(rc != 0, "refused to start")
    check("evhub.conf:" in out and "port" in out, "file:line and reason: %r" % out)
    line = [i + 1 for i, l in enumerate(h.conf_text.splitlines()) if "E_BAD" in l][0]
    check(("evhub.conf:%d:" % line) in out, "line %d named: %r" % (line, out))


@suite.case
def config_expiry_is_ignored():
    srv = JsonRpcServer()
    h = hub(subscribe=["E_K %s 1" % srv.uri()])
    h.wait_log("never expires")
    sub = h.ctl_json("subscriptions")["subscriptions"][0]
    check_eq((sub["source"], sub["expires"]), ("config", None), "config: never expires")
    srv.stop()


# ---------------------------------------------------------------------------------------------
# evapi: and hub events


@suite.case
def evapi_tag_subscribers():
    h = hub()
    watcher, other = h.client(name="watcher"), h.client(name="other")
    check_eq(request(watcher, "tag:watch"), b"tagged", "tag")
    check_eq(h.ctl_json("subscribe", "E_W", "evapi:watch"), "subscribed", "subscribe")
    c = h.client()
    raise_ok(c, 'raiser:E_W {"a":1}')
    wait_frames([watcher], 1)
    check_eq(json.loads(watcher.frames.pop(0)),
             {"jsonrpc": "2.0", "method": "E_W", "params": {"a": 1}}, "the netstring")
    check_eq(reports(c, 1)[0]["status"], 0, "reached one client")
    check_eq(h.ctl_json("subscribe", "E_V", "evapi:nobody"), "subscribed", "no such tag")
    raise_ok(c, "raiser:E_V [1]")
    r = reports(c, 1)[0]
    check_eq(r["status"], -1, "no client with the tag is a failure")
    check_eq(other.frames, [], "untagged clients get nothing")


@suite.case
def hub_connection_events():
    srv = JsonRpcServer()
    h = hub(subscribe=["E_EVAPI_CONNECTION_NEW %s" % srv.uri(),
                       "E_EVAPI_CONNECTION_CLOSED %s" % srv.uri()])
    c = h.client()
    check_eq(request(c, "tag:t1"), b"tagged", "tag")
    c.close()
    docs = srv.wait_docs(2)
    new, closed = docs
    check_eq(new["method"], "E_EVAPI_CONNECTION_NEW", "first")
    check_eq(closed["method"], "E_EVAPI_CONNECTION_CLOSED", "second")
    for d in docs:
        p = d["params"]
        check_eq((p["addr"], p["port"]), ("127.0.0.1", c.port), "addr and port")
        check(isinstance(p["id"], int), "id: %r" % p)
    check_eq(closed["params"]["tag"], "t1", "tag at close")
    check("reason" in closed["params"], "reason: %r" % closed)
    srv.stop()


# ---------------------------------------------------------------------------------------------
# shutdown


def sigterm_case(workers):
    srv = JsonRpcServer(mode="none")
    uri = srv.uri(query="reliable=1&timeout=30000")
    n = 20
    h = hub(workers, subscribe=["E_S %s" % uri], evapi={"shutdown_timeout": 300})
    c = h.client()
    check_eq(request(c, "many:%d E_S" % n), b"many done", "raised")
    srv.wait_docs(n)
    check_eq(ctl_stats(h)["events_queued"][uri], n, "all in flight")
    h.signal(signal.SIGTERM)
    rc = h.wait_exit()
    check_eq(rc, 0, "exit status")
    log = h.log()
    got = log.count("report E_S status=-1")
    check_eq(got, n, "every in-flight event reported failed (log:\n%s)" % log[-2000:])
    srv.stop()


suite.case_with("sigterm_in_flight_workers0", sigterm_case, 0)
suite.case_with("sigterm_in_flight_workers2", sigterm_case, 2)


@suite.case
def sigterm_with_server_down():
    """Events queued for a server that never came up: held up to shutdown_timeout, then each
    reported failed."""
    uri = "tcp:127.0.0.1:%d/never" % free_port()
    n = 5
    h = hub(2, subscribe=["E_SD %s" % uri], evapi={"shutdown_timeout": 300})
    c = h.client()
    check_eq(request(c, "many:%d E_SD" % n), b"many done", "raised")
    h.wait_log("cannot connect")
    h.signal(signal.SIGTERM)
    check_eq(h.wait_exit(), 0, "exit status")
    log = h.log()
    check_eq(log.count("report E_SD status=-1 error=the hub stopped before it was delivered"),
             n, "every queued event reported failed (log:\n%s)" % log[-2000:])


@suite.case
def hub_events_to_evapi_watchers():
    h = hub()
    watcher = h.client(name="watcher")
    check_eq(request(watcher, "tag:watch"), b"tagged", "tag")
    h.ctl_json("subscribe", "E_EVAPI_CONNECTION_NEW", "evapi:watch")
    h.ctl_json("subscribe", "E_EVAPI_CONNECTION_CLOSED", "evapi:watch")
    c = h.client()
    wait_frames([watcher], 1)
    c.close()
    wait_frames([watcher], 2)
    new, closed = [json.loads(f) for f in watcher.take()]
    check_eq((new["method"], new["params"]["port"]), ("E_EVAPI_CONNECTION_NEW", c.port), "new")
    check_eq((closed["method"], closed["params"]["port"]), ("E_EVAPI_CONNECTION_CLOSED", c.port),
             "closed")


if __name__ == "__main__":
    suite.run()
