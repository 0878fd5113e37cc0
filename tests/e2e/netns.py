"""Network namespaces for end-to-end tests.

Everything a test creates (links, addresses, routes, processes) lives in a
namespace with a unique name that is deleted afterwards; the host namespace
gets nothing.  Processes are stopped by the pids we know, never by name.
"""
import ctypes
import http.client
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def unique_ifname(prefix):
    """A fresh interface name of at most 15 characters."""
    name = "%s%s" % (prefix[:7], secrets.token_hex(4))
    assert len(name) <= 15
    return name


def stop_process(proc, timeout=10):
    """SIGTERM a Popen we started, SIGKILL if it ignores that; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid):
    """Pids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open("/proc/%s/stat" % entry).read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid):
    """The process has exited (a zombie waiting for its parent to reap it counts)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _stop_pid(pid, timeout=5.0):
    """SIGTERM, then SIGKILL, one pid, waiting for it to exit; ignores a process already gone.

    wireguard-go daemons outlive the helper, so the namespace's teardown is
    what ends them: it must see them exit, not just signal them.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.02)


class Netns:
    def __init__(self, tag="t"):
        self.name = "om-%s-%s" % (tag[:12], secrets.token_hex(4))
        self.inode = None
        self._procs = []
        self._created = False

    # --- lifetime ---------------------------------------------------------

    def create(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._created = True
        self.inode = os.stat(os.path.join(NETNS_DIR, self.name)).st_ino
        # Links made here skip duplicate address detection: their tentative link-local addresses held the
        # first IPv6 packets for about 1 s (an IPv6 connect took 0.9-1.0 s in 3 of 4 runs, IPv4 0.01 s).
        for scope in ("all", "default"):
            self.run("sysctl", "-qw", "net.ipv6.conf.%s.accept_dad=0" % scope, check=False)  # no IPv6: none
        self.run("ip", "link", "set", "lo", "up")
        return self

    def pids(self):
        """Pids of every process whose network namespace is this one."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def delete(self):
        if not self._created:
            return
        for proc in self._procs:
            stop_process(proc)
        # Children of our children and the daemons they left (say, the
        # wireguard-go of the helper's interface) are in this namespace too;
        # they are ours, and we know their pids.
        for pid in self.pids():
            _stop_pid(pid)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self._created = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.delete()

    # --- running things inside -------------------------------------------

    def _argv(self, argv):
        return ["ip", "netns", "exec", self.name] + [str(a) for a in argv]

    def run(self, *argv, check=True, input=None, timeout=30, env=None):  # noqa: A002
        text = input is None or isinstance(input, str)
        return subprocess.run(self._argv(argv), check=check, input=input, timeout=timeout,
                              env=env, capture_output=True, text=text)

    def popen(self, argv, env=None, **kw):
        proc = subprocess.Popen(self._argv(argv), env=env, **kw)
        self._procs.append(proc)
        return proc

    def socket_in(self, family=socket.AF_INET, type=socket.SOCK_STREAM):  # noqa: A002
        """A socket created inside this namespace; it keeps it for life.

        setns() changes only the calling thread, so a throw-away thread
        enters the namespace, makes the socket and exits.
        """
        box = {}

        def make():
            fd = os.open(os.path.join(NETNS_DIR, self.name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, "setns: %s" % os.strerror(err))
                box["sock"] = socket.socket(family, type)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                os.close(fd)

        thread = threading.Thread(target=make, name="setns-" + self.name)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["sock"]

    def http(self, method, url, headers=None, body=None, timeout=10):
        """One HTTP request from inside the namespace: (status, headers, body)."""
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 80
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ns = self

        class Connection(http.client.HTTPConnection):
            def connect(self):
                self.sock = ns.socket_in(family, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect((host, port))

        conn = Connection(host, port, timeout=timeout)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def creator(made):
    """netns(tag) -> a new namespace, created and appended to `made` (which the test deletes)."""
    def netns(tag):
        ns = Netns(tag)
        made.append(ns)
        return ns.create()
    return netns


def veth(ns_a, addr_a, ns_b, addr_b):
    """A veth pair from ns_a to ns_b, addressed and up; returns (if_a, if_b).

    Created inside ns_a with its peer moved straight into ns_b, so the host
    namespace never holds either end.
    """
    if_a, if_b = unique_ifname("va"), unique_ifname("vb")
    subprocess.run(["ip", "-n", ns_a.name, "link", "add", if_a, "type", "veth",
                    "peer", "name", if_b, "netns", ns_b.name], check=True, capture_output=True)
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        subprocess.run(["ip", "-n", ns.name, "address", "add", addr, "dev", ifname],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", ifname, "up"],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"],
                       check=True, capture_output=True)
    return if_a, if_b
