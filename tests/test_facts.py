"""One owner per fact: a pattern both processes check is written in one place, and everyone asks it.

The userUuid / device / exit identifier lives in wghelper/validate.py (the
contract the app imports); a second spelling of it anywhere in the code is
a pattern that can drift.  The check has a control that must fail.
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
