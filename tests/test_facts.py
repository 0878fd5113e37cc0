"""One owner per fact: a pattern both processes check, or a loop both sides run, is written in one place.

The userUuid / device / exit identifier lives in wghelper/validate.py (the
contract the app imports); the UDP send loop (GSO runs, the fallback, what
is lost) in orbmesh_relay/udpio.py, which the server's tunnel pipe imports.
A second copy of either is one that can drift.  Each check has a control
that must fail.
"""
import re
from pathlib import Path

from wghelper import validate

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "wghelper", "orbmesh_relay")


def spellings(source):
    """Lines of `source` that write the identifier's character class out."""
    return [line.strip() for line in source.splitlines() if "A-Za-z0-9_.:@-" in line]


def test_the_identifier_pattern_is_written_once():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = spellings(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert list(found) == ["wghelper/validate.py"] and len(found["wghelper/validate.py"]) == 1, found
    assert spellings('_ID = re.compile(r"\\A[A-Za-z0-9_.:@-]{1,128}\\Z")') != []  # the control


def test_everyone_asks_the_one_pattern():
    from app import config
    from app.api import auth, schemas
    from app.bridge import exits, smartconnect
    from app.peers import usage
    assert config._USER_ID is auth._ID is usage._USER is validate.USER_RE is validate.IDENTIFIER_RE
    assert schemas._ID_DOC["pattern"] == "^%s$" % validate.IDENTIFIER
    assert exits.IDENTIFIER_RE is smartconnect.IDENTIFIER_RE is validate.IDENTIFIER_RE
    assert validate.IDENTIFIER_RE.match("orb-1@example.com") and not validate.IDENTIFIER_RE.match("a b")
    assert not validate.IDENTIFIER_RE.match("a\n") and not validate.IDENTIFIER_RE.match("x" * 129)


def send_loops(source):
    """Lines of `source` that send a datagram run with UDP segmentation (sendmsg with gso_control)."""
    return [line.strip() for line in source.splitlines() if "sendmsg(" in line and "gso_control" in line]


def test_one_udp_layer_for_the_server_and_the_relay():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = send_loops(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert list(found) == ["orbmesh_relay/udpio.py"], found
    assert send_loops("self.sock.sendmsg([b''.join(run)], gso_control(segment))") != []  # the control
    from app.tunnel import sessions
    from orbmesh_relay import udpio
    assert sessions.send_runs is udpio.send_runs
