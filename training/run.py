"""Run folders, run records, loggers and callbacks from the config, and the learning rate:
the helpers train.py composes a Lightning run from."""

from __future__ import annotations

import inspect
import logging
import platform
import shlex
import shutil
import socket
import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from utils.checkpoint import (
    INTERRUPTED,
    InterruptCheckpoint,
    ResumePointInCheckpoint,
    RNGStateInCheckpoint,
)
from utils.config import ConfigError, get_obj_from_str, to_plain

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


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
