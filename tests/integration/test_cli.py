#!/usr/bin/python3
"""Command line: -b and -l override the config, --version, -h, bad options; the log line
format "YYYY-MM-DD HH:MM:SS.mmm [pid] level: message"."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import (Hub, Suite, check, check_eq, request, run_once)  # noqa: E402

suite = Suite("cli")

ECHO = ("evapi.on('message', function(conn, msg)\n"
        "  log.info('got ' .. msg)\n  log.debug('dbg ' .. msg)\n  conn:send(msg)\nend)\n")
LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(\d+)\] (crit|err|warn|notice|info|debug): \S")


def hub_lines(log):
    """The hub's own log lines (valgrind's '==pid==' lines left out)."""
    return [l for l in log.splitlines() if l and not l.startswith("==")]


@suite.case
def log_line_format():
    h = Hub(ECHO).start()
    c = h.client()
    check_eq(request(c, "x"), b"x", "echo")
    h.wait_log("got x")
    h.stop()
    lines = hub_lines(h.log())
    check(len(lines) >= 2, "too few log lines: %r" % lines)
    for l in lines:
        m = LINE_RE.match(l)
        check(m, "log line not in the documented format: %r" % l)
        check_eq(int(m.group(1)), h.pid, "pid in %r" % l)
    check(any(re.search(r"\binfo: .*got x", l) for l in lines), "log.info line at level info")


@suite.case
def bind_override():
    h = Hub(ECHO, evapi={"bind_addr": "192.0.2.1:8448"}, args=["-b", "127.0.0.1:0"]).start()
    check_eq(h.addr[0], "127.0.0.1", "bound address")
    check(h.addr[1] != 8448 and h.addr[1] > 0, "a kernel-chosen port: %r" % (h.addr,))
    check_eq(request(h.client(), "y"), b"y", "echo after -b")


@suite.case
def default_port_is_8448_text():
    # Nothing may listen on 8448 in CI; -t only parses, so check that the default is accepted.
    h = Hub(ECHO, conf_text="[lua]\nscript = script.lua\n")
    rc, out = run_once(["-c", h.conf, "-t"])
    check_eq(rc, 0, "-t with every [evapi] default (output %r)" % out)


@suite.case
def level_override():
    h = Hub(ECHO, log={"level": "crit"}, args=["-l", "debug"]).start()
    check_eq(request(h.client(), "z"), b"z", "echo")
    h.wait_log("got z")
    h.stop()
    check(re.search(r"\] debug: .*dbg z", h.log()), "-l debug shows debug lines:\n%s" % h.log())
    h2 = Hub(ECHO, log={"level": "debug"}, args=["-l", "notice"])
    h2.start(wait=False)
    h2.wait_log(re.compile(r"\] notice: "), what="a notice line")  # start-up is notable
    h2.stop()
    check(not re.search(r"\] (info|debug): ", h2.log()),
          "-l notice hides info/debug:\n%s" % h2.log())


@suite.case
def config_level_filters():
    h = Hub(ECHO, log={"level": "warn"})
    rc, out = run_once(["-c", h.conf, "-t"])
    check_eq(rc, 0, "-t")
    check(not re.search(r"\] (info|debug): ", out), "level=warn hides info lines:\n%s" % out)


@suite.case
def version_and_help():
    rc, out = run_once(["--version"])
    check_eq(rc, 0, "--version rc")
    check(re.search(r"\d+\.\d+\.\d+", out), "--version prints a version: %r" % out)
    rc, out = run_once(["-h"])
    check_eq(rc, 0, "-h rc")
    check("-c" in out and "-f" in out, "-h lists the options: %r" % out)


@suite.case
def bad_options():
    h = Hub(ECHO)
    for args in (["-c", h.conf, "-f", "--no-such-option"], ["-c", h.conf, "-f", "-l", "loud"],
                 ["-c", h.conf, "-f", "-b", "not-an-address"], ["-c"]):
        rc, out = run_once(args)
        check(rc != 0, "evhub %s should fail, rc %s:\n%s" % (" ".join(args), rc, out))
        check("listening on" not in out, "evhub %s started listening:\n%s" % (args, out))


suite.run()
