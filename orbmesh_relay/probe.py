"""UDP probes: does UDP to the node work both ways, without touching WireGuard?

The relay must not send the client's WireGuard datagrams over UDP until UDP
is proven: the node's WireGuard moves a peer's endpoint to the source of
its latest authenticated datagram, so one datagram that gets there over a
path whose answers are lost would take the session off the working
transport.  So the relay asks a small echo the node's app serves beside
WireGuard (ORBMESH_PROBE_PORT), from the very socket it would send
WireGuard's datagrams from.  Shared by the relay (udp.py) and the server
(app/api/probe.py); standard library only.

A device gets a ticket and a key over HTTPS (POST /wireguard/probe).  The
server keeps no state: key = HMAC-SHA256(server secret, KEY_LABEL + ticket),
so any instance sharing the secret can check any probe.  Request and reply
are both SIZE bytes, so the echo never sends more than it got::

    request                                  reply
    0   4  magic "OMP1"                      0   4  magic "OMP1"
    4   1  kind 1                            4   1  kind 2
    5   3  zero                              5   1  address family seen: 4 or 6
    8  20  ticket (expiry u32 + 16 random)   6   2  source port seen (big-endian)
    28  8  nonce (the relay's, echoed)       8  16  source address seen (IPv4: first 4)
    36  8  sent at, ms since the epoch       24  8  nonce
    44  4  zero                              32 16  zero
    48 16  HMAC-SHA256(key, bytes 0-47)[:16] 48 16  HMAC-SHA256(key, bytes 0-47)[:16]

The server answers only a request of exactly SIZE bytes whose ticket has
not expired, whose send time is within WINDOW seconds of its clock and
whose MAC is right: it is no open reflector, and a captured probe replayed
from elsewhere is answered at most 1:1 and only for WINDOW seconds.
"""
import hashlib
import hmac
import ipaddress
import os
import struct
import time

MAGIC = b"OMP1"
REQUEST, REPLY = 1, 2
SIZE = 64
TICKET_SIZE = 20
KEY_LABEL = b"orbmesh-probe-key-v1"
TICKET_TTL = 3600  # seconds a ticket is good for
WINDOW = 30.0  # seconds between a probe's send time and the server's clock
_REQUEST = struct.Struct("!4sB3x20s8sQ4x")
_REPLY = struct.Struct("!4sBBH16s8s16x")
_MAC = 16


def _mac(key, body):
    return hmac.new(key, body, hashlib.sha256).digest()[:_MAC]


def key_for(secret, ticket):
    return hmac.new(secret, KEY_LABEL + ticket, hashlib.sha256).digest()


def new_ticket(secret, now=None, ttl=TICKET_TTL):
    """(ticket, key) for one device, good for `ttl` seconds."""
    now = time.time() if now is None else now
    ticket = struct.pack("!I", int(now + ttl)) + os.urandom(TICKET_SIZE - 4)
    return ticket, key_for(secret, ticket)


def ticket_expiry(ticket):
    return struct.unpack("!I", ticket[:4])[0]


def request(ticket, key, nonce, now=None):
    """One probe: SIZE bytes."""
    now = time.time() if now is None else now
    body = _REQUEST.pack(MAGIC, REQUEST, ticket, nonce, int(now * 1000))
    return body + _mac(key, body)


def answer(data, source, secret, now=None):
    """The reply to a probe from `source` ((host, port, ...)), or None for anything else."""
    if len(data) != SIZE:
        return None
    body, mac = data[:SIZE - _MAC], data[SIZE - _MAC:]
    magic, kind, ticket, nonce, sent_ms = _REQUEST.unpack(body)
    now = time.time() if now is None else now
    if magic != MAGIC or kind != REQUEST or ticket_expiry(ticket) < now or abs(now - sent_ms / 1000) > WINDOW:
        return None
    key = key_for(secret, ticket)
    if not hmac.compare_digest(_mac(key, body), mac):
        return None
    address = ipaddress.ip_address(source[0].split("%")[0])
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    reply = _REPLY.pack(MAGIC, REPLY, address.version, source[1], address.packed.ljust(16, b"\0"), nonce)
    return reply + _mac(key, reply)


def parse_reply(data, key):
    """(nonce, (address, port) the server saw) of a genuine reply, or None."""
    if len(data) != SIZE:
        return None
    body, mac = data[:SIZE - _MAC], data[SIZE - _MAC:]
    if not hmac.compare_digest(_mac(key, body), mac):
        return None
    magic, kind, family, port, packed, nonce = _REPLY.unpack(body)
    if magic != MAGIC or kind != REPLY or family not in (4, 6):
        return None
    address = ipaddress.ip_address(packed[:4] if family == 4 else packed)
    return nonce, (str(address), port)
