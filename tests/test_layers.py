"""The privilege line, as the imports show it.

The web workers import only the helper's stdlib contract (frames, the
command table, validators, the shared settings, the errors), never `sh`
or code that runs as root; in the helper, wghelper/argv.py is the only
module that runs programs or reaches libnftables.  Each check has a control that proves it can fail.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"wghelper", "wghelper.errors", "wghelper.protocol", "wghelper.requests", "wghelper.settings",
            "wghelper.validate"}
RUNS_PROGRAMS = {("os", name) for name in ("system", "popen", "execv", "execve", "execvp", "execl", "execlp",
                                            "spawnv", "spawnve", "spawnl", "posix_spawn", "posix_spawnp", "fork")}

LOADED = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import app
app.create_app({"DB_PATH": sys.argv[1], "JWT_SECRET": "s" * 40, "RECONCILE_CHECK_INTERVAL": 0})
def seen():
    return sorted(m for m in sys.modules if m in ("sh", "nftables") or m.startswith(("sh.", "nftables.", "wghelper")))
first = seen()
import wghelper.argv  # the control: root-side code, loaded on purpose
print(json.dumps([first, seen()]))
"""


def test_app_workers_load_only_the_helper_contract(tmp_path):
    done = subprocess.run([sys.executable, "-c", LOADED, str(tmp_path / "db.sqlite")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    app_loaded, control = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(app_loaded) <= CONTRACT, "the app loaded root-side modules: %s" % (set(app_loaded) - CONTRACT)
    assert "wghelper.protocol" in app_loaded  # it does use the contract
    assert {"sh", "wghelper.argv"} <= set(control) - CONTRACT


def stdlib_or_contract(source, module_name):
    """Imports of `source` that are neither the standard library nor a contract module."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = ["wghelper." + (node.module or alias.name) for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in sys.stdlib_module_names and ".".join(name.split(".")[:2]) not in CONTRACT:
                bad.append("%s imports %s" % (module_name, name))
    return bad


def test_contract_modules_import_only_the_standard_library_and_each_other():
    for name in sorted(CONTRACT - {"wghelper"}):
        path = ROOT / (name.replace(".", "/") + ".py")
        assert stdlib_or_contract(path.read_text(), name) == []
    assert stdlib_or_contract("import sh\nfrom .argv import Runner\nimport json\n", "control") == [
        "control imports sh", "control imports wghelper.argv"]


RUNNERS = ("sh", "subprocess", "nftables")  # nftables: libnftables changes the ruleset from within the process


def programs_run(source):
    """What in `source` can start a program (sh, subprocess, os.system/exec*/spawn*/fork) or change the
    ruleset itself (nftables)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in RUNNERS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in RUNNERS:
            found.append(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in RUNS_PROGRAMS:
                found.append("%s.%s" % (node.value.id, node.attr))
    return found


def test_only_the_argv_file_runs_programs():
    running = {}
    for package in ("app", "wghelper", "orbmesh_relay"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found = programs_run(path.read_text())
            if found:
                running[str(path.relative_to(ROOT))] = found
    # os.fork: the Runner's spawner, the small child of the helper that runs every argv with sh.
    assert running == {"wghelper/argv.py": ["sh", "nftables", "os.fork"]}
    assert sorted(programs_run("import subprocess\nimport os\nos.system('id')\nfrom sh import wg\nimport nftables\n")) \
        == ["nftables", "os.system", "sh", "subprocess"]
