#!/usr/bin/python3
"""A worker stuck in its script (no instruction budget, a loop that never ends) does not hold
the hub's exit: SIGTERM ends it within shutdown_timeout plus a grace (5 s), non-zero, with a
log line naming the worker; the other workers' connections were served until then."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evhub_harness import SLOW, Hub, Suite, check, check_eq, request  # noqa: E402

suite = Suite("stuck_worker")

SCRIPT = r'''
evapi.on("message", function(conn, msg)
    if msg == "spin" then
        log.info("spinning")
        while true do end
    end
    conn:send("echo " .. msg)
end)
'''


@suite.case
def sigterm_leaves_a_stuck_worker_behind():
    h = Hub(SCRIPT, evapi={"workers": 2, "shutdown_timeout": 500},
            lua={"max_instructions": 0}).start()
    a = h.client(name="a")  # id 1: worker 1
    b = h.client(name="b")  # id 2: worker 0
    a.send_now(b"4:spin,")
    h.wait_log("spinning")  # worker 1 is now stuck
    check_eq(request(b, "x"), b"echo x", "the other worker serves on")
    t0 = time.monotonic()
    h.signal(signal.SIGTERM)
    rc = h.wait_exit(timeout=30 if SLOW else 10)
    took = time.monotonic() - t0
    check_eq(rc, 3, "exit status of a hub that left a stuck worker behind")
    check("worker 1 did not stop" in h.log(), "the stuck worker is named:\n" + h.log()[-2000:])
    check(took < (30 if SLOW else 10), "it took %.1f s" % took)


suite.run()
