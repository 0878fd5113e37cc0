"""Connections kept per process: to the helper and to SQLite."""
import socket
import threading
import time

import pytest

from app import store
from app.helper import HelperClient, HelperUnavailable
from wghelper import protocol


class Helper:
    """A helper socket that answers hello; counts connections; can hang up or stall."""

    def __init__(self, path, replies_per_conn=None, stall=False):
        self.accepts = 0
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


def test_database_connections_are_reused_and_left_clean(app):
    with app.app_context():
        first = store.get_db()
        first.execute("BEGIN")  # a request that somehow left a transaction open
    with app.app_context():
        second = store.get_db()
        assert second is first
        assert not second.in_transaction
