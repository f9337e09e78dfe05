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


RUN_RECORD = "run.yaml"


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The fields of `run_dir/run.yaml` (e.g. `seed`), or {} when the run has no record."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    record = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(record, dict):
        raise ConfigError(f"{path} should hold `key: value` lines, e.g. `seed: 23`")
    return record


def write_run_record(run_dir: str | Path, **fields: Any) -> Path:
    """Merges `fields` into `run_dir/run.yaml`, the run's record (kept across resumes)."""
    path = Path(run_dir) / RUN_RECORD
    record = {**read_run_record(run_dir), **fields}
    OmegaConf.save(OmegaConf.create(record), path)
    return path


def resolve_seed(seed: int | None, resume_dir: Path | None, default: int) -> int:
    """The seed of a run: `seed` (or `default`) for a new run, the recorded one for a resume.

    Raises:
        ConfigError: when a resume is given a `--seed` that differs from the run's own.
    """
    if resume_dir is None:
        return default if seed is None else seed
    saved = read_run_record(resume_dir).get("seed")
    if saved is None:
        fallback = default if seed is None else seed
        log.warning(
            "%s has no %s with the run's seed; using seed %d", resume_dir, RUN_RECORD, fallback
        )
        return fallback
    if seed is not None and seed != saved:
        raise ConfigError(
            f"--seed {seed} differs from the seed {saved} that {resume_dir} was trained with "
            f"({resume_dir / RUN_RECORD}); drop --seed: a resume continues with the run's own seed"
        )
    return int(saved)


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
    """Stores the resolved config (and the run's seed) in every checkpoint, so a lone .ckpt file
    describes its model and run."""

    def __init__(self, config: Any, seed: int | None = None):
        self.config = OmegaConf.to_container(config, resolve=True)
        self.seed = seed

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["config"] = self.config
        if self.seed is not None:
            checkpoint["seed"] = self.seed


def build_callbacks(config: Any, run_dir: Path, seed: int | None = None) -> list[Callback]:
    """Best-by-monitor + last checkpoints, the config callback and a learning-rate monitor."""
    model_cfg = config.model
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
        # Overwrite last.ckpt even when SaveOnInterrupt (not this callback) wrote it, rather than
        # writing last-v1.ckpt, which `--resume <run>` would not find.
        enable_version_counter=False,
    )
    return [
        checkpoint,
        ConfigInCheckpoint(config, seed),
        RNGStateInCheckpoint(),
        ResumePointInCheckpoint(),
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


def _rng_states() -> dict:
    """The Python, NumPy and torch (CPU and CUDA) RNG states, as tensors and plain Python types
    only, so a checkpoint holding them loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _stopped_mid_epoch(trainer: pl.Trainer) -> bool:
    """True while saving a checkpoint in the middle of a training epoch (max_steps, SIGTERM)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return done < trainer.num_training_batches


class RNGStateInCheckpoint(Callback):
    """Saves and restores the Python, NumPy and torch RNG states, so a resumed run draws the same
    posterior and diffusion noise as an uninterrupted one.

    A checkpoint saved mid-epoch (the run stopped at `max_steps` or on SIGTERM) gets the states of
    the end of the last training batch, where the resumed run continues, not the states after the
    epoch-end hooks that Lightning runs when `max_steps` stops an epoch early.
    """

    def __init__(self) -> None:
        self._batch_end_states: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._batch_end_states = _rng_states()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        at_batch_end = self._batch_end_states is not None and _stopped_mid_epoch(trainer)
        checkpoint["rng_states"] = self._batch_end_states if at_batch_end else _rng_states()

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


class ResumePointInCheckpoint(Callback):
    """Makes the epoch counters of a checkpoint saved at a stop say where the run stopped.

    When `max_steps` stops a run, Lightning runs the epoch-end hooks and may save `last.ckpt`
    only after counting the epoch as processed or even completed (at `on_train_end`). Resumed
    from such a checkpoint it would skip the rest of an interrupted epoch, or cut the next epoch
    short. This rewrites the counters to the two states Lightning resumes exactly: mid-epoch
    (epoch started, not processed, as a SIGTERM checkpoint has it; the train loader then
    continues with the remaining batches) and at an epoch's end (processed, not completed).
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
        if not progress:
            return
        mid_epoch = _stopped_mid_epoch(trainer)
        for counts in (progress["current"], progress["total"]):
            if mid_epoch:
                counts["processed"] = counts["completed"] = counts["started"] - 1
            elif counts["completed"] == counts["processed"] == counts["started"] > 0:
                counts["completed"] = counts["processed"] - 1


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
