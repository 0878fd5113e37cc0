"""The UDP probe's wire format, as both the relay and the server's echo use it."""
import os
import struct

import pytest

from orbmesh_relay import probe

SECRET = os.urandom(32)
NOW = 1_800_000_000.0
SOURCE = ("198.51.100.7", 40000)


def request(now=NOW, sent_at=None, secret=SECRET):
    ticket, key = probe.new_ticket(secret, now)
    nonce = os.urandom(8)
    return probe.request(ticket, key, nonce, now if sent_at is None else sent_at), key, nonce


def test_a_probe_is_answered_with_what_the_server_saw():
    data, key, nonce = request()
    assert len(data) == probe.SIZE
    reply = probe.answer(data, SOURCE, SECRET, now=NOW)
    assert reply is not None and len(reply) <= len(data)  # never more than it got: no amplification
    assert probe.parse_reply(reply, key) == (nonce, SOURCE)


@pytest.mark.parametrize("source, seen", [
    (("::ffff:198.51.100.7", 9, 0, 0), ("198.51.100.7", 9)),  # a dual-stack socket's view of IPv4
    (("2001:db8::7", 51000, 0, 0), ("2001:db8::7", 51000)),
])
def test_the_reply_names_the_source_in_its_own_family(source, seen):
    data, key, nonce = request()
    assert probe.parse_reply(probe.answer(data, source, SECRET, now=NOW), key) == (nonce, seen)


def test_anything_but_a_good_probe_gets_no_answer():
    data, key, _ = request()
    assert probe.answer(data, SOURCE, SECRET, now=NOW)  # control: the untouched probe is answered
    refused = {
        "wrong secret": probe.answer(data, SOURCE, os.urandom(32), now=NOW),
        "short": probe.answer(data[:-1], SOURCE, SECRET, now=NOW),
        "long": probe.answer(data + b"\0", SOURCE, SECRET, now=NOW),
        "empty": probe.answer(b"", SOURCE, SECRET, now=NOW),
        "expired ticket": probe.answer(data, SOURCE, SECRET, now=NOW + probe.TICKET_TTL + 1),
        "sent too long ago": probe.answer(data, SOURCE, SECRET, now=NOW + probe.WINDOW + 1),
        "sent in the future": probe.answer(data, SOURCE, SECRET, now=NOW - probe.WINDOW - 1),
    }
    for offset in range(probe.SIZE):  # any byte changed, MAC included
        bad = bytearray(data)
        bad[offset] ^= 0x01
        refused["byte %d" % offset] = probe.answer(bytes(bad), SOURCE, SECRET, now=NOW)
    assert {name for name, reply in refused.items() if reply is not None} == set()


def test_a_reply_cannot_pass_for_a_request_or_the_reverse():
    data, key, _ = request()
    reply = probe.answer(data, SOURCE, SECRET, now=NOW)
    assert probe.answer(reply, SOURCE, SECRET, now=NOW) is None
    assert probe.parse_reply(data, key) is None
    assert probe.parse_reply(reply, key) is not None  # control
    assert probe.parse_reply(reply, os.urandom(32)) is None  # someone else's key


def test_the_key_follows_from_secret_and_ticket_alone():
    ticket, key = probe.new_ticket(SECRET, NOW)
    assert len(ticket) == probe.TICKET_SIZE and len(key) == 32
    assert probe.key_for(SECRET, ticket) == key  # any instance with the secret can check any probe
    assert probe.ticket_expiry(ticket) == int(NOW + probe.TICKET_TTL)
    other, _ = probe.new_ticket(SECRET, NOW)
    assert other != ticket  # random part


def test_layout_is_as_documented():
    data, key, nonce = request()
    assert data[:4] == b"OMP1" and data[4] == probe.REQUEST and data[5:8] == b"\0\0\0"
    assert data[28:36] == nonce and struct.unpack("!Q", data[36:44])[0] == int(NOW * 1000)
    reply = probe.answer(data, SOURCE, SECRET, now=NOW)
    assert reply[:4] == b"OMP1" and reply[4] == probe.REPLY and reply[5] == 4
    assert struct.unpack("!H", reply[6:8])[0] == SOURCE[1] and reply[8:12] == bytes([198, 51, 100, 7])
    assert reply[24:32] == nonce
