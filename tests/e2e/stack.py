"""The whole service in a "server" namespace, driven from a "client" namespace.

The helper and gunicorn (gevent workers) run inside the server namespace
with their socket, database and keys under the test's tmp_path; the
client namespace reaches the API over a veth pair (192.0.2.0/24).  The DNS
resolver (Unbound) is off unless a test turns ORBMESH_DNS_RESOLVER on and
calls start_resolver(), as run-local starts it.
"""
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from app.api.auth import mint_device_token

from .netns import children, unique_ifname

VENV_BIN = Path(sys.executable).parent
SERVER_ADDR = "192.0.2.1"
CLIENT_ADDR = "192.0.2.2"
API_PORT = 8080
GATEWAY = "10.8.0.1"  # of ORBMESH_POOL below


def wait_for(predicate, timeout=30.0, interval=0.1, what="condition"):
    """Poll until predicate() is truthy; liveness only, never a performance check."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(interval)


class Stack:
    def __init__(self, server_ns, client_ns, tmp_path, workers=2, server_addr=SERVER_ADDR):
        self.server = server_ns
        self.addr = server_addr
        self.client = client_ns
        self.tmp = Path(tmp_path)
        self.workers = workers
        self.interface = unique_ifname("oms")
        self.secret = secrets.token_urlsafe(48)
        self.api_key = secrets.token_urlsafe(24)
        self.access_log = self.tmp / "access.log"
        self.helper_log = self.tmp / "helper.log"
        self.app_log = self.tmp / "app.log"
        self.helper_proc = None
        self.app_proc = None
        self.extra_binds = []
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "ORBMESH_INTERFACE": self.interface,
            "ORBMESH_POOL": "10.8.0.0/16",
            "ORBMESH_LISTEN_PORT": "51820",
            "ORBMESH_PUBLIC_HOST": server_addr,
            "ORBMESH_DB_PATH": str(self.tmp / "orbmesh.db"),
            "ORBMESH_HELPER_SOCKET": str(self.tmp / "wghelper.sock"),
            "ORBMESH_HELPER_STATE_DIR": str(self.tmp / "helper-state"),
            "ORBMESH_HELPER_ALLOWED_UIDS": "0",
            "ORBMESH_JWT_SECRET": self.secret,
            "ORBMESH_API_KEYS": self.api_key,
            "ORBMESH_RECONCILE_CHECK_INTERVAL": "0.5",
            "ORBMESH_HELPER_WATCH_INTERVAL": "0.5",
            "ORBMESH_DNS_RESOLVER": "off",
        }
        self.resolver_proc = None
        self.resolver_log = self.tmp / "unbound.log"
        # net.ipv6.conf.all.forwarding in the server namespace, written before each helper start (the
        # helper reads it then: wghelper/ipv6.py).  On, as docs/operations.md has the operator set it, so
        # clients get IPv6 (ipv6 mode "forward"); False: mode "local"; None: left as the namespace has it.
        self.ipv6_forwarding = True
        self.config = {"JWT_ALGORITHM": "HS256", "JWT_SECRET": self.secret, "JWT_ISSUER": "orbnet",
                       "JWT_AUDIENCE": ""}

    # processes

    def set_ipv6_forwarding(self):
        if self.ipv6_forwarding is not None:
            self.server.run("sysctl", "-w", "net.ipv6.conf.all.forwarding=%d" % bool(self.ipv6_forwarding))

    def ipv6_forwarded(self):
        """Whether the server namespace forwards IPv6 now (as the helper saw it at start, unless changed since)."""
        return self.server.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"

    def start_helper(self):
        self.set_ipv6_forwarding()
        log = open(self.helper_log, "ab")
        self.helper_proc = self.server.popen([str(VENV_BIN / "orbmesh-wghelper")], env=self.env,
                                             stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self._helper_ready(), what="helper socket")

    def _helper_ready(self):
        if self.helper_proc.poll() is not None:
            raise AssertionError("helper exited:\n" + self.helper_log.read_text()[-3000:])
        return Path(self.env["ORBMESH_HELPER_SOCKET"]).is_socket()

    def stop_helper(self):
        self._stop(self.helper_proc)
        self.helper_proc = None

    def down(self):
        """`orbmesh-wghelper down` with the stack's settings (the helper stopped first)."""
        done = self.server.run(str(VENV_BIN / "orbmesh-wghelper"), "down", env=self.env, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_app(self):
        log = open(self.app_log, "ab")
        argv = [str(VENV_BIN / "gunicorn"), "--worker-class", "gevent", "--workers", str(self.workers),
                "--bind", "%s:%d" % (self.addr, API_PORT), "--chdir", str(Path(__file__).parents[2]),
                "--access-logfile", str(self.access_log), "--access-logformat", '%(p)s "%(r)s" %(s)s',
                "--graceful-timeout", "5", "--no-control-socket", "--limit-request-line", "8190",
                "app:create_app()"]
        for bind in self.extra_binds:  # say, the server's IPv6 address too
            argv[-1:-1] = ["--bind", bind]
        self.app_proc = self.server.popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self._answers(self.app_proc, self.app_log, "gunicorn", self.request), what="gunicorn")

    @staticmethod
    def _answers(proc, log_path, name, request):
        """Whether `request` gets /health answered; fails at once if `proc` has exited."""
        if proc.poll() is not None:
            raise AssertionError("%s exited:\n%s" % (name, log_path.read_text()[-3000:]))
        try:
            status, _, _ = request("GET", "/health", timeout=2)
        except OSError:
            return False
        return status in (200, 503)

    def stop_app(self):
        self._stop(self.app_proc)
        self.app_proc = None

    @staticmethod
    def _stop(proc, sig=signal.SIGTERM):
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def start_resolver(self, edit=None):
        """Unbound as run-local starts it: orbmesh-wg dns-config (asks the helper), then unbound, which drops to "unbound".

        edit: text -> text, applied to the rendered config (say, a lab root instead of the internet's).
        """
        conf = self.tmp / "unbound.conf"
        self.server.run(str(VENV_BIN / "orbmesh-wg"), "dns-config", "--output", str(conf), env=self.env)
        if edit is not None:
            conf.write_text(edit(conf.read_text()))
        self.resolver_proc = self._run_resolver_argv(["unbound", "-d", "-p", "-c", str(conf)])
        wait_for(self._resolver_ready, what="unbound answering on the gateway")

    def _run_resolver_argv(self, argv, env=None):
        log = open(self.resolver_log, "ab")
        proc = self.server.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return proc

    def _resolver_ready(self):
        if self.resolver_proc.poll() is not None:
            raise AssertionError("unbound exited:\n" + self.resolver_log.read_text()[-3000:])
        return "status: NOERROR" in self.dig(self.server, GATEWAY, "localhost", source=GATEWAY)

    def stop_resolver(self):
        self._stop(self.resolver_proc)
        self.resolver_proc = None

    @staticmethod
    def dig(ns, server, name, source=None, timeout=2):
        """dig's full output for `name` asked of `server` from inside `ns` (one try, no retries)."""
        argv = ["dig", "+tries=1", "+time=%d" % timeout, "@" + server, name]
        if source:
            argv[1:1] = ["-b", source]
        return ns.run(*argv, check=False, timeout=timeout + 10).stdout

    def close(self):
        self.stop_resolver()
        self.stop_app()
        self.stop_helper()

    @contextlib.contextmanager
    def running(self):
        """Helper and app up for the duration; always stopped afterwards."""
        try:
            self.start_helper()
            self.start_app()
            yield self
        finally:
            self.close()

    def app_rss(self):
        """Resident memory of gunicorn's master and workers, in bytes."""
        pids = [self.app_proc.pid] + children(self.app_proc.pid)
        total = 0
        for pid in pids:
            for line in Path("/proc/%d/status" % pid).read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    # API, called from the client namespace

    def token(self, user, device, ttl=600):
        return mint_device_token(self.config, user, device, ttl=ttl)

    def request(self, method, path, body=None, headers=None, timeout=10):
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return self._send(method, path, data, headers, timeout)

    def _send(self, method, path, data, headers, timeout):
        """(status, headers, body) of one request from the client namespace (DeployStack: via nginx)."""
        return self.client.http(method, "http://%s:%d%s" % (self.addr, API_PORT, path),
                                headers=headers, body=data, timeout=timeout)

    def call(self, method, path, body=None, token=None, api_key=None):
        headers = {}
        if token:
            headers["Authorization"] = "Bearer " + token
        if api_key:
            headers["X-API-Key"] = api_key
        status, _, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def connect(self, user, device, public_key):
        return self.call("POST", "/wireguard/connect", {"publicKey": public_key}, token=self.token(user, device))

    # the interface, as wg sees it

    def wg_peers(self):
        """{public_key: allowed_ips} on the server interface."""
        out = self.server.run("wg", "show", self.interface, "allowed-ips").stdout
        peers = {}
        for line in out.splitlines():
            key, _, ips = line.partition("\t")
            peers[key] = ips.strip()
        return peers

    def pool6(self):
        """The helper's IPv6 pool: ORBMESH_POOL6, else the unique-local /64 it made and kept (None: off)."""
        value = self.env.get("ORBMESH_POOL6", "auto") or "auto"
        if value == "auto":
            path = Path(self.env["ORBMESH_HELPER_STATE_DIR"]) / "pool6"
            value = path.read_text().strip() if path.exists() else "off"
        return None if value == "off" else ipaddress.ip_network(value)

    def db_peers(self):
        """{public_key: allowed IPs} the interface must hold for the database's rows, as `wg show` prints
        them: the /32, then the /128 at the same offset in pool6 (direct peers only, IPv6 on and forwarded:
        without forwarding clients get no IPv6, wghelper/ipv6.py)."""
        db = sqlite3.connect(self.env["ORBMESH_DB_PATH"])
        try:
            rows = db.execute("SELECT public_key, addr, mode FROM peers").fetchall()
        finally:
            db.close()
        pool = ipaddress.ip_network(self.env.get("ORBMESH_POOL", "10.8.0.0/16"))
        pool6 = self.pool6() if self.ipv6_forwarded() else None
        peers = {}
        for key, addr, mode in rows:
            peers[key] = "%s/32" % ipaddress.IPv4Address(addr)
            if pool6 is not None and mode != "bridge":
                peers[key] += " %s/128" % (pool6.network_address + (addr - int(pool.network_address)))
        return peers
