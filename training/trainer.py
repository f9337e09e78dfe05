"""The Lightning pieces of a run from its config: the trainer's arguments (checked), loggers,
callbacks, the DDP strategy of a manually optimised model, and the learning rate."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from training.checkpoints import (
    ConfigInCheckpoint,
    InterruptCheckpoint,
    ResumePointInCheckpoint,
    RNGStateInCheckpoint,
)
from utils.config import ConfigError, get_obj_from_str, to_plain

log = logging.getLogger(__name__)


def trainer_config(config: Any, options: Mapping[str, Any]) -> Any:
    """`lightning.trainer` with train.py's options (`accelerator`, `devices`, `precision`; None =
    the config's) applied, after checking its keys."""
    trainer_cfg = config.setdefault("lightning", {}).setdefault("trainer", {})
    trainer_cfg.update({k: v for k, v in options.items() if v is not None})
    # The one-scale-per-batch sampler shards indices across ranks itself.
    trainer_cfg.setdefault("use_distributed_sampler", False)
    check_lightning_config(config.lightning)
    return trainer_cfg


LIGHTNING_KEYS = ("trainer", "logger", "callbacks")
# Trainer arguments train.py sets itself, and where to set them instead.
_OWN_TRAINER_KEYS = {
    "callbacks": "lightning.callbacks (added to train.py's own)",
    "default_root_dir": "--logdir, --run-dir or --name",
    "plugins": "nothing: train.py sets its checkpoint I/O plugin",
}


def check_lightning_config(lightning: Mapping) -> None:
    """Every key of the `lightning` section and of `lightning.trainer` must be known (a typo
    names the valid keys); `lightning.trainer.logger` may only be true or false."""
    _check_keys(lightning, LIGHTNING_KEYS, "lightning")
    trainer = lightning.get("trainer") or {}
    valid = [k for k in inspect.signature(pl.Trainer.__init__).parameters if k != "self"]
    for key, where in _OWN_TRAINER_KEYS.items():
        if key in trainer:
            raise ConfigError(f"lightning.trainer.{key} is set by train.py; use {where}")
    _check_keys(trainer, [k for k in valid if k not in _OWN_TRAINER_KEYS], "lightning.trainer")
    if not isinstance(trainer.get("logger", True), bool):
        raise ConfigError(
            "lightning.trainer.logger must be true or false; configure loggers under "
            "lightning.logger (target/params blocks)"
        )


def _check_keys(block: Mapping, valid, where: str) -> None:
    unknown = sorted(set(block) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key {f'{where}.{unknown[0]}'!r}; valid keys under {where}: "
            f"{sorted(valid)}"
        )


def _blocks(value: Any, where: str) -> list[tuple[str, Mapping]]:
    """A `target`/`params` block, a list of them, or a mapping of named blocks (latent-diffusion
    style) -> [(where, block)]."""
    if value is None:
        return []
    if isinstance(value, Mapping) and "target" not in value:
        return [b for name, v in value.items() for b in _blocks(v, f"{where}.{name}")]
    if isinstance(value, Mapping):
        return [(where, value)]
    if isinstance(value, (list, tuple)):
        return [b for i, v in enumerate(value) for b in _blocks(v, f"{where}[{i}]")]
    raise ConfigError(f"{where} must be a target/params block or a list of them, got {value!r}")


def _build(where: str, block: Mapping, **defaults: Any) -> Any:
    """`target(**params)`, with `defaults` for the arguments the target takes and params omit."""
    _check_keys(block, ("target", "params"), where)
    try:
        cls = get_obj_from_str(block["target"])
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{where}.target: {err}") from err
    params, accepted = dict(block.get("params") or {}), inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        _check_keys(params, accepted, f"{where}.params")
    params.update({k: v for k, v in defaults.items() if k in accepted and k not in params})
    try:
        return cls(**params)
    except ImportError as err:  # e.g. WandbLogger without the wandb package
        raise ConfigError(f"{where} ({block['target']}) needs a missing package: {err}") from err


DEFAULT_LOGGERS = [
    {"target": "pytorch_lightning.loggers.TensorBoardLogger"},
    {"target": "pytorch_lightning.loggers.CSVLogger"},
]


def build_loggers(lightning: Mapping, run_dir: Path, resumed: bool = False) -> list | bool:
    """The loggers of `lightning.logger` (default TensorBoard + CSV), writing into the run folder;
    False for `lightning.trainer.logger: false`.

    TensorBoard goes to `tensorboard/` (appended across resumes), CSV to `csv/`; a resumed run
    gets its own CSV folder (`csv_resumed_<timestamp>`), since the CSV logger rewrites the folder
    it is given. Other loggers (W&B, MLflow, ...) get `save_dir=<run>` unless their params set it.
    """
    if not (lightning.get("trainer") or {}).get("logger", True):
        return False
    csv = f"csv_resumed_{datetime.now():%Y-%m-%dT%H-%M-%S}" if resumed else "csv"
    versions = {"TensorBoardLogger": "tensorboard", "CSVLogger": csv}
    loggers = []
    blocks = _blocks(to_plain(lightning.get("logger")), "lightning.logger")
    for where, block in blocks or _blocks(DEFAULT_LOGGERS, "lightning.logger"):
        kind = str(block["target"]).rpartition(".")[2]
        defaults = {"name": "", "version": versions[kind]} if kind in versions else {}
        loggers.append(_build(where, block, save_dir=str(run_dir), **defaults))
    return loggers


def build_callbacks(config: Any, run_dir: Path, seed: int | None = None) -> list[Callback]:
    """Best-by-monitor + last checkpoints, the config, RNG and resume-point callbacks, the
    interrupt checkpoint, a learning-rate monitor (when there is a logger), then the callbacks of
    `lightning.callbacks`."""
    model_cfg, lightning = config.model, config.get("lightning") or {}
    monitor = model_cfg.get("monitor") or (model_cfg.get("params") or {}).get("monitor")
    mode = model_cfg.get("monitor_mode") or ("max" if monitor and "psnr" in monitor else "min")
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        # best.ckpt: a stable name to point stage 2 at (the epoch is inside the checkpoint)
        filename="best" if monitor else "epoch={epoch:04d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_last=True,
        save_top_k=1,
        # Overwrite last.ckpt of an earlier start of this run rather than writing last-v1.ckpt,
        # which `--resume <run>` would not find.
        enable_version_counter=False,
    )
    callbacks = [
        checkpoint,
        ConfigInCheckpoint(config, seed),
        RNGStateInCheckpoint(),
        ResumePointInCheckpoint(),
        InterruptCheckpoint(run_dir / "checkpoints"),
    ]
    if (lightning.get("trainer") or {}).get("logger", True):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    user = _blocks(to_plain(lightning.get("callbacks")), "lightning.callbacks")
    return callbacks + [_build(where, block) for where, block in user]


def resolve_strategy(trainer_cfg: Any, model: pl.LightningModule) -> None:
    """`strategy: ddp` for a manually optimised GAN (stage 1) becomes DDP with unused-parameter
    detection: its discriminator step leaves the autoencoder without gradients, which plain DDP
    rejects. Other strategies pass through unchanged."""
    if trainer_cfg.get("strategy") == "ddp" and not model.automatic_optimization:
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"


def set_learning_rate(model: pl.LightningModule, config: Any, trainer: pl.Trainer) -> float:
    """lr = base_learning_rate x batch size x gradient accumulation (the authors' rule: their
    launch script always ends up with ngpu = 1), x devices x nodes too with our option
    `model.scale_lr_by_devices: true` (the usual linear scaling with the global batch)."""
    base = config.model.get("base_learning_rate")
    if base is None:
        raise ConfigError("model.base_learning_rate is missing from the config")
    batch = int(config.data.params.batch_size)
    accumulate = int(trainer.accumulate_grad_batches)
    by_devices = bool(config.model.get("scale_lr_by_devices", False))
    devices, nodes = (int(trainer.num_devices), int(trainer.num_nodes)) if by_devices else (1, 1)
    model.learning_rate = lr = base * batch * devices * nodes * accumulate
    if trainer.is_global_zero:
        rule = "" if by_devices else " (devices, nodes not counted: model.scale_lr_by_devices)"
        log.info(
            "learning rate %.2e = %.2e (base) x %d (batch) x %d (devices) x %d (nodes) x %d "
            "(accumulation)%s",
            *(lr, base, batch, devices, nodes, accumulate, rule),
        )
    return lr
