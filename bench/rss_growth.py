#!/usr/bin/env python3
"""RSS over a 5-minute open loop: does any process grow without bound at LEVEL peers?

The stack of bench/control_plane.py holding LEVEL seeded peers; a short
saturation phase finds the rate, then Poisson connects (each followed by
its disconnect) arrive at half of it for --minutes.  The RSS of the helper,
each worker and wireguard-go is read every 10 s; the figure is RSS at the
end against RSS after the first fifth (minute 1 of 5).  Target: within 5%.
"""
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, control_plane  # noqa: E402

NAME = "rss_growth"


def sample(stack, every, stop, into):
    began = time.monotonic()
    while not stop.is_set():
        into.append({"t_s": round(time.monotonic() - began, 1), "rss_mb": control_plane.rss_mb(stack)})
        stop.wait(every)


def at(samples, t):
    """The first sample taken at or after t seconds."""
    return next((s for s in samples if s["t_s"] >= t), samples[-1])


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--levels", default=None, help="comma-separated seeded peer counts")
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--rate", type=float, default=None, help="connects/s offered (default: half the saturation)")
    args = p.parse_args(argv)
    levels = [int(x) for x in (args.levels or ("20" if args.smoke else "60000")).split(",")]
    minutes = args.minutes or (0.25 if args.smoke else 5.0)
    every = 2.0 if args.smoke else 10.0
    result = {"benchmark": NAME, "smoke": args.smoke, "minutes": minutes, "levels": {}}
    with common.Lab() as lab:
        stack = control_plane.make_stack(lab, None, tag="g")
        lab.on_exit(stack.close)
        stack.start_helper()
        stack.start_app()
        for level in levels:
            control_plane.seed(stack, level)
            sat = control_plane.saturation(stack, 4 if args.smoke else 50, 1.0 if args.smoke else 10.0,
                                           "gsat-%d" % level)
            rate = args.rate or (sat["cycles_per_s"] or 2) / 2
            samples, stop = [], threading.Event()
            sampler = threading.Thread(target=sample, args=(stack, every, stop, samples), daemon=True)
            load_before = [round(x, 2) for x in os.getloadavg()]
            began_at = time.time()  # the wall clock of sample t_s 0, to place other logs (a dump's) in the run
            sampler.start()
            opened = control_plane.open_loop(stack, rate, minutes * 60, "gopen-%d" % level, seed=level, reads=False)
            stop.set()
            sampler.join(timeout=30)
            first, last = at(samples, minutes * 60 / 5), samples[-1]
            growth = {k: common.ratio(last["rss_mb"].get(k), v, 3) for k, v in first["rss_mb"].items()}
            result["levels"][str(level)] = {
                "offered_per_s": round(rate, 1), "began_at": round(began_at, 3), "cycles": opened["cycles"], "errors": opened["errors"],
                "error_samples": opened["error_samples"], "slowest": opened["slowest"][-50:],
                "connect": opened["connect"], "samples": samples, "rss_minute1_mb": first["rss_mb"],
                "rss_end_mb": last["rss_mb"], "growth": growth, "load_avg_before": load_before,
                "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    text = render(result)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def draw(figure, result):
    axes = figure.subplots(1, 1)
    for level, e in result["levels"].items():
        for name in sorted(e["rss_end_mb"]):
            axes.plot([s["t_s"] / 60 for s in e["samples"]], [s["rss_mb"].get(name) for s in e["samples"]],
                      label="%s at %s peers" % (name, level))
    axes.set_xlabel("minutes of open loop")
    axes.set_ylabel("RSS (MB)")
    axes.set_ylim(bottom=0)
    axes.set_title("RSS during the open loop", fontsize=10)
    axes.legend(fontsize=8)


def render(result):
    rows = []
    for level, e in result["levels"].items():
        for name in sorted(e["rss_end_mb"]):
            rows.append([level, name, e["rss_minute1_mb"].get(name), e["rss_end_mb"][name], e["growth"].get(name)])
    text = ("RSS over %g minutes of open loop (Poisson connects at half saturation): at one fifth of the run and "
            "at its end\n\n" % result["minutes"]
            + common.table(["peers", "process", "RSS MB at 1/5", "RSS MB at end", "end / 1/5"], rows))
    if not result["smoke"]:
        worst = max((g for e in result["levels"].values() for g in e["growth"].values() if g), default=None)
        checks = [("RSS at minute 5 within 5% of minute 1, every process", worst is not None and worst <= 1.05,
                   worst)]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
