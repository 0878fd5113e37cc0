"""A simulated internet (203.0.113.0/24, and 2001:db8:113::/64 with ipv6) behind the server's uplink.

The server namespace gets an uplink veth (203.0.113.1/26) into an "internet"
namespace, its default route (the router, 203.0.113.62).  Beyond the router,
as the internet is (clients may not reach the uplink's own network), a small
HTTP server on 203.0.113.100 answers every GET with the address it sees the
caller at, so a test can tell whether NAT happened.  With ipv6=True the same
again in IPv6: uplink 2001:db8:113::1/64, router ::62, and the whoami server
also on 2001:db8:114::100, beyond the router.
DnsServer adds a DNS server there (a second Unbound, serving fixed records, or a lab root zone).
"""
import http.server
import ipaddress
import socket
import subprocess
import threading

from .netns import veth

SERVER_UPLINK_ADDR = "203.0.113.1"
UPLINK_ROUTER = "203.0.113.62"
INTERNET_ADDR = "203.0.113.100"
SERVER_UPLINK_ADDR6 = "2001:db8:113::1"
UPLINK_ROUTER6 = "2001:db8:113::62"
INTERNET_ADDR6 = "2001:db8:114::100"
WHOAMI_PORT = 8000


class _WhoAmI(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(ns, addr, port, handler):
    """A threaded HTTP server on addr:port (IPv4 or IPv6) inside `ns`; shut it down and close it after."""
    listener = ns.socket_in(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(64)
    httpd = http.server.ThreadingHTTPServer((addr, port), handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = listener
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return httpd


def add_address(ns, ifname, address):
    """An address on a link; IPv6 without duplicate address detection, so it is usable at once."""
    ns.run("ip", "address", "add", address, "dev", ifname, *(("nodad",) if ":" in address else ()))


class Internet:
    """The internet namespace, its link to the server and its whoami server(s)."""

    def __init__(self, netns, server_ns, ipv6=False):
        self.ns = netns("inet")
        self.uplink, self.inside = veth(server_ns, SERVER_UPLINK_ADDR + "/26", self.ns, UPLINK_ROUTER + "/26")
        self.ns.run("ip", "address", "add", INTERNET_ADDR + "/32", "dev", "lo")
        server_ns.run("ip", "route", "add", "default", "via", UPLINK_ROUTER)
        addresses = [INTERNET_ADDR]
        if ipv6:
            add_address(server_ns, self.uplink, SERVER_UPLINK_ADDR6 + "/64")
            add_address(self.ns, self.inside, UPLINK_ROUTER6 + "/64")
            self.beyond(INTERNET_ADDR6)
            server_ns.run("ip", "-6", "route", "add", "default", "via", UPLINK_ROUTER6)
            addresses.append(INTERNET_ADDR6)
        self.servers = [serve(self.ns, addr, WHOAMI_PORT, _WhoAmI) for addr in addresses]

    def beyond(self, address):
        """Another internet host beyond the router (not on the uplink's network)."""
        add_address(self.ns, "lo", address + ("/128" if ":" in address else "/32"))

    @property
    def url(self):
        return "http://%s:%d/" % (INTERNET_ADDR, WHOAMI_PORT)

    @property
    def url6(self):
        return "http://[%s]:%d/" % (INTERNET_ADDR6, WHOAMI_PORT)

    def whoami_from(self, ns, timeout=5, url=None):
        """GET the whoami page from inside `ns`: the address the internet sees, or None."""
        try:
            status, _, body = ns.http("GET", url or self.url, timeout=timeout)
        except OSError:
            return None
        return body.decode() if status == 200 else None

    def close(self):
        for httpd in self.servers:
            httpd.shutdown()
            httpd.server_close()


class UdpSink:
    """A probe host on the internet: records every datagram that reaches addr:port, with its source."""

    def __init__(self, ns, addr, port=9000):
        self.addr, self.port = addr, port
        self.seen = []  # (source address, payload)
        self.sock = ns.socket_in(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            self.seen.append((source[0], data))

    def close(self):
        self._stop.set()
        self.thread.join()
        self.sock.close()


class DnsServer:
    """Unbound in `ns` on address:53 serving `records` ({name: address or [addresses]}, A or AAAA) to the
    `allowed` sources only; with `root`, the text of a zone file, also an authoritative "." (a lab root:
    its delegations are referrals, so a resolver pointed at it follows them).

    Every other source is refused, so an answer that reaches a client proves
    the query came from an allowed address (say, the server's uplink).
    """

    def __init__(self, ns, address, records, allowed, directory, root=None):
        self.ns, self.address = ns, address
        conf = directory / ("dns-%s.conf" % address)
        self.log = directory / ("dns-%s.log" % address)
        lines = ["server:", "    interface: %s" % address, "    port: 53", '    username: ""', '    chroot: ""',
                 '    pidfile: ""', "    do-daemonize: no", "    use-syslog: no", '    logfile: ""',
                 "    log-queries: yes", '    module-config: "iterator"',
                 "    access-control: 0.0.0.0/0 refuse", "    access-control: ::/0 refuse",
                 "    access-control: 127.0.0.0/8 refuse", "    access-control: ::1/128 refuse"]  # allowed by default
        lines += ["    access-control: %s allow" % ipaddress.ip_network(source) for source in allowed]
        for name, ips in records.items():
            lines.append('    local-zone: "%s." static' % name)
            lines += ['    local-data: "%s. 60 IN %s %s"' % (name, "AAAA" if ":" in ip else "A", ip)
                      for ip in ([ips] if isinstance(ips, str) else ips)]
        if root is not None:
            zonefile = directory / ("root-%s.zone" % address)
            zonefile.write_text(root)
            lines += ["auth-zone:", '    name: "."', '    zonefile: "%s"' % zonefile, "    for-downstream: yes",
                      "    for-upstream: no"]
        lines += ["remote-control:", "    control-enable: no"]
        conf.write_text("\n".join(lines) + "\n")
        with open(self.log, "ab") as log:
            self.proc = ns.popen(["unbound", "-d", "-p", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)

    def ready(self):
        """Whether it answers (here with REFUSED: its own address is not an allowed source)."""
        if self.proc.poll() is not None:
            raise AssertionError("test DNS server exited:\n" + self.log.read_text()[-3000:])
        out = self.ns.run("dig", "+tries=1", "+time=1", "-b", self.address, "@" + self.address, "ready.test",
                          check=False).stdout
        return "status: REFUSED" in out

    def askers(self, name=None):
        """Source addresses that asked this server for `name`, or for anything (log-queries: "info: SOURCE NAME.
        TYPE CLASS")."""
        found = []
        for line in self.log.read_text().splitlines():
            fields = line.partition(" info: ")[2].split()
            if len(fields) == 4 and (name is None or fields[1] == name + "."):
                found.append(fields[0])
        return found

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
