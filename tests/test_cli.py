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
