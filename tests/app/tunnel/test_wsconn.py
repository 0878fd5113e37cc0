"""TunnelWebSocket: the relay loop, its framing modes, its bounds and its liveness rules."""
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from simple_websocket import ConnectionClosed
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

from orbmesh_relay.framing import BATCH_PROTOCOL, decode_batch, encode_batch
from tests.app.tunnel.wspair import PairPipe, Session, pair


def wg(i, size=64):
    """A WireGuard-looking data datagram numbered i."""
    return b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes(size - 8)


def read_events(client, sock, until, pong=True, timeout=10):
    """Feed the client until `until(event)` is true; answer pings on the way (if `pong`)."""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed early"
        client.receive_data(data)
        for event in client.events():
            if isinstance(event, Ping) and pong:
                sock.sendall(client.send(event.response()))
            if until(event):
                return event


def accepted(session):
    return read_events(session.client, session.sock, lambda e: isinstance(e, AcceptConnection))


def datagrams(session, count, batch=False):
    """The next `count` datagrams the client receives (whole messages, split if `batch`)."""
    got, partial = [], bytearray()

    def take(event):
        if isinstance(event, BytesMessage):
            partial.extend(event.data)  # wsproto hands a message over in pieces as they arrive
            if event.message_finished:
                got.extend(decode_batch(bytes(partial)) if batch else [bytes(partial)])
                partial.clear()
        return len(got) >= count

    read_events(session.client, session.sock, take)
    return got


def test_handshake_negotiates_no_extension_and_no_subprotocol_by_default():
    server, client, sock = pair()
    event = read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    assert event.extensions == [] and event.subprotocol is None and not server.batch
    sock.close()


def test_batch_subprotocol_is_accepted_when_offered():
    server, client, sock = pair(subprotocols=["something.else", BATCH_PROTOCOL])
    event = read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    assert event.subprotocol == BATCH_PROTOCOL and server.batch
    sock.close()


def test_detached_session_relays_after_the_request_closes_its_socket():
    """The view hands the connection over and gunicorn closes its descriptor: the copy carries on."""
    server, client, sock = pair()
    read_events(client, sock, lambda e: isinstance(e, AcceptConnection))
    session = server.detach()
    server.sock.close()  # what gunicorn does when the request ends
    with pytest.raises(ConnectionClosed):
        server.close()  # flask-sock's close() after the view: the shell is already closed
    assert not hasattr(session, "environ")  # the request's objects are not kept for the session
    pipe = PairPipe()
    relay = threading.Thread(target=lambda: pipe.__dict__.setdefault("reason", session.serve(pipe, 300.0)))
    relay.start()
    sock.sendall(client.send(Message(data=wg(7))))
    assert pipe.wireguard.recv(65535) == wg(7)
    pipe.wireguard.send(wg(8))
    got = read_events(client, sock, lambda e: isinstance(e, BytesMessage))
    assert got.data == wg(8)
    sock.close()
    relay.join(timeout=10)
    assert pipe.reason == "client closed"
    pipe.close()


def test_one_datagram_per_message_both_ways():
    session = Session()
    accepted(session)
    session.sock.sendall(session.client.send(Message(data=wg(1))))
    assert session.pipe.wireguard.recv(65535) == wg(1)
    for i in range(3):
        session.pipe.wireguard.send(wg(i))
    assert datagrams(session, 3) == [wg(0), wg(1), wg(2)]
    session.close()
    assert session.reason == "client closed"


def test_batch_mode_carries_many_datagrams_per_message_in_order():
    session = Session(subprotocols=[BATCH_PROTOCOL])
    accepted(session)
    session.sock.sendall(session.client.send(Message(data=encode_batch([wg(7), wg(8, 1420)]))))
    assert [session.pipe.wireguard.recv(65535) for _ in range(2)] == [wg(7), wg(8, 1420)]
    for i in range(200):
        session.pipe.wireguard.send(wg(i, 1420))
    assert datagrams(session, 200, batch=True) == [wg(i, 1420) for i in range(200)]
    session.close()


@pytest.mark.parametrize("event,code,subprotocols", [
    (TextMessage(data="hi"), 1003, ()),
    (Message(data=bytes(65536)), 1009, ()),
    (Message(data=b"\x00\x50\x04"), 1007, (BATCH_PROTOCOL,)),  # a record longer than the message
    (Message(data=b"\x00\x01x" * 1000), 1007, (BATCH_PROTOCOL,)),  # records shorter than WireGuard's
])
def test_bad_messages_close_with_their_code(event, code, subprotocols):
    session = Session(subprotocols=subprotocols)
    accepted(session)
    session.sock.sendall(session.client.send(event))
    closed = read_events(session.client, session.sock, lambda e: isinstance(e, CloseConnection))
    assert closed.code == code and session.server.close_sent == code
    session.close()


def test_a_batch_with_a_short_record_sends_nothing_and_closes_with_1007():
    session = Session(subprotocols=[BATCH_PROTOCOL])
    accepted(session)
    session.sock.sendall(session.client.send(Message(data=encode_batch([wg(1)]))))
    assert session.pipe.wireguard.recv(65535) == wg(1)  # the control: a whole batch goes through
    session.sock.sendall(session.client.send(Message(data=encode_batch([wg(2)]) + b"\x00\x1f" + wg(3)[:31])))
    closed = read_events(session.client, session.sock, lambda e: isinstance(e, CloseConnection))
    assert closed.code == 1007
    session.pipe.wireguard.settimeout(0.2)
    with pytest.raises(TimeoutError):  # wg(2), before the short record, did not go on either
        session.pipe.wireguard.recv(65535)
    session.close()


def test_largest_datagram_passes():
    session = Session()
    accepted(session)
    big = b"\x04\x00\x00\x00" + bytes(65531)
    session.sock.sendall(session.client.send(Message(data=big)))
    assert session.pipe.wireguard.recv(65535) == big
    session.close()


def test_client_messages_are_not_queued_in_the_session():
    """32 MiB from the client while nothing reads WireGuard's side: the session holds ~ one message.

    (Before: a reader thread parsed messages into an inbox of 512 messages,
    up to 32 MiB per session, whether or not anything consumed them.)
    """
    session = Session(ping_interval=None)
    accepted(session)
    message = session.client.send(Message(data=b"\x04\x00\x00\x00" + bytes(65000)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(512):
            session.sock.sendall(message)
        session.sock.sendall(session.client.send(Ping(b"sync")))
        read_events(session.client, session.sock, lambda e: isinstance(e, Pong))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert session.pipe.counters.dropped > 0, "the far end took everything: nothing was tested"
    assert peak < 2 * 1024 * 1024, "the session held %d bytes" % peak
    session.close()


def test_unanswered_ping_closes_with_1008():
    session = Session(ping_interval=0.05)
    accepted(session)
    seen = []
    read_events(session.client, session.sock,
                lambda e: seen.append(type(e).__name__) is None and isinstance(e, CloseConnection), pong=False)
    assert seen.count("Ping") == 1 and session.server.close_sent == 1008
    session.close()


def test_frames_from_the_client_count_as_liveness():
    """No pong ever, but datagrams keep coming: alive for many intervals; then silence closes (control)."""
    interval = 0.1
    session = Session(ping_interval=interval)
    accepted(session)
    session.sock.settimeout(0.01)
    started = time.monotonic()
    pings = 0
    while time.monotonic() - started < 10 * interval:
        session.sock.sendall(session.client.send(Message(data=wg(1))))
        time.sleep(interval / 4)
        try:
            data = session.sock.recv(65536)
        except TimeoutError:
            continue
        assert data, "closed while the client was sending"
        session.client.receive_data(data)
        for event in session.client.events():
            assert not isinstance(event, CloseConnection), "closed while the client was sending"
            pings += isinstance(event, Ping)
    assert pings >= 1, "no ping was sent, so the rule was not exercised"
    closed = read_events(session.client, session.sock, lambda e: isinstance(e, CloseConnection), pong=False)
    assert closed.code == 1008
    session.close()


def test_ping_behind_a_long_queue_waits_for_the_client_to_get_there():
    """The client reads slowly through ~8 MB of frames queued ahead of a ping: not taken for dead.

    (Before: the pong deadline ran from when the ping was queued, and the
    session closed with 1008 while the client was still reading frames.)
    """
    interval = 0.2
    session = Session(ping_interval=interval)
    accepted(session)
    total = 6000
    pusher = threading.Thread(target=lambda: [session.pipe.wireguard.send(wg(i, 1400)) for i in range(total)],
                              daemon=True)
    pusher.start()
    got, pings = 0, 0
    session.sock.settimeout(10)
    started = time.monotonic()
    while got < total:
        data = session.sock.recv(16384)
        assert data, "closed after %d frames" % got
        session.client.receive_data(data)
        for event in session.client.events():
            assert not isinstance(event, CloseConnection), "closed with %s after %d frames" % (event.code, got)
            if isinstance(event, Ping):
                pings += 1
                session.sock.sendall(session.client.send(event.response()))
            elif isinstance(event, BytesMessage) and event.message_finished:
                got += 1
        time.sleep(0.002)  # a slow reader: the backlog takes many ping intervals
    assert time.monotonic() - started > 3 * interval, "the client read too fast to test anything"
    assert pings >= 1
    session.close()


def test_a_client_that_reads_nothing_is_dropped():
    session = Session(ping_interval=0.1)
    accepted(session)
    session.pipe.wireguard.settimeout(0.5)
    try:
        while True:  # until the session stops taking datagrams: its buffers are full
            session.pipe.wireguard.send(wg(1, 1400))
    except TimeoutError:
        pass
    session.thread.join(timeout=10)
    assert session.reason == "stalled"
    session.close()


def test_idle_session_closes_with_1000():
    session = Session(idle_timeout=0.2)
    accepted(session)
    closed = read_events(session.client, session.sock, lambda e: isinstance(e, CloseConnection))
    session.thread.join(timeout=10)
    assert closed.code == 1000 and session.reason == "idle"
    session.close()


def send_for(session, message, seconds, every=0.05):
    """Send `message` every `every` s for `seconds` s or until the server closes; the close's code or None."""
    deadline = time.monotonic() + seconds
    session.sock.settimeout(every)
    while time.monotonic() < deadline:
        try:
            session.sock.sendall(session.client.send(message))
        except OSError:
            break  # the server has closed and gone
        try:
            data = session.sock.recv(65536)
        except TimeoutError:
            continue
        session.client.receive_data(data)
        for event in session.client.events():
            if isinstance(event, CloseConnection):
                return event.code
        if not data:
            break
    return None


@pytest.mark.parametrize("subprotocols,junk", [
    ((), Message(data=b"\x09" * 64)),  # no WireGuard message type
    ((), Message(data=b"\x04\x00\x00\x00")),  # too short for one
    ((BATCH_PROTOCOL,), Message(data=b"")),  # an empty batch
    ((BATCH_PROTOCOL,), Message(data=encode_batch([b"\x09" * 64]))),
])
def test_junk_does_not_keep_a_session_open(subprotocols, junk):
    """Only WireGuard datagrams forwarded reset the idle timer (issue 23); junk is dropped and counted."""
    idle = 0.5
    session = Session(idle_timeout=idle, subprotocols=subprotocols)
    accepted(session)
    good = Message(data=encode_batch([wg(1)]) if subprotocols else wg(1))
    # The control: WireGuard datagrams for four idle timeouts keep the session open ...
    assert send_for(session, good, 4 * idle) is None
    forwarded = session.pipe.counters.up_packets
    assert session.reason is None and forwarded > 4
    # ... and junk at the same pace does not: the session closes as idle.
    assert send_for(session, junk, 10 * idle) == 1000
    session.thread.join(timeout=10)
    assert session.reason == "idle" and session.pipe.counters.up_packets == forwarded
    session.close()


def test_hundred_thousand_frames_arrive_whole_and_in_order_under_gevent():
    """Under gevent, as in gunicorn: every frame whole and in order, pings in between."""
    out = subprocess.run([sys.executable, "-m", "tests.app.tunnel.ws_stress"], capture_output=True, text=True,
                         timeout=240, cwd=Path(__file__).parents[3])
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert last.startswith("frames="), out.stderr[-2000:]
    result = dict(field.split("=", 1) for field in last.split(" ", 3))
    assert result["errors"] == "[]"
    assert (result["frames"], result["in_order"]) == ("100000", "True")
    assert int(result["pings"]) > 0, "no ping was interleaved with the frames"
