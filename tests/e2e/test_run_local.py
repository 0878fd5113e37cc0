"""README command one, run as written (inside a namespace), and its printed curl lines."""
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.need import missing

from .netns import unique_ifname

ROOT = Path(__file__).parents[2]
NOBODY = 65534


def _lines(stream, out):
    for line in iter(stream.readline, ""):
        out.put(line)
    out.put(None)


def uids(pid):
    """(real, effective) uid of a process."""
    line = next(l for l in open("/proc/%d/status" % pid) if l.startswith("Uid:"))
    return tuple(int(u) for u in line.split()[1:3])


def test_run_local_prints_working_token_and_curl(netns):
    """... and runs the app unprivileged, as nobody, like production (the virtualenv's python was once a link
    into root's home, which nobody cannot run, and the app fell back to root)."""
    readable = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "test",
                               "-r", str(ROOT / "app" / "__init__.py")])
    if readable.returncode != 0:
        missing("user nobody cannot read the checkout %s, so run-local rightly runs the app as root" % ROOT)
    ns = netns("local")
    interface = unique_ifname("oml")
    # Not under pytest's tmp_path (0700): nobody must reach the run directory.
    run_dir = Path(tempfile.mkdtemp(prefix="omlocal-"))
    os.chmod(run_dir, 0o755)
    env = dict(os.environ, ORBMESH_RUN_DIR=str(run_dir / "run"), ORBMESH_INTERFACE=interface)
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
        assert "app as nobody" in text, text
        gunicorn = [pid for pid in ns.pids() if b"gunicorn" in open("/proc/%d/cmdline" % pid, "rb").read()]
        workers = [pid for pid in gunicorn if int(open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[1])
                   in gunicorn]
        assert workers and all(uids(pid) == (NOBODY, NOBODY) for pid in workers), [uids(p) for p in gunicorn]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert ns.run("ip", "link", "show", interface, check=False).returncode != 0, "interface left behind"
    assert ns.pids() == [], "processes left running"
