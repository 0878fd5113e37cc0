"""A simulated internet (203.0.113.0/24) behind the server's uplink.

The server namespace gets an uplink veth (203.0.113.1/26) into an "internet"
namespace, its default route (the router, 203.0.113.62).  Beyond the router,
as the internet is (clients may not reach the uplink's own network), a small
HTTP server on 203.0.113.100 answers every GET with the address it sees the
caller at, so a test can tell whether NAT happened.
"""
import http.server
import socket
import threading

from .netns import veth

SERVER_UPLINK_ADDR = "203.0.113.1"
UPLINK_ROUTER = "203.0.113.62"
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
        self.uplink, _ = veth(server_ns, SERVER_UPLINK_ADDR + "/26", self.ns, UPLINK_ROUTER + "/26")
        self.ns.run("ip", "address", "add", INTERNET_ADDR + "/32", "dev", "lo")
        server_ns.run("ip", "route", "add", "default", "via", UPLINK_ROUTER)
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
