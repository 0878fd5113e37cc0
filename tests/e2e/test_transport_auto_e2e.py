"""orbmesh-relay --transport auto (and every fixed transport) through a middlebox, with real WireGuard.

The lab is tests/e2e/middlebox.py: a client with two links, a router whose
nftables rules block UDP or pass only plain HTTP POSTs, the node.  Real
wireguard-go clients ping the gateway through their own relay; what is
asserted is what a client sees (when the first ping answers, the longest
gap in a 20-per-second ping, the transport the relay's JSON status names)
and, on the node, that the WireGuard session is the same one (its latest
handshake unchanged).  Every probe that must fail has a control that must
succeed in the same test.  The bounds are the issue's (issue 24).
"""
import json
import subprocess
import time

import pytest

from .conftest import requirements
from .middlebox import GATEWAY, LINK_B, Lab
from .netns import stop_process
from .stack import wait_for

pytestmark = pytest.mark.e2e
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
# WireGuard's initiator rekeys after 120 s of a session: a handshake then is WireGuard's own, not ours.
REKEY = 120


@pytest.fixture
def lab(netns, tmp_path):
    requirements("nft")
    built = Lab(netns, tmp_path)
    try:
        built.start()
        built.start_echo()
        yield built
    finally:
        built.close()


def first_reply(client, started, timeout=30):
    replies = wait_for(lambda: client.pinger.replies, timeout=timeout, what="a first ping reply (log: %s)"
                       % client.log_tail())
    return replies[0] - started


def switch_to(client, transport, after):
    """The first switch to `transport` recorded at or after `after` (unix time), from the relay's status."""
    for switch in client.status().get("switches", []):
        if switch["to"] == transport and switch["at"] >= after:
            return switch
    return None


# --- connect fast ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_udp_open_connects_over_udp_within_a_second(lab, family):
    client = lab.client_through_relay("auto", "open-%d" % family, family=family)
    started = client.start_relay()
    client.start_pinging()
    first = first_reply(client, started)
    status = client.on("udp")
    on_udp = status["switches"][0]["at"] - started
    assert status["switches"][0]["from"] is None and status["switch_count"] == 1
    assert on_udp <= 1.0, "on UDP %.2f s after the WireGuard client was up (%.2f s after the relay listened)" % (
        on_udp, status["switches"][0]["at"] - client.listening_at)
    assert first <= 1.0, "first ping after %.2f s" % first
    assert client.handshake() > 0
    # The node sees the client's own address: UDP really goes straight to WireGuard.
    endpoints = lab.server.run("wg", "show", lab.stack.interface, "endpoints").stdout
    assert ("198.51.100.2:" if family == 4 else "[2001:db8:a::2]:") in endpoints


def test_on_udp_the_relay_carries_the_transfers_wireguard_sends_it(lab):
    """iperf3 through one WireGuard client whose endpoint alternates between the node and the relay.

    The issue's "within 5 % of WireGuard talking UDP directly" is a speed target: bench/transport_auto.py
    measures it (median of paired runs) and reports it; here every run through the relay must carry
    data while the relay stays on UDP (no switch), as the direct runs beside it do.
    """
    requirements("iperf3")
    client = lab.client_through_relay("auto", "throughput")
    client.start_relay()
    client.start_pinging()
    client.on("udp")
    client.pinger.stop()
    up_before = client.status()["up_bytes"]
    pairs = client.relay_and_direct_mbps(pairs=2)
    assert all(direct > 0 and relay > 0 for direct, relay in pairs), pairs
    # The relay's runs went through the relay (its status file is written every second).
    wait_for(lambda: client.status()["up_bytes"] - up_before > 1_000_000, timeout=5, what="relay bytes")
    status = client.status()
    assert status["transport"] == "udp" and status["switch_count"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_blocked_first_ping_within_two_seconds_over_websocket(lab, family):
    lab.block("udp")
    assert not lab.udp_passes(family)  # the block holds ...
    assert lab.api("GET", family) == 200  # ... and the API is reachable (control)
    client = lab.client_through_relay("auto", "noudp-%d" % family, family=family)
    started = client.start_relay()
    client.start_pinging()
    first = first_reply(client, started)
    assert first <= 2.0, "first ping after %.2f s" % first
    assert client.on("ws")["switches"][0]["to"] == "ws"


@pytest.mark.parametrize("family", FAMILIES)
def test_only_http_posts_pass_first_ping_within_four_seconds_over_http(lab, family):
    lab.block("udp", "get")
    assert not lab.udp_passes(family) and lab.api("GET", family) is None  # no UDP, no GET (the upgrade) ...
    assert lab.api("POST", family) == 401  # ... but a plain POST is answered (control)
    client = lab.client_through_relay("auto", "postonly-%d" % family, family=family)
    started = client.start_relay()
    client.start_pinging()
    first = first_reply(client, started)
    assert first <= 4.0, "first ping after %.2f s" % first
    assert client.on("http")["switches"][0]["to"] == "http"


# --- fall back mid-session, and move back ------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_udp_blocked_during_a_transfer_resumes_over_websocket_in_the_same_session(lab, family):
    client = lab.client_through_relay("auto", "fallback-%d" % family, family=family)
    client.start_relay()
    pinger = client.start_pinging()
    client.on("udp")
    handshake = client.handshake()
    iperf_server = lab.server.popen(["iperf3", "-s", "-1", "-B", GATEWAY, "-p", "5202"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        iperf = lab.client.popen(["iperf3", "-c", GATEWAY, "-p", "5202", "-t", "8", "-i", "1", "-J"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(3)
        blocked_at = time.time()
        lab.block("udp")
        assert not lab.udp_passes(family)
        out, _ = iperf.communicate(timeout=60)
    finally:
        stop_process(iperf_server)
    done = time.time()
    wait_for(lambda: pinger.flowing_since(done), what="pings after the transfer")
    gap = pinger.longest_gap(blocked_at, time.time())
    assert gap <= 2.0, "pings stopped for %.2f s" % gap
    assert switch_to(client, "ws", blocked_at)["reason"].startswith("no answer over udp")
    assert client.handshake() == handshake, "a new WireGuard handshake"
    # The transfer went on over the WebSocket: its last seconds carried data.
    intervals = json.loads(out)["intervals"]
    assert all(i["sum"]["bytes"] > 0 for i in intervals[-2:]), [i["sum"]["bytes"] for i in intervals]


@pytest.mark.parametrize("family", FAMILIES)
def test_back_on_udp_within_30_s_of_the_unblock_without_loss_or_a_new_handshake(lab, family):
    lab.block("udp")
    client = lab.client_through_relay("auto", "moveback-%d" % family, family=family)
    client.start_relay()
    pinger = client.start_pinging()
    client.on("ws")
    wait_for(lambda: pinger.flowing_since(time.time() - 1), what="pings over ws")
    handshake = client.handshake()
    time.sleep(2)
    assert not lab.udp_passes(family)
    unblocked_at = time.time()
    lab.block()
    assert lab.udp_passes(family)
    client.on("udp", timeout=40)
    switch = switch_to(client, "udp", unblocked_at)
    assert switch["from"] == "ws" and switch["reason"].startswith("udp answers again")
    assert switch["at"] - unblocked_at <= 30, "back on UDP %.1f s after the unblock" % (switch["at"] - unblocked_at)
    time.sleep(3)
    gap = pinger.longest_gap(switch["at"] - 1, time.time())
    assert gap <= 1.0, "%.2f s without pings around the move back" % gap
    assert client.handshake() == handshake, "a new WireGuard handshake"
    endpoints = lab.server.run("wg", "show", lab.stack.interface, "endpoints").stdout
    assert "127.0.0.1" not in endpoints  # the node now sends straight over UDP, not to the tunnel's socket


def test_a_flapping_udp_path_does_not_make_the_relay_flap(lab):
    client = lab.client_through_relay("auto", "flap")
    client.start_relay()
    pinger = client.start_pinging()
    client.on("udp")
    handshake, first_handshake_at = client.handshake(), time.time()
    toggles, period, started = 0, 3.0, time.time()
    while time.time() - started < 45:
        lab.block(*(["udp"] if toggles % 2 == 0 else []))
        toggles += 1
        time.sleep(period)
    lab.block()
    status = client.status()
    switches = status["switch_count"] - 1  # the first was the connect
    assert toggles == 15
    assert switches <= 4, "%d switches for %d toggles: %s" % (switches, toggles, status["switches"])
    assert pinger.longest_gap(started, started + 45) <= 2.0  # it kept carrying while it held still
    # Control: it is not stuck; with UDP open for good it comes back (flaps lengthen the wait).
    client.on("udp", timeout=150)
    if time.time() - first_handshake_at < REKEY - 5:
        assert client.handshake() == handshake


# --- the network changes under it ----------------------------------------------------------------

@pytest.mark.parametrize("udp", ["udp-open", "udp-blocked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_transport_resumes_within_2_s_when_the_link_goes_away(lab, family, udp):
    """A laptop leaves Wi-Fi for a phone's hotspot: link A and its address go, link B takes over."""
    if udp == "udp-blocked":
        lab.block("udp")
    transports = ["ws", "http", "auto"] + (["udp"] if udp == "udp-open" else [])
    clients = {t: lab.client_through_relay(t, "move-%s-%d-%s" % (t, family, udp), family=family)
               for t in transports}
    for client in clients.values():
        client.start_relay()
        client.start_pinging()
    for transport, client in clients.items():
        wait_for(lambda: client.pinger.flowing_since(time.time() - 1), what="pings over %s" % transport)
    expected = {"ws": "ws", "http": "http", "udp": "udp", "auto": "udp" if udp == "udp-open" else "ws"}
    assert {t: c.status()["transport"] for t, c in clients.items()} == {t: expected[t] for t in transports}
    handshakes = {t: c.handshake() for t, c in clients.items()}
    old = lab.tcp_connection(family)
    old.sendall(b"before")
    assert old.recv(64) == b"before"
    switched = time.time()
    lab.switch_links()
    done = time.time()
    for transport, client in clients.items():
        wait_for(lambda: client.pinger.flowing_since(done), timeout=60, what="pings over %s after the switch (log: %s)"
                 % (transport, client.log_tail()))
    end = time.time()
    gaps = {t: round(c.pinger.longest_gap(switched, end), 2) for t, c in clients.items()}
    assert all(gap <= 2.0 for gap in gaps.values()), gaps
    assert {t: c.handshake() for t, c in clients.items()} == handshakes
    # What the relays beat: a TCP connection from the old address just hangs ...
    old.settimeout(3)
    old.sendall(b"after")
    with pytest.raises(OSError):
        old.recv(64)
    old.close()
    # ... while one opened now works (control), and the node sees UDP clients at their new address.
    fresh = lab.tcp_connection(family)
    fresh.sendall(b"now")
    assert fresh.recv(64) == b"now"
    fresh.close()
    if udp == "udp-open":
        endpoints = lab.server.run("wg", "show", lab.stack.interface, "endpoints").stdout
        new = LINK_B["client4"] if family == 4 else "[%s]" % LINK_B["client6"]
        assert endpoints.count(new + ":") == 2, endpoints  # the udp and the auto relay's socket


# --- every transport with the Linux-only paths off ---------------------------------------------

def test_every_transport_works_with_the_linux_only_paths_off(lab):
    """ORBMESH_RELAY_PORTABLE=1: no GSO/GRO, select() instead of epoll, as on macOS and Windows."""
    clients = {t: lab.client_through_relay(t, "portable-%s" % t, env={"ORBMESH_RELAY_PORTABLE": "1"})
               for t in ("udp", "ws", "http", "auto")}
    for client in clients.values():
        client.start_relay()
        client.start_pinging()
    for transport, client in clients.items():
        client.on("udp" if transport == "auto" else transport)
        wait_for(lambda: client.pinger.flowing_since(time.time() - 1), what="pings over %s" % transport)
    for transport, client in clients.items():
        for direction in ("up", "down"):
            sent, got = client.transfer(direction)
            assert sent == got, "%s transfer over %s arrived corrupted" % (direction, transport)
        carried = "udp" if transport == "auto" else transport
        # The status file is rewritten every second: the transfer shows in the next one.
        wait_for(lambda: client.status()["per_transport"][carried]["up_bytes"] > 4 * 1024 * 1024, timeout=10,
                 what="the transfer counted over %s" % carried)
        assert client.status()["transport"] == carried

# --- bad input ---------------------------------------------------------------------------------

def test_a_refused_token_ends_the_relay_with_a_message(lab):
    good = lab.client_through_relay("auto", "token-good")
    bad = lab.client_through_relay("auto", "token-bad")
    bad.env["ORBMESH_RELAY_TOKEN"] = "not-a-token"
    good.start_relay()
    bad.start_relay(running=False)
    assert bad.relay.wait(15) == 2
    assert "refused the token (401)" in bad.log_tail()
    good.start_pinging()
    assert good.on("udp") and good.relay.poll() is None  # control: the same server, a good token
