#!/usr/bin/python3
"""Hostile scripts (issue 12, item 2): a script cannot switch off its instruction budget
(debug.sethook) nor end the hub (os.exit), and SIGTERM still stops the hub cleanly after it
tried; [lua] restrict = yes withholds io, os.execute/exit/remove/rename/tmpname,
package.loadlib and the debug library, at start, at -t and at a reload alike."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (SLOW, TIMEOUT, Hub, Suite, check, check_eq, request,  # noqa: E402
                           run_once)

suite = Suite("sandbox")

SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "unhook" then
        pcall(debug.sethook)
        while true do end
    elseif msg == "replace" then
        pcall(debug.sethook, function() end, "", 1000000000)
        while true do end
    elseif msg == "exit" then
        os.exit(7)
    elseif msg == "popen" then
        local p = io.popen("echo hello")
        conn:send("popen:" .. p:read("a"))
        p:close()
        return
    end
    conn:send("ok:" .. msg)
end)
'''

BUDGET = {"max_instructions": 1000000 if SLOW else 5000000}


def served(c, others=()):
    check_eq(request(c, "ping", others=others), b"ok:ping", "the hub keeps serving")


def unhook(workers):
    h = Hub(SCRIPT, evapi={"workers": workers}, lua=BUDGET).start()
    a, b = h.client(name="a"), h.client(name="b")
    for n, attack in enumerate(["unhook", "replace"], 1):
        a.send(attack)
        served(a, [b])  # same connection, so the same worker: it was freed
        served(b, [a])
        h.wait_log("instruction budget exceeded", count=n)
    check_eq(a.frames + b.frames, [], "no reply from the stopped callbacks")
    h.stop(timeout=TIMEOUT)


suite.case_with("sethook_cannot_remove_the_budget_workers0", unhook, 0)
suite.case_with("sethook_cannot_remove_the_budget_workers1", unhook, 1)


def os_exit(workers):
    h = Hub(SCRIPT, evapi={"workers": workers}).start()
    a = h.client(name="a")
    a.send("exit")
    served(a)
    h.wait_log("os.exit is not allowed in evhub scripts")
    check(h.alive(), "the hub is still running")
    h.stop(timeout=TIMEOUT)


suite.case_with("os_exit_raises_workers0", os_exit, 0)
suite.case_with("os_exit_raises_workers1", os_exit, 1)


@suite.case
def unrestricted_script_runs_commands():
    # The default: scripts run with the hub's privileges (the README says so).
    h = Hub(SCRIPT).start()
    a = h.client(name="a")
    check_eq(request(a, "popen"), b"popen:hello\n", "io.popen without restrict")
    h.stop()


@suite.case
def restricted_script_cannot_run_commands():
    h = Hub(SCRIPT, lua={"restrict": "yes"}).start()
    a = h.client(name="a")
    a.send("popen")
    served(a)
    h.wait_log("global 'io'")
    h.stop()


TOP_IO = "local f = io.open('/dev/null')\nevapi.on('message', function(c, m) c:send(m) end)\n"


@suite.case
def restrict_applies_to_check_mode():
    rc, out = run_once(["-c", Hub(TOP_IO).conf, "-t"])
    check_eq(rc, 0, "-t without restrict (output %r)" % out)
    h = Hub(TOP_IO, lua={"restrict": "yes"})
    rc, out = run_once(["-c", h.conf, "-t"])
    check_eq(rc, 1, "-t with restrict on a script using io (output %r)" % out)
    check("global 'io'" in out, "the reason is given:\n%s" % out)
    bad = Hub(SCRIPT, lua={"restrict": "maybe"})
    rc, out = run_once(["-c", bad.conf, "-t"])
    check_eq(rc, 1, "restrict = maybe (output %r)" % out)
    check("restrict" in out and "evhub.conf:" in out, "the key and file:line:\n%s" % out)


@suite.case
def restrict_applies_to_reloads():
    h = Hub(SCRIPT, evapi={"workers": 1}, lua={"restrict": "yes"}).start()
    a = h.client(name="a")
    h.write_script(TOP_IO)
    rc, out, err = h.ctl("-t", TIMEOUT, "reload")
    check_eq(rc, 1, "reload of a script using io under restrict (stderr %r)" % err)
    check("global 'io'" in err, "the reason is given: %r" % err)
    served(a)  # the old script goes on
    h.stop()


suite.run()
