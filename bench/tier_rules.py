#!/usr/bin/env python3
"""What the tier rules cost a packet, alone: UDP floods through a router namespace, pinned to one CPU.

bench/tier_forwarding.py measures issue 25's target through WireGuard,
where wireguard-go's own work and the machine's noise hide most of what
nftables adds.  Here nothing but the kernel forwards: client -> router ->
server over veths, iperf3 UDP at full speed with its sender and the
forwarding on CPU 1, so the rate falls with every nanosecond a rule adds
per packet.  The router holds, in turn:

- none: no table;
- sets: the layout before (one set of addresses per tier and a rule per
  tier and family in each hooked chain; a packet of the last tier walks
  them all);
- map: the helper's own limits part (wghelper/limits.py, rendered by it):
  the plan from one map into the packet's mark, then the tier's meter;
- dispatch: the same without the meters (what the lookups alone cost);
- quotas: map, and every address with a quota too (the quota looked up
  after the meter, as a node that sells plans with both would have).

10,000 tiered addresses over five plans; the client's own address is in
the sixth tier (100 Gbit/s, last in order, never over its rate), so every
packet pays the whole lookup and a meter update but is never dropped.
The modes take turns going first; medians of the runs.
"""
import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.e2e.netns import stop_process, veth  # noqa: E402
from wghelper import limits  # noqa: E402

NAME = "tier_rules"
PLANS = (10, 20, 50, 100, 1000)
OWN = 100_000
CLIENT, ROUTER_IN = "10.8.200.2", "10.8.200.1"
ROUTER_OUT, SERVER = "198.51.100.1", "198.51.100.2"
MODES = ("none", "sets", "map", "dispatch", "quotas")


def tiers(count):
    """{address: rate}: `count` pool addresses over PLANS, IPv6 ones beside them, and the client in OWN."""
    pool = ipaddress.ip_network("10.8.0.0/16")
    got = {}
    for i in range(count):
        got[str(pool[i + 10])] = PLANS[i % len(PLANS)]
        got["fd00:8::%x" % (i + 10)] = PLANS[i % len(PLANS)]
    got[CLIENT] = OWN
    return got


def sets_table(tiered, ifname):
    """The layout before: per tier and family a set, and per tier and family a rule in each hooked chain."""
    rates = sorted(set(tiered.values()))
    lines = ["table inet orbmesh {"]
    for rate in rates:
        for f in (4, 6):
            members = [a for a, r in tiered.items() if r == rate and (":" in a) == (f == 6)]
            lines.append("set tier_%d_%d { type ipv%d_addr; %s}" % (
                rate, f, f, "elements = { %s } " % ", ".join(members) if members else ""))
            for d in ("up", "down"):
                lines.append("set rate_%d_%s%d { type ipv%d_addr; size 65535; flags dynamic,timeout; timeout 1m; }"
                             % (rate, d, f, f))
    for name, hook, match, key, d in limits.HOOKS:
        lines.append("chain limits_%s { type filter hook %s priority filter; policy accept;" % (name, hook))
        for rate in rates:
            for f, ip in ((4, "ip"), (6, "ip6")):
                lines.append('%s "%s" %s %s @tier_%d_%d update @rate_%d_%s%d { %s %s limit rate over %d '
                             'bytes/second burst %d bytes } drop' % (match, ifname, ip, key, rate, f, rate, d, f, ip,
                                                                     key, rate * 125000, limits.burst(rate)))
        lines.append("}")
    return "\n".join(lines + ["}"]) + "\n"


def map_table(tiered, ifname, quotas=False):
    """The helper's limits part as wghelper/limits.py renders it (with a quota for every address)."""
    named = {a: "q%024x" % i for i, a in enumerate(tiered)} if quotas else {}
    v = limits.View(tiered, {n: (10 ** 12, 0) for n in named.values()}, named)
    return "table inet orbmesh {\n%s}\n" % "\n".join(limits.objects(v) + limits.chains(v, ifname))


def dispatch_table(tiered, ifname):
    """map_table with each tier's chain only putting the mark back: the lookups without the meters."""
    return re.sub(r"\t\tupdate @\S+ \{[^}]*\} drop\n", "", map_table(tiered, ifname))


def flood(client, seconds, reverse):
    """Mbit/s the server (or, reversed, the client) received of a full-speed UDP flood sent from CPU 1."""
    argv = ["taskset", "-c", "1", "iperf3", "-c", SERVER, "-u", "-b", "0", "-l", "1200", "-t", str(seconds), "-J"]
    out = json.loads(client.run(*argv + (["-R"] if reverse else []), timeout=seconds + 60).stdout)
    total = out["end"]["sum"]
    return total["bits_per_second"] / 1e6 * (1 - total.get("lost_percent", 0) / 100)


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--addresses", type=int, default=None, help="tiered addresses (each with an IPv6 one)")
    p.add_argument("--seconds", type=int, default=None, help="seconds per flood")
    args = p.parse_args(argv)
    count = args.addresses or (50 if args.smoke else 10000)
    seconds = args.seconds or (1 if args.smoke else 5)
    runs = args.runs or (1 if args.smoke else 6)
    tiered = tiers(count)
    result = {"benchmark": NAME, "smoke": args.smoke, "addresses": count, "seconds": seconds, "runs": runs,
              "modes": {m: {"up": [], "down": []} for m in MODES}}
    with common.Lab() as lab:
        client, router, server = lab.netns("trc"), lab.netns("trr"), lab.netns("trs")
        _, router_in = veth(client, CLIENT + "/24", router, ROUTER_IN + "/24")
        veth(router, ROUTER_OUT + "/24", server, SERVER + "/24")
        client.run("ip", "route", "add", "default", "via", ROUTER_IN)
        server.run("ip", "route", "add", "10.8.200.0/24", "via", ROUTER_OUT)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        iperf = server.popen(["taskset", "-c", "0", "iperf3", "-s", "-B", SERVER],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.on_exit(stop_process, iperf)
        time.sleep(0.5)
        tables = {"none": None, "sets": sets_table(tiered, router_in), "map": map_table(tiered, router_in),
                  "dispatch": dispatch_table(tiered, router_in), "quotas": map_table(tiered, router_in, quotas=True)}
        for run in range(runs):
            for mode in (MODES if run % 2 == 0 else MODES[::-1]):
                router.run("nft", "flush", "ruleset")
                if tables[mode]:
                    router.run("nft", "-f", "-", input=tables[mode], timeout=120)
                for way, reverse in (("up", False), ("down", True)):
                    result["modes"][mode][way].append(round(flood(client, seconds, reverse), 1))
                print("run %d %s: %s up, %s down Mbit/s" % (run, mode, result["modes"][mode]["up"][-1],
                                                           result["modes"][mode]["down"][-1]), file=sys.stderr)
    rows = []
    for mode in MODES:
        for way in ("up", "down"):
            got = result["modes"][mode][way]
            paired = [common.ratio(x, n, 3) for x, n in zip(got, result["modes"]["none"][way])]
            result["modes"][mode]["median_" + way] = common.median(got)
            result["modes"][mode]["paired_" + way] = paired
            rows.append([mode, way, common.median(got), common.median(paired), " ".join("%.2f" % r for r in paired)])
    text = ("UDP forwarding through a router at %d tiered addresses (+ IPv6), one CPU, %d runs of %d s\n\n"
            % (count, runs, seconds)
            + common.table(["rules", "way", "Mbit/s (median)", "median ratio to none", "paired ratios"], rows))
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def draw(figure, result):
    axes = figure.subplots(1, 1)
    for i, way in enumerate(("up", "down")):
        values = [result["modes"][m]["median_" + way] for m in MODES]
        axes.bar([x + 0.4 * i for x in range(len(MODES))], values, width=0.4, label=way)
    axes.set_xticks([x + 0.2 for x in range(len(MODES))], MODES)
    axes.set_ylabel("UDP Mbit/s forwarded on one CPU (median)")
    axes.set_title("Tier rules alone: %d tiered addresses" % result["addresses"])
    axes.legend()


if __name__ == "__main__":
    sys.exit(main())
