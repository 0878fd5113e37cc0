#!/usr/bin/env python3
"""Memory: app memory per idle WebSocket tunnel session, with 10,000 sessions open at once.

One gunicorn worker (so every session lands in the process we measure).
Each session belongs to its own device (the per-device session cap).  A
warm-up opens and closes a few sessions first, so code loaded on first use
is not counted.  Then the worker's RSS and PSS (/proc/PID/smaps_rollup) are
read before and after all sessions are open and idle; the delta divided by
the number of sessions is the cost of one.  Each run restarts the app, so
runs do not reuse each other's freed memory.
"""
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.e2e.netns import children  # noqa: E402
from tests.e2e.stack import API_PORT, SERVER_ADDR, VENV_BIN  # noqa: E402

NAME = "memory"


def worker_pid(stack):
    workers = children(stack.app_proc.pid)
    if not workers:
        raise RuntimeError("no gunicorn worker found")
    return workers[0]


def memory_kb(pid):
    """{'rss': kB, 'pss': kB} of one process."""
    found = {}
    for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            found[name.lower()] = int(rest.split()[0])
    return found


class Sessions:
    """bench/ws_idle.py in the client namespace holding `count` sessions open."""

    def __init__(self, stack, count, tag):
        tokens = [stack.token("bench-mem", "%s-%d" % (tag, i)) for i in range(count)]
        self.proc = stack.client.popen([str(VENV_BIN / "python"), str(Path(__file__).with_name("ws_idle.py")),
                                        "ws://%s:%d/wireguard/ws" % (SERVER_ADDR, API_PORT)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(",".join(tokens) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line.strip() != "open %d" % count:
            raise RuntimeError("sessions did not open: %r" % line)

    def alive(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_run(stack, count, run):
    warm = Sessions(stack, 10, "warm%d" % run)
    warm.close()
    time.sleep(1)
    pid = worker_pid(stack)
    before = memory_kb(pid)
    sessions = Sessions(stack, count, "r%d" % run)
    try:
        time.sleep(2)  # idle: let every greenlet settle
        after = memory_kb(pid)
        alive = sessions.alive()
    finally:
        sessions.close()
    return {"sessions": count, "alive": alive, "rss_before_kb": before["rss"], "rss_after_kb": after["rss"],
            "pss_before_kb": before["pss"], "pss_after_kb": after["pss"],
            "rss_per_session_kb": round((after["rss"] - before["rss"]) / count, 1),
            "pss_per_session_kb": round((after["pss"] - before["pss"]) / count, 1)}


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--before", type=float, default=None, metavar="KB",
                   help="kB per session of an earlier run (another checkout), drawn on the chart")
    args = p.parse_args(argv)
    smoke = args.smoke
    count = args.sessions or (20 if smoke else 10000)
    # One descriptor a session in the worker and one in the client: past the usual 1,024.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs = args.runs or (1 if smoke else 3)
    result = {"benchmark": NAME, "smoke": smoke, "sessions": count, "runs": [], "before_kb": args.before}
    with common.Lab() as lab:
        # gunicorn's gevent worker takes 1,000 connections unless told otherwise.
        stack = lab.stack(workers=1, env={"ORBMESH_LOG_LEVEL": "WARNING", "ORBMESH_WS_IDLE_TIMEOUT": "600",
                                          "GUNICORN_CMD_ARGS": "--worker-connections %d" % (count + 100)})
        with stack.running():
            for run in range(runs):
                if run:
                    stack.stop_app()
                    stack.start_app()
                result["runs"].append(one_run(stack, count, run))
                print("run %d: %s" % (run, result["runs"][-1]), file=sys.stderr)
    result["rss_per_session_kb"] = common.median([r["rss_per_session_kb"] for r in result["runs"]])
    result["pss_per_session_kb"] = common.median([r["pss_per_session_kb"] for r in result["runs"]])
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def draw(figure, result):
    axes = figure.subplots()
    runs = result["runs"]
    labels = ["run %d" % i for i in range(len(runs))]
    width = 0.35
    xs = range(len(runs))
    axes.bar([x - width / 2 for x in xs], [r["rss_per_session_kb"] for r in runs], width, label="RSS", color="#2a7")
    axes.bar([x + width / 2 for x in xs], [r["pss_per_session_kb"] for r in runs], width, label="PSS", color="#7a2")
    axes.axhline(20, color="#c33", linestyle="--", label="target: 20 kB")
    if result.get("before_kb"):
        axes.axhline(result["before_kb"], color="#888", linestyle=":", label="before: %.1f kB" % result["before_kb"])
    axes.set_xticks(list(xs), labels)
    axes.set_ylabel("kB per idle WebSocket session")
    axes.set_title("%d idle sessions in one gunicorn worker" % result["sessions"])
    axes.legend(fontsize=8)


def render(result, smoke):
    rows = [[i, r["sessions"], r["alive"], r["rss_before_kb"], r["rss_after_kb"], r["rss_per_session_kb"],
             r["pss_per_session_kb"]] for i, r in enumerate(result["runs"])]
    rows.append(["median", "", "", "", "", result["rss_per_session_kb"], result["pss_per_session_kb"]])
    text = ("Memory: %d idle WebSocket sessions in one gunicorn worker\n\n" % result["sessions"]
            + common.table(["run", "sessions", "alive", "RSS before kB", "RSS after kB", "RSS/session kB",
                            "PSS/session kB"], rows))
    if not smoke:
        checks = [("<= 20 kB per idle WS session (RSS)", result["rss_per_session_kb"] <= 20,
                   "%s kB" % result["rss_per_session_kb"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
