"""The relay's WebSocket transport against a fake echo server (not the real app)."""
import time

import pytest

from orbmesh_relay import liveness
from orbmesh_relay.framing import BATCH_PROTOCOL, MAX_BATCH_MESSAGE, decode_batch
from orbmesh_relay.relay import Relay
from orbmesh_relay.ws import ws_uri
from tests.relay.fakes import TOKEN, DarkProxy, FakeWsServer, UdpPeer, wait_for, wg_datagram


@pytest.fixture
def server():
    fake = FakeWsServer()
    yield fake
    fake.stop()


def start_relay(url, token=TOKEN):
    return Relay("ws", url, token, ("127.0.0.1", 0), backoff_first=0.05).start()


@pytest.fixture
def relay(server):
    relay = start_relay(server.url)
    wait_for(lambda: relay.stats.connected, what="connected")
    yield relay
    relay.stop()


@pytest.fixture
def peer(relay):
    peer = UdpPeer(relay.local.address)
    yield peer
    peer.close()


def test_forwards_both_ways(server, relay, peer):
    sent = [wg_datagram(i, size=32 + 300 * i) for i in range(5)]
    for datagram in sent:
        peer.send(datagram)
    assert peer.receive_all(len(sent)) == sent  # one TCP stream: order kept
    assert server.received == sent
    stats = relay.stats
    total = sum(map(len, sent))
    # each counted just after its send, so possibly after the echo is back
    wait_for(lambda: (stats.up_packets, stats.up_bytes) == (5, total), what="up counted")
    wait_for(lambda: (stats.down_packets, stats.down_bytes) == (5, total), what="down counted")
    assert stats.dropped == 0 and stats.reconnects == 0


def test_handshake_headers_and_no_compression(server, relay):
    request = server.requests[0]
    assert request.path == "/wireguard/ws"
    assert request.headers["Authorization"] == "Bearer " + TOKEN
    assert "Sec-WebSocket-Extensions" not in request.headers
    assert request.headers["Sec-WebSocket-Protocol"] == BATCH_PROTOCOL  # offered; this server declines
    connection = server.connections[0]
    assert "Sec-WebSocket-Extensions" not in connection.response.headers
    assert connection.subprotocol is None


def test_batches_when_the_server_takes_the_subprotocol():
    server = FakeWsServer(subprotocols=[BATCH_PROTOCOL])
    relay = start_relay(server.url)
    peer = UdpPeer(relay.local.address)
    try:
        wait_for(lambda: relay.stats.connected, what="connected")
        sent = [wg_datagram(i, size=1400) for i in range(100)]
        for datagram in sent:
            peer.send(datagram)
        assert peer.receive_all(len(sent)) == sent  # the echo, split back into datagrams, in order
        messages = list(server.received)
        assert [d for m in messages for d in decode_batch(m)] == sent
        assert len(messages) < len(sent), "every datagram went in a message of its own"
        assert max(map(len, messages)) <= MAX_BATCH_MESSAGE
    finally:
        peer.close()
        relay.stop()
        server.stop()


def test_bad_token_is_fatal(server):
    relay = start_relay(server.url, token="wrong")
    try:
        assert relay.stopping.wait(10)
        assert "401" in relay.fatal
        assert relay.stats.reconnects == 0
    finally:
        relay.stop()


def test_reconnects_after_server_drops(server, relay, peer):
    peer.send(wg_datagram(1))
    assert peer.receive_all(1) == [wg_datagram(1)]
    server.drop_all()
    wait_for(lambda: relay.stats.reconnects >= 1, what="a reconnect")
    wait_for(lambda: relay.stats.connected and len(server.connections) == 1, what="connected again")
    peer.send(wg_datagram(2))
    assert peer.receive_all(1) == [wg_datagram(2)]


def test_datagrams_while_disconnected_are_dropped():
    # Nothing listens on this port: the relay never connects.
    relay = Relay("ws", "http://127.0.0.1:9", TOKEN, ("127.0.0.1", 0), backoff_first=0.05).start()
    peer = UdpPeer(relay.local.address)
    try:
        for i in range(3):
            peer.send(wg_datagram(i))
        wait_for(lambda: relay.stats.dropped == 3, what="three drops")
        wait_for(lambda: relay.stats.reconnects >= 1, what="retries")
        assert not relay.stats.connected and relay.stats.up_packets == 0
    finally:
        peer.close()
        relay.stop()


def test_uri():
    assert ws_uri("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/wireguard/ws"
    assert ws_uri("https://vpn.example:8443/") == "wss://vpn.example:8443/wireguard/ws"
    assert ws_uri("https://[2001:db8::1]:8443/base") == "wss://[2001:db8::1]:8443/base/wireguard/ws"


def test_answers_the_servers_pings(server, relay):
    pong = server.connections[0].ping()
    assert pong.wait(10)


def test_a_fragmented_message_arrives_whole(server, relay, peer):
    peer.send(wg_datagram(1))  # the relay learns where local WireGuard is
    assert peer.receive_all(1) == [wg_datagram(1)]
    datagram = wg_datagram(2, size=1200)
    server.connections[0].send([datagram[:500], datagram[500:1000], datagram[1000:]])
    assert peer.receive_all(1) == [datagram]


def test_frames_sent_with_the_handshake_answer_are_delivered():
    """A server may write its first message in the same segment as its 101."""
    import base64
    import hashlib
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    answer = threading.Event()
    datagram = wg_datagram(7)

    def serve():
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        answer.wait(10)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + bytes([0x82, len(datagram)]) + datagram)
        conn.recv(4096)  # until the relay goes
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    relay = start_relay("http://127.0.0.1:%d" % listener.getsockname()[1])
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))  # dropped (not connected yet), but the relay learns the peer
        wait_for(lambda: relay.stats.dropped == 1, what="the first datagram dropped")
        answer.set()
        assert peer.receive_all(1) == [datagram]
    finally:
        peer.close()
        relay.stop()
        listener.close()


@pytest.mark.parametrize("bad", ["text", "broken batch"])
def test_a_message_that_does_not_parse_is_a_failed_path(bad):
    server = FakeWsServer(subprotocols=[BATCH_PROTOCOL])
    relay = start_relay(server.url)
    peer = UdpPeer(relay.local.address)
    try:
        wait_for(lambda: relay.stats.connected, what="connected")
        peer.send(wg_datagram(1))
        assert len(peer.receive_all(1)) == 1
        server.connections[0].send("hello" if bad == "text" else b"\x00\x50" + b"\x04" * 10)
        wait_for(lambda: relay.stats.reconnects >= 1, what="a new connection")
        wait_for(lambda: relay.stats.connected and len(server.connections) == 2, what="connected again")
        for i in range(50):  # control: the new connection carries
            peer.send(wg_datagram(2))
            if peer.receive_all(1, timeout=0.2):
                break
        else:
            raise AssertionError("nothing came back over the new connection")
    finally:
        peer.close()
        relay.stop()
        server.stop()


def test_datagrams_too_short_for_wireguard_are_dropped_not_framed():
    """The server closes on a batch with a record under 32 bytes (issue 23): the relay never frames one."""
    server = FakeWsServer(subprotocols=[BATCH_PROTOCOL])
    relay = start_relay(server.url)
    peer = UdpPeer(relay.local.address)
    try:
        wait_for(lambda: relay.stats.connected, what="connected")
        peer.send(b"\x04\x00\x00\x00" + bytes(27))  # 31 bytes
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]  # the control: a real one goes up and comes back
        wait_for(lambda: relay.stats.dropped == 1, what="the short datagram counted as dropped")
        assert [d for m in server.received for d in decode_batch(m)] == [wg_datagram(1)]
    finally:
        peer.close()
        relay.stop()
        server.stop()


def test_a_refused_device_is_fatal():
    server = FakeWsServer()
    server.refuse = 403
    relay = start_relay(server.url)
    try:
        assert relay.stopping.wait(10)
        assert "403" in relay.fatal and relay.stats.reconnects == 0
    finally:
        relay.stop()
        server.stop()


def test_a_path_gone_dark_is_left_after_the_deadline_not_tcps(server):
    """The connection stays open and nothing comes back: TCP would wait minutes, the relay about a second."""
    proxy = DarkProxy(server.port)
    relay = start_relay(proxy.url)
    peer = UdpPeer(relay.local.address)
    try:
        wait_for(lambda: relay.stats.connected, what="connected through the proxy")
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        proxy.go_dark()
        sent_at = time.monotonic()
        peer.send(wg_datagram(2))
        wait_for(lambda: relay.stats.reconnects >= 1, timeout=10, what="the relay to give up on it")
        assert liveness.DEAD_MIN <= time.monotonic() - sent_at <= 5.0
        wait_for(lambda: proxy.accepted >= 2, what="a new connection made at once")
    finally:
        peer.close()
        relay.stop()
        proxy.stop()


def test_a_route_change_makes_a_new_connection(server, relay, peer, monkeypatch):
    from orbmesh_relay import route
    peer.send(wg_datagram(1))
    assert peer.receive_all(1) == [wg_datagram(1)]
    monkeypatch.setattr(route, "source_for", lambda peer_address: "192.0.2.99")  # the laptop moved
    wait_for(lambda: relay.stats.reconnects >= 1, what="a new connection")
    monkeypatch.undo()
    wait_for(lambda: relay.stats.connected and len(server.connections) >= 2, what="connected again")
