"""Checkpoint reading shared by both stages: ours (Lightning) and the authors' (Lightning 1.x),
loaded into a module with a report of what did not match. (Writing them is training/'s.)"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Returns the checkpoint dict stored in `path`, with the model weights under "state_dict".

    Reads our Lightning checkpoints, the authors' (Lightning 1.x) and bare state dicts (wrapped as
    `{"state_dict": ...}`); other entries (e.g. the "config" train.py stores) are kept.

    Raises:
        FileNotFoundError: naming the path when it does not exist.
        ValueError: when the file is not a PyTorch checkpoint or holds no state dict.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a folder; give the .ckpt file in it (e.g. "
            f"{path}/checkpoints/last.ckpt for a train.py run)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check the path or the config key)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (expected a dict, got {type(ckpt).__name__})")
    if isinstance(ckpt.get("state_dict"), dict):
        return ckpt
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": ckpt}
    raise ValueError(f"{path} holds no state dict (expected a 'state_dict' entry or tensors)")


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The model state dict of `read_checkpoint(path)` (same errors)."""
    return read_checkpoint(path, map_location)["state_dict"]


def load_state(
    module: nn.Module, state: dict, ignore_prefixes: Iterable[str] = (), source: str = "state dict"
) -> tuple[list[str], list[str]]:
    """Loads `state` into `module` non-strictly and reports what did not match.

    Shape mismatches raise, naming the key. Missing/unexpected keys are logged as warnings and
    returned, so callers can decide what is acceptable.
    """
    ignore = tuple(ignore_prefixes)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    own = module.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(
            f"{source} does not fit this model's config ({len(bad)} shape mismatches, e.g. "
            f"{bad[:3]}): use the config the checkpoint was trained with"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        log.warning("%s: %d missing keys, e.g. %s", source, len(missing), missing[:5])
    if unexpected:
        log.warning("%s: %d unexpected keys, e.g. %s", source, len(unexpected), unexpected[:5])
    return list(missing), list(unexpected)


def load_weights(
    module: nn.Module, path: str | Path, ignore_prefixes: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """`load_state(module, read_state_dict(path))`, logging the file that was loaded."""
    missing, unexpected = load_state(module, read_state_dict(path), ignore_prefixes, str(path))
    log.info("restored %s from %s", type(module).__name__, path)
    return missing, unexpected
