#!/usr/bin/env python3
"""Control plane: connect + disconnect with 50 concurrent clients at 0, 1,000 and 10,000 peers.

Ours: the full stack (gunicorn gevent workers, helper, wireguard-go) in a
server namespace, driven over HTTP from a client namespace.  Each client
loops connect (a fresh key) then disconnect with its own device token.

Baseline, in the same run and interleaved run by run with ours: what the
popular panels do, one change at a time under a lock, rewrite the whole
configuration file and `wg syncconf` it, on its own wireguard-go interface
in its own namespace with the same number of peers.  The baseline has no
HTTP, no database and no authentication, so it is favoured.

Reports connects/s (connects completed per second of wall time, while the
same clients also disconnect) and connect latency p50/p99.
"""
import ipaddress
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.load import Client, closed_loop  # noqa: E402
from tests.e2e.netns import unique_ifname  # noqa: E402
from tests.e2e.wgclient import keypair  # noqa: E402

NAME = "control_plane"


class SyncconfBaseline:
    """A wireguard-go interface changed the way panels do it: full file + `wg syncconf` per change."""

    def __init__(self, ns, tmp):
        self.ns = ns
        self.ifname = unique_ifname("omb")
        self.path = Path(tmp) / "baseline.conf"
        self.private_key, _ = keypair()
        self.peers = {}  # key -> address
        self.lock = threading.Lock()
        self.pool = ipaddress.IPv4Network("10.9.0.0/16")
        self.next = 2
        self.free = []
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self.proc = ns.popen(["wireguard-go", self.ifname], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        common_wait(lambda: Path("/var/run/wireguard/%s.sock" % self.ifname).exists()
                    and ns.run("ip", "link", "show", self.ifname, check=False).returncode == 0)
        ns.run("ip", "address", "add", "10.9.0.1/16", "dev", self.ifname)
        ns.run("ip", "link", "set", self.ifname, "up")
        self._write()
        self._syncconf()

    def _address(self):
        if self.free:
            return self.free.pop()
        addr = self.pool.network_address + self.next
        self.next += 1
        return addr

    def _write(self):
        lines = ["[Interface]", "PrivateKey = %s" % self.private_key, "ListenPort = 51821", ""]
        for key, addr in self.peers.items():
            lines += ["[Peer]", "PublicKey = %s" % key, "AllowedIPs = %s/32" % addr, ""]
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines))

    def _syncconf(self):
        # wg reaches a userspace interface through its UAPI socket in
        # /var/run/wireguard, so no `ip netns exec` is needed (nor paid for).
        subprocess.run(["wg", "syncconf", self.ifname, str(self.path)], check=True, capture_output=True)

    def seed(self, total):
        with self.lock:
            while len(self.peers) < total:
                self.peers[common.random_key()] = self._address()
            self._write()
            self._syncconf()

    def add(self, key, stop):
        with self.lock:
            if stop.is_set():
                return False
            self.peers[key] = self._address()
            self._write()
            self._syncconf()
            return True

    def remove(self, key):
        with self.lock:
            self.free.append(self.peers.pop(key))
            self._write()
            self._syncconf()

    def live_count(self):
        out = subprocess.run(["wg", "show", self.ifname, "peers"], check=True, capture_output=True, text=True)
        return len(out.stdout.split())

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def common_wait(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def run_ours(stack, clients, duration, level, run):
    tokens = [stack.token("bench-u%d" % i, "cp-%d-%d" % (level, run)) for i in range(clients)]
    conns = [Client(stack.client) for _ in range(clients)]

    def cycle(i, stop):
        auth = {"Authorization": "Bearer " + tokens[i]}
        status, body, t_connect = conns[i].request("POST", "/wireguard/connect",
                                                   {"publicKey": common.random_key()}, auth)
        if status != 200:
            raise RuntimeError("connect %s %s" % (status, body))
        status, body, t_disconnect = conns[i].request("POST", "/wireguard/disconnect", {}, auth)
        if status != 200:
            raise RuntimeError("disconnect %s %s" % (status, body))
        return {"connect": [t_connect], "disconnect": [t_disconnect]}

    try:
        series, errors, elapsed = closed_loop(cycle, clients, duration)
    finally:
        for conn in conns:
            conn.close()
    return summarise(series, errors, elapsed)


def run_baseline(baseline, clients, duration):
    def cycle(i, stop):
        key = common.random_key()
        started = time.perf_counter()
        if not baseline.add(key, stop):
            return None
        t_connect = time.perf_counter() - started
        started = time.perf_counter()
        baseline.remove(key)
        return {"connect": [t_connect], "disconnect": [time.perf_counter() - started]}

    series, errors, elapsed = closed_loop(cycle, clients, duration)
    return summarise(series, errors, elapsed)


def summarise(series, errors, elapsed):
    connects = series.get("connect", [])
    return {"connects": len(connects), "elapsed_s": round(elapsed, 3),
            "connects_per_s": round(len(connects) / elapsed, 1) if elapsed else None,
            "connect": common.latency_summary(connects),
            "disconnect": common.latency_summary(series.get("disconnect", [])),
            "errors": len(errors), "error_samples": errors[:3]}


def consistent(stack):
    """DB rows and interface peers are the same set (checked after each level)."""
    return stack.db_peers() == stack.wg_peers()


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="seconds per run")
    p.add_argument("--levels", default=None, help="comma-separated pre-existing peer counts")
    args = p.parse_args(argv)
    smoke = args.smoke
    levels = [int(x) for x in (args.levels or ("0,20" if smoke else "0,1000,10000")).split(",")]
    clients = args.clients or (4 if smoke else 50)
    duration = args.duration or (1.0 if smoke else 8.0)
    runs = args.runs or (1 if smoke else 3)

    result = {"benchmark": NAME, "smoke": smoke, "clients": clients, "duration_s": duration, "runs": runs,
              "levels": {}}
    with common.Lab() as lab:
        # Each benchmark device connects several times a second, far past the
        # per-device connect limit (20 a minute), so that limit is off here.
        stack = lab.stack(workers=2, env={"ORBMESH_LOG_LEVEL": "WARNING", "ORBMESH_CONNECT_RATE_LIMIT": "0"})
        base_ns = lab.netns("bbase")
        with stack.running():
            baseline = SyncconfBaseline(base_ns, lab.tmp)
            lab.on_exit(baseline.close)
            for level in levels:
                seeded = common.seed_peers(stack, level)
                baseline.seed(level)
                ours_runs, base_runs = [], []
                for run in range(runs):  # interleaved, so both see the same noise
                    ours_runs.append(run_ours(stack, clients, duration, level, run))
                    base_runs.append(run_baseline(baseline, clients, duration))
                    print("level %d run %d: ours %.0f/s p99 %s ms, baseline %.1f/s" % (
                        level, run, ours_runs[-1]["connects_per_s"], ours_runs[-1]["connect"]["p99_ms"],
                        base_runs[-1]["connects_per_s"]), file=sys.stderr)
                entry = {
                    "seed_sync_s": round(seeded, 2),
                    "consistent_after": consistent(stack),
                    "peers_after": len(stack.wg_peers()),
                    "baseline_peers_after": baseline.live_count(),
                    "ours": aggregate(ours_runs), "baseline": aggregate(base_runs),
                    "ours_runs": ours_runs, "baseline_runs": base_runs,
                }
                entry["ours_over_baseline"] = common.ratio(entry["ours"]["connects_per_s"],
                                                           entry["baseline"]["connects_per_s"], 1)
                result["levels"][str(level)] = entry
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    return 0


def aggregate(runs):
    """Medians over runs of throughput and of each run's percentiles."""
    return {"connects_per_s": common.median([r["connects_per_s"] for r in runs]),
            "p50_ms": common.median([r["connect"]["p50_ms"] for r in runs]),
            "p99_ms": common.median([r["connect"]["p99_ms"] for r in runs]),
            "disconnect_p99_ms": common.median([r["disconnect"]["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs)}


def render(result, smoke):
    rows = []
    for level, e in result["levels"].items():
        o, b = e["ours"], e["baseline"]
        rows.append([level, o["connects_per_s"], o["p50_ms"], o["p99_ms"], b["connects_per_s"], b["p50_ms"],
                     b["p99_ms"], e["ours_over_baseline"], o["errors"], e["consistent_after"]])
    text = ("Control plane: %d clients, connect+disconnect, median of %d runs of %gs\n\n" % (
        result["clients"], result["runs"], result["duration_s"])
        + common.table(["peers", "ours conn/s", "ours p50 ms", "ours p99 ms", "syncconf conn/s",
                        "syncconf p50 ms", "syncconf p99 ms", "ours/syncconf", "errors", "db=wg"], rows))
    levels = result["levels"]
    if not smoke and "10000" in levels and "1000" in levels:
        o10, o1 = levels["10000"]["ours"], levels["1000"]["ours"]
        slowdown = common.ratio(o1["connects_per_s"], o10["connects_per_s"])
        result["slowdown_10k_vs_1k"] = slowdown
        checks = [("10k: >= 300 connects/s", o10["connects_per_s"] >= 300, o10["connects_per_s"]),
                  ("10k: p99 < 100 ms", o10["p99_ms"] < 100, o10["p99_ms"]),
                  ("10k vs 1k: at most 1.3x slower", slowdown is not None and slowdown <= 1.3, slowdown),
                  ("10k: >= 10x syncconf", (levels["10000"]["ours_over_baseline"] or 0) >= 10,
                   levels["10000"]["ours_over_baseline"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
