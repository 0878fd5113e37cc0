"""Datagram rules and the HTTP tunnel's batch framing (docs/tunnel-protocol.md).

A batch body is records back to back, nothing else::

    +-----------------------+------------------------+-----------------------+---
    | len: u16, big-endian  | datagram (len bytes)   | len                   | ...
    +-----------------------+------------------------+-----------------------+---

with 1 <= len <= 65,535.  The one module the server (app/tunnel.py,
app/sessions.py, ...) shares with the client relay: it imports only the
standard library, so loading it from a web worker loads no relay code.
"""
import struct

MAX_DATAGRAM = 65535
MIN_WIREGUARD = 32
SINGLE_TYPE = "application/octet-stream"
BATCH_TYPE = "application/x-wireguard-batch"

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


def decode_batch(body):
    """Split a batch body into datagrams, or raise FramingError."""
    view = memoryview(body)
    out = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 2:
            raise FramingError("body ends inside a length prefix at byte %d" % offset)
        (length,) = _LEN.unpack_from(view, offset)
        offset += 2
        if length == 0:
            raise FramingError("record of length 0 at byte %d" % (offset - 2))
        if end - offset < length:
            raise FramingError("body ends inside a %d-byte record at byte %d" % (length, offset - 2))
        out.append(bytes(view[offset:offset + length]))
        offset += length
    return out


def encode_batch(datagrams):
    parts = []
    for datagram in datagrams:
        if not 1 <= len(datagram) <= MAX_DATAGRAM:
            raise FramingError("datagram of %d bytes cannot be framed" % len(datagram))
        parts.append(_LEN.pack(len(datagram)))
        parts.append(datagram)
    return b"".join(parts)


def record_size(datagram):
    return 2 + len(datagram)
