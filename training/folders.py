"""The run folder of a train.py run: made for a new run (removed again when the run fails before
its first step), or found again from a `--resume` target and checked to be continuable."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch

from training.checkpoints import INTERRUPTED
from utils.config import ConfigError

log = logging.getLogger(__name__)


def make_run_dir(logdir: str | Path, stem: str, name: str = "", run_dir=None) -> Path:
    """Returns a new `logdir/stem/<timestamp>[_name]` folder (never an existing one), or
    `run_dir` (--run-dir, a resumed run) with its `checkpoints/` made.

    Raises:
        ConfigError: the folder cannot be made (under a file, read-only, ...), naming the flag.
    """
    flag = "--logdir" if run_dir is None else "--run-dir"
    if run_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        base = Path(logdir) / stem / (f"{stamp}_{name}" if name else stamp)
        run_dir, n = base, 1
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    run_dir = Path(run_dir)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as err:  # under a file, read-only, no space, ...
        raise ConfigError(
            f"cannot create the run folder {run_dir} ({flag}): {err.strerror or err}; choose a "
            f"writable folder with {flag}"
        ) from err
    return run_dir


def remove_failed_run(run_dir: Path, trainer: pl.Trainer | None) -> bool:
    """Deletes a run folder this process made when the run stopped before its first optimiser
    step (bad data root, config error, Ctrl-C during setup): it holds nothing to resume."""
    if trainer is not None and (trainer.global_step > 0 or not trainer.is_global_zero):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
        run_dir.parent.rmdir()  # logs/<config-stem>/ made for this run alone
    log.error("the run failed before its first step; removed its folder %s", run_dir)
    return True


def resolve_resume(path: str | Path) -> tuple[Path, Path, list[str]]:
    """`--resume` target -> (run folder, checkpoint, saved config files).

    Accepts a checkpoint inside a run folder, or a run folder: then the newer of
    `checkpoints/last.ckpt` and `checkpoints/interrupted.ckpt` (Ctrl-C, SIGTERM).
    """
    path = Path(path)
    if path.is_dir():
        run_dir = path
        found = [
            p for p in (path / "checkpoints").glob("*.ckpt") if p.stem in ("last", INTERRUPTED)
        ]
        ckpt = max(
            found, key=lambda p: p.stat().st_mtime_ns, default=path / "checkpoints/last.ckpt"
        )
    else:
        run_dir, ckpt = path.parent.parent, path
    if not ckpt.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
    if path.is_dir() and not (run_dir / "configs").is_dir():
        raise ConfigError(f"--resume {path}: no configs/ folder, so this is not a train.py run "
                          "folder; give the run folder logs/<config>/<run>")  # fmt: skip
    if path.is_file() and (path.parent.name != "checkpoints" or not (run_dir / "configs").is_dir()):
        # Resuming would write the run record and loggers into whatever folder holds it.
        raise ConfigError(
            f"--resume {path}: not a checkpoint of a train.py run folder "
            "(<run>/checkpoints/*.ckpt beside <run>/configs/); give a run folder, or start a new "
            f"run from these weights: --config CONFIG model.params.ckpt_path={path}"
        )
    configs = sorted(str(p) for p in (run_dir / "configs").glob("*.yaml"))
    return run_dir, ckpt, configs


def check_resumable(ckpt_path: Path, model: pl.LightningModule) -> None:
    """Refuses, before anything is written, a checkpoint that Lightning could not continue:
    unreadable, weights only (no optimiser or loop state), or of another model or config.

    Raises:
        ConfigError: naming the file and the fix.
    """
    try:  # mmap: the tensors are not read
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a zip file, not a checkpoint
        raise ConfigError(
            f"--resume: {ckpt_path} is not a readable checkpoint ({_first_line(err)}); resume "
            "from the run folder (it picks last.ckpt or interrupted.ckpt) or another checkpoint"
        ) from err
    missing = [k for k in ("state_dict", "optimizer_states", "loops") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise ConfigError(
            f"--resume: {ckpt_path} holds no training state ({missing or 'not a dict'} missing), "
            "so it cannot be continued; start a new run from its weights with "
            f"model.params.ckpt_path={ckpt_path}"
        )
    own, saved = set(model.state_dict()), set(ckpt["state_dict"])
    if own != saved:
        differ = sorted(own ^ saved)
        raise ConfigError(
            f"--resume: {ckpt_path} was trained with another model or config ({len(differ)} "
            f"weights differ, e.g. {differ[:3]}); drop --config to use the run's own config"
        )


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
