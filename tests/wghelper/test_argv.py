"""Everything root can run (wghelper/argv.py): each command shape's exact argv, and the real Runner."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wghelper import firewall, keys
from wghelper.argv import PEERS_PER_CALL, Commands, Deadlines, Runner, clean_stderr
from wghelper.errors import CommandFailed

from tests.need import need

from .fakes import key

K1, K2 = key(1), key(2)
ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """The lowest layer, recording (tool, argv, stdin) and answering nothing."""

    def __init__(self):
        self.calls = []

    def run(self, tool, args, stdin=None):
        self.calls.append((tool, list(args), stdin))
        return ""

    def nft_text(self, text):
        self.calls.append(("libnftables", None, text))

    def nft_json(self, words):
        self.calls.append(("libnftables -j", list(words), None))
        return ""


# Every method of Commands that runs a program, with the exact argv it runs.
SHAPES = [
    ("dump", ("wg0",), [("wg", ["show", "wg0", "dump"], None)]),
    ("peer_keys", ("wg0b1",), [("wg", ["show", "wg0b1", "peers"], None)]),
    ("set_interface", ("wg0", 51820, "/s/server.key"),
     [("wg", ["set", "wg0", "listen-port", "51820", "private-key", "/s/server.key"], None)]),
    ("set_peers", ("wg0", [K1], [{"public_key": K2, "allowed_ips": ["10.8.0.2/32", "10.8.0.3/32"],
                                  "endpoint": "192.0.2.1:7", "keepalive": 25}]),
     [("wg", ["set", "wg0", "peer", K1, "remove", "peer", K2, "allowed-ips", "10.8.0.2/32,10.8.0.3/32",
              "endpoint", "192.0.2.1:7", "persistent-keepalive", "25"], None)]),
    ("set_exit_peer", ("wg0b1", "/s/bridge.key", K1, "198.51.100.1:51820", 25),
     [("wg", ["set", "wg0b1", "private-key", "/s/bridge.key", "peer", K1, "endpoint", "198.51.100.1:51820",
              "allowed-ips", "0.0.0.0/0", "persistent-keepalive", "25"], None)]),
    ("links", (), [("ip", ["-o", "link", "show"], None)]),
    ("addresses", ("wg0",), [("ip", ["-o", "address", "show", "dev", "wg0"], None)]),
    ("link_index", ("wg0",), [("ip", ["-o", "link", "show", "dev", "wg0"], None)]),
    ("add_wireguard_link", ("wg0",), [("ip", ["link", "add", "dev", "wg0", "type", "wireguard"], None)]),
    ("delete_link", ("wg0",), [("ip", ["link", "del", "dev", "wg0"], None)]),
    ("link_up", ("wg0", 1420), [("ip", ["link", "set", "dev", "wg0", "mtu", "1420", "up"], None)]),
    ("link_down", ("wg0",), [("ip", ["link", "set", "dev", "wg0", "down"], None)]),
    ("replace_address", ("wg0", "10.8.0.1/16"), [("ip", ["-4", "address", "replace", "10.8.0.1/16", "dev", "wg0"],
                                                 None)]),
    ("replace_address", ("wg0", "fd00::1/64"), [("ip", ["-6", "address", "replace", "fd00::1/64", "dev", "wg0"],
                                                None)]),
    ("addresses", (), [("ip", ["-o", "address", "show"], None)]),
    ("flush_addresses", ("wg0b1",), [("ip", ["-4", "address", "flush", "dev", "wg0b1"], None)]),

    ("default_routes6", (), [("ip", ["-6", "route", "show", "default"], None)]),
    ("route_default", (51901, "wg0b1"), [("ip", ["-4", "route", "replace", "default", "dev", "wg0b1", "table",
                                                 "51901"], None)]),
    ("route_unreachable", (51901,), [("ip", ["-4", "route", "replace", "unreachable", "default", "metric",
                                             "4294967295", "table", "51901"], None)]),
    ("flush_table", (51901,), [("ip", ["-4", "route", "flush", "table", "51901"], None)]),
    ("rules", (20000,), [("ip", ["-4", "rule", "show", "pref", "20000"], None)]),
    ("add_rule", (20000, "10.8.0.2", 51901), [("ip", ["-4", "rule", "add", "pref", "20000", "from", "10.8.0.2/32",
                                                      "lookup", "51901"], None)]),
    ("delete_rule", (20000, "10.8.0.2"), [("ip", ["-4", "rule", "del", "pref", "20000", "from", "10.8.0.2/32"],
                                           None)]),
    ("apply_nft", ("table inet orbmesh {}\n",), [("libnftables", None, "table inet orbmesh {}\n")]),
    ("delete_nft_table", ("orbmesh",), [("nft", ["delete", "table", "inet", "orbmesh"], None)]),
    ("list_quotas", ("orbmesh",), [("libnftables -j", ["list", "quotas", "table", "inet", "orbmesh"], None)]),
    ("read_sysctl", ("net/ipv4/conf/wg0/forwarding",), [("sysctl", ["-n", "net/ipv4/conf/wg0/forwarding"], None)]),
    ("start_wireguard_go", ("wg0",), [("wireguard-go", ["wg0"], None)]),
    ("write_sysctl", ("net/ipv4/conf/wg0/forwarding", "1"),
     [("sysctl", ["-w", "net/ipv4/conf/wg0/forwarding=1"], None)]),
]


@pytest.mark.parametrize("method, args, expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_exact_argv(method, args, expected):
    recorder = Recorder()
    getattr(Commands(recorder), method)(*args)
    assert recorder.calls == expected


def test_every_command_shape_is_listed():
    shapes = {name for name in vars(Commands) if not name.startswith("_")} - {"public_key"}
    assert shapes == {s[0] for s in SHAPES}


def test_public_key_goes_on_stdin_only():
    recorder = Recorder()
    private = keys.generate_private_key()
    Commands(recorder).public_key(private)
    assert recorder.calls == [("wg", ["pubkey"], private + "\n")]


def test_set_peers_without_endpoint_sends_keepalive_zero():
    recorder = Recorder()
    Commands(recorder).set_peers("wg0", [], [{"public_key": K1, "allowed_ips": ["10.8.0.2/32"], "endpoint": None,
                                              "keepalive": 0}])
    assert recorder.calls == [("wg", ["set", "wg0", "peer", K1, "allowed-ips", "10.8.0.2/32",
                                      "persistent-keepalive", "0"], None)]


def test_set_peers_splits_long_argv():
    recorder = Recorder()
    adds = [{"public_key": key(i), "allowed_ips": ["10.8.%d.%d/32" % (i // 250, i % 250 + 2)], "keepalive": 0}
            for i in range(1, 2 * PEERS_PER_CALL + 501)]
    Commands(recorder).set_peers("wg0", [], adds)
    assert [argv.count("peer") for _, argv, _ in recorder.calls] == [PEERS_PER_CALL, PEERS_PER_CALL, 500]


# --- the real Runner (read-only commands only) --------------------------------

def test_real_runner_reports_failures():
    with pytest.raises(CommandFailed) as info:
        Runner(timeout=5).run("ip", ["link", "show", "dev", "om-nonexist0"])
    assert info.value.command == "ip" and info.value.exit_code == 1
    assert "does not exist" in info.value.stderr


def test_real_runner_feeds_stdin():
    private = keys.generate_private_key()
    public = Commands(Runner(timeout=5)).public_key(private)
    assert len(base64.b64decode(public)) == 32 and public != private


def test_real_runner_kills_a_command_past_its_timeout():
    # `ip monitor` only reads and never exits by itself.
    with pytest.raises(CommandFailed) as info:
        Runner(timeout=0.5).run("ip", ["monitor", "link"])
    assert info.value.command == "ip" and info.value.exit_code is None
    assert info.value.stderr == "timed out after 0.5s"


@pytest.mark.parametrize("where", ["run", "run_here"])
def test_one_runner_kills_only_the_run_past_its_deadline(where):
    runner = Runner(timeout=0.5)
    outcomes = {}

    def run(name, args):
        try:
            outcomes[name] = getattr(runner, where)("ip", args).split(":")[0]
        except CommandFailed as exc:
            outcomes[name] = exc.stderr

    threads = [threading.Thread(target=run, args=("monitor", ["monitor", "link"])),
               threading.Thread(target=run, args=("show", ["link", "show", "dev", "lo"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes == {"monitor": "timed out after 0.5s", "show": "1"}
    assert list(runner._deadlines._runs) == []  # every run forgotten once over (in this process: run_here)
    runner.close()


# --- the spawner: the commands run in a small child of the helper ------------

def rss_kb(pid):
    line = next(l for l in Path("/proc/%d/status" % pid).read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1])


def test_commands_run_in_one_spawner_that_keeps_its_size():
    runner = Runner(timeout=5)
    first = int(runner.run("sh", ["-c", "echo $PPID"]))
    spawner = runner._spawner.pid
    assert first == spawner != os.getpid()
    ballast = bytearray(200 << 20)  # the helper grows, as it does with its peers
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    assert int(runner.run("sh", ["-c", "echo $PPID"])) == spawner  # the same spawner, still small
    assert rss_kb(spawner) < rss_kb(os.getpid()) - (150 << 10)
    runner.close()
    assert not Path("/proc/%d" % spawner).exists()  # ended and reaped


def test_a_large_output_reaches_the_helper_without_growing_the_spawner():
    runner = Runner(timeout=5)
    runner.run("true", [])
    before = rss_kb(runner._spawner.pid)
    out = runner.run("sh", ["-c", "head -c 30000000 /dev/zero | tr '\\0' a; echo"])  # a 60,000-peer dump is ~10 MB
    assert len(out) == 30000001 and set(out) == {"a", "\n"}
    assert rss_kb(runner._spawner.pid) < before + (5 << 10)  # it went to the helper's memfd, not through here
    runner.close()


def _inheritable(fd):
    try:
        return os.get_inheritable(fd)
    except OSError:  # the listing's own descriptor, closed by now
        return False


def test_a_command_sees_no_descriptor_of_the_helper_or_the_spawner():
    runner = Runner(timeout=5)
    opened = [socket.socketpair() for _ in range(3)]  # busy descriptors in the helper, as its clients'
    # What this test process inherited open from whoever started it (systemd starts the helper with none).
    outside = {fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and _inheritable(fd)}
    seen = {int(fd) for fd in runner.run("sh", ["-c", "ls /proc/$$/fd"]).split()}
    assert seen - outside == {0, 1, 2}
    runner.close()
    for a, b in opened:
        a.close()
        b.close()


def test_a_spawner_that_died_is_replaced_and_its_command_fails_as_data():
    runner = Runner(timeout=5)
    runner.run("true", [])
    dead = runner._spawner.pid
    outcome = {}

    def slow():
        try:
            runner.run("sleep", ["3"])
        except CommandFailed as exc:
            outcome["error"] = (exc.command, exc.exit_code, exc.stderr)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    os.kill(dead, signal.SIGKILL)
    thread.join(10)
    assert outcome["error"] == ("sleep", None, "the command spawner ended during the command")
    assert int(runner.run("sh", ["-c", "echo $PPID"])) == runner._spawner.pid != dead
    runner.close()


SPAWNER_OUTLIVED = r"""
import os, signal, sys, time
from wghelper.argv import Runner
runner = Runner(timeout=5)
runner.run("true", [])
spawner = runner._spawner.pid
os.kill(spawner, signal.SIGTERM)  # as a stop signal to the whole group would: the helper decides when
time.sleep(0.2)
print(spawner, int(runner.run("sh", ["-c", "echo $PPID"])), flush=True)
sys.stdin.read()
"""


def test_the_spawner_outlives_a_stop_signal_and_ends_with_the_helper_even_a_killed_one():
    helper = subprocess.Popen([sys.executable, "-c", SPAWNER_OUTLIVED], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        spawner, ran_from = map(int, helper.stdout.readline().split())
        assert ran_from == spawner and Path("/proc/%d" % spawner).exists()
        helper.kill()  # no close(), no cleanup: only its end of the socket goes
        helper.wait(10)
        gone = time.monotonic() + 10
        while Path("/proc/%d" % spawner).exists() and time.monotonic() < gone:
            time.sleep(0.05)
        assert not Path("/proc/%d" % spawner).exists()
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


def test_deadlines_fire_in_order_and_not_once_forgotten():
    deadlines, fired = Deadlines(), []
    done = threading.Event()
    deadlines.watch(0.3, lambda: (fired.append("late"), done.set()))
    forgotten = deadlines.watch(0.05, lambda: fired.append("forgotten"))
    deadlines.watch(0.1, lambda: fired.append("early"))
    deadlines.forget(forgotten)
    assert done.wait(5)
    time.sleep(0.1)
    assert fired == ["early", "late"]


def test_real_runner_refuses_a_missing_tool():
    with pytest.raises(CommandFailed) as info:
        Runner(timeout=5).run("om-no-such-tool", [])
    assert info.value.stderr == "not found in PATH"


def test_clean_stderr_redacts_and_truncates():
    secret = keys.generate_private_key()
    assert clean_stderr(("bad key %s\n" % secret).encode(), secret + "\n") == "bad key [redacted]"
    assert len(clean_stderr("x" * 5000)) == 503


def test_deadlines_outlive_an_expire_that_fails():
    deadlines, fired = Deadlines(), threading.Event()

    def fails():
        raise ProcessLookupError("gone already")

    deadlines.watch(0.01, fails)
    deadlines.watch(0.1, fired.set)
    assert fired.wait(5)


NFT_IN_NETNS = r"""
import json, sys
from wghelper.argv import Runner
from wghelper.errors import CommandFailed
runner = Runner(timeout=5)
runner.nft_text("table inet omtest {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n}\n")
runner.nft_text("add element inet omtest s { 192.0.2.7 }\n")
try:
    runner.nft_text("add element inet omtest s { 192.0.2.8 }\nadd element inet omtest nosuch { 192.0.2.9 }\n")
    failed = None
except CommandFailed as exc:
    failed = [exc.command, exc.stderr]
runner.nft_text("add quota inet omtest q1 { over 1000 bytes used 7 bytes }\n")
listed = json.loads(runner.nft_json(["list", "quotas", "table", "inet", "omtest"]))
try:
    runner.nft_json(["list", "quotas", "table", "inet", "omnosuch"])
    missing = None
except CommandFailed as exc:
    missing = exc.stderr
runner.nft_text("add element inet omtest s { 192.0.2.10 }\n")  # text output again after a listing
print(json.dumps([failed, listed, missing]))
"""


def test_real_nft_text_applies_whole_transactions_in_its_own_namespace():
    need("nft")
    from tests.e2e.netns import Netns

    with Netns("nftlib") as ns:
        done = ns.run(sys.executable, "-c", NFT_IN_NETNS, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        (command, stderr), quotas, missing = json.loads(done.stdout.strip().splitlines()[-1])
        listed = ns.run("nft", "list", "set", "inet", "omtest", "s").stdout
    # The line that failed is the one quoted.
    assert command == "nft" and stderr.startswith("input:2:") and "nosuch" in stderr and "No such file" in stderr
    # The failed transaction added nothing, not even its first line (the control: the first change landed).
    assert "192.0.2.7" in listed and "192.0.2.8" not in listed and "192.0.2.10" in listed
    # A listing is the JSON `nft -j` prints; a missing table is the error firewall.py looks for.
    assert [(q["quota"]["name"], q["quota"]["used"]) for q in quotas["nftables"] if "quota" in q] == [("q1", 7)]
    assert firewall._NO_TABLE in missing
