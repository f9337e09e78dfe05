"""Build a ready-to-run model from a checkpoint: ours (train.py) or the authors' release."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from utils.checkpoint import load_state, read_checkpoint
from utils.config import ConfigError, instantiate_from_config, translate_authors_config

log = logging.getLogger(__name__)

# Derived from the config, so their absence in a checkpoint is harmless.
_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


def find_config(checkpoint: str | Path, ckpt: dict, config: Any = None) -> dict:
    """The model config: `config` (path or mapping), else the one stored in the checkpoint by
    train.py, else `<run>/configs/*.yaml` beside `<run>/checkpoints/<file>.ckpt`."""
    if config is None and isinstance(ckpt.get("config"), dict):
        config = ckpt["config"]
    if config is None:
        found = sorted((Path(checkpoint).resolve().parent.parent / "configs").glob("*.yaml"))
        if not found:
            raise ConfigError(
                f"no config for {checkpoint}: it stores none and no <run>/configs/*.yaml is "
                "beside it; pass the training YAML (e.g. --config configs/second_stage_van_v4.yaml)"
            )
        config = found[-1]
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            raise ConfigError(f"config file not found: {config}")
        config = OmegaConf.load(config)
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    return translate_authors_config(config)


def load_sr_model(checkpoint: str | Path, config: Any = None, map_location="cpu"):
    """Returns the stage-2 `LDCSR` of `checkpoint` in eval mode (EMA weights used for sampling).

    Args:
        checkpoint: our Lightning checkpoint or the authors' (`first_stage_model.*`,
            `cond_stage_model.*`, `model.diffusion_model.*`, `model_ema.*`, `scale_factor`).
        config: a YAML path or mapping, ours or the authors' (their `target:` strings are
            translated); default: the config saved by train.py (see `find_config`).
        map_location: where to load the tensors.

    Missing or unexpected keys are logged (schedule buffers and `loss.*` excepted).
    """
    ckpt = read_checkpoint(checkpoint, map_location)
    state = ckpt["state_dict"]
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise ConfigError(
            f"{checkpoint} is not a stage-2 (diffusion) checkpoint; for a stage-1 autoencoder "
            "use test.py --first-stage or models.load_first_stage_model"
        )
    model_cfg = _model_config(checkpoint, ckpt, config)
    params = dict(model_cfg.get("params") or {})
    if "first_stage_config" not in params:
        raise ConfigError(
            f"the config of {checkpoint} (target {model_cfg.get('target')}) is not a stage-2 "
            "config (no first_stage_config); pass the stage-2 YAML it was trained with"
        )
    first = dict(params["first_stage_config"])
    # The checkpoint carries the stage-1 weights: do not read (or require) the stage-1 file.
    first["params"] = {**first.get("params", {}), "ckpt_path": None}
    params.update(first_stage_config=first, ckpt_path=None)
    model = instantiate_from_config({"target": model_cfg["target"], "params": params})
    state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.loss.")}
    missing, _ = load_state(model, state, source=str(checkpoint))
    if any(k not in _SCHEDULE_KEYS for k in missing):
        log.warning("%s lacks %d model weights; results will be wrong", checkpoint, len(missing))
    return model.eval().to(map_location)


def load_first_stage_model(checkpoint: str | Path, config: Any = None, map_location="cpu"):
    """Returns the stage-1 `AutoencoderKL` of a stage-1 checkpoint (or of a stage-2 one's
    `first_stage_model`) in eval mode, without its training loss."""
    ckpt = read_checkpoint(checkpoint, map_location)
    state = ckpt["state_dict"]
    model_cfg = _model_config(checkpoint, ckpt, config)
    if any(k.startswith("first_stage_model.") for k in state):
        # a stage-2 checkpoint: its stage-2 config holds the stage-1 block (a stage-1 YAML is it)
        model_cfg = (model_cfg.get("params") or {}).get("first_stage_config") or model_cfg
        prefix = "first_stage_model."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    params = {**model_cfg.get("params", {}), "lossconfig": None, "ckpt_path": None}
    model = instantiate_from_config({"target": model_cfg["target"], "params": params})
    missing, _ = load_state(model, state, ignore_prefixes=("loss.",), source=str(checkpoint))
    if len(missing) == len(model.state_dict()):
        raise ConfigError(
            f"{checkpoint} holds none of the stage-1 autoencoder's weights (a checkpoint of "
            "another model?); give a train.py checkpoint of either stage or the authors' release"
        )
    return model.eval().to(map_location)


def _model_config(checkpoint, ckpt: dict, config: Any) -> dict:
    """The `model` block of `find_config`, or a ConfigError naming the config that has none."""
    model_cfg = find_config(checkpoint, ckpt, config).get("model")
    if not isinstance(model_cfg, dict) or "target" not in model_cfg:
        raise ConfigError(
            f"the config of {checkpoint} has no model: target/params block; pass the YAML the "
            "checkpoint was trained with (--config)"
        )
    return model_cfg
