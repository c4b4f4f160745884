#!/usr/bin/python3
"""Script and config errors: a runtime error or a runaway callback is logged and the hub keeps
serving; a bad script or config stops start-up with exit 1 and the reason (file:line); -t
checks config and script without serving."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (SLOW, Hub, Suite, check, check_eq, request, run_once)  # noqa: E402

suite = Suite("lua_errors")

SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "boom" then
        error("kaboom")
    elseif msg == "nilidx" then
        local t = nil
        return t.field
    elseif msg == "spin" then
        while true do end
    elseif msg == "spinfn" then
        local function f(n) return n + 1 end
        local n = 0
        while true do n = f(n) end
    elseif msg == "mem" then
        local t = {}
        for i = 1, 100000000 do t[i] = string.rep("x", 64) .. i end
    elseif msg == "sendnum" then
        conn:send({})
    end
    conn:send("ok:" .. msg)
end)
'''


def served(c, others=()):
    check_eq(request(c, "ping", others=others), b"ok:ping", "the hub keeps serving")


def runtime_error(workers):
    h = Hub(SCRIPT, evapi={"workers": workers}).start()
    a, b = h.client(name="a"), h.client(name="b")
    a.send("boom")
    served(a, [b])
    h.wait_log("kaboom")
    log = h.log()
    check("lua:" in log, "a runtime error is logged with 'lua:'")
    check("stack traceback" in log, "a runtime error is logged with a stack traceback")
    a.send("nilidx")
    served(a, [b])
    h.wait_log(re.compile(r"lua:.*(field|nil)"))
    check_eq(h.count_log("stack traceback"), 2, "one traceback per error")
    b.send("sendnum")  # misuse of a binding raises: a script error, not a crash
    served(b, [a])
    h.wait_log("stack traceback", count=3)
    check_eq(a.frames + b.frames, [], "no reply from the failed callbacks")


suite.case_with("runtime_error_workers0", runtime_error, 0)
suite.case_with("runtime_error_workers2", runtime_error, 2)


def runaway(workers, budget):
    lua = {} if budget is None else {"max_instructions": budget}
    h = Hub(SCRIPT, evapi={"workers": workers}, lua=lua).start()
    a, b = h.client(name="a"), h.client(name="b")
    a.send("spin")
    served(b, [a])
    served(a, [b])
    h.wait_log("instruction budget exceeded")
    a.send("spinfn")
    served(a, [b])
    h.wait_log("instruction budget exceeded", count=2)
    check_eq(a.frames + b.frames, [], "no reply from the runaway callbacks")


suite.case_with("runaway_workers0", runaway, 0, 1000000)
suite.case_with("runaway_workers1", runaway, 1, 1000000)


@suite.case
def runaway_default_budget():
    # The default budget (100M instructions) takes seconds under valgrind: use 5M there.
    runaway(1, 5000000 if SLOW else None)


@suite.case
def memory_limit():
    h = Hub(SCRIPT, evapi={"workers": 0}, lua={"max_memory": "32m"}).start()
    a = h.client(name="a")
    a.send("mem")
    served(a)
    h.wait_log(re.compile(r"lua:.*memory"))
    served(a)


def start_fails(script, want, evapi=None, lua=None, extra="", conf_text=None, args=()):
    h = Hub(script, evapi=evapi, lua=lua, extra=extra, conf_text=conf_text, args=args)
    h.start(wait=False)
    rc = h.wait_exit()
    log = h.log()
    check(rc == 1, "evhub should exit 1, got %s; log:\n%s" % (rc, log))
    for w in want if isinstance(want, list) else [want]:
        if isinstance(w, re.Pattern):
            check(w.search(log), "output lacks /%s/:\n%s" % (w.pattern, log))
        else:
            check(w in log, "output lacks %r:\n%s" % (w, log))
    check("listening on" not in log, "it started listening anyway")
    return h


@suite.case
def syntax_error_at_start():
    start_fails("evapi.on('message', function(conn, msg)\n  conn:send(msg)\n  if then\nend)\n",
                "script.lua:3:")


@suite.case
def error_while_loading():
    start_fails("local x = 1\nerror('init failed here')\n", "init failed here")


@suite.case
def missing_message_handler():
    start_fails("evapi.on('connect', function(conn) end)\n", "message")


@suite.case
def missing_kemi_callback():
    start_fails("function other_name(evname) end\n", "ksr_evapi_event",
                evapi={"event_callback": "ksr_evapi_event"})


@suite.case
def missing_script_file():
    h = Hub(None)
    h.start(wait=False)
    check_eq(h.wait_exit(), 1, "rc with a missing script")
    check("script.lua" in h.log(), "the missing path is named:\n%s" % h.log())


def conf_lines(*lines):
    return "\n".join(lines) + "\n"


GOOD = ["[evapi]", "bind_addr = 127.0.0.1:0", "[lua]", "script = script.lua"]
OK_SCRIPT = "evapi.on('message', function(conn, msg) conn:send(msg) end)\n"

# (description, config lines, line numbers that may be reported)
BAD_CONFIGS = [
    ("unknown key", GOOD[:2] + ["no_such_key = 1"] + GOOD[2:], [3]),
    ("unknown section", GOOD + ["[nosuch]", "a = b"], [5, 6]),
    ("workers not a number", GOOD[:2] + ["workers = abc"] + GOOD[2:], [3]),
    ("negative workers", GOOD[:2] + ["workers = -1"] + GOOD[2:], [3]),
    ("bad size suffix", GOOD[:2] + ["", "max_frame_size = 12q"] + GOOD[2:], [4]),
    ("netstring_format 2", GOOD[:2] + ["netstring_format = 2"] + GOOD[2:], [3]),
    ("bad outbuf_policy", GOOD[:2] + ["outbuf_policy = maybe"] + GOOD[2:], [3]),
    ("bad unicast", GOOD[:2] + ["unicast = random"] + GOOD[2:], [3]),
    ("bad max_outbuf", GOOD[:2] + ["max_outbuf = lots"] + GOOD[2:], [3]),
    ("bad log level", GOOD + ["[log]", "level = loud"], [6]),
    ("bad max_instructions", GOOD + ["max_instructions = many"], [5]),
    ("unknown lua key", GOOD + ["scirpt = x.lua"], [5]),
]


@suite.case
def bad_config_reports_file_and_line():
    failures = []
    for desc, lines, where in BAD_CONFIGS:
        h = Hub(OK_SCRIPT, conf_text=conf_lines(*lines))
        h.start(wait=False)
        rc = h.wait_exit()
        log = h.log()
        hit = [n for n in where if re.search(r"evhub\.conf:%d:" % n, log)]
        if rc != 1 or not hit or "listening on" in log:
            failures.append("%s: rc %s, want 1 and 'evhub.conf:%s:' in:\n%s" % (
                desc, rc, "|".join(map(str, where)), log.strip()))
    check(not failures, "\n".join(failures))


@suite.case
def missing_config_file():
    rc, out = run_once(["-c", "/nonexistent/evhub.conf", "-f"])
    check_eq(rc, 1, "rc with a missing config file")
    check("/nonexistent/evhub.conf" in out, "the missing path is named:\n%s" % out)


@suite.case
def check_mode():
    h = Hub(OK_SCRIPT)
    rc, out = run_once(["-c", h.conf, "-t"])
    check_eq(rc, 0, "-t on a good config (output %r)" % out)
    check("listening on" not in out, "-t must not serve:\n%s" % out)
    h2 = Hub("function ksr_evapi_event(evname)\n  return 1\nend\n",
             evapi={"event_callback": "ksr_evapi_event"})
    rc, out = run_once(["-c", h2.conf, "-t"])
    check_eq(rc, 0, "-t on a good KEMI config (output %r)" % out)
    h3 = Hub("evapi.on('message', function(conn, msg)\n  if then\nend)\n")
    rc, out = run_once(["-c", h3.conf, "-t"])
    check_eq(rc, 1, "-t on a script with a syntax error")
    check("script.lua:2:" in out, "-t names the script line:\n%s" % out)
    h4 = Hub(OK_SCRIPT, conf_text=conf_lines(*(GOOD[:2] + ["workers = x"] + GOOD[2:])))
    rc, out = run_once(["-c", h4.conf, "-t"])
    check_eq(rc, 1, "-t on a bad config")
    check("evhub.conf:3:" in out, "-t names the config line:\n%s" % out)
    h5 = Hub("evapi.on('connect', function(conn) end)\n")
    rc, out = run_once(["-c", h5.conf, "-t"])
    check_eq(rc, 1, "-t on a script without a message handler:\n%s" % out)


suite.run()
