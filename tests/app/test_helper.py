"""The helper's client: what goes over the socket, and the connections it keeps."""
import os
import resource
import socket
import threading
import time

import pytest

from app.helper import HelperClient, HelperUnavailable, peer_spec
from app.store import Peer
from tests.conftest import make_key
from wghelper import protocol


class Helper:
    """A helper socket that answers every request; records them, counts connections; can hang up or stall."""

    def __init__(self, path, replies_per_conn=None, stall=False):
        self.accepts = 0
        self.requests = []
        self.replies_per_conn = replies_per_conn
        self.stall = stall
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        answered = 0
        with conn, conn.makefile("rb") as stream:
            while self.replies_per_conn is None or answered < self.replies_per_conn:
                line = protocol.read_frame(stream)
                if line is None:
                    return
                request = protocol.decode(line)
                self.requests.append(request)
                if self.stall:
                    time.sleep(1.0)
                try:
                    conn.sendall(protocol.encode({"id": request["id"], "ok": True, "result": {"n": request["id"]}}))
                except BrokenPipeError:  # the client gave up waiting (the timeout test)
                    return
                answered += 1

    def close(self):
        self.server.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "h.sock")


def peer(n, endpoint=None, keepalive=0, **fields):
    return Peer(id=n, public_key=make_key(n), addr=167772160 + n, user_id="u", device_id="d%d" % n,
                source="client", endpoint=endpoint, keepalive=keepalive, created_at=1.0, updated_at=1.0, **fields)


# --- the wire format ----------------------------------------------------------------

def test_peer_spec_is_what_the_helper_takes():
    assert peer_spec(peer(7, endpoint="203.0.113.5:51820", keepalive=25, mode="bridge", exit_id="x")) == {
        "public_key": make_key(7), "allowed_ips": ["10.0.0.7/32"], "endpoint": "203.0.113.5:51820",
        "keepalive": 25}


def test_apply_and_sync_send_peers_in_the_wire_format(path):
    helper = Helper(path)
    client = HelperClient(path, 2)
    try:
        client.apply(add=[peer(2)], remove=[make_key(9)])
        client.apply(remove=[make_key(3)])
        client.sync([peer(2), peer(4, endpoint="198.51.100.4:4000", keepalive=25)])
    finally:
        client.close()
        helper.close()
    assert [(r["cmd"], r["args"]) for r in helper.requests] == [
        ("apply_peers", {"add": [{"public_key": make_key(2), "allowed_ips": ["10.0.0.2/32"], "endpoint": None,
                                  "keepalive": 0}], "remove": [make_key(9)]}),
        ("apply_peers", {"add": [], "remove": [make_key(3)]}),
        ("sync_peers", {"peers": [
            {"public_key": make_key(2), "allowed_ips": ["10.0.0.2/32"], "endpoint": None, "keepalive": 0},
            {"public_key": make_key(4), "allowed_ips": ["10.0.0.4/32"], "endpoint": "198.51.100.4:4000",
             "keepalive": 25}]}),
    ]


# --- connections kept per process ----------------------------------------------------

def test_calls_share_one_connection(path):
    helper = Helper(path)
    client = HelperClient(path, 2)
    assert [client.call("hello")["n"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert helper.accepts == 1
    client.close()
    helper.close()


def test_a_connection_the_helper_closed_is_not_reused(path):
    helper = Helper(path, replies_per_conn=1)  # hangs up after each answer, as a restarted helper would
    client = HelperClient(path, 2)
    for _ in range(3):
        client.call("hello")
        time.sleep(0.05)  # let the hang-up arrive
    assert helper.accepts == 3
    client.close()
    helper.close()


def test_a_timed_out_connection_is_dropped_so_a_late_reply_is_never_read(path):
    helper = Helper(path, stall=True)
    client = HelperClient(path, 0.2)
    with pytest.raises(HelperUnavailable):
        client.call("hello")
    assert client._idle == []
    helper.stall = False
    assert client.call("hello")["n"] == 2  # its own answer, on a new connection
    assert helper.accepts == 2
    client.close()
    helper.close()


def test_pooled_connections_past_descriptor_1024_are_checked():
    """A worker holding thousands of tunnel sessions hands out descriptors past select()'s limit."""
    from app.helper import _still_open

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.dup(0) for _ in range(1100)]
    ours, helper = socket.socketpair()
    try:
        assert ours.fileno() > 1024, "the descriptor is low: nothing tested"
        assert _still_open(ours)
        helper.close()  # the control: a connection the helper closed is noticed
        assert not _still_open(ours)
    finally:
        ours.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
