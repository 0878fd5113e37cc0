"""The relay is a client package: it imports the standard library and
`websockets`, never the server, and its modules import each other without a
circle.  Checked twice: statically (ast, every import statement) and in a
fresh interpreter (what actually ends up loaded)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orbmesh_relay"
MODULES = {"__init__", "__main__", "framing", "probe", "liveness", "route", "udpio", "common", "udp", "ws", "http",
           "auto", "status", "relay", "cli"}
ALLOWED_THIRD_PARTY = {"websockets"}
SERVER_SIDE = ("flask", "app", "wghelper", "sh", "gevent", "werkzeug")


def imports_of(source, module, package):
    """(top-level names imported from outside, package modules imported) of one module's source."""
    outside, inside = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: from . import x / from .x import y (the package is flat).
                assert node.level == 1, "%s: relative import above the package" % module
                base = package + ("." + node.module if node.module else "")
            else:
                base = node.module
            targets = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for name, names in targets:
            parts = name.split(".")
            if parts[0] != package:
                outside.add(parts[0])
            elif len(parts) > 1:
                inside.add(parts[1])
            else:
                # from orbmesh_relay import x: a module if x is one, else the package itself.
                inside.update(n if n in MODULES else "__init__" for n in names or ["__init__"])
    inside.discard(module)
    return outside, inside


def import_graph(directory, package):
    graph, outside = {}, {}
    for path in sorted(directory.glob("*.py")):
        module = path.stem
        outside[module], graph[module] = imports_of(path.read_text(), module, package)
    return graph, outside


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_package_has_no_import_cycle():
    graph, _ = import_graph(PACKAGE, "orbmesh_relay")
    assert set(graph) == MODULES
    # The walker sees the imports that exist (an empty graph has no cycle either).
    assert {"ws", "http", "udp", "auto", "common"} <= graph["relay"]
    assert graph["ws"] == {"common", "framing", "route"} and graph["http"] == {"common", "framing", "route"}
    assert graph["auto"] == {"udp", "ws", "http"}  # the transports, never relay.py
    assert graph["probe"] == set() and graph["framing"] == set()  # the server loads these alone
    assert graph["udpio"] == {"framing"}  # the one UDP layer, which the server's tunnel pipe loads too
    assert graph["__init__"] == set()  # so the server's import of framing loads nothing else
    assert find_cycle(graph) is None


def test_cycle_finder_finds_a_circle(tmp_path):
    # The shape the relay used to have: a module and its transports importing each other.
    (tmp_path / "relay.py").write_text("from .common import Stats\n\ndef pick():\n    from .ws import Ws\n")
    (tmp_path / "ws.py").write_text("from .relay import MAX_DATAGRAM\n")
    (tmp_path / "common.py").write_text("import socket\n")
    graph, _ = import_graph(tmp_path, "pkg")
    assert find_cycle(graph) == ["relay", "ws", "relay"]
    (tmp_path / "ws.py").write_text("from .common import Stats\n")
    assert find_cycle(import_graph(tmp_path, "pkg")[0]) is None


def outside_imports_refused(outside):
    stdlib = set(sys.stdlib_module_names)
    return {module: sorted(names - stdlib - ALLOWED_THIRD_PARTY) for module, names in outside.items()
            if names - stdlib - ALLOWED_THIRD_PARTY}


def test_imports_only_the_standard_library_and_websockets():
    _, outside = import_graph(PACKAGE, "orbmesh_relay")
    assert "websockets" in outside["ws"]  # control: outside imports are seen
    assert outside_imports_refused(outside) == {}


def test_outside_import_check_refuses_server_code(tmp_path):
    (tmp_path / "bad.py").write_text("import flask\nfrom app.store import x\nimport wghelper.commands\nimport json\n")
    (tmp_path / "good.py").write_text("import json\nfrom websockets.sync.client import connect\n")
    _, outside = import_graph(tmp_path, "pkg")
    assert outside_imports_refused(outside) == {"bad": ["app", "flask", "wghelper"]}


# Run in a fresh interpreter: imports the package, every module in it (found
# by pkgutil, so a module added later is covered), and any extra modules
# named on the command line; prints what got loaded.
PROBE = """
import importlib, json, pkgutil, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import orbmesh_relay
names = sorted(m.name for m in pkgutil.iter_modules(orbmesh_relay.__path__, "orbmesh_relay."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def probe(*extra):
    done = subprocess.run([sys.executable, "-c", PROBE, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    result["server_side"] = sorted(m for m in result["loaded"] if m.split(".")[0] in SERVER_SIDE)
    return result


def test_fresh_interpreter_loads_no_server_code():
    result = probe()
    assert set(result["modules"]) == {"orbmesh_relay." + m for m in MODULES - {"__init__"}}
    assert "websockets" in result["loaded"]  # control: the probe sees third-party imports
    assert result["server_side"] == []
    # Control in the same test: the same probe reports server code once it is loaded.
    polluted = probe("flask")
    assert "flask" in polluted["server_side"] and "werkzeug" in polluted["server_side"]


@pytest.mark.parametrize("module,also", [("framing", []), ("probe", []), ("udpio", ["framing"])])
def test_server_loads_only_the_wire_formats_and_the_udp_layer(module, also):
    done = subprocess.run([sys.executable, "-c", "import json, sys, orbmesh_relay.%s; "
                           "print(json.dumps(sorted(sys.modules)))" % module], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert [m for m in loaded if m.split(".")[0] == "orbmesh_relay"] == sorted(
        ["orbmesh_relay"] + ["orbmesh_relay." + name for name in [module] + also])
    assert "websockets" not in loaded


@pytest.mark.parametrize("module", sorted(MODULES - {"__init__", "__main__"}))
def test_every_module_has_a_test_file(module):
    assert (Path(__file__).parent / ("test_%s.py" % module)).exists()
