"""The docs stand on their own: relative links resolve, the tests that docs/departures.md names
exist, and nothing points outside the repository."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

DOCS = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.name}: links to missing files {broken}"


def test_departures_table_names_tests_that_exist():
    text = (ROOT / "docs" / "departures.md").read_text()
    missing, current = [], None
    for path, name, bare in TEST_REF.findall(text):
        current = path or current
        name = name or bare
        if not name:
            continue
        source = (ROOT / current).read_text() if (ROOT / current).exists() else ""
        if f"def {name}(" not in source:
            missing.append(f"{current}::{name}")
    assert not missing, f"docs/departures.md names tests that do not exist: {missing}"


def test_nothing_points_outside_the_repository():
    files = [*DOCS, *ROOT.glob("*.py")]
    for package in ("ldm", "models", "data", "utils", "evaluation", "benchmarks", "configs"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    bad = [
        f"{path.relative_to(ROOT)}: {token}"
        for path in files
        for token in ("../shared", "ARCHITECTURE.md")
        if token in path.read_text()
    ]
    assert not bad, bad


def test_reliability_table_rows_each_name_tests_that_exist():
    """docs/reliability.md: every row of its tables names at least one test, and they exist."""
    rows, current, missing = 0, None, []
    for line in (ROOT / "docs" / "reliability.md").read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| Case |"):
            continue
        rows += 1
        refs = TEST_REF.findall(line)
        if not any(name or bare for _, name, bare in refs):
            missing.append(f"no test named in row: {line[:60]}")
        for path, name, bare in refs:
            current = path or current
            source = (ROOT / current).read_text() if (ROOT / current).exists() else ""
            if f"def {name or bare}(" not in source:
                missing.append(f"{current}::{name or bare}")
    assert rows >= 30 and not missing, missing
