"""The helper's client: what goes over the socket, and the connections it keeps."""
import os
import resource
import socket
import threading
import time

import pytest

from app.helper import Addressing, HelperClient, HelperUnavailable, peer_spec
from app.peers.store import Peer
from tests.conftest import make_key
from wghelper import protocol
from wghelper.peers import Pages


class Helper:
    """A helper socket that answers every request; records them, counts connections; can hang up or stall."""

    def __init__(self, path, replies_per_conn=None, stall=False, hello=None, answer=None):
        self.hello = hello  # the result of hello; other commands answer {"n": request id}, or answer(args)
        self.answer = answer
        self.accepts = 0
        self.requests = []
        self.replies_per_conn = replies_per_conn
        self.stall = stall
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(128)  # as the helper: more than MAX_OPEN connect at once
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        answered = 0
        with conn, conn.makefile("rb") as stream:
            while self.replies_per_conn is None or answered < self.replies_per_conn:
                line = protocol.read_frame(stream)
                if line is None:
                    return
                request = protocol.decode(line)
                self.requests.append(request)
                if self.stall:
                    time.sleep(1.0)
                try:
                    result = self.hello if request["cmd"] == "hello" and self.hello else \
                        self.answer(request["args"]) if self.answer else {"n": request["id"]}
                    conn.sendall(protocol.encode({"id": request["id"], "ok": True, "result": result}))
                except BrokenPipeError:  # the client gave up waiting (the timeout test)
                    return
                answered += 1

    def close(self):
        self.server.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "h.sock")


def peer(n, endpoint=None, keepalive=0, **fields):
    return Peer(id=n, public_key=make_key(n), addr=167772160 + n, user_id="u", device_id="d%d" % n,
                source="client", endpoint=endpoint, keepalive=keepalive, created_at=1.0, updated_at=1.0, **fields)


# --- the wire format ----------------------------------------------------------------

HELLO = {"generation": "g", "pool": "10.0.0.0/16", "gateway": "10.0.0.1", "pool6": "fd00:8::/64",
         "gateway6": "fd00:8::1"}


def test_peer_spec_is_what_the_helper_takes():
    assert peer_spec(peer(7, endpoint="203.0.113.5:51820", keepalive=25, mode="bridge", exit_id="x")) == {
        "public_key": make_key(7), "allowed_ips": ["10.0.0.7/32"], "endpoint": "203.0.113.5:51820",
        "keepalive": 25}


def test_one_row_two_addresses():
    """A direct peer's /128 sits at its IPv4 offset in pool6; a bridged peer gets none (its IPv6 ends here)."""
    dual = Addressing(HELLO)
    assert peer_spec(peer(0x0102), dual)["allowed_ips"] == ["10.0.1.2/32", "fd00:8::102/128"]
    assert peer_spec(peer(7, mode="bridge", exit_id="x"), dual)["allowed_ips"] == ["10.0.0.7/32"]
    assert (dual.ip6("10.0.255.254"), dual.gateway6) == ("fd00:8::fffe/128", "fd00:8::1")
    off = Addressing(dict(HELLO, pool6=None, gateway6=None))
    assert off.ip6("10.0.0.2") is None and off.gateway6 is None
    assert peer_spec(peer(2), off)["allowed_ips"] == ["10.0.0.2/32"]
    assert Addressing({"generation": "g"}).ip6("10.0.0.2") is None  # a helper that announces no pool6


def test_clients_get_ipv6_only_where_the_helper_forwards_it():
    """ipv6 mode "local" (wghelper/ipv6.py) is IPv6 off for every peer; a hello without a mode (an older
    helper) is forward when it names a pool6."""
    local = Addressing(dict(HELLO, ipv6="local"))
    assert local.mode == "local" and local.ip6("10.0.0.2") is None and local.gateway6 is None
    assert peer_spec(peer(2), local)["allowed_ips"] == ["10.0.0.2/32"]
    forward = Addressing(dict(HELLO, ipv6="forward"))  # control
    assert forward.mode == "forward" and peer_spec(peer(2), forward)["allowed_ips"] == ["10.0.0.2/32",
                                                                                          "fd00:8::2/128"]
    assert Addressing(HELLO).mode == "forward" and Addressing(HELLO).gateway6 == "fd00:8::1"
    assert Addressing(dict(HELLO, pool6=None, gateway6=None)).mode == "off"


def test_apply_and_sync_send_peers_in_the_wire_format(path):
    helper = Helper(path, hello=HELLO)
    client = HelperClient(path, 2)
    try:
        client.apply(add=[peer(2)], remove=[make_key(9)])
        client.apply(remove=[make_key(3)])
        client.sync([peer(2), peer(4, endpoint="198.51.100.4:4000", keepalive=25, mode="bridge", exit_id="x",
                          last_endpoint="192.0.2.4:9")])
        client.sync([], since=1234.5)
    finally:
        client.close()
        helper.close()
    # The pools are asked for once (hello), before the first peer goes out.
    assert [(r["cmd"], r["args"]) for r in helper.requests] == [
        ("hello", {}),
        ("apply_peers", {"add": [{"public_key": make_key(2), "allowed_ips": ["10.0.0.2/32", "fd00:8::2/128"],
                                  "endpoint": None, "keepalive": 0}], "remove": [make_key(9)]}),
        ("apply_peers", {"add": [], "remove": [make_key(3)]}),
        ("sync_peers", {"peers": [
            {"public_key": make_key(2), "allowed_ips": ["10.0.0.2/32", "fd00:8::2/128"], "endpoint": None,
             "keepalive": 0},
            # The last endpoint goes to sync only, and only when known; a bridged peer has no /128.
            {"public_key": make_key(4), "allowed_ips": ["10.0.0.4/32"], "endpoint": "198.51.100.4:4000",
             "keepalive": 25, "last_endpoint": "192.0.2.4:9"}]}),
        ("sync_peers", {"peers": [], "since": 1234.5}),  # when the app read its rows, if it says
    ]


@pytest.mark.parametrize("count, walked", [(5, [(0, 2, 1), (2, 4, 3), (4, 5, None)]),
                                           (4, [(0, 2, 1), (2, 4, None)]), (0, [(0, 0, None)])])
def test_a_dump_is_walked_in_pages_each_named_by_its_last_key(path, count, walked):
    """The helper's paging (wghelper/peers.py Pages) answers; the last page covers every key after the one
    before it."""
    pages, peers = Pages(), [{"public_key": make_key(n)} for n in range(count)]
    helper = Helper(path, answer=lambda args: pages.page(args.get("dump") or pages.keep(peers),
                                                         args.get("offset", 0), args["limit"]))
    client = HelperClient(path, 2)
    try:
        got = list(client.dump_pages(2))
    finally:
        client.close()
        helper.close()
    keys = sorted(p["public_key"] for p in peers)
    assert [([p["public_key"] for p in page], through) for page, through in got] == [
        (keys[start:end], None if last is None else keys[last]) for start, end, last in walked]
    assert [r["args"] for r in helper.requests] == [{"limit": 2}] + [
        {"dump": 1, "offset": start, "limit": 2} for start, _, _ in walked[1:]]


def test_each_hello_refreshes_the_pools(path):
    helper = Helper(path, hello=HELLO)
    client = HelperClient(path, 2)
    try:
        assert client.addressing().gateway6 == "fd00:8::1"
        helper.hello = dict(HELLO, pool6="fd00:9::/64", gateway6="fd00:9::1")  # a helper restarted on a new pool6
        assert client.addressing().gateway6 == "fd00:8::1"  # kept: no request pays for a hello
        client.hello()  # as the reconcile watcher's rounds do
        assert client.addressing().ip6(167772162) == "fd00:9::2/128"
    finally:
        client.close()
        helper.close()
    assert [r["cmd"] for r in helper.requests] == ["hello", "hello"]


def test_a_hello_someone_else_asked_is_learnt(path):
    """The reconcile watcher has a client of its own and hands each hello to the request path's: a helper
    restarted in another ipv6 mode changes what the next connect gets, with no hello of its own."""
    helper = Helper(path, hello=HELLO)
    client = HelperClient(path, 2)
    try:
        assert client.addressing().gateway6 == "fd00:8::1"
        client.learn(dict(HELLO, ipv6="local", generation="g2"))
        assert client.addressing().ip6(167772162) is None and client.addressing().mode == "local"
        client.apply(add=[peer(2)])
        assert helper.requests[-1]["args"]["add"][0]["allowed_ips"] == ["10.0.0.2/32"]
    finally:
        client.close()
        helper.close()
    assert [r["cmd"] for r in helper.requests] == ["hello", "apply_peers"]


def test_what_the_helper_said_is_asked_once_and_read_by_everyone(path):
    """One cache of the hello: the server key, the keys no peer may use, the bridge key and the pools."""
    helper = Helper(path, hello=dict(HELLO, public_key=make_key(1), bridge_public_key=make_key(2)))
    client = HelperClient(path, 2)
    try:
        assert client.server_key() == make_key(1)
        assert client.own_keys() == {make_key(1), make_key(2)}
        assert client.bridge_key() == make_key(2)
        assert client.addressing().gateway6 == "fd00:8::1"
        client.hello()  # the control: a hello asked on purpose is one more request, and replaces the cache
    finally:
        client.close()
        helper.close()
    assert [r["cmd"] for r in helper.requests] == ["hello", "hello"]


def test_a_helper_without_a_bridge_key_is_asked_again_until_it_has_one(path):
    helper = Helper(path, hello=HELLO)
    client = HelperClient(path, 2)
    try:
        assert client.bridge_key() is None and client.own_keys() == frozenset()
        helper.hello = dict(HELLO, bridge_public_key=make_key(2))
        assert client.bridge_key() == make_key(2)
        assert client.bridge_key() == make_key(2) and client.own_keys() == {make_key(2)}  # kept now
    finally:
        client.close()
        helper.close()
    assert [r["cmd"] for r in helper.requests] == ["hello", "hello", "hello"]


# --- connections kept per process ----------------------------------------------------

def test_calls_share_one_connection(path):
    helper = Helper(path)
    client = HelperClient(path, 2)
    assert [client.call("hello")["n"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert helper.accepts == 1
    client.close()
    helper.close()


def test_a_connection_the_helper_closed_is_not_reused(path):
    helper = Helper(path, replies_per_conn=1)  # hangs up after each answer, as a restarted helper would
    client = HelperClient(path, 2)
    for _ in range(3):
        client.call("hello")
        time.sleep(0.05)  # let the hang-up arrive
    assert helper.accepts == 3
    client.close()
    helper.close()


def test_a_timed_out_connection_is_dropped_so_a_late_reply_is_never_read(path):
    helper = Helper(path, stall=True)
    client = HelperClient(path, 0.2)
    with pytest.raises(HelperUnavailable):
        client.call("hello")
    assert client._idle == []
    helper.stall = False
    assert client.call("hello")["n"] == 2  # its own answer, on a new connection
    assert helper.accepts == 2
    client.close()
    helper.close()


def test_at_most_max_open_connections_per_process(path):
    """Calls beyond MAX_OPEN wait for a connection: every instance together stays under the helper's cap."""
    helper = Helper(path, stall=True)  # each answer takes a second, so the calls overlap
    client = HelperClient(path, 10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.call("hello")))
               for _ in range(HelperClient.MAX_OPEN + 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == HelperClient.MAX_OPEN + 4  # all answered (control)
    assert helper.accepts == HelperClient.MAX_OPEN and len(client._idle) == HelperClient.MAX_OPEN
    client.close()
    helper.close()


def test_pooled_connections_past_descriptor_1024_are_checked():
    """A worker holding thousands of tunnel sessions hands out descriptors past select()'s limit."""
    from app.helper import _still_open

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.dup(0) for _ in range(1100)]
    ours, helper = socket.socketpair()
    try:
        assert ours.fileno() > 1024, "the descriptor is low: nothing tested"
        assert _still_open(ours)
        helper.close()  # the control: a connection the helper closed is noticed
        assert not _still_open(ours)
    finally:
        ours.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
