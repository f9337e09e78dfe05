"""Shared command-line helpers of the entry points (utils/cli.py)."""

from __future__ import annotations

import pickle

import pytest
import torch

from utils.cli import checkpoint_load_errors, pick_device
from utils.config import ConfigError


class _FlagError(ValueError):
    pass


def test_pick_device_resolves_auto_and_names_the_fix_for_missing_cuda():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: nothing to refuse")
    with pytest.raises(_FlagError, match="use cpu or auto"):
        pick_device("cuda", _FlagError)


@pytest.mark.parametrize(
    "error", [ValueError("holds no state dict"), pickle.UnpicklingError("bad key"), EOFError("eof")]
)
def test_checkpoint_load_errors_name_the_checkpoint_once(error):
    """test.py and super_resolve.py: a file that is no checkpoint of this model -> one ConfigError
    naming it; a ConfigError of the loader (which names the file itself) is not wrapped again."""
    with pytest.raises(ConfigError) as info, checkpoint_load_errors("run/last.ckpt"):
        raise error
    assert str(info.value) == f"cannot load run/last.ckpt: {error}"
    own = ConfigError("run/last.ckpt is not a stage-2 (diffusion) checkpoint")
    with pytest.raises(ConfigError) as info, checkpoint_load_errors("run/last.ckpt"):
        raise own
    assert info.value is own


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
