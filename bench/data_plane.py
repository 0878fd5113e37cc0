#!/usr/bin/env python3
"""Data plane: TCP throughput (iperf3), ping RTT and server CPU through WireGuard, per transport.

One real WireGuard client (wireguard-go) in the client namespace, one
server (the stack's interface) in the server namespace; iperf3 runs from
the client's tunnel address to the gateway 10.8.0.1.  Only the client's
peer endpoint changes between paths:

- udp: straight to the server's WireGuard port (the ceiling on this path);
- ws: our relay (`orbmesh-wg relay --transport ws`, batching subprotocol) to /wireguard/ws;
- http: our relay (`--transport http`) to /wireguard/tunnel;
- websocat_client: `websocat -b` as the client against our /wireguard/ws
  (the seed's example: one datagram per message);
- websocat: the outside reference, `websocat -b` at both ends (UDP to
  WebSocket in the client namespace, WebSocket to UDP in the server one).

Paths are measured round-robin, run after run, so each sees the same noise;
every figure is a median of runs and a ratio to plain UDP from the same run.
Server CPU per relayed GB: CPU seconds of the gunicorn worker (from /proc)
during the iperf3 run, divided by the TCP payload carried; the same for the
client side (our relay or websocat in the client namespace).

Then eight tunnels at once: eight more client namespaces, each with its
own WireGuard client and iperf3 stream, all through one gunicorn instance
(two gevent workers) over WebSocket with our relay, against the same eight
clients on plain UDP, interleaved run by run.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.e2e.netns import children, stop_process, unique_ifname, veth  # noqa: E402
from tests.e2e.stack import API_PORT, SERVER_ADDR, VENV_BIN, wait_for  # noqa: E402
from tests.e2e.wgclient import WgClient  # noqa: E402

NAME = "data_plane"
PATHS = ("udp", "ws", "http", "websocat_client", "websocat")
SERVER_PATHS = ("ws", "http", "websocat_client")  # through our server: CPU per GB is measured
LABELS = {"udp": "plain UDP", "ws": "ours: WebSocket + relay", "http": "ours: HTTP + relay",
          "websocat_client": "websocat -b client, our server", "websocat": "websocat -b at both ends"}
RELAY_PORT = 41000
WEBSOCAT_PORT = 9001
IPERF_PORT = 5201
RTT = re.compile(r"time=([\d.]+) ms")


class Tunnel:
    """One WireGuard client in `ns` and the relay processes of its current path."""

    def __init__(self, stack, ns, client, server_key, token):
        self.stack, self.ns, self.client, self.server_key, self.token = stack, ns, client, server_key, token
        self.procs = []

    def use(self, path):
        self.close()
        url = "http://%s:%d" % (SERVER_ADDR, API_PORT)
        websocat = str(VENV_BIN / "websocat")
        endpoint = "127.0.0.1:%d" % RELAY_PORT
        if path == "udp":
            endpoint = "%s:51820" % SERVER_ADDR
        elif path in ("ws", "http"):
            argv = [str(VENV_BIN / "orbmesh-wg"), "relay", "--transport", path, "--url", url,
                    "--listen", endpoint, "--status-interval", "0"]
            env = dict(os.environ, ORBMESH_RELAY_TOKEN=self.token)
            self.procs.append(self.ns.popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        elif path == "websocat_client":
            # -H takes several values, so it goes after the two addresses (the token is a
            # benchmark's short-lived one; real clients keep it out of argv).
            self.procs.append(self.ns.popen(
                [websocat, "-b", "udp-l:%s" % endpoint, "ws://%s:%d/wireguard/ws" % (SERVER_ADDR, API_PORT),
                 "-H", "Authorization: Bearer " + self.token],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            self.procs.append(self.stack.server.popen(
                [websocat, "-b", "ws-l:%s:%d" % (SERVER_ADDR, WEBSOCAT_PORT), "udp:127.0.0.1:51820"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.3)
            self.procs.append(self.ns.popen(
                [websocat, "-b", "udp-l:%s" % endpoint, "ws://%s:%d/" % (SERVER_ADDR, WEBSOCAT_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.ns.run("wg", "set", self.client.ifname, "peer", self.server_key, "endpoint", endpoint)
        wait_for(lambda: self.client.ping(common.GATEWAY, count=1, timeout=1), timeout=60,
                 what="ping over %s" % path)

    def relay_cpu(self):
        """CPU seconds of the client-side relay processes of the current path."""
        return sum(common.cpu_seconds(proc.pid, children=False) for proc in self.procs if proc.poll() is None)

    def close(self):
        for proc in self.procs:
            stop_process(proc)
        self.procs = []


def connect_client(lab, stack, ns, device):
    client = WgClient(ns, unique_ifname("omd"))
    lab.on_exit(client.close)
    status, body = stack.connect("bench-dp", device, client.public_key)
    assert status == 200, body
    client.configure(server_public_key=body["serverPublicKey"], endpoint="%s:51820" % SERVER_ADDR,
                     address_cidr=body["ip"], allowed_ips=[common.GATEWAY + "/32"], mtu=body["mtu"],
                     keepalive=body["keepalive"])
    tunnel = Tunnel(stack, ns, client, body["serverPublicKey"], stack.token("bench-dp", device))
    lab.on_exit(tunnel.close)
    return tunnel


def iperf(ns, seconds, port=IPERF_PORT):
    """(bits per second received by the server, bytes received), client to server."""
    out = ns.run("iperf3", "-c", common.GATEWAY, "-p", str(port), "-t", str(seconds), "-J",
                 timeout=seconds + 60).stdout
    end = json.loads(out)["end"]["sum_received"]
    return end["bits_per_second"], end["bytes"]


def ping_rtts(ns, count):
    out = ns.run("ping", "-n", "-c", str(count), "-i", "0.02", "-W", "2", common.GATEWAY,
                 check=False, timeout=count + 30).stdout
    return [float(x) for x in RTT.findall(out)]


def workers_cpu(stack):
    return sum(common.cpu_seconds(pid, children=False) for pid in children(stack.app_proc.pid))


def iperf_servers(lab, stack, ports):
    for port in ports:
        proc = stack.server.popen(["iperf3", "-s", "-B", common.GATEWAY, "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.on_exit(stop_process, proc)


def single_tunnel(lab, stack, runs, seconds, pings):
    tunnel = connect_client(lab, stack, stack.client, "dp")
    iperf_servers(lab, stack, [IPERF_PORT])
    samples = {path: {"mbps": [], "rtt_ms": [], "ratio": [], "added_rtt_ms": [], "cpu_s_per_gb": [],
                      "relay_cpu_s_per_gb": []} for path in PATHS}
    for run in range(runs):
        this_run = {}
        for path in PATHS:
            tunnel.use(path)
            cpu_before, relay_before = workers_cpu(stack), tunnel.relay_cpu()
            bps, nbytes = iperf(stack.client, seconds)
            cpu, relay_cpu = workers_cpu(stack) - cpu_before, tunnel.relay_cpu() - relay_before
            rtt = common.median(ping_rtts(stack.client, pings))
            this_run[path] = (bps / 1e6, round(rtt, 3) if rtt is not None else None)
            s = samples[path]
            s["mbps"].append(round(bps / 1e6, 1))
            s["rtt_ms"].append(this_run[path][1])
            if path in SERVER_PATHS:
                s["cpu_s_per_gb"].append(round(cpu / (nbytes / 1e9), 2))
                s["relay_cpu_s_per_gb"].append(round(relay_cpu / (nbytes / 1e9), 2))
            print("run %d %s: %.0f Mbit/s, median RTT %s ms, worker CPU %.2f s" % (
                run, path, bps / 1e6, this_run[path][1], cpu), file=sys.stderr)
        tunnel.close()
        udp_mbps, udp_rtt = this_run["udp"]
        for path in PATHS:
            mbps, rtt = this_run[path]
            samples[path]["ratio"].append(common.ratio(mbps, udp_mbps))
            samples[path]["added_rtt_ms"].append(
                round(rtt - udp_rtt, 3) if rtt is not None and udp_rtt is not None else None)
    return {path: dict(s, median_mbps=common.median(s["mbps"]), median_rtt_ms=round3(common.median(s["rtt_ms"])),
                       median_ratio=common.median(s["ratio"]),
                       median_added_rtt_ms=round3(common.median(s["added_rtt_ms"])),
                       median_cpu_s_per_gb=common.median(s["cpu_s_per_gb"]),
                       median_relay_cpu_s_per_gb=common.median(s["relay_cpu_s_per_gb"]))
            for path, s in samples.items()}


def many_tunnels(lab, stack, count, runs, seconds):
    """`count` client namespaces at once: aggregate Mbit/s over plain UDP and over WebSocket + relay."""
    tunnels = []
    for i in range(count):
        ns = lab.netns("bmc%d" % i)
        # Each its own /30 from TEST-NET-2 to the server namespace, and a route to the API address.
        veth(stack.server, "198.51.100.%d/30" % (4 * i + 1), ns, "198.51.100.%d/30" % (4 * i + 2))
        ns.run("ip", "route", "add", SERVER_ADDR + "/32", "via", "198.51.100.%d" % (4 * i + 1))
        tunnels.append(connect_client(lab, stack, ns, "dp-many-%d" % i))
    ports = [IPERF_PORT + 10 + i for i in range(count)]
    iperf_servers(lab, stack, ports)
    samples = {"udp": [], "ws": [], "ratio": []}
    for run in range(runs):
        this_run = {}
        for path in ("udp", "ws"):
            for tunnel in tunnels:
                tunnel.use(path)
            results = [None] * count

            def one(i):
                results[i] = iperf(tunnels[i].ns, seconds, ports[i])[0]

            threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            this_run[path] = sum(results) / 1e6
            samples[path].append(round(this_run[path], 1))
            print("run %d, %d tunnels over %s: %.0f Mbit/s in all" % (run, count, path, this_run[path]),
                  file=sys.stderr)
        for tunnel in tunnels:
            tunnel.close()
        samples["ratio"].append(common.ratio(this_run["ws"], this_run["udp"]))
    return dict(samples, tunnels=count, median_udp_mbps=common.median(samples["udp"]),
                median_ws_mbps=common.median(samples["ws"]), median_ratio=common.median(samples["ratio"]))


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=None, help="iperf3 seconds per run")
    p.add_argument("--pings", type=int, default=None, help="pings per run")
    p.add_argument("--tunnels", type=int, default=None, help="concurrent tunnels in the many-tunnels part")
    args = p.parse_args(argv)
    smoke = args.smoke
    seconds = args.seconds or (1 if smoke else 5)
    pings = args.pings or (5 if smoke else 100)
    runs = args.runs or (1 if smoke else 3)
    count = args.tunnels or (2 if smoke else 8)

    result = {"benchmark": NAME, "smoke": smoke, "iperf_seconds": seconds, "pings": pings, "runs": runs}
    with common.Lab() as lab:
        # One worker: the HTTP tunnel's sessions live in one process (README, Tunnel transports).
        # The iperf3 servers listen on the node's gateway, which tenant isolation closes to clients but
        # for the ports opened here (docs/security.md, Tenant isolation).
        ports = [IPERF_PORT] + [IPERF_PORT + 10 + i for i in range(count)]
        stack = lab.stack(workers=1, env={"ORBMESH_LOG_LEVEL": "WARNING",
                                          "ORBMESH_CLIENT_NODE_PORTS": ",".join(map(str, ports))})
        with stack.running():
            result["paths"] = single_tunnel(lab, stack, runs, seconds, pings)
            # WebSocket sessions need no affinity: the instance gets both cores.
            stack.workers = 2
            stack.stop_app()
            stack.start_app()
            result["many"] = many_tunnels(lab, stack, count, runs, seconds)
    text = render(result, smoke)
    common.write_result(args.out, NAME, result, text)
    common.chart(args.out, NAME, lambda figure: draw(figure, result))
    return 0


def round3(value):
    return None if value is None else round(value, 3)


def draw(figure, result):
    paths = result["paths"]
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.4]})
    names = list(paths)
    values = [paths[p]["median_mbps"] or 0 for p in names]
    colors = {"udp": "#888", "ws": "#2a7", "http": "#2a7", "websocat_client": "#48c", "websocat": "#48c"}
    bars = left.barh([LABELS[p] for p in names], values, color=[colors[p] for p in names])
    left.axvline(paths["udp"]["median_mbps"] or 0, color="#c33", linestyle="--", label="plain UDP ceiling")
    for bar, name in zip(bars, names):
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  " %.0f (%.2fx)" % (paths[name]["median_mbps"] or 0, paths[name]["median_ratio"] or 0),
                  va="center", fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("Mbit/s, iperf3 TCP through WireGuard (median of %d)" % result["runs"])
    left.set_title("One tunnel", fontsize=10)
    left.legend(loc="lower right", fontsize=8)
    many = result["many"]
    right.bar(["plain UDP", "WebSocket\n+ relay"], [many["median_udp_mbps"] or 0, many["median_ws_mbps"] or 0],
              color=["#888", "#2a7"])
    right.set_ylabel("Mbit/s, all tunnels together")
    right.set_title("%d tunnels at once: %.2fx" % (many["tunnels"], many["median_ratio"] or 0), fontsize=10)


def render(result, smoke):
    rows = [[LABELS[path], s["median_mbps"], s["median_ratio"], s["median_rtt_ms"], s["median_added_rtt_ms"],
             s["median_cpu_s_per_gb"], s["median_relay_cpu_s_per_gb"]] for path, s in result["paths"].items()]
    many = result["many"]
    text = ("Data plane: iperf3 TCP %d s client->server and %d pings per run, median of %d runs\n\n" % (
        result["iperf_seconds"], result["pings"], result["runs"])
        + common.table(["path", "Mbit/s", "ratio to UDP", "median RTT ms", "added RTT ms",
                        "worker CPU s/GB", "client CPU s/GB"], rows)
        + "\n\n%d tunnels at once (one gunicorn instance, 2 workers): plain UDP %s Mbit/s, WebSocket + relay "
          "%s Mbit/s, ratio %s (runs %s)" % (many["tunnels"], many["median_udp_mbps"], many["median_ws_mbps"],
                                             many["median_ratio"], many["ratio"]))
    if not smoke:
        paths = result["paths"]
        ws, http, client = paths["ws"], paths["http"], paths["websocat_client"]
        checks = [("WS >= 0.6 of UDP", ws["median_ratio"] >= 0.6, ws["median_ratio"]),
                  ("WS >= 1.3x websocat as the client", ws["median_mbps"] >= 1.3 * client["median_mbps"],
                   "%s vs %s Mbit/s" % (ws["median_mbps"], client["median_mbps"])),
                  ("HTTP >= 0.5 of UDP", http["median_ratio"] >= 0.5, http["median_ratio"]),
                  ("%d tunnels >= 0.6 of %d UDP clients" % (many["tunnels"], many["tunnels"]),
                   (many["median_ratio"] or 0) >= 0.6, many["median_ratio"])]
        result["targets"] = [{"target": n, "met": ok, "value": v} for n, ok, v in checks]
        text += "\n\nTargets:\n" + common.targets_text(checks)
    return text


if __name__ == "__main__":
    sys.exit(main())
