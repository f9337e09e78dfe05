"""Train either stage of LDCSR from YAML configs.

    python train.py --config configs/first_stage_kl_v6.yaml
    python train.py --config configs/second_stage_van_v4.yaml \
        model.params.first_stage_config.params.ckpt_path=logs/first_stage_kl_v6/<run>/checkpoints/best.ckpt
    python train.py --resume logs/first_stage_kl_v6/<run>            # continue an interrupted run

Overrides (dotted.key=value) and options may come in any order. A resume continues exactly where
the run stopped (mid-epoch too) with the seed kept in <run>/run.yaml.

Runs are written to logs/<config-stem>/<timestamp>[_name]/ with configs/ (the resolved config),
run.yaml (seed, and per start: command, git commit, versions, host, world size), checkpoints/
(best by the config's monitor, last.ckpt, interrupted.ckpt after Ctrl-C or SIGTERM),
tensorboard/ and csv/ (the default lightning.logger) and images/. A run that fails before its
first step removes its folder. lightning.logger and lightning.callbacks take target/params blocks
(one or a list); lightning.trainer.logger=false trains without loggers. Exit code 2 with a one-line
message for a bad config key/type, path, --logdir, --resume target or image (all bad images listed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.checkpoints import AtomicCheckpointIO
from training.folders import check_resumable, make_run_dir, remove_failed_run, resolve_resume
from training.record import resolve_seed, run_entry, save_config, write_run_record
from training.trainer import (
    build_callbacks,
    build_loggers,
    resolve_strategy,
    set_learning_rate,
    trainer_config,
)
from utils.cli import HelpFormatter
from utils.config import ConfigError, instantiate_from_config, load_config

log = logging.getLogger("train")
RUN_DIR_ENV = "LDCSR_RUN_DIR"
DEFAULT_SEED = 23
TRAINER_FLAGS = ("accelerator", "devices", "precision")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", "-c", nargs="+", default=[], help="YAML files, merged in order")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    parser.add_argument("--name", default="", help="suffix of the run folder name")
    parser.add_argument("--resume", default=None, help="run folder or checkpoint to resume from")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed for weights, data and scales (default: {DEFAULT_SEED}); a resume reuses the "
        "run's seed from <run>/run.yaml",
    )
    parser.add_argument("--logdir", default="logs", help="parent folder of the run folders")
    parser.add_argument(
        "--run-dir",
        default=None,
        help="use this run folder instead of a new timestamped one (set it when torchrun or "
        "SLURM start every rank, so that all ranks share it)",
    )
    parser.add_argument("--accelerator", default=None, help="cpu, gpu, auto (overrides config)")
    parser.add_argument("--devices", default=None, help="device count or list (overrides config)")
    parser.add_argument("--precision", default=None, help="32-true, bf16-mixed, 16-mixed, ...")
    args = parser.parse_intermixed_args(argv)
    # `--config a.yaml key=value` puts the overrides into --config's list: move them.
    overrides = [c for c in args.config if "=" in c] + args.overrides
    argv = sys.argv[1:] if argv is None else argv
    args.overrides = sorted(overrides, key=argv.index)  # in command-line order: later wins
    args.config = [c for c in args.config if "=" not in c]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ckpt_path, run_dir = None, None
    configs = list(args.config)
    if args.resume:
        run_dir, ckpt_path, saved_configs = resolve_resume(args.resume)
        configs = configs or saved_configs
    if not configs:  # (a --resume run without configs/ is refused by resolve_resume)
        raise ConfigError("give --config FILE [FILE ...] or --resume RUN_DIR")
    config = load_config(configs, args.overrides)
    trainer_cfg = trainer_config(config, {k: getattr(args, k) for k in TRAINER_FLAGS})

    seed = resolve_seed(args.seed, run_dir, DEFAULT_SEED)
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True)
    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data)
    if ckpt_path is not None:
        check_resumable(ckpt_path, model)
    resolve_strategy(trainer_cfg, model)
    # DDP ranks started by Lightning inherit the folder rank 0 made (RUN_DIR_ENV, set below).
    run_dir = run_dir or args.run_dir or os.environ.get(RUN_DIR_ENV)
    created = run_dir is None or not Path(run_dir).exists()
    run_dir = make_run_dir(args.logdir, Path(configs[-1]).stem, args.name, run_dir)
    trainer = None
    try:
        trainer = pl.Trainer(
            **{k: v for k, v in trainer_cfg.items() if k != "logger"},
            default_root_dir=str(run_dir),
            logger=build_loggers(config.lightning, run_dir, resumed=ckpt_path is not None),
            callbacks=build_callbacks(config, run_dir, seed=seed),
            plugins=[AtomicCheckpointIO()],
        )
        set_learning_rate(model, config, trainer)
        if trainer.is_global_zero:
            save_config(config, run_dir, Path(configs[-1]).stem)
            argv = sys.argv[1:] if argv is None else argv
            entry = run_entry(argv, trainer.world_size, ckpt_path and str(ckpt_path))
            write_run_record(run_dir, seed, entry)
            log.info("run folder: %s", run_dir)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except BaseException:
        if created:
            remove_failed_run(run_dir, trainer)
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def cli(argv: list[str] | None = None) -> int:
    """`main` with the exit codes of the help: 0 trained, 2 a config, path or data problem."""
    try:
        main(argv)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Config and data problems (bad keys, missing/corrupt/too-small images, unwritable
        # folders) carry messages naming the file or key; show those, not a stack trace.
        sys.stderr.write(f"train.py: error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
