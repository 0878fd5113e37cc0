"""--transport auto's state machine, driven tick by tick with fake transports and a fake clock.

The transports' own behaviour (sockets, servers) has its own tests; the
whole thing end to end, with real WireGuard through a middlebox, is in
tests/e2e/test_transport_auto_e2e.py.
"""
import pytest

from orbmesh_relay import auto
from orbmesh_relay.common import Stats
from orbmesh_relay.liveness import Liveness

INIT = b"\x01\x00\x00\x00" + b"i" * 144  # a handshake initiation
DATA = b"\x04\x00\x00\x00" + b"d" * 60


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeTransport:
    name = "?"

    def __init__(self, relay):
        self.relay = relay
        self.ready = False
        self.failures = 0
        self.opened_at = relay.clock()
        self.sent = []
        self.reason = None  # what tick() reports
        self.kicks = []
        self.closed = False
        self.live = Liveness()
        self.measure_rtt = False
        self.rtt = None
        relay.made.append(self)

    def workers(self):
        return []

    def send(self, batch):
        self.sent.extend(batch)

    def tick(self, now):
        return self.reason

    def kick(self, reason):
        self.kicks.append(reason)

    def close(self):
        self.closed = True
        self.ready = False


class FakeUdp(FakeTransport):
    name = "udp"

    def __init__(self, relay):
        super().__init__(relay)
        self.ready = True
        self.ticket = {"port": 51822}
        self.probes_off = False
        self.check = None
        self.checks = []  # start times
        self.result = None  # what the running check ends with
        self.network_changed = None

    def start_check(self, now):
        if self.ticket is None:
            return False
        self.check = now
        self.checks.append(now)
        return True

    def check_result(self, now):
        if self.check is None or self.result is None:
            return None
        self.check, result, self.result = None, self.result, None
        return result


class FakeWs(FakeTransport):
    name = "ws"


class FakeHttp(FakeTransport):
    name = "http"


class FakeRelay:
    def __init__(self, clock):
        self.clock = clock
        self.made = []
        self.launched = []
        self.switches = []
        self.stats = Stats()

    def launch(self, transport):
        self.launched.append(transport)

    def switched(self, old, new, reason):
        self.switches.append((old, new, reason))


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(auto.time, "monotonic", clock)
    monkeypatch.setattr(auto, "UdpTransport", FakeUdp)
    monkeypatch.setattr(auto, "WsTransport", FakeWs)
    monkeypatch.setattr(auto, "HttpTransport", FakeHttp)
    monkeypatch.setattr(auto, "jittered", lambda seconds: seconds)
    # The closes happen in a thread of their own; here at once.
    monkeypatch.setattr(auto.threading, "Thread", _Inline)
    return clock


class _Inline:
    def __init__(self, target, name=None, daemon=None):
        self.target = target

    def start(self):
        self.target()


@pytest.fixture
def relay(clock):
    return FakeRelay(clock)


@pytest.fixture
def control(relay):
    control = auto.Auto(relay)
    control.start()
    return control


def advance(control, clock, seconds, step=0.05):
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = min(end, clock.now + step)
        control.tick(clock.now)


def connected_over(control, clock, relay, name):
    """From a fresh Auto, connected over `name` ("udp" or "ws")."""
    control.route([INIT])
    if name == "udp":
        control.delivered(control.udp, [DATA])
    else:
        advance(control, clock, auto.HE_DELAY + 0.05)
        control.ws.ready = True
        control.tick(clock.now)
        control.delivered(control.ws, [DATA])
    assert control.current.name == name
    return control.current


# --- connecting ---------------------------------------------------------------------------------

def test_nothing_is_raced_before_the_client_sends(control, clock, relay):
    advance(control, clock, 5)
    assert control.state == "connecting" and control.ws is None and relay.launched == [control.udp]


def test_udp_gets_a_head_start_and_wins_when_it_answers(control, clock, relay):
    control.route([INIT])
    assert control.udp.sent == [INIT] and control.ws is None
    advance(control, clock, auto.HE_DELAY - 0.05)
    assert control.ws is None  # still UDP's head start
    control.delivered(control.udp, [DATA])
    assert control.current is control.udp and control.state == "connected"
    assert relay.switches == [(None, "udp", "first answer from the node came over udp")]
    advance(control, clock, 2)
    assert control.ws is None  # never opened: UDP answered first
    control.route([DATA])
    assert control.udp.sent == [INIT, DATA]


def test_websocket_shortly_after_gets_the_initiation_udp_lost_and_wins(control, clock, relay):
    control.route([INIT])
    advance(control, clock, auto.HE_DELAY + 0.05)
    ws = control.ws
    assert ws is not None and ws in relay.launched and ws.sent == []
    control.route([INIT])  # WireGuard retransmits; not over a WebSocket that is not up
    assert ws.sent == []
    ws.ready = True
    control.tick(clock.now)
    assert ws.sent == [INIT]  # the latest initiation, again, over the new path
    control.route([DATA])
    assert ws.sent == [INIT, DATA] and control.udp.sent[-1] == DATA  # both while racing
    control.delivered(ws, [DATA])
    assert control.current is ws and relay.switches[-1][:2] == (None, "ws")
    control.route([DATA])
    assert control.udp.sent.count(DATA) == 1  # no longer over UDP
    assert control.http is None


@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_http_when_websocket_fails_or_hangs(control, clock, relay, how):
    control.route([INIT])
    advance(control, clock, auto.HE_DELAY + 0.05)
    ws = control.ws
    if how == "fails":
        ws.failures = 1
        control.tick(clock.now)
    else:
        advance(control, clock, auto.TCP_GRACE - 0.1)
        assert control.http is None  # not yet
        advance(control, clock, 0.15)
    http = control.http
    assert http is not None
    http.ready = True
    control.tick(clock.now)
    assert http.sent == [INIT]
    control.delivered(http, [DATA])
    assert control.current is http
    assert ws.closed and control.ws is None  # the loser goes


# --- falling back -------------------------------------------------------------------------------

def test_udp_dead_mid_session_falls_back_to_websocket_make_before_break(control, clock, relay):
    udp = connected_over(control, clock, relay, "udp")
    udp.reason = "no answer over udp for 1.0 s"
    control.tick(clock.now)
    assert control.state == "lost" and control.ws is not None
    control.route([DATA])
    assert udp.sent[-1] == DATA  # still over UDP until another path is up
    control.ws.ready = True
    control.tick(clock.now)
    assert control.current is control.ws and control.state == "connected"
    assert relay.switches[-1] == ("udp", "ws", "no answer over udp for 1.0 s")
    udp.reason = None


def test_udp_lost_but_answering_again_before_another_path_is_up_stays(control, clock, relay):
    udp = connected_over(control, clock, relay, "udp")
    udp.reason = "no answer"
    control.tick(clock.now)
    udp.reason = None
    clock.now += 0.1
    udp.live.answered(clock.now)
    control.tick(clock.now)
    assert control.current is udp and control.state == "connected" and control.ws is None
    assert len(relay.switches) == 1


def test_a_dead_websocket_is_made_again_and_http_tried_beside_it(control, clock, relay):
    ws = connected_over(control, clock, relay, "ws")
    ws.reason = "local address changed from 198.51.100.2 to 203.0.113.2"
    control.tick(clock.now)
    ws.reason = None
    assert ws.kicks == ["local address changed from 198.51.100.2 to 203.0.113.2"] and not ws.ready
    assert relay.stats.reconnects == 1
    advance(control, clock, auto.TCP_GRACE - 0.1)
    assert control.http is None
    ws.ready = True  # back on the new route in time
    control.tick(clock.now)
    assert control.current is ws and control.state == "connected" and len(relay.switches) == 1


def test_a_websocket_that_does_not_come_back_gives_way_to_http(control, clock, relay):
    ws = connected_over(control, clock, relay, "ws")
    ws.reason = "no answer over ws for 1.0 s"
    control.tick(clock.now)
    ws.reason = None
    advance(control, clock, auto.TCP_GRACE + 0.05)
    control.http.ready = True
    control.tick(clock.now)
    assert control.current is control.http and ws.closed
    assert relay.switches[-1] == ("ws", "http", "no answer over ws for 1.0 s")


# --- moving back --------------------------------------------------------------------------------

def test_back_to_udp_when_the_check_passes_without_losing_the_old_path_at_once(control, clock, relay):
    ws = connected_over(control, clock, relay, "ws")
    udp = control.udp
    advance(control, clock, auto.CHECK_FIRST - 0.1)
    assert udp.checks == []
    advance(control, clock, 0.15)
    assert len(udp.checks) == 1
    udp.result = (True, 12, 12)
    control.tick(clock.now)
    assert control.current is udp and relay.switches[-1] == ("ws", "udp", "udp answers again (12 of 12 probes)")
    assert control.last_check["passed"] is True
    assert not ws.closed  # datagrams still on their way over it are delivered
    control.route([DATA])
    assert udp.sent[-1] == DATA and ws.sent.count(DATA) == 0
    advance(control, clock, auto.TRIAL + 0.1)
    assert ws.closed and control.ws is None


def test_failed_checks_come_less_often_up_to_the_cap(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    udp = control.udp
    switched_at = clock.now
    for _ in range(int(100 / 0.25)):
        advance(control, clock, 0.25)
        if udp.check is not None:
            udp.result = (False, 0, 12)  # each check fails as soon as it starts
    starts = [switched_at] + udp.checks
    gaps = [round(b - a, 1) for a, b in zip(starts, starts[1:])]
    # The next check counts from the end of the failed one (here one loop step, 0.25 s, after its start).
    assert gaps[0] == pytest.approx(auto.CHECK_FIRST, abs=0.06)
    assert gaps[1:4] == pytest.approx([15.0, 20.0, 20.0], abs=0.35)  # 10 s x 1.5, then the 20 s cap
    assert all(g <= auto.CHECK_MAX * (1 + auto.JITTER) for g in gaps)


def test_udp_failing_right_after_the_move_back_is_a_flap(control, clock, relay):
    ws = connected_over(control, clock, relay, "ws")
    udp = control.udp
    advance(control, clock, auto.CHECK_FIRST + 0.1)
    udp.result = (True, 12, 12)
    control.tick(clock.now)
    assert control.current is udp
    advance(control, clock, 3)
    udp.reason = "no answer over udp for 1.0 s"
    ws.ready = True
    control.tick(clock.now)
    udp.reason = None
    assert control.current is ws  # straight back over the path kept open
    assert relay.switches[-1][:2] == ("udp", "ws") and "after moving to it" in relay.switches[-1][2]
    assert control.flaps == 1 and control.interval == auto.FLAP_FIRST
    checks = len(udp.checks)
    advance(control, clock, auto.FLAP_FIRST - 0.1)
    assert len(udp.checks) == checks  # no check sooner than FLAP_FIRST
    advance(control, clock, 0.2)
    assert len(udp.checks) == checks + 1
    # A second flap doubles the wait.
    udp.result = (True, 12, 12)
    control.tick(clock.now)
    advance(control, clock, 1)
    udp.reason = "no answer"
    control.tick(clock.now)
    udp.reason = None
    assert control.flaps == 2 and control.interval == 2 * auto.FLAP_FIRST


def test_flaps_are_forgotten_once_udp_holds(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    control.flaps, control.interval = 2, 60.0
    advance(control, clock, 60.1, step=0.5)
    control.udp.result = (True, 12, 12)
    control.tick(clock.now)
    assert control.current is control.udp
    advance(control, clock, auto.FLAP_FORGET + 1, step=1.0)
    assert control.flaps == 0 and control.interval == auto.CHECK_FIRST


def test_a_network_change_looks_at_udp_now(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    advance(control, clock, 2)
    assert control.udp.checks == []
    control.udp.network_changed = "local address changed from a to b"
    advance(control, clock, 0.1)
    assert len(control.udp.checks) == 1


def test_no_move_back_when_the_server_has_probes_off(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    control.udp.probes_off = True
    advance(control, clock, 100, step=0.5)
    assert control.udp.checks == [] and control.current.name == "ws"


def test_no_ticket_yet_tries_again_soon(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    control.udp.ticket = None
    advance(control, clock, auto.CHECK_FIRST + 0.1)
    assert control.udp.checks == [] and control.next_check > clock.now
    control.udp.ticket = {"port": 51822}
    advance(control, clock, auto.NO_TICKET_RETRY + 0.1)
    assert len(control.udp.checks) == 1


def test_status_details(control, clock, relay):
    connected_over(control, clock, relay, "ws")
    details = control.details(clock.now)
    assert details["udp_probes"] == "ready" and details["next_udp_check_in_s"] is not None
    assert details["flaps"] == 0 and details["lost"] is None and details["last_udp_check"] is None
