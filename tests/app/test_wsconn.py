"""TunnelWebSocket: complete, serialised writes under load, and its closing rules."""
import subprocess
import sys
from pathlib import Path

import pytest
from wsproto.events import (AcceptConnection, CloseConnection, Message, Ping,
                            TextMessage)

from tests.app.wspair import pair


def read_events(client, sock, until):
    """Feed the client until `until(event)` is true; answer pings on the way."""
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed early"
        client.receive_data(data)
        for event in client.events():
            if isinstance(event, Ping):
                sock.sendall(client.send(event.response()))
            if until(event):
                return event


def test_handshake_negotiates_no_extension():
    server, client, sock = pair()
    accepted = read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    assert accepted.extensions == []
    server.close()


def run_stress(server_class):
    """Run tests/app/ws_stress.py under gevent; return its result fields."""
    out = subprocess.run([sys.executable, "-m", "tests.app.ws_stress", server_class], capture_output=True,
                         text=True, timeout=240, cwd=Path(__file__).parents[2])
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert last.startswith("frames="), out.stderr[-2000:]
    return dict(field.split("=", 1) for field in last.split(" ", 3))


def test_hundred_thousand_frames_arrive_whole_while_pings_fly():
    """Under gevent, as in gunicorn: every frame whole and in order, pings in between."""
    result = run_stress("TunnelWebSocket")
    assert result["errors"] == "[]"
    assert (result["frames"], result["in_order"]) == ("100000", "True")
    assert int(result["pings"]) > 0, "no ping was interleaved, so serialised writes were not exercised"


def test_the_stress_test_catches_unsafe_writes():
    """The same load breaks simple-websocket's one send() per frame: the test above can fail.

    (sendall without the lock was a second control, dropped: whether two
    greenlets' partial writes interleave depends on the machine's load, so
    it broke only sometimes.)
    """
    result = run_stress("SingleSend")
    assert result["errors"] != "[]" or result["frames"] != "100000"


@pytest.mark.parametrize("event,code", [(TextMessage(data="hi"), 1003),
                                        (Message(data=bytes(65536)), 1009)])
def test_text_and_oversize_messages_close(event, code):
    server, client, sock = pair()
    read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    sock.sendall(client.send(event))
    closed = read_events(client, sock, lambda e: isinstance(e, CloseConnection))
    assert closed.code == code and server.close_sent == code


def test_largest_datagram_passes():
    server, client, sock = pair()
    read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    sock.sendall(client.send(Message(data=bytes(65535))))
    assert server.receive(timeout=10) == bytes(65535)
    server.close()


def test_inbox_is_bounded_and_counts_drops():
    server, client, sock = pair(inbox_size=4)
    read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    for i in range(10):
        sock.sendall(client.send(Message(data=bytes([i]) * 40)))
    sock.sendall(client.send(Ping(b"sync")))  # the pong tells us all ten were read
    read_events(client, sock, lambda e: type(e).__name__ == "Pong")
    assert server.inbox_dropped == 6
    assert [server.receive(timeout=1)[0] for _ in range(4)] == [6, 7, 8, 9]
    server.close()


def test_unanswered_ping_closes_with_1008():
    server, client, sock = pair(ping_interval=0.05)
    read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    sock.settimeout(10)
    seen = []
    while True:  # read without answering pings
        data = sock.recv(65536)
        assert data
        client.receive_data(data)
        events = list(client.events())
        seen += [type(e).__name__ for e in events]
        if any(isinstance(e, CloseConnection) for e in events):
            break
    assert seen.count("Ping") == 1 and server.close_sent == 1008
