#!/usr/bin/python3
"""The module seam seen from outside: evhubctl reads a config full of module sections it does
not link; a module's bad key stops start-up at file:line; a report whose script was reloaded
away is counted (completions_undelivered) and logged, never run in the wrong state; SIGTERM
waits for a delivery in flight and its failure report still reaches the script; workers 0
and 2."""

import os
import signal
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Suite, check, check_eq, pump, request, run_ctl,  # noqa: E402
                           run_once, wait_for)

suite = Suite("modules")

RAISER = r'''
evapi.on("message", function(conn, msg)
    if msg == "go" then
        local ok, err = evapi.raise("E_SLOW", {n = 1}, function(r)
            log.info("report @NAME@ status=" .. r.status .. " error=" .. tostring(r.error))
        end)
        conn:send("raised " .. tostring(ok) .. " " .. tostring(err))
    else
        conn:send("@NAME@")
    end
end)
'''


class SilentServer:
    """Accepts TCP connections on loopback and reads, never answering: a reliable-mode
    subscriber that keeps every request in flight."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c):
        while True:
            try:
                d = c.recv(65536)
            except OSError:
                return
            if not d:
                return
            with self.lock:
                self.received += d.count(b"\"jsonrpc\"")

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def stat(h, name):
    return h.ctl_json("stats")[name]


@suite.case
def evhubctl_reads_a_config_with_module_sections():
    h = Hub(RAISER.replace("@NAME@", "one"),
            extra="[tcp]\ntimeout = 700\n[events]\nsubscribe = E_X tcp:127.0.0.1:9\n").start()
    rc, out, err = run_ctl(["-c", h.conf, "--json", "status"])
    check_eq(rc, 0, "evhubctl -c with [tcp] and [events] in the file: %r %r" % (out, err))
    check('"clients"' in out or '"listen"' in out, "a status answer: %r" % out)


@suite.case
def module_bad_key_names_file_and_line():
    h = Hub(RAISER.replace("@NAME@", "one"), extra="[tcp]\ntimeout = 700\nno_such_key = 1\n")
    rc, out = run_once(["-c", h.conf, "-f"])
    check(rc != 0, "refused to start")
    line = [i + 1 for i, l in enumerate(h.conf_text.splitlines()) if "no_such_key" in l][0]
    check(("evhub.conf:%d:" % line) in out and "no_such_key" in out,
          "file:line and the key named: %r" % out)


def reload_case(workers):
    srv = SilentServer()
    extra = ("[tcp]\ntimeout = 1500\n[events]\nsubscribe = E_SLOW tcp:127.0.0.1:%d?reliable=1\n"
             % srv.port)
    h = Hub(RAISER.replace("@NAME@", "old"), evapi={"workers": workers}, extra=extra).start()
    c = h.client()
    check_eq(request(c, "go"), b"raised true nil", "raised")
    wait_for(lambda: srv.received, lambda n: n >= 1, "the request at the subscriber")
    before = stat(h, "completions_undelivered")
    h.write_script(RAISER.replace("@NAME@", "new"))
    h.ctl_json("reload")
    h.wait_log("report function(s) of the old script will not run")
    check_eq(request(c, "ping"), b"new", "the new script runs")
    # The reply never comes: the timeout fails the delivery, and its report has no state.
    wait_for(lambda: stat(h, "completions_undelivered"), lambda n: n == before + 1,
             "the old script's report counted as undelivered", timeout=10)
    check("report old" not in h.log() and "report new" not in h.log(),
          "no report function ran for it:\n" + h.log())
    srv.close()


suite.case_with("reload_leaves_reports_undelivered_workers0", reload_case, 0)
suite.case_with("reload_leaves_reports_undelivered_workers2", reload_case, 2)


def sigterm_case(workers):
    srv = SilentServer()
    extra = ("[tcp]\ntimeout = 60000\n[events]\nsubscribe = E_SLOW tcp:127.0.0.1:%d?reliable=1\n"
             % srv.port)
    h = Hub(RAISER.replace("@NAME@", "old"), evapi={"workers": workers, "shutdown_timeout": 800},
            extra=extra).start()
    c = h.client()
    check_eq(request(c, "go"), b"raised true nil", "raised")
    wait_for(lambda: srv.received, lambda n: n >= 1, "the request at the subscriber")
    h.signal(signal.SIGTERM)
    check_eq(h.wait_exit(), 0, "exit code")
    log = h.log()
    # Held open up to shutdown_timeout for the delivery, then failed: the script is told.
    check("deliveries in flight" in log, "the hub waited for the delivery:\n" + log)
    check("report old status=-1" in log, "the failure report ran in the script:\n" + log)
    srv.close()


suite.case_with("sigterm_fails_in_flight_and_reports_workers0", sigterm_case, 0)
suite.case_with("sigterm_fails_in_flight_and_reports_workers2", sigterm_case, 2)

QUEUED = r'''
local n = 0
evapi.on("message", function(conn, msg)
    local t = os.clock() + 0.02
    while os.clock() < t do end
    n = n + 1
    local k = n
    evapi.raise("E_Q", {n = k}, function(r)
        log.info("report k=" .. k .. " status=" .. r.status)
    end)
    if k == 1 then log.info("first raised") end
end)
'''


def queued_case(workers):
    # Frames read before SIGTERM but still in a worker's queue raise while the hub drains:
    # their events are delivered and every report runs, none is dropped as undelivered.
    srv = SilentServer()
    extra = "[events]\nsubscribe = E_Q tcp:127.0.0.1:%d\n" % srv.port
    h = Hub(QUEUED, evapi={"workers": workers, "shutdown_timeout": 5000}, extra=extra).start()
    c = h.client()
    c.send_now(b"".join(b"2:go," for _ in range(40)))
    h.wait_log("first raised")  # the subscriber's connection is still being made
    h.signal(signal.SIGTERM)
    check_eq(h.wait_exit(), 0, "exit code")
    log = h.log()
    check_eq(log.count("status=0"), 40, "reports of delivered events:\n" + log[-3000:])
    check_eq(srv.received, 40, "events at the subscriber")
    srv.close()


suite.case_with("sigterm_runs_what_workers_hold_workers0", queued_case, 0)
suite.case_with("sigterm_runs_what_workers_hold_workers2", queued_case, 2)

REPLY = r'''
evapi.on("message", function(conn, msg)
    local id = conn.id
    evapi.raise("E_SLOW", {}, function(r)
        evapi.send(id, "report " .. r.status)
    end)
    conn:send("raised")
end)
'''


def grace_case(workers):
    # shutdown_timeout passes with a delivery in flight: it is failed, and what its report
    # sends still reaches the client before the hub exits.
    srv = SilentServer()
    extra = ("[tcp]\ntimeout = 60000\n[events]\nsubscribe = E_SLOW tcp:127.0.0.1:%d?reliable=1\n"
             % srv.port)
    h = Hub(REPLY, evapi={"workers": workers, "shutdown_timeout": 800}, extra=extra).start()
    c = h.client()
    check_eq(request(c, "go"), b"raised", "raised")
    wait_for(lambda: srv.received, lambda n: n >= 1, "the request at the subscriber")
    h.signal(signal.SIGTERM)
    check_eq(h.wait_exit(), 0, "exit code")
    pump([c], until=lambda: c.eof, what="the hub closing the client")
    check_eq(c.frames, [b"report -1"], "the failure report's frame reached the client")
    srv.close()


suite.case_with("timeout_report_output_flushed_workers0", grace_case, 0)
suite.case_with("timeout_report_output_flushed_workers2", grace_case, 2)


@suite.case
def bad_subscribe_row_never_logs_listening():
    # Every module starts before the evapi listener: a hub that logged "listening on" runs.
    h = Hub(RAISER.replace("@NAME@", "one"),
            extra="[events]\nsubscribe = E_X tcp:127.0.0.1:1 notanumber\n")
    rc, out = run_once(["-c", h.conf, "-f"])
    check(rc != 0, "refused to start: %r" % out)
    check("listening on" not in out, "it logged listening anyway:\n" + out)


suite.run()
