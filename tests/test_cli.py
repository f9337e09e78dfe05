"""Shared command-line helpers of the entry points (utils/cli.py)."""

from __future__ import annotations

import pytest
import torch

from utils.cli import pick_device


class _FlagError(ValueError):
    pass


def test_pick_device_resolves_auto_and_names_the_fix_for_missing_cuda():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: nothing to refuse")
    with pytest.raises(_FlagError, match="use cpu or auto"):
        pick_device("cuda", _FlagError)


# data.prepare_split as a module: run as a file, it replaces the process (test_prepare_split.py)
ENTRY_POINTS = ["train.py", "test.py", "super_resolve.py", "demo.py", "data.prepare_split"]
_HELP = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    sys.argv, buf = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        if script.endswith(".py"):
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


def test_help_texts_show_each_default_once_and_keep_example_line_breaks():
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, SUBPROCESS_TIMEOUT

    env = {"COLUMNS": "200", "PATH": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _HELP, *ENTRY_POINTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    helps = json.loads(proc.stdout.splitlines()[-1])
    for script in ENTRY_POINTS:
        text = helps[script]
        assert "usage:" in text, f"{script}: no help text"
        assert "(default: None)" not in text, script
        twice = [line for line in text.splitlines() if line.lower().count("default") > 1]
        assert not twice, f"{script} prints a default twice: {twice}"
        examples = [line for line in text.splitlines() if line.startswith("    python ")]
        assert examples, f"{script}: the example commands lost their line breaks"
