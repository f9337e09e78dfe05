"""Config helpers: build objects from `target`/`params` blocks and load/merge YAML files.

Also maps the authors' `target:` module paths (e.g. `modules.e2sr.s1_v6.GAPEncoder`) to ours, so
their YAML files work unchanged.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

# The authors' class paths -> ours. Their code kept one file per version; ours has one class each.
AUTHORS_TARGETS = {
    "models.second_stage_van_v4.S2Model": "models.ldcsr.LDCSR",
    "models.first_stage_kl_atom.AutoencoderKL": "models.autoencoder.AutoencoderKL",
    "models.first_stage_kl_v6.AutoencoderKL": "models.autoencoder.AutoencoderKL",
    "modules.e2sr.s1_v6.GAPEncoder": "ldm.gap.GAPEncoder",
    "modules.e2sr.s1_v6.GAPDecoder": "ldm.gap.GAPDecoder",
    "modules.diffusionmodules.openaimodel.UNetModel": "ldm.unet.UNetModel",
    "modules.losses.LPIPSWithDiscriminator": "ldm.losses.LPIPSWithDiscriminator",
    "modules.losses.contperceptual.LPIPSWithDiscriminator": "ldm.losses.LPIPSWithDiscriminator",
    "ldm.modules.losses.LPIPSWithDiscriminator": "ldm.losses.LPIPSWithDiscriminator",
}


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` (authors' paths are translated first)."""
    path = AUTHORS_TARGETS.get(path, path)
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"target {path!r} is not a dotted path like 'package.module.Class'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import target {path!r}: {err}") from err


def instantiate_from_config(config: Mapping, **extra: Any) -> Any:
    """Build `target(**params, **extra)` from a `{target, params}` mapping.

    Raises:
        KeyError: if `target` is missing.
        TypeError: naming the target and the offending key when `params` has an unknown key.
    """
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in config block with keys {list(config)}")
    cls = get_obj_from_str(config["target"])
    params = dict(config.get("params") or {})
    params.update(extra)
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"while building {config['target']}: {err}") from err


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and how to fix it."""


SECTIONS = ("model", "data", "lightning")


def load_config(paths: list[str], overrides: list[str] = ()) -> Any:
    """Merges YAML files left to right, then applies `dotted.key=value` overrides.

    An override must name a key that exists in the merged files, except under `lightning.`, whose
    keys are checked by the Trainer/callbacks themselves; a typo therefore fails here, naming it.

    Returns:
        An OmegaConf DictConfig with (some of) the sections `model`, `data`, `lightning`.
    """
    from omegaconf import OmegaConf

    configs = []
    for path in paths:
        try:
            configs.append(OmegaConf.load(path))
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
    config = OmegaConf.merge(*configs)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        exists = OmegaConf.select(config, key, default=_MISSING, throw_on_missing=False)
        if not key.startswith("lightning.") and exists is _MISSING:
            _check_new_key(config, key, item)
        parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]  # YAML typing: 1 -> int, null -> None
        OmegaConf.update(config, key, parsed, merge=False)
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown top-level config sections {sorted(unknown)}; allowed: {SECTIONS}"
        )
    return config


_MISSING = object()


def _check_new_key(config: Any, key: str, item: str) -> None:
    """A key absent from the files may be added only as a constructor argument of the block's
    `target` (e.g. `data.params.train.params.repeat=4`); anything else is a typo."""
    from omegaconf import OmegaConf

    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    known = sorted(node.keys()) if hasattr(node, "keys") else []
    block = (
        OmegaConf.select(config, parent.rpartition(".")[0]) if parent.endswith("params") else None
    )
    if block is not None and "target" in block:
        accepted = list(inspect.signature(get_obj_from_str(block.target)).parameters)
        if name in accepted:
            return
        known = accepted
    raise ConfigError(
        f"unknown config key {key!r} (from override {item!r}); valid keys under "
        f"{parent or 'the top level'}: {known}"
    )


# Keys of the authors' stage-2 `params` that our LDCSR does not take, with the only value the
# method supports (None: any value, the key is informational for their trainer).
_AUTHORS_STAGE2_KEYS = {
    "log_every_t": None,
    "loss_type": "l2",
    "parameterization": "eps",
    "first_stage_key": None,
    "cond_stage_key": None,
    "image_size": None,
    "channels": None,
    "cond_stage_trainable": True,
    "conditioning_key": "hybrid_adm",
    "monitor": None,
}


def translate_authors_config(config: Any) -> dict:
    """The authors' YAML (as a plain dict) -> ours: targets mapped, unused stage-2 keys dropped.

    Our own configs pass through unchanged. Raises ConfigError when an authors' key holds a value
    that this implementation does not support (e.g. `parameterization: x0`).
    """
    config = dict(config)
    model = dict(config.get("model") or {})
    if model.get("target") in AUTHORS_TARGETS:
        params = dict(model.get("params") or {})
        for key, supported in _AUTHORS_STAGE2_KEYS.items():
            value = params.pop(key, None)
            if supported is not None and value is not None and value != supported:
                raise ConfigError(f"model.params.{key}={value!r} is not supported ({supported!r})")
            if key == "monitor" and value:
                model.setdefault("monitor", value)
        model["target"] = AUTHORS_TARGETS[model["target"]]
        model["params"] = params
        config["model"] = model
    return config


def to_plain(config: Any) -> Any:
    """OmegaConf node -> plain dict/list (`???` kept as a string); anything else unchanged.

    LightningModules store their config arguments this way, so checkpoints hold only plain types
    and load with `torch.load(weights_only=True)`.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    return config
