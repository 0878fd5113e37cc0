"""deploy/monitoring/: the alert rules pass promtool (checked and unit-tested), and every query of the
rules and the Grafana dashboard names a metric that GET /metrics of a real app exports."""
import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEYS
from tests.need import need

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC_RE = re.compile(r"\b(orbmesh_[a-z0-9_]+)\b")
PROMETHEUS_OWN = {"up"}  # the scrape's own series, not the app's


def promtool(*args):
    done = subprocess.run([need("promtool"), *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid_and_their_unit_tests_pass():
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_a_broken_expectation_fails_promtool(tmp_path):
    """The control: promtool does judge the tests (a wrong expected alert is reported)."""
    broken = (MONITORING / "alerts_test.yml").read_text().replace("instance: sick}", "instance: well}", 1)
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    (tmp_path / "alerts_test.yml").write_text(broken)
    done = subprocess.run([need("promtool"), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "OrbmeshApiDown" in done.stdout + done.stderr


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(client):
    """Every series name GET /metrics declares (counters with _total, histograms with _bucket, _sum and
    _count, whether or not a sample exists yet), and every label name its samples carry."""
    response = client.get("/metrics", headers={"X-API-Key": API_KEYS[0]})
    assert response.status_code == 200
    names, labels = set(), set()
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
        for sample in family.samples:
            labels |= set(sample.labels)
    return names, labels


def dashboard_queries():
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def rule_queries():
    text = (MONITORING / "alerts.yml").read_text()
    return [m.group(1) for m in re.finditer(r"expr: >?\s*((?:.|\n)*?)\n\s+for:", text)]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_names_an_exported_metric(client, source):
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    assert len(queries) >= 7
    names, _ = exported(client)
    used = {name for query in queries for name in METRIC_RE.findall(query)}
    assert used and not used - names, sorted(used - names)
    for query in queries:  # every query reads the app's metrics (or, in a rule, Prometheus's own `up`)
        assert METRIC_RE.search(query) or re.search(r"\bup\{", query), query


def test_the_check_catches_a_metric_the_app_does_not_export(client):
    names, _ = exported(client)
    assert "orbmesh_usage_bytes_total" in names and "orbmesh_usage_byte_total" not in names


def test_no_metric_carries_a_user(client):
    _, labels = exported(client)
    assert labels and not labels & {"user", "user_id", "userUuid", "device", "device_id", "public_key", "address"}
