"""The tunnel wire contract both sides import: the server (app/tunnel/) and the relay (docs/tunnel-protocol.md).

Datagram rules and the HTTP tunnel's batch framing.

A batch body is records back to back, nothing else::

    +-----------------------+------------------------+-----------------------+---
    | len: u16, big-endian  | datagram (len bytes)   | len                   | ...
    +-----------------------+------------------------+-----------------------+---

with 32 <= len <= 65,535: no WireGuard message is shorter than 32 bytes
(MIN_WIREGUARD), and a body of shorter records would be many more records
to walk for nothing (1 MiB of 1-byte records was 349,525 of them, 0.19 s of
the worker's one loop).  The same records fill each binary message of a
WebSocket session that negotiated the ``orbmesh.batch.v1`` subprotocol
(BATCH_PROTOCOL), at most MAX_BATCH_MESSAGE bytes a message.  It imports
only the standard library, so loading it from a web worker (app/tunnel/routes.py,
app/tunnel/sessions.py, app/tunnel/wsconn.py) loads no relay code.
"""
import struct

MAX_DATAGRAM = 65535
MIN_WIREGUARD = 32
SINGLE_TYPE = "application/octet-stream"
BATCH_TYPE = "application/x-wireguard-batch"
BATCH_PROTOCOL = "orbmesh.batch.v1"
# Room for one largest datagram and its prefix; a sender packs records until
# the next would pass it (about 45 full-size WireGuard data packets).
MAX_BATCH_MESSAGE = 2 + MAX_DATAGRAM

_LEN = struct.Struct("!H")


class FramingError(ValueError):
    """A batch body that does not parse; nothing of it may be used."""


def is_wireguard(datagram):
    """Type 1-4 (initiation, response, cookie, data), three zero bytes, >= 32 bytes.

    Checked so that a session can only ever make the server's WireGuard read
    WireGuard messages, not arbitrary bytes from the internet.
    """
    return (MIN_WIREGUARD <= len(datagram) <= MAX_DATAGRAM and 1 <= datagram[0] <= 4
            and datagram[1:4] == b"\x00\x00\x00")


def _framable(datagram):
    return MIN_WIREGUARD <= len(datagram) <= MAX_DATAGRAM


def decode_batch(body):
    """Split a batch body into datagrams, or raise FramingError.

    A record shorter than MIN_WIREGUARD refuses the whole body at once, so
    the cost of a body is bounded by its size / 34 records, each a datagram
    that may be WireGuard.
    """
    view = memoryview(body)
    out = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 2:
            raise FramingError("body ends inside a length prefix at byte %d" % offset)
        (length,) = _LEN.unpack_from(view, offset)
        offset += 2
        if length < MIN_WIREGUARD:
            raise FramingError("record of length %d at byte %d (a WireGuard message is at least %d bytes)"
                               % (length, offset - 2, MIN_WIREGUARD))
        if end - offset < length:
            raise FramingError("body ends inside a %d-byte record at byte %d" % (length, offset - 2))
        out.append(bytes(view[offset:offset + length]))
        offset += length
    return out


def encode_batch(datagrams):
    """A batch body of `datagrams`; one that decode_batch would refuse raises FramingError."""
    parts = []
    for datagram in datagrams:
        if not _framable(datagram):
            raise FramingError("datagram of %d bytes cannot be framed" % len(datagram))
        parts.append(_LEN.pack(len(datagram)))
        parts.append(datagram)
    return b"".join(parts)


def record_size(datagram):
    return 2 + len(datagram)


def pack_batches(datagrams, limit=MAX_BATCH_MESSAGE):
    """Batch bodies of at most `limit` bytes each, the datagrams in order."""
    bodies, parts, size = [], [], 0
    for datagram in datagrams:
        if not _framable(datagram):
            raise FramingError("datagram of %d bytes cannot be framed" % len(datagram))
        if parts and size + 2 + len(datagram) > limit:
            bodies.append(b"".join(parts))
            parts, size = [], 0
        parts.append(_LEN.pack(len(datagram)))
        parts.append(datagram)
        size += 2 + len(datagram)
    if parts:
        bodies.append(b"".join(parts))
    return bodies


# UDP segmentation offload (Linux 4.18+): one sendmsg() carries several
# datagrams of one size (the last may be shorter), and the kernel splits
# them; on loopback the split happens at the receiving socket, so one
# system call and one trip through the stack replace one per datagram.
UDP_SEGMENT = 103  # linux/udp.h; socket.UDP_SEGMENT is not in every Python
GSO_MAX_BYTES = 65000
GSO_MAX_SEGMENTS = 64


def gso_runs(datagrams):
    """(segment size, [datagrams]) runs, in order, that one UDP_SEGMENT send can carry each."""
    runs, run, size, total = [], [], 0, 0
    for datagram in datagrams:
        n = len(datagram)
        if run and n <= size and total + n <= GSO_MAX_BYTES and len(run) < GSO_MAX_SEGMENTS:
            run.append(datagram)
            total += n
            if n < size:  # a shorter one can only end a run
                runs.append((size, run))
                run = []
            continue
        if run:
            runs.append((size, run))
        run, size, total = [datagram], n, n
    if run:
        runs.append((size, run))
    return runs


def gso_control(size):
    """The ancillary data of a UDP_SEGMENT send with segments of `size` bytes."""
    return [(17, UDP_SEGMENT, struct.pack("=H", size))]  # 17: SOL_UDP
