"""README command one, run as written (inside a namespace), and its printed curl lines."""
import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

from .netns import unique_ifname

ROOT = Path(__file__).parents[2]


def _lines(stream, out):
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def test_run_local_prints_working_token_and_curl(netns, tmp_path):
    ns = netns("local")
    interface = unique_ifname("oml")
    env = dict(os.environ, ORBMESH_RUN_DIR=str(tmp_path / "run"), ORBMESH_INTERFACE=interface)
    proc = ns.popen([str(ROOT / "scripts" / "run-local")], env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    output = []
    try:
        while not output or "Stop: Ctrl-C" not in output[-1]:
            line = lines.get(timeout=180)
            assert line is not None, "run-local exited early:\n" + "".join(output)
            output.append(line)
        text = "".join(output)
        connect = next(line for line in output if line.startswith("curl -s -X POST"))
        status = next(line for line in output if line.startswith("curl -s http") and "/wireguard/status" in line)

        reply = json.loads(ns.run("bash", "-c", connect).stdout)
        assert reply["success"] is True and reply["ip"] == "10.8.0.2/32", reply
        assert reply["publicKey"] in ns.run("wg", "show", interface, "peers").stdout
        live = json.loads(ns.run("bash", "-c", status).stdout)
        assert live == {"success": True, "publicKey": reply["serverPublicKey"], "peerCount": 1}
        assert "JWT_SECRET" not in text and "Traceback" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert ns.run("ip", "link", "show", interface, check=False).returncode != 0, "interface left behind"
    assert ns.pids() == [], "processes left running"
