"""GET /metrics: the internal API key, the gauges read at scrape time, every worker's values summed."""
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from app import create_app
from app.api.metrics_view import StateCollector
from app.peers.allocator import Allocator
from app.peers.db import init_schema
from tests.app.scrape import delta, parse, scrape, value
from tests.conftest import API_KEYS, SECRET, FakeHelper, make_key

ROOT = Path(__file__).parents[3]


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


def test_state_gauges_are_left_out_while_the_database_is_unavailable(tmp_path):
    """A scrape still answers (with the pool size) when the database does not."""
    allocator = Allocator("10.9.0.0/29", "10.9.0.1")

    def collected(path):
        db = sqlite3.connect(path)
        try:
            return [family.name for family in StateCollector(db, allocator).collect()]
        finally:
            db.close()
    good = str(tmp_path / "good.db")
    init_schema(good)
    assert collected(good) == ["orbmesh_pool_addresses", "orbmesh_peers", "orbmesh_pool_free_addresses",
                               "orbmesh_quarantined_peers"]
    assert collected(str(tmp_path / "empty.db")) == ["orbmesh_pool_addresses"]  # no tables: every query fails


WORKER = textwrap.dedent("""
    import os, sys
    from app.ops import metrics
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
    from app.ops.metrics import child_exit
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
