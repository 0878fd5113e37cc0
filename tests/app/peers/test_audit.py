"""The audit log: who, what, when, request id; rotation shared by processes; no secrets."""
import json
import multiprocessing
import os

import pytest

from app.peers import audit, reconcile
from tests.conftest import API_KEYS, make_key


def lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def audit_path(app):
    return app.config["AUDIT_LOG"]


def test_default_path_is_beside_the_database(app):
    assert app.config["AUDIT_LOG"] == os.path.join(os.path.dirname(app.config["DB_PATH"]), "audit.log")


def test_lifecycle_events_say_who_what_when_and_request_id(app, client, auth, internal, fake_helper, audit_path):
    headers = dict(auth("u1", "d1"), **{"X-Request-ID": "req-connect-1"})
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=headers).status_code == 200
    assert client.post("/wireguard/connect", json={"publicKey": make_key(2)}, headers=auth("u1", "d1")).status_code == 200
    assert client.post("/wireguard/add-peer", headers=internal, json={
        "userUuid": "u1", "publicKey": make_key(3), "allowedIPs": "10.8.7.7/32", "assignedIP": "10.8.7.7"}
    ).status_code == 200
    assert client.post("/wireguard/disconnect", json={}, headers=auth("u1", "d1")).status_code == 200
    assert client.post("/wireguard/remove-peer", headers=internal, json={"userUuid": "u1"}).status_code == 200
    fake_helper.fail = "unavailable"  # a failed call is not an event
    assert client.post("/wireguard/connect", json={"publicKey": make_key(4)}, headers=auth("u2", "d2")).status_code == 503

    events = lines(audit_path)
    assert [e["event"] for e in events] == ["connect", "connect", "add-peer", "disconnect", "remove-peer"]
    first = events[0]
    assert first["request_id"] == "req-connect-1" and first["time"].endswith("Z")
    assert first["actor"] == {"type": "device", "user": "u1", "device": "d1"}
    assert first["peer"] == {"public_key": make_key(1), "address": "10.8.0.2", "user": "u1", "device": "d1",
                             "source": "client"}
    assert events[1]["rekeyed"] is True and events[1]["peer"]["public_key"] == make_key(2)
    assert events[2]["actor"] == {"type": "api_key", "key_id": audit.key_id(API_KEYS[0])}
    assert events[2]["peer"]["source"] == "orbnet" and events[2]["updated"] is False
    assert events[4]["peer"]["public_key"] == make_key(3)
    assert all(len(e["request_id"]) == 32 for e in events[1:])


def test_reconcile_repairs_are_audited(app, client, auth, fake_helper, audit_path):
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth()).status_code == 200
    fake_helper.sync = lambda peers, since=None: {"added": 1, "removed": 2, "updated": 0}
    reconcile.Watcher(app.config, helper=fake_helper, audit_log=app.extensions["orbmesh_audit"]).check_once()
    event = lines(audit_path)[-1]
    assert (event["event"], event["actor"], event["added"], event["removed"]) == ("reconcile", {"type": "system"}, 1, 2)
    assert "updated" not in event and event["generation"] == "gen-1"


def test_no_secret_in_the_audit_log(app, client, token, internal, audit_path):
    device_token = token("u1", "d1")
    client.post("/wireguard/connect", json={"publicKey": make_key(1)},
                headers={"Authorization": "Bearer " + device_token})
    client.post("/wireguard/add-peer", headers=internal, json={
        "userUuid": "u1", "publicKey": make_key(3), "allowedIPs": "10.8.7.7/32", "assignedIP": "10.8.7.7"})
    client.post("/wireguard/remove-peer", headers=internal, json={"userUuid": "u1"})
    text = open(audit_path).read()
    assert text.count("\n") == 4  # connect, add-peer, remove-peer of both
    for secret in [device_token, device_token.rsplit(".", 1)[1], app.config["JWT_SECRET"]] + API_KEYS:
        assert secret not in text


def test_audit_off(settings, monkeypatch):
    from app import create_app
    app = create_app(dict(settings, AUDIT_LOG="off"))
    assert app.extensions["orbmesh_audit"] is None


def test_rotation_keeps_backups_and_drops_the_oldest(tmp_path):
    path = str(tmp_path / "a.log")
    log = audit.AuditLog(path, max_bytes=1024, backups=2)
    for i in range(60):
        assert log.write("connect", n=i)
    log.close()
    files = [path, path + ".1", path + ".2"]
    assert not os.path.exists(path + ".3")
    assert all(0 < os.path.getsize(f) <= 1024 for f in files)
    numbers = [e["n"] for f in reversed(files) for e in lines(f)]
    assert numbers == list(range(60 - len(numbers), 60))  # newest kept, in order, none split


def _writer(path, worker, count):
    log = audit.AuditLog(path, max_bytes=2048, backups=1000)
    for i in range(count):
        log.write("connect", worker=worker, n=i, pad="x" * (i % 50))
    log.close()


def test_rotation_is_safe_across_processes(tmp_path):
    path = str(tmp_path / "shared.log")
    workers, count = 4, 300
    procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, w, count))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    files = [path] + sorted((os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.startswith("shared.log.")
                             and not f.endswith(".lock")), key=lambda f: int(f.rsplit(".", 1)[1]))
    assert len(files) > 10  # it really rotated, many times
    assert all(os.path.getsize(f) <= 2048 for f in files)
    seen = [(e["worker"], e["n"]) for f in files for e in lines(f)]  # every line parses: none torn
    assert sorted(seen) == [(w, i) for w in range(workers) for i in range(count)]  # none lost, none twice


def test_a_failed_write_is_counted_and_the_request_goes_on(app, client, auth, audit_path):
    from app.ops import metrics
    before = metrics.AUDIT_FAILURES._value.get()
    os.makedirs(audit_path)  # a directory where the file should be: open() fails
    response = client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth())
    assert response.status_code == 200
    assert metrics.AUDIT_FAILURES._value.get() == before + 1


def test_a_short_write_on_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    """A full tmpfs takes a line up to its last free page and refuses the rest (write() returns less).

    The partial line must not stay: the next line would be glued to it and
    neither would parse (the full-disk fault test, tests/e2e/test_faults_e2e.py).
    """
    path = str(tmp_path / "a.log")
    log = audit.AuditLog(path, max_bytes=1 << 20, backups=1)
    assert log.write("connect", n=0)
    real_write = os.write

    def disk_full(fd, data):
        return real_write(fd, data[:len(data) // 2])  # what the kernel does with a few bytes free

    monkeypatch.setattr(audit.os, "write", disk_full)
    assert log.write("connect", n=1) is False  # counted and sent to the app log instead
    monkeypatch.setattr(audit.os, "write", real_write)
    assert log.write("connect", n=2)
    log.close()
    assert [e["n"] for e in lines(path)] == [0, 2]


def test_a_reconcile_between_a_connects_commit_and_its_helper_call_adds_that_peer(app, client, auth,
                                                                                   fake_helper, audit_path):
    """Why tests/e2e/test_faults_e2e.py once counted 36 audit lines for 35 connects.

    A connect commits its row, then asks the helper (outside the lock, so
    connects do not queue behind helper calls).  A worker that boots late
    runs its first, eager reconcile whenever it starts; landing between the
    two, it finds the row without its peer and adds the peer itself, and
    audits that as a repair (``added: 1``).  The connect's own apply then
    finds the peer there.  Both lines are true: one peer, one connect event,
    and a reconcile line that is not a connect.
    """
    real_sync, real_apply = fake_helper.sync, fake_helper.apply

    def counting_sync(peers, since=None):
        added = [p for p in peers if p.public_key not in fake_helper.peers]
        real_sync(peers, since)
        return {"added": len(added), "removed": 0, "updated": 0}

    def apply_after_a_late_workers_first_round(add=(), remove=()):
        late = reconcile.Watcher(app.config, helper=fake_helper, audit_log=app.extensions["orbmesh_audit"])
        late.check_once()
        return real_apply(add, remove)

    fake_helper.sync = counting_sync
    fake_helper.apply = apply_after_a_late_workers_first_round
    assert client.post("/wireguard/connect", json={"publicKey": make_key(1)}, headers=auth()).status_code == 200
    events = lines(audit_path)
    assert [(e["event"], e.get("added")) for e in events] == [("reconcile", 1), ("connect", None)]
    assert events[0]["actor"] == {"type": "system"} and events[1]["peer"]["public_key"] == make_key(1)
