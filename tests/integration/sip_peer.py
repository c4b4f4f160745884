"""A raw SIP peer on a UDP socket of its own: builds requests (and the ACK of a final reply),
sends them to one SIP port, and reads what comes back. Used by test_sip.py,
test_kamailio_compat.py and tests/bench/sipbench.py."""

import re
import socket
import time

from evhub_harness import scaled


class SipPeer:
    def __init__(self, target):
        """target: a SIP port, or anything with .sip_port (a test's hub or Kamailio)."""
        self.sip_port = target if isinstance(target, int) else target.sip_port
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind(("127.0.0.1", 0))
        self.port = self.s.getsockname()[1]
        self.n = 0

    def close(self):
        self.s.close()

    def request(self, method, ruser="100", branch=None, callid=None, cseq=1, extra=""):
        """A request (text), its branch and its Call-ID; its From tag is "a" + the count of
        requests made so far."""
        self.n += 1
        branch = branch or "z9hG4bK-test-%d-%d" % (self.port, self.n)
        callid = callid or "call-%d-%d@test" % (self.port, self.n)
        msg = ("%s sip:%s@127.0.0.1:%d SIP/2.0\r\n"
               "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=%s;rport\r\n"
               "From: <sip:alice@127.0.0.1>;tag=a%d\r\n"
               "To: <sip:%s@127.0.0.1>\r\n"
               "Call-ID: %s\r\n"
               "CSeq: %d %s\r\n"
               "Max-Forwards: 70\r\n%s"
               "Content-Length: 0\r\n\r\n" % (method, ruser, self.sip_port, self.port, branch,
                                             self.n, ruser, callid, cseq, method, extra))
        return msg, branch, callid

    def ack(self, final, branch, callid, ruser="100"):
        """The ACK of final, the text of a non-2xx final reply to the last INVITE made (its
        To, with the tag the reply added; its branch and Call-ID)."""
        to = re.search(r"^To: (.*)$", final, re.M | re.I).group(1).strip()
        return ("ACK sip:%s@127.0.0.1:%d SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=%s;rport"
                "\r\nFrom: <sip:alice@127.0.0.1>;tag=a%d\r\nTo: %s\r\nCall-ID: %s\r\n"
                "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
                % (ruser, self.sip_port, self.port, branch, self.n, to, callid))

    def send(self, msg):
        self.s.sendto(msg.encode() if isinstance(msg, str) else msg,
                      ("127.0.0.1", self.sip_port))

    def recv_all(self, seconds):
        """Every datagram within seconds: list of (code, text)."""
        out = []
        end = time.time() + seconds
        while True:
            left = end - time.time()
            if left <= 0:
                return out
            self.s.settimeout(left)
            try:
                data = self.s.recv(65536).decode("utf-8", "replace")
            except socket.timeout:
                return out
            out.append((int(data.split()[1]), data))

    def final(self, seconds):
        """Replies until a final one, within seconds: (provisional codes, final text or
        None)."""
        prov = []
        end = time.time() + seconds
        while True:
            left = end - time.time()
            if left <= 0:
                return prov, None
            self.s.settimeout(left)
            try:
                data = self.s.recv(65536).decode("utf-8", "replace")
            except socket.timeout:
                return prov, None
            code = int(data.split()[1])
            if code >= 200:
                return prov, data
            prov.append(code)

    def first_302(self, seconds):
        """INVITEs (1 s each, each final reply ACKed) until one gets a 302: whoever answers
        is up, with its routing application connected. False if none did within seconds."""
        end = time.time() + seconds
        while time.time() < end:
            inv, branch, callid = self.request("INVITE")
            self.send(inv)
            _, final = self.final(1)
            if final is None:
                continue
            self.send(self.ack(final, branch, callid))
            if final.startswith("SIP/2.0 302"):
                return True
            time.sleep(0.05)
        return False

    def expect(self, code, seconds=None):
        seconds = scaled(3, 20) if seconds is None else seconds
        end = time.time() + seconds
        while time.time() < end:
            self.s.settimeout(max(0.01, end - time.time()))
            try:
                data = self.s.recv(65536).decode()
            except socket.timeout:
                break
            c = int(data.split()[1])
            if c == code:
                return data
        raise AssertionError("no %d within %.1f s" % (code, seconds))
