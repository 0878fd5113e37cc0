"""UDP in and out: GSO/GRO where Linux takes them, plain everywhere else."""
import errno
import selectors
import socket
import time

import pytest

from orbmesh_relay import udpio
from orbmesh_relay.udpio import Port
from tests.relay.fakes import wg_datagram


@pytest.mark.parametrize("environ, platform, wanted", [
    ({}, "linux", True),
    ({"ORBMESH_RELAY_PORTABLE": "0"}, "linux", True),
    ({"ORBMESH_RELAY_PORTABLE": "1"}, "linux", False),
    ({}, "darwin", False),
    ({}, "win32", False),
])
def test_linux_paths_only_on_linux_and_not_when_portable(environ, platform, wanted):
    assert udpio.linux_paths_wanted(environ, platform) is wanted


def pair():
    """(sender Port, receiver Port) on loopback."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return Port(a), Port(b)


def received(port, count):
    got = []
    while len(got) < count and port.wait(5):
        got += port.receive(64)
    return got


@pytest.mark.parametrize("linux", [True, False])
def test_a_run_arrives_as_the_datagrams_it_was(linux, monkeypatch):
    monkeypatch.setattr(udpio, "LINUX_PATHS", linux)
    sender, receiver = pair()
    try:
        assert (sender.gso, receiver.gro, receiver.blocking) == (linux, linux, linux)
        # Elsewhere: a non-blocking socket and select(), the one selector Windows has.
        assert isinstance(receiver._selector, selectors.SelectSelector) is not linux
        sent = [wg_datagram(i, size=1400) for i in range(30)] + [wg_datagram(99, size=100), wg_datagram(7)]
        address = receiver.sock.getsockname()
        assert sender.send(sent, address) == (len(sent), sum(map(len, sent)))
        got = received(receiver, len(sent))
        assert [data for data, _ in got] == sent  # GRO's coalesced runs split back, in order
        assert {source for _, source in got} == {sender.sock.getsockname()}
        assert sender.gso is linux, "the kernel refused UDP segmentation, so only the fallback ran"
    finally:
        sender.close()
        receiver.close()


def test_nothing_waiting_is_an_empty_list():
    sender, receiver = pair()
    try:
        assert not receiver.wait(0.05)
        assert receiver.receive(64) == []
    finally:
        sender.close()
        receiver.close()


class _Refusing:
    """A socket whose kernel has no UDP segmentation: a GSO send fails, a plain one works."""

    def __init__(self, real):
        self.real = real
        self.plain = []

    def sendmsg(self, buffers, ancdata, flags, address):
        raise OSError(errno.EIO, "no GSO here")

    def sendto(self, data, *flags_and_address):
        self.plain.append(data)
        return self.real.sendto(data, *flags_and_address)


def test_a_refused_gso_send_falls_back_for_good(monkeypatch):
    monkeypatch.setattr(udpio, "LINUX_PATHS", True)
    sender, receiver = pair()
    real = sender.sock
    try:
        sender.sock = _Refusing(real)
        sent = [wg_datagram(i, size=500) for i in range(5)]
        assert sender.send(sent, receiver.sock.getsockname()) == (5, 2500)
        assert sender.gso is False and sender.sock.plain == sent
        assert [data for data, _ in received(receiver, 5)] == sent
    finally:
        sender.sock = real
        sender.close()
        receiver.close()


def test_a_full_or_failing_send_loses_the_datagrams_quietly():
    sender, receiver = pair()
    try:
        assert sender.send([wg_datagram(1)], ("127.0.0.1", 0)) == (0, 0)  # port 0: refused by the kernel
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("linux", [True, False])
def test_take_waits_for_the_first_then_takes_what_is_there(linux, monkeypatch):
    monkeypatch.setattr(udpio, "LINUX_PATHS", linux)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    sender, receiver = Port(a, 0.2), Port(b, 0.2)
    try:
        started = time.monotonic()
        assert receiver.take(64) == []  # nothing: back after about the timeout, not forever
        assert 0.1 <= time.monotonic() - started <= 2.0
        sent = [wg_datagram(i) for i in range(5)]
        for datagram in sent:
            a.sendto(datagram, b.getsockname())
        got = []
        while len(got) < 5:
            got += receiver.take(64)
        assert [d for d, _ in got] == sent
    finally:
        sender.close()
        receiver.close()


class _RefusingConnected:
    """A connected socket whose kernel has no UDP segmentation (the server's pipe to WireGuard)."""

    def __init__(self, real):
        self.real = real
        self.plain = []

    def sendmsg(self, buffers, ancdata, flags):
        raise OSError(errno.EIO, "no GSO here")

    def send(self, data, flags):
        self.plain.append(data)
        return self.real.send(data, flags)


def test_send_runs_on_a_connected_socket_counts_what_is_lost_and_falls_back():
    """The server's tunnel pipe sends through the same loop: connected (no address), a refused GSO send
    going out one by one, and datagrams to a port nobody listens on counted as lost."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    try:
        sent = [wg_datagram(i, size=500) for i in range(4)]
        assert udpio.send_runs(_RefusingConnected(sender), sent, True) == (4, 2000, 0, False)
        assert [receiver.recv(2048) for _ in sent] == sent
        assert udpio.send_runs(sender, sent[:1], False) == (1, 500, 0, False)  # the control: one goes out
        assert receiver.recv(2048) == sent[0]
        receiver.close()  # nobody listens now: the kernel's ICMP makes a later send fail
        lost = 0
        for _ in range(50):
            lost += udpio.send_runs(sender, sent[:1], False)[2]
            if lost:
                break
            time.sleep(0.01)
        assert lost == 1
    finally:
        sender.close()
        receiver.close()
