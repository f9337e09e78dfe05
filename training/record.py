"""What a run records about itself: the resolved config (`configs/`) and `run.yaml` (the seed
and, per start of train.py, the command, code version, packages and host)."""

from __future__ import annotations

import logging
import platform
import shlex
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from utils.config import ConfigError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent

RUN_RECORD = "run.yaml"


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The fields of `run_dir/run.yaml` (`seed`, `runs`), or {} when the run has no record."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    record = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(record, dict):
        raise ConfigError(f"{path} should hold `key: value` lines, e.g. `seed: 23`")
    return record


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_entry(argv: list[str], world_size: int, resumed_from: str | None = None) -> dict:
    """What one start of train.py ran: command, code version, packages, host, world size."""
    commit, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "train.py", *argv]),
        "cwd": str(Path.cwd()),
        "git_commit": commit,
        "git_dirty": None if commit is None or status is None else bool(status),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "lightning": str(pl.__version__),
        "host": socket.gethostname(),
        "world_size": int(world_size),
        "resumed_from": resumed_from,
    }


def write_run_record(run_dir: str | Path, seed: int, entry: dict) -> Path:
    """Appends `entry` (`run_entry`) to `run_dir/run.yaml`, the run's record across resumes; the
    first start's seed is kept (resolve_seed refuses another)."""
    path = Path(run_dir) / RUN_RECORD
    record = read_run_record(run_dir)
    record.setdefault("seed", seed)
    record["runs"] = [*record.get("runs", []), entry]
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
