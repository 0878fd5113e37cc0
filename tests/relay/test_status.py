"""The relay's JSON status: what it holds, and the file written whole."""
import json
import threading

from orbmesh_relay.relay import Relay
from orbmesh_relay.status import StatusFile
from tests.relay.fakes import TOKEN

FIELDS = {"mode", "transport", "state", "connected", "rtt_ms", "switch_count", "switches", "started_at",
          "updated_at", "up_packets", "up_bytes", "down_packets", "down_bytes", "dropped", "reconnects",
          "per_transport"}
AUTO_FIELDS = {"udp_probes", "udp_check_running", "next_udp_check_in_s", "last_udp_check", "flaps", "lost"}


def test_fixed_transport_status(tmp_path):
    path = tmp_path / "status.json"
    relay = Relay("ws", "http://127.0.0.1:9", TOKEN, ("127.0.0.1", 0), status_file=path)
    status = relay.status()
    assert set(status) == FIELDS
    assert (status["mode"], status["transport"], status["state"], status["connected"]) == ("ws", "ws", "connecting",
                                                                                          False)
    assert status["switches"] == [] and status["rtt_ms"] is None
    relay.switched(None, "ws", "a reason")
    written = json.loads(path.read_text())  # every switch is written at once
    assert written["switches"][0]["reason"] == "a reason" and written["switch_count"] == 1
    relay.stop()
    assert json.loads(path.read_text())["connected"] is False
    assert TOKEN not in path.read_text()


def test_auto_status_has_the_move_back_details():
    relay = Relay("auto", "http://127.0.0.1:9", TOKEN, ("127.0.0.1", 0), endpoint="127.0.0.1:9")
    try:
        status = relay.status()
        assert set(status) == FIELDS | AUTO_FIELDS
        assert status["transport"] is None and status["state"] == "connecting"
        assert relay.status_line().startswith("relay none ")
    finally:
        relay.stop()


def test_switches_kept_are_bounded(monkeypatch):
    monkeypatch.setattr("orbmesh_relay.relay.SWITCHES_KEPT", 3)
    relay = Relay("ws", "http://127.0.0.1:9", TOKEN, ("127.0.0.1", 0))
    try:
        for i in range(5):
            relay.switched("ws", "http", "reason %d" % i)
        status = relay.status()
        assert status["switch_count"] == 5 and [s["reason"] for s in status["switches"]] == [
            "reason 2", "reason 3", "reason 4"]
    finally:
        relay.stop()


def test_the_file_is_replaced_whole_and_a_failure_is_only_warned_once(tmp_path, caplog):
    path = tmp_path / "status.json"
    status_file = StatusFile(path)
    status_file.write(lambda: {"a": 1})
    status_file.write(lambda: {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left behind
    broken = StatusFile(tmp_path / "missing" / "status.json")
    broken.write(lambda: {"a": 1})
    broken.write(lambda: {"a": 1})
    assert sum("cannot write the status file" in r.message for r in caplog.records) == 1


def test_a_snapshot_taken_before_another_never_lands_after_it(tmp_path):
    """The monitor's write and a switch's write at once (CI once read a switch count one behind)."""
    path = tmp_path / "status.json"
    status_file = StatusFile(path)
    taking, go = threading.Event(), threading.Event()

    def slow_snapshot():  # the monitor's: taken, then held up before it is written
        taking.set()
        assert go.wait(5)
        return {"switch_count": 2}

    monitor = threading.Thread(target=status_file.write, args=(slow_snapshot,))
    monitor.start()
    assert taking.wait(5)
    switch = threading.Thread(target=status_file.write, args=(lambda: {"switch_count": 3},))
    switch.start()
    switch.join(0.2)  # it waits for the monitor's turn (without the turn it would write now, and lose)
    go.set()
    monitor.join(5)
    switch.join(5)
    assert json.loads(path.read_text()) == {"switch_count": 3}
