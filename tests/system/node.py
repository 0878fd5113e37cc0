"""A Debian 12 node booted under a real systemd, with what deploy/install.sh installs.

    client ns (192.0.2.2)  --veth--  node ns (192.0.2.1): systemd-nspawn -b of a Debian 12 root  --uplink--  internet ns
                                       PID 1 systemd 252, install.sh's units,     (NAT)       (tests/e2e/internet.py)
                                       nginx :8443

The root file system is made by debootstrap with the Debian packages
install.sh asks for (read from its DEBS line) and cached under
/var/cache/orbmesh-systest, rebuilt when that list changes; every run boots
a copy of it.  The node has no internet: Python packages come from wheels
built on the host by deploy/build-wheels (install.sh --wheels), cached by
the hash of requirements.txt and setup.cfg.  The checkout (and an older
commit, for the upgrade) is bind-mounted read-only into the node.

Every process of the node lives in the node's namespace and is ended by
poweroff (or, failing that, by the nspawn pid we started); the host's own
namespace gets only the ends of the veth pair, moved into the namespaces.
"""
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e.netns import children, stop_process

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ORBMESH_SYSTEST_CACHE", "/var/cache/orbmesh-systest"))
SUITE = "bookworm"
# Besides install.sh's own packages: an init, the bus, and what the test runs inside (pgrep).
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "ca-certificates", "curl", "python3")
NODE_ADDR, CLIENT_ADDR = "192.0.2.1", "192.0.2.2"
# What install.sh installs from the checkout: the wheel cache and the upgrade's base follow these.
SHIPPED = ("app", "wghelper", "orbmesh_relay", "deploy", "setup.cfg", "setup.py", "pyproject.toml", "requirements.txt")


def install_packages(tree=REPO):
    """The Debian packages deploy/install.sh of `tree` installs (its DEBS=(...) line)."""
    text = (Path(tree) / "deploy" / "install.sh").read_text()
    return re.search(r"^DEBS=\(([^)]*)\)", text, re.M).group(1).split()


def host_mirror():
    """The first Debian mirror of this host's own apt sources."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources + [Path("/etc/apt/sources.list")]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"]:
                url = next(w for w in words[1:] if not w.startswith("["))
                if "security" not in url:
                    return url
    raise RuntimeError("no Debian mirror in this host's apt sources")


class _Lock:
    """One builder of a cache entry at a time (two test runs on one machine)."""

    def __enter__(self):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.handle = open(CACHE / ".lock", "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _digest(*parts):
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def rootfs(log):
    """The cached Debian root (made when missing or when the package list changed); its path."""
    packages = sorted(set(BASE_PACKAGES) | set(install_packages()))
    path = CACHE / ("rootfs-%s-%s" % (SUITE, _digest(SUITE, *packages)))
    with _Lock():
        if not (path / "etc" / "os-release").exists():
            for old in CACHE.glob("rootfs-*"):  # another package list: not needed again
                shutil.rmtree(old, ignore_errors=True)
            work = Path(str(path) + ".tmp")
            argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, str(work),
                    host_mirror()]
            log("debootstrap: %s" % " ".join(argv))
            subprocess.run(argv, check=True, capture_output=True, timeout=1200)
            # Debian enables its own nginx and unbound; the node's are ours (install.sh enables nginx again).
            for unit in ("nginx.service", "unbound.service"):
                (work / "etc/systemd/system/multi-user.target.wants" / unit).unlink(missing_ok=True)
            work.rename(path)
    return path


def wheels(tree, log):
    """The cached wheels deploy/build-wheels of `tree` makes, keyed by its requirements.txt and setup.cfg."""
    tree = Path(tree)
    key = _digest(*[(tree / name).read_text() for name in ("requirements.txt", "setup.cfg")])
    path = CACHE / ("wheels-" + key)
    with _Lock():
        if not any(path.glob("*.whl")):
            work = Path(str(path) + ".tmp")
            shutil.rmtree(work, ignore_errors=True)
            log("build-wheels into %s" % path)
            # The node's Python is Debian's; so is this one's (the venv is built from /usr/bin/python3).
            subprocess.run([str(REPO / "deploy" / "build-wheels"), str(work)], check=True, capture_output=True,
                           timeout=900, env=dict(os.environ, PYTHON="/usr/bin/python3"))
            shutil.rmtree(path, ignore_errors=True)
            work.rename(path)
    return path


def upgrade_base(log):
    """A checkout of the newest earlier commit whose install.sh has --wheels and whose shipped files differ
    from this tree's (a temporary directory), or None when git knows none (a shallow clone)."""
    if os.environ.get("ORBMESH_SYSTEST_UPGRADE_FROM"):
        commits = [os.environ["ORBMESH_SYSTEST_UPGRADE_FROM"]]
    else:
        found = subprocess.run(["git", "-C", str(REPO), "rev-list", "--max-count=400", "HEAD", "--"] + list(SHIPPED),
                               capture_output=True, text=True)
        commits = found.stdout.split() if found.returncode == 0 else []
    for commit in commits:
        script = subprocess.run(["git", "-C", str(REPO), "show", "%s:deploy/install.sh" % commit],
                                capture_output=True, text=True)
        if "--wheels" not in script.stdout:
            break  # older still: before install.sh could install offline
        same = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", commit, "--"] + list(SHIPPED))
        if same.returncode == 0:
            continue  # installs what this tree installs: no upgrade
        out = Path(tempfile.mkdtemp(prefix="omsys-base-"))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
        log("upgrade base: %s" % commit)
        return commit, out
    return None, None


class Node:
    """systemd-nspawn -b of a copy of `root` in the namespace `ns`; binds: {node path: host path} (read-only)."""

    def __init__(self, root, ns, binds, log_dir):
        self.root = Path(root)
        self.ns = ns
        self.binds = binds
        self.log_dir = Path(log_dir)
        self.name = "omsys-" + ns.name[-8:]
        self.proc = None
        self.init = None
        self.boots = 0

    # --- boot and poweroff ------------------------------------------------------------

    def boot(self, timeout=120):
        """Boot; returns when systemd says running or degraded (its jobs done)."""
        self.boots += 1
        log = open(self.log_dir / ("boot-%d.log" % self.boots), "wb")
        argv = ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "-M", self.name,
                "--capability=CAP_NET_ADMIN", "--network-namespace-path=/run/netns/" + self.ns.name,
                "--console=read-only", "-b"]
        argv[1:1] = ["--bind-ro=%s:%s" % (host, inside) for inside, host in self.binds.items()]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started = time.monotonic()
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("systemd-nspawn exited with %s:\n%s" % (self.proc.returncode, self.boot_log()))
            if self.init is None:
                found = children(self.proc.pid)
                self.init = found[0] if found else None
            if self.init is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return state
            if time.monotonic() > deadline:
                raise AssertionError("the node did not finish booting in %ds:\n%s" % (timeout, self.boot_log()))
            time.sleep(0.3)

    def boot_log(self):
        return (self.log_dir / ("boot-%d.log" % self.boots)).read_text(errors="replace")[-4000:]

    def poweroff(self, timeout=90):
        if self.proc is None:
            return
        if self.proc.poll() is None and self.init is not None:
            self.run("systemctl", "poweroff", check=False)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's init to power off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self.proc = self.init = None

    # --- inside ----------------------------------------------------------------------------

    def run(self, *argv, check=True, timeout=120, input=None):  # noqa: A002
        """A command inside the node (all its namespaces), as root."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        done = subprocess.run(["nsenter", "-t", str(self.init), "-a", "--"] + [str(a) for a in argv],
                              capture_output=True, text=True, timeout=timeout, input=input, env=env)
        if check and done.returncode != 0:
            raise AssertionError("in the node: %s -> %s\n%s%s" % (" ".join(map(str, argv)), done.returncode,
                                                                 done.stdout[-3000:], done.stderr[-3000:]))
        return done

    def sh(self, script, check=True, timeout=120):
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def unit(self, name, *props):
        """{property: value} of a unit, as systemctl show prints them."""
        out = self.run("systemctl", "show", name, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit):
        return int(self.unit(unit, "MainPID")["MainPID"])

    def proc_status(self, pid):
        """/proc/PID/status of a process of the node, as {field: value}."""
        text = self.run("cat", "/proc/%d/status" % pid).stdout
        return dict((k, v.strip()) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line))

    def env_file(self):
        text = (self.root / "etc/orbmesh/orbmesh.env").read_text()
        return dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, re.M))

    def set_env(self, **values):
        """Set ORBMESH_* lines in /etc/orbmesh/orbmesh.env, as the operator does after install.sh."""
        path = self.root / "etc/orbmesh/orbmesh.env"
        text = path.read_text()
        for key, value in values.items():
            line = "ORBMESH_%s=%s" % (key, value)
            text, n = re.subn(r"^#?ORBMESH_%s=.*$" % key, line, text, count=1, flags=re.M)
            if not n:
                text += line + "\n"
        path.write_text(text)


class Lab:
    """The node, its client namespace, and what a client or the operator does with them."""

    HTTPS_PORT = 8443
    API_PORTS = (8081, 8082)

    def __init__(self, node, client, log):
        self.node = node
        self.client = client
        self.log = log
        self.cert = node.root / "etc/orbmesh/tls/cert.pem"
        self.closers = []  # what the checks started in the client namespace, stopped at the end

    def api_key(self):
        return self.node.env_file()["ORBMESH_API_KEYS"].split(",")[0].strip()

    def token(self, user, device):
        """A device token from the node's own CLI and settings, as README says an operator mints one."""
        return self.node.sh("set -a; . /etc/orbmesh/orbmesh.env; /opt/orbmesh/venv/bin/orbmesh-wg token "
                            "--user %s --device %s --ttl 7200" % (user, device)).stdout.strip()

    def curl(self, method, path, token=None, api_key=None, body=None, timeout=15):
        """The seed's curl, from the client namespace, verified against the node's certificate: (status, json).

        The credential goes on stdin (-H @-), not in curl's argv."""
        headers = ("Authorization: Bearer %s\n" % token if token else "") + \
                  ("X-API-Key: %s\n" % api_key if api_key else "")
        argv = ["curl", "-sS", "--max-time", str(timeout), "--cacert", str(self.cert), "-X", method,
                "-H", "@-", "-w", "\n%{http_code}", "https://%s:%d%s" % (NODE_ADDR, self.HTTPS_PORT, path)]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", body]
        done = self.client.run(*argv, input=headers, check=False, timeout=timeout + 5)
        text, _, code = done.stdout.rpartition("\n")
        return int(code or 0), text

    def internal(self, method, path, body=None):
        """OrbNET's call from the node itself (loopback, as the nginx site allows), verified: (status, text)."""
        argv = ["curl", "-sS", "--max-time", "15", "--cacert", "/etc/orbmesh/tls/cert.pem",
                "--connect-to", "%s:%d:127.0.0.1:%d" % (NODE_ADDR, self.HTTPS_PORT, self.HTTPS_PORT),
                "-X", method, "-H", "@-", "-w", "\n%{http_code}", "https://%s:%d%s" % (NODE_ADDR, self.HTTPS_PORT, path)]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", body]
        done = self.node.run(*argv, input="X-API-Key: %s\n" % self.api_key(), check=False)
        text, _, code = done.stdout.rpartition("\n")
        return int(code or 0), text

    def install(self, tree="/srv/orbmesh", wheels="/srv/wheels", *args):
        done = self.node.run("bash", tree + "/deploy/install.sh", "--wheels", wheels, *args, check=False, timeout=600)
        self.log("install.sh from %s:\n%s%s" % (tree, done.stdout[-2500:], done.stderr[-2500:]))
        if done.returncode != 0:
            journal = self.node.run("journalctl", "-n", "60", "--no-pager", "-u", "orbmesh*", check=False).stdout
            raise AssertionError("install.sh failed:\n%s%s\njournal:\n%s" % (
                done.stdout[-2500:], done.stderr[-2500:], journal[-4000:]))
        return done.stdout
