"""The continuity lab: three WireGuard clients ping the gateway 20 times a
second while our own processes restart, crash or lose the interface.

    client ns                                           server ns
      omcu: UDP -------------------------------------->  WireGuard :51820 (the helper's, wireguard-go)
      omcw: UDP -> orbmesh-relay --transport ws   ---->  gunicorn /wireguard/ws     -> 127.0.0.1:51820
      omch: UDP -> orbmesh-relay --transport http ---->  gunicorn /wireguard/tunnel -> 127.0.0.1:51820
                                                         NAT out of an uplink into an "internet" ns

Each client pings through its own interface (ping -I), so one event is
measured on all three transports at once.  One gunicorn worker: the HTTP
tunnel's sessions live in one process (README, "Tunnel transports").  Used
by tests/e2e/test_continuity_e2e.py (liveness bounds) and
bench/continuity.py (the figures).
"""
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from app.api.auth import mint_device_token
from wghelper import firewall, settings

from .conftest import wireguard_go_in
from .internet import Internet
from .netns import children, stop_process, unique_ifname, veth
from .stack import API_PORT, CLIENT_ADDR, SERVER_ADDR, VENV_BIN, Stack, wait_for
from .wgclient import WgClient

GATEWAY = "10.8.0.1"
TRANSPORTS = ("udp", "ws", "http")
RELAY_PORTS = {"ws": 41001, "http": 41002}
PING_INTERVAL = 0.05
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")
# A session older than this is renewed before an event that must keep it:
# WireGuard's initiator rekeys after 120 s, which would look like a new handshake.
FRESH_SESSION = 45.0


class Pinger:
    """`ping -D` from one client interface; keeps the receive time of every reply."""

    def __init__(self, ns, ifname):
        argv = ["stdbuf", "-oL", "ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1", "-I", ifname, GATEWAY]
        self.proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.replies = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            match = _REPLY.match(line)
            if match:
                self.replies.append(float(match.group(1)))

    def flowing_since(self, when, seconds=1.0):
        """Replies have arrived for `seconds` after `when`."""
        return sum(1 for t in self.replies[-100:] if t > when) >= seconds / PING_INTERVAL * 0.8

    def longest_gap(self, start, end):
        """Longest time between two replies from `start` to `end` (both edges count as replies)."""
        times = [start] + [t for t in self.replies if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def stop(self):
        stop_process(self.proc)


class Lab:
    def __init__(self, netns, tmp_path, env=None):
        self.server, self.client = netns("csrv"), netns("ccli")
        veth(self.server, SERVER_ADDR + "/24", self.client, CLIENT_ADDR + "/24")
        # The uplink exists before the helper starts: it is ORBMESH_NAT_UPLINK.
        self.internet = Internet(netns, self.server)
        self.stack = Stack(self.server, self.client, tmp_path, workers=1)
        self.stack.env.update({"ORBMESH_NAT_UPLINK": self.internet.uplink, "ORBMESH_LOG_LEVEL": "WARNING",
                               # Endpoints are recorded at every reconcile: keep them fresh.
                               "ORBMESH_RECONCILE_INTERVAL": "2"})
        self.stack.env.update(env or {})
        self.clients, self.relays, self.pingers, self.bodies = {}, {}, {}, {}

    # --- bring-up and teardown ------------------------------------------------

    def start(self):
        self.stack.start_helper()
        self.stack.start_app()
        for metric, transport in enumerate(TRANSPORTS):
            self._connect(transport, metric)
        for transport in TRANSPORTS:
            wait_for(lambda: self.pingers[transport].flowing_since(time.time() - 1), timeout=60,
                     what="pings over %s" % transport)
        return self

    def _connect(self, transport, metric):
        client = WgClient(self.client, unique_ifname("omc" + transport[0]))
        self.clients[transport] = client
        device = "continuity-" + transport
        status, body = self.stack.connect("continuity", device, client.public_key)
        assert status == 200, body
        self.bodies[transport] = body
        endpoint = "%s:51820" % SERVER_ADDR
        if transport in RELAY_PORTS:
            endpoint = "127.0.0.1:%d" % RELAY_PORTS[transport]
            token = mint_device_token(self.stack.config, "continuity", device, ttl=6 * 3600)
            argv = [str(VENV_BIN / "orbmesh-relay"), "--transport", transport, "--url",
                    "http://%s:%d" % (SERVER_ADDR, API_PORT), "--listen", endpoint]
            log = open(self.stack.tmp / ("relay-%s.log" % transport), "ab")
            self.relays[transport] = self.client.popen(argv, env=dict(os.environ, ORBMESH_RELAY_TOKEN=token),
                                                       stdout=log, stderr=subprocess.STDOUT)
            log.close()
        # The three interfaces share the gateway's route; each ping picks its own with -I.
        client.configure(server_public_key=body["serverPublicKey"], endpoint=endpoint, address_cidr=body["ip"],
                         allowed_ips=[GATEWAY + "/32"], mtu=body["mtu"], keepalive=body["keepalive"], metric=metric)
        self.pingers[transport] = Pinger(self.client, client.ifname)

    def close(self):
        for pinger in self.pingers.values():
            pinger.stop()
        for client in self.clients.values():
            client.close()
        for proc in self.relays.values():
            stop_process(proc)
        self.stack.close()
        self.internet.close()

    # --- what a client sees -------------------------------------------------------

    def handshakes(self):
        """{transport: the client's latest handshake with the server (unix time)}."""
        found = {}
        for transport, client in self.clients.items():
            out = self.client.run("wg", "show", client.ifname, "latest-handshakes").stdout.split()
            found[transport] = int(out[1]) if len(out) == 2 else 0
        return found

    def fresh_sessions(self):
        """Renew any session that could rekey during the next event: the client starts a new one."""
        for transport, stamp in self.handshakes().items():
            if time.time() - stamp > FRESH_SESSION:
                client, body = self.clients[transport], self.bodies[transport]
                endpoint = self.client.run("wg", "show", client.ifname, "endpoints").stdout.split()[1]
                self.client.run("wg", "set", client.ifname, "peer", body["serverPublicKey"], "remove")
                self.client.run("wg", "set", client.ifname, "peer", body["serverPublicKey"], "endpoint", endpoint,
                                "allowed-ips", GATEWAY + "/32", "persistent-keepalive", str(body["keepalive"]))
        wait_for(lambda: all(time.time() - t < FRESH_SESSION for t in self.handshakes().values()), timeout=30,
                 what="fresh sessions")
        wait_for(lambda: all(p.flowing_since(time.time() - 1) for p in self.pingers.values()), timeout=30,
                 what="pings on fresh sessions")

    def measure(self, event, timeout=60):
        """Run `event` (a function of the lab); returns {transport: {"gap_s", "same_handshake"}}."""
        self.fresh_sessions()
        before = self.handshakes()
        start = time.time()
        event(self)
        done = time.time()
        for transport, pinger in self.pingers.items():
            wait_for(lambda: pinger.flowing_since(done), timeout=timeout, what="pings over %s after the event"
                     % transport)
        end = time.time()
        after = self.handshakes()
        return {t: {"gap_s": round(self.pingers[t].longest_gap(start, end), 3), "same_handshake": before[t] == after[t]}
                for t in TRANSPORTS}

    # --- what the server holds ----------------------------------------------------

    def consistent(self):
        """Database and interface agree; the NAT table is exactly the one rendered (each rule once) and
        forwarding is on.  Returns a list of what is wrong (empty: all agree)."""
        wrong = []
        if self.stack.db_peers() != self.stack.wg_peers():
            wrong.append("database %s != interface %s" % (self.stack.db_peers(), self.stack.wg_peers()))
        s = settings.load(dict(self.stack.env, ORBMESH_NAT_UPLINK=self.internet.uplink,
                               ORBMESH_POOL6=str(self.stack.pool6() or "off")))
        table = self.server.run("nft", "list", "table", "inet", s.nat_table, check=False).stdout
        if table != firewall.render(s, (), firewall.connected(self.server.run("ip", "-o", "address", "show").stdout)):
            wrong.append("nft table:\n%s" % table)
        tables = self.server.run("nft", "list", "tables").stdout.split().count(s.nat_table)
        if tables != 1:
            wrong.append("%d tables named %s" % (tables, s.nat_table))
        for key in firewall.forwarding_keys(s):
            value = self.server.run("sysctl", "-n", key).stdout.strip()
            if value != "1":
                wrong.append("%s = %s" % (key, value))
        return wrong

    def last_endpoints(self):
        """{public key: the endpoint the database keeps for it}."""
        db = sqlite3.connect(self.stack.env["ORBMESH_DB_PATH"])
        try:
            return dict(db.execute("SELECT public_key, last_endpoint FROM peers").fetchall())
        finally:
            db.close()

    def live_endpoints(self):
        out = self.server.run("wg", "show", self.stack.interface, "endpoints").stdout
        return dict(line.split("\t") for line in out.splitlines() if "\t" in line)

    def wireguard_go(self):
        """Pid of the server interface's wireguard-go daemon."""
        for pid in wireguard_go_in({self.server.inode}):
            if Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")[1:2] == [self.stack.interface.encode()]:
                return pid
        return None


# --- the events of the table ----------------------------------------------------

def app_restart(lab):
    lab.stack.stop_app()
    lab.stack.start_app()


def app_reload(lab):
    """gunicorn's graceful reload: new workers first, the old ones finish within the graceful timeout."""
    old = set(children(lab.stack.app_proc.pid))
    lab.stack.app_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not old & set(children(lab.stack.app_proc.pid)) and children(lab.stack.app_proc.pid),
             timeout=30, what="old workers gone after HUP")


def helper_restart(lab):
    lab.stack.stop_helper()
    lab.stack.start_helper()


def helper_kill(lab):
    lab.stack.helper_proc.send_signal(signal.SIGKILL)
    lab.stack.helper_proc.wait(timeout=10)
    lab.stack.helper_proc = None
    Path(lab.stack.env["ORBMESH_HELPER_SOCKET"]).unlink()  # so start_helper waits for the new one
    lab.stack.start_helper()


def both_restart(lab):
    """As `systemctl restart orbmesh-wghelper orbmesh-api@PORT` does it: the app stops first, the helper
    starts first, and the app's start does not wait for the helper to answer (Type=simple)."""
    lab.stack.stop_app()
    lab.stack.stop_helper()
    failed = []

    def start_helper():
        try:
            lab.stack.start_helper()
        except BaseException as exc:  # raised below, in the caller's thread
            failed.append(exc)

    helper = threading.Thread(target=start_helper)
    helper.start()
    lab.stack.start_app()
    helper.join()
    if failed:
        raise failed[0]


def wireguard_go_killed(lab):
    """The interface is really lost: its wireguard-go dies (the helper re-creates both)."""
    pid = lab.wireguard_go()
    assert pid, "no wireguard-go for %s" % lab.stack.interface
    os.kill(pid, signal.SIGKILL)


EVENTS = [
    ("app restart (SIGTERM, start)", app_restart),
    ("gunicorn graceful reload (HUP)", app_reload),
    ("helper restart (SIGTERM, start)", helper_restart),
    ("helper kill -9, then start", helper_kill),
    ("app and helper restarted together", both_restart),
    ("wireguard-go killed (interface lost)", wireguard_go_killed),
]

