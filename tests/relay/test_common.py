"""What the relay and both transports share: counters, backoff, the local port."""
import re
import socket
import threading

import pytest

import orbmesh_relay
from orbmesh_relay.common import TOKEN_ENV, Backoff, LocalPort, Stats, Unauthorized, unauthorized_message
from tests.relay.fakes import wg_datagram

STATUS = re.compile(r"\Arelay (ws|http|udp|none) up=(\d+)/(\d+) down=(\d+)/(\d+) dropped=(\d+) "
                    r"reconnects=(\d+) connected=(yes|no) rtt=(-|[\d.]+ms) switches=(\d+)\Z")


def test_status_line_format():
    stats = Stats()
    assert stats.line("ws") == "relay ws up=0/0 down=0/0 dropped=0 reconnects=0 connected=no rtt=- switches=0"
    stats.up(3, 300)
    stats.down(2, 128)
    stats.drop(4)
    stats.reconnect()
    stats.set_connected(True)
    line = stats.line("http", rtt=0.01234, switches=2)
    assert line == "relay http up=3/300 down=2/128 dropped=4 reconnects=1 connected=yes rtt=12.3ms switches=2"
    assert STATUS.match(line)


def test_status_line_is_documented():
    assert ("relay TRANSPORT up=PKTS/BYTES down=PKTS/BYTES dropped=N reconnects=N connected=yes|no "
            "rtt=MSms|- switches=N") in orbmesh_relay.__doc__


def test_backoff_doubles_to_the_cap_with_jitter():
    backoff = Backoff(clock=lambda: 100.0)  # never connected: no fast retries
    delays = [backoff.next_delay() for _ in range(12)]
    bases = [min(30.0, 0.5 * 2 ** i) for i in range(12)]
    for delay, base in zip(delays, bases):
        assert 0.75 * base <= delay <= 1.25 * base
    backoff.reset()
    assert backoff.next_delay() <= 0.625


def test_backoff_retries_fast_for_a_few_seconds_after_a_connection_that_worked():
    now = [100.0]
    backoff = Backoff(clock=lambda: now[0])
    backoff.reset()  # connected ...
    now[0] += 60
    backoff.reset()  # ... still working (the HTTP transport resets after every request)
    assert backoff.next_delay() <= Backoff.FAST_JITTER  # a clean close (a server restart): straight back
    fast = []
    while now[0] < 160.0 + Backoff.FAST_FOR:
        fast.append(backoff.next_delay())
        now[0] += fast[-1]
    assert len(fast) >= 8 and all(0.1875 <= d <= 0.3125 for d in fast)
    assert 0.375 <= backoff.next_delay() <= 0.625  # then the usual doubling
    assert 0.75 <= backoff.next_delay() <= 1.25
    # Back, and another restart soon after: fast again.
    backoff.reset()
    now[0] += Backoff.FAST_AFTER
    assert backoff.next_delay() <= Backoff.FAST_JITTER


def test_backoff_does_not_hammer_a_server_that_accepts_and_closes():
    now = [100.0]
    backoff = Backoff(clock=lambda: now[0])
    for _ in range(5):
        backoff.reset()  # connected, and closed again at once
        now[0] += 0.1
        delay = backoff.next_delay()
        assert 0.375 <= delay <= 0.625
        now[0] += delay


def test_backoff_wait_reports_a_stop():
    stopping = threading.Event()
    assert Backoff(first=0.01).wait(stopping) is False
    stopping.set()
    assert Backoff(first=30.0).wait(stopping) is True  # returns at once, not after 30 s


def test_unauthorized_names_the_remedies():
    assert issubclass(Unauthorized, Exception)
    message = unauthorized_message()
    assert "401" in message and "--token" in message and TOKEN_ENV == "ORBMESH_RELAY_TOKEN" and TOKEN_ENV in message


def test_local_port_answers_the_last_sender():
    port = LocalPort("127.0.0.1", 0)
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        second.settimeout(5)
        assert port.send([wg_datagram(0)]) == (0, 0)  # nobody has spoken yet
        assert port.receive() is None  # times out instead of blocking forever
        first.sendto(wg_datagram(1), port.address)
        assert port.receive() == wg_datagram(1)
        second.sendto(wg_datagram(2), port.address)
        assert port.receive() == wg_datagram(2)
        assert port.send([wg_datagram(3)]) == (1, len(wg_datagram(3)))
        assert second.recvfrom(65535) == (wg_datagram(3), tuple(port.address))
        first.settimeout(0.2)
        with pytest.raises(socket.timeout):
            first.recvfrom(65535)  # the earlier sender gets nothing
    finally:
        first.close()
        second.close()
        port.close()


def test_local_port_in_use_raises():
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match="in use"):
            LocalPort(*taken.getsockname())
    finally:
        taken.close()


def test_local_port_sends_equal_sized_runs_segmented_as_separate_datagrams():
    port = LocalPort("127.0.0.1", 0)
    wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wireguard.bind(("127.0.0.1", 0))
        wireguard.settimeout(5)
        wireguard.sendto(wg_datagram(0), port.address)
        assert port.receive_many() == [wg_datagram(0)]
        sent = [wg_datagram(i, size=1400) for i in range(20)] + [wg_datagram(99)]
        assert port.send(sent) == (21, sum(map(len, sent)))
        assert [wireguard.recvfrom(65535)[0] for _ in sent] == sent
        assert port.gso, "the kernel refused UDP segmentation, so only the fallback ran"
    finally:
        wireguard.close()
        port.close()
