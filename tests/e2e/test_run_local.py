"""README command one, run as written (inside a namespace), and its printed curl and dig lines.

The namespace has an uplink into a simulated internet whose DNS server
(answering that uplink only) knows example.com; run-local's Unbound is told
to forward there, so the printed lookup resolves a name only the internet has.
"""
import ipaddress
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.need import missing
from wghelper.settings import ULA

from .internet import INTERNET_ADDR, SERVER_UPLINK_ADDR, DnsServer, Internet
from .netns import unique_ifname
from .stack import wait_for

ROOT = Path(__file__).parents[2]
NOBODY = 65534


def _lines(stream, out):
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def uids(pid):
    """(real, effective) uid of a process."""
    line = next(l for l in open("/proc/%d/status" % pid) if l.startswith("Uid:"))
    return tuple(int(u) for u in line.split()[1:3])


def test_run_local_prints_working_token_curl_and_lookup(netns, tmp_path):
    """... and runs the app unprivileged, as nobody, like production (the virtualenv's python was once a link
    into root's home, which nobody cannot run, and the app fell back to root)."""
    readable = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "test",
                               "-r", str(ROOT / "app" / "__init__.py")])
    if readable.returncode != 0:
        missing("user nobody cannot read the checkout %s, so run-local rightly runs the app as root" % ROOT)
    ns = netns("local")
    # IPv6 forwarding on, as docs/operations.md has the operator set it, so the client gets IPv6 (the
    # helper's ipv6 mode "forward"; without it, "local": no ip6, tests/e2e/test_ipv6_mode_e2e.py).
    ns.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=1")
    switches = ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding")
    before = [ns.run("sysctl", "-n", key).stdout.strip() for key in switches]
    interface = unique_ifname("oml")
    internet = Internet(netns, ns)
    dns = DnsServer(internet.ns, INTERNET_ADDR, {"example.com": "198.51.100.80"}, [SERVER_UPLINK_ADDR], tmp_path)
    wait_for(dns.ready, what="the internet's DNS server")
    # Not under pytest's tmp_path (0700): nobody must reach the run directory.
    run_dir = Path(tempfile.mkdtemp(prefix="omlocal-"))
    os.chmod(run_dir, 0o755)
    env = dict(os.environ, ORBMESH_RUN_DIR=str(run_dir / "run"), ORBMESH_INTERFACE=interface,
               ORBMESH_DNS_UPSTREAM=INTERNET_ADDR, ORBMESH_DNS_DNSSEC="off")
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
        pool6 = ipaddress.ip_network((run_dir / "run" / "helper" / "pool6").read_text().strip())
        assert reply["ip6"] == "%s/128" % (pool6.network_address + 2) and pool6.subnet_of(ULA)
        assert "inet6 %s/64" % reply["gateway6"] in ns.run("ip", "-6", "address", "show", "dev", interface).stdout
        assert "%s/32 %s" % (reply["ip"].split("/")[0], reply["ip6"]) in ns.run("wg", "show", interface,
                                                                                 "allowed-ips").stdout
        # No NAT uplink: forwarding as it was, the interface's too (a new link's default).  This host
        # forwards IPv6 (switched on above), so tunnel clients could reach its networks: the helper's
        # isolation table is there, and it touches nothing but the tunnel's own traffic (each hooked
        # rule names the interface) and masquerades nothing.
        assert ns.run("nft", "list", "tables", check=False).stdout.split() == ["table", "inet", "orbmesh"]
        table = ns.run("nft", "list", "table", "inet", "orbmesh").stdout
        hooked = [line.strip() for chain in ("input", "forward") for line in
                  table.split("chain %s {" % chain)[1].split("}")[0].splitlines()[2:] if line.strip()]
        assert hooked and all(('"%s"' % interface) in rule for rule in hooked), hooked
        assert "masquerade" not in table
        assert [ns.run("sysctl", "-n", key).stdout.strip() for key in switches] == before
        assert ns.run("sysctl", "-n", "net/ipv4/conf/%s/forwarding" % interface).stdout == ns.run(
            "sysctl", "-n", "net.ipv4.conf.default.forwarding").stdout
        # The resolver answers on both gateways, named in that order.
        assert reply["dns"] == ["10.8.0.1", reply["gateway6"], "1.1.1.1"]
        lookup = next(line for line in output if line.startswith("dig "))
        assert ns.run("bash", "-c", lookup).stdout.strip() == "198.51.100.80"
        assert dns.askers("example.com") == [SERVER_UPLINK_ADDR]  # asked by run-local's Unbound, once
        assert "JWT_SECRET" not in text and "Traceback" not in text
        assert "app as nobody" in text, text
        gunicorn = [pid for pid in ns.pids() if b"gunicorn" in open("/proc/%d/cmdline" % pid, "rb").read()]
        workers = [pid for pid in gunicorn if int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
                   in gunicorn]
        assert workers and all(uids(pid) == (NOBODY, NOBODY) for pid in workers), [uids(p) for p in gunicorn]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        dns.close()
        internet.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert ns.run("ip", "link", "show", interface, check=False).returncode != 0, "interface left behind"
    assert ns.pids() == [], "processes left running"
