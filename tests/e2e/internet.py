"""A simulated internet (203.0.113.0/24) behind the server's uplink.

The server namespace gets an uplink veth (203.0.113.1) into an "internet"
namespace (203.0.113.100) where a small HTTP server answers every GET with
the address it sees the caller at, so a test can tell whether NAT happened.
DnsServer adds a DNS server there (a second Unbound, serving fixed records).
"""
import http.server
import socket
import subprocess
import threading

from .netns import veth

SERVER_UPLINK_ADDR = "203.0.113.1"
INTERNET_ADDR = "203.0.113.100"
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


class Internet:
    """The internet namespace, its link to the server and its whoami server."""

    def __init__(self, netns, server_ns):
        self.ns = netns("inet")
        self.uplink, _ = veth(server_ns, SERVER_UPLINK_ADDR + "/24", self.ns, INTERNET_ADDR + "/24")
        listener = self.ns.socket_in(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((INTERNET_ADDR, WHOAMI_PORT))
        listener.listen(64)
        self.httpd = http.server.ThreadingHTTPServer((INTERNET_ADDR, WHOAMI_PORT), _WhoAmI,
                                                     bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = listener
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://%s:%d/" % (INTERNET_ADDR, WHOAMI_PORT)

    def whoami_from(self, ns, timeout=5):
        """GET the whoami page from inside `ns`: the address the internet sees, or None."""
        try:
            status, _, body = ns.http("GET", self.url, timeout=timeout)
        except OSError:
            return None
        return body.decode() if status == 200 else None

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class DnsServer:
    """Unbound in `ns` on address:53 serving `records` ({name: IPv4}) to the `allowed` sources only.

    Every other source is refused, so an answer that reaches a client proves
    the query came from an allowed address (say, the server's uplink).
    """

    def __init__(self, ns, address, records, allowed, directory):
        self.ns, self.address = ns, address
        conf = directory / ("dns-%s.conf" % address)
        self.log = directory / ("dns-%s.log" % address)
        lines = ["server:", "    interface: %s" % address, "    port: 53", '    username: ""', '    chroot: ""',
                 '    pidfile: ""', "    do-daemonize: no", "    use-syslog: no", '    logfile: ""',
                 "    log-queries: yes", '    module-config: "iterator"',
                 "    access-control: 0.0.0.0/0 refuse", "    access-control: ::/0 refuse"]
        lines += ["    access-control: %s/32 allow" % source for source in allowed]
        for name, ip in records.items():
            lines += ['    local-zone: "%s." static' % name, '    local-data: "%s. 60 IN A %s"' % (name, ip)]
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

    def askers(self, name):
        """Source addresses that asked this server for `name` (log-queries: "info: SOURCE NAME. TYPE CLASS")."""
        found = []
        for line in self.log.read_text().splitlines():
            fields = line.partition(" info: ")[2].split()
            if len(fields) == 4 and fields[1] == name + ".":
                found.append(fields[0])
        return found

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
