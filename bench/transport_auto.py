#!/usr/bin/env python3
"""Transport auto: iperf3 through `orbmesh-relay --transport auto` while a middlebox changes what passes.

The lab of tests/e2e/middlebox.py (client, middlebox with nftables, node).
One iperf3 upload (client to the gateway) runs for the whole schedule,
a ping every 50 ms beside it, while the middlebox:

    t = 10 s   blocks UDP                     (auto falls back to WebSocket)
    t = 40 s   lets UDP through again         (auto moves back to UDP)
    t = 70 s   blocks WebSocket upgrades      (GET dropped; UDP still open: auto stays on UDP)
    t = 85 s   blocks UDP too                 (only plain HTTP POSTs pass: auto falls back to HTTP)
    t = 100 s  the end

The issue's schedule is the first three events; the fourth is added so
that the run also shows a fall back to HTTP.  The same schedule then runs
with each fixed transport (--transport udp, ws, http): the chart shows
auto beside the best single transport of every moment.  Per run: Mbit/s
per second (iperf3 intervals), the transport the relay names in its JSON
status (sampled every 0.25 s), and for auto every switch with its reason
and its loss window: the longest gap between ping replies from 3 s before
to 3 s after it.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.e2e import middlebox  # noqa: E402
from tests.e2e.netns import stop_process  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402

NAME = "transport_auto"
MODES = ("auto", "udp", "ws", "http")
COLORS = {"udp": "#2a7", "ws": "#27a", "http": "#a72", "none": "#ccc", "auto": "#000"}
IPERF_PORT = middlebox.IPERF_PORTS[0]  # opened on the node by the lab
SCHEDULE = [(10, ("udp",), "block UDP"), (40, (), "unblock UDP"), (70, ("get",), "block WebSocket upgrades"),
            (85, ("udp", "get"), "block UDP too (only HTTP POSTs pass)")]
DURATION = 100
SMOKE_SCHEDULE = [(2, ("udp",), "block UDP"), (5, (), "unblock UDP"), (8, ("get",), "block WebSocket upgrades"),
                  (10, ("udp", "get"), "block UDP too (only HTTP POSTs pass)")]
SMOKE_DURATION = 12
WINDOW = 3.0  # seconds each side of a switch in which its loss window is looked for


def run_mode(lab, mode, schedule, duration, index):
    """One run of the schedule with `mode`; the per-second figures, the transports seen, the switches."""
    lab.block()
    client = lab.client_through_relay(mode, "bench-%s-%d" % (mode, index))
    try:
        client.start_relay()
        pinger = client.start_pinging()
        client.on({"auto": "udp"}.get(mode, mode), timeout=60)
        wait_for(lambda: pinger.flowing_since(time.time() - 1), timeout=60, what="pings over %s" % mode)
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.wait(0.25):
                samples.append((time.time(), client.status().get("transport") or "none"))

        sampler = threading.Thread(target=sample, daemon=True)
        iperf = lab.client.popen(["iperf3", "-c", middlebox.GATEWAY, "-p", str(IPERF_PORT), "-t", str(duration),
                                  "-i", "1", "-J", "--connect-timeout", "5000"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        started = time.time()
        sampler.start()
        events = []
        for at, blocks, what in schedule:
            time.sleep(max(0.0, started + at - time.time()))
            lab.block(*blocks)
            events.append({"at_s": round(time.time() - started, 2), "what": what})
        # Everything passes again as iperf3 ends, so that it can exchange its results.
        time.sleep(max(0.0, started + duration - 0.2 - time.time()))
        lab.block()
        out, _ = iperf.communicate(timeout=duration + 120)
        stop.set()
        sampler.join()
        status = client.status()
        switches = [dict(s, at_s=round(s["at"] - started, 2),
                         loss_window_s=round(pinger.longest_gap(s["at"] - WINDOW, s["at"] + WINDOW), 2))
                    for s in status.get("switches", []) if s["at"] >= started]
        per_second = [round(i["sum"]["bits_per_second"] / 1e6, 1) for i in json.loads(out)["intervals"]]
        seen = []
        for second in range(len(per_second)):
            names = [name for t, name in samples if started + second <= t < started + second + 1]
            seen.append(max(set(names), key=names.count) if names else None)
        print("%s: %.0f Mbit/s mean, switches %s" % (mode, sum(per_second) / max(1, len(per_second)),
                                                     [(s["at_s"], s["to"]) for s in switches]), file=sys.stderr)
        return {"per_second_mbps": per_second, "transport_per_second": seen, "events": events,
                "switches": switches, "reconnects": status.get("reconnects"), "dropped": status.get("dropped")}
    finally:
        lab.block()
        client.close()
        lab.clients.remove(client)
        lab.pingers.clear()


def phases(schedule, duration):
    """[(start, end, name)] between the events."""
    bounds = [0] + [at for at, _, _ in schedule] + [duration]
    names = ["open"] + [what for _, _, what in schedule]
    return [(a, b, name) for a, b, name in zip(bounds, bounds[1:], names)]


def summarize(runs, schedule, duration):
    """Median Mbit/s of each run in each phase, leaving out the second at each edge."""
    out = []
    for start, end, name in phases(schedule, duration):
        row = {"from_s": start, "to_s": end, "phase": name}
        for mode, run in runs.items():
            values = run["per_second_mbps"][start + 1:end - 1] or run["per_second_mbps"][start:end]
            row[mode] = common.median(values)
        names = [t for t in runs["auto"]["transport_per_second"][start + 1:end - 1] if t]
        row["auto_on"] = max(set(names), key=names.count) if names else None
        best = max((row[m] or 0) for m in ("udp", "ws", "http"))
        row["auto_to_best"] = common.ratio(row["auto"], best)
        out.append(row)
    return out


def main(argv=None):
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    schedule, duration = (SMOKE_SCHEDULE, SMOKE_DURATION) if args.smoke else (SCHEDULE, DURATION)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = {}
    with common.Lab() as lab:
        built = middlebox.Lab(lab.netns, lab.tmp)
        lab.on_exit(built.close)
        built.start()
        iperf = built.server.popen(["iperf3", "-s", "-B", middlebox.GATEWAY, "-p", str(IPERF_PORT)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.on_exit(stop_process, iperf)
        for index, mode in enumerate(MODES):
            runs[mode] = run_mode(built, mode, schedule, duration, index)
        versus = relay_versus_direct(built, *((1, 1) if args.smoke else (10, 2)))
    result = {"benchmark": NAME, "smoke": args.smoke, "duration_s": duration,
              "schedule": [{"at_s": at, "blocks": list(blocks), "what": what} for at, blocks, what in schedule],
              "load_avg_before": load_before, "runs": runs, "phases": summarize(runs, schedule, duration),
              "relay_vs_direct": versus}
    common.write_result(args.out, NAME, result, render(result, args.smoke))
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def relay_versus_direct(lab, pairs, seconds):
    """On UDP: iperf3 through the relay against WireGuard talking to the node directly (issue 24's
    "within 5 %"), paired runs on one client; the median of the pairs' ratios."""
    lab.block()
    client = lab.client_through_relay("auto", "bench-versus")
    try:
        client.start_relay()
        client.on("udp", timeout=60)
        measured = client.relay_and_direct_mbps(pairs, seconds)
    finally:
        client.close()
        lab.clients.remove(client)
    ratios = [relay / direct for direct, relay in measured if direct > 0]
    return {"pairs_mbps": [[round(d, 1), round(r, 1)] for d, r in measured], "seconds": seconds,
            "median_ratio": round(common.median(ratios), 3) if ratios else None}


def draw(figure, result):
    axes = figure.subplots()
    auto = result["runs"]["auto"]
    seen = auto["transport_per_second"]
    for second, name in enumerate(seen):
        axes.axvspan(second, second + 1, color=COLORS.get(name or "none", "#ccc"), alpha=0.12, linewidth=0)
    for mode in ("udp", "ws", "http"):
        values = result["runs"][mode]["per_second_mbps"]
        axes.plot([i + 0.5 for i in range(len(values))], values, color=COLORS[mode], linewidth=1, alpha=0.7,
                  label="--transport %s" % mode)
    axes.plot([i + 0.5 for i in range(len(auto["per_second_mbps"]))], auto["per_second_mbps"], color="#000",
              linewidth=2, label="--transport auto (background: the transport it used)")
    top = max([max(r["per_second_mbps"] or [0]) for r in result["runs"].values()] + [1])
    for event in result["schedule"]:
        axes.axvline(event["at_s"], color="#c33", linestyle=":", linewidth=1)
        axes.text(event["at_s"] + 0.3, top * 1.02, event["what"], fontsize=6, color="#c33", rotation=0)
    for switch in auto["switches"]:
        axes.axvline(switch["at_s"], color="#000", linestyle="--", linewidth=0.8)
        axes.text(switch["at_s"] + 0.3, top * 0.92, "%s -> %s\n%.2f s gap" % (
            switch["from"] or "start", switch["to"], switch["loss_window_s"]), fontsize=6)
    axes.set_xlim(0, result["duration_s"])
    axes.set_ylim(0, top * 1.12)
    axes.set_xlabel("seconds (iperf3 TCP upload through WireGuard; middlebox events dotted, switches dashed)")
    axes.set_ylabel("Mbit/s per second")
    axes.set_title("Transport auto under a changing middlebox, beside each fixed transport", fontsize=10)
    axes.legend(fontsize=7, loc="lower left")


def render(result, smoke):
    rows = [["%d-%d s %s" % (p["from_s"], p["to_s"], p["phase"]), p["auto"], p["auto_on"], p["udp"], p["ws"],
             p["http"], p["auto_to_best"]] for p in result["phases"]]
    text = ("Transport auto: iperf3 upload for %d s through the relay while the middlebox changes "
            "(median Mbit/s per phase, its first and last second left out); load average before %s\n\n" % (
                result["duration_s"], result["load_avg_before"])
            + common.table(["phase", "auto", "auto on", "udp", "ws", "http", "auto / best"], rows))
    switches = [[s["at_s"], s["from"] or "-", s["to"], s["loss_window_s"], s["reason"]]
                for s in result["runs"]["auto"]["switches"]]
    text += "\n\nSwitches of --transport auto (loss window: longest gap in 20/s pings within 3 s of it)\n\n"
    text += common.table(["at s", "from", "to", "loss window s", "reason"], switches)
    versus = result["relay_vs_direct"]
    text += ("\n\nOn UDP, relay against WireGuard talking UDP directly: median ratio %s of %d paired %d s "
             "runs, (direct, relay) Mbit/s %s" % (versus["median_ratio"], len(versus["pairs_mbps"]),
                                                   versus["seconds"], versus["pairs_mbps"]))
    if not smoke:
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in targets(result)]
        text += "\n\nTargets (issue 24):\n" + common.targets_text(targets(result))
    return text


def targets(result):
    auto = result["runs"]["auto"]
    switches = auto["switches"]

    def first(to, after):
        return next((s for s in switches if s["to"] == to and s["at_s"] >= after), None)

    to_ws, back, to_http = first("ws", 10), first("udp", 40), first("http", 85)
    ratio = result["relay_vs_direct"]["median_ratio"]
    checks = [
        ("on UDP, relay throughput within 5% of WireGuard talking UDP directly (median of pairs)",
         ratio is not None and ratio >= 0.95, ratio),
        ("UDP blocked mid-transfer: on WebSocket with a loss window <= 2 s",
         bool(to_ws) and to_ws["loss_window_s"] <= 2.0, to_ws and to_ws["loss_window_s"]),
        ("back on UDP within 30 s of the unblock", bool(back) and back["at_s"] - 40 <= 30,
         back and round(back["at_s"] - 40, 1)),
        ("at most 1 s of loss at the move back", bool(back) and back["loss_window_s"] <= 1.0,
         back and back["loss_window_s"]),
        ("WebSocket upgrades blocked, UDP open: no switch", not [s for s in switches if 70 <= s["at_s"] < 85],
         [s["to"] for s in switches if 70 <= s["at_s"] < 85]),
        ("only HTTP POSTs: on HTTP (loss window <= 4 s)", bool(to_http) and to_http["loss_window_s"] <= 4.0,
         to_http and to_http["loss_window_s"]),
    ]
    for phase in result["phases"]:
        checks.append(("%d-%d s: auto near the best fixed transport (>= 0.8)" % (phase["from_s"], phase["to_s"]),
                       (phase["auto_to_best"] or 0) >= 0.8, phase["auto_to_best"]))
    return checks


if __name__ == "__main__":
    sys.exit(main())
