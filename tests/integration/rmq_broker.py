"""A private rabbitmq-server for the RabbitMQ tests: loopback only, ports probed free, its own
node name, cookie, epmd, mnesia and log dirs in a temp dir; started and stopped by the test
(never the system's service). Also runs tests/bench/rmqtool (a plain rabbitmq-c client) to
declare queues and consume.

Python standard library only."""

import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time

RMQ_BIN = "/usr/lib/rabbitmq/bin"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rmqtool_path(evhub_bin):
    return os.path.join(os.path.dirname(evhub_bin), "tests", "bench", "rmqtool", "rmqtool")


class Broker:
    def __init__(self, tool):
        self.tool = tool
        self.dir = tempfile.mkdtemp(prefix="evhub-rmq-")
        self.home = os.path.join(self.dir, "home")
        os.mkdir(self.home)
        cookie = os.path.join(self.home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(secrets.token_hex(16))
        os.chmod(cookie, 0o400)
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = "evhubtest%d@localhost" % os.getpid()
        conf = os.path.join(self.dir, "rabbitmq.conf")
        with open(conf, "w") as f:
            f.write("loopback_users = none\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        self.env = dict(os.environ)
        self.env.update({
            "HOME": self.home,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_PID_FILE": os.path.join(self.dir, "rabbit.pid"),
            "RABBITMQ_CONFIG_FILE": conf,
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.dir, "no-such-env-file"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist,
            "RABBITMQ_CTL_ERL_ARGS": dist,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        self.epmd = None
        self.proc = None
        self.out = open(os.path.join(self.dir, "server.out"), "wb")

    def url(self, vhost="%2f", user="guest", password="guest"):
        return "amqp://%s:%s@127.0.0.1:%d/%s" % (user, password, self.port, vhost)

    def start(self, wait=True):
        if self.epmd is None:
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address",
                                          "127.0.0.1"], env=self.env, stdout=self.out,
                                         stderr=self.out)
        self.proc = subprocess.Popen([os.path.join(RMQ_BIN, "rabbitmq-server")], env=self.env,
                                     stdout=self.out, stderr=self.out, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("rabbitmq-server exited (rc %s); see %s" % (
                    self.proc.returncode, self.dir))
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("rabbitmq-server not ready in %ds; see %s" % (timeout, self.dir))

    def beam_pid(self):
        """The Erlang VM's pid (the wrapper script execs it, but ask the pid file to be sure)."""
        try:
            with open(self.env["RABBITMQ_PID_FILE"]) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return self.proc.pid

    def stop(self, timeout=30):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.beam_pid(), signal.SIGCONT)
            except OSError:
                pass
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            self.epmd.wait()
            self.epmd = None
        self.out.close()

    def ctl(self, *args):
        r = subprocess.run([os.path.join(RMQ_BIN, "rabbitmqctl"), "-n", self.node] + list(args),
                           env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError("rabbitmqctl %s: rc %d: %s%s" % (
                " ".join(args), r.returncode, r.stdout, r.stderr))
        return r.stdout

    def add_vhost(self, name):
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def declare(self, queue, exchange=None, key=None, vhost="%2f"):
        args = [self.tool, "declare", self.url(vhost), queue]
        if exchange:
            args += [exchange, key]
        subprocess.run(args, check=True, timeout=30)

    def consume(self, queue, count, idle_ms=1500, vhost="%2f"):
        """Up to count messages of queue (stops after idle_ms without one), as dicts."""
        r = subprocess.run([self.tool, "consume", self.url(vhost), queue, str(count),
                            str(idle_ms)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError("rmqtool consume: rc %d: %s" % (r.returncode, r.stderr))
        return [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
