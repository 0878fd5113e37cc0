"""README command one, run as written (inside a namespace), and its printed curl lines."""
import ipaddress
import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

from wghelper.settings import ULA

from .netns import unique_ifname

ROOT = Path(__file__).parents[2]


def _lines(stream, out):
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def test_run_local_prints_working_token_and_curl(netns, tmp_path):
    ns = netns("local")
    interface = unique_ifname("oml")
    env = dict(os.environ, ORBMESH_RUN_DIR=str(tmp_path / "run"), ORBMESH_INTERFACE=interface)
    proc = ns.popen([str(ROOT / "scripts" / "run-local")], env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    output = []
    try:
        while not output or "Stop: Ctrl-C" not in output[-1]:
            line = lines.get(timeout=180)
            assert line is not None, "run-local exited early:\n" + "".join(output)
            output.append(line)
        text = "".join(output)
        connect = next(line for line in output if line.startswith("curl -s -X POST"))
        status = next(line for line in output if line.startswith("curl -s http") and "/wireguard/status" in line)

        reply = json.loads(ns.run("bash", "-c", connect).stdout)
        assert reply["success"] is True and reply["ip"] == "10.8.0.2/32", reply
        assert reply["publicKey"] in ns.run("wg", "show", interface, "peers").stdout
        live = json.loads(ns.run("bash", "-c", status).stdout)
        assert live == {"success": True, "publicKey": reply["serverPublicKey"], "peerCount": 1,
                        "gateway6": reply["gateway6"]}
        # Dual stack locally too: the interface holds the unique-local gateway, the client its /128.
        pool6 = ipaddress.ip_network((tmp_path / "run" / "helper" / "pool6").read_text().strip())
        assert reply["ip6"] == "%s/128" % (pool6.network_address + 2) and pool6.subnet_of(ULA)
        assert "inet6 %s/64" % reply["gateway6"] in ns.run("ip", "-6", "address", "show", "dev", interface).stdout
        assert "%s/32 %s" % (reply["ip"].split("/")[0], reply["ip6"]) in ns.run("wg", "show", interface,
                                                                                 "allowed-ips").stdout
        # No NAT uplink: no table, and forwarding as it was.
        assert ns.run("nft", "list", "tables", check=False).stdout.strip() == ""
        assert ns.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "0"
        assert "JWT_SECRET" not in text and "Traceback" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert ns.run("ip", "link", "show", interface, check=False).returncode != 0, "interface left behind"
    assert ns.pids() == [], "processes left running"
