"""Dependencies flow one way: entry points -> models, data, utils -> ldm (STYLE.md)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

ENTRY_POINTS = {"train", "test", "super_resolve", "demo"}
FORBIDDEN = {
    "ldm": {
        "lightning",
        "pytorch_lightning",
        "omegaconf",
        "models",
        "data",
        "utils",
        *ENTRY_POINTS,
    },
    "utils": {"models", *ENTRY_POINTS},
    "data": {"models", *ENTRY_POINTS},
    "models": {*ENTRY_POINTS},
}


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_flow_one_way(package):
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path)
        if name in FORBIDDEN[package]
    ]
    assert not bad, bad


def test_no_device_literals_or_prints_in_library_code():
    bad = []
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for token in (".cuda()", '"cuda:0"', "'cuda:0'"):
                if token in text:
                    bad.append(f"{path.relative_to(ROOT)}: {token}")
            tree = ast.parse(text)
            calls = [
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
            ]
            if calls and path.name != "__main__.py":
                bad.append(f"{path.relative_to(ROOT)}: print() at line {calls[0].lineno}")
    assert not bad, bad
