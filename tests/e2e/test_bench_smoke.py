"""Every benchmark in bench/ runs in smoke mode (tiny sizes, no thresholds), so none can rot.

Each smoke run builds the same namespaces, stack and relays as the full
benchmark and must write its JSON result and table.  Only correctness is
checked (no errors, database and interface agree, traffic flowed, sessions
stayed open); timing targets live in bench/, never in tests.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.need import need

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(name, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / ("%s.py" % name)), "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / ("%s.json" % name)).read_text())
    assert result["benchmark"] == name and result["smoke"] is True
    if name not in ("read_paths", "profile"):
        assert (tmp_path / ("%s.png" % name)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no chart beside the JSON"
    assert result["table"] in done.stdout
    assert "targets" not in result  # smoke runs judge nothing
    return result


def test_control_plane_smoke(tmp_path):
    result = run_smoke("control_plane", tmp_path)
    assert set(result["levels"]) == {"20"}
    level = result["levels"]["20"]
    assert level["ours"]["errors"] == 0 and level["ours_consistent_after"] and level["ours_peers_after"] == 20
    run = level["ours_runs"][0]
    assert run["saturation"]["cycles_per_s"] > 0
    assert run["open_loop"]["cycles"] > 0 and run["open_loop"]["cycles"] == run["open_loop"]["arrivals"]
    assert run["open_loop"]["cpu_ms_per_cycle"] > 0
    # The read paths polled during the open loop, the load average beside every run, RSS per process.
    reads = run["open_loop"]["reads"]
    assert reads["status"]["n"] > 0 and reads["health"]["n"] > 0 and reads["errors"] == 0
    assert len(run["load_avg_before"]) == 3 and len(run["load_avg_after"]) == 3
    assert {"helper", "spawner", "worker0", "worker1", "wireguard-go"} <= set(level["ours_rss_mb"])
    assert (tmp_path / "control_plane_rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_paths_smoke(tmp_path):
    result = run_smoke("read_paths", tmp_path)
    assert result["status"]["p99_ms"] is not None and result["health"]["p99_ms"] is not None
    assert result["reconcile_s"] is not None and result["consistent_after"]


def test_data_plane_smoke(tmp_path):
    need("iperf3")
    result = run_smoke("data_plane", tmp_path)
    for path in ("udp", "ws", "http", "websocat_client", "websocat"):
        assert result["paths"][path]["median_mbps"] > 0, path
        assert result["paths"][path]["median_rtt_ms"] is not None, path
    for path in ("ws", "http", "websocat_client"):
        assert result["paths"][path]["median_cpu_s_per_gb"] > 0, path
    assert result["many"]["median_udp_mbps"] > 0 and result["many"]["median_ws_mbps"] > 0


def test_memory_smoke(tmp_path):
    result = run_smoke("memory", tmp_path)
    run = result["runs"][0]
    assert run["alive"] == run["sessions"] == 20


def test_continuity_smoke(tmp_path):
    need("nft")
    result = run_smoke("continuity", tmp_path)
    assert result["runs"] == 1 and result["consistent_after"]
    events = result["events"]
    assert len(events) == 6
    for name, per in events.items():
        for transport in ("udp", "ws", "http"):
            assert per[transport]["median_gap_s"] is not None, (name, transport)
    # Our restarts keep every session; a lost interface cannot.
    assert all(per[t]["same_handshake"] for name, per in events.items() if "interface lost" not in name
               for t in ("udp", "ws", "http"))
    assert all(events["wireguard-go killed (interface lost)"][t]["new_handshake"] for t in ("udp", "ws", "http"))


def test_transport_auto_smoke(tmp_path):
    need("iperf3")
    need("nft")
    result = run_smoke("transport_auto", tmp_path)
    assert set(result["runs"]) == {"auto", "udp", "ws", "http"}
    for mode, run in result["runs"].items():
        assert run["per_second_mbps"] and max(run["per_second_mbps"]) > 0, mode
        assert [e["what"] for e in run["events"]] == [e["what"] for e in result["schedule"]]
    switches = result["runs"]["auto"]["switches"]
    assert switches and switches[0]["from"] == "udp" and switches[0]["to"] == "ws"  # the UDP block
    assert all(s["loss_window_s"] is not None and s["reason"] for s in switches)
    assert [r["switches"] for m, r in result["runs"].items() if m != "auto"] == [[], [], []]  # fixed: never
    assert len(result["phases"]) == len(result["schedule"]) + 1


def test_usage_smoke(tmp_path):
    need("iperf3")
    need("nft")
    result = run_smoke("usage", tmp_path)
    assert result["consistent_after"] and result["level"] == 50
    for mode in ("none", "tiers"):
        assert result[mode]["median_down_mbps"] > 0 and result[mode]["median_up_mbps"] > 0, mode
        assert result[mode]["errors"] == 0 and result[mode]["p99_ms"] is not None, mode
    # Every seeded user and the forwarding client, IPv4 and IPv6, in the plan maps; five plans and the line.
    assert result["nft_table"]["elements"] >= 2 * 51 and result["nft_table"]["tiers"] == 6
    assert result["collector"]["on"]["interval_s"] == 2.0 and result["collector"]["off"]["interval_s"] == 0


def test_tier_forwarding_smoke(tmp_path):
    need("iperf3")
    result = run_smoke("tier_forwarding", tmp_path)
    for way in ("down", "up"):
        assert len(result[way]["paired_ratios"]) == 1 and result[way]["median_paired_ratio"] > 0, way
    assert result["nft_table"]["addresses"] >= 2 * 51 and result["nft_table"]["tiers"] == 6


def test_tier_rules_smoke(tmp_path):
    need("iperf3")
    need("taskset")
    result = run_smoke("tier_rules", tmp_path)
    for mode in ("none", "sets", "map", "dispatch", "quotas"):
        assert result["modes"][mode]["median_up"] > 0 and result["modes"][mode]["median_down"] > 0, mode


def test_recovery_smoke(tmp_path):
    result = run_smoke("recovery", tmp_path)
    assert result["level"] == 20 and result["consistent_after"]
    lost, cold = result["lost"][0], result["cold"][0]
    assert lost["peers_back_s"] is not None and lost["traffic_s"] is not None
    assert cold["connect_answered_s"] is not None and cold["peers_back_s"] is not None and cold["traffic_s"]


def test_rss_growth_smoke(tmp_path):
    result = run_smoke("rss_growth", tmp_path)
    level = result["levels"]["20"]
    assert level["errors"] == 0 and level["cycles"] > 0 and len(level["samples"]) >= 2
    assert {"helper", "spawner", "worker0", "worker1", "wireguard-go"} <= set(level["growth"])


def test_profile_smoke(tmp_path):
    """The profile's plumbing: stack, load and (with py-spy installed) one collapsed-stack file per process."""
    result = run_smoke("profile", tmp_path)
    assert result["open_loop"]["errors"] == 0 and result["open_loop"]["cycles"] > 0
    if result["py_spy"]:
        assert {"helper", "spawner", "worker0", "worker1"} <= set(result["processes"])
