"""Config helpers: build objects from `target`/`params` blocks and load/merge YAML files.

Also maps the authors' `target:` module paths (e.g. `modules.e2sr.s1_v6.GAPEncoder`) to ours, so
their YAML files work unchanged.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
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
        ConfigError: if `target` is missing.
        ConfigTypeError: (a TypeError) naming the target and the offending key when `params`
            has an unknown or missing key or a value of the wrong type.
    """
    if "target" not in config:
        raise ConfigError(f"expected a 'target' key in config block with keys {list(config)}")
    cls = get_obj_from_str(config["target"])
    params = dict(config.get("params") or {})
    params.update(extra)
    try:
        return cls(**params)
    except TypeError as err:  # an unknown or missing argument, or a value of the wrong type
        raise ConfigTypeError(
            f"while building {config['target']}: {err}; check its params in the config"
        ) from err


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and how to fix it."""


class ConfigTypeError(ConfigError, TypeError):
    """A block's params that its target's constructor refuses (a TypeError, as Python raises)."""


SECTIONS = ("model", "data", "lightning")


def load_config(paths: list[str], overrides: list[str] = ()) -> Any:
    """Merges YAML files left to right, then applies `dotted.key=value` overrides.

    An override must name a key that exists in the merged files, except under `lightning.`, whose
    keys are checked by the Trainer/callbacks themselves; a typo therefore fails here, naming it.

    Returns:
        An OmegaConf DictConfig with (some of) the sections `model`, `data`, `lightning`.
    """
    from omegaconf import OmegaConf

    config = None
    for path in paths:
        overlay = _load_yaml(path)
        if config is None:
            config = overlay
            continue
        merged = OmegaConf.merge(config, overlay)
        # An overlay obeys the rules of an override: a typo or a wrong type names its key.
        for key, value in _leaves(OmegaConf.to_container(overlay, throw_on_missing=False)):
            _check_override(config, merged, key, value, f"overlay {path}")
        config = merged
    config = config if config is not None else OmegaConf.create({})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]  # YAML typing: 1 -> int, null -> None
        _check_override(config, config, key, parsed, f"override {item!r}")
        OmegaConf.update(config, key, parsed, merge=False)
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown top-level config sections {sorted(unknown)}; allowed: {SECTIONS}"
        )
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:  # required values (`???`), e.g. stage 2's stage-1 checkpoint
        raise ConfigError(
            f"config key(s) {missing} have no value (??? in the YAML); set each on the command "
            f"line, e.g. {missing[0]}=<value>"
        )
    return config


_MISSING = object()


def _load_yaml(path: str) -> Any:
    """One YAML config file as an OmegaConf mapping; a missing, unparsable or non-mapping file
    is a ConfigError naming it."""
    from omegaconf import DictConfig, OmegaConf

    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path}; give a YAML file such as configs/tiny/...")
    try:
        config = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError, UnicodeDecodeError, ...
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(err)}") from err
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config file {path} must hold `section: ...` mappings, not a list/value")
    return config


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value of a nested dict; a non-empty dict is descended."""
    if not isinstance(tree, dict) or not tree:
        return [(prefix, tree)]
    return [kv for k, v in tree.items() for kv in _leaves(v, f"{prefix}.{k}" if prefix else k)]


def _check_override(base: Any, merged: Any, key: str, value: Any, source: str) -> None:
    """`key` must exist in `base` (or be a constructor argument of its block's target in
    `merged`), and `value` must have the type of the value it replaces (numbers for numbers,
    true/false for booleans, a block for a block); `lightning.*` is checked by the Trainer."""
    from omegaconf import OmegaConf

    if key.split(".")[0] == "lightning":
        return
    old = OmegaConf.select(base, key, default=_MISSING, throw_on_missing=False)
    if old is _MISSING:
        prefix = key
        while "." in prefix:  # the first part of the key that is new
            parent = prefix.rpartition(".")[0]
            if OmegaConf.select(base, parent, default=_MISSING) is not _MISSING:
                break
            prefix = parent
        _check_new_key(merged, prefix, source, shown=key)
        return
    if OmegaConf.is_config(old):
        old = OmegaConf.to_container(old, throw_on_missing=False)
    if old in (None, "???") or value in (None, "???") or isinstance(value, str) and "${" in value:
        return  # unset before, required now, or an interpolation: no type to compare
    if isinstance(old, int) and _kind(value) == "a number" and not float(value).is_integer():
        raise ConfigError(
            f"config key {key!r} (from {source}) must be a whole number like {old!r}, got {value!r}"
        )
    want, got = _kind(old), _kind(value)
    if want != got and not (want == "a string" and got == "a number"):  # name=2024 is fine
        raise ConfigError(
            f"config key {key!r} (from {source}) must be {want} like {old!r}, got {value!r}"
        )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a block or list" if isinstance(value, (dict, list)) else "a string"


def _check_new_key(config: Any, key: str, item: str, shown: str | None = None) -> None:
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
        f"unknown config key {shown or key!r} (from {item}); valid keys under "
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
