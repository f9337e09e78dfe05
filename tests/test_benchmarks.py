"""The benchmarks are modules of the `benchmarks` package, run from the repository root as
`python -m benchmarks.<name>` (benchmarks/README.md), with no import path edits."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SUBPROCESS_TIMEOUT


def test_raster_memory_runs_as_a_module_and_starts_its_children_as_modules():
    cmd = [sys.executable, "-m", "benchmarks.raster_memory", "--sizes", "64", "--model", "bicubic"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the working folder (the repository root) is all it needs
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 64x64 | 128x128 | bicubic |" in proc.stdout


@pytest.mark.parametrize("name", ["speed", "tiling", "train_speed"])
def test_benchmark_modules_import_and_document_their_module_command(name):
    """(Their measurements take minutes: only the import and the documented command.)"""
    module = importlib.import_module(f"benchmarks.{name}")
    assert f"python -m benchmarks.{name}" in module.__doc__
    assert callable(module.main)
