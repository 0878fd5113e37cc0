"""Who reaches whom: echo services and ping/TCP/UDP probes from inside namespaces.

An Echo answers TCP and UDP on given addresses of a namespace (UDP: "echo "
+ what it got), so a probe that gets an answer proves the whole path, and
one that gets nothing was dropped on the way (a refused TCP connection
counts as reached: something answered).  Probes run in parallel, each
with a short timeout; callers pair every probe that must fail with a
control that must succeed.
"""
import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor

ECHO_PORT = 7007
IP_FREEBIND = 15  # <linux/in.h>; not in the socket module
IPV6_FREEBIND = 78  # <linux/in6.h>


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"echo " + self.request.recv(64))


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(b"echo " + data, self.client_address)


class Echo:
    """TCP and UDP echo on `port` of each of `addrs` (IPv4 or IPv6) in `ns` (bound one by one,
    so a UDP answer leaves from the address it was sent to)."""

    def __init__(self, ns, addrs, port=ECHO_PORT):
        self.servers = []
        for addr in addrs:
            for kind, cls, handler in ((socket.SOCK_STREAM, socketserver.ThreadingTCPServer, _TcpEcho),
                                       (socket.SOCK_DGRAM, socketserver.UDPServer, _UdpEcho)):
                sock = ns.socket_in(family(addr), kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # The gateway may come and go.
                sock.setsockopt(*((socket.IPPROTO_IPV6, IPV6_FREEBIND) if ":" in addr else (socket.SOL_IP, IP_FREEBIND)), 1)
                sock.bind((addr, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(16)
                server = cls((addr, port), handler, bind_and_activate=False)
                server.daemon_threads = True
                server.socket.close()
                server.socket = sock
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
                self.servers.append(server)

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _socket(ns, addr, kind, device):
    sock = ns.socket_in(family(addr), kind)
    if device:  # as a process bound to that link would send
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    return sock


def tcp(ns, addr, port=ECHO_PORT, timeout=2.0, device=None):
    """Whether a TCP connection opens (or is refused: either way the far end answered)."""
    sock = _socket(ns, addr, socket.SOCK_STREAM, device)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
        return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        sock.close()


def udp(ns, addr, port=ECHO_PORT, timeout=2.0, device=None):
    sock = _socket(ns, addr, socket.SOCK_DGRAM, device)
    sock.settimeout(timeout)
    try:
        sock.sendto(b"u", (addr, port))
        return sock.recv(64) == b"echo u"
    except OSError:
        return False
    finally:
        sock.close()


def ping(ns, addr, timeout=2, device=None):
    argv = ["ping", "-n", "-c", "1", "-W", str(timeout)] + (["-I", device] if device else []) + [addr]
    return ns.run(*argv, check=False, timeout=timeout + 5).returncode == 0


PROBES = {"ping": ping, "tcp": tcp, "udp": udp}


def reach(ns, targets, device=None):
    """{(kind, addr[, port]): reached?} for targets given as (kind, addr) or
    (kind, addr, port) with kind "ping", "tcp" or "udp", probed in parallel."""
    def one(target):
        kind, addr, *port = target
        return PROBES[kind](ns, addr, *port, device=device)

    targets = list(targets)
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return dict(zip(targets, pool.map(one, targets)))


def every(*addrs, kinds=("ping", "tcp", "udp"), port=ECHO_PORT):
    """Targets for reach(): each of `kinds` to each address."""
    return [(k, a) if k == "ping" else (k, a, port) for a in addrs for k in kinds]
