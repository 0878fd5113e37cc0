"""Relay: a local port, a transport and its threads, against fake servers."""
import json
import ssl

import pytest

from orbmesh_relay.cli import tls_context
from orbmesh_relay.http import HttpTransport
from orbmesh_relay.relay import Relay, transport_class
from orbmesh_relay.udp import UdpTransport
from orbmesh_relay.ws import WsTransport
from tests.relay.fakes import TOKEN, FakeTunnelServer, FakeWsServer, UdpPeer, self_signed, wait_for, wg_datagram


def test_transport_by_name():
    assert transport_class("ws") is WsTransport
    assert transport_class("http") is HttpTransport
    assert transport_class("udp") is UdpTransport
    with pytest.raises(ValueError, match="unknown transport 'quic'"):
        transport_class("quic")


def test_listen_on_ipv6_loopback():
    relay = Relay("ws", "http://127.0.0.1:9", TOKEN, ("::1", 0))
    try:
        assert relay.local.address[0] == "::1"
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def echo_once(relay, attempts=50):
    """Send until an echo comes back (the first may go before the relay is connected)."""
    peer = UdpPeer(relay.local.address)
    try:
        for i in range(attempts):
            peer.send(wg_datagram(i))
            echo = peer.receive_all(1, timeout=0.2)
            if echo:
                return echo[0]
        return None
    finally:
        peer.close()


@pytest.mark.parametrize("transport", ["ws", "http"])
@pytest.mark.parametrize("trust", ["ca-file", "insecure"])
def test_tls(transport, trust, certificate):
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = (FakeWsServer if transport == "ws" else FakeTunnelServer)(tls=server_tls)
    context = tls_context(ca_file=str(cert)) if trust == "ca-file" else tls_context(insecure=True)
    relay = Relay(transport, server.url, TOKEN, ("127.0.0.1", 0), ssl_context=context,
                  backoff_first=0.05).start()
    try:
        assert server.url.startswith("https://")
        assert echo_once(relay)[:4] == b"\x04\x00\x00\x00"
    finally:
        relay.stop()
        server.stop()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_tls_unknown_ca_is_refused(transport, certificate):
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = (FakeWsServer if transport == "ws" else FakeTunnelServer)(tls=server_tls)
    relay = Relay(transport, server.url, TOKEN, ("127.0.0.1", 0), ssl_context=tls_context(),
                  backoff_first=0.05).start()
    try:
        wait_for(lambda: relay.stats.reconnects >= 2, what="retries")
        assert not relay.stats.connected and relay.fatal is None
    finally:
        relay.stop()
        server.stop()


# --- auto, in-process: a fake node (UDP), a fake HTTP tunnel (no WebSocket there) -----------------

@pytest.fixture
def node():
    from tests.relay.fakes import FakeNode
    fake = FakeNode()
    yield fake
    fake.stop()


def test_auto_starts_on_udp_falls_back_and_moves_back(node, monkeypatch, tmp_path, caplog):
    from orbmesh_relay import auto
    caplog.set_level("INFO", logger="orbmesh_relay")
    monkeypatch.setattr(auto, "CHECK_FIRST", 0.5)  # look at UDP again soon
    api = FakeTunnelServer()  # POST only: the WebSocket upgrade fails, HTTP works
    api.probe = node
    status_path = tmp_path / "status.json"
    relay = Relay("auto", api.url, TOKEN, ("127.0.0.1", 0), endpoint=node.endpoint, backoff_first=0.05,
                  status_file=status_path).start()
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        wait_for(lambda: relay.transport_name == "udp", what="on udp")
        wait_for(lambda: relay.transport.ticket is not None, what="a probe ticket")
        node.blocked = True  # UDP blocked mid-session
        echo = None
        for i in range(200):
            peer.send(wg_datagram(100 + i))
            echo = peer.receive_all(1, timeout=0.05)
            if echo:
                break
        assert echo and relay.transport_name == "http"
        assert [s["to"] for s in relay.switches] == ["udp", "http"]
        assert relay.switches[1]["reason"].startswith("no answer over udp")
        node.blocked = False  # UDP is back
        wait_for(lambda: relay.transport_name == "udp", timeout=30, what="back on udp")
        assert relay.switches[-1]["reason"] == "udp answers again (12 of 12 probes)"
        peer.send(wg_datagram(999))
        assert peer.receive_all(1) == [wg_datagram(999)]
        status = json.loads(status_path.read_text())
        assert status["mode"] == "auto" and status["switch_count"] == 3
        assert status["per_transport"]["http"]["up_packets"] >= 1
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("switch ")]
        assert logged == ["switch none -> udp: first answer from the node came over udp",
                          "switch udp -> http: " + relay.switches[1]["reason"],
                          "switch http -> udp: udp answers again (12 of 12 probes)"]
    finally:
        peer.close()
        relay.stop()
        api.stop()


@pytest.mark.parametrize("status", [401, 403])
def test_auto_ends_on_a_refused_token_instead_of_looping(node, status):
    api = FakeTunnelServer()
    api.ticket = lambda: (403, {"success": False})  # a device refused (a good token gets this far)
    token = "not-the-token" if status == 401 else TOKEN
    relay = Relay("auto", api.url, token, ("127.0.0.1", 0), endpoint=node.endpoint).start()
    peer = UdpPeer(relay.local.address)
    try:
        node.blocked = True
        peer.send(wg_datagram(1))
        assert relay.stopping.wait(15)
        assert str(status) in relay.fatal
    finally:
        peer.close()
        relay.stop()
        api.stop()


def test_an_https_url_without_a_context_verifies_with_the_system_cas():
    relay = Relay("ws", "https://vpn.example:8443", TOKEN, ("127.0.0.1", 0))
    try:
        assert relay.ssl_context.verify_mode == ssl.CERT_REQUIRED and relay.ssl_context.check_hostname
    finally:
        relay.stop()
    plain = Relay("ws", "http://vpn.example:8080", TOKEN, ("127.0.0.1", 0))
    plain.stop()
    assert plain.ssl_context is None
