"""Prometheus instruments: the counters at each event, helper latency, tunnel sessions and datagrams."""
import os
import socket
import threading

import pytest

from app import create_app
from app.helper import HelperClient, HelperUnavailable
from app.ops import metrics
from tests.app.scrape import delta, scrape, value
from tests.conftest import FakeHelper, make_key
from wghelper import protocol

WG_INIT = b"\x01\x00\x00\x00" + b"i" * 144  # shaped like a handshake initiation
WG_DATA = b"\x04\x00\x00\x00" + b"d" * 60


def test_connect_and_disconnect_results(client, auth, token, fake_helper):
    before = scrape(client)
    ok = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth("u1", "d1"))
    assert ok.status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(2)},
                       headers=auth("u1", "d2")).status_code == 200
    # The same key from another device.
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                       headers=auth("u2", "d1")).status_code == 409
    assert client.post("/wireguard/connect", json={"publicKey": make_key(3)},
                       headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/wireguard/connect", json={"publicKey": "short"}, headers=auth("u3", "d1")).status_code == 400
    assert client.post("/wireguard/connect", data=b"{", headers=auth("u3", "d1")).status_code == 400
    fake_helper.fail = "failed"
    assert client.post("/wireguard/connect", json={"publicKey": make_key(4)}, headers=auth("u4", "d1")).status_code == 502
    assert client.post("/wireguard/disconnect", headers=auth("u1", "d2")).status_code == 502
    fake_helper.fail = "unavailable"
    assert client.post("/wireguard/connect", json={"publicKey": make_key(5)}, headers=auth("u5", "d1")).status_code == 503
    fake_helper.fail = None
    assert client.post("/wireguard/disconnect", headers=auth("u1", "d2")).status_code == 200
    assert client.post("/wireguard/disconnect", headers=auth("u1", "d2")).status_code == 200  # idempotent
    assert client.post("/wireguard/disconnect", headers={}).status_code == 401
    after = scrape(client)

    name = "orbmesh_connect_requests_total"
    assert {r: delta(before, after, name, result=r) for r in metrics.RESULTS if delta(before, after, name, result=r)} \
        == {"ok": 2, "conflict": 1, "unauthorized": 1, "invalid": 2, "helper_error": 1, "helper_unavailable": 1}
    name = "orbmesh_disconnect_requests_total"
    assert {r: delta(before, after, name, result=r) for r in metrics.RESULTS if delta(before, after, name, result=r)} \
        == {"ok": 2, "helper_error": 1, "unauthorized": 1}
    # Gauges come from the database: one client peer left, nothing of the failures.
    assert value(after, "orbmesh_peers", source="client") == 1
    assert value(after, "orbmesh_peers", source="orbnet") == 0
    assert value(after, "orbmesh_pool_addresses") == 65536 - 3
    assert value(after, "orbmesh_pool_free_addresses") == 65536 - 3 - 1


def test_add_and_remove_peer_results(client, internal, fake_helper):
    body = {"userUuid": "orb-1", "publicKey": make_key(10), "assignedIP": "10.8.3.4",
            "allowedIPs": "10.8.3.4/32", "endpoint": "203.0.113.5:51820", "noKeepalive": False}
    before = scrape(client)
    response = client.post("/wireguard/add-peer", json=body, headers=internal)
    assert response.status_code == 200, response.get_json()
    assert client.post("/wireguard/add-peer", json=dict(body, publicKey=make_key(11)),
                       headers=internal).status_code == 409
    assert client.post("/wireguard/add-peer", json=body).status_code == 401
    middle = scrape(client)
    assert value(middle, "orbmesh_peers", source="orbnet") == 1
    assert client.post("/wireguard/remove-peer", json={"userUuid": "orb-1"}, headers=internal).status_code == 200
    assert client.post("/wireguard/remove-peer", json={"userUuid": "orb-1"}, headers=internal).status_code == 404
    assert client.post("/wireguard/remove-peer", json={"nope": 1}, headers=internal).status_code == 400
    after = scrape(client)
    assert delta(before, after, "orbmesh_add_peer_requests_total", result="ok") == 1
    assert delta(before, after, "orbmesh_add_peer_requests_total", result="conflict") == 1
    assert delta(before, after, "orbmesh_add_peer_requests_total", result="unauthorized") == 1
    assert delta(before, after, "orbmesh_remove_peer_requests_total", result="ok") == 1
    assert delta(before, after, "orbmesh_remove_peer_requests_total", result="not_found") == 1
    assert delta(before, after, "orbmesh_remove_peer_requests_total", result="invalid") == 1
    assert value(after, "orbmesh_peers", source="orbnet") == 0


def _one_shot_helper(path, reply):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as stream:
            request = protocol.decode(protocol.read_frame(stream))
            conn.sendall(protocol.encode(dict(reply, id=request["id"])))
        server.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_helper_call_latency_by_command(client, tmp_path):
    before = scrape(client)
    path = str(tmp_path / "h.sock")
    thread = _one_shot_helper(path, {"ok": True, "result": {"generation": "g"}})
    assert HelperClient(path, 2).hello() == {"generation": "g"}
    thread.join(5)
    with pytest.raises(HelperUnavailable):
        HelperClient(str(tmp_path / "absent.sock"), 1).status()
    after = scrape(client)
    name = "orbmesh_helper_call_duration_seconds"
    assert delta(before, after, name + "_count", command="hello") == 1
    assert delta(before, after, name + "_count", command="status") == 1
    assert delta(before, after, name + "_bucket", command="hello", le="+Inf") == 1
    assert 0 < delta(before, after, name + "_sum", command="hello") < 2


@pytest.fixture
def wireguard_udp():
    """A UDP socket standing in for WireGuard: answers each datagram with WG_DATA."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    received = []

    def serve():
        try:
            while True:
                data, peer = sock.recvfrom(65535)
                received.append(data)
                sock.sendto(WG_DATA, peer)
        except OSError:
            pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], received
    sock.close()


def test_http_tunnel_sessions_bytes_and_drops(settings, auth, monkeypatch, wireguard_udp):
    port, received = wireguard_udp
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, LISTEN_PORT=port, TUNNEL_TARGET_HOST="127.0.0.1"))
    app.extensions["orbmesh_helper"] = FakeHelper()
    client = app.test_client()
    before = scrape(client)
    batch = b"".join(len(d).to_bytes(2, "big") + d for d in (WG_INIT, b"not wireguard at all, dropped!!!!"))
    response = client.post("/wireguard/tunnel", data=batch, headers=dict(
        auth(), **{"Content-Type": "application/x-wireguard-batch", "X-Tunnel-Wait": "3"}))
    assert response.status_code == 200
    assert response.get_data() == len(WG_DATA).to_bytes(2, "big") + WG_DATA
    assert received == [WG_INIT]
    during = scrape(client)
    assert delta(before, during, "orbmesh_tunnel_sessions", transport="http") == 1
    assert delta(before, during, "orbmesh_tunnel_packets_total", transport="http", direction="up") == 1
    assert delta(before, during, "orbmesh_tunnel_bytes_total", transport="http", direction="up") == len(WG_INIT)
    assert delta(before, during, "orbmesh_tunnel_packets_total", transport="http", direction="down") == 1
    assert delta(before, during, "orbmesh_tunnel_bytes_total", transport="http", direction="down") == len(WG_DATA)
    assert delta(before, during, "orbmesh_tunnel_dropped_datagrams_total", transport="http",
                 reason="not_wireguard") == 1
    assert app.extensions["orbmesh_http_sessions"].reap(now=float("inf")) == 1
    after = scrape(client)
    assert delta(before, after, "orbmesh_tunnel_sessions", transport="http") == 0


def test_ws_session_gauge_tracks_the_handler(client):
    before = scrape(client)
    with metrics.tunnel_session("ws"):
        assert delta(before, scrape(client), "orbmesh_tunnel_sessions", transport="ws") == 1
    assert delta(before, scrape(client), "orbmesh_tunnel_sessions", transport="ws") == 0


def test_child_exit_without_multiprocess_dir_is_harmless(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    metrics.child_exit(None, type("Worker", (), {"pid": 12345})())
