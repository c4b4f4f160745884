"""A private nats-server for the cluster tests: started on a free loopback port, optionally
routed to others of one NATS cluster, stopped by pid. Python standard library only."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from evhub_harness import TIMEOUT, TestFailure

NATS_BIN = os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server") or "/usr/bin/nats-server"

_servers = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class NatsServer:
    """nats-server -a 127.0.0.1 -p PORT [--cluster nats://127.0.0.1:CPORT --routes ...]."""

    def __init__(self, name="n", cluster_port=None, routes=(), port=None, extra=()):
        self.name = name
        self.extra = list(extra)
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.dir = tempfile.mkdtemp(prefix="evhub-nats-")
        self.logfile = os.path.join(self.dir, "nats.log")
        self.proc = None
        _servers.append(self)

    @property
    def url(self):
        return "nats://127.0.0.1:%d" % self.port

    def command(self):
        cmd = [NATS_BIN, "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name,
               "-l", self.logfile] + self.extra
        if self.cluster_port:
            cmd += ["--cluster_name", "evhubtest", "--cluster",
                    "nats://127.0.0.1:%d" % self.cluster_port]
            if self.routes:
                cmd += ["--routes", ",".join("nats://127.0.0.1:%d" % p for p in self.routes)]
        return cmd

    def start(self):
        if not os.access(NATS_BIN, os.X_OK):
            raise TestFailure("nats-server not found (%s): install the nats-server package"
                              % NATS_BIN)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise TestFailure("nats-server exited (rc %s): %s" % (self.proc.returncode,
                                                                      self.log()[-2000:]))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TestFailure("nats-server did not listen on %d" % self.port)
            time.sleep(0.02)

    def wait_routes(self, n):
        """Wait until the log shows n route connections made."""
        deadline = time.monotonic() + TIMEOUT
        while self.log().count("Route connection created") < n:
            if time.monotonic() > deadline:
                raise TestFailure("nats-server %s: no route after %.0fs: %s" % (
                    self.name, TIMEOUT, self.log()[-2000:]))
            time.sleep(0.05)

    def log(self):
        try:
            with open(self.logfile) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop_all():
    for s in _servers:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)
    del _servers[:]


def publish(port, subject, payload):
    """Publish one message as a bare NATS client would (the text protocol: CONNECT, PUB), and
    wait for the server's PONG, so the message has been routed when this returns."""
    if isinstance(payload, str):
        payload = payload.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise TestFailure("nats-server closed before INFO")
            buf += chunk
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPUB %s %d\r\n%s\r\nPING\r\n'
                  % (subject.encode(), len(payload), payload))
        buf = b""
        while b"PONG\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise TestFailure("nats-server closed before PONG: %r" % buf)
            buf += chunk
        if b"-ERR" in buf:
            raise TestFailure("nats-server refused the publish: %r" % buf)


def _openssl(*args, cwd):
    r = subprocess.run(["openssl"] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise TestFailure("openssl %s: %s" % (" ".join(args), r.stderr.decode(errors="replace")))
    return r.stdout


def make_tls(d):
    """A CA made here, a server certificate for 127.0.0.1 and a client certificate it signed,
    and a second CA that signed nothing. Returns a dict of file paths."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=evhub test CA", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
             "other.pem", "-days", "2", "-subj", "/CN=another CA", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", who + ".key", "-out",
                 who + ".csr", "-subj", "/CN=127.0.0.1", cwd=d)
        _openssl("x509", "-req", "-in", who + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", who + ".pem", "-days", "2", "-extfile", "san.ext",
                 cwd=d)
    return {k: os.path.join(d, k + ".pem") for k in ("ca", "other", "server", "client")} | {
        k + "_key": os.path.join(d, k + ".key") for k in ("server", "client")}


def make_nkey(d):
    """A NATS user nkey pair made from an Ed25519 key openssl generates: (public key, seed
    file). The encoding is nkeys': a prefix byte (U for a user; S + U for its seed), the raw
    32-byte key, CRC-16/XMODEM little-endian, base32 without padding."""
    import base64
    import binascii

    _openssl("genpkey", "-algorithm", "ed25519", "-out", "nkey.pem", cwd=d)
    seed = _openssl("pkey", "-in", "nkey.pem", "-outform", "DER", cwd=d)[-32:]
    pub = _openssl("pkey", "-in", "nkey.pem", "-pubout", "-outform", "DER", cwd=d)[-32:]

    def enc(raw):
        crc = binascii.crc_hqx(raw, 0)
        return base64.b32encode(raw + bytes([crc & 0xff, crc >> 8])).decode().rstrip("=")

    user, seed_b = 20 << 3, 18 << 3
    public = enc(bytes([user]) + pub)
    seed_txt = enc(bytes([seed_b | user >> 5, (user & 31) << 3]) + seed)
    path = os.path.join(d, "user.nk")
    with open(path, "w") as f:
        f.write(seed_txt + "\n")
    return public, path
