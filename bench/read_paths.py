#!/usr/bin/env python3
"""Read paths at 10,000 peers: /wireguard/status and /health p50/p99, and reconcile time.

One client asks, one request at a time, over a keep-alive connection from
the client namespace; /health includes its probe of the node's DNS
resolver (Unbound, started as run-local starts it; one probe per worker per
2 s).  Reconcile: the WireGuard interface is deleted in the
server namespace; the helper re-creates it (new generation), a worker's
watcher notices and syncs every peer back.  The time is from the deletion
until `wg` shows every peer again with the right allowed IPs.
"""
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.load import Client  # noqa: E402

NAME = "read_paths"


def latencies(client, path, headers, count):
    samples = []
    for _ in range(count):
        status, body, seconds = client.request("GET", path, headers=headers)
        if status != 200:
            raise RuntimeError("%s answered %s: %s" % (path, status, body))
        samples.append(seconds)
    return samples, body


class Poller:
    """/wireguard/status and /health in turn, one request at a time, every `pause` seconds, while another
    load runs (bench/control_plane.py's open loop): their latency under that load.  Gentle (10 requests/s),
    as monitoring is: at 50/s its own CPU tripled the stack's CPU per connect."""

    def __init__(self, stack, pause=0.2):
        self.stack, self.pause = stack, pause
        self.samples = {"status": [], "health": []}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        client = Client(self.stack.client)
        key = {"X-API-Key": self.stack.api_key}
        try:
            while not self._stop.is_set():
                for name, path, headers in (("status", "/wireguard/status", key), ("health", "/health", {})):
                    try:
                        status, _, seconds = client.request("GET", path, headers=headers)
                    except Exception:  # counted; a new connection next time
                        self.errors += 1
                        client.close()
                        client = Client(self.stack.client)
                        continue
                    if status == 200 or (name == "health" and status == 503):
                        self.samples[name].append(seconds)  # 503: degraded, answered all the same
                    else:
                        self.errors += 1
                self._stop.wait(self.pause)
        finally:
            client.close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=60)
        return {"status": common.latency_summary(self.samples["status"]),
                "health": common.latency_summary(self.samples["health"]), "errors": self.errors}


def status_after_change(stack, client, key, count, run):
    """Status right after a connect and after its disconnect: each one has to dump the interface."""
    token = {"Authorization": "Bearer " + stack.token("bench-read", "change-%d" % run)}
    samples = []
    for _ in range(count):
        for path in ("/wireguard/connect", "/wireguard/disconnect"):
            body = {"publicKey": common.random_key()} if path == "/wireguard/connect" else {}
            status, reply, _ = client.request("POST", path, body, token)
            if status != 200:
                raise RuntimeError("%s answered %s: %s" % (path, status, reply))
            got, _ = latencies(client, "/wireguard/status", key, 1)
            samples.extend(got)
    return samples


def reconcile_once(stack, expected):
    """Delete the interface; seconds until every peer is back on the new one.

    The old wireguard-go answers `wg show` with every peer for a moment
    after its device is deleted, so the new interface is recognised by the
    helper's new generation first.
    """
    from app.helper import HelperClient, HelperFailed, HelperUnavailable

    helper = HelperClient(stack.env["ORBMESH_HELPER_SOCKET"], 10)
    old = helper.hello()["generation"]
    stack.server.run("ip", "link", "del", "dev", stack.interface)
    started = time.monotonic()
    deadline = started + 120
    new = False
    while time.monotonic() < deadline:
        if not new:
            try:
                new = helper.hello()["generation"] != old
            except (HelperUnavailable, HelperFailed):
                pass
        if new and live_peers(stack) == expected:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError("peers did not come back within 120 s")


def live_peers(stack):
    """{key: allowed ips} on the interface, or None while wg cannot read it."""
    result = stack.server.run("wg", "show", stack.interface, "allowed-ips", check=False)
    if result.returncode != 0:
        return None
    pairs = (line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    return {key: ips.strip() for key, ips in pairs}


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=None)
    p.add_argument("--requests", type=int, default=None, help="requests per path per run")
    args = p.parse_args(argv)
    smoke = args.smoke
    peers = args.peers if args.peers is not None else (20 if smoke else 10000)
    count = args.requests or (10 if smoke else 200)
    runs = args.runs or (1 if smoke else 3)

    result = {"benchmark": NAME, "smoke": smoke, "peers": peers, "requests": count, "runs": runs}
    with common.Lab() as lab:
        stack = lab.stack(workers=2, env={"ORBMESH_LOG_LEVEL": "WARNING", "ORBMESH_DNS_RESOLVER": "on"})
        with stack.running():
            stack.start_resolver()
            # reconcile() holds the database write lock for the whole sync: these two
            # are how long a connect can be held up by one (all new, then nothing to do).
            result["seed_sync_s"] = round(common.seed_peers(stack, peers), 2)
            result["noop_resync_s"] = round(common.seed_peers(stack, peers), 2)
            expected = stack.db_peers()
            client = Client(stack.client)
            lab.on_exit(client.close)
            key = {"X-API-Key": stack.api_key}
            status_runs, health_runs, reconcile_s = [], [], []
            latencies(client, "/wireguard/status", key, 5)  # warm-up: the first call after seeding dumps
            latencies(client, "/health", {}, 5)
            common_wait_healthy(client)  # a worker may have probed before Unbound started
            cold = []
            for run in range(runs):
                cold.extend(status_after_change(stack, client, key, 5 if smoke else 10, run))
                samples, body = latencies(client, "/wireguard/status", key, count)
                assert body["peerCount"] == peers, body
                status_runs.append(common.latency_summary(samples))
                samples, body = latencies(client, "/health", {}, count)
                assert body["status"] == "healthy", body
                health_runs.append(common.latency_summary(samples))
                reconcile_s.append(round(reconcile_once(stack, expected), 2))
                # health is healthy again once the watcher has recorded the generation
                common_wait_healthy(client)
            result.update(status_after_change=common.latency_summary(cold), status=aggregate(status_runs), health=aggregate(health_runs),
                          status_runs=status_runs, health_runs=health_runs, reconcile_runs_s=reconcile_s,
                          reconcile_s=common.median(reconcile_s),
                          consistent_after=stack.db_peers() == stack.wg_peers())
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    return 0


def common_wait_healthy(client, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body, _ = client.request("GET", "/health")
        if status == 200 and body["status"] == "healthy":
            return
        time.sleep(0.2)
    raise RuntimeError("not healthy again after reconcile")


def aggregate(runs):
    return {"p50_ms": common.median([r["p50_ms"] for r in runs]),
            "p99_ms": common.median([r["p99_ms"] for r in runs])}


def render(result, smoke):
    rows = [["GET /wireguard/status", result["status"]["p50_ms"], result["status"]["p99_ms"]],
            ["GET /health", result["health"]["p50_ms"], result["health"]["p99_ms"]],
            ["GET /wireguard/status right after a change (no target)", result["status_after_change"]["p50_ms"],
             result["status_after_change"]["p99_ms"]]]
    text = ("Read paths at %d peers: %d sequential requests per path after 5 warm-up ones, median of %d runs\n\n" % (
        result["peers"], result["requests"], result["runs"])
        + common.table(["request", "p50 ms", "p99 ms"], rows)
        + "\n\nReconcile of %d peers after the interface is re-created: median %s s (runs: %s)" % (
            result["peers"], result["reconcile_s"], result["reconcile_runs_s"])
        + "\nreconcile() holding the write lock: %s s adding all %d peers, %s s when nothing changes" % (
            result["seed_sync_s"], result["peers"], result["noop_resync_s"]))
    if not smoke:
        checks = [("status p99 < 20 ms", result["status"]["p99_ms"] < 20, result["status"]["p99_ms"]),
                  ("health p99 < 20 ms", result["health"]["p99_ms"] < 20, result["health"]["p99_ms"]),
                  ("reconcile < 10 s", result["reconcile_s"] < 10, result["reconcile_s"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
