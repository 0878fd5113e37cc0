"""app/dns/resolver.py: the `dns` rules of a connect response and the probe behind /health."""
import socket
import struct
import threading

import pytest

from app.dns import resolver
from app.ops import metrics


def config(**overrides):
    values = {"DNS": None, "DNS_RESOLVER": "on", "GATEWAY": "10.8.0.1"}
    values.update(overrides)
    return values


def test_client_dns_names_the_gateway_first_when_the_resolver_runs():
    assert resolver.client_dns(config()) == ["10.8.0.1", "1.1.1.1"]
    assert resolver.client_dns(config(), "fd00:8::1") == ["10.8.0.1", "fd00:8::1", "1.1.1.1"]


def test_client_dns_leaves_the_gateway_out_when_the_resolver_is_off():
    assert resolver.client_dns(config(DNS_RESOLVER="off"), "fd00:8::1") == ["1.1.1.1"]


@pytest.mark.parametrize("switch", ["on", "off"])
def test_explicit_dns_wins(switch):
    assert resolver.client_dns(config(DNS=["9.9.9.9"], DNS_RESOLVER=switch), "fd00:8::1") == ["9.9.9.9"]


class FakeDns:
    """A UDP DNS server on 127.0.0.1 that answers each query as `mode` says."""

    def __init__(self, mode):
        self.mode = mode
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if not query:  # shut down
                return
            self.queries.append((query, peer))
            ident, question = query[:2], query[12:]
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 1])  # A 127.0.0.1
            if self.mode == "answer":
                self.sock.sendto(ident + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, peer)
            elif self.mode == "refused":
                self.sock.sendto(ident + struct.pack("!HHHHH", 0x8185, 1, 0, 0, 0) + question, peer)
            elif self.mode == "wrong-id":
                wrong = struct.pack("!H", (struct.unpack("!H", ident)[0] + 1) % 0x10000)
                self.sock.sendto(wrong + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, peer)
            # "silent": no reply at all

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recvfrom; close alone would not
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def fake_dns():
    servers = []

    def start(mode):
        servers.append(FakeDns(mode))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_probe_asks_for_localhost_from_the_address_itself(fake_dns):
    server = fake_dns("answer")
    assert resolver.probe("127.0.0.1", server.port, timeout=2) is None
    query, peer = server.queries[0]
    assert peer[0] == "127.0.0.1"
    assert query[12:] == b"\x09localhost\x00\x00\x01\x00\x01"
    assert struct.unpack("!H", query[2:4])[0] & 0x0100  # recursion desired, as a stub asks


@pytest.mark.parametrize("mode, reason", [("refused", "rcode 5"), ("silent", "no answer"),
                                          ("wrong-id", "no answer")])
def test_probe_fails_without_a_good_answer(fake_dns, mode, reason):
    server = fake_dns(mode)
    assert reason in resolver.probe("127.0.0.1", server.port, timeout=0.3)
    control = fake_dns("answer")
    assert resolver.probe("127.0.0.1", control.port, timeout=2) is None


def test_probe_fails_fast_when_nothing_listens(fake_dns):
    server = fake_dns("answer")
    port = server.port
    server.close()  # the port is closed now: the kernel answers with port unreachable
    assert resolver.probe("127.0.0.1", port, timeout=5) == "Connection refused"


def test_probe_fails_when_the_gateway_address_is_not_here():
    assert resolver.probe("192.0.2.254", 53, timeout=2) == "Cannot assign requested address"


def test_probe_result_is_kept_for_its_ttl_and_failures_are_counted(fake_dns):
    server = fake_dns("refused")
    probe = resolver.Probe("127.0.0.1", server.port, ttl=3600, timeout=1)
    before = metrics.DNS_PROBE_FAILURES._value.get()
    assert "rcode 5" in probe.error()
    server.mode = "answer"
    assert "rcode 5" in probe.error()  # cached: /health stays cheap
    assert len(server.queries) == 1
    assert metrics.DNS_PROBE_FAILURES._value.get() == before + 1
    probe.ttl = 0
    assert probe.error() is None and len(server.queries) == 2
    assert metrics.DNS_PROBE_FAILURES._value.get() == before + 1


def test_init_app_probes_the_gateway_only_when_the_resolver_is_on(app, settings):
    from app import create_app
    on = create_app(dict(settings, POOL="10.66.0.0/16"))
    assert on.extensions["orbmesh_resolver"].address == "10.66.0.1"
    off = create_app(dict(settings, DNS_RESOLVER="off"))
    assert off.extensions["orbmesh_resolver"] is None
