"""The one rule for tests that need something from the machine: without it they
skip, except under CI (CI set and not "false"/"0"/"no"), where they fail: a CI
run that silently skips what it was meant to prove proves nothing."""
import os
import shutil

import pytest


def under_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason):
    """Skip this test, or fail it under CI."""
    if under_ci():
        pytest.fail("CI is set, so not skipping: " + reason, pytrace=False)
    pytest.skip(reason)


def need(tool):
    """The path of `tool` (also looked for in the sbin directories), or skip/fail as above."""
    path = shutil.which(tool) or next((p for p in ("/usr/sbin/" + tool, "/sbin/" + tool) if os.path.exists(p)), None)
    if path is None:
        missing("%s is not installed" % tool)
    return path
