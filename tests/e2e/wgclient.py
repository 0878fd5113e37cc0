"""A WireGuard client (wireguard-go) inside a test namespace, set up like wg-quick."""
import os
import subprocess
import tempfile
import time

WG_SOCKET_DIR = "/var/run/wireguard"


def keypair():
    """(private, public) from `wg genkey` and `wg pubkey` (the key on stdin)."""
    private = subprocess.run(["wg", "genkey"], check=True, capture_output=True, text=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private + "\n", check=True,
                            capture_output=True, text=True).stdout.strip()
    return private, public


class WgClient:
    def __init__(self, ns, ifname):
        self.ns = ns
        self.ifname = ifname
        self.private_key, self.public_key = keypair()
        self._key_file = None
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self.proc = ns.popen(["wireguard-go", ifname], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout=10):
        deadline = time.monotonic() + timeout
        sock = os.path.join(WG_SOCKET_DIR, self.ifname + ".sock")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("wireguard-go for %s exited with %s" % (self.ifname, self.proc.returncode))
            link = self.ns.run("ip", "link", "show", "dev", self.ifname, check=False)
            if link.returncode == 0 and os.path.exists(sock):
                return
            time.sleep(0.05)
        raise RuntimeError("wireguard-go did not create %s" % self.ifname)

    def configure(self, server_public_key, endpoint, address_cidr, allowed_ips, mtu=1420, keepalive=0,
                  address6_cidr=None, metric=None):
        fd, path = tempfile.mkstemp(prefix="omwgc-")  # mkstemp creates it 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(self.private_key + "\n")
        self._key_file = path
        self.ns.run("wg", "set", self.ifname, "private-key", path,
                    "peer", server_public_key, "endpoint", endpoint,
                    "allowed-ips", ",".join(allowed_ips),
                    "persistent-keepalive", str(keepalive))
        self.ns.run("ip", "address", "add", address_cidr, "dev", self.ifname)
        self.ns.run("ip", "link", "set", "dev", self.ifname, "mtu", str(mtu), "up")
        if address6_cidr:  # the connect response's ip6; no duplicate address detection on a tunnel
            self.ns.run("ip", "address", "add", address6_cidr, "dev", self.ifname, "nodad")
        for network in allowed_ips:
            # A metric lets several clients in one namespace route the same network.
            self.ns.run("ip", "route", "replace", network, "dev", self.ifname,
                        *(["metric", str(metric)] if metric is not None else []))

    def ping(self, addr, count=1, timeout=2):
        result = self.ns.run("ping", "-n", "-c", str(count), "-W", str(timeout), addr,
                             check=False, timeout=count * timeout + 5)
        return result.returncode == 0

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._key_file:
            os.unlink(self._key_file)
            self._key_file = None
        stale = os.path.join(WG_SOCKET_DIR, self.ifname + ".sock")
        if os.path.exists(stale):  # left only if wireguard-go was killed
            os.unlink(stale)
