#!/usr/bin/python3
"""What a worker's script hands the loop is bounded ([evapi] worker_calls): past the bound a
call fails with ENOBUFS (nil, msg, "ENOBUFS"; KEMI -1), is counted (calls_refused), and the
hub's memory stays bounded; once the loop has carried the calls out, they succeed again."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import Hub, Suite, check, check_eq, pump, request, wait_for  # noqa: E402

suite = Suite("worker_calls")

SCRIPT = r'''
local big = string.rep("x", 200 * 1024)
evapi.on("message", function(conn, msg)
    if msg == "flood" then
        local ok, refused, code = 0, 0, nil
        for i = 1, 50 do
            local r, err, c = evapi.relay(big)
            if r then ok = ok + 1 else refused = refused + 1; code = c end
        end
        conn:send(string.format("ok=%d refused=%d code=%s", ok, refused, tostring(code)))
    else
        conn:send("echo " .. msg)
    end
end)
'''


@suite.case
def calls_past_the_bound_fail_with_enobufs():
    h = Hub(SCRIPT, evapi={"workers": 1, "worker_calls": "1m", "max_outbuf": "64m"}).start()
    c = h.client()
    c.send("flood")
    # 5 relays of 200 KiB fit in 1 MiB; the rest of the callback's 50 are refused.
    pump([c], until=lambda: any(f.startswith(b"ok=") for f in c.frames), what="the summary")
    msg = [f for f in c.frames if f.startswith(b"ok=")][0].decode()
    c.take()
    check_eq(msg, "ok=5 refused=45 code=ENOBUFS", "relays within the bound, the rest refused")
    w = h.ctl_json("stats")["workers"][0]
    check_eq(w["calls_refused"], 45, "refusals counted")
    # Carried out by now: the bound is free again.
    wait_for(lambda: h.ctl_json("stats")["workers"][0]["queued_call_bytes"], lambda n: n == 0,
             "the loop to carry the calls out")
    check_eq(request(c, "again"), b"echo again", "the worker serves on")
    check(h.rss_kb() < 200 * 1024, "memory bounded: %d KiB" % h.rss_kb())


suite.run()
