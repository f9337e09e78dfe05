"""Shared command-line conventions of the entry points (train.py, test.py, ...)."""

from __future__ import annotations

import argparse
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.config import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default once and keeps the module docstring's line breaks (its examples).

    A help text that names its default itself ("default: ...") or a flag whose default is None,
    False or empty gets no automatic "(default: ...)".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, "", []):
            return text
        return super()._get_help_string(action)


def pick_device(name: str, error: type[Exception] = ValueError) -> torch.device:
    """The torch device for a `--device` flag: "cpu", "cuda" or "auto" (CUDA when available).

    Raises:
        error: (the caller's error type) for "cuda" on a machine without CUDA.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda was given but CUDA is not available; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_writable_folder(folder: str | Path, flag: str, error: type[Exception] = ValueError):
    """Checks that `folder` exists or can be made, and can be written, leaving nothing behind:
    its first existing ancestor must be a folder in which a probe folder can be made.

    Raises:
        error: (the caller's error type) naming the flag, the folder and why (a path under a
            file, a read-only or full disk, no permission).
    """
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{flag} {folder} is not writable: {existing} is a file, not a folder; "
                    f"choose another {flag}")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise error(
            f"{flag} {folder} is not writable ({err.strerror or err} in {existing}); choose "
            f"another {flag}"
        ) from err


@contextmanager
def checkpoint_load_errors(checkpoint: str | Path) -> Iterator[None]:
    """Turns what loading `checkpoint` raises when it is no checkpoint or does not fit its config
    (ValueError, unpickling errors, a truncated file) into one `ConfigError` "cannot load
    <checkpoint>: <reason>"; a ConfigError (its message names the checkpoint) passes unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, pickle.UnpicklingError, EOFError) as err:
        raise ConfigError(f"cannot load {checkpoint}: {err}") from err


def memory_size(value: str) -> float | str:
    """`--max-memory` values: "auto" (a share of the memory available at run time) or GB > 0."""
    if value == "auto":
        return value
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give GB > 0 (e.g. 2) or 'auto'")
    return gb
