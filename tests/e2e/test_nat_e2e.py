"""NAT and forwarding by the real helper, with a real WireGuard client, in namespaces.

The uplink must exist before the helper starts with ORBMESH_NAT_UPLINK, so
this module builds server, client and internet namespaces first and starts
the helper (and gunicorn) after; `stack` and `internet` are overridden here.
Every rule and sysctl lands in the server namespace we create; the host
namespace gets nothing.
"""
import ipaddress
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from wghelper import firewall, settings

from tests.need import need
from .internet import SERVER_UPLINK_ADDR, Internet
from .netns import unique_ifname, veth
from .stack import CLIENT_ADDR, SERVER_ADDR, VENV_BIN, Stack, wait_for
from .wgclient import WgClient

pytestmark = pytest.mark.e2e

TABLE = "orbmesh"


@pytest.fixture(autouse=True)
def _nat_tools():
    need("nft")
    need("sysctl")


@pytest.fixture
def uplinked(netns):
    """server, client and internet namespaces, the uplink veth included."""
    server, client = netns("srv"), netns("cli")
    veth(server, SERVER_ADDR + "/24", client, CLIENT_ADDR + "/24")
    net = Internet(netns, server)
    # A known starting value, so "restored" means something.
    server.run("sysctl", "-w", "net/ipv4/conf/%s/forwarding=0" % net.uplink)
    try:
        yield server, client, net
    finally:
        net.close()


@pytest.fixture
def internet(uplinked):
    return uplinked[2]


@pytest.fixture
def stack(uplinked, tmp_path, stack_env, stack_workers):
    """The usual stack, NAT on the uplink unless stack_env sets ORBMESH_NAT_UPLINK."""
    server, client, net = uplinked
    s = Stack(server, client, tmp_path, workers=stack_workers)
    s.env["ORBMESH_NAT_UPLINK"] = net.uplink
    s.env.update(stack_env)
    with s.running():
        yield s


def nat_on(stack, internet):
    stack.env["ORBMESH_NAT_UPLINK"] = internet.uplink


def forwarding(ns, ifname, family="ipv4"):
    out = ns.run("sysctl", "-n", "net/%s/conf/%s/forwarding" % (family, ifname), check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def listed_table(stack):
    out = stack.server.run("nft", "list", "table", "inet", TABLE, check=False)
    return out.stdout if out.returncode == 0 else None


def expected_table(stack, internet):
    """The table for the stack's settings and the IPv6 pool its helper uses (by default the one it made)."""
    cfg = settings.load(dict(stack.env, ORBMESH_NAT_UPLINK=internet.uplink, ORBMESH_NAT_TABLE=TABLE,
                             ORBMESH_POOL6=str(stack.pool6() or "off")))
    return firewall.render(cfg, (), firewall.connected(stack.server.run("ip", "-o", "address", "show").stdout))


def connect_client(stack, device):
    client = WgClient(stack.client, unique_ifname("omc"))
    status, body = stack.connect("nat-user", device, client.public_key)
    assert status == 200, body
    client.configure(server_public_key=body["serverPublicKey"], endpoint=body["serverEndpoint"],
                     address_cidr=body["ip"], allowed_ips=["0.0.0.0/0"], mtu=body["mtu"],
                     keepalive=body["keepalive"])
    assert body["serverEndpoint"] == "%s:51820" % SERVER_ADDR
    return client, body


def whoami_is_uplink(stack, internet, what):
    return wait_for(lambda: internet.whoami_from(stack.client, timeout=3) == SERVER_UPLINK_ADDR,
                    timeout=40, interval=0.3, what=what)


def new_session(stack, client, body):
    """Drop the client's WireGuard session so its next packet handshakes.

    After a server restart a client only notices its stale session after
    about 15 s of unanswered data (test_stack_e2e covers that recovery);
    here only NAT matters, so each restart does not cost those seconds.  It
    waits for the app to put the peer back first, or the handshake is lost.
    """
    wait_for(lambda: client.public_key in stack.wg_peers(), timeout=30, what="peer back on the server")
    key = body["serverPublicKey"]
    client.ns.run("wg", "set", client.ifname, "peer", key, "remove")
    client.ns.run("wg", "set", client.ifname, "peer", key, "endpoint", body["serverEndpoint"],
                  "allowed-ips", "0.0.0.0/0", "persistent-keepalive", str(body["keepalive"]))


def restart_helper(stack, kill=False):
    if kill:  # a crash: no cleanup at all
        stack.helper_proc.send_signal(signal.SIGKILL)
        stack.helper_proc.wait(timeout=10)
        stack.helper_proc = None
        Path(stack.env["ORBMESH_HELPER_SOCKET"]).unlink()  # so start_helper waits for the new one
    else:
        stack.stop_helper()
    stack.start_helper()


@pytest.mark.parametrize("stack_env", [{"ORBMESH_NAT_UPLINK": ""}])
def test_masquerade_restarts_and_down(stack, internet):
    uplink = internet.uplink
    # NAT off: the tunnel works, the internet does not, the uplink's forwarding is untouched.  The
    # isolation table is there all the same: the node forwards IPv6 (the stack switches it on).
    client, body = connect_client(stack, "natdev1")
    try:
        assert client.ping(body["gateway"], count=3, timeout=3), "no tunnel"
        assert internet.whoami_from(stack.client, timeout=3) is None
        table = listed_table(stack)
        assert table is not None and "masquerade" not in table and "jump from_clients" in table, table
        assert forwarding(stack.server, uplink) == "0"
        ip_forward = stack.server.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip()

        # The helper NATs: the internet sees the server's uplink address.  The
        # interface is adopted as it is: the client's session goes on.
        nat_on(stack, internet)
        restart_helper(stack)
        whoami_is_uplink(stack, internet, "whoami through NAT")
        assert listed_table(stack) == expected_table(stack, internet)
        assert forwarding(stack.server, uplink) == forwarding(stack.server, stack.interface) == "1"
        # Per interface only: the global switch is not touched (and not needed).
        assert stack.server.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == ip_forward
        log = stack.helper_log.read_text()
        assert "nat: table inet orbmesh applied" in log and "forwarding = 1 (was 0)" in log

        # Clients are not reachable from the internet (forwarding is on, the
        # drop in the forward chain is what stops this).
        client_ip = body["ip"].split("/")[0]
        internet.ns.run("ip", "route", "add", "10.8.0.0/16", "via", SERVER_UPLINK_ADDR)
        probe = internet.ns.run("ping", "-n", "-c", "2", "-W", "1", client_ip, check=False)
        assert probe.returncode != 0, "a tunnel client answered from the internet"

        # Restarts, clean three times and once a crash, each leaving the table
        # in place: always exactly one copy, and the whoami keeps working on the same session.
        handshake = client.ns.run("wg", "show", client.ifname, "latest-handshakes").stdout
        for kill in (False, False, False, True):
            restart_helper(stack, kill=kill)
            whoami_is_uplink(stack, internet, "whoami after %s" % ("a crash" if kill else "a restart"))
            table = listed_table(stack)
            assert table == expected_table(stack, internet)
            assert table.count("masquerade") == 2  # the pool and the unique-local pool6 (NAT66), once each
            assert stack.server.run("nft", "list", "tables").stdout.split().count(TABLE) == 1
        assert client.ns.run("wg", "show", client.ifname, "latest-handshakes").stdout == handshake

        # A stop leaves NAT and forwarding to the interface's clients ...
        stack.stop_app()
        stack.stop_helper()
        assert listed_table(stack) == expected_table(stack, internet)
        assert forwarding(stack.server, uplink) == "1"
        whoami_is_uplink(stack, internet, "whoami with the helper stopped")
        # ... and `orbmesh-wghelper down` removes them: table gone, forwarding back
        # to the value found before the first NAT start (the state file kept it).
        stack.down()
        assert listed_table(stack) is None
        assert forwarding(stack.server, uplink) == "0"
        assert not (Path(stack.env["ORBMESH_HELPER_STATE_DIR"]) / firewall.STATE_FILE).exists()
        assert stack.server.run("ip", "link", "show", "dev", stack.interface, check=False).returncode != 0
        assert internet.whoami_from(stack.client, timeout=3) is None
    finally:
        client.close()


@pytest.mark.parametrize("stack_env", [{"ORBMESH_POOL6": "fd00:8::/64"}])
def test_recreated_interface_forwards_again_and_pool6_rules(stack, internet):
    assert listed_table(stack) == expected_table(stack, internet)
    assert "ip6 saddr fd00:8::/64 masquerade" in listed_table(stack)
    assert forwarding(stack.server, stack.interface, "ipv6") == "1"
    # IPv6 forwarding on the uplink is left alone (see firewall.forwarding_keys).
    assert forwarding(stack.server, internet.uplink, "ipv6") == forwarding(stack.server, "default", "ipv6")
    client, body = connect_client(stack, "natdev2")
    try:
        whoami_is_uplink(stack, internet, "whoami through NAT")
        # The interface vanishes; the watcher re-creates it (a new link starts
        # with forwarding off) and the hook switches forwarding on again.
        stack.server.run("ip", "link", "del", "dev", stack.interface)
        wait_for(lambda: forwarding(stack.server, stack.interface) == "1", timeout=30,
                 what="forwarding on the re-created interface")
        new_session(stack, client, body)
        whoami_is_uplink(stack, internet, "whoami after the interface was re-created")
    finally:
        client.close()


def test_missing_uplink_fails_closed(uplinked, tmp_path):
    server, client, _ = uplinked
    s = Stack(server, client, tmp_path)
    s.env["ORBMESH_NAT_UPLINK"] = "omnosuchlink0"
    with open(s.helper_log, "ab") as log:
        proc = s.server.popen([str(VENV_BIN / "orbmesh-wghelper")], env=s.env,
                              stdout=log, stderr=subprocess.STDOUT)
    assert proc.wait(timeout=60) == 1
    log = s.helper_log.read_text()
    assert "cannot run" in log and "omnosuchlink0" in log
    # Applied before the interface, and kept: a failed start never takes the filter away.
    cfg = settings.load(dict(s.env, ORBMESH_POOL6=str(s.pool6() or "off")))
    assert listed_table(s) == firewall.render(cfg, (), firewall.connected(server.run("ip", "-o", "address",
                                                                                      "show").stdout))
    assert "net/ipv4/conf/%s/forwarding = 1" % s.interface in log  # switched on before the failure ...
    assert forwarding(server, s.interface) == "0"                   # ... and back off
    assert not os.path.exists(s.env["ORBMESH_HELPER_SOCKET"])
    # The interface stays, like any the helper leaves (no forwarding, its filter); `down` removes it, then
    # the table.
    assert server.run("ip", "link", "show", "dev", s.interface, check=False).returncode == 0
    s.down()
    assert server.run("ip", "link", "show", "dev", s.interface, check=False).returncode != 0
    assert listed_table(s) is None
