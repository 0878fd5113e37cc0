import base64
import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from wghelper import validate
from wghelper.validate import Invalid

POOL = ipaddress.ip_network("10.8.0.0/16")
GATEWAY = ipaddress.ip_address("10.8.0.1")
POOL6 = ipaddress.ip_network("fd00:8::/64")
GATEWAY6 = ipaddress.ip_address("fd00:8::1")
POOLS = [(POOL, GATEWAY), (None, None)]        # IPv6 off
DUAL = [(POOL, GATEWAY), (POOL6, GATEWAY6)]


def b64(raw):
    return base64.b64encode(raw).decode()


KEY = b64(bytes(range(32)))
KEY2 = b64(bytes(range(1, 33)))


@pytest.mark.parametrize("value", [KEY, b64(b"\xff" * 32), b64(b"\x02" + b"\x00" * 31)])
def test_public_key_good(value):
    assert validate.public_key(value) == value


def test_low_order_points_and_own_keys_are_refused():
    assert len(validate.LOW_ORDER_KEYS) == 14 and b64(b"\x00" * 32) in validate.LOW_ORDER_KEYS
    for value in validate.LOW_ORDER_KEYS:
        with pytest.raises(Invalid, match="low-order"):
            validate.public_key(value, "k")
        with pytest.raises(ValueError, match="shared key"):  # what the name says: X25519 gives an all-zero secret
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(base64.b64decode(value)))
    mine, other = (b64(X25519PrivateKey.generate().public_key().public_bytes_raw()) for _ in range(2))
    with pytest.raises(Invalid, match="own key"):
        validate.public_key(mine, "k", own={mine})
    # Control: an ordinary key passes, and the exchange above works with it.
    assert validate.public_key(other, "k", own={mine}) == other
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(base64.b64decode(other)))


@pytest.mark.parametrize("value", [
    b64(b"x" * 31),                 # 31 bytes
    b64(b"x" * 33),                 # 33 bytes
    KEY[:-1],                       # no padding
    KEY[:-2] + "==",                # wrong padding
    "!" + KEY[1:],                  # not base64
    KEY.replace("A", "-", 1) if "A" in KEY else "-" + KEY[1:],  # urlsafe alphabet
    KEY[:-2] + "B=",                # last char carries non-zero spare bits
    " " + KEY,                      # not anchored
    KEY + "\n",
    "",
    None, 42, ["x"], b"x" * 44,
])
def test_public_key_bad(value):
    with pytest.raises(Invalid) as info:
        validate.public_key(value)
    assert info.value.field == "public_key"


def test_invalid_message_does_not_echo_the_value():
    secret = b64(b"s" * 31)
    with pytest.raises(Invalid) as info:
        validate.public_key(secret)
    assert secret not in str(info.value)
    assert secret[:10] not in str(info.value)


@pytest.mark.parametrize("values, expected", [
    (["10.8.0.42/32"], ["10.8.0.42/32"]),
    (["10.8.0.2/32", "10.8.255.254/32"], ["10.8.0.2/32", "10.8.255.254/32"]),
    (["10.8.1.%d/32" % i for i in range(8)], ["10.8.1.%d/32" % i for i in range(8)]),
])
def test_client_ips_good(values, expected):
    assert validate.peer({"public_key": KEY, "allowed_ips": values}, POOLS)["allowed_ips"] == expected


@pytest.mark.parametrize("values", [
    [],                                   # none
    ["10.8.1.%d/32" % i for i in range(9)],  # more than 8
    "10.8.0.42/32",                       # not a list
    ["10.9.0.42/32"],                     # outside the pool
    ["192.0.2.1/32"],
    ["10.8.0.0/32"],                      # network
    ["10.8.0.1/32"],                      # gateway
    ["10.8.255.255/32"],                  # broadcast
    ["10.8.0.42/24"],                     # not a host route
    ["10.8.0.0/24"],
    ["10.8.0.42"],                        # no prefix
    ["10.8.0.042/32"],                    # leading zero
    ["fd00:8::5/128"],                    # IPv6 is off
    ["10.8.0.42/32", "10.8.0.42/32"],     # duplicate
    [42], [None], ["10.8.0.42/32 "], ["10.8.0.42/32,10.8.0.43/32"],
])
def test_client_ips_bad(values):
    with pytest.raises(Invalid) as info:
        validate.peer({"public_key": KEY, "allowed_ips": values}, POOLS)
    assert info.value.field.startswith("peer.allowed_ips")


def test_dual_stack_peer_takes_a_128_inside_pool6():
    peer = validate.peer({"public_key": KEY, "allowed_ips": ["10.8.0.42/32", "fd00:8::0042/128"]}, DUAL)
    assert peer["allowed_ips"] == ["10.8.0.42/32", "fd00:8::42/128"]


@pytest.mark.parametrize("bad", [
    "fd00:8::/128",        # network
    "fd00:8::1/128",       # gateway6
    "fd00:9::5/128",       # outside pool6
    "2001:db8::5/128",
    "fd00:8::5/64",        # a /64: not a host route
    "fd00:8::/64",
    "::/0",
])
def test_dual_stack_peer_refuses_other_ipv6(bad):
    with pytest.raises(Invalid) as info:
        validate.peer({"public_key": KEY, "allowed_ips": ["10.8.0.42/32", bad]}, DUAL)
    assert info.value.field == "peer.allowed_ips[1]"
    # The IPv4 checks are unchanged beside an IPv6 pool.
    with pytest.raises(Invalid):
        validate.peer({"public_key": KEY, "allowed_ips": ["10.8.0.1/32"]}, DUAL)


@pytest.mark.parametrize("value", ["10.8.0.2", "10.8.255.254"])
def test_client_address_good(value):
    assert validate.client_address(value, POOL, GATEWAY, "address") == value


@pytest.mark.parametrize("value", ["10.8.0.1", "10.8.0.0", "10.9.0.2", "10.8.0.2/32", "", None, 7])
def test_client_address_bad(value):
    with pytest.raises(Invalid) as info:
        validate.client_address(value, POOL, GATEWAY, "address")
    assert info.value.field == "address"


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("192.0.2.1:51820", "192.0.2.1:51820"),
    ("192.0.2.1:1", "192.0.2.1:1"),
    ("192.0.2.1:65535", "192.0.2.1:65535"),
    ("[2001:db8::1]:51820", "[2001:db8::1]:51820"),
    ("[2001:DB8:0::1]:7", "[2001:db8::1]:7"),
])
def test_endpoint_good(value, expected):
    assert validate.endpoint(value) == expected


@pytest.mark.parametrize("value", [
    "example.com:51820", "localhost:51820", "vpn.example:1",   # hostnames
    "192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:99999",     # ports
    "192.0.2.1", "192.0.2.1:", ":51820", "192.0.2.256:1",
    "2001:db8::1:51820",                                      # v6 without brackets
    "[2001:db8::1%eth0]:1", "[fe80::1]", "[::1]:-1",
    "0.0.0.0:1", "224.0.0.1:1", "[::]:1",
    "0.1.2.3:1", "[::ffff:0.0.0.0]:1",                       # unspecified: as a destination, this host
    "127.0.0.1:22", "127.1.2.3:51820", "[::1]:51820", "[::ffff:127.0.0.1]:22",   # loopback: this host's services
    "255.255.255.255:1", "240.0.0.1:1", "[::ffff:255.255.255.255]:1",            # broadcast and reserved
    "[ff02::1]:1", "[::ffff:224.0.0.1]:1", "239.255.255.250:1900",               # multicast
    "192.0.2.1:51820 ", "192.0.2.1:51820\n", "192.0.2.1:5e3",
    42, ["192.0.2.1:1"], {"ip": "192.0.2.1"},
])
def test_endpoint_bad(value):
    with pytest.raises(Invalid):
        validate.endpoint(value)


@pytest.mark.parametrize("value, kind", [
    ("127.0.0.1:22", "loopback"), ("[::ffff:127.0.0.1]:22", "loopback"), ("[::1]:22", "loopback"),
    ("255.255.255.255:1", "broadcast"), ("[::ffff:255.255.255.255]:1", "broadcast"),
    ("224.0.0.1:1", "multicast"), ("[::ffff:224.0.0.1]:1", "multicast"),
    ("0.0.0.0:1", "unspecified"), ("[::]:1", "unspecified"), ("[::ffff:0.0.0.0]:1", "unspecified"),
])
def test_endpoint_that_is_no_other_host_says_why(value, kind):
    with pytest.raises(Invalid) as info:
        validate.endpoint(value, "peer.endpoint")
    assert info.value.field == "peer.endpoint" and kind in info.value.message


def test_last_endpoint_may_be_loopback_and_nothing_else_odd():
    """A tunnel client's last endpoint is the app's socket on loopback; the interface goes back there
    after it was lost (docs/operations.md, What survives what)."""
    assert validate.last_endpoint("127.0.0.1:40000") == "127.0.0.1:40000"
    assert validate.last_endpoint("[::1]:40000") == "[::1]:40000"
    assert validate.last_endpoint("198.51.100.7:41000") == "198.51.100.7:41000"
    for value in ("255.255.255.255:1", "224.0.0.1:1", "0.0.0.0:1", "[::]:1", "h:1"):
        with pytest.raises(Invalid):
            validate.last_endpoint(value)
    with pytest.raises(Invalid):  # the control: the same address as a configured endpoint is refused
        validate.endpoint("127.0.0.1:40000")
    assert validate.peer({"public_key": KEY, "allowed_ips": ["10.8.0.42/32"], "last_endpoint": "127.0.0.1:40000"},
                         POOLS)["last_endpoint"] == "127.0.0.1:40000"


@pytest.mark.parametrize("value", [0, 1, 25, 65535])
def test_keepalive_good(value):
    assert validate.keepalive(value) == value


@pytest.mark.parametrize("value", [True, False, -1, 65536, 25.0, "25", None])
def test_keepalive_bad(value):
    with pytest.raises(Invalid):
        validate.keepalive(value)


def test_peer_normalises_and_defaults():
    assert validate.peer({"public_key": KEY, "allowed_ips": ["10.8.0.42/32"]}, POOLS) == {
        "public_key": KEY, "allowed_ips": ["10.8.0.42/32"], "endpoint": None, "keepalive": 0, "last_endpoint": None}
    full = {"public_key": KEY, "allowed_ips": ["10.8.0.42/32"], "endpoint": "192.0.2.1:5", "keepalive": 25,
            "last_endpoint": "[2001:db8::1]:7"}
    assert validate.peer(dict(full, last_endpoint="[2001:DB8:0::1]:7"), POOLS) == full


@pytest.mark.parametrize("value, field", [
    ({"public_key": KEY, "allowed_ips": ["10.8.0.42/32"], "preshared_key": KEY}, "peer.preshared_key"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.42/32"], "allowed-ips": []}, "peer.allowed-ips"),
    ({"allowed_ips": ["10.8.0.42/32"]}, "peer.public_key"),
    ({"public_key": KEY}, "peer.allowed_ips"),
    ({"public_key": KEY, "allowed_ips": ["10.9.0.1/32"]}, "peer.allowed_ips[0]"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.2/32"], "keepalive": True}, "peer.keepalive"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.2/32"], "endpoint": "h:1"}, "peer.endpoint"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.2/32"], "last_endpoint": "0.0.0.0:1"}, "peer.last_endpoint"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.2/32"], "endpoint": "127.0.0.1:1"}, "peer.endpoint"),
    ({"public_key": KEY, "allowed_ips": ["10.8.0.2/32"], "last_endpoint": "255.255.255.255:1"}, "peer.last_endpoint"),
    ([KEY], "peer"),
])
def test_peer_bad(value, field):
    with pytest.raises(Invalid) as info:
        validate.peer(value, POOLS)
    assert info.value.field == field


def test_peers_good():
    peers = [{"public_key": KEY, "allowed_ips": ["10.8.0.2/32"]},
             {"public_key": KEY2, "allowed_ips": ["10.8.0.3/32"]}]
    assert [p["public_key"] for p in validate.peers(peers, POOLS)] == [KEY, KEY2]
    assert validate.peers([], POOLS) == []


@pytest.mark.parametrize("peers, field", [
    ([{"public_key": KEY, "allowed_ips": ["10.8.0.2/32"]},
      {"public_key": KEY, "allowed_ips": ["10.8.0.3/32"]}], "peers[1].public_key"),
    ([{"public_key": KEY, "allowed_ips": ["10.8.0.2/32"]},
      {"public_key": KEY2, "allowed_ips": ["10.8.0.2/32"]}], "peers[1].allowed_ips"),
    ({"public_key": KEY}, "peers"),
])
def test_peers_bad(peers, field):
    with pytest.raises(Invalid) as info:
        validate.peers(peers, POOLS)
    assert info.value.field == field


def test_peers_limit(monkeypatch):
    many = [{"public_key": b64(i.to_bytes(4, "big") * 8), "allowed_ips": ["10.8.1.%d/32" % i]}
            for i in range(1, 4)]
    assert len(validate.peers(many, POOLS)) == 3
    monkeypatch.setattr(validate, "MAX_PEERS", 2)
    with pytest.raises(Invalid) as info:
        validate.peers(many, POOLS)
    assert info.value.message == "must hold 0 to 2 peers"


def test_key_list():
    assert validate.key_list([KEY, KEY2], "remove") == [KEY, KEY2]
    assert validate.key_list([], "remove") == []
    for bad in ([KEY, KEY], [KEY, "x"], KEY, [None]):
        with pytest.raises(Invalid) as info:
            validate.key_list(bad, "remove")
        assert info.value.field.startswith("remove")
    with pytest.raises(Invalid):
        validate.key_list([KEY, KEY2], "remove", high=1)


def test_scope_ids_never_pass():
    """ipaddress keeps a scope id ("fd00::5%a"), and such an address equals none of the reserved ones."""
    refused = [(validate.client_ip, "fd00:8::5%a/128", DUAL, "f"),
               (validate.client_ip, "fd00:8::1%eth0/128", DUAL, "f"),   # the gateway, disguised
               (validate.client_address, "fd00:8::1%1", POOL6, GATEWAY6, "f"),
               (validate.endpoint, "[fd00::5%a]:51820"),
               (validate.tunnel_address, "10.9.0.1%a", [ipaddress.ip_network("10.9.0.0/16")])]
    for check, *args in refused:
        with pytest.raises(Invalid):
            check(*args)
    # Control: the same values without the scope id.
    assert validate.client_ip("fd00:8::5/128", DUAL, "f") == "fd00:8::5/128"
    assert validate.client_address("fd00:8::5", POOL6, GATEWAY6, "f") == "fd00:8::5"
    assert validate.endpoint("[fd00::5]:51820") == "[fd00::5]:51820"
    assert validate.tunnel_address("10.9.0.1", [ipaddress.ip_network("10.9.0.0/16")]) == "10.9.0.1"


# --- usage and limits ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["u", "user-1", "a" * 128, "orb:1@x.y_z-"])
def test_user_good(value):
    assert validate.user(value) == value


@pytest.mark.parametrize("value", ["", "a" * 129, "u 1", "u\n", "u;drop", "ü", None, 7, ["u"]])
def test_user_bad(value):
    with pytest.raises(Invalid):
        validate.user(value)


@pytest.mark.parametrize("value, ok", [(None, True), (1, True), (100000, True), (0, False), (100001, False),
                                       (-20, False), (20.0, False), ("20", False), (True, False)])
def test_rate_mbps(value, ok):
    if ok:
        assert validate.rate_mbps(value) == value
    else:
        with pytest.raises(Invalid):
            validate.rate_mbps(value)


@pytest.mark.parametrize("value, ok", [(None, True), (0, True), (10 ** 15, True), (10 ** 15 + 1, False),
                                       (-1, False), (1e9, False), (False, False)])
def test_quota_bytes(value, ok):
    if ok:
        assert validate.quota_bytes(value) == value
    else:
        with pytest.raises(Invalid):
            validate.quota_bytes(value)


def test_host_address():
    pools = [(ipaddress.ip_network("10.8.0.0/16"), ipaddress.ip_address("10.8.0.1")),
             (ipaddress.ip_network("fd00:8::/64"), ipaddress.ip_address("fd00:8::1"))]
    assert validate.host_address("10.8.0.2", pools, "a") == "10.8.0.2"
    assert validate.host_address("FD00:8::00aa", pools, "a") == "fd00:8::aa"
    for bad in ("10.8.0.1", "10.8.255.255", "10.9.0.2", "fd00:8::1", "fd00:9::2", "10.8.0.2/32", "fd00:8::2%eth0",
                "", None, 3):
        with pytest.raises(Invalid):
            validate.host_address(bad, pools, "a")


def test_seconds_mark_and_boot_id():
    assert validate.seconds_mark(5, "t") == 5.0
    for bad in (-1, float("nan"), float("inf"), True, "5", 2 ** 53):
        with pytest.raises(Invalid):
            validate.seconds_mark(bad, "t")
    boot = "12345678-aaaa-bbbb-cccc-1234567890ab"
    assert validate.boot_id(boot) == boot
    for bad in (boot.upper(), boot + "\n", boot[:-1], "", None):
        with pytest.raises(Invalid):
            validate.boot_id(bad)


def _client_ip_by_ipaddress(value, pools):
    """client_ip as it was before its integer fast path: the reference the fast path must agree with."""
    net = ipaddress.ip_network(value, strict=True)
    pool, gateway = next((p for p in pools if p[0] is not None and p[0].version == net.version), pools[0])
    if net.version != pool.version or net.prefixlen != net.max_prefixlen or net.network_address not in pool or \
            net.network_address in (pool.network_address, gateway, pool.broadcast_address):
        raise ValueError(value)
    return str(net)


def test_client_ip_fast_path_agrees_with_ipaddress():
    """A sync of 60,000 peers is checked by integers (bench/recovery.py); the answer must be the same,
    the normalised string included, for canonical, non-canonical, reserved and outside addresses."""
    import random
    rng = random.Random(27)
    pools = [(ipaddress.ip_network("10.8.0.0/16"), ipaddress.ip_address("10.8.0.1")),
             (ipaddress.ip_network("fd00:8:0:0::/64"), ipaddress.ip_address("fd00:8::1"))]
    values = ["10.8.0.0/32", "10.8.0.1/32", "10.8.255.255/32", "10.8.0.2/32", "10.8.0.02/32", "10.9.0.2/32",
              "10.8.0.2/31", "fd00:8::/128", "fd00:8::1/128", "fd00:8::2/128", "FD00:8::2/128", "fd00:8:0::2/128",
              "fd00:8::0:2/128", "fd00:8::ffff:ffff:ffff:ffff/128", "fd00:9::2/128", "fd00:8::2/127",
              "fd00:8::1.2.3.4/128", "::ffff:10.8.0.2/128", "10.8.0.2/032", " 10.8.0.2/32", "10.8.0.2/32 "]
    for _ in range(3000):
        values.append("10.8.%d.%d/32" % (rng.randrange(256), rng.randrange(256)))
        low = [rng.choice((0, 0, 0, 1, rng.randrange(65536))) for _ in range(4)]
        values.append("%s/128" % ipaddress.IPv6Address((int(pools[1][0].network_address) | int.from_bytes(
            b"".join(x.to_bytes(2, "big") for x in low), "big"))))
        values.append("fd00:8:0:0:%x:%x:%x:%x/128" % tuple(low))  # often not canonical
    for value in values:
        try:
            want = _client_ip_by_ipaddress(value, pools)
        except ValueError:
            with pytest.raises(Invalid):
                validate.client_ip(value, pools, "f")
            continue
        assert validate.client_ip(value, pools, "f") == want, value
