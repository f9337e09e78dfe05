"""Deterministic weights for the conformance fixture (tests/fixtures/conformance_compact.pt).

The fixture stores the authors' reference traces (config, schedule, cases) and the name and shape of
every tensor of the stage-2 state dict, but not the weights: those were drawn from seeded generators
by the recipe "seeded-v1", which `regenerate_state_dict` replays bit for bit.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "conformance_compact.pt"

# The diffusion schedule buffers and the EMA counters are not part of the stored state dict.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)
EMA_COUNTERS = frozenset({"model_ema.decay", "model_ema.num_updates"})


def seeded_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The recipe's value for one state-dict key.

    A generator seeded from `seed` and the CRC32 of `key` draws a standard normal tensor; matrices
    and kernels (>= 2 dims) are divided by sqrt(fan-in), 1-d `...weight` tensors become
    `1 + 0.1 * randn` (norm scales), every other 1-d tensor `0.1 * randn` (biases).

    Args:
        key: the state-dict key (or `"ema:" + key` for an EMA offset).
        shape: the tensor's shape.
        seed: the recipe's seed.

    Returns:
        A float32 tensor of `shape`.
    """
    generator = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=generator)
    if len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1 + 0.1 * noise
    return 0.1 * noise


def ema_name(model_key: str) -> str:
    """LitEma's buffer name for a `model.` parameter: prefix dropped, dots removed."""
    return "model_ema." + model_key.removeprefix("model.").replace(".", "")


def regenerate_state_dict(compact: dict) -> dict[str, torch.Tensor]:
    """Rebuild the authors'-format stage-2 state dict of the conformance cases.

    Args:
        compact: the loaded fixture, with `key_shapes` (a list of `(key, shape)` pairs) and
            `weights = {"recipe": "seeded-v1", "seed": int, "scale_factor": float}`.

    Returns:
        `{key: tensor}` with `first_stage_model.*`, `cond_stage_model.*`, `model.diffusion_model.*`,
        `model_ema.*` (the EMA weights = raw weights + 0.01 * a seeded offset) and `scale_factor`;
        without the schedule buffers and the EMA counters.

    Raises:
        ValueError: if the fixture names a recipe other than "seeded-v1".
    """
    weights = compact["weights"]
    if weights.get("recipe") != "seeded-v1":
        raise ValueError(f"unknown weight recipe {weights.get('recipe')!r}; expected 'seeded-v1'")
    seed = int(weights["seed"])
    shapes = {key: tuple(shape) for key, shape in compact["key_shapes"]}
    raw = {
        key: seeded_tensor(key, shape, seed)
        for key, shape in shapes.items()
        if key != "scale_factor"
        and key not in SCHEDULE_BUFFERS | EMA_COUNTERS
        and not key.startswith("model_ema.")
    }
    ema = {
        ema_name(key): value + 0.01 * seeded_tensor("ema:" + key, shapes[key], seed)
        for key, value in raw.items()
        if key.startswith("model.")
    }
    state_dict = {}
    for key in shapes:
        if key == "scale_factor":
            state_dict[key] = torch.tensor(weights["scale_factor"], dtype=torch.float32)
        elif key in raw:
            state_dict[key] = raw[key]
        elif key in ema:
            state_dict[key] = ema[key]
        elif key.startswith("model_ema.") and key not in EMA_COUNTERS:
            raise ValueError(f"{key} names no `model.` parameter of the fixture")
    return state_dict


def load_conformance(path: Path = FIXTURE) -> dict:
    """The conformance fixture with its `state_dict` regenerated (the layout of the full file)."""
    compact = torch.load(path, map_location="cpu", weights_only=False)
    return {**compact, "state_dict": regenerate_state_dict(compact)}
