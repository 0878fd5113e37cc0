"""Which local address reaches the server now, and when a connection no longer fits it."""
import socket

import pytest

from orbmesh_relay import route


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    yield sock
    sock.close()


def connected(listener, source=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source:
        sock.bind((source, 0))
    sock.connect(listener.getsockname())
    return sock


def test_source_for_loopback():
    assert route.source_for(("127.0.0.1", 9)) == "127.0.0.1"
    assert route.source_for(("::1", 9)) == "::1"


def test_a_connection_that_fits_its_route_has_not_moved(listener):
    sock = connected(listener)
    try:
        assert route.moved(sock) is None
    finally:
        sock.close()


def test_a_connection_from_another_local_address_has_moved(listener):
    # All of 127/8 is local on Linux: a connection from 127.0.0.5 is what a
    # connection from the laptop's old Wi-Fi address is once the route prefers another.
    sock = connected(listener, source="127.0.0.5")
    try:
        assert route.moved(sock) == "local address changed from 127.0.0.5 to 127.0.0.1"
    finally:
        sock.close()


def test_no_route_at_all(listener, monkeypatch):
    sock = connected(listener)
    try:
        monkeypatch.setattr(route, "source_for", lambda peer: None)
        assert route.moved(sock) == "no route to 127.0.0.1 any more"
    finally:
        sock.close()


def test_nothing_to_compare_on_a_closed_or_unconnected_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert route.moved(sock) is None
    sock.close()
    assert route.moved(sock) is None
