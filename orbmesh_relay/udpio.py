"""UDP in and out, fast where the kernel allows and plain everywhere else.

The one UDP layer: the relay's ports (Port) and the server's tunnel pipe
to WireGuard (app/tunnel/sessions.py UdpPipe) send through send_runs().

On Linux a run of equal-sized datagrams goes out in one sendmsg() with
UDP_SEGMENT (GSO), and a socket with UDP_GRO set can take several
datagrams of one flow in one recvmsg().  Neither exists on macOS or
Windows (Windows has no sendmsg() at all), so every such path is behind
LINUX_PATHS, which is also off when ORBMESH_RELAY_PORTABLE is set: the
tests run every transport that way to prove the plain paths work.

Waiting for a datagram: on Linux the socket blocks with the kernel's own
receive timeout (SO_RCVTIMEO), so a datagram costs one recvmsg() and no
epoll_wait() before it, and every other call passes MSG_DONTWAIT; elsewhere
the socket is non-blocking and waits with `selectors` (select.poll does not
exist on Windows).  No call blocks for longer than POLL.
"""
import errno
import logging
import os
import selectors
import socket
import struct
import sys

from .framing import MAX_DATAGRAM, gso_control, gso_runs

log = logging.getLogger(__name__)

PORTABLE_ENV = "ORBMESH_RELAY_PORTABLE"
POLL = 0.5  # the longest a read waits, so that a stop is noticed


def linux_paths_wanted(environ=os.environ, platform=sys.platform):
    """GSO/GRO and the epoll selector: only on Linux, and not when the portable switch is set."""
    return platform.startswith("linux") and environ.get(PORTABLE_ENV, "") in ("", "0")


LINUX_PATHS = linux_paths_wanted()
SOL_UDP = 17
UDP_GRO = 104  # linux/udp.h; not in every Python's socket module
_GRO_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
# Windows reports an ICMP "port unreachable" for an earlier send as an
# error on the next receive of an unconnected UDP socket; it means nothing
# for the datagrams still to come.
_RECEIVE_NOISE = (ConnectionResetError, ConnectionRefusedError)


# A kernel without UDP segmentation refuses a GSO send with one of these.
GSO_REFUSED = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


def send_runs(sock, datagrams, gso, address=None, flags=0):
    """Send `datagrams`, each run of equal-sized ones in one system call where `gso`, else one call each.

    To `address`, or on a connected socket with None.  Returns (packets,
    bytes, lost, gso): what went out; how many datagrams the kernel did not
    take (nobody listening: an ICMP from an earlier send; a full buffer),
    lost as on any UDP path; and whether GSO still works (False once the
    kernel refused it: the caller keeps that, and the run went out one by one).
    """
    packets = size = lost = 0
    to = () if address is None else (address,)
    for segment, run in gso_runs(datagrams) if gso else [(0, [d]) for d in datagrams]:
        try:
            if len(run) == 1:
                sock.sendto(run[0], flags, address) if to else sock.send(run[0], flags)
            else:
                sock.sendmsg([b"".join(run)], gso_control(segment), flags, *to)
        except OSError as exc:
            if len(run) > 1 and exc.errno in GSO_REFUSED:
                gso = False
                more = send_runs(sock, run, False, address, flags)
                packets, size, lost = packets + more[0], size + more[1], lost + more[2]
                continue
            log.debug("udp send to %s failed: %s", address or "peer", exc)
            lost += len(run)
            continue
        packets += len(run)
        size += sum(map(len, run))
    return packets, size, lost, gso


def selector():
    """A selector for one socket: the platform's best, or select() when the Linux paths are off."""
    return selectors.DefaultSelector() if LINUX_PATHS else selectors.SelectSelector()


class Port:
    """A non-blocking UDP socket with batched reads and writes.

    `gso`/`gro` start on where LINUX_PATHS allows and turn themselves off
    for good the first time the kernel refuses them.
    """

    def __init__(self, sock, timeout=0.5):
        self.sock = sock
        self.gso = LINUX_PATHS and hasattr(sock, "sendmsg")
        self.gro = False
        # Linux: the socket blocks, with the kernel's own receive timeout, so that a datagram costs one
        # recvmsg() and no epoll_wait() before it; every other call passes MSG_DONTWAIT.  Elsewhere:
        # a non-blocking socket and a selector.
        self.blocking = LINUX_PATHS and hasattr(socket, "MSG_DONTWAIT") and hasattr(socket, "SO_RCVTIMEO")
        self._flags = socket.MSG_DONTWAIT if self.blocking else 0
        if self.blocking:
            sock.setblocking(True)
            seconds = int(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
            self._selector = None
        else:
            sock.setblocking(False)
            self._selector = selector()
            self._selector.register(sock, selectors.EVENT_READ)
        if LINUX_PATHS and _GRO_SPACE:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

    def wait(self, timeout):
        """Whether something is waiting to be read, after waiting up to `timeout` seconds."""
        if self._selector is None:
            return bool(_readable(self.sock, timeout))
        return bool(self._selector.select(timeout))

    def take(self, limit):
        """[(datagram, address)]: after waiting up to the port's timeout for the first, every one
        already waiting, at most about `limit`."""
        if not self.blocking:
            return self.receive(limit) if self.wait(POLL) else []
        first = self._read(0)
        if first is None:
            return []
        return first + self.receive(limit - len(first))

    def receive(self, limit):
        """[(datagram, address)] already waiting, at most about `limit` datagrams."""
        out = []
        while len(out) < limit:
            got = self._read(self._flags)
            if got is None:
                break
            out.extend(got)
        return out

    def _read(self, flags):
        """The datagram(s) of one read (GRO: maybe several), or None when none came."""
        while True:
            try:
                if self.gro:
                    data, ancdata, _, address = self.sock.recvmsg(MAX_DATAGRAM, _GRO_SPACE, flags)
                else:
                    data, address = self.sock.recvfrom(MAX_DATAGRAM, flags)
                    ancdata = ()
            except BlockingIOError:  # nothing waiting; or, blocking, the receive timeout
                return None
            except _RECEIVE_NOISE:
                continue
            size = _gro_size(ancdata)
            if size and len(data) > size:
                return [(data[i:i + size], address) for i in range(0, len(data), size)]
            return [(data, address)]

    def send(self, datagrams, address):
        """Send to `address` (send_runs); (packets, bytes) sent.

        A full socket buffer loses the datagrams, as any UDP path would.
        """
        packets, size, _, self.gso = send_runs(self.sock, datagrams, self.gso, address, self._flags)
        return packets, size

    def close(self):
        try:
            if self._selector is not None:
                self._selector.close()
        finally:
            self.sock.close()


def _readable(sock, timeout):
    with selector() as one:
        one.register(sock, selectors.EVENT_READ)
        return one.select(timeout)


def _gro_size(ancdata):
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            # An int on every kernel so far; the low 16 bits hold the segment size.
            return struct.unpack("=i", data[:4])[0] if len(data) >= 4 else struct.unpack("=H", data[:2])[0]
    return 0
