"""Shared test fixtures: the repo on sys.path, ../shared paths, tiny configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or pytest.skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (needs the project's ../shared folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def conformance():
    """The authors' reference traces (`../shared/reference/conformance_small.pt`)."""
    return torch.load(
        shared_path("reference", "conformance_small.pt"), map_location="cpu", weights_only=False
    )
