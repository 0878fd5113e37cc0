#!/usr/bin/env python3
"""Data plane: TCP throughput (iperf3) and ping RTT through WireGuard, per transport.

One real WireGuard client (wireguard-go) in the client namespace, one
server (the stack's interface) in the server namespace; iperf3 runs from
the client's tunnel address to the gateway 10.8.0.1.  Only the client's
peer endpoint changes between paths:

- udp: straight to the server's WireGuard port (the ceiling on this path);
- ws: our relay (`orbmesh-wg relay --transport ws`) to /wireguard/ws;
- http: our relay (`--transport http`) to /wireguard/tunnel;
- websocat: the outside reference, `websocat -b` at both ends (UDP to
  WebSocket in the client namespace, WebSocket to UDP in the server one).

Paths are measured round-robin, run after run, so each sees the same noise;
every figure is a median of runs and a ratio to plain UDP from the same run.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.e2e.netns import stop_process, unique_ifname  # noqa: E402
from tests.e2e.stack import API_PORT, SERVER_ADDR, VENV_BIN, wait_for  # noqa: E402
from tests.e2e.wgclient import WgClient  # noqa: E402

NAME = "data_plane"
PATHS = ("udp", "ws", "http", "websocat")
RELAY_PORT = 41000
WEBSOCAT_PORT = 9001
RTT = re.compile(r"time=([\d.]+) ms")


class Paths:
    """Starts the relay processes of one path and points the client's peer at them."""

    def __init__(self, stack, client, server_key, token):
        self.stack, self.client, self.server_key, self.token = stack, client, server_key, token
        self.procs = []

    def use(self, path):
        self.close()
        if path == "udp":
            endpoint = "%s:51820" % SERVER_ADDR
        elif path in ("ws", "http"):
            argv = [str(VENV_BIN / "orbmesh-wg"), "relay", "--transport", path,
                    "--url", "http://%s:%d" % (SERVER_ADDR, API_PORT), "--listen", "127.0.0.1:%d" % RELAY_PORT]
            env = dict(os.environ, ORBMESH_RELAY_TOKEN=self.token)
            self.procs.append(self.stack.client.popen(argv, env=env, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL))
            endpoint = "127.0.0.1:%d" % RELAY_PORT
        else:
            websocat = str(VENV_BIN / "websocat")
            self.procs.append(self.stack.server.popen(
                [websocat, "-b", "ws-l:%s:%d" % (SERVER_ADDR, WEBSOCAT_PORT), "udp:127.0.0.1:51820"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.3)
            self.procs.append(self.stack.client.popen(
                [websocat, "-b", "udp-l:127.0.0.1:%d" % RELAY_PORT,
                 "ws://%s:%d/" % (SERVER_ADDR, WEBSOCAT_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoint = "127.0.0.1:%d" % RELAY_PORT
        self.stack.client.run("wg", "set", self.client.ifname, "peer", self.server_key, "endpoint", endpoint)
        wait_for(lambda: self.client.ping(common.GATEWAY, count=1, timeout=1), timeout=60,
                 what="ping over %s" % path)

    def close(self):
        for proc in self.procs:
            stop_process(proc)
        self.procs = []


def iperf(stack, seconds):
    """Bits per second received by the server, client to server."""
    out = stack.client.run("iperf3", "-c", common.GATEWAY, "-p", "5201", "-t", str(seconds), "-J",
                           timeout=seconds + 60).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def ping_rtts(stack, count):
    out = stack.client.run("ping", "-n", "-c", str(count), "-i", "0.02", "-W", "2", common.GATEWAY,
                           check=False, timeout=count + 30).stdout
    return [float(x) for x in RTT.findall(out)]


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=None, help="iperf3 seconds per run")
    p.add_argument("--pings", type=int, default=None, help="pings per run")
    args = p.parse_args(argv)
    smoke = args.smoke
    seconds = args.seconds or (1 if smoke else 5)
    pings = args.pings or (5 if smoke else 100)
    runs = args.runs or (1 if smoke else 3)

    samples = {path: {"mbps": [], "rtt_ms": [], "ratio": [], "added_rtt_ms": []} for path in PATHS}
    with common.Lab() as lab:
        # One worker: the HTTP tunnel's sessions live in one process (README, Tunnel transports).
        stack = lab.stack(workers=1, env={"ORBMESH_LOG_LEVEL": "WARNING"})
        with stack.running():
            client = WgClient(stack.client, unique_ifname("omd"))
            lab.on_exit(client.close)
            status, body = stack.connect("bench-dp", "dp", client.public_key)
            assert status == 200, body
            token = stack.token("bench-dp", "dp")
            client.configure(server_public_key=body["serverPublicKey"], endpoint="%s:51820" % SERVER_ADDR,
                             address_cidr=body["ip"], allowed_ips=[common.GATEWAY + "/32"], mtu=body["mtu"],
                             keepalive=body["keepalive"])
            server = stack.server.popen(["iperf3", "-s", "-B", common.GATEWAY, "-p", "5201"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lab.on_exit(stop_process, server)
            paths = Paths(stack, client, body["serverPublicKey"], token)
            lab.on_exit(paths.close)
            for run in range(runs):
                this_run = {}
                for path in PATHS:
                    paths.use(path)
                    mbps = iperf(stack, seconds) / 1e6
                    rtts = ping_rtts(stack, pings)
                    rtt = common.median(rtts)
                    this_run[path] = (mbps, round(rtt, 3) if rtt is not None else None)
                    samples[path]["mbps"].append(round(mbps, 1))
                    samples[path]["rtt_ms"].append(this_run[path][1])
                    print("run %d %s: %.0f Mbit/s, median RTT %s ms" % (run, path, mbps, this_run[path][1]),
                          file=sys.stderr)
                paths.close()
                udp_mbps, udp_rtt = this_run["udp"]
                for path in PATHS:
                    mbps, rtt = this_run[path]
                    samples[path]["ratio"].append(common.ratio(mbps, udp_mbps))
                    samples[path]["added_rtt_ms"].append(
                        round(rtt - udp_rtt, 3) if rtt is not None and udp_rtt is not None else None)
    result = {"benchmark": NAME, "smoke": smoke, "iperf_seconds": seconds, "pings": pings, "runs": runs,
              "paths": {path: dict(s, median_mbps=common.median(s["mbps"]),
                                   median_rtt_ms=round3(common.median(s["rtt_ms"])),
                                   median_ratio=common.median(s["ratio"]),
                                   median_added_rtt_ms=round3(common.median(s["added_rtt_ms"])))
                        for path, s in samples.items()}}
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    return 0


def round3(value):
    return None if value is None else round(value, 3)


def render(result, smoke):
    labels = {"udp": "plain UDP", "ws": "ours: WebSocket + relay", "http": "ours: HTTP + relay",
              "websocat": "websocat -b at both ends"}
    rows = [[labels[path], s["median_mbps"], s["median_ratio"], s["median_rtt_ms"], s["median_added_rtt_ms"]]
            for path, s in result["paths"].items()]
    text = ("Data plane: iperf3 TCP %d s client->server and %d pings per run, median of %d runs\n\n" % (
        result["iperf_seconds"], result["pings"], result["runs"])
        + common.table(["path", "Mbit/s", "ratio to UDP", "median RTT ms", "added RTT ms"], rows))
    if not smoke:
        ws, http, ref = (result["paths"][k] for k in ("ws", "http", "websocat"))
        checks = [("WS >= 0.5 of UDP", ws["median_ratio"] >= 0.5, ws["median_ratio"]),
                  ("WS >= websocat", ws["median_mbps"] >= ref["median_mbps"],
                   "%s vs %s Mbit/s" % (ws["median_mbps"], ref["median_mbps"])),
                  ("WS added median RTT < 1 ms", ws["median_added_rtt_ms"] < 1, ws["median_added_rtt_ms"]),
                  ("HTTP >= 0.25 of UDP", http["median_ratio"] >= 0.25, http["median_ratio"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
