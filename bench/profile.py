#!/usr/bin/env python3
"""Profile: where the helper and the workers spend their time during the open loop at LEVEL peers.

The control plane's stack (bench/control_plane.py) holding LEVEL seeded
peers, a short saturation phase to find the rate, then Poisson arrivals at
half of it while py-spy samples the helper and every gunicorn worker
(--format raw: collapsed stacks, one file per process, beside the JSON).
The table lists, per process, the frames of our code (app/, wghelper/)
with the largest share of samples (inclusive), which is what
docs/benchmarks.md cites.  Without py-spy (beside the interpreter, on PATH or --py-spy) it runs
the load and reports no samples: the smoke run checks only the plumbing.
"""
import collections
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, control_plane  # noqa: E402
from tests.e2e.netns import children  # noqa: E402

NAME = "profile"
OURS = ("app/", "wghelper/")


def top_frames(path, count=12):
    """[(share %, frame)] of our code's frames, inclusive, from a py-spy raw (collapsed) file."""
    total, seen = 0, collections.Counter()
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        total += int(n)
        frames = {f for f in stack.split(";") if any(o in f for o in OURS)}
        for frame in frames:
            seen[frame] += int(n)
    return total, [(round(100 * n / total, 1), f) for f, n in seen.most_common(count)] if total else []


def record(py_spy, pids, duration, out):
    procs = {}
    for name, pid in pids.items():
        path = out / ("profile-%s.txt" % name)
        procs[name] = (path, subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(duration)),
                                               "--rate", "100", "--format", "raw", "--nonblocking", "-o", str(path)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--level", type=int, default=None, help="seeded peers")
    p.add_argument("--duration", type=float, default=None, help="seconds of the sampled open loop")
    p.add_argument("--py-spy", default=None, help="the py-spy binary (default: from PATH)")
    p.add_argument("--tiers", action="store_true",
                   help="every user with a speed tier, as bench/usage.py's tiered mode (issue 25's cost)")
    p.add_argument("--rate", type=float, default=None, help="connects/s offered (default: half the saturation)")
    p.add_argument("--rounds", type=float, default=None,
                   help="drift check and stale sweep every this many seconds (default: the app's 300), so that "
                        "rounds land inside the sampled loop")
    args = p.parse_args(argv)
    level = args.level or (20 if args.smoke else 60000)
    duration = args.duration or (2.0 if args.smoke else 30.0)
    beside = Path(sys.executable).parent / "py-spy"  # requirements.txt installs it in the venv
    py_spy = args.py_spy or (str(beside) if beside.exists() else shutil.which("py-spy"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": NAME, "smoke": args.smoke, "level": level, "duration_s": duration,
              "tiers": args.tiers, "rounds_s": args.rounds, "py_spy": bool(py_spy), "processes": {}}
    with common.Lab() as lab:
        stack = control_plane.make_stack(lab, None, tag="p")
        lab.on_exit(stack.close)
        if args.rounds:
            stack.env.update(ORBMESH_RECONCILE_INTERVAL=str(args.rounds), ORBMESH_SWEEP_INTERVAL=str(args.rounds))
        stack.start_helper()
        stack.start_app()
        result["seed_sync_s"] = round(control_plane.seed(stack, level), 2)
        if args.tiers:
            from bench.usage import set_tiers
            result["tier_table_s"] = round(set_tiers(stack, True), 2)
        sat = control_plane.saturation(stack, 4 if args.smoke else 50, 1.0 if args.smoke else 10.0, "psat")
        rate = args.rate or (sat["cycles_per_s"] or 2) / 2
        pids = {"helper": stack.helper_proc.pid}
        pids.update(("spawner", pid) for pid in children(stack.helper_proc.pid)  # wghelper/argv.py Spawner
                    if b"wghelper" in Path("/proc/%d/cmdline" % pid).read_bytes())
        pids.update(("worker%d" % i, pid) for i, pid in enumerate(sorted(children(stack.app_proc.pid))))
        procs = record(py_spy, pids, duration, out) if py_spy else {}
        opened = control_plane.open_loop(stack, rate, duration, "popen", seed=0)
        for name, (path, proc) in procs.items():
            proc.wait(timeout=60)
            total, top = top_frames(path) if path.exists() else (0, [])
            result["processes"][name] = {"samples": total, "top": top, "file": path.name}
        result["saturation_per_s"] = sat["cycles_per_s"]
        result["open_loop"] = {k: opened[k] for k in ("offered_per_s", "cycles", "errors", "connect", "slowest")}
    lines = ["Profile at %d peers%s: open loop %s/s offered, p50 %s ms, p99 %s ms, %d errors" % (
        level, " (every user tiered)" if args.tiers else "", result["open_loop"]["offered_per_s"],
        result["open_loop"]["connect"]["p50_ms"],
        result["open_loop"]["connect"]["p99_ms"], result["open_loop"]["errors"])]
    for name, proc in result["processes"].items():
        lines.append("\n%s (%d samples)" % (name, proc["samples"]))
        lines.append(common.table(["% samples", "frame"], proc["top"]))
    common.write_result(out, NAME, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
