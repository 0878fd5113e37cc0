"""Faults on the real stack: kill -9 the helper, a worker, everything; delete the
interface; lock the database; fill the disk.  After each: every request got an
answer, nothing was allocated for a failed call, and the interface equals the
database.

Each test prints one FAULTS line (what was injected, what was answered, what
was lost); the README figures come from those lines (`pytest -s`).
"""
import collections
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from .conftest import wireguard_go_in
from .netns import children, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for
from .wgclient import WgClient, keypair

pytestmark = pytest.mark.e2e

HELPER_TIMEOUT = 3.0
AUDIT_MAX_BYTES = 2048


@pytest.fixture
def stack_env():
    # A tiny audit log limit, so the two workers rotate it many times under load.
    return {"ORBMESH_HELPER_TIMEOUT": str(HELPER_TIMEOUT), "ORBMESH_DB_BUSY_TIMEOUT": "1",
            "ORBMESH_AUDIT_MAX_BYTES": str(AUDIT_MAX_BYTES), "ORBMESH_AUDIT_BACKUPS": "1000"}


def report(name, **figures):
    print("\nFAULTS %s %s" % (name, json.dumps(figures, sort_keys=True)))


def kill9(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def connect_raw(stack, user, device, key, timeout=60):
    """(status, body, seconds); status None when the connection broke without an answer."""
    start = time.monotonic()
    try:
        status, _, raw = stack.request("POST", "/wireguard/connect", {"publicKey": key},
                                       {"Authorization": "Bearer " + stack.token(user, device)}, timeout=timeout)
        body = json.loads(raw)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, refused, or a torn reply
        status, body = None, {"exception": type(exc).__name__}
    return status, body, time.monotonic() - start


def storm(stack, jobs, during, parallel=12):
    """Run connects for `jobs` [(user, device, key)] in parallel; call `during()` once a third have answered."""
    answered = threading.Semaphore(0)
    results = [None] * len(jobs)

    def one(index):
        results[index] = connect_raw(stack, *jobs[index])
        answered.release()

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(one, i) for i in range(len(jobs))]
        for _ in range(len(jobs) // 3):
            answered.acquire()
        during()
        for future in futures:
            future.result()
    return results


def live_peers(stack):
    """wg's peers, or None while the interface is missing (being re-created)."""
    try:
        return stack.wg_peers()
    except subprocess.CalledProcessError:
        return None


def agree(stack):
    return live_peers(stack) == stack.db_peers()


def wait_agree(stack, what, timeout=60):
    try:
        wait_for(lambda: agree(stack), timeout=timeout, what="interface == database after " + what)
    except AssertionError:
        live, db = live_peers(stack) or {}, stack.db_peers()
        raise AssertionError("interface != database after %s: %d peers only on the interface, %d only in the "
                             "database" % (what, len(set(live) - set(db)), len(set(db) - set(live)))) from None


def jobs_for(tag, n):
    return [("storm-" + tag, "%s%03d" % (tag, i), keypair()[1]) for i in range(n)]


def test_helper_killed_during_a_connect_storm(stack):
    before = {stack.connect("u0", "pre%d" % i, keypair()[1])[0] for i in range(3)}
    assert before == {200}
    jobs = jobs_for("hk", 60)
    killed_at = []

    def kill_helper():
        killed_at.append(time.monotonic())
        kill9(stack.helper_proc.pid)
        stack.helper_proc.wait()

    results = storm(stack, jobs, kill_helper)
    statuses = [status for status, _, _ in results]
    assert None not in statuses, "a request got no answer: %s" % [r for r in results if r[0] is None][:3]
    assert set(statuses) <= {200, 503}
    failed = [(job, body) for job, (status, body, _) in zip(jobs, results) if status == 503]
    assert failed, "the helper died but no request failed: the fault was not injected"
    assert {body["error"]["code"] for _, body in failed} == {"HELPER_UNAVAILABLE"}
    ok_keys = {job[2] for job, (status, _, _) in zip(jobs, results) if status == 200}
    db = stack.db_peers()
    assert not {job[2] for job, _ in failed} & set(db), "a failed connect left an allocation behind"
    assert ok_keys <= set(db)
    assert len(db) == 3 + len(ok_keys)

    stack.start_helper()
    wait_agree(stack, "helper restart")
    assert set(stack.wg_peers()) == set(db)
    # Audited exactly once each, whole lines, through many rotations by both workers.
    files = audit_files(stack)
    assert len(files) > 3 and all(path.stat().st_size <= AUDIT_MAX_BYTES for path in files)
    connected = [e["peer"]["public_key"] for e in audit_events(stack) if e["event"] == "connect"]
    assert sorted(connected) == sorted(db)
    report("helper_kill9_storm", requests=len(jobs), ok=len(ok_keys), helper_unavailable=len(failed),
           unanswered=statuses.count(None), max_latency_s=round(max(s for _, _, s in results), 3),
           leaked_allocations=0, lost_peers=0, audit_files=len(files), audit_connects=len(connected))


def test_helper_frozen_during_connects(stack):
    """SIGSTOP: the requests are queued in the helper's socket, unanswered, until the app's timeout."""
    # Warm both workers (each asks the helper for the server key once) so
    # the frozen helper is met in apply_peers, the call that changes things.
    warm = jobs_for("hw", 8)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert {r[0] for r in pool.map(lambda job: connect_raw(stack, *job), warm)} == {200}
    jobs = jobs_for("hf", 12)
    os.kill(stack.helper_proc.pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(lambda job: connect_raw(stack, *job), jobs))
    finally:
        os.kill(stack.helper_proc.pid, signal.SIGCONT)
    assert [(status, body["error"]["code"]) for status, body, _ in results] == [(503, "HELPER_UNAVAILABLE")] * 12
    assert not set(stack.db_peers()) & {job[2] for job in jobs}
    # Once it runs again the helper reads the requests the app gave up on;
    # none of them may stay on the interface.
    time.sleep(3)  # the helper runs (or drops) what it had queued; the watchers get a round
    wait_agree(stack, "helper continued", timeout=15)
    assert set(stack.db_peers()) == {job[2] for job in warm}
    report("helper_frozen", requests=len(jobs), helper_unavailable=len(jobs),
           max_latency_s=round(max(s for _, _, s in results), 3), leaked_allocations=0, stale_on_interface=0)


def test_worker_killed_mid_request(stack):
    jobs = jobs_for("wk", 60)
    workers = children(stack.app_proc.pid)
    assert len(workers) == 2

    results = storm(stack, jobs, lambda: kill9(workers[0]))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, None}, statuses
    # The master starts a new worker; its watcher reconciles at start, so a
    # request killed between its commit and its helper call is on the interface too.
    wait_for(lambda: len(set(children(stack.app_proc.pid)) - {workers[0]}) == 2, what="worker respawned")
    wait_agree(stack, "worker kill")

    unanswered = [job for job, status in zip(jobs, statuses) if status is None]
    audited = {e["peer"]["public_key"] for e in audit_events(stack) if e["event"] == "connect"}
    rows_not_audited = len(set(stack.db_peers()) - audited)  # the worker died between commit and audit
    retried = [connect_raw(stack, *job) for job in unanswered]  # the client retries
    assert [status for status, _, _ in retried] == [200] * len(unanswered)
    db = stack.db_peers()
    assert set(db) == {job[2] for job in jobs}  # every device once, nothing extra
    assert agree(stack)
    audited = {e["peer"]["public_key"] for e in audit_events(stack) if e["event"] == "connect"}
    assert audited == set(db)  # the retries audited what the killed worker could not
    report("worker_kill9", rows_not_audited_before_retry=rows_not_audited, requests=len(jobs), ok_first_try=statuses.count(200), unanswered=len(unanswered),
           ok_after_retry=len(unanswered), leaked_allocations=len(db) - len(jobs), lost_peers=0)


def test_everything_killed_at_once_and_interface_deleted(stack):
    client = WgClient(stack.client, "omcf" + os.urandom(3).hex())
    try:
        status, body = stack.connect("u1", "real1", client.public_key)
        assert status == 200
        client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                         address_cidr=body["ip"], allowed_ips=body["allowedIPs"], mtu=body["mtu"])
        for i in range(20):
            assert stack.connect("u2", "bulk%d" % i, keypair()[1])[0] == 200
        assert client.ping("10.8.0.1", count=1, timeout=3)
        expected = stack.db_peers()
        assert stack.wg_peers() == expected and len(expected) == 21

        # Power cut: helper, its wireguard-go, gunicorn's master and workers, all at once.
        # wireguard-go is nobody's child (it outlives the helper): found by its namespace.
        victims = [stack.helper_proc.pid, stack.app_proc.pid] + children(stack.app_proc.pid) + \
            wireguard_go_in({stack.server.inode})
        for pid in victims:
            kill9(pid)
        stack.helper_proc.wait()
        stack.app_proc.wait()
        started = time.monotonic()
        stack.start_helper()
        stack.start_app()
        wait_for(lambda: live_peers(stack) == expected, timeout=60, what="peers back after killing everything")
        restored_s = time.monotonic() - started
        # The client is left alone: WireGuard re-handshakes by itself once its
        # packets go unanswered (about 15 s), without calling the API again.
        assert wait_for(lambda: client.ping("10.8.0.1", count=1, timeout=2), timeout=60, what="ping after restart")
        ping_back_s = time.monotonic() - started

        # The interface deleted under the running service.
        generation = hello_generation(stack)
        seen = len(audit_events(stack))
        stack.server.run("ip", "link", "del", "dev", stack.interface)
        deleted = time.monotonic()
        wait_for(lambda: live_peers(stack) == expected, timeout=60, what="peers back after the interface was deleted")
        recreated_s = time.monotonic() - deleted
        assert hello_generation(stack) != generation
        # The round that put them back, by the system.  A drift round may follow ("updated": an endpoint the
        # client roamed to), and the link may be made again once more while the old wireguard-go goes away:
        # then a second round puts all of them on that one too.
        # Its audit line comes after the sync has returned: the peers can be back before it is written.
        wait_for(lambda: any(e["event"] == "reconcile" and e.get("added") for e in audit_events(stack)[seen:]),
                 timeout=30, what="the reconcile's audit line")
        repairs = [e for e in audit_events(stack)[seen:] if e["event"] == "reconcile"]
        added = [(e["added"], e["actor"]) for e in repairs if e.get("added")]
        assert added and all(a == (len(expected), {"type": "system"}) for a in added), repairs
        assert wait_for(lambda: client.ping("10.8.0.1", count=1, timeout=2), timeout=60,
                        what="ping after interface re-creation")
        ping_back_after_delete_s = time.monotonic() - deleted
        report("kill9_everything", processes_killed=len(victims), peers=len(expected), peers_restored=len(expected),
               lost_peers=0, restart_to_restored_s=round(restored_s, 1),
               client_tunnel_back_s=round(ping_back_s, 1))
        report("interface_deleted", peers=len(expected), peers_restored=len(expected), lost_peers=0,
               restored_s=round(recreated_s, 1), client_tunnel_back_s=round(ping_back_after_delete_s, 1))
    finally:
        client.close()


def audit_files(stack):
    """audit.log and its rotated files, oldest first."""
    rotated = sorted(stack.tmp.glob("audit.log.[0-9]*"), key=lambda p: -int(p.name.rsplit(".", 1)[1]))
    return rotated + [stack.tmp / "audit.log"]


def audit_events(stack):
    return [json.loads(line) for path in audit_files(stack) for line in path.read_text().splitlines()]


def hello_generation(stack):
    import socket
    from wghelper import protocol
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    with sock:
        sock.connect(stack.env["ORBMESH_HELPER_SOCKET"])
        sock.sendall(protocol.encode({"id": 1, "cmd": "hello"}))
        with sock.makefile("rb") as stream:
            return json.loads(stream.readline())["result"]["generation"]


def snapshot(stack):
    db = sqlite3.connect(stack.env["ORBMESH_DB_PATH"])
    try:
        rows = db.execute("SELECT * FROM peers ORDER BY id").fetchall()
    finally:
        db.close()
    return rows, stack.wg_peers()


def mutations(stack, tag):
    """One of each peer-changing call; returns [(name, status, body)]."""
    out = []
    status, body, _ = connect_raw(stack, "busy", tag + "new", keypair()[1])
    out.append(("connect", status, body))
    for name, path, payload, headers in (
            ("disconnect", "/wireguard/disconnect", {}, {"Authorization": "Bearer " + stack.token("busy", "held")}),
            ("add-peer", "/wireguard/add-peer", {"userUuid": "orb-" + tag, "publicKey": keypair()[1],
                                                 "allowedIPs": "10.8.200.%d/32" % len(tag),
                                                 "assignedIP": "10.8.200.%d" % len(tag)},
             {"X-API-Key": stack.api_key}),
            ("remove-peer", "/wireguard/remove-peer", {"userUuid": "busy"}, {"X-API-Key": stack.api_key})):
        status, _, raw = stack.request("POST", path, payload, headers, timeout=60)
        out.append((name, status, json.loads(raw)))
    return out


def test_database_locked_by_another_process(stack):
    assert stack.connect("busy", "held", keypair()[1])[0] == 200
    before = snapshot(stack)
    blocker = sqlite3.connect(stack.env["ORBMESH_DB_PATH"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # held well past ORBMESH_DB_BUSY_TIMEOUT=1
    health = []

    def probe_health():
        # While the writes wait for the lock: the waiting is done in yielding
        # sleeps, so the same worker keeps answering other requests.
        for _ in range(20):
            start = time.monotonic()
            status, _, _ = stack.request("GET", "/health", timeout=60)
            health.append((status, time.monotonic() - start))

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            probing = pool.submit(probe_health)
            answers = mutations(stack, "b")
            probing.result()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [(name, status, body.get("error", {}).get("code")) for name, status, body in answers] == [
        (name, 503, "DATABASE_UNAVAILABLE") for name in ("connect", "disconnect", "add-peer", "remove-peer")
    ], answers
    assert {status for status, _ in health} == {200}
    assert snapshot(stack) == before
    assert [status for _, status, _ in mutations(stack, "after")] == [200] * 4
    assert agree(stack)
    events = audit_events(stack)
    assert [e["event"] for e in events[-4:]] == ["connect", "disconnect", "add-peer", "remove-peer"]
    audit_text = "".join(path.read_text() for path in audit_files(stack))
    private_key = (stack.tmp / "helper-state" / "server.key").read_text().strip()
    for secret in (stack.api_key, stack.secret, private_key):
        assert secret not in audit_text
    assert "eyJ" not in audit_text  # no device token (a JWT) either
    report("database_locked", requests=4, database_unavailable=4, health_probes=len(health),
           health_max_latency_s=round(max(t for _, t in health), 3),
           half_written=0, leaked_allocations=0)


@pytest.fixture
def small_disk_stack(netns, tmp_path):
    """The stack with its database and audit log on a 3 MiB tmpfs, unmounted afterwards."""
    state = tmp_path / "small-disk"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "orbmesh-test", str(state)], check=True)
    try:
        server, client = netns("srv"), netns("cli")
        veth(server, SERVER_ADDR + "/24", client, CLIENT_ADDR + "/24")
        s = Stack(server, client, tmp_path, workers=2)
        s.env.update({"ORBMESH_DB_PATH": str(state / "orbmesh.db"), "ORBMESH_HELPER_TIMEOUT": str(HELPER_TIMEOUT)})
        s.state_dir = state
        with s.running():
            yield s
    finally:
        result = subprocess.run(["umount", str(state)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(state)], check=True)


def fill(directory):
    """Write a file until the disk is full; return its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    try:
        while True:
            os.write(fd, b"\0")
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def test_full_disk(small_disk_stack):
    stack = small_disk_stack
    for i in range(5):
        assert stack.connect("disk", "pre%d" % i, keypair()[1])[0] == 200
    before = set(stack.db_peers())
    # A reader that stays open keeps the -wal and -shm files, so the first
    # connects fail on writing (or get space the WAL already has); once it
    # closes, the files go and the next connects fail on opening.
    reader = sqlite3.connect(stack.env["ORBMESH_DB_PATH"])
    reader.execute("SELECT count(*) FROM peers").fetchone()
    filler = fill(str(stack.state_dir))
    jobs = [("disk", "full%02d" % i, keypair()[1]) for i in range(30)]
    results = [connect_raw(stack, *job) for job in jobs[:15]]
    reader.close()
    results += [connect_raw(stack, *job) for job in jobs[15:]]
    interface = stack.wg_peers()
    os.unlink(filler)  # even reads by a fresh connection can fail while the disk is full

    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    full = [(job, body) for job, (status, body, _) in zip(jobs, results) if status == 503]
    assert full, "the disk was full but every connect succeeded: the fault was not injected"
    assert {body["error"]["code"] for _, body in full} == {"DATABASE_UNAVAILABLE"}
    ok_keys = {job[2] for job, (status, _, _) in zip(jobs, results) if status == 200}
    assert set(stack.db_peers()) == before | ok_keys  # nothing half-written, nothing leaked
    assert interface == stack.db_peers()  # and the interface agreed while the disk was full
    errors = [json.loads(line)["message"] for line in stack.app_log.read_text().splitlines()
              if line.startswith("{") and '"app.api.errors"' in line]
    failed_on = {"write": sum("disk is full" in m for m in errors), "open": sum("I/O error" in m for m in errors)}

    retried = [connect_raw(stack, *job) for job, _ in full]
    assert [status for status, _, _ in retried] == [200] * len(full)
    assert set(stack.db_peers()) == before | {job[2] for job in jobs}
    assert agree(stack)
    in_file = [json.loads(line) for line in (stack.state_dir / "audit.log").read_text().splitlines()]
    in_app_log = audit_failures(stack)
    events = in_file + in_app_log
    # Every connect audited exactly once, in the file or (refused by the full
    # disk) in the app log.
    connected = collections.Counter(e["peer"]["public_key"] for e in events if e["event"] == "connect")
    assert connected == collections.Counter(before | {job[2] for job in jobs}), connected
    # Anything else is the watchers' reconcile.  A worker that boots late runs
    # its first round during the first connects and may add a peer whose
    # connect sits between its commit and its helper call (``added: 1``);
    # that line once made this count 36 for 35 connects (shown step by step
    # in tests/app/peers/test_audit.py).
    others = [(e["event"], e["actor"]["type"]) for e in events if e["event"] != "connect"]
    assert set(others) <= {("reconcile", "system")}, others
    report("disk_full", requests=len(jobs), ok=len(ok_keys), database_unavailable=len(full),
           database_errors=failed_on, audit_lines_to_app_log=len(in_app_log), half_written=0,
           leaked_allocations=0, lost_peers=0)


def audit_failures(stack):
    """The events the audit file refused, from the app log's "audit log write failed" lines."""
    marker = "; the event: "
    messages = [json.loads(line)["message"] for line in stack.app_log.read_text().splitlines()
                if line.startswith("{") and "audit log write failed" in line]
    return [json.loads(message.split(marker, 1)[1]) for message in messages]
