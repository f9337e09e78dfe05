"""Networks keep their internals: no module outside `ldm/` reads a private attribute (`x._name`)
of another object. The inference pipeline and the scripts call the networks' public stage
methods instead."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("models", "evaluation", "scenes", "data", "training", "utils", "benchmarks")
SCRIPTS = ("train.py", "test.py", "super_resolve.py", "demo.py")
# "<path>: <expression>" reads that cannot be avoided outside a network, each with its reason.
# Empty today; e.g. `sys._getframe` or `torch._dynamo` would go here with a comment.
ALLOWED: set[str] = set()


def private_reads(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every `x._name` (one leading underscore, not a dunder) whose `x` is
    not `self`, `cls` or `super()`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        name, owner = node.attr, node.value
        if not name.startswith("_") or name.startswith("__"):
            continue
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_finds_private_reads_and_spares_own_ones():
    source = "a = model._trainer\nb = self._x\nc = super()._y\nd = m.__class__\ne = f(x)._z\n"
    assert private_reads(source) == [(1, "model._trainer"), (5, "f(x)._z")]


def test_no_module_outside_ldm_reads_a_private_attribute():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    files += [ROOT / name for name in SCRIPTS]
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, expr in private_reads(path.read_text(encoding="utf-8")):
            if f"{rel}: {expr}" not in ALLOWED:
                bad.append(f"{rel}:{line}: {expr}")
    assert not bad, "private attributes read from outside (add a public method):\n" + "\n".join(bad)
