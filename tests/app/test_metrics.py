"""Prometheus metrics: /metrics, the counters at each event, multiprocess mode."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app, metrics
from app.helper import HelperClient, HelperUnavailable
from tests.conftest import API_KEYS, SECRET, FakeHelper, make_key
from wghelper import protocol

ROOT = Path(__file__).parents[2]
WG_INIT = b"\x01\x00\x00\x00" + b"i" * 144  # shaped like a handshake initiation
WG_DATA = b"\x04\x00\x00\x00" + b"d" * 60


def parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(client, key=API_KEYS[0]):
    response = client.get("/metrics", headers={"X-API-Key": key})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return parse(response.get_data(as_text=True))


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_requires_the_api_key(client):
    for headers in ({}, {"X-API-Key": "not-a-valid-key-0123456789"}, {"Authorization": "Bearer x"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.get_json() == {"success": False, "error": {"code": "UNAUTHORIZED",
                                                                   "message": "Invalid or missing API key"}}
    assert client.get("/metrics", headers={"X-API-Key": API_KEYS[1]}).status_code == 200


def test_metrics_in_openapi(client):
    doc = client.get("/openapi.json").get_json()
    operation = doc["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"apiKey": []}]
    assert "text/plain" in operation["responses"]["200"]["content"] and "401" in operation["responses"]


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


def test_pool_exhausted_and_pool_gauges(settings, auth, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ORBMESH_"):
            monkeypatch.delenv(name)
    app = create_app(dict(settings, POOL="10.9.0.0/29"))
    app.extensions["orbmesh_helper"] = FakeHelper()
    client = app.test_client()
    before = scrape(client)
    assert value(before, "orbmesh_pool_addresses") == 5  # .2-.6: without network, gateway, broadcast
    for n in range(5):
        assert client.post("/wireguard/connect", json={"publicKey": make_key(n + 1)},
                           headers=auth("u", "d%d" % n)).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(9)}, headers=auth("u", "d9")).status_code == 503
    after = scrape(client)
    assert delta(before, after, "orbmesh_connect_requests_total", result="pool_exhausted") == 1
    assert value(after, "orbmesh_pool_free_addresses") == 0
    assert value(after, "orbmesh_peers", source="client") == 5


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


WORKER = textwrap.dedent("""
    import os, sys
    from app import metrics
    assert metrics.MULTIPROCESS
    count = int(sys.argv[1])
    metrics.CONNECTS.labels("ok").inc(count)
    metrics.CONNECTS.labels("helper_error").inc()
    metrics.TUNNEL_SESSIONS.labels("ws").inc()
    metrics.HELPER_LATENCY.labels("apply_peers").observe(0.003)
    metrics.tunnel_meter("http").up(100)
    print(os.getpid())
""")

SCRAPER = textwrap.dedent("""
    import sys
    from app import create_app
    app = create_app({"DB_PATH": sys.argv[1], "JWT_SECRET": sys.argv[2], "API_KEYS": [sys.argv[3]],
                      "RECONCILE_CHECK_INTERVAL": 0})
    response = app.test_client().get("/metrics", headers={"X-API-Key": sys.argv[3]})
    assert response.status_code == 200, response.status_code
    sys.stdout.write(response.get_data(as_text=True))
""")

REAPER = textwrap.dedent("""
    import sys, types
    from app.metrics import child_exit
    child_exit(None, types.SimpleNamespace(pid=int(sys.argv[1])))
""")


def test_multiprocess_values_are_summed_across_workers(tmp_path):
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORBMESH_", "PROMETHEUS_", "prometheus_"))}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(multiproc), PYTHONPATH=str(ROOT))

    def run(script, *args):
        done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    pids = [int(run(WORKER, 2)), int(run(WORKER, 3))]
    assert pids[0] != pids[1] and any(multiproc.iterdir())

    def scrape_all():
        return parse(run(SCRAPER, tmp_path / "db.sqlite", SECRET, API_KEYS[0]))

    samples = scrape_all()
    assert value(samples, "orbmesh_connect_requests_total", result="ok") == 5
    assert value(samples, "orbmesh_connect_requests_total", result="helper_error") == 2
    assert value(samples, "orbmesh_helper_call_duration_seconds_count", command="apply_peers") == 2
    assert value(samples, "orbmesh_tunnel_bytes_total", transport="http", direction="up") == 200
    # Both "workers" exited without closing their session; livesum keeps them until gunicorn says so.
    assert value(samples, "orbmesh_tunnel_sessions", transport="ws") == 2
    # The scrape-time gauges are there too, once, not per worker.
    assert value(samples, "orbmesh_peers", source="client") == 0
    assert value(samples, "orbmesh_pool_addresses") == 65536 - 3

    run(REAPER, pids[0])
    samples = scrape_all()
    assert value(samples, "orbmesh_tunnel_sessions", transport="ws") == 1
    assert value(samples, "orbmesh_connect_requests_total", result="ok") == 5  # counters survive the worker


def test_child_exit_without_multiprocess_dir_is_harmless(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    metrics.child_exit(None, type("Worker", (), {"pid": 12345})())
