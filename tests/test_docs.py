"""The docs name what the code has (as datasette's tests/test_docs.py does): every registered removal
method and each of its parameters, and every registered metric and layer statistic, in docs/analysis.md; every ingest setting
in docs/ingest.md's settings table (tests/test_settings_docs.py checks its defaults and order). Every
relative link in README.md and docs/*.md reaches a file, and the heading it names; README.md stays a
newcomer's page of at most 200 lines that keeps the two commands exactly as CI and newcomers run them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_settings_docs import documented_settings

from analysis.measures import LAYER_STATS, MEASURES
from analysis.residualize import COMMON, registry
from ingest.config import FIELD_NAMES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SETUP = 'pip install -e ".[dev,distributed]" && python -m ingest && python -m views warm-up'
TESTS = "python -m pytest"

METHODS = registry()
PARAMS = sorted({p.name for cls in METHODS.values() for p in cls.params} | {p.name for p in COMMON})


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is no heading, a `[x](y)` no link)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def first_column(text: str, header: str) -> set[str]:
    """The backticked names in the first column of the markdown table whose header row is `header`."""
    assert header in text, f"no table with header {header!r}"
    table = text.split(header, 1)[1].split("\n\n", 1)[0]
    names = set()
    for row in table.splitlines()[2:]:  # after the header's own line end and the |---| row
        names |= backticked(row.strip().strip("|").split(" | ")[0])
    return names


ANALYSIS = read(DOCS / "analysis.md")
METHOD_TABLE = first_column(ANALYSIS, "| method | removes | parameters |")
METRIC_TABLE = first_column(ANALYSIS, "| metric | what it says | chance |")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_removal_method_has_a_row_in_the_methods_table(method):
    assert method in METHOD_TABLE, f"docs/analysis.md's methods table has no row for `{method}`"


def test_the_methods_table_names_only_registered_methods():
    assert METHOD_TABLE <= set(METHODS), f"not registered: {sorted(METHOD_TABLE - set(METHODS))}"


@pytest.mark.parametrize("param", PARAMS)
def test_every_method_parameter_is_named_in_the_analysis_page(param):
    assert param in backticked(ANALYSIS), f"docs/analysis.md never names the parameter `{param}`"


@pytest.mark.parametrize("measure", sorted(MEASURES) + sorted(LAYER_STATS))
def test_every_registered_metric_has_a_row_in_the_metrics_table(measure):
    """Measures and layer statistics (analysis.measures.LAYER_STATS) alike."""
    assert measure in METRIC_TABLE, f"docs/analysis.md's metrics table has no row for `{measure}`"


@pytest.mark.parametrize("setting", FIELD_NAMES)
def test_every_ingest_setting_has_a_row_in_the_settings_table(setting):
    assert setting in documented_settings(), f"docs/ingest.md's settings table has no row for `{setting}`"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(read(path)), re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def links(path: Path) -> list[str]:
    """The targets of the page's links and images, outside code."""
    text = re.sub(r"`[^`\n]*`", "code", prose(read(path)))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def test_the_link_checker_sees_links_headings_and_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# A page: its `title`\n\n## Zero-PE, (the what-if)\n\n```bash\n# not a heading [x](nowhere.md)\n```\n\n"
        "See [`it`](other.md#part) and ![alt (with brackets)](img.png), not `[y](code.md)`.\n",
        encoding="utf-8",
    )
    assert links(page) == ["other.md#part", "img.png"]
    assert anchors(page) == {"a-page-its-title", "zero-pe-the-what-if"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(
                f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_readme_is_a_newcomers_page():
    lines = read(README).splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_keeps_the_two_commands_exactly():
    blocks = re.findall(r"```bash\n(.*?)```", read(README), re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()]
    assert SETUP in commands and TESTS in commands
