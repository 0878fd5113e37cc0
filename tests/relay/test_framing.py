"""The datagram rules and HTTP batch framing the server and the relay share."""
import re
from pathlib import Path

import pytest

from orbmesh_relay.framing import (BATCH_TYPE, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, MAX_DATAGRAM, MIN_WIREGUARD,
                                   SINGLE_TYPE, FramingError, decode_batch, encode_batch, gso_runs, is_wireguard,
                                   record_size)

ROOT = Path(__file__).resolve().parents[2]


def wg(kind=4, size=32):
    return bytes([kind, 0, 0, 0]) + bytes(size - 4)


@pytest.mark.parametrize("datagram", [wg(1), wg(2), wg(3), wg(4), wg(4, 1420), wg(4, MAX_DATAGRAM)])
def test_wireguard_datagrams_pass(datagram):
    assert is_wireguard(datagram)


@pytest.mark.parametrize("datagram", [
    wg(4, 31),  # one byte short of the smallest message
    wg(4, MAX_DATAGRAM + 1),
    wg(0), wg(5), wg(255),  # no such message type
    b"\x04\x01\x00\x00" + bytes(28),  # reserved bytes must be zero
    b"\x04\x00\x00\x01" + bytes(28),
    b"",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n......",
])
def test_other_bytes_do_not(datagram):
    assert not is_wireguard(datagram)


def test_limits():
    assert (MIN_WIREGUARD, MAX_DATAGRAM) == (32, 65535)


def test_encoding_is_length_prefixed_big_endian():
    assert encode_batch([b"ab", b"c"]) == b"\x00\x02ab\x00\x01c"
    assert encode_batch([bytes(258)]) == b"\x01\x02" + bytes(258)
    assert encode_batch([]) == b""


def test_round_trip_keeps_order_and_bytes():
    datagrams = [b"x", wg(1), wg(4, 1420), bytes(range(256)) * 3, b"\xff" * MAX_DATAGRAM]
    decoded = decode_batch(encode_batch(datagrams))
    assert decoded == datagrams
    assert all(type(d) is bytes for d in decoded)  # not views into the request body


def test_decode_accepts_bytearray_and_empty_body():
    assert decode_batch(bytearray(b"\x00\x01z")) == [b"z"]
    assert decode_batch(b"") == []


@pytest.mark.parametrize("body, where", [
    (b"\x00", "inside a length prefix at byte 0"),
    (b"\x00\x01a\x00", "inside a length prefix at byte 3"),
    (b"\x00\x00", "record of length 0 at byte 0"),
    (b"\x00\x01a\x00\x00\x00\x01b", "record of length 0 at byte 3"),
    (b"\x00\x05abc", "inside a 5-byte record at byte 0"),
    (b"\x00\x01a\xff\xffabc", "inside a 65535-byte record at byte 3"),
])
def test_broken_bodies_are_refused_whole(body, where):
    # A good record before the break must not come out either: the whole
    # body is refused, so nothing of it reaches WireGuard.
    with pytest.raises(FramingError, match=re.escape(where)):
        decode_batch(body)


def test_framing_error_is_a_value_error():
    assert issubclass(FramingError, ValueError)


@pytest.mark.parametrize("datagram", [b"", bytes(MAX_DATAGRAM + 1)])
def test_unframeable_datagrams_are_refused(datagram):
    with pytest.raises(FramingError, match="%d bytes cannot be framed" % len(datagram)):
        encode_batch([b"fine", datagram])


def test_record_size():
    assert record_size(b"") == 2
    assert record_size(wg(4, 100)) == 102
    assert record_size(wg(4, 100)) == len(encode_batch([wg(4, 100)]))


def test_content_types_are_the_documented_ones():
    assert (SINGLE_TYPE, BATCH_TYPE) == ("application/octet-stream", "application/x-wireguard-batch")
    protocol = (ROOT / "docs" / "tunnel-protocol.md").read_text()
    assert "**Single** (`%s`)" % SINGLE_TYPE in protocol
    assert "**Batch** (`%s`)" % BATCH_TYPE in protocol


def test_gso_runs_group_equal_sizes_and_let_a_shorter_one_end_a_run():
    a, b, c = bytes(1400), bytes(100), bytes(1500)
    runs = gso_runs([a, a, a, b, a, c, c, a])
    assert runs == [(1400, [a, a, a, b]), (1400, [a]), (1500, [c, c, a])]
    assert [d for _, run in runs for d in run] == [a, a, a, b, a, c, c, a]


def test_gso_runs_stay_within_the_kernels_limits():
    runs = gso_runs([bytes(1000)] * 200)
    assert all(len(run) <= GSO_MAX_SEGMENTS and sum(map(len, run)) <= GSO_MAX_BYTES for _, run in runs)
    assert sum(len(run) for _, run in runs) == 200
