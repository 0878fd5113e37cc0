"""Which local address would reach the server now?

When a laptop moves from Wi-Fi to a phone's hotspot, a TCP connection
bound to the old address does not fail: it retransmits into the void
until the kernel gives up, minutes later.  The relay asks the system
which source address it would use for the server right now (a UDP
socket's connect() picks a route and sends nothing, on Linux, macOS and
Windows alike) and compares it with the address its connection has;
when they differ the connection is dropped and made again at once.
"""
import socket

CHECK_EVERY = 0.5  # seconds between two looks at the route


def source_for(peer):
    """The local address the system would use to reach `peer` ((host, port, ...)) now, or None (no route)."""
    host, port = peer[0], peer[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect((host, port or 9))
        return sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()


def moved(sock):
    """Why a connected socket no longer fits the route to its peer (a sentence), or None.

    Also None when the socket is closed or not connected yet: then there is
    nothing to compare.
    """
    try:
        local, peer = sock.getsockname(), sock.getpeername()
    except (OSError, ValueError):
        return None
    now = source_for(peer)
    if now is None:
        return "no route to %s any more" % peer[0]
    if now != local[0]:
        return "local address changed from %s to %s" % (local[0], now)
    return None
