"""report(): figures shown in pytest's terminal summary (tests/conftest.py), not printed by a test."""
import sys

from tests import conftest, fuzz_hooks


class Reporter:
    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title):
        self.lines.append("== %s" % title)

    def write_line(self, line):
        self.lines.append(line)


def test_reported_lines_are_shown_under_their_title_and_a_key_keeps_the_latest(monkeypatch):
    monkeypatch.setattr(fuzz_hooks, "_REPORTS", {})
    fuzz_hooks.report("fuzz runs", "api: 1 request", key="api")
    fuzz_hooks.report("fuzz runs", "helper: 9 frames")
    fuzz_hooks.report("other", "x")
    fuzz_hooks.report("fuzz runs", "api: 2 requests", key="api")
    reporter = Reporter()
    conftest.pytest_terminal_summary(reporter)
    assert reporter.lines == ["== fuzz runs", "api: 2 requests", "helper: 9 frames", "== other", "x"]


def test_nothing_is_shown_when_nothing_was_reported(monkeypatch):
    monkeypatch.setattr(fuzz_hooks, "_REPORTS", {})
    reporter = Reporter()
    conftest.pytest_terminal_summary(reporter)
    assert reporter.lines == []


def test_the_summary_does_not_import_the_hooks_itself(monkeypatch):
    """Importing tests.fuzz_hooks loads schemathesis; a run that never imported it has nothing to show."""
    monkeypatch.setattr(fuzz_hooks, "_REPORTS", {})
    fuzz_hooks.report("fuzz runs", "left over")
    monkeypatch.delitem(sys.modules, "tests.fuzz_hooks")
    reporter = Reporter()
    conftest.pytest_terminal_summary(reporter)
    assert reporter.lines == [] and "tests.fuzz_hooks" not in sys.modules
