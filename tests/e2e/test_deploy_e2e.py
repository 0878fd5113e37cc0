"""The deployment end to end: nginx (TLS, deploy/nginx/orbmesh.conf) in front of two single-worker
gunicorn instances (deploy/gunicorn.conf.py) and the helper with NAT, all in test namespaces.

Every request goes through nginx on https://192.0.2.1:8443 and is verified
against the test's own CA.
"""
import json
import os
import pwd
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from .deploy_stack import API_PORTS, HELPER_UNIT, HTTPS_PORT, ORBNET_ADDR, VENV_BIN, DeployStack, sandbox
from .internet import SERVER_UPLINK_ADDR
from .netns import unique_ifname
from .stack import CLIENT_ADDR, SERVER_ADDR, wait_for
from tests.app.api.test_auth_attacks import BEARER_SPELLINGS, PADDED_SPELLINGS
from tests.need import need

from .wgclient import WgClient, keypair
from .wsclient import RawWebSocket

pytestmark = pytest.mark.e2e
GATEWAY = "10.8.0.1"


@pytest.fixture
def deploy(netns, tmp_path):
    for tool in ("nginx", "setpriv", "unshare", "nft", "unbound", "dig"):
        need(tool)
    stack = DeployStack(netns, tmp_path)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


class Relay:
    """`orbmesh-wg relay` in the client namespace, to nginx over verified TLS."""

    def __init__(self, stack, transport, token, port):
        argv = [str(VENV_BIN / "orbmesh-wg"), "relay", "--transport", transport,
                "--url", "https://%s:%d" % (SERVER_ADDR, HTTPS_PORT), "--ca-file", str(stack.ca),
                "--listen", "127.0.0.1:%d" % port, "--status-interval", "5"]
        env = dict(os.environ, ORBMESH_RELAY_TOKEN=token)
        self.proc = stack.client.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log = []
        threading.Thread(target=lambda: self.log.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def bring_up(stack, device, endpoint=None, keepalive=None):
    """Connect through nginx and configure a WireGuard client from the answer alone."""
    client = WgClient(stack.client, unique_ifname("omd"))
    try:
        status, body = stack.connect("deploy-user", device, client.public_key)
        assert status == 200, body
        assert body["serverEndpoint"] == "%s:51820" % SERVER_ADDR
        client.configure(server_public_key=body["serverPublicKey"], endpoint=endpoint or body["serverEndpoint"],
                         address_cidr=body["ip"], allowed_ips=body["allowedIPs"], mtu=body["mtu"],
                         keepalive=body["keepalive"] if keepalive is None else keepalive)
    except BaseException:
        client.close()
        raise
    return client, body


def ping_gateway(client, what):
    assert wait_for(lambda: client.ping(GATEWAY, count=1, timeout=2), timeout=45, what=what)


def internet_sees(stack, expected, what):
    """The whoami server, through the tunnel, sees `expected` (retried while the tunnel settles)."""
    wait_for(lambda: stack.internet.whoami_from(stack.client, timeout=3) == expected, timeout=45, what=what)


def test_the_helpers_sandbox_writes_net_conf_and_no_other_kernel_tunable(netns):
    """kernel.modprobe (absent from kernels without modules) and kernel.core_pattern name programs the kernel runs
    as full root: a taken-over helper must not set them.  Each probe writes back the value it read."""
    for tool in ("setpriv", "unshare", "sysctl"):
        need(tool)
    ns = netns("sandbox")

    def write(key):
        value = ns.run("sysctl", "-n", key).stdout.rstrip("\n")
        return ns.run(*sandbox(HELPER_UNIT), "sysctl", "-w", "%s=%s" % (key, value), check=False)

    refused = [key for key in ("kernel.modprobe", "kernel.core_pattern", "net.ipv4.ip_forward")
               if os.path.exists("/proc/sys/" + key.replace(".", "/"))]
    assert "kernel.core_pattern" in refused
    for key in refused:
        assert write(key).returncode != 0, key
    # Control: what the helper does write, per-interface forwarding, goes through the same sandbox.
    for key in ("net.ipv4.conf.lo.forwarding", "net.ipv6.conf.lo.forwarding"):
        done = write(key)
        assert done.returncode == 0, (key, done.stderr)


def test_connect_through_nginx_then_nat_to_the_internet(deploy):
    status, _, raw = deploy.https("GET", "/health", headers={"X-API-Key": deploy.api_key})
    assert status == 200 and json.loads(raw)["status"] == "healthy"
    assert json.loads(raw)["resolver"]["ok"] is True  # orbmesh-unbound.service, as its unit runs it
    client, body = bring_up(deploy, "direct")
    try:
        assert "0.0.0.0/0" in body["allowedIPs"] and body["dns"] == [GATEWAY, body["gateway6"], "1.1.1.1"]
        ping_gateway(client, "ping over UDP after a connect through nginx")
        # The resolver, as the unit's user with port 53 as its one capability, answers through the tunnel.
        status = dict(line.split(":\t", 1) for line in
                      Path("/proc/%d/status" % deploy.resolver_proc.pid).read_text().splitlines() if ":\t" in line)
        assert status["Name"] == "unbound" and int(status["Uid"].split()[0]) == pwd.getpwnam("unbound").pw_uid
        assert int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE
        assert "status: NOERROR" in deploy.dig(deploy.client, GATEWAY, "localhost")
        internet_sees(deploy, SERVER_UPLINK_ADDR, "the internet to see the server's uplink address (NAT)")
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_tunnel_transports_through_nginx(deploy, transport):
    device = "relay-" + transport
    port = 41000 if transport == "ws" else 41001
    client, body = bring_up(deploy, device, endpoint="127.0.0.1:%d" % port)
    relay = Relay(deploy, transport, deploy.token("deploy-user", device), port)
    try:
        ping_gateway(client, "ping over %s through nginx" % transport)
        if transport == "http":
            # Every request of the device reached one instance: its sessions live in one process.
            logs = [(deploy.tmp / ("app-%d.log" % p)).read_text(errors="replace") for p in API_PORTS]
            holders = [p for p, text in zip(API_PORTS, logs)
                       if any("tunnel http session start" in line and "device=%s" % device in line
                              for line in text.splitlines())]
            assert len(holders) == 1, holders
        internet_sees(deploy, SERVER_UPLINK_ADDR, "NAT through the %s transport" % transport)
    finally:
        relay.stop()
        client.close()
    assert not any("certificate verify failed" in line for line in relay.log), relay.log[-5:]


INTERNAL = [("GET", "/wireguard/status", None), ("POST", "/wireguard/add-peer", {}),
            ("POST", "/wireguard/remove-peer", {"userId": "nobody"}), ("GET", "/metrics", None),
            ("GET", "/wireguard/%73tatus", None), ("GET", "//wireguard/status", None)]


def test_internal_endpoints_only_from_allowed_addresses(deploy):
    key = {"X-API-Key": deploy.api_key, "Content-Type": "application/json"}
    for method, path, body in INTERNAL:
        data = None if body is None else json.dumps(body).encode()
        status, headers, raw = deploy.https(method, path, body=data, headers=key, source=CLIENT_ADDR)
        assert status == 403, (path, status, raw)
        assert json.loads(raw)["error"]["code"] == "FORBIDDEN", raw
    # The public endpoints stay public from the same address.
    status, _, _ = deploy.https("GET", "/health", source=CLIENT_ADDR)
    assert status == 200
    status, _, raw = deploy.https("GET", "/openapi.json", source=CLIENT_ADDR)
    assert status == 200

    # OrbNET's address (on the allow list) and loopback on the server get through ...
    for where in ({"source": ORBNET_ADDR}, {"ns": deploy.server, "host": "127.0.0.1"}):
        status, _, raw = deploy.https("GET", "/wireguard/status", headers=key, **where)
        assert status == 200, (where, raw)
        assert json.loads(raw)["peerCount"] == 0
        status, _, raw = deploy.https("GET", "/metrics", headers=key, **where)
        assert status == 200, (where, raw)
        # ... and the app still wants the API key.
        status, _, raw = deploy.https("GET", "/wireguard/status", **where)
        assert status == 401, (where, raw)

    # The app logs the client's address from nginx's X-Real-IP; the client cannot set it.
    status, _, _ = deploy.https("GET", "/health", source=CLIENT_ADDR,
                                headers={"X-Real-IP": "198.51.100.66", "X-Forwarded-For": "198.51.100.66",
                                         "X-Request-ID": "deploy-e2e-real-ip"})
    assert status == 200
    entries = [json.loads(line) for line in deploy.app_log_text().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e.get("request_id") == "deploy-e2e-real-ip" and "client" in e]
    assert mine and all(e["client"] == CLIENT_ADDR for e in mine), mine

    # nginx's body limit for the JSON API (64 KiB), in the app's envelope.
    big = json.dumps({"publicKey": "x" * (70 * 1024)}).encode()
    status, _, raw = deploy.https("POST", "/wireguard/connect", body=big,
                                  headers={"Authorization": "Bearer " + deploy.token("u", "d"),
                                           "Content-Type": "application/json"})
    assert status == 413 and json.loads(raw)["error"]["code"] == "PAYLOAD_TOO_LARGE"


def answering_instance(deploy, authorization, expect=200):
    """The port of the gunicorn instance nginx sent a disconnect to (found by its request id in that log)."""
    request_id = uuid.uuid4().hex
    status, _, raw = deploy.https("POST", "/wireguard/disconnect",
                                  headers={"Authorization": authorization, "X-Request-ID": request_id})
    assert status == expect, (authorization[:12], raw)  # the app accepted (or refused) this spelling
    ports = [p for p in API_PORTS if request_id in (deploy.tmp / ("app-%d.log" % p)).read_text(errors="replace")]
    assert len(ports) == 1, ports
    return ports[0]


def test_every_spelling_of_a_token_lands_on_one_instance(deploy):
    """nginx hashes on the token alone: "bEaReR    T" meets the same instance (limits, sessions) as "Bearer T".

    "T=" too, which the app refuses (401): PyJWT would verify it as T, so it must not be a way to another
    instance either.
    """
    seen = {}
    for n in range(32):
        token = deploy.token("spelling-user", "device%02d" % n)
        instances = {answering_instance(deploy, spelling.format(token)) for spelling in BEARER_SPELLINGS}
        instances |= {answering_instance(deploy, spelling.format(token), expect=401)
                      for spelling in PADDED_SPELLINGS}
        assert len(instances) == 1, "token %d spread over %s" % (n, instances)
        seen.setdefault(instances.pop(), n)
        if len(seen) == len(API_PORTS) and n >= 3:
            break
    # Control: different tokens do reach different instances, so the check above could fail.
    assert sorted(seen) == sorted(API_PORTS), seen


def test_idle_websocket_outlives_nginx_default_timeout(deploy):
    """No datagrams for 70 s: the app's pings (every 20 s) keep it open past nginx's usual 60 s."""
    token = deploy.token("deploy-user", "idle-ws")
    ws = RawWebSocket(deploy.tls_socket(), "%s:%d" % (SERVER_ADDR, HTTPS_PORT),
                      headers=[("Authorization", "Bearer " + token)])
    try:
        end = time.monotonic() + 70
        while time.monotonic() < end:
            assert ws.pump(timeout=1.0), "the WebSocket closed after idling (code %s)" % ws.closed_with
        assert ws.closed_with is None
        assert ws.pings >= 3, ws.pings  # the server kept talking the whole time
        # Still a working session: a datagram the server drops (not WireGuard) does not close it.
        ws.send_bytes(b"\x09" * 40)
        assert ws.pump(timeout=2.0)
    finally:
        ws.close()


def test_restart_everything_brings_peers_and_nat_back(deploy):
    client, body = bring_up(deploy, "restart")
    others = [deploy.connect("deploy-user", "other%d" % i, keypair()[1]) for i in range(3)]
    assert all(status == 200 for status, _ in others)
    try:
        expected = deploy.db_peers()
        assert len(expected) == 4 and deploy.wg_peers() == expected
        ping_gateway(client, "ping before the restarts")
        assert len(deploy.masquerade_rules()) == 2, deploy.nft_ruleset()  # the pool, and NAT66 of the ULA pool6

        for restart in ("helper", "helper", "everything"):
            if restart == "everything":
                deploy.stop_nginx()
                deploy.stop_app()
            deploy.stop_helper()
            deploy.start_helper()
            if restart == "everything":
                deploy.start_app()
                deploy.start_nginx()
            wait_for(lambda: deploy.wg_peers() == expected, timeout=30, what="peers back after %s restart" % restart)
            ping_gateway(client, "ping after %s restart" % restart)
            assert len(deploy.masquerade_rules()) == 2, deploy.nft_ruleset()
            internet_sees(deploy, SERVER_UPLINK_ADDR, "NAT after %s restart" % restart)
            status, _, _ = deploy.https("GET", "/health")
            assert status == 200
        assert "table inet orbmesh" in deploy.nft_ruleset()
        # Stopping orbmesh.target: everything stops, then orbmesh-down.service runs `down`.
        deploy.stop_nginx()
        deploy.stop_app()
        deploy.stop_helper()
        assert "table inet orbmesh" in deploy.nft_ruleset()  # a stop alone leaves it all up
        key = "net/ipv4/conf/%s/forwarding" % deploy.internet.uplink
        state = Path(deploy.env["ORBMESH_HELPER_STATE_DIR"]) / "nat-state.json"
        before = json.loads(state.read_text())["sysctl"][key]
        assert deploy.server.run("sysctl", "-n", key).stdout.strip() == "1"
        deploy.down()
        assert "table inet orbmesh" not in deploy.nft_ruleset()
        assert deploy.server.run("ip", "link", "show", "dev", deploy.interface, check=False).returncode != 0
        assert deploy.server.run("sysctl", "-n", key).stdout.strip() == before and not state.exists()
    finally:
        client.close()
