"""Dependencies flow one way: scripts -> evaluation -> models -> data, scenes -> utils, ldm;
training (train.py's orchestration) -> utils.

`ldm` is pure PyTorch; `utils` holds small helpers that import no other package of ours; `data`
(training data) and `scenes` (whole scenes on disk) read and write images without models; no
library module imports a script, `benchmarks` or `tests`; no code outside `tests/` imports `tests`
or edits the import path (`sys.path`): scripts run from the repository root, benchmarks and
`data.prepare_split` as modules (`python -m ...`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPTS = ("train", "test", "super_resolve", "demo", "data.prepare_split")
NOT_LIBRARY = ("benchmarks", "tests")  # never imported by the library (tests: by nothing else)
LIBRARY = ("ldm", "utils", "data", "scenes", "training", "models", "evaluation")
FORBIDDEN = {
    "utils": ("data", "scenes", "training", "models", "evaluation", "ldm"),
    "data": ("scenes", "training", "models", "evaluation"),
    "scenes": ("data", "training", "models", "evaluation"),
    "training": ("data", "scenes", "models", "evaluation"),
    "models": ("training", "evaluation"),
    "evaluation": ("training",),
    "ldm": (
        "lightning",
        "pytorch_lightning",
        "omegaconf",
        "utils",
        "data",
        "scenes",
        "training",
        "models",
        "evaluation",
    ),
}
# ldm's only third-party imports: tensors, einops, and the LPIPS network of the stage-1 loss.
LDM_ALLOWED = {"ldm", "torch", "numpy", "einops", "lpips", *sys.stdlib_module_names}


def _module_name(path: Path) -> str:
    """`data/synthetic/layout.py` -> `data.synthetic.layout`, `data/__init__.py` -> `data`."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved; `from a import b` gives `a` and
    `a.b` (b may be a submodule, e.g. `from data import prepare_split`)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files: the layering rules would check nothing"
    return files


def _violations(package: str) -> list[str]:
    """`"<file> imports <module>"` for each forbidden import (the shortest name of each)."""
    bad = []
    for path in _files(package):
        names = imported_modules(path)
        wrong = {n for n in names if _within(n, (*FORBIDDEN[package], *SCRIPTS, *NOT_LIBRARY))}
        if package == "ldm":
            wrong |= {n for n in names if n.split(".")[0] not in LDM_ALLOWED}
        shortest = sorted(n for n in wrong if not _within(n.rsplit(".", 1)[0], wrong - {n}))
        bad += [f"{path.relative_to(ROOT)} imports {n}" for n in shortest]
    return bad


@pytest.mark.parametrize("package", LIBRARY)
def test_package_imports_flow_one_way(package):
    bad = _violations(package)
    assert not bad, bad


def test_the_checker_sees_relative_and_submodule_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "x.py").write_text(
        "from . import checkpoint\nimport data.datasets as d\nfrom tests.helpers import x\n"
    )
    (tmp_path / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "y.py").write_text(
        "from .. import prepare_split\nfrom ..datasets import flat_names\nimport test\n"
    )
    assert _violations("utils") == [
        "utils/x.py imports data.datasets",
        "utils/x.py imports tests.helpers",
    ]
    assert _violations("data") == [
        "data/synthetic/y.py imports data.prepare_split",
        "data/synthetic/y.py imports test",
    ]


def _code_outside_tests() -> list[Path]:
    """Every Python file of the repository but those of tests/ (scripts, packages, benchmarks)."""
    files = sorted(ROOT.glob("*.py"))
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name != "tests"):
        files += sorted(folder.rglob("*.py"))
    assert any(p.parent.name == "benchmarks" for p in files) and ROOT / "train.py" in files
    return files


def test_scripts_and_benchmarks_do_not_import_tests():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _code_outside_tests()
        for name in sorted(imported_modules(path))
        if _within(name, ("tests",))
    ]
    assert not bad, bad


def _sys_path_uses(path: Path) -> list[int]:
    """Lines of `path` that use `sys.path` (read or write) or import `path` from sys."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            lines += [node.lineno for alias in node.names if alias.name == "path"]
    return sorted(lines)


def test_no_import_path_edits_outside_tests(tmp_path):
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in _code_outside_tests() for n in _sys_path_uses(p)]
    assert not bad, f"sys.path used (run from the repository root, or as python -m): {bad}"
    probe = tmp_path / "probe.py"  # the checker sees both spellings
    probe.write_text("import sys\nsys.path.insert(0, '.')\nfrom sys import path\n")
    assert _sys_path_uses(probe) == [2, 3]


def test_no_device_literals_or_prints_in_library_code():
    bad = []
    for package in LIBRARY:
        for path in _files(package):
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
