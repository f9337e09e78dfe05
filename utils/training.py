"""Run-folder, logger, callback and learning-rate helpers used by train.py."""

from __future__ import annotations

import logging
import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from utils.config import ConfigError

log = logging.getLogger(__name__)


def make_run_dir(logdir: str | Path, stem: str, name: str = "") -> Path:
    """Returns a new `logdir/stem/<timestamp>[_name]` folder; never reuses an existing one."""
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    base = Path(logdir) / stem / (f"{stamp}_{name}" if name else stamp)
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def resolve_resume(path: str | Path) -> tuple[Path, Path, list[str]]:
    """`--resume` target -> (run folder, checkpoint, saved config files).

    Accepts a run folder (uses checkpoints/last.ckpt) or a checkpoint inside one.
    """
    path = Path(path)
    if path.is_dir():
        run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
    else:
        run_dir, ckpt = path.parent.parent, path
    if not ckpt.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
    configs = sorted(str(p) for p in (run_dir / "configs").glob("*.yaml"))
    return run_dir, ckpt, configs


def save_config(config: Any, run_dir: Path, stem: str) -> Path:
    """Writes the resolved config to `run_dir/configs/<stem>.yaml` (test.py reads it back)."""
    out = run_dir / "configs" / f"{stem}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, out, resolve=True)
    return out


def build_loggers(run_dir: Path, resumed: bool = False) -> list:
    """TensorBoard (appends across resumes) and CSV logs; a resumed run gets its own CSV folder
    (`csv_resumed_<timestamp>`), since the CSV logger rewrites the folder it is given."""
    csv_version = "csv"
    if resumed:
        csv_version = f"csv_resumed_{datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}"
    return [
        TensorBoardLogger(str(run_dir), name="", version="tensorboard"),
        CSVLogger(str(run_dir), name="", version=csv_version),
    ]


class ConfigInCheckpoint(Callback):
    """Stores the resolved config in every checkpoint, so a lone .ckpt file describes its model."""

    def __init__(self, config: Any):
        self.config = OmegaConf.to_container(config, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["config"] = self.config


def build_callbacks(config: Any, run_dir: Path) -> list[Callback]:
    """Best-by-monitor + last checkpoints, the config callback and a learning-rate monitor."""
    model_cfg = config.model
    monitor = model_cfg.get("monitor") or (model_cfg.get("params") or {}).get("monitor")
    mode = model_cfg.get("monitor_mode") or ("max" if monitor and "psnr" in monitor else "min")
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="epoch={epoch:04d}-best" if monitor else "epoch={epoch:04d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_last=True,
        save_top_k=1,
    )
    return [
        checkpoint,
        ConfigInCheckpoint(config),
        RNGStateInCheckpoint(),
        SaveOnInterrupt(run_dir / "checkpoints" / "last.ckpt"),
        LearningRateMonitor(logging_interval="step"),
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<path>.tmp-<pid>`, flushes it to disk, then renames it over `<path>`.

    A save interrupted midway (killed job, full disk) leaves the previous checkpoint intact.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class RNGStateInCheckpoint(Callback):
    """Saves and restores the Python, NumPy and torch RNG states, so a resumed run draws the same
    crops, scales' noise and posterior samples as an uninterrupted one."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Tensors and plain Python types only, so the checkpoint loads with weights_only=True.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        random.setstate(states["python"])
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


class SaveOnInterrupt(Callback):
    """On Ctrl-C, SIGTERM (Lightning turns it into an exception) or a crash, writes a resumable
    `last.ckpt` (atomically) before the run ends."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Interrupts only: after a crash the state may be unusable, so last.ckpt is kept.
        interrupted = isinstance(exception, (KeyboardInterrupt, SystemExit))
        if not interrupted or trainer.global_step == 0:
            return
        trainer.save_checkpoint(str(self.path))
        log.warning(
            "%s: saved %s at step %d; continue with `python train.py --resume %s`",
            type(exception).__name__,
            self.path,
            trainer.global_step,
            self.path.parent.parent,
        )


def resolve_strategy(trainer_cfg: Any, model: pl.LightningModule) -> None:
    """`strategy: ddp` for a manually optimised GAN (stage 1) becomes DDP with unused-parameter
    detection: its discriminator step leaves the autoencoder without gradients, which plain DDP
    rejects. Other strategies pass through unchanged."""
    if trainer_cfg.get("strategy") == "ddp" and not model.automatic_optimization:
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"


def set_learning_rate(model: pl.LightningModule, config: Any, trainer: pl.Trainer) -> float:
    """lr = base_learning_rate x batch size x devices x nodes x gradient accumulation."""
    base = config.model.get("base_learning_rate")
    if base is None:
        raise ConfigError("model.base_learning_rate is missing from the config")
    batch = int(config.data.params.batch_size)
    accumulate = int(trainer.accumulate_grad_batches)
    devices, nodes = int(trainer.num_devices), int(trainer.num_nodes)
    model.learning_rate = lr = base * batch * devices * nodes * accumulate
    if trainer.is_global_zero:
        log.info(
            "learning rate %.2e = %.2e (base) x %d (batch) x %d (devices) x %d (nodes) x %d "
            "(accumulation)",
            lr,
            base,
            batch,
            devices,
            nodes,
            accumulate,
        )
    return lr
