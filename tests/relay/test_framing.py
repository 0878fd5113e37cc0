"""The datagram rules and HTTP batch framing the server and the relay share."""
import re
from pathlib import Path

import pytest

from orbmesh_relay.framing import (BATCH_TYPE, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, MAX_DATAGRAM, MIN_WIREGUARD,
                                   SINGLE_TYPE, FramingError, decode_batch, encode_batch, gso_runs, is_wireguard,
                                   pack_batches, record_size)

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
    assert encode_batch([b"a" * 32, b"c" * 33]) == b"\x00\x20" + b"a" * 32 + b"\x00\x21" + b"c" * 33
    assert encode_batch([bytes(258)]) == b"\x01\x02" + bytes(258)
    assert encode_batch([]) == b""


def test_round_trip_keeps_order_and_bytes():
    datagrams = [bytes(32), wg(1), wg(4, 1420), bytes(range(256)) * 3, b"\xff" * MAX_DATAGRAM]
    decoded = decode_batch(encode_batch(datagrams))
    assert decoded == datagrams
    assert all(type(d) is bytes for d in decoded)  # not views into the request body


def test_decode_accepts_bytearray_and_empty_body():
    assert decode_batch(bytearray(b"\x00\x20" + b"z" * 32)) == [b"z" * 32]
    assert decode_batch(b"") == []


GOOD = b"\x00\x20" + wg(4)  # one whole record of the smallest WireGuard message: 34 bytes


@pytest.mark.parametrize("body, where", [
    (b"\x00", "inside a length prefix at byte 0"),
    (GOOD + b"\x00", "inside a length prefix at byte 34"),
    (b"\x00\x00", "record of length 0 at byte 0"),
    (GOOD + b"\x00\x00" + GOOD, "record of length 0 at byte 34"),
    (b"\x00\x25abc", "inside a 37-byte record at byte 0"),
    (GOOD + b"\xff\xffabc", "inside a 65535-byte record at byte 34"),
    # Shorter than any WireGuard message (issue 23): refused, not split into records.
    (b"\x00\x01a", "record of length 1 at byte 0"),
    (GOOD + b"\x00\x1f" + wg(4)[:31], "record of length 31 at byte 34"),
    (b"\x00\x01a" * 10, "record of length 1 at byte 0"),
])
def test_broken_bodies_are_refused_whole(body, where):
    # A good record before the break must not come out either: the whole
    # body is refused, so nothing of it reaches WireGuard.
    with pytest.raises(FramingError, match=re.escape(where)):
        decode_batch(body)


def test_framing_error_is_a_value_error():
    assert issubclass(FramingError, ValueError)


@pytest.mark.parametrize("datagram", [b"", b"x", wg(4)[:31], bytes(MAX_DATAGRAM + 1)])
def test_unframeable_datagrams_are_refused(datagram):
    # What decode_batch refuses no sender may frame: not an empty datagram, not one shorter than the
    # smallest WireGuard message, not one over 65,535 bytes.
    with pytest.raises(FramingError, match="of %d bytes cannot be framed" % len(datagram)):
        encode_batch([wg(4), datagram])
    with pytest.raises(FramingError, match="of %d bytes cannot be framed" % len(datagram)):
        pack_batches([wg(4), datagram])


def test_a_megabyte_of_short_records_is_refused_at_the_first():
    """1 MiB of 1-byte records was 349,525 datagrams for the server's one loop to walk; now none."""
    body = b"\x00\x01a" * (1024 * 1024 // 3)
    with pytest.raises(FramingError, match="record of length 1 at byte 0"):
        decode_batch(body)
    # Control: the same size in whole WireGuard records decodes (the refusal is the length, not the size).
    records = decode_batch(encode_batch([wg(4)] * (1024 * 1024 // 34)))
    assert len(records) == 1024 * 1024 // 34 and records[0] == wg(4)


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


def test_the_module_says_first_that_it_is_the_wire_contract_both_sides_import():
    import orbmesh_relay.framing as module
    first = module.__doc__.splitlines()[0]
    assert "wire contract" in first and "server" in first and "relay" in first
    assert "wire contract" not in __doc__.splitlines()[0]  # the control: another first line does not pass
