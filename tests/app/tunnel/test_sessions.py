"""Tunnel sessions in one worker: the per-device cap, the UDP pipe, the HTTP sessions' queue and reaping."""
import os
import resource
import socket
import threading
import time

import pytest

from app.api.errors import ApiError
from app.failures import TooManySessions
from app.tunnel.sessions import HttpSession, HttpSessions, SessionSlots, UdpPipe

WG_DATA = b"\x04\x00\x00\x00" + b"d" * 28  # shaped like a transport data message


def wait_for(condition, what):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def test_slots_cap_each_device_separately():
    slots = SessionSlots(2)
    slots.acquire(("u", "d1"))
    slots.acquire(("u", "d1"))
    with pytest.raises(TooManySessions) as info:
        slots.acquire(("u", "d1"))
    assert info.value.code == "TOO_MANY_SESSIONS"
    slots.acquire(("u", "d2"))  # another device has its own two
    slots.release(("u", "d1"))
    slots.acquire(("u", "d1"))
    assert (slots.held(("u", "d1")), slots.held(("u", "d2")), slots.held(("u", "d3"))) == (2, 1, 0)


def test_pipe_passes_only_wireguard_up_and_counts_both_ways(wireguard):
    pipe = UdpPipe(*wireguard.getsockname())
    try:
        pipe.send([WG_DATA, b"not wireguard", WG_DATA + b"x"])
        first, client = wireguard.recvfrom(2048)
        second, _ = wireguard.recvfrom(2048)
        assert (first, second) == (WG_DATA, WG_DATA + b"x")
        wireguard.sendto(b"down", client)
        assert pipe.receive_many(5, 64) == [b"down"]
        assert pipe.receive_many(0.01, 64) == []
        counters = pipe.counters
        assert (counters.up_packets, counters.down_packets, counters.dropped) == (2, 1, 1)
    finally:
        pipe.close()


def test_a_full_queue_drops_the_oldest_and_take_keeps_its_limits(wireguard):
    pipe = UdpPipe(*wireguard.getsockname())
    session = HttpSession(("u", "d", "s"), pipe, queue_size=3)
    try:
        pipe.send([WG_DATA])
        _, client = wireguard.recvfrom(2048)
        for n in range(5):
            wireguard.sendto(b"%d" % n * 10, client)
        wait_for(lambda: pipe.counters.down_packets == 5, "five datagrams read")
        assert pipe.counters.dropped == 2  # 0 and 1 pushed out
        assert session.take(0, max_count=1) == [b"2" * 10]
        assert session.take(0, max_bytes=12) == [b"3" * 10]  # a second record would not fit
        assert session.take(0) == [b"4" * 10]
        assert session.take(0.05) == []  # nothing queued: an empty answer after the wait
    finally:
        session.close()


def test_idle_sessions_are_reaped_and_give_their_slot_back(wireguard):
    config = {"TUNNEL_TARGET_HOST": "127.0.0.1", "LISTEN_PORT": wireguard.getsockname()[1], "TUNNEL_QUEUE": 8,
              "TUNNEL_SESSION_IDLE": 60, "TUNNEL_MAX_PARKED": 2}
    slots = SessionSlots(1)
    sessions = HttpSessions(config, slots)
    device = ("u", "d")

    def refuse():
        raise ApiError("RATE_LIMITED", "slow down")
    with pytest.raises(ApiError):
        sessions.get(device, "a", on_new=refuse)
    assert slots.held(device) == 0 and len(sessions) == 0  # refused before a slot or a socket was taken
    first = sessions.get(device, "a")
    assert sessions.get(device, "a") is first and slots.held(device) == 1
    with pytest.raises(TooManySessions):
        sessions.get(device, "b")  # the device's only slot is taken
    assert sessions.reap() == 0  # not idle yet
    assert sessions.reap(now=float("inf")) == 1
    assert first.closed and slots.held(device) == 0 and len(sessions) == 0
    second = sessions.get(device, "b")
    assert second is not first
    assert sessions.reap(now=float("inf")) == 1


def test_closing_the_sessions_ends_parked_takes_and_frees_the_slots(wireguard):
    """A stopping worker (app/ops/shutdown.py): every session closed at once, a parked take returns."""
    import threading
    config = {"TUNNEL_TARGET_HOST": "127.0.0.1", "LISTEN_PORT": wireguard.getsockname()[1], "TUNNEL_QUEUE": 8,
              "TUNNEL_SESSION_IDLE": 60, "TUNNEL_MAX_PARKED": 8}
    slots = SessionSlots(2)
    sessions = HttpSessions(config, slots)
    first, second = sessions.get(("u", "d1"), "a"), sessions.get(("u", "d2"), "a")
    taken = []
    parked = threading.Thread(target=lambda: taken.append(sessions.take(first, 30)))
    parked.start()
    started = time.monotonic()
    sessions.close()
    parked.join(10)
    assert taken == [[]] and time.monotonic() - started < 10
    assert first.closed and second.closed and len(sessions) == 0
    assert slots.held(("u", "d1")) == slots.held(("u", "d2")) == 0


def test_parked_polls_per_device_are_bounded_the_oldest_answers_first(wireguard):
    """Three polls of one device with room for two: the first answers at once, empty; another
    device's poll is untouched (control), and the two newest still wait for data."""
    config = {"TUNNEL_TARGET_HOST": "127.0.0.1", "LISTEN_PORT": wireguard.getsockname()[1], "TUNNEL_QUEUE": 8,
              "TUNNEL_SESSION_IDLE": 60, "TUNNEL_MAX_PARKED": 2}
    sessions = HttpSessions(config, SessionSlots(4))
    answers = {}

    def poll(name, device=("u", "d")):
        session = sessions.get(device, "s-" + name)
        started = time.monotonic()
        answers[name] = (sessions.take(session, 30), time.monotonic() - started)

    threads = []
    try:
        for name, device in (("other", ("u", "e")), ("first", ("u", "d")), ("second", ("u", "d"))):
            threads.append(threading.Thread(target=poll, args=(name, device), daemon=True))
            threads[-1].start()
            wait_for(lambda n=len(threads): sum(sessions.parked(d) for d in (("u", "d"), ("u", "e"))) == n,
                     "poll %s parked" % name)
        third = threading.Thread(target=poll, args=("third",), daemon=True)
        third.start()
        wait_for(lambda: "first" in answers, "the oldest poll to be answered")
        assert answers["first"][0] == [] and answers["first"][1] < 25
        assert sessions.parked(("u", "d")) == 2 and sessions.parked(("u", "e")) == 1
        assert set(answers) == {"first"}
        # the two that still wait get data as usual
        for name in ("second", "third"):
            session = sessions.get(("u", "d"), "s-" + name)
            session.pipe.send([WG_DATA])
            _, client = wireguard.recvfrom(2048)
            wireguard.sendto(b"to " + name.encode(), client)
        wait_for(lambda: {"second", "third"} <= set(answers), "the waiting polls to get their data")
        assert answers["second"][0] == [b"to second"] and answers["third"][0] == [b"to third"]
    finally:
        for session in list(sessions._sessions.values()):
            session.close()
        for thread in threads:
            thread.join(timeout=5)


def test_a_lazy_pipe_opens_its_socket_with_the_first_wireguard_datagram(wireguard):
    pipe = UdpPipe(*wireguard.getsockname(), lazy=True)
    try:
        assert pipe.sock is None
        pipe.send([b"not wireguard"])
        assert pipe.sock is None  # nothing was sent, so nothing can come back
        pipe.send([WG_DATA])
        assert pipe.sock is not None and wireguard.recvfrom(2048)[0] == WG_DATA
    finally:
        pipe.close()


def test_equal_sized_runs_go_out_segmented_and_arrive_as_separate_datagrams(wireguard):
    """Eleven datagrams in two UDP_SEGMENT sends (ten of 1,400 bytes and a shorter one, then a
    larger one alone) reach WireGuard as eleven datagrams, in order, none merged."""
    wireguard.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    pipe = UdpPipe(*wireguard.getsockname())
    sent = [WG_DATA[:4] + bytes([i]) * 1396 for i in range(10)] + [WG_DATA, WG_DATA[:4] + bytes(1496)]
    try:
        pipe.send(sent)
        got = [wireguard.recvfrom(65535)[0] for _ in sent]
        assert got == sent
        assert UdpPipe.gso, "the kernel refused UDP segmentation, so only the fallback ran"
        assert (pipe.counters.up_packets, pipe.counters.up_bytes) == (12, sum(map(len, sent)))
    finally:
        pipe.close()


def test_a_pipe_whose_descriptor_is_past_1024_still_receives(wireguard):
    """A worker holding thousands of connections hands out descriptors past select()'s limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.dup(0) for _ in range(1100)]
    pipe = UdpPipe(*wireguard.getsockname())
    try:
        assert pipe.sock.fileno() > 1024, "the descriptor is low: nothing tested"
        pipe.send([WG_DATA])
        _, client = wireguard.recvfrom(2048)
        wireguard.sendto(b"down", client)
        assert pipe.receive_many(5, 64) == [b"down"]
    finally:
        pipe.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
