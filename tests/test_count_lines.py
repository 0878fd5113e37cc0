"""scripts/count-lines: the helper's code lines at the privilege line, and its threads (issue 26).

The counter is checked on a sample whose count is known by hand, and the
script is run as the docs tell a reader to run it.
"""
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "count-lines"

SAMPLE = '''"""A module docstring,
two lines long."""
import os  # a comment after code counts as code


def f(x):
    """A function's docstring."""
    # a comment alone
    text = """not a docstring:
    two lines of a string"""

    return os.path.join(x, text)


class C:
    "a one-line docstring"
    value = threading.Thread(target=f, name="sample-thread")
    guard = threading.Lock()
'''


def load():
    loader = importlib.machinery.SourceFileLoader("count_lines", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("count_lines", loader))
    loader.exec_module(module)
    return module


def test_docstrings_comments_and_blank_lines_do_not_count():
    counter = load()
    # import, def, text (2 lines), return, class, value, guard
    assert counter.code_lines(SAMPLE) == 8
    # Control: the same source with its docstrings made code counts them.
    assert counter.code_lines(SAMPLE.replace('"""A module', 'x = """A module')) == 10


def test_threads_and_locks_are_listed_by_name():
    threads, syncs = load().concurrency(SAMPLE, "sample")
    assert threads == ["sample:sample-thread"] and syncs == ["sample:Lock"]


def test_the_script_splits_the_helper_at_the_privilege_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=60,
                          check=True)
    result = json.loads(done.stdout)
    files = result["files"]
    assert result["contract"] == sum(files[name] for name in load().CONTRACT)
    assert result["contract"] + result["root-only"] == sum(files.values())
    assert {"protocol.py", "requests.py", "validate.py", "settings.py", "errors.py", "argv.py"} <= set(files)
    assert all(n > 0 for name, n in files.items() if name != "__init__.py")
