"""Relay: a local port, a transport and its threads, against fake servers."""
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
