"""The relay's UDP transport and its probes against a fake node (UDP echo and probe echo)."""
import time

import pytest

from orbmesh_relay import liveness, udp, udpio
from orbmesh_relay.common import Unauthorized
from orbmesh_relay.relay import Relay
from orbmesh_relay.udp import Check, TicketError, fetch_ticket, parse_endpoint
from tests.relay.fakes import TOKEN, FakeNode, FakeTunnelServer, UdpPeer, wait_for, wg_datagram


@pytest.mark.parametrize("text, expected", [
    ("198.51.100.1:51820", ("198.51.100.1", 51820)),
    ("vpn.example:4500", ("vpn.example", 4500)),
    ("vpn.example", ("vpn.example", 51820)),
    ("[2001:db8::1]:9", ("2001:db8::1", 9)),
    ("[2001:db8::1]", ("2001:db8::1", 51820)),
    ("2001:db8::1:5", ("2001:db8::1:5", 51820)),  # a bare IPv6 address
])
def test_parse_endpoint(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", ":5", "host:0", "host:70000", "host:x", "[::1]x", "[::1]:", "[]:5"])
def test_parse_endpoint_refuses(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)


@pytest.fixture
def node():
    fake = FakeNode()
    yield fake
    fake.stop()


@pytest.fixture
def api(node):
    fake = FakeTunnelServer()
    fake.probe = node
    yield fake
    fake.stop()


def start(node, api, transport="udp"):
    return Relay(transport, api.url, TOKEN, ("127.0.0.1", 0), endpoint=node.endpoint).start()


@pytest.mark.parametrize("linux", [True, False])
def test_datagrams_go_straight_to_the_node_and_back(node, api, linux, monkeypatch):
    monkeypatch.setattr(udpio, "LINUX_PATHS", linux)
    relay = start(node, api)
    peer = UdpPeer(relay.local.address)
    try:
        sent = [wg_datagram(i, size=1400) for i in range(40)] + [wg_datagram(99)]
        for datagram in sent:
            peer.send(datagram)
        assert peer.receive_all(len(sent)) == sent
        assert [d for d, _ in node.received] == sent
        stats = relay.stats
        wait_for(lambda: stats.per_transport["udp"][2] == len(sent), what="down counted")
        assert stats.per_transport["udp"][:2] == [len(sent), sum(map(len, sent))]
        assert relay.status_line().startswith("relay udp ")
    finally:
        peer.close()
        relay.stop()


def test_only_wireguard_from_the_node_is_delivered(node, api):
    relay = start(node, api)
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))
        assert peer.receive_all(1) == [wg_datagram(1)]
        transport = relay.transport
        node.wireguard.sendto(b"\x09" * 40, transport.port.sock.getsockname())  # not WireGuard
        stranger = UdpPeer(("127.0.0.1", 9))
        stranger.sock.sendto(wg_datagram(5), transport.port.sock.getsockname())  # not from the node
        stranger.close()
        wait_for(lambda: relay.stats.dropped >= 2, what="both dropped")
        assert peer.receive_all(1, timeout=0.3) == []
        peer.send(wg_datagram(2))
        assert peer.receive_all(1) == [wg_datagram(2)]  # control: the path still works
    finally:
        peer.close()
        relay.stop()


def test_a_ticket_then_a_check_that_passes_and_one_that_fails(node, api):
    relay = start(node, api)
    transport = relay.transport
    try:
        wait_for(lambda: transport.ticket is not None, what="a probe ticket")
        assert transport.ticket["port"] == node.probe_port and api.ticket_requests == 1
        assert transport.start_check(time.monotonic())
        result = wait_for(lambda: transport.check_result(time.monotonic()), timeout=10, what="check done")
        assert result == (True, Check.COUNT, Check.COUNT)
        assert transport.rtt is not None and transport.rtt < 1
        node.blocked = True
        assert transport.start_check(time.monotonic())
        passed, answered, sent = wait_for(lambda: transport.check_result(time.monotonic()), timeout=10,
                                          what="check done")
        assert (passed, answered, sent) == (False, 0, Check.COUNT)
        # A failed check asks for a fresh ticket (the server may have restarted).
        wait_for(lambda: api.ticket_requests >= 2, timeout=15, what="a fresh ticket")
    finally:
        relay.stop()


def test_probes_with_the_wrong_key_are_not_answered(node, api):
    relay = start(node, api)
    transport = relay.transport
    try:
        wait_for(lambda: transport.ticket is not None, what="a probe ticket")
        transport.ticket = dict(transport.ticket, key=b"k" * 32)
        assert transport.start_check(time.monotonic())
        passed, answered, _ = wait_for(lambda: transport.check_result(time.monotonic()), timeout=10,
                                       what="check done")
        assert not passed and answered == 0 and node.probed >= Check.COUNT
    finally:
        relay.stop()


def test_probes_off_on_the_server(node, api):
    api.probe = None  # 404
    relay = start(node, api)
    transport = relay.transport
    try:
        wait_for(lambda: transport.probes_off, what="probes off")
        assert not transport.start_check(time.monotonic())
    finally:
        relay.stop()


def test_a_silent_node_is_a_dead_path_and_an_answering_one_is_not(node, api):
    relay = start(node, api)
    transport = relay.transport
    peer = UdpPeer(relay.local.address)
    try:
        wait_for(lambda: transport.ticket is not None, what="a probe ticket")
        peer.send(wg_datagram(1))
        assert peer.receive_all(1)
        assert transport.tick(time.monotonic()) is None
        node.blocked = True
        sent_at, probes = time.monotonic(), node.probes_seen
        peer.send(wg_datagram(2))
        # Fixed mode: the relay's monitor probes, then kicks it (a new socket, a new source port).
        # Its deadline is 4 x SRTT, up to liveness.DEAD_MAX (10 s): wait past it, a loaded machine may need it.
        wait_for(lambda: relay.stats.reconnects >= 1, timeout=30, what="a reconnect")
        assert time.monotonic() - sent_at > liveness.DEAD_MIN
        assert node.probes_seen > probes  # it asked before it gave up
        node.blocked = False
        peer.send(wg_datagram(3))
        assert peer.receive_all(1) == [wg_datagram(3)]
    finally:
        peer.close()
        relay.stop()


def test_kick_gives_a_new_source_port(node, api):
    relay = Relay("udp", api.url, TOKEN, ("127.0.0.1", 0), endpoint=node.endpoint)
    try:
        transport = relay.transport
        before = transport.port.sock.getsockname()
        transport.kick("test")
        assert transport.port.sock.getsockname() != before
    finally:
        relay.stop()


@pytest.mark.parametrize("status, fatal", [(401, "401"), (403, "403")])
def test_a_refused_ticket_ends_the_relay(node, status, fatal):
    api = FakeTunnelServer()
    api.ticket = lambda: (status, {"success": False})
    relay = start(node, api)
    try:
        assert relay.stopping.wait(10)
        assert fatal in relay.fatal
    finally:
        relay.stop()
        api.stop()


@pytest.mark.parametrize("answer", [
    {"success": True},
    {"port": 1, "ticket": "!!", "key": "a", "expiresIn": 1, "serverTime": 1},
    {"port": 1, "ticket": "AAAA", "key": "AAAA", "expiresIn": 1, "serverTime": 1},  # wrong sizes
    ["not", "an", "object"],
])
def test_a_ticket_that_does_not_parse_is_an_error(answer):
    api = FakeTunnelServer()
    api.ticket = lambda: (200, answer)
    try:
        with pytest.raises(TicketError):
            fetch_ticket(api.url, TOKEN)
        api.ticket = lambda: (500, {})
        with pytest.raises(TicketError, match="HTTP 500"):
            fetch_ticket(api.url, TOKEN)
        with pytest.raises(Unauthorized):
            fetch_ticket(api.url, "wrong token")
    finally:
        api.stop()


def test_the_servers_clock_is_used_for_probe_times(node, api, monkeypatch):
    ticket = fetch_ticket(api.url, TOKEN)
    assert abs(ticket["offset"]) < 1
    assert ticket["renew_at"] > time.monotonic() + 1000  # three quarters of an hour
    assert udp.PROBE_PATH == "/wireguard/probe"


def test_a_path_that_stays_dead_is_made_again_less_and_less_often(node, api, caplog):
    caplog.set_level("DEBUG", logger="orbmesh_relay")
    relay = start(node, api)
    peer = UdpPeer(relay.local.address)
    try:
        peer.send(wg_datagram(1))
        assert peer.receive_all(1)
        node.blocked = True
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 8:  # WireGuard keeps sending into the block
            peer.send(wg_datagram(10 + i))
            i += 1
            time.sleep(0.1)
        # Every second without the backoff (about 7); after 1, 2 and 4 s more with it.
        assert 2 <= relay.stats.reconnects <= 4, relay.stats.reconnects
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and "no answer over udp" in r.getMessage()]
        assert len(warnings) == 1
        node.blocked = False
        peer.send(wg_datagram(2))
        assert peer.receive_all(1, timeout=3) == [wg_datagram(2)]
        wait_for(lambda: any("udp answers again" in r.getMessage() for r in caplog.records), what="logged")
    finally:
        peer.close()
        relay.stop()
