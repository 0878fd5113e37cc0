"""The helper's start and `down` (wghelper/__main__.py): the order of table, interface and forwarding,
and what a failure leaves, via the fake runner."""
import functools
import os
import signal

import pytest

from wghelper import __main__ as main
from wghelper import firewall
from wghelper.argv import Commands
from wghelper.firewall import Firewall
from wghelper.interface import Interface

from .fakes import FAKE_IF, FakeRunner, settings

IF = FAKE_IF
UP = "up0"
K_WG, K_UP = "net/ipv4/conf/%s/forwarding" % IF, "net/ipv4/conf/%s/forwarding" % UP
TABLE = "inet orbmesh"


class NoServer:
    """Stands in for the socket server: the start is what these tests look at."""

    def __init__(self, cfg, ctx):
        pass

    def bind(self):
        pass

    def serve_forever(self):
        pass

    def stop(self):
        pass

    def close(self):
        pass

    def remove_stale(self):
        pass


@pytest.fixture
def node(tmp_path, monkeypatch):
    """(runner, start(**settings) -> exit code, down(**settings) -> exit code); the helper's signal
    handlers put back afterwards."""
    monkeypatch.setattr(main, "Server", NoServer)
    # wireguard-go's control socket where the fake runner makes it
    monkeypatch.setattr(main, "Interface", functools.partial(Interface, socket_dir=str(tmp_path)))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    runner = FakeRunner(socket_dir=str(tmp_path))
    runner.sysctls.update({K_WG: "0", K_UP: "0"})

    def make(**overrides):
        cfg = settings(**dict({"nat_uplink": UP, "helper_state_dir": str(tmp_path / "state")}, **overrides))
        cmd = Commands(runner)
        return cfg, cmd, Firewall(cfg, cmd, os.path.join(cfg.helper_state_dir, firewall.STATE_FILE))

    yield runner, lambda **o: main.run(*make(**o)), lambda **o: main.down(*make(**o))
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def first(calls, predicate):
    return next(i for i, c in enumerate(calls) if predicate(c))


def nft_apply(c):
    return c[:2] == ["nft", "-f"]


@pytest.mark.parametrize("how", ["kernel", "wireguard-go", "adopted"])
def test_the_table_comes_before_the_interface_and_forwarding_after(node, how):
    runner, start, _ = node
    runner.kernel = how != "wireguard-go"
    if how == "adopted":
        runner.adopted(IF)
    assert start() == 0
    calls = runner.calls
    table = first(calls, nft_apply)
    # Nothing touches the interface (creates, starts, adopts or reads it) before the table is written ...
    assert table < first(calls, lambda c: IF in c or c[0] == "wireguard-go")
    # ... and forwarding is switched on once the link is up.
    assert first(calls, lambda c: c[:4] == ["ip", "link", "set", "dev"]) < first(
        calls, lambda c: c[:2] == ["sysctl", "-w"])
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "1" and TABLE in runner.nft_tables


def test_a_failed_forwarding_step_keeps_the_table_and_leaves_no_forwarding(node):
    """The issue's sequence: a healthy start, then one whose ORBMESH_NAT_UPLINK names no link."""
    runner, start, _ = node
    assert start() == 0
    peers_link = set(runner.links)
    assert start(nat_uplink="eth-typo") == 1  # sysctl: cannot stat .../eth-typo/forwarding
    assert runner.sysctls[K_WG] == runner.sysctls[K_UP] == "0"  # what the first start turned on: off again
    assert "eth-typo" in runner.nft_tables[TABLE]  # the filter stays (clients out of eth-typo only: nowhere)
    assert ["nft", "delete", "table", "inet", "orbmesh"] not in runner.calls
    assert runner.links == peers_link  # the adopted interface is left as it was, for `down`


def test_a_table_that_cannot_be_written_stops_the_start_before_the_interface(node):
    runner, start, _ = node
    runner.fail = lambda argv: "Error: Could not process rule: No such file or directory" if nft_apply(argv) else None
    assert start() == 1
    assert not any(IF in c for c in runner.calls[first(runner.calls, nft_apply) + 1:] if c[:3] != ["ip", "-o", "link"])
    assert IF not in runner.links and not any(c[:2] == ["sysctl", "-w"] for c in runner.calls)


def test_a_table_that_cannot_be_written_takes_an_adopted_interface_down(node):
    runner, start, _ = node
    assert start() == 0
    runner.clear()
    runner.fail = lambda argv: "not found in PATH" if argv[0] == "nft" else None
    assert start() == 1
    assert ["ip", "link", "set", "dev", IF, "down"] in runner.calls
    assert not any(c[:2] == ["wg", "set"] or c[:2] == ["sysctl", "-w"] for c in runner.calls)
    assert runner.nft_tables[TABLE]  # the earlier table, as it was
    runner.fail = None
    assert start() == 0  # a start that can write its table brings the link up again
    assert runner.calls[-1][:2] == ["sysctl", "-n"] and ["ip", "link", "set", "dev", IF, "mtu", "1420", "up"] in \
        runner.calls


def test_down_removes_the_link_first_and_the_table_last(node):
    runner, start, down = node
    assert start() == 0
    runner.clear()
    assert down() == 0
    calls = runner.calls
    link, table = calls.index(["ip", "link", "del", "dev", IF]), calls.index(["nft", "delete", "table", "inet",
                                                                             "orbmesh"])
    assert link < table < first(calls, lambda c: c[:2] == ["sysctl", "-w"])
    assert IF not in runner.links and runner.nft_tables == {} and runner.sysctls[K_WG] == runner.sysctls[K_UP] == "0"


def test_a_down_that_cannot_remove_the_link_keeps_the_table_and_forwarding(node):
    runner, start, down = node
    assert start() == 0
    runner.fail = lambda argv: "RTNETLINK answers: Operation not permitted" if argv[1:3] == ["link", "del"] else None
    assert down() == 1
    assert IF in runner.links and TABLE in runner.nft_tables and runner.sysctls[K_WG] == "1"
    assert not any(c[0] == "nft" and c[1] == "delete" or c[:2] == ["sysctl", "-w"] for c in runner.calls[-3:])
    runner.fail = None  # control: the same down, able to delete the link, removes everything
    assert down() == 0
    assert IF not in runner.links and runner.nft_tables == {} and runner.sysctls[K_WG] == "0"


LARGE_BUFFER_PROBE = r"""
import sys
from wghelper.__main__ import map_large_buffers
if sys.argv[1] == "mapped":
    map_large_buffers()
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
first = b"x" * (8 << 20)
del first  # a dump before: freeing it raises glibc's sliding threshold past 8 MB
before = rss_kb()
dump = b"y" * (5 << 20)
held = rss_kb()
del dump
print(held - before, rss_kb() - before)
"""


@pytest.mark.parametrize("mode", ["mapped", "default"])
def test_a_freed_large_buffer_goes_back_to_the_system(mode):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", LARGE_BUFFER_PROBE, mode], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    held, kept = map(int, done.stdout.split())
    assert held > 4 << 10  # the 5 MB buffer was resident
    if mode == "mapped":
        assert kept < 1 << 10  # the helper's setting: its pages are gone once it is freed
    else:
        assert kept > 4 << 10  # the control: glibc's default keeps them
