"""What a training run writes into and beside its checkpoints: atomic local saves, the config,
seed, RNG states and resume point inside each checkpoint, and the interrupt checkpoint."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, OnExceptionCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


def _is_local(path: str | Path) -> bool:
    """True for a plain path or a `file://` URL (fsspec's local file system)."""
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with same-folder atomic replacement of local files.

    Remote URLs (`s3://`, `gs://`, ...) go through Lightning's own fsspec saving unchanged. A
    local file is written to `<path>.tmp-<pid>`, fsynced and renamed over `<path>`, so a save
    killed midway (job time limit, full disk) leaves the previous checkpoint intact. Lightning's
    own local save stages the file in the system temporary folder and moves it into place; when
    that folder lies on another file system than the run (a node-local /tmp and a shared run
    folder), the move is a copy, and a kill during the copy leaves a truncated checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
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


INTERRUPTED = "interrupted"  # checkpoints/interrupted.ckpt: written on Ctrl-C or SIGTERM


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


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Lightning's `OnExceptionCheckpoint` (`checkpoints/interrupted.ckpt`, deleted when the run
    ends normally), for interrupts only: Ctrl-C and SIGTERM (a SLURM time limit), once the run
    has taken a step. After a crash the state may be unusable, and before the first step there
    is nothing to keep; `--resume <run>` takes the newer of this and last.ckpt."""

    def __init__(self, dirpath: Path):
        super().__init__(dirpath=str(dirpath), filename=INTERRUPTED)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SystemExit)) or trainer.global_step == 0:
            return
        super().on_exception(trainer, pl_module, exception)
        run_dir = Path(self.dirpath).parent
        log.warning(
            "%s: saved %s at step %d; continue with `python train.py --resume %s`",
            type(exception).__name__,
            self.ckpt_path,
            trainer.global_step,
            run_dir,
        )


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
