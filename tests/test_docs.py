"""The README and docs/ stay in step with the code.

The settings, error-code and metric tables are parsed from the markdown
(names in the first column), so a missing row fails even when the name is
mentioned elsewhere on the page.  Each comparison also runs against a
deliberately altered copy and must report the change.
"""
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import config
from app.api import errors
from tests.conftest import API_KEYS
from wghelper import settings as helper_settings

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 450
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MODULE_PACKAGES = ("app", "orbmesh_relay", "wghelper")
# Inline code that names a file of this repository: `app/...`, `tests/...`.
CITED_PATH_RE = re.compile(r"(?:app|wghelper|tests|deploy|bench|scripts|docs)/[A-Za-z0-9_./@-]*")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# Where the code keeps each list.  Point these at the new home when it moves.

def setting_names():
    """Every ORBMESH_* setting the app or the helper reads, without the prefix."""
    return set(config.SETTINGS) | set(helper_settings.HELPER)


def error_codes():
    """Every error code and its HTTP status."""
    return dict(errors.CODES)


def metric_names(client):
    """Every metric /metrics exposes, as the docs name them (counters with _total)."""
    response = client.get("/metrics", headers={"X-API-Key": API_KEYS[0]})
    assert response.status_code == 200
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


# Markdown, read the way a reader sees it.

def read(name):
    return (ROOT / name).read_text()


def without_code_blocks(text):
    """`text` with fenced code blocks blanked (line count kept)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def section(text, heading):
    """The body under the heading named `heading` (any level), up to the next heading of that level or higher."""
    lines = without_code_blocks(text).splitlines()
    for start, line in enumerate(lines):
        match = re.fullmatch(r"(#+) (.*)", line)
        if match and match.group(2).strip() == heading:
            level = len(match.group(1))
            body = []
            for line in lines[start + 1:]:
                other = re.match(r"(#+) ", line)
                if other and len(other.group(1)) <= level:
                    break
                body.append(line)
            return "\n".join(body)
    raise AssertionError("no heading %r" % heading)


def _cells(line):
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text):
    """Every pipe table in `text` as (header cells, rows of cells)."""
    found, lines = [], without_code_blocks(text).splitlines()
    i = 0
    while i + 1 < len(lines):
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header, rows = _cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                row = _cells(lines[i])
                assert len(row) == len(header), "%d cells under a header of %d: %s" % (len(row), len(header), lines[i])
                rows.append(row)
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def first_column(text, heading, header):
    """The first-column cells of every table under `heading` whose first header cell is `header`."""
    return [row[0] for head, rows in tables(section(text, heading)) if head[0] == header for row in rows]


def code_names(cell):
    """The `names` in one cell; a cell may hold several (`a`, `b`)."""
    names = re.findall(r"`([^`]+)`", cell)
    assert names and re.fullmatch(r"(`[^`]+`(, )?)+", cell), "not a list of `names`: %r" % cell
    return names


def mismatch(documented, expected):
    """What a documented list gets wrong against the code: missing, extra, repeated names."""
    report = {"missing": sorted(set(expected) - set(documented)),
              "extra": sorted(set(documented) - set(expected)),
              "repeated": sorted({name for name in documented if documented.count(name) > 1})}
    return {key: value for key, value in report.items() if value}


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    return {slug(match) for match in re.findall(r"^#+ (.*)$", without_code_blocks(text), re.M)}


def broken_links(page, text):
    """Relative links in `text` (the page at `page`) whose file or heading does not exist."""
    broken = []
    for target in LINK_RE.findall(without_code_blocks(text)):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto: are not ours to check
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(target)
    return broken


def missing_cited_paths(text):
    """Repository paths named in inline code that do not exist."""
    cited = set()
    for span in re.findall(r"`([^`]+)`", without_code_blocks(text)):  # a span may wrap a line
        if CITED_PATH_RE.fullmatch(span):
            cited.add(span)
    return sorted(path for path in cited if not (ROOT / path).exists())


def documented_settings(text):
    return [name for cell in first_column(text, "Settings", "variable") for name in code_names(cell)]


def settings_in_code_form(names):
    """ORBMESH_X names from the table, as the code spells them (X)."""
    out = []
    for name in names:
        assert name.startswith(config.PREFIX), "not an ORBMESH_ setting: %s" % name
        out.append(name[len(config.PREFIX):])
    return out


def documented_codes(text):
    """[(code, status)] from the error table in the Errors section."""
    out = []
    for head, rows in tables(section(text, "Errors")):
        if head[:2] == ["code", "HTTP"]:
            out += [(code_names(row[0])[0], int(row[1])) for row in rows]
    return out


def documented_metrics(text):
    return [name for cell in first_column(text, "Metrics", "metric") for name in code_names(cell)]


# The checks, each with a control that must fail.

def test_configuration_lists_exactly_the_settings():
    documented = settings_in_code_form(documented_settings(read("docs/configuration.md")))
    assert len(documented) > 50
    assert mismatch(documented, setting_names()) == {}


def test_settings_check_reports_a_missing_extra_or_repeated_row():
    text = read("docs/configuration.md")
    row = next(line for line in text.splitlines() if line.startswith("| `ORBMESH_TRUSTED_PROXIES` |"))
    without = text.replace(row + "\n", "")
    # The name is still on the page (the Logs section), but not in a table row: that is a miss.
    assert "`ORBMESH_TRUSTED_PROXIES`" in without
    assert mismatch(settings_in_code_form(documented_settings(without)), setting_names()) == {
        "missing": ["TRUSTED_PROXIES"]}
    extra = text.replace(row, row + "\n| `ORBMESH_NOT_A_SETTING` | `1` | nothing |")
    assert mismatch(settings_in_code_form(documented_settings(extra)), setting_names()) == {
        "extra": ["NOT_A_SETTING"]}
    twice = text.replace(row, row + "\n" + row)
    assert mismatch(settings_in_code_form(documented_settings(twice)), setting_names()) == {
        "repeated": ["TRUSTED_PROXIES"]}


def test_api_lists_exactly_the_error_codes_with_their_status():
    documented = documented_codes(read("docs/api.md"))
    assert mismatch([code for code, _ in documented], error_codes()) == {}
    assert dict(documented) == error_codes()


def test_error_code_check_reports_a_wrong_status_or_missing_row():
    text = read("docs/api.md")
    row = next(line for line in text.splitlines() if line.startswith("| `CONFLICT` | 409 |"))
    wrong = dict(documented_codes(text.replace(row, row.replace("409", "410"))))
    assert wrong != error_codes() and wrong["CONFLICT"] == 410
    without = text.replace(row + "\n", "")
    assert "CONFLICT" in without  # still named on the page, but not in the table
    assert mismatch([code for code, _ in documented_codes(without)], error_codes()) == {"missing": ["CONFLICT"]}


def test_configuration_lists_exactly_the_metrics(client):
    exposed = metric_names(client)
    assert "orbmesh_connect_requests_total" in exposed and "orbmesh_quarantined_peers" in exposed
    assert mismatch(documented_metrics(read("docs/configuration.md")), exposed) == {}


def test_metrics_check_reports_a_missing_name_in_a_shared_row(client):
    text = read("docs/configuration.md")
    cell = "`orbmesh_pool_addresses`, `orbmesh_pool_free_addresses`"
    assert cell in text
    altered = text.replace(cell, "`orbmesh_pool_addresses`")
    assert "orbmesh_pool_free_addresses" not in section(altered, "Metrics")
    assert mismatch(documented_metrics(altered), metric_names(client)) == {"missing": ["orbmesh_pool_free_addresses"]}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_existing_files_and_headings(page):
    assert broken_links(page, page.read_text()) == []


def test_link_check_reports_a_missing_file_or_heading():
    page = DOCS / "api.md"
    text = "[ok](../README.md) [ok](#errors) [gone](nowhere.md) [gone](operations.md#no-such-heading) " \
           "[ok](https://example.com/x) [ok](operations.md#nat-and-forwarding)"
    assert broken_links(page, text) == ["nowhere.md", "operations.md#no-such-heading"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_paths_exist(page):
    assert missing_cited_paths(page.read_text()) == []


def test_cited_path_check_reports_a_moved_file():
    text = "see `tests/app/peers/test_sweep.py` and `tests/unit/test_app_sweep.py`, `--flag` and `wg show`"
    assert missing_cited_paths(text) == ["tests/unit/test_app_sweep.py"]


def readme_too_long(text):
    return len(text.splitlines()) >= README_MAX_LINES


def test_readme_is_the_front_door():
    text = read("README.md")
    assert not readme_too_long(text)
    assert readme_too_long(text + "line\n" * README_MAX_LINES)
    # The two commands, as run-local's test and CI run them.
    assert "```sh\n./scripts/run-local\n```" in text and "```sh\n./scripts/test\n```" in text
    for page in ("api", "configuration", "operations", "security", "benchmarks", "testing", "tunnel-protocol"):
        assert "(docs/%s.md)" % page in text


def module_table(text):
    """(named, implied): the files the README's module table names, and the package markers its rows imply.

    A row names a file with a link to it, or, when its first cell links to a
    directory, with `name.py` in its second cell; such a row implies the
    directory's __init__.py and __main__.py.
    """
    named, implied = set(), set()
    for _, rows in tables(section(text, "Where requests go")):
        for row in rows:
            targets = LINK_RE.findall(row[0])
            named.update(target for target in targets if target.endswith(".py"))
            for folder in (target for target in targets if target.endswith("/")):
                named.update(folder + name for name in re.findall(r"`([A-Za-z0-9_]+\.py)`", row[1]))
                implied.update(folder + name for name in ("__init__.py", "__main__.py"))
    return named, implied


def modules_in_tree():
    return {str(path.relative_to(ROOT)) for package in MODULE_PACKAGES for path in (ROOT / package).rglob("*.py")}


def module_table_mismatch(text, tree):
    """Modules the table leaves out (package markers and entry points may go unnamed), and named files that are gone."""
    named, implied = module_table(text)
    markers = {path for path in tree if path.rsplit("/", 1)[-1] in ("__init__.py", "__main__.py")}
    report = {"missing": sorted(tree - named - implied - markers), "gone": sorted(named - tree)}
    return {key: value for key, value in report.items() if value}


def test_readme_module_table_names_every_module_of_the_tree():
    tree = modules_in_tree()
    assert len(tree) > 60 and "app/peers/lifecycle.py" in tree and "app/dns/unbound.py" in tree
    assert module_table_mismatch(read("README.md"), tree) == {}


def test_module_table_check_reports_a_missing_or_moved_module():
    text, tree = read("README.md"), modules_in_tree()
    # The control: a module the table does not name, and a row that names a file no longer there.
    assert module_table_mismatch(text, tree | {"app/dns/zones.py"}) == {"missing": ["app/dns/zones.py"]}
    moved = text.replace("`unbound.py`: Unbound's config", "`unbound.py`: Unbound's config; `zones.py`: zones")
    assert moved != text
    assert module_table_mismatch(moved, tree) == {"gone": ["app/dns/zones.py"]}
    row = next(line for line in text.splitlines() if line.startswith("| [`wghelper/bridge.py`]"))
    assert module_table_mismatch(text.replace(row + "\n", ""), tree) == {"missing": ["wghelper/bridge.py"]}
