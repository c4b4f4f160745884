#!/usr/bin/env python3
"""Cluster over NATS (issue 10): three evhub nodes and a real nats-server (or two, routed),
all started here on loopback. Multicast, relay and unicast across nodes, per-tag interest,
ids across nodes, evhubctl cluster, counters; a node killed, the NATS server restarted, a slow
node."""

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from evhub_harness import (Hub, Suite, check, check_eq, pump, request, run_once,  # noqa: E402
                           scaled, wait_eof, wait_for, wait_frames)
from nats_server import (NatsServer, free_port, make_nkey, make_tls, publish,  # noqa: E402
                         stop_all)

suite = Suite("cluster")

SCRIPT = r'''
-- cluster test script: frames are "cmd:args" commands
evapi.on("message", function(conn, msg)
    local cmd, rest = msg:match("^(%a+):?(.*)$")
    local function two(s) return s:match("^([^:]*):(.*)$") end
    if cmd == "info" then
        conn:send(json.encode({id = conn.id, node = cluster.node()}))
    elseif cmd == "tag" then
        conn:set_tag(rest)
        conn:send("tagged " .. rest)
    elseif cmd == "mc" then
        local t, d = two(rest)
        evapi.multicast(d, t)
    elseif cmd == "rmc" then
        local t, d = two(rest)
        conn:send("rmc " .. tostring(evapi.multicast(d, t)))
    elseif cmd == "lmc" then
        local t, d = two(rest)
        evapi.multicast(d, t, {scope = "local"})
    elseif cmd == "uc" then
        local t, d = two(rest)
        evapi.unicast(d, t)
    elseif cmd == "relay" then
        evapi.relay(rest)
    elseif cmd == "lrelay" then
        evapi.relay(rest, {scope = "local"})
    elseif cmd == "sendto" then
        local id, d = two(rest)
        local ok, err = evapi.send(math.tointeger(tonumber(id)), d)
        conn:send("sendto " .. tostring(ok) .. " " .. tostring(err))
    elseif cmd == "tagid" then
        local id, t = two(rest)
        conn:send("tagid " .. tostring(evapi.set_tag(math.tointeger(tonumber(id)), t)))
    elseif cmd == "closeid" then
        conn:send("closeid " .. tostring(evapi.close(math.tointeger(tonumber(rest)), "bye")))
    elseif cmd == "nodeof" then
        conn:send("nodeof " .. tostring(cluster.node_of(math.tointeger(tonumber(rest)))))
    elseif cmd == "stat" then
        conn:send(tostring(evapi.stats()[rest]))
    elseif cmd == "echo" then
        conn:send(rest)
    end
end)
'''


# [cluster] script = yes: what other nodes send comes to this handler, which passes it on with
# where it came from; each of its calls stays on this node
SCRIPT_CLUSTER = SCRIPT + r'''
evapi.on("cluster", function(msg, from)
    local label = from.node .. "|" .. from.kind .. "|" .. (from.tag or "") .. "|" .. msg
    if from.kind == "relay" then
        evapi.relay(label)
    elseif from.kind == "multicast" then
        evapi.multicast(label, from.tag)
    elseif from.kind == "unicast" then
        evapi.unicast(label, from.tag)
    elseif from.kind == "send" then
        evapi.send(from.id, label .. "|" .. tostring(from.id))
    end
end)
'''

KEMI_CLUSTER = r'''
function ksr_evapi_event(evname)
    local pv = KSR.pv.get
    if evname == "evapi:message-received" then
        local msg = pv("$evapi(msg)")
        if msg:sub(1, 4) == "tag:" then
            KSR.evapi.set_tag(msg:sub(5))
        elseif msg:sub(1, 3) == "mc:" then
            local t, d = msg:sub(4):match("^([^:]*):(.*)$")
            KSR.evapi.relay_multicast(d, t)
        end
    elseif evname == "evapi:cluster-message" then
        local label = table.concat({pv("$evapi(node)"), pv("$evapi(kind)"),
                                    pv("$evapi(tag)") or "", tostring(pv("$evapi(conidx)")),
                                    pv("$evapi(msg)")}, "|")
        if pv("$evapi(kind)") == "relay" then
            KSR.evapi.relay(label)
        elseif pv("$evapi(kind)") == "send" then
            evapi.send(pv("$evapi(id)"), label .. "|" .. tostring(pv("$evapi(id)")))
        else
            KSR.evapi.relay_multicast(label, pv("$evapi(tag)"))
        end
    end
end
'''


def node(name, servers, workers=0, unicast="local_first", evapi=None, more="", heartbeat=200,
         node_timeout=1000, script=SCRIPT):
    ev = {"workers": workers}
    ev.update(evapi or {})
    extra = ("[cluster]\nnats = %s\nnode = %s\nheartbeat = %d\nnode_timeout = %d\n"
             "unicast = %s\nreconnect_wait = 100\n" % (
                 ",".join(s.url for s in servers), name, heartbeat, node_timeout,
                 unicast)) + more
    return Hub(script, evapi=ev, extra=extra)


def cluster_view(h):
    return h.ctl_json("cluster")


def wait_nodes(hubs, n=None):
    n = len(hubs) - 1 if n is None else n
    for h in hubs:
        wait_for(lambda: cluster_view(h), lambda v: len(v["nodes"]) == n,
                 "%d other nodes seen by %s" % (n, h.conf))


def wait_tag_seen(hubs, tag, holders):
    """Every hub in hubs sees every node named in holders list tag."""
    for h in hubs:
        wait_for(lambda: cluster_view(h),
                 lambda v: all(any(x["node"] == name and tag in x["tags"] for x in v["nodes"])
                               for name in holders if name != v["node"]),
                 "tag %s of %s seen by %s" % (tag, holders, h.conf))


def wait_members(h, tag, want):
    """h's view: node name -> its members of tag, for every name in want (0: not listed)."""
    wait_for(lambda: cluster_view(h),
             lambda v: all(next((x["members"].get(tag, 0) for x in v["nodes"]
                                 if x["node"] == name), 0) == k for name, k in want.items()),
             "members of %s %r as %s sees them" % (tag, want, h.conf))


def start_cluster(servers, names=("A", "B", "C"), workers=0, unicast="local_first",
                  server_of=None, more="", evapi=None, **kw):
    hubs = []
    for i, name in enumerate(names):
        srv = [servers[server_of[i]]] if server_of else servers
        hubs.append(node(name, srv, workers, unicast, evapi=evapi, more=more, **kw).start())
    wait_nodes(hubs)
    return hubs


def stat(h, name, kind=None):
    """A counter from evhubctl stats: per kind, or the sum of its kinds."""
    v = h.ctl_json("stats").get(name, 0)
    if isinstance(v, dict):
        return v.get(kind, 0) if kind else sum(v.values())
    return v


def tag(c, t):
    check_eq(request(c, "tag:" + t), ("tagged " + t).encode(), "tag reply")


def info(c):
    return json.loads(request(c, "info"))


def numbered(frames, prefix):
    return [f for f in frames if f.startswith(prefix)]


def with_servers(fn):
    """Stop the case's nats-servers whatever happens."""
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        finally:
            stop_all()
    run.__name__ = fn.__name__
    return run


# ---- the checks every topology passes ---------------------------------------------------


def check_routing(hubs, workers):
    a, b, c = hubs
    ca = [a.client(name="a%d" % i) for i in range(2)]
    cb = [b.client(name="b%d" % i) for i in range(2)]
    cc = [c.client(name="c%d" % i) for i in range(2)]
    everyone = ca + cb + cc
    for x in everyone:
        info(x)
    # red on a0, b0, b1; C has no red member
    for x in (ca[0], cb[0], cb[1]):
        tag(x, "red")
    tag(cc[0], "blue")
    wait_tag_seen(hubs, "red", ["A", "B"])
    wait_tag_seen(hubs, "blue", ["C"])
    n = scaled(200, 50)
    c_in_before = stat(c, "cluster_in")
    # multicast from a node with members (A) and one without (C), interleaved with relays
    for i in range(n):
        ca[1].send("mc:red:red-a-%04d" % i)
        cc[1].send("mc:red:red-c-%04d" % i)
    ca[1].send("relay:end-a")
    cc[1].send("relay:end-c")
    wait_frames(everyone, [2 * n + 2 if x in (ca[0], cb[0], cb[1]) else 2 for x in everyone])
    for x in (ca[0], cb[0], cb[1]):
        fr = x.take()
        want_a = [("red-a-%04d" % i).encode() for i in range(n)]
        want_c = [("red-c-%04d" % i).encode() for i in range(n)]
        check_eq(numbered(fr, b"red-a-"), want_a, "%s: A's multicasts, each once, in order" % x.name)
        check_eq(numbered(fr, b"red-c-"), want_c, "%s: C's multicasts, each once, in order" % x.name)
        check_eq(sorted(f for f in fr if f.startswith(b"end-")), [b"end-a", b"end-c"],
                 "%s: both relays" % x.name)
    for x in (ca[1], cc[0], cc[1]):
        check_eq(sorted(x.take()), [b"end-a", b"end-c"], "%s: the relays only" % x.name)
    # C has no red member: it received no multicast for red, only the relay from A
    check_eq(stat(c, "cluster_in", "multicast"), 0, "multicasts C took")
    check_eq(stat(c, "cluster_in") - c_in_before, 1, "C took A's relay only")
    check_eq(stat(a, "cluster_out", "multicast"), n, "A published each multicast once")
    check_eq(stat(b, "cluster_in", "multicast"), 2 * n, "B took each multicast once")
    # the same counters in Prometheus' text and in evapi.stats()
    rc, prom, _ = b.ctl("stats", "--prometheus")
    check(rc == 0 and ('evhub_cluster_in_total{kind="multicast"} %d' % (2 * n)) in prom,
          "Prometheus: %r" % prom[:2000])
    check_eq(request(cb[0], 'stat:cluster_in{kind="multicast"}'), str(2 * n).encode(),
             "evapi.stats() on B")
    # scope local: C's blue member only, not across
    tag(ca[1], "blue")
    wait_tag_seen(hubs, "blue", ["A", "C"])
    cc[1].send("lmc:blue:local-only")
    cc[1].send("mc:blue:everywhere")
    wait_frames([cc[0]], 2)
    wait_frames([ca[1]], 1)
    check_eq(cc[0].take(), [b"local-only", b"everywhere"], "blue on C")
    check_eq(ca[1].take(), [b"everywhere"], "blue on A: not the local-scope one")
    # binary-safe payloads across
    blob = bytes(range(256)) * 4
    ca[1].send(b"mc:red:" + blob)
    wait_frames([cb[0]], 1)
    check_eq(cb[0].take(), [blob], "binary payload across nodes")
    wait_frames([ca[0], cb[1]], 1)
    ca[0].take()
    cb[1].take()

    # unicast local_first: no member on A -> exactly one remote member per message
    g = [cb[0], cc[0]]
    for x in g:
        tag(x, "grp")
    wait_tag_seen(hubs, "grp", ["B", "C"])
    m = scaled(60, 20)
    for i in range(m):
        ca[1].send("uc:grp:u-%03d" % i)
    ca[1].send("relay:u-end")
    wait_frames(everyone, 1)
    pump(everyone, lambda: all(b"u-end" in x.frames for x in everyone), what="u-end")
    got = [[f for f in numbered(x.take(), b"u-") if f != b"u-end"] for x in g]
    allgot = sorted(f for fr in got for f in fr)
    check_eq(allgot, sorted(("u-%03d" % i).encode() for i in range(m)),
             "each unicast reached exactly one member")
    # no local member: A rotates over B and C (one member each), in turn
    check_eq([len(fr) for fr in got], [m // 2, m // 2], "local_first's remote rotation")
    for fr in got:
        check_eq(fr, sorted(fr), "order of one node's share")
    for x in everyone:
        x.take()
    # with a local member on the sender's node, local_first keeps them local
    tag(ca[0], "grp")
    for i in range(10):
        ca[1].send("uc:grp:l-%d" % i)
    wait_frames([ca[0]], 10)
    check_eq(ca[0].take(), [("l-%d" % i).encode() for i in range(10)], "local_first local")

    # by id across nodes: send, set_tag, close (script), then tag/close (evhubctl)
    ib = info(cb[1])
    check(ib["node"] == "B" and ib["id"] >> 44 != info(ca[0])["id"] >> 44,
          "ids carry their node: %r" % ib)
    check_eq(request(ca[1], "nodeof:%d" % ib["id"]), b"nodeof B", "cluster.node_of")
    check_eq(request(ca[1], "sendto:%d:direct-hello" % ib["id"]), b"sendto true nil",
             "send to B's id from A")
    wait_frames([cb[1]], 1)
    check_eq(cb[1].take(), [b"direct-hello"], "send by id across nodes")
    check_eq(request(ca[1], "tagid:%d:green" % ib["id"]), b"tagid true", "set_tag by id")
    wait_tag_seen(hubs, "green", ["B"])
    cc[1].send("mc:green:to-green")
    wait_frames([cb[1]], 1)
    check_eq(cb[1].take(), [b"to-green"], "the tag set from A routes on B")
    r = a.ctl_json("tag", ib["id"], "yellow")
    check_eq(r.get("id"), ib["id"], "evhubctl tag across nodes")
    wait_tag_seen(hubs, "yellow", ["B"])
    check_eq(request(ca[1], "closeid:%d" % ib["id"]), b"closeid true", "close by id")
    wait_eof([cb[1]])
    ic = info(cc[1])
    a.ctl_json("close", ic["id"])
    wait_eof([cc[1]])
    # an id of no node known: refused at once on the loop; a worker's send is queued to the
    # loop first (as for a local id), where it fails
    check_eq(request(ca[1], "sendto:%d:x" % (((info(ca[0])["id"] >> 44) + 1) << 44 | 5)),
             b"sendto true nil" if workers else b"sendto nil no such connection",
             "an id of no known node")


@suite.case
@with_servers
def one_server_three_nodes_workers0():
    s = NatsServer().start()
    check_routing(start_cluster([s], workers=0), 0)


@suite.case
@with_servers
def one_server_three_nodes_workers2():
    s = NatsServer().start()
    check_routing(start_cluster([s], workers=2), 2)


@suite.case
@with_servers
def two_routed_servers():
    p1, p2 = free_port(), free_port()
    s1 = NatsServer("s1", cluster_port=p1, routes=[p2]).start()
    s2 = NatsServer("s2", cluster_port=p2, routes=[p1]).start()
    s1.wait_routes(1)
    s2.wait_routes(1)
    # A on s1, B and C on s2: everything crosses the route
    hubs = start_cluster([s1, s2], server_of=[0, 1, 1])
    check_routing(hubs, 0)


@with_servers
def unicast_cluster_policy_spreads(workers):
    """unicast = cluster: round robin over every member of the cluster. A rotates over the
    nodes weighted by their members (A 1, B 2, C 1) and B rotates over its two ([evapi]
    unicast = round_robin): from one publisher each member gets exactly a quarter."""
    s = NatsServer().start()
    hubs = start_cluster([s], unicast="cluster", workers=workers,
                         evapi={"unicast": "round_robin"})
    a, b, c = hubs
    members = [a.client(name="mA"), b.client(name="mB1"), b.client(name="mB2"),
               c.client(name="mC")]
    for x in members:
        tag(x, "pool")
    wait_members(a, "pool", {"B": 2, "C": 1})
    pub = a.client(name="pub")
    n = scaled(400, 120)
    for i in range(n):
        pub.send("uc:pool:p-%04d" % i)
    wait_frames(members, n // 4, others=[pub])
    pub.send("relay:p-end")  # nothing more is on its way to anybody
    wait_frames(members, n // 4 + 1, others=[pub])
    got = [x.take() for x in members]
    for x, fr in zip(members, got):
        check_eq(fr[-1], b"p-end", "%s: the relay last" % x.name)
        check_eq(fr[:-1], sorted(fr[:-1]), "%s: its share in the publisher's order" % x.name)
    check_eq(sorted(f for fr in got for f in fr[:-1]),
             sorted(("p-%04d" % i).encode() for i in range(n)),
             "each unicast reached exactly one member")
    check_eq(stat(a, "cluster_out", "unicast"), 3 * n // 4, "A published the others' shares")
    check_eq(stat(b, "cluster_in", "unicast"), n // 2, "B took its two members' share")
    check_eq(stat(c, "cluster_in", "unicast"), n // 4, "C took its member's share")
    for h in hubs:
        check_eq(stat(h, "cluster_unicast_lost") + stat(h, "cluster_unicast_rerouted"), 0,
                 "nothing lost or rerouted")


def envelope(kind, aux=b"", data=b"x", origin=77, seq=1, sseq=0):
    """A cluster envelope as a node builds it: magic, kind, aux length, origin, seq, id,
    stream seq (big-endian), then aux and data."""
    import struct
    return (struct.pack(">BcHIQQQ", 0xE1, kind, len(aux), origin, seq, 0, sseq) + aux + data)


@suite.case
@with_servers
def foreign_messages_are_dropped():
    """Whoever may publish on the NATS server can send anything on evhub's subjects: envelopes
    of a kind the subject does not carry, tags past 64 bytes, a tag that is not the subject's,
    an aux where none belongs, or no envelope at all. Each is counted and dropped, on a node
    with script = yes as on one without, and nothing else notices."""
    s = NatsServer().start()
    a = node("A", [s]).start()
    b = node("B", [s], script=SCRIPT_CLUSTER, more="script = yes\n").start()
    wait_nodes([a, b])
    ra, rb = a.client(name="ra"), b.client(name="rb")
    tag(ra, "red")
    tag(rb, "red")
    wait_tag_seen([a, b], "red", ["A", "B"])
    nid_a = cluster_view(a)["nid"]
    long_tag = b"x" * 5000
    both = [("evhub.relay", envelope(b"M", long_tag)),          # a multicast on the relay
            ("evhub.relay", envelope(b"R", b"y" * 100, sseq=5)),  # a relay with a tag
            ("evhub.relay", b"\xe1R short"),                     # no whole envelope
            ("evhub.t.red", envelope(b"M", b"blue")),             # not the subject's tag
            ("evhub.t.red", envelope(b"R"))]                      # a relay on a tag's subject
    only_a = [("evhub.n.%d" % nid_a, envelope(b"u", long_tag)),    # unicast, tag too long
              ("evhub.n.%d" % nid_a, envelope(b"S", b"tag")),      # a send with a tag
              ("evhub.n.%d" % nid_a, envelope(b"Z"))]              # no such kind
    for subj, payload in both + only_a:
        publish(s.port, subj, payload)
    wait_for(lambda: (stat(a, "cluster_bad_messages"), stat(b, "cluster_bad_messages")),
             lambda v: v == (len(both) + len(only_a), len(both)), "every one counted")
    # both nodes still relay across, and nothing reached a client or a script
    ra.send("relay:after")
    wait_frames([rb], 1, others=[ra])
    check_eq(rb.take(), [b"A|relay||after"], "B's script took A's relay, and only that")
    check_eq(ra.take(), [b"after"], "A's client: its own relay only")
    check_eq(stat(b, "cluster_to_script"), 1, "B's script saw one message")
    check(a.alive() and b.alive(), "both nodes still run")


@suite.case
@with_servers
def unicast_to_a_node_whose_member_left():
    """A picks C from C's last heartbeat, but C has no member any more: C passes the unicast
    on through the queue group (to B, the node with members), and counts it lost when no node
    has one. C's heartbeat is made here (C's own come once a minute), so A's view is stale
    for as long as the test needs."""
    s = NatsServer().start()
    a = node("A", [s], node_timeout=120000).start()
    b = node("B", [s], node_timeout=120000).start()
    c = node("C", [s], heartbeat=60000, node_timeout=120000).start()
    hubs = [a, b, c]
    wait_nodes(hubs)
    mb = b.client(name="mB")
    tag(mb, "pool")
    wait_members(c, "pool", {"B": 1})
    nid_c = cluster_view(c)["nid"]
    publish(s.port, "evhub.hb", json.dumps({"node": "C", "nid": nid_c, "clients": 3,
                                            "tags": ["pool"], "members": [3]}))
    wait_members(a, "pool", {"B": 1, "C": 3})
    pub = a.client(name="pub")
    m = 40
    for i in range(m):
        pub.send("uc:pool:r-%03d" % i)
    wait_frames([mb], m, others=[pub])
    check_eq(sorted(mb.take()), [("r-%03d" % i).encode() for i in range(m)],
             "every unicast reached B's member once")
    check_eq(stat(c, "cluster_in", "unicast"), 3 * m // 4, "C was sent its three quarters")
    check_eq(stat(c, "cluster_unicast_rerouted"), 3 * m // 4, "C passed them on")
    check_eq(stat(b, "cluster_in", "unicast"), m, "B took its quarter and C's")
    # B's member goes: C has nobody to pass them to
    mb.close()
    wait_for(lambda: cluster_view(c), lambda v: v["nodes"] and all(
        "pool" not in x["tags"] for x in v["nodes"]), "C sees B without members")
    wait_members(a, "pool", {"B": 0, "C": 3})
    k = 5
    for i in range(k):
        pub.send("uc:pool:lost-%d" % i)
    pub.send("info")  # A handled the unicasts before it answers this
    wait_frames([pub], 1)
    wait_for(lambda: stat(c, "cluster_unicast_lost"), lambda v: v == k,
             "C counts the %d it could pass to nobody" % k)
    check_eq(stat(c, "cluster_unicast_rerouted"), 3 * m // 4, "none of those rerouted")
    check_eq(stat(a, "cluster_out", "unicast"), m + k, "A's unicasts all left A")


@with_servers
def node_killed_is_dropped(workers):
    s = NatsServer().start()
    a, b, c = start_cluster([s], workers=workers)
    ca, cb = a.client(name="ca"), b.client(name="cb")
    tag(ca, "t")
    tag(cb, "t")
    wait_tag_seen([a, b, c], "t", ["A", "B"])
    c.kill()  # SIGKILL: no goodbye; the others notice the missing heartbeats
    c.rc = c.proc.returncode
    wait_for(lambda: cluster_view(a), lambda v: [x["node"] for x in v["nodes"]] == ["B"],
             "A drops the killed node")
    wait_for(lambda: cluster_view(b), lambda v: [x["node"] for x in v["nodes"]] == ["A"],
             "B drops the killed node")
    check(a.count_log("node C (") and "timed out" in a.log(), "A logged why C went")
    cb.send("mc:t:after-kill")
    wait_frames([ca, cb], 1)
    check_eq(ca.take(), [b"after-kill"], "A still gets B's multicasts")
    # a clean stop says goodbye: dropped at once
    b.stop()
    wait_for(lambda: cluster_view(a), lambda v: v["nodes"] == [], "A drops B after its goodbye")
    check("left the cluster" in a.log(), "B's goodbye was seen")


@with_servers
def nats_restart_mid_stream(workers):
    s = NatsServer().start()
    # a reconnect buffer that holds about half of what the outage publishes
    a, b = start_cluster([s], names=("A", "B"), workers=workers,
                         more="reconnect_buffer = 3000\n")
    la, lb, pub = a.client(name="la"), b.client(name="lb"), a.client(name="pub")
    tag(la, "t")
    tag(lb, "t")
    wait_tag_seen([a, b], "t", ["A", "B"])
    n = 100  # about twice what the reconnect buffer holds
    for i in range(n):
        pub.send("mc:t:one-%03d" % i)
    wait_frames([la, lb], n)
    check_eq(lb.take(), la.take(), "before the restart both got everything")
    s.stop()
    wait_for(lambda: cluster_view(a), lambda v: not v["connected"], "A sees NATS go")
    failed0 = stat(a, "cluster_publish_failed")
    # during the outage: local delivery goes on; cross-node messages wait in libnats'
    # reconnect buffer (or fail, counted)
    for i in range(n):
        pub.send("mc:t:two-%03d" % i)
    wait_frames([la], n)
    check_eq(la.take(), [("two-%03d" % i).encode() for i in range(n)], "local during the outage")
    s2 = NatsServer(port=s.port).start()
    wait_for(lambda: cluster_view(a), lambda v: v["connected"], "A reconnects")
    wait_for(lambda: cluster_view(b), lambda v: v["connected"], "B reconnects")
    failed = stat(a, "cluster_publish_failed") - failed0
    # B resubscribes on reconnect; A's buffered publishes may reach the server first, and
    # then have no subscriber yet. Wait for the view to settle, then count what B got.
    wait_nodes([a, b])
    wait_tag_seen([a, b], "t", ["A", "B"])
    for i in range(n):
        pub.send("mc:t:three-%03d" % i)
    wait_frames([la], n)
    la.take()
    pump([lb], lambda: b"three-%03d" % (n - 1) in lb.frames, what="B resumes")
    got = lb.take()
    two = numbered(got, b"two-")
    check_eq(numbered(got, b"three-"), [("three-%03d" % i).encode() for i in range(n)],
             "after the reconnect everything crosses")
    check_eq(two, sorted(two), "what crossed from the outage keeps its order")
    gaps = stat(b, "cluster_gaps")
    print("restart: published %d during the outage: crossed %d, failed at A %d, gaps at B %d"
          % (n, len(two), failed, gaps))
    check(failed > 0, "the small reconnect buffer refused some (%d)" % failed)
    check_eq(n - len(two), failed + gaps, "lost = failed at the publisher + gaps at the receiver")
    check(stat(a, "cluster_reconnects") >= 1 and stat(b, "cluster_reconnects") >= 1,
          "reconnects counted")
    del s2


@with_servers
def slow_node_does_not_slow_others(workers):
    s = NatsServer().start()
    a, b, c = start_cluster([s], workers=workers)
    pub, la = a.client(name="pub"), a.client(name="la")
    slow = b.client(name="slow", rcvbuf=4096)
    lc = c.client(name="lc")
    for x in (la, slow, lc):
        tag(x, "t")
    wait_tag_seen([a, b, c], "t", ["A", "B", "C"])
    slow.paused = True  # never reads from here on
    n = scaled(2000, 400)
    payload = "x" * 2000
    for i in range(n):
        pub.send("mc:t:%05d:%s" % (i, payload))
    wait_frames([la, lc], n, others=[pub])
    for x in (la, lc):
        got = x.take()
        check_eq([f[:5] for f in got], [("%05d" % i).encode() for i in range(n)],
                 "%s got every message in order" % x.name)
    check_eq(stat(a, "cluster_publish_failed"), 0, "A published everything")
    # B closed its slow reader (8 MiB queue) or still holds its frames; either way the
    # others were served in full above
    check(b.alive(), "B is alive")


@suite.case
def bad_cluster_config_stops_startup():
    # (lines, the reason, the key whose line is named; None: the section's own line)
    for lines, why, key in (
            ("nats = http://127.0.0.1:4222\n", "expected nats://host:port", None),
            ("nats = nats://127.0.0.1:4222\nprefix = a..b\n", "prefix 'a..b'", None),
            ("nats = nats://127.0.0.1:4222\nuser = u\n", "user and password go together", None),
            ("nats = nats://127.0.0.1:4222\nheartbeat = 1000\nnode_timeout = 500\n",
             "node_timeout must be longer than heartbeat", None),
            ("nats = nats://127.0.0.1:4222\nunicast = sometimes\n", "sometimes", "unicast"),
            ("nats = nats://127.0.0.1:4222\nnode_id = 524288\n", "524288", "node_id")):
        h = Hub(SCRIPT, extra="[cluster]\n" + lines)
        rc, out = run_once(["-c", h.conf, "-f"])
        text = h.conf_text
        at = text.index("[cluster]") if key is None else text.index("\n" + key + " =") + 1
        line = text.count("\n", 0, at) + 1
        check(rc != 0 and why in out and ("%s:%d:" % (h.conf, line)) in out,
              "bad [cluster] (%r): want rc != 0 and %s:%d: ... %s; rc %s, output %r" % (
                  lines, h.conf, line, why, rc, out))


@suite.case
@with_servers
def token_auth_and_a_server_down_at_start():
    s = NatsServer(extra=["--auth", "s3cret"])
    port = s.port
    # the server is not there yet: the node starts, serves its clients, and keeps trying
    a = node("A", [s], more="token = s3cret\n").start()
    a.wait_log("NATS (%s) not reachable yet" % s.url)
    la = a.client(name="la")
    tag(la, "t")
    check_eq(cluster_view(a)["connected"], False, "not connected yet")
    s.start()
    check_eq(s.port, port, "same port")
    wait_for(lambda: cluster_view(a), lambda v: v["connected"], "A connects once NATS is up")
    b = node("B", [s], more="token = s3cret\n").start()
    wait_nodes([a, b])
    lb = b.client(name="lb")
    tag(lb, "t")
    wait_tag_seen([a, b], "t", ["A", "B"])
    la.send("mc:t:with-token")
    wait_frames([la, lb], 1)
    check_eq(lb.take(), [b"with-token"], "across with token auth")
    # a wrong token: the server refuses it, and start-up stops saying so
    c = node("C", [s], more="token = wrong\n")
    rc, out = run_once(["-c", c.conf, "-f"])
    check(rc != 0 and "refused this node's credentials: Authorization Violation" in out,
          "a wrong token stops start-up: rc %s, %r" % (rc, out))
    check_eq([x["node"] for x in cluster_view(a)["nodes"]], ["B"], "A does not see C")


def with_credentials(server, good, bad):
    """Two nodes configured with good cross a multicast through server; each of bad (config
    lines, what start-up must say) stops a third node's start-up, and the others never see
    it."""
    a = node("A", [server], more=good).start()
    b = node("B", [server], more=good).start()
    wait_nodes([a, b])
    la, lb = a.client(name="la"), b.client(name="lb")
    tag(la, "t")
    tag(lb, "t")
    wait_tag_seen([a, b], "t", ["A", "B"])
    la.send("mc:t:with-credentials")
    wait_frames([lb], 1)
    check_eq(lb.take(), [b"with-credentials"], "across with %r" % good)
    for lines, why in bad:
        c = node("C", [server], more=lines)
        rc, out = run_once(["-c", c.conf, "-f"])
        print("   start-up refused: %s" % [l for l in out.splitlines() if "crit" in l][-1:])
        check(rc != 0 and why in out, "%r must stop start-up with %r: rc %s, %r" % (
            lines, why, rc, out[-1500:]))
    check_eq([x["node"] for x in cluster_view(a)["nodes"]], ["B"], "A never saw C")


REFUSED = "refused this node's credentials: Authorization Violation"


@suite.case
@with_servers
def user_and_password():
    s = NatsServer(extra=["--user", "evhub", "--pass", "pa55 word"]).start()
    with_credentials(s, "user = evhub\npassword = pa55 word\n",
                     [("user = evhub\npassword = wrong\n", REFUSED), ("", REFUSED)])


class TempDir:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="evhub-creds-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


@suite.case
@with_servers
def nkey():
    with TempDir() as d:
        public, seed = make_nkey(d)
        os.mkdir(os.path.join(d, "other"))
        other_public, other_seed = make_nkey(os.path.join(d, "other"))
        conf = os.path.join(d, "nats.conf")
        with open(conf, "w") as f:
            f.write("authorization {\n  users = [ { nkey: %s } ]\n}\n" % public)
        s = NatsServer(extra=["-c", conf]).start()
        with_credentials(s, "nkey = %s\nnkey_seed = %s\n" % (public, seed),
                         [("nkey = %s\nnkey_seed = %s\n" % (other_public, other_seed), REFUSED),
                          ("", REFUSED)])


@suite.case
@with_servers
def tls_with_a_ca_made_here():
    with TempDir() as d:
        t = make_tls(d)
        server_tls = ["--tls", "--tlscert", t["server"], "--tlskey", t["server_key"]]
        s = NatsServer(extra=server_tls).start()
        untrusted = "SSL handshake error: 20:unable to get local issuer certificate"
        with_credentials(s, "tls = yes\ntls_ca = %s\n" % t["ca"],
                         [("tls = yes\ntls_ca = %s\n" % t["other"], untrusted),
                          ("", untrusted)])
        stop_all()
        # the server asks for a client certificate its CA signed
        s = NatsServer(extra=server_tls + ["--tlsverify", "--tlscacert", t["ca"]]).start()
        with_credentials(s, "tls_ca = %s\ntls_cert = %s\ntls_key = %s\n" % (
            t["ca"], t["client"], t["client_key"]),
            [("tls_ca = %s\n" % t["ca"], "cannot connect to NATS")])


@with_servers
def through_the_script(workers):
    """C has [cluster] script = yes: what A and B send reaches C's clients only through C's
    cluster handler, which sees the origin node, the kind, the tag and the id; whatever that
    handler sends stays on C (a multicast counts C's members only, and nothing comes back to
    A or B). A and B deliver as without a script."""
    s = NatsServer().start()
    a = node("A", [s], workers).start()
    b = node("B", [s], workers).start()
    c = node("C", [s], workers, script=SCRIPT_CLUSTER, more="script = yes\n").start()
    wait_nodes([a, b, c])
    check_eq(cluster_view(c)["script"], True, "evhubctl cluster shows the switch")
    ca, cb, cc, solo = (a.client(name="ca"), b.client(name="cb"), c.client(name="cc"),
                        c.client(name="solo"))
    for x in (ca, cb, cc):
        tag(x, "red")
    tag(solo, "solo")
    wait_tag_seen([a, b, c], "red", ["A", "B", "C"])
    wait_tag_seen([a, b], "solo", ["C"])
    idc = info(cc)["id"]
    ca.send("mc:red:hello")
    cb.send("relay:r1")
    ca.send("uc:solo:u1")
    ca.send("sendto:%d:s1" % idc)
    want_cc = [b"A|multicast|red|hello", b"B|relay||r1",
               ("A|send||s1|%d" % idc).encode()]
    wait_frames([cc, solo], [len(want_cc), 2], others=[ca, cb])
    check_eq(sorted(solo.take()), [b"A|unicast|solo|u1", b"B|relay||r1"],
             "the unicast through C's script (and B's relay)")
    got = cc.take()
    check_eq(sorted(got), sorted(want_cc), "C's member: everything through the script")
    # a fence: A's relay reaches A and B directly, and C through its script
    ca.send("relay:end")
    pump([ca, cb, cc, solo], lambda: all(b"end" in x.frames for x in (ca, cb)) and all(
        b"A|relay||end" in x.frames for x in (cc, solo)), what="the fence")
    check_eq(sorted(ca.take()), [b"end", b"hello", b"r1", b"sendto true nil"],
             "A: its own and B's, nothing back from C's script")
    check_eq(sorted(cb.take()), [b"end", b"hello", b"r1"], "B: nothing from C's script")
    check_eq(cc.take() + solo.take(), [b"A|relay||end", b"A|relay||end"], "C: the fence")
    check_eq(stat(c, "cluster_to_script"), 5, "C handed five messages to its script")
    for h in (a, b):
        check_eq(stat(h, "cluster_to_script"), 0, "no script on %s" % h.conf)
    check_eq(stat(c, "cluster_out"), 0, "C's script published nothing")
    check_eq(stat(a, "cluster_in"), 1, "A took B's relay only")


# the cluster handler tries to reach another node: by id, and by a tag only that node holds
SCRIPT_ESCAPE = SCRIPT + r'''
evapi.on("cluster", function(msg, from)
    local id = msg:match("^escape:(%d+)$")
    if id then
        local s1, s2 = evapi.send(math.tointeger(tonumber(id)), "escaped-send")
        local u = evapi.unicast("escaped-unicast", "blue")
        local m = evapi.multicast("escaped-multicast", "blue")
        evapi.relay(string.format("results|%s|%s|%s|%s", tostring(s1), tostring(s2),
                                  tostring(u), tostring(m)))
    end
end)
'''


@suite.case
@with_servers
def the_cluster_handler_cannot_reach_another_node():
    """From C's cluster handler, a send to a connection on A, a unicast and a multicast to a tag
    only A holds all stay on C, where nobody takes them: with the scope not forced local each
    would cross to A (local_first unicasts leave a node with no member)."""
    s = NatsServer().start()
    a = node("A", [s]).start()
    c = node("C", [s], script=SCRIPT_ESCAPE, more="script = yes\n").start()
    wait_nodes([a, c])
    ca, cc = a.client(name="ca"), c.client(name="cc")
    tag(ca, "blue")
    wait_tag_seen([c], "blue", ["A"])
    ida = info(ca)["id"]
    ca.send("relay:escape:%d" % ida)
    wait_frames([cc], 1, others=[ca])
    res = cc.take()[0].decode().split("|")
    check(res[0] == "results" and res[3] in ("nil", "0") and res[4] in ("nil", "0"),
          "from the handler, the unicast and the multicast reach nobody: %r" % res)
    check_eq(res[1:3], ["nil", "no such connection"], "the send to A's connection fails")
    # a fence: C's relay reaches A after anything C's handler could have published
    cc.send("relay:fence-c")
    wait_frames([ca], 2)
    check_eq(ca.take(), [("escape:%d" % ida).encode(), b"fence-c"],
             "A's client: its own relay and the fence, nothing from C's handler")
    check_eq(stat(c, "cluster_out"), 1, "C published the fence only")
    check_eq(stat(c, "cluster_to_script"), 1, "C's handler ran once")


@suite.case
@with_servers
def through_a_kemi_script():
    """The KEMI dialect: evapi:cluster-message, with $evapi(node), $evapi(kind), $evapi(tag)
    and $evapi(id) ($evapi(conidx) is $null: no connection of this node sent it)."""
    s = NatsServer().start()
    a = node("A", [s]).start()
    k = node("K", [s], script=KEMI_CLUSTER, more="script = yes\n",
             evapi={"event_callback": "ksr_evapi_event"}).start()
    wait_nodes([a, k])
    ca, ck = a.client(name="ca"), k.client(name="ck")
    tag(ca, "red")
    ck.send_now(b"7:tag:red,")
    wait_tag_seen([a, k], "red", ["A", "K"])
    idk = k.ctl_json("clients")["clients"][0]["id"]
    ca.send("mc:red:hi")
    ca.send("relay:all")
    ca.send("sendto:%d:direct" % idk)
    wait_frames([ck], 3, others=[ca])
    check_eq(ck.take(), [b"A|multicast|red|nil|hi", b"A|relay||nil|all",
                         ("A|send||nil|direct|%d" % idk).encode()],
             "K's member: through evapi:cluster-message")
    ck.send("mc:red:from-k")  # K's own clients' messages cross as always
    wait_frames([ca], 4, others=[ck])
    check_eq(ca.take(), [b"hi", b"all", b"sendto true nil", b"from-k"],
             "A: nothing back from K's script")


@suite.case
def script_yes_needs_a_cluster_handler():
    h = node("A", [NatsServer()], more="script = yes\n")
    rc, out = run_once(["-c", h.conf, "-f"])
    check(rc != 0 and 'script = yes, but the script registers no evapi.on("cluster") handler'
          in out, "rc %s, %r" % (rc, out[-1500:]))


for _w in (0, 2):
    suite.case_with("through_the_script_workers%d" % _w, through_the_script, _w)
    suite.case_with("unicast_cluster_policy_spreads_workers%d" % _w,
                    unicast_cluster_policy_spreads, _w)
    suite.case_with("node_killed_is_dropped_workers%d" % _w, node_killed_is_dropped, _w)
    suite.case_with("nats_restart_mid_stream_workers%d" % _w, nats_restart_mid_stream, _w)
    suite.case_with("slow_node_does_not_slow_others_workers%d" % _w,
                    slow_node_does_not_slow_others, _w)


if __name__ == "__main__":
    try:
        suite.run()
    finally:
        stop_all()
