#!/usr/bin/env python3
"""Control plane: connect latency under an open-loop load, and CPU per connect + disconnect, from 1,000 to 60,000 peers.

Ours: the full stack (gunicorn gevent workers, helper, wireguard-go) in a
server namespace, driven over HTTP from a client namespace, with the
interface already holding LEVEL peers.  Each run has two phases:

1. saturation: 50 client threads in a closed loop (connect with a fresh
   key, then disconnect) for --duration seconds: cycles/s is the most the
   stack does; its latency is only a figure (with 50 clients always
   waiting, latency is 50 / throughput by Little's law);
2. open loop: connects arrive as a Poisson process at half that rate (with
   --base: half the mean of both sides' saturation, the same rate for
   both), each followed by its disconnect; latency is measured from the
   arrival's scheduled time, so a late start counts (no coordinated
   omission).  p50/p99 of the connects are the figures to read.

While the open loop runs, one more client asks /wireguard/status and
/health in turn, one request at a time (bench/read_paths.py poll): their
p99 at each level is the read paths' figure under load.  After the runs of
a level, the RSS of the helper, each worker and wireguard-go is read
(/proc/PID/smaps_rollup), and per peer.  os.getloadavg() is recorded
before and after every run: the machine is shared.

CPU per cycle: user + system seconds of every process in the server
namespace (helper with the `wg`/`ip` children it reaped, gunicorn master
and workers, wireguard-go) over the open-loop phase, divided by the
cycles completed.

--base DIR runs the same on a second checkout (its own .venv) in its own
namespaces, run by run interleaved with ours (each side first in turn): the A/B of a change
measured back to back on one machine.  The "panel" baseline of earlier
versions (whole-file `wg syncconf` per change) is gone: it measured
throughput, which the open loop does not chase.

--tiers gives every user a speed tier after seeding (bench/usage.py's
set_tiers), so that each connect and disconnect also changes the helper's
nftables table: the A/B of a change to the limits path.
"""
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, read_paths  # noqa: E402
from bench.load import Client, closed_loop  # noqa: E402
from tests.e2e import stack as stack_module  # noqa: E402
from tests.e2e.stack import API_PORT, Stack  # noqa: E402

NAME = "control_plane"
OPEN_LOOP_WORKERS = 64


class CheckoutStack(Stack):
    """A Stack that runs the helper and gunicorn of another checkout (`root`, with its .venv)."""

    def start_helper(self):
        self.set_ipv6_forwarding()  # as Stack: both checkouts give their clients IPv6
        log = open(self.helper_log, "ab")
        self.helper_proc = self.server.popen([str(self.root / ".venv/bin/orbmesh-wghelper")], env=self.env,
                                             stdout=log, stderr=subprocess.STDOUT)
        log.close()
        stack_module.wait_for(lambda: self._helper_ready(), what="helper socket")

    def start_app(self):
        log = open(self.app_log, "ab")
        argv = [str(self.root / ".venv/bin/gunicorn"), "--worker-class", "gevent", "--workers", str(self.workers),
                "--bind", "%s:%d" % (self.addr, API_PORT), "--chdir", str(self.root),
                "--graceful-timeout", "5", "--no-control-socket", "app:create_app()"]
        self.app_proc = self.server.popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        stack_module.wait_for(lambda: self._answers(self.app_proc, self.app_log, "gunicorn", self.request),
                              what="gunicorn")


def make_stack(lab, root, tag, extra_env=()):
    """Namespaces and a stack running the code of `root` (this checkout when None), with `extra_env` (KEY=VALUE)."""
    env = {"ORBMESH_LOG_LEVEL": "WARNING", "ORBMESH_CONNECT_RATE_LIMIT": "0"}
    env.update(item.split("=", 1) for item in extra_env)
    stack = lab.stack(workers=2, env=env, tag=tag)
    # The tests' fast watchers (every 0.5 s) would be charged to every cycle: production defaults here.
    for name in ("ORBMESH_RECONCILE_CHECK_INTERVAL", "ORBMESH_HELPER_WATCH_INTERVAL"):
        stack.env.pop(name, None)
    if root is not None:  # the namespaces are made the same way; only the programs differ
        stack.__class__ = CheckoutStack
        stack.root = Path(root).resolve()
    return stack


SEED = """
import json, sys, types
sys.path.insert(0, sys.argv[1])
from bench import common
print(common.seed_peers(types.SimpleNamespace(env=json.load(sys.stdin)), int(sys.argv[2])))
"""


def seed(stack, level):
    """common.seed_peers with the stack's own code: the other checkout's schema may differ from ours."""
    root = getattr(stack, "root", None)
    if root is None:
        return common.seed_peers(stack, level)
    # The environment (the stack's JWT secret and API key among it) on stdin: never in an argv.
    done = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", SEED, str(root), str(level)],
                          input=json.dumps(stack.env), capture_output=True, text=True, check=True, cwd=root)
    return float(done.stdout.strip().splitlines()[-1])


def stack_cpu(stack):
    """CPU seconds of every process in the server namespace, reaped children included, by kind."""
    kinds = {"helper": 0.0, "app": 0.0, "wireguard-go": 0.0, "other": 0.0}
    for pid in stack.server.pids():
        try:
            argv = Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        kind = next((k for k, word in (("helper", "wghelper"), ("app", "gunicorn"),
                                       ("wireguard-go", "wireguard-go")) if word in argv), "other")
        kinds[kind] += common.cpu_seconds(pid)
    return kinds


def writer_counters(stack):
    """(wg set runs, peer changes applied) so far, from the helper's status: how much it merges."""
    from app.helper import HelperClient

    helper = HelperClient(stack.env["ORBMESH_HELPER_SOCKET"], 30)
    try:
        status = helper.status()
    finally:
        helper.close()
    return status["wg_set_calls"], status["jobs_applied"]


def per_cycle(before, after, cycles):
    """ms of CPU per cycle, in all and by kind of process."""
    if not cycles:
        return None, {}
    split = {k: round((after[k] - before[k]) * 1000 / cycles, 2) for k in after}
    return round(sum(after.values()) * 1000 / cycles - sum(before.values()) * 1000 / cycles, 2), split


def cycle_once(conn, token):
    auth = {"Authorization": "Bearer " + token}
    status, body, t_connect = conn.request("POST", "/wireguard/connect", {"publicKey": common.random_key()}, auth)
    if status != 200:
        raise RuntimeError("connect %s %s" % (status, body))
    status, body, t_disconnect = conn.request("POST", "/wireguard/disconnect", {}, auth)
    if status != 200:
        raise RuntimeError("disconnect %s %s" % (status, body))
    return t_connect, t_disconnect


def saturation(stack, clients, duration, tag):
    tokens = [stack.token("bench-sat%d" % i, tag) for i in range(clients)]
    conns = [Client(stack.client) for _ in range(clients)]

    def cycle(i, stop):
        t_connect, t_disconnect = cycle_once(conns[i], tokens[i])
        return {"connect": [t_connect], "disconnect": [t_disconnect]}

    cpu = stack_cpu(stack)
    try:
        series, errors, elapsed = closed_loop(cycle, clients, duration)
    finally:
        for conn in conns:
            conn.close()
    cycles = len(series.get("connect", []))
    total, split = per_cycle(cpu, stack_cpu(stack), cycles)
    return {"cycles_per_s": round(cycles / elapsed, 1) if elapsed else None,
            "cpu_ms_per_cycle": total, "cpu_ms_per_cycle_by_process": split,
            "connect": common.latency_summary(series.get("connect", [])), "errors": len(errors),
            "error_samples": errors[:3]}


def processes(stack):
    """{name: pid} of the helper, its command spawner, each gunicorn worker and wireguard-go in the
    server namespace.  The spawner is the helper's fork (wghelper/argv.py Spawner): same argv, the
    helper its parent."""
    found, workers, helpers = {}, [], {}
    for pid in stack.server.pids():
        try:
            argv = Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode()
            ppid = int(Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if "wghelper" in argv:
            helpers[pid] = ppid
        elif "wireguard-go" in argv:
            found["wireguard-go"] = pid
        elif "gunicorn" in argv and stack.app_proc is not None and ppid == stack.app_proc.pid:
            workers.append(pid)
    # The helper is the one whose parent is no helper; the spawner's parent is the helper. A child the
    # spawner has forked but not yet exec'd shows the same argv, with the spawner as its parent.
    helper = next((pid for pid, ppid in helpers.items() if ppid not in helpers), None)
    if helper is not None:
        found["helper"] = helper
        found.update(("spawner", pid) for pid, ppid in helpers.items() if ppid == helper)
    found.update(("worker%d" % i, pid) for i, pid in enumerate(sorted(workers)))
    return found


def rss_mb(stack):
    """{process: RSS in MB} (bench/memory.py memory_kb)."""
    from bench.memory import memory_kb

    out = {}
    for name, pid in processes(stack).items():
        try:
            out[name] = round(memory_kb(pid)["rss"] / 1024, 1)
        except OSError:
            continue
    return out


def open_loop(stack, rate, duration, tag, seed, reads=True):
    """Poisson arrivals at `rate`/s for `duration` s; latency from each arrival's scheduled time."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    jobs = queue.Queue()
    for i, at in enumerate(arrivals):
        jobs.put((i, at))
    latencies_connect, errors, lock, timeline = [], [], threading.Lock(), []
    # Valid past the last arrival: a 15-minute run with the stack's usual 10-minute tokens got 401 for the
    # last third of its connects (counted as errors: bench/results/i27-rss15-1926, i27-rss15-tokens-2106).
    tokens = [stack.token("bench-open%d" % i, tag, ttl=duration + 600) for i in range(OPEN_LOOP_WORKERS)]
    # Connected before the clock starts: opened on the first request, each of the 64 connections (a
    # thread to enter the namespace, a TCP handshake, the server's accept) was charged to the first
    # arrivals, which were the slowest 2% of some runs (docs/benchmarks.md, eighth session).
    conns = [Client(stack.client).connect() for _ in range(OPEN_LOOP_WORKERS)]
    start = time.perf_counter() + 0.2

    def timed_worker(w):
        conn = conns[w]
        auth = {"Authorization": "Bearer " + tokens[w]}
        try:
            while True:
                try:
                    _, at = jobs.get_nowait()
                except queue.Empty:
                    return
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                try:
                    status, body, _ = conn.request("POST", "/wireguard/connect",
                                                   {"publicKey": common.random_key()}, auth)
                    connected = time.perf_counter()
                    if status != 200:
                        raise RuntimeError("connect %s %s" % (status, body))
                    status, body, _ = conn.request("POST", "/wireguard/disconnect", {}, auth)
                    if status != 200:
                        raise RuntimeError("disconnect %s %s" % (status, body))
                except Exception as exc:  # counted, the run goes on
                    with lock:
                        errors.append("at %.1f s: %s" % (at, repr(exc)[:200]))
                    continue
                with lock:
                    latencies_connect.append(connected - (start + at))
                    timeline.append((round(at, 2), round((connected - (start + at)) * 1000, 1)))
        finally:
            conn.close()

    cpu, counters = stack_cpu(stack), writer_counters(stack)
    began = time.perf_counter()
    threads = [threading.Thread(target=timed_worker, args=(w,), daemon=True) for w in range(OPEN_LOOP_WORKERS)]
    for thread in threads:
        thread.start()
    poller = read_paths.Poller(stack).start() if reads else None
    for thread in threads:
        thread.join(timeout=duration + 300)
    elapsed = time.perf_counter() - began
    polled = poller.stop() if poller else {}
    cycles = len(latencies_connect)
    total, split = per_cycle(cpu, stack_cpu(stack), cycles)
    runs, jobs = (after - before for after, before in zip(writer_counters(stack), counters))
    return {"offered_per_s": round(rate, 1), "arrivals": len(arrivals), "cycles": cycles,
            "zero_at": round(time.time() - (time.perf_counter() - start), 3),  # wall clock of 0 s, to line up logs
            "wg_set_per_cycle": round(runs / cycles, 2) if cycles else None,
            "changes_per_wg_set": round(jobs / runs, 2) if runs else None,
            "achieved_per_s": round(cycles / elapsed, 1) if elapsed else None,
            "cpu_ms_per_cycle": total, "cpu_ms_per_cycle_by_process": split,
            "connect": common.latency_summary(latencies_connect), "errors": len(errors),
            "error_samples": errors[:3] + errors[3:][-3:], "reads": polled,  # the first and the last
            # When the slowest 2% arrived (s into the phase, ms): a stall shows as one cluster, a busy
            # machine as a spread.
            "slowest": sorted(sorted(timeline, key=lambda x: -x[1])[:max(1, len(timeline) // 50)])}


def measure(stacks, clients, duration, level, run, reads=True):
    """One run on every side: saturation each, then the open loop at half their mean saturation.

    The same offered rate for both sides of an A/B, since the writer merges
    more changes per `wg set` the more arrive: CPU per cycle depends on it.
    """
    load_before = [round(x, 2) for x in os.getloadavg()]
    sat = {name: saturation(stack, clients, duration, "%s-%d-%d" % (name, level, run))
           for name, stack in stacks.items()}
    rate = sum(s["cycles_per_s"] or 2 for s in sat.values()) / len(sat) / 2
    out = {}
    for name, stack in stacks.items():
        opened = open_loop(stack, rate, duration, "%s-%d-%d" % (name, level, run), seed=run, reads=reads)
        print("level %d run %d %s: saturation %.0f/s; open loop %.0f/s offered, p99 %s ms, %.2f ms CPU/cycle" % (
            level, run, name, sat[name]["cycles_per_s"] or 0, rate, opened["connect"]["p99_ms"],
            opened["cpu_ms_per_cycle"] or 0), file=sys.stderr)
        out[name] = {"saturation": sat[name], "open_loop": opened}
    for got in out.values():
        got["load_avg_before"], got["load_avg_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
    return out


def aggregate(runs):
    sat = [r["saturation"] for r in runs]
    opened = [r["open_loop"] for r in runs]
    return {"saturation_per_s": common.median([s["cycles_per_s"] for s in sat]),
            "closed_loop_p99_ms": common.median([s["connect"]["p99_ms"] for s in sat]),
            "offered_per_s": common.median([o["offered_per_s"] for o in opened]),
            "p50_ms": common.median([o["connect"]["p50_ms"] for o in opened]),
            "p99_ms": common.median([o["connect"]["p99_ms"] for o in opened]),
            "cpu_ms_per_cycle": common.median([o["cpu_ms_per_cycle"] for o in opened]),
            "wg_set_per_cycle": common.median([o["wg_set_per_cycle"] for o in opened]),
            "changes_per_wg_set": common.median([o["changes_per_wg_set"] for o in opened]),
            "cpu_ms_per_cycle_by_process": {k: common.median([o["cpu_ms_per_cycle_by_process"].get(k) for o in opened])
                                            for k in opened[0]["cpu_ms_per_cycle_by_process"]},
            "status_p99_ms": common.median([(o.get("reads") or {}).get("status", {}).get("p99_ms") for o in opened]),
            "health_p99_ms": common.median([(o.get("reads") or {}).get("health", {}).get("p99_ms") for o in opened]),
            "read_errors": sum((o.get("reads") or {}).get("errors", 0) for o in opened),
            "load_avg_max": max(max(r["load_avg_before"][0], r["load_avg_after"][0]) for r in runs),
            "errors": sum(s["errors"] + o["errors"] for s, o in zip(sat, opened))}


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=None, help="closed-loop clients of the saturation phase")
    p.add_argument("--duration", type=float, default=None, help="seconds per phase")
    p.add_argument("--levels", default=None, help="comma-separated pre-existing peer counts")
    p.add_argument("--base", type=Path, default=None,
                   help="another checkout (with its .venv) to measure back to back, e.g. the current main")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for our stack (repeatable); with --base the same checkout twice is a config A/B")
    p.add_argument("--base-env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the --base stack (repeatable)")
    p.add_argument("--no-reads", action="store_true",
                   help="no /wireguard/status and /health polling during the open loop (as before issue 27)")
    p.add_argument("--tiers", action="store_true",
                   help="every user with a speed tier (bench/usage.py's plans), so each connect and disconnect "
                        "also changes the helper's nftables table")
    p.add_argument("--ipv6-forwarding", choices=("on", "off"), default="on",
                   help="the server namespace's IPv6 forwarding (off: clients get no IPv6, as before issue 23)")
    args = p.parse_args(argv)
    smoke = args.smoke
    levels = [int(x) for x in (args.levels or ("20" if smoke else "1000,10000,30000,60000")).split(",")]
    clients = args.clients or (4 if smoke else 50)
    duration = args.duration or (1.0 if smoke else 10.0)
    runs = args.runs or (1 if smoke else 3)

    sides = {"ours": None}
    if args.base is not None:
        sides["base"] = args.base
    result = {"benchmark": NAME, "smoke": smoke, "clients": clients, "duration_s": duration, "runs": runs,
              "base": str(args.base) if args.base else None, "reads": not args.no_reads,
              "ipv6_forwarding": args.ipv6_forwarding, "tiers": args.tiers, "env": args.env,
              "base_env": args.base_env, "levels": {}}
    with common.Lab() as lab:
        envs = {"ours": args.env, "base": args.base_env}
        stacks = {name: make_stack(lab, root, tag=name[0], extra_env=envs[name]) for name, root in sides.items()}
        for stack in stacks.values():
            lab.on_exit(stack.close)
            stack.ipv6_forwarding = args.ipv6_forwarding == "on"
            stack.start_helper()
            stack.start_app()
        for level in levels:
            entry = {}
            for name, stack in stacks.items():
                entry[name + "_seed_sync_s"] = round(seed(stack, level), 2)
                if args.tiers:
                    from bench.usage import set_tiers  # it imports this module
                    entry[name + "_tiers_s"] = round(set_tiers(stack, True), 2)
                # A node's status is asked all the time; the first ask after seeding waits for a dump.
                writer_counters(stack)
            per_side = {name: [] for name in stacks}
            for run in range(runs):  # interleaved, each side first in turn, so both see the same noise
                order = stacks if run % 2 == 0 else dict(reversed(stacks.items()))
                for name, got in measure(order, clients, duration, level, run, reads=not args.no_reads).items():
                    per_side[name].append(got)
            for name, stack in stacks.items():
                entry[name] = aggregate(per_side[name])
                entry[name + "_runs"] = per_side[name]
                entry[name + "_consistent_after"] = stack.db_peers() == stack.wg_peers()
                entry[name + "_peers_after"] = len(stack.wg_peers())
                rss = rss_mb(stack)
                entry[name + "_rss_mb"] = rss
                entry[name + "_rss_kb_per_peer"] = {k: round(v * 1024 / level, 3) for k, v in rss.items()}
            if "base" in entry:
                entry["cpu_ratio_to_base"] = common.ratio(entry["ours"]["cpu_ms_per_cycle"],
                                                          entry["base"]["cpu_ms_per_cycle"])
            result["levels"][str(level)] = entry
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    common.chart(args.out, NAME + "_rss", lambda figure: draw_rss(figure, result))
    return 0


def draw(figure, result):
    """Left: open-loop p50/p99 against the peer count (log), saturation on a second axis; right: CPU per cycle."""
    left, right = figure.subplots(1, 2)
    levels = list(result["levels"])
    peers = [int(lv) for lv in levels]
    sides = [s for s in ("ours", "base") if s in result["levels"][levels[0]]]
    colors = {"ours": "#2a7", "base": "#888"}
    twin = left.twinx()
    for side in sides:
        got = [result["levels"][lv][side] for lv in levels]
        left.plot(peers, [g["p99_ms"] for g in got], "o-", color=colors[side], label="%s p99" % side)
        left.plot(peers, [g["p50_ms"] for g in got], "s--", color=colors[side], label="%s p50" % side)
        twin.plot(peers, [g["saturation_per_s"] for g in got], "^:", color="#37c", label="%s saturation" % side)
    left.set_xscale("log")
    left.set_xlabel("peers on the interface")
    left.set_ylabel("connect latency, open loop at half saturation (ms)")
    twin.set_ylabel("saturation (connect + disconnect cycles/s)", color="#37c")
    twin.set_ylim(bottom=0)
    left.set_ylim(bottom=0)
    handles = left.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    left.set_title("connect latency and saturation against the peer count", fontsize=10)
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(levels))]
        right.bar(xs, [result["levels"][lv][side]["cpu_ms_per_cycle"] or 0 for lv in levels], width, label=side,
                  color=colors[side])
    right.set_xticks(range(len(levels)), ["%s" % lv for lv in levels])
    right.set_xlabel("peers")
    right.set_title("stack CPU per connect + disconnect (ms)", fontsize=10)
    right.legend(fontsize=8)


def draw_rss(figure, result):
    """RSS per process against the peer count."""
    axes = figure.subplots(1, 1)
    levels = list(result["levels"])
    peers = [int(lv) for lv in levels]
    names = sorted({k for lv in levels for k in result["levels"][lv].get("ours_rss_mb", {})})
    for name in names:
        axes.plot(peers, [result["levels"][lv]["ours_rss_mb"].get(name) for lv in levels], "o-", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("peers on the interface")
    axes.set_ylabel("RSS (MB)")
    axes.set_ylim(bottom=0)
    axes.set_title("resident memory per process after the runs of each level", fontsize=10)
    axes.legend(fontsize=8)


def render(result, smoke):
    rows, mem = [], []
    for level, e in result["levels"].items():
        for side in ("ours", "base"):
            if side in e:
                o = e[side]
                split = ", ".join("%s %s" % (k, v) for k, v in o["cpu_ms_per_cycle_by_process"].items() if v)
                rows.append([level, side, o["saturation_per_s"], o["closed_loop_p99_ms"], o["offered_per_s"],
                             o["p50_ms"], o["p99_ms"], o["status_p99_ms"], o["health_p99_ms"], o["cpu_ms_per_cycle"],
                             split, o["changes_per_wg_set"], o["errors"], e[side + "_consistent_after"],
                             o["load_avg_max"]])
        rss, per = e.get("ours_rss_mb", {}), e.get("ours_rss_kb_per_peer", {})
        mem.append([level] + ["%s (%s kB/peer)" % (rss[k], per[k]) if k in rss else None
                              for k in ("helper", "spawner", "worker0", "worker1", "wireguard-go")])
    text = ("Control plane: saturation with %d closed-loop clients, then Poisson arrivals at half of it; "
            "median of %d runs of %gs per phase; status and health polled during the open loop\n\n"
            % (result["clients"], result["runs"], result["duration_s"])
            + common.table(["peers", "code", "saturation cycles/s", "closed-loop p99 ms", "offered /s",
                            "open p50 ms", "open p99 ms", "status p99 ms", "health p99 ms", "CPU ms/cycle",
                            "by process", "changes per wg set", "errors", "db=wg", "max load avg"], rows)
            + "\n\nRSS in MB after the runs of each level (RSS / peers)\n\n"
            + common.table(["peers", "helper", "spawner", "worker0", "worker1", "wireguard-go"], mem))
    levels = result["levels"]
    if not smoke:
        checks = []
        if "10000" in levels:
            e = levels["10000"]
            checks.append(("10k open loop at half saturation: p99 <= 50 ms", e["ours"]["p99_ms"] <= 50,
                           e["ours"]["p99_ms"]))
        if "1000" in levels and "60000" in levels:
            low, high = levels["1000"]["ours"], levels["60000"]["ours"]
            p99 = common.ratio(high["p99_ms"], low["p99_ms"])
            sat = common.ratio(high["saturation_per_s"], low["saturation_per_s"])
            checks.append(("60k open-loop p99 <= 1.5x the 1k p99", p99 is not None and p99 <= 1.5,
                           "%s vs %s ms (%sx)" % (high["p99_ms"], low["p99_ms"], p99)))
            checks.append(("60k saturation >= 0.9x the 1k saturation", sat is not None and sat >= 0.9,
                           "%s vs %s /s (%sx)" % (high["saturation_per_s"], low["saturation_per_s"], sat)))
            for path in ("status", "health"):
                got = high[path + "_p99_ms"]
                checks.append(("60k %s p99 <= 20 ms under the open loop" % path, got is not None and got <= 20, got))
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
