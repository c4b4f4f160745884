#!/usr/bin/python3
"""SIP through the async round trip, next to answering directly (not a test).

  sipbench.py EVHUB [--rates 1000,2000,4000,8000] [--seconds 5] [--workers 0]
                    [--rounds 1] [--no-kamailio] [--kam-children 2]

For each rate, alternately: (a) direct: the KEMI request route answers 302 itself;
(b) async: the route suspends the INVITE, relays it to the routing application
(examples/async-routing/app.py), and t_continue answers 302 with its Contact; (c) kamailio:
Kamailio 5.6 (when installed) running the same script, examples/async-routing/kemi.lua,
unchanged, with examples/async-routing/kamailio.cfg and the same application. sipp (UAC,
INVITE -> 302 -> ACK) offers the rate for SECONDS; printed: calls completed and failed, the
rate reached, response time p50/p90/p99 (sipp's rtd, from the INVITE to the 302), and the
hub's CPU seconds per 1,000 calls (for Kamailio: all of its processes). The hub (every
Kamailio process) runs on CPU 0, sipp and the application on CPU 1."""

import argparse
import csv
import glob
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
SCEN = os.path.join(SRC, "tests", "integration", "sip", "uac_302.xml")
APP = os.path.join(SRC, "examples", "async-routing", "app.py")
NICE = []  # --nice N: every process measured (hub, Kamailio, sipp, the application) alike
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
from sip_peer import SipPeer  # noqa: E402

KAM_CFG = os.path.join(SRC, "examples", "async-routing", "kamailio.cfg")

DIRECT = r'''
function ksr_evapi_event(evname) end
function ksr_request_route()
    KSR.hdr.append_to_reply("Contact: <sip:" .. KSR.pv.get("$rU") .. "@10.0.0.101:5060>\r\n")
    KSR.sl.sl_send_reply(302, "Moved Temporarily")
end
'''


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fl = f.read().rsplit(")", 1)[1].split()
    return (int(fl[11]) + int(fl[12])) / os.sysconf("SC_CLK_TCK")


def udp_drops(port):
    """Datagrams dropped so far by the UDP socket bound to 127.0.0.1:PORT (its receive buffer
    was full), from /proc/net/udp; 0 when there is none."""
    want = "0100007F:%04X" % port
    with open("/proc/net/udp") as f:
        for line in f:
            fl = line.split()
            if len(fl) > 12 and fl[1] == want:
                return int(fl[-1])
    return 0


def group_cpu(pgid):
    """CPU seconds of every process in a process group (Kamailio forks a dozen)."""
    total = 0.0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % p) as f:
                fl = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fl[2]) == pgid:
            total += (int(fl[11]) + int(fl[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_port(port, proc, secs=20):
    end = time.time() + secs
    while time.time() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def probe(sport, secs=20):
    """True once a probe INVITE got its 302: the hub is up and the application is connected
    and tagged."""
    p = SipPeer(sport)
    try:
        return p.first_302(secs)
    finally:
        p.close()


def start_kamailio(d, script, sport, eport, children):
    run_dir = os.path.join(d, "run")
    os.mkdir(run_dir)
    kam = subprocess.Popen(
        NICE + ["taskset", "-c", "0", "kamailio", "-f", KAM_CFG, "-DD", "-E", "-Y", run_dir,
         "-m", "256", "-M", "16", "-A", 'EVAPI_BIND="127.0.0.1:%d"' % eport,
         "-A", "SIP_LISTEN=udp:127.0.0.1:%d" % sport, "-A", 'LUA_SCRIPT="%s"' % script,
         "-A", "SIP_CHILDREN=%d" % children],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"),
        start_new_session=True)
    if not wait_port(eport, kam):
        sys.stderr.write("kamailio did not start: %s\n" % open(os.path.join(d, "log")).read()[-800:])
    return kam


def stop_kamailio(kam):
    try:
        os.killpg(kam.pid, 15)
        kam.wait(10)
    except (OSError, subprocess.TimeoutExpired):
        os.killpg(kam.pid, 9)
        kam.wait()


def run(evhub, mode, rate, seconds, workers, kam_children=2):
    d = tempfile.mkdtemp(prefix="sipbench-")
    script = os.path.join(d, "s.lua")
    if mode == "direct":
        open(script, "w").write(DIRECT)
    else:
        shutil.copy(os.path.join(SRC, "examples", "async-routing", "kemi.lua"), script)
    sport, eport = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    if mode == "kamailio":
        hub = start_kamailio(d, script, sport, eport, kam_children)
        cpu_of = lambda: group_cpu(hub.pid)  # noqa: E731
    else:
        conf = os.path.join(d, "evhub.conf")
        open(conf, "w").write(
            "[evapi]\nbind_addr = 127.0.0.1:%d\nworkers = %d\nevent_callback = ksr_evapi_event\n"
            "[lua]\nscript = %s\n[log]\nlevel = notice\n[control]\nsocket = %s/ctl.sock\n"
            "[sip]\nlisten = udp:127.0.0.1:%d\nasync_timeout = 5000\n"
            % (eport, workers, script, d, sport))
        hub = subprocess.Popen(NICE + ["taskset", "-c", "0", evhub, "-f", "-c", conf],
                               stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
        if not wait_port(eport, hub):
            sys.stderr.write("evhub did not start: %s\n" % open(os.path.join(d, "log")).read()[-800:])
        cpu_of = lambda: cpu(hub.pid)  # noqa: E731
    app = None
    if mode != "direct":
        app = subprocess.Popen(NICE + ["taskset", "-c", "1", sys.executable, APP,
                                "127.0.0.1:%d" % eport], stdout=subprocess.PIPE, text=True)
        app.stdout.readline()
    if not probe(sport):
        sys.stderr.write("%s: no 302 to a probe INVITE within 20 s\n" % mode)
    c0 = cpu_of()
    a0 = cpu(app.pid) if app else 0.0
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)

    n = rate * seconds
    uport = free_port(socket.SOCK_DGRAM)
    sp = subprocess.Popen(NICE + ["taskset", "-c", "1", "sipp", "-sf", SCEN,
                                  "127.0.0.1:%d" % sport, "-s", "100", "-r", str(rate), "-m", str(n),
                                  "-l", str(rate * 10), "-i", "127.0.0.1", "-p", str(uport),
                                  "-nostdin", "-buff_size", "8388608", "-timeout",
                                  str(seconds + 30), "-trace_rtt", "-rtt_freq", "100",
                                  "-trace_stat", "-stf", "stat.csv"],
                          cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sipp_drops = 0
    while sp.poll() is None:  # sipp's socket goes with it: read its drops while it runs
        sipp_drops = max(sipp_drops, udp_drops(uport))
        time.sleep(0.1)
    out, err = sp.communicate()
    r = subprocess.CompletedProcess(sp.args, sp.returncode, out, err)
    c1 = cpu_of()
    a1 = cpu(app.pid) if app else 0.0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    drops = udp_drops(sport)  # the hub's SIP socket, still open
    sipp_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if mode == "kamailio":
        stop_kamailio(hub)
    else:
        hub.terminate()
        hub.wait()
    if app:
        app.kill()
        app.wait()
    ok = bad = 0
    elapsed = seconds
    rows = list(csv.reader(open(os.path.join(d, "stat.csv")), delimiter=";"))
    if len(rows) >= 2:
        h = rows[0]
        last = rows[-1]
        ok = int(last[h.index("SuccessfulCall(C)")])
        bad = int(last[h.index("FailedCall(C)")])
        t = last[h.index("ElapsedTime(C)")].split(":")
        elapsed = int(t[0]) * 3600 + int(t[1]) * 60 + float(t[2])
    rtts = []
    for fn in glob.glob(os.path.join(d, "*_rtt.csv")):
        for row in list(csv.reader(open(fn), delimiter=";"))[1:]:
            try:
                rtts.append(float(row[1]))
            except (ValueError, IndexError):
                pass
    rtts.sort()

    def pct(p):
        return rtts[min(len(rtts) - 1, int(len(rtts) * p))] if rtts else float("nan")

    shutil.rmtree(d, ignore_errors=True)
    if r.returncode not in (0, 1):
        sys.stderr.write(r.stdout[-500:] + r.stderr[-500:])
    return {"ok": ok, "bad": bad, "cps": ok / elapsed if elapsed else 0, "p50": pct(0.5),
            "p90": pct(0.9), "p99": pct(0.99), "cpu_per_k": (c1 - c0) * 1000.0 / max(ok, 1),
            "drops": drops, "sipp_drops": sipp_drops, "sipp_busy": sipp_cpu / max(elapsed, 1e-9), "app_busy": (a1 - a0) / max(elapsed, 1e-9)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("evhub")
    ap.add_argument("--rates", default="1000,2000,4000,8000")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-kamailio", action="store_true", help="leave Kamailio out")
    ap.add_argument("--kam-children", type=int, default=2, help="Kamailio's SIP children")
    ap.add_argument("--nice", type=int, default=0,
                    help="run hub, sipp and application at this nice value (e.g. -10 as root, "
                    "so a shared machine's other jobs yield to them)")
    a = ap.parse_args()
    if a.nice:
        NICE[:] = ["nice", "-n", str(a.nice)]
    modes = ["direct", "async"]
    if not a.no_kamailio:
        if shutil.which("kamailio"):
            modes.append("kamailio")
        else:
            print("(kamailio is not installed: its runs are left out)")
    print("%-8s %6s %8s %7s %9s %8s %8s %8s %12s %6s %6s %15s" % (
        "mode", "rate", "ok", "failed", "calls/s", "p50 ms", "p90 ms", "p99 ms", "cpu s/1k",
        "sipp%", "app%", "drops hub/sipp"))
    allres = {}
    for rate in [int(x) for x in a.rates.split(",")] * a.rounds:
        res = {}
        for mode in modes:
            res[mode] = run(a.evhub, mode, rate, a.seconds, a.workers, a.kam_children)
            allres.setdefault((rate, mode), []).append(res[mode])
            x = res[mode]
            print("%-8s %6d %8d %7d %9.0f %8.2f %8.2f %8.2f %12.3f %6.0f %6.0f %15s" % (
                mode, rate, x["ok"], x["bad"], x["cps"], x["p50"], x["p90"], x["p99"],
                x["cpu_per_k"], 100 * x["sipp_busy"], 100 * x["app_busy"],
                "%d/%d" % (x["drops"], x["sipp_drops"])))
            sys.stdout.flush()
        d, s = res["direct"], res["async"]
        if d["cps"]:
            print("       async/direct: calls/s %.2f, p99 %+.2f ms" % (s["cps"] / d["cps"],
                                                                  s["p99"] - d["p99"]))
        k = res.get("kamailio")
        if k and k["cps"]:
            print("       evhub async/kamailio: calls/s %.2f, CPU per call %.2f" % (
                s["cps"] / k["cps"], s["cpu_per_k"] / max(k["cpu_per_k"], 1e-9)))
    if a.rounds > 1:
        print("medians over %d rounds (p99: each round's, sorted; rounds with a failed call)"
              % a.rounds)
        for (rate, mode), rs in sorted(allres.items()):
            p99s = sorted(x["p99"] for x in rs)
            print("%-8s %6d calls/s %8.0f  p99 %s ms  cpu s/1k %.3f  failing rounds %d" % (
                mode, rate, statistics.median(x["cps"] for x in rs),
                "/".join("%.0f" % v for v in p99s),
                statistics.median(x["cpu_per_k"] for x in rs), sum(1 for x in rs if x["bad"])))


if __name__ == "__main__":
    main()
