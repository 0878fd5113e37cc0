"""The relay's HTTP transport against a fake batch server (not the real app)."""
import threading
import time

import pytest

from orbmesh_relay import http as transport_module
from orbmesh_relay.http import HttpTransport
from orbmesh_relay.relay import Relay
from tests.relay.fakes import TOKEN, FakeTunnelServer, UdpPeer, wait_for, wg_datagram


@pytest.fixture
def server():
    fake = FakeTunnelServer()
    yield fake
    fake.stop()


def start_relay(url, token=TOKEN, **options):
    options.setdefault("backoff_first", 0.05)
    return Relay("http", url, token, ("127.0.0.1", 0), **options).start()


@pytest.fixture
def relay(server):
    relay = start_relay(server.url)
    yield relay
    relay.stop()


@pytest.fixture
def peer(relay):
    peer = UdpPeer(relay.local.address)
    yield peer
    peer.close()


def test_datagrams_go_up_and_echoes_come_back(server, relay, peer):
    sent = [wg_datagram(i, size=32 + i * 50) for i in range(5)]
    for datagram in sent:
        peer.send(datagram)
    echoes = peer.receive_all(len(sent))
    assert sorted(echoes) == sorted(sent)
    assert sorted(server.upstream) == sorted(sent)
    # A sender counts its datagrams once the answer is in, which may be
    # after the echo came back on the parked request; a datagram is counted
    # down just after it is handed to the local socket.
    stats = relay.stats
    total = sum(map(len, sent))
    wait_for(lambda: (stats.up_packets, stats.up_bytes) == (5, total), what="up counted")
    wait_for(lambda: (stats.down_packets, stats.down_bytes) == (5, total), what="down counted")
    assert stats.connected and stats.dropped == 0


def test_senders_batch(server, relay, peer):
    server.gate.clear()
    count = 200
    # Hold each sender at the server with one datagram ...
    for i in range(relay.http_senders):
        peer.send(wg_datagram(i))
        wait_for(lambda: server.blocked == i + 1, what="sender %d at the gate" % i)
    # ... so that the rest waits in the relay's queue and must go in batches.
    for i in range(relay.http_senders, count):
        peer.send(wg_datagram(i))
    wait_for(lambda: len(relay.transport.queue) == count - relay.http_senders, what="the rest queued")
    server.gate.set()
    echoes = peer.receive_all(count)
    assert sorted(echoes) == sorted(wg_datagram(i) for i in range(count))
    posts = server.posts_with_data()
    assert sum(len(d) for _, d in posts) == count
    assert len(posts) <= relay.http_senders + 2


def test_parked_receiver_and_headers(server, relay, peer):
    def parked():
        with server.lock:
            return server.in_flight and [h for h, d in server.requests if not d and "X-Tunnel-Wait" not in h]

    # The first request on a connection is a wait-0 probe; then one parks
    # with the server's default hold.
    wait_for(parked, what="a parked request")
    peer.send(wg_datagram(1))
    assert peer.receive_all(1) == [wg_datagram(1)]
    with server.lock:
        requests = list(server.requests)
    for headers, datagrams in requests:
        assert headers["Content-Type"] == "application/x-wireguard-batch"
        assert headers["Authorization"] == "Bearer " + TOKEN
        assert headers["X-Tunnel-Session"] == relay.session
        if datagrams:
            assert headers["X-Tunnel-Wait"] == "0"
    # The sender's request went while the parked one was held.
    assert server.max_in_flight >= 2


def test_echo_arrives_on_the_parked_request(server, relay, peer):
    # The fake echoes after a short hold, so the sender's wait-0 answer is
    # empty and only a parked request can bring the echo.
    server.ECHO_DELAY = 0.3
    peer.send(wg_datagram(7))
    assert peer.receive_all(1) == [wg_datagram(7)]


def test_session_name_option(server):
    relay = start_relay(server.url, session="laptop-1")
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        assert {h["X-Tunnel-Session"] for h, _ in server.requests} == {"laptop-1"}
    finally:
        peer.close()
        relay.stop()


def test_random_session_differs_per_relay(server):
    one = start_relay(server.url)
    two = start_relay(server.url)
    one.stop()
    two.stop()
    assert one.session != two.session


def test_bad_token_is_fatal(server):
    relay = start_relay(server.url, token="wrong")
    try:
        assert relay.stopping.wait(10)
        assert "401" in relay.fatal
        assert relay.stats.reconnects == 0
    finally:
        relay.stop()


def test_server_restart_reconnects(server, relay, peer):
    peer.send(wg_datagram(1))
    assert peer.receive_all(1) == [wg_datagram(1)]
    port = server.port
    server.stop()
    wait_for(lambda: relay.stats.reconnects >= 1, what="a reconnect")
    wait_for(lambda: not relay.stats.connected, what="connected=no")
    again = FakeTunnelServer(port=port)
    try:
        # Datagrams sent while the server is away are lost, as over UDP:
        # keep sending until one makes it (bounded).
        echoes = []
        for i in range(100):
            peer.send(wg_datagram(1000 + i))
            echoes = peer.receive_all(1, timeout=0.2)
            if echoes:
                break
        assert echoes and echoes[0][:4] == b"\x04\x00\x00\x00"
        wait_for(lambda: relay.stats.connected, what="connected=yes")
    finally:
        again.stop()


def test_queue_is_bounded(server, relay, peer, monkeypatch):
    monkeypatch.setattr("orbmesh_relay.http.QUEUE_LIMIT", 10)
    server.gate.clear()
    for i in range(60):
        peer.send(wg_datagram(i))
    wait_for(lambda: relay.stats.dropped > 0, what="drops")
    assert len(relay.transport.queue) <= 10
    server.gate.set()


def test_base_path_and_default_port():
    relay = Relay("http", "https://vpn.example:8443/base/", TOKEN, ("127.0.0.1", 0))
    try:
        assert isinstance(relay.transport, HttpTransport)
        assert relay.transport.path == "/base/wireguard/tunnel"
        assert (relay.transport.host, relay.transport.port, relay.transport.https) == ("vpn.example", 8443, True)
        other = Relay("http", "http://vpn.example", TOKEN, ("127.0.0.1", 0))
        assert (other.transport.port, other.transport.path) == (80, "/wireguard/tunnel")
        other.stop()
    finally:
        relay.stop()


# --- bulk: a sender waits to fill its batch, and only while an upload is under way ---

@pytest.fixture
def transport():
    relay = Relay("http", "http://127.0.0.1:9", TOKEN, ("127.0.0.1", 0))  # never started
    yield relay.transport
    relay.stop()


def taken_in_thread(transport):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("batch", transport._take()))
    thread.start()
    return thread, out


def test_outside_bulk_a_sender_takes_what_is_there(transport, monkeypatch):
    monkeypatch.setattr("orbmesh_relay.http.FILL_WAIT", 30.0)
    transport._put([wg_datagram(1)])
    assert transport._take() == [wg_datagram(1)]
    assert not transport.bulk and transport.queued == 0


def test_in_bulk_a_sender_waits_until_its_batch_is_full(transport, monkeypatch):
    monkeypatch.setattr("orbmesh_relay.http.FILL_WAIT", 30.0)
    monkeypatch.setattr("orbmesh_relay.http.FILL_BYTES", 4000)
    transport.bulk = True
    transport._put([wg_datagram(1, size=1000)])
    thread, out = taken_in_thread(transport)
    thread.join(0.2)
    assert thread.is_alive()  # 1,000 of 4,000 bytes: still filling
    more = [wg_datagram(i, size=1000) for i in range(2, 5)]
    transport._put(more)
    thread.join(10)
    assert out["batch"] == [wg_datagram(1, size=1000)] + more
    # 4,000 bytes is under BULK_BYTES: the next batch goes at once again.
    assert not transport.bulk and transport.queued == 0


def test_in_bulk_a_sender_goes_with_what_it_has_after_fill_wait(transport, monkeypatch):
    monkeypatch.setattr("orbmesh_relay.http.FILL_WAIT", 0.05)
    transport.bulk = True
    transport._put([wg_datagram(1)])
    assert transport._take() == [wg_datagram(1)]


def test_a_sender_whose_queue_another_emptied_waits_for_the_next(transport, monkeypatch):
    monkeypatch.setattr("orbmesh_relay.http.FILL_WAIT", 0.3)
    transport.bulk = True
    transport._put([wg_datagram(1)])
    thread, out = taken_in_thread(transport)
    time.sleep(0.1)  # now filling its batch
    with transport.queue_changed:  # another sender takes everything
        transport.queue.clear()
        transport.queued = 0
    thread.join(0.6)  # past its fill deadline, with nothing left to take
    assert thread.is_alive() and "batch" not in out
    transport._put([wg_datagram(2)])
    thread.join(10)
    assert out["batch"] == [wg_datagram(2)]


class _Channel:
    conn = object()  # an open connection: the receiver parks with the server's default wait

    def __init__(self, answer):
        self.answer, self.waits = answer, []

    def post(self, body, wait=None):
        self.waits.append(wait)
        return self.answer


class _Stopping(threading.Event):
    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


@pytest.mark.parametrize("bulk, answer, pauses", [(True, [wg_datagram(1)], True), (True, [], False),
                                                  (False, [wg_datagram(1)], False)])
def test_the_receiver_pauses_only_after_an_answer_during_an_upload(transport, bulk, answer, pauses):
    transport.bulk = bulk
    channel, stopping = _Channel(answer), _Stopping()
    transport.stopping = stopping
    transport._receive_once(channel)
    assert channel.waits == [None]
    assert stopping.waits == ([transport_module.PARK_PAUSE] if pauses else [])


def test_datagrams_too_short_for_wireguard_are_dropped_not_framed(server, relay, peer):
    """The server refuses a whole batch with a record under 32 bytes (issue 23): the relay never frames one."""
    peer.send(b"\x04\x00\x00\x00" + bytes(27))  # 31 bytes
    peer.send(wg_datagram(1))
    assert peer.receive_all(1) == [wg_datagram(1)]  # the control: a real one goes up and comes back
    wait_for(lambda: relay.stats.dropped == 1, what="the short datagram counted as dropped")
    assert server.upstream == [wg_datagram(1)]


def test_a_path_gone_dark_is_left_after_the_deadline_not_tcps(server):
    """Requests hang on connections that stay open: every connection is made again after about a second."""
    from orbmesh_relay import liveness
    from tests.relay.fakes import DarkProxy
    proxy = DarkProxy(server.port)
    relay = start_relay(proxy.url)
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        before = proxy.accepted
        proxy.go_dark()
        sent_at = time.monotonic()
        peer.send(wg_datagram(2))
        wait_for(lambda: relay.stats.reconnects >= 1, timeout=10, what="the relay to give up on them")
        assert liveness.DEAD_MIN <= time.monotonic() - sent_at <= 5.0
        wait_for(lambda: proxy.accepted > before, what="new connections")
    finally:
        peer.close()
        relay.stop()
        proxy.stop()


def test_an_answer_that_is_not_a_batch_is_a_failed_request(server):
    original = server.server.RequestHandlerClass._answer

    def not_a_batch(handler, status, body, content_type):
        return original(handler, status, body, "text/html" if status == 200 else content_type)

    server.server.RequestHandlerClass._answer = not_a_batch
    relay = start_relay(server.url)
    try:
        wait_for(lambda: relay.stats.reconnects >= 1, what="the receiver to retry")
        assert not relay.stats.connected and relay.fatal is None
        server.server.RequestHandlerClass._answer = original  # control: proper answers connect it
        wait_for(lambda: relay.stats.connected, what="connected")
    finally:
        relay.stop()
