"""The production layout in test namespaces: helper, single-worker gunicorn instances, nginx with TLS.

    client ns (192.0.2.2, 192.0.2.3)  --veth--  server ns (192.0.2.1)  --uplink veth--  internet ns
                                                 nginx :8443 (TLS, deploy/nginx/orbmesh.conf)
                                                   -> gunicorn 127.0.0.1:8081, :8082 (deploy/gunicorn.conf.py)
                                                   -> orbmesh-wghelper (ORBMESH_NAT_UPLINK=uplink)
                                                 unbound on 10.8.0.1:53 (orbmesh-unbound.service)

Every process runs inside the server namespace as a child of the test and is
stopped by its pid.  The helper and gunicorn run in the sandbox their systemd
units describe, as far as a test can build one (sandbox()): the capability
bounding set (CAP_NET_ADMIN only for the helper, none for gunicorn), no new
privileges and, with ProtectKernelTunables=yes, /proc/sys and /sys read-only
but for the unit's ReadWritePaths below /proc/sys, in a mount namespace of
their own.  So a capability or a writable path the units forgot fails here.
Unbound is started the way its unit says (read from the unit file): the
config rendered by its ExecStartPre as root, then Unbound as the unit's
user with the unit's capabilities only.
"""
import datetime
import http.client
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.deploy.test_files import directives

from .netns import veth
from .stack import CLIENT_ADDR, SERVER_ADDR, Stack, wait_for

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
HTTPS_PORT = 8443
ORBNET_ADDR = "192.0.2.3"  # a second client-side address, on nginx's allow list
API_PORTS = (8081, 8082)
HELPER_UNIT = DEPLOY / "systemd" / "orbmesh-wghelper.service"
API_UNIT = DEPLOY / "systemd" / "orbmesh-api@.service"
DOWN_UNIT = DEPLOY / "systemd" / "orbmesh-down.service"


def service_settings(unit):
    """{key: [values]} of a unit's [Service] section."""
    found, section = {}, None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def sandbox(unit):
    """The argv prefix that runs a program in `unit`'s sandbox as far as a test can build it (module docstring)."""
    d = service_settings(unit)
    caps = " ".join(d.get("CapabilityBoundingSet", [])).split()
    argv = [shutil.which("setpriv")] + (["--no-new-privs"] if d.get("NoNewPrivileges") == ["yes"] else [])
    argv += ["--bounding-set=" + ",".join(["-all"] + ["+" + cap[len("CAP_"):].lower() for cap in caps]), "--"]
    if d.get("ProtectKernelTunables") != ["yes"]:
        return argv
    # "-": ignored when missing, as systemd does.
    writable = [p.lstrip("-") for value in d.get("ReadWritePaths", []) for p in value.split()
                if p.lstrip("-").startswith("/proc/sys/") and (os.path.exists(p.lstrip("-")) or not p.startswith("-"))]
    mounts = [(path, "ro") for path in ("/proc/sys", "/sys")] + [(path, "rw") for path in writable]
    script = "set -e\n" + "".join("mount --bind %s %s\nmount -o remount,bind,%s %s\n" % (p, p, mode, p)
                                  for p, mode in mounts) + 'exec "$@"\n'
    return [shutil.which("unshare"), "--mount", "--propagation", "private", "--", "sh", "-c", script, "sandbox"] + argv


def make_tls(directory, ip=SERVER_ADDR):
    """A test CA and a server certificate for `ip` (and 127.0.0.1): (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orbmesh deploy test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory = Path(directory)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_path = directory / "key.pem"
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return directory / "ca.pem", directory / "cert.pem", key_path


class DeployStack(Stack):
    """Stack's helpers (token, wg_peers, db_peers, ...) with the deployment's processes."""

    def __init__(self, netns, tmp_path, ports=API_PORTS):
        from .internet import Internet
        server, client = netns("dsrv"), netns("dcli")
        self.client_if, _ = veth(client, CLIENT_ADDR + "/24", server, SERVER_ADDR + "/24")
        client.run("ip", "address", "add", ORBNET_ADDR + "/24", "dev", self.client_if)
        super().__init__(server, client, tmp_path, workers=1)
        # The uplink exists before the helper starts: it is ORBMESH_NAT_UPLINK.
        self.internet = Internet(netns, server)
        self.ports = tuple(ports)
        self.env["ORBMESH_NAT_UPLINK"] = self.internet.uplink
        del self.env["ORBMESH_DNS_RESOLVER"]  # the default: on, as in production
        # Not under tmp_path (0700 parents): Unbound, as its own user, reads its config here.
        self.resolver_dir = Path(tempfile.mkdtemp(prefix="omdns-"))
        self.resolver_dir.chmod(0o755)
        self.ca, self.cert, self.key = make_tls(self.tmp)
        self.nginx_dir = self.tmp / "nginx"
        self.nginx_log = self.tmp / "nginx-error.log"
        self.nginx_proc = None
        self.app_procs = {}

    # processes ---------------------------------------------------------------------

    def start_helper(self):
        self.set_ipv6_forwarding()
        log = open(self.helper_log, "ab")
        argv = sandbox(HELPER_UNIT) + [str(VENV_BIN / "orbmesh-wghelper")]
        self.helper_proc = self.server.popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._helper_ready, what="helper socket")

    def down(self):
        """`orbmesh-wghelper down` as orbmesh-down.service runs it: with the helper's capability set."""
        argv = sandbox(DOWN_UNIT) + [str(VENV_BIN / "orbmesh-wghelper"), "down"]
        done = self.server.run(*argv, env=self.env, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_app(self):
        for port in self.ports:
            prom = self.tmp / ("prometheus-%d" % port)
            shutil.rmtree(prom, ignore_errors=True)  # a fresh RuntimeDirectory per start, as in the unit
            prom.mkdir()
            env = dict(self.env, ORBMESH_BIND="127.0.0.1:%d" % port, PROMETHEUS_MULTIPROC_DIR=str(prom))
            log = open(self.tmp / ("app-%d.log" % port), "ab")
            argv = sandbox(API_UNIT) + [str(VENV_BIN / "gunicorn"), "-c", str(DEPLOY / "gunicorn.conf.py"),
                                        "app:create_app()"]
            self.app_procs[port] = self.server.popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     cwd=str(REPO))
            log.close()
        for port in self.ports:
            wait_for(lambda: self._instance_ready(port), what="gunicorn on %d" % port)
        self.app_proc = self.app_procs[self.ports[0]]

    def _instance_ready(self, port):
        proc = self.app_procs[port]
        if proc.poll() is not None:
            raise AssertionError("gunicorn on %d exited:\n%s" % (
                port, (self.tmp / ("app-%d.log" % port)).read_text()[-3000:]))
        try:
            status, _, _ = self.server.http("GET", "http://127.0.0.1:%d/health" % port, timeout=2)
        except OSError:
            return False
        return status in (200, 503)

    def stop_app(self):
        for proc in self.app_procs.values():
            self._stop(proc)
        self.app_procs = {}
        self.app_proc = None

    def app_log_text(self):
        return "".join((self.tmp / ("app-%d.log" % p)).read_text(errors="replace")
                       for p in self.ports if (self.tmp / ("app-%d.log" % p)).exists())

    def render_site(self):
        result = subprocess.run([str(DEPLOY / "nginx" / "render"), "--ports", ",".join(map(str, self.ports)),
                                 "--allow", ORBNET_ADDR, "--listen", "%s:%d,127.0.0.1:%d" % (
                                     SERVER_ADDR, HTTPS_PORT, HTTPS_PORT),
                                 "--cert", str(self.cert), "--key", str(self.key)],
                                check=True, capture_output=True, text=True)
        return result.stdout

    def start_nginx(self):
        d = self.nginx_dir
        d.mkdir(exist_ok=True)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(exist_ok=True)
        (d / "orbmesh.conf").write_text(self.render_site())
        (d / "nginx.conf").write_text("""
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {log} info;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    include {d}/orbmesh.conf;
}}
""".format(d=d, log=self.nginx_log))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.nginx_proc = self.server.popen([nginx, "-g", "daemon off;", "-c", str(d / "nginx.conf"),
                                             "-e", str(self.nginx_log)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self._answers(self.nginx_proc, self.nginx_log, "nginx", self.https), what="nginx")

    def stop_nginx(self):
        self._stop(self.nginx_proc, signal.SIGQUIT)  # graceful: finish requests, then exit
        self.nginx_proc = None

    def start_resolver(self):
        """orbmesh-unbound.service, as its unit file says: condition, config as root, unbound as its user."""
        unit = directives((DEPLOY / "systemd" / "orbmesh-unbound.service").read_text())

        def argv(key):
            line = unit[("Service", key)][0].lstrip("+")
            line = line.replace("/opt/orbmesh/venv/bin/", str(VENV_BIN) + "/")
            return shlex.split(line.replace("/run/orbmesh-unbound/", str(self.resolver_dir) + "/"))

        if self.server.run(*argv("ExecCondition"), env=self.env, check=False).returncode != 0:
            return  # skipped, as systemd skips the unit
        self.server.run(*argv("ExecStartPre"), env=self.env)
        caps = "-all" + "".join(",+" + cap.lower()[len("cap_"):]
                                for cap in unit[("Service", "CapabilityBoundingSet")][0].split())
        run_as = [shutil.which("setpriv"), "--reuid=" + unit[("Service", "User")][0], "--regid=" + unit[("Service", "Group")][0],
                  "--init-groups", "--no-new-privs", "--bounding-set=" + caps, "--inh-caps=" + caps,
                  "--ambient-caps=" + caps, "--"]
        # Type=notify: systemd waits for READY=1 on its notify socket; so does this.
        assert unit[("Service", "Type")] == ["notify"]
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.resolver_dir / "notify"
        path.unlink(missing_ok=True)
        notify.bind(str(path))
        path.chmod(0o666)
        notify.settimeout(0.2)
        try:
            self.resolver_proc = self._run_resolver_argv(run_as + argv("ExecStart"), env={"NOTIFY_SOCKET": str(path)})
            wait_for(lambda: self._notified(notify), what="READY=1 from unbound")
        finally:
            notify.close()
        assert self._resolver_ready(), "unbound said READY=1 but does not answer"

    def _notified(self, notify):
        if self.resolver_proc.poll() is not None:
            raise AssertionError("unbound exited:\n" + self.resolver_log.read_text()[-3000:])
        try:
            return b"READY=1" in notify.recv(4096)
        except socket.timeout:
            return False

    def start(self):
        self.start_helper()
        self.start_resolver()
        self.start_app()
        self.start_nginx()

    def close(self):
        self.stop_nginx()
        self.stop_app()
        self.stop_resolver()
        self.stop_helper()
        self.internet.close()
        shutil.rmtree(self.resolver_dir, ignore_errors=True)

    # HTTPS through nginx ---------------------------------------------------------------

    def tls_socket(self, ns=None, host=SERVER_ADDR, source=None, timeout=10):
        """A TLS connection to nginx from inside `ns` (client by default), verified against the test CA."""
        ns = ns or self.client
        sock = ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((host, HTTPS_PORT))
            context = ssl.create_default_context(cafile=str(self.ca))
            return context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise

    def https(self, method, path, body=None, headers=None, ns=None, host=SERVER_ADDR, source=None, timeout=10):
        """(status, headers, body) of one HTTPS request through nginx."""
        stack = self

        class Connection(http.client.HTTPSConnection):
            def connect(self):
                self.sock = stack.tls_socket(ns, host, source, timeout)

        conn = Connection(host, HTTPS_PORT, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    # Stack's API helpers go through nginx from the client namespace.
    def _send(self, method, path, data, headers, timeout):
        return self.https(method, path, body=data, headers=headers, timeout=timeout)

    # the server's firewall ------------------------------------------------------------------

    def nft_ruleset(self):
        return self.server.run("nft", "list", "ruleset").stdout

    def masquerade_rules(self):
        return [line.strip() for line in self.nft_ruleset().splitlines() if "masquerade" in line]
