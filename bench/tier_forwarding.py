#!/usr/bin/env python3
"""Forwarding with speed tiers and without, in many paired runs: issue 25's "within 5%" target alone.

bench/usage.py measures forwarding in three runs beside the control plane;
single runs there spread more than the 5% the target asks about.  This one
keeps its stack (the same: 10,000 seeded peers, NAT to a simulated
internet, a real WireGuard client whose own tier is far above what the
machine moves) and does nothing but iperf3 through it, tiers set for every
user and none, the two alternating run by run (each going first in turn),
so that the paired ratios and their median say what the per-packet work of
the tier rules costs.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.usage import MODES, forward, forwarding_stack, set_tiers, table_size  # noqa: E402

NAME = "tier_forwarding"


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--level", type=int, default=None, help="client peers seeded, all with tiers")
    p.add_argument("--seconds", type=int, default=None, help="iperf3 seconds per direction and run")
    args = p.parse_args(argv)
    level = args.level or (50 if args.smoke else 10000)
    seconds = args.seconds or (2 if args.smoke else 10)
    runs = args.runs or (1 if args.smoke else 8)
    result = {"benchmark": NAME, "smoke": args.smoke, "level": level, "iperf_seconds": seconds, "runs": runs}
    with common.Lab() as lab:
        stack, internet, result["seed_sync_s"] = forwarding_stack(lab, "f", level)
        samples = {mode: {"down": [], "up": []} for mode in MODES}
        # The first iperf3 after the stack came up ran at half the rate of the rest (12-07, 209 against
        # 388-504 Mbit/s): one pair, not counted, takes that start-up.
        result["warmup_mbps"] = forward(stack, internet, seconds)
        for run in range(runs):
            for mode in (MODES if run % 2 == 0 else MODES[::-1]):
                set_tiers(stack, mode == "tiers")
                if mode == "tiers":
                    result["nft_table"] = dict(zip(("addresses", "tiers"), table_size(stack)))
                down, up = forward(stack, internet, seconds)
                samples[mode]["down"].append(down)
                samples[mode]["up"].append(up)
                print("run %d %s: %.0f down, %.0f up Mbit/s" % (run, mode, down, up), file=sys.stderr)
    for way in ("down", "up"):
        paired = [common.ratio(t, n, 3) for t, n in zip(samples["tiers"][way], samples["none"][way])]
        result[way] = {"none_mbps": samples["none"][way], "tiers_mbps": samples["tiers"][way],
                       "median_none_mbps": common.median(samples["none"][way]),
                       "median_tiers_mbps": common.median(samples["tiers"][way]),
                       "paired_ratios": paired, "median_paired_ratio": common.median(paired)}
    rows = [[way, result[way]["median_none_mbps"], result[way]["median_tiers_mbps"],
             result[way]["median_paired_ratio"], " ".join("%.2f" % r for r in result[way]["paired_ratios"])]
            for way in ("down", "up")]
    text = ("Forwarding through a tiered client at %d peers, tiers for every user or none: %d paired runs of %d s\n\n"
            % (level, runs, seconds)
            + common.table(["direction", "none Mbit/s (median)", "tiers Mbit/s (median)", "median paired ratio",
                            "paired ratios"], rows)
            + "\n\ntable: %s addresses in the plan maps, %s tiers" % (
                result.get("nft_table", {}).get("addresses"), result.get("nft_table", {}).get("tiers")))
    if not args.smoke:
        checks = [("forwarding with tiers within 5%% of without (%s, median paired ratio)" % way,
                   result[way]["median_paired_ratio"] >= 0.95, result[way]["median_paired_ratio"])
                  for way in ("down", "up")]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def draw(figure, result):
    axes = figure.subplots(1, 1)
    for way, color in (("down", "#2a7"), ("up", "#27a")):
        ratios = result[way]["paired_ratios"]
        axes.plot(range(1, len(ratios) + 1), ratios, "o-", color=color, label="%s (median %s)" % (
            way, result[way]["median_paired_ratio"]))
    axes.axhline(0.95, color="#c33", linestyle="--", label="target 0.95")
    axes.axhline(1.0, color="#888", linewidth=0.5)
    axes.set_xlabel("run")
    axes.set_ylabel("tiers / none, Mbit/s")
    axes.set_title("forwarding with tiers for every user, paired runs", fontsize=10)
    axes.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
