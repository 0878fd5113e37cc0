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
    assert result["table"] in done.stdout
    assert "targets" not in result  # smoke runs judge nothing
    return result


def test_control_plane_smoke(tmp_path):
    result = run_smoke("control_plane", tmp_path)
    assert set(result["levels"]) == {"0", "20"}
    for level in result["levels"].values():
        assert level["ours"]["errors"] == 0 and level["baseline"]["errors"] == 0
        assert level["ours_runs"][0]["connects"] > 0 and level["baseline_runs"][0]["connects"] > 0
        assert level["consistent_after"]
    assert result["levels"]["20"]["peers_after"] == 20 and result["levels"]["20"]["baseline_peers_after"] == 20


def test_read_paths_smoke(tmp_path):
    result = run_smoke("read_paths", tmp_path)
    assert result["status"]["p99_ms"] is not None and result["health"]["p99_ms"] is not None
    assert result["reconcile_s"] is not None and result["consistent_after"]


def test_data_plane_smoke(tmp_path):
    need("iperf3")
    result = run_smoke("data_plane", tmp_path)
    for path in ("udp", "ws", "http", "websocat"):
        assert result["paths"][path]["median_mbps"] > 0, path
        assert result["paths"][path]["median_rtt_ms"] is not None, path


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
