#!/usr/bin/env python3
"""Usage, speed tiers and quotas: what they cost at 10,000 peers (issue 25), A/B in one run.

One stack (helper, gunicorn with two gevent workers, wireguard-go) in a
server namespace with NAT to a simulated internet (tests/e2e/internet.py),
10,000 client peers seeded through the app's own store (common.seed_peers),
and the same stack measured with a speed tier set for every one of them
("tiers") and with none ("none"), the two interleaved run by run:

1. forwarding: iperf3 TCP from a real WireGuard client through the server
   to a host behind its uplink, download and upload; with tiers, the
   client's own tier is 100 Gbit/s, so its packets go through the meters
   without being held;
2. control plane: saturation with 50 closed-loop clients, then Poisson
   arrivals at half of it (bench/control_plane.py's saturation() and
   open_loop()), each mode at half its own saturation (the target), and both
   at half the mean of the two (the A/B at one offered rate); with tiers,
   the connecting users have a tier too, so each connect puts its address
   into the helper's table (right after its peer), each disconnect takes it
   out;
3. the usage collector: CPU of every process in the server namespace over
   an idle window, counting on (the default ORBMESH_USAGE_INTERVAL) and off
   (0), the app restarted between them.

Tiers are seeded like the peers, in the database (five plans, round robin),
and reach the helper the way they would after a restart: one reconcile
(its limits call writes the table whole; SETTLE seconds pass before the
next measurement, for the kernel to free the table it replaced).  The two
modes take turns going first, run by run.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.control_plane import make_stack, open_loop, saturation, stack_cpu  # noqa: E402
from tests.e2e.internet import INTERNET_ADDR, Internet  # noqa: E402
from tests.e2e.netns import stop_process, unique_ifname  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402
from tests.e2e.wgclient import WgClient  # noqa: E402

NAME = "usage"
PLANS = (10, 20, 50, 100, 1000)   # Mbit/s, round robin over the seeded users
LINE = 100_000                    # the forwarding client's own tier: far above what the machine moves
IPERF_PORT = 5301
MODES = ("none", "tiers")
SETTLE = 3.0                      # seconds after a whole table write


def set_tiers(stack, on):
    """Every user with a tier (or none), then one reconcile: the helper's table whole.  Returns its seconds."""
    from app.helper import HelperClient
    from app.peers import reconcile
    from app.peers.db import connect, set_meta, write

    db = connect(stack.env["ORBMESH_DB_PATH"])
    helper = HelperClient(stack.env["ORBMESH_HELPER_SOCKET"], 120)
    try:
        with write(db):
            users = [r[0] for r in db.execute("SELECT DISTINCT user_id FROM peers")]
            users += ["bench-sat%d" % i for i in range(64)] + ["bench-open%d" % i for i in range(64)]
            db.execute("INSERT INTO usage_users (user_id, period_start) SELECT value, 0 FROM json_each(?) "
                       "WHERE true ON CONFLICT (user_id) DO NOTHING", (json.dumps(users),))
            if on:
                db.executemany("UPDATE usage_users SET rate_mbps = ?, rate_from = 'api' WHERE user_id = ?",
                               [(LINE if u == "bench-fwd" else PLANS[i % len(PLANS)], u) for i, u in enumerate(users)])
            else:
                db.execute("UPDATE usage_users SET rate_mbps = NULL, rate_from = 'api'")
            set_meta(db, "limits_used", 1)
        started = time.monotonic()
        reconcile.reconcile(db, helper)
        took = time.monotonic() - started
        time.sleep(SETTLE)
        return took
    finally:
        helper.close()
        db.close()


def table_size(stack):
    """(addresses in the plan maps, plans in use) of the helper's table, as nft lists it."""
    listing = json.loads(stack.server.run("nft", "-j", "list", "table", "inet", "orbmesh").stdout)
    elements = [e for item in listing["nftables"] if "map" in item and item["map"]["name"] in ("plan4", "plan6")
                for e in item["map"].get("elem", [])]
    return len(elements), len({rate for _, rate in elements})


def forwarding_stack(lab, tag, level):
    """(stack, internet, seconds to seed): the stack with NAT to the simulated internet and an iperf3
    server there, `level` seeded peers and the forwarding client up."""
    stack = make_stack(lab, None, tag=tag)
    internet = Internet(lab.netns, stack.server)
    lab.on_exit(internet.close)
    stack.env["ORBMESH_NAT_UPLINK"] = internet.uplink
    lab.on_exit(stack.close)
    stack.start_helper()
    stack.start_app()
    server = internet.ns.popen(["iperf3", "-s", "-B", INTERNET_ADDR, "-p", str(IPERF_PORT)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.on_exit(stop_process, server)
    seeded = round(common.seed_peers(stack, level), 2)
    forwarding_client(lab, stack)
    return stack, internet, seeded


def forwarding_client(lab, stack):
    client = WgClient(stack.client, unique_ifname("omf"))
    lab.on_exit(client.close)
    status, body = stack.connect("bench-fwd", "fwd", client.public_key)
    assert status == 200, body
    client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                     address_cidr=body["ip"], allowed_ips=[INTERNET_ADDR + "/32"], mtu=body["mtu"],
                     keepalive=body["keepalive"])
    wait_for(lambda: client.ping(INTERNET_ADDR, timeout=1), timeout=30, what="ping through the tunnel")
    return client


def forward(stack, internet, seconds):
    """(download, upload) Mbit/s through the server to the internet host."""
    down = iperf_to(stack.client, seconds, reverse=True)
    up = iperf_to(stack.client, seconds)
    return round(down, 1), round(up, 1)


def iperf_to(ns, seconds, reverse=False):
    argv = ["iperf3", "-c", INTERNET_ADDR, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1", "-J"]
    out = ns.run(*argv + (["-R"] if reverse else []), timeout=seconds + 60).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6


def collector_cpu(stack, interval, window):
    """CPU share of one core of the server namespace's processes over an idle `window`, counting every
    `interval` seconds (0: off), with the app restarted for it; and what the collector reported."""
    from app.peers.db import connect, get_meta

    stack.stop_app()
    stack.env["ORBMESH_USAGE_INTERVAL"] = str(interval)
    stack.start_app()
    time.sleep(min(10.0, window / 3))  # the first counts see every peer once; then the steady state
    before, started = stack_cpu(stack), time.monotonic()
    time.sleep(window)
    after, elapsed = stack_cpu(stack), time.monotonic() - started
    db = connect(stack.env["ORBMESH_DB_PATH"])
    try:
        cost = get_meta(db, "usage_cost")
    finally:
        db.close()
    share = {k: round((after[k] - before[k]) / elapsed * 100, 3) for k in after}
    return {"interval_s": interval, "window_s": round(elapsed, 1), "cpu_percent": round(sum(share.values()), 3),
            "cpu_percent_by_process": share, "last_count_cost_s": float(cost) if cost else None}


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--level", type=int, default=None, help="client peers seeded, all with tiers")
    p.add_argument("--seconds", type=int, default=None, help="iperf3 seconds per run")
    p.add_argument("--duration", type=float, default=None, help="seconds per control-plane phase")
    p.add_argument("--window", type=float, default=None, help="seconds of each collector CPU window")
    args = p.parse_args(argv)
    smoke = args.smoke
    level = args.level or (50 if smoke else 10000)
    seconds = args.seconds or (2 if smoke else 10)
    duration = args.duration or (1.0 if smoke else 10.0)
    window = args.window or (3.0 if smoke else 60.0)
    runs = args.runs or (1 if smoke else 3)
    clients = 4 if smoke else 50

    result = {"benchmark": NAME, "smoke": smoke, "level": level, "iperf_seconds": seconds, "duration_s": duration,
              "window_s": window, "runs": runs, "plans_mbps": list(PLANS)}
    with common.Lab() as lab:
        stack, internet, result["seed_sync_s"] = forwarding_stack(lab, "u", level)
        samples = {mode: {"down": [], "up": [], "table_s": [], "control": [], "own": []} for mode in MODES}
        for run in range(runs):
            order = MODES if run % 2 == 0 else MODES[::-1]
            for mode in order:
                s = samples[mode]
                s["table_s"].append(round(set_tiers(stack, mode == "tiers"), 2))
                if mode == "tiers":
                    result["nft_table"] = dict(zip(("elements", "tiers"), table_size(stack)))
                down, up = forward(stack, internet, seconds)
                s["down"].append(down)
                s["up"].append(up)
                print("run %d %s: forwarding %.0f down, %.0f up Mbit/s" % (run, mode, down, up), file=sys.stderr)
            sat = {}
            for mode in order:
                set_tiers(stack, mode == "tiers")
                sat[mode] = saturation(stack, clients, duration, "%s-%d" % (mode, run))
                own = open_loop(stack, (sat[mode]["cycles_per_s"] or 2) / 2, duration, "%s-o%d" % (mode, run),
                                seed=run)
                samples[mode]["own"].append(own)
                print("run %d %s: saturation %.0f/s, open loop at half of it %.0f/s p99 %s ms" % (
                    run, mode, sat[mode]["cycles_per_s"] or 0, own["offered_per_s"], own["connect"]["p99_ms"]),
                    file=sys.stderr)
            rate = sum(x["cycles_per_s"] or 2 for x in sat.values()) / len(sat) / 2
            for mode in order:
                set_tiers(stack, mode == "tiers")
                opened = open_loop(stack, rate, duration, "%s-%d" % (mode, run), seed=run)
                samples[mode]["control"].append({"saturation": sat[mode], "open_loop": opened})
                print("run %d %s: open loop at the common %.0f/s p99 %s ms" % (
                    run, mode, rate, opened["connect"]["p99_ms"]), file=sys.stderr)
        set_tiers(stack, True)
        result["collector"] = {"off": collector_cpu(stack, 0, window),
                               "on": collector_cpu(stack, 2.0, window)}  # the default interval
        result["collector"]["cost_percent"] = round(result["collector"]["on"]["cpu_percent"]
                                                    - result["collector"]["off"]["cpu_percent"], 3)
        result["consistent_after"] = stack.db_peers() == stack.wg_peers()
        for mode in MODES:
            s = samples[mode]
            opened, own = [c["open_loop"] for c in s["control"]], s["own"]
            result[mode] = {"down_mbps": s["down"], "up_mbps": s["up"], "median_down_mbps": common.median(s["down"]),
                            "median_up_mbps": common.median(s["up"]), "table_write_s": s["table_s"],
                            "saturation_per_s": common.median([c["saturation"]["cycles_per_s"] for c in s["control"]]),
                            "own_offered_per_s": common.median([o["offered_per_s"] for o in own]),
                            "own_p50_ms": common.median([o["connect"]["p50_ms"] for o in own]),
                            "own_p99_ms": common.median([o["connect"]["p99_ms"] for o in own]),
                            "offered_per_s": common.median([o["offered_per_s"] for o in opened]),
                            "p50_ms": common.median([o["connect"]["p50_ms"] for o in opened]),
                            "p99_ms": common.median([o["connect"]["p99_ms"] for o in opened]),
                            "cpu_ms_per_cycle": common.median([o["cpu_ms_per_cycle"] for o in opened]),
                            "errors": sum(c["saturation"]["errors"] + c["open_loop"]["errors"] for c in s["control"])
                            + sum(o["errors"] for o in own),
                            "runs": s["control"], "own_runs": own}
        for way in ("down", "up"):
            result["ratio_%s" % way] = common.ratio(result["tiers"]["median_%s_mbps" % way],
                                                    result["none"]["median_%s_mbps" % way], 3)
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def render(result, smoke):
    rows = [[mode, result[mode]["median_down_mbps"], result[mode]["median_up_mbps"],
             result[mode]["saturation_per_s"], result[mode]["own_offered_per_s"], result[mode]["own_p99_ms"],
             result[mode]["offered_per_s"], result[mode]["p50_ms"], result[mode]["p99_ms"],
             result[mode]["cpu_ms_per_cycle"], result[mode]["errors"]] for mode in MODES]
    c = result["collector"]
    text = ("Usage, tiers and quotas at %d peers: median of %d runs, none and tiers interleaved\n\n" % (
        result["level"], result["runs"])
        + common.table(["tiers", "forward down Mbit/s", "forward up Mbit/s", "saturation cycles/s",
                        "half of it /s", "its open p99 ms", "common rate /s", "open p50 ms", "open p99 ms",
                        "CPU ms/cycle", "errors"], rows)
        + "\n\nforwarding with tiers / without: down %s, up %s; table: %s addresses in the plan maps, %s tiers; "
          "written whole in %s s" % (result["ratio_down"], result["ratio_up"], result.get("nft_table", {}).get("elements"),
                                     result.get("nft_table", {}).get("tiers"), result["tiers"]["table_write_s"])
        + "\ncollector: server namespace CPU %s%% of a core counting off, %s%% on (interval %s s, last count %s s): "
          "%s%% of a core" % (c["off"]["cpu_percent"], c["on"]["cpu_percent"], c["on"]["interval_s"],
                              c["on"]["last_count_cost_s"], c["cost_percent"]))
    if not smoke:
        checks = [("forwarding with tiers within 5% of without (down)", result["ratio_down"] >= 0.95,
                   result["ratio_down"]),
                  ("forwarding with tiers within 5% of without (up)", result["ratio_up"] >= 0.95, result["ratio_up"]),
                  ("connect p99 at half saturation with tiers < 50 ms", result["tiers"]["own_p99_ms"] < 50,
                   result["tiers"]["own_p99_ms"]),
                  ("collector CPU < 2% of a core", c["cost_percent"] < 2, c["cost_percent"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


def draw(figure, result):
    left, middle, right = figure.subplots(1, 3)
    colors = ["#888", "#2a7"]
    left.bar(["down\nnone", "down\ntiers", "up\nnone", "up\ntiers"],
             [result["none"]["median_down_mbps"] or 0, result["tiers"]["median_down_mbps"] or 0,
              result["none"]["median_up_mbps"] or 0, result["tiers"]["median_up_mbps"] or 0], color=colors * 2)
    left.set_title("forwarding, Mbit/s", fontsize=10)
    middle.bar(list(MODES), [result[m]["own_p99_ms"] or 0 for m in MODES], color=colors)
    middle.axhline(50, color="#c33", linestyle="--", label="target 50 ms")
    middle.set_title("connect p99 at half saturation (ms)", fontsize=10)
    middle.legend(fontsize=8)
    c = result["collector"]
    right.bar(["off", "on"], [c["off"]["cpu_percent"], c["on"]["cpu_percent"]], color=colors)
    right.axhline(c["off"]["cpu_percent"] + 2, color="#c33", linestyle="--", label="off + 2%")
    right.set_title("server CPU, % of a core, idle", fontsize=10)
    right.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
