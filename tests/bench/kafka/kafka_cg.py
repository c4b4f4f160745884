#!/usr/bin/python3
"""Instructions per message published from Lua with a report function (callgrind; not a
test). The machine the benchmark runs on is shared and its rates move by a factor of two
from run to run; instruction counts move by a few percent (librdkafka's batching still
depends on timing), so a change to the publishing path shows here first.

The hub (workers = 0 unless --workers, the benchmark's script, no relay) runs under valgrind --tool=callgrind
with instrumentation off; after a warm-up round it is turned on for one round of N messages
and the count of every thread of the hub (librdkafka's too) is divided by N.

  kafka_cg.py [--count N] [--out FILE] [--workers W]
Environment: EVHUB_BIN (default build/evhub), the tools next to it under tests/bench/kafka/.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

OUT = os.path.join(tempfile.mkdtemp(prefix="kafka-cg-"), "callgrind.out")
ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=20000)
ap.add_argument("--out", default=OUT)
ap.add_argument("--workers", type=int, default=0)
o = ap.parse_args()
os.environ["EVHUB_WRAPPER"] = ("valgrind --tool=callgrind --instr-atstart=no "
                               "--callgrind-out-file=" + o.out)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kafka_bench as kb  # noqa: E402  (after EVHUB_WRAPPER: the harness reads it)
from evhub_harness import Hub  # noqa: E402


class NoRelay:
    got = 0


def main():
    mock = subprocess.Popen([os.path.join(kb.TOOLS, "kafka_mock"), "bench"],
                            stdout=subprocess.PIPE)
    hub = None
    try:
        bootstrap = mock.stdout.readline().decode().strip()
        props = "&".join("g." + p for p in kb.PROPS)
        hub = Hub(script=kb.SCRIPT, evapi={"workers": str(o.workers)},
                  extra="[kafka]\nbroker = [b]%s/bench?%s\n" % (bootstrap, props)).start()
        ctl = kb.Conn(hub.addr)
        kb.hub_round(hub, ctl, NoRelay(), 2000, 100, 200)  # warm-up: connected, warm
        subprocess.run(["callgrind_control", "-i", "on", str(hub.pid)], check=True,
                       capture_output=True)
        kb.hub_round(hub, ctl, NoRelay(), o.count, 100, 200)
        subprocess.run(["callgrind_control", "-i", "off", str(hub.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(hub.pid)], check=True,
                       capture_output=True)
        time.sleep(1)
    finally:
        if hub:
            hub.kill()
        mock.terminate()
        mock.wait()
    total = 0
    for f in glob.glob(o.out + "*"):
        for line in open(f, errors="replace"):
            if line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    print("%d messages of 100 bytes with reports, workers = %d: %d instructions, %.0f per message"
          " (%s)" % (o.count, o.workers, total, total / o.count, o.out))


if __name__ == "__main__":
    main()
