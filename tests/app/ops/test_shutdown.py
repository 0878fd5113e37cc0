"""A stopping worker ends its tunnel sessions (app/ops/shutdown.py): chained onto the worker's SIGTERM."""
import os
import signal
import time

import pytest

from app.ops import shutdown

WG_DATA = b"\x04\x00\x00\x00" + b"d" * 28


class Session:
    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1
        if self.closed > 1:
            raise RuntimeError("closed twice")  # close_all goes on regardless


@pytest.fixture
def stopping():
    """Module state as a fresh worker has it; the worker's SIGTERM handler put back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    saved = list(shutdown._installed)
    shutdown._installed.clear()
    yield shutdown._stopping
    shutdown._stopping.clear()
    shutdown._installed[:] = saved
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_reaches_the_worker_and_closes_every_tracked_session(stopping):
    calls = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # gunicorn's handle_exit
    shutdown.init_app(None)
    sessions = [shutdown.track(Session()) for _ in range(3)]
    sessions[0].close()  # closed already: the second close raises, the others still close
    assert not stopping.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not all(s.closed for s in sessions) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [signal.SIGTERM] and stopping.is_set()
    assert [s.closed for s in sessions] == [2, 1, 1]
    late = shutdown.track(Session())  # one that starts as the worker stops is closed at once
    assert late.closed == 1


def test_without_a_worker_handler_nothing_is_chained(stopping):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # tests, the CLI: SIGTERM ends the process anyway
    shutdown.init_app(None)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and shutdown._installed == []


def test_a_stopping_worker_refuses_new_tunnels(client, auth, stopping):
    headers = dict(auth(), **{"X-Tunnel-Wait": "0"})
    stopping.set()
    response = client.post("/wireguard/tunnel", data=WG_DATA, content_type="application/octet-stream",
                           headers=headers)
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "SERVER_STOPPING"
    response = client.get("/wireguard/ws", headers=dict(auth(), Connection="Upgrade", Upgrade="websocket",
                                                        **{"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                           "Sec-WebSocket-Version": "13"}))
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "SERVER_STOPPING"
    # Control: the same request is served when the worker is not stopping.
    stopping.clear()
    response = client.post("/wireguard/tunnel", data=b"", content_type="application/octet-stream",
                           headers=headers)
    assert response.status_code == 204
    client.application.extensions["orbmesh_http_sessions"].close()
